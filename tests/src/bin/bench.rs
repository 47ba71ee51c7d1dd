//! `cargo xtask bench`: figures, not a timed test. Everything is measured side by side in one
//! run and printed as absolutes and ratios:
//!
//! 1. per-packet cost through BPF_PROG_TEST_RUN (the kernel's per-repetition timing, median of
//!    runs) for several frames and policy sizes, beside the trivial XDP_DROP floor;
//! 2. a SYN flood of random unlisted sources over a veth pair between two namespaces: CPU per
//!    packet and drop rate for the floor, smtpguard and the same policy in nftables;
//! 3. policy apply through the real daemon: SIGHUP to the new policy in force, and map memory;
//! 4. the size of a Prometheus scrape of a 100,000-prefix policy under each `[metrics]
//!    prefixes` setting;
//! 5. per-packet cost with destination scopes: the same prefixes in one scope, and spread over
//!    100 scopes, beside the floor;
//! 6. the fleet: publish -> enforced on three real daemons following one group through a real
//!    three-member etcd cluster, median and worst of 100 publishes of 10 and of 10,000
//!    prefixes, and the time to publish and to apply 100,000 + 100,000.
//! 7. building the policy in-process, no kernel: reading two list files of 1,000,000 prefixes
//!    each (part 3's) and building the `Policy` from them, median of runs (`--only 7`).

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use smtpguard::kernel::filter::Filter;
use smtpguard_tests::{
    bench::{
        Floor, Rng, allow_policy, busy_cpu_ns, map_memory, median, random_v4_prefixes,
        random_v6_prefixes, unlisted_v4,
    },
    daemon::Daemon,
    frames::{self, ACK, SYN, dot1ad, dot1q},
    netns::{PacketSocket, Pair},
};

const DST4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const DST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);
const ALLOWED4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const UNLISTED6: Ipv6Addr = Ipv6Addr::new(0x3fff, 0xffff, 0, 0, 0, 0, 0, 1);
/// Repetitions per kernel timing, and timings per median.
const REPEAT: u32 = 200_000;
const ROUNDS: usize = 5;
/// Distinct sources in the many-sources case, each run once.
const MANY_SOURCES: usize = 20_000;

/// The rows of issue 12's table: the figure, what the issue measured ("today"), the target.
const ISSUE_ROWS: [(&str, &str, &str); 11] = [
    (
        "SIGHUP to flip, 100k+100k, every prefix replaced",
        "0.70 s",
        "<= 0.3 s",
    ),
    ("SIGHUP to state recorded, 100k+100k", "1.70 s", "<= 0.5 s"),
    ("SIGHUP to flip, 1M+1M", "14.5 s", "<= 3 s"),
    ("daemon start, 1M+1M", "24.4 s", "<= 5 s"),
    ("SIGHUP to state recorded, 1M+1M", "30.5 s", "<= 5 s"),
    (
        "second SIGHUP to flip, 1M+1M, while the first's state is written",
        "-",
        "not delayed",
    ),
    (
        "many unlisted IPv4 sources (cold cache), 1M prefixes, vs floor",
        "2.83x",
        "<= 1.5x",
    ),
    ("allowed IPv4 SYN, 1M prefixes, vs floor", "7.7x", "<= 3x"),
    (
        "unlisted IPv6 SYN, 100k prefixes, vs floor",
        "6.1x",
        "<= 2x",
    ),
    (
        "veth SYN flood, 10 prefixes, CPU per packet vs floor",
        "1.17x",
        "<= 1.1x",
    ),
    ("map memory, 1M+1M", "296 MiB", "report"),
];

/// This run's figure for each row of [`ISSUE_ROWS`], as measured by the parts that ran.
static FIGURES: std::sync::Mutex<[Option<String>; ISSUE_ROWS.len()]> =
    std::sync::Mutex::new([const { None }; ISSUE_ROWS.len()]);

/// Records this run's figure for row `row` of [`ISSUE_ROWS`].
fn figure(row: usize, value: String) {
    if let Ok(mut figures) = FIGURES.lock() {
        figures[row] = Some(value);
    }
}

/// Issue 12's table with this run's figures beside the issue's.
fn issue_table() {
    let Ok(figures) = FIGURES.lock() else { return };
    if figures.iter().all(Option::is_none) {
        return;
    }
    println!(
        "issue 12: today (the issue's figure) beside this run's; '-' where no part measured it"
    );
    println!(
        "{:<68} {:>9} {:>12} {:>12}",
        "figure", "today", "this run", "target"
    );
    for ((name, today, target), now) in ISSUE_ROWS.iter().zip(figures.iter()) {
        println!(
            "{name:<68} {today:>9} {:>12} {target:>12}",
            now.as_deref().unwrap_or("-")
        );
    }
    println!();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|arg| arg == "--quick");
    // `--only N` runs part N alone.
    let only = args
        .iter()
        .position(|arg| arg == "--only")
        .and_then(|at| args.get(at + 1))
        .and_then(|part| part.parse::<u32>().ok());
    let run = |part: u32| only.is_none_or(|only| only == part);
    machine();
    if run(1) {
        per_packet(if quick {
            &[10, 10_000]
        } else {
            &[10, 10_000, 100_000, 1_000_000]
        });
    }
    if run(2) {
        flood(if quick { 300_000 } else { 2_000_000 });
    }
    if run(3) {
        let sizes: Vec<usize> = match std::env::var("SMTPGUARD_BENCH_APPLY") {
            Ok(sizes) => sizes
                .split(',')
                .filter_map(|size| size.parse().ok())
                .collect(),
            Err(_) if quick => vec![10_000],
            Err(_) => vec![100_000, 1_000_000],
        };
        apply(&sizes);
    }
    if run(4) {
        scrape_size(if quick { 10_000 } else { 100_000 });
    }
    if run(5) {
        scopes(if quick { 1_000 } else { 10_000 });
    }
    if run(6) {
        fleet(
            if quick { 20 } else { 100 },
            if quick { 10_000 } else { 100_000 },
        );
    }
    if run(7) {
        build(if quick { 100_000 } else { 1_000_000 });
    }
    issue_table();
}

