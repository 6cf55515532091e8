// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What an operator sees of the `blkbackd` command line: help with examples for every subcommand, a version
//! line that names what the build can do, JSON logs on request, usage errors as clap renders them (what is
//! missing or invalid, the valid values) with exit code 2, one-line setup errors with exit code 1 and a hint where
//! there is one, and the vhost-user backend conventions' `--print-capabilities`.

mod vhost_user_client;

use std::process::Command;

use vhost_user_client::daemon::blkbackd;
use vhost_user_client::{Daemon, Scratch};

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(blkbackd()).args(args).output().expect("run blkbackd");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_subcommand_help_shows_an_example() {
    let subcommands = [&[][..], &["vhost-user"], &["xen"], &["demo"]];
    // `demo` only where it is built in.
    let subcommands = if cfg!(feature = "demo") { &subcommands[..] } else { &subcommands[..3] };
    for sub in subcommands {
        let mut args = sub.to_vec();
        args.push("--help");
        let (code, stdout, _) = run(&args);
        assert_eq!(code, 0, "{args:?}");
        assert!(stdout.contains("Example"), "no example in `blkbackd {}`:\n{stdout}", args.join(" "));
        assert!(stdout.contains("blkbackd "), "{stdout}");
    }
}

#[test]
fn version_names_the_build_and_its_features() {
    let (code, stdout, _) = run(&["--version"]);
    assert_eq!(code, 0);
    assert!(stdout.starts_with(&format!("blkbackd {}", env!("CARGO_PKG_VERSION"))), "{stdout}");
    for feature in ["vhost-user-blk", "xen", "io_uring", "diskseq"] {
        assert!(stdout.contains(feature), "--version does not mention {feature}:\n{stdout}");
    }
}

