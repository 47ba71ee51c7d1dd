//! The seeded frame generator the differential fuzzer and the kernel oracle share: random
//! frames built from parts, then sometimes mutated. Reproducible: the same seed gives the same
//! frames, in the same order.
//!
//! Parts: destination MACs of this host, of another host, broadcast and multicast; VLAN stacks
//! of 0 to 20 tags mixing 0x8100, 0x88a8 and 0x9100, mostly VID 0; PPPoE and MPLS; IPv4 with
//! options and fragments (first fragments cut anywhere in the TCP header, later fragments, and
//! pairs that reassemble into a whole segment); IPv6 extension chains (hop-by-hop, routing,
//! fragment, destination options, AH) of up to 18 headers; IP in IP, 6in4, 4in6, IPv6 in IPv6
//! and GRE (checksum, key, sequence; IPv4, IPv6 or Ethernet inside; the routing bit, version 1
//! PPP, unknown payloads), up to three deep; every TCP flag combination, options, data; sources
//! inside and around the policy's nested prefixes, random and special ones. Checksums are
//! correct but for a small share. Mutations: cuts, byte flips, padding, rewritten lengths.

use std::{
    collections::VecDeque,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::{bench::Rng, frames};

/// The host the frames are meant for, and the neighbour they come from.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub server_mac: [u8; 6],
    pub client_mac: [u8; 6],
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

/// A frame generator: an endless, reproducible sequence of frames.
pub struct Generator {
    rng: Rng,
    target: Target,
    /// Frames built together (the second fragment of a pair) and not yet handed out.
    queue: VecDeque<Vec<u8>>,
    serial: u32,
}

/// Sources inside and around the nested prefixes of [`crate::fuzz::POLICY`].
const SOURCES_V4: [[u8; 4]; 22] = [
    [192, 0, 2, 100],
    [10, 1, 2, 200],
    [203, 0, 113, 7],
    [10, 1, 3, 77],
    [192, 0, 2, 10],
    [192, 0, 2, 77],
    [192, 0, 2, 130],
    [192, 0, 2, 191],
    [192, 0, 2, 192],
    [192, 0, 2, 255],
    [192, 0, 3, 1],
    [198, 51, 100, 127],
    [198, 51, 100, 128],
    [10, 1, 2, 3],
    [10, 1, 3, 3],
    [10, 9, 9, 9],
    [10, 255, 255, 255],
    [9, 255, 255, 255],
    [11, 0, 0, 1],
    [203, 0, 113, 7],
    [198, 18, 0, 1],
    [100, 64, 0, 1],
];

const SOURCES_V6: [u128; 10] = [
    0x2001_0db8_0025_00ff_0000_0000_0000_0001,
    0x2001_0db8_0025_0001_0000_0000_0000_0001,
    0x2001_0db8_0025_0bad_0000_0000_0000_0001,
    0x2001_0db8_0025_0bad_0000_0000_0000_0025,
    0x2001_0db8_0025_0bad_ffff_ffff_ffff_ffff,
    0x2001_0db8_0026_0000_0000_0000_0000_0001,
    0x2001_0db8_0024_ffff_ffff_ffff_ffff_ffff,
    0x2001_0db8_0100_0000_0000_0000_0000_0077,
    0x2001_0db8_0200_0000_0000_0000_0000_0010,
    0x2a00_1450_4001_0800_0000_0000_0000_200e,
];

/// Addresses no SYN may come from or go to: unspecified, loopback, broadcast, multicast,
/// reserved.
const SPECIAL_V4: [[u8; 4]; 6] = [
    [0, 0, 0, 0],
    [127, 0, 0, 1],
    [255, 255, 255, 255],
    [224, 0, 0, 1],
    [240, 0, 0, 1],
    [0, 1, 2, 3],
];

const SPECIAL_V6: [u128; 6] = [
    0,
    1,
    0xff02_0000_0000_0000_0000_0000_0000_0001,
    0x0000_0000_0000_0000_0000_ffff_c000_020a,
    0xfe80_0000_0000_0000_0000_0000_0000_0001,
    0xff05_0000_0000_0000_0000_0000_0001_0003,
];

const OTHER_MACS: [[u8; 6]; 5] = [
    [0x02, 0x00, 0x00, 0x00, 0x00, 0x99],
    [0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    [0x01, 0x00, 0x5e, 0x00, 0x00, 0x01],
    [0x33, 0x33, 0x00, 0x00, 0x00, 0x01],
    [0x01, 0x80, 0xc2, 0x00, 0x00, 0x00],
];

const TPIDS: [u16; 3] = [
    frames::ETH_P_8021Q,
    frames::ETH_P_8021AD,
    frames::ETH_P_QINQ,
];

/// An IP packet and the ethertype that announces it.
struct Packet {
    ether_type: u16,
    bytes: Vec<u8>,
}

impl Generator {
    pub fn new(seed: u64, target: Target) -> Self {
        Self {
            rng: Rng::new(seed),
            target,
            queue: VecDeque::new(),
            serial: 0,
        }
    }

    /// The next frame.
    pub fn next_frame(&mut self) -> Vec<u8> {
        if let Some(frame) = self.queue.pop_front() {
            return frame;
        }
        let mut frames = self.build().into_iter();
        let first = frames.next().expect("at least one frame");
        let first = self.mutate(first);
        self.queue.extend(frames);
        first
    }

    fn below(&mut self, n: u64) -> u64 {
        self.rng.below(n)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.rng.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.rng.below(items.len() as u64) as usize]
    }

    /// One frame, or two fragments that reassemble into one packet.
    fn build(&mut self) -> Vec<Vec<u8>> {
        self.serial = self.serial.wrapping_add(1);
        let v6 = self.chance(45);
        let (src, dst) = self.addresses(v6);
        let (protocol, segment) = self.transport(src, dst);
        let packets = self.ip_packets(src, dst, protocol, &segment);
        let packets = if packets.len() == 1 {
            let mut packet = packets.into_iter().next().expect("one packet");
            for _ in 0..self.pick(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3]) {
                packet = self.tunnel(packet);
            }
            vec![packet]
        } else {
            packets
        };
        let dst_mac = if self.chance(88) {
            self.target.server_mac
        } else {
            self.pick(&OTHER_MACS)
        };
        let src_mac = if self.chance(96) {
            self.target.client_mac
        } else {
            self.pick(&[[0x01, 0x00, 0x5e, 0, 0, 0xfb], [0xff; 6], [0; 6]])
        };
        let tags = self.tags();
        let link = self.link_layer();
        packets
            .into_iter()
            .map(|packet| {
                let (ether_type, payload) = self.encapsulate(link, packet);
                ethernet(dst_mac, src_mac, &tags, ether_type, &payload)
            })
            .collect()
    }

    fn addresses(&mut self, v6: bool) -> (IpAddr, IpAddr) {
        if v6 {
            let src = self.source_v6();
            let dst = if self.chance(88) {
                self.target.v6
            } else {
                let other = self.pick(&[
                    0x2001_0db8_0100_0000_0000_0000_0000_0002,
                    0x0000_0000_0000_0000_0000_ffff_c633_6401,
                ]);
                let special = self.pick(&SPECIAL_V6);
                Ipv6Addr::from(self.pick(&[other, special]))
            };
            (src.into(), dst.into())
        } else {
            let src = self.source_v4();
            let dst = if self.chance(88) {
                self.target.v4
            } else {
                let other = self.pick(&[[198, 51, 100, 2], [198, 51, 100, 255]]);
                let special = self.pick(&SPECIAL_V4);
                Ipv4Addr::from(self.pick(&[other, special]))
            };
            (src.into(), dst.into())
        }
    }

    fn source_v4(&mut self) -> Ipv4Addr {
        match self.below(100) {
            0..60 => Ipv4Addr::from(self.pick(&SOURCES_V4)),
            60..93 => Ipv4Addr::from(self.rng.next_u64() as u32),
            93..97 => Ipv4Addr::from(self.pick(&SPECIAL_V4)),
            _ => self.target.v4,
        }
    }

    fn source_v6(&mut self) -> Ipv6Addr {
        match self.below(100) {
            0..60 => Ipv6Addr::from(self.pick(&SOURCES_V6)),
            60..93 => Ipv6Addr::from(
                0x2000_0000_0000_0000_0000_0000_0000_0000
                    | (u128::from(self.rng.next_u64()) << 64 | u128::from(self.rng.next_u64()))
                        >> 3,
            ),
            93..97 => Ipv6Addr::from(self.pick(&SPECIAL_V6)),
            _ => self.target.v6,
        }
    }

    /// A TCP segment (or, sometimes, a UDP datagram) from `src` to `dst`.
    fn transport(&mut self, src: IpAddr, dst: IpAddr) -> (u8, Vec<u8>) {
        let pseudo = pseudo(src, dst);
        let dport = self.pick(&[25, 25, 25, 25, 2525, 2525, 587, 0]);
        let dport = if dport == 0 {
            self.below(65536) as u16
        } else {
            dport
        };
        let sport = 1024 + self.below(64512) as u16;
        if self.chance(4) {
            let mut datagram = Vec::from(sport.to_be_bytes());
            datagram.extend_from_slice(&dport.to_be_bytes());
            datagram.extend_from_slice(&[0, 12, 0, 0, b'h', b'e', b'l', b'o']);
            let sum = pseudo.checksum(frames::IPPROTO_UDP, &datagram);
            datagram[6..8].copy_from_slice(&sum.to_be_bytes());
            return (frames::IPPROTO_UDP, datagram);
        }
        use frames::{ACK, CWR, ECE, FIN, RST, SYN};
        let flags = match self.below(100) {
            0..50 => SYN,
            50..58 => SYN | ECE | CWR,
            58..62 => SYN | FIN,
            62..66 => SYN | RST,
            66..72 => SYN | ACK,
            72..76 => ACK,
            _ => self.below(256) as u8,
        };
        let options: Vec<u8> = match self.below(10) {
            0..4 => Vec::new(),
            4 => vec![2, 4, 0x05, 0xb4],
            5 | 6 => vec![
                2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
            ],
            // A TCP Fast Open cookie.
            7 => vec![34, 10, 1, 2, 3, 4, 5, 6, 7, 8],
            _ => (0..self.below(41)).map(|_| self.below(256) as u8).collect(),
        };
        let data: Vec<u8> = if self.chance(20) {
            (0..1 + self.below(40)).map(|at| at as u8).collect()
        } else {
            Vec::new()
        };
        let seq = self.rng.next_u64() as u32;
        let mut segment = frames::tcp_seq(sport, dport, seq, flags, &options, &data, &pseudo);
        if self.chance(4) {
            // Any data offset, consistent or not.
            segment[12] = (self.below(16) as u8) << 4;
            segment[16..18].copy_from_slice(&[0, 0]);
            let sum = pseudo.checksum(frames::IPPROTO_TCP, &segment);
            segment[16..18].copy_from_slice(&sum.to_be_bytes());
        }
        if self.chance(3) {
            segment[17] ^= 0x5a;
        }
        (frames::IPPROTO_TCP, segment)
    }

    /// The IP packet carrying `payload`, or two fragments of it.
    fn ip_packets(
        &mut self,
        src: IpAddr,
        dst: IpAddr,
        protocol: u8,
        payload: &[u8],
    ) -> Vec<Packet> {
        match (src, dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => self.ipv4_packets(src, dst, protocol, payload),
            (IpAddr::V6(src), IpAddr::V6(dst)) => self.ipv6_packets(src, dst, protocol, payload),
            _ => unreachable!("one family"),
        }
    }

    fn ipv4_packets(
        &mut self,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        protocol: u8,
        payload: &[u8],
    ) -> Vec<Packet> {
        let options: Vec<u8> = match self.below(10) {
            0..7 => Vec::new(),
            7 => vec![1; 4],
            8 => vec![1; 8],
            _ => vec![1; 40],
        };
        let id = self.serial as u16;
        let packet = |frag: u16, payload: &[u8]| Packet {
            ether_type: frames::ETH_P_IPV4,
            bytes: frames::ipv4_id(src, dst, protocol, &options, frag, id, payload),
        };
        let mut packets = match self.below(100) {
            // Two fragments, the first not a multiple of 8 and showing decoy TCP flags past
            // the multiple: the kernel keeps the first's rounded part and takes the rest,
            // the real flags, from the second.
            0..4 if payload.len() > 16 => {
                let cut = 9 + self.below(7) as usize;
                let mut first = payload[..cut].to_vec();
                if cut > 13 {
                    first[13] = frames::ACK;
                }
                let units = cut / 8;
                vec![
                    packet(frames::IPV4_MF, &first),
                    packet(units as u16, &payload[8 * units..]),
                ]
            }
            0..70 => vec![packet(frames::IPV4_DF, payload)],
            70..80 => vec![packet(0, payload)],
            // A lone first fragment, cut anywhere in (or after) the TCP header.
            80..86 => {
                let cut = self.below(payload.len().min(44) as u64 + 1) as usize;
                vec![packet(frames::IPV4_MF, &payload[..cut])]
            }
            // Two fragments that reassemble into the whole segment.
            86..92 if payload.len() > 8 => {
                let units = 1 + self.below(((payload.len() - 1) / 8).min(3) as u64) as usize;
                vec![
                    packet(frames::IPV4_MF, &payload[..8 * units]),
                    packet(units as u16, &payload[8 * units..]),
                ]
            }
            // A later fragment on its own.
            86..97 => {
                let offset = 1 + self.below(0x1ffe) as u16;
                let more = if self.chance(50) { frames::IPV4_MF } else { 0 };
                vec![packet(offset | more, payload)]
            }
            _ => vec![packet(frames::IPV4_MF, payload)],
        };
        if self.chance(1) {
            // A broken header checksum: the kernel drops it.
            packets[0].bytes[11] ^= 0x0f;
        }
        packets
    }

    fn ipv6_packets(
        &mut self,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        protocol: u8,
        payload: &[u8],
    ) -> Vec<Packet> {
        let id = self.serial;
        if payload.len() > 8 && self.chance(6) {
            // Two fragments that reassemble into the whole segment.
            let units = 1 + self.below(((payload.len() - 1) / 8).min(3) as u64) as usize;
            return [
                (0, true, &payload[..8 * units]),
                (units as u16, false, &payload[8 * units..]),
            ]
            .into_iter()
            .map(|(offset, more, part)| {
                let header = frames::fragment_header_id(protocol, offset, more, id);
                Packet {
                    ether_type: frames::ETH_P_IPV6,
                    bytes: frames::ipv6(src, dst, frames::IPPROTO_FRAGMENT, &header, part),
                }
            })
            .collect();
        }
        let count = match self.below(100) {
            0..60 => 0,
            60..75 => 1,
            75..85 => 2,
            85..92 => 3 + self.below(4) as usize,
            92..97 => 7 + self.below(4) as usize,
            _ => 15 + self.below(4) as usize,
        };
        let headers: Vec<(u8, Vec<u8>)> = (0..count)
            .map(|index| self.extension_header(index))
            .collect();
        let (first, chain) = frames::chain(&headers, protocol);
        let mut payload = payload.to_vec();
        if headers
            .iter()
            .any(|(kind, header)| *kind == frames::IPPROTO_FRAGMENT && header[3] & 1 != 0)
            && self.chance(50)
        {
            // A first fragment that stops anywhere in the TCP header.
            payload.truncate(self.below(payload.len().min(24) as u64 + 1) as usize);
        }
        vec![Packet {
            ether_type: frames::ETH_P_IPV6,
            bytes: frames::ipv6(src, dst, first, &chain, &payload),
        }]
    }

    /// One extension header; hop-by-hop mostly first, where receivers want it.
    fn extension_header(&mut self, index: usize) -> (u8, Vec<u8>) {
        let kind = if index == 0 && self.chance(40) {
            0
        } else {
            1 + self.below(5)
        };
        match kind {
            0 => (
                frames::IPPROTO_HOPOPTS,
                frames::ext_header(0, self.below(3) as u8),
            ),
            1 => (
                frames::IPPROTO_ROUTING,
                frames::routing_header(0, self.below(3) as u8),
            ),
            2 => (
                frames::IPPROTO_DSTOPTS,
                frames::ext_header(0, self.pick(&[0, 0, 1, 5])),
            ),
            3 => (
                frames::IPPROTO_AH,
                frames::ah_header(0, 1 + self.below(3) as u8),
            ),
            _ => {
                let offset = if self.chance(15) {
                    1 + self.below(8191) as u16
                } else {
                    0
                };
                let more = self.chance(30);
                (
                    frames::IPPROTO_FRAGMENT,
                    frames::fragment_header_id(0, offset, more, self.serial),
                )
            }
        }
    }

    /// `inner` carried one tunnel deeper: IP in IP, GRE (of any kind) over IPv4 or IPv6.
    fn tunnel(&mut self, inner: Packet) -> Packet {
        let (protocol, payload) = match self.below(100) {
            0..45 => {
                let protocol = if inner.ether_type == frames::ETH_P_IPV4 {
                    frames::IPPROTO_IPIP
                } else {
                    frames::IPPROTO_IPV6
                };
                (protocol, inner.bytes)
            }
            45..70 => {
                let fields = self.gre_fields();
                (
                    frames::IPPROTO_GRE,
                    frames::gre(fields, inner.ether_type, &inner.bytes),
                )
            }
            70..85 => {
                let tags = self.tags();
                let mac = self.target.server_mac;
                let frame = ethernet(
                    mac,
                    [2, 0, 0, 0, 0, 7],
                    &tags,
                    inner.ether_type,
                    &inner.bytes,
                );
                let fields = self.gre_fields();
                (
                    frames::IPPROTO_GRE,
                    frames::gre(fields, frames::ETH_P_TEB, &frame),
                )
            }
            85..93 => {
                let ppp = if inner.ether_type == frames::ETH_P_IPV4 {
                    frames::PPP_IPV4
                } else {
                    frames::PPP_IPV6
                };
                let (sequence, ack) = (self.chance(50), self.chance(50));
                (
                    frames::IPPROTO_GRE,
                    frames::gre_ppp(sequence, ack, ppp, &inner.bytes),
                )
            }
            93..97 => {
                let fields = frames::GreFields {
                    routing: true,
                    ..self.gre_fields()
                };
                (
                    frames::IPPROTO_GRE,
                    frames::gre(fields, inner.ether_type, &inner.bytes),
                )
            }
            _ => {
                let mut packet = frames::gre(self.gre_fields(), 0x88be, &inner.bytes);
                // An unknown version or payload type.
                packet[1] |= self.pick(&[0, 2, 3, 7]);
                (frames::IPPROTO_GRE, packet)
            }
        };
        let v6 = self.chance(40);
        let (src, dst) = self.addresses(v6);
        match (src, dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => Packet {
                ether_type: frames::ETH_P_IPV4,
                bytes: frames::ipv4_id(
                    src,
                    dst,
                    protocol,
                    &[],
                    frames::IPV4_DF,
                    self.serial as u16,
                    &payload,
                ),
            },
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let headers: Vec<(u8, Vec<u8>)> = (0..self.pick(&[0, 0, 0, 1, 2]))
                    .map(|index| self.extension_header(index))
                    .collect();
                let (first, chain) = frames::chain(&headers, protocol);
                Packet {
                    ether_type: frames::ETH_P_IPV6,
                    bytes: frames::ipv6(src, dst, first, &chain, &payload),
                }
            }
            _ => unreachable!("one family"),
        }
    }

    fn gre_fields(&mut self) -> frames::GreFields {
        frames::GreFields {
            checksum: self.chance(30),
            key: self.chance(30),
            sequence: self.chance(30),
            routing: false,
        }
    }

    /// A VLAN stack: mostly none, sometimes a few, now and then more than the filter follows.
    fn tags(&mut self) -> Vec<(u16, u16)> {
        let count = match self.below(100) {
            0..66 => 0,
            66..78 => 1,
            78..84 => 2,
            84..96 => 3 + self.below(8),
            _ => 11 + self.below(10),
        };
        (0..count)
            .map(|_| {
                // 0x9100 less often: Linux strips only the other two, and a stack the kernel
                // takes is where a bypass would be.
                let tpid = self.pick(&[TPIDS[0], TPIDS[0], TPIDS[1], TPIDS[1], TPIDS[2]]);
                let vid = if self.chance(90) {
                    0
                } else {
                    1 + self.below(4094) as u16
                };
                let pcp = if self.chance(20) {
                    self.below(8) as u16
                } else {
                    0
                };
                (tpid, pcp << 13 | vid)
            })
            .collect()
    }

    /// What sits between the Ethernet header and IP: nothing, PPPoE or MPLS.
    fn link_layer(&mut self) -> Link {
        match self.below(100) {
            0..4 => Link::Pppoe {
                other_protocol: self.chance(10),
            },
            4..8 => Link::Mpls {
                labels: 1 + self.below(10) as usize,
                bottom: self.chance(90),
            },
            _ => Link::Plain,
        }
    }

    fn encapsulate(&mut self, link: Link, packet: Packet) -> (u16, Vec<u8>) {
        match link {
            Link::Plain => (packet.ether_type, packet.bytes),
            Link::Pppoe { other_protocol } => {
                let protocol = match (other_protocol, packet.ether_type) {
                    (true, _) => 0xc021,
                    (false, frames::ETH_P_IPV4) => frames::PPP_IPV4,
                    (false, _) => frames::PPP_IPV6,
                };
                (
                    frames::ETH_P_PPPOE_SESSION,
                    frames::pppoe(protocol, &packet.bytes),
                )
            }
            Link::Mpls { labels, bottom } => {
                let labels: Vec<u32> = (0..labels).map(|label| 16 + label as u32).collect();
                (
                    frames::ETH_P_MPLS_UC,
                    frames::mpls(&labels, bottom, &packet.bytes),
                )
            }
        }
    }

    fn mutate(&mut self, mut frame: Vec<u8>) -> Vec<u8> {
        match self.below(100) {
            // Cut anywhere.
            0..8 => frame.truncate(self.below(frame.len() as u64 + 1) as usize),
            // Flip bytes in the headers.
            8..14 => {
                for _ in 0..=self.below(4) {
                    let at = self.below(frame.len().min(96) as u64) as usize;
                    frame[at] = self.below(256) as u8;
                }
            }
            // Ethernet padding after the packet.
            14..22 => {
                let byte = self.pick(&[0, 0, 0x55]);
                frame.extend(std::iter::repeat_n(byte, 1 + self.below(24) as usize));
            }
            // Rewrite the IP length field, keeping the IPv4 header checksum right.
            22..26 => {
                let any = self.below(65536) as u16;
                let value = self.pick(&[0u16, 1, 20, 40, 60, any]);
                rewrite_ip_length(&mut frame, value);
            }
            _ => {}
        }
        frame
    }
}