/// Part 6: `rounds` publishes of 10 and of 10,000 prefixes, each timed from the start of
/// `smtpguard publish` to its revision in force on all three daemons; then one publish of
/// `large` IPv4 + `large` IPv6 prefixes.
fn fleet(rounds: usize, large: usize) {
    use smtpguard_tests::etcd::{Cluster, fleet_revision, follower_config, published_revision};

    println!(
        "6. fleet: three daemons following one group through a real 3-member etcd cluster (one machine, 2 cores shared by all)"
    );
    let mut cluster = Cluster::start();
    let pairs: Vec<Pair> = (0..3).map(|_| Pair::new(&[])).collect();
    for pair in &pairs {
        cluster.join(&pair.server);
    }
    let daemons: Vec<Daemon> = pairs
        .iter()
        .enumerate()
        .map(|(index, pair)| {
            let config = follower_config(&pair.server_if, &cluster, "bench", &format!("gw{index}"));
            Daemon::start_timeout(&pair.server, &config, Duration::from_secs(60))
        })
        .collect();
    let dir = std::env::temp_dir().join(format!("sg-fleet-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let endpoints = cluster.endpoints();
    let central = dir.join("central.toml");
    // Publishes `text`; the publish command's duration, publish start -> in force on all
    // three, and the publish's output.
    let publish = |text: &str| {
        std::fs::write(&central, text).expect("central");
        let started = Instant::now();
        let output = cluster.smtpguard(&[
            "publish",
            "--config",
            central.to_str().expect("utf-8"),
            "--etcd",
            &endpoints,
            "--group",
            "bench",
            "--force",
        ]);
        let command = started.elapsed();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let revision = published_revision(&stdout).unwrap_or_else(|| {
            panic!(
                "publish failed: {stdout}{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
        let deadline = Instant::now() + Duration::from_secs(300);
        while daemons
            .iter()
            .any(|daemon| fleet_revision(daemon) < revision)
        {
            assert!(
                Instant::now() < deadline,
                "revision {revision} not in force"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        (command, started.elapsed(), stdout)
    };
    println!(
        "{:>10} {:>9} {:>16} {:>26} {:>14}",
        "prefixes", "publishes", "publish command", "publish -> all 3 enforce", "worst"
    );
    for size in [10usize, 10_000] {
        let mut rng = Rng::new(0xf1ee7 + size as u64);
        let list = dir.join(format!("list-{size}.txt"));
        let text: String = random_v4_prefixes(&mut rng, size - 1)
            .iter()
            .map(|net| format!("{net}\n"))
            .collect();
        std::fs::write(&list, text).expect("list");
        let mut commands = Vec::new();
        let mut totals = Vec::new();
        for round in 0..rounds {
            // One literal moves each round: every publish is a new revision.
            let text = format!(
                "[[allow]]\nname = \"bench\"\nfiles = [\"{}\"]\nprefixes = [\"192.0.2.{}/32\"]\n",
                list.display(),
                round % 250
            );
            let (command, total, _) = publish(&text);
            commands.push(command.as_secs_f64() * 1e3);
            totals.push(total.as_secs_f64() * 1e3);
        }
        let worst = totals.iter().copied().fold(0.0, f64::max);
        println!(
            "{size:>10} {rounds:>9} {:>13.1} ms {:>23.1} ms {:>11.1} ms",
            median(&mut commands),
            median(&mut totals),
            worst
        );
    }
    let mut rng = Rng::new(0xb16);
    let (v4, v6) = (dir.join("v4.txt"), dir.join("v6.txt"));
    let lines = |nets: Vec<IpNet>| {
        nets.iter()
            .map(|net| format!("{net}\n"))
            .collect::<String>()
    };
    std::fs::write(&v4, lines(random_v4_prefixes(&mut rng, large))).expect("v4");
    std::fs::write(&v6, lines(random_v6_prefixes(&mut rng, large))).expect("v6");
    let text = format!(
        "[safety]\nmax_coverage_v4 = 0\nmax_coverage_v6 = 0\n[[allow]]\nname = \"large\"\nfiles = [\"{}\", \"{}\"]\n",
        v4.display(),
        v6.display()
    );
    let (command, total, stdout) = publish(&text);
    let compressed = stdout
        .lines()
        .find_map(|line| {
            line.split(" bytes compressed")
                .next()?
                .rsplit(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);
    let applied: Vec<String> = daemons
        .iter()
        .map(|daemon| {
            daemon
                .log()
                .lines()
                .rev()
                .find_map(|line| {
                    let ms = line
                        .split(" ms after it arrived")
                        .next()?
                        .rsplit(' ')
                        .next()?;
                    ms.parse::<f64>().ok()
                })
                .map_or_else(|| "?".to_owned(), |ms| format!("{ms:.0} ms"))
        })
        .collect();
    println!(
        "{large} + {large} (IPv4 + IPv6): snapshot {compressed} bytes compressed; publish command {:.2} s (compile, diff, one transaction); publish -> all 3 enforce {:.2} s; apply on each daemon (arrival -> in force): {}",
        command.as_secs_f64(),
        total.as_secs_f64(),
        applied.join(", ")
    );
    drop(daemons);
    let _ = std::fs::remove_dir_all(&dir);
    println!();
}

/// Part 5: unlisted and allowed SYNs with `size` IPv4 and `size` IPv6 allow prefixes in the
/// default scope alone, then spread over 100 scopes (the SYN's destination in one of them).
fn scopes(size: usize) {
    println!(
        "5. destination scopes, BPF_PROG_TEST_RUN (median of {ROUNDS} runs of {REPEAT} repetitions), {size}+{size} allow prefixes"
    );
    println!(
        "{:>7}  {:<24} {:>10} {:>10} {:>7}",
        "scopes", "case", "smtpguard", "floor", "ratio"
    );
    let mut floor = Floor::load();
    let (mut filter, mut maps) = Filter::load(None).expect("load smtpguard");
    let mut rng = Rng::new(0x5c0e);
    let mut nets = random_v4_prefixes(&mut rng, size);
    nets.extend(random_v6_prefixes(&mut rng, size));
    nets.push("192.0.2.0/28".parse().expect("prefix"));
    let single = allow_policy(nets.iter().copied());
    let unlisted = unlisted_v4(&mut rng, &single);
    let cases: [(&str, Vec<u8>); 3] = [
        ("unlisted IPv4 SYN", syn4(&[], unlisted, SYN)),
        ("allowed IPv4 SYN", syn4(&[], ALLOWED4, SYN)),
        (
            "unlisted IPv6 SYN",
            frames::segment_frame(
                frames::DST_MAC,
                &[],
                UNLISTED6.into(),
                DST6.into(),
                40000,
                25,
                SYN,
            ),
        ),
    ];
    for (count, policy) in [(1, single.clone()), (100, spread(&single, 100))] {
        maps.apply(&policy).expect("apply");
        for (name, frame) in &cases {
            let ours = timed(|| filter.time_run(frame, REPEAT).expect("test run"));
            let base = timed(|| floor.time_run(frame, REPEAT));
            println!(
                "{count:>7}  {name:<24} {ours:>8.1}ns {base:>8.1}ns {:>6.2}x",
                ours / base
            );
        }
    }
    println!();
}

/// `policy`'s default scope split into `count` scopes: scope 1 decides for the benchmark's
/// destinations and keeps the provider's /28; the others take their share of the prefixes
/// for destinations of their own.
fn spread(policy: &smtpguard::policy::Policy, count: usize) -> smtpguard::policy::Policy {
    let default = policy.default_scope().clone();
    let mut scopes: Vec<smtpguard::policy::Scope> = (0..count)
        .map(|index| smtpguard::policy::Scope {
            name: format!("scope-{index}"),
            destinations: if index == 1 {
                vec![
                    IpNet::from(std::net::IpAddr::from(DST4)),
                    IpNet::from(std::net::IpAddr::from(DST6)),
                ]
            } else {
                vec![
                    format!("10.{index}.0.0/16").parse().expect("prefix"),
                    format!("2001:db8:{index:x}::/48").parse().expect("prefix"),
                ]
            },
            entries: Default::default(),
            ..default.clone()
        })
        .collect();
    scopes[0].destinations.clear();
    scopes[0].name = "default".to_owned();
    for (index, (net, entry)) in default.entries.into_iter().enumerate() {
        let scope = if net == "192.0.2.0/28".parse::<IpNet>().expect("prefix") {
            1
        } else {
            index % count
        };
        scopes[scope].entries.insert(net, entry);
    }
    smtpguard::policy::Policy {
        scopes,
        refused: Vec::new(),
    }
}

/// Part 4: what one scrape of `/metrics` costs with `size` prefixes in force, one of which
/// has matched, under each `[metrics] prefixes` setting.
fn scrape_size(size: usize) {
    use std::net::{IpAddr, Ipv4Addr};

    use smtpguard_tests::{
        netns::{Listener, SERVER_V4, connect, sock},
        prometheus::http_get,
    };

    const LISTEN: &str = "127.0.0.1:9725";
    println!(
        "4. one scrape of /metrics, {size} prefixes in force (one of them matched), by [metrics] prefixes"
    );
    println!(
        "{:>10} {:>12} {:>10} {:>14} {:>10}",
        "setting", "bytes", "series", "per-prefix", "scrape"
    );
    let client = Ipv4Addr::new(192, 0, 2, 10);
    let pair = Pair::new(&[IpAddr::V4(client)]);
    let _smtp = Listener::start(&pair.server, 25);
    let dir = std::env::temp_dir().join(format!("sg-scrape-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let list = dir.join("v4.txt");
    let mut rng = Rng::new(4);
    let text: String = random_v4_prefixes(&mut rng, size)
        .iter()
        .map(|net| format!("{net}\n"))
        .collect();
    std::fs::write(&list, text).expect("list");
    let config = |series: &str| {
        format!(
            "interfaces = [\"{}\"]\non_exit = \"detach\"\n[metrics]\nlisten = \"{LISTEN}\"\nprefixes = \"{series}\"\n[[allow]]\nname = \"provider\"\nprefixes = [\"192.0.2.0/28\"]\n[[allow]]\nname = \"bench\"\nfiles = [\"{}\"]\n",
            pair.server_if,
            list.display()
        )
    };
    let mut daemon = Daemon::start_timeout(&pair.server, &config("all"), Duration::from_secs(300));
    let (outcome, _) = connect(
        &pair.client,
        IpAddr::V4(client),
        sock(SERVER_V4, 25),
        Duration::from_secs(2),
    );
    assert_eq!(outcome, smtpguard_tests::netns::Outcome::Connected);
    for series in ["all", "matched", "none"] {
        if series != "all" {
            daemon.reload(&config(series));
        }
        let started = Instant::now();
        let (status, body) = http_get(&pair.server, LISTEN, "/metrics").expect("scrape");
        let elapsed = started.elapsed();
        assert_eq!(status, 200, "{body}");
        let samples = body
            .lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .count();
        let per_prefix = body
            .lines()
            .filter(|line| line.starts_with("smtpguard_rule_matches_total{"))
            .count();
        println!(
            "{:>10} {:>12} {:>10} {:>14} {:>8.0} ms",
            series,
            body.len(),
            samples,
            per_prefix,
            elapsed.as_secs_f64() * 1e3
        );
    }
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
    println!();
}

fn machine() {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .map(|model| model.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    // SAFETY: sysconf has no preconditions.
    let cores = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    println!("machine: {cpu}, {cores} cores, Linux {}", kernel.trim());
    println!();
}

fn syn4(tags: &[frames::Tag], src: Ipv4Addr, flags: u8) -> Vec<u8> {
    frames::segment_frame(
        frames::DST_MAC,
        tags,
        src.into(),
        DST4.into(),
        40000,
        25,
        flags,
    )
}

/// Median over [`ROUNDS`] of the kernel's per-repetition time, in ns.
fn timed(mut run: impl FnMut() -> Duration) -> f64 {
    let mut samples: Vec<f64> = (0..ROUNDS).map(|_| run().as_secs_f64() * 1e9).collect();
    median(&mut samples)
}

/// Part 1: BPF_PROG_TEST_RUN.
fn per_packet(sizes: &[usize]) {
    println!(
        "1. per-packet cost, BPF_PROG_TEST_RUN (kernel timing, median of {ROUNDS} runs of {REPEAT} repetitions; many sources: {MANY_SOURCES} distinct unlisted sources, each run once)"
    );
    println!(
        "{:>9}  {:<32} {:>10} {:>10} {:>7}",
        "prefixes", "case", "smtpguard", "floor", "ratio"
    );
    let mut floor = Floor::load();
    let (mut filter, mut maps) = Filter::load(None).expect("load smtpguard");
    for &size in sizes {
        let mut rng = Rng::new(0x5eed_0000 + size as u64);
        let mut nets = random_v4_prefixes(&mut rng, size);
        nets.extend(random_v6_prefixes(&mut rng, size));
        nets.push("192.0.2.0/28".parse().expect("prefix"));
        let policy = allow_policy(nets);
        let started = Instant::now();
        let report = maps.apply(&policy).expect("apply");
        let applied = started.elapsed();
        let unlisted = unlisted_v4(&mut rng, &policy);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("unlisted IPv4 SYN", syn4(&[], unlisted, SYN)),
            ("allowed IPv4 SYN", syn4(&[], ALLOWED4, SYN)),
            (
                "unlisted IPv6 SYN",
                frames::segment_frame(
                    frames::DST_MAC,
                    &[],
                    UNLISTED6.into(),
                    DST6.into(),
                    40000,
                    25,
                    SYN,
                ),
            ),
            (
                "QinQ unlisted IPv4 SYN",
                syn4(&[dot1ad(7), dot1q(42)], unlisted, SYN),
            ),
            ("non-SYN (ACK) IPv4", syn4(&[], unlisted, ACK)),
        ];
        for (name, frame) in &cases {
            let ours = timed(|| filter.time_run(frame, REPEAT).expect("test run"));
            let base = timed(|| floor.time_run(frame, REPEAT));
            println!(
                "{size:>9}  {name:<32} {ours:>8.1}ns {base:>8.1}ns {:>6.2}x",
                ours / base
            );
            match (size, *name) {
                (1_000_000, "allowed IPv4 SYN") => figure(7, format!("{:.2}x", ours / base)),
                (100_000, "unlisted IPv6 SYN") => figure(8, format!("{:.2}x", ours / base)),
                _ => {}
            }
        }
        // Many distinct sources, one run each: no source is hot in the cache.
        let sources: Vec<Vec<u8>> = (0..MANY_SOURCES)
            .map(|_| syn4(&[], unlisted_v4(&mut rng, &policy), SYN))
            .collect();
        let mut ours: Vec<f64> = sources
            .iter()
            .map(|frame| filter.time_run(frame, 1).expect("test run").as_secs_f64() * 1e9)
            .collect();
        let mut base: Vec<f64> = sources
            .iter()
            .map(|frame| floor.time_run(frame, 1).as_secs_f64() * 1e9)
            .collect();
        let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len() as f64;
        let (ours_mean, base_mean) = (mean(&ours), mean(&base));
        let (ours_median, base_median) = (median(&mut ours), median(&mut base));
        println!(
            "{size:>9}  {:<32} {ours_median:>8.1}ns {base_median:>8.1}ns {:>6.2}x   (means {ours_mean:.1} / {base_mean:.1} ns)",
            "many unlisted IPv4 sources",
            ours_median / base_median
        );
        if size == 1_000_000 {
            figure(6, format!("{:.2}x", ours_median / base_median));
        }
        println!(
            "{size:>9}  applied {} + {} prefixes through the maps in {:.0} ms ({} entries written)",
            size,
            size,
            applied.as_secs_f64() * 1e3,
            report.written
        );
    }
    println!();
}

/// A flood configuration: what is attached on the server side of the veth.
enum Receiver {
    /// Nothing attached, the server's end down: what sending alone costs.
    SenderOnly,
    Floor {
        native: bool,
    },
    Smtpguard {
        prefixes: usize,
        native: bool,
        canary: Canary,
    },
    Nftables {
        prefixes: usize,
    },
}

/// Whether a canary runs beside the daemon's policy in a flood run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Canary {
    Off,
    /// The candidate decides every flood SYN as the policy does: the cost of comparing.
    Alike,
    /// The candidate lets every flood SYN in: each one is recorded (random sources, more
    /// than the table holds: the worst case).
    Differs,
}

/// Flood runs per receiver; the median is reported.
const FLOOD_ROUNDS: usize = 3;

fn mode_name(native: bool) -> &'static str {
    if native { "native" } else { "generic" }
}

/// Part 2: SYN flood over a veth pair.
fn flood(packets: usize) {
    println!(
        "2. SYN flood over a veth pair, {packets} frames from an AF_PACKET socket, random sources, all unlisted (median of {FLOOD_ROUNDS} runs)"
    );
    println!(
        "{:<48} {:>11} {:>15} {:>12} {:>9}",
        "receiver", "CPU ns/pkt", "receive ns/pkt", "prog ns/pkt", "dropped"
    );
    let _stats =
        aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("enable BPF run-time stats");
    let mut results: Vec<(String, f64)> = Vec::new();
    let mut cpu: Vec<(String, f64)> = Vec::new();
    let mut sender_only = 0.0;
    for receiver in [
        Receiver::SenderOnly,
        Receiver::Floor { native: true },
        Receiver::Smtpguard {
            prefixes: 10,
            native: true,
            canary: Canary::Off,
        },
        Receiver::Smtpguard {
            prefixes: 10,
            native: true,
            canary: Canary::Alike,
        },
        Receiver::Smtpguard {
            prefixes: 10,
            native: true,
            canary: Canary::Differs,
        },
        Receiver::Smtpguard {
            prefixes: 100_000,
            native: true,
            canary: Canary::Off,
        },
        Receiver::Floor { native: false },
        Receiver::Smtpguard {
            prefixes: 10,
            native: false,
            canary: Canary::Off,
        },
        Receiver::Smtpguard {
            prefixes: 100_000,
            native: false,
            canary: Canary::Off,
        },
        Receiver::Nftables { prefixes: 10 },
        Receiver::Nftables { prefixes: 100_000 },
    ] {
        let runs: Vec<(String, f64, Option<f64>, f64)> = (0..FLOOD_ROUNDS)
            .map(|_| flood_once(&receiver, packets))
            .collect();
        let name = runs[0].0.clone();
        let cpu_ns = median(&mut runs.iter().map(|run| run.1).collect::<Vec<_>>());
        let program_ns = runs
            .iter()
            .map(|run| run.2)
            .collect::<Option<Vec<f64>>>()
            .map(|mut values| median(&mut values));
        let dropped = runs.iter().map(|run| run.3).fold(f64::INFINITY, f64::min);
        let receive = cpu_ns - sender_only;
        if matches!(receiver, Receiver::SenderOnly) {
            sender_only = cpu_ns;
        }
        println!(
            "{name:<48} {cpu_ns:>11.0} {:>15} {:>12} {:>8.2}%",
            if matches!(receiver, Receiver::SenderOnly) {
                "-".to_owned()
            } else {
                format!("{receive:.0}")
            },
            program_ns.map_or("-".to_owned(), |ns| format!("{ns:.1}")),
            dropped * 100.0
        );
        results.push((name.clone(), receive));
        cpu.push((name, cpu_ns));
    }
    let cpu_of = |name: &str| {
        cpu.iter()
            .find(|(label, _)| label == name)
            .map_or(f64::NAN, |(_, value)| *value)
    };
    figure(
        9,
        format!(
            "{:.2}x",
            cpu_of("smtpguard, 10 prefixes, native") / cpu_of("floor (XDP_DROP), native")
        ),
    );
    let get = |name: &str| {
        results
            .iter()
            .find(|(label, _)| label == name)
            .map_or(f64::NAN, |(_, value)| *value)
    };
    for native in [true, false] {
        let mode = mode_name(native);
        let floor = get(&format!("floor (XDP_DROP), {mode}"));
        let (ten, many) = (
            get(&format!("smtpguard, 10 prefixes, {mode}")),
            get(&format!("smtpguard, 100000 prefixes, {mode}")),
        );
        println!(
            "receive-side ratios, {mode} XDP: smtpguard/floor {:.2}x at 10 prefixes, {:.2}x at 100k; nftables/smtpguard {:.2}x at 10, {:.2}x at 100k",
            ten / floor,
            many / floor,
            get("nftables, 10 prefixes") / ten,
            get("nftables, 100000 prefixes") / many,
        );
    }
    let ten = get("smtpguard, 10 prefixes, native");
    println!(
        "canary, native XDP, 10 prefixes: smtpguard/floor {:.2}x without, {:.2}x with a canary that agrees, {:.2}x with one that records every SYN (vs no canary: {:.2}x, {:.2}x)",
        ten / get("floor (XDP_DROP), native"),
        get("smtpguard, 10 prefixes, native, canary alike") / get("floor (XDP_DROP), native"),
        get("smtpguard, 10 prefixes, native, canary differs") / get("floor (XDP_DROP), native"),
        get("smtpguard, 10 prefixes, native, canary alike") / ten,
        get("smtpguard, 10 prefixes, native, canary differs") / ten,
    );
    println!();
}

/// One flood run: (name, busy CPU ns per frame sent, XDP program ns per run, share dropped).
fn flood_once(receiver: &Receiver, packets: usize) -> (String, f64, Option<f64>, f64) {
    let pair = Pair::new(&[]);
    let mac = pair.server_mac();
    let mut rng = Rng::new(0xf100d);
    let prefixes = match receiver {
        Receiver::Smtpguard { prefixes, .. } | Receiver::Nftables { prefixes } => *prefixes,
        _ => 10,
    };
    let nets = random_v4_prefixes(&mut rng, prefixes);
    let policy = allow_policy(nets.clone());
    let frames: Vec<Vec<u8>> = (0..65_536)
        .map(|index| {
            let src = unlisted_v4(&mut rng, &policy);
            frames::segment_frame(
                mac,
                &[],
                src.into(),
                DST4.into(),
                1024 + (index % 60_000) as u16,
                25,
                SYN,
            )
        })
        .collect();
    let dir = std::env::temp_dir().join(format!("sg-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let mut floor = None;
    let mut daemon = None;
    let name = match receiver {
        Receiver::SenderOnly => {
            smtpguard_tests::netns::ip(&[
                "-n",
                &pair.server.name,
                "link",
                "set",
                &pair.server_if,
                "down",
            ]);
            "sender only (peer down)".to_owned()
        }
        Receiver::Floor { native } => {
            let interface = pair.server_if.clone();
            let mut program = Floor::load();
            let mode = if *native {
                aya::programs::XdpMode::Driver
            } else {
                aya::programs::XdpMode::Skb
            };
            pair.server.run(|| {
                program
                    .xdp()
                    .attach(&interface, mode)
                    .expect("attach the floor");
            });
            floor = Some(program);
            format!("floor (XDP_DROP), {}", mode_name(*native))
        }
        Receiver::Smtpguard {
            prefixes,
            native,
            canary,
        } => {
            let list = dir.join("allow.txt");
            let text: String = nets.iter().map(|net| format!("{net}\n")).collect();
            std::fs::write(&list, text).expect("list");
            let config = format!(
                "interfaces = [\"{}\"]\nxdp_mode = \"{}\"\non_exit = \"detach\"\n[[allow]]\nname = \"bench\"\nfiles = [\"{}\"]\n",
                pair.server_if,
                if *native { "native" } else { "skb" },
                list.display()
            );
            let started = Daemon::start(&pair.server, &config);
            let canary_name = match canary {
                Canary::Off => "",
                Canary::Alike => ", canary alike",
                Canary::Differs => ", canary differs",
            };
            if *canary != Canary::Off {
                let allow = if *canary == Canary::Alike {
                    format!("files = [\"{}\"]", list.display())
                } else {
                    "prefixes = [\"0.0.0.0/1\", \"128.0.0.0/1\"]".to_owned()
                };
                let candidate = dir.join("candidate.toml");
                std::fs::write(
                    &candidate,
                    format!(
                        "interfaces = [\"{}\"]\nxdp_mode = \"native\"\non_exit = \"detach\"\n[[allow]]\nname = \"candidate\"\n{allow}\n[[deny]]\nname = \"other\"\nprefixes = [\"192.0.2.99\"]\n",
                        pair.server_if
                    ),
                )
                .expect("candidate");
                started.cli(&["try", "--config", candidate.to_str().expect("path")]);
            }
            daemon = Some(started);
            format!(
                "smtpguard, {prefixes} prefixes, {}{canary_name}",
                mode_name(*native)
            )
        }
        Receiver::Nftables { prefixes } => {
            nftables(&pair, &nets, &dir);
            format!("nftables, {prefixes} prefixes")
        }
    };
    let socket = PacketSocket::open(&pair.client, &pair.client_if);
    for frame in frames.iter().take(1000) {
        socket.try_send(frame);
    }
    std::thread::sleep(Duration::from_millis(100));
    let program_before = program_stats(floor.as_mut(), daemon.is_some());
    let nft_before = nft_drops(&pair);
    let busy_before = busy_cpu_ns();
    let mut accepted = 0;
    for index in 0..packets {
        // A refused send (the peer down, a full queue) still cost the sender its syscall.
        accepted += usize::from(socket.try_send(&frames[index % frames.len()]));
    }
    std::thread::sleep(Duration::from_millis(50));
    let busy = busy_cpu_ns() - busy_before;
    let program_after = program_stats(floor.as_mut(), daemon.is_some());
    let program_ns = match (program_before, program_after) {
        (Some((time0, count0)), Some((time1, count1))) if count1 > count0 => {
            Some((time1 - time0) as f64 / (count1 - count0) as f64)
        }
        _ => None,
    };
    let dropped = match receiver {
        Receiver::Floor { .. } | Receiver::Smtpguard { .. } => program_before
            .zip(program_after)
            .map_or(0.0, |((_, c0), (_, c1))| (c1 - c0) as f64 / packets as f64),
        Receiver::Nftables { .. } => (nft_drops(&pair) - nft_before) as f64 / packets as f64,
        Receiver::SenderOnly => 0.0,
    };
    if let Some(daemon) = daemon.as_ref() {
        // The program's own counters say what it dropped: every frame the socket took (a
        // send refused by a full queue never reached it), once the receiver has caught up.
        let deadline = Instant::now() + Duration::from_secs(2);
        let dropped_by_program = loop {
            let dropped = daemon.stats()["dropped"].as_u64().unwrap_or(0) as usize;
            if dropped >= accepted || Instant::now() > deadline {
                break dropped;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            dropped_by_program >= accepted,
            "smtpguard dropped {dropped_by_program} of the {accepted} frames the socket took ({packets} sent)"
        );
    }
    drop(daemon);
    drop(floor);
    let _ = std::fs::remove_dir_all(&dir);
    (name, busy as f64 / packets as f64, program_ns, dropped)
}

/// (run time ns, run count) of the XDP program in use: the floor, or the daemon's.
fn program_stats(floor: Option<&mut Floor>, daemon: bool) -> Option<(u64, u64)> {
    let info = if let Some(floor) = floor {
        floor.xdp().info().ok()?
    } else if daemon {
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter(|info| info.name_as_str() == Some("smtpguard"))
            .max_by_key(|info| info.id())?
    } else {
        return None;
    };
    Some((info.run_time().as_nanos() as u64, info.run_count()))
}

/// The same policy as an nftables ruleset: netdev ingress, an interval set of the prefixes.
fn nftables(pair: &Pair, nets: &[IpNet], dir: &Path) {
    let elements: Vec<String> = nets.iter().map(ToString::to_string).collect();
    let ruleset = format!(
        "table netdev sgbench {{\n  set allow {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {} }} }}\n  chain ingress {{\n    type filter hook ingress device \"{}\" priority -500; policy accept;\n    tcp dport 25 tcp flags & (syn | ack) == syn ip saddr != @allow counter drop\n  }}\n}}\n",
        elements.join(", "),
        pair.server_if
    );
    let path = dir.join("ruleset.nft");
    std::fs::write(&path, ruleset).expect("ruleset");
    let output = Command::new("ip")
        .args(["netns", "exec", &pair.server.name, "nft", "-f"])
        .arg(&path)
        .output()
        .expect("run nft (install nftables: cargo xtask setup)");
    assert!(
        output.status.success(),
        "nft -f: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Packets the nftables drop rule counted, 0 without the table.
fn nft_drops(pair: &Pair) -> u64 {
    let Ok(output) = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pair.server.name,
            "nft",
            "list",
            "chain",
            "netdev",
            "sgbench",
            "ingress",
        ])
        .output()
    else {
        return 0;
    };
    let text = String::from_utf8_lossy(&output.stdout);
    text.split("counter packets ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|count| count.parse().ok())
        .unwrap_or(0)
}

/// Part 3: policy apply through the real daemon, from SIGHUP to the new policy in force.
/// Part 7: what the daemon does between reading the configuration and writing the maps, for
/// `size` IPv4 + `size` IPv6 prefixes in two list files: read the files, build the policy.
fn build(size: usize) {
    use smtpguard::{
        policy::Policy,
        source::{config::Config, fetch::Fetched, listfile},
    };

    println!(
        "7. building the policy in-process from two list files of {size} prefixes each (median of {ROUNDS})"
    );
    let dir = std::env::temp_dir().join(format!("sg-build-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (v4, v6) = (dir.join("v4.txt"), dir.join("v6.txt"));
    let mut rng = Rng::new(1);
    let text = |nets: Vec<IpNet>| {
        nets.iter()
            .map(|net| format!("{net}\n"))
            .collect::<String>()
    };
    std::fs::write(&v4, text(random_v4_prefixes(&mut rng, size))).expect("v4 list");
    std::fs::write(&v6, text(random_v6_prefixes(&mut rng, size))).expect("v6 list");
    let config = Config::parse(
        &dir.join("bench.toml"),
        &format!(
            "interfaces = [\"eth0\"]\n[safety]\nmax_coverage_v4 = 0\nmax_coverage_v6 = 0\n[[allow]]\nname = \"bench\"\nfiles = [\"{}\", \"{}\"]\n",
            v4.display(),
            v6.display()
        ),
    )
    .expect("config");
    let (mut read, mut built, mut dropped) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let started = Instant::now();
        let mut fetched = Fetched::default();
        for path in [&v4, &v6] {
            fetched
                .files
                .insert(path.clone(), listfile::read(path).expect("list file"));
        }
        read.push(started.elapsed().as_secs_f64());
        let started = Instant::now();
        let (policy, _) = Policy::build(&config, &fetched).expect("policy");
        built.push(started.elapsed().as_secs_f64());
        assert_eq!(
            policy.entries().count(),
            2 * size,
            "every prefix in the policy"
        );
        let started = Instant::now();
        drop((policy, fetched));
        dropped.push(started.elapsed().as_secs_f64());
    }
    println!(
        "{:>20} {:>14} {:>14} {:>14}",
        "prefixes (v4 + v6)", "read files", "build policy", "free both"
    );
    println!(
        "{:>20} {:>12.3} s {:>12.3} s {:>12.3} s",
        format!("{size} + {size}"),
        median(&mut read),
        median(&mut built),
        median(&mut dropped)
    );
    let _ = std::fs::remove_dir_all(&dir);
    println!();
}

fn apply(sizes: &[usize]) {
    println!(
        "3. policy apply through the real daemon, every prefix replaced: SIGHUP -> flip (list files re-read, policy built, maps written, one store), and -> state file recorded"
    );
    println!(
        "{:>20} {:>11} {:>14} {:>14} {:>12} {:>14}",
        "prefixes (v4 + v6)", "start", "SIGHUP->flip", "SIGHUP->state", "maps write", "map memory"
    );
    for &size in sizes {
        let pair = Pair::new(&[]);
        let dir = std::env::temp_dir().join(format!("sg-apply-{}-{size}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (v4, v6) = (dir.join("v4.txt"), dir.join("v6.txt"));
        let write_lists = |seed: u64| {
            let mut rng = Rng::new(seed);
            let text = |nets: Vec<IpNet>| {
                nets.iter()
                    .map(|net| format!("{net}\n"))
                    .collect::<String>()
            };
            std::fs::write(&v4, text(random_v4_prefixes(&mut rng, size))).expect("v4 list");
            std::fs::write(&v6, text(random_v6_prefixes(&mut rng, size))).expect("v6 list");
        };
        write_lists(1);
        let config = format!(
            "interfaces = [\"{}\"]\non_exit = \"detach\"\n[safety]\nmax_coverage_v4 = 0\nmax_coverage_v6 = 0\n[[allow]]\nname = \"bench\"\nfiles = [\"{}\", \"{}\"]\n",
            pair.server_if,
            v4.display(),
            v6.display()
        );
        let started = Instant::now();
        let mut daemon = Daemon::start_timeout(&pair.server, &config, Duration::from_secs(300));
        let start = started.elapsed();
        // A whole new set: every entry of the standby slot is replaced.
        write_lists(2);
        let before = daemon.log().matches("reloaded:").count();
        let started = Instant::now();
        daemon.signal(libc::SIGHUP);
        daemon.wait_for_generation(2, Duration::from_secs(300));
        let sighup = started.elapsed();
        // The log line follows the state file by a moment.
        let deadline = Instant::now() + Duration::from_secs(30);
        while daemon.log().matches("reloaded:").count() <= before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let log = daemon.log();
        let after_signal = |marker: &str| {
            log.lines()
                .filter(|line| line.contains(marker))
                .nth(before)
                .and_then(|line| line.split(marker).nth(1))
                .and_then(|rest| rest.split(" ms").next())
                .and_then(|ms| ms.trim().parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        let write_ms = log
            .split("reloaded:")
            .nth(before + 1)
            .and_then(|rest| rest.lines().next())
            .and_then(|line| line.split(" in ").last())
            .and_then(|rest| rest.split(" ms").next())
            .and_then(|ms| ms.trim().parse::<f64>().ok())
            .unwrap_or(f64::NAN);
        let in_force_ms = after_signal("in force ");
        let memory = map_memory(daemon.pid() as u32);
        println!(
            "{:>20} {:>9.2} s {:>12.3} s {:>12.3} s {:>9.0} ms {:>10.1} MiB",
            format!("{size} + {size}"),
            start.as_secs_f64(),
            in_force_ms / 1e3,
            sighup.as_secs_f64(),
            write_ms,
            memory as f64 / (1 << 20) as f64
        );
        let row = |hundred_k: usize, million: usize| match size {
            100_000 => Some(hundred_k),
            1_000_000 => Some(million),
            _ => None,
        };
        if let Some(row) = row(0, 2) {
            figure(row, format!("{:.2} s", in_force_ms / 1e3));
        }
        if let Some(row) = row(1, 4) {
            figure(row, format!("{:.2} s", sighup.as_secs_f64()));
        }
        if size == 1_000_000 {
            figure(3, format!("{:.1} s", start.as_secs_f64()));
            figure(10, format!("{:.0} MiB", memory as f64 / (1 << 20) as f64));
        }
        // Two reloads back to back: the second's flip must not wait for the first's state
        // file (written off the reload path).
        write_lists(3);
        daemon.signal(libc::SIGHUP);
        daemon.wait_for_log("generation 3 in force", 1, Duration::from_secs(300));
        write_lists(4);
        let started = Instant::now();
        daemon.signal(libc::SIGHUP);
        daemon.wait_for_log("generation 4 in force", 1, Duration::from_secs(300));
        let second = started.elapsed();
        println!(
            "{:>20} a second SIGHUP at the first one's flip, while its state is written: flip {:.3} s after it",
            "",
            second.as_secs_f64()
        );
        if size == 1_000_000 {
            figure(5, format!("{:.2} s", second.as_secs_f64()));
        }
        if std::env::var_os("SMTPGUARD_BENCH_LOG").is_some() {
            eprintln!("{log}");
        }
        drop(daemon);
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!();
}
