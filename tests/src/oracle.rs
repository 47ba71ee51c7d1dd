//! The Linux kernel as the oracle: the same frames are injected three times into a server
//! namespace whose real TCP stack listens on the guarded ports (and on one that is not), with
//! SYN cookies answering every acceptable SYN statelessly, and what the kernel sends back is
//! the judge. Run (a) has no filter, run (b) the real daemon enforcing a drop policy, run (c)
//! the daemon rejecting with resets.
//!
//! - A SYN-ACK in (b) or (c) to a source the policy does not allow on that port is a
//!   **bypass**: the kernel accepted a new connection the policy forbids.
//! - A SYN the kernel answered in (a), from a source the policy allows, that gets no answer in
//!   (b) or (c) is **wrongly stopped** (unless the contract drops it on purpose as opaque:
//!   counted apart).
//! - Every RST the filter sends in (c) must be the one [`crate::reference`] describes for the
//!   frame it answers (etherparse decodes it; checksums, addresses, ports, acknowledgment,
//!   the server's own MAC); an RST for a frame that must get none (not for this host, from or
//!   to a non-unicast address, a SYN with FIN or RST, an allowed source) is a **bad RST**, and
//!   so is any RST the drop filter of (b) sends.
//!
//! Answers are matched to frames by addresses, ports and the acknowledged sequence number.
//! Kernel RSTs are told from the filter's by being in run (a) or (b) as well.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::{IpAddr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use etherparse::{EtherType, NetSlice, SlicedPacket, TransportSlice};
use smtpguard::policy::{Policy, Verdict};
use socket2::{Domain, Protocol, Socket, Type};

use crate::{
    daemon::Daemon,
    fuzz::{self, describe_link, describe_sight, hex},
    generate::{Generator, Target},
    netns::{Netns, SERVER_V4, SERVER_V6, ip, unique_tag},
    reference::{self, Expected, Iface, Sight},
};

/// The server's and the client's MACs: fixed, so the frames can be generated before the
/// namespaces of each run exist.
pub const SERVER_MAC: [u8; 6] = [0x02, 0x53, 0x47, 0x00, 0x00, 0x01];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x53, 0x47, 0x00, 0x00, 0x02];
/// The server's next hops: permanent neighbours at the client's MAC, so a reply to any source
/// leaves over the veth without a neighbour lookup.
const GATEWAY_V4: &str = "198.51.100.254";
const GATEWAY_V6: &str = "fe80::1";
/// Ports the server listens on: the guarded ones, and submission, which is not guarded.
pub const LISTEN_PORTS: [u16; 3] = [25, 2525, 587];
/// Examples kept of each finding.
const EXAMPLES: usize = 8;

/// Who the oracle's frames are for.
pub fn target() -> Target {
    Target {
        server_mac: SERVER_MAC,
        client_mac: CLIENT_MAC,
        v4: SERVER_V4,
        v6: SERVER_V6,
    }
}

/// What guards the server in a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guard {
    None,
    Drop,
    Reject,
}

impl Guard {
    pub const ALL: [Self; 3] = [Self::None, Self::Drop, Self::Reject];

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "a (no filter)",
            Self::Drop => "b (drop)",
            Self::Reject => "c (reject)",
        }
    }
}

/// A TCP segment the server sent back, as the client saw it.
#[derive(Clone, Debug)]
struct Answer {
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    frame: Vec<u8>,
}

/// The connection a SYN-ACK accepts: client address and port, server address and port, and
/// the client's initial sequence number.
type Accepted = (IpAddr, IpAddr, u16, u16, u32);

impl Answer {
    fn is_syn_ack(&self) -> bool {
        self.flags & 0x12 == 0x12 && self.flags & 0x04 == 0
    }

    fn is_rst(&self) -> bool {
        self.flags & 0x04 != 0
    }

    fn accepted(&self) -> Accepted {
        (
            self.dst,
            self.src,
            self.dport,
            self.sport,
            self.ack.wrapping_sub(1),
        )
    }

    /// What tells a kernel RST apart: the same in every run.
    fn rst_key(&self) -> (IpAddr, IpAddr, u16, u16, u32, u32) {
        (
            self.src, self.dst, self.sport, self.dport, self.seq, self.ack,
        )
    }
}

