//! Differential fuzzing: random and mutated frames through the real program
//! (BPF_PROG_TEST_RUN), each verdict compared with [`crate::reference`]'s under the same
//! policy. Frames are built from parts (VLAN stacks, IPv4 options and fragments, IPv6
//! extension chains, any TCP flags and offsets, ports guarded or not, sources inside and
//! around nested allow and deny prefixes), then often mutated: cut at any offset, bytes
//! flipped, padding added, length fields rewritten.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::{
    bench::Rng,
    frames::{self, Tag},
    kernel::{Kernel, XDP_DROP, XDP_PASS},
    reference::{self, Expected},
};

/// Nested allow and deny prefixes in both families, two guarded ports.
pub const POLICY: &str = r#"
interfaces = ["lo"]
ports = [25, 2525]

[[allow]]
name = "provider"
prefixes = ["192.0.2.0/24", "198.51.100.0/25", "10.0.0.0/8", "2001:db8:25::/48", "10.1.2.0/24"]

[[deny]]
name = "abuser"
prefixes = ["192.0.2.128/26", "10.1.0.0/16", "2001:db8:25:bad::/64", "192.0.2.77"]
"#;

/// What a run found.
#[derive(Debug, Default)]
pub struct Outcome {
    pub frames: u64,
    /// Frames the kernel's test run refuses (shorter than an Ethernet header, longer than a
    /// page): no NIC delivers them to XDP either.
    pub not_runnable: u64,
    pub dropped: u64,
    pub disagreements: u64,
    /// The first few disagreements: (expected, got, frame as hex).
    pub examples: Vec<(Expected, u32, String)>,
}

/// Runs frames from `seed` until `count` of them went through the program.
pub fn run(seed: u64, count: u64) -> Outcome {
    let mut kernel = Kernel::with_policy(POLICY);
    let config =
        smtpguard::source::config::Config::parse(std::path::Path::new("fuzz.toml"), POLICY)
            .expect("fuzz policy");
    let (policy, _) =
        smtpguard::policy::Policy::build(&config, &smtpguard::source::fetch::Fetched::default())
            .expect("fuzz policy");
    let mut rng = Rng::new(seed);
    let mut outcome = Outcome::default();
    while outcome.frames < count {
        let frame = generate(&mut rng);
        let frame = mutate(&mut rng, frame);
        let expected = reference::classify(&frame, &policy);
        let Ok(got) = kernel.filter.test_run(&frame) else {
            outcome.not_runnable += 1;
            continue;
        };
        outcome.frames += 1;
        outcome.dropped += u64::from(got == XDP_DROP);
        let agree = matches!(
            (expected, got),
            (Expected::Pass, XDP_PASS) | (Expected::Drop, XDP_DROP)
        );
        if !agree {
            outcome.disagreements += 1;
            if outcome.examples.len() < 10 {
                let hex: String = frame.iter().map(|byte| format!("{byte:02x}")).collect();
                outcome.examples.push((expected, got, hex));
            }
        }
    }
    outcome
}

fn pick<T: Copy>(rng: &mut Rng, items: &[T]) -> T {
    items[rng.below(items.len() as u64) as usize]
}

fn source_v4(rng: &mut Rng) -> Ipv4Addr {
    let interesting = [
        [192, 0, 2, 10],
        [192, 0, 2, 77],
        [192, 0, 2, 130],
        [192, 0, 2, 191],
        [192, 0, 2, 192],
        [198, 51, 100, 127],
        [198, 51, 100, 128],
        [10, 1, 2, 3],
        [10, 1, 3, 3],
        [10, 9, 9, 9],
        [203, 0, 113, 7],
    ];
    if rng.below(4) == 0 {
        Ipv4Addr::from(rng.next_u64() as u32)
    } else {
        Ipv4Addr::from(pick(rng, &interesting))
    }
}

fn source_v6(rng: &mut Rng) -> Ipv6Addr {
    let interesting: [u128; 4] = [
        0x2001_0db8_0025_0001_0000_0000_0000_0001,
        0x2001_0db8_0025_0bad_0000_0000_0000_0001,
        0x2001_0db8_0026_0000_0000_0000_0000_0001,
        0x2001_0db8_0024_ffff_ffff_ffff_ffff_ffff,
    ];
    if rng.below(4) == 0 {
        Ipv6Addr::from((u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64()))
    } else {
        Ipv6Addr::from(pick(rng, &interesting))
    }
}

fn tags(rng: &mut Rng) -> Vec<Tag> {
    let count = pick(rng, &[0, 0, 0, 0, 1, 1, 2, 2, 3]);
    (0..count)
        .map(|_| {
            let vid = rng.below(4096) as u16;
            if rng.below(2) == 0 {
                frames::dot1q(vid)
            } else {
                frames::dot1ad(vid)
            }
        })
        .collect()
}

fn segment(rng: &mut Rng, pseudo: &frames::Pseudo) -> Vec<u8> {
    let any = rng.below(65536) as u16;
    let dport = pick(rng, &[25, 25, 2525, 587, any]);
    let flags = match rng.below(3) {
        0 => frames::SYN,
        1 => {
            frames::SYN
                | pick(
                    rng,
                    &[
                        frames::ECE,
                        frames::CWR,
                        frames::ACK,
                        frames::FIN,
                        frames::RST,
                    ],
                )
        }
        _ => rng.below(256) as u8,
    };
    let options: Vec<u8> = (0..pick(rng, &[0, 0, 4, 8, 12, 40]))
        .map(|_| rng.below(256) as u8)
        .collect();
    let data: Vec<u8> = (0..pick(rng, &[0, 0, 1, 20])).map(|_| 0x55).collect();
    let mut segment = frames::tcp(
        rng.below(65536) as u16,
        dport,
        flags,
        &options,
        &data,
        pseudo,
    );
    if rng.below(10) == 0 {
        // Any data offset, valid or not.
        segment[12] = (rng.below(16) as u8) << 4;
    }
    segment
}

