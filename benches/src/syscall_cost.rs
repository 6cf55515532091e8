// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `blkback-bench syscall-cost`: what the system calls of a userspace backend's wake-up cost on this machine, in
//! CPU time per call (`getrusage`, user + system), and what one wake-up of a sleeping thread costs (two threads
//! passing an eventfd token back and forth through epoll, as a ring's worker is woken by its event channel or its
//! io_uring's completion eventfd). Meant for the real Xen lab's dom0 (`xen-lab exec '/mnt/host/bin/blkback-bench
//! syscall-cost'`), where a PV guest's system call goes through the hypervisor and the clock may have no vDSO: the
//! figures explain the userspace backends' CPU per I/O there against a kernel backend's ring thread, which makes
//! no system call and switches no address space.

use std::fmt::Write as _;
use std::hint::black_box;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Result};

/// Options of the measurement.
#[derive(clap::Args, Debug)]
pub struct SyscallCostArgs {
    /// Calls per measurement (wake-ups: a tenth of it).
    #[arg(long, default_value_t = 20_000)]
    iterations: u32,
    /// Append the Markdown table to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

/// The process's CPU time so far (user + system), in µs.
fn cpu_us() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into the buffer, which is large enough and zero-initialised.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return 0.0;
    }
    // SAFETY: getrusage succeeded, so the struct is initialised (and it was zeroed before anyway).
    let usage = unsafe { usage.assume_init() };
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    us(usage.ru_utime) + us(usage.ru_stime)
}

/// One row: CPU µs and wall µs per operation.
struct Row {
    what: &'static str,
    cpu_us: f64,
    wall_us: f64,
    count: u32,
}

fn measure(what: &'static str, count: u32, mut op: impl FnMut()) -> Row {
    let (cpu0, wall0) = (cpu_us(), Instant::now());
    for _ in 0..count {
        op();
    }
    let (cpu1, wall) = (cpu_us(), wall0.elapsed());
    let n = f64::from(count.max(1));
    Row { what, cpu_us: (cpu1 - cpu0) / n, wall_us: wall.as_secs_f64() * 1e6 / n, count }
}

fn eventfd() -> Result<OwnedFd> {
    // SAFETY: eventfd takes no pointer; a non-negative result is a new descriptor that we own from here on.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    ensure!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn write_token(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live 8-byte buffer to a descriptor we own.
    let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
}

fn read_token(fd: &OwnedFd) {
    let mut buf = [0u8; 8];
    // SAFETY: reads at most 8 bytes into a live 8-byte buffer from a descriptor we own.
    let _ = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
}

/// An epoll descriptor watching `fd` for input.
fn epoll_on(fd: &OwnedFd) -> Result<OwnedFd> {
    // SAFETY: epoll_create1 takes no pointer; a non-negative result is a new descriptor we own.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    ensure!(ep >= 0, "epoll_create1: {}", std::io::Error::last_os_error());
    // SAFETY: as above, a fresh descriptor.
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: 1 };
    // SAFETY: both descriptors are open; the event is a live struct read during the call.
    let rc = unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &raw mut ev) };
    ensure!(rc == 0, "epoll_ctl: {}", std::io::Error::last_os_error());
    Ok(ep)
}

fn epoll_wait(ep: &OwnedFd, timeout_ms: i32) -> i32 {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
    // SAFETY: the array outlives the call and its length is what we pass.
    unsafe { libc::epoll_wait(ep.as_raw_fd(), events.as_mut_ptr(), 4, timeout_ms) }
}

fn clock(id: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into a live struct.
    unsafe { libc::clock_gettime(id, &raw mut ts) };
    ts.tv_nsec
}

/// Two threads pass a token `count` times each way: every pass wakes a thread asleep in `epoll_wait`.
fn wake_ups(count: u32) -> Result<Row> {
    let (to_peer, to_us) = (eventfd()?, eventfd()?);
    let (peer_ep, our_ep) = (epoll_on(&to_peer)?, epoll_on(&to_us)?);
    let peer = std::thread::scope(|s| {
        let peer = s.spawn(|| {
            for _ in 0..count {
                epoll_wait(&peer_ep, -1);
                read_token(&to_peer);
                write_token(&to_us);
            }
        });
        // (Both threads' CPU time: `RUSAGE_SELF`.)
        let row = measure("wake-up of a thread asleep in epoll_wait (eventfd write, epoll_wait, read)", count, || {
            write_token(&to_peer);
            epoll_wait(&our_ep, -1);
            read_token(&to_us);
        });
        peer.join().map(|()| row)
    });
    let mut row = peer.map_err(|_| anyhow::anyhow!("the peer thread panicked"))?;
    // Two wake-ups per round trip.
    row.cpu_us /= 2.0;
    row.wall_us /= 2.0;
    row.count *= 2;
    Ok(row)
}

/// Measure and render the table.
pub fn run(args: &SyscallCostArgs) -> Result<String> {
    let n = args.iterations.max(10);
    let efd = eventfd()?;
    let ep = epoll_on(&efd)?;
    let mut rows = vec![
        measure("nothing (the loop itself)", n, || {
            black_box(0);
        }),
        measure("getppid (a system call that does nothing)", n, || {
            black_box(std::os::unix::process::parent_id());
        }),
        measure("clock_gettime(CLOCK_MONOTONIC) (latency figures)", n, || {
            black_box(clock(libc::CLOCK_MONOTONIC));
        }),
        measure("clock_gettime(CLOCK_MONOTONIC_COARSE)", n, || {
            black_box(clock(libc::CLOCK_MONOTONIC_COARSE));
        }),
        measure("epoll_wait, timeout 0, nothing ready", n, || {
            black_box(epoll_wait(&ep, 0));
        }),
        measure("eventfd write + read (two calls)", n, || {
            write_token(&efd);
            read_token(&efd);
        }),
    ];
    rows.push(wake_ups(n / 10)?);
    let mut out =
        String::from("| operation | CPU µs per operation | wall µs per operation | operations |\n|---|---|---|---|\n");
    for r in &rows {
        writeln!(out, "| {} | {:.2} | {:.2} | {} |", r.what, r.cpu_us, r.wall_us, r.count)?;
    }
    if let Some(path) = &args.markdown {
        crate::append_markdown(path, &out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_every_row_and_the_wake_ups() {
        let table = run(&SyscallCostArgs { iterations: 200, markdown: None }).expect("table");
        assert_eq!(table.lines().count(), 2 + 7, "{table}");
        // 20 round trips: 40 wake-ups
        assert!(table.contains("| 40 |"), "{table}");
    }
}
