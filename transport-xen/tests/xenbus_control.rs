// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The xenbus backend state machine on the emulated host, with the data plane replaced by a recording ring server
//! so every decision of the control plane is observable: probe, `opened` 0 → 1, diskseq checks (every seed error
//! case, right and wrong pins on real loop devices), connect for each ring layout, close from either side,
//! detach, removal, reconnect.

mod xenbus_support;

use std::time::{Duration, Instant};

use transport_xen::connect::{BlkifAbi, QueueRing};
use transport_xen::frontend::handshake::{self, Publication, PublishedRing};
use transport_xen::frontend::DiskSpec;
use transport_xen::services::{TxId, WatchEvent, XenStore};
use transport_xen::xenbus::{VbdId, XenbusState, VDISK_READONLY};
use xenbus_support::{Bed, LoopDevice, RingEvent, T};

fn ring(first_ref: u32, pages: u32, port: u32) -> PublishedRing {
    PublishedRing { refs: (first_ref..first_ref + pages).collect(), port }
}

/// Play blkfront up to Initialised with made-up refs and ports (the recording ring server maps nothing).
fn publish(store: &dyn XenStore, fe: &str, order: u32, queues: u32, abi: Option<BlkifAbi>, persistent: bool) {
    let rings = (0..queues).map(|q| ring(100 + q * 16, 1 << order, 10 + q)).collect();
    handshake::publish(store, fe, &Publication { ring_page_order: order, rings, abi, persistent }).expect("publish");
}

fn connect_image(bed: &Bed, domid: u16) -> (VbdId, transport_xen::emulated::EmulatedXenStore) {
    let id = bed.add_image_disk(domid, false);
    bed.wait_state(id, XenbusState::InitWait);
    let guest = bed.host.xenstore_as(domid).expect("guest connection");
    publish(&guest, &bed.frontend(id), 0, 1, Some(BlkifAbi::X86_64), true);
    bed.wait_state(id, XenbusState::Connected);
    (id, guest)
}

#[test]
fn image_file_vbd_probes_connects_and_publishes_the_disk() {
    let bed = Bed::new();
    let _g = bed.guest(1);
    let id = bed.add_image_disk(1, false);
    bed.wait_state(id, XenbusState::InitWait);
    for (node, value) in [
        ("multi-queue-max-queues", "4"),
        ("max-ring-page-order", "4"),
        ("feature-max-indirect-segments", "256"),
        ("feature-persistent", "1"),
        ("feature-flush-cache", "1"),
        ("feature-barrier", "1"),
    ] {
        assert_eq!(bed.backend_node(id, node).as_deref(), Some(value.as_bytes()), "{node}");
    }
    bed.toolstack.wait_opened(id, T).expect("an image file is opened without a hotplug script");

    let guest = bed.host.xenstore_as(1).expect("guest");
    publish(&guest, &bed.frontend(id), 0, 1, Some(BlkifAbi::X86_64), true);
    bed.wait_state(id, XenbusState::Connected);
    let sectors = 4 << 11;
    for (node, value) in [("sectors", sectors.to_string()), ("info", "0".into()), ("sector-size", "512".into())] {
        assert_eq!(bed.backend_node(id, node), Some(value.into_bytes()), "{node}");
    }
    assert!(bed.backend_node(id, "physical-sector-size").is_some());
    assert_eq!(bed.backend_node(id, "feature-discard").as_deref(), Some(&b"1"[..]));
    let started = bed.rings.started(1);
    assert_eq!(started.len(), 1);
    let c = &started[0];
    assert_eq!(
        (c.frontend_domid, c.abi, c.persistent_grants, c.max_indirect_segments),
        (1, BlkifAbi::X86_64, true, 256)
    );
    assert_eq!(c.queues, vec![QueueRing { ring_refs: vec![100], remote_port: 10 }]);
    assert!(bed.toolstack.error(id).expect("read").is_none());
}

