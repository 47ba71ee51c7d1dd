//! Types the XDP program and the daemon both see: map names, map key and value layouts,
//! counter indices and verdict codes. Everything here is `#[repr(C)]` with fixed-width fields
//! and explicit padding, because the kernel copies these bytes between the two sides verbatim.
#![no_std]

use core::mem::size_of;

/// Names of the maps in the eBPF object. The XDP program declares its maps with exactly these
/// names (`#[map(name = ...)]`); the daemon looks them up and pins them by the same names.
pub mod map_name {
    /// `Array<u32>` of one entry: which policy slot (0 or 1) the program reads.
    pub const ACTIVE_SLOT: &str = "SG_ACTIVE";
    /// `Array<SlotConfig>` of [`super::SLOTS`] entries: what a policy slot holds beyond its
    /// prefixes (generation, whether it has destination scopes).
    pub const SLOT_CONFIG: &str = "SG_SLOT_CFG";
    /// `Array<ScopeConfig>` of [`super::SLOTS`] x [`super::MAX_SCOPES`] entries: per slot and
    /// scope id, the guarded ports, mode and unlisted action.
    pub const SCOPES: &str = "SG_SCOPES";
    /// `LpmTrie<[u8; 4], u32>`: destination prefix to scope id, policy slot 0.
    pub const DST_V4_SLOT0: &str = "SG_DST4_0";
    /// `LpmTrie<[u8; 4], u32>`: destination prefix to scope id, policy slot 1.
    pub const DST_V4_SLOT1: &str = "SG_DST4_1";
    /// `LpmTrie<[u8; 16], u32>`: destination prefix to scope id, policy slot 0.
    pub const DST_V6_SLOT0: &str = "SG_DST6_0";
    /// `LpmTrie<[u8; 16], u32>`: destination prefix to scope id, policy slot 1.
    pub const DST_V6_SLOT1: &str = "SG_DST6_1";
    /// `LpmTrie<[u8; 8], RuleValue>` holding the IPv4 source prefixes of policy slot 0, keyed
    /// by scope id (4 bytes, big-endian) then address: one trie for every scope.
    pub const V4_SLOT0: &str = "SG_V4_0";
    /// The same for policy slot 1.
    pub const V4_SLOT1: &str = "SG_V4_1";
    /// `LpmTrie<[u8; 20], RuleValue>` holding the IPv6 source prefixes of policy slot 0, keyed
    /// by scope id then address.
    pub const V6_SLOT0: &str = "SG_V6_0";
    /// The same for policy slot 1.
    pub const V6_SLOT1: &str = "SG_V6_1";
    /// `Array<[u32; V4_GUARD_WORDS]>` of [`super::SLOTS`] entries: per policy slot, one bit
    /// per IPv4 /24, set when some prefix of the slot overlaps that /24. A clear bit settles
    /// a source as unlisted in one memory access, without walking the trie; a set bit sends
    /// it on to the trie, which stays the source of truth.
    pub const V4_GUARD: &str = "SG_V4_GUARD";
    /// `Array<[u32; V4_COARSE_WORDS]>` of [`super::SLOTS`] entries: the same per /20, small
    /// enough (128 KiB) to stay in a CPU's cache; checked before [`V4_GUARD`].
    pub const V4_COARSE: &str = "SG_V4_COARSE";
    /// `Array<[u32; V6_GUARD_WORDS]>` of [`super::SLOTS`] entries: per policy slot, one bit
    /// per hash of an IPv6 /32 ([`super::v6_guard_bit`]), set when some prefix of the slot
    /// overlaps that /32. A clear bit settles an IPv6 source as unlisted without the trie
    /// walk; a set bit (the /32 is listed, or shares its bit with one that is) sends it on.
    pub const V6_GUARD: &str = "SG_V6_GUARD";
    /// `Array<[u64; V4_TOP_ENTRIES]>` of [`super::SLOTS`] entries: per policy slot, one
    /// [`super::v4_table`] word per IPv4 /16: the rule that decides the whole /16, or
    /// (with `DEEPER`) the rule for its /24s that [`V4_BLOCKS_SLOT0`] does not hold. Written
    /// only for a policy without destination scopes ([`super::SlotConfig::v4_table`]).
    pub const V4_TOP: &str = "SG_V4_TOP";
    /// `HashMap<u32, V4Block>`: per IPv4 /24 (its address shifted right by 8) that a prefix
    /// longer than /16 overlaps, how its 256 addresses are decided, policy slot 0. Together
    /// with [`V4_TOP`], the same verdict as the trie, in two or three reads instead of a
    /// walk; the trie stays the source of truth where a /24 has too many ranges.
    pub const V4_BLOCKS_SLOT0: &str = "SG_V4_BLK_0";
    /// The same for policy slot 1.
    pub const V4_BLOCKS_SLOT1: &str = "SG_V4_BLK_1";
    /// `PerCpuArray<RecordBudget>` of [`super::budget::COUNT`] entries: how many stopped
    /// sources (and canary sightings) this CPU recorded in the current second.
    pub const RECORD_BUDGET: &str = "SG_REC_BUDGET";
    /// `PerCpuHashMap<u32, u64>`: SYNs matched, keyed by [`super::RuleValue::counter_id`].
    pub const PREFIX_HITS: &str = "SG_PREFIX_HITS";
    /// `PerCpuArray<u64>` of [`super::counter::COUNT`] entries: global counters.
    pub const GLOBAL: &str = "SG_GLOBAL";
    /// `Array<Offender>` of [`super::MAX_OFFENDERS`] slots: sources stopped (or, in audit
    /// mode, that would have been), each in the slot its address hashes to. Fixed size: a
    /// spoofed flood cannot grow it, and sources that keep coming hold their slots.
    pub const OFFENDERS: &str = "SG_OFFENDERS";

