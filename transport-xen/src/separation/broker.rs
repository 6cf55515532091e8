// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The supervisor's side of one worker: a thread that answers the worker's requests on a xenstore connection of
//! its own, within the worker's [`Policy`], opens the worker's disks and event-channel handles, registers its
//! grant maps as its guest's (within its budget of grant pages: [`GrantLedger`]), and forwards the worker's watch
//! events.
//!
//! The worker is assumed hostile (its guest may have taken it over). Each request is decoded from one bounded
//! packet, checked against the policy, and answered; a malformed one ends the worker's session (the supervisor
//! then treats the worker as dead). The broker holds nothing shared with other workers: its own xenstore
//! connection (whose transactions and watches are the worker's alone and vanish with it), its own thread.
//! A worker that stops reading its events only blocks its own broker.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use crate::services::{
    with_transaction, DomId, GrantRef, PermAccess, Permission, TxId, WatchEvent, XenError, XenStore,
};
use crate::xenbus::device::{DeviceNodes, DeviceSource, DiskOpener, OpenedDisk};
use crate::xenbus::{VbdId, VbdPaths};
use device_blk::disk::DirectIo;
use device_blk::DiskKind;

use super::grants::GrantLedger;
use super::policy::{Access, Policy, MAX_TRANSACTIONS, MAX_VALUE, MAX_WATCHES};
use super::wire::{self, DiskGrant, Event, Reply, Request, WireError, WireSource};

/// Opens a fresh event-channel handle restricted to one guest.
pub type EvtchnFactory = Box<dyn Fn(DomId) -> Result<File, XenError> + Send>;

/// Everything one worker's broker needs.
pub struct Broker {
    /// The guest.
    pub domid: DomId,
    /// The backend domain's home (`/local/domain/<backend domid>`).
    pub domain_path: String,
    /// The worker's own xenstore connection.
    pub store: Arc<dyn XenStore>,
    /// Requests in, answers out.
    pub rpc: UnixDatagram,
    /// Watch events out.
    pub events: UnixDatagram,
    /// Given to the worker with its `Hello`: its end of the event socket, its grant device, and its control
    /// socket (bound by the supervisor) with its path.
    pub welcome: Option<Welcome>,
    /// Opens event-channel handles.
    pub evtchn: EvtchnFactory,
    /// Registers the grant refs the worker asks to map, always as its guest's (the worker names refs only), within
    /// the worker's budget of grant pages.
    pub grants: GrantLedger,
    /// Opens disks (as root, with the diskseq pin).
    pub disks: Arc<dyn DiskOpener>,
    /// O_DIRECT policy for the disks.
    pub direct_io: DirectIo,
    /// Longest wait for the worker to take an answer or a watch event ([`SEND_TIMEOUT`] in the service): a worker
    /// that stops reading is cut off after it, so its broker always ends.
    pub send_timeout: std::time::Duration,
}

/// How long a broker waits for a worker to make room for an answer or a watch event. A worker that reads nothing
/// for that long is treated as hostile (a busy worker's socket holds a few hundred events before it fills).
pub const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("domid", &self.domid).finish()
    }
}

/// What a worker gets with its `Hello`.
#[derive(Debug)]
pub struct Welcome {
    /// Its end of the event socket.
    pub events: OwnedFd,
    /// Its grant device.
    pub grants: File,
    /// Its listening control socket and the socket's path.
    pub control: Option<(std::os::unix::net::UnixListener, String)>,
}

/// How a worker's session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The worker closed its socket (it exited or died).
    Closed,
    /// The worker broke the protocol: it is to be stopped.
    Misbehaved(String),
    /// The broker's own xenstore connection failed.
    StoreFailed(String),
}

/// What a worker holds in xenstore through its broker, bounded: xenstored does not hold dom0's connections to the
/// quotas it keeps for guests, so the broker keeps them for the worker.
#[derive(Debug, Default)]
struct Held {
    watches: std::collections::HashSet<(String, String)>,
    transactions: std::collections::HashSet<u32>,
}

