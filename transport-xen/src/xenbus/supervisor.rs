// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The supervisor: watches `backend/vbd` (of all frontends, or of one domain), runs one [`VbdBackend`] per vbd,
//! picks up vbds as the toolstack adds and removes them, and drives everything from one thread over the store's
//! watch descriptor and the data planes' fatal-error descriptors.
//!
//! A backend started while vbds already exist (a restarted `blkbackd`) takes them over, as Linux's xenbus probes
//! every existing device when blkback loads: see [`VbdBackend::adopt`].
//!
//! When the xenstore connection fails, [`XenBackend::run`] logs it once, stops every data plane (in-flight
//! requests answered, grants unmapped, ports unbound, worker threads joined), releases the disks and returns the
//! error: nothing can be written to xenstore any more, so the vbds are left as they are for `blkbackd xen --cleanup`
//! or the next backend to close.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::services::{DomId, TxId, WatchEvent, XenError, XenStore};
use crate::xenbus::backend::{BackendConfig, Phase, VbdBackend, VbdStatus};
use crate::xenbus::device::{DiskOpener, LocalDiskOpener};
use crate::xenbus::nodes;
use crate::xenbus::rings::RingServer;
use crate::xenbus::state::{vbd_root, VbdId};

/// The token of the supervisor's watch on the vbd directory.
const ROOT_TOKEN: &str = "blkback-vbds";
/// How long the driver loop sleeps without any event (a safety net; every wake-up is event driven).
const IDLE_POLL: Duration = Duration::from_millis(500);
/// How often the disks' sizes are looked at again (a file extended, a loop device re-read with `losetup -c`, a
/// logical volume extended: one `fstat` or `BLKGETSIZE64` per vbd).
const SIZE_CHECK: Duration = Duration::from_secs(1);
/// The shortest wait for a vbd's deadline.
const DEADLINE_SLACK: Duration = Duration::from_millis(10);

/// Which frontends' vbds a supervisor serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every vbd under `backend/vbd`.
    AllDomains,
    /// Only `backend/vbd/<domid>` (one process per guest).
    Domain(DomId),
}

/// Wakes a running [`XenBackend::run`] and makes it shut down.
#[derive(Clone, Debug)]
pub struct StopHandle(Arc<EventFd>);

impl StopHandle {
    /// Ask the driver loop to shut down (stop the data planes, write Closed, return).
    pub fn stop(&self) {
        wake(&self.0, "stop");
    }
}

/// Asks a running [`XenBackend::run`] to look at its disks' sizes now (`blkbackd resize`).
#[derive(Clone, Debug)]
pub struct ResizeHandle(Arc<EventFd>);

impl ResizeHandle {
    /// Request the check; the loop does it at once.
    pub fn request(&self) {
        wake(&self.0, "check sizes");
    }
}

/// Wake the driver loop through one of its eventfds.
fn wake(event: &EventFd, what: &str) {
    if let Err(e) = event.write(1) {
        tracing::error!(error = %e, "cannot signal the backend to {what}");
    }
}

/// A xenbus backend for vbds: one state machine per vbd, driven by xenstore watches.
pub struct XenBackend {
    store: Arc<dyn XenStore>,
    rings: Arc<dyn RingServer>,
    config: Arc<BackendConfig>,
    opener: Arc<dyn DiskOpener>,
    root: String,
    watch_path: String,
    scope: Scope,
    vbds: BTreeMap<VbdId, VbdBackend>,
    events: Vec<WatchEvent>,
    stop: Arc<EventFd>,
    /// Wakes the loop to look at the disks' sizes now.
    resize: Arc<EventFd>,
    /// When the sizes were last looked at.
    sizes_checked: std::time::Instant,
    /// The vbds that existed at start were listed (and adopted).
    scanned: bool,
}

impl std::fmt::Debug for XenBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenBackend").field("watch", &self.watch_path).field("vbds", &self.vbds.len()).finish()
    }
}

