//! The daemon's side of a `[fleet]`: the group's policy merged with the host's own rules,
//! each published revision applied through the same atomic path as SIGHUP, the last one
//! kept in the last-good store for a start without etcd, and what is in force reported
//! back (etcd, `stats`, metrics).

use std::{path::Path, time::Duration};

use serde::{Deserialize, Serialize};
use smtpguard_common::counter;

use super::{Daemon, DaemonError, apply, build_policy, log_warnings, unix_now};
use crate::{
    fleet::{
        FleetSettings, HostReport, Published,
        follow::{Event, Follower},
        snapshot::{self, Manifest},
    },
    kernel::maps::{CounterMaps, open_counters},
    policy::{Policy, merge},
    source::{
        config::{Config, ConfigError, Warning},
        fetch::Fetched,
        store::{Store, StoreError, write_atomic},
    },
};

/// How often the counters in the host's report are brought up to date.
pub(super) const REPORT_EVERY: Duration = Duration::from_secs(3);

/// A group revision in force, as received.
pub(super) struct GroupPolicy {
    revision: i64,
    manifest: Manifest,
    manifest_bytes: Vec<u8>,
    compressed: Vec<u8>,
    policy: Policy,
}

/// What the daemon knows about its group.
pub(super) struct FleetLink {
    settings: FleetSettings,
    follower: Option<Follower>,
    group: Option<GroupPolicy>,
    connected: bool,
    /// Why the newest revision is not in force, if it was refused.
    refused: Option<String>,
    /// The revision and hash last refused, so a re-read of it is not logged again.
    refused_hash: Option<(i64, String)>,
    applied_at_unix: u64,
    counters: Option<CounterMaps>,
}

/// `fleet.json` beside the state file: for `stats`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FleetState {
    pub group: String,
    pub host: String,
    pub endpoints: Vec<String>,
    pub connected: bool,
    pub revision: i64,
    pub hash: String,
    pub applied_at_unix: u64,
    pub refused: Option<String>,
}

impl FleetLink {
    /// The group's policy in force (or kept from the last run), if there is one.
    pub(super) fn group_policy(&self) -> Option<&Policy> {
        self.group.as_ref().map(|group| &group.policy)
    }

    /// The link for `settings`, with the group policy the store kept (refused if it does
    /// not validate: the host then starts with its own rules until the cluster answers).
    pub(super) fn load(settings: FleetSettings, store: &Store) -> Self {
        let group = match read_stored(store.dir(), &settings.group) {
            Ok(group) => group,
            Err(error) => {
                log::error!(
                    "fleet: the kept policy of group {:?} is not usable: {error}",
                    settings.group
                );
                None
            }
        };
        if let Some(group) = &group {
            log::info!(
                "fleet: group {:?} revision {} (sha256 {}) from the last-good store, until the cluster answers",
                settings.group,
                group.revision,
                group.manifest.short_hash()
            );
        }
        Self {
            settings,
            follower: None,
            group,
            connected: false,
            refused: None,
            refused_hash: None,
            applied_at_unix: 0,
            counters: None,
        }
    }
}

/// The policy for `config`: its own, or, for a host that follows a group, the group's with
/// the file's rules merged in.
pub(super) fn compose(
    config: &Config,
    fetched: &Fetched,
    fleet: Option<&FleetLink>,
) -> Result<(Policy, Vec<Warning>), ConfigError> {
    let Some(fleet) = fleet else {
        return build_policy(config, fetched);
    };
    let unused = host_rules_unused(config, fleet.group_policy());
    // The host's own rules are optional: the group brings the allow list.
    let mut local = config.clone();
    local.allow_none = true;
    let (policy, mut warnings) = build_policy(&local, fetched)?;
    warnings.extend(unused);
    match &fleet.group {
        Some(group) => Ok((merge::merge(&group.policy, &policy)?, warnings)),
        None => {
            log::warn!(
                "fleet: no policy of group {:?} yet (none kept, none received): the host's own rules alone are in force",
                fleet.settings.group
            );
            Ok((policy, warnings))
        }
    }
}

/// A warning where `group` guards no destination outside its scopes: the host's top-level
/// rules join its default scope and stop nothing there until a revision guards it. Not a
/// refusal: that would keep the host on an older revision of the group. (A host file with
/// `[[scope]]`s is refused when it is read: the group brings the scopes.)
fn host_rules_unused(config: &Config, group: Option<&Policy>) -> Option<Warning> {
    group
        .filter(|group| !group.default_scope().guarded)
        .and_then(|_| config.allow.iter().chain(&config.deny).next())
        .map(|rule| Warning {
            at: rule.at.clone(),
            message: format!(
                "rule {:?} and the host's other rules take no effect: the fleet group's policy guards no destination outside its scopes (put them in the group's scopes)",
                rule.name
            ),
        })
}

