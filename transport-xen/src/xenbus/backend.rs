// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The backend state machine of one vbd (`backend/vbd/<domid>/<devid>`), after Linux xen-blkback's xenbus.c and
//! the seed's `diskseq` / `opened` nodes.
//!
//! It is level-triggered: every watch event for the vbd calls [`VbdBackend::reconcile`], which re-reads the nodes
//! it depends on and acts only on what changed, so missed or coalesced events are harmless and our own writes
//! (which fire the same watches) cause no loops.
//!
//! 1. probe (backend `state` = Initialising, `frontend`/`frontend-id` present): write `opened` = `0` and the
//!    feature nodes in one transaction, watch the frontend's `state`, switch to InitWait. The hotplug script runs
//!    only once the toolstack sees InitWait, so `opened` exists before it can look.
//! 2. device: read `physical-device`, `diskseq`, `params`, `mode`, `script` in one transaction; validate
//!    `diskseq` as the seed does; open the disk pinned to it; write `opened` = `1`. A later change is refused
//!    (logged, ignored). Without a hotplug `script`, a `params` image file is served directly.
//! 3. connect (frontend Initialised or Connected, disk open): read the rings, start the data plane, write
//!    `sectors`/`info`/`sector-size`/..., switch to Connected.
//! 4. close: frontend Closing → Closing; frontend Closed → kick the rings and serve them until quiet (see
//!    `closing`), then stop the data plane, Closed (and release the disk when `online` is 0); frontend gone →
//!    the same at once; backend directory removed → stop everything, write nothing.
//!
//! Fatal errors write `<domain>/error/backend/vbd/<domid>/<devid>/error` = `"<errno> <message>"` (where
//! `xenbus_dev_fatal` writes) and switch to Closing; nothing is served until the frontend starts over.
//!
//! A restarted backend [adopts](VbdBackend::adopt) the vbds it finds (as Linux probes existing devices when
//! blkback loads): it probes them whatever their state and continues from what the previous backend and the
//! frontend left. The rings a previous backend served cannot be resumed (how far it consumed them died with it),
//! so a frontend still using them is asked to close (Closing); once it starts over (Initialising, as Linux
//! blkfront's probe writes), the vbd is served again (InitWait, Connected).

use std::sync::Arc;

use device_blk::Disk;

use crate::connect::ConnectConfig;
use crate::services::{read_optional, with_transaction, DomId, TxId, XenError, XenStore};
use crate::xenbus::device::{DeviceNodes, DeviceSource, DiskOpener, Fatal, LocalDiskOpener};
use crate::xenbus::frontend_nodes;
use crate::xenbus::nodes::{self, Mode};
use crate::xenbus::rings::{RingServer, RunningRings};
use crate::xenbus::state::{VbdId, VbdPaths, XenbusState};

mod closing;
mod config;
mod probe;
mod writes;
pub use config::BackendConfig;
use writes::Directory;

/// `VDISK_CDROM` in the `info` node.
pub const VDISK_CDROM: u32 = 1;
/// `VDISK_REMOVABLE` in the `info` node.
pub const VDISK_REMOVABLE: u32 = 2;
/// `VDISK_READONLY` in the `info` node.
pub const VDISK_READONLY: u32 = 4;

/// Transaction retries before giving up on a conflicting writer.
const TX_ATTEMPTS: u32 = 16;
/// Longest message written to an `error` node.
const MAX_ERROR_MESSAGE: usize = 1024;

/// Where a vbd is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Not probed yet: waiting for `state` = Initialising and the frontend details.
    Unprobed,
    /// Probed: device, connect and close handling run.
    Active,
    /// Closed with `online` = 0: everything released; waiting for the toolstack to remove the directory.
    Done,
    /// The backend directory was removed.
    Removed,
}

