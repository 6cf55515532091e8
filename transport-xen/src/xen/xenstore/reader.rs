// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The receiving side of a xenstore connection ([`XsReader`]) and its two drivers.
//!
//! [`XsReader`] is the only code that reads a connection: it reassembles messages ([`FrameDecoder`]) and hands
//! each one to the store's dispatch (reply matching, watch-event queueing); end of file, a read error or an
//! oversized header break the connection for good (every waiter and every later call gets the error). Two drivers
//! run it, with the same results for the same bytes:
//! - the **reader thread** (`reader_loop`) of every store built by `open`, `open_device`, `connect_socket` or
//!   `from_stream`: it owns a reader for the life of the connection and wakes the callers waiting for replies;
//! - the **callers' threads** of a store built by [`XenBusStore::from_stream_inline`]: the caller waiting for a
//!   reply reads the connection itself until its reply (or the connection's end) arrives, and
//!   [`XenStore::take_watch_events`] reads what has arrived before draining the queue. No thread per connection,
//!   and the reader (its buffer) is handed back by [`XenBusStore::into_reader`] for the next connection.
//!
//! [`XenBusStore::from_stream_inline`]: super::XenBusStore::from_stream_inline
//! [`XenBusStore::into_reader`]: super::XenBusStore::into_reader
//! [`XenStore::take_watch_events`]: crate::services::XenStore::take_watch_events

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::{Shared, WHAT};
use crate::services::XenError;
use crate::xen::wire::FrameDecoder;

/// Bytes one `read` may take from the connection.
const READ_BUF_LEN: usize = 64 * 1024;
/// Most reads one [`XsReader::drain`] does, so that a peer that never stops sending cannot keep a
/// `take_watch_events` busy for ever (the rest is read by the next call).
pub(super) const MAX_DRAIN_READS: usize = 16;

/// The receiving side of one xenstore connection at a time: the message decoder and the read buffer.
///
/// A store that reads on its callers' threads ([`XenBusStore::from_stream_inline`]) takes one and gives it back
/// ([`XenBusStore::into_reader`]), reset, so that its buffer serves the next connection.
///
/// [`XenBusStore::from_stream_inline`]: super::XenBusStore::from_stream_inline
/// [`XenBusStore::into_reader`]: super::XenBusStore::into_reader
#[derive(Debug)]
pub struct XsReader {
    decoder: FrameDecoder,
    buf: Vec<u8>,
    /// The connection broke while this reader read it: it reads no more until [`XsReader::reset`].
    finished: bool,
}

/// What one [`XsReader::receive`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Received {
    /// Bytes were read (and every complete message in them dispatched).
    Bytes,
    /// Nothing to read yet.
    Nothing,
    /// The connection is broken (now or before): nothing more will be read.
    Finished,
}

impl Default for XsReader {
    fn default() -> XsReader {
        XsReader::new()
    }
}

impl XsReader {
    /// A reader with an empty decoder and its own read buffer.
    pub fn new() -> XsReader {
        XsReader { decoder: FrameDecoder::new(), buf: vec![0; READ_BUF_LEN], finished: false }
    }

    /// A placeholder without a buffer, left in a store whose reader was taken out.
    pub(super) fn detached() -> XsReader {
        XsReader { decoder: FrameDecoder::new(), buf: Vec::new(), finished: true }
    }

    /// Forget the connection: nothing buffered, not finished. The read buffer stays.
    pub(super) fn reset(&mut self) {
        self.decoder = FrameDecoder::new();
        self.finished = false;
    }

    /// Read once from the connection (which is non-blocking) and dispatch every complete message.
    pub(super) fn receive(&mut self, shared: &Shared) -> Received {
        if self.finished {
            return Received::Finished;
        }
        match (&shared.conn).read(&mut self.buf) {
            Ok(0) => {
                tracing::warn!("xenstore: connection closed by the peer");
                return self.finish(shared, XenError::Disconnected { what: WHAT });
            }
            Ok(n) => self.decoder.push(&self.buf[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {
                return Received::Nothing
            }
            Err(e) => {
                tracing::warn!(%e, "xenstore: read failed, connection lost");
                return self.finish(shared, XenError::Disconnected { what: WHAT });
            }
        }
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => shared.dispatch(frame),
                Ok(None) => return Received::Bytes,
                Err(e) => {
                    tracing::error!(%e, "xenstore: protocol violation, connection abandoned");
                    return self.finish(shared, XenError::Protocol { what: WHAT, detail: e.to_string() });
                }
            }
        }
    }

    /// Wait at most `timeout` for the connection to be readable, then [`XsReader::receive`] once.
    pub(super) fn receive_within(&mut self, shared: &Shared, timeout: Duration) -> Received {
        if self.finished {
            return Received::Finished;
        }
        match poll_one(shared.conn.as_raw_fd(), libc::POLLIN, Some(timeout)) {
            Ok(true) => self.receive(shared),
            Ok(false) => Received::Nothing,
            Err(err) => {
                tracing::error!(%err, "xenstore: poll failed");
                self.finish(shared, XenError::Disconnected { what: WHAT })
            }
        }
    }

    /// Read and dispatch what has arrived, without waiting: until nothing is left, the connection ends, or
    /// [`MAX_DRAIN_READS`] reads.
    pub(super) fn drain(&mut self, shared: &Shared) {
        for _ in 0..MAX_DRAIN_READS {
            if self.receive(shared) != Received::Bytes {
                return;
            }
        }
    }

    fn finish(&mut self, shared: &Shared, err: XenError) -> Received {
        self.finished = true;
        shared.fail_all(err);
        Received::Finished
    }
}

/// The reader thread of a connection: poll it (and `stop`), read and dispatch, until it breaks or `stop` fires.
pub(super) fn reader_loop(shared: &Shared, stop: &EventFd) {
    let mut reader = XsReader::new();
    let conn_fd = shared.conn.as_fd().as_raw_fd();
    loop {
        let mut fds = [
            libc::pollfd { fd: conn_fd, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is an array of two valid pollfds that outlives the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(%err, "xenstore: poll failed");
            shared.fail_all(XenError::Disconnected { what: WHAT });
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents != 0 && reader.receive(shared) == Received::Finished {
            return;
        }
    }
}

/// `poll(2)` one descriptor for `events`; `Ok(true)` when ready, `Ok(false)` on timeout. A timeout is rounded up
/// to whole milliseconds (a waiter never spins through the last fraction of one).
pub(super) fn poll_one(fd: RawFd, events: libc::c_short, timeout: Option<Duration>) -> io::Result<bool> {
    let mut pfd = libc::pollfd { fd, events, revents: 0 };
    let ms = timeout.map_or(-1, |t| {
        let ms = t.as_nanos().div_ceil(1_000_000);
        libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
    });
    loop {
        // SAFETY: `pfd` is one valid pollfd that outlives the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n >= 0 {
            return Ok(n > 0);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
