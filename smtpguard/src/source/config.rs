//! The TOML configuration file, read into typed settings. Every value keeps the line it came
//! from, so a refusal can name the file, the line and the offending value.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;
use toml::Spanned;

/// A configuration larger than this is refused unread (prefix lists belong in `files`).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// The text of the file at `path`, refused if it is not a regular file, is larger than
/// `limit` bytes, or is not UTF-8.
///
/// The file is opened once and everything is decided on that descriptor: `O_NONBLOCK` so a
/// FIFO cannot block the daemon at open, `fstat` of the opened file (not of the path, which may
/// be replaced in between) so only regular files are read, and at most `limit + 1` bytes read
/// so a file that grows while it is read cannot exhaust memory. The path is also looked at
/// before it is opened: opening some devices does something (a watchdog starts, a tape
/// rewinds), so one is refused without being opened.
pub fn read_text(path: &Path, limit: u64) -> Result<String, ConfigError> {
    use std::{io::Read as _, os::unix::fs::OpenOptionsExt as _};

    let read_error = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let before = std::fs::metadata(path).map_err(read_error)?;
    if let Some(kind) = not_regular(&before.file_type()) {
        return Err(ConfigError::NotRegular {
            path: path.to_owned(),
            kind,
        });
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(read_error)?;
    let metadata = file.metadata().map_err(read_error)?;
    if let Some(kind) = not_regular(&metadata.file_type()) {
        return Err(ConfigError::NotRegular {
            path: path.to_owned(),
            kind,
        });
    }
    let size = metadata.len();
    if size > limit {
        return Err(ConfigError::TooLarge {
            path: path.to_owned(),
            size,
            limit,
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0).saturating_add(1));
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > limit {
        return Err(ConfigError::GrewTooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    String::from_utf8(bytes).map_err(|source| ConfigError::NotUtf8 {
        path: path.to_owned(),
        source,
    })
}

/// What a file that is not a regular file is, in words; `None` for a regular file.
fn not_regular(file_type: &std::fs::FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt as _;

    if file_type.is_file() {
        None
    } else if file_type.is_dir() {
        Some("a directory")
    } else if file_type.is_fifo() {
        Some("a FIFO")
    } else if file_type.is_char_device() {
        Some("a character device")
    } else if file_type.is_block_device() {
        Some("a block device")
    } else if file_type.is_socket() {
        Some("a socket")
    } else {
        Some("not a regular file")
    }
}

/// The guarded port when the file does not say: SMTP.
pub const DEFAULT_PORTS: [u16; 1] = [25];

/// Where a value came from: the file and the 1-based line. The path is shared: every line of
/// a list file of a million prefixes names the same file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: Arc<Path>,
    pub line: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// Something worth telling the admin that does not stop the policy from applying.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    pub at: Location,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}", path = path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not UTF-8 text: {source}", path = path.display())]
    NotUtf8 {
        path: PathBuf,
        source: std::string::FromUtf8Error,
    },
    #[error("{path}: {kind}, not a regular file", path = path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path}: {size} bytes, more than the {limit} such a file may have", path = path.display())]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("{path}: grew past the {limit} bytes such a file may have while it was read", path = path.display())]
    GrewTooLarge { path: PathBuf, limit: u64 },
    #[error("{at}: {message}")]
    Syntax { at: Location, message: String },
    #[error("{at}: bad prefix {value:?}: {reason}")]
    BadPrefix {
        at: Location,
        value: String,
        reason: crate::source::prefix::PrefixError,
    },
    #[error(transparent)]
    Conflict(Box<Conflict>),
    #[error("{at}: bad port {value}: ports are 1 to 65535")]
    BadPort { at: Location, value: i64 },
    #[error("{at}: `ports` is empty: nothing would be guarded")]
    NoPorts { at: Location },
    #[error(
        "{at}: `interfaces` is empty: name the interfaces to guard, e.g. interfaces = [\"eth0\"]"
    )]
    NoInterfaces { at: Location },
    #[error("{at}: bad interface name {value:?}: {reason}")]
    BadInterface {
        at: Location,
        value: String,
        reason: &'static str,
    },
    #[error("{at}: bad {key} {value:?}: {reason}")]
    BadValue {
        at: Location,
        key: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("{at}: bad {key} {value}: {reason} ({min} to {max})")]
    OutOfBounds {
        at: Location,
        key: &'static str,
        value: u64,
        reason: &'static str,
        min: u64,
        max: u64,
    },
    #[error("{at}: bad rule name {value:?}: {reason}")]
    BadRuleName {
        at: Location,
        value: String,
        reason: &'static str,
    },
    #[error(
        "{at}: {value:?} on an allow rule lets every source connect; set allow_any_source = true in [safety] if that is what you mean"
    )]
    AnySource { at: Location, value: String },
    #[error(
        "{path}: no allow prefix at all: every source would be blocked; add [[allow]] entries, or set allow_none = true if that is what you mean",
        path = path.display()
    )]
    NoAllow { path: PathBuf },
    #[error(
        "{at}: scope {scope:?} has no allow prefix at all: every source would be blocked for its destinations; add [[scope.allow]] entries, or set allow_none = true in the scope if that is what you mean"
    )]
    ScopeNoAllow { at: Location, scope: String },
    #[error(transparent)]
    AllowCoverage(Box<CoverageExceeded>),
    #[error(
        "{at}: destination {prefix} is already in scope {first:?} ({first_at}): which scope decides would be a guess"
    )]
    DestinationConflict {
        at: Location,
        prefix: ipnet::IpNet,
        first: String,
        first_at: Location,
    },
}

/// Automatic allow sources (list files, host names, SPF) that would open more of the address
/// space than `[safety]` allows. Boxed in [`ConfigError`]: it is the largest refusal.
#[derive(Debug, thiserror::Error)]
#[error(
    "{path}: allow prefixes from list files, host names and SPF in scope {scope:?} cover {coverage} {family} addresses, more than max_coverage_{suffix} = {cap_len} allows ({cap}, one /{cap_len}); the most from {biggest}; automatic sources may not open the lock-down this far: raise max_coverage_{suffix} in [safety] if that is what you mean",
    path = path.display()
)]
pub struct CoverageExceeded {
    pub path: PathBuf,
    pub scope: String,
    pub family: &'static str,
    pub suffix: &'static str,
    pub coverage: u128,
    pub cap: u128,
    pub cap_len: u8,
    pub biggest: String,
}

/// One prefix on both lists: which of them wins would be a guess, so the file is refused.
#[derive(Debug, thiserror::Error)]
#[error(
    "{at}: prefix {prefix} is in both lists: allow rule {allow_rule:?} ({allow_at}) and deny rule {deny_rule:?}"
)]
pub struct Conflict {
    pub at: Location,
    pub prefix: ipnet::IpNet,
    pub allow_rule: String,
    pub allow_at: Location,
    pub deny_rule: String,
}

/// How the program is attached to an interface.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode where the driver supports it, generic mode otherwise.
    #[default]
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode.
    Skb,
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Native => "native",
            Self::Skb => "skb",
        })
    }
}

/// Whether verdicts are carried out.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Drop or reject what the policy stops.
    #[default]
    Enforce,
    /// Pass everything; count, per source, what enforce mode would stop.
    Audit,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        })
    }
}

/// What happens to a SYN the policy stops.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Dropped silently: the sender retries until it times out.
    #[default]
    Drop,
    /// Answered with a TCP RST: the sender's connect fails at once.
    Reject,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Drop => "drop",
            Self::Reject => "reject",
        })
    }
}

/// Which list a prefix is on.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum List {
    Allow,
    Deny,
}

