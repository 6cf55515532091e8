// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The real xenstore client (`transport_xen::xen::XenBusStore`) against a hostile xenstored: the harness, on the
//! other end of a socket pair, answers each request with fuzzed bytes (echoed or forged replies, error replies,
//! watch events, frames with forged ids and types, unframed garbage, oversized headers).
//!
//! Layout: up to [`MAX_STEPS`] steps, each `u8 op`, `u8 value_len` + value (the `XS_WRITE` value), `u8 n` and
//! `n` (at most 8) pieces: `u8 kind`, then by `kind % 5`: 0 reply (the request's type and id) with `u16`-length
//! payload; 1 `XS_ERROR` reply with payload; 2 watch event with `u32 req_id` and payload; 3 frame with `u32 type`,
//! `u32 req_id`, `u32 tx_id` and payload; 4 raw bytes (`u16` length).
//!
//! The peer sends a step's bytes up to the end of the first frame the client must take as the reply (a frame
//! that is no watch event and carries the request's id), and hangs up when a step has none. A model decoder on the
//! peer's side says what the client must see.
//!
//! Invariants: every call returns exactly what the reply frame says (the value, the parsed list, the mapped
//! error), or the connection error when there was no reply; the client never hangs, never panics, sends exactly
//! one request per call, of the call's type, transaction and next request id, never larger than
//! `REQUEST_PAYLOAD_MAX`; every valid watch event the peer sent is delivered, in order.
//!
//! Speed: one thread. The client is a store read by its caller's thread (`XenBusStore::from_stream_inline`: the same
//! decoder, reply matching, watch queue and error handling as the daemon's store with its reader thread, see
//! `transport_xen::xen::xenstore`), and the harness plays the peer on the same thread: before each call it writes the
//! step's answer into its end of the socket (non-blocking; then it shuts its sending side down if the answer has no
//! reply), the call finds the answer waiting, and after the call the harness reads the request the call sent (complete
//! by then) and checks it. The answer echoes the request's id before the request exists: the id is predicted, as the
//! store numbers a connection's requests 1, 2, 3, ... (an inline store has one in flight at a time, so none is still
//! pending when the next is numbered), and checked on the request. A wrong prediction fails the input (the id check,
//! after the call has missed its reply: a wrong outcome, or `HANG` waiting for a reply that never comes), so the checks
//! are those of a peer that reads the request first. No call ever waits for the peer (but in the fallback below): its
//! answer is complete in the socket before the call starts. An answer larger than the socket buffer (about 200 KiB on
//! Linux; an input of up to 4096 bytes never makes one) is finished by a thread of that call, which writes the rest
//! while the client reads and stops when the call returns. The client's `XsReader` and the peer's buffers serve every
//! input of the process; an input only gets a new socket pair and store: nothing it can observe outlives it. About 6000
//! to 6500 executions per second of CPU time (`FUZZ_SECONDS=30 fuzz/run-smoke xenstore_peer`, 2 loaded cores), against
//! 3800 to 4600 with a peer thread answering each call.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use transport_xen::services::{PermAccess, Permission, TxId, WatchEvent, XenError, XenStore};
use transport_xen::xen::wire::{
    encode_message, errno_from_name, parse_directory, parse_ok, parse_perms, parse_tx_id, parse_watch_event, Frame,
    FrameDecoder, Header, MsgType, REQUEST_PAYLOAD_MAX,
};
use transport_xen::xen::xenstore::{XsReader, MAX_QUEUED_WATCH_EVENTS};
use transport_xen::xen::XenBusStore;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::input::{Reader, Writer};

/// Most steps one input runs.
pub const MAX_STEPS: usize = 24;
/// Longest any call may take before the client counts as hung.
const HANG: Duration = Duration::from_secs(20);
const PATH: &str = "/local/domain/7/device/vbd/51712/state";
const TOKEN: &str = "fuzz-token";
const OPS: u8 = 12;

