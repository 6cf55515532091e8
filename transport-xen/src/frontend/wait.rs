// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Waiting for xenstore nodes, the way a guest driver or the toolstack does: a watch, and a re-read on each event.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::services::{read_optional, TxId, WatchEvent, XenError, XenStore};

static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

/// Why a wait ended without the condition.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WaitError {
    /// The deadline passed; the last value seen is attached.
    #[error("timed out after {timeout:?} waiting for {path} (last value: {last})")]
    Timeout {
        /// The node.
        path: String,
        /// How long we waited.
        timeout: Duration,
        /// The last value read, escaped.
        last: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] XenError),
}

/// Wait until `accept` returns `Some` for the value of `path` (`None` when absent), for at most `timeout`.
///
/// Registers a watch on `path` with a private token on `store`; other pending events of the connection are kept
/// queued for their owner only if the connection is not shared with a supervisor (use a separate connection).
pub fn wait_for<T>(
    store: &dyn XenStore,
    path: &str,
    timeout: Duration,
    mut accept: impl FnMut(Option<&[u8]>) -> Option<T>,
) -> Result<T, WaitError> {
    let token = format!("wait-{}", NEXT_TOKEN.fetch_add(1, Ordering::Relaxed));
    store.watch(path, &token)?;
    let result = wait_watched(store, path, timeout, &mut accept);
    let _ = store.unwatch(path, &token);
    result
}

fn wait_watched<T>(
    store: &dyn XenStore,
    path: &str,
    timeout: Duration,
    accept: &mut impl FnMut(Option<&[u8]>) -> Option<T>,
) -> Result<T, WaitError> {
    let deadline = Instant::now() + timeout;
    let mut events: Vec<WatchEvent> = Vec::new();
    loop {
        let value = read_optional(store, TxId::NONE, path)?;
        if let Some(t) = accept(value.as_deref()) {
            return Ok(t);
        }
        let now = Instant::now();
        if now >= deadline {
            let last = value.map_or_else(|| "absent".to_string(), |v| crate::xenbus::nodes::shown(&v));
            return Err(WaitError::Timeout { path: path.to_string(), timeout, last });
        }
        poll_readable(store.watch_fd(), deadline - now);
        events.clear();
        store.take_watch_events(&mut events)?;
    }
}

/// Wait until `path` reads exactly `value`.
pub fn wait_for_value(store: &dyn XenStore, path: &str, value: &[u8], timeout: Duration) -> Result<(), WaitError> {
    wait_for(store, path, timeout, |v| (v == Some(value)).then_some(()))
}

/// Wait up to `timeout` for `fd` to become readable (returns early on a signal; callers re-check).
pub fn poll_readable(fd: RawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    rc > 0
}
