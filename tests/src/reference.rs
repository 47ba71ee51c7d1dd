//! An independent classifier for differential fuzzing: what the XDP program must decide for a
//! frame, written from the specification in the README, with the headers decoded by
//! etherparse (a well-kept packet parser) rather than by the program's own parser.
//!
//! The specification, in short: Ethernet with up to two VLAN tags; IPv4 (any IHL) or IPv6
//! (up to 8 extension headers: hop-by-hop, routing, destination options, AH, fragment; no
//! header read past 4 KiB). A TCP segment with SYN set and ACK clear to a guarded port is
//! decided by its source (longest prefix: allow passes, deny and unlisted drop). A packet that
//! might be such a SYN but whose TCP header is out of sight (a first fragment that stops
//! early, a chain too long, a header past the frame that the IP length says is there) is
//! decided by its source as if it were one; a port that is in sight still counts. Anything the
//! kernel would drop as malformed is passed; later fragments are passed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{
    Ethernet2HeaderSlice, IpAuthHeaderSlice, Ipv4HeaderSlice, Ipv6FragmentHeaderSlice,
    Ipv6HeaderSlice, Ipv6RawExtHeaderSlice, SingleVlanHeaderSlice, TcpHeaderSlice,
};
use smtpguard::policy::{Policy, Verdict};

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const TCP: u8 = 6;
const HOPOPTS: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const AH: u8 = 51;
const DSTOPTS: u8 = 60;
const MAX_EXT_HEADERS: usize = 8;
const MAX_HEADER_OFFSET: usize = 4096;

/// The verdict the specification gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expected {
    Pass,
    Drop,
}

/// What the frame is, as far as the policy is concerned.
enum Sight {
    /// Not a guarded SYN, or not parseable: passed.
    Pass,
    /// A possible SYN from `src`, to `port` if the port is in sight.
    Syn { src: IpAddr, port: Option<u16> },
}

pub fn classify(frame: &[u8], policy: &Policy) -> Expected {
    match sight(frame) {
        Sight::Pass => Expected::Pass,
        Sight::Syn { src, port } => {
            if let Some(port) = port
                && !policy.ports.contains(&port)
            {
                return Expected::Pass;
            }
            // The port check is done: ask with a guarded port.
            let guarded = *policy.ports.iter().next().expect("a guarded port");
            match policy.verdict(src, guarded) {
                Verdict::Allowed(..) | Verdict::NotGuarded => Expected::Pass,
                Verdict::Denied(..) | Verdict::Unlisted => Expected::Drop,
            }
        }
    }
}

fn sight(frame: &[u8]) -> Sight {
    let Ok(ethernet) = Ethernet2HeaderSlice::from_slice(frame) else {
        return Sight::Pass;
    };
    let mut ether_type = ethernet.ether_type().0;
    let mut offset = ethernet.slice().len();
    for _ in 0..2 {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let Ok(vlan) = SingleVlanHeaderSlice::from_slice(&frame[offset..]) else {
            return Sight::Pass;
        };
        ether_type = vlan.ether_type().0;
        offset += vlan.slice().len();
    }
    match ether_type {
        ETH_P_IPV4 => ipv4(frame, offset),
        ETH_P_IPV6 => ipv6(frame, offset),
        _ => Sight::Pass,
    }
}

fn ipv4(frame: &[u8], offset: usize) -> Sight {
    let packet = &frame[offset..];
    if packet.len() < 20 {
        return Sight::Pass;
    }
    let (src, ihl, total, protocol, fragment_offset, more_fragments) =
        match Ipv4HeaderSlice::from_slice(packet) {
            Ok(header) => (
                header.source_addr(),
                usize::from(header.ihl()) * 4,
                usize::from(header.total_len()),
                header.protocol().0,
                header.fragments_offset().value(),
                header.more_fragments(),
            ),
            // The fixed 20 bytes are there but the options run past the frame: etherparse
            // refuses, the fields the specification needs are in the fixed part.
            Err(etherparse::err::ipv4::HeaderSliceError::Len(_)) => {
                let fixed = |at: usize| u16::from_be_bytes([packet[at], packet[at + 1]]);
                if packet[0] >> 4 != 4 || usize::from(packet[0] & 15) * 4 < 20 {
                    return Sight::Pass;
                }
                (
                    Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]),
                    usize::from(packet[0] & 15) * 4,
                    usize::from(fixed(2)),
                    packet[9],
                    fixed(6) & 0x1fff,
                    fixed(6) & 0x2000 != 0,
                )
            }
            // Bad version, IHL below 5, total length below the header: malformed.
            Err(_) => return Sight::Pass,
        };
    if total < ihl {
        return Sight::Pass;
    }
    if protocol != TCP || fragment_offset != 0 {
        return Sight::Pass;
    }
    tcp(
        frame,
        offset + ihl,
        total - ihl,
        more_fragments,
        IpAddr::V4(src),
    )
}

