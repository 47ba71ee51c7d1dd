//! A canary for a policy change: the candidate policy sits in the standby slot and the
//! program decides every SYN by it as well, only to record the sources whose verdict would
//! change. `try --commit` makes the candidate the configuration and applies it through the
//! reload path; `try --abort`, the end of `--for` or the daemon's exit end it. No verdict
//! changes while it runs.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use tokio::time::Instant as TokioInstant;

use super::{Daemon, DaemonError, count_notes, fleet, log_warnings, unix_now};
use crate::service::state::prefix_state;
use crate::{
    instance::CanaryState,
    kernel::maps::CounterKey,
    policy::{List, Policy},
    service::control::{Call, Request, Response},
    source::{
        config::{self, Config},
        dns::Dns,
        fetch::{self as sources, Previous},
        url::Web,
    },
};

/// The longest a canary may run by itself (`--for`).
pub const MAX_CANARY_SECS: u64 = 90 * 24 * 3600;

/// A running canary.
pub(super) struct Canary {
    /// The candidate file, as named in messages; its text as compared is in the run
    /// directory, where `try --commit` takes it from.
    path: PathBuf,
    policy: Policy,
    /// The counter ids the program names the candidate's prefixes by; kept across the
    /// re-staging after a reload so the sightings keep their meaning.
    counter_ids: HashMap<CounterKey, u32>,
    record: CanaryState,
    pub(super) deadline: Option<TokioInstant>,
}

impl Daemon {
    /// Carries out a request from the control socket and answers it.
    pub(super) async fn serve(&mut self, call: Call) {
        let outcome = match call.request {
            Request::Try {
                config,
                text,
                for_secs,
            } => self.start_canary(&config, text, for_secs).await,
            Request::Commit => self.commit_canary().await,
            Request::Abort => self.end_canary("aborted"),
        };
        let response = match outcome {
            Ok(message) => {
                log::info!("{message}");
                Response { ok: true, message }
            }
            Err(error) => {
                let message = error.to_string();
                log::warn!("control request refused: {message}");
                Response { ok: false, message }
            }
        };
        let _ = call.reply.send(response);
    }

