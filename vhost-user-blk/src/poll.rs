// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Adaptive polling (`poll_us`): after a kick or a completion, an I/O thread keeps looking at the avail rings and
//! engine completions of all its queues, with guest kicks disabled, until nothing has happened on any of them for
//! `poll_us` microseconds; then it re-arms kicks, clears the completion eventfds, looks once more, and only then
//! goes back to sleep in epoll. Under load the guest need not kick and the thread need not wake; an idle thread
//! sleeps. Each pass takes at most a ring's worth of chains from each queue, so a busy queue does not keep the
//! others of the thread waiting.
//!
//! A polling pass makes no system call unless there is work: the avail index is one load from guest memory and
//! waiting completions show in the io_uring's shared memory (see [`IoEngine::has_completions`]). The locks (guest
//! memory, the worker, the vring) are taken per queue and pass, so the vhost-user protocol thread is never shut out
//! for long, and a thread waiting for a queue to go idle (`GET_VRING_BASE`, reset, shutdown) ends polling at once.
//!
//! [`IoEngine::has_completions`]: device_blk::engine::IoEngine::has_completions

use std::sync::atomic::Ordering;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use super::threads::{notify_idle, ThreadSlot};
use super::{BlkVring, VhostUserBlkBackend};

impl VhostUserBlkBackend {
    /// Poll the queues of `thread` (whose vrings are `vrings`) until all have been idle for `poll_us`, or until
    /// someone waits for one of them or the device stops.
    pub(super) fn poll_thread(&self, thread: &ThreadSlot, vrings: &[BlkVring]) {
        let budget = Duration::from_micros(u64::from(self.options.poll_us));
        let mut last_work = Instant::now();
        // Bit n: the thread's nth queue has guest kicks disabled (at most 64 queues).
        let mut kicks_disabled = 0u64;
        loop {
            let mem = self.mem.read().unwrap_or_else(PoisonError::into_inner);
            let may_pop = !self.stopping.load(Ordering::SeqCst);
            let leave = !may_pop || thread.queues.iter().any(|&q| self.waiters(q) > 0);
            let mut work = false;
            if !leave {
                let _round = thread.round();
                for (local, (&index, vring)) in thread.queues.iter().zip(vrings).enumerate().take(64) {
                    let Some(slot) = self.queues.get(index) else { continue };
                    let mut guard = slot.lock();
                    let Some(worker) = guard.as_mut() else { continue };
                    if kicks_disabled & (1 << local) == 0 {
                        worker.disable_kicks(vring);
                        kicks_disabled |= 1 << local;
                    }
                    work |= worker.poll_once(vring, &mem, may_pop);
                }
            }
            if work {
                last_work = Instant::now();
            } else if leave || last_work.elapsed() >= budget {
                let mut pending_any = false;
                for (local, (&index, vring)) in thread.queues.iter().zip(vrings).enumerate().take(64) {
                    if kicks_disabled & (1 << local) == 0 {
                        continue;
                    }
                    let Some(slot) = self.queues.get(index) else { continue };
                    let mut guard = slot.lock();
                    let Some(worker) = guard.as_mut() else { continue };
                    let pending = worker.rearm(vring, may_pop);
                    if leave && pending {
                        // Kicks are armed again, but what came in before that announces itself to nobody: take
                        // it now, the way a kick would.
                        if may_pop {
                            worker.on_kick(vring, &mem);
                        } else {
                            worker.on_completion(vring, &mem, false);
                        }
                    }
                    notify_idle(slot, worker);
                    pending_any |= pending;
                }
                kicks_disabled = 0;
                if leave || !pending_any {
                    return;
                }
                // Work came in while re-arming: poll on (the next pass disables kicks again).
                last_work = Instant::now();
            }
            drop(mem);
            // Yield rather than spin: the thread our completions wake (the VMM's vCPU or I/O thread) is often
            // placed on this CPU; spinning kept it waiting for our time slice (measured: QD1 latency doubled on
            // 2 CPUs with a 10 µs budget; with a yield it matches the sleeping worker).
            std::thread::yield_now();
        }
    }

    fn waiters(&self, queue: usize) -> usize {
        self.queues.get(queue).map_or(0, |slot| slot.waiters.load(Ordering::SeqCst))
    }
}