impl List {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

impl fmt::Display for List {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a deny rule ranks against the allow list.
#[derive(
    Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize, PartialOrd, Ord, Hash,
)]
#[serde(rename_all = "lowercase")]
pub enum Precedence {
    /// The longest prefix decides: a deny /32 inside an allowed /28 stops that one host. The
    /// default for a deny rule's own `prefixes`: the admin's words.
    #[default]
    Specific,
    /// Never overrides an allow match, at any length: a blocklist feed listing a /24 inside
    /// the provider's /15 stops nobody the provider sends. The default for what a deny rule
    /// takes from list files, host names, SPF records and URLs.
    Allow,
}

impl fmt::Display for Precedence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Specific => "specific",
            Self::Allow => "allow",
        })
    }
}

/// What happens to the filter when the daemon exits.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExit {
    /// The program stays attached (its links and maps pinned in bpffs) and keeps enforcing
    /// the last policy; a restarted daemon takes it over without a gap.
    #[default]
    Keep,
    /// The program is detached and the pins removed: port 25 is open until the next start.
    Detach,
}

impl fmt::Display for OnExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Keep => "keep",
            Self::Detach => "detach",
        })
    }
}

/// How names in `hosts` and `spf` are resolved and refreshed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsSettings {
    /// The resolver to ask; the system's (`/etc/resolv.conf`) when unset.
    pub resolver: Option<SocketAddr>,
    /// Answers are re-resolved when their TTL runs out, but not sooner than this...
    pub min_refresh: Duration,
    /// ...and not later than this.
    pub max_refresh: Duration,
    /// How long one query may take before the resolver counts as failed.
    pub timeout: Duration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            resolver: None,
            min_refresh: Duration::from_secs(60),
            max_refresh: Duration::from_secs(86400),
            timeout: Duration::from_secs(5),
        }
    }
}

/// Limits on what automatic sources (list files, host names, SPF records) may put on the allow
/// list, so that an input nobody reviews cannot open the lock-down.
#[derive(Clone, Debug, PartialEq)]
pub struct Safety {
    /// Allow prefixes from automatic sources shorter than this are refused (IPv4)...
    pub min_prefix_v4: u8,
    /// ...and shorter than this (IPv6). Providers publish /14 to /19 and /32 to /48.
    pub min_prefix_v6: u8,
    /// Together, a scope's allow prefixes from automatic sources may cover at most as many
    /// IPv4 addresses as one prefix of this length (the floor alone lets 4096 /12s through)...
    pub max_coverage_v4: u8,
    /// ...and as many IPv6 addresses as one prefix of this length.
    pub max_coverage_v6: u8,
    /// A DNS refresh that makes a name cover more than this many times the addresses it
    /// covered is held back until an explicit reload.
    pub max_growth: f64,
    /// Whether `0.0.0.0/0` or `::/0` may be written in an allow rule's `prefixes`.
    pub allow_any_source: bool,
}

impl Default for Safety {
    fn default() -> Self {
        Self {
            min_prefix_v4: 12,
            min_prefix_v6: 32,
            max_coverage_v4: 8,
            max_coverage_v6: 24,
            max_growth: 4.0,
            allow_any_source: false,
        }
    }
}

/// How `urls` lists are fetched and refreshed (`[urls]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UrlSettings {
    /// A rule's `refresh_secs` must lie between this...
    pub min_refresh: Duration,
    /// ...and this; a rule without one is fetched again every hour, within these bounds.
    pub max_refresh: Duration,
    /// How long one fetch (connect, headers and body) may take.
    pub timeout: Duration,
    /// A body larger than this is refused (the last good content stays).
    pub max_bytes: u64,
    /// PEM certificates trusted for HTTPS besides the system's CA store.
    pub ca_file: Option<PathBuf>,
}

/// How often a list is fetched again when its rule does not say.
pub const DEFAULT_URL_REFRESH: Duration = Duration::from_secs(3600);

impl Default for UrlSettings {
    fn default() -> Self {
        Self {
            min_refresh: Duration::from_secs(60),
            max_refresh: Duration::from_secs(86400),
            timeout: Duration::from_secs(30),
            max_bytes: 64 << 20,
            ca_file: None,
        }
    }
}

/// A list fetched over HTTP(S), as a rule names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UrlSource {
    pub url: String,
    pub at: Location,
    /// The key whose string values (at any depth) are the prefixes, for a JSON document;
    /// `None` for a list of one prefix per line.
    pub json_key: Option<String>,
    /// How often it is fetched again (the rule's `refresh_secs`, within `[urls]` bounds).
    pub refresh: Duration,
    /// Where the rule's `refresh_secs` is written, if it is.
    pub refresh_at: Option<Location>,
}

/// Which per-prefix series `/metrics` carries (`[metrics] prefixes`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PrefixSeries {
    /// Every prefix of the policy, matched or not: one series each.
    All,
    /// Only prefixes that have matched a SYN since their counter was created.
    #[default]
    Matched,
    /// None: the per-rule totals only.
    None,
}

/// The file as written, before any validation beyond TOML types.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// Required, except in a central configuration (`smtpguard publish`).
    interfaces: Option<Spanned<Vec<Spanned<String>>>>,
    ports: Option<Spanned<Vec<Spanned<i64>>>>,
    #[serde(default)]
    xdp_mode: XdpMode,
    mode: Option<Spanned<Mode>>,
    action: Option<Spanned<Action>>,
    #[serde(default)]
    allow_none: bool,
    #[serde(default)]
    on_exit: OnExit,
    metrics: Option<MetricsTable>,
    dns: Option<DnsTable>,
    safety: Option<SafetyTable>,
    urls: Option<UrlsTable>,
    #[serde(default)]
    allow: Vec<RuleTable>,
    #[serde(default)]
    deny: Vec<RuleTable>,
    #[serde(default)]
    scope: Vec<ScopeTable>,
    fleet: Option<FleetTable>,
}

/// `[fleet]`: the group this host follows, and how to reach its etcd cluster.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FleetTable {
    etcd: Spanned<Vec<Spanned<String>>>,
    group: Spanned<String>,
    host: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    cert_file: Option<Spanned<String>>,
    key_file: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
    password_file: Option<Spanned<String>>,
    report_ttl_secs: Option<Spanned<i64>>,
}

