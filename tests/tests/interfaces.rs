//! Interfaces as the kernel describes them. A layer-3 TUN device gets the program for packets
//! that start at the IP header, in generic mode (the TUN driver refuses a native program),
//! and the kernel's own answers, read back from the device, say whether a SYN got through. A NIC that strips VLAN tags before XDP gets no
//! resets from the program, and the admin is told why.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use smtpguard_tests::{
    daemon::Daemon,
    frames::{ACK, IPPROTO_TCP, IPV4_DF, Pseudo, RST, SYN, ipv4, ipv6, tcp},
    netns::{
        Listener, Netns, Outcome, Pair, SERVER_V4, Tun, connect, set_vlan_offload, sock, unique_tag,
    },
};

const TUN4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const TUN6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 1);
const ALLOWED4: Ipv4Addr = Ipv4Addr::new(89, 16, 184, 145);
const UNLISTED4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const ALLOWED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x25, 0, 0, 0, 0, 9);
const UNLISTED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x66, 0, 0, 0, 0, 1);

fn tun_config(interface: &str, extra: &str) -> String {
    format!(
        "interfaces = [\"{interface}\"]\n{extra}\n[[allow]]\nname = \"provider\"\nprefixes = [\"89.16.184.144/28\", \"2001:db8:25::/48\"]\n"
    )
}

/// A SYN from `src` to the TUN device's own address on port 25, from source port `sport`.
fn syn(src: IpAddr, sport: u16) -> Vec<u8> {
    match src {
        IpAddr::V4(src) => ipv4(
            src,
            TUN4,
            IPPROTO_TCP,
            &[],
            IPV4_DF,
            &tcp(sport, 25, SYN, &[], &[], &Pseudo::V4(src, TUN4)),
        ),
        IpAddr::V6(src) => ipv6(
            src,
            TUN6,
            IPPROTO_TCP,
            &[],
            &tcp(sport, 25, SYN, &[], &[], &Pseudo::V6(src, TUN6)),
        ),
    }
}

/// Hands a SYN from `src` to the device and returns the TCP flags of the answer sent back to
/// it (the kernel's SYN-ACK, or the program's reset), if any came within 400 ms.
fn answer(tun: &Tun, src: IpAddr, sport: u16) -> Option<u8> {
    tun.send(&syn(src, sport));
    tun.receive_for(Duration::from_millis(400))
        .iter()
        .find_map(|packet| {
            let (to, protocol, l4) = match packet.first()? >> 4 {
                4 => {
                    let ihl = usize::from(packet[0] & 15) * 4;
                    let to = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
                    (IpAddr::V4(to), packet[9], packet.get(ihl..)?)
                }
                6 => {
                    let to: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
                    (IpAddr::V6(Ipv6Addr::from(to)), packet[6], packet.get(40..)?)
                }
                _ => return None,
            };
            let dport = u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?]);
            (to == src && protocol == IPPROTO_TCP && dport == sport).then(|| l4[13])
        })
}

#[test]
fn a_tun_device_is_filtered_by_the_layer3_program_with_the_kernel_as_judge() {
    let netns = Netns::new(format!("sg-{}-t", unique_tag()));
    let name = format!("sgtun{}", unique_tag().replace('-', ""));
    let tun = Tun::create(&netns, &name, "10.99.0.1/24");
    smtpguard_tests::netns::ip(&[
        "-n",
        &netns.name,
        "addr",
        "add",
        "2001:db8:99::1/64",
        "dev",
        &name,
        "nodad",
    ]);
    let _smtp = Listener::start(&netns, 25);
    let sources = [
        (IpAddr::V4(ALLOWED4), true),
        (IpAddr::V4(UNLISTED4), false),
        (IpAddr::V6(ALLOWED6), true),
        (IpAddr::V6(UNLISTED6), false),
    ];
    // Without a filter the kernel answers every one of them.
    for (index, (src, _)) in sources.iter().enumerate() {
        assert_eq!(
            answer(&tun, *src, 41000 + index as u16),
            Some(SYN | ACK),
            "no filter: the kernel answers {src}"
        );
    }

    let mut daemon = Daemon::start(&netns, &tun_config(&name, ""));
    let state = daemon.state().expect("state");
    assert_eq!(state["interfaces"][0]["mode"], "generic", "{state}");
    assert_eq!(state["interfaces"][0]["kind"], "layer3", "{state}");
    for (index, (src, allowed)) in sources.iter().enumerate() {
        let got = answer(&tun, *src, 42000 + index as u16);
        let want = allowed.then_some(SYN | ACK);
        assert_eq!(
            got,
            want,
            "enforcing: {src} (allowed: {allowed})\n{}",
            daemon.log()
        );
    }

    daemon.reload(&tun_config(&name, "action = \"reject\""));
    for (index, (src, allowed)) in sources.iter().enumerate() {
        let got = answer(&tun, *src, 43000 + index as u16);
        let want = if *allowed { SYN | ACK } else { RST | ACK };
        assert_eq!(
            got,
            Some(want),
            "rejecting: {src} (allowed: {allowed})\n{}",
            daemon.log()
        );
    }
    let stats = daemon.stats();
    assert!(stats["rejected"].as_u64().unwrap_or(0) >= 2, "{stats}");
}

