//! Writing a [`Policy`] into the kernel maps in one atomic step, and reading the counters back.
//!
//! The program reads one of two policy slots, chosen by a single `u32` in `SG_ACTIVE`. An apply
//! brings the other (standby) slot up to date with the new policy, entry by entry (only what
//! differs is written), then flips `SG_ACTIVE` with one store. A packet therefore sees the old
//! policy or the new one, never a mix; if anything fails before the flip, the running policy
//! is untouched.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use std::{
    mem::size_of,
    net::{IpAddr, Ipv6Addr},
    os::fd::AsFd as _,
};

use aya::maps::{
    Array, HashMap as KernelHashMap, IterableMap as _, LpmTrie, Map, MapData, MapError,
    PerCpuArray, PerCpuHashMap, PerCpuValues,
};
use ipnet::IpNet;
use smtpguard_common::{
    CanarySighting, IfaceInfo, MAX_SCOPES, Offender, RuleValue, SLOTS, ScopeConfig, SlotConfig,
    V4_COARSE_WORDS, V4_GUARD_WORDS, V4_KEY_BYTES, V6_GUARD_WORDS, V6_KEY_BYTES, action, counter,
    map_name, mode, v6_guard_bit,
};

use crate::{
    kernel::{
        batch,
        table::{TableMaps, TableUse},
    },
    policy::{List, Policy},
    source::config::{Action, Mode},
};

/// Time given to packets that read the old slot index before the standby slot is rewritten:
/// an XDP run takes microseconds, so this is a wide margin.
const FLIP_GRACE: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("writing {what} to map {map}: {source}")]
    Write {
        map: &'static str,
        what: String,
        #[source]
        source: MapError,
    },
    #[error("reading map {map}: {source}")]
    Read {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("writing {what} to map {map}: {source}")]
    Batch {
        map: &'static str,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot count CPUs: {0}")]
    Cpus(String),
    #[error("{count} scopes: the program holds at most {MAX_SCOPES} (the default one included)")]
    TooManyScopes { count: u32 },
}

/// Why the maps could not be opened or read back.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("the object has no map {0:?}")]
    Missing(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error(
        "the pinned counter maps are not readable ({pins}), and the maps the state file names are gone ({ids})"
    )]
    CountersGone {
        pins: Box<MapsError>,
        ids: Box<MapsError>,
    },
    #[error("taking over the pinned maps: {0}")]
    Recover(String),
}

/// The identity of a per-prefix counter: it survives reloads as long as this triple does.
pub type CounterKey = (u32, IpNet, List);

/// Counter ids by prefix. Millions of keys are hashed on every apply: foldhash (seeded per
/// process) instead of SipHash, which took a third of the bookkeeping time.
type CounterIds = HashMap<CounterKey, u32, foldhash::fast::RandomState>;

/// The counter ids of a policy in force, shared: the state writer lists them while the
/// daemon goes on to the next apply, which replaces them rather than changing them.
#[derive(Clone, Default)]
pub struct CounterIdSnapshot(Arc<CounterIds>);

impl CounterIdSnapshot {
    /// Each prefix's scope id, prefix, list and counter id.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &IpNet, List, u32)> {
        self.0
            .iter()
            .map(|((scope, net, list), id)| (*scope, net, *list, *id))
    }

    /// How many prefixes have counter ids.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The counter id of one prefix.
    pub fn get(&self, key: &CounterKey) -> Option<u32> {
        self.0.get(key).copied()
    }
}

/// Where an entry sits in a slot's source trie: its scope id and prefix.
pub(crate) type SlotKey = (u32, IpNet);

/// What [`PolicyMaps::write_sources`] wrote.
struct SourcesWritten {
    /// Trie entries written, both families.
    entries: usize,
    /// Whether the IPv4 table holds the policy (the program may trust it), or why not.
    table: TableUse,
}

