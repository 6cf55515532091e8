// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A hostile frontend breaks every rule on purpose; each request gets exactly the expected status, guest memory
//! the backend may not write stays untouched, and the ring keeps working afterwards.

mod dataplane_util;

use dataplane_util::{Bed, BedConfig, DOMID};
use transport_xen::blkif::abi::REQ_BYTE1;
use transport_xen::blkif::{
    encode, BlkifLayout, BlkifSegment, RawRequest, OP_FLUSH_DISKCACHE, OP_READ, OP_RESERVED_1, OP_WRITE,
    OP_WRITE_BARRIER, RSP_EOPNOTSUPP, RSP_ERROR, RSP_OKAY, X86_32, X86_64,
};
use transport_xen::dataplane::QueueStats;
use transport_xen::emulated::GuestDomain;
use transport_xen::grant_memory::GrantMode;
use transport_xen::services::GrantRef;
use vm_memory::{Address, Bytes};

/// Disk of 8 MiB: 16384 sectors.
const SECTORS: u64 = 16384;

fn seg(gref: GrantRef, first: u8, last: u8) -> BlkifSegment {
    BlkifSegment { gref, first_sect: first, last_sect: last }
}

struct Case {
    name: &'static str,
    request: RawRequest,
    expect: i16,
}

fn hostile_table<L: BlkifLayout>(mode: GrantMode) {
    let mut bed = Bed::<L>::new(BedConfig { max_indirect: 256, ..Default::default() }.mode(mode));
    let front = &bed.fronts[0];
    let rw = front.grant_pages(2, false).expect("rw pages");
    let ro = front.grant_pages(1, true).expect("ro page");
    let foreign = bed.guest.grant_access_to(9, rw.first, false).expect("grant to another domain");
    let good_desc = front.grant_pages(1, true).expect("descriptor page");
    let bad_desc = front.grant_pages(1, true).expect("descriptor page");
    let badref_desc = front.grant_pages(1, true).expect("descriptor page");
    let guest = bed.guest.clone();
    let mem = guest.memory();
    mem.write_slice(&[0x5a; 4096], GuestDomain::page_addr(ro.first)).expect("fill ro page");
    let put_desc = |page: usize, segs: &[BlkifSegment]| {
        for (i, s) in segs.iter().enumerate() {
            mem.write_slice(&s.encode(), GuestDomain::page_addr(page).unchecked_add(i as u64 * 8)).expect("desc");
        }
    };
    put_desc(good_desc.first, &[seg(rw.grefs[0], 0, 7), seg(rw.grefs[1], 0, 7)]);
    put_desc(bad_desc.first, &[seg(rw.grefs[0], 0, 7), seg(rw.grefs[1], 0, 9)]);
    put_desc(badref_desc.first, &[seg(rw.grefs[0], 0, 7), seg(0xdead, 0, 7)]);
    let (g0, r0) = (rw.grefs[0], ro.grefs[0]);

    let mut id = 100;
    let mut next = || {
        id += 1;
        id
    };
    let rw_req = |op, id, sector, segs: &[BlkifSegment]| encode::rw::<L>(op, id, sector, segs);
    let with_count = |mut r: RawRequest, n: u8| {
        r.bytes[REQ_BYTE1] = n;
        r
    };
    let cases = vec![
        Case { name: "valid read", request: rw_req(OP_READ, next(), 0, &[seg(g0, 0, 7)]), expect: RSP_OKAY },
        Case {
            name: "write from a read-only grant",
            request: rw_req(OP_WRITE, next(), 8, &[seg(r0, 0, 7)]),
            expect: RSP_OKAY,
        },
        Case { name: "read with 0 segments", request: rw_req(OP_READ, next(), 0, &[]), expect: RSP_ERROR },
        Case { name: "write with 0 segments", request: rw_req(OP_WRITE, next(), 0, &[]), expect: RSP_ERROR },
        Case {
            name: "12 segments",
            request: with_count(rw_req(OP_READ, next(), 0, &[seg(g0, 0, 7); 11]), 12),
            expect: RSP_ERROR,
        },
        Case {
            name: "255 segments",
            request: with_count(rw_req(OP_READ, next(), 0, &[seg(g0, 0, 7)]), 255),
            expect: RSP_ERROR,
        },
        Case {
            name: "flush with 12 segments",
            request: with_count(rw_req(OP_FLUSH_DISKCACHE, next(), 0, &[]), 12),
            expect: RSP_ERROR,
        },
        Case {
            name: "first_sect > last_sect",
            request: rw_req(OP_READ, next(), 0, &[seg(g0, 4, 3)]),
            expect: RSP_ERROR,
        },
        Case { name: "last_sect 8", request: rw_req(OP_READ, next(), 0, &[seg(g0, 0, 8)]), expect: RSP_ERROR },
        Case { name: "first and last 8", request: rw_req(OP_READ, next(), 0, &[seg(g0, 8, 8)]), expect: RSP_ERROR },
        Case {
            name: "barrier with last_sect 9",
            request: rw_req(OP_WRITE_BARRIER, next(), 0, &[seg(g0, 0, 9)]),
            expect: RSP_ERROR,
        },
        Case {
            name: "read past the end",
            request: rw_req(OP_READ, next(), SECTORS - 4, &[seg(g0, 0, 7)]),
            expect: RSP_ERROR,
        },
        Case {
            name: "read at the end",
            request: rw_req(OP_READ, next(), SECTORS, &[seg(g0, 0, 0)]),
            expect: RSP_ERROR,
        },
        Case {
            name: "sector overflow",
            request: rw_req(OP_READ, next(), u64::MAX - 3, &[seg(g0, 0, 7)]),
            expect: RSP_ERROR,
        },
        Case {
            name: "byte offset overflow",
            request: rw_req(OP_WRITE, next(), u64::MAX / 512, &[seg(g0, 0, 7)]),
            expect: RSP_ERROR,
        },
        Case {
            name: "op RESERVED_1",
            request: rw_req(OP_RESERVED_1, next(), 0, &[seg(g0, 0, 7)]),
            expect: RSP_EOPNOTSUPP,
        },
        Case { name: "op 7", request: rw_req(7, next(), 0, &[seg(g0, 0, 7)]), expect: RSP_EOPNOTSUPP },
        Case { name: "op 255", request: rw_req(255, next(), 0, &[]), expect: RSP_EOPNOTSUPP },
        Case {
            name: "grant ref that does not exist",
            request: rw_req(OP_READ, next(), 0, &[seg(0xdead, 0, 7)]),
            expect: RSP_ERROR,
        },
        Case { name: "grant ref 0", request: rw_req(OP_WRITE, next(), 0, &[seg(0, 0, 7)]), expect: RSP_ERROR },
        Case {
            name: "good and bad refs in one request",
            request: rw_req(OP_WRITE, next(), 64, &[seg(g0, 0, 7), seg(0xbeef, 0, 7)]),
            expect: RSP_ERROR,
        },
        Case {
            name: "read into a read-only grant",
            request: rw_req(OP_READ, next(), 0, &[seg(r0, 0, 7)]),
            expect: RSP_ERROR,
        },
        Case {
            name: "grant meant for another domain",
            request: rw_req(OP_READ, next(), 0, &[seg(foreign, 0, 7)]),
            expect: RSP_ERROR,
        },
        Case {
            name: "valid indirect",
            request: encode::indirect::<L>(OP_READ, next(), 0, 2, &good_desc.grefs),
            expect: RSP_OKAY,
        },
        Case {
            name: "indirect with 257 segments",
            request: encode::indirect::<L>(OP_READ, next(), 0, 257, &good_desc.grefs),
            expect: RSP_ERROR,
        },
        Case {
            name: "indirect with 0 segments",
            request: encode::indirect::<L>(OP_WRITE, next(), 0, 0, &good_desc.grefs),
            expect: RSP_ERROR,
        },
        Case {
            name: "indirect flush",
            request: encode::indirect::<L>(OP_FLUSH_DISKCACHE, next(), 0, 2, &good_desc.grefs),
            expect: RSP_ERROR,
        },
        Case {
            name: "indirect page ref bogus",
            request: encode::indirect::<L>(OP_READ, next(), 0, 2, &[0xdead]),
            expect: RSP_ERROR,
        },
        Case {
            name: "indirect descriptor last_sect 9",
            request: encode::indirect::<L>(OP_READ, next(), 0, 2, &bad_desc.grefs),
            expect: RSP_ERROR,
        },
        Case {
            name: "indirect descriptor ref bogus",
            request: encode::indirect::<L>(OP_WRITE, next(), 0, 2, &badref_desc.grefs),
            expect: RSP_ERROR,
        },
        Case { name: "discard of 0 sectors", request: encode::discard::<L>(next(), 0, 0, false), expect: RSP_ERROR },
        Case {
            name: "discard past the end",
            request: encode::discard::<L>(next(), SECTORS - 8, 16, false),
            expect: RSP_ERROR,
        },
        Case {
            name: "discard overflow",
            request: encode::discard::<L>(next(), u64::MAX - 1, 8, false),
            expect: RSP_ERROR,
        },
        Case {
            name: "secure discard not advertised",
            request: encode::discard::<L>(next(), 0, 8, true),
            expect: RSP_EOPNOTSUPP,
        },
        Case { name: "valid discard", request: encode::discard::<L>(next(), 128, 8, false), expect: RSP_OKAY },
    ];
    let requests: Vec<RawRequest> = cases.iter().map(|c| c.request).collect();
    let statuses = bed.roundtrip(0, &requests);
    for (c, got) in cases.iter().zip(&statuses) {
        assert_eq!(*got, c.expect, "{:?} {mode:?}: {}", L::ABI, c.name);
    }
    let failures = cases.iter().filter(|c| c.expect != RSP_OKAY).count() as u64;
    assert_eq!(QueueStats::get(&bed.dp().stats(0).expect("stats").errors), failures);
    let mut page = [0u8; 4096];
    mem.read_slice(&mut page, GuestDomain::page_addr(ro.first)).expect("read");
    assert!(page.iter().all(|&b| b == 0x5a), "the read-only page was not written");
    assert_eq!(bed.file_bytes(64 * 512, 4096), vec![0u8; 4096], "a request with a bad ref wrote nothing");
    // The ring still serves.
    let after = rw_req(OP_READ, 1, 0, &[seg(g0, 0, 7)]);
    assert_eq!(bed.roundtrip(0, &[after]), vec![RSP_OKAY]);
    assert!(!bed.dp().halted());
    bed.stop();
    for p in [rw, ro, good_desc, bad_desc, badref_desc] {
        bed.fronts[0].release_pages(p).expect("nothing stays mapped");
    }
}

