//! The long-running daemon: load the program, apply the policy, attach, then serve signals
//! until told to stop. SIGHUP re-reads the configuration; a configuration that fails to
//! validate is reported and the running policy stays. SIGTERM/SIGINT detach and return.

use std::{
    collections::BTreeSet,
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use sd_notify::NotifyState;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    task::JoinHandle,
    time::Instant as TokioInstant,
};

use smtpguard_common::LAYOUT_STAMP;

use crate::{
    instance::{Instance, InstanceError, InstanceLock, InterfaceState, RunState, ScopeState},
    kernel::{
        filter::{AttachedMode, Filter, FilterError},
        interface::{Interface, InterfaceError},
        link,
        maps::{
            ApplyError, ApplyReport, CounterMapIds, MapsError, PolicyMaps, open_counters,
            pinned_counter_ids,
        },
        upgrade,
    },
    policy::{List, Policy},
    service::{
        metrics::{self, MetricsError, SharedTelemetry},
        state::{StateJob, StateWriter},
    },
    source::{
        config::{Action, Config, ConfigError, OnExit, Warning},
        dns::{Dns, DnsError},
        fetch::{self as sources, FetchError, Fetched, Previous},
        safety::Refusal,
        store::Store,
        url::{UrlError, Web},
    },
};

mod canary;

pub use canary::MAX_CANARY_SECS;

mod fleet;

pub use fleet::{FLEET_STATE, FleetState, read_fleet_state};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Fetch(#[from] Box<FetchError>),
    #[error(transparent)]
    Dns(#[from] DnsError),
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("applying the policy: {0}")]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Fleet(Box<crate::fleet::FleetError>),
    #[error("cannot listen for {signal}: {source}")]
    Signal {
        signal: &'static str,
        source: std::io::Error,
    },
    #[error(
        "none of the configured interfaces exists ({}): check `interfaces` against `ip link`",
        interfaces.join(", ")
    )]
    NoInterface { interfaces: Vec<String> },
    #[error(
        "upgrade incomplete: the previous program, with the previous build's maps and policy, stays on {}; this build's policy is not in force there, so it stops; the previous filter keeps enforcing",
        interfaces.join(", ")
    )]
    UpgradeIncomplete { interfaces: Vec<String> },
    #[error(transparent)]
    Control(#[from] crate::service::control::ControlError),
    /// A canary request that cannot be carried out, and why.
    #[error("{0}")]
    Canary(String),
    #[error("{what} changed from {from} to {to}: restart smtpguard to change it")]
    NeedsRestart {
        what: &'static str,
        from: String,
        to: String,
    },
}

/// How often the attached interfaces are looked at again (MAC address, VLAN offload).
const INTERFACE_CHECK: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs the daemon for `instance` with the configuration at `config_path` until SIGTERM,
/// SIGINT or `shutdown` completes; then detaches and removes its pins.
pub async fn run(
    config_path: &Path,
    instance: &Instance,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    // Register before anything slow: SIGHUP's default action would kill us.
    let listen = |kind: SignalKind, name: &'static str| {
        signal(kind).map_err(|source| DaemonError::Signal {
            signal: name,
            source,
        })
    };
    let mut hangup = listen(SignalKind::hangup(), "SIGHUP")?;
    let mut terminate = listen(SignalKind::terminate(), "SIGTERM")?;
    let mut interrupt = listen(SignalKind::interrupt(), "SIGINT")?;

    let mut daemon = Daemon::start(config_path, instance).await?;
    let mut control = daemon.control.take().unwrap_or_else(|| mpsc::channel(1).1);
    notify(&[NotifyState::Ready, NotifyState::Status(&daemon.status())]);
    tokio::pin!(shutdown);
    let mut interface_check = tokio::time::interval(INTERFACE_CHECK);
    interface_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut fleet_report = tokio::time::interval(fleet::REPORT_EVERY);
    fleet_report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // With no names to resolve, the refresh branch never fires.
        let refresh_at = daemon.fetched.next_refresh();
        let refresh = async {
            match refresh_at {
                Some(at) => tokio::time::sleep_until(TokioInstant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        let canary_deadline = daemon.canary.as_ref().and_then(|canary| canary.deadline);
        let canary_end = async {
            match canary_deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(call) = control.recv() => daemon.serve(call).await,
            () = canary_end => match daemon.end_canary("expired") {
                Ok(summary) => log::info!("{summary}"),
                Err(error) => log::error!("{error}"),
            },
            () = refresh => {
                match daemon.refresh_sources().await {
                    Ok(Some(report)) => {
                        daemon.count_reload(true);
                        log::info!("DNS answers or URL lists changed: {}", daemon.describe(&report));
                    }
                    Ok(None) => {}
                    Err(error) => {
                        daemon.count_reload(false);
                        log::error!(
                            "DNS answers or URL lists changed but the new policy was refused, generation {} stays in force: {error}",
                            daemon.maps.generation()
                        );
                    }
                }
                daemon.keep_canary();
                // Failures and stale answers change without a new policy.
                daemon.publish_dns();
            }
            _ = hangup.recv() => {
                log::info!("SIGHUP: reloading {}", config_path.display());
                notify(&[NotifyState::Reloading, NotifyState::monotonic_usec_now().unwrap_or(NotifyState::Reloading)]);
                match daemon.reload().await {
                    Ok(report) => {
                        daemon.count_reload(true);
                        log::info!("reloaded: {}", daemon.describe(&report));
                    }
                    Err(error) => {
                        daemon.count_reload(false);
                        log::error!(
                            "reload failed, generation {} stays in force: {error}",
                            daemon.maps.generation()
                        );
                    }
                }
                daemon.keep_canary();
                notify(&[NotifyState::Ready, NotifyState::Status(&daemon.status())]);
            }
            _ = interface_check.tick() => daemon.check_interfaces(),
            event = fleet::next_event(&mut daemon.fleet) => {
                daemon.on_fleet_event(event).await;
                // A revision applied rewrote the standby slot, where a candidate sits.
                daemon.keep_canary();
            }
            _ = fleet_report.tick(), if daemon.fleet.is_some() => daemon.report_fleet(),
            _ = terminate.recv() => { log::info!("SIGTERM: stopping"); break; }
            _ = interrupt.recv() => { log::info!("SIGINT: stopping"); break; }
            () = &mut shutdown => { log::info!("shutdown requested: stopping"); break; }
        }
    }
    notify(&[NotifyState::Stopping]);
    if daemon.canary.is_some() {
        match daemon.end_canary("ended: the daemon stopped") {
            Ok(summary) => log::info!("{summary}"),
            Err(error) => log::error!("{error}"),
        }
    }
    let _ = std::fs::remove_file(instance.control_path());
    daemon.leave_fleet().await;
    daemon.stop();
    Ok(())
}

/// Tells systemd (`Type=notify`) how the service is doing; a no-op outside systemd.
fn notify(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        log::warn!("sd_notify: {error}");
    }
}

