// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
use vm_memory::Bytes;

use super::*;
use crate::services::{gntst, CopySide, GrantCopyOp, GrantMapping, GrantTable, MapAccess};

#[test]
fn mapped_grants_are_the_guests_memory() {
    let host = EmulatedHost::new().expect("host");
    let guest = host.add_guest(5, 16).expect("guest");
    let table = host.grant_table(0);
    let r3 = guest.grant_access(3, false).expect("grant");
    let r7 = guest.grant_access(7, true).expect("grant");
    guest.memory().write_slice(b"page three", GuestDomain::page_addr(3)).expect("write");
    guest.memory().write_slice(b"page seven", GuestDomain::page_addr(7)).expect("write");

    let m = table.map(5, &[r7, r3], MapAccess::ReadOnly).expect("map ro");
    assert_eq!((m.pages(), host.live_mappings(), host.map_calls()), (2, 1, 1));
    // SAFETY: the mapping is 2 pages long and alive.
    let (a, b) =
        unsafe { (std::slice::from_raw_parts(m.as_ptr(), 10), std::slice::from_raw_parts(m.as_ptr().add(4096), 10)) };
    assert_eq!((a, b), (&b"page seven"[..], &b"page three"[..]));
    assert!(matches!(guest.end_access(r3), Err(XenError::Os { errno: libc::EBUSY, .. })), "mapped grants stay");
    drop(m);
    assert_eq!(host.live_mappings(), 0);

    let w = table.map(5, &[r3], MapAccess::ReadWrite).expect("map rw");
    // SAFETY: one writable page.
    unsafe { std::ptr::copy_nonoverlapping(b"backend".as_ptr(), w.as_ptr(), 7) };
    let mut buf = [0u8; 7];
    guest.memory().read_slice(&mut buf, GuestDomain::page_addr(3)).expect("read");
    assert_eq!(&buf, b"backend", "the guest sees the backend's write");
    drop(w);
    guest.end_access(r3).expect("end");
    assert_eq!(guest.end_access(r3).map_err(|_| ()), Err(()));
}

#[test]
fn bad_batches_fail_as_a_whole() {
    let host = EmulatedHost::new().expect("host");
    let guest = host.add_guest(5, 4).expect("guest");
    let other = host.add_guest(6, 4).expect("guest");
    let table = host.grant_table(0);
    let ok = guest.grant_access(0, false).expect("grant");
    let ro = guest.grant_access(1, true).expect("grant");
    let to_dom9 = guest.grant_access_to(9, 2, false).expect("grant");
    let of_other = other.grant_access(0, false).expect("grant");
    assert!(table.map(5, &[ok, 999], MapAccess::ReadOnly).is_err(), "unknown ref");
    assert!(table.map(5, &[ok, ro], MapAccess::ReadWrite).is_err(), "read-only ref mapped writable");
    assert!(table.map(5, &[ok, to_dom9], MapAccess::ReadOnly).is_err(), "granted to another domain");
    assert!(table.map(6, &[ok], MapAccess::ReadOnly).is_err() || of_other == ok, "ref of another domain");
    assert!(table.map(42, &[ok], MapAccess::ReadOnly).is_err(), "no such domain");
    assert!(table.map(5, &[], MapAccess::ReadOnly).is_err(), "empty batch");
    assert_eq!(host.live_mappings(), 0);
    assert_eq!(host.grants().map_count(5, ok), 0, "failed batches hold nothing");
    let _m = table.map(5, &[ok, ro], MapAccess::ReadOnly).expect("read-only map of a writable and a ro ref");
}

#[test]
fn grant_copy_checks_each_op() {
    let host = EmulatedHost::new().expect("host");
    let guest = host.add_guest(5, 4).expect("guest");
    let table = host.grant_table(0);
    let rw = guest.grant_access(0, false).expect("grant");
    let ro = guest.grant_access(1, true).expect("grant");
    guest.memory().write_slice(&[7u8; 512], GuestDomain::page_addr(1)).expect("write");
    let mut local = vec![0u8; 4096];
    let l = local.as_mut_ptr() as usize;
    let g = |gref, offset| CopySide::Grant { domid: 5, gref, offset };
    let op = |source, dest, len| GrantCopyOp { source, dest, len, status: 1 };
    let mut ops = [
        op(g(ro, 0), CopySide::Local(l), 512),    // ok: read a read-only grant
        op(CopySide::Local(l), g(rw, 512), 512),  // ok: write a writable grant
        op(CopySide::Local(l), g(ro, 0), 512),    // write into a read-only grant
        op(g(rw, 3800), CopySide::Local(l), 512), // crosses the page end
        op(g(999, 0), CopySide::Local(l), 8),     // unknown ref
        op(CopySide::Grant { domid: 77, gref: rw, offset: 0 }, CopySide::Local(l), 8), // unknown domain
    ];
    // SAFETY: `local` is 4096 bytes, alive for the call.
    unsafe { table.copy(&mut ops) }.expect("copy");
    let st: Vec<i16> = ops.iter().map(|o| o.status).collect();
    assert_eq!(
        st,
        vec![
            gntst::OKAY,
            gntst::OKAY,
            gntst::PERMISSION_DENIED,
            gntst::BAD_COPY_ARG,
            gntst::BAD_GNTREF,
            gntst::BAD_DOMAIN
        ]
    );
    assert_eq!(&local[..512], &[7u8; 512][..]);
    let mut back = [0u8; 512];
    guest.memory().read_slice(&mut back, GuestAddress(512)).expect("read");
    assert_eq!(back, [7u8; 512]);
    assert_eq!(host.copy_calls(), 1);
}

