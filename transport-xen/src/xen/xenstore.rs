// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`XenBusStore`]: the [`XenStore`] trait over the real xenstore wire protocol.
//!
//! # Design: one connection, one reader thread
//! The connection (Linux's `/dev/xen/xenbus`, or xenstored's unix socket) is shared by every caller. Replies and
//! watch events arrive interleaved on it, so a dedicated **reader thread** owns the receiving side: it reassembles
//! messages ([`FrameDecoder`]), hands each reply to the caller waiting for its `req_id` (a map of pending requests
//! and a condition variable), and queues watch events, making an eventfd readable while the queue is not empty.
//! Callers write whole requests under a write lock, so several threads may have requests in flight at once, and
//! [`XenStore::take_watch_events`] only drains the queue: it never touches the connection and never blocks.
//!
//! Everything from the peer is untrusted: a header announcing more than `XENSTORE_PAYLOAD_MAX` bytes, end of file
//! or a read error breaks the connection for good (every waiter and every later call gets the error, and the watch
//! fd becomes readable so the owner notices); a malformed reply fails only its request; a reply nobody waits for
//! and a malformed watch event are dropped with a warning. The watch queue is bounded: on overflow it is replaced
//! by one event per registered watch naming the watched path itself (as at registration), which tells every
//! consumer to rescan instead of growing without bound.
//!
//! On Linux's `/dev/xen/xenbus` only **one request is in flight** at a time: the kernel transmits a request's
//! payload later, from the per-open buffer that the next `write` reuses (`xenbus_dev_request_and_reply`), so
//! pipelined requests corrupt each other (seen in the real lab: concurrent writes were lost). libxenstore
//! serializes for the same reason. On xenstored's socket requests are pipelined.
//!
//! Watch events only identify a watch by token: after [`XenStore::unwatch`] a few already queued events for it may
//! still be delivered.
//!
//! # Without a thread: [`XenBusStore::from_stream_inline`]
//! The receiving side is one piece of code ([`XsReader`], in [`reader`]) that a driver runs: the reader thread
//! above, or, for a store built by [`XenBusStore::from_stream_inline`], the callers' own threads. There a caller
//! reads the connection while it waits for its reply (one request in flight at a time), and
//! [`XenStore::take_watch_events`] first reads what has arrived (without waiting); nothing reads between calls, so
//! the watch fd only reports events already read. The decoding, reply matching, watch queue and breaking of the
//! connection are the same; what such a store saves is a thread per connection and two thread switches per call,
//! and its [`XsReader`] (with its buffer) serves one connection after the other ([`XenBusStore::into_reader`]).
//! Tests and the fuzzer use it; the daemon uses the reader thread.
//!
//! [`FrameDecoder`]: wire::FrameDecoder

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::wire::{self, Frame, MsgType, REQUEST_PAYLOAD_MAX};
use crate::services::{Permission, TxId, WatchEvent, XenError, XenStore};

pub mod reader;
#[cfg(test)]
mod tests;

pub use reader::XsReader;
use reader::{poll_one, reader_loop, Received};

/// Linux's xenbus character device (the kernel relays to xenstored).
pub const XENBUS_DEVICE: &str = "/dev/xen/xenbus";
/// xenstored's unix sockets, in the order tried.
pub const XENSTORED_SOCKETS: [&str; 2] = ["/run/xenstored/socket", "/var/run/xenstored/socket"];
/// How long a request waits for its reply by default.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Most watch events queued before the queue collapses into one rescan event per watch.
pub const MAX_QUEUED_WATCH_EVENTS: usize = 4096;

const WHAT: &str = "xenstore";

/// Which kind of connection a [`XenBusStore`] uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XsTransport {
    /// A xenbus character device (`/dev/xen/xenbus`).
    Device(PathBuf),
    /// A unix socket to xenstored.
    Socket(PathBuf),
    /// A socket handed over by the caller ([`XenBusStore::from_stream`]).
    Stream,
}

