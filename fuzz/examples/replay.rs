// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Replays inputs through one target without libFuzzer or sanitizers, with the target's own assertions:
//! `cargo run --manifest-path fuzz/Cargo.toml --example replay -- TARGET FILE...` (a directory stands for the
//! files in it). For bisecting a failing corpus entry quickly, and timing each
//! (wall clock, one line per input: find the inputs that make a target slow).

use std::path::PathBuf;

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let name = args.next().ok_or("usage: replay TARGET FILE...")?;
    let target =
        blkback_fuzz::targets::ALL.iter().find(|t| t.name == name).ok_or_else(|| format!("no target {name}"))?;
    let mut files = Vec::new();
    for arg in args.map(PathBuf::from) {
        if arg.is_dir() {
            let entries = std::fs::read_dir(&arg).map_err(|e| format!("{}: {e}", arg.display()))?;
            let mut inner: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
            inner.sort();
            files.extend(inner);
        } else {
            files.push(arg);
        }
    }
    for f in &files {
        let data = std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?;
        let started = std::time::Instant::now();
        (target.run)(&data);
        eprintln!("{:>9} µs  {}", started.elapsed().as_micros(), f.display());
    }
    eprintln!("{} inputs passed {name}", files.len());
    Ok(())
}
