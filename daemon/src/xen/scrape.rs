// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Reading every worker's statistics for the merged metrics endpoint ([`super::metrics`]): `stats prometheus`
//! on each worker's control socket, all at once, under one deadline and byte bounds.
//!
//! A worker is guest-controlled code once its guest took it over, so everything here assumes the other end is
//! hostile: the connection is made without blocking (a worker that accepts nothing cannot make the supervisor
//! wait for room in its backlog), every answer is read under one [`Limits::deadline`] for all workers together
//! (one `poll` over every socket: a worker that never answers costs the scrape that deadline, no more, however
//! many there are), an answer larger than [`Limits::per_worker`] is dropped as soon as it is (a flood is read to
//! the bound, not to its end), and all answers together are held to [`Limits::total`]. What comes back is bytes;
//! [`super::metrics`] decides whether they are an exposition.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use transport_xen::services::DomId;

/// What the supervisor asks each worker (the control socket's protocol: one line).
const REQUEST: &[u8] = b"stats prometheus\n";
/// The longest worker error message kept for the log.
const MAX_MESSAGE: usize = 200;

/// The bounds of one scrape.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// How long all workers together have to answer, from the first connection.
    pub deadline: Duration,
    /// The largest answer taken from one worker.
    pub per_worker: usize,
    /// The most bytes taken from all workers together.
    pub total: usize,
}

impl Limits {
    /// The endpoint's: 2 s (a worker answers within its control thread's 200 ms accept poll plus the rendering),
    /// 1 MiB per worker (a guest with many vbds and queues renders tens of KiB), 16 MiB in all.
    pub const DEFAULT: Limits = Limits { deadline: Duration::from_secs(2), per_worker: 1 << 20, total: 16 << 20 };
}

/// Why a worker's statistics are missing from a scrape.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// Its control socket is gone, refuses, or its backlog is full (it accepts nothing).
    #[error("cannot reach its control socket {}: {cause}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        cause: io::Error,
    },
    /// Reading its answer failed.
    #[error("reading its answer: {0}")]
    Io(io::Error),
    /// No complete answer (ended by closing the connection) in time.
    #[error("no complete answer within {0:?} ({1} bytes so far)")]
    Timeout(Duration, usize),
    /// Its answer, or all answers together, grew past the bound.
    #[error("its answer exceeds {limit} bytes{}", if *.total { " (with the other workers' answers)" } else { "" })]
    TooLarge {
        /// The bound.
        limit: usize,
        /// Whether it was the bound of all answers together.
        total: bool,
    },
    /// It answered with an error line.
    #[error("it answered an error: {0}")]
    Refused(String),
    /// Its answer is not a worker's exposition.
    #[error("malformed answer, line {line}: {what}")]
    Malformed {
        /// 1-based.
        line: usize,
        /// What is wrong with it.
        what: String,
    },
}

/// One connection being read.
struct Pending {
    index: usize,
    stream: UnixStream,
    answer: Vec<u8>,
}

/// Ask every `(domid, control socket)` of `targets` for its Prometheus text; the answers in the same order.
pub fn scrape_all(targets: &[(DomId, PathBuf)], limits: &Limits) -> Vec<(DomId, Result<Vec<u8>, ScrapeError>)> {
    let started = Instant::now();
    let mut results: Vec<Option<Result<Vec<u8>, ScrapeError>>> = targets.iter().map(|_| None).collect();
    let mut pending = Vec::with_capacity(targets.len());
    for (index, (_, path)) in targets.iter().enumerate() {
        let connected = connect_nonblocking(path).and_then(|mut stream| {
            stream.write_all(REQUEST)?;
            Ok(stream)
        });
        match connected {
            Ok(stream) => pending.push(Pending { index, stream, answer: Vec::new() }),
            Err(source) => results[index] = Some(Err(ScrapeError::Connect { path: path.clone(), cause: source })),
        }
    }
    let mut total = 0usize;
    let mut chunk = vec![0u8; 64 << 10];
    while !pending.is_empty() {
        let left = limits.deadline.saturating_sub(started.elapsed());
        if left.is_zero() {
            break;
        }
        let mut fds: Vec<libc::pollfd> = pending
            .iter()
            .map(|p| libc::pollfd { fd: p.stream.as_raw_fd(), events: libc::POLLIN, revents: 0 })
            .collect();
        // Rounded up: a poll that returns a little early would only spin.
        let ms = libc::c_int::try_from(left.as_millis() + 1).unwrap_or(libc::c_int::MAX);
        let nfds = libc::nfds_t::try_from(fds.len()).unwrap_or(libc::nfds_t::MAX);
        // SAFETY: `fds` is a valid array of `nfds` pollfd entries for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), nfds, ms) };
        if rc < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            for p in pending.drain(..) {
                results[p.index] = Some(Err(ScrapeError::Io(io::Error::new(error.kind(), error.to_string()))));
            }
            break;
        }
        let mut still = Vec::with_capacity(pending.len());
        for (mut p, fd) in pending.into_iter().zip(&fds) {
            if fd.revents == 0 {
                still.push(p);
                continue;
            }
            match read_available(&mut p, &mut chunk, limits, &mut total) {
                None => still.push(p),
                Some(done) => results[p.index] = Some(done.map(|()| std::mem::take(&mut p.answer))),
            }
        }
        pending = still;
    }
    for p in pending {
        results[p.index] = Some(Err(ScrapeError::Timeout(limits.deadline, p.answer.len())));
    }
    targets
        .iter()
        .zip(results)
        .map(|(&(domid, _), result)| {
            let result = result.unwrap_or(Err(ScrapeError::Timeout(limits.deadline, 0)));
            (domid, result.and_then(refused))
        })
        .collect()
}

