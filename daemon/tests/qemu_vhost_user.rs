// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A real VMM: QEMU (TCG) with `vhost-user-blk-pci`, two queues, and a Linux guest (the host's Debian kernel, an
//! initramfs with busybox and fio) whose `virtio_blk` runs fio with crc32c verify through `blkbackd vhost-user`.
//!
//! One daemon serves one disk image for the whole test:
//! 1. QEMU 1, boot 1: fio writes region 1 (two jobs pinned to the two vCPUs, so both virtqueues carry I/O) and
//!    verifies every block, then the guest reboots: QEMU resets the device on the same vhost-user connection (it
//!    stops the vrings, and starts them again with features negotiated anew when the next kernel's driver loads);
//! 2. QEMU 1, boot 2: a verify-only pass over region 1 (the data outlived the reset), then write + verify region 2,
//!    during which the host grows the image by 16 MiB and runs `blkbackd resize` (live resize: blkbackd sends
//!    QEMU the config-change message, QEMU re-reads the capacity and interrupts the guest, whose
//!    `/sys/block/vda/size` must grow while fio runs); then write + verify region 5, past the old end; power off:
//!    QEMU exits and the connection closes;
//! 3. QEMU 2 (a new process, a new connection to the same daemon), boot 3: verify-only over regions 1, 2 and 5
//!    (the data outlived the reconnect), write + verify region 3, power off.
//!
//!    While fio writes region 3, blkbackd is restarted (SIGTERM, a new process on the same socket) and QEMU
//!    reconnects (`reconnect-ms`) with the guest's I/O in flight: the old daemon answers every request in flight
//!    before it closes the connection (else QEMU resumes from a used index that misses them and the guest waits
//!    for them forever: it did, in 4 of 6 runs, before the fix); once the new daemon listens the test writes
//!    "restarted" into a mailbox block of the image, which the guest polls before it verifies regions 1 to 3 again.
//!
//! The guest checks `/sys/block/vda/mq` has two queues; the host checks both queues' byte counters grew in each
//! phase, one connection per QEMU process and per daemon, the stage marker the guest wrote last in the image
//! file, and that each daemon stops cleanly (exit 0 on SIGTERM, the first one with QEMU connected). The guest's script is `qemu_support/init`, its initramfs is built by
//! `qemu_support/build-initramfs` once per input (cached under `CARGO_TARGET_TMPDIR`).
//!
//! What it needs (QEMU, the Debian kernel with its modules, busybox, fio, cpio) is installed by
//! `../shared/xen-lab/xen-lab setup` when missing (root only). It is skipped, with a message, only when it cannot
//! run at all: something missing and no way to install it, no memfd, not x86_64, or `BLKBACKD_SKIP_QEMU=1`.
//! 45-50 s on 2 cores (QEMU 1: 25-31 s, QEMU 2: 16-18 s; building the initramfs the first time: 1-3 s).

mod vhost_user_client;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use test_kit::is_root;
use vhost_user_client::daemon::{blkbackd, PROCESS_TIMEOUT};
use vhost_user_client::Daemon;

/// The guest disk: three 16 MiB fio regions, the host's mailbox block at 56 MiB, the stage marker at 60 MiB; grown
/// by 16 MiB in boot 2 (region 5 lies there).
const DISK_MIB: u64 = 64;
const GROW_MIB: u64 = 16;
const MBOX_MIB: u64 = 56;
const MARK_MIB: u64 = 60;
/// A QEMU run that takes longer than this hangs (a run takes 15 to 40 s).
const QEMU_TIMEOUT: Duration = Duration::from_secs(300);
/// A guest that printed no milestone for this long hangs (they come every few seconds).
const GUEST_STALL: Duration = Duration::from_secs(120);
/// The guest's lines the test reads start with this.
const GUEST_PREFIX: &str = "BLKT-";

fn support_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qemu_support")
}

/// The lab's driver script, next to the repository as CI lays it out (`../shared/xen-lab/xen-lab`): its `setup`
/// installs everything this test needs.
fn lab_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/xen-lab/xen-lab")
}

