// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The supervisor of `blkbackd xen`: watches `backend/vbd` and keeps exactly one worker process per guest domain
//! that has vbds (of every guest, or of the `--frontend-domid` ones).
//!
//! - A guest's first vbd starts its worker; once the guest has no vbd left (the toolstack removed the
//!   directories), the worker is asked to stop (SIGTERM), and killed if it has not after [`STOP_GRACE`].
//! - A worker that dies unasked (a crash, a SIGKILL, a seccomp kill): its vbds that were connected are closed and
//!   the requests left on their rings answered with an I/O error (the frontend sees Closed and an error node; its
//!   I/O fails instead of hanging), then a new worker takes the guest's vbds over (vbds still in the handshake
//!   are served by it). At most [`MAX_RESTARTS`] restarts within [`RESTART_WINDOW`]; then the guest is left
//!   closed until its vbds are removed.
//! - SIGTERM or SIGINT: every worker is asked to stop (each closes its vbds: the frontends see Closed, nothing
//!   stays mapped), the supervisor waits for them and exits 0.
//!
//! Workers run in process groups of their own (a signal to the service's group reaches the supervisor, which
//! stops them in order) and get SIGTERM if the supervisor dies. The supervisor never touches guest memory on the
//! data path; it reads xenstore, opens devices, and runs the failing-I/O cleanup of a dead worker's rings.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use transport_xen::services::{read_optional, DomId, TxId, XenError, XenStore};
use transport_xen::xen::{EvtchnDevice, EvtchnOpener, GntDev, XenBusStore, GNTDEV_DEVICE};
use transport_xen::xenbus::cleanup::vbds_of;
use transport_xen::xenbus::device::LocalDiskOpener;
use transport_xen::xenbus::{close_vbd_failing_io, VbdPaths, XenbusState};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::metrics::{FleetView, SharedFleet, SharedGrantFigures};
use super::process::{child_setup, pidfd_open, restricted_evtchn, signal, wait_readable};
use crate::cli::{value_name, LogFormat, XenArgs};
use crate::notify::Notifier;
use crate::sandbox::UserSpec;
use crate::signals::Shutdown;
use transport_xen::separation::broker::{Broker, SessionEnd, Welcome, SEND_TIMEOUT};
use transport_xen::separation::grants::{GrantFigures, GrantLedger, WorkerGntDev};
use transport_xen::separation::wire;

/// The system user the package creates for the workers.
pub const DEFAULT_USER: &str = "blkbackd";
/// How long a worker asked to stop may take before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// Restarts of one guest's worker allowed within [`RESTART_WINDOW`].
pub const MAX_RESTARTS: usize = 5;
/// See [`MAX_RESTARTS`].
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);
/// The watch token of the supervisor's own watch.
const TOKEN: &str = "blkbackd-service";
/// Why a dead worker's vbds were closed.
const DIED: &str = "the blkbackd worker serving this domain died; the device is closed";
/// How long the cleanup of a dead worker's rings keeps answering requests still being queued.
const CLEANUP_SETTLE: Duration = Duration::from_millis(200);

