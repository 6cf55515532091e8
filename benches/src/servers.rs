//! The contenders: processes serving one file over vhost-user-blk, started and stopped per run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Which server.
#[derive(Clone, Debug)]
pub enum Server {
    /// Our daemon.
    Blkbackd {
        /// Path of the binary.
        binary: PathBuf,
        /// Extra arguments (e.g. `--poll-us 50`).
        extra: Vec<String>,
    },
    /// QEMU's storage daemon with its vhost-user-blk export (io_uring, O_DIRECT).
    Qsd,
}

impl Server {
    /// Name for the table.
    pub fn label(&self) -> String {
        match self {
            Server::Blkbackd { extra, .. } if extra.is_empty() => "blkbackd".into(),
            Server::Blkbackd { extra, .. } => format!("blkbackd {}", extra.join(" ")),
            Server::Qsd => "qemu-storage-daemon".into(),
        }
    }
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
                let mut c = Command::new(binary);
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