/// One client call (the operation and the `XS_WRITE` value) and the peer's answer, borrowed from the input.
#[derive(Debug, Default)]
struct Step<'a> {
    op: u8,
    value: &'a [u8],
    pieces: Vec<Piece<'a>>,
}

fn op_type(op: u8) -> MsgType {
    [
        MsgType::READ,
        MsgType::WRITE,
        MsgType::MKDIR,
        MsgType::RM,
        MsgType::DIRECTORY,
        MsgType::GET_PERMS,
        MsgType::SET_PERMS,
        MsgType::TRANSACTION_START,
        MsgType::TRANSACTION_END,
        MsgType::WATCH,
        MsgType::UNWATCH,
        MsgType::GET_DOMAIN_PATH,
    ][usize::from(op % OPS)]
}

/// The transaction of `op`'s request.
fn op_tx(op: u8) -> TxId {
    match op % OPS {
        3 => TxId(3),
        8 => TxId(5),
        _ => TxId::NONE,
    }
}

/// What the peer's model says about one step.
#[derive(Debug)]
enum Seen {
    /// The client must take this frame as the reply.
    Reply(Frame),
    /// The connection is gone: closed (`false`) or broken by an oversized header (`true`).
    Broken(bool),
}

/// A call's result, normalized for comparison.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Bytes(Vec<u8>),
    Names(Vec<String>),
    Perms(Vec<Permission>),
    Tx(u32),
    Unit,
    NotFound,
    Again,
    Access,
    Os(i32),
    Protocol,
    Disconnected,
    /// A kind of error this model does not know (it never expects one, so meeting it fails the input).
    Unmodelled,
}

fn from_error(e: &XenError) -> Outcome {
    match e {
        XenError::NotFound { .. } => Outcome::NotFound,
        XenError::Again => Outcome::Again,
        XenError::Access { .. } => Outcome::Access,
        XenError::Os { errno, .. } => Outcome::Os(*errno),
        XenError::Protocol { .. } => Outcome::Protocol,
        XenError::Disconnected { .. } => Outcome::Disconnected,
        _ => Outcome::Unmodelled,
    }
}

fn outcome<T>(r: Result<T, XenError>, ok: impl FnOnce(T) -> Outcome) -> Outcome {
    r.map_or_else(|e| from_error(&e), ok)
}

fn call(store: &XenBusStore, step: &Step<'_>) -> Outcome {
    let perms = [Permission { domid: 0, access: PermAccess::Both }, Permission { domid: 7, access: PermAccess::Read }];
    match step.op % OPS {
        0 => outcome(store.read(TxId::NONE, PATH), Outcome::Bytes),
        1 => outcome(store.write(TxId::NONE, PATH, step.value), |()| Outcome::Unit),
        2 => outcome(store.mkdir(TxId::NONE, PATH), |()| Outcome::Unit),
        3 => outcome(store.rm(op_tx(step.op), PATH), |()| Outcome::Unit),
        4 => outcome(store.directory(TxId::NONE, PATH), Outcome::Names),
        5 => outcome(store.get_perms(TxId::NONE, PATH), Outcome::Perms),
        6 => outcome(store.set_perms(TxId::NONE, PATH, &perms), |()| Outcome::Unit),
        7 => outcome(store.transaction_start(), |t| Outcome::Tx(t.0)),
        8 => outcome(store.transaction_end(op_tx(step.op), step.value.is_empty()), |()| Outcome::Unit),
        9 => outcome(store.watch(PATH, TOKEN), |()| Outcome::Unit),
        10 => outcome(store.unwatch(PATH, TOKEN), |()| Outcome::Unit),
        _ => outcome(store.get_domain_path(7), |p| Outcome::Bytes(p.into_bytes())),
    }
}

