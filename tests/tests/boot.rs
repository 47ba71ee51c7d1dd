//! The first moments of a filter, and who may touch its pins. On a host where nothing filters
//! yet (a boot) the daemon attaches at once with a closed policy, before it has resolved a
//! name or read a list, so an MTA that already listens is never open; a start that then fails
//! leaves that closed filter in force. Pin folders are created 0700, bpffs is mounted 0700 when
//! smtpguard mounts it, and a pin folder another user could have made is refused.

use std::{
    net::{IpAddr, Ipv4Addr, UdpSocket},
    os::unix::fs::PermissionsExt as _,
    process::Command,
    time::Duration,
};

use smtpguard::instance::Instance;
use smtpguard_tests::{
    daemon::{Daemon, binary},
    netns::{Listener, Outcome, Pair, SERVER_V4, connect, sock, unique_tag},
};

const ALLOWED4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const UNLISTED4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const BLOCKED_WAIT: Duration = Duration::from_millis(700);

fn attempt(pair: &Pair, src: Ipv4Addr) -> Outcome {
    connect(
        &pair.client,
        IpAddr::V4(src),
        sock(SERVER_V4, 25),
        BLOCKED_WAIT,
    )
    .0
}

fn config(interface: &str) -> String {
    format!(
        "interfaces = [\"{interface}\"]\n\n[[allow]]\nname = \"provider\"\nprefixes = [\"192.0.2.0/28\"]\n"
    )
}

#[test]
fn a_boot_is_closed_until_the_policy_is_built_and_stays_closed_if_the_start_fails() {
    let pair = Pair::new(&[ALLOWED4.into(), UNLISTED4.into()]);
    let _smtp = Listener::start(&pair.server, 25);
    // A resolver that never answers: the start waits on it for seconds, then fails (the name
    // never resolved on this host, and nothing is stored for it).
    let _silent = pair
        .server
        .run(|| UdpSocket::bind("127.0.0.1:5300").expect("bind the silent resolver"));
    let text = format!(
        "interfaces = [\"{}\"]\n\n[dns]\nresolver = \"127.0.0.1:5300\"\ntimeout_secs = 2\n\n[[allow]]\nname = \"provider\"\nprefixes = [\"192.0.2.0/28\"]\nhosts = [\"relay.provider.test\"]\n",
        pair.server_if
    );
    assert_eq!(
        attempt(&pair, UNLISTED4),
        Outcome::Connected,
        "no filter yet"
    );
    let mut daemon = Daemon::launch(&pair.server, &text);
    let state = daemon.wait_for_state("the boot policy", Duration::from_secs(5), |state| {
        state["boot"] == true
    });
    assert_eq!(state["generation"], 0, "{state}");
    assert_eq!(
        attempt(&pair, UNLISTED4),
        Outcome::TimedOut,
        "closed while the names are resolved"
    );
    assert_eq!(
        attempt(&pair, ALLOWED4),
        Outcome::TimedOut,
        "closed for everyone: senders retry"
    );
    let stats = daemon.stats();
    assert_eq!(stats["boot"], true, "{stats}");
    assert!(
        daemon
            .cli(&["stats"])
            .contains("BOOT: the policy is being built"),
        "stats says so"
    );

    let status = daemon.wait_exit(Duration::from_secs(60));
    assert!(
        !status.success(),
        "the name never resolved:\n{}",
        daemon.log()
    );
    assert!(
        daemon.log().contains("relay.provider.test"),
        "{}",
        daemon.log()
    );
    assert_eq!(
        attempt(&pair, UNLISTED4),
        Outcome::TimedOut,
        "the failed start leaves the closed filter in force (on_exit = keep)"
    );
    let text = daemon.cli(&["detach"]);
    assert!(text.contains("detached from"), "{text}");
    assert!(
        !pair.server.has_xdp(&pair.server_if),
        "no program on the interface once detach has returned"
    );
    assert_eq!(
        attempt(&pair, UNLISTED4),
        Outcome::Connected,
        "open after detach"
    );
}

