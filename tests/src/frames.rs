//! Crafted frames, byte by byte: Ethernet with any VLAN stack, PPPoE and MPLS, IPv4 with
//! options and fragments, IPv6 with extension-header chains, tunnels (IP in IP, GRE), TCP with
//! any flags. Checksums are correct so the same frames can be injected onto a real link.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
/// The pre-standard QinQ TPID some switches still use.
pub const ETH_P_QINQ: u16 = 0x9100;
pub const ETH_P_PPPOE_SESSION: u16 = 0x8864;
pub const ETH_P_MPLS_UC: u16 = 0x8847;
pub const ETH_P_MPLS_MC: u16 = 0x8848;
/// Transparent Ethernet bridging: GRE carrying Ethernet frames.
pub const ETH_P_TEB: u16 = 0x6558;
/// PPP over GRE version 1 (PPTP).
pub const ETH_P_PPP_GRE: u16 = 0x880b;
pub const PPP_IPV4: u16 = 0x0021;
pub const PPP_IPV6: u16 = 0x0057;

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_GRE: u8 = 47;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_NONE: u8 = 59;
pub const IPPROTO_DSTOPTS: u8 = 60;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;
pub const URG: u8 = 0x20;
pub const ECE: u8 = 0x40;
pub const CWR: u8 = 0x80;

/// IPv4 "more fragments" flag, in the 16-bit flags+offset field.
pub const IPV4_MF: u16 = 0x2000;
/// IPv4 "don't fragment" flag.
pub const IPV4_DF: u16 = 0x4000;

pub const DST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
pub const SRC_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];

/// A VLAN tag: TPID and VLAN id.
#[derive(Clone, Copy, Debug)]
pub struct Tag {
    pub tpid: u16,
    pub vid: u16,
}

pub const fn dot1q(vid: u16) -> Tag {
    Tag {
        tpid: ETH_P_8021Q,
        vid,
    }
}

pub const fn dot1ad(vid: u16) -> Tag {
    Tag {
        tpid: ETH_P_8021AD,
        vid,
    }
}

/// Ethernet header (with `tags`, outermost first) followed by `payload`.
pub fn ethernet(
    dst: [u8; 6],
    src: [u8; 6],
    tags: &[Tag],
    ethertype: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + 4 * tags.len() + payload.len());
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    for tag in tags {
        frame.extend_from_slice(&tag.tpid.to_be_bytes());
        frame.extend_from_slice(&(tag.vid & 0x0fff).to_be_bytes());
    }
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A TCP header (20 bytes plus `options`, padded to 4) and `data`, checksummed for `pseudo`.
pub fn tcp(
    sport: u16,
    dport: u16,
    flags: u8,
    options: &[u8],
    data: &[u8],
    pseudo: &Pseudo,
) -> Vec<u8> {
    tcp_seq(sport, dport, 0x1000_0000, flags, options, data, pseudo)
}

/// As [`tcp`], with the sequence number `seq` (a reply acknowledges it: the oracle matches
/// answers to the frames they answer by it).
pub fn tcp_seq(
    sport: u16,
    dport: u16,
    seq: u32,
    flags: u8,
    options: &[u8],
    data: &[u8],
    pseudo: &Pseudo,
) -> Vec<u8> {
    let mut options = options.to_vec();
    while !options.len().is_multiple_of(4) {
        options.push(0);
    }
    let header_len = 20 + options.len();
    let mut segment = Vec::with_capacity(header_len + data.len());
    segment.extend_from_slice(&sport.to_be_bytes());
    segment.extend_from_slice(&dport.to_be_bytes());
    segment.extend_from_slice(&seq.to_be_bytes());
    let ack = if flags & ACK != 0 { 0x2000_0000u32 } else { 0 };
    segment.extend_from_slice(&ack.to_be_bytes());
    segment.push(((header_len / 4) as u8) << 4);
    segment.push(flags);
    segment.extend_from_slice(&64240u16.to_be_bytes());
    segment.extend_from_slice(&[0, 0, 0, 0]);
    segment.extend_from_slice(&options);
    segment.extend_from_slice(data);
    let sum = pseudo.checksum(IPPROTO_TCP, &segment);
    segment[16..18].copy_from_slice(&sum.to_be_bytes());
    segment
}