fn generate(rng: &mut Rng) -> Vec<u8> {
    let tags = tags(rng);
    let protocol = if rng.below(10) == 0 {
        frames::IPPROTO_UDP
    } else {
        frames::IPPROTO_TCP
    };
    if rng.below(10) < 6 {
        let (src, dst) = (source_v4(rng), Ipv4Addr::new(198, 51, 100, 1));
        let payload = segment(rng, &frames::Pseudo::V4(src, dst));
        let options: Vec<u8> = (0..pick(rng, &[0, 0, 0, 4, 8, 40])).map(|_| 1).collect();
        let mut frag = pick(rng, &[0, frames::IPV4_DF, frames::IPV4_DF, frames::IPV4_MF]);
        if rng.below(8) == 0 {
            frag |= rng.below(0x2000) as u16;
        }
        // A first fragment may stop anywhere in the TCP header.
        let payload = if frag & frames::IPV4_MF != 0 && rng.below(2) == 0 {
            payload[..rng.below(payload.len() as u64 + 1) as usize].to_vec()
        } else {
            payload
        };
        let packet = frames::ipv4(src, dst, protocol, &options, frag, &payload);
        frames::ethernet(
            frames::DST_MAC,
            frames::SRC_MAC,
            &tags,
            frames::ETH_P_IPV4,
            &packet,
        )
    } else {
        let (src, dst) = (
            source_v6(rng),
            Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1),
        );
        let payload = segment(rng, &frames::Pseudo::V6(src, dst));
        let count = pick(rng, &[0, 0, 0, 1, 2, 3, 7, 8, 9, 12]);
        let headers: Vec<(u8, Vec<u8>)> = (0..count)
            .map(|_| match rng.below(5) {
                0 => (
                    frames::IPPROTO_HOPOPTS,
                    frames::ext_header(0, rng.below(3) as u8),
                ),
                1 => (
                    frames::IPPROTO_ROUTING,
                    frames::ext_header(0, rng.below(3) as u8),
                ),
                2 => (
                    frames::IPPROTO_DSTOPTS,
                    frames::ext_header(0, pick(rng, &[0, 1, 40])),
                ),
                3 => (
                    frames::IPPROTO_AH,
                    frames::ah_header(0, 1 + rng.below(3) as u8),
                ),
                _ => {
                    let offset = if rng.below(6) == 0 {
                        rng.below(8192) as u16
                    } else {
                        0
                    };
                    (
                        frames::IPPROTO_FRAGMENT,
                        frames::fragment_header(0, offset, rng.below(2) == 0),
                    )
                }
            })
            .collect();
        let (first, chain) = frames::chain(&headers, protocol);
        let packet = frames::ipv6(src, dst, first, &chain, &payload);
        frames::ethernet(
            frames::DST_MAC,
            frames::SRC_MAC,
            &tags,
            frames::ETH_P_IPV6,
            &packet,
        )
    }
}

fn mutate(rng: &mut Rng, mut frame: Vec<u8>) -> Vec<u8> {
    match rng.below(10) {
        // Cut anywhere.
        0 | 1 => frame.truncate(rng.below(frame.len() as u64 + 1) as usize),
        // Flip bytes.
        2 => {
            for _ in 0..=rng.below(4) {
                let at = rng.below(frame.len() as u64) as usize;
                frame[at] = rng.below(256) as u8;
            }
        }
        // Ethernet padding after the packet.
        3 => frame.extend(std::iter::repeat_n(0u8, rng.below(24) as usize)),
        // Rewrite a length field: IPv4 total length or IPv6 payload length, wherever the
        // IP header sits after the tags.
        4 => {
            let l3 = l3_offset(&frame);
            let field = match frame.get(l3).map(|byte| byte >> 4) {
                Some(4) => l3 + 2,
                Some(6) => l3 + 4,
                _ => return frame,
            };
            if field + 2 <= frame.len() {
                let any = rng.below(65536) as u16;
                let value = pick(rng, &[0u16, 1, 20, 40, any]);
                frame[field..field + 2].copy_from_slice(&value.to_be_bytes());
            }
        }
        _ => {}
    }
    frame
}

/// Where the IP header starts: after the Ethernet header and any VLAN tags.
fn l3_offset(frame: &[u8]) -> usize {
    let mut offset = 12;
    while let Some(&[high, low]) = frame
        .get(offset..offset + 2)
        .map(|bytes| <&[u8; 2]>::try_from(bytes).expect("two bytes"))
    {
        if !matches!(u16::from_be_bytes([high, low]), 0x8100 | 0x88a8) {
            break;
        }
        offset += 4;
    }
    offset + 2
}

/// A disagreement, in words.
pub fn describe(expected: Expected, got: u32) -> String {
    let got = match got {
        XDP_DROP => "DROP",
        XDP_PASS => "PASS",
        _ => "other",
    };
    format!("reference {expected:?}, program {got}")
}
