// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The xenstore node parsers (`transport_xen::xenbus::nodes`): `diskseq`, `physical-device`, `mode`, `params`,
//! paths, domain ids, `online`, `ring-page-order`, `ring-ref*`, `event-channel*`, `protocol` (and
//! `BlkifAbi::from_protocol_node`), `multi-queue-num-queues`, `state`, numbers and flags; the device-node
//! interpretation (`xenbus::device::interpret`); and `device_blk::disk::parse_diskseq_arg`.
//!
//! Layout: `u8` parameter (limits for the bounded parsers, which nodes exist for `interpret`), then the value.
//! For `interpret` the value is split at NUL bytes into `physical-device`, `diskseq`, `params` and `mode`.
//!
//! Invariants: each parser accepts exactly its one spelling (checked against an independent model or by
//! re-formatting the result and parsing again), bounds its result, and reports an errno of its documented set
//! with a bounded message; `interpret` agrees with the parsers it is built on.

use transport_xen::connect::BlkifAbi;
use transport_xen::xenbus::device::{interpret, DeviceNodes, DeviceRequest, DeviceSource};
use transport_xen::xenbus::nodes::{
    self, parse_decimal, parse_diskseq, parse_domid, parse_event_channel, parse_flag, parse_mode, parse_num_queues,
    parse_online, parse_params, parse_physical_device, parse_protocol, parse_ring_page_order, parse_ring_ref,
    parse_u32, parse_xenstore_path, shown, DiskseqError, Mode, NodeError, DOMID_FIRST_RESERVED, MAX_MAJOR, MAX_MINOR,
};
use transport_xen::xenbus::XenbusState;

use crate::input::Writer;

fn decimal_model(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 20 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = v.iter().fold(0u128, |acc, &d| acc * 10 + u128::from(d - b'0'));
    u64::try_from(n).ok()
}

/// Counts the bytes of a formatted message, up to a bound (no allocation: this runs for most inputs).
struct Bounded(usize);

impl std::fmt::Write for Bounded {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0 += s.len();
        if self.0 > 300 {
            Err(std::fmt::Error)
        } else {
            Ok(())
        }
    }
}

fn check_error(e: &NodeError, v: &[u8]) {
    use std::fmt::Write;
    assert!(matches!(e.errno(), libc::ENOENT | libc::ERANGE | libc::EINVAL), "{e:?}");
    let mut len = Bounded(0);
    let _ = write!(len, "{e}");
    assert!(len.0 <= 300, "unbounded error message for a {}-byte value", v.len());
}

