//! The reference: what a correct filter decides for a frame, written from the contract the
//! XDP program implements and from what the Linux kernel accepts, not from the program's own
//! limits. Headers are decoded with etherparse (a well-kept packet parser) wherever it has a
//! decoder; GRE, PPPoE and MPLS, which it lacks, are read by hand here.
//!
//! The contract, in short:
//! - Ethernet: up to 16 VLAN tags (0x8100, 0x88a8, 0x9100, any VID), more is *opaque*; PPPoE
//!   session frames carrying PPP IPv4/IPv6, and MPLS (up to 8 labels, then IP by its first
//!   nibble) are followed to the IP header inside.
//! - IPv4: version 4, IHL >= 5, total length >= header, else *malformed*; later fragments
//!   pass; protocol 6 is TCP, 4 and 41 inner IPv4/IPv6, 47 GRE.
//! - IPv6: up to 16 extension headers (hop-by-hop, routing, destination options, AH,
//!   fragment), a longer chain or one past 4096 bytes is opaque; a fragment header with a
//!   non-zero offset makes a later fragment, one with M set a first fragment; an extension
//!   header the frame cuts off is opaque where the payload length says more (or the packet is
//!   a first fragment), else malformed.
//! - GRE version 0: routing bit malformed; checksum, key, sequence add 4 bytes each; IPv4,
//!   IPv6 and Ethernet (0x6558) followed, anything else opaque. Version 1 (PPTP) with PPP
//!   followed after 8 (+4 with S, +4 with A) bytes; other version 1 opaque; 2 and up malformed.
//! - At most 5 layers (each Ethernet and each IP header counts one): more is opaque. A
//!   tunnelled header the frame cuts off is opaque.
//! - TCP: 14 bytes in sight make a segment (a non-fragment whose IP-declared TCP length is
//!   under 20 is malformed); bytes the IP header promises but the frame lacks make it
//!   *hidden* (port unknown); a first fragment with fewer than 14 TCP bytes is hidden, with
//!   its port when 4 bytes are there.
//! - Verdict: a segment with SYN set and ACK clear to a guarded port, or a hidden packet whose
//!   port is guarded or unknown, is decided by its innermost source (allow passes, deny and
//!   unlisted drop or reset); opaque is dropped; everything else (malformed included: the
//!   kernel drops it) passes.
//! - Reset: only for an untunnelled, unfragmented segment without FIN or RST, between unicast
//!   addresses, sent to the interface's own MAC from a unicast MAC, on an interface that
//!   allows replies, whose data offset is at least 20 and within the IP length; otherwise the
//!   SYN is dropped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{
    EtherType, Ethernet2HeaderSlice, IpAuthHeaderSlice, Ipv4HeaderSlice, Ipv6FragmentHeaderSlice,
    Ipv6HeaderSlice, Ipv6RawExtHeaderSlice, NetSlice, SingleVlanHeaderSlice, SlicedPacket,
    TcpHeaderSlice, TransportSlice,
};
use smtpguard::{
    policy::{Policy, Verdict},
    source::config::{Action, Mode},
};

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ETH_P_QINQ: u16 = 0x9100;
const ETH_P_PPPOE_SESSION: u16 = 0x8864;
const ETH_P_MPLS_UC: u16 = 0x8847;
const ETH_P_MPLS_MC: u16 = 0x8848;
const ETH_P_TEB: u16 = 0x6558;
const ETH_P_PPP_GRE: u16 = 0x880b;
const PPP_IPV4: u16 = 0x0021;
const PPP_IPV6: u16 = 0x0057;
const IPIP: u8 = 4;
const TCP: u8 = 6;
const IPV6_IN_IP: u8 = 41;
const GRE: u8 = 47;
const HOPOPTS: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const AH: u8 = 51;
const DSTOPTS: u8 = 60;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// VLAN tags followed; one more is opaque.
pub const MAX_VLAN_TAGS: usize = 16;
/// MPLS labels followed; a stack without its bottom within them is opaque.
pub const MAX_MPLS_LABELS: usize = 8;
/// IPv6 extension headers followed; one more is opaque.
pub const MAX_EXT_HEADERS: usize = 16;
/// No header is followed past this offset in the frame.
pub const MAX_HEADER_OFFSET: usize = 4096;
/// Ethernet and IP headers, tunnelled ones included, followed; one more is opaque.
pub const MAX_LAYERS: u8 = 5;

