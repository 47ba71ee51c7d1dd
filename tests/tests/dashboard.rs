//! The Grafana dashboard the package ships (`packaging/grafana/smtpguard-dashboard.json`,
//! installed as `/usr/share/smtpguard/grafana-dashboard.json`) asks the right questions: every
//! panel's PromQL runs against a real Prometheus scraping a real daemon that has seen
//! traffic, a URL list (nginx) and a DNS name (dnsmasq), and every panel has data but those
//! that wait for series nobody produces here (the fleet's, refusals by the floor).

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::{Duration, Instant},
};

use smtpguard_tests::{
    daemon::Daemon,
    dns::{DnsServer, RESOLVER, Zone},
    netns::{Listener, Outcome, Pair, SERVER_V4, connect, sock},
    prometheus::Prometheus,
    web::WebServer,
};

const PROVIDER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const ABUSER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 9);
const RELAY: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 25);
const LISTED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 70);
const UNLISTED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const LISTEN: &str = "127.0.0.1:9725";

/// Panels that may be empty here: the series they read appear only in a fleet, or once the
/// floor refuses something.
fn may_be_empty(title: &str) -> bool {
    title.starts_with("Fleet") || title.contains("refused")
}

/// `(panel title, PromQL)` of every panel, rows' nested panels included.
fn queries(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack: Vec<&serde_json::Value> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .collect();
    while let Some(panel) = stack.pop() {
        if let Some(nested) = panel["panels"].as_array() {
            stack.extend(nested);
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a PromQL expr").to_owned();
            out.push((panel["title"].as_str().unwrap_or("").to_owned(), expr));
        }
    }
    out.reverse();
    out
}

/// What Grafana would send: its variables replaced (every instance, a 30 s rate window).
fn as_grafana_sends(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s")
        .replace("$__range", "5m")
        .replace("$instance", ".*")
}

fn attempt(pair: &Pair, src: Ipv4Addr) -> Outcome {
    connect(
        &pair.client,
        IpAddr::V4(src),
        sock(SERVER_V4, 25),
        Duration::from_millis(500),
    )
    .0
}

#[test]
fn every_dashboard_panel_has_data_from_a_real_daemon() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/grafana/smtpguard-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path)
            .unwrap_or_else(|error| panic!("{}: {error}", path.display())),
    )
    .unwrap_or_else(|error| panic!("{} is not JSON: {error}", path.display()));
    let queries = queries(&dashboard);
    assert!(queries.len() >= 15, "{queries:?}");

    let pair = Pair::new(&[
        PROVIDER.into(),
        ABUSER.into(),
        RELAY.into(),
        LISTED.into(),
        UNLISTED.into(),
    ]);
    let _smtp = Listener::start(&pair.server, 25);
    let _dns = DnsServer::start(
        &pair.server,
        &Zone {
            addresses: vec![(RELAY.to_string(), "relay.provider.test".to_owned())],
            ..Zone::default()
        },
    );
    let mut web = WebServer::start(&pair.server);
    web.publish("partners.txt", "198.51.100.64/26 ; partner relays\n");
    let config = format!(
        "interfaces = [\"{}\"]\n\n[metrics]\nlisten = \"{LISTEN}\"\n\n[dns]\nresolver = \"{RESOLVER}\"\nmin_refresh_secs = 1\ntimeout_secs = 1\n\n[urls]\nmin_refresh_secs = 1\n\n[[allow]]\nname = \"provider\"\nprefixes = [\"192.0.2.0/28\"]\nhosts = [\"relay.provider.test\"]\n\n[[allow]]\nname = \"partners\"\nurls = [\"{}\"]\nrefresh_secs = 1\n\n[[deny]]\nname = \"abuser\"\nprefixes = [\"192.0.2.9\"]\n",
        pair.server_if,
        web.url("partners.txt")
    );
    let mut daemon = Daemon::start(&pair.server, &config);
    daemon.reload(&config);
    let prometheus = Prometheus::start(&pair.server, LISTEN);
    // Scrapes before, during and after the traffic, so rates have points on both sides
    // (Prometheus takes a few seconds to start scraping a new target).
    prometheus.wait_for("up", 1.0, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    for (src, want) in [
        (PROVIDER, Outcome::Connected),
        (RELAY, Outcome::Connected),
        (LISTED, Outcome::Connected),
        (ABUSER, Outcome::TimedOut),
        (UNLISTED, Outcome::TimedOut),
        (UNLISTED, Outcome::TimedOut),
    ] {
        assert_eq!(attempt(&pair, src), want, "{src}");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = prometheus.query("sum(smtpguard_syn_total)");
        let total = answer["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|value| value.parse::<f64>().ok());
        if total.is_some_and(|total| total >= 6.0) {
            break;
        }
        assert!(Instant::now() < deadline, "no SYNs scraped: {answer}");
        std::thread::sleep(Duration::from_millis(250));
    }
    std::thread::sleep(Duration::from_secs(2));

    let mut report = Vec::new();
    let mut empty = Vec::new();
    for (title, expr) in &queries {
        let promql = as_grafana_sends(expr);
        let answer = prometheus.query(&promql);
        assert_eq!(
            answer["status"], "success",
            "panel {title:?}: {promql}: {answer}"
        );
        let series = answer["data"]["result"].as_array().map_or(0, Vec::len);
        report.push(format!("{series:>3} series  {title}: {promql}"));
        if series == 0 && !may_be_empty(title) {
            empty.push(format!("{title}: {promql}"));
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(
        empty.is_empty(),
        "panels without data:\n{}\n\nall:\n{}",
        empty.join("\n"),
        report.join("\n")
    );

    // The rates are the traffic's: stopped SYNs and every class were seen moving.
    let classes = prometheus.query(&as_grafana_sends(
        "sum by (class) (increase(smtpguard_syn_total{instance=~\"$instance\"}[1m]))",
    ));
    let classes = classes["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for class in ["allowed", "denied", "unlisted"] {
        let value = classes
            .iter()
            .find(|series| series["metric"]["class"] == class)
            .and_then(|series| series["value"][1].as_str()?.parse::<f64>().ok());
        assert!(
            value.is_some_and(|value| value > 0.0),
            "{class}: {value:?} in {classes:?}; samples: {}\n{}",
            prometheus.query("smtpguard_syn_total[1m]"),
            prometheus.query("up[1m]")
        );
    }
}
