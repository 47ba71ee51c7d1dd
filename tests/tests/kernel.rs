//! The real XDP program in the real kernel, through BPF_PROG_TEST_RUN: every parser case gets a
//! crafted frame, and the verdict and counters are checked against the policy.

use std::net::{Ipv4Addr, Ipv6Addr};

use smtpguard_tests::{
    frames::*,
    kernel::{Kernel, XDP_DROP, XDP_PASS, verdict_name},
};

const POLICY: &str = r#"
interfaces = ["lo"]
ports = [25, 2525]

[[allow]]
name = "provider"
prefixes = ["89.16.184.144/28", "89.16.176.76", "208.123.79.0/255.255.255.0", "2001:db8:25::/48"]

[[deny]]
name = "abuser"
prefixes = ["89.16.184.150", "2001:db8:25:bad::/64"]
"#;

const DST4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 25);
const DST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 25);
const ALLOWED4: Ipv4Addr = Ipv4Addr::new(89, 16, 184, 145);
const DENIED4: Ipv4Addr = Ipv4Addr::new(89, 16, 184, 150);
const UNLISTED4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const ALLOWED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x25, 1, 0, 0, 0, 1);
const DENIED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x25, 0xbad, 0, 0, 0, 1);
const UNLISTED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x66, 0, 0, 0, 0, 1);

fn expect(kernel: &mut Kernel, frame: &[u8], want: u32, case: &str) {
    let got = kernel.verdict(frame);
    assert_eq!(
        got,
        want,
        "{case}: expected {}, got {}",
        verdict_name(want),
        verdict_name(got)
    );
}

#[test]
fn allow_deny_unlisted_ipv4_and_ipv6() {
    let mut kernel = Kernel::with_policy(POLICY);
    expect(
        &mut kernel,
        &tcp4(&[], ALLOWED4, DST4, 25, SYN),
        XDP_PASS,
        "allowed IPv4 SYN",
    );
    expect(
        &mut kernel,
        &tcp4(&[], DENIED4, DST4, 25, SYN),
        XDP_DROP,
        "denied IPv4 SYN inside allowed /28",
    );
    expect(
        &mut kernel,
        &tcp4(&[], UNLISTED4, DST4, 25, SYN),
        XDP_DROP,
        "unlisted IPv4 SYN",
    );
    expect(
        &mut kernel,
        &tcp6(&[], ALLOWED6, DST6, 25, SYN),
        XDP_PASS,
        "allowed IPv6 SYN",
    );
    expect(
        &mut kernel,
        &tcp6(&[], DENIED6, DST6, 25, SYN),
        XDP_DROP,
        "denied IPv6 SYN",
    );
    expect(
        &mut kernel,
        &tcp6(&[], UNLISTED6, DST6, 25, SYN),
        XDP_DROP,
        "unlisted IPv6 SYN",
    );
}

fn counters_delta(
    kernel: &Kernel,
    before: &smtpguard::kernel::maps::CounterSnapshot,
    index: u32,
) -> u64 {
    kernel.counters().get(index) - before.get(index)
}

#[test]
fn most_specific_prefix_and_every_notation() {
    let mut kernel = Kernel::with_policy(POLICY);
    for (src, want, case) in [
        (
            Ipv4Addr::new(89, 16, 184, 144),
            XDP_PASS,
            "first address of the /28",
        ),
        (
            Ipv4Addr::new(89, 16, 184, 159),
            XDP_PASS,
            "last address of the /28",
        ),
        (
            Ipv4Addr::new(89, 16, 184, 160),
            XDP_DROP,
            "just past the /28",
        ),
        (
            Ipv4Addr::new(89, 16, 184, 143),
            XDP_DROP,
            "just before the /28",
        ),
        (Ipv4Addr::new(89, 16, 176, 76), XDP_PASS, "single address"),
        (
            Ipv4Addr::new(89, 16, 176, 77),
            XDP_DROP,
            "next to the single address",
        ),
        (
            Ipv4Addr::new(208, 123, 79, 200),
            XDP_PASS,
            "netmask notation /24",
        ),
        (
            Ipv4Addr::new(208, 123, 80, 1),
            XDP_DROP,
            "outside the netmask /24",
        ),
    ] {
        expect(&mut kernel, &tcp4(&[], src, DST4, 25, SYN), want, case);
    }
    for (src, want, case) in [
        (
            Ipv6Addr::new(0x2001, 0xdb8, 0x25, 0xffff, 0, 0, 0, 1),
            XDP_PASS,
            "inside the /48",
        ),
        (
            Ipv6Addr::new(0x2001, 0xdb8, 0x25, 0xbad, 0xffff, 0, 0, 1),
            XDP_DROP,
            "deny /64 inside the allowed /48",
        ),
        (
            Ipv6Addr::new(0x2001, 0xdb8, 0x24, 0xffff, 0, 0, 0, 1),
            XDP_DROP,
            "outside the /48",
        ),
    ] {
        expect(&mut kernel, &tcp6(&[], src, DST6, 25, SYN), want, case);
    }
}