#[test]
fn native_mode_on_a_layer3_device_is_refused_with_its_link_type() {
    let netns = Netns::new(format!("sg-{}-t", unique_tag()));
    let name = format!("sgtun{}", unique_tag().replace('-', ""));
    let _tun = Tun::create(&netns, &name, "10.99.0.1/24");
    let mut daemon = Daemon::launch(&netns, &tun_config(&name, "xdp_mode = \"native\""));
    let status = daemon.wait_exit(Duration::from_secs(20));
    assert!(!status.success(), "{}", daemon.log());
    let log = daemon.log();
    assert!(
        log.contains(&format!(
            "interface \"{name}\" is a layer-3 device (link type none)"
        )),
        "{log}"
    );
}

#[test]
fn resets_are_withheld_where_the_nic_strips_vlan_tags() {
    let pair = Pair::new(&[UNLISTED4.into()]);
    let _smtp = Listener::start(&pair.server, 25);
    set_vlan_offload(&pair.server, &pair.server_if, true);
    let _peer = pair.client_xdp_peer();
    let config = format!(
        "interfaces = [\"{}\"]\naction = \"reject\"\n[[allow]]\nname = \"provider\"\nprefixes = [\"192.0.2.0/28\"]\n",
        pair.server_if
    );
    let mut daemon = Daemon::start(&pair.server, &config);
    let attempt = || {
        connect(
            &pair.client,
            UNLISTED4.into(),
            sock(SERVER_V4, 25),
            Duration::from_millis(700),
        )
        .0
    };
    assert_eq!(
        attempt(),
        Outcome::TimedOut,
        "dropped: a reset could leave without its tag"
    );
    let stats = daemon.stats();
    assert_eq!(stats["interfaces"][0]["resets_withheld"], true, "{stats}");
    assert!(
        stats["resets_withheld"].as_u64().unwrap_or(0) >= 1,
        "{stats}"
    );
    assert!(
        daemon.log().contains("strips VLAN tags"),
        "{}",
        daemon.log()
    );

    // With the offload off, a reload puts resets back.
    set_vlan_offload(&pair.server, &pair.server_if, false);
    daemon.reload(&config);
    assert_eq!(attempt(), Outcome::Refused, "reset from XDP");
    assert_eq!(daemon.stats()["interfaces"][0]["resets_withheld"], false);
}

fn plain_config(interfaces: &str) -> String {
    format!(
        "interfaces = [{interfaces}]\n[[allow]]\nname = \"provider\"\nprefixes = [\"192.0.2.0/28\"]\n"
    )
}

fn unlisted_attempt(pair: &Pair) -> Outcome {
    connect(
        &pair.client,
        UNLISTED4.into(),
        sock(SERVER_V4, 25),
        Duration::from_millis(700),
    )
    .0
}