    /// `HashMap<u32, IfaceInfo>`: per interface index, what a reply sent back out of it needs
    /// to know (its MAC address, whether it has one, whether a reset may be sent at all).
    pub const IFACES: &str = "SG_IFACES";
    /// `Array<u64>` of one entry: the [`super::LAYOUT_STAMP`] of the program that created
    /// the maps. A daemon adopts pinned maps only when the stamp is its own.
    pub const LAYOUT: &str = "SG_LAYOUT";
    /// `PerCpuArray<u64>` of one entry: a word the parser stores an offset into and reads
    /// back, so the verifier merges the paths that reach a layer at different offsets.
    pub const SCRATCH: &str = "SG_SCRATCH";
    /// `LruHashMap<[u8; 16], CanarySighting>`: while a canary runs, each source (IPv4 as
    /// `::ffff:a.b.c.d`) whose verdict the candidate policy would change, and how often.
    pub const CANARY: &str = "SG_CANARY";
    /// `PerCpuArray<CanarySighting>` of one entry: where the program builds a new canary
    /// sighting before inserting it (the stack has no room).
    pub const CANARY_NEW: &str = "SG_CANARY_NEW";

    /// Every map, in a stable order (pinning, listing, tests).
    pub const ALL: [&str; 26] = [
        ACTIVE_SLOT,
        SLOT_CONFIG,
        SCOPES,
        DST_V4_SLOT0,
        DST_V4_SLOT1,
        DST_V6_SLOT0,
        DST_V6_SLOT1,
        V4_SLOT0,
        V4_SLOT1,
        V6_SLOT0,
        V6_SLOT1,
        V4_GUARD,
        V4_COARSE,
        V6_GUARD,
        V4_TOP,
        V4_BLOCKS_SLOT0,
        V4_BLOCKS_SLOT1,
        RECORD_BUDGET,
        PREFIX_HITS,
        GLOBAL,
        OFFENDERS,
        IFACES,
        LAYOUT,
        SCRATCH,
        CANARY,
        CANARY_NEW,
    ];
}

/// Name of the XDP program inside the object, for interfaces with an Ethernet header.
pub const PROGRAM_NAME: &str = "smtpguard";

/// Name of the XDP program for layer-3 interfaces (TUN, WireGuard, PPP, IP tunnels): the
/// frame starts at the IP header.
pub const PROGRAM_NAME_L3: &str = "smtpguard_l3";

/// Name of the benchmark floor in the object: a program that drops every frame.
pub const FLOOR_PROGRAM_NAME: &str = "xdp_floor";

/// Number of policy slots. The daemon writes the slot the program is not reading, then flips
/// [`map_name::ACTIVE_SLOT`] with one 4-byte store: a packet sees the old policy or the new one.
pub const SLOTS: u32 = 2;

/// Upper bound on prefixes per family and slot. LPM tries are created with `BPF_F_NO_PREALLOC`,
/// so this is a limit, not memory that is reserved up front.
pub const MAX_PREFIXES_PER_FAMILY: u32 = 4 << 20;