#[test]
fn tcp_flag_combinations() {
    let mut kernel = Kernel::with_policy(POLICY);
    for flags in 0..=u8::MAX {
        let is_new_connection = flags & (SYN | ACK) == SYN;
        let want = if is_new_connection {
            XDP_DROP
        } else {
            XDP_PASS
        };
        let case = format!("unlisted IPv4 flags {flags:#04x}");
        expect(
            &mut kernel,
            &tcp4(&[], UNLISTED4, DST4, 25, flags),
            want,
            &case,
        );
        let case = format!("unlisted IPv6 flags {flags:#04x}");
        expect(
            &mut kernel,
            &tcp6(&[], UNLISTED6, DST6, 25, flags),
            want,
            &case,
        );
        let case = format!("allowed IPv4 flags {flags:#04x}");
        expect(
            &mut kernel,
            &tcp4(&[], ALLOWED4, DST4, 25, flags),
            XDP_PASS,
            &case,
        );
    }
    // The named combinations, for the record.
    expect(
        &mut kernel,
        &tcp4(&[], UNLISTED4, DST4, 25, SYN | ECE | CWR),
        XDP_DROP,
        "ECN-setup SYN",
    );
    expect(
        &mut kernel,
        &tcp4(&[], UNLISTED4, DST4, 25, SYN | ACK),
        XDP_PASS,
        "SYN-ACK",
    );
    expect(
        &mut kernel,
        &tcp4(&[], UNLISTED4, DST4, 25, ACK | PSH),
        XDP_PASS,
        "data on an established connection",
    );
    expect(
        &mut kernel,
        &tcp4(&[], UNLISTED4, DST4, 25, FIN | ACK),
        XDP_PASS,
        "FIN",
    );
    expect(
        &mut kernel,
        &tcp4(&[], UNLISTED4, DST4, 25, RST),
        XDP_PASS,
        "RST",
    );
    expect(
        &mut kernel,
        &tcp4(&[], UNLISTED4, DST4, 25, SYN | FIN | URG | PSH),
        XDP_DROP,
        "christmas SYN",
    );
}

#[test]
fn only_guarded_ports_are_touched() {
    let mut kernel = Kernel::with_policy(POLICY);
    for (port, want) in [
        (25, XDP_DROP),
        (2525, XDP_DROP),
        (24, XDP_PASS),
        (26, XDP_PASS),
        (587, XDP_PASS),
        (465, XDP_PASS),
        (0, XDP_PASS),
        (65535, XDP_PASS),
    ] {
        expect(
            &mut kernel,
            &tcp4(&[], UNLISTED4, DST4, port, SYN),
            want,
            &format!("IPv4 port {port}"),
        );
        expect(
            &mut kernel,
            &tcp6(&[], UNLISTED6, DST6, port, SYN),
            want,
            &format!("IPv6 port {port}"),
        );
    }
    kernel.apply("interfaces = [\"lo\"]\nports = [65535, 1]\nallow_none = true\n");
    expect(
        &mut kernel,
        &tcp4(&[], ALLOWED4, DST4, 65535, SYN),
        XDP_DROP,
        "port 65535 guarded",
    );
    expect(
        &mut kernel,
        &tcp4(&[], ALLOWED4, DST4, 1, SYN),
        XDP_DROP,
        "port 1 guarded",
    );
    expect(
        &mut kernel,
        &tcp4(&[], ALLOWED4, DST4, 25, SYN),
        XDP_PASS,
        "25 no longer guarded",
    );
}

#[test]
fn non_tcp_and_non_ip_pass() {
    let mut kernel = Kernel::with_policy(POLICY);
    let udp = ipv4(
        UNLISTED4,
        DST4,
        IPPROTO_UDP,
        &[],
        0,
        &[0, 1, 0, 25, 0, 8, 0, 0],
    );
    expect(
        &mut kernel,
        &ethernet(DST_MAC, SRC_MAC, &[], ETH_P_IPV4, &udp),
        XDP_PASS,
        "UDP to port 25",
    );
    let arp = vec![0u8; 28];
    expect(
        &mut kernel,
        &ethernet(DST_MAC, SRC_MAC, &[], ETH_P_ARP, &arp),
        XDP_PASS,
        "ARP",
    );
    for next in [IPPROTO_UDP, IPPROTO_ICMPV6, IPPROTO_NONE] {
        let packet = ipv6(UNLISTED6, DST6, next, &[], &[0; 20]);
        expect(
            &mut kernel,
            &ethernet(DST_MAC, SRC_MAC, &[], ETH_P_IPV6, &packet),
            XDP_PASS,
            &format!("IPv6 next header {next}"),
        );
    }
}

