// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fuzz targets for every parser of guest- or xenstore-supplied bytes in the block backend.
//!
//! The targets live in this library ([`targets`]) so that the libFuzzer binaries (`fuzz_targets/*.rs`, built by
//! `cargo fuzz`), the seed generator (`examples/gen_corpus.rs`) and the plain regression tests (below: every
//! committed corpus and regression input replayed through its target) share one definition of each input
//! layout and invariant.

pub mod input;
pub mod targets;

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::targets::ALL;

    fn replay(dir: &Path, run: fn(&[u8])) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
        let mut files: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_file()).collect();
        files.sort();
        for f in &files {
            let data = std::fs::read(f).expect("read input");
            eprintln!("replaying {}", f.display());
            run(&data);
        }
        files.len()
    }

    /// The data plane's hash maps keyed by guest values hash alike in every run of a fuzzing build, so that an
    /// input takes the same code paths each time (with random keys libFuzzer took the changes for new coverage).
    #[test]
    #[cfg_attr(not(fuzzing), ignore = "needs `--cfg fuzzing`, as cargo-fuzz and scripts/test build")]
    fn guest_keyed_maps_hash_alike_in_every_run() {
        use std::hash::BuildHasher;
        use transport_xen::keyed_map::KeyedState;
        let (a, b) = (KeyedState::default(), KeyedState::default());
        assert_eq!(a.hash_one(0x1_0000u32), b.hash_one(0x1_0000u32));
    }

    /// Every seed the generator makes passes its target.
    #[test]
    fn generated_seeds_pass() {
        for t in ALL {
            for seed in (t.seeds)() {
                (t.run)(&seed);
            }
        }
    }

    /// Every committed seed and every regression input (a crash found and fixed) passes its target.
    #[test]
    fn committed_corpus_and_regressions_pass() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for t in ALL {
            let seeds = replay(&root.join("corpus").join(t.name), t.run);
            assert!(seeds > 0, "no committed seeds for {}", t.name);
            replay(&root.join("regressions").join(t.name), t.run);
        }
    }
}