/// Where tools are looked for: `PATH`, then the sbin directories (`modprobe`) a user's `PATH` may lack.
fn search_path() -> Vec<PathBuf> {
    let paths = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&paths).chain(["/usr/sbin", "/sbin"].map(PathBuf::from)).collect()
}

fn on_path(name: &str) -> bool {
    search_path().iter().any(|dir| dir.join(name).is_file())
}

/// The guest kernel's version: the one `linux-image-amd64` depends on (as the lab picks it), else the newest
/// `/boot/vmlinuz-*` with modules.
fn kernel_version() -> Option<String> {
    let usable =
        |k: &str| Path::new(&format!("/boot/vmlinuz-{k}")).exists() && Path::new("/lib/modules").join(k).is_dir();
    let depends = Command::new("dpkg-query").args(["-W", "-f=${Depends}", "linux-image-amd64"]).output().ok();
    let from_meta = depends.and_then(|out| {
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split([' ', ',', '|'])
            .find_map(|word| word.strip_prefix("linux-image-"))
            .map(|k| k.trim_end_matches("-unsigned").to_string())
    });
    if let Some(k) = from_meta.filter(|k| usable(k)) {
        return Some(k);
    }
    let mut found: Vec<String> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix("vmlinuz-")).map(str::to_string))
        .filter(|k| usable(k))
        .collect();
    found.sort_by_key(|k| k.split(['.', '-']).map(|p| p.parse::<u64>().unwrap_or(0)).collect::<Vec<_>>());
    found.pop()
}

/// What is missing to build and boot the guest.
fn missing_tools() -> Vec<String> {
    let mut missing: Vec<String> = ["qemu-system-x86_64", "busybox", "fio", "cpio", "modprobe"]
        .into_iter()
        .filter(|tool| !on_path(tool))
        .map(str::to_string)
        .collect();
    if missing.is_empty() && !qemu_knows_reconnect_ms() {
        missing.push("QEMU 9.2 or later (`reconnect-ms`; Debian 12's own is 7.2)".into());
    }
    if kernel_version().is_none() {
        missing.push("a kernel (/boot/vmlinuz-* with /lib/modules)".into());
    }
    missing
}

/// Whether QEMU is 9.2 or later: `reconnect-ms` replaced `reconnect` there (the lab installs 10.0 from backports).
fn qemu_knows_reconnect_ms() -> bool {
    let out = Command::new("qemu-system-x86_64").arg("--version").output().expect("run qemu-system-x86_64");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let version = text.split_whitespace().skip_while(|w| *w != "version").nth(1).unwrap_or_default();
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (9, 2)
}

