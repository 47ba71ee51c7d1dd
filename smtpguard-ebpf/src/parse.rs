//! Frame parsing, one function per layer in the cursor style of xdp-tools: each `parse_*` reads
//! the fields it needs right after its bounds check and hands the next offset on.
//!
//! The parser reports what it could establish about a frame as a [`Sighting`]; it never decides
//! a verdict. Every variable length is taken from the packet and bounded so the verifier can
//! follow it: VLAN stacks (802.1Q, 802.1ad and 0x9100 tags, any VID, as Linux strips priority
//! tags one after another), PPPoE sessions, MPLS label stacks, IPv4 options, IPv6 extension
//! chains, fragments, and the clear-text tunnels the kernel decapsulates (IPIP, 6in4,
//! IPv6-in-IPv6, IPv4-in-IPv6, GRE with any optional fields, GRE-carried Ethernet and PPTP's
//! PPP). Whatever lies beyond a limit is reported as [`Sighting::Opaque`], never as harmless.

use core::mem::size_of;

use aya_ebpf::{macros::map, maps::PerCpuArray, programs::XdpContext};

const ETH_HLEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// The pre-standard QinQ tag some switches still send.
const ETH_P_QINQ_9100: u16 = 0x9100;
const ETH_P_PPPOE_SESSION: u16 = 0x8864;
const ETH_P_MPLS_UC: u16 = 0x8847;
const ETH_P_MPLS_MC: u16 = 0x8848;
/// Ethernet inside GRE (transparent Ethernet bridging: gretap, ip6gretap).
const ETH_P_TEB: u16 = 0x6558;
const ETH_P_PPP: u16 = 0x880b;
const ETH_P_WCCP: u16 = 0x883e;

/// VLAN tags followed before a frame is opaque. Linux strips priority tags (VID 0) without
/// limit, and nested VLAN devices take one tag each.
pub const MAX_VLAN_TAGS: usize = 16;
/// MPLS labels followed.
const MAX_MPLS_LABELS: usize = 8;
/// Network layers followed: the outer packet and the packets tunnelled inside it (an Ethernet
/// frame inside GRE counts as a layer of its own).
const MAX_LAYERS: usize = 5;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_IPV6: u8 = 41;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_GRE: u8 = 47;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
/// IPv6 extension headers followed before the packet is opaque.
pub const MAX_EXT_HEADERS: usize = 16;
/// No header is read past this offset; anything further in is out of sight.
const MAX_HEADER_OFFSET: usize = 4096;

const GRE_CSUM: u16 = 0x8000;
const GRE_ROUTING: u16 = 0x4000;
const GRE_KEY: u16 = 0x2000;
const GRE_SEQ: u16 = 0x1000;
const GRE_ACK: u16 = 0x0080;
const GRE_VERSION: u16 = 0x0007;

const PPP_IPV4: u16 = 0x0021;
const PPP_IPV6: u16 = 0x0057;

/// Bytes of the TCP header the program needs: ports, sequence numbers, offset and flags.
const TCP_NEEDED: usize = size_of::<TcpHead>();
/// A complete TCP header; the kernel drops segments shorter than this.
const TCP_MIN_HEADER: usize = 20;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[repr(C)]
struct EthHdr {
    _dst: [u8; 6],
    _src: [u8; 6],
    proto: [u8; 2],
}

#[repr(C)]
struct VlanTag {
    _tci: [u8; 2],
    proto: [u8; 2],
}

#[repr(C)]
struct Ipv4Hdr {
    version_ihl: u8,
    _tos: u8,
    total_len: [u8; 2],
    _id: [u8; 2],
    frag_off: [u8; 2],
    _ttl: u8,
    protocol: u8,
    _check: [u8; 2],
    _src: [u8; 4],
    _dst: [u8; 4],
}

#[repr(C)]
struct Ipv6Hdr {
    version_class_flow: [u8; 4],
    payload_len: [u8; 2],
    next_header: u8,
    _hop_limit: u8,
    _src: [u8; 16],
    _dst: [u8; 16],
}