#[test]
fn vlan_stacks() {
    let mut kernel = Kernel::with_policy(POLICY);
    for (name, tags) in [
        ("802.1Q", vec![dot1q(10)]),
        ("802.1ad outer only", vec![dot1ad(10)]),
        ("QinQ", vec![dot1ad(100), dot1q(10)]),
        ("double 802.1Q", vec![dot1q(100), dot1q(10)]),
    ] {
        expect(
            &mut kernel,
            &tcp4(&tags, UNLISTED4, DST4, 25, SYN),
            XDP_DROP,
            &format!("{name} unlisted IPv4 SYN"),
        );
        expect(
            &mut kernel,
            &tcp4(&tags, ALLOWED4, DST4, 25, SYN),
            XDP_PASS,
            &format!("{name} allowed IPv4 SYN"),
        );
        expect(
            &mut kernel,
            &tcp4(&tags, DENIED4, DST4, 25, SYN),
            XDP_DROP,
            &format!("{name} denied IPv4 SYN"),
        );
        expect(
            &mut kernel,
            &tcp6(&tags, UNLISTED6, DST6, 25, SYN),
            XDP_DROP,
            &format!("{name} unlisted IPv6 SYN"),
        );
        expect(
            &mut kernel,
            &tcp6(&tags, ALLOWED6, DST6, 25, SYN),
            XDP_PASS,
            &format!("{name} allowed IPv6 SYN"),
        );
        expect(
            &mut kernel,
            &tcp4(&tags, UNLISTED4, DST4, 25, ACK),
            XDP_PASS,
            &format!("{name} ACK"),
        );
    }
    // Linux strips priority tags (VID 0) one after another and delivers what is behind them
    // to the base device: a stack of them is a SYN like any other.
    let qinq_9100 = |vid| smtpguard_tests::frames::Tag { tpid: 0x9100, vid };
    for depth in [3usize, 4, 8, 16] {
        let tags: Vec<_> = (0..depth)
            .map(|i| match i % 3 {
                0 => dot1ad(0),
                1 => dot1q(0),
                _ => qinq_9100(0),
            })
            .collect();
        for (frame, want, what) in [
            (
                tcp4(&tags, UNLISTED4, DST4, 25, SYN),
                XDP_DROP,
                "unlisted IPv4 SYN",
            ),
            (
                tcp4(&tags, ALLOWED4, DST4, 25, SYN),
                XDP_PASS,
                "allowed IPv4 SYN",
            ),
            (
                tcp6(&tags, UNLISTED6, DST6, 25, SYN),
                XDP_DROP,
                "unlisted IPv6 SYN",
            ),
            (
                tcp6(&tags, ALLOWED6, DST6, 25, SYN),
                XDP_PASS,
                "allowed IPv6 SYN",
            ),
            (tcp4(&tags, UNLISTED4, DST4, 25, ACK), XDP_PASS, "ACK"),
        ] {
            expect(
                &mut kernel,
                &frame,
                want,
                &format!("{depth} VID-0 tags, {what}"),
            );
        }
    }
    // Beyond what the parser follows nothing is passed unseen, whatever the source.
    let before = kernel.counters();
    let deep = vec![dot1q(0); 17];
    for (frame, what) in [
        (tcp4(&deep, UNLISTED4, DST4, 25, SYN), "unlisted"),
        (tcp4(&deep, ALLOWED4, DST4, 25, SYN), "allowed"),
    ] {
        expect(
            &mut kernel,
            &frame,
            XDP_DROP,
            &format!("17 tags, {what} source: opaque"),
        );
    }
    assert_eq!(
        counters_delta(&kernel, &before, smtpguard_common::counter::OPAQUE_DROPPED),
        2,
        "frames with more tags than followed are counted as opaque"
    );
}

#[test]
fn ipv4_options_of_every_length() {
    let mut kernel = Kernel::with_policy(POLICY);
    for words in 0..=10usize {
        let options = vec![1u8; words * 4]; // NOP options
        for (src, want) in [(UNLISTED4, XDP_DROP), (ALLOWED4, XDP_PASS)] {
            let segment = tcp(40000, 25, SYN, &[], &[], &Pseudo::V4(src, DST4));
            let packet = ipv4(src, DST4, IPPROTO_TCP, &options, IPV4_DF, &segment);
            let frame = ethernet(DST_MAC, SRC_MAC, &[dot1q(5)], ETH_P_IPV4, &packet);
            expect(
                &mut kernel,
                &frame,
                want,
                &format!("IHL {} from {src}", 5 + words),
            );
        }
        // Options that push the TCP header: an unguarded port must still pass.
        let segment = tcp(40000, 587, SYN, &[], &[], &Pseudo::V4(UNLISTED4, DST4));
        let packet = ipv4(UNLISTED4, DST4, IPPROTO_TCP, &options, 0, &segment);
        expect(
            &mut kernel,
            &ethernet(DST_MAC, SRC_MAC, &[], ETH_P_IPV4, &packet),
            XDP_PASS,
            &format!("IHL {} to 587", 5 + words),
        );
    }
}

#[test]
fn malformed_ipv4_headers_pass_and_are_counted() {
    let mut kernel = Kernel::with_policy(POLICY);
    let good = tcp4(&[], UNLISTED4, DST4, 25, SYN);
    for (name, mutate) in [
        (
            "IHL 4",
            Box::new(|frame: &mut Vec<u8>| frame[14] = 0x44) as Box<dyn Fn(&mut Vec<u8>)>,
        ),
        ("IHL 0", Box::new(|frame: &mut Vec<u8>| frame[14] = 0x40)),
        (
            "version 5",
            Box::new(|frame: &mut Vec<u8>| frame[14] = 0x55),
        ),
        (
            "total length below header",
            Box::new(|frame: &mut Vec<u8>| frame[16..18].copy_from_slice(&10u16.to_be_bytes())),
        ),
        (
            "total length below TCP header",
            Box::new(|frame: &mut Vec<u8>| frame[16..18].copy_from_slice(&30u16.to_be_bytes())),
        ),
    ] {
        let mut frame = good.clone();
        mutate(&mut frame);
        let before = kernel.counters();
        expect(&mut kernel, &frame, XDP_PASS, name);
        assert_eq!(
            counters_delta(&kernel, &before, smtpguard_common::counter::PASSED_UNPARSED),
            1,
            "{name} counted as unparsed"
        );
    }
}