fn ipv6(frame: &[u8], offset: usize) -> Sight {
    let Ok(header) = Ipv6HeaderSlice::from_slice(&frame[offset..]) else {
        // etherparse checks the version and the 40 bytes: either failing is malformed.
        return Sight::Pass;
    };
    let src = IpAddr::V6(Ipv6Addr::from(header.source()));
    let mut cursor = offset + 40;
    let payload_end = match header.payload_length() {
        0 => usize::MAX,
        length => cursor + usize::from(length),
    };
    let mut next = header.next_header().0;
    let mut fragmented = false;
    for _ in 0..MAX_EXT_HEADERS {
        let rest = frame.get(cursor..).unwrap_or_default();
        let length = match next {
            TCP => return tcp6(frame, cursor, payload_end, fragmented, src),
            HOPOPTS | ROUTING | DSTOPTS => match Ipv6RawExtHeaderSlice::from_slice(rest) {
                Ok(ext) => {
                    next = ext.next_header().0;
                    ext.slice().len()
                }
                Err(_) if rest.len() < 2 => {
                    return out_of_sight(cursor, payload_end, fragmented, src);
                }
                // Only the first two bytes are needed to follow the chain.
                Err(_) => {
                    next = rest[0];
                    (usize::from(rest[1]) + 1) * 8
                }
            },
            AH => match IpAuthHeaderSlice::from_slice(rest) {
                Ok(ah) => {
                    next = ah.next_header().0;
                    ah.slice().len()
                }
                Err(_) if rest.len() < 2 => {
                    return out_of_sight(cursor, payload_end, fragmented, src);
                }
                Err(_) => {
                    next = rest[0];
                    (usize::from(rest[1]) + 2) * 4
                }
            },
            FRAGMENT => {
                let Ok(fragment) = Ipv6FragmentHeaderSlice::from_slice(rest) else {
                    return out_of_sight(cursor, payload_end, fragmented, src);
                };
                if fragment.fragment_offset().value() != 0 {
                    return Sight::Pass;
                }
                fragmented = fragment.more_fragments();
                next = fragment.next_header().0;
                8
            }
            _ => return Sight::Pass,
        };
        cursor += length;
        if cursor > MAX_HEADER_OFFSET {
            return Sight::Syn { src, port: None };
        }
    }
    match next {
        TCP => tcp6(frame, cursor, payload_end, fragmented, src),
        HOPOPTS | ROUTING | DSTOPTS | AH | FRAGMENT => Sight::Syn { src, port: None },
        _ => Sight::Pass,
    }
}

fn tcp6(frame: &[u8], cursor: usize, payload_end: usize, fragmented: bool, src: IpAddr) -> Sight {
    match payload_end.checked_sub(cursor) {
        Some(l4_len) => tcp(frame, cursor, l4_len, fragmented, src),
        None => out_of_sight(cursor, payload_end, fragmented, src),
    }
}

/// A header the frame does not hold: decided by source if the IP layer says it is there or
/// a later fragment brings it, malformed otherwise.
fn out_of_sight(cursor: usize, payload_end: usize, fragmented: bool, src: IpAddr) -> Sight {
    if cursor < payload_end || fragmented {
        Sight::Syn { src, port: None }
    } else {
        Sight::Pass
    }
}

/// The TCP header at `offset`, of which the IP layer says `l4_len` bytes exist.
fn tcp(frame: &[u8], offset: usize, l4_len: usize, first_fragment: bool, src: IpAddr) -> Sight {
    let rest = frame.get(offset..).unwrap_or_default();
    // Ports, sequence numbers, offset and flags: the first 14 bytes decide.
    if l4_len >= 14 {
        if rest.len() < 14 {
            return Sight::Syn { src, port: None };
        }
        if !first_fragment && l4_len < 20 {
            return Sight::Pass;
        }
        let (port, flags) = match TcpHeaderSlice::from_slice(rest) {
            Ok(header) => (
                header.destination_port(),
                u8::from(header.syn()) << 1 | u8::from(header.ack()) << 4,
            ),
            // Options past the frame, or a bad data offset: the 14 bytes still say it.
            Err(_) => (u16::from_be_bytes([rest[2], rest[3]]), rest[13]),
        };
        return if flags & 0x12 == 0x02 {
            Sight::Syn {
                src,
                port: Some(port),
            }
        } else {
            Sight::Pass
        };
    }
    if !first_fragment {
        return Sight::Pass;
    }
    let port = (l4_len >= 4 && rest.len() >= 4).then(|| u16::from_be_bytes([rest[2], rest[3]]));
    Sight::Syn { src, port }
}
