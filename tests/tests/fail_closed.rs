//! The holes an outside review found, each closed in the real program (BPF_PROG_TEST_RUN):
//! SYNs inside the tunnels Linux decapsulates are decided by their inner source; what the
//! parser cannot read far enough is dropped, never passed; resets answer only frames sent to
//! this host by unicast addresses; layer-3 interfaces have a program of their own; a second
//! IPv6 fragment header cannot hide a first fragment; the recording budget renews a window
//! that ended long ago.

use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use smtpguard_common::{counter, iface};
use smtpguard_tests::{
    encap::*,
    frames::*,
    kernel::{Kernel, XDP_DROP, XDP_PASS, XDP_TX, verdict_name},
};

const DST4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 25);
const DST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 25);
const ALLOWED4: Ipv4Addr = Ipv4Addr::new(89, 16, 184, 145);
const UNLISTED4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const ALLOWED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x25, 0, 0, 0, 0, 9);
const UNLISTED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x66, 0, 0, 0, 0, 1);

const POLICY: &str = r#"
interfaces = ["lo"]
action = "reject"

[[allow]]
name = "provider"
prefixes = ["89.16.184.144/28", "2001:db8:25::/48"]
"#;

fn expect(kernel: &mut Kernel, frame: &[u8], want: u32, case: &str) -> Vec<u8> {
    let (got, out) = kernel.run(frame);
    assert_eq!(
        got,
        want,
        "{case}: expected {}, got {}",
        verdict_name(want),
        verdict_name(got)
    );
    out
}

fn delta(kernel: &Kernel, before: &smtpguard::kernel::maps::CounterSnapshot, index: u32) -> u64 {
    kernel.counters().get(index) - before.get(index)
}

fn syn4(src: Ipv4Addr, flags: u8) -> Vec<u8> {
    let segment = tcp(40000, 25, flags, &[], &[], &Pseudo::V4(src, DST4));
    ipv4(src, DST4, IPPROTO_TCP, &[], IPV4_DF, &segment)
}

fn syn6(src: Ipv6Addr, flags: u8) -> Vec<u8> {
    let segment = tcp(40000, 25, flags, &[], &[], &Pseudo::V6(src, DST6));
    ipv6(src, DST6, IPPROTO_TCP, &[], &segment)
}

/// An Ethernet frame to this host carrying `packet` (IP) under its own ethertype.
fn frame(packet: &[u8]) -> Vec<u8> {
    ethernet(DST_MAC, SRC_MAC, &[], ethertype_of(packet), packet)
}

/// Wraps an inner IP packet into the Ethernet frame on the wire.
type Wrap = Box<dyn Fn(&[u8]) -> Vec<u8>>;

/// The carriers a tunnelled SYN is tried in.
fn carriers() -> Vec<(&'static str, Wrap)> {
    let ip_in = |inner: &[u8]| {
        if inner[0] >> 4 == 6 {
            IPPROTO_IPV6
        } else {
            IPPROTO_IPIP
        }
    };
    let gre_proto = |inner: &[u8]| ethertype_of(inner);
    let ppp_proto = |inner: &[u8]| {
        if inner[0] >> 4 == 6 {
            PPP_IPV6
        } else {
            PPP_IPV4
        }
    };
    let mut carriers: Vec<(&'static str, Wrap)> = vec![
        (
            "in IPv4 (IPIP, 6in4)",
            Box::new(move |i| frame(&in_ipv4(ip_in(i), i))),
        ),
        (
            "in IPv6 (IPv4/IPv6-in-IPv6)",
            Box::new(move |i| frame(&in_ipv6(ip_in(i), i))),
        ),
        (
            "GRE in IPv6",
            Box::new(move |i| {
                frame(&in_ipv6(
                    IPPROTO_GRE,
                    &gre(GreFields::default(), gre_proto(i), i),
                ))
            }),
        ),
        (
            "Ethernet in GRE (gretap), behind two tags",
            Box::new(move |i| {
                let inner = ethernet(DST_MAC, SRC_MAC, &[dot1q(0), dot1q(5)], ethertype_of(i), i);
                frame(&in_ipv4(
                    IPPROTO_GRE,
                    &gre(GreFields::default(), ETH_P_TEB, &inner),
                ))
            }),
        ),
        (
            "PPP in PPTP's GRE, compressed fields",
            Box::new(move |i| {
                frame(&in_ipv4(
                    IPPROTO_GRE,
                    &pptp(true, false, &ppp(true, true, ppp_proto(i), i)),
                ))
            }),
        ),
        (
            "PPP in PPTP's GRE, full fields",
            Box::new(move |i| {
                frame(&in_ipv4(
                    IPPROTO_GRE,
                    &pptp(true, true, &ppp(false, false, ppp_proto(i), i)),
                ))
            }),
        ),
        (
            "PPPoE session",
            Box::new(move |i| {
                ethernet(
                    DST_MAC,
                    SRC_MAC,
                    &[],
                    ETH_P_PPPOE_SESSION,
                    &pppoe(ppp_proto(i), i),
                )
            }),
        ),
        (
            "three MPLS labels",
            Box::new(move |i| {
                ethernet(
                    DST_MAC,
                    SRC_MAC,
                    &[],
                    ETH_P_MPLS_UC,
                    &mpls(&[16, 17, 18], true, i),
                )
            }),
        ),
        (
            "IPIP in GRE in IPv4",
            Box::new(move |i| {
                let ipip = in_ipv4(ip_in(i), i);
                frame(&in_ipv4(
                    IPPROTO_GRE,
                    &gre(GreFields::default(), ETH_P_IPV4, &ipip),
                ))
            }),
        ),
    ];
    for (name, fields) in [
        ("GRE", GreFields::default()),
        (
            "GRE with checksum",
            GreFields {
                checksum: true,
                ..Default::default()
            },
        ),
        (
            "GRE with key",
            GreFields {
                key: true,
                ..Default::default()
            },
        ),
        (
            "GRE with sequence",
            GreFields {
                sequence: true,
                ..Default::default()
            },
        ),
        (
            "GRE with all three",
            GreFields {
                checksum: true,
                key: true,
                sequence: true,
                ..Default::default()
            },
        ),
    ] {
        carriers.push((
            name,
            Box::new(move |i| frame(&in_ipv4(IPPROTO_GRE, &gre(fields, gre_proto(i), i)))),
        ));
    }
    carriers
}

