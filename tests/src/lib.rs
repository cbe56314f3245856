//! End-to-end tests across processes live in `tests/`; this crate has no library code.
