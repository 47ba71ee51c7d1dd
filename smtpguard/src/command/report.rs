//! `smtpguard report`: the sources the filter stopped, or in audit mode would have stopped,
//! most frequent first, with first and last sighting and the rule that decided. This is what
//! an admin reads before switching from audit to enforce: every legitimate sender still
//! connecting directly shows up here.

use std::{
    fmt::Write as _,
    net::IpAddr,
    time::{Duration, SystemTime},
};

use serde::Serialize;
use smtpguard_common::Offender;

use crate::{instance::RunState, policy::List, source::config::Mode};

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub instance: String,
    /// The mode in force now; each row says in which mode its counts were gathered.
    pub mode: Mode,
    /// Sources the table holds (it keeps the most recent ones, up to its size).
    pub sources: usize,
    pub rows: Vec<Row>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub source: IpAddr,
    /// SYNs dropped or rejected while enforcing.
    pub blocked: u64,
    /// SYNs passed while auditing that enforce mode would stop.
    pub would_block: u64,
    #[serde(serialize_with = "rfc3339")]
    pub first_seen: SystemTime,
    #[serde(serialize_with = "rfc3339")]
    pub last_seen: SystemTime,
    /// The scope of the last SYN stopped from this source.
    pub scope: String,
    /// What the policy in force says about the source now, in that scope: `unlisted`, or the
    /// deny rule.
    pub decided_by: String,
}

pub(crate) fn rfc3339<S: serde::Serializer>(
    time: &SystemTime,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&humantime::format_rfc3339_seconds(*time))
}

