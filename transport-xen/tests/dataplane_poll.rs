// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Adaptive polling in the Xen data plane (`DataplaneOptions::poll_us`): while a worker polls, the ring's request
//! event index stays behind, so the frontend queues requests without notifying and they are still served; once
//! the polling time passed without work the worker asks for events again and sleeps. Data moves correctly in
//! every grant mode, a stop ends polling, and a hostile producer index is caught without any event.

mod dataplane_util;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use dataplane_util::{pattern, Bed, BedConfig, Shape, TIMEOUT};
use transport_xen::blkif::{encode, BlkifSegment, RawRequest, OP_READ, RSP_OKAY, X86_32, X86_64};
use transport_xen::dataplane::{DataplaneOptions, QueueStats};
use transport_xen::emulated::GrantedPages;
use transport_xen::grant_memory::GrantMode;
use transport_xen::services::GrantRef;

/// Long enough that a test thread on a loaded CI machine always queues its next request within it.
const POLL_US: u32 = 300_000;

fn polling_bed(poll_us: u32, mode: GrantMode, persistent: bool) -> Bed<X86_64> {
    let options = {
        let mut o = DataplaneOptions::default();
        o.poll_us = poll_us;
        o
    };
    Bed::new(BedConfig { persistent, options, ..BedConfig::default() }.mode(mode))
}

fn read_4k(gref: GrantRef, id: u64) -> RawRequest {
    encode::rw::<X86_64>(OP_READ, id, 8 * id, &[BlkifSegment { gref, first_sect: 0, last_sect: 7 }])
}

/// A polling (or, with 0, event-driven) bed that served one request with an event (the worker was asleep), and
/// a granted data page.
fn warm_bed(poll_us: u32) -> (Bed<X86_64>, GrantedPages) {
    let mut bed = polling_bed(poll_us, GrantMode::Map, false);
    let page = bed.fronts[0].grant_pages(1, false).expect("page");
    assert_eq!(bed.roundtrip(0, &[read_4k(page.grefs[0], 1)]), vec![RSP_OKAY]);
    (bed, page)
}

/// Stop the data plane (checking nothing stays mapped) and revoke the data page.
fn finish(mut bed: Bed<X86_64>, page: GrantedPages) {
    bed.stop();
    bed.fronts[0].release_pages(page).expect("unmapped");
}

/// Queue `request` on queue 0 without notifying; returns whether the ring asked for a notification.
fn queue_silently(bed: &mut Bed<X86_64>, request: &RawRequest) -> bool {
    let ring = bed.fronts[0].ring();
    assert!(ring.put_request(request), "ring full");
    ring.push_requests()
}

#[test]
fn while_the_worker_polls_requests_need_no_event_and_are_served() {
    let (mut bed, page) = warm_bed(POLL_US);
    let stats = bed.dp().stats(0).expect("stats");
    for id in 2..40 {
        let notify = queue_silently(&mut bed, &read_4k(page.grefs[0], id));
        assert!(!notify, "request {id}: the ring asked for an event although the worker is polling");
        let rsp = bed.responses(0, 1);
        assert_eq!((rsp[0].id, rsp[0].status), (id, RSP_OKAY), "request {id} served without an event");
    }
    assert!(QueueStats::get(&stats.polled_requests) >= 38, "requests taken by polling");
    // Quiet for longer than the polling time: the worker asks for events again and sleeps.
    std::thread::sleep(Duration::from_micros(u64::from(POLL_US)) * 2 + Duration::from_millis(100));
    let wakeups = QueueStats::get(&stats.wakeups);
    let periods = QueueStats::get(&stats.poll_periods);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(QueueStats::get(&stats.wakeups), wakeups, "an idle polling worker woke up");
    assert_eq!(QueueStats::get(&stats.poll_periods), periods, "an idle worker started polling");
    assert!(queue_silently(&mut bed, &read_4k(page.grefs[0], 99)), "a sleeping worker must ask for an event");
    bed.fronts[0].notify().expect("notify");
    assert_eq!(bed.responses(0, 1)[0].status, RSP_OKAY);
    finish(bed, page);
}

