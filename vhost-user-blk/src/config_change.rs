// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Telling the frontend that the device configuration changed (the disk grew): the back-end request
//! `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` on the channel the frontend gave us with `SET_BACKEND_REQ_FD`. The
//! frontend then reads the configuration space again (`GET_CONFIG`, answered with the disk's live capacity) and
//! raises the guest's configuration interrupt, on which Linux virtio-blk reads the new capacity.
//!
//! vhost-user-backend wraps the channel in a `vhost::vhost_user::Backend` and hands us that. In vhost 0.18 the
//! handle can send every back-end request but this one (its `VhostUserFrontendReqHandler::handle_config_change`
//! keeps the trait's ENOSYS default) and does not show its socket. So we keep the handle, which owns the socket
//! (it stays open as long as we hold it), and find the socket's descriptor ourselves: the one Unix stream socket
//! with no name on either end (a socketpair end, which is how frontends create the channel) that the process did
//! not have when the device was created. Anything but exactly one such socket is refused, never guessed; and
//! before each message the descriptor is checked to be still that socket (device and inode), so a descriptor
//! number reused by something else is never written to. Drop this module for the handle's own method once the
//! vhost crate has one.
//!
//! The message is a bare header without `NEED_REPLY`: the sender never waits for the frontend (whose answer
//! would come only after it asked us for the configuration on the main channel).

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::RawFd;
use std::sync::OnceLock;

use vhost::vhost_user::Backend;

