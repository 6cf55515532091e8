// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The supervisor's budget of grant pages per worker (`transport_xen::separation::grants`) on real Xen, from a
//! (PV) dom0: dom0 grants 12 pages to itself through `/dev/xen/gntalloc`; this process plays the supervisor (a
//! [`GrantLedger`] of 8 pages registering on the grant device and stopping the worker to read its memory map),
//! and a forked child the worker (mapping what it is told through the same open file, as a worker does).
//!
//! Prints one `proto-check: grants-budget k=v ...` line (the lab's protocol test judges it) and exits 0, or a
//! `proto-error:` line and exits 1 when a step could not run at all.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;

use transport_xen::separation::grants::{GrantLedger, WorkerGntDev};
use transport_xen::services::{GrantMapping, GrantRef, MapAccess, XenError, XEN_PAGE_SIZE};
use transport_xen::xen::{GntAlloc, GntDev, GntMapping, GNTDEV_DEVICE};

/// What the worker is told: map (offset, first granted page), unmap all but the last page of a mapping, unmap
/// it all, compare what it maps with the granted pages, end.
#[derive(Clone, Copy)]
enum Order {
    Map { slot: u8, index: u64, first: u8 },
    KeepLastPage { slot: u8 },
    Unmap { slot: u8 },
    Check { slot: u8 },
    End,
}

const PAGES: usize = 4;

fn main() {
    match run() {
        Ok(line) => println!("proto-check: grants-budget {line}"),
        Err(e) => {
            println!("proto-error: grants-budget: {e}");
            std::process::exit(1);
        }
    }
}

fn io(what: &str) -> impl Fn(std::io::Error) -> XenError + '_ {
    move |e| XenError::os(what, &e)
}

