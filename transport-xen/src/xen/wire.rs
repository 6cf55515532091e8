// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The xenstore wire protocol (Xen's `public/io/xs_wire.h`): message framing and payload codecs.
//!
//! A message is a `struct xsd_sockmsg` header (`type`, `req_id`, `tx_id`, `len`: four host-endian `u32`) followed
//! by `len` payload bytes, at most [`XENSTORE_PAYLOAD_MAX`]. Requests carry NUL-terminated strings; replies echo
//! the request's `type`, `req_id` and `tx_id`, or have type [`MsgType::ERROR`] and an errno name such as `ENOENT`.
//! Watch events ([`MsgType::WATCH_EVENT`]) arrive unsolicited, interleaved with replies, and carry `path\0token\0`.
//!
//! Everything here is pure (no I/O) so it can be tested and fuzzed on bytes. Every length and string that comes
//! from the peer is bounded and checked; nothing panics on garbage.

use crate::services::{DomId, PermAccess, Permission, WatchEvent};

/// Size of the message header.
pub const HEADER_LEN: usize = 16;
/// Largest payload in either direction (`XENSTORE_PAYLOAD_MAX`).
pub const XENSTORE_PAYLOAD_MAX: usize = 4096;
/// Largest request payload we send: Linux's `/dev/xen/xenbus` buffers header and payload in `XENSTORE_PAYLOAD_MAX`
/// bytes, so the device accepts 16 bytes less than the socket; we use the smaller limit on both.
pub const REQUEST_PAYLOAD_MAX: usize = XENSTORE_PAYLOAD_MAX - HEADER_LEN;
/// Longest absolute path (`XENSTORE_ABS_PATH_MAX`).
pub const XENSTORE_ABS_PATH_MAX: usize = 3072;

/// A message type (`enum xsd_sockmsg_type`); unknown values are kept as they are.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MsgType(pub u32);

impl MsgType {
    /// `XS_CONTROL` (`XS_DEBUG`).
    pub const CONTROL: MsgType = MsgType(0);
    /// `XS_DIRECTORY`.
    pub const DIRECTORY: MsgType = MsgType(1);
    /// `XS_READ`.
    pub const READ: MsgType = MsgType(2);
    /// `XS_GET_PERMS`.
    pub const GET_PERMS: MsgType = MsgType(3);
    /// `XS_WATCH`.
    pub const WATCH: MsgType = MsgType(4);
    /// `XS_UNWATCH`.
    pub const UNWATCH: MsgType = MsgType(5);
    /// `XS_TRANSACTION_START`.
    pub const TRANSACTION_START: MsgType = MsgType(6);
    /// `XS_TRANSACTION_END`.
    pub const TRANSACTION_END: MsgType = MsgType(7);
    /// `XS_GET_DOMAIN_PATH`.
    pub const GET_DOMAIN_PATH: MsgType = MsgType(10);
    /// `XS_WRITE`.
    pub const WRITE: MsgType = MsgType(11);
    /// `XS_MKDIR`.
    pub const MKDIR: MsgType = MsgType(12);
    /// `XS_RM`.
    pub const RM: MsgType = MsgType(13);
    /// `XS_SET_PERMS`.
    pub const SET_PERMS: MsgType = MsgType(14);
    /// `XS_WATCH_EVENT`.
    pub const WATCH_EVENT: MsgType = MsgType(15);
    /// `XS_ERROR`.
    pub const ERROR: MsgType = MsgType(16);
    /// `XS_DIRECTORY_PART`.
    pub const DIRECTORY_PART: MsgType = MsgType(22);

