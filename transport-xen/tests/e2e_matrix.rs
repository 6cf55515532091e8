// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End to end on the emulated host with the real data plane: the emulated blkfront connects with each ABI, ring
//! order 0 and 4, 1 and 4 queues, persistent grants on and off, direct and indirect requests; writes and reads back
//! data through the shared rings; closes; and no grant mapping is left.

mod xenbus_support;

use transport_xen::connect::BlkifAbi;
use transport_xen::dataplane::DataplaneOptions;
use transport_xen::frontend::load::{check_pattern, fill_pattern};
use transport_xen::frontend::{Blkfront, BlkfrontConfig, Indirect, IoRequest, XVDA};
use transport_xen::grant_memory::GrantMode;
use transport_xen::xenbus::{BackendConfig, XenbusState};
use xenbus_support::Bed;

#[derive(Clone, Copy, Debug)]
struct Combo {
    abi: BlkifAbi,
    order: u32,
    queues: u32,
    persistent: bool,
    indirect: Indirect,
}

fn combos(abi: BlkifAbi) -> Vec<Combo> {
    let mut v = Vec::new();
    for order in [0, 4] {
        for queues in [1, 4] {
            for persistent in [false, true] {
                for indirect in [Indirect::Off, Indirect::Always] {
                    v.push(Combo { abi, order, queues, persistent, indirect });
                }
            }
        }
    }
    v
}

/// Write a few requests of different sizes on every queue, read them back, verify.
fn exercise(front: &mut Blkfront<'_>, combo: Combo, generation: u32) {
    let max = front.max_request_bytes();
    let sizes = [512usize, 4096, 8192 + 1024, 11 * 4096, 64 << 10];
    let mut sector = 0u64;
    for q in 0..front.queue_count() {
        for &len in sizes.iter().filter(|&&l| l <= max) {
            let mut data = vec![0u8; len];
            fill_pattern(&mut data, sector, generation);
            let w = front.request(q, &IoRequest::Write { sector, data: &data }).expect("write");
            assert_eq!(w.status, 0, "{combo:?}: write of {len} bytes on queue {q}");
            let r = front.request(q, &IoRequest::Read { sector, len }).expect("read");
            assert_eq!(r.status, 0, "{combo:?}: read of {len} bytes on queue {q}");
            assert_eq!(check_pattern(&r.data, sector, generation), None, "{combo:?}: {len} bytes on queue {q}");
            sector += (len as u64).div_ceil(4096) * 8;
        }
    }
    if combo.indirect == Indirect::Off {
        assert_eq!(max, 11 * 4096, "{combo:?}");
    } else {
        assert!(max >= 256 * 4096, "{combo:?}: {max}");
    }
}

fn run_matrix(abi: BlkifAbi, mode: GrantMode) {
    let bed = Bed::real(BackendConfig::default(), {
        let mut o = DataplaneOptions::default();
        o.grant_mode = mode;
        o
    });
    for (i, combo) in combos(abi).into_iter().enumerate() {
        let domid = 10 + u16::try_from(i).expect("few");
        let guest = bed.big_guest(domid, 1024);
        let id = bed.add_image_disk_of(domid, false, 8);
        let config = BlkfrontConfig {
            abi: combo.abi,
            write_protocol: combo.abi == BlkifAbi::X86_64 || i % 2 == 0,
            ring_page_order: combo.order,
            queues: combo.queues,
            persistent: combo.persistent,
            indirect: combo.indirect,
            ..BlkfrontConfig::default()
        };
        let mut front = Blkfront::connect(&guest, XVDA, config).unwrap_or_else(|e| panic!("{combo:?}: {e}"));
        assert_eq!(front.queue_count(), combo.queues as usize);
        assert_eq!(front.ring_size(), if combo.order == 0 { 32 } else { 512 });
        exercise(&mut front, combo, u32::try_from(i).expect("few"));
        front.close().unwrap_or_else(|e| panic!("{combo:?}: close: {e}"));
        bed.wait_state(id, XenbusState::Closed);
        assert_eq!(bed.host.live_mappings(), 0, "{combo:?}: mappings left after close");
        drop(guest);
    }
}

#[test]
fn x86_64_every_layout_with_grant_maps() {
    run_matrix(BlkifAbi::X86_64, GrantMode::Map);
}

#[test]
fn x86_32_every_layout_with_grant_maps() {
    run_matrix(BlkifAbi::X86_32, GrantMode::Map);
}

#[test]
fn x86_64_every_layout_with_grant_copy() {
    run_matrix(BlkifAbi::X86_64, GrantMode::Copy);
}
