// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The seam between the protocol code and who reads the connection: a store read by its callers
//! ([`XenBusStore::from_stream_inline`]) behaves as one with a reader thread, and its [`XsReader`] serves one
//! connection after the other.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::*;
use crate::xen::wire::{encode_message, FrameDecoder};

const T: Duration = Duration::from_secs(10);

/// What the peer does after reading a request.
type Answer = Box<dyn Fn(&Frame) -> Vec<u8> + Send>;

/// A xenstored on `server`: reads each request, writes `answers[i]` for the i-th, then writes `tail` and closes.
fn peer(mut server: UnixStream, answers: Vec<Answer>, tail: Vec<u8>) -> JoinHandle<Vec<Frame>> {
    std::thread::spawn(move || {
        let mut decoder = FrameDecoder::new();
        let mut buf = [0u8; 4096];
        let mut requests = Vec::new();
        for answer in answers {
            let request = loop {
                if let Some(f) = decoder.next_frame().expect("request") {
                    break f;
                }
                let n = server.read(&mut buf).expect("read request");
                assert!(n > 0, "client closed early");
                decoder.push(&buf[..n]);
            };
            server.write_all(&answer(&request)).expect("answer");
            requests.push(request);
        }
        server.write_all(&tail).expect("tail");
        requests
    })
}

fn reply(payload: &'static [u8]) -> Answer {
    Box::new(move |r: &Frame| encode_message(r.header.ty, r.header.req_id, r.header.tx_id, payload))
}

fn event(path: &str, token: &str) -> Vec<u8> {
    encode_message(MsgType::WATCH_EVENT, 0, 0, &wire::join_payload(&[path.as_bytes(), token.as_bytes()], b""))
}

fn ev(path: &str, token: &str) -> WatchEvent {
    WatchEvent { path: path.into(), token: token.into() }
}

fn inline(reader: XsReader) -> (XenBusStore, UnixStream) {
    let (client, server) = UnixStream::pair().expect("socket pair");
    (XenBusStore::from_stream_inline(client, reader).expect("store").with_request_timeout(T), server)
}

/// Every event until the connection's loss is reported, and that error.
fn events_until_loss(store: &XenBusStore) -> (Vec<WatchEvent>, XenError) {
    let mut events = Vec::new();
    let deadline = Instant::now() + T;
    loop {
        if let Err(e) = store.take_watch_events(&mut events) {
            return (events, e);
        }
        assert!(Instant::now() < deadline, "connection loss never reported");
        poll_one(store.watch_fd(), libc::POLLIN, Some(Duration::from_millis(20))).expect("poll");
    }
}

/// One script: a stale reply and events before the reply, an error reply, a malformed event, then events after the
/// last reply and the end of the connection.
fn script() -> (Vec<Answer>, Vec<u8>) {
    let answers: Vec<Answer> = vec![
        Box::new(|r: &Frame| {
            let mut out = encode_message(MsgType::READ, r.header.req_id + 100, 0, b"stale");
            out.extend(event("/a", "t1"));
            out.extend(encode_message(MsgType::READ, r.header.req_id, 0, b"value"));
            out
        }),
        Box::new(|r: &Frame| {
            let mut out = encode_message(MsgType::WATCH_EVENT, 0, 0, b"no-token");
            out.extend(encode_message(MsgType::ERROR, r.header.req_id, 0, b"ENOENT\0"));
            out
        }),
        reply(b"OK\0"),
    ];
    let mut tail = event("/b", "t2");
    tail.extend(event("/c", "t3"));
    (answers, tail)
}

fn run_script(store: &XenBusStore) -> Vec<String> {
    let mut results = vec![
        format!("{:?}", store.read(TxId::NONE, "/x")),
        format!("{:?}", store.read(TxId::NONE, "/y")),
        format!("{:?}", store.write(TxId::NONE, "/z", b"1")),
    ];
    // Events first: a call on the closed socket would break the connection by its failed write, and a store with
    // a reader thread may then report the loss before its thread has queued the last events.
    let (events, err) = events_until_loss(store);
    results.push(format!("{events:?} {err:?}"));
    results.push(format!("{:?}", store.mkdir(TxId::NONE, "/w")));
    results
}

#[test]
fn inline_and_threaded_stores_agree() {
    let (client, server) = UnixStream::pair().expect("socket pair");
    let threaded = XenBusStore::from_stream(client).expect("store").with_request_timeout(T);
    let (answers, tail) = script();
    let p = peer(server, answers, tail);
    let with_thread = run_script(&threaded);
    p.join().expect("peer");
    assert!(threaded.into_reader().is_none(), "a threaded store has no reader to give back");

    let (store, server) = inline(XsReader::new());
    let (answers, tail) = script();
    let p = peer(server, answers, tail);
    let without = run_script(&store);
    p.join().expect("peer");

    assert_eq!(with_thread, without);
    assert_eq!(without[0], "Ok([118, 97, 108, 117, 101])");
    assert!(without[1].starts_with("Err(NotFound"), "{}", without[1]);
    assert_eq!(without[2], "Ok(())");
    let events = format!("{:?}", [ev("/a", "t1"), ev("/b", "t2"), ev("/c", "t3")]);
    assert!(without[3].starts_with(&events), "{}", without[3]);
    assert!(without[4].starts_with("Err(Disconnected"), "{}", without[4]);
}

