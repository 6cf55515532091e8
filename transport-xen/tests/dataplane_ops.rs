// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Flush, barrier and discard; one map batch per request; one notification per batch; backpressure.

mod dataplane_util;

use dataplane_util::{pattern, Bed, BedConfig, Shape, DOMID, TIMEOUT};
use device_blk::EngineKind;
use transport_xen::blkif::{
    encode, BlkifSegment, RawRequest, OP_FLUSH_DISKCACHE, OP_READ, OP_WRITE, OP_WRITE_BARRIER, RSP_OKAY, X86_32, X86_64,
};
use transport_xen::dataplane::{IoThreads, QueueStats};
use transport_xen::emulated::GuestDomain;
use transport_xen::grant_memory::GrantMode;
use vm_memory::Bytes;

fn page_segs(grefs: &[u32]) -> Vec<BlkifSegment> {
    grefs.iter().map(|&gref| BlkifSegment { gref, first_sect: 0, last_sect: 7 }).collect()
}

#[test]
fn flush_and_barrier_with_and_without_data() {
    for mode in [GrantMode::Map, GrantMode::Copy] {
        let mut bed = Bed::<X86_64>::new(BedConfig::default().mode(mode));
        let pages = bed.fronts[0].grant_pages(2, true).expect("pages");
        let data = pattern(8192, 3);
        bed.guest.memory().write_slice(&data, GuestDomain::page_addr(pages.first)).expect("fill");
        let segs = page_segs(&pages.grefs);
        let requests = [
            encode::rw::<X86_64>(OP_FLUSH_DISKCACHE, 1, 0, &[]),
            encode::rw::<X86_64>(OP_WRITE_BARRIER, 2, 0, &[]),
            encode::rw::<X86_64>(OP_FLUSH_DISKCACHE, 3, 100, &segs),
            encode::rw::<X86_64>(OP_WRITE_BARRIER, 4, 200, &segs),
        ];
        assert_eq!(bed.roundtrip(0, &requests), vec![RSP_OKAY; 4], "{mode:?}");
        assert_eq!(bed.file_bytes(100 * 512, 8192), data, "{mode:?}: flush with data wrote it");
        assert_eq!(bed.file_bytes(200 * 512, 8192), data, "{mode:?}: barrier with data wrote it");
        bed.stop();
        bed.fronts[0].release_pages(pages).expect("released");
    }
}

#[test]
fn a_barrier_waits_for_earlier_requests_and_holds_later_ones() {
    let mut bed = Bed::<X86_32>::new(BedConfig { order: 2, ..Default::default() });
    let pages = bed.fronts[0].grant_pages(11, true).expect("pages");
    let segs = page_segs(&pages.grefs);
    let mut requests: Vec<RawRequest> = (0..8).map(|i| encode::rw::<X86_32>(OP_WRITE, i, i * 88, &segs)).collect();
    requests.push(encode::rw::<X86_32>(OP_WRITE_BARRIER, 100, 2000, &segs[..1]));
    requests.extend((0..4).map(|i| encode::rw::<X86_32>(OP_WRITE, 200 + i, 3000 + i * 88, &segs)));
    assert_eq!(bed.fronts[0].submit(&requests).expect("submit"), requests.len());
    let order: Vec<u64> = bed.responses(0, requests.len()).iter().map(|r| r.id).collect();
    let pos = |id| order.iter().position(|&x| x == id).expect("answered");
    let barrier = pos(100);
    assert!((0..8).all(|i| pos(i) < barrier), "earlier writes complete first: {order:?}");
    assert!((200..204).all(|i| pos(i) > barrier), "later writes wait for the barrier: {order:?}");
    bed.stop();
    bed.fronts[0].release_pages(pages).expect("released");
}

