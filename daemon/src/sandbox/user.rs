// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `--user NAME|UID[:GID]`: who the daemon becomes, resolved once at startup (name lookups may read
//! `/etc/passwd`, `/etc/group` or ask NSS, which the system call filter would refuse later).

use std::ffi::{CStr, CString};
use std::fmt;
use std::io;

/// A user to run as: its ids and its supplementary groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserSpec {
    /// How the user was given on the command line (for logs and errors).
    pub shown: String,
    /// User id.
    pub uid: libc::uid_t,
    /// Primary group id.
    pub gid: libc::gid_t,
    /// Supplementary groups (the user's groups for a name; just the primary group for numeric ids).
    pub groups: Vec<libc::gid_t>,
}

impl fmt::Display for UserSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (uid {}, gid {})", self.shown, self.uid, self.gid)
    }
}

/// A passwd entry: name, uid, primary gid.
struct Passwd {
    name: CString,
    uid: libc::uid_t,
    gid: libc::gid_t,
}

impl UserSpec {
    /// Parse `NAME`, `UID` or `UID:GID` (a clap value parser). A name must exist; a bare uid takes its passwd
    /// entry's primary group, so a uid without an entry needs `:GID`. uid and gid 0 are refused: they would not be a
    /// drop of privileges.
    pub fn parse(text: &str) -> Result<UserSpec, String> {
        let (user, group) = match text.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (text, None),
        };
        if user.is_empty() {
            return Err("empty user name".into());
        }
        let gid_arg = group
            .map(|g| g.parse::<libc::gid_t>().map_err(|_| format!("group {g:?} is not a numeric gid")))
            .transpose()?;
        let spec = match user.parse::<libc::uid_t>() {
            Ok(uid) => {
                let entry = lookup(Lookup::Uid(uid)).map_err(|e| format!("looking up uid {uid}: {e}"))?;
                let gid = match (gid_arg, &entry) {
                    (Some(gid), _) => gid,
                    (None, Some(p)) => p.gid,
                    (None, None) => return Err(format!("uid {uid} has no passwd entry: give its group as {uid}:GID")),
                };
                UserSpec { shown: text.to_string(), uid, gid, groups: vec![gid] }
            }
            Err(_) => {
                if group.is_some() {
                    return Err(format!("{text:?}: a group may only follow a numeric uid (UID:GID)"));
                }
                let entry = lookup(Lookup::Name(user)).map_err(|e| format!("looking up user {user:?}: {e}"))?;
                let p = entry.ok_or_else(|| format!("no such user {user:?}"))?;
                let groups = group_list(&p.name, p.gid).map_err(|e| format!("groups of user {user:?}: {e}"))?;
                UserSpec { shown: text.to_string(), uid: p.uid, gid: p.gid, groups }
            }
        };
        if spec.uid == 0 || spec.gid == 0 {
            return Err(format!("{text:?} is root (uid or gid 0): --user must name an unprivileged user"));
        }
        Ok(spec)
    }

    /// Become this user in every id (real, effective, saved; groups first, while we still may).
    pub(super) fn switch(&self) -> io::Result<()> {
        // SAFETY: `groups` is a valid array of `len` gids for the duration of the call.
        check(unsafe { libc::setgroups(self.groups.len(), self.groups.as_ptr()) })?;
        // SAFETY: plain system calls on ids.
        check(unsafe { libc::setresgid(self.gid, self.gid, self.gid) })?;
        // SAFETY: as above.
        check(unsafe { libc::setresuid(self.uid, self.uid, self.uid) })?;
        let (mut r, mut e, mut s) = (0, 0, 0);
        // SAFETY: three valid out-pointers.
        check(unsafe { libc::getresuid(&mut r, &mut e, &mut s) })?;
        if (r, e, s) != (self.uid, self.uid, self.uid) {
            return Err(io::Error::other(format!("the kernel left uids {r}/{e}/{s}")));
        }
        Ok(())
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

enum Lookup<'a> {
    Name(&'a str),
    Uid(libc::uid_t),
}

/// `getpwnam_r` / `getpwuid_r`: the entry, or `None` if there is none.
fn lookup(key: Lookup<'_>) -> io::Result<Option<Passwd>> {
    let name = match key {
        Lookup::Name(n) => Some(CString::new(n).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?),
        Lookup::Uid(_) => None,
    };
    let mut buf = vec![0 as libc::c_char; 1024];
    loop {
        // SAFETY: passwd is plain data, filled in by the call below.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = match (&key, &name) {
            // SAFETY: `n` is NUL-terminated; `pw`, `buf` (of `buf.len()` bytes) and `result` are valid.
            (_, Some(n)) => unsafe { libc::getpwnam_r(n.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut result) },
            // SAFETY: as above.
            (Lookup::Uid(uid), None) => unsafe {
                libc::getpwuid_r(*uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut result)
            },
            (Lookup::Name(_), None) => return Ok(None),
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        if result.is_null() {
            return Ok(None);
        }
        // SAFETY: on success `pw_name` points to a NUL-terminated string inside `buf`, still alive here.
        let name = unsafe { CStr::from_ptr(pw.pw_name) }.to_owned();
        return Ok(Some(Passwd { name, uid: pw.pw_uid, gid: pw.pw_gid }));
    }
}

/// `getgrouplist`: every group of `name`, with `gid` among them.
fn group_list(name: &CStr, gid: libc::gid_t) -> io::Result<Vec<libc::gid_t>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    loop {
        let mut count = libc::c_int::try_from(groups.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `name` is NUL-terminated and `groups` holds `count` gids.
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        let count = usize::try_from(count).unwrap_or(0);
        if rc >= 0 {
            groups.truncate(count);
            return Ok(groups);
        }
        if count <= groups.len() || count > 65536 {
            return Err(io::Error::other("getgrouplist failed"));
        }
        groups.resize(count, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numeric_ids_resolve() {
        let nobody = UserSpec::parse("nobody").expect("every system has nobody");
        assert_ne!(nobody.uid, 0);
        assert!(nobody.groups.contains(&nobody.gid));
        let numeric = UserSpec::parse(&nobody.uid.to_string()).expect("nobody's uid");
        assert_eq!((numeric.uid, numeric.gid, numeric.groups.clone()), (nobody.uid, nobody.gid, vec![nobody.gid]));
        let explicit = UserSpec::parse("4242:4343").expect("uid:gid needs no passwd entry");
        assert_eq!((explicit.uid, explicit.gid, explicit.groups), (4242, 4343, vec![4343]));
    }

    #[test]
    fn bad_users_are_refused_with_a_reason() {
        assert!(refused("root").contains("root"));
        assert!(refused("0").contains("root"));
        assert!(refused("4242:0").contains("root"));
        assert!(refused("no-such-user-blkbackd").contains("no such user"));
        assert!(refused("nobody:7").contains("numeric uid"));
        assert!(refused("4242:x").contains("numeric gid"));
        assert!(UserSpec::parse("").is_err());
        // A uid nobody has in passwd (close to the top of the range) needs its group.
        assert!(refused("4000000000").contains("has no passwd entry") || getpwuid_exists(4_000_000_000));
    }

    fn refused(text: &str) -> String {
        UserSpec::parse(text).expect_err("must be refused")
    }

    fn getpwuid_exists(uid: libc::uid_t) -> bool {
        matches!(lookup(Lookup::Uid(uid)), Ok(Some(_)))
    }
}