/// One run's raw results.
pub struct RunResult {
    pub guard: Guard,
    /// Frames the packet socket refused to send (shorter than an Ethernet header).
    pub refused: u64,
    /// Frames the capture socket had to drop: if any, the run is not to be trusted.
    pub capture_drops: u32,
    pub elapsed: Duration,
    answers: Vec<Answer>,
}

impl RunResult {
    fn syn_acks(&self) -> impl Iterator<Item = &Answer> {
        self.answers.iter().filter(|answer| answer.is_syn_ack())
    }

    fn rsts(&self) -> impl Iterator<Item = &Answer> {
        self.answers.iter().filter(|answer| answer.is_rst())
    }
}

/// A finding, with the frame it concerns.
#[derive(Clone, Debug)]
pub struct Finding {
    pub run: Guard,
    pub what: String,
    pub frame: Option<usize>,
    pub hex: String,
}

/// One count of findings, its kinds, and its first examples.
#[derive(Debug, Default)]
pub struct Findings {
    pub count: usize,
    pub kinds: BTreeMap<String, usize>,
    pub examples: Vec<Finding>,
}

impl Findings {
    fn add(&mut self, kind: String, finding: Finding) {
        self.count += 1;
        *self.kinds.entry(kind).or_default() += 1;
        if self.examples.len() < EXAMPLES {
            self.examples.push(finding);
        }
    }
}

/// What the oracle found.
pub struct Report {
    pub seed: u64,
    pub frames: usize,
    pub runs: Vec<RunSummary>,
    pub bypasses: Findings,
    pub wrongly_stopped: Findings,
    /// Allowed SYNs the kernel answers without a filter that the contract drops on purpose
    /// (opaque frames, decided before their source could be known).
    pub stopped_by_contract: Findings,
    pub bad_rsts: Findings,
    /// RSTs the filter sent in (c) that are right.
    pub good_rsts: usize,
}

/// One run in figures.
pub struct RunSummary {
    pub guard: Guard,
    pub refused: u64,
    pub capture_drops: u32,
    pub elapsed: Duration,
    pub syn_acks: usize,
    pub rsts: usize,
}

impl Report {
    /// Nothing got past the policy, nothing allowed was stopped, every reset was right, and
    /// the capture lost nothing.
    pub fn clean(&self) -> bool {
        self.bypasses.count == 0
            && self.wrongly_stopped.count == 0
            && self.bad_rsts.count == 0
            && self.runs.iter().all(|run| run.capture_drops == 0)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} frames, seed {:#x}", self.frames, self.seed)?;
        for run in &self.runs {
            writeln!(
                f,
                "  run {:<14} {:>7} SYN-ACKs, {:>6} RSTs, in {:.1} s ({} frames refused by the packet socket, {} lost by the capture)",
                run.guard.name(),
                run.syn_acks,
                run.rsts,
                run.elapsed.as_secs_f64(),
                run.refused,
                run.capture_drops
            )?;
        }
        writeln!(f, "  bypasses:        {}", self.bypasses.count)?;
        writeln!(f, "  wrongly stopped: {}", self.wrongly_stopped.count)?;
        writeln!(
            f,
            "  stopped by the contract (opaque, allowed source): {}",
            self.stopped_by_contract.count
        )?;
        writeln!(
            f,
            "  bad RSTs:        {} (right ones: {})",
            self.bad_rsts.count, self.good_rsts
        )?;
        for (title, findings) in [
            ("bypasses", &self.bypasses),
            ("wrongly stopped", &self.wrongly_stopped),
            ("bad RSTs", &self.bad_rsts),
            ("stopped by the contract", &self.stopped_by_contract),
        ] {
            if findings.count == 0 {
                continue;
            }
            writeln!(f, "{title} by kind:")?;
            for (kind, count) in &findings.kinds {
                writeln!(f, "  {count:>7}  {kind}")?;
            }
            writeln!(f, "first {title}:")?;
            for example in &findings.examples {
                let frame = example
                    .frame
                    .map_or_else(|| "answer".to_owned(), |index| format!("frame #{index}"));
                writeln!(
                    f,
                    "  run {}: {}\n    {frame}: {}",
                    example.run.name(),
                    example.what,
                    example.hex
                )?;
            }
        }
        Ok(())
    }
}

