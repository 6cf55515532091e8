// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Hash maps keyed by values a guest picks (grant refs, event channel ports).
//!
//! Normally keyed with the standard library's random keys, so that a guest cannot pick keys that collide. In a
//! fuzzing build (`cfg(fuzzing)`, which cargo-fuzz sets for every crate) the keys are fixed instead: with random
//! keys the probe sequences, and so the code paths, of the same input change from run to run, and libFuzzer takes
//! every such change for new coverage (measured on the `blkif_dataplane` corpus: the edges of a replay of the same
//! 634 inputs varied by 10 between runs with random keys, by 1 with fixed ones). Fuzzing builds are never shipped.

use std::collections::HashMap;

/// The hasher of [`KeyedMap`]: random keys per map.
#[cfg(not(fuzzing))]
pub type KeyedState = std::collections::hash_map::RandomState;
/// The hasher of [`KeyedMap`]: fixed keys in a fuzzing build (see the module documentation).
#[cfg(fuzzing)]
pub type KeyedState = std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>;

/// A hash map whose keys a guest chooses.
pub type KeyedMap<K, V> = HashMap<K, V, KeyedState>;
