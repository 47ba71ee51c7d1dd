//! `smtpguard top`: a live view of a running instance, refreshed like `top(1)`: guarded SYNs
//! per second by class, the busiest rules, and the busiest stopped sources (the kernel's table
//! of stopped sources that `report` reads). `q` quits. When standard output is not a
//! terminal it prints one view, over one interval, and exits.
//!
//! The figures are differences between two readings of the same counters `stats` reads;
//! [`render`] is a pure function of two [`Sample`]s, the terminal handling is [`run`]'s.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    io::{IsTerminal as _, Write as _},
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use smtpguard_common::{Offender, counter};

use crate::{
    instance::{Instance, InstanceError, RunState},
    kernel::maps::{ApplyError, CounterMaps, CounterSnapshot, MapsError, open_counters},
    policy::List,
};

#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("reading the counters: {0}")]
    Read(#[from] ApplyError),
    #[error("the terminal: {0}")]
    Terminal(#[source] std::io::Error),
}

/// One reading of the counters and the table of stopped sources.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Instant,
    pub counters: CounterSnapshot,
    pub offenders: Vec<(IpAddr, Offender)>,
}

/// The classes of guarded SYNs, as `stats` names them, with their counter.
const CLASSES: [(&str, u32); 6] = [
    ("allowed", counter::SYN_ALLOWED),
    ("denied", counter::SYN_DENIED),
    ("unlisted", counter::SYN_UNLISTED),
    ("dropped", counter::DROPPED),
    ("rejected", counter::REJECTED),
    ("would block", counter::WOULD_BLOCK),
];

/// The view of `instance` between `before` and `now`, at most `top` rules and sources, cut to
/// `width` columns.
pub fn render(
    instance: &str,
    state: &RunState,
    before: &Sample,
    now: &Sample,
    top: usize,
    width: usize,
) -> Vec<String> {
    let seconds = now.at.saturating_duration_since(before.at).as_secs_f64();
    let rate = |delta: u64| {
        if seconds > 0.0 {
            format!("{:.1}", delta as f64 / seconds)
        } else {
            "-".to_owned()
        }
    };
    let mut lines = Vec::new();
    let daemon = if state.daemon_alive() {
        format!("pid {}", state.pid)
    } else {
        "no daemon: the filter stays as it was left".to_owned()
    };
    lines.push(format!(
        "smtpguard top: instance {instance:?} ({daemon}), generation {}, {} mode, unlisted sources: {}   {}",
        state.generation,
        state.mode,
        state.action,
        humantime::format_rfc3339_seconds(SystemTime::now())
    ));
    lines.push(String::new());
    lines.push(format!(
        "{:<24} {:>10} {:>14}",
        "GUARDED SYNS", "PER SECOND", "TOTAL"
    ));
    for (class, index) in CLASSES {
        let total = now.counters.get(index);
        let delta = total.saturating_sub(before.counters.get(index));
        lines.push(format!("{class:<24} {:>10} {total:>14}", rate(delta)));
    }

    lines.push(String::new());
    let rules = busiest_rules(state, before, now);
    let rule_width = rules
        .iter()
        .map(|(_, rule, ..)| rule.len())
        .max()
        .unwrap_or(0)
        .clamp(13, 40);
    lines.push(format!(
        "{:<rule_width$}  {:<5} {:>10} {:>14}",
        "BUSIEST RULES", "LIST", "SYN/S", "TOTAL"
    ));
    for (list, rule, delta, total) in rules.into_iter().take(top) {
        lines.push(format!(
            "{rule:<rule_width$}  {:<5} {:>10} {total:>14}",
            list.as_str(),
            rate(delta)
        ));
    }

    lines.push(String::new());
    let sources = busiest_sources(before, now);
    lines.push(format!(
        "{:<39} {:>10} {:>10} {:>12}  DECIDED BY",
        "BUSIEST STOPPED SOURCES", "SYN/S", "BLOCKED", "WOULD BLOCK"
    ));
    for (source, delta, seen) in sources.into_iter().take(top) {
        lines.push(format!(
            "{:<39} {:>10} {:>10} {:>12}  {}",
            source.to_string(),
            rate(delta),
            seen.blocked,
            seen.would_block,
            crate::command::report::decided_by(state, seen.scope, source)
        ));
    }
    lines.push(String::new());
    lines
        .into_iter()
        .map(|line| line.chars().take(width).collect())
        .collect()
}