/// The interface a frame came in on, as the program knows it from `SG_IFACES`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Iface {
    pub mac: [u8; 6],
    /// The interface allows replies (the daemon's `REPLIES` flag).
    pub replies: bool,
}

/// What a correct filter does with a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expected {
    Pass,
    Drop,
    /// Answered with this RST (`XDP_TX`).
    Reset(Reply),
}

impl Expected {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Drop => "DROP",
            Self::Reset(_) => "RESET",
        }
    }
}

/// The RST a reset must send: the SYN's link header turned around, its addresses and ports
/// swapped, acknowledging the SYN and its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    /// The SYN's VLAN tags (TPID, TCI), outermost first: a reply keeps them.
    pub tags: Vec<(u16, u16)>,
    pub ether_type: u16,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub ack: u32,
}

/// What a frame is under the contract.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sight {
    /// Nothing the filter guards: another ethertype or protocol.
    Other,
    /// A non-first fragment: the first one carries the decision.
    LaterFragment,
    /// Inconsistent in a way the kernel drops: passed.
    Malformed(&'static str),
    /// Beyond what the filter follows, yet perhaps acceptable to the kernel: dropped.
    Opaque(&'static str),
    /// A TCP header in sight.
    Segment(Segment),
    /// Possibly a SYN, with its flags (and perhaps its port) out of sight.
    Hidden {
        src: IpAddr,
        dst: IpAddr,
        dport: Option<u16>,
    },
}

/// A TCP header in sight, and what a reply to it needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub flags: u8,
    /// The data offset, in bytes.
    pub data_offset: usize,
    /// Bytes from the TCP header to the end of the IP packet, as the IP header says.
    pub l4_len: usize,
    /// Where the TCP header starts in the frame.
    pub l4: usize,
    pub first_fragment: bool,
    /// The IP header comes right after the outer Ethernet header and its tags: no tunnel,
    /// PPPoE or MPLS in front of it.
    pub outermost: bool,
    /// For IPv4, whether the header checksum verifies (always true for IPv6).
    pub ipv4_checksum_ok: bool,
}

