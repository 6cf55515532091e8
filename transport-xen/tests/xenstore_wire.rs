// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `XenBusStore` against an in-test xenstored over real unix sockets: request encoding, replies, transactions with
//! EAGAIN, watch events interleaved with replies, concurrent callers, the socket-path transport.

mod xenstore_wire_fake;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use transport_xen::services::{
    read_optional, with_transaction, PermAccess, Permission, TxId, WatchEvent, XenError, XenStore,
};
use transport_xen::xen::{XenBusStore, XsTransport};
use xenstore_wire_fake::*;

#[test]
fn basic_operations_and_their_wire_bytes() {
    let fake = Fake::start();
    let xs = &fake.store;
    xs.write(TxId::NONE, "/local/domain/1/name", b"guest").expect("write");
    assert_eq!(xs.read(TxId::NONE, "/local/domain/1/name").expect("read"), b"guest");
    // Values are bytes: NULs and non-UTF-8 survive.
    xs.write(TxId::NONE, "/bin", b"\x00\xff\xfe").expect("write binary");
    assert_eq!(xs.read(TxId::NONE, "/bin").expect("read binary"), b"\x00\xff\xfe");
    xs.mkdir(TxId::NONE, "/local/domain/1/device").expect("mkdir");
    let mut children = xs.directory(TxId::NONE, "/local/domain/1").expect("directory");
    children.sort();
    assert_eq!(children, vec!["device".to_owned(), "name".to_owned()]);
    assert_eq!(
        xs.read(TxId::NONE, "/missing").expect_err("no such node"),
        XenError::NotFound { path: "/missing".into() }
    );
    assert_eq!(read_optional(xs, TxId::NONE, "/missing").expect("optional"), None);
    let perms = [Permission { domid: 0, access: PermAccess::Both }, Permission { domid: 5, access: PermAccess::Read }];
    xs.set_perms(TxId::NONE, "/local/domain/1/name", &perms).expect("set perms");
    assert_eq!(xs.get_perms(TxId::NONE, "/local/domain/1/name").expect("get perms"), perms);
    xs.rm(TxId::NONE, "/local/domain/1").expect("rm");
    assert!(matches!(xs.read(TxId::NONE, "/local/domain/1/name"), Err(XenError::NotFound { .. })));

    let requests = fake.state.requests.lock().expect("lock").clone();
    let find = |ty| requests.iter().find(|r| r.ty == ty).expect("request sent").payload.clone();
    assert_eq!(find(XS_WRITE), b"/local/domain/1/name\0guest");
    assert_eq!(find(XS_READ), b"/local/domain/1/name\0");
    assert_eq!(find(XS_MKDIR), b"/local/domain/1/device\0");
    assert_eq!(find(XS_SET_PERMS), b"/local/domain/1/name\0b0\0r5\0");
    assert_eq!(find(XS_RM), b"/local/domain/1\0");
    let mut ids: Vec<u32> = requests.iter().map(|r| r.req_id).collect();
    ids.dedup();
    assert_eq!(ids.len(), requests.len(), "every request has its own id");
    fake.finish();
}