/// Rules by SYNs between the samples, then by total: `(list, rule, delta, total)`.
fn busiest_rules<'a>(
    state: &'a RunState,
    before: &Sample,
    now: &Sample,
) -> Vec<(List, &'a str, u64, u64)> {
    let mut rules: BTreeMap<(List, &str), (u64, u64)> = BTreeMap::new();
    for prefix in &state.prefixes {
        let total = now.counters.prefixes.get(&prefix.counter_id).copied();
        let earlier = before.counters.prefixes.get(&prefix.counter_id).copied();
        let entry = rules.entry((prefix.list, &prefix.rule)).or_default();
        let total = total.unwrap_or(0);
        entry.0 += total.saturating_sub(earlier.unwrap_or(0));
        entry.1 += total;
    }
    let mut rules: Vec<(List, &str, u64, u64)> = rules
        .into_iter()
        .map(|((list, rule), (delta, total))| (list, rule, delta, total))
        .collect();
    rules.sort_by(|a, b| (b.2, b.3, a.0, a.1).cmp(&(a.2, a.3, b.0, b.1)));
    rules
}

/// Stopped sources by SYNs between the samples, then by total: `(source, delta, counts)`. A
/// slot that changed hands between the samples counts from zero.
fn busiest_sources(before: &Sample, now: &Sample) -> Vec<(IpAddr, u64, Offender)> {
    let earlier: HashMap<IpAddr, &Offender> = before
        .offenders
        .iter()
        .map(|(source, seen)| (*source, seen))
        .collect();
    let mut sources: Vec<(IpAddr, u64, Offender)> = now
        .offenders
        .iter()
        .map(|(source, seen)| {
            let total = seen.blocked + seen.would_block;
            let delta = match earlier.get(source) {
                Some(old) if old.first_seen_ns == seen.first_seen_ns => {
                    total.saturating_sub(old.blocked + old.would_block)
                }
                _ => total,
            };
            (*source, delta, *seen)
        })
        .collect();
    sources.sort_by(|a, b| {
        let total = |row: &(IpAddr, u64, Offender)| row.2.blocked + row.2.would_block;
        (b.1, total(b), a.0).cmp(&(a.1, total(a), b.0))
    });
    sources
}

/// The running instance's state and counter maps, read again when the state changes.
struct Reader {
    instance: Instance,
    state: RunState,
    state_stamp: Option<SystemTime>,
    maps: CounterMaps,
}

impl Reader {
    fn open(instance: &Instance) -> Result<Self, TopError> {
        let state = instance.read_state()?;
        let maps = open_counters(&instance.maps_dir_of(&state), state.counter_map_ids)?;
        Ok(Self {
            instance: instance.clone(),
            state_stamp: modified(&instance.state_path()),
            state,
            maps,
        })
    }

    /// Reads the state again if the daemon wrote a new one (a reload, a restart).
    fn follow(&mut self) -> Result<(), TopError> {
        let stamp = modified(&self.instance.state_path());
        if stamp == self.state_stamp {
            return Ok(());
        }
        let state = self.instance.read_state()?;
        if state.counter_map_ids != self.state.counter_map_ids {
            self.maps = open_counters(&self.instance.maps_dir_of(&state), state.counter_map_ids)?;
        }
        self.state = state;
        self.state_stamp = stamp;
        Ok(())
    }