/// The two bytes every chained IPv6 extension header starts with.
#[repr(C)]
struct ExtHdr {
    next_header: u8,
    len: u8,
}

#[repr(C)]
struct FragHdr {
    next_header: u8,
    _reserved: u8,
    offset_flags: [u8; 2],
    _id: [u8; 4],
}

#[repr(C)]
struct GreHdr {
    flags_version: [u8; 2],
    proto: [u8; 2],
}

/// The first 14 bytes of a TCP header: what both the parser and a reply read.
#[repr(C)]
pub(crate) struct TcpHead {
    pub(crate) sport: [u8; 2],
    pub(crate) dport: [u8; 2],
    pub(crate) seq: [u8; 4],
    _ack: [u8; 4],
    pub(crate) data_offset: u8,
    pub(crate) flags: u8,
}

/// An address exactly as read from the packet (network byte order).
#[derive(Clone, Copy)]
pub enum Source {
    V4([u8; 4]),
    V6([u8; 16]),
}

/// The IP header a segment was found behind. Addresses are read from it when a decision
/// needs them, not carried through the parser: 16-byte copies on every path would not fit
/// the BPF stack.
#[derive(Clone, Copy)]
pub struct Ip {
    /// Offset of the IP header.
    pub l3: usize,
    pub v6: bool,
}

impl Ip {
    /// The source address (`to = false`) or the destination address (`to = true`).
    #[inline(always)]
    pub fn address(&self, ctx: &XdpContext, to: bool) -> Option<Source> {
        if self.v6 {
            let at = self.l3 + if to { 24 } else { 8 };
            ptr_at::<[u8; 16]>(ctx, at).map(|addr| Source::V6(unsafe { *addr }))
        } else {
            let at = self.l3 + if to { 16 } else { 12 };
            ptr_at::<[u8; 4]>(ctx, at).map(|addr| Source::V4(unsafe { *addr }))
        }
    }
}

/// Where a segment's headers sit in the frame: what a reply needs to rewrite it in place.
pub struct Layers {
    pub ip: Ip,
    /// Offset of the TCP header (after IPv4 options or IPv6 extension headers).
    pub l4: usize,
    /// Bytes from the TCP header to the end of the IP packet, as the IP header says.
    pub l4_len: usize,
    /// Of those, the bytes the kernel's reassembly takes from this frame: all, or for a first
    /// fragment (or a packet inside one) a multiple of 8. A TCP flag byte beyond them is
    /// overwritten by the next fragment: this frame's is not to be believed.
    pub trusted: usize,
    /// The segment is the first fragment of a larger datagram.
    pub fragment: bool,
    /// The segment was found inside a tunnel (or behind PPPoE or MPLS): the frame on the
    /// wire is the tunnel's.
    pub tunnelled: bool,
    /// The frame starts with an Ethernet header (not a layer-3 interface).
    pub ethernet: bool,
}

/// What the parser could establish about a frame.
pub enum Sighting {
    /// Nothing this program guards: another ethertype or protocol.
    Other,
    /// A non-first fragment: the first fragment carries the decision.
    LaterFragment,
    /// Too short or inconsistent to parse; the kernel drops such frames itself.
    Malformed,
    /// A TCP header in full sight.
    Segment { dport: u16, flags: u8, at: Layers },
    /// A TCP segment whose flags (and perhaps port) are out of sight: a first fragment that
    /// stops early, a non-linear frame. Its IP header, and so its source, is in sight.
    Hidden {
        ip: Ip,
        dport: Option<u16>,
        tunnelled: bool,
    },
    /// Could hold a SYN to a guarded port, but not even its source is in sight: more VLAN
    /// tags, labels, extension headers or tunnel levels than followed, an inner header cut
    /// off, a GRE payload this parser does not read.
    Opaque,
}

#[map(name = "SG_SCRATCH")]
static SCRATCH: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Makes the verifier forget which exact value `off` holds, keeping only that it is at most
/// [`MAX_HEADER_OFFSET`]: the paths that reach a layer at different offsets (after k VLAN
/// tags, n extension headers, a tunnel) become one state, and what follows is verified once
/// instead of once per path. The round trip goes through a per-CPU word the verifier does not
/// track (volatile, so the compiler keeps it). `None` only if the word is missing.
#[inline(always)]
fn widen(off: usize) -> Option<usize> {
    forget(off).filter(|off| *off <= MAX_HEADER_OFFSET)
}

