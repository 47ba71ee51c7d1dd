//! The Prometheus endpoint: `[metrics] listen = "127.0.0.1:9725"` serves `/metrics` in the
//! OpenMetrics text format, encoded by the `prometheus-client` crate. Kernel counters are read
//! at scrape time, from the same pinned maps `smtpguard stats` reads; what the daemon knows
//! (policy, reloads, DNS) is shared with it through [`Telemetry`].
//!
//! The metric names and labels are a contract:
//! - `smtpguard_rule_matches_total{list,rule,prefix}`: guarded SYNs matched per prefix
//! - `smtpguard_syn_total{class="allowed|denied|unlisted"}`: guarded SYNs by classification
//! - `smtpguard_dropped_total`, `smtpguard_rejected_total`, `smtpguard_would_block_total`
//! - `smtpguard_reloads_total{result="ok|error"}`: policy applies after start (SIGHUP, DNS)
//! - `smtpguard_policy_prefixes{list}`, `smtpguard_policy_generation`
//! - `smtpguard_info{version,xdp_mode,interface}` = 1, `smtpguard_enforcing` = 1 or 0 (audit)
//! - `smtpguard_unrecorded_total`: stopped SYNs a flood kept out of the sources table
//! - `smtpguard_dns_refresh_failures_total{name}`, `smtpguard_dns_stale{name}` = 1 while a
//!   name's last good answer is kept after a failure (or taken from the last-good store)
//! - `smtpguard_dns_held_back{name}` = 1 while a refresh that grew the name past
//!   `max_growth` is held back
//! - `smtpguard_file_stale{path}` = 1 while a list file's last good entries stand in for it
//! - `smtpguard_prefixes_refused_total{rule,reason}`: allow prefixes from automatic sources
//!   left out (`reason="floor"`)

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Bytes, header::CONTENT_TYPE, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use smtpguard_common::counter;
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    instance::{InterfaceState, PrefixState},
    kernel::maps::CounterMaps,
    policy::List,
    source::{config::Mode, fetch::Fetched, safety::Refusal},
};

/// What the daemon knows that the kernel maps do not: shared with the scrape handler.
#[derive(Clone, Debug, Default)]
pub struct Telemetry {
    pub interfaces: Vec<InterfaceState>,
    pub mode: Mode,
    pub generation: u32,
    /// Counter id, list, rule and prefix of each prefix of the policy in force.
    pub prefixes: Vec<PrefixState>,
    pub reloads_ok: u64,
    pub reloads_error: u64,
    /// Per DNS name: refreshes that failed, whether its last good answer is in use, and
    /// whether a grown answer is held back.
    pub dns: BTreeMap<String, NameTelemetry>,
    /// Per list file: whether its last good entries stand in for it.
    pub files: BTreeMap<String, bool>,
    /// Allow prefixes refused, per rule and reason.
    pub refused: BTreeMap<(String, &'static str), u64>,
}

/// What the metrics say about one DNS name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NameTelemetry {
    pub failures: u64,
    pub stale: bool,
    pub held_back: bool,
}

impl Telemetry {
    /// Takes what `fetched` says about names and list files.
    pub fn set_sources(&mut self, fetched: &Fetched) {
        self.dns = fetched
            .names
            .iter()
            .map(|(name, resolution)| {
                (
                    name.to_string(),
                    NameTelemetry {
                        failures: resolution.failures,
                        stale: resolution.stale.is_some(),
                        held_back: resolution.held.is_some(),
                    },
                )
            })
            .collect();
        self.files = fetched
            .files
            .keys()
            .map(|path| {
                (
                    path.display().to_string(),
                    fetched.stale_files.contains_key(path),
                )
            })
            .collect();
    }

    /// Counts prefixes refused.
    pub fn count_refused(&mut self, refused: &[Refusal]) {
        for refusal in refused {
            *self
                .refused
                .entry((refusal.rule.clone(), refusal.reason.label()))
                .or_default() += 1;
        }
    }
}

pub type SharedTelemetry = Arc<Mutex<Telemetry>>;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics: cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Reads the kernel counters and the daemon's telemetry on every scrape.
struct Exporter {
    maps: Mutex<CounterMaps>,
    telemetry: SharedTelemetry,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Exporter")
    }
}

