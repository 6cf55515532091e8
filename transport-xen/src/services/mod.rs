// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The Xen services a backend needs, behind traits: xenstore, event channels and grant tables.
//!
//! Each has a real implementation over `/dev/xen/{xenbus,evtchn,gntdev}` (see the real-Xen issue) and an
//! emulated one (the `emulated` host, feature `test-utils`) so the whole transport runs in tests without a hypervisor.
//! The traits are shaped for the real devices: pollable fds, batched grant maps, read-only maps, grant copy.

use std::os::fd::RawFd;

/// A Xen domain id.
pub type DomId = u16;
/// A grant reference in the granting domain's table.
pub type GrantRef = u32;
/// An event-channel port.
pub type EvtchnPort = u32;
/// Xen's page size (grants are always 4 KiB).
pub const XEN_PAGE_SIZE: usize = 4096;

/// Errors from the Xen services.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum XenError {
    /// A xenstore node does not exist.
    #[error("xenstore: {path}: no such node")]
    NotFound {
        /// The node.
        path: String,
    },
    /// A transaction conflicted with another writer: retry it.
    #[error("xenstore: transaction conflict (EAGAIN), retry")]
    Again,
    /// Permission denied.
    #[error("{what}: permission denied")]
    Access {
        /// What was denied.
        what: String,
    },
    /// A request was malformed or a value out of range (EINVAL, E2BIG, ...).
    #[error("{what}: {}", std::io::Error::from_raw_os_error(*errno))]
    Os {
        /// What failed.
        what: String,
        /// The errno.
        errno: i32,
    },
    /// The peer (xenstored, the hypervisor device) broke the protocol.
    #[error("{what}: protocol error: {detail}")]
    Protocol {
        /// Which service.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The connection to the service is gone.
    #[error("{what}: connection lost")]
    Disconnected {
        /// Which service.
        what: &'static str,
    },
}

impl XenError {
    /// An [`XenError::Os`] from `what` and an `io::Error`.
    pub fn os(what: impl Into<String>, err: &std::io::Error) -> XenError {
        XenError::Os { what: what.into(), errno: err.raw_os_error().unwrap_or(libc::EIO) }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// xenstore

/// A xenstore transaction id; [`TxId::NONE`] outside transactions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TxId(pub u32);

impl TxId {
    /// No transaction.
    pub const NONE: TxId = TxId(0);
}

/// What a domain may do with a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PermAccess {
    /// Nothing (`n`).
    None,
    /// Read (`r`).
    Read,
    /// Write (`w`).
    Write,
    /// Read and write (`b`).
    Both,
}

/// One entry of a node's permission list; the first entry names the owner and the default for other domains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permission {
    /// The domain.
    pub domid: DomId,
    /// Its access.
    pub access: PermAccess,
}

/// A fired watch: the node that changed (or the watched node itself on registration) and the watch's token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    /// The path that changed.
    pub path: String,
    /// The token given to [`XenStore::watch`].
    pub token: String,
}

/// A xenstore connection, shared by every vbd of the process.
///
/// Values are bytes: nothing read from xenstore is trusted to be UTF-8 or short.
pub trait XenStore: Send + Sync {
    /// Read a node.
    fn read(&self, tx: TxId, path: &str) -> Result<Vec<u8>, XenError>;
    /// Write a node, creating it and its parents.
    fn write(&self, tx: TxId, path: &str, value: &[u8]) -> Result<(), XenError>;
    /// Create a node (empty) and its parents.
    fn mkdir(&self, tx: TxId, path: &str) -> Result<(), XenError>;
    /// Remove a node and everything below it.
    fn rm(&self, tx: TxId, path: &str) -> Result<(), XenError>;
    /// The names of a node's children.
    fn directory(&self, tx: TxId, path: &str) -> Result<Vec<String>, XenError>;
    /// Read a node's permissions.
    fn get_perms(&self, tx: TxId, path: &str) -> Result<Vec<Permission>, XenError>;
    /// Set a node's permissions.
    fn set_perms(&self, tx: TxId, path: &str, perms: &[Permission]) -> Result<(), XenError>;
    /// Start a transaction.
    fn transaction_start(&self) -> Result<TxId, XenError>;
    /// Commit (or abort) a transaction; [`XenError::Again`] means it conflicted and must be retried.
    fn transaction_end(&self, tx: TxId, commit: bool) -> Result<(), XenError>;
    /// Watch `path` and everything below it; fires once at registration.
    fn watch(&self, path: &str, token: &str) -> Result<(), XenError>;
    /// Remove a watch.
    fn unwatch(&self, path: &str, token: &str) -> Result<(), XenError>;
    /// A descriptor that is readable while watch events are pending.
    fn watch_fd(&self) -> RawFd;
    /// Move every pending watch event into `out` without blocking.
    fn take_watch_events(&self, out: &mut Vec<WatchEvent>) -> Result<(), XenError>;
}

