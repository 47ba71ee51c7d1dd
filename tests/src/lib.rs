//! Helpers for smtpguard's privileged tests: crafted frames, the real program loaded into the
//! kernel, and network-namespace fixtures that run the real daemon against real TCP.

pub mod bench;
pub mod corpus;
pub mod daemon;
pub mod dns;
pub mod encap;
pub mod etcd;
pub mod frames;
pub mod fuzz;
pub mod generate;
pub mod kernel;
pub mod netns;
pub mod oracle;
pub mod prometheus;
pub mod reference;
pub mod web;