/// Waits for the follower's next event; never, without one.
pub(super) async fn next_event(fleet: &mut Option<FleetLink>) -> Event {
    match fleet.as_mut().and_then(|fleet| fleet.follower.as_mut()) {
        Some(follower) => follower.next().await,
        None => std::future::pending().await,
    }
}

impl Daemon {
    /// Starts following the group, once the daemon enforces.
    pub(super) fn start_fleet(&mut self) {
        let maps_dir = self.instance.maps_dir(smtpguard_common::LAYOUT_STAMP);
        let counters = open_counters(&maps_dir, self.counter_map_ids)
            .map_err(|error| log::warn!("fleet: the report carries no counters: {error}"))
            .ok();
        let report = self.fleet_report();
        if let Some(fleet) = &mut self.fleet {
            fleet.counters = counters;
            fleet.follower = Some(Follower::start(fleet.settings.clone(), report));
        }
        self.record_fleet();
    }

    /// Withdraws the host's report before the daemon exits; `stats` has no link to show once
    /// no daemon runs.
    pub(super) async fn leave_fleet(&mut self) {
        if let Some(follower) = self.fleet.as_mut().and_then(|fleet| fleet.follower.take()) {
            follower.leave(Duration::from_secs(1)).await;
            let _ = std::fs::remove_file(self.instance.run_dir().join(FLEET_STATE));
        }
    }

    pub(super) async fn on_fleet_event(&mut self, event: Event) {
        match event {
            Event::Connected(connected) => {
                if let Some(fleet) = &mut self.fleet {
                    fleet.connected = connected;
                    if !connected {
                        log::warn!(
                            "fleet: cluster of group {:?} unreachable; generation {} stays in force (revision {})",
                            fleet.settings.group,
                            self.maps.generation(),
                            fleet.group.as_ref().map_or(0, |group| group.revision)
                        );
                    }
                }
                self.record_fleet();
            }
            Event::Published(published) => self.apply_published(published),
        }
    }

    /// Applies a published revision, unless it is the one in force or does not validate.
    fn apply_published(&mut self, published: Published) {
        let Some(fleet) = &mut self.fleet else {
            return;
        };
        let unchanged = fleet.group.as_ref().is_some_and(|group| {
            group.revision == published.revision
                && group.manifest_bytes == published.manifest_bytes
                && group.compressed == published.compressed
        });
        if unchanged {
            return;
        }
        let fingerprint = (
            published.revision,
            snapshot::hash(&[published.manifest_bytes.as_slice(), &published.compressed].concat()),
        );
        let started = std::time::Instant::now();
        let decoded = published.decode(&fleet.settings.group);
        let outcome = decoded
            .map_err(DaemonError::from)
            .and_then(|(manifest, group_policy)| {
                let group = GroupPolicy {
                    revision: published.revision,
                    manifest,
                    manifest_bytes: published.manifest_bytes,
                    compressed: published.compressed,
                    policy: group_policy,
                };
                let previous = fleet.group.replace(group);
                let composed = compose(&self.config, &self.fetched, Some(fleet));
                let applied = composed
                    .map_err(DaemonError::from)
                    .and_then(|(policy, warnings)| {
                        log_warnings(&warnings);
                        let report = apply(&mut self.maps, &policy)?;
                        Ok((policy, report))
                    });
                if applied.is_err() {
                    fleet.group = previous;
                }
                applied
            });
        match outcome {
            Ok((policy, report)) => {
                fleet.refused = None;
                fleet.refused_hash = None;
                fleet.applied_at_unix = unix_now();
                if let Some(group) = &fleet.group {
                    log::info!(
                        "fleet: group {:?} revision {} (sha256 {}) in force as generation {} {:.0} ms after it arrived: {} allow and {} deny prefixes",
                        fleet.settings.group,
                        group.revision,
                        group.manifest.short_hash(),
                        report.generation,
                        started.elapsed().as_secs_f64() * 1e3,
                        policy.count(crate::policy::List::Allow),
                        policy.count(crate::policy::List::Deny),
                    );
                    if let Err(error) = save_stored(self.store.dir(), &fleet.settings.group, group)
                    {
                        log::error!(
                            "fleet: {error}; a start without the cluster cannot use this revision"
                        );
                    }
                }
                self.note_applied();
                self.count_reload(true);
                crate::reclaim::drop_later(std::mem::replace(
                    &mut self.policy,
                    std::sync::Arc::new(policy),
                ));
                // In force whatever happens to the record of it, written off this path.
                self.record_state();
            }
            Err(error) => {
                if fleet.refused_hash.as_ref() != Some(&fingerprint) {
                    log::error!(
                        "fleet: group {:?} revision {} refused, generation {} stays in force: {error}",
                        fleet.settings.group,
                        fingerprint.0,
                        self.maps.generation()
                    );
                    self.count_reload(false);
                }
                let fleet = self.fleet.as_mut().expect("checked above");
                fleet.refused = Some(format!("revision {}: {error}", fingerprint.0));
                fleet.refused_hash = Some(fingerprint);
            }
        }
        self.report_fleet();
    }