/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`.
const CONFIG_CHANGE_MSG: u32 = 2;
/// Header flags: protocol version 1, no reply asked for.
const VERSION_1: u32 = 0x1;
/// Descriptors looked at when `RLIMIT_NOFILE` cannot be read: the usual soft limit.
const DEFAULT_SCAN_LIMIT: RawFd = 1024;
/// Never look at more descriptors than this (a huge soft limit would make each connection's scan slow).
const MAX_SCAN_LIMIT: RawFd = 1 << 16;

/// Why the frontend cannot be told about a configuration change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// The frontend gave no back-end request channel (it did not negotiate `BACKEND_REQ`).
    #[error("the frontend gave no back-end request channel")]
    NotGiven,
    /// The channel's descriptor could not be told apart from other sockets.
    #[error("cannot find the back-end request channel's descriptor: {found} new unnamed socket pairs, want 1")]
    Ambiguous {
        /// How many candidate sockets there were.
        found: usize,
    },
    /// The channel could not be set up when the frontend gave it (the reason).
    #[error("the back-end request channel is unusable: {0}")]
    Unusable(String),
    /// The descriptor no longer refers to the channel's socket.
    #[error("the back-end request channel is closed")]
    Gone,
    /// Writing the message failed (the frontend closed the channel, or does not read it).
    #[error("cannot send the config-change message")]
    Send(#[source] io::Error),
}

/// Identity of an open socket: the device and inode `fstat` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct SocketId {
    dev: u64,
    ino: u64,
}

/// The sockets with no name on either end that the process holds now (see [`BackendChannel::identify`]).
#[derive(Debug, Default)]
pub(super) struct KnownSockets(Vec<SocketId>);

impl KnownSockets {
    /// The unnamed socket pairs open now.
    pub(super) fn now() -> Self {
        KnownSockets(unnamed_pair_sockets().into_iter().map(|(_, id)| id).collect())
    }
}

/// The channel to the frontend for back-end requests.
pub(super) struct BackendChannel {
    /// Owns the socket.
    _handle: Backend,
    fd: RawFd,
    id: SocketId,
}

impl std::fmt::Debug for BackendChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendChannel").field("fd", &self.fd).field("id", &self.id).finish()
    }
}

impl BackendChannel {
    /// Find the descriptor of `handle`'s socket: the one unnamed socket pair open now that is not in `known`.
    pub(super) fn identify(handle: Backend, known: &KnownSockets) -> Result<Self, ChannelError> {
        Self::pick(handle, known, unnamed_pair_sockets())
    }

    /// The one socket of `open` (unnamed socket pairs) that is not in `known`, as the channel of `handle`.
    fn pick(handle: Backend, known: &KnownSockets, open: Vec<(RawFd, SocketId)>) -> Result<Self, ChannelError> {
        let new: Vec<(RawFd, SocketId)> = open.into_iter().filter(|(_, id)| !known.0.contains(id)).collect();
        match new.as_slice() {
            [(fd, id)] => Ok(BackendChannel { _handle: handle, fd: *fd, id: *id }),
            _ => Err(ChannelError::Ambiguous { found: new.len() }),
        }
    }

    /// Tell the frontend to read the configuration space again.
    pub(super) fn send_config_change(&self) -> Result<(), ChannelError> {
        if socket_id(self.fd) != Some(self.id) {
            return Err(ChannelError::Gone);
        }
        let mut header = [0u8; 12];
        header[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
        header[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
        // Bytes 8..12: the payload size, 0.
        // SAFETY: `header` is valid for reads of its length for the duration of the call; `self.fd` is the
        // channel's socket (checked above), kept open by `_handle`.
        let sent = unsafe {
            libc::send(self.fd, header.as_ptr().cast(), header.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
        };
        match usize::try_from(sent) {
            Ok(n) if n == header.len() => Ok(()),
            Ok(n) => Err(ChannelError::Send(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("{n} of {} bytes written", header.len()),
            ))),
            Err(_) => Err(ChannelError::Send(io::Error::last_os_error())),
        }
    }
}

/// How many descriptors to look at: the soft `RLIMIT_NOFILE` (no descriptor can be numbered above it), read
/// once, when the first server or device is created (before a daemon locks down its system calls).
pub(super) fn scan_limit() -> RawFd {
    static LIMIT: OnceLock<RawFd> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        let mut limit = MaybeUninit::<libc::rlimit>::zeroed();
        // SAFETY: getrlimit writes one rlimit into the buffer.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, limit.as_mut_ptr()) } != 0 {
            return DEFAULT_SCAN_LIMIT;
        }
        // SAFETY: getrlimit succeeded and filled the whole struct (it was zeroed before in any case).
        let soft = unsafe { limit.assume_init() }.rlim_cur;
        RawFd::try_from(soft).unwrap_or(MAX_SCAN_LIMIT).clamp(3, MAX_SCAN_LIMIT)
    })
}

/// Every descriptor below [`scan_limit`] that is a connected Unix stream socket unnamed at both ends.
fn unnamed_pair_sockets() -> Vec<(RawFd, SocketId)> {
    (0..scan_limit()).filter_map(|fd| Some((fd, socket_id(fd)?))).filter(|(fd, _)| is_unnamed_unix_pair(*fd)).collect()
}

/// The identity of `fd` if it is an open socket.
fn socket_id(fd: RawFd) -> Option<SocketId> {
    let mut stat = MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: fstat writes one stat into the buffer; a descriptor that is not open only gives EBADF.
    if unsafe { libc::fstat(fd, stat.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: fstat succeeded and filled the struct.
    let stat = unsafe { stat.assume_init() };
    (stat.st_mode & libc::S_IFMT == libc::S_IFSOCK).then_some(SocketId { dev: stat.st_dev, ino: stat.st_ino })
}

/// Whether the socket `fd` is a Unix stream socket whose own address and peer's address are both unnamed.
// The sizes given to the kernel are those of an int and a `sockaddr_un` (110 bytes): far below `socklen_t`'s range.
#[allow(clippy::cast_possible_truncation)]
fn is_unnamed_unix_pair(fd: RawFd) -> bool {
    let int_option = |option| {
        let mut value: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `value`.
        let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, option, (&raw mut value).cast(), &mut len) };
        (rc == 0).then_some(value)
    };
    if int_option(libc::SO_DOMAIN) != Some(libc::AF_UNIX) || int_option(libc::SO_TYPE) != Some(libc::SOCK_STREAM) {
        return false;
    }
    let unnamed = |peer: bool| {
        let mut addr = MaybeUninit::<libc::sockaddr_un>::zeroed();
        let mut len = size_of::<libc::sockaddr_un>() as libc::socklen_t;
        // SAFETY: get{sock,peer}name write at most `len` bytes of address into `addr`.
        let rc = unsafe {
            if peer {
                libc::getpeername(fd, addr.as_mut_ptr().cast(), &mut len)
            } else {
                libc::getsockname(fd, addr.as_mut_ptr().cast(), &mut len)
            }
        };
        // An unnamed address is the family alone; a path or an abstract name is longer.
        rc == 0 && len as usize <= size_of::<libc::sa_family_t>()
    };
    unnamed(false) && unnamed(true)
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::{UnixListener, UnixStream};

    use super::*;

    // Other tests of this binary open sockets concurrently, so the scan is checked for what it must and must not
    // contain, and the choice among candidates on lists made here.

    fn read_header(peer: &mut UnixStream) -> [u32; 3] {
        let mut bytes = [0u8; 12];
        peer.read_exact(&mut bytes).expect("read the header");
        let word = |i: usize| u32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
        [word(0), word(1), word(2)]
    }

    /// A channel on a fresh socket pair, and the frontend's end.
    fn channel() -> (BackendChannel, UnixStream) {
        let (ours, frontend) = UnixStream::pair().expect("socketpair");
        let fd = ours.as_raw_fd();
        let id = socket_id(fd).expect("a socket");
        let known = KnownSockets(vec![SocketId { dev: id.dev, ino: id.ino ^ 1 }]);
        let channel = BackendChannel::pick(Backend::from_stream(ours), &known, vec![(fd, id)]).expect("picked");
        (channel, frontend)
    }

    #[test]
    fn the_scan_finds_socket_pairs_and_not_connections_to_named_sockets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = UnixListener::bind(dir.path().join("s")).expect("bind");
        // Connections to a named socket (as the main vhost-user connection is), both ends.
        let client = UnixStream::connect(dir.path().join("s")).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        let (a, b) = UnixStream::pair().expect("socketpair");
        let found: Vec<RawFd> = unnamed_pair_sockets().into_iter().map(|(fd, _)| fd).collect();
        for pair_end in [&a, &b] {
            assert!(found.contains(&pair_end.as_raw_fd()), "socket pair end missing from {found:?}");
        }
        for named in [listener.as_raw_fd(), client.as_raw_fd(), accepted.as_raw_fd()] {
            assert!(!found.contains(&named), "fd {named} (named) in {found:?}");
        }
        let file = std::fs::File::open("/dev/null").expect("open /dev/null");
        assert!(socket_id(file.as_raw_fd()).is_none(), "/dev/null is no socket");
    }

    #[test]
    fn only_exactly_one_new_socket_pair_is_taken_as_the_channel() {
        let (one, _one_peer) = UnixStream::pair().expect("socketpair");
        let (two, _two_peer) = UnixStream::pair().expect("socketpair");
        let open: Vec<(RawFd, SocketId)> =
            [&one, &two].iter().map(|s| (s.as_raw_fd(), socket_id(s.as_raw_fd()).expect("socket"))).collect();
        let handle = || Backend::from_stream(UnixStream::pair().expect("socketpair").0);
        let err = BackendChannel::pick(handle(), &KnownSockets::default(), open.clone()).expect_err("two");
        assert!(matches!(err, ChannelError::Ambiguous { found: 2 }), "{err}");
        let err = BackendChannel::pick(handle(), &KnownSockets(vec![open[0].1, open[1].1]), open.clone())
            .expect_err("none new");
        assert!(matches!(err, ChannelError::Ambiguous { found: 0 }), "{err}");
        let picked = BackendChannel::pick(handle(), &KnownSockets(vec![open[0].1]), open.clone()).expect("one new");
        assert_eq!((picked.fd, picked.id), open[1]);
    }

    #[test]
    fn the_message_is_a_bare_config_change_header() {
        let (channel, mut frontend) = channel();
        channel.send_config_change().expect("sent");
        channel.send_config_change().expect("sent again");
        assert_eq!(read_header(&mut frontend), [CONFIG_CHANGE_MSG, VERSION_1, 0]);
        assert_eq!(read_header(&mut frontend), [CONFIG_CHANGE_MSG, VERSION_1, 0]);
    }

    #[test]
    fn a_descriptor_that_no_longer_names_the_channel_is_never_written_to() {
        let (mut channel, frontend) = channel();
        // As if the handle had closed it and the number had been reused by another socket.
        channel.id.ino ^= 1;
        assert!(matches!(channel.send_config_change(), Err(ChannelError::Gone)));
        drop(frontend);
    }

    #[test]
    fn a_frontend_that_closed_its_end_is_an_error_not_a_signal() {
        let (channel, frontend) = channel();
        drop(frontend);
        assert!(matches!(channel.send_config_change(), Err(ChannelError::Send(_))));
    }
}