    /// The `xs_wire.h` name, or `None` for types this crate does not use.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            MsgType::CONTROL => "XS_CONTROL",
            MsgType::DIRECTORY => "XS_DIRECTORY",
            MsgType::READ => "XS_READ",
            MsgType::GET_PERMS => "XS_GET_PERMS",
            MsgType::WATCH => "XS_WATCH",
            MsgType::UNWATCH => "XS_UNWATCH",
            MsgType::TRANSACTION_START => "XS_TRANSACTION_START",
            MsgType::TRANSACTION_END => "XS_TRANSACTION_END",
            MsgType::GET_DOMAIN_PATH => "XS_GET_DOMAIN_PATH",
            MsgType::WRITE => "XS_WRITE",
            MsgType::MKDIR => "XS_MKDIR",
            MsgType::RM => "XS_RM",
            MsgType::SET_PERMS => "XS_SET_PERMS",
            MsgType::WATCH_EVENT => "XS_WATCH_EVENT",
            MsgType::ERROR => "XS_ERROR",
            MsgType::DIRECTORY_PART => "XS_DIRECTORY_PART",
            _ => return None,
        })
    }
}

impl std::fmt::Debug for MsgType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "XS_TYPE({})", self.0),
        }
    }
}

/// A message header (`struct xsd_sockmsg`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Message type.
    pub ty: MsgType,
    /// Request id, echoed in the reply (garbage in watch events from some kernels: do not trust it there).
    pub req_id: u32,
    /// Transaction id, 0 outside transactions.
    pub tx_id: u32,
    /// Payload length.
    pub len: u32,
}

impl Header {
    /// The 16 wire bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        for (i, v) in [self.ty.0, self.req_id, self.tx_id, self.len].into_iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
        }
        out
    }

    /// Parse 16 wire bytes (no validation of the values).
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Header {
        let word = |i: usize| u32::from_ne_bytes([bytes[i * 4], bytes[i * 4 + 1], bytes[i * 4 + 2], bytes[i * 4 + 3]]);
        Header { ty: MsgType(word(0)), req_id: word(1), tx_id: word(2), len: word(3) }
    }
}

/// A complete message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The header.
    pub header: Header,
    /// The payload (`header.len` bytes).
    pub payload: Vec<u8>,
}

/// Why bytes from the peer are not a valid message or payload.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// A header announced more than [`XENSTORE_PAYLOAD_MAX`] bytes: the stream cannot be trusted any further.
    #[error("message of type {ty:?} announces {len} payload bytes (max {XENSTORE_PAYLOAD_MAX})")]
    Oversized {
        /// The message type.
        ty: MsgType,
        /// The announced length.
        len: u32,
    },
    /// A payload does not have the shape its type requires.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// Which payload.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
}

fn malformed(what: &'static str, detail: impl Into<String>) -> WireError {
    WireError::Malformed { what, detail: detail.into() }
}

/// Encode a complete message; the caller has bounded `payload` (see [`REQUEST_PAYLOAD_MAX`]).
pub fn encode_message(ty: MsgType, req_id: u32, tx_id: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&Header { ty, req_id, tx_id, len }.encode());
    out.extend_from_slice(payload);
    out
}

/// Reassembles messages from a byte stream that arrives in arbitrary pieces.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Set once an oversized header was seen: the stream is out of sync for good.
    poisoned: bool,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Append bytes read from the peer.
    pub fn push(&mut self, bytes: &[u8]) {
        if !self.poisoned {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Bytes held that do not form a complete message yet.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete message, `Ok(None)` if more bytes are needed, or an error (then and forever after) if a
    /// header announces an impossible length.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        let Some(head) = self.buf.first_chunk::<HEADER_LEN>() else {
            return if self.poisoned { Err(self.poison_error()) } else { Ok(None) };
        };
        let header = Header::decode(head);
        let len = header.len as usize;
        if len > XENSTORE_PAYLOAD_MAX || self.poisoned {
            self.poisoned = true;
            return Err(WireError::Oversized { ty: header.ty, len: header.len });
        }
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = self.buf[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.buf.drain(..HEADER_LEN + len);
        Ok(Some(Frame { header, payload }))
    }

    fn poison_error(&self) -> WireError {
        malformed("stream", "out of sync after an oversized message")
    }
}