    /// What this host tells the group now.
    fn fleet_report(&self) -> HostReport {
        let Some(fleet) = &self.fleet else {
            return HostReport::default();
        };
        let counters = fleet
            .counters
            .as_ref()
            .and_then(|maps| maps.read().ok())
            .unwrap_or_default();
        let group_entries = fleet
            .group
            .as_ref()
            .map_or(0, |group| group.policy.entries().count());
        HostReport {
            host: fleet.settings.host.clone(),
            revision: fleet.group.as_ref().map_or(0, |group| group.revision),
            hash: fleet
                .group
                .as_ref()
                .map_or_else(String::new, |group| group.manifest.hash.clone()),
            generation: self.maps.generation(),
            mode: self.policy.mode().to_string(),
            applied_at_unix: fleet.applied_at_unix,
            reported_at_unix: 0,
            local_prefixes: self.policy.entries().count().saturating_sub(group_entries),
            refused: fleet.refused.clone(),
            syn_allowed: counters.get(counter::SYN_ALLOWED),
            syn_denied: counters.get(counter::SYN_DENIED),
            syn_unlisted: counters.get(counter::SYN_UNLISTED),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            report_ttl_secs: fleet.settings.report_ttl.as_secs(),
        }
    }

    /// Hands the current report to the follower and records the link for `stats` and metrics.
    pub(super) fn report_fleet(&mut self) {
        let report = self.fleet_report();
        if let Some(follower) = self
            .fleet
            .as_ref()
            .and_then(|fleet| fleet.follower.as_ref())
        {
            follower.report(report);
        }
        self.record_fleet();
    }

    /// `fleet.json` for `stats`, and the metrics' view of the link.
    fn record_fleet(&self) {
        let Some(fleet) = &self.fleet else {
            return;
        };
        let state = FleetState {
            group: fleet.settings.group.clone(),
            host: fleet.settings.host.clone(),
            endpoints: fleet.settings.connection.endpoints.clone(),
            connected: fleet.connected,
            revision: fleet.group.as_ref().map_or(0, |group| group.revision),
            hash: fleet
                .group
                .as_ref()
                .map_or_else(String::new, |group| group.manifest.hash.clone()),
            applied_at_unix: fleet.applied_at_unix,
            refused: fleet.refused.clone(),
        };
        if let Ok(mut telemetry) = self.telemetry.lock() {
            telemetry.fleet = Some(crate::service::metrics::FleetTelemetry {
                connected: state.connected,
                revision: state.revision,
                last_applied_unix: state.applied_at_unix,
            });
        }
        let path = self.instance.run_dir().join(FLEET_STATE);
        let text = serde_json::to_vec_pretty(&state).expect("plain data");
        let temporary = path.with_extension("json.tmp");
        if let Err(error) =
            std::fs::write(&temporary, text).and_then(|()| std::fs::rename(&temporary, &path))
        {
            log::warn!("fleet: cannot write {}: {error}", path.display());
        }
    }

    /// Notes when the kept group policy was in force from the start.
    pub(super) fn fleet_started(&mut self) {
        if let Some(fleet) = &mut self.fleet
            && fleet.group.is_some()
        {
            fleet.applied_at_unix = unix_now();
        }
    }
}

/// The file beside the state file that `stats` reads.
pub const FLEET_STATE: &str = "fleet.json";

/// Reads what `stats` is told about the group, if the instance follows one.
pub fn read_fleet_state(run_dir: &Path) -> Option<FleetState> {
    let text = std::fs::read(run_dir.join(FLEET_STATE)).ok()?;
    serde_json::from_slice(&text).ok()
}

