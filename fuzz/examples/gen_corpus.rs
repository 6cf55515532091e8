// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Writes the seed corpus: `cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus [DIR]` (default:
//! `fuzz/corpus`). Each target's seeds come from `seeds()` in its module, built with the project's own encoders,
//! so they follow the input layouts by construction. Files are named by content, so rerunning adds nothing twice.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let root = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus"));
    for t in blkback_fuzz::targets::ALL {
        let dir = root.join(t.name);
        std::fs::create_dir_all(&dir)?;
        for seed in (t.seeds)() {
            let mut h = DefaultHasher::new();
            seed.hash(&mut h);
            std::fs::write(dir.join(format!("seed-{:016x}", h.finish())), &seed)?;
        }
        println!("{}: {} seeds", t.name, (t.seeds)().len());
    }
    Ok(())
}
