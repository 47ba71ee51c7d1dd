//! Where prefixes come from. The TOML configuration ([`config`]) says what to trust, in
//! [`prefix`] notation, and names list files ([`listfile`]), host names ([`dns`]) and SPF
//! records ([`spf`]) and lists fetched over HTTP(S) ([`url`]); [`fetch`] gathers what those name, each prefix with its origin, so that
//! building the policy stays a pure function of the configuration and what was fetched.
//! [`fleet`] says which group of gateways a host follows through etcd.
//! [`safety`] keeps those automatic inputs from opening the lock-down, and [`store`] keeps
//! their last good answers on disk for a restart without DNS.

pub mod config;
pub mod dns;
pub mod fetch;
pub mod fleet;
pub mod listfile;
pub mod prefix;
pub mod safety;
pub mod spf;
pub mod store;
pub mod url;
