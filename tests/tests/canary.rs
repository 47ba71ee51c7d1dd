//! A canary for a policy change, end to end: the real daemon, real TCP connects from a client
//! namespace. The running policy allows the provider and an office (IPv4 and IPv6) on port
//! 25; the candidate drops the office, adds a new provider range and guards port 2525 too.
//! While the canary runs every verdict stays the running policy's, and `report --canary`
//! names each source whose verdict would change with the rule on each side; a reload keeps
//! the canary going; `try --commit` makes the candidate the configuration and enforces it;
//! `--abort` and `--for` end a canary; a candidate the daemon cannot apply is not committed
//! and leaves the configuration file as it was.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
    time::{Duration, Instant},
};

use smtpguard_tests::{
    daemon::{Daemon, binary},
    frames,
    kernel::stay_on_one_cpu,
    netns::{
        Listener, Outcome, PacketSocket, Pair, SERVER_V4, SERVER_V6, connect, sock, unique_tag,
    },
    prometheus::http_get,
};

const PROVIDER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const ABUSER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 9);
const OFFICE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 50);
const OFFICE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 5);
const NEW_RELAY: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const SPAMMER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 77);

/// Long enough for a handshake, short of the first SYN retransmission (one SYN per connect).
const WAIT: Duration = Duration::from_millis(700);
const LISTEN: &str = "127.0.0.1:9731";

fn running(interface: &str) -> String {
    format!(
        r#"interfaces = ["{interface}"]
ports = [25]

[metrics]
listen = "{LISTEN}"

[[allow]]
name = "provider"
prefixes = ["192.0.2.0/28"]

[[allow]]
name = "office"
prefixes = ["198.51.100.48/28", "2001:db8:200::/112"]

[[deny]]
name = "abuser"
prefixes = ["192.0.2.9"]
"#
    )
}

fn candidate(interface: &str) -> String {
    format!(
        r#"interfaces = ["{interface}"]
ports = [25, 2525]

[metrics]
listen = "{LISTEN}"

[[allow]]
name = "provider"
prefixes = ["192.0.2.0/28"]

[[allow]]
name = "provider-new"
prefixes = ["203.0.113.0/28"]

[[deny]]
name = "abuser"
prefixes = ["192.0.2.9"]
"#
    )
}