/// Upper bound on live per-prefix counters (both families, both slots).
pub const MAX_PREFIX_COUNTERS: u32 = 2 * MAX_PREFIXES_PER_FAMILY;

/// Words of one slot's IPv4 guard bitmap: 2^24 bits, one per /24 (2 MiB).
pub const V4_GUARD_WORDS: usize = 1 << 19;
/// Words of one slot's coarse IPv4 guard bitmap: 2^20 bits, one per /20 (128 KiB).
pub const V4_COARSE_WORDS: usize = 1 << 15;

/// Entries of one slot's IPv4 top table: one per /16 (512 KiB).
pub const V4_TOP_ENTRIES: usize = 1 << 16;
/// Upper bound on the /24 blocks of one slot's IPv4 table. The hash is created with
/// `BPF_F_NO_PREALLOC`, so its entries take memory as they come, but the kernel sizes its
/// bucket array by this bound up front (16 bytes a bucket: 16 MiB per slot). A policy that
/// needs more leaves the table off for its slot (the trie decides).
pub const MAX_V4_BLOCKS: u32 = 1 << 20;
/// Ranges one [`V4Block`] holds: a /24 with more is left to the trie.
pub const V4_BLOCK_RANGES: usize = 8;

/// How one IPv4 /24 is decided: up to [`V4_BLOCK_RANGES`] ranges of its last byte, in
/// ascending order of their first address, the first starting at 0. Each is a
/// [`v4_table`] word with `USED` set and its first address at `START_SHIFT`; the range runs
/// to the next used one. `WALK` on the first means the trie decides this /24.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct V4Block {
    pub ranges: [u64; V4_BLOCK_RANGES],
}
const _: () = assert!(size_of::<V4Block>() == 64);

/// The words of the IPv4 table ([`map_name::V4_TOP`], [`V4Block`]): a rule in one `u64`.
pub mod v4_table {
    /// Bits 0-31: the deciding prefix's counter id. Bits 32-39: its [`super::action`].
    pub const ACTION_SHIFT: u32 = 32;
    /// A prefix decides (else the range is unlisted).
    pub const LISTED: u64 = 1 << 40;
    /// Bits 48-55 of a block's range: its first address's last byte.
    pub const START_SHIFT: u32 = 48;
    /// A block's range that is in use.
    pub const USED: u64 = 1 << 56;
    /// On a /16's word: some of its /24s are in the blocks hash (the rest take this word).
    pub const DEEPER: u64 = 1 << 62;
    /// On a block's first range: the trie decides this /24.
    pub const WALK: u64 = 1 << 63;

    /// The word of a listed rule.
    #[inline(always)]
    pub const fn rule(action: u32, counter_id: u32) -> u64 {
        LISTED | ((action as u64 & 0xff) << ACTION_SHIFT) | counter_id as u64
    }
}

/// Words of one slot's IPv6 guard bitmap: 2^24 bits (2 MiB), one per hash of a /32.
pub const V6_GUARD_WORDS: usize = 1 << 19;

/// The bit of [`map_name::V6_GUARD`] for the IPv6 /32 whose first 32 bits are `top`
/// (big-endian): Fibonacci hashing, whose top 24 bits spread neighbouring /32s apart.
#[inline(always)]
pub const fn v6_guard_bit(top: u32) -> u32 {
    top.wrapping_mul(0x9e37_79b1) >> 8
}

/// Stopped SYNs a CPU records exactly in the table of stopped sources per second; beyond
/// that (a flood), one in [`RECORD_SAMPLE`] is recorded and the rest counted as skipped. The
/// same holds, with a budget of its own, for the SYNs a canary records.
pub const RECORD_BUDGET_PER_SECOND: u64 = 4096;
/// Budgets in [`map_name::RECORD_BUDGET`]: one per table a flood could fill.
pub mod budget {
    /// The table of stopped sources.
    pub const OFFENDERS: u32 = 0;
    /// The canary's table of sources whose verdict its candidate changes.
    pub const CANARY: u32 = 1;
    pub const COUNT: u32 = 2;
}
/// Sampling rate beyond the budget.
pub const RECORD_SAMPLE: u64 = 64;

