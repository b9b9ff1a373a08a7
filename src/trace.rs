//! The crate's one door to diagnostics: log records through `log` (the default), or
//! `tracing` events and spans with the `tracing` feature. Code calls
//! `crate::trace::warn!(..)` and `crate::trace::span!(..)`, never `log::` or `tracing::`.
// The loom model build compiles only the synchronisation cores, which use few of these.
#![cfg_attr(lepus_loom, allow(unused_macros))]

/// A record at `$level` through the facade this build uses.
macro_rules! record {
    ($level:ident, $($t:tt)*) => {{
        #[cfg(feature = "tracing")]
        ::tracing::$level!($($t)*);
        #[cfg(not(feature = "tracing"))]
        ::log::$level!($($t)*);
    }};
}

macro_rules! debug_ {
    ($($t:tt)*) => { $crate::trace::record!(debug, $($t)*) };
}
macro_rules! info_ {
    ($($t:tt)*) => { $crate::trace::record!(info, $($t)*) };
}
macro_rules! warn_ {
    ($($t:tt)*) => { $crate::trace::record!(warn, $($t)*) };
}
macro_rules! error_ {
    ($($t:tt)*) => { $crate::trace::record!(error, $($t)*) };
}

/// An entered `tracing` span (info level) named `$name` with fields shown by `Display`,
/// left when the guard drops; without the `tracing` feature a guard that does nothing
/// (the field expressions are still evaluated by reference, so they stay used).
macro_rules! span_ {
    ($name:literal $(, $k:ident = $v:expr)* $(,)?) => {{
        #[cfg(feature = "tracing")]
        let s = ::tracing::info_span!($name $(, $k = ::tracing::field::display(&$v))*).entered();
        #[cfg(not(feature = "tracing"))]
        let s = {
            $(let _ = &$v;)*
            $crate::trace::NoSpan
        };
        s
    }};
}

#[allow(unused_imports)]
pub(crate) use {
    debug_ as debug, error_ as error, info_ as info, record, span_ as span, warn_ as warn,
};

/// The span guard of a build without the `tracing` feature.
#[cfg(not(feature = "tracing"))]
pub(crate) struct NoSpan;
