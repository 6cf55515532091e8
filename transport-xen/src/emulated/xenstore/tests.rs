// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
use super::*;
use crate::services::{read_optional, with_transaction, PermAccess};

fn events(store: &EmulatedXenStore) -> Vec<(String, String)> {
    let mut out = Vec::new();
    store.take_watch_events(&mut out).expect("events");
    out.into_iter().map(|e| (e.path, e.token)).collect()
}

fn readable(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, zero timeout.
    unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
}

#[test]
fn read_write_mkdir_rm_directory() {
    let s = EmulatedXenStore::new().expect("store");
    s.write(TxId::NONE, "/a/b", b"hello").expect("write");
    assert_eq!(s.read(TxId::NONE, "/a/b").expect("read"), b"hello");
    assert_eq!(s.read(TxId::NONE, "/a").expect("parent created"), b"");
    s.mkdir(TxId::NONE, "/a/c").expect("mkdir");
    s.mkdir(TxId::NONE, "/a/b").expect("mkdir existing keeps the value");
    assert_eq!(s.read(TxId::NONE, "/a/b").expect("read"), b"hello");
    assert_eq!(s.directory(TxId::NONE, "/a").expect("dir"), vec!["b", "c"]);
    s.rm(TxId::NONE, "/a").expect("rm");
    assert_eq!(read_optional(&s, TxId::NONE, "/a/b").expect("read"), None);
    assert!(matches!(s.read(TxId::NONE, "/a"), Err(XenError::NotFound { .. })));
    assert!(s.write(TxId::NONE, "/bad//path", b"").is_err());
    assert!(matches!(
        s.write(TxId::NONE, "/big", &vec![b'x'; MAX_VALUE_LEN + 1]),
        Err(XenError::Os { errno: libc::E2BIG, .. })
    ));
    s.write(TxId::NONE, "/max", &vec![b'x'; MAX_VALUE_LEN]).expect("4096 bytes fit");
}

#[test]
fn watches_fire_on_registration_node_and_children_not_parents() {
    let s = EmulatedXenStore::new().expect("store");
    s.write(TxId::NONE, "/be/vbd/5/768/state", b"1").expect("write");
    assert!(!readable(s.watch_fd()));
    s.watch("/be/vbd/5/768", "tok").expect("watch");
    assert!(readable(s.watch_fd()));
    assert_eq!(events(&s), vec![("/be/vbd/5/768".to_owned(), "tok".to_owned())]);
    assert!(!readable(s.watch_fd()), "take_watch_events clears the fd");
    s.write(TxId::NONE, "/be/vbd/5/768/state", b"2").expect("child");
    s.write(TxId::NONE, "/be/vbd/5/768", b"x").expect("node");
    s.write(TxId::NONE, "/be/vbd/5", b"parent").expect("parent");
    s.write(TxId::NONE, "/be/vbd/5/7680", b"sibling with a common prefix").expect("sibling");
    assert_eq!(
        events(&s),
        vec![("/be/vbd/5/768/state".to_owned(), "tok".to_owned()), ("/be/vbd/5/768".to_owned(), "tok".to_owned())]
    );
    // Removing an ancestor fires the watch with the watched path.
    s.rm(TxId::NONE, "/be/vbd").expect("rm");
    let ev = events(&s);
    assert!(ev.contains(&("/be/vbd/5/768".to_owned(), "tok".to_owned())), "{ev:?}");
    s.unwatch("/be/vbd/5/768", "tok").expect("unwatch");
    s.write(TxId::NONE, "/be/vbd/5/768", b"y").expect("write");
    assert!(events(&s).is_empty());
    assert!(matches!(s.unwatch("/be/vbd/5/768", "tok"), Err(XenError::NotFound { .. })));
}

