// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Losing the xenstore connection: the backend says so in one error line and closes cleanly — every data plane
//! stopped (what was in flight answered), every grant unmapped, every port unbound, every worker thread joined —
//! and its loop returns the error instead of spinning or hanging. On the emulated host (xenstored drops the
//! backend's connection while requests are in flight) and with the real wire client (xenstored hangs up).

mod backend_support;
mod xenstore_wire_fake;

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use backend_support::{thread_gone, thread_names, within, workers_of, BackendProcess, Host, SETTLE, T};
use transport_xen::blkif::RSP_OKAY;
use transport_xen::connect::ConnectConfig;
use transport_xen::dataplane::DataplaneOptions;
use transport_xen::frontend::load::fill_pattern;
use transport_xen::frontend::{Blkfront, BlkfrontConfig, Completion, IoRequest, XVDA};
use transport_xen::services::{TxId, XenError, XenStore};
use transport_xen::xen::XenBusStore;
use transport_xen::xenbus::{BackendConfig, Fatal, RingServer, RunningRings, Scope, XenBackend, XenbusState};
use xenstore_wire_fake::{read_req, FakeState};

/// How long the backend may take to notice and close everything (generous: the machine may be loaded).
const BOUND: Duration = Duration::from_secs(5);

/// Queue `n` 8 KiB writes on queue 0 and publish them without waiting.
fn flood(front: &mut Blkfront<'_>, n: usize) {
    let mut data = vec![0u8; 8192];
    for i in 0..n {
        let sector = (i as u64) * 16;
        fill_pattern(&mut data, sector, 3);
        assert!(front.submit(0, &IoRequest::Write { sector, data: &data }, i as u64).expect("submit"), "ring full");
    }
    front.kick(0).expect("kick");
}

/// Every completion published by now (the backend is gone: the rest never comes). `poll` waits up to the
/// frontend's timeout for at least one, so this costs one timeout when the backend answered nothing more.
fn drain(front: &mut Blkfront<'_>) -> Vec<Completion> {
    let mut out = Vec::new();
    while front.in_flight(0) > 0 {
        let before = out.len();
        let _ = front.poll(0, &mut out);
        if out.len() == before {
            break;
        }
    }
    out
}

#[test]
fn emulated_xenstore_drops_the_backend_with_requests_in_flight() {
    let host = Host::new();
    let backend = BackendProcess::real(&host.host, BackendConfig::default(), DataplaneOptions::default());
    let (g1, g2) = (host.host.add_guest(41, 512).expect("guest"), host.host.add_guest(42, 512).expect("guest"));
    // A short timeout: the last `poll` of `drain` waits for answers that never come.
    let timeout = Duration::from_secs(4);
    let config =
        BlkfrontConfig { ring_page_order: 1, queues: 2, persistent: true, timeout, ..BlkfrontConfig::default() };
    host.add_disk(41, 8 << 20);
    host.add_disk(42, 8 << 20);
    let mut f1 = Blkfront::connect(&g1, XVDA, config.clone()).expect("connect guest 41");
    let mut f2 = Blkfront::connect(&g2, XVDA, config).expect("connect guest 42");
    assert!(within(SETTLE, || (workers_of(41), workers_of(42)) == (2, 2)), "{:?}", thread_names());
    f2.write(0, &[7u8; 4096]).expect("a persistent grant is mapped");
    assert!(host.host.live_mappings() > 0);
    flood(&mut f1, 48);
    // The first answer: the worker took the whole batch; the rest is in flight.
    let mut first = Vec::new();
    f1.poll(0, &mut first).expect("the first write completes");
    assert_eq!(first[0].status, RSP_OKAY);

    let backend_tid = backend.tid;
    let (result, _took) = backend_lose(backend);
    assert_eq!(result, Err(XenError::Disconnected { what: "xenstore" }));

    assert_eq!(host.host.live_mappings(), 0, "every grant unmapped");
    assert_eq!(host.host.evtchn_switch().open_ports(0), 0, "every backend port unbound");
    assert!(
        within(SETTLE, || (workers_of(41), workers_of(42)) == (0, 0)),
        "every worker thread joined: {:?}",
        thread_names()
    );
    assert!(thread_gone(backend_tid), "the backend thread ended");
    // What the backend took from the ring before it stopped was answered, and answered right.
    let done = drain(&mut f1);
    assert!(done.iter().all(|c| c.status == RSP_OKAY), "{:?}", done.iter().map(|c| c.status).collect::<Vec<_>>());
    // Nothing was written to xenstore: the vbds are left Connected for --cleanup or the next backend.
    for domid in [41, 42] {
        let id = transport_xen::xenbus::VbdId { domid, devid: XVDA };
        let state = host.toolstack.store().read(TxId::NONE, &host.toolstack.paths(id).node("state"));
        assert_eq!(state.as_deref().ok(), Some(&b"4"[..]), "vbd {domid}");
    }
    f1.teardown().expect("every grant of guest 41 revocable");
    f2.teardown().expect("every grant of guest 42 revocable");
}

