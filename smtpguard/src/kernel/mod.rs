//! The kernel side: the XDP program ([`filter`]), its maps and the atomic apply of a policy
//! ([`maps`]), and the batch system calls that make large applies fast ([`batch`]).

pub mod batch;
pub mod filter;
pub mod maps;
