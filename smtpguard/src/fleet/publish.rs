//! `smtpguard publish`: the difference between a compiled policy and what the group has,
//! the guard against a publish that empties the allow list, and the one transaction that
//! writes it, guarded on the revision the publisher read.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    sync::Arc,
};

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use ipnet::IpNet;

use super::{FleetError, Keys, Published, snapshot};
use crate::policy::{List, Policy};

/// What a publish may do.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The largest share of the group's allow prefixes a publish may remove without `--force`.
    pub max_allow_removal: f64,
    /// Write even when more is removed.
    pub force: bool,
    /// The largest request etcd takes (its `--max-request-bytes`, 1.5 MiB by default).
    pub max_request_bytes: usize,
}

/// What the group has now, as far as a publish is concerned.
pub struct Current {
    /// The manifest's revision: the publish is written only if it is still this (0: none).
    pub revision: i64,
    pub manifest: Option<snapshot::Manifest>,
    pub policy: Option<Policy>,
    /// Why what is there could not be read, if it could not.
    pub unreadable: Option<String>,
}

impl Current {
    pub fn from_published(published: Option<Published>, group: &str) -> Self {
        let Some(published) = published else {
            return Self {
                revision: 0,
                manifest: None,
                policy: None,
                unreadable: None,
            };
        };
        match published.decode(group) {
            Ok((manifest, policy)) => Self {
                revision: published.revision,
                manifest: Some(manifest),
                policy: Some(policy),
                unreadable: None,
            },
            Err(error) => Self {
                revision: published.revision,
                manifest: None,
                policy: None,
                unreadable: Some(error.to_string()),
            },
        }
    }
}

/// A rule of a scope: scope name, list, rule name.
pub type RuleKey = (String, List, String);

/// Prefixes added and removed, per scope, list and rule.
#[derive(Debug, Default)]
pub struct Diff {
    /// Per rule: the prefixes added, and those removed.
    pub rules: BTreeMap<RuleKey, (Vec<IpNet>, Vec<IpNet>)>,
    /// Scope settings that changed, in words.
    pub settings: Vec<String>,
    pub allow_removed: usize,
    pub allow_before: usize,
}

impl Diff {
    pub fn between(old: Option<&Policy>, new: &Policy) -> Self {
        let index = |policy: &Policy| -> BTreeMap<(String, IpNet), (List, Arc<str>)> {
            policy
                .scopes
                .iter()
                .flat_map(|scope| {
                    scope.entries.iter().map(move |(net, entry)| {
                        ((scope.name.clone(), *net), (entry.list, entry.rule.clone()))
                    })
                })
                .collect()
        };
        let before = old.map(index).unwrap_or_default();
        let after = index(new);
        let mut diff = Self::default();
        for ((scope, net), (list, rule)) in &after {
            if before.get(&(scope.clone(), *net)) != Some(&(*list, rule.clone())) {
                let key = (scope.clone(), *list, rule.to_string());
                diff.rules.entry(key).or_default().0.push(*net);
            }
        }
        for ((scope, net), (list, rule)) in &before {
            if *list == List::Allow {
                diff.allow_before += 1;
            }
            if after.get(&(scope.clone(), *net)) != Some(&(*list, rule.clone())) {
                if *list == List::Allow
                    && after.get(&(scope.clone(), *net)).map(|(list, _)| *list) != Some(List::Allow)
                {
                    diff.allow_removed += 1;
                }
                let key = (scope.clone(), *list, rule.to_string());
                diff.rules.entry(key).or_default().1.push(*net);
            }
        }
        if let Some(old) = old {
            diff.settings = settings_changes(old, new);
        }
        diff
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.settings.is_empty()
    }

    /// The difference as an admin reads it: a line per rule, the first prefixes of each side.
    pub fn to_text(&self, shown: usize) -> String {
        let mut text = String::new();
        for line in &self.settings {
            let _ = writeln!(text, "  {line}");
        }
        for ((scope, list, rule), (added, removed)) in &self.rules {
            let _ = writeln!(
                text,
                "  scope {scope:?} {list} rule {rule:?}: +{} -{}",
                added.len(),
                removed.len()
            );
            for (sign, nets) in [('+', added), ('-', removed)] {
                for net in nets.iter().take(shown) {
                    let _ = writeln!(text, "    {sign} {net}");
                }
                if nets.len() > shown {
                    let _ = writeln!(text, "    {sign} ... {} more", nets.len() - shown);
                }
            }
        }
        text
    }
}

