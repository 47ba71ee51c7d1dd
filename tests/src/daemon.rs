//! The real `smtpguard` binary as a child process inside a test namespace, entered with
//! `nsenter --net` so it keeps the host's bpffs for its pins; optionally in the file-system
//! view the shipped systemd unit gives it ([`Launcher::UnitSandbox`]).

use std::{
    ffi::CString,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::netns::{Netns, unique_tag};

/// Path of the daemon binary: `$SMTPGUARD_BIN`, or `smtpguard` beside this test's target dir.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("SMTPGUARD_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| {
            if deps.ends_with("deps") {
                deps.parent()
            } else {
                Some(deps)
            }
        })
        .expect("target dir");
    let path = profile_dir.join("smtpguard");
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build -p smtpguard`) or set SMTPGUARD_BIN",
        path.display()
    );
    path
}

/// A build of the daemon whose map layout differs from [`binary`]'s and that fails its link
/// swaps on request (`SMTPGUARD_FAIL_LINK_UPDATE=1`): `$SMTPGUARD_UPGRADE_BIN`, or what
/// `cargo xtask test` builds into `target/upgrade-test/smtpguard`.
pub fn upgrade_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("SMTPGUARD_UPGRADE_BIN") {
        return PathBuf::from(path);
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/upgrade-test/smtpguard");
    assert!(
        path.exists(),
        "{} is missing: `cargo xtask test` builds it (cargo build --release -p smtpguard --features upgrade-test, copied there), or set SMTPGUARD_UPGRADE_BIN",
        path.display()
    );
    path
}

/// How the daemon enters the test namespace.
#[derive(Clone, Copy, Debug)]
pub enum Launcher {
    /// `nsenter --net=/run/netns/NAME`: keeps the host's mounts, bpffs included.
    Nsenter,
    /// `ip netns exec NAME`: a private mount namespace with its own /sys (no host bpffs).
    IpNetnsExec,
    /// `nsenter`, then `setpriv` keeping only the capabilities the shipped systemd unit
    /// grants (its `CapabilityBoundingSet`).
    UnitCapabilities,
    /// As [`Launcher::UnitCapabilities`], in a private mount namespace where everything is
    /// read-only but the paths the unit makes writable ([`unit_writable_paths`]), as
    /// `ProtectSystem=strict` does: a path the unit forbids fails here, not on a gateway.
    UnitSandbox,
}

/// The shipped systemd unit, as text.
fn unit() -> String {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/smtpguard.service");
    std::fs::read_to_string(&unit).expect("read the systemd unit")
}

/// The paths `packaging/smtpguard.service` leaves writable under `ProtectSystem=strict`:
/// its `ReadWritePaths=`, and `/run/X` and `/var/lib/X` for `RuntimeDirectory=X` and
/// `StateDirectory=X`.
pub fn unit_writable_paths() -> Vec<PathBuf> {
    let unit = unit();
    assert!(
        unit.lines().any(|line| line == "ProtectSystem=strict"),
        "the unit should say ProtectSystem=strict:\n{unit}"
    );
    let mut paths = Vec::new();
    for line in unit.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let root = match key {
            "ReadWritePaths" => "",
            "RuntimeDirectory" => "/run",
            "StateDirectory" => "/var/lib",
            _ => continue,
        };
        for path in value.split_whitespace() {
            paths.push(Path::new(root).join(path.trim_start_matches(['-', '+'])));
        }
    }
    paths
}

/// What systemd does before it starts the unit: mounts bpffs (every distribution does at
/// boot; these test machines do not), creates the runtime and state directories (0700).
fn prepare_unit_paths(paths: &[PathBuf]) {
    let bpffs = Path::new("/sys/fs/bpf");
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .expect("mounts")
        .lines()
        .any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(1) == Some(&"/sys/fs/bpf") && fields.get(2) == Some(&"bpf")
        });
    if !mounted {
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(bpffs)
            .status()
            .expect("mount bpffs");
        assert!(status.success(), "mount -t bpf bpf /sys/fs/bpf failed");
    }
    for path in paths {
        if !path.starts_with(bpffs) {
            std::fs::create_dir_all(path).expect("unit directory");
            std::os::unix::fs::chown(path, Some(0), Some(0)).expect("chown");
            let mode = std::os::unix::fs::PermissionsExt::from_mode(0o700);
            std::fs::set_permissions(path, mode).expect("chmod");
        }
    }
}

/// Turns the calling process into one that sees the unit's file system: a private mount
/// namespace, each of `writable` its own mount, then everything read-only recursively but
/// those. Runs between fork and exec: system calls only, on strings made beforehand.
fn enter_unit_sandbox(writable: &[CString]) -> std::io::Result<()> {
    let check = |rc: libc::c_long| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let setattr = |path: &CString, set: u64, clear: u64| {
        let attr = libc::mount_attr {
            attr_set: set,
            attr_clr: clear,
            propagation: 0,
            userns_fd: 0,
        };
        // SAFETY: mount_setattr(2) with a NUL-terminated path and a mount_attr we own.
        check(unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                path.as_ptr(),
                libc::AT_RECURSIVE as libc::c_uint,
                &raw const attr,
                size_of::<libc::mount_attr>(),
            )
        })
    };
    // SAFETY: unshare and mount with NUL-terminated strings; no memory is shared.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS).into())?;
        // Nothing done here propagates back to the host.
        check(
            libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
            .into(),
        )?;
        for path in writable {
            check(
                libc::mount(
                    path.as_ptr(),
                    path.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                )
                .into(),
            )?;
        }
    }
    setattr(&CString::from(c"/"), libc::MOUNT_ATTR_RDONLY, 0)?;
    for path in writable {
        setattr(path, 0, libc::MOUNT_ATTR_RDONLY)?;
    }
    Ok(())
}

/// The capabilities `packaging/smtpguard.service` grants, in setpriv's spelling
/// (`bpf,net_admin,perfmon`).
pub fn unit_capabilities() -> Vec<String> {
    unit()
        .lines()
        .find_map(|line| line.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet in the unit")
        .split_whitespace()
        .map(|cap| cap.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect()
}

impl Launcher {
    pub fn command(self, netns: &Netns) -> Command {
        match self {
            Self::Nsenter => {
                let mut command = Command::new("nsenter");
                command.arg(format!("--net={}", netns.path()));
                command
            }
            Self::IpNetnsExec => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", &netns.name]);
                command
            }
            Self::UnitCapabilities => {
                let bounding: String = unit_capabilities()
                    .iter()
                    .map(|cap| format!(",+{cap}"))
                    .collect();
                let mut command = Command::new("nsenter");
                command
                    .arg(format!("--net={}", netns.path()))
                    .arg("setpriv")
                    .arg(format!("--bounding-set=-all{bounding}"))
                    .arg("--");
                command
            }
            Self::UnitSandbox => {
                let mut command = Self::UnitCapabilities.command(netns);
                sandbox(&mut command);
                command
            }
        }
    }
}

/// Makes `command` run in the file-system view the unit gives the daemon (see
/// [`Launcher::UnitSandbox`]).
pub fn sandbox(command: &mut Command) {
    let paths = unit_writable_paths();
    prepare_unit_paths(&paths);
    let writable: Vec<CString> = paths
        .iter()
        .map(|path| CString::new(path.as_os_str().as_encoded_bytes()).expect("path"))
        .collect();
    // SAFETY: the closure only makes system calls on memory prepared before the fork.
    unsafe {
        command.pre_exec(move || enter_unit_sandbox(&writable));
    }
}

/// A running daemon; stopped with SIGTERM on drop.
pub struct Daemon {
    child: Option<Child>,
    /// The build that runs: [`binary`] unless switched for an upgrade.
    program: PathBuf,
    /// Extra environment for the daemon process (e.g. `NOTIFY_SOCKET`).
    env: Vec<(String, String)>,
    pub instance: String,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    log_path: PathBuf,
}

impl Daemon {
    /// Starts `smtpguard run` inside `netns` with `config`, and waits until it enforces.
    pub fn start(netns: &Netns, config: &str) -> Self {
        Self::start_with(netns, config, Launcher::Nsenter)
    }

    /// As [`Daemon::start`], entering the namespace with `launcher`.
    pub fn start_with(netns: &Netns, config: &str, launcher: Launcher) -> Self {
        Self::start_env(netns, config, launcher, &[])
    }

    /// As [`Daemon::start`], allowing `timeout` for the first policy (large lists).
    pub fn start_timeout(netns: &Netns, config: &str, timeout: Duration) -> Self {
        let mut daemon = Self::prepare(config, &[]);
        daemon.spawn(netns, Launcher::Nsenter);
        daemon.wait_for_generation(1, timeout);
        daemon
    }

    fn prepare(config: &str, env: &[(&str, &str)]) -> Self {
        let instance = format!("sg-{}", unique_tag());
        let dir = std::env::temp_dir().join(&instance);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let config_path = dir.join("smtpguard.toml");
        let log_path = dir.join("daemon.log");
        std::fs::write(&config_path, config).expect("write config");
        Self {
            child: None,
            program: binary(),
            env: env
                .iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                .collect(),
            instance,
            dir,
            config_path,
            log_path,
        }
    }

    /// As [`Daemon::start_with`], with `env` added to the daemon's environment.
    pub fn start_env(
        netns: &Netns,
        config: &str,
        launcher: Launcher,
        env: &[(&str, &str)],
    ) -> Self {
        let mut daemon = Self::prepare(config, env);
        daemon.spawn(netns, launcher);
        daemon.wait_for_generation(1, Duration::from_secs(20));
        daemon
    }

    fn spawn(&mut self, netns: &Netns, launcher: Launcher) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("log file");
        let mut command = launcher.command(netns);
        let child = command
            .arg(&self.program)
            .args(["--instance", &self.instance, "run", "--config"])
            .arg(&self.config_path)
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn nsenter smtpguard");
        self.child = Some(child);
    }

    /// Kills the daemon with SIGKILL: no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the daemon again on the same instance (after [`Daemon::kill`] or
    /// [`Daemon::stop`]), and waits until it has applied a policy newer than `after`.
    pub fn restart(&mut self, netns: &Netns, after: u64) {
        assert!(self.child.is_none(), "restart needs a stopped daemon");
        self.spawn(netns, Launcher::Nsenter);
        self.wait_for_generation(after + 1, Duration::from_secs(20));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.state().is_some_and(|state| {
            state["pid"].as_u64() == self.child.as_ref().map(|c| u64::from(c.id()))
        }) {
            assert!(
                Instant::now() < deadline,
                "the restarted daemon wrote no state:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts `smtpguard run` inside `netns` with `config`, without waiting for a policy: for
    /// watching a start as it happens.
    pub fn launch(netns: &Netns, config: &str) -> Self {
        let mut daemon = Self::prepare(config, &[]);
        daemon.spawn(netns, Launcher::Nsenter);
        daemon
    }

    /// Waits until the state file satisfies `ready` (`what` names it in the panic message);
    /// returns that state.
    pub fn wait_for_state(
        &mut self,
        what: &str,
        timeout: Duration,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(state) = self.state().filter(|state| ready(state)) {
                return state;
            }
            assert!(
                Instant::now() < deadline,
                "the state file did not show {what} within {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the daemon exits on its own; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("smtpguard did not exit within {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The next (re)start runs `program` with `env` added: an upgrade, or a fault injected.
    pub fn switch_binary(&mut self, program: PathBuf, env: &[(&str, &str)]) {
        self.program = program;
        self.env = env
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect();
    }

    /// Starts the (stopped) daemon and waits until it exits, as a start that must fail does;
    /// returns its exit status.
    pub fn start_expecting_exit(&mut self, netns: &Netns, timeout: Duration) -> ExitStatus {
        assert!(self.child.is_none(), "needs a stopped daemon");
        self.spawn(netns, Launcher::Nsenter);
        let mut child = self.child.take().expect("spawned");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("smtpguard did not exit within {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |child| child.id() as i32)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Where the instance keeps its last-good store.
    pub fn state_dir(&self) -> PathBuf {
        self.paths().state_dir()
    }

    /// The instance's folders, as the daemon names them.
    fn paths(&self) -> smtpguard::instance::Instance {
        smtpguard::instance::Instance::new(&self.instance).expect("a valid instance name")
    }

    /// Waits until the log holds `needle` `count` times or more; returns the log.
    pub fn wait_for_log(&self, needle: &str, count: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.matches(needle).count() >= count {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "expected {needle:?} {count} times in the log within {timeout:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Where the daemon records its state.
    pub fn state_path(&self) -> PathBuf {
        Path::new("/run/smtpguard")
            .join(&self.instance)
            .join("state.json")
    }

    /// The daemon's state file, if it has written one.
    pub fn state(&self) -> Option<serde_json::Value> {
        let text = std::fs::read(self.state_path()).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// The generation the state file records (0 before it has one). Reads only that field:
    /// with millions of prefixes the whole record takes seconds to build into a `Value`.
    pub fn generation(&self) -> u64 {
        #[derive(serde::Deserialize)]
        struct Generation {
            generation: u64,
        }
        std::fs::read(self.state_path())
            .ok()
            .and_then(|text| serde_json::from_slice::<Generation>(&text).ok())
            .map_or(0, |state| state.generation)
    }

    /// Waits until the policy of `generation` (or later) is in force. The state file is read
    /// again only when it was replaced: a poll must not compete with the daemon for the CPU
    /// (the benchmark times the daemon through it).
    pub fn wait_for_generation(&mut self, generation: u64, timeout: Duration) {
        use std::os::unix::fs::MetadataExt as _;
        let deadline = Instant::now() + timeout;
        let mut seen = None;
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten())
            {
                panic!(
                    "smtpguard exited with {status} before generation {generation}:\n{}",
                    self.log()
                );
            }
            let stamp = std::fs::metadata(self.state_path())
                .ok()
                .map(|meta| (meta.ino(), meta.mtime(), meta.mtime_nsec(), meta.len()));
            if stamp.is_some() && stamp != seen {
                seen = stamp;
                if self.generation() >= generation {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "smtpguard did not reach generation {generation} in {timeout:?}:\n{}",
            self.log()
        );
    }

    /// Writes `config` and sends SIGHUP; waits until the new generation is in force.
    pub fn reload(&mut self, config: &str) {
        let next = self.generation() + 1;
        std::fs::write(&self.config_path, config).expect("write config");
        self.signal(libc::SIGHUP);
        self.wait_for_generation(next, Duration::from_secs(20));
    }

    /// Writes `config` and sends SIGHUP, expecting the reload to be refused; returns the log
    /// line that says so.
    pub fn reload_refused(&mut self, config: &str) -> String {
        std::fs::write(&self.config_path, config).expect("write config");
        self.reload_refused_as_written()
    }

    /// Sends SIGHUP for the configuration file as it is now, expecting the reload to be
    /// refused; returns the log line that says so.
    pub fn reload_refused_as_written(&mut self) -> String {
        let before = self.log().matches("reload failed").count();
        self.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let log = self.log();
            let failures: Vec<&str> = log
                .lines()
                .filter(|line| line.contains("reload failed"))
                .collect();
            if failures.len() > before {
                return failures[before].to_owned();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("expected the reload to be refused:\n{}", self.log());
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(
            rc,
            0,
            "kill {}: {}",
            self.pid(),
            std::io::Error::last_os_error()
        );
    }

    /// Runs `smtpguard ARGS` for this instance from the host; panics unless it succeeds.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new(&self.program)
            .args(["--instance", &self.instance])
            .args(args)
            .output()
            .expect("run smtpguard");
        assert!(
            output.status.success(),
            "smtpguard {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `smtpguard report --json` for this instance.
    pub fn report(&self) -> serde_json::Value {
        let text = self.cli(&["report", "--top", "0", "--json"]);
        serde_json::from_str(&text)
            .unwrap_or_else(|error| panic!("report is not JSON ({error}): {text}"))
    }

    /// Runs `smtpguard stats --json` for this instance, from the host.
    pub fn stats(&self) -> serde_json::Value {
        self.stats_from(&mut Command::new(&self.program))
    }

    /// Runs `smtpguard stats --json` for this instance with `command` (the binary, perhaps
    /// behind a launcher).
    pub fn stats_from(&self, command: &mut Command) -> serde_json::Value {
        let output = command
            .args(["--instance", &self.instance, "stats", "--json"])
            .output()
            .expect("run smtpguard stats");
        assert!(
            output.status.success(),
            "smtpguard stats failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
            panic!(
                "stats is not JSON ({error}): {}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }

    /// SIGTERM, then waits for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("smtpguard did not exit on SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // With on_exit = "keep" the filter outlives the daemon: remove it, and its pins.
        let _ = Command::new(&self.program)
            .args(["--instance", &self.instance, "detach"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
        // The last-good store outlives detach, by design; not a test's. Nor is the run
        // folder the daemon's lock file stays in.
        let paths = self.paths();
        let _ = std::fs::remove_dir_all(paths.state_dir());
        let _ = std::fs::remove_dir_all(paths.run_dir());
    }
}

/// Stats value for a prefix: SYNs counted.
pub fn prefix_syns(stats: &serde_json::Value, prefix: &str) -> u64 {
    stats["prefixes"]
        .as_array()
        .and_then(|prefixes| prefixes.iter().find(|entry| entry["prefix"] == prefix))
        .and_then(|entry| entry["syns"].as_u64())
        .unwrap_or_else(|| panic!("prefix {prefix} not in stats: {stats}"))
}
