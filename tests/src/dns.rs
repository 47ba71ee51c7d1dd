//! A real DNS server for the resolver tests: dnsmasq (Debian's `dnsmasq-base`), listening on
//! the loopback of a test namespace, answering from a zone the test writes. Addresses come
//! from a hosts file with a 1 s TTL, so a test can change them and send SIGHUP; TXT and MX
//! records come from its configuration, so changing them restarts it ([`DnsServer::serve`]).

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::netns::{Netns, unique_tag};

/// Where the server listens inside its namespace.
pub const RESOLVER: &str = "127.0.0.1:5300";

/// The records the server answers with.
#[derive(Clone, Debug, Default)]
pub struct Zone {
    /// `(address, name)` pairs, as in /etc/hosts.
    pub addresses: Vec<(String, String)>,
    /// `(name, text)` TXT records.
    pub txt: Vec<(String, String)>,
    /// `(name, exchange)` MX records.
    pub mx: Vec<(String, String)>,
}

/// A running dnsmasq; killed on drop.
pub struct DnsServer {
    child: Option<Child>,
    dir: PathBuf,
    hosts: PathBuf,
}

impl DnsServer {
    /// Starts dnsmasq in `netns`, authoritative for `.test`, serving `zone`.
    pub fn start(netns: &Netns, zone: &Zone) -> Self {
        let dir = std::env::temp_dir().join(format!("sg-dns-{}", unique_tag()));
        std::fs::create_dir_all(&dir).expect("dns dir");
        let hosts = dir.join("hosts");
        let mut server = Self {
            child: None,
            dir,
            hosts,
        };
        server.serve(netns, zone);
        server
    }

    /// (Re)starts the server with `zone`: TXT and MX records change this way. The resolver
    /// is dead for the moment in between.
    pub fn serve(&mut self, netns: &Netns, zone: &Zone) {
        self.kill();
        self.set_addresses(&zone.addresses);
        let address: SocketAddr = RESOLVER.parse().expect("resolver address");
        let mut config = format!(
            "port={}\nlisten-address={}\nbind-interfaces\nno-resolv\nno-hosts\nlocal=/test/\nlocal-ttl=1\naddn-hosts={}\npid-file=\nuser=root\n",
            address.port(),
            address.ip(),
            self.hosts.display()
        );
        for (name, text) in &zone.txt {
            config.push_str(&format!("txt-record={name},\"{text}\"\n"));
        }
        for (name, exchange) in &zone.mx {
            config.push_str(&format!("mx-host={name},{exchange},10\n"));
        }
        let config_path = self.dir.join("dnsmasq.conf");
        std::fs::write(&config_path, config).expect("dnsmasq config");
        let log = std::fs::File::create(self.dir.join("dnsmasq.log")).expect("log");
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns.path()))
            .args(["dnsmasq", "--keep-in-foreground", "--log-facility=-"])
            .arg(format!("--conf-file={}", config_path.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn dnsmasq (install dnsmasq-base: cargo xtask setup)");
        self.child = Some(child);
        self.wait_until_listening(netns);
    }

    fn wait_until_listening(&mut self, netns: &Netns) {
        let address: SocketAddr = RESOLVER.parse().expect("resolver address");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten())
            {
                panic!("dnsmasq exited with {status}: {}", self.log());
            }
            let listening = netns.run(move || {
                std::net::UdpSocket::bind("127.0.0.1:0")
                    .and_then(|socket| {
                        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
                        // A minimal query for "test." SOA: any answer means it is up.
                        let query = [
                            0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 4, b't', b'e', b's', b't', 0,
                            0, 6, 0, 1,
                        ];
                        socket.send_to(&query, address)?;
                        let mut buffer = [0u8; 512];
                        socket.recv_from(&mut buffer).map(|_| ())
                    })
                    .is_ok()
            });
            if listening {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("dnsmasq did not answer on {RESOLVER}: {}", self.log());
    }

    /// Replaces the address records; dnsmasq re-reads them on SIGHUP.
    pub fn set_addresses(&self, addresses: &[(String, String)]) {
        let text: String = addresses
            .iter()
            .map(|(address, name)| format!("{address} {name}\n"))
            .collect();
        std::fs::write(&self.hosts, text).expect("hosts file");
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
        }
    }

    /// Stops the server: the resolver is dead from now on.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dnsmasq.log")).unwrap_or_default()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