#[test]
fn tunnelled_syns_are_decided_by_their_inner_source() {
    let mut kernel = Kernel::with_policy(POLICY);
    for (carrier, wrap) in carriers() {
        for (inner, want, what) in [
            (syn4(UNLISTED4, SYN), XDP_DROP, "unlisted IPv4 SYN"),
            (syn4(ALLOWED4, SYN), XDP_PASS, "allowed IPv4 SYN"),
            (syn6(UNLISTED6, SYN), XDP_DROP, "unlisted IPv6 SYN"),
            (syn6(ALLOWED6, SYN), XDP_PASS, "allowed IPv6 SYN"),
            (
                syn4(UNLISTED4, SYN | ACK),
                XDP_PASS,
                "unlisted IPv4 SYN-ACK",
            ),
        ] {
            let before = kernel.counters();
            // The outer source is an allowed one: only the inner may decide. A reject is
            // never answered from inside a tunnel, so it drops.
            expect(
                &mut kernel,
                &wrap(&inner),
                want,
                &format!("{what} {carrier}"),
            );
            if want == XDP_DROP {
                assert_eq!(
                    delta(&kernel, &before, counter::TUNNELLED),
                    1,
                    "{what} {carrier}: counted as tunnelled"
                );
                assert_eq!(
                    delta(&kernel, &before, counter::RESET_WITHHELD),
                    1,
                    "{what} {carrier}: no reset from inside a tunnel"
                );
            }
        }
    }
}

