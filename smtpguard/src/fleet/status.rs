//! `smtpguard fleet status`: the group's published revision and, per host, what it applied
//! and when. A host behind the published revision, one that refused it, and one whose report
//! expired (a member without a live report: stopped, killed or cut off) are flagged; the
//! fleet is in step when none is.

use std::{collections::BTreeMap, fmt::Write as _};

use etcd_client::{Client, GetOptions};
use serde::Serialize;

use super::{FleetError, HostReport, Keys, Member, read_published, snapshot};

/// A report older than this many lease lengths counts as silent even while its lease holds.
const SILENT_AFTER_TTLS: u64 = 3;

#[derive(Debug, Serialize)]
pub struct Status {
    pub group: String,
    /// The published revision (0: nothing published).
    pub revision: i64,
    pub hash: String,
    pub allow: usize,
    pub deny: usize,
    pub published_at_unix: u64,
    pub publisher: String,
    /// Why the published policy does not validate, if it does not.
    pub problem: Option<String>,
    pub hosts: Vec<HostStatus>,
    pub in_step: bool,
}

#[derive(Debug, Serialize)]
pub struct HostStatus {
    pub host: String,
    /// `in step`, `behind`, `refused` or `silent`.
    pub state: &'static str,
    pub report: Option<HostReport>,
}

/// Reads the group's state from the cluster.
pub async fn read(
    client: &mut Client,
    keys: &Keys,
    endpoints: &str,
    now_unix: u64,
) -> Result<Status, FleetError> {
    let (published, _) = read_published(client, keys, endpoints).await?;
    let mut status = Status {
        group: keys.group.clone(),
        revision: 0,
        hash: String::new(),
        allow: 0,
        deny: 0,
        published_at_unix: 0,
        publisher: String::new(),
        problem: None,
        hosts: Vec::new(),
        in_step: false,
    };
    if let Some(published) = &published {
        status.revision = published.revision;
        match published.decode(&keys.group) {
            Ok((manifest, _)) => {
                status.hash = manifest.hash;
                status.allow = manifest.allow;
                status.deny = manifest.deny;
                status.published_at_unix = manifest.published_at_unix;
                status.publisher = manifest.publisher;
            }
            Err(error) => status.problem = Some(error.to_string()),
        }
    }
    let mut hosts: BTreeMap<String, Option<HostReport>> = BTreeMap::new();
    for (prefix, members) in [(keys.members(), true), (keys.hosts(), false)] {
        let response = client
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|source| FleetError::Etcd {
                endpoints: endpoints.to_owned(),
                what: "reading the hosts",
                source: Box::new(source),
            })?;
        for kv in response.kvs() {
            let name = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
            if members {
                let _: Option<Member> = serde_json::from_slice(kv.value()).ok();
                hosts.entry(name).or_default();
            } else {
                let report = serde_json::from_slice::<HostReport>(kv.value()).ok();
                hosts.insert(name, report);
            }
        }
    }
    for (host, report) in hosts {
        let silent_after = |report: &HostReport| {
            let ttl = if report.report_ttl_secs > 0 {
                report.report_ttl_secs
            } else {
                super::DEFAULT_REPORT_TTL.as_secs()
            };
            ttl * SILENT_AFTER_TTLS
        };
        let state = match &report {
            None => "silent",
            Some(report)
                if now_unix.saturating_sub(report.reported_at_unix) > silent_after(report) =>
            {
                "silent"
            }
            Some(report) if report.revision == status.revision && report.hash == status.hash => {
                "in step"
            }
            Some(report) if report.refused.is_some() => "refused",
            Some(_) => "behind",
        };
        status.hosts.push(HostStatus {
            host,
            state,
            report,
        });
    }
    status.in_step = status.revision > 0
        && status.problem.is_none()
        && status.hosts.iter().all(|host| host.state == "in step");
    Ok(status)
}

impl Status {
    pub fn to_text(&self, now_unix: u64) -> String {
        let mut text = String::new();
        if self.revision == 0 {
            let _ = writeln!(text, "group {:?}: nothing published", self.group);
        } else if let Some(problem) = &self.problem {
            let _ = writeln!(
                text,
                "group {:?}: revision {} does not validate: {problem}",
                self.group, self.revision
            );
        } else {
            let _ = writeln!(
                text,
                "group {:?}: revision {} (sha256 {}), {} allow and {} deny prefixes, published {} by {}",
                self.group,
                self.revision,
                snapshot::short_hash(&self.hash),
                self.allow,
                self.deny,
                ago(now_unix, self.published_at_unix),
                self.publisher
            );
        }
        let _ = writeln!(
            text,
            "{:<20} {:<9} {:>8} {:<12} {:>10} {:<8} {:<14} {:<14}",
            "HOST", "STATE", "REVISION", "HASH", "GENERATION", "MODE", "APPLIED", "REPORTED"
        );
        for host in &self.hosts {
            match &host.report {
                Some(report) => {
                    let _ = writeln!(
                        text,
                        "{:<20} {:<9} {:>8} {:<12} {:>10} {:<8} {:<14} {:<14}",
                        host.host,
                        host.state,
                        report.revision,
                        snapshot::short_hash(&report.hash),
                        report.generation,
                        report.mode,
                        ago(now_unix, report.applied_at_unix),
                        ago(now_unix, report.reported_at_unix)
                    );
                    if let Some(refused) = &report.refused {
                        let _ = writeln!(text, "{:<20} refused: {refused}", "");
                    }
                }
                None => {
                    let _ = writeln!(
                        text,
                        "{:<20} {:<9} {:>8} {:<12} {:>10} {:<8} {:<14} {:<14}",
                        host.host, host.state, "-", "-", "-", "-", "-", "no report"
                    );
                }
            }
        }
        let behind = self
            .hosts
            .iter()
            .filter(|host| host.state != "in step")
            .count();
        if self.in_step {
            let _ = writeln!(text, "in step: {} hosts", self.hosts.len());
        } else {
            let _ = writeln!(
                text,
                "not in step: {behind} of {} hosts behind, refusing or silent",
                self.hosts.len()
            );
        }
        text
    }
}

fn ago(now: u64, then: u64) -> String {
    if then == 0 {
        return "-".to_owned();
    }
    format!("{} s ago", now.saturating_sub(then))
}