/// What the client must return for `op` given the reply frame.
fn expected(op: u8, reply: &Frame) -> Outcome {
    let ty = op_type(op);
    let payload = &reply.payload;
    if reply.header.ty == MsgType::ERROR {
        let name = payload.split(|&b| b == 0).next().unwrap_or_default();
        return match errno_from_name(name) {
            Some(libc::ENOENT) => Outcome::NotFound,
            Some(libc::EAGAIN) => Outcome::Again,
            Some(libc::EACCES) => Outcome::Access,
            Some(errno) => Outcome::Os(errno),
            None => Outcome::Os(libc::EIO),
        };
    }
    if reply.header.ty != ty {
        return Outcome::Protocol;
    }
    let unit = |ok: bool| if ok { Outcome::Unit } else { Outcome::Protocol };
    match op % OPS {
        0 => Outcome::Bytes(payload.clone()),
        4 => Outcome::Names(parse_directory(payload).0),
        5 => parse_perms(payload).map_or(Outcome::Protocol, Outcome::Perms),
        7 => parse_tx_id(payload).map_or(Outcome::Protocol, Outcome::Tx),
        11 => {
            let path = payload.split(|&b| b == 0).next().unwrap_or_default();
            std::str::from_utf8(path).map_or(Outcome::Protocol, |p| Outcome::Bytes(p.as_bytes().to_vec()))
        }
        _ => unit(parse_ok(payload).is_ok()),
    }
}

/// Decode the next step into `step` (its piece list is reused); `false` at the end of the input.
fn next_step<'a>(r: &mut Reader<'a>, step: &mut Step<'a>) -> bool {
    if r.is_empty() {
        return false;
    }
    step.op = r.u8();
    step.value = r.short_bytes();
    let n = usize::from(r.u8() % 9);
    step.pieces.clear();
    for _ in 0..n {
        let piece = match r.u8() % 5 {
            0 => Piece::Reply(r.long_bytes()),
            1 => Piece::Error(r.long_bytes()),
            2 => Piece::Event(r.u32(), r.long_bytes()),
            3 => Piece::Frame(r.u32(), r.u32(), r.u32(), r.long_bytes()),
            _ => Piece::Raw(r.long_bytes()),
        };
        step.pieces.push(piece);
    }
    true
}

