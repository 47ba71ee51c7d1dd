//! Restarts and upgrades never open a window: a daemon applies its policy before its program
//! sees a packet, keeps the old program where the link swap fails, and a build whose map
//! layout differs (a package upgrade) builds its own maps, swaps its program onto the same
//! pinned link in one step, carries the counters over and only then removes the old maps,
//! all under a prober that must see no unlisted SYN through and no allowed connect lost.
//! The second build is the test-only `upgrade-test` one (`daemon::upgrade_binary`).

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use aya::programs::links::{FdLink, PinnedLink};
use smtpguard::instance::Instance;
use smtpguard_tests::{
    daemon::{Daemon, prefix_syns, upgrade_binary},
    netns::{Listener, Outcome, Pair, SERVER_V4, connect, sock},
};

const ALLOWED4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const NEWLY_ALLOWED4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 77);
const UNLISTED4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const BLOCKED_WAIT: Duration = Duration::from_millis(700);

fn config(interface: &str, extra_allowed: &str) -> String {
    format!(
        "interfaces = [\"{interface}\"]\n\n[[allow]]\nname = \"provider\"\nprefixes = [\"192.0.2.0/28\"{extra_allowed}]\n"
    )
}

fn attempt(pair: &Pair, src: Ipv4Addr, wait: Duration) -> Outcome {
    connect(&pair.client, IpAddr::V4(src), sock(SERVER_V4, 25), wait).0
}

fn link_pin(daemon: &Daemon, interface: &str) -> PathBuf {
    Instance::new(&daemon.instance)
        .expect("instance")
        .pin_dir()
        .join(format!("link_{interface}"))
}

/// (link id, program id) of the link pinned at `path`.
fn link_info(path: &Path) -> (u32, u32) {
    let pinned = PinnedLink::from_pin(path)
        .unwrap_or_else(|error| panic!("no link pinned at {}: {error}", path.display()));
    let info = FdLink::from(pinned).info().expect("link info");
    (info.id(), info.program_id())
}

/// The folders of maps pinned for `daemon`'s instance.
fn maps_dirs(daemon: &Daemon) -> Vec<String> {
    let dir = Instance::new(&daemon.instance).expect("instance").pin_dir();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("maps-"))
        .collect();
    names.sort();
    names
}

/// Runs `during` while a prober keeps trying an unlisted and an allowed source; returns
/// the allowed connects made and every violation (an unlisted connect, a lost allowed one).
fn under_prober(pair: &Pair, during: impl FnOnce()) -> (u64, Vec<String>) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let prober = scope.spawn(|| {
            let (mut allowed_ok, mut violations) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match attempt(pair, UNLISTED4, Duration::from_millis(150)) {
                    Outcome::TimedOut => {}
                    other => violations.push(format!("unlisted: {other:?}")),
                }
                match attempt(pair, ALLOWED4, Duration::from_millis(900)) {
                    Outcome::Connected => allowed_ok += 1,
                    other => violations.push(format!("allowed: {other:?}")),
                }
            }
            (allowed_ok, violations)
        });
        std::thread::sleep(Duration::from_millis(300));
        during();
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        prober.join().expect("prober")
    })
}