/// What a scoped thread returned; its panic goes on in the caller.
fn joined<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// One family's source tries, one per slot, and what each holds as written by this
/// process. `KEY` is the family's key size: [`V4_KEY_BYTES`] or [`V6_KEY_BYTES`].
struct SourceTries<const KEY: usize> {
    names: [&'static str; 2],
    tries: [LpmTrie<MapData, [u8; KEY], RuleValue>; 2],
    held: [BTreeMap<SlotKey, RuleValue>; 2],
}

impl<const KEY: usize> SourceTries<KEY> {
    fn new(names: [&'static str; 2], tries: [LpmTrie<MapData, [u8; KEY], RuleValue>; 2]) -> Self {
        Self {
            names,
            tries,
            held: [BTreeMap::new(), BTreeMap::new()],
        }
    }

    /// Whether `key` is of this family.
    fn ours(key: &SlotKey) -> bool {
        key.1.addr().is_ipv4() == (KEY == V4_KEY_BYTES)
    }

    /// Reads back what `slot`'s trie holds.
    fn recover(&mut self, slot: usize) -> Result<(), MapsError> {
        let mut entries = BTreeMap::new();
        for item in self.tries[slot].iter() {
            let (key, value) = item.map_err(|source| MapsError::Map {
                name: self.names[slot],
                source,
            })?;
            if let Some(entry) = read_key(key.prefix_len(), &key.data()) {
                entries.insert(entry, value);
            }
        }
        self.held[slot] = entries;
        Ok(())
    }

    /// After a failed batch: the record from the trie itself, a check on the entry-by-entry
    /// record the failure left (exact as far as the kernel's count is: [`batch`] reads it
    /// for both kinds of failure), which stays only if the trie cannot be read.
    fn read_back(&mut self, slot: usize) {
        if let Err(error) = self.recover(slot) {
            log::warn!("{error}: the record of what it holds is kept as the failed write left it");
        }
    }

    /// Brings `slot`'s trie to this family's entries of `target` (sorted by key), writing
    /// only what differs: what the trie holds and `target` are both in key order, so one
    /// merge finds what goes and what changes without a lookup per prefix. Removals first,
    /// then writes, a batch each; what the trie holds is tracked entry by entry when a batch
    /// fails (the kernel says how far it got), so a failure part-way leaves an exact record
    /// for the next try. Returns the entries written.
    fn write(&mut self, slot: usize, target: &[(SlotKey, RuleValue)]) -> Result<usize, ApplyError> {
        let target = || target.iter().filter(|(key, _)| Self::ours(key));
        let mut stale: Vec<SlotKey> = Vec::new();
        let mut changed: Vec<(SlotKey, RuleValue)> = Vec::new();
        let mut held = self.held[slot].iter().peekable();
        let mut wanted = 0;
        for &(key, value) in target() {
            wanted += 1;
            while let Some((old, _)) = held.next_if(|(old, _)| **old < key) {
                stale.push(*old);
            }
            match held.next_if(|(old, _)| **old == key) {
                Some((_, old)) if *old == value => {}
                _ => changed.push((key, value)),
            }
        }
        stale.extend(held.map(|(old, _)| *old));
        let fd = self.tries[slot].map().fd().as_fd();
        let key_size = size_of::<u32>() + KEY;
        let mut bytes = Vec::with_capacity(stale.len() * key_size);
        for (scope, net) in &stale {
            push_trie_key(&mut bytes, *scope, net);
        }
        if let Err((count, source)) = batch::delete_present(fd, &bytes, key_size) {
            for key in &stale[..count] {
                self.held[slot].remove(key);
            }
            self.read_back(slot);
            return Err(ApplyError::Batch {
                map: self.names[slot],
                what: format!("removal of {} prefixes", stale.len() - count),
                source,
            });
        }
        let mut keys = Vec::with_capacity(changed.len() * key_size);
        let mut values = Vec::with_capacity(changed.len() * size_of::<RuleValue>());
        for ((scope, net), value) in &changed {
            push_trie_key(&mut keys, *scope, net);
            values.extend_from_slice(&[value.action, value.deny, value.outranked, 0]);
            values.extend_from_slice(&value.counter_id.to_ne_bytes());
        }
        let outcome = batch::update(fd, &keys, key_size, &values, size_of::<RuleValue>());
        if let Err((count, source)) = outcome {
            for key in &stale {
                self.held[slot].remove(key);
            }
            for (key, value) in &changed[..count] {
                self.held[slot].insert(*key, *value);
            }
            self.read_back(slot);
            return Err(ApplyError::Batch {
                map: self.names[slot],
                what: format!("{} prefixes ({count} written)", changed.len()),
                source,
            });
        }
        if changed.len() + stale.len() > wanted / 4 {
            // Much replaced: the record is the target, built in one sorted pass rather than
            // an insert or a removal per prefix; the old one is freed off the apply's path.
            let old = std::mem::replace(&mut self.held[slot], target().copied().collect());
            crate::reclaim::drop_later(old);
        } else {
            for key in &stale {
                self.held[slot].remove(key);
            }
            self.held[slot].extend(changed.iter().copied());
        }
        Ok(changed.len())
    }
}

/// What one apply did.
#[derive(Clone, Debug)]
pub struct ApplyReport {
    pub generation: u32,
    pub slot: u32,
    pub written: usize,
    pub removed: usize,
    /// Whether the IPv4 table decides IPv4 sources under this policy, or why the trie does.
    pub ipv4_table: TableUse,
    pub elapsed: Duration,
}

/// Summed counters: global ones by [`counter`] index, per-prefix ones by counter id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub global: [u64; counter::COUNT as usize],
    pub prefixes: HashMap<u32, u64>,
}

impl CounterSnapshot {
    pub fn get(&self, index: u32) -> u64 {
        self.global.get(index as usize).copied().unwrap_or(0)
    }
}

/// Handles to every map of the program, and what the daemon wrote into each slot.
pub struct PolicyMaps {
    active: Array<MapData, u32>,
    slot_config: Array<MapData, SlotConfig>,
    scope_config: Array<MapData, ScopeConfig>,
    dst_v4: [LpmTrie<MapData, [u8; 4], u32>; 2],
    dst_v6: [LpmTrie<MapData, [u8; 16], u32>; 2],
    v4: SourceTries<V4_KEY_BYTES>,
    v6: SourceTries<V6_KEY_BYTES>,
    prefix_hits: PerCpuHashMap<MapData, u32, u64>,
    global: PerCpuArray<MapData, u64>,
    offenders: Array<MapData, Offender>,
    v4_guard: Array<MapData, V4Guard>,
    v4_coarse: Array<MapData, V4Coarse>,
    v6_guard: Array<MapData, V6Guard>,
    v4_table: TableMaps,
    ifaces: KernelHashMap<MapData, u32, IfaceInfo>,
    canary: KernelHashMap<MapData, [u8; 16], CanarySighting>,
    /// The standby slot holds a candidate the program compares every SYN against.
    canary_on: bool,
    /// The destination prefixes each slot maps to a scope id.
    destinations: [BTreeMap<IpNet, u32>; 2],
    /// How many scope ids each slot configures (those beyond are unguarded).
    scope_counts: [u32; 2],
    active_slot: u32,
    counter_ids: Arc<CounterIds>,
    next_counter_id: u32,
    generation: u32,
    last_flip: Option<Instant>,
}

impl PolicyMaps {
    /// Takes the maps, by name, from `take`.
    pub(crate) fn from_maps(
        mut take: impl FnMut(&'static str) -> Result<Map, MapsError>,
    ) -> Result<Self, MapsError> {
        let mut maps = Self {
            active: typed(map_name::ACTIVE_SLOT, take(map_name::ACTIVE_SLOT)?)?,
            slot_config: typed(map_name::SLOT_CONFIG, take(map_name::SLOT_CONFIG)?)?,
            scope_config: typed(map_name::SCOPES, take(map_name::SCOPES)?)?,
            dst_v4: [
                typed(map_name::DST_V4_SLOT0, take(map_name::DST_V4_SLOT0)?)?,
                typed(map_name::DST_V4_SLOT1, take(map_name::DST_V4_SLOT1)?)?,
            ],
            dst_v6: [
                typed(map_name::DST_V6_SLOT0, take(map_name::DST_V6_SLOT0)?)?,
                typed(map_name::DST_V6_SLOT1, take(map_name::DST_V6_SLOT1)?)?,
            ],
            v4: SourceTries::new(
                [map_name::V4_SLOT0, map_name::V4_SLOT1],
                [
                    typed(map_name::V4_SLOT0, take(map_name::V4_SLOT0)?)?,
                    typed(map_name::V4_SLOT1, take(map_name::V4_SLOT1)?)?,
                ],
            ),
            v6: SourceTries::new(
                [map_name::V6_SLOT0, map_name::V6_SLOT1],
                [
                    typed(map_name::V6_SLOT0, take(map_name::V6_SLOT0)?)?,
                    typed(map_name::V6_SLOT1, take(map_name::V6_SLOT1)?)?,
                ],
            ),
            prefix_hits: typed(map_name::PREFIX_HITS, take(map_name::PREFIX_HITS)?)?,
            global: typed(map_name::GLOBAL, take(map_name::GLOBAL)?)?,
            offenders: typed(map_name::OFFENDERS, take(map_name::OFFENDERS)?)?,
            v4_guard: typed(map_name::V4_GUARD, take(map_name::V4_GUARD)?)?,
            v4_coarse: typed(map_name::V4_COARSE, take(map_name::V4_COARSE)?)?,
            v6_guard: typed(map_name::V6_GUARD, take(map_name::V6_GUARD)?)?,
            v4_table: TableMaps::new(
                typed(map_name::V4_TOP, take(map_name::V4_TOP)?)?,
                [
                    typed(map_name::V4_BLOCKS_SLOT0, take(map_name::V4_BLOCKS_SLOT0)?)?,
                    typed(map_name::V4_BLOCKS_SLOT1, take(map_name::V4_BLOCKS_SLOT1)?)?,
                ],
            ),
            ifaces: typed(map_name::IFACES, take(map_name::IFACES)?)?,
            canary: typed(map_name::CANARY, take(map_name::CANARY)?)?,
            canary_on: false,
            destinations: [BTreeMap::new(), BTreeMap::new()],
            scope_counts: [MAX_SCOPES, MAX_SCOPES],
            active_slot: 0,
            counter_ids: Arc::default(),
            next_counter_id: 1,
            generation: 0,
            last_flip: None,
        };
        maps.recover()?;
        Ok(maps)
    }

    /// Learns what the maps already hold: nothing for fresh maps, the policy in force for
    /// maps a previous daemon left pinned (`on_exit = "keep"`, or a crash). Both slots are
    /// read back entry by entry, so the next apply writes only what differs, counters keep
    /// their ids (and counts), and counters that no entry of the active slot uses (left by an
    /// apply that was cut short) are removed.
    fn recover(&mut self) -> Result<(), MapsError> {
        let map_error = |name: &'static str| move |source| MapsError::Map { name, source };
        self.active_slot = self
            .active
            .get(&0, 0)
            .map_err(map_error(map_name::ACTIVE_SLOT))?
            % SLOTS;
        for slot in 0..SLOTS as usize {
            self.v4.recover(slot)?;
            self.v6.recover(slot)?;
            let mut destinations = BTreeMap::new();
            for item in self.dst_v4[slot].iter() {
                let (key, scope) = item.map_err(map_error(dst_name(true, slot)))?;
                if let Ok(net) = ipnet::Ipv4Net::new(key.data().into(), key.prefix_len() as u8) {
                    destinations.insert(IpNet::V4(net), scope);
                }
            }
            for item in self.dst_v6[slot].iter() {
                let (key, scope) = item.map_err(map_error(dst_name(false, slot)))?;
                if let Ok(net) = ipnet::Ipv6Net::new(key.data().into(), key.prefix_len() as u8) {
                    destinations.insert(IpNet::V6(net), scope);
                }
            }
            self.destinations[slot] = destinations;
            self.v4_table.recover(slot);
        }
        let config = self
            .slot_config
            .get(&self.active_slot, 0)
            .map_err(map_error(map_name::SLOT_CONFIG))?;
        self.generation = config.generation;
        if config.canary != 0 {
            // Left by a daemon that ran a canary and is gone: this one knows no candidate.
            self.write_slot_config(
                self.active_slot,
                SlotConfig {
                    canary: 0,
                    ..config
                },
            )
            .map_err(|error| MapsError::Recover(error.to_string()))?;
        }
        let active = self.active_slot as usize;
        self.counter_ids = Arc::new(
            self.v4.held[active]
                .iter()
                .chain(&self.v6.held[active])
                // An outranked prefix counts in another entry's counter, not its own.
                .filter(|(_, value)| value.outranked == 0)
                .map(|((scope, net), value)| {
                    let list = if value.deny == 1 {
                        List::Deny
                    } else {
                        List::Allow
                    };
                    ((*scope, *net, list), value.counter_id)
                })
                .collect(),
        );
        self.next_counter_id = self
            .counter_ids
            .values()
            .max()
            .map_or(1, |max| next_counter_id(*max));
        self.sweep_counters();
        Ok(())
    }

    /// Whether the IPv4 table decides IPv4 sources in the policy in force (the active slot's
    /// settings say so).
    pub fn ipv4_table_in_force(&self) -> Result<bool, ApplyError> {
        Ok(self.active_config()?.v4_table == 1)
    }

    /// How many /24 blocks each slot's IPv4 table holds in the kernel, read from the maps.
    pub fn ipv4_table_blocks(&self) -> Result<[usize; SLOTS as usize], ApplyError> {
        Ok([
            self.v4_table.blocks_in_kernel(0)?,
            self.v4_table.blocks_in_kernel(1)?,
        ])
    }

    /// The settings of the slot the program reads.
    fn active_config(&self) -> Result<SlotConfig, ApplyError> {
        self.slot_config
            .get(&self.active_slot, 0)
            .map_err(|source| ApplyError::Read {
                map: map_name::SLOT_CONFIG,
                source,
            })
    }

    /// Whether the maps held a policy before this process touched them.
    pub fn recovered(&self) -> bool {
        self.generation > 0
    }

    /// The generation of the policy in force (0 before the first apply).
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The counter id of each prefix of the policy in force, with its scope id.
    pub fn counter_ids(&self) -> impl Iterator<Item = (u32, &IpNet, List, u32)> {
        self.counter_ids
            .iter()
            .map(|((scope, net, list), id)| (*scope, net, *list, *id))
    }

    /// The counter ids of the policy in force, to list after this apply.
    pub fn counter_id_snapshot(&self) -> CounterIdSnapshot {
        CounterIdSnapshot(Arc::clone(&self.counter_ids))
    }

    /// Tells the program about an interface it runs on (what a reset sent out of it needs).
    pub fn set_interface(&mut self, index: u32, info: IfaceInfo) -> Result<(), ApplyError> {
        self.ifaces
            .insert(index, info, 0)
            .map_err(|source| ApplyError::Write {
                map: map_name::IFACES,
                what: format!("interface {index}"),
                source,
            })
    }

    /// Forgets an interface the program no longer runs on.
    pub fn remove_interface(&mut self, index: u32) {
        if let Err(error) = self.ifaces.remove(&index)
            && !matches!(&error, MapError::KeyNotFound)
        {
            log::warn!(
                "cannot remove interface {index} from {}: {error}",
                map_name::IFACES
            );
        }
    }

    /// Forgets every interface but `indices` (left by an earlier daemon, or detached).
    pub fn retain_interfaces(&mut self, indices: &[u32]) {
        let stale: Vec<u32> = self
            .ifaces
            .keys()
            .filter_map(Result::ok)
            .filter(|index| !indices.contains(index))
            .collect();
        for index in stale {
            self.remove_interface(index);
        }
    }

    /// Gives the prefixes of an earlier policy their counter ids back (an upgrade, whose new
    /// maps start empty, carries the counts over under the same ids).
    pub fn seed_counter_ids(&mut self, ids: impl IntoIterator<Item = (u32, IpNet, List, u32)>) {
        let counter_ids = Arc::make_mut(&mut self.counter_ids);
        for (scope, net, list, id) in ids {
            counter_ids.insert((scope, net, list), id);
            self.next_counter_id = self.next_counter_id.max(next_counter_id(id));
        }
    }

    /// Continues the generation count of an earlier daemon's maps (an upgrade's new maps
    /// start from zero): the next apply is `generation + 1`.
    pub fn seed_generation(&mut self, generation: u32) {
        self.generation = self.generation.max(generation);
    }

    /// Puts the boot policy in force: `policy`'s scopes with their ports and modes and no
    /// prefixes (see [`Policy::closed`]), every guarded SYN stopped, until the real policy is
    /// built. Its generation is 0: it is not a policy a later daemon should take for one it
    /// applied.
    pub fn apply_closed(&mut self, policy: &Policy) -> Result<ApplyReport, ApplyError> {
        self.install(&policy.emptied(), 0)
    }

    /// Makes `policy` the one in force, atomically, as the next generation.
    pub fn apply(&mut self, policy: &Policy) -> Result<ApplyReport, ApplyError> {
        self.install(policy, self.generation.wrapping_add(1).max(1))
    }

    fn install(&mut self, policy: &Policy, generation: u32) -> Result<ApplyReport, ApplyError> {
        let started = Instant::now();
        // A canary's candidate is in the standby slot: the program stops comparing before
        // the slot is rewritten. The caller puts a candidate back after the flip.
        self.end_canary()?;
        self.wait_for_flip_grace();
        let standby = (self.active_slot + 1) % SLOTS;
        let counter_ids = self.assign_counter_ids(policy);
        let target = slot_entries(policy, &counter_ids);
        // Nothing reaches the active slot unless all of it is written.
        let (written, ipv4_table) = self.stage(standby, &target, policy, generation)?;
        self.flip(standby)?;
        if !matches!(ipv4_table, TableUse::On | TableUse::Scoped) {
            log::warn!("IPv4 table {ipv4_table}");
        }
        self.last_flip = Some(Instant::now());
        crate::reclaim::drop_later(std::mem::replace(
            &mut self.counter_ids,
            Arc::new(counter_ids),
        ));
        self.active_slot = standby;
        self.generation = generation;
        if !ipv4_table.on() {
            self.v4_table.empty(standby);
        }
        // The new policy is in force: counters of prefixes that left it go.
        let removed = self.sweep_counters();
        Ok(ApplyReport {
            generation,
            slot: standby,
            written,
            removed,
            ipv4_table,
            elapsed: started.elapsed(),
        })
    }

    /// Packets that read the slot index before the last flip (or the canary flag before it
    /// cleared) may still be reading the standby slot: give them time before it is rewritten.
    fn wait_for_flip_grace(&self) {
        if let Some(elapsed) = self.last_flip.map(|flip| flip.elapsed())
            && elapsed < FLIP_GRACE
        {
            std::thread::sleep(FLIP_GRACE - elapsed);
        }
    }

    /// Writes `policy` into the standby slot as a canary's candidate, and has the program
    /// decide every SYN by it as well, only to record the sources whose verdict would change
    /// (`SG_CANARY`, which is emptied first). No verdict changes. Returns the counter ids of
    /// the candidate's prefixes (by which the program names what decided on its side) and
    /// the entries written.
    ///
    /// `previous` are the ids the candidate had before (a candidate put back after an apply
    /// keeps them); `fresh` empties the table of sightings (a new canary).
    pub fn start_canary(
        &mut self,
        policy: &Policy,
        previous: &HashMap<CounterKey, u32>,
        fresh: bool,
    ) -> Result<(HashMap<CounterKey, u32>, usize), ApplyError> {
        self.end_canary()?;
        self.wait_for_flip_grace();
        let standby = (self.active_slot + 1) % SLOTS;
        let mut counter_ids = HashMap::new();
        for (scope, net, entry) in policy.entries() {
            let key = (scope, *net, entry.list);
            let id = match self.counter_ids.get(&key).or_else(|| previous.get(&key)) {
                Some(id) => *id,
                None => {
                    let id = self.next_counter_id;
                    self.next_counter_id = next_counter_id(id);
                    id
                }
            };
            counter_ids.insert(key, id);
        }
        let target = slot_entries(policy, &counter_ids);
        let (written, _) = self.stage(standby, &target, policy, self.generation)?;
        if fresh {
            self.clear_canary_sightings()?;
        }
        self.set_canary_flag(true)?;
        self.canary_on = true;
        Ok((counter_ids, written))
    }

    /// Whether the program compares SYNs with a candidate now.
    pub fn canary_on(&self) -> bool {
        self.canary_on
    }

    /// Stops comparing SYNs with a candidate (if a canary runs). The standby slot keeps the
    /// candidate until the next apply; its sightings stay readable until the next canary.
    pub fn end_canary(&mut self) -> Result<(), ApplyError> {
        if self.canary_on {
            self.set_canary_flag(false)?;
            self.canary_on = false;
            // A SYN that read the flag before it cleared may still be comparing against
            // the standby slot: it gets the same grace as one that read a flipped index.
            self.last_flip = Some(Instant::now());
        }
        Ok(())
    }

    /// Every source the last canary recorded (IPv4 as `::ffff:a.b.c.d` in the map).
    pub fn canary_sightings(&self) -> Result<Vec<(IpAddr, CanarySighting)>, ApplyError> {
        read_canary(&self.canary)
    }

    fn clear_canary_sightings(&mut self) -> Result<(), ApplyError> {
        let keys: Vec<u8> = self
            .canary
            .keys()
            .filter_map(Result::ok)
            .flatten()
            .collect();
        let fd = self.canary.map().fd().as_fd();
        batch::delete_present(fd, &keys, 16).map_err(|(done, source)| ApplyError::Batch {
            map: map_name::CANARY,
            what: format!("removal of {} canary sightings", keys.len() / 16 - done),
            source,
        })
    }

    /// Sets the canary flag of the active slot's settings, leaving the rest as it is: the
    /// program reads each field on its own, and only this one changes.
    fn set_canary_flag(&mut self, on: bool) -> Result<(), ApplyError> {
        let config = self.active_config()?;
        self.write_slot_config(
            self.active_slot,
            SlotConfig {
                canary: u32::from(on),
                ..config
            },
        )
    }

    fn write_slot_config(&mut self, slot: u32, config: SlotConfig) -> Result<(), ApplyError> {
        self.slot_config
            .set(slot, config, 0)
            .map_err(|source| ApplyError::Write {
                map: map_name::SLOT_CONFIG,
                what: format!("slot {slot} settings"),
                source,
            })
    }

    /// Makes `slot` the one the program reads, with one 4-byte store.
    fn flip(&mut self, slot: u32) -> Result<(), ApplyError> {
        self.active
            .set(0, slot, 0)
            .map_err(|source| ApplyError::Write {
                map: map_name::ACTIVE_SLOT,
                what: format!("active slot {slot}"),
                source,
            })
    }

    /// Brings the standby slot to `target` with the policy's ports and settings. Returns the
    /// trie entries written, and whether the IPv4 table decides.
    fn stage(
        &mut self,
        standby: u32,
        target: &[(SlotKey, RuleValue)],
        policy: &Policy,
        generation: u32,
    ) -> Result<(usize, TableUse), ApplyError> {
        let written = self.write_sources(standby, target, !policy.scoped())?;
        self.write_destinations(standby, policy)?;
        self.write_scopes(standby, policy)?;
        let fine: Box<V4Guard> = v4_blocks(target.iter().map(|((_, net), _)| net), 24);
        write_bitmap(
            &mut self.v4_guard,
            standby,
            &fine,
            map_name::V4_GUARD,
            "IPv4",
        )?;
        let coarse: Box<V4Coarse> = v4_blocks(target.iter().map(|((_, net), _)| net), 20);
        write_bitmap(
            &mut self.v4_coarse,
            standby,
            &coarse,
            map_name::V4_COARSE,
            "coarse IPv4",
        )?;
        let v6: Box<V6Guard> = v6_blocks(target.iter().map(|((_, net), _)| net));
        write_bitmap(&mut self.v6_guard, standby, &v6, map_name::V6_GUARD, "IPv6")?;
        let config = SlotConfig {
            generation,
            v4_guard: 1,
            v6_guard: 1,
            scoped: u32::from(policy.scoped()),
            audit_only: u32::from(
                policy
                    .scopes
                    .iter()
                    .filter(|scope| scope.guarded)
                    .all(|scope| scope.mode == Mode::Audit),
            ),
            canary: 0,
            v4_table: u32::from(written.table.on()),
            _pad: 0,
        };
        self.write_slot_config(standby, config)?;
        Ok((written.entries, written.table))
    }

    /// Brings `slot`'s source tries to `target` and, for a policy of one scope (`table`), its
    /// IPv4 table: three maps written at once, each on its own thread (the kernel takes a
    /// lock per trie, so the two families' tries fill in parallel, and the table beside
    /// them). A trie that fails fails the whole; a table that fails is left off. Each map's
    /// record stays exact either way.
    fn write_sources(
        &mut self,
        slot: u32,
        target: &[(SlotKey, RuleValue)],
        table: bool,
    ) -> Result<SourcesWritten, ApplyError> {
        let index = slot as usize;
        let (v4, v6, v4_table) = (&mut self.v4, &mut self.v6, &mut self.v4_table);
        let (written_v4, written_v6, table) = std::thread::scope(|scope| {
            let v6 = scope.spawn(|| v6.write(index, target));
            let table = scope.spawn(|| {
                if table {
                    v4_table.write(slot, target)
                } else {
                    Ok(TableUse::Scoped)
                }
            });
            let v4 = v4.write(index, target);
            (v4, joined(v6), joined(table))
        });
        let entries = written_v4? + written_v6?;
        // The tries hold the policy whole: a table that could not be written only leaves
        // them to decide.
        let table = table.unwrap_or_else(|error| TableUse::Failed(error.to_string()));
        Ok(SourcesWritten { entries, table })
    }

    /// Writes each scope's ports, mode and action into `slot`, and marks the ids this policy
    /// does not use as unguarded.
    fn write_scopes(&mut self, slot: u32, policy: &Policy) -> Result<(), ApplyError> {
        let count = policy.scopes.len() as u32;
        if count > MAX_SCOPES {
            return Err(ApplyError::TooManyScopes { count });
        }
        let stale = self.scope_counts[slot as usize].max(count);
        for id in 0..stale {
            let mut config = ScopeConfig::EMPTY;
            if let Some(scope) = policy.scopes.get(id as usize) {
                config.guarded = u32::from(scope.guarded);
                for &port in &scope.ports {
                    config.guard(port);
                }
                config.mode = match scope.mode {
                    Mode::Enforce => mode::ENFORCE,
                    Mode::Audit => mode::AUDIT,
                };
                config.unlisted_action = action_code(scope.unlisted_action);
            }
            self.scope_config
                .set(slot * MAX_SCOPES + id, config, 0)
                .map_err(|source| ApplyError::Write {
                    map: map_name::SCOPES,
                    what: format!("slot {slot} scope {id}"),
                    source,
                })?;
        }
        self.scope_counts[slot as usize] = count;
        Ok(())
    }

    /// Brings `slot`'s destination tries to the policy's scopes: each destination prefix to
    /// its scope id.
    fn write_destinations(&mut self, slot: u32, policy: &Policy) -> Result<(), ApplyError> {
        let index = slot as usize;
        let target: BTreeMap<IpNet, u32> = policy
            .scopes
            .iter()
            .enumerate()
            .flat_map(|(id, scope)| scope.destinations.iter().map(move |net| (*net, id as u32)))
            .collect();
        let stale: Vec<IpNet> = self.destinations[index]
            .keys()
            .filter(|net| !target.contains_key(net))
            .copied()
            .collect();
        for net in stale {
            let outcome = match net {
                IpNet::V4(v4) => self.dst_v4[index].remove(&aya::maps::lpm_trie::Key::new(
                    u32::from(v4.prefix_len()),
                    v4.network().octets(),
                )),
                IpNet::V6(v6) => self.dst_v6[index].remove(&aya::maps::lpm_trie::Key::new(
                    u32::from(v6.prefix_len()),
                    v6.network().octets(),
                )),
            };
            match outcome {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(ApplyError::Write {
                        map: dst_name(net.addr().is_ipv4(), index),
                        what: format!("removal of destination {net}"),
                        source,
                    });
                }
            }
            self.destinations[index].remove(&net);
        }
        for (net, id) in &target {
            if self.destinations[index].get(net) == Some(id) {
                continue;
            }
            let outcome = match net {
                IpNet::V4(v4) => self.dst_v4[index].insert(
                    &aya::maps::lpm_trie::Key::new(
                        u32::from(v4.prefix_len()),
                        v4.network().octets(),
                    ),
                    id,
                    0,
                ),
                IpNet::V6(v6) => self.dst_v6[index].insert(
                    &aya::maps::lpm_trie::Key::new(
                        u32::from(v6.prefix_len()),
                        v6.network().octets(),
                    ),
                    id,
                    0,
                ),
            };
            outcome.map_err(|source| ApplyError::Write {
                map: dst_name(net.addr().is_ipv4(), index),
                what: format!("destination {net} of scope {id}"),
                source,
            })?;
            self.destinations[index].insert(*net, *id);
        }
        Ok(())
    }