/// `value`, with everything the verifier knew about it forgotten (see [`widen`]).
#[inline(always)]
fn forget(value: usize) -> Option<usize> {
    let word = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: a per-CPU map value, valid for this run, touched by no other CPU.
    Some(unsafe {
        core::ptr::write_volatile(word, value as u64);
        core::ptr::read_volatile(word) as usize
    })
}

/// The layer a header starts, as the one before it said: a kind and an offset, as plain
/// scalars (an enum with a payload per variant leaves the compiler free to carry an undefined
/// register across the loop in [`follow`], which the verifier refuses).
#[derive(Clone, Copy)]
struct Layer {
    kind: u8,
    off: usize,
    /// The offset past which the frame's bytes may not be what the kernel reads: the end of
    /// what reassembly keeps of an outer first fragment (see [`Layers::trusted`]).
    limit: usize,
}

/// An Ethernet header (an interface's own frame, or one tunnelled in GRE).
const ETHERNET: u8 = 0;
const IPV4: u8 = 4;
const IPV6: u8 = 6;

impl Layer {
    #[inline(always)]
    const fn ethernet(off: usize) -> Self {
        Self {
            kind: ETHERNET,
            off,
            limit: usize::MAX,
        }
    }

    #[inline(always)]
    const fn ipv4(off: usize) -> Self {
        Self {
            kind: IPV4,
            off,
            limit: usize::MAX,
        }
    }

    #[inline(always)]
    const fn ipv6(off: usize) -> Self {
        Self {
            kind: IPV6,
            off,
            limit: usize::MAX,
        }
    }

    /// The same layer, inside a packet whose bytes past `limit` the kernel does not keep.
    #[inline(always)]
    const fn within(self, limit: usize) -> Self {
        Self { limit, ..self }
    }

    #[inline(always)]
    fn widened(self) -> Option<Self> {
        Some(Self {
            off: widen(self.off)?,
            ..self
        })
    }
}

/// What parsing one layer led to.
enum Step {
    Done(Sighting),
    /// The next header of the same packet (IP after Ethernet and VLAN tags).
    Next(Layer),
    /// A packet tunnelled inside this one (IPIP, 6in4, GRE). A reply can no longer be built
    /// by rewriting the frame in place, and an inner header the frame cuts off may be in a
    /// later fragment of the outer packet.
    Inner(Layer),
    /// A packet behind link-layer headers a reply cannot simply mirror (PPPoE, MPLS): no
    /// reset, but a header cut off is a truncated frame, as on the interface itself.
    Carried(Layer),
}

/// The one bounds-checked accessor: a pointer to a `T` at `off`, if the frame holds all of it.
#[inline(always)]
pub(crate) fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
fn be16(bytes: [u8; 2]) -> u16 {
    u16::from_be_bytes(bytes)
}

/// A frame from an Ethernet interface.
#[inline(always)]
pub fn parse_frame(ctx: &XdpContext) -> Sighting {
    follow(ctx, Layer::ethernet(0), true)
}

/// A packet from a layer-3 interface (TUN, WireGuard, PPP, IP tunnels): the IP header first.
#[inline(always)]
pub fn parse_packet(ctx: &XdpContext) -> Sighting {
    // Two bytes, not one: the compiler turns a one-byte bound into `data >= data_end`,
    // from which the verifier learns nothing.
    let Some(first) = ptr_at::<[u8; 2]>(ctx, 0) else {
        return Sighting::Malformed;
    };
    let kind = unsafe { (*first)[0] } >> 4;
    if kind != IPV4 && kind != IPV6 {
        return Sighting::Other;
    }
    // One call with the kind read at run time: two calls with constant layers let the
    // compiler specialise the loop into code that spills a register it never set, which the
    // verifier refuses.
    follow(
        ctx,
        Layer {
            kind,
            off: 0,
            limit: usize::MAX,
        },
        false,
    )
}