/// Run the service until SIGTERM/SIGINT (or `--cleanup`).
pub fn run(args: &XenArgs, shutdown: &Arc<Shutdown>, log_format: LogFormat) -> anyhow::Result<()> {
    if let Some(domid) = args.cleanup {
        return super::run_cleanup(args.backend_domid, domid, args.devid);
    }
    if !args.allow_kernel_blkback {
        crate::coexist::check_kernel_blkback(std::path::Path::new("/sys"))?;
    }
    // A combination the workers would refuse fails here, once, not in every worker.
    super::grant_mode(&args.serving)?;
    crate::sandbox::restrict_supervisor()?;
    // Bound now (a taken address fails before anything else), served once the signals are taken.
    let fleet = SharedFleet::default();
    let mut metrics =
        args.metrics_listen.as_ref().map(|addr| super::metrics::endpoint(addr, Arc::clone(&fleet))).transpose()?;
    let notifier = Notifier::from_env().context("systemd readiness (NOTIFY_SOCKET)")?;
    let exe = std::env::current_exe().context("finding blkbackd's own executable to start workers")?;
    let store = Arc::new(super::open_store()?);
    let domain_path = store.get_domain_path(args.backend_domid).context("reading the backend domain's path")?;
    let user = match &args.sandbox.user {
        Some(user) => user.clone(),
        None => UserSpec::parse(DEFAULT_USER).map_err(|e| {
            anyhow!(
                "the workers' user: {e} (the blkbackd package creates the system user {DEFAULT_USER}; or pass \
                 --user NAME|UID:GID)"
            )
        })?,
    };
    // Fail now, not at the first guest.
    drop(GntDev::open().map_err(|e| anyhow!("cannot map guest grants: {e} (is xen-gntdev loaded?)"))?);
    drop(EvtchnDevice::open().map_err(|e| anyhow!("cannot bind event channels: {e} (is xen-evtchn loaded?)"))?);
    shutdown.listen().context("cannot set up signal handling")?;
    if let Some(metrics) = &mut metrics {
        metrics.start()?;
    }
    let mut worker_args = vec![
        "--log-format".to_string(),
        value_name(log_format),
        "xen-worker".to_string(),
        "--domain-path".to_string(),
        domain_path.clone(),
        "--user".to_string(),
        format!("{}:{}", user.uid, user.gid),
        "--seccomp".to_string(),
        value_name(args.sandbox.seccomp),
    ];
    worker_args.extend(args.serving.to_args());
    let (done_tx, done_rx) = mpsc::channel();
    let mut service = Service {
        root: format!("{domain_path}/backend/vbd"),
        domain_path,
        store,
        scope: args.frontend_domid.iter().copied().collect(),
        exe,
        worker_args,
        grant_budget: args.max_grant_pages,
        direct_grants: args.serving.direct_grants,
        control_dir: args.control_dir.clone(),
        workers: BTreeMap::new(),
        restarts: BTreeMap::new(),
        vbds: BTreeMap::new(),
        restart_totals: BTreeMap::new(),
        fleet: metrics.is_some().then_some(fleet),
        given_up: BTreeSet::new(),
        cleaning: BTreeSet::new(),
        cleanup_done: (done_tx, done_rx),
        cleanup_wake: Arc::new(EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).context("eventfd")?),
    };
    tracing::info!(
        user = %user, seccomp = ?args.sandbox.seccomp, scope = ?args.frontend_domid,
        "serving xen vbds: one worker process per guest"
    );
    service.serve(shutdown, &notifier)
}

/// What a change under `backend/vbd` may mean for the workers.
#[derive(Debug, PartialEq, Eq)]
enum Touched {
    /// The directory itself: look at every guest.
    Everything,
    /// This guest may have gained or lost vbds.
    Guest(DomId),
    /// Nothing the supervisor acts on.
    Nothing,
}

struct Worker {
    child: Child,
    pidfd: OwnedFd,
    broker: Option<JoinHandle<SessionEnd>>,
    /// When we asked it to stop.
    stopping: Option<Instant>,
    /// What its broker's grant ledger holds (`None` with `--direct-grants`: its maps do not go through it).
    grants: Option<Arc<GrantFigures>>,
}

struct Service {
    store: Arc<XenBusStore>,
    domain_path: String,
    root: String,
    scope: BTreeSet<DomId>,
    exe: PathBuf,
    worker_args: Vec<String>,
    /// The grant pages each worker may hold (`--max-grant-pages`).
    grant_budget: u64,
    /// Workers map grants themselves (`--direct-grants`), not through their broker.
    direct_grants: bool,
    control_dir: Option<PathBuf>,
    workers: BTreeMap<DomId, Worker>,
    restarts: BTreeMap<DomId, VecDeque<Instant>>,
    /// The vbds of each guest in scope that has any (as of the last look at it).
    vbds: BTreeMap<DomId, usize>,
    /// Each guest's worker deaths not asked for, while it has vbds (for the metrics).
    restart_totals: BTreeMap<DomId, u64>,
    /// What the metrics endpoint reads (`--metrics-listen`), published after each round.
    fleet: Option<SharedFleet>,
    given_up: BTreeSet<DomId>,
    /// Guests whose dead worker's vbds are being closed (no worker is started meanwhile).
    cleaning: BTreeSet<DomId>,
    cleanup_done: (mpsc::Sender<DomId>, mpsc::Receiver<DomId>),
    cleanup_wake: Arc<EventFd>,
}

