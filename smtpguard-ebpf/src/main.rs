//! The smtpguard XDP program: parse the frame, classify a new inbound TCP connection to a
//! guarded port by its source address, and carry out the verdict (pass, drop, or answer with
//! a RST). Nothing else happens here: no logging on the hot path, no state but counters and
//! the bounded table of sources it stopped.
#![no_std]
#![no_main]
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

mod parse;
mod reply;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, xdp_action},
    helpers::{
        bpf_get_prandom_u32, bpf_ktime_get_boot_ns,
        generated::{bpf_csum_diff, bpf_xdp_load_bytes},
    },
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, lpm_trie::Key},
    programs::XdpContext,
};
use parse::{Ip, Layers, Sighting, Source, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use smtpguard_common::{
    CanarySighting, IfaceInfo, MAX_CANARY_SOURCES, MAX_INTERFACES, MAX_OFFENDERS,
    MAX_PREFIX_COUNTERS, MAX_PREFIXES_PER_FAMILY, MAX_SCOPE_DESTINATIONS, MAX_SCOPES,
    MAX_V4_BLOCKS, Offender, RECORD_BUDGET_PER_SECOND, RECORD_SAMPLE, RecordBudget, RuleValue,
    SLOTS, ScopeConfig, SlotConfig, V4_BLOCK_RANGES, V4_COARSE_WORDS, V4_GUARD_WORDS, V4_KEY_BYTES,
    V4_TOP_ENTRIES, V4Block, V6_GUARD_WORDS, V6_KEY_BYTES, action, budget, canary_rule, counter,
    iface, mode, offender_slot, v4_table, v6_guard_bit,
};

#[map(name = "SG_ACTIVE")]
static ACTIVE_SLOT: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "SG_SLOT_CFG")]
static SLOT_CONFIG: Array<SlotConfig> = Array::with_max_entries(SLOTS, 0);

#[map(name = "SG_SCOPES")]
static SCOPES: Array<ScopeConfig> = Array::with_max_entries(SLOTS * MAX_SCOPES, 0);

#[map(name = "SG_DST4_0")]
static DST_V4_SLOT0: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(MAX_SCOPE_DESTINATIONS, 0);

#[map(name = "SG_DST4_1")]
static DST_V4_SLOT1: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(MAX_SCOPE_DESTINATIONS, 0);

#[map(name = "SG_DST6_0")]
static DST_V6_SLOT0: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(MAX_SCOPE_DESTINATIONS, 0);

#[map(name = "SG_DST6_1")]
static DST_V6_SLOT1: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(MAX_SCOPE_DESTINATIONS, 0);

#[map(name = "SG_V4_0")]
static V4_SLOT0: LpmTrie<[u8; V4_KEY_BYTES], RuleValue> =
    LpmTrie::with_max_entries(MAX_PREFIXES_PER_FAMILY, 0);

#[map(name = "SG_V4_1")]
static V4_SLOT1: LpmTrie<[u8; V4_KEY_BYTES], RuleValue> =
    LpmTrie::with_max_entries(MAX_PREFIXES_PER_FAMILY, 0);

#[map(name = "SG_V6_0")]
static V6_SLOT0: LpmTrie<[u8; V6_KEY_BYTES], RuleValue> =
    LpmTrie::with_max_entries(MAX_PREFIXES_PER_FAMILY, 0);

#[map(name = "SG_V6_1")]
static V6_SLOT1: LpmTrie<[u8; V6_KEY_BYTES], RuleValue> =
    LpmTrie::with_max_entries(MAX_PREFIXES_PER_FAMILY, 0);

#[map(name = "SG_V4_GUARD")]
static V4_GUARD: Array<[u32; V4_GUARD_WORDS]> = Array::with_max_entries(SLOTS, 0);

#[map(name = "SG_V4_COARSE")]
static V4_COARSE: Array<[u32; V4_COARSE_WORDS]> = Array::with_max_entries(SLOTS, 0);

#[map(name = "SG_V6_GUARD")]
static V6_GUARD: Array<[u32; V6_GUARD_WORDS]> = Array::with_max_entries(SLOTS, 0);

#[map(name = "SG_V4_TOP")]
static V4_TOP: Array<[u64; V4_TOP_ENTRIES]> = Array::with_max_entries(SLOTS, 0);

#[map(name = "SG_V4_BLK_0")]
static V4_BLOCKS_SLOT0: HashMap<u32, V4Block> =
    HashMap::with_max_entries(MAX_V4_BLOCKS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map(name = "SG_V4_BLK_1")]
static V4_BLOCKS_SLOT1: HashMap<u32, V4Block> =
    HashMap::with_max_entries(MAX_V4_BLOCKS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map(name = "SG_REC_BUDGET")]
static RECORD_BUDGET: PerCpuArray<RecordBudget> = PerCpuArray::with_max_entries(budget::COUNT, 0);

