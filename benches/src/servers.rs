// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The contenders: processes serving one file over vhost-user-blk, started and stopped per run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::client::Workload;

/// Which server.
#[derive(Clone, Debug)]
pub enum Server {
    /// Our daemon.
    Blkbackd {
        /// Path of the binary.
        binary: PathBuf,
        /// Extra arguments (e.g. `--poll-us 50`); `NAME=VALUE` words set environment variables instead.
        extra: Vec<String>,
    },
    /// QEMU's storage daemon with its vhost-user-blk export (io_uring, O_DIRECT).
    Qsd,
    /// cloud-hypervisor's `vhost_user_block` (synchronous I/O, O_DIRECT, its busy-polling mode), built from
    /// cloud-hypervisor's source (`cargo build --release -p vhost_user_block`; not packaged by Debian).
    CloudHypervisor {
        /// Path of the `vhost_user_block` binary.
        binary: PathBuf,
    },
    /// No server: fio with io_uring and O_DIRECT on the file itself, one job per queue (the host's raw ceiling).
    RawFio,
}

impl Server {
    /// Name for the table.
    pub fn label(&self) -> String {
        match self {
            Server::Blkbackd { extra, .. } if extra.is_empty() => "blkbackd".into(),
            Server::Blkbackd { extra, .. } => format!("blkbackd {}", extra.join(" ")),
            Server::Qsd => "qemu-storage-daemon".into(),
            Server::CloudHypervisor { .. } => "cloud-hypervisor vhost_user_block (poll)".into(),
            Server::RawFio => RAW_LABEL.into(),
        }
    }
}

/// Resident memory of a process (KiB) and its thread count.
#[derive(Clone, Copy, Debug)]
pub struct Memory {
    /// `VmRSS`: all resident pages.
    pub rss: u64,
    /// `RssAnon`: heap, stacks, anonymous mappings (the process's own).
    pub anon: u64,
    /// `RssFile`: the binary and libraries.
    pub file: u64,
    /// `RssShmem`: shared memory, i.e. the pages of the guest's RAM the process touched (the VM's, not ours).
    pub shmem: u64,
    /// Threads.
    pub threads: u64,
}

/// Label of the raw host io_uring row.
pub const RAW_LABEL: &str = "raw io_uring (fio)";

/// What fio measured.
#[derive(Clone, Copy, Debug)]
pub struct FioFigures {
    /// I/Os completed (all jobs).
    pub ios: u64,
    /// Runtime.
    pub elapsed: Duration,
    /// Median completion latency, µs.
    pub p50_us: f64,
    /// 99th percentile completion latency, µs.
    pub p99_us: f64,
    /// fio's own CPU time (it submits and reaps: the whole host-side cost of the I/O).
    pub cpu: Duration,
}