#[test]
fn every_ring_layout_reaches_the_data_plane_as_published() {
    let bed = Bed::new();
    let cases = [
        (2u16, 0u32, 1u32, None),
        (3, 4, 1, Some(BlkifAbi::X86_32)),
        (4, 0, 4, Some(BlkifAbi::X86_64)),
        (5, 4, 4, None),
    ];
    let guests: Vec<_> = cases.iter().map(|c| bed.guest(c.0)).collect();
    for &(domid, order, queues, abi) in &cases {
        let id = bed.add_image_disk(domid, false);
        bed.wait_state(id, XenbusState::InitWait);
        let store = guests[usize::from(domid - 2)].xenstore().expect("guest store");
        publish(&store, &bed.frontend(id), order, queues, abi, false);
        bed.wait_state(id, XenbusState::Connected);
        let c = bed.rings.started(domid).pop().expect("started");
        assert_eq!(c.abi, abi.unwrap_or(BlkifAbi::X86_32), "no protocol node means x86_32");
        assert!(!c.persistent_grants);
        assert_eq!(c.queues.len(), queues as usize);
        for (q, r) in c.queues.iter().enumerate() {
            let q = u32::try_from(q).expect("small");
            assert_eq!(r.ring_refs, (100 + q * 16..100 + q * 16 + (1 << order)).collect::<Vec<_>>());
            assert_eq!(r.remote_port, 10 + q);
        }
    }
}

#[test]
fn read_only_mode_sets_vdisk_readonly_and_no_discard() {
    let bed = Bed::new();
    let _g = bed.guest(1);
    let id = bed.add_image_disk(1, true);
    bed.wait_state(id, XenbusState::InitWait);
    publish(&bed.host.xenstore_as(1).expect("guest"), &bed.frontend(id), 0, 1, Some(BlkifAbi::X86_64), true);
    bed.wait_state(id, XenbusState::Connected);
    assert_eq!(bed.backend_node(id, "info"), Some(VDISK_READONLY.to_string().into_bytes()));
    assert_eq!(bed.backend_node(id, "feature-discard").as_deref(), Some(&b"0"[..]));
}

#[test]
fn frontend_close_stops_the_data_plane_and_reconnects_while_online() {
    let bed = Bed::new();
    let _g = bed.guest(1);
    let (id, guest) = connect_image(&bed, 1);
    let fe = bed.frontend(id);
    handshake::switch_state(&guest, &fe, XenbusState::Closing).expect("closing");
    bed.wait_state(id, XenbusState::Closing);
    assert_eq!(bed.rings.live(), 1, "rings keep running while the frontend drains");
    handshake::switch_state(&guest, &fe, XenbusState::Closed).expect("closed");
    bed.wait_state(id, XenbusState::Closed);
    assert_eq!(bed.rings.events().last(), Some(&RingEvent::Stopped(1)));
    // Still online: the frontend may come back (a guest reboot of its driver).
    handshake::switch_state(&guest, &fe, XenbusState::Initialising).expect("initialising");
    bed.wait_state(id, XenbusState::InitWait);
    publish(&guest, &fe, 0, 1, Some(BlkifAbi::X86_64), true);
    bed.wait_state(id, XenbusState::Connected);
    assert_eq!(bed.rings.started(1).len(), 2);
    assert_eq!(bed.rings.live(), 1);
}