/// Follows the layers from `first` inwards, through at most [`MAX_LAYERS`] of them.
#[inline(always)]
fn follow(ctx: &XdpContext, first: Layer, ethernet: bool) -> Sighting {
    let mut layer = first;
    let mut at = Carrier {
        ethernet,
        in_tunnel: false,
        no_reply: false,
        limit: usize::MAX,
    };
    for _ in 0..MAX_LAYERS {
        let step = match layer.kind {
            ETHERNET => parse_link(ctx, layer.off, at),
            IPV4 => parse_ipv4(ctx, layer.off, at),
            _ => parse_ipv6(ctx, layer.off, at),
        };
        let inner = match step {
            Step::Done(sighting) => return sighting,
            Step::Next(next) => {
                layer = next;
                continue;
            }
            Step::Inner(inner) => {
                at.in_tunnel = true;
                inner
            }
            Step::Carried(inner) => inner,
        };
        at.no_reply = true;
        // Forgotten, like the offset: one state per layer kind, whatever the limit.
        let Some(limit) = forget(inner.limit.min(at.limit)) else {
            return Sighting::Opaque;
        };
        at.limit = limit;
        let Some(inner) = inner.widened() else {
            return Sighting::Opaque;
        };
        layer = inner;
    }
    Sighting::Opaque
}

/// How the packet being parsed reached the program.
#[derive(Clone, Copy)]
struct Carrier {
    /// The frame started with an Ethernet header (not a layer-3 interface).
    ethernet: bool,
    /// Inside an IP tunnel: an inner header the frame cuts off may come in a later fragment
    /// of the outer packet, so it is opaque rather than malformed.
    in_tunnel: bool,
    /// Behind a tunnel, PPPoE or MPLS: a reset cannot be built by rewriting the frame.
    no_reply: bool,
    /// The frame offset past which bytes are not what the kernel reads: inside an outer first
    /// fragment, reassembly keeps a multiple of 8 bytes and the next fragment brings the rest.
    limit: usize,
}

/// An Ethernet header at `off` and whatever link-layer headers follow it: VLAN tags, a
/// PPPoE session header, MPLS labels. Leads to the IP header.
#[inline(always)]
fn parse_link(ctx: &XdpContext, base: usize, at: Carrier) -> Step {
    let off = base;
    let Some(eth) = ptr_at::<EthHdr>(ctx, off) else {
        return Step::Done(cut_short(at));
    };
    let mut ethertype = be16(unsafe { (*eth).proto });
    let mut off = off + ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if !is_vlan(ethertype) {
            break;
        }
        let Some(tag) = ptr_at::<VlanTag>(ctx, off) else {
            return Step::Done(cut_short(at));
        };
        ethertype = be16(unsafe { (*tag).proto });
        off += size_of::<VlanTag>();
    }
    if off != base + ETH_HLEN {
        let Some(widened) = widen(off) else {
            return Step::Done(Sighting::Opaque);
        };
        off = widened;
    }
    // Inside an outer first fragment, a header past what reassembly keeps may be replaced.
    if off + 2 > at.limit {
        return Step::Done(Sighting::Opaque);
    }
    match ethertype {
        ETH_P_IPV4 => Step::Next(Layer::ipv4(off)),
        ETH_P_IPV6 => Step::Next(Layer::ipv6(off)),
        ETH_P_PPPOE_SESSION => parse_ppp(ctx, off + 6, at),
        ETH_P_MPLS_UC | ETH_P_MPLS_MC => parse_mpls(ctx, off, at),
        // More tags than followed.
        _ if is_vlan(ethertype) => Step::Done(Sighting::Opaque),
        _ => Step::Done(Sighting::Other),
    }
}

#[inline(always)]
fn is_vlan(ethertype: u16) -> bool {
    matches!(ethertype, ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ_9100)
}

/// A header the frame stops before: harmless on the interface's own frame (the kernel drops
/// a truncated frame too), opaque inside a tunnel, where the outer packet may be a fragment
/// whose rest the kernel reassembles.
#[inline(always)]
fn cut_short(at: Carrier) -> Sighting {
    if at.in_tunnel {
        Sighting::Opaque
    } else {
        Sighting::Malformed
    }
}