impl Service {
    fn serve(&mut self, shutdown: &Shutdown, notifier: &Notifier) -> anyhow::Result<()> {
        self.store.watch(&self.root, TOKEN).context("watching backend/vbd")?;
        tracing::info!(watch = %self.root, "xen block service watching");
        tracing::debug!(systemd = notifier.is_enabled(), "readiness");
        if let Err(e) = notifier.ready() {
            tracing::warn!(error = %format!("{e:#}"), "cannot tell systemd the service is ready");
        }
        let mut events = Vec::new();
        // The first round looks at every guest; later ones only at the guests the events name.
        let mut all = true;
        let mut dirty = BTreeSet::new();
        while !shutdown.is_requested() {
            let before = self.workers.len();
            dirty.extend(self.reap());
            if all { self.reconcile(None) } else { self.reconcile(Some(&dirty)) }
                .context("xenstore connection lost")?;
            (all, dirty) = (false, BTreeSet::new());
            self.publish();
            if self.workers.len() != before {
                let _ = notifier.status(&format!("serving {} guest(s)", self.workers.len()));
            }
            let mut fds = vec![self.store.watch_fd(), shutdown.wake_fd(), self.cleanup_wake.as_raw_fd()];
            fds.extend(self.workers.values().map(|w| w.pidfd.as_raw_fd()));
            wait_readable(&fds, Duration::from_secs(1)).context("poll")?;
            if shutdown.is_requested() {
                break;
            }
            events.clear();
            self.store.take_watch_events(&mut events).context("xenstore connection lost")?;
            for event in &events {
                match self.touched(&event.path) {
                    Touched::Everything => all = true,
                    Touched::Guest(domid) => {
                        dirty.insert(domid);
                    }
                    Touched::Nothing => {}
                }
            }
            let _ = self.cleanup_wake.read();
            while let Ok(domid) = self.cleanup_done.1.try_recv() {
                self.cleaning.remove(&domid);
                dirty.insert(domid);
            }
        }
        let _ = notifier.stopping();
        self.stop_all();
        let _ = self.store.unwatch(&self.root, TOKEN);
        tracing::info!("stopped");
        Ok(())
    }

    /// Which guests a changed path under `backend/vbd` may have given or taken vbds (see [`touched`]).
    fn touched(&self, path: &str) -> Touched {
        touched(&self.root, path, |domid| self.workers.contains_key(&domid))
    }

    /// Whether the service serves `domid` (not dom0; in `--frontend-domid` if given).
    fn in_scope(&self, domid: DomId) -> bool {
        domid != 0 && (self.scope.is_empty() || self.scope.contains(&domid))
    }

    /// Of `candidates`, the guests in scope that have vbds, with how many.
    fn with_vbds(&self, candidates: impl IntoIterator<Item = DomId>) -> Result<BTreeMap<DomId, usize>, XenError> {
        let mut guests = BTreeMap::new();
        for domid in candidates.into_iter().filter(|&d| self.in_scope(d)) {
            let n = vbds_of(&*self.store, &self.domain_path, domid)?.len();
            if n > 0 {
                guests.insert(domid, n);
            }
        }
        Ok(guests)
    }

    /// Tell the metrics endpoint (if any) what the workers are now.
    fn publish(&self) {
        let Some(fleet) = &self.fleet else { return };
        let view = FleetView {
            workers: self.workers.keys().filter_map(|&d| Some((d, self.control_path(d)?))).collect(),
            vbds: self.vbds.clone(),
            restarts: self.restart_totals.clone(),
            grants: self
                .workers
                .iter()
                .filter_map(|(&d, w)| Some((d, SharedGrantFigures(Arc::clone(w.grants.as_ref()?)))))
                .collect(),
        };
        *fleet.lock().unwrap_or_else(PoisonError::into_inner) = view;
    }

