//! End to end: the real daemon binary attached to a veth in a network namespace, real TCP
//! connects from another namespace, real tagged frames injected with a packet socket.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use smtpguard_tests::{
    daemon::{Daemon, Launcher, binary, prefix_syns},
    frames::{self, ACK, SYN, Tag, dot1ad, dot1q},
    netns::{
        Listener, Outcome, PacketSocket, Pair, SERVER_V4, SERVER_V6, connect, contains, exchange,
        sock,
    },
};

const ALLOWED4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const DENIED4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 9);
const UNLISTED4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const ALLOWED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 0x10);
const DENIED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 0xbad);
const UNLISTED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x77);

/// Long enough for an allowed handshake, short of the client's first SYN retransmission (1 s),
/// so each blocked attempt sends exactly one SYN.
const BLOCKED_WAIT: Duration = Duration::from_millis(700);

fn config(interface: &str, xdp_mode: &str) -> String {
    format!(
        r#"interfaces = ["{interface}"]
ports = [25]
xdp_mode = "{xdp_mode}"

[[allow]]
name = "provider"
prefixes = ["192.0.2.0/28", "2001:db8:200::/64"]

[[deny]]
name = "abuser"
prefixes = ["192.0.2.9", "2001:db8:200::bad"]
"#
    )
}

fn clients() -> Vec<IpAddr> {
    vec![
        ALLOWED4.into(),
        DENIED4.into(),
        UNLISTED4.into(),
        ALLOWED6.into(),
        DENIED6.into(),
        UNLISTED6.into(),
    ]
}

/// A client namespace holding every test source, and an MTA listening on :25 in the server
/// namespace.
fn smtp_server() -> (Pair, Listener) {
    let pair = Pair::new(&clients());
    let smtp = Listener::start(&pair.server, 25);
    (pair, smtp)
}

fn attempt(pair: &Pair, src: impl Into<IpAddr>, port: u16) -> Outcome {
    let src = src.into();
    let dst = if src.is_ipv4() {
        sock(SERVER_V4, port)
    } else {
        sock(SERVER_V6, port)
    };
    connect(&pair.client, src, dst, BLOCKED_WAIT).0
}

fn connects_follow_the_policy(xdp_mode: &str, expected_mode: &str) {
    let pair = Pair::new(&clients());
    let smtp = Listener::start(&pair.server, 25);
    let submission = Listener::start(&pair.server, 587);
    let daemon = Daemon::start(&pair.server, &config(&pair.server_if, xdp_mode));

    let stats = daemon.stats();
    assert_eq!(
        stats["interfaces"][0]["mode"], expected_mode,
        "mode in force: {stats}"
    );

    for (src, port, want) in [
        (IpAddr::from(ALLOWED4), 25, Outcome::Connected),
        (DENIED4.into(), 25, Outcome::TimedOut),
        (UNLISTED4.into(), 25, Outcome::TimedOut),
        (ALLOWED6.into(), 25, Outcome::Connected),
        (DENIED6.into(), 25, Outcome::TimedOut),
        (UNLISTED6.into(), 25, Outcome::TimedOut),
        (UNLISTED4.into(), 587, Outcome::Connected),
        (UNLISTED6.into(), 587, Outcome::Connected),
    ] {
        let got = attempt(&pair, src, port);
        assert_eq!(got, want, "{xdp_mode}: connect from {src} to port {port}");
    }
    assert_eq!(
        smtp.accepted_settled(2),
        2,
        "port 25 accepted {:?}",
        smtp.peers()
    );
    assert_eq!(submission.accepted_settled(2), 2, "port 587 is not guarded");

    let stats = daemon.stats();
    assert_eq!(stats["syn_allowed"], 2, "{stats}");
    assert_eq!(stats["syn_denied"], 2, "{stats}");
    assert_eq!(stats["syn_unlisted"], 2, "{stats}");
    assert_eq!(stats["dropped"], 4, "{stats}");
    assert_eq!(prefix_syns(&stats, "192.0.2.0/28"), 1);
    assert_eq!(prefix_syns(&stats, "192.0.2.9/32"), 1);
    assert_eq!(prefix_syns(&stats, "2001:db8:200::/64"), 1);
    assert_eq!(prefix_syns(&stats, "2001:db8:200::bad/128"), 1);
}

#[test]
fn connects_follow_the_policy_native() {
    connects_follow_the_policy("native", "native");
}

#[test]
fn connects_follow_the_policy_generic() {
    connects_follow_the_policy("skb", "generic");
}

