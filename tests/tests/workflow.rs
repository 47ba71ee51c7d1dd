//! The lock-down workflow end to end, with the real daemon and real TCP: reject answers a
//! bypassing sender at once (IPv4, IPv6, VLAN); audit mode lets everything through and
//! `report` names who would have been blocked; a SIGHUP switches to enforce; prefix list
//! files load, reload, and are refused with their file and line.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use smtpguard_tests::{
    daemon::Daemon,
    frames::{self, dot1ad, dot1q},
    netns::{Listener, Outcome, PacketSocket, Pair, SERVER_V4, SERVER_V6, connect, sock},
};

const ALLOWED4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const UNLISTED4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const ALLOWED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 0x10);
const UNLISTED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x77);

/// Short of the client's first SYN retransmission (1 s): a blocked attempt sends one SYN.
const BLOCKED_WAIT: Duration = Duration::from_millis(700);

fn config(interface: &str, extra: &str, allow: &str) -> String {
    format!("interfaces = [\"{interface}\"]\n{extra}\n[[allow]]\nname = \"provider\"\n{allow}\n")
}

const PROVIDER: &str = "prefixes = [\"192.0.2.0/28\", \"2001:db8:200::/64\"]";

/// Connects from `src` to the server's address of the same family (or `dst`), port 25.
fn attempt_to(pair: &Pair, src: IpAddr, dst: IpAddr) -> (Outcome, Duration) {
    let started = Instant::now();
    let (outcome, _) = connect(&pair.client, src, sock(dst, 25), BLOCKED_WAIT);
    (outcome, started.elapsed())
}

fn server_for(src: IpAddr) -> IpAddr {
    if src.is_ipv4() {
        SERVER_V4.into()
    } else {
        SERVER_V6.into()
    }
}

fn reject_refuses_at_once(xdp_mode: &str) {
    let pair = Pair::new(&[
        ALLOWED4.into(),
        UNLISTED4.into(),
        ALLOWED6.into(),
        UNLISTED6.into(),
    ]);
    let _peer = pair.client_xdp_peer();
    let smtp = Listener::start(&pair.server, 25);
    let daemon = Daemon::start(
        &pair.server,
        &config(
            &pair.server_if,
            &format!("xdp_mode = \"{xdp_mode}\"\naction = \"reject\""),
            PROVIDER,
        ),
    );
    let cases = [
        ("IPv4", IpAddr::V4(UNLISTED4), server_for(UNLISTED4.into())),
        ("IPv6", IpAddr::V6(UNLISTED6), server_for(UNLISTED6.into())),
    ];
    for (case, src, dst) in cases {
        let (outcome, took) = attempt_to(&pair, src, dst);
        assert_eq!(
            outcome,
            Outcome::Refused,
            "{xdp_mode}, {case}: a rejected connect fails with ECONNREFUSED\n{}",
            daemon.log()
        );
        assert!(
            took < Duration::from_millis(300),
            "{xdp_mode}, {case}: refused after {took:?}, not at once"
        );
    }
    for src in [IpAddr::V4(ALLOWED4), IpAddr::V6(ALLOWED6)] {
        let (outcome, _) = attempt_to(&pair, src, server_for(src));
        assert_eq!(outcome, Outcome::Connected, "{xdp_mode}: allowed {src}");
    }
    assert_eq!(smtp.accepted_settled(2), 2, "accepted {:?}", smtp.peers());

    // VLANs: this kernel has no 802.1Q devices, so tagged SYNs go out of a packet socket on
    // the client's link and the resets come back to it, over the real veth.
    let client = PacketSocket::open(&pair.client, &pair.client_if);
    let mac = pair.server_mac();
    let tagged = [
        (
            "IPv4 on 802.1Q",
            vec![dot1q(42)],
            IpAddr::V4(UNLISTED4),
            42001u16,
        ),
        (
            "IPv6 on 802.1Q",
            vec![dot1q(42)],
            IpAddr::V6(UNLISTED6),
            42002,
        ),
        (
            "IPv4 on QinQ",
            vec![dot1ad(7), dot1q(42)],
            IpAddr::V4(UNLISTED4),
            42003,
        ),
        (
            "IPv4 allowed on 802.1Q",
            vec![dot1q(42)],
            IpAddr::V4(ALLOWED4),
            42004,
        ),
    ];
    for (_, tags, src, sport) in &tagged {
        client.send(&frames::segment_frame(
            mac,
            tags,
            *src,
            server_for(*src),
            *sport,
            25,
            frames::SYN,
        ));
    }
    let seen = client.receive_for(Duration::from_millis(500));
    for (case, _, src, sport) in &tagged {
        let resets: Vec<_> = seen
            .iter()
            .filter_map(|frame| SlicedPacket::from_ethernet(frame).ok())
            .filter_map(|packet| match (&packet.transport, &packet.net) {
                (Some(TransportSlice::Tcp(tcp)), Some(net))
                    if tcp.rst() && tcp.destination_port() == *sport =>
                {
                    let to = match net {
                        NetSlice::Ipv4(ip) => IpAddr::V4(ip.header().destination_addr()),
                        NetSlice::Ipv6(ip) => IpAddr::V6(ip.header().destination_addr()),
                        NetSlice::Arp(_) => return None,
                    };
                    Some((to, tcp.acknowledgment_number()))
                }
                _ => None,
            })
            .collect();
        if *src == IpAddr::V4(ALLOWED4) {
            assert!(
                resets.is_empty(),
                "{xdp_mode}, {case}: an allowed SYN got a reset"
            );
        } else {
            assert_eq!(
                resets,
                [(*src, 0x1000_0001)],
                "{xdp_mode}, {case}: one reset back to the sender, acknowledging the SYN"
            );
        }
    }
    let stats = daemon.stats();
    assert_eq!(stats["rejected"], 5, "{stats}");
    assert_eq!(stats["dropped"], 0, "{stats}");
    assert_eq!(stats["action"], "reject", "{stats}");
}

