// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Parsers for xenstore values.
//!
//! Every value is hostile: it may be empty, huge, non-UTF-8 or contain NUL bytes. Each parser checks the length
//! first, accepts exactly one spelling (no whitespace, no sign, no radix prefix unless the format has one), bounds
//! the result, and names the node in its error so the `error` node tells the toolstack what was wrong.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use crate::connect::BlkifAbi;
use crate::services::{DomId, EvtchnPort, GrantRef};

/// Longest value xenstore carries (`XENSTORE_PAYLOAD_MAX`).
pub const XENSTORE_PAYLOAD_MAX: usize = 4096;
/// Longest absolute xenstore path (`XENSTORE_ABS_PATH_MAX`).
pub const XENSTORE_ABS_PATH_MAX: usize = 3072;
/// The first domain id Xen reserves (`DOMID_FIRST_RESERVED`): no frontend has an id at or above it.
pub const DOMID_FIRST_RESERVED: DomId = 0x7ff0;
/// Longest `diskseq` value: 16 hex digits, as the seed requires.
pub const DISKSEQ_MAX_DIGITS: usize = 16;
/// Longest `protocol` value Linux reads (`%63s`).
pub const PROTOCOL_MAX_LEN: usize = 63;
/// Largest major number of a Linux `dev_t` (12 bits).
pub const MAX_MAJOR: u32 = 0xfff;
/// Largest minor number of a Linux `dev_t` (20 bits).
pub const MAX_MINOR: u32 = 0xf_ffff;

/// How much of a hostile value an error message quotes.
const SHOWN_BYTES: usize = 32;

/// A value that could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// A required node does not exist.
    #[error("{node}: missing")]
    Missing {
        /// The node.
        node: String,
    },
    /// The value is empty.
    #[error("{node}: empty value")]
    Empty {
        /// The node.
        node: String,
    },
    /// The value is longer than any valid one.
    #[error("{node}: value of {len} bytes is longer than {max}")]
    TooLong {
        /// The node.
        node: String,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The value is not in the node's syntax.
    #[error("{node}: invalid value {shown} (expected {expected})")]
    Syntax {
        /// The node.
        node: String,
        /// The value, escaped and truncated.
        shown: String,
        /// What the node must look like.
        expected: &'static str,
    },
    /// A number outside the node's range.
    #[error("{node}: {value} is outside {min}..={max}")]
    OutOfRange {
        /// The node.
        node: String,
        /// The value.
        value: u64,
        /// Smallest valid value.
        min: u64,
        /// Largest valid value.
        max: u64,
    },
}

impl NodeError {
    /// The errno a `xenbus_dev_fatal` for this error reports (ENOENT, ERANGE or EINVAL).
    pub fn errno(&self) -> i32 {
        match self {
            NodeError::Missing { .. } => libc::ENOENT,
            NodeError::TooLong { .. } | NodeError::OutOfRange { .. } => libc::ERANGE,
            NodeError::Empty { .. } | NodeError::Syntax { .. } => libc::EINVAL,
        }
    }
}

/// `value` escaped for a log or an error node, at most its first 32 bytes.
pub fn shown(value: &[u8]) -> String {
    let head = &value[..value.len().min(SHOWN_BYTES)];
    let mut s = format!("\"{}\"", head.escape_ascii());
    if value.len() > SHOWN_BYTES {
        s.push_str(&format!("... ({} bytes)", value.len()));
    }
    s
}

fn syntax(node: &str, value: &[u8], expected: &'static str) -> NodeError {
    NodeError::Syntax { node: node.to_string(), shown: shown(value), expected }
}

/// Check `value` is non-empty and at most `max` bytes.
fn bounded<'a>(node: &str, value: &'a [u8], max: usize) -> Result<&'a [u8], NodeError> {
    if value.is_empty() {
        return Err(NodeError::Empty { node: node.to_string() });
    }
    if value.len() > max {
        return Err(NodeError::TooLong { node: node.to_string(), len: value.len(), max });
    }
    Ok(value)
}

/// A decimal number: ASCII digits only (at most 20), no sign, no whitespace, within `min..=max`.
pub fn parse_decimal(node: &str, value: &[u8], min: u64, max: u64) -> Result<u64, NodeError> {
    let digits = bounded(node, value, 20)?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return Err(syntax(node, value, "a decimal number"));
    }
    let mut n: u64 = 0;
    for &d in digits {
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(d - b'0')))
            .ok_or_else(|| syntax(node, value, "a decimal number below 2^64"))?;
    }
    if n < min || n > max {
        return Err(NodeError::OutOfRange { node: node.to_string(), value: n, min, max });
    }
    Ok(n)
}