/// Run one input.
pub fn run(data: &[u8]) {
    let (param, v) = data.split_first().map_or((0, &[][..]), |(p, v)| (*p, v));

    let model = decimal_model(v);
    let (lo, hi) = (u64::from(param), u64::from(param) * 1000);
    match parse_decimal("n", v, lo, hi) {
        Ok(n) => assert!(model == Some(n) && (lo..=hi).contains(&n)),
        Err(e) => {
            check_error(&e, v);
            assert!(model.is_none_or(|n| !(lo..=hi).contains(&n)));
        }
    }
    assert_eq!(parse_decimal("n", v, 0, u64::MAX).ok(), model);
    let max = u32::from(param).max(1);
    if let Ok(n) = parse_u32("n", v, 1, max) {
        assert!((1..=max).contains(&n));
    }
    let as_u32 = model.filter(|&n| n <= u64::from(u32::MAX));
    assert_eq!(parse_flag("f", v).ok(), as_u32.map(|n| n != 0));
    assert_eq!(parse_online(Some(v)), as_u32.is_some_and(|n| n != 0));
    assert!(!parse_online(None));
    assert_eq!(parse_ring_ref("ring-ref", v).ok(), as_u32.map(|n| n as u32));
    assert_eq!(parse_event_channel("event-channel", v).ok(), as_u32.filter(|&n| n != 0).map(|n| n as u32));
    let order_max = u32::from(param % 8);
    assert_eq!(
        parse_ring_page_order(v, order_max).ok(),
        as_u32.filter(|&n| n <= u64::from(order_max)).map(|n| n as u32)
    );
    let queues = parse_num_queues(Some(v), u32::from(param));
    assert_eq!(
        queues.as_ref().ok().copied(),
        as_u32.filter(|&n| n >= 1 && n <= u64::from(param.max(1))).map(|n| n as u32)
    );
    assert_eq!(parse_num_queues(None, u32::from(param)), Ok(1));
    match parse_domid("frontend-id", v) {
        Ok(d) => assert!(d < DOMID_FIRST_RESERVED && model == Some(u64::from(d))),
        Err(e) => check_error(&e, v),
    }
    match XenbusState::parse(v) {
        Ok(s) => {
            assert!(model.is_some_and(|n| n <= 8));
            assert_eq!(XenbusState::parse(s.as_node().as_bytes()), Ok(s));
        }
        Err(e) => check_error(&e, v),
    }

    assert_eq!(parse_diskseq(None), Ok(None));
    match parse_diskseq(Some(v)) {
        Ok(Some(n)) => {
            assert_ne!(n, 0);
            assert_eq!(format!("{n:x}").as_bytes(), v.to_ascii_lowercase(), "diskseq has one spelling");
        }
        Ok(None) => panic!("a present diskseq parsed as absent"),
        Err(e) => {
            let errno = e.errno();
            assert!(matches!(errno, libc::EFAULT | libc::ERANGE | libc::EINVAL), "{e:?}");
            assert_eq!(e == DiskseqError::Empty, v.is_empty());
        }
    }

    match parse_physical_device(v) {
        Ok(d) => {
            assert!((1..=MAX_MAJOR).contains(&d.major) && d.minor <= MAX_MINOR);
            assert_eq!(parse_physical_device(d.to_string().as_bytes()), Ok(d));
        }
        Err(e) => check_error(&e, v),
    }

    match parse_mode(v) {
        Ok(Mode::ReadOnly) => assert!(v == b"r" || v == b"ro"),
        Ok(Mode::ReadWrite) => assert!(v == b"w" || v == b"rw" || v == b"w!"),
        Err(e) => check_error(&e, v),
    }

    match parse_params(v) {
        Ok(p) => {
            use std::os::unix::ffi::OsStrExt;
            let p = p.as_os_str().as_bytes();
            assert!(p.starts_with(b"/") && !p.contains(&0));
            assert!(v == p || v == [&b"aio:"[..], p].concat() || v == [&b"raw:"[..], p].concat(), "params {v:?}");
        }
        Err(e) => check_error(&e, v),
    }

    match parse_xenstore_path("frontend", v) {
        Ok(s) => {
            assert_eq!(s.as_bytes(), v);
            assert!(s.starts_with('/') && !s.ends_with('/') && !s.contains("//"));
            assert!(transport_xen::xen::wire::check_request_string("path", &s, false).is_ok());
        }
        Err(e) => check_error(&e, v),
    }

    let abi = BlkifAbi::from_protocol_node(Some(v));
    match parse_protocol(Some(v)) {
        Ok(a) => {
            assert_eq!(abi.as_ref().ok(), Some(&a));
            assert!(v == b"x86_64-abi" || v == b"x86_32-abi");
        }
        Err(e) => {
            check_error(&e, v);
            assert!(abi.is_err());
        }
    }
    assert_eq!(parse_protocol(None), Ok(BlkifAbi::X86_32));

    let s = shown(v);
    assert!(s.len() <= 32 * 4 + 2 + 24, "shown() is unbounded");

    if let Ok(text) = std::str::from_utf8(v) {
        if let Ok(n) = device_blk::disk::parse_diskseq_arg(text) {
            assert_ne!(n, 0);
        }
    }

    // interpret(): the nodes named by the parameter bits, values split at NUL bytes.
    let mut parts = v.split(|&b| b == 0).map(<[u8]>::to_vec);
    let mut take = |bit: u8| {
        let value = parts.next().unwrap_or_default();
        (param & bit != 0).then_some(value)
    };
    let device_nodes = DeviceNodes {
        physical_device: take(1),
        diskseq: take(2),
        params: take(4),
        mode: take(8),
        ..Default::default()
    };
    match interpret(&device_nodes) {
        Ok(DeviceRequest::Open { source, mode }) => {
            assert_eq!(device_nodes.mode.as_deref().map(parse_mode), Some(Ok(mode)));
            match source {
                DeviceSource::Physical { device, diskseq } => {
                    let pdev = device_nodes.physical_device.as_deref().expect("physical-device");
                    assert_eq!(parse_physical_device(pdev), Ok(device));
                    assert_eq!(parse_diskseq(device_nodes.diskseq.as_deref()), Ok(diskseq));
                }
                DeviceSource::ImageFile(path) => {
                    assert!(device_nodes.physical_device.is_none() && device_nodes.diskseq.is_none());
                    let params = device_nodes.params.as_deref().expect("params");
                    assert_eq!(parse_params(params).as_ref(), Ok(&path));
                }
            }
        }
        Ok(DeviceRequest::NotYet) => assert!(device_nodes.physical_device.is_none()),
        Err(fatal) => assert!(fatal.errno > 0 && fatal.message.len() <= 400, "{fatal:?}"),
    }
    let _ = nodes::XENSTORE_PAYLOAD_MAX;
}

/// Seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    let one = |param: u8, v: &[u8]| {
        let mut w = Writer::new();
        w.u8(param).bytes(v);
        w.finish()
    };
    vec![
        one(0, b"0"),
        one(4, b"4"),
        one(16, b"18446744073709551615"),
        one(16, b"18446744073709551616"),
        one(0, b"2a"),
        one(0, b"0123"),
        one(0, b"FFFFFFFFFFFFFFFF"),
        one(0, b"fd:3"),
        one(0, b"103:20"),
        one(0, b"7-3"),
        one(0, b"w!"),
        one(0, b"aio:/var/lib/xen/images/disk.img"),
        one(0, b"qcow2:/disk.qcow2"),
        one(0, b"/local/domain/7/device/vbd/51712"),
        one(0, b"x86_64-abi"),
        one(0, b"x86_32-abi"),
        one(0, b"0x2a"),
        one(1 | 2 | 8, b"fd:3\x002a\x00\x00w"),
        one(4 | 8, b"\x00\x00/dev/null\x00r"),
        one(2 | 4 | 8, b"\x005\x00/proc/self/exe\x00w"),
    ]
}
