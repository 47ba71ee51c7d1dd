//! The corpus of bad configurations: each is refused with its file and line (or a clear
//! reason); offered to a running daemon by SIGHUP, none changes the policy or the counters.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::Duration,
};

use smtpguard::{
    policy::Policy,
    source::{config::Config, fetch as sources},
};
use smtpguard_tests::{
    corpus,
    daemon::Daemon,
    netns::{Listener, Outcome, Pair, SERVER_V4, connect, sock},
};

fn refusal(path: &Path) -> String {
    let result = Config::load(path).and_then(|config| {
        let fetched = sources::Fetched {
            files: sources::read_files(&config)?,
            ..sources::Fetched::default()
        };
        Policy::build(&config, &fetched)
    });
    match result {
        Ok((policy, _)) => panic!("expected {} to be refused, got {policy:?}", path.display()),
        Err(error) => error.to_string(),
    }
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sg-corpus-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}

#[test]
fn every_bad_configuration_is_refused_with_file_and_line() {
    let dir = scratch("parse");
    let path = dir.join("smtpguard.toml");
    let file = path.display().to_string();
    let head = "interfaces = [\"eth0\"]\n";
    let cases = corpus::all_cases(head, &dir, &file);
    assert!(cases.len() >= 40, "{} cases", cases.len());
    for (bytes, expected) in &cases {
        std::fs::write(&path, bytes).expect("write case");
        let message = refusal(&path);
        assert!(
            message.starts_with(&expected[..expected.find(':').unwrap_or(0)])
                && message.contains(expected.as_str()),
            "for {:?}: expected {expected:?}, got {message:?}",
            String::from_utf8_lossy(bytes)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_running_daemon_keeps_its_policy_and_counters_through_the_whole_corpus() {
    const ALLOWED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
    const UNLISTED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
    let pair = Pair::new(&[ALLOWED.into(), UNLISTED.into()]);
    let _smtp = Listener::start(&pair.server, 25);
    let head = format!("interfaces = [\"{}\"]\n", pair.server_if);
    let good = format!("{head}[[allow]]\nname = \"provider\"\nprefixes = [\"192.0.2.0/28\"]\n");
    let mut daemon = Daemon::start(&pair.server, &good);
    let attempt = |src: Ipv4Addr| {
        connect(
            &pair.client,
            IpAddr::V4(src),
            sock(SERVER_V4, 25),
            Duration::from_millis(700),
        )
        .0
    };
    assert_eq!(attempt(ALLOWED), Outcome::Connected);
    assert_eq!(attempt(UNLISTED), Outcome::TimedOut);
    let before = daemon.stats();
    let generation = daemon.generation();

    let dir = scratch("sighup");
    let file = daemon.config_path.display().to_string();
    let cases = corpus::all_cases(&head, &dir, &file);
    for (bytes, expected) in &cases {
        // Some cases are not UTF-8: write the bytes, then signal.
        std::fs::write(&daemon.config_path, bytes).expect("write case");
        let line = daemon.reload_refused_as_written();
        assert!(
            line.contains(expected.as_str()),
            "expected {expected:?} in {line:?}"
        );
    }
    assert_eq!(daemon.generation(), generation, "no case applied anything");
    let after = daemon.stats();
    for field in ["syn_allowed", "syn_unlisted", "dropped", "prefixes"] {
        assert_eq!(after[field], before[field], "{field} untouched");
    }
    assert_eq!(
        attempt(ALLOWED),
        Outcome::Connected,
        "policy still in force"
    );
    assert_eq!(
        attempt(UNLISTED),
        Outcome::TimedOut,
        "policy still in force"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