/// `smtpguard --instance I ARGS`, expected to fail: its standard error.
fn cli_fails(daemon: &Daemon, args: &[&str]) -> String {
    let output = Command::new(binary())
        .args(["--instance", &daemon.instance])
        .args(args)
        .output()
        .expect("run smtpguard");
    assert!(
        !output.status.success(),
        "smtpguard {args:?} should fail: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn canary_report(daemon: &Daemon) -> serde_json::Value {
    let text = daemon.cli(&["report", "--canary", "--top", "0", "--json"]);
    serde_json::from_str(&text).unwrap_or_else(|error| panic!("not JSON ({error}): {text}"))
}

/// The report's row for `source`.
fn row(report: &serde_json::Value, source: IpAddr) -> Option<&serde_json::Value> {
    report["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .find(|row| row["source"] == source.to_string())
}

#[test]
fn a_candidate_is_compared_on_live_traffic_without_changing_a_verdict_then_committed() {
    let clients: Vec<IpAddr> = vec![
        PROVIDER.into(),
        ABUSER.into(),
        OFFICE.into(),
        OFFICE6.into(),
        NEW_RELAY.into(),
        SPAMMER.into(),
    ];
    let pair = Pair::new(&clients);
    let smtp = Listener::start(&pair.server, 25);
    let _alt = Listener::start(&pair.server, 2525);
    let mut daemon = Daemon::start(&pair.server, &running(&pair.server_if));
    // The candidate lives elsewhere, as an admin's draft would.
    let drafts = std::env::temp_dir().join(format!("sg-canary-{}", unique_tag()));
    std::fs::create_dir_all(&drafts).unwrap();
    let draft = drafts.join("candidate.toml");
    std::fs::write(&draft, candidate(&pair.server_if)).unwrap();
    let draft_arg = draft.to_str().unwrap();

    // Nothing to report before a canary.
    let error = cli_fails(&daemon, &["report", "--canary"]);
    assert!(error.contains("no canary"), "{error}");
    let error = cli_fails(&daemon, &["try", "--commit"]);
    assert!(error.contains("no canary runs"), "{error}");

    let started = daemon.cli(&["try", "--config", draft_arg]);
    assert!(started.contains("canary started"), "{started}");
    assert!(started.contains("2 allow and 1 deny prefixes"), "{started}");
    let error = cli_fails(&daemon, &["try", "--config", draft_arg]);
    assert!(error.contains("a canary already runs"), "{error}");

    use Outcome::{Connected, TimedOut};
    let v4 = |port| sock(SERVER_V4, port);
    let cases = [
        (IpAddr::from(PROVIDER), v4(25), Connected, "provider: alike"),
        (ABUSER.into(), v4(25), TimedOut, "abuser: alike"),
        (SPAMMER.into(), v4(25), TimedOut, "spammer on 25: alike"),
        (
            OFFICE.into(),
            v4(25),
            Connected,
            "office: still in, the candidate would block it",
        ),
        (
            OFFICE6.into(),
            sock(SERVER_V6, 25),
            Connected,
            "IPv6 office: still in",
        ),
        (
            NEW_RELAY.into(),
            v4(25),
            TimedOut,
            "new relay: still out, the candidate would let it in",
        ),
        (
            SPAMMER.into(),
            v4(2525),
            Connected,
            "port 2525: not guarded now, the candidate guards it",
        ),
    ];
    for (src, dst, want, what) in &cases {
        let (got, _) = connect(&pair.client, *src, *dst, WAIT);
        assert_eq!(&got, want, "{what}: {src} -> {dst}\n{}", daemon.log());
    }

    let report = canary_report(&daemon);
    assert_eq!(report["state"], "running", "{report:#}");
    assert_eq!(report["sources"], 4, "{report:#}");
    assert_eq!(report["newly_blocked"], 3, "{report:#}");
    assert_eq!(report["newly_allowed"], 1, "{report:#}");
    for unchanged in [PROVIDER, ABUSER] {
        assert!(row(&report, unchanged.into()).is_none(), "{report:#}");
    }
    let office = row(&report, OFFICE.into()).expect("office row");
    assert_eq!(office["newly_blocked"], 1, "{report:#}");
    assert_eq!(office["running"], "allow \"office\" (198.51.100.48/28)");
    assert_eq!(office["candidate"], "unlisted");
    let office6 = row(&report, OFFICE6.into()).expect("IPv6 office row");
    assert_eq!(office6["running"], "allow \"office\" (2001:db8:200::/112)");
    let relay = row(&report, NEW_RELAY.into()).expect("relay row");
    assert_eq!(relay["newly_allowed"], 1, "{report:#}");
    assert_eq!(relay["running"], "unlisted");
    assert_eq!(
        relay["candidate"],
        "allow \"provider-new\" (203.0.113.0/28)"
    );
    let spammer = row(&report, SPAMMER.into()).expect("spammer row");
    assert_eq!(spammer["running"], "not guarded");
    assert_eq!(spammer["candidate"], "unlisted");
    let text = daemon.cli(&["report", "--canary"]);
    eprintln!("{text}");
    assert!(text.contains("newly blocked"), "{text}");

    // The metrics say a canary runs, and what it found.
    let (_, scrape) = http_get(&pair.server, LISTEN, "/metrics").expect("scrape");
    for line in [
        "smtpguard_canary_active 1",
        "smtpguard_canary_syn_total{change=\"newly_blocked\"} 3",
        "smtpguard_canary_syn_total{change=\"newly_allowed\"} 1",
    ] {
        assert!(scrape.contains(line), "missing {line:?} in:\n{scrape}");
    }

    // A reload rewrites the standby slot, where the candidate is: it is put back, and the
    // sightings so far stay.
    let mut reloaded = running(&pair.server_if);
    reloaded.push_str("\n[[deny]]\nname = \"more\"\nprefixes = [\"192.0.2.14\"]\n");
    daemon.reload(&reloaded);
    daemon.wait_for_log("goes on beside generation 2", 1, Duration::from_secs(10));
    let (got, _) = connect(&pair.client, OFFICE.into(), v4(25), WAIT);
    assert_eq!(got, Connected);
    let report = canary_report(&daemon);
    let office = row(&report, OFFICE.into()).expect("office row");
    assert_eq!(office["newly_blocked"], 2, "{report:#}");

    // Commit: the candidate becomes the configuration and is enforced.
    let committed = daemon.cli(&["try", "--commit"]);
    assert!(committed.contains("committed"), "{committed}");
    assert_eq!(
        std::fs::read_to_string(&daemon.config_path).unwrap(),
        candidate(&pair.server_if)
    );
    let previous = daemon.config_path.with_file_name("smtpguard.toml.prev");
    assert_eq!(std::fs::read_to_string(&previous).unwrap(), reloaded);
    for (src, dst, want, what) in [
        (IpAddr::from(PROVIDER), v4(25), Connected, "provider"),
        (OFFICE.into(), v4(25), TimedOut, "office, no longer allowed"),
        (
            NEW_RELAY.into(),
            v4(25),
            Connected,
            "the new provider range",
        ),
        (SPAMMER.into(), v4(2525), TimedOut, "port 2525 is guarded"),
    ] {
        let (got, _) = connect(&pair.client, src, dst, WAIT);
        assert_eq!(
            got,
            want,
            "after the commit, {what}: {src}\n{}",
            daemon.log()
        );
    }
    let report = canary_report(&daemon);
    assert_eq!(report["state"], "committed", "{report:#}");
    // Ended canaries count nothing more.
    assert_eq!(report["newly_blocked"], 4, "{report:#}");
    let (_, scrape) = http_get(&pair.server, LISTEN, "/metrics").expect("scrape");
    assert!(scrape.contains("smtpguard_canary_active 0"), "{scrape}");

    // A candidate the running daemon cannot apply (another XDP mode needs a restart) is
    // not committed: the configuration file is put back and the canary goes on.
    let needs_restart = drafts.join("skb.toml");
    std::fs::write(
        &needs_restart,
        format!("xdp_mode = \"skb\"\n{}", candidate(&pair.server_if)),
    )
    .unwrap();
    let started = daemon.cli(&["try", "--config", needs_restart.to_str().unwrap()]);
    assert!(started.contains("xdp_mode"), "{started}");
    let error = cli_fails(&daemon, &["try", "--commit"]);
    assert!(
        error.contains("not applied") && error.contains("restart"),
        "{error}"
    );
    assert_eq!(
        std::fs::read_to_string(&daemon.config_path).unwrap(),
        candidate(&pair.server_if),
        "a refused commit puts the configuration back"
    );
    assert_eq!(canary_report(&daemon)["state"], "running");
    let aborted = daemon.cli(&["try", "--abort"]);
    assert!(aborted.contains("aborted"), "{aborted}");
    let (got, _) = connect(&pair.client, OFFICE.into(), v4(25), WAIT);
    assert_eq!(got, TimedOut, "the aborted candidate decided nothing");
    assert_eq!(canary_report(&daemon)["state"], "aborted");

    // A canary for a while ends by itself.
    daemon.cli(&["try", "--config", draft_arg, "--for", "2s"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while canary_report(&daemon)["state"] == "running" {
        assert!(Instant::now() < deadline, "the canary did not expire");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(canary_report(&daemon)["state"], "expired");

    // A candidate that only audits would let in what is stopped now: that is what it shows.
    let audit = drafts.join("audit.toml");
    std::fs::write(
        &audit,
        format!("mode = \"audit\"\n{}", candidate(&pair.server_if)),
    )
    .unwrap();
    daemon.cli(&["try", "--config", audit.to_str().unwrap()]);
    let (got, _) = connect(&pair.client, SPAMMER.into(), v4(25), WAIT);
    assert_eq!(got, TimedOut, "the audit candidate decided nothing");
    let report = canary_report(&daemon);
    let spammer = row(&report, SPAMMER.into()).expect("spammer row");
    assert_eq!(spammer["newly_allowed"], 1, "{report:#}");
    daemon.cli(&["try", "--abort"]);

    // A canary cannot be set to outlive any sensible review.
    let error = cli_fails(&daemon, &["try", "--config", draft_arg, "--for", "1000d"]);
    assert!(error.contains("at most 90 days"), "{error}");

    // A candidate that does not validate is refused with its file and line.
    let broken = drafts.join("broken.toml");
    std::fs::write(
        &broken,
        "interfaces = [\"x\"]\n[[allow]]\nname = \"p\"\nprefixes = [\"192.0.2.300\"]\n",
    )
    .unwrap();
    let error = cli_fails(&daemon, &["try", "--config", broken.to_str().unwrap()]);
    assert!(
        error.contains("broken.toml") && error.contains("192.0.2.300"),
        "{error}"
    );

    assert_eq!(
        smtp.accepted_settled(6),
        6,
        "accepted on 25: {:?}",
        smtp.peers()
    );
    drop(daemon);
    let _ = std::fs::remove_dir_all(&drafts);
}

/// A spoofed flood of new sources while a canary runs: the counts stay exact, the table of
/// sources takes a sample beyond its per-CPU budget, and `report --canary` and `stats` say
/// how many changed SYNs came from sources it left out, so an admin reads the rows as a
/// sample and not as every source.
#[test]
fn a_flood_of_new_sources_during_a_canary_is_counted_exactly_and_sampled_in_the_report() {
    // Well past two seconds' budget on one CPU (4,096 new sources a second), so a flood that
    // straddles a second still overflows it.
    const FLOOD: u32 = 20_000;
    let pair = Pair::new(&[PROVIDER.into()]);
    let _smtp = Listener::start(&pair.server, 25);
    let provider_only = |extra: &str| {
        format!(
            "interfaces = [\"{}\"]\n\n[[allow]]\nname = \"provider\"\nprefixes = [\"192.0.2.0/28\"{extra}]\n",
            pair.server_if
        )
    };
    let daemon = Daemon::start(&pair.server, &provider_only(""));
    let drafts = std::env::temp_dir().join(format!("sg-canary-flood-{}", unique_tag()));
    std::fs::create_dir_all(&drafts).unwrap();
    let draft = drafts.join("candidate.toml");
    // The candidate lets the flood's whole range in: every flood SYN is newly allowed.
    std::fs::write(&draft, provider_only(", \"198.18.0.0/15\"")).unwrap();
    let started = daemon.cli(&["try", "--config", draft.to_str().unwrap()]);
    assert!(started.contains("canary started"), "{started}");

    let mac = pair.server_mac();
    let sent = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                stay_on_one_cpu();
                let out = PacketSocket::open(&pair.client, &pair.client_if);
                (0..FLOOD)
                    .filter(|n| {
                        let src =
                            Ipv4Addr::new(198, 18 + (n >> 16) as u8, (n >> 8) as u8, *n as u8);
                        out.try_send(&frames::segment_frame(
                            mac,
                            &[],
                            src.into(),
                            SERVER_V4.into(),
                            40000,
                            25,
                            frames::SYN,
                        ))
                    })
                    .count() as u64
            })
            .join()
            .expect("flood thread")
    });
    assert!(sent > u64::from(FLOOD) / 2, "only {sent} frames sent");

    // Every frame the packet socket took reaches the program; wait for the last of them.
    let deadline = Instant::now() + Duration::from_secs(10);
    let report = loop {
        let report = canary_report(&daemon);
        if report["newly_allowed"] == sent || Instant::now() > deadline {
            break report;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let allowed = report["newly_allowed"].as_u64().expect("newly_allowed");
    let unrecorded = report["unrecorded"].as_u64().expect("unrecorded");
    let sources = report["sources"].as_u64().expect("sources");
    assert_eq!(allowed, sent, "every flood SYN counted: {report:#}");
    assert!(unrecorded > 0, "the budget was overrun: {report:#}");
    // One SYN per source, one CPU and far fewer sources than the table's 16,384: each SYN is
    // either a row or unrecorded.
    assert_eq!(sources + unrecorded, allowed, "{report:#}");
    assert!(
        sources < allowed / 2,
        "the table holds a sample, not the flood: {report:#}"
    );

    let text = daemon.cli(&["report", "--canary"]);
    assert!(
        text.contains(&format!(
            "{unrecorded} of those SYNs came from new sources left out of the table of sources"
        )),
        "{text}"
    );
    let stats = daemon.stats();
    assert_eq!(stats["canary"]["unrecorded"], unrecorded, "{stats:#}");
    let text = daemon.cli(&["stats"]);
    assert!(
        text.contains(&format!(
            "({unrecorded} of those SYNs' sources are left out: a flood)"
        )),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&drafts);
}
