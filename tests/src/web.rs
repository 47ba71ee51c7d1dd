//! A real web server for the URL list tests: Debian's nginx, run as root in the foreground
//! inside a test namespace, listening on its loopback, with its pid file, logs and temporary
//! folders in a folder of its own. Static files come with `ETag` and `Last-Modified`, so a
//! conditional request for an unchanged list gets a 304. With [`WebServer::start_tls`] it
//! also serves HTTPS, with a certificate from a test CA made by openssl for the occasion.

use std::{
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use crate::netns::{Netns, unique_tag};

/// Where it serves plain HTTP inside its namespace...
pub const HTTP: &str = "127.0.0.1:8080";
/// ...and HTTPS, when started with TLS.
pub const HTTPS: &str = "127.0.0.1:8443";

/// A running nginx; killed on drop, its folder removed.
pub struct WebServer {
    child: Option<Child>,
    netns_path: String,
    pub dir: PathBuf,
    /// Bumped on each publish, so every new version gets a new `Last-Modified` and `ETag`
    /// even within one second.
    version: u64,
}

impl WebServer {
    /// nginx serving `dir/www` over HTTP on [`HTTP`] in `netns`.
    pub fn start(netns: &Netns) -> Self {
        Self::launch(netns, false)
    }

    /// As [`WebServer::start`], and over HTTPS on [`HTTPS`] with a certificate for
    /// 127.0.0.1 signed by a test CA ([`WebServer::ca_file`]).
    pub fn start_tls(netns: &Netns) -> Self {
        Self::launch(netns, true)
    }

    fn launch(netns: &Netns, tls: bool) -> Self {
        let dir = std::env::temp_dir().join(format!("sg-web-{}", unique_tag()));
        std::fs::create_dir_all(dir.join("www")).expect("web dir");
        std::fs::create_dir_all(dir.join("tmp")).expect("web tmp dir");
        let d = dir.display();
        let mut servers = format!("  server {{ listen {HTTP}; root {d}/www; }}\n");
        if tls {
            make_certificates(&dir);
            servers.push_str(&format!(
                "  server {{ listen {HTTPS} ssl; ssl_certificate {d}/server.pem; ssl_certificate_key {d}/server.key; root {d}/www; }}\n"
            ));
        }
        let config = format!(
            "user root;\nworker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 64; }}\nhttp {{\n  default_type text/plain;\n  log_format sg '$request_uri $status';\n  access_log {d}/access.log sg;\n  client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n  fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n{servers}}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), config).expect("nginx config");
        let mut server = Self {
            child: None,
            netns_path: netns.path(),
            dir,
            version: 0,
        };
        server.serve(netns);
        server
    }

    /// (Re)starts nginx after [`WebServer::stop`].
    pub fn serve(&mut self, netns: &Netns) {
        assert!(self.child.is_none(), "nginx already runs");
        let output = std::fs::File::create(self.dir.join("nginx.out")).expect("nginx output");
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns_path))
            .arg("nginx")
            .arg("-p")
            .arg(&self.dir)
            .arg("-c")
            .arg(self.dir.join("nginx.conf"))
            .arg("-e")
            .arg(self.dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("output"))
            .stderr(output)
            .spawn()
            .expect("spawn nginx (install nginx: cargo xtask setup)");
        self.child = Some(child);
        let address: SocketAddr = HTTP.parse().expect("address");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten())
            {
                panic!("nginx exited with {status}: {}", self.log());
            }
            if netns
                .run(move || TcpStream::connect_timeout(&address, Duration::from_millis(200)))
                .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nginx does not listen on {HTTP}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `http://127.0.0.1:8080/NAME`.
    pub fn url(&self, name: &str) -> String {
        format!("http://{HTTP}/{name}")
    }

    /// `https://127.0.0.1:8443/NAME`.
    pub fn https_url(&self, name: &str) -> String {
        format!("https://{HTTPS}/{name}")
    }

    /// The test CA's certificate, for `[urls] ca_file`.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Serves `content` as `NAME` from now on: written whole, then renamed into place, with
    /// a modification time no earlier version had.
    pub fn publish(&mut self, name: &str, content: &str) {
        self.version += 1;
        let www = self.dir.join("www");
        let temporary = www.join(format!(".{name}.tmp"));
        std::fs::write(&temporary, content).expect("write the list");
        let file = std::fs::File::options()
            .write(true)
            .open(&temporary)
            .expect("open the list");
        file.set_modified(
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + self.version),
        )
        .expect("set the list's mtime");
        drop(file);
        std::fs::rename(&temporary, www.join(name)).expect("publish the list");
    }

    /// Stops nginx: every request fails from now on.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child. SIGTERM is nginx's fast shutdown, which takes
            // its worker along; SIGKILL would leave the worker serving.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The requests nginx served, as `(path, status)`, from its access log.
    pub fn requests(&self) -> Vec<(String, u16)> {
        std::fs::read_to_string(self.dir.join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let (path, status) = line.rsplit_once(' ')?;
                Some((path.to_owned(), status.parse().ok()?))
            })
            .collect()
    }

    pub fn log(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!("{}{}", read("nginx.out"), read("error.log"))
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CA (`ca.pem`) and a server certificate for 127.0.0.1 it signed (`server.pem`,
/// `server.key`), in `dir`.
fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl (cargo xtask setup installs it)");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=smtpguard test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(&ca);
    let mut request = vec!["req"];
    request.extend(ec);
    request.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    openssl(&request);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("extensions");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
}