impl XenBackend {
    /// Watch the vbds in `scope`; the first [`process_events`](Self::process_events) picks up existing ones.
    pub fn new(
        store: Arc<dyn XenStore>,
        rings: Arc<dyn RingServer>,
        config: BackendConfig,
        scope: Scope,
    ) -> Result<XenBackend, XenError> {
        let config = Arc::new(config.clamped());
        let root = vbd_root(&config.domain_path);
        let watch_path = match scope {
            Scope::AllDomains => root.clone(),
            Scope::Domain(domid) => format!("{root}/{domid}"),
        };
        let stop = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| XenError::os("eventfd", &e))?;
        let resize = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| XenError::os("eventfd", &e))?;
        store.watch(&watch_path, ROOT_TOKEN)?;
        tracing::info!(watch = %watch_path, "xen block backend watching");
        Ok(XenBackend {
            store,
            rings,
            config,
            opener: Arc::new(LocalDiskOpener),
            root,
            watch_path,
            scope,
            vbds: BTreeMap::new(),
            events: Vec::new(),
            stop: Arc::new(stop),
            resize: Arc::new(resize),
            sizes_checked: std::time::Instant::now(),
            scanned: false,
        })
    }

    /// Open every vbd's disk through `opener` (see [`DiskOpener`]) instead of in this process.
    pub fn with_disk_opener(mut self, opener: Arc<dyn DiskOpener>) -> Self {
        self.opener = opener;
        self
    }

    /// The configuration every vbd uses.
    pub fn config(&self) -> &BackendConfig {
        &self.config
    }

    /// A handle that stops [`run`](Self::run) from another thread or a signal handler thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.stop.clone())
    }

    /// A handle that makes the loop look at the disks' sizes now.
    pub fn resize_handle(&self) -> ResizeHandle {
        ResizeHandle(self.resize.clone())
    }

    /// Look at every open disk's size again and announce those that grew (see [`VbdBackend::refresh_size`]).
    pub fn refresh_sizes(&mut self) {
        self.sizes_checked = std::time::Instant::now();
        for (id, vbd) in &mut self.vbds {
            if let Err(e) = vbd.refresh_size() {
                tracing::warn!(vbd = %id, error = %e, "disk size");
            }
        }
    }

    /// A snapshot of every vbd.
    pub fn status(&self) -> Vec<VbdStatus> {
        self.vbds.values().map(VbdBackend::status).collect()
    }

    /// Handle every pending watch event, every vbd whose [deadline](VbdBackend::deadline) passed and every halted
    /// ring; returns how many events there were.
    ///
    /// The first call lists the vbds that already exist and takes them over ([`VbdBackend::adopt`]).
    pub fn process_events(&mut self) -> Result<usize, XenError> {
        self.events.clear();
        self.store.take_watch_events(&mut self.events)?;
        let mut dirty = BTreeSet::new();
        let adopting = !self.scanned;
        let mut rescan = adopting;
        for event in &self.events {
            if event.token == ROOT_TOKEN {
                match self.vbd_of_path(&event.path) {
                    Some(id) => {
                        dirty.insert(id);
                    }
                    None => rescan = true,
                }
            } else if let Some(id) = parse_frontend_token(&event.token) {
                dirty.insert(id);
            }
        }
        if rescan {
            self.rescan(&mut dirty)?;
            self.scanned = true;
        }
        // And every vbd whose deadline passed (a Closed frontend's rings served until quiet).
        let now = Instant::now();
        dirty.extend(self.vbds.iter().filter(|(_, v)| v.deadline().is_some_and(|at| at <= now)).map(|(&id, _)| id));
        for id in dirty {
            if !self.in_scope(id) {
                continue;
            }
            let _span = tracing::info_span!("vbd", domid = id.domid, devid = id.devid).entered();
            let vbd = self.vbds.entry(id).or_insert_with(|| {
                let vbd = VbdBackend::new(self.store.clone(), self.rings.clone(), self.config.clone(), id)
                    .with_disk_opener(self.opener.clone());
                if adopting {
                    vbd.adopt()
                } else {
                    vbd
                }
            });
            match vbd.reconcile() {
                Ok(()) => {}
                // The connection is gone: `run` reports it once and closes everything.
                Err(e @ XenError::Disconnected { .. }) => return Err(e),
                Err(e) => tracing::warn!(vbd = %id, error = %e, "xenstore error while handling the vbd"),
            }
            if matches!(vbd.phase(), Phase::Removed) {
                self.vbds.remove(&id);
            }
        }
        for vbd in self.vbds.values_mut() {
            vbd.on_ring_fatal();
        }
        Ok(self.events.len())
    }

    /// How long the loop may wait for an event: up to `timeout`, less if a vbd's deadline comes first (but at
    /// least [`DEADLINE_SLACK`]: a deadline that stays due, its vbd's store reads failing, cannot make the loop
    /// spin).
    fn wait_limit(&self, timeout: Duration) -> Duration {
        let now = Instant::now();
        self.vbds
            .values()
            .filter_map(VbdBackend::deadline)
            .map(|at| (at.saturating_duration_since(now) + Duration::from_millis(1)).max(DEADLINE_SLACK))
            .fold(timeout.min(SIZE_CHECK), Duration::min)
    }

    /// Wait (up to `timeout`) for a watch event, a halted ring or a stop request, and handle it.
    /// Returns `false` once a stop was requested (after shutting every vbd down).
    pub fn poll_once(&mut self, timeout: Duration) -> Result<bool, XenError> {
        let mut fds = vec![self.store.watch_fd(), self.stop.as_raw_fd(), self.resize.as_raw_fd()];
        fds.extend(self.vbds.values().filter_map(VbdBackend::fatal_fd));
        wait_readable(&fds, self.wait_limit(timeout)).map_err(|e| XenError::os("poll", &e))?;
        if self.stop.read().is_ok() {
            self.shutdown();
            return Ok(false);
        }
        self.process_events()?;
        if self.resize.read().is_ok() || self.sizes_checked.elapsed() >= SIZE_CHECK {
            self.refresh_sizes();
        }
        Ok(true)
    }

    /// The driver loop: handle events until [`StopHandle::stop`], then shut down.
    ///
    /// If xenstore fails (the connection is lost), the failure is logged once, every vbd is
    /// [abandoned](Self::abandon) and the error is returned.
    pub fn run(&mut self) -> Result<(), XenError> {
        let result = self.serve();
        if let Err(e) = &result {
            self.abandon(e);
        }
        result
    }

    fn serve(&mut self) -> Result<(), XenError> {
        self.process_events()?;
        while self.poll_once(IDLE_POLL)? {}
        Ok(())
    }

    /// Give up on xenstore after `cause`: stop every data plane (in-flight requests are answered, grants unmapped,
    /// ports unbound, worker threads joined) and release every disk, writing nothing (the connection is gone).
    /// The vbds stay as they are in xenstore; `blkbackd xen --cleanup` or the next backend closes them.
    pub fn abandon(&mut self, cause: &XenError) {
        tracing::error!(
            error = %cause, vbds = self.vbds.len(),
            "xenstore failed: stopping every data plane; the vbds stay as they are in xenstore (close them with \
             `blkbackd xen --cleanup`, or start the backend again)"
        );
        for vbd in self.vbds.values_mut() {
            vbd.abandon();
        }
        self.vbds.clear();
    }

    /// Stop every data plane and write Closed for every active vbd (graceful process exit).
    pub fn shutdown(&mut self) {
        for vbd in self.vbds.values_mut() {
            vbd.shutdown();
        }
        if let Err(e) = self.store.unwatch(&self.watch_path, ROOT_TOKEN) {
            tracing::debug!(error = %e, "unwatch");
        }
    }

    fn in_scope(&self, id: VbdId) -> bool {
        match self.scope {
            Scope::AllDomains => true,
            Scope::Domain(domid) => id.domid == domid,
        }
    }

    /// The vbd a path under the root belongs to; `None` for the root and the per-domain directories.
    fn vbd_of_path(&self, path: &str) -> Option<VbdId> {
        let rest = path.strip_prefix(&self.root)?.strip_prefix('/')?;
        let mut parts = rest.split('/');
        let domid = nodes::parse_domid("domid", parts.next()?.as_bytes()).ok()?;
        let devid = nodes::parse_u32("devid", parts.next()?.as_bytes(), 0, u32::MAX).ok()?;
        Some(VbdId { domid, devid })
    }

    /// Every vbd directory that exists, plus every vbd we know (it may have gone).
    fn rescan(&mut self, dirty: &mut BTreeSet<VbdId>) -> Result<(), XenError> {
        dirty.extend(self.vbds.keys().copied());
        let domains = match self.scope {
            Scope::Domain(domid) => vec![domid.to_string()],
            Scope::AllDomains => list(&*self.store, &self.root)?,
        };
        for domain in domains {
            let Ok(domid) = nodes::parse_domid("domid", domain.as_bytes()) else { continue };
            for dev in list(&*self.store, &format!("{}/{domain}", self.root))? {
                if let Ok(devid) = nodes::parse_u32("devid", dev.as_bytes(), 0, u32::MAX) {
                    dirty.insert(VbdId { domid, devid });
                }
            }
        }
        Ok(())
    }
}