/// Starts the metrics endpoint, reading the counters through the pins.
async fn start_metrics(
    address: SocketAddr,
    pin_dir: &Path,
    ids: CounterMapIds,
    telemetry: &SharedTelemetry,
) -> Result<JoinHandle<()>, DaemonError> {
    let maps = open_counters(pin_dir, ids)?;
    Ok(metrics::serve(address, maps, Arc::clone(telemetry)).await?)
}

/// A running instance: the attached program, its maps and the policy in force.
struct Daemon {
    config_path: PathBuf,
    config: Config,
    dns: Dns,
    web: Web,
    /// List files, URL lists and DNS answers the policy was built from.
    fetched: Fetched,
    /// The last-good copy of `fetched` on disk, for a restart without DNS.
    store: Store,
    /// Shared with the state writer, which lists its prefixes after the apply.
    policy: Arc<Policy>,
    instance: Instance,
    // Field order is drop order: detach first, then remove the pins, then release the lock.
    filter: Filter,
    maps: PolicyMaps,
    counter_map_ids: CounterMapIds,
    telemetry: SharedTelemetry,
    /// The metrics endpoint, while one is configured.
    metrics: Option<(SocketAddr, JoinHandle<()>)>,
    /// Writes the state file off the reload path; dropped (its last record written) before
    /// the pins, which may remove the file.
    state_writer: StateWriter,
    pins: PinsGuard,
    /// The closed boot policy is in force while the real one is built.
    boot: bool,
    /// Configured interfaces that do not exist (yet), attached when they appear.
    waiting: BTreeSet<String>,
    /// A candidate policy compared with the one in force (`smtpguard try`).
    canary: Option<canary::Canary>,
    /// Requests from the control socket, until the loop takes them.
    control: Option<mpsc::Receiver<crate::service::control::Call>>,
    /// The group this host follows, with `[fleet]`.
    fleet: Option<fleet::FleetLink>,
    _lock: InstanceLock,
}

