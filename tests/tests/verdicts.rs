//! The actions and modes of the real program, through BPF_PROG_TEST_RUN: a reject answers the
//! SYN with a RST that an independent parser (etherparse) accepts, with checksums, sequence
//! numbers, VLAN tags and addresses right; audit mode passes everything and counts what
//! enforce would stop; the table of stopped sources remembers who, in which mode.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{LinkExtSlice, NetSlice, SlicedPacket, TransportSlice};
use smtpguard_common::counter;
use smtpguard_tests::{
    frames::*,
    kernel::{Kernel, XDP_DROP, XDP_PASS, XDP_TX, verdict_name},
};

const DST4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 25);
const DST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 25);
const ALLOWED4: Ipv4Addr = Ipv4Addr::new(89, 16, 184, 145);
const DENIED4: Ipv4Addr = Ipv4Addr::new(89, 16, 184, 150);
const UNLISTED4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const UNLISTED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x66, 0, 0, 0, 0, 1);

fn policy(mode: &str, action: &str, deny_action: &str) -> String {
    format!(
        r#"
interfaces = ["lo"]
mode = "{mode}"
action = "{action}"

[[allow]]
name = "provider"
prefixes = ["89.16.184.144/28", "2001:db8:25::/48"]

[[deny]]
name = "abuser"
action = "{deny_action}"
prefixes = ["89.16.184.150"]
"#
    )
}

/// A SYN with a known sequence number, TCP options, `data` and, for IPv4, IP options.
fn syn4(tags: &[Tag], src: Ipv4Addr, ip_options: &[u8], data: &[u8], flags: u8) -> Vec<u8> {
    let segment = tcp(
        40001,
        25,
        flags,
        &[2, 4, 5, 0xb4, 4, 2],
        data,
        &Pseudo::V4(src, DST4),
    );
    ethernet(
        DST_MAC,
        SRC_MAC,
        tags,
        ETH_P_IPV4,
        &ipv4(src, DST4, IPPROTO_TCP, ip_options, IPV4_DF, &segment),
    )
}

fn syn6(tags: &[Tag], src: Ipv6Addr, chain_headers: &[(u8, Vec<u8>)], data: &[u8]) -> Vec<u8> {
    let segment = tcp(
        40001,
        25,
        SYN,
        &[2, 4, 5, 0xa0],
        data,
        &Pseudo::V6(src, DST6),
    );
    let (first, chain_bytes) = chain(chain_headers, IPPROTO_TCP);
    ethernet(
        DST_MAC,
        SRC_MAC,
        tags,
        ETH_P_IPV6,
        &ipv6(src, DST6, first, &chain_bytes, &segment),
    )
}

/// The sequence number `frames::tcp` writes.
const SEQ: u32 = 0x1000_0000;

