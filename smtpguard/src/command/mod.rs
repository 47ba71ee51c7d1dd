//! Read-only views for the admin: `check` and `explain` render a policy built from the
//! configuration; `stats` and `report` read the counters of a running instance, and `top`
//! shows them live.

pub mod canary;
pub mod check;
pub mod explain;
pub mod report;
pub mod stats;
pub mod top;