/// Generates `count` frames from `seed`, injects them in the three runs and judges.
pub fn run(seed: u64, count: usize) -> Report {
    let mut generator = Generator::new(seed, target());
    let frames: Vec<Vec<u8>> = (0..count).map(|_| generator.next_frame()).collect();
    let results: Vec<RunResult> = Guard::ALL
        .into_iter()
        .map(|guard| inject(&frames, guard))
        .collect();
    judge(seed, &frames, &results)
}

/// The daemon's configuration for a run on `interface`.
fn config(interface: &str, action: &str) -> String {
    format!(
        "xdp_mode = \"native\"\n{}",
        fuzz::policy_toml(interface, action)
    )
}

/// One run: fresh namespaces (no state left from another run: fragment queues, neighbours),
/// listeners, the guard, then the frames, with the capture drained all along.
pub fn inject(frames: &[Vec<u8>], guard: Guard) -> RunResult {
    let network = Network::new();
    let listeners = network.listen();
    let peer = network.client_xdp_peer();
    let daemon = match guard {
        Guard::None => None,
        Guard::Drop => Some(Daemon::start(
            &network.server,
            &config(&network.server_if, "drop"),
        )),
        Guard::Reject => Some(Daemon::start(
            &network.server,
            &config(&network.server_if, "reject"),
        )),
    };
    let capture = Capture::start(&network.client, &network.client_if);
    let sender = Sender::open(&network.client, &network.client_if);
    let started = Instant::now();
    let refused = frames.iter().filter(|frame| !sender.send(frame)).count() as u64;
    let (captured, capture_drops) = capture.finish(Duration::from_millis(300));
    let elapsed = started.elapsed();
    drop(daemon);
    drop(peer);
    drop(listeners);
    drop(network);
    RunResult {
        guard,
        refused,
        capture_drops,
        elapsed,
        answers: captured.iter().filter_map(|frame| answer(frame)).collect(),
    }
}

/// The TCP segment in a frame the server sent, behind any VLAN tags.
fn answer(frame: &[u8]) -> Option<Answer> {
    let l3 = crate::generate::l3_offset(frame);
    let ether_type = u16::from_be_bytes([*frame.get(l3 - 2)?, *frame.get(l3 - 1)?]);
    let packet = SlicedPacket::from_ether_type(EtherType(ether_type), frame.get(l3..)?).ok()?;
    let (src, dst) = match packet.net? {
        NetSlice::Ipv4(ip) => (
            IpAddr::from(ip.header().source()),
            IpAddr::from(ip.header().destination()),
        ),
        NetSlice::Ipv6(ip) => (
            IpAddr::from(ip.header().source()),
            IpAddr::from(ip.header().destination()),
        ),
        NetSlice::Arp(_) => return None,
    };
    let Some(TransportSlice::Tcp(tcp)) = packet.transport else {
        return None;
    };
    Some(Answer {
        src,
        dst,
        sport: tcp.source_port(),
        dport: tcp.destination_port(),
        seq: tcp.sequence_number(),
        ack: tcp.acknowledgment_number(),
        flags: tcp.slice()[13],
        frame: frame.to_vec(),
    })
}

/// Whether the policy lets a new connection from `src` to `port` through.
fn allowed(policy: &Policy, src: IpAddr, port: u16) -> bool {
    matches!(
        policy.verdict(src, port),
        Verdict::Allowed(..) | Verdict::NotGuarded
    )
}

/// The frames' TCP segments (innermost), by addresses and ports.
struct FrameIndex {
    segments: HashMap<(IpAddr, IpAddr, u16, u16), Vec<usize>>,
    seqs: Vec<Option<u32>>,
}

impl FrameIndex {
    fn new(frames: &[Vec<u8>]) -> Self {
        let mut segments: HashMap<_, Vec<usize>> = HashMap::new();
        let mut seqs = Vec::with_capacity(frames.len());
        for (index, frame) in frames.iter().enumerate() {
            if let Sight::Segment(segment) = reference::sight(frame) {
                segments
                    .entry((segment.src, segment.dst, segment.sport, segment.dport))
                    .or_default()
                    .push(index);
                seqs.push(Some(segment.seq));
            } else {
                seqs.push(None);
            }
        }
        Self { segments, seqs }
    }

    /// Frames carrying a segment from `client` to `server`.
    fn between(&self, client: (IpAddr, u16), server: (IpAddr, u16)) -> &[usize] {
        self.segments
            .get(&(client.0, server.0, client.1, server.1))
            .map_or(&[], Vec::as_slice)
    }

