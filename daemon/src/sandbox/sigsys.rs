// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What happens on a forbidden system call: the filter answers `SECCOMP_RET_TRAP`, the kernel sends `SIGSYS`
//! to the calling thread, and this handler writes one line to stderr naming the call and the thread
//! (`blkbackd: seccomp: forbidden system call 41 (socket) in thread blkif-d1-q0 (tid 812); ending the process`),
//! then ends the process with `SIGSYS`, so a service manager sees the signal and the kernel dumps core where that
//! is enabled.
//!
//! Why not `SECCOMP_RET_KILL_PROCESS`: it kills at once and leaves at most an audit record in the kernel log,
//! which an operator of a per-guest daemon rarely reads; the line on stderr lands in the daemon's own log.
//!
//! The handler only makes async-signal-safe system calls that every filter allows (`prctl(PR_GET_NAME)`,
//! `gettid`, `write`, `rt_sigaction`, `getpid`, `tgkill` to its own process) and allocates nothing. To die of
//! the signal it resets `SIGSYS` to its default action and sends it to its own thread: it stays pending while the
//! handler runs (the kernel blocks it there) and is delivered, fatally, when the handler returns.

use std::io;

/// `siginfo_t` as the kernel fills it for `SIGSYS` on 64-bit Linux (`include/uapi/asm-generic/siginfo.h`):
/// the three ints, padding to 8 bytes, then the `_sigsys` member of the union.
#[repr(C)]
#[allow(dead_code)] // the kernel's layout; only `syscall` is read
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

const _: () = assert!(std::mem::size_of::<SigsysInfo>() <= std::mem::size_of::<libc::siginfo_t>());

/// Install the `SIGSYS` handler (process-wide, as signal dispositions are).
pub fn install() -> io::Result<()> {
    // SAFETY: sigaction is plain data; every field we rely on is set below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: `action.sa_mask` is a valid sigset_t to initialise.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: a valid action for a valid signal; the old action is not wanted.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A fixed buffer that a signal handler can format into.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let room = self.buf.len() - self.len;
        let n = bytes.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn number(&mut self, value: impl Into<u64>) {
        let mut value: u64 = value.into();
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + u8::try_from(value % 10).unwrap_or(0);
            value /= 10;
            if value == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The line the handler writes (separate from it for tests).
fn describe(line: &mut Line, syscall: libc::c_long, thread: &[u8], tid: libc::c_long) {
    line.push(b"blkbackd: seccomp: forbidden system call ");
    if syscall < 0 {
        line.push(b"-");
    }
    line.number(syscall.unsigned_abs());
    if let Some(name) = syscall_name(syscall) {
        line.push(b" (");
        line.push(name.as_bytes());
        line.push(b")");
    }
    line.push(b" in thread ");
    line.push(thread);
    line.push(b" (tid ");
    line.number(tid.unsigned_abs());
    line.push(b"); ending the process\n");
}

extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler; for SIGSYS it has the `_sigsys` layout
    // of `SigsysInfo`, which is no larger than `siginfo_t`.
    let syscall = if info.is_null() { -1 } else { libc::c_long::from(unsafe { (*info.cast::<SigsysInfo>()).syscall }) };
    let mut name = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes and a NUL into the 17-byte buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr(), 0, 0, 0) };
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(16);
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    let mut line = Line { buf: [0; 256], len: 0 };
    describe(&mut line, syscall, &name[..name_len], tid);
    // SAFETY: writing our own stack buffer to stderr; a failed write cannot be reported anywhere.
    unsafe { libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len) };
    // SAFETY: zeroed sigaction is SIG_DFL with an empty mask; sigaction, getpid and tgkill are async-signal-safe.
    // The signal to ourselves stays pending until this handler returns, then the default action ends the process.
    unsafe {
        let default: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGSYS, &default, std::ptr::null_mut());
        libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGSYS);
    }
}

macro_rules! syscall_names {
    ($($name:ident),* $(,)?) => {
        &[$((libc::$name, stringify!($name))),*]
    };
}