/// Read what `p`'s worker has sent so far: `None` while its answer goes on, else how it ended.
fn read_available(
    p: &mut Pending,
    chunk: &mut [u8],
    limits: &Limits,
    total: &mut usize,
) -> Option<Result<(), ScrapeError>> {
    loop {
        // Never more than one byte past the bound: that byte is how a flood is told from an answer of the bound.
        let room = (limits.per_worker + 1).saturating_sub(p.answer.len()).min(chunk.len());
        match p.stream.read(&mut chunk[..room]) {
            Ok(0) => return Some(Ok(())),
            Ok(n) => {
                if p.answer.len() + n > limits.per_worker {
                    return Some(Err(ScrapeError::TooLarge { limit: limits.per_worker, total: false }));
                }
                *total += n;
                if *total > limits.total {
                    return Some(Err(ScrapeError::TooLarge { limit: limits.total, total: true }));
                }
                p.answer.extend_from_slice(&chunk[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Some(Err(ScrapeError::Io(e))),
        }
    }
}

/// An answer that is the control socket's `error: ...` line is an error (its first line, bounded and printable).
fn refused(answer: Vec<u8>) -> Result<Vec<u8>, ScrapeError> {
    let Some(message) = answer.strip_prefix(b"error: ") else { return Ok(answer) };
    let line = message.split(|&b| b == b'\n').next().unwrap_or_default();
    let text: String =
        String::from_utf8_lossy(line).chars().map(|c| if c.is_control() { '?' } else { c }).take(MAX_MESSAGE).collect();
    Err(ScrapeError::Refused(text))
}

/// Connect to the Unix socket at `path` without waiting: a listener whose backlog is full fails at once
/// (`WouldBlock`) instead of blocking the caller until it accepts. The stream is non-blocking.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: sockaddr_un is plain old data, for which all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a usable Unix socket path"));
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).map_err(io::Error::other)?;
    for (to, &from) in addr.sun_path.iter_mut().zip(bytes) {
        *to = libc::c_char::from_ne_bytes([from]);
    }
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>()).map_err(io::Error::other)?;
    // SAFETY: socket takes integers and returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just gave us, owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is an initialised sockaddr_un of `len` bytes that outlives the call.
    let rc = unsafe { libc::connect(socket.as_raw_fd(), (&raw const addr).cast::<libc::sockaddr>(), len) };
    if rc != 0 {
        let error = io::Error::last_os_error();
        if error.kind() == io::ErrorKind::WouldBlock {
            return Err(io::Error::new(io::ErrorKind::WouldBlock, "its listen backlog is full: it accepts nothing"));
        }
        return Err(error);
    }
    Ok(UnixStream::from(socket))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A listener that never accepts: connecting still succeeds (into its backlog) and the answer times out; once
    /// its backlog is full (connections closed by the client stay queued until accepted), connecting fails at
    /// once instead of blocking.
    #[test]
    fn a_worker_that_accepts_nothing_costs_the_deadline_and_never_blocks_the_connect() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("silent.ctl");
        let listener = UnixListener::bind(&path).expect("bind");
        let limits = Limits { deadline: Duration::from_millis(100), ..Limits::DEFAULT };
        let result = scrape_all(&[(7, path.clone())], &limits).pop().expect("one result").1;
        assert!(matches!(result, Err(ScrapeError::Timeout(_, 0))), "{result:?}");
        // Far more than any backlog (somaxconn is 4096 by default).
        let full = (0..200_000).find_map(|_| connect_nonblocking(&path).err()).expect("the backlog fills up");
        assert_eq!(full.kind(), io::ErrorKind::WouldBlock, "{full}");
        let result = scrape_all(&[(7, path.clone())], &limits).pop().expect("one result").1;
        assert!(
            matches!(&result, Err(ScrapeError::Connect { cause, .. }) if cause.kind() == io::ErrorKind::WouldBlock),
            "{result:?}"
        );
        drop(listener);
    }

    #[test]
    fn a_missing_socket_or_an_error_line_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let results = scrape_all(&[(3, dir.path().join("none.ctl"))], &Limits::DEFAULT);
        assert!(matches!(results[0].1, Err(ScrapeError::Connect { .. })), "{:?}", results[0].1);
        let error = refused(b"error: unknown request \x1b[31m\nmore".to_vec()).expect_err("refused");
        assert_eq!(error.to_string(), "it answered an error: unknown request ?[31m");
        assert_eq!(refused(b"# HELP x y\n".to_vec()).expect("not an error"), b"# HELP x y\n");
    }
}