fn backend_lose(backend: BackendProcess) -> (Result<(), XenError>, Duration) {
    let errors = backend.errors.clone();
    let (result, took) = backend.lose_xenstore();
    assert!(took < BOUND, "the loop took {took:?} to end");
    let errors = errors.lock().expect("log").clone();
    assert_eq!(errors.len(), 1, "exactly one error line: {errors:?}");
    assert!(errors[0].contains("xenstore: connection lost"), "the line names the cause: {}", errors[0]);
    (result, took)
}

#[test]
fn emulated_xenstore_drops_an_idle_backend() {
    let host = Host::new();
    let backend = BackendProcess::real(&host.host, BackendConfig::default(), DataplaneOptions::default());
    let _g = host.host.add_guest(43, 64).expect("guest");
    let id = host.add_disk(43, 4 << 20);
    host.wait_state(id, XenbusState::InitWait);
    let (result, _) = backend_lose(backend);
    assert_eq!(result, Err(XenError::Disconnected { what: "xenstore" }));
    assert_eq!(host.host.evtchn_switch().open_ports(0), 0);
}

/// A data plane that is never asked for (the wire test has no vbd).
struct NoRings;

impl RingServer for NoRings {
    fn start(&self, _: Arc<device_blk::Disk>, _: &ConnectConfig) -> Result<Box<dyn RunningRings>, Fatal> {
        Err(Fatal::new(libc::EIO, "no data plane in this test"))
    }
}

#[test]
fn xenstored_hanging_up_on_the_wire_client_ends_the_backend_loop() {
    an_idle_wire_connection_closed_by_xenstored_wakes_its_owner_and_fails_every_call();
    let (client, server) = UnixStream::pair().expect("socketpair");
    let hangup = server.try_clone().expect("dup");
    let state = Arc::new(FakeState::default());
    let fake = {
        let state = state.clone();
        let mut server = server;
        std::thread::spawn(move || {
            while let Some(req) = read_req(&mut server) {
                if server.write_all(&state.handle(&req)).is_err() {
                    break;
                }
            }
        })
    };
    let store = XenBusStore::from_stream(client).expect("client").with_request_timeout(T);
    let mut backend = XenBackend::new(Arc::new(store), Arc::new(NoRings), BackendConfig::default(), Scope::AllDomains)
        .expect("the backend registers its watch");
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let looper = std::thread::spawn(move || {
        let result = backend.run();
        drop(backend);
        let _ = done_tx.send(());
        result
    });
    // The backend is up: its watch is registered and it listed the (empty) vbd directory.
    let deadline = std::time::Instant::now() + T;
    while !state.requests.lock().expect("lock").iter().any(|r| r.path() == "/local/domain/0/backend/vbd") {
        assert!(std::time::Instant::now() < deadline, "the backend never listed its vbds");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(thread_names().iter().any(|n| n == "xenstore-reader"));
    hangup.shutdown(Shutdown::Both).expect("xenstored hangs up");
    done_rx.recv_timeout(BOUND).expect("the loop ends and the store is dropped within the bound");
    let result = looper.join().expect("no panic");
    assert_eq!(result, Err(XenError::Disconnected { what: "xenstore" }));
    assert!(within(SETTLE, || !thread_names().iter().any(|n| n == "xenstore-reader")), "the reader thread was joined");
    fake.join().expect("fake xenstored");
}

/// (Part of the next test: both count this process's xenstore reader threads.)
fn an_idle_wire_connection_closed_by_xenstored_wakes_its_owner_and_fails_every_call() {
    let (client, server) = UnixStream::pair().expect("socketpair");
    let store = XenBusStore::from_stream(client).expect("client").with_request_timeout(T);
    drop(server);
    assert!(xenstore_wire_fake::readable(store.watch_fd(), 5000), "the watch fd wakes the owner up");
    let gone = XenError::Disconnected { what: "xenstore" };
    let mut events = Vec::new();
    assert_eq!(store.take_watch_events(&mut events), Err(gone.clone()));
    assert!(events.is_empty());
    let t0 = std::time::Instant::now();
    assert_eq!(store.read(TxId::NONE, "/local/domain/0"), Err(gone.clone()));
    assert_eq!(store.watch("/local/domain/0/backend", "t"), Err(gone.clone()));
    assert_eq!(store.transaction_start(), Err(gone));
    assert!(t0.elapsed() < BOUND, "calls fail at once instead of waiting for a reply");
    assert!(xenstore_wire_fake::readable(store.watch_fd(), 0), "and the fd stays readable");
}