#[test]
fn reject_refuses_at_once_native() {
    reject_refuses_at_once("native");
}

#[test]
fn reject_refuses_at_once_generic() {
    reject_refuses_at_once("skb");
}

#[test]
fn audit_report_then_enforce() {
    let pair = Pair::new(&[
        ALLOWED4.into(),
        UNLISTED4.into(),
        ALLOWED6.into(),
        UNLISTED6.into(),
    ]);
    let smtp = Listener::start(&pair.server, 25);
    let audit = config(&pair.server_if, "mode = \"audit\"", PROVIDER);
    let mut daemon = Daemon::start(&pair.server, &audit);

    // Audit: the old-MX stragglers still get through, and are named.
    for src in [
        IpAddr::V4(UNLISTED4),
        UNLISTED4.into(),
        UNLISTED6.into(),
        ALLOWED4.into(),
    ] {
        let (outcome, _) = attempt_to(&pair, src, server_for(src));
        assert_eq!(outcome, Outcome::Connected, "audit mode passes {src}");
    }
    assert_eq!(smtp.accepted_settled(4), 4);
    let report = daemon.report();
    assert_eq!(report["mode"], "audit", "{report}");
    let rows = report["rows"].as_array().expect("rows");
    let got: Vec<(String, u64, u64, String)> = rows
        .iter()
        .map(|row| {
            (
                row["source"].as_str().unwrap_or_default().to_owned(),
                row["blocked"].as_u64().unwrap_or(99),
                row["would_block"].as_u64().unwrap_or(99),
                row["decided_by"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (UNLISTED4.to_string(), 0, 2, "unlisted".to_owned()),
            (UNLISTED6.to_string(), 0, 1, "unlisted".to_owned()),
        ],
        "{report}"
    );
    assert!(
        rows[0]["first_seen"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{report}"
    );
    let stats = daemon.stats();
    assert_eq!(
        (stats["would_block"].as_u64(), stats["dropped"].as_u64()),
        (Some(3), Some(0)),
        "{stats}"
    );
    let text = daemon.cli(&["report"]);
    assert!(text.contains("audit mode: nothing is blocked"), "{text}");
    assert!(text.contains(&UNLISTED4.to_string()), "{text}");
    // `stats --top 1` lists the most frequent source only.
    let text = daemon.cli(&["stats", "--top", "1"]);
    assert!(
        text.contains("2 sources in the table, top 1 shown"),
        "{text}"
    );
    assert!(
        text.contains(&UNLISTED4.to_string()) && !text.contains(&UNLISTED6.to_string()),
        "{text}"
    );

    // Enforce, by SIGHUP: the same source is now stopped, and counted as blocked.
    daemon.reload(&config(&pair.server_if, "mode = \"enforce\"", PROVIDER));
    let (outcome, _) = attempt_to(&pair, UNLISTED4.into(), SERVER_V4.into());
    assert_eq!(outcome, Outcome::TimedOut, "enforced");
    let (outcome, _) = attempt_to(&pair, ALLOWED4.into(), SERVER_V4.into());
    assert_eq!(outcome, Outcome::Connected, "provider still connects");
    let report = daemon.report();
    assert_eq!(report["mode"], "enforce", "{report}");
    assert_eq!(
        report["rows"][0]["source"],
        UNLISTED4.to_string(),
        "{report}"
    );
    assert_eq!(report["rows"][0]["blocked"], 1, "{report}");
    assert_eq!(report["rows"][0]["would_block"], 2, "{report}");
    // The record is written: the generation it describes is the one the program reads.
    let stats = daemon.stats();
    assert_eq!(stats["generation_in_force"], stats["generation"], "{stats}");
    assert!(stats["generation"].as_u64() >= Some(2), "{stats}");
}

#[test]
fn list_files_load_reload_and_name_their_bad_lines() {
    let pair = Pair::new(&[ALLOWED4.into(), UNLISTED4.into(), ALLOWED6.into()]);
    let smtp = Listener::start(&pair.server, 25);
    let dir = std::env::temp_dir().join(format!("sg-lists-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("list dir");
    let list = dir.join("provider.txt");
    std::fs::write(
        &list,
        "; provider ranges, as published\n192.0.2.0 255.255.255.240 ; netmask notation\n2001:db8:200::/64 # v6\n",
    )
    .expect("write list");
    let text = config(
        &pair.server_if,
        "",
        &format!("files = [\"{}\"]", list.display()),
    );
    let mut daemon = Daemon::start(&pair.server, &text);
    for (src, want) in [
        (IpAddr::V4(ALLOWED4), Outcome::Connected),
        (ALLOWED6.into(), Outcome::Connected),
        (UNLISTED4.into(), Outcome::TimedOut),
    ] {
        assert_eq!(
            attempt_to(&pair, src, server_for(src)).0,
            want,
            "{src} with the first list"
        );
    }

    // The list changes: SIGHUP re-reads it.
    std::fs::write(&list, "203.0.113.0/24\n").expect("rewrite list");
    daemon.reload(&text);
    assert_eq!(
        attempt_to(&pair, UNLISTED4.into(), SERVER_V4.into()).0,
        Outcome::Connected
    );
    assert_eq!(
        attempt_to(&pair, ALLOWED4.into(), SERVER_V4.into()).0,
        Outcome::TimedOut
    );

    // A bad line is refused with its file and line; the running policy stays.
    std::fs::write(&list, "203.0.113.0/24\n\n203.0.113.300\n").expect("break list");
    let message = daemon.reload_refused(&text);
    assert!(
        message.contains(&format!(
            "{}:3: bad prefix \"203.0.113.300\"",
            list.display()
        )),
        "{message}"
    );
    assert_eq!(
        attempt_to(&pair, UNLISTED4.into(), SERVER_V4.into()).0,
        Outcome::Connected
    );
    assert_eq!(smtp.accepted_settled(4), 4);

    // A feed that repeats itself applies; its warnings are logged up to ten per file, the
    // rest summed up in one line, so a big feed does not flood the log at every reload.
    let repeats = "203.0.113.0/24\n".repeat(31);
    std::fs::write(&list, repeats).expect("repeating list");
    let before = daemon.log().matches("is already on the allow list").count();
    daemon.reload(&text);
    let log = daemon.log();
    assert_eq!(
        log.matches("is already on the allow list").count() - before,
        10,
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "20 more warnings about {} not logged; `smtpguard check --config FILE` lists them all",
            list.display()
        )),
        "{log}"
    );
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}
