// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The blkfront emulator's handshake against the real backend state machine (data plane recorded, not run):
//! the rings it sets up in guest memory are what the backend hands to the data plane, its negotiation follows the
//! backend's limits, and its close leaves no grant behind.

mod xenbus_support;

use transport_xen::connect::BlkifAbi;
use transport_xen::frontend::{Blkfront, BlkfrontConfig, XVDA};
use transport_xen::xenbus::{BackendConfig, XenbusState};
use xenbus_support::Bed;

#[test]
fn blkfront_publishes_its_granted_rings_and_closes_cleanly() {
    let bed = Bed::new();
    let guest = bed.guest(7);
    let id = bed.add_image_disk(7, false);
    let config = BlkfrontConfig { ring_page_order: 2, queues: 2, persistent: true, ..BlkfrontConfig::default() };
    let front = Blkfront::connect(&guest, XVDA, config).expect("connect");
    assert_eq!(front.queue_count(), 2);
    assert_eq!(front.info().sectors, 4 << 11);
    assert!(front.info().flush && front.info().barrier && front.info().persistent);
    assert_eq!(front.info().max_indirect_segments, 256);
    bed.wait_state(id, XenbusState::Connected);
    let c = bed.rings.started(7).pop().expect("started");
    assert_eq!((c.abi, c.persistent_grants, c.queues.len()), (BlkifAbi::X86_64, true, 2));
    for q in &c.queues {
        assert_eq!(q.ring_refs.len(), 4);
        for &gref in &q.ring_refs {
            assert_eq!(bed.host.grants().map_count(7, gref), 0, "the recording server maps nothing");
        }
    }
    assert_eq!(bed.backend_node(id, "state").as_deref(), Some(&b"4"[..]));
    front.close().expect("close: every grant revoked");
    bed.wait_state(id, XenbusState::Closed);
    assert_eq!(bed.rings.live(), 0);
    assert_eq!(bed.host.grants().grant_count(7), 0);
}

#[test]
fn blkfront_follows_the_backends_limits_and_the_x86_32_default() {
    let config = {
        let mut o = BackendConfig::default();
        o.max_queues = 1;
        o.max_ring_page_order = 1;
        o.max_indirect_segments = 0;
        o
    };
    let bed = Bed::with_config(config);
    let guest = bed.guest(8);
    bed.add_image_disk(8, true);
    let wanted = BlkfrontConfig {
        abi: BlkifAbi::X86_32,
        write_protocol: false,
        ring_page_order: 4,
        queues: 4,
        ..BlkfrontConfig::default()
    };
    let front = Blkfront::connect(&guest, XVDA, wanted).expect("connect");
    assert_eq!(front.queue_count(), 1);
    assert_eq!(front.info().info & 4, 4, "VDISK_READONLY");
    assert_eq!(front.info().max_indirect_segments, 0);
    assert_eq!(front.max_request_bytes(), 11 * 4096, "no indirect segments offered");
    let c = bed.rings.started(8).pop().expect("started");
    assert_eq!((c.abi, c.queues[0].ring_refs.len(), c.max_indirect_segments), (BlkifAbi::X86_32, 2, 0));
    front.close().expect("close");
}
