// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A backend restarted under a running guest: stopped gracefully (SIGTERM), or killed without a word to xenstore
//! (with and without `--cleanup` afterwards), or dead before it connected. The vbd goes through Closed (the
//! frontend sees it), a new backend on the same store takes the existing vbd over, and once the frontend starts
//! over (Initialising, as Linux blkfront's probe writes) the same disk is served again with the data written
//! before the restart.

mod backend_support;

use std::time::Duration;

use backend_support::{BackendProcess, Host, T};
use transport_xen::blkif::{RSP_ERROR, RSP_OKAY};
use transport_xen::dataplane::DataplaneOptions;
use transport_xen::emulated::GuestDomain;
use transport_xen::frontend::load::{check_pattern, fill_pattern};
use transport_xen::frontend::{Blkfront, BlkfrontConfig, Completion, DiskSpec, IoRequest, XVDA};
use transport_xen::services::{TxId, XenError, XenStore};
use transport_xen::xenbus::{close_vbd_failing_io, BackendConfig, Cleanup, VbdId, XenbusState};

const DISK: u64 = 8 << 20;

fn backend(host: &Host) -> BackendProcess {
    BackendProcess::real(&host.host, BackendConfig::default(), DataplaneOptions::default())
}

fn config() -> BlkfrontConfig {
    BlkfrontConfig { ring_page_order: 1, queues: 2, persistent: true, ..BlkfrontConfig::default() }
}

/// Write generation `generation` of the pattern over the first 256 KiB and flush.
fn write_data(front: &mut Blkfront<'_>, generation: u32) {
    let mut data = vec![0u8; 64 << 10];
    for chunk in 0..4u64 {
        fill_pattern(&mut data, chunk * 128, generation);
        front.write(chunk * 128, &data).expect("write");
    }
    assert_eq!(front.flush().expect("flush"), RSP_OKAY);
}

/// The first 256 KiB hold generation `generation` of the pattern.
fn check_data(front: &mut Blkfront<'_>, generation: u32) {
    for chunk in 0..4u64 {
        let data = front.read(chunk * 128, 64 << 10).expect("read");
        assert_eq!(check_pattern(&data, chunk * 128, generation), None, "chunk {chunk}");
    }
}

fn frontend_state(guest: &GuestDomain, id: VbdId) -> String {
    let store = guest.xenstore().expect("guest store");
    let state = store.read(TxId::NONE, &format!("/local/domain/{}/device/vbd/{}/state", id.domid, id.devid));
    String::from_utf8_lossy(&state.expect("frontend state")).into_owned()
}

/// The frontend starts over as Linux blkfront's probe does (state Initialising), waits for the backend's
/// InitWait and connects again.
fn start_over<'g>(host: &Host, guest: &'g GuestDomain, id: VbdId) -> Blkfront<'g> {
    let store = guest.xenstore().expect("guest store");
    let fe = format!("/local/domain/{}/device/vbd/{}", id.domid, id.devid);
    store.write(TxId::NONE, &format!("{fe}/state"), XenbusState::Initialising.as_node().as_bytes()).expect("state");
    host.wait_state(id, XenbusState::InitWait);
    Blkfront::connect(guest, XVDA, config()).expect("connect again")
}

#[test]
fn graceful_restart_closes_the_vbd_and_a_new_backend_serves_it_again() {
    let host = Host::new();
    let a = backend(&host);
    let guest = host.host.add_guest(51, 1024).expect("guest");
    let id = host.add_disk(51, DISK);
    let mut front = Blkfront::connect(&guest, XVDA, config()).expect("connect");
    write_data(&mut front, 1);

    a.stop().expect("the backend stops cleanly");
    assert_eq!(
        host.toolstack.store().read(TxId::NONE, &host.toolstack.paths(id).node("state")).as_deref().ok(),
        Some(&b"6"[..]),
        "Closed"
    );
    front.finish_after_backend_close().expect("the frontend saw Closed, closed too, and revoked every grant");
    assert_eq!(frontend_state(&guest, id), "6");
    assert_eq!(host.host.live_mappings(), 0);

    let b = backend(&host);
    // The new backend takes the vbd over and keeps it Closed until the frontend starts over.
    std::thread::sleep(Duration::from_millis(100));
    host.wait_state(id, XenbusState::Closed);
    let mut front = start_over(&host, &guest, id);
    check_data(&mut front, 1);
    write_data(&mut front, 2);
    check_data(&mut front, 2);
    front.close().expect("close");
    b.stop().expect("stop");
    assert_eq!(host.host.live_mappings(), 0);
}