    /// `try --config PATH [--for DURATION]`.
    async fn start_canary(
        &mut self,
        path: &Path,
        text: String,
        for_secs: Option<u64>,
    ) -> Result<String, DaemonError> {
        let deadline = match for_secs {
            Some(secs) if secs > MAX_CANARY_SECS => {
                return Err(DaemonError::Canary(format!(
                    "--for: at most {} days",
                    MAX_CANARY_SECS / 86400
                )));
            }
            Some(secs) => Some(TokioInstant::now() + Duration::from_secs(secs)),
            None => None,
        };
        if let Some(canary) = &self.canary {
            return Err(DaemonError::Canary(format!(
                "a canary already runs ({} since {}); `smtpguard try --abort` ends it",
                canary.path.display(),
                humantime::format_rfc3339_seconds(unix_time(canary.record.started_unix))
            )));
        }
        if text.len() as u64 > config::MAX_CONFIG_BYTES {
            return Err(DaemonError::Canary(format!(
                "{}: over {} bytes",
                path.display(),
                config::MAX_CONFIG_BYTES
            )));
        }
        let candidate = Config::parse(path, &text)?;
        let dns = if candidate.dns == self.config.dns {
            None
        } else {
            Some(Dns::new(&candidate.dns)?)
        };
        let web = Web::new(&candidate.urls)?;
        let previous = Previous {
            fetched: &self.fetched,
            store: Some(&self.store),
            hold_growth: false,
        };
        let (fetched, notes) = sources::fetch(
            &candidate,
            dns.as_ref().unwrap_or(&self.dns),
            &web,
            &previous,
        )
        .await
        .map_err(Box::new)?;
        log_warnings(&notes.warnings);
        count_notes(&self.telemetry, &notes);
        // On a fleet host the candidate is the host's file with the group's policy, as a
        // commit would apply it.
        let (policy, warnings) = fleet::compose(&candidate, &fetched, self.fleet.as_ref())?;
        log_warnings(&warnings);
        let counters = self.maps.counters()?;
        let started_unix = unix_now();
        let until_unix = for_secs.map(|secs| started_unix + secs);
        let mut canary = Canary {
            path: path.to_owned(),
            record: CanaryState {
                config: path.to_owned(),
                started_unix,
                until_unix,
                ended_unix: None,
                ended: None,
                baseline: [0; 2],
                baseline_unrecorded: 0,
                scopes: Vec::new(),
                prefixes: Vec::new(),
            },
            policy,
            counter_ids: HashMap::new(),
            deadline,
        };
        canary.record.set_baseline(&counters);
        // The text as compared, for `--commit`, before the program compares anything.
        write_private(&self.instance.candidate_path(), &text)?;
        let (counter_ids, _) = match self
            .maps
            .start_canary(&canary.policy, &HashMap::new(), true)
        {
            Ok(started) => started,
            Err(error) => {
                // Whatever was staged, the program compares nothing.
                if let Err(error) = self.maps.end_canary() {
                    log::error!("{error}");
                }
                return Err(error.into());
            }
        };
        canary.counter_ids = counter_ids;
        canary.describe_candidate();
        let mut notes: Vec<String> = warnings.iter().map(ToString::to_string).collect();
        if candidate.interfaces != self.config.interfaces {
            notes.push(format!(
                "the candidate names other interfaces ({}): the canary compares policies on the interfaces in force; a commit attaches as the candidate says",
                candidate.interfaces.join(", ")
            ));
        }
        if candidate.xdp_mode != self.config.xdp_mode {
            notes.push(format!(
                "the candidate's xdp_mode is {} (in force: {}): a commit is refused until smtpguard restarts",
                candidate.xdp_mode, self.config.xdp_mode
            ));
        }
        let message = format!(
            "canary started: {} decides every SYN beside generation {} (in force), without changing any verdict; candidate: {} allow and {} deny prefixes{}{}. `smtpguard report --canary` lists the sources whose verdict would change; `smtpguard try --commit` applies the candidate, `smtpguard try --abort` ends the canary{}",
            path.display(),
            self.maps.generation(),
            canary.policy.count(List::Allow),
            canary.policy.count(List::Deny),
            match canary
                .policy
                .scopes
                .iter()
                .filter(|scope| scope.guarded)
                .count()
            {
                1 => String::new(),
                scopes => format!(" in {scopes} scopes"),
            },
            match until_unix {
                Some(until) => format!(
                    ", until {}",
                    humantime::format_rfc3339_seconds(unix_time(until))
                ),
                None => String::new(),
            },
            notes
                .iter()
                .map(|note| format!("\nnote: {note}"))
                .collect::<String>()
        );
        // Running from here on: `try --abort` must find it even if the record cannot be
        // written.
        let written = self.instance.write_canary(&canary.record);
        self.canary = Some(canary);
        self.publish_canary();
        written?;
        Ok(message)
    }

    /// `try --commit`: the client has replaced the configuration file with the candidate's
    /// text as compared; it is applied as a SIGHUP would. If that is refused, the canary
    /// goes on (and the client puts the file back).
    async fn commit_canary(&mut self) -> Result<String, DaemonError> {
        let Some(canary) = &self.canary else {
            return Err(DaemonError::Canary(
                "no canary runs: `smtpguard try --config FILE` starts one".into(),
            ));
        };
        let candidate = canary.path.clone();
        match self.reload().await {
            Ok(report) => {
                self.count_reload(true);
                let summary = self.end_canary("committed")?;
                Ok(format!(
                    "committed: the candidate {} is applied from {}; {}; {summary}",
                    candidate.display(),
                    self.config_path.display(),
                    self.describe(&report)
                ))
            }
            Err(error) => {
                self.count_reload(false);
                self.keep_canary();
                Err(DaemonError::Canary(format!(
                    "the candidate was not applied ({error}); generation {} stays in force and the canary goes on",
                    self.maps.generation()
                )))
            }
        }
    }