    /// Keeps the id of every prefix that stays; hands new ones out for the rest.
    fn assign_counter_ids(&mut self, policy: &Policy) -> CounterIds {
        let mut ids = CounterIds::default();
        ids.reserve(policy.entries().size_hint().0);
        for (scope, net, entry) in policy.entries() {
            let key = (scope, *net, entry.list);
            let id = match self.counter_ids.get(&key) {
                Some(id) => *id,
                None => {
                    let id = self.next_counter_id;
                    self.next_counter_id = next_counter_id(id);
                    id
                }
            };
            ids.insert(key, id);
        }
        ids
    }

    /// Removes the counters no prefix in force uses: those of prefixes that left the policy,
    /// and any a packet still on the old slot created after the last sweep. The program
    /// creates a prefix's counter at its first match, so only prefixes that saw traffic have
    /// one, and this reads few keys. Returns how many went.
    fn sweep_counters(&mut self) -> usize {
        let present: Vec<u32> = self.prefix_hits.keys().filter_map(Result::ok).collect();
        if present.is_empty() {
            return 0;
        }
        let live: std::collections::HashSet<u32, foldhash::fast::RandomState> =
            self.counter_ids.values().copied().collect();
        let unused: Vec<u32> = present
            .into_iter()
            .filter(|id| !live.contains(id))
            .collect();
        self.remove_counters(&unused);
        unused.len()
    }

