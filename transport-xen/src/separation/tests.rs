// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The supervisor's broker and the worker's client, in one process over a real socket pair, on the emulated
//! xenstore: a worker reaches its own guest's vbd nodes and nothing else, gets its disks opened from the nodes
//! the toolstack wrote (never from what the worker wrote), and a worker that sends garbage is cut off.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::emulated::EmulatedXenStore;
use crate::services::{TxId, WatchEvent, XenError, XenStore};
use crate::xenbus::device::{DeviceNodes, DiskOpener, LocalDiskOpener};
use crate::xenbus::VbdId;
use device_blk::disk::DirectIo;

use super::broker::{Broker, SessionEnd, Welcome};
use super::client::{BrokeredDisks, BrokeredGrants, BrokeredStore, Channel};
use super::grants::{GrantLedger, WorkerGrantDevice};
use super::wire::{self, Reply, Request, WireError};
use crate::services::{GrantTable, MapAccess};
use crate::xen::GntDev;

/// An attempt the policy must refuse.
type Attempt<'a> = Box<dyn Fn() -> Result<(), XenError> + 'a>;

const DOM0: &str = "/local/domain/0";

/// The grant registrations a broker made: (domain, refs).
type Registered = Arc<std::sync::Mutex<Vec<(u16, Vec<u32>)>>>;

/// The grant pages a session's worker may hold.
const BUDGET: u64 = 64;

/// As gntdev answers: an offset per registration (4 GiB apart), ref 13 is "bad". The worker's mappings are what
/// the test says.
struct TestGrants {
    log: Registered,
    mapped: Arc<Mutex<Vec<(u64, u64)>>>,
    dropped: Arc<Mutex<Vec<u64>>>,
}

/// The offset of the `n`th registration (from 1).
fn offset(n: u64) -> u64 {
    n << 32
}

impl WorkerGrantDevice for TestGrants {
    fn register(&self, domid: u16, refs: &[u32]) -> Result<u64, XenError> {
        if refs.contains(&13) {
            return Err(XenError::Os { what: "gntdev: register".into(), errno: libc::EINVAL });
        }
        let mut log = self.log.lock().expect("log");
        log.push((domid, refs.to_vec()));
        Ok(offset(log.len() as u64))
    }

    fn unregister(&self, index: u64, _pages: usize) -> bool {
        self.dropped.lock().expect("dropped").push(index);
        true
    }

    fn stop(&mut self) -> Result<(), XenError> {
        Ok(())
    }

    fn resume(&mut self) {}

    fn mapped(&mut self) -> Result<Vec<(u64, u64)>, XenError> {
        Ok(self.mapped.lock().expect("mapped").clone())
    }
}

struct Session {
    store: Arc<EmulatedXenStore>,
    registered: Registered,
    mapped: Arc<Mutex<Vec<(u64, u64)>>>,
    dropped: Arc<Mutex<Vec<u64>>>,
    worker: BrokeredStore,
    channel: Arc<Channel>,
    broker: std::thread::JoinHandle<SessionEnd>,
    _dir: tempfile::TempDir,
    image: std::path::PathBuf,
}