/// The addresses a transport checksum covers.
pub enum Pseudo {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
}

impl Pseudo {
    pub fn checksum(&self, protocol: u8, segment: &[u8]) -> u16 {
        let mut header = Vec::new();
        match self {
            Self::V4(src, dst) => {
                header.extend_from_slice(&src.octets());
                header.extend_from_slice(&dst.octets());
                header.extend_from_slice(&[0, protocol]);
                header.extend_from_slice(&(segment.len() as u16).to_be_bytes());
            }
            Self::V6(src, dst) => {
                header.extend_from_slice(&src.octets());
                header.extend_from_slice(&dst.octets());
                header.extend_from_slice(&(segment.len() as u32).to_be_bytes());
                header.extend_from_slice(&[0, 0, 0, protocol]);
            }
        }
        header.extend_from_slice(segment);
        internet_checksum(&header)
    }
}

/// The ones' complement sum of RFC 1071.
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 header with `options` (padded to 4 bytes) and `frag` (flags + offset in 8-byte
/// units), followed by `payload`.
pub fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    options: &[u8],
    frag: u16,
    payload: &[u8],
) -> Vec<u8> {
    ipv4_id(src, dst, protocol, options, frag, 0x1234, payload)
}

/// As [`ipv4`], with the identification field `id`: fragments of one datagram share it, and
/// the receiving kernel reassembles by it.
pub fn ipv4_id(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    options: &[u8],
    frag: u16,
    id: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut options = options.to_vec();
    while !options.len().is_multiple_of(4) {
        options.push(0);
    }
    let header_len = 20 + options.len();
    let total = header_len + payload.len();
    let mut packet = Vec::with_capacity(total);
    packet.push(0x40 | (header_len / 4) as u8);
    packet.push(0);
    packet.extend_from_slice(&(total as u16).to_be_bytes());
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(&frag.to_be_bytes());
    packet.push(64);
    packet.push(protocol);
    packet.extend_from_slice(&[0, 0]);
    packet.extend_from_slice(&src.octets());
    packet.extend_from_slice(&dst.octets());
    packet.extend_from_slice(&options);
    let sum = internet_checksum(&packet);
    packet[10..12].copy_from_slice(&sum.to_be_bytes());
    packet.extend_from_slice(payload);
    packet
}

/// An IPv6 header followed by `chain` (extension headers, already linked) and `payload`.
/// `next_header` is the type of the first header after the fixed one.
pub fn ipv6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next_header: u8,
    chain: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let payload_len = chain.len() + payload.len();
    let mut packet = Vec::with_capacity(40 + payload_len);
    packet.extend_from_slice(&[0x60, 0, 0, 0]);
    packet.extend_from_slice(&(payload_len as u16).to_be_bytes());
    packet.push(next_header);
    packet.push(64);
    packet.extend_from_slice(&src.octets());
    packet.extend_from_slice(&dst.octets());
    packet.extend_from_slice(chain);
    packet.extend_from_slice(payload);
    packet
}

/// A generic extension header (hop-by-hop, routing, destination options) of `8 * (units + 1)`
/// bytes, padded with PadN.
pub fn ext_header(next_header: u8, units: u8) -> Vec<u8> {
    let len = 8 * (usize::from(units) + 1);
    let mut header = vec![0; len];
    header[0] = next_header;
    header[1] = units;
    // PadN option covering the rest, so the header is valid as options.
    header[2] = 1;
    header[3] = (len - 4) as u8;
    header
}

/// An authentication header of `4 * (units + 2)` bytes.
pub fn ah_header(next_header: u8, units: u8) -> Vec<u8> {
    let len = 4 * (usize::from(units) + 2);
    let mut header = vec![0; len];
    header[0] = next_header;
    header[1] = units;
    header
}