/// A `[[scope]]`: rules for SYNs to some destinations only.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScopeTable {
    name: Spanned<String>,
    destinations: Spanned<Vec<Spanned<String>>>,
    ports: Option<Spanned<Vec<Spanned<i64>>>>,
    mode: Option<Mode>,
    action: Option<Action>,
    #[serde(default)]
    allow_none: bool,
    #[serde(default)]
    allow: Vec<RuleTable>,
    #[serde(default)]
    deny: Vec<RuleTable>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsTable {
    listen: Spanned<String>,
    #[serde(default)]
    prefixes: PrefixSeries,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UrlsTable {
    min_refresh_secs: Option<Spanned<i64>>,
    max_refresh_secs: Option<Spanned<i64>>,
    timeout_secs: Option<Spanned<i64>>,
    max_bytes: Option<Spanned<i64>>,
    ca_file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DnsTable {
    resolver: Option<Spanned<String>>,
    min_refresh_secs: Option<Spanned<i64>>,
    max_refresh_secs: Option<Spanned<i64>>,
    timeout_secs: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SafetyTable {
    min_prefix_v4: Option<Spanned<i64>>,
    min_prefix_v6: Option<Spanned<i64>>,
    max_coverage_v4: Option<Spanned<i64>>,
    max_coverage_v6: Option<Spanned<i64>>,
    max_growth: Option<Spanned<f64>>,
    #[serde(default)]
    allow_any_source: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleTable {
    name: Spanned<String>,
    action: Option<Spanned<Action>>,
    precedence: Option<Spanned<Precedence>>,
    #[serde(default)]
    prefixes: Vec<Spanned<String>>,
    #[serde(default)]
    hosts: Vec<Spanned<String>>,
    #[serde(default)]
    spf: Vec<Spanned<String>>,
    #[serde(default)]
    files: Vec<Spanned<String>>,
    #[serde(default)]
    urls: Vec<Spanned<String>>,
    json_key: Option<Spanned<String>>,
    refresh_secs: Option<Spanned<i64>>,
}

/// One `[[allow]]` or `[[deny]]` table.
#[derive(Clone, Debug)]
pub struct RuleSpec {
    pub name: String,
    pub at: Location,
    /// What a deny rule does to the SYNs it matches; `None` on allow rules.
    pub action: Option<Action>,
    /// How a deny rule ranks against the allow list, where the rule says; `None` takes the
    /// default of each source kind (see [`Precedence`]). Always `None` on allow rules.
    pub precedence: Option<Precedence>,
    /// The prefixes as written, each with its own line.
    pub prefixes: Vec<(String, Location)>,
    /// Host names whose A and AAAA records are taken as /32 and /128 prefixes.
    pub hosts: Vec<(String, Location)>,
    /// Domains whose SPF records are expanded into prefixes.
    pub spf: Vec<(String, Location)>,
    /// Files with one address or prefix per line.
    pub files: Vec<(PathBuf, Location)>,
    /// Lists fetched over HTTP(S).
    pub urls: Vec<UrlSource>,
}

/// A configuration whose settings are valid. Prefixes are still text: turning them into a
/// policy is [`crate::policy::Policy::build`]'s job.
#[derive(Clone, Debug)]
pub struct Config {
    pub path: PathBuf,
    pub interfaces: Vec<String>,
    pub ports: Vec<(u16, Location)>,
    pub xdp_mode: XdpMode,
    pub mode: Mode,
    /// What happens to unlisted sources, and to deny rules without an action of their own.
    pub action: Action,
    pub allow_none: bool,
    pub on_exit: OnExit,
    /// Where the Prometheus endpoint listens, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Which per-prefix series the endpoint carries.
    pub metrics_prefixes: PrefixSeries,
    pub dns: DnsSettings,
    pub urls: UrlSettings,
    pub safety: Safety,
    /// The top level's rules: the default scope, for destinations no `[[scope]]` names.
    pub allow: Vec<RuleSpec>,
    pub deny: Vec<RuleSpec>,
    /// The `[[scope]]`s, in the file's order.
    pub scopes: Vec<ScopeSpec>,
    /// The group this host follows (`[fleet]`): its rules come from there, and the file's
    /// own `[[allow]]` and `[[deny]]` are merged into them.
    pub fleet: Option<crate::source::fleet::FleetSettings>,
}

/// One `[[scope]]` table: its own destinations, ports, mode, action and rules.
#[derive(Clone, Debug)]
pub struct ScopeSpec {
    pub name: String,
    pub at: Location,
    /// Destination addresses or prefixes, as written.
    pub destinations: Vec<(String, Location)>,
    pub ports: Vec<(u16, Location)>,
    pub mode: Mode,
    pub action: Action,
    pub allow_none: bool,
    pub allow: Vec<RuleSpec>,
    pub deny: Vec<RuleSpec>,
}

impl Config {
    /// Every rule of the file, the top level's and each scope's, with its list.
    pub fn all_rules(&self) -> impl Iterator<Item = (List, &RuleSpec)> {
        let top = [(&self.allow, &self.deny)];
        let scoped = self.scopes.iter().map(|scope| (&scope.allow, &scope.deny));
        top.into_iter().chain(scoped).flat_map(|(allow, deny)| {
            allow
                .iter()
                .map(|rule| (List::Allow, rule))
                .chain(deny.iter().map(|rule| (List::Deny, rule)))
        })
    }

    /// Whether the top level has rules of its own (the default scope is guarded).
    pub fn has_default_rules(&self) -> bool {
        self.scopes.is_empty() || self.allow_none || !self.allow.is_empty() || !self.deny.is_empty()
    }

    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(path, &read_text(path, MAX_CONFIG_BYTES)?)
    }

    /// Validates `text` as if read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        Self::parse_as(path, text, true)
    }

    /// Reads and validates a central configuration, the policy `smtpguard publish` compiles
    /// for a group: `interfaces` may be left out (each host names its own), `[fleet]` may not.
    pub fn load_central(path: &Path) -> Result<Self, ConfigError> {
        Self::parse_as(path, &read_text(path, MAX_CONFIG_BYTES)?, false)
    }

    fn parse_as(path: &Path, text: &str, host: bool) -> Result<Self, ConfigError> {
        let lines = LineIndex::new(path, text);
        let file: File = toml::from_str(text).map_err(|error| ConfigError::Syntax {
            at: lines.at(error.span().map_or(0, |span| span.start)),
            message: error.message().trim_end().to_owned(),
        })?;

        let interfaces = match &file.interfaces {
            Some(interfaces) => validate_interfaces(interfaces, &lines)?,
            None if host => {
                return Err(ConfigError::Syntax {
                    at: lines.at(0),
                    message: "missing field `interfaces`".to_owned(),
                });
            }
            None => Vec::new(),
        };
        let fleet = match &file.fleet {
            Some(table) if host => Some(fleet_settings(table, &file, &lines)?),
            Some(table) => {
                return Err(ConfigError::BadValue {
                    at: lines.at(table.group.span().start),
                    key: "[fleet]",
                    value: table.group.get_ref().clone(),
                    reason: "a central configuration is the group's policy; [fleet] belongs in each host's file",
                });
            }
            None => None,
        };
        let action = file
            .action
            .as_ref()
            .map_or(Action::default(), |a| *a.get_ref());
        let ports = validate_ports(file.ports.as_ref(), &lines)?;
        let allow = rule_specs(&file.allow, None, &lines)?;
        let deny = rule_specs(&file.deny, Some(action), &lines)?;
        let mut scopes = scope_specs(&file, &ports, &lines)?;
        let dns = dns_settings(file.dns.as_ref(), &lines)?;
        let safety = safety(file.safety.as_ref(), &lines)?;
        let urls = url_settings(file.urls.as_ref(), &lines)?;
        let (mut allow, mut deny) = (allow, deny);
        let scoped = scopes
            .iter_mut()
            .flat_map(|scope| scope.allow.iter_mut().chain(scope.deny.iter_mut()));
        settle_url_refresh(allow.iter_mut().chain(deny.iter_mut()).chain(scoped), &urls)?;
        let metrics_listen =
            file.metrics
                .as_ref()
                .map(|metrics| {
                    metrics.listen.get_ref().parse::<SocketAddr>().map_err(|_| {
                        ConfigError::BadValue {
                            at: lines.at(metrics.listen.span().start),
                            key: "listen",
                            value: metrics.listen.get_ref().clone(),
                            reason: "expected IP:PORT, e.g. \"127.0.0.1:9725\" or \"[::1]:9725\"",
                        }
                    })
                })
                .transpose()?;
        Ok(Self {
            path: path.to_owned(),
            interfaces,
            ports,
            xdp_mode: file.xdp_mode,
            mode: file
                .mode
                .as_ref()
                .map_or(Mode::default(), |mode| *mode.get_ref()),
            action,
            allow_none: file.allow_none,
            on_exit: file.on_exit,
            metrics_listen,
            metrics_prefixes: file
                .metrics
                .as_ref()
                .map_or(PrefixSeries::default(), |metrics| metrics.prefixes),
            dns,
            urls,
            safety,
            allow,
            deny,
            scopes,
            fleet,
        })
    }
}

/// Validates `[fleet]`. A host that follows a group takes the guarded ports, mode, action
/// and scopes from the group: the file saying them too would be a second truth.
fn fleet_settings(
    table: &FleetTable,
    file: &File,
    lines: &LineIndex,
) -> Result<crate::source::fleet::FleetSettings, ConfigError> {
    let group_only = [
        file.ports
            .as_ref()
            .map(|ports| ("ports", ports.span().start)),
        file.mode.as_ref().map(|mode| ("mode", mode.span().start)),
        file.action
            .as_ref()
            .map(|action| ("action", action.span().start)),
        file.scope
            .first()
            .map(|scope| ("[[scope]]", scope.name.span().start)),
    ];
    if let Some((key, offset)) = group_only.into_iter().flatten().next() {
        return Err(ConfigError::BadValue {
            at: lines.at(offset),
            key,
            value: String::new(),
            reason: "with [fleet], the group's published policy says this; the host's file keeps interfaces, xdp_mode, on_exit, metrics and its own [[allow]] and [[deny]] rules",
        });
    }
    let bad = |value: &Spanned<String>, key, reason| ConfigError::BadValue {
        at: lines.at(value.span().start),
        key,
        value: value.get_ref().clone(),
        reason,
    };
    if table.etcd.get_ref().is_empty() {
        return Err(ConfigError::BadValue {
            at: lines.at(table.etcd.span().start),
            key: "etcd",
            value: String::new(),
            reason: "name at least one member, e.g. etcd = [\"http://127.0.0.1:2379\"]",
        });
    }
    let mut endpoints = Vec::new();
    for endpoint in table.etcd.get_ref() {
        let text = endpoint.get_ref().trim();
        let scheme = text.starts_with("http://") || text.starts_with("https://");
        if !scheme || text.parse::<hyper::Uri>().is_err() || text.contains('@') {
            return Err(bad(
                endpoint,
                "etcd",
                "an http:// or https:// URL of an etcd member, without credentials",
            ));
        }
        endpoints.push(text.to_owned());
    }
    let group = table.group.get_ref().trim();
    if let Some(reason) = crate::source::fleet::name_problem(group) {
        return Err(bad(&table.group, "group", reason));
    }
    let host = match &table.host {
        Some(host) => {
            if let Some(reason) = crate::source::fleet::name_problem(host.get_ref().trim()) {
                return Err(bad(host, "host", reason));
            }
            host.get_ref().trim().to_owned()
        }
        None => crate::source::fleet::system_host_name(),
    };
    let path = |value: &Option<Spanned<String>>, key| {
        value
            .as_ref()
            .map(|value| {
                let path = PathBuf::from(value.get_ref().trim());
                if path.is_absolute() {
                    Ok(path)
                } else {
                    Err(bad(value, key, "not an absolute path"))
                }
            })
            .transpose()
    };
    let connection = crate::source::fleet::Connection {
        endpoints,
        ca_file: path(&table.ca_file, "ca_file")?,
        cert_file: path(&table.cert_file, "cert_file")?,
        key_file: path(&table.key_file, "key_file")?,
        user: table.user.as_ref().map(|user| user.get_ref().clone()),
        password_file: path(&table.password_file, "password_file")?,
    };
    for (one, other, key, reason) in [
        (
            &table.cert_file,
            &table.key_file,
            "cert_file",
            "cert_file and key_file go together",
        ),
        (
            &table.key_file,
            &table.cert_file,
            "key_file",
            "cert_file and key_file go together",
        ),
        (
            &table.user,
            &table.password_file,
            "user",
            "user and password_file go together",
        ),
        (
            &table.password_file,
            &table.user,
            "password_file",
            "user and password_file go together",
        ),
    ] {
        if let (Some(value), None) = (one, other) {
            return Err(bad(value, key, reason));
        }
    }
    let report_ttl = match &table.report_ttl_secs {
        Some(secs) => u64::try_from(*secs.get_ref())
            .ok()
            .filter(|secs| (2..=300).contains(secs))
            .map(Duration::from_secs)
            .ok_or_else(|| ConfigError::BadValue {
                at: lines.at(secs.span().start),
                key: "report_ttl_secs",
                value: secs.get_ref().to_string(),
                reason: "seconds from 2 to 300",
            })?,
        None => crate::source::fleet::DEFAULT_REPORT_TTL,
    };
    Ok(crate::source::fleet::FleetSettings {
        connection,
        group: group.to_owned(),
        host,
        report_ttl,
    })
}

fn scope_specs(
    file: &File,
    ports: &[(u16, Location)],
    lines: &LineIndex,
) -> Result<Vec<ScopeSpec>, ConfigError> {
    let mut scopes: Vec<ScopeSpec> = Vec::new();
    for table in &file.scope {
        let at = lines.at(table.name.span().start);
        let name = table.name.get_ref().trim();
        let problem = if name.is_empty() {
            Some("empty")
        } else if name == "default" {
            Some("\"default\" is the name of the top level's rules")
        } else if name.chars().any(char::is_control) {
            Some("contains control characters")
        } else if scopes.iter().any(|scope| scope.name == name) {
            Some("another scope has this name")
        } else {
            None
        };
        // The default scope takes one of the program's scope ids.
        let problem = problem.or_else(|| {
            (scopes.len() + 1 >= smtpguard_common::MAX_SCOPES as usize)
                .then_some("one scope too many: the program holds 255 besides the default")
        });
        if let Some(reason) = problem {
            return Err(ConfigError::BadValue {
                at,
                key: "scope name",
                value: table.name.get_ref().clone(),
                reason,
            });
        }
        if table.destinations.get_ref().is_empty() {
            return Err(ConfigError::BadValue {
                at: lines.at(table.destinations.span().start),
                key: "destinations",
                value: String::new(),
                reason: "a scope needs at least one destination address or prefix",
            });
        }
        let action = table
            .action
            .or(file.action.as_ref().map(|action| *action.get_ref()))
            .unwrap_or_default();
        scopes.push(ScopeSpec {
            name: name.to_owned(),
            at,
            destinations: table
                .destinations
                .get_ref()
                .iter()
                .map(|value| {
                    (
                        value.get_ref().trim().to_owned(),
                        lines.at(value.span().start),
                    )
                })
                .collect(),
            ports: match &table.ports {
                Some(_) => validate_ports(table.ports.as_ref(), lines)?,
                None => ports.to_vec(),
            },
            mode: table
                .mode
                .or(file.mode.as_ref().map(|mode| *mode.get_ref()))
                .unwrap_or_default(),
            action,
            allow_none: table.allow_none,
            allow: rule_specs(&table.allow, None, lines)?,
            deny: rule_specs(&table.deny, Some(action), lines)?,
        });
    }
    Ok(scopes)
}

fn validate_interfaces(
    interfaces: &Spanned<Vec<Spanned<String>>>,
    lines: &LineIndex,
) -> Result<Vec<String>, ConfigError> {
    if interfaces.get_ref().is_empty() {
        return Err(ConfigError::NoInterfaces {
            at: lines.at(interfaces.span().start),
        });
    }
    let mut names: Vec<String> = Vec::new();
    for name in interfaces.get_ref() {
        let value = name.get_ref();
        if let Some(reason) = interface_name_problem(value) {
            return Err(ConfigError::BadInterface {
                at: lines.at(name.span().start),
                value: value.clone(),
                reason,
            });
        }
        if !names.contains(value) {
            names.push(value.clone());
        }
    }
    Ok(names)
}

/// Linux interface names: 1 to 15 bytes, no `/`, no white space.
fn interface_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty")
    } else if name.len() > 15 {
        Some("longer than 15 bytes, the Linux limit")
    } else if name.contains('/') || name.chars().any(char::is_whitespace) || name.contains(':') {
        Some("contains '/', ':' or white space")
    } else if name == "." || name == ".." {
        Some("not a valid interface name")
    } else {
        None
    }
}