    /// Start the workers that are missing, stop those whose guest has no vbd left: of every guest (`None`: lists
    /// `backend/vbd`) or of the guests `only` names. Also ends workers that overstay a stop or broke the protocol.
    fn reconcile(&mut self, only: Option<&BTreeSet<DomId>>) -> Result<(), XenError> {
        let guests = match only {
            Some(only) => self.with_vbds(only.iter().copied())?,
            None => {
                let domains = match self.store.directory(TxId::NONE, &self.root) {
                    Ok(domains) => domains,
                    Err(XenError::NotFound { .. }) => Vec::new(),
                    Err(e) => return Err(e),
                };
                self.with_vbds(domains.iter().filter_map(|d| d.parse::<DomId>().ok()))?
            }
        };
        let looked_at = |domid: &DomId| only.is_none_or(|only| only.contains(domid));
        self.given_up.retain(|domid| !looked_at(domid) || guests.contains_key(domid));
        // A guest's restart count stays while its series are exported (vbds, or a worker not yet reaped): a counter
        // that fell back to 0 under the same labels would read as a reset.
        let workers = &self.workers;
        self.restart_totals
            .retain(|domid, _| !looked_at(domid) || guests.contains_key(domid) || workers.contains_key(domid));
        self.vbds.retain(|domid, _| !looked_at(domid));
        self.vbds.extend(&guests);
        for &domid in guests.keys() {
            if self.workers.contains_key(&domid) || self.given_up.contains(&domid) || self.cleaning.contains(&domid) {
                continue;
            }
            match self.spawn(domid) {
                Ok(worker) => {
                    tracing::info!(domid, pid = worker.child.id(), "worker started");
                    self.workers.insert(domid, worker);
                }
                Err(e) => tracing::error!(domid, error = %format!("{e:#}"), "cannot start the guest's worker"),
            }
        }
        for (domid, worker) in &mut self.workers {
            if looked_at(domid) && !guests.contains_key(domid) && worker.stopping.is_none() {
                tracing::info!(domid, pid = worker.child.id(), "the guest has no vbd left: stopping its worker");
                signal(&worker.child, libc::SIGTERM);
                worker.stopping = Some(Instant::now());
            }
            if worker.stopping.is_some_and(|since| since.elapsed() > STOP_GRACE) {
                tracing::warn!(domid, pid = worker.child.id(), "worker did not stop in time: killing it");
                signal(&worker.child, libc::SIGKILL);
            }
            // A worker whose broker gave up on it (it broke the protocol) is ended.
            if worker.broker.as_ref().is_some_and(JoinHandle::is_finished) {
                if let Some(end) = worker.broker.take().and_then(|b| b.join().ok()) {
                    if end != SessionEnd::Closed {
                        tracing::error!(domid, pid = worker.child.id(), reason = ?end, "ending the worker");
                        signal(&worker.child, libc::SIGKILL);
                    }
                }
            }
        }
        Ok(())
    }

    /// Collect the workers that exited, and clean up after those that died; returns the guests whose worker
    /// exited.
    fn reap(&mut self) -> Vec<DomId> {
        let exited: Vec<(DomId, std::process::ExitStatus)> = self
            .workers
            .iter_mut()
            .filter_map(|(&domid, w)| w.child.try_wait().ok().flatten().map(|status| (domid, status)))
            .collect();
        let domids = exited.iter().map(|(domid, _)| *domid).collect();
        for (domid, status) in exited {
            let Some(worker) = self.workers.remove(&domid) else { continue };
            // The worker is gone, so its broker ends (its sends fail, or time out if the worker left a way to keep
            // its end open): join it only once it has, never waiting here for one guest.
            if let Some(broker) = worker.broker {
                if broker.is_finished() {
                    let _ = broker.join();
                } else {
                    tracing::debug!(domid, "the worker's broker is still ending: not waited for");
                }
            }
            let pid = worker.child.id();
            if let Some(path) = self.control_path(domid) {
                let _ = std::fs::remove_file(path);
            }
            if worker.stopping.is_some() || status.success() {
                tracing::info!(domid, pid, %status, "worker exited");
                continue;
            }
            tracing::error!(
                domid, pid, %status, signal = status.signal(),
                "worker died: closing its connected vbds (their I/O fails) and starting a new one"
            );
            *self.restart_totals.entry(domid).or_default() += 1;
            let recent = self.restarts.entry(domid).or_default();
            recent.retain(|t| t.elapsed() < RESTART_WINDOW);
            recent.push_back(Instant::now());
            if recent.len() > MAX_RESTARTS {
                tracing::error!(
                    domid,
                    restarts = MAX_RESTARTS,
                    "worker keeps dying: not restarting it until the guest's vbds are removed"
                );
                self.given_up.insert(domid);
            }
            self.cleaning.insert(domid);
            let (store, domain_path, done, wake) =
                (self.store.clone(), self.domain_path.clone(), self.cleanup_done.0.clone(), self.cleanup_wake.clone());
            let spawned = std::thread::Builder::new().name(format!("cleanup-{domid}")).spawn(move || {
                close_connected_vbds(&*store, &domain_path, domid);
                let _ = done.send(domid);
                let _ = wake.write(1);
            });
            if let Err(e) = spawned {
                tracing::error!(domid, error = %e, "cannot start the cleanup thread");
                self.cleaning.remove(&domid);
            }
        }
        domids
    }

