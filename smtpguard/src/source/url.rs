//! Prefix lists fetched over HTTP(S), named by a rule's `urls = [...]`: one prefix per line
//! with `#` and `;` comments (as list files, so the Spamhaus DROP format loads as it is), or a
//! JSON document whose strings under the rule's `json_key` (at any depth, as in Microsoft's
//! endpoint lists) are the prefixes.
//!
//! [`Web`] asks with the validators of the content held (`If-None-Match`,
//! `If-Modified-Since`), so an unchanged list costs a 304 and no parsing; it trusts the
//! system's CA store and an optional `ca_file`, gives up after `timeout_secs` and refuses a
//! body over `max_bytes`. [`parse`] turns a body into entries, each checked as a prefix and
//! kept with its line, so a refusal names the URL and the line.

use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::{
    StatusCode, Uri,
    body::Bytes,
    header::{self, HeaderValue},
};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

use crate::source::{
    config::{ConfigError, Location, UrlSettings, read_text},
    listfile, prefix,
};

/// How many redirects a fetch follows before it gives up.
const MAX_REDIRECTS: usize = 5;

/// What a server said about the content last fetched, to ask whether it changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Validators {
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

/// The outcome of one successful request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Download {
    /// 200: the list, and the validators to ask with next time.
    Body {
        text: String,
        validators: Validators,
    },
    /// 304: the content held is current.
    NotModified,
}