    /// Removes counters `ids`, in batches; ids already gone are skipped.
    fn remove_counters(&mut self, ids: &[u32]) {
        let keys: Vec<u8> = ids.iter().flat_map(|id| id.to_ne_bytes()).collect();
        let fd = self.prefix_hits.map().fd().as_fd();
        if let Err((done, error)) = batch::delete_present(fd, &keys, size_of::<u32>()) {
            log::warn!("could not remove {} counters: {error}", ids.len() - done);
        }
    }

    /// Adds `values` (by index) to the global counters, on the first CPU; returns how many
    /// indices this layout has room for.
    pub fn add_global(&mut self, values: &[u64]) -> Result<usize, ApplyError> {
        let cpus = possible_cpus()?;
        let mut added = 0;
        for (index, value) in values.iter().enumerate().take(counter::COUNT as usize) {
            let index = index as u32;
            let mut now = self
                .global
                .get(&index, 0)
                .map_err(|source| ApplyError::Read {
                    map: map_name::GLOBAL,
                    source,
                })?;
            let mut sums: Vec<u64> = now.iter().copied().collect();
            sums.resize(cpus, 0);
            sums[0] += value;
            now = PerCpuValues::try_from(sums)
                .map_err(|source| ApplyError::Cpus(source.to_string()))?;
            self.global
                .set(index, now, 0)
                .map_err(|source| ApplyError::Write {
                    map: map_name::GLOBAL,
                    what: format!("counter {index}"),
                    source,
                })?;
            added += 1;
        }
        Ok(added)
    }

