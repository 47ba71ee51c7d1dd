//! Network-namespace fixtures: two throwaway namespaces joined by a veth pair, a TCP listener
//! and client sockets inside them, and raw frame injection and capture with packet sockets.
//! Everything is created with unique names (`sg-{pid}-{n}`) and removed on drop.

use std::{
    fs::File,
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// A unique short tag for names: `{pid}-{n}`.
pub fn unique_tag() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `ip` with `args`, panicking with its output when it fails.
pub fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("cannot run ip {args:?}: {error} (install iproute2)"));
    assert!(
        output.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Whether the kernel shows an XDP program on `interface` here (`ip -d link` says so).
    pub fn has_xdp(&self, interface: &str) -> bool {
        let output = std::process::Command::new("ip")
            .args(["-n", &self.name, "-d", "link", "show", "dev", interface])
            .output()
            .expect("ip link show");
        String::from_utf8_lossy(&output.stdout).contains("prog/xdp")
    }

    pub fn new(name: String) -> Self {
        ip(&["netns", "add", &name]);
        let netns = Self { name };
        ip(&["-n", &netns.name, "link", "set", "lo", "up"]);
        netns
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets created there stay in it.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    enter(&path);
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Never panic here: this may run while a test is already panicking.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Moves the calling thread into the namespace at `path`.
fn enter(path: &str) {
    let file = File::open(path).unwrap_or_else(|error| panic!("open {path}: {error}"));
    // SAFETY: setns on a descriptor we own; affects only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
}

/// The server side of the test network: its addresses in each family.
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);
/// Subnets present on the link: the client may take any address in them.
const SUBNETS: [(&str, &str); 5] = [
    ("198.51.100.1/24", "198.51.100.0/24"),
    ("192.0.2.1/24", "192.0.2.0/24"),
    ("203.0.113.1/24", "203.0.113.0/24"),
    ("2001:db8:100::1/64", "2001:db8:100::/64"),
    ("2001:db8:200::1/64", "2001:db8:200::/64"),
];

/// Two namespaces, `server` and `client`, joined by a veth pair.
pub struct Pair {
    // Declared first so the veth goes with the namespaces, after anything using them.
    pub server: Netns,
    pub client: Netns,
    pub server_if: String,
    pub client_if: String,
    client_addrs: Vec<IpAddr>,
}

impl Pair {
    /// A fresh pair. The client gets each address in `client_addrs` (they must lie in the
    /// documentation subnets 198.51.100.0/24, 192.0.2.0/24, 203.0.113.0/24,
    /// 2001:db8:100::/64 or 2001:db8:200::/64).
    pub fn new(client_addrs: &[IpAddr]) -> Self {
        let tag = unique_tag();
        let server = Netns::new(format!("sg-{tag}-s"));
        let client = Netns::new(format!("sg-{tag}-c"));
        let short = tag.replace('-', "");
        let server_if = format!("sgs{}", &short[short.len().saturating_sub(11)..]);
        let client_if = format!("sgc{}", &short[short.len().saturating_sub(11)..]);
        let pair = Self {
            server,
            client,
            server_if,
            client_if,
            client_addrs: client_addrs.to_vec(),
        };
        pair.link();
        pair
    }

    /// Deletes the veth pair and makes it again, with the same names and addresses: as a
    /// driver reload, a PPP reconnect or a tunnel restart does to an interface (a new index,
    /// no XDP program on it).
    pub fn recreate_link(&self) {
        ip(&["-n", &self.server.name, "link", "del", &self.server_if]);
        self.link();
    }

    /// The veth pair between the namespaces, its addresses and routes.
    fn link(&self) {
        let (server, client, server_if, client_if, client_addrs) = (
            &self.server,
            &self.client,
            &self.server_if,
            &self.client_if,
            &self.client_addrs,
        );
        ip(&[
            "link",
            "add",
            server_if,
            "netns",
            &server.name,
            "type",
            "veth",
            "peer",
            "name",
            client_if,
            "netns",
            &client.name,
        ]);
        for (address, _) in SUBNETS {
            let mut args = vec!["-n", &server.name, "addr", "add", address, "dev", server_if];
            if address.contains(':') {
                args.push("nodad");
            }
            ip(&args);
        }
        for address in client_addrs {
            let prefix = if address.is_ipv4() { 24 } else { 64 };
            let address = format!("{address}/{prefix}");
            let mut args = vec![
                "-n",
                &client.name,
                "addr",
                "add",
                &address,
                "dev",
                client_if,
            ];
            if address.contains(':') {
                args.push("nodad");
            }
            ip(&args);
        }
        ip(&["-n", &server.name, "link", "set", server_if, "up"]);
        ip(&["-n", &client.name, "link", "set", client_if, "up"]);
        // The server end stands for a gateway NIC that leaves VLAN tags in the frame, where
        // the program can read them and send resets; `set_vlan_offload` turns stripping on.
        set_vlan_offload(server, server_if, false);
        // Every server address is on-link from the client, whatever the client's source.
        ip(&[
            "-n",
            &client.name,
            "route",
            "add",
            "default",
            "dev",
            client_if,
        ]);
        ip(&[
            "-n",
            &client.name,
            "-6",
            "route",
            "add",
            "default",
            "dev",
            client_if,
        ]);
    }

    /// Attaches a pass-everything XDP program (smtpguard's own, with no policy: it guards no
    /// port) to the client's end, in native mode. A veth delivers frames sent back with
    /// native-mode `XDP_TX` only to a peer that runs XDP itself; a physical NIC needs nothing
    /// of the kind. Detached when the returned filter is dropped.
    pub fn client_xdp_peer(&self) -> smtpguard::kernel::filter::Filter {
        let interface = self.client_if.clone();
        self.client.run(move || {
            let (mut filter, _maps) = smtpguard::kernel::filter::Filter::load(None)
                .unwrap_or_else(|error| panic!("loading the peer program: {error}"));
            filter
                .attach(&interface, smtpguard::source::config::XdpMode::Native)
                .unwrap_or_else(|error| panic!("attaching the peer program: {error}"));
            filter
        })
    }

    /// The MAC address of the server's end, for injected frames.
    pub fn server_mac(&self) -> [u8; 6] {
        let output = Command::new("ip")
            .args([
                "-n",
                &self.server.name,
                "-o",
                "link",
                "show",
                "dev",
                &self.server_if,
            ])
            .output()
            .expect("ip link show");
        let text = String::from_utf8_lossy(&output.stdout);
        let text = text
            .split("link/ether ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no MAC in {text:?}"));
        let mut mac = [0u8; 6];
        for (byte, part) in mac.iter_mut().zip(text.split(':')) {
            *byte = u8::from_str_radix(part, 16)
                .unwrap_or_else(|error| panic!("bad MAC {text:?}: {error}"));
        }
        mac
    }
}