#[test]
fn connections_have_their_own_watches_and_relative_paths() {
    let dom0 = EmulatedXenStore::new().expect("store");
    dom0.mkdir(TxId::NONE, "/local/domain/7").expect("mkdir");
    dom0.set_perms(TxId::NONE, "/local/domain/7", &[Permission { domid: 7, access: PermAccess::None }]).expect("perms");
    let guest = dom0.connect(7).expect("connect");
    guest.watch("device", "t").expect("relative watch");
    assert_eq!(events(&guest), vec![("device".to_owned(), "t".to_owned())]);
    guest.write(TxId::NONE, "device/vbd/768/state", b"1").expect("relative write");
    assert_eq!(dom0.read(TxId::NONE, "/local/domain/7/device/vbd/768/state").expect("read"), b"1");
    assert_eq!(events(&guest), vec![("device/vbd/768/state".to_owned(), "t".to_owned())]);
    assert!(events(&dom0).is_empty());
    assert_eq!(
        guest.get_perms(TxId::NONE, "device/vbd/768").expect("perms")[0].domid,
        7,
        "domains own what they create"
    );
    drop(guest);
    dom0.write(TxId::NONE, "/local/domain/7/device/vbd/768/state", b"2").expect("write after the guest left");
}

#[test]
fn permissions_are_enforced_for_domains_and_watch_events() {
    let dom0 = EmulatedXenStore::new().expect("store");
    dom0.write(TxId::NONE, "/backend/vbd/3/768/state", b"2").expect("write");
    let acl = [Permission { domid: 0, access: PermAccess::None }, Permission { domid: 3, access: PermAccess::Read }];
    dom0.set_perms(TxId::NONE, "/backend/vbd/3/768/state", &acl).expect("perms");
    let guest3 = dom0.connect(3).expect("connect");
    let guest4 = dom0.connect(4).expect("connect");
    assert_eq!(guest3.read(TxId::NONE, "/backend/vbd/3/768/state").expect("acl"), b"2");
    assert!(matches!(guest4.read(TxId::NONE, "/backend/vbd/3/768/state"), Err(XenError::Access { .. })));
    assert!(matches!(guest3.write(TxId::NONE, "/backend/vbd/3/768/state", b"6"), Err(XenError::Access { .. })));
    assert!(matches!(guest3.rm(TxId::NONE, "/backend/vbd/3/768/state"), Err(XenError::Access { .. })));
    assert!(matches!(guest3.write(TxId::NONE, "/backend/other", b"x"), Err(XenError::Access { .. })));
    guest3.watch("/backend/vbd/3/768", "w").expect("watch");
    guest4.watch("/backend/vbd/3/768", "w").expect("watch");
    let _ = (events(&guest3), events(&guest4));
    dom0.write(TxId::NONE, "/backend/vbd/3/768/state", b"4").expect("write");
    assert_eq!(events(&guest3).len(), 1);
    assert!(events(&guest4).is_empty(), "no events for nodes the watcher cannot read");
}

#[test]
fn transactions_commit_abort_and_conflict() {
    let s = EmulatedXenStore::new().expect("store");
    let other = s.connect(0).expect("connect");
    s.write(TxId::NONE, "/be/physical-device", b"8:0").expect("write");
    s.watch("/be", "w").expect("watch");
    let _ = events(&s);

    let tx = s.transaction_start().expect("start");
    assert_eq!(s.read(tx, "/be/physical-device").expect("read"), b"8:0");
    s.write(tx, "/be/opened", b"0").expect("write in tx");
    assert!(matches!(s.read(TxId::NONE, "/be/opened"), Err(XenError::NotFound { .. })), "isolated");
    assert!(events(&s).is_empty(), "no events before commit");
    s.transaction_end(tx, true).expect("commit");
    assert_eq!(s.read(TxId::NONE, "/be/opened").expect("read"), b"0");
    assert_eq!(events(&s), vec![("/be/opened".to_owned(), "w".to_owned())]);

    let tx = s.transaction_start().expect("start");
    s.write(tx, "/be/x", b"1").expect("write");
    s.transaction_end(tx, false).expect("abort");
    assert!(matches!(s.read(TxId::NONE, "/be/x"), Err(XenError::NotFound { .. })));

    // A node read in the transaction changes under it: EAGAIN.
    let tx = s.transaction_start().expect("start");
    let _ = s.read(tx, "/be/physical-device").expect("read");
    other.write(TxId::NONE, "/be/physical-device", b"8:16").expect("concurrent write");
    s.write(tx, "/be/diskseq-seen", b"1").expect("write");
    assert_eq!(s.transaction_end(tx, true), Err(XenError::Again));
    assert!(matches!(s.read(TxId::NONE, "/be/diskseq-seen"), Err(XenError::NotFound { .. })));

    // Unrelated concurrent writes do not conflict; a missing node created meanwhile does.
    let tx = s.transaction_start().expect("start");
    let _ = read_optional(&s, tx, "/be/diskseq").expect("read");
    other.write(TxId::NONE, "/unrelated", b"1").expect("write");
    s.transaction_end(tx, true).expect("no conflict");
    let tx = s.transaction_start().expect("start");
    let _ = read_optional(&s, tx, "/be/diskseq").expect("read");
    other.write(TxId::NONE, "/be/diskseq", b"1f").expect("write");
    assert_eq!(s.transaction_end(tx, true), Err(XenError::Again));

    // The helper retries.
    let mut tries = 0;
    let v = with_transaction(&s, 5, |tx| {
        tries += 1;
        let v = s.read(tx, "/be/diskseq")?;
        if tries == 1 {
            other.write(TxId::NONE, "/be/diskseq", b"20").expect("interfere once");
        }
        Ok(v)
    })
    .expect("retried");
    assert_eq!((tries, v), (2, b"20".to_vec()));
    // Transactions of another connection are not ours.
    let tx = s.transaction_start().expect("start");
    assert!(other.read(tx, "/be").is_err());
    assert!(other.transaction_end(tx, true).is_err());
    s.transaction_end(tx, false).expect("abort");
}

