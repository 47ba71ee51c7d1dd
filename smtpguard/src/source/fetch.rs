//! What a configuration names but does not contain: prefix list files, host names and SPF
//! domains. This module fetches them ([`Fetched`]) so that building the policy stays a pure
//! function of the configuration and what was fetched.
//!
//! DNS answers are kept until their TTL runs out (within the configured bounds) and then asked
//! again. A failed or empty answer for a name that resolved before keeps the last good
//! addresses, and says so: a provider list never silently shrinks to nothing. A name that
//! never resolved is an error, like a bad prefix.

use std::{
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    path::PathBuf,
    time::{Instant, SystemTime},
};

use ipnet::IpNet;

use crate::source::{
    config::{Config, ConfigError, DnsSettings, Location, Warning},
    dns::{DnsError, Lookup},
    listfile,
    spf::{self, SpfError},
};

/// Where a prefix of the policy came from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    /// Written in the configuration's `prefixes`.
    Literal,
    /// A line of a list file.
    File(PathBuf),
    /// An address the host name resolved to.
    Host(String),
    /// Part of the domain's SPF expansion.
    Spf(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Literal => f.write_str("literal"),
            Self::File(path) => write!(f, "file {}", path.display()),
            Self::Host(name) => write!(f, "host {name}"),
            Self::Spf(domain) => write!(f, "SPF of {domain}"),
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
    /// Refreshes of this name that failed since the daemon started.
    pub failures: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{at}: {name} gave no prefixes")]
    Empty { at: Location, name: String },
    #[error(transparent)]
    File(#[from] ConfigError),
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

/// Everything fetched for one configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fetched {
    /// Each list file's entries, as written, with their lines.
    pub files: BTreeMap<PathBuf, Vec<(String, Location)>>,
    pub names: BTreeMap<Name, Resolution>,
}

impl Fetched {
    /// When the next name is due to be asked again.
    pub fn next_refresh(&self) -> Option<Instant> {
        self.names
            .values()
            .map(|resolution| resolution.refresh_at)
            .min()
    }

    /// The prefixes of `name`, if it was fetched.
    pub fn nets(&self, name: &Name) -> Option<&[IpNet]> {
        self.names
            .get(name)
            .map(|resolution| resolution.nets.as_slice())
    }
}

/// Every name the configuration asks about, with where it is written (first mention).
pub fn names(config: &Config) -> BTreeMap<Name, Location> {
    let mut names = BTreeMap::new();
    for spec in config.allow.iter().chain(&config.deny) {
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

/// The form names are compared and stored in.
pub fn normalise(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// Reads every list file the configuration names.
pub fn read_files(
    config: &Config,
) -> Result<BTreeMap<PathBuf, Vec<(String, Location)>>, ConfigError> {
    let mut files = BTreeMap::new();
    for spec in config.allow.iter().chain(&config.deny) {
        for (path, _) in &spec.files {
            if !files.contains_key(path) {
                files.insert(path.clone(), listfile::read(path)?);
            }
        }
    }
    Ok(files)
}

/// Reads the files and resolves every name of `config`. Where a name fails but `previous`
/// holds an answer for it, that answer is kept (with a warning).
pub async fn fetch(
    config: &Config,
    dns: &impl Lookup,
    previous: &Fetched,
) -> Result<(Fetched, Vec<Warning>), FetchError> {
    let files = read_files(config)?;
    let mut fetched = Fetched {
        files,
        names: BTreeMap::new(),
    };
    let mut warnings = Vec::new();
    for (name, at) in names(config) {
        let resolution = refresh(
            &name,
            &at,
            dns,
            &config.dns,
            previous.names.get(&name),
            &mut warnings,
        )
        .await?;
        fetched.names.insert(name, resolution);
    }
    Ok((fetched, warnings))
}

/// Asks again about the names of `fetched` that are due at `now`. Returns whether any
/// name's prefixes changed. Failures keep the last good answer.
pub async fn refresh_due(
    config: &Config,
    dns: &impl Lookup,
    fetched: &mut Fetched,
    now: Instant,
) -> (bool, Vec<Warning>) {
    let mut warnings = Vec::new();
    let mut changed = false;
    for (name, at) in names(config) {
        let Some(old) = fetched.names.get(&name) else {
            continue;
        };
        if old.refresh_at > now {
            continue;
        }
        // With a previous answer, refresh never fails: it keeps that answer.
        if let Ok(new) = refresh(&name, &at, dns, &config.dns, Some(old), &mut warnings).await {
            changed |= new.nets != old.nets;
            fetched.names.insert(name, new);
        }
    }
    (changed, warnings)
}

async fn refresh(
    name: &Name,
    at: &Location,
    dns: &impl Lookup,
    settings: &DnsSettings,
    previous: Option<&Resolution>,
    warnings: &mut Vec<Warning>,
) -> Result<Resolution, FetchError> {
    let answer = match name {
        Name::Host(host) => dns
            .addresses(host)
            .await
            .map(|answer| {
                let mut notes = Vec::new();
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
                        notes.push(format!(
                            "host {host}: AAAA record {address} is an IPv4-mapped address; using the IPv4 prefix {net}"
                        ));
                        net
                    })
                    .collect();
                nets.sort();
                nets.dedup();
                (nets, Some(answer.ttl), notes)
            })
            .map_err(|source| FetchError::Host {
                at: at.clone(),
                name: host.clone(),
                source,
            }),
        Name::Spf(domain) => spf::expand(dns, domain)
            .await
            .map(|expansion| (expansion.nets, expansion.ttl, expansion.notes))
            .map_err(|source| FetchError::Spf {
                at: at.clone(),
                domain: domain.clone(),
                source: Box::new(source),
            }),
    };
    let answer = answer.and_then(|(nets, ttl, notes)| {
        if nets.is_empty() {
            Err(FetchError::Empty {
                at: at.clone(),
                name: name.to_string(),
            })
        } else {
            Ok((nets, ttl, notes))
        }
    });
    match (answer, previous) {
        (Ok((nets, ttl, notes)), _) => {
            for note in notes {
                warnings.push(Warning {
                    at: at.clone(),
                    message: note,
                });
            }
            let interval = ttl
                .unwrap_or(settings.min_refresh)
                .clamp(settings.min_refresh, settings.max_refresh);
            Ok(Resolution {
                nets,
                resolved_at: SystemTime::now(),
                refresh_at: Instant::now() + interval,
                stale: None,
                failures: previous.map_or(0, |previous| previous.failures),
            })
        }
        (Err(error), Some(previous)) => {
            let reason = std::error::Error::source(&error)
                .map_or_else(|| error.to_string(), ToString::to_string);
            let message = format!(
                "cannot refresh {name}: {reason}; keeping the last good {} prefixes of {name}, retrying in {}s",
                previous.nets.len(),
                settings.min_refresh.as_secs()
            );
            warnings.push(Warning {
                at: at.clone(),
                message: message.clone(),
            });
            Ok(Resolution {
                nets: previous.nets.clone(),
                resolved_at: previous.resolved_at,
                refresh_at: Instant::now() + settings.min_refresh,
                stale: Some(message),
                failures: previous.failures + 1,
            })
        }
        (Err(error), None) => Err(error),
    }
}