type Labels = Vec<(&'static str, String)>;

/// One metric family of `metric_type`, each value made a metric by `metric`; a label-less
/// value is the family's only sample.
fn family<V: Copy, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    values: &[(Labels, V)],
    metric: impl Fn(V) -> M,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, value) in values {
        if labels.is_empty() {
            return metric(*value).encode(family);
        }
        metric(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

fn counter_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    family(
        encoder,
        name,
        help,
        MetricType::Counter,
        values,
        ConstCounter::new,
    )
}

fn gauge_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(Labels, i64)],
) -> Result<(), std::fmt::Error> {
    family(
        encoder,
        name,
        help,
        MetricType::Gauge,
        values,
        ConstGauge::new,
    )
}

impl prometheus_client::collector::Collector for Exporter {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Held for the scrape: a policy of many prefixes is not copied on every scrape.
        let telemetry = self.telemetry.lock().map_err(|_| std::fmt::Error)?;
        let snapshot = match self.maps.lock().map_err(|_| std::fmt::Error)?.read() {
            Ok(snapshot) => snapshot,
            Err(error) => {
                log::error!("metrics: reading the counters: {error}");
                return Err(std::fmt::Error);
            }
        };
        let global = |index| snapshot.get(index);
        let none = || Labels::new();
        let rules: Vec<(Labels, u64)> = telemetry
            .prefixes
            .iter()
            .map(|prefix| {
                (
                    vec![
                        ("scope", prefix.scope.clone()),
                        ("list", prefix.list.as_str().to_owned()),
                        ("rule", prefix.rule.clone()),
                        ("prefix", prefix.prefix.to_string()),
                    ],
                    snapshot
                        .prefixes
                        .get(&prefix.counter_id)
                        .copied()
                        .unwrap_or(0),
                )
            })
            .collect();
        counter_family(
            &mut encoder,
            "smtpguard_rule_matches",
            "Guarded SYNs whose source matched this prefix (its most specific match).",
            &rules,
        )?;
        counter_family(
            &mut encoder,
            "smtpguard_syn",
            "Guarded SYNs by classification of their source.",
            &[
                (
                    vec![("class", "allowed".into())],
                    global(counter::SYN_ALLOWED),
                ),
                (
                    vec![("class", "denied".into())],
                    global(counter::SYN_DENIED),
                ),
                (
                    vec![("class", "unlisted".into())],
                    global(counter::SYN_UNLISTED),
                ),
            ],
        )?;
        for (name, help, index) in [
            (
                "smtpguard_dropped",
                "Guarded SYNs the program dropped.",
                counter::DROPPED,
            ),
            (
                "smtpguard_rejected",
                "Guarded SYNs answered with a TCP RST.",
                counter::REJECTED,
            ),
            (
                "smtpguard_would_block",
                "Guarded SYNs passed in audit mode that enforce mode would have stopped.",
                counter::WOULD_BLOCK,
            ),
            (
                "smtpguard_unparsed_passed",
                "Frames too short or malformed to parse, passed (the kernel drops them).",
                counter::PASSED_UNPARSED,
            ),
            (
                "smtpguard_hidden_decided",
                "Packets whose TCP header was out of sight, decided by source as guarded SYNs.",
                counter::HIDDEN_DECIDED,
            ),
            (
                "smtpguard_fragments_passed",
                "Non-first fragments, passed (the first fragment carries the decision).",
                counter::PASSED_FRAGMENTS,
            ),
            (
                "smtpguard_unrecorded",
                "Stopped SYNs left out of the table of stopped sources: a flood beyond the per-CPU budget is sampled.",
                counter::UNRECORDED,
            ),
            (
                "smtpguard_opaque_dropped",
                "Frames dropped because the parser could not read them far enough to rule out a guarded SYN (too many VLAN tags, extension headers or tunnel levels, an inner header cut off).",
                counter::OPAQUE_DROPPED,
            ),
            (
                "smtpguard_resets_withheld",
                "Stopped SYNs dropped instead of answered with a reset (not addressed to this host, FIN or RST in the SYN, tunnelled, VLAN tags stripped by the NIC).",
                counter::RESET_WITHHELD,
            ),
            (
                "smtpguard_tunnelled",
                "Guarded SYNs found inside a tunnel (IPIP, 6in4, GRE, IPv6-in-IPv6) or behind PPPoE or MPLS, decided by their inner source.",
                counter::TUNNELLED,
            ),
        ] {
            counter_family(&mut encoder, name, help, &[(none(), global(index))])?;
        }
        counter_family(
            &mut encoder,
            "smtpguard_reloads",
            "Policy applies after start (SIGHUP, changed DNS answers), by result.",
            &[
                (vec![("result", "ok".into())], telemetry.reloads_ok),
                (vec![("result", "error".into())], telemetry.reloads_error),
            ],
        )?;
        let count = |list: List| {
            telemetry
                .prefixes
                .iter()
                .filter(|prefix| prefix.list == list)
                .count() as i64
        };
        gauge_family(
            &mut encoder,
            "smtpguard_policy_prefixes",
            "Prefixes in the policy in force.",
            &[
                (vec![("list", "allow".into())], count(List::Allow)),
                (vec![("list", "deny".into())], count(List::Deny)),
            ],
        )?;
        gauge_family(
            &mut encoder,
            "smtpguard_policy_generation",
            "Generation of the policy in force.",
            &[(none(), i64::from(telemetry.generation))],
        )?;
        let info: Vec<(Labels, i64)> = telemetry
            .interfaces
            .iter()
            .map(|interface| {
                (
                    vec![
                        ("version", env!("CARGO_PKG_VERSION").to_owned()),
                        ("xdp_mode", interface.mode.to_string()),
                        ("interface", interface.name.clone()),
                    ],
                    1,
                )
            })
            .collect();
        gauge_family(
            &mut encoder,
            "smtpguard_info",
            "Always 1: the version, and the XDP mode in force on each interface.",
            &info,
        )?;
        gauge_family(
            &mut encoder,
            "smtpguard_enforcing",
            "1 in enforce mode, 0 in audit mode.",
            &[(none(), i64::from(telemetry.mode == Mode::Enforce))],
        )?;
        let failures: Vec<(Labels, u64)> = telemetry
            .dns
            .iter()
            .map(|(name, state)| (vec![("name", name.clone())], state.failures))
            .collect();
        counter_family(
            &mut encoder,
            "smtpguard_dns_refresh_failures",
            "DNS refreshes of this name that failed (its last good answer was kept).",
            &failures,
        )?;
        let stale: Vec<(Labels, i64)> = telemetry
            .dns
            .iter()
            .map(|(name, state)| (vec![("name", name.clone())], i64::from(state.stale)))
            .collect();
        gauge_family(
            &mut encoder,
            "smtpguard_dns_stale",
            "1 while this name's last good answer is in use because it cannot be resolved.",
            &stale,
        )?;
        let held: Vec<(Labels, i64)> = telemetry
            .dns
            .iter()
            .map(|(name, state)| (vec![("name", name.clone())], i64::from(state.held_back)))
            .collect();
        gauge_family(
            &mut encoder,
            "smtpguard_dns_held_back",
            "1 while an answer that grew this name past max_growth is held back (SIGHUP accepts it).",
            &held,
        )?;
        let files: Vec<(Labels, i64)> = telemetry
            .files
            .iter()
            .map(|(path, stale)| (vec![("path", path.clone())], i64::from(*stale)))
            .collect();
        gauge_family(
            &mut encoder,
            "smtpguard_file_stale",
            "1 while this list file cannot be read and its last good entries are in use.",
            &files,
        )?;
        let refused: Vec<(Labels, u64)> = telemetry
            .refused
            .iter()
            .map(|((rule, reason), count)| {
                (
                    vec![("rule", rule.clone()), ("reason", (*reason).to_owned())],
                    *count,
                )
            })
            .collect();
        counter_family(
            &mut encoder,
            "smtpguard_prefixes_refused",
            "Allow prefixes from list files and DNS left out of the policy (reason=floor: shorter than [safety] min_prefix_v4/v6).",
            &refused,
        )
    }
}