#[test]
fn guests_get_a_xenstore_home_and_go_away() {
    let host = EmulatedHost::new().expect("host");
    let dom0 = host.xenstore().expect("store");
    dom0.watch("@releaseDomain", "r").expect("watch");
    let guest = host.add_guest(3, 8).expect("guest");
    let gs = guest.xenstore().expect("store");
    gs.write(TxId::NONE, "device/vbd/768/state", b"1").expect("guest writes its device dir");
    assert!(gs.write(TxId::NONE, "/local/domain/3/name", b"x").is_err(), "but not its home node");
    assert!(host.add_guest(3, 8).is_err(), "domid in use");
    assert_eq!(guest.alloc_pages(4), Some(0));
    assert_eq!(guest.alloc_pages(4), Some(4));
    assert_eq!(guest.alloc_pages(1), None);
    guest.free_pages(0, 4);
    assert_eq!(guest.alloc_pages(2), Some(0));
    let mut ev = Vec::new();
    dom0.take_watch_events(&mut ev).expect("events");
    drop(guest);
    ev.clear();
    dom0.take_watch_events(&mut ev).expect("events");
    assert_eq!(ev.len(), 1);
    assert!(dom0.read(TxId::NONE, "/local/domain/3").is_err());
}

#[test]
fn a_batch_is_mapped_one_run_of_consecutive_pages_at_a_time() {
    let host = EmulatedHost::new().expect("host");
    let guest = host.add_guest(5, 16).expect("guest");
    let table = host.grant_table(0);
    let refs: Vec<GrantRef> = (0..8).map(|p| guest.grant_access(p, false).expect("grant")).collect();
    for p in 0..8u8 {
        guest.memory().write_slice(&[p + 1; 8], GuestDomain::page_addr(usize::from(p))).expect("write");
    }
    let check = |m: &crate::emulated::grants::EmulatedMapping, pages: &[u8]| {
        for (i, &p) in pages.iter().enumerate() {
            // SAFETY: page `i` of a mapping of `pages.len()` pages, alive.
            let got = unsafe { std::slice::from_raw_parts(m.as_ptr().add(i * 4096), 8) };
            assert_eq!(got, &[p + 1; 8][..], "page {i} of the mapping shows guest page {p}");
        }
    };
    // Consecutive pages: one mapping, no reservation.
    let m = table.map(5, &refs[2..6], MapAccess::ReadWrite).expect("map");
    assert_eq!(host.grants().mmaps(), 1);
    check(&m, &[2, 3, 4, 5]);
    // Runs 6-7, 0-1, 4 and 4 again (a page named twice makes two runs): a reservation and a mapping per run.
    let pages = [6u8, 7, 0, 1, 4, 4];
    let batch: Vec<GrantRef> = pages.iter().map(|&p| refs[usize::from(p)]).collect();
    let n = table.map(5, &batch, MapAccess::ReadOnly).expect("map");
    assert_eq!(host.grants().mmaps(), 1 + 1 + 4);
    check(&n, &pages);
    // The guest's later writes show through both.
    guest.memory().write_slice(&[9; 8], GuestDomain::page_addr(4)).expect("write");
    // SAFETY: page 2 of `m` and page 4 of `n` are guest page 4, mapped and alive.
    unsafe {
        assert_eq!(std::slice::from_raw_parts(m.as_ptr().add(2 * 4096), 8), &[9; 8][..]);
        assert_eq!(std::slice::from_raw_parts(n.as_ptr().add(4 * 4096), 8), &[9; 8][..]);
    }
    drop((m, n));
    assert_eq!(host.live_mappings(), 0);
}
