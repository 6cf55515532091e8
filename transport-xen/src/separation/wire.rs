// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The messages between the supervisor and a guest's worker process, over a `SOCK_SEQPACKET` socket pair (one
//! message per packet, descriptors attached with `SCM_RIGHTS`).
//!
//! The worker asks, the supervisor answers, one request at a time; watch events travel on a second socket pair
//! so that they never interleave with answers. Everything the supervisor receives comes from a process a guest
//! may have taken over: it is decoded with `postcard` from a bounded buffer (a length field can never make it
//! allocate more than the packet holds) and then judged by [`super::policy`].

// The fields of the messages are the arguments and results of the `XenStore` methods and `Geometry` fields of
// the same names, documented there.
#![allow(missing_docs)]

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;

use serde::{Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Largest packet either side sends or accepts: xenstore values are at most 4 KiB and paths 3 KiB, and the
/// directories a worker lists are small.
pub const MAX_PACKET: usize = 64 * 1024;
/// Most descriptors one answer carries.
pub const MAX_FDS: usize = 3;

/// A worker's request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// The first message: the worker asks for its event socket and its grant device.
    Hello,
    /// `XenStore::read`.
    Read { tx: u32, path: String },
    /// `XenStore::write`.
    Write { tx: u32, path: String, value: Vec<u8> },
    /// `XenStore::mkdir`.
    Mkdir { tx: u32, path: String },
    /// `XenStore::rm`.
    Rm { tx: u32, path: String },
    /// `XenStore::directory`.
    Directory { tx: u32, path: String },
    /// `XenStore::get_perms`.
    GetPerms { tx: u32, path: String },
    /// `XenStore::set_perms`: (domid, access as `n`/`r`/`w`/`b`).
    SetPerms { tx: u32, path: String, perms: Vec<(u16, u8)> },
    /// `XenStore::transaction_start`.
    TransactionStart,
    /// `XenStore::transaction_end`.
    TransactionEnd { tx: u32, commit: bool },
    /// `XenStore::watch`.
    Watch { path: String, token: String },
    /// `XenStore::unwatch`.
    Unwatch { path: String, token: String },
    /// Open the disk that `backend/vbd/<domid>/<devid>` names (the supervisor reads the nodes itself).
    OpenDisk { devid: u32 },
    /// A new event-channel handle, restricted to the worker's guest.
    OpenEventChannel,
    /// Register these grant refs of the worker's guest with the worker's grant device
    /// (`IOCTL_GNTDEV_MAP_GRANT_REF`), so that the worker can mmap them: the worker names the refs, never the
    /// domain. At most [`MAX_BROKERED_REFS`].
    MapGrants { refs: Vec<u32> },
}

/// Most grant refs one [`Request::MapGrants`] registers: a ring of the largest order, or one request's segments
/// with indirect descriptors (what the data plane maps at once).
pub const MAX_BROKERED_REFS: usize = 1024;

/// Why a request failed, as [`crate::services::XenError`] says it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum WireError {
    /// `NotFound`.
    NotFound { path: String },
    /// `Again`.
    Again,
    /// `Access`: also what the policy answers for a path outside the worker's guest.
    Access { what: String },
    /// `Os`.
    Os { what: String, errno: i32 },
    /// `Protocol`.
    Protocol { detail: String },
    /// `Disconnected`.
    Disconnected,
}

/// A disk the supervisor opened: the descriptor comes with the answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskGrant {
    /// What the nodes named, as the backend shows it (`DeviceSource`).
    pub source: WireSource,
    /// The vbd's `mode` is read-only.
    pub read_only_mode: bool,
    /// The disk refuses writes (the mode, or a read-only device).
    pub read_only: bool,
    /// The path it was opened by.
    pub path: String,
    /// `None` for a regular file; `(major, minor, diskseq)` for a block device.
    pub block_device: Option<(u32, u32, u64)>,
    /// The geometry the supervisor read (`device_blk::Geometry`).
    pub capacity_sectors: u64,
    pub logical_block_size: u32,
    pub physical_block_size: u32,
    pub direct_io: bool,
    pub discard: bool,
    pub write_zeroes: bool,
    pub discard_granularity: u32,
    pub buffer_alignment: u64,
}

/// `DeviceSource` on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireSource {
    /// `physical-device` (+ `diskseq`).
    Physical { major: u32, minor: u32, diskseq: Option<u64> },
    /// A `params` image file.
    ImageFile(String),
}

/// The supervisor's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Done, nothing to return.
    Done,
    /// `Hello`'s answer; the event socket, the grant device and (with `control`) the listening control socket
    /// come attached, in that order.
    Welcome {
        /// The control socket's path (`blkbackd xen --control-dir`), if the supervisor bound one.
        control: Option<String>,
    },
    /// A node's value.
    Value(Vec<u8>),
    /// A directory's children.
    Names(Vec<String>),
    /// A node's permissions.
    Perms(Vec<(u16, u8)>),
    /// A transaction id.
    Transaction(u32),
    /// A failed xenstore request.
    Failed(WireError),
    /// The disk is not named yet (wait for the hotplug script).
    DiskNotYet,
    /// The disk is open; its descriptor comes attached.
    Disk(DiskGrant),
    /// The disk cannot be served: `(errno, message)` for the vbd's `error` node.
    DiskFatal { errno: i32, message: String },
    /// An event-channel handle comes attached.
    EventChannel,
    /// `MapGrants`' answer: the refs' offset in the worker's grant device, for its `mmap`.
    Registered { index: u64 },
}

