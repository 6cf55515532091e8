// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Graceful shutdown on SIGTERM and SIGINT.
//!
//! The signals are blocked before any other thread exists (every thread inherits the mask) and taken by one
//! thread with `sigwait`, which sets the shutdown flag, wakes the main loop through an eventfd and runs the
//! current hook (e.g. closing the vhost-user connection). A second signal ends the process at once.
//!
//! That thread starts with [`Shutdown::listen`], which the serving subcommands call once they have dropped their
//! privileges (capabilities belong to threads, so the process has one thread until then); a signal that arrives
//! before stays pending and is taken then.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

type Hook = Box<dyn Fn() + Send>;

/// The process-wide shutdown request.
pub struct Shutdown {
    requested: AtomicBool,
    wake: EventFd,
    hook: Mutex<Option<Hook>>,
    listening: AtomicBool,
}

impl Shutdown {
    /// Block SIGTERM and SIGINT (for every thread started from now on). Call before spawning any thread, then
    /// [`listen`](Self::listen).
    pub fn install() -> io::Result<Arc<Shutdown>> {
        let set = termination_signals();
        // SAFETY: `set` is an initialised signal set; the old mask is not wanted.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(Arc::new(Shutdown {
            requested: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            hook: Mutex::new(None),
            listening: AtomicBool::new(false),
        }))
    }

    /// Start the thread that takes the signals (once; later calls do nothing).
    pub fn listen(self: &Arc<Self>) -> io::Result<()> {
        if self.listening.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let handler = Arc::clone(self);
        std::thread::Builder::new()
            .name("signals".to_string())
            .spawn(move || handler.handle_signals(termination_signals()))?;
        Ok(())
    }

    fn handle_signals(&self, set: libc::sigset_t) {
        loop {
            let mut signal: libc::c_int = 0;
            // SAFETY: `set` is initialised and `signal` is a valid out-pointer.
            if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                continue;
            }
            let name = if signal == libc::SIGINT { "SIGINT" } else { "SIGTERM" };
            if self.is_requested() {
                tracing::warn!(signal = name, "second signal: exiting without finishing in-flight requests");
                std::process::exit(1);
            }
            tracing::info!(signal = name, "shutting down: finishing in-flight requests");
            self.request();
        }
    }

    /// Ask everything to stop.
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        if let Err(error) = self.wake.write(1) {
            tracing::error!(%error, "cannot wake the main loop");
        }
        if let Some(hook) = self.hook.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            hook();
        }
    }

    /// Whether a shutdown was requested.
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Readable once a shutdown was requested, for `poll` next to other descriptors.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Run `hook` when a shutdown is requested (at once if it already was); `None` removes it.
    pub fn set_hook(&self, hook: Option<Hook>) {
        let mut slot = self.hook.lock().unwrap_or_else(PoisonError::into_inner);
        *slot = hook;
        if self.is_requested() {
            if let Some(hook) = slot.as_ref() {
                hook();
            }
        }
    }
}

fn termination_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; SIGTERM and SIGINT are valid signal numbers.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
    }
    set
}