/// A broker for guest 7 on a fresh emulated xenstore with vbds of guests 7 and 8, and the worker's client.
fn session() -> Session {
    let store = Arc::new(EmulatedXenStore::new().expect("xenstore"));
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    File::create(&image).and_then(|f| f.set_len(1 << 20)).expect("image");
    let control = dir.path().join("dom7.ctl");
    for domid in [7, 8] {
        let be = format!("{DOM0}/backend/vbd/{domid}/51712");
        for (node, value) in [("params", image.to_str().expect("utf8")), ("mode", "w"), ("state", "1")] {
            store.write(TxId::NONE, &format!("{be}/{node}"), value.as_bytes()).expect("write");
        }
        store.write(TxId::NONE, &format!("/local/domain/{domid}/device/vbd/51712/state"), b"1").expect("write");
    }
    let (supervisor_rpc, worker_rpc) = wire::seqpacket_pair().expect("pair");
    let (supervisor_events, worker_events) = wire::seqpacket_pair().expect("pair");
    let registered = Registered::default();
    let record = registered.clone();
    let mapped = Arc::new(Mutex::new(Vec::new()));
    let dropped = Arc::new(Mutex::new(Vec::new()));
    let broker = Broker {
        domid: 7,
        domain_path: DOM0.into(),
        store: store.clone(),
        rpc: supervisor_rpc,
        events: supervisor_events,
        welcome: Some(Welcome {
            events: OwnedFd::from(worker_events),
            grants: File::open("/dev/null").expect("null"),
            control: Some((UnixListener::bind(&control).expect("bind"), control.to_string_lossy().into_owned())),
        }),
        evtchn: Box::new(|_| File::open("/dev/null").map_err(|e| XenError::os("open", &e))),
        grants: GrantLedger::new(
            Box::new(TestGrants { log: record, mapped: mapped.clone(), dropped: dropped.clone() }),
            BUDGET,
        ),
        disks: Arc::new(LocalDiskOpener),
        direct_io: DirectIo::Auto,
        send_timeout: Duration::from_millis(300),
    };
    let broker = std::thread::spawn(move || broker.serve());
    let channel = Arc::new(Channel::new(worker_rpc));
    let welcomed = channel.hello().expect("hello");
    let (listener, path) = welcomed.control.expect("the control socket is handed over");
    assert_eq!(path, control);
    drop(listener);
    let worker = BrokeredStore::new(channel.clone(), welcomed.events).expect("client");
    Session { store, registered, mapped, dropped, worker, channel, broker, _dir: dir, image }
}

