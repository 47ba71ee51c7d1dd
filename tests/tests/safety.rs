//! Automatic inputs fail closed, against a real DNS server (dnsmasq) and real TCP: an SPF
//! record of 0.0.0.0/0 opens nothing (`check`, `explain`, a running daemon's refresh); a
//! refresh that grows a name 16x waits for SIGHUP; a host rebooted with DNS down starts
//! from its last-good store and enforces; and the daemon works in the file-system view of
//! the shipped systemd unit.

use std::{
    net::{IpAddr, Ipv4Addr},
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use smtpguard_tests::{
    daemon::{Daemon, Launcher, binary, sandbox, unit_writable_paths},
    dns::{DnsServer, RESOLVER, Zone},
    netns::{Listener, Netns, Outcome, Pair, SERVER_V4, connect, ip, sock, unique_tag},
    prometheus::http_get,
};

/// Inside the provider's SPF range 192.0.2.32/28.
const PROVIDER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 40);
const RELAY_OLD: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const RELAY_NEW: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
/// Inside the list file's 198.51.100.64/26.
const LISTED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 77);
const UNLISTED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const LISTEN: &str = "127.0.0.1:9725";
const BLOCKED_WAIT: Duration = Duration::from_millis(700);
const WAIT: Duration = Duration::from_secs(20);

fn attempt(pair: &Pair, src: Ipv4Addr) -> Outcome {
    connect(
        &pair.client,
        IpAddr::V4(src),
        sock(SERVER_V4, 25),
        BLOCKED_WAIT,
    )
    .0
}

fn config(interface: &str, allow: &str) -> String {
    format!(
        "interfaces = [\"{interface}\"]\n\n[metrics]\nlisten = \"{LISTEN}\"\n\n[dns]\nresolver = \"{RESOLVER}\"\nmin_refresh_secs = 1\nmax_refresh_secs = 60\ntimeout_secs = 1\n\n[[allow]]\nname = \"provider\"\n{allow}\n"
    )
}

fn spf(domain: &str, record: &str) -> (String, String) {
    (domain.to_owned(), record.to_owned())
}

fn relay(address: Ipv4Addr) -> (String, String) {
    (address.to_string(), "relay.provider.test".to_owned())
}

