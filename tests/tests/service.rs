//! Running smtpguard like a service: with `on_exit = "keep"` (the default) the filter outlives
//! the daemon, even a SIGKILL; a restarted daemon takes it over (same link, program replaced
//! in place) without a moment where port 25 is open or wrongly closed, and its counters go
//! on; `smtpguard detach` removes it.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use aya::programs::links::{FdLink, PinnedLink};
use smtpguard_tests::{
    daemon::{Daemon, prefix_syns},
    netns::{Listener, Outcome, Pair, SERVER_V4, connect, sock},
};

const ALLOWED4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const UNLISTED4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);

fn config(interface: &str) -> String {
    format!(
        "interfaces = [\"{interface}\"]\n\n[[allow]]\nname = \"provider\"\nprefixes = [\"192.0.2.0/28\"]\n"
    )
}

fn attempt(pair: &Pair, src: Ipv4Addr, wait: Duration) -> Outcome {
    connect(&pair.client, IpAddr::V4(src), sock(SERVER_V4, 25), wait).0
}

const BLOCKED_WAIT: Duration = Duration::from_millis(700);

fn link_pin(daemon: &Daemon, interface: &str) -> PathBuf {
    Path::new("/sys/fs/bpf/smtpguard")
        .join(&daemon.instance)
        .join(format!("link_{interface}"))
}

/// (link id, program id) of the link pinned at `path`.
fn link_info(path: &Path) -> (u32, u32) {
    let pinned = PinnedLink::from_pin(path)
        .unwrap_or_else(|error| panic!("no link pinned at {}: {error}", path.display()));
    let info = FdLink::from(pinned).info().expect("link info");
    (info.id(), info.program_id())
}

#[test]
fn the_filter_outlives_a_killed_daemon_and_a_restart_takes_over_without_a_gap() {
    let pair = Pair::new(&[ALLOWED4.into(), UNLISTED4.into()]);
    let smtp = Listener::start(&pair.server, 25);
    let mut daemon = Daemon::start(&pair.server, &config(&pair.server_if));
    assert_eq!(attempt(&pair, ALLOWED4, BLOCKED_WAIT), Outcome::Connected);
    assert_eq!(attempt(&pair, UNLISTED4, BLOCKED_WAIT), Outcome::TimedOut);
    let pin = link_pin(&daemon, &pair.server_if);
    let (link_id, first_program) = link_info(&pin);

    // SIGKILL: nothing is cleaned up, the pinned link keeps the program attached.
    daemon.kill();
    assert_eq!(
        attempt(&pair, UNLISTED4, BLOCKED_WAIT),
        Outcome::TimedOut,
        "still enforced after SIGKILL"
    );
    assert_eq!(
        attempt(&pair, ALLOWED4, BLOCKED_WAIT),
        Outcome::Connected,
        "allowed after SIGKILL"
    );
    let stats = daemon.stats();
    assert_eq!(stats["daemon_running"], false, "{stats}");
    assert_eq!(
        prefix_syns(&stats, "192.0.2.0/28"),
        2,
        "stats from the pins alone: {stats}"
    );
    let generation = daemon.generation();

    // Restart while a prober keeps trying both sources: no unlisted SYN may get through, no
    // allowed one may be lost.
    let stop = AtomicBool::new(false);
    let (allowed_ok, violations) = std::thread::scope(|scope| {
        let prober = scope.spawn(|| {
            let (mut allowed_ok, mut violations) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match attempt(&pair, UNLISTED4, Duration::from_millis(150)) {
                    Outcome::TimedOut => {}
                    other => violations.push(format!("unlisted: {other:?}")),
                }
                match attempt(&pair, ALLOWED4, Duration::from_millis(900)) {
                    Outcome::Connected => allowed_ok += 1,
                    other => violations.push(format!("allowed: {other:?}")),
                }
            }
            (allowed_ok, violations)
        });
        std::thread::sleep(Duration::from_millis(300));
        daemon.restart(&pair.server, generation);
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        prober.join().expect("prober")
    });
    assert!(
        violations.is_empty(),
        "during the restart: {violations:?}\n{}",
        daemon.log()
    );
    assert!(
        allowed_ok >= 2,
        "the prober ran: {allowed_ok} allowed connects"
    );
    assert!(
        daemon.log().contains("taking over the filter"),
        "{}",
        daemon.log()
    );

    // Same link, new program: replaced in place.
    let (same_link, second_program) = link_info(&pin);
    assert_eq!(same_link, link_id, "the link is the one pinned before");
    assert_ne!(
        second_program, first_program,
        "the restarted daemon's program runs on it"
    );

    // Counters went on across kill and restart.
    let stats = daemon.stats();
    assert_eq!(stats["daemon_running"], true, "{stats}");
    assert_eq!(
        prefix_syns(&stats, "192.0.2.0/28"),
        2 + allowed_ok,
        "{stats}"
    );
    assert_eq!(
        smtp.accepted_settled(2 + allowed_ok as usize),
        2 + allowed_ok as usize
    );

    // SIGTERM keeps the filter too; `detach` removes it and opens port 25.
    let status = daemon.stop();
    assert!(status.success(), "exit status {status}");
    assert_eq!(
        attempt(&pair, UNLISTED4, BLOCKED_WAIT),
        Outcome::TimedOut,
        "kept after SIGTERM"
    );
    let text = daemon.cli(&["detach"]);
    assert!(
        text.contains(&format!("detached from {}", pair.server_if)),
        "{text}"
    );
    // Off the interface when `detach` returns, not once the kernel gets round to releasing
    // the unpinned link (an RCU grace period and a work queue later).
    assert!(
        !pair.server.has_xdp(&pair.server_if),
        "no program on the interface once detach has returned"
    );
    assert_eq!(
        attempt(&pair, UNLISTED4, BLOCKED_WAIT),
        Outcome::Connected,
        "open after detach"
    );
    assert!(!pin.exists(), "link pin removed");
    assert!(!pin.parent().expect("pin dir").exists(), "pins removed");
}

