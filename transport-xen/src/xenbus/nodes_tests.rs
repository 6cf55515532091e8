// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
use proptest::prelude::*;

use super::*;

#[test]
fn diskseq_absent_means_no_pin() {
    assert_eq!(parse_diskseq(None), Ok(None));
}

#[test]
fn diskseq_accepts_hex_in_either_case() {
    assert_eq!(parse_diskseq(Some(b"1")), Ok(Some(1)));
    assert_eq!(parse_diskseq(Some(b"2a")), Ok(Some(42)));
    assert_eq!(parse_diskseq(Some(b"2A")), Ok(Some(42)));
    assert_eq!(parse_diskseq(Some(b"ffffffffffffffff")), Ok(Some(u64::MAX)));
}

#[test]
fn diskseq_error_cases_match_the_seed() {
    // Each of the seed's checks, in its order, with its message and errno.
    let empty = parse_diskseq(Some(b"")).expect_err("empty");
    assert_eq!(empty, DiskseqError::Empty);
    assert_eq!(empty.to_string(), "diskseq must not be empty");
    assert_eq!(empty.errno(), libc::EFAULT);

    let long = parse_diskseq(Some(b"12345678901234567")).expect_err("17 digits");
    assert_eq!(long, DiskseqError::TooLong(17));
    assert_eq!(long.to_string(), "diskseq too long: got 17 but limit is 16");
    assert_eq!(long.errno(), libc::ERANGE);

    let zero = parse_diskseq(Some(b"0")).expect_err("zero");
    assert_eq!(zero, DiskseqError::LeadingZero);
    assert_eq!(zero.to_string(), "diskseq must not start with '0'");
    assert_eq!(zero.errno(), libc::ERANGE);
    assert_eq!(parse_diskseq(Some(b"0x2a")), Err(DiskseqError::LeadingZero));
    assert_eq!(parse_diskseq(Some(b"01")), Err(DiskseqError::LeadingZero));

    let invalid = parse_diskseq(Some(b"12g")).expect_err("not hex");
    assert_eq!(invalid, DiskseqError::Invalid);
    assert_eq!(invalid.to_string(), "invalid diskseq");
    assert_eq!(invalid.errno(), libc::EINVAL);
}

#[test]
fn diskseq_rejects_what_strtoull_would_stop_at() {
    for bad in [&b" 1"[..], b"1 ", b"+1", b"-1", b"1\0", b"1\n", b"\xff", b"1.0", b"x1"] {
        assert_eq!(parse_diskseq(Some(bad)), Err(DiskseqError::Invalid), "{:?}", bad.escape_ascii().to_string());
    }
    // Length is checked before content, as in the seed: a huge non-UTF-8 value is "too long".
    let huge = vec![0xffu8; 1 << 20];
    assert_eq!(parse_diskseq(Some(&huge)), Err(DiskseqError::TooLong(1 << 20)));
}

#[test]
fn physical_device_is_hex_major_minor_within_dev_t() {
    assert_eq!(parse_physical_device(b"7:0"), Ok(PhysicalDevice { major: 7, minor: 0 }));
    assert_eq!(parse_physical_device(b"fd:1a"), Ok(PhysicalDevice { major: 0xfd, minor: 0x1a }));
    assert_eq!(parse_physical_device(b"103:fffff"), Ok(PhysicalDevice { major: 0x103, minor: 0xfffff }));
    assert_eq!(PhysicalDevice { major: 0xfd, minor: 0x1a }.to_string(), "fd:1a");
    for bad in [&b""[..], b":", b"7", b"7:", b":0", b"7:0:1", b"0x7:0", b" 7:0", b"7:0\n", b"-7:0", b"g:0"] {
        assert!(parse_physical_device(bad).is_err(), "{:?}", bad.escape_ascii().to_string());
    }
    assert!(matches!(parse_physical_device(b"0:5"), Err(NodeError::OutOfRange { .. })));
    assert!(matches!(parse_physical_device(b"1000:0"), Err(NodeError::OutOfRange { .. })));
    assert!(matches!(parse_physical_device(b"7:100000"), Err(NodeError::OutOfRange { .. })));
    assert!(matches!(parse_physical_device(&[b'1'; 5000]), Err(NodeError::TooLong { .. })));
}

#[test]
fn mode_and_params() {
    assert_eq!(parse_mode(b"r"), Ok(Mode::ReadOnly));
    assert_eq!(parse_mode(b"w"), Ok(Mode::ReadWrite));
    assert_eq!(parse_mode(b"w!"), Ok(Mode::ReadWrite));
    assert!(parse_mode(b"").is_err());
    assert!(parse_mode(b"x").is_err());
    assert!(parse_mode(b"rwx").is_err());

    assert_eq!(parse_params(b"/var/lib/img.raw"), Ok(PathBuf::from("/var/lib/img.raw")));
    assert_eq!(parse_params(b"aio:/var/lib/img.raw"), Ok(PathBuf::from("/var/lib/img.raw")));
    assert_eq!(parse_params(b"raw:/dev/loop0"), Ok(PathBuf::from("/dev/loop0")));
    assert_eq!(parse_params(b"/odd/\xffname"), Ok(PathBuf::from(OsStr::from_bytes(b"/odd/\xffname"))));
    for bad in [&b""[..], b"relative/path", b"qcow2:/img", b":/img", b"/a\0b", b"aio:relative"] {
        assert!(parse_params(bad).is_err(), "{:?}", bad.escape_ascii().to_string());
    }
    assert!(matches!(parse_params(&vec![b'/'; 5000]), Err(NodeError::TooLong { .. })));
}