#[test]
fn an_upgrade_to_another_map_layout_swaps_in_place_and_carries_the_counters() {
    let pair = Pair::new(&[ALLOWED4.into(), UNLISTED4.into()]);
    let smtp = Listener::start(&pair.server, 25);
    let mut daemon = Daemon::start(&pair.server, &config(&pair.server_if, ""));
    assert_eq!(attempt(&pair, ALLOWED4, BLOCKED_WAIT), Outcome::Connected);
    assert_eq!(attempt(&pair, UNLISTED4, BLOCKED_WAIT), Outcome::TimedOut);
    let before = daemon.stats();
    let dropped_before = before["dropped"].as_u64().unwrap_or(0);
    assert_eq!(prefix_syns(&before, "192.0.2.0/28"), 1, "{before}");
    let old_maps = maps_dirs(&daemon);
    assert_eq!(old_maps.len(), 1, "one layout in force: {old_maps:?}");
    let pin = link_pin(&daemon, &pair.server_if);
    let (link_id, old_program) = link_info(&pin);
    let generation = daemon.generation();
    assert!(daemon.stop().success());

    daemon.switch_binary(upgrade_binary(), &[]);
    let (allowed_ok, violations) = under_prober(&pair, || {
        daemon.restart(&pair.server, generation);
    });
    assert!(
        violations.is_empty(),
        "during the upgrade: {violations:?}\n{}",
        daemon.log()
    );
    assert!(
        allowed_ok >= 1,
        "the prober ran: {allowed_ok} allowed connects"
    );

    let log = daemon.log();
    assert!(log.contains("maps of another layout are in force"), "{log}");
    assert!(log.contains("upgrade: carried over"), "{log}");
    let (same_link, new_program) = link_info(&pin);
    assert_eq!(
        same_link, link_id,
        "the same pinned link, program swapped in place"
    );
    assert_ne!(
        new_program, old_program,
        "the upgraded build's program runs"
    );
    let new_maps = maps_dirs(&daemon);
    assert_eq!(new_maps.len(), 1, "the old maps are gone: {new_maps:?}");
    assert_ne!(
        new_maps, old_maps,
        "the upgrade brought maps of its own layout"
    );
    assert!(
        daemon.generation() > generation,
        "the generation count goes on"
    );

    // Counters carried over: what the old maps counted, plus what the prober added.
    let after = daemon.stats();
    assert_eq!(
        prefix_syns(&after, "192.0.2.0/28"),
        1 + allowed_ok,
        "{after}"
    );
    assert!(
        after["dropped"].as_u64().unwrap_or(0) > dropped_before,
        "drops went on counting: {after}"
    );
    assert_eq!(
        smtp.accepted_settled(1 + allowed_ok as usize),
        1 + allowed_ok as usize
    );
}

#[test]
fn a_failed_swap_in_an_upgrade_leaves_the_previous_filter_in_force() {
    let pair = Pair::new(&[ALLOWED4.into(), UNLISTED4.into()]);
    let _smtp = Listener::start(&pair.server, 25);
    let mut daemon = Daemon::start(&pair.server, &config(&pair.server_if, ""));
    let pin = link_pin(&daemon, &pair.server_if);
    let (_, old_program) = link_info(&pin);
    let old_maps = maps_dirs(&daemon);
    assert!(daemon.stop().success());

    daemon.switch_binary(upgrade_binary(), &[("SMTPGUARD_FAIL_LINK_UPDATE", "1")]);
    let status = daemon.start_expecting_exit(&pair.server, Duration::from_secs(20));
    assert!(
        !status.success(),
        "the upgrade cannot complete:\n{}",
        daemon.log()
    );
    assert!(
        daemon.log().contains("upgrade incomplete"),
        "{}",
        daemon.log()
    );
    assert_eq!(link_info(&pin).1, old_program, "the previous program stays");
    assert!(
        maps_dirs(&daemon).contains(&old_maps[0]),
        "the previous maps stay: {:?}",
        maps_dirs(&daemon)
    );
    assert_eq!(
        attempt(&pair, UNLISTED4, BLOCKED_WAIT),
        Outcome::TimedOut,
        "still enforced"
    );
    assert_eq!(
        attempt(&pair, ALLOWED4, BLOCKED_WAIT),
        Outcome::Connected,
        "still allowed"
    );
}