/// Queue `n` 4 KiB writes on queue 0 without waiting.
fn queue_writes(front: &mut Blkfront<'_>, n: u64) {
    let data = vec![0x33u8; 4096];
    for i in 0..n {
        assert!(front.submit(0, &IoRequest::Write { sector: 4096 + i * 8, data: &data }, 100 + i).expect("submit"));
    }
    front.kick(0).expect("kick");
}

#[test]
fn killed_backend_cleanup_answers_what_it_left_and_a_new_backend_serves_the_vbd_again() {
    let host = Host::new();
    let a = backend(&host);
    let guest = host.host.add_guest(52, 1024).expect("guest");
    let id = host.add_disk(52, DISK);
    let mut front = Blkfront::connect(&guest, XVDA, config()).expect("connect");
    write_data(&mut front, 3);

    // The process dies: nothing is written to xenstore; its grants and ports went with it.
    let (result, _) = a.lose_xenstore();
    assert_eq!(result, Err(XenError::Disconnected { what: "xenstore" }));
    assert_eq!(host.host.live_mappings(), 0);
    // The guest does not know yet: it queues more I/O, which nobody answers.
    queue_writes(&mut front, 3);

    let store = &**host.toolstack.store();
    let (grants, evtchn) = (host.host.grant_table(0), host.host.evtchn_opener(0));
    let done = close_vbd_failing_io(store, &grants, &evtchn, "/local/domain/0", id, "backend died", Duration::ZERO)
        .expect("cleanup");
    assert_eq!(done, Cleanup { closed: true, answered: 3 });
    let mut failed: Vec<Completion> = Vec::new();
    while failed.len() < 3 {
        front.poll(0, &mut failed).expect("the requests left behind are answered");
    }
    assert!(failed.iter().all(|c| c.status == RSP_ERROR), "{:?}", failed.iter().map(|c| c.status).collect::<Vec<_>>());
    front.finish_after_backend_close().expect("the frontend closes; nothing stays mapped");

    let b = backend(&host);
    let mut front = start_over(&host, &guest, id);
    check_data(&mut front, 3);
    write_data(&mut front, 4);
    front.close().expect("close");
    b.stop().expect("stop");
    assert_eq!(host.host.live_mappings(), 0);
}

#[test]
fn killed_backend_without_cleanup_the_new_backend_asks_the_frontend_to_start_over() {
    let host = Host::new();
    let a = backend(&host);
    let guest = host.host.add_guest(53, 1024).expect("guest");
    let id = host.add_disk(53, DISK);
    let mut front = Blkfront::connect(&guest, XVDA, config()).expect("connect");
    write_data(&mut front, 5);
    let (result, _) = a.lose_xenstore();
    assert_eq!(result, Err(XenError::Disconnected { what: "xenstore" }));
    assert_eq!(frontend_state(&guest, id), "4", "the frontend still thinks it is connected");

    // The new backend cannot resume rings another process consumed: it asks the frontend to close.
    let b = backend(&host);
    host.wait_state(id, XenbusState::Closing);
    front.finish_after_backend_close().expect("the frontend closes, the backend follows to Closed");
    host.wait_state(id, XenbusState::Closed);
    let mut front = start_over(&host, &guest, id);
    check_data(&mut front, 5);
    front.close().expect("close");
    b.stop().expect("stop");
    assert_eq!(host.host.live_mappings(), 0);
}

