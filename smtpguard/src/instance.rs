//! Where a running instance keeps its state: pinned links and maps under bpffs
//! (`/sys/fs/bpf/smtpguard/NAME`, the maps in a folder named by their layout stamp), a lock
//! and a state file under `/run/smtpguard/NAME`, and the last-good store of its automatic
//! sources under `/var/lib/smtpguard/NAME` (which outlives a reboot and `smtpguard detach`).
//! Several instances (one per name) can run side by side, e.g. one per network namespace.
//!
//! Whoever can write these folders can unpin the filter or feed it maps, so they are created
//! 0700, and one that is a symbolic link, is not owned by root (or this user), or is writable
//! by group or others is refused. bpffs, when smtpguard mounts it, is mounted 0700.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use crate::{
    kernel::{filter::AttachedMode, interface::LinkKind},
    policy::List,
};

/// bpffs magic number (`BPF_FS_MAGIC` in linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPFFS_ROOT: &str = "/sys/fs/bpf";
const PIN_ROOT: &str = "/sys/fs/bpf/smtpguard";
const RUN_ROOT: &str = "/run/smtpguard";
const STATE_ROOT: &str = "/var/lib/smtpguard";
/// Pinned links are named `link_IFNAME` beside the folders of maps.
const LINK_PREFIX: &str = "link_";
/// Folders of maps are named `maps-STAMP` (the layout stamp in hex).
const MAPS_PREFIX: &str = "maps-";

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("bad instance name {0:?}: use 1 to 64 letters, digits, '-' or '_'")]
    BadName(String),
    #[error("{path}: {source}", path = path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("cannot mount bpffs at {BPFFS_ROOT}: {0}")]
    Mount(io::Error),
    #[error(
        "refusing {path}: {reason}; another user could have made it to take the filter over: check it, remove it, and start again",
        path = path.display()
    )]
    UnsafeDir { path: PathBuf, reason: String },
    #[error("instance {name:?} is already running (lock {path} is held); stop it first or pick another --instance", path = path.display())]
    Running { name: String, path: PathBuf },
    #[error("no running smtpguard instance {name:?}: {path} is missing ({source}); is `smtpguard run` running?", path = path.display())]
    NotRunning {
        name: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{path}: corrupt state file: {source}", path = path.display())]
    BadState {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// A named instance of the daemon.
#[derive(Clone, Debug)]
pub struct Instance {
    name: String,
}

impl Instance {
    pub fn new(name: &str) -> Result<Self, InstanceError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_');
        if !valid {
            return Err(InstanceError::BadName(name.to_owned()));
        }
        Ok(Self {
            name: name.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pin_dir(&self) -> PathBuf {
        Path::new(PIN_ROOT).join(&self.name)
    }

    /// Where the maps of layout `stamp` are pinned: each build whose map layout differs keeps
    /// its own, so an upgrade builds new maps beside the old ones before it swaps programs.
    pub fn maps_dir(&self, stamp: u64) -> PathBuf {
        self.pin_dir().join(format!("{MAPS_PREFIX}{stamp:016x}"))
    }

    /// Where the maps of the daemon that wrote `state` are pinned (straight in the pin
    /// directory for smtpguard before layout stamps).
    pub fn maps_dir_of(&self, state: &RunState) -> PathBuf {
        if state.layout == 0 {
            self.pin_dir()
        } else {
            self.maps_dir(state.layout)
        }
    }

    /// Maps pinned by builds with another layout: folders of other stamps, and maps pinned
    /// straight in the pin directory (smtpguard before layout stamps).
    pub fn other_layouts(&self, stamp: u64) -> Result<Vec<PathBuf>, InstanceError> {
        let dir = self.pin_dir();
        let own = self.maps_dir(stamp);
        let mut found = Vec::new();
        let mut legacy = false;
        for entry in read_dir(&dir)? {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(MAPS_PREFIX) && path != own {
                found.push(path);
            } else if name.starts_with("SG_") {
                legacy = true;
            }
        }
        found.sort();
        if legacy {
            found.push(dir);
        }
        Ok(found)
    }

    pub fn run_dir(&self) -> PathBuf {
        Path::new(RUN_ROOT).join(&self.name)
    }

    pub fn state_path(&self) -> PathBuf {
        self.run_dir().join("state.json")
    }

    /// What the current (or last) canary compares: see [`CanaryState`].
    pub fn canary_path(&self) -> PathBuf {
        self.run_dir().join("canary.json")
    }

    /// The candidate text the current (or last) canary compares, as the daemon received it:
    /// what `try --commit` installs.
    pub fn candidate_path(&self) -> PathBuf {
        self.run_dir().join("candidate.toml")
    }

    /// The running daemon's control socket (`smtpguard try`).
    pub fn control_path(&self) -> PathBuf {
        self.run_dir().join("control.sock")
    }

    /// Where the last-good store of the instance's names and list files lives
    /// ([`crate::source::store`]): persistent, unlike the run directory.
    pub fn state_dir(&self) -> PathBuf {
        Path::new(STATE_ROOT).join(&self.name)
    }

    /// Takes the instance lock; held until the returned guard is dropped.
    pub fn lock(&self) -> Result<InstanceLock, InstanceError> {
        let dir = self.run_dir();
        prepare_dir(Path::new(RUN_ROOT))?;
        prepare_dir(&dir)?;
        let path = dir.join("lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| InstanceError::Io {
                path: path.clone(),
                source,
            })?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(InstanceError::Running {
                name: self.name.clone(),
                path,
            });
        }
        Ok(InstanceLock { _file: file })
    }

    /// The pin directory, as a previous daemon may have left it (maps and links to take
    /// over), created if missing; bpffs is mounted first if the system has not.
    pub fn prepare_pin_dir(&self) -> Result<PathBuf, InstanceError> {
        ensure_bpffs()?;
        prepare_dir(Path::new(PIN_ROOT))?;
        let dir = self.pin_dir();
        prepare_dir(&dir)?;
        Ok(dir)
    }

    /// The folder for the maps of layout `stamp`, created if missing, checked like the rest.
    pub fn prepare_maps_dir(&self, stamp: u64) -> Result<PathBuf, InstanceError> {
        let dir = self.maps_dir(stamp);
        prepare_dir(&dir)?;
        Ok(dir)
    }

    /// Removes the maps pinned at `dir` (a folder of another layout, or the legacy maps
    /// straight in the pin directory, whose links are kept).
    pub fn remove_layout(&self, dir: &Path) -> Result<(), InstanceError> {
        if dir == self.pin_dir() {
            for entry in read_dir(dir)? {
                if entry.file_name().to_string_lossy().starts_with("SG_") {
                    let path = entry.path();
                    std::fs::remove_file(&path)
                        .map_err(|source| InstanceError::Io { path, source })?;
                }
            }
            return Ok(());
        }
        remove_dir(dir)
    }

    /// Where the link attaching the program to `interface` is pinned.
    pub fn link_pin(&self, interface: &str) -> PathBuf {
        self.pin_dir().join(format!("{LINK_PREFIX}{interface}"))
    }

    /// Interfaces with a pinned link under the pin directory, and the pins' paths.
    pub fn pinned_links(&self) -> Result<Vec<(String, PathBuf)>, InstanceError> {
        let mut links = Vec::new();
        for entry in read_dir(&self.pin_dir())? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(interface) = name.strip_prefix(LINK_PREFIX) {
                links.push((interface.to_owned(), entry.path()));
            }
        }
        links.sort();
        Ok(links)
    }

    /// Removes the pins and the state file.
    pub fn clean_up(&self) -> Result<(), InstanceError> {
        remove_dir(&self.pin_dir())?;
        let state = self.state_path();
        match std::fs::remove_file(&state) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(InstanceError::Io {
                path: state,
                source,
            }),
        }
    }

    /// Replaces the state file atomically.
    pub fn write_state(&self, state: &RunState) -> Result<(), InstanceError> {
        write_json(&self.state_path(), state)
    }

    /// Replaces the canary record atomically.
    pub fn write_canary(&self, canary: &CanaryState) -> Result<(), InstanceError> {
        write_json(&self.canary_path(), canary)
    }

    /// The record of the current or last canary; `None` when none ran since the daemon
    /// started.
    pub fn read_canary(&self) -> Result<Option<CanaryState>, InstanceError> {
        let path = self.canary_path();
        match std::fs::read(&path) {
            Ok(text) => serde_json::from_slice(&text)
                .map(Some)
                .map_err(|source| InstanceError::BadState { path, source }),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(InstanceError::Io { path, source }),
        }
    }

    pub fn read_state(&self) -> Result<RunState, InstanceError> {
        let path = self.state_path();
        let text = std::fs::read(&path).map_err(|source| InstanceError::NotRunning {
            name: self.name.clone(),
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|source| InstanceError::BadState { path, source })
    }
}

impl Instance {
    /// Removes a filter left in place (`on_exit = "keep"`, or a killed daemon): each pinned
    /// link (the program is off its interface before this returns), the maps and the state.
    /// Refused while a daemon runs the instance. Returns the interfaces detached.
    pub fn detach(&self) -> Result<Vec<String>, InstanceError> {
        let _lock = self.lock()?;
        let mut detached = Vec::new();
        for (interface, path) in self.pinned_links()? {
            crate::kernel::link::detach_pinned(&path)
                .map_err(|source| InstanceError::Io { path, source })?;
            detached.push(interface);
        }
        self.clean_up()?;
        Ok(detached)
    }
}

impl RunState {
    /// Whether the daemon that wrote this state is still running.
    pub fn daemon_alive(&self) -> bool {
        // SAFETY: kill(2) with signal 0 only checks that the process exists.
        self.pid != 0 && unsafe { libc::kill(self.pid as i32, 0) } == 0
    }
}

/// Held while a daemon runs an instance.
pub struct InstanceLock {
    _file: File,
}

/// What `smtpguard stats` needs to know about a running daemon, beyond the counters.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunState {
    /// The daemon's pid; 0 once it has exited leaving the filter in place.
    pub pid: u32,
    /// What the daemon does with the filter when it exits.
    pub on_exit: crate::source::config::OnExit,
    pub version: String,
    pub config: PathBuf,
    pub generation: u32,
    pub applied_at_unix: u64,
    pub interfaces: Vec<InterfaceState>,
    pub ports: Vec<u16>,
    /// Whether the counters are being gathered while enforcing or auditing.
    pub mode: crate::source::config::Mode,
    /// What happens to unlisted sources.
    pub action: crate::source::config::Action,
    /// Every scope of the policy in force, the default one first (`ports`, `mode` and
    /// `action` above are the default scope's).
    #[serde(default)]
    pub scopes: Vec<ScopeState>,
    pub prefixes: Vec<PrefixState>,
    /// Kernel ids of the global and per-prefix counter maps, for readers that cannot see the
    /// pins.
    pub counter_map_ids: crate::kernel::maps::CounterMapIds,
    /// The boot policy is in force: the daemon attached a closed filter at once and is still
    /// building the real policy.
    #[serde(default)]
    pub boot: bool,
    /// Configured interfaces that do not exist (yet): attached as soon as they appear.
    #[serde(default)]
    pub waiting: Vec<String>,
    /// The layout stamp of the maps in force (where the counters are pinned).
    #[serde(default)]
    pub layout: u64,
    /// Names and list files whose last good answer is in force instead of a fresh one.
    #[serde(default)]
    pub sources: Vec<crate::source::fetch::SourceNote>,
}

