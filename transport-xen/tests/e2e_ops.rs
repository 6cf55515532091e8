// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End to end with the real data plane: flush, barrier, discard (and secure discard, not offered), read-only
//! disks, requests beyond the end, and the whole-disk workload of the demo.

mod xenbus_support;

use std::time::Duration;

use transport_xen::blkif::{RSP_EOPNOTSUPP, RSP_ERROR, RSP_OKAY};
use transport_xen::dataplane::DataplaneOptions;
use transport_xen::frontend::load::{check_pattern, fill_and_verify, fill_pattern, random_load, verify_blocks};
use transport_xen::frontend::{Blkfront, BlkfrontConfig, DiskSpec, IoRequest, XVDA};
use transport_xen::services::TxId;
use transport_xen::xenbus::{BackendConfig, VDISK_READONLY};
use xenbus_support::Bed;

fn bed() -> Bed {
    Bed::real(BackendConfig::default(), DataplaneOptions::default())
}

#[test]
fn flush_barrier_and_discard() {
    let bed = bed();
    let guest = bed.big_guest(1, 512);
    bed.add_image_disk(1, false);
    let mut front = Blkfront::connect(&guest, XVDA, BlkfrontConfig::default()).expect("connect");
    let info = *front.info();
    assert!(info.flush && info.barrier && info.discard && !info.discard_secure);
    assert_eq!(info.discard_alignment, 0);
    assert!(info.discard_granularity >= 512);

    let mut data = vec![0u8; 16 << 10];
    fill_pattern(&mut data, 64, 1);
    front.write(64, &data).expect("write");
    assert_eq!(front.flush().expect("flush"), RSP_OKAY);

    let mut barrier = vec![0u8; 4096];
    fill_pattern(&mut barrier, 200, 2);
    let c = front.request(0, &IoRequest::Barrier { sector: 200, data: &barrier }).expect("barrier");
    assert_eq!(c.status, RSP_OKAY);
    assert_eq!(check_pattern(&front.read(200, 4096).expect("read"), 200, 2), None);

    let c = front.request(0, &IoRequest::Discard { sector: 64, sectors: 16, secure: false }).expect("discard");
    assert_eq!(c.status, RSP_OKAY);
    assert!(front.read(64, 8192).expect("read").iter().all(|&b| b == 0), "discarded range reads back as zeroes");
    assert_eq!(check_pattern(&front.read(80, 8192).expect("read"), 80, 1), None, "the rest is untouched");

    let c = front.request(0, &IoRequest::Discard { sector: 96, sectors: 8, secure: true }).expect("secure discard");
    assert_eq!(c.status, RSP_EOPNOTSUPP, "secure discard was not offered");
    front.close().expect("close");
    assert_eq!(bed.host.live_mappings(), 0);
}

#[test]
fn discard_enable_0_is_enforced_on_the_request_path() {
    let bed = bed();
    let guest = bed.big_guest(3, 256);
    let id = bed.add_image_disk(3, false);
    // xl's `no-discard`: the toolstack writes discard-enable = 0 before the frontend connects.
    let node = bed.toolstack.paths(id).node("discard-enable");
    bed.store().write(TxId::NONE, &node, b"0").expect("write discard-enable");
    let mut front = Blkfront::connect(&guest, XVDA, BlkfrontConfig::default()).expect("connect");
    assert!(!front.info().discard, "discard is not advertised");
    let mut data = vec![0u8; 8 << 10];
    fill_pattern(&mut data, 64, 3);
    front.write(64, &data).expect("write");
    // A frontend that discards anyway is answered "not supported", and the blocks keep their data.
    let c = front.request(0, &IoRequest::Discard { sector: 64, sectors: 16, secure: false }).expect("discard");
    assert_eq!(c.status, RSP_EOPNOTSUPP, "a discard against discard-enable = 0");
    assert_eq!(check_pattern(&front.read(64, 8 << 10).expect("read"), 64, 3), None, "the data is still there");
    front.close().expect("close");
    assert_eq!(bed.host.live_mappings(), 0);
}

