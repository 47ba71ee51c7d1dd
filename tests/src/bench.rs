//! Building blocks of `cargo xtask bench`: random policies and sources, the floor program,
//! CPU accounting from /proc/stat, and the memory a process's maps hold.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    sync::Arc,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{TestRun, TestRunOptions, Xdp},
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use smtpguard::{
    kernel::filter::PROGRAM_OBJECT,
    policy::{Entry, List, Policy, Scope},
    source::{
        config::{Action, Location, Mode, Precedence},
        fetch::Origin,
    },
};
use smtpguard_common::FLOOR_PROGRAM_NAME;

/// splitmix64: a small, fast, reproducible generator (the figures must not depend on a seed
/// the reader cannot rerun).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// `n` distinct random IPv4 prefixes of length /24 to /32, normalised.
pub fn random_v4_prefixes(rng: &mut Rng, n: usize) -> Vec<IpNet> {
    let mut seen = HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let len = 24 + rng.below(9) as u8;
        let net = Ipv4Net::new(Ipv4Addr::from(rng.next_u64() as u32), len)
            .expect("length")
            .trunc();
        if seen.insert(net) {
            out.push(IpNet::V4(net));
        }
    }
    out
}

/// `n` distinct random IPv6 prefixes of length /32 to /64 inside 2000::/3.
pub fn random_v6_prefixes(rng: &mut Rng, n: usize) -> Vec<IpNet> {
    let mut seen = HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let len = 32 + rng.below(33) as u8;
        let high = (rng.next_u64() & 0x1fff_ffff_ffff_ffff) | 0x2000_0000_0000_0000;
        let bits = (u128::from(high) << 64) | u128::from(rng.next_u64());
        let net = Ipv6Net::new(Ipv6Addr::from(bits), len)
            .expect("length")
            .trunc();
        if seen.insert(net) {
            out.push(IpNet::V6(net));
        }
    }
    out
}

/// An enforce-mode policy guarding port 25 that allows exactly `nets`.
pub fn allow_policy(nets: impl IntoIterator<Item = IpNet>) -> Policy {
    let at = Location {
        file: Path::new("bench").into(),
        line: 0,
    };
    let rule: Arc<str> = "bench".into();
    let entries: BTreeMap<IpNet, Entry> = nets
        .into_iter()
        .map(|net| {
            (
                net,
                Entry {
                    list: List::Allow,
                    rule: Arc::clone(&rule),
                    action: None,
                    precedence: Precedence::Specific,
                    decided_by: None,
                    origin: Origin::Literal,
                    at: at.clone(),
                },
            )
        })
        .collect();
    Policy {
        scopes: vec![Scope {
            name: "default".to_owned(),
            guarded: true,
            ports: BTreeSet::from([25]),
            mode: Mode::Enforce,
            unlisted_action: Action::Drop,
            entries,
            ..Scope::default()
        }],
        refused: Vec::new(),
    }
}

/// A random IPv4 source no prefix of `policy` holds.
pub fn unlisted_v4(rng: &mut Rng, policy: &Policy) -> Ipv4Addr {
    loop {
        let addr = Ipv4Addr::from(rng.next_u64() as u32);
        if policy
            .default_scope()
            .longest_match(IpAddr::V4(addr))
            .is_none()
        {
            return addr;
        }
    }
}

/// The trivial XDP_DROP program from the same object, loaded (its own copy of the maps).
pub struct Floor {
    ebpf: Ebpf,
}

impl Floor {
    pub fn load() -> Self {
        let mut ebpf = EbpfLoader::new()
            .load(PROGRAM_OBJECT)
            .expect("load the object");
        Self::program(&mut ebpf)
            .load()
            .expect("load the floor program");
        Self { ebpf }
    }

    fn program(ebpf: &mut Ebpf) -> &mut Xdp {
        ebpf.program_mut(FLOOR_PROGRAM_NAME)
            .expect("floor program in the object")
            .try_into()
            .expect("an XDP program")
    }

    pub fn xdp(&mut self) -> &mut Xdp {
        Self::program(&mut self.ebpf)
    }

    /// The kernel's time per repetition of `frame`.
    pub fn time_run(&mut self, frame: &[u8], repeat: u32) -> Duration {
        let mut options = TestRunOptions::new();
        options.data_in = Some(frame);
        options.repeat = repeat;
        self.xdp()
            .test_run(options)
            .expect("floor test run")
            .duration
    }
}

/// Busy CPU time of the whole machine so far (user, nice, system, irq, softirq, steal), from
/// /proc/stat, in nanoseconds.
pub fn busy_cpu_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let line = stat.lines().next().expect("cpu line");
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|field| field.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&index| fields.get(index))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    busy * 1_000_000_000 / ticks.max(1)
}

/// Bytes of kernel memory the BPF maps open in process `pid` hold (each map counted once).
pub fn map_memory(pid: u32) -> u64 {
    let mut seen = HashSet::new();
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    for entry in entries.filter_map(Result::ok) {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|value| value.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:"))
            && seen.insert(id)
        {
            total += memlock;
        }
    }
    total
}

/// The median of `values` (sorted in place).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}