/// A snapshot of one vbd, for status reports and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VbdStatus {
    /// Which vbd.
    pub id: VbdId,
    /// Its life phase.
    pub phase: Phase,
    /// The state we last wrote.
    pub state: XenbusState,
    /// The disk held open.
    pub device: Option<DeviceSource>,
    /// The data plane's configuration while connected.
    pub connection: Option<ConnectConfig>,
    /// The last fatal error.
    pub error: Option<Fatal>,
}

#[derive(Debug)]
struct Frontend {
    path: String,
    domid: DomId,
}

#[derive(Debug)]
struct OpenDisk {
    disk: Arc<Disk>,
    source: DeviceSource,
    mode: Mode,
    /// The nodes it was opened from.
    nodes: DeviceNodes,
}

/// The watch token of a vbd's frontend-state watch.
pub fn frontend_token(id: VbdId) -> String {
    format!("blkback-fe:{}:{}", id.domid, id.devid)
}

/// One vbd's backend.
pub struct VbdBackend {
    store: Arc<dyn XenStore>,
    rings: Arc<dyn RingServer>,
    config: Arc<BackendConfig>,
    opener: Arc<dyn DiskOpener>,
    id: VbdId,
    paths: VbdPaths,
    phase: Phase,
    state: XenbusState,
    frontend: Option<Frontend>,
    watching: Option<String>,
    disk: Option<OpenDisk>,
    /// The device nodes last acted on: unchanged nodes are not acted on twice.
    seen_device_nodes: Option<DeviceNodes>,
    /// The device nodes whose open failed: not retried (and the error node not overwritten) until they change.
    failed_device_nodes: Option<DeviceNodes>,
    running: Option<Box<dyn RunningRings>>,
    /// The frontend is Closed and its rings are still served until quiet (see `closing`).
    closing: Option<closing::Closing>,
    connection: Option<ConnectConfig>,
    error: Option<Fatal>,
    /// Take over a vbd a previous backend served (probe it in any state), until the first reconcile.
    adopt: bool,
    /// Taken over from a previous backend process that had opened the device (`opened` was 1).
    held_before: bool,
    /// This round found the directory re-created: [`reconcile`](Self::reconcile) starts over.
    recreated: bool,
}

impl std::fmt::Debug for VbdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VbdBackend")
            .field("id", &self.id)
            .field("phase", &self.phase)
            .field("state", &self.state)
            .finish()
    }
}

impl VbdBackend {
    /// A backend for `id`; nothing is written until [`reconcile`](Self::reconcile) finds the device Initialising.
    pub fn new(store: Arc<dyn XenStore>, rings: Arc<dyn RingServer>, config: Arc<BackendConfig>, id: VbdId) -> Self {
        let paths = VbdPaths::new(&config.domain_path, id);
        VbdBackend {
            store,
            rings,
            config,
            opener: Arc::new(LocalDiskOpener),
            id,
            paths,
            phase: Phase::Unprobed,
            state: XenbusState::Unknown,
            frontend: None,
            watching: None,
            disk: None,
            seen_device_nodes: None,
            failed_device_nodes: None,
            running: None,
            closing: None,
            connection: None,
            error: None,
            adopt: false,
            held_before: false,
            recreated: false,
        }
    }

    /// Open disks through `opener` (a sandboxed process asks a privileged one) instead of in this process.
    pub fn with_disk_opener(mut self, opener: Arc<dyn DiskOpener>) -> Self {
        self.opener = opener;
        self
    }

    /// Take over a vbd that existed before this backend started (a restarted backend): the first
    /// [`reconcile`](Self::reconcile) probes it in whatever state the previous backend left it, not only in
    /// Initialising, and continues from there:
    /// - previous backend InitWait (never connected): InitWait again, and connect when the frontend published;
    /// - previous backend Closed: stay Closed until the frontend starts over (Initialising), then InitWait;
    /// - previous backend Initialised, Connected or Closing while the frontend still uses its rings: Closing (the
    ///   rings cannot be resumed), Closed once the frontend closed, and served again once it starts over;
    /// - the frontend starting over (Initialising): InitWait.
    pub fn adopt(mut self) -> Self {
        self.adopt = true;
        self
    }