    /// Adds `hits` (by counter id) to the per-prefix counters of the prefixes in force;
    /// returns how many were added.
    pub fn add_prefix_hits(&mut self, hits: &HashMap<u32, u64>) -> Result<usize, ApplyError> {
        let cpus = possible_cpus()?;
        let live: std::collections::HashSet<u32> = self.counter_ids.values().copied().collect();
        let mut added = 0;
        for (&id, &count) in hits.iter().filter(|(id, _)| live.contains(id)) {
            let mut values = match self.prefix_hits.get(&id, 0) {
                Ok(values) => values.iter().copied().collect(),
                Err(MapError::KeyNotFound) => Vec::new(),
                Err(source) => {
                    return Err(ApplyError::Read {
                        map: map_name::PREFIX_HITS,
                        source,
                    });
                }
            };
            values.resize(cpus, 0);
            values[0] += count;
            let values = PerCpuValues::try_from(values)
                .map_err(|source| ApplyError::Cpus(source.to_string()))?;
            self.prefix_hits
                .insert(id, values, 0)
                .map_err(|source| ApplyError::Write {
                    map: map_name::PREFIX_HITS,
                    what: format!("counter {id}"),
                    source,
                })?;
            added += 1;
        }
        Ok(added)
    }

    /// Puts `offenders` into the table of stopped sources, each in the slot its address
    /// hashes to here, where that slot is free; returns how many found one.
    pub fn add_offenders(&mut self, offenders: &[Offender]) -> Result<usize, ApplyError> {
        let slots = self.offenders.len();
        let mut added = 0;
        for seen in offenders {
            let high = u64::from_ne_bytes(seen.addr[..8].try_into().unwrap_or_default());
            let low = u64::from_ne_bytes(seen.addr[8..].try_into().unwrap_or_default());
            let index = smtpguard_common::offender_slot(high, low, slots);
            let resident = self
                .offenders
                .get(&index, 0)
                .map_err(|source| ApplyError::Read {
                    map: map_name::OFFENDERS,
                    source,
                })?;
            if resident.blocked + resident.would_block != 0 {
                continue;
            }
            self.offenders
                .set(index, seen, 0)
                .map_err(|source| ApplyError::Write {
                    map: map_name::OFFENDERS,
                    what: format!("slot {index}"),
                    source,
                })?;
            added += 1;
        }
        Ok(added)
    }