/// Without the feature `demo` there is no emulated host in the binary: `blkbackd demo` is a usage error, and the
/// verbose version says so.
#[cfg(not(feature = "demo"))]
#[test]
fn without_the_demo_feature_there_is_no_demo() {
    let (code, _, stderr) = run(&["demo"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("unrecognized subcommand 'demo'"), "{stderr}");
    let (code, stdout, _) = run(&["--version", "--verbose"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("emulated Xen host: not built in"), "{stdout}");
}

#[test]
fn json_logs_are_one_object_per_line_and_errors_stay_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("write disk");
    let socket = dir.path().join("missing-dir/blk.sock");
    let (code, _, stderr) = run(&[
        "--log-format",
        "json",
        "vhost-user",
        "--socket",
        socket.to_str().expect("utf-8"),
        "--disk",
        disk.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 1, "{stderr}");
    let (json, plain): (Vec<&str>, Vec<&str>) = stderr.lines().partition(|l| l.starts_with('{'));
    assert!(json.iter().any(|l| l.contains(r#""message":"disk opened""#)), "no JSON log record:\n{stderr}");
    for line in &json {
        assert!(line.ends_with('}') && line.contains(r#""level":"#), "not a JSON record: {line}");
    }
    assert_eq!(plain.len(), 1, "exactly the error line besides the JSON records:\n{stderr}");
    assert!(plain[0].starts_with("blkbackd: error: ") && plain[0].contains("missing-dir"), "{}", plain[0]);
}

#[test]
fn xen_without_xenstore_is_a_one_line_error() {
    if std::path::Path::new("/dev/xen/xenbus").exists() || std::path::Path::new("/run/xenstored/socket").exists() {
        eprintln!("skipping: this machine runs under Xen");
        return;
    }
    let (code, _, stderr) = run(&["xen", "--frontend-domid", "7"]);
    assert_eq!(code, 1, "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("blkbackd: error: not running in a Xen domain with xenstore access"), "{stderr}");
    assert!(last.contains("/dev/xen/xenbus") && last.contains("xen-gntdev"), "names what is missing: {stderr}");
}

/// `blkbackd xen --metrics-listen`: needs `--control-dir` (the workers' statistics come through it), takes the
/// same addresses as vhost-user's, is not for `--cleanup`; a taken address is a one-line setup error before
/// anything else (checked where there is no Xen: the address is bound before xenstore is looked for).
#[test]
fn xen_metrics_listen_needs_the_control_dir_and_a_free_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = dir.path().join("ctl");
    let control = control.to_str().expect("utf-8");
    let (code, _, stderr) = run(&["xen", "--metrics-listen", "127.0.0.1:0"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--control-dir"), "names what is missing: {stderr}");
    let (code, _, stderr) = run(&["xen", "--control-dir", control, "--metrics-listen", "localhost"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("neither IP:PORT"), "{stderr}");
    let (code, _, stderr) =
        run(&["xen", "--cleanup", "7", "--control-dir", control, "--metrics-listen", "127.0.0.1:0"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("cannot be used with"), "{stderr}");
    let (code, stdout, _) = run(&["xen", "--help"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("--metrics-listen <ADDR>"), "{stdout}");

    if std::path::Path::new("/dev/xen/xenbus").exists() || std::path::Path::new("/run/xenstored/socket").exists() {
        eprintln!("skipping the bind checks: this machine runs under Xen");
        return;
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let args = ["xen", "--allow-kernel-blkback", "--control-dir", control, "--metrics-listen", &addr];
    let (code, _, stderr) = run(&args);
    assert_eq!(code, 1, "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with(&format!("blkbackd: error: cannot listen on --metrics-listen {addr}")), "{stderr}");
    drop(taken);
    // A free address is taken, and the service then stops where any would without Xen.
    let (code, _, stderr) =
        run(&["xen", "--allow-kernel-blkback", "--control-dir", control, "--metrics-listen", "127.0.0.1:0"]);
    assert_eq!(code, 1, "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("blkbackd: error: not running in a Xen domain"), "{stderr}");
}

#[test]
fn stats_report_live_counters_over_the_control_socket() {
    use vhost_user_client::{BlkClient, Op};
    let scratch = Scratch::new(1 << 20, 0);
    let control = scratch.dir.path().join("ctl.sock");
    let control_arg = control.to_str().expect("utf-8");
    let _daemon = Daemon::start(&scratch.socket, &scratch.disk, &["--control", control_arg]);
    let mut client = BlkClient::connect(&scratch.socket, 1, 128, false, 1 << 20).expect("connect");
    let ops: Vec<Op> = (0..16).map(|i| Op::Write { offset: i * 4096, at: 0, len: 4096 }).collect();
    assert!(client.run(&ops, 4).iter().all(|&status| status == 0));
    let reads: Vec<Op> = (0..8).map(|i| Op::Read { offset: i * 4096, at: 0, len: 4096 }).collect();
    assert!(client.run(&reads, 4).iter().all(|&status| status == 0));
    // A request past the end of the disk: an invalid-request error.
    assert_ne!(client.run_one(Op::Read { offset: 1 << 20, at: 0, len: 4096 }), 0);

    let (code, text, stderr) = run(&["stats", "--control", control_arg]);
    assert_eq!(code, 0, "{stderr}");
    eprintln!("blkbackd stats:\n{text}");
    assert!(text.contains("[transport=vhost-user queue=0]"), "{text}");
    assert!(text.contains("bytes_read 32768") && text.contains("bytes_written 65536"), "{text}");
    assert!(text.contains("invalid 1"), "{text}");
    let write_line = text.lines().find(|l| l.trim_start().starts_with("write ")).expect("a write line");
    assert!(write_line.contains(" 16 requests") && write_line.contains("p99"), "{write_line}");

    let (code, prom, _) = run(&["stats", "--control", control_arg, "--prometheus"]);
    assert_eq!(code, 0);
    assert!(prom.contains(r#"blkbackd_written_bytes_total{transport="vhost-user",queue="0"} 65536"#), "{prom}");
    assert!(prom.contains("# HELP blkbackd_written_bytes_total ") && prom.contains("_sum{"), "{prom}");
    assert!(
        prom.contains(r#"blkbackd_request_duration_seconds_count{transport="vhost-user",queue="0",op="read"} 9"#),
        "{prom}"
    );

    let (code, _, stderr) = run(&["stats", "--control", "/nonexistent/ctl.sock"]);
    assert_eq!(code, 1);
    assert!(stderr.starts_with("blkbackd: error: cannot connect to /nonexistent/ctl.sock"), "{stderr}");
}

/// `blkbackd vhost-user --socket <dir>/s.sock --disk <disk> <extra...>` run to exit (within a timeout: a build
/// that serves the disk anyway fails the test rather than hanging it): the exit code and stderr. (`--socket`, the
/// older name, so that the disk messages can be compared with builds before `--socket-path`.)
fn run_vhost_user(scratch: &Scratch, disk: &std::path::Path, extra: &[&str]) -> (i32, String) {
    let socket = scratch.dir.path().join("s.sock");
    let mut args = vec!["vhost-user", "--socket", socket.to_str().expect("UTF-8")];
    args.extend(["--disk", disk.to_str().expect("UTF-8")]);
    args.extend_from_slice(extra);
    let (status, stderr) = Daemon::run_to_exit(&args);
    (status.code().unwrap_or(-1), stderr)
}

#[test]
fn a_missing_argument_is_named_with_the_usage_and_exit_code_2() {
    let (code, stdout, stderr) = run(&["vhost-user", "--socket-path", "/run/x.sock"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.starts_with("error: the following required arguments were not provided:"), "{stderr}");
    assert!(stderr.contains("--disk <PATH>") && stderr.contains("Usage: blkbackd vhost-user"), "{stderr}");
}

#[test]
fn an_invalid_value_lists_the_valid_ones_with_exit_code_2() {
    let (code, _, stderr) = run(&["vhost-user", "--socket-path", "s", "--disk", "d", "--engine", "aio"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("invalid value 'aio' for '--engine <ENGINE>'"), "{stderr}");
    assert!(stderr.contains("[possible values: auto, io-uring, sync]"), "{stderr}");
}

#[test]
fn no_socket_is_a_usage_error_naming_the_ways_to_give_one() {
    let out = Command::new(blkbackd())
        .args(["vhost-user", "--disk", "/dev/null"])
        .env_remove("LISTEN_FDS")
        .output()
        .expect("run blkbackd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("error: no socket to listen on: give --socket-path <PATH> or --fd <N>"), "{stderr}");
    assert!(stderr.contains("LISTEN_FDS") && stderr.contains("Usage: blkbackd vhost-user"), "{stderr}");
}

#[test]
fn socket_path_and_fd_are_mutually_exclusive() {
    for path_option in ["--socket-path", "--socket"] {
        let (code, _, stderr) = run(&["vhost-user", path_option, "s", "--fd", "3", "--disk", "d"]);
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains("'--socket-path <PATH>' cannot be used with '--fd <N>'"), "{stderr}");
    }
    let (code, _, stderr) = run(&["vhost-user", "--fd", "3", "--socket-mode", "0666", "--disk", "d"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("'--fd <N>' cannot be used with '--socket-mode <MODE>'"), "{stderr}");
}

#[test]
fn out_of_range_queues_name_the_supported_range() {
    for queues in ["70000", "0", "65"] {
        let (code, _, stderr) = run(&["vhost-user", "--socket-path", "s", "--disk", "d", "--queues", queues]);
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains(&format!("'{queues}' for '--queues <N>'")), "{stderr}");
        assert!(stderr.contains("1..=64") && !stderr.contains("65535"), "{stderr}");
    }
}

#[test]
fn a_queue_size_must_be_a_power_of_two_in_range() {
    for size in ["100", "2", "65536", "0"] {
        let (code, _, stderr) = run(&["vhost-user", "--socket-path", "s", "--disk", "d", "--queue-size", size]);
        assert_eq!(code, 2, "{size}: {stderr}");
        assert!(stderr.contains("not a power of two from 4 to 32768"), "{stderr}");
    }
    let (code, _, stderr) = run(&["vhost-user", "--socket-path", "s", "--disk", "d", "--io-depth", "0"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("'0' for '--io-depth <N>'") && stderr.contains("1.."), "{stderr}");
}

#[test]
fn a_bad_socket_mode_or_group_is_a_usage_error() {
    let (code, _, stderr) = run(&["vhost-user", "--socket-path", "s", "--disk", "d", "--socket-mode", "0999"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("not octal permission bits"), "{stderr}");
    let (code, _, stderr) = run(&["vhost-user", "--socket-path", "s", "--disk", "d", "--socket-group", "no-such-grp"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("no such group \"no-such-grp\""), "{stderr}");
}

#[test]
fn print_capabilities_answers_json_whatever_else_is_given() {
    for args in [&["vhost-user", "--print-capabilities"][..], &["vhost-user", "--queues", "0", "--print-capabilities"]]
    {
        let (code, stdout, stderr) = run(args);
        assert_eq!(code, 0, "{args:?}: {stderr}");
        // The vhost-user.json schema's block capabilities; compared without the layout's white space.
        let compact: String = stdout.chars().filter(|c| !c.is_whitespace()).collect();
        assert_eq!(compact, r#"{"type":"block","features":["read-only","blk-file"]}"#, "{stdout}");
    }
}

#[test]
fn a_file_without_write_permission_is_refused_with_the_read_only_hint() {
    let scratch = Scratch::new(1 << 20, 0);
    std::fs::set_permissions(&scratch.disk, std::os::unix::fs::PermissionsExt::from_mode(0o444)).expect("chmod");
    // As root the open succeeds; the mode is checked all the same.
    let (code, stderr) = run_vhost_user(&scratch, &scratch.disk, &[]);
    assert_eq!(code, 1, "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("blkbackd: error: "), "{stderr}");
    assert!(last.contains("no write permission (mode 0444)") || last.contains("Permission denied"), "{last}");
    assert!(last.contains("--read-only"), "{last}");
    let socket = scratch.dir.path().join("ro.sock");
    let mut daemon = Daemon::start(&socket, &scratch.disk, &["--read-only"]);
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait(vhost_user_client::daemon::PROCESS_TIMEOUT).code(), Some(0), "served read-only");
}

#[test]
fn a_disk_on_a_read_only_mount_gets_the_read_only_hint() {
    if !test_kit::is_root() || Command::new("unshare").arg("--version").output().is_err() {
        eprintln!("skipping: mounting a read-only file system needs root and unshare");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // A private mount namespace: the read-only tmpfs vanishes with the shell.
    let script = r#"mount -t tmpfs blkbackd-test "$1" && head -c 1048576 /dev/zero > "$1/disk.img" &&
        mount -o remount,ro "$1" && exec "$0" vhost-user --socket "$1/../s.sock" --disk "$1/disk.img""#;
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .arg(blkbackd())
        .arg(&mnt)
        .output()
        .expect("unshare");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.contains("Read-only file system") && last.contains("--read-only"), "{last}");
}

#[test]
fn an_image_with_a_partial_last_sector_is_served_with_a_warning_naming_the_bytes() {
    let scratch = Scratch::new((1 << 20) + 100, 0);
    let mut daemon = Daemon::start(&scratch.socket, &scratch.disk, &[]);
    let log = daemon.stderr();
    assert!(log.contains("WARN") && log.contains("its last 100 bytes are not served"), "{log}");
    let client = vhost_user_client::BlkClient::connect(&scratch.socket, 1, 16, false, 4096).expect("connect");
    assert_eq!(u64::from(client.config().capacity), 2048, "whole sectors only");
    drop(client);
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait(vhost_user_client::daemon::PROCESS_TIMEOUT).code(), Some(0));
}
