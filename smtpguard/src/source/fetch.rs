//! What a configuration names but does not contain: prefix list files, host names and SPF
//! domains. This module fetches them ([`Fetched`]) so that building the policy stays a pure
//! function of the configuration and what was fetched.
//!
//! DNS answers are kept until their TTL runs out (within the configured bounds) and then asked
//! again. A failed or empty answer for a name that resolved before keeps the last good
//! addresses, and says so: a provider list never silently shrinks to nothing. So does an
//! answer whose every allow prefix the floor refuses ([`crate::source::safety`]). A name that
//! never resolved is an error, like a bad prefix.
//!
//! "Before" is what the running daemon holds, or else the last-good [`Store`]: after a reboot
//! with DNS down, a name that resolved on this host once is used from the store, marked
//! stale, and asked again every `min_refresh_secs`. A list file that cannot be read falls back
//! the same way. At start and on TTL refreshes, an answer that grows the addresses a name
//! covers past `[safety] max_growth` is held back until an explicit reload (SIGHUP).
//!
//! Lists named by URL follow the same rules: fetched at start and on SIGHUP, again every
//! `refresh_secs` (a 304 costs nothing), a failed, empty or refused fetch keeps the last good
//! content (from the running daemon or the store) and marks it stale, content whose every
//! allow prefix the floor refuses counts as empty, and growth past `max_growth` waits for
//! SIGHUP. A URL never fetched on this host is an error, like a name that never resolved.

use std::{
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::source::{
    config::{Config, ConfigError, List, Location, UrlSource, Warning},
    dns::{DnsError, Lookup},
    listfile, prefix,
    safety::{self, Reason, Refusal},
    spf::{self, SpfError},
    store::Store,
    url::{Download, Get, UrlError, Validators},
};

/// Where a prefix of the policy came from. A file's path and a URL are shared by every
/// prefix the list brings.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    /// Written in the configuration's `prefixes`.
    Literal,
    /// A line of a list file.
    File(Arc<Path>),
    /// An address the host name resolved to.
    Host(String),
    /// Part of the domain's SPF expansion.
    Spf(String),
    /// An entry of a list fetched from this URL.
    Url(Arc<str>),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Literal => f.write_str("literal"),
            Self::File(path) => write!(f, "file {}", path.display()),
            Self::Host(name) => write!(f, "host {name}"),
            Self::Spf(domain) => write!(f, "SPF of {domain}"),
            Self::Url(url) => write!(f, "URL {url}"),
        }
    }
}

/// A name the configuration asks DNS about.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Name {
    Host(String),
    Spf(String),
}

impl Name {
    pub fn origin(&self) -> Origin {
        match self {
            Self::Host(name) => Origin::Host(name.clone()),
            Self::Spf(domain) => Origin::Spf(domain.clone()),
        }
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Host(name) => write!(f, "host {name}"),
            Self::Spf(domain) => write!(f, "SPF of {domain}"),
        }
    }
}

/// What DNS last said about a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution {
    pub nets: Vec<IpNet>,
    /// When the answer was received.
    pub resolved_at: SystemTime,
    /// When to ask again.
    pub refresh_at: Instant,
    /// Set while the last attempt failed and `nets` are the last good answer.
    pub stale: Option<String>,
    /// Set while DNS gives an answer that grew past `max_growth` and `nets` are the last good
    /// answer, held in force until an explicit reload.
    pub held: Option<String>,
    /// Refreshes of this name that failed since the daemon started.
    pub failures: u64,
}

impl Resolution {
    /// A last good answer received at `resolved_at`, to be asked about again now.
    pub fn last_good(nets: Vec<IpNet>, resolved_at: SystemTime) -> Self {
        Self {
            nets,
            resolved_at,
            refresh_at: Instant::now(),
            stale: None,
            held: None,
            failures: 0,
        }
    }
}

/// What a list named by URL last gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UrlContent {
    /// Its entries, each a valid prefix, with their lines.
    pub entries: Vec<(String, Location)>,
    /// What the server said about this content, to ask whether it changed.
    pub validators: Validators,
    /// When the server last gave or confirmed (304) this content.
    pub fetched_at: SystemTime,
    /// When to fetch again.
    pub refresh_at: Instant,
    /// Set while the last fetch failed and `entries` are the last good content.
    pub stale: Option<String>,
    /// Set while the server gives content that grew past `max_growth`, held back.
    pub held: Option<String>,
    /// Fetches that failed since the daemon started.
    pub failures: u64,
}

impl UrlContent {
    /// Last good content fetched at `fetched_at`, to be fetched again now.
    pub fn last_good(
        entries: Vec<(String, Location)>,
        validators: Validators,
        fetched_at: SystemTime,
    ) -> Self {
        Self {
            entries,
            validators,
            fetched_at,
            refresh_at: Instant::now(),
            stale: None,
            held: None,
            failures: 0,
        }
    }

    /// The prefixes of the entries (each was checked when fetched).
    pub fn nets(&self) -> Vec<IpNet> {
        self.entries
            .iter()
            .filter_map(|(text, _)| prefix::parse(text).ok().map(|parsed| parsed.net))
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{at}: {name} gave no prefixes")]
    Empty { at: Location, name: String },
    #[error(
        "{at}: {name} gave no prefix the allow list may take: {} refused by the floor ([safety] min_prefix_v4, min_prefix_v6)",
        join(nets)
    )]
    AllRefused {
        at: Location,
        name: String,
        nets: Vec<IpNet>,
    },
    #[error(transparent)]
    File(#[from] ConfigError),
    #[error("{at}: cannot fetch: {source}")]
    Url {
        at: Location,
        #[source]
        source: Box<UrlError>,
    },
    #[error(
        "{at}: {url} gave no prefix the allow list may take: {} refused by the floor ([safety] min_prefix_v4, min_prefix_v6)",
        join(nets)
    )]
    UrlAllRefused {
        at: Location,
        url: String,
        nets: Vec<IpNet>,
    },
    #[error("{at}: cannot resolve host {name}: {source}")]
    Host {
        at: Location,
        name: String,
        #[source]
        source: DnsError,
    },
    #[error("{at}: cannot expand SPF of {domain}: {source}")]
    Spf {
        at: Location,
        domain: String,
        #[source]
        source: Box<SpfError>,
    },
}