fn validate_ports(
    ports: Option<&Spanned<Vec<Spanned<i64>>>>,
    lines: &LineIndex,
) -> Result<Vec<(u16, Location)>, ConfigError> {
    let Some(ports) = ports else {
        return Ok(DEFAULT_PORTS
            .iter()
            .map(|&port| (port, lines.default_location()))
            .collect());
    };
    if ports.get_ref().is_empty() {
        return Err(ConfigError::NoPorts {
            at: lines.at(ports.span().start),
        });
    }
    let mut out: Vec<(u16, Location)> = Vec::new();
    for port in ports.get_ref() {
        let at = lines.at(port.span().start);
        let value = *port.get_ref();
        let port =
            u16::try_from(value)
                .ok()
                .filter(|&port| port != 0)
                .ok_or(ConfigError::BadPort {
                    at: at.clone(),
                    value,
                })?;
        if !out.iter().any(|(known, _)| *known == port) {
            out.push((port, at));
        }
    }
    Ok(out)
}

fn dns_settings(table: Option<&DnsTable>, lines: &LineIndex) -> Result<DnsSettings, ConfigError> {
    let mut settings = DnsSettings::default();
    let Some(table) = table else {
        return Ok(settings);
    };
    if let Some(resolver) = &table.resolver {
        let text = resolver.get_ref();
        let address = text
            .parse::<SocketAddr>()
            .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
            .map_err(|_| ConfigError::BadValue {
                at: lines.at(resolver.span().start),
                key: "resolver",
                value: text.clone(),
                reason: "expected IP or IP:PORT, e.g. \"127.0.0.1:53\" or \"[::1]:53\"",
            })?;
        settings.resolver = Some(address);
    }
    let seconds = |value: &Option<Spanned<i64>>, key: &'static str, default: Duration| {
        let Some(value) = value else {
            return Ok(default);
        };
        u64::try_from(*value.get_ref())
            .ok()
            .filter(|&secs| (1..=7 * 86400).contains(&secs))
            .map(Duration::from_secs)
            .ok_or_else(|| ConfigError::BadValue {
                at: lines.at(value.span().start),
                key,
                value: value.get_ref().to_string(),
                reason: "seconds from 1 to 604800 (a week)",
            })
    };
    settings.min_refresh = seconds(
        &table.min_refresh_secs,
        "min_refresh_secs",
        settings.min_refresh,
    )?;
    settings.max_refresh = seconds(
        &table.max_refresh_secs,
        "max_refresh_secs",
        settings.max_refresh,
    )?;
    settings.timeout = seconds(&table.timeout_secs, "timeout_secs", settings.timeout)?;
    if settings.min_refresh > settings.max_refresh
        && let Some(max) = &table.max_refresh_secs
    {
        return Err(ConfigError::BadValue {
            at: lines.at(max.span().start),
            key: "max_refresh_secs",
            value: max.get_ref().to_string(),
            reason: "smaller than min_refresh_secs",
        });
    }
    settings.max_refresh = settings.max_refresh.max(settings.min_refresh);
    Ok(settings)
}