fn settings_changes(old: &Policy, new: &Policy) -> Vec<String> {
    let names = |policy: &Policy| -> BTreeSet<String> {
        policy
            .scopes
            .iter()
            .map(|scope| scope.name.clone())
            .collect()
    };
    let mut changes = Vec::new();
    for name in names(old).union(&names(new)) {
        let before = old.scopes.iter().find(|scope| &scope.name == name);
        let after = new.scopes.iter().find(|scope| &scope.name == name);
        match (before, after) {
            (None, Some(_)) => changes.push(format!("scope {name:?} added")),
            (Some(_), None) => changes.push(format!("scope {name:?} removed")),
            (Some(before), Some(after)) => {
                let describe = |scope: &crate::policy::Scope| {
                    let ports: Vec<String> = scope.ports.iter().map(ToString::to_string).collect();
                    let destinations: Vec<String> =
                        scope.destinations.iter().map(ToString::to_string).collect();
                    format!(
                        "guarded {}, ports {}, mode {}, unlisted {}, destinations [{}]",
                        scope.guarded,
                        ports.join(","),
                        scope.mode,
                        scope.unlisted_action,
                        destinations.join(", ")
                    )
                };
                let (was, is) = (describe(before), describe(after));
                if was != is {
                    changes.push(format!("scope {name:?}: {was} -> {is}"));
                }
            }
            (None, None) => {}
        }
    }
    changes
}

/// Refuses a publish that removes more of the allow list than `limits` allow.
pub fn check_removal(diff: &Diff, limits: &Limits, group: &str) -> Result<(), FleetError> {
    if limits.force || diff.allow_before == 0 {
        return Ok(());
    }
    let share = diff.allow_removed as f64 / diff.allow_before as f64;
    if share > limits.max_allow_removal {
        return Err(FleetError::TooMuchRemoved {
            group: group.to_owned(),
            removed: diff.allow_removed,
            current: diff.allow_before,
            share: share * 100.0,
            max: limits.max_allow_removal * 100.0,
        });
    }
    Ok(())
}

/// Writes `encoded` as the group's policy in one transaction, only if the manifest is still
/// at `read_revision` (0: nothing published). Returns the new revision.
pub async fn write(
    client: &mut Client,
    keys: &Keys,
    endpoints: &str,
    encoded: &snapshot::Encoded,
    read_revision: i64,
    limits: &Limits,
) -> Result<i64, FleetError> {
    let manifest = serde_json::to_vec(&encoded.manifest).expect("the manifest is plain data");
    // Keys, framing and the manifest ride in the same request.
    let bytes = encoded.compressed.len() + manifest.len() + 512;
    if bytes > limits.max_request_bytes {
        return Err(FleetError::TooLarge {
            bytes,
            limit: limits.max_request_bytes,
        });
    }
    let guard = if read_revision == 0 {
        Compare::version(keys.manifest(), CompareOp::Equal, 0)
    } else {
        Compare::mod_revision(keys.manifest(), CompareOp::Equal, read_revision)
    };
    let txn = Txn::new().when([guard]).and_then([
        TxnOp::put(
            keys.snapshot(),
            encoded.compressed.clone(),
            None::<PutOptions>,
        ),
        TxnOp::put(keys.manifest(), manifest, None::<PutOptions>),
    ]);
    let response = client.txn(txn).await.map_err(|source| FleetError::Etcd {
        endpoints: endpoints.to_owned(),
        what: "writing the policy",
        source: Box::new(source),
    })?;
    let revision = response.header().map_or(0, |header| header.revision());
    if !response.succeeded() {
        return Err(FleetError::Raced {
            group: keys.group.clone(),
            read: read_revision,
            now: revision,
        });
    }
    Ok(revision)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::source::{config::Config, fetch::Fetched};

    fn build(prefixes: &str) -> Policy {
        let text = format!(
            "interfaces = [\"eth0\"]\n[[allow]]\nname = \"provider\"\nprefixes = [{prefixes}]\n[[deny]]\nname = \"abuser\"\nprefixes = [\"192.0.2.9\"]\n"
        );
        let config = Config::parse(Path::new("/etc/smtpguard/central.toml"), &text).unwrap();
        Policy::build(&config, &Fetched::default()).unwrap().0
    }

    #[test]
    fn diff_per_rule_and_the_removal_guard() {
        let old =
            build("\"192.0.2.0/24\", \"198.51.100.0/24\", \"203.0.113.0/24\", \"2001:db8::/32\"");
        let new = build("\"192.0.2.0/24\", \"198.51.100.0/25\"");
        let diff = Diff::between(Some(&old), &new);
        assert_eq!(
            diff.to_text(1),
            "  scope \"default\" allow rule \"provider\": +1 -3\n    + 198.51.100.0/25\n    - 198.51.100.0/24\n    - ... 2 more\n"
        );
        assert_eq!((diff.allow_removed, diff.allow_before), (3, 4));
        let limits = Limits {
            max_allow_removal: 0.5,
            force: false,
            max_request_bytes: 1 << 20,
        };
        let error = check_removal(&diff, &limits, "mx").unwrap_err().to_string();
        assert!(error.starts_with("this publish removes 3 of the 4 allow prefixes group \"mx\" has (75%), more than the 50%"), "{error}");
        assert!(
            check_removal(
                &diff,
                &Limits {
                    force: true,
                    ..limits
                },
                "mx"
            )
            .is_ok()
        );
        assert!(Diff::between(Some(&old), &old).is_empty());
        let first = Diff::between(None, &new);
        assert_eq!(first.rules.len(), 2);
        assert!(check_removal(&first, &limits, "mx").is_ok());
    }
}
