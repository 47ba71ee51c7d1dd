//! The Prometheus endpoint: `[metrics] listen = "127.0.0.1:9725"` serves `/metrics` in the
//! OpenMetrics text format, encoded by the `prometheus-client` crate. Kernel counters are read
//! at scrape time, from the same pinned maps `smtpguard stats` reads; what the daemon knows
//! (policy, reloads, DNS) is shared with it through [`Telemetry`].
//!
//! The metric names and labels are a contract:
//! - `smtpguard_rule_matches_total{list,rule,prefix}`: guarded SYNs matched per prefix; which
//!   prefixes have a series is `[metrics] prefixes` (default: those that matched)
//! - `smtpguard_rule_syn_total{list,rule}`: the same summed per rule, whatever that setting
//! - `smtpguard_syn_total{class="allowed|denied|unlisted"}`: guarded SYNs by classification
//! - `smtpguard_dropped_total`, `smtpguard_rejected_total`, `smtpguard_would_block_total`
//! - `smtpguard_reloads_total{result="ok|error"}`: policy applies after start (SIGHUP, DNS)
//! - `smtpguard_policy_prefixes{list}`, `smtpguard_policy_generation`
//! - `smtpguard_info{version,xdp_mode,interface}` = 1, `smtpguard_enforcing` = 1 or 0 (audit)
//! - `smtpguard_unrecorded_total`: stopped SYNs a flood kept out of the sources table;
//!   `smtpguard_canary_unrecorded_total` the same for a canary's table of sources
//! - `smtpguard_dns_refresh_failures_total{name}`, `smtpguard_dns_stale{name}` = 1 while a
//!   name's last good answer is kept after a failure (or taken from the last-good store)
//! - `smtpguard_dns_held_back{name}` = 1 while a refresh that grew the name past
//!   `max_growth` is held back
//! - `smtpguard_file_stale{path}` = 1 while a list file's last good entries stand in for it
//! - `smtpguard_prefixes_refused_total{rule,reason}`: allow prefixes from automatic sources
//!   left out (`reason="floor"`)
//! - `smtpguard_url_fetches_total{url,result="ok|not_modified|error|invalid"}`,
//!   `smtpguard_url_stale{url}`, `smtpguard_url_held_back{url}`
//! - `smtpguard_last_reload_success_timestamp_seconds`: the last policy applied (start,
//!   SIGHUP, refresh); `smtpguard_dns_last_success_timestamp_seconds{name}` and
//!   `smtpguard_url_last_success_timestamp_seconds{url}`: the last answer or content received
//!
//! Label sets are built in one place ([`labels`]), so a label that a kind of series gains is
//! added once.

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
    source::{
        config::{Mode, PrefixSeries},
        fetch::Fetched,
        safety::Refusal,
    },
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
    /// Which per-prefix series to carry.
    pub prefix_series: PrefixSeries,
    /// When a policy was last applied (Unix seconds; 0 before the first).
    pub last_apply_unix: u64,
    /// Per URL list: whether its last good content stands in, is held back, and when the
    /// server last gave or confirmed it.
    pub urls: BTreeMap<String, UrlTelemetry>,
    /// URL fetches, per URL and result.
    pub url_fetches: BTreeMap<(String, &'static str), u64>,
    /// A canary runs (`smtpguard try`).
    pub canary_active: bool,
    /// The group this host follows, with `[fleet]`.
    pub fleet: Option<FleetTelemetry>,
}

/// What the metrics say about the link to the fleet's etcd cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FleetTelemetry {
    pub connected: bool,
    /// The group revision in force (0: none).
    pub revision: i64,
    /// When a group revision was last applied (Unix seconds; 0: never by this daemon).
    pub last_applied_unix: u64,
}

/// What the metrics say about one DNS name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NameTelemetry {
    pub failures: u64,
    pub stale: bool,
    pub held_back: bool,
    /// When its answer was last received (Unix seconds).
    pub last_success_unix: u64,
}

/// What the metrics say about one URL list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UrlTelemetry {
    pub stale: bool,
    pub held_back: bool,
    /// When the server last gave or confirmed (304) its content (Unix seconds).
    pub last_success_unix: u64,
}

/// The results a URL fetch counts under.
pub const URL_RESULTS: [&str; 4] = ["ok", "not_modified", "error", "invalid"];