impl Broker {
    /// Serve the worker until it goes away.
    pub fn serve(mut self) -> SessionEnd {
        // The worker never sends on the event socket: refuse it, so nothing it queues there (a descriptor of its
        // own end, say) can keep that end alive after the worker is gone. And no send of ours waits for ever.
        let hardened = self
            .events
            .shutdown(std::net::Shutdown::Read)
            .and_then(|()| self.events.set_write_timeout(Some(self.send_timeout)))
            .and_then(|()| self.rpc.set_write_timeout(Some(self.send_timeout)));
        if let Err(e) = hardened {
            return SessionEnd::Misbehaved(format!("cannot set up the worker's sockets: {e}"));
        }
        let policy = Policy::for_guest(&self.domain_path, self.domid);
        let mut held = Held::default();
        let mut buf = vec![0u8; wire::MAX_PACKET];
        let mut events = Vec::new();
        loop {
            let mut fds = [
                libc::pollfd { fd: self.rpc.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.store.watch_fd(), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return SessionEnd::StoreFailed(format!("poll: {e}"));
            }
            if fds[1].revents != 0 {
                events.clear();
                if let Err(e) = self.store.take_watch_events(&mut events) {
                    return SessionEnd::StoreFailed(e.to_string());
                }
                for WatchEvent { path, token } in events.drain(..) {
                    if let Err(e) = wire::send(&self.events, &Event { path, token }, &[]) {
                        return SessionEnd::Misbehaved(format!("cannot pass a watch event: {e}"));
                    }
                }
            }
            if fds[0].revents != 0 {
                let request: Request = match wire::recv(&self.rpc, &mut buf) {
                    Ok(Some(request)) => request,
                    Ok(None) => return SessionEnd::Closed,
                    Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                        return SessionEnd::Misbehaved(format!("malformed request: {e}"))
                    }
                    Err(_) => return SessionEnd::Closed,
                };
                if let Err(end) = self.answer(&policy, &mut held, request) {
                    return end;
                }
            }
        }
    }