    /// The frame whose SYN a SYN-ACK accepts.
    fn accepted(&self, accepted: &Accepted) -> Option<usize> {
        let (client, server, cport, sport, isn) = *accepted;
        self.between((client, cport), (server, sport))
            .iter()
            .copied()
            .find(|&index| self.seqs[index] == Some(isn))
    }
}

/// Judges the three runs.
pub fn judge(seed: u64, frames: &[Vec<u8>], results: &[RunResult]) -> Report {
    let policies = [
        fuzz::policy(&fuzz::policy_toml("lo", "drop")),
        fuzz::policy(&fuzz::policy_toml("lo", "drop")),
        fuzz::policy(&fuzz::policy_toml("lo", "reject")),
    ];
    let iface = Iface {
        mac: SERVER_MAC,
        replies: true,
    };
    let index = FrameIndex::new(frames);
    let finding = |run: Guard, what: String, frame: Option<usize>, fallback: &[u8]| Finding {
        run,
        what,
        frame,
        hex: hex(frame.map_or(fallback, |index| &frames[index])),
    };
    let kind_of = |frame: Option<usize>, answer: &Answer| match frame {
        Some(index) => format!(
            "{} ({})",
            describe_sight(&reference::sight(&frames[index])),
            describe_link(&frames[index])
        ),
        None => format!(
            "answer to port {} over IPv{}, no single frame carries its SYN (fragments reassembled?)",
            answer.sport,
            if answer.src.is_ipv4() { 4 } else { 6 }
        ),
    };
    let mut report = Report {
        seed,
        frames: frames.len(),
        runs: results
            .iter()
            .map(|result| RunSummary {
                guard: result.guard,
                refused: result.refused,
                capture_drops: result.capture_drops,
                elapsed: result.elapsed,
                syn_acks: result.syn_acks().count(),
                rsts: result.rsts().count(),
            })
            .collect(),
        bypasses: Findings::default(),
        wrongly_stopped: Findings::default(),
        stopped_by_contract: Findings::default(),
        bad_rsts: Findings::default(),
        good_rsts: 0,
    };
    let unfiltered = &results[0];
    let accepted_unfiltered: HashMap<Accepted, &Answer> = unfiltered
        .syn_acks()
        .map(|answer| (answer.accepted(), answer))
        .collect();
    let kernel_rsts: HashSet<_> = results[..2]
        .iter()
        .flat_map(RunResult::rsts)
        .map(Answer::rst_key)
        .collect();
    for (result, policy) in results.iter().zip(&policies).skip(1) {
        let accepted: HashSet<Accepted> = result.syn_acks().map(Answer::accepted).collect();
        // Bypasses: the kernel accepted what the policy forbids.
        for answer in result.syn_acks() {
            if !allowed(policy, answer.dst, answer.sport) {
                let frame = index.accepted(&answer.accepted());
                let what = format!(
                    "SYN-ACK from {} port {} to {} (not allowed by the policy)",
                    answer.src, answer.sport, answer.dst
                );
                report.bypasses.add(
                    kind_of(frame, answer),
                    finding(result.guard, what, frame, &answer.frame),
                );
            }
        }
        // Wrongly stopped: allowed, answered without a filter, not with it.
        for (key, answer) in &accepted_unfiltered {
            if accepted.contains(key) || !allowed(policy, answer.dst, answer.sport) {
                continue;
            }
            let frame = index.accepted(key);
            let what = format!(
                "no SYN-ACK to {} port {} (allowed; the kernel answers without a filter)",
                answer.dst, answer.sport
            );
            let expected = frame.map(|index| reference::classify(&frames[index], policy, &iface));
            let findings = if expected.is_some_and(|expected| expected != Expected::Pass) {
                &mut report.stopped_by_contract
            } else {
                &mut report.wrongly_stopped
            };
            findings.add(
                kind_of(frame, answer),
                finding(result.guard, what, frame, &answer.frame),
            );
        }
        // RSTs the filter sent: only the right ones (under drop, only for a scope of its own
        // that rejects). What the kernel itself answers is left out: the run without a filter
        // has it, and a reject run the drop run's RSTs (judged there).
        for rst in result.rsts() {
            let kernel = match result.guard {
                Guard::Reject => kernel_rsts.contains(&rst.rst_key()),
                _ => unfiltered
                    .rsts()
                    .any(|kernel| kernel.rst_key() == rst.rst_key()),
            };
            if kernel {
                continue;
            }
            match judge_rst(rst, &index, frames, policy, &iface) {
                Ok(_) => report.good_rsts += 1,
                Err((frame, why)) => {
                    let kind = match frame {
                        Some(index) => format!(
                            "{}: {} ({})",
                            why.split(": ").next().unwrap_or_default(),
                            describe_sight(&reference::sight(&frames[index])),
                            describe_link(&frames[index])
                        ),
                        None => why.clone(),
                    };
                    report.bad_rsts.add(
                        kind,
                        finding(
                            result.guard,
                            format!("RST to {} port {}: {why}", rst.dst, rst.dport),
                            frame,
                            &rst.frame,
                        ),
                    );
                }
            }
        }
    }
    report
}