fn safety(table: Option<&SafetyTable>, lines: &LineIndex) -> Result<Safety, ConfigError> {
    let mut safety = Safety::default();
    let Some(table) = table else {
        return Ok(safety);
    };
    let length = |value: &Option<Spanned<i64>>, key: &'static str, max: u8, default: u8| {
        let Some(value) = value else {
            return Ok(default);
        };
        u8::try_from(*value.get_ref())
            .ok()
            .filter(|&len| len <= max)
            .ok_or_else(|| ConfigError::BadValue {
                at: lines.at(value.span().start),
                key,
                value: value.get_ref().to_string(),
                reason: if max == 32 {
                    "a prefix length from 0 to 32"
                } else {
                    "a prefix length from 0 to 128"
                },
            })
    };
    safety.min_prefix_v4 = length(
        &table.min_prefix_v4,
        "min_prefix_v4",
        32,
        safety.min_prefix_v4,
    )?;
    safety.min_prefix_v6 = length(
        &table.min_prefix_v6,
        "min_prefix_v6",
        128,
        safety.min_prefix_v6,
    )?;
    safety.max_coverage_v4 = length(
        &table.max_coverage_v4,
        "max_coverage_v4",
        32,
        safety.max_coverage_v4,
    )?;
    safety.max_coverage_v6 = length(
        &table.max_coverage_v6,
        "max_coverage_v6",
        128,
        safety.max_coverage_v6,
    )?;
    if let Some(growth) = &table.max_growth {
        let value = *growth.get_ref();
        if !(value.is_finite() && value >= 1.0) {
            return Err(ConfigError::BadValue {
                at: lines.at(growth.span().start),
                key: "max_growth",
                value: value.to_string(),
                reason: "a factor of at least 1 (1 holds back any growth)",
            });
        }
        safety.max_growth = value;
    }
    safety.allow_any_source = table.allow_any_source;
    Ok(safety)
}

fn url_settings(table: Option<&UrlsTable>, lines: &LineIndex) -> Result<UrlSettings, ConfigError> {
    let mut settings = UrlSettings::default();
    let Some(table) = table else {
        return Ok(settings);
    };
    let number = |value: &Option<Spanned<i64>>, key: &'static str, max: u64, reason| {
        value
            .as_ref()
            .map(|value| {
                u64::try_from(*value.get_ref())
                    .ok()
                    .filter(|&number| (1..=max).contains(&number))
                    .ok_or_else(|| ConfigError::BadValue {
                        at: lines.at(value.span().start),
                        key,
                        value: value.get_ref().to_string(),
                        reason,
                    })
            })
            .transpose()
    };
    let week = "seconds from 1 to 604800 (a week)";
    if let Some(secs) = number(&table.min_refresh_secs, "min_refresh_secs", 604_800, week)? {
        settings.min_refresh = Duration::from_secs(secs);
    }
    if let Some(secs) = number(&table.max_refresh_secs, "max_refresh_secs", 604_800, week)? {
        settings.max_refresh = Duration::from_secs(secs);
    }
    if let Some(secs) = number(
        &table.timeout_secs,
        "timeout_secs",
        3600,
        "seconds from 1 to 3600",
    )? {
        settings.timeout = Duration::from_secs(secs);
    }
    if let Some(bytes) = number(
        &table.max_bytes,
        "max_bytes",
        crate::source::listfile::MAX_FILE_BYTES,
        "bytes from 1 to 268435456 (256 MiB, the limit of list files)",
    )? {
        settings.max_bytes = bytes;
    }
    if settings.min_refresh > settings.max_refresh {
        let (at, value) = match (&table.max_refresh_secs, &table.min_refresh_secs) {
            (Some(max), _) => (lines.at(max.span().start), max.get_ref().to_string()),
            (None, Some(min)) => (lines.at(min.span().start), min.get_ref().to_string()),
            (None, None) => unreachable!("the defaults are ordered"),
        };
        return Err(ConfigError::BadValue {
            at,
            key: "min_refresh_secs, max_refresh_secs",
            value,
            reason: "min_refresh_secs is larger than max_refresh_secs",
        });
    }
    if let Some(ca_file) = &table.ca_file {
        let path = PathBuf::from(ca_file.get_ref().trim());
        if !path.is_absolute() {
            return Err(ConfigError::BadValue {
                at: lines.at(ca_file.span().start),
                key: "ca_file",
                value: ca_file.get_ref().clone(),
                reason: "not an absolute path",
            });
        }
        settings.ca_file = Some(path);
    }
    Ok(settings)
}