#[map(name = "SG_PREFIX_HITS")]
static PREFIX_HITS: PerCpuHashMap<u32, u64> =
    PerCpuHashMap::with_max_entries(MAX_PREFIX_COUNTERS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map(name = "SG_GLOBAL")]
static GLOBAL: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[map(name = "SG_OFFENDERS")]
static OFFENDERS: Array<Offender> = Array::with_max_entries(MAX_OFFENDERS, 0);

#[map(name = "SG_IFACES")]
static IFACES: HashMap<u32, IfaceInfo> = HashMap::with_max_entries(MAX_INTERFACES, 0);

#[map(name = "SG_CANARY")]
static CANARY: LruHashMap<[u8; 16], CanarySighting> =
    LruHashMap::with_max_entries(MAX_CANARY_SOURCES, 0);

/// Read by the daemon only: the layout stamp of the program that made the maps.
#[map(name = "SG_LAYOUT")]
static LAYOUT: Array<u64> = Array::with_max_entries(1, 0);

/// A table slot not counted for this long may be taken by any other source.
const OFFENDER_STALE_NS: u64 = 3600 * 1_000_000_000;

/// The program for Ethernet interfaces.
#[xdp]
pub fn smtpguard(ctx: XdpContext) -> u32 {
    let sighting = parse::parse_frame(&ctx);
    decide(&ctx, sighting)
}

/// The program for layer-3 interfaces (TUN, WireGuard, PPP, IP tunnels): the same decisions,
/// for packets that start at the IP header.
#[xdp]
pub fn smtpguard_l3(ctx: XdpContext) -> u32 {
    let sighting = parse::parse_packet(&ctx);
    decide(&ctx, sighting)
}

/// The floor the benchmark compares against: drops every frame and does nothing else. Never
/// attached by the daemon; `cargo xtask bench` loads it beside `smtpguard`.
#[xdp]
pub fn xdp_floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

#[inline(always)]
fn decide(ctx: &XdpContext, sighting: Sighting) -> u32 {
    // One state per kind of sighting from here on, whatever offsets the parser went through.
    let sighting = sighting.widened();
    match sighting {
        Sighting::Other => xdp_action::XDP_PASS,
        Sighting::LaterFragment => {
            count(counter::PASSED_FRAGMENTS);
            xdp_action::XDP_PASS
        }
        Sighting::Malformed => {
            count(counter::PASSED_UNPARSED);
            xdp_action::XDP_PASS
        }
        Sighting::Opaque => {
            // In audit mode nothing is stopped, not even what cannot be read.
            if audit_only() {
                count(counter::WOULD_BLOCK);
                return xdp_action::XDP_PASS;
            }
            count(counter::OPAQUE_DROPPED);
            drop_packet()
        }
        Sighting::Segment { dport, flags, at } => {
            // Only a new connection is decided here: SYN set, ACK clear (ECN bits may be set).
            if flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
                return xdp_action::XDP_PASS;
            }
            if at.tunnelled {
                count(counter::TUNNELLED);
            }
            decide_guarded(ctx, at.ip, Some(dport), Some(Reply { flags, at: &at }))
        }
        Sighting::Hidden {
            ip,
            dport,
            tunnelled,
        } => {
            if tunnelled {
                count(counter::TUNNELLED);
            }
            decide_guarded(ctx, ip, dport, None)
        }
    }
}

/// Whether every guarded scope of the active policy only audits.
#[inline(always)]
fn audit_only() -> bool {
    let Some(slot) = ACTIVE_SLOT.get(0) else {
        return false;
    };
    SLOT_CONFIG
        .get(*slot & 1)
        .is_some_and(|config| config.audit_only == 1)
}

/// What answering a SYN with a reset needs to know about it.
struct Reply<'a> {
    flags: u8,
    at: &'a Layers,
}

