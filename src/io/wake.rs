//! How handles tell the I/O thread there is work: the engine and the handles know only
//! this trait; the reactor supplies a `mio::Waker`, tests a counter.

/// Something that wakes the I/O thread. Called at most once per batch of commands
/// (`ConnShared::wake` coalesces).
pub(crate) trait Wake: Send + Sync {
    fn wake(&self);
}

impl Wake for mio::Waker {
    fn wake(&self) {
        if let Err(e) = mio::Waker::wake(self) {
            crate::trace::error!("waking the I/O thread failed: {e}");
        }
    }
}