/// A decimal `u32` within `min..=max`.
pub fn parse_u32(node: &str, value: &[u8], min: u32, max: u32) -> Result<u32, NodeError> {
    let n = parse_decimal(node, value, u64::from(min), u64::from(max))?;
    // In range by the check above.
    Ok(u32::try_from(n).unwrap_or(max))
}

/// A boolean written as a decimal number (`xenbus_read_unsigned`): 0 is false, anything else true.
pub fn parse_flag(node: &str, value: &[u8]) -> Result<bool, NodeError> {
    Ok(parse_decimal(node, value, 0, u64::from(u32::MAX))? != 0)
}

/// Hex digits only, at most `max_digits`, parsed completely.
fn parse_hex(value: &[u8], max_digits: usize) -> Option<u64> {
    if value.is_empty() || value.len() > max_digits || value.len() > 16 {
        return None;
    }
    value.iter().try_fold(0u64, |acc, &d| Some((acc << 4) | u64::from(char::from(d).to_digit(16)?)))
}

// ---------------------------------------------------------------------------------------------------------------
// diskseq

/// Why a `diskseq` node was refused; messages and errnos are the seed's (`xen-blkback: Implement diskseq checks`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DiskseqError {
    /// The node exists but is empty (`-EFAULT`).
    #[error("diskseq must not be empty")]
    Empty,
    /// More than 16 characters (`-ERANGE`).
    #[error("diskseq too long: got {0} but limit is 16")]
    TooLong(usize),
    /// Starts with `0`: no leading zeros, and 0 is never a disk's sequence number (`-ERANGE`).
    #[error("diskseq must not start with '0'")]
    LeadingZero,
    /// Not entirely hex digits (`-EINVAL`).
    #[error("invalid diskseq")]
    Invalid,
}

impl DiskseqError {
    /// The errno the seed reports with this error.
    pub fn errno(self) -> i32 {
        match self {
            DiskseqError::Empty => libc::EFAULT,
            DiskseqError::TooLong(_) | DiskseqError::LeadingZero => libc::ERANGE,
            DiskseqError::Invalid => libc::EINVAL,
        }
    }
}

/// Parse the `diskseq` node exactly as the seed does: absent means no pin; present must be non-empty, at most 16
/// characters, not start with `0`, and be hex digits to its end. The result is never 0.
pub fn parse_diskseq(value: Option<&[u8]>) -> Result<Option<u64>, DiskseqError> {
    let Some(value) = value else { return Ok(None) };
    if value.is_empty() {
        return Err(DiskseqError::Empty);
    }
    if value.len() > DISKSEQ_MAX_DIGITS {
        return Err(DiskseqError::TooLong(value.len()));
    }
    if value[0] == b'0' {
        return Err(DiskseqError::LeadingZero);
    }
    parse_hex(value, DISKSEQ_MAX_DIGITS).map(Some).ok_or(DiskseqError::Invalid)
}

// ---------------------------------------------------------------------------------------------------------------
// backend nodes written by the toolstack and the hotplug script

/// A block device number from `physical-device` (`major:minor` in hex, as Linux's hotplug scripts write it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PhysicalDevice {
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

impl std::fmt::Display for PhysicalDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}:{:x}", self.major, self.minor)
    }
}

/// Parse `physical-device`: `major:minor`, each 1..=8 hex digits, major 1..=0xfff, minor ≤ 0xfffff.
pub fn parse_physical_device(value: &[u8]) -> Result<PhysicalDevice, NodeError> {
    const NODE: &str = "physical-device";
    const EXPECTED: &str = "major:minor in hex";
    let value = bounded(NODE, value, 17)?;
    let Some(colon) = value.iter().position(|&b| b == b':') else {
        return Err(syntax(NODE, value, EXPECTED));
    };
    let (major, minor) = (&value[..colon], &value[colon + 1..]);
    let (Some(major), Some(minor)) = (parse_hex(major, 8), parse_hex(minor, 8)) else {
        return Err(syntax(NODE, value, EXPECTED));
    };
    if major == 0 || major > u64::from(MAX_MAJOR) {
        return Err(NodeError::OutOfRange { node: NODE.into(), value: major, min: 1, max: MAX_MAJOR.into() });
    }
    if minor > u64::from(MAX_MINOR) {
        return Err(NodeError::OutOfRange { node: NODE.into(), value: minor, min: 0, max: MAX_MINOR.into() });
    }
    // Both fit in u32 by the bounds above.
    Ok(PhysicalDevice { major: u32::try_from(major).unwrap_or(0), minor: u32::try_from(minor).unwrap_or(0) })
}

/// The access `mode` node grants the frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `r`.
    ReadOnly,
    /// `w` (libxl), also `rw` and xend's forced `w!`.
    ReadWrite,
}

