//! Differential fuzzing: frames from [`crate::generate`] through the real program
//! (BPF_PROG_TEST_RUN), each verdict compared with [`crate::reference`]'s under the same
//! policy, once with `action = "drop"`, once with `action = "reject"`, and once with drop
//! and without the policy's scope (where the IPv4 table decides). Under reject, a reset the
//! reference expects must come back as `XDP_TX` with exactly the RST it describes (checked
//! with etherparse on the program's output frame).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

use smtpguard::{policy::Policy, source::config::Config};

use crate::{
    frames,
    generate::{Generator, Target},
    kernel::{Kernel, XDP_DROP, XDP_PASS, XDP_TX, verdict_name},
    reference::{self, Expected, Iface, Sight},
};

/// Nested allow and deny prefixes in both families: a deny /32 inside an allowed /24, an
/// allowed /24 inside a denied /16 inside an allowed /8, an allowed /128 inside a denied /64
/// inside an allowed /48. A feed (deny of `allow` precedence) inside allowed ranges, inside
/// the admin's deny inside them, and outside them. A scope for a second destination with its
/// own port, action and rules ([`SCOPE`], which follows).
pub const RULES: &str = r#"
[[allow]]
name = "provider"
prefixes = ["192.0.2.0/24", "198.51.100.0/25", "10.0.0.0/8", "10.1.2.0/24", "2001:db8:25::/48", "2001:db8:25:bad::25"]

[[deny]]
name = "abuser"
prefixes = ["192.0.2.128/26", "10.1.0.0/16", "2001:db8:25:bad::/64", "192.0.2.77"]

[[deny]]
name = "feed"
precedence = "allow"
prefixes = ["192.0.2.0/25", "10.1.2.128/25", "10.1.3.0/24", "2001:db8:25::/56", "203.0.113.0/24"]
"#;

/// The scope of [`RULES`]: with it, the trie decides IPv4 sources; without it (the policy of
/// one scope most sites run), the IPv4 table does. The fuzzer runs both.
pub const SCOPE: &str = r#"
[[scope]]
name = "second"
destinations = ["198.51.100.2", "2001:db8:100::2"]
ports = [25]
action = "reject"
[[scope.allow]]
name = "provider-b"
prefixes = ["192.0.2.0/25", "203.0.113.0/24", "2001:db8:25:bad::/64"]
[[scope.deny]]
name = "abuser-b"
prefixes = ["192.0.2.64/26", "2001:db8:25:bad::25"]
"#;

/// A candidate for the canary runs, as unlike [`RULES`] as a candidate gets: other ports,
/// half the address space allowed, the provider's range denied, a scope of its own on the
/// second destination that only audits, a feed that outranks nothing.
pub const CANDIDATE: &str = r#"
interfaces = ["lo"]
ports = [25, 587]
action = "reject"

[[allow]]
name = "half"
prefixes = ["0.0.0.0/1", "2001:db8::/33", "192.0.2.128/25"]

[[deny]]
name = "provider-denied"
prefixes = ["192.0.2.0/24", "10.1.2.0/24", "2001:db8:25::/48"]

[[scope]]
name = "second-audit"
destinations = ["198.51.100.2", "2001:db8:100::/64"]
ports = [25, 2525]
mode = "audit"
[[scope.allow]]
name = "tiny"
prefixes = ["203.0.113.5"]
"#;

/// The guarded ports of [`policy_toml`].
pub const PORTS: [u16; 2] = [25, 2525];

/// The fuzzing policy on `interface`, with `action` ("drop" or "reject") for unlisted and
/// denied sources.
pub fn policy_toml(interface: &str, action: &str) -> String {
    format!("{}{SCOPE}", unscoped_policy_toml(interface, action))
}

/// As [`policy_toml`], without its [`SCOPE`].
pub fn unscoped_policy_toml(interface: &str, action: &str) -> String {
    format!(
        "interfaces = [\"{interface}\"]\nports = [{}, {}]\naction = \"{action}\"\n{RULES}",
        PORTS[0], PORTS[1]
    )
}

/// The policy `toml` builds, as the daemon builds it.
pub fn policy(toml: &str) -> Policy {
    let config = Config::parse(Path::new("fuzz.toml"), toml).expect("fuzz policy");
    Policy::build(&config, &smtpguard::source::fetch::Fetched::default())
        .expect("fuzz policy")
        .0
}

/// The MAC test runs' frames are sent to: the `lo` entry of `SG_IFACES` says it is ours.
pub const LO_MAC: [u8; 6] = frames::DST_MAC;

/// Who the fuzzer's frames are for.
pub fn target() -> Target {
    Target {
        server_mac: LO_MAC,
        client_mac: frames::SRC_MAC,
        v4: Ipv4Addr::new(198, 51, 100, 1),
        v6: Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1),
    }
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Outcome {
    pub frames: u64,
    /// Frames the kernel's test run refuses (shorter than an Ethernet header, longer than a
    /// page): no NIC delivers them to XDP either.
    pub not_runnable: u64,
    /// Under the drop policy.
    pub dropped: u64,
    /// Under the reject policy.
    pub reset: u64,
    /// In canary runs: SYNs whose verdict the candidate would change (summed over both
    /// policies), as the program counted them.
    pub canary_changes: u64,
    pub disagreements: u64,
    /// Disagreements by kind (policy, reference, program, what the frame is).
    pub kinds: BTreeMap<String, u64>,
    /// The first few disagreements: what differs, and the frame as hex.
    pub examples: Vec<String>,
}

/// Runs frames from `seed` until `count` of them went through the program.
pub fn run(seed: u64, count: u64) -> Outcome {
    run_with(seed, count, false)
}

