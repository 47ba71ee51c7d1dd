//! The policy: per scope, validated and normalised prefixes with the list and rule they
//! belong to, the guarded ports, mode and action. Built from a [`Config`] and what was fetched
//! for it; conflicts are refused here, before anything reaches the kernel.
//!
//! A SYN is decided by the most specific scope whose destinations contain its destination
//! (the default scope, the file's top level, for the rest), then by the longest source prefix
//! within that scope. A deny prefix ranks as its rule says ([`Precedence`]): `specific` ones
//! decide where they are the longest match; `allow` ones (the default for list files, host
//! names, SPF and URLs) never override an allow match, at any length. That ranking is settled
//! here: a deny prefix an allow match outranks carries the verdict of the entry that outranks
//! it, so the kernel keeps one longest-prefix lookup.
//!
//! Allow prefixes from automatic sources (list files, URLs, host names, SPF records) shorter than
//! the `[safety]` floor are left out and recorded in [`Policy::refused`]; literal prefixes are
//! the admin's own words and keep their meaning, but `0.0.0.0/0` or `::/0` on an allow rule
//! needs `allow_any_source = true`. Deny prefixes are never floored: a deny entry only matters
//! inside an allow range, and unlisted sources are stopped anyway.

use std::{
    collections::{BTreeMap, BTreeSet, btree_map},
    net::IpAddr,
    path::Path,
    sync::Arc,
};

use ipnet::IpNet;

use crate::source::{
    config::{
        Action, Config, ConfigError, Conflict, Location, Mode, Precedence, RuleSpec, Safety,
        Warning,
    },
    fetch::{Fetched, Name, Origin, normalise},
    prefix,
    safety::{self, Reason, Refusal},
};

pub use crate::source::config::List;

pub mod merge;

/// What the policy says about one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub list: List,
    /// Shared by every entry of the rule: a list of a million prefixes holds one copy.
    pub rule: Arc<str>,
    /// What a deny entry does to the SYNs it matches; `None` on the allow list.
    pub action: Option<Action>,
    /// How a deny entry ranks against the allow list (allow entries: `Specific`).
    pub precedence: Precedence,
    /// For a deny entry of `allow` precedence inside an allow prefix (or inside a `specific`
    /// deny one): that prefix, which decides the SYNs this one matches.
    pub decided_by: Option<IpNet>,
    /// Where the prefix came from: the configuration, a file, a host name, an SPF record.
    pub origin: Origin,
    /// The line that put it in the policy: of the configuration, or of the list file.
    pub at: Location,
}

/// A deny prefix of `allow` precedence identical to an allow prefix: not written (the allow
/// entry stands), shown by `check` and `explain`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outranked {
    pub net: IpNet,
    pub entry: Entry,
}

/// The rules for SYNs to some destinations: the default scope (the file's top level), or a
/// `[[scope]]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    pub name: String,
    /// The destinations this scope decides for; empty for the default scope.
    pub destinations: Vec<IpNet>,
    /// Whether SYNs in this scope are decided at all: the default scope is not when the file
    /// has `[[scope]]`s and no top-level rules.
    pub guarded: bool,
    pub ports: BTreeSet<u16>,
    pub mode: Mode,
    /// What happens to SYNs from sources no prefix matches.
    pub unlisted_action: Action,
    pub entries: BTreeMap<IpNet, Entry>,
    pub outranked: Vec<Outranked>,
}

/// A validated policy, ready to be written to the maps. Scope ids are indices: 0 is the
/// default scope.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub scopes: Vec<Scope>,
    /// Allow prefixes from automatic sources left out, and why (each also a warning).
    pub refused: Vec<Refusal>,
}

