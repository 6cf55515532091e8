//! What an operator sees of the `blkbackd` command line: help with examples for every subcommand, a version
//! line that names what the build can do, JSON logs on request, and one-line errors with exit code 1.

mod vhost_user_client;

use std::process::Command;

use vhost_user_client::daemon::blkbackd;

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
    for sub in [&[][..], &["vhost-user"], &["xen"], &["demo"]] {
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

#[test]
fn stats_report_live_counters_over_the_control_socket() {
    use vhost_user_client::{BlkClient, Daemon, Op, Scratch};
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
    assert!(
        prom.contains(r#"blkbackd_request_duration_seconds_count{transport="vhost-user",queue="0",op="read"} 9"#),
        "{prom}"
    );

    let (code, _, stderr) = run(&["stats", "--control", "/nonexistent/ctl.sock"]);
    assert_eq!(code, 1);
    assert!(stderr.starts_with("blkbackd: error: cannot connect to /nonexistent/ctl.sock"), "{stderr}");
}