    /// Which vbd.
    pub fn id(&self) -> VbdId {
        self.id
    }

    /// Its paths.
    pub fn paths(&self) -> &VbdPaths {
        &self.paths
    }

    /// Its phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// A snapshot.
    pub fn status(&self) -> VbdStatus {
        VbdStatus {
            id: self.id,
            phase: self.phase,
            state: self.state,
            device: self.disk.as_ref().map(|d| d.source.clone()),
            connection: self.connection.clone(),
            error: self.error.clone(),
        }
    }

    /// The data plane's fatal-error descriptor, while connected.
    pub fn fatal_fd(&self) -> Option<std::os::fd::RawFd> {
        self.running.as_ref().and_then(|r| r.fatal_fd())
    }

    /// Re-read the nodes this vbd depends on and act on what changed.
    pub fn reconcile(&mut self) -> Result<(), XenError> {
        // A round that finds the directory re-created under it (see `Directory::Recreated`) starts over as a new
        // vbd; one more round probes it. Bounded: the toolstack re-creating it again and again only delays us.
        for _ in 0..3 {
            self.reconcile_round()?;
            if !std::mem::take(&mut self.recreated) {
                return Ok(());
            }
            tracing::info!(vbd = %self.id, "backend re-created: probing again");
            self.reset();
        }
        Ok(())
    }

    fn reconcile_round(&mut self) -> Result<(), XenError> {
        if self.phase == Phase::Removed {
            return Ok(());
        }
        let Some(state_node) = read_optional(&*self.store, TxId::NONE, &self.paths.node("state"))? else {
            if self.phase != Phase::Unprobed {
                tracing::info!(vbd = %self.id, "backend directory removed: tearing down");
                self.phase = Phase::Removed;
            } else if read_optional(&*self.store, TxId::NONE, &self.paths.backend)?.is_none() {
                self.phase = Phase::Removed;
            }
            self.release();
            return Ok(());
        };
        let store_state = XenbusState::parse(&state_node).ok();
        if self.directory(store_state) == Directory::Recreated {
            self.recreated = true;
            return Ok(());
        }
        if self.phase == Phase::Done {
            match store_state {
                Some(XenbusState::Closed) => return Ok(()),
                // The toolstack wrote over our Closed (libxl's detach writes Closing): say Closed again.
                _ => return self.switch_state(XenbusState::Closed),
            }
        }
        if self.phase == Phase::Unprobed {
            let probed = self.probe(store_state)?;
            self.adopt = false;
            if !probed || self.phase == Phase::Done {
                return Ok(());
            }
        }
        if store_state == Some(XenbusState::Closing) && self.state < XenbusState::Closing {
            // libxl detaches by writing online = 0 and state = Closing into our directory.
            tracing::info!(vbd = %self.id, "the toolstack asked the device to close");
            self.state = XenbusState::Closing;
        } else if store_state == Some(XenbusState::Closing) && self.state == XenbusState::Closed {
            // Already closed: say so again, or a toolstack waiting for Closed would wait forever.
            self.switch_state(XenbusState::Closed)?;
        }
        self.check_device()?;
        self.check_frontend()
    }

    /// The data plane reported a halted ring: stop it and fail the vbd.
    pub fn on_ring_fatal(&mut self) {
        let Some(reason) = self.running.as_ref().and_then(|r| r.fatal_error()) else { return };
        self.stop_rings();
        self.fatal(Fatal::new(libc::EIO, format!("ring halted: {reason}")));
    }