/// The decision for one SYN, as the XDP program takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// The port is not guarded, or the destination's scope decides nothing.
    NotGuarded,
    /// The deciding prefix is on the allow list.
    Allowed(IpNet, &'a Entry),
    /// The deciding prefix is on the deny list.
    Denied(IpNet, &'a Entry),
    /// No prefix matches.
    Unlisted,
}

impl Policy {
    /// Builds the policy from `config` and what was fetched for it (list files, DNS
    /// answers), refusing conflicts and bad prefixes.
    pub fn build(config: &Config, fetched: &Fetched) -> Result<(Self, Vec<Warning>), ConfigError> {
        let mut building = Building {
            safety: &config.safety,
            path: config.path.clone(),
            entries: BTreeMap::new(),
            outranked: Vec::new(),
            warnings: Vec::new(),
            refused: Vec::new(),
        };
        let default = building.scope(
            ScopeRules {
                name: "default",
                destinations: &[],
                guarded: config.has_default_rules(),
                ports: &config.ports,
                mode: config.mode,
                action: config.action,
                allow: &config.allow,
                deny: &config.deny,
            },
            fetched,
        )?;
        if default.guarded && !config.allow_none && count(&default, List::Allow) == 0 {
            return Err(ConfigError::NoAllow {
                path: config.path.clone(),
            });
        }
        let mut scopes = vec![default];
        let mut destinations: BTreeMap<IpNet, (String, Location)> = BTreeMap::new();
        // Destinations so far, IPv4 and IPv6: the program holds so many of each.
        let mut per_family = [0usize; 2];
        for spec in &config.scopes {
            let mut nets = Vec::new();
            for (text, at) in &spec.destinations {
                let parsed = prefix::parse(text).map_err(|reason| ConfigError::BadPrefix {
                    at: at.clone(),
                    value: text.clone(),
                    reason,
                })?;
                if let Some((first, first_at)) = destinations.get(&parsed.net) {
                    return Err(ConfigError::DestinationConflict {
                        at: at.clone(),
                        prefix: parsed.net,
                        first: first.clone(),
                        first_at: first_at.clone(),
                    });
                }
                let family = &mut per_family[usize::from(parsed.net.addr().is_ipv6())];
                *family += 1;
                if *family > smtpguard_common::MAX_SCOPE_DESTINATIONS as usize {
                    return Err(ConfigError::BadValue {
                        at: at.clone(),
                        key: "destination",
                        value: text.clone(),
                        reason: "one too many: the program holds 65536 scope destinations per address family",
                    });
                }
                destinations.insert(parsed.net, (spec.name.clone(), at.clone()));
                nets.push(parsed.net);
            }
            let scope = building.scope(
                ScopeRules {
                    name: &spec.name,
                    destinations: &nets,
                    guarded: true,
                    ports: &spec.ports,
                    mode: spec.mode,
                    action: spec.action,
                    allow: &spec.allow,
                    deny: &spec.deny,
                },
                fetched,
            )?;
            if !spec.allow_none && count(&scope, List::Allow) == 0 {
                return Err(ConfigError::ScopeNoAllow {
                    at: spec.at.clone(),
                    scope: spec.name.clone(),
                });
            }
            scopes.push(scope);
        }
        let Building {
            mut warnings,
            refused,
            ..
        } = building;
        warnings.extend(refused.iter().map(|refusal| Warning {
            at: refusal.at.clone(),
            message: refusal.message(),
        }));
        Ok((Self { scopes, refused }, warnings))
    }

    /// The policy in force while the real one is built (the boot filter): the file's scopes
    /// with their destinations, ports and modes, no prefixes, every guarded SYN dropped.
    /// Where a scope's destinations cannot be read (the build will refuse the file), one
    /// enforcing scope guards every port any scope names, for every destination.
    pub fn closed(config: &Config) -> Self {
        let closed =
            |name: &str, destinations: Vec<IpNet>, guarded, ports: &[(u16, Location)], mode| {
                Scope {
                    name: name.to_owned(),
                    destinations,
                    guarded,
                    ports: ports.iter().map(|(port, _)| *port).collect(),
                    mode,
                    unlisted_action: Action::Drop,
                    ..Scope::default()
                }
            };
        let default = closed(
            "default",
            Vec::new(),
            config.has_default_rules(),
            &config.ports,
            config.mode,
        );
        let mut seen = BTreeSet::new();
        let mut readable = true;
        let scoped = config.scopes.iter().map(|spec| {
            let destinations: Vec<IpNet> = spec
                .destinations
                .iter()
                .filter_map(|(text, _)| prefix::parse(text).ok().map(|parsed| parsed.net))
                .collect();
            readable &= destinations.len() == spec.destinations.len()
                && destinations.iter().all(|net| seen.insert(*net));
            closed(&spec.name, destinations, true, &spec.ports, spec.mode)
        });
        let policy = Self {
            scopes: std::iter::once(default).chain(scoped).collect(),
            refused: Vec::new(),
        };
        if readable {
            policy
        } else {
            policy.closed_everywhere()
        }
    }

    /// This policy's scopes with their destinations, ports and modes, and no prefixes: every
    /// SYN they guard is dropped. The boot filter of a host whose policy comes from elsewhere
    /// (a fleet group's), and what [`Policy::closed`] gives the maps.
    pub fn emptied(&self) -> Self {
        Self {
            scopes: self
                .scopes
                .iter()
                .map(|scope| Scope {
                    unlisted_action: Action::Drop,
                    entries: BTreeMap::new(),
                    outranked: Vec::new(),
                    ..scope.clone()
                })
                .collect(),
            refused: Vec::new(),
        }
    }

    /// One enforcing scope that drops every SYN, to every destination, on every port any
    /// scope of this policy names: the boot filter where the scoped one cannot be written
    /// (the maps refuse its destinations).
    pub fn closed_everywhere(&self) -> Self {
        Self {
            scopes: vec![Scope {
                name: "default".to_owned(),
                guarded: true,
                ports: self
                    .scopes
                    .iter()
                    .flat_map(|scope| scope.ports.iter().copied())
                    .collect(),
                mode: Mode::Enforce,
                unlisted_action: Action::Drop,
                ..Scope::default()
            }],
            refused: Vec::new(),
        }
    }

    /// Whether some guarded scope stops SYNs (rather than only counting them).
    pub fn enforces(&self) -> bool {
        self.scopes
            .iter()
            .any(|scope| scope.guarded && scope.mode == Mode::Enforce)
    }

    /// The mode to name the policy by: enforce where some guarded scope enforces (the top
    /// level may audit beside a scope that blocks), else audit.
    pub fn mode(&self) -> Mode {
        if self.enforces() {
            Mode::Enforce
        } else {
            Mode::Audit
        }
    }

    /// The default scope: the file's top level.
    pub fn default_scope(&self) -> &Scope {
        &self.scopes[0]
    }

    /// Every entry of every scope, with its scope id.
    pub fn entries(&self) -> impl Iterator<Item = (u32, &IpNet, &Entry)> {
        self.scopes.iter().enumerate().flat_map(|(id, scope)| {
            scope
                .entries
                .iter()
                .map(move |(net, entry)| (id as u32, net, entry))
        })
    }

    /// Number of prefixes on `list`, in every scope.
    pub fn count(&self, list: List) -> usize {
        self.scopes.iter().map(|scope| count(scope, list)).sum()
    }

    /// Whether any scope has destinations (the program then looks the destination up).
    pub fn scoped(&self) -> bool {
        self.scopes.len() > 1
    }

    /// The scope that decides SYNs to `dst`: the one whose destination prefix contains it
    /// most specifically, else the default; the default for an unknown destination.
    pub fn scope_for(&self, dst: Option<IpAddr>) -> (u32, &Scope) {
        let Some(dst) = dst else {
            return (0, self.default_scope());
        };
        let mut best: Option<(u8, usize)> = None;
        for (id, scope) in self.scopes.iter().enumerate().skip(1) {
            for net in &scope.destinations {
                if net.contains(&dst) && best.is_none_or(|(len, _)| net.prefix_len() > len) {
                    best = Some((net.prefix_len(), id));
                }
            }
        }
        let id = best.map_or(0, |(_, id)| id);
        (id as u32, &self.scopes[id])
    }

    /// The decision the XDP program takes for a SYN from `src` to port `port` of the default
    /// scope (for a policy without scopes: every destination).
    pub fn verdict(&self, src: IpAddr, port: u16) -> Verdict<'_> {
        self.verdict_to(src, None, port)
    }

    /// The decision the XDP program takes for a SYN from `src` to `dst` (`None`: the default
    /// scope), port `port`.
    pub fn verdict_to(&self, src: IpAddr, dst: Option<IpAddr>, port: u16) -> Verdict<'_> {
        let (_, scope) = self.scope_for(dst);
        if !scope.guarded || !scope.ports.contains(&port) {
            return Verdict::NotGuarded;
        }
        match scope.deciding_match(src) {
            Some((net, entry)) if entry.list == List::Allow => Verdict::Allowed(net, entry),
            Some((net, entry)) => Verdict::Denied(net, entry),
            None => Verdict::Unlisted,
        }
    }
}

impl Scope {
    /// The most specific prefix containing `addr`, whatever its rank.
    pub fn longest_match(&self, addr: IpAddr) -> Option<(IpNet, &Entry)> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (0..=max).rev().find_map(|len| {
            let net = IpNet::new(addr, len).ok()?.trunc();
            self.entries.get(&net).map(|entry| (net, entry))
        })
    }

    /// The prefix whose verdict a SYN from `addr` gets: the longest match, or, where that is
    /// a deny prefix an allow match outranks, the prefix that outranks it.
    pub fn deciding_match(&self, addr: IpAddr) -> Option<(IpNet, &Entry)> {
        let (net, entry) = self.longest_match(addr)?;
        match entry.decided_by {
            Some(by) => self.entries.get(&by).map(|entry| (by, entry)),
            None => Some((net, entry)),
        }
    }
}

fn count(scope: &Scope, list: List) -> usize {
    scope
        .entries
        .values()
        .filter(|entry| entry.list == list)
        .count()
}

/// The rules of one scope, as the configuration gives them.
struct ScopeRules<'a> {
    name: &'a str,
    destinations: &'a [IpNet],
    guarded: bool,
    ports: &'a [(u16, Location)],
    mode: Mode,
    action: Action,
    allow: &'a [RuleSpec],
    deny: &'a [RuleSpec],
}

/// A policy being built: the entries of the scope at hand, and what was said or left out on
/// the way.
struct Building<'a> {
    safety: &'a Safety,
    /// The configuration file, for messages.
    path: std::path::PathBuf,
    entries: BTreeMap<IpNet, Entry>,
    outranked: Vec<Outranked>,
    warnings: Vec<Warning>,
    refused: Vec<Refusal>,
}

