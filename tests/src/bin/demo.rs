//! `cargo xtask demo`: the lock-down on two throwaway network namespaces, with a built-in
//! example configuration. Real daemon, real TCP; everything is removed at the end.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
    time::Duration,
};

use smtpguard_tests::{
    daemon::{Daemon, binary},
    netns::{Listener, Outcome, Pair, SERVER_V4, SERVER_V6, connect, sock},
};

const PROVIDER4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const ABUSER4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 9);
const SPAMMER4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const COPIER4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 50);
const PROVIDER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 0x10);
const SPAMMER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x77);

fn config(interface: &str, mode: &str, extra_allow: &str) -> String {
    format!(
        r#"# Built-in demo policy: the filtering provider's ranges, the office copier, one abuser.
interfaces = ["{interface}"]
ports = [25]
xdp_mode = "auto"
mode = "{mode}"
# Unlisted senders get a TCP reset: they fail at once instead of retrying into a timeout.
action = "reject"

[[allow]]
name = "provider"
prefixes = ["192.0.2.0/28", "2001:db8:200::/64"{extra_allow}]

[[allow]]
name = "copier"
prefixes = ["198.51.100.50"]

[[deny]]
name = "abuser"
action = "drop"
prefixes = ["192.0.2.9"]
"#
    )
}

fn main() {
    let sources: [(IpAddr, &str); 6] = [
        (PROVIDER4.into(), "provider (allow 192.0.2.0/28)"),
        (ABUSER4.into(), "abuser (deny inside the provider /28)"),
        (COPIER4.into(), "copier (allow /32)"),
        (SPAMMER4.into(), "spammer skipping the MX (unlisted)"),
        (PROVIDER6.into(), "provider (allow 2001:db8:200::/64)"),
        (SPAMMER6.into(), "spammer over IPv6 (unlisted)"),
    ];
    let addresses: Vec<IpAddr> = sources.iter().map(|(address, _)| *address).collect();
    let pair = Pair::new(&addresses);
    println!("smtpguard demo");
    println!(
        "  server namespace {} ({}: {SERVER_V4}, {SERVER_V6}), listeners on :25 (SMTP) and :587 (submission)",
        pair.server.name, pair.server_if
    );
    println!(
        "  client namespace {} with the sources below\n",
        pair.client.name
    );
    // A veth hands native-mode XDP_TX frames (the resets) only to a peer running XDP.
    let _peer = pair.client_xdp_peer();
    let _smtp = Listener::start(&pair.server, 25);
    let _submission = Listener::start(&pair.server, 587);

    let text = config(&pair.server_if, "audit", "");
    println!(
        "config (built-in example), first in audit mode:\n{}",
        indent(&text)
    );
    let mut daemon = Daemon::start(&pair.server, &text);
    let state = daemon.state().unwrap_or_default();
    println!(
        "smtpguard run: attached to {} in {} mode, policy generation {}, {} mode\n",
        pair.server_if, state["interfaces"][0]["mode"], state["generation"], state["mode"]
    );

    println!("1. audit: nothing is blocked, everything that enforce would stop is counted");
    println!("{:<20} {:<40} {:>5}  result", "source", "who", "port");
    for (address, who) in &sources {
        try_connect(&pair, *address, who, 25);
    }
    println!("\n$ smtpguard report   (who would be blocked: decide when it is safe to enforce)");
    println!("{}", indent(&cli(&daemon, &["report"])));

    println!("2. SIGHUP with mode = \"enforce\":");
    daemon.reload(&config(&pair.server_if, "enforce", ""));
    println!("{:<20} {:<40} {:>5}  result", "source", "who", "port");
    for (address, who) in &sources {
        try_connect(&pair, *address, who, 25);
    }
    try_connect(
        &pair,
        SPAMMER4.into(),
        "spammer, to the unguarded submission port",
        587,
    );

    println!("\n$ smtpguard stats   (from another process, through the pinned maps)");
    println!("{}", indent(&cli(&daemon, &["stats"])));

    println!("3. SIGHUP after adding 203.0.113.7 to the provider rule:");
    daemon.reload(&config(&pair.server_if, "enforce", ", \"203.0.113.7\""));
    try_connect(&pair, SPAMMER4.into(), "now listed", 25);

    let generation = daemon.generation();
    let status = daemon.stop();
    println!(
        "\nSIGTERM: smtpguard exited with {status}. With on_exit = \"keep\" (the default) the filter"
    );
    println!(
        "outlives the daemon: pinned in bpffs, it keeps enforcing generation {generation} until a new daemon"
    );
    println!("takes it over or `smtpguard detach` removes it:");
    println!("{:<20} {:<40} {:>5}  result", "source", "who", "port");
    try_connect(&pair, SPAMMER6.into(), "spammer over IPv6, daemon gone", 25);
    try_connect(&pair, PROVIDER4.into(), "provider, daemon gone", 25);
    println!("\n$ smtpguard stats   (no daemon: read from the pins)");
    println!("{}", indent(&first_lines(&cli(&daemon, &["stats"]), 2)));
    println!("$ smtpguard detach");
    println!("{}", indent(&cli(&daemon, &["detach"])));
    println!("the program is detached now: port 25 is open to every source");
    try_connect(&pair, SPAMMER6.into(), "spammer over IPv6, no filter", 25);
    drop(daemon);
    drop(pair);
    println!("\nnamespaces removed; demo done");
}

fn try_connect(pair: &Pair, src: IpAddr, who: &str, port: u16) {
    let dst = if src.is_ipv4() {
        sock(SERVER_V4, port)
    } else {
        sock(SERVER_V6, port)
    };
    let (outcome, _) = connect(&pair.client, src, dst, Duration::from_millis(700));
    let result = match outcome {
        Outcome::Connected => "connected".to_owned(),
        Outcome::TimedOut => "no answer: SYN dropped at XDP".to_owned(),
        Outcome::Refused => "refused at once: RST sent from XDP".to_owned(),
        Outcome::Failed(error) => format!("failed: {error}"),
    };
    println!("{:<20} {:<40} {:>5}  {result}", src.to_string(), who, port);
}

fn cli(daemon: &Daemon, args: &[&str]) -> String {
    let output = Command::new(binary())
        .args(["--instance", &daemon.instance])
        .args(args)
        .output()
        .expect("run smtpguard");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn first_lines(text: &str, count: usize) -> String {
    text.lines()
        .take(count)
        .map(|line| format!("{line}\n"))
        .collect()
}

fn indent(text: &str) -> String {
    text.lines().map(|line| format!("    {line}\n")).collect()
}