    /// Look at the disk's size again; if it grew while the vbd is connected, tell the frontend as Linux blkback
    /// does: the new `sectors` and the state written again (Connected) in one transaction, which makes Linux
    /// blkfront read `sectors` and resize the disk. `Ok(None)` when no disk is open.
    pub fn refresh_size(&mut self) -> Result<Option<device_blk::SizeChange>, String> {
        let Some(open) = &self.disk else { return Ok(None) };
        let change = open.disk.refresh_size().map_err(|e| e.to_string())?;
        let device_blk::SizeChange::Grown { from, to } = change else { return Ok(Some(change)) };
        tracing::info!(vbd = %self.id, from = from.0, to = to.0, "the disk grew");
        if self.state == XenbusState::Connected {
            let (sectors, state) = (self.paths.node("sectors"), self.paths.node("state"));
            let store = &*self.store;
            let connected = XenbusState::Connected.as_node();
            let written = with_transaction(store, TX_ATTEMPTS, |tx| {
                let Some(current) = read_optional(store, tx, &state)? else { return Ok(false) };
                if self.directory(XenbusState::parse(&current).ok()) == Directory::Recreated {
                    return Ok(false);
                }
                store.write(tx, &sectors, to.0.to_string().as_bytes())?;
                store.write(tx, &state, connected.as_bytes())?;
                Ok(true)
            });
            if let Err(e) = written {
                return Err(format!("announcing the new size of vbd {}: {e}", self.id));
            }
        }
        Ok(Some(change))
    }

    /// The xenstore connection is gone: stop the data plane (answering what is in flight, unmapping every grant)
    /// and release the disk, writing nothing. The vbd is done for this backend.
    pub fn abandon(&mut self) {
        self.stop_rings();
        self.disk = None;
        // The watch went with the connection.
        self.watching = None;
        self.phase = Phase::Removed;
    }

    /// Graceful shutdown of the process: stop the data plane, tell the frontend we are Closed, release the disk.
    pub fn shutdown(&mut self) {
        self.stop_rings();
        if self.phase == Phase::Active && self.state != XenbusState::Closed {
            if let Err(e) = self.switch_state(XenbusState::Closed) {
                tracing::warn!(vbd = %self.id, error = %e, "cannot write state Closed on shutdown");
            }
        }
        self.release();
        if self.phase == Phase::Active {
            self.phase = Phase::Done;
        }
    }

    // -----------------------------------------------------------------------------------------------------------

    fn check_device(&mut self) -> Result<(), XenError> {
        if self.frontend.is_none() {
            // The probe failed (its error is reported): nothing is opened for a device we cannot serve.
            return Ok(());
        }
        let store = &*self.store;
        let p = &self.paths;
        let nodes = with_transaction(store, TX_ATTEMPTS, |tx| {
            Ok(DeviceNodes {
                physical_device: read_optional(store, tx, &p.node("physical-device"))?,
                diskseq: read_optional(store, tx, &p.node("diskseq"))?,
                params: read_optional(store, tx, &p.node("params"))?,
                mode: read_optional(store, tx, &p.node("mode"))?,
                script: read_optional(store, tx, &p.node("script"))?,
                hotplug_status: read_optional(store, tx, &p.node("hotplug-status"))?,
            })
        })?;
        if self.seen_device_nodes.as_ref() == Some(&nodes) {
            return Ok(());
        }
        self.seen_device_nodes = Some(nodes.clone());
        if self.failed_device_nodes.as_ref().is_some_and(|failed| failed.same_device(&nodes)) {
            // A script reporting its own failure (hotplug-status) after ours must not trigger a second attempt.
            return Ok(());
        }
        if let Some(open) = &self.disk {
            if !open.nodes.same_device(&nodes) {
                tracing::warn!(
                    vbd = %self.id, device = %open.source,
                    "device nodes changed after the open: ignored (changing the physical device is not supported)"
                );
            }
            return Ok(());
        }
        let opened = match self.opener.open(self.id, &nodes, self.config.direct_io) {
            Ok(None) => return Ok(()),
            Ok(Some(opened)) => opened,
            Err(fatal) => {
                self.failed_device_nodes = Some(nodes);
                let fatal = self.explain_lost_device(fatal);
                self.fatal(fatal);
                return Ok(());
            }
        };
        let (disk, source, mode) = (Arc::new(opened.disk), opened.source, opened.mode);
        // The seed: tell userspace we hold the device, so it may drop its own reference (autoclear loop devices).
        if let Err(e) = self.write_nodes(&[("opened", "1".into())]) {
            if matches!(e, XenError::Disconnected { .. }) {
                // Not this vbd's failure: the supervisor reports the lost connection and closes everything.
                return Err(e);
            }
            let msg = format!("{}: notifying userspace device has been opened: {e}", self.paths.backend);
            self.fatal(Fatal::new(libc::EIO, msg));
            return Ok(());
        }
        tracing::info!(vbd = %self.id, device = %source, ?mode, "device opened");
        self.disk = Some(OpenDisk { disk, source, mode, nodes });
        Ok(())
    }