/// Per-CPU state of the recording budget.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RecordBudget {
    /// `bpf_ktime_get_boot_ns` at which the current one-second window ends.
    pub window_end_ns: u64,
    /// Stopped SYNs seen in the window.
    pub used: u64,
}
const _: () = assert!(size_of::<RecordBudget>() == 16);

/// Sources remembered in [`map_name::OFFENDERS`].
#[cfg(not(feature = "layout-bump"))]
pub const MAX_OFFENDERS: u32 = 65536;
/// A different table size: a build whose map layout differs, for the upgrade tests.
#[cfg(feature = "layout-bump")]
pub const MAX_OFFENDERS: u32 = 32768;

/// The slot of the table of stopped sources ([`map_name::OFFENDERS`], `slots` long, a power
/// of two) that a source hashes to; the source as the two 8-byte words of its 16-byte form
/// (IPv4 as `::ffff:a.b.c.d`), in memory order. Fibonacci hashing: the top bits of the
/// product spread neighbouring addresses apart.
#[inline(always)]
pub const fn offender_slot(high: u64, low: u64, slots: u32) -> u32 {
    let hash = high ^ low.rotate_left(29);
    ((hash.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 48) as u32) & (slots - 1)
}

/// Interfaces one daemon may attach to.
pub const MAX_INTERFACES: u32 = 256;

/// Words in the guarded-port bitmap: one bit for each of the 65536 TCP ports.
pub const PORT_WORDS: usize = 65536 / 32;

/// Scope ids a policy may use: the default scope (0) and up to 255 `[[scope]]`s.
pub const MAX_SCOPES: u32 = 256;

/// Destination prefixes all scopes of a slot may name, per family.
pub const MAX_SCOPE_DESTINATIONS: u32 = 65536;

/// Per-slot settings the program reads on every guarded SYN.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SlotConfig {
    /// Incremented by the daemon on every apply; lets `stats` tell which policy is in force.
    pub generation: u32,
    /// 1 when this slot's IPv4 guard bitmap ([`map_name::V4_GUARD`]) is written and may be
    /// trusted; 0 sends every IPv4 source to the trie.
    pub v4_guard: u32,
    /// 1 when the slot has destination scopes: the destination is looked up to find the
    /// scope. 0 (the common case) decides every SYN in scope 0 without that lookup.
    pub scoped: u32,
    /// 1 when no guarded scope enforces (all audit): a frame too opaque to decide is passed
    /// and counted rather than dropped.
    pub audit_only: u32,
    /// 1 on the active slot while a canary runs: the other slot holds a candidate policy,
    /// and every SYN is also decided by it, only to record where the two differ
    /// ([`map_name::CANARY`]). Read on every SYN: off, it costs one branch.
    pub canary: u32,
    /// 1 when this slot's IPv6 guard bitmap ([`map_name::V6_GUARD`]) is written and may be
    /// trusted; 0 sends every IPv6 source to the trie.
    pub v6_guard: u32,
    /// 1 when this slot's IPv4 table ([`map_name::V4_TOP`], its blocks hash) is written and
    /// decides IPv4 sources; 0 sends them to the trie. Never set with `scoped`.
    pub v4_table: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<SlotConfig>() == 32);

/// How one scope of a policy slot decides.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ScopeConfig {
    /// Bit `p % 32` of word `p / 32` is set when TCP destination port `p` is guarded.
    pub ports: [u32; PORT_WORDS],
    /// One of [`mode`]: whether the verdicts are carried out or only counted.
    pub mode: u32,
    /// One of [`action`] (`DROP` or `REJECT`): what happens to a SYN no prefix matches.
    pub unlisted_action: u32,
    /// 1 when SYNs in this scope are decided; 0 leaves them alone (a default scope without
    /// rules of its own, beside `[[scope]]`s).
    pub guarded: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<ScopeConfig>() == PORT_WORDS * 4 + 16);

impl ScopeConfig {
    pub const EMPTY: Self = Self {
        ports: [0; PORT_WORDS],
        mode: mode::ENFORCE,
        unlisted_action: action::DROP,
        guarded: 0,
        _pad: 0,
    };

    /// Whether TCP destination `port` is guarded in this scope.
    #[inline(always)]
    pub fn guards(&self, port: u16) -> bool {
        let word = (port >> 5) as usize;
        match self.ports.get(word) {
            Some(bits) => bits & (1u32 << (port & 31)) != 0,
            None => false,
        }
    }

