// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The order of a worker's round: new requests are submitted before completions are reaped, so that the
//! `io_uring_enter` submitting them also runs the completion work the kernel holds (`GETEVENTS`) and the reap
//! needs no system call of its own. Observed through an engine wrapper that logs submissions and reaps and can
//! hold completions back.

mod dataplane_util;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dataplane_util::{Bed, BedConfig, TIMEOUT};
use device_blk::engine::EngineWrapper;
use device_blk::{Completion, EngineError, IoEngine, IoOp};
use transport_xen::blkif::{encode, BlkifSegment, RawRequest, OP_READ, RSP_OKAY, X86_64};
use transport_xen::dataplane::DataplaneOptions;
use transport_xen::services::GrantRef;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    /// A submission with this many operations queued since the last one.
    Submit(usize),
    /// A reap that handed out this many completions.
    Reap(usize),
}

/// What the test shares with the wrapper.
#[derive(Default)]
struct Probe {
    log: Mutex<Vec<Event>>,
    /// Completions are held back (not reported, not reaped) while set.
    hold: AtomicBool,
}

impl Probe {
    fn log(&self) -> Vec<Event> {
        self.log.lock().expect("log").clone()
    }

    fn submits(&self) -> usize {
        self.log().iter().filter(|e| matches!(e, Event::Submit(_))).count()
    }
}

struct Recording {
    inner: Box<dyn IoEngine>,
    probe: Arc<Probe>,
    queued: usize,
}

impl Recording {
    fn reap_with(&mut self, clear: bool, on_complete: &mut dyn FnMut(Completion)) {
        if self.probe.hold.load(Ordering::SeqCst) {
            return;
        }
        let mut n = 0;
        let mut count = |c: Completion| {
            n += 1;
            on_complete(c);
        };
        if clear {
            self.inner.reap(&mut count);
        } else {
            self.inner.reap_ready(&mut count);
        }
        if n > 0 {
            self.probe.log.lock().expect("log").push(Event::Reap(n));
        }
    }
}

impl IoEngine for Recording {
    unsafe fn enqueue(&mut self, op: IoOp<'_>, token: u64) -> Result<(), EngineError> {
        // SAFETY: the caller's promise about `op`'s memory is passed on unchanged.
        let r = unsafe { self.inner.enqueue(op, token) };
        if r.is_ok() {
            self.queued += 1;
        }
        r
    }

    fn submit(&mut self) -> Result<(), EngineError> {
        if self.queued > 0 {
            self.probe.log.lock().expect("log").push(Event::Submit(std::mem::take(&mut self.queued)));
        }
        self.inner.submit()
    }

    fn reap(&mut self, on_complete: &mut dyn FnMut(Completion)) {
        self.reap_with(true, on_complete);
    }

    fn reap_ready(&mut self, on_complete: &mut dyn FnMut(Completion)) {
        self.reap_with(false, on_complete);
    }

    fn has_completions(&mut self) -> bool {
        !self.probe.hold.load(Ordering::SeqCst) && self.inner.has_completions()
    }

    fn clear_completion_signal(&mut self) {
        self.inner.clear_completion_signal();
    }

    fn completion_fd(&self) -> RawFd {
        self.inner.completion_fd()
    }

    fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }

    fn buffer_alignment(&self) -> usize {
        self.inner.buffer_alignment()
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }
}

fn read_4k(gref: GrantRef, id: u64) -> RawRequest {
    encode::rw::<X86_64>(OP_READ, id, 8 * id, &[BlkifSegment { gref, first_sect: 0, last_sect: 7 }])
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_round_with_new_requests_and_completions_submits_before_it_reaps() {
    let probe = Arc::new(Probe::default());
    let p = probe.clone();
    let options = {
        let mut o = DataplaneOptions::default();
        o.engine_wrapper =
            Some(EngineWrapper::new(move |inner| Box::new(Recording { inner, probe: p.clone(), queued: 0 })));
        o
    };
    let mut bed: Bed<X86_64> = Bed::new(BedConfig { options, ..BedConfig::default() });
    let page = bed.fronts[0].grant_pages(3, false).expect("pages");
    assert_eq!(bed.roundtrip(0, &[read_4k(page.grefs[0], 1)]), vec![RSP_OKAY]);

    // Two requests whose completions are held back: the worker submits each and sleeps.
    probe.hold.store(true, Ordering::SeqCst);
    let before = probe.submits();
    assert_eq!(bed.fronts[0].submit(&[read_4k(page.grefs[1], 2)]).expect("submit"), 1);
    wait_for("the second request's submission", || probe.submits() == before + 1);
    assert_eq!(bed.fronts[0].submit(&[read_4k(page.grefs[2], 3)]).expect("submit"), 1);
    wait_for("the third request's submission", || probe.submits() == before + 2);
    // Both are done on the disk by now; let the worker see them, and wake it with a new request.
    std::thread::sleep(Duration::from_millis(100));
    let seen = probe.log().len();
    probe.hold.store(false, Ordering::SeqCst);
    assert_eq!(bed.fronts[0].submit(&[read_4k(page.grefs[0], 4)]).expect("submit"), 1);
    let mut ids: Vec<u64> = bed.responses(0, 3).iter().map(|r| r.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![2, 3, 4]);
    let round = probe.log()[seen..].to_vec();
    assert_eq!(
        round.first(),
        Some(&Event::Submit(1)),
        "the new request must be submitted before the held completions are reaped: {round:?}"
    );
    assert!(matches!(round.get(1), Some(Event::Reap(n)) if *n >= 2), "then both completions reaped: {round:?}");
    bed.stop();
    bed.fronts[0].release_pages(page).expect("unmapped");
}
