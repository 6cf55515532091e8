// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Once warm, the Xen data plane's per-request path (take the request off the ring, check it, bind its grants,
//! submit, reap, answer, notify) allocates nothing, in every grant mode, for direct and indirect requests and
//! both ABIs.
//!
//! A counting global allocator counts every allocation made outside "not ours" code: the test thread plays the
//! guest, and the emulated hypervisor's grant table and event channels stand where Xen and the kernel are (their
//! calls are wrapped so their own bookkeeping is not counted). What is left is our worker thread. This binary
//! holds a single test, so nothing else runs while it measures.

mod dataplane_util;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dataplane_util::{pattern, Bed, BedConfig, Shape};
use transport_xen::blkif::{BlkifLayout, RSP_OKAY, X86_32, X86_64};
use transport_xen::dataplane::DataplaneOptions;
use transport_xen::grant_memory::GrantMode;
use transport_xen::services::{
    DomId, EventChannel, EventChannelOpener, EvtchnPort, GrantCopyOp, GrantMapping, GrantRef, GrantTable, MapAccess,
    XenError,
};

/// Counts allocations and reallocations made while [`NOT_OURS`] is 0, then defers to the system allocator.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Above 0 while the current thread runs the guest's or the hypervisor's side.
    static NOT_OURS: Cell<u32> = const { Cell::new(0) };
}