    /// Reads the counters, summed over CPUs.
    pub fn counters(&self) -> Result<CounterSnapshot, ApplyError> {
        read_counters(&self.global, &self.prefix_hits)
    }

    /// Every source in the table of stopped sources.
    pub fn offenders(&self) -> Result<Vec<(IpAddr, Offender)>, ApplyError> {
        read_offenders(&self.offenders)
    }
}

/// The counter id after `id`: ids run from 1, and never take the values the program uses to
/// say that no prefix decided ([`smtpguard_common::canary_rule`]).
fn next_counter_id(id: u32) -> u32 {
    let next = id.wrapping_add(1);
    if next == 0 || next >= smtpguard_common::canary_rule::UNLISTED {
        1
    } else {
        next
    }
}

/// The trie entries of `policy`, each with the counter its SYNs count in.
fn slot_entries<S: std::hash::BuildHasher>(
    policy: &Policy,
    counter_ids: &HashMap<CounterKey, u32, S>,
) -> Vec<(SlotKey, RuleValue)> {
    let mut target: Vec<(SlotKey, RuleValue)> = policy
        .entries()
        .map(|(scope_id, net, entry)| {
            let scope = &policy.scopes[scope_id as usize];
            // A deny prefix an allow match outranks takes the verdict of what outranks it,
            // and its SYNs count there: they were let in by that rule.
            let (decider_net, decider) = entry
                .decided_by
                .and_then(|by| scope.entries.get(&by).map(|decider| (by, decider)))
                .unwrap_or((*net, entry));
            let code = match (decider.list, decider.action) {
                (List::Allow, _) => action::ALLOW,
                (List::Deny, action) => action_code(action.unwrap_or(scope.unlisted_action)),
            };
            let value = RuleValue {
                action: code as u8,
                deny: u8::from(entry.list == List::Deny),
                outranked: u8::from(entry.decided_by.is_some()),
                _pad: 0,
                counter_id: counter_ids[&(scope_id, decider_net, decider.list)],
            };
            ((scope_id, *net), value)
        })
        .collect();
    // Scopes in id order, each one's prefixes in order: sorted already, as the merge in
    // `write_slot` needs.
    if !target.is_sorted_by(|(a, _), (b, _)| a < b) {
        target.sort_unstable_by_key(|(key, _)| *key);
        target.dedup_by(|(a, _), (b, _)| a == b);
    }
    target
}

/// How many CPUs a per-CPU map holds a value for.
fn possible_cpus() -> Result<usize, ApplyError> {
    aya::util::nr_cpus().map_err(|(_, error)| ApplyError::Cpus(error.to_string()))
}

/// Appends the bytes of a source trie key to `out`: the prefix length (host order) counting
/// the scope id's 32 bits, then the scope id (big-endian) and the address.
fn push_trie_key(out: &mut Vec<u8>, scope: u32, net: &IpNet) {
    out.extend_from_slice(&(32 + u32::from(net.prefix_len())).to_ne_bytes());
    out.extend_from_slice(&scope.to_be_bytes());
    match net {
        IpNet::V4(v4) => out.extend_from_slice(&v4.network().octets()),
        IpNet::V6(v6) => out.extend_from_slice(&v6.network().octets()),
    }
}

/// The scope id and prefix of a source trie key read back from the kernel.
fn read_key(prefix_len: u32, data: &[u8]) -> Option<SlotKey> {
    let scope = u32::from_be_bytes(data.get(..4)?.try_into().ok()?);
    let len = u8::try_from(prefix_len.checked_sub(32)?).ok()?;
    let net = match data.len() - 4 {
        4 => {
            IpNet::V4(ipnet::Ipv4Net::new(<[u8; 4]>::try_from(&data[4..]).ok()?.into(), len).ok()?)
        }
        16 => {
            IpNet::V6(ipnet::Ipv6Net::new(<[u8; 16]>::try_from(&data[4..]).ok()?.into(), len).ok()?)
        }
        _ => return None,
    };
    Some((scope, net))
}

/// One slot's IPv4 guard bitmap, one bit per /24.
type V4Guard = [u32; V4_GUARD_WORDS];
/// One slot's coarse IPv4 guard bitmap, one bit per /20.
type V4Coarse = [u32; V4_COARSE_WORDS];

/// The guard bitmap of `/block_len` blocks for `nets`: the bit of every block an IPv4 prefix
/// overlaps (the block holding a longer prefix, or every block inside a shorter one).
pub fn v4_blocks<'a, const WORDS: usize>(
    nets: impl Iterator<Item = &'a IpNet>,
    block_len: u8,
) -> Box<[u32; WORDS]> {
    let mut bits: Box<[u32; WORDS]> = vec![0u32; WORDS]
        .into_boxed_slice()
        .try_into()
        .expect("WORDS words");
    let shift = 32 - u32::from(block_len);
    for net in nets {
        let IpNet::V4(net) = net else { continue };
        let first = (u32::from(net.network()) >> shift) as usize;
        let count = 1usize << (u32::from(block_len) - u32::from(net.prefix_len().min(block_len)));
        if count >= 32 {
            // Whole words: a short prefix costs a fill, not a bit per block (a /0 is 2^24 bits).
            bits[first >> 5..(first + count) >> 5].fill(u32::MAX);
        } else {
            for block in first..first + count {
                bits[block >> 5] |= 1 << (block & 31);
            }
        }
    }
    bits
}

