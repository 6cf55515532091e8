// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Bounded work per round: a frontend that always has one more refused request queued (an unknown operation, a
//! grant it never gave; each is answered at once and frees its slot) must not keep a worker in its ring loop.
//! Another guest's I/O keeps completing meanwhile, and `Dataplane::stop` of the hostile guest returns quickly
//! (it is called from the xenbus control thread, so every other guest's attach and detach waits for it). With an
//! I/O thread pool of one thread, both rings are on that thread: the hostile ring must not starve the other.

mod dataplane_util;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dataplane_util::{pattern, Bed, BedConfig, Shape};
use transport_xen::blkif::{encode, BlkifResponse, BlkifSegment, RawRequest, OP_READ, RSP_EOPNOTSUPP, RSP_ERROR};
use transport_xen::blkif::{RSP_OKAY, X86_64};
use transport_xen::dataplane::{DataplaneOptions, IoThreads, QueueStats};
use transport_xen::emulated::RingFrontend;

/// What the issue asks of `stop`, whatever the guest does.
const STOP_BOUND: Duration = Duration::from_millis(100);
/// How long a stop on unbounded code is waited for before the storm is ended (so that the test fails, not hangs).
const GIVE_UP: Duration = Duration::from_secs(3);
/// Request ids of the storm: below 2^32 (a late write of a response's zero padding cannot change them) and far
/// from the small numbers the first bytes of a request read as.
const FIRST_ID: u64 = 1 << 20;

/// The `n`th request of the storm and the response it must get: even ones carry an operation that does not
/// exist, odd ones read into a grant the guest never gave.
fn refused(n: u32) -> (RawRequest, BlkifResponse) {
    let id = FIRST_ID + u64::from(n);
    if n % 2 == 0 {
        let mut r = encode::rw::<X86_64>(OP_READ, id, 0, &[]);
        r.bytes[0] = 255;
        (r, BlkifResponse { id, operation: 255, status: RSP_EOPNOTSUPP })
    } else {
        let seg = BlkifSegment { gref: 0xdead, first_sect: 0, last_sect: 7 };
        (encode::rw::<X86_64>(OP_READ, id, 0, &[seg]), BlkifResponse { id, operation: OP_READ, status: RSP_ERROR })
    }
}

/// What the hostile frontend saw.
struct StormReport {
    /// Requests answered.
    answered: u32,
    /// Most responses seen written in the ring but not yet published (`rsp_prod` behind): what the backend did
    /// in one go before publishing and going back to its event loop.
    max_unpublished: u32,
}

/// The hostile frontend: fills the ring, then refills each slot the moment the backend has written its response
/// there (before the response is even published), so that the backend's final check always finds one more
/// request. Runs until `quit`; hands back the ring and what it saw.
fn storm(mut front: RingFrontend<X86_64>, quit: Arc<AtomicBool>) -> JoinHandle<(RingFrontend<X86_64>, StormReport)> {
    std::thread::Builder::new()
        .name("hostile-frontend".into())
        .spawn(move || {
            let size = front.ring().size();
            for n in 0..size {
                front.ring().put_request_unchecked(&refused(n).0);
            }
            if front.ring().push_requests() {
                front.notify().expect("notify");
            }
            let mut next = size;
            let mut max_unpublished = 0;
            while !quit.load(Ordering::Relaxed) {
                // Request `next` goes where request `next - size` was, once that one's response is complete there
                // (so the producer never gets more than a ring ahead of the backend's responses).
                let done = next - size;
                let seen = BlkifResponse::decode::<X86_64>(&front.ring().response_bytes(done));
                if seen != refused(done).1 {
                    std::hint::spin_loop();
                    continue;
                }
                // Requests 0..=done are answered; `rsp_prod`, read after, says how many of them are published.
                let unpublished = (done + 1).saturating_sub(front.ring().rsp_prod());
                max_unpublished = max_unpublished.max(unpublished);
                front.ring().put_request_unchecked(&refused(next).0);
                next += 1;
                if front.ring().push_requests() {
                    front.notify().expect("notify");
                }
            }
            (front, StormReport { answered: next - size, max_unpublished })
        })
        .expect("spawn")
}