    fn answer(&mut self, policy: &Policy, held: &mut Held, request: Request) -> Result<(), SessionEnd> {
        let store = &*self.store;
        let checked = |path: &str, access: Access| policy.check(path, access).map_err(|what| XenError::Access { what });
        let (reply, fds): (Reply, Vec<std::os::fd::RawFd>) = match request {
            Request::Hello => {
                let Some(welcome) = self.welcome.take() else {
                    return Err(SessionEnd::Misbehaved("a second Hello".into()));
                };
                let mut fds = vec![welcome.events.as_raw_fd(), welcome.grants.as_raw_fd()];
                fds.extend(welcome.control.as_ref().map(|(listener, _)| listener.as_raw_fd()));
                let reply = Reply::Welcome { control: welcome.control.as_ref().map(|(_, path)| path.clone()) };
                let sent = wire::send(&self.rpc, &reply, &fds);
                return sent.map_err(|e| SessionEnd::Misbehaved(format!("cannot answer Hello: {e}")));
            }
            Request::Read { tx, path } => {
                (xs(checked(&path, Access::Read).and_then(|()| store.read(TxId(tx), &path)), Reply::Value), vec![])
            }
            Request::Write { tx, path, value } => {
                let written = checked(&path, Access::Write)
                    .and_then(|()| bounded(value.len(), MAX_VALUE, "bytes in a value"))
                    .and_then(|()| vbd_exists(store, policy, &path))
                    .and_then(|()| store.write(TxId(tx), &path, &value));
                (xs(written, |()| Reply::Done), vec![])
            }
            Request::Mkdir { path, .. } | Request::Rm { path, .. } | Request::SetPerms { path, .. } => {
                (refused(&path, "may not create, remove or change the permissions of nodes"), vec![])
            }
            Request::Directory { tx, path } => {
                (xs(checked(&path, Access::Read).and_then(|()| store.directory(TxId(tx), &path)), Reply::Names), vec![])
            }
            Request::GetPerms { tx, path } => (
                xs(checked(&path, Access::Read).and_then(|()| store.get_perms(TxId(tx), &path)), |perms| {
                    Reply::Perms(perms.iter().map(perm_to_wire).collect())
                }),
                vec![],
            ),
            Request::TransactionStart => {
                let started = bounded(held.transactions.len() + 1, MAX_TRANSACTIONS, "open transactions")
                    .and_then(|()| store.transaction_start());
                if let Ok(tx) = started {
                    held.transactions.insert(tx.0);
                }
                (xs(started, |tx| Reply::Transaction(tx.0)), vec![])
            }
            Request::TransactionEnd { tx, commit } => {
                // Ended whatever the answer (xenstored ends a transaction that fails to commit too).
                held.transactions.remove(&tx);
                (xs(store.transaction_end(TxId(tx), commit), |()| Reply::Done), vec![])
            }
            Request::Watch { path, token } => {
                let key = (path, token);
                let count = held.watches.len() + usize::from(!held.watches.contains(&key));
                let watched = checked(&key.0, Access::Read)
                    .and_then(|()| bounded(count, MAX_WATCHES, "watches"))
                    .and_then(|()| store.watch(&key.0, &key.1));
                if watched.is_ok() {
                    held.watches.insert(key);
                }
                (xs(watched, |()| Reply::Done), vec![])
            }
            Request::Unwatch { path, token } => {
                let unwatched = checked(&path, Access::Read).and_then(|()| store.unwatch(&path, &token));
                if unwatched.is_ok() {
                    held.watches.remove(&(path, token));
                }
                (xs(unwatched, |()| Reply::Done), vec![])
            }
            Request::OpenDisk { devid } => {
                let (reply, file) = self.open_disk(devid);
                let sent = match &file {
                    Some(disk) => wire::send(&self.rpc, &reply, &[disk.disk.file().as_raw_fd()]),
                    None => wire::send(&self.rpc, &reply, &[]),
                };
                // Our copy of the descriptor closes here: the worker holds the disk from now on.
                drop(file);
                return sent.map_err(|e| SessionEnd::Misbehaved(format!("cannot answer: {e}")));
            }
            Request::OpenEventChannel => match (self.evtchn)(self.domid) {
                Ok(file) => {
                    let sent = wire::send(&self.rpc, &Reply::EventChannel, &[file.as_raw_fd()]);
                    return sent.map_err(|e| SessionEnd::Misbehaved(format!("cannot answer: {e}")));
                }
                Err(e) => (Reply::Failed(to_wire(e)), vec![]),
            },
            Request::MapGrants { refs } => {
                let reply = self.register(&refs);
                if let Some(why) = self.grants.misbehaved() {
                    return Err(SessionEnd::Misbehaved(why.to_string()));
                }
                (reply, vec![])
            }
        };
        if let Reply::Failed(WireError::Disconnected) = reply {
            return Err(SessionEnd::StoreFailed("xenstore connection lost".into()));
        }
        wire::send(&self.rpc, &reply, &fds).map_err(|e| SessionEnd::Misbehaved(format!("cannot answer: {e}")))
    }

    /// Register `refs` as grants of the worker's own guest: the request carries no domain, so whatever the worker
    /// sends, the refs it can mmap afterwards are ones its guest granted (Xen checks the rest).
    fn register(&mut self, refs: &[GrantRef]) -> Reply {
        if refs.is_empty() || refs.len() > wire::MAX_BROKERED_REFS {
            let what = format!("map of {} grant refs (1..={} allowed)", refs.len(), wire::MAX_BROKERED_REFS);
            return Reply::Failed(WireError::Os { what, errno: libc::EINVAL });
        }
        match self.grants.register(self.domid, refs) {
            Ok(index) => Reply::Registered { index },
            Err(e) => Reply::Failed(to_wire(e)),
        }
    }

    /// Read the vbd's device nodes ourselves (never trusting the worker's reading) and open what they name.
    fn open_disk(&self, devid: u32) -> (Reply, Option<OpenedDisk>) {
        let id = VbdId { domid: self.domid, devid };
        let paths = VbdPaths::new(&self.domain_path, id);
        let store = &*self.store;
        let read = |tx, name: &str| crate::services::read_optional(store, tx, &paths.node(name));
        let nodes = with_transaction(store, 16, |tx| {
            Ok(DeviceNodes {
                physical_device: read(tx, "physical-device")?,
                diskseq: read(tx, "diskseq")?,
                params: read(tx, "params")?,
                mode: read(tx, "mode")?,
                script: read(tx, "script")?,
                hotplug_status: read(tx, "hotplug-status")?,
            })
        });
        let nodes = match nodes {
            Ok(nodes) => nodes,
            Err(e) => return (Reply::Failed(to_wire(e)), None),
        };
        match self.disks.open(id, &nodes, self.direct_io) {
            Ok(None) => (Reply::DiskNotYet, None),
            Err(fatal) => (Reply::DiskFatal { errno: fatal.errno, message: fatal.message }, None),
            Ok(Some(opened)) => {
                tracing::info!(domid = self.domid, devid, device = %opened.source, "disk opened for the worker");
                (Reply::Disk(grant_of(&opened)), Some(opened))
            }
        }
    }
}

