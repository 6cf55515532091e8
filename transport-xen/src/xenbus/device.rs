// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Which disk the toolstack named, and opening it: `physical-device` (+ `diskseq` pin) or a `params` image file.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use device_blk::disk::DirectIo;
use device_blk::{Disk, DiskError, DiskKind, DiskOptions};

use crate::xenbus::nodes::{self, DiskseqError, Mode, NodeError, PhysicalDevice};

/// The disk the backend nodes name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSource {
    /// A block device by number, pinned to a disk sequence number when `diskseq` was given.
    Physical {
        /// `physical-device`.
        device: PhysicalDevice,
        /// `diskseq`, if present.
        diskseq: Option<u64>,
    },
    /// An image file named by `params` (no `physical-device`).
    ImageFile(PathBuf),
}

impl std::fmt::Display for DeviceSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSource::Physical { device, diskseq: Some(seq) } => write!(f, "{device} (diskseq {seq:x})"),
            DeviceSource::Physical { device, diskseq: None } => write!(f, "{device}"),
            DeviceSource::ImageFile(path) => write!(f, "{}", path.display()),
        }
    }
}

/// The raw backend nodes that name the disk, read together in one transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceNodes {
    /// `physical-device`.
    pub physical_device: Option<Vec<u8>>,
    /// `diskseq`.
    pub diskseq: Option<Vec<u8>>,
    /// `params`.
    pub params: Option<Vec<u8>>,
    /// `mode`.
    pub mode: Option<Vec<u8>>,
    /// `script`: libxl names the hotplug script here; when there is one, it provides `physical-device`.
    pub script: Option<Vec<u8>>,
    /// `hotplug-status`: `connected` once the hotplug script has finished.
    pub hotplug_status: Option<Vec<u8>>,
}

impl DeviceNodes {
    /// Whether both name the same device the same way: every node but `hotplug-status`, which only tells when a
    /// script is done. A device that failed to open is not retried until one of these changes.
    pub fn same_device(&self, other: &DeviceNodes) -> bool {
        (&self.physical_device, &self.diskseq, &self.params, &self.mode, &self.script)
            == (&other.physical_device, &other.diskseq, &other.params, &other.mode, &other.script)
    }
}

/// A fatal problem with the device nodes or the open: what `xenbus_dev_fatal` reports.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Fatal {
    /// The errno (positive), written first in the `error` node.
    pub errno: i32,
    /// The message.
    pub message: String,
}

impl Fatal {
    /// A fatal error with `errno` and `message`.
    pub fn new(errno: i32, message: impl Into<String>) -> Fatal {
        Fatal { errno, message: message.into() }
    }
}

impl From<NodeError> for Fatal {
    fn from(e: NodeError) -> Fatal {
        Fatal { errno: e.errno(), message: format!("reading {e}") }
    }
}

impl From<DiskseqError> for Fatal {
    fn from(e: DiskseqError) -> Fatal {
        Fatal { errno: e.errno(), message: e.to_string() }
    }
}

/// What the nodes ask for: nothing yet, or a source with its mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceRequest {
    /// Neither `physical-device` nor a usable `params` yet: wait for the hotplug script.
    NotYet,
    /// Open this.
    Open {
        /// The disk.
        source: DeviceSource,
        /// The access mode.
        mode: Mode,
    },
}

/// Interpret the device nodes. `physical-device` (+ `diskseq`) wins. Without it, `params` is served directly
/// (unpinned) when no hotplug `script` is configured and it names a regular file, or once the configured script has
/// finished (`hotplug-status` = `connected`) without writing `physical-device` (a no-op script that hands `params`
/// to the backend untouched: then a block device path is served too). Otherwise we wait: a script that sets up a
/// device writes `physical-device` + `diskseq` before it reports `connected`.
pub fn interpret(nodes: &DeviceNodes) -> Result<DeviceRequest, Fatal> {
    let source = if let Some(pdev) = &nodes.physical_device {
        let device = nodes::parse_physical_device(pdev)?;
        // Validated exactly as the seed does, before anything is opened.
        let diskseq = nodes::parse_diskseq(nodes.diskseq.as_deref())?;
        DeviceSource::Physical { device, diskseq }
    } else if let Some(params) = nodes.params.as_deref().filter(|_| nodes.script.is_none() || script_done(nodes)) {
        let path = nodes::parse_params(params)?;
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() || (script_done(nodes) && meta.file_type().is_block_device()) => {
                if nodes.diskseq.is_some() {
                    return Err(Fatal::new(libc::EINVAL, format!("diskseq given for image file {}", path.display())));
                }
                DeviceSource::ImageFile(path)
            }
            // A device (or not there yet): the hotplug script writes physical-device.
            _ => return Ok(DeviceRequest::NotYet),
        }
    } else {
        return Ok(DeviceRequest::NotYet);
    };
    let mode = match &nodes.mode {
        Some(m) => nodes::parse_mode(m)?,
        None => return Err(Fatal::new(libc::ENOENT, "reading mode: missing")),
    };
    Ok(DeviceRequest::Open { source, mode })
}