/// A xenstore connection implementing [`XenStore`]; see the [module documentation](self) for the design.
#[derive(Debug)]
pub struct XenBusStore {
    shared: Arc<Shared>,
    receive: Receive,
    transport: XsTransport,
    timeout: Duration,
    /// Held from sending a request until its reply arrives, when requests must not be pipelined.
    in_flight: Option<Mutex<()>>,
}

/// Who reads the connection.
#[derive(Debug)]
enum Receive {
    /// The store's reader thread, ended by writing `stop`.
    Thread { stop: EventFd, handle: Option<JoinHandle<()>> },
    /// The callers' threads, one at a time: a caller holds the lock from sending its request until its reply.
    Inline(Mutex<XsReader>),
}

#[derive(Debug)]
struct Shared {
    conn: File,
    /// Serializes writers so that each message goes out contiguously.
    write_lock: Mutex<()>,
    state: Mutex<State>,
    replied: Condvar,
    /// Readable while `state.events` is not empty or the connection is broken.
    watch_evt: EventFd,
    next_req_id: AtomicU32,
    /// Write errors are per request on the device (it drops the bad message) but fatal on a socket.
    write_errors_fatal: bool,
}

#[derive(Debug, Default)]
struct State {
    /// Requests in flight: `None` until the reply arrives.
    pending: HashMap<u32, Option<Frame>>,
    events: VecDeque<WatchEvent>,
    /// Registered watches (path, token), to synthesize rescan events on queue overflow.
    watches: Vec<(String, String)>,
    broken: Option<XenError>,
}

impl XenBusStore {
    /// Connect to xenstore: `/dev/xen/xenbus` first, then xenstored's unix socket.
    pub fn open() -> Result<XenBusStore, XenError> {
        let mut errors = Vec::new();
        match XenBusStore::open_device(Path::new(XENBUS_DEVICE)) {
            Ok(store) => return Ok(store),
            Err(e) => errors.push(format!("{XENBUS_DEVICE}: {e}")),
        }
        for socket in XENSTORED_SOCKETS {
            match XenBusStore::connect_socket(Path::new(socket)) {
                Ok(store) => return Ok(store),
                Err(e) => errors.push(format!("{socket}: {e}")),
            }
        }
        Err(XenError::Protocol { what: WHAT, detail: format!("no xenstore connection: {}", errors.join("; ")) })
    }