/// Serves `/metrics` on `address` until the returned task is aborted.
pub async fn serve(
    address: SocketAddr,
    maps: CounterMaps,
    telemetry: SharedTelemetry,
) -> Result<JoinHandle<()>, MetricsError> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| MetricsError::Bind { address, source })?;
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Exporter {
        maps: Mutex::new(maps),
        telemetry,
    }));
    let registry = Arc::new(registry);
    log::info!("metrics: serving http://{address}/metrics");
    Ok(tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    log::warn!("metrics: accept: {error}");
                    continue;
                }
            };
            let registry = Arc::clone(&registry);
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let registry = Arc::clone(&registry);
                    async move { Ok::<_, Infallible>(respond(&request, &registry)) }
                });
                if let Err(error) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    log::debug!("metrics: connection: {error}");
                }
            });
        }
    }))
}

fn respond<B>(request: &Request<B>, registry: &Registry) -> Response<Full<Bytes>> {
    let reply = |status, content_type: &'static str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, content_type.parse().expect("static header"));
        response
    };
    if request.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "smtpguard serves /metrics only\n".to_owned(),
        );
    }
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body,
        ),
        Err(_) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain; charset=utf-8",
            "reading the counters failed; see the daemon's log\n".to_owned(),
        ),
    }
}
