// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The emulated xenstore's node tree: path rules, nodes with permissions and generations, permission checks.
//!
//! Paths are absolute (`/a/b`), made of `[A-Za-z0-9_@-]` components separated by single slashes; the root `/`
//! always exists. Every node's parent exists (writes create missing parents), so a node's children are exactly the
//! keys one component below it.

use std::collections::BTreeMap;

use crate::services::{DomId, PermAccess, Permission, XenError};

/// Largest value xenstored accepts (`XENSTORE_PAYLOAD_MAX`).
pub const MAX_VALUE_LEN: usize = 4096;
/// Longest absolute path (`XENSTORE_ABS_PATH_MAX`).
pub const MAX_ABS_PATH_LEN: usize = 3072;
/// Longest relative path (`XENSTORE_REL_PATH_MAX`).
pub const MAX_REL_PATH_LEN: usize = 2048;

/// What an operation needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Need {
    Read,
    Write,
}

/// One node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Node {
    pub value: Vec<u8>,
    pub perms: Vec<Permission>,
    /// Bumped whenever the node's value, permissions or list of children change.
    pub generation: u64,
}

/// The whole store (or a transaction's copy of it).
#[derive(Clone, Debug)]
pub(crate) struct Tree {
    pub nodes: BTreeMap<String, Node>,
}

/// A change the tree made, for watches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Change {
    pub path: String,
    /// Permissions of the node at the time of the change (after a write, before a removal).
    pub perms: Vec<Permission>,
    /// The node (and its subtree) was removed.
    pub removed: bool,
}

/// Whether `domid` may do `need` on a node with `perms`: dom0 may do anything, the owner (first entry) anything,
/// others what their ACL entry says, or the default (the first entry's access).
pub(crate) fn allowed(domid: DomId, perms: &[Permission], need: Need) -> bool {
    if domid == 0 {
        return true;
    }
    let Some(owner) = perms.first() else {
        return false;
    };
    if owner.domid == domid {
        return true;
    }
    let access = perms[1..].iter().find(|p| p.domid == domid).map_or(owner.access, |p| p.access);
    match need {
        Need::Read => matches!(access, PermAccess::Read | PermAccess::Both),
        Need::Write => matches!(access, PermAccess::Write | PermAccess::Both),
    }
}

fn einval(what: impl Into<String>) -> XenError {
    XenError::Os { what: what.into(), errno: libc::EINVAL }
}

/// Turn `path` (absolute, or relative to `/local/domain/<domid>`) into a checked absolute path.
pub(crate) fn absolute(domid: DomId, path: &str) -> Result<String, XenError> {
    let abs = if let Some(rest) = path.strip_prefix('/') {
        if path.len() > MAX_ABS_PATH_LEN {
            return Err(XenError::Os { what: format!("xenstore path of {} bytes", path.len()), errno: libc::E2BIG });
        }
        if rest.is_empty() {
            return Ok("/".to_owned());
        }
        path.to_owned()
    } else {
        if path.len() > MAX_REL_PATH_LEN {
            return Err(XenError::Os { what: format!("xenstore path of {} bytes", path.len()), errno: libc::E2BIG });
        }
        format!("/local/domain/{domid}/{path}")
    };
    let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '@');
    let ok = abs.len() <= MAX_ABS_PATH_LEN && abs[1..].split('/').all(|c| !c.is_empty() && c.chars().all(valid_char));
    if !ok {
        return Err(einval(format!("xenstore: invalid path {path:?}")));
    }
    Ok(abs)
}

/// The parent of an absolute path other than `/`.
pub(crate) fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

/// Whether `path` is `ancestor` or below it.
pub(crate) fn is_at_or_below(path: &str, ancestor: &str) -> bool {
    ancestor == "/"
        || path == ancestor
        || (path.starts_with(ancestor) && path.as_bytes().get(ancestor.len()) == Some(&b'/'))
}

fn not_found(path: &str) -> XenError {
    XenError::NotFound { path: path.to_owned() }
}

fn denied(path: &str) -> XenError {
    XenError::Access { what: format!("xenstore: {path}") }
}

impl Tree {
    /// A tree with only the root, owned by dom0 and readable by nobody else.
    pub fn new() -> Tree {
        let mut nodes = BTreeMap::new();
        let perms = vec![Permission { domid: 0, access: PermAccess::None }];
        nodes.insert("/".to_owned(), Node { value: Vec::new(), perms, generation: 0 });
        Tree { nodes }
    }