    /// Open a xenbus character device.
    pub fn open_device(path: &Path) -> Result<XenBusStore, XenError> {
        let conn = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| XenError::os(format!("open {}", path.display()), &e))?;
        Ok(XenBusStore::start(conn, XsTransport::Device(path.to_owned()), false, None)?
            .with_one_request_in_flight(true))
    }

    /// Connect to xenstored's unix socket.
    pub fn connect_socket(path: &Path) -> Result<XenBusStore, XenError> {
        let stream = UnixStream::connect(path).map_err(|e| XenError::os(format!("connect {}", path.display()), &e))?;
        XenBusStore::from_stream_with(stream, XsTransport::Socket(path.to_owned()))
    }

    /// Use an already connected stream (tests use one end of a socket pair).
    pub fn from_stream(stream: UnixStream) -> Result<XenBusStore, XenError> {
        XenBusStore::from_stream_with(stream, XsTransport::Stream)
    }

    /// Use an already connected stream without a reader thread: each caller reads the connection while it waits
    /// for its reply, with `reader` (see the [module documentation](self)). Requests are never pipelined.
    pub fn from_stream_inline(stream: UnixStream, mut reader: XsReader) -> Result<XenBusStore, XenError> {
        reader.reset();
        stream.set_nonblocking(true).map_err(|e| XenError::os("xenstore socket: set non-blocking", &e))?;
        XenBusStore::start(File::from(OwnedFd::from(stream)), XsTransport::Stream, true, Some(reader))
    }

    /// Close the connection and give back the reader of a store built by [`XenBusStore::from_stream_inline`],
    /// reset for the next connection; `None` for a store with a reader thread (which is stopped).
    pub fn into_reader(mut self) -> Option<XsReader> {
        match &mut self.receive {
            Receive::Inline(reader) => {
                let reader = reader.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
                let mut reader = std::mem::replace(reader, XsReader::detached());
                reader.reset();
                Some(reader)
            }
            Receive::Thread { .. } => None,
        }
    }

    fn from_stream_with(stream: UnixStream, transport: XsTransport) -> Result<XenBusStore, XenError> {
        stream.set_nonblocking(true).map_err(|e| XenError::os("xenstore socket: set non-blocking", &e))?;
        XenBusStore::start(File::from(OwnedFd::from(stream)), transport, true, None)
    }

    /// Start a store on `conn`: with a reader thread, or read by its callers with `inline`.
    fn start(
        conn: File,
        transport: XsTransport,
        write_errors_fatal: bool,
        inline: Option<XsReader>,
    ) -> Result<XenBusStore, XenError> {
        let evt = |what| EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| XenError::os(what, &e));
        let shared = Arc::new(Shared {
            conn,
            write_lock: Mutex::new(()),
            state: Mutex::new(State::default()),
            replied: Condvar::new(),
            watch_evt: evt("xenstore: watch eventfd")?,
            next_req_id: AtomicU32::new(1),
            write_errors_fatal,
        });
        let receive = match inline {
            Some(reader) => Receive::Inline(Mutex::new(reader)),
            None => {
                let stop = evt("xenstore: stop eventfd")?;
                let stop_reader = stop.try_clone().map_err(|e| XenError::os("xenstore: dup eventfd", &e))?;
                let reader_shared = Arc::clone(&shared);
                let handle = std::thread::Builder::new()
                    .name("xenstore-reader".into())
                    .spawn(move || reader_loop(&reader_shared, &stop_reader))
                    .map_err(|e| XenError::os("xenstore: spawn reader thread", &e))?;
                Receive::Thread { stop, handle: Some(handle) }
            }
        };
        tracing::debug!(?transport, inline = matches!(receive, Receive::Inline(_)), "xenstore connected");
        Ok(XenBusStore { shared, receive, transport, timeout: DEFAULT_REQUEST_TIMEOUT, in_flight: None })
    }

    /// Keep at most one request in flight (`true`) or pipeline requests from concurrent callers (`false`).
    /// [`XenBusStore::open_device`] turns it on (see the [module documentation](self)); sockets default to off.
    pub fn with_one_request_in_flight(mut self, one: bool) -> XenBusStore {
        self.in_flight = one.then(|| Mutex::new(()));
        self
    }

    /// Wait at most `timeout` for each reply (default [`DEFAULT_REQUEST_TIMEOUT`]).
    pub fn with_request_timeout(mut self, timeout: Duration) -> XenBusStore {
        self.timeout = timeout;
        self
    }

    /// The connection in use.
    pub fn transport(&self) -> &XsTransport {
        &self.transport
    }

    /// `XS_GET_DOMAIN_PATH`: the home path of a domain (`/local/domain/<domid>`).
    pub fn get_domain_path(&self, domid: crate::services::DomId) -> Result<String, XenError> {
        let reply = self.call(MsgType::GET_DOMAIN_PATH, TxId::NONE, domid.to_string().as_bytes(), &[], "")?;
        let path = reply.split(|&b| b == 0).next().unwrap_or_default();
        String::from_utf8(path.to_vec())
            .map_err(|_| XenError::Protocol { what: WHAT, detail: "domain path is not UTF-8".into() })
    }

    /// Send one request and wait for its reply payload. `strings` are sent NUL-terminated, then `tail` as is;
    /// `path` names the node in errors.
    fn call(&self, ty: MsgType, tx: TxId, first: &[u8], rest: &[&[u8]], path: &str) -> Result<Vec<u8>, XenError> {
        let mut strings = vec![first];
        strings.extend_from_slice(rest);
        self.call_raw(ty, tx, &wire::join_payload(&strings, b""), path)
    }

    fn call_raw(&self, ty: MsgType, tx: TxId, payload: &[u8], path: &str) -> Result<Vec<u8>, XenError> {
        let op = || format!("xenstore {ty:?} {path}");
        if payload.len() > REQUEST_PAYLOAD_MAX {
            return Err(XenError::Os {
                what: format!("{}: request of {} bytes", op(), payload.len()),
                errno: libc::E2BIG,
            });
        }
        let _in_flight = self.in_flight.as_ref().map(lock_ignoring_poison);
        // Inline: the reader is held from sending the request until its reply, which serializes the callers.
        let mut reader = match &self.receive {
            Receive::Inline(reader) => Some(lock_ignoring_poison(reader)),
            Receive::Thread { .. } => None,
        };
        let req_id = self.shared.register_request()?;
        if let Err(e) = self.shared.send(&wire::encode_message(ty, req_id, tx.0, payload)) {
            self.shared.lock().pending.remove(&req_id);
            return Err(e);
        }
        let frame = self.shared.wait_reply(req_id, self.timeout, &op, reader.as_deref_mut())?;
        match frame.header.ty {
            t if t == ty => Ok(frame.payload),
            MsgType::ERROR => Err(match wire::parse_error(&frame.payload) {
                Ok(libc::ENOENT) => XenError::NotFound { path: path.to_owned() },
                Ok(libc::EAGAIN) => XenError::Again,
                Ok(libc::EACCES) => XenError::Access { what: op() },
                Ok(errno) => XenError::Os { what: op(), errno },
                Err(name) => XenError::Os { what: format!("{}: xenstored error {name}", op()), errno: libc::EIO },
            }),
            other => Err(XenError::Protocol { what: WHAT, detail: format!("{}: reply of type {other:?}", op()) }),
        }
    }

    fn call_ok(&self, ty: MsgType, tx: TxId, first: &[u8], rest: &[&[u8]], path: &str) -> Result<(), XenError> {
        let reply = self.call(ty, tx, first, rest, path)?;
        wire::parse_ok(&reply).map_err(|e| protocol(path, e))
    }
}