/// Parse `mode`: `r`, `ro`, `w`, `rw` or `w!`.
pub fn parse_mode(value: &[u8]) -> Result<Mode, NodeError> {
    match bounded("mode", value, 2)? {
        b"r" | b"ro" => Ok(Mode::ReadOnly),
        b"w" | b"rw" | b"w!" => Ok(Mode::ReadWrite),
        other => Err(syntax("mode", other, "r or w")),
    }
}

/// Parse `params` into the path of the backing file or device.
///
/// Accepts an absolute path, optionally prefixed by `aio:` or `raw:` (libxl's qdisk spelling for raw images); any
/// other `format:` prefix (qcow2, vhd, ...) is refused: this backend serves raw data only.
pub fn parse_params(value: &[u8]) -> Result<PathBuf, NodeError> {
    const NODE: &str = "params";
    let value = bounded(NODE, value, libc::PATH_MAX as usize)?;
    if value.contains(&0) {
        return Err(syntax(NODE, value, "a path without NUL bytes"));
    }
    let path = match value.iter().position(|&b| b == b'/') {
        Some(0) => value,
        Some(slash) if value[slash - 1] == b':' => match &value[..slash - 1] {
            b"aio" | b"raw" => &value[slash..],
            _ => return Err(syntax(NODE, value, "a raw image or device (aio: or raw: prefix only)")),
        },
        _ => return Err(syntax(NODE, value, "an absolute path")),
    };
    Ok(PathBuf::from(OsStr::from_bytes(path)))
}

/// Parse a `frontend` node: an absolute xenstore path of allowed characters.
pub fn parse_xenstore_path(node: &str, value: &[u8]) -> Result<String, NodeError> {
    let value = bounded(node, value, XENSTORE_ABS_PATH_MAX)?;
    let valid_char = |b: &u8| b.is_ascii_alphanumeric() || b"-/_@".contains(b);
    if value[0] != b'/'
        || !value.iter().all(valid_char)
        || value.ends_with(b"/")
        || value.windows(2).any(|w| w == b"//")
    {
        return Err(syntax(node, value, "an absolute xenstore path"));
    }
    Ok(String::from_utf8_lossy(value).into_owned())
}

/// Parse a domain id (`frontend-id`, or the `<domid>` of a backend path): decimal below `DOMID_FIRST_RESERVED`.
pub fn parse_domid(node: &str, value: &[u8]) -> Result<DomId, NodeError> {
    let n = parse_decimal(node, value, 0, u64::from(DOMID_FIRST_RESERVED) - 1)?;
    Ok(DomId::try_from(n).unwrap_or(0))
}

/// Parse the `online` node: like Linux's `xenbus_dev_is_online`, absent or unreadable means offline.
pub fn parse_online(value: Option<&[u8]>) -> bool {
    value.and_then(|v| parse_decimal("online", v, 0, u64::from(u32::MAX)).ok()).is_some_and(|n| n != 0)
}

// ---------------------------------------------------------------------------------------------------------------
// frontend nodes

/// Parse `ring-page-order`: 0..=`max_order`.
pub fn parse_ring_page_order(value: &[u8], max_order: u32) -> Result<u32, NodeError> {
    parse_u32("ring-page-order", value, 0, max_order)
}

/// Parse a `ring-ref` / `ring-refN` node (a grant reference, decimal). `node` names it in errors.
pub fn parse_ring_ref(node: &str, value: &[u8]) -> Result<GrantRef, NodeError> {
    parse_u32(node, value, 0, u32::MAX)
}

/// Parse an `event-channel` node: a decimal port, never 0 (port 0 is reserved in every Xen event-channel ABI).
pub fn parse_event_channel(node: &str, value: &[u8]) -> Result<EvtchnPort, NodeError> {
    parse_u32(node, value, 1, u32::MAX)
}

/// Parse `protocol` (absent: x86_32, as blkif.h specifies).
pub fn parse_protocol(value: Option<&[u8]>) -> Result<BlkifAbi, NodeError> {
    if let Some(v) = value {
        bounded("protocol", v, PROTOCOL_MAX_LEN)?;
    }
    BlkifAbi::from_protocol_node(value)
        .map_err(|_| syntax("protocol", value.unwrap_or_default(), "x86_64-abi or x86_32-abi"))
}

/// Parse `multi-queue-num-queues` (absent: 1) against the `max` the backend advertised.
pub fn parse_num_queues(value: Option<&[u8]>, max: u32) -> Result<u32, NodeError> {
    match value {
        None => Ok(1),
        Some(v) => parse_u32("multi-queue-num-queues", v, 1, max.max(1)),
    }
}

#[cfg(test)]
#[path = "nodes_tests.rs"]
mod tests;