/// The boot filter follows the file's scopes: a scope's own ports and mode are closed while
/// its policy is built and after a failed start, and a destination in no scope (with no
/// top-level rules) is left alone. It used to close the top level's ports only, and to attach
/// nothing when the top level audits, whatever the scopes did (found by review).
#[test]
fn a_boot_closes_each_scope_on_its_own_ports() {
    const UNSCOPED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
    let pair = Pair::new(&[UNLISTED4.into()]);
    let _smtp = Listener::start(&pair.server, 25);
    let _alt = Listener::start(&pair.server, 2525);
    let _silent = pair
        .server
        .run(|| UdpSocket::bind("127.0.0.1:5300").expect("bind the silent resolver"));
    let text = format!(
        "interfaces = [\"{}\"]\nmode = \"audit\"\nports = [25]\n\n[dns]\nresolver = \"127.0.0.1:5300\"\ntimeout_secs = 2\n\n[[scope]]\nname = \"mail\"\ndestinations = [\"{SERVER_V4}\"]\nmode = \"enforce\"\nports = [25, 2525]\n[[scope.allow]]\nname = \"provider\"\nprefixes = [\"192.0.2.0/28\"]\nhosts = [\"relay.provider.test\"]\n",
        pair.server_if
    );
    let to = |dst: Ipv4Addr, port: u16| {
        connect(
            &pair.client,
            IpAddr::V4(UNLISTED4),
            sock(dst, port),
            BLOCKED_WAIT,
        )
        .0
    };
    let mut daemon = Daemon::launch(&pair.server, &text);
    daemon.wait_for_state("the boot policy", Duration::from_secs(5), |state| {
        state["boot"] == true
    });
    let expected = [
        (SERVER_V4, 25, Outcome::TimedOut),
        (SERVER_V4, 2525, Outcome::TimedOut),
        (UNSCOPED, 25, Outcome::Connected),
    ];
    for &(dst, port, ref outcome) in &expected {
        assert_eq!(&to(dst, port), outcome, "during the boot: {dst}:{port}");
    }
    let status = daemon.wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "{}", daemon.log());
    for &(dst, port, ref outcome) in &expected {
        assert_eq!(
            &to(dst, port),
            outcome,
            "after the failed start: {dst}:{port}"
        );
    }
    let text = daemon.cli(&["detach"]);
    assert!(text.contains("detached from"), "{text}");
}

/// Scopes whose destinations the maps cannot hold (one more than the program's 65536): the
/// boot filter closes every port a scope guards for every destination instead of attaching
/// nothing, the start fails naming the line, and the closed filter stays (found by review:
/// the boot used to end with no filter at all).
#[test]
fn a_boot_filter_the_maps_refuse_closes_everything_instead() {
    let pair = Pair::new(&[UNLISTED4.into()]);
    let _smtp = Listener::start(&pair.server, 25);
    let destinations: Vec<String> = (0..=65536u32)
        .map(|n| format!("\"10.{}.{}.{}\"", 1 + (n >> 16), (n >> 8) & 0xff, n & 0xff))
        .collect();
    let text = format!(
        "interfaces = [\"{}\"]\n\n[[allow]]\nname = \"provider\"\nprefixes = [\"192.0.2.0/28\"]\n\n[[scope]]\nname = \"many\"\ndestinations = [{}]\nallow_none = true\n",
        pair.server_if,
        destinations.join(", ")
    );
    let mut daemon = Daemon::launch(&pair.server, &text);
    let status = daemon.wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "{}", daemon.log());
    let log = daemon.log();
    assert!(log.contains("boot: the scopes cannot be written"), "{log}");
    assert!(
        log.contains("\"10.2.0.0\": one too many"),
        "the refusal names the value: {log}"
    );
    assert_eq!(
        attempt(&pair, UNLISTED4),
        Outcome::TimedOut,
        "the failed start leaves a closed filter"
    );
    let text = daemon.cli(&["detach"]);
    assert!(text.contains("detached from"), "{text}");
}

#[test]
fn audit_mode_attaches_nothing_before_its_policy() {
    let pair = Pair::new(&[UNLISTED4.into()]);
    let _smtp = Listener::start(&pair.server, 25);
    let mut daemon = Daemon::start(
        &pair.server,
        &format!("mode = \"audit\"\n{}", config(&pair.server_if)),
    );
    assert!(!daemon.log().contains("boot: closed"), "{}", daemon.log());
    assert_eq!(
        attempt(&pair, UNLISTED4),
        Outcome::Connected,
        "audit passes"
    );
    assert!(daemon.stop().success());
}