/// Turns the receive-side VLAN tag stripping of `interface` (in `netns`) on or off, as
/// `ethtool -K IF rxvlan on|off rx-vlan-stag-hw-parse on|off` does.
pub fn set_vlan_offload(netns: &Netns, interface: &str, on: bool) {
    let state = if on { "on" } else { "off" };
    let output = Command::new("ip")
        .args(["netns", "exec", &netns.name, "ethtool", "-K", interface])
        .args(["rxvlan", state, "rx-vlan-stag-hw-parse", state])
        .output()
        .unwrap_or_else(|error| {
            panic!("cannot run ethtool: {error} (cargo xtask setup installs it)")
        });
    assert!(
        output.status.success(),
        "ethtool -K {interface} rxvlan {state} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// How a connection attempt ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Connected,
    TimedOut,
    Refused,
    Failed(String),
}

/// Connects from `src` to `dst` inside `netns`, waiting at most `timeout`.
pub fn connect(
    netns: &Netns,
    src: IpAddr,
    dst: SocketAddr,
    timeout: Duration,
) -> (Outcome, Option<TcpStream>) {
    netns.run(move || {
        let domain = if dst.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).expect("socket");
        socket
            .bind(&SocketAddr::new(src, 0).into())
            .unwrap_or_else(|error| panic!("bind {src}: {error}"));
        match socket.connect_timeout(&dst.into(), timeout) {
            Ok(()) => (Outcome::Connected, Some(socket.into())),
            Err(error)
                if error.kind() == io::ErrorKind::TimedOut
                    || error.kind() == io::ErrorKind::WouldBlock =>
            {
                (Outcome::TimedOut, None)
            }
            Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
                (Outcome::Refused, None)
            }
            Err(error) => (Outcome::Failed(error.to_string()), None),
        }
    })
}