#[test]
fn inline_take_watch_events_reads_what_arrived_between_calls() {
    let (store, mut server) = inline(XsReader::new());
    let mut events = Vec::new();
    store.take_watch_events(&mut events).expect("nothing yet");
    assert!(events.is_empty());
    server.write_all(&event("/p", "tok")).expect("event");
    // Half of a second event: delivered once complete, not before.
    let second = event("/q", "tok");
    server.write_all(&second[..5]).expect("half");
    store.take_watch_events(&mut events).expect("take");
    assert_eq!(events, [ev("/p", "tok")]);
    server.write_all(&second[5..]).expect("rest");
    store.take_watch_events(&mut events).expect("take");
    assert_eq!(events, [ev("/p", "tok"), ev("/q", "tok")]);
    // Drained, so not readable any more.
    assert!(!poll_one(store.watch_fd(), libc::POLLIN, Some(Duration::ZERO)).expect("poll"));
}

#[test]
fn inline_oversized_header_breaks_the_connection_for_good() {
    let (store, server) = inline(XsReader::new());
    let mut bad = encode_message(MsgType::READ, 1, 0, b"");
    bad[12..16].copy_from_slice(&5000u32.to_ne_bytes());
    let p = peer(server, vec![Box::new(move |_: &Frame| bad.clone())], Vec::new());
    assert!(matches!(store.read(TxId::NONE, "/x"), Err(XenError::Protocol { .. })));
    // Later calls and the watch queue report the same error, without sending anything.
    assert!(matches!(store.read(TxId::NONE, "/x"), Err(XenError::Protocol { .. })));
    let mut events = Vec::new();
    assert!(matches!(store.take_watch_events(&mut events), Err(XenError::Protocol { .. })));
    assert_eq!(p.join().expect("peer").len(), 1);
}

#[test]
fn inline_call_times_out_without_a_reply() {
    let (store, mut server) = inline(XsReader::new());
    let store = store.with_request_timeout(Duration::from_millis(50));
    let start = Instant::now();
    match store.read(TxId::NONE, "/x") {
        Err(XenError::Os { errno, .. }) => assert_eq!(errno, libc::ETIMEDOUT),
        other => panic!("{other:?}"),
    }
    assert!(start.elapsed() >= Duration::from_millis(50));
    // The connection is still usable: the late reply to the first request is dropped, not taken for the next.
    let mut request = [0u8; 64];
    let n = server.read(&mut request).expect("first request");
    assert_eq!(n, 16 + 3, "one READ of /x");
    server.write_all(&encode_message(MsgType::READ, 1, 0, b"late")).expect("late reply");
    let p = peer(server, vec![reply(b"fresh")], Vec::new());
    let store = store.with_request_timeout(T);
    assert_eq!(store.read(TxId::NONE, "/x").expect("read"), b"fresh");
    p.join().expect("peer");
}

#[test]
fn reader_serves_one_connection_after_the_other() {
    // The first connection ends in the middle of a frame: the reader keeps neither the bytes nor the end.
    let (store, server) = inline(XsReader::new());
    let half = encode_message(MsgType::READ, 1, 0, b"cut short");
    let p = peer(server, vec![Box::new(move |_: &Frame| half[..20].to_vec())], Vec::new());
    assert!(matches!(store.read(TxId::NONE, "/x"), Err(XenError::Disconnected { .. })));
    p.join().expect("peer");
    let reader = store.into_reader().expect("inline store gives its reader back");

    let (store, server) = inline(reader);
    let p = peer(server, vec![reply(b"whole"), reply(b"OK\0")], event("/e", "t"));
    assert_eq!(store.read(TxId::NONE, "/x").expect("read"), b"whole");
    store.watch("/e", "t").expect("watch");
    let (events, err) = events_until_loss(&store);
    assert_eq!(events, [ev("/e", "t")]);
    assert!(matches!(err, XenError::Disconnected { .. }), "{err:?}");
    p.join().expect("peer");

    // A poisoned decoder (oversized header) is reset too.
    let reader = store.into_reader().expect("reader");
    let (store, server) = inline(reader);
    let mut bad = encode_message(MsgType::READ, 1, 0, b"");
    bad[12..16].copy_from_slice(&5000u32.to_ne_bytes());
    let p = peer(server, vec![Box::new(move |_: &Frame| bad.clone())], Vec::new());
    assert!(matches!(store.read(TxId::NONE, "/x"), Err(XenError::Protocol { .. })));
    p.join().expect("peer");
    let (store, server) = inline(store.into_reader().expect("reader"));
    let p = peer(server, vec![reply(b"again")], Vec::new());
    assert_eq!(store.read(TxId::NONE, "/x").expect("read"), b"again");
    p.join().expect("peer");
}

#[test]
fn inline_concurrent_callers_take_turns() {
    let (store, server) = inline(XsReader::new());
    // Answers each request with its own path.
    let answers: Vec<Answer> = (0..8)
        .map(|_| -> Answer {
            Box::new(|r: &Frame| {
                let path = r.payload.split(|&b| b == 0).next().unwrap_or_default();
                encode_message(r.header.ty, r.header.req_id, 0, path)
            })
        })
        .collect();
    let p = peer(server, answers, Vec::new());
    std::thread::scope(|s| {
        for i in 0..4 {
            let store = &store;
            s.spawn(move || {
                for j in 0..2 {
                    let path = format!("/n{i}/{j}");
                    assert_eq!(store.read(TxId::NONE, &path).expect("read"), path.as_bytes());
                }
            });
        }
    });
    let requests = p.join().expect("peer");
    assert_eq!(requests.len(), 8);
}