/// A disk opened for a vbd, with what named it.
#[derive(Debug)]
pub struct OpenedDisk {
    /// The open disk.
    pub disk: Disk,
    /// What the nodes named.
    pub source: DeviceSource,
    /// The access mode.
    pub mode: Mode,
}

/// Who opens the disk a vbd's nodes name: the backend itself ([`LocalDiskOpener`]), or, in a sandboxed process
/// that may not open files, a privileged process that reads the nodes on its own and hands over the descriptor.
pub trait DiskOpener: Send + Sync {
    /// Open the disk for vbd `id`, whose backend nodes read `nodes`; `Ok(None)` while they name nothing yet.
    fn open(
        &self,
        id: crate::xenbus::VbdId,
        nodes: &DeviceNodes,
        direct_io: DirectIo,
    ) -> Result<Option<OpenedDisk>, Fatal>;
}

/// Opens disks in this process: [`interpret`] the nodes, then [`open_source`].
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalDiskOpener;

impl DiskOpener for LocalDiskOpener {
    fn open(
        &self,
        _id: crate::xenbus::VbdId,
        nodes: &DeviceNodes,
        direct_io: DirectIo,
    ) -> Result<Option<OpenedDisk>, Fatal> {
        match interpret(nodes)? {
            DeviceRequest::NotYet => Ok(None),
            DeviceRequest::Open { source, mode } => {
                let disk = open_source(&source, mode, direct_io)?;
                Ok(Some(OpenedDisk { disk, source, mode }))
            }
        }
    }
}

/// Whether a configured hotplug script has finished (`hotplug-status` = `connected`).
fn script_done(nodes: &DeviceNodes) -> bool {
    nodes.script.is_some() && nodes.hotplug_status.as_deref() == Some(b"connected".as_slice())
}

/// Find a device node for `device`: udev's `/dev/block/M:m`, else `/dev/<DEVNAME>` from sysfs.
///
/// The path is only a hint: [`open_source`] checks the opened descriptor's device number (and the diskseq pin).
pub fn device_node(device: PhysicalDevice) -> Option<PathBuf> {
    let by_number = PathBuf::from(format!("/dev/block/{}:{}", device.major, device.minor));
    if by_number.exists() {
        return Some(by_number);
    }
    let uevent = std::fs::read_to_string(format!("/sys/dev/block/{}:{}/uevent", device.major, device.minor)).ok()?;
    let name = uevent.lines().find_map(|l| l.strip_prefix("DEVNAME="))?;
    if name.is_empty() || name.split('/').any(|c| c == ".." || c.is_empty()) {
        return None;
    }
    let path = Path::new("/dev").join(name);
    path.exists().then_some(path)
}

/// Open the disk `source` names, read-only if `mode` says so, pinned to the diskseq if there is one.
pub fn open_source(source: &DeviceSource, mode: Mode, direct_io: DirectIo) -> Result<Disk, Fatal> {
    let read_only = mode == Mode::ReadOnly;
    let (path, expected_diskseq) = match source {
        DeviceSource::Physical { device, diskseq } => {
            let path = device_node(*device).ok_or_else(|| {
                Fatal::new(libc::ENOENT, format!("creating vbd structure: device {device} not found"))
            })?;
            (path, *diskseq)
        }
        DeviceSource::ImageFile(path) => (path.clone(), None),
    };
    let options = DiskOptions::default()
        .with_read_only(read_only)
        .with_direct_io(direct_io)
        .with_expected_diskseq(expected_diskseq);
    let disk =
        Disk::open(&path, &options).map_err(|e| Fatal::new(disk_errno(&e), format!("creating vbd structure: {e}")))?;
    if let DeviceSource::Physical { device, .. } = source {
        match disk.kind() {
            DiskKind::BlockDevice { major, minor, .. } if major == device.major && minor == device.minor => {}
            other => {
                return Err(Fatal::new(
                    libc::ENODEV,
                    format!("creating vbd structure: {} is {other:?}, not device {device}", path.display()),
                ))
            }
        }
    }
    Ok(disk)
}