/// One piece of a step's answer.
#[derive(Clone, Copy, Debug)]
enum Piece<'a> {
    Reply(&'a [u8]),
    Error(&'a [u8]),
    Event(u32, &'a [u8]),
    Frame(u32, u32, u32, &'a [u8]),
    Raw(&'a [u8]),
}

/// Append one message to `out` (as `wire::encode_message`, without a vector per message).
fn push_message(out: &mut Vec<u8>, ty: MsgType, req_id: u32, tx_id: u32, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&Header { ty, req_id, tx_id, len }.encode());
    out.extend_from_slice(payload);
}

/// The peer's answer to one step: its bytes into `out`, and what the client must see. `id` is the id the request
/// carries (predicted, checked by [`check_request`] after the call). The bytes end with the first frame the client
/// must take as the reply (a frame that is no watch event and carries the request's id): nothing follows it, as
/// nothing from a real xenstored can follow before the next request. Every valid watch event before it goes to
/// `events`.
fn answer(step: &Step<'_>, id: u32, out: &mut Vec<u8>, events: &mut Vec<WatchEvent>) -> Seen {
    let ty = op_type(step.op);
    let tx = op_tx(step.op).0;
    let mut model = FrameDecoder::new();
    out.clear();
    for &piece in &step.pieces {
        let start = out.len();
        match piece {
            Piece::Reply(p) => push_message(out, ty, id, tx, p),
            Piece::Error(p) => push_message(out, MsgType::ERROR, id, tx, p),
            Piece::Event(req_id, p) => push_message(out, MsgType::WATCH_EVENT, req_id, 0, p),
            Piece::Frame(t, req_id, tx_id, p) => push_message(out, MsgType(t), req_id, tx_id, p),
            Piece::Raw(p) => out.extend_from_slice(p),
        }
        model.push(&out[start..]);
        loop {
            match model.next_frame() {
                Ok(Some(frame)) => {
                    if frame.header.ty == MsgType::WATCH_EVENT {
                        if let Ok(ev) = parse_watch_event(&frame.payload) {
                            events.push(ev);
                        }
                    } else if frame.header.req_id == id {
                        // Send nothing after the reply.
                        out.truncate(out.len() - model.buffered());
                        return Seen::Reply(frame);
                    }
                }
                Ok(None) => break,
                Err(_) => return Seen::Broken(true),
            }
        }
    }
    Seen::Broken(false)
}

/// Write as much of `bytes` as the socket takes without waiting; how much it took.
fn write_some(sock: &UnixStream, bytes: &[u8]) -> usize {
    let mut done = 0;
    while done < bytes.len() {
        match (&*sock).write(&bytes[done..]) {
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("peer: write failed: {e}"),
        }
    }
    done
}

/// The fallback peer thread of a step whose answer does not fit the socket buffer: write `rest` as the client
/// reads, then hang up if `close`. Returns whether everything was written; stops early when `cancel` fires (the
/// client's call has returned without reading everything, which a broken connection allows).
fn write_rest(sock: &UnixStream, mut rest: &[u8], close: bool, cancel: &EventFd) -> bool {
    while !rest.is_empty() {
        let mut fds = [
            libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLOUT, revents: 0 },
            libc::pollfd { fd: cancel.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is an array of two valid pollfds that outlives the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            assert_eq!(err.kind(), ErrorKind::Interrupted, "peer: poll failed: {err}");
            continue;
        }
        if fds[1].revents != 0 {
            return false;
        }
        rest = &rest[write_some(sock, rest)..];
    }
    if close {
        sock.shutdown(Shutdown::Write).expect("peer: shutdown");
    }
    true
}

/// Make the client's call for `step` while the peer's answer `out` waits in the socket: written into the socket
/// before the call (the client finds it there, no thread switch), and if it does not fit in the socket buffer, the
/// rest by a thread of this call while the client reads. Then hang up if `close`. Returns the call's outcome and
/// whether the client was given every byte of `out`.
fn call_answered(store: &XenBusStore, sock: &UnixStream, step: &Step<'_>, out: &[u8], close: bool) -> (Outcome, bool) {
    let written = write_some(sock, out);
    if written == out.len() {
        if close {
            sock.shutdown(Shutdown::Write).expect("peer: shutdown");
        }
        return (call(store, step), true);
    }
    /// Fires `cancel` when the call is over, also when it panicked (the scope joins the writer before the panic
    /// goes on).
    struct Cancel<'a>(&'a EventFd);
    impl Drop for Cancel<'_> {
        fn drop(&mut self) {
            self.0.write(1).expect("eventfd write");
        }
    }
    let cancel = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    std::thread::scope(|s| {
        let writer = s.spawn(|| write_rest(sock, &out[written..], close, &cancel));
        let got = {
            let _cancel = Cancel(&cancel);
            call(store, step)
        };
        (got, writer.join().expect("peer writer thread"))
    })
}

/// Read the request the client sent for `step` and check it: exactly one message, of the step's type, with the
/// predicted request id and the call's transaction, no larger than `REQUEST_PAYLOAD_MAX`.
///
/// Everything the call sent is in the socket when it returns (a unix stream queues a `send` at the receiver
/// before returning), and one `read` of a unix stream takes everything queued up to the buffer's size: a read
/// that does not fill the buffer has taken all of it, so no second read (which would only say `EAGAIN`) is needed.
fn check_request(sock: &UnixStream, requests: &mut FrameDecoder, buf: &mut [u8], step: &Step<'_>, id: u32) {
    loop {
        match (&*sock).read(buf) {
            Ok(0) => panic!("client closed the connection"),
            Ok(n) => {
                requests.push(&buf[..n]);
                if n < buf.len() {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("peer: read failed: {e}"),
        }
    }
    let request = match requests.next_frame() {
        Ok(Some(f)) => f,
        Ok(None) => panic!("client returned from op {} without sending its whole request", step.op % OPS),
        Err(e) => panic!("client sent an oversized request: {e}"),
    };
    assert_eq!(request.header.ty, op_type(step.op), "client sent the wrong request type");
    assert_eq!(request.header.req_id, id, "client's request id is not the next one");
    assert_eq!(request.header.tx_id, op_tx(step.op).0, "client sent the wrong transaction");
    assert!(request.payload.len() <= REQUEST_PAYLOAD_MAX, "request of {} bytes", request.payload.len());
    assert_eq!(requests.buffered(), 0, "client sent more than one request in a call");
}

/// What one process keeps for every input: the client's reader, handed from one input's store to the next, and the
/// peer's buffers (no bytes carry over: `buf` is only read into, `out` is cleared per step).
struct Fixture {
    reader: Option<XsReader>,
    buf: Vec<u8>,
    out: Vec<u8>,
}

thread_local! {
    static FIXTURE: std::cell::RefCell<Fixture> =
        std::cell::RefCell::new(Fixture { reader: None, buf: vec![0; 8192], out: Vec::new() });
}

/// Run one input.
pub fn run(data: &[u8]) {
    FIXTURE.with(|f| run_with(&mut f.borrow_mut(), data));
}

fn run_with(fixture: &mut Fixture, data: &[u8]) {
    let mut input = Reader::new(data);
    let mut step = Step::default();
    let (client, server) = UnixStream::pair().expect("socket pair");
    server.set_nonblocking(true).expect("non-blocking peer");
    let reader = fixture.reader.take().unwrap_or_default();
    let store = XenBusStore::from_stream_inline(client, reader).expect("client").with_request_timeout(HANG);

    let mut sent_events = Vec::new();
    let mut requests = FrameDecoder::new();
    let mut broken = false;
    for i in 0..MAX_STEPS {
        if !next_step(&mut input, &mut step) {
            break;
        }
        // A new connection's requests are numbered from 1, one in flight at a time.
        let id = u32::try_from(i + 1).expect("request id");
        let seen = answer(&step, id, &mut fixture.out, &mut sent_events);
        let (got, all_sent) = call_answered(&store, &server, &step, &fixture.out, matches!(seen, Seen::Broken(_)));
        check_request(&server, &mut requests, &mut fixture.buf, &step, id);
        match seen {
            Seen::Reply(frame) => {
                let want = expected(step.op, &frame);
                assert_eq!(got, want, "op {} with reply {frame:?}", step.op % OPS);
                assert!(all_sent, "client returned before reading its reply");
            }
            Seen::Broken(oversized) => {
                let want = if oversized { Outcome::Protocol } else { Outcome::Disconnected };
                assert_eq!(got, want, "op {} on a dead connection", step.op % OPS);
                assert!(all_sent || oversized, "client returned before reading the end of the connection");
                broken = true;
                break;
            }
        }
    }
    drop(server);

    // The peer has closed: collect every event until the client reports the loss.
    let mut events = Vec::new();
    let deadline = Instant::now() + HANG;
    loop {
        match store.take_watch_events(&mut events) {
            Err(e) => {
                let e = from_error(&e);
                assert!(e == Outcome::Disconnected || e == Outcome::Protocol, "connection loss reported as {e:?}");
                break;
            }
            Ok(()) => {
                assert!(Instant::now() < deadline, "client never noticed the closed connection");
                let mut pfd = libc::pollfd { fd: store.watch_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, 100) };
            }
        }
    }
    if sent_events.len() < MAX_QUEUED_WATCH_EVENTS {
        assert_eq!(events, sent_events, "watch events lost, invented or reordered (broken: {broken})");
    }
    fixture.reader = store.into_reader();
}

fn step(w: &mut Writer, op: u8, value: &[u8], pieces: &[Piece<'_>]) {
    w.u8(op).short_bytes(value).u8(pieces.len() as u8);
    for &p in pieces {
        match p {
            Piece::Reply(b) => w.u8(0).long_bytes(b),
            Piece::Error(b) => w.u8(1).long_bytes(b),
            Piece::Event(id, b) => w.u8(2).u32(id).long_bytes(b),
            Piece::Frame(ty, id, tx, b) => w.u8(3).u32(ty).u32(id).u32(tx).long_bytes(b),
            Piece::Raw(b) => w.u8(4).long_bytes(b),
        };
    }
}

/// Seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    let ok = || Piece::Reply(b"OK\0");
    let event = |p: &'static [u8]| Piece::Event(0, p);
    let mut out = Vec::new();

    let mut w = Writer::new();
    step(&mut w, 0, b"", &[Piece::Reply(b"4")]);
    step(&mut w, 1, b"5", &[ok()]);
    step(&mut w, 2, b"", &[ok()]);
    step(&mut w, 3, b"", &[Piece::Error(b"ENOENT\0")]);
    step(&mut w, 4, b"", &[Piece::Reply(b"51712\0..\0a/b\0")]);
    step(&mut w, 5, b"", &[Piece::Reply(b"b0\0r7\0")]);
    step(&mut w, 6, b"", &[ok()]);
    step(&mut w, 7, b"", &[Piece::Reply(b"12\0")]);
    step(&mut w, 8, b"", &[Piece::Error(b"EAGAIN\0")]);
    step(&mut w, 9, b"", &[event(b"/local/domain/7/device/vbd/51712/state\0fuzz-token\0"), ok()]);
    step(&mut w, 10, b"", &[ok()]);
    step(&mut w, 11, b"", &[Piece::Reply(b"/local/domain/7\0")]);
    out.push(w.finish());

    let mut w = Writer::new();
    step(&mut w, 0, b"", &[Piece::Frame(2, 99, 0, b"stale"), event(b"/a\0t\0"), Piece::Reply(b"v")]);
    step(&mut w, 0, b"", &[Piece::Frame(4, 2, 0, b"wrong type")]);
    step(&mut w, 7, b"", &[Piece::Reply(b"0\0")]);
    step(&mut w, 0, b"", &[Piece::Error(b"EQUOTA\0")]);
    step(&mut w, 0, b"", &[event(b"/a\0\xff\0"), Piece::Raw(&[2, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0])]);
    out.push(w.finish());

    let mut oversized = encode_message(MsgType::READ, 1, 0, b"");
    oversized[12..16].copy_from_slice(&5000u32.to_ne_bytes());
    let mut w = Writer::new();
    step(&mut w, 4, b"", &[event(b"/x\0y\0"), Piece::Raw(&oversized)]);
    out.push(w.finish());

    let mut w = Writer::new();
    step(&mut w, 1, b"value", &[Piece::Raw(&encode_message(MsgType::WRITE, 1, 0, b"OK")[..10])]);
    out.push(w.finish());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` stale replies of 4000 bytes each (dropped by the client) and one watch event.
    fn stale_replies(n: usize) -> Vec<u8> {
        let mut raw = Vec::new();
        for i in 0..n {
            raw.extend(encode_message(MsgType::READ, 1000 + i as u32, 0, &[b'x'; 4000]));
        }
        raw.extend(encode_message(MsgType::WATCH_EVENT, 0, 0, b"/big\0t\0"));
        raw
    }

    /// Answers larger than the socket buffer go through the fallback writer thread: finished with a reply, with a
    /// hang-up, and with an oversized header (after which the client reads no more).
    #[test]
    fn answers_larger_than_the_socket_buffer() {
        let stale = stale_replies(16);
        let big = [Piece::Raw(&stale); 7];
        assert!(7 * stale.len() > 400_000);

        let mut w = Writer::new();
        step(&mut w, 0, b"", &[&big[..], &[Piece::Reply(b"v")]].concat());
        step(&mut w, 1, b"x", &[Piece::Reply(b"OK\0")]);
        step(&mut w, 4, b"", &big);
        run(&w.finish());

        let mut oversized = encode_message(MsgType::READ, 1, 0, b"");
        oversized[12..16].copy_from_slice(&5000u32.to_ne_bytes());
        oversized.resize(60_000, 0);
        let mut w = Writer::new();
        step(&mut w, 0, b"", &[&big[..], &[Piece::Raw(&oversized)]].concat());
        run(&w.finish());
    }
}
