// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A frontend that went Closed is served a moment longer, until its rings are quiet.
//!
//! Linux blkfront, when the vbd closes under it (the toolstack's detach), stops its block queues, marks the disk
//! dead and goes Closed. A request the block layer handed over in between waits in a stopped queue: only an event
//! from the backend restarts those queues (blkfront's interrupt handler does), and the request is then dispatched
//! (to the ring, or ended by the guest for the dead disk). At removal, blkfront's `del_gendisk` waits for every
//! request. A backend that stops its rings as soon as the frontend is Closed, with no event after, leaves such a
//! request waiting for good, and the guest's xenwatch thread hangs.
//! In the lab: `xl block-detach` during fio hung the guest about one run in ten with 16 requests queued, and at
//! the first detach with 128 (more than the ring's 32 slots: the rest wait in the block layer when the disk
//! closes). With the kick, every detach completes; the held requests did not even reach the ring again (the guest
//! ends them once its queues run), so the event is what matters, and serving until quiet is the safety net.
//!
//! So on frontend Closed the backend kicks the rings (an event on each, whatever the event indexes say) and keeps
//! serving until they were quiet for [`QUIET`] (never more than [`MAX`] in all, whatever the guest queues), and
//! only then stops the data plane and says Closed. Nothing blocks meanwhile: the supervisor's loop comes back at
//! [`VbdBackend::deadline`]. A frontend that is gone (state Unknown), a backend directory removed and a shutdown
//! stop at once.

use std::time::{Duration, Instant};

use super::VbdBackend;

/// How long the rings of a Closed frontend must stay quiet before the data plane is stopped.
pub(super) const QUIET: Duration = Duration::from_millis(300);
/// The longest a Closed frontend's rings are served, however busy it keeps them.
pub(super) const MAX: Duration = Duration::from_secs(3);

/// A Closed frontend's rings, still served.
#[derive(Clone, Copy, Debug)]
pub(super) struct Closing {
    /// The data plane's activity when the frontend closed.
    at_close: u64,
    /// The data plane's activity when last looked at.
    activity: u64,
    /// Stop once this passes with no activity since the last look.
    quiet_until: Instant,
    /// Stop at the latest then.
    until: Instant,
}

impl VbdBackend {
    /// The frontend is Closed: whether its rings are still to be served. The first call kicks them.
    pub(super) fn serve_closed_frontend(&mut self) -> bool {
        let Some(running) = &self.running else {
            self.closing = None;
            return false;
        };
        let now = Instant::now();
        let activity = running.activity();
        match &mut self.closing {
            None => {
                running.kick();
                self.closing =
                    Some(Closing { at_close: activity, activity, quiet_until: now + QUIET, until: now + MAX });
                tracing::info!(vbd = %self.id, "frontend closed: serving its rings until they are quiet");
                true
            }
            Some(closing) => {
                if activity != closing.activity {
                    closing.activity = activity;
                    closing.quiet_until = (now + QUIET).min(closing.until);
                }
                now < closing.quiet_until
            }
        }
    }

    /// Requests taken plus responses written since the frontend closed, if it did and its rings are still served.
    pub(super) fn activity_since_close(&self) -> Option<u64> {
        let (closing, running) = (self.closing.as_ref()?, self.running.as_ref()?);
        Some(running.activity().wrapping_sub(closing.at_close))
    }

    /// When the supervisor must look at this vbd again without an event: the end of serving a Closed frontend.
    pub fn deadline(&self) -> Option<Instant> {
        self.closing.map(|c| c.quiet_until)
    }
}