#[test]
fn ipv4_fragments() {
    let mut kernel = Kernel::with_policy(POLICY);
    let segment = tcp(40000, 25, SYN, &[], &[], &Pseudo::V4(UNLISTED4, DST4));
    let fragment = |src: Ipv4Addr, frag: u16, l4: &[u8]| {
        ethernet(
            DST_MAC,
            SRC_MAC,
            &[],
            ETH_P_IPV4,
            &ipv4(src, DST4, IPPROTO_TCP, &[], frag, l4),
        )
    };

    let before = kernel.counters();
    expect(
        &mut kernel,
        &fragment(UNLISTED4, 1, &segment[8..]),
        XDP_PASS,
        "later fragment (offset 8)",
    );
    expect(
        &mut kernel,
        &fragment(UNLISTED4, 185, &segment),
        XDP_PASS,
        "later fragment (offset 1480)",
    );
    assert_eq!(
        counters_delta(
            &kernel,
            &before,
            smtpguard_common::counter::PASSED_FRAGMENTS
        ),
        2
    );

    expect(
        &mut kernel,
        &fragment(UNLISTED4, IPV4_MF, &segment),
        XDP_DROP,
        "first fragment with the whole SYN",
    );
    let ack = tcp(40000, 25, ACK, &[], &[], &Pseudo::V4(UNLISTED4, DST4));
    expect(
        &mut kernel,
        &fragment(UNLISTED4, IPV4_MF, &ack),
        XDP_PASS,
        "first fragment with a whole ACK",
    );

    // First fragments that stop before the TCP flags: the receiving kernel reassembles them.
    let before = kernel.counters();
    for cut in [0usize, 2, 4, 8, 12, 13] {
        expect(
            &mut kernel,
            &fragment(UNLISTED4, IPV4_MF, &segment[..cut]),
            XDP_DROP,
            &format!("unlisted first fragment with {cut} TCP bytes"),
        );
        expect(
            &mut kernel,
            &fragment(ALLOWED4, IPV4_MF, &segment[..cut]),
            XDP_PASS,
            &format!("allowed first fragment with {cut} TCP bytes"),
        );
    }
    assert_eq!(
        counters_delta(&kernel, &before, smtpguard_common::counter::HIDDEN_DECIDED),
        12
    );
    let submission = tcp(40000, 587, SYN, &[], &[], &Pseudo::V4(UNLISTED4, DST4));
    expect(
        &mut kernel,
        &fragment(UNLISTED4, IPV4_MF, &submission[..8]),
        XDP_PASS,
        "first fragment to an unguarded port, flags out of sight",
    );

    // Ethernet pads short frames with zeros: the flags must come from the IP payload, not the
    // padding (zero flags would look like a harmless non-SYN).
    let mut padded = fragment(UNLISTED4, IPV4_MF, &segment[..8]);
    padded.resize(60, 0);
    expect(
        &mut kernel,
        &padded,
        XDP_DROP,
        "8-byte first fragment padded to 60 bytes",
    );
}

#[test]
fn ipv6_extension_headers() {
    let mut kernel = Kernel::with_policy(POLICY);
    let syn = tcp(40000, 25, SYN, &[], &[], &Pseudo::V6(UNLISTED6, DST6));
    let frame = |src: Ipv6Addr, headers: &[(u8, Vec<u8>)], payload: &[u8]| {
        let (first, bytes) = chain(headers, IPPROTO_TCP);
        ethernet(
            DST_MAC,
            SRC_MAC,
            &[],
            ETH_P_IPV6,
            &ipv6(src, DST6, first, &bytes, payload),
        )
    };
    for (name, headers) in [
        ("hop-by-hop", vec![(IPPROTO_HOPOPTS, ext_header(0, 0))]),
        ("routing", vec![(IPPROTO_ROUTING, ext_header(0, 1))]),
        (
            "destination options",
            vec![(IPPROTO_DSTOPTS, ext_header(0, 3))],
        ),
        ("authentication header", vec![(IPPROTO_AH, ah_header(0, 4))]),
        (
            "atomic fragment",
            vec![(IPPROTO_FRAGMENT, fragment_header(0, 0, false))],
        ),
        (
            "first fragment",
            vec![(IPPROTO_FRAGMENT, fragment_header(0, 0, true))],
        ),
        (
            "hop-by-hop, routing, fragment, destination options",
            vec![
                (IPPROTO_HOPOPTS, ext_header(0, 0)),
                (IPPROTO_ROUTING, ext_header(0, 2)),
                (IPPROTO_FRAGMENT, fragment_header(0, 0, true)),
                (IPPROTO_DSTOPTS, ext_header(0, 0)),
            ],
        ),
        (
            "eight headers",
            (0..8)
                .map(|_| (IPPROTO_DSTOPTS, ext_header(0, 0)))
                .collect(),
        ),
    ] {
        expect(
            &mut kernel,
            &frame(UNLISTED6, &headers, &syn),
            XDP_DROP,
            &format!("{name}: unlisted SYN"),
        );
        expect(
            &mut kernel,
            &frame(ALLOWED6, &headers, &syn),
            XDP_PASS,
            &format!("{name}: allowed SYN"),
        );
        let ack = tcp(40000, 25, ACK, &[], &[], &Pseudo::V6(UNLISTED6, DST6));
        expect(
            &mut kernel,
            &frame(UNLISTED6, &headers, &ack),
            XDP_PASS,
            &format!("{name}: unlisted ACK"),
        );
    }
    let before = kernel.counters();
    expect(
        &mut kernel,
        &frame(
            UNLISTED6,
            &[(IPPROTO_FRAGMENT, fragment_header(0, 1, true))],
            &syn[8..],
        ),
        XDP_PASS,
        "later fragment",
    );
    assert_eq!(
        counters_delta(
            &kernel,
            &before,
            smtpguard_common::counter::PASSED_FRAGMENTS
        ),
        1
    );
}

