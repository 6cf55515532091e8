//! Adaptive polling (`poll_us`): after a kick or a completion, a queue's worker keeps looking at its avail ring
//! and its engine's completions, with guest kicks disabled, until nothing has happened for `poll_us`
//! microseconds; then it re-arms kicks, clears the completion eventfd, looks once more, and only then goes back
//! to sleep in epoll. Under load the guest need not kick and the worker need not wake; an idle worker sleeps.
//!
//! A polling pass makes no system call unless there is work: the avail index is one load from guest memory and
//! waiting completions show in the io_uring's shared memory (see [`IoEngine::has_completions`]). The locks (guest
//! memory, the worker, the vring) are taken per pass, so the vhost-user protocol thread is never shut out for
//! long, and a thread waiting for the queue to go idle (`GET_VRING_BASE`, reset, shutdown) ends polling at once.
//!
//! [`IoEngine::has_completions`]: crate::engine::IoEngine::has_completions

use std::sync::atomic::Ordering;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use super::{BlkVring, QueueSlot, VhostUserBlkBackend};

impl VhostUserBlkBackend {
    /// Poll queue `slot` until it has been idle for `poll_us`, or until someone waits for it or the device stops.
    pub(super) fn poll_queue(&self, slot: &QueueSlot, vring: &BlkVring) {
        let budget = Duration::from_micros(u64::from(self.options.poll_us));
        let mut last_work = Instant::now();
        let mut kicks_disabled = false;
        loop {
            let mem = self.mem.read().unwrap_or_else(PoisonError::into_inner);
            let mut guard = slot.lock();
            let Some(worker) = guard.as_mut() else { return };
            let may_pop = !self.stopping.load(Ordering::SeqCst);
            let leave = !may_pop || slot.waiters.load(Ordering::SeqCst) > 0;
            if !kicks_disabled && !leave {
                worker.disable_kicks(vring);
                kicks_disabled = true;
            }
            if !leave && worker.poll_once(vring, &mem, may_pop) {
                last_work = Instant::now();
            } else if leave || last_work.elapsed() >= budget {
                let pending = kicks_disabled && worker.rearm(vring, may_pop);
                if leave && pending {
                    // Kicks are armed again, but what came in before that announces itself to nobody: take it
                    // now, the way a kick would.
                    if may_pop {
                        worker.on_kick(vring, &mem);
                    } else {
                        worker.on_completion(vring, &mem, false);
                    }
                }
                if leave || !pending {
                    if worker.in_flight() == 0 && slot.waiters.load(Ordering::SeqCst) > 0 {
                        slot.idle.notify_all();
                    }
                    return;
                }
                worker.disable_kicks(vring);
                last_work = Instant::now();
            }
            drop(guard);
            drop(mem);
            // Yield rather than spin: the thread our completions wake (the VMM's vCPU or I/O thread) is often
            // placed on this CPU; spinning kept it waiting for our time slice (measured: QD1 latency doubled on
            // 2 CPUs with a 10 µs budget; with a yield it matches the sleeping worker).
            std::thread::yield_now();
        }
    }
}
