// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `--metrics-listen ADDR`: the Prometheus endpoint. A tiny HTTP/1.1 server on a thread of its own: `GET /metrics`
//! answers the text exposition (`text/plain; version=0.0.4`) of a registry (`blkbackd vhost-user`) or of any
//! [`Render`] function (`blkbackd xen`: every guest's worker, merged by `xen::metrics`), anything else 404. One request per
//! connection, answered in turn; a request is bounded in size and in time (as a whole, not per read), so a slow
//! or silent client holds the thread for [`REQUEST_DEADLINE`] at most. Like the control socket it only reads the
//! queues' atomic counters, never the I/O path.
//!
//! The socket is bound before the process locks itself down; afterwards the thread needs only accept4, read,
//! write, setsockopt (timeouts), fcntl/ioctl(FIONBIO) and close, which the vhost-user filter allows.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use device_blk::stats::Registry;

use crate::owned_path::{FileId, OwnedPath};

/// The largest request head read; longer ones are answered 431 and closed.
const MAX_REQUEST: usize = 4096;
/// How long a client has to send its request head (in total) and then to take the answer.
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
const ACCEPT_POLL: Duration = Duration::from_millis(100);
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What `GET /metrics` answers: the whole text exposition, rendered at each request on the endpoint's thread.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Where the endpoint listens: `IP:PORT` or the path of a Unix socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetricsAddr {
    /// A TCP address (`127.0.0.1:9185`, `[::1]:9185`; port 0 picks a free one, logged).
    Tcp(SocketAddr),
    /// A Unix socket path (anything with a `/`).
    Unix(PathBuf),
}

impl FromStr for MetricsAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(MetricsAddr::Tcp(addr));
        }
        if text.contains('/') {
            return Ok(MetricsAddr::Unix(PathBuf::from(text)));
        }
        Err(format!("{text:?} is neither IP:PORT (e.g. 127.0.0.1:9185) nor a Unix socket path (e.g. ./metrics.sock)"))
    }
}

impl fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsAddr::Tcp(addr) => write!(f, "{addr}"),
            MetricsAddr::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// A bound metrics endpoint; serving from [`start`](Self::start) until dropped (a Unix socket file is removed).
pub struct MetricsServer {
    /// Where it listens (with the port the kernel chose for port 0).
    pub address: MetricsAddr,
    pending: Option<(Listener, Render)>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// A Unix socket's file (removed on drop, unless handed over).
    file: Option<OwnedPath>,
}

impl MetricsServer {
    /// Bind `addr` (before the lock-down: creating a socket is not allowed afterwards) to serve `registry`.
    pub fn bind(addr: &MetricsAddr, registry: Arc<Registry>) -> anyhow::Result<MetricsServer> {
        Self::bind_with(addr, Arc::new(move || registry.render_prometheus()))
    }

    /// Bind `addr` to serve what `render` returns.
    pub fn bind_with(addr: &MetricsAddr, render: Render) -> anyhow::Result<MetricsServer> {
        let context = || format!("cannot listen on --metrics-listen {addr}");
        let (listener, address, file) = match addr {
            MetricsAddr::Tcp(tcp) => {
                let listener = TcpListener::bind(tcp).with_context(context)?;
                let bound = listener.local_addr().with_context(context)?;
                listener.set_nonblocking(true).with_context(context)?;
                (Listener::Tcp(listener), MetricsAddr::Tcp(bound), None)
            }
            MetricsAddr::Unix(path) => {
                if path.exists() {
                    if UnixStream::connect(path).is_ok() {
                        bail!("cannot listen on {}: a running process serves it", path.display());
                    }
                    std::fs::remove_file(path).with_context(|| format!("removing the stale {}", path.display()))?;
                }
                let listener = UnixListener::bind(path).with_context(context)?;
                let file = OwnedPath::claim(path).with_context(context)?;
                listener.set_nonblocking(true).with_context(context)?;
                (Listener::Unix(listener), addr.clone(), Some(file))
            }
        };
        Ok(MetricsServer {
            address,
            pending: Some((listener, render)),
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
            file,
        })
    }

    /// Leave the removal of a Unix socket's file to whoever takes the returned id.
    pub fn hand_over(&mut self) -> Option<FileId> {
        self.file.as_mut().and_then(OwnedPath::hand_over)
    }

    /// Start serving on a thread of its own (once; later calls do nothing).
    pub fn start(&mut self) -> anyhow::Result<()> {
        let Some((listener, render)) = self.pending.take() else { return Ok(()) };
        let stop = Arc::clone(&self.stop);
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || serve(&listener, render.as_ref(), &stop))
            .context("spawning the metrics thread")?;
        self.thread = Some(thread);
        tracing::info!(address = %self.address, "metrics endpoint listening (GET /metrics)");
        Ok(())
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // A Unix socket's file goes with `file`, after the thread that answers on it.
    }
}