#[test]
fn transactions_carry_their_id_and_retry_on_eagain() {
    let fake = Fake::start();
    let xs = &fake.store;
    fake.state.conflicts.store(2, Ordering::SeqCst);
    let mut attempts = 0;
    let value = with_transaction(xs, 5, |tx| {
        attempts += 1;
        assert_ne!(tx, TxId::NONE);
        xs.write(tx, "/t/a", b"1")?;
        xs.write(tx, "/t/b", b"2")?;
        Ok(attempts)
    })
    .expect("third attempt commits");
    assert_eq!(value, 3);
    assert_eq!(fake.state.tx_started.load(Ordering::SeqCst), 3);

    let requests = fake.state.requests.lock().expect("lock").clone();
    let ends: Vec<_> = requests.iter().filter(|r| r.ty == XS_TRANSACTION_END).collect();
    assert_eq!(ends.len(), 3);
    assert!(ends.iter().all(|r| r.payload == b"T\0"));
    assert_eq!(ends.iter().map(|r| r.tx_id).collect::<Vec<_>>(), vec![1, 2, 3]);
    let start = requests.iter().find(|r| r.ty == XS_TRANSACTION_START).expect("start");
    assert_eq!((start.tx_id, start.payload.as_slice()), (0, &b"\0"[..]));
    assert!(requests.iter().filter(|r| r.ty == XS_WRITE).all(|r| r.tx_id != 0));

    // Conflicts beyond the attempts surface as Again; an abort sends "F".
    fake.state.conflicts.store(10, Ordering::SeqCst);
    assert_eq!(with_transaction(xs, 2, |_| Ok(())), Err(XenError::Again));
    let tx = xs.transaction_start().expect("start");
    xs.transaction_end(tx, false).expect("abort");
    let last = fake.state.requests.lock().expect("lock").last().cloned().expect("request");
    assert_eq!((last.ty, last.payload.as_slice()), (XS_TRANSACTION_END, &b"F\0"[..]));
    assert!(xs.transaction_end(TxId::NONE, true).is_err(), "no transaction to end");
    fake.finish();
}

#[test]
fn watch_events_interleave_with_replies_and_signal_the_fd() {
    let fake = Fake::start();
    let xs = &fake.store;
    let fd = xs.watch_fd();
    assert!(!readable(fd, 0));
    xs.watch("/local/domain/0/backend", "be").expect("watch");
    // The registration fires once.
    assert!(readable(fd, 5000), "initial watch event");
    let mut events = Vec::new();
    xs.take_watch_events(&mut events).expect("take");
    assert_eq!(events, vec![WatchEvent { path: "/local/domain/0/backend".into(), token: "be".into() }]);
    assert!(!readable(fd, 0), "drained");

    // Every reply is now preceded by an unrelated event, and replies arrive one byte per write.
    fake.state.event_before_reply.store(true, Ordering::SeqCst);
    fake.state.dribble.store(true, Ordering::SeqCst);
    xs.write(TxId::NONE, "/local/domain/0/backend/vbd/1/51712/state", b"2").expect("write");
    assert_eq!(xs.read(TxId::NONE, "/local/domain/0/backend/vbd/1/51712/state").expect("read"), b"2");
    assert!(readable(fd, 5000));
    events.clear();
    xs.take_watch_events(&mut events).expect("take");
    assert_eq!(
        events,
        vec![
            WatchEvent { path: "/noise".into(), token: "noise".into() },
            WatchEvent { path: "/local/domain/0/backend/vbd/1/51712/state".into(), token: "be".into() },
            WatchEvent { path: "/noise".into(), token: "noise".into() },
        ]
    );
    let watch_req = fake.state.requests.lock().expect("lock")[0].clone();
    assert_eq!(watch_req.payload, b"/local/domain/0/backend\0be\0");

    fake.state.event_before_reply.store(false, Ordering::SeqCst);
    xs.unwatch("/local/domain/0/backend", "be").expect("unwatch");
    xs.write(TxId::NONE, "/local/domain/0/backend/x", b"1").expect("write");
    events.clear();
    xs.take_watch_events(&mut events).expect("take");
    assert!(events.is_empty(), "no events after unwatch: {events:?}");
    fake.finish();
}