#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("[urls] ca_file {path}: {source}", path = path.display())]
    CaFile {
        path: PathBuf,
        #[source]
        source: Box<ConfigError>,
    },
    #[error("[urls] ca_file {path}: no PEM certificate in it", path = path.display())]
    NoCertificates { path: PathBuf },
    #[error("[urls] ca_file {path}: certificate {index}: {source}", path = path.display())]
    BadCertificate {
        path: PathBuf,
        index: usize,
        #[source]
        source: rustls::Error,
    },
    #[error("setting up TLS: {0}")]
    Tls(#[source] rustls::Error),
    #[error("{url}: not a URL smtpguard fetches: {reason}")]
    BadUrl { url: String, reason: &'static str },
    #[error("{url}: {source}")]
    Request {
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{url}: no complete answer within {secs} s ([urls] timeout_secs)")]
    Timeout { url: String, secs: u64 },
    #[error("{url}: HTTP status {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: more than {limit} redirects")]
    Redirects { url: String, limit: usize },
    #[error("{url}: more than {limit} bytes ([urls] max_bytes)")]
    TooLarge { url: String, limit: u64 },
    #[error("{url}: not UTF-8 text")]
    NotUtf8 { url: String },
    #[error("{url}:{line}: not JSON: {source}")]
    Json {
        url: String,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("{url}: no key {key:?} (json_key) in the JSON document")]
    NoKey { url: String, key: String },
    #[error("{url}:{line}: {value} under {key:?} is not a string")]
    NotAString {
        url: String,
        line: usize,
        key: String,
        value: String,
    },
    #[error("{at}: bad prefix {value:?}: {reason}")]
    BadPrefix {
        at: Location,
        value: String,
        reason: prefix::PrefixError,
    },
    #[error("{url}: no prefixes in it")]
    Empty { url: String },
}

impl UrlError {
    /// The `result` label this failure counts under: `error` when the list could not be had,
    /// `invalid` when what came back was refused.
    pub const fn result(&self) -> &'static str {
        match self {
            Self::Json { .. }
            | Self::NoKey { .. }
            | Self::NotAString { .. }
            | Self::BadPrefix { .. }
            | Self::Empty { .. }
            | Self::NotUtf8 { .. }
            | Self::TooLarge { .. } => "invalid",
            _ => "error",
        }
    }
}

/// Fetching a URL; [`Web`] asks real servers, tests may answer from memory.
pub trait Get {
    /// `url`, unless the content that `validators` describe is still current.
    fn get(
        &self,
        url: &str,
        validators: &Validators,
    ) -> impl Future<Output = Result<Download, UrlError>>;
}

/// An HTTP(S) client with the `[urls]` settings.
pub struct Web {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    timeout: Duration,
    max_bytes: u64,
}

impl Web {
    pub fn new(settings: &UrlSettings) -> Result<Self, UrlError> {
        let roots = roots(settings.ca_file.as_deref())?;
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(UrlError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(settings.timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        // One connection per fetch: lists are fetched minutes apart.
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(connector);
        Ok(Self {
            client,
            timeout: settings.timeout,
            max_bytes: settings.max_bytes,
        })
    }

    async fn fetch(&self, url: &str, validators: &Validators) -> Result<Download, UrlError> {
        let mut current = url.to_owned();
        for _ in 0..=MAX_REDIRECTS {
            let uri: Uri = current.parse().map_err(|_| UrlError::BadUrl {
                url: current.clone(),
                reason: "not a URL",
            })?;
            let mut request = hyper::Request::get(uri.clone())
                .header(
                    header::USER_AGENT,
                    concat!("smtpguard/", env!("CARGO_PKG_VERSION")),
                )
                .header(header::ACCEPT_ENCODING, "identity");
            for (name, value) in [
                (header::IF_NONE_MATCH, &validators.etag),
                (header::IF_MODIFIED_SINCE, &validators.last_modified),
            ] {
                if let Some(value) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
                    request = request.header(name, value);
                }
            }
            let request = request
                .body(Empty::new())
                .map_err(|source| UrlError::Request {
                    url: url.to_owned(),
                    source: Box::new(source),
                })?;
            let response =
                self.client
                    .request(request)
                    .await
                    .map_err(|source| UrlError::Request {
                        url: url.to_owned(),
                        source: Box::new(source),
                    })?;
            let status = response.status();
            if status.is_redirection() && status != StatusCode::NOT_MODIFIED {
                let location = response
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|value| value.to_str().ok())
                    .ok_or_else(|| UrlError::Status {
                        url: url.to_owned(),
                        status: status.as_u16(),
                    })?;
                current = resolve(&uri, location);
                if let Some(reason) = crate::source::config::url_problem(&current) {
                    return Err(UrlError::BadUrl {
                        url: current,
                        reason,
                    });
                }
                continue;
            }
            if status == StatusCode::NOT_MODIFIED {
                return Ok(Download::NotModified);
            }
            if status != StatusCode::OK {
                return Err(UrlError::Status {
                    url: url.to_owned(),
                    status: status.as_u16(),
                });
            }
            let header_text = |name| {
                response
                    .headers()
                    .get(name)
                    .and_then(|value: &HeaderValue| value.to_str().ok())
                    .map(str::to_owned)
            };
            let validators = Validators {
                etag: header_text(header::ETAG),
                last_modified: header_text(header::LAST_MODIFIED),
            };
            let too_large = || UrlError::TooLarge {
                url: url.to_owned(),
                limit: self.max_bytes,
            };
            let announced = header_text(header::CONTENT_LENGTH).and_then(|len| len.parse().ok());
            if announced.is_some_and(|len: u64| len > self.max_bytes) {
                return Err(too_large());
            }
            let limit = usize::try_from(self.max_bytes).unwrap_or(usize::MAX);
            let body = Limited::new(response.into_body(), limit)
                .collect()
                .await
                .map_err(|source| {
                    if source.is::<http_body_util::LengthLimitError>() {
                        too_large()
                    } else {
                        UrlError::Request {
                            url: url.to_owned(),
                            source,
                        }
                    }
                })?
                .to_bytes();
            let text = String::from_utf8(body.to_vec()).map_err(|_| UrlError::NotUtf8 {
                url: url.to_owned(),
            })?;
            return Ok(Download::Body { text, validators });
        }
        Err(UrlError::Redirects {
            url: url.to_owned(),
            limit: MAX_REDIRECTS,
        })
    }
}

impl Get for Web {
    async fn get(&self, url: &str, validators: &Validators) -> Result<Download, UrlError> {
        tokio::time::timeout(self.timeout, self.fetch(url, validators))
            .await
            .unwrap_or_else(|_| {
                Err(UrlError::Timeout {
                    url: url.to_owned(),
                    secs: self.timeout.as_secs(),
                })
            })
    }
}

/// A redirect's `Location`, absolute, or relative to `base`.
fn resolve(base: &Uri, location: &str) -> String {
    if location.contains("://") {
        return location.to_owned();
    }
    let scheme = base.scheme_str().unwrap_or("http");
    let authority = base.authority().map_or("", |authority| authority.as_str());
    if location.starts_with('/') {
        format!("{scheme}://{authority}{location}")
    } else {
        let path = base.path();
        let dir = &path[..path.rfind('/').map_or(0, |slash| slash + 1)];
        format!("{scheme}://{authority}{dir}{location}")
    }
}

/// The system's CA certificates and those of `ca_file`.
fn roots(ca_file: Option<&std::path::Path>) -> Result<rustls::RootCertStore, UrlError> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};

    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    if added == 0 {
        log::debug!("no system CA certificates found: {:?}", native.errors);
    }
    if let Some(path) = ca_file {
        let text = read_text(path, 16 << 20).map_err(|source| UrlError::CaFile {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        let mut count = 0;
        for (index, certificate) in CertificateDer::pem_slice_iter(text.as_bytes()).enumerate() {
            let certificate = certificate.map_err(|_| UrlError::NoCertificates {
                path: path.to_owned(),
            })?;
            roots
                .add(certificate)
                .map_err(|source| UrlError::BadCertificate {
                    path: path.to_owned(),
                    index: index + 1,
                    source,
                })?;
            count += 1;
        }
        if count == 0 {
            return Err(UrlError::NoCertificates {
                path: path.to_owned(),
            });
        }
    }
    Ok(roots)
}

/// The prefixes `text` (fetched from `url`) lists, as written, each with its line: every
/// non-comment line, or with `json_key` every string under that key. Each is checked as a
/// prefix, so a list with a bad entry is refused whole, naming the URL and the line.
pub fn parse(
    url: &str,
    text: &str,
    json_key: Option<&str>,
) -> Result<Vec<(String, Location)>, UrlError> {
    let entries = match json_key {
        None => listfile::entries(std::path::Path::new(url), text),
        Some(key) => json_entries(url, text, key)?,
    };
    for (value, at) in &entries {
        prefix::parse(value).map_err(|reason| UrlError::BadPrefix {
            at: at.clone(),
            value: value.clone(),
            reason,
        })?;
    }
    if entries.is_empty() {
        return Err(UrlError::Empty {
            url: url.to_owned(),
        });
    }
    Ok(entries)
}

/// Every string under `key`, at any depth, in document order, each with the line it is on.
fn json_entries(url: &str, text: &str, key: &str) -> Result<Vec<(String, Location)>, UrlError> {
    let document: serde_json::Value =
        serde_json::from_str(text).map_err(|source| UrlError::Json {
            url: url.to_owned(),
            line: source.line(),
            source,
        })?;
    let mut found = false;
    let mut values = Vec::new();
    collect(&document, key, &mut found, &mut values);
    if !found {
        return Err(UrlError::NoKey {
            url: url.to_owned(),
            key: key.to_owned(),
        });
    }
    let lines = LineFinder::new(text);
    let file: Arc<Path> = Path::new(url).into();
    let mut entries = Vec::with_capacity(values.len());
    let mut from = 0;
    for value in values {
        let (line, next) = lines.find(value, from);
        from = next;
        match value {
            serde_json::Value::String(prefix) => entries.push((
                prefix.trim().to_owned(),
                Location {
                    file: Arc::clone(&file),
                    line,
                },
            )),
            other => {
                return Err(UrlError::NotAString {
                    url: url.to_owned(),
                    line,
                    key: key.to_owned(),
                    value: other.to_string(),
                });
            }
        }
    }
    Ok(entries)
}

/// The values under `key` anywhere in `value`: strings as they are, arrays flattened.
fn collect<'a>(
    value: &'a serde_json::Value,
    key: &str,
    found: &mut bool,
    out: &mut Vec<&'a serde_json::Value>,
) {
    match value {
        serde_json::Value::Object(map) => {
            for (name, inner) in map {
                if name == key {
                    *found = true;
                    flatten(inner, out);
                } else {
                    collect(inner, key, found, out);
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                collect(item, key, found, out);
            }
        }
        _ => {}
    }
}

fn flatten<'a>(value: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
    match value {
        serde_json::Value::Array(items) => items.iter().for_each(|item| flatten(item, out)),
        serde_json::Value::Null => {}
        other => out.push(other),
    }
}