/// A barrier held behind earlier writes, with nothing queued after it: the completion that lets it start must also
/// submit it (no later request or event comes to do that, and the frontend waits for this answer). The requests
/// are on the ring before the data plane starts, without an event, so its first round is the only look; the
/// synchronous engine completes the writes as they are queued. Each engine, on the ring's own thread and on a
/// pool thread.
#[test]
fn a_barrier_last_on_the_ring_starts_when_the_earlier_writes_complete() {
    let shared = IoThreads::new(1);
    for round in 0..8 {
        let engine = if round % 2 == 0 { EngineKind::Sync } else { EngineKind::Auto };
        let mut config = BedConfig { order: 1, engine, ..Default::default() };
        config.options.io_threads = (round % 4 >= 2).then(|| shared.clone());
        let mut granted = None;
        let mut bed = Bed::<X86_64>::new_prepared(config, |bed| {
            let pages = bed.fronts[0].grant_pages(11, true).expect("pages");
            let segs = page_segs(&pages.grefs);
            let ring = bed.fronts[0].ring();
            for i in 0..8 {
                assert!(ring.put_request(&encode::rw::<X86_64>(OP_WRITE, i, i * 88, &segs)));
            }
            assert!(ring.put_request(&encode::rw::<X86_64>(OP_WRITE_BARRIER, 100, 2000, &segs[..1])));
            ring.push_requests();
            granted = Some(pages);
        });
        let answered = bed.fronts[0].wait_responses(9, TIMEOUT);
        let answered =
            answered.unwrap_or_else(|e| panic!("round {round} ({engine:?}): the barrier was never answered: {e}"));
        assert!(answered.iter().all(|r| r.status == RSP_OKAY), "round {round}: {answered:?}");
        bed.stop();
        bed.fronts[0].release_pages(granted.expect("pages")).expect("released");
    }
}

#[test]
fn discard_punches_zeroes_and_secure_discard_when_advertised() {
    let mut config = BedConfig::default();
    config.options.discard_secure = true;
    let mut bed = Bed::<X86_64>::new(config);
    let data = pattern(64 * 512, 9);
    let (st, _) = bed.transfer(0, Some(&data), 0, 64, Shape::Direct);
    assert!(st.iter().all(|&s| s == RSP_OKAY));
    let requests = [encode::discard::<X86_64>(1, 16, 16, false), encode::discard::<X86_64>(2, 48, 8, true)];
    assert_eq!(bed.roundtrip(0, &requests), vec![RSP_OKAY, RSP_OKAY]);
    let (st, back) = bed.transfer(0, None, 0, 64, Shape::Direct);
    assert!(st.iter().all(|&s| s == RSP_OKAY));
    let mut expect = data.clone();
    expect[16 * 512..32 * 512].fill(0);
    expect[48 * 512..56 * 512].fill(0);
    assert!(back == expect, "discarded ranges read back as zeroes, the rest is intact");
    bed.stop();
}

/// blkif advertises no discard limit and Linux blkfront sends discards of up to 4 GiB (its whole disk before 6.9,
/// `mkfs` and `blkdiscard` ask for all of it): a discard of a whole 6 GiB disk in one request is served (in pieces
/// of at most 2 GiB per system call), not refused for exceeding virtio's advertised maximum.
#[test]
fn a_discard_of_a_whole_large_disk_is_served() {
    let config = BedConfig { disk_bytes: 6 << 30, ..BedConfig::default() };
    let mut bed = Bed::<X86_64>::new(config);
    let sectors = (6u64 << 30) / 512;
    let data = pattern(64 * 512, 3);
    // Data in each 2 GiB piece of the disk, and at its very end.
    let places = [0, (2u64 << 30) / 512 + 64, (4u64 << 30) / 512 + 8, sectors - 64];
    for &sector in &places {
        let (st, _) = bed.transfer(0, Some(&data), sector, 64, Shape::Direct);
        assert!(st.iter().all(|&s| s == RSP_OKAY), "write at {sector}");
    }
    assert_eq!(bed.roundtrip(0, &[encode::discard::<X86_64>(1, 0, sectors, false)]), vec![RSP_OKAY]);
    for &sector in &places {
        let (st, back) = bed.transfer(0, None, sector, 64, Shape::Direct);
        assert!(st.iter().all(|&s| s == RSP_OKAY));
        assert!(back.iter().all(|&b| b == 0), "sector {sector} reads back as zeroes after the discard");
    }
    // One sector beyond the disk is still refused.
    assert_ne!(bed.roundtrip(0, &[encode::discard::<X86_64>(2, 8, sectors, false)]), vec![RSP_OKAY]);
    bed.stop();
}