// --------------------------------------------------------------------------------------------------------------
// request payloads

/// Check a path or token we are about to send: not empty (paths), no NUL, bounded.
pub fn check_request_string(what: &'static str, s: &str, allow_empty: bool) -> Result<(), WireError> {
    if s.is_empty() && !allow_empty {
        return Err(malformed(what, "empty"));
    }
    if s.as_bytes().contains(&0) {
        return Err(malformed(what, "contains a NUL byte"));
    }
    if s.len() > XENSTORE_ABS_PATH_MAX {
        return Err(malformed(what, format!("{} bytes (max {XENSTORE_ABS_PATH_MAX})", s.len())));
    }
    Ok(())
}

/// Join NUL-terminated strings, then append `tail` unterminated (the `XS_WRITE` value).
pub fn join_payload(strings: &[&[u8]], tail: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(strings.iter().map(|s| s.len() + 1).sum::<usize>() + tail.len());
    for s in strings {
        out.extend_from_slice(s);
        out.push(0);
    }
    out.extend_from_slice(tail);
    out
}

/// The wire form of one permission: `n`/`r`/`w`/`b` followed by the domain id, e.g. `b0`, `r5`.
pub fn format_permission(p: &Permission) -> String {
    let c = match p.access {
        PermAccess::None => 'n',
        PermAccess::Read => 'r',
        PermAccess::Write => 'w',
        PermAccess::Both => 'b',
    };
    format!("{c}{}", p.domid)
}

/// The `XS_SET_PERMS` payload: `path\0perm\0perm\0...`.
pub fn set_perms_payload(path: &str, perms: &[Permission]) -> Vec<u8> {
    let strings: Vec<String> = perms.iter().map(format_permission).collect();
    let mut parts: Vec<&[u8]> = vec![path.as_bytes()];
    parts.extend(strings.iter().map(|s| s.as_bytes()));
    join_payload(&parts, b"")
}

// --------------------------------------------------------------------------------------------------------------
// reply payloads

/// Split a payload into its NUL-terminated strings; a missing final NUL ends the last string at the payload end.
fn split_strings(payload: &[u8]) -> impl Iterator<Item = &[u8]> {
    let body = payload.strip_suffix(&[0]).unwrap_or(payload);
    body.split(|&b| b == 0).filter(move |_| !payload.is_empty())
}

/// The first NUL-terminated string of a payload (or all of it if there is no NUL).
fn first_string(payload: &[u8]) -> &[u8] {
    payload.split(|&b| b == 0).next().unwrap_or(payload)
}

/// A reply that must be `OK` (write, mkdir, rm, set_perms, watch, unwatch, transaction end).
pub fn parse_ok(payload: &[u8]) -> Result<(), WireError> {
    match payload {
        b"OK\0" | b"OK" => Ok(()),
        other => Err(malformed("OK reply", printable(other, 32))),
    }
}

/// The errno name of an `XS_ERROR` reply, mapped to its number; `Err` carries the (sanitized) unknown name.
pub fn parse_error(payload: &[u8]) -> Result<i32, String> {
    let name = first_string(payload);
    errno_from_name(name).ok_or_else(|| printable(name, 32))
}

/// The errno names `xs_wire.h` defines.
pub fn errno_from_name(name: &[u8]) -> Option<i32> {
    Some(match name {
        b"EINVAL" => libc::EINVAL,
        b"EACCES" => libc::EACCES,
        b"EEXIST" => libc::EEXIST,
        b"EISDIR" => libc::EISDIR,
        b"ENOENT" => libc::ENOENT,
        b"ENOMEM" => libc::ENOMEM,
        b"ENOSPC" => libc::ENOSPC,
        b"EIO" => libc::EIO,
        b"ENOTEMPTY" => libc::ENOTEMPTY,
        b"ENOSYS" => libc::ENOSYS,
        b"EROFS" => libc::EROFS,
        b"EBUSY" => libc::EBUSY,
        b"EAGAIN" => libc::EAGAIN,
        b"EISCONN" => libc::EISCONN,
        b"E2BIG" => libc::E2BIG,
        _ => return None,
    })
}