/// As [`run`]; with `canary`, a canary compares every frame with [`CANDIDATE`], which must
/// change no verdict: the reference still judges by the running policy.
pub fn run_with(seed: u64, count: u64, canary: bool) -> Outcome {
    let mut outcome = Outcome::default();
    let mut runs = [
        ("drop", "drop", true),
        ("reject", "reject", true),
        ("drop, one scope", "drop", false),
    ]
    .map(|(name, action, scoped)| {
        let toml = if scoped {
            policy_toml("lo", action)
        } else {
            unscoped_policy_toml("lo", action)
        };
        let mut kernel = Kernel::with_policy(&toml);
        // The run without the scope is there for the IPv4 table: it must be the one deciding.
        assert_eq!(
            kernel.maps.ipv4_table_in_force().expect("slot settings"),
            !scoped,
            "{name}: IPv4 table"
        );
        kernel.set_lo(LO_MAC, smtpguard_common::iface::REPLIES);
        if canary {
            kernel
                .maps
                .start_canary(&policy(CANDIDATE), &Default::default(), true)
                .expect("canary");
        }
        (name, kernel, policy(&toml))
    });
    let iface = Iface {
        mac: LO_MAC,
        replies: true,
    };
    let mut generator = Generator::new(seed, target());
    while outcome.frames < count {
        let frame = generator.next_frame();
        let mut verdicts = Vec::with_capacity(runs.len());
        for (name, kernel, policy) in &mut runs {
            let Ok(got) = kernel.filter.test_run_output(&frame) else {
                break;
            };
            verdicts.push((*name, reference::classify(&frame, policy, &iface), got));
        }
        if verdicts.len() < runs.len() {
            outcome.not_runnable += 1;
            continue;
        }
        outcome.frames += 1;
        for (name, expected, (got, out)) in verdicts {
            outcome.dropped += u64::from(name == "drop" && got == XDP_DROP);
            outcome.reset += u64::from(name == "reject" && got == XDP_TX);
            if let Err(problem) = agree(&expected, got, &out) {
                outcome.disagreements += 1;
                let kind = format!(
                    "{name}: reference {}, program {}: {} ({})",
                    expected.name(),
                    verdict_name(got),
                    describe_sight(&reference::sight(&frame)),
                    describe_link(&frame)
                );
                *outcome.kinds.entry(kind.clone()).or_default() += 1;
                if outcome.examples.len() < 12 {
                    outcome
                        .examples
                        .push(format!("{kind}: {problem}\n    {}", hex(&frame)));
                }
            }
        }
    }
    if canary {
        for (_, kernel, _) in &runs {
            let counters = kernel.counters();
            outcome.canary_changes += counters.get(smtpguard_common::counter::CANARY_NEWLY_BLOCKED)
                + counters.get(smtpguard_common::counter::CANARY_NEWLY_ALLOWED);
        }
    }
    outcome
}

/// Whether the program's verdict `got` (and output frame `out`) is what `expected` says.
fn agree(expected: &Expected, got: u32, out: &[u8]) -> Result<(), String> {
    match (expected, got) {
        (Expected::Pass, XDP_PASS) | (Expected::Drop, XDP_DROP) => Ok(()),
        (Expected::Reset(reply), XDP_TX) => {
            reference::check_reply(reply, out).map_err(|error| format!("wrong RST: {error}"))
        }
        _ => Err(format!(
            "expected {}, got {}",
            expected.name(),
            verdict_name(got)
        )),
    }
}

/// What the reference makes of a frame, in a few words: coarse enough to count by.
pub fn describe_sight(sight: &Sight) -> String {
    match sight {
        Sight::Other => "not guarded traffic".into(),
        Sight::LaterFragment => "later fragment".into(),
        Sight::Malformed(why) => format!("malformed: {why}"),
        Sight::Opaque(why) => format!("opaque: {why}"),
        Sight::Hidden { dport: None, .. } => "hidden, port unknown".into(),
        Sight::Hidden { .. } => "hidden, port in sight".into(),
        Sight::Segment(segment) => {
            let flags = if !segment.is_syn() {
                "not a SYN"
            } else if segment.flags & (frames::FIN | frames::RST) != 0 {
                "SYN with FIN or RST"
            } else {
                "SYN"
            };
            let fragment = if segment.first_fragment {
                ", first fragment"
            } else {
                ""
            };
            let outer = if segment.outermost {
                ""
            } else {
                ", tunnelled or behind PPPoE/MPLS"
            };
            format!("{flags}{fragment}{outer}")
        }
    }
}

/// The frame's outer link in a few words: VLAN tags and what follows them.
pub fn describe_link(frame: &[u8]) -> String {
    let l3 = crate::generate::l3_offset(frame);
    let tags = (l3.saturating_sub(14)) / 4;
    let ether_type = frame
        .get(l3 - 2..l3)
        .map_or(0, |bytes| u16::from_be_bytes([bytes[0], bytes[1]]));
    let next = match ether_type {
        frames::ETH_P_IPV4 => "IPv4".to_owned(),
        frames::ETH_P_IPV6 => "IPv6".to_owned(),
        frames::ETH_P_PPPOE_SESSION => "PPPoE".to_owned(),
        frames::ETH_P_MPLS_UC | frames::ETH_P_MPLS_MC => "MPLS".to_owned(),
        other => format!("{other:#06x}"),
    };
    let tags = match tags {
        0 => String::new(),
        1..=2 => format!("{tags} tags, "),
        3..=16 => "3-16 tags, ".to_owned(),
        _ => "17+ tags, ".to_owned(),
    };
    format!("{tags}{next}")
}

/// A frame as hex, as the examples print it.
pub fn hex(frame: &[u8]) -> String {
    frame.iter().map(|byte| format!("{byte:02x}")).collect()
}