/// One slot's IPv6 guard bitmap, one bit per hash of a /32.
type V6Guard = [u32; V6_GUARD_WORDS];

/// The IPv6 guard bitmap for `nets`: the bit of every /32 an IPv6 prefix overlaps (the /32
/// holding a longer prefix, each /32 inside a shorter one). Overlapping prefixes are merged
/// first, so each /32 is hashed once; when they cover more /32s than [`V6_FILL_ABOVE`], every
/// bit is set (a set bit only sends the source on to the trie), so a feed of short prefixes
/// costs a fill, not millions of hashes.
pub fn v6_blocks<'a>(nets: impl Iterator<Item = &'a IpNet>) -> Box<V6Guard> {
    let mut bits: Box<V6Guard> = vec![0u32; V6_GUARD_WORDS]
        .into_boxed_slice()
        .try_into()
        .expect("V6_GUARD_WORDS words");
    // Each prefix as the range of /32s it overlaps, first and one past the last.
    let mut ranges: Vec<(u64, u64)> = nets
        .filter_map(|net| match net {
            IpNet::V6(net) => {
                let top = u64::from((u128::from(net.network()) >> 96) as u32);
                Some((
                    top,
                    top + (1u64 << (32 - u32::from(net.prefix_len()).min(32))),
                ))
            }
            IpNet::V4(_) => None,
        })
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    if merged.iter().map(|(start, end)| end - start).sum::<u64>() > V6_FILL_ABOVE {
        bits.fill(u32::MAX);
        return bits;
    }
    for block in merged.into_iter().flat_map(|(start, end)| start..end) {
        let bit = v6_guard_bit(block as u32);
        bits[(bit >> 5) as usize] |= 1 << (bit & 31);
    }
    bits
}

/// Covered /32s beyond which the IPv6 guard bitmap is filled rather than hashed: a quarter of
/// its bits, where about a fifth of all /32s would pass the filter anyway.
const V6_FILL_ABOVE: u64 = (V6_GUARD_WORDS as u64 * 32) / 4;

/// Writes `slot`'s guard bitmap of one kind into `map`.
fn write_bitmap<T: aya::Pod>(
    map: &mut Array<MapData, T>,
    slot: u32,
    bits: &T,
    name: &'static str,
    kind: &str,
) -> Result<(), ApplyError> {
    map.set(slot, bits, 0).map_err(|source| ApplyError::Write {
        map: name,
        what: format!("slot {slot} {kind} guard bitmap"),
        source,
    })
}

fn action_code(action: Action) -> u32 {
    match action {
        Action::Drop => action::DROP,
        Action::Reject => action::REJECT,
    }
}

/// A map as the type its name promises.
fn typed<T: TryFrom<Map, Error = MapError>>(name: &'static str, map: Map) -> Result<T, MapsError> {
    T::try_from(map).map_err(|source| MapsError::Map { name, source })
}

/// A map opened from outside the loader (a pin, an id), as the type its name promises.
fn typed_from_data<T: TryFrom<Map, Error = MapError>>(
    name: &'static str,
    data: MapData,
) -> Result<T, MapsError> {
    let map = Map::from_map_data(data).map_err(|source| MapsError::Map { name, source })?;
    typed(name, map)
}

fn dst_name(v4: bool, slot: usize) -> &'static str {
    match (v4, slot) {
        (true, 0) => map_name::DST_V4_SLOT0,
        (true, _) => map_name::DST_V4_SLOT1,
        (false, 0) => map_name::DST_V6_SLOT0,
        (false, _) => map_name::DST_V6_SLOT1,
    }
}

/// Sums the per-CPU counters of `global` and `prefix_hits`.
pub fn read_counters(
    global: &PerCpuArray<MapData, u64>,
    prefix_hits: &PerCpuHashMap<MapData, u32, u64>,
) -> Result<CounterSnapshot, ApplyError> {
    let mut snapshot = CounterSnapshot::default();
    for (index, total) in snapshot.global.iter_mut().enumerate() {
        let values = global
            .get(&(index as u32), 0)
            .map_err(|source| ApplyError::Read {
                map: map_name::GLOBAL,
                source,
            })?;
        *total = values.iter().sum();
    }
    for item in prefix_hits.iter() {
        let (id, values) = item.map_err(|source| ApplyError::Read {
            map: map_name::PREFIX_HITS,
            source,
        })?;
        snapshot.prefixes.insert(id, values.iter().sum());
    }
    Ok(snapshot)
}

/// The maps a reader of the counters needs: global counters, per-prefix hits, and the table
/// of sources stopped.
pub struct CounterMaps {
    pub global: PerCpuArray<MapData, u64>,
    pub prefix_hits: PerCpuHashMap<MapData, u32, u64>,
    pub offenders: Array<MapData, Offender>,
}

impl CounterMaps {
    /// Sums the per-CPU counters.
    pub fn read(&self) -> Result<CounterSnapshot, ApplyError> {
        read_counters(&self.global, &self.prefix_hits)
    }

    /// Every source in the table, with what it did.
    pub fn offenders(&self) -> Result<Vec<(IpAddr, Offender)>, ApplyError> {
        read_offenders(&self.offenders)
    }
}

/// An address in the program's 16-byte form: IPv4 as `::ffff:a.b.c.d`.
fn unmapped(address: [u8; 16]) -> IpAddr {
    let address = Ipv6Addr::from(address);
    match address.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(address),
    }
}

/// The sources a canary recorded.
pub fn read_canary(
    map: &KernelHashMap<MapData, [u8; 16], CanarySighting>,
) -> Result<Vec<(IpAddr, CanarySighting)>, ApplyError> {
    let mut out = Vec::new();
    for item in map.iter() {
        let (key, seen) = item.map_err(|source| ApplyError::Read {
            map: map_name::CANARY,
            source,
        })?;
        out.push((unmapped(key), seen));
    }
    Ok(out)
}

/// Opens the canary's table of sources through the pins in `pin_dir`.
pub fn open_canary(
    pin_dir: &Path,
) -> Result<KernelHashMap<MapData, [u8; 16], CanarySighting>, MapsError> {
    let path = pin_dir.join(map_name::CANARY);
    let data = MapData::from_pin(&path).map_err(|source| MapsError::Map {
        name: map_name::CANARY,
        source,
    })?;
    typed_from_data(map_name::CANARY, data)
}

/// The sources in the table of stopped sources (IPv4 is stored as `::ffff:a.b.c.d`).
fn read_offenders(map: &Array<MapData, Offender>) -> Result<Vec<(IpAddr, Offender)>, ApplyError> {
    let mut out = Vec::new();
    for item in map.iter() {
        let seen = item.map_err(|source| ApplyError::Read {
            map: map_name::OFFENDERS,
            source,
        })?;
        if seen.blocked + seen.would_block == 0 {
            continue;
        }
        out.push((unmapped(seen.addr), seen));
    }
    Ok(out)
}

