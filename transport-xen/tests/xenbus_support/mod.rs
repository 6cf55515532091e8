//! Shared pieces of the xenbus control-plane tests: a recording ring server (the data-plane seam, so the state
//! machine's decisions are observable exactly), a test bed (emulated host + backend thread + toolstack), and
//! real loop devices for the diskseq tests.

#![allow(dead_code)]

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use device_blk::{Disk, EngineKind};
use transport_xen::connect::ConnectConfig;
use transport_xen::dataplane::DataplaneOptions;
use transport_xen::emulated::{EmulatedHost, GuestDomain};
use transport_xen::frontend::{frontend_path, BackendThread, DiskSpec, Toolstack};
use transport_xen::services::{read_optional, DomId, TxId, XenStore};
use transport_xen::xenbus::dataplane_server::DataplaneServer;
use transport_xen::xenbus::nodes::PhysicalDevice;
use transport_xen::xenbus::{BackendConfig, Fatal, RingServer, RunningRings, Scope, VbdId, XenbusState};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How long any single wait in these tests may take.
pub const T: Duration = Duration::from_secs(10);

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

/// An emulated host with a backend thread, a toolstack and a scratch directory.
pub struct Bed {
    pub host: EmulatedHost,
    pub toolstack: Toolstack,
    pub rings: RecordingRings,
    pub dir: tempfile::TempDir,
    backend: Option<BackendThread>,
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
        Self::start(host, config, Arc::new(rings.clone()), rings)
    }

    /// A bed with the real data plane on the emulated host.
    pub fn real(config: BackendConfig, options: DataplaneOptions) -> Bed {
        let host = EmulatedHost::new().expect("host");
        let server =
            DataplaneServer::new(Arc::new(host.grant_table(0)), host.evtchn_opener(0), EngineKind::Auto, options);
        Self::start(host, config, Arc::new(server), RecordingRings::default())
    }

    fn start(host: EmulatedHost, config: BackendConfig, server: Arc<dyn RingServer>, rings: RecordingRings) -> Bed {
        let backend = BackendThread::spawn(&host, server, config, Scope::AllDomains).expect("backend");
        let toolstack = Toolstack::new(Arc::new(host.xenstore().expect("dom0 connection")));
        Bed { host, toolstack, rings, dir: tempfile::tempdir().expect("tempdir"), backend: Some(backend) }
    }

    /// A guest with a little memory.
    pub fn guest(&self, domid: DomId) -> GuestDomain {
        self.host.add_guest(domid, 64).expect("guest")
    }

    /// A guest with `pages` pages of memory.
    pub fn big_guest(&self, domid: DomId, pages: usize) -> GuestDomain {
        self.host.add_guest(domid, pages).expect("guest")
    }

    /// A zeroed image file of `mib` MiB.
    pub fn image(&self, name: &str, mib: u64) -> PathBuf {
        let path = self.dir.path().join(name);
        let f = std::fs::File::create(&path).expect("create image");
        f.set_len(mib << 20).expect("size image");
        path
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

    /// The backend's xenstore connection view (dom0).
    pub fn store(&self) -> &dyn XenStore {
        &**self.toolstack.store()
    }

    /// A backend node's value.
    pub fn backend_node(&self, id: VbdId, name: &str) -> Option<Vec<u8>> {
        read_optional(self.store(), TxId::NONE, &self.toolstack.paths(id).node(name)).expect("read")
    }

    /// Wait for the backend state of `id` to be `state`.
    pub fn wait_state(&self, id: VbdId, state: XenbusState) {
        self.toolstack.wait_backend_state(id, T, |s| s == state).unwrap_or_else(|e| panic!("{id}: {e}"));
    }

    /// Wait until the vbd is failed: the `error` node exists and the state is Closing. Returns the error text.
    pub fn wait_fatal(&self, id: VbdId) -> String {
        self.wait_state(id, XenbusState::Closing);
        self.toolstack.error(id).expect("read error").unwrap_or_else(|| panic!("{id}: Closing without an error node"))
    }

    /// Stop the backend thread now (graceful shutdown).
    pub fn stop_backend(&mut self) {
        if let Some(b) = self.backend.take() {
            b.stop().expect("backend loop ended cleanly");
        }
    }

    /// The frontend directory of `id`.
    pub fn frontend(&self, id: VbdId) -> String {
        frontend_path(id)
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.backend.take();
    }
}

/// Loop tests share the host's loop devices: one at a time in this process.
static LOOP_LOCK: Mutex<()> = Mutex::new(());

/// A loop device over a file, detached on drop.
pub struct LoopDevice {
    pub path: PathBuf,
    pub device: PhysicalDevice,
    pub diskseq: u64,
    _guard: MutexGuard<'static, ()>,
}

impl LoopDevice {
    /// Attach `file` to a free loop device; `None` (after saying why) where loop devices cannot be used: the test
    /// then returns early, as the workspace's other loop-device tests do.
    pub fn attach(file: &Path) -> Option<LoopDevice> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let why = if unsafe { libc::geteuid() } != 0 {
            Some("not running as root".to_string())
        } else if !Path::new("/dev/loop-control").exists() {
            Some("/dev/loop-control is absent".to_string())
        } else {
            Command::new("losetup").arg("--version").output().err().map(|e| format!("losetup: {e}"))
        };
        if let Some(why) = why {
            eprintln!("skipping: loop devices unavailable: {why}");
            return None;
        }
        let guard = lock(&LOOP_LOCK);
        let mut last = String::new();
        for _ in 0..5 {
            let out = Command::new("losetup").args(["-f", "--show"]).arg(file).output().expect("run losetup");
            if out.status.success() {
                let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                let name = path.file_name().expect("name").to_string_lossy().into_owned();
                let dev = std::fs::read_to_string(format!("/sys/block/{name}/dev")).expect("sysfs dev");
                let (major, minor) = dev.trim().split_once(':').expect("major:minor");
                let seq = std::fs::read_to_string(format!("/sys/block/{name}/diskseq")).expect("sysfs diskseq");
                return Some(LoopDevice {
                    device: PhysicalDevice {
                        major: major.parse().expect("major"),
                        minor: minor.parse().expect("minor"),
                    },
                    diskseq: seq.trim().parse().expect("diskseq"),
                    path,
                    _guard: guard,
                });
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("losetup failed: {last}");
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}
