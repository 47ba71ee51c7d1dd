//! What keeps automatic inputs (list files, host names, SPF records) from opening the
//! lock-down: a floor on the length of the allow prefixes they bring ([`below_floor`]), and a
//! limit on how much a DNS refresh may grow the address space a name covers ([`growth`]).
//! The settings are the configuration's `[safety]` table ([`Safety`]).
//!
//! Deny prefixes are never floored: a deny entry only matters inside an allow range, and
//! unlisted sources are stopped anyway, so a short deny prefix can only stop more.

use std::fmt;

use ipnet::IpNet;

use crate::source::{
    config::{Location, Safety},
    fetch::Origin,
};

/// The floor an allow prefix from an automatic source must reach, if `net` is shorter.
pub fn below_floor(net: &IpNet, safety: &Safety) -> Option<u8> {
    let floor = match net {
        IpNet::V4(_) => safety.min_prefix_v4,
        IpNet::V6(_) => safety.min_prefix_v6,
    };
    (net.prefix_len() < floor).then_some(floor)
}

/// Why a prefix was left out of the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Shorter than `[safety] min_prefix_v4` / `min_prefix_v6`.
    Floor { floor: u8 },
}

impl Reason {
    /// The value of the metric's `reason` label.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Floor { .. } => "floor",
        }
    }
}

/// An allow prefix from an automatic source that was left out of the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub net: IpNet,
    pub rule: String,
    pub origin: Origin,
    /// The list file's line, or the configuration line naming the host or SPF domain.
    pub at: Location,
    pub reason: Reason,
}

impl Refusal {
    /// The warning an admin reads: where, what, and which setting refused it.
    pub fn message(&self) -> String {
        match self.reason {
            Reason::Floor { floor } => {
                let (family, key) = match self.net {
                    IpNet::V4(_) => ("IPv4", "min_prefix_v4"),
                    IpNet::V6(_) => ("IPv6", "min_prefix_v6"),
                };
                format!(
                    "{} from {} refused for allow rule {:?}: shorter than /{floor}, the floor for {family} prefixes from list files and DNS ([safety] {key})",
                    self.net, self.origin, self.rule
                )
            }
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message())
    }
}

/// An address family, for coverage and growth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The least coverage growth is measured against: one /24 (IPv4) or one /48 (IPv6), so
    /// that a small list gaining a few addresses is not held back.
    pub const fn unit(self) -> u128 {
        match self {
            Self::V4 => 1 << (32 - 24),
            Self::V6 => 1 << (128 - 48),
        }
    }

    const fn bits(self) -> u32 {
        match self {
            Self::V4 => 32,
            Self::V6 => 128,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// How many addresses of each family a set of prefixes covers (overlaps counted once).
/// `::/0` saturates at `u128::MAX`, one short of its 2^128 addresses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    pub v4: u128,
    pub v6: u128,
}

impl Coverage {
    pub fn of<'a>(nets: impl IntoIterator<Item = &'a IpNet>) -> Self {
        let mut v4: Vec<(u128, u8)> = Vec::new();
        let mut v6: Vec<(u128, u8)> = Vec::new();
        for net in nets {
            match net {
                IpNet::V4(net) => v4.push((u32::from(net.network()).into(), net.prefix_len())),
                IpNet::V6(net) => v6.push((u128::from(net.network()), net.prefix_len())),
            }
        }
        Self {
            v4: union_size(v4, 32),
            v6: union_size(v6, 128),
        }
    }

    pub const fn get(self, family: Family) -> u128 {
        match family {
            Family::V4 => self.v4,
            Family::V6 => self.v6,
        }
    }
}

/// How many addresses `nets` (first address, prefix length) cover together, saturating at
/// `u128::MAX`. Sorted by first address, each prefix after the shorter ones that hold it,
/// two prefixes are either one inside the other or apart: one pass counts every address
/// once, with no minimal set built first (`aggregate` took most of the check on a list of
/// a million prefixes).
fn union_size(mut nets: Vec<(u128, u8)>, bits: u32) -> u128 {
    nets.sort_unstable();
    let mut total = 0u128;
    // Just past the last prefix counted.
    let mut end = 0u128;
    for (start, len) in nets {
        if start < end {
            continue;
        }
        let size = 1u128.checked_shl(bits - u32::from(len));
        total = total.saturating_add(size.unwrap_or(u128::MAX));
        match size.and_then(|size| start.checked_add(size)) {
            Some(next) => end = next,
            // It reaches the last address: every prefix after it is inside.
            None => break,
        }
    }
    total
}

/// A refresh that grew a name's coverage of one family past `max_growth`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Growth {
    pub family: Family,
    pub old: u128,
    pub new: u128,
    /// What `new` was compared with: the larger of `old` and the family's unit.
    pub base: u128,
    pub max_growth: f64,
}

impl fmt::Display for Growth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "it covers {} {} addresses, up from {}: more than max_growth {} times {}",
            describe(self.new, self.family),
            self.family,
            describe(self.old, self.family),
            self.max_growth,
            describe(self.base, self.family),
        )
    }
}

/// A count of addresses with the prefix length it is worth (`4096 (a /20)`).
fn describe(count: u128, family: Family) -> String {
    if count == 0 {
        return "0".to_owned();
    }
    let len = family.bits() - (u128::BITS - 1 - count.leading_zeros()).min(family.bits());
    let about = if count.is_power_of_two() {
        ""
    } else {
        "about "
    };
    format!("{count} ({about}a /{len})")
}

