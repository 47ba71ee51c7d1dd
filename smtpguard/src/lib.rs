//! smtpguard: lock inbound SMTP down to trusted sources at XDP.
//!
//! Data flows one way: TOML ([`config`]) + what it names ([`sources`]: list files, DNS and
//! SPF) -> validated [`policy`] -> kernel maps, written in one
//! atomic step ([`maps`]) -> verdicts in the XDP program ([`filter`]) -> per-CPU counters ->
//! [`stats`]. The [`daemon`] drives that flow and [`instance`] says where its state lives.

pub mod batch;
pub mod check;
pub mod config;
pub mod daemon;
pub mod dns;
pub mod explain;
pub mod filter;
pub mod instance;
pub mod listfile;
pub mod maps;
pub mod metrics;
pub mod policy;
pub mod prefix;
pub mod report;
pub mod sources;
pub mod spf;
pub mod stats;
