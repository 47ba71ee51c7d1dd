//! Frame parsing, one function per layer in the cursor style of xdp-tools: each `parse_*` reads
//! the fields it needs right after its bounds check and hands the next offset on.
//!
//! The parser reports what it could establish about a frame as a [`Sighting`]; it never decides
//! a verdict. Variable lengths are taken from the packet (VLAN tags, IPv4 IHL, IPv6 extension
//! headers, fragments) and every one of them is bounded so the verifier can follow it.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;

const ETH_HLEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// VLAN tags followed: 802.1Q, and QinQ (802.1ad outer + 802.1Q inner).
const MAX_VLAN_TAGS: usize = 2;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
/// IPv6 extension headers followed before the packet is decided by its source alone.
const MAX_EXT_HEADERS: usize = 8;
/// No header is read past this offset; a TCP header further in is out of sight.
const MAX_HEADER_OFFSET: usize = 4096;

/// Bytes of the TCP header the program needs: ports, sequence numbers, offset and flags.
const TCP_NEEDED: usize = size_of::<TcpHead>();
/// A complete TCP header; the kernel drops segments shorter than this.
const TCP_MIN_HEADER: usize = 20;

pub const TCP_SYN: u8 = 0x02;
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
    src: [u8; 4],
    _dst: [u8; 4],
}

#[repr(C)]
struct Ipv6Hdr {
    version_class_flow: [u8; 4],
    payload_len: [u8; 2],
    next_header: u8,
    _hop_limit: u8,
    src: [u8; 16],
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

/// A source address exactly as read from the packet (network byte order).
pub enum Source {
    V4([u8; 4]),
    V6([u8; 16]),
}

/// Where a segment's headers sit in the frame: what a reply needs to rewrite it in place.
pub struct Layers {
    /// Offset of the IP header (after any VLAN tags).
    pub l3: usize,
    /// Offset of the TCP header (after IPv4 options or IPv6 extension headers).
    pub l4: usize,
    /// Bytes from the TCP header to the end of the IP packet, as the IP header says.
    pub l4_len: usize,
    /// The segment is the first fragment of a larger datagram.
    pub fragment: bool,
}

/// What the parser could establish about a frame.
pub enum Sighting {
    /// Nothing this program guards: another ethertype or protocol, more VLAN tags than followed.
    Other,
    /// A non-first fragment: the first fragment carries the decision.
    LaterFragment,
    /// Too short or inconsistent to parse; the kernel drops such frames itself.
    Malformed,
    /// A TCP header in full sight.
    Segment {
        src: Source,
        dport: u16,
        flags: u8,
        at: Layers,
    },
    /// Might be a TCP SYN to a guarded port, but the flags (and perhaps the port) are out of
    /// sight: a first fragment that stops early, a long extension chain, a non-linear frame.
    Hidden { src: Source, dport: Option<u16> },
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

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Sighting {
    let Some((ethertype, l3)) = parse_ethernet(ctx) else {
        return Sighting::Malformed;
    };
    match ethertype {
        ETH_P_IPV4 => parse_ipv4(ctx, l3),
        ETH_P_IPV6 => parse_ipv6(ctx, l3),
        // More tags than followed: counted, and passed (Linux delivers such a frame only
        // through as many nested VLAN devices).
        ETH_P_8021Q | ETH_P_8021AD => Sighting::Malformed,
        _ => Sighting::Other,
    }
}

/// Ethernet and up to [`MAX_VLAN_TAGS`] tags: the inner ethertype and the offset of layer 3.
#[inline(always)]
fn parse_ethernet(ctx: &XdpContext) -> Option<(u16, usize)> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    let mut ethertype = be16(unsafe { (*eth).proto });
    let mut off = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let tag: *const VlanTag = ptr_at(ctx, off)?;
        ethertype = be16(unsafe { (*tag).proto });
        off += size_of::<VlanTag>();
    }
    Some((ethertype, off))
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, off: usize) -> Sighting {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, off) else {
        return Sighting::Malformed;
    };
    let (version_ihl, total_len, frag_off, protocol, src) = unsafe {
        (
            (*ip).version_ihl,
            be16((*ip).total_len) as usize,
            be16((*ip).frag_off),
            (*ip).protocol,
            (*ip).src,
        )
    };
    // Masking keeps the header length in 0..=60 where the verifier can see it.
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || ihl < size_of::<Ipv4Hdr>() || total_len < ihl {
        return Sighting::Malformed;
    }
    if protocol != IPPROTO_TCP {
        return Sighting::Other;
    }
    if frag_off & 0x1fff != 0 {
        return Sighting::LaterFragment;
    }
    let first_fragment = frag_off & 0x2000 != 0;
    parse_tcp(
        ctx,
        off,
        off + ihl,
        total_len - ihl,
        first_fragment,
        Source::V4(src),
    )
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, off: usize) -> Sighting {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, off) else {
        return Sighting::Malformed;
    };
    let (version, payload_len, mut next, src) = unsafe {
        (
            (*ip).version_class_flow[0] >> 4,
            be16((*ip).payload_len) as usize,
            (*ip).next_header,
            (*ip).src,
        )
    };
    if version != 6 {
        return Sighting::Malformed;
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
            IPPROTO_TCP => return parse_tcp6(ctx, off, cur, payload_end, fragmented, src),
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH => {
                let Some(ext) = ptr_at::<ExtHdr>(ctx, cur) else {
                    return out_of_sight(cur, payload_end, fragmented, Source::V6(src));
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
                    return out_of_sight(cur, payload_end, fragmented, Source::V6(src));
                };
                let (next_header, offset_flags) =
                    unsafe { ((*frag).next_header, be16((*frag).offset_flags)) };
                if offset_flags & 0xfff8 != 0 {
                    return Sighting::LaterFragment;
                }
                fragmented = offset_flags & 1 != 0;
                next = next_header;
                size_of::<FragHdr>()
            }
            _ => return Sighting::Other,
        };
        cur += len;
        if cur > MAX_HEADER_OFFSET {
            return Sighting::Hidden {
                src: Source::V6(src),
                dport: None,
            };
        }
    }
    if next == IPPROTO_TCP {
        return parse_tcp6(ctx, off, cur, payload_end, fragmented, src);
    }
    // A chain longer than followed: Linux accepts it, so its source decides.
    if is_ipv6_extension(next) {
        Sighting::Hidden {
            src: Source::V6(src),
            dport: None,
        }
    } else {
        Sighting::Other
    }
}