/// Injects tagged SYNs from the client's packet socket and reports which reached the
/// server's packet socket (which only sees what XDP passed).
fn tagged_frames_are_filtered(xdp_mode: &str) {
    let pair = Pair::new(&[]);
    let daemon = Daemon::start(&pair.server, &config(&pair.server_if, xdp_mode));
    let mac = pair.server_mac();
    let out = PacketSocket::open(&pair.client, &pair.client_if);
    let watch = PacketSocket::open(&pair.server, &pair.server_if);

    let stacks: [(&str, Vec<Tag>); 4] = [
        ("untagged", vec![]),
        ("802.1Q", vec![dot1q(25)]),
        ("QinQ 802.1ad+802.1Q", vec![dot1ad(100), dot1q(25)]),
        ("double 802.1Q", vec![dot1q(7), dot1q(25)]),
    ];
    let mut cases = Vec::new();
    let mut sport = 41000u16;
    for (name, tags) in &stacks {
        for (src, flags, passes) in [
            (IpAddr::from(ALLOWED4), SYN, true),
            (UNLISTED4.into(), SYN, false),
            (DENIED4.into(), SYN, false),
            (UNLISTED4.into(), ACK, true),
            (ALLOWED6.into(), SYN, true),
            (UNLISTED6.into(), SYN, false),
            (UNLISTED6.into(), SYN | ACK, true),
        ] {
            sport += 1;
            let frame = tagged_frame(mac, tags, src, sport, flags);
            cases.push((format!("{name} {src} flags {flags:#04x}"), sport, passes));
            out.send(&frame);
        }
    }
    let seen = watch.receive_for(Duration::from_millis(500));
    let mut failures = Vec::new();
    for (case, sport, passes) in &cases {
        let marker = [sport.to_be_bytes(), 25u16.to_be_bytes()].concat();
        let arrived = seen.iter().any(|frame| contains(frame, &marker));
        if arrived != *passes {
            failures.push(format!(
                "{case}: expected {}",
                if *passes { "pass" } else { "drop" }
            ));
        }
    }
    assert!(failures.is_empty(), "{xdp_mode}: {failures:#?}");
    let stats = daemon.stats();
    // Per stack: one allowed v4, one allowed v6, one denied v4, one unlisted each family.
    assert_eq!(stats["syn_allowed"], 2 * stacks.len() as u64, "{stats}");
    assert_eq!(stats["syn_denied"], stacks.len() as u64, "{stats}");
    assert_eq!(stats["syn_unlisted"], 2 * stacks.len() as u64, "{stats}");
}

fn tagged_frame(mac: [u8; 6], tags: &[Tag], src: IpAddr, sport: u16, flags: u8) -> Vec<u8> {
    let dst = if src.is_ipv4() {
        IpAddr::from(SERVER_V4)
    } else {
        SERVER_V6.into()
    };
    frames::segment_frame(mac, tags, src, dst, sport, 25, flags)
}

#[test]
fn vlan_and_qinq_tagged_syns_are_filtered_native() {
    tagged_frames_are_filtered("native");
}

#[test]
fn vlan_and_qinq_tagged_syns_are_filtered_generic() {
    tagged_frames_are_filtered("skb");
}

#[test]
fn sighup_flips_outcomes_and_keeps_established_connections() {
    let (pair, _smtp) = smtp_server();
    let first = |interface: &str| {
        format!(
            "interfaces = [\"{interface}\"]\n[[allow]]\nname = \"provider\"\nprefixes = [\"192.0.2.10\", \"2001:db8:200::/64\"]\n"
        )
    };
    let second = |interface: &str| {
        format!(
            "interfaces = [\"{interface}\"]\n[[allow]]\nname = \"provider\"\nprefixes = [\"203.0.113.7\", \"2001:db8:200::/64\"]\n"
        )
    };
    let mut daemon = Daemon::start(&pair.server, &first(&pair.server_if));

    let (outcome, stream) = connect(
        &pair.client,
        ALLOWED4.into(),
        sock(SERVER_V4, 25),
        BLOCKED_WAIT,
    );
    assert_eq!(outcome, Outcome::Connected, "allowed before the reload");
    let mut established = stream.expect("stream");
    assert_eq!(
        attempt(&pair, UNLISTED4, 25),
        Outcome::TimedOut,
        "not yet listed"
    );
    assert_eq!(attempt(&pair, ALLOWED6, 25), Outcome::Connected);
    let surviving_before = prefix_syns(&daemon.stats(), "2001:db8:200::/64");
    assert_eq!(surviving_before, 1);

    daemon.reload(&second(&pair.server_if));
    assert_eq!(
        attempt(&pair, UNLISTED4, 25),
        Outcome::Connected,
        "added by the reload"
    );
    assert_eq!(
        attempt(&pair, ALLOWED4, 25),
        Outcome::TimedOut,
        "removed by the reload"
    );
    exchange(&mut established, "EHLO client.example\r\n").unwrap_or_else(|error| {
        panic!("a connection established before the reload broke: {error}")
    });
    assert_eq!(attempt(&pair, ALLOWED6, 25), Outcome::Connected);
    let stats = daemon.stats();
    assert_eq!(
        prefix_syns(&stats, "2001:db8:200::/64"),
        2,
        "a prefix that survives the reload keeps counting: {stats}"
    );
    assert_eq!(prefix_syns(&stats, "203.0.113.7/32"), 1, "{stats}");

    daemon.reload(&first(&pair.server_if));
    assert_eq!(
        attempt(&pair, UNLISTED4, 25),
        Outcome::TimedOut,
        "removed again"
    );
    assert_eq!(
        attempt(&pair, ALLOWED4, 25),
        Outcome::Connected,
        "listed again"
    );
}