#[test]
fn without_polling_every_request_after_a_pause_needs_an_event() {
    let (mut bed, page) = warm_bed(0);
    assert!(queue_silently(&mut bed, &read_4k(page.grefs[0], 2)), "the worker sleeps: it needs an event");
    bed.fronts[0].notify().expect("notify");
    assert_eq!(bed.responses(0, 1)[0].status, RSP_OKAY);
    assert_eq!(QueueStats::get(&bed.dp().stats(0).expect("stats").poll_periods), 0);
    finish(bed, page);
}

#[test]
fn data_moves_correctly_while_polling_in_every_grant_mode() {
    for (mode, persistent) in [(GrantMode::Map, false), (GrantMode::Map, true), (GrantMode::Copy, false)] {
        let what = format!("{mode:?} persistent {persistent}");
        let mut bed = polling_bed(POLL_US, mode, persistent);
        for round in 0..8u64 {
            let sector = 64 * round + 1;
            let data = pattern(40 * 512, round);
            let (st, _) = bed.transfer(0, Some(&data), sector, 40, Shape::Direct);
            assert!(st.iter().all(|&s| s == RSP_OKAY), "{what}: write {st:?}");
            let (st, back) = bed.transfer(0, None, sector, 40, Shape::Direct);
            assert!(st.iter().all(|&s| s == RSP_OKAY), "{what}: read {st:?}");
            assert!(back == data, "{what}: round {round}: read back differs");
            assert_eq!(bed.file_bytes(sector * 512, data.len()), data, "{what}: disk contents");
        }
        let stats = bed.dp().stats(0).expect("stats");
        assert!(QueueStats::get(&stats.poll_periods) > 0, "{what}: never polled");
        assert_eq!(QueueStats::get(&stats.errors), 0, "{what}");
        bed.stop();
    }
}

#[test]
fn the_32_bit_abi_is_polled_too() {
    let options = {
        let mut o = DataplaneOptions::default();
        o.poll_us = POLL_US;
        o
    };
    let mut bed = Bed::<X86_32>::new(BedConfig { options, queues: 2, ..BedConfig::default() });
    for q in 0..2 {
        let data = pattern(16 * 512, q as u64);
        let (st, _) = bed.transfer(q, Some(&data), 100, 16, Shape::Direct);
        assert!(st.iter().all(|&s| s == RSP_OKAY));
        let (st, back) = bed.transfer(q, None, 100, 16, Shape::Direct);
        assert!(st.iter().all(|&s| s == RSP_OKAY) && back == data, "queue {q}");
    }
    bed.stop();
}

#[test]
fn a_stop_ends_polling_while_the_frontend_keeps_the_worker_busy() {
    let (mut bed, page) = warm_bed(1_000_000);
    // Keep requests coming without events for a while, then stop with some in flight.
    let t0 = Instant::now();
    let mut id = 2;
    while t0.elapsed() < Duration::from_millis(200) {
        while bed.fronts[0].ring().free_requests() > 0 {
            queue_silently(&mut bed, &read_4k(page.grefs[0], id % 1000));
            id += 1;
        }
        while bed.fronts[0].ring().take_response().is_some() {}
        std::thread::yield_now();
    }
    let dp = bed.dp.take().expect("running");
    let (done, stopped) = mpsc::channel();
    std::thread::spawn(move || {
        dp.stop();
        let _ = done.send(());
    });
    stopped.recv_timeout(TIMEOUT).expect("the polling worker did not stop");
    finish(bed, page);
}

#[test]
fn a_producer_index_jump_is_caught_while_polling() {
    let (mut bed, page) = warm_bed(1_000_000);
    // No notification: only polling can see it.
    let prod = bed.fronts[0].ring().req_prod_pvt();
    bed.fronts[0].ring().set_req_prod_raw(prod.wrapping_add(1 << 30));
    let deadline = Instant::now() + TIMEOUT;
    while !bed.dp().halted() {
        assert!(Instant::now() < deadline, "ring not halted");
        std::thread::sleep(Duration::from_millis(2));
    }
    finish(bed, page);
}