/// Decides a (possible) SYN by its source, if its destination port is guarded in the active
/// policy. A `None` port is out of sight and treated as guarded; without `reply` (headers out
/// of sight) the segment cannot be answered, so a reject becomes a drop. While a canary runs,
/// the candidate policy in the other slot decides the same SYN too, only to be compared.
#[inline(always)]
fn decide_guarded(ctx: &XdpContext, ip: Ip, dport: Option<u16>, reply: Option<Reply<'_>>) -> u32 {
    let Some(slot) = ACTIVE_SLOT.get(0) else {
        return xdp_action::XDP_PASS;
    };
    let slot = *slot & 1;
    let Some(config) = SLOT_CONFIG.get(slot) else {
        return xdp_action::XDP_PASS;
    };
    let (v4_guard, v6_guard, scoped, canary) = (
        config.v4_guard == 1,
        config.v6_guard == 1,
        config.scoped == 1,
        config.canary == 1,
    );
    // The table holds scope 0 only: never trusted for a scoped slot.
    let v4_table = config.v4_table == 1 && !scoped;
    // One scope (the common case) needs no look at the destination.
    let scope = if scoped { scope_of(ctx, slot, &ip) } else { 0 };
    let Some(scope_config) = SCOPES.get(slot * MAX_SCOPES + (scope & (MAX_SCOPES - 1))) else {
        return xdp_action::XDP_PASS;
    };
    let guarded = scope_config.guarded == 1 && dport.is_none_or(|port| scope_config.guards(port));
    if !guarded && !canary {
        return xdp_action::XDP_PASS;
    }
    // The parser saw the whole IP header: this cannot fail, but must be checked.
    let Some(src) = ip.address(ctx, false) else {
        if !guarded {
            return xdp_action::XDP_PASS;
        }
        count(counter::OPAQUE_DROPPED);
        return drop_packet();
    };
    let src = &src;
    // The deciding rule (a prefix's counter id, or a `canary_rule` code) and what it does.
    let (rule, verdict) = if guarded {
        match lookup(slot, scope, src, v4_guard, v4_table, v6_guard) {
            Some(rule) => (rule.counter_id, u32::from(rule.action)),
            None => (canary_rule::UNLISTED, scope_config.unlisted_action),
        }
    } else {
        (canary_rule::NOT_GUARDED, action::ALLOW)
    };
    if canary {
        let (high, low) = address_words(src);
        let (dst_high, dst_low) = ip
            .address(ctx, true)
            .map_or((0, 0), |dst| address_words(&dst));
        let port = dport.map_or(PORT_UNSEEN, u32::from);
        // What counts is the effect: a SYN an audit scope would stop still gets through.
        let stops = verdict != action::ALLOW && scope_config.mode != mode::AUDIT;
        let running = Running::pack(rule, scope, stops, ip.v6, port);
        let scope = candidate_scope(dst_high, dst_low, running);
        let change = compare_candidate(high, low, running, scope);
        if change != 0 {
            count(if (change >> 40) & 1 == 1 {
                counter::CANARY_NEWLY_BLOCKED
            } else {
                counter::CANARY_NEWLY_ALLOWED
            });
            record_change(high, low, running, change);
        }
    }
    if !guarded {
        return xdp_action::XDP_PASS;
    }
    if reply.is_none() {
        count(counter::HIDDEN_DECIDED);
    }
    let audit = scope_config.mode == mode::AUDIT;
    match (rule, verdict) {
        (_, action::ALLOW) => {
            count(counter::SYN_ALLOWED);
            count_prefix(rule);
            return xdp_action::XDP_PASS;
        }
        (canary_rule::UNLISTED, _) => count(counter::SYN_UNLISTED),
        _ => {
            count(counter::SYN_DENIED);
            count_prefix(rule);
        }
    }
    let stop = verdict;
    if within_budget(budget::OFFENDERS) {
        let (high, low) = address_words(src);
        remember(high, low, audit, scope);
    } else {
        count(counter::UNRECORDED);
    }
    if audit {
        count(counter::WOULD_BLOCK);
        return xdp_action::XDP_PASS;
    }
    if stop == action::REJECT {
        match reply {
            Some(reply) if may_reset(ctx, src, &reply) && reply::tcp_reset(ctx, reply.at) => {
                count(counter::REJECTED);
                return xdp_action::XDP_TX;
            }
            _ => count(counter::RESET_WITHHELD),
        }
    }
    drop_packet()
}

/// A port value no TCP port has: the destination port was out of sight.
const PORT_UNSEEN: u32 = 1 << 16;

/// What the running policy decided about a SYN, and what the candidate needs to know to
/// decide it too, packed in one register: the running rule (32 bits), the running scope (8),
/// whether the running policy stops it (1: denied or unlisted in an enforcing scope), the family (1, IPv6), the destination port (17,
/// [`PORT_UNSEEN`] when out of sight). Scalars cross into [`compare_candidate`] in registers:
/// the caller's stack, deep with the parser's state, has no room for a struct.
struct Running;

impl Running {
    #[inline(always)]
    fn pack(rule: u32, scope: u32, stops: bool, v6: bool, port: u32) -> u64 {
        u64::from(rule)
            | u64::from(scope & 0xff) << 32
            | u64::from(stops) << 40
            | u64::from(v6) << 41
            | u64::from(port & 0x1_ffff) << 42
    }
}

/// Scratch space for a new canary sighting: built here rather than on the stack.
#[map(name = "SG_CANARY_NEW")]
static CANARY_NEW: PerCpuArray<CanarySighting> = PerCpuArray::with_max_entries(1, 0);