#[derive(Clone, Copy)]
enum Link {
    Plain,
    Pppoe { other_protocol: bool },
    Mpls { labels: usize, bottom: bool },
}

fn pseudo(src: IpAddr, dst: IpAddr) -> frames::Pseudo {
    match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => frames::Pseudo::V4(src, dst),
        (IpAddr::V6(src), IpAddr::V6(dst)) => frames::Pseudo::V6(src, dst),
        _ => unreachable!("one family"),
    }
}

/// An Ethernet header with `tags` (TPID, TCI), outermost first, then `payload`.
pub fn ethernet(
    dst: [u8; 6],
    src: [u8; 6],
    tags: &[(u16, u16)],
    ether_type: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + 4 * tags.len() + payload.len());
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    for (tpid, tci) in tags {
        frame.extend_from_slice(&tpid.to_be_bytes());
        frame.extend_from_slice(&tci.to_be_bytes());
    }
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// Where the outer IP header starts: after the Ethernet header and any VLAN tags.
pub fn l3_offset(frame: &[u8]) -> usize {
    let mut offset = 12;
    while let Some(bytes) = frame.get(offset..offset + 2) {
        if !TPIDS.contains(&u16::from_be_bytes([bytes[0], bytes[1]])) {
            break;
        }
        offset += 4;
    }
    offset + 2
}