fn stored_name(group: &str) -> String {
    format!("fleet-{group}.snapshot")
}

/// Keeps `group` in the last-good store: revision, manifest and payload as received, so a
/// start checks them exactly as a fresh read is checked.
fn save_stored(dir: &Path, name: &str, group: &GroupPolicy) -> Result<(), StoreError> {
    let mut bytes = Vec::with_capacity(12 + group.manifest_bytes.len() + group.compressed.len());
    bytes.extend_from_slice(&group.revision.to_be_bytes());
    bytes.extend_from_slice(&(group.manifest_bytes.len() as u32).to_be_bytes());
    bytes.extend_from_slice(&group.manifest_bytes);
    bytes.extend_from_slice(&group.compressed);
    write_atomic(dir, &stored_name(name), &bytes)
}

#[derive(Debug, thiserror::Error)]
enum StoredError {
    #[error("{path}: {source}", path = path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cut off", path = path.display())]
    Short { path: std::path::PathBuf },
    #[error("{path}: {source}", path = path.display())]
    Invalid {
        path: std::path::PathBuf,
        source: snapshot::SnapshotError,
    },
}

fn read_stored(dir: &Path, name: &str) -> Result<Option<GroupPolicy>, StoredError> {
    let path = dir.join(stored_name(name));
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StoredError::Read { path, source }),
    };
    let short = || StoredError::Short { path: path.clone() };
    let revision = i64::from_be_bytes(
        bytes
            .get(..8)
            .ok_or_else(short)?
            .try_into()
            .expect("8 bytes"),
    );
    let length = u32::from_be_bytes(
        bytes
            .get(8..12)
            .ok_or_else(short)?
            .try_into()
            .expect("4 bytes"),
    ) as usize;
    let manifest_bytes = bytes.get(12..12 + length).ok_or_else(short)?.to_vec();
    let compressed = bytes[12 + length..].to_vec();
    let invalid = |source| StoredError::Invalid {
        path: path.clone(),
        source,
    };
    let manifest = snapshot::read_manifest(&manifest_bytes).map_err(invalid)?;
    let policy = snapshot::decode(&manifest, &compressed).map_err(invalid)?;
    Ok(Some(GroupPolicy {
        revision,
        manifest,
        manifest_bytes,
        compressed,
        policy,
    }))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::source::fetch::Fetched;

    fn parse(text: &str) -> Config {
        Config::parse(Path::new("/etc/smtpguard/host.toml"), text).unwrap()
    }

    #[test]
    fn a_hosts_rules_must_reach_the_groups_policy() {
        let scoped_group = parse(
            "interfaces = [\"eth0\"]\n[[scope]]\nname = \"mail\"\ndestinations = [\"198.51.100.1\"]\n[[scope.allow]]\nname = \"p\"\nprefixes = [\"192.0.2.0/28\"]\n",
        );
        let (scoped_group, _) = Policy::build(&scoped_group, &Fetched::default()).unwrap();
        let host = parse(
            "interfaces = [\"eth0\"]\nallow_none = true\n[[deny]]\nname = \"abuser\"\nprefixes = [\"192.0.2.9\"]\n",
        );
        let warning = host_rules_unused(&host, Some(&scoped_group))
            .expect("said")
            .to_string();
        assert!(
            warning.starts_with("/etc/smtpguard/host.toml:4:"),
            "{warning}"
        );
        assert!(warning.contains("\"abuser\""), "{warning}");
        let (guarded_group, _) = Policy::build(
            &parse(
                "interfaces = [\"eth0\"]\n[[allow]]\nname = \"p\"\nprefixes = [\"192.0.2.0/28\"]\n",
            ),
            &Fetched::default(),
        )
        .unwrap();
        assert!(host_rules_unused(&host, Some(&guarded_group)).is_none());
        assert!(host_rules_unused(&host, None).is_none());

        // A host file with its own scopes is refused as it is read.
        let error = Config::parse(
            Path::new("/etc/smtpguard/host.toml"),
            "interfaces = [\"eth0\"]\n[fleet]\netcd = [\"http://127.0.0.1:2379\"]\ngroup = \"mx\"\n[[scope]]\nname = \"own\"\ndestinations = [\"198.51.100.2\"]\nallow_none = true\n",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("[[scope]]"), "{error}");
        assert!(
            error.contains("the group's published policy says this"),
            "{error}"
        );
    }
}