#[test]
fn backend_dead_before_the_connect_the_new_backend_connects_the_published_rings() {
    let host = Host::new();
    let a = backend(&host);
    let guest = host.host.add_guest(54, 1024).expect("guest");
    let id = host.add_disk(54, DISK);
    host.wait_state(id, XenbusState::InitWait);
    let (result, _) = a.lose_xenstore();
    assert_eq!(result, Err(XenError::Disconnected { what: "xenstore" }));
    // Once the frontend has published its rings to the backend that is gone, a new backend starts.
    let starter = {
        let (emulated, store) = (host.host.clone(), host.toolstack.store().clone());
        let fe_state = format!("/local/domain/{}/device/vbd/{}/state", id.domid, id.devid);
        std::thread::spawn(move || {
            transport_xen::frontend::wait_for_value(&*store, &fe_state, b"3", T).expect("the frontend publishes");
            BackendProcess::real(&emulated, BackendConfig::default(), DataplaneOptions::default())
        })
    };
    let mut front = Blkfront::connect(&guest, XVDA, config()).expect("the new backend connected the rings");
    let b = starter.join().expect("no panic");
    write_data(&mut front, 6);
    check_data(&mut front, 6);
    front.close().expect("close");
    b.stop().expect("stop");
    assert_eq!(host.host.live_mappings(), 0);
}

#[test]
fn a_vbd_the_toolstack_detached_while_the_backend_was_down_is_closed_and_released() {
    let host = Host::new();
    let a = backend(&host);
    let guest = host.host.add_guest(55, 1024).expect("guest");
    let id = host.add_disk(55, DISK);
    let front = Blkfront::connect(&guest, XVDA, config()).expect("connect");
    let (result, _) = a.lose_xenstore();
    assert_eq!(result, Err(XenError::Disconnected { what: "xenstore" }));
    host.toolstack.detach(id).expect("detach: online 0, Closing");
    let b = backend(&host);
    front.finish_after_backend_close().expect("the frontend closes; the new backend follows to Closed");
    host.wait_state(id, XenbusState::Closed);
    host.toolstack.remove(id).expect("remove");
    b.stop().expect("stop");
    assert_eq!(host.host.live_mappings(), 0);
}

/// Descriptors of this process open on `path`.
fn fds_on(path: &std::path::Path) -> usize {
    let fds = std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd");
    fds.flatten().filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == path)).count()
}

#[test]
fn a_detached_vbd_is_not_taken_over_and_once_added_again_it_is_served() {
    let host = Host::new();
    let a = backend(&host);
    let guest = host.host.add_guest(56, 1024).expect("guest");
    let id = host.add_disk(56, DISK);
    let image = host.dir.path().join("d56.img");
    let mut front = Blkfront::connect(&guest, XVDA, config()).expect("connect");
    write_data(&mut front, 7);
    assert_eq!(fds_on(&image), 1, "the backend holds the image open");
    host.toolstack.detach(id).expect("detach");
    front.finish_after_backend_close().expect("the frontend closes");
    host.wait_state(id, XenbusState::Closed);
    a.stop().expect("stop");
    assert_eq!(fds_on(&image), 0);

    // The toolstack has not removed the detached vbd yet when the new backend starts: it stays Closed, unopened.
    let b = backend(&host);
    std::thread::sleep(Duration::from_millis(100));
    host.wait_state(id, XenbusState::Closed);
    assert_eq!(fds_on(&image), 0, "a detached vbd's disk is not opened again");
    host.toolstack.remove(id).expect("remove");
    host.toolstack.add_disk(&DiskSpec::new(56, image.to_str().expect("utf-8"))).expect("attach again");
    let mut front = Blkfront::connect(&guest, XVDA, config()).expect("connect to the re-added vbd");
    check_data(&mut front, 7);
    front.close().expect("close");
    b.stop().expect("stop");
    assert_eq!(host.host.live_mappings(), 0);
}