    fn spawn(&self, domid: DomId) -> anyhow::Result<Worker> {
        let (supervisor_rpc, worker_rpc) = wire::seqpacket_pair().context("socket pair")?;
        let (supervisor_events, worker_events) = wire::seqpacket_pair().context("socket pair")?;
        let grants = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(GNTDEV_DEVICE)
            .with_context(|| format!("opening {GNTDEV_DEVICE}"))?;
        // The worker's grant maps are registered through a duplicate of its grant device (the same open file, so
        // the same maps), always as its guest's.
        let registrar = grants.try_clone().context("duplicating the grant device")?;
        let store: Arc<dyn XenStore> = Arc::new(super::open_store()?);
        let control = self.control_socket(domid)?;
        let mut command = Command::new(&self.exe);
        command.args(&self.worker_args).args(["--domid", &domid.to_string()]).stdin(Stdio::null());
        let channel = worker_rpc.as_raw_fd();
        // SAFETY: the hook runs in the child between fork and exec and only makes async-signal-safe system calls
        // (fcntl, dup2, setpgid, prctl, getppid) on values computed before the fork.
        // SAFETY (getpid): no preconditions.
        let supervisor = unsafe { libc::getpid() };
        // SAFETY: see above.
        unsafe {
            command.pre_exec(move || child_setup(channel, supervisor));
        }
        let mut child = command.spawn().with_context(|| format!("starting {}", self.exe.display()))?;
        drop(worker_rpc);
        // Its memory map is opened now, while the worker waits for its `Hello` still as root: the grant pages it
        // maps are counted there after it has given up its privileges.
        let device = match WorkerGntDev::new(registrar, child.id()) {
            Ok(device) => device,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(anyhow!("cannot count the worker's grant maps: {e}"));
            }
        };
        let pidfd = pidfd_open(child.id()).context("pidfd_open")?;
        let ledger = GrantLedger::new(Box::new(device), self.grant_budget);
        let grant_figures = (!self.direct_grants).then(|| ledger.figures());
        let broker = Broker {
            domid,
            domain_path: self.domain_path.clone(),
            store,
            rpc: supervisor_rpc,
            events: supervisor_events,
            welcome: Some(Welcome { events: OwnedFd::from(worker_events), grants, control }),
            evtchn: Box::new(restricted_evtchn),
            grants: ledger,
            disks: Arc::new(LocalDiskOpener),
            direct_io: device_blk::disk::DirectIo::Auto,
            send_timeout: SEND_TIMEOUT,
        };
        let broker = std::thread::Builder::new()
            .name(format!("broker-{domid}"))
            .spawn(move || broker.serve())
            .context("starting the broker thread")?;
        Ok(Worker { child, pidfd, broker: Some(broker), stopping: None, grants: grant_figures })
    }

    /// The listening control socket of `domid`'s worker, if `--control-dir` asked for one (a stale file from a
    /// worker that died is replaced).
    fn control_socket(&self, domid: DomId) -> anyhow::Result<Option<(UnixListener, String)>> {
        let Some(path) = self.control_path(domid) else { return Ok(None) };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).with_context(|| format!("cannot listen on {}", path.display()))?;
        Ok(Some((listener, path.to_string_lossy().into_owned())))
    }

    fn control_path(&self, domid: DomId) -> Option<PathBuf> {
        self.control_dir.as_ref().map(|dir| dir.join(format!("dom{domid}.ctl")))
    }

    /// Ask every worker to stop, wait for them (killing those that take too long), and clean up after those
    /// that had to be killed.
    fn stop_all(&mut self) {
        for (domid, worker) in &mut self.workers {
            tracing::info!(domid, pid = worker.child.id(), "stopping the worker");
            signal(&worker.child, libc::SIGTERM);
            worker.stopping = Some(Instant::now());
        }
        let deadline = Instant::now() + STOP_GRACE;
        while !self.workers.is_empty() && Instant::now() < deadline {
            let fds: Vec<RawFd> = self.workers.values().map(|w| w.pidfd.as_raw_fd()).collect();
            let _ = wait_readable(&fds, Duration::from_millis(200));
            self.reap();
        }
        for (domid, mut worker) in std::mem::take(&mut self.workers) {
            tracing::warn!(domid, pid = worker.child.id(), "worker did not stop in time: killing it");
            signal(&worker.child, libc::SIGKILL);
            let _ = worker.child.wait();
            close_connected_vbds(&*self.store, &self.domain_path, domid);
        }
        while self.cleaning.iter().next().is_some() {
            match self.cleanup_done.1.recv_timeout(Duration::from_secs(5)) {
                Ok(domid) => {
                    self.cleaning.remove(&domid);
                }
                Err(_) => break,
            }
        }
    }
}