/// Whether `name` is a valid xenstore node name (one path element): xenstored allows `[A-Za-z0-9_@-]`.
pub fn is_valid_node_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= XENSTORE_ABS_PATH_MAX
        && name.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'@'))
}

/// An `XS_DIRECTORY` reply: the valid child names, and how many entries were skipped as invalid (empty, not
/// UTF-8, or with characters xenstored never allows in a name, such as `/` or `.`).
pub fn parse_directory(payload: &[u8]) -> (Vec<String>, usize) {
    let mut names = Vec::new();
    let mut skipped = 0;
    for name in split_strings(payload) {
        if is_valid_node_name(name) {
            // Valid names are ASCII, hence UTF-8.
            names.push(String::from_utf8_lossy(name).into_owned());
        } else {
            skipped += 1;
        }
    }
    (names, skipped)
}

/// One permission string (`b0`, `r5`, `n7`, `w65535`).
pub fn parse_permission(s: &[u8]) -> Result<Permission, WireError> {
    let (&c, digits) = s.split_first().ok_or_else(|| malformed("permission", "empty"))?;
    let access = match c {
        b'n' => PermAccess::None,
        b'r' => PermAccess::Read,
        b'w' => PermAccess::Write,
        b'b' => PermAccess::Both,
        _ => return Err(malformed("permission", printable(s, 16))),
    };
    let domid =
        parse_decimal(digits, u32::from(DomId::MAX)).ok_or_else(|| malformed("permission", printable(s, 16)))?;
    let domid = DomId::try_from(domid).map_err(|_| malformed("permission", printable(s, 16)))?;
    Ok(Permission { domid, access })
}

/// An `XS_GET_PERMS` reply: at least one permission (the owner's).
pub fn parse_perms(payload: &[u8]) -> Result<Vec<Permission>, WireError> {
    let perms = split_strings(payload).map(parse_permission).collect::<Result<Vec<_>, _>>()?;
    if perms.is_empty() {
        return Err(malformed("permissions", "empty list"));
    }
    Ok(perms)
}

/// An `XS_TRANSACTION_START` reply: a non-zero decimal transaction id.
pub fn parse_tx_id(payload: &[u8]) -> Result<u32, WireError> {
    let digits = first_string(payload);
    match parse_decimal(digits, u32::MAX) {
        Some(0) | None => Err(malformed("transaction id", printable(digits, 16))),
        Some(id) => Ok(id),
    }
}

/// An `XS_WATCH_EVENT` payload: `path\0token\0` (anything after the token is ignored). A path that is not UTF-8
/// is converted lossily (xenstored never produces one; the consumer re-reads state anyway); a token must be UTF-8
/// because we chose it.
pub fn parse_watch_event(payload: &[u8]) -> Result<WatchEvent, WireError> {
    let mut parts = payload.splitn(3, |&b| b == 0);
    let path = parts.next().unwrap_or_default();
    let token = parts.next().ok_or_else(|| malformed("watch event", "no token"))?;
    if parts.next().is_none() {
        return Err(malformed("watch event", "token not NUL-terminated"));
    }
    if path.is_empty() {
        return Err(malformed("watch event", "empty path"));
    }
    let token = std::str::from_utf8(token).map_err(|_| malformed("watch event", "token is not UTF-8"))?;
    Ok(WatchEvent { path: String::from_utf8_lossy(path).into_owned(), token: token.to_owned() })
}

/// Decimal digits only (no sign, no spaces), at most `max`.
fn parse_decimal(digits: &[u8], max: u32) -> Option<u32> {
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let value = digits.iter().try_fold(0u64, |acc, &d| Some(acc * 10 + u64::from(d - b'0')))?;
    u32::try_from(value).ok().filter(|&v| v <= max)
}