/// Run `workload` with fio directly on `disk`: io_uring, O_DIRECT, `queues` jobs of the workload's depth
/// (sequential jobs start `disk_bytes / queues` apart), for `duration`.
pub fn fio(disk: &Path, workload: Workload, queues: usize, duration: Duration, disk_bytes: u64) -> Result<FioFigures> {
    let rw = match (workload.read, workload.random) {
        (true, true) => "randread",
        (false, true) => "randwrite",
        (true, false) => "read",
        (false, false) => "write",
    };
    let out = Command::new("fio")
        .arg("--name=raw")
        .arg(format!("--filename={}", disk.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={}", workload.block_size))
        .arg(format!("--iodepth={}", workload.queue_depth))
        .arg(format!("--numjobs={queues}"))
        .arg(format!("--offset_increment={}", disk_bytes / queues.max(1) as u64 / 4096 * 4096))
        .args(["--ioengine=io_uring", "--direct=1", "--time_based=1", "--randrepeat=0", "--norandommap"])
        .args(["--group_reporting", "--output-format=terse", "--terse-version=3"])
        .arg(format!("--runtime={}ms", duration.as_millis()))
        .stdin(Stdio::null())
        .output()
        .context("running fio (scripts/install-deps installs it)")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("3;")).context("no terse line from fio")?;
    parse_terse(line, workload.read)
}

/// Terse v3 (fields 1-based): reads at 6 (KiB), 8 (IOPS), 9 (runtime ms); writes at 47, 49, 50; each
/// direction's completion-latency percentiles are `P%=usec` fields, reads first; CPU user % and system % at 88
/// and 89.
fn parse_terse(line: &str, read: bool) -> Result<FioFigures> {
    let fields: Vec<&str> = line.split(';').collect();
    let field = |i: usize| -> Result<f64> {
        let text = fields.get(i - 1).with_context(|| format!("terse field {i}"))?;
        text.trim_end_matches('%').parse::<f64>().with_context(|| format!("terse field {i}: {text:?}"))
    };
    let (iops_at, runtime_at, section) = if read { (8, 9, 0) } else { (49, 50, 1) };
    let (iops, runtime_ms) = (field(iops_at)?, field(runtime_at)?);
    let pct = |p: &str| -> f64 {
        fields.iter().filter_map(|f| f.strip_prefix(p)).nth(section).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
    };
    let elapsed = Duration::from_secs_f64(runtime_ms / 1000.0);
    let cpu_share = (field(88)? + field(89)?) / 100.0;
    Ok(FioFigures {
        ios: (iops * elapsed.as_secs_f64()).round() as u64,
        elapsed,
        p50_us: pct("50.000000%="),
        p99_us: pct("99.000000%="),
        cpu: elapsed.mul_f64(cpu_share.max(0.0)),
    })
}

/// A variant's `--io-threads N` is at most the queue count (`--io-threads 64`: one thread per queue), so that one
/// variant can run at every queue count.
fn cap_io_threads(extra: &[&String], queues: usize) -> Vec<String> {
    let mut out: Vec<String> = extra.iter().map(|w| w.to_string()).collect();
    for i in 1..out.len() {
        if out[i - 1] == "--io-threads" {
            if let Ok(n) = out[i].parse::<usize>() {
                out[i] = n.min(queues.max(1)).to_string();
            }
        }
    }
    out
}

/// A started server; killed on drop.
pub struct Running {
    child: Child,
    socket: PathBuf,
}

impl Running {
    /// Start `server` on `disk` with a socket in `dir`.
    pub fn start(server: &Server, disk: &Path, dir: &Path, queues: usize) -> Result<Running> {
        let socket = dir.join(format!("bench-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let mut cmd = match server {
            Server::Blkbackd { binary, extra } => {
                // `NAME=VALUE` words of a variant set the environment; the rest are arguments.
                let (env, extra): (Vec<&String>, Vec<&String>) =
                    extra.iter().partition(|w| !w.starts_with('-') && w.contains('='));
                let extra = cap_io_threads(&extra, queues);
                let mut c = Command::new(binary);
                c.envs(env.iter().filter_map(|w| w.split_once('=')));
                c.arg("vhost-user")
                    .arg("--socket")
                    .arg(&socket)
                    .arg("--disk")
                    .arg(disk)
                    .arg("--queues")
                    .arg(queues.to_string())
                    .args(extra);
                c.env("RUST_LOG", "warn");
                c
            }
            Server::CloudHypervisor { binary } => {
                let mut c = Command::new(binary);
                c.arg("--block-backend").arg(format!(
                    "path={},socket={},num_queues={queues},queue_size=256,direct=true,poll_queue=true",
                    disk.display(),
                    socket.display()
                ));
                c.env("RUST_LOG", "warn");
                c
            }
            Server::RawFio => bail!("fio is not a server (use servers::fio)"),
            Server::Qsd => {
                let mut c = Command::new("qemu-storage-daemon");
                c.arg("--blockdev")
                    .arg(format!(
                        "driver=file,node-name=file0,filename={},cache.direct=on,aio=io_uring",
                        disk.display()
                    ))
                    .arg("--blockdev")
                    .arg("driver=raw,node-name=disk0,file=file0")
                    .arg("--export")
                    .arg(format!(
                        "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                        socket.display()
                    ));
                c
            }
        };
        let child = cmd.stdin(Stdio::null()).spawn().with_context(|| format!("starting {}", server.label()))?;
        let mut running = Running { child, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !running.socket.exists() {
            if let Some(status) = running.child.try_wait()? {
                bail!("{} exited before listening: {status}", server.label());
            }
            if Instant::now() > deadline {
                bail!("{} did not create its socket within 10 s", server.label());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(running)
    }

    /// The server's memory figures from `/proc/PID/status`, in KiB.
    pub fn memory(&self) -> Result<Memory> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kib = |key: &str| -> Result<u64> {
            let line = status.lines().find(|l| l.starts_with(key)).with_context(|| format!("no {key} in status"))?;
            Ok(line[key.len()..].trim().trim_end_matches("kB").trim().parse()?)
        };
        Ok(Memory {
            rss: kib("VmRSS:")?,
            anon: kib("RssAnon:")?,
            file: kib("RssFile:")?,
            shmem: kib("RssShmem:")?,
            threads: kib("Threads:")?,
        })
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// CPU time (user + system, all threads) the server has used so far.
    pub fn cpu_time(&self) -> Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // The command name may contain spaces: fields start after the last ')'.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).context("malformed /proc stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = fields.get(11).context("utime")?.parse()?;
        let stime: u64 = fields.get(12).context("stime")?.parse()?;
        // SAFETY: sysconf has no preconditions.
        let ticks = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100).max(1);
        Ok(Duration::from_nanos((utime + stime) * 1_000_000_000 / ticks))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // SIGTERM first so blkbackd can finish in-flight requests and remove its socket.
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}
