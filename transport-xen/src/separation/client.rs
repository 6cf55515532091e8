// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The worker's side of its channel to the supervisor: the transport's service traits ([`XenStore`],
//! [`EventChannelOpener`], [`DiskOpener`]) answered by the supervisor's broker, so that the worker itself opens
//! nothing and speaks to xenstore only through the broker's policy.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use crate::services::{
    DomId, EventChannelOpener, GrantCopyOp, GrantRef, GrantTable, MapAccess, PermAccess, Permission, TxId, WatchEvent,
    XenError, XenStore,
};
use crate::xen::{EvtchnDevice, GntDev, GntMapping};
use crate::xenbus::device::{DeviceNodes, DeviceSource, DiskOpener, Fatal, OpenedDisk};
use crate::xenbus::nodes::{Mode, PhysicalDevice};
use crate::xenbus::VbdId;
use device_blk::disk::DirectIo;
use device_blk::units::{BlockSize, Sector};
use device_blk::{Disk, DiskKind, Geometry};

use super::wire::{self, DiskGrant, Event, Reply, Request, WireError, WireSource};

const WHAT: &str = "supervisor channel";

/// What `Hello` brought.
#[derive(Debug)]
pub struct Welcomed {
    /// The event socket.
    pub events: UnixDatagram,
    /// The grant device.
    pub grants: File,
    /// The listening control socket and its path.
    pub control: Option<(UnixListener, PathBuf)>,
}

/// The request socket, one request at a time.
#[derive(Debug)]
pub struct Channel {
    rpc: Mutex<(UnixDatagram, Vec<u8>)>,
}

impl Channel {
    /// A channel over the worker's end of the request socket.
    pub fn new(rpc: UnixDatagram) -> Channel {
        Channel { rpc: Mutex::new((rpc, vec![0; wire::MAX_PACKET])) }
    }

    /// Send `request` and wait for its answer (with any descriptors attached).
    pub fn call(&self, request: &Request) -> Result<(Reply, Vec<OwnedFd>), XenError> {
        self.exchange(request, |socket, buf| wire::recv_with_fds::<Reply>(socket, buf))
    }

    /// Send `request` and wait for an answer that carries no descriptor: `send` and `recv` alone, the calls a
    /// data-plane thread's system call filter allows (any descriptor attached anyway is closed by the kernel).
    pub fn call_plain(&self, request: &Request) -> Result<Reply, XenError> {
        self.exchange(request, |socket, buf| wire::recv::<Reply>(socket, buf))
    }

    /// One request and its answer, received by `receive`, with the socket to ourselves.
    fn exchange<T>(
        &self,
        request: &Request,
        receive: impl FnMut(&UnixDatagram, &mut [u8]) -> std::io::Result<Option<T>>,
    ) -> Result<T, XenError> {
        let mut guard = self.rpc.lock().unwrap_or_else(PoisonError::into_inner);
        let (socket, buf) = &mut *guard;
        wire::send(socket, request, &[]).map_err(|_| XenError::Disconnected { what: WHAT })?;
        // The supervisor stops the worker for a moment to count its grant mappings: a wait interrupted by that
        // stop (SIGSTOP, SIGCONT) is resumed.
        let mut receive = receive;
        loop {
            match receive(socket, buf) {
                Ok(Some(answer)) => return Ok(answer),
                Ok(None) => return Err(XenError::Disconnected { what: WHAT }),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(XenError::Protocol { what: "supervisor", detail: e.to_string() }),
            }
        }
    }

    /// `Hello`: the event socket, the grant device, and the control socket with its path if there is one.
    pub fn hello(&self) -> Result<Welcomed, XenError> {
        match self.call(&Request::Hello)? {
            (Reply::Welcome { control }, fds) if fds.len() == 2 + usize::from(control.is_some()) => {
                let mut fds = fds.into_iter();
                let (Some(events), Some(grants)) = (fds.next(), fds.next()) else {
                    return Err(XenError::Disconnected { what: WHAT });
                };
                let control = control.zip(fds.next()).map(|(path, fd)| (UnixListener::from(fd), PathBuf::from(path)));
                Ok(Welcomed { events: UnixDatagram::from(events), grants: File::from(grants), control })
            }
            (other, _) => Err(unexpected(&other)),
        }
    }
}

