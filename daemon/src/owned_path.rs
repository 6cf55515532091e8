// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Files this process created (its listening sockets, its pid file) and removes when done with them, but only if
//! the path still names the file it created: a later process may have replaced it, and that file is not ours.
//!
//! A confined `blkbackd vhost-user` can no longer reach them by path (its root is empty), so it hands them over
//! to its file keeper ([`crate::sandbox::FileKeeper`]), which removes them when the server ends.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A file by path and by identity (device and inode at creation). A file put at the path after ours was removed
/// may get the same inode number on some file systems (ext4 reuses them at once): only a file that replaced ours
/// by rename, or while ours still existed, is told apart for sure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileId {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The file at `path` now (not following a symbolic link).
    pub fn of(path: &Path) -> io::Result<FileId> {
        let meta = fs::symlink_metadata(path)?;
        Ok(FileId { path: path.to_path_buf(), dev: meta.dev(), ino: meta.ino() })
    }

    /// The file created at `path` whose metadata is `meta` (e.g. read through its descriptor).
    pub fn from_metadata(path: &Path, meta: &fs::Metadata) -> FileId {
        FileId { path: path.to_path_buf(), dev: meta.dev(), ino: meta.ino() }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the path still names this file.
    pub fn is_current(&self) -> bool {
        fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == (self.dev, self.ino))
    }

    /// Remove the path if it still names this file: `Ok(false)` if it is gone or names another file now.
    ///
    /// The file is first moved aside (atomically, next to it) and looked at there, so that a file another process
    /// put at the path just before (a restarted instance replacing a stale socket) is put back, not removed.
    pub fn remove_if_current(&self) -> io::Result<bool> {
        if !self.is_current() {
            return Ok(false);
        }
        self.remove_aside()
    }

    /// The removal proper of [`remove_if_current`](Self::remove_if_current): move aside, look, remove or put back.
    fn remove_aside(&self) -> io::Result<bool> {
        let Some(name) = self.path.file_name() else { return Ok(false) };
        let mut aside_name = std::ffi::OsString::from(".");
        aside_name.push(name);
        aside_name.push(format!(".removing-{}", std::process::id()));
        let aside = self.path.with_file_name(aside_name);
        match rename_noreplace(&self.path, &aside) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            // A file system without RENAME_NOREPLACE: remove it by path (the look above is all there is).
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {
                return fs::remove_file(&self.path).map(|()| true);
            }
            Err(e) => return Err(e),
        }
        let ours = fs::symlink_metadata(&aside).is_ok_and(|m| (m.dev(), m.ino()) == (self.dev, self.ino));
        if ours {
            fs::remove_file(&aside)?;
            return Ok(true);
        }
        // Someone else's file: back where it was (unless yet another one took the path meanwhile).
        if let Err(error) = rename_noreplace(&aside, &self.path) {
            tracing::warn!(path = %self.path.display(), aside = %aside.display(), %error, "cannot put a file back");
        }
        Ok(false)
    }
}

/// `renameat2(from, to, RENAME_NOREPLACE)`.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let cstr = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
    let (from, to) = (cstr(from)?, cstr(to)?);
    // SAFETY: two NUL-terminated paths alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A [`FileId`] removed when dropped, unless handed over to someone else first.
#[derive(Debug)]
pub struct OwnedPath {
    file: FileId,
    armed: bool,
}

impl OwnedPath {
    /// Own the file now at `path`.
    pub fn claim(path: &Path) -> io::Result<OwnedPath> {
        FileId::of(path).map(OwnedPath::new)
    }

    /// Own `file`.
    pub fn new(file: FileId) -> OwnedPath {
        OwnedPath { file, armed: true }
    }

    /// Whether the path still names the file created.
    pub fn is_current(&self) -> bool {
        self.file.is_current()
    }

    /// Leave its removal to whoever takes the returned id (this no longer removes it when dropped).
    pub fn hand_over(&mut self) -> Option<FileId> {
        std::mem::replace(&mut self.armed, false).then(|| self.file.clone())
    }
}

impl Drop for OwnedPath {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Err(error) = self.file.remove_if_current() {
            tracing::warn!(path = %self.file.path.display(), %error, "cannot remove the file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_file_created_is_removed_and_only_once_handed_over_elsewhere() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.sock");
        fs::write(&path, b"ours").expect("write");
        drop(OwnedPath::claim(&path).expect("claim"));
        assert!(!path.exists(), "removed on drop");

        fs::write(&path, b"ours").expect("write");
        let owned = OwnedPath::claim(&path).expect("claim");
        // Someone puts another file there (made before ours is gone: some file systems reuse a free inode number
        // at once, which the identity cannot tell apart).
        let theirs = dir.path().join("theirs");
        fs::write(&theirs, b"theirs").expect("their file");
        fs::rename(&theirs, &path).expect("and puts it in place of ours");
        assert!(!owned.is_current());
        drop(owned);
        assert_eq!(fs::read(&path).expect("still there"), b"theirs", "another file at the path is left alone");

        let mut owned = OwnedPath::claim(&path).expect("claim");
        let id = owned.hand_over().expect("armed");
        assert_eq!(owned.hand_over(), None, "handed over once");
        drop(owned);
        assert!(path.exists(), "a handed-over file is not removed on drop");
        assert!(id.remove_if_current().expect("remove"));
        assert!(!id.remove_if_current().expect("gone"), "nothing to remove twice");
    }

    /// The race the removal closes: another process's file took the path after the look. It is moved aside, seen
    /// to be another file, and put back.
    #[test]
    fn a_file_that_took_the_path_after_the_look_is_put_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.sock");
        fs::write(&path, b"ours").expect("write");
        let ours = FileId::of(&path).expect("id");
        let theirs = dir.path().join("theirs");
        fs::write(&theirs, b"theirs").expect("their file");
        fs::rename(&theirs, &path).expect("in place of ours");
        assert!(!ours.remove_aside().expect("looked"), "not ours");
        assert_eq!(fs::read(&path).expect("back in place"), b"theirs");
        let left: Vec<_> = fs::read_dir(dir.path()).expect("dir").flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("b.sock")], "nothing left aside");
    }
}