fn join(nets: &[IpNet]) -> String {
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Everything fetched for one configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fetched {
    /// Each list file's entries, as written, with their lines.
    pub files: BTreeMap<PathBuf, Vec<(String, Location)>>,
    /// List files that could not be read, whose last good entries are in `files`, and why.
    pub stale_files: BTreeMap<PathBuf, String>,
    pub names: BTreeMap<Name, Resolution>,
    /// Each list named by URL, by URL.
    pub urls: BTreeMap<String, UrlContent>,
}

impl Fetched {
    /// When the next name or URL is due to be asked again.
    pub fn next_refresh(&self) -> Option<Instant> {
        self.names
            .values()
            .map(|resolution| resolution.refresh_at)
            .chain(self.urls.values().map(|content| content.refresh_at))
            .min()
    }

    /// The prefixes of `name`, if it was fetched.
    pub fn nets(&self, name: &Name) -> Option<&[IpNet]> {
        self.names
            .get(name)
            .map(|resolution| resolution.nets.as_slice())
    }

    /// The names and files whose last good answer stands in for a fresh one.
    pub fn not_current(&self) -> Vec<SourceNote> {
        let names = self.names.iter().filter_map(|(name, resolution)| {
            let (status, detail) = match (&resolution.stale, &resolution.held) {
                (Some(detail), _) => (SourceStatus::Stale, detail),
                (None, Some(detail)) => (SourceStatus::HeldBack, detail),
                (None, None) => return None,
            };
            Some(SourceNote {
                source: name.to_string(),
                status,
                detail: detail.clone(),
            })
        });
        let files = self.stale_files.iter().map(|(path, detail)| SourceNote {
            source: Origin::File(path.as_path().into()).to_string(),
            status: SourceStatus::Stale,
            detail: detail.clone(),
        });
        let urls = self.urls.iter().filter_map(|(url, content)| {
            let (status, detail) = match (&content.stale, &content.held) {
                (Some(detail), _) => (SourceStatus::Stale, detail),
                (None, Some(detail)) => (SourceStatus::HeldBack, detail),
                (None, None) => return None,
            };
            Some(SourceNote {
                source: Origin::Url(url.as_str().into()).to_string(),
                status,
                detail: detail.clone(),
            })
        });
        names.chain(files).chain(urls).collect()
    }
}

/// Whether `a` and `b` have the same sources stale or held back (whatever the details say).
pub fn same_status(a: &Fetched, b: &Fetched) -> bool {
    let key = |fetched: &Fetched| -> Vec<(String, SourceStatus)> {
        fetched
            .not_current()
            .into_iter()
            .map(|note| (note.source, note.status))
            .collect()
    };
    key(a) == key(b)
}

/// A source whose last good answer is in force instead of a fresh one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceNote {
    /// `host NAME`, `SPF of DOMAIN`, `file PATH` or `URL URL`.
    pub source: String,
    pub status: SourceStatus,
    /// What the log said about it.
    pub detail: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceStatus {
    /// It cannot be resolved or read: its last good answer is used.
    Stale,
    /// DNS answers with more than `max_growth` allows: its last good answer is used until an
    /// explicit reload.
    HeldBack,
}

impl fmt::Display for SourceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Stale => "stale",
            Self::HeldBack => "held back",
        })
    }
}

/// What fetching has to say beside the answers.
#[derive(Clone, Debug, Default)]
pub struct Notes {
    pub warnings: Vec<Warning>,
    /// Allow prefixes of answers set aside because the floor refused all of them. (Those of
    /// answers in force are the policy's to report: [`crate::policy::Policy::refused`].)
    pub refused: Vec<Refusal>,
    /// Each fetch of a URL, with its result (`ok`, `not_modified`, `error`, `invalid`), for
    /// the metrics.
    pub fetches: Vec<(String, &'static str)>,
}

/// What was fetched before, to fall back on and to measure growth against.
pub struct Previous<'a> {
    /// What the running daemon holds; empty at start.
    pub fetched: &'a Fetched,
    /// The last-good store, for what `fetched` does not hold.
    pub store: Option<&'a Store>,
    /// Whether an answer that grows a name past `max_growth` is held back (start, `check`)
    /// or taken (an explicit reload).
    pub hold_growth: bool,
}

impl Previous<'_> {
    /// Nothing before, nothing held back: what `check` does without a store.
    pub fn none() -> Previous<'static> {
        static EMPTY: std::sync::OnceLock<Fetched> = std::sync::OnceLock::new();
        Previous {
            fetched: EMPTY.get_or_init(Fetched::default),
            store: None,
            hold_growth: false,
        }
    }

    fn name(&self, name: &Name) -> Option<Resolution> {
        self.fetched
            .names
            .get(name)
            .cloned()
            .or_else(|| self.store?.name(name))
    }

    fn url(&self, url: &str, warnings: &mut Vec<Warning>, at: &Location) -> Option<UrlContent> {
        if let Some(content) = self.fetched.urls.get(url) {
            return Some(content.clone());
        }
        match self.store?.url(url) {
            Ok(content) => content,
            Err(error) => {
                warnings.push(Warning {
                    at: at.clone(),
                    message: error.to_string(),
                });
                None
            }
        }
    }

    fn file(
        &self,
        path: &Path,
        warnings: &mut Vec<Warning>,
        at: &Location,
    ) -> Option<Vec<(String, Location)>> {
        if let Some(entries) = self.fetched.files.get(path) {
            return Some(entries.clone());
        }
        match self.store?.file(path) {
            Ok(entries) => entries,
            Err(error) => {
                warnings.push(Warning {
                    at: at.clone(),
                    message: error.to_string(),
                });
                None
            }
        }
    }
}

/// Every name the configuration asks about, with where it is written (first mention).
pub fn names(config: &Config) -> BTreeMap<Name, Location> {
    let mut names = BTreeMap::new();
    for (_, spec) in config.all_rules() {
        for (host, at) in &spec.hosts {
            names
                .entry(Name::Host(normalise(host)))
                .or_insert_with(|| at.clone());
        }
        for (domain, at) in &spec.spf {
            names
                .entry(Name::Spf(normalise(domain)))
                .or_insert_with(|| at.clone());
        }
    }
    names
}

/// The allow rules that name each name: the floor and the growth guard apply to these.
fn allow_rules(config: &Config) -> BTreeMap<Name, Vec<String>> {
    let mut rules: BTreeMap<Name, Vec<String>> = BTreeMap::new();
    for (_, spec) in config.all_rules().filter(|(list, _)| *list == List::Allow) {
        let hosts = spec
            .hosts
            .iter()
            .map(|(host, _)| Name::Host(normalise(host)));
        let domains = spec
            .spf
            .iter()
            .map(|(domain, _)| Name::Spf(normalise(domain)));
        for name in hosts.chain(domains) {
            let names = rules.entry(name).or_default();
            if !names.contains(&spec.name) {
                names.push(spec.name.clone());
            }
        }
    }
    rules
}