/// Finds the line a JSON value is written on: its text searched from where the previous
/// value was found (values are collected in document order, keys of an object aside).
struct LineFinder<'a> {
    text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> LineFinder<'a> {
    fn new(text: &'a str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(index, _)| index + 1))
            .collect();
        Self { text, line_starts }
    }

    /// The line of `value`'s first occurrence at or after byte `from` (else anywhere), and
    /// where to search from next.
    fn find(&self, value: &serde_json::Value, from: usize) -> (usize, usize) {
        let needle = value.to_string();
        let at = self.text[from.min(self.text.len())..]
            .find(&needle)
            .map(|offset| offset + from)
            .or_else(|| self.text.find(&needle));
        match at {
            Some(offset) => (
                self.line_starts.partition_point(|&start| start <= offset),
                offset + needle.len(),
            ),
            None => (0, from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "https://lists.example/drop.txt";

    fn lines(entries: &[(String, Location)]) -> Vec<(&str, usize)> {
        entries
            .iter()
            .map(|(text, at)| (text.as_str(), at.line))
            .collect()
    }

    #[test]
    fn the_spamhaus_drop_format_loads_as_it_is() {
        let text = "; Spamhaus DROP List 2026/11/23 - (c) 2026 The Spamhaus Project\n; Last-Modified: Mon, 23 Nov 2026 10:00:00 GMT\n1.10.16.0/20 ; SBL256894\n2.56.192.0/22 ; SBL459831\n";
        let entries = parse(URL, text, None).unwrap();
        assert_eq!(lines(&entries), [("1.10.16.0/20", 3), ("2.56.192.0/22", 4)]);
        assert_eq!(entries[0].1.to_string(), "https://lists.example/drop.txt:3");
    }

    #[test]
    fn a_bad_line_is_refused_with_the_url_and_its_line() {
        let error = parse(URL, "192.0.2.0/24\n# fine\n192.0.2.300\n", None).unwrap_err();
        assert_eq!(
            error.to_string(),
            "https://lists.example/drop.txt:3: bad prefix \"192.0.2.300\": not an IPv4 or IPv6 address"
        );
        assert_eq!(error.result(), "invalid");
        let error = parse(URL, "; only comments\n\n", None).unwrap_err();
        assert_eq!(
            error.to_string(),
            "https://lists.example/drop.txt: no prefixes in it"
        );
    }

    #[test]
    fn json_strings_under_the_key_at_any_depth() {
        let text = r#"[
  {
    "id": 1,
    "serviceArea": "Exchange",
    "ips": ["13.107.6.152/31", "2603:1006::/40"],
    "tcpPorts": "25"
  },
  {
    "id": 2,
    "nested": {"ips": [["40.92.0.0/15"]]},
    "urls": ["*.mail.protection.outlook.com"]
  },
  {"id": 3, "ips": null}
]"#;
        let url = "https://endpoints.example/worldwide";
        let entries = parse(url, text, Some("ips")).unwrap();
        assert_eq!(
            lines(&entries),
            [
                ("13.107.6.152/31", 5),
                ("2603:1006::/40", 5),
                ("40.92.0.0/15", 10)
            ]
        );
        let error = parse(url, text, Some("ip")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "https://endpoints.example/worldwide: no key \"ip\" (json_key) in the JSON document"
        );
        let error = parse(url, "{\n \"ips\": [\"10.0.0.0/8\",\n 7]}", Some("ips")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "https://endpoints.example/worldwide:3: 7 under \"ips\" is not a string"
        );
        let error = parse(
            url,
            "{\n \"ips\": [\"10.0.0.0/8\",\n \"10.0.0.x\"]}",
            Some("ips"),
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "https://endpoints.example/worldwide:3: bad prefix \"10.0.0.x\": not an IPv4 or IPv6 address"
        );
        let error = parse(url, "{\n \"ips\": [\n", Some("ips")).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("https://endpoints.example/worldwide:3: not JSON: "),
            "{error}"
        );
    }

    #[test]
    fn redirects_resolve_against_the_request() {
        let base: Uri = "https://a.example/lists/drop.txt".parse().unwrap();
        assert_eq!(resolve(&base, "https://b.example/x"), "https://b.example/x");
        assert_eq!(resolve(&base, "/v4.txt"), "https://a.example/v4.txt");
        assert_eq!(resolve(&base, "v4.txt"), "https://a.example/lists/v4.txt");
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = std::env::temp_dir().join(format!("sg-url-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let settings = UrlSettings {
            ca_file: Some(path.clone()),
            ..UrlSettings::default()
        };
        let error = Web::new(&settings).err().expect("refused").to_string();
        assert_eq!(
            error,
            format!(
                "[urls] ca_file {}: no PEM certificate in it",
                path.display()
            )
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
