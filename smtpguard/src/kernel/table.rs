//! The IPv4 table: the IPv4 prefixes of a policy without destination scopes, laid out so the
//! program decides a source in two or three reads instead of a trie walk (the DIR-24-8 idea,
//! with the second level kept small). One word per /16 says what decides it; a /16 that a
//! longer prefix overlaps is `DEEPER`, and each /24 such a prefix overlaps has a block of up
//! to eight ranges of its last byte. A /24 with more ranges is left to the trie (`WALK`),
//! which holds every prefix and stays the source of truth.
//!
//! Built from the same entries the trie gets, so both give the longest prefix's rule: the
//! kernel tests and the fuzzers check it through the real program.

use std::{mem::size_of, ops::Range, os::fd::AsFd as _};

use aya::maps::{Array, HashMap as KernelHashMap, IterableMap as _, MapData, MapError};
use ipnet::{IpNet, Ipv4Net};
use smtpguard_common::{
    MAX_V4_BLOCKS, RuleValue, V4_BLOCK_RANGES, V4_TOP_ENTRIES, V4Block, map_name, v4_table,
};

use crate::kernel::{
    batch,
    maps::{ApplyError, SlotKey},
};

/// The table's maps (the /16 words of both slots, a blocks hash per slot) and the blocks each
/// slot holds.
pub struct TableMaps {
    top: Array<MapData, [u64; V4_TOP_ENTRIES]>,
    blocks: [KernelHashMap<MapData, u32, V4Block>; 2],
    /// The /24 blocks each slot holds, in key order, as written by this process; `None` when
    /// that is not known (a write failed, or reading the map back did): the map is read
    /// again before the slot's table is next written, and the table stays off while it
    /// cannot be.
    held: [Option<Vec<(u32, V4Block)>>; 2],
}

impl TableMaps {
    pub fn new(
        top: Array<MapData, [u64; V4_TOP_ENTRIES]>,
        blocks: [KernelHashMap<MapData, u32, V4Block>; 2],
    ) -> Self {
        Self {
            top,
            blocks,
            held: [Some(Vec::new()), Some(Vec::new())],
        }
    }

    /// Forgets what `slot`'s blocks hash holds (a pinned map a previous daemon wrote): it is
    /// read back when the slot's table is next written, not at start.
    pub fn recover(&mut self, slot: usize) {
        self.held[slot] = None;
    }

    /// The blocks `slot` holds, read back from the kernel, in key order.
    fn read(&self, slot: usize) -> Result<Vec<(u32, V4Block)>, MapError> {
        let mut blocks = self.blocks[slot].iter().collect::<Result<Vec<_>, _>>()?;
        blocks.sort_unstable_by_key(|(key, _)| *key);
        Ok(blocks)
    }

    /// Writes `slot`'s table for the scope-0 IPv4 prefixes of `target`: its /16 words whole,
    /// its /24 blocks by difference with what the slot holds. Says why not, writing nothing,
    /// for a policy whose prefixes could need more blocks than the map takes, or when what
    /// the slot holds cannot be read back: the trie decides then.
    pub fn write(
        &mut self,
        slot: u32,
        target: &[(SlotKey, RuleValue)],
    ) -> Result<TableUse, ApplyError> {
        let index = slot as usize;
        let entries = || {
            target.iter().filter_map(|((scope, net), value)| match net {
                IpNet::V4(net) if *scope == 0 => Some((net, value)),
                _ => None,
            })
        };
        if let Some(blocks) = too_many_blocks(entries().map(|(net, _)| net)) {
            return Ok(TableUse::TooLarge { blocks });
        }
        let Some(previous) = self.take_held(index) else {
            return Ok(TableUse::Unreadable);
        };
        let table = build(entries());
        let top: &[u64; V4_TOP_ENTRIES] = &table.top;
        self.top
            .set(slot, top, 0)
            .map_err(|source| ApplyError::Write {
                map: map_name::V4_TOP,
                what: format!("slot {slot} IPv4 table"),
                source,
            })?;
        let mut stale: Vec<u8> = Vec::new();
        let (mut keys, mut values): (Vec<u8>, Vec<u8>) = (Vec::new(), Vec::new());
        let mut held = previous.iter().peekable();
        for (key, block) in &table.blocks {
            while let Some((old, _)) = held.next_if(|(old, _)| old < key) {
                stale.extend_from_slice(&old.to_ne_bytes());
            }
            match held.next_if(|(old, _)| old == key) {
                Some((_, old)) if old == block => {}
                _ => {
                    keys.extend_from_slice(&key.to_ne_bytes());
                    for range in block.ranges {
                        values.extend_from_slice(&range.to_ne_bytes());
                    }
                }
            }
        }
        for (old, _) in held {
            stale.extend_from_slice(&old.to_ne_bytes());
        }
        let fd = self.blocks[index].map().fd().as_fd();
        let outcome = batch::delete_present(fd, &stale, size_of::<u32>()).and_then(|()| {
            batch::update(fd, &keys, size_of::<u32>(), &values, size_of::<V4Block>())
        });
        if let Err((_, source)) = outcome {
            // `held[index]` stays `None`: read back before the next write.
            return Err(ApplyError::Batch {
                map: blocks_name(index),
                what: format!("{} IPv4 table blocks", table.blocks.len()),
                source,
            });
        }
        self.held[index] = Some(table.blocks);
        crate::reclaim::drop_later(previous);
        Ok(TableUse::On)
    }