/// The generation of the policy the program reads now, through the pins under `pin_dir`;
/// `None` where they are out of sight (`ip netns exec` mounts its own /sys).
pub fn generation_in_force(pin_dir: &Path) -> Option<u32> {
    let pinned = |name: &'static str| MapData::from_pin(pin_dir.join(name)).ok();
    let active: Array<MapData, u32> =
        typed_from_data(map_name::ACTIVE_SLOT, pinned(map_name::ACTIVE_SLOT)?).ok()?;
    let slot = active.get(&0, 0).ok()? & 1;
    let configs: Array<MapData, SlotConfig> =
        typed_from_data(map_name::SLOT_CONFIG, pinned(map_name::SLOT_CONFIG)?).ok()?;
    Some(configs.get(&slot, 0).ok()?.generation)
}

/// Kernel ids of the maps in [`CounterMaps`], recorded in the state file for readers that
/// cannot see the pins.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CounterMapIds {
    pub global: u32,
    pub prefix_hits: u32,
    pub offenders: u32,
}

/// Opens the counter maps of a running daemon through its pins under `pin_dir`, or, where
/// those are out of sight (`ip netns exec` mounts its own /sys), by the kernel `ids` its state
/// file records.
pub fn open_counters(pin_dir: &Path, ids: CounterMapIds) -> Result<CounterMaps, MapsError> {
    let pinned = |name: &'static str| {
        MapData::from_pin(pin_dir.join(name)).map_err(|source| MapsError::Map { name, source })
    };
    open_counter_maps(pinned).or_else(|pins| {
        open_counter_maps(|name| open_by_id(name, ids)).map_err(|ids| MapsError::CountersGone {
            pins: Box::new(pins),
            ids: Box::new(ids),
        })
    })
}

fn open_counter_maps(
    mut open: impl FnMut(&'static str) -> Result<MapData, MapsError>,
) -> Result<CounterMaps, MapsError> {
    Ok(CounterMaps {
        global: typed_from_data(map_name::GLOBAL, open(map_name::GLOBAL)?)?,
        prefix_hits: typed_from_data(map_name::PREFIX_HITS, open(map_name::PREFIX_HITS)?)?,
        offenders: typed_from_data(map_name::OFFENDERS, open(map_name::OFFENDERS)?)?,
    })
}

/// A recycled id is refused: the map must carry the expected name.
fn open_by_id(name: &'static str, ids: CounterMapIds) -> Result<MapData, MapsError> {
    let id = match name {
        map_name::GLOBAL => ids.global,
        map_name::PREFIX_HITS => ids.prefix_hits,
        _ => ids.offenders,
    };
    let data = MapData::from_id(id).map_err(|source| MapsError::Map { name, source })?;
    let info = data
        .info()
        .map_err(|source| MapsError::Map { name, source })?;
    if info.name_as_str() != Some(kernel_name(name)) {
        return Err(MapsError::Map {
            name,
            source: MapError::InvalidName {
                name: format!("map id {id} is {:?}", info.name_as_str()),
            },
        });
    }
    Ok(data)
}

/// The kernel keeps the first 15 bytes of a map's name.
fn kernel_name(name: &str) -> &str {
    &name[..name.len().min(15)]
}

/// Kernel ids of the counter maps pinned under `pin_dir`.
pub fn pinned_counter_ids(pin_dir: &Path) -> Result<CounterMapIds, MapsError> {
    let id = |name: &'static str| {
        aya::maps::MapInfo::from_pin(pin_dir.join(name))
            .map(|info| info.id())
            .map_err(|source| MapsError::Map { name, source })
    };
    Ok(CounterMapIds {
        global: id(map_name::GLOBAL)?,
        prefix_hits: id(map_name::PREFIX_HITS)?,
        offenders: id(map_name::OFFENDERS)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(bits: &V4Guard, addr: &str) -> bool {
        let block = u32::from(addr.parse::<std::net::Ipv4Addr>().unwrap()) >> 8;
        bits[(block >> 5) as usize] & (1 << (block & 31)) != 0
    }

    #[test]
    fn guard_bits_cover_every_overlapped_slash_24() {
        let nets: Vec<IpNet> = [
            "10.0.0.0/8",
            "192.0.2.77/32",
            "198.51.100.0/23",
            "2001:db8::/32",
        ]
        .iter()
        .map(|net| net.parse().unwrap())
        .collect();
        let bits: Box<V4Guard> = v4_blocks(nets.iter(), 24);
        for inside in [
            "10.0.0.1",
            "10.255.255.255",
            "10.128.7.9",
            "192.0.2.1",
            "198.51.100.9",
            "198.51.101.200",
        ] {
            assert!(listed(&bits, inside), "{inside}");
        }
        for outside in [
            "11.0.0.0",
            "9.255.255.255",
            "192.0.3.77",
            "198.51.102.1",
            "0.0.0.0",
        ] {
            assert!(!listed(&bits, outside), "{outside}");
        }
        let set: u32 = bits.iter().map(|word| word.count_ones()).sum();
        assert_eq!(set, 65536 + 1 + 2);
        let everything: Box<V4Guard> = v4_blocks(["0.0.0.0/0".parse().unwrap()].iter(), 24);
        assert!(everything.iter().all(|word| *word == u32::MAX));
        let v6 = v6_blocks(nets.iter());
        let v6_listed = |addr: &str| {
            let top = (u128::from(addr.parse::<std::net::Ipv6Addr>().unwrap()) >> 96) as u32;
            let bit = v6_guard_bit(top);
            v6[(bit >> 5) as usize] & (1 << (bit & 31)) != 0
        };
        assert!(v6_listed("2001:db8::1") && v6_listed("2001:db8:ffff::"));
        assert!(!v6_listed("2001:db9::1") && !v6_listed("3fff:ffff::1"));
        let set: u32 = v6.iter().map(|word| word.count_ones()).sum();
        assert_eq!(set, 1, "one /32, and no IPv4 prefix, sets one bit");
        let wide = v6_blocks(["2001:db8::/29".parse().unwrap()].iter());
        let set: u32 = wide.iter().map(|word| word.count_ones()).sum();
        assert_eq!(set, 8, "a /29 is eight /32s");
        let nested: Vec<IpNet> = ["2001:db8::/29", "2001:db8::/32", "2001:db9::/48"]
            .iter()
            .map(|net| net.parse().unwrap())
            .collect();
        let merged = v6_blocks(nested.iter());
        assert_eq!(merged, wide, "prefixes inside the /29 add nothing");
        // 64 different /9s: half of all /32s, filled rather than hashed one by one.
        let feed: Vec<IpNet> = (0..64u128)
            .map(|i| IpNet::V6(ipnet::Ipv6Net::new(((0x20 + i) << 119).into(), 9).unwrap()))
            .collect();
        let full = v6_blocks(feed.iter());
        assert!(full.iter().all(|word| *word == u32::MAX));
        let coarse: Box<V4Coarse> = v4_blocks(nets.iter(), 20);
        let set: u32 = coarse.iter().map(|word| word.count_ones()).sum();
        assert_eq!(
            set,
            4096 + 1 + 1,
            "10/8 is 4096 /20s; the /32 and the /23 one each"
        );
    }
}
