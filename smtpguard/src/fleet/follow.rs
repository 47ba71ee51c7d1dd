//! A daemon's link to its group: a task that reads the published policy, watches it, hands
//! each revision to the daemon, and keeps the host's report under a lease. When the cluster
//! is away it retries with backoff and says so; the daemon keeps the policy in force
//! meanwhile, and catches up from the latest revision when the cluster answers again.

use std::time::Duration;

use etcd_client::{Client, PutOptions, WatchOptions};
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};

use super::{FleetError, FleetSettings, HostReport, Keys, Member, Published, read_published};

/// The first wait before reconnecting, doubled up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// How long one request may take before the cluster counts as away.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// What the follower tells the daemon.
pub enum Event {
    /// The group's policy as published now (the daemon checks it before anything else).
    Published(Published),
    /// The cluster answers (or stopped answering).
    Connected(bool),
}

/// The running follower of one group.
pub struct Follower {
    events: mpsc::Receiver<Event>,
    reports: watch::Sender<HostReport>,
    leave: Option<oneshot::Sender<oneshot::Sender<()>>>,
    task: JoinHandle<()>,
}

impl Follower {
    /// Starts following `settings.group`, reporting `report` until told otherwise.
    pub fn start(settings: FleetSettings, report: HostReport) -> Self {
        let (events_tx, events) = mpsc::channel(16);
        let (reports, reports_rx) = watch::channel(report);
        let (leave, leave_rx) = oneshot::channel();
        let task = tokio::spawn(run(settings, events_tx, reports_rx, leave_rx));
        Self {
            events,
            reports,
            leave: Some(leave),
            task,
        }
    }

    /// The next event; pending forever once the task is gone.
    pub async fn next(&mut self) -> Event {
        match self.events.recv().await {
            Some(event) => event,
            None => std::future::pending().await,
        }
    }

    /// Replaces the host's report (written at once, and again as the lease is kept).
    pub fn report(&self, report: HostReport) {
        self.reports.send_replace(report);
    }

