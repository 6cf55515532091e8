// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Linux capabilities of the calling thread, through the raw `capget`/`capset` system calls and `prctl`.
//!
//! Capabilities belong to a thread, not to a process: `capset` changes only the caller, and a new thread starts
//! with its creator's sets. So the daemon drops them while it has one thread, and a Xen data-plane worker drops
//! its own on its own thread.

use std::fmt;
use std::io;

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const VERSION_3: u32 = 0x2008_0522;

/// `CAP_DAC_OVERRIDE`: open files whatever their owner and mode.
pub const CAP_DAC_OVERRIDE: u32 = 1;
/// `CAP_KILL`: signal processes of other users (the Xen supervisor's workers).
pub const CAP_KILL: u32 = 5;
/// `CAP_SETGID`: change group ids.
pub const CAP_SETGID: u32 = 6;
/// `CAP_SETUID`: change user ids.
pub const CAP_SETUID: u32 = 7;
/// `CAP_SETPCAP`: shrink the bounding set, set securebits.
pub const CAP_SETPCAP: u32 = 8;
/// `CAP_SYS_CHROOT`: `chroot`.
pub const CAP_SYS_CHROOT: u32 = 18;
/// `CAP_SYS_ADMIN`: new mount and network namespaces, `mount`.
pub const CAP_SYS_ADMIN: u32 = 21;

/// `SECBIT_NOROOT` and `SECBIT_NO_CAP_AMBIENT_RAISE` with their `_LOCKED` bits: uid 0 gains nothing by exec, and
/// no ambient capability can be raised again (from `<linux/securebits.h>`).
const SECURE_BITS: libc::c_ulong = (1 << 0) | (1 << 1) | (1 << 6) | (1 << 7);

#[repr(C)]
struct Header {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// A set of capabilities (bit n = capability n).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapSet(pub u64);

impl CapSet {
    /// No capability.
    pub const EMPTY: CapSet = CapSet(0);

    /// The set of these capabilities.
    pub const fn of(caps: &[u32]) -> CapSet {
        let mut bits = 0u64;
        let mut i = 0;
        while i < caps.len() {
            bits |= 1 << caps[i];
            i += 1;
        }
        CapSet(bits)
    }

    /// Whether `cap` is in the set.
    pub fn has(self, cap: u32) -> bool {
        cap < 64 && self.0 & (1 << cap) != 0
    }

    /// Both sets' capabilities.
    pub fn and(self, other: CapSet) -> CapSet {
        CapSet(self.0 & other.0)
    }
}

impl fmt::Display for CapSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("none");
        }
        let mut first = true;
        for cap in (0..64).filter(|&c| self.has(c)) {
            let sep = if first { "" } else { "," };
            first = false;
            match cap {
                CAP_DAC_OVERRIDE => write!(f, "{sep}CAP_DAC_OVERRIDE")?,
                CAP_KILL => write!(f, "{sep}CAP_KILL")?,
                CAP_SETGID => write!(f, "{sep}CAP_SETGID")?,
                CAP_SETUID => write!(f, "{sep}CAP_SETUID")?,
                CAP_SETPCAP => write!(f, "{sep}CAP_SETPCAP")?,
                CAP_SYS_CHROOT => write!(f, "{sep}CAP_SYS_CHROOT")?,
                CAP_SYS_ADMIN => write!(f, "{sep}CAP_SYS_ADMIN")?,
                _ => write!(f, "{sep}cap{cap}")?,
            }
        }
        Ok(())
    }
}

/// The calling thread's capability sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadCaps {
    /// In force.
    pub effective: CapSet,
    /// May be made effective.
    pub permitted: CapSet,
    /// Kept across exec (with file capabilities).
    pub inheritable: CapSet,
}

fn header() -> Header {
    Header { version: VERSION_3, pid: 0 }
}

fn join(words: [Data; 2], field: fn(&Data) -> u32) -> CapSet {
    CapSet(u64::from(field(&words[0])) | u64::from(field(&words[1])) << 32)
}

