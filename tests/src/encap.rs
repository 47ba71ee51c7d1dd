//! Encapsulations the kernel can take apart, built byte by byte for the parser tests: IP in
//! IP (IPIP, 6in4, IPv6-in-IPv6, IPv4-in-IPv6), GRE with its optional fields (carrying IP or
//! Ethernet), PPTP's enhanced GRE carrying PPP, PPPoE sessions and MPLS label stacks.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::frames::{ETH_P_IPV4, ETH_P_IPV6, IPV4_DF, ipv4, ipv6};

pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_GRE: u8 = 47;
pub const ETH_P_TEB: u16 = 0x6558;
pub const ETH_P_PPP: u16 = 0x880b;
pub const ETH_P_PPPOE_SESSION: u16 = 0x8864;
pub const ETH_P_MPLS_UC: u16 = 0x8847;
pub const PPP_IPV4: u16 = 0x0021;
pub const PPP_IPV6: u16 = 0x0057;

/// The outer (tunnel) endpoints: an allowed-looking source, so only the inner one can be
/// what decides.
pub const OUTER4_SRC: Ipv4Addr = Ipv4Addr::new(89, 16, 184, 146);
pub const OUTER4_DST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 25);
pub const OUTER6_SRC: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x25, 0, 0, 0, 0, 0x46);
pub const OUTER6_DST: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 25);

/// `inner` (an IPv4 or IPv6 packet) in an outer IPv4 header with `protocol`.
pub fn in_ipv4(protocol: u8, inner: &[u8]) -> Vec<u8> {
    ipv4(OUTER4_SRC, OUTER4_DST, protocol, &[], IPV4_DF, inner)
}

/// `inner` in an outer IPv6 header whose next header is `protocol`.
pub fn in_ipv6(protocol: u8, inner: &[u8]) -> Vec<u8> {
    ipv6(OUTER6_SRC, OUTER6_DST, protocol, &[], inner)
}

/// Which optional GRE fields are present.
#[derive(Clone, Copy, Debug, Default)]
pub struct GreFields {
    pub checksum: bool,
    pub key: bool,
    pub sequence: bool,
}

/// A version-0 GRE header carrying `proto`, followed by `payload`.
pub fn gre(fields: GreFields, proto: u16, payload: &[u8]) -> Vec<u8> {
    let mut flags = 0u16;
    if fields.checksum {
        flags |= 0x8000;
    }
    if fields.key {
        flags |= 0x2000;
    }
    if fields.sequence {
        flags |= 0x1000;
    }
    let mut header = flags.to_be_bytes().to_vec();
    header.extend_from_slice(&proto.to_be_bytes());
    if fields.checksum {
        header.extend_from_slice(&[0, 0, 0, 0]);
    }
    if fields.key {
        header.extend_from_slice(&0x0000_2a2au32.to_be_bytes());
    }
    if fields.sequence {
        header.extend_from_slice(&7u32.to_be_bytes());
    }
    header.extend_from_slice(payload);
    header
}

/// A GRE header with raw `flags_version` (for versions and flags Linux refuses).
pub fn gre_raw(flags_version: u16, proto: u16, payload: &[u8]) -> Vec<u8> {
    let mut header = flags_version.to_be_bytes().to_vec();
    header.extend_from_slice(&proto.to_be_bytes());
    header.extend_from_slice(payload);
    header
}

/// PPTP's enhanced GRE (version 1, key always present) carrying the PPP frame `ppp`, with
/// the sequence and acknowledgement numbers present as asked.
pub fn pptp(sequence: bool, acknowledgement: bool, ppp: &[u8]) -> Vec<u8> {
    let mut flags = 0x2001u16;
    if sequence {
        flags |= 0x1000;
    }
    if acknowledgement {
        flags |= 0x0080;
    }
    let mut header = flags.to_be_bytes().to_vec();
    header.extend_from_slice(&ETH_P_PPP.to_be_bytes());
    header.extend_from_slice(&(ppp.len() as u16).to_be_bytes());
    header.extend_from_slice(&0x0101u16.to_be_bytes());
    if sequence {
        header.extend_from_slice(&3u32.to_be_bytes());
    }
    if acknowledgement {
        header.extend_from_slice(&2u32.to_be_bytes());
    }
    header.extend_from_slice(ppp);
    header
}

/// A PPP frame: address and control bytes unless compressed (`acfc`), the protocol in one
/// byte where compressed (`pfc`) and possible, then `payload`.
pub fn ppp(acfc: bool, pfc: bool, protocol: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    if !acfc {
        frame.extend_from_slice(&[0xff, 0x03]);
    }
    if pfc && protocol < 0x100 {
        frame.push(protocol as u8);
    } else {
        frame.extend_from_slice(&protocol.to_be_bytes());
    }
    frame.extend_from_slice(payload);
    frame
}

/// A PPPoE session header (version 1, type 1, session 0x1234) and a PPP frame (as PPPoE
/// sends it: no address and control bytes, a two-byte protocol).
pub fn pppoe(protocol: u16, payload: &[u8]) -> Vec<u8> {
    let body = ppp(true, false, protocol, payload);
    let mut frame = vec![0x11, 0x00, 0x12, 0x34];
    frame.extend_from_slice(&(body.len() as u16).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// An MPLS label stack, bottom of stack on the last label, followed by `payload`.
pub fn mpls(labels: &[u32], payload: &[u8]) -> Vec<u8> {
    let mut stack = Vec::new();
    for (index, label) in labels.iter().enumerate() {
        let bottom = u32::from(index + 1 == labels.len());
        stack.extend_from_slice(&((label << 12) | (bottom << 8) | 64).to_be_bytes());
    }
    stack.extend_from_slice(payload);
    stack
}

/// The ethertype an IP packet travels under.
pub fn ethertype_of(packet: &[u8]) -> u16 {
    if packet[0] >> 4 == 6 {
        ETH_P_IPV6
    } else {
        ETH_P_IPV4
    }
}