fn responses(bed: &Bed<X86_64>) -> u64 {
    QueueStats::get(&bed.dp().stats(0).expect("queue 0").responses)
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn refused_requests_do_not_hold_a_worker(poll_us: u32, io_threads: Option<IoThreads>) {
    let options = {
        let mut o = DataplaneOptions::default();
        o.poll_us = poll_us;
        o.io_threads = io_threads.clone();
        o
    };
    let config = BedConfig { options, ..BedConfig::default() };
    let mut hostile = Bed::<X86_64>::new(config.clone());
    let mut bystander = Bed::<X86_64>::new(config);
    if let Some(pool) = &io_threads {
        assert_eq!(pool.rings_per_thread(), [2], "both rings on the one I/O thread");
    }
    let size = u64::from(hostile.fronts[0].ring().size());

    let quit = Arc::new(AtomicBool::new(false));
    let frontend = storm(hostile.fronts.remove(0), quit.clone());
    wait_for("the storm to start", || responses(&hostile) > 20 * size);

    // Another guest's verified I/O keeps completing during the storm.
    let before = responses(&hostile);
    let t0 = Instant::now();
    let mut rounds = 0u64;
    while rounds < 5 || t0.elapsed() < Duration::from_millis(300) {
        let data = pattern(4096, rounds);
        let sector = (rounds % 64) * 8;
        let (statuses, _) = bystander.transfer(0, Some(&data), sector, 8, Shape::Direct);
        assert_eq!(statuses, [RSP_OKAY], "bystander write {rounds}");
        let (statuses, back) = bystander.transfer(0, None, sector, 8, Shape::Direct);
        assert_eq!(statuses, [RSP_OKAY], "bystander read {rounds}");
        assert!(back == data, "bystander read {rounds} returned other data");
        rounds += 1;
    }
    let storm_answered = responses(&hostile) - before;
    assert!(storm_answered > 10 * size, "the storm went on during the bystander's I/O ({storm_answered} answered)");

    // Stop the hostile guest's data plane while its frontend keeps going.
    let dp = hostile.dp.take().expect("running");
    let (tx, rx) = mpsc::channel();
    let stopper = std::thread::spawn(move || {
        let t = Instant::now();
        dp.stop();
        let _ = tx.send(t.elapsed());
    });
    let took = rx.recv_timeout(GIVE_UP);
    quit.store(true, Ordering::Relaxed);
    stopper.join().expect("stop");
    let (front, seen) = frontend.join().expect("hostile frontend");
    let took = took.unwrap_or_else(|_| panic!("stop() still waiting after {GIVE_UP:?} while the guest kept queueing"));
    eprintln!(
        "poll_us {poll_us}, {io_threads:?}: {} refused requests answered, at most {} before publishing; {rounds} bystander rounds; \
         stop took {took:?}",
        seen.answered, seen.max_unpublished
    );
    // A round answers at most a ring's worth of requests before it publishes them (and looks at its events).
    assert!(
        u64::from(seen.max_unpublished) <= size,
        "{} responses written before the backend published any (ring of {size})",
        seen.max_unpublished
    );
    assert!(took < STOP_BOUND, "stop() took {took:?} while the guest kept queueing (bound {STOP_BOUND:?})");
    assert_eq!(hostile.host.live_mappings(), 0, "grant mappings left behind");
    assert_eq!(hostile.host.evtchn_switch().open_ports(0), 0, "ports left bound");
    drop(front);

    // The bystander still serves after the other guest is gone.
    let (statuses, _) = bystander.transfer(0, None, 0, 8, Shape::Direct);
    assert_eq!(statuses, [RSP_OKAY]);
    bystander.stop();
}

#[test]
fn a_frontend_always_one_refused_request_ahead_does_not_hold_its_worker() {
    refused_requests_do_not_hold_a_worker(0, None);
}

#[test]
fn a_frontend_always_one_refused_request_ahead_does_not_hold_a_polling_worker() {
    refused_requests_do_not_hold_a_worker(50, None);
}

#[test]
fn a_frontend_always_one_refused_request_ahead_does_not_starve_the_rings_sharing_its_io_thread() {
    refused_requests_do_not_hold_a_worker(0, Some(IoThreads::new(1)));
}

#[test]
fn a_frontend_always_one_refused_request_ahead_does_not_starve_the_rings_sharing_a_polling_io_thread() {
    refused_requests_do_not_hold_a_worker(50, Some(IoThreads::new(1)));
}