    /// The frontend's `state` (Unknown when absent, unreadable or garbage).
    fn frontend_state(&self) -> Result<XenbusState, XenError> {
        let Some(fe) = &self.frontend else { return Ok(XenbusState::Unknown) };
        match self.store.read(TxId::NONE, &format!("{}/state", fe.path)) {
            Ok(v) => Ok(XenbusState::parse(&v).unwrap_or(XenbusState::Unknown)),
            Err(XenError::NotFound { .. } | XenError::Access { .. }) => Ok(XenbusState::Unknown),
            Err(e) => Err(e),
        }
    }

    fn check_frontend(&mut self) -> Result<(), XenError> {
        if self.frontend.is_none() {
            return Ok(());
        }
        let fe_state = self.frontend_state()?;
        if self.closing.is_some() && fe_state != XenbusState::Closed {
            // The frontend left Closed while its old rings were still served (starting over, gone): they are done.
            self.stop_rings();
            if self.state != XenbusState::Closed {
                self.switch_state(XenbusState::Closed)?;
            }
        }
        match fe_state {
            XenbusState::Initialising => {
                if self.state == XenbusState::Closed {
                    tracing::info!(vbd = %self.id, "frontend restarts: prepare for reconnect");
                    self.error = None;
                    self.seen_device_nodes = None;
                    self.failed_device_nodes = None;
                    self.switch_state(XenbusState::InitWait)?;
                    self.check_device()?;
                }
            }
            XenbusState::Initialised | XenbusState::Connected => {
                if self.state == XenbusState::InitWait && self.disk.is_some() && self.running.is_none() {
                    self.connect()?;
                }
            }
            XenbusState::Closing => {
                if self.state < XenbusState::Closing {
                    self.switch_state(XenbusState::Closing)?;
                }
            }
            XenbusState::Closed | XenbusState::Unknown => {
                if fe_state == XenbusState::Closed && self.serve_closed_frontend() {
                    return Ok(());
                }
                self.stop_rings();
                if self.state != XenbusState::Closed {
                    self.switch_state(XenbusState::Closed)?;
                }
                let online = nodes::parse_online(
                    read_optional(&*self.store, TxId::NONE, &self.paths.node("online"))?.as_deref(),
                );
                if fe_state == XenbusState::Unknown || !online {
                    tracing::info!(vbd = %self.id, frontend = %fe_state, online, "device closed and released");
                    self.release();
                    self.phase = Phase::Done;
                }
            }
            XenbusState::InitWait | XenbusState::Reconfiguring | XenbusState::Reconfigured => {
                if self.error.is_none() {
                    self.fatal(Fatal::new(libc::EINVAL, format!("saw state {} at frontend", fe_state.number())));
                }
            }
        }
        Ok(())
    }