#[test]
fn hostile_requests_x86_64_map() {
    hostile_table::<X86_64>(GrantMode::Map);
}

#[test]
fn hostile_requests_x86_32_map() {
    hostile_table::<X86_32>(GrantMode::Map);
}

#[test]
fn hostile_requests_x86_64_copy() {
    hostile_table::<X86_64>(GrantMode::Copy);
}

#[test]
fn hostile_requests_x86_32_copy() {
    hostile_table::<X86_32>(GrantMode::Copy);
}

#[test]
fn indirect_requests_are_unknown_unless_advertised() {
    let mut bed = Bed::<X86_64>::new(BedConfig::default());
    let d = bed.fronts[0].grant_pages(1, true).expect("page");
    let r = encode::indirect::<X86_64>(OP_READ, 5, 0, 1, &d.grefs);
    assert_eq!(bed.roundtrip(0, &[r]), vec![RSP_EOPNOTSUPP]);
    bed.stop();
}

#[test]
fn read_only_disk_refuses_modifications() {
    let mut bed = Bed::<X86_64>::new(BedConfig { read_only: true, ..Default::default() });
    let rw = bed.fronts[0].grant_pages(1, false).expect("page");
    let g = rw.grefs[0];
    let requests = [
        encode::rw::<X86_64>(OP_WRITE, 1, 0, &[seg(g, 0, 7)]),
        encode::discard::<X86_64>(2, 0, 8, false),
        encode::rw::<X86_64>(OP_WRITE_BARRIER, 3, 0, &[seg(g, 0, 7)]),
        encode::rw::<X86_64>(OP_FLUSH_DISKCACHE, 4, 0, &[seg(g, 0, 7)]),
        encode::rw::<X86_64>(OP_FLUSH_DISKCACHE, 5, 0, &[]),
        encode::rw::<X86_64>(OP_WRITE_BARRIER, 6, 0, &[]),
        encode::rw::<X86_64>(OP_READ, 7, 0, &[seg(g, 0, 7)]),
    ];
    assert_eq!(
        bed.roundtrip(0, &requests),
        vec![RSP_ERROR, RSP_ERROR, RSP_ERROR, RSP_ERROR, RSP_OKAY, RSP_OKAY, RSP_OKAY]
    );
    bed.stop();
}

