//! The published policy on the wire: the whole model (scopes with their destinations, ports,
//! mode and action; every prefix with its list, rule, action, precedence and origin), compact
//! enough that 100,000 + 100,000 prefixes fit one etcd request (1.5 MiB by default).
//!
//! A snapshot is two values: a JSON [`Manifest`] (format version, content hash, sizes, who
//! published what) and the payload, deflate-compressed. The payload is a JSON header (the
//! scopes and, per scope, groups of entries sharing list, rule, action, precedence and origin)
//! followed by the entries in binary: per entry the line delta (zig-zag varint), a byte for
//! family and prefix length, and only the address bytes the length covers. The hash is
//! SHA-256 of the uncompressed payload; a reader checks it, and the format, before it
//! believes anything else in the snapshot.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::Arc,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    policy::{Entry, List, Policy, Scope, merge::settle},
    source::{
        config::{Action, Location, Mode, Precedence},
        fetch::Origin,
    },
};

/// The snapshot format this build writes and reads. A reader refuses any other: an older
/// daemon must not half-apply a model it does not know.
pub const FORMAT: u32 = 1;

/// The largest payload a reader decompresses (a bomb stops here).
const MAX_PAYLOAD_BYTES: u64 = 512 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("manifest unreadable: {0}")]
    Manifest(#[source] serde_json::Error),
    #[error("snapshot format {found}; this smtpguard reads format {FORMAT}: upgrade it first")]
    Format { found: u32 },
    #[error("snapshot compressed with {0:?}; this smtpguard reads deflate")]
    Compression(String),
    #[error("snapshot payload of {0} bytes is larger than the {MAX_PAYLOAD_BYTES} a reader takes")]
    TooLarge(u64),
    #[error("snapshot does not decompress: {0}")]
    Inflate(#[source] std::io::Error),
    #[error("snapshot is {found} bytes, the manifest says {expected}")]
    Size { found: u64, expected: u64 },
    #[error("content hash {found} does not match the manifest's {expected}: tampered or torn")]
    Hash { found: String, expected: String },
    #[error("snapshot payload is malformed: {0}")]
    Malformed(&'static str),
    #[error("snapshot header unreadable: {0}")]
    Header(#[source] serde_json::Error),
    #[error("cannot encode the snapshot: {0}")]
    Encode(#[source] std::io::Error),
}

/// What a snapshot is, readable without decompressing it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// `sha256:` and the hex digest of the uncompressed payload.
    pub hash: String,
    pub compression: String,
    pub compressed_bytes: u64,
    pub payload_bytes: u64,
    pub allow: usize,
    pub deny: usize,
    pub scopes: usize,
    pub published_at_unix: u64,
    /// Who published: `user@host`.
    pub publisher: String,
    /// The central configuration it was compiled from.
    pub source: String,
}

impl Manifest {
    /// The first 12 hex digits of the hash, for tables.
    pub fn short_hash(&self) -> &str {
        short_hash(&self.hash)
    }
}

/// The first 12 hex digits of a `sha256:` hash.
pub fn short_hash(hash: &str) -> &str {
    let hex = hash.strip_prefix("sha256:").unwrap_or(hash);
    &hex[..hex.len().min(12)]
}

/// A policy ready to publish: its manifest and compressed payload.
#[derive(Clone, Debug)]
pub struct Encoded {
    pub manifest: Manifest,
    pub compressed: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    scopes: Vec<ScopeHeader>,
}

#[derive(Serialize, Deserialize)]
struct ScopeHeader {
    name: String,
    destinations: Vec<IpNet>,
    guarded: bool,
    ports: Vec<u16>,
    mode: Mode,
    action: Action,
    groups: Vec<GroupHeader>,
}

/// Entries that share everything but their prefix and line.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
struct GroupHeader {
    list: List,
    rule: String,
    action: Option<Action>,
    precedence: Precedence,
    origin: WireOrigin,
    /// The file the entries' lines refer to (the configuration, or a list file).
    file: PathBuf,
    count: usize,
}

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "lowercase")]
enum WireOrigin {
    Literal,
    File(PathBuf),
    Host(String),
    Spf(String),
    Url(String),
}

impl From<&Origin> for WireOrigin {
    fn from(origin: &Origin) -> Self {
        match origin {
            Origin::Literal => Self::Literal,
            Origin::File(path) => Self::File(path.to_path_buf()),
            Origin::Host(name) => Self::Host(name.clone()),
            Origin::Spf(domain) => Self::Spf(domain.clone()),
            Origin::Url(url) => Self::Url(url.to_string()),
        }
    }
}

impl From<WireOrigin> for Origin {
    fn from(origin: WireOrigin) -> Self {
        match origin {
            WireOrigin::Literal => Self::Literal,
            WireOrigin::File(path) => Self::File(path.into()),
            WireOrigin::Host(name) => Self::Host(name),
            WireOrigin::Spf(domain) => Self::Spf(domain),
            WireOrigin::Url(url) => Self::Url(url.into()),
        }
    }
}

/// The uncompressed payload of `policy`: the same policy always gives the same bytes.
pub fn payload(policy: &Policy) -> Vec<u8> {
    let mut scopes = Vec::new();
    let mut body = Vec::new();
    for scope in &policy.scopes {
        // Keyed in a fixed order, so the same policy always gives the same bytes.
        type Key = (
            List,
            Arc<str>,
            Option<u8>,
            Precedence,
            WireOrigin,
            Arc<Path>,
        );
        let mut groups: BTreeMap<Key, (GroupHeader, Vec<(usize, IpNet)>)> = BTreeMap::new();
        for (net, entry) in &scope.entries {
            let origin = WireOrigin::from(&entry.origin);
            let key = (
                entry.list,
                entry.rule.clone(),
                entry.action.map(|action| action as u8),
                entry.precedence,
                origin.clone(),
                entry.at.file.clone(),
            );
            groups
                .entry(key)
                .or_insert_with(|| {
                    let header = GroupHeader {
                        list: entry.list,
                        rule: entry.rule.to_string(),
                        action: entry.action,
                        precedence: entry.precedence,
                        origin,
                        file: entry.at.file.to_path_buf(),
                        count: 0,
                    };
                    (header, Vec::new())
                })
                .1
                .push((entry.at.line, *net));
        }
        let mut headers = Vec::new();
        for (mut header, mut entries) in groups.into_values() {
            entries.sort_unstable();
            header.count = entries.len();
            let mut line = 0i64;
            for (at, net) in entries {
                let at = at as i64;
                put_varint(&mut body, zigzag(at - line));
                line = at;
                put_net(&mut body, &net);
            }
            headers.push(header);
        }
        scopes.push(ScopeHeader {
            name: scope.name.clone(),
            destinations: scope.destinations.clone(),
            guarded: scope.guarded,
            ports: scope.ports.iter().copied().collect(),
            mode: scope.mode,
            action: scope.unlisted_action,
            groups: headers,
        });
    }
    let header = serde_json::to_vec(&Header { scopes }).expect("the header is plain data");
    let mut out = Vec::with_capacity(4 + header.len() + body.len());
    out.extend_from_slice(&(header.len() as u32).to_be_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&body);
    out
}

/// Compresses and hashes `policy` for publishing.
pub fn encode(
    policy: &Policy,
    publisher: &str,
    source: &str,
    now_unix: u64,
) -> Result<Encoded, SnapshotError> {
    let payload = payload(policy);
    let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(&payload).map_err(SnapshotError::Encode)?;
    let compressed = encoder.finish().map_err(SnapshotError::Encode)?;
    Ok(Encoded {
        manifest: Manifest {
            format: FORMAT,
            hash: hash(&payload),
            compression: "deflate".to_owned(),
            compressed_bytes: compressed.len() as u64,
            payload_bytes: payload.len() as u64,
            allow: policy.count(List::Allow),
            deny: policy.count(List::Deny),
            scopes: policy.scopes.len(),
            published_at_unix: now_unix,
            publisher: publisher.to_owned(),
            source: source.to_owned(),
        },
        compressed,
    })
}

/// `sha256:` and the hex digest of `bytes`.
pub fn hash(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let hex: String = digest
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// Reads a manifest, refusing a format this build does not know.
pub fn read_manifest(bytes: &[u8]) -> Result<Manifest, SnapshotError> {
    #[derive(Deserialize)]
    struct Version {
        format: u32,
    }
    // The version alone first: a newer manifest may not parse as this build's.
    let version: Version = serde_json::from_slice(bytes).map_err(SnapshotError::Manifest)?;
    if version.format != FORMAT {
        return Err(SnapshotError::Format {
            found: version.format,
        });
    }
    serde_json::from_slice(bytes).map_err(SnapshotError::Manifest)
}

/// Checks `compressed` against `manifest` (format, sizes, hash) and decodes the policy.
pub fn decode(manifest: &Manifest, compressed: &[u8]) -> Result<Policy, SnapshotError> {
    if manifest.format != FORMAT {
        return Err(SnapshotError::Format {
            found: manifest.format,
        });
    }
    if manifest.compression != "deflate" {
        return Err(SnapshotError::Compression(manifest.compression.clone()));
    }
    if manifest.payload_bytes > MAX_PAYLOAD_BYTES {
        return Err(SnapshotError::TooLarge(manifest.payload_bytes));
    }
    let mut payload = Vec::with_capacity(manifest.payload_bytes as usize);
    flate2::read::DeflateDecoder::new(compressed)
        .take(manifest.payload_bytes + 1)
        .read_to_end(&mut payload)
        .map_err(SnapshotError::Inflate)?;
    if payload.len() as u64 != manifest.payload_bytes {
        return Err(SnapshotError::Size {
            found: payload.len() as u64,
            expected: manifest.payload_bytes,
        });
    }
    let found = hash(&payload);
    if found != manifest.hash {
        return Err(SnapshotError::Hash {
            found,
            expected: manifest.hash.clone(),
        });
    }
    parse_payload(&payload)
}

fn parse_payload(payload: &[u8]) -> Result<Policy, SnapshotError> {
    let length = payload
        .get(..4)
        .map(|bytes| u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize)
        .ok_or(SnapshotError::Malformed("no header"))?;
    let header = payload
        .get(4..4 + length)
        .ok_or(SnapshotError::Malformed("header cut off"))?;
    let header: Header = serde_json::from_slice(header).map_err(SnapshotError::Header)?;
    let mut body = Reader {
        bytes: &payload[4 + length..],
    };
    let mut policy = Policy::default();
    for scope in header.scopes {
        let mut entries = BTreeMap::new();
        for group in scope.groups {
            // One rule name, origin and file for the whole group, shared by its entries.
            let rule: Arc<str> = group.rule.into();
            let origin = Origin::from(group.origin);
            let file: Arc<Path> = group.file.into();
            let mut line = 0i64;
            for _ in 0..group.count {
                line += unzigzag(body.varint()?);
                let net = body.net()?;
                let entry = Entry {
                    list: group.list,
                    rule: Arc::clone(&rule),
                    action: group.action,
                    precedence: group.precedence,
                    decided_by: None,
                    origin: origin.clone(),
                    at: Location {
                        file: Arc::clone(&file),
                        line: usize::try_from(line)
                            .map_err(|_| SnapshotError::Malformed("negative line"))?,
                    },
                };
                if entries.insert(net, entry).is_some() {
                    return Err(SnapshotError::Malformed("a prefix twice in one scope"));
                }
            }
        }
        settle(&mut entries);
        policy.scopes.push(Scope {
            name: scope.name,
            destinations: scope.destinations,
            guarded: scope.guarded,
            ports: scope.ports.into_iter().collect(),
            mode: scope.mode,
            unlisted_action: scope.action,
            entries,
            outranked: Vec::new(),
        });
    }
    if !body.bytes.is_empty() {
        return Err(SnapshotError::Malformed("bytes after the last entry"));
    }
    if policy.scopes.is_empty() {
        return Err(SnapshotError::Malformed("no scope"));
    }
    Ok(policy)
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A tag byte (IPv4: the length, 0 to 32; IPv6: 33 + the length) and the address bytes the
/// length covers.
fn put_net(out: &mut Vec<u8>, net: &IpNet) {
    let len = net.prefix_len();
    let covered = usize::from(len).div_ceil(8);
    match net.addr() {
        IpAddr::V4(addr) => {
            out.push(len);
            out.extend_from_slice(&addr.octets()[..covered]);
        }
        IpAddr::V6(addr) => {
            out.push(33 + len);
            out.extend_from_slice(&addr.octets()[..covered]);
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, count: usize) -> Result<&[u8], SnapshotError> {
        if self.bytes.len() < count {
            return Err(SnapshotError::Malformed("entries cut off"));
        }
        let (head, tail) = self.bytes.split_at(count);
        self.bytes = tail;
        Ok(head)
    }

    fn varint(&mut self) -> Result<u64, SnapshotError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.take(1)?[0];
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(SnapshotError::Malformed("varint too long"))
    }

    fn net(&mut self) -> Result<IpNet, SnapshotError> {
        let tag = self.take(1)?[0];
        let (v4, len) = match tag {
            0..=32 => (true, tag),
            33..=161 => (false, tag - 33),
            _ => return Err(SnapshotError::Malformed("bad prefix tag")),
        };
        let covered = self.take(usize::from(len).div_ceil(8))?;
        let net = if v4 {
            let mut octets = [0u8; 4];
            octets[..covered.len()].copy_from_slice(covered);
            IpNet::new(Ipv4Addr::from(octets).into(), len)
        } else {
            let mut octets = [0u8; 16];
            octets[..covered.len()].copy_from_slice(covered);
            IpNet::new(Ipv6Addr::from(octets).into(), len)
        }
        .map_err(|_| SnapshotError::Malformed("bad prefix length"))?;
        if net.trunc() != net {
            return Err(SnapshotError::Malformed("prefix with host bits"));
        }
        Ok(net)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::source::{config::Config, fetch::Fetched};

    fn build(text: &str) -> Policy {
        let config = Config::parse(Path::new("/etc/smtpguard/central.toml"), text).unwrap();
        Policy::build(&config, &Fetched::default()).unwrap().0
    }

    const CENTRAL: &str = r#"interfaces = ["eth0"]
ports = [25, 587]
action = "reject"
[[allow]]
name = "provider"
prefixes = ["192.0.2.0/24", "2001:db8:25::/48", "198.51.100.7"]
[[deny]]
name = "abuser"
prefixes = ["192.0.2.9"]
[[deny]]
name = "feed"
precedence = "allow"
action = "drop"
prefixes = ["192.0.2.64/26", "203.0.113.0/24"]
[[scope]]
name = "b"
destinations = ["198.51.100.2"]
mode = "audit"
[[scope.allow]]
name = "other"
prefixes = ["203.0.113.0/25"]
"#;

    fn encoded(policy: &Policy) -> Encoded {
        encode(policy, "admin@central", "/etc/smtpguard/central.toml", 1).unwrap()
    }

    #[test]
    fn round_trip_keeps_the_whole_model() {
        let policy = build(CENTRAL);
        let snapshot = encoded(&policy);
        let decoded = decode(&snapshot.manifest, &snapshot.compressed).unwrap();
        assert_eq!(
            decoded.scopes,
            policy
                .scopes
                .iter()
                .map(|scope| Scope {
                    outranked: Vec::new(),
                    ..scope.clone()
                })
                .collect::<Vec<_>>()
        );
        assert_eq!(snapshot.manifest.allow, 4);
        assert_eq!(snapshot.manifest.deny, 3);
        // Same policy, same bytes: the hash names the content.
        assert_eq!(encoded(&policy).manifest.hash, snapshot.manifest.hash);
    }

    #[test]
    fn tampered_payload_and_newer_format_are_refused() {
        let policy = build(CENTRAL);
        let snapshot = encoded(&policy);
        let other = encoded(&build(&CENTRAL.replace("192.0.2.9", "192.0.2.10")));
        // A valid payload of another policy under this manifest: the hash gives it away.
        let mut manifest = snapshot.manifest.clone();
        manifest.payload_bytes = other.manifest.payload_bytes;
        let error = decode(&manifest, &other.compressed)
            .unwrap_err()
            .to_string();
        assert!(error.contains("does not match the manifest"), "{error}");
        let mut bytes = snapshot.compressed.clone();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x55;
        assert!(decode(&snapshot.manifest, &bytes).is_err());
        let text = serde_json::to_string(&snapshot.manifest)
            .unwrap()
            .replace("\"format\":1", "\"format\":2");
        let error = read_manifest(text.as_bytes()).unwrap_err().to_string();
        assert_eq!(
            error,
            "snapshot format 2; this smtpguard reads format 1: upgrade it first"
        );
    }

    #[test]
    fn two_hundred_thousand_prefixes_fit_one_etcd_request() {
        let mut policy = build(CENTRAL);
        let scope = &mut policy.scopes[0];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for list in [List::Allow, List::Deny] {
            let mut line = 0;
            let mut added = 0;
            while added < 100_000 {
                // xorshift: addresses spread over the whole space.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let net = IpNet::new(
                    Ipv4Addr::from(state as u32).into(),
                    24 + (state >> 40) as u8 % 9,
                )
                .unwrap()
                .trunc();
                line += 1;
                if scope.entries.contains_key(&net) {
                    continue;
                }
                added += 1;
                scope.entries.insert(
                    net,
                    Entry {
                        list,
                        rule: format!("{list}-file").into(),
                        action: (list == List::Deny).then_some(Action::Drop),
                        precedence: if list == List::Deny {
                            Precedence::Allow
                        } else {
                            Precedence::Specific
                        },
                        decided_by: None,
                        origin: Origin::File(
                            Path::new(&format!("/etc/smtpguard/{list}.txt")).into(),
                        ),
                        at: Location {
                            file: Path::new(&format!("/etc/smtpguard/{list}.txt")).into(),
                            line,
                        },
                    },
                );
            }
        }
        let snapshot = encoded(&policy);
        assert!(
            snapshot.compressed.len() < 1_400_000,
            "{} bytes compressed ({} raw)",
            snapshot.compressed.len(),
            snapshot.manifest.payload_bytes
        );
        let decoded = decode(&snapshot.manifest, &snapshot.compressed).unwrap();
        assert_eq!(decoded.count(List::Allow), policy.count(List::Allow));
        assert_eq!(decoded.scopes[0].entries, {
            let mut entries = policy.scopes[0].entries.clone();
            settle(&mut entries);
            entries
        });
    }
}