    /// Ends the canary (`how`: aborted, expired, committed, ...). Its sightings stay readable
    /// until the next one starts. Returns a summary.
    pub(super) fn end_canary(&mut self, how: &str) -> Result<String, DaemonError> {
        if self.canary.is_none() {
            return Err(DaemonError::Canary("no canary runs".into()));
        }
        // The program stops comparing first: a canary that cannot be stopped stays known.
        self.maps.end_canary()?;
        let Some(mut canary) = self.canary.take() else {
            return Err(DaemonError::Canary("no canary runs".into()));
        };
        canary.record.ended_unix = Some(unix_now());
        canary.record.ended = Some(how.to_owned());
        let counts = self
            .maps
            .counters()
            .map(|counters| canary.record.counts(&counters))
            .unwrap_or_default();
        let summary = format!(
            "canary of {} {how}: {} SYNs would have been newly blocked and {} newly allowed; `smtpguard report --canary` lists the sources until the next canary",
            canary.path.display(),
            counts.newly_blocked,
            counts.newly_allowed
        );
        self.instance.write_canary(&canary.record)?;
        self.publish_canary();
        Ok(summary)
    }

    /// Puts the candidate back beside a policy just applied (an apply rewrites the standby
    /// slot, where the candidate was): the sightings so far stay.
    pub(super) fn keep_canary(&mut self) {
        let Some(canary) = &mut self.canary else {
            return;
        };
        if self.maps.canary_on() {
            return;
        }
        match self
            .maps
            .start_canary(&canary.policy, &canary.counter_ids, false)
        {
            Ok((counter_ids, _)) => {
                canary.counter_ids = counter_ids;
                canary.describe_candidate();
                if let Err(error) = self.instance.write_canary(&canary.record) {
                    log::error!("{error}");
                }
                log::info!(
                    "canary of {} goes on beside generation {}",
                    canary.path.display(),
                    self.maps.generation()
                );
            }
            Err(error) => {
                log::error!(
                    "the canary's candidate could not be put back beside generation {}: {error}; the canary ends",
                    self.maps.generation()
                );
                if let Err(error) = self.end_canary("ended: its candidate could not be put back") {
                    log::error!("{error}");
                }
            }
        }
    }

    /// Tells the metrics endpoint whether a canary runs.
    fn publish_canary(&self) {
        if let Ok(mut telemetry) = self.telemetry.lock() {
            telemetry.canary_active = self.canary.is_some();
        }
    }
}

impl Canary {
    /// Records the candidate's scopes and prefixes (with their counter ids) for readers.
    fn describe_candidate(&mut self) {
        self.record.scopes = self
            .policy
            .scopes
            .iter()
            .map(|scope| scope.name.clone())
            .collect();
        self.record.prefixes = self
            .counter_ids
            .iter()
            .map(|(&key, &counter_id)| prefix_state(&self.policy, key, counter_id))
            .collect();
        self.record.prefixes.sort_by_key(|prefix| prefix.counter_id);
    }
}

/// Writes `text` to `path` (replacing it) readable by root alone.
fn write_private(path: &Path, text: &str) -> Result<(), DaemonError> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let temporary = path.with_extension("tmp");
    let outcome = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .and_then(|()| std::fs::rename(&temporary, path));
    outcome.map_err(|source| DaemonError::Canary(format!("{}: {source}", path.display())))
}

/// Marks a canary a previous daemon left running as ended: the program no longer compares
/// (the pinned maps' flag is cleared on takeover).
pub(super) fn end_orphaned(instance: &crate::instance::Instance) {
    if let Ok(Some(mut record)) = instance.read_canary()
        && record.ended.is_none()
    {
        record.ended_unix = Some(unix_now());
        record.ended = Some("ended: the daemon restarted".to_owned());
        if let Err(error) = instance.write_canary(&record) {
            log::warn!("{error}");
        }
    }
}

fn unix_time(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}