    fn sample(&mut self) -> Result<Sample, TopError> {
        self.follow()?;
        Ok(Sample {
            at: Instant::now(),
            counters: self.maps.read()?,
            offenders: self.maps.offenders()?,
        })
    }
}

fn modified(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path)
        .and_then(|meta| meta.modified())
        .ok()
}

/// Shows the view of `instance`, refreshed every `interval`, until `q`; one view when
/// standard output is not a terminal.
pub fn run(instance: &Instance, interval: Duration, top: usize) -> Result<(), TopError> {
    let mut reader = Reader::open(instance)?;
    let mut before = reader.sample()?;
    let stdout = std::io::stdout();
    if !stdout.is_terminal() {
        std::thread::sleep(interval);
        let now = reader.sample()?;
        let text: String = render(instance.name(), &reader.state, &before, &now, top, 200)
            .into_iter()
            .map(|line| line + "\n")
            .collect();
        let mut out = stdout.lock();
        return out
            .write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .map_err(TopError::Terminal);
    }
    let _screen = Screen::enter()?;
    // The first view has totals, and rates once a second reading is in.
    let mut now = before.clone();
    loop {
        draw(&render(
            instance.name(),
            &reader.state,
            &before,
            &now,
            top,
            columns(),
        ))?;
        if quit_within(interval)? {
            return Ok(());
        }
        before = now;
        now = reader.sample()?;
    }
}

fn columns() -> usize {
    crossterm::terminal::size().map_or(100, |(columns, _)| usize::from(columns))
}

/// Draws `lines` from the top left, as many as the screen has rows.
fn draw(lines: &[String]) -> Result<(), TopError> {
    use crossterm::{cursor::MoveTo, queue, terminal::Clear, terminal::ClearType};

    let rows = crossterm::terminal::size().map_or(24, |(_, rows)| usize::from(rows));
    let mut out = std::io::stdout().lock();
    let mut text = String::new();
    for line in lines.iter().take(rows.saturating_sub(1)) {
        let _ = write!(text, "{line}\r\n");
    }
    text.push_str("q quits");
    queue!(out, MoveTo(0, 0), Clear(ClearType::All))
        .and_then(|()| out.write_all(text.as_bytes()))
        .and_then(|()| out.flush())
        .map_err(TopError::Terminal)
}

/// Waits `interval` for a key: true for `q`, Escape or Ctrl-C.
fn quit_within(interval: Duration) -> Result<bool, TopError> {
    use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};

    let deadline = Instant::now() + interval;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !event::poll(left).map_err(TopError::Terminal)? {
            return Ok(false);
        }
        match event::read().map_err(TopError::Terminal)? {
            Event::Key(key) if key.kind != KeyEventKind::Release => match key.code {
                KeyCode::Char('q' | 'Q') | KeyCode::Esc => return Ok(true),
                KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                    return Ok(true);
                }
                _ => {}
            },
            // A resized terminal is redrawn at the next reading.
            _ => {}
        }
    }
}

/// Raw mode on the alternate screen with the cursor hidden, as long as it lives: the terminal
/// is given back as it was however `run` ends.
struct Screen;

