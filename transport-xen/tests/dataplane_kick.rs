// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `Dataplane::kick`: a closing Linux blkfront may hold requests back in its stopped block queues and dispatch them
//! only after the backend's next event; its `del_gendisk` then waits for each. A kick notifies the frontend on
//! every ring whatever its event index says, serving goes on, and `activity` tells the control plane when the
//! rings went quiet.

mod dataplane_util;

use std::time::Duration;

use dataplane_util::{Bed, BedConfig};
use transport_xen::blkif::{encode, BlkifSegment, RawRequest, OP_WRITE, RSP_OKAY, X86_64};
use transport_xen::dataplane::{DataplaneOptions, IoThreads};

fn write(gref: u32, id: u64) -> RawRequest {
    encode::rw::<X86_64>(OP_WRITE, id, id * 8, &[BlkifSegment { gref, first_sect: 0, last_sect: 7 }])
}

fn kicked_frontend_is_notified_and_served(options: DataplaneOptions) {
    let mut bed = Bed::<X86_64>::new(BedConfig { queues: 2, options, ..BedConfig::default() });
    let pages = bed.fronts[0].grant_pages(1, false).expect("pages");
    assert_eq!(bed.roundtrip(0, &[write(pages.grefs[0], 1)]), vec![RSP_OKAY]);
    let before = bed.dp().activity();
    assert_eq!(before, 2, "one request taken, one response written");
    // No event left pending from that answer, and none comes by itself.
    for front in &mut bed.fronts {
        while front.wait_event(Duration::from_millis(20)) {}
    }
    bed.dp().kick();
    // Nothing to answer, and the frontend asked for no event: it gets one on each ring all the same.
    for (q, front) in bed.fronts.iter_mut().enumerate() {
        assert!(front.wait_event(Duration::from_secs(10)), "queue {q}: no event after the kick");
    }
    assert_eq!(bed.dp().activity(), before, "a kick is not activity");
    // The request the kick released is served as any other.
    assert_eq!(bed.roundtrip(0, &[write(pages.grefs[0], 2)]), vec![RSP_OKAY]);
    assert_eq!(bed.dp().activity(), before + 2);
    bed.stop();
    bed.fronts[0].release_pages(pages).expect("every grant can be revoked");
}

#[test]
fn a_kick_notifies_every_ring_and_serving_goes_on() {
    kicked_frontend_is_notified_and_served(DataplaneOptions::default());
}

#[test]
fn a_kick_notifies_every_ring_on_an_io_thread_pool() {
    let mut options = DataplaneOptions::default();
    options.io_threads = Some(IoThreads::new(1));
    kicked_frontend_is_notified_and_served(options);
}