/// Checks `reply` is a RST+ACK for the SYN `sent` from `src`, carrying `sent_data` bytes
/// (and a FIN if `fin`), on the VLANs `tags`.
fn assert_reset(reply: &[u8], tags: &[Tag], src: IpAddr, dst: IpAddr, occupied: u32, case: &str) {
    let packet = SlicedPacket::from_ethernet(reply)
        .unwrap_or_else(|error| panic!("{case}: the reply does not parse: {error}"));
    assert_eq!(reply[..6], SRC_MAC, "{case}: destination MAC");
    assert_eq!(reply[6..12], DST_MAC, "{case}: source MAC");
    let vids: Vec<u16> = packet
        .link_exts
        .iter()
        .map(|ext| match ext {
            LinkExtSlice::Vlan(vlan) => vlan.vlan_identifier().value(),
            LinkExtSlice::Macsec(_) => panic!("{case}: macsec?"),
        })
        .collect();
    let want: Vec<u16> = tags.iter().map(|tag| tag.vid).collect();
    assert_eq!(vids, want, "{case}: VLAN tags kept");
    let Some(TransportSlice::Tcp(tcp)) = &packet.transport else {
        panic!("{case}: no TCP in the reply");
    };
    let (checksum, l3_len) = match (&packet.net, src, dst) {
        (Some(NetSlice::Ipv4(ip)), IpAddr::V4(src), IpAddr::V4(dst)) => {
            let header = ip.header();
            assert_eq!(header.source_addr(), dst, "{case}: IPv4 source");
            assert_eq!(header.destination_addr(), src, "{case}: IPv4 destination");
            assert_eq!(header.ihl(), 5, "{case}: no IPv4 options in the reply");
            assert_eq!(header.total_len(), 40, "{case}: IPv4 total length");
            assert_eq!(
                internet_checksum(header.slice()),
                0,
                "{case}: IPv4 header checksum"
            );
            (
                tcp.calc_checksum_ipv4(dst.octets(), src.octets()).unwrap(),
                40,
            )
        }
        (Some(NetSlice::Ipv6(ip)), IpAddr::V6(src), IpAddr::V6(dst)) => {
            let header = ip.header();
            assert_eq!(header.source_addr(), dst, "{case}: IPv6 source");
            assert_eq!(header.destination_addr(), src, "{case}: IPv6 destination");
            assert_eq!(
                header.next_header().0,
                IPPROTO_TCP,
                "{case}: no extension headers"
            );
            assert_eq!(header.payload_length(), 20, "{case}: IPv6 payload length");
            (
                tcp.calc_checksum_ipv6(dst.octets(), src.octets()).unwrap(),
                60,
            )
        }
        (net, _, _) => panic!("{case}: wrong network layer {net:?}"),
    };
    assert_eq!(tcp.checksum(), checksum, "{case}: TCP checksum");
    assert_eq!(
        (tcp.source_port(), tcp.destination_port()),
        (25, 40001),
        "{case}: ports"
    );
    assert!(
        tcp.rst() && tcp.ack() && !tcp.syn() && !tcp.fin(),
        "{case}: flags RST+ACK"
    );
    assert_eq!(tcp.sequence_number(), 0, "{case}: sequence number");
    assert_eq!(
        tcp.acknowledgment_number(),
        SEQ.wrapping_add(occupied),
        "{case}: acknowledges SYN and data"
    );
    assert_eq!(tcp.data_offset(), 5, "{case}: no TCP options");
    assert_eq!(
        reply.len(),
        14 + 4 * tags.len() + l3_len,
        "{case}: trimmed to the headers"
    );
}

