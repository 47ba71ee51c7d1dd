//! The counters of a running instance, joined with its policy, as text or JSON.

use std::fmt::Write as _;

use serde::Serialize;
use smtpguard_common::counter;

use crate::{
    instance::{CanaryCounts, CanaryState, InterfaceState, RunState},
    kernel::maps::CounterSnapshot,
    policy::List,
    source::fetch::SourceNote,
};

#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    pub instance: String,
    pub pid: u32,
    /// Whether a daemon runs the instance; if not, the filter was left in place.
    pub daemon_running: bool,
    /// The generation the state record describes (its prefixes and scopes).
    pub generation: u32,
    /// The generation the program reads now, where its maps are in sight. Ahead of
    /// `generation` for the seconds a large policy's record takes to write.
    pub generation_in_force: Option<u32>,
    pub config: String,
    pub interfaces: Vec<InterfaceState>,
    pub ports: Vec<u16>,
    pub mode: crate::source::config::Mode,
    pub action: crate::source::config::Action,
    pub syn_allowed: u64,
    pub syn_denied: u64,
    pub syn_unlisted: u64,
    pub dropped: u64,
    pub rejected: u64,
    pub would_block: u64,
    pub passed_unparsed: u64,
    pub hidden_decided_by_source: u64,
    pub passed_fragments: u64,
    /// Stopped SYNs left out of the table of stopped sources (a flood beyond the budget).
    pub unrecorded: u64,
    /// Frames dropped because they could not be read far enough to rule out a guarded SYN.
    pub opaque_dropped: u64,
    /// Stopped SYNs dropped where a reset could not rightly be sent.
    pub resets_withheld: u64,
    /// Guarded SYNs found inside a tunnel (or behind PPPoE or MPLS).
    pub tunnelled: u64,
    /// The boot policy is in force: every guarded SYN is dropped until the policy is built.
    pub boot: bool,
    /// Configured interfaces that do not exist (yet).
    pub waiting: Vec<String>,
    /// Names and list files whose last good answer stands in for a fresh one (stale, or held
    /// back by the growth guard).
    pub sources: Vec<SourceNote>,
    /// The scopes of the policy: only "default" for a policy without `[[scope]]`s.
    pub scopes: Vec<ScopeStats>,
    pub prefixes: Vec<PrefixStats>,
    /// The canary running (or the last one, ended), if any ran since the daemon started.
    pub canary: Option<CanaryStats>,
}

/// What the canary compares, and what it found so far.
#[derive(Clone, Debug, Serialize)]
pub struct CanaryStats {
    pub candidate: String,
    /// `running`, or how it ended.
    pub state: String,
    pub started_unix: u64,
    pub until_unix: Option<u64>,
    #[serde(flatten)]
    pub counts: CanaryCounts,
}

/// One scope's settings and the SYNs its prefixes decided.
#[derive(Clone, Debug, Serialize)]
pub struct ScopeStats {
    pub name: String,
    pub destinations: Vec<String>,
    pub guarded: bool,
    pub ports: Vec<u16>,
    pub mode: crate::source::config::Mode,
    pub action: crate::source::config::Action,
    /// SYNs its allow prefixes let in.
    pub syn_allowed: u64,
    /// SYNs its deny prefixes stopped (or would have, in audit mode).
    pub syn_denied: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PrefixStats {
    pub scope: String,
    pub list: List,
    pub rule: String,
    pub prefix: String,
    pub syns: u64,
}

impl Stats {
    /// Adds what `canary` compares and found, by `counters`.
    #[must_use]
    pub fn with_canary(mut self, canary: Option<&CanaryState>, counters: &CounterSnapshot) -> Self {
        self.canary = canary.map(|canary| CanaryStats {
            candidate: canary.config.display().to_string(),
            state: canary.ended.clone().unwrap_or_else(|| "running".to_owned()),
            started_unix: canary.started_unix,
            until_unix: canary.until_unix,
            counts: canary.counts(counters),
        });
        self
    }