impl Building<'_> {
    /// Builds one scope from its rules.
    fn scope(&mut self, rules: ScopeRules<'_>, fetched: &Fetched) -> Result<Scope, ConfigError> {
        self.entries.clear();
        self.outranked.clear();
        for (list, specs) in [(List::Allow, rules.allow), (List::Deny, rules.deny)] {
            for spec in specs {
                self.add_rule(list, spec, fetched)?;
            }
        }
        let mut entries = std::mem::take(&mut self.entries);
        settle_precedence(&mut entries);
        self.check_coverage(rules.name, &entries)?;
        Ok(Scope {
            name: rules.name.to_owned(),
            destinations: rules.destinations.to_vec(),
            guarded: rules.guarded,
            ports: rules.ports.iter().map(|(port, _)| *port).collect(),
            mode: rules.mode,
            unlisted_action: rules.action,
            entries,
            outranked: std::mem::take(&mut self.outranked),
        })
    }

    /// Refuses a scope whose allow prefixes from automatic sources cover more than the
    /// `[safety]` coverage caps: the floor limits each prefix, this limits them together.
    fn check_coverage(
        &self,
        scope: &str,
        entries: &BTreeMap<IpNet, Entry>,
    ) -> Result<(), ConfigError> {
        let automatic =
            |entry: &Entry| entry.list == List::Allow && entry.origin != Origin::Literal;
        let coverage = safety::Coverage::of(
            entries
                .iter()
                .filter(|(_, entry)| automatic(entry))
                .map(|(net, _)| net),
        );
        for (family, cap_len, suffix) in [
            (safety::Family::V4, self.safety.max_coverage_v4, "v4"),
            (safety::Family::V6, self.safety.max_coverage_v6, "v6"),
        ] {
            let bits = if family == safety::Family::V4 {
                32
            } else {
                128
            };
            let cap = 1u128
                .checked_shl(bits - u32::from(cap_len))
                .unwrap_or(u128::MAX);
            if coverage.get(family) <= cap {
                continue;
            }
            // The origin that brings the most, for the message.
            let mut by_origin: BTreeMap<String, Vec<IpNet>> = BTreeMap::new();
            for (net, entry) in entries.iter().filter(|(_, entry)| automatic(entry)) {
                by_origin
                    .entry(entry.origin.to_string())
                    .or_default()
                    .push(*net);
            }
            let biggest = by_origin
                .iter()
                .map(|(origin, nets)| (safety::Coverage::of(nets).get(family), origin))
                .max()
                .map_or_else(String::new, |(count, origin)| format!("{origin} ({count})"));
            return Err(ConfigError::AllowCoverage(Box::new(
                crate::source::config::CoverageExceeded {
                    path: self.path.clone(),
                    scope: scope.to_owned(),
                    family: if family == safety::Family::V4 {
                        "IPv4"
                    } else {
                        "IPv6"
                    },
                    suffix,
                    coverage: coverage.get(family),
                    cap,
                    cap_len,
                    biggest,
                },
            )));
        }
        Ok(())
    }

    fn add_rule(
        &mut self,
        list: List,
        spec: &RuleSpec,
        fetched: &Fetched,
    ) -> Result<(), ConfigError> {
        // A list that was never fetched is not an empty list: a deny rule would stop nothing
        // and an allow rule would cut its provider off.
        if let Some(source) = spec
            .urls
            .iter()
            .find(|source| !fetched.urls.contains_key(&source.url))
        {
            return Err(ConfigError::BadValue {
                at: source.at.clone(),
                key: "url",
                value: source.url.clone(),
                reason: "was never fetched on this host (an internal error: every URL of every scope is fetched before the policy is built)",
            });
        }
        // A deny rule's own prefixes are the admin's words; what it takes from elsewhere is a
        // feed, which must not cut the provider off.
        let precedence = |origin: &Origin| match (list, spec.precedence) {
            (List::Allow, _) => Precedence::Specific,
            (List::Deny, Some(precedence)) => precedence,
            (List::Deny, None) if *origin == Origin::Literal => Precedence::Specific,
            (List::Deny, None) => Precedence::Allow,
        };
        // One copy of the rule's name, and of each file's path or URL, for all its entries.
        let rule: Arc<str> = spec.name.as_str().into();
        let entry = |origin: Origin, at: Location| Entry {
            list,
            rule: Arc::clone(&rule),
            action: spec.action,
            precedence: precedence(&origin),
            decided_by: None,
            origin,
            at,
        };
        // Each prefix as written, with its line and where it came from: an index into
        // `sources`, one for each run of lines of one origin in one file.
        let mut sources: Vec<(Origin, Arc<Path>)> = Vec::new();
        let mut written: Vec<(&str, usize, usize)> = Vec::new();
        let files = spec.files.iter().map(|(path, _)| {
            let lines = fetched.files.get(path).map(Vec::as_slice);
            (Origin::File(Arc::from(path.as_path())), lines)
        });
        let urls = spec.urls.iter().map(|source| {
            let lines = fetched
                .urls
                .get(&source.url)
                .map(|content| content.entries.as_slice());
            (Origin::Url(Arc::from(source.url.as_str())), lines)
        });
        let literal = std::iter::once((Origin::Literal, Some(spec.prefixes.as_slice())));
        for (origin, lines) in literal.chain(files).chain(urls) {
            let first = sources.len();
            for (text, at) in lines.unwrap_or_default() {
                let same_file = sources
                    .last()
                    .is_some_and(|(_, file)| Arc::ptr_eq(file, &at.file));
                if sources.len() == first || !same_file {
                    sources.push((origin.clone(), Arc::clone(&at.file)));
                }
                written.push((text.as_str(), at.line, sources.len() - 1));
            }
        }
        let location = |line: usize, source: usize| Location {
            file: Arc::clone(&sources[source].1),
            line,
        };
        // With their line and source, so that adding them in prefix order needs no look back
        // at `written`: a cache miss per prefix on a list of millions.
        let mut nets: Vec<(IpNet, usize, usize, usize)> = Vec::with_capacity(written.len());
        for (index, &(text, line, source)) in written.iter().enumerate() {
            let parsed = prefix::parse(text).map_err(|reason| ConfigError::BadPrefix {
                at: location(line, source),
                value: text.to_owned(),
                reason,
            })?;
            if parsed.mapped {
                self.warnings.push(Warning {
                    at: location(line, source),
                    message: format!(
                        "{text:?} is an IPv4-mapped IPv6 prefix, which IPv4 sources never match as such; using the IPv4 prefix {}",
                        parsed.net
                    ),
                });
            } else if parsed.had_host_bits {
                self.warnings.push(Warning {
                    at: location(line, source),
                    message: format!("{text:?} has host bits set; using {}", parsed.net),
                });
            }
            if sources[source].0 == Origin::Literal
                && list == List::Allow
                && parsed.net.prefix_len() == 0
                && !self.safety.allow_any_source
            {
                return Err(ConfigError::AnySource {
                    at: location(line, source),
                    value: text.to_owned(),
                });
            }
            nets.push((parsed.net, index, line, source));
        }
        drop(written);
        // Added in prefix order: a list in random order cost a cache miss per level of the
        // map for each of its prefixes. Repeats of a prefix keep the order of their lines
        // (the first one is kept): the index breaks the tie.
        nets.sort_unstable_by_key(|&(net, index, _, _)| (sort_key(&net), index));
        // Prefixes not in the map yet are collected in order and added at once, rather than
        // each with a search from the root.
        let mut fresh: Vec<(IpNet, Entry)> = Vec::with_capacity(nets.len());
        for (net, _, line, source) in nets {
            let entry = entry(sources[source].0.clone(), location(line, source));
            let Some(entry) = self.above_floor(net, entry) else {
                continue;
            };
            let first = match self.entries.get_mut(&net) {
                Some(first) => first,
                None => match fresh.last_mut() {
                    Some((last, first)) if *last == net => first,
                    _ => {
                        fresh.push((net, entry));
                        continue;
                    }
                },
            };
            fold_repeat(net, first, entry, &mut self.outranked, &mut self.warnings)?;
        }
        self.add_new(fresh);
        let names = spec
            .hosts
            .iter()
            .map(|(host, at)| (Name::Host(normalise(host)), at))
            .chain(
                spec.spf
                    .iter()
                    .map(|(domain, at)| (Name::Spf(normalise(domain)), at)),
            );
        for (name, at) in names {
            for net in fetched.nets(&name).unwrap_or_default() {
                self.add(*net, entry(name.origin(), at.clone()))?;
            }
        }
        Ok(())
    }

    /// Adds one prefix, unless it reaches the allow list from an automatic source below the
    /// floor.
    fn add(&mut self, net: IpNet, entry: Entry) -> Result<(), ConfigError> {
        match self.above_floor(net, entry) {
            Some(entry) => self.insert(net, entry),
            None => Ok(()),
        }
    }

    /// `entry`, unless it reaches the allow list from an automatic source below the floor:
    /// then it is recorded as refused.
    fn above_floor(&mut self, net: IpNet, entry: Entry) -> Option<Entry> {
        if entry.list == List::Allow
            && entry.origin != Origin::Literal
            && let Some(floor) = safety::below_floor(&net, self.safety)
        {
            self.refused.push(Refusal {
                net,
                rule: entry.rule.to_string(),
                origin: entry.origin,
                at: entry.at,
                reason: Reason::Floor { floor },
            });
            return None;
        }
        Some(entry)
    }

    /// Adds one prefix, folding a repeat as [`fold_repeat`] says.
    fn insert(&mut self, net: IpNet, entry: Entry) -> Result<(), ConfigError> {
        match self.entries.entry(net) {
            btree_map::Entry::Vacant(vacant) => {
                vacant.insert(entry);
                Ok(())
            }
            btree_map::Entry::Occupied(occupied) => fold_repeat(
                net,
                occupied.into_mut(),
                entry,
                &mut self.outranked,
                &mut self.warnings,
            ),
        }
    }

    /// Adds `fresh`, in prefix order and none of them in the map yet: a few one by one, many
    /// in one pass that builds the map from sorted entries.
    fn add_new(&mut self, fresh: Vec<(IpNet, Entry)>) {
        if fresh.len() < self.entries.len() / 8 {
            self.entries.extend(fresh);
        } else {
            let mut fresh = BTreeMap::from_iter(fresh);
            self.entries.append(&mut fresh);
        }
    }
}