/// Why the test cannot run here at all, if it cannot. Installs what is missing when it can.
fn skip_reason() -> Option<String> {
    if std::env::var_os("BLKBACKD_SKIP_QEMU").is_some_and(|v| v == "1") {
        return Some("BLKBACKD_SKIP_QEMU=1".into());
    }
    if !cfg!(target_arch = "x86_64") {
        return Some("not an x86_64 host".into());
    }
    // QEMU shares guest memory with the daemon through a memfd.
    // SAFETY: a NUL-terminated name; the descriptor is closed right away.
    let fd = unsafe { libc::memfd_create(c"blkbackd-test-probe".as_ptr(), 0) };
    if fd < 0 {
        return Some(format!("memfd_create fails: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    let missing = missing_tools();
    if missing.is_empty() {
        return None;
    }
    if !is_root() || !lab_script().exists() {
        return Some(format!(
            "missing {} and cannot install it (needs root and {}; or run `xen-lab setup`)",
            missing.join(", "),
            lab_script().display()
        ));
    }
    eprintln!("installing {} with xen-lab setup", missing.join(", "));
    let out = Command::new("bash").arg(lab_script()).arg("setup").output().expect("run xen-lab setup");
    assert!(
        out.status.success(),
        "xen-lab setup failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        tail(&String::from_utf8_lossy(&out.stderr), 40)
    );
    let missing = missing_tools();
    assert!(missing.is_empty(), "still missing after xen-lab setup: {}", missing.join(", "));
    None
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The guest initramfs for kernel `kver`, built on first use and kept under the target directory, keyed by the
/// support files, the kernel and the binaries copied in.
fn initramfs(kver: &str) -> PathBuf {
    let mut hasher = DefaultHasher::new();
    kver.hash(&mut hasher);
    for name in ["build-initramfs", "init"] {
        std::fs::read(support_dir().join(name)).expect("read a support file").hash(&mut hasher);
    }
    for tool in ["fio", "busybox"] {
        let path = which(tool);
        let meta = std::fs::metadata(&path).expect("stat a tool");
        (path, meta.len(), meta.mtime()).hash(&mut hasher);
    }
    let deps = std::fs::metadata(format!("/lib/modules/{kver}/modules.dep")).map(|m| m.mtime()).unwrap_or(0);
    deps.hash(&mut hasher);
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("qemu-guest-{:016x}.cpio", hasher.finish()));
    if out.exists() {
        eprintln!("initramfs: cached {}", out.display());
        return out;
    }
    // Images built from other inputs are stale: ~90 MB each.
    let stale = std::fs::read_dir(env!("CARGO_TARGET_TMPDIR")).into_iter().flatten().filter_map(Result::ok);
    for entry in stale.filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with("qemu-guest-"))) {
        let _ = std::fs::remove_file(entry.path());
    }
    let start = Instant::now();
    let status = Command::new("bash")
        .arg(support_dir().join("build-initramfs"))
        .arg(kver)
        .arg(&out)
        .status()
        .expect("run build-initramfs");
    assert!(status.success(), "build-initramfs failed: {status}");
    eprintln!("initramfs: built {} in {:.1} s", out.display(), start.elapsed().as_secs_f64());
    out
}

fn which(tool: &str) -> PathBuf {
    search_path().iter().map(|dir| dir.join(tool)).find(|p| p.is_file()).expect("a tool on PATH")
}

/// One QEMU process; killed if still running when dropped.
struct Qemu {
    child: Child,
    console: PathBuf,
    log: PathBuf,
}

impl Qemu {
    /// Boot the guest against the daemon's `socket`; `run` is the guest's `blkt.qemu` (which boots to expect).
    fn start(dir: &Path, kver: &str, initrd: &Path, socket: &Path, run: u32, restart: bool) -> Qemu {
        let console = dir.join(format!("console-{run}.log"));
        let log = dir.join(format!("qemu-{run}.log"));
        let out = std::fs::File::create(&log).expect("create the QEMU log");
        let err = out.try_clone().expect("dup the QEMU log");
        let mut command = Command::new("qemu-system-x86_64");
        // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
        unsafe {
            // Dropping `Qemu` kills it; a test process killed outright must not leave it running either.
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let child = command
            .args(["-accel", "tcg,thread=multi", "-smp", "2", "-m", "512"])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-numa", "node,memdev=mem"])
            .arg("-chardev")
            .arg(format!("socket,id=blk0,path={},reconnect-ms=1000", socket.display()))
            .args(["-device", "vhost-user-blk-pci,chardev=blk0,num-queues=2"])
            .arg("-kernel")
            .arg(format!("/boot/vmlinuz-{kver}"))
            .arg("-initrd")
            .arg(initrd)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 quiet panic=-1 blkt.qemu={run} blkt.restart={} \
                 blkt.mark_mib={MARK_MIB} blkt.mbox_mib={MBOX_MIB} blkt.grow_mib={GROW_MIB}",
                u8::from(restart)
            ))
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn qemu-system-x86_64");
        Qemu { child, console, log }
    }

    fn console(&self) -> String {
        std::fs::read(&self.console).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// Wait for QEMU to exit (the guest powers off), calling each hook once when the guest prints its line. A
    /// guest that fails or panics gets a few seconds to print and power off, then QEMU is killed; so is one that
    /// hangs.
    fn wait(&mut self, daemon: &mut Daemon, hooks: &[Hook<'_>]) -> ExitStatus {
        let mut called = vec![false; hooks.len()];
        let start = Instant::now();
        let mut failed_at: Option<Instant> = None;
        let (mut milestones, mut progress_at) = (0, Instant::now());
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait qemu") {
                return status;
            }
            let console = self.console();
            let seen = console.lines().filter(|l| l.starts_with(GUEST_PREFIX) && !l.contains("WAITING")).count();
            if seen > milestones {
                (milestones, progress_at) = (seen, Instant::now());
            }
            for ((line, hook), called) in hooks.iter().zip(called.iter_mut()) {
                if !*called && console.contains(line) {
                    *called = true;
                    hook(daemon);
                }
            }
            if failed_at.is_none() && (console.contains("BLKT-FAIL") || console.contains("Kernel panic")) {
                failed_at = Some(Instant::now());
            }
            let why = if failed_at.is_some_and(|t| t.elapsed() > Duration::from_secs(5)) {
                Some("the guest failed".to_string())
            } else if progress_at.elapsed() > GUEST_STALL {
                Some(format!("the guest hangs: no milestone for {GUEST_STALL:?}"))
            } else if start.elapsed() > QEMU_TIMEOUT {
                Some(format!("QEMU did not exit within {QEMU_TIMEOUT:?}"))
            } else {
                None
            };
            if let Some(why) = why {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("{why}\n{}", self.report(daemon));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What to read when something went wrong: the console's and the logs' tails.
    fn report(&self, daemon: &Daemon) -> String {
        let qemu_log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let qemu_log = if qemu_log.trim().is_empty() { "(nothing)".to_string() } else { tail(&qemu_log, 30) };
        format!(
            "--- guest console ({}), last 60 lines:\n{}\n--- QEMU's output:\n{qemu_log}\n--- blkbackd's log, last 30 lines:\n{}",
            self.console.display(),
            tail(&self.console(), 60),
            tail(&daemon.stderr(), 30)
        )
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Per-queue counters from `blkbackd stats --prometheus`: (read bytes, written bytes) of queues 0 and 1.
fn queue_bytes(control: &Path) -> [(f64, f64); 2] {
    let out = Command::new(blkbackd())
        .args(["stats", "--control"])
        .arg(control)
        .arg("--prometheus")
        .output()
        .expect("run blkbackd stats");
    assert!(out.status.success(), "blkbackd stats failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let sample = |name: &str, queue: u32| -> f64 {
        let label = format!("queue=\"{queue}\"");
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label) && l.contains("vhost-user"))
            .find_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse().ok()))
            .unwrap_or_else(|| panic!("no {name} for queue {queue} in:\n{text}"))
    };
    [0, 1].map(|q| (sample("blkbackd_read_bytes_total", q), sample("blkbackd_written_bytes_total", q)))
}

/// Wait until the daemon has logged `line` `count` times (its log is read by a thread that may lag).
fn wait_log_count(daemon: &Daemon, line: &str, count: usize) {
    let deadline = Instant::now() + PROCESS_TIMEOUT;
    while daemon.stderr().matches(line).count() < count && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen = daemon.stderr().matches(line).count();
    assert_eq!(seen, count, "blkbackd logged {line:?} {seen} times, want {count}:\n{}", tail(&daemon.stderr(), 30));
}

/// What the host does when the guest prints a line: (the line, the action).
type Hook<'a> = (&'static str, &'a dyn Fn(&mut Daemon));

/// The guest's request for a daemon restart (boot 3).
const RESTART_LINE: &str = "BLKT-RESTART-DAEMON";
/// The guest's request to grow the disk (boot 2).
const GROW_LINE: &str = "BLKT-GROW-DISK";

/// Run one QEMU process to its end; asserts it exited 0, the guest passed every boot in `boots` and printed the
/// line of every hook (each hook is called when it does).
fn run_qemu(
    dir: &Path,
    kver: &str,
    initrd: &Path,
    daemon: &mut Daemon,
    run: u32,
    boots: &[u32],
    hooks: &[Hook<'_>],
) -> Duration {
    let start = Instant::now();
    let restart = hooks.iter().any(|(line, _)| *line == RESTART_LINE);
    let mut qemu = Qemu::start(dir, kver, initrd, &daemon.socket, run, restart);
    let status = qemu.wait(daemon, hooks);
    for (line, _) in hooks {
        assert!(qemu.console().contains(line), "the guest never printed {line}\n{}", qemu.report(daemon));
    }
    let took = start.elapsed();
    let console = qemu.console();
    assert!(status.success(), "QEMU {run} exited with {status}\n{}", qemu.report(daemon));
    let passes: Vec<&str> = console.lines().filter(|l| l.starts_with("BLKT-PASS")).collect();
    let want: Vec<String> = boots.iter().map(|b| format!("BLKT-PASS boot={b} ")).collect();
    let ok = passes.len() == want.len() && passes.iter().zip(&want).all(|(line, w)| line.starts_with(w.as_str()));
    assert!(ok && !console.contains("BLKT-FAIL"), "QEMU {run}: want {want:?}, got {passes:?}\n{}", qemu.report(daemon));
    eprintln!("QEMU {run}: {:.1} s wall; guest milestones:", took.as_secs_f64());
    for line in console.lines().filter(|l| l.starts_with(GUEST_PREFIX)) {
        eprintln!("  {line}");
    }
    took
}

#[test]
fn qemu_guest_verifies_through_reboot_vmm_reconnect_and_daemon_restart() {
    scenario(true);
}

/// The whole test; `restart`: blkbackd restarted during boot 3's region-3 writes.
fn scenario(restart: bool) {
    if let Some(reason) = skip_reason() {
        eprintln!("skipping the QEMU vhost-user-blk test: {reason}");
        return;
    }
    let total = Instant::now();
    let kver = kernel_version().expect("a kernel");
    let start = Instant::now();
    let initrd = initramfs(&kver);
    let build = start.elapsed();

    let dir = tempfile::tempdir().expect("temp dir");
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk).and_then(|f| f.set_len(DISK_MIB << 20)).expect("create the disk image");
    let socket = dir.path().join("vhost.sock");
    let control = dir.path().join("ctl.sock");
    let control_arg = control.to_str().expect("UTF-8 path");
    let mut daemon = Daemon::start(&socket, &disk, &["--queues", "2", "--control", control_arg]);

    // QEMU 1: boot 1, a guest reboot (device reset on the same connection), boot 2 (the disk grows), power off.
    let grow_disk = |daemon: &mut Daemon| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .and_then(|f| f.set_len((DISK_MIB + GROW_MIB) << 20))
            .expect("grow the disk image");
        let out = Command::new(blkbackd()).args(["resize", "--control"]).arg(&control).output().expect("resize");
        let answer = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "blkbackd resize failed: {}", String::from_utf8_lossy(&out.stderr));
        eprintln!("blkbackd resize: {}", answer.trim());
        // The daemon's own once-a-second check may have seen the growth first; either way it told QEMU.
        wait_log_count(daemon, "the frontend was told and reads the new capacity", 1);
    };
    let first = run_qemu(dir.path(), &kver, &initrd, &mut daemon, 1, &[1, 2], &[(GROW_LINE, &grow_disk)]);
    let console = std::fs::read_to_string(dir.path().join("console-1.log")).unwrap_or_default();
    let grown = format!("BLKT-GROWN sectors={} ", (DISK_MIB + GROW_MIB) << 11);
    assert!(console.contains(&grown), "the guest did not report {grown:?}");
    wait_log_count(&daemon, "vhost-user frontend disconnected", 1);
    wait_log_count(&daemon, "vhost-user frontend connected", 1);
    let after_first = queue_bytes(&control);
    for (queue, (read, written)) in after_first.iter().enumerate() {
        assert!(*read > 0.0 && *written > 0.0, "queue {queue} carried no I/O in QEMU 1: {after_first:?}");
    }

    // QEMU 2: a new process and connection to the same daemon; boot 3 reads back what boots 1 and 2 wrote (and
    // with `restart`, asks for the daemon restart below during its writes, and verifies everything again through
    // the new daemon).
    assert!(daemon.is_running(), "blkbackd exited after QEMU 1:\n{}", daemon.stderr());
    let control2 = dir.path().join("ctl2.sock");
    let control2_arg = control2.to_str().expect("UTF-8 path");
    let restart_took = std::cell::Cell::new(Duration::ZERO);
    let restart_daemon = |daemon: &mut Daemon| {
        let start = Instant::now();
        // The guest verified regions 1 and 2 on both queues through the first daemon's second connection.
        let before = queue_bytes(&control);
        for queue in 0..2 {
            let (earlier, now) = (after_first[queue].0, before[queue].0);
            assert!(now > earlier, "queue {queue} read nothing on QEMU 2's connection: {earlier} then {now} bytes");
        }
        daemon.signal(libc::SIGTERM);
        let status = daemon.wait(PROCESS_TIMEOUT);
        let log = daemon.stderr();
        assert_eq!(status.code(), Some(0), "blkbackd did not stop cleanly with QEMU connected:\n{}", tail(&log, 30));
        assert_eq!(log.matches("vhost-user frontend connected").count(), 2, "{}", tail(&log, 30));
        eprintln!("restart: the first blkbackd's log ends with:\n{}", tail(&log, 6));
        *daemon = Daemon::start(&socket, &disk, &["--queues", "2", "--control", control2_arg]);
        let mut mailbox = [0u8; 4096];
        mailbox[..9].copy_from_slice(b"restarted");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .and_then(|f| f.write_all_at(&mailbox, MBOX_MIB << 20).and_then(|()| f.sync_data()))
            .expect("write the mailbox");
        restart_took.set(start.elapsed());
    };
    let second = if restart {
        let second = run_qemu(dir.path(), &kver, &initrd, &mut daemon, 2, &[3], &[(RESTART_LINE, &restart_daemon)]);
        wait_log_count(&daemon, "vhost-user frontend disconnected", 1);
        wait_log_count(&daemon, "vhost-user frontend connected", 1);
        let after_restart = queue_bytes(&control2);
        for (queue, (read, _)) in after_restart.iter().enumerate() {
            assert!(*read > 0.0, "queue {queue} of the restarted daemon read nothing: {after_restart:?}");
        }
        second
    } else {
        let second = run_qemu(dir.path(), &kver, &initrd, &mut daemon, 2, &[3], &[]);
        wait_log_count(&daemon, "vhost-user frontend disconnected", 2);
        wait_log_count(&daemon, "vhost-user frontend connected", 2);
        let after_second = queue_bytes(&control);
        for queue in 0..2 {
            let (before, after) = (after_first[queue], after_second[queue]);
            assert!(
                after.0 > before.0 && after.1 > before.1,
                "queue {queue} carried no I/O in QEMU 2: {before:?} then {after:?}"
            );
        }
        second
    };

    // The last stage marker the guest wrote is in the image file.
    let mut block = [0u8; 4096];
    std::fs::File::open(&disk).and_then(|f| f.read_exact_at(&mut block, MARK_MIB << 20)).expect("read the marker");
    assert!(block.starts_with(b"stage3\0"), "the image's stage marker: {:?}", String::from_utf8_lossy(&block[..16]));

    daemon.signal(libc::SIGTERM);
    let status = daemon.wait(PROCESS_TIMEOUT);
    assert_eq!(status.code(), Some(0), "blkbackd did not stop cleanly:\n{}", tail(&daemon.stderr(), 30));
    let restarted = if restart {
        format!(", blkbackd restarted in {:.2} s", restart_took.get().as_secs_f64())
    } else {
        String::new()
    };
    eprintln!(
        "phases: initramfs {:.1} s, QEMU 1 (2 boots) {:.1} s, QEMU 2 (1 boot{restarted}) {:.1} s, total {:.1} s",
        build.as_secs_f64(),
        first.as_secs_f64(),
        second.as_secs_f64(),
        total.elapsed().as_secs_f64()
    );
}