    /// Adds the generation the program reads now.
    #[must_use]
    pub fn with_generation_in_force(mut self, generation: Option<u32>) -> Self {
        self.generation_in_force = generation;
        self
    }

    pub fn new(instance: &str, state: &RunState, counters: &CounterSnapshot) -> Self {
        let mut prefixes: Vec<PrefixStats> = state
            .prefixes
            .iter()
            .map(|prefix| PrefixStats {
                scope: prefix.scope.to_string(),
                list: prefix.list,
                rule: prefix.rule.to_string(),
                prefix: prefix.prefix.to_string(),
                syns: counters
                    .prefixes
                    .get(&prefix.counter_id)
                    .copied()
                    .unwrap_or(0),
            })
            .collect();
        prefixes.sort_by(|a, b| {
            (&a.scope, a.list, &a.rule, b.syns).cmp(&(&b.scope, b.list, &b.rule, a.syns))
        });
        let scopes = if state.scopes.is_empty() {
            // A state from before scopes: the top level is the only scope.
            vec![crate::instance::ScopeState {
                name: "default".into(),
                destinations: Vec::new(),
                guarded: true,
                ports: state.ports.clone(),
                mode: state.mode,
                action: state.action,
            }]
        } else {
            state.scopes.clone()
        };
        let scopes = scopes
            .into_iter()
            .map(|scope| {
                let syns = |list: List| {
                    prefixes
                        .iter()
                        .filter(|prefix| prefix.scope == scope.name && prefix.list == list)
                        .map(|prefix| prefix.syns)
                        .sum()
                };
                ScopeStats {
                    syn_allowed: syns(List::Allow),
                    syn_denied: syns(List::Deny),
                    destinations: scope.destinations.iter().map(ToString::to_string).collect(),
                    name: scope.name,
                    guarded: scope.guarded,
                    ports: scope.ports,
                    mode: scope.mode,
                    action: scope.action,
                }
            })
            .collect();
        Self {
            instance: instance.to_owned(),
            pid: state.pid,
            daemon_running: state.daemon_alive(),
            generation: state.generation,
            generation_in_force: None,
            config: state.config.display().to_string(),
            interfaces: state.interfaces.clone(),
            ports: state.ports.clone(),
            mode: state.mode,
            action: state.action,
            syn_allowed: counters.get(counter::SYN_ALLOWED),
            syn_denied: counters.get(counter::SYN_DENIED),
            syn_unlisted: counters.get(counter::SYN_UNLISTED),
            dropped: counters.get(counter::DROPPED),
            rejected: counters.get(counter::REJECTED),
            would_block: counters.get(counter::WOULD_BLOCK),
            passed_unparsed: counters.get(counter::PASSED_UNPARSED),
            hidden_decided_by_source: counters.get(counter::HIDDEN_DECIDED),
            passed_fragments: counters.get(counter::PASSED_FRAGMENTS),
            unrecorded: counters.get(counter::UNRECORDED),
            opaque_dropped: counters.get(counter::OPAQUE_DROPPED),
            resets_withheld: counters.get(counter::RESET_WITHHELD),
            tunnelled: counters.get(counter::TUNNELLED),
            boot: state.boot,
            waiting: state.waiting.clone(),
            sources: state.sources.clone(),
            scopes,
            prefixes,
            canary: None,
        }
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let interfaces: Vec<String> = self
            .interfaces
            .iter()
            .map(|interface| {
                let resets = if interface.resets_withheld {
                    ", resets withheld: the NIC strips VLAN tags"
                } else {
                    ""
                };
                format!(
                    "{} ({} mode, {}{resets})",
                    interface.name, interface.mode, interface.kind
                )
            })
            .collect();
        let ports: Vec<String> = self.ports.iter().map(ToString::to_string).collect();
        let daemon = if self.daemon_running {
            format!("pid {}", self.pid)
        } else {
            "no daemon running: the filter stays in force as it was left".to_owned()
        };
        let _ = writeln!(
            out,
            "instance {:?} ({daemon}), policy generation {}, config {}",
            self.instance, self.generation, self.config
        );
        if let Some(in_force) = self
            .generation_in_force
            .filter(|in_force| *in_force != self.generation)
        {
            let _ = writeln!(
                out,
                "RECORD PENDING: generation {in_force} is in force; its state record is still being written, and the scopes and prefixes below are generation {}'s",
                self.generation
            );
        }
        if !self.waiting.is_empty() {
            let _ = writeln!(
                out,
                "WAITING for interfaces that do not exist yet: {} (attached when they appear)",
                self.waiting.join(", ")
            );
        }
        if self.boot {
            let _ = writeln!(
                out,
                "BOOT: the policy is being built; every guarded SYN is dropped until it is in force"
            );
        }
        if let Some(canary) = self
            .canary
            .as_ref()
            .filter(|canary| canary.state == "running")
        {
            let until = canary.until_unix.map_or_else(String::new, |until| {
                format!(
                    " until {}",
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(until)
                    )
                )
            });
            let sample = match canary.counts.unrecorded {
                0 => String::new(),
                unrecorded => {
                    format!(" ({unrecorded} of those SYNs' sources are left out: a flood)")
                }
            };
            let _ = writeln!(
                out,
                "CANARY of {}{until}: {} SYNs would be newly blocked, {} newly allowed (no verdict changed); `smtpguard report --canary` lists the sources{sample}",
                canary.candidate, canary.counts.newly_blocked, canary.counts.newly_allowed
            );
        }
        let _ = writeln!(
            out,
            "attached to {}; guarding TCP port {}; {} mode, unlisted sources: {}",
            interfaces.join(", "),
            ports.join(", "),
            self.mode,
            self.action
        );
        let _ = writeln!(
            out,
            "guarded SYNs: allowed {}, denied {}, unlisted {}; dropped {}, rejected {}, would block (audit) {}",
            self.syn_allowed,
            self.syn_denied,
            self.syn_unlisted,
            self.dropped,
            self.rejected,
            self.would_block
        );
        let _ = writeln!(
            out,
            "passed unparsed {}, hidden decided by source {}, later fragments passed {}; stopped SYNs not in the source table (flood sampling) {}",
            self.passed_unparsed,
            self.hidden_decided_by_source,
            self.passed_fragments,
            self.unrecorded
        );
        let _ = writeln!(
            out,
            "opaque frames dropped {}, resets withheld {}, tunnelled SYNs decided by inner source {}",
            self.opaque_dropped, self.resets_withheld, self.tunnelled
        );
        for note in &self.sources {
            let _ = writeln!(out, "{}: {}: {}", note.status, note.source, note.detail);
        }
        if self.scopes.len() > 1 {
            let _ = writeln!(out);
            for scope in &self.scopes {
                let to = if scope.destinations.is_empty() {
                    "every other destination".to_owned()
                } else {
                    scope.destinations.join(", ")
                };
                if !scope.guarded {
                    let _ = writeln!(out, "scope {:?} ({to}): not guarded", scope.name);
                    continue;
                }
                let ports: Vec<String> = scope.ports.iter().map(ToString::to_string).collect();
                let _ = writeln!(
                    out,
                    "scope {:?} ({to}): port {}, {} mode, unlisted sources: {}; allowed {}, denied {}",
                    scope.name,
                    ports.join(", "),
                    scope.mode,
                    scope.action,
                    scope.syn_allowed,
                    scope.syn_denied
                );
            }
        }
        let scoped = self.scopes.len() > 1;
        let scope_width = if scoped {
            self.prefixes
                .iter()
                .map(|prefix| prefix.scope.len())
                .max()
                .unwrap_or(5)
                .max(5)
                + 2
        } else {
            0
        };
        let scope_cell = |scope: &str| {
            if scoped {
                format!("{scope:<width$}", width = scope_width)
            } else {
                String::new()
            }
        };
        let rule_width = self
            .prefixes
            .iter()
            .map(|prefix| prefix.rule.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let prefix_width = self
            .prefixes
            .iter()
            .map(|prefix| prefix.prefix.len())
            .max()
            .unwrap_or(6)
            .max(6);
        let _ = writeln!(
            out,
            "\n{}{:<5}  {:<rule_width$}  {:<prefix_width$}  {:>10}",
            scope_cell("SCOPE"),
            "LIST",
            "RULE",
            "PREFIX",
            "SYNS"
        );
        for prefix in &self.prefixes {
            let _ = writeln!(
                out,
                "{}{:<5}  {:<rule_width$}  {:<prefix_width$}  {:>10}",
                scope_cell(&prefix.scope),
                prefix.list.as_str(),
                prefix.rule,
                prefix.prefix,
                prefix.syns
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::{
        instance::{InterfaceState, PrefixState},
        kernel::filter::AttachedMode,
    };

    #[test]
    fn text_and_json_show_counters_by_prefix() {
        let state = RunState {
            pid: 42,
            on_exit: crate::source::config::OnExit::Keep,
            version: "0.1.0".into(),
            config: "/etc/smtpguard/smtpguard.toml".into(),
            generation: 3,
            applied_at_unix: 0,
            interfaces: vec![InterfaceState {
                name: "eth0".into(),
                mode: AttachedMode::Native,
                kind: crate::kernel::interface::LinkKind::Ethernet,
                resets_withheld: false,
            }],
            ports: vec![25],
            prefixes: vec![
                PrefixState {
                    counter_id: 1,
                    list: List::Allow,
                    rule: "provider".into(),
                    prefix: "89.16.184.144/28".parse().unwrap(),
                    scope_id: 0,
                    scope: "default".into(),
                    decided_by: None,
                },
                PrefixState {
                    counter_id: 2,
                    list: List::Deny,
                    rule: "abuser".into(),
                    prefix: "89.16.184.150/32".parse().unwrap(),
                    scope_id: 0,
                    scope: "default".into(),
                    decided_by: None,
                },
            ],
            counter_map_ids: Default::default(),
            scopes: Vec::new(),
            mode: crate::source::config::Mode::Enforce,
            action: crate::source::config::Action::Drop,
            boot: false,
            waiting: Vec::new(),
            layout: 1,
            sources: vec![SourceNote {
                source: "host relay.provider.test".into(),
                status: crate::source::fetch::SourceStatus::Stale,
                detail: "cannot refresh host relay.provider.test: timed out".into(),
            }],
        };
        let mut counters = CounterSnapshot::default();
        counters.global[counter::SYN_ALLOWED as usize] = 7;
        counters.global[counter::SYN_UNLISTED as usize] = 3;
        counters.global[counter::DROPPED as usize] = 3;
        counters.prefixes = HashMap::from([(1, 7), (2, 0)]);
        let stats = Stats::new("default", &state, &counters);
        let text = stats.to_text();
        assert!(
            text.contains("attached to eth0 (native mode, Ethernet); guarding TCP port 25; enforce mode, unlisted sources: drop"),
            "{text}"
        );
        assert!(
            text.contains("guarded SYNs: allowed 7, denied 0, unlisted 3; dropped 3, rejected 0, would block (audit) 0"),
            "{text}"
        );
        assert!(
            text.contains("allow  provider  89.16.184.144/28           7"),
            "{text}"
        );
        assert!(
            text.contains("stale: host relay.provider.test: cannot refresh"),
            "{text}"
        );
        let json: serde_json::Value = serde_json::to_value(&stats).unwrap();
        assert_eq!(json["syn_allowed"], 7);
        assert_eq!(json["prefixes"][0]["prefix"], "89.16.184.144/28");
        assert_eq!(json["prefixes"][0]["syns"], 7);
        assert_eq!(json["prefixes"][1]["list"], "deny");
        assert_eq!(json["sources"][0]["status"], "stale");
        assert!(!text.contains("RECORD PENDING"), "{text}");
        let text = stats.with_generation_in_force(Some(4)).to_text();
        assert!(
            text.contains("RECORD PENDING: generation 4 is in force; its state record is still being written, and the scopes and prefixes below are generation 3's"),
            "{text}"
        );
    }
}