/// A fragment header: `offset` in 8-byte units, `more` fragments flag.
pub fn fragment_header(next_header: u8, offset: u16, more: bool) -> Vec<u8> {
    fragment_header_id(next_header, offset, more, 0xdead_beef)
}

/// As [`fragment_header`], with the identification `id` the receiver reassembles by.
pub fn fragment_header_id(next_header: u8, offset: u16, more: bool, id: u32) -> Vec<u8> {
    let mut header = vec![next_header, 0];
    header.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
    header.extend_from_slice(&id.to_be_bytes());
    header
}

/// A routing header of `8 * (units + 1)` bytes with no segments left, which a receiver skips
/// whatever its type (253: reserved for experiments, so no router acts on it).
pub fn routing_header(next_header: u8, units: u8) -> Vec<u8> {
    let mut header = vec![0; 8 * (usize::from(units) + 1)];
    header[0] = next_header;
    header[1] = units;
    header[2] = 253;
    header
}

/// A PPPoE session header (RFC 2516) and the PPP protocol field before `payload`.
pub fn pppoe(ppp_protocol: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x11, 0x00, 0x12, 0x34];
    frame.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
    frame.extend_from_slice(&ppp_protocol.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// An MPLS label stack (bottom-of-stack set on the last of `labels`, or on none when
/// `bottom` is false) before `payload`.
pub fn mpls(labels: &[u32], bottom: bool, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(4 * labels.len() + payload.len());
    for (index, label) in labels.iter().enumerate() {
        let last = bottom && index + 1 == labels.len();
        let entry = ((label & 0xf_ffff) << 12) | (u32::from(last) << 8) | 64;
        frame.extend_from_slice(&entry.to_be_bytes());
    }
    frame.extend_from_slice(payload);
    frame
}

/// Optional GRE version 0 fields (RFC 2890): each present one adds 4 bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct GreFields {
    pub checksum: bool,
    pub key: bool,
    pub sequence: bool,
    /// The routing-present bit of RFC 1701, which Linux refuses.
    pub routing: bool,
}

/// A GRE version 0 header carrying `protocol` (an ethertype), then `payload`; the checksum,
/// when present, covers header and payload.
pub fn gre(fields: GreFields, protocol: u16, payload: &[u8]) -> Vec<u8> {
    let flags = (u16::from(fields.checksum) << 15)
        | (u16::from(fields.routing) << 14)
        | (u16::from(fields.key) << 13)
        | (u16::from(fields.sequence) << 12);
    let mut packet = Vec::with_capacity(16 + payload.len());
    packet.extend_from_slice(&flags.to_be_bytes());
    packet.extend_from_slice(&protocol.to_be_bytes());
    if fields.checksum || fields.routing {
        packet.extend_from_slice(&[0, 0, 0, 0]);
    }
    if fields.key {
        packet.extend_from_slice(&0x0000_2525u32.to_be_bytes());
    }
    if fields.sequence {
        packet.extend_from_slice(&7u32.to_be_bytes());
    }
    packet.extend_from_slice(payload);
    if fields.checksum {
        let sum = internet_checksum(&packet);
        packet[4..6].copy_from_slice(&sum.to_be_bytes());
    }
    packet
}

/// An enhanced GRE (version 1, PPTP) header carrying a PPP frame of `ppp_protocol`, with the
/// sequence and acknowledgment numbers when asked for.
pub fn gre_ppp(sequence: bool, ack: bool, ppp_protocol: u16, payload: &[u8]) -> Vec<u8> {
    let flags: u16 = 0x2001 | (u16::from(sequence) << 12) | (u16::from(ack) << 7);
    let mut packet = Vec::with_capacity(20 + payload.len());
    packet.extend_from_slice(&flags.to_be_bytes());
    packet.extend_from_slice(&ETH_P_PPP_GRE.to_be_bytes());
    packet.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
    packet.extend_from_slice(&0x0025u16.to_be_bytes());
    if sequence {
        packet.extend_from_slice(&1u32.to_be_bytes());
    }
    if ack {
        packet.extend_from_slice(&0u32.to_be_bytes());
    }
    packet.extend_from_slice(&ppp_protocol.to_be_bytes());
    packet.extend_from_slice(payload);
    packet
}

