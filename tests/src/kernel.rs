//! The real XDP program loaded into the running kernel (the verifier runs), with a policy
//! applied through the daemon's own map code, driven through `BPF_PROG_TEST_RUN`.

use std::path::Path;

use smtpguard::{
    kernel::{
        filter::Filter,
        maps::{ApplyReport, CounterSnapshot, PolicyMaps},
    },
    policy::Policy,
    source::config::Config,
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// `SG_IFACES` flags (`smtpguard_common::IfaceInfo`, once it lands): the interface carries no
/// Ethernet header, and the interface may send replies.
pub const IFACE_LAYER3: u32 = 1;
pub const IFACE_REPLIES: u32 = 2;
/// Test runs come in on the loopback device of the caller's namespace.
pub const LO_IFINDEX: u32 = 1;
/// Name of the map the program reads an interface's MAC and flags from.
pub const IFACES_MAP: &str = "SG_IFACES";

/// The loaded program and its maps.
pub struct Kernel {
    pub filter: Filter,
    pub maps: PolicyMaps,
}

impl Kernel {
    /// Loads the program and applies the policy written in `toml`.
    pub fn with_policy(toml: &str) -> Self {
        let (filter, maps) = Filter::load(None)
            .unwrap_or_else(|error| panic!("loading the program failed: {error}"));
        let mut kernel = Self { filter, maps };
        kernel.apply(toml);
        kernel
    }

    pub fn apply(&mut self, toml: &str) -> ApplyReport {
        let config = Config::parse(Path::new("test.toml"), toml)
            .unwrap_or_else(|error| panic!("bad test config: {error}"));
        let (policy, _) = Policy::build(&config, &smtpguard::source::fetch::Fetched::default())
            .unwrap_or_else(|error| panic!("bad test policy: {error}"));
        self.maps
            .apply(&policy)
            .unwrap_or_else(|error| panic!("apply failed: {error}"))
    }

    /// The program's verdict on `frame`.
    pub fn verdict(&mut self, frame: &[u8]) -> u32 {
        self.filter
            .test_run(frame)
            .unwrap_or_else(|error| panic!("test run failed: {error}"))
    }

    /// The counter id the policy in force gives `prefix` (as `check` prints it).
    /// The program's verdict on `frame`, and the frame as the program left it.
    pub fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.filter
            .test_run_output(frame)
            .unwrap_or_else(|error| panic!("test run failed: {error}"))
    }

    /// Writes the `SG_IFACES` entry of `ifindex` (for test runs: `lo`, [`LO_IFINDEX`]), which
    /// the daemon writes at attach: the MAC a reset is sent from and [`IFACE_REPLIES`] /
    /// [`IFACE_LAYER3`]. The value is laid out as `IfaceInfo { mac: [u8; 6], _pad: [u8; 2],
    /// flags: u32 }`. Says why not where the program has no such map (it predates the reset
    /// contract) or the map's layout is another.
    pub fn set_iface(&mut self, ifindex: u32, mac: [u8; 6], flags: u32) -> Result<(), String> {
        use aya::maps::{Array, HashMap, Map, MapData, MapInfo};
        let info = self
            .filter
            .program_info()
            .map_err(|error| format!("program info: {error}"))?;
        let ids = info
            .map_ids()
            .map_err(|error| format!("the program's maps: {error}"))?
            .unwrap_or_default();
        for id in ids {
            let map = MapInfo::from_id(id).map_err(|error| format!("map {id}: {error}"))?;
            if map.name_as_str() != Some(IFACES_MAP) {
                continue;
            }
            if (map.key_size(), map.value_size()) != (4, 12) {
                return Err(format!(
                    "{IFACES_MAP} has {}-byte keys and {}-byte values, not 4 and 12",
                    map.key_size(),
                    map.value_size()
                ));
            }
            let mut value = [0u8; 12];
            value[..6].copy_from_slice(&mac);
            value[8..].copy_from_slice(&flags.to_ne_bytes());
            let data = MapData::from_id(id).map_err(|error| format!("map {id}: {error}"))?;
            let map = Map::from_map_data(data).map_err(|error| format!("map {id}: {error}"))?;
            let written = match map {
                Map::HashMap(_) => HashMap::<MapData, u32, [u8; 12]>::try_from(map)
                    .and_then(|mut map| map.insert(ifindex, value, 0)),
                Map::Array(_) => Array::<MapData, [u8; 12]>::try_from(map)
                    .and_then(|mut map| map.set(ifindex, value, 0)),
                _ => return Err(format!("{IFACES_MAP} is neither a hash map nor an array")),
            };
            return written.map_err(|error| format!("writing {IFACES_MAP}[{ifindex}]: {error}"));
        }
        Err(format!(
            "the program has no {IFACES_MAP} map (it predates the reset contract)"
        ))
    }

    /// What the table of stopped sources holds.
    pub fn offenders(&self) -> Vec<(std::net::IpAddr, smtpguard_common::Offender)> {
        self.maps
            .offenders()
            .unwrap_or_else(|error| panic!("reading the offender table failed: {error}"))
    }

    pub fn counter_id(&self, prefix: &str) -> u32 {
        self.maps
            .counter_ids()
            .find(|(net, _, _)| net.to_string() == prefix)
            .map(|(_, _, id)| id)
            .unwrap_or_else(|| panic!("no counter for {prefix}"))
    }

    /// SYNs counted for `prefix` (a prefix never matched has no counter yet: 0).
    pub fn prefix_syns(&self, prefix: &str) -> u64 {
        let id = self.counter_id(prefix);
        self.counters().prefixes.get(&id).copied().unwrap_or(0)
    }

    pub fn counters(&self) -> CounterSnapshot {
        self.maps
            .counters()
            .unwrap_or_else(|error| panic!("reading counters failed: {error}"))
    }
}

/// Human-readable verdict, for assertion messages.
pub fn verdict_name(verdict: u32) -> &'static str {
    match verdict {
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        0 => "XDP_ABORTED",
        3 => "XDP_TX",
        4 => "XDP_REDIRECT",
        _ => "unknown",
    }
}