impl Segment {
    /// A new connection: SYN set, ACK clear.
    pub fn is_syn(&self) -> bool {
        self.flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

/// The decision for `frame` under `policy`, arriving on `iface`.
pub fn classify(frame: &[u8], policy: &Policy, iface: &Iface) -> Expected {
    match sight(frame) {
        Sight::Other | Sight::LaterFragment | Sight::Malformed(_) => Expected::Pass,
        // Its destination is out of sight too: dropped unless no scope enforces anything.
        Sight::Opaque(_) if audit_only(policy) => Expected::Pass,
        Sight::Opaque(_) => Expected::Drop,
        Sight::Hidden { src, dst, dport } => decide(policy, src, dst, dport, None),
        Sight::Segment(segment) if segment.is_syn() => {
            let reply = reply(frame, &segment, iface);
            decide(policy, segment.src, segment.dst, Some(segment.dport), reply)
        }
        Sight::Segment(_) => Expected::Pass,
    }
}

/// Whether no guarded scope of `policy` enforces anything (all audit).
fn audit_only(policy: &Policy) -> bool {
    policy
        .scopes
        .iter()
        .filter(|scope| scope.guarded)
        .all(|scope| scope.mode == Mode::Audit)
}

/// Decides a possible SYN from `src` to `dst`, port `port` (unknown: treated as guarded), in
/// the scope the destination picks.
fn decide(
    policy: &Policy,
    src: IpAddr,
    dst: IpAddr,
    port: Option<u16>,
    reply: Option<Reply>,
) -> Expected {
    let (_, scope) = policy.scope_for(Some(dst));
    if !scope.guarded {
        return Expected::Pass;
    }
    if let Some(port) = port
        && !scope.ports.contains(&port)
    {
        return Expected::Pass;
    }
    let Some(&guarded) = scope.ports.iter().next() else {
        return Expected::Pass;
    };
    let action = match policy.verdict_to(src, Some(dst), guarded) {
        Verdict::Allowed(..) | Verdict::NotGuarded => return Expected::Pass,
        Verdict::Denied(_, entry) => entry.action.unwrap_or(scope.unlisted_action),
        Verdict::Unlisted => scope.unlisted_action,
    };
    match (scope.mode, action, reply) {
        (Mode::Audit, ..) => Expected::Pass,
        (_, Action::Reject, Some(reply)) => Expected::Reset(reply),
        _ => Expected::Drop,
    }
}

/// The RST a reset of `segment` must send, or `None` where no reset may be sent.
pub fn reply(frame: &[u8], segment: &Segment, iface: &Iface) -> Option<Reply> {
    reply_or_why(frame, segment, iface).ok()
}

/// The RST a reset of `segment` must send, or why no reset may be sent.
pub fn reply_or_why(frame: &[u8], segment: &Segment, iface: &Iface) -> Result<Reply, &'static str> {
    let link = outer_link(frame).ok_or("no outer link header")?;
    let checks = [
        (segment.outermost, "tunnelled or behind PPPoE/MPLS"),
        (!segment.first_fragment, "a first fragment"),
        (
            segment.flags & (TCP_FIN | TCP_RST) == 0,
            "a SYN with FIN or RST",
        ),
        (unicast_ip(segment.src), "from a non-unicast address"),
        // What the kernel drops unanswered gets no reset either.
        (
            segment.l4 + segment.l4_len <= frame.len(),
            "IP packet longer than the frame",
        ),
        (segment.ipv4_checksum_ok, "IPv4 header checksum bad"),
        (unicast_ip(segment.dst), "to a non-unicast address"),
        (link.dst == iface.mac, "not to the interface's MAC"),
        (link.src[0] & 1 == 0, "from a non-unicast MAC"),
        (iface.replies, "the interface allows no replies"),
        (segment.data_offset >= 20, "data offset under 20"),
        (
            segment.data_offset <= segment.l4_len,
            "data offset past the IP length",
        ),
        // A jumbogram's length is out of the filter's sight.
        (segment.l4_len <= 0xffff, "a jumbogram"),
        // The reply is written over the SYN: its 20-byte TCP header must be in the frame.
        (
            segment.l4 + 20 <= frame.len(),
            "TCP header cut off by the frame",
        ),
    ];
    if let Some((_, why)) = checks.iter().find(|(ok, _)| !ok) {
        return Err(why);
    }
    Ok(Reply {
        eth_dst: link.src,
        eth_src: iface.mac,
        tags: link.tags,
        ether_type: link.ether_type,
        src: segment.dst,
        dst: segment.src,
        sport: segment.dport,
        dport: segment.sport,
        ack: segment
            .seq
            .wrapping_add(1 + (segment.l4_len - segment.data_offset) as u32),
    })
}

/// A unicast address of a real host: not unspecified, loopback, multicast, broadcast or
/// reserved (IPv4 0/8, 127/8, 224/4, 240/4; IPv6 ::, ::1, ff00::/8, ::ffff:0:0/96).
pub fn unicast_ip(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(addr) => {
            let first = addr.octets()[0];
            first != 0 && first != 127 && first < 224
        }
        IpAddr::V6(addr) => {
            addr != Ipv6Addr::UNSPECIFIED
                && addr != Ipv6Addr::LOCALHOST
                && addr.octets()[0] != 0xff
                && addr.to_ipv4_mapped().is_none()
        }
    }
}

/// The outer Ethernet header and its VLAN tags.
struct Link {
    dst: [u8; 6],
    src: [u8; 6],
    tags: Vec<(u16, u16)>,
    ether_type: u16,
}

fn outer_link(frame: &[u8]) -> Option<Link> {
    let ethernet = Ethernet2HeaderSlice::from_slice(frame).ok()?;
    let mut ether_type = ethernet.ether_type().0;
    let mut offset = ethernet.slice().len();
    let mut tags = Vec::new();
    while is_vlan(ether_type) {
        let vlan = SingleVlanHeaderSlice::from_slice(frame.get(offset..)?).ok()?;
        let tci = u16::from_be_bytes([frame[offset], frame[offset + 1]]);
        tags.push((ether_type, tci));
        ether_type = vlan.ether_type().0;
        offset += vlan.slice().len();
    }
    Some(Link {
        dst: ethernet.destination(),
        src: ethernet.source(),
        tags,
        ether_type,
    })
}

