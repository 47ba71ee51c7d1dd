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

/// The interface test runs arrive on: `lo`.
pub const LO: u32 = 1;

/// The loaded program and its maps.
pub struct Kernel {
    pub filter: Filter,
    pub maps: PolicyMaps,
}

impl Kernel {
    /// Loads the program and applies the policy written in `toml`. Test runs arrive on `lo`
    /// (index 1), which the program is told about as the daemon tells it about an interface
    /// it attaches to: MAC address [`crate::frames::DST_MAC`], resets allowed.
    pub fn with_policy(toml: &str) -> Self {
        let (filter, maps) = Filter::load(None)
            .unwrap_or_else(|error| panic!("loading the program failed: {error}"));
        let mut kernel = Self { filter, maps };
        kernel.set_lo(crate::frames::DST_MAC, smtpguard_common::iface::REPLIES);
        kernel.apply(toml);
        kernel
    }

    /// What the program believes about `lo`, where test runs arrive.
    pub fn set_lo(&mut self, mac: [u8; 6], flags: u32) {
        let info = smtpguard_common::IfaceInfo {
            mac,
            flags,
            ..Default::default()
        };
        self.maps
            .set_interface(LO, info)
            .unwrap_or_else(|error| panic!("writing the interface entry failed: {error}"));
    }

    /// Forgets `lo`: as for a frame from an interface the daemon never attached to.
    pub fn forget_lo(&mut self) {
        self.maps.remove_interface(LO);
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

    /// The layer-3 program's verdict on `packet` (an IP packet, no Ethernet header), and the
    /// packet as the program left it.
    pub fn run_l3(&mut self, packet: &[u8]) -> (u32, Vec<u8>) {
        self.filter
            .test_run_on(smtpguard::kernel::interface::LinkKind::Layer3, packet)
            .unwrap_or_else(|error| panic!("test run failed: {error}"))
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
            .find(|(_, net, _, _)| net.to_string() == prefix)
            .map(|(_, _, _, id)| id)
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

/// Pins the calling thread to CPU 0: the program's recording budgets are per CPU, and a test
/// that counts against one must not move between them.
pub fn stay_on_one_cpu() {
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set),
            0
        );
    }
}
