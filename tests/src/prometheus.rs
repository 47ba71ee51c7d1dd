//! A real Prometheus server (Debian's `prometheus` package) in a test namespace, scraping a
//! target every second, and a minimal HTTP client for its query API and for raw scrapes.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::netns::{Netns, unique_tag};

/// Where Prometheus serves its API inside the namespace.
pub const API: &str = "127.0.0.1:9090";

/// Sends `GET path` to `address` from inside `netns`; returns the status code and the body.
pub fn http_get(netns: &Netns, address: &str, path: &str) -> std::io::Result<(u16, String)> {
    let address: SocketAddr = address.parse().expect("address");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    netns.run(move || {
        let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(request.as_bytes())?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default();
        Ok((status, dechunk(&body)))
    })
}

/// Undoes `Transfer-Encoding: chunked` where a body uses it.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return body.to_owned();
        };
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_owned();
        };
        if size == 0 {
            return out;
        }
        if after.len() < size {
            return body.to_owned();
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
}

/// A running Prometheus; killed on drop.
pub struct Prometheus<'a> {
    netns: &'a Netns,
    child: Option<Child>,
    dir: PathBuf,
}

impl<'a> Prometheus<'a> {
    /// Starts Prometheus in `netns`, scraping `target` (HOST:PORT) every second.
    pub fn start(netns: &'a Netns, target: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sg-prometheus-{}", unique_tag()));
        std::fs::create_dir_all(dir.join("data")).expect("prometheus dir");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n  - job_name: smtpguard\n    static_configs:\n      - targets: [\"{target}\"]\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("prometheus config");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns.path()))
            .arg("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={API}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn prometheus (install the prometheus package: cargo xtask setup)");
        let prometheus = Self {
            netns,
            child: Some(child),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(http_get(netns, API, "/-/ready"), Ok((200, _))) {
            assert!(
                Instant::now() < deadline,
                "prometheus not ready:\n{}",
                prometheus.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        prometheus
    }

    /// Runs an instant query; returns the API's JSON answer.
    pub fn query(&self, promql: &str) -> serde_json::Value {
        let encoded: String = promql
            .bytes()
            .map(|byte| match byte {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => {
                    (byte as char).to_string()
                }
                _ => format!("%{byte:02X}"),
            })
            .collect();
        let (status, body) = http_get(self.netns, API, &format!("/api/v1/query?query={encoded}"))
            .unwrap_or_else(|error| panic!("query {promql}: {error}"));
        assert_eq!(status, 200, "query {promql}: {body}");
        serde_json::from_str(&body)
            .unwrap_or_else(|error| panic!("query {promql}: {error}: {body}"))
    }

    /// Polls `promql` until its single value is `want`, or panics after `timeout`.
    pub fn wait_for(&self, promql: &str, want: f64, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let answer = self.query(promql);
            let value = answer["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|value| value.parse::<f64>().ok());
            if value == Some(want) {
                return answer;
            }
            assert!(
                Instant::now() < deadline,
                "{promql}: wanted {want}, Prometheus says {answer}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus<'_> {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