/// Replaces the JSON file at `path` with `value`: written beside it, then renamed over it.
fn write_json(path: &Path, value: &impl Serialize) -> Result<(), InstanceError> {
    let temporary = path.with_extension("json.tmp");
    let text = serde_json::to_vec(value).map_err(|source| InstanceError::BadState {
        path: path.to_owned(),
        source,
    })?;
    std::fs::write(&temporary, text)
        .and_then(|()| std::fs::rename(&temporary, path))
        .map_err(|source| InstanceError::Io {
            path: path.to_owned(),
            source,
        })
}

/// What a canary compares the running policy with, for `report --canary`, `stats` and the
/// metrics. The program records the deciding rule of each side by counter id; the running
/// side's ids are in [`RunState::prefixes`], the candidate's here.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CanaryState {
    /// The candidate configuration file.
    pub config: PathBuf,
    pub started_unix: u64,
    /// When the canary ends by itself (`try --for`).
    pub until_unix: Option<u64>,
    /// When and how it ended (`aborted`, `expired`, `committed`, ...); `None` while it runs.
    pub ended_unix: Option<u64>,
    pub ended: Option<String>,
    /// The global canary counters (newly blocked, newly allowed) when it started: its counts
    /// are the counters minus these.
    pub baseline: [u64; 2],
    /// The global count of changed SYNs left out of the canary's table when it started (a
    /// canary started by an older version has none: its count runs from the counter's
    /// creation, bounded by the canary's own changed SYNs).
    #[serde(default)]
    pub baseline_unrecorded: u64,
    /// The candidate's scopes, by id.
    pub scopes: Vec<String>,
    /// The candidate's prefixes, with the counter ids the program names them by.
    pub prefixes: Vec<PrefixState>,
}