#[test]
fn refused_reload_keeps_the_running_policy() {
    let (pair, _smtp) = smtp_server();
    let mut daemon = Daemon::start(&pair.server, &config(&pair.server_if, "auto"));
    let generation = daemon.generation();
    let bad = format!(
        "interfaces = [\"{}\"]\n[[allow]]\nname = \"provider\"\nprefixes = [\"203.0.113.0/24\"]\n[[deny]]\nname = \"oops\"\nprefixes = [\"203.0.113.0/24\"]\n",
        pair.server_if
    );
    let line = daemon.reload_refused(&bad);
    assert!(
        line.contains("smtpguard.toml:7: prefix 203.0.113.0/24 is in both lists"),
        "the refusal names file, line and value: {line}"
    );
    assert_eq!(daemon.generation(), generation, "nothing applied");
    assert_eq!(
        attempt(&pair, UNLISTED4, 25),
        Outcome::TimedOut,
        "old policy still in force"
    );
    assert_eq!(
        attempt(&pair, ALLOWED4, 25),
        Outcome::Connected,
        "old policy still in force"
    );
}

#[test]
fn sigterm_with_on_exit_detach_detaches_and_exits_zero() {
    let (pair, _smtp) = smtp_server();
    let text = format!("on_exit = \"detach\"\n{}", config(&pair.server_if, "auto"));
    let mut daemon = Daemon::start(&pair.server, &text);
    assert_eq!(attempt(&pair, UNLISTED4, 25), Outcome::TimedOut);
    let pins = std::path::Path::new("/sys/fs/bpf/smtpguard").join(&daemon.instance);
    assert!(pins.exists(), "pins at {}", pins.display());
    let status = daemon.stop();
    assert!(status.success(), "exit status {status}:\n{}", daemon.log());
    assert!(
        !pair.server.has_xdp(&pair.server_if),
        "no program on the interface once the daemon has exited"
    );
    assert_eq!(
        attempt(&pair, UNLISTED4, 25),
        Outcome::Connected,
        "detached: port 25 open again"
    );
    assert!(!pins.exists(), "pins removed on exit");
}

#[test]
fn check_prints_the_policy_and_refuses_bad_files() {
    let dir = std::env::temp_dir().join(format!("sg-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        config("eth0", "auto").replace("192.0.2.0/28", "192.0.2.7/28"),
    )
    .expect("write");
    let output = std::process::Command::new(binary())
        .arg("check")
        .arg("--config")
        .arg(&good)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "check failed: {stderr}");
    assert!(stdout.contains("allow  provider  192.0.2.0/28"), "{stdout}");
    assert!(
        stderr.contains("good.toml:7: \"192.0.2.7/28\" has host bits set; using 192.0.2.0/28"),
        "{stderr}"
    );

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "interfaces = [\"eth0\"]\nports = [25]\nxdp_mode = \"auto\"\n[[allow]]\nname = \"p\"\nprefixes = [\"89.16.184.144/28\", \"89.16.184.300\"]\n").expect("write");
    let output = std::process::Command::new(binary())
        .arg("check")
        .arg("--config")
        .arg(&bad)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a bad config must fail check");
    assert!(
        stderr.contains("bad.toml:6: bad prefix \"89.16.184.300\""),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn ip_netns_exec_daemon_and_stats() {
    // `ip netns exec` gives each command its own /sys, so the two never share a bpffs: stats
    // finds the counter maps through the kernel ids in the state file.
    let (pair, _smtp) = smtp_server();
    let daemon = Daemon::start_with(
        &pair.server,
        &config(&pair.server_if, "auto"),
        Launcher::IpNetnsExec,
    );
    assert_eq!(attempt(&pair, UNLISTED4, 25), Outcome::TimedOut);
    assert_eq!(attempt(&pair, ALLOWED4, 25), Outcome::Connected);
    let mut command = Launcher::IpNetnsExec.command(&pair.server);
    command.arg(binary());
    let stats = daemon.stats_from(&mut command);
    assert_eq!(stats["syn_unlisted"], 1, "{stats}");
    assert_eq!(stats["syn_allowed"], 1, "{stats}");
}