    /// The blocks `slot` holds, taken from the record (`held[slot]` is `None` until it is
    /// given back), or read back from the kernel where the record is not known; `None` where
    /// that fails too.
    fn take_held(&mut self, slot: usize) -> Option<Vec<(u32, V4Block)>> {
        self.held[slot].take().or_else(|| self.read(slot).ok())
    }

    /// How many blocks `slot`'s hash holds in the kernel.
    pub fn blocks_in_kernel(&self, slot: usize) -> Result<usize, ApplyError> {
        self.blocks[slot]
            .keys()
            .try_fold(0, |count, key| key.map(|_| count + 1))
            .map_err(|source| ApplyError::Read {
                map: blocks_name(slot),
                source,
            })
    }

    /// Deletes the blocks `slot` holds, for a policy in force that leaves its table off: the
    /// program does not read them then, and a million of them hold over 100 MiB of kernel
    /// memory. Done after the flip, since a million take a second. What cannot be deleted
    /// stays until the slot's table is next written (by difference).
    pub fn empty(&mut self, slot: u32) {
        let index = slot as usize;
        let Some(held) = self.take_held(index) else {
            return;
        };
        if held.is_empty() {
            self.held[index] = Some(held);
            return;
        }
        let keys: Vec<u8> = held.iter().flat_map(|(key, _)| key.to_ne_bytes()).collect();
        let fd = self.blocks[index].map().fd().as_fd();
        match batch::delete_present(fd, &keys, size_of::<u32>()) {
            Ok(()) => self.held[index] = Some(Vec::new()),
            Err((_, error)) => log::warn!(
                "the {} blocks of the slot {slot} IPv4 table, which is off, stay in the kernel: {error}",
                held.len()
            ),
        }
        crate::reclaim::drop_later(held);
    }
}

/// Whether a slot's IPv4 table decides, and if not, why the trie does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableUse {
    On,
    /// The policy has destination scopes: the table holds one scope only.
    Scoped,
    /// Its prefixes longer than /16 reach this many /24s, more than the map takes (a bound,
    /// where it is past twice the limit).
    TooLarge {
        blocks: u64,
    },
    /// What the slot's blocks hash holds could not be read back to write it by difference.
    Unreadable,
    /// Writing it failed (the error).
    Failed(String),
}

impl TableUse {
    pub fn on(&self) -> bool {
        *self == Self::On
    }
}

impl std::fmt::Display for TableUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::On => write!(f, "on"),
            Self::Scoped => write!(
                f,
                "off (the policy has destination scopes; the trie decides)"
            ),
            Self::TooLarge { blocks } => write!(
                f,
                "off (prefixes longer than /16 reach {blocks} /24s, more than the {MAX_V4_BLOCKS} the table takes; the trie decides)"
            ),
            Self::Unreadable => write!(
                f,
                "off (what the table holds could not be read back; the trie decides)"
            ),
            Self::Failed(error) => write!(f, "off (writing it failed: {error}; the trie decides)"),
        }
    }
}