    /// Marks TCP destination `port` as guarded.
    pub fn guard(&mut self, port: u16) {
        let word = (port >> 5) as usize;
        if let Some(bits) = self.ports.get_mut(word) {
            *bits |= 1u32 << (port & 31);
        }
    }
}

/// What a reply sent back out of an interface needs: written by the daemon when it attaches.
/// A frame from an interface with no entry is never answered (a reject becomes a drop).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceInfo {
    /// The interface's own MAC address: a reset answers only frames sent to it.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// Bits of [`iface`].
    pub flags: u32,
    pub _pad2: u32,
}
const _: () = assert!(size_of::<IfaceInfo>() == 16);

/// Flags of [`IfaceInfo`].
pub mod iface {
    /// Frames start at the IP header (TUN, WireGuard, PPP, IP tunnels): no MACs to check or swap.
    pub const LAYER3: u32 = 1;
    /// A reset may be sent back out of this interface. Clear where the NIC strips VLAN tags
    /// before XDP sees the frame in native mode: the tag cannot be read back, and a reset
    /// without it would leave on the wrong VLAN.
    pub const REPLIES: u32 = 2;
}

/// What happens to a guarded SYN: the action of the matching trie entry, or the slot's
/// `unlisted_action`. Raw `u32` codes, not an enum: the program must never trust a value it
/// reads from a map to be a valid discriminant (an unknown code drops).
pub mod action {
    /// Passed to the kernel's TCP stack.
    pub const ALLOW: u32 = 1;
    /// Dropped silently: the sender retries into a timeout.
    pub const DROP: u32 = 2;
    /// Answered from XDP with a TCP RST (XDP_TX): the sender's connect fails at once.
    pub const REJECT: u32 = 3;
}

/// Whether a slot's verdicts are carried out.
pub mod mode {
    /// Drop or reject as the policy says.
    pub const ENFORCE: u32 = 1;
    /// Pass everything; count what enforce mode would have stopped.
    pub const AUDIT: u32 = 2;
}

/// Value stored in the LPM tries for one prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleValue {
    /// One of [`action`]: what a SYN whose longest match is this prefix gets. A deny prefix an
    /// allow match outranks carries the action of the entry that outranks it.
    pub action: u8,
    /// 1 when the prefix is on the deny list, whatever its action.
    pub deny: u8,
    /// 1 for a deny prefix another entry outranks: `action` and `counter_id` are that entry's
    /// (its SYNs count where they were decided).
    pub outranked: u8,
    pub _pad: u8,
    /// Key in [`map_name::PREFIX_HITS`] of the counter this prefix's SYNs count in: its own,
    /// stable while the prefix stays in the policy, so it keeps counting across reloads.
    pub counter_id: u32,
}
const _: () = assert!(size_of::<RuleValue>() == 8);

/// Bytes of a source trie key's data: the scope id, then the address.
pub const V4_KEY_BYTES: usize = 4 + 4;
/// The same for IPv6.
pub const V6_KEY_BYTES: usize = 4 + 16;

/// Indices into the global per-CPU counter array.
pub mod counter {
    /// Guarded SYNs whose source matched an allow prefix (passed).
    pub const SYN_ALLOWED: u32 = 0;
    /// Guarded SYNs whose source matched a deny prefix (dropped or rejected; passed in audit mode).
    pub const SYN_DENIED: u32 = 1;
    /// Guarded SYNs whose source matched no prefix (dropped or rejected; passed in audit mode).
    pub const SYN_UNLISTED: u32 = 2;
    /// Packets the program dropped.
    pub const DROPPED: u32 = 3;
    /// Frames too short or malformed to parse, passed (the kernel drops them too).
    pub const PASSED_UNPARSED: u32 = 4;
    /// Packets whose TCP ports or flags were out of the program's sight (a first fragment that
    /// stops early, a long IPv6 extension chain): decided by source as if they were guarded SYNs.
    pub const HIDDEN_DECIDED: u32 = 5;
    /// Non-first fragments, passed (the first fragment carries the decision).
    pub const PASSED_FRAGMENTS: u32 = 6;
    /// Guarded SYNs answered with a TCP RST (reject action, enforce mode).
    pub const REJECTED: u32 = 7;
    /// Guarded SYNs enforce mode would have dropped or rejected, passed in audit mode.
    pub const WOULD_BLOCK: u32 = 8;
    /// Stopped SYNs not recorded in the table of stopped sources (sampled, over budget).
    pub const UNRECORDED: u32 = 9;
    /// Frames dropped because the parser could not read them far enough to rule out a SYN to
    /// a guarded port (more VLAN tags or tunnel levels than followed, an inner header out of
    /// sight, a GRE payload it does not read): never passed unseen.
    pub const OPAQUE_DROPPED: u32 = 10;
    /// Stopped SYNs a reset was not sent for (not addressed to this host, a FIN or RST in the
    /// SYN, a tunnelled SYN, an interface whose VLAN tags are stripped): dropped instead.
    pub const RESET_WITHHELD: u32 = 11;
    /// Guarded SYNs found inside a tunnel (IPIP, 6in4, GRE, IPv6-in-IPv6) and decided by
    /// their inner source.
    pub const TUNNELLED: u32 = 12;
    /// SYNs the running policy let through that a canary's candidate would stop.
    pub const CANARY_NEWLY_BLOCKED: u32 = 13;
    /// SYNs the running policy stopped that a canary's candidate would let through.
    pub const CANARY_NEWLY_ALLOWED: u32 = 14;
    /// SYNs a canary's candidate would change, counted above, whose source the per-CPU
    /// budget kept out of the canary's table of sources (a flood of new sources is sampled;
    /// a source already there is always counted).
    pub const CANARY_UNRECORDED: u32 = 15;
    /// Number of global counters. Indices are only ever added at the end: an upgrade
    /// carries counters over by index.
    pub const COUNT: u32 = 16;
}

