//! The fleet end to end: a real three-member etcd cluster (Debian's etcd-server) and three
//! real daemons, each guarding its own gateway namespace and following one group. A publish
//! is enforced by all three within a second (real connects: allowed, unlisted, denied); one
//! member killed changes nothing; the whole cluster gone, every daemon keeps enforcing, says
//! so in its metrics and `stats`, and a daemon restarted meanwhile enforces the policy it
//! kept; the cluster back, all catch up. Racing publishers give one revision; a tampered or
//! newer snapshot is refused with the policy unchanged; a killed daemon's report expires with
//! its lease; `fleet status` exits non-zero while the fleet is not in step.

use std::{
    net::{IpAddr, Ipv4Addr},
    process::Output,
    time::{Duration, Instant},
};

use smtpguard_tests::{
    daemon::Daemon,
    etcd::Cluster,
    netns::{Listener, Outcome, Pair, SERVER_V4, connect, sock},
    prometheus::http_get,
};

const ALLOWED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const UNLISTED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const LATER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
const METRICS: &str = "127.0.0.1:9725";
const GROUP: &str = "mx";

/// The group's policy, version by version: v2 adds a provider range, v3 denies one host.
fn central(version: u32) -> String {
    let mut text = String::from("[[allow]]\nname = \"provider\"\nprefixes = [\"192.0.2.0/28\"]\n");
    if version >= 2 {
        text.push_str("[[allow]]\nname = \"second\"\nprefixes = [\"198.51.100.0/24\"]\n");
    }
    if version >= 3 {
        text.push_str("[[deny]]\nname = \"abuser\"\nprefixes = [\"192.0.2.10\"]\n");
    }
    text
}

fn host_config(pair: &Pair, cluster: &Cluster, host: &str) -> String {
    format!(
        "interfaces = [\"{}\"]\n\n[metrics]\nlisten = \"{METRICS}\"\n\n[fleet]\netcd = {}\ngroup = \"{GROUP}\"\nhost = \"{host}\"\nreport_ttl_secs = 2\n",
        pair.server_if,
        cluster.endpoints_toml()
    )
}

struct Gateway {
    pair: Pair,
    _smtp: Listener,
    daemon: Daemon,
}

impl Gateway {
    fn start(cluster: &mut Cluster, host: &str) -> Self {
        let pair = Pair::new(&[ALLOWED.into(), UNLISTED.into(), LATER.into()]);
        cluster.join(&pair.server);
        let smtp = Listener::start(&pair.server, 25);
        let daemon = Daemon::start(&pair.server, &host_config(&pair, cluster, host));
        Self {
            pair,
            _smtp: smtp,
            daemon,
        }
    }

    fn attempt(&self, src: Ipv4Addr) -> Outcome {
        connect(
            &self.pair.client,
            IpAddr::V4(src),
            sock(SERVER_V4, 25),
            Duration::from_millis(700),
        )
        .0
    }

    /// Asserts what real connects from each source do.
    fn expect(&self, what: &str, cases: &[(Ipv4Addr, Outcome)]) {
        for (src, want) in cases {
            let got = self.attempt(*src);
            assert_eq!(
                &got,
                want,
                "{what}: a connect from {src} should give {want:?}, gave {got:?}:\n{}",
                self.daemon.log()
            );
        }
    }