fn grant_of(opened: &OpenedDisk) -> DiskGrant {
    let disk = &opened.disk;
    let g = disk.geometry();
    DiskGrant {
        source: match &opened.source {
            DeviceSource::Physical { device, diskseq } => {
                WireSource::Physical { major: device.major, minor: device.minor, diskseq: *diskseq }
            }
            DeviceSource::ImageFile(path) => WireSource::ImageFile(path.to_string_lossy().into_owned()),
        },
        read_only_mode: opened.mode == crate::xenbus::nodes::Mode::ReadOnly,
        read_only: g.read_only,
        path: disk.path().to_string_lossy().into_owned(),
        block_device: match disk.kind() {
            DiskKind::File => None,
            DiskKind::BlockDevice { major, minor, diskseq } => Some((major, minor, diskseq)),
        },
        capacity_sectors: g.capacity.0,
        logical_block_size: g.logical_block_size.bytes(),
        physical_block_size: g.physical_block_size.bytes(),
        direct_io: g.direct_io,
        discard: g.discard,
        write_zeroes: g.write_zeroes,
        discard_granularity: g.discard_granularity,
        buffer_alignment: u64::try_from(disk.buffer_alignment()).unwrap_or(4096),
    }
}

/// `count` within `max` of `what`, or the error a worker beyond its quota gets.
fn bounded(count: usize, max: usize, what: &str) -> Result<(), XenError> {
    if count > max {
        return Err(XenError::Os { what: format!("{count} {what} (at most {max} per worker)"), errno: libc::ENOSPC });
    }
    Ok(())
}

/// A write is made only while its vbd's backend directory exists: xenstore creates missing parents, and a worker
/// must not leave nodes of vbds that are not there (the toolstack removed them, or there never were any), as Linux
/// blkback's state switch does not either. (Read outside the worker's transaction, so that the toolstack adding
/// nodes to the vbd meanwhile does not make the worker's commit fail.)
fn vbd_exists(store: &dyn XenStore, policy: &Policy, path: &str) -> Result<(), XenError> {
    let Some(vbd) = policy.vbd_of_write(path) else {
        return Err(XenError::Access { what: format!("{path}: not a vbd's node") });
    };
    store.read(TxId::NONE, &vbd).map(drop)
}

fn xs<T>(result: Result<T, XenError>, ok: impl FnOnce(T) -> Reply) -> Reply {
    match result {
        Ok(value) => ok(value),
        Err(e) => Reply::Failed(to_wire(e)),
    }
}

fn refused(path: &str, why: &str) -> Reply {
    Reply::Failed(WireError::Access { what: format!("{path}: {why}") })
}

/// A [`XenError`] on the wire.
pub fn to_wire(e: XenError) -> WireError {
    match e {
        XenError::NotFound { path } => WireError::NotFound { path },
        XenError::Again => WireError::Again,
        XenError::Access { what } => WireError::Access { what },
        XenError::Os { what, errno } => WireError::Os { what, errno },
        XenError::Protocol { detail, .. } => WireError::Protocol { detail },
        XenError::Disconnected { .. } => WireError::Disconnected,
        // `XenError` may grow; anything new is an OS-level failure to the worker.
        #[allow(unreachable_patterns)]
        other => WireError::Os { what: other.to_string(), errno: libc::EIO },
    }
}

/// A permission on the wire: (domid, `n`/`r`/`w`/`b`).
pub fn perm_to_wire(p: &Permission) -> (u16, u8) {
    let access = match p.access {
        PermAccess::None => b'n',
        PermAccess::Read => b'r',
        PermAccess::Write => b'w',
        PermAccess::Both => b'b',
    };
    (p.domid, access)
}
