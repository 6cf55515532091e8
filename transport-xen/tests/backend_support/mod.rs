// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A backend "process" on the emulated host whose xenstore connection the test holds: it can be stopped
//! gracefully (as `blkbackd` on SIGTERM), or lose its xenstore connection (xenstored going away, or the process
//! being killed: the nodes stay as they were). Plus what the tests check afterwards: the names of this process's
//! threads, and the error lines the backend logged.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use device_blk::EngineKind;
use transport_xen::dataplane::DataplaneOptions;
use transport_xen::emulated::{EmulatedHost, EmulatedXenStore};
use transport_xen::frontend::{DiskSpec, Toolstack};
use transport_xen::services::{DomId, XenError};
use transport_xen::xenbus::dataplane_server::DataplaneServer;
use transport_xen::xenbus::{BackendConfig, RingServer, Scope, StopHandle, VbdId, XenBackend, XenbusState};

/// How long any single wait may take.
pub const T: Duration = Duration::from_secs(10);

/// A backend running `XenBackend::run` on its own thread over its own dom0 connection.
pub struct BackendProcess {
    /// Its xenstore connection (to break it).
    pub store: Arc<EmulatedXenStore>,
    stop: StopHandle,
    thread: Option<JoinHandle<Result<(), XenError>>>,
    /// The kernel's id of the backend thread (other tests' backend threads carry the same name).
    pub tid: u32,
    /// Error-level events the backend thread logged.
    pub errors: Arc<Mutex<Vec<String>>>,
}

impl BackendProcess {
    /// A backend with the real data plane (`options`) serving every domain.
    pub fn real(host: &EmulatedHost, config: BackendConfig, options: DataplaneOptions) -> BackendProcess {
        let server =
            DataplaneServer::new(Arc::new(host.grant_table(0)), host.evtchn_opener(0), EngineKind::Auto, options);
        Self::start(host, Arc::new(server), config)
    }

    /// A backend serving every domain with `rings` as its data plane.
    pub fn start(host: &EmulatedHost, rings: Arc<dyn RingServer>, config: BackendConfig) -> BackendProcess {
        let store = Arc::new(host.xenstore().expect("dom0 connection"));
        let mut backend = XenBackend::new(store.clone(), rings, config, Scope::AllDomains).expect("backend");
        let stop = backend.stop_handle();
        let errors = Arc::new(Mutex::new(Vec::new()));
        let capture = tracing::Dispatch::new(ErrorCapture(errors.clone()));
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("blkback-xenbus".into())
            .spawn(move || {
                let _ = tid_tx.send(current_tid());
                tracing::dispatcher::with_default(&capture, || backend.run())
            })
            .expect("spawn the backend thread");
        let tid = tid_rx.recv_timeout(T).expect("the backend thread started");
        BackendProcess { store, stop, thread: Some(thread), tid, errors }
    }

    /// Stop it as SIGTERM does: every vbd Closed, data planes stopped.
    pub fn stop(mut self) -> Result<(), XenError> {
        self.stop.stop();
        self.join(T).0
    }

    /// Break its xenstore connection (xenstored dropped it, or the process died: nothing more is written), wait
    /// for the loop to end; its result and how long that took.
    pub fn lose_xenstore(mut self) -> (Result<(), XenError>, Duration) {
        self.store.disconnect();
        self.join(T)
    }

    fn join(&mut self, bound: Duration) -> (Result<(), XenError>, Duration) {
        let t0 = Instant::now();
        let thread = self.thread.take().expect("running");
        while !thread.is_finished() {
            assert!(t0.elapsed() < bound, "the backend loop did not end within {bound:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
        let elapsed = t0.elapsed();
        (thread.join().expect("the backend thread did not panic"), elapsed)
    }

    /// The error lines logged so far.
    pub fn error_lines(&self) -> Vec<String> {
        self.errors.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop.stop();
            let _ = self.join(T);
        }
    }
}

/// The toolstack's side: a dom0 connection of its own, and image files in a scratch directory.
pub struct Host {
    pub host: EmulatedHost,
    pub toolstack: Toolstack,
    pub dir: tempfile::TempDir,
}

impl Host {
    pub fn new() -> Host {
        let host = EmulatedHost::new().expect("host");
        let toolstack = Toolstack::new(Arc::new(host.xenstore().expect("dom0 connection")));
        Host { host, toolstack, dir: tempfile::tempdir().expect("tempdir") }
    }

    /// A zeroed image of `bytes` bytes named after `domid`.
    pub fn image(&self, domid: DomId, bytes: u64) -> PathBuf {
        let path = self.dir.path().join(format!("d{domid}.img"));
        let f = std::fs::File::create(&path).expect("create image");
        f.set_len(bytes).expect("size image");
        path
    }

    /// Attach an image vbd of `bytes` bytes (`xvda`) for `domid`.
    pub fn add_disk(&self, domid: DomId, bytes: u64) -> VbdId {
        let img = self.image(domid, bytes);
        self.toolstack.add_disk(&DiskSpec::new(domid, img.to_str().expect("utf-8 path"))).expect("add disk")
    }

    /// Wait for the backend state of `id` to be `state`.
    pub fn wait_state(&self, id: VbdId, state: XenbusState) {
        self.toolstack.wait_backend_state(id, T, |s| s == state).unwrap_or_else(|e| panic!("{id}: {e}"));
    }
}

/// Names of this process's threads (`/proc/self/task/*/comm`).
pub fn thread_names() -> Vec<String> {
    let mut names = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task").flatten() {
        if let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) {
            names.push(comm.trim_end().to_string());
        }
    }
    names
}

/// The kernel's id of the calling thread (from `/proc/thread-self`, a link to `<pid>/task/<tid>`).
fn current_tid() -> u32 {
    let link = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
    link.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse().ok()).expect("a thread id")
}

/// Whether thread `tid` of this process is gone. A joined thread can stay listed in `/proc/self/task` for a
/// moment after `join` returns (the kernel wakes the joiner before it reaps the thread), so this waits briefly.
pub fn thread_gone(tid: u32) -> bool {
    within(SETTLE, || !std::path::Path::new(&format!("/proc/self/task/{tid}")).exists())
}

/// Whether `done` became true within `bound` (checked every 2 ms).
pub fn within(bound: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + bound;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// How long `/proc/self/task` may lag behind the threads: a new thread names itself only once it runs, and a
/// joined one is reaped a moment after `join` returns (microseconds; generous for a loaded machine).
pub const SETTLE: Duration = Duration::from_millis(500);

/// The data-plane worker threads of frontend domain `domid` (named `blkif-d<domid>-q<queue>`).
pub fn workers_of(domid: DomId) -> usize {
    let prefix = format!("blkif-d{domid}-q");
    thread_names().iter().filter(|n| n.starts_with(&prefix)).count()
}

/// A subscriber that records the error-level events of the thread it is the default of (message and fields).
struct ErrorCapture(Arc<Mutex<Vec<String>>>);

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!("{}={value:?} ", field.name()));
    }
}

impl tracing::Subscriber for ErrorCapture {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() == tracing::Level::ERROR || metadata.is_span()
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if *event.metadata().level() == tracing::Level::ERROR {
            let mut fields = Fields(String::new());
            event.record(&mut fields);
            self.0.lock().unwrap_or_else(PoisonError::into_inner).push(fields.0);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}
