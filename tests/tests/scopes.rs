//! Destination scopes and deny precedence end to end: the real daemon on a veth whose server
//! end has three IPv4 addresses (and two IPv6 ones), real TCP connects from a client
//! namespace. Scope "mail-a" guards 198.51.100.1 and 2001:db8:100::1 with provider A's ranges
//! and reject; scope "mail-b" guards 192.0.2.1 with provider B's and drop; 203.0.113.1 and
//! 2001:db8:200::1 are in no scope and the file has no top-level rules, so they are not
//! guarded. A DROP-style deny file lists a prefix inside provider A's range (a feed: it must not
//! cut the provider off) and provider B's whole range; the admin's own deny /32 inside provider
//! A stops that one host.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use smtpguard_tests::{
    daemon::{Daemon, prefix_syns},
    netns::{Listener, Outcome, Pair, connect, sock, unique_tag},
};

/// Scope "mail-a"'s addresses (the server's first addresses in each family).
const MAIL_A4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const MAIL_A6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);
/// Scope "mail-b"'s address.
const MAIL_B4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// In no scope.
const OTHER4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 1);

/// Provider A's relay, inside the feed's 192.0.2.8/29.
const PROVIDER_A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// Inside provider A's range and the feed's, denied by the admin's own /32.
const ABUSER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 9);
/// Provider B's relay; the feed lists provider B's whole /28.
const PROVIDER_B: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
/// Nobody's relay.
const SPAMMER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 77);
const PROVIDER_A6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 0x10);
const SPAMMER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x77);

/// Long enough for a handshake, short of the first SYN retransmission.
const WAIT: Duration = Duration::from_millis(700);

fn config(interface: &str, feed: &std::path::Path) -> String {
    format!(
        r#"interfaces = ["{interface}"]
ports = [25]

[[scope]]
name = "mail-a"
destinations = ["198.51.100.1", "2001:db8:100::1"]
action = "reject"
[[scope.allow]]
name = "provider-a"
prefixes = ["192.0.2.0/28", "2001:db8:200::/64"]
[[scope.deny]]
name = "drop-list"
files = ["{feed}"]
[[scope.deny]]
name = "abuser"
prefixes = ["192.0.2.9"]

[[scope]]
name = "mail-b"
destinations = ["192.0.2.1/32"]
action = "drop"
[[scope.allow]]
name = "provider-b"
prefixes = ["203.0.113.0/28"]
"#,
        feed = feed.display()
    )
}

/// A DROP-style list: a /29 inside provider A's /28, and provider B's /28, which the scope
/// of provider A does not allow.
const FEED: &str = "; DROP-style list\n192.0.2.8/29 ; SBL0001\n203.0.113.0/28 ; SBL0002\n";