#[test]
fn transaction_removal_and_special_watches() {
    let s = EmulatedXenStore::new().expect("store");
    s.write(TxId::NONE, "/a/b/c", b"1").expect("write");
    s.watch("/a/b/c", "deep").expect("watch");
    s.watch("@releaseDomain", "rel").expect("special");
    let _ = events(&s);
    let tx = s.transaction_start().expect("start");
    s.rm(tx, "/a/b").expect("rm in tx");
    s.transaction_end(tx, true).expect("commit");
    assert!(matches!(s.read(TxId::NONE, "/a/b/c"), Err(XenError::NotFound { .. })));
    assert_eq!(events(&s), vec![("/a/b/c".to_owned(), "deep".to_owned())]);
    s.fire_special("@releaseDomain");
    assert_eq!(events(&s), vec![("@releaseDomain".to_owned(), "rel".to_owned())]);
    assert!(s.watch("@bad/name", "x").is_err());
}

#[test]
fn a_dropped_connection_fails_every_call_and_wakes_its_owner() {
    let s = EmulatedXenStore::new().expect("store");
    let other = s.connect(0).expect("second connection");
    s.write(TxId::NONE, "/a", b"1").expect("write");
    s.watch("/a", "tok").expect("watch");
    let tx = s.transaction_start().expect("transaction");
    events(&s);
    assert!(s.is_connected());
    s.disconnect();
    assert!(!s.is_connected());
    assert!(readable(s.watch_fd()), "the owner's poll wakes up");
    let gone = XenError::Disconnected { what: "xenstore" };
    assert_eq!(s.read(TxId::NONE, "/a"), Err(gone.clone()));
    assert_eq!(s.write(TxId::NONE, "/a", b"2"), Err(gone.clone()));
    assert_eq!(s.mkdir(TxId::NONE, "/b"), Err(gone.clone()));
    assert_eq!(s.rm(TxId::NONE, "/a"), Err(gone.clone()));
    assert_eq!(s.directory(TxId::NONE, "/"), Err(gone.clone()));
    assert_eq!(s.get_perms(TxId::NONE, "/a").map(|_| ()), Err(gone.clone()));
    assert_eq!(s.transaction_start(), Err(gone.clone()));
    assert_eq!(s.transaction_end(tx, true), Err(gone.clone()));
    assert_eq!(s.watch("/a", "t2"), Err(gone.clone()));
    assert_eq!(s.unwatch("/a", "tok"), Err(gone.clone()));
    let mut out = Vec::new();
    assert_eq!(s.take_watch_events(&mut out), Err(gone));
    assert!(readable(s.watch_fd()), "the watch fd stays readable");
    // The other connection still works, and the dropped one's watch no longer fires.
    other.write(TxId::NONE, "/a", b"3").expect("other connection");
    assert_eq!(other.read(TxId::NONE, "/a").expect("read"), b"3");
}