/// `smtpguard run` for `instance` in `pair`'s server namespace, expected to refuse to start;
/// what it said.
fn refused_start(pair: &Pair, instance: &Instance, config_path: &std::path::Path) -> String {
    let output = Command::new("nsenter")
        .arg(format!("--net={}", pair.server.path()))
        .arg(binary())
        .args(["--instance", instance.name(), "run", "--config"])
        .arg(config_path)
        .output()
        .expect("run smtpguard");
    let text = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "the start must be refused:\n{text}"
    );
    text
}

#[test]
fn a_pin_folder_another_user_could_have_made_is_refused() {
    let pair = Pair::new(&[UNLISTED4.into()]);
    let instance = Instance::new(&format!("sg-{}", unique_tag())).expect("instance");
    let dir = instance
        .prepare_pin_dir()
        .expect("bpffs and the pin folder");
    let scratch = std::env::temp_dir().join(instance.name());
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let config_path = scratch.join("smtpguard.toml");
    std::fs::write(&config_path, config(&pair.server_if)).expect("config");

    std::os::unix::fs::chown(&dir, Some(1000), Some(1000)).expect("chown");
    let text = refused_start(&pair, &instance, &config_path);
    assert!(
        text.contains(&format!(
            "refusing {}: it is owned by uid 1000, not root",
            dir.display()
        )),
        "{text}"
    );

    std::os::unix::fs::chown(&dir, Some(0), Some(0)).expect("chown");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let text = refused_start(&pair, &instance, &config_path);
    assert!(
        text.contains(&format!(
            "refusing {}: it is writable by group or others (mode 0777)",
            dir.display()
        )),
        "{text}"
    );

    std::fs::remove_dir(&dir).expect("remove the folder");
    std::os::unix::fs::symlink("/tmp", &dir).expect("symlink");
    let text = refused_start(&pair, &instance, &config_path);
    assert!(
        text.contains(&format!(
            "refusing {}: it is a symbolic link",
            dir.display()
        )),
        "{text}"
    );
    std::fs::remove_file(&dir).expect("remove the link");
    let _ = std::fs::remove_dir_all(&scratch);
    let _ = std::fs::remove_dir_all(instance.run_dir());
}

#[test]
fn smtpguard_mounts_bpffs_0700_and_makes_its_folders_0700() {
    let pair = Pair::new(&[UNLISTED4.into()]);
    let name = format!("sg-{}", unique_tag());
    let dir = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(&dir).expect("dir");
    let config_path = dir.join("smtpguard.toml");
    std::fs::write(&config_path, config(&pair.server_if)).expect("config");
    // A private mount namespace where /sys/fs/bpf is not bpffs: the daemon mounts it.
    let script = format!(
        "umount -l /sys/fs/bpf 2>/dev/null; \
         nsenter --net={netns} {bin} --instance {name} run --config {config} >{log} 2>&1 & \
         pid=$!; \
         for i in $(seq 200); do [ -e /sys/fs/bpf/smtpguard/{name}/link_{iface} ] && break; sleep 0.05; done; \
         stat -c '%a %u %n' /sys/fs/bpf /sys/fs/bpf/smtpguard /sys/fs/bpf/smtpguard/{name}; \
         kill $pid; wait $pid; echo exit $?",
        netns = pair.server.path(),
        bin = binary().display(),
        config = config_path.display(),
        log = dir.join("daemon.log").display(),
        iface = pair.server_if,
    );
    let output = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("unshare");
    let text = String::from_utf8_lossy(&output.stdout);
    let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
    for line in [
        "700 0 /sys/fs/bpf\n".to_owned(),
        "700 0 /sys/fs/bpf/smtpguard\n".to_owned(),
        format!("700 0 /sys/fs/bpf/smtpguard/{name}\n"),
    ] {
        assert!(text.contains(&line), "expected {line:?} in:\n{text}\n{log}");
    }
    assert!(text.contains("exit 0"), "{text}\n{log}");
    let _ = Command::new(binary())
        .args(["--instance", &name, "detach"])
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    // The last-good store and the run folder (its lock file) outlive detach, by design; not
    // a test's.
    let paths = Instance::new(&name).expect("instance");
    let _ = std::fs::remove_dir_all(paths.state_dir());
    let _ = std::fs::remove_dir_all(paths.run_dir());
}