fn is_vlan(ether_type: u16) -> bool {
    matches!(ether_type, ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ)
}

/// How deep a header sits.
#[derive(Clone, Copy, Debug)]
struct Depth {
    /// Ethernet and IP headers already entered.
    layers: u8,
    /// Inside an IP tunnel: a header cut off here is opaque, not malformed.
    tunnelled: bool,
    /// Behind a tunnel, PPPoE or MPLS: a reply is out of the question.
    encapsulated: bool,
}

impl Depth {
    const OUTER: Self = Self {
        layers: 0,
        tunnelled: false,
        encapsulated: false,
    };

    /// One more layer, if the filter follows that many.
    fn enter(self) -> Option<Self> {
        (self.layers < MAX_LAYERS).then_some(Self {
            layers: self.layers + 1,
            ..self
        })
    }

    fn tunnel(self) -> Self {
        Self {
            tunnelled: true,
            encapsulated: true,
            ..self
        }
    }

    fn encapsulate(self) -> Self {
        Self {
            encapsulated: true,
            ..self
        }
    }

    /// A header the frame cuts off.
    fn cut(self, what: &'static str) -> Sight {
        if self.tunnelled {
            Sight::Opaque(what)
        } else {
            Sight::Malformed(what)
        }
    }
}

/// What `frame` is under the contract.
pub fn sight(frame: &[u8]) -> Sight {
    ethernet(frame, 0, Depth::OUTER)
}

fn ethernet(frame: &[u8], at: usize, depth: Depth) -> Sight {
    let Some(depth) = depth.enter() else {
        return Sight::Opaque("more than 5 layers");
    };
    let rest = frame.get(at..).unwrap_or_default();
    let Ok(ethernet) = Ethernet2HeaderSlice::from_slice(rest) else {
        return depth.cut("Ethernet header cut off");
    };
    let mut ether_type = ethernet.ether_type().0;
    let mut offset = at + ethernet.slice().len();
    let mut tags = 0;
    while is_vlan(ether_type) {
        if tags == MAX_VLAN_TAGS {
            return Sight::Opaque("more than 16 VLAN tags");
        }
        let Ok(vlan) = SingleVlanHeaderSlice::from_slice(frame.get(offset..).unwrap_or_default())
        else {
            return depth.cut("VLAN tag cut off");
        };
        ether_type = vlan.ether_type().0;
        offset += vlan.slice().len();
        tags += 1;
    }
    link_payload(frame, offset, ether_type, depth)
}

/// What follows an Ethernet header of type `ether_type` at `at`.
fn link_payload(frame: &[u8], at: usize, ether_type: u16, depth: Depth) -> Sight {
    match ether_type {
        ETH_P_IPV4 => ipv4(frame, at, depth),
        ETH_P_IPV6 => ipv6(frame, at, depth),
        ETH_P_PPPOE_SESSION => {
            // Version/type, code, session id, length, then PPP's protocol field.
            let Some(protocol) = be16(frame, at + 6) else {
                return depth.cut("PPPoE header cut off");
            };
            ppp(frame, at + 8, protocol, depth.encapsulate())
        }
        ETH_P_MPLS_UC | ETH_P_MPLS_MC => mpls(frame, at, depth.encapsulate()),
        _ => Sight::Other,
    }
}

fn ppp(frame: &[u8], at: usize, protocol: u16, depth: Depth) -> Sight {
    match protocol {
        PPP_IPV4 => ipv4(frame, at, depth),
        PPP_IPV6 => ipv6(frame, at, depth),
        _ => Sight::Other,
    }
}

fn mpls(frame: &[u8], mut at: usize, depth: Depth) -> Sight {
    for _ in 0..MAX_MPLS_LABELS {
        let Some(entry) = frame.get(at..at + 4) else {
            return depth.cut("MPLS label cut off");
        };
        at += 4;
        if entry[2] & 1 != 0 {
            return match frame.get(at).map(|byte| byte >> 4) {
                Some(4) => ipv4(frame, at, depth),
                Some(6) => ipv6(frame, at, depth),
                Some(_) => Sight::Other,
                None => depth.cut("MPLS payload cut off"),
            };
        }
    }
    Sight::Opaque("more than 8 MPLS labels")
}

