//! Asking DNS for what provider lists publish: addresses (A and AAAA), TXT records (for SPF)
//! and mail exchangers (MX). Each answer carries the time it may be kept, so the daemon knows
//! when to ask again. Names are always absolute: no search domains are tried.

use std::{
    future::Future,
    net::IpAddr,
    time::{Duration, Instant},
};

use hickory_resolver::{
    TokioResolver,
    config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts},
    net::{NetError, runtime::TokioRuntimeProvider},
    proto::rr::{RData, RecordType},
};

use crate::source::config::DnsSettings;

/// Records of one name, and how long they may be kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer<T> {
    pub records: Vec<T>,
    pub ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot set up the resolver: {0}")]
    Setup(#[source] Box<NetError>),
    #[error("{name}: {record_type} query failed: {source}")]
    Query {
        name: String,
        record_type: RecordType,
        #[source]
        source: Box<NetError>,
    },
    #[error("{name}: no {what} records")]
    NoRecords { name: String, what: &'static str },
}

impl DnsError {
    /// The name does not exist or has no such records: an answer, not a failure to get one.
    pub fn is_negative(&self) -> bool {
        match self {
            Self::Query { source, .. } => source.is_nx_domain() || source.is_no_records_found(),
            Self::NoRecords { .. } => true,
            Self::Setup(_) => false,
        }
    }
}

/// The lookups SPF expansion and host lists need; [`Dns`] asks a real resolver.
pub trait Lookup {
    /// All A and AAAA records of `name`.
    fn addresses(&self, name: &str) -> impl Future<Output = Result<Answer<IpAddr>, DnsError>>;
    /// The TXT records of `name`, each with its strings joined.
    fn txt(&self, name: &str) -> impl Future<Output = Result<Answer<String>, DnsError>>;
    /// The exchanges named by the MX records of `name`.
    fn mx(&self, name: &str) -> impl Future<Output = Result<Answer<String>, DnsError>>;
}

/// A resolver: the one `resolver` names, or the system's.
pub struct Dns {
    resolver: TokioResolver,
}

impl Dns {
    pub fn new(settings: &DnsSettings) -> Result<Self, DnsError> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = match settings.resolver {
            Some(address) => {
                let mut server = NameServerConfig::udp_and_tcp(address.ip());
                server.connections = [ConnectionConfig::udp(), ConnectionConfig::tcp()]
                    .into_iter()
                    .map(|mut connection| {
                        connection.port = address.port();
                        connection
                    })
                    .collect();
                TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![server]),
                    provider,
                )
            }
            None => TokioResolver::builder(provider)
                .map_err(|error| DnsError::Setup(Box::new(error)))?,
        };
        let options: &mut ResolverOpts = builder.options_mut();
        options.timeout = settings.timeout;
        options.attempts = 1;
        // The daemon decides when to ask again; a cached answer would hide a change.
        options.cache_size = 0;
        let resolver = builder
            .build()
            .map_err(|error| DnsError::Setup(Box::new(error)))?;
        Ok(Self { resolver })
    }

    async fn records(
        &self,
        name: &str,
        record_type: RecordType,
    ) -> Result<(Vec<RData>, Duration), DnsError> {
        let absolute = if name.ends_with('.') {
            name.to_owned()
        } else {
            format!("{name}.")
        };
        let lookup = self
            .resolver
            .lookup(absolute.as_str(), record_type)
            .await
            .map_err(|source| DnsError::Query {
                name: name.to_owned(),
                record_type,
                source: Box::new(source),
            })?;
        let ttl = lookup
            .valid_until()
            .saturating_duration_since(Instant::now());
        let records = lookup
            .answers()
            .iter()
            .filter(|record| record.record_type() == record_type)
            .map(|record| record.data.clone())
            .collect();
        Ok((records, ttl))
    }
}

impl Lookup for Dns {
    async fn addresses(&self, name: &str) -> Result<Answer<IpAddr>, DnsError> {
        let (v4, v6) = tokio::join!(
            self.records(name, RecordType::A),
            self.records(name, RecordType::AAAA)
        );
        let mut records = Vec::new();
        let mut ttl: Option<Duration> = None;
        for result in [v4, v6] {
            match result {
                Ok((data, family_ttl)) => {
                    records.extend(data.iter().filter_map(|data| match data {
                        RData::A(a) => Some(IpAddr::V4(a.0)),
                        RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                        _ => None,
                    }));
                    ttl = Some(ttl.map_or(family_ttl, |ttl| ttl.min(family_ttl)));
                }
                // A name with only one family is normal; a failure to get an answer is not.
                Err(error) if error.is_negative() => {}
                Err(error) => return Err(error),
            }
        }
        if records.is_empty() {
            return Err(DnsError::NoRecords {
                name: name.to_owned(),
                what: "A or AAAA",
            });
        }
        records.sort();
        records.dedup();
        Ok(Answer {
            records,
            ttl: ttl.unwrap_or_default(),
        })
    }

    async fn txt(&self, name: &str) -> Result<Answer<String>, DnsError> {
        let (data, ttl) = self.records(name, RecordType::TXT).await?;
        let records = data
            .iter()
            .filter_map(|data| match data {
                RData::TXT(txt) => Some(
                    txt.txt_data
                        .iter()
                        .map(|part| String::from_utf8_lossy(part))
                        .collect::<String>(),
                ),
                _ => None,
            })
            .collect();
        Ok(Answer { records, ttl })
    }

    async fn mx(&self, name: &str) -> Result<Answer<String>, DnsError> {
        let (data, ttl) = self.records(name, RecordType::MX).await?;
        let records = data
            .iter()
            .filter_map(|data| match data {
                RData::MX(mx) => Some(mx.exchange.to_string()),
                _ => None,
            })
            .collect();
        Ok(Answer { records, ttl })
    }
}