#[test]
fn a_disk_that_grows_is_announced_and_served_at_its_new_size() {
    let bed = bed();
    let guest = bed.big_guest(4, 256);
    let image = bed.image("grow.img", 4);
    let id = bed.toolstack.add_disk(&DiskSpec::new(4, image.to_str().expect("utf-8"))).expect("attach");
    let mut front = Blkfront::connect(&guest, XVDA, BlkfrontConfig::default()).expect("connect");
    let old = front.info().sectors;
    assert_eq!(old, 8192, "4 MiB");
    let mut data = vec![0u8; 8 << 10];
    fill_pattern(&mut data, old, 9);
    let beyond = front.request(0, &IoRequest::Write { sector: old, data: &data }).expect("write");
    assert_eq!(beyond.status, RSP_ERROR, "past the end before the resize");

    // The image grows under the running guest (as `truncate -s`, `losetup -c` or `lvextend` would).
    std::fs::OpenOptions::new().write(true).open(&image).and_then(|f| f.set_len(6 << 20)).expect("grow");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while bed.backend_node(id, "sectors").as_deref() != Some(&b"12288"[..]) {
        assert!(std::time::Instant::now() < deadline, "the new size was never announced");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(bed.backend_node(id, "state").as_deref(), Some(&b"4"[..]), "still Connected (written again)");
    let c = front.request(0, &IoRequest::Write { sector: old, data: &data }).expect("write");
    assert_eq!(c.status, RSP_OKAY, "the new blocks are served");
    assert_eq!(check_pattern(&front.read(old, 8 << 10).expect("read"), old, 9), None);

    // A disk that shrinks under the guest is not followed: the size served stays.
    std::fs::OpenOptions::new().write(true).open(&image).and_then(|f| f.set_len(2 << 20)).expect("shrink");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(bed.backend_node(id, "sectors").as_deref(), Some(&b"12288"[..]), "a shrink is refused");
    front.close().expect("close");
    assert_eq!(bed.host.live_mappings(), 0);
}

#[test]
fn read_only_disk_serves_reads_and_refuses_writes() {
    let bed = bed();
    let guest = bed.big_guest(2, 256);
    bed.add_image_disk(2, true);
    let mut front = Blkfront::connect(&guest, XVDA, BlkfrontConfig::default()).expect("connect");
    assert_eq!(front.info().info & VDISK_READONLY, VDISK_READONLY);
    assert!(!front.info().discard);
    assert_eq!(front.read(0, 4096).expect("read"), vec![0u8; 4096]);
    let data = vec![0xa5u8; 4096];
    assert_eq!(front.request(0, &IoRequest::Write { sector: 0, data: &data }).expect("write").status, RSP_ERROR);
    let c = front.request(0, &IoRequest::Discard { sector: 0, sectors: 8, secure: false }).expect("discard");
    assert_ne!(c.status, RSP_OKAY);
    assert_eq!(front.read(0, 4096).expect("read"), vec![0u8; 4096], "nothing was written");
    front.close().expect("close");
}

#[test]
fn requests_beyond_the_end_fail_and_the_ring_keeps_serving() {
    let bed = bed();
    let guest = bed.big_guest(3, 256);
    bed.add_image_disk(3, false);
    let mut front = Blkfront::connect(&guest, XVDA, BlkfrontConfig::default()).expect("connect");
    let sectors = front.info().sectors;
    assert_eq!(front.request(0, &IoRequest::Read { sector: sectors - 4, len: 4096 }).expect("read").status, RSP_ERROR);
    assert_eq!(front.request(0, &IoRequest::Read { sector: u64::MAX - 1, len: 1024 }).expect("read").status, RSP_ERROR);
    assert_eq!(front.read(sectors - 8, 4096).expect("the last block"), vec![0u8; 4096]);
    front.close().expect("close");
}

#[test]
fn whole_disk_and_random_load_verify_at_several_depths() {
    let bed = bed();
    let guest = bed.big_guest(4, 2048);
    bed.add_image_disk_of(4, false, 8);
    let config = BlkfrontConfig { ring_page_order: 1, persistent: true, ..BlkfrontConfig::default() };
    let mut front = Blkfront::connect(&guest, XVDA, config).expect("connect");
    let sectors = front.info().sectors;
    assert_eq!(fill_and_verify(&mut front, sectors, 64 << 10, 8, 1).expect("fill"), 8 << 20);
    let mut gens = vec![1u32; usize::try_from(sectors / 8).expect("small")];
    for (i, depth) in [1usize, 16, 32].into_iter().enumerate() {
        let stats =
            random_load(&mut front, &mut gens, 4096, depth, Duration::from_millis(300), i as u64).expect("load");
        assert!(stats.ops > 0 && stats.reads + stats.writes == stats.ops, "{stats:?}");
        assert!(stats.p50 <= stats.p99);
    }
    verify_blocks(&mut front, &gens, 4096, 32).expect("verify");
    front.close().expect("close");
    assert_eq!(bed.host.live_mappings(), 0);
}