#[test]
fn what_the_parser_cannot_read_is_dropped_not_passed() {
    let mut kernel = Kernel::with_policy(POLICY);
    let allowed = syn4(ALLOWED4, SYN);
    let in_gre = |proto, payload: &[u8]| {
        frame(&in_ipv4(
            IPPROTO_GRE,
            &gre(GreFields::default(), proto, payload),
        ))
    };
    // Deeper than followed: five levels of IPIP.
    let mut deep = allowed.clone();
    for _ in 0..5 {
        deep = in_ipv4(IPPROTO_IPIP, &deep);
    }
    let mut cut = in_ipv4(IPPROTO_IPIP, &allowed);
    cut.truncate(20 + 12);
    cut[2..4].copy_from_slice(&((20 + allowed.len()) as u16).to_be_bytes());
    for (case, frame_bytes) in [
        ("five tunnel levels", frame(&deep)),
        ("an inner header the frame cuts off", frame(&cut)),
        (
            "MPLS inside GRE",
            in_gre(ETH_P_MPLS_UC, &mpls(&[16], true, &allowed)),
        ),
        ("ERSPAN inside GRE", in_gre(0x88be, &allowed)),
        (
            "PPTP GRE that is not PPP",
            frame(&in_ipv4(
                IPPROTO_GRE,
                &gre_raw(0x2001, ETH_P_IPV4, &allowed),
            )),
        ),
        (
            "nine MPLS labels",
            ethernet(
                DST_MAC,
                SRC_MAC,
                &[],
                ETH_P_MPLS_UC,
                &mpls(&[16; 9], true, &allowed),
            ),
        ),
    ] {
        let before = kernel.counters();
        expect(&mut kernel, &frame_bytes, XDP_DROP, case);
        assert_eq!(
            delta(&kernel, &before, counter::OPAQUE_DROPPED),
            1,
            "{case}: counted as opaque"
        );
    }
    // What Linux itself refuses is passed to it (and counted): GRE source routing, GRE
    // versions above 1.
    for (case, flags) in [("GRE source routing", 0x4000u16), ("GRE version 2", 0x0002)] {
        let before = kernel.counters();
        expect(
            &mut kernel,
            &frame(&in_ipv4(
                IPPROTO_GRE,
                &gre_raw(flags, ETH_P_IPV4, &syn4(UNLISTED4, SYN)),
            )),
            XDP_PASS,
            case,
        );
        assert_eq!(
            delta(&kernel, &before, counter::PASSED_UNPARSED),
            1,
            "{case}: counted as unparsed"
        );
    }
    // An outer later fragment carries no header to decide by; the first fragment did.
    let mut later = in_ipv4(IPPROTO_IPIP, &syn4(UNLISTED4, SYN));
    later[6..8].copy_from_slice(&0x0010u16.to_be_bytes());
    expect(
        &mut kernel,
        &frame(&later),
        XDP_PASS,
        "outer later fragment",
    );
    // Other traffic in a tunnel is none of the program's business.
    let udp = ipv4(UNLISTED4, DST4, IPPROTO_UDP, &[], IPV4_DF, &[0; 16]);
    expect(
        &mut kernel,
        &frame(&in_ipv4(IPPROTO_IPIP, &udp)),
        XDP_PASS,
        "UDP in IPIP",
    );
}

#[test]
fn resets_answer_only_frames_sent_to_this_host() {
    let mut kernel = Kernel::with_policy(POLICY);
    let plain = |dst_mac: [u8; 6], src_mac: [u8; 6], packet: &[u8]| {
        ethernet(dst_mac, src_mac, &[], ethertype_of(packet), packet)
    };
    let reset = expect(
        &mut kernel,
        &plain(DST_MAC, SRC_MAC, &syn4(UNLISTED4, SYN)),
        XDP_TX,
        "to this host",
    );
    assert_eq!(
        &reset[..12],
        [SRC_MAC, DST_MAC].concat(),
        "the reset goes back from this interface's MAC"
    );

    let ipv4_between = |src: Ipv4Addr, dst: Ipv4Addr, flags: u8| {
        let segment = tcp(40000, 25, flags, &[], &[], &Pseudo::V4(src, dst));
        ipv4(src, dst, IPPROTO_TCP, &[], IPV4_DF, &segment)
    };
    let ipv6_between = |src: Ipv6Addr, dst: Ipv6Addr| {
        let segment = tcp(40000, 25, SYN, &[], &[], &Pseudo::V6(src, dst));
        ipv6(src, dst, IPPROTO_TCP, &[], &segment)
    };
    let other_host = [0x02, 0, 0, 0, 0, 0x99];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "to another host's MAC",
            plain(other_host, SRC_MAC, &syn4(UNLISTED4, SYN)),
        ),
        (
            "to the broadcast MAC",
            plain([0xff; 6], SRC_MAC, &syn4(UNLISTED4, SYN)),
        ),
        (
            "to a multicast MAC",
            plain([0x01, 0, 0x5e, 0, 0, 1], SRC_MAC, &syn4(UNLISTED4, SYN)),
        ),
        (
            "from a multicast MAC",
            plain(DST_MAC, [0x03, 0, 0, 0, 0, 1], &syn4(UNLISTED4, SYN)),
        ),
        (
            "from 0.0.0.0",
            frame(&ipv4_between(Ipv4Addr::UNSPECIFIED, DST4, SYN)),
        ),
        (
            "from 127.0.0.1",
            frame(&ipv4_between(Ipv4Addr::LOCALHOST, DST4, SYN)),
        ),
        (
            "from a multicast address",
            frame(&ipv4_between(Ipv4Addr::new(224, 0, 0, 9), DST4, SYN)),
        ),
        (
            "from the broadcast address",
            frame(&ipv4_between(Ipv4Addr::BROADCAST, DST4, SYN)),
        ),
        (
            "to the broadcast address",
            frame(&ipv4_between(UNLISTED4, Ipv4Addr::BROADCAST, SYN)),
        ),
        (
            "to a multicast address",
            frame(&ipv4_between(UNLISTED4, Ipv4Addr::new(239, 1, 1, 1), SYN)),
        ),
        (
            "to 0.0.0.0",
            frame(&ipv4_between(UNLISTED4, Ipv4Addr::UNSPECIFIED, SYN)),
        ),
        ("SYN+FIN", frame(&syn4(UNLISTED4, SYN | FIN))),
        ("SYN+RST", frame(&syn4(UNLISTED4, SYN | RST))),
        ("from ::", frame(&ipv6_between(Ipv6Addr::UNSPECIFIED, DST6))),
        ("from ::1", frame(&ipv6_between(Ipv6Addr::LOCALHOST, DST6))),
        (
            "from ff02::1",
            frame(&ipv6_between("ff02::1".parse().unwrap(), DST6)),
        ),
        (
            "from ::ffff:203.0.113.7",
            frame(&ipv6_between("::ffff:203.0.113.7".parse().unwrap(), DST6)),
        ),
        (
            "to ff02::1",
            frame(&ipv6_between(UNLISTED6, "ff02::1".parse().unwrap())),
        ),
    ];
    for (case, bytes) in &cases {
        let before = kernel.counters();
        expect(&mut kernel, bytes, XDP_DROP, case);
        assert_eq!(
            delta(&kernel, &before, counter::RESET_WITHHELD),
            1,
            "{case}: counted as withheld"
        );
        assert_eq!(
            delta(&kernel, &before, counter::REJECTED),
            0,
            "{case}: no reset"
        );
    }
    // An interface the daemon never described, or one whose NIC strips VLAN tags: no reset.
    kernel.set_lo(DST_MAC, 0);
    expect(
        &mut kernel,
        &frame(&syn4(UNLISTED4, SYN)),
        XDP_DROP,
        "interface without resets",
    );
    kernel.forget_lo();
    expect(
        &mut kernel,
        &frame(&syn4(UNLISTED4, SYN)),
        XDP_DROP,
        "interface unknown to the program",
    );
    kernel.set_lo(DST_MAC, iface::REPLIES);
    expect(
        &mut kernel,
        &frame(&syn4(UNLISTED4, SYN)),
        XDP_TX,
        "interface described again",
    );
}