impl Screen {
    fn enter() -> Result<Self, TopError> {
        use crossterm::{cursor::Hide, execute, terminal::EnterAlternateScreen};

        crossterm::terminal::enable_raw_mode().map_err(TopError::Terminal)?;
        let screen = Self;
        execute!(std::io::stdout(), EnterAlternateScreen, Hide).map_err(TopError::Terminal)?;
        Ok(screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        use crossterm::{cursor::Show, execute, terminal::LeaveAlternateScreen};

        let _ = execute!(std::io::stdout(), Show, LeaveAlternateScreen);
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{instance::PrefixState, source::config::Mode};

    fn state() -> RunState {
        let prefix = |counter_id, list, rule: &str, prefix: &str| PrefixState {
            counter_id,
            list,
            rule: rule.into(),
            prefix: prefix.parse().unwrap(),
            scope_id: 0,
            scope: "default".into(),
            decided_by: None,
        };
        RunState {
            pid: 0,
            on_exit: crate::source::config::OnExit::Keep,
            version: "0".into(),
            config: "/etc/smtpguard/smtpguard.toml".into(),
            generation: 4,
            applied_at_unix: 0,
            interfaces: vec![],
            ports: vec![25],
            mode: Mode::Enforce,
            action: crate::source::config::Action::Reject,
            prefixes: vec![
                prefix(1, List::Allow, "provider", "192.0.2.0/28"),
                prefix(2, List::Allow, "provider", "2001:db8:200::/64"),
                prefix(3, List::Allow, "copier", "198.51.100.50/32"),
                prefix(4, List::Deny, "abuser", "192.0.2.9/32"),
            ],
            counter_map_ids: Default::default(),
            boot: false,
            waiting: Vec::new(),
            scopes: Vec::new(),
            layout: 1,
            sources: Vec::new(),
        }
    }

    fn sample(
        at: Instant,
        classes: [u64; 6],
        prefixes: &[(u32, u64)],
        sources: &[(&str, u64, u64)],
    ) -> Sample {
        let mut counters = CounterSnapshot::default();
        for ((_, index), value) in CLASSES.iter().zip(classes) {
            counters.global[*index as usize] = value;
        }
        counters.prefixes = prefixes.iter().copied().collect();
        Sample {
            at,
            counters,
            offenders: sources
                .iter()
                .map(|(source, blocked, first)| {
                    (
                        source.parse().unwrap(),
                        Offender {
                            addr: [0; 16],
                            blocked: *blocked,
                            would_block: 0,
                            first_seen_ns: *first,
                            last_seen_ns: *first,
                            scope: 0,
                            _pad: 0,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn rates_by_class_rule_and_source_over_the_interval() {
        let start = Instant::now();
        let before = sample(
            start,
            [10, 0, 5, 0, 5, 0],
            &[(1, 6), (3, 4)],
            &[("203.0.113.7", 5, 1), ("203.0.113.8", 9, 1)],
        );
        let now = sample(
            start + Duration::from_secs(2),
            [30, 2, 45, 2, 45, 0],
            &[(1, 20), (2, 6), (3, 4), (4, 2)],
            &[
                ("203.0.113.7", 45, 1),
                ("203.0.113.8", 3, 2),
                ("192.0.2.9", 2, 3),
            ],
        );
        let lines = render("default", &state(), &before, &now, 10, 200);
        let text = lines.join("\n");
        for expected in [
            "allowed                        10.0             30",
            "unlisted                       20.0             45",
            "rejected                       20.0             45",
            "would block                     0.0              0",
            "provider       allow       10.0             26",
            "abuser         deny         1.0              2",
            "copier         allow        0.0              4",
            "203.0.113.7                                   20.0         45            0  unlisted",
            // A slot that changed hands (first seen moved) counts from zero.
            "203.0.113.8                                    1.5          3            0  unlisted",
            "192.0.2.9                                      1.0          2            0  deny rule \"abuser\" (192.0.2.9/32)",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        let order: Vec<usize> = ["provider ", "abuser ", "copier "]
            .iter()
            .map(|rule| {
                lines
                    .iter()
                    .position(|line| line.starts_with(rule))
                    .unwrap()
            })
            .collect();
        assert!(order.windows(2).all(|pair| pair[0] < pair[1]), "{text}");
        assert!(
            lines[0].starts_with("smtpguard top: instance \"default\""),
            "{}",
            lines[0]
        );

        // The first view, before a second reading: totals, no rates.
        let first = render("default", &state(), &now, &now, 1, 60).join("\n");
        assert!(
            first.contains("allowed                           -"),
            "{first}"
        );
        assert!(first.lines().all(|line| line.chars().count() <= 60));
        assert_eq!(
            first
                .lines()
                .filter(|line| line.starts_with("203.0.113"))
                .count(),
            1,
            "top 1"
        );
    }
}