/// The candidate slot's scope for a SYN to `dst` (the two words of [`address_words`]), and
/// how it treats it: the scope id (low 8 bits), whether it guards the port (bit 8),
/// whether it enforces (bit 9), whether the slot's IPv4 guard bitmap may be trusted (bit
/// 10), whether its IPv6 one may (bit 11); 0 when the slot cannot be read. A BPF-to-BPF call of its own, as
/// [`compare_candidate`] is: each runs on its own stack frame beside the parser's deep one.
#[inline(never)]
fn candidate_scope(dst_high: u64, dst_low: u64, running: u64) -> u64 {
    let Some(active) = ACTIVE_SLOT.get(0) else {
        return 0;
    };
    let slot = (*active & 1) ^ 1;
    let Some(config) = SLOT_CONFIG.get(slot) else {
        return 0;
    };
    let v6 = (running >> 41) & 1 == 1;
    let port = (running >> 42) as u32 & 0x1_ffff;
    // Each family on its own path, its key built there from the words: an enum built on
    // one path and matched on another leaves the compiler free to read registers the
    // verifier has not seen written.
    let scope = match (config.scoped == 1, v6) {
        (false, _) => 0,
        (true, true) => scope_of_address(slot, &Source::V6(words_address(dst_high, dst_low))),
        (true, false) => scope_of_address(slot, &Source::V4(low_v4(dst_low))),
    };
    let Some(scope_config) = SCOPES.get(slot * MAX_SCOPES + (scope & (MAX_SCOPES - 1))) else {
        return 0;
    };
    let guarded =
        scope_config.guarded == 1 && (port == PORT_UNSEEN || scope_config.guards(port as u16));
    u64::from(scope & 0xff)
        | u64::from(guarded) << 8
        | u64::from(scope_config.mode != mode::AUDIT) << 9
        | u64::from(config.v4_guard == 1) << 10
        | u64::from(config.v6_guard == 1) << 11
}

/// Decides the SYN from `src` (the two words of [`address_words`]) by the candidate policy in
/// the standby slot, in the scope [`candidate_scope`] found. Returns 0 when the candidate's
/// effect is the running policy's (both let it in, or both stop it, counting an audit
/// scope's stop as letting in); else the candidate's rule (low 32 bits), scope (8 bits from
/// 32), whether it stops the SYN (bit 40), and bit 63 set. The candidate's IPv4 sources are
/// decided by its trie, not its IPv4 table: the table is built from the same entries and gives
/// the same verdicts (the kernel tests and the fuzzer's run without a scope hold it to that).
#[inline(never)]
fn compare_candidate(src_high: u64, src_low: u64, running: u64, scope: u64) -> u64 {
    let Some(active) = ACTIVE_SLOT.get(0) else {
        return 0;
    };
    let slot = (*active & 1) ^ 1;
    let running_stops = (running >> 40) & 1 == 1;
    let v6 = (running >> 41) & 1 == 1;
    let (guarded, enforces, v4_guard, v6_guard) = (
        (scope >> 8) & 1 == 1,
        (scope >> 9) & 1 == 1,
        (scope >> 10) & 1 == 1,
        (scope >> 11) & 1 == 1,
    );
    let scope = scope as u32 & 0xff;
    let found = match (guarded, v6) {
        (false, _) => None,
        (true, true) => {
            let high = src_high.to_ne_bytes();
            if v6_guard
                && !v6_listed(
                    slot,
                    u32::from_be_bytes([high[0], high[1], high[2], high[3]]),
                )
            {
                None
            } else {
                find_v6(slot, scope, &words_address(src_high, src_low))
            }
        }
        (true, false) => {
            let addr = low_v4(src_low);
            if v4_guard && !v4_listed(slot, &addr) {
                None
            } else {
                find_v4(slot, scope, &addr)
            }
        }
    };
    let (rule, stops) = match (guarded, found) {
        (false, _) => (canary_rule::NOT_GUARDED, false),
        (true, Some(rule)) => (
            rule.counter_id,
            u32::from(rule.action) != action::ALLOW && enforces,
        ),
        (true, None) => (canary_rule::UNLISTED, enforces),
    };
    if stops == running_stops {
        return 0;
    }
    u64::from(rule) | u64::from(scope) << 32 | u64::from(stops) << 40 | 1 << 63
}