    fn connect(&mut self) -> Result<(), XenError> {
        let (Some(fe), Some(open)) = (&self.frontend, &self.disk) else { return Ok(()) };
        let store = &*self.store;
        let adv = self.config.advertised();
        let read = with_transaction(store, TX_ATTEMPTS, |tx| {
            frontend_nodes::read_connect_config(store, tx, &fe.path, fe.domid, adv)
        });
        let config = match read {
            Ok(Ok(config)) => config,
            Ok(Err(fatal)) => {
                self.fatal(fatal);
                return Ok(());
            }
            Err(XenError::Again) => {
                self.fatal(Fatal::new(libc::EAGAIN, "reading the frontend's rings: the frontend keeps rewriting them"));
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let geometry = *open.disk.geometry();
        let read_only = open.mode == Mode::ReadOnly || geometry.read_only;
        let cdrom = frontend_nodes::is_cdrom(store, &fe.path);
        // xl's `no-discard` (`discard-enable` = 0) is enforced on the request path, not only left unadvertised: a
        // frontend that discards anyway is answered "not supported" and the image keeps its blocks.
        let discard_enabled = read_optional(store, TxId::NONE, &self.paths.node("discard-enable"))?
            .is_none_or(|v| nodes::parse_flag("discard-enable", &v).unwrap_or(true));
        let discard = geometry.discard && discard_enabled && !read_only;
        let disk = if geometry.discard && !discard {
            match open.disk.without_discard() {
                Ok(disk) => Arc::new(disk),
                Err(e) => {
                    self.fatal(Fatal::new(e.raw_os_error().unwrap_or(libc::EIO), format!("duplicating the disk: {e}")));
                    return Ok(());
                }
            }
        } else {
            open.disk.clone()
        };
        let running = match self.rings.start(disk, &config) {
            Ok(running) => running,
            Err(fatal) => {
                self.fatal(fatal);
                return Ok(());
            }
        };
        self.running = Some(running);
        let info = if read_only { VDISK_READONLY } else { 0 } | if cdrom { VDISK_CDROM } else { 0 };
        let flag = |b: bool| if b { "1" } else { "0" };
        let mut info_nodes: Vec<(&str, String)> = vec![
            ("feature-flush-cache", "1".into()),
            ("feature-barrier", "1".into()),
            ("feature-persistent", flag(self.config.persistent_grants).into()),
            ("feature-discard", flag(discard).into()),
            // Linux blkback's units: `sectors` counts 512-byte sectors whatever `sector-size` is.
            ("sectors", geometry.capacity.0.to_string()),
            ("info", info.to_string()),
            ("sector-size", geometry.logical_block_size.bytes().to_string()),
            ("physical-sector-size", geometry.physical_block_size.bytes().to_string()),
        ];
        if discard {
            info_nodes.push(("discard-granularity", geometry.discard_granularity.to_string()));
            info_nodes.push(("discard-alignment", "0".into()));
            info_nodes.push(("discard-secure", "0".into()));
        }
        if let Err(e) = self.write_nodes(&info_nodes) {
            self.stop_rings();
            return Err(e);
        }
        tracing::info!(
            vbd = %self.id, queues = config.queues.len(), abi = ?config.abi, ring_pages = config.queues[0].ring_refs.len(),
            persistent = config.persistent_grants, "connected"
        );
        self.connection = Some(config);
        self.switch_state(XenbusState::Connected)
    }

    fn stop_rings(&mut self) {
        let since_close = self.activity_since_close();
        if let Some(running) = self.running.take() {
            tracing::info!(vbd = %self.id, activity_since_close = ?since_close, "stopping the data plane");
            running.stop();
        }
        self.closing = None;
        self.connection = None;
    }

    /// Stop everything and let go of the disk and the watch.
    fn release(&mut self) {
        self.stop_rings();
        self.disk = None;
        if let Some(path) = self.watching.take() {
            if let Err(e) = self.store.unwatch(&path, &frontend_token(self.id)) {
                tracing::debug!(vbd = %self.id, error = %e, "unwatch");
            }
        }
    }

    fn reset(&mut self) {
        self.release();
        self.phase = Phase::Unprobed;
        self.state = XenbusState::Unknown;
        self.frontend = None;
        self.seen_device_nodes = None;
        self.failed_device_nodes = None;
        self.error = None;
        self.held_before = false;
    }
}

impl Drop for VbdBackend {
    fn drop(&mut self) {
        self.release();
    }
}