/// Whether a filter's RST is the one the reference expects for some frame it answers.
fn judge_rst(
    rst: &Answer,
    index: &FrameIndex,
    frames: &[Vec<u8>],
    policy: &Policy,
    iface: &Iface,
) -> Result<usize, (Option<usize>, String)> {
    let candidates = index.between((rst.dst, rst.dport), (rst.src, rst.sport));
    let mut first_problem = None;
    for &candidate in candidates {
        let problem = match reference::classify(&frames[candidate], policy, iface) {
            Expected::Reset(reply) => match reference::check_reply(&reply, &rst.frame) {
                Ok(()) => return Ok(candidate),
                Err(error) => format!("wrong RST: {error}"),
            },
            other => {
                let why = match reference::sight(&frames[candidate]) {
                    Sight::Segment(segment) if segment.is_syn() => {
                        reference::reply_or_why(&frames[candidate], &segment, iface)
                            .err()
                            .unwrap_or("the source is allowed")
                    }
                    _ => "no guarded SYN in sight",
                };
                format!(
                    "no RST may be sent ({why}): the reference says {} for the frame",
                    other.name()
                )
            }
        };
        first_problem.get_or_insert((Some(candidate), problem));
    }
    Err(first_problem.unwrap_or((None, "the RST answers no injected segment".to_owned())))
}

/// The server and client namespaces of one run, joined by a veth pair.
struct Network {
    server: Netns,
    client: Netns,
    server_if: String,
    client_if: String,
}

impl Network {
    fn new() -> Self {
        let tag = unique_tag();
        let server = Netns::new(format!("sg-{tag}-os"));
        let client = Netns::new(format!("sg-{tag}-oc"));
        server.run(|| {
            for (path, value) in [
                // Every acceptable SYN gets a SYN-ACK, whatever the backlog.
                ("ipv4/tcp_syncookies", "2"),
                ("ipv4/conf/all/rp_filter", "0"),
                ("ipv4/conf/default/rp_filter", "0"),
                ("ipv6/conf/all/accept_dad", "0"),
                ("ipv6/conf/default/accept_dad", "0"),
                // Room for every fragment queue a run leaves open.
                ("ipv4/ipfrag_high_thresh", "268435456"),
                ("ipv6/ip6frag_high_thresh", "268435456"),
            ] {
                let path = format!("/proc/sys/net/{path}");
                std::fs::write(&path, value)
                    .unwrap_or_else(|error| panic!("write {value} to {path}: {error}"));
            }
        });
        let short = tag.replace('-', "");
        let suffix = &short[short.len().saturating_sub(11)..];
        let server_if = format!("sgo{suffix}");
        let client_if = format!("sgp{suffix}");
        ip(&[
            "link",
            "add",
            &server_if,
            "address",
            &reference::mac(SERVER_MAC),
            "netns",
            &server.name,
            "type",
            "veth",
            "peer",
            "name",
            &client_if,
            "address",
            &reference::mac(CLIENT_MAC),
            "netns",
            &client.name,
        ]);
        let network = Self {
            server,
            client,
            server_if,
            client_if,
        };
        network.configure();
        network
    }

