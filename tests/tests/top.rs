//! `smtpguard top` in a real terminal: tmux (Debian's package) runs it in a detached session
//! against a running daemon while real connects come in; the screen, read with
//! `capture-pane`, shows the rates while they happen and the totals they add up to, the rule
//! and the source; `q` ends it. Without a terminal it prints one view and exits.

use std::{
    net::{IpAddr, Ipv4Addr},
    process::{Command, Output},
    time::{Duration, Instant},
};

use smtpguard_tests::{
    daemon::{Daemon, binary},
    netns::{Listener, Outcome, Pair, SERVER_V4, connect, sock, unique_tag},
};

const ALLOWED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const UNLISTED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const SPAM: usize = 40;
const MAIL: usize = 10;

/// A tmux server of the test's own (`-L`), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Self {
        Self {
            socket: format!("sg-top-{}", unique_tag()),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run tmux (cargo xtask setup installs it)")
    }

    /// The screen of the session, as text.
    fn screen(&self) -> String {
        let output = self.run(&["capture-pane", "-p", "-t", "top"]);
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn alive(&self) -> bool {
        self.run(&["has-session", "-t", "top"]).status.success()
    }

    /// Waits until the screen satisfies `ready`; returns it.
    fn wait_for(&self, what: &str, timeout: Duration, ready: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen();
            if ready(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "the screen did not show {what} within {timeout:?}:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// The fields of the first screen line that starts with `label` followed by a space.
fn row<'a>(screen: &'a str, label: &str) -> Option<Vec<&'a str>> {
    screen
        .lines()
        .find(|line| line.starts_with(&format!("{label} ")))
        .map(|line| line[label.len()..].split_whitespace().collect())
}

/// The rate and total of a row whose first two fields they are.
fn figures(screen: &str, label: &str) -> Option<(f64, u64)> {
    let fields = row(screen, label)?;
    Some((fields.first()?.parse().ok()?, fields.get(1)?.parse().ok()?))
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
fn top_shows_live_rates_in_a_real_terminal_and_quits_on_q() {
    let pair = Pair::new(&[ALLOWED.into(), UNLISTED.into()]);
    // Resets from XDP_TX reach a veth peer only if it runs XDP itself.
    let _peer = pair.client_xdp_peer();
    let _smtp = Listener::start(&pair.server, 25);
    let config = format!(
        "interfaces = [\"{}\"]\naction = \"reject\"\n\n[[allow]]\nname = \"provider\"\nprefixes = [\"192.0.2.0/28\"]\n",
        pair.server_if
    );
    let daemon = Daemon::start(&pair.server, &config);
    let tmux = Tmux::new();
    let command = format!(
        "{} --instance {} top --interval 0.5",
        binary().display(),
        daemon.instance
    );
    let started = tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "160",
        "-y",
        "50",
        &command,
    ]);
    assert!(started.status.success(), "tmux: {started:?}");
    tmux.wait_for("the view", Duration::from_secs(10), |screen| {
        screen.contains("GUARDED SYNS") && screen.contains("q quits")
    });

    // Mail and spam for a few seconds, the screen watched while they come in.
    let mut seen_rate = 0.0_f64;
    std::thread::scope(|scope| {
        let traffic = scope.spawn(|| {
            for n in 0..SPAM {
                assert_eq!(attempt(&pair, UNLISTED), Outcome::Refused, "spam {n}");
                if n % 4 == 0 {
                    assert_eq!(attempt(&pair, ALLOWED), Outcome::Connected, "mail {n}");
                }
                std::thread::sleep(Duration::from_millis(60));
            }
        });
        while !traffic.is_finished() {
            if let Some((rate, _)) = figures(&tmux.screen(), "unlisted") {
                seen_rate = seen_rate.max(rate);
            }
            std::thread::sleep(Duration::from_millis(150));
        }
        traffic.join().expect("traffic");
    });
    assert!(
        seen_rate >= 2.0,
        "the unlisted rate should show while the spam came in (about 10/s), saw at most {seen_rate}:\n{}",
        tmux.screen()
    );

    // Once it is over: the totals, the rule and the source, rates back to zero.
    let screen = tmux.wait_for("the totals", Duration::from_secs(10), |screen| {
        figures(screen, "unlisted") == Some((0.0, SPAM as u64))
            && figures(screen, "allowed") == Some((0.0, MAIL as u64))
    });
    assert_eq!(
        figures(&screen, "rejected"),
        Some((0.0, SPAM as u64)),
        "{screen}"
    );
    let provider = row(&screen, "provider").unwrap_or_else(|| panic!("no rule row:\n{screen}"));
    assert_eq!(provider, ["allow", "0.0", &MAIL.to_string()], "{screen}");
    let source =
        row(&screen, &UNLISTED.to_string()).unwrap_or_else(|| panic!("no source row:\n{screen}"));
    assert_eq!(
        source,
        ["0.0", &SPAM.to_string(), "0", "unlisted"],
        "{screen}"
    );
    eprintln!("smtpguard top in tmux:\n{screen}");

    // `q` quits: the session ends with the program.
    assert!(tmux.run(&["send-keys", "-t", "top", "q"]).status.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    while tmux.alive() {
        assert!(
            Instant::now() < deadline,
            "top did not quit on q:\n{}",
            tmux.screen()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Without a terminal: one view, then exit.
    let text = daemon.cli(&["top", "--interval", "0.2"]);
    assert!(
        text.contains("GUARDED SYNS") && !text.contains("q quits"),
        "{text}"
    );
    assert_eq!(
        figures(&text, "unlisted"),
        Some((0.0, SPAM as u64)),
        "{text}"
    );
}