/// Every list the configuration names by URL, the top level's and every scope's (first
/// mention; the shortest refresh of the rules naming it).
pub fn urls(config: &Config) -> BTreeMap<String, UrlSource> {
    let mut urls: BTreeMap<String, UrlSource> = BTreeMap::new();
    for (_, spec) in config.all_rules() {
        for source in &spec.urls {
            urls.entry(source.url.clone())
                .and_modify(|first| first.refresh = first.refresh.min(source.refresh))
                .or_insert_with(|| source.clone());
        }
    }
    urls
}

/// The allow rules (of any scope) that name each URL: the floor and the growth guard apply
/// to these.
fn allow_url_rules(config: &Config) -> BTreeMap<String, Vec<String>> {
    let mut rules: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let allow = config
        .all_rules()
        .filter_map(|(list, spec)| (list == List::Allow).then_some(spec));
    for spec in allow {
        for source in &spec.urls {
            let names = rules.entry(source.url.clone()).or_default();
            if !names.contains(&spec.name) {
                names.push(spec.name.clone());
            }
        }
    }
    rules
}

/// The form names are compared and stored in.
pub fn normalise(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// Reads every list file the configuration names.
pub fn read_files(
    config: &Config,
) -> Result<BTreeMap<PathBuf, Vec<(String, Location)>>, ConfigError> {
    let mut files = BTreeMap::new();
    for (_, spec) in config.all_rules() {
        for (path, _) in &spec.files {
            if !files.contains_key(path) {
                files.insert(path.clone(), listfile::read(path)?);
            }
        }
    }
    Ok(files)
}

/// Reads every list file the configuration names; one that cannot be read (missing, not
/// permitted) but was read before is used as it was, marked stale. What a file that can be
/// read says is never replaced: a bad line, a FIFO or a huge file is refused.
fn read_files_or_last_good(
    config: &Config,
    previous: &Previous<'_>,
    fetched: &mut Fetched,
    warnings: &mut Vec<Warning>,
) -> Result<(), ConfigError> {
    for (_, spec) in config.all_rules() {
        for (path, at) in &spec.files {
            if fetched.files.contains_key(path) {
                continue;
            }
            let entries = match listfile::read(path) {
                Ok(entries) => entries,
                Err(ConfigError::Read { path, source }) => {
                    let Some(entries) = previous.file(&path, warnings, at) else {
                        return Err(ConfigError::Read { path, source });
                    };
                    let message = format!(
                        "cannot read {}: {source}; using its last good {} entries (stale) until it can be read (SIGHUP reads it again)",
                        path.display(),
                        entries.len()
                    );
                    warnings.push(Warning {
                        at: at.clone(),
                        message: message.clone(),
                    });
                    fetched.stale_files.insert(path.clone(), message);
                    entries
                }
                Err(error) => return Err(error),
            };
            fetched.files.insert(path.clone(), entries);
        }
    }
    Ok(())
}

/// Reads the files and resolves every name of `config`. Where a file or a name fails but
/// `previous` holds it, that is kept (with a warning).
pub async fn fetch(
    config: &Config,
    dns: &impl Lookup,
    web: &impl Get,
    previous: &Previous<'_>,
) -> Result<(Fetched, Notes), FetchError> {
    let mut fetched = Fetched::default();
    let mut notes = Notes::default();
    read_files_or_last_good(config, previous, &mut fetched, &mut notes.warnings)?;
    let names = names(config);
    let urls = urls(config);
    let progress = crate::progress::Progress::start(
        format!(
            "resolving {} names and fetching {} URLs",
            names.len(),
            urls.len()
        ),
        names.len() + urls.len(),
    );
    let url_rules = allow_url_rules(config);
    for (url, source) in &urls {
        progress.now(&format!("URL {url}"));
        let pull = Pull {
            source,
            config,
            allow_rules: url_rules.get(url).map(Vec::as_slice).unwrap_or_default(),
            hold_growth: previous.hold_growth,
        };
        let last = previous.url(url, &mut notes.warnings, &source.at);
        let content = pull.refresh(web, last.as_ref(), &mut notes).await?;
        fetched.urls.insert(url.clone(), content);
        progress.step("");
    }
    let rules = allow_rules(config);
    for (name, at) in names {
        progress.now(&name.to_string());
        let last = previous.name(&name);
        let ask = Ask {
            name: &name,
            at: &at,
            config,
            allow_rules: rules.get(&name).map(Vec::as_slice).unwrap_or_default(),
            hold_growth: previous.hold_growth,
        };
        let resolution = ask.refresh(dns, last.as_ref(), &mut notes).await?;
        fetched.names.insert(name, resolution);
        progress.step("");
    }
    Ok((fetched, notes))
}

/// Asks again about the names of `fetched` that are due at `now`. Returns whether any
/// name's prefixes changed. Failures keep the last good answer; growth past `max_growth`
/// is held back.
pub async fn refresh_due(
    config: &Config,
    dns: &impl Lookup,
    web: &impl Get,
    fetched: &mut Fetched,
    now: Instant,
) -> (bool, Notes) {
    let mut notes = Notes::default();
    let mut changed = false;
    let url_rules = allow_url_rules(config);
    for (url, source) in urls(config) {
        let Some(old) = fetched.urls.get(&url) else {
            continue;
        };
        if old.refresh_at > now {
            continue;
        }
        let pull = Pull {
            source: &source,
            config,
            allow_rules: url_rules.get(&url).map(Vec::as_slice).unwrap_or_default(),
            hold_growth: true,
        };
        // With previous content, refresh never fails: it keeps that content.
        if let Ok(new) = pull.refresh(web, Some(old), &mut notes).await {
            changed |= new.entries != old.entries;
            fetched.urls.insert(url, new);
        }
    }
    let rules = allow_rules(config);
    for (name, at) in names(config) {
        let Some(old) = fetched.names.get(&name) else {
            continue;
        };
        if old.refresh_at > now {
            continue;
        }
        let ask = Ask {
            name: &name,
            at: &at,
            config,
            allow_rules: rules.get(&name).map(Vec::as_slice).unwrap_or_default(),
            hold_growth: true,
        };
        // With a previous answer, refresh never fails: it keeps that answer.
        if let Ok(new) = ask.refresh(dns, Some(old), &mut notes).await {
            changed |= new.nets != old.nets;
            fetched.names.insert(name, new);
        }
    }
    (changed, notes)
}

/// One list to fetch by URL, and what applies to its content.
struct Pull<'a> {
    source: &'a UrlSource,
    config: &'a Config,
    /// The allow rules naming it: its content is floored and growth-checked for them.
    allow_rules: &'a [String],
    hold_growth: bool,
}