    fn configure(&self) {
        let (s, c) = (self.server.name.as_str(), self.client.name.as_str());
        let (sif, cif) = (self.server_if.as_str(), self.client_if.as_str());
        let client_mac = reference::mac(CLIENT_MAC);
        let v4 = format!("{SERVER_V4}/32");
        let v6 = format!("{SERVER_V6}/128");
        ip(&["-n", s, "addr", "add", &v4, "dev", sif]);
        ip(&["-n", s, "addr", "add", &v6, "dev", sif, "nodad"]);
        ip(&["-n", s, "link", "set", sif, "up"]);
        ip(&["-n", c, "link", "set", cif, "up"]);
        // Replies to any source go out over the veth to the client's MAC.
        ip(&[
            "-n", s, "route", "add", "default", "via", GATEWAY_V4, "dev", sif, "onlink",
        ]);
        ip(&[
            "-n",
            s,
            "neigh",
            "add",
            GATEWAY_V4,
            "lladdr",
            &client_mac,
            "dev",
            sif,
            "nud",
            "permanent",
        ]);
        ip(&[
            "-n", s, "-6", "route", "add", "default", "via", GATEWAY_V6, "dev", sif,
        ]);
        ip(&[
            "-n",
            s,
            "-6",
            "neigh",
            "add",
            GATEWAY_V6,
            "lladdr",
            &client_mac,
            "dev",
            sif,
            "nud",
            "permanent",
        ]);
        // A NIC that strips VLAN tags hides them from XDP, so the filter withholds resets
        // there; veth strips by default.
        let output = std::process::Command::new("ip")
            .args(["netns", "exec", s, "ethtool", "-K", sif])
            .args(["rxvlan", "off", "rx-vlan-stag-hw-parse", "off"])
            .output()
            .unwrap_or_else(|error| panic!("cannot run ethtool: {error} (install ethtool)"));
        assert!(
            output.status.success(),
            "ethtool -K {sif} rxvlan off rx-vlan-stag-hw-parse off failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Sockets listening on every port of [`LISTEN_PORTS`], both families; never accepted
    /// from (SYN cookies need no queue).
    fn listen(&self) -> Vec<Socket> {
        self.server.run(|| {
            LISTEN_PORTS
                .iter()
                .map(|&port| {
                    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))
                        .expect("socket");
                    socket.set_only_v6(false).expect("dual stack");
                    socket
                        .bind(&std::net::SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port).into())
                        .unwrap_or_else(|error| panic!("bind :{port}: {error}"));
                    socket.listen(4096).expect("listen");
                    socket
                })
                .collect()
        })
    }

    /// A pass-through XDP program on the client's end: a veth delivers frames sent back with
    /// native `XDP_TX` only to a peer that runs XDP itself.
    fn client_xdp_peer(&self) -> smtpguard::kernel::filter::Filter {
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
}

/// An `AF_PACKET` socket bound to `interface` in `netns`, receiving `protocol` (0: nothing).
fn packet_socket(netns: &Netns, interface: &str, protocol: u16) -> OwnedFd {
    let interface = interface.to_owned();
    netns.run(move || {
        let protocol = protocol.to_be();
        // SAFETY: plain socket(2) call; the descriptor is owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol)) };
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
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
        assert_eq!(
            rc,
            0,
            "bind packet socket: {}",
            std::io::Error::last_os_error()
        );
        fd
    })
}

fn set_option(fd: &OwnedFd, level: i32, name: i32, value: i32) {
    // SAFETY: value is a valid int for the option's length.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt {level}/{name}: {}",
        std::io::Error::last_os_error()
    );
}

/// Sends frames as they are; receives nothing.
struct Sender {
    fd: OwnedFd,
}

impl Sender {
    fn open(netns: &Netns, interface: &str) -> Self {
        Self {
            fd: packet_socket(netns, interface, 0),
        }
    }

    /// Sends `frame`; false where the kernel refused it (shorter than an Ethernet header).
    fn send(&self, frame: &[u8]) -> bool {
        // SAFETY: frame is a valid buffer of the given length.
        let sent =
            unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        sent == frame.len() as isize
    }
}

const SOL_PACKET: i32 = 263;
const PACKET_STATISTICS: i32 = 6;
const PACKET_IGNORE_OUTGOING: i32 = 23;
const SO_RCVBUFFORCE: i32 = 33;
const PACKET_AUXDATA: i32 = 8;
const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
const TP_STATUS_VLAN_TPID_VALID: u32 = 1 << 6;

/// Everything the server sends over the veth, as the client's end receives it, read by a
/// thread of its own while the frames go out.
struct Capture {
    stop: Arc<AtomicBool>,
    /// Milliseconds since `started` at which the last frame came in.
    last: Arc<AtomicU64>,
    started: Instant,
    thread: Option<JoinHandle<(Vec<Vec<u8>>, u32)>>,
}

