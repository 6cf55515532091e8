// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A ring on an I/O thread pool is watched by the thread's epoll: it makes an epoll of its own only when it polls
//! (a polling period looks at its sources without waiting), as a ring on a thread of its own does for its loop.
//! Starting and stopping a data plane on the pool thus costs an epoll, its three registrations and their
//! removals less.
//!
//! Counts the process's epoll descriptors (`/proc/self/fd`); this binary holds a single test, so nothing else
//! opens any meanwhile.

mod dataplane_util;

use dataplane_util::{pattern, Bed, BedConfig, Shape};
use transport_xen::blkif::{RSP_OKAY, X86_64};
use transport_xen::dataplane::{DataplaneOptions, IoThreads};

/// Open epoll descriptors of the process.
fn epolls() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("fd dir")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy() == "anon_inode:[eventpoll]")
        .count()
}

/// Epolls while a data plane with `options` serves a request, minus before it started.
fn extra_epolls(options: DataplaneOptions) -> isize {
    let mut bed = Bed::<X86_64>::new(BedConfig { options, ..BedConfig::default() });
    bed.stop();
    let before = epolls();
    bed.dp = Some(bed.restart().expect("data plane"));
    // Served: the worker was built.
    let (statuses, _) = bed.transfer(0, Some(&pattern(4096, 1)), 0, 8, Shape::Direct);
    assert_eq!(statuses, [RSP_OKAY]);
    let running = epolls();
    bed.stop();
    assert_eq!(epolls(), before, "an epoll outlived its data plane");
    running as isize - before as isize
}

#[test]
fn a_ring_on_a_pool_thread_has_an_epoll_of_its_own_only_to_poll() {
    let pool = IoThreads::new(1);
    let mut options = DataplaneOptions::default();
    options.io_threads = Some(pool.clone());
    assert_eq!(extra_epolls(options.clone()), 0, "a ring on a pool thread that does not poll");
    options.poll_us = 50;
    assert_eq!(extra_epolls(options), 1, "a ring on a pool thread that polls");
    assert_eq!(extra_epolls(DataplaneOptions::default()), 1, "a ring on a thread of its own");
}
