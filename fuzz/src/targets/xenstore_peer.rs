// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The real xenstore client (`transport_xen::xen::XenBusStore`) against a hostile xenstored: a peer thread on the
//! other end of a socket pair answers each request with fuzzed bytes (echoed or forged replies, error replies,
//! watch events, frames with forged ids and types, unframed garbage, oversized headers).
//!
//! Layout: up to [`MAX_STEPS`] steps, each `u8 op`, `u8 value_len` + value (the `XS_WRITE` value), `u8 n` and
//! `n` (at most 8) pieces: `u8 kind`, then by `kind % 5`: 0 reply (the request's type and id) with `u16`-length
//! payload; 1 `XS_ERROR` reply with payload; 2 watch event with `u32 req_id` and payload; 3 frame with `u32 type`,
//! `u32 req_id`, `u32 tx_id` and payload; 4 raw bytes (`u16` length).
//!
//! The peer sends a step's bytes up to the end of the first frame the client must take as the reply (a frame
//! that is no watch event and carries the request's id), and closes the connection when a step has none. A model
//! decoder on the peer's side says what the client must see.
//!
//! Invariants: every call returns exactly what the reply frame says (the value, the parsed list, the mapped
//! error), or the connection error when there was no reply; the client never hangs, never panics, never sends a
//! request larger than `REQUEST_PAYLOAD_MAX`; every valid watch event the peer sent is delivered, in order.
//!
//! Speed: the client is a store read by its caller's thread (`XenBusStore::from_stream_inline`: the same decoder,
//! reply matching, watch queue and error handling as the daemon's store with its reader thread, see
//! `transport_xen::xen::xenstore`), so a call is a round trip between two threads, not three; its `XsReader` and
//! the peer thread with its buffers serve every input of the process. An input only gets a new socket pair and
//! store: nothing it can observe outlives it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use transport_xen::services::{PermAccess, Permission, TxId, WatchEvent, XenError, XenStore};
use transport_xen::xen::wire::{
    encode_message, errno_from_name, parse_directory, parse_ok, parse_perms, parse_tx_id, parse_watch_event, Frame,
    FrameDecoder, MsgType, REQUEST_PAYLOAD_MAX,
};
use transport_xen::xen::xenstore::{XsReader, MAX_QUEUED_WATCH_EVENTS};
use transport_xen::xen::XenBusStore;

use crate::input::{Reader, Writer};

/// Most steps one input runs.
pub const MAX_STEPS: usize = 24;
/// Longest any call may take before the client counts as hung.
const HANG: Duration = Duration::from_secs(20);
const PATH: &str = "/local/domain/7/device/vbd/51712/state";
const TOKEN: &str = "fuzz-token";
const OPS: u8 = 12;