/// `smtpguard ARGS` inside `netns` (where the test resolver is), for an instance with no
/// store: its success, stdout and stderr.
fn cli_in(netns: &Netns, args: &[&str]) -> (bool, String, String) {
    let output = Command::new("nsenter")
        .arg(format!("--net={}", netns.path()))
        .arg(binary())
        .args(["--instance", &format!("sg-{}", unique_tag())])
        .args(args)
        .output()
        .expect("run smtpguard");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The value of one series (`name{labels}`) on the daemon's metrics endpoint.
fn metric(netns: &Netns, series: &str) -> Option<f64> {
    let (status, text) = http_get(netns, LISTEN, "/metrics").expect("scrape");
    assert_eq!(status, 200, "{text}");
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// Waits until `series` has `value`.
fn wait_for_metric(netns: &Netns, series: &str, value: f64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = metric(netns, series);
        if now == Some(value) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "expected {series} {value}, got {now:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `sources` the daemon's `stats --json` reports, as `(source, status)`.
fn stale_sources(daemon: &Daemon) -> Vec<(String, String)> {
    let stats = daemon.stats();
    stats["sources"]
        .as_array()
        .unwrap_or_else(|| panic!("no sources in stats: {stats}"))
        .iter()
        .map(|note| {
            (
                note["source"].as_str().unwrap_or_default().to_owned(),
                note["status"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn spf_zone() -> Zone {
    Zone {
        txt: vec![
            spf("provider.test", "v=spf1 ip4:192.0.2.32/28 -all"),
            spf("everything.test", "v=spf1 ip4:0.0.0.0/0 -all"),
            spf("mixed.test", "v=spf1 ip4:0.0.0.0/0 ip4:192.0.2.32/28 -all"),
        ],
        ..Zone::default()
    }
}

#[test]
fn check_and_explain_refuse_an_spf_record_of_every_address() {
    let netns = Netns::new(format!("sg-{}", unique_tag()));
    let _dns = DnsServer::start(&netns, &spf_zone());
    let dir = std::env::temp_dir().join(format!("sg-check-{}", unique_tag()));
    std::fs::create_dir_all(&dir).expect("dir");

    // `check` refuses a record that allows nothing but everything...
    let everything = dir.join("everything.toml");
    std::fs::write(&everything, config("eth0", "spf = [\"everything.test\"]")).expect("config");
    let (ok, out, err) = cli_in(
        &netns,
        &["check", "--config", &everything.display().to_string()],
    );
    assert!(
        !ok,
        "check must refuse an SPF record of 0.0.0.0/0, but printed:\n{out}{err}"
    );
    assert!(
        err.contains("SPF of everything.test gave no prefix the allow list may take: 0.0.0.0/0 refused by the floor"),
        "{err}"
    );

    // ...leaves 0.0.0.0/0 out of a record with more in it, saying so, and `explain` agrees.
    let mixed = dir.join("mixed.toml");
    std::fs::write(&mixed, config("eth0", "spf = [\"mixed.test\"]")).expect("config");
    let mixed = mixed.display().to_string();
    let (ok, out, err) = cli_in(
        &netns,
        &["explain", &UNLISTED.to_string(), "--config", &mixed],
    );
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("match: none: 203.0.113.7 is unlisted") && out.contains("verdict: DROP"),
        "explain must not call an unlisted source allowed:\n{out}"
    );
    assert!(
        err.contains("0.0.0.0/0 from SPF of mixed.test refused"),
        "{err}"
    );
    let (ok, out, err) = cli_in(&netns, &["check", "--config", &mixed]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("192.0.2.32/28") && !out.contains("0.0.0.0/0"),
        "the policy must not hold 0.0.0.0/0:\n{out}"
    );
    assert!(
        err.contains("warning: ")
            && err.contains("0.0.0.0/0 from SPF of mixed.test refused for allow rule \"provider\": shorter than /12"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_running_daemon_keeps_an_unlisted_source_out_when_spf_becomes_every_address() {
    let pair = Pair::new(&[PROVIDER.into(), UNLISTED.into()]);
    let _smtp = Listener::start(&pair.server, 25);
    let mut zone = spf_zone();
    let mut dns = DnsServer::start(&pair.server, &zone);
    let text = config(&pair.server_if, "spf = [\"provider.test\"]");
    let daemon = Daemon::start(&pair.server, &text);
    assert_eq!(attempt(&pair, PROVIDER), Outcome::Connected, "provider");
    assert_eq!(attempt(&pair, UNLISTED), Outcome::TimedOut, "unlisted");

    // The provider's record turns into 0.0.0.0/0: at the next TTL refresh it is refused
    // and the last good answer stays.
    let generation = daemon.generation();
    zone.txt[0] = spf("provider.test", "v=spf1 ip4:0.0.0.0/0 -all");
    dns.serve(&pair.server, &zone);
    let deadline = Instant::now() + WAIT;
    while !daemon.log().contains("refused by the floor") && daemon.generation() == generation {
        assert!(
            Instant::now() < deadline,
            "no refresh of the changed record:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        attempt(&pair, UNLISTED),
        Outcome::TimedOut,
        "an unlisted source must stay out after the record became 0.0.0.0/0:\n{}",
        daemon.log()
    );
    assert_eq!(
        attempt(&pair, PROVIDER),
        Outcome::Connected,
        "the provider keeps its last good range"
    );
    assert_eq!(daemon.generation(), generation, "nothing was applied");
    wait_for_metric(
        &pair.server,
        "smtpguard_dns_stale{name=\"SPF of provider.test\"}",
        1.0,
    );
    let refused = metric(
        &pair.server,
        "smtpguard_prefixes_refused_total{rule=\"provider\",reason=\"floor\"}",
    );
    assert!(refused >= Some(1.0), "refusals counted: {refused:?}");
}

/// Addresses for the growth test, outside the documentation ranges the pair's link has.
const GROWN_OLD: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const GROWN_NEW: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 5);

#[test]
fn a_refresh_that_grows_a_name_16_times_waits_for_sighup() {
    let pair = Pair::new(&[GROWN_OLD.into(), GROWN_NEW.into(), UNLISTED.into()]);
    ip(&[
        "-n",
        &pair.server.name,
        "addr",
        "add",
        "198.18.0.1/16",
        "dev",
        &pair.server_if,
    ]);
    let _smtp = Listener::start(&pair.server, 25);
    let mut zone = Zone {
        txt: vec![spf("provider.test", "v=spf1 ip4:198.18.0.0/24 -all")],
        ..Zone::default()
    };
    let mut dns = DnsServer::start(&pair.server, &zone);
    let text = config(&pair.server_if, "spf = [\"provider.test\"]");
    let mut daemon = Daemon::start(&pair.server, &text);
    assert_eq!(attempt(&pair, GROWN_OLD), Outcome::Connected);
    assert_eq!(attempt(&pair, GROWN_NEW), Outcome::TimedOut);
    let held = "smtpguard_dns_held_back{name=\"SPF of provider.test\"}";

    // A /24 becomes a /20: 16 times the addresses, past max_growth = 4.
    let generation = daemon.generation();
    zone.txt[0] = spf("provider.test", "v=spf1 ip4:198.18.0.0/20 -all");
    dns.serve(&pair.server, &zone);
    let deadline = Instant::now() + WAIT;
    while !daemon.log().contains("new answer held back") {
        assert!(
            Instant::now() < deadline && daemon.generation() == generation,
            "the grown answer must be held back, not applied:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = daemon.log();
    assert!(
        log.contains("SPF of provider.test: new answer held back: it covers 4096 (a /20) IPv4 addresses, up from 256 (a /24)")
            && log.contains("systemctl reload smtpguard"),
        "{log}"
    );
    wait_for_metric(&pair.server, held, 1.0);
    assert_eq!(metric(&pair.server, held), Some(1.0));
    assert_eq!(
        stale_sources(&daemon),
        [("SPF of provider.test".to_owned(), "held_back".to_owned())]
    );
    assert_eq!(
        attempt(&pair, GROWN_NEW),
        Outcome::TimedOut,
        "held back: the /20 is not in force"
    );
    assert_eq!(attempt(&pair, GROWN_OLD), Outcome::Connected);
    assert_eq!(daemon.generation(), generation);

    // An explicit reload accepts it.
    daemon.reload(&text);
    assert_eq!(
        attempt(&pair, GROWN_NEW),
        Outcome::Connected,
        "accepted by SIGHUP"
    );
    wait_for_metric(&pair.server, held, 0.0);
    // Later refreshes measure against the answer now in force: nothing held back again.
    let refreshes = daemon.log().matches("new answer held back").count();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        daemon.log().matches("new answer held back").count(),
        refreshes
    );
    assert_eq!(metric(&pair.server, held), Some(0.0));
    assert!(stale_sources(&daemon).is_empty());
}

#[test]
fn a_host_rebooted_with_dns_down_starts_from_its_store_and_enforces() {
    let pair = Pair::new(&[
        RELAY_OLD.into(),
        RELAY_NEW.into(),
        LISTED.into(),
        UNLISTED.into(),
    ]);
    let _smtp = Listener::start(&pair.server, 25);
    let mut zone = Zone {
        addresses: vec![relay(RELAY_OLD)],
        ..Zone::default()
    };
    let mut dns = DnsServer::start(&pair.server, &zone);
    let lists = std::env::temp_dir().join(format!("sg-lists-{}", unique_tag()));
    std::fs::create_dir_all(&lists).expect("list dir");
    let list = lists.join("provider.txt");
    std::fs::write(&list, "# provider's other relays\n198.51.100.64/26\n").expect("list");
    let text = config(
        &pair.server_if,
        &format!(
            "hosts = [\"relay.provider.test\"]\nfiles = [\"{}\"]",
            list.display()
        ),
    );
    let mut daemon = Daemon::start(&pair.server, &text);
    for (src, want) in [
        (RELAY_OLD, Outcome::Connected),
        (LISTED, Outcome::Connected),
        (UNLISTED, Outcome::TimedOut),
    ] {
        assert_eq!(attempt(&pair, src), want, "{src} before the reboot");
    }
    // The store is written just after the state file: let it be, before the power goes.
    // (What it holds is checked by the restart below.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while !daemon.state_dir().join("store.json").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }

    // A reboot: the daemon stops, the filter and everything under /run are gone; DNS is
    // down and the list file is missing when the daemon comes back.
    assert!(daemon.stop().success());
    daemon.cli(&["detach"]);
    std::fs::remove_dir_all(Path::new("/run/smtpguard").join(&daemon.instance))
        .expect("remove the run directory");
    dns.kill();
    std::fs::rename(&list, lists.join("elsewhere.txt")).expect("move the list");
    daemon.restart(&pair.server, 0);
    for (src, want) in [
        (RELAY_OLD, Outcome::Connected),
        (LISTED, Outcome::Connected),
        (UNLISTED, Outcome::TimedOut),
    ] {
        assert_eq!(
            attempt(&pair, src),
            want,
            "{src} after the reboot, from the store"
        );
    }
    let log = daemon.log();
    assert!(
        log.contains("cannot refresh host relay.provider.test")
            && log.contains("(stale: resolved ")
            && log.contains(&format!("cannot read {}", list.display())),
        "{log}"
    );
    let mut sources = stale_sources(&daemon);
    sources.sort();
    assert_eq!(
        sources,
        [
            (format!("file {}", list.display()), "stale".to_owned()),
            ("host relay.provider.test".to_owned(), "stale".to_owned()),
        ]
    );
    wait_for_metric(
        &pair.server,
        "smtpguard_dns_stale{name=\"host relay.provider.test\"}",
        1.0,
    );
    wait_for_metric(
        &pair.server,
        &format!("smtpguard_file_stale{{path=\"{}\"}}", list.display()),
        1.0,
    );

    // DNS comes back, with a new address: picked up at the next refresh.
    zone.addresses = vec![relay(RELAY_NEW)];
    dns.serve(&pair.server, &zone);
    daemon.wait_for_generation(2, WAIT);
    assert_eq!(attempt(&pair, RELAY_NEW), Outcome::Connected, "new address");
    assert_eq!(attempt(&pair, RELAY_OLD), Outcome::TimedOut, "old address");
    wait_for_metric(
        &pair.server,
        "smtpguard_dns_stale{name=\"host relay.provider.test\"}",
        0.0,
    );
    assert_eq!(
        stale_sources(&daemon),
        [(format!("file {}", list.display()), "stale".to_owned())]
    );
    let _ = std::fs::remove_dir_all(&lists);
}

/// The daemon's `store.json`, once it has written one (just after its state file).
fn wait_for_store(daemon: &Daemon) -> String {
    let path = daemon.state_dir().join("store.json");
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(text) = std::fs::read_to_string(&path) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no store in {}:\n{}",
            path.display(),
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn the_daemon_works_in_the_units_file_system_view() {
    // The sandbox is what the unit says, and it holds: / is read-only, the unit's
    // directories are not.
    let writable = unit_writable_paths();
    for path in ["/sys/fs/bpf", "/run/smtpguard", "/var/lib/smtpguard"] {
        assert!(
            writable.iter().any(|writable| writable == Path::new(path)),
            "the unit must make {path} writable: {writable:?}"
        );
    }
    let probe = |path: &str| {
        let mut command = Command::new("sh");
        command.args(["-c", &format!("touch {path} && rm {path}")]);
        sandbox(&mut command);
        command.output().expect("run sh in the sandbox")
    };
    let output = probe("/etc/sg-sandbox-probe");
    assert!(
        !output.status.success()
            && String::from_utf8_lossy(&output.stderr).contains("Read-only file system"),
        "/etc must be read-only in the sandbox: {output:?}"
    );
    let output = probe("/var/lib/smtpguard/.sg-sandbox-probe");
    assert!(output.status.success(), "{output:?}");

    let pair = Pair::new(&[RELAY_OLD.into(), LISTED.into(), UNLISTED.into()]);
    let _smtp = Listener::start(&pair.server, 25);
    let _dns = DnsServer::start(
        &pair.server,
        &Zone {
            addresses: vec![relay(RELAY_OLD)],
            ..Zone::default()
        },
    );
    let lists = std::env::temp_dir().join(format!("sg-lists-{}", unique_tag()));
    std::fs::create_dir_all(&lists).expect("list dir");
    let list = lists.join("provider.txt");
    std::fs::write(&list, "198.51.100.128/26\n").expect("list");
    let text = config(
        &pair.server_if,
        &format!(
            "hosts = [\"relay.provider.test\"]\nfiles = [\"{}\"]",
            list.display()
        ),
    );
    let mut daemon = Daemon::start_with(&pair.server, &text, Launcher::UnitSandbox);
    for (src, want) in [
        (RELAY_OLD, Outcome::Connected),
        (LISTED, Outcome::TimedOut),
        (UNLISTED, Outcome::TimedOut),
    ] {
        assert_eq!(attempt(&pair, src), want, "{src} in the sandbox");
    }

    // The store is written, with the modes it promises.
    let dir = daemon.state_dir();
    let manifest = dir.join("store.json");
    let store = wait_for_store(&daemon);
    assert!(store.contains("relay.provider.test"), "{store}");
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&manifest), 0o600);

    // A reload reads the changed list, applies it, and records it.
    std::fs::write(&list, "198.51.100.64/26\n").expect("list");
    daemon.reload(&text);
    assert_eq!(attempt(&pair, LISTED), Outcome::Connected, "after SIGHUP");
    // Recorded just after the state file that says the reload is done.
    let copies = || -> Vec<String> {
        std::fs::read_dir(dir.join("lists"))
            .expect("stored lists")
            .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path()).ok())
            .collect()
    };
    let deadline = Instant::now() + WAIT;
    while copies() != ["198.51.100.64/26\n"] {
        assert!(
            Instant::now() < deadline,
            "the store should hold the reloaded list alone: {:?}",
            copies()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = daemon.log();
    assert!(
        !log.contains("last-good store") && !log.contains("Read-only file system"),
        "the sandbox refused the daemon something:\n{log}"
    );
    let _ = std::fs::remove_dir_all(&lists);
}
