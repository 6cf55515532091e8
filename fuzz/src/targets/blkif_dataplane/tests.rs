// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The harness's own behaviour: which inputs go unchecked, and the lanes.

use transport_xen::blkif::{encode, BlkifSegment, OP_READ, OP_WRITE, X86_64};

use super::*;

/// The lane `one_raw`'s inputs run on: x86_64, page order 0, no features, 9 in flight.
const ONE_RAW: LaneKey = LaneKey { flags: 0, in_flight: 9 };

/// With the fixture: the first ring page and the inputs served of the live lane of `key`, and the inputs found
/// harming their own ring so far.
fn lane_state(key: LaneKey) -> (Option<(GrantRef, usize)>, u64) {
    FIXTURE.with(|cell| {
        let cell = cell.borrow();
        let f = cell.as_ref().expect("fixture");
        let lane = f.lanes.iter().find(|l| l.key == key).map(|l| (f.slots[l.slot].grefs[0], l.served()));
        (lane, f.self_harming)
    })
}

/// An input of raw requests on the x86_64 ring of page order 0.
fn raw_input(raws: &[RawRequest]) -> Vec<u8> {
    let mut w = Writer::new();
    w.u8(0).u8(0).u8(8).u8(raws.len() as u8).u8(0);
    for raw in raws {
        w.u8(1).bytes(&raw.bytes);
    }
    w.finish()
}

fn one_raw(raw: &RawRequest) -> Vec<u8> {
    raw_input(std::slice::from_ref(raw))
}

/// `one_raw`'s input with other flags (another lane).
fn one_raw_flags(flags: u8, raw: &RawRequest) -> Vec<u8> {
    let mut input = one_raw(raw);
    input[0] = flags;
    input
}

fn page(gref: GrantRef) -> [BlkifSegment; 1] {
    [BlkifSegment { gref, first_sect: 0, last_sect: 7 }]
}

/// Start `ONE_RAW`'s lane (a harmless read: gref 9 is a read-write data page) and give its first ring page.
fn one_raw_lane_ring() -> GrantRef {
    run(&one_raw(&encode::rw::<X86_64>(OP_READ, 0, 0, &page(9))));
    let (Some((ring, _)), _) = lane_state(ONE_RAW) else { panic!("no lane") };
    ring
}

/// Only an input that really reads into its own ring goes unchecked: a request whose bytes merely hold the
/// ring's grant ref (here its sector, and a write from the ring page, which leaves the ring as it was) is
/// checked like any other. (With a scan of the request bytes for the ring's refs, about a third of the
/// committed corpus went unchecked.)
#[test]
fn only_reads_into_the_own_ring_go_unchecked() {
    run(&seeds()[0]);
    // (Gref 9 is a read-write data page: the lane starts and stays.)
    run(&one_raw(&encode::rw::<X86_64>(OP_READ, 0, 0, &page(9))));
    let (lane, before) = lane_state(ONE_RAW);
    // (`BLKIF_DATAPLANE_FRESH`: every input's lane is on the first slot.)
    let ring = lane.map_or_else(|| FIXTURE.with(|c| c.borrow().as_ref().expect("fixture").slots[0].grefs[0]), |l| l.0);
    // (A sector beyond the disk: answered with an error, as the model expects.)
    run(&one_raw(&encode::rw::<X86_64>(OP_READ, 0, u64::from(ring), &page(9))));
    run(&one_raw(&encode::rw::<X86_64>(OP_WRITE, 0, 0, &page(ring))));
    assert_eq!(lane_state(ONE_RAW).1, before, "a request that leaves its ring alone went unchecked");
    run(&one_raw(&encode::rw::<X86_64>(OP_READ, 0, 0, &page(ring))));
    let (lane, after) = lane_state(ONE_RAW);
    assert_eq!(after, before + 1, "a read into the ring in use was not known as self-harm");
    assert!(lane.is_none(), "the lane whose ring was harmed still serves");
}

/// A lane serves the later inputs of its connection, past the point where its ring's indexes wrap (which
/// an input on a new ring never reaches), and ends after `LANE_LIFE` inputs.
#[test]
fn a_lane_serves_later_inputs_past_the_wrap_of_its_ring() {
    if lanes::Lanes::new().fresh {
        return;
    }
    let reads: Vec<RawRequest> = (0..20).map(|i| encode::rw::<X86_64>(OP_READ, 0, i, &page(9))).collect();
    let input = raw_input(&reads);
    run(&input);
    let (Some((ring, 1)), _) = lane_state(ONE_RAW) else { panic!("no new lane") };
    // 20 requests an input on a 32-entry ring: the third input wraps.
    for served in 2..=lanes::LANE_LIFE {
        run(&input);
        assert_eq!(lane_state(ONE_RAW).0, Some((ring, served)), "input {served} did not reuse the lane");
    }
    run(&input);
    assert_eq!(lane_state(ONE_RAW).0.map(|l| l.1), Some(1), "the lane outlived its life");
}

/// An input that reads into another lane's ring pages ends that lane (its ring may have been overwritten);
/// the other lanes stay.
#[test]
fn a_read_into_another_lanes_ring_ends_that_lane() {
    if lanes::Lanes::new().fresh {
        return;
    }
    let ring = one_raw_lane_ring();
    // The same read on the x86_64 ring of page order 1 (another lane), into the first lane's ring.
    let other = one_raw_flags(0x02, &encode::rw::<X86_64>(OP_READ, 0, 0, &page(ring)));
    let other_key = LaneKey { flags: 0x02, in_flight: 9 };
    run(&other);
    assert!(lane_state(ONE_RAW).0.is_none(), "the lane whose ring another input read into still serves");
    assert!(lane_state(other_key).0.is_some(), "the reading input's own lane ended");
}

/// A lane with persistent grants may keep a page of another lane's ring mapped (a request wrote from it): the
/// other lane lives on, and its ring page counts as mapped more than once while the persistent lane lives.
/// (Found by `run-long`: the accounting asserted exactly one mapping per ring page.)
#[test]
fn a_persistent_lane_may_hold_another_lanes_ring_page() {
    if lanes::Lanes::new().fresh {
        return;
    }
    let ring = one_raw_lane_ring();
    // A write from that ring page, on the x86_64 ring of page order 0 with persistent grants (another lane).
    run(&one_raw_flags(0x08, &encode::rw::<X86_64>(OP_WRITE, 0, 0, &page(ring))));
    let maps = FIXTURE.with(|c| c.borrow().as_ref().expect("fixture").host.grants().map_count(DOMID, ring));
    assert_eq!(maps, 2, "the persistent lane did not keep the page mapped (the test needs it to)");
    // A new lane (every ring page checked) while both live.
    run(&one_raw_flags(0x02, &encode::rw::<X86_64>(OP_READ, 0, 0, &page(9))));
    assert!(lane_state(ONE_RAW).0.is_some(), "the lane whose ring page was written from ended");
}