#[test]
fn layer3_interfaces_have_a_program_of_their_own() {
    let mut kernel = Kernel::with_policy(POLICY);
    kernel.set_lo([0; 6], iface::LAYER3 | iface::REPLIES);
    for (packet, want, what) in [
        (syn4(UNLISTED4, SYN), XDP_TX, "unlisted IPv4 SYN"),
        (syn4(ALLOWED4, SYN), XDP_PASS, "allowed IPv4 SYN"),
        (syn6(UNLISTED6, SYN), XDP_TX, "unlisted IPv6 SYN"),
        (syn6(ALLOWED6, SYN), XDP_PASS, "allowed IPv6 SYN"),
        (syn4(UNLISTED4, ACK), XDP_PASS, "ACK"),
        (
            in_ipv4(IPPROTO_IPIP, &syn4(UNLISTED4, SYN)),
            XDP_DROP,
            "IPIP inside the tunnel device",
        ),
    ] {
        let (got, out) = kernel.run_l3(&packet);
        assert_eq!(
            got,
            want,
            "{what}: expected {}, got {}",
            verdict_name(want),
            verdict_name(got)
        );
        if got == XDP_TX {
            // The reset starts at the IP header too: no Ethernet header is invented.
            let reply = SlicedPacket::from_ip(&out)
                .unwrap_or_else(|error| panic!("{what}: reset does not parse: {error}"));
            let Some(TransportSlice::Tcp(reset)) = reply.transport else {
                panic!("{what}: the reply is not TCP");
            };
            assert!(
                reset.rst() && reset.ack() && !reset.syn(),
                "{what}: RST+ACK"
            );
            assert_eq!(
                (reset.source_port(), reset.destination_port()),
                (25, 40000),
                "{what}: ports swapped"
            );
            match reply.net {
                Some(NetSlice::Ipv4(ip)) => {
                    assert_eq!(ip.header().destination_addr(), UNLISTED4, "{what}")
                }
                Some(NetSlice::Ipv6(ip)) => {
                    assert_eq!(ip.header().destination_addr(), UNLISTED6, "{what}")
                }
                _ => panic!("{what}: the reply has no IP header"),
            }
        }
    }
    // The Ethernet program would read the IP header as MAC addresses: the two are not
    // interchangeable, which is why each interface gets the one for its link type.
    let (got, _) = kernel.run(&syn4(UNLISTED4, SYN));
    assert_eq!(
        got, XDP_PASS,
        "the Ethernet program on a bare IP packet sees no IP"
    );
}

