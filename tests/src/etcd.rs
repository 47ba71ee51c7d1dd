//! A real etcd cluster for the fleet tests: three members of Debian's `etcd-server` in a
//! namespace of their own, on one address and three port pairs, with a bridge that the test
//! joins other namespaces to (a daemon runs in its gateway's namespace and reaches the
//! cluster over it). Members can be killed and started again on their data; everything is
//! killed and removed on drop.

use std::{
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::netns::{Netns, ip, unique_tag};

/// The cluster's address in its namespace (RFC 2544 benchmarking range: never routed).
pub const ADDRESS: &str = "198.18.0.1";
const MEMBERS: usize = 3;

fn client_port(member: usize) -> u16 {
    2379 + 100 * member as u16
}

fn peer_port(member: usize) -> u16 {
    2380 + 100 * member as u16
}

/// Three etcd members; see the module documentation.
pub struct Cluster {
    members: Vec<Option<Child>>,
    dir: PathBuf,
    bridge: String,
    joined: usize,
    tag: String,
    // Last: the namespace goes after the processes in it.
    pub netns: Netns,
}

impl Cluster {
    /// Starts the three members and waits until the cluster answers.
    pub fn start() -> Self {
        assert!(
            std::path::Path::new("/usr/bin/etcd").exists(),
            "/usr/bin/etcd is missing: run `cargo xtask setup` (Debian's etcd-server)"
        );
        let tag = unique_tag();
        let netns = Netns::new(format!("sg-{tag}-etcd"));
        let short = tag.replace('-', "");
        let bridge = format!("sgb{}", &short[short.len().saturating_sub(11)..]);
        ip(&["-n", &netns.name, "link", "add", &bridge, "type", "bridge"]);
        ip(&[
            "-n",
            &netns.name,
            "addr",
            "add",
            &format!("{ADDRESS}/24"),
            "dev",
            &bridge,
        ]);
        ip(&["-n", &netns.name, "link", "set", &bridge, "up"]);
        let dir = std::env::temp_dir().join(format!("sg-{tag}-etcd"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("etcd data dir");
        let mut cluster = Self {
            members: (0..MEMBERS).map(|_| None).collect(),
            dir,
            bridge,
            joined: 0,
            tag: short,
            netns,
        };
        cluster.start_all();
        cluster
    }

    /// The client URLs of every member, comma-separated.
    pub fn endpoints(&self) -> String {
        (0..MEMBERS)
            .map(|member| format!("http://{ADDRESS}:{}", client_port(member)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The client URLs as a TOML array.
    pub fn endpoints_toml(&self) -> String {
        let urls: Vec<String> = self
            .endpoints()
            .split(',')
            .map(|url| format!("\"{url}\""))
            .collect();
        format!("[{}]", urls.join(", "))
    }

    /// Joins `netns` to the cluster's bridge; it gets 198.18.0.(10 + n).
    pub fn join(&mut self, netns: &Netns) {
        self.joined += 1;
        let outside = format!(
            "sge{}{}",
            &self.tag[self.tag.len().saturating_sub(9)..],
            self.joined
        );
        let inside = format!(
            "sgi{}{}",
            &self.tag[self.tag.len().saturating_sub(9)..],
            self.joined
        );
        ip(&[
            "link",
            "add",
            &outside,
            "netns",
            &self.netns.name,
            "type",
            "veth",
            "peer",
            "name",
            &inside,
            "netns",
            &netns.name,
        ]);
        ip(&[
            "-n",
            &self.netns.name,
            "link",
            "set",
            &outside,
            "master",
            &self.bridge,
        ]);
        ip(&["-n", &self.netns.name, "link", "set", &outside, "up"]);
        let address = format!("198.18.0.{}/24", 10 + self.joined);
        ip(&["-n", &netns.name, "addr", "add", &address, "dev", &inside]);
        ip(&["-n", &netns.name, "link", "set", &inside, "up"]);
    }

    fn spawn(&mut self, member: usize) {
        let name = format!("m{member}");
        let initial: Vec<String> = (0..MEMBERS)
            .map(|m| format!("m{m}=http://{ADDRESS}:{}", peer_port(m)))
            .collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .expect("etcd log");
        let client = format!("http://{ADDRESS}:{}", client_port(member));
        let peer = format!("http://{ADDRESS}:{}", peer_port(member));
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns.path()))
            .arg("/usr/bin/etcd")
            .args(["--name", &name, "--data-dir"])
            .arg(self.dir.join(&name))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &initial.join(",")])
            .args([
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                &self.tag,
            ])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.members[member] = Some(child);
    }

    /// Starts every member that is not running, and waits until the cluster answers.
    pub fn start_all(&mut self) {
        for member in 0..MEMBERS {
            if self.members[member].is_none() {
                self.spawn(member);
            }
        }
        self.wait_healthy(Duration::from_secs(30));
    }

    /// Kills one member (SIGKILL).
    pub fn kill(&mut self, member: usize) {
        if let Some(mut child) = self.members[member].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills every member: the cluster is gone until [`Cluster::start_all`].
    pub fn kill_all(&mut self) {
        for member in 0..MEMBERS {
            self.kill(member);
        }
    }

    /// Runs `etcdctl ARGS` against the cluster, with `input` on its standard input.
    pub fn etcdctl(&self, args: &[&str], input: Option<&[u8]>) -> Output {
        use std::io::Write as _;
        let endpoints: Vec<String> = (0..MEMBERS)
            .filter(|member| self.members[*member].is_some())
            .map(|member| format!("http://{ADDRESS}:{}", client_port(member)))
            .collect();
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns.path()))
            .arg("etcdctl")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .args(args)
            .env("ETCDCTL_API", "3")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run etcdctl (Debian's etcd-client)");
        if let Some(input) = input {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input)
                .expect("etcdctl input");
        }
        drop(child.stdin.take());
        child.wait_with_output().expect("etcdctl")
    }

    fn wait_healthy(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let output = self.etcdctl(&["put", "/smtpguard-test/health", "ok"], None);
            if output.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the etcd cluster did not answer within {timeout:?}: {}\n{}",
                String::from_utf8_lossy(&output.stderr),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The members' logs, for failure messages.
    pub fn logs(&self) -> String {
        (0..MEMBERS)
            .map(|member| {
                let log = std::fs::read_to_string(self.dir.join(format!("m{member}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                format!(
                    "--- etcd m{member}:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Runs `smtpguard ARGS` from inside the cluster's namespace (as an admin's workstation
    /// that reaches it would).
    pub fn smtpguard(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--net={}", self.netns.path()))
            .arg(crate::daemon::binary())
            .args(args)
            .output()
            .expect("run smtpguard")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Never panic here: this may run while a test is already panicking.
        for member in self.members.iter_mut() {
            if let Some(mut child) = member.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A gateway's configuration that follows `group` on `cluster`, reporting as `host`.
pub fn follower_config(interface: &str, cluster: &Cluster, group: &str, host: &str) -> String {
    format!(
        "interfaces = [\"{interface}\"]\non_exit = \"detach\"\n\n[fleet]\netcd = {}\ngroup = \"{group}\"\nhost = \"{host}\"\n",
        cluster.endpoints_toml()
    )
}

/// The group revision `daemon` has in force, as its `fleet.json` says (0: none yet).
pub fn fleet_revision(daemon: &crate::daemon::Daemon) -> i64 {
    let path = std::path::Path::new("/run/smtpguard")
        .join(&daemon.instance)
        .join("fleet.json");
    std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|state| state["revision"].as_i64())
        .unwrap_or(0)
}

/// The revision a `smtpguard publish` output says it wrote.
pub fn published_revision(output: &str) -> Option<i64> {
    output.lines().find_map(|line| {
        line.strip_prefix("published group ")?
            .split(" revision ")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}