fn ipv4(frame: &[u8], at: usize, depth: Depth) -> Sight {
    let Some(depth) = depth.enter() else {
        return Sight::Opaque("more than 5 layers");
    };
    let packet = frame.get(at..).unwrap_or_default();
    if packet.len() < 20 {
        return depth.cut("IPv4 header cut off");
    }
    let fields = match Ipv4HeaderSlice::from_slice(packet) {
        Ok(header) => Ipv4Fields {
            src: header.source_addr(),
            dst: header.destination_addr(),
            ihl: usize::from(header.ihl()) * 4,
            total: usize::from(header.total_len()),
            protocol: header.protocol().0,
            offset: header.fragments_offset().value(),
            more: header.more_fragments(),
        },
        // The fixed 20 bytes are there but the options run past the frame: etherparse
        // refuses, and the fields the contract needs are in the fixed part.
        Err(etherparse::err::ipv4::HeaderSliceError::Len(_)) => {
            let Some(fields) = Ipv4Fields::read(packet) else {
                return Sight::Malformed("bad IPv4 version or header length");
            };
            fields
        }
        Err(_) => return Sight::Malformed("bad IPv4 version, header or total length"),
    };
    if fields.total < fields.ihl {
        return Sight::Malformed("IPv4 total length under the header length");
    }
    if fields.offset != 0 {
        return Sight::LaterFragment;
    }
    let next = at + fields.ihl;
    let (src, dst) = (IpAddr::V4(fields.src), IpAddr::V4(fields.dst));
    // What the kernel keeps of a first fragment: its payload rounded down to a multiple of 8
    // (ip_frag_queue); the next fragment brings, or overwrites, the rest.
    let inner = kept_frame(frame, next, fields.total - fields.ihl, fields.more);
    match fields.protocol {
        TCP => tcp(
            frame,
            next,
            fields.total - fields.ihl,
            fields.more,
            (src, dst),
            ipv4_checksum_ok(packet, fields.ihl),
            depth,
        ),
        IPIP => ipv4(inner, next, depth.tunnel()),
        IPV6_IN_IP => ipv6(inner, next, depth.tunnel()),
        GRE => gre(inner, next, depth.tunnel()),
        _ => Sight::Other,
    }
}