/// A rule's `urls`, with its `json_key` and `refresh_secs` (bounded later, by
/// [`settle_url_refresh`], against `[urls]`).
fn url_sources(table: &RuleTable, lines: &LineIndex) -> Result<Vec<UrlSource>, ConfigError> {
    let json_key = match &table.json_key {
        Some(key) if key.get_ref().trim().is_empty() => {
            return Err(ConfigError::BadValue {
                at: lines.at(key.span().start),
                key: "json_key",
                value: key.get_ref().clone(),
                reason: "empty",
            });
        }
        Some(key) if table.urls.is_empty() => {
            return Err(ConfigError::BadValue {
                at: lines.at(key.span().start),
                key: "json_key",
                value: key.get_ref().clone(),
                reason: "the rule has no `urls` for it to apply to",
            });
        }
        key => key.as_ref().map(|key| key.get_ref().trim().to_owned()),
    };
    let refresh = match &table.refresh_secs {
        Some(secs) if table.urls.is_empty() => {
            return Err(ConfigError::BadValue {
                at: lines.at(secs.span().start),
                key: "refresh_secs",
                value: secs.get_ref().to_string(),
                reason: "the rule has no `urls` to refresh",
            });
        }
        Some(secs) => {
            let at = lines.at(secs.span().start);
            let value = u64::try_from(*secs.get_ref())
                .ok()
                .filter(|&secs| (1..=604_800).contains(&secs))
                .ok_or_else(|| ConfigError::BadValue {
                    at: at.clone(),
                    key: "refresh_secs",
                    value: secs.get_ref().to_string(),
                    reason: "seconds from 1 to 604800 (a week)",
                })?;
            Some((Duration::from_secs(value), at))
        }
        None => None,
    };
    table
        .urls
        .iter()
        .map(|url| {
            let at = lines.at(url.span().start);
            let text = url.get_ref().trim();
            if let Some(reason) = url_problem(text) {
                return Err(ConfigError::BadValue {
                    at,
                    key: "url",
                    value: url.get_ref().clone(),
                    reason,
                });
            }
            Ok(UrlSource {
                url: text.to_owned(),
                at,
                json_key: json_key.clone(),
                refresh: refresh
                    .as_ref()
                    .map_or(DEFAULT_URL_REFRESH, |(secs, _)| *secs),
                refresh_at: refresh.as_ref().map(|(_, at)| at.clone()),
            })
        })
        .collect()
}

/// What is wrong with `url` as a list's address: http or https, a host, nothing else.
pub fn url_problem(url: &str) -> Option<&'static str> {
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some("contains white space or control characters");
    }
    let Ok(uri) = url.parse::<hyper::Uri>() else {
        return Some("not a URL");
    };
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Some("only http:// and https:// URLs are fetched");
    }
    if uri.host().is_none_or(str::is_empty) {
        return Some("no host");
    }
    if uri
        .authority()
        .is_some_and(|authority| authority.as_str().contains('@'))
    {
        return Some("credentials in a URL end up in logs and metrics labels");
    }
    None
}

/// Bounds every list's refresh by `[urls]`: a `refresh_secs` outside them is refused, a rule
/// without one gets an hour, within them. One URL named by several rules must agree on its
/// `json_key` (it is fetched once).
fn settle_url_refresh<'a>(
    specs: impl Iterator<Item = &'a mut RuleSpec>,
    settings: &UrlSettings,
) -> Result<(), ConfigError> {
    let mut seen: Vec<(String, Option<String>)> = Vec::new();
    for spec in specs {
        for source in &mut spec.urls {
            match &source.refresh_at {
                Some(at)
                    if source.refresh < settings.min_refresh
                        || source.refresh > settings.max_refresh =>
                {
                    return Err(ConfigError::OutOfBounds {
                        at: at.clone(),
                        key: "refresh_secs",
                        value: source.refresh.as_secs(),
                        reason: "outside [urls] min_refresh_secs to max_refresh_secs",
                        min: settings.min_refresh.as_secs(),
                        max: settings.max_refresh.as_secs(),
                    });
                }
                Some(_) => {}
                None => {
                    source.refresh =
                        DEFAULT_URL_REFRESH.clamp(settings.min_refresh, settings.max_refresh);
                }
            }
            match seen.iter().find(|(url, _)| *url == source.url) {
                Some((_, key)) if *key != source.json_key => {
                    return Err(ConfigError::BadValue {
                        at: source.at.clone(),
                        key: "url",
                        value: source.url.clone(),
                        reason: "named by another rule with another json_key: a URL is fetched once, and read one way",
                    });
                }
                Some(_) => {}
                None => seen.push((source.url.clone(), source.json_key.clone())),
            }
        }
    }
    Ok(())
}

fn rule_specs(
    tables: &[RuleTable],
    default_action: Option<Action>,
    lines: &LineIndex,
) -> Result<Vec<RuleSpec>, ConfigError> {
    tables
        .iter()
        .map(|table| {
            let at = lines.at(table.name.span().start);
            let action = match (&table.action, default_action) {
                (Some(action), Some(_)) => Some(*action.get_ref()),
                (None, default) => default,
                (Some(action), None) => {
                    return Err(ConfigError::BadValue {
                        at: lines.at(action.span().start),
                        key: "action",
                        value: action.get_ref().to_string(),
                        reason: "only [[deny]] rules have an action: allowed SYNs pass",
                    });
                }
            };
            let precedence = match (&table.precedence, default_action) {
                (Some(precedence), Some(_)) => Some(*precedence.get_ref()),
                (None, _) => None,
                (Some(precedence), None) => {
                    return Err(ConfigError::BadValue {
                        at: lines.at(precedence.span().start),
                        key: "precedence",
                        value: precedence.get_ref().to_string(),
                        reason: "only [[deny]] rules rank against the allow list",
                    });
                }
            };
            let located = |values: &[Spanned<String>]| -> Vec<(String, Location)> {
                values
                    .iter()
                    .map(|value| {
                        (
                            value.get_ref().trim().to_owned(),
                            lines.at(value.span().start),
                        )
                    })
                    .collect()
            };
            let hosts = located(&table.hosts);
            let spf = located(&table.spf);
            for (name, at) in hosts.iter().chain(&spf) {
                if let Some(reason) = domain_name_problem(name) {
                    return Err(ConfigError::BadValue {
                        at: at.clone(),
                        key: "host name",
                        value: name.clone(),
                        reason,
                    });
                }
            }
            let mut files = Vec::new();
            for (file, file_at) in located(&table.files) {
                let file = PathBuf::from(file);
                if !file.is_absolute() {
                    return Err(ConfigError::BadValue {
                        at: file_at,
                        key: "files",
                        value: file.display().to_string(),
                        reason: "not an absolute path",
                    });
                }
                files.push((file, file_at));
            }
            let urls = url_sources(table, lines)?;
            let name = table.name.get_ref().trim();
            if name.is_empty() {
                return Err(ConfigError::BadRuleName {
                    at,
                    value: table.name.get_ref().clone(),
                    reason: "empty",
                });
            }
            if name.chars().any(char::is_control) {
                return Err(ConfigError::BadRuleName {
                    at,
                    value: table.name.get_ref().clone(),
                    reason: "contains control characters",
                });
            }
            Ok(RuleSpec {
                name: name.to_owned(),
                at,
                action,
                precedence,
                prefixes: table
                    .prefixes
                    .iter()
                    .map(|prefix| (prefix.get_ref().clone(), lines.at(prefix.span().start)))
                    .collect(),
                hosts,
                spf,
                files,
                urls,
            })
        })
        .collect()
}