/// Sources a canary remembers: the least recently seen go first when it is full (the global
/// counters stay exact).
pub const MAX_CANARY_SOURCES: u32 = 16384;

/// What decided a SYN, on one side of a canary: a prefix's counter id, or one of these.
pub mod canary_rule {
    /// No prefix matched: the scope's action for unlisted sources.
    pub const UNLISTED: u32 = u32::MAX - 1;
    /// The destination port (or the destination's scope) is not guarded by that policy.
    pub const NOT_GUARDED: u32 = u32::MAX;
}

/// What [`map_name::CANARY`] records about one source whose verdict a candidate changes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CanarySighting {
    /// SYNs the running policy passed and the candidate would stop.
    pub newly_blocked: u64,
    /// SYNs the running policy stopped and the candidate would pass.
    pub newly_allowed: u64,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// The counter id of the running policy's deciding prefix, or a [`canary_rule`] code.
    pub running_rule: u32,
    /// The same in the candidate policy.
    pub candidate_rule: u32,
    /// The scope that decided, in the running policy and in the candidate.
    pub running_scope: u32,
    pub candidate_scope: u32,
}
const _: () = assert!(size_of::<CanarySighting>() == 48);

/// What [`map_name::OFFENDERS`] remembers about one source. Times are `bpf_ktime_get_boot_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offender {
    /// The source (IPv4 as `::ffff:a.b.c.d`); all zero in an empty slot.
    pub addr: [u8; 16],
    /// Guarded SYNs dropped or rejected in enforce mode.
    pub blocked: u64,
    /// Guarded SYNs passed in audit mode that enforce mode would have stopped.
    pub would_block: u64,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// The scope of the last SYN counted here.
    pub scope: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<Offender>() == 56);

/// One map as the program declares it: what a pinned map must match to be reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub name: &'static str,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

const fn layout(
    name: &'static str,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
) -> MapLayout {
    MapLayout {
        name,
        key_size: key_size as u32,
        value_size: value_size as u32,
        max_entries,
    }
}