    /// `fleet.json`: the group revision in force, as the daemon records it.
    fn fleet_state(&self) -> serde_json::Value {
        let path = std::path::Path::new("/run/smtpguard")
            .join(&self.daemon.instance)
            .join("fleet.json");
        std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    fn revision(&self) -> i64 {
        self.fleet_state()["revision"].as_i64().unwrap_or(0)
    }

    fn metrics(&self) -> String {
        http_get(&self.pair.server, METRICS, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    fn wait_for_metric(&self, line: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.metrics();
            if text.lines().any(|l| l == line) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "metrics did not show {line:?} within {timeout:?}:\n{text}\n{}",
                self.daemon.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Publishes version `version` of the central policy; the revision written.
fn publish(cluster: &Cluster, version: u32, extra: &[&str]) -> i64 {
    let output = publish_output(cluster, version, extra);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "publish v{version} failed: {}{}\n{}",
        text,
        String::from_utf8_lossy(&output.stderr),
        cluster.logs()
    );
    eprintln!("publish v{version}:\n{text}");
    published_revision(&text)
}

fn publish_output(cluster: &Cluster, version: u32, extra: &[&str]) -> Output {
    let dir = std::env::temp_dir().join(format!("sg-{}-central-{version}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("central dir");
    let path = dir.join(format!("central-{}.toml", extra.len()));
    std::fs::write(&path, central(version)).expect("central config");
    let endpoints = cluster.endpoints();
    let mut args = vec![
        "publish",
        "--config",
        path.to_str().expect("utf-8"),
        "--etcd",
        &endpoints,
        "--group",
        GROUP,
    ];
    args.extend_from_slice(extra);
    let output = cluster.smtpguard(&args);
    let _ = std::fs::remove_dir_all(&dir);
    output
}

fn published_revision(text: &str) -> i64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(&format!("published group \"{GROUP}\" revision "))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no revision in the publish output:\n{text}"))
}

/// Waits until every gateway has `revision` in force; how long that took.
fn wait_all(gateways: &[&Gateway], revision: i64, timeout: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if gateways
            .iter()
            .all(|gateway| gateway.revision() >= revision)
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "not every gateway applied revision {revision} within {timeout:?}: {:?}\n{}",
            gateways.iter().map(|g| g.revision()).collect::<Vec<_>>(),
            gateways
                .iter()
                .map(|g| g.daemon.log())
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn status(cluster: &Cluster) -> (i32, String) {
    let endpoints = cluster.endpoints();
    let output = cluster.smtpguard(&["fleet", "status", "--etcd", &endpoints, "--group", GROUP]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

fn wait_status(cluster: &Cluster, code: i32, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let (got, text) = status(cluster);
        if got == code && text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "fleet status did not exit {code} showing {needle:?} within {timeout:?}; it exited {got}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn three_gateways_follow_one_group_through_a_real_cluster() {
    let mut cluster = Cluster::start();
    let gateways: Vec<Gateway> = ["gw1", "gw2", "gw3"]
        .iter()
        .map(|host| Gateway::start(&mut cluster, host))
        .collect();
    let all: Vec<&Gateway> = gateways.iter().collect();
    // Before anything is published: the hosts' own rules alone (none), closed.
    for gateway in &gateways {
        gateway.expect("nothing published", &[(ALLOWED, Outcome::TimedOut)]);
    }

    let revision = publish(&cluster, 1, &[]);
    let took = wait_all(&all, revision, Duration::from_secs(5));
    eprintln!(
        "revision {revision} in force on all three gateways {:.0} ms after publish returned",
        took.as_secs_f64() * 1e3
    );
    assert!(
        took < Duration::from_secs(1),
        "the publish took {took:?} to reach all three gateways"
    );
    for gateway in &gateways {
        gateway.expect(
            "v1",
            &[
                (ALLOWED, Outcome::Connected),
                (UNLISTED, Outcome::TimedOut),
                (LATER, Outcome::TimedOut),
            ],
        );
        gateway.wait_for_metric("smtpguard_fleet_connected 1", Duration::from_secs(5));
        gateway.wait_for_metric(
            &format!("smtpguard_fleet_revision {revision}"),
            Duration::from_secs(5),
        );
    }
    let text = wait_status(&cluster, 0, "in step: 3 hosts", Duration::from_secs(10));
    eprintln!("fleet status:\n{text}");

    // One member killed: the other two hold the quorum; publishing and following go on.
    cluster.kill(0);
    let revision = publish(&cluster, 2, &[]);
    let took = wait_all(&all, revision, Duration::from_secs(10));
    eprintln!(
        "with a member down, revision {revision} in force on all three in {:.0} ms",
        took.as_secs_f64() * 1e3
    );
    for gateway in &gateways {
        gateway.expect(
            "v2, one member down",
            &[(LATER, Outcome::Connected), (UNLISTED, Outcome::TimedOut)],
        );
    }

    // The whole cluster gone: every gateway keeps enforcing v2 and says it is disconnected.
    cluster.kill_all();
    for gateway in &gateways {
        gateway.wait_for_metric("smtpguard_fleet_connected 0", Duration::from_secs(15));
        gateway.wait_for_metric(
            &format!("smtpguard_fleet_revision {revision}"),
            Duration::from_secs(1),
        );
        gateway.expect(
            "cluster gone",
            &[
                (ALLOWED, Outcome::Connected),
                (LATER, Outcome::Connected),
                (UNLISTED, Outcome::TimedOut),
            ],
        );
        let stats = gateway.daemon.cli(&["stats"]);
        assert!(
            stats.contains("DISCONNECTED"),
            "stats should say the cluster is away:\n{stats}"
        );
    }
    // A gateway restarted meanwhile enforces the revision it kept.
    let mut restarted = gateways.into_iter().collect::<Vec<_>>();
    {
        let gateway = &mut restarted[2];
        let generation = gateway.daemon.generation();
        gateway.daemon.stop();
        gateway.daemon.restart(&gateway.pair.server, generation);
        gateway
            .daemon
            .wait_for_log("from the last-good store", 1, Duration::from_secs(5));
        gateway.expect(
            "restarted without the cluster",
            &[
                (ALLOWED, Outcome::Connected),
                (LATER, Outcome::Connected),
                (UNLISTED, Outcome::TimedOut),
            ],
        );
        // The kept revision, recorded for `stats` as soon as the follower starts.
        wait_all(&[&*gateway], revision, Duration::from_secs(5));
        assert_eq!(
            gateway.revision(),
            revision,
            "the restarted gateway should report the kept revision"
        );
    }

    // The cluster back: everyone reconnects and catches up with what is published next.
    cluster.start_all();
    let all: Vec<&Gateway> = restarted.iter().collect();
    for gateway in &all {
        gateway.wait_for_metric("smtpguard_fleet_connected 1", Duration::from_secs(20));
    }
    let revision = publish(&cluster, 3, &[]);
    wait_all(&all, revision, Duration::from_secs(5));
    for gateway in &all {
        gateway.expect(
            "v3 after the outage",
            &[(ALLOWED, Outcome::TimedOut), (LATER, Outcome::Connected)],
        );
    }
    wait_status(&cluster, 0, "in step: 3 hosts", Duration::from_secs(10));

    // One gateway stopped: its report is withdrawn, and the fleet is not in step.
    restarted[1].daemon.stop();
    let text = wait_status(&cluster, 2, "silent", Duration::from_secs(10));
    eprintln!("fleet status with gw2 stopped:\n{text}");
    assert!(
        text.contains("gw2") && text.contains("not in step"),
        "{text}"
    );
}

#[test]
fn races_tampering_and_expired_reports() {
    let mut cluster = Cluster::start();
    let mut gateway = Gateway::start(&mut cluster, "gw1");
    let first = publish(&cluster, 1, &[]);
    wait_all(&[&gateway], first, Duration::from_secs(5));

    // Two publishers race: the slow one read revision `first`, the fast one wrote after it.
    let slow = {
        let endpoints = cluster.endpoints();
        let dir = std::env::temp_dir().join(format!("sg-{}-race", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("central.toml");
        std::fs::write(&path, central(3)).expect("central");
        std::process::Command::new("nsenter")
            .arg(format!("--net={}", cluster.netns.path()))
            .arg(smtpguard_tests::daemon::binary())
            .args(["publish", "--config"])
            .arg(&path)
            .args([
                "--etcd",
                &endpoints,
                "--group",
                GROUP,
                "--pause-before-write-ms",
                "3000",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn the slow publisher")
    };
    std::thread::sleep(Duration::from_millis(1000));
    let fast = publish(&cluster, 2, &[]);
    let slow = slow.wait_with_output().expect("slow publisher");
    let _ = std::fs::remove_dir_all(
        std::env::temp_dir().join(format!("sg-{}-race", std::process::id())),
    );
    let slow_err = String::from_utf8_lossy(&slow.stderr);
    assert!(
        !slow.status.success()
            && slow_err.contains("was published by someone else")
            && slow_err.contains("nothing written"),
        "the slower publisher should be told it lost and write nothing: {}{slow_err}",
        String::from_utf8_lossy(&slow.stdout)
    );
    wait_all(&[&gateway], fast, Duration::from_secs(5));
    let manifest = cluster.etcdctl(
        &[
            "get",
            "--print-value-only",
            &format!("/smtpguard/fleet/{GROUP}/policy/manifest"),
        ],
        None,
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&manifest.stdout).expect("manifest JSON");
    assert_eq!(
        manifest["deny"], 0,
        "the winner's policy (v2, no deny) must be the one published: {manifest}"
    );
    gateway.expect(
        "the race's winner",
        &[(ALLOWED, Outcome::Connected), (LATER, Outcome::Connected)],
    );

    // A tampered payload: refused, v2 stays in force, and the fleet is not in step.
    let generation = gateway.daemon.generation();
    let garbage = cluster.etcdctl(
        &["put", &format!("/smtpguard/fleet/{GROUP}/policy/snapshot")],
        Some(b"\x78\x9c not what was published"),
    );
    assert!(
        garbage.status.success(),
        "{}",
        String::from_utf8_lossy(&garbage.stderr)
    );
    gateway
        .daemon
        .wait_for_log("refused, generation", 1, Duration::from_secs(5));
    assert_eq!(
        gateway.daemon.generation(),
        generation,
        "a refused snapshot must not be applied"
    );
    gateway.expect(
        "tampered snapshot refused",
        &[
            (ALLOWED, Outcome::Connected),
            (LATER, Outcome::Connected),
            (UNLISTED, Outcome::TimedOut),
        ],
    );
    let text = wait_status(&cluster, 2, "refused", Duration::from_secs(10));
    eprintln!("fleet status with a tampered snapshot:\n{text}");

    // A snapshot of a newer format: refused as well, whatever else it says.
    let newer =
        serde_json::to_vec(&serde_json::json!({"format": 2, "hash": "sha256:00"})).expect("json");
    let put = cluster.etcdctl(
        &["put", &format!("/smtpguard/fleet/{GROUP}/policy/manifest")],
        Some(&newer),
    );
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    gateway.daemon.wait_for_log(
        "snapshot format 2; this smtpguard reads format 1",
        1,
        Duration::from_secs(5),
    );
    assert_eq!(
        gateway.daemon.generation(),
        generation,
        "a newer format must not be applied"
    );
    gateway.expect("newer format refused", &[(LATER, Outcome::Connected)]);

    // A publish repairs the group.
    let repaired = publish(&cluster, 3, &["--force"]);
    wait_all(&[&gateway], repaired, Duration::from_secs(5));
    gateway.expect(
        "repaired",
        &[(ALLOWED, Outcome::TimedOut), (LATER, Outcome::Connected)],
    );

    // SIGKILL: no goodbye, the report goes when its lease (2 s) does.
    let key = format!("/smtpguard/fleet/{GROUP}/hosts/gw1");
    let present = cluster.etcdctl(&["get", "--print-value-only", &key], None);
    assert!(
        !present.stdout.is_empty(),
        "gw1's report should be in etcd before the kill"
    );
    gateway.daemon.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let output = cluster.etcdctl(&["get", "--print-value-only", &key], None);
        if output.status.success() && output.stdout.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "gw1's report outlived its lease");
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_status(&cluster, 2, "silent", Duration::from_secs(5));
}