/// Read a node as a string, if it exists; `Ok(None)` when it does not.
pub fn read_optional(store: &dyn XenStore, tx: TxId, path: &str) -> Result<Option<Vec<u8>>, XenError> {
    match store.read(tx, path) {
        Ok(v) => Ok(Some(v)),
        Err(XenError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Run `body` in a transaction, retrying on [`XenError::Again`] up to `attempts` times.
pub fn with_transaction<T>(
    store: &dyn XenStore,
    attempts: u32,
    mut body: impl FnMut(TxId) -> Result<T, XenError>,
) -> Result<T, XenError> {
    let mut last = XenError::Again;
    for _ in 0..attempts.max(1) {
        let tx = store.transaction_start()?;
        match body(tx) {
            Ok(value) => match store.transaction_end(tx, true) {
                Ok(()) => return Ok(value),
                Err(XenError::Again) => last = XenError::Again,
                Err(e) => return Err(e),
            },
            Err(e) => {
                let _ = store.transaction_end(tx, false);
                if e != XenError::Again {
                    return Err(e);
                }
                last = e;
            }
        }
    }
    Err(last)
}

// ---------------------------------------------------------------------------------------------------------------
// event channels

/// One event-channel handle (one open of `/dev/xen/evtchn`): a queue worker owns one and polls its fd.
pub trait EventChannel: Send {
    /// Bind a local port to `remote_port` of domain `remote`.
    fn bind_interdomain(&mut self, remote: DomId, remote_port: EvtchnPort) -> Result<EvtchnPort, XenError>;
    /// Unbind a local port.
    fn unbind(&mut self, port: EvtchnPort) -> Result<(), XenError>;
    /// Send an event on a bound local port.
    fn notify(&self, port: EvtchnPort) -> Result<(), XenError>;
    /// A descriptor readable while events are pending.
    fn fd(&self) -> RawFd;
    /// Move every pending port into `out` without blocking; each one is masked until [`unmask`](Self::unmask).
    fn pending(&mut self, out: &mut Vec<EvtchnPort>) -> Result<(), XenError>;
    /// Re-enable delivery on a port returned by [`pending`](Self::pending).
    fn unmask(&mut self, port: EvtchnPort) -> Result<(), XenError>;
}

/// Opens event-channel handles.
pub trait EventChannelOpener: Send + Sync {
    /// The handle type.
    type Channel: EventChannel + 'static;
    /// Open a new handle.
    fn open(&self) -> Result<Self::Channel, XenError>;
}

// ---------------------------------------------------------------------------------------------------------------
// grants

/// Whether a grant mapping may be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapAccess {
    /// Read-only (for guest→disk writes: we only read the guest's pages).
    ReadOnly,
    /// Read-write (for disk→guest reads).
    ReadWrite,
}

/// Grant refs mapped into our address space, contiguously, in the order given; unmapped on drop.
pub trait GrantMapping: Send {
    /// Address of the first byte of the first page.
    fn as_ptr(&self) -> *mut u8;
    /// Number of pages.
    fn pages(&self) -> usize;
    /// Whether the mapping is writable.
    fn access(&self) -> MapAccess;
    /// Length in bytes.
    fn len(&self) -> usize {
        self.pages() * XEN_PAGE_SIZE
    }
    /// Whether it maps nothing.
    fn is_empty(&self) -> bool {
        self.pages() == 0
    }
}

/// One side of a grant copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopySide {
    /// A page granted by another domain, and a byte offset in it.
    Grant {
        /// Granting domain.
        domid: DomId,
        /// Grant reference.
        gref: GrantRef,
        /// Offset in the page.
        offset: u16,
    },
    /// Our own memory (the address of the first byte).
    Local(usize),
}

/// Grant-operation status codes (`GNTST_*` of Xen's `public/grant_table.h`), as [`GrantCopyOp::status`] carries them.
pub mod gntst {
    /// `GNTST_okay`: done.
    pub const OKAY: i16 = 0;
    /// `GNTST_general_error`.
    pub const GENERAL_ERROR: i16 = -1;
    /// `GNTST_bad_domain`: unknown domain.
    pub const BAD_DOMAIN: i16 = -2;
    /// `GNTST_bad_gntref`: unknown or inappropriate grant ref.
    pub const BAD_GNTREF: i16 = -3;
    /// `GNTST_bad_handle`.
    pub const BAD_HANDLE: i16 = -4;
    /// `GNTST_bad_virt_addr`.
    pub const BAD_VIRT_ADDR: i16 = -5;
    /// `GNTST_bad_dev_addr`.
    pub const BAD_DEV_ADDR: i16 = -6;
    /// `GNTST_no_device_space`.
    pub const NO_DEVICE_SPACE: i16 = -7;
    /// `GNTST_permission_denied`: e.g. writing through a read-only grant.
    pub const PERMISSION_DENIED: i16 = -8;
    /// `GNTST_bad_page`.
    pub const BAD_PAGE: i16 = -9;
    /// `GNTST_bad_copy_arg`: the copy crosses a page boundary.
    pub const BAD_COPY_ARG: i16 = -10;
    /// `GNTST_address_too_big`.
    pub const ADDRESS_TOO_BIG: i16 = -11;
    /// `GNTST_eagain`: not done, try again.
    pub const EAGAIN: i16 = -12;
}

/// One grant-copy operation; `status` is filled in by [`GrantTable::copy`] (0 = done, negative = GNTST error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantCopyOp {
    /// Where to copy from.
    pub source: CopySide,
    /// Where to copy to.
    pub dest: CopySide,
    /// Bytes, never crossing a page boundary on a grant side.
    pub len: u16,
    /// Result per operation.
    pub status: i16,
}

/// A grant table handle (one open of `/dev/xen/gntdev`).
pub trait GrantTable: Send + Sync {
    /// The mapping type.
    type Mapping: GrantMapping + 'static;
    /// Map `refs` of `domid` in one batch, contiguously.
    fn map(&self, domid: DomId, refs: &[GrantRef], access: MapAccess) -> Result<Self::Mapping, XenError>;
    /// Run a batch of grant copies; each op's `status` says how it went.
    ///
    /// # Safety
    /// Every [`CopySide::Local`] address must be valid for `len` bytes (readable as a source, writable as a
    /// destination) for the duration of the call.
    unsafe fn copy(&self, ops: &mut [GrantCopyOp]) -> Result<(), XenError>;
}
