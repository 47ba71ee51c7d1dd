//! The kernel side: the XDP program ([`filter`]) and what it needs to know about the
//! interfaces it runs on ([`interface`]) and what a pinned link runs on ([`link`]), its maps and the atomic apply of a policy
//! ([`maps`]), the batch system calls that make large applies fast ([`batch`]), and the move
//! of counters from the maps of an older layout when an upgrade brings new ones ([`upgrade`]).

pub mod batch;
pub mod filter;
pub mod interface;
pub mod link;
pub mod maps;
pub mod table;
pub mod upgrade;