/// An MPLS label stack at `off`; the packet after the bottom label is IP if its first nibble
/// says so (Linux's MPLS router delivers nothing else).
#[inline(always)]
fn parse_mpls(ctx: &XdpContext, off: usize, at: Carrier) -> Step {
    let mut off = off;
    for _ in 0..MAX_MPLS_LABELS {
        let Some(label) = ptr_at::<[u8; 4]>(ctx, off) else {
            return Step::Done(cut_short(at));
        };
        let bottom = unsafe { (*label)[2] } & 1 != 0;
        off += 4;
        if off + 2 > at.limit {
            return Step::Done(Sighting::Opaque);
        }
        if bottom {
            let Some(first) = ptr_at::<[u8; 2]>(ctx, off) else {
                return Step::Done(cut_short(at));
            };
            return match unsafe { (*first)[0] } >> 4 {
                4 => Step::Carried(Layer::ipv4(off)),
                6 => Step::Carried(Layer::ipv6(off)),
                _ => Step::Done(Sighting::Other),
            };
        }
    }
    Step::Done(Sighting::Opaque)
}

/// A PPP frame at `off` (inside PPPoE or PPTP's GRE): address and control bytes are optional,
/// the protocol field may be compressed to one byte.
#[inline(always)]
fn parse_ppp(ctx: &XdpContext, off: usize, at: Carrier) -> Step {
    let Some(head) = ptr_at::<[u8; 2]>(ctx, off) else {
        return Step::Done(cut_short(at));
    };
    let head = unsafe { *head };
    let off = if head == [0xff, 0x03] { off + 2 } else { off };
    if off + 2 > at.limit {
        return Step::Done(Sighting::Opaque);
    }
    // Both bytes: with a one-byte protocol field the second is the IP header's first.
    let Some(field) = ptr_at::<[u8; 2]>(ctx, off) else {
        return Step::Done(cut_short(at));
    };
    let field = unsafe { *field };
    let (protocol, len) = if field[0] & 1 != 0 {
        (u16::from(field[0]), 1)
    } else {
        (be16(field), 2)
    };
    let inner = match protocol {
        PPP_IPV4 => Layer::ipv4(off + len).within(at.limit),
        PPP_IPV6 => Layer::ipv6(off + len).within(at.limit),
        // Control protocols, and compressed or encrypted data: the PPP device reads those
        // (attach smtpguard to it).
        _ => return Step::Done(Sighting::Other),
    };
    // Inside PPTP the packet is tunnelled; behind PPPoE it is carried on this link.
    if at.in_tunnel {
        Step::Inner(inner)
    } else {
        Step::Carried(inner)
    }
}

