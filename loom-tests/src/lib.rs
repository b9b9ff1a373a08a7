//! Model checks of lepus's synchronisation cores; see `tests/models.rs` and `run.sh`.