/// A TCP server in a namespace: greets like an MTA, then echoes lines back.
pub struct Listener {
    pub port: u16,
    accepted: Arc<AtomicUsize>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// Listens on `[::]:port` (both families) inside `netns`.
    pub fn start(netns: &Netns, port: u16) -> Self {
        let listener = netns.run(move || {
            let socket =
                Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)).expect("socket");
            socket.set_only_v6(false).expect("dual stack");
            socket.set_reuse_address(true).expect("reuseaddr");
            socket
                .bind(&SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port).into())
                .unwrap_or_else(|error| panic!("bind :{port}: {error}"));
            socket.listen(128).expect("listen");
            socket.set_nonblocking(true).expect("nonblocking");
            TcpListener::from(socket)
        });
        let accepted = Arc::new(AtomicUsize::new(0));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (accepted, peers, stop) = (accepted.clone(), peers.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            peers
                                .lock()
                                .unwrap_or_else(|poison| poison.into_inner())
                                .push(peer);
                            std::thread::spawn(move || serve(stream));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        Self {
            port,
            accepted,
            peers,
            stop,
            thread: Some(thread),
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections accepted, once the count reaches `expected` or a second has passed (the
    /// client's connect returns before the server's accept runs).
    pub fn accepted_settled(&self, expected: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.accepted() < expected && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        // Give a surplus connection the same chance to show up.
        std::thread::sleep(Duration::from_millis(20));
        self.accepted()
    }

    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(mut stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    if stream.write_all(b"220 smtpguard-test ESMTP\r\n").is_err() {
        return;
    }
    let mut buffer = [0u8; 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buffer[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Reads the MTA greeting, then checks that `line` comes back: the connection carries data.
pub fn exchange(stream: &mut TcpStream, line: &str) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut greeting = [0u8; 26];
    stream.read_exact(&mut greeting)?;
    stream.write_all(line.as_bytes())?;
    let mut echoed = vec![0u8; line.len()];
    stream.read_exact(&mut echoed)?;
    if echoed != line.as_bytes() {
        return Err(io::Error::other(format!("echo mismatch: {echoed:?}")));
    }
    Ok(())
}

/// A raw packet socket on an interface: frames out as given, frames in as the stack saw them
/// (after XDP: a frame XDP dropped never reaches it).
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// Opens an `AF_PACKET` socket bound to `interface` inside `netns`.
    pub fn open(netns: &Netns, interface: &str) -> Self {
        let interface = interface.to_owned();
        let fd = netns.run(move || {
            let protocol = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket(2) call; the descriptor is owned below.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol)) };
            assert!(fd >= 0, "packet socket: {}", io::Error::last_os_error());
            // SAFETY: fd is a fresh descriptor we own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let name = std::ffi::CString::new(interface.clone()).expect("interface name");
            // SAFETY: valid NUL-terminated name.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert!(index != 0, "no interface {interface}");
            // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
            let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            address.sll_family = libc::AF_PACKET as u16;
            address.sll_protocol = protocol;
            address.sll_ifindex = index as i32;
            // SAFETY: address points to a sockaddr_ll of the given size.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const address).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(rc, 0, "bind packet socket: {}", io::Error::last_os_error());
            fd
        });
        Self { fd }
    }

    pub fn send(&self, frame: &[u8]) {
        // SAFETY: frame is a valid buffer of the given length.
        let sent =
            unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            sent,
            frame.len() as isize,
            "send frame: {}",
            io::Error::last_os_error()
        );
    }

    /// Sends `frame`; false where the kernel refused it (a full queue, a link that is down).
    pub fn try_send(&self, frame: &[u8]) -> bool {
        // SAFETY: frame is a valid buffer of the given length.
        let sent =
            unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        sent == frame.len() as isize
    }

    /// Frames received within `window`.
    pub fn receive_for(&self, window: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + window;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return frames;
            }
            let mut pollfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut pollfd, 1, left.as_millis().max(1) as i32) };
            if ready <= 0 {
                continue;
            }
            let mut buffer = vec![0u8; 65536];
            // SAFETY: buffer is writable for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                )
            };
            if n > 0 {
                buffer.truncate(n as usize);
                frames.push(buffer);
            }
        }
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Socket address helper.
pub fn sock(addr: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(addr.into(), port)
}