fn run() -> Result<String, XenError> {
    let share = GntAlloc::open()?.share(0, 12, true)?;
    // SAFETY: the share is mapped writable for `len()` bytes while `share` lives (in the worker too, after fork).
    let granted = unsafe { std::slice::from_raw_parts_mut(share.as_ptr(), share.len()) };
    for (chunk, value) in granted.chunks_mut(XEN_PAGE_SIZE).zip(0x40u8..) {
        chunk.fill(value);
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(GNTDEV_DEVICE)
        .map_err(io("opening the grant device"))?;
    let (mut supervisor, worker) = UnixStream::pair().map_err(io("socketpair"))?;
    // SAFETY: this process is single-threaded; the child only runs `serve` and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(XenError::os("fork", &std::io::Error::last_os_error()));
    }
    if pid == 0 {
        drop(supervisor);
        let code = serve(worker, GntDev::from_file(file), granted);
        // SAFETY: _exit is always safe.
        unsafe { libc::_exit(code) };
    }
    drop(worker);
    let pid = u32::try_from(pid).map_err(|_| XenError::Again)?;
    let mut ledger = GrantLedger::new(Box::new(WorkerGntDev::new(file, pid)?), 8);
    let refs: &[GrantRef] = share.refs();
    let mut tell = |order: Order| -> bool {
        let bytes = match order {
            Order::Map { slot, index, first } => {
                let mut b = vec![1, slot, first];
                b.extend_from_slice(&index.to_le_bytes());
                b
            }
            Order::KeepLastPage { slot } => vec![2, slot, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            Order::Unmap { slot } => vec![3, slot, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            Order::Check { slot } => vec![4, slot, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            Order::End => vec![5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        };
        let mut answer = [1u8];
        supervisor.write_all(&bytes).and_then(|()| supervisor.read_exact(&mut answer)).is_ok() && answer[0] == 0
    };

    let a = ledger.register(0, &refs[0..4])?;
    let mapped_a = tell(Order::Map { slot: 0, index: a, first: 0 });
    let b = ledger.register(0, &refs[4..8])?;
    let mapped_b = tell(Order::Map { slot: 1, index: b, first: 4 }) && tell(Order::KeepLastPage { slot: 1 });
    // 8 held: a whole and b's last page keep both registrations (gntdev keeps all of b's pages).
    let refused = match ledger.register(0, &refs[8..12]) {
        Err(XenError::Os { errno: libc::ENOSPC, .. }) => "ENOSPC".to_string(),
        Err(e) => format!("other:{e}").replace(' ', "_"),
        Ok(index) => format!("registered:{index:#x}"),
    };
    let piece_intact = tell(Order::Check { slot: 1 });
    // The worker lets go of a: room again, and the worker, stopped and resumed meanwhile, maps what it gets.
    let unmapped_a = tell(Order::Unmap { slot: 0 });
    // After a refusal the ledger looks again only after a short backoff (10 ms, doubling while full).
    std::thread::sleep(std::time::Duration::from_millis(50));
    let c = ledger.register(0, &refs[8..12]);
    let room_after_unmap = c.is_ok();
    let c_reused_a = c.as_ref().is_ok_and(|&c| c == a);
    let data_after_resume =
        c.is_ok_and(|c| tell(Order::Map { slot: 2, index: c, first: 8 }) && tell(Order::Check { slot: 2 }));
    let (charged, reclaims) = (ledger.charged(), ledger.reclaims());
    let ended = tell(Order::End);
    let mut status = 0;
    // SAFETY: waiting for our own child with a valid out-pointer.
    unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
    drop(ledger);
    Ok(format!(
        "mapped={} refused_with_piece={refused} piece_intact={} room_after_unmap={} reused={} \
         data_after_resume={} charged={charged} reclaims={reclaims} worker_exit={}",
        u8::from(mapped_a && mapped_b && unmapped_a),
        u8::from(piece_intact),
        u8::from(room_after_unmap),
        u8::from(c_reused_a),
        u8::from(data_after_resume),
        if ended && libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 },
    ))
}

/// The worker: follow orders on `socket`, mapping through `device`; answer 0 for done, 1 for failed.
fn serve(mut socket: UnixStream, device: GntDev, granted: &[u8]) -> i32 {
    let mut slots: Vec<Option<(GntMapping, u8)>> = (0..3).map(|_| None).collect();
    let mut kept: Vec<(*mut libc::c_void, usize, u8)> = Vec::new();
    let mut order = [0u8; 11];
    while socket.read_exact(&mut order).is_ok() {
        let slot = usize::from(order[1]).min(2);
        let done = match order[0] {
            1 => {
                let index = u64::from_le_bytes(order[3..11].try_into().unwrap_or_default());
                let mapping = device.map_brokered(index, PAGES, MapAccess::ReadWrite);
                let ok = mapping.is_ok();
                slots[slot] = mapping.ok().map(|m| (m, order[2]));
                ok
            }
            2 => match slots[slot].take() {
                Some((mapping, first)) => {
                    // Unmap all but the last page, and keep that page (the mapping's own unmap is not run).
                    let (ptr, len) = (mapping.as_ptr(), mapping.len());
                    std::mem::forget(mapping);
                    // SAFETY: the first len - one page of a mapping this process made and no longer uses.
                    let rc = unsafe { libc::munmap(ptr.cast(), len - XEN_PAGE_SIZE) };
                    // SAFETY: the last page is still mapped.
                    kept.push((unsafe { ptr.add(len - XEN_PAGE_SIZE) }.cast(), XEN_PAGE_SIZE, first + 3));
                    rc == 0
                }
                None => false,
            },
            3 => slots[slot].take().is_some(),
            4 => match (&slots[slot], kept.last()) {
                (Some((mapping, first)), _) => {
                    let start = usize::from(*first) * XEN_PAGE_SIZE;
                    // SAFETY: the mapping is live for `len()` bytes.
                    let seen = unsafe { std::slice::from_raw_parts(mapping.as_ptr(), mapping.len()) };
                    seen == &granted[start..start + PAGES * XEN_PAGE_SIZE]
                }
                (None, Some(&(ptr, len, page))) => {
                    let start = usize::from(page) * XEN_PAGE_SIZE;
                    // SAFETY: the kept page is mapped for `len` bytes.
                    let seen = unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) };
                    seen == &granted[start..start + XEN_PAGE_SIZE]
                }
                (None, None) => false,
            },
            _ => {
                let _ = socket.write_all(&[0]);
                break;
            }
        };
        if socket.write_all(&[u8::from(!done)]).is_err() {
            break;
        }
    }
    for (ptr, len, _) in kept {
        // SAFETY: the pages kept above, unused from now on.
        unsafe { libc::munmap(ptr, len) };
    }
    drop(slots);
    0
}