/// Peer bytes made safe to log: at most `max` bytes, non-printable bytes escaped.
pub fn printable(bytes: &[u8], max: usize) -> String {
    let mut s: String = bytes.iter().take(max).flat_map(|&b| std::ascii::escape_default(b)).map(char::from).collect();
    if bytes.len() > max {
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_bytes(ty: MsgType, req_id: u32, payload: &[u8]) -> Vec<u8> {
        encode_message(ty, req_id, 0, payload)
    }

    #[test]
    fn header_roundtrip() {
        let h = Header { ty: MsgType::WRITE, req_id: 7, tx_id: 3, len: 12 };
        assert_eq!(Header::decode(&h.encode()), h);
        let bytes = encode_message(MsgType::READ, 1, 2, b"/a\0");
        assert_eq!(bytes.len(), HEADER_LEN + 3);
        assert_eq!(&bytes[..4], &2u32.to_ne_bytes());
        assert_eq!(&bytes[12..16], &3u32.to_ne_bytes());
    }

    #[test]
    fn decoder_reassembles_byte_by_byte_and_batched() {
        let mut stream = frame_bytes(MsgType::READ, 1, b"value");
        stream.extend(frame_bytes(MsgType::WATCH_EVENT, 0, b"/a\0tok\0"));
        stream.extend(frame_bytes(MsgType::WRITE, 2, b"OK\0"));
        let mut dec = FrameDecoder::new();
        let mut frames = Vec::new();
        for b in &stream {
            dec.push(std::slice::from_ref(b));
            while let Some(f) = dec.next_frame().expect("valid stream") {
                frames.push(f);
            }
        }
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0].payload, b"value");
        assert_eq!(frames[1].header.ty, MsgType::WATCH_EVENT);
        assert_eq!(frames[2].header.req_id, 2);
        assert_eq!(dec.buffered(), 0);

        let mut dec = FrameDecoder::new();
        dec.push(&stream);
        let n = std::iter::from_fn(|| dec.next_frame().expect("valid")).count();
        assert_eq!(n, 3);
    }

    #[test]
    fn decoder_rejects_oversized_and_stays_poisoned() {
        let mut dec = FrameDecoder::new();
        let h = Header { ty: MsgType::READ, req_id: 1, tx_id: 0, len: 4097 };
        dec.push(&h.encode());
        assert!(matches!(dec.next_frame(), Err(WireError::Oversized { len: 4097, .. })));
        dec.push(&frame_bytes(MsgType::READ, 2, b"x"));
        assert!(dec.next_frame().is_err());
        // The maximum itself is fine.
        let mut dec = FrameDecoder::new();
        dec.push(&frame_bytes(MsgType::READ, 1, &[b'x'; XENSTORE_PAYLOAD_MAX]));
        assert_eq!(dec.next_frame().expect("ok").expect("frame").payload.len(), XENSTORE_PAYLOAD_MAX);
        let h = Header { ty: MsgType::READ, req_id: 1, tx_id: 0, len: u32::MAX };
        let mut dec = FrameDecoder::new();
        dec.push(&h.encode());
        assert!(dec.next_frame().is_err());
    }

    #[test]
    fn truncated_message_waits_for_more() {
        let bytes = frame_bytes(MsgType::READ, 1, b"abc");
        let mut dec = FrameDecoder::new();
        dec.push(&bytes[..HEADER_LEN + 1]);
        assert_eq!(dec.next_frame(), Ok(None));
        dec.push(&bytes[HEADER_LEN + 1..]);
        assert!(dec.next_frame().expect("ok").is_some());
    }

    #[test]
    fn ok_and_error_replies() {
        assert!(parse_ok(b"OK\0").is_ok());
        assert!(parse_ok(b"OK").is_ok());
        assert!(parse_ok(b"NO\0").is_err());
        assert!(parse_ok(b"").is_err());
        assert_eq!(parse_error(b"ENOENT\0"), Ok(libc::ENOENT));
        assert_eq!(parse_error(b"EAGAIN"), Ok(libc::EAGAIN));
        assert_eq!(parse_error(b"E2BIG\0junk"), Ok(libc::E2BIG));
        assert_eq!(parse_error(b"EQUOTA\0"), Err("EQUOTA".to_owned()));
        assert_eq!(parse_error(b"\xff\x01\0"), Err("\\xff\\x01".to_owned()));
    }

    #[test]
    fn directory_replies() {
        assert_eq!(parse_directory(b""), (vec![], 0));
        assert_eq!(parse_directory(b"0\0"), (vec!["0".to_owned()], 0));
        assert_eq!(parse_directory(b"a\0b-c\0d_e@f\0"), (vec!["a".into(), "b-c".into(), "d_e@f".into()], 0));
        // Unterminated last name, empty entries, traversal and non-UTF-8 names.
        let (names, skipped) = parse_directory(b"a\0\0..\0x/y\0\xff\xfe\0last");
        assert_eq!(names, vec!["a".to_owned(), "last".to_owned()]);
        assert_eq!(skipped, 4);
    }

    #[test]
    fn permissions() {
        let perms = parse_perms(b"b0\0r5\0n7\0w65535\0").expect("valid");
        assert_eq!(
            perms,
            vec![
                Permission { domid: 0, access: PermAccess::Both },
                Permission { domid: 5, access: PermAccess::Read },
                Permission { domid: 7, access: PermAccess::None },
                Permission { domid: 65535, access: PermAccess::Write },
            ]
        );
        assert_eq!(set_perms_payload("/p", &perms), b"/p\0b0\0r5\0n7\0w65535\0");
        for bad in [&b""[..], b"\0", b"x0\0", b"b\0", b"b-1\0", b"b65536\0", b"b 1\0", b"b99999999999\0"] {
            assert!(parse_perms(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn transaction_ids() {
        assert_eq!(parse_tx_id(b"17\0"), Ok(17));
        assert_eq!(parse_tx_id(b"4294967295"), Ok(u32::MAX));
        for bad in [&b"0\0"[..], b"", b"-1\0", b"4294967296\0", b"12a\0", b" 1\0"] {
            assert!(parse_tx_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn watch_events() {
        let ev = parse_watch_event(b"/local/domain/1\0tok\0").expect("valid");
        assert_eq!(ev, WatchEvent { path: "/local/domain/1".into(), token: "tok".into() });
        assert!(parse_watch_event(b"/a\0tok\0extra").is_ok());
        assert!(parse_watch_event(b"/a\0tok").is_err());
        assert!(parse_watch_event(b"/a").is_err());
        assert!(parse_watch_event(b"\0tok\0").is_err());
        assert!(parse_watch_event(b"/a\0\xff\0").is_err());
        assert_eq!(parse_watch_event(b"/a\xff\0t\0").expect("lossy path").path, "/a\u{fffd}");
    }

    #[test]
    fn request_strings() {
        assert!(check_request_string("path", "/a/b", false).is_ok());
        assert!(check_request_string("path", "", false).is_err());
        assert!(check_request_string("token", "", true).is_ok());
        assert!(check_request_string("path", "/a\0b", false).is_err());
        assert!(check_request_string("path", &"a".repeat(XENSTORE_ABS_PATH_MAX + 1), false).is_err());
        assert_eq!(join_payload(&[b"/p", b"t"], b""), b"/p\0t\0");
        assert_eq!(join_payload(&[b"/p"], b"v"), b"/p\0v");
    }

    #[test]
    fn printable_bounds_and_escapes() {
        assert_eq!(printable(b"abc", 2), "ab...");
        assert_eq!(printable(b"a\nb", 8), "a\\nb");
    }
}
