// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! How the control plane reaches a queue's worker: one eventfd the worker watches, and what was asked.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// What the control plane asked of a worker since it last looked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Asked {
    /// Stop: take no more requests, answer what is in flight, release the ring.
    pub stop: bool,
    /// Notify the frontend once, whatever its event index says (see [`Dataplane::kick`](super::Dataplane::kick)).
    pub kick: bool,
}

/// The requests to one worker.
#[derive(Debug)]
pub(crate) struct QueueSignals {
    eventfd: EventFd,
    stop: AtomicBool,
    kick: AtomicBool,
}

impl QueueSignals {
    pub(crate) fn new() -> std::io::Result<QueueSignals> {
        let eventfd = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        Ok(QueueSignals { eventfd, stop: AtomicBool::new(false), kick: AtomicBool::new(false) })
    }

    /// The descriptor the worker watches (readable once something was asked).
    pub(crate) fn fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    pub(crate) fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
    }

    pub(crate) fn request_kick(&self) {
        self.kick.store(true, Ordering::SeqCst);
        self.wake();
    }

    /// What was asked: the eventfd is read first, so whatever is asked after this call wakes the worker again.
    pub(crate) fn take(&self) -> Asked {
        let _ = self.eventfd.read();
        Asked { stop: self.stop.load(Ordering::SeqCst), kick: self.kick.swap(false, Ordering::SeqCst) }
    }

    fn wake(&self) {
        // Fails only on a counter at its maximum, which is readable all the same.
        let _ = self.eventfd.write(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kick_is_taken_once_and_a_stop_stays() {
        let s = QueueSignals::new().expect("eventfd");
        assert_eq!(s.take(), Asked::default());
        s.request_kick();
        assert_eq!(s.take(), Asked { stop: false, kick: true });
        assert_eq!(s.take(), Asked::default());
        s.request_stop();
        s.request_kick();
        assert_eq!(s.take(), Asked { stop: true, kick: true });
        assert_eq!(s.take(), Asked { stop: true, kick: false });
    }
}