    /// Withdraws the host's report (revokes its lease) before the daemon exits, waiting at
    /// most `timeout` for the cluster.
    pub async fn leave(mut self, timeout: Duration) {
        if let Some(leave) = self.leave.take() {
            let (done, wait) = oneshot::channel();
            if leave.send(done).is_ok() {
                let _ = tokio::time::timeout(timeout, wait).await;
            }
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(
    settings: FleetSettings,
    events: mpsc::Sender<Event>,
    mut reports: watch::Receiver<HostReport>,
    mut leave: oneshot::Receiver<oneshot::Sender<()>>,
) {
    let mut backoff = MIN_BACKOFF;
    let mut connected = false;
    loop {
        let started = std::time::Instant::now();
        let mut session = Session {
            settings: &settings,
            keys: Keys::new(&settings.group),
            endpoints: settings.connection.endpoints.join(","),
            events: &events,
            connected: &mut connected,
        };
        let outcome = session.run(&mut reports, &mut leave).await;
        if *session.connected {
            *session.connected = false;
            let _ = events.send(Event::Connected(false)).await;
        }
        match outcome {
            Ok(()) => return,
            Err(error) => {
                if started.elapsed() > MAX_BACKOFF * 2 {
                    backoff = MIN_BACKOFF;
                }
                log::warn!(
                    "fleet: group {:?}: {error}; the policy in force stays; retrying in {:.1} s",
                    settings.group,
                    backoff.as_secs_f64()
                );
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    done = &mut leave => {
                        if let Ok(done) = done {
                            let _ = done.send(());
                        }
                        return;
                    }
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// One connection's worth of following.
struct Session<'a> {
    settings: &'a FleetSettings,
    keys: Keys,
    endpoints: String,
    events: &'a mpsc::Sender<Event>,
    connected: &'a mut bool,
}

/// A request that counts as failed after [`REQUEST_TIMEOUT`].
async fn timed<T>(
    endpoints: &str,
    what: &'static str,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, FleetError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(result) => result.map_err(|source| FleetError::Etcd {
            endpoints: endpoints.to_owned(),
            what,
            source: Box::new(source),
        }),
        Err(_) => Err(FleetError::Etcd {
            endpoints: endpoints.to_owned(),
            what,
            source: Box::new(etcd_client::Error::IoError(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()),
            ))),
        }),
    }
}

impl Session<'_> {
    async fn run(
        &mut self,
        reports: &mut watch::Receiver<HostReport>,
        leave: &mut oneshot::Receiver<oneshot::Sender<()>>,
    ) -> Result<(), FleetError> {
        let mut client = super::connect(&self.settings.connection).await?;
        let revision = self.read(&mut client).await?;
        if !*self.connected {
            *self.connected = true;
            log::info!(
                "fleet: following group {:?} through {}",
                self.settings.group,
                self.endpoints
            );
            let _ = self.events.send(Event::Connected(true)).await;
        }
        let ttl = self.settings.report_ttl.as_secs().max(2) as i64;
        let endpoints = self.endpoints.clone();
        let lease = timed(
            &endpoints,
            "granting the report's lease",
            client.lease_grant(ttl, None),
        )
        .await?
        .id();
        let (mut keeper, mut acks) = timed(
            &endpoints,
            "keeping the lease",
            client.lease_keep_alive(lease),
        )
        .await?;
        let member = Member {
            host: self.settings.host.clone(),
            joined_at_unix: super::unix_now(),
        };
        let member = serde_json::to_vec(&member).expect("plain data");
        timed(
            &endpoints,
            "recording the host",
            client.put(self.keys.member(&self.settings.host), member, None),
        )
        .await?;
        let report = reports.borrow_and_update().clone();
        self.put_report(&mut client, lease, &report).await?;
        let mut watcher = timed(
            &endpoints,
            "watching the policy",
            client.watch(
                self.keys.policy(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            ),
        )
        .await?;
        let mut keep = tokio::time::interval(Duration::from_secs((ttl as u64 / 3).max(1)));
        keep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = watcher.message() => {
                    let message = message.map_err(|source| FleetError::Etcd {
                        endpoints: endpoints.clone(),
                        what: "watching the policy",
                        source: Box::new(source),
                    })?;
                    match message {
                        Some(response) if response.canceled() => {
                            return Err(FleetError::Etcd {
                                endpoints: endpoints.clone(),
                                what: "watching the policy",
                                source: Box::new(etcd_client::Error::WatchError(format!(
                                    "watch cancelled: {}",
                                    response.cancel_reason()
                                ))),
                            });
                        }
                        Some(response) if !response.events().is_empty() => {
                            self.read(&mut client).await?;
                        }
                        Some(_) => {}
                        None => {
                            return Err(FleetError::Etcd {
                                endpoints: endpoints.clone(),
                                what: "watching the policy",
                                source: Box::new(etcd_client::Error::WatchError("the watch ended".to_owned())),
                            });
                        }
                    }
                }
                _ = keep.tick() => {
                    timed(&endpoints, "keeping the lease", keeper.keep_alive()).await?;
                    let ack = timed(&endpoints, "keeping the lease", acks.message()).await?;
                    if ack.is_none_or(|ack| ack.ttl() <= 0) {
                        return Err(FleetError::Etcd {
                            endpoints: endpoints.clone(),
                            what: "keeping the lease",
                            source: Box::new(etcd_client::Error::LeaseKeepAliveError(
                                "the lease expired".to_owned(),
                            )),
                        });
                    }
                    // Refreshes `reported_at` and the counters the daemon last gave.
                    let report = reports.borrow_and_update().clone();
                    self.put_report(&mut client, lease, &report).await?;
                }
                changed = reports.changed() => {
                    if changed.is_ok() {
                        let report = reports.borrow_and_update().clone();
                        self.put_report(&mut client, lease, &report).await?;
                    }
                }
                done = &mut *leave => {
                    let _ = timed(&endpoints, "revoking the lease", client.lease_revoke(lease)).await;
                    if let Ok(done) = done {
                        let _ = done.send(());
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Reads the published policy and hands it to the daemon; the cluster's revision.
    async fn read(&mut self, client: &mut Client) -> Result<i64, FleetError> {
        let read = tokio::time::timeout(
            REQUEST_TIMEOUT,
            read_published(client, &self.keys, &self.endpoints),
        )
        .await;
        let Ok(read) = read else {
            return Err(FleetError::Etcd {
                endpoints: self.endpoints.clone(),
                what: "reading the published policy",
                source: Box::new(etcd_client::Error::IoError(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no answer",
                ))),
            });
        };
        let (published, revision) = read?;
        if let Some(published) = published {
            let _ = self.events.send(Event::Published(published)).await;
        }
        Ok(revision)
    }

    async fn put_report(
        &self,
        client: &mut Client,
        lease: i64,
        report: &HostReport,
    ) -> Result<(), FleetError> {
        let report = HostReport {
            reported_at_unix: super::unix_now(),
            ..report.clone()
        };
        let value = serde_json::to_vec(&report).expect("plain data");
        timed(
            &self.endpoints,
            "writing the host's report",
            client.put(
                self.keys.host(&self.settings.host),
                value,
                Some(PutOptions::new().with_lease(lease)),
            ),
        )
        .await?;
        Ok(())
    }
}