/// The order of `IpNet` (IPv4 first, then by address, then by length) as plain integers,
/// which compare several times faster: sorting a million prefixes was a fifth of building
/// the policy.
fn sort_key(net: &IpNet) -> (bool, u128, u8) {
    match net {
        IpNet::V4(v4) => (false, u32::from(v4.addr()).into(), v4.prefix_len()),
        IpNet::V6(v6) => (true, u128::from(v6.addr()), v6.prefix_len()),
    }
}

/// Folds `entry` into `first`, an entry of the same prefix: a repeat on one list is folded
/// (a `specific` deny prefix replaces an identical one of `allow` precedence); an allow
/// prefix and an identical `specific` deny one are a conflict; an identical deny prefix of
/// `allow` precedence is outranked.
fn fold_repeat(
    net: IpNet,
    first: &mut Entry,
    entry: Entry,
    outranked: &mut Vec<Outranked>,
    warnings: &mut Vec<Warning>,
) -> Result<(), ConfigError> {
    let feed = |entry: &Entry| entry.list == List::Deny && entry.precedence == Precedence::Allow;
    match (first.list, entry.list) {
        (List::Allow, List::Deny) | (List::Deny, List::Allow) if feed(&entry) || feed(first) => {
            // The allow entry stands; the deny one is shown as outranked.
            let deny = if feed(&entry) {
                entry
            } else {
                std::mem::replace(first, entry)
            };
            outranked.push(Outranked { net, entry: deny });
        }
        (List::Allow, List::Deny) | (List::Deny, List::Allow) => {
            let (allow, deny) = if entry.list == List::Deny {
                (&*first, &entry)
            } else {
                (&entry, &*first)
            };
            return Err(ConfigError::Conflict(Box::new(Conflict {
                at: entry.at.clone(),
                prefix: net,
                allow_rule: allow.rule.to_string(),
                allow_at: allow.at.clone(),
                deny_rule: deny.rule.to_string(),
            })));
        }
        _ => {
            let message = format!(
                "{net} is already on the {} list (rule {:?}, {}); counted there",
                entry.list, first.rule, first.at
            );
            let at = entry.at.clone();
            if feed(first) && !feed(&entry) {
                // The admin's own deny ranks as written.
                *first = entry;
            }
            warnings.push(Warning { at, message });
        }
    }
    Ok(())
}