/// One client call: the operation and the `XS_WRITE` value.
#[derive(Clone, Debug)]
struct Step {
    op: u8,
    value: Vec<u8>,
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

fn call(store: &XenBusStore, step: &Step) -> Outcome {
    let perms = [Permission { domid: 0, access: PermAccess::Both }, Permission { domid: 7, access: PermAccess::Read }];
    match step.op % OPS {
        0 => outcome(store.read(TxId::NONE, PATH), Outcome::Bytes),
        1 => outcome(store.write(TxId::NONE, PATH, &step.value), |()| Outcome::Unit),
        2 => outcome(store.mkdir(TxId::NONE, PATH), |()| Outcome::Unit),
        3 => outcome(store.rm(TxId(3), PATH), |()| Outcome::Unit),
        4 => outcome(store.directory(TxId::NONE, PATH), Outcome::Names),
        5 => outcome(store.get_perms(TxId::NONE, PATH), Outcome::Perms),
        6 => outcome(store.set_perms(TxId::NONE, PATH, &perms), |()| Outcome::Unit),
        7 => outcome(store.transaction_start(), |t| Outcome::Tx(t.0)),
        8 => outcome(store.transaction_end(TxId(5), step.value.is_empty()), |()| Outcome::Unit),
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

/// The client's calls and the peer's script.
fn decode_steps(data: &[u8]) -> (Vec<Step>, Script) {
    let mut r = Reader::new(data);
    let mut steps = Vec::new();
    let mut script = Vec::new();
    while !r.is_empty() && steps.len() < MAX_STEPS {
        let op = r.u8();
        let value = r.short_bytes().to_vec();
        let n = usize::from(r.u8() % 9);
        let pieces = (0..n)
            .map(|_| match r.u8() % 5 {
                0 => Piece::Reply(r.long_bytes().to_vec()),
                1 => Piece::Error(r.long_bytes().to_vec()),
                2 => Piece::Event(r.u32(), r.long_bytes().to_vec()),
                3 => Piece::Frame(r.u32(), r.u32(), r.u32(), r.long_bytes().to_vec()),
                _ => Piece::Raw(r.long_bytes().to_vec()),
            })
            .collect();
        steps.push(Step { op, value });
        script.push((op, pieces));
    }
    (steps, script)
}

/// One piece of a step's answer.
#[derive(Clone, Debug)]
enum Piece {
    Reply(Vec<u8>),
    Error(Vec<u8>),
    Event(u32, Vec<u8>),
    Frame(u32, u32, u32, Vec<u8>),
    Raw(Vec<u8>),
}

/// What the peer thread reports to the input's thread.
#[derive(Debug)]
enum Report {
    /// What the client must see for the step just answered.
    Step(Seen),
    /// The peer has closed its end (its socket is dropped): every watch event it sent, in order.
    Done(Vec<WatchEvent>),
}

/// The peer thread's buffers, kept from one input to the next (they carry no bytes across: `requests` starts
/// empty for each input, `buf` is only read into, `out` is cleared per step).
struct PeerBuffers {
    buf: Vec<u8>,
    out: Vec<u8>,
}

/// The peer: read each request, check it, report what the client must see, answer; close at the end.
fn peer(mut sock: UnixStream, script: Script, reports: &mpsc::Sender<Report>, b: &mut PeerBuffers) -> Vec<WatchEvent> {
    let mut events = Vec::new();
    let mut requests = FrameDecoder::new();
    let mut model = FrameDecoder::new();
    for (op, pieces) in script {
        let request = loop {
            match requests.next_frame() {
                Ok(Some(f)) => break f,
                Ok(None) => {}
                Err(e) => panic!("client sent an oversized request: {e}"),
            }
            match sock.read(&mut b.buf) {
                // libFuzzer's timeout alarm (SIGALRM) may land on this thread.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Ok(0) | Err(_) => return events,
                Ok(n) => requests.push(&b.buf[..n]),
            }
        };
        assert_eq!(request.header.ty, op_type(op), "client sent the wrong request type");
        assert!(request.payload.len() <= REQUEST_PAYLOAD_MAX, "request of {} bytes", request.payload.len());
        let id = request.header.req_id;
        let out = &mut b.out;
        out.clear();
        let mut seen = None;
        for piece in pieces {
            let bytes = match piece {
                Piece::Reply(p) => encode_message(request.header.ty, id, request.header.tx_id, &p),
                Piece::Error(p) => encode_message(MsgType::ERROR, id, request.header.tx_id, &p),
                Piece::Event(req_id, p) => encode_message(MsgType::WATCH_EVENT, req_id, 0, &p),
                Piece::Frame(ty, req_id, tx_id, p) => encode_message(MsgType(ty), req_id, tx_id, &p),
                Piece::Raw(p) => p,
            };
            let start = out.len();
            out.extend_from_slice(&bytes);
            model.push(&bytes);
            loop {
                match model.next_frame() {
                    Ok(Some(frame)) => {
                        if frame.header.ty == MsgType::WATCH_EVENT {
                            if let Ok(ev) = parse_watch_event(&frame.payload) {
                                events.push(ev);
                            }
                        } else if frame.header.req_id == id {
                            // Send nothing after the reply: the client's next request must not race with it.
                            out.truncate(start + bytes.len() - model.buffered());
                            model = FrameDecoder::new();
                            seen = Some(Seen::Reply(frame));
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(_) => {
                        seen = Some(Seen::Broken(true));
                        break;
                    }
                }
            }
            if seen.is_some() {
                break;
            }
        }
        let seen = seen.unwrap_or(Seen::Broken(false));
        let broken = matches!(seen, Seen::Broken(_));
        // Reported before the answer goes out, so that the client's thread finds it when its call returns.
        if reports.send(Report::Step(seen)).is_err() {
            return events;
        }
        if sock.write_all(out).is_err() {
            panic!("client closed the connection while a request was pending");
        }
        if broken {
            return events;
        }
    }
    events
}

/// The client's calls: one per step.
type Script = Vec<(u8, Vec<Piece>)>;

/// One input's peer: its end of the socket pair and its script.
type PeerJob = (UnixStream, Script);

/// What one process keeps for every input: the peer thread (a thread per input cost more than the input), with
/// its buffers, given one job per input and keeping no state from one job to the next (it stops when the fixture
/// is dropped, and dies on a failed check, which the input's thread sees as a closed `reports`); and the client's
/// reader, handed from one input's store to the next.
struct Fixture {
    jobs: mpsc::Sender<PeerJob>,
    reports: mpsc::Receiver<Report>,
    reader: Option<XsReader>,
}

impl Fixture {
    fn start() -> Fixture {
        let (jobs, job_rx) = mpsc::channel::<PeerJob>();
        let (reports_tx, reports) = mpsc::channel();
        std::thread::Builder::new()
            .name("xenstore-peer".into())
            .spawn(move || {
                let mut buffers = PeerBuffers { buf: vec![0; 8192], out: Vec::new() };
                for (sock, script) in job_rx {
                    let events = peer(sock, script, &reports_tx, &mut buffers);
                    if reports_tx.send(Report::Done(events)).is_err() {
                        break;
                    }
                }
            })
            .expect("peer thread");
        Fixture { jobs, reports, reader: Some(XsReader::new()) }
    }

    fn report(&self) -> Report {
        self.reports.recv().expect("peer thread died (a check failed there)")
    }
}

thread_local! {
    static FIXTURE: std::cell::RefCell<Option<Fixture>> = const { std::cell::RefCell::new(None) };
}

/// Run one input.
pub fn run(data: &[u8]) {
    FIXTURE.with(|f| {
        let mut f = f.borrow_mut();
        run_with(f.get_or_insert_with(Fixture::start), data);
    });
}

fn run_with(fixture: &mut Fixture, data: &[u8]) {
    let (steps, script) = decode_steps(data);
    let (client, server) = UnixStream::pair().expect("socket pair");
    let reader = fixture.reader.take().unwrap_or_default();
    let store = XenBusStore::from_stream_inline(client, reader).expect("client").with_request_timeout(HANG);
    fixture.jobs.send((server, script)).expect("peer thread gone (a check failed there)");

    let mut broken = false;
    for step in &steps {
        let got = call(&store, step);
        let seen = match fixture.report() {
            Report::Step(seen) => seen,
            Report::Done(_) => panic!("peer stopped before the step's answer; client returned {got:?}"),
        };
        match seen {
            Seen::Reply(frame) => {
                let want = expected(step.op, &frame);
                assert_eq!(got, want, "op {} with reply {frame:?}", step.op % OPS);
            }
            Seen::Broken(oversized) => {
                let want = if oversized { Outcome::Protocol } else { Outcome::Disconnected };
                assert_eq!(got, want, "op {} on a dead connection", step.op % OPS);
                broken = true;
                break;
            }
        }
    }
    let Report::Done(sent_events) = fixture.report() else {
        panic!("peer answered more steps than the client called");
    };

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

fn step(w: &mut Writer, op: u8, value: &[u8], pieces: &[Piece]) {
    w.u8(op).short_bytes(value).u8(pieces.len() as u8);
    for p in pieces {
        match p {
            Piece::Reply(b) => w.u8(0).long_bytes(b),
            Piece::Error(b) => w.u8(1).long_bytes(b),
            Piece::Event(id, b) => w.u8(2).u32(*id).long_bytes(b),
            Piece::Frame(ty, id, tx, b) => w.u8(3).u32(*ty).u32(*id).u32(*tx).long_bytes(b),
            Piece::Raw(b) => w.u8(4).long_bytes(b),
        };
    }
}

/// Seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    let ok = || Piece::Reply(b"OK\0".to_vec());
    let event = |p: &[u8]| Piece::Event(0, p.to_vec());
    let mut out = Vec::new();

    let mut w = Writer::new();
    step(&mut w, 0, b"", &[Piece::Reply(b"4".to_vec())]);
    step(&mut w, 1, b"5", &[ok()]);
    step(&mut w, 2, b"", &[ok()]);
    step(&mut w, 3, b"", &[Piece::Error(b"ENOENT\0".to_vec())]);
    step(&mut w, 4, b"", &[Piece::Reply(b"51712\0..\0a/b\0".to_vec())]);
    step(&mut w, 5, b"", &[Piece::Reply(b"b0\0r7\0".to_vec())]);
    step(&mut w, 6, b"", &[ok()]);
    step(&mut w, 7, b"", &[Piece::Reply(b"12\0".to_vec())]);
    step(&mut w, 8, b"", &[Piece::Error(b"EAGAIN\0".to_vec())]);
    step(&mut w, 9, b"", &[event(b"/local/domain/7/device/vbd/51712/state\0fuzz-token\0"), ok()]);
    step(&mut w, 10, b"", &[ok()]);
    step(&mut w, 11, b"", &[Piece::Reply(b"/local/domain/7\0".to_vec())]);
    out.push(w.finish());

    let mut w = Writer::new();
    step(&mut w, 0, b"", &[Piece::Frame(2, 99, 0, b"stale".to_vec()), event(b"/a\0t\0"), Piece::Reply(b"v".to_vec())]);
    step(&mut w, 0, b"", &[Piece::Frame(4, 2, 0, b"wrong type".to_vec())]);
    step(&mut w, 7, b"", &[Piece::Reply(b"0\0".to_vec())]);
    step(&mut w, 0, b"", &[Piece::Error(b"EQUOTA\0".to_vec())]);
    step(&mut w, 0, b"", &[event(b"/a\0\xff\0"), Piece::Raw(vec![2, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0])]);
    out.push(w.finish());

    let mut oversized = encode_message(MsgType::READ, 1, 0, b"");
    oversized[12..16].copy_from_slice(&5000u32.to_ne_bytes());
    let mut w = Writer::new();
    step(&mut w, 4, b"", &[event(b"/x\0y\0"), Piece::Raw(oversized)]);
    out.push(w.finish());

    let mut w = Writer::new();
    step(&mut w, 1, b"value", &[Piece::Raw(encode_message(MsgType::WRITE, 1, 0, b"OK")[..10].to_vec())]);
    out.push(w.finish());
    out
}
