// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The inputs each lane served, so that a failure that depends on them can be replayed.
//!
//! An input that fails panics, and libFuzzer's panic hook (`libfuzzer-sys`) aborts before anything unwinds; so the
//! inputs are written by a panic hook of ours, which runs first: if the input running on this thread is on a lane
//! that served others before, it writes them all, in order, as `0000`, `0001`, ... into a new directory
//! `lane-<pid>-<n>` under `artifacts/blkif_dataplane/` (or `$BLKIF_DATAPLANE_HISTORY_DIR`), and says how to replay
//! them. The histories live apart from the lanes (which the failing input holds) in buffers made once, with room
//! for a lane's whole life: a kept lane's input allocates nothing that stays (see `lanes::lane_for`).

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::lanes::{LANE_LIFE, SLOTS};

/// One lane's inputs, end to end (`ends[i]`: where input `i` ends).
struct History {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

thread_local! {
    static HISTORIES: RefCell<Vec<History>> = RefCell::new(
        (0..SLOTS).map(|_| History { bytes: Vec::with_capacity(LANE_LIFE * 512), ends: Vec::with_capacity(LANE_LIFE) }).collect(),
    );
    /// The slot of the lane running an input on this thread.
    static RUNNING: Cell<Option<usize>> = const { Cell::new(None) };
    /// Where histories go (`None`: `$BLKIF_DATAPLANE_HISTORY_DIR`, else `artifacts/blkif_dataplane`).
    static DIR: RefCell<Option<PathBuf>> = const { RefCell::new(None) };
}

/// A new lane on `slot`: forget the inputs of the one before.
pub(super) fn clear(slot: usize) {
    HISTORIES.with_borrow_mut(|h| {
        h[slot].bytes.clear();
        h[slot].ends.clear();
    });
}

/// `data` is the next input of the lane on `slot`.
pub(super) fn record(slot: usize, data: &[u8]) {
    HISTORIES.with_borrow_mut(|h| {
        let h = &mut h[slot];
        h.bytes.extend_from_slice(data);
        h.ends.push(h.bytes.len());
    });
}

/// The lane on `slot` runs an input on this thread (`None`: no input runs).
pub(super) fn running(slot: Option<usize>) {
    RUNNING.set(slot);
}

/// Where this thread's histories go (for tests).
#[cfg(test)]
pub(super) fn set_dir(dir: &Path) {
    DIR.set(Some(dir.to_path_buf()));
}

/// Install the panic hook (once per process; it chains to the hook set before, libFuzzer's included).
pub(super) fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let before = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(slot) = RUNNING.try_with(Cell::get).ok().flatten() {
                report(slot);
            }
            before(info);
        }));
    });
}

/// If the lane on `slot` served inputs before the one that failed, write them all and say where.
fn report(slot: usize) {
    let base = DIR
        .try_with(|d| d.borrow().clone())
        .ok()
        .flatten()
        .or_else(|| std::env::var_os("BLKIF_DATAPLANE_HISTORY_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("artifacts/blkif_dataplane"));
    let written = HISTORIES.try_with(|h| match h.try_borrow() {
        Ok(h) if h[slot].ends.len() > 1 => Some(write(&h[slot], &base)),
        _ => None,
    });
    let mut err = std::io::stderr().lock();
    let _ = match written {
        Ok(Some(Ok((dir, n)))) => writeln!(
            err,
            "blkif_dataplane: the failing input was input {n} of its lane; the lane's inputs, in order, are in {} \
             (replay: cargo run --release --manifest-path fuzz/Cargo.toml --example replay -- blkif_dataplane {})",
            dir.display(),
            dir.display()
        ),
        Ok(Some(Err(e))) => {
            writeln!(err, "blkif_dataplane: cannot write the lane's inputs under {}: {e}", base.display())
        }
        _ => Ok(()),
    };
}

/// Write `h`'s inputs into a new directory under `base`; the directory and how many.
fn write(h: &History, base: &Path) -> std::io::Result<(PathBuf, usize)> {
    let pid = std::process::id();
    let dir = (0..).map(|n| base.join(format!("lane-{pid}-{n}"))).find(|d| !d.exists()).expect("a free directory name");
    std::fs::create_dir_all(&dir)?;
    let mut from = 0;
    for (i, &end) in h.ends.iter().enumerate() {
        std::fs::write(dir.join(format!("{i:04}")), &h.bytes[from..end])?;
        from = end;
    }
    Ok((dir, h.ends.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panic while a lane that served inputs before runs one writes them all, in order; a lane's first input
    /// writes nothing (it reproduces alone).
    #[test]
    fn a_failing_input_writes_its_lanes_inputs_in_order() {
        install_panic_hook();
        let dir = tempfile::tempdir().expect("temp dir");
        set_dir(dir.path());
        let slot = SLOTS - 1;
        clear(slot);
        record(slot, b"first");
        running(Some(slot));
        assert!(std::panic::catch_unwind(|| panic!("a failing first input")).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0, "a lane's first input wrote a history");
        record(slot, b"second");
        record(slot, b"third");
        assert!(std::panic::catch_unwind(|| panic!("a failing third input")).is_err());
        running(None);
        let lanes: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").map(|e| e.expect("entry").path()).collect();
        assert_eq!(lanes.len(), 1, "one history per failure: {lanes:?}");
        let read = |name: &str| std::fs::read(lanes[0].join(name)).expect("input file");
        assert_eq!(
            (read("0000"), read("0001"), read("0002")),
            (b"first".to_vec(), b"second".to_vec(), b"third".to_vec())
        );
        assert!(!lanes[0].join("0003").exists());
    }
}