/// How many /24 blocks `nets` need, if more than the map takes; counted before anything is
/// built. The quick bound (the blocks each prefix reaches, summed) counts a /24 once for each
/// prefix that reaches it; only when it is over the limit are the distinct /24s counted, from
/// the prefixes' ranges (not /24 by /24). A bound past twice the limit is refused at once:
/// building would list that many pieces first.
fn too_many_blocks<'a>(nets: impl Iterator<Item = &'a Ipv4Net> + Clone) -> Option<u64> {
    let limit = u64::from(MAX_V4_BLOCKS);
    let bound: u64 = nets
        .clone()
        .map(|net| blocks_reached(net).len() as u64)
        .sum();
    if bound <= limit {
        return None;
    }
    if bound > 2 * limit {
        return Some(bound);
    }
    let blocks = distinct_blocks(nets.map(blocks_reached));
    (blocks > limit).then_some(blocks)
}

/// The /24 blocks a prefix longer than /16 overlaps, by /24 index: every /24 of a /17-/24,
/// the one /24 of a longer prefix; none for a /16 or shorter (its /16 words decide).
fn blocks_reached(net: &Ipv4Net) -> Range<u32> {
    let first = u32::from(net.network()) >> 8;
    match net.prefix_len() {
        0..=16 => first..first,
        len @ 17..=24 => first..first + (1 << (24 - len)),
        _ => first..first + 1,
    }
}

/// How many /24s `ranges` cover together.
fn distinct_blocks(ranges: impl Iterator<Item = Range<u32>>) -> u64 {
    let mut ranges: Vec<(u32, u32)> = ranges.map(|range| (range.start, range.end)).collect();
    ranges.sort_unstable();
    let mut blocks = 0u64;
    let mut covered_to = 0u32;
    for (first, end) in ranges {
        let first = first.max(covered_to);
        if end > first {
            blocks += u64::from(end - first);
            covered_to = end;
        }
    }
    blocks
}

fn blocks_name(slot: usize) -> &'static str {
    if slot == 0 {
        map_name::V4_BLOCKS_SLOT0
    } else {
        map_name::V4_BLOCKS_SLOT1
    }
}

/// One slot's table: the /16 words and the /24 blocks, in key order.
pub struct V4Table {
    pub top: Box<[u64; V4_TOP_ENTRIES]>,
    pub blocks: Vec<(u32, V4Block)>,
}

/// The word of `value`'s rule.
fn word(value: &RuleValue) -> u64 {
    v4_table::rule(u32::from(value.action), value.counter_id)
}

/// The table for `entries` (IPv4 prefixes of one scope, in any order; at most one entry per
/// prefix).
pub fn build<'a>(entries: impl Iterator<Item = (&'a Ipv4Net, &'a RuleValue)>) -> V4Table {
    let mut top: Box<[u64; V4_TOP_ENTRIES]> = vec![0u64; V4_TOP_ENTRIES]
        .into_boxed_slice()
        .try_into()
        .expect("V4_TOP_ENTRIES words");
    let mut short: Vec<(u8, u32, u64)> = Vec::new();
    // Each /24 a prefix longer than /16 overlaps: (block, length, first host, word).
    let mut pieces: Vec<(u32, u8, u8, u64)> = Vec::new();
    for (net, value) in entries {
        let (start, len) = (u32::from(net.network()), net.prefix_len());
        match len {
            0..=16 => short.push((len, start >> 16, word(value))),
            17..=24 => {
                pieces.extend(blocks_reached(net).map(|block| (block, len, 0, word(value))));
            }
            _ => pieces.push((start >> 8, len, start as u8, word(value))),
        }
    }
    // Shorter prefixes first, so a longer one paints over what it is inside.
    short.sort_unstable_by_key(|&(len, first, _)| (len, first));
    for (len, first, word) in short {
        let first = first as usize;
        top[first..first + (1 << (16 - len))].fill(word);
    }
    for &(block, ..) in &pieces {
        top[(block >> 8) as usize] |= v4_table::DEEPER;
    }
    pieces.sort_unstable_by_key(|&(block, len, host, _)| (block, len, host));
    let mut blocks = Vec::new();
    for group in pieces.chunk_by(|a, b| a.0 == b.0) {
        let block = group[0].0;
        let covering = top[(block >> 8) as usize] & !v4_table::DEEPER;
        blocks.push((block, block_of(covering, group)));
    }
    V4Table { top, blocks }
}