fn unexpected(reply: &Reply) -> XenError {
    XenError::Protocol { what: "supervisor", detail: format!("unexpected answer {reply:?}") }
}

fn from_wire(e: WireError) -> XenError {
    match e {
        WireError::NotFound { path } => XenError::NotFound { path },
        WireError::Again => XenError::Again,
        WireError::Access { what } => XenError::Access { what },
        WireError::Os { what, errno } => XenError::Os { what, errno },
        WireError::Protocol { detail } => XenError::Protocol { what: "xenstore", detail },
        WireError::Disconnected => XenError::Disconnected { what: "xenstore" },
    }
}

/// xenstore through the supervisor.
#[derive(Debug)]
pub struct BrokeredStore {
    channel: std::sync::Arc<Channel>,
    events: UnixDatagram,
    buf: Mutex<Vec<u8>>,
}

impl BrokeredStore {
    /// A store over `channel`, with watch events arriving on `events`.
    pub fn new(channel: std::sync::Arc<Channel>, events: UnixDatagram) -> std::io::Result<BrokeredStore> {
        events.set_nonblocking(true)?;
        Ok(BrokeredStore { channel, events, buf: Mutex::new(vec![0; wire::MAX_PACKET]) })
    }

    fn call(&self, request: &Request) -> Result<Reply, XenError> {
        match self.channel.call(request)?.0 {
            Reply::Failed(e) => Err(from_wire(e)),
            reply => Ok(reply),
        }
    }

    fn done(&self, request: &Request) -> Result<(), XenError> {
        match self.call(request)? {
            Reply::Done => Ok(()),
            other => Err(unexpected(&other)),
        }
    }
}

impl BrokeredStore {
    /// The worker's end of the event socket.
    pub fn events_socket(&self) -> &UnixDatagram {
        &self.events
    }
}

impl XenStore for BrokeredStore {
    fn read(&self, tx: TxId, path: &str) -> Result<Vec<u8>, XenError> {
        match self.call(&Request::Read { tx: tx.0, path: path.into() })? {
            Reply::Value(value) => Ok(value),
            other => Err(unexpected(&other)),
        }
    }

    fn write(&self, tx: TxId, path: &str, value: &[u8]) -> Result<(), XenError> {
        self.done(&Request::Write { tx: tx.0, path: path.into(), value: value.to_vec() })
    }

    fn mkdir(&self, tx: TxId, path: &str) -> Result<(), XenError> {
        self.done(&Request::Mkdir { tx: tx.0, path: path.into() })
    }

    fn rm(&self, tx: TxId, path: &str) -> Result<(), XenError> {
        self.done(&Request::Rm { tx: tx.0, path: path.into() })
    }

    fn directory(&self, tx: TxId, path: &str) -> Result<Vec<String>, XenError> {
        match self.call(&Request::Directory { tx: tx.0, path: path.into() })? {
            Reply::Names(names) => Ok(names),
            other => Err(unexpected(&other)),
        }
    }

    fn get_perms(&self, tx: TxId, path: &str) -> Result<Vec<Permission>, XenError> {
        match self.call(&Request::GetPerms { tx: tx.0, path: path.into() })? {
            Reply::Perms(perms) => Ok(perms.into_iter().map(perm_from_wire).collect()),
            other => Err(unexpected(&other)),
        }
    }

    fn set_perms(&self, tx: TxId, path: &str, perms: &[Permission]) -> Result<(), XenError> {
        let perms = perms.iter().map(super::broker::perm_to_wire).collect();
        self.done(&Request::SetPerms { tx: tx.0, path: path.into(), perms })
    }

    fn transaction_start(&self) -> Result<TxId, XenError> {
        match self.call(&Request::TransactionStart)? {
            Reply::Transaction(tx) => Ok(TxId(tx)),
            other => Err(unexpected(&other)),
        }
    }

    fn transaction_end(&self, tx: TxId, commit: bool) -> Result<(), XenError> {
        self.done(&Request::TransactionEnd { tx: tx.0, commit })
    }