impl Report {
    /// The `top` most frequent sources of `offenders` (all of them if `top` is 0).
    pub fn new(
        instance: &str,
        state: &RunState,
        offenders: &[(IpAddr, Offender)],
        top: usize,
    ) -> Self {
        let clock = BootClock::now();
        let mut rows: Vec<Row> = offenders
            .iter()
            .map(|(source, seen)| Row {
                source: *source,
                blocked: seen.blocked,
                would_block: seen.would_block,
                first_seen: clock.wall(seen.first_seen_ns),
                last_seen: clock.wall(seen.last_seen_ns),
                scope: state
                    .scopes
                    .get(seen.scope as usize)
                    .map_or_else(|| "default".to_owned(), |scope| scope.name.clone()),
                decided_by: decided_by(state, seen.scope, *source),
            })
            .collect();
        rows.sort_by(|a, b| {
            (b.blocked + b.would_block, b.last_seen, a.source).cmp(&(
                a.blocked + a.would_block,
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
            // Audit only where no guarded scope enforces: the top level may audit beside a
            // scope that blocks.
            mode: match state
                .scopes
                .iter()
                .filter(|scope| scope.guarded)
                .any(|scope| scope.mode == Mode::Enforce)
            {
                true => Mode::Enforce,
                false if state.scopes.is_empty() => state.mode,
                false => Mode::Audit,
            },
            sources,
            rows,
        }
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let what = match self.mode {
            Mode::Audit => {
                "audit mode: nothing is blocked; WOULD BLOCK counts what enforce mode would stop"
            }
            Mode::Enforce => "enforce mode",
        };
        let _ = writeln!(
            out,
            "instance {:?}, {what}; {} sources in the table{}",
            self.instance,
            self.sources,
            if self.rows.len() < self.sources {
                format!(", top {} shown", self.rows.len())
            } else {
                String::new()
            }
        );
        if self.rows.is_empty() {
            return out;
        }
        let width = self
            .rows
            .iter()
            .map(|row| row.source.to_string().len())
            .max()
            .unwrap_or(6)
            .max(6);
        // The scope column appears only where the policy has scopes.
        let scoped = self.rows.iter().any(|row| row.scope != "default");
        let scope_width = if scoped {
            self.rows
                .iter()
                .map(|row| row.scope.len())
                .max()
                .unwrap_or(5)
                .max(5)
        } else {
            0
        };
        let scope_cell = |scope: &str| {
            if scoped {
                format!("{scope:<scope_width$}  ")
            } else {
                String::new()
            }
        };
        let _ = writeln!(
            out,
            "{:<width$}  {:>8}  {:>11}  {:<20}  {:<20}  {}DECIDED BY",
            "SOURCE",
            "BLOCKED",
            "WOULD BLOCK",
            "FIRST SEEN",
            "LAST SEEN",
            scope_cell("SCOPE")
        );
        for row in &self.rows {
            let _ = writeln!(
                out,
                "{:<width$}  {:>8}  {:>11}  {:<20}  {:<20}  {}{}",
                row.source.to_string(),
                row.blocked,
                row.would_block,
                humantime::format_rfc3339_seconds(row.first_seen).to_string(),
                humantime::format_rfc3339_seconds(row.last_seen).to_string(),
                scope_cell(&row.scope),
                row.decided_by
            );
        }
        out
    }
}

/// The prefix of scope `scope` of the policy in force that decides for `source`: the most
/// specific that holds it, or the allow prefix that outranks that one (a feed's).
pub(crate) fn decided_by(state: &RunState, scope: u32, source: IpAddr) -> String {
    let in_scope = || {
        state
            .prefixes
            .iter()
            .filter(move |prefix| prefix.scope_id == scope)
    };
    let best = in_scope()
        .filter(|prefix| prefix.prefix.contains(&source))
        .max_by_key(|prefix| prefix.prefix.prefix_len());
    let best = match best.and_then(|prefix| prefix.decided_by) {
        Some(decider) => in_scope().find(|prefix| prefix.prefix == decider).or(best),
        None => best,
    };
    match best {
        Some(prefix) if prefix.list == List::Deny => {
            format!("deny rule {:?} ({})", prefix.rule, prefix.prefix)
        }
        Some(prefix) => format!("now allowed by rule {:?} ({})", prefix.rule, prefix.prefix),
        None => "unlisted".to_owned(),
    }
}

/// Converts the program's `bpf_ktime_get_boot_ns` stamps into wall-clock time.
pub(crate) struct BootClock {
    wall: SystemTime,
    boot: Duration,
}

impl BootClock {
    pub(crate) fn now() -> Self {
        let mut spec = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `spec` is a valid timespec for the call to fill in.
        unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut spec) };
        Self {
            wall: SystemTime::now(),
            boot: Duration::new(spec.tv_sec as u64, spec.tv_nsec as u32),
        }
    }

    pub(crate) fn wall(&self, boot_ns: u64) -> SystemTime {
        self.wall - self.boot.saturating_sub(Duration::from_nanos(boot_ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{instance::PrefixState, source::config::Action};

    #[test]
    fn most_frequent_first_with_the_rule_that_decides() {
        let state = RunState {
            pid: 1,
            on_exit: crate::source::config::OnExit::Keep,
            version: "0".into(),
            config: "/etc/smtpguard/smtpguard.toml".into(),
            generation: 1,
            applied_at_unix: 0,
            interfaces: vec![],
            ports: vec![25],
            mode: Mode::Audit,
            action: Action::Drop,
            prefixes: vec![PrefixState {
                counter_id: 1,
                list: List::Deny,
                rule: "abuser".into(),
                prefix: "192.0.2.0/24".parse().unwrap(),
                scope_id: 0,
                scope: "default".into(),
                decided_by: None,
            }],
            counter_map_ids: Default::default(),
            scopes: Vec::new(),
            boot: false,
            waiting: Vec::new(),
            layout: 1,
            sources: Vec::new(),
        };
        let boot = BootClock::now().boot.as_nanos() as u64;
        let seen = |would_block, ago_s: u64| Offender {
            addr: [0; 16],
            blocked: 0,
            would_block,
            first_seen_ns: boot - ago_s * 1_000_000_000,
            last_seen_ns: boot - ago_s * 1_000_000_000,
            scope: 0,
            _pad: 0,
        };
        let offenders = vec![
            ("203.0.113.5".parse().unwrap(), seen(2, 60)),
            ("192.0.2.9".parse().unwrap(), seen(9, 10)),
            ("2001:db8::1".parse().unwrap(), seen(1, 5)),
        ];
        let report = Report::new("default", &state, &offenders, 2);
        assert_eq!(report.sources, 3);
        let got: Vec<(String, u64, &str)> = report
            .rows
            .iter()
            .map(|row| {
                (
                    row.source.to_string(),
                    row.would_block,
                    row.decided_by.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    "192.0.2.9".to_owned(),
                    9,
                    "deny rule \"abuser\" (192.0.2.0/24)"
                ),
                ("203.0.113.5".to_owned(), 2, "unlisted"),
            ]
        );
        // A feed's prefix inside an allow prefix is outranked: the allow prefix decides.
        let mut ranked = state.clone();
        let prefix = |list, rule: &str, net: &str, decided_by: Option<&str>| PrefixState {
            counter_id: 7,
            list,
            rule: rule.into(),
            prefix: net.parse().unwrap(),
            scope_id: 0,
            scope: "default".into(),
            decided_by: decided_by.map(|net| net.parse().unwrap()),
        };
        ranked.prefixes.extend([
            prefix(List::Allow, "provider", "198.51.100.0/24", None),
            prefix(
                List::Deny,
                "drop",
                "198.51.100.8/29",
                Some("198.51.100.0/24"),
            ),
        ]);
        assert_eq!(
            decided_by(&ranked, 0, "198.51.100.9".parse().unwrap()),
            "now allowed by rule \"provider\" (198.51.100.0/24)"
        );
        let age = SystemTime::now()
            .duration_since(report.rows[1].last_seen)
            .unwrap();
        assert!((59..=62).contains(&age.as_secs()), "{age:?}");
        let text = report.to_text();
        assert!(text.contains("audit mode"), "{text}");
        assert!(
            text.contains("3 sources in the table, top 2 shown"),
            "{text}"
        );
    }
}