#[test]
fn ipv6_whatever_hides_the_tcp_flags_is_decided_by_source() {
    let mut kernel = Kernel::with_policy(POLICY);
    let syn_ack = tcp(40000, 25, SYN | ACK, &[], &[], &Pseudo::V6(UNLISTED6, DST6));
    let syn = tcp(40000, 25, SYN, &[], &[], &Pseudo::V6(UNLISTED6, DST6));
    let options = |count| -> Vec<(u8, Vec<u8>)> {
        (0..count)
            .map(|_| (IPPROTO_DSTOPTS, ext_header(0, 0)))
            .collect()
    };
    // Twelve headers are followed to the TCP header: its real flags decide.
    let (first, bytes) = chain(&options(12), IPPROTO_TCP);
    for (segment, src, want) in [
        (&syn, UNLISTED6, XDP_DROP),
        (&syn, ALLOWED6, XDP_PASS),
        (&syn_ack, UNLISTED6, XDP_PASS),
    ] {
        let packet = ipv6(src, DST6, first, &bytes, segment);
        expect(
            &mut kernel,
            &ethernet(DST_MAC, SRC_MAC, &[], ETH_P_IPV6, &packet),
            want,
            &format!("12 extension headers from {src}"),
        );
    }
    // Twenty are more than followed: what follows could be TCP or a tunnel whose inner
    // source is out of sight, so the packet is dropped whoever sent it.
    let (first, bytes) = chain(&options(20), IPPROTO_TCP);
    for src in [UNLISTED6, ALLOWED6, DENIED6] {
        let packet = ipv6(src, DST6, first, &bytes, &syn_ack);
        let before = kernel.counters();
        expect(
            &mut kernel,
            &ethernet(DST_MAC, SRC_MAC, &[], ETH_P_IPV6, &packet),
            XDP_DROP,
            &format!("20 extension headers from {src}"),
        );
        assert_eq!(
            counters_delta(&kernel, &before, smtpguard_common::counter::OPAQUE_DROPPED),
            1
        );
    }

    // A first fragment whose TCP header stops before the flags.
    let syn = tcp(40000, 25, SYN, &[], &[], &Pseudo::V6(UNLISTED6, DST6));
    for cut in [0usize, 3, 8, 13] {
        let (first, bytes) = chain(
            &[(IPPROTO_FRAGMENT, fragment_header(0, 0, true))],
            IPPROTO_TCP,
        );
        for (src, want) in [(UNLISTED6, XDP_DROP), (ALLOWED6, XDP_PASS)] {
            let packet = ipv6(src, DST6, first, &bytes, &syn[..cut]);
            expect(
                &mut kernel,
                &ethernet(DST_MAC, SRC_MAC, &[], ETH_P_IPV6, &packet),
                want,
                &format!("first fragment with {cut} TCP bytes from {src}"),
            );
        }
    }

    // A first fragment that stops inside the extension chain.
    let (first, bytes) = chain(
        &[
            (IPPROTO_FRAGMENT, fragment_header(0, 0, true)),
            (IPPROTO_DSTOPTS, ext_header(0, 2)),
        ],
        IPPROTO_TCP,
    );
    let packet = ipv6(UNLISTED6, DST6, first, &bytes[..12], &[]);
    expect(
        &mut kernel,
        &ethernet(DST_MAC, SRC_MAC, &[], ETH_P_IPV6, &packet),
        XDP_DROP,
        "first fragment ending inside the chain",
    );

    // A header longer than the frame holds, while the IPv6 payload length says it is there
    // (a non-linear frame): decided by source.
    let (first, mut bytes) = chain(&[(IPPROTO_DSTOPTS, ext_header(0, 255))], IPPROTO_TCP);
    bytes.truncate(64);
    let mut packet = ipv6(UNLISTED6, DST6, first, &bytes, &[]);
    packet[4..6].copy_from_slice(&(2048u16 + 20).to_be_bytes());
    expect(
        &mut kernel,
        &ethernet(DST_MAC, SRC_MAC, &[], ETH_P_IPV6, &packet),
        XDP_DROP,
        "TCP header beyond the frame",
    );

    // Extension headers that take the TCP header beyond what the program reads.
    let big: Vec<(u8, Vec<u8>)> = (0..2)
        .map(|_| (IPPROTO_DSTOPTS, ext_header(0, 255)))
        .collect();
    let (first, bytes) = chain(&big, IPPROTO_TCP);
    let packet = ipv6(UNLISTED6, DST6, first, &bytes, &syn_ack);
    let frame = ethernet(DST_MAC, SRC_MAC, &[], ETH_P_IPV6, &packet);
    assert!(
        frame.len() > 4096,
        "the TCP header must start past the 4 KiB read limit"
    );
    expect(&mut kernel, &frame, XDP_DROP, "TCP header 4 KiB in");
}