    fn node_for(&self, domid: DomId, path: &str, need: Need) -> Result<&Node, XenError> {
        let node = self.nodes.get(path).ok_or_else(|| not_found(path))?;
        if !allowed(domid, &node.perms, need) {
            return Err(denied(path));
        }
        Ok(node)
    }

    pub fn read(&self, domid: DomId, path: &str) -> Result<Vec<u8>, XenError> {
        Ok(self.node_for(domid, path, Need::Read)?.value.clone())
    }

    pub fn get_perms(&self, domid: DomId, path: &str) -> Result<Vec<Permission>, XenError> {
        Ok(self.node_for(domid, path, Need::Read)?.perms.clone())
    }

    pub fn directory(&self, domid: DomId, path: &str) -> Result<Vec<String>, XenError> {
        self.node_for(domid, path, Need::Read)?;
        Ok(self.children(path).map(str::to_owned).collect())
    }

    /// Names of the direct children of `path`.
    pub fn children<'a>(&'a self, path: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        let prefix_len = if path == "/" { 1 } else { path.len() + 1 };
        self.nodes
            .range::<str, _>((std::ops::Bound::Excluded(path), std::ops::Bound::Unbounded))
            .take_while(move |(k, _)| is_at_or_below(k, path))
            .map(move |(k, _)| &k[prefix_len..])
            .filter(|rest| !rest.contains('/'))
    }

    /// Write `value` at `path`, creating it and missing parents; `None` creates an empty node only if missing
    /// (mkdir). Returns the change (one, for `path`, even when parents were created).
    pub fn write(
        &mut self,
        domid: DomId,
        path: &str,
        value: Option<&[u8]>,
        generation: &mut u64,
    ) -> Result<Vec<Change>, XenError> {
        if let Some(v) = value {
            if v.len() > MAX_VALUE_LEN {
                return Err(XenError::Os {
                    what: format!("xenstore: value of {} bytes for {path}", v.len()),
                    errno: libc::E2BIG,
                });
            }
        }
        if let Some(node) = self.nodes.get(path) {
            if !allowed(domid, &node.perms, Need::Write) {
                return Err(denied(path));
            }
            let Some(v) = value else {
                return Ok(Vec::new()); // mkdir of an existing node
            };
            *generation += 1;
            let gen = *generation;
            let node = self.nodes.get_mut(path).ok_or_else(|| not_found(path))?;
            node.value = v.to_vec();
            node.generation = gen;
            return Ok(vec![Change { path: path.to_owned(), perms: node.perms.clone(), removed: false }]);
        }
        // Find the nearest existing ancestor; it must be writable.
        let mut missing = vec![path];
        let mut anc = parent(path);
        while !self.nodes.contains_key(anc) {
            missing.push(anc);
            anc = parent(anc);
        }
        let anc_node = self.nodes.get(anc).ok_or_else(|| not_found(anc))?;
        if !allowed(domid, &anc_node.perms, Need::Write) {
            return Err(denied(path));
        }
        let mut perms = anc_node.perms.clone();
        if domid != 0 {
            // Domains own what they create (as xenstored does).
            if let Some(owner) = perms.first_mut() {
                owner.domid = domid;
            }
        }
        *generation += 1;
        let gen = *generation;
        if let Some(a) = self.nodes.get_mut(anc) {
            a.generation = gen;
        }
        for p in missing.into_iter().rev() {
            let v = if p == path { value.unwrap_or_default().to_vec() } else { Vec::new() };
            self.nodes.insert(p.to_owned(), Node { value: v, perms: perms.clone(), generation: gen });
        }
        // As xenstored: one event, for the node written (watches on its new parents see it as a change below).
        Ok(vec![Change { path: path.to_owned(), perms, removed: false }])
    }

    /// Remove `path` and its subtree. Removing a missing node whose parent exists succeeds with no change.
    pub fn rm(&mut self, domid: DomId, path: &str, generation: &mut u64) -> Result<Vec<Change>, XenError> {
        if path == "/" {
            return Err(einval("xenstore: cannot remove /"));
        }
        let Some(node) = self.nodes.get(path) else {
            return if self.nodes.contains_key(parent(path)) { Ok(Vec::new()) } else { Err(not_found(path)) };
        };
        if !allowed(domid, &node.perms, Need::Write) {
            return Err(denied(path));
        }
        let doomed: Vec<String> = self
            .nodes
            .range::<str, _>((std::ops::Bound::Included(path), std::ops::Bound::Unbounded))
            .take_while(|(k, _)| is_at_or_below(k, path))
            .map(|(k, _)| k.clone())
            .collect();
        let mut changes = Vec::with_capacity(doomed.len());
        for k in doomed {
            if let Some(n) = self.nodes.remove(&k) {
                changes.push(Change { path: k, perms: n.perms, removed: true });
            }
        }
        *generation += 1;
        let gen = *generation;
        if let Some(p) = self.nodes.get_mut(parent(path)) {
            p.generation = gen;
        }
        Ok(changes)
    }

    /// Replace a node's permissions: only dom0 or the node's owner may.
    pub fn set_perms(
        &mut self,
        domid: DomId,
        path: &str,
        perms: &[Permission],
        generation: &mut u64,
    ) -> Result<Vec<Change>, XenError> {
        if perms.is_empty() {
            return Err(einval(format!("xenstore: empty permission list for {path}")));
        }
        let node = self.node_for(domid, path, Need::Write)?;
        if domid != 0 && node.perms.first().map(|p| p.domid) != Some(domid) {
            return Err(denied(path));
        }
        *generation += 1;
        let gen = *generation;
        let node = self.nodes.get_mut(path).ok_or_else(|| not_found(path))?;
        node.perms = perms.to_vec();
        node.generation = gen;
        Ok(vec![Change { path: path.to_owned(), perms: perms.to_vec(), removed: false }])
    }

    /// The node's generation, if it exists (for transaction conflict checks).
    pub fn generation_of(&self, path: &str) -> Option<u64> {
        self.nodes.get(path).map(|n| n.generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(absolute(3, "device/vbd").expect("rel"), "/local/domain/3/device/vbd");
        assert_eq!(absolute(0, "/").expect("root"), "/");
        for bad in ["/a//b", "/a/", "/a b", "", "/a/\u{e9}"] {
            assert!(absolute(0, bad).is_err(), "{bad:?}");
        }
        assert!(absolute(0, &format!("/{}", "a".repeat(MAX_ABS_PATH_LEN))).is_err());
        assert_eq!(parent("/a/b"), "/a");
        assert_eq!(parent("/a"), "/");
        assert!(is_at_or_below("/a/b", "/a") && !is_at_or_below("/ab", "/a") && is_at_or_below("/a", "/a"));
    }

    #[test]
    fn children_and_rm() {
        let mut t = Tree::new();
        let mut g = 0;
        t.write(0, "/a/b/c", Some(b"x"), &mut g).expect("write");
        t.write(0, "/a/d", Some(b"y"), &mut g).expect("write");
        t.write(0, "/ab", Some(b"z"), &mut g).expect("write");
        assert_eq!(t.directory(0, "/a").expect("dir"), vec!["b", "d"]);
        assert_eq!(t.directory(0, "/").expect("dir"), vec!["a", "ab"]);
        let removed = t.rm(0, "/a", &mut g).expect("rm");
        assert_eq!(removed.len(), 4);
        assert!(t.nodes.contains_key("/ab"));
        assert!(t.rm(0, "/a", &mut g).expect("rm missing").is_empty());
        assert!(matches!(t.rm(0, "/x/y", &mut g), Err(XenError::NotFound { .. })));
    }

    #[test]
    fn permissions_and_ownership() {
        let mut t = Tree::new();
        let mut g = 0;
        t.write(0, "/local/domain/5", None, &mut g).expect("mkdir");
        let p5 = [Permission { domid: 5, access: PermAccess::None }];
        t.set_perms(0, "/local/domain/5", &p5, &mut g).expect("perms");
        t.write(5, "/local/domain/5/device/x", Some(b"1"), &mut g).expect("own dir");
        assert!(matches!(t.write(6, "/local/domain/5/device/y", Some(b"1"), &mut g), Err(XenError::Access { .. })));
        assert!(matches!(t.read(6, "/local/domain/5/device/x"), Err(XenError::Access { .. })));
        let acl =
            [Permission { domid: 0, access: PermAccess::None }, Permission { domid: 6, access: PermAccess::Read }];
        t.write(0, "/backend/x", Some(b"v"), &mut g).expect("write");
        t.set_perms(0, "/backend/x", &acl, &mut g).expect("perms");
        assert_eq!(t.read(6, "/backend/x").expect("acl read"), b"v");
        assert!(matches!(t.write(6, "/backend/x", Some(b"w"), &mut g), Err(XenError::Access { .. })));
        assert!(matches!(t.set_perms(6, "/backend/x", &acl, &mut g), Err(XenError::Access { .. })));
        assert!(matches!(
            t.write(0, "/big", Some(&[0u8; MAX_VALUE_LEN + 1]), &mut g),
            Err(XenError::Os { errno: libc::E2BIG, .. })
        ));
    }
}