#[test]
fn a_second_fragment_header_cannot_hide_a_first_fragment() {
    let mut kernel = Kernel::with_policy(POLICY);
    let syn = tcp(40000, 25, SYN, &[], &[], &Pseudo::V6(UNLISTED6, DST6));
    // A first fragment (more to come), then an atomic fragment header: the datagram is still
    // a first fragment whose TCP flags the rest brings.
    let (first, bytes) = chain(
        &[
            (IPPROTO_FRAGMENT, fragment_header(0, 0, true)),
            (IPPROTO_FRAGMENT, fragment_header(0, 0, false)),
        ],
        IPPROTO_TCP,
    );
    let packet = ipv6(UNLISTED6, DST6, first, &bytes, &syn[..8]);
    expect(
        &mut kernel,
        &frame(&packet),
        XDP_DROP,
        "first fragment behind an atomic one",
    );
}

#[test]
fn the_recording_budget_renews_a_window_that_ended_long_ago() {
    smtpguard_tests::kernel::stay_on_one_cpu();
    let mut kernel = Kernel::with_policy(POLICY.replace("reject", "drop").as_str());
    let budget = smtpguard_common::RECORD_BUDGET_PER_SECOND as u32;
    for i in 0..budget {
        let src = Ipv4Addr::new(10, 9, (i >> 8) as u8, i as u8);
        expect(
            &mut kernel,
            &frame(&syn4(src, SYN)),
            XDP_DROP,
            "within the budget",
        );
    }
    assert_eq!(
        kernel.counters().get(counter::UNRECORDED),
        0,
        "the budget is used up, nothing skipped yet"
    );
    // Well after the window: the next stopped SYN opens a fresh one and is recorded.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    expect(
        &mut kernel,
        &frame(&syn4(Ipv4Addr::new(10, 8, 0, 1), SYN)),
        XDP_DROP,
        "a new second",
    );
    assert_eq!(
        kernel.counters().get(counter::UNRECORDED),
        0,
        "recorded in a fresh window, not skipped as over budget"
    );
    assert!(
        kernel
            .offenders()
            .iter()
            .any(|(addr, _)| *addr == Ipv4Addr::new(10, 8, 0, 1)),
        "the source is in the table"
    );
}

#[test]
fn a_first_fragment_shows_only_the_flags_reassembly_keeps() {
    let mut kernel = Kernel::with_policy(POLICY);
    // Linux keeps a multiple of 8 bytes of a fragment with more to come: of a first fragment
    // carrying 14 or 15 TCP bytes, the flags byte (13) is overwritten by the next fragment.
    let syn = tcp(40000, 25, SYN, &[], &[], &Pseudo::V4(UNLISTED4, DST4));
    for cut in [14usize, 15] {
        let mut decoy = syn[..cut].to_vec();
        decoy[13] = ACK;
        for (src, want) in [(UNLISTED4, XDP_DROP), (ALLOWED4, XDP_PASS)] {
            let packet = ipv4(src, DST4, IPPROTO_TCP, &[], IPV4_MF, &decoy);
            expect(
                &mut kernel,
                &frame(&packet),
                want,
                &format!("first fragment of {cut} TCP bytes showing ACK, from {src}"),
            );
        }
    }
    // Sixteen bytes keep the flags: an ACK is an ACK.
    let mut ack = syn[..16].to_vec();
    ack[13] = ACK;
    let packet = ipv4(UNLISTED4, DST4, IPPROTO_TCP, &[], IPV4_MF, &ack);
    expect(
        &mut kernel,
        &frame(&packet),
        XDP_PASS,
        "16 bytes: the flags are kept",
    );
    // The same rounding inside a tunnel: the outer first fragment keeps 8 bytes of the inner
    // TCP header, so the inner flags it shows are not the ones decapsulated.
    let mut inner = syn4(UNLISTED4, ACK);
    inner.truncate(20 + 14);
    let outer = ipv4(OUTER4_SRC, OUTER4_DST, IPPROTO_IPIP, &[], IPV4_MF, &inner);
    expect(
        &mut kernel,
        &frame(&outer),
        XDP_DROP,
        "IPIP in a first fragment of 34 bytes",
    );
}