#[test]
fn a_worker_reaches_only_its_own_guests_vbd_nodes() {
    let s = session();
    let own = format!("{DOM0}/backend/vbd/7/51712");
    assert_eq!(s.worker.read(TxId::NONE, &format!("{own}/mode")).expect("own node"), b"w");
    assert_eq!(s.worker.directory(TxId::NONE, &format!("{DOM0}/backend/vbd/7")).expect("list"), ["51712"]);
    assert_eq!(s.worker.read(TxId::NONE, "/local/domain/7/device/vbd/51712/state").expect("frontend"), b"1");
    s.worker.write(TxId::NONE, &format!("{own}/state"), b"2").expect("state is the backend's to write");
    assert_eq!(s.store.read(TxId::NONE, &format!("{own}/state")).expect("read"), b"2");
    let tx = s.worker.transaction_start().expect("transaction");
    s.worker.write(tx, &format!("{own}/sectors"), b"2048").expect("write in a transaction");
    s.worker.transaction_end(tx, true).expect("commit");

    let refused: [(&str, Attempt); 8] = [
        (
            "another guest's node",
            Box::new(|| s.worker.read(TxId::NONE, &format!("{DOM0}/backend/vbd/8/51712/params")).map(drop)),
        ),
        ("the vbd root", Box::new(|| s.worker.directory(TxId::NONE, &format!("{DOM0}/backend/vbd")).map(drop))),
        ("the disk's name", Box::new(|| s.worker.write(TxId::NONE, &format!("{own}/params"), b"/etc/shadow"))),
        ("the pin", Box::new(|| s.worker.write(TxId::NONE, &format!("{own}/physical-device"), b"8:0"))),
        ("the frontend", Box::new(|| s.worker.write(TxId::NONE, "/local/domain/7/device/vbd/51712/state", b"6"))),
        ("a removal", Box::new(|| s.worker.rm(TxId::NONE, &own))),
        ("another guest's watch", Box::new(|| s.worker.watch(&format!("{DOM0}/backend/vbd/8"), "t"))),
        ("a toolstack node", Box::new(|| s.worker.read(TxId::NONE, "/local/domain/7/name").map(drop))),
    ];
    for (what, attempt) in refused {
        assert!(matches!(attempt(), Err(XenError::Access { .. })), "{what} must be refused");
    }
    assert_eq!(
        s.store.read(TxId::NONE, &format!("{own}/params")).expect("read"),
        s.image.to_str().expect("utf8").as_bytes()
    );

    // Watches of its own nodes reach the worker on its event socket.
    s.worker.watch(&own, "mine").expect("watch");
    s.store.write(TxId::NONE, &format!("{own}/hotplug-status"), b"connected").expect("toolstack write");
    let mut events = Vec::new();
    for _ in 0..100 {
        s.worker.take_watch_events(&mut events).expect("events");
        if events.iter().any(|e| e.path.ends_with("hotplug-status")) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(events.contains(&WatchEvent { path: format!("{own}/hotplug-status"), token: "mine".into() }), "{events:?}");
    drop(s.worker);
    drop(s.channel);
    assert_eq!(s.broker.join().expect("broker"), SessionEnd::Closed);
}

#[test]
fn disks_are_opened_from_the_toolstacks_nodes_not_the_workers() {
    let s = session();
    let disks = BrokeredDisks { channel: s.channel.clone(), domid: 7 };
    // Whatever the worker claims the nodes say, the supervisor reads them itself.
    let claimed =
        DeviceNodes { params: Some(b"/etc/shadow".to_vec()), mode: Some(b"w".to_vec()), ..DeviceNodes::default() };
    let opened = disks.open(VbdId { domid: 7, devid: 51712 }, &claimed, DirectIo::Auto).expect("open").expect("named");
    assert_eq!(opened.disk.path(), s.image.as_path());
    assert_eq!(opened.disk.geometry().capacity.0, 2048);
    // A vbd the guest does not have: the nodes name nothing.
    let none = disks.open(VbdId { domid: 7, devid: 1 }, &claimed, DirectIo::Auto).expect("no fatal");
    assert!(none.is_none());
    // Another guest's vbd is never asked for.
    assert!(disks.open(VbdId { domid: 8, devid: 51712 }, &claimed, DirectIo::Auto).is_err());
}

/// The worker names grant refs, never a domain: what it can map afterwards is what its own guest granted. (Its
/// system call filter refuses the gntdev calls that name a domain: `daemon/src/sandbox/tests.rs`.)
#[test]
fn a_worker_registers_only_its_own_guests_grants() {
    let s = session();
    assert_eq!(
        s.channel.call_plain(&Request::MapGrants { refs: vec![8, 9] }).expect("answer"),
        Reply::Registered { index: offset(1) }
    );
    // Bounds are the broker's: an empty or oversized batch is an error, and the session goes on.
    for refs in [vec![], vec![1; wire::MAX_BROKERED_REFS + 1]] {
        let reply = s.channel.call_plain(&Request::MapGrants { refs }).expect("answer");
        assert!(matches!(reply, Reply::Failed(WireError::Os { errno: libc::EINVAL, .. })), "{reply:?}");
    }
    // The client: another domain's grants are not even asked for; a refused ref is the device's error; a
    // registered batch is mmapped on the worker's own handle (/dev/null here, which cannot be mapped).
    let grants = BrokeredGrants::new(s.channel.clone(), GntDev::open_path("/dev/null".as_ref()).expect("null"), 7);
    let err = grants.map(8, &[8], MapAccess::ReadOnly).expect_err("another guest");
    assert!(matches!(err, XenError::Access { .. }), "{err}");
    let err = grants.map(7, &[12, 13], MapAccess::ReadWrite).expect_err("a bad ref");
    assert!(matches!(err, XenError::Os { errno: libc::EINVAL, .. }), "{err}");
    let err = grants.map(7, &[10, 11], MapAccess::ReadWrite).expect_err("/dev/null cannot be mapped");
    assert!(matches!(err, XenError::Os { .. }) && err.to_string().contains(&format!("{:#x}", offset(2))), "{err}");
    // SAFETY: no op, nothing is touched.
    let err = unsafe { grants.copy(&mut []) }.expect_err("grant copy names domains: not brokered");
    assert!(matches!(err, XenError::Os { errno: libc::EPERM, .. }), "{err}");
    assert_eq!(*s.registered.lock().expect("log"), [(7, vec![8, 9]), (7, vec![10, 11])]);
    drop(grants);
    drop(s.worker);
    drop(s.channel);
    assert_eq!(s.broker.join().expect("broker"), SessionEnd::Closed);
}

/// gntdev's pages and Xen's maptrack entries are the backend domain's, shared by every guest: a worker that keeps
/// everything it maps is refused more once it holds its budget (`ENOSPC`, and the session goes on), and gets room
/// again when it unmaps.
#[test]
fn a_worker_holding_its_budget_of_grant_pages_is_refused_more() {
    let s = session();
    let map = |count: u32| s.channel.call_plain(&Request::MapGrants { refs: (100..100 + count).collect() });
    let pages = |n: u64| n * transport_xen_page();
    assert_eq!(map(40).expect("answer"), Reply::Registered { index: offset(1) });
    // The worker keeps one page of it: the whole registration stays charged.
    *s.mapped.lock().expect("mapped") = vec![(offset(1) + pages(39), pages(1))];
    let reply = map(30).expect("answer");
    match &reply {
        Reply::Failed(WireError::Os { errno: libc::ENOSPC, what }) => {
            assert!(what.contains("40 grant pages"), "{what}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(map(24).expect("answer"), Reply::Registered { index: offset(2) }, "40 + 24 fit in 64");
    *s.mapped.lock().expect("mapped") = vec![(offset(1), pages(40)), (offset(2), pages(24))];
    assert!(matches!(map(1).expect("answer"), Reply::Failed(WireError::Os { errno: libc::ENOSPC, .. })));
    // It unmaps the first: room again, once the backoff after the refusals is over.
    *s.mapped.lock().expect("mapped") = vec![(offset(2), pages(24))];
    std::thread::sleep(Duration::from_millis(50));
    assert!(matches!(map(30).expect("answer"), Reply::Registered { .. }), "room again after unmapping");
    assert_eq!(s.registered.lock().expect("log").len(), 3, "refused maps were never registered");
    assert_eq!(*s.dropped.lock().expect("dropped"), [offset(1)], "the unmapped registration, and only it");
    // A mapping of no registration the broker made (an offset gntdev would not take): the worker is cut off.
    s.mapped.lock().expect("mapped").push((offset(9), pages(1)));
    std::thread::sleep(Duration::from_millis(50));
    assert!(map(64).is_err(), "no answer: the session ended");
    drop(s.worker);
    drop(s.channel);
    assert!(matches!(s.broker.join().expect("broker"), SessionEnd::Misbehaved(why) if why.contains("no registration")));
}

fn transport_xen_page() -> u64 {
    crate::services::XEN_PAGE_SIZE as u64
}

/// xenstored does not hold dom0's connections to its guest quotas, so the broker does: a worker cannot grow the
/// store (nodes of vbds that do not exist, large values) nor hold more than a guest's share of watches and
/// transactions.
#[test]
fn a_worker_stays_within_a_guests_xenstore_quota() {
    use super::policy::{MAX_TRANSACTIONS, MAX_VALUE, MAX_WATCHES};
    let s = session();
    let own = format!("{DOM0}/backend/vbd/7/51712");
    let ghost = format!("{DOM0}/backend/vbd/7/99");
    for path in [format!("{ghost}/state"), format!("{DOM0}/error/backend/vbd/7/99/error")] {
        let err = s.worker.write(TxId::NONE, &path, b"1").expect_err("no such vbd");
        assert!(matches!(err, XenError::NotFound { .. }), "{path}: {err}");
    }
    assert!(s.store.read(TxId::NONE, &ghost).is_err(), "nothing was created for a vbd that does not exist");
    s.worker.write(TxId::NONE, &format!("{DOM0}/error/backend/vbd/7/51712/error"), b"5 bad").expect("own vbd");
    let err = s.worker.write(TxId::NONE, &format!("{own}/info"), &vec![b'1'; MAX_VALUE + 1]).expect_err("too long");
    assert!(matches!(err, XenError::Os { errno: libc::ENOSPC, .. }), "{err}");

    for i in 0..MAX_WATCHES {
        s.worker.watch(&own, &format!("w{i}")).expect("within the quota");
    }
    // A watch held already is no new one: xenstore's own answer, not the quota's.
    let err = s.worker.watch(&own, "w0").expect_err("a duplicate");
    assert!(matches!(err, XenError::Os { errno: libc::EEXIST, .. }), "{err}");
    let err = s.worker.watch(&own, "one-more").expect_err("beyond the quota");
    assert!(matches!(err, XenError::Os { errno: libc::ENOSPC, .. }), "{err}");
    s.worker.unwatch(&own, "w0").expect("unwatch");
    s.worker.watch(&own, "one-more").expect("room again");

    let open: Vec<TxId> = (0..MAX_TRANSACTIONS).map(|_| s.worker.transaction_start().expect("within")).collect();
    let err = s.worker.transaction_start().expect_err("beyond the quota");
    assert!(matches!(err, XenError::Os { errno: libc::ENOSPC, .. }), "{err}");
    s.worker.transaction_end(open[0], false).expect("abort");
    s.worker.transaction_start().expect("room again");
}

/// A worker that stops reading cannot hold its broker (and the supervisor thread that joins it) for ever: a send
/// that finds no room for the send timeout ends the session; and the worker cannot queue anything on the event
/// socket (a descriptor of its own end left there would keep the broker's peer alive after the worker died).
#[test]
fn a_worker_that_stops_reading_is_cut_off() {
    let s = session();
    let own = format!("{DOM0}/backend/vbd/7/51712");
    let err = s.worker.events_socket().send(b"anything").expect_err("the event socket is one way");
    assert_eq!(err.raw_os_error(), Some(libc::EPIPE), "{err}");
    s.worker.watch(&own, "flood").expect("watch");
    let started = std::time::Instant::now();
    // Events the worker never reads, until the broker gives up on it.
    while !s.broker.is_finished() && started.elapsed() < Duration::from_secs(20) {
        s.store.write(TxId::NONE, &format!("{own}/hotplug-status"), b"connected").expect("toolstack write");
    }
    let end = s.broker.join().expect("broker");
    assert!(matches!(&end, SessionEnd::Misbehaved(why) if why.contains("watch event")), "{end:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "cut off after {:?}", started.elapsed());
}

#[test]
fn a_worker_that_sends_garbage_is_cut_off() {
    let (supervisor_rpc, worker_rpc) = wire::seqpacket_pair().expect("pair");
    let (supervisor_events, worker_events) = wire::seqpacket_pair().expect("pair");
    let broker = Broker {
        domid: 7,
        domain_path: DOM0.into(),
        store: Arc::new(EmulatedXenStore::new().expect("xenstore")),
        rpc: supervisor_rpc,
        events: supervisor_events,
        welcome: Some(Welcome {
            events: OwnedFd::from(worker_events),
            grants: File::open("/dev/null").expect("null"),
            control: None,
        }),
        evtchn: Box::new(|_| Err(XenError::Again)),
        grants: GrantLedger::new(
            Box::new(TestGrants { log: Registered::default(), mapped: Arc::default(), dropped: Arc::default() }),
            1024,
        ),
        disks: Arc::new(LocalDiskOpener),
        direct_io: DirectIo::Auto,
        send_timeout: Duration::from_millis(300),
    };
    let handle = std::thread::spawn(move || broker.serve());
    worker_rpc.send(&[0xff; 64]).expect("send garbage");
    assert!(matches!(handle.join().expect("broker"), SessionEnd::Misbehaved(_)));
}