/// Counts a SYN whose verdict the candidate changes ([`compare_candidate`]'s `change`)
/// against its source in the canary's table. A source already there is always counted; a
/// new one takes a place within the per-CPU budget ([`within_budget`]), so a flood of
/// spoofed sources costs a lookup each, not a table write each.
#[inline(never)]
fn record_change(src_high: u64, src_low: u64, running: u64, change: u64) {
    let stops = (change >> 40) & 1 == 1;
    let (rule, scope) = (change as u32, (change >> 32) as u32 & 0xff);
    let (running_rule, running_scope) = (running as u32, (running >> 32) as u32 & 0xff);
    let key = words_address(src_high, src_low);
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if let Some(seen) = CANARY.get_ptr_mut(key) {
        // SAFETY: the value of a live entry, valid for the program run; counts are added
        // atomically (every CPU may write it), the rest is last-writer-wins.
        unsafe {
            let count = if stops {
                &raw mut (*seen).newly_blocked
            } else {
                &raw mut (*seen).newly_allowed
            };
            atomic_add(count, 1);
            (*seen).last_seen_ns = now;
            (*seen).running_rule = running_rule;
            (*seen).candidate_rule = rule;
            (*seen).running_scope = running_scope;
            (*seen).candidate_scope = scope;
        }
        return;
    }
    if !within_budget(budget::CANARY) {
        count(counter::CANARY_UNRECORDED);
        return;
    }
    let Some(new) = CANARY_NEW.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch value; XDP runs are not preempted.
    unsafe {
        *new = CanarySighting {
            newly_blocked: u64::from(stops),
            newly_allowed: u64::from(!stops),
            first_seen_ns: now,
            last_seen_ns: now,
            running_rule,
            candidate_rule: rule,
            running_scope,
            candidate_scope: scope,
        };
        // A racing first sighting on another CPU may win the insert: this one is then only
        // in the global counter.
        // A reference into the scratch map, not a copy: the copy would go on the stack.
        #[allow(clippy::needless_borrows_for_generic_args)]
        let _ = CANARY.insert(key, &*new, u64::from(BPF_NOEXIST));
    }
}

/// The IPv4 address in the low word of an [`address_words`] pair.
#[inline(always)]
fn low_v4(low: u64) -> [u8; 4] {
    let bytes = low.to_ne_bytes();
    [bytes[4], bytes[5], bytes[6], bytes[7]]
}

/// The 16 bytes of an address from its two words ([`address_words`]).
#[inline(always)]
fn words_address(high: u64, low: u64) -> [u8; 16] {
    let (high, low) = (high.to_ne_bytes(), low.to_ne_bytes());
    [
        high[0], high[1], high[2], high[3], high[4], high[5], high[6], high[7], low[0], low[1],
        low[2], low[3], low[4], low[5], low[6], low[7],
    ]
}

/// Whether a reset may answer this SYN: only one addressed to this host, by unicast addresses
/// at both layers, that is a plain SYN (no FIN or RST riding along), and only out of an
/// interface the daemon said replies may leave. Anything else a reject would answer is
/// dropped: a reset must never speak for a neighbour, a broadcast or a forged address.
#[inline(always)]
fn may_reset(ctx: &XdpContext, src: &Source, reply: &Reply<'_>) -> bool {
    if reply.flags & (TCP_FIN | TCP_RST) != 0 || reply.at.tunnelled {
        return false;
    }
    let Some(dst) = reply.at.ip.address(ctx, true) else {
        return false;
    };
    if !unicast(src) || !unicast(&dst) {
        return false;
    }
    // What the kernel would drop unanswered gets no answer from here either: a packet the
    // frame does not hold whole, an IPv4 header with a bad checksum.
    if !holds(ctx, reply.at.l4 + reply.at.l4_len)
        || (!reply.at.ip.v6 && !ipv4_checksum_ok(ctx, reply.at.ip.l3))
    {
        return false;
    }
    let index = ctx.ingress_ifindex() as u32;
    // SAFETY: the value is plain data, read once.
    let Some(info) = (unsafe { IFACES.get(index) }) else {
        return false;
    };
    let (mac, flags) = (info.mac, info.flags);
    if flags & iface::REPLIES == 0 {
        return false;
    }
    if !reply.at.ethernet {
        return flags & iface::LAYER3 != 0;
    }
    let Some(macs) = parse::ptr_at::<[u8; 12]>(ctx, 0) else {
        return false;
    };
    let macs = unsafe { *macs };
    // Sent to this interface's own address, from a unicast one.
    macs[..6] == mac && macs[6] & 1 == 0
}

/// Whether the frame reaches `end` (which is past its start). Asked of a helper rather than
/// compared with the frame's length: a comparison would teach the verifier bounds that split
/// the states it walks, and multiply them.
#[inline(always)]
fn holds(ctx: &XdpContext, end: usize) -> bool {
    let mut last = 0u8;
    // SAFETY: one byte, into a local.
    end > 0
        && unsafe { bpf_xdp_load_bytes(ctx.ctx, (end - 1) as u32, (&raw mut last).cast(), 1) == 0 }
}

/// Whether the IPv4 header at `l3` sums to zero, options included (at most 60 bytes). The
/// header is copied into a zeroed buffer (zeros add nothing to a ones' complement sum) and
/// summed by the kernel's own `bpf_csum_diff`: a loop here would multiply the states the
/// verifier walks by its length.
#[inline(always)]
fn ipv4_checksum_ok(ctx: &XdpContext, l3: usize) -> bool {
    let Some(first) = parse::ptr_at::<[u8; 2]>(ctx, l3) else {
        return false;
    };
    let length = u32::from(unsafe { (*first)[0] } & 0x0f) * 4;
    if !(20..=60).contains(&length) {
        return false;
    }
    let mut header = [0u32; 15];
    let buffer = header.as_mut_ptr();
    // SAFETY: the helper bounds the copy by the packet and by `length` <= 60, the buffer's size.
    if unsafe { bpf_xdp_load_bytes(ctx.ctx, l3 as u32, buffer.cast(), length) } != 0 {
        return false;
    }
    // SAFETY: both sizes are the buffer's, a multiple of 4 as the helper wants.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, buffer, 60, 0) };
    if sum < 0 {
        return false;
    }
    let mut sum = sum as u64;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum == 0xffff
}