/// Gives each deny prefix of `allow` precedence the prefix that decides for it: the longest
/// allow or `specific` deny prefix that contains it. The program's one longest-prefix lookup
/// then finds the right verdict: an allow match is never overridden by a feed, and the
/// admin's own deny inside the provider's range still stops that host.
fn settle_precedence(entries: &mut BTreeMap<IpNet, Entry>) {
    let ranks =
        |entry: &Entry| entry.list == List::Allow || entry.precedence == Precedence::Specific;
    // Only the prefix lengths that occur among the ranking entries need probing.
    let lengths: BTreeSet<(bool, u8)> = entries
        .iter()
        .filter(|(_, entry)| ranks(entry))
        .map(|(net, _)| (net.addr().is_ipv4(), net.prefix_len()))
        .collect();
    let decisions: Vec<(IpNet, IpNet)> = entries
        .iter()
        .filter(|(_, entry)| !ranks(entry))
        .filter_map(|(net, _)| {
            let v4 = net.addr().is_ipv4();
            lengths
                .iter()
                .rev()
                .filter(|(family, len)| *family == v4 && *len < net.prefix_len())
                .find_map(|(_, len)| {
                    let cover = IpNet::new(net.addr(), *len).ok()?.trunc();
                    entries
                        .get(&cover)
                        .filter(|entry| ranks(entry))
                        .map(|_| (*net, cover))
                })
        })
        .collect();
    for (net, by) in decisions {
        if let Some(entry) = entries.get_mut(&net) {
            entry.decided_by = Some(by);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn build(text: &str) -> Result<(Policy, Vec<Warning>), ConfigError> {
        let config = Config::parse(Path::new("/etc/smtpguard/test.toml"), text)?;
        Policy::build(&config, &Fetched::default())
    }

    const EXAMPLE: &str = r#"interfaces = ["eth0"]
[[allow]]
name = "provider"
prefixes = ["89.16.184.144/28", "89.16.176.76", "208.123.79.0/255.255.255.0", "2001:db8:25::/48"]
[[allow]]
name = "lan"
prefixes = ["192.168.1.7/24"]
[[deny]]
name = "abuser"
prefixes = ["89.16.184.150"]
"#;

    #[test]
    fn example_normalises_and_warns_about_host_bits() {
        let (policy, warnings) = build(EXAMPLE).unwrap();
        let prefixes: Vec<String> = policy
            .default_scope()
            .entries
            .keys()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            prefixes,
            [
                "89.16.176.76/32",
                "89.16.184.144/28",
                "89.16.184.150/32",
                "192.168.1.0/24",
                "208.123.79.0/24",
                "2001:db8:25::/48"
            ]
        );
        assert_eq!(policy.count(List::Allow), 5);
        assert_eq!(policy.count(List::Deny), 1);
        assert_eq!(warnings.len(), 1);
        assert_eq!(
            warnings[0].to_string(),
            "/etc/smtpguard/test.toml:7: \"192.168.1.7/24\" has host bits set; using 192.168.1.0/24"
        );
    }

    #[test]
    fn most_specific_prefix_decides() {
        let (policy, _) = build(EXAMPLE).unwrap();
        let verdict = |addr: &str, port| match policy.verdict(addr.parse().unwrap(), port) {
            Verdict::NotGuarded => "not guarded".to_owned(),
            Verdict::Allowed(net, entry) => format!("allow {net} {}", entry.rule),
            Verdict::Denied(net, entry) => format!("deny {net} {}", entry.rule),
            Verdict::Unlisted => "unlisted".to_owned(),
        };
        assert_eq!(
            verdict("89.16.184.149", 25),
            "allow 89.16.184.144/28 provider"
        );
        assert_eq!(verdict("89.16.184.150", 25), "deny 89.16.184.150/32 abuser");
        assert_eq!(verdict("89.16.184.160", 25), "unlisted");
        assert_eq!(verdict("89.16.184.150", 587), "not guarded");
        assert_eq!(
            verdict("2001:db8:25:ffff::1", 25),
            "allow 2001:db8:25::/48 provider"
        );
        assert_eq!(verdict("2001:db8:26::1", 25), "unlisted");
        assert_eq!(verdict("192.168.1.200", 25), "allow 192.168.1.0/24 lan");
    }

    #[test]
    fn bad_prefix_names_file_line_and_value() {
        let error = build("interfaces = [\"eth0\"]\n[[allow]]\nname = \"p\"\nprefixes = [\n  \"192.0.2.0/24\",\n  \"192.0.2.300\",\n]\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "/etc/smtpguard/test.toml:6: bad prefix \"192.0.2.300\": not an IPv4 or IPv6 address"
        );
    }

    #[test]
    fn non_contiguous_mask_is_refused() {
        let error = build("interfaces = [\"eth0\"]\n[[allow]]\nname = \"p\"\nprefixes = [\"208.123.79.0/255.255.0.255\"]\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "/etc/smtpguard/test.toml:4: bad prefix \"208.123.79.0/255.255.0.255\": netmask 255.255.0.255 is not contiguous"
        );
    }

    #[test]
    fn prefix_in_both_lists_is_refused() {
        let error = build("interfaces = [\"eth0\"]\n[[allow]]\nname = \"p\"\nprefixes = [\"192.0.2.0/24\"]\n[[deny]]\nname = \"bad\"\nprefixes = [\"192.0.2.9/24\"]\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "/etc/smtpguard/test.toml:7: prefix 192.0.2.0/24 is in both lists: allow rule \"p\" (/etc/smtpguard/test.toml:4) and deny rule \"bad\""
        );
    }

    #[test]
    fn no_allow_entry_is_refused_unless_allow_none() {
        let error = build(
            "interfaces = [\"eth0\"]\n[[deny]]\nname = \"bad\"\nprefixes = [\"192.0.2.9\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("no allow prefix at all"), "{error}");
        let error = build("interfaces = [\"eth0\"]\n[[allow]]\nname = \"empty\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("no allow prefix at all"), "{error}");
        let (policy, _) = build("interfaces = [\"eth0\"]\nallow_none = true\n").unwrap();
        assert!(policy.default_scope().entries.is_empty());
        assert_eq!(
            policy.verdict("192.0.2.1".parse().unwrap(), 25),
            Verdict::Unlisted
        );
    }

    #[test]
    fn ipv4_mapped_prefixes_become_ipv4_with_a_warning() {
        let (policy, warnings) = build("interfaces = [\"eth0\"]\n[[allow]]\nname = \"p\"\nprefixes = [\"192.0.2.0/24\"]\n[[deny]]\nname = \"bad\"\nprefixes = [\"::ffff:192.0.2.9\"]\n").unwrap();
        assert_eq!(
            policy.verdict("192.0.2.9".parse().unwrap(), 25),
            Verdict::Denied(
                "192.0.2.9/32".parse().unwrap(),
                &policy.default_scope().entries[&"192.0.2.9/32".parse().unwrap()]
            ),
            "the deny applies to the IPv4 source"
        );
        assert_eq!(
            warnings[0].to_string(),
            "/etc/smtpguard/test.toml:7: \"::ffff:192.0.2.9\" is an IPv4-mapped IPv6 prefix, which IPv4 sources never match as such; using the IPv4 prefix 192.0.2.9/32"
        );
        let error = build(
            "interfaces = [\"eth0\"]\n[[allow]]\nname = \"p\"\nprefixes = [\"::ffff:0:0/64\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.starts_with(
                "/etc/smtpguard/test.toml:4: bad prefix \"::ffff:0:0/64\": an IPv4-mapped prefix"
            ),
            "{error}"
        );
    }

    /// A configuration with a list file and an SPF domain on the allow list, and the same on
    /// the deny list, as fetched.
    fn automatic(allow_nets: &[&str], deny_nets: &[&str], safety: &str) -> (Config, Fetched) {
        let text = format!(
            "interfaces = [\"eth0\"]\n{safety}\n[[allow]]\nname = \"provider\"\nspf = [\"provider.test\"]\nfiles = [\"/etc/smtpguard/provider.txt\"]\n[[deny]]\nname = \"drop\"\nspf = [\"drop.test\"]\nfiles = [\"/etc/smtpguard/drop.txt\"]\n"
        );
        let config = Config::parse(Path::new("/etc/smtpguard/test.toml"), &text).unwrap();
        let mut fetched = Fetched::default();
        for (path, nets) in [
            ("/etc/smtpguard/provider.txt", allow_nets),
            ("/etc/smtpguard/drop.txt", deny_nets),
        ] {
            let text: String = nets.iter().map(|net| format!("{net}\n")).collect();
            fetched.files.insert(
                path.into(),
                crate::source::listfile::entries(Path::new(path), &text),
            );
        }
        for (name, nets) in [("provider.test", allow_nets), ("drop.test", deny_nets)] {
            // The same prefixes from DNS, moved out of the way of the file's.
            let nets = nets
                .iter()
                .map(|net| {
                    let net: IpNet = net.parse().unwrap();
                    match net {
                        IpNet::V4(v4) => IpNet::new(
                            std::net::Ipv4Addr::from(u32::from(v4.addr()) ^ 0x0100_0000).into(),
                            v4.prefix_len(),
                        )
                        .unwrap()
                        .trunc(),
                        IpNet::V6(_) => net,
                    }
                })
                .collect();
            fetched.names.insert(
                Name::Spf(name.into()),
                crate::source::fetch::Resolution::last_good(nets, std::time::SystemTime::now()),
            );
        }
        (config, fetched)
    }

    #[test]
    fn automatic_allow_prefixes_may_not_cover_too_much_together() {
        // 4096 /12s: each passes the floor, together they are every IPv4 address.
        let nets: Vec<String> = (0..4096u32)
            .map(|i| format!("{}.{}.0.0/12", i >> 4, (i & 15) << 4))
            .collect();
        let nets: Vec<&str> = nets.iter().map(String::as_str).collect();
        let (config, fetched) = automatic(&nets, &[], "");
        let error = Policy::build(&config, &fetched).unwrap_err().to_string();
        assert!(
            error.starts_with("/etc/smtpguard/test.toml: allow prefixes from list files, host names and SPF in scope \"default\" cover 4294967296 IPv4 addresses, more than max_coverage_v4 = 8 allows (16777216, one /8)"),
            "{error}"
        );
        assert!(error.contains("the most from"), "{error}");
        // Raised by the admin, it goes through.
        let (config, fetched) = automatic(&nets, &[], "[safety]\nmax_coverage_v4 = 0\n");
        assert!(Policy::build(&config, &fetched).is_ok());
        // Real provider lists are far below the cap.
        let (config, fetched) =
            automatic(&["40.92.0.0/15", "52.100.0.0/14", "104.47.0.0/17"], &[], "");
        assert!(Policy::build(&config, &fetched).is_ok());
    }

    #[test]
    fn automatic_allow_prefixes_below_the_floor_are_refused() {
        let (config, fetched) = automatic(
            &[
                "0.0.0.0/0",
                "128.0.0.0/1",
                "64.0.0.0/11",
                "40.92.0.0/15",
                "::/0",
                "2001:db8::/32",
            ],
            &["0.0.0.0/0", "::/0"],
            "",
        );
        let (policy, warnings) = Policy::build(&config, &fetched).unwrap();
        let allowed: Vec<String> = policy
            .default_scope()
            .entries
            .iter()
            .filter(|(_, entry)| entry.list == List::Allow)
            .map(|(net, entry)| format!("{net} {}", entry.origin))
            .collect();
        assert_eq!(
            allowed,
            [
                "40.92.0.0/15 file /etc/smtpguard/provider.txt",
                "41.92.0.0/15 SPF of provider.test",
                "2001:db8::/32 file /etc/smtpguard/provider.txt"
            ]
        );
        // Deny prefixes are not floored (both origins gave 0.0.0.0/0 and ::/0: kept once).
        assert_eq!(
            policy.count(List::Deny),
            2,
            "{:?}",
            policy.default_scope().entries
        );
        assert_eq!(
            policy.verdict("203.0.113.9".parse().unwrap(), 25),
            Verdict::Denied(
                "0.0.0.0/0".parse().unwrap(),
                &policy.default_scope().entries[&"0.0.0.0/0".parse().unwrap()]
            ),
        );
        let refused: Vec<String> = policy
            .refused
            .iter()
            .map(|refusal| {
                format!(
                    "{} {} {}",
                    refusal.net,
                    refusal.rule,
                    refusal.reason.label()
                )
            })
            .collect();
        assert_eq!(refused.len(), 8, "{refused:?}");
        assert!(refused.contains(&"0.0.0.0/0 provider floor".to_owned()));
        let text: Vec<String> = warnings.iter().map(ToString::to_string).collect();
        assert!(
            text.contains(&"/etc/smtpguard/provider.txt:1: 0.0.0.0/0 from file /etc/smtpguard/provider.txt refused for allow rule \"provider\": shorter than /12, the floor for IPv4 prefixes from list files and DNS ([safety] min_prefix_v4)".to_owned()),
            "{text:#?}"
        );
        assert!(
            text.contains(&"/etc/smtpguard/test.toml:5: ::/0 from SPF of provider.test refused for allow rule \"provider\": shorter than /32, the floor for IPv6 prefixes from list files and DNS ([safety] min_prefix_v6)".to_owned()),
            "{text:#?}"
        );

        // The floor is a setting.
        let (config, fetched) = automatic(&["64.0.0.0/11"], &[], "[safety]\nmin_prefix_v4 = 8\n");
        let (policy, _) = Policy::build(&config, &fetched).unwrap();
        assert_eq!(policy.count(List::Allow), 2);
        assert!(policy.refused.is_empty());
    }

    #[test]
    fn ipv4_mapped_list_file_lines_become_ipv4_and_meet_the_floor_as_such() {
        let (config, mut fetched) = automatic(&["192.0.2.0/24"], &[], "");
        let list = Path::new("/etc/smtpguard/provider.txt");
        fetched.files.insert(
            list.into(),
            crate::source::listfile::entries(list, "::ffff:198.51.100.0/120\n::ffff:0.0.0.0/97\n"),
        );
        let (policy, warnings) = Policy::build(&config, &fetched).unwrap();
        assert!(
            policy
                .default_scope()
                .entries
                .contains_key(&"198.51.100.0/24".parse().unwrap())
        );
        assert_eq!(
            warnings[0].to_string(),
            "/etc/smtpguard/provider.txt:1: \"::ffff:198.51.100.0/120\" is an IPv4-mapped IPv6 prefix, which IPv4 sources never match as such; using the IPv4 prefix 198.51.100.0/24"
        );
        // ::ffff:0.0.0.0/97 is 0.0.0.0/1: refused by the IPv4 floor.
        assert_eq!(
            policy
                .refused
                .iter()
                .map(|refusal| refusal.net.to_string())
                .collect::<Vec<_>>(),
            ["0.0.0.0/1"]
        );
    }

    #[test]
    fn an_allow_list_emptied_by_the_floor_is_no_allow_list() {
        let (config, fetched) = automatic(&["0.0.0.0/0"], &[], "");
        let error = Policy::build(&config, &fetched).unwrap_err().to_string();
        assert!(error.contains("no allow prefix at all"), "{error}");
    }

    #[test]
    fn literal_any_source_needs_allow_any_source() {
        for any in [
            "0.0.0.0/0",
            "::/0",
            "0.0.0.0 mask 0.0.0.0",
            "::ffff:0.0.0.0/96",
        ] {
            let text = format!(
                "interfaces = [\"eth0\"]\n[[allow]]\nname = \"all\"\nprefixes = [\n  \"{any}\",\n]\n"
            );
            let error = build(&text).unwrap_err().to_string();
            assert_eq!(
                error,
                format!(
                    "/etc/smtpguard/test.toml:5: {any:?} on an allow rule lets every source connect; set allow_any_source = true in [safety] if that is what you mean"
                )
            );
            let (policy, _) =
                build(&text.replace("[[allow]]", "[safety]\nallow_any_source = true\n[[allow]]"))
                    .unwrap();
            assert_eq!(policy.count(List::Allow), 1, "{any}");
        }
        // Other literal prefixes keep their meaning, however short; deny /0 needs nothing.
        let (policy, _) = build("interfaces = [\"eth0\"]\n[[allow]]\nname = \"half\"\nprefixes = [\"0.0.0.0/1\"]\n[[deny]]\nname = \"rest\"\nprefixes = [\"::/0\"]\n").unwrap();
        assert_eq!(policy.default_scope().entries.len(), 2);
        assert!(policy.refused.is_empty());
    }

    #[test]
    fn the_sort_key_orders_as_ipnet_does() {
        let mut nets: Vec<IpNet> = [
            "::/0",
            "0.0.0.0/0",
            "192.0.2.0/24",
            "192.0.2.0/25",
            "192.0.2.128/25",
            "10.0.0.0/8",
            "255.255.255.255/32",
            "2001:db8::/32",
            "2001:db8::/48",
            "::ffff:0:0/96",
            "ffff::/16",
        ]
        .iter()
        .map(|net| net.parse().unwrap())
        .collect();
        let mut by_key = nets.clone();
        nets.sort();
        by_key.sort_by_key(sort_key);
        assert_eq!(by_key, nets);
    }

    #[test]
    fn duplicate_in_same_list_warns_and_keeps_first() {
        let (policy, warnings) = build("interfaces = [\"eth0\"]\n[[allow]]\nname = \"a\"\nprefixes = [\"192.0.2.0/24\"]\n[[allow]]\nname = \"b\"\nprefixes = [\"192.0.2.0/24\"]\n").unwrap();
        assert_eq!(policy.default_scope().entries.len(), 1);
        assert_eq!(
            &*policy.default_scope().entries.values().next().unwrap().rule,
            "a"
        );
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0]
                .message
                .contains("already on the allow list (rule \"a\""),
            "{}",
            warnings[0]
        );
    }

    /// A verdict as text, for the scope and precedence tests.
    fn said(policy: &Policy, src: &str, dst: Option<&str>, port: u16) -> String {
        let dst = dst.map(|dst| dst.parse().unwrap());
        match policy.verdict_to(src.parse().unwrap(), dst, port) {
            Verdict::NotGuarded => "not guarded".to_owned(),
            Verdict::Allowed(net, entry) => format!("allow {net} {}", entry.rule),
            Verdict::Denied(net, entry) => {
                format!("deny {net} {} {}", entry.rule, entry.action.unwrap())
            }
            Verdict::Unlisted => "unlisted".to_owned(),
        }
    }

    const SCOPED: &str = r#"interfaces = ["eth0"]
ports = [25]
action = "drop"

[[allow]]
name = "lan"
prefixes = ["192.168.0.0/16"]

[[scope]]
name = "filtered"
destinations = ["198.51.100.10", "2001:db8:1::/48"]
action = "reject"
[[scope.allow]]
name = "provider-a"
prefixes = ["89.16.184.0/24", "2001:db8:a::/48"]
[[scope.deny]]
name = "abuser"
prefixes = ["89.16.184.150"]

[[scope]]
name = "tenant"
destinations = ["198.51.100.0/24"]
ports = [25, 2525]
mode = "audit"
[[scope.allow]]
name = "provider-b"
prefixes = ["203.0.113.0/24"]
"#;

    #[test]
    fn the_most_specific_scope_decides_then_the_longest_source_prefix() {
        let (policy, _) = build(SCOPED).unwrap();
        assert!(policy.scoped());
        let names: Vec<&str> = policy.scopes.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["default", "filtered", "tenant"]);
        // 198.51.100.10 is in both scopes' destinations: the /32 wins over the /24.
        assert_eq!(
            policy.scope_for(Some("198.51.100.10".parse().unwrap())).0,
            1
        );
        assert_eq!(
            policy.scope_for(Some("198.51.100.11".parse().unwrap())).0,
            2
        );
        assert_eq!(policy.scope_for(Some("192.0.2.1".parse().unwrap())).0, 0);
        let to_a = Some("198.51.100.10");
        assert_eq!(
            said(&policy, "89.16.184.7", to_a, 25),
            "allow 89.16.184.0/24 provider-a"
        );
        assert_eq!(
            said(&policy, "89.16.184.150", to_a, 25),
            "deny 89.16.184.150/32 abuser reject"
        );
        // Provider B's ranges mean nothing for scope "filtered", and the top-level LAN rule
        // belongs to the default scope only.
        assert_eq!(said(&policy, "203.0.113.5", to_a, 25), "unlisted");
        assert_eq!(said(&policy, "192.168.1.1", to_a, 25), "unlisted");
        assert_eq!(
            said(&policy, "203.0.113.5", Some("198.51.100.99"), 25),
            "allow 203.0.113.0/24 provider-b"
        );
        assert_eq!(
            said(&policy, "89.16.184.7", Some("198.51.100.99"), 25),
            "unlisted"
        );
        // Ports are per scope.
        assert_eq!(said(&policy, "89.16.184.7", to_a, 2525), "not guarded");
        assert_eq!(
            said(&policy, "89.16.184.7", Some("198.51.100.99"), 2525),
            "unlisted"
        );
        // IPv6 destinations too.
        assert_eq!(
            said(&policy, "2001:db8:a::1", Some("2001:db8:1::25"), 25),
            "allow 2001:db8:a::/48 provider-a"
        );
        assert_eq!(
            said(&policy, "2001:db8:a::1", Some("2001:db8:2::25"), 25),
            "unlisted"
        );
        // The default scope: the top-level rules, for every other destination.
        assert_eq!(
            said(&policy, "192.168.1.1", Some("192.0.2.1"), 25),
            "allow 192.168.0.0/16 lan"
        );
        let (mode, action) = (policy.scopes[2].mode, policy.scopes[2].unlisted_action);
        assert_eq!(
            (mode, action),
            (Mode::Audit, Action::Drop),
            "tenant inherits the top-level action"
        );
        assert_eq!(policy.scopes[1].unlisted_action, Action::Reject);
        // Not the order of the file: the wider scope first changes nothing.
        let at = SCOPED.find("[[scope]]\nname = \"tenant\"").unwrap();
        let swapped = format!(
            "{}{}\n{}",
            &SCOPED[..SCOPED.find("[[scope]]").unwrap()],
            &SCOPED[at..],
            &SCOPED[SCOPED.find("[[scope]]").unwrap()..at]
        );
        let (swapped, _) = build(&swapped).unwrap();
        assert_eq!(swapped.scopes[1].name, "tenant");
        assert_eq!(
            said(&swapped, "89.16.184.7", to_a, 25),
            "allow 89.16.184.0/24 provider-a"
        );
    }

    #[test]
    fn without_top_level_rules_only_the_scopes_destinations_are_guarded() {
        let text = SCOPED.replace(
            "[[allow]]\nname = \"lan\"\nprefixes = [\"192.168.0.0/16\"]\n",
            "",
        );
        let (policy, _) = build(&text).unwrap();
        assert!(!policy.default_scope().guarded);
        assert_eq!(
            said(&policy, "192.168.1.1", Some("192.0.2.1"), 25),
            "not guarded"
        );
        assert_eq!(
            said(&policy, "203.0.113.66", Some("192.0.2.1"), 25),
            "not guarded"
        );
        assert_eq!(
            said(&policy, "203.0.113.66", Some("198.51.100.10"), 25),
            "unlisted"
        );
    }

    #[test]
    fn scope_mistakes_are_refused_with_file_and_line() {
        let twice = SCOPED.replace(
            "destinations = [\"198.51.100.0/24\"]",
            "destinations = [\"198.51.100.10/32\"]",
        );
        assert_eq!(
            build(&twice).unwrap_err().to_string(),
            "/etc/smtpguard/test.toml:22: destination 198.51.100.10/32 is already in scope \"filtered\" (/etc/smtpguard/test.toml:11): which scope decides would be a guess"
                .to_owned(),
        );
        let empty = SCOPED.replace(
            "[[scope.allow]]\nname = \"provider-b\"\nprefixes = [\"203.0.113.0/24\"]\n",
            "",
        );
        let error = build(&empty).unwrap_err().to_string();
        assert!(
            error.starts_with(
                "/etc/smtpguard/test.toml:21: scope \"tenant\" has no allow prefix at all"
            ),
            "{error}"
        );
        let named_default = SCOPED.replace("name = \"tenant\"", "name = \"default\"");
        let error = build(&named_default).unwrap_err().to_string();
        assert!(
            error.starts_with("/etc/smtpguard/test.toml:21: "),
            "{error}"
        );
        assert!(error.contains("\"default\""), "{error}");
        let bad = SCOPED.replace("\"2001:db8:1::/48\"", "\"2001:db8:1::/129\"");
        let error = build(&bad).unwrap_err().to_string();
        assert!(
            error.starts_with("/etc/smtpguard/test.toml:11: bad prefix \"2001:db8:1::/129\""),
            "{error}"
        );
    }

    /// A provider allowed by literal prefixes and a DNS name, a blocklist file, and the
    /// admin's own deny of one host: the feed never overrides the provider, the admin does.
    fn feed_policy(extra: &str) -> (Config, Fetched) {
        let text = format!(
            r#"interfaces = ["eth0"]
[[allow]]
name = "provider"
prefixes = ["40.92.0.0/15", "203.0.113.0/24"]
[[deny]]
name = "drop-list"
files = ["/etc/smtpguard/drop.txt"]
{extra}
[[deny]]
name = "abuser"
prefixes = ["40.92.7.7"]
"#
        );
        let config = Config::parse(Path::new("/etc/smtpguard/test.toml"), &text).unwrap();
        let mut fetched = Fetched::default();
        let path = Path::new("/etc/smtpguard/drop.txt");
        fetched.files.insert(
            path.into(),
            crate::source::listfile::entries(
                path,
                "; DROP-style\n40.92.7.0/24 ; inside the provider\n203.0.113.0/24 ; exactly the provider\n198.18.0.0/15\n",
            ),
        );
        (config, fetched)
    }

    #[test]
    fn a_blocklist_file_never_cuts_the_provider_off_but_the_admins_deny_does() {
        let (config, fetched) = feed_policy("");
        let (policy, warnings) = Policy::build(&config, &fetched).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let scope = policy.default_scope();
        let feed = &scope.entries[&"40.92.7.0/24".parse().unwrap()];
        assert_eq!(feed.precedence, Precedence::Allow);
        assert_eq!(feed.decided_by, Some("40.92.0.0/15".parse().unwrap()));
        assert_eq!(
            scope.entries[&"40.92.7.7/32".parse().unwrap()].precedence,
            Precedence::Specific
        );
        // Inside the provider's /15 and the feed's /24: allowed.
        assert_eq!(
            said(&policy, "40.92.7.8", None, 25),
            "allow 40.92.0.0/15 provider"
        );
        // The admin's /32 inside both: stopped.
        assert_eq!(
            said(&policy, "40.92.7.7", None, 25),
            "deny 40.92.7.7/32 abuser drop"
        );
        // The feed outside the provider: stopped.
        assert_eq!(
            said(&policy, "198.18.3.4", None, 25),
            "deny 198.18.0.0/15 drop-list drop"
        );
        // The identical prefix is no conflict: the allow entry stands, the feed's is shown.
        assert_eq!(
            said(&policy, "203.0.113.9", None, 25),
            "allow 203.0.113.0/24 provider"
        );
        let outranked: Vec<String> = scope
            .outranked
            .iter()
            .map(|o| format!("{} {} {}", o.net, o.entry.rule, o.entry.at))
            .collect();
        assert_eq!(
            outranked,
            ["203.0.113.0/24 drop-list /etc/smtpguard/drop.txt:3"]
        );
    }

    #[test]
    fn a_feed_said_specific_decides_by_length_and_conflicts_where_identical() {
        let (config, fetched) = feed_policy("precedence = \"specific\"");
        let error = Policy::build(&config, &fetched).unwrap_err().to_string();
        assert!(error.contains("203.0.113.0/24"), "{error}");
        assert!(error.starts_with("/etc/smtpguard/drop.txt:3"), "{error}");
        // Without the identical prefix, the feed's /24 wins inside the /15.
        let (config, mut fetched) = feed_policy("precedence = \"specific\"");
        let path = Path::new("/etc/smtpguard/drop.txt");
        fetched.files.insert(
            path.into(),
            crate::source::listfile::entries(path, "40.92.7.0/24\n"),
        );
        let (policy, _) = Policy::build(&config, &fetched).unwrap();
        assert_eq!(
            said(&policy, "40.92.7.8", None, 25),
            "deny 40.92.7.0/24 drop-list drop"
        );
    }

    #[test]
    fn an_admins_deny_said_allow_ranks_under_the_allow_list() {
        let text = r#"interfaces = ["eth0"]
[[allow]]
name = "provider"
prefixes = ["40.92.0.0/15"]
[[deny]]
name = "soft"
precedence = "allow"
action = "drop"
prefixes = ["40.92.9.0/24", "198.18.0.0/15"]
"#;
        let (policy, _) = build(text).unwrap();
        assert_eq!(
            said(&policy, "40.92.9.1", None, 25),
            "allow 40.92.0.0/15 provider"
        );
        assert_eq!(
            said(&policy, "198.18.0.1", None, 25),
            "deny 198.18.0.0/15 soft drop"
        );
        // On an allow rule, precedence means nothing and is refused.
        let error = build(&text.replace(
            "name = \"provider\"",
            "name = \"provider\"\nprecedence = \"allow\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(error.starts_with("/etc/smtpguard/test.toml:4: "), "{error}");
        assert!(error.contains("precedence"), "{error}");
    }

    #[test]
    fn a_feed_inside_the_admins_deny_takes_its_action() {
        // Ranking entries decide for a feed: here the admin's specific deny, not the allow.
        let text = r#"interfaces = ["eth0"]
action = "reject"
[[allow]]
name = "provider"
prefixes = ["40.92.0.0/15"]
[[deny]]
name = "bad-corner"
action = "drop"
prefixes = ["40.92.8.0/22"]
[[deny]]
name = "feed"
precedence = "allow"
prefixes = ["40.92.9.0/24"]
"#;
        let (policy, _) = build(text).unwrap();
        assert_eq!(
            said(&policy, "40.92.9.1", None, 25),
            "deny 40.92.8.0/22 bad-corner drop"
        );
        assert_eq!(
            said(&policy, "40.92.12.1", None, 25),
            "allow 40.92.0.0/15 provider"
        );
    }
}

#[cfg(test)]
mod closed_tests {
    use std::path::Path;

    use super::*;
    use crate::source::fetch::Fetched;

    const SCOPED: &str = "interfaces = [\"eth0\"]\nmode = \"audit\"\n[[scope]]\nname = \"mail\"\ndestinations = [\"198.51.100.1\"]\nmode = \"enforce\"\nports = [25, 2525]\naction = \"reject\"\n[[scope.allow]]\nname = \"p\"\nprefixes = [\"192.0.2.0/28\"]\n";

    #[test]
    fn the_boot_policy_keeps_each_scope_and_drops_everything() {
        let config = Config::parse(Path::new("/etc/smtpguard/test.toml"), SCOPED).unwrap();
        let closed = Policy::closed(&config);
        assert_eq!(closed.scopes.len(), 2);
        let (default, mail) = (&closed.scopes[0], &closed.scopes[1]);
        assert!(!default.guarded, "no top-level rules: not guarded");
        assert!(mail.guarded);
        assert_eq!(
            mail.destinations,
            ["198.51.100.1/32".parse::<IpNet>().unwrap()]
        );
        assert_eq!(mail.ports, BTreeSet::from([25, 2525]));
        assert_eq!(
            (mail.mode, mail.unlisted_action),
            (Mode::Enforce, Action::Drop)
        );
        assert!(mail.entries.is_empty());
        assert!(
            closed.enforces(),
            "the scope enforces though the top level audits"
        );
        assert_eq!(closed.mode(), Mode::Enforce, "what status and metrics say");
        let audit = Config::parse(
            Path::new("/etc/smtpguard/test.toml"),
            &SCOPED.replace("mode = \"enforce\"\n", ""),
        )
        .unwrap();
        assert!(!Policy::closed(&audit).enforces(), "every scope audits");
        assert_eq!(Policy::closed(&audit).mode(), Mode::Audit);
    }

    #[test]
    fn a_group_policy_emptied_keeps_its_scopes_and_closes_everywhere_on_their_ports() {
        let config = Config::parse(Path::new("/etc/smtpguard/test.toml"), SCOPED).unwrap();
        let (policy, _) = Policy::build(&config, &Fetched::default()).unwrap();
        let emptied = policy.emptied();
        assert_eq!(emptied.scopes.len(), 2);
        assert!(emptied.scopes.iter().all(|scope| scope.entries.is_empty()));
        assert_eq!(
            emptied.scopes[1].unlisted_action,
            Action::Drop,
            "reject in the file"
        );
        assert_eq!(
            emptied.scopes[1].destinations,
            policy.scopes[1].destinations
        );
        let everywhere = policy.closed_everywhere();
        assert_eq!(everywhere.scopes.len(), 1);
        assert!(everywhere.enforces());
        assert_eq!(everywhere.scopes[0].ports, BTreeSet::from([25, 2525]));
    }

    #[test]
    fn unreadable_destinations_close_every_port_for_everyone() {
        let mut config = Config::parse(Path::new("/etc/smtpguard/test.toml"), SCOPED).unwrap();
        config.scopes[0].destinations[0].0 = "not an address".to_owned();
        let closed = Policy::closed(&config);
        assert_eq!(closed.scopes.len(), 1);
        let only = &closed.scopes[0];
        assert!(only.guarded && only.mode == Mode::Enforce);
        assert_eq!(only.ports, BTreeSet::from([25, 2525]));
    }

    #[test]
    fn the_file_holds_no_more_scopes_than_the_program() {
        let mut text = "interfaces = [\"eth0\"]\n".to_owned();
        for n in 0..255 {
            text += &format!(
                "[[scope]]\nname = \"s{n}\"\ndestinations = [\"10.{}.{}.0/24\"]\nallow_none = true\n",
                n / 256,
                n % 256
            );
        }
        Config::parse(Path::new("/etc/smtpguard/test.toml"), &text).unwrap();
        text += "[[scope]]\nname = \"one-more\"\ndestinations = [\"10.200.0.0/24\"]\nallow_none = true\n";
        let error = Config::parse(Path::new("/etc/smtpguard/test.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(error.contains("one scope too many"), "{error}");
        assert!(error.contains("\"one-more\""), "{error}");
    }
}