/// A TUN device (layer 3: packets start at the IP header) inside a namespace, with the file
/// descriptor that is its other end: what is written there arrives on the device as received
/// traffic, and what the namespace sends out of the device can be read back. The device goes
/// when this is dropped.
pub struct Tun {
    pub name: String,
    fd: OwnedFd,
}

impl Tun {
    /// Creates `name` in `netns` with `address` (CIDR), up, and the default routes of both
    /// families through it, so replies to any source leave through the device.
    pub fn create(netns: &Netns, name: &str, address: &str) -> Self {
        const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
        const IFF_TUN: libc::c_short = 0x0001;
        const IFF_NO_PI: libc::c_short = 0x1000;
        let owned = name.to_owned();
        let fd = netns.run(move || {
            let path = c"/dev/net/tun";
            // SAFETY: plain open(2) of a NUL-terminated path; the descriptor is owned below.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
            assert!(fd >= 0, "open /dev/net/tun: {}", io::Error::last_os_error());
            // SAFETY: a fresh descriptor nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // struct ifreq: the name, then the flags as a short.
            let mut request = [0u8; 40];
            request[..owned.len()].copy_from_slice(owned.as_bytes());
            request[16..18].copy_from_slice(&(IFF_TUN | IFF_NO_PI).to_ne_bytes());
            // SAFETY: `request` is a valid struct ifreq for TUNSETIFF, alive for the call.
            let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, request.as_mut_ptr()) };
            assert_eq!(rc, 0, "TUNSETIFF {owned}: {}", io::Error::last_os_error());
            fd
        });
        ip(&["-n", &netns.name, "addr", "add", address, "dev", name]);
        ip(&["-n", &netns.name, "link", "set", name, "up"]);
        ip(&["-n", &netns.name, "route", "add", "default", "dev", name]);
        ip(&[
            "-n",
            &netns.name,
            "-6",
            "route",
            "add",
            "default",
            "dev",
            name,
        ]);
        Self {
            name: name.to_owned(),
            fd,
        }
    }

    /// Hands `packet` to the device, as if it had arrived on it.
    pub fn send(&self, packet: &[u8]) {
        // SAFETY: `packet` is a valid buffer of the given length.
        let written =
            unsafe { libc::write(self.fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
        assert_eq!(
            written,
            packet.len() as isize,
            "write to the TUN device: {}",
            io::Error::last_os_error()
        );
    }

    /// Packets the namespace sent out of the device within `window`.
    pub fn receive_for(&self, window: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + window;
        let mut packets = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return packets;
            }
            let mut pollfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pollfd, 1, left.as_millis().max(1) as i32) } <= 0 {
                continue;
            }
            let mut buffer = vec![0u8; 65536];
            // SAFETY: `buffer` is writable for its length.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                )
            };
            if n > 0 {
                buffer.truncate(n as usize);
                packets.push(buffer);
            }
        }
    }
}