/// The block of one /24: `covering` decides what no piece does; `pieces` (of this /24, by
/// ascending length) paint over it, longer over shorter.
fn block_of(covering: u64, pieces: &[(u32, u8, u8, u64)]) -> V4Block {
    let mut base = covering;
    let mut inside = Vec::new();
    for &(_, len, host, word) in pieces {
        if len <= 24 {
            base = word;
        } else {
            inside.push((len, host, word));
        }
    }
    // Ranges as (first host, word), ascending, neighbours differing.
    let mut ranges: Vec<(u16, u64)> = Vec::with_capacity(3);
    match inside.as_slice() {
        [] => ranges.push((0, base)),
        &[(len, host, word)] => {
            let (first, end) = (u16::from(host), u16::from(host) + (1 << (32 - len)));
            if first > 0 {
                ranges.push((0, base));
            }
            ranges.push((first, word));
            if end < 256 {
                ranges.push((end, base));
            }
        }
        _ => {
            let mut hosts = [base; 256];
            for &(len, host, word) in &inside {
                let first = usize::from(host);
                hosts[first..first + (1 << (32 - len))].fill(word);
            }
            for (host, &word) in hosts.iter().enumerate() {
                if ranges.last().is_none_or(|&(_, last)| last != word) {
                    ranges.push((host as u16, word));
                }
            }
        }
    }
    let mut out = V4Block::default();
    if ranges.len() > V4_BLOCK_RANGES {
        out.ranges[0] = v4_table::WALK;
        return out;
    }
    for (slot, (first, word)) in out.ranges.iter_mut().zip(ranges) {
        *slot = word | v4_table::USED | u64::from(first) << v4_table::START_SHIFT;
    }
    out
}