/// Not unspecified, loopback, multicast or broadcast (nor, for IPv6, an IPv4-mapped address,
/// which Linux refuses on the wire).
#[inline(always)]
fn unicast(address: &Source) -> bool {
    match address {
        Source::V4(a) => !matches!(a[0], 0 | 127 | 224..=255),
        Source::V6(a) => {
            let high = u64::from_be_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]);
            let low = u64::from_be_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]);
            let unspecified_or_loopback = high == 0 && low <= 1;
            let mapped = high == 0 && low >> 32 == 0xffff;
            !(unspecified_or_loopback || mapped || a[0] == 0xff)
        }
    }
}

/// Whether this SYN goes into the table `which` budget guards ([`budget`]): every one up to
/// the per-CPU budget of the current second, then one in [`RECORD_SAMPLE`]. A flood of
/// spoofed sources thus costs an increment per SYN, not a table write.
#[inline(always)]
fn within_budget(which: u32) -> bool {
    let Some(budget) = RECORD_BUDGET.get_ptr_mut(which) else {
        return true;
    };
    // SAFETY: per-CPU value: no other CPU touches it, and XDP runs are not preempted.
    unsafe {
        (*budget).used += 1;
        let used = (*budget).used;
        if used <= RECORD_BUDGET_PER_SECOND {
            if used == 1 {
                (*budget).window_end_ns = bpf_ktime_get_boot_ns() + 1_000_000_000;
            }
            return true;
        }
        // Over budget: the clock is read on the first SYN past it (the window may have ended
        // long ago) and on each sampled one, never on every SYN of a flood.
        let sampled = used % RECORD_SAMPLE == 0;
        if !sampled && used != RECORD_BUDGET_PER_SECOND + 1 {
            return false;
        }
        let now = bpf_ktime_get_boot_ns();
        if now > (*budget).window_end_ns {
            // A new second: this SYN opens a fresh window.
            (*budget).used = 1;
            (*budget).window_end_ns = now + 1_000_000_000;
            return true;
        }
        sampled
    }
}

/// A source as the two 8-byte words of its 16-byte form (IPv4 as `::ffff:a.b.c.d`), in
/// memory order: scalars, so they cross into [`remember`] in registers.
#[inline(always)]
fn address_words(src: &Source) -> (u64, u64) {
    match src {
        Source::V4(a) => (
            0,
            u64::from_ne_bytes([0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]]),
        ),
        Source::V6(a) => (
            u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
            u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]),
        ),
    }
}

/// Counts a stopped (or, in audit mode, would-be-stopped) SYN against its source, in a
/// direct-mapped table: the source's hash picks one slot. A source already there is counted;
/// another one takes the slot only if it is empty, stale, or wins a draw weighted against the
/// resident's count, so sources that keep coming stay while one-off (spoofed) sources mostly
/// pass through. No allocation, no eviction list: one slot touched per SYN. A BPF-to-BPF
/// call, not inlined: it keeps the hot path's registers (and the verifier) simple.
#[inline(never)]
fn remember(high: u64, low: u64, audit: bool, scope: u32) {
    let index = offender_slot(high, low, MAX_OFFENDERS);
    let Some(slot) = OFFENDERS.get_ptr_mut(index) else {
        return;
    };
    let now = unsafe { bpf_ktime_get_boot_ns() };
    // SAFETY: `slot` points into the array map's value for `index`, valid for the program run.
    // Slots are shared by all CPUs: counts are added atomically; a racing claim of an empty
    // slot may lose one sighting.
    unsafe {
        let words = (*slot).addr.as_ptr() as *const u64;
        if (words.read_unaligned(), words.add(1).read_unaligned()) == (high, low) {
            let count = if audit {
                &raw mut (*slot).would_block
            } else {
                &raw mut (*slot).blocked
            };
            atomic_add(count, 1);
            (*slot).last_seen_ns = now;
            (*slot).scope = scope;
            return;
        }
        let resident = (*slot).blocked + (*slot).would_block;
        let stale = now.wrapping_sub((*slot).last_seen_ns) > OFFENDER_STALE_NS;
        let draw = u64::from(bpf_get_prandom_u32())
            .checked_rem(resident.saturating_add(1))
            .unwrap_or(0);
        if resident != 0 && !stale && draw != 0 {
            return;
        }
        let mut addr = [0u8; 16];
        let out = addr.as_mut_ptr() as *mut u64;
        out.write_unaligned(high);
        out.add(1).write_unaligned(low);
        *slot = Offender {
            addr,
            blocked: u64::from(!audit),
            would_block: u64::from(audit),
            first_seen_ns: now,
            last_seen_ns: now,
            scope,
            _pad: 0,
        };
    }
}

