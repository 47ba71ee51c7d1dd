//! The Prometheus endpoint, scraped by a real Prometheus server started by the test in the
//! daemon's namespace: the query API returns the contract's series with the values real
//! connects produced, and per-prefix counters stay monotonic across reloads.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use smtpguard_tests::{
    daemon::Daemon,
    netns::{Listener, Outcome, Pair, SERVER_V4, connect, sock},
    prometheus::{Prometheus, http_get},
};

const ALLOWED4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const DENIED4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 9);
const UNLISTED4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const LISTEN: &str = "127.0.0.1:9725";
const WAIT: Duration = Duration::from_secs(20);

fn config(interface: &str, extra_allow: &str) -> String {
    format!(
        "interfaces = [\"{interface}\"]\n\n[metrics]\nlisten = \"{LISTEN}\"\n\n[[allow]]\nname = \"provider\"\nprefixes = [\"192.0.2.0/28\"{extra_allow}]\n\n[[deny]]\nname = \"abuser\"\nprefixes = [\"192.0.2.9\"]\n"
    )
}

fn attempt(pair: &Pair, src: Ipv4Addr) -> Outcome {
    connect(
        &pair.client,
        IpAddr::V4(src),
        sock(SERVER_V4, 25),
        Duration::from_millis(700),
    )
    .0
}

#[test]
fn prometheus_scrapes_the_contract_series() {
    let pair = Pair::new(&[ALLOWED4.into(), DENIED4.into(), UNLISTED4.into()]);
    let _smtp = Listener::start(&pair.server, 25);
    let mut daemon = Daemon::start(&pair.server, &config(&pair.server_if, ""));
    for (src, want) in [
        (ALLOWED4, Outcome::Connected),
        (ALLOWED4, Outcome::Connected),
        (DENIED4, Outcome::TimedOut),
        (UNLISTED4, Outcome::TimedOut),
    ] {
        assert_eq!(attempt(&pair, src), want, "{src}");
    }

    // A raw scrape: OpenMetrics text from the client library.
    let (status, text) = http_get(&pair.server, LISTEN, "/metrics").expect("scrape");
    assert_eq!(status, 200, "{text}");
    for line in [
        "smtpguard_rule_matches_total{scope=\"default\",list=\"allow\",rule=\"provider\",prefix=\"192.0.2.0/28\"} 2",
        "smtpguard_rule_matches_total{scope=\"default\",list=\"deny\",rule=\"abuser\",prefix=\"192.0.2.9/32\"} 1",
        "smtpguard_syn_total{class=\"unlisted\"} 1",
        "smtpguard_dropped_total 2",
        "smtpguard_policy_prefixes{list=\"allow\"} 1",
        "# EOF",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert_eq!(http_get(&pair.server, LISTEN, "/").expect("get /").0, 404);

    let prometheus = Prometheus::start(&pair.server, LISTEN);
    let answer = prometheus.wait_for(
        "smtpguard_rule_matches_total{scope=\"default\",list=\"allow\",rule=\"provider\",prefix=\"192.0.2.0/28\"}",
        2.0,
        WAIT,
    );
    eprintln!("Prometheus query result: {answer}");
    prometheus.wait_for("smtpguard_syn_total{class=\"allowed\"}", 2.0, WAIT);
    prometheus.wait_for("smtpguard_syn_total{class=\"denied\"}", 1.0, WAIT);
    prometheus.wait_for("smtpguard_syn_total{class=\"unlisted\"}", 1.0, WAIT);
    prometheus.wait_for("smtpguard_dropped_total", 2.0, WAIT);
    prometheus.wait_for("smtpguard_policy_prefixes{list=\"deny\"}", 1.0, WAIT);
    let info = prometheus.wait_for(
        &format!(
            "smtpguard_info{{interface=\"{}\",xdp_mode=\"native\"}}",
            pair.server_if
        ),
        1.0,
        WAIT,
    );
    assert_eq!(
        info["data"]["result"][0]["metric"]["version"],
        env!("CARGO_PKG_VERSION")
    );

    // A reload that keeps the prefix keeps its counter; a refused one counts as an error.
    daemon.reload(&config(&pair.server_if, ", \"203.0.113.0/24\""));
    assert_eq!(attempt(&pair, ALLOWED4), Outcome::Connected);
    assert_eq!(attempt(&pair, UNLISTED4), Outcome::Connected, "listed now");
    prometheus.wait_for("smtpguard_reloads_total{result=\"ok\"}", 1.0, WAIT);
    prometheus.wait_for(
        "smtpguard_rule_matches_total{prefix=\"192.0.2.0/28\"}",
        3.0,
        WAIT,
    );
    prometheus.wait_for(
        "smtpguard_rule_matches_total{prefix=\"203.0.113.0/24\"}",
        1.0,
        WAIT,
    );
    prometheus.wait_for("smtpguard_policy_prefixes{list=\"allow\"}", 2.0, WAIT);
    daemon.reload_refused(&config(&pair.server_if, ", \"192.0.2.9\""));
    prometheus.wait_for("smtpguard_reloads_total{result=\"error\"}", 1.0, WAIT);
    // No counter of this series ever went down across the reloads.
    prometheus.wait_for(
        "resets(smtpguard_rule_matches_total{prefix=\"192.0.2.0/28\"}[5m])",
        0.0,
        WAIT,
    );
}
