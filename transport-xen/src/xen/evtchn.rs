// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`EvtchnDevice`]: event channels through Linux's `/dev/xen/evtchn`.
//!
//! Each open is an independent handle with its own ports. A port that fires is queued in the handle and masked;
//! `read` returns the queued ports (one native-endian `u32` each) and writing a port back unmasks it. The handle is
//! opened non-blocking, so its fd is what an epoll loop waits on and [`EventChannel::pending`] never blocks. If the
//! kernel's per-handle queue overflows, reads fail with `EFBIG` until `IOCTL_EVTCHN_RESET`: we reset and report
//! every bound port as pending (a spurious event is harmless, a lost one hangs a ring).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::ioctl::{self as uapi, EvtchnBindInterdomain, EvtchnBindUnboundPort, EvtchnPortArg, EvtchnRestrictDomid};
use crate::services::{DomId, EventChannel, EventChannelOpener, EvtchnPort, XenError};

/// Linux's event-channel device.
pub const EVTCHN_DEVICE: &str = "/dev/xen/evtchn";

/// The first domain id Xen reserves for special domains (`DOMID_FIRST_RESERVED`).
pub const DOMID_FIRST_RESERVED: DomId = 0x7ff0;

/// Ports read per `read(2)`.
const READ_BATCH: usize = 128;

/// One open of `/dev/xen/evtchn`; closing it unbinds every port it bound.
#[derive(Debug)]
pub struct EvtchnDevice {
    file: File,
    /// Ports bound through this handle (a queue has a handful: a linear scan is cheapest).
    bound: Vec<EvtchnPort>,
}

impl EvtchnDevice {
    /// Open [`EVTCHN_DEVICE`].
    pub fn open() -> Result<EvtchnDevice, XenError> {
        EvtchnDevice::open_path(Path::new(EVTCHN_DEVICE))
    }

    /// Open an event-channel device at `path`.
    pub fn open_path(path: &Path) -> Result<EvtchnDevice, XenError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| XenError::os(format!("open {}", path.display()), &e))?;
        Ok(EvtchnDevice { file, bound: Vec::new() })
    }

    /// A handle opened elsewhere (e.g. by a privileged process that restricted it to one domain and passed it
    /// over a socket). It is made non-blocking, as [`open_path`](Self::open_path) opens it.
    pub fn from_file(file: File) -> Result<EvtchnDevice, XenError> {
        set_nonblocking(&file).map_err(|e| XenError::os("evtchn: set O_NONBLOCK", &e))?;
        Ok(EvtchnDevice { file, bound: Vec::new() })
    }

    /// The handle's descriptor (to pass it to another process); its bound ports stay bound.
    pub fn into_file(self) -> File {
        self.file
    }

    /// The ports bound through this handle.
    pub fn bound_ports(&self) -> &[EvtchnPort] {
        &self.bound
    }

    /// Allocate a fresh local port that `remote` may bind to (`IOCTL_EVTCHN_BIND_UNBOUND_PORT`).
    pub fn bind_unbound_port(&mut self, remote: DomId) -> Result<EvtchnPort, XenError> {
        let mut arg = EvtchnBindUnboundPort { remote_domain: u32::from(remote) };
        let port = self.port_ioctl("bind unbound port", uapi::IOCTL_EVTCHN_BIND_UNBOUND_PORT, &mut arg)?;
        self.bound.push(port);
        Ok(port)
    }

    /// Allow this handle to bind only to ports of `domid` from now on (`IOCTL_EVTCHN_RESTRICT_DOMID`):
    /// irreversible; afterwards `bind_interdomain` to another domain and `bind_unbound_port` fail with `EACCES`.
    /// `domid` must be a guest (not 0, below `DOMID_FIRST_RESERVED`), as Linux requires.
    pub fn restrict_domid(&self, domid: DomId) -> Result<(), XenError> {
        if domid == 0 || domid >= DOMID_FIRST_RESERVED {
            return Err(XenError::Os {
                what: format!("evtchn: restrict to domain {domid} (not a guest)"),
                errno: libc::EINVAL,
            });
        }
        let mut arg = EvtchnRestrictDomid { domid };
        // SAFETY: `arg` is the argument struct this request expects, alive for the call.
        unsafe { uapi::ioctl(self.file.as_fd(), uapi::IOCTL_EVTCHN_RESTRICT_DOMID, &mut arg) }
            .map_err(|e| XenError::os(format!("evtchn: restrict to domain {domid}"), &e))?;
        Ok(())
    }

    /// Empty the handle's queue and clear an overflow (`IOCTL_EVTCHN_RESET`); queued events are lost.
    pub fn reset(&mut self) -> Result<(), XenError> {
        // SAFETY: this request takes no argument; a null pointer is what the kernel expects.
        unsafe { uapi::ioctl(self.file.as_fd(), uapi::IOCTL_EVTCHN_RESET, std::ptr::null_mut::<u8>()) }
            .map_err(|e| XenError::os("evtchn: reset", &e))?;
        Ok(())
    }

    fn port_ioctl<T>(&self, what: &str, request: uapi::IoctlRequest, arg: &mut T) -> Result<EvtchnPort, XenError> {
        // SAFETY: every caller passes the argument struct `request` expects, alive for the call.
        let ret = unsafe { uapi::ioctl(self.file.as_fd(), request, arg) }
            .map_err(|e| XenError::os(format!("evtchn: {what}"), &e))?;
        EvtchnPort::try_from(ret)
            .map_err(|_| XenError::Protocol { what: "evtchn", detail: format!("{what}: port {ret}") })
    }
}

