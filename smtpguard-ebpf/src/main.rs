//! The smtpguard XDP program: parse the frame, classify a new inbound TCP connection to a
//! guarded port by its source address, and return a verdict. Nothing else happens here: no
//! logging on the hot path, no state but counters.
#![no_std]
#![no_main]

mod parse;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, LpmTrie, PerCpuArray, PerCpuHashMap, lpm_trie::Key},
    programs::XdpContext,
};
use parse::{Sighting, Source, TCP_ACK, TCP_SYN};
use smtpguard_common::{
    MAX_PREFIX_COUNTERS, MAX_PREFIXES_PER_FAMILY, RuleValue, SLOTS, SlotConfig, action, counter,
};

#[map(name = "SG_ACTIVE")]
static ACTIVE_SLOT: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "SG_SLOT_CFG")]
static SLOT_CONFIG: Array<SlotConfig> = Array::with_max_entries(SLOTS, 0);

#[map(name = "SG_V4_0")]
static V4_SLOT0: LpmTrie<[u8; 4], RuleValue> =
    LpmTrie::with_max_entries(MAX_PREFIXES_PER_FAMILY, 0);

#[map(name = "SG_V4_1")]
static V4_SLOT1: LpmTrie<[u8; 4], RuleValue> =
    LpmTrie::with_max_entries(MAX_PREFIXES_PER_FAMILY, 0);

#[map(name = "SG_V6_0")]
static V6_SLOT0: LpmTrie<[u8; 16], RuleValue> =
    LpmTrie::with_max_entries(MAX_PREFIXES_PER_FAMILY, 0);

#[map(name = "SG_V6_1")]
static V6_SLOT1: LpmTrie<[u8; 16], RuleValue> =
    LpmTrie::with_max_entries(MAX_PREFIXES_PER_FAMILY, 0);

#[map(name = "SG_PREFIX_HITS")]
static PREFIX_HITS: PerCpuHashMap<u32, u64> =
    PerCpuHashMap::with_max_entries(MAX_PREFIX_COUNTERS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map(name = "SG_GLOBAL")]
static GLOBAL: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[xdp]
pub fn smtpguard(ctx: XdpContext) -> u32 {
    match parse::parse(&ctx) {
        Sighting::Other => xdp_action::XDP_PASS,
        Sighting::LaterFragment => {
            count(counter::PASSED_FRAGMENTS);
            xdp_action::XDP_PASS
        }
        Sighting::Malformed => {
            count(counter::PASSED_UNPARSED);
            xdp_action::XDP_PASS
        }
        Sighting::Segment { src, dport, flags } => {
            // Only a new connection is decided here: SYN set, ACK clear (ECN bits may be set).
            if flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
                return xdp_action::XDP_PASS;
            }
            decide_guarded(&src, Some(dport), false)
        }
        Sighting::Hidden { src, dport } => decide_guarded(&src, dport, true),
    }
}

/// Decides a (possible) SYN by its source, if its destination port is guarded in the active
/// policy. A `None` port is out of sight and treated as guarded.
#[inline(always)]
fn decide_guarded(src: &Source, dport: Option<u16>, hidden: bool) -> u32 {
    let Some(slot) = ACTIVE_SLOT.get(0) else {
        return xdp_action::XDP_PASS;
    };
    let slot = *slot & 1;
    let Some(config) = SLOT_CONFIG.get(slot) else {
        return xdp_action::XDP_PASS;
    };
    if let Some(port) = dport
        && !config.guards(port)
    {
        return xdp_action::XDP_PASS;
    }
    if hidden {
        count(counter::HIDDEN_DECIDED);
    }
    match lookup(slot, src) {
        Some(rule) if rule.action == action::ALLOW => {
            count(counter::SYN_ALLOWED);
            count_prefix(rule.counter_id);
            xdp_action::XDP_PASS
        }
        Some(rule) => {
            count(counter::SYN_DENIED);
            count_prefix(rule.counter_id);
            drop_packet()
        }
        None => {
            count(counter::SYN_UNLISTED);
            drop_packet()
        }
    }
}

/// Longest-prefix match of `src` in the active slot's trie for its family.
#[inline(always)]
fn lookup(slot: u32, src: &Source) -> Option<RuleValue> {
    match src {
        Source::V4(addr) => {
            let key = Key::new(32, *addr);
            if slot == 0 {
                V4_SLOT0.get(&key).copied()
            } else {
                V4_SLOT1.get(&key).copied()
            }
        }
        Source::V6(addr) => {
            let key = Key::new(128, *addr);
            if slot == 0 {
                V6_SLOT0.get(&key).copied()
            } else {
                V6_SLOT1.get(&key).copied()
            }
        }
    }
}

#[inline(always)]
fn drop_packet() -> u32 {
    count(counter::DROPPED);
    xdp_action::XDP_DROP
}

#[inline(always)]
fn count(index: u32) {
    if let Some(value) = GLOBAL.get_ptr_mut(index) {
        // Per-CPU slot: no other CPU writes it, so a plain increment is exact.
        unsafe { *value += 1 };
    }
}

#[inline(always)]
fn count_prefix(counter_id: u32) {
    if let Some(value) = PREFIX_HITS.get_ptr_mut(counter_id) {
        unsafe { *value += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
