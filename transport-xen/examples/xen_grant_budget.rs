// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The supervisor's budget of grant pages per worker (`transport_xen::separation::grants`) on real Xen, from a
//! (PV) dom0: dom0 grants 12 pages to itself through `/dev/xen/gntalloc`, and this process plays both sides, the
//! supervisor registering with a [`GrantLedger`] (budget 8) and counting this process's memory map, the worker
//! mapping through its own handle of the same open file.
//!
//! Prints one `proto-check: grants-budget k=v ...` line (the lab's protocol test judges it) and exits 0, or a
//! `proto-error:` line and exits 1 when a step could not run at all.

use std::fs::OpenOptions;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

use transport_xen::separation::grants::{mapped_pages_of, GrantLedger, WorkerGntDev};
use transport_xen::services::{GrantMapping, MapAccess, XenError, XEN_PAGE_SIZE};
use transport_xen::xen::{GntAlloc, GntDev, GNTDEV_DEVICE};

fn main() {
    match run() {
        Ok(line) => println!("proto-check: grants-budget {line}"),
        Err(e) => {
            println!("proto-error: grants-budget: {e}");
            std::process::exit(1);
        }
    }
}

fn run() -> Result<String, XenError> {
    let share = GntAlloc::open()?.share(0, 12, true)?;
    // SAFETY: the share is mapped writable for `len()` bytes while `share` lives.
    let granted = unsafe { std::slice::from_raw_parts_mut(share.as_ptr(), share.len()) };
    for (i, byte) in granted.iter_mut().enumerate() {
        // A pattern that differs between pages and within them (the bytes of the offset, folded).
        *byte = (i.to_le_bytes().iter().fold(0u8, |a, b| a ^ b)).wrapping_add((i / XEN_PAGE_SIZE).to_le_bytes()[0]);
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(GNTDEV_DEVICE)
        .map_err(|e| XenError::os(format!("opening {GNTDEV_DEVICE}"), &e))?;
    let meta = file.metadata().map_err(|e| XenError::os("fstat", &e))?;
    let identity = (meta.dev(), meta.ino());
    let mapped_now = || {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        mapped_pages_of(&maps, identity)
    };
    let worker = GntDev::from_file(file.try_clone().map_err(|e| XenError::os("dup", &e))?);
    let mut ledger = GrantLedger::new(Box::new(WorkerGntDev::new(file, std::process::id())?), 8);
    let refs = share.refs();

    // A well-behaved worker: maps, then drops the registration at once; the mapping lives on.
    let first = ledger.register(0, &refs[..4])?;
    let mut kept = worker.map_registered(first, 4, MapAccess::ReadWrite)?;
    kept.unregister_now()?;
    // SAFETY: the mapping is live for `len()` bytes; the granted pages are this process's own.
    let seen = unsafe { std::slice::from_raw_parts_mut(kept.as_ptr(), kept.len()) };
    let mut survives = seen[..] == granted[..4 * XEN_PAGE_SIZE];
    seen[100] ^= 0xff;
    survives &= granted[100] == seen[100];
    // A worker that keeps its registration too: the ledger drops it before the next.
    let second = ledger.register(0, &refs[4..8])?;
    let held = worker.map_registered(second, 4, MapAccess::ReadOnly)?;
    let counted_full = mapped_now();
    let refused = match ledger.register(0, &refs[8..12]) {
        Err(XenError::Os { errno: libc::ENOSPC, .. }) => "ENOSPC".to_string(),
        Err(e) => format!("other:{e}"),
        Ok(index) => format!("registered:{index:#x}"),
    }
    .replace(' ', "_");
    // SAFETY: the read-only mapping is live for `len()` bytes.
    let second_intact = unsafe { std::slice::from_raw_parts(held.as_ptr(), held.len()) }
        == &granted[4 * XEN_PAGE_SIZE..8 * XEN_PAGE_SIZE];
    // The worker unmaps the first four: room again.
    drop(kept);
    let room_after_unmap = ledger.register(0, &refs[8..12]).is_ok();
    let counted_after = mapped_now();
    let counts = ledger.counts();
    drop(held);
    drop(ledger);
    let left = mapped_now();
    Ok(format!(
        "survives={} second_intact={} counted_full={counted_full} refused={refused} room_after_unmap={} \
         counted_after={counted_after} counts={counts} left={left}",
        u8::from(survives),
        u8::from(second_intact),
        u8::from(room_after_unmap)
    ))
}