#[test]
fn numbers_are_strict_decimal_and_bounded() {
    assert_eq!(parse_decimal("n", b"0", 0, 10), Ok(0));
    assert_eq!(parse_decimal("n", b"007", 0, 10), Ok(7));
    assert_eq!(parse_decimal("n", b"18446744073709551615", 0, u64::MAX), Ok(u64::MAX));
    assert!(parse_decimal("n", b"18446744073709551616", 0, u64::MAX).is_err());
    assert!(parse_decimal("n", b"11", 0, 10).is_err());
    for bad in [&b""[..], b" 1", b"1 ", b"+1", b"-1", b"0x10", b"1e3", b"\xff", b"1\0"] {
        assert!(parse_decimal("n", bad, 0, u64::MAX).is_err(), "{:?}", bad.escape_ascii().to_string());
    }
    let err = parse_decimal("ring-ref", &[b'9'; 100_000], 0, u64::MAX).expect_err("huge");
    assert_eq!(err, NodeError::TooLong { node: "ring-ref".into(), len: 100_000, max: 20 });
    assert_eq!(err.errno(), libc::ERANGE);
}

#[test]
fn frontend_ring_nodes() {
    assert_eq!(parse_ring_page_order(b"4", 4), Ok(4));
    assert!(parse_ring_page_order(b"5", 4).is_err());
    assert_eq!(parse_ring_ref("ring-ref3", b"4294967295"), Ok(u32::MAX));
    assert!(parse_ring_ref("ring-ref3", b"4294967296").is_err());
    assert_eq!(parse_event_channel("event-channel", b"17"), Ok(17));
    assert!(parse_event_channel("event-channel", b"0").is_err());
    assert_eq!(parse_protocol(None), Ok(BlkifAbi::X86_32));
    assert_eq!(parse_protocol(Some(b"x86_64-abi")), Ok(BlkifAbi::X86_64));
    assert_eq!(parse_protocol(Some(b"x86_32-abi")), Ok(BlkifAbi::X86_32));
    assert!(parse_protocol(Some(b"arm-abi")).is_err());
    assert!(parse_protocol(Some(b"")).is_err());
    let huge = parse_protocol(Some(&[b'x'; 100_000])).expect_err("huge");
    assert!(huge.to_string().len() < 200, "{huge}");
    assert_eq!(parse_num_queues(None, 4), Ok(1));
    assert_eq!(parse_num_queues(Some(b"4"), 4), Ok(4));
    assert!(parse_num_queues(Some(b"0"), 4).is_err());
    assert!(parse_num_queues(Some(b"5"), 4).is_err());
    assert_eq!(parse_flag("feature-persistent", b"1"), Ok(true));
    assert_eq!(parse_flag("feature-persistent", b"0"), Ok(false));
    assert!(parse_flag("feature-persistent", b"yes").is_err());
}

#[test]
fn domain_ids_paths_and_online() {
    assert_eq!(parse_domid("frontend-id", b"5"), Ok(5));
    assert!(parse_domid("frontend-id", b"32752").is_err()); // DOMID_FIRST_RESERVED
    assert_eq!(
        parse_xenstore_path("frontend", b"/local/domain/5/device/vbd/51712"),
        Ok("/local/domain/5/device/vbd/51712".into())
    );
    for bad in [&b""[..], b"local/domain", b"/a//b", b"/a/", b"/a b", b"/a\xff", b"/a\0"] {
        assert!(parse_xenstore_path("frontend", bad).is_err(), "{:?}", bad.escape_ascii().to_string());
    }
    assert!(parse_online(Some(b"1")));
    assert!(!parse_online(Some(b"0")));
    assert!(!parse_online(None));
    assert!(!parse_online(Some(b"junk")));
}

#[test]
fn shown_values_are_escaped_and_truncated() {
    assert_eq!(shown(b"a\xff\n"), "\"a\\xff\\n\"");
    let s = shown(&[b'z'; 1000]);
    assert!(s.ends_with("... (1000 bytes)") && s.len() < 80, "{s}");
}

proptest! {
    #[test]
    fn diskseq_round_trips_every_nonzero_value(seq in 1u64.., upper in any::<bool>()) {
        let text = if upper { format!("{seq:X}") } else { format!("{seq:x}") };
        prop_assert_eq!(parse_diskseq(Some(text.as_bytes())), Ok(Some(seq)));
    }

    #[test]
    fn diskseq_never_panics_and_never_yields_zero(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
        if let Ok(Some(seq)) = parse_diskseq(Some(&bytes)) {
            prop_assert_ne!(seq, 0);
            prop_assert!(bytes.len() <= 16 && bytes[0] != b'0');
        }
    }

    #[test]
    fn decimal_matches_std_for_digit_strings(digits in "[0-9]{1,20}") {
        let ours = parse_decimal("n", digits.as_bytes(), 0, u64::MAX).ok();
        prop_assert_eq!(ours, digits.parse::<u64>().ok());
    }

    #[test]
    fn physical_device_round_trips(major in 1u32..=MAX_MAJOR, minor in 0u32..=MAX_MINOR) {
        let dev = PhysicalDevice { major, minor };
        prop_assert_eq!(parse_physical_device(dev.to_string().as_bytes()), Ok(dev));
    }

    #[test]
    fn parsers_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = parse_physical_device(&bytes);
        let _ = parse_mode(&bytes);
        let _ = parse_params(&bytes);
        let _ = parse_xenstore_path("frontend", &bytes);
        let _ = parse_domid("frontend-id", &bytes);
        let _ = parse_ring_page_order(&bytes, 4);
        let _ = parse_ring_ref("ring-ref", &bytes);
        let _ = parse_event_channel("event-channel", &bytes);
        let _ = parse_protocol(Some(&bytes));
        let _ = parse_num_queues(Some(&bytes), 4);
        let _ = parse_flag("feature-persistent", &bytes);
        let _ = parse_online(Some(&bytes));
    }
}