/// The errno Linux blkback reports for a failed open: ENODEV for a diskseq mismatch (as the seed), else the cause.
fn disk_errno(e: &DiskError) -> i32 {
    match e {
        DiskError::DiskseqMismatch { .. } | DiskError::NotADisk { .. } => libc::ENODEV,
        DiskError::Open { cause, .. } | DiskError::Geometry { cause, .. } => cause.raw_os_error().unwrap_or(libc::EIO),
        DiskError::DiskseqUnavailable { .. } => libc::EFAULT,
        _ => libc::EINVAL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(pdev: Option<&str>, diskseq: Option<&str>, params: Option<&str>) -> DeviceNodes {
        DeviceNodes {
            physical_device: pdev.map(|s| s.as_bytes().to_vec()),
            diskseq: diskseq.map(|s| s.as_bytes().to_vec()),
            params: params.map(|s| s.as_bytes().to_vec()),
            mode: Some(b"w".to_vec()),
            script: None,
            hotplug_status: None,
        }
    }

    #[test]
    fn nothing_until_physical_device_or_an_image_file() {
        assert_eq!(interpret(&nodes(None, None, None)), Ok(DeviceRequest::NotYet));
        assert_eq!(interpret(&nodes(None, None, Some("/dev/null"))), Ok(DeviceRequest::NotYet));
        assert_eq!(interpret(&nodes(None, None, Some("/nonexistent/img"))), Ok(DeviceRequest::NotYet));
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("img");
        std::fs::write(&img, [0u8; 4096]).expect("write");
        let req = interpret(&nodes(None, None, Some(img.to_str().expect("utf8")))).expect("valid");
        assert_eq!(req, DeviceRequest::Open { source: DeviceSource::ImageFile(img.clone()), mode: Mode::ReadWrite });
        assert!(interpret(&nodes(None, Some("5"), Some(img.to_str().expect("utf8")))).is_err());
        let mut scripted = nodes(None, None, Some(img.to_str().expect("utf8")));
        scripted.script = Some(b"/etc/xen/scripts/block-blkbackd".to_vec());
        assert_eq!(interpret(&scripted), Ok(DeviceRequest::NotYet), "the hotplug script provides the device");
    }

    #[test]
    fn params_is_served_once_a_script_finished_without_physical_device() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("img");
        std::fs::write(&img, [0u8; 4096]).expect("write");
        let mut scripted = nodes(None, None, Some(img.to_str().expect("utf8")));
        scripted.script = Some(b"/etc/xen/scripts/block-userspace".to_vec());
        scripted.hotplug_status = Some(b"busy".to_vec());
        assert_eq!(interpret(&scripted), Ok(DeviceRequest::NotYet), "the script is still running");
        scripted.hotplug_status = Some(b"connected".to_vec());
        let req = interpret(&scripted).expect("valid");
        assert_eq!(req, DeviceRequest::Open { source: DeviceSource::ImageFile(img), mode: Mode::ReadWrite });
        // A block device named by params is served once the script is done, never before.
        let Some(block) = ["/dev/vda", "/dev/sda", "/dev/nvme0n1", "/dev/loop0"]
            .into_iter()
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device()))
        else {
            return;
        };
        let mut device = nodes(None, None, Some(block));
        device.script = Some(b"/etc/xen/scripts/block-userspace".to_vec());
        assert_eq!(interpret(&device), Ok(DeviceRequest::NotYet));
        device.hotplug_status = Some(b"connected".to_vec());
        assert!(matches!(interpret(&device), Ok(DeviceRequest::Open { source: DeviceSource::ImageFile(_), .. })));
    }

    #[test]
    fn physical_device_with_diskseq_errors_carry_the_seed_errnos() {
        let req = interpret(&nodes(Some("7:3"), Some("2a"), None)).expect("valid");
        let device = PhysicalDevice { major: 7, minor: 3 };
        assert_eq!(
            req,
            DeviceRequest::Open { source: DeviceSource::Physical { device, diskseq: Some(42) }, mode: Mode::ReadWrite }
        );
        let cases = [
            ("", libc::EFAULT, "diskseq must not be empty"),
            ("0123", libc::ERANGE, "diskseq must not start with '0'"),
        ];
        for (value, errno, message) in cases {
            assert_eq!(interpret(&nodes(Some("7:3"), Some(value), None)), Err(Fatal::new(errno, message)));
        }
        let bad = interpret(&nodes(Some("7-3"), None, None)).expect_err("bad physical-device");
        assert_eq!(bad.errno, libc::EINVAL);
        assert!(bad.message.starts_with("reading physical-device"), "{bad}");
        let mut no_mode = nodes(Some("7:3"), None, None);
        no_mode.mode = None;
        assert_eq!(interpret(&no_mode).expect_err("mode").errno, libc::ENOENT);
    }
}
