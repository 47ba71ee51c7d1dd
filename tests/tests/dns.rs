//! Provider lists that maintain themselves, against a real DNS server (dnsmasq) in the test
//! namespace: host names resolve to all their addresses and follow TTL changes; a dead
//! resolver keeps the last good addresses; SPF include chains expand; loops are refused.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
    time::{Duration, Instant},
};

use smtpguard_tests::{
    daemon::{Daemon, binary},
    dns::{DnsServer, RESOLVER, Zone},
    netns::{Listener, Netns, Outcome, Pair, SERVER_V4, SERVER_V6, connect, sock},
};

const RELAY_OLD: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const RELAY_NEW: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
const RELAY6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 0x10);
const SPF_RANGE_HOST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 40);
const MX_HOST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 25);
const UNLISTED4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);

const BLOCKED_WAIT: Duration = Duration::from_millis(700);

fn attempt(pair: &Pair, src: impl Into<IpAddr>) -> Outcome {
    let src = src.into();
    let dst = if src.is_ipv4() {
        IpAddr::from(SERVER_V4)
    } else {
        SERVER_V6.into()
    };
    connect(&pair.client, src, sock(dst, 25), BLOCKED_WAIT).0
}

fn config(interface: &str, allow: &str) -> String {
    format!(
        "interfaces = [\"{interface}\"]\n\n[metrics]\nlisten = \"127.0.0.1:9725\"\n\n[dns]\nresolver = \"{RESOLVER}\"\nmin_refresh_secs = 1\nmax_refresh_secs = 60\ntimeout_secs = 1\n\n[[allow]]\nname = \"provider\"\n{allow}\n"
    )
}

/// `smtpguard ARGS` run inside `netns`, where the test resolver is reachable.
fn cli_in(netns: &Netns, args: &[&str]) -> (bool, String) {
    let output = Command::new("nsenter")
        .arg(format!("--net={}", netns.path()))
        .arg(binary())
        .args(args)
        .output()
        .expect("run smtpguard");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn relay(address: impl ToString) -> (String, String) {
    (address.to_string(), "relay.provider.test".to_owned())
}

#[test]
fn host_names_follow_ttl_and_survive_a_dead_resolver() {
    let pair = Pair::new(&[
        RELAY_OLD.into(),
        RELAY_NEW.into(),
        RELAY6.into(),
        UNLISTED4.into(),
    ]);
    let _smtp = Listener::start(&pair.server, 25);
    let mut dns = DnsServer::start(
        &pair.server,
        &Zone {
            addresses: vec![relay(RELAY_OLD), relay(RELAY6)],
            ..Zone::default()
        },
    );
    let text = config(&pair.server_if, "hosts = [\"relay.provider.test\"]");
    let mut daemon = Daemon::start(&pair.server, &text);

    // Both address families of the name are allowed.
    for (src, want) in [
        (IpAddr::V4(RELAY_OLD), Outcome::Connected),
        (RELAY6.into(), Outcome::Connected),
        (RELAY_NEW.into(), Outcome::TimedOut),
        (UNLISTED4.into(), Outcome::TimedOut),
    ] {
        assert_eq!(attempt(&pair, src), want, "{src} with the first answer");
    }
    std::fs::write(&daemon.config_path, &text).expect("config");
    let (ok, explained) = cli_in(
        &pair.server,
        &[
            "explain",
            &RELAY6.to_string(),
            "--config",
            &daemon.config_path.display().to_string(),
        ],
    );
    assert!(ok, "{explained}");
    assert!(
        explained.contains("match: 2001:db8:200::10/128 on the allow list, rule \"provider\", from host relay.provider.test"),
        "{explained}"
    );

    // The record changes; its 1 s TTL runs out; the daemon asks again and applies.
    dns.set_addresses(&[relay(RELAY_NEW), relay(RELAY6)]);
    daemon.wait_for_generation(2, Duration::from_secs(10));
    assert_eq!(
        attempt(&pair, RELAY_NEW),
        Outcome::Connected,
        "new address allowed"
    );
    assert_eq!(
        attempt(&pair, RELAY_OLD),
        Outcome::TimedOut,
        "old address dropped"
    );

    // The resolver dies: refreshes fail, the last good addresses stay in force.
    dns.kill();
    let generation = daemon.generation();
    let deadline = Instant::now() + Duration::from_secs(15);
    while daemon.log().matches("keeping the last good").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "no failed refresh logged:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        daemon.generation(),
        generation,
        "a failed refresh applies nothing"
    );
    assert_eq!(
        attempt(&pair, RELAY_NEW),
        Outcome::Connected,
        "last good address still allowed"
    );
    assert_eq!(
        attempt(&pair, RELAY6),
        Outcome::Connected,
        "last good IPv6 address still allowed"
    );
    assert!(
        daemon
            .log()
            .contains("cannot refresh host relay.provider.test"),
        "{}",
        daemon.log()
    );
}