/// The calling thread's capabilities.
pub fn get() -> io::Result<ThreadCaps> {
    let mut hdr = header();
    let mut data = [Data::default(); 2];
    // SAFETY: a version-3 header and two data words, as capget(2) requires; pid 0 is the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ThreadCaps {
        effective: join(data, |d| d.effective),
        permitted: join(data, |d| d.permitted),
        inheritable: join(data, |d| d.inheritable),
    })
}

/// Set the calling thread's effective and permitted sets to `keep` and its inheritable set to nothing (`keep`
/// must be within the permitted set), then check that the kernel did.
pub fn set_only(keep: CapSet) -> io::Result<()> {
    let mut hdr = header();
    let low = |s: CapSet| u32::try_from(s.0 & 0xffff_ffff).unwrap_or(u32::MAX);
    let high = |s: CapSet| u32::try_from(s.0 >> 32).unwrap_or(u32::MAX);
    let data = [
        Data { effective: low(keep), permitted: low(keep), inheritable: 0 },
        Data { effective: high(keep), permitted: high(keep), inheritable: 0 },
    ];
    // SAFETY: a version-3 header and two data words; pid 0 is the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: prctl with integer arguments. Fails with EINVAL on kernels without ambient capabilities (< 4.3),
    // which then have none to clear.
    unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    let now = get()?;
    let wanted = ThreadCaps { effective: keep, permitted: keep, inheritable: CapSet::EMPTY };
    if now != wanted {
        return Err(io::Error::other(format!("the kernel left capabilities {now:?}")));
    }
    Ok(())
}

/// With `CAP_SETPCAP` (started as root): remove every capability but `keep` from the bounding set (so that
/// nothing run later could regain them) and lock the securebits that make uid 0 no special case for exec. Without
/// it there is nothing to give up here.
pub fn limit_bounding_set(keep: CapSet) -> io::Result<()> {
    if !get()?.effective.has(CAP_SETPCAP) {
        return Ok(());
    }
    drop_bounding(keep)?;
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_SECUREBITS, SECURE_BITS, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Remove every capability but `keep` from the bounding set, leaving uid 0 its usual meaning for exec (a root
/// child still gets what the bounding set holds: the Xen supervisor's workers need that to confine themselves).
pub fn drop_bounding(keep: CapSet) -> io::Result<()> {
    if !get()?.effective.has(CAP_SETPCAP) {
        return Ok(());
    }
    for cap in 0..64u32 {
        if keep.has(cap) {
            continue;
        }
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                break; // past the last capability this kernel knows
            }
            return Err(e);
        }
    }
    Ok(())
}

/// `PR_SET_KEEPCAPS`: keep the permitted set across the switch away from uid 0 (the effective set is cleared
/// anyway).
pub fn keep_across_setuid(keep: bool) -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, libc::c_ulong::from(keep), 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `PR_SET_NO_NEW_PRIVS`: exec can never grant privileges again (set-user-id bits and file capabilities are
/// ignored), for this thread and every thread it creates.
pub fn no_new_privs() -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_print_and_combine() {
        let set = CapSet::of(&[CAP_DAC_OVERRIDE, 33]);
        assert!(set.has(CAP_DAC_OVERRIDE) && set.has(33) && !set.has(0) && !set.has(64));
        assert_eq!(set.to_string(), "CAP_DAC_OVERRIDE,cap33");
        assert_eq!(CapSet::EMPTY.to_string(), "none");
        assert_eq!(set.and(CapSet::of(&[33])), CapSet::of(&[33]));
    }

    #[test]
    fn a_thread_drops_its_own_capabilities_only() {
        let before = get().expect("capget");
        let dropped = std::thread::spawn(|| {
            set_only(CapSet::EMPTY).expect("dropping is always allowed");
            get().expect("capget")
        })
        .join()
        .expect("thread");
        assert_eq!(dropped, ThreadCaps { effective: CapSet(0), permitted: CapSet(0), inheritable: CapSet(0) });
        assert_eq!(get().expect("capget"), before, "the other threads keep theirs");
    }
}