/// Longest-prefix match of `src` among the prefixes of `scope` in `slot`'s trie for its
/// family (keys are the scope id, then the address). An IPv4 source whose /24 no prefix of
/// any scope overlaps, or an IPv6 source whose /32 none does, is settled by that slot's guard
/// bitmap (when `v4_guard` / `v6_guard` say it is written), without the trie walk; any other
/// IPv4 source by the slot's IPv4 table when `v4_table` says it holds the policy.
#[inline(always)]
fn lookup(
    slot: u32,
    scope: u32,
    src: &Source,
    v4_guard: bool,
    v4_table: bool,
    v6_guard: bool,
) -> Option<RuleValue> {
    match src {
        Source::V4(addr) => {
            // The bitmaps settle most unlisted sources (a spoofed flood's) before the call.
            if v4_guard && !v4_listed(slot, addr) {
                return None;
            }
            table_rule(smtpguard_source_v4(
                slot,
                scope,
                u32::from_be_bytes(*addr),
                u32::from(v4_table),
            ))
        }
        Source::V6(addr) => {
            if v6_guard
                && !v6_listed(
                    slot,
                    u32::from_be_bytes([addr[0], addr[1], addr[2], addr[3]]),
                )
            {
                return None;
            }
            find_v6(slot, scope, addr)
        }
    }
}

/// The rule deciding IPv4 source `addr` (host order) in `scope` of `slot`, as a
/// [`v4_table`] word ([`table_rule`] reads it; 0 for none): by the slot's IPv4 table when
/// `table` is 1 and the table holds the source's /24, else by the trie. The caller has
/// checked the guard bitmaps. A global function, so the kernel verifies it once on its own
/// rather than once for every path the parser reaches the lookup by: scalars in, a scalar
/// out.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn smtpguard_source_v4(slot: u32, scope: u32, addr: u32, table: u32) -> u64 {
    let slot = slot & 1;
    let addr = addr.to_be_bytes();
    if table == 1 {
        let word = table_v4(slot, &addr);
        if word & v4_table::WALK == 0 {
            return word;
        }
    }
    find_v4(slot, scope, &addr).map_or(0, |rule| {
        v4_table::rule(u32::from(rule.action), rule.counter_id)
    })
}

/// The trie walk for an IPv4 source.
#[inline(always)]
fn find_v4(slot: u32, scope: u32, addr: &[u8; 4]) -> Option<RuleValue> {
    let scope = scope.to_be_bytes();
    let key = Key::new(
        (V4_KEY_BYTES * 8) as u32,
        [
            scope[0], scope[1], scope[2], scope[3], addr[0], addr[1], addr[2], addr[3],
        ],
    );
    if slot == 0 {
        V4_SLOT0.get(&key).copied()
    } else {
        V4_SLOT1.get(&key).copied()
    }
}

/// The IPv4 table's word for `addr` in `slot`: its /16's word, or when that says `DEEPER`,
/// the range of its /24's block that holds it (a block's first range may say `WALK`: the
/// trie decides). The ranges are scanned in full, a fixed eight steps: the last used one
/// that starts at or below the address's last byte is the one.
#[inline(always)]
fn table_v4(slot: u32, addr: &[u8; 4]) -> u64 {
    let Some(top) = V4_TOP.get_ptr(slot) else {
        return v4_table::WALK;
    };
    let index = (u32::from(addr[0]) << 8 | u32::from(addr[1])) as usize & (V4_TOP_ENTRIES - 1);
    // SAFETY: `index` is masked below the array's length; the pointer is the map value.
    let word = unsafe { *(top as *const u64).add(index) };
    if word & v4_table::DEEPER == 0 {
        return word;
    }
    let key = u32::from_be_bytes([0, addr[0], addr[1], addr[2]]);
    // SAFETY: the values are plain data, read while the program runs.
    let block = unsafe {
        if slot == 0 {
            V4_BLOCKS_SLOT0.get(key)
        } else {
            V4_BLOCKS_SLOT1.get(key)
        }
    };
    let Some(block) = block else {
        return word;
    };
    let first = block.ranges[0];
    if first & v4_table::WALK != 0 {
        return v4_table::WALK;
    }
    let host = u64::from(addr[3]);
    let mut found = first;
    let mut i = 1;
    while i < V4_BLOCK_RANGES {
        let range = block.ranges[i];
        if range & v4_table::USED != 0 && (range >> v4_table::START_SHIFT) & 0xff <= host {
            found = range;
        }
        i += 1;
    }
    found
}