#[test]
fn truncated_at_every_offset() {
    let mut kernel = Kernel::with_policy(POLICY);
    for (name, frame, source_end) in [
        (
            "QinQ IPv4 with options",
            {
                let segment = tcp(40000, 25, SYN, &[], &[], &Pseudo::V4(UNLISTED4, DST4));
                ethernet(
                    DST_MAC,
                    SRC_MAC,
                    &[dot1ad(1), dot1q(2)],
                    ETH_P_IPV4,
                    &ipv4(UNLISTED4, DST4, IPPROTO_TCP, &[1; 8], 0, &segment),
                )
            },
            22 + 20,
        ),
        (
            "IPv6 with hop-by-hop",
            {
                let segment = tcp(40000, 25, SYN, &[], &[], &Pseudo::V6(UNLISTED6, DST6));
                let (first, bytes) = chain(&[(IPPROTO_HOPOPTS, ext_header(0, 0))], IPPROTO_TCP);
                ethernet(
                    DST_MAC,
                    SRC_MAC,
                    &[],
                    ETH_P_IPV6,
                    &ipv6(UNLISTED6, DST6, first, &bytes, &segment),
                )
            },
            14 + 40,
        ),
    ] {
        for cut in 14..frame.len() {
            // Cut before the end of the fixed IP header, the source is unknown: passed and
            // counted (the kernel drops such frames). From there on the IP header says more
            // bytes exist than the frame holds (as in a non-linear frame): the source decides.
            // From 14 TCP bytes on, the SYN is in plain sight.
            let want = if cut < source_end { XDP_PASS } else { XDP_DROP };
            expect(
                &mut kernel,
                &frame[..cut],
                want,
                &format!("{name} cut at {cut} of {}", frame.len()),
            );
        }
    }
}

#[test]
fn counters_by_class_and_prefix() {
    let mut kernel = Kernel::with_policy(POLICY);
    let before = kernel.counters();
    for _ in 0..3 {
        kernel.verdict(&tcp4(&[], ALLOWED4, DST4, 25, SYN));
    }
    kernel.verdict(&tcp4(&[], DENIED4, DST4, 25, SYN));
    kernel.verdict(&tcp6(&[], UNLISTED6, DST6, 25, SYN));
    kernel.verdict(&tcp6(&[], UNLISTED6, DST6, 25, ACK));
    use smtpguard_common::counter::*;
    assert_eq!(counters_delta(&kernel, &before, SYN_ALLOWED), 3);
    assert_eq!(counters_delta(&kernel, &before, SYN_DENIED), 1);
    assert_eq!(counters_delta(&kernel, &before, SYN_UNLISTED), 1);
    assert_eq!(counters_delta(&kernel, &before, DROPPED), 2);
    assert_eq!(kernel.prefix_syns("89.16.184.144/28"), 3);
    assert_eq!(kernel.prefix_syns("89.16.184.150/32"), 1);
    assert_eq!(kernel.prefix_syns("89.16.176.76/32"), 0);
}

#[test]
fn apply_swaps_policies_and_keeps_surviving_counters() {
    let mut kernel = Kernel::with_policy(POLICY);
    kernel.verdict(&tcp4(&[], ALLOWED4, DST4, 25, SYN));
    let survivor = kernel.counter_id("89.16.184.144/28");
    let swapped = "interfaces = [\"lo\"]\n[[allow]]\nname = \"provider\"\nprefixes = [\"89.16.184.144/28\", \"203.0.113.0/24\"]\n";
    for round in 0..3 {
        let report = kernel.apply(swapped);
        assert_eq!(report.generation, 2 + 2 * round);
        expect(
            &mut kernel,
            &tcp4(&[], UNLISTED4, DST4, 25, SYN),
            XDP_PASS,
            "added by the swap",
        );
        expect(
            &mut kernel,
            &tcp4(&[], DENIED4, DST4, 25, SYN),
            XDP_PASS,
            "deny entry removed: the /28 allows it",
        );
        expect(
            &mut kernel,
            &tcp6(&[], ALLOWED6, DST6, 25, SYN),
            XDP_DROP,
            "IPv6 prefix removed",
        );
        kernel.apply(POLICY);
        expect(
            &mut kernel,
            &tcp4(&[], UNLISTED4, DST4, 25, SYN),
            XDP_DROP,
            "removed again",
        );
        expect(
            &mut kernel,
            &tcp4(&[], DENIED4, DST4, 25, SYN),
            XDP_DROP,
            "deny entry back",
        );
        expect(
            &mut kernel,
            &tcp4(&[], ALLOWED4, DST4, 25, SYN),
            XDP_PASS,
            "allowed throughout",
        );
    }
    // One SYN before, then per round one from the deny address (allowed by the /28 while the
    // deny entry is out) and one from the allowed address.
    assert_eq!(kernel.counter_id("89.16.184.144/28"), survivor);
    let counters = kernel.counters();
    assert_eq!(
        counters.prefixes[&survivor], 7,
        "the /28 survived six reloads and counted every SYN"
    );
}