/// Sets the outer IP header's length field to `value` (IPv4 total length, with its header
/// checksum recomputed, or IPv6 payload length).
fn rewrite_ip_length(frame: &mut [u8], value: u16) {
    let l3 = l3_offset(frame);
    match frame.get(l3).map(|byte| byte >> 4) {
        Some(4) if frame.len() >= l3 + 20 => {
            frame[l3 + 2..l3 + 4].copy_from_slice(&value.to_be_bytes());
            let ihl = (usize::from(frame[l3] & 15) * 4).max(20);
            if frame.len() >= l3 + ihl {
                frame[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
                let sum = frames::internet_checksum(&frame[l3..l3 + ihl]);
                frame[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
            }
        }
        Some(6) if frame.len() >= l3 + 6 => {
            frame[l3 + 4..l3 + 6].copy_from_slice(&value.to_be_bytes());
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            server_mac: frames::DST_MAC,
            client_mac: frames::SRC_MAC,
            v4: Ipv4Addr::new(198, 51, 100, 1),
            v6: Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1),
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_frames() {
        let (mut a, mut b) = (Generator::new(7, target()), Generator::new(7, target()));
        for _ in 0..1000 {
            assert_eq!(a.next_frame(), b.next_frame());
        }
    }

    #[test]
    fn frames_fit_a_link_and_are_mostly_for_the_target() {
        let mut generator = Generator::new(11, target());
        let frames: Vec<Vec<u8>> = (0..5000).map(|_| generator.next_frame()).collect();
        assert!(frames.iter().all(|frame| frame.len() <= 1514), "too long");
        let ours = frames
            .iter()
            .filter(|frame| frame.starts_with(&frames::DST_MAC))
            .count();
        assert!(
            ours > 4000 && ours < 4800,
            "{ours} of 5000 to the target MAC"
        );
    }
}
