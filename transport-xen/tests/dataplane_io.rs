// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Data-plane I/O on the emulated host with real grants, real io_uring and a real file: every combination of ABI,
//! ring order, queue count, persistent grants, direct/indirect requests and grant mode moves data both ways and
//! leaves nothing mapped.

mod dataplane_util;

use dataplane_util::{pattern, Bed, BedConfig, Shape};
use transport_xen::blkif::{BlkifLayout, RSP_OKAY, X86_32, X86_64};
use transport_xen::dataplane::QueueStats;
use transport_xen::grant_memory::GrantMode;

fn run_matrix<L: BlkifLayout>(mode: GrantMode) {
    for order in [0u32, 4] {
        for queues in [1usize, 4] {
            for persistent in [false, true] {
                for shape in [Shape::Direct, Shape::Indirect] {
                    let what = format!(
                        "{:?} {mode:?} order {order} queues {queues} persistent {persistent} {shape:?}",
                        L::ABI
                    );
                    let max_indirect = if shape == Shape::Indirect { 256 } else { 0 };
                    let config = BedConfig { order, queues, persistent, max_indirect, ..Default::default() }.mode(mode);
                    let mut bed = Bed::<L>::new(config);
                    // 300 sectors = 38 pages (the last one partial): several direct requests, or one indirect one.
                    let sectors = 300;
                    for q in 0..queues {
                        let sector = 1000 * (q as u64 + 1) + 3;
                        let data = pattern(sectors * 512, q as u64 + u64::from(order) * 7);
                        let (st, _) = bed.transfer(q, Some(&data), sector, sectors, shape);
                        assert!(st.iter().all(|&s| s == RSP_OKAY), "{what}: write statuses {st:?}");
                        assert_eq!(bed.file_bytes(sector * 512, data.len()), data, "{what}: disk contents");
                        let (st, back) = bed.transfer(q, None, sector, sectors, shape);
                        assert!(st.iter().all(|&s| s == RSP_OKAY), "{what}: read statuses {st:?}");
                        assert!(back == data, "{what}: read back differs");
                        let stats = bed.dp().stats(q).expect("stats");
                        assert_eq!(QueueStats::get(&stats.read_bytes), (sectors * 512) as u64, "{what}");
                        assert_eq!(QueueStats::get(&stats.write_bytes), (sectors * 512) as u64, "{what}");
                        assert_eq!(QueueStats::get(&stats.errors), 0, "{what}");
                    }
                    bed.stop();
                }
            }
        }
    }
}

#[test]
fn matrix_x86_64_map() {
    run_matrix::<X86_64>(GrantMode::Map);
}

#[test]
fn matrix_x86_32_map() {
    run_matrix::<X86_32>(GrantMode::Map);
}

#[test]
fn matrix_x86_64_copy() {
    run_matrix::<X86_64>(GrantMode::Copy);
}

#[test]
fn matrix_x86_32_copy() {
    run_matrix::<X86_32>(GrantMode::Copy);
}