/// Whether the IPv4 header (`ihl` bytes, options included) sums to 0xffff, as
/// `ip_rcv_core` demands; a header cut off by the frame does not verify.
fn ipv4_checksum_ok(packet: &[u8], ihl: usize) -> bool {
    let Some(header) = packet.get(..ihl) else {
        return false;
    };
    let mut sum: u32 = header
        .chunks(2)
        .map(|word| u32::from(u16::from_be_bytes([word[0], word[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

/// What the contract reads from an IPv4 header.
struct Ipv4Fields {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ihl: usize,
    total: usize,
    protocol: u8,
    offset: u16,
    more: bool,
}

impl Ipv4Fields {
    /// The fields of the fixed 20 bytes, where the version and header length are valid.
    fn read(packet: &[u8]) -> Option<Self> {
        let ihl = usize::from(packet[0] & 15) * 4;
        if packet[0] >> 4 != 4 || ihl < 20 {
            return None;
        }
        let word = |at: usize| u16::from_be_bytes([packet[at], packet[at + 1]]);
        Some(Self {
            src: Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]),
            dst: Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]),
            ihl,
            total: usize::from(word(2)),
            protocol: packet[9],
            offset: word(6) & 0x1fff,
            more: word(6) & 0x2000 != 0,
        })
    }
}

fn ipv6(frame: &[u8], at: usize, depth: Depth) -> Sight {
    let Some(depth) = depth.enter() else {
        return Sight::Opaque("more than 5 layers");
    };
    let packet = frame.get(at..).unwrap_or_default();
    if packet.len() < 40 {
        return depth.cut("IPv6 header cut off");
    }
    let Ok(header) = Ipv6HeaderSlice::from_slice(packet) else {
        return Sight::Malformed("IPv6 version is not 6");
    };
    let addresses = (
        IpAddr::V6(Ipv6Addr::from(header.source())),
        IpAddr::V6(Ipv6Addr::from(header.destination())),
    );
    let mut cursor = at + 40;
    // A zero payload length is how jumbograms say "see the hop-by-hop option": the frame's
    // own length is then the only bound.
    let payload_end = match header.payload_length() {
        0 => usize::MAX,
        length => cursor + usize::from(length),
    };
    let mut next = header.next_header().0;
    let mut first_fragment = false;
    let mut followed = 0;
    loop {
        match next {
            TCP => {
                return tcp(
                    frame,
                    cursor,
                    payload_end.saturating_sub(cursor),
                    first_fragment,
                    addresses,
                    true,
                    depth,
                );
            }
            IPIP | IPV6_IN_IP | GRE => {
                let inner = kept_frame(
                    frame,
                    cursor,
                    payload_end.saturating_sub(cursor),
                    first_fragment,
                );
                return match next {
                    IPIP => ipv4(inner, cursor, depth.tunnel()),
                    IPV6_IN_IP => ipv6(inner, cursor, depth.tunnel()),
                    _ => gre(inner, cursor, depth.tunnel()),
                };
            }
            HOPOPTS | ROUTING | DSTOPTS | AH | FRAGMENT => {}
            _ => return Sight::Other,
        }
        if followed == MAX_EXT_HEADERS {
            return Sight::Opaque("more than 16 IPv6 extension headers");
        }
        followed += 1;
        let rest = frame.get(cursor..).unwrap_or_default();
        let Some(header) = extension(next, rest) else {
            return if depth.tunnelled || payload_end > frame.len() || first_fragment {
                Sight::Opaque("IPv6 extension header cut off")
            } else {
                Sight::Malformed("IPv6 extension header past the payload")
            };
        };
        match header.fragment {
            Some((0, more)) => first_fragment |= more,
            Some(_) => return Sight::LaterFragment,
            None => {}
        }
        next = header.next;
        cursor += header.len;
        if cursor > MAX_HEADER_OFFSET {
            return Sight::Opaque("IPv6 extension headers past 4096 bytes");
        }
    }
}

/// One IPv6 extension header, as etherparse reads it.
struct Extension {
    next: u8,
    len: usize,
    /// For a fragment header: the offset and the M flag.
    fragment: Option<(u16, bool)>,
}

/// The extension header of type `kind` at the start of `rest`, if the frame holds all of it.
fn extension(kind: u8, rest: &[u8]) -> Option<Extension> {
    match kind {
        FRAGMENT => {
            let header = Ipv6FragmentHeaderSlice::from_slice(rest).ok()?;
            Some(Extension {
                next: header.next_header().0,
                len: header.slice().len(),
                fragment: Some((header.fragment_offset().value(), header.more_fragments())),
            })
        }
        AH => {
            // etherparse refuses an AH shorter than its fixed fields (payload length below
            // 1); the contract only needs the length to skip it.
            let len = (usize::from(*rest.get(1)?) + 2) * 4;
            if let Ok(header) = IpAuthHeaderSlice::from_slice(rest) {
                return Some(Extension {
                    next: header.next_header().0,
                    len: header.slice().len(),
                    fragment: None,
                });
            }
            (rest.len() >= len).then(|| Extension {
                next: rest[0],
                len,
                fragment: None,
            })
        }
        _ => {
            let header = Ipv6RawExtHeaderSlice::from_slice(rest).ok()?;
            Some(Extension {
                next: header.next_header().0,
                len: header.slice().len(),
                fragment: None,
            })
        }
    }
}

/// The frame as far as the kernel reads it for a payload of `len` bytes from `at`: a first
/// fragment's payload is kept rounded down to a multiple of 8, and what lies past that comes
/// from the next fragment.
fn kept_frame(frame: &[u8], at: usize, len: usize, more_fragments: bool) -> &[u8] {
    if more_fragments {
        &frame[..frame.len().min(at + (len & !7))]
    } else {
        frame
    }
}

fn gre(frame: &[u8], at: usize, depth: Depth) -> Sight {
    let (Some(flags), Some(protocol)) = (be16(frame, at), be16(frame, at + 2)) else {
        return depth.cut("GRE header cut off");
    };
    match flags & 7 {
        0 => {
            if flags & 0x4000 != 0 {
                return Sight::Malformed("GRE with the routing bit (Linux refuses it)");
            }
            let optional = [0x8000u16, 0x2000, 0x1000]
                .iter()
                .filter(|bit| flags & **bit != 0)
                .count();
            let inner = at + 4 + 4 * optional;
            if inner > frame.len() {
                return depth.cut("GRE header cut off");
            }
            match protocol {
                ETH_P_IPV4 => ipv4(frame, inner, depth),
                ETH_P_IPV6 => ipv6(frame, inner, depth),
                ETH_P_TEB => ethernet(frame, inner, depth),
                // WCCP: IPv4, after a 4-byte redirect header unless the IP header comes first.
                0x883e => match frame.get(inner) {
                    Some(first) if first >> 4 == 4 => ipv4(frame, inner, depth),
                    Some(_) => ipv4(frame, inner + 4, depth),
                    None => depth.cut("WCCP header cut off"),
                },
                _ => Sight::Opaque("GRE carrying an unknown protocol"),
            }
        }
        1 if protocol == ETH_P_PPP_GRE => {
            let inner = at
                + 8
                + 4 * usize::from(flags & 0x1000 != 0)
                + 4 * usize::from(flags & 0x0080 != 0);
            let Some(ppp_protocol) = be16(frame, inner) else {
                return depth.cut("GRE/PPP header cut off");
            };
            ppp(frame, inner + 2, ppp_protocol, depth)
        }
        1 => Sight::Opaque("GRE version 1 carrying something else than PPP"),
        _ => Sight::Malformed("GRE version 2 or more"),
    }
}

/// The TCP header at `at`, of which the IP layer says `l4_len` bytes exist.
fn tcp(
    frame: &[u8],
    at: usize,
    l4_len: usize,
    first_fragment: bool,
    (src, dst): (IpAddr, IpAddr),
    ipv4_checksum_ok: bool,
    depth: Depth,
) -> Sight {
    // A first fragment's bytes past a multiple of 8 are not what the kernel reads.
    let rest = kept_frame(frame, at, l4_len, first_fragment)
        .get(at..)
        .unwrap_or_default();
    // Ports, sequence number, data offset and flags: the first 14 bytes decide.
    if l4_len >= 14 {
        if rest.len() < 14 {
            let dport = (rest.len() >= 4).then(|| u16::from_be_bytes([rest[2], rest[3]]));
            return Sight::Hidden { src, dst, dport };
        }
        if !first_fragment && l4_len < 20 {
            return Sight::Malformed("TCP header shorter than 20 bytes");
        }
        let (sport, dport, seq, data_offset, flags) = match TcpHeaderSlice::from_slice(rest) {
            Ok(header) => (
                header.source_port(),
                header.destination_port(),
                header.sequence_number(),
                usize::from(header.data_offset()) * 4,
                header.slice()[13],
            ),
            // Options past the frame, or a bad data offset: the 14 bytes still say it.
            Err(_) => (
                u16::from_be_bytes([rest[0], rest[1]]),
                u16::from_be_bytes([rest[2], rest[3]]),
                u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]),
                usize::from(rest[12] >> 4) * 4,
                rest[13],
            ),
        };
        return Sight::Segment(Segment {
            src,
            dst,
            sport,
            dport,
            seq,
            flags,
            data_offset,
            l4_len,
            l4: at,
            first_fragment,
            outermost: !depth.encapsulated,
            ipv4_checksum_ok,
        });
    }
    if !first_fragment {
        return Sight::Malformed("TCP header shorter than 14 bytes");
    }
    // A first fragment that stops before the flags: the receiving kernel would reassemble
    // it into a segment out of sight. Its port, when present, still tells if it is guarded.
    let dport = (l4_len >= 4 && rest.len() >= 4).then(|| u16::from_be_bytes([rest[2], rest[3]]));
    Sight::Hidden { src, dst, dport }
}