fn lock_ignoring_poison<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn protocol(path: &str, e: wire::WireError) -> XenError {
    XenError::Protocol { what: WHAT, detail: format!("{path}: {e}") }
}

fn check(what: &'static str, s: &str, allow_empty: bool) -> Result<(), XenError> {
    wire::check_request_string(what, s, allow_empty)
        .map_err(|e| XenError::Os { what: format!("xenstore: {e}"), errno: libc::EINVAL })
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State inconsistent in a way that matters: keep going.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn register_request(&self) -> Result<u32, XenError> {
        let mut state = self.lock();
        if let Some(e) = &state.broken {
            return Err(e.clone());
        }
        loop {
            let id = self.next_req_id.fetch_add(1, Ordering::Relaxed);
            if let std::collections::hash_map::Entry::Vacant(slot) = state.pending.entry(id) {
                slot.insert(None);
                return Ok(id);
            }
        }
    }

    fn send(&self, message: &[u8]) -> Result<(), XenError> {
        let _guard = self.write_lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut rest = message;
        while !rest.is_empty() {
            match (&self.conn).write(rest) {
                Ok(0) => return Err(self.write_failed(&io::Error::from(io::ErrorKind::WriteZero))),
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    poll_one(self.conn.as_raw_fd(), libc::POLLOUT, None).map_err(|e| self.write_failed(&e))?;
                }
                Err(e) => return Err(self.write_failed(&e)),
            }
        }
        Ok(())
    }

    fn write_failed(&self, err: &io::Error) -> XenError {
        if self.write_errors_fatal {
            let e = XenError::Disconnected { what: WHAT };
            self.fail_all(e.clone());
            tracing::warn!(%err, "xenstore: write failed, connection lost");
            e
        } else {
            XenError::os("xenstore: write request", err)
        }
    }

    /// Wait for the reply to `req_id`: woken by the reader thread, or reading the connection with `reader`.
    fn wait_reply(
        &self,
        req_id: u32,
        timeout: Duration,
        op: &dyn Fn() -> String,
        mut reader: Option<&mut XsReader>,
    ) -> Result<Frame, XenError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if let Some(Some(_)) = state.pending.get(&req_id) {
                if let Some(Some(frame)) = state.pending.remove(&req_id) {
                    return Ok(frame);
                }
            }
            if let Some(e) = &state.broken {
                let e = e.clone();
                state.pending.remove(&req_id);
                return Err(e);
            }
            let now = Instant::now();
            if now >= deadline {
                state.pending.remove(&req_id);
                return Err(XenError::Os {
                    what: format!("{}: no reply in {timeout:?}", op()),
                    errno: libc::ETIMEDOUT,
                });
            }
            state = match reader.as_deref_mut() {
                Some(reader) => {
                    drop(state);
                    // Finished means the connection broke: `broken` is set, checked above on the next turn.
                    let _: Received = reader.receive_within(self, deadline - now);
                    self.lock()
                }
                None => match self.replied.wait_timeout(state, deadline - now) {
                    Ok((guard, _)) => guard,
                    Err(poisoned) => poisoned.into_inner().0,
                },
            };
        }
    }

    /// Break the connection for good: wake every waiter and the watch fd.
    fn fail_all(&self, err: XenError) {
        let mut state = self.lock();
        if state.broken.is_none() {
            state.broken = Some(err);
        }
        drop(state);
        self.replied.notify_all();
        let _ = self.watch_evt.write(1);
    }

    fn dispatch(&self, frame: Frame) {
        if frame.header.ty == MsgType::WATCH_EVENT {
            match wire::parse_watch_event(&frame.payload) {
                Ok(event) => self.queue_event(event),
                Err(e) => tracing::warn!(%e, "xenstore: dropping malformed watch event"),
            }
            return;
        }
        let req_id = frame.header.req_id;
        let mut state = self.lock();
        match state.pending.get_mut(&req_id) {
            Some(slot @ None) => {
                *slot = Some(frame);
                drop(state);
                self.replied.notify_all();
            }
            _ => tracing::warn!(req_id, ty = ?frame.header.ty, "xenstore: dropping a reply nobody waits for"),
        }
    }

    fn queue_event(&self, event: WatchEvent) {
        let mut state = self.lock();
        if state.events.len() >= MAX_QUEUED_WATCH_EVENTS {
            tracing::warn!(queued = state.events.len(), "xenstore: watch queue overflow, asking consumers to rescan");
            let rescan: VecDeque<WatchEvent> = state
                .watches
                .iter()
                .map(|(path, token)| WatchEvent { path: path.clone(), token: token.clone() })
                .collect();
            state.events = rescan;
        }
        state.events.push_back(event);
        // Written under the lock so that the eventfd is readable exactly while the queue is not empty.
        let _ = self.watch_evt.write(1);
    }
}

