// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The xenstore reply and watch-event payload parsers of `transport_xen::xen::wire`, all run on the same bytes.
//!
//! Layout: the payload itself.
//!
//! Invariants: `OK` is accepted in its two spellings only; errno names map to their numbers; directory entries
//! are valid node names that survive a re-encode; permissions, transaction ids and watch events re-encode to
//! something that parses to the same value; escaped text is bounded and printable.

use transport_xen::services::WatchEvent;
use transport_xen::xen::wire::{
    check_request_string, errno_from_name, format_permission, is_valid_node_name, join_payload, parse_directory,
    parse_error, parse_ok, parse_permission, parse_perms, parse_tx_id, parse_watch_event, printable, set_perms_payload,
    XENSTORE_ABS_PATH_MAX,
};

fn assert_printable(s: &str, max: usize, input_len: usize) {
    assert!(s.bytes().all(|b| (0x20..0x7f).contains(&b)), "unprintable escape {s:?}");
    assert!(s.len() <= max * 4 + 3, "escape of {input_len} bytes is {} bytes long", s.len());
}

/// Run one input.
pub fn run(payload: &[u8]) {
    assert_eq!(parse_ok(payload).is_ok(), payload == b"OK" || payload == b"OK\0");

    let first = payload.split(|&b| b == 0).next().unwrap_or_default();
    match parse_error(payload) {
        Ok(errno) => assert_eq!(errno_from_name(first), Some(errno)),
        Err(name) => {
            assert_eq!(errno_from_name(first), None);
            assert_printable(&name, 32, first.len());
        }
    }

    let (names, skipped) = parse_directory(payload);
    let body = payload.strip_suffix(&[0]).unwrap_or(payload);
    let entries = if payload.is_empty() { 0 } else { body.split(|&b| b == 0).count() };
    assert_eq!(names.len() + skipped, entries, "every directory entry is either a name or skipped");
    for name in &names {
        assert!(is_valid_node_name(name.as_bytes()), "invalid name {name:?} accepted");
    }
    let parts: Vec<&[u8]> = names.iter().map(|n| n.as_bytes()).collect();
    assert_eq!(parse_directory(&join_payload(&parts, b"")), (names.clone(), 0), "directory re-encode");

    if let Ok(perms) = parse_perms(payload) {
        assert!(!perms.is_empty());
        let encoded = set_perms_payload("/p", &perms);
        let reparsed = parse_perms(&encoded[3..]).expect("re-encoded permissions parse");
        assert_eq!(reparsed, perms);
        for p in &perms {
            assert_eq!(parse_permission(format_permission(p).as_bytes()).as_ref(), Ok(p));
        }
    }
    if let Ok(p) = parse_permission(first) {
        assert_eq!(parse_permission(format_permission(&p).as_bytes()), Ok(p));
    }

    if let Ok(id) = parse_tx_id(payload) {
        assert_ne!(id, 0, "transaction id 0 accepted");
        assert!(first.len() <= 10 && first.iter().all(u8::is_ascii_digit));
        assert_eq!(parse_tx_id(format!("{id}\0").as_bytes()), Ok(id));
    }

    if let Ok(WatchEvent { path, token }) = parse_watch_event(payload) {
        assert!(!path.is_empty(), "empty watch path accepted");
        assert!(!path.contains('\0') && !token.contains('\0'));
        let again = join_payload(&[path.as_bytes(), token.as_bytes()], b"");
        assert_eq!(parse_watch_event(&again), Ok(WatchEvent { path: path.clone(), token: token.clone() }));
        assert_eq!(check_request_string("path", &path, false).is_ok(), path.len() <= XENSTORE_ABS_PATH_MAX);
    }

    let valid = !payload.is_empty()
        && payload.len() <= XENSTORE_ABS_PATH_MAX
        && payload.iter().all(|&b| b.is_ascii_alphanumeric() || b"-_@".contains(&b));
    assert_eq!(is_valid_node_name(payload), valid);

    if let Ok(s) = std::str::from_utf8(payload) {
        let ok = !s.contains('\0') && s.len() <= XENSTORE_ABS_PATH_MAX;
        assert_eq!(check_request_string("token", s, true).is_ok(), ok);
        assert_eq!(check_request_string("path", s, false).is_ok(), ok && !s.is_empty());
    }

    for max in [0, 1, 16, 64] {
        assert_printable(&printable(payload, max), max, payload.len());
    }
}

/// Seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    [
        &b"OK\0"[..],
        b"ENOENT\0",
        b"EAGAIN",
        b"EQUOTA\0",
        b"0\x0051712\0backend\0feature-persistent\0",
        b"a\0\0..\0x/y\0\xff\xfe\0last",
        b"b0\0r5\0n7\0w65535\0",
        b"b65536\0",
        b"17\0",
        b"4294967295",
        b"/local/domain/0/backend/vbd/7/51712/state\0be-7-51712\0",
        b"/a\0tok",
        b"\0tok\0",
    ]
    .iter()
    .map(|s| s.to_vec())
    .collect()
}
