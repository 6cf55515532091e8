// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket (`--control PATH`): live statistics for `blkbackd stats`.
//!
//! Protocol: the client sends one line, `stats`, `stats prometheus` or `resize`, and reads the answer until the
//! daemon closes the connection. Requests are bounded (128 bytes, 2 s) and answered by one thread that never touches the I/O path:
//! the report is read from the queues' atomic counters.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};
use device_blk::stats::Registry;

use crate::owned_path::{FileId, OwnedPath};

const MAX_REQUEST: u64 = 128;
const IO_TIMEOUT: Duration = Duration::from_secs(2);
const ACCEPT_POLL: Duration = Duration::from_millis(200);

/// What `resize` does: look at the disks' sizes now and say what happened, in one line.
pub type ResizeHook = Arc<dyn Fn() -> String + Send + Sync>;

/// A listening control socket; removed when dropped (if this process bound it).
pub struct ControlServer {
    resize: Option<ResizeHook>,
    path: PathBuf,
    /// The socket file, if this process bound it (removed on drop, unless handed over).
    file: Option<OwnedPath>,
    stop: Arc<AtomicBool>,
    /// Until [`start`](Self::start): the socket and what it answers from.
    pending: Option<(UnixListener, Arc<Registry>)>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Listen on `path` and answer from `registry` once [`start`](Self::start)ed (binding needs the file system
    /// access the daemon may give up before it starts threads).
    pub fn bind(path: &Path, registry: Arc<Registry>) -> anyhow::Result<ControlServer> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                bail!("cannot listen on {}: the control socket is in use by a running process", path.display());
            }
            std::fs::remove_file(path).with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        let listener = UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
        let file = OwnedPath::claim(path).with_context(|| format!("cannot stat the socket {}", path.display()))?;
        listener.set_nonblocking(true).context("control socket")?;
        Ok(ControlServer {
            resize: None,
            path: path.to_path_buf(),
            file: Some(file),
            stop: Arc::new(AtomicBool::new(false)),
            pending: Some((listener, registry)),
            thread: None,
        })
    }

    /// Answer on a socket another process bound at `path` and handed over (a Xen guest's worker, whose
    /// supervisor binds and removes the socket file).
    pub fn from_listener(listener: UnixListener, path: PathBuf, registry: Arc<Registry>) -> anyhow::Result<Self> {
        listener.set_nonblocking(true).context("control socket")?;
        Ok(ControlServer {
            resize: None,
            path,
            file: None,
            stop: Arc::new(AtomicBool::new(false)),
            pending: Some((listener, registry)),
            thread: None,
        })
    }

    /// Leave the removal of the socket file (if this process bound it) to whoever takes the returned id.
    pub fn hand_over(&mut self) -> Option<FileId> {
        self.file.as_mut().and_then(OwnedPath::hand_over)
    }

    /// Answer `resize` with `hook` (before [`start`](Self::start)).
    pub fn set_resize(&mut self, hook: ResizeHook) {
        self.resize = Some(hook);
    }

    /// Start answering on a thread of its own (once; later calls do nothing).
    pub fn start(&mut self) -> anyhow::Result<()> {
        let Some((listener, registry)) = self.pending.take() else { return Ok(()) };
        let flag = self.stop.clone();
        let resize = self.resize.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(&listener, &registry, resize.as_ref(), &flag))
            .context("spawning the control thread")?;
        self.thread = Some(thread);
        tracing::info!(socket = %self.path.display(), "control socket listening");
        Ok(())
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // The socket file goes with `file`, after the thread that answers on it.
    }
}

fn accept_loop(listener: &UnixListener, registry: &Registry, resize: Option<&ResizeHook>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = answer(stream, registry, resize) {
                    tracing::debug!(error = %e, "control request failed");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                std::thread::sleep(ACCEPT_POLL);
            }
        }
    }
}

fn answer(stream: UnixStream, registry: &Registry, resize: Option<&ResizeHook>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line)?;
    let reply = match line.trim() {
        "stats" => registry.render_text(),
        "stats prometheus" => registry.render_prometheus(),
        "resize" => match resize {
            Some(hook) => format!("{}\n", hook()),
            None => "error: resizing is not supported here: this daemon serves no disk of its own\n".to_string(),
        },
        other => format!("error: unknown request {other:?} (expected `stats`, `stats prometheus` or `resize`)\n"),
    };
    (&stream).write_all(reply.as_bytes())
}

/// `blkbackd stats`: ask the daemon behind `path` for its statistics.
pub fn query(path: &Path, prometheus: bool) -> anyhow::Result<String> {
    request(path, if prometheus { "stats prometheus" } else { "stats" })
}

/// `blkbackd resize`: ask the daemon behind `path` to look at its disks' sizes now.
pub fn resize(path: &Path) -> anyhow::Result<String> {
    request(path, "resize")
}

fn request(path: &Path, line: &str) -> anyhow::Result<String> {
    let mut stream = UnixStream::connect(path).with_context(|| {
        format!("cannot connect to {}: is blkbackd running with --control {}?", path.display(), path.display())
    })?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(format!("{line}\n").as_bytes())?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).context("reading the statistics")?;
    if let Some(error) = reply.strip_prefix("error: ") {
        bail!("{}", error.trim());
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_runs_the_hook_or_says_why_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let with = dir.path().join("with.ctl");
        let mut server = ControlServer::bind(&with, Registry::new()).expect("bind");
        server.set_resize(Arc::new(|| "resize check requested".to_string()));
        server.start().expect("start");
        assert_eq!(resize(&with).expect("resize"), "resize check requested\n");

        let without = dir.path().join("without.ctl");
        let mut server = ControlServer::bind(&without, Registry::new()).expect("bind");
        server.start().expect("start");
        let e = resize(&without).expect_err("no resize hook");
        assert!(e.to_string().contains("not supported"), "{e}");
    }
}
