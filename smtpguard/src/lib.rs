//! smtpguard: lock inbound SMTP down to trusted sources at XDP.
//!
//! Data flows one way, through one folder per stage:
//!
//! - [`source`]: where prefixes come from: the TOML configuration, prefix notation, list
//!   files, DNS names and SPF records, each prefix with its origin;
//! - [`policy`]: a pure function of what the sources produced: validated prefixes, the
//!   longest-prefix verdicts the program takes;
//! - [`kernel`]: the XDP program and its maps: load, attach and take over, apply a policy in
//!   one atomic step, read the counters back;
//! - [`service`]: the daemon (signals, reloads, DNS refreshes) and its metrics endpoint;
//! - [`command`]: read-only views for the admin: check, explain, stats, report;
//! - [`fleet`]: one policy for many gateways through etcd: publish, follow, status.
//!
//! [`instance`] says where a running instance keeps its pins and state; [`progress`] reports
//! long work while it runs; [`reclaim`] frees what a reload replaced off its path.

pub mod command;
pub mod fleet;
pub mod instance;
pub mod kernel;
pub mod policy;
pub mod progress;
pub mod reclaim;
pub mod service;
pub mod source;
