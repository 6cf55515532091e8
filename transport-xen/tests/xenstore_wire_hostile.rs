// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `XenBusStore` against a misbehaving xenstored over a real socket: truncated, oversized and garbage replies,
//! unknown request ids, malformed watch events, silence, and a flood of events. Nothing may panic or hang.

mod xenstore_wire_fake;

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use transport_xen::services::{TxId, WatchEvent, XenError, XenStore};
use transport_xen::xen::xenstore::MAX_QUEUED_WATCH_EVENTS;
use xenstore_wire_fake::*;

#[test]
fn oversized_length_breaks_the_connection_for_everyone() {
    let fake = Fake::scripted(|req, stream| {
        let mut bytes = frame(req.ty, req.req_id, 0, b"");
        bytes[12..16].copy_from_slice(&5000u32.to_ne_bytes());
        stream.write_all(&bytes)
    });
    let xs = &fake.store;
    let err = xs.read(TxId::NONE, "/a").expect_err("garbage reply");
    assert!(matches!(err, XenError::Protocol { .. }), "{err}");
    // Later calls fail at once, and the watch fd wakes the owner up with the error.
    let t0 = Instant::now();
    assert!(matches!(xs.write(TxId::NONE, "/b", b"x"), Err(XenError::Protocol { .. })));
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert!(readable(xs.watch_fd(), 1000));
    let mut events = Vec::new();
    assert!(xs.take_watch_events(&mut events).is_err());
    fake.finish();
}

#[test]
fn truncated_reply_then_hangup_is_a_disconnect() {
    let fake = Fake::scripted(|req, stream| {
        let bytes = frame(req.ty, req.req_id, 0, b"half of a value");
        stream.write_all(&bytes[..20])?;
        Err(std::io::Error::other("hang up"))
    });
    let err = fake.store.read(TxId::NONE, "/a").expect_err("peer hung up");
    assert_eq!(err, XenError::Disconnected { what: "xenstore" });
    assert_eq!(fake.store.read(TxId::NONE, "/a"), Err(XenError::Disconnected { what: "xenstore" }));
    fake.finish();
}

#[test]
fn malformed_replies_fail_only_their_request() {
    let state = Arc::new(FakeState::default());
    let server_state = Arc::clone(&state);
    let fake = Fake::scripted(move |req, stream| {
        let reply = |ty, body: &[u8]| frame(ty, req.req_id, req.tx_id, body);
        let bytes = match req.path().as_str() {
            "/wrong-type" => reply(XS_DIRECTORY, b"x\0"),
            "/not-ok" => reply(req.ty, b"KO\0"),
            "/weird-errno" => reply(XS_ERROR, b"\xffBOGUS\x01\0"),
            "/eacces" => reply(XS_ERROR, b"EACCES\0"),
            "/einval" => reply(XS_ERROR, b"EINVAL\0"),
            "/bad-perms" => reply(XS_GET_PERMS, b"q0\0"),
            "/empty-perms" => reply(XS_GET_PERMS, b""),
            "/junk-names" => reply(XS_DIRECTORY, b"ok\0..\0a/b\0\xc3\x28\0\0also-ok"),
            "" if req.ty == XS_TRANSACTION_START => reply(XS_TRANSACTION_START, b"-7\0"),
            _ => server_state.handle(&req),
        };
        stream.write_all(&bytes)
    });
    let xs = &fake.store;
    assert!(matches!(xs.read(TxId::NONE, "/wrong-type"), Err(XenError::Protocol { .. })));
    assert!(matches!(xs.write(TxId::NONE, "/not-ok", b"v"), Err(XenError::Protocol { .. })));
    let err = xs.read(TxId::NONE, "/weird-errno").expect_err("unknown errno");
    assert!(matches!(err, XenError::Os { errno: libc::EIO, .. }), "{err}");
    assert!(err.to_string().contains("\\xffBOGUS\\x01"), "sanitized in the message: {err}");
    assert!(matches!(xs.read(TxId::NONE, "/eacces"), Err(XenError::Access { .. })));
    assert!(matches!(xs.read(TxId::NONE, "/einval"), Err(XenError::Os { errno: libc::EINVAL, .. })));
    assert!(matches!(xs.get_perms(TxId::NONE, "/bad-perms"), Err(XenError::Protocol { .. })));
    assert!(matches!(xs.get_perms(TxId::NONE, "/empty-perms"), Err(XenError::Protocol { .. })));
    assert_eq!(xs.directory(TxId::NONE, "/junk-names").expect("valid names kept"), vec!["ok", "also-ok"]);
    assert!(matches!(xs.transaction_start(), Err(XenError::Protocol { .. })));
    // The connection is still fine.
    xs.write(TxId::NONE, "/fine", b"1").expect("write");
    assert_eq!(xs.read(TxId::NONE, "/fine").expect("read"), b"1");
    fake.finish();
}

