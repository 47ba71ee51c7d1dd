//! smtpguard: lock inbound SMTP down to trusted sources at XDP.
//!
//! Data flows one way: TOML ([`config`]) -> validated [`policy`] -> kernel maps, written in one
//! atomic step ([`maps`]) -> verdicts in the XDP program ([`filter`]) -> per-CPU counters ->
//! [`stats`]. The [`daemon`] drives that flow and [`instance`] says where its state lives.

pub mod check;
pub mod config;
pub mod daemon;
pub mod filter;
pub mod instance;
pub mod maps;
pub mod policy;
pub mod prefix;
pub mod stats;