#[test]
fn one_map_batch_per_request_and_persistent_hits_map_nothing() {
    let mut bed = Bed::<X86_64>::new(BedConfig { max_indirect: 256, ..Default::default() });
    let pages = bed.fronts[0].grant_pages(100, false).expect("pages");
    let before = bed.host.map_calls();
    let r = encode::rw::<X86_64>(OP_READ, 1, 0, &page_segs(&pages.grefs[..11]));
    assert_eq!(bed.roundtrip(0, &[r]), vec![RSP_OKAY]);
    assert_eq!(bed.host.map_calls() - before, 1, "11 data pages, one map call");
    let desc = bed.fronts[0].grant_pages(1, true).expect("descriptor");
    for (i, s) in page_segs(&pages.grefs).iter().enumerate() {
        let at = vm_memory::GuestAddress(GuestDomain::page_addr(desc.first).0 + i as u64 * 8);
        bed.guest.memory().write_slice(&s.encode(), at).expect("descriptor");
    }
    let before = bed.host.map_calls();
    let r = encode::indirect::<X86_64>(OP_WRITE, 2, 0, 100, &desc.grefs);
    assert_eq!(bed.fronts[0].submit(&[r]).expect("submit"), 1);
    let rsp = bed.responses(0, 1);
    assert_eq!((rsp[0].id, rsp[0].operation, rsp[0].status), (2, OP_WRITE, RSP_OKAY), "indirect_op echoed");
    assert_eq!(bed.host.map_calls() - before, 2, "descriptor pages in one batch, 100 data pages in another");
    bed.stop();
    bed.fronts[0].release_pages(pages).expect("released");
    bed.fronts[0].release_pages(desc).expect("released");

    let mut bed = Bed::<X86_64>::new(BedConfig { persistent: true, ..Default::default() });
    let grefs = bed.pool.as_ref().expect("pool").grefs[..11].to_vec();
    let before = bed.host.map_calls();
    let r = encode::rw::<X86_64>(OP_READ, 1, 0, &page_segs(&grefs));
    assert_eq!(bed.roundtrip(0, &[r]), vec![RSP_OKAY]);
    assert_eq!(bed.host.map_calls() - before, 1);
    for id in 2..10 {
        let r = encode::rw::<X86_64>(OP_WRITE, id, 0, &page_segs(&grefs));
        assert_eq!(bed.roundtrip(0, &[r]), vec![RSP_OKAY]);
    }
    assert_eq!(bed.host.map_calls() - before, 1, "persistent grants are mapped once");
    assert_eq!(bed.host.live_mappings(), 2, "the ring and one persistent batch");
    bed.stop();
}

#[test]
fn one_notification_per_batch_as_the_event_index_asks() {
    let mut bed = Bed::<X86_64>::new(BedConfig { order: 1, ..Default::default() });
    let pages = bed.fronts[0].grant_pages(1, false).expect("page");
    let port = bed.fronts[0].port();
    let events = |bed: &Bed<X86_64>| bed.host.evtchn_switch().received(DOMID, port);
    let batch = |bed: &mut Bed<X86_64>, first: u64| {
        let reqs: Vec<RawRequest> =
            (first..first + 16).map(|id| encode::rw::<X86_64>(OP_READ, id, id * 8, &page_segs(&pages.grefs))).collect();
        assert_eq!(bed.fronts[0].submit(&reqs).expect("submit"), 16);
        let deadline = std::time::Instant::now() + TIMEOUT;
        while bed.fronts[0].ring().rsp_prod() != u32::try_from(first + 15).expect("small") {
            assert!(std::time::Instant::now() < deadline, "responses");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    };
    // rsp_event starts at 1 and the frontend never re-arms it: exactly one event for all 32 responses.
    batch(&mut bed, 1);
    batch(&mut bed, 17);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(events(&bed), 1);
    let got = bed.responses(0, 32);
    assert!(got.iter().all(|r| r.status == RSP_OKAY));
    // `responses` re-armed rsp_event: the next batch gets its event.
    batch(&mut bed, 33);
    let deadline = std::time::Instant::now() + TIMEOUT;
    while events(&bed) != 2 {
        assert!(std::time::Instant::now() < deadline, "event after re-arming");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let stats = bed.dp().stats(0).expect("stats");
    assert_eq!(QueueStats::get(&stats.notifications), 2);
    assert_eq!(QueueStats::get(&stats.requests), 48);
    bed.stop();
}

#[test]
fn backpressure_from_the_engine_and_the_bounce_pool() {
    let mut config = BedConfig { order: 2, ..Default::default() }.mode(GrantMode::Copy);
    config.options.max_in_flight = 2;
    config.options.bounce_pages = 11;
    let mut bed = Bed::<X86_64>::new(config);
    let data = pattern(120 * 4096, 5);
    let (st, _) = bed.transfer(0, Some(&data), 0, 960, Shape::Direct);
    assert_eq!(st.len(), 11, "120 pages in requests of 11");
    assert!(st.iter().all(|&s| s == RSP_OKAY));
    let (st, back) = bed.transfer(0, None, 0, 960, Shape::Direct);
    assert!(st.iter().all(|&s| s == RSP_OKAY));
    assert!(back == data);
    bed.stop();
}