fn count() {
    if NOT_OURS.try_with(|n| n.get() == 0).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds the `GlobalAlloc` contract; counting only
// touches an atomic and a const-initialised thread-local, neither of which allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Run `f` as the hypervisor or the guest: its allocations are not counted.
fn not_ours<T>(f: impl FnOnce() -> T) -> T {
    NOT_OURS.with(|n| n.set(n.get() + 1));
    let out = f();
    NOT_OURS.with(|n| n.set(n.get() - 1));
    out
}

/// The emulated grant table, its work not counted (on Xen it is the kernel's and the hypervisor's).
struct HypervisorGrants<G>(G);

/// A mapping whose unmap is not counted.
struct HypervisorMapping<M: GrantMapping>(Option<M>);

impl<M: GrantMapping> Drop for HypervisorMapping<M> {
    fn drop(&mut self) {
        let inner = self.0.take();
        not_ours(|| drop(inner));
    }
}

impl<M: GrantMapping> GrantMapping for HypervisorMapping<M> {
    fn as_ptr(&self) -> *mut u8 {
        self.0.as_ref().map_or(std::ptr::null_mut(), M::as_ptr)
    }
    fn pages(&self) -> usize {
        self.0.as_ref().map_or(0, M::pages)
    }
    fn access(&self) -> MapAccess {
        self.0.as_ref().map_or(MapAccess::ReadOnly, M::access)
    }
}

impl<G: GrantTable> GrantTable for HypervisorGrants<G> {
    type Mapping = HypervisorMapping<G::Mapping>;

    fn map(&self, domid: DomId, refs: &[GrantRef], access: MapAccess) -> Result<Self::Mapping, XenError> {
        not_ours(|| self.0.map(domid, refs, access)).map(|m| HypervisorMapping(Some(m)))
    }

    unsafe fn copy(&self, ops: &mut [GrantCopyOp]) -> Result<(), XenError> {
        // SAFETY: forwarded under our caller's guarantee for the local addresses.
        not_ours(|| unsafe { self.0.copy(ops) })
    }
}

/// Emulated event channels, their work not counted.
struct HypervisorEvents<O>(O);
struct HypervisorChannel<C>(C);

impl<O: EventChannelOpener> EventChannelOpener for HypervisorEvents<O> {
    type Channel = HypervisorChannel<O::Channel>;

    fn open(&self) -> Result<Self::Channel, XenError> {
        self.0.open().map(HypervisorChannel)
    }
}

impl<C: EventChannel> EventChannel for HypervisorChannel<C> {
    fn bind_interdomain(&mut self, remote: DomId, remote_port: EvtchnPort) -> Result<EvtchnPort, XenError> {
        self.0.bind_interdomain(remote, remote_port)
    }
    fn unbind(&mut self, port: EvtchnPort) -> Result<(), XenError> {
        self.0.unbind(port)
    }
    fn notify(&self, port: EvtchnPort) -> Result<(), XenError> {
        not_ours(|| self.0.notify(port))
    }
    fn fd(&self) -> RawFd {
        self.0.fd()
    }
    fn pending(&mut self, out: &mut Vec<EvtchnPort>) -> Result<(), XenError> {
        // Only the emulation's work is exempt: growing `out` would be ours, and is counted.
        let capacity = out.capacity();
        let result = not_ours(|| self.0.pending(out));
        if out.capacity() != capacity {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        result
    }
    fn unmask(&mut self, port: EvtchnPort) -> Result<(), XenError> {
        not_ours(|| self.0.unmask(port))
    }
}

/// One measured case.
struct Case {
    mode: GrantMode,
    persistent: bool,
    shape: Shape,
    poll_us: u32,
}

impl Case {
    fn name(&self, abi: &str) -> String {
        let persistent = if self.persistent { " persistent" } else { "" };
        format!("{abi} {:?}{persistent} {:?} poll {} µs", self.mode, self.shape, self.poll_us)
    }
}

/// Rounds of writes and reads (read back and checked) of `sectors` sectors on every queue.
fn rounds<L: BlkifLayout>(bed: &mut Bed<L>, shape: Shape, name: &str, count: u64, sectors: usize) {
    for round in 0..count {
        for q in 0..bed.fronts.len() {
            let sector = (round * 2 + q as u64) % 32 * 256 + 3;
            let data = pattern(sectors * 512, round ^ q as u64);
            let (st, _) = bed.transfer(q, Some(&data), sector, sectors, shape);
            assert!(st.iter().all(|&s| s == RSP_OKAY), "{name}: write {st:?}");
            let (st, back) = bed.transfer(q, None, sector, sectors, shape);
            assert!(st.iter().all(|&s| s == RSP_OKAY), "{name}: read {st:?}");
            assert!(back == data, "{name}: round {round} queue {q}: read back differs");
        }
    }
}

/// Warm the data plane up, then count what the worker allocates over many more requests of the same shapes.
fn allocations_when_warm<L: BlkifLayout>(case: &Case, name: &str) -> usize {
    let options = {
        let mut o = DataplaneOptions::default();
        o.poll_us = case.poll_us;
        o
    };
    let config = BedConfig {
        persistent: case.persistent,
        max_indirect: if case.shape == Shape::Indirect { 64 } else { 0 },
        queues: 2,
        options,
        ..BedConfig::default()
    }
    .mode(case.mode);
    let mut bed = Bed::<L>::new_with(config, |bed| {
        bed.start_over(
            Arc::new(HypervisorGrants(bed.host.grant_table(0))),
            &HypervisorEvents(bed.host.evtchn_opener(0)),
        )
    });
    // 40 sectors: 4 direct requests of up to 11 segments, or one indirect request of 5 segments; 200 sectors: 3
    // direct requests, or one indirect request of 25 segments.
    for sectors in [40, 200] {
        rounds(&mut bed, case.shape, name, 8, sectors);
    }
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    for sectors in [40, 200] {
        rounds(&mut bed, case.shape, name, 40, sectors);
    }
    let allocated = ALLOCATIONS.load(Ordering::SeqCst) - before;
    not_ours(|| bed.stop());
    allocated
}

#[test]
fn the_warm_request_path_allocates_nothing() {
    // This thread is the guest.
    NOT_OURS.with(|n| n.set(1));
    let mut cases = Vec::new();
    for (mode, persistent) in [(GrantMode::Map, true), (GrantMode::Map, false), (GrantMode::Copy, false)] {
        for shape in [Shape::Direct, Shape::Indirect] {
            for poll_us in [0, 200_000] {
                cases.push(Case { mode, persistent, shape, poll_us });
            }
        }
    }
    let mut failures = Vec::new();
    for case in &cases {
        for abi in ["x86_64", "x86_32"] {
            let what = case.name(abi);
            let allocated = match abi {
                "x86_64" => allocations_when_warm::<X86_64>(case, &what),
                _ => allocations_when_warm::<X86_32>(case, &what),
            };
            eprintln!("{what}: {allocated} allocation(s) in 320 warm transfers");
            if allocated != 0 {
                failures.push(what);
            }
        }
    }
    assert!(failures.is_empty(), "the warm request path allocated in: {failures:?}");
}