impl Capture {
    fn start(netns: &Netns, interface: &str) -> Self {
        let fd = packet_socket(netns, interface, libc::ETH_P_ALL as u16);
        // The frames the client sends are not answers.
        set_option(&fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, 1);
        set_option(&fd, libc::SOL_SOCKET, SO_RCVBUFFORCE, 256 << 20);
        // The stack takes a VLAN tag off before packet sockets see a frame: the tag comes
        // back as auxiliary data.
        set_option(&fd, SOL_PACKET, PACKET_AUXDATA, 1);
        let stop = Arc::new(AtomicBool::new(false));
        let last = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let thread = {
            let (stop, last) = (stop.clone(), last.clone());
            std::thread::spawn(move || drain(&fd, &stop, &last, started))
        };
        Self {
            stop,
            last,
            started,
            thread: Some(thread),
        }
    }

    /// Waits until nothing came in for `quiet` (at most 10 s), then returns the frames and
    /// how many the socket had to drop.
    fn finish(mut self, quiet: Duration) -> (Vec<Vec<u8>>, u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
            if self.started.elapsed().saturating_sub(last) >= quiet || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|thread| thread.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn drain(
    fd: &OwnedFd,
    stop: &AtomicBool,
    last: &AtomicU64,
    started: Instant,
) -> (Vec<Vec<u8>>, u32) {
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let mut previous: Vec<u8> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let mut pollfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pollfd, 1, 20) } <= 0 {
            continue;
        }
        while let Some(frame) = receive(fd) {
            last.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            // A frame behind several tags whose outer ones have VID 0 goes round the stack
            // once per tag, and packet sockets see it each time, one tag shorter: the same
            // frame, seen again.
            let again = previous.len() == frame.len() + 4
                && previous[..12] == frame[..12]
                && previous[16..] == frame[12..];
            previous.clone_from(&frame);
            if !again {
                frames.push(frame);
            }
        }
    }
    let mut stats = [0u32; 2];
    let mut len = std::mem::size_of_val(&stats) as u32;
    // SAFETY: stats is a tpacket_stats (two u32) of the given length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            SOL_PACKET,
            PACKET_STATISTICS,
            stats.as_mut_ptr().cast(),
            &mut len,
        )
    };
    (frames, if rc == 0 { stats[1] } else { u32::MAX })
}

/// One frame from the socket, without waiting, with the VLAN tag the stack took off put back.
fn receive(fd: &OwnedFd) -> Option<Vec<u8>> {
    let mut buffer = vec![0u8; 65536];
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid start.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &raw mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: message points to a valid buffer and control area for the call.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &raw mut message, libc::MSG_DONTWAIT) };
    if n <= 0 {
        return None;
    }
    buffer.truncate(n as usize);
    // SAFETY: the control area was filled by recvmsg; the macros walk it within its length.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const message) };
    while !cmsg.is_null() {
        // SAFETY: cmsg points to a header inside the control area.
        let header = unsafe { &*cmsg };
        if header.cmsg_level == SOL_PACKET && header.cmsg_type == PACKET_AUXDATA {
            // tpacket_auxdata: status, len, snaplen (u32), mac, net, vlan_tci, vlan_tpid (u16).
            let mut aux = [0u8; 20];
            // SAFETY: the data of a PACKET_AUXDATA message is a 20-byte tpacket_auxdata.
            unsafe { std::ptr::copy_nonoverlapping(libc::CMSG_DATA(cmsg), aux.as_mut_ptr(), 20) };
            let status = u32::from_ne_bytes([aux[0], aux[1], aux[2], aux[3]]);
            let tci = u16::from_ne_bytes([aux[16], aux[17]]);
            let tpid = if status & TP_STATUS_VLAN_TPID_VALID != 0 {
                u16::from_ne_bytes([aux[18], aux[19]])
            } else {
                0x8100
            };
            if status & TP_STATUS_VLAN_VALID != 0 && buffer.len() >= 12 {
                let tag = [tpid.to_be_bytes(), tci.to_be_bytes()].concat();
                buffer.splice(12..12, tag);
            }
        }
        // SAFETY: as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&raw const message, cmsg) };
    }
    Some(buffer)
}