#[test]
fn stray_replies_and_malformed_events_are_dropped() {
    let state = Arc::new(FakeState::default());
    let server_state = Arc::clone(&state);
    let fake = Fake::scripted(move |req, stream| {
        let mut bytes = frame(XS_READ, req.req_id.wrapping_add(1000), 0, b"not yours");
        bytes.extend(frame(XS_WATCH_EVENT, 0, 0, b"/no-token"));
        bytes.extend(frame(XS_WATCH_EVENT, 0, 0, b"/bad-token\0\xff\xfe\0"));
        bytes.extend(frame(XS_WATCH_EVENT, 0, 0, b"\0empty-path\0"));
        bytes.extend(event("/good", "tok"));
        bytes.extend(server_state.handle(&req));
        stream.write_all(&bytes)
    });
    let xs = &fake.store;
    xs.write(TxId::NONE, "/x", b"1").expect("the real reply still arrives");
    let mut events = Vec::new();
    xs.take_watch_events(&mut events).expect("take");
    assert_eq!(events, vec![WatchEvent { path: "/good".into(), token: "tok".into() }]);
    fake.finish();
}

#[test]
fn silent_peer_times_out_and_late_replies_are_ignored() {
    let (late_tx, late_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let state = Arc::new(FakeState::default());
    let server_state = Arc::clone(&state);
    let fake = Fake::scripted(move |req, stream| {
        if req.path() == "/silent" {
            // Keep the reply, send it before the next one.
            late_tx.send(server_state.handle(&req)).expect("channel");
            return Ok(());
        }
        let mut bytes: Vec<u8> = late_rx.try_iter().flatten().collect();
        bytes.extend(server_state.handle(&req));
        stream.write_all(&bytes)
    });
    let xs = fake.store.with_request_timeout(Duration::from_millis(200));
    let t0 = Instant::now();
    let err = xs.read(TxId::NONE, "/silent").expect_err("no reply");
    assert!(matches!(err, XenError::Os { errno: libc::ETIMEDOUT, .. }), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    xs.write(TxId::NONE, "/next", b"n").expect("the late reply does not confuse the next request");
    assert_eq!(xs.read(TxId::NONE, "/next").expect("read"), b"n");
    drop(xs);
}

#[test]
fn event_flood_collapses_into_rescan_events() {
    let state = Arc::new(FakeState::default());
    let server_state = Arc::clone(&state);
    let fake = Fake::scripted(move |req, stream| {
        let mut bytes = server_state.handle(&req);
        if req.ty == XS_WRITE {
            for i in 0..MAX_QUEUED_WATCH_EVENTS + 500 {
                bytes.extend(event(&format!("/flood/{i}"), "w"));
            }
        }
        stream.write_all(&bytes)
    });
    let xs = &fake.store;
    xs.watch("/flood", "w").expect("watch");
    xs.write(TxId::NONE, "/trigger", b"1").expect("write");
    // Wait until the flood has been read (the last event is queued last).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut events = Vec::new();
    let last = format!("/flood/{}", MAX_QUEUED_WATCH_EVENTS + 499);
    while !events.iter().any(|e: &WatchEvent| e.path == last) {
        assert!(Instant::now() < deadline, "flood not delivered");
        if readable(xs.watch_fd(), 100) {
            xs.take_watch_events(&mut events).expect("take");
        }
    }
    assert!(events.len() <= 2 * MAX_QUEUED_WATCH_EVENTS, "bounded: {}", events.len());
    assert!(
        events.iter().any(|e| e.path == "/flood" && e.token == "w"),
        "a rescan event for the watch replaces what was dropped"
    );
    fake.finish();
}

#[test]
fn invalid_requests_never_reach_the_wire() {
    let fake = Fake::start();
    let xs = &fake.store;
    assert!(matches!(xs.read(TxId::NONE, "/a\0b"), Err(XenError::Os { errno: libc::EINVAL, .. })));
    assert!(matches!(xs.read(TxId::NONE, ""), Err(XenError::Os { errno: libc::EINVAL, .. })));
    assert!(matches!(xs.watch("/a", "t\0"), Err(XenError::Os { errno: libc::EINVAL, .. })));
    assert!(matches!(xs.set_perms(TxId::NONE, "/a", &[]), Err(XenError::Os { errno: libc::EINVAL, .. })));
    let big = vec![b'v'; 4096];
    assert!(matches!(xs.write(TxId::NONE, "/a", &big), Err(XenError::Os { errno: libc::E2BIG, .. })));
    assert!(fake.state.requests.lock().expect("lock").is_empty());
    // The largest value that fits is accepted.
    let fits = vec![b'v'; 4096 - 16 - "/a".len() - 1];
    xs.write(TxId::NONE, "/a", &fits).expect("largest write");
    assert_eq!(xs.read(TxId::NONE, "/a").expect("read").len(), fits.len());
    assert_eq!(fake.state.requests.lock().expect("lock").len(), 2);
    fake.finish();
}

#[test]
fn dropping_the_store_with_a_silent_peer_does_not_hang() {
    let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
    let fake = Fake::scripted(move |_req, _stream| {
        let _ = hold_rx.recv_timeout(Duration::from_secs(5));
        Ok(())
    });
    let t0 = Instant::now();
    fake.store.watch_fd();
    drop(fake);
    assert!(t0.elapsed() < Duration::from_secs(2));
    drop(hold_tx);
}