#[test]
fn an_interface_recreated_while_the_daemon_runs_is_filtered_again() {
    let pair = Pair::new(&[UNLISTED4.into()]);
    let _smtp = Listener::start(&pair.server, 25);
    let daemon = Daemon::start(
        &pair.server,
        &plain_config(&format!("\"{}\"", pair.server_if)),
    );
    assert_eq!(unlisted_attempt(&pair), Outcome::TimedOut);
    // A driver reload, a PPP reconnect: the interface comes back with a new index and no
    // program.
    pair.recreate_link();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !pair.server.has_xdp(&pair.server_if) {
        assert!(
            std::time::Instant::now() < deadline,
            "the re-created interface was not filtered again within 15 s:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(unlisted_attempt(&pair), Outcome::TimedOut, "filtered again");
    assert!(
        daemon.log().contains("re-created or renamed"),
        "{}",
        daemon.log()
    );
}

#[test]
fn a_dead_pinned_link_does_not_keep_a_boot_open() {
    let pair = Pair::new(&[UNLISTED4.into()]);
    let _smtp = Listener::start(&pair.server, 25);
    let mut daemon = Daemon::start(
        &pair.server,
        &plain_config(&format!("\"{}\"", pair.server_if)),
    );
    assert!(daemon.stop().success());
    // The pinned link goes defunct with its interface; a start that then fails (a name that
    // never resolved) must still have closed the new interface at once.
    pair.recreate_link();
    assert_eq!(
        unlisted_attempt(&pair),
        Outcome::Connected,
        "nothing filters it now"
    );
    let _silent = pair
        .server
        .run(|| std::net::UdpSocket::bind("127.0.0.1:5300").expect("bind the silent resolver"));
    std::fs::write(
        &daemon.config_path,
        format!(
            "interfaces = [\"{}\"]\n[dns]\nresolver = \"127.0.0.1:5300\"\ntimeout_secs = 1\n[[allow]]\nname = \"provider\"\nprefixes = [\"192.0.2.0/28\"]\nhosts = [\"relay.provider.test\"]\n",
            pair.server_if
        ),
    )
    .expect("config");
    let status = daemon.start_expecting_exit(&pair.server, Duration::from_secs(60));
    assert!(!status.success(), "{}", daemon.log());
    assert!(
        daemon
            .log()
            .contains("does not filter it: its interface went away"),
        "{}",
        daemon.log()
    );
    assert_eq!(
        unlisted_attempt(&pair),
        Outcome::TimedOut,
        "closed by the boot filter, which stays after the failed start"
    );
}

#[test]
fn a_renamed_interface_is_not_mistaken_for_the_configured_one() {
    let pair = Pair::new(&[UNLISTED4.into()]);
    let mut daemon = Daemon::start(
        &pair.server,
        &plain_config(&format!("\"{}\"", pair.server_if)),
    );
    assert!(daemon.stop().success());
    // The configured name now belongs to another device; the old one runs under a new name.
    let old = format!("{}o", &pair.server_if[..pair.server_if.len().min(14)]);
    let ip = smtpguard_tests::netns::ip;
    ip(&[
        "-n",
        &pair.server.name,
        "link",
        "set",
        &pair.server_if,
        "down",
    ]);
    ip(&[
        "-n",
        &pair.server.name,
        "link",
        "set",
        &pair.server_if,
        "name",
        &old,
    ]);
    ip(&[
        "-n",
        &pair.server.name,
        "link",
        "add",
        &pair.server_if,
        "type",
        "veth",
        "peer",
        "name",
        "sgpeer0",
    ]);
    ip(&[
        "-n",
        &pair.server.name,
        "link",
        "set",
        &pair.server_if,
        "up",
    ]);
    ip(&["-n", &pair.server.name, "link", "set", "sgpeer0", "up"]);
    assert!(
        pair.server.has_xdp(&old),
        "the old link runs on the renamed device"
    );
    daemon.restart(&pair.server, daemon.generation());
    assert!(
        pair.server.has_xdp(&pair.server_if),
        "the device now named {} is filtered:\n{}",
        pair.server_if,
        daemon.log()
    );
    assert!(
        !pair.server.has_xdp(&old),
        "the renamed device, no longer configured, is left alone"
    );
}

#[test]
fn a_missing_interface_is_waited_for_while_the_others_are_filtered() {
    let pair = Pair::new(&[UNLISTED4.into()]);
    let _smtp = Listener::start(&pair.server, 25);
    let later = format!("sgw{}", unique_tag().replace('-', ""));
    let mut daemon = Daemon::start(
        &pair.server,
        &plain_config(&format!("\"{}\", \"{later}\"", pair.server_if)),
    );
    assert_eq!(
        unlisted_attempt(&pair),
        Outcome::TimedOut,
        "the present one is filtered"
    );
    assert!(
        daemon.cli(&["stats"]).contains(&format!(
            "WAITING for interfaces that do not exist yet: {later}"
        )),
        "{}",
        daemon.cli(&["stats"])
    );
    // It appears; a reload (or the next 10 s check) attaches it.
    let ip = smtpguard_tests::netns::ip;
    ip(&[
        "-n",
        &pair.server.name,
        "link",
        "add",
        &later,
        "type",
        "veth",
        "peer",
        "name",
        "sgpeer1",
    ]);
    ip(&["-n", &pair.server.name, "link", "set", &later, "up"]);
    ip(&["-n", &pair.server.name, "link", "set", "sgpeer1", "up"]);
    let text = std::fs::read_to_string(&daemon.config_path).expect("config");
    daemon.reload(&text);
    assert!(pair.server.has_xdp(&later), "{}", daemon.log());
    assert!(
        daemon.state().expect("state")["waiting"]
            .as_array()
            .is_some_and(Vec::is_empty)
    );
}