    fn watch(&self, path: &str, token: &str) -> Result<(), XenError> {
        self.done(&Request::Watch { path: path.into(), token: token.into() })
    }

    fn unwatch(&self, path: &str, token: &str) -> Result<(), XenError> {
        self.done(&Request::Unwatch { path: path.into(), token: token.into() })
    }

    fn watch_fd(&self) -> RawFd {
        self.events.as_raw_fd()
    }

    fn take_watch_events(&self, out: &mut Vec<WatchEvent>) -> Result<(), XenError> {
        let mut buf = self.buf.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            match wire::recv::<Event>(&self.events, &mut buf) {
                Ok(Some(Event { path, token })) => out.push(WatchEvent { path, token }),
                Ok(None) => return Err(XenError::Disconnected { what: WHAT }),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(XenError::Protocol { what: "supervisor", detail: e.to_string() }),
            }
        }
    }
}

fn perm_from_wire((domid, access): (u16, u8)) -> Permission {
    let access = match access {
        b'r' => PermAccess::Read,
        b'w' => PermAccess::Write,
        b'b' => PermAccess::Both,
        _ => PermAccess::None,
    };
    Permission { domid, access }
}

/// Event-channel handles opened by the supervisor, restricted to the worker's guest.
#[derive(Debug)]
pub struct BrokeredEvtchn(pub std::sync::Arc<Channel>);

impl EventChannelOpener for BrokeredEvtchn {
    type Channel = EvtchnDevice;

    fn open(&self) -> Result<EvtchnDevice, XenError> {
        match self.0.call(&Request::OpenEventChannel)? {
            (Reply::EventChannel, fds) if fds.len() == 1 => {
                let fd = fds.into_iter().next().ok_or(XenError::Disconnected { what: WHAT })?;
                EvtchnDevice::from_file(File::from(fd))
            }
            (Reply::Failed(e), _) => Err(from_wire(e)),
            (other, _) => Err(unexpected(&other)),
        }
    }
}

/// Grant maps whose first step, the one that names the granting domain, is the supervisor's: the worker asks it
/// to register refs with the worker's grant device ([`Request::MapGrants`]: refs only, registered as its guest's)
/// and then mmaps the offset it gets back on its own handle; unmapping stays the worker's. A worker whose system
/// call filter refuses `IOCTL_GNTDEV_MAP_GRANT_REF` and `IOCTL_GNTDEV_GRANT_COPY` can then map only what its own
/// guest granted: Linux's gntdev has no per-domain restriction of its own.
///
/// Grant copy names domains too and works on the caller's addresses, so it cannot be brokered:
/// [`GrantTable::copy`] fails, and a data plane on these grants maps (`GrantMode::Map`).
///
/// Registrations are the supervisor's to drop ([`super::grants`]: it drops those the worker no longer maps when
/// it needs room, and the worker's filter refuses the unregistering call), so a mapping's end only unmaps it
/// ([`GntDev::map_brokered`]). A map is asked for and mmapped under one lock: the supervisor may drop every
/// registration not mapped yet when it answers another thread's request.
#[derive(Debug)]
pub struct BrokeredGrants {
    channel: std::sync::Arc<Channel>,
    device: GntDev,
    domid: DomId,
    mapping: std::sync::Mutex<()>,
}

impl BrokeredGrants {
    /// Maps of `domid`'s grants through `device` (the grant device `Hello` brought), registered over `channel`.
    pub fn new(channel: std::sync::Arc<Channel>, device: GntDev, domid: DomId) -> BrokeredGrants {
        BrokeredGrants { channel, device, domid, mapping: std::sync::Mutex::new(()) }
    }
}

impl GrantTable for BrokeredGrants {
    type Mapping = GntMapping;