/// Which guests a changed `path` under `root` (`.../backend/vbd`) may have given or taken vbds. Writes inside
/// the vbds of a guest that already has a worker (its own state changes, every one of them) cost the supervisor
/// nothing: only `root`, `root/<domid>` and `root/<domid>/<devid>` (a vbd came or went), or anything under a
/// guest without a worker (its first vbd being written), are looked at.
fn touched(root: &str, path: &str, has_worker: impl Fn(DomId) -> bool) -> Touched {
    let Some(rest) = path.strip_prefix(root) else { return Touched::Nothing };
    if rest.is_empty() {
        return Touched::Everything;
    }
    let Some(rest) = rest.strip_prefix('/') else { return Touched::Nothing };
    let mut parts = rest.split('/');
    let Some(Ok(domid)) = parts.next().map(str::parse::<DomId>) else { return Touched::Nothing };
    let deeper = parts.nth(1).is_some();
    if deeper && has_worker(domid) {
        Touched::Nothing
    } else {
        Touched::Guest(domid)
    }
}

/// Close the vbds of `domid` whose rings a (dead) worker served, answering what their rings still hold with an
/// I/O error; vbds still in the handshake are left for the next worker.
fn close_connected_vbds(store: &dyn XenStore, domain_path: &str, domid: DomId) {
    let ids = match vbds_of(store, domain_path, domid) {
        Ok(ids) => ids,
        Err(e) => return tracing::warn!(domid, error = %e, "cannot list the vbds of a dead worker"),
    };
    let grants = match GntDev::open() {
        Ok(grants) => grants,
        Err(e) => return tracing::error!(domid, error = %e, "cannot open the grant device to clean up"),
    };
    for id in ids {
        let state = read_optional(store, TxId::NONE, &VbdPaths::new(domain_path, id).node("state"));
        let connected = matches!(state, Ok(Some(ref v)) if v.as_slice() == XenbusState::Connected.as_node().as_bytes()
            || v.as_slice() == XenbusState::Closing.as_node().as_bytes());
        if !connected {
            continue;
        }
        match close_vbd_failing_io(store, &grants, &EvtchnOpener::default(), domain_path, id, DIED, CLEANUP_SETTLE) {
            Ok(done) => tracing::info!(vbd = %id, answered = done.answered, "closed the dead worker's vbd"),
            Err(e) => tracing::warn!(vbd = %id, error = %e, "cannot close the dead worker's vbd"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changes_that_may_add_or_remove_a_guests_vbds_are_looked_at() {
        let root = "/local/domain/0/backend/vbd";
        let with_worker = |domid: DomId| domid == 7;
        let t = |path: &str| touched(root, path, with_worker);
        assert_eq!(t(root), Touched::Everything);
        assert_eq!(t(&format!("{root}/7")), Touched::Guest(7));
        assert_eq!(t(&format!("{root}/7/51712")), Touched::Guest(7), "a vbd came or went");
        assert_eq!(t(&format!("{root}/7/51712/state")), Touched::Nothing, "the worker's own writes");
        assert_eq!(t(&format!("{root}/8/51712/frontend")), Touched::Guest(8), "a guest without a worker yet");
        assert_eq!(t(&format!("{root}/x/51712")), Touched::Nothing);
        assert_eq!(t(&format!("{root}7/1")), Touched::Nothing, "not under the root");
        assert_eq!(t("/local/domain/0/backend/vif/7"), Touched::Nothing);
    }
}