/// A case name, its VLAN stack, the SYN frame, its source and destination, and the
/// sequence space the SYN occupies (what the reset must acknowledge).
type ResetCase = (&'static str, Vec<Tag>, Vec<u8>, IpAddr, IpAddr, u32);

fn run(kernel: &mut Kernel, frame: &[u8], want: u32, case: &str) -> Vec<u8> {
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

#[test]
fn reject_answers_with_a_reset_over_ipv4_ipv6_and_vlans() {
    let mut kernel = Kernel::with_policy(&policy("enforce", "reject", "reject"));
    let (src4, dst4) = (IpAddr::V4(UNLISTED4), IpAddr::V4(DST4));
    let (src6, dst6) = (IpAddr::V6(UNLISTED6), IpAddr::V6(DST6));
    let cases: Vec<ResetCase> = vec![
        (
            "plain IPv4",
            vec![],
            syn4(&[], UNLISTED4, &[], &[], SYN),
            src4,
            dst4,
            1,
        ),
        (
            "IPv4 with 8 bytes of options",
            vec![],
            syn4(&[], UNLISTED4, &[1; 8], &[], SYN),
            src4,
            dst4,
            1,
        ),
        (
            "IPv4 on 802.1Q",
            vec![dot1q(42)],
            syn4(&[dot1q(42)], UNLISTED4, &[], &[], SYN),
            src4,
            dst4,
            1,
        ),
        (
            "IPv4 QinQ",
            vec![dot1ad(7), dot1q(42)],
            syn4(&[dot1ad(7), dot1q(42)], UNLISTED4, &[1; 4], &[], SYN),
            src4,
            dst4,
            1,
        ),
        (
            "IPv4 SYN with 100 bytes of data (TFO)",
            vec![],
            syn4(&[], UNLISTED4, &[], &[0x55; 100], SYN),
            src4,
            dst4,
            101,
        ),
        (
            "plain IPv6",
            vec![],
            syn6(&[], UNLISTED6, &[], &[]),
            src6,
            dst6,
            1,
        ),
        (
            "IPv6 with hop-by-hop and destination options",
            vec![],
            syn6(
                &[],
                UNLISTED6,
                &[
                    (IPPROTO_HOPOPTS, ext_header(0, 0)),
                    (IPPROTO_DSTOPTS, ext_header(0, 2)),
                ],
                &[],
            ),
            src6,
            dst6,
            1,
        ),
        (
            "IPv6 on 802.1Q with data",
            vec![dot1q(5)],
            syn6(&[dot1q(5)], UNLISTED6, &[], &[1, 2, 3]),
            src6,
            dst6,
            4,
        ),
        (
            "denied IPv4 inside the allowed /28",
            vec![],
            syn4(&[], DENIED4, &[], &[], SYN),
            IpAddr::V4(DENIED4),
            dst4,
            1,
        ),
    ];
    for (case, tags, frame, src, dst, occupied) in &cases {
        let reply = run(&mut kernel, frame, XDP_TX, case);
        assert_reset(&reply, tags, *src, *dst, *occupied, case);
    }
    let counters = kernel.counters();
    assert_eq!(counters.get(counter::REJECTED), cases.len() as u64);
    assert_eq!(counters.get(counter::DROPPED), 0);
    // Allowed sources still pass, untouched.
    let frame = syn4(&[], ALLOWED4, &[], &[], SYN);
    assert_eq!(run(&mut kernel, &frame, XDP_PASS, "allowed"), frame);
}

#[test]
fn reject_falls_back_to_drop_where_no_correct_reset_exists() {
    let mut kernel = Kernel::with_policy(&policy("enforce", "reject", "reject"));
    // A first fragment: the segment's length (and so the acknowledgement) is not known.
    let segment = tcp(40001, 25, SYN, &[], &[0; 64], &Pseudo::V4(UNLISTED4, DST4));
    let fragment = ethernet(
        DST_MAC,
        SRC_MAC,
        &[],
        ETH_P_IPV4,
        &ipv4(UNLISTED4, DST4, IPPROTO_TCP, &[], IPV4_MF, &segment),
    );
    run(&mut kernel, &fragment, XDP_DROP, "first fragment");
    // A data offset that claims more than the IP packet holds.
    let mut frame = syn4(&[], UNLISTED4, &[], &[], SYN);
    frame[14 + 20 + 12] = 0xf0;
    run(&mut kernel, &frame, XDP_DROP, "data offset past the packet");
    assert_eq!(kernel.counters().get(counter::REJECTED), 0);
    assert_eq!(kernel.counters().get(counter::DROPPED), 2);
}

#[test]
fn deny_rules_have_their_own_action() {
    let mut kernel = Kernel::with_policy(&policy("enforce", "reject", "drop"));
    run(
        &mut kernel,
        &syn4(&[], DENIED4, &[], &[], SYN),
        XDP_DROP,
        "denied, drop",
    );
    run(
        &mut kernel,
        &syn4(&[], UNLISTED4, &[], &[], SYN),
        XDP_TX,
        "unlisted, reject",
    );
    kernel.apply(&policy("enforce", "drop", "reject"));
    run(
        &mut kernel,
        &syn4(&[], DENIED4, &[], &[], SYN),
        XDP_TX,
        "denied, reject",
    );
    run(
        &mut kernel,
        &syn4(&[], UNLISTED4, &[], &[], SYN),
        XDP_DROP,
        "unlisted, drop",
    );
}

#[test]
fn audit_mode_passes_and_counts_what_enforce_would_stop() {
    let mut kernel = Kernel::with_policy(&policy("audit", "reject", "drop"));
    let frames = [
        syn4(&[], UNLISTED4, &[], &[], SYN),
        syn4(&[], UNLISTED4, &[], &[], SYN),
        syn4(&[], DENIED4, &[], &[], SYN),
        syn6(&[dot1q(9)], UNLISTED6, &[], &[]),
    ];
    for frame in &frames {
        // Passed untouched: not rewritten into a reset.
        assert_eq!(&run(&mut kernel, frame, XDP_PASS, "audit"), frame);
    }
    run(
        &mut kernel,
        &syn4(&[], ALLOWED4, &[], &[], SYN),
        XDP_PASS,
        "allowed",
    );
    let counters = kernel.counters();
    assert_eq!(counters.get(counter::WOULD_BLOCK), 4);
    assert_eq!(counters.get(counter::SYN_UNLISTED), 3);
    assert_eq!(counters.get(counter::SYN_DENIED), 1);
    assert_eq!(
        counters.get(counter::DROPPED) + counters.get(counter::REJECTED),
        0
    );

    let mut table = kernel.offenders();
    table.sort_by_key(|(source, _)| *source);
    let got: Vec<(IpAddr, u64, u64)> = table
        .iter()
        .map(|(source, seen)| (*source, seen.blocked, seen.would_block))
        .collect();
    assert_eq!(
        got,
        [
            (IpAddr::V4(DENIED4), 0, 1),
            (IpAddr::V4(UNLISTED4), 0, 2),
            (IpAddr::V6(UNLISTED6), 0, 1)
        ]
    );
    let (_, seen) = table[1];
    assert!(seen.first_seen_ns > 0 && seen.first_seen_ns <= seen.last_seen_ns);

    // Switching to enforce: the same table counts blocked SYNs beside the audit ones.
    kernel.apply(&policy("enforce", "drop", "drop"));
    run(
        &mut kernel,
        &syn4(&[], UNLISTED4, &[], &[], SYN),
        XDP_DROP,
        "enforced",
    );
    let table = kernel.offenders();
    let (_, seen) = table
        .iter()
        .find(|(source, _)| *source == IpAddr::V4(UNLISTED4))
        .expect("unlisted source in the table");
    assert_eq!((seen.blocked, seen.would_block), (1, 2));
}

/// `total` SYNs from as many sources in 10.1.0.0/16, each dropped.
fn flood(kernel: &mut Kernel, total: u32, case: &str) {
    for i in 0..total {
        let src = Ipv4Addr::new(10, 1, (i >> 8) as u8, i as u8);
        run(kernel, &syn4(&[], src, &[], &[], SYN), XDP_DROP, case);
    }
}

/// For `total` sightings within one second on one CPU: the per-second budget, the sampling
/// rate beyond it, and how many beyond it the sample takes.
fn recorded_beyond_budget(total: u32) -> (u32, u32, u64) {
    let budget = smtpguard_common::RECORD_BUDGET_PER_SECOND as u32;
    let sample = smtpguard_common::RECORD_SAMPLE as u32;
    let sampled = (budget + 1..=total)
        .filter(|used| used % sample == 0)
        .count() as u64;
    (budget, sample, sampled)
}

#[test]
fn a_flood_is_sampled_into_the_sources_table_beyond_the_budget() {
    smtpguard_tests::kernel::stay_on_one_cpu();
    let mut kernel = Kernel::with_policy(&policy("enforce", "drop", "drop"));
    let total = 5000u32;
    flood(&mut kernel, total, "flood");
    let (budget, sample, sampled) = recorded_beyond_budget(total);
    let counters = kernel.counters();
    assert_eq!(counters.get(counter::DROPPED), u64::from(total));
    assert_eq!(
        counters.get(counter::UNRECORDED),
        u64::from(total - budget) - sampled,
        "recorded: the first {budget}, then one in {sample}"
    );
    let recorded: u64 = kernel
        .offenders()
        .iter()
        .map(|(_, seen)| seen.blocked)
        .sum();
    assert!(
        recorded <= u64::from(budget) + sampled && recorded > u64::from(budget) * 9 / 10,
        "the table holds about what was recorded (less hash collisions): {recorded}"
    );
}

/// A flood of SYNs a canary's candidate would let in is counted whole, but its table of
/// sources takes the first ones of each second and then one in the sample, as the table of
/// stopped sources does: a canary under a spoofed flood costs a count per SYN, not a table
/// write.
#[test]
fn a_canary_under_a_flood_samples_its_table_beyond_the_budget() {
    smtpguard_tests::kernel::stay_on_one_cpu();
    let running = policy("enforce", "drop", "drop");
    let mut kernel = Kernel::with_policy(&running);
    let candidate = smtpguard_tests::fuzz::policy(
        "interfaces = [\"lo\"]\n[[allow]]\nname = \"everyone\"\nprefixes = [\"10.0.0.0/8\"]\n",
    );
    kernel
        .maps
        .start_canary(&candidate, &Default::default(), true)
        .expect("canary");
    let total = 6000u32;
    flood(&mut kernel, total, "flood under a canary");
    let (budget, sample, sampled) = recorded_beyond_budget(total);
    let counters = kernel.counters();
    assert_eq!(
        counters.get(counter::CANARY_NEWLY_ALLOWED),
        u64::from(total),
        "every changed SYN counted"
    );
    assert_eq!(
        counters.get(counter::CANARY_UNRECORDED),
        u64::from(total - budget) - sampled,
        "recorded: the first {budget}, then one in {sample}"
    );
    let sightings = kernel.maps.canary_sightings().expect("canary table");
    assert_eq!(
        sightings.len() as u64,
        u64::from(budget) + sampled,
        "one sighting per recorded source"
    );
}