#[test]
fn a_failed_swap_on_the_same_layout_keeps_the_old_program_and_applies_the_new_policy() {
    let pair = Pair::new(&[ALLOWED4.into(), NEWLY_ALLOWED4.into(), UNLISTED4.into()]);
    let _smtp = Listener::start(&pair.server, 25);
    // Only the upgrade build can be told to fail a swap: run it from a clean slate, twice,
    // so both runs share one layout.
    let mut daemon = Daemon::start(&pair.server, &config(&pair.server_if, ""));
    assert!(daemon.stop().success());
    let _ = daemon.cli(&["detach"]);
    daemon.switch_binary(upgrade_binary(), &[]);
    daemon.restart(&pair.server, 0);
    assert_eq!(
        attempt(&pair, NEWLY_ALLOWED4, BLOCKED_WAIT),
        Outcome::TimedOut
    );
    let pin = link_pin(&daemon, &pair.server_if);
    let (_, old_program) = link_info(&pin);
    let generation = daemon.generation();
    assert!(daemon.stop().success());

    std::fs::write(
        &daemon.config_path,
        config(&pair.server_if, ", \"192.0.2.77\""),
    )
    .expect("config");
    daemon.switch_binary(upgrade_binary(), &[("SMTPGUARD_FAIL_LINK_UPDATE", "1")]);
    let (allowed_ok, violations) = under_prober(&pair, || {
        daemon.restart(&pair.server, generation);
    });
    assert!(
        violations.is_empty(),
        "during the takeover: {violations:?}\n{}",
        daemon.log()
    );
    assert!(allowed_ok >= 1, "the prober ran: {allowed_ok}");
    assert!(
        daemon.log().contains("the previous program stays attached"),
        "{}",
        daemon.log()
    );
    assert_eq!(
        link_info(&pin).1,
        old_program,
        "the old program was kept, not unpinned"
    );
    assert_eq!(
        attempt(&pair, NEWLY_ALLOWED4, BLOCKED_WAIT),
        Outcome::Connected,
        "the new policy is in force through the old program"
    );
    assert_eq!(attempt(&pair, UNLISTED4, BLOCKED_WAIT), Outcome::TimedOut);
}

#[test]
fn maps_pinned_before_layout_stamps_are_upgraded_without_detach() {
    let pair = Pair::new(&[ALLOWED4.into(), UNLISTED4.into()]);
    let _smtp = Listener::start(&pair.server, 25);
    let mut daemon = Daemon::start(&pair.server, &config(&pair.server_if, ""));
    assert_eq!(attempt(&pair, ALLOWED4, BLOCKED_WAIT), Outcome::Connected);
    let pin = link_pin(&daemon, &pair.server_if);
    let (link_id, _) = link_info(&pin);
    let generation = daemon.generation();
    assert!(daemon.stop().success());
    // As an earlier smtpguard left them: maps straight in the pin directory, a state file
    // without a layout.
    let instance = Instance::new(&daemon.instance).expect("instance");
    let maps = instance.maps_dir(smtpguard_common::LAYOUT_STAMP);
    for entry in std::fs::read_dir(&maps).expect("maps dir") {
        let entry = entry.expect("entry");
        std::fs::rename(entry.path(), instance.pin_dir().join(entry.file_name()))
            .expect("move a pin up (bpffs renames)");
    }
    std::fs::remove_dir(&maps).expect("empty maps dir");
    let state_path = instance.state_path();
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_path).expect("state")).expect("json");
    state.as_object_mut().expect("object").remove("layout");
    std::fs::write(&state_path, state.to_string()).expect("state");

    let (allowed_ok, violations) = under_prober(&pair, || {
        daemon.restart(&pair.server, generation);
    });
    assert!(
        violations.is_empty(),
        "during the upgrade: {violations:?}\n{}",
        daemon.log()
    );
    assert_eq!(link_info(&pin).0, link_id, "the same link");
    let stats = daemon.stats();
    assert_eq!(
        prefix_syns(&stats, "192.0.2.0/28"),
        1 + allowed_ok,
        "{stats}"
    );
    let leftovers: Vec<String> = std::fs::read_dir(instance.pin_dir())
        .expect("pin dir")
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("SG_"))
        .collect();
    assert!(leftovers.is_empty(), "the old maps are gone: {leftovers:?}");
}