/// DNS names: 1 to 253 bytes of labels of 1 to 63 letters, digits, `-` or `_`.
fn domain_name_problem(name: &str) -> Option<&'static str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return Some("a DNS name is 1 to 253 bytes");
    }
    if name.parse::<IpAddr>().is_ok() {
        return Some("an address, not a name: put it in `prefixes`");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Some("each label between dots is 1 to 63 bytes");
        }
        if !label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Some("only letters, digits, '-' and '_' (write IDNs in their xn-- form)");
        }
    }
    None
}

/// Maps byte offsets in the file to line numbers.
struct LineIndex {
    path: Arc<Path>,
    line_starts: Vec<usize>,
}

impl LineIndex {
    fn new(path: &Path, text: &str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(index, _)| index + 1))
            .collect();
        Self {
            path: path.into(),
            line_starts,
        }
    }

    fn at(&self, offset: usize) -> Location {
        let line = self.line_starts.partition_point(|&start| start <= offset);
        Location {
            file: Arc::clone(&self.path),
            line: line.max(1),
        }
    }

    /// For values the file leaves to their default.
    fn default_location(&self) -> Location {
        Location {
            file: Arc::clone(&self.path),
            line: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/smtpguard/test.toml"), text)
    }

    fn refusal(text: &str) -> String {
        match parse(text) {
            Ok(config) => panic!("expected a refusal, got {config:?}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn defaults_guard_port_25_in_auto_mode() {
        let config = parse("interfaces = [\"eth0\"]\n").unwrap();
        assert_eq!(config.interfaces, ["eth0"]);
        assert_eq!(
            config
                .ports
                .iter()
                .map(|(port, _)| *port)
                .collect::<Vec<_>>(),
            [25]
        );
        assert_eq!(config.xdp_mode, XdpMode::Auto);
        assert!(!config.allow_none);
    }

    #[test]
    fn the_documented_example_parses() {
        let config = parse(
            r#"
interfaces = ["eth0"]
ports = [25]
xdp_mode = "auto"

[[allow]]
name = "provider"
prefixes = ["89.16.184.144/28", "89.16.176.76", "208.123.79.0/255.255.255.0", "2001:db8:25::/48"]

[[deny]]
name = "abuser"
prefixes = ["89.16.184.150"]
"#,
        )
        .unwrap();
        assert_eq!(config.allow.len(), 1);
        assert_eq!(config.allow[0].name, "provider");
        assert_eq!(config.allow[0].prefixes.len(), 4);
        assert_eq!(config.allow[0].prefixes[0].1.line, 8);
        assert_eq!(config.deny[0].prefixes[0].0, "89.16.184.150");
        assert_eq!(config.deny[0].prefixes[0].1.line, 12);
    }

    #[test]
    fn unknown_key_is_refused_with_its_line() {
        let message = refusal(
            "interfaces = [\"eth0\"]\n\n[[allow]]\nname = \"x\"\nprefix = [\"192.0.2.1\"]\n",
        );
        assert!(
            message.starts_with("/etc/smtpguard/test.toml:5: unknown field `prefix`"),
            "{message}"
        );
    }

    #[test]
    fn unknown_top_level_key_is_refused() {
        let message = refusal("interfaces = [\"eth0\"]\nport = [25]\n");
        assert!(message.contains(":2: unknown field `port`"), "{message}");
    }

    #[test]
    fn empty_interface_list_is_refused() {
        let message = refusal("\ninterfaces = []\n");
        assert!(
            message.contains("test.toml:2: `interfaces` is empty"),
            "{message}"
        );
    }

    #[test]
    fn missing_interfaces_is_refused() {
        let message = refusal("ports = [25]\n");
        assert!(message.contains("missing field `interfaces`"), "{message}");
    }

    #[test]
    fn bad_interface_names_are_refused() {
        let message = refusal("interfaces = [\"eth0\", \"averyveryverylongname\"]\n");
        assert!(
            message.contains(":1: bad interface name \"averyveryverylongname\""),
            "{message}"
        );
        let message = refusal("interfaces = [\"eth 0\"]\n");
        assert!(
            message.contains("bad interface name \"eth 0\""),
            "{message}"
        );
    }

    #[test]
    fn bad_ports_are_refused_with_line_and_value() {
        let message = refusal("interfaces = [\"eth0\"]\nports = [25,\n 70000]\n");
        assert_eq!(
            message,
            "/etc/smtpguard/test.toml:3: bad port 70000: ports are 1 to 65535"
        );
        let message = refusal("interfaces = [\"eth0\"]\nports = [0]\n");
        assert!(message.contains(":2: bad port 0"), "{message}");
        let message = refusal("interfaces = [\"eth0\"]\nports = []\n");
        assert!(message.contains(":2: `ports` is empty"), "{message}");
        let message = refusal("interfaces = [\"eth0\"]\nports = [\"25\"]\n");
        assert!(
            message.contains(":2: invalid type: string \"25\", expected i64"),
            "{message}"
        );
    }

    #[test]
    fn bad_xdp_mode_is_refused() {
        let message = refusal("interfaces = [\"eth0\"]\nxdp_mode = \"fast\"\n");
        assert!(message.contains(":2: unknown variant `fast`"), "{message}");
    }

    #[test]
    fn syntax_error_names_the_line() {
        let message = refusal("interfaces = [\"eth0\"]\n\n[[allow]\nname = \"x\"\n");
        assert!(
            message.starts_with("/etc/smtpguard/test.toml:3: "),
            "{message}"
        );
    }

    #[test]
    fn empty_rule_name_is_refused() {
        let message = refusal("interfaces = [\"eth0\"]\n[[allow]]\nname = \" \"\n");
        assert!(
            message.contains(":3: bad rule name \" \": empty"),
            "{message}"
        );
    }

    #[test]
    fn duplicate_ports_and_interfaces_are_folded() {
        let config = parse("interfaces = [\"eth0\", \"eth0\"]\nports = [25, 2525, 25]\n").unwrap();
        assert_eq!(config.interfaces, ["eth0"]);
        assert_eq!(
            config
                .ports
                .iter()
                .map(|(port, _)| *port)
                .collect::<Vec<_>>(),
            [25, 2525]
        );
    }

    #[test]
    fn unreadable_and_non_utf8_files_are_refused() {
        let message = Config::load(Path::new("/nonexistent/smtpguard.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("/nonexistent/smtpguard.toml: cannot read"),
            "{message}"
        );
        let dir = std::env::temp_dir().join(format!("sg-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("latin1.toml");
        std::fs::write(&path, b"interfaces = [\"eth\xe9\"]\n").unwrap();
        let message = Config::load(&path).unwrap_err().to_string();
        assert!(message.contains("not UTF-8"), "{message}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn safety_defaults_and_settings() {
        let config = parse("interfaces = [\"eth0\"]\n").unwrap();
        assert_eq!(config.safety, Safety::default());
        assert_eq!(
            (config.safety.min_prefix_v4, config.safety.min_prefix_v6),
            (12, 32)
        );
        assert!(config.safety.max_growth == 4.0 && !config.safety.allow_any_source);
        let config = parse("interfaces = [\"eth0\"]\n[safety]\nmin_prefix_v4 = 16\nmin_prefix_v6 = 0\nmax_coverage_v4 = 4\nmax_coverage_v6 = 16\nmax_growth = 2\nallow_any_source = true\n").unwrap();
        assert_eq!(
            config.safety,
            Safety {
                min_prefix_v4: 16,
                min_prefix_v6: 0,
                max_coverage_v4: 4,
                max_coverage_v6: 16,
                max_growth: 2.0,
                allow_any_source: true
            }
        );
    }

    #[test]
    fn bad_safety_values_are_refused_with_line_and_value() {
        let head = "interfaces = [\"eth0\"]\n[safety]\n";
        let message = refusal(&format!("{head}min_prefix_v4 = 33\n"));
        assert_eq!(
            message,
            "/etc/smtpguard/test.toml:3: bad min_prefix_v4 \"33\": a prefix length from 0 to 32"
        );
        let message = refusal(&format!("{head}\nmin_prefix_v6 = -1\n"));
        assert_eq!(
            message,
            "/etc/smtpguard/test.toml:4: bad min_prefix_v6 \"-1\": a prefix length from 0 to 128"
        );
        let message = refusal(&format!("{head}max_growth = 0.5\n"));
        assert!(
            message.starts_with(
                "/etc/smtpguard/test.toml:3: bad max_growth \"0.5\": a factor of at least 1"
            ),
            "{message}"
        );
        let message = refusal(&format!("{head}max_growth = nan\n"));
        assert!(message.contains(":3: bad max_growth \"NaN\""), "{message}");
        let message = refusal(&format!("{head}min_prefix = 8\n"));
        assert!(
            message.starts_with("/etc/smtpguard/test.toml:3: unknown field `min_prefix`"),
            "{message}"
        );
        let message = refusal(&format!("{head}allow_any_source = \"yes\"\n"));
        assert!(message.contains(":3: invalid type"), "{message}");
    }

    /// `read_text` on `path` in a thread, failing the test rather than hanging if it blocks.
    fn read_within_a_second(path: &Path) -> Result<String, ConfigError> {
        let (sender, receiver) = std::sync::mpsc::channel();
        let owned = path.to_owned();
        std::thread::spawn(move || {
            let _ = sender.send(read_text(&owned, MAX_CONFIG_BYTES));
        });
        receiver
            .recv_timeout(std::time::Duration::from_secs(1))
            .unwrap_or_else(|_| panic!("reading {} blocked", path.display()))
    }

    #[test]
    fn only_regular_files_are_read() {
        let dir = std::env::temp_dir().join(format!("sg-special-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo.toml");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        // Nobody writes to it: a plain open would block forever.
        let message = read_within_a_second(&fifo).unwrap_err().to_string();
        assert_eq!(
            message,
            format!("{}: a FIFO, not a regular file", fifo.display())
        );
        let message = read_within_a_second(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert_eq!(message, "/dev/zero: a character device, not a regular file");
        let message = read_within_a_second(&dir).unwrap_err().to_string();
        assert_eq!(
            message,
            format!("{}: a directory, not a regular file", dir.display())
        );
        let message = Config::load(&fifo).unwrap_err().to_string();
        assert!(message.ends_with("a FIFO, not a regular file"), "{message}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_over_the_limit_is_refused_unread() {
        let dir = std::env::temp_dir().join(format!("sg-limit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("big.txt");
        std::fs::write(&path, "0123456789").unwrap();
        assert_eq!(read_text(&path, 10).unwrap(), "0123456789");
        let message = read_text(&path, 9).unwrap_err().to_string();
        assert!(
            message.ends_with("big.txt: 10 bytes, more than the 9 such a file may have"),
            "{message}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn url_lists_and_their_settings() {
        let config = parse(
            "interfaces = [\"eth0\"]\n[urls]\nmin_refresh_secs = 300\nca_file = \"/etc/smtpguard/ca.pem\"\n[[allow]]\nname = \"m365\"\nurls = [\"https://endpoints.example/worldwide?clientrequestid=b10c5ed1\"]\njson_key = \"ips\"\n[[deny]]\nname = \"drop\"\nurls = [\"http://lists.example/drop.txt\"]\nrefresh_secs = 600\n",
        )
        .unwrap();
        let m365 = &config.allow[0].urls[0];
        assert_eq!(m365.json_key.as_deref(), Some("ips"));
        assert_eq!(
            m365.refresh,
            Duration::from_secs(3600),
            "an hour by default"
        );
        assert_eq!(m365.at.line, 7);
        assert_eq!(config.deny[0].urls[0].refresh, Duration::from_secs(600));
        assert_eq!(config.urls.min_refresh, Duration::from_secs(300));
        assert_eq!(
            config.urls.ca_file.as_deref(),
            Some(Path::new("/etc/smtpguard/ca.pem"))
        );
        assert_eq!(config.metrics_prefixes, PrefixSeries::Matched);
        // The default hour stays within the bounds.
        let config = parse("interfaces = [\"eth0\"]\n[urls]\nmax_refresh_secs = 900\n[[allow]]\nname = \"a\"\nurls = [\"https://a.example/l\"]\n").unwrap();
        assert_eq!(config.allow[0].urls[0].refresh, Duration::from_secs(900));

        let head = "interfaces = [\"eth0\"]\n[[allow]]\nname = \"a\"\n";
        for (text, want) in [
            (
                "urls = [\"ftp://a.example/l\"]\n",
                "test.toml:4: bad url \"ftp://a.example/l\": only http:// and https:// URLs are fetched",
            ),
            (
                "urls = [\"https://user:pw@a.example/l\"]\n",
                "test.toml:4: bad url \"https://user:pw@a.example/l\": credentials in a URL end up in logs and metrics labels",
            ),
            (
                "urls = [\"lists/drop.txt\"]\n",
                "test.toml:4: bad url \"lists/drop.txt\": not a URL",
            ),
            (
                "json_key = \"ips\"\n",
                "test.toml:4: bad json_key \"ips\": the rule has no `urls` for it to apply to",
            ),
            (
                "urls = [\"https://a.example/l\"]\nrefresh_secs = 10\n",
                "test.toml:5: bad refresh_secs 10: outside [urls] min_refresh_secs to max_refresh_secs (60 to 86400)",
            ),
            (
                "urls = [\"https://a.example/l\"]\nrefresh_secs = 0\n",
                "test.toml:5: bad refresh_secs \"0\": seconds from 1 to 604800 (a week)",
            ),
            (
                "urls = [\"https://a.example/l\"]\n[[deny]]\nname = \"d\"\nurls = [\"https://a.example/l\"]\njson_key = \"ips\"\n",
                "test.toml:7: bad url \"https://a.example/l\": named by another rule with another json_key",
            ),
            (
                "url = [\"https://a.example/l\"]\n",
                "test.toml:4: unknown field `url`",
            ),
        ] {
            let message = refusal(&format!("{head}{text}"));
            assert!(message.contains(want), "{text}: {message}");
        }
        let message = refusal(
            "interfaces = [\"eth0\"]\n[urls]\nmin_refresh_secs = 100\nmax_refresh_secs = 50\n",
        );
        assert!(
            message.contains(":4: bad min_refresh_secs, max_refresh_secs \"50\""),
            "{message}"
        );
        let message = refusal("interfaces = [\"eth0\"]\n[urls]\nca_file = \"ca.pem\"\n");
        assert!(
            message.contains(":3: bad ca_file \"ca.pem\": not an absolute path"),
            "{message}"
        );
        let message = refusal(
            "interfaces = [\"eth0\"]\n[metrics]\nlisten = \"127.0.0.1:9725\"\nprefixes = \"some\"\n",
        );
        assert!(message.contains(":4: unknown variant `some`"), "{message}");
        let config = parse(
            "interfaces = [\"eth0\"]\n[metrics]\nlisten = \"127.0.0.1:9725\"\nprefixes = \"all\"\n",
        )
        .unwrap();
        assert_eq!(config.metrics_prefixes, PrefixSeries::All);
    }
}
