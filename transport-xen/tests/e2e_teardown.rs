// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Teardown with the real data plane while requests are in flight: the frontend closes, the toolstack detaches,
//! the toolstack removes the directory, the backend process shuts down, a hostile ring is halted. Every time the
//! grants end up unmapped (the frontend can revoke all of them) and another vbd served by the same process keeps
//! working.

mod xenbus_support;

use std::time::{Duration, Instant};

use transport_xen::dataplane::DataplaneOptions;
use transport_xen::emulated::GuestDomain;
use transport_xen::frontend::load::{check_pattern, fill_pattern};
use transport_xen::frontend::{Blkfront, BlkfrontConfig, DiskSpec, IoRequest, XVDA};
use transport_xen::xenbus::{BackendConfig, VbdId, XenbusState};
use xenbus_support::{Bed, T};

fn bed() -> Bed {
    Bed::real(BackendConfig::default(), DataplaneOptions::default())
}

fn connect<'g>(bed: &Bed, guest: &'g GuestDomain, persistent: bool) -> (VbdId, Blkfront<'g>) {
    let id = bed.add_image_disk_of(guest.domid(), false, 8);
    let config = BlkfrontConfig { ring_page_order: 1, persistent, ..BlkfrontConfig::default() };
    (id, Blkfront::connect(guest, XVDA, config).expect("connect"))
}

/// Queue `n` 8 KiB writes on queue 0 and publish them without waiting.
fn flood(front: &mut Blkfront<'_>, n: usize) {
    let mut data = vec![0u8; 8192];
    for i in 0..n {
        let sector = (i as u64) * 16;
        fill_pattern(&mut data, sector, 9);
        assert!(front.submit(0, &IoRequest::Write { sector, data: &data }, i as u64).expect("submit"), "ring full");
    }
    front.kick(0).expect("kick");
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The bystander vbd still reads and writes correctly.
fn bystander_works(front: &mut Blkfront<'_>, generation: u32) {
    let mut data = vec![0u8; 4096];
    fill_pattern(&mut data, 8, generation);
    front.write(8, &data).expect("bystander write");
    assert_eq!(check_pattern(&front.read(8, 4096).expect("bystander read"), 8, generation), None);
}

#[test]
fn frontend_closes_with_requests_in_flight() {
    let bed = bed();
    let (g1, g2) = (bed.big_guest(1, 512), bed.big_guest(2, 512));
    let (_, mut other) = connect(&bed, &g2, false);
    for persistent in [false, true] {
        let (id, mut front) = connect(&bed, &g1, persistent);
        flood(&mut front, 48);
        front.close().expect("close: every grant revocable");
        bed.wait_state(id, XenbusState::Closed);
        bystander_works(&mut other, u32::from(persistent));
        bed.toolstack.remove(id).expect("remove");
    }
    other.close().expect("close");
    assert_eq!(bed.host.live_mappings(), 0);
}

#[test]
fn toolstack_detach_with_requests_in_flight() {
    let bed = bed();
    let (g1, g2) = (bed.big_guest(1, 512), bed.big_guest(2, 512));
    let (_, mut other) = connect(&bed, &g2, true);
    let (id, mut front) = connect(&bed, &g1, true);
    flood(&mut front, 48);
    bed.toolstack.detach(id).expect("detach");
    front.finish_after_backend_close().expect("frontend closes, every grant revocable");
    bed.wait_state(id, XenbusState::Closed);
    bystander_works(&mut other, 3);
    bed.toolstack.remove(id).expect("remove");
    other.close().expect("close");
    assert_eq!(bed.host.live_mappings(), 0);
}

#[test]
fn forced_removal_with_requests_in_flight_unmaps_everything() {
    let bed = bed();
    let (g1, g2) = (bed.big_guest(1, 512), bed.big_guest(2, 512));
    let (_, mut other) = connect(&bed, &g2, false);
    // The idle, non-persistent bystander's mappings: its ring pages.
    let baseline = bed.host.live_mappings();
    let (id, mut front) = connect(&bed, &g1, true);
    flood(&mut front, 48);
    bed.toolstack.remove(id).expect("forced removal");
    let others = bed.host.grants().grant_count(2);
    wait_until("the removed vbd's mappings to go", || bed.host.live_mappings() == baseline);
    front.teardown().expect("every grant revocable");
    bystander_works(&mut other, 4);
    assert_eq!(bed.host.grants().grant_count(2), others);
    other.close().expect("close");
}

#[test]
fn backend_shutdown_with_requests_in_flight_answers_and_unmaps() {
    let mut bed = bed();
    let g1 = bed.big_guest(1, 512);
    let (id, mut front) = connect(&bed, &g1, false);
    flood(&mut front, 48);
    bed.stop_backend();
    assert_eq!(bed.backend_node(id, "state").as_deref(), Some(&b"6"[..]));
    assert_eq!(bed.host.live_mappings(), 0);
    front.teardown().expect("every grant revocable");
}

#[test]
fn a_hostile_ring_is_halted_and_the_other_vbd_keeps_working() {
    let bed = bed();
    let (g1, g2) = (bed.big_guest(1, 512), bed.big_guest(2, 512));
    let (_, mut other) = connect(&bed, &g2, false);
    let (id, mut front) = connect(&bed, &g1, false);
    let size = u32::try_from(front.ring_size()).expect("small");
    front.set_req_prod_raw(0, size * 3 + 5).expect("hostile req_prod");
    let error = bed.wait_fatal(id);
    assert!(error.starts_with("5 ring halted:"), "{error}");
    bystander_works(&mut other, 5);
    front.close().expect("the hostile frontend closes; nothing stays mapped");
    bed.wait_state(id, XenbusState::Closed);
    bystander_works(&mut other, 6);
    other.close().expect("close");
    assert_eq!(bed.host.live_mappings(), 0);
}

/// The toolstack removes a closed vbd and creates it again (another image) before the backend saw the removal
/// (`add_disk` does both in one transaction, the tightest such race): the backend must treat it as a new vbd,
/// with its feature nodes published again and the new image opened, not as the old one's frontend starting over.
#[test]
fn a_vbd_recreated_before_the_backend_saw_its_removal_is_probed_anew() {
    let bed = bed();
    let guest = bed.big_guest(1, 512);
    let (id, mut front) = connect(&bed, &guest, false);
    bystander_works(&mut front, 1);
    front.close().expect("close");
    bed.wait_state(id, XenbusState::Closed);

    let img = bed.image("recreated.img", 16);
    let spec = DiskSpec::new(1, img.to_str().expect("utf-8 path"));
    assert_eq!(bed.toolstack.add_disk(&spec).expect("re-create"), id);
    let config = BlkfrontConfig { ring_page_order: 1, ..BlkfrontConfig::default() };
    let mut front = Blkfront::connect(&guest, XVDA, config).expect("connect to the re-created vbd");
    assert_eq!(front.ring_size(), 64, "max-ring-page-order published again");
    assert_eq!(front.info().sectors, 16 << 11, "the new image is served");
    bystander_works(&mut front, 2);
    front.close().expect("close");
    bed.wait_state(id, XenbusState::Closed);
    bed.toolstack.remove(id).expect("remove");
    wait_until("every mapping to go", || bed.host.live_mappings() == 0);
}