fn readable(fd: std::os::fd::RawFd) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
}

fn producer_overflow(bad_prod: impl Fn(u32) -> u32) {
    let mut bed = Bed::<X86_64>::new(BedConfig { queues: 2, ..Default::default() });
    let page = bed.fronts[0].grant_pages(1, false).expect("page");
    let g = page.grefs[0];
    assert_eq!(bed.roundtrip(0, &[encode::rw::<X86_64>(OP_READ, 1, 0, &[seg(g, 0, 7)])]), vec![RSP_OKAY]);
    assert!(!readable(bed.dp().fatal_fd()));
    let size = bed.fronts[0].ring().size();
    let rsp_prod = bed.fronts[0].ring().rsp_prod();
    bed.fronts[0].ring().set_req_prod_raw(bad_prod(rsp_prod.wrapping_add(size)));
    bed.fronts[0].notify().expect("notify");
    let deadline = std::time::Instant::now() + dataplane_util::TIMEOUT;
    while !bed.dp().halted() {
        assert!(std::time::Instant::now() < deadline, "ring not halted");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(readable(bed.dp().fatal_fd()), "the fatal fd signals the state machine");
    let msg = bed.dp().fatal_error().expect("message");
    assert!(msg.contains("queue 0") && msg.contains("halted"), "{msg}");
    let stats = bed.dp().stats(0).expect("stats");
    assert!(stats.halted.load(std::sync::atomic::Ordering::SeqCst));
    // The halted worker does not spin, whatever the frontend does.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let wakeups = QueueStats::get(&stats.wakeups);
    for _ in 0..200 {
        bed.fronts[0].notify().expect("notify");
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(QueueStats::get(&stats.wakeups) <= wakeups + 1, "halted worker woke up");
    // The other queue is unaffected.
    assert_eq!(bed.roundtrip(1, &[encode::rw::<X86_64>(OP_READ, 2, 0, &[seg(g, 0, 7)])]), vec![RSP_OKAY]);
    assert_eq!(bed.dp().take_fatal(), Some(msg));
    assert!(!readable(bed.dp().fatal_fd()));
    bed.stop();
    bed.fronts[0].release_pages(page).expect("unmapped");
}

#[test]
fn producer_more_than_a_ring_ahead_halts_the_ring() {
    producer_overflow(|limit| limit + 1);
}

#[test]
fn producer_far_ahead_halts_the_ring() {
    producer_overflow(|limit| limit.wrapping_add(1 << 30));
}

#[test]
fn producer_moved_backwards_halts_the_ring() {
    producer_overflow(|limit| limit.wrapping_sub(100));
}

#[test]
fn another_vbd_keeps_working_next_to_a_halted_one() {
    let mut hostile = Bed::<X86_64>::new(BedConfig::default());
    let mut honest = Bed::<X86_32>::new(BedConfig::default());
    let size = hostile.fronts[0].ring().size();
    hostile.fronts[0].ring().set_req_prod_raw(size * 3);
    hostile.fronts[0].notify().expect("notify");
    let page = honest.fronts[0].grant_pages(1, false).expect("page");
    for i in 0..50u64 {
        let r = encode::rw::<X86_32>(OP_WRITE, i, i * 8, &[seg(page.grefs[0], 0, 7)]);
        assert_eq!(honest.roundtrip(0, &[r]), vec![RSP_OKAY]);
    }
    let deadline = std::time::Instant::now() + dataplane_util::TIMEOUT;
    while !hostile.dp().halted() {
        assert!(std::time::Instant::now() < deadline, "ring not halted");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(!honest.dp().halted());
    assert_eq!(hostile.guest.domid(), DOMID);
    hostile.stop();
    honest.stop();
}

#[test]
fn an_event_storm_is_slowed_down_and_a_well_behaved_frontend_never_is() {
    let mut bed = Bed::<X86_64>::new(BedConfig::default());
    let page = bed.fronts[0].grant_pages(1, false).expect("page");
    let g = page.grefs[0];
    let stats = bed.dp().stats(0).expect("stats");
    // A well-behaved frontend: every notification comes with requests (batches of 1 to 8).
    for round in 0..200u64 {
        let batch: Vec<_> =
            (0..=round % 8).map(|i| encode::rw::<X86_64>(OP_READ, round * 8 + i, 0, &[seg(g, 0, 7)])).collect();
        assert!(bed.roundtrip(0, &batch).iter().all(|&s| s == RSP_OKAY));
    }
    assert_eq!(QueueStats::get(&stats.spurious_delays), 0, "no unmask was delayed for a frontend that queues work");
    // A storm: notifications without requests. After a few, the worker delays unmasking its port, so it wakes at
    // a falling rate instead of once per notification.
    let wakeups = QueueStats::get(&stats.wakeups);
    let t0 = std::time::Instant::now();
    let mut sent = 0u32;
    while t0.elapsed() < std::time::Duration::from_millis(300) {
        bed.fronts[0].notify().expect("notify");
        sent += 1;
    }
    let woke = QueueStats::get(&stats.wakeups) - wakeups;
    assert!(QueueStats::get(&stats.spurious_delays) > 0, "the storm was not recognised");
    assert!(woke < 100, "the worker woke {woke} times for {sent} notifications in 300 ms");
    // Nothing is lost: a request queued during the storm is answered (its notification pending on the masked
    // port is delivered at the unmask, at most 64 ms later), and the next event with work resets the back-off.
    assert_eq!(bed.roundtrip(0, &[encode::rw::<X86_64>(OP_READ, 9, 0, &[seg(g, 0, 7)])]), vec![RSP_OKAY]);
    let delays = QueueStats::get(&stats.spurious_delays);
    for i in 0..20 {
        assert_eq!(bed.roundtrip(0, &[encode::rw::<X86_64>(OP_READ, i, 0, &[seg(g, 0, 7)])]), vec![RSP_OKAY]);
    }
    assert_eq!(QueueStats::get(&stats.spurious_delays), delays, "work ends the back-off");
    bed.stop();
    bed.fronts[0].release_pages(page).expect("unmapped");
}