    fn map(&self, domid: DomId, refs: &[GrantRef], access: MapAccess) -> Result<GntMapping, XenError> {
        if domid != self.domid {
            return Err(XenError::Access {
                what: format!("grants of domain {domid}: this worker serves {}", self.domid),
            });
        }
        if refs.is_empty() || refs.len() > wire::MAX_BROKERED_REFS {
            return Err(XenError::Os {
                what: format!("map of {} grant refs (1..={} allowed)", refs.len(), wire::MAX_BROKERED_REFS),
                errno: libc::EINVAL,
            });
        }
        let _one_at_a_time = self.mapping.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match self.channel.call_plain(&Request::MapGrants { refs: refs.to_vec() })? {
            Reply::Registered { index } => self.device.map_brokered(index, refs.len(), access),
            Reply::Failed(e) => Err(from_wire(e)),
            other => Err(unexpected(&other)),
        }
    }

    unsafe fn copy(&self, _ops: &mut [GrantCopyOp]) -> Result<(), XenError> {
        Err(XenError::Os {
            what: "grant copy: not available to a worker whose grant maps go through the supervisor \
                   (blkbackd xen --direct-grants allows it)"
                .into(),
            errno: libc::EPERM,
        })
    }
}

/// Disks opened by the supervisor, which reads the vbd's nodes itself: the worker's own reading only tells it
/// when to ask.
#[derive(Debug)]
pub struct BrokeredDisks {
    /// The channel.
    pub channel: std::sync::Arc<Channel>,
    /// The worker's guest (a sanity check on the ids the backend asks for).
    pub domid: DomId,
}

impl DiskOpener for BrokeredDisks {
    fn open(&self, id: VbdId, nodes: &DeviceNodes, _direct_io: DirectIo) -> Result<Option<OpenedDisk>, Fatal> {
        if id.domid != self.domid {
            return Err(Fatal::new(libc::EACCES, format!("vbd {id} is not of domain {}", self.domid)));
        }
        if nodes.physical_device.is_none() && nodes.params.is_none() {
            return Ok(None);
        }
        let io = |e: XenError| Fatal::new(libc::EIO, format!("asking the supervisor for the disk: {e}"));
        match self.channel.call(&Request::OpenDisk { devid: id.devid }).map_err(io)? {
            (Reply::DiskNotYet, _) => Ok(None),
            (Reply::DiskFatal { errno, message }, _) => Err(Fatal::new(errno, message)),
            (Reply::Disk(grant), fds) if fds.len() == 1 => {
                let fd = fds.into_iter().next().ok_or_else(|| Fatal::new(libc::EIO, "no descriptor"))?;
                disk_from_grant(grant, File::from(fd)).map(Some)
            }
            (other, _) => Err(io(unexpected(&other))),
        }
    }
}

fn disk_from_grant(grant: DiskGrant, file: File) -> Result<OpenedDisk, Fatal> {
    let bad = |what: &str| Fatal::new(libc::EINVAL, format!("the supervisor sent {what}"));
    let block = |bytes| BlockSize::new(bytes).ok_or_else(|| bad("a bad block size"));
    let geometry = Geometry {
        capacity: Sector(grant.capacity_sectors),
        logical_block_size: block(grant.logical_block_size)?,
        physical_block_size: block(grant.physical_block_size)?,
        read_only: grant.read_only,
        direct_io: grant.direct_io,
        discard: grant.discard,
        write_zeroes: grant.write_zeroes,
        discard_granularity: grant.discard_granularity,
    };
    let kind = match grant.block_device {
        None => DiskKind::File,
        Some((major, minor, diskseq)) => DiskKind::BlockDevice { major, minor, diskseq },
    };
    let alignment = usize::try_from(grant.buffer_alignment).map_err(|_| bad("a bad alignment"))?;
    let disk = Disk::from_parts(file, PathBuf::from(&grant.path), kind, geometry, alignment)
        .map_err(|e| Fatal::new(libc::ENODEV, format!("creating vbd structure: {e}")))?;
    let source = match grant.source {
        WireSource::Physical { major, minor, diskseq } => {
            DeviceSource::Physical { device: PhysicalDevice { major, minor }, diskseq }
        }
        WireSource::ImageFile(path) => DeviceSource::ImageFile(PathBuf::from(path)),
    };
    let mode = if grant.read_only_mode { Mode::ReadOnly } else { Mode::ReadWrite };
    Ok(OpenedDisk { disk, source, mode })
}