/// What the program makes of `table` for `addr` (a mirror of its lookup, for the tests
/// here): the word, or `WALK`.
#[cfg(test)]
fn decide(table: &V4Table, addr: u32) -> u64 {
    let word = table.top[(addr >> 16) as usize];
    if word & v4_table::DEEPER == 0 {
        return word;
    }
    let Ok(index) = table
        .blocks
        .binary_search_by_key(&(addr >> 8), |(key, _)| *key)
    else {
        return word;
    };
    let block = &table.blocks[index].1;
    if block.ranges[0] & v4_table::WALK != 0 {
        return v4_table::WALK;
    }
    let host = u64::from(addr & 0xff);
    let mut found = block.ranges[0];
    for &range in &block.ranges[1..] {
        if range & v4_table::USED != 0 && (range >> v4_table::START_SHIFT) & 0xff <= host {
            found = range;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn value(id: u32) -> RuleValue {
        RuleValue {
            action: (id % 3 + 1) as u8,
            deny: 0,
            outranked: 0,
            _pad: 0,
            counter_id: id,
        }
    }

    /// Longest prefix match by brute force.
    fn longest(entries: &BTreeMap<Ipv4Net, RuleValue>, addr: u32) -> Option<RuleValue> {
        entries
            .iter()
            .filter(|(net, _)| net.contains(&std::net::Ipv4Addr::from(addr)))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, value)| *value)
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }

    #[test]
    fn every_address_gets_the_longest_prefix_or_walks() {
        for seed in 0..40 {
            let mut rng = Rng(seed);
            let mut entries = BTreeMap::new();
            // Nested prefixes of every length inside a few /16s, so blocks fill up and some
            // overflow; a few short ones around them.
            let bases = [0x0a00_0000u32, 0x0a01_0000, 0xc000_0200, 0x5910_b800];
            for id in 1..=(rng.next() % 60 + 1) as u32 {
                let base = bases[(rng.next() % 4) as usize];
                let len = (rng.next() % 33) as u8;
                let addr = base | (rng.next() as u32 & 0x0000_ffff);
                let net = Ipv4Net::new(addr.into(), len).expect("length").trunc();
                entries.insert(net, value(id));
            }
            let table = build(entries.iter());
            let mut walked = 0;
            for base in bases {
                for low in (0..0x1_0000u32).step_by(7) {
                    let addr = base | low;
                    let got = decide(&table, addr);
                    if got == v4_table::WALK {
                        walked += 1;
                        continue;
                    }
                    let want =
                        longest(&entries, addr).map_or(0, |value| word(&value) & !v4_table::DEEPER);
                    let got =
                        got & !(v4_table::USED | v4_table::DEEPER | 0xff << v4_table::START_SHIFT);
                    assert_eq!(got, want, "seed {seed}, {}", std::net::Ipv4Addr::from(addr));
                }
            }
            assert!(walked < 4 * 0x1_0000 / 7, "seed {seed}: everything walked");
        }
    }

    /// The count that decides whether the table is built is the number of blocks `build`
    /// makes: nested and overlapping prefixes are not counted twice.
    #[test]
    fn distinct_blocks_are_the_blocks_the_table_builds() {
        for seed in 0..40 {
            let mut rng = Rng(seed);
            let mut entries = BTreeMap::new();
            for id in 1..=(rng.next() % 400 + 1) as u32 {
                let base = [0x0a00_0000u32, 0x0a01_0000, 0xc000_0200][(rng.next() % 3) as usize];
                let len = 17 + (rng.next() % 16) as u8;
                let addr = base | (rng.next() as u32 & 0x0000_ffff);
                let net = Ipv4Net::new(addr.into(), len).expect("length").trunc();
                entries.insert(net, value(id));
            }
            let built = build(entries.iter()).blocks.len() as u64;
            let counted = distinct_blocks(entries.keys().map(blocks_reached));
            assert_eq!(counted, built, "seed {seed}");
        }
    }

    #[test]
    fn a_policy_over_the_quick_bound_but_within_the_map_gets_its_table() {
        // 8,192 /17s fill the map exactly; a /24 and a /32 inside one of them push the quick
        // bound over, but need no block of their own.
        let mut nets: Vec<Ipv4Net> = (0..8192u32)
            .map(|n| Ipv4Net::new((0x0a00_0000 + (n << 15)).into(), 17).expect("/17"))
            .collect();
        nets.push("10.0.1.0/24".parse().unwrap());
        nets.push("10.0.1.7/32".parse().unwrap());
        assert_eq!(too_many_blocks(nets.iter()), None);
        nets.push("200.0.0.0/24".parse().unwrap());
        assert_eq!(
            too_many_blocks(nets.iter()),
            Some(u64::from(MAX_V4_BLOCKS) + 1)
        );
        // Past twice the limit the bound is the answer, nothing is sorted.
        let wide: Vec<Ipv4Net> = (0..16_385u32)
            .map(|n| Ipv4Net::new((n << 15).into(), 17).expect("/17"))
            .collect();
        assert_eq!(too_many_blocks(wide.iter()), Some(16_385 * 128));
    }

    #[test]
    fn a_short_prefix_fills_its_sixteens_and_a_long_one_makes_a_block() {
        let mut entries = BTreeMap::new();
        entries.insert("10.0.0.0/8".parse().unwrap(), value(1));
        entries.insert("10.1.2.16/28".parse().unwrap(), value(2));
        let table = build(entries.iter());
        assert_eq!(table.top[0x0a05], word(&value(1)));
        assert_eq!(table.top[0x0a01], word(&value(1)) | v4_table::DEEPER);
        assert_eq!(table.blocks.len(), 1);
        assert_eq!(table.blocks[0].0, 0x0a_0102);
        let used = table.blocks[0]
            .1
            .ranges
            .iter()
            .filter(|r| **r & v4_table::USED != 0);
        assert_eq!(used.count(), 3);
        assert_eq!(table.top[0x0b00], 0);
    }
}
