//! The fleet: one policy for every gateway, through etcd (the v3 API, through the
//! `etcd-client` crate). `publish` compiles a central configuration once and writes it as a
//! [`snapshot`] in one guarded transaction; each daemon with a `[fleet]` section
//! [`follow`]s the group, applies each revision through the same atomic path as SIGHUP, keeps
//! the last one for a start without etcd, and reports what it applied under a lease;
//! [`status`] reads those reports back.
//!
//! Keys, under `/smtpguard/fleet/GROUP/`:
//! - `policy/manifest`: the snapshot's [`snapshot::Manifest`] (JSON); its `mod_revision` is the
//!   group's published revision;
//! - `policy/snapshot`: the compressed payload, written in the same transaction;
//! - `hosts/HOST`: what HOST applied ([`HostReport`], JSON), attached to HOST's lease;
//! - `members/HOST`: that HOST follows the group (no lease): a host whose report expired is
//!   shown as silent rather than forgotten.

pub mod follow;
pub mod publish;
pub mod snapshot;
pub mod status;

use std::{path::Path, path::PathBuf, time::Duration};

use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};
use serde::{Deserialize, Serialize};

use crate::source::config::{MAX_CONFIG_BYTES, read_text};
pub use crate::source::fleet::{
    Connection, DEFAULT_REPORT_TTL, FleetSettings, name_problem, system_host_name,
};

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("etcd ({endpoints}): {what}: {source}")]
    Etcd {
        endpoints: String,
        what: &'static str,
        #[source]
        source: Box<etcd_client::Error>,
    },
    #[error("{path}: cannot read: {source}", path = path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: Box<crate::source::config::ConfigError>,
    },
    #[error("group {group:?}: the published policy does not validate: {source}")]
    Snapshot {
        group: String,
        #[source]
        source: snapshot::SnapshotError,
    },
    #[error("group {group:?}: nothing published yet")]
    NotPublished { group: String },
    #[error(
        "group {group:?} was published by someone else (revision {now}) after this publish read revision {read}; nothing written: run publish again to see the difference to what is there now"
    )]
    Raced { group: String, read: i64, now: i64 },
    #[error(
        "this publish removes {removed} of the {current} allow prefixes group {group:?} has ({share:.0}%), more than the {max:.0}% --max-allow-removal allows; nothing written: check the difference above, and publish with --force if that is what you mean"
    )]
    TooMuchRemoved {
        group: String,
        removed: usize,
        current: usize,
        share: f64,
        max: f64,
    },
    #[error(
        "the snapshot is {bytes} bytes compressed, more than the {limit} one etcd request may carry (--max-request-bytes, etcd's --max-request-bytes); nothing written"
    )]
    TooLarge { bytes: usize, limit: usize },
    #[error("bad {what} {value:?}: {reason}")]
    BadName {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// Checks a group name given on the command line.
pub fn check_group(group: &str) -> Result<(), FleetError> {
    match name_problem(group) {
        Some(reason) => Err(FleetError::BadName {
            what: "group",
            value: group.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// The keys of one group.
#[derive(Clone, Debug)]
pub struct Keys {
    pub group: String,
}

impl Keys {
    pub fn new(group: &str) -> Self {
        Self {
            group: group.to_owned(),
        }
    }

    fn root(&self) -> String {
        format!("/smtpguard/fleet/{}/", self.group)
    }

    /// The prefix of the published policy's keys: read and watched together.
    pub fn policy(&self) -> String {
        format!("{}policy/", self.root())
    }

    pub fn manifest(&self) -> String {
        format!("{}manifest", self.policy())
    }

    pub fn snapshot(&self) -> String {
        format!("{}snapshot", self.policy())
    }

    pub fn hosts(&self) -> String {
        format!("{}hosts/", self.root())
    }

    pub fn host(&self, host: &str) -> String {
        format!("{}{host}", self.hosts())
    }

    pub fn members(&self) -> String {
        format!("{}members/", self.root())
    }

    pub fn member(&self, host: &str) -> String {
        format!("{}{host}", self.members())
    }
}

/// What a daemon says about itself under `hosts/HOST`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReport {
    pub host: String,
    /// The group revision in force (0: none yet, the local rules alone).
    pub revision: i64,
    pub hash: String,
    /// The policy generation in the maps.
    pub generation: u32,
    pub mode: String,
    /// When the revision was applied (Unix seconds).
    pub applied_at_unix: u64,
    /// When this report was written (Unix seconds).
    pub reported_at_unix: u64,
    /// Prefixes of the host's own rules merged into the group's.
    pub local_prefixes: usize,
    /// Why the newest published revision is not in force, if it was refused.
    pub refused: Option<String>,
    pub syn_allowed: u64,
    pub syn_denied: u64,
    pub syn_unlisted: u64,
    pub version: String,
    /// The lease of the report: it is written again within a third of it.
    #[serde(default)]
    pub report_ttl_secs: u64,
}

/// What a host records that it follows the group (`members/HOST`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub host: String,
    pub joined_at_unix: u64,
}

/// The published policy as read: the manifest's revision, the manifest and the payload.
pub struct Published {
    pub revision: i64,
    pub manifest_bytes: Vec<u8>,
    pub compressed: Vec<u8>,
}

impl Published {
    /// Checks and decodes it.
    pub fn decode(
        &self,
        group: &str,
    ) -> Result<(snapshot::Manifest, crate::policy::Policy), FleetError> {
        let wrap = |source| FleetError::Snapshot {
            group: group.to_owned(),
            source,
        };
        let manifest = snapshot::read_manifest(&self.manifest_bytes).map_err(wrap)?;
        let policy = snapshot::decode(&manifest, &self.compressed).map_err(wrap)?;
        Ok((manifest, policy))
    }
}

/// Where the next connection starts looking: successive sessions try the members in turn.
static NEXT_MEMBER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How long a member has to answer before the next one is tried.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long [`connect`] goes on trying the members while their answers say the cluster is
/// busy (an election after its leader died takes a second or two): a publish at that moment
/// waits for the new leader instead of failing.
const CONNECT_PATIENCE: Duration = Duration::from_secs(10);

/// Opens a client on the first member (in turn) that answers a linearizable read: one that
/// is down, or cut off from the quorum, is passed over. One member per client, not the
/// crate's balanced channel: that one hands a request to a member it has not yet found dead
/// (a publish then fails while two members of three are fine). Where every member fails in
/// a way that passes (down, unreachable, electing a leader), the round is tried again for
/// up to [`CONNECT_PATIENCE`].
pub async fn connect(connection: &Connection) -> Result<Client, FleetError> {
    let options = connect_options(connection)?;
    let deadline = tokio::time::Instant::now() + CONNECT_PATIENCE;
    loop {
        match connect_round(connection, &options).await {
            Ok(client) => return Ok(client),
            Err(failure)
                if passing(&failure)
                    && tokio::time::Instant::now() + Duration::from_millis(250) < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(failure) => {
                return Err(FleetError::Etcd {
                    endpoints: connection.endpoints.join(","),
                    what: "connecting (no member answered)",
                    source: Box::new(failure),
                });
            }
        }
    }
}

/// Whether an error may be gone on the next try: a member down or out of reach, or a
/// cluster without a leader for the moment. Not a refused password or certificate.
fn passing(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::IoError(_) | etcd_client::Error::TransportError(_) => true,
        // gRPC's UNKNOWN (2), DEADLINE_EXCEEDED (4) and UNAVAILABLE (14), which etcd
        // answers with while it has no leader ("leader changed", "no leader").
        etcd_client::Error::GRpcStatus(status) => matches!(i32::from(status.code()), 2 | 4 | 14),
        _ => false,
    }
}

/// One try of each member, in turn from the next one; the last failure if none answered.
async fn connect_round(
    connection: &Connection,
    options: &ConnectOptions,
) -> Result<Client, etcd_client::Error> {
    let count = connection.endpoints.len().max(1);
    let first = NEXT_MEMBER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut failure = None;
    for offset in 0..count {
        let Some(endpoint) = connection.endpoints.get((first + offset) % count) else {
            break;
        };
        let attempt = async {
            let mut client = Client::connect([endpoint], Some(options.clone())).await?;
            client
                .get(
                    "/smtpguard/",
                    Some(GetOptions::new().with_keys_only().with_limit(1)),
                )
                .await?;
            Ok::<_, etcd_client::Error>(client)
        };
        match tokio::time::timeout(PROBE_TIMEOUT, attempt).await {
            Ok(Ok(client)) => return Ok(client),
            Ok(Err(error)) => failure = Some(error),
            Err(_) => {
                failure = Some(etcd_client::Error::IoError(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{endpoint}: no answer within {} s", PROBE_TIMEOUT.as_secs()),
                )));
            }
        }
    }
    Err(failure.unwrap_or_else(|| etcd_client::Error::InvalidArgs("no endpoints".to_owned())))
}

fn connect_options(connection: &Connection) -> Result<ConnectOptions, FleetError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true);
    if connection.ca_file.is_some() || connection.cert_file.is_some() {
        let mut tls = TlsOptions::new();
        if let Some(path) = &connection.ca_file {
            tls = tls.ca_certificate(Certificate::from_pem(read(path)?));
        }
        if let (Some(cert), Some(key)) = (&connection.cert_file, &connection.key_file) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        options = options.with_tls(tls);
    }
    if let (Some(user), Some(path)) = (&connection.user, &connection.password_file) {
        let password = read(path)?;
        options = options.with_user(user, password.trim_end_matches(['\r', '\n']));
    }
    Ok(options)
}

fn read(path: &Path) -> Result<String, FleetError> {
    read_text(path, MAX_CONFIG_BYTES).map_err(|source| FleetError::Read {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

/// Reads the group's published policy (manifest and payload at one revision); `None` when
/// nothing is published. The second value is the cluster's revision at the read.
pub async fn read_published(
    client: &mut Client,
    keys: &Keys,
    endpoints: &str,
) -> Result<(Option<Published>, i64), FleetError> {
    let response = client
        .get(keys.policy(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|source| FleetError::Etcd {
            endpoints: endpoints.to_owned(),
            what: "reading the published policy",
            source: Box::new(source),
        })?;
    let at = response.header().map_or(0, |header| header.revision());
    let mut manifest = None;
    let mut compressed = Vec::new();
    for kv in response.kvs() {
        if kv.key() == keys.manifest().as_bytes() {
            manifest = Some((kv.mod_revision(), kv.value().to_vec()));
        } else if kv.key() == keys.snapshot().as_bytes() {
            compressed = kv.value().to_vec();
        }
    }
    Ok((
        manifest.map(|(revision, manifest_bytes)| Published {
            revision,
            manifest_bytes,
            compressed,
        }),
        at,
    ))
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}
