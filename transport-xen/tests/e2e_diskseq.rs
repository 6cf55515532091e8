// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The seed's story end to end on a real loop device: the hotplug script names the device by number and
//! `diskseq`, waits for `opened` = 1, then drops its own reference (the loop device becomes delete-on-close);
//! the guest's I/O keeps working on the device the backend holds, and when the backend lets go the loop device
//! goes away. A wrong `diskseq` serves nothing: the frontend never connects.

mod xenbus_support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use transport_xen::dataplane::DataplaneOptions;
use transport_xen::frontend::load::{check_pattern, fill_pattern};
use transport_xen::frontend::{Blkfront, BlkfrontConfig, DiskSpec, XVDA};
use transport_xen::xenbus::{BackendConfig, XenbusState};
use xenbus_support::{Bed, LoopDevice, T};

fn backing_file(dev: &Path) -> Option<String> {
    let name = dev.file_name()?.to_string_lossy().into_owned();
    std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()
}

#[test]
fn pinned_loop_device_serves_io_after_the_script_lets_go_and_vanishes_on_release() {
    let bed = Bed::real(BackendConfig::default(), DataplaneOptions::default());
    let guest = bed.big_guest(1, 256);
    let img = bed.image("pinned.img", 8);
    let mut content = vec![0u8; 8 << 20];
    fill_pattern(&mut content, 0, 7);
    std::fs::write(&img, &content).expect("write image");
    let Some(dev) = LoopDevice::attach(&img) else { return };
    let mut spec = DiskSpec::new(1, dev.dev.path.to_string_lossy());
    spec.params = Some(dev.dev.path.to_string_lossy().into_owned());
    let id = bed.toolstack.add_disk(&spec).expect("add");
    bed.toolstack.hotplug_device(id, dev.device, Some(dev.diskseq), T).expect("hotplug");
    bed.toolstack.wait_opened(id, T).expect("opened = 1");
    // The hotplug script drops its reference: the busy loop device is marked delete-on-close.
    let status = Command::new("losetup").arg("-d").arg(&dev.dev.path).status().expect("losetup -d");
    assert!(status.success());
    assert!(backing_file(&dev.dev.path).is_some(), "the backend still holds the device");

    let mut front = Blkfront::connect(&guest, XVDA, BlkfrontConfig::default()).expect("connect");
    assert_eq!(front.info().sectors, 8 << 11);
    assert_eq!(check_pattern(&front.read(4096, 32 << 10).expect("read"), 4096, 7), None, "the image's data");
    let mut data = vec![0u8; 8192];
    fill_pattern(&mut data, 100, 8);
    front.write(100, &data).expect("write");
    assert_eq!(check_pattern(&front.read(100, 8192).expect("read"), 100, 8), None);
    front.close().expect("close");

    bed.toolstack.detach(id).expect("detach");
    bed.wait_state(id, XenbusState::Closed);
    let deadline = Instant::now() + T;
    while backing_file(&dev.dev.path).is_some() {
        assert!(Instant::now() < deadline, "the loop device stayed after the backend released it");
        std::thread::sleep(Duration::from_millis(20));
    }
    let on_disk = std::fs::read(&img).expect("read image");
    assert_eq!(check_pattern(&on_disk[100 * 512..100 * 512 + 8192], 100, 8), None, "the write reached the image");
}

#[test]
fn wrong_diskseq_never_lets_the_frontend_connect() {
    let bed = Bed::real(BackendConfig::default(), DataplaneOptions::default());
    let guest = bed.big_guest(1, 256);
    let img = bed.image("wrong.img", 8);
    let Some(dev) = LoopDevice::attach(&img) else { return };
    let mut spec = DiskSpec::new(1, dev.dev.path.to_string_lossy());
    spec.params = Some(dev.dev.path.to_string_lossy().into_owned());
    let id = bed.toolstack.add_disk(&spec).expect("add");
    bed.toolstack.hotplug_device(id, dev.device, Some(dev.diskseq + 1), T).expect("hotplug");
    let error = bed.wait_fatal(id);
    assert!(error.contains("disk sequence number mismatch"), "{error}");
    let config = BlkfrontConfig { timeout: Duration::from_secs(2), ..BlkfrontConfig::default() };
    let err = Blkfront::connect(&guest, XVDA, config).expect_err("must not connect");
    assert!(err.to_string().contains("Closing"), "{err}");
    assert_eq!(bed.host.live_mappings(), 0);
}