/// Names of the system calls this daemon makes or that an attacker would want, for the log line.
const NAMES: &[(libc::c_long, &str)] = syscall_names![
    SYS_read,
    SYS_write,
    SYS_close,
    SYS_fstat,
    SYS_lseek,
    SYS_mmap,
    SYS_mprotect,
    SYS_munmap,
    SYS_brk,
    SYS_rt_sigaction,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_rt_sigtimedwait,
    SYS_rt_sigqueueinfo,
    SYS_ioctl,
    SYS_pread64,
    SYS_pwrite64,
    SYS_readv,
    SYS_writev,
    SYS_sched_yield,
    SYS_mremap,
    SYS_madvise,
    SYS_dup,
    SYS_dup3,
    SYS_nanosleep,
    SYS_getpid,
    SYS_socket,
    SYS_connect,
    SYS_accept,
    SYS_accept4,
    SYS_sendto,
    SYS_recvfrom,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_shutdown,
    SYS_bind,
    SYS_listen,
    SYS_getsockname,
    SYS_getpeername,
    SYS_socketpair,
    SYS_setsockopt,
    SYS_getsockopt,
    SYS_clone,
    SYS_clone3,
    SYS_execve,
    SYS_execveat,
    SYS_exit,
    SYS_exit_group,
    SYS_wait4,
    SYS_kill,
    SYS_tgkill,
    SYS_tkill,
    SYS_fcntl,
    SYS_flock,
    SYS_fsync,
    SYS_fdatasync,
    SYS_ftruncate,
    SYS_getcwd,
    SYS_chdir,
    SYS_fchdir,
    SYS_fchmod,
    SYS_fchown,
    SYS_umask,
    SYS_gettimeofday,
    SYS_getrlimit,
    SYS_getrusage,
    SYS_ptrace,
    SYS_getuid,
    SYS_setuid,
    SYS_setgid,
    SYS_setresuid,
    SYS_setresgid,
    SYS_setgroups,
    SYS_capget,
    SYS_capset,
    SYS_sigaltstack,
    SYS_personality,
    SYS_prctl,
    SYS_mount,
    SYS_umount2,
    SYS_chroot,
    SYS_pivot_root,
    SYS_unshare,
    SYS_setns,
    SYS_gettid,
    SYS_futex,
    SYS_sched_getaffinity,
    SYS_set_robust_list,
    SYS_rseq,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_pwait,
    SYS_epoll_pwait2,
    SYS_ppoll,
    SYS_eventfd2,
    SYS_openat,
    SYS_openat2,
    SYS_newfstatat,
    SYS_statx,
    SYS_unlinkat,
    SYS_renameat2,
    SYS_mkdirat,
    SYS_mknodat,
    SYS_fchownat,
    SYS_fchmodat,
    SYS_linkat,
    SYS_symlinkat,
    SYS_readlinkat,
    SYS_faccessat,
    SYS_faccessat2,
    SYS_getdents64,
    SYS_fallocate,
    SYS_preadv,
    SYS_pwritev,
    SYS_preadv2,
    SYS_pwritev2,
    SYS_getrandom,
    SYS_memfd_create,
    SYS_bpf,
    SYS_seccomp,
    SYS_userfaultfd,
    SYS_perf_event_open,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_kexec_load,
    SYS_init_module,
    SYS_finit_module,
    SYS_delete_module,
    SYS_keyctl,
    SYS_add_key,
    SYS_request_key,
    SYS_io_uring_setup,
    SYS_io_uring_enter,
    SYS_io_uring_register,
    SYS_pidfd_open,
    SYS_pidfd_getfd,
    SYS_pidfd_send_signal,
    SYS_open_by_handle_at,
    SYS_name_to_handle_at,
    SYS_sched_setaffinity,
    SYS_membarrier,
    SYS_madvise,
    SYS_timerfd_create,
    SYS_timerfd_settime,
    SYS_restart_syscall,
    SYS_syslog,
    SYS_reboot,
    SYS_swapon,
];

#[cfg(target_arch = "x86_64")]
const X86_64_NAMES: &[(libc::c_long, &str)] = syscall_names![
    SYS_open,
    SYS_stat,
    SYS_lstat,
    SYS_poll,
    SYS_access,
    SYS_pipe,
    SYS_select,
    SYS_dup2,
    SYS_fork,
    SYS_vfork,
    SYS_epoll_wait,
    SYS_epoll_create,
    SYS_unlink,
    SYS_rename,
    SYS_mkdir,
    SYS_rmdir,
    SYS_creat,
    SYS_link,
    SYS_symlink,
    SYS_readlink,
    SYS_chmod,
    SYS_chown,
    SYS_getdents,
    SYS_arch_prctl,
    SYS_iopl,
    SYS_ioperm,
    SYS_modify_ldt,
];
#[cfg(not(target_arch = "x86_64"))]
const X86_64_NAMES: &[(libc::c_long, &str)] = &[];

/// The name of system call `nr` on this architecture, if we know it.
pub fn syscall_name(nr: libc::c_long) -> Option<&'static str> {
    NAMES.iter().chain(X86_64_NAMES).find(|(n, _)| *n == nr).map(|(_, name)| &name[4..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_names_the_call_and_the_thread() {
        let mut line = Line { buf: [0; 256], len: 0 };
        describe(&mut line, libc::SYS_socket, b"blkif-d1-q0", 812);
        let text = std::str::from_utf8(&line.buf[..line.len]).expect("ASCII");
        assert_eq!(
            text,
            format!(
                "blkbackd: seccomp: forbidden system call {} (socket) in thread blkif-d1-q0 (tid 812); ending the \
                 process\n",
                libc::SYS_socket
            )
        );
        let mut unknown = Line { buf: [0; 256], len: 0 };
        describe(&mut unknown, 4242, b"x", 1);
        assert!(std::str::from_utf8(&unknown.buf[..unknown.len]).expect("ASCII").contains("call 4242 in thread x"));
    }

    #[test]
    fn a_long_line_is_cut_not_overflowed() {
        let mut line = Line { buf: [0; 256], len: 0 };
        for _ in 0..100 {
            line.push(b"0123456789");
        }
        assert_eq!(line.len, 256);
    }
}