fn be16(frame: &[u8], at: usize) -> Option<u16> {
    frame
        .get(at..at + 2)
        .map(|bytes| u16::from_be_bytes([bytes[0], bytes[1]]))
}

/// Checks that `out` is the RST `reply` describes, decoded with etherparse: link header
/// turned around with the same tags, IPv4 header checksum and TCP checksum valid, addresses
/// and ports swapped, RST+ACK with sequence 0 acknowledging the SYN and its data, no options
/// and no payload. Says what differs.
pub fn check_reply(reply: &Reply, out: &[u8]) -> Result<(), String> {
    let ethernet = Ethernet2HeaderSlice::from_slice(out)
        .map_err(|error| format!("no Ethernet header: {error}"))?;
    expect(
        "Ethernet destination",
        mac(reply.eth_dst),
        mac(ethernet.destination()),
    )?;
    expect(
        "Ethernet source",
        mac(reply.eth_src),
        mac(ethernet.source()),
    )?;
    let mut ether_type = ethernet.ether_type().0;
    let mut offset = ethernet.slice().len();
    let mut tags = Vec::new();
    while is_vlan(ether_type) && tags.len() <= MAX_VLAN_TAGS {
        let vlan = SingleVlanHeaderSlice::from_slice(out.get(offset..).unwrap_or_default())
            .map_err(|error| format!("VLAN tag {}: {error}", tags.len()))?;
        tags.push((
            ether_type,
            u16::from_be_bytes([out[offset], out[offset + 1]]),
        ));
        ether_type = vlan.ether_type().0;
        offset += vlan.slice().len();
    }
    expect(
        "VLAN tags",
        format!("{:04x?}", reply.tags),
        format!("{tags:04x?}"),
    )?;
    expect(
        "ethertype",
        format!("{:#06x}", reply.ether_type),
        format!("{ether_type:#06x}"),
    )?;
    let packet = SlicedPacket::from_ether_type(EtherType(ether_type), &out[offset..])
        .map_err(|error| format!("IP/TCP does not parse: {error}"))?;
    let (src, dst, checksum) = match (&packet.net, &packet.transport) {
        (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(tcp))) => {
            let header = ip.header();
            let computed = header.to_header().calc_header_checksum();
            expect(
                "IPv4 header checksum",
                format!("{computed:#06x}"),
                format!("{:#06x}", header.header_checksum()),
            )?;
            expect("IPv4 header length", 5, header.ihl())?;
            expect("IPv4 total length", 40, header.total_len())?;
            if header.more_fragments() || header.fragments_offset().value() != 0 {
                return Err("the RST is a fragment".into());
            }
            let (src, dst) = (header.source(), header.destination());
            (
                IpAddr::from(src),
                IpAddr::from(dst),
                tcp.calc_checksum_ipv4(src, dst),
            )
        }
        (Some(NetSlice::Ipv6(ip)), Some(TransportSlice::Tcp(tcp))) => {
            let header = ip.header();
            if !ip.extensions().is_empty() {
                return Err("the RST carries IPv6 extension headers".into());
            }
            expect("IPv6 payload length", 20, header.payload_length())?;
            let (src, dst) = (header.source(), header.destination());
            (
                IpAddr::from(src),
                IpAddr::from(dst),
                tcp.calc_checksum_ipv6(src, dst),
            )
        }
        _ => return Err("not IP carrying TCP".into()),
    };
    let Some(TransportSlice::Tcp(tcp)) = &packet.transport else {
        return Err("not TCP".into());
    };
    expect("IP source", reply.src, src)?;
    expect("IP destination", reply.dst, dst)?;
    let checksum = checksum.map_err(|error| format!("TCP checksum: {error}"))?;
    expect(
        "TCP checksum",
        format!("{checksum:#06x}"),
        format!("{:#06x}", tcp.checksum()),
    )?;
    expect("source port", reply.sport, tcp.source_port())?;
    expect("destination port", reply.dport, tcp.destination_port())?;
    expect(
        "flags",
        format!("{:#04x}", TCP_RST | TCP_ACK),
        format!("{:#04x}", tcp.slice()[13]),
    )?;
    expect("sequence number", 0, tcp.sequence_number())?;
    expect(
        "acknowledgment number",
        reply.ack,
        tcp.acknowledgment_number(),
    )?;
    expect("data offset", 5, tcp.data_offset())?;
    expect("payload length", 0, tcp.payload().len())
}

fn expect<T: PartialEq + std::fmt::Display>(what: &str, want: T, got: T) -> Result<(), String> {
    if want == got {
        Ok(())
    } else {
        Err(format!("{what} is {got}, expected {want}"))
    }
}

pub fn mac(bytes: [u8; 6]) -> String {
    bytes
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