#[test]
fn detach_is_refused_while_a_daemon_runs() {
    let pair = Pair::new(&[UNLISTED4.into()]);
    let daemon = Daemon::start(&pair.server, &config(&pair.server_if));
    let output = std::process::Command::new(smtpguard_tests::daemon::binary())
        .args(["--instance", &daemon.instance, "detach"])
        .output()
        .expect("run detach");
    assert!(!output.status.success());
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("is already running"), "{message}");
    assert_eq!(
        attempt(&pair, UNLISTED4, BLOCKED_WAIT),
        Outcome::TimedOut,
        "still enforced"
    );
}

/// The capabilities of a running process, from /proc/PID/status.
fn effective_capabilities(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .expect("CapEff")
        .trim();
    u64::from_str_radix(hex, 16).expect("hex capabilities")
}

#[test]
fn the_units_capabilities_are_enough() {
    let caps = smtpguard_tests::daemon::unit_capabilities();
    assert_eq!(
        caps,
        ["bpf", "net_admin", "perfmon"],
        "the unit grants these"
    );
    let pair = Pair::new(&[ALLOWED4.into(), UNLISTED4.into()]);
    let _smtp = Listener::start(&pair.server, 25);
    let text = format!(
        "{}\n[metrics]\nlisten = \"127.0.0.1:9725\"\n",
        config(&pair.server_if)
    );
    let mut daemon = Daemon::start_with(
        &pair.server,
        &text,
        smtpguard_tests::daemon::Launcher::UnitCapabilities,
    );
    // CAP_NET_ADMIN 12, CAP_PERFMON 38, CAP_BPF 39: nothing else.
    assert_eq!(
        effective_capabilities(daemon.pid()),
        (1 << 12) | (1 << 38) | (1 << 39),
        "the daemon runs with the unit's capabilities only"
    );
    assert_eq!(attempt(&pair, ALLOWED4, BLOCKED_WAIT), Outcome::Connected);
    assert_eq!(attempt(&pair, UNLISTED4, BLOCKED_WAIT), Outcome::TimedOut);
    daemon.reload(&text.replace("192.0.2.0/28", "203.0.113.0/24"));
    assert_eq!(
        attempt(&pair, UNLISTED4, BLOCKED_WAIT),
        Outcome::Connected,
        "reloaded"
    );
    let (status, body) =
        smtpguard_tests::prometheus::http_get(&pair.server, "127.0.0.1:9725", "/metrics")
            .expect("scrape");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("smtpguard_syn_total{class=\"allowed\"} 2"),
        "{body}"
    );
}

#[test]
fn systemd_hears_ready_reloading_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = std::env::temp_dir().join(format!("sg-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&path);
    let socket = UnixDatagram::bind(&path).expect("bind notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let receive = || {
        let mut buffer = [0u8; 4096];
        let n = socket.recv(&mut buffer).expect("a notification");
        String::from_utf8_lossy(&buffer[..n]).into_owned()
    };
    let pair = Pair::new(&[UNLISTED4.into()]);
    let mut daemon = Daemon::start_env(
        &pair.server,
        &config(&pair.server_if),
        smtpguard_tests::daemon::Launcher::Nsenter,
        &[("NOTIFY_SOCKET", &path.to_string_lossy())],
    );
    // A first start: the filter is attached closed at once, before the policy is built.
    let boot = receive();
    assert!(
        boot.contains("STATUS=closed until the policy is built") && !boot.contains("READY=1"),
        "{boot}"
    );
    let ready = receive();
    assert!(ready.contains("READY=1"), "{ready}");
    assert!(
        ready.contains("STATUS=enforce mode, policy generation 1"),
        "{ready}"
    );
    daemon.reload(&config(&pair.server_if));
    let reloading = receive();
    assert!(
        reloading.contains("RELOADING=1") && reloading.contains("MONOTONIC_USEC="),
        "{reloading}"
    );
    let ready = receive();
    assert!(
        ready.contains("READY=1") && ready.contains("generation 2"),
        "{ready}"
    );
    assert!(daemon.stop().success());
    assert!(receive().contains("STOPPING=1"));
    let _ = std::fs::remove_dir_all(&dir);
}