impl Drop for XenBusStore {
    fn drop(&mut self) {
        if let Receive::Thread { stop, handle } = &mut self.receive {
            let _ = stop.write(1);
            if let Some(reader) = handle.take() {
                if reader.join().is_err() {
                    tracing::error!("xenstore: reader thread panicked");
                }
            }
        }
    }
}

impl XenStore for XenBusStore {
    fn read(&self, tx: TxId, path: &str) -> Result<Vec<u8>, XenError> {
        check("path", path, false)?;
        self.call(MsgType::READ, tx, path.as_bytes(), &[], path)
    }

    fn write(&self, tx: TxId, path: &str, value: &[u8]) -> Result<(), XenError> {
        check("path", path, false)?;
        let reply = self.call_raw(MsgType::WRITE, tx, &wire::join_payload(&[path.as_bytes()], value), path)?;
        wire::parse_ok(&reply).map_err(|e| protocol(path, e))
    }

    fn mkdir(&self, tx: TxId, path: &str) -> Result<(), XenError> {
        check("path", path, false)?;
        self.call_ok(MsgType::MKDIR, tx, path.as_bytes(), &[], path)
    }

    fn rm(&self, tx: TxId, path: &str) -> Result<(), XenError> {
        check("path", path, false)?;
        self.call_ok(MsgType::RM, tx, path.as_bytes(), &[], path)
    }