impl Pull<'_> {
    async fn refresh(
        &self,
        web: &impl Get,
        previous: Option<&UrlContent>,
        notes: &mut Notes,
    ) -> Result<UrlContent, FetchError> {
        let url = &self.source.url;
        let validators = previous.map(|content| content.validators.clone());
        let answer = web.get(url, &validators.unwrap_or_default()).await;
        let now = Instant::now();
        let next = now + self.source.refresh;
        let outcome = match answer {
            Ok(Download::NotModified) => match previous {
                Some(previous) => {
                    notes.fetches.push((url.clone(), "not_modified"));
                    return Ok(UrlContent {
                        fetched_at: SystemTime::now(),
                        refresh_at: next,
                        stale: None,
                        held: None,
                        ..previous.clone()
                    });
                }
                None => Err(FetchError::Url {
                    at: self.source.at.clone(),
                    source: Box::new(UrlError::Status {
                        url: url.clone(),
                        status: 304,
                    }),
                }),
            },
            Ok(Download::Body { text, validators }) => {
                crate::source::url::parse(url, &text, self.source.json_key.as_deref())
                    .map_err(|source| FetchError::Url {
                        at: self.source.at.clone(),
                        source: Box::new(source),
                    })
                    .and_then(|entries| self.admissible(entries, &mut notes.refused))
                    .map(|entries| (entries, validators))
            }
            Err(source) => Err(FetchError::Url {
                at: self.source.at.clone(),
                source: Box::new(source),
            }),
        };
        let result = match &outcome {
            Ok(_) => "ok",
            Err(FetchError::Url { source, .. }) => source.result(),
            Err(_) => "invalid",
        };
        notes.fetches.push((url.clone(), result));
        match (outcome, previous) {
            (Ok((entries, validators)), _) => {
                if let Some(previous) = previous
                    && let Some(message) = self.held_back(previous, &entries)
                {
                    notes.warnings.push(Warning {
                        at: self.source.at.clone(),
                        message: message.clone(),
                    });
                    return Ok(UrlContent {
                        refresh_at: next,
                        stale: None,
                        held: Some(message),
                        ..previous.clone()
                    });
                }
                Ok(UrlContent {
                    entries,
                    validators,
                    fetched_at: SystemTime::now(),
                    refresh_at: next,
                    stale: None,
                    held: None,
                    failures: previous.map_or(0, |previous| previous.failures),
                })
            }
            (Err(error), Some(previous)) => {
                let reason = std::error::Error::source(&error)
                    .map_or_else(|| error.to_string(), ToString::to_string);
                let retry = self.config.urls.min_refresh.min(self.source.refresh);
                let message = format!(
                    "cannot refresh URL {url}: {reason}; keeping its last good {} entries (stale: fetched {}), retrying in {}s",
                    previous.entries.len(),
                    humantime::format_rfc3339_seconds(previous.fetched_at),
                    retry.as_secs()
                );
                notes.warnings.push(Warning {
                    at: self.source.at.clone(),
                    message: message.clone(),
                });
                Ok(UrlContent {
                    refresh_at: now + retry,
                    stale: Some(message),
                    held: None,
                    failures: previous.failures + 1,
                    ..previous.clone()
                })
            }
            (Err(error), None) => Err(error),
        }
    }

    /// `entries`, unless none of them is a prefix the floor lets onto the allow list (then
    /// the content is as good as empty, and its prefixes are recorded in `refused`).
    fn admissible(
        &self,
        entries: Vec<(String, Location)>,
        refused: &mut Vec<Refusal>,
    ) -> Result<Vec<(String, Location)>, FetchError> {
        let safety = &self.config.safety;
        let parsed: Vec<(IpNet, &Location)> = entries
            .iter()
            .filter_map(|(text, at)| prefix::parse(text).ok().map(|parsed| (parsed.net, at)))
            .collect();
        if self.allow_rules.is_empty()
            || parsed
                .iter()
                .any(|(net, _)| safety::below_floor(net, safety).is_none())
        {
            return Ok(entries);
        }
        for rule in self.allow_rules {
            refused.extend(parsed.iter().filter_map(|(net, at)| {
                let floor = safety::below_floor(net, safety)?;
                Some(Refusal {
                    net: *net,
                    rule: rule.clone(),
                    origin: Origin::Url(self.source.url.as_str().into()),
                    at: (*at).clone(),
                    reason: Reason::Floor { floor },
                })
            }));
        }
        Err(FetchError::UrlAllRefused {
            at: self.source.at.clone(),
            url: self.source.url.clone(),
            nets: parsed.into_iter().map(|(net, _)| net).collect(),
        })
    }

    /// Why new content is held back, if it grows what the list allows past `max_growth`.
    fn held_back(&self, old: &UrlContent, new: &[(String, Location)]) -> Option<String> {
        if !self.hold_growth || self.allow_rules.is_empty() || old.entries == new {
            return None;
        }
        let safety = &self.config.safety;
        let allowed = |entries: &[(String, Location)]| -> Vec<IpNet> {
            entries
                .iter()
                .filter_map(|(text, _)| prefix::parse(text).ok().map(|parsed| parsed.net))
                .filter(|net| safety::below_floor(net, safety).is_none())
                .collect()
        };
        let growth = safety::growth(&allowed(&old.entries), &allowed(new), safety.max_growth)?;
        Some(format!(
            "URL {}: new content held back: {growth}; the last good {} entries stay in force. If the change is expected, accept it with `systemctl reload smtpguard` (SIGHUP)",
            self.source.url,
            old.entries.len()
        ))
    }
}

/// One name to ask DNS about, and what applies to its answer.
struct Ask<'a> {
    name: &'a Name,
    /// The configuration line that first names it.
    at: &'a Location,
    config: &'a Config,
    /// The allow rules naming it: its answers are floored and growth-checked for them.
    allow_rules: &'a [String],
    hold_growth: bool,
}