#[test]
fn both_programs_verify_well_inside_the_kernel_limit() {
    let mut kernel = Kernel::with_policy(POLICY);
    let counts = kernel
        .filter
        .verified_instructions()
        .unwrap_or_else(|error| panic!("program info: {error}"));
    for (program, count) in counts {
        println!("{program}: the verifier went through {count} instructions");
        assert!(
            count > 0 && count < 500_000,
            "{program}: {count} verified instructions; the kernel stops at 1,000,000 and the parser should stay well below"
        );
    }
}

/// The IPv4 table (a word per /16, a block of ranges per /24) against the longest prefix
/// match worked out here by brute force: random nested allow and deny prefixes of every
/// length in a few /16s, some /24s crowded past a block's eight ranges (the trie decides
/// those), each source checked by its verdict and by which prefix's counter moved. A second
/// policy over the same /16s, then the first again, checks that an apply rewrites only what
/// differs and leaves no block of the policy before.
#[test]
fn the_ipv4_table_decides_as_the_longest_prefix() {
    use ipnet::Ipv4Net;
    use smtpguard::kernel::table::TableUse;
    use smtpguard_common::counter;
    use smtpguard_tests::bench::Rng;

    const BASES: [u32; 3] = [0x0a00_0000, 0x0a01_0000, 0x59_10_b8_00];
    fn policy(seed: u64) -> (String, Vec<(Ipv4Net, bool)>) {
        let mut rng = Rng::new(seed);
        let mut nets: std::collections::BTreeMap<Ipv4Net, bool> = Default::default();
        while nets.len() < 150 {
            let base = BASES[rng.below(3) as usize];
            let len = match rng.below(4) {
                0 => 8 + rng.below(9) as u8,
                1 => 17 + rng.below(8) as u8,
                _ => 25 + rng.below(8) as u8,
            };
            // Half of them in two /24s, crowding them past a block's ranges.
            let low = if rng.below(2) == 0 {
                0x0100 + rng.below(0x200) as u32
            } else {
                rng.below(0x1_0000) as u32
            };
            let net = Ipv4Net::new((base | low).into(), len).unwrap().trunc();
            nets.entry(net).or_insert(rng.below(2) == 0);
        }
        let list = |allow: bool| {
            nets.iter()
                .filter(|(_, a)| **a == allow)
                .map(|(net, _)| format!("\"{net}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let toml = format!(
            "interfaces = [\"lo\"]\n[[allow]]\nname = \"a\"\nprefixes = [{}]\n[[deny]]\nname = \"d\"\nprefixes = [{}]\n",
            list(true),
            list(false)
        );
        (toml, nets.into_iter().collect())
    }
    let (first, first_nets) = policy(1);
    let (second, second_nets) = policy(2);
    let mut kernel = Kernel::with_policy(&first);
    let mut rng = Rng::new(99);
    for (toml, nets) in [
        (&first, &first_nets),
        (&second, &second_nets),
        (&first, &first_nets),
    ] {
        let report = kernel.apply(toml);
        assert_eq!(report.ipv4_table, TableUse::On);
        assert!(
            kernel.maps.ipv4_table_in_force().unwrap(),
            "the table decides"
        );
        // Per prefix (None: unlisted), the SYNs it should have decided.
        let mut want_counts: std::collections::BTreeMap<Option<Ipv4Net>, u64> = Default::default();
        let before = kernel.counters();
        for _ in 0..3000 {
            let base = BASES[rng.below(3) as usize];
            let low = if rng.below(2) == 0 {
                0x0100 + rng.below(0x200) as u32
            } else {
                rng.below(0x1_0000) as u32
            };
            let src = Ipv4Addr::from(base | low);
            let decider = nets
                .iter()
                .filter(|(net, _)| net.contains(&src))
                .max_by_key(|(net, _)| net.prefix_len());
            let got = kernel.verdict(&tcp4(&[], src, DST4, 25, SYN));
            let want = match decider {
                Some((_, true)) => XDP_PASS,
                _ => XDP_DROP,
            };
            assert_eq!(got, want, "{src}: decided by {decider:?}");
            *want_counts.entry(decider.map(|(net, _)| *net)).or_default() += 1;
        }
        // Which prefix decided each SYN shows in its counter: every one must have moved by
        // exactly the SYNs it decided.
        let after = kernel.counters();
        for (net, want) in want_counts {
            let moved = match net {
                Some(net) => {
                    let id = kernel.counter_id(&net.to_string());
                    after.prefixes.get(&id).copied().unwrap_or(0)
                        - before.prefixes.get(&id).copied().unwrap_or(0)
                }
                None => after.get(counter::SYN_UNLISTED) - before.get(counter::SYN_UNLISTED),
            };
            assert_eq!(moved, want, "SYNs counted for {net:?}");
        }
    }
}

/// A policy whose prefixes reach more /24s than the IPv4 table takes leaves it off, and the
/// trie decides as before; a smaller policy after it turns it back on. One that fills the
/// table to the last block, with prefixes nested inside it, gets its table.
#[test]
fn a_policy_too_large_for_the_ipv4_table_is_decided_by_the_trie() {
    use smtpguard::kernel::table::TableUse;
    use smtpguard_common::MAX_V4_BLOCKS;

    // /17s from 1.0.0.0 on, 128 /24s each, and a deny /32 inside the first.
    let policy = |count: u32| {
        let prefixes: Vec<String> = (0..count)
            .map(|k| format!("\"{}/17\"", Ipv4Addr::from(0x0100_0000 + (k << 15))))
            .collect();
        format!(
            "interfaces = [\"lo\"]\n[[allow]]\nname = \"many\"\nprefixes = [{}]\n[[deny]]\nname = \"one\"\nprefixes = [\"1.0.200.7\"]\n",
            prefixes.join(", ")
        )
    };
    let mut kernel = Kernel::with_policy(POLICY);
    assert!(kernel.maps.ipv4_table_in_force().unwrap());

    // Exactly as many /24s as the table takes: the /32's /24 is one of them (counted once).
    let full = MAX_V4_BLOCKS / 128;
    let report = kernel.apply(&policy(full));
    assert_eq!(
        report.ipv4_table,
        TableUse::On,
        "the table full to its last block"
    );
    assert!(kernel.maps.ipv4_table_in_force().unwrap());
    let last = Ipv4Addr::from(0x0100_0000 + ((full - 1) << 15) + 5);
    let past = Ipv4Addr::from(0x0100_0000 + (full << 15) + 5);
    for (src, want, case) in [
        (
            Ipv4Addr::new(1, 0, 200, 6),
            XDP_PASS,
            "full: inside the first /17",
        ),
        (
            Ipv4Addr::new(1, 0, 200, 7),
            XDP_DROP,
            "full: the deny /32 inside it",
        ),
        (last, XDP_PASS, "full: inside the last /17"),
        (past, XDP_DROP, "full: past the last /17"),
    ] {
        expect(&mut kernel, &tcp4(&[], src, DST4, 25, SYN), want, case);
    }

    let blocks = kernel.maps.ipv4_table_blocks().unwrap();
    assert_eq!(
        blocks.iter().max(),
        Some(&(MAX_V4_BLOCKS as usize)),
        "{blocks:?}"
    );

    // A scoped policy leaves the table off: its slot's blocks are deleted, not kept.
    let scoped = format!(
        "interfaces = [\"lo\"]\n[[scope]]\nname = \"mail\"\ndestinations = [\"{DST4}\"]\n[[scope.allow]]\nname = \"provider\"\nprefixes = [\"192.0.2.0/28\"]\n"
    );
    assert_eq!(kernel.apply(&scoped).ipv4_table, TableUse::Scoped);
    expect(
        &mut kernel,
        &tcp4(&[], Ipv4Addr::new(1, 0, 200, 6), DST4, 25, SYN),
        XDP_DROP,
        "scoped: the /17s are gone",
    );

    // One /17 more than the table takes: off, and the full table's million blocks deleted.
    let count = full + 1;
    let report = kernel.apply(&policy(count));
    assert_eq!(
        report.ipv4_table,
        TableUse::TooLarge {
            blocks: u64::from(count) * 128
        }
    );
    assert!(!kernel.maps.ipv4_table_in_force().unwrap());
    assert_eq!(kernel.maps.ipv4_table_blocks().unwrap(), [0, 0]);
    for (src, want, case) in [
        (
            Ipv4Addr::new(1, 0, 200, 6),
            XDP_PASS,
            "inside the first /17",
        ),
        (
            Ipv4Addr::new(1, 0, 200, 7),
            XDP_DROP,
            "the deny /32 inside it",
        ),
        (
            Ipv4Addr::from(0x0100_0000 + ((count - 1) << 15) + 5),
            XDP_PASS,
            "inside the last /17",
        ),
        (UNLISTED4, XDP_DROP, "unlisted"),
    ] {
        expect(&mut kernel, &tcp4(&[], src, DST4, 25, SYN), want, case);
    }
    let report = kernel.apply(POLICY);
    assert_eq!(report.ipv4_table, TableUse::On);
    expect(
        &mut kernel,
        &tcp4(&[], DENIED4, DST4, 25, SYN),
        XDP_DROP,
        "back on the table",
    );
    expect(
        &mut kernel,
        &tcp4(&[], ALLOWED4, DST4, 25, SYN),
        XDP_PASS,
        "back on the table",
    );
}
