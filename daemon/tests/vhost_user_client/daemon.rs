// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Running the real `blkbackd` binary: the one Cargo built for these tests (`CARGO_BIN_EXE_blkbackd`), or the
//! one `BLKBACKD_BIN` names.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the daemon logs once it listens.
const READY: &str = "serving vhost-user-blk";

/// How long a daemon may take to start listening or to exit.
pub const PROCESS_TIMEOUT: Duration = Duration::from_secs(20);

/// The `blkbackd` binary: `BLKBACKD_BIN` if set, else the one built with these tests.
pub fn blkbackd() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var_os("BLKBACKD_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_blkbackd")), PathBuf::from)
    })
}

/// A running `blkbackd` whose stderr is collected; killed if still running when dropped.
pub struct Daemon {
    child: Child,
    stderr: Arc<Mutex<Vec<u8>>>,
    reader: Option<JoinHandle<()>>,
    /// The vhost-user socket.
    pub socket: PathBuf,
}

impl Daemon {
    /// Start `blkbackd vhost-user --socket <socket> --disk <disk> <extra...>` and wait until it listens (it logs
    /// so at info level; a socket file alone may be a stale one it is about to replace).
    pub fn start(socket: &Path, disk: &Path, extra: &[&str]) -> Daemon {
        let mut args: Vec<String> =
            vec!["vhost-user".into(), "--socket".into(), path_arg(socket), "--disk".into(), path_arg(disk)];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut daemon = Daemon::spawn(&args, socket);
        daemon.wait_listening();
        daemon
    }

    /// Wait until the daemon logs that it listens and its socket file exists.
    pub fn wait_listening(&mut self) {
        let deadline = Instant::now() + PROCESS_TIMEOUT;
        while !(self.socket.exists() && self.stderr().contains(READY)) {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("blkbackd exited with {status} before listening:\n{}", self.stderr());
            }
            assert!(Instant::now() < deadline, "blkbackd did not listen within {PROCESS_TIMEOUT:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Start `blkbackd <args...>` without waiting for anything.
    pub fn spawn(args: &[String], socket: &Path) -> Daemon {
        let mut command = Command::new(blkbackd());
        command.args(args);
        Daemon::spawn_command(command, socket)
    }

    /// Start `command` (which runs blkbackd, maybe through a shell) with stderr collected, without waiting.
    pub fn spawn_command(mut command: Command, socket: &Path) -> Daemon {
        let mut child = command
            // BLKBACKD_TEST_LOG (e.g. `debug`) must keep info-level messages: readiness is read from the log.
            .env("RUST_LOG", std::env::var("BLKBACKD_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn blkbackd");
        let mut pipe = child.stderr.take().expect("stderr pipe");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&stderr);
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().expect("stderr buffer").extend_from_slice(&buf[..n]);
            }
        });
        Daemon { child, stderr, reader: Some(reader), socket: socket.to_path_buf() }
    }

    /// Run `blkbackd <args...>` to completion: its exit status and stderr.
    pub fn run_to_exit(args: &[&str]) -> (ExitStatus, String) {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let mut daemon = Daemon::spawn(&args, Path::new("/nonexistent"));
        let status = daemon.wait(PROCESS_TIMEOUT);
        (status, daemon.stderr())
    }

    /// Process id.
    pub fn pid(&self) -> libc::pid_t {
        libc::pid_t::try_from(self.child.id()).expect("pid fits")
    }

    /// Send `signal`.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0, "kill");
    }

    /// Wait for the process to exit (panics after `timeout`).
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                if let Some(reader) = self.reader.take() {
                    reader.join().expect("stderr reader");
                }
                return status;
            }
            assert!(Instant::now() < deadline, "blkbackd did not exit within {timeout:?}:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("stderr buffer")).into_owned()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            // A failed test shows what the daemon logged (the end of it; BLKBACKD_TEST_LOG=debug for more).
            let log = self.stderr();
            let start = log.len().saturating_sub(16 * 1024);
            let start = (start..log.len()).find(|&i| log.is_char_boundary(i)).unwrap_or(log.len());
            eprintln!("--- blkbackd's log (last {} bytes) ---\n{}", log.len() - start, &log[start..]);
        }
    }
}

fn path_arg(path: &Path) -> String {
    path.to_str().expect("UTF-8 test path").to_string()
}