impl Ask<'_> {
    async fn refresh(
        &self,
        dns: &impl Lookup,
        previous: Option<&Resolution>,
        notes: &mut Notes,
    ) -> Result<Resolution, FetchError> {
        let settings = &self.config.dns;
        let answer = match self.query(dns).await {
            Ok((nets, ttl, texts)) => {
                for text in texts {
                    notes.warnings.push(Warning {
                        at: self.at.clone(),
                        message: text,
                    });
                }
                self.admissible(nets, &mut notes.refused)
                    .map(|nets| (nets, ttl))
            }
            Err(error) => Err(error),
        };
        match (answer, previous) {
            (Ok((nets, ttl)), _) => {
                let interval = ttl
                    .unwrap_or(settings.min_refresh)
                    .clamp(settings.min_refresh, settings.max_refresh);
                if let Some(previous) = previous
                    && let Some(message) = self.held_back(&previous.nets, &nets)
                {
                    notes.warnings.push(Warning {
                        at: self.at.clone(),
                        message: message.clone(),
                    });
                    return Ok(Resolution {
                        refresh_at: Instant::now() + interval,
                        stale: None,
                        held: Some(message),
                        ..previous.clone()
                    });
                }
                Ok(Resolution {
                    nets,
                    resolved_at: SystemTime::now(),
                    refresh_at: Instant::now() + interval,
                    stale: None,
                    held: None,
                    failures: previous.map_or(0, |previous| previous.failures),
                })
            }
            (Err(error), Some(previous)) => {
                let name = self.name;
                let reason = std::error::Error::source(&error)
                    .map_or_else(|| error.to_string(), ToString::to_string);
                let message = format!(
                    "cannot refresh {name}: {reason}; keeping the last good {} prefixes of {name} (stale: resolved {}), retrying in {}s",
                    previous.nets.len(),
                    humantime::format_rfc3339_seconds(previous.resolved_at),
                    settings.min_refresh.as_secs()
                );
                notes.warnings.push(Warning {
                    at: self.at.clone(),
                    message: message.clone(),
                });
                Ok(Resolution {
                    nets: previous.nets.clone(),
                    resolved_at: previous.resolved_at,
                    refresh_at: Instant::now() + settings.min_refresh,
                    stale: Some(message),
                    held: None,
                    failures: previous.failures + 1,
                })
            }
            (Err(error), None) => Err(error),
        }
    }

    /// The answer's prefixes, IPv4-mapped ones made IPv4, with what to note about them.
    async fn query(
        &self,
        dns: &impl Lookup,
    ) -> Result<(Vec<IpNet>, Option<Duration>, Vec<String>), FetchError> {
        match self.name {
            Name::Host(host) => {
                let answer = dns
                    .addresses(host)
                    .await
                    .map_err(|source| FetchError::Host {
                        at: self.at.clone(),
                        name: host.clone(),
                        source,
                    })?;
                let mut texts = Vec::new();
                let mut nets: Vec<IpNet> = answer
                    .records
                    .iter()
                    .map(|&address| {
                        let mapped = match address {
                            IpAddr::V6(v6) => v6.to_ipv4_mapped(),
                            IpAddr::V4(_) => None,
                        };
                        let Some(v4) = mapped else {
                            return IpNet::from(address);
                        };
                        let net = IpNet::from(IpAddr::V4(v4));
                        texts.push(format!(
                            "host {host}: AAAA record {address} is an IPv4-mapped address; using the IPv4 prefix {net}"
                        ));
                        net
                    })
                    .collect();
                nets.sort();
                nets.dedup();
                Ok((nets, Some(answer.ttl), texts))
            }
            Name::Spf(domain) => spf::expand(dns, domain)
                .await
                .map(|expansion| (expansion.nets, expansion.ttl, expansion.notes))
                .map_err(|source| FetchError::Spf {
                    at: self.at.clone(),
                    domain: domain.clone(),
                    source: Box::new(source),
                }),
        }
    }

    /// `nets`, unless there are none, or none the floor lets onto the allow list (then the
    /// answer is as good as empty, and its prefixes are recorded in `refused`).
    fn admissible(
        &self,
        nets: Vec<IpNet>,
        refused: &mut Vec<Refusal>,
    ) -> Result<Vec<IpNet>, FetchError> {
        if nets.is_empty() {
            return Err(FetchError::Empty {
                at: self.at.clone(),
                name: self.name.to_string(),
            });
        }
        if self.allow_rules.is_empty()
            || nets
                .iter()
                .any(|net| safety::below_floor(net, &self.config.safety).is_none())
        {
            return Ok(nets);
        }
        for rule in self.allow_rules {
            refused.extend(nets.iter().filter_map(|net| {
                let floor = safety::below_floor(net, &self.config.safety)?;
                Some(Refusal {
                    net: *net,
                    rule: rule.clone(),
                    origin: self.name.origin(),
                    at: self.at.clone(),
                    reason: Reason::Floor { floor },
                })
            }));
        }
        Err(FetchError::AllRefused {
            at: self.at.clone(),
            name: self.name.to_string(),
            nets,
        })
    }

    /// Why a new answer is held back, if it grows what the name allows past `max_growth`.
    fn held_back(&self, old: &[IpNet], new: &[IpNet]) -> Option<String> {
        if !self.hold_growth || self.allow_rules.is_empty() || old == new {
            return None;
        }
        let safety = &self.config.safety;
        let allowed = |nets: &[IpNet]| -> Vec<IpNet> {
            nets.iter()
                .copied()
                .filter(|net| safety::below_floor(net, safety).is_none())
                .collect()
        };
        let growth = safety::growth(&allowed(old), &allowed(new), safety.max_growth)?;
        Some(format!(
            "{}: new answer held back: {growth}; the last good {} prefixes stay in force. If the change is expected, accept it with `systemctl reload smtpguard` (SIGHUP)",
            self.name,
            old.len()
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, path::Path, time::Duration};

    use super::*;
    use crate::source::{dns::Answer, url::Validators};

    /// No list can be fetched.
    struct Offline;

    impl Get for Offline {
        async fn get(&self, url: &str, _: &Validators) -> Result<Download, UrlError> {
            Err(UrlError::Status {
                url: url.to_owned(),
                status: 503,
            })
        }
    }

    /// A web server in memory: each URL's body, its ETag a hash of the body; 304 when the
    /// client holds that ETag; everything fails while `down`.
    #[derive(Default)]
    struct Server {
        bodies: std::cell::RefCell<HashMap<String, String>>,
        down: std::cell::Cell<bool>,
    }

    impl Server {
        fn serve(&self, url: &str, body: &str) {
            self.bodies
                .borrow_mut()
                .insert(url.to_owned(), body.to_owned());
        }
    }

    impl Get for Server {
        async fn get(&self, url: &str, validators: &Validators) -> Result<Download, UrlError> {
            let body = self
                .bodies
                .borrow()
                .get(url)
                .filter(|_| !self.down.get())
                .cloned()
                .ok_or_else(|| UrlError::Status {
                    url: url.to_owned(),
                    status: 503,
                })?;
            let hash = body.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
                (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
            });
            let etag = format!("\"{hash:x}\"");
            if validators.etag.as_deref() == Some(etag.as_str()) {
                return Ok(Download::NotModified);
            }
            Ok(Download::Body {
                text: body,
                validators: Validators {
                    etag: Some(etag),
                    last_modified: None,
                },
            })
        }
    }

    /// Names and their answers, in memory; a name not listed fails as if DNS were down.
    #[derive(Default)]
    struct Zone {
        txt: HashMap<&'static str, &'static str>,
        addresses: HashMap<&'static str, Vec<&'static str>>,
    }

    fn down(name: &str) -> DnsError {
        DnsError::NoRecords {
            name: name.to_owned(),
            what: "test",
        }
    }

    impl Lookup for Zone {
        async fn addresses(&self, name: &str) -> Result<Answer<IpAddr>, DnsError> {
            let records = self.addresses.get(name).ok_or_else(|| down(name))?;
            Ok(Answer {
                records: records.iter().map(|a| a.parse().unwrap()).collect(),
                ttl: Duration::from_secs(300),
            })
        }
        async fn txt(&self, name: &str) -> Result<Answer<String>, DnsError> {
            let record = self.txt.get(name).ok_or_else(|| down(name))?;
            Ok(Answer {
                records: vec![(*record).to_owned()],
                ttl: Duration::from_secs(300),
            })
        }
        async fn mx(&self, name: &str) -> Result<Answer<String>, DnsError> {
            Err(down(name))
        }
    }

    fn run<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(future)
    }

    fn config(text: &str) -> Config {
        Config::parse(
            Path::new("/etc/smtpguard/smtpguard.toml"),
            &format!("interfaces = [\"eth0\"]\n{text}"),
        )
        .unwrap()
    }

    const PROVIDER: &str = "[[allow]]\nname = \"provider\"\nspf = [\"provider.test\"]\n";

    fn spf() -> Name {
        Name::Spf("provider.test".into())
    }

    fn nets(fetched: &Fetched, name: &Name) -> Vec<String> {
        fetched
            .nets(name)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    /// What a daemon holds after resolving `provider.test` to `nets`.
    fn holding(nets: &[&str]) -> Fetched {
        let mut fetched = Fetched::default();
        fetched.names.insert(
            spf(),
            Resolution::last_good(
                nets.iter().map(|net| net.parse().unwrap()).collect(),
                SystemTime::now(),
            ),
        );
        fetched
    }

    fn previous(fetched: &Fetched, hold_growth: bool) -> Previous<'_> {
        Previous {
            fetched,
            store: None,
            hold_growth,
        }
    }

    #[test]
    fn an_answer_the_floor_empties_is_refused_at_first_and_set_aside_later() {
        let config = config(PROVIDER);
        let mut zone = Zone::default();
        zone.txt
            .insert("provider.test", "v=spf1 ip4:0.0.0.0/0 -all");
        let error = run(fetch(&config, &zone, &Offline, &Previous::none())).unwrap_err();
        assert_eq!(
            error.to_string(),
            "/etc/smtpguard/smtpguard.toml:4: SPF of provider.test gave no prefix the allow list may take: 0.0.0.0/0 refused by the floor ([safety] min_prefix_v4, min_prefix_v6)"
        );

        // A name that resolved before keeps its last good answer, marked stale.
        let before = holding(&["192.0.2.0/24"]);
        let (fetched, notes) =
            run(fetch(&config, &zone, &Offline, &previous(&before, false))).unwrap();
        assert_eq!(nets(&fetched, &spf()), ["192.0.2.0/24"]);
        let resolution = &fetched.names[&spf()];
        assert!(
            resolution
                .stale
                .as_ref()
                .unwrap()
                .contains("keeping the last good 1 prefixes")
        );
        assert_eq!(notes.refused.len(), 1);
        assert_eq!(
            (
                notes.refused[0].net.to_string(),
                notes.refused[0].rule.as_str()
            ),
            ("0.0.0.0/0".to_owned(), "provider")
        );
        assert_eq!(fetched.not_current()[0].status, SourceStatus::Stale);

        // Same on a TTL refresh.
        let mut refreshed = before.clone();
        let far = Instant::now() + Duration::from_secs(3600);
        let (changed, notes) = run(refresh_due(&config, &zone, &Offline, &mut refreshed, far));
        assert!(!changed);
        assert_eq!(nets(&refreshed, &spf()), ["192.0.2.0/24"]);
        assert_eq!(notes.refused.len(), 1);

        // One prefix the floor lets through is enough: the rest is the policy's to refuse.
        zone.txt.insert(
            "provider.test",
            "v=spf1 ip4:0.0.0.0/0 ip4:192.0.2.32/28 -all",
        );
        let (fetched, notes) = run(fetch(&config, &zone, &Offline, &Previous::none())).unwrap();
        assert_eq!(nets(&fetched, &spf()), ["0.0.0.0/0", "192.0.2.32/28"]);
        assert!(notes.refused.is_empty());

        // On the deny list nothing is floored.
        let deny = self::config(
            "[[allow]]\nname = \"lan\"\nprefixes = [\"192.0.2.0/24\"]\n[[deny]]\nname = \"d\"\nspf = [\"provider.test\"]\n",
        );
        zone.txt
            .insert("provider.test", "v=spf1 ip4:0.0.0.0/0 -all");
        let (fetched, _) = run(fetch(&deny, &zone, &Offline, &Previous::none())).unwrap();
        assert_eq!(nets(&fetched, &spf()), ["0.0.0.0/0"]);
    }

    #[test]
    fn growth_is_held_back_on_refresh_and_at_start_but_taken_on_reload() {
        let config = config(PROVIDER);
        let mut zone = Zone::default();
        zone.txt
            .insert("provider.test", "v=spf1 ip4:10.0.0.0/20 -all");
        let before = holding(&["10.0.0.0/24"]);
        let far = Instant::now() + Duration::from_secs(3600);

        let mut refreshed = before.clone();
        let (changed, notes) = run(refresh_due(&config, &zone, &Offline, &mut refreshed, far));
        assert!(!changed, "held back: nothing to apply");
        assert_eq!(nets(&refreshed, &spf()), ["10.0.0.0/24"]);
        let held = refreshed.names[&spf()].held.clone().expect("held back");
        assert_eq!(
            held,
            "SPF of provider.test: new answer held back: it covers 4096 (a /20) IPv4 addresses, up from 256 (a /24): more than max_growth 4 times 256 (a /24); the last good 1 prefixes stay in force. If the change is expected, accept it with `systemctl reload smtpguard` (SIGHUP)"
        );
        assert_eq!(notes.warnings[0].message, held);
        assert!(
            refreshed.names[&spf()].refresh_at > Instant::now(),
            "asked again at its TTL"
        );
        let noted = refreshed.not_current();
        assert_eq!(
            (noted[0].source.as_str(), noted[0].status),
            ("SPF of provider.test", SourceStatus::HeldBack)
        );
        assert!(!same_status(&before, &refreshed));

        // A start measures against the store the same way (here: what `previous` holds).
        let (fetched, _) = run(fetch(&config, &zone, &Offline, &previous(&before, true))).unwrap();
        assert_eq!(nets(&fetched, &spf()), ["10.0.0.0/24"]);
        // An explicit reload takes the new answer.
        let (fetched, _) = run(fetch(&config, &zone, &Offline, &previous(&before, false))).unwrap();
        assert_eq!(nets(&fetched, &spf()), ["10.0.0.0/20"]);
        assert!(fetched.not_current().is_empty());

        // Growth within max_growth of at least a /24 is taken.
        zone.txt
            .insert("provider.test", "v=spf1 ip4:10.0.0.0/22 -all");
        let mut refreshed = before.clone();
        let (changed, _) = run(refresh_due(&config, &zone, &Offline, &mut refreshed, far));
        assert!(changed);
        assert_eq!(nets(&refreshed, &spf()), ["10.0.0.0/22"]);
    }

    #[test]
    fn the_store_stands_in_for_names_and_files_that_cannot_be_had() {
        let dir = std::env::temp_dir().join(format!("sg-fetch-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let list = dir.join("provider.txt");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&list, "# provider\n198.51.100.0/24\n").unwrap();
        let config = config(&format!(
            "{PROVIDER}hosts = [\"relay.provider.test\"]\nfiles = [\"{}\"]\n",
            list.display()
        ));
        let mut zone = Zone::default();
        zone.txt
            .insert("provider.test", "v=spf1 ip4:192.0.2.0/24 -all");
        zone.addresses.insert(
            "relay.provider.test",
            vec!["203.0.113.25", "::ffff:203.0.113.26"],
        );
        let (fetched, notes) = run(fetch(&config, &zone, &Offline, &Previous::none())).unwrap();
        let relay = Name::Host("relay.provider.test".into());
        assert_eq!(
            nets(&fetched, &relay),
            ["203.0.113.25/32", "203.0.113.26/32"]
        );
        assert!(
            notes.warnings.iter().any(|warning| warning
                .message
                .contains("AAAA record ::ffff:203.0.113.26 is an IPv4-mapped address")),
            "{:?}",
            notes.warnings
        );
        let (mut store, problem) = Store::open(&dir.join("store"));
        assert!(problem.is_none());
        store.save(&fetched).unwrap();

        // A reboot: DNS is down and the list file is gone.
        std::fs::remove_file(&list).unwrap();
        let dead = Zone::default();
        let error = run(fetch(&config, &dead, &Offline, &Previous::none())).unwrap_err();
        assert!(
            error.to_string().contains("provider.txt: cannot read"),
            "{error}"
        );
        let (store, _) = Store::read_only(&dir.join("store"));
        let from_store = Previous {
            fetched: &Fetched::default(),
            store: Some(&store),
            hold_growth: true,
        };
        let (again, notes) = run(fetch(&config, &dead, &Offline, &from_store)).unwrap();
        assert_eq!(
            again.files, fetched.files,
            "the stored entries, with their lines"
        );
        assert_eq!(nets(&again, &relay), nets(&fetched, &relay));
        assert_eq!(nets(&again, &spf()), ["192.0.2.0/24"]);
        let noted = again.not_current();
        assert_eq!(noted.len(), 3, "{noted:?}");
        assert!(noted.iter().all(|note| note.status == SourceStatus::Stale));
        assert!(
            noted
                .iter()
                .any(|note| note.source == format!("file {}", list.display())),
            "{noted:?}"
        );
        assert!(
            notes
                .warnings
                .iter()
                .any(|warning| warning.message.contains("(stale: resolved ")),
            "{:?}",
            notes.warnings
        );

        // A name that never resolved here still refuses.
        let more = self::config(&format!("{PROVIDER}hosts = [\"new.provider.test\"]\n"));
        let error = run(fetch(&more, &dead, &Offline, &from_store))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("cannot resolve host new.provider.test"),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    const LISTS: &str = "[[allow]]\nname = \"provider\"\nurls = [\"https://lists.test/provider.txt\"]\nrefresh_secs = 60\n";
    const LIST_URL: &str = "https://lists.test/provider.txt";

    fn entries(fetched: &Fetched) -> Vec<String> {
        fetched.urls[LIST_URL]
            .entries
            .iter()
            .map(|(text, at)| format!("{text}@{}", at.line))
            .collect()
    }

    fn results(notes: &Notes) -> Vec<&'static str> {
        notes.fetches.iter().map(|(_, result)| *result).collect()
    }

    #[test]
    fn url_lists_refresh_cheaply_and_keep_their_last_good_content() {
        let config = config(LISTS);
        let server = Server::default();
        // Never fetched: an error naming the configuration line.
        let error = run(fetch(&config, &Zone::default(), &server, &Previous::none())).unwrap_err();
        assert_eq!(
            error.to_string(),
            "/etc/smtpguard/smtpguard.toml:4: cannot fetch: https://lists.test/provider.txt: HTTP status 503"
        );
        server.serve(
            LIST_URL,
            "; provider relays\n192.0.2.0/24 ; main\n198.51.100.0/24\n",
        );
        let (mut fetched, notes) =
            run(fetch(&config, &Zone::default(), &server, &Previous::none())).unwrap();
        assert_eq!(entries(&fetched), ["192.0.2.0/24@2", "198.51.100.0/24@3"]);
        assert_eq!(results(&notes), ["ok"]);
        let (policy, _) = crate::policy::Policy::build(&config, &fetched).unwrap();
        let entry = &policy.default_scope().entries[&"192.0.2.0/24".parse().unwrap()];
        assert_eq!(
            (entry.origin.to_string(), entry.at.to_string()),
            (
                "URL https://lists.test/provider.txt".to_owned(),
                "https://lists.test/provider.txt:2".to_owned()
            )
        );

        // Due again: unchanged content costs a 304.
        let due = Instant::now() + Duration::from_secs(61);
        let (changed, notes) = run(refresh_due(
            &config,
            &Zone::default(),
            &server,
            &mut fetched,
            due,
        ));
        assert!(!changed);
        assert_eq!(results(&notes), ["not_modified"]);
        assert!(
            fetched.urls[LIST_URL].refresh_at > Instant::now() + Duration::from_secs(59),
            "asked again in refresh_secs"
        );

        // A bad line: refused whole, with the URL and line; the last good content stays.
        server.serve(LIST_URL, "192.0.2.0/24\n\n192.0.2.0/33\n");
        let due = due + Duration::from_secs(61);
        let (changed, notes) = run(refresh_due(
            &config,
            &Zone::default(),
            &server,
            &mut fetched,
            due,
        ));
        assert!(!changed);
        assert_eq!(results(&notes), ["invalid"]);
        let stale = fetched.urls[LIST_URL].stale.clone().expect("stale");
        assert!(
            stale.starts_with("cannot refresh URL https://lists.test/provider.txt: https://lists.test/provider.txt:3: bad prefix \"192.0.2.0/33\": prefix length must be 0 to 32; keeping its last good 2 entries"),
            "{stale}"
        );
        assert_eq!(
            fetched.not_current()[0].source,
            "URL https://lists.test/provider.txt"
        );

        // The server goes down: the same.
        server.down.set(true);
        let due = due + Duration::from_secs(61);
        let (changed, notes) = run(refresh_due(
            &config,
            &Zone::default(),
            &server,
            &mut fetched,
            due,
        ));
        assert!(!changed);
        assert_eq!(results(&notes), ["error"]);
        assert_eq!(fetched.urls[LIST_URL].failures, 2);
        assert_eq!(entries(&fetched).len(), 2);

        // Back with new content: taken (a /24 to two /24s is within max_growth).
        server.down.set(false);
        server.serve(LIST_URL, "192.0.2.0/24\n203.0.113.0/24\n");
        let due = due + Duration::from_secs(61);
        let (changed, notes) = run(refresh_due(
            &config,
            &Zone::default(),
            &server,
            &mut fetched,
            due,
        ));
        assert!(changed);
        assert_eq!(results(&notes), ["ok"]);
        assert_eq!(entries(&fetched), ["192.0.2.0/24@1", "203.0.113.0/24@2"]);
        assert!(fetched.not_current().is_empty());
    }

    #[test]
    fn url_lists_meet_the_floor_and_the_growth_guard() {
        let config = config(LISTS);
        let server = Server::default();
        server.serve(LIST_URL, "0.0.0.0/1\n128.0.0.0/1\n");
        let error = run(fetch(&config, &Zone::default(), &server, &Previous::none())).unwrap_err();
        assert_eq!(
            error.to_string(),
            "/etc/smtpguard/smtpguard.toml:4: https://lists.test/provider.txt gave no prefix the allow list may take: 0.0.0.0/1, 128.0.0.0/1 refused by the floor ([safety] min_prefix_v4, min_prefix_v6)"
        );

        server.serve(LIST_URL, "10.0.0.0/24\n");
        let (before, _) =
            run(fetch(&config, &Zone::default(), &server, &Previous::none())).unwrap();
        // A refresh growing the list 16 times is held back...
        server.serve(LIST_URL, "10.0.0.0/20\n");
        let mut refreshed = before.clone();
        let far = Instant::now() + Duration::from_secs(3600);
        let (changed, notes) = run(refresh_due(
            &config,
            &Zone::default(),
            &server,
            &mut refreshed,
            far,
        ));
        assert!(!changed);
        let held = refreshed.urls[LIST_URL].held.clone().expect("held back");
        assert!(held.starts_with("URL https://lists.test/provider.txt: new content held back: it covers 4096 (a /20) IPv4 addresses, up from 256 (a /24)"), "{held}");
        assert_eq!(notes.warnings[0].message, held);
        assert_eq!(refreshed.not_current()[0].status, SourceStatus::HeldBack);
        // ...and content the floor empties keeps the last good one.
        server.serve(LIST_URL, "0.0.0.0/0\n");
        let (changed, notes) = run(refresh_due(
            &config,
            &Zone::default(),
            &server,
            &mut refreshed,
            far + Duration::from_secs(3600),
        ));
        assert!(!changed);
        assert_eq!(notes.refused.len(), 1);
        assert_eq!(entries(&refreshed), ["10.0.0.0/24@1"]);
        // An explicit reload takes grown content.
        server.serve(LIST_URL, "10.0.0.0/20\n");
        let (fetched, _) = run(fetch(
            &config,
            &Zone::default(),
            &server,
            &previous(&before, false),
        ))
        .unwrap();
        assert_eq!(entries(&fetched), ["10.0.0.0/20@1"]);
        let (fetched, _) = run(fetch(
            &config,
            &Zone::default(),
            &server,
            &previous(&before, true),
        ))
        .unwrap();
        assert_eq!(
            entries(&fetched),
            ["10.0.0.0/24@1"],
            "a start holds it back"
        );
    }

    #[test]
    fn the_store_keeps_url_content_and_its_validators() {
        let dir = std::env::temp_dir().join(format!("sg-fetch-url-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config = config(&format!("{LISTS}json_key = \"ips\"\n"));
        let server = Server::default();
        server.serve(LIST_URL, "{\"values\": [{\"ips\": [\"192.0.2.0/24\", \"2001:db8::/48\"]},\n {\"ips\": \"198.51.100.7\"}]}");
        let (fetched, _) =
            run(fetch(&config, &Zone::default(), &server, &Previous::none())).unwrap();
        assert_eq!(
            entries(&fetched),
            ["192.0.2.0/24@1", "2001:db8::/48@1", "198.51.100.7@2"]
        );
        let (mut store, problem) = Store::open(&dir);
        assert!(problem.is_none(), "{problem:?}");
        assert!(store.save(&fetched).unwrap());
        assert!(!store.save(&fetched).unwrap(), "unchanged: nothing written");

        // A restart: the server answers 304 to the stored validators: current, not stale.
        let (store, _) = Store::read_only(&dir);
        let from_store = Previous {
            fetched: &Fetched::default(),
            store: Some(&store),
            hold_growth: true,
        };
        let (again, notes) = run(fetch(&config, &Zone::default(), &server, &from_store)).unwrap();
        assert_eq!(results(&notes), ["not_modified"]);
        assert_eq!(again.urls[LIST_URL].entries, fetched.urls[LIST_URL].entries);
        assert!(again.not_current().is_empty());
        // With the server down: the stored content, stale.
        server.down.set(true);
        let (again, _) = run(fetch(&config, &Zone::default(), &server, &from_store)).unwrap();
        assert_eq!(entries(&again), entries(&fetched));
        assert_eq!(again.not_current()[0].status, SourceStatus::Stale);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