#[test]
fn spf_include_chains_expand_and_loops_are_refused() {
    let pair = Pair::new(&[
        RELAY_OLD.into(),
        SPF_RANGE_HOST.into(),
        MX_HOST.into(),
        UNLISTED4.into(),
    ]);
    let _smtp = Listener::start(&pair.server, 25);
    let _dns = DnsServer::start(
        &pair.server,
        &Zone {
            addresses: vec![
                relay(RELAY_OLD),
                (MX_HOST.to_string(), "mx.provider.test".to_owned()),
            ],
            txt: vec![
                (
                    "provider.test".into(),
                    "v=spf1 include:_spf.provider.test mx -all".into(),
                ),
                (
                    "_spf.provider.test".into(),
                    "v=spf1 ip4:192.0.2.32/28 include:_spf2.provider.test ~all".into(),
                ),
                (
                    "_spf2.provider.test".into(),
                    "v=spf1 a:relay.provider.test ip6:2001:db8:200::/64".into(),
                ),
                ("loop.test".into(), "v=spf1 include:loop2.test".into()),
                (
                    "loop2.test".into(),
                    "v=spf1 ip4:192.0.2.0/24 include:loop.test".into(),
                ),
            ],
            mx: vec![("provider.test".into(), "mx.provider.test".into())],
        },
    );
    let text = config(&pair.server_if, "spf = [\"provider.test\"]");
    let mut daemon = Daemon::start(&pair.server, &text);
    for (src, want, why) in [
        (SPF_RANGE_HOST, Outcome::Connected, "ip4 of an include"),
        (RELAY_OLD, Outcome::Connected, "a: of a nested include"),
        (MX_HOST, Outcome::Connected, "mx of the top record"),
        (UNLISTED4, Outcome::TimedOut, "not in the SPF record"),
    ] {
        assert_eq!(attempt(&pair, src), want, "{src}: {why}");
    }
    let (ok, checked) = cli_in(
        &pair.server,
        &[
            "check",
            "--config",
            &daemon.config_path.display().to_string(),
        ],
    );
    assert!(ok, "{checked}");
    assert!(
        checked.contains("192.0.2.32/28") && checked.contains("SPF of provider.test"),
        "{checked}"
    );

    // A loop is refused: by `check`, and by a reload, which keeps the running policy.
    let looped = config(&pair.server_if, "spf = [\"loop.test\"]");
    let looped_path = daemon.dir.join("loop.toml");
    std::fs::write(&looped_path, &looped).expect("loop config");
    let (ok, checked) = cli_in(
        &pair.server,
        &["check", "--config", &looped_path.display().to_string()],
    );
    assert!(!ok, "a loop must be refused: {checked}");
    assert!(
        checked.contains(
            "cannot expand SPF of loop.test: include loop: loop.test -> loop2.test -> loop.test"
        ),
        "{checked}"
    );
    let message = daemon.reload_refused(&looped);
    assert!(message.contains("include loop"), "{message}");
    assert_eq!(
        attempt(&pair, MX_HOST),
        Outcome::Connected,
        "the running policy stays"
    );
}