impl Daemon {
    /// Starts the instance: takes over a filter left in force (program swapped in place once
    /// the new policy is in the maps), or, on a host where nothing filters yet (a boot),
    /// attaches at once with a closed policy so no guarded SYN slips through while names are
    /// resolved and a large policy is built.
    async fn start(config_path: &Path, instance: &Instance) -> Result<Self, DaemonError> {
        let config = Config::load(config_path)?;
        let dns = Dns::new(&config.dns)?;
        let web = Web::new(&config.urls)?;
        let lock = instance.lock()?;
        // Listening before the first state is written: whoever sees the daemon running can
        // reach it.
        let control = crate::service::control::listen(&instance.control_path())?;
        canary::end_orphaned(instance);
        let pin_dir = instance.prepare_pin_dir()?;
        let pinned_links = instance.pinned_links()?;
        let previous = instance.read_state().ok();
        let older_layouts = instance.other_layouts(LAYOUT_STAMP)?;
        let maps_dir = instance.prepare_maps_dir(LAYOUT_STAMP)?;
        let (filter, maps) = Filter::load(Some(&maps_dir))?;
        // Only a link on the very interface its pin is named after filters it: one whose
        // interface went away or was renamed does not.
        let pinned_links = live_links(pinned_links, &config.interfaces);
        let in_force = !pinned_links.is_empty();
        // A start that fails removes what it created, but never a filter that is in force:
        // a previous daemon's, or the closed one this start attached.
        let pins = PinsGuard {
            instance: instance.clone(),
            remove: !in_force && !maps.recovered(),
        };
        let counter_map_ids = pinned_counter_ids(&maps_dir)?;
        let telemetry = SharedTelemetry::default();
        let store = open_store(instance);
        let fleet = config
            .fleet
            .clone()
            .map(|settings| fleet::FleetLink::load(settings, &store));
        let mut daemon = Self {
            config_path: config_path.to_owned(),
            config,
            dns,
            web,
            fetched: Fetched::default(),
            store,
            policy: Arc::default(),
            instance: instance.clone(),
            filter,
            maps,
            counter_map_ids,
            state_writer: StateWriter::new(instance.clone(), Arc::clone(&telemetry)),
            telemetry,
            metrics: None,
            pins,
            boot: false,
            waiting: BTreeSet::new(),
            canary: None,
            control: Some(control),
            fleet,
            _lock: lock,
        };
        if in_force {
            log::info!(
                "taking over the filter left in {} ({} pinned links, policy generation {}); it stays in force until the new policy is",
                pin_dir.display(),
                pinned_links.len(),
                daemon.maps.generation()
            );
        }
        // Every configured interface a live link does not cover is filtered from now on.
        daemon.guard_now(&pinned_links)?;
        if !older_layouts.is_empty() && !daemon.maps.recovered() {
            // An upgrade: new maps, whose counters start under the ids the old daemon used.
            if let Some(previous) = &previous {
                daemon.maps.seed_generation(previous.generation);
                daemon
                    .maps
                    .seed_counter_ids(previous.prefixes.iter().map(|prefix| {
                        (
                            prefix.scope_id,
                            prefix.prefix,
                            prefix.list,
                            prefix.counter_id,
                        )
                    }));
            }
            log::info!(
                "maps of another layout are in force ({}): this build brings its own and swaps its program in once its policy is in them",
                older_layouts
                    .iter()
                    .map(|dir| dir.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }

        // Names that do not resolve now are taken from the last-good store; growth past the
        // guard waits for an admin, as on a refresh: a reboot must not open the policy.
        let previous_sources = Previous {
            fetched: &Fetched::default(),
            store: Some(&daemon.store),
            hold_growth: true,
        };
        let (fetched, notes) =
            sources::fetch(&daemon.config, &daemon.dns, &daemon.web, &previous_sources)
                .await
                .map_err(Box::new)?;
        log_warnings(&notes.warnings);
        count_notes(&daemon.telemetry, &notes);
        let (policy, warnings) = fleet::compose(&daemon.config, &fetched, daemon.fleet.as_ref())?;
        log_warnings(&warnings);
        count_refused(&daemon.telemetry, &policy.refused);
        daemon.fleet_started();
        // The policy is in the maps before any program of this build sees a packet.
        let report = apply(&mut daemon.maps, &policy)?;
        daemon.note_applied();
        daemon.fetched = fetched;
        daemon.policy = Arc::new(policy);
        daemon.boot = false;
        let kept = daemon.take_over(&pinned_links)?;
        if !older_layouts.is_empty() {
            // The old program reads the old maps: where it stays, this daemon's policy is not
            // in force, and running on would pretend it is.
            if !kept.is_empty() {
                return Err(DaemonError::UpgradeIncomplete { interfaces: kept });
            }
            daemon.retire_layouts(&older_layouts);
        }
        let uncovered: Vec<String> = daemon
            .config
            .interfaces
            .iter()
            .filter(|interface| {
                daemon.filter.attachment(interface).is_none()
                    && !pinned_links.iter().any(|(pinned, _)| pinned == *interface)
            })
            .cloned()
            .collect();
        daemon.attach_or_wait(&uncovered)?;
        daemon.sync_interfaces()?;
        set_link_pins(&mut daemon.filter, instance, daemon.config.on_exit)?;
        if let Some(address) = daemon.config.metrics_listen {
            let task = start_metrics(
                address,
                &maps_dir,
                daemon.counter_map_ids,
                &daemon.telemetry,
            )
            .await?;
            daemon.metrics = Some((address, task));
        }
        daemon.pins.remove = daemon.config.on_exit == OnExit::Detach;
        daemon.write_state(true)?;
        daemon.save_store();
        log::info!("{}", daemon.describe(&report));
        daemon.start_fleet();
        Ok(daemon)
    }

    /// Makes sure every configured interface is filtered before anything slow happens (names
    /// resolved, lists read, a large policy built): those a live pinned link does not cover
    /// get this program at once, enforcing the policy the maps hold if they hold one, or else,
    /// in enforce mode, a closed one (every guarded SYN dropped: senders retry). In audit
    /// mode, on maps that hold nothing, nothing would be stopped anyway: the filter waits for
    /// the policy.
    fn guard_now(&mut self, live: &[(String, PathBuf)]) -> Result<(), DaemonError> {
        let uncovered: Vec<String> = self
            .config
            .interfaces
            .iter()
            .filter(|interface| !live.iter().any(|(pinned, _)| pinned == *interface))
            .cloned()
            .collect();
        if uncovered.is_empty() {
            return Ok(());
        }
        let recovered = self.maps.recovered();
        // The scopes the policy will have: the fleet group's where it brings them (what its
        // store kept), else the file's. Also what the state file shows until it is built.
        let group = self.fleet.as_ref().and_then(fleet::FleetLink::group_policy);
        self.policy = Arc::new(group.map_or_else(|| Policy::closed(&self.config), Policy::emptied));
        if !recovered {
            // Every scope only audits: on maps that hold nothing, nothing would be stopped.
            if !self.policy.enforces() {
                return Ok(());
            }
            if let Err(error) = self.maps.apply_closed(&self.policy) {
                // Never nothing: the same ports, closed for every destination.
                log::warn!(
                    "boot: the scopes cannot be written ({error}); every port a scope guards is closed for every destination until the policy is built"
                );
                self.policy = Arc::new(self.policy.closed_everywhere());
                self.maps.apply_closed(&self.policy)?;
            }
            self.boot = true;
        }
        let outcome = self.attach_or_wait(&uncovered);
        // Pinned, even when an attach failed: a failed start leaves this filter in force.
        self.sync_interfaces()?;
        set_link_pins(&mut self.filter, &self.instance, self.config.on_exit)?;
        if self.config.on_exit == OnExit::Keep && !self.filter.attachments().is_empty() {
            self.pins.remove = false;
        }
        outcome?;
        let status = if recovered {
            format!(
                "enforcing the policy the maps hold (generation {}) while the new one is built",
                self.maps.generation()
            )
        } else {
            "closed until the policy is built: every guarded SYN is dropped".to_owned()
        };
        log::info!("boot: {status}");
        self.write_state(true)?;
        notify(&[NotifyState::Status(&status)]);
        Ok(())
    }

    /// Attaches to each of `interfaces`; one that does not exist (yet: a PPP or WireGuard
    /// device comes up later) is waited for and attached when it appears. Other failures
    /// are errors, after the rest were attached.
    fn attach_or_wait(&mut self, interfaces: &[String]) -> Result<(), DaemonError> {
        let mut failure = None;
        for interface in interfaces {
            match self.filter.attach(interface, self.config.xdp_mode) {
                Ok(mode) => {
                    log::info!("attached to {interface} in {mode} mode");
                    self.waiting.remove(interface);
                }
                Err(FilterError::Interface(InterfaceError::NoSuchInterface { .. })) => {
                    if self.waiting.insert(interface.clone()) {
                        log::warn!(
                            "interface {interface} does not exist (yet); it is attached as soon as it appears (looked for every {} s)",
                            INTERFACE_CHECK.as_secs()
                        );
                    }
                }
                Err(error) => failure = failure.or(Some(error)),
            }
        }
        if self.filter.attachments().is_empty() && failure.is_none() && !interfaces.is_empty() {
            return Err(DaemonError::NoInterface {
                interfaces: self.config.interfaces.clone(),
            });
        }
        failure.map_or(Ok(()), |error| Err(error.into()))
    }

    /// Swaps this build's program onto every pinned link of a configured interface (the old
    /// program stays where a swap fails: the interface is never left without a filter), and
    /// detaches from pinned interfaces no longer configured. Returns the interfaces where the
    /// old program stays.
    fn take_over(
        &mut self,
        pinned_links: &[(String, PathBuf)],
    ) -> Result<Vec<String>, DaemonError> {
        let previous = self.instance.read_state().ok();
        let mut kept = Vec::new();
        for (interface, path) in pinned_links {
            if !self.config.interfaces.contains(interface) {
                match std::fs::remove_file(path) {
                    Ok(()) => log::info!("detached from {interface}: no longer configured"),
                    Err(error) => log::error!("cannot remove {}: {error}", path.display()),
                }
                continue;
            }
            let mode = previous
                .as_ref()
                .and_then(|state| state.interfaces.iter().find(|i| &i.name == interface))
                .map_or(AttachedMode::Native, |state| state.mode);
            match self.filter.adopt(interface, mode, path) {
                Ok(()) => {
                    log::info!("took over {interface} ({mode} mode): program replaced in place")
                }
                Err(error) if error.link_is_gone() => {
                    // The interface went away under the link: nothing runs there now.
                    log::warn!("{error}; attaching afresh");
                    let _ = std::fs::remove_file(path);
                    let mode = self.filter.attach(interface, self.config.xdp_mode)?;
                    log::info!("attached to {interface} in {mode} mode");
                }
                Err(error) => {
                    kept.push(interface.clone());
                    log::error!(
                        "{error}; the previous program stays attached to {interface} and keeps enforcing"
                    );
                }
            }
        }
        Ok(kept)
    }

    /// After an upgrade's program swap: carries the counters of the maps of older layouts
    /// over, then removes those maps. Kept while any link may still run the old program.
    fn retire_layouts(&mut self, older: &[PathBuf]) {
        // A packet that started on the old program before the swap finishes within this.
        std::thread::sleep(std::time::Duration::from_millis(20));
        for dir in older {
            let carried = upgrade::carry_over(dir, &mut self.maps);
            log::info!("upgrade: carried over {carried} from {}", dir.display());
            if let Err(error) = self.instance.remove_layout(dir) {
                log::error!("upgrade: {error}");
            }
        }
    }

    /// Tells the program what every attached interface is (MAC address, link type, whether
    /// resets may leave it), and forgets interfaces it no longer runs on.
    fn sync_interfaces(&mut self) -> Result<(), DaemonError> {
        let mut indices = Vec::new();
        for attachment in self.filter.attachments() {
            let facts = &attachment.facts;
            if let Some(reason) = facts.resets_withheld_because()
                && self.policy_may_reject()
            {
                log::warn!("{reason}");
            }
            self.maps.set_interface(facts.index, facts.info())?;
            indices.push(facts.index);
        }
        self.maps.retain_interfaces(&indices);
        Ok(())
    }

    /// Asks the kernel again about the configured interfaces: one re-created (a new index:
    /// a PPP reconnect, a tunnel restart, a driver reload) or renamed away lost its program
    /// and is attached afresh; one that appeared is attached; a changed MAC address or VLAN
    /// offload setting changes what a reset may do, and is passed on to the program.
    fn check_interfaces(&mut self) {
        let mut changed = Vec::new();
        for interface in self.config.interfaces.clone() {
            let now = Interface::lookup(&interface).ok();
            let attached = self.filter.attachment(&interface).map(|a| a.facts.index);
            match (attached, now) {
                (Some(index), Some(now)) if index == now.index => {}
                (Some(_), now) => {
                    log::warn!(
                        "interface {interface} was {}: its filter went with it; attaching afresh",
                        if now.is_some() {
                            "re-created or renamed"
                        } else {
                            "removed"
                        }
                    );
                    if let Err(error) = self.filter.forget(&interface) {
                        log::warn!("{error}");
                    }
                    changed.push(interface.clone());
                    if now.is_some() {
                        let _ = self.attach_or_wait(std::slice::from_ref(&interface));
                    } else {
                        self.waiting.insert(interface.clone());
                    }
                }
                (None, Some(_)) => {
                    changed.push(interface.clone());
                    if let Err(error) = self.attach_or_wait(std::slice::from_ref(&interface)) {
                        log::error!("{error}");
                    }
                }
                (None, None) => {}
            }
        }
        changed.extend(
            self.filter
                .refresh_facts()
                .iter()
                .map(|attachment| attachment.interface.clone()),
        );
        if changed.is_empty() {
            return;
        }
        log::info!("interfaces changed: {}", changed.join(", "));
        if let Err(error) = self.sync_interfaces() {
            log::error!("{error}");
        }
        if let Err(error) = set_link_pins(&mut self.filter, &self.instance, self.config.on_exit) {
            log::error!("{error}");
        }
        self.record_state();
    }

    /// Whether the configuration asks for resets anywhere: the top level, a scope, a rule.
    fn policy_may_reject(&self) -> bool {
        let config = &self.config;
        config.action == Action::Reject
            || config
                .scopes
                .iter()
                .any(|scope| scope.action == Action::Reject)
            || config
                .all_rules()
                .any(|(_, rule)| rule.action == Some(Action::Reject))
    }

    /// Asks DNS again about the names that are due, and fetches the URL lists that are due;
    /// applies the policy if an answer or a list changed.
    async fn refresh_sources(&mut self) -> Result<Option<ApplyReport>, DaemonError> {
        let mut fetched = self.fetched.clone();
        let (changed, notes) = sources::refresh_due(
            &self.config,
            &self.dns,
            &self.web,
            &mut fetched,
            std::time::Instant::now(),
        )
        .await;
        log_warnings(&notes.warnings);
        count_notes(&self.telemetry, &notes);
        if !changed {
            // A name that went stale, or is held back, is news for `stats` without a new policy.
            let news = !sources::same_status(&self.fetched, &fetched);
            self.fetched = fetched;
            if news {
                self.write_state(true)?;
            }
            return Ok(None);
        }
        let outcome = fleet::compose(&self.config, &fetched, self.fleet.as_ref())
            .map_err(DaemonError::from)
            .and_then(|(policy, warnings)| {
                log_warnings(&warnings);
                let report = apply(&mut self.maps, &policy)?;
                Ok((policy, report))
            });
        match outcome {
            Ok((policy, report)) => {
                self.note_applied();
                count_refused(&self.telemetry, &policy.refused);
                crate::reclaim::drop_later((
                    std::mem::replace(&mut self.policy, Arc::new(policy)),
                    std::mem::replace(&mut self.fetched, fetched),
                ));
                self.record_state();
                self.save_store();
                Ok(Some(report))
            }
            Err(error) => {
                // Keep the answers the running policy was built from, but ask again later
                // rather than at once.
                for (name, resolution) in &mut self.fetched.names {
                    if let Some(new) = fetched.names.get(name) {
                        resolution.refresh_at = new.refresh_at;
                    }
                }
                for (url, content) in &mut self.fetched.urls {
                    if let Some(new) = fetched.urls.get(url) {
                        content.refresh_at = new.refresh_at;
                    }
                }
                Err(error)
            }
        }
    }

    /// Re-reads the configuration, its files and DNS names, and applies it whole, or not at all.
    async fn reload(&mut self) -> Result<ApplyReport, DaemonError> {
        let started = std::time::Instant::now();
        // A reload is when an admin expects a re-created or newly present interface to count.
        self.check_interfaces();
        let config = Config::load(&self.config_path)?;
        let dns = if config.dns == self.config.dns {
            None
        } else {
            Some(Dns::new(&config.dns)?)
        };
        // A changed CA file is read again, so is an unchanged one: it may have been replaced.
        let web = Web::new(&config.urls)?;
        // An explicit reload takes what DNS says now, grown or not.
        let previous = Previous {
            fetched: &self.fetched,
            store: Some(&self.store),
            hold_growth: false,
        };
        let (fetched, notes) =
            sources::fetch(&config, dns.as_ref().unwrap_or(&self.dns), &web, &previous)
                .await
                .map_err(Box::new)?;
        log_warnings(&notes.warnings);
        count_notes(&self.telemetry, &notes);
        if config.fleet != self.config.fleet {
            return Err(DaemonError::NeedsRestart {
                what: "[fleet]",
                from: describe_fleet(self.config.fleet.as_ref()),
                to: describe_fleet(config.fleet.as_ref()),
            });
        }
        let (policy, warnings) = fleet::compose(&config, &fetched, self.fleet.as_ref())?;
        log_warnings(&warnings);
        log::info!(
            "read, resolved and built {} prefixes in {:.0} ms",
            policy.entries().count(),
            started.elapsed().as_secs_f64() * 1e3
        );
        if config.xdp_mode != self.config.xdp_mode {
            return Err(DaemonError::NeedsRestart {
                what: "xdp_mode",
                from: self.config.xdp_mode.to_string(),
                to: config.xdp_mode.to_string(),
            });
        }
        let added: Vec<String> = config
            .interfaces
            .iter()
            .filter(|interface| !self.config.interfaces.contains(interface))
            .cloned()
            .collect();
        let removed: Vec<String> = self
            .config
            .interfaces
            .iter()
            .filter(|interface| !config.interfaces.contains(interface))
            .cloned()
            .collect();
        // A new metrics address is bound before anything is applied, so a busy port refuses
        // the reload as a whole.
        let new_metrics = match config.metrics_listen {
            Some(address)
                if self.metrics.as_ref().map(|(current, _)| *current) != Some(address) =>
            {
                Some((
                    address,
                    start_metrics(
                        address,
                        &self.instance.maps_dir(LAYOUT_STAMP),
                        self.counter_map_ids,
                        &self.telemetry,
                    )
                    .await?,
                ))
            }
            _ => None,
        };
        let mut attached = Vec::new();
        let mut missing = Vec::new();
        let outcome = (|| {
            for interface in &added {
                match self.filter.attach(interface, config.xdp_mode) {
                    Ok(mode) => {
                        log::info!("attached to {interface} in {mode} mode");
                        attached.push(interface.clone());
                    }
                    // Waited for, as at start.
                    Err(FilterError::Interface(InterfaceError::NoSuchInterface { .. })) => {
                        missing.push(interface.clone());
                    }
                    Err(error) => return Err(error.into()),
                }
            }
            Ok::<_, DaemonError>(apply(&mut self.maps, &policy)?)
        })();
        let report = match outcome {
            Ok(report) => {
                self.note_applied();
                log::info!(
                    "generation {} in force {:.0} ms after the signal",
                    report.generation,
                    started.elapsed().as_secs_f64() * 1e3
                );
                report
            }
            Err(error) => {
                for interface in &attached {
                    if let Err(detach_error) = self.filter.detach(interface) {
                        log::error!("{detach_error}");
                    }
                }
                if let Some((_, task)) = new_metrics {
                    task.abort();
                }
                return Err(error);
            }
        };
        for interface in &removed {
            self.waiting.remove(interface);
            match self.filter.detach(interface) {
                Ok(()) => log::info!("detached from {interface}"),
                Err(error) => log::error!("{error}"),
            }
        }
        for interface in missing {
            log::warn!(
                "interface {interface} does not exist (yet); it is attached as soon as it appears"
            );
            self.waiting.insert(interface);
        }
        if let Err(error) = set_link_pins(&mut self.filter, &self.instance, config.on_exit) {
            log::error!("{error}");
        }
        self.pins.remove = config.on_exit == OnExit::Detach;
        if let Some(started) = new_metrics {
            if let Some((_, old)) = self.metrics.replace(started) {
                old.abort();
            }
        } else if config.metrics_listen.is_none()
            && let Some((address, old)) = self.metrics.take()
        {
            old.abort();
            log::info!("metrics: no longer serving on {address}");
        }
        count_refused(&self.telemetry, &policy.refused);
        self.config = config;
        crate::reclaim::drop_later((
            std::mem::replace(&mut self.policy, Arc::new(policy)),
            std::mem::replace(&mut self.fetched, fetched),
        ));
        if let Some(dns) = dns {
            self.dns = dns;
        }
        self.web = web;
        // A reload is also when an admin expects a changed interface setting to count.
        let _ = self.filter.refresh_facts();
        if let Err(error) = self.sync_interfaces() {
            log::error!("{error}");
        }
        // The new policy is in force whatever happens to the record of it, which is
        // written off this path.
        self.record_state();
        let stored = std::time::Instant::now();
        self.save_store();
        log::info!(
            "state queued, last good answers stored in {:.0} ms; reload done {:.0} ms after the signal",
            stored.elapsed().as_secs_f64() * 1e3,
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(report)
    }

    /// One line for `systemctl status`.
    fn status(&self) -> String {
        format!(
            "{} mode, policy generation {}: {} allow and {} deny prefixes",
            self.policy.mode(),
            self.maps.generation(),
            self.policy.count(List::Allow),
            self.policy.count(List::Deny)
        )
    }

    fn count_reload(&self, ok: bool) {
        if let Ok(mut telemetry) = self.telemetry.lock() {
            if ok {
                telemetry.reloads_ok += 1;
            } else {
                telemetry.reloads_error += 1;
            }
        }
    }

    /// A policy was applied just now (at start, on SIGHUP, after a refresh): the time an
    /// alert on stale reloads reads.
    fn note_applied(&self) {
        if let Ok(mut telemetry) = self.telemetry.lock() {
            telemetry.last_apply_unix = unix_now();
        }
    }

    /// Shares what DNS last said (failures, stale or held-back answers) and which list files
    /// are stale with the metrics endpoint.
    fn publish_dns(&self) {
        if let Ok(mut telemetry) = self.telemetry.lock() {
            telemetry.set_sources(&self.fetched);
        }
    }

    /// Records the answers and list files the policy in force was built from, for a restart
    /// without DNS. A failure is logged: the policy is in force all the same.
    fn save_store(&mut self) {
        match self.store.save(&self.fetched) {
            Ok(true) => log::info!(
                "last good answers recorded in {}",
                self.store.dir().display()
            ),
            Ok(false) => {}
            Err(error) => log::error!("{error}; a restart while DNS is down cannot use it"),
        }
    }

    fn describe(&self, report: &ApplyReport) -> String {
        let scopes: Vec<String> = self
            .policy
            .scopes
            .iter()
            .filter(|scope| scope.guarded)
            .map(|scope| {
                let ports: Vec<String> = scope.ports.iter().map(ToString::to_string).collect();
                let name = if self.policy.scoped() {
                    format!("scope {:?}: ", scope.name)
                } else {
                    String::new()
                };
                format!(
                    "{name}{} mode, unlisted {}, port {}",
                    scope.mode,
                    scope.unlisted_action,
                    ports.join(",")
                )
            })
            .collect();
        format!(
            "generation {} ({}): {} allow and {} deny prefixes; {} entries written, {} counters retired, IPv4 table {}, in {:.1} ms",
            report.generation,
            scopes.join("; "),
            self.policy.count(List::Allow),
            self.policy.count(List::Deny),
            report.written,
            report.removed,
            report.ipv4_table,
            report.elapsed.as_secs_f64() * 1000.0
        )
    }

    /// Records the instance for `stats`, `report` and the next daemon, before returning;
    /// `running` is false once this daemon has exited and left the filter in place. A record
    /// queued before is superseded by this one; one being written finishes first.
    fn write_state(&self, running: bool) -> Result<(), DaemonError> {
        self.state_writer.supersede();
        self.state_job(running)
            .write(&self.instance, &self.telemetry)?;
        self.publish_dns();
        Ok(())
    }

    /// Queues the record of the running daemon for the state writer: the policy is in
    /// force already, and listing a large one must not hold up what comes next. A failure
    /// is logged there.
    fn record_state(&self) {
        self.state_writer
            .submit(self.state_job(true), &self.instance, &self.telemetry);
        self.publish_dns();
    }

    /// A snapshot of what the state file records: the prefixes are listed by the writer.
    fn state_job(&self, running: bool) -> StateJob {
        let state = RunState {
            pid: if running { std::process::id() } else { 0 },
            on_exit: self.config.on_exit,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            config: self.config_path.clone(),
            generation: self.maps.generation(),
            applied_at_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_secs()),
            interfaces: self
                .filter
                .attachments()
                .iter()
                .map(|attachment| InterfaceState {
                    name: attachment.interface.clone(),
                    mode: attachment.mode,
                    kind: attachment.facts.kind,
                    resets_withheld: !attachment.facts.resets_allowed(),
                })
                .collect(),
            ports: self.policy.default_scope().ports.iter().copied().collect(),
            mode: self.policy.default_scope().mode,
            action: self.policy.default_scope().unlisted_action,
            scopes: self
                .policy
                .scopes
                .iter()
                .map(|scope| ScopeState {
                    name: scope.name.clone(),
                    destinations: scope.destinations.clone(),
                    guarded: scope.guarded,
                    ports: scope.ports.iter().copied().collect(),
                    mode: scope.mode,
                    action: scope.unlisted_action,
                })
                .collect(),
            prefixes: Vec::new(),
            counter_map_ids: self.counter_map_ids,
            boot: self.boot,
            waiting: self.waiting.iter().cloned().collect(),
            layout: LAYOUT_STAMP,
            sources: self.fetched.not_current(),
        };
        StateJob {
            state,
            policy: Arc::clone(&self.policy),
            counter_ids: self.maps.counter_id_snapshot(),
            prefix_series: self.config.metrics_prefixes,
        }
    }

    fn stop(mut self) {
        let interfaces: Vec<String> = self
            .filter
            .attachments()
            .iter()
            .map(|attachment| attachment.interface.clone())
            .collect();
        match self.config.on_exit {
            OnExit::Keep => {
                if let Err(error) = self.write_state(false) {
                    log::error!("{error}");
                }
                log::info!(
                    "exiting; the filter stays attached to {} with policy generation {} (on_exit = keep); `smtpguard detach` removes it",
                    interfaces.join(", "),
                    self.maps.generation()
                );
            }
            OnExit::Detach => {
                for interface in &interfaces {
                    if let Err(error) = self.filter.detach(interface) {
                        log::error!("{error}");
                    }
                }
                log::info!("detached from {} (on_exit = detach)", interfaces.join(", "));
            }
        }
    }
}

/// The pinned links that filter the interface they are named after: a link whose interface
/// went away is defunct, one whose interface was renamed runs on another device. Their pins
/// are removed (which detaches a renamed device, no longer the one configured).
fn live_links(pinned: Vec<(String, PathBuf)>, configured: &[String]) -> Vec<(String, PathBuf)> {
    let mut live = Vec::new();
    for (interface, path) in pinned {
        let linked = link::xdp_link_ifindex(&path);
        let current = Interface::lookup(&interface).map(|facts| facts.index);
        match (&linked, &current) {
            (Ok(index), Ok(now)) if *index != 0 && index == now => {
                live.push((interface, path));
                continue;
            }
            _ => {}
        }
        let why = match (linked, current) {
            (Ok(0), _) => "its interface went away".to_owned(),
            (Ok(index), Ok(now)) => {
                format!("it runs on interface index {index}, {interface} is now {now}")
            }
            (Ok(_), Err(_)) => format!("{interface} does not exist"),
            (Err(error), _) => format!("it cannot be read: {error}"),
        };
        let configured = if configured.contains(&interface) {
            ""
        } else {
            " (no longer configured)"
        };
        // Detached before the pin goes where it can be (a link on a renamed device), so the
        // interface is free for a fresh attach at once.
        match link::detach_pinned(&path).or_else(|_| std::fs::remove_file(&path)) {
            Ok(()) => log::warn!(
                "the link pinned for {interface}{configured} does not filter it: {why}; pin removed"
            ),
            Err(error) => log::error!("cannot remove {}: {error}", path.display()),
        }
    }
    live
}

/// Pins every link when the filter is to outlive the daemon, unpins them when not.
fn set_link_pins(
    filter: &mut Filter,
    instance: &Instance,
    on_exit: OnExit,
) -> Result<(), DaemonError> {
    let interfaces: Vec<String> = filter
        .attachments()
        .iter()
        .map(|attachment| attachment.interface.clone())
        .collect();
    for interface in interfaces {
        match on_exit {
            OnExit::Keep => filter.pin_link(&interface, &instance.link_pin(&interface))?,
            OnExit::Detach => filter.unpin_link(&interface)?,
        }
    }
    Ok(())
}

/// The instance's last-good store; without one (it cannot be created or read) the daemon runs
/// all the same, and says what that costs.
fn open_store(instance: &Instance) -> Store {
    let (store, problem) = Store::open(&instance.state_dir());
    if let Some(problem) = problem {
        log::error!(
            "{problem}; running without last good answers: a restart while DNS is down cannot use them"
        );
    }
    store
}

impl From<crate::fleet::FleetError> for DaemonError {
    fn from(error: crate::fleet::FleetError) -> Self {
        Self::Fleet(Box::new(error))
    }
}

/// `[fleet]` in a few words, for a refused reload.
fn describe_fleet(settings: Option<&crate::fleet::FleetSettings>) -> String {
    settings.map_or_else(
        || "none".to_owned(),
        |settings| {
            format!(
                "group {:?} through {}",
                settings.group,
                settings.connection.endpoints.join(",")
            )
        },
    )
}

/// Builds the policy, saying what it is doing if that takes more than a second.
fn build_policy(config: &Config, fetched: &Fetched) -> Result<(Policy, Vec<Warning>), ConfigError> {
    let entries = fetched.files.values().map(Vec::len).sum::<usize>()
        + fetched
            .urls
            .values()
            .map(|content| content.entries.len())
            .sum::<usize>()
        + fetched
            .names
            .values()
            .map(|resolution| resolution.nets.len())
            .sum::<usize>();
    let _progress = crate::progress::Progress::start(
        format!("building the policy from {entries} list entries and DNS prefixes"),
        0,
    );
    Policy::build(config, fetched)
}

/// Applies `policy`, saying what it is doing if that takes more than a second.
fn apply(maps: &mut PolicyMaps, policy: &Policy) -> Result<ApplyReport, ApplyError> {
    let _progress = crate::progress::Progress::start(
        format!(
            "applying generation {}: {} allow and {} deny prefixes into the maps",
            maps.generation().wrapping_add(1),
            policy.count(List::Allow),
            policy.count(List::Deny)
        ),
        0,
    );
    maps.apply(policy)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Counts what fetching reports: refused prefixes, and each URL fetch by result.
fn count_notes(telemetry: &SharedTelemetry, notes: &sources::Notes) {
    count_refused(telemetry, &notes.refused);
    if !notes.fetches.is_empty()
        && let Ok(mut telemetry) = telemetry.lock()
    {
        telemetry.count_fetches(&notes.fetches);
    }
}

fn count_refused(telemetry: &SharedTelemetry, refused: &[Refusal]) {
    if !refused.is_empty()
        && let Ok(mut telemetry) = telemetry.lock()
    {
        telemetry.count_refused(refused);
    }
}

/// At most this many warnings about one file are logged by an apply; the rest are summed up
/// in one line. A feed of a million lines with thousands of repeats would otherwise write
/// thousands of lines at every reload; `smtpguard check` lists every one.
const WARNINGS_PER_FILE: usize = 10;

fn log_warnings(warnings: &[Warning]) {
    let mut per_file: std::collections::BTreeMap<&std::path::Path, usize> = Default::default();
    for warning in warnings {
        let seen = per_file.entry(&warning.at.file).or_default();
        *seen += 1;
        if *seen <= WARNINGS_PER_FILE {
            log::warn!("{warning}");
        }
    }
    for (file, count) in per_file {
        if count > WARNINGS_PER_FILE {
            log::warn!(
                "{} more warnings about {} not logged; `smtpguard check --config FILE` lists them all",
                count - WARNINGS_PER_FILE,
                file.display()
            );
        }
    }
}

/// Removes the instance's pins and state file when the daemon goes away, unless the filter
/// is to stay (`on_exit = "keep"`, or a failed start that found another daemon's filter).
struct PinsGuard {
    instance: Instance,
    remove: bool,
}

impl Drop for PinsGuard {
    fn drop(&mut self) {
        if self.remove
            && let Err(error) = self.instance.clean_up()
        {
            log::warn!("cleaning up: {error}");
        }
    }
}