fn unix(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
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
                        last_success_unix: unix(resolution.resolved_at),
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
        self.urls = fetched
            .urls
            .iter()
            .map(|(url, content)| {
                (
                    url.clone(),
                    UrlTelemetry {
                        stale: content.stale.is_some(),
                        held_back: content.held.is_some(),
                        last_success_unix: unix(content.fetched_at),
                    },
                )
            })
            .collect();
    }

    /// Counts URL fetches by result.
    pub fn count_fetches(&mut self, fetches: &[(String, &'static str)]) {
        for (url, result) in fetches {
            *self.url_fetches.entry((url.clone(), result)).or_default() += 1;
        }
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

/// Every label set of the endpoint, built here and nowhere else.
mod labels {
    use super::Labels;
    use crate::policy::List;

    pub fn none() -> Labels {
        Labels::new()
    }

    /// A rule's series: the scope it belongs to ("default" for the top-level rules), its
    /// list and its name.
    pub fn rule(scope: &str, list: List, rule: &str) -> Labels {
        vec![
            ("scope", scope.to_owned()),
            ("list", list.as_str().to_owned()),
            ("rule", rule.to_owned()),
        ]
    }

    /// A prefix's series: its rule's labels and the prefix.
    pub fn prefix(scope: &str, list: List, rule: &str, prefix: &ipnet::IpNet) -> Labels {
        let mut labels = self::rule(scope, list, rule);
        labels.push(("prefix", prefix.to_string()));
        labels
    }

    pub fn list(list: List) -> Labels {
        vec![("list", list.as_str().to_owned())]
    }

    pub fn class(class: &str) -> Labels {
        vec![("class", class.to_owned())]
    }

    pub fn result(result: &str) -> Labels {
        vec![("result", result.to_owned())]
    }

    pub fn change(change: &str) -> Labels {
        vec![("change", change.to_owned())]
    }

    pub fn info(version: &str, xdp_mode: String, interface: &str) -> Labels {
        vec![
            ("version", version.to_owned()),
            ("xdp_mode", xdp_mode),
            ("interface", interface.to_owned()),
        ]
    }

    /// A DNS name's series.
    pub fn name(name: &str) -> Labels {
        vec![("name", name.to_owned())]
    }

    pub fn path(path: &str) -> Labels {
        vec![("path", path.to_owned())]
    }

    /// A URL list's series.
    pub fn url(url: &str) -> Labels {
        vec![("url", url.to_owned())]
    }

    pub fn url_result(url: &str, result: &str) -> Labels {
        let mut labels = self::url(url);
        labels.push(("result", result.to_owned()));
        labels
    }

    pub fn refused(rule: &str, reason: &str) -> Labels {
        vec![("rule", rule.to_owned()), ("reason", reason.to_owned())]
    }
}

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
        let none = labels::none;
        // A prefix's counter exists once it has matched (the program creates it then).
        let matches = |counter_id: u32| snapshot.prefixes.get(&counter_id).copied();
        let mut per_rule: BTreeMap<(&str, List, &str), u64> = BTreeMap::new();
        let mut per_prefix: Vec<(Labels, u64)> = Vec::new();
        for prefix in &telemetry.prefixes {
            let count = matches(prefix.counter_id);
            *per_rule
                .entry((&*prefix.scope, prefix.list, &*prefix.rule))
                .or_default() += count.unwrap_or(0);
            let carried = match telemetry.prefix_series {
                PrefixSeries::All => true,
                PrefixSeries::Matched => count.is_some_and(|count| count > 0),
                PrefixSeries::None => false,
            };
            if carried {
                per_prefix.push((
                    labels::prefix(&prefix.scope, prefix.list, &prefix.rule, &prefix.prefix),
                    count.unwrap_or(0),
                ));
            }
        }
        counter_family(
            &mut encoder,
            "smtpguard_rule_matches",
            "Guarded SYNs whose source matched this prefix (its most specific match); which prefixes have a series is [metrics] prefixes.",
            &per_prefix,
        )?;
        let per_rule: Vec<(Labels, u64)> = per_rule
            .into_iter()
            .map(|((scope, list, rule), count)| (labels::rule(scope, list, rule), count))
            .collect();
        counter_family(
            &mut encoder,
            "smtpguard_rule_syn",
            "Guarded SYNs whose most specific match was a prefix of this rule (prefixes in force now).",
            &per_rule,
        )?;
        counter_family(
            &mut encoder,
            "smtpguard_syn",
            "Guarded SYNs by classification of their source.",
            &[
                (labels::class("allowed"), global(counter::SYN_ALLOWED)),
                (labels::class("denied"), global(counter::SYN_DENIED)),
                (labels::class("unlisted"), global(counter::SYN_UNLISTED)),
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
                "smtpguard_canary_unrecorded",
                "SYNs a canary's candidate would change, counted in smtpguard_canary_syn_total, whose new source the per-CPU budget kept out of the canary's table of sources (a flood of new sources is sampled).",
                counter::CANARY_UNRECORDED,
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
            "smtpguard_canary_syn",
            "SYNs whose verdict a canary's candidate policy would change (smtpguard try), by change: newly_blocked (passed now, stopped by the candidate), newly_allowed (stopped now, passed by the candidate). Counted only while a canary runs.",
            &[
                (
                    labels::change("newly_blocked"),
                    global(counter::CANARY_NEWLY_BLOCKED),
                ),
                (
                    labels::change("newly_allowed"),
                    global(counter::CANARY_NEWLY_ALLOWED),
                ),
            ],
        )?;
        gauge_family(
            &mut encoder,
            "smtpguard_canary_active",
            "1 while a canary compares a candidate policy with the one in force (smtpguard try).",
            &[(none(), i64::from(telemetry.canary_active))],
        )?;
        counter_family(
            &mut encoder,
            "smtpguard_reloads",
            "Policy applies after start (SIGHUP, changed DNS answers), by result.",
            &[
                (labels::result("ok"), telemetry.reloads_ok),
                (labels::result("error"), telemetry.reloads_error),
            ],
        )?;
        gauge_family(
            &mut encoder,
            "smtpguard_last_reload_success_timestamp_seconds",
            "When a policy was last applied (start, SIGHUP, changed DNS answers or URL lists), in Unix seconds.",
            &[(
                none(),
                i64::try_from(telemetry.last_apply_unix).unwrap_or(i64::MAX),
            )],
        )?;
        if let Some(fleet) = telemetry.fleet {
            for (name, help, value) in [
                (
                    "smtpguard_fleet_connected",
                    "Whether the fleet's etcd cluster answers (1) or not (0); the policy in force stays either way.",
                    i64::from(fleet.connected),
                ),
                (
                    "smtpguard_fleet_revision",
                    "The group revision in force (0: none yet).",
                    fleet.revision,
                ),
                (
                    "smtpguard_fleet_last_applied_timestamp_seconds",
                    "When a group revision was last applied, in Unix seconds.",
                    i64::try_from(fleet.last_applied_unix).unwrap_or(i64::MAX),
                ),
            ] {
                gauge_family(&mut encoder, name, help, &[(none(), value)])?;
            }
        }
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
                (labels::list(List::Allow), count(List::Allow)),
                (labels::list(List::Deny), count(List::Deny)),
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
                    labels::info(
                        env!("CARGO_PKG_VERSION"),
                        interface.mode.to_string(),
                        &interface.name,
                    ),
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
            "1 where some guarded scope enforces, 0 where every scope audits.",
            &[(none(), i64::from(telemetry.mode == Mode::Enforce))],
        )?;
        let failures: Vec<(Labels, u64)> = telemetry
            .dns
            .iter()
            .map(|(name, state)| (labels::name(name), state.failures))
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
            .map(|(name, state)| (labels::name(name), i64::from(state.stale)))
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
            .map(|(name, state)| (labels::name(name), i64::from(state.held_back)))
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
            .map(|(path, stale)| (labels::path(path), i64::from(*stale)))
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
            .map(|((rule, reason), count)| (labels::refused(rule, reason), *count))
            .collect();
        counter_family(
            &mut encoder,
            "smtpguard_prefixes_refused",
            "Allow prefixes from list files and DNS left out of the policy (reason=floor: shorter than [safety] min_prefix_v4/v6).",
            &refused,
        )?;
        let timestamp = |unix: u64| i64::try_from(unix).unwrap_or(i64::MAX);
        let dns_success: Vec<(Labels, i64)> = telemetry
            .dns
            .iter()
            .map(|(name, state)| (labels::name(name), timestamp(state.last_success_unix)))
            .collect();
        gauge_family(
            &mut encoder,
            "smtpguard_dns_last_success_timestamp_seconds",
            "When this name's answer in use was received, in Unix seconds.",
            &dns_success,
        )?;
        let url_gauge = |value: fn(&UrlTelemetry) -> i64| -> Vec<(Labels, i64)> {
            telemetry
                .urls
                .iter()
                .map(|(url, state)| (labels::url(url), value(state)))
                .collect()
        };
        gauge_family(
            &mut encoder,
            "smtpguard_url_stale",
            "1 while this URL list cannot be fetched (or was refused) and its last good content is in use.",
            &url_gauge(|state| i64::from(state.stale)),
        )?;
        gauge_family(
            &mut encoder,
            "smtpguard_url_held_back",
            "1 while content that grew this URL list past max_growth is held back (SIGHUP accepts it).",
            &url_gauge(|state| i64::from(state.held_back)),
        )?;
        gauge_family(
            &mut encoder,
            "smtpguard_url_last_success_timestamp_seconds",
            "When the server last gave or confirmed (304) this URL list's content in use, in Unix seconds.",
            &url_gauge(|state| i64::try_from(state.last_success_unix).unwrap_or(i64::MAX)),
        )?;
        let counts = &telemetry.url_fetches;
        let fetches: Vec<(Labels, u64)> = telemetry
            .urls
            .keys()
            .flat_map(|url| {
                URL_RESULTS.iter().map(move |result| {
                    (
                        labels::url_result(url, result),
                        counts.get(&(url.clone(), *result)).copied().unwrap_or(0),
                    )
                })
            })
            .collect();
        counter_family(
            &mut encoder,
            "smtpguard_url_fetches",
            "Fetches of this URL list by result: ok (new content), not_modified (304), error (no answer, HTTP error, timeout), invalid (refused content: a bad line, too large, empty).",
            &fetches,
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