/// A GRE header at `off`: version 0 with any of checksum, key and sequence number, carrying
/// IPv4, IPv6 or Ethernet; version 1 (PPTP) carrying PPP.
#[inline(always)]
fn parse_gre(ctx: &XdpContext, off: usize, at: Carrier) -> Step {
    let Some(gre) = ptr_at::<GreHdr>(ctx, off) else {
        return Step::Done(Sighting::Opaque);
    };
    if off + size_of::<GreHdr>() > at.limit {
        // The payload's kind may come from a later outer fragment.
        return Step::Done(Sighting::Opaque);
    }
    let (flags, proto) = unsafe { (be16((*gre).flags_version), be16((*gre).proto)) };
    let word = |bit: u16| if flags & bit != 0 { 4 } else { 0 };
    match flags & GRE_VERSION {
        0 => {
            // Linux refuses source routing (gre_parse_header).
            if flags & GRE_ROUTING != 0 {
                return Step::Done(Sighting::Malformed);
            }
            let inner = off + 4 + word(GRE_CSUM) + word(GRE_KEY) + word(GRE_SEQ);
            match proto {
                ETH_P_IPV4 => Step::Inner(Layer::ipv4(inner).within(at.limit)),
                ETH_P_IPV6 => Step::Inner(Layer::ipv6(inner).within(at.limit)),
                ETH_P_TEB => Step::Inner(Layer::ethernet(inner).within(at.limit)),
                // WCCP redirection: IPv4, after a 4-byte WCCPv2 header unless the IP header
                // comes first (Linux's ip_gre tells them apart by the first nibble).
                ETH_P_WCCP => match ptr_at::<[u8; 2]>(ctx, inner) {
                    Some(first) if unsafe { (*first)[0] } >> 4 == 4 => {
                        Step::Inner(Layer::ipv4(inner).within(at.limit))
                    }
                    Some(_) => Step::Inner(Layer::ipv4(inner + 4).within(at.limit)),
                    None => Step::Done(Sighting::Opaque),
                },
                // MPLS, ERSPAN, NSH and the rest: not read here, so not passed either.
                _ => Step::Done(Sighting::Opaque),
            }
        }
        // PPTP: the key field is always there (payload length and call id).
        1 if proto == ETH_P_PPP => {
            let tunnel = Carrier {
                in_tunnel: true,
                ..at
            };
            parse_ppp(ctx, off + 8 + word(GRE_SEQ) + word(GRE_ACK), tunnel)
        }
        1 => Step::Done(Sighting::Opaque),
        // Linux drops other versions (gre_rcv).
        _ => Step::Done(Sighting::Malformed),
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, off: usize, at: Carrier) -> Step {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, off) else {
        return Step::Done(cut_short(at));
    };
    if off + size_of::<Ipv4Hdr>() > at.limit {
        // The outer fragment's next part may rewrite this header.
        return Step::Done(Sighting::Opaque);
    }
    let (version_ihl, total_len, frag_off, protocol) = unsafe {
        (
            (*ip).version_ihl,
            be16((*ip).total_len) as usize,
            be16((*ip).frag_off),
            (*ip).protocol,
        )
    };
    // Masking keeps the header length in 0..=60 where the verifier can see it.
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || ihl < size_of::<Ipv4Hdr>() || total_len < ihl {
        return Step::Done(Sighting::Malformed);
    }
    if frag_off & 0x1fff != 0 {
        return Step::Done(Sighting::LaterFragment);
    }
    let payload = off + ihl;
    let first_fragment = frag_off & 0x2000 != 0;
    // What reassembly keeps of this packet's payload: a fragment with more to come keeps a
    // multiple of 8 bytes (Linux rounds its end down); the next fragment brings the rest.
    let kept = kept(total_len - ihl, first_fragment);
    let limit = if first_fragment {
        payload + kept
    } else {
        usize::MAX
    };
    match protocol {
        IPPROTO_TCP => Step::Done(parse_tcp(
            ctx,
            Layers {
                ip: Ip { l3: off, v6: false },
                l4: payload,
                l4_len: total_len - ihl,
                trusted: trusted(kept, payload, at.limit),
                fragment: first_fragment,
                tunnelled: at.no_reply,
                ethernet: at.ethernet,
            },
        )),
        IPPROTO_IPIP => Step::Inner(Layer::ipv4(payload).within(limit)),
        IPPROTO_IPV6 => Step::Inner(Layer::ipv6(payload).within(limit)),
        IPPROTO_GRE => parse_gre(
            ctx,
            payload,
            Carrier {
                limit: limit.min(at.limit),
                ..at
            },
        ),
        _ => Step::Done(Sighting::Other),
    }
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, off: usize, at: Carrier) -> Step {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, off) else {
        return Step::Done(cut_short(at));
    };
    if off + size_of::<Ipv6Hdr>() > at.limit {
        return Step::Done(Sighting::Opaque);
    }
    let (version, payload_len, mut next) = unsafe {
        (
            (*ip).version_class_flow[0] >> 4,
            be16((*ip).payload_len) as usize,
            (*ip).next_header,
        )
    };
    if version != 6 {
        return Step::Done(Sighting::Malformed);
    }
    let mut cur = off + size_of::<Ipv6Hdr>();
    // A zero payload length is how jumbograms say "see the hop-by-hop option": the frame's
    // own length is then the only bound.
    let payload_end = if payload_len == 0 {
        usize::MAX
    } else {
        cur + payload_len
    };
    let mut fragmented = false;
    for _ in 0..MAX_EXT_HEADERS {
        let len = match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH => {
                let Some(ext) = ptr_at::<ExtHdr>(ctx, cur) else {
                    return Step::Done(chain_cut(ctx, payload_end, fragmented, at));
                };
                let (next_header, len) = unsafe { ((*ext).next_header, (*ext).len as usize) };
                // AH counts its length in 4-byte units less two, the others in 8-byte units less one.
                let header_len = if next == IPPROTO_AH {
                    (len + 2) * 4
                } else {
                    (len + 1) * 8
                };
                next = next_header;
                header_len
            }
            IPPROTO_FRAGMENT => {
                let Some(frag) = ptr_at::<FragHdr>(ctx, cur) else {
                    return Step::Done(chain_cut(ctx, payload_end, fragmented, at));
                };
                let (next_header, offset_flags) =
                    unsafe { ((*frag).next_header, be16((*frag).offset_flags)) };
                if offset_flags & 0xfff8 != 0 {
                    return Step::Done(Sighting::LaterFragment);
                }
                // Any fragment header with more to come makes this a first fragment; a
                // later atomic one does not undo that.
                fragmented = fragmented || offset_flags & 1 != 0;
                next = next_header;
                size_of::<FragHdr>()
            }
            _ => break,
        };
        // A header the frame does not hold whole: Linux reads all of it, so what it says
        // (and where the chain goes on) is out of sight.
        if cur + len > ctx.data_end() - ctx.data() {
            return Step::Done(chain_cut(ctx, payload_end, fragmented, at));
        }
        cur += len;
        if cur > MAX_HEADER_OFFSET {
            return Step::Done(Sighting::Opaque);
        }
    }
    if cur != off + size_of::<Ipv6Hdr>() {
        let Some(widened) = widen(cur) else {
            return Step::Done(Sighting::Opaque);
        };
        cur = widened;
    }
    match next {
        IPPROTO_TCP => Step::Done(parse_tcp6(
            ctx,
            Ip { l3: off, v6: true },
            cur,
            payload_end,
            fragmented,
            at,
        )),
        IPPROTO_IPIP => {
            Step::Inner(Layer::ipv4(cur).within(fragment_limit(cur, payload_end, fragmented)))
        }
        IPPROTO_IPV6 => {
            Step::Inner(Layer::ipv6(cur).within(fragment_limit(cur, payload_end, fragmented)))
        }
        IPPROTO_GRE => parse_gre(
            ctx,
            cur,
            Carrier {
                limit: fragment_limit(cur, payload_end, fragmented).min(at.limit),
                ..at
            },
        ),
        // A chain longer than followed: Linux accepts it, and what follows may be TCP or a
        // tunnel whose inner source is out of sight.
        _ if is_ipv6_extension(next) => Step::Done(Sighting::Opaque),
        _ => Step::Done(Sighting::Other),
    }
}

