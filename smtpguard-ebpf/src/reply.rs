//! Answering a SYN with a TCP RST from XDP, as `iptables -j REJECT --reject-with tcp-reset`
//! does: the frame is rewritten in place (MACs, addresses and ports swapped, VLAN tags kept,
//! IP options and extension headers dropped, the TCP header without options), trimmed, and
//! sent back out of the interface it came in on (`XDP_TX`).
//!
//! Everything the reply needs is copied out of the frame before the first byte is written,
//! because the new headers overlap the old ones wherever options or extensions sat.

use aya_ebpf::{helpers::bpf_xdp_adjust_tail, programs::XdpContext};

use crate::parse::{Layers, Source, TcpHead, ptr_at};

const IPV4_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const TCP_HEADER: usize = 20;
const IPPROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_RST_ACK: u8 = 0x04 | 0x10;
const REPLY_HOP_LIMIT: u8 = 64;

#[repr(C)]
struct MacPair {
    dst: [u8; 6],
    src: [u8; 6],
}

/// Rewrites the SYN at `at` into a RST+ACK addressed to its sender.
/// Returns false, with the frame untouched, where no correct reply can be built (a fragment,
/// a TCP header that contradicts the IP length, a jumbogram): the caller then drops instead.
#[inline(always)]
pub fn tcp_reset(ctx: &XdpContext, at: &Layers) -> bool {
    if at.fragment || at.tunnelled || at.l4_len > 0xffff {
        return false;
    }
    // The whole fixed TCP header must be in the frame: a truncated one the kernel drops.
    if ptr_at::<[u8; TCP_HEADER]>(ctx, at.l4).is_none() {
        return false;
    }
    let Some(tcp) = ptr_at::<TcpHead>(ctx, at.l4) else {
        return false;
    };
    let (sport, dport, seq, data_offset, flags) = unsafe {
        (
            (*tcp).sport,
            (*tcp).dport,
            u32::from_be_bytes((*tcp).seq),
            (((*tcp).data_offset >> 4) as usize) * 4,
            (*tcp).flags,
        )
    };
    if data_offset < TCP_HEADER || data_offset > at.l4_len {
        return false;
    }
    // RFC 9293 3.10.7.1: a reset for a segment without ACK has sequence number zero and
    // acknowledges everything the segment occupied: SYN, data, FIN.
    let occupied = 1 + (at.l4_len - data_offset) as u32 + u32::from(flags & TCP_FIN != 0);
    let ack = seq.wrapping_add(occupied);
    let l3 = at.ip.l3;
    let (Some(from), Some(to)) = (at.ip.address(ctx, false), at.ip.address(ctx, true)) else {
        return false;
    };
    let tcp_at = l3 + if at.ip.v6 { IPV6_HEADER } else { IPV4_HEADER };
    // Every byte written below must lie inside the frame as it is now.
    if ptr_at::<[u8; TCP_HEADER]>(ctx, tcp_at).is_none() {
        return false;
    }
    let mut segment = tcp_header(dport, sport, ack);
    let written = match (from, to) {
        (Source::V4(from), Source::V4(to)) => {
            let Some(ip) = ptr_at::<[u8; IPV4_HEADER]>(ctx, l3) else {
                return false;
            };
            let header = ipv4_header(to, from);
            let pseudo = sum(&to, sum(&from, u32::from(IPPROTO_TCP) + TCP_HEADER as u32));
            let total = sum(&segment, pseudo);
            set_checksum(&mut segment, 16, total);
            unsafe { core::ptr::write_unaligned(ip as *mut [u8; IPV4_HEADER], header) };
            IPV4_HEADER
        }
        (Source::V6(from), Source::V6(to)) => {
            let Some(ip) = ptr_at::<[u8; IPV6_HEADER]>(ctx, l3) else {
                return false;
            };
            let header = ipv6_header(to, from);
            let pseudo = sum(&to, sum(&from, u32::from(IPPROTO_TCP) + TCP_HEADER as u32));
            let total = sum(&segment, pseudo);
            set_checksum(&mut segment, 16, total);
            unsafe { core::ptr::write_unaligned(ip as *mut [u8; IPV6_HEADER], header) };
            IPV6_HEADER
        }
        _ => return false,
    };
    if let Some(out) = ptr_at::<[u8; TCP_HEADER]>(ctx, l3 + written) {
        unsafe { core::ptr::write_unaligned(out as *mut [u8; TCP_HEADER], segment) };
    } else {
        return false;
    }
    if at.ethernet
        && let Some(macs) = ptr_at::<MacPair>(ctx, 0)
    {
        let macs = macs as *mut MacPair;
        unsafe {
            let (dst, src) = ((*macs).dst, (*macs).src);
            (*macs).dst = src;
            (*macs).src = dst;
        }
    }
    // Trim whatever followed (options, payload, padding). Should the helper refuse, the IP
    // length still says where the packet ends, and receivers ignore the rest.
    let length = ctx.data_end() - ctx.data();
    let wanted = l3 + written + TCP_HEADER;
    if length > wanted {
        unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((length - wanted) as i32)) };
    }
    true
}

#[inline(always)]
fn tcp_header(sport: [u8; 2], dport: [u8; 2], ack: u32) -> [u8; TCP_HEADER] {
    let ack = ack.to_be_bytes();
    [
        sport[0],
        sport[1],
        dport[0],
        dport[1],
        0,
        0,
        0,
        0,
        ack[0],
        ack[1],
        ack[2],
        ack[3],
        (TCP_HEADER as u8 / 4) << 4,
        TCP_RST_ACK,
        0,
        0,
        0,
        0,
        0,
        0,
    ]
}

#[inline(always)]
fn ipv4_header(src: [u8; 4], dst: [u8; 4]) -> [u8; IPV4_HEADER] {
    let total = ((IPV4_HEADER + TCP_HEADER) as u16).to_be_bytes();
    let mut header = [
        0x45,
        0,
        total[0],
        total[1],
        0,
        0,
        0x40, // don't fragment
        0,
        REPLY_HOP_LIMIT,
        IPPROTO_TCP,
        0,
        0,
        src[0],
        src[1],
        src[2],
        src[3],
        dst[0],
        dst[1],
        dst[2],
        dst[3],
    ];
    let total = sum(&header, 0);
    set_checksum(&mut header, 10, total);
    header
}

#[inline(always)]
fn ipv6_header(src: [u8; 16], dst: [u8; 16]) -> [u8; IPV6_HEADER] {
    let mut header = [0u8; IPV6_HEADER];
    header[0] = 0x60;
    header[5] = TCP_HEADER as u8;
    header[6] = IPPROTO_TCP;
    header[7] = REPLY_HOP_LIMIT;
    header[8..24].copy_from_slice(&src);
    header[24..40].copy_from_slice(&dst);
    header
}

/// One's-complement sum of `bytes` as big-endian 16-bit words, added to `start`.
#[inline(always)]
fn sum<const N: usize>(bytes: &[u8; N], start: u32) -> u32 {
    let mut total = start;
    for pair in bytes.chunks_exact(2) {
        total += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    total
}

/// Folds `total` and stores its complement at `at`.
#[inline(always)]
fn set_checksum<const N: usize>(bytes: &mut [u8; N], at: usize, total: u32) {
    let mut folded = total;
    folded = (folded & 0xffff) + (folded >> 16);
    folded = (folded & 0xffff) + (folded >> 16);
    let check = (!(folded as u16)).to_be_bytes();
    if let Some(slot) = bytes.get_mut(at..at + 2) {
        slot.copy_from_slice(&check);
    }
}
