//! The engine, state by state and violation by violation.