#[inline(always)]
fn is_ipv6_extension(next: u8) -> bool {
    matches!(
        next,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT
    )
}

/// An extension header the frame does not hold whole: opaque if the rest may exist beyond
/// the frame (the IP payload runs past it, a later fragment brings more, the outer packet of
/// a tunnel is a fragment), malformed if it cannot (the header runs past the payload too, and
/// Linux drops the packet).
#[inline(always)]
fn chain_cut(ctx: &XdpContext, payload_end: usize, fragmented: bool, at: Carrier) -> Sighting {
    if at.in_tunnel || fragmented || payload_end > ctx.data_end() - ctx.data() {
        Sighting::Opaque
    } else {
        Sighting::Malformed
    }
}

#[inline(always)]
fn parse_tcp6(
    ctx: &XdpContext,
    ip: Ip,
    cur: usize,
    payload_end: usize,
    fragmented: bool,
    at: Carrier,
) -> Sighting {
    let tunnelled = at.no_reply;
    match payload_end.checked_sub(cur) {
        Some(l4_len) => parse_tcp(
            ctx,
            Layers {
                ip,
                l4: cur,
                l4_len,
                trusted: trusted(kept(l4_len, fragmented), cur, at.limit),
                fragment: fragmented,
                tunnelled,
                ethernet: at.ethernet,
            },
        ),
        // The chain runs past the payload: a header out of the frame, as above.
        None if fragmented => Sighting::Hidden {
            ip,
            dport: None,
            tunnelled,
        },
        None => Sighting::Malformed,
    }
}

