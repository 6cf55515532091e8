// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Stopping (also mid-I/O) answers every request the frontend queued (those the worker took are served, those
//! still on the ring fail with an I/O error: Linux blkfront waits for an answer to each before it can remove the
//! disk) and leaves no mapping and no bound port; persistent grants stay within their bound; failed starts leak
//! nothing.

mod dataplane_util;

use std::sync::Arc;

use dataplane_util::{Bed, BedConfig, DOMID};
use device_blk::EngineKind;
use transport_xen::blkif::{encode, BlkifSegment, RawRequest, OP_READ, OP_WRITE, RSP_ERROR, RSP_OKAY, X86_32, X86_64};
use transport_xen::connect::{ConnectConfig, QueueRing};
use transport_xen::dataplane::{Dataplane, DataplaneError, QueueStats};
use transport_xen::grant_memory::GrantMode;

fn seg(gref: u32) -> BlkifSegment {
    BlkifSegment { gref, first_sect: 0, last_sect: 7 }
}

fn stop_mid_io(mode: GrantMode, persistent: bool) {
    let mut bed = Bed::<X86_64>::new(BedConfig { order: 4, queues: 2, persistent, ..Default::default() }.mode(mode));
    let pages = match &bed.pool {
        Some(pool) => transport_xen::emulated::GrantedPages { first: pool.first, grefs: pool.grefs[..44].to_vec() },
        None => bed.fronts[0].grant_pages(44, false).expect("pages"),
    };
    let mut submitted = [0usize; 2];
    for (q, count) in submitted.iter_mut().enumerate() {
        let requests: Vec<RawRequest> = (0..400u64)
            .map(|i| {
                let g = &pages.grefs[usize::try_from(i % 4).expect("small") * 11..][..11];
                let segs: Vec<BlkifSegment> = g.iter().map(|&g| seg(g)).collect();
                let op = if i % 2 == 0 { OP_WRITE } else { OP_READ };
                encode::rw::<X86_64>(op, i, (i % 100) * 88, &segs)
            })
            .collect();
        *count = bed.fronts[q].submit(&requests).expect("submit");
    }
    let stats: Vec<_> = (0..2).map(|q| bed.dp().stats(q).expect("stats")).collect();
    bed.stop(); // asserts: no live mapping, no bound port
    for (q, &count) in submitted.iter().enumerate() {
        let (mut ok, mut failed) = (0u64, 0u64);
        while let Some(r) = bed.fronts[q].ring().take_response() {
            // Those the worker took before the stop are served; those still on the ring fail.
            assert!(matches!(r.status, RSP_OKAY | RSP_ERROR), "{mode:?} persistent {persistent}: {r:?} of queue {q}");
            if r.status == RSP_OKAY {
                ok += 1;
            } else {
                failed += 1;
            }
        }
        assert_eq!(ok + failed, count as u64, "{mode:?} persistent {persistent}: every queued request is answered");
        assert_eq!(failed, QueueStats::get(&stats[q].errors), "the failed ones are counted as errors");
        assert_eq!(ok + failed, QueueStats::get(&stats[q].requests));
    }
    if bed.pool.is_none() {
        bed.fronts[0].release_pages(pages).expect("every data grant can be revoked");
    } else {
        let pool = bed.pool.take().expect("pool");
        bed.fronts[0].release_pages(pool).expect("persistent grants unmapped at stop");
    }
}

#[test]
fn stop_mid_io_answers_what_was_consumed_and_unmaps_everything() {
    stop_mid_io(GrantMode::Map, false);
    stop_mid_io(GrantMode::Map, true);
    stop_mid_io(GrantMode::Copy, false);
}

#[test]
fn every_consumed_request_is_answered_at_stop() {
    let mut bed = Bed::<X86_32>::new(BedConfig { order: 4, ..Default::default() });
    let pages = bed.fronts[0].grant_pages(11, false).expect("pages");
    let segs: Vec<BlkifSegment> = pages.grefs.iter().map(|&g| seg(g)).collect();
    let requests: Vec<RawRequest> = (0..500u64).map(|i| encode::rw::<X86_32>(OP_WRITE, i, i * 8, &segs)).collect();
    assert_eq!(bed.fronts[0].submit(&requests).expect("submit"), 500);
    std::thread::sleep(std::time::Duration::from_millis(5));
    let stats = bed.dp().stats(0).expect("stats");
    bed.stop();
    let (mut ok, mut answered) = (0, 0);
    while let Some(r) = bed.fronts[0].ring().take_response() {
        answered += 1;
        ok += u64::from(r.status == RSP_OKAY);
    }
    assert!(ok > 0, "the worker ran for 5 ms");
    assert_eq!(answered, 500, "every queued request is answered (those left on the ring with an I/O error)");
    assert_eq!(answered, QueueStats::get(&stats.requests));
    assert_eq!(QueueStats::get(&stats.responses), answered);
    assert_eq!(QueueStats::get(&stats.errors), answered - ok);
    assert_eq!(bed.host.live_mappings(), 0);
    bed.fronts[0].release_pages(pages).expect("released");
}

