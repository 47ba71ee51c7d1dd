//! The kernel oracle (in progress).