/// What a canary found since it started, from the global counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CanaryCounts {
    /// SYNs the candidate would stop that the running policy passes.
    pub newly_blocked: u64,
    /// SYNs the candidate would pass that the running policy stops.
    pub newly_allowed: u64,
    /// Of those, SYNs whose new source the per-CPU budget kept out of the table of sources:
    /// under a flood of new sources the table holds a sample, the counts above stay exact.
    pub unrecorded: u64,
}

impl CanaryState {
    /// The global canary counters when a canary starts, as its baseline.
    pub fn set_baseline(&mut self, counters: &crate::kernel::maps::CounterSnapshot) {
        use smtpguard_common::counter;
        self.baseline = [
            counters.get(counter::CANARY_NEWLY_BLOCKED),
            counters.get(counter::CANARY_NEWLY_ALLOWED),
        ];
        self.baseline_unrecorded = counters.get(counter::CANARY_UNRECORDED);
    }

    /// What the canary found, from the global `counters` less its baseline.
    pub fn counts(&self, counters: &crate::kernel::maps::CounterSnapshot) -> CanaryCounts {
        use smtpguard_common::counter;
        let newly_blocked = counters
            .get(counter::CANARY_NEWLY_BLOCKED)
            .saturating_sub(self.baseline[0]);
        let newly_allowed = counters
            .get(counter::CANARY_NEWLY_ALLOWED)
            .saturating_sub(self.baseline[1]);
        CanaryCounts {
            newly_blocked,
            newly_allowed,
            unrecorded: counters
                .get(counter::CANARY_UNRECORDED)
                .saturating_sub(self.baseline_unrecorded)
                .min(newly_blocked + newly_allowed),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InterfaceState {
    pub name: String,
    pub mode: AttachedMode,
    #[serde(default = "ethernet")]
    pub kind: LinkKind,
    /// Resets are withheld here (the NIC strips VLAN tags before XDP).
    #[serde(default)]
    pub resets_withheld: bool,
}

fn ethernet() -> LinkKind {
    LinkKind::Ethernet
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PrefixState {
    pub counter_id: u32,
    pub list: List,
    /// Shared with the policy and every prefix of the rule: a state of millions of prefixes
    /// holds one copy of each name.
    pub rule: Arc<str>,
    pub prefix: ipnet::IpNet,
    /// The scope the prefix belongs to (the default one in a state from before scopes).
    #[serde(default)]
    pub scope_id: u32,
    #[serde(default = "default_scope")]
    pub scope: Arc<str>,
    /// For a deny prefix of `allow` precedence inside an allow prefix: that prefix, which
    /// decides the SYNs this one matches (the program counts them there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<ipnet::IpNet>,
}

/// A scope of the policy in force, as `stats` and `report` show it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScopeState {
    pub name: String,
    pub destinations: Vec<ipnet::IpNet>,
    pub guarded: bool,
    pub ports: Vec<u16>,
    pub mode: crate::source::config::Mode,
    pub action: crate::source::config::Action,
}

fn default_scope() -> Arc<str> {
    "default".into()
}

fn ensure_bpffs() -> Result<(), InstanceError> {
    if is_bpffs(Path::new(BPFFS_ROOT)) {
        return Ok(());
    }
    log::info!("bpffs is not mounted at {BPFFS_ROOT}; mounting it (mode 0700)");
    let target =
        std::ffi::CString::new(BPFFS_ROOT).map_err(|error| InstanceError::Mount(error.into()))?;
    // SAFETY: all pointers are valid NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(InstanceError::Mount(io::Error::last_os_error()));
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct we own.
    unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        libc::statfs(path.as_ptr(), &mut stat) == 0 && stat.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Creates `path` (its parent must exist) 0700 if it is missing, then refuses it unless it is
/// a real directory, owned by root or by this user, and writable by nobody else.
fn prepare_dir(path: &Path) -> Result<(), InstanceError> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(InstanceError::Io {
                path: path.to_owned(),
                source,
            });
        }
    }
    let meta = std::fs::symlink_metadata(path).map_err(|source| InstanceError::Io {
        path: path.to_owned(),
        source,
    })?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let unsafe_dir = |reason: String| InstanceError::UnsafeDir {
        path: path.to_owned(),
        reason,
    };
    if meta.file_type().is_symlink() {
        return Err(unsafe_dir("it is a symbolic link".to_owned()));
    }
    if !meta.is_dir() {
        return Err(unsafe_dir("it is not a directory".to_owned()));
    }
    if meta.uid() != 0 && meta.uid() != me {
        return Err(unsafe_dir(format!(
            "it is owned by uid {}, not root",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "it is writable by group or others (mode {:04o})",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// The entries of `dir`; none if it does not exist.
fn read_dir(dir: &Path) -> Result<Vec<std::fs::DirEntry>, InstanceError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(InstanceError::Io {
                path: dir.to_owned(),
                source,
            });
        }
    };
    entries
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| InstanceError::Io {
            path: dir.to_owned(),
            source,
        })
}

fn remove_dir(path: &Path) -> Result<(), InstanceError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(InstanceError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names_are_checked() {
        assert!(Instance::new("default").is_ok());
        assert!(Instance::new("sg-123_4").is_ok());
        for bad in ["", "../etc", "a b", "a/b", &"x".repeat(65)] {
            assert!(Instance::new(bad).is_err(), "{bad:?} should be refused");
        }
        let instance = Instance::new("mail").unwrap();
        assert_eq!(instance.pin_dir(), Path::new("/sys/fs/bpf/smtpguard/mail"));
        assert_eq!(
            instance.state_path(),
            Path::new("/run/smtpguard/mail/state.json")
        );
        assert_eq!(instance.state_dir(), Path::new("/var/lib/smtpguard/mail"));
    }
}