#[test]
fn requests_left_on_the_ring_fail_with_an_io_error_at_stop() {
    let mut bed = Bed::<X86_64>::new(BedConfig::default());
    let pages = bed.fronts[0].grant_pages(1, false).expect("pages");
    let read = |id: u64| encode::rw::<X86_64>(OP_READ, id, 0, &[seg(pages.grefs[0])]);
    // The worker served one request and went back to waiting for an event.
    assert_eq!(bed.roundtrip(0, &[read(1)]), vec![RSP_OKAY]);
    // Three more queued and published without an event, as a frontend does that queues while the vbd closes
    // (the worker never looks at them before the stop).
    for id in 2..5 {
        assert!(bed.fronts[0].ring().put_request(&read(id)));
    }
    let _ = bed.fronts[0].ring().push_requests();
    let stats = bed.dp().stats(0).expect("stats");
    bed.stop();
    let mut answered = Vec::new();
    while let Some(r) = bed.fronts[0].ring().take_response() {
        answered.push((r.id, r.operation, r.status));
    }
    // Almost always none of them was looked at before the stop. But the worker may still take one more round after
    // the response to request 1 was published (an event that arrives after the round that answered it, such as an
    // edge of its completion eventfd), and every round looks at the ring: a request it took then is served (seen
    // once in a CI run; not reproduced in 450 local runs). Either way each is answered exactly once, in order, and
    // those left on the ring with an I/O error.
    let ids: Vec<(u64, u8)> = answered.iter().map(|&(id, op, _)| (id, op)).collect();
    assert_eq!(ids, vec![(2, OP_READ), (3, OP_READ), (4, OP_READ)], "{answered:?}");
    assert!(answered.iter().all(|&(_, _, status)| status == RSP_ERROR || status == RSP_OKAY), "{answered:?}");
    let errors = answered.iter().filter(|&&(_, _, status)| status == RSP_ERROR).count() as u64;
    assert_eq!(QueueStats::get(&stats.errors), errors);
    // Requests a round took are answered before the stop's error answers: errors only after the last success.
    let first_error = answered.iter().position(|&(_, _, status)| status == RSP_ERROR).unwrap_or(answered.len());
    assert!(answered[first_error..].iter().all(|&(_, _, status)| status == RSP_ERROR), "{answered:?}");
    bed.fronts[0].release_pages(pages).expect("released");
}

#[test]
fn persistent_grants_stay_within_their_bound() {
    let mut config = BedConfig { persistent: true, ..Default::default() };
    config.options.persistent_grants_limit = 16;
    let mut bed = Bed::<X86_64>::new(config);
    let grefs = bed.pool.as_ref().expect("pool").grefs[..64].to_vec();
    let mapped = |bed: &Bed<X86_64>| grefs.iter().filter(|&&g| bed.host.grants().map_count(DOMID, g) > 0).count();
    for (i, chunk) in grefs.chunks(4).enumerate() {
        let segs: Vec<BlkifSegment> = chunk.iter().map(|&g| seg(g)).collect();
        let r = encode::rw::<X86_64>(OP_READ, i as u64, 0, &segs);
        assert_eq!(bed.roundtrip(0, &[r]), vec![RSP_OKAY]);
        assert!(mapped(&bed) <= 16, "{} grants mapped", mapped(&bed));
    }
    assert_eq!(mapped(&bed), 16, "the cache is full");
    // The most recent grants hit; a request larger than the bound is mapped for itself only.
    let before = bed.host.map_calls();
    let segs: Vec<BlkifSegment> = grefs[60..64].iter().map(|&g| seg(g)).collect();
    assert_eq!(bed.roundtrip(0, &[encode::rw::<X86_64>(OP_WRITE, 99, 0, &segs)]), vec![RSP_OKAY]);
    assert_eq!(bed.host.map_calls(), before, "hit");
    bed.stop();
    assert_eq!(mapped(&bed), 0);
}

#[test]
fn failed_starts_leak_nothing() {
    let mut bed = Bed::<X86_64>::new(BedConfig { queues: 2, ..Default::default() });
    bed.stop(); // the frontend's ports are free to bind again
    let start = |config: &ConnectConfig| {
        Dataplane::start(
            bed.disk.clone(),
            EngineKind::Auto,
            Arc::new(bed.host.grant_table(0)),
            &bed.host.evtchn_opener(0),
            config,
            &bed.config.options,
        )
    };
    let good = bed.connect_config();
    let live = bed.host.live_mappings();
    let ports = bed.host.evtchn_switch().open_ports(0);

    let mut bad_ref = good.clone();
    bad_ref.queues[1].ring_refs = vec![0xdead];
    assert!(matches!(start(&bad_ref), Err(DataplaneError::MapRing { queue: 1, .. })));

    let mut bad_port = good.clone();
    bad_port.queues[1].remote_port = 999;
    assert!(matches!(start(&bad_port), Err(DataplaneError::Evtchn { queue: 1, .. })));

    let mut three_pages = good.clone();
    three_pages.queues[0].ring_refs = vec![1, 2, 3];
    assert!(matches!(start(&three_pages), Err(DataplaneError::Config(_))));

    let mut five_queues = good.clone();
    five_queues.queues = vec![QueueRing { ring_refs: vec![1], remote_port: 1 }; 5];
    assert!(matches!(start(&five_queues), Err(DataplaneError::Config(_))));

    let mut no_queue = good.clone();
    no_queue.queues.clear();
    assert!(matches!(start(&no_queue), Err(DataplaneError::Config(_))));

    assert_eq!(bed.host.live_mappings(), live, "nothing left mapped");
    assert_eq!(bed.host.evtchn_switch().open_ports(0), ports, "nothing left bound");
    let dp = start(&good).expect("the good configuration still starts");
    dp.stop();
}