/// Whether `new` grows the coverage of `old` past `max_growth` times the larger of the old
/// coverage and one unit (a /24, a /48), in either family.
pub fn growth(old: &[IpNet], new: &[IpNet], max_growth: f64) -> Option<Growth> {
    let (old, new) = (Coverage::of(old), Coverage::of(new));
    [Family::V4, Family::V6].into_iter().find_map(|family| {
        let base = old.get(family).max(family.unit());
        // f64 keeps 53 bits: plenty to compare factors, exact where it matters (IPv4).
        let grown = new.get(family) as f64 > max_growth * base as f64;
        grown.then_some(Growth {
            family,
            old: old.get(family),
            new: new.get(family),
            base,
            max_growth,
        })
    })
}

#[cfg(test)]
mod tests {
    use ipnet::{Ipv4Net, Ipv6Net};

    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|net| net.parse().unwrap()).collect()
    }

    #[test]
    fn the_floor_refuses_short_prefixes_per_family() {
        let safety = Safety::default();
        let floor = |net: &str| below_floor(&net.parse().unwrap(), &safety);
        assert_eq!(floor("0.0.0.0/0"), Some(12));
        assert_eq!(floor("128.0.0.0/1"), Some(12));
        assert_eq!(floor("40.92.0.0/11"), Some(12));
        assert_eq!(floor("40.92.0.0/15"), None);
        assert_eq!(floor("10.0.0.0/12"), None);
        assert_eq!(floor("::/0"), Some(32));
        assert_eq!(floor("2001:db8::/31"), Some(32));
        assert_eq!(floor("2001:db8::/32"), None);
        let off = Safety {
            min_prefix_v4: 0,
            min_prefix_v6: 0,
            ..Safety::default()
        };
        assert_eq!(below_floor(&"0.0.0.0/0".parse().unwrap(), &off), None);
    }

    #[test]
    fn coverage_counts_the_union() {
        let coverage = Coverage::of(&nets(&[
            "192.0.2.0/24",
            "192.0.2.128/25",
            "192.0.3.0/24",
            "198.51.100.7/32",
            "2001:db8::/48",
            "2001:db8::/64",
        ]));
        assert_eq!(coverage.v4, 513);
        assert_eq!(coverage.v6, 1 << 80);
        assert_eq!(Coverage::of(&nets(&["0.0.0.0/0"])).v4, 1 << 32);
        assert_eq!(Coverage::of(&nets(&["::/0"])).v6, u128::MAX);
        assert_eq!(Coverage::of(&nets(&["::/1", "8000::/1"])).v6, u128::MAX);
    }

    #[test]
    fn coverage_is_the_size_of_the_aggregate() {
        // Nested, adjacent and repeated prefixes, compared with ipnet's minimal set.
        let mut state = 1u64;
        let mut next = || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            state >> 16
        };
        let mut all = Vec::new();
        for _ in 0..2_000 {
            let v4 = Ipv4Net::new(
                (0x0a00_0000 | (next() as u32 & 0xffff)).into(),
                16 + (next() % 17) as u8,
            );
            let v6 = Ipv6Net::new(
                (u128::from(next() & 0xff) << 120 | u128::from(next()) << 64).into(),
                (next() % 129) as u8,
            );
            all.push(IpNet::V4(v4.unwrap().trunc()));
            all.push(IpNet::V6(v6.unwrap().trunc()));
        }
        let sum = |nets: Vec<IpNet>, bits: u32| {
            IpNet::aggregate(&nets)
                .iter()
                .map(|net| {
                    1u128
                        .checked_shl(bits - u32::from(net.prefix_len()))
                        .unwrap_or(u128::MAX)
                })
                .fold(0, u128::saturating_add)
        };
        for count in [0, 1, 10, 300, all.len()] {
            let nets = &all[..count];
            let (v4, v6): (Vec<IpNet>, Vec<IpNet>) =
                nets.iter().partition(|net| net.addr().is_ipv4());
            let coverage = Coverage::of(nets);
            assert_eq!(coverage.v4, sum(v4, 32), "{count} prefixes");
            assert_eq!(coverage.v6, sum(v6, 128), "{count} prefixes");
        }
    }

    #[test]
    fn growth_is_measured_against_at_least_a_unit() {
        // A /28 becoming a /24: within one /24's worth, never held.
        assert_eq!(
            growth(&nets(&["192.0.2.32/28"]), &nets(&["192.0.2.0/24"]), 4.0),
            None
        );
        // Four /24s are still within 4 x a /24; five are not.
        assert_eq!(
            growth(&nets(&["192.0.2.7/32"]), &nets(&["10.0.0.0/22"]), 4.0),
            None
        );
        let grown = growth(&nets(&["192.0.2.0/24"]), &nets(&["10.0.0.0/20"]), 4.0).unwrap();
        assert_eq!(
            (grown.family, grown.old, grown.new),
            (Family::V4, 256, 4096)
        );
        assert_eq!(
            grown.to_string(),
            "it covers 4096 (a /20) IPv4 addresses, up from 256 (a /24): more than max_growth 4 times 256 (a /24)"
        );
        // Shrinking, or moving, is never growth.
        assert_eq!(
            growth(&nets(&["10.0.0.0/16"]), &nets(&["10.1.0.0/16"]), 4.0),
            None
        );
        // A family that was absent is measured against its unit.
        let grown = growth(&nets(&["192.0.2.0/24"]), &nets(&["2001:db8::/32"]), 4.0).unwrap();
        assert_eq!(grown.family, Family::V6);
        assert_eq!(grown.old, 0);
        assert!(growth(&nets(&["192.0.2.0/24"]), &nets(&["2001:db8::/48"]), 4.0).is_none());
        // 0.0.0.0/0 and ::/0 are growth, whatever was there (u128 does not overflow).
        assert!(growth(&nets(&["10.0.0.0/8"]), &nets(&["0.0.0.0/0"]), 4.0).is_some());
        assert!(growth(&nets(&["2001:db8::/32"]), &nets(&["::/0"]), 4.0).is_some());
    }
}