/// Every map's layout, in the order of [`map_name::ALL`]. LPM trie keys carry a 4-byte
/// prefix length before the address.
pub const MAP_LAYOUTS: [MapLayout; 26] = [
    layout(map_name::ACTIVE_SLOT, 4, 4, 1),
    layout(map_name::SLOT_CONFIG, 4, size_of::<SlotConfig>(), SLOTS),
    layout(
        map_name::SCOPES,
        4,
        size_of::<ScopeConfig>(),
        SLOTS * MAX_SCOPES,
    ),
    layout(map_name::DST_V4_SLOT0, 8, 4, MAX_SCOPE_DESTINATIONS),
    layout(map_name::DST_V4_SLOT1, 8, 4, MAX_SCOPE_DESTINATIONS),
    layout(map_name::DST_V6_SLOT0, 20, 4, MAX_SCOPE_DESTINATIONS),
    layout(map_name::DST_V6_SLOT1, 20, 4, MAX_SCOPE_DESTINATIONS),
    layout(
        map_name::V4_SLOT0,
        4 + V4_KEY_BYTES,
        size_of::<RuleValue>(),
        MAX_PREFIXES_PER_FAMILY,
    ),
    layout(
        map_name::V4_SLOT1,
        4 + V4_KEY_BYTES,
        size_of::<RuleValue>(),
        MAX_PREFIXES_PER_FAMILY,
    ),
    layout(
        map_name::V6_SLOT0,
        4 + V6_KEY_BYTES,
        size_of::<RuleValue>(),
        MAX_PREFIXES_PER_FAMILY,
    ),
    layout(
        map_name::V6_SLOT1,
        4 + V6_KEY_BYTES,
        size_of::<RuleValue>(),
        MAX_PREFIXES_PER_FAMILY,
    ),
    layout(map_name::V4_GUARD, 4, V4_GUARD_WORDS * 4, SLOTS),
    layout(map_name::V4_COARSE, 4, V4_COARSE_WORDS * 4, SLOTS),
    layout(map_name::V6_GUARD, 4, V6_GUARD_WORDS * 4, SLOTS),
    layout(map_name::V4_TOP, 4, V4_TOP_ENTRIES * 8, SLOTS),
    layout(
        map_name::V4_BLOCKS_SLOT0,
        4,
        size_of::<V4Block>(),
        MAX_V4_BLOCKS,
    ),
    layout(
        map_name::V4_BLOCKS_SLOT1,
        4,
        size_of::<V4Block>(),
        MAX_V4_BLOCKS,
    ),
    layout(
        map_name::RECORD_BUDGET,
        4,
        size_of::<RecordBudget>(),
        budget::COUNT,
    ),
    layout(map_name::PREFIX_HITS, 4, 8, MAX_PREFIX_COUNTERS),
    layout(map_name::GLOBAL, 4, 8, counter::COUNT),
    layout(map_name::OFFENDERS, 4, size_of::<Offender>(), MAX_OFFENDERS),
    layout(map_name::IFACES, 4, size_of::<IfaceInfo>(), MAX_INTERFACES),
    layout(map_name::LAYOUT, 4, 8, 1),
    layout(map_name::SCRATCH, 4, 8, 1),
    layout(
        map_name::CANARY,
        16,
        size_of::<CanarySighting>(),
        MAX_CANARY_SOURCES,
    ),
    layout(map_name::CANARY_NEW, 4, size_of::<CanarySighting>(), 1),
];

/// Bumped by hand when the meaning of a map's bytes changes without its sizes changing.
const LAYOUT_REVISION: u64 = 5;

/// A fingerprint of [`MAP_LAYOUTS`] and [`LAYOUT_REVISION`] (FNV-1a): two builds share
/// pinned maps only when their stamps are equal.
pub const LAYOUT_STAMP: u64 = {
    const fn mix(mut hash: u64, bytes: &[u8]) -> u64 {
        let mut i = 0;
        while i < bytes.len() {
            hash ^= bytes[i] as u64;
            hash = hash.wrapping_mul(0x0100_0000_01b3);
            i += 1;
        }
        hash
    }
    let mut hash = mix(0xcbf2_9ce4_8422_2325, &LAYOUT_REVISION.to_le_bytes());
    let mut i = 0;
    while i < MAP_LAYOUTS.len() {
        let map = MAP_LAYOUTS[i];
        hash = mix(hash, map.name.as_bytes());
        hash = mix(hash, &map.key_size.to_le_bytes());
        hash = mix(hash, &map.value_size.to_le_bytes());
        hash = mix(hash, &map.max_entries.to_le_bytes());
        i += 1;
    }
    #[cfg(feature = "layout-bump")]
    {
        hash ^= 1;
    }
    hash
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: both types are `#[repr(C)]`, made only of integers, with no implicit padding
    // (checked by the size assertions beside them).
    unsafe impl aya::Pod for super::SlotConfig {}
    unsafe impl aya::Pod for super::ScopeConfig {}
    unsafe impl aya::Pod for super::RuleValue {}
    unsafe impl aya::Pod for super::Offender {}
    unsafe impl aya::Pod for super::RecordBudget {}
    unsafe impl aya::Pod for super::IfaceInfo {}
    unsafe impl aya::Pod for super::CanarySighting {}
    unsafe impl aya::Pod for super::V4Block {}
}