fn serve(listener: &Listener, render: &(dyn Fn() -> String + Send + Sync), stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let accepted = match listener {
            Listener::Tcp(l) => l.accept().and_then(|(s, _)| {
                s.set_nonblocking(false)?;
                Ok(Box::new(s) as Box<dyn Conn>)
            }),
            Listener::Unix(l) => l.accept().and_then(|(s, _)| {
                s.set_nonblocking(false)?;
                Ok(Box::new(s) as Box<dyn Conn>)
            }),
        };
        match accepted {
            Ok(mut conn) => {
                if let Err(error) = answer(conn.as_mut(), render) {
                    tracing::debug!(%error, "metrics request failed");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(error) => {
                tracing::warn!(%error, "metrics endpoint: accept failed");
                std::thread::sleep(ACCEPT_POLL);
            }
        }
    }
}

/// A connected stream with timeouts.
trait Conn: Read + Write {
    fn timeouts(&self, read: Duration, write: Duration) -> io::Result<()>;
}

impl Conn for std::net::TcpStream {
    fn timeouts(&self, read: Duration, write: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(read))?;
        self.set_write_timeout(Some(write))
    }
}

impl Conn for UnixStream {
    fn timeouts(&self, read: Duration, write: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(read))?;
        self.set_write_timeout(Some(write))
    }
}

fn answer(conn: &mut dyn Conn, render: &(dyn Fn() -> String + Send + Sync)) -> io::Result<()> {
    let (status, body) = match read_head(conn)? {
        Head::Complete(head) => route(&head, render),
        Head::TooLarge => ("431 Request Header Fields Too Large", "request head too large\n".to_string()),
    };
    conn.timeouts(REQUEST_DEADLINE, REQUEST_DEADLINE)?;
    let content_type = if status.starts_with("200") { CONTENT_TYPE } else { "text/plain; charset=utf-8" };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body.as_bytes())?;
    conn.flush()
}

enum Head {
    Complete(String),
    TooLarge,
}

/// Read up to the blank line ending the request head, within [`MAX_REQUEST`] bytes and [`REQUEST_DEADLINE`].
fn read_head(conn: &mut dyn Conn) -> io::Result<Head> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "the client was too slow to send its request"));
        }
        conn.timeouts(left, REQUEST_DEADLINE)?;
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the client closed before a full request"));
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(Head::Complete(String::from_utf8_lossy(&head).into_owned()));
        }
        if head.len() > MAX_REQUEST {
            return Ok(Head::TooLarge);
        }
    }
}

/// The answer to a request head: `GET /metrics` (with or without a query string) or 404.
fn route(head: &str, render: &(dyn Fn() -> String + Send + Sync)) -> (&'static str, String) {
    let mut words = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target, version) = (words.next(), words.next(), words.next());
    let path = target.map(|t| t.split('?').next().unwrap_or_default());
    match (method, path, version) {
        (Some("GET"), Some("/metrics"), Some(v)) if v.starts_with("HTTP/1.") => ("200 OK", render()),
        _ => ("404 Not Found", "not found: the metrics are at GET /metrics\n".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_as_tcp_or_unix_paths() {
        assert_eq!("127.0.0.1:9185".parse(), Ok(MetricsAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 9185)))));
        assert!(matches!("[::1]:0".parse::<MetricsAddr>(), Ok(MetricsAddr::Tcp(_))));
        assert_eq!("/run/m.sock".parse(), Ok(MetricsAddr::Unix(PathBuf::from("/run/m.sock"))));
        assert!("localhost".parse::<MetricsAddr>().is_err());
    }

    #[test]
    fn only_get_metrics_is_served_and_slow_or_large_requests_are_bounded() {
        let registry = Registry::new();
        let addr = MetricsAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 0)));
        let mut server = MetricsServer::bind(&addr, Arc::clone(&registry)).expect("bind");
        server.start().expect("start");
        let MetricsAddr::Tcp(bound) = server.address.clone() else { panic!("tcp") };
        let ask = |request: &[u8]| {
            let mut stream = std::net::TcpStream::connect(bound).expect("connect");
            stream.write_all(request).expect("send");
            let mut reply = String::new();
            stream.read_to_string(&mut reply).expect("read");
            reply
        };
        let ok = ask(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.contains("version=0.0.4"), "{ok}");
        assert!(ok.contains("# TYPE blkbackd_request_duration_seconds histogram"), "{ok}");
        assert!(ask(b"GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(ask(b"POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        // Exactly what the server reads before it gives up (9 reads of 512), so that it closes with nothing unread.
        assert!(ask(&[b'A'; MAX_REQUEST + 512]).starts_with("HTTP/1.1 431"));
        // A client that never finishes its request is dropped after the deadline, and the next one is served.
        let started = Instant::now();
        let mut silent = std::net::TcpStream::connect(bound).expect("connect");
        silent.write_all(b"GET /metr").expect("send");
        let ok = ask(b"GET /metrics HTTP/1.0\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(started.elapsed() < REQUEST_DEADLINE * 3, "{:?}", started.elapsed());
        let mut rest = Vec::new();
        assert_eq!(silent.read_to_end(&mut rest).unwrap_or(0), 0, "the slow client was closed without an answer");
    }
}