impl Drop for XenBackend {
    fn drop(&mut self) {
        // Vbds stop their data planes in their own Drop; nothing is written to xenstore here.
        let _ = self.store.unwatch(&self.watch_path, ROOT_TOKEN);
    }
}

fn list(store: &dyn XenStore, path: &str) -> Result<Vec<String>, XenError> {
    match store.directory(TxId::NONE, path) {
        Ok(children) => Ok(children),
        Err(XenError::NotFound { .. }) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

fn parse_frontend_token(token: &str) -> Option<VbdId> {
    let rest = token.strip_prefix("blkback-fe:")?;
    let (domid, devid) = rest.split_once(':')?;
    Some(VbdId { domid: domid.parse().ok()?, devid: devid.parse().ok()? })
}

/// `poll(2)` until one of `fds` is readable or `timeout` passes.
fn wait_readable(fds: &[RawFd], timeout: Duration) -> std::io::Result<()> {
    let mut pollfds: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    loop {
        // SAFETY: `pollfds` is a valid array of `pollfds.len()` entries for the duration of the call.
        let rc = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, ms) };
        if rc >= 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontend_tokens_round_trip() {
        let id = VbdId { domid: 7, devid: 51712 };
        assert_eq!(parse_frontend_token(&crate::xenbus::backend::frontend_token(id)), Some(id));
        assert_eq!(parse_frontend_token("blkback-fe:x:1"), None);
        assert_eq!(parse_frontend_token("other"), None);
    }
}
