//! Tunnel wrappers for the parser tests, on top of the builders in [`crate::frames`]: an IP
//! packet inside an outer IPv4 or IPv6 header (IPIP, 6in4, IPv6-in-IPv6, IPv4-in-IPv6, GRE
//! over either), GRE headers with raw flags, and PPP frames with the address, control and
//! protocol fields compressed or not, inside PPTP's enhanced GRE.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::frames::{ETH_P_IPV4, ETH_P_IPV6, ETH_P_PPP_GRE, IPV4_DF, ipv4, ipv6};

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

/// A GRE header with raw `flags_version` (for versions and flags Linux refuses).
pub fn gre_raw(flags_version: u16, proto: u16, payload: &[u8]) -> Vec<u8> {
    let mut header = flags_version.to_be_bytes().to_vec();
    header.extend_from_slice(&proto.to_be_bytes());
    header.extend_from_slice(payload);
    header
}

/// PPTP's enhanced GRE (version 1, key always present) carrying the PPP frame `ppp` as given,
/// with the sequence and acknowledgement numbers present as asked.
pub fn pptp(sequence: bool, acknowledgement: bool, ppp: &[u8]) -> Vec<u8> {
    let mut flags = 0x2001u16;
    if sequence {
        flags |= 0x1000;
    }
    if acknowledgement {
        flags |= 0x0080;
    }
    let mut header = flags.to_be_bytes().to_vec();
    header.extend_from_slice(&ETH_P_PPP_GRE.to_be_bytes());
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

/// The ethertype an IP packet travels under.
pub fn ethertype_of(packet: &[u8]) -> u16 {
    if packet[0] >> 4 == 6 {
        ETH_P_IPV6
    } else {
        ETH_P_IPV4
    }
}
