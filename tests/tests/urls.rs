//! Lists fetched by URL, against a real nginx in the daemon's test namespace and real TCP: a
//! changed list is applied at its refresh, an unchanged one costs a 304 (counted), a dead
//! server keeps the list in force (and a daemon restarted then enforces it from the store), a
//! bad line is refused with the URL and its line, a JSON document is read through its
//! `json_key`, and HTTPS works with a test CA given as `ca_file` (and fails without it).

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use smtpguard_tests::{
    daemon::{Daemon, binary},
    netns::{Listener, Netns, Outcome, Pair, SERVER_V4, connect, sock, unique_tag},
    prometheus::http_get,
    web::WebServer,
};

const RELAY_ONE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const RELAY_TWO: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
/// Inside 198.51.100.64/26, the nested entry of the JSON document.
const M365: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 77);
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
        "interfaces = [\"{interface}\"]\n\n[metrics]\nlisten = \"{LISTEN}\"\n\n[urls]\nmin_refresh_secs = 1\ntimeout_secs = 2\n\n[[allow]]\nname = \"provider\"\n{allow}\nrefresh_secs = 1\n"
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

/// Waits until `series` satisfies `ready`; returns its value.
fn wait_for_metric(netns: &Netns, series: &str, ready: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = metric(netns, series);
        if let Some(value) = now.filter(|value| ready(*value)) {
            return value;
        }
        assert!(Instant::now() < deadline, "{series}: got {now:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `sources` of `stats --json`, as `(source, status)`.
fn not_current(daemon: &Daemon) -> Vec<(String, String)> {
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

/// `smtpguard check --config PATH` inside `netns` for an instance without a store: success,
/// and what it printed (stdout, then stderr).
fn check_in(netns: &Netns, config: &Path) -> (bool, String) {
    let output = Command::new("nsenter")
        .arg(format!("--net={}", netns.path()))
        .arg(binary())
        .args(["--instance", &format!("sg-{}", unique_tag()), "check"])
        .arg("--config")
        .arg(config)
        .output()
        .expect("run smtpguard check");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[test]
fn url_lists_follow_changes_cost_a_304_when_unchanged_and_outlive_a_dead_server() {
    let pair = Pair::new(&[RELAY_ONE.into(), RELAY_TWO.into(), UNLISTED.into()]);
    let _smtp = Listener::start(&pair.server, 25);
    let mut web = WebServer::start(&pair.server);
    web.publish(
        "provider.txt",
        "; provider relays, in the Spamhaus DROP format\n192.0.2.10 ; relay one\n",
    );
    let url = web.url("provider.txt");
    let text = config(&pair.server_if, &format!("urls = [\"{url}\"]"));
    let mut daemon = Daemon::start(&pair.server, &text);
    for (src, want) in [
        (RELAY_ONE, Outcome::Connected),
        (RELAY_TWO, Outcome::TimedOut),
        (UNLISTED, Outcome::TimedOut),
    ] {
        assert_eq!(attempt(&pair, src), want, "{src} with the first list");
    }

    // Unchanged: every refresh is a conditional request, answered 304.
    let not_modified =
        format!("smtpguard_url_fetches_total{{url=\"{url}\",result=\"not_modified\"}}");
    wait_for_metric(&pair.server, &not_modified, |count| count >= 2.0);
    assert!(
        web.requests()
            .iter()
            .any(|(path, status)| path == "/provider.txt" && *status == 304),
        "nginx should have answered 304: {:?}",
        web.requests()
    );
    assert_eq!(daemon.generation(), 1, "a 304 applies nothing");
    let fetched_at = metric(
        &pair.server,
        &format!("smtpguard_url_last_success_timestamp_seconds{{url=\"{url}\"}}"),
    )
    .expect("last success timestamp");
    assert!(fetched_at > 1.7e9, "{fetched_at}");

    // The list changes: applied at the next refresh.
    web.publish("provider.txt", "192.0.2.11 ; relay two\n");
    daemon.wait_for_generation(2, WAIT);
    assert_eq!(attempt(&pair, RELAY_TWO), Outcome::Connected, "new entry");
    assert_eq!(
        attempt(&pair, RELAY_ONE),
        Outcome::TimedOut,
        "entry removed"
    );
    assert!(
        daemon.log().contains("URL lists changed"),
        "{}",
        daemon.log()
    );

    // The server dies: the list stays in force, marked stale.
    web.stop();
    let stale = format!("smtpguard_url_stale{{url=\"{url}\"}}");
    wait_for_metric(&pair.server, &stale, |value| value == 1.0);
    wait_for_metric(
        &pair.server,
        &format!("smtpguard_url_fetches_total{{url=\"{url}\",result=\"error\"}}"),
        |count| count >= 1.0,
    );
    let generation = daemon.generation();
    assert_eq!(
        attempt(&pair, RELAY_TWO),
        Outcome::Connected,
        "kept in force"
    );
    assert_eq!(attempt(&pair, UNLISTED), Outcome::TimedOut);
    assert_eq!(
        daemon.generation(),
        generation,
        "a failed fetch applies nothing"
    );
    assert!(
        daemon
            .log()
            .contains(&format!("cannot refresh URL {url}: {url}: ")),
        "{}",
        daemon.log()
    );
    assert_eq!(
        not_current(&daemon),
        [(format!("URL {url}"), "stale".to_owned())]
    );

    // A reboot while the server is down: the daemon starts from its store and enforces.
    let deadline = Instant::now() + WAIT;
    while !daemon.state_dir().join("store.json").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(daemon.stop().success());
    daemon.cli(&["detach"]);
    std::fs::remove_dir_all(Path::new("/run/smtpguard").join(&daemon.instance))
        .expect("remove the run directory");
    daemon.restart(&pair.server, 0);
    for (src, want) in [
        (RELAY_TWO, Outcome::Connected),
        (RELAY_ONE, Outcome::TimedOut),
        (UNLISTED, Outcome::TimedOut),
    ] {
        assert_eq!(
            attempt(&pair, src),
            want,
            "{src} after the restart, from the store"
        );
    }
    assert_eq!(
        not_current(&daemon),
        [(format!("URL {url}"), "stale".to_owned())]
    );
    wait_for_metric(&pair.server, &stale, |value| value == 1.0);

    // The server comes back with the same list: the stored validators get a 304.
    web.serve(&pair.server);
    wait_for_metric(&pair.server, &stale, |value| value == 0.0);
    wait_for_metric(&pair.server, &not_modified, |count| count >= 1.0);
    assert!(not_current(&daemon).is_empty());
    assert_eq!(attempt(&pair, RELAY_TWO), Outcome::Connected);
}

#[test]
fn a_bad_line_is_refused_with_the_url_and_its_line() {
    let pair = Pair::new(&[RELAY_ONE.into(), UNLISTED.into()]);
    let _smtp = Listener::start(&pair.server, 25);
    let mut web = WebServer::start(&pair.server);
    web.publish("provider.txt", "192.0.2.10\n");
    let url = web.url("provider.txt");
    let text = config(&pair.server_if, &format!("urls = [\"{url}\"]"));
    let daemon = Daemon::start(&pair.server, &text);
    assert_eq!(attempt(&pair, RELAY_ONE), Outcome::Connected);

    web.publish(
        "provider.txt",
        "192.0.2.10\n# the next one is a typo\n192.0.2.300\n203.0.113.0/24\n",
    );
    let message = format!("{url}:3: bad prefix \"192.0.2.300\": not an IPv4 or IPv6 address");
    daemon.wait_for_log(&message, 1, WAIT);
    wait_for_metric(
        &pair.server,
        &format!("smtpguard_url_fetches_total{{url=\"{url}\",result=\"invalid\"}}"),
        |count| count >= 1.0,
    );
    wait_for_metric(
        &pair.server,
        &format!("smtpguard_url_stale{{url=\"{url}\"}}"),
        |value| value == 1.0,
    );
    assert_eq!(daemon.generation(), 1, "nothing of the bad list applied");
    assert_eq!(
        attempt(&pair, UNLISTED),
        Outcome::TimedOut,
        "not taken in part"
    );
    assert_eq!(
        attempt(&pair, RELAY_ONE),
        Outcome::Connected,
        "last good list"
    );

    // Where there is no last good list, the same list is an error.
    let (ok, out) = check_in(&pair.server, &daemon.config_path);
    assert!(!ok, "check must refuse the list:\n{out}");
    assert!(out.contains(&message), "{out}");
}

#[test]
fn json_lists_take_every_string_under_their_key() {
    let pair = Pair::new(&[M365.into(), UNLISTED.into()]);
    let _smtp = Listener::start(&pair.server, 25);
    let mut web = WebServer::start(&pair.server);
    // Microsoft's endpoint list, shortened: ranges under "ips", at two depths.
    web.publish(
        "endpoints.json",
        r#"[
  {
    "id": 10,
    "serviceArea": "Exchange",
    "urls": ["*.mail.protection.outlook.com"],
    "ips": ["40.92.0.0/15", "2a01:111:f400::/48"],
    "tcpPorts": "25",
    "required": true
  },
  {
    "id": 11,
    "extra": {"ips": ["198.51.100.64/26"]}
  }
]
"#,
    );
    let url = web.url("endpoints.json");
    let text = config(
        &pair.server_if,
        &format!("urls = [\"{url}\"]\njson_key = \"ips\""),
    );
    let daemon = Daemon::start(&pair.server, &text);
    assert_eq!(attempt(&pair, M365), Outcome::Connected, "nested ips");
    assert_eq!(attempt(&pair, UNLISTED), Outcome::TimedOut);
    let (ok, out) = check_in(&pair.server, &daemon.config_path);
    assert!(ok, "{out}");
    for line in [
        format!("{:<43}  {url}:6", "40.92.0.0/15"),
        format!("{:<43}  {url}:6", "2a01:111:f400::/48"),
        format!("{:<43}  {url}:12", "198.51.100.64/26"),
    ] {
        assert!(out.contains(&line), "missing {line:?} in:\n{out}");
    }
}

#[test]
fn https_lists_are_trusted_through_the_system_store_or_a_ca_file() {
    let netns = Netns::new(format!("sg-{}", unique_tag()));
    let mut web = WebServer::start_tls(&netns);
    web.publish("provider.txt", "192.0.2.0/24\n");
    let url = web.https_url("provider.txt");
    let dir = std::env::temp_dir().join(format!("sg-tls-{}", unique_tag()));
    std::fs::create_dir_all(&dir).expect("dir");

    // The test CA is in no system store: refused, naming the URL.
    let without = dir.join("without.toml");
    std::fs::write(&without, config("eth0", &format!("urls = [\"{url}\"]"))).expect("config");
    let (ok, out) = check_in(&netns, &without);
    assert!(!ok, "an unknown CA must be refused:\n{out}");
    assert!(
        out.contains(&format!("cannot fetch: {url}: ")) && out.contains("certificate"),
        "{out}"
    );

    // With it as ca_file: fetched and checked.
    let with = dir.join("with.toml");
    std::fs::write(
        &with,
        config("eth0", &format!("urls = [\"{url}\"]")).replace(
            "[urls]\n",
            &format!("[urls]\nca_file = \"{}\"\n", web.ca_file().display()),
        ),
    )
    .expect("config");
    let (ok, out) = check_in(&netns, &with);
    assert!(ok, "{out}");
    assert!(
        out.contains("192.0.2.0/24") && out.contains(&format!("{url}:1")),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A scope's lists by URL are fetched like the top level's: a scope's deny list of
/// `specific` precedence stops the host it names inside the scope's provider, the provider
/// still connects, and a scope whose URL no server answers refuses the start (it used to be
/// taken as an empty list: the deny stopped nothing, found by review).
#[test]
fn a_scopes_urls_are_fetched_and_enforced() {
    let pair = Pair::new(&[RELAY_ONE.into(), RELAY_TWO.into(), UNLISTED.into()]);
    let _smtp = Listener::start(&pair.server, 25);
    let mut web = WebServer::start(&pair.server);
    web.publish("drop.txt", "192.0.2.11/32\n");
    let url = web.url("drop.txt");
    let text = format!(
        "interfaces = [\"{}\"]\non_exit = \"detach\"\n\n[urls]\ntimeout_secs = 2\n\n[[scope]]\nname = \"mail\"\ndestinations = [\"{SERVER_V4}\"]\n[[scope.allow]]\nname = \"provider\"\nprefixes = [\"192.0.2.0/28\"]\n[[scope.deny]]\nname = \"drop\"\nprecedence = \"specific\"\nurls = [\"{url}\"]\n",
        pair.server_if
    );
    let mut daemon = Daemon::start(&pair.server, &text);
    assert_eq!(
        attempt(&pair, RELAY_ONE),
        Outcome::Connected,
        "the provider"
    );
    assert_eq!(
        attempt(&pair, RELAY_TWO),
        Outcome::TimedOut,
        "the host the scope's list names, inside the provider"
    );
    assert_eq!(attempt(&pair, UNLISTED), Outcome::TimedOut);
    assert!(
        web.requests()
            .iter()
            .any(|(path, status)| path == "/drop.txt" && *status == 200),
        "{:?}",
        web.requests()
    );
    let (ok, out) = check_in(&pair.server, &daemon.config_path);
    assert!(ok, "{out}");
    assert!(
        out.contains("1 deny prefix"),
        "check lists the scope's list:\n{out}"
    );
    assert!(daemon.stop().success());

    // No server at the URL: not an empty list, an error.
    let dead = text.replace(&url, "http://127.0.0.1:9/none.txt");
    let mut daemon = Daemon::launch(&pair.server, &dead);
    let status = daemon.wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "{}", daemon.log());
    assert!(
        daemon.log().contains("http://127.0.0.1:9/none.txt"),
        "{}",
        daemon.log()
    );
    let _ = daemon.cli(&["detach"]);
}