/// The rule a table word names: `None` for an unlisted range.
#[inline(always)]
fn table_rule(word: u64) -> Option<RuleValue> {
    if word & v4_table::LISTED == 0 {
        return None;
    }
    Some(RuleValue {
        action: (word >> v4_table::ACTION_SHIFT) as u8,
        deny: 0,
        outranked: 0,
        _pad: 0,
        counter_id: word as u32,
    })
}

/// The trie walk for an IPv6 source.
#[inline(always)]
fn find_v6(slot: u32, scope: u32, addr: &[u8; 16]) -> Option<RuleValue> {
    let mut data = [0u8; V6_KEY_BYTES];
    data[..4].copy_from_slice(&scope.to_be_bytes());
    data[4..].copy_from_slice(addr);
    let key = Key::new((V6_KEY_BYTES * 8) as u32, data);
    if slot == 0 {
        V6_SLOT0.get(&key).copied()
    } else {
        V6_SLOT1.get(&key).copied()
    }
}

/// The scope whose destination prefix most specifically contains the SYN's destination;
/// the default scope (0) when none does.
#[inline(always)]
fn scope_of(ctx: &XdpContext, slot: u32, ip: &Ip) -> u32 {
    match ip.address(ctx, true) {
        Some(dst) => scope_of_address(slot, &dst),
        None => 0,
    }
}

/// The scope of destination `dst` in `slot`.
#[inline(always)]
fn scope_of_address(slot: u32, dst: &Source) -> u32 {
    let found = match dst {
        Source::V4(addr) => {
            let key = Key::new(32, *addr);
            if slot == 0 {
                DST_V4_SLOT0.get(&key).copied()
            } else {
                DST_V4_SLOT1.get(&key).copied()
            }
        }
        Source::V6(addr) => {
            let key = Key::new(128, *addr);
            if slot == 0 {
                DST_V6_SLOT0.get(&key).copied()
            } else {
                DST_V6_SLOT1.get(&key).copied()
            }
        }
    };
    found.unwrap_or(0)
}

/// `lock *(u64 *)(ptr) += value`: the BPF atomic add (core's atomics are not offered for
/// the BPF target).
#[inline(always)]
unsafe fn atomic_add(ptr: *mut u64, value: u64) {
    #[cfg(target_arch = "bpf")]
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({ptr} + 0) += {value}",
            ptr = in(reg) ptr,
            value = in(reg) value,
        );
    }
    #[cfg(not(target_arch = "bpf"))]
    unsafe {
        *ptr += value;
    }
}

/// Whether the guard bitmaps of `slot` have the /20 and the /24 of `addr` marked as
/// overlapped by a prefix. The /20 bitmap is small enough to stay cached and settles most
/// unlisted sources; the /24 one settles most of the rest.
#[inline(always)]
fn v4_listed(slot: u32, addr: &[u8; 4]) -> bool {
    let addr = u32::from_be_bytes(*addr);
    let Some(coarse) = V4_COARSE.get_ptr(slot) else {
        return true;
    };
    let block = addr >> 12;
    let word = (block >> 5) as usize & (V4_COARSE_WORDS - 1);
    // SAFETY: `word` is masked below the array's length; the pointer is the map value.
    if unsafe { *(coarse as *const u32).add(word) } & (1 << (block & 31)) == 0 {
        return false;
    }
    let Some(fine) = V4_GUARD.get_ptr(slot) else {
        return true;
    };
    let block = addr >> 8;
    let word = (block >> 5) as usize & (V4_GUARD_WORDS - 1);
    // SAFETY: as above.
    unsafe { *(fine as *const u32).add(word) & (1 << (block & 31)) != 0 }
}

/// Whether the IPv6 guard bitmap of `slot` has the bit of the /32 whose first 32 bits are
/// `top` (big-endian) set: some prefix overlaps that /32 (or one sharing its bit does).
#[inline(always)]
fn v6_listed(slot: u32, top: u32) -> bool {
    let Some(bits) = V6_GUARD.get_ptr(slot) else {
        return true;
    };
    let bit = v6_guard_bit(top);
    let word = (bit >> 5) as usize & (V6_GUARD_WORDS - 1);
    // SAFETY: `word` is masked below the array's length; the pointer is the map value.
    unsafe { *(bits as *const u32).add(word) & (1 << (bit & 31)) != 0 }
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

/// Counts a match of the prefix whose counter is `counter_id`. The counter is created at the
/// prefix's first match: an apply writes no counters, and only prefixes that see traffic
/// take per-CPU memory.
#[inline(always)]
fn count_prefix(counter_id: u32) {
    match PREFIX_HITS.get_ptr_mut(counter_id) {
        // Per-CPU slot: no other CPU writes it.
        Some(value) => unsafe { *value += 1 },
        None => {
            let _ = PREFIX_HITS.insert(counter_id, 1u64, u64::from(BPF_NOEXIST));
        }
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