/// Links `headers` (type, bytes) into one chain: each header's first byte is set to the type
/// of the next, the last one's to `last_next`. Returns the first type and the bytes.
pub fn chain(headers: &[(u8, Vec<u8>)], last_next: u8) -> (u8, Vec<u8>) {
    let mut bytes = Vec::new();
    for (index, (_, header)) in headers.iter().enumerate() {
        let mut header = header.clone();
        header[0] = headers.get(index + 1).map_or(last_next, |(kind, _)| *kind);
        bytes.extend_from_slice(&header);
    }
    let first = headers.first().map_or(last_next, |(kind, _)| *kind);
    (first, bytes)
}

/// An Ethernet frame to `dst_mac` (from [`SRC_MAC`]) carrying a TCP segment from `src` to
/// `dst`, either family, on the VLAN stack `tags`.
pub fn segment_frame(
    dst_mac: [u8; 6],
    tags: &[Tag],
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    sport: u16,
    dport: u16,
    flags: u8,
) -> Vec<u8> {
    use std::net::IpAddr;
    match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let segment = tcp(sport, dport, flags, &[], &[], &Pseudo::V4(src, dst));
            let packet = ipv4(src, dst, IPPROTO_TCP, &[], IPV4_DF, &segment);
            ethernet(dst_mac, SRC_MAC, tags, ETH_P_IPV4, &packet)
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let segment = tcp(sport, dport, flags, &[], &[], &Pseudo::V6(src, dst));
            let packet = ipv6(src, dst, IPPROTO_TCP, &[], &segment);
            ethernet(dst_mac, SRC_MAC, tags, ETH_P_IPV6, &packet)
        }
        _ => panic!("{src} and {dst} are of different families"),
    }
}

/// An Ethernet frame carrying an IPv4 TCP segment.
pub fn tcp4(tags: &[Tag], src: Ipv4Addr, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let segment = tcp(40000, dport, flags, &[], &[], &Pseudo::V4(src, dst));
    ethernet(
        DST_MAC,
        SRC_MAC,
        tags,
        ETH_P_IPV4,
        &ipv4(src, dst, IPPROTO_TCP, &[], IPV4_DF, &segment),
    )
}

/// An Ethernet frame carrying an IPv6 TCP segment.
pub fn tcp6(tags: &[Tag], src: Ipv6Addr, dst: Ipv6Addr, dport: u16, flags: u8) -> Vec<u8> {
    let segment = tcp(40000, dport, flags, &[], &[], &Pseudo::V6(src, dst));
    ethernet(
        DST_MAC,
        SRC_MAC,
        tags,
        ETH_P_IPV6,
        &ipv6(src, dst, IPPROTO_TCP, &[], &segment),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_checksum_verifies() {
        let packet = ipv4(
            Ipv4Addr::new(192, 0, 2, 1),
            Ipv4Addr::new(198, 51, 100, 1),
            IPPROTO_TCP,
            &[1, 1, 1, 1],
            0,
            &[],
        );
        assert_eq!(internet_checksum(&packet[..24]), 0);
        assert_eq!(packet[0], 0x46);
    }

    #[test]
    fn chain_links_next_header_fields() {
        let (first, bytes) = chain(
            &[
                (IPPROTO_HOPOPTS, ext_header(0, 0)),
                (IPPROTO_FRAGMENT, fragment_header(0, 0, true)),
            ],
            IPPROTO_TCP,
        );
        assert_eq!(first, IPPROTO_HOPOPTS);
        assert_eq!(bytes[0], IPPROTO_FRAGMENT);
        assert_eq!(bytes[8], IPPROTO_TCP);
        assert_eq!(bytes.len(), 16);
    }
}