/// A watch that fired, on the event socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The path that changed.
    pub path: String,
    /// The worker's token.
    pub token: String,
}

/// A `SOCK_SEQPACKET` socket pair, close-on-exec.
pub fn seqpacket_pair() -> io::Result<(UnixDatagram, UnixDatagram)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid out-array of two descriptors.
    let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair returned two fresh descriptors that nothing else owns. A connected SEQPACKET socket is
    // used only through send/recv/sendmsg/recvmsg, which `UnixDatagram` issues.
    Ok(unsafe { (UnixDatagram::from_raw_fd(fds[0]), UnixDatagram::from_raw_fd(fds[1])) })
}

/// One message as the bytes of its packet (refused if it would not fit one).
pub fn encode<T: Serialize>(message: &T) -> io::Result<Vec<u8>> {
    let bytes = postcard::to_allocvec(message).map_err(io::Error::other)?;
    if bytes.len() >= MAX_PACKET {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("message of {} bytes", bytes.len())));
    }
    Ok(bytes)
}

/// Decode one message from the bytes of its packet.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> io::Result<T> {
    if bytes.len() >= MAX_PACKET {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "packet too large"));
    }
    postcard::from_bytes(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad message: {e}")))
}

/// Send `message` with `fds` attached, as one packet.
pub fn send<T: Serialize>(socket: &UnixDatagram, message: &T, fds: &[RawFd]) -> io::Result<()> {
    let bytes = encode(message)?;
    if fds.is_empty() {
        socket.send(&bytes)?;
    } else {
        socket.send_with_fds(&[bytes.as_slice()], fds).map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    }
    Ok(())
}

/// Receive one packet into `buf` and decode it, without descriptors (any the peer attached are discarded by
/// the kernel). `Ok(None)` when the peer closed its end.
pub fn recv<'a, T: Deserialize<'a>>(socket: &UnixDatagram, buf: &'a mut [u8]) -> io::Result<Option<T>> {
    let n = socket.recv(buf)?;
    if n == 0 {
        return Ok(None);
    }
    checked(&buf[..n], buf.len()).map(Some)
}

/// Receive one packet with up to [`MAX_FDS`] descriptors. `Ok(None)` when the peer closed its end.
pub fn recv_with_fds<'a, T: Deserialize<'a>>(
    socket: &UnixDatagram,
    buf: &'a mut [u8],
) -> io::Result<Option<(T, Vec<OwnedFd>)>> {
    let mut raw = [-1; MAX_FDS];
    let mut iov = [libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
    // SAFETY: the iovec points into `buf`, which is ours to overwrite and outlives the call.
    let (n, count) =
        unsafe { socket.recv_with_fds(&mut iov, &mut raw) }.map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let fds: Vec<OwnedFd> = raw[..count.min(MAX_FDS)]
        .iter()
        .filter(|&&fd| fd >= 0)
        // SAFETY: the kernel installed these descriptors for us; nothing else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    let message = checked(&buf[..n], buf.len())?;
    Ok(Some((message, fds)))
}

/// Decode a received packet; one that filled the whole buffer may have been cut short and is refused.
fn checked<'a, T: Deserialize<'a>>(bytes: &'a [u8], capacity: usize) -> io::Result<T> {
    if bytes.len() >= capacity {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "packet too large (truncated)"));
    }
    decode(bytes)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn messages_round_trip_with_descriptors() {
        let (a, b) = seqpacket_pair().expect("pair");
        send(&a, &Request::Write { tx: 3, path: "/a/b".into(), value: b"v".to_vec() }, &[]).expect("send");
        let mut buf = vec![0; MAX_PACKET];
        let got: Request = recv(&b, &mut buf).expect("recv").expect("message");
        assert_eq!(got, Request::Write { tx: 3, path: "/a/b".into(), value: b"v".to_vec() });
        let file = std::fs::File::open("/dev/null").expect("open");
        send(&b, &Reply::EventChannel, &[file.as_raw_fd()]).expect("send fd");
        let (reply, fds): (Reply, _) = recv_with_fds(&a, &mut buf).expect("recv").expect("message");
        assert_eq!((reply, fds.len()), (Reply::EventChannel, 1));
    }

    #[test]
    fn garbage_and_oversized_packets_are_errors_not_panics() {
        let (a, b) = seqpacket_pair().expect("pair");
        let mut buf = vec![0; 256];
        a.send(&[0xff; 40]).expect("send");
        assert!(recv::<Request>(&b, &mut buf).is_err());
        a.send(&[7u8; 1000]).expect("send");
        assert!(recv::<Request>(&b, &mut buf).is_err(), "a packet that fills the buffer is refused");
        drop(a);
        assert!(recv::<Request>(&b, &mut buf).expect("eof").is_none());
    }
}
