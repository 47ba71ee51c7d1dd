//! The long-running side: the daemon that drives sources -> policy -> kernel, and the
//! Prometheus endpoint that reads the counters at scrape time.

pub mod control;
pub mod daemon;
pub mod metrics;
pub mod state;