#[inline(always)]
fn is_ipv6_extension(next: u8) -> bool {
    matches!(
        next,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT
    )
}

#[inline(always)]
fn parse_tcp6(
    ctx: &XdpContext,
    l3: usize,
    cur: usize,
    payload_end: usize,
    fragmented: bool,
    src: [u8; 16],
) -> Sighting {
    match payload_end.checked_sub(cur) {
        Some(l4_len) => parse_tcp(ctx, l3, cur, l4_len, fragmented, Source::V6(src)),
        // The chain runs past the payload: the same rule as for a header out of the frame.
        None => out_of_sight(cur, payload_end, fragmented, Source::V6(src)),
    }
}

/// A header the frame does not hold: hidden if the IP header says it is there (a non-linear
/// frame) or a later fragment brings it, malformed if neither can.
#[inline(always)]
fn out_of_sight(cur: usize, payload_end: usize, fragmented: bool, src: Source) -> Sighting {
    if cur < payload_end || fragmented {
        Sighting::Hidden { src, dport: None }
    } else {
        Sighting::Malformed
    }
}

/// The TCP header at `off`, of which the IP layer (at `l3`) says `l4_len` bytes exist.
#[inline(always)]
fn parse_tcp(
    ctx: &XdpContext,
    l3: usize,
    off: usize,
    l4_len: usize,
    first_fragment: bool,
    src: Source,
) -> Sighting {
    if l4_len >= TCP_NEEDED {
        if let Some(tcp) = ptr_at::<TcpHead>(ctx, off) {
            if !first_fragment && l4_len < TCP_MIN_HEADER {
                return Sighting::Malformed;
            }
            let (dport, flags) = unsafe { (be16((*tcp).dport), (*tcp).flags) };
            return Sighting::Segment {
                src,
                dport,
                flags,
                at: Layers {
                    l3,
                    l4: off,
                    l4_len,
                    fragment: first_fragment,
                },
            };
        }
        // The IP header promises the bytes but the frame does not hold them.
        return Sighting::Hidden { src, dport: None };
    }
    if !first_fragment {
        return Sighting::Malformed;
    }
    // A first fragment that stops before the flags: the receiving kernel would reassemble it
    // into a segment we cannot see. Its port, when present, still tells whether it is guarded.
    let dport = if l4_len >= 4 {
        ptr_at::<[u8; 4]>(ctx, off).map(|ports| be16(unsafe { [(*ports)[2], (*ports)[3]] }))
    } else {
        None
    };
    Sighting::Hidden { src, dport }
}