/// A closing Linux blkfront may hold requests back until the backend's next event (see the backend's `closing`):
/// on frontend Closed the rings are kicked and served while they are busy, then stopped, and Closed is written.
#[test]
fn a_closed_frontends_rings_are_kicked_and_served_until_quiet() {
    let bed = Bed::new();
    let _g = bed.guest(1);
    let (id, guest) = connect_image(&bed, 1);
    handshake::switch_state(&guest, &bed.frontend(id), XenbusState::Closed).expect("closed");
    let deadline = Instant::now() + T;
    while bed.rings.kicks().is_empty() {
        assert!(Instant::now() < deadline, "the rings were never kicked");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(bed.rings.kicks(), vec![1]);
    // Requests keep coming for a while (well within the longest it is served): the rings keep being served.
    let busy_until = Instant::now() + Duration::from_millis(900);
    while Instant::now() < busy_until {
        bed.rings.bump_activity();
        assert_eq!(bed.rings.live(), 1, "stopped while the frontend's requests were still coming");
        assert_ne!(bed.backend_node(id, "state").as_deref(), Some(&b"6"[..]), "Closed while still served");
        std::thread::sleep(Duration::from_millis(30));
    }
    // Quiet: stopped, then Closed; kicked once.
    bed.wait_state(id, XenbusState::Closed);
    assert_eq!(bed.rings.events().last(), Some(&RingEvent::Stopped(1)));
    assert_eq!(bed.rings.kicks(), vec![1]);
}

/// However busy a Closed frontend keeps its rings, they are stopped after a bounded time.
#[test]
fn a_closed_frontend_that_keeps_its_rings_busy_cannot_keep_them_served() {
    let bed = Bed::new();
    let _g = bed.guest(1);
    let (id, guest) = connect_image(&bed, 1);
    handshake::switch_state(&guest, &bed.frontend(id), XenbusState::Closed).expect("closed");
    let deadline = Instant::now() + T;
    while bed.rings.live() != 0 {
        assert!(Instant::now() < deadline, "a busy Closed frontend kept its rings served");
        bed.rings.bump_activity();
        std::thread::sleep(Duration::from_millis(10));
    }
    bed.wait_state(id, XenbusState::Closed);
}

#[test]
fn toolstack_detach_closes_and_releases_then_removal_leaves_nothing_behind() {
    let bed = Bed::new();
    let _g = bed.guest(1);
    let (id, guest) = connect_image(&bed, 1);
    bed.toolstack.detach(id).expect("detach");
    // The frontend sees Closing (written by the toolstack) and closes.
    handshake::wait_backend(&guest, &bed.toolstack.paths(id).backend, T, |s| s == XenbusState::Closing)
        .expect("closing");
    handshake::switch_state(&guest, &bed.frontend(id), XenbusState::Closed).expect("closed");
    bed.wait_state(id, XenbusState::Closed);
    assert_eq!(bed.rings.live(), 0);
    bed.toolstack.remove(id).expect("remove");
    std::thread::sleep(Duration::from_millis(200));
    assert!(bed.backend_node(id, "state").is_none(), "the backend never re-creates a removed directory");
}

#[test]
fn backend_directory_removal_mid_connection_tears_down_without_writing() {
    let bed = Bed::new();
    let _g = bed.guest(1);
    let (id, _guest) = connect_image(&bed, 1);
    bed.toolstack.remove(id).expect("remove");
    let deadline = std::time::Instant::now() + T;
    while bed.rings.live() != 0 {
        assert!(std::time::Instant::now() < deadline, "data plane not stopped");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(bed.store().directory(TxId::NONE, &bed.toolstack.paths(id).backend).ok(), None);
}

#[test]
fn graceful_shutdown_stops_rings_and_writes_closed() {
    let mut bed = Bed::new();
    let _g = bed.guest(1);
    let (id, _guest) = connect_image(&bed, 1);
    bed.stop_backend();
    assert_eq!(bed.rings.live(), 0);
    assert_eq!(bed.backend_node(id, "state").as_deref(), Some(&b"6"[..]));
}

#[test]
fn malformed_diskseq_is_refused_with_the_seeds_errno_and_message() {
    let bed = Bed::new();
    let cases: [(&[u8], &str); 5] = [
        (b"", "14 diskseq must not be empty"),
        (b"12345678901234567", "34 diskseq too long: got 17 but limit is 16"),
        (b"0abc", "34 diskseq must not start with '0'"),
        (b"12xz", "22 invalid diskseq"),
        (b"\xff\xfe", "22 invalid diskseq"),
    ];
    let guests: Vec<_> = (0..cases.len()).map(|i| bed.guest(10 + u16::try_from(i).expect("small"))).collect();
    for (guest, (diskseq, expected)) in guests.iter().zip(cases) {
        let spec = DiskSpec::new(guest.domid(), "/dev/null");
        let id = bed.toolstack.add_disk(&spec).expect("add");
        bed.toolstack.hotplug(id, b"7:0", Some(diskseq), T).expect("hotplug");
        assert_eq!(bed.wait_fatal(id), expected);
        assert_eq!(bed.backend_node(id, "opened").as_deref(), Some(&b"0"[..]), "never opened");
    }
    assert!(bed.rings.events().is_empty(), "nothing served");
}

/// Attach a loop device over a fresh image and return it with the vbd that names it (`None`: no loop devices).
fn loop_vbd(bed: &Bed, domid: u16) -> Option<(LoopDevice, VbdId)> {
    let img = bed.image(&format!("loop{domid}.img"), 8);
    let dev = LoopDevice::attach(&img)?;
    let mut spec = DiskSpec::new(domid, dev.dev.path.to_str().expect("utf-8"));
    spec.params = Some(dev.dev.path.to_string_lossy().into_owned());
    let id = bed.toolstack.add_disk(&spec).expect("add");
    Some((dev, id))
}

#[test]
fn opened_goes_zero_before_initwait_and_one_after_the_pinned_open() {
    let bed = Bed::new();
    let _g = bed.guest(1);
    let watcher = bed.host.xenstore().expect("watcher");
    let (dev, id) = {
        let img = bed.image("ordered.img", 8);
        let Some(dev) = LoopDevice::attach(&img) else { return };
        let mut spec = DiskSpec::new(1, dev.dev.path.to_str().expect("utf-8"));
        spec.params = Some(dev.dev.path.to_string_lossy().into_owned());
        watcher.watch(&bed.toolstack.paths(spec.id()).backend, "order").expect("watch");
        (dev, bed.toolstack.add_disk(&spec).expect("add"))
    };
    bed.wait_state(id, XenbusState::InitWait);
    // The hotplug script runs only now; `opened` must already be there, and still 0 (a block device in params
    // waits for physical-device).
    assert_eq!(bed.backend_node(id, "opened").as_deref(), Some(&b"0"[..]));
    let mut before = Vec::new();
    watcher.take_watch_events(&mut before).expect("events");
    let name = |e: &WatchEvent| e.path.rsplit('/').next().unwrap_or_default().to_string();
    let first_opened = before.iter().position(|e| name(e) == "opened").expect("opened written");
    let last_state = before.iter().rposition(|e| name(e) == "state").expect("state written");
    assert!(first_opened < last_state, "opened = 0 is written before InitWait: {before:?}");

    bed.toolstack.hotplug_device(id, dev.device, Some(dev.diskseq), T).expect("hotplug");
    bed.toolstack.wait_opened(id, T).expect("opened = 1");
    let mut after = Vec::new();
    watcher.take_watch_events(&mut after).expect("events");
    let pdev = after.iter().position(|e| name(e) == "physical-device").expect("physical-device event");
    let opened = after.iter().rposition(|e| name(e) == "opened").expect("opened event");
    assert!(pdev < opened, "opened = 1 follows physical-device: {after:?}");

    publish(&bed.host.xenstore_as(1).expect("guest"), &bed.frontend(id), 0, 1, Some(BlkifAbi::X86_64), false);
    bed.wait_state(id, XenbusState::Connected);
    assert!(matches!(bed.rings.events()[0], RingEvent::Started(_, sectors) if sectors == 8 << 11));
}

#[test]
fn wrong_diskseq_on_a_real_loop_device_is_refused_and_nothing_is_served() {
    let bed = Bed::new();
    let _g = bed.guest(1);
    let Some((dev, id)) = loop_vbd(&bed, 1) else { return };
    bed.toolstack.hotplug_device(id, dev.device, Some(dev.diskseq + 1000), T).expect("hotplug");
    let error = bed.wait_fatal(id);
    assert!(error.starts_with("19 creating vbd structure:") && error.contains("mismatch"), "{error}");
    assert_eq!(bed.backend_node(id, "opened").as_deref(), Some(&b"0"[..]));
    publish(&bed.host.xenstore_as(1).expect("guest"), &bed.frontend(id), 0, 1, Some(BlkifAbi::X86_64), false);
    std::thread::sleep(Duration::from_millis(200));
    assert!(bed.rings.events().is_empty(), "nothing served");
}

#[test]
fn a_refused_device_is_not_retried_when_the_script_reports_its_own_failure() {
    // Seen in the real lab: the hotplug script, told no by `error`, detaches its loop device and writes
    // hotplug-status = error. That must not make the backend open the (now empty) device again and overwrite
    // the error node that says why.
    let bed = Bed::new();
    let _g = bed.guest(1);
    let Some((dev, id)) = loop_vbd(&bed, 1) else { return };
    bed.toolstack.hotplug_device(id, dev.device, Some(dev.diskseq + 1), T).expect("hotplug");
    let error = bed.wait_fatal(id);
    assert!(error.contains("mismatch"), "{error}");
    drop(dev);
    let paths = bed.toolstack.paths(id);
    bed.store().write(TxId::NONE, &paths.node("hotplug-status"), b"error").expect("script failure");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(bed.toolstack.error(id).expect("read").as_deref(), Some(error.as_str()), "error node kept");
    assert!(bed.rings.events().is_empty(), "nothing served");
}

#[test]
fn changing_physical_device_after_the_open_is_refused() {
    let bed = Bed::new();
    let _g = bed.guest(1);
    let Some((dev, id)) = loop_vbd(&bed, 1) else { return };
    bed.toolstack.hotplug_device(id, dev.device, Some(dev.diskseq), T).expect("hotplug");
    bed.toolstack.wait_opened(id, T).expect("opened");
    publish(&bed.host.xenstore_as(1).expect("guest"), &bed.frontend(id), 0, 1, Some(BlkifAbi::X86_64), false);
    bed.wait_state(id, XenbusState::Connected);
    let paths = bed.toolstack.paths(id);
    bed.store().write(TxId::NONE, &paths.node("physical-device"), b"7:7f").expect("rewrite");
    bed.store().write(TxId::NONE, &paths.node("diskseq"), b"zz").expect("rewrite");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(bed.backend_node(id, "state").as_deref(), Some(&b"4"[..]));
    assert!(bed.toolstack.error(id).expect("read").is_none());
    assert_eq!(bed.rings.events().len(), 1, "still the one data plane");
}

#[test]
fn an_image_with_a_hotplug_script_waits_for_the_scripts_pinned_loop_device() {
    // xl with `script=block-blkbackd`: params names an image, the script sets up a loop device and writes
    // physical-device + diskseq once it sees opened = 0; the backend must not open the image behind its back.
    let bed = Bed::new();
    let _g = bed.guest(1);
    let img = bed.image("scripted.img", 8);
    let mut spec = DiskSpec::new(1, img.to_str().expect("utf-8"));
    spec.script = Some("/etc/xen/scripts/block-blkbackd".into());
    let id = bed.toolstack.add_disk(&spec).expect("add");
    bed.wait_state(id, XenbusState::InitWait);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(bed.backend_node(id, "opened").as_deref(), Some(&b"0"[..]), "the image is not opened directly");
    let Some(dev) = LoopDevice::attach(&img) else { return };
    bed.toolstack.hotplug_device(id, dev.device, Some(dev.diskseq), T).expect("hotplug");
    bed.toolstack.wait_opened(id, T).expect("opened = 1");
    publish(&bed.host.xenstore_as(1).expect("guest"), &bed.frontend(id), 0, 1, Some(BlkifAbi::X86_64), false);
    bed.wait_state(id, XenbusState::Connected);
    assert!(matches!(bed.rings.events()[0], RingEvent::Started(_, sectors) if sectors == 8 << 11));
}

#[test]
fn toolstack_nodes_naming_another_domain_or_a_bad_frontend_path_fail_the_probe() {
    let bed = Bed::new();
    let cases: [(&str, &[u8], &[u8], &str); 3] = [
        ("mismatch", b"/local/domain/9/device/vbd/51712", b"9", "frontend-id 9 does not match the vbd's domain 3"),
        ("relative", b"local/domain/3/device/vbd/51712", b"3", "reading other end details: frontend"),
        ("reserved", b"/local/domain/3/device/vbd/51712", b"32752", "reading other end details: frontend-id"),
    ];
    for (i, (name, frontend, frontend_id, expected)) in cases.into_iter().enumerate() {
        let id = VbdId { domid: 3, devid: 100 + u32::try_from(i).expect("few") };
        let be = bed.toolstack.paths(id).backend;
        transport_xen::services::with_transaction(bed.store(), 8, |tx| {
            bed.store().write(tx, &format!("{be}/frontend"), frontend)?;
            bed.store().write(tx, &format!("{be}/frontend-id"), frontend_id)?;
            bed.store().write(tx, &format!("{be}/online"), b"1")?;
            bed.store().write(tx, &format!("{be}/state"), b"1")
        })
        .expect("write backend dir");
        let error = bed.wait_fatal(id);
        assert!(error.contains(expected), "{name}: {error}");
        assert_eq!(bed.backend_node(id, "opened"), None, "{name}: nothing probed");
    }
}

#[test]
fn the_supervisor_path_closes_every_vbd_of_a_dead_backends_domain() {
    // `blkbackd xen --cleanup D`: the backend process is gone; its guest's vbds must end Closed with a reason
    // (here the backend thread stopped first; a killed process writes nothing, the cleanup does it all).
    let mut bed = Bed::new();
    let _g1 = bed.guest(1);
    let _g2 = bed.guest(2);
    let a = bed.add_image_disk(1, false);
    let other = bed.add_image_disk(2, false);
    bed.wait_state(a, XenbusState::InitWait);
    bed.wait_state(other, XenbusState::InitWait);
    bed.stop_backend();
    let reason = "blkbackd for this domain exited";
    let closed = transport_xen::xenbus::close_all_vbds(bed.store(), "/local/domain/0", 1, reason).expect("cleanup");
    assert_eq!(closed, 1);
    assert_eq!(bed.backend_node(a, "state").as_deref(), Some(&b"6"[..]));
    let error = bed.toolstack.error(a).expect("read").expect("error node");
    assert!(error.ends_with(reason), "{error}");
    assert!(bed.toolstack.error(other).expect("read").is_none(), "another domain's vbds are untouched");
    assert_eq!(transport_xen::xenbus::close_all_vbds(bed.store(), "/local/domain/0", 9, reason), Ok(0));
}
