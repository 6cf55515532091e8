// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Shared pieces of the xenbus control-plane tests: a recording ring server (the data-plane seam, so the state
//! machine's decisions are observable exactly), a test bed (emulated host + backend thread + toolstack), and
//! loop devices (the test kit's) for the diskseq tests.

#![allow(dead_code)]

use std::ops::{Deref, DerefMut};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use device_blk::Disk;
use test_kit::xen_bed::XenBed;
use transport_xen::connect::ConnectConfig;
use transport_xen::dataplane::DataplaneOptions;
use transport_xen::emulated::{EmulatedHost, GuestDomain};
use transport_xen::frontend::{frontend_path, DiskSpec};
use transport_xen::services::DomId;
use transport_xen::xenbus::nodes::PhysicalDevice;
use transport_xen::xenbus::{BackendConfig, Fatal, RingServer, RunningRings, VbdId};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How long any single wait in these tests may take.
#[allow(unused_imports)]
pub use test_kit::xen_bed::T;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the recording ring server saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RingEvent {
    /// A data plane was started for this configuration on a disk of this many sectors.
    Started(ConnectConfig, u64),
    /// The data plane of this frontend domain was stopped.
    Stopped(DomId),
}

/// A started ring's halt switch: its frontend, its fatal eventfd, the reason.
type Halt = (DomId, Arc<EventFd>, Arc<Mutex<Option<String>>>);

#[derive(Debug, Default)]
struct Recorder {
    events: Mutex<Vec<RingEvent>>,
    fail_next: Mutex<Option<Fatal>>,
    halts: Mutex<Vec<Halt>>,
    /// The frontend domains whose rings were kicked, in order.
    kicks: Mutex<Vec<DomId>>,
    /// What every running data plane reports as its activity.
    activity: AtomicU64,
}

/// A ring server that records what the control plane asks of it, can refuse a start, and can halt a ring.
#[derive(Clone, Debug, Default)]
pub struct RecordingRings(Arc<Recorder>);

struct Running {
    domid: DomId,
    recorder: Arc<Recorder>,
    fatal: Arc<EventFd>,
    reason: Arc<Mutex<Option<String>>>,
}

impl RingServer for RecordingRings {
    fn start(&self, disk: Arc<Disk>, config: &ConnectConfig) -> Result<Box<dyn RunningRings>, Fatal> {
        if let Some(f) = lock(&self.0.fail_next).take() {
            return Err(f);
        }
        lock(&self.0.events).push(RingEvent::Started(config.clone(), disk.geometry().capacity.0));
        let fatal = Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
        let reason = Arc::new(Mutex::new(None));
        lock(&self.0.halts).push((config.frontend_domid, fatal.clone(), reason.clone()));
        Ok(Box::new(Running { domid: config.frontend_domid, recorder: self.0.clone(), fatal, reason }))
    }
}

impl RunningRings for Running {
    fn fatal_fd(&self) -> Option<RawFd> {
        Some(self.fatal.as_raw_fd())
    }
    fn fatal_error(&self) -> Option<String> {
        lock(&self.reason).clone()
    }
    fn kick(&self) {
        lock(&self.recorder.kicks).push(self.domid);
    }
    fn activity(&self) -> u64 {
        self.recorder.activity.load(Ordering::SeqCst)
    }
    fn stop(self: Box<Self>) {
        lock(&self.recorder.events).push(RingEvent::Stopped(self.domid));
    }
}

