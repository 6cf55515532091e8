// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The inputs that made the live lanes' state, so that a failure that depends on it can be replayed.
//!
//! A lane's state comes from the inputs it served, and another lane's may matter too (a lane with persistent
//! grants may hold a page of another lane's ring). So the inputs are recorded in the order they ran, all lanes
//! together, and no lane lives longer than [`WINDOW`] inputs (`lanes`): the last `WINDOW` inputs then include
//! every live lane's first. They are kept in two generations of up to `WINDOW` inputs each (when one is full, the
//! older is emptied and takes the next inputs), in buffers made once: recording allocates nothing that stays (see
//! `lanes::lane_for`).
//!
//! An input that fails panics, and libFuzzer's panic hook (`libfuzzer-sys`) aborts before anything unwinds; so the
//! inputs are written by a panic hook of ours, which runs first: if inputs ran before the failing one, it writes
//! them all, the failing one last, as `0000`, `0001`, ... into a new directory `lane-<pid>-<n>` under
//! `artifacts/blkif_dataplane/` (or `$BLKIF_DATAPLANE_HISTORY_DIR`), and says how to replay them.

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Inputs per generation, and the most a lane may live (counted in all lanes' inputs).
pub(super) const WINDOW: u64 = 256;

/// Inputs end to end (`ends[i]`: where input `i` ends).
struct Generation {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Generation {
    fn new() -> Generation {
        Generation { bytes: Vec::with_capacity(WINDOW as usize * 512), ends: Vec::with_capacity(WINDOW as usize) }
    }
}

thread_local! {
    /// The older generation, then the one being filled (`CURRENT`).
    static HISTORY: RefCell<[Generation; 2]> = RefCell::new([Generation::new(), Generation::new()]);
    static CURRENT: Cell<usize> = const { Cell::new(0) };
    /// An input runs on this thread.
    static RUNNING: Cell<bool> = const { Cell::new(false) };
    /// Where histories go (`None`: `$BLKIF_DATAPLANE_HISTORY_DIR`, else `artifacts/blkif_dataplane`).
    static DIR: RefCell<Option<PathBuf>> = const { RefCell::new(None) };
}

/// `data` is the next input.
pub(super) fn record(data: &[u8]) {
    HISTORY.with_borrow_mut(|h| {
        let mut cur = CURRENT.get();
        if h[cur].ends.len() as u64 >= WINDOW {
            cur = 1 - cur;
            CURRENT.set(cur);
            h[cur].bytes.clear();
            h[cur].ends.clear();
        }
        let g = &mut h[cur];
        g.bytes.extend_from_slice(data);
        g.ends.push(g.bytes.len());
    });
}

/// Whether an input runs on this thread.
pub(super) fn running(yes: bool) {
    RUNNING.set(yes);
}

/// Where this thread's histories go (for tests).
#[cfg(test)]
pub(super) fn set_dir(dir: &Path) {
    DIR.set(Some(dir.to_path_buf()));
}

/// Forget every input recorded on this thread (for tests).
#[cfg(test)]
pub(super) fn reset() {
    HISTORY.with_borrow_mut(|h| {
        for g in h.iter_mut() {
            g.bytes.clear();
            g.ends.clear();
        }
    });
}

/// Install the panic hook (once per process; it chains to the hook set before, libFuzzer's included).
pub(super) fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let before = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if RUNNING.try_with(Cell::get).unwrap_or(false) {
                report();
            }
            before(info);
        }));
    });
}

/// If inputs ran before the one that failed, write them all and say where.
fn report() {
    let base = DIR
        .try_with(|d| d.borrow().clone())
        .ok()
        .flatten()
        .or_else(|| std::env::var_os("BLKIF_DATAPLANE_HISTORY_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("artifacts/blkif_dataplane"));
    let cur = CURRENT.try_with(Cell::get).unwrap_or(0);
    let written = HISTORY.try_with(|h| match h.try_borrow() {
        Ok(h) if h[0].ends.len() + h[1].ends.len() > 1 => Some(write(&h[1 - cur], &h[cur], &base)),
        _ => None,
    });
    let mut err = std::io::stderr().lock();
    let _ = match written {
        Ok(Some(Ok((dir, n)))) => writeln!(
            err,
            "blkif_dataplane: the failing input ran after others whose lanes may matter; the last {n} inputs, in \
             order, are in {} (replay: cargo run --release --manifest-path fuzz/Cargo.toml --example replay -- \
             blkif_dataplane {})",
            dir.display(),
            dir.display()
        ),
        Ok(Some(Err(e))) => writeln!(err, "blkif_dataplane: cannot write the inputs under {}: {e}", base.display()),
        _ => Ok(()),
    };
}

/// Write the inputs of `older`, then of `newer`, into a new directory under `base`; the directory and how many.
fn write(older: &Generation, newer: &Generation, base: &Path) -> std::io::Result<(PathBuf, usize)> {
    let pid = std::process::id();
    let dir = (0..).map(|n| base.join(format!("lane-{pid}-{n}"))).find(|d| !d.exists()).expect("a free name");
    std::fs::create_dir_all(&dir)?;
    let mut i = 0;
    for g in [older, newer] {
        let mut from = 0;
        for &end in &g.ends {
            std::fs::write(dir.join(format!("{i:04}")), &g.bytes[from..end])?;
            from = end;
            i += 1;
        }
    }
    Ok((dir, i))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panic while an input runs writes every input recorded, in order (across generations); a failing input
    /// with none before it writes nothing (it reproduces alone).
    #[test]
    fn a_failing_input_writes_the_inputs_before_it_in_order() {
        install_panic_hook();
        let dir = tempfile::tempdir().expect("temp dir");
        set_dir(dir.path());
        reset();
        record(b"first");
        running(true);
        assert!(std::panic::catch_unwind(|| panic!("a failing first input")).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0, "a lone input wrote a history");
        for i in 1..WINDOW + 2 {
            record(format!("input {i}").as_bytes());
        }
        assert!(std::panic::catch_unwind(|| panic!("a failing input")).is_err());
        running(false);
        let written: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").map(|e| e.expect("entry").path()).collect();
        assert_eq!(written.len(), 1, "one history per failure: {written:?}");
        let read = |name: &str| std::fs::read(written[0].join(name)).expect("input file");
        // 258 recorded: the older generation holds the first 256, the newer the last 2.
        assert_eq!(read("0000"), b"first".to_vec());
        assert_eq!(read("0255"), b"input 255".to_vec());
        assert_eq!(read("0257"), b"input 257".to_vec());
        assert!(!written[0].join("0258").exists());
    }
}
