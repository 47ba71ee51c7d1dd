//! An upgrade whose map layout differs from the one in force cannot reuse the pinned maps:
//! it builds its own, applies its policy there, swaps its program onto the pinned links, and
//! only then lets the old maps go. This module carries over what the old maps counted: the
//! global counters by index (indices are only ever added), the per-prefix counts by counter
//! id (the ids come back from the state file the old daemon wrote), and the table of stopped
//! sources, re-slotted for the new table's size. What does not fit the new layout is left
//! behind, and said so.

use std::{collections::HashMap, path::Path};

use aya::maps::{Array, Map, MapData, PerCpuArray, PerCpuHashMap};
use smtpguard_common::{Offender, map_name};

use crate::kernel::maps::{MapsError, PolicyMaps};

/// What was carried over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Carried {
    pub global: usize,
    pub prefixes: usize,
    pub offenders: usize,
}

impl std::fmt::Display for Carried {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} global counters, {} per-prefix counters, {} stopped sources",
            self.global, self.prefixes, self.offenders
        )
    }
}

/// Adds what the maps pinned in `old_dir` counted to `maps`. A map whose layout the new build
/// cannot read is skipped with a warning; nothing here stops an upgrade.
pub fn carry_over(old_dir: &Path, maps: &mut PolicyMaps) -> Carried {
    let mut carried = Carried::default();
    match read_global(old_dir) {
        Ok(global) => match maps.add_global(&global) {
            Ok(count) => carried.global = count,
            Err(error) => log::warn!("upgrade: global counters not carried over: {error}"),
        },
        Err(error) => log::warn!("upgrade: global counters not carried over: {error}"),
    }
    match read_prefix_hits(old_dir) {
        Ok(hits) => match maps.add_prefix_hits(&hits) {
            Ok(count) => carried.prefixes = count,
            Err(error) => log::warn!("upgrade: per-prefix counters not carried over: {error}"),
        },
        Err(error) => log::warn!("upgrade: per-prefix counters not carried over: {error}"),
    }
    match read_offenders(old_dir) {
        Ok(offenders) => match maps.add_offenders(&offenders) {
            Ok(count) => carried.offenders = count,
            Err(error) => log::warn!("upgrade: stopped sources not carried over: {error}"),
        },
        Err(error) => log::warn!("upgrade: stopped sources not carried over: {error}"),
    }
    carried
}

fn open(dir: &Path, name: &'static str) -> Result<Map, MapsError> {
    let data =
        MapData::from_pin(dir.join(name)).map_err(|source| MapsError::Map { name, source })?;
    Map::from_map_data(data).map_err(|source| MapsError::Map { name, source })
}

/// The old global counters, summed over CPUs, by index.
fn read_global(dir: &Path) -> Result<Vec<u64>, MapsError> {
    let name = map_name::GLOBAL;
    let map: PerCpuArray<MapData, u64> = open(dir, name)?
        .try_into()
        .map_err(|source| MapsError::Map { name, source })?;
    (0..map.len())
        .map(|index| {
            map.get(&index, 0)
                .map(|values| values.iter().sum())
                .map_err(|source| MapsError::Map { name, source })
        })
        .collect()
}

/// The old per-prefix counts, summed over CPUs, by counter id.
fn read_prefix_hits(dir: &Path) -> Result<HashMap<u32, u64>, MapsError> {
    let name = map_name::PREFIX_HITS;
    let map: PerCpuHashMap<MapData, u32, u64> = open(dir, name)?
        .try_into()
        .map_err(|source| MapsError::Map { name, source })?;
    map.iter()
        .map(|item| {
            item.map(|(id, values)| (id, values.iter().sum()))
                .map_err(|source| MapsError::Map { name, source })
        })
        .collect()
}

/// The sources the old table holds.
fn read_offenders(dir: &Path) -> Result<Vec<Offender>, MapsError> {
    let name = map_name::OFFENDERS;
    let map: Array<MapData, Offender> = open(dir, name)?
        .try_into()
        .map_err(|source| MapsError::Map { name, source })?;
    map.iter()
        .filter(|item| !matches!(item, Ok(seen) if seen.blocked + seen.would_block == 0))
        .map(|item| item.map_err(|source| MapsError::Map { name, source }))
        .collect()
}
