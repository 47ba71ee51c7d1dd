//! `smtpguard report --canary`: the sources whose verdict the canary's candidate policy would
//! change, most frequent first, with first and last sighting and the rule that decides on
//! each side. Read it before `smtpguard try --commit`.

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use serde::Serialize;
use smtpguard_common::{CanarySighting, canary_rule};

use crate::{
    command::report::{BootClock, rfc3339},
    instance::{CanaryCounts, CanaryState, PrefixState, RunState},
    kernel::maps::CounterSnapshot,
    policy::List,
};

#[derive(Clone, Debug, Serialize)]
pub struct CanaryReport {
    pub instance: String,
    /// The candidate configuration file.
    pub candidate: PathBuf,
    /// `running`, or how the canary ended (`aborted`, `expired`, `committed`, ...).
    pub state: String,
    #[serde(serialize_with = "rfc3339")]
    pub started: SystemTime,
    #[serde(serialize_with = "rfc3339_option")]
    pub until: Option<SystemTime>,
    #[serde(serialize_with = "rfc3339_option")]
    pub ended: Option<SystemTime>,
    /// SYNs the candidate would stop that the running policy passes, and the reverse, since
    /// the canary started (exact, whatever the table of sources holds), and how many of them
    /// came from new sources the table had no budget for.
    #[serde(flatten)]
    pub counts: CanaryCounts,
    /// Sources the table holds (it keeps the most recently seen, up to its size).
    pub sources: usize,
    pub rows: Vec<CanaryRow>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CanaryRow {
    pub source: IpAddr,
    pub newly_blocked: u64,
    pub newly_allowed: u64,
    #[serde(serialize_with = "rfc3339")]
    pub first_seen: SystemTime,
    #[serde(serialize_with = "rfc3339")]
    pub last_seen: SystemTime,
    /// What decides the source's SYNs now, and what would under the candidate.
    pub running: String,
    pub candidate: String,
}

fn rfc3339_option<S: serde::Serializer>(
    time: &Option<SystemTime>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match time {
        Some(time) => rfc3339(time, serializer),
        None => serializer.serialize_none(),
    }
}

fn unix(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

impl CanaryReport {
    /// The `top` most frequent sources of `sightings` (all of them if `top` is 0).
    pub fn new(
        instance: &str,
        state: &RunState,
        canary: &CanaryState,
        counters: &CounterSnapshot,
        sightings: &[(IpAddr, CanarySighting)],
        top: usize,
    ) -> Self {
        let clock = BootClock::now();
        let running = Names::new(&state.prefixes, state.scopes.iter().map(|s| s.name.clone()));
        let candidate = Names::new(&canary.prefixes, canary.scopes.iter().cloned());
        let mut rows: Vec<CanaryRow> = sightings
            .iter()
            .map(|(source, seen)| CanaryRow {
                source: *source,
                newly_blocked: seen.newly_blocked,
                newly_allowed: seen.newly_allowed,
                first_seen: clock.wall(seen.first_seen_ns),
                last_seen: clock.wall(seen.last_seen_ns),
                running: running.describe(seen.running_rule, seen.running_scope),
                candidate: candidate.describe(seen.candidate_rule, seen.candidate_scope),
            })
            .collect();
        rows.sort_by(|a, b| {
            (b.newly_blocked + b.newly_allowed, b.last_seen, a.source).cmp(&(
                a.newly_blocked + a.newly_allowed,
                a.last_seen,
                b.source,
            ))
        });
        let sources = rows.len();
        if top > 0 {
            rows.truncate(top);
        }
        Self {
            instance: instance.to_owned(),
            candidate: canary.config.clone(),
            state: canary.ended.clone().unwrap_or_else(|| "running".to_owned()),
            started: unix(canary.started_unix),
            until: canary.until_unix.map(unix),
            ended: canary.ended_unix.map(unix),
            counts: canary.counts(counters),
            sources,
            rows,
        }
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let when = match (self.ended, self.until) {
            (Some(ended), _) => format!(
                "{}, {}",
                self.state,
                humantime::format_rfc3339_seconds(ended)
            ),
            (None, Some(until)) => {
                format!("running until {}", humantime::format_rfc3339_seconds(until))
            }
            (None, None) => "running until `smtpguard try --commit` or `--abort`".to_owned(),
        };
        let _ = writeln!(
            out,
            "instance {}: canary of {} since {} ({when})",
            self.instance,
            self.candidate.display(),
            humantime::format_rfc3339_seconds(self.started),
        );
        let _ = writeln!(
            out,
            "{} SYNs would be newly blocked, {} newly allowed, from {} sources; no verdict was changed",
            self.counts.newly_blocked, self.counts.newly_allowed, self.sources
        );
        if self.counts.unrecorded > 0 {
            let _ = writeln!(
                out,
                "{} of those SYNs came from new sources left out of the table of sources (its per-CPU budget was spent: a flood); the sources listed are a sample, the counts above are exact",
                self.counts.unrecorded
            );
        }
        if self.rows.is_empty() {
            let _ = writeln!(
                out,
                "no source's verdict would change (so far): the candidate decides the traffic seen alike"
            );
            return out;
        }
        out.push('\n');
        let width = self
            .rows
            .iter()
            .map(|row| row.source.to_string().len())
            .max()
            .unwrap_or(6)
            .max(6);
        let running_width = self
            .rows
            .iter()
            .map(|row| row.running.len())
            .max()
            .unwrap_or(7)
            .max(7);
        let _ = writeln!(
            out,
            "{:<width$}  {:<14}  {:>6}  {:<20}  {:<20}  {:<running_width$}  CANDIDATE",
            "SOURCE", "CHANGE", "SYNS", "FIRST SEEN", "LAST SEEN", "RUNNING"
        );
        for row in &self.rows {
            let change = match (row.newly_blocked, row.newly_allowed) {
                (_, 0) => "newly blocked",
                (0, _) => "newly allowed",
                _ => "both",
            };
            let _ = writeln!(
                out,
                "{:<width$}  {:<14}  {:>6}  {:<20}  {:<20}  {:<running_width$}  {}",
                row.source.to_string(),
                change,
                row.newly_blocked + row.newly_allowed,
                humantime::format_rfc3339_seconds(row.first_seen).to_string(),
                humantime::format_rfc3339_seconds(row.last_seen).to_string(),
                row.running,
                row.candidate
            );
        }
        out
    }
}

/// Names the rule behind a counter id, on one side of the canary.
struct Names {
    prefixes: HashMap<u32, PrefixState>,
    scopes: Vec<String>,
}

impl Names {
    fn new(prefixes: &[PrefixState], scopes: impl Iterator<Item = String>) -> Self {
        Self {
            prefixes: prefixes
                .iter()
                .map(|prefix| (prefix.counter_id, prefix.clone()))
                .collect(),
            scopes: scopes.collect(),
        }
    }

    fn describe(&self, rule: u32, scope: u32) -> String {
        let scope = match self.scopes.get(scope as usize) {
            Some(name) if self.scopes.len() > 1 => format!(" in scope {name:?}"),
            _ => String::new(),
        };
        match rule {
            canary_rule::NOT_GUARDED => "not guarded".to_owned(),
            canary_rule::UNLISTED => format!("unlisted{scope}"),
            id => match self.prefixes.get(&id) {
                Some(prefix) => format!(
                    "{} {:?} ({}){scope}",
                    match prefix.list {
                        List::Allow => "allow",
                        List::Deny => "deny",
                    },
                    prefix.rule,
                    prefix.prefix
                ),
                None => format!("a prefix no longer in the policy{scope}"),
            },
        }
    }
}

/// The configuration file replaced by a candidate (`try --commit`), and its previous content
/// kept beside it, to put back if the daemon refuses the candidate.
pub struct Installed {
    pub target: PathBuf,
    pub previous: PathBuf,
}

/// Replaces the configuration file `config` (the file a symbolic link names, if it is one)
/// with `text`: the old content is kept as `NAME.prev`; each file is written beside its
/// place, with the original's owner and mode, synced, and renamed over it, so a crash
/// leaves the old file or the new one, whole.
pub fn install_candidate(config: &std::path::Path, text: &str) -> std::io::Result<Installed> {
    let target = std::fs::canonicalize(config)?;
    let like = std::fs::metadata(&target)?;
    let previous = with_suffix(&target, ".prev");
    write_beside(&previous, &std::fs::read(&target)?, &like)?;
    write_beside(&target, text.as_bytes(), &like)?;
    Ok(Installed { target, previous })
}

impl Installed {
    /// Puts the previous content back.
    pub fn restore(&self) -> std::io::Result<()> {
        let like = std::fs::metadata(&self.target)?;
        write_beside(&self.target, &std::fs::read(&self.previous)?, &like)
    }
}

/// Writes `bytes` to a new file beside `path` with `like`'s owner and mode, syncs it, renames
/// it over `path` and syncs the directory.
fn write_beside(
    path: &std::path::Path,
    bytes: &[u8],
    like: &std::fs::Metadata,
) -> std::io::Result<()> {
    use std::{
        io::Write as _,
        os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    };
    let temporary = with_suffix(path, &format!(".smtpguard-{}", std::process::id()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(bytes)?;
        std::os::unix::fs::fchown(&file, Some(like.uid()), Some(like.gid()))?;
        file.set_permissions(std::fs::Permissions::from_mode(like.mode() & 0o7777))?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// `path` with `suffix` added to its file name.
fn with_suffix(path: &std::path::Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(suffix);
    path.with_file_name(name)
}