/// Bytes of a payload of `len` that reassembly keeps from this packet: all of it, or for a
/// fragment with more to come, a multiple of 8 (Linux rounds the fragment's end down, and
/// what lies past it is taken from the next fragment).
#[inline(always)]
fn kept(len: usize, more_fragments: bool) -> usize {
    if more_fragments { len & !7 } else { len }
}

/// Of `kept` bytes from `start`, those before `limit` (an outer fragment's kept end).
#[inline(always)]
fn trusted(kept: usize, start: usize, limit: usize) -> usize {
    kept.min(limit.saturating_sub(start))
}

/// The kept end of an IPv6 first fragment's payload from `cur`, as a limit for what it
/// carries (IPv6 refuses fragments that are not a multiple of 8, so this rounds nothing a
/// valid one holds).
#[inline(always)]
fn fragment_limit(cur: usize, payload_end: usize, fragmented: bool) -> usize {
    if fragmented {
        cur + kept(payload_end.saturating_sub(cur), true)
    } else {
        usize::MAX
    }
}

/// The TCP header at `at.l4`, of which the IP layer says `at.l4_len` bytes exist and
/// `at.trusted` are what the kernel will read.
#[inline(always)]
fn parse_tcp(ctx: &XdpContext, at: Layers) -> Sighting {
    let (ip, tunnelled) = (at.ip, at.tunnelled);
    // The bytes of this frame the kernel reads as the TCP header: kept by reassembly, and
    // in the frame.
    if at.trusted >= TCP_NEEDED
        && let Some(tcp) = ptr_at::<TcpHead>(ctx, at.l4)
    {
        if !at.fragment && at.l4_len < TCP_MIN_HEADER {
            return Sighting::Malformed;
        }
        let (dport, flags) = unsafe { (be16((*tcp).dport), (*tcp).flags) };
        return Sighting::Segment { dport, flags, at };
    }
    // A TCP header shorter than its fixed part, and no more to come: the kernel drops it.
    if at.l4_len < TCP_NEEDED && !at.fragment {
        return Sighting::Malformed;
    }
    // The flags are out of sight: a later fragment brings them (or overwrites what this one
    // shows), or the frame stops before the bytes the IP header promises. The port, when
    // this frame holds it, still tells whether the segment is guarded.
    let dport = if at.trusted >= 4 {
        ptr_at::<[u8; 4]>(ctx, at.l4).map(|ports| be16(unsafe { [(*ports)[2], (*ports)[3]] }))
    } else {
        None
    };
    Sighting::Hidden {
        ip,
        dport,
        tunnelled,
    }
}

impl Sighting {
    /// The same sighting with its offsets widened (see [`widen`]): the decision and the reply
    /// that follow are verified once per kind of sighting, not once per parser path.
    #[inline(always)]
    pub fn widened(self) -> Self {
        match self {
            Self::Segment { dport, flags, at } => {
                let (Some(l3), Some(l4), Some(l4_len)) =
                    (widen(at.ip.l3), widen(at.l4), forget(at.l4_len))
                else {
                    return Self::Opaque;
                };
                Self::Segment {
                    dport,
                    flags,
                    at: Layers {
                        ip: Ip { l3, v6: at.ip.v6 },
                        l4,
                        l4_len,
                        ..at
                    },
                }
            }
            Self::Hidden {
                ip,
                dport,
                tunnelled,
            } => match widen(ip.l3) {
                Some(l3) => Self::Hidden {
                    ip: Ip { l3, v6: ip.v6 },
                    dport,
                    tunnelled,
                },
                None => Self::Opaque,
            },
            other => other,
        }
    }
}