fn set_nonblocking(file: &File) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no pointers involved.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK != 0 {
        return Ok(());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl EventChannel for EvtchnDevice {
    fn bind_interdomain(&mut self, remote: DomId, remote_port: EvtchnPort) -> Result<EvtchnPort, XenError> {
        let mut arg = EvtchnBindInterdomain { remote_domain: u32::from(remote), remote_port };
        let what = format!("bind to port {remote_port} of domain {remote}");
        let port = self.port_ioctl(&what, uapi::IOCTL_EVTCHN_BIND_INTERDOMAIN, &mut arg)?;
        self.bound.push(port);
        Ok(port)
    }

    fn unbind(&mut self, port: EvtchnPort) -> Result<(), XenError> {
        let mut arg = EvtchnPortArg { port };
        // SAFETY: `arg` is the argument struct this request expects, alive for the call.
        unsafe { uapi::ioctl(self.file.as_fd(), uapi::IOCTL_EVTCHN_UNBIND, &mut arg) }
            .map_err(|e| XenError::os(format!("evtchn: unbind port {port}"), &e))?;
        self.bound.retain(|&p| p != port);
        Ok(())
    }

    fn notify(&self, port: EvtchnPort) -> Result<(), XenError> {
        let mut arg = EvtchnPortArg { port };
        // SAFETY: `arg` is the argument struct this request expects, alive for the call.
        unsafe { uapi::ioctl(self.file.as_fd(), uapi::IOCTL_EVTCHN_NOTIFY, &mut arg) }
            .map_err(|e| XenError::os(format!("evtchn: notify port {port}"), &e))?;
        Ok(())
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn pending(&mut self, out: &mut Vec<EvtchnPort>) -> Result<(), XenError> {
        let mut buf = [0u8; READ_BATCH * 4];
        loop {
            match (&self.file).read(&mut buf) {
                Ok(n) => {
                    for chunk in buf[..n].chunks_exact(4) {
                        let port = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                        if self.bound.contains(&port) {
                            out.push(port);
                        } else {
                            tracing::debug!(port, "evtchn: event on a port this handle did not bind");
                        }
                    }
                    if n < buf.len() {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EFBIG) => {
                    tracing::warn!(
                        ports = self.bound.len(),
                        "evtchn: event queue overflow, treating every port as pending"
                    );
                    self.reset()?;
                    out.extend_from_slice(&self.bound);
                    return Ok(());
                }
                Err(e) => return Err(XenError::os("evtchn: read pending ports", &e)),
            }
        }
    }

    fn unmask(&mut self, port: EvtchnPort) -> Result<(), XenError> {
        match (&self.file).write(&port.to_ne_bytes()) {
            Ok(4) => Ok(()),
            Ok(n) => {
                Err(XenError::Protocol { what: "evtchn", detail: format!("unmask port {port}: wrote {n} of 4 bytes") })
            }
            Err(e) => Err(XenError::os(format!("evtchn: unmask port {port}"), &e)),
        }
    }
}

/// Opens [`EvtchnDevice`] handles (one per queue worker).
#[derive(Clone, Debug)]
pub struct EvtchnOpener {
    path: PathBuf,
}

impl EvtchnOpener {
    /// An opener of the device at `path`.
    pub fn new(path: impl Into<PathBuf>) -> EvtchnOpener {
        EvtchnOpener { path: path.into() }
    }
}

impl Default for EvtchnOpener {
    fn default() -> Self {
        EvtchnOpener::new(EVTCHN_DEVICE)
    }
}

impl EventChannelOpener for EvtchnOpener {
    type Channel = EvtchnDevice;

    fn open(&self) -> Result<EvtchnDevice, XenError> {
        EvtchnDevice::open_path(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_is_a_clear_error() {
        let err = EvtchnOpener::new("/nonexistent/evtchn").open().expect_err("no such device");
        assert!(matches!(err, XenError::Os { errno: libc::ENOENT, .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/evtchn"), "{err}");
    }

    #[test]
    fn ioctls_on_a_non_xen_file_fail_cleanly() {
        // /dev/null stands in for the device: every ioctl fails with ENOTTY through the checked path, and a read
        // of a non-Xen file that returns nothing is "no pending ports".
        let mut dev = EvtchnDevice::open_path(Path::new("/dev/null")).expect("open /dev/null");
        let err = dev.bind_interdomain(1, 5).expect_err("not an evtchn device");
        assert!(matches!(err, XenError::Os { errno: libc::ENOTTY, .. }), "{err}");
        assert!(dev.notify(3).is_err());
        assert!(dev.reset().is_err());
        assert!(matches!(dev.restrict_domid(1), Err(XenError::Os { errno: libc::ENOTTY, .. })));
        // Domain 0 and reserved ids are refused before any ioctl.
        assert!(matches!(dev.restrict_domid(0), Err(XenError::Os { errno: libc::EINVAL, .. })));
        assert!(matches!(dev.restrict_domid(DOMID_FIRST_RESERVED), Err(XenError::Os { errno: libc::EINVAL, .. })));
        let mut out = Vec::new();
        dev.pending(&mut out).expect("empty read");
        assert!(out.is_empty());
        dev.unmask(7).expect("/dev/null swallows writes");
    }
}