#[test]
fn concurrent_callers_share_one_connection() {
    let fake = Fake::start();
    let store = Arc::new(fake);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let fake = Arc::clone(&store);
            std::thread::spawn(move || {
                for i in 0..100 {
                    let path = format!("/c/{t}/{i}");
                    fake.store.write(TxId::NONE, &path, path.as_bytes()).expect("write");
                    assert_eq!(fake.store.read(TxId::NONE, &path).expect("read"), path.as_bytes());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("caller thread");
    }
    let fake = Arc::into_inner(store).expect("all callers done");
    assert_eq!(fake.state.requests.lock().expect("lock").len(), 8 * 100 * 2);
    fake.finish();
}

#[test]
fn replies_out_of_order_reach_their_callers() {
    // A server that holds the first request until the second arrives and answers them in reverse order.
    let state = Arc::new(FakeState::default());
    let server_state = Arc::clone(&state);
    let holding = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server_holding = Arc::clone(&holding);
    let mut held: Option<Req> = None;
    let fake = Fake::scripted(move |req, stream| {
        use std::io::Write;
        match held.take() {
            None if req.path().starts_with("/slow") => {
                held = Some(req);
                server_holding.store(true, Ordering::SeqCst);
                Ok(())
            }
            None => stream.write_all(&server_state.handle(&req)),
            Some(first) => {
                stream.write_all(&server_state.handle(&req))?;
                stream.write_all(&server_state.handle(&first))
            }
        }
    });
    let store = Arc::new(fake);
    let slow = {
        let fake = Arc::clone(&store);
        std::thread::spawn(move || fake.store.write(TxId::NONE, "/slow", b"s"))
    };
    // Wait until the slow request is held, then send the fast one.
    while !holding.load(Ordering::SeqCst) {
        assert!(!slow.is_finished(), "the slow request must wait");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    store.store.write(TxId::NONE, "/fast", b"f").expect("fast write");
    slow.join().expect("slow thread").expect("slow write");
    let order: Vec<String> = state.requests.lock().expect("lock").iter().map(|r| r.path()).collect();
    assert_eq!(order, vec!["/fast".to_owned(), "/slow".to_owned()], "answered in reverse");
    Arc::into_inner(store).expect("sole owner").finish();
}

#[test]
fn socket_transport_by_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("socket");
    let listener = UnixListener::bind(&path).expect("bind");
    let state = Arc::new(FakeState::default());
    let server_state = Arc::clone(&state);
    let server = std::thread::spawn(move || {
        use std::io::Write;
        let (mut stream, _) = listener.accept().expect("accept");
        while let Some(req) = read_req(&mut stream) {
            stream.write_all(&server_state.handle(&req)).expect("reply");
        }
    });
    let xs = XenBusStore::connect_socket(&path).expect("connect");
    assert_eq!(xs.transport(), &XsTransport::Socket(path.clone()));
    xs.write(TxId::NONE, "/local/domain/0/name", b"Domain-0").expect("write");
    assert_eq!(xs.read(TxId::NONE, "/local/domain/0/name").expect("read"), b"Domain-0");
    drop(xs);
    server.join().expect("server");
    assert!(XenBusStore::connect_socket(&dir.path().join("nothing")).is_err());
}

#[test]
fn one_request_in_flight_when_asked() {
    // The server checks that no second request is queued while it answers one (as /dev/xen/xenbus requires).
    let state = Arc::new(FakeState::default());
    let server_state = Arc::clone(&state);
    let overlaps = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let server_overlaps = Arc::clone(&overlaps);
    let fake = Fake::scripted(move |req, stream| {
        use std::io::Write;
        std::thread::sleep(std::time::Duration::from_millis(1));
        let mut probe = [0u8; 1];
        // SAFETY: `probe` is a valid 1-byte buffer; MSG_PEEK|MSG_DONTWAIT only looks at queued bytes.
        let queued = unsafe {
            libc::recv(stream.as_raw_fd(), probe.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT)
        };
        if queued > 0 {
            server_overlaps.fetch_add(1, Ordering::SeqCst);
        }
        stream.write_all(&server_state.handle(&req))
    });
    let Fake { store, state: _, .. } = fake;
    let store = Arc::new(store.with_one_request_in_flight(true));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let xs = Arc::clone(&store);
            std::thread::spawn(move || {
                for i in 0..20 {
                    let path = format!("/s/{t}/{i}");
                    xs.write(TxId::NONE, &path, b"v").expect("write");
                    assert_eq!(xs.read(TxId::NONE, &path).expect("read"), b"v");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("caller");
    }
    assert_eq!(overlaps.load(Ordering::SeqCst), 0, "a request was sent while another was in flight");
    assert_eq!(state.requests.lock().expect("lock").len(), 4 * 20 * 2);
}