    fn directory(&self, tx: TxId, path: &str) -> Result<Vec<String>, XenError> {
        check("path", path, false)?;
        let reply = self.call(MsgType::DIRECTORY, tx, path.as_bytes(), &[], path)?;
        let (names, skipped) = wire::parse_directory(&reply);
        if skipped > 0 {
            tracing::warn!(path, skipped, "xenstore: skipped invalid child names");
        }
        Ok(names)
    }

    fn get_perms(&self, tx: TxId, path: &str) -> Result<Vec<Permission>, XenError> {
        check("path", path, false)?;
        let reply = self.call(MsgType::GET_PERMS, tx, path.as_bytes(), &[], path)?;
        wire::parse_perms(&reply).map_err(|e| protocol(path, e))
    }

    fn set_perms(&self, tx: TxId, path: &str, perms: &[Permission]) -> Result<(), XenError> {
        check("path", path, false)?;
        if perms.is_empty() {
            return Err(XenError::Os { what: format!("xenstore set_perms {path}: empty list"), errno: libc::EINVAL });
        }
        let reply = self.call_raw(MsgType::SET_PERMS, tx, &wire::set_perms_payload(path, perms), path)?;
        wire::parse_ok(&reply).map_err(|e| protocol(path, e))
    }

    fn transaction_start(&self) -> Result<TxId, XenError> {
        let reply = self.call(MsgType::TRANSACTION_START, TxId::NONE, b"", &[], "(transaction)")?;
        wire::parse_tx_id(&reply).map(TxId).map_err(|e| protocol("(transaction)", e))
    }

    fn transaction_end(&self, tx: TxId, commit: bool) -> Result<(), XenError> {
        if tx == TxId::NONE {
            return Err(XenError::Os { what: "xenstore transaction_end: no transaction".into(), errno: libc::EINVAL });
        }
        let flag: &[u8] = if commit { b"T" } else { b"F" };
        self.call_ok(MsgType::TRANSACTION_END, tx, flag, &[], "(transaction)")
    }

    fn watch(&self, path: &str, token: &str) -> Result<(), XenError> {
        check("path", path, false)?;
        check("token", token, true)?;
        self.call_ok(MsgType::WATCH, TxId::NONE, path.as_bytes(), &[token.as_bytes()], path)?;
        self.shared.lock().watches.push((path.to_owned(), token.to_owned()));
        Ok(())
    }

    fn unwatch(&self, path: &str, token: &str) -> Result<(), XenError> {
        check("path", path, false)?;
        check("token", token, true)?;
        self.call_ok(MsgType::UNWATCH, TxId::NONE, path.as_bytes(), &[token.as_bytes()], path)?;
        let mut state = self.shared.lock();
        if let Some(i) = state.watches.iter().position(|(p, t)| p == path && t == token) {
            state.watches.swap_remove(i);
        }
        Ok(())
    }

    fn watch_fd(&self) -> RawFd {
        self.shared.watch_evt.as_raw_fd()
    }

    fn take_watch_events(&self, out: &mut Vec<WatchEvent>) -> Result<(), XenError> {
        if let Receive::Inline(reader) = &self.receive {
            // A caller waiting for its reply holds the reader (and queues what it reads): never wait for it.
            match reader.try_lock() {
                Ok(mut reader) => reader.drain(&self.shared),
                Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner().drain(&self.shared),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
        }
        let mut state = self.shared.lock();
        if state.events.is_empty() {
            if let Some(e) = &state.broken {
                return Err(e.clone());
            }
        }
        out.extend(state.events.drain(..));
        if state.broken.is_none() {
            // Reset the eventfd under the lock: it is readable again only when a new event is queued.
            let _ = self.shared.watch_evt.read();
        }
        Ok(())
    }
}
