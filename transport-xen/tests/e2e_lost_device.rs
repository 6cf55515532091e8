// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A delete-on-close disk whose backend process died: the loop device went away with the last process holding
//! it, so the restarted backend that takes the vbd over cannot open it again. What then happens, as the README's
//! "When a worker dies" section states: the vbd stays Closed (the supervisor closed it), `opened` is 0 (no process
//! holds the device), the `error` node says why and what to do, no other disk is opened in its place (the loop
//! device's number now has another diskseq), and detaching the disk and attaching it again serves the image anew.

mod backend_support;
mod xenbus_support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use backend_support::{BackendProcess, Host, T};
use transport_xen::dataplane::DataplaneOptions;
use transport_xen::frontend::load::{check_pattern, fill_pattern};
use transport_xen::frontend::{Blkfront, BlkfrontConfig, DiskSpec, XVDA};
use transport_xen::services::{TxId, XenError};
use transport_xen::xenbus::{close_vbd_failing_io, BackendConfig, VbdId, XenbusState};
use xenbus_support::LoopDevice;

const DOMID: u16 = 61;

fn backend(host: &Host) -> BackendProcess {
    BackendProcess::real(&host.host, BackendConfig::default(), DataplaneOptions::default())
}

fn bound(dev: &Path) -> bool {
    let name = dev.file_name().expect("name").to_string_lossy().into_owned();
    Path::new(&format!("/sys/block/{name}/loop/backing_file")).exists()
}

/// Wait until the loop device `dev` is unbound (the kernel clears a delete-on-close one after its last close).
fn wait_unbound(dev: &Path, why: &str) {
    let deadline = Instant::now() + T;
    while bound(dev) {
        assert!(Instant::now() < deadline, "{why}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn node(host: &Host, id: VbdId, name: &str) -> Option<String> {
    let value = host.toolstack.store().read(TxId::NONE, &host.toolstack.paths(id).node(name)).ok()?;
    Some(String::from_utf8_lossy(&value).into_owned())
}

/// The vbd as `block-blkbackd` sets it up: a loop device named by number and diskseq, dropped by the script
/// once the backend wrote `opened` = 1 (delete-on-close from then on).
fn attach_delete_on_close(host: &Host, image: &Path) -> Option<(VbdId, LoopDevice)> {
    let dev = LoopDevice::attach(image)?;
    let mut spec = DiskSpec::new(DOMID, dev.dev.path.to_string_lossy());
    spec.params = Some(dev.dev.path.to_string_lossy().into_owned());
    let id = host.toolstack.add_disk(&spec).expect("add");
    host.toolstack.hotplug_device(id, dev.device, Some(dev.diskseq), T).expect("hotplug");
    host.toolstack.wait_opened(id, T).expect("opened = 1");
    assert!(Command::new("losetup").arg("-d").arg(&dev.dev.path).status().expect("losetup -d").success());
    assert!(bound(&dev.dev.path), "the backend holds the device");
    Some((id, dev))
}

#[test]
fn a_restarted_backend_finds_the_delete_on_close_device_gone_and_says_what_to_do() {
    let host = Host::new();
    let a = backend(&host);
    let guest = host.host.add_guest(DOMID, 256).expect("guest");
    let image = host.image(DOMID, 8 << 20);
    let Some((id, dev)) = attach_delete_on_close(&host, &image) else { return };
    let mut front = Blkfront::connect(&guest, XVDA, BlkfrontConfig::default()).expect("connect");
    let mut data = vec![0u8; 64 << 10];
    fill_pattern(&mut data, 0, 5);
    front.write(0, &data).expect("write");

    // The backend process dies; the supervisor closes the vbd it served (as `blkbackd xen` does).
    let (result, _) = a.lose_xenstore();
    assert_eq!(result, Err(XenError::Disconnected { what: "xenstore" }));
    wait_unbound(&dev.dev.path, "the delete-on-close loop device outlived its last holder");
    let store = &**host.toolstack.store();
    let (grants, evtchn) = (host.host.grant_table(0), host.host.evtchn_opener(0));
    close_vbd_failing_io(store, &grants, &evtchn, "/local/domain/0", id, "the worker died", Duration::ZERO)
        .expect("close the dead backend's vbd");
    front.finish_after_backend_close().expect("the frontend closes");

    // The restarted backend takes the vbd over, cannot open the device, and says why and what to do.
    let b = backend(&host);
    let deadline = Instant::now() + T;
    let error = loop {
        let error = host.toolstack.error(id).expect("read the error node").unwrap_or_default();
        if error.contains("previous backend process") {
            break error;
        }
        assert!(Instant::now() < deadline, "no explanation in the error node: {error:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(error.starts_with(&format!("{} ", libc::ENODEV)), "{error}");
    assert!(error.contains("detach the disk and attach it again"), "{error}");
    assert_eq!(node(&host, id, "opened").as_deref(), Some("0"), "no process holds the device");
    assert_eq!(node(&host, id, "state").as_deref(), Some("6"), "the vbd stays Closed");
    assert!(!bound(&dev.dev.path), "nothing was opened in the device's place");

    // The remedy: detach, then attach the image again (a new delete-on-close loop device).
    host.toolstack.detach(id).expect("detach");
    host.wait_state(id, XenbusState::Closed);
    host.toolstack.remove(id).expect("remove");
    drop(dev);
    let Some((_id, dev)) = attach_delete_on_close(&host, &image) else { return };
    let mut front = Blkfront::connect(&guest, XVDA, BlkfrontConfig::default()).expect("connect again");
    assert_eq!(check_pattern(&front.read(0, 64 << 10).expect("read"), 0, 5), None, "the data written before");
    front.close().expect("close");
    b.stop().expect("stop");
    wait_unbound(&dev.dev.path, "the second loop device outlived the backend's shutdown");
}