impl RecordingRings {
    /// Everything seen so far.
    pub fn events(&self) -> Vec<RingEvent> {
        lock(&self.0.events).clone()
    }
    /// The configurations started for `domid`.
    pub fn started(&self, domid: DomId) -> Vec<ConnectConfig> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                RingEvent::Started(c, _) if c.frontend_domid == domid => Some(c),
                _ => None,
            })
            .collect()
    }
    /// Data planes started and not stopped.
    pub fn live(&self) -> usize {
        let events = self.events();
        let started = events.iter().filter(|e| matches!(e, RingEvent::Started(..))).count();
        started - (events.len() - started)
    }
    /// The frontend domains whose rings were kicked, in order.
    pub fn kicks(&self) -> Vec<DomId> {
        lock(&self.0.kicks).clone()
    }
    /// Make every running data plane report activity (a request served).
    pub fn bump_activity(&self) {
        self.0.activity.fetch_add(1, Ordering::SeqCst);
    }
    /// Refuse the next start with `fatal`.
    pub fn fail_next_start(&self, fatal: Fatal) {
        *lock(&self.0.fail_next) = Some(fatal);
    }
    /// Halt the most recent ring of `domid` with `reason`.
    pub fn halt(&self, domid: DomId, reason: &str) {
        let halts = lock(&self.0.halts);
        let (_, fd, r) = halts.iter().rev().find(|(d, ..)| *d == domid).expect("a started ring");
        *lock(r) = Some(reason.to_string());
        fd.write(1).expect("signal");
    }
}

/// The test kit's bed on the emulated host (backend thread, toolstack, scratch directory, waits), with the
/// recording ring server.
pub struct Bed {
    bed: XenBed,
    pub rings: RecordingRings,
}

impl Deref for Bed {
    type Target = XenBed;
    fn deref(&self) -> &XenBed {
        &self.bed
    }
}

impl DerefMut for Bed {
    fn deref_mut(&mut self) -> &mut XenBed {
        &mut self.bed
    }
}

impl Bed {
    /// A bed whose backend serves every domain with the default configuration.
    pub fn new() -> Bed {
        Self::with_config(BackendConfig::default())
    }

    /// A bed with `config` and the recording ring server.
    pub fn with_config(config: BackendConfig) -> Bed {
        let host = EmulatedHost::new().expect("host");
        let rings = RecordingRings::default();
        Bed { bed: XenBed::start(host, config, Arc::new(rings.clone())), rings }
    }

    /// A bed with the real data plane on the emulated host.
    pub fn real(config: BackendConfig, options: DataplaneOptions) -> Bed {
        Bed { bed: XenBed::real(config, options), rings: RecordingRings::default() }
    }

    /// A guest with a little memory.
    pub fn guest(&self, domid: DomId) -> GuestDomain {
        self.host.add_guest(domid, 64).expect("guest")
    }

    /// A guest with `pages` pages of memory.
    pub fn big_guest(&self, domid: DomId, pages: usize) -> GuestDomain {
        self.host.add_guest(domid, pages).expect("guest")
    }

    /// Attach a 4 MiB image-file vbd for `domid` (no hotplug script: `params` names the file).
    pub fn add_image_disk(&self, domid: DomId, read_only: bool) -> VbdId {
        self.add_image_disk_of(domid, read_only, 4)
    }

    /// Attach an image-file vbd of `mib` MiB for `domid`.
    pub fn add_image_disk_of(&self, domid: DomId, read_only: bool, mib: u64) -> VbdId {
        let img = self.image(&format!("d{domid}.img"), mib);
        let mut spec = DiskSpec::new(domid, img.to_str().expect("utf-8 path"));
        spec.read_only = read_only;
        self.toolstack.add_disk(&spec).expect("add disk")
    }

    /// The frontend directory of `id`.
    pub fn frontend(&self, id: VbdId) -> String {
        frontend_path(id)
    }
}

/// A loop device for a vbd over a file: the device, its number and diskseq (what the hotplug script writes), and
/// the process's loop-device lock, held while it lives; detached on drop.
pub struct LoopDevice {
    pub dev: test_kit::LoopDevice,
    pub device: PhysicalDevice,
    pub diskseq: u64,
    _lock: test_kit::LoopLock,
}

impl LoopDevice {
    /// Attach `file` to a free loop device; `None` (after saying why) where loop devices cannot be used: the test
    /// then returns early, as the workspace's other loop-device tests do.
    pub fn attach(file: &Path) -> Option<LoopDevice> {
        let lock = test_kit::loop_devices()?;
        let dev = test_kit::LoopDevice::attach(file).unwrap_or_else(|e| panic!("losetup failed: {e}"));
        let (major, minor) = dev.major_minor();
        let diskseq = dev.diskseq();
        Some(LoopDevice { dev, device: PhysicalDevice { major, minor }, diskseq, _lock: lock })
    }
}
