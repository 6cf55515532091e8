// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The command line: what parses, what is refused, and what reaches a worker.

use super::*;
use crate::sandbox::SeccompMode;

#[test]
fn the_command_line_is_consistent() {
    use clap::CommandFactory;
    Cli::command().debug_assert();
}

#[test]
fn vhost_user_arguments_parse() {
    let cli = Cli::try_parse_from([
        "blkbackd",
        "vhost-user",
        "--socket",
        "/run/s.sock",
        "--disk",
        "/dev/loop0",
        "--diskseq",
        "0x2a",
        "--read-only",
        "--queues",
        "2",
        "--queue-size",
        "128",
        "--serial",
        "abc",
        "--engine",
        "io-uring",
        "--direct",
        "off",
        "--poll-us",
        "50",
        "--io-batching",
        "whole",
        "--io-threads",
        "2",
    ])
    .expect("valid command line");
    let Command::VhostUser(args) = cli.command else { panic!("expected vhost-user") };
    assert_eq!(args.disk.diskseq, Some(42));
    assert_eq!((args.poll_us, args.io_batching), (50, BatchingArg::Whole));
    assert_eq!((args.queues, args.queue_size, args.engine), (2, 128, EngineArg::IoUring));
    assert_eq!(args.io_threads, Some(2));
    assert!(args.check_socket().is_ok());
    let options = args.disk.options();
    assert!(options.read_only);
    assert_eq!(options.direct_io, DirectIo::Off);
    assert!(Cli::try_parse_from(["blkbackd", "vhost-user", "--socket", "s", "--disk", "d", "--diskseq", "x"]).is_err());
}

#[test]
fn privilege_arguments_parse_for_both_transports() {
    let vhost = ["blkbackd", "vhost-user", "--socket", "s", "--disk", "d"];
    let cli = Cli::try_parse_from(vhost).expect("defaults");
    let Command::VhostUser(args) = cli.command else { panic!("expected vhost-user") };
    assert_eq!((args.sandbox.user, args.sandbox.seccomp), (None, SeccompMode::Enforce));
    let cli = Cli::try_parse_from([&vhost[..], &["--user", "nobody", "--seccomp", "log"]].concat()).expect("ok");
    let Command::VhostUser(args) = cli.command else { panic!("expected vhost-user") };
    assert_eq!(args.sandbox.user.map(|u| u.shown), Some("nobody".to_string()));
    assert_eq!(args.sandbox.seccomp, SeccompMode::Log);
    let cli = Cli::try_parse_from(["blkbackd", "xen", "--user", "4242:4343", "--seccomp", "off"]).expect("xen");
    let Command::Xen(args) = cli.command else { panic!("expected xen") };
    assert_eq!(args.sandbox.user.map(|u| (u.uid, u.gid)), Some((4242, 4343)));
    assert_eq!(args.sandbox.seccomp, SeccompMode::Off);
    assert_eq!(args.serving.poll_us, 0, "polling is opt-in");
    assert_eq!(args.serving.io_threads, 1, "one I/O thread by default");
    let cli = Cli::try_parse_from([
        "blkbackd",
        "xen",
        "--poll-us",
        "50",
        "--frontend-domid",
        "3",
        "--frontend-domid",
        "4",
        "--io-threads",
        "2",
    ])
    .expect("xen --poll-us");
    let Command::Xen(args) = cli.command else { panic!("expected xen") };
    assert_eq!((args.serving.poll_us, args.frontend_domid), (50, vec![3, 4]));
    // The worker gets the same serving options back.
    let worker = [&["blkbackd", "xen-worker", "--domid", "3", "--domain-path", "/local/domain/0"][..]].concat();
    let passed = args.serving.to_args();
    let cli = Cli::try_parse_from(worker.iter().map(|s| s.to_string()).chain(passed)).expect("worker");
    let Command::XenWorker(w) = cli.command else { panic!("expected xen-worker") };
    assert_eq!((w.domid, w.channel_fd, w.serving.poll_us, w.serving.grant_mode), (3, 3, 50, GrantModeArg::Auto));
    assert_eq!(w.serving.io_threads, 2, "the worker gets --io-threads");
    assert!(!w.serving.direct_grants, "grant maps go through the supervisor by default");
    // `--direct-grants` reaches the worker; grant copy needs it.
    let mode = |extra: &[&str]| {
        let cli = Cli::try_parse_from([&["blkbackd", "xen"][..], extra].concat()).expect("xen");
        let Command::Xen(args) = cli.command else { panic!("expected xen") };
        let cli = Cli::try_parse_from(worker.iter().map(|s| s.to_string()).chain(args.serving.to_args()));
        let Command::XenWorker(w) = cli.expect("worker").command else { panic!("expected xen-worker") };
        assert_eq!(w.serving.direct_grants, args.serving.direct_grants);
        crate::xen::grant_mode(&w.serving).map_err(|e| e.to_string())
    };
    use transport_xen::grant_memory::GrantMode;
    assert_eq!(mode(&[]), Ok((GrantMode::Map, false)), "brokered: maps for every frontend");
    assert_eq!(mode(&["--direct-grants"]), Ok((GrantMode::Map, true)), "copy without persistent grants");
    assert!(mode(&["--grant-mode", "copy"]).expect_err("refused").contains("--direct-grants"));
    assert_eq!(mode(&["--grant-mode", "copy", "--direct-grants"]), Ok((GrantMode::Copy, false)));
    assert!(Cli::try_parse_from(["blkbackd", "xen", "--poll-us", "1000001"]).is_err(), "above the bound");
    assert!(Cli::try_parse_from(["blkbackd", "xen", "--io-threads", "65"]).is_err(), "above the bound");
    assert!(Cli::try_parse_from(["blkbackd", "xen", "--io-threads", "0"]).is_err(), "rings are made at start");
    let budget = |extra: &[&str]| {
        let cli = Cli::try_parse_from([&["blkbackd", "xen"][..], extra].concat()).map_err(|e| e.to_string())?;
        let Command::Xen(args) = cli.command else { panic!("expected xen") };
        Ok::<u64, String>(args.max_grant_pages)
    };
    assert_eq!(budget(&[]), Ok(65536));
    assert_eq!(budget(&["--max-grant-pages", "4096"]), Ok(4096));
    assert!(budget(&["--max-grant-pages", "1023"]).is_err(), "below one map's worth");
    for bad in [&["--user", "root"][..], &["--user", "no-such-user-blkbackd"], &["--seccomp", "kill"]] {
        assert!(Cli::try_parse_from([&vhost[..], bad].concat()).is_err(), "{bad:?}");
    }
    #[cfg(feature = "demo")]
    {
        let Command::Demo(demo) = Cli::try_parse_from(["blkbackd", "demo"]).expect("demo").command else {
            panic!("expected demo")
        };
        assert_eq!(demo.seccomp, SeccompMode::Enforce);
    }
    #[cfg(not(feature = "demo"))]
    assert!(Cli::try_parse_from(["blkbackd", "demo"]).is_err(), "no demo without the feature");
}