#[test]
fn each_destination_is_guarded_by_its_own_scope_and_feeds_never_cut_the_provider_off() {
    let dir = std::env::temp_dir().join(format!("sg-scopes-{}", unique_tag()));
    std::fs::create_dir_all(&dir).unwrap();
    let feed = dir.join("drop.txt");
    std::fs::write(&feed, FEED).unwrap();

    let clients: Vec<IpAddr> = vec![
        PROVIDER_A.into(),
        ABUSER.into(),
        PROVIDER_B.into(),
        SPAMMER.into(),
        PROVIDER_A6.into(),
        SPAMMER6.into(),
    ];
    let pair = Pair::new(&clients);
    // Resets leave a veth only towards a peer that runs XDP itself.
    let _peer = pair.client_xdp_peer();
    let smtp = Listener::start(&pair.server, 25);
    let daemon = Daemon::start(&pair.server, &config(&pair.server_if, &feed));

    use Outcome::{Connected, Refused, TimedOut};
    let cases: [(IpAddr, IpAddr, Outcome, &str); 14] = [
        // Scope mail-a: provider A in, even where the feed lists it; the admin's /32 and
        // everyone else refused at once (reject).
        (
            PROVIDER_A.into(),
            MAIL_A4.into(),
            Connected,
            "provider A, inside the feed's /29",
        ),
        (
            ABUSER.into(),
            MAIL_A4.into(),
            Refused,
            "the admin's deny /32 inside provider A",
        ),
        (
            PROVIDER_B.into(),
            MAIL_A4.into(),
            Refused,
            "provider B is nobody to mail-a",
        ),
        (
            SPAMMER.into(),
            MAIL_A4.into(),
            Refused,
            "unlisted at mail-a",
        ),
        (
            PROVIDER_A6.into(),
            MAIL_A6.into(),
            Connected,
            "provider A over IPv6",
        ),
        (
            SPAMMER6.into(),
            MAIL_A6.into(),
            Refused,
            "unlisted at mail-a over IPv6",
        ),
        // Scope mail-b: provider B in (the feed listing its range belongs to mail-a only);
        // others dropped silently.
        (PROVIDER_B.into(), MAIL_B4.into(), Connected, "provider B"),
        (
            PROVIDER_A.into(),
            MAIL_B4.into(),
            TimedOut,
            "provider A is nobody to mail-b",
        ),
        (
            SPAMMER.into(),
            MAIL_B4.into(),
            TimedOut,
            "unlisted at mail-b",
        ),
        // In no scope: not guarded.
        (
            SPAMMER.into(),
            OTHER4.into(),
            Connected,
            "an address in no scope",
        ),
        (
            ABUSER.into(),
            OTHER4.into(),
            Connected,
            "the abuser, to an address in no scope",
        ),
        (
            SPAMMER6.into(),
            OTHER6.into(),
            Connected,
            "an IPv6 address in no scope",
        ),
        // Only port 25 is guarded, in every scope.
        (
            SPAMMER.into(),
            MAIL_A4.into(),
            Refused,
            "again, to count it twice",
        ),
        (
            PROVIDER_A.into(),
            MAIL_A4.into(),
            Connected,
            "provider A again",
        ),
    ];
    for (src, dst, want, what) in &cases {
        let (src, dst) = (*src, *dst);
        let (got, _) = connect(&pair.client, src, sock(dst, 25), WAIT);
        assert_eq!(&got, want, "{what}: {src} -> {dst}:25\n{}", daemon.log());
    }
    let accepted = cases.iter().filter(|case| case.2 == Connected).count();
    assert_eq!(
        smtp.accepted_settled(accepted),
        accepted,
        "{:?}",
        smtp.peers()
    );

    // Counted where they were decided: the feed's /29 counts nothing, provider A's /28 got
    // both of provider A's SYNs to mail-a.
    let stats = daemon.stats();
    assert_eq!(prefix_syns(&stats, "192.0.2.0/28"), 2, "{stats}");
    assert_eq!(prefix_syns(&stats, "192.0.2.8/29"), 0, "{stats}");
    assert_eq!(prefix_syns(&stats, "192.0.2.9/32"), 1, "{stats}");
    assert_eq!(prefix_syns(&stats, "203.0.113.0/28"), 1, "{stats}");
    let scopes = stats["scopes"].as_array().expect("scopes in stats");
    let names: Vec<&str> = scopes.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["default", "mail-a", "mail-b"], "{stats}");
    assert_eq!(scopes[0]["guarded"], false, "{stats}");
    assert_eq!(scopes[1]["syn_allowed"], 3, "{stats}");
    assert_eq!(scopes[1]["syn_denied"], 2, "{stats}");
    assert_eq!(scopes[2]["syn_allowed"], 1, "{stats}");
    // Four refused at mail-a (IPv4 thrice counting the repeat, IPv6 once, plus the abuser and
    // provider B as deny/unlisted): every stop at mail-a was a reset, at mail-b a drop.
    assert_eq!(stats["rejected"], 5, "{stats}");
    assert_eq!(stats["dropped"], 2, "{stats}");

    // Who was stopped, in which scope.
    let report = daemon.report();
    let rows = report["rows"].as_array().expect("report rows");
    let seen = |source: &str, scope: &str| {
        rows.iter()
            .any(|row| row["source"] == source && row["scope"] == scope)
    };
    assert!(seen("192.0.2.10", "mail-b"), "{report}");
    assert!(
        seen("198.51.100.77", "mail-a") || seen("198.51.100.77", "mail-b"),
        "{report}"
    );

    // explain names the scope and the ranking.
    let config = daemon.config_path.display().to_string();
    let explain =
        |src: &str, dst: &str| daemon.cli(&["explain", src, "--to", dst, "--config", &config]);
    let explained = explain("192.0.2.10", "198.51.100.1");
    assert!(explained.contains("mail-a"), "{explained}");
    assert!(explained.contains("outranked"), "{explained}");
    assert!(explained.contains("provider-a"), "{explained}");
    let explained = explain("192.0.2.9", "198.51.100.1");
    assert!(explained.contains("abuser"), "{explained}");
    let explained = explain("192.0.2.9", "203.0.113.1");
    assert!(explained.contains("not guarded"), "{explained}");

    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}
