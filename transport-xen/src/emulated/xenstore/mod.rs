// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! An in-memory xenstore with xenstored's semantics where a backend can observe them: per-connection watches
//! (fired for the node and everything below it, plus once on registration), transactions that fail with
//! [`XenError::Again`] when a node they touched changed meanwhile, permissions (owner + ACL, dom0 privileged,
//! domains own what they create), relative paths, and xenstored's size limits.
//!
//! One [`EmulatedXenStore`] is one connection; [`EmulatedXenStore::connect`] opens another connection to the same
//! tree as some domain, with its own watches, watch eventfd and permission checks, so a test frontend (domU) and
//! the backend (dom0) are separate clients as they are on a real host.
//!
//! [`EmulatedXenStore::disconnect`] breaks one connection as xenstored going away (or dropping the client) would:
//! its watches and transactions are gone, its watch fd becomes readable so the owner notices, and every later call
//! on it fails with [`XenError::Disconnected`], as the real client's calls fail once its reader thread saw the
//! connection end.

mod tree;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use tree::{absolute, allowed, is_at_or_below, parent, Change, Need, Tree};
pub use tree::{MAX_ABS_PATH_LEN, MAX_REL_PATH_LEN, MAX_VALUE_LEN};

use crate::services::{DomId, Permission, TxId, WatchEvent, XenError, XenStore};

/// Watches one connection may hold (xenstored's default quota is 128).
pub const MAX_WATCHES_PER_CONNECTION: usize = 128;
/// Open transactions per connection (xenstored's default quota is 10).
pub const MAX_TRANSACTIONS_PER_CONNECTION: usize = 10;
/// Undelivered watch events kept per connection; beyond it new events are dropped (and logged).
pub const MAX_PENDING_WATCH_EVENTS: usize = 65_536;

#[derive(Debug)]
struct Watch {
    /// Absolute path (or `@name` for special watches).
    abs: String,
    token: String,
    /// Set when registered with a relative path: stripped from reported paths.
    relative_prefix: Option<String>,
}

#[derive(Debug)]
struct Conn {
    domid: DomId,
    watches: Vec<Watch>,
    events: VecDeque<WatchEvent>,
    eventfd: Arc<EventFd>,
}

#[derive(Debug)]
struct Tx {
    conn: u64,
    base: Tree,
    work: Tree,
    generation: u64,
    accessed: BTreeSet<String>,
}

#[derive(Debug)]
struct State {
    tree: Tree,
    generation: u64,
    next_conn: u64,
    next_tx: u32,
    conns: HashMap<u64, Conn>,
    txs: HashMap<u32, Tx>,
}

/// One connection to the emulated xenstore. Dropping it removes its watches and aborts its transactions.
#[derive(Debug)]
pub struct EmulatedXenStore {
    shared: Arc<Mutex<State>>,
    conn: u64,
    domid: DomId,
    eventfd: Arc<EventFd>,
}

impl EmulatedXenStore {
    /// A new, empty store (only `/`, owned by dom0) and a dom0 connection to it.
    pub fn new() -> Result<EmulatedXenStore, XenError> {
        let state = State {
            tree: Tree::new(),
            generation: 0,
            next_conn: 0,
            next_tx: 1,
            conns: HashMap::new(),
            txs: HashMap::new(),
        };
        Self::attach(Arc::new(Mutex::new(state)), 0)
    }

    /// Another connection to the same store, acting as `domid` (its permissions, its relative-path base
    /// `/local/domain/<domid>`, its own watches).
    pub fn connect(&self, domid: DomId) -> Result<EmulatedXenStore, XenError> {
        Self::attach(self.shared.clone(), domid)
    }

    fn attach(shared: Arc<Mutex<State>>, domid: DomId) -> Result<EmulatedXenStore, XenError> {
        let eventfd = Arc::new(
            EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| XenError::os("xenstore: eventfd", &e))?,
        );
        let conn = {
            let mut st = lock(&shared);
            st.next_conn += 1;
            let id = st.next_conn;
            st.conns.insert(id, Conn { domid, watches: Vec::new(), events: VecDeque::new(), eventfd: eventfd.clone() });
            id
        };
        Ok(EmulatedXenStore { shared, conn, domid, eventfd })
    }

    /// The domain this connection acts as.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// Fire a special watch (`@introduceDomain`, `@releaseDomain`) on every connection watching it.
    pub fn fire_special(&self, name: &str) {
        let mut st = lock(&self.shared);
        for conn in st.conns.values_mut() {
            let mut fired = false;
            for w in conn.watches.iter().filter(|w| w.abs == name) {
                fired |= push_event(
                    conn.domid,
                    &mut conn.events,
                    WatchEvent { path: name.to_owned(), token: w.token.clone() },
                );
            }
            if fired {
                let _ = conn.eventfd.write(1);
            }
        }
    }

    /// Break this connection for good, as xenstored dropping the client would: its watches, pending events and
    /// transactions are discarded, the watch fd becomes (and stays) readable, and every call on this connection,
    /// from any clone of its owner's handle, fails with [`XenError::Disconnected`] from now on. Other connections
    /// to the store are not affected.
    pub fn disconnect(&self) {
        let mut st = lock(&self.shared);
        st.conns.remove(&self.conn);
        let conn = self.conn;
        st.txs.retain(|_, t| t.conn != conn);
        drop(st);
        let _ = self.eventfd.write(1);
        tracing::debug!(domid = self.domid, conn, "emulated xenstore: connection dropped");
    }

    /// Whether this connection is still up (not [`disconnect`](Self::disconnect)ed).
    pub fn is_connected(&self) -> bool {
        lock(&self.shared).conns.contains_key(&self.conn)
    }

    /// Number of nodes in the store (for tests and leak checks).
    pub fn node_count(&self) -> usize {
        lock(&self.shared).tree.nodes.len()
    }

    /// Run `f` on the live tree or on this connection's transaction `tx`, record what it touched, fire watches for
    /// what it changed (outside transactions).
    fn run<T>(
        &self,
        tx: TxId,
        path: &str,
        f: impl FnOnce(&mut Tree, &mut u64, &str) -> Result<(T, Vec<Change>), XenError>,
    ) -> Result<T, XenError> {
        let abs = absolute(self.domid, path)?;
        let mut st = lock(&self.shared);
        connected(&st, self.conn)?;
        if tx == TxId::NONE {
            let State { tree, generation, conns, .. } = &mut *st;
            let (value, changes) = f(tree, generation, &abs)?;
            fire(conns, &changes);
            return Ok(value);
        }
        let t = st.txs.get_mut(&tx.0).filter(|t| t.conn == self.conn).ok_or_else(|| unknown_tx(tx))?;
        t.accessed.insert(abs.clone());
        let (value, changes) = f(&mut t.work, &mut t.generation, &abs)?;
        for c in changes {
            t.accessed.insert(parent(&c.path).to_owned());
            t.accessed.insert(c.path);
        }
        Ok(value)
    }
}

fn lock(shared: &Mutex<State>) -> MutexGuard<'_, State> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// [`XenError::Disconnected`] once the connection was dropped.
fn connected(st: &State, conn: u64) -> Result<(), XenError> {
    if st.conns.contains_key(&conn) {
        Ok(())
    } else {
        Err(XenError::Disconnected { what: "xenstore" })
    }
}

fn unknown_tx(tx: TxId) -> XenError {
    XenError::Os { what: format!("xenstore: transaction {}", tx.0), errno: libc::ENOENT }
}

fn push_event(domid: DomId, events: &mut VecDeque<WatchEvent>, event: WatchEvent) -> bool {
    if events.len() >= MAX_PENDING_WATCH_EVENTS {
        tracing::warn!(domid, path = %event.path, "emulated xenstore: watch event queue full, event dropped");
        return false;
    }
    events.push_back(event);
    true
}

/// Queue the watch events `changes` cause on every connection that may read the changed node.
fn fire(conns: &mut HashMap<u64, Conn>, changes: &[Change]) {
    for conn in conns.values_mut() {
        let mut fired = false;
        for w in &conn.watches {
            let mut reported_paths: Vec<&str> = Vec::new();
            for c in changes {
                if !allowed(conn.domid, &c.perms, Need::Read) {
                    continue;
                }
                // A change at or below the watched node reports the changed path; removing an ancestor of the
                // watched node reports the watched path.
                let reported = if is_at_or_below(&c.path, &w.abs) {
                    &c.path
                } else if c.removed && is_at_or_below(&w.abs, &c.path) {
                    &w.abs
                } else {
                    continue;
                };
                if reported_paths.contains(&reported.as_str()) {
                    continue; // one event per node and watch, even when a subtree goes at once
                }
                reported_paths.push(reported);
                let path = match &w.relative_prefix {
                    Some(prefix) => reported.strip_prefix(prefix.as_str()).unwrap_or(reported).to_owned(),
                    None => reported.clone(),
                };
                fired |= push_event(conn.domid, &mut conn.events, WatchEvent { path, token: w.token.clone() });
            }
        }
        if fired {
            let _ = conn.eventfd.write(1);
        }
    }
}

impl Drop for EmulatedXenStore {
    fn drop(&mut self) {
        let mut st = lock(&self.shared);
        st.conns.remove(&self.conn);
        let conn = self.conn;
        st.txs.retain(|_, t| t.conn != conn);
    }
}

impl XenStore for EmulatedXenStore {
    fn read(&self, tx: TxId, path: &str) -> Result<Vec<u8>, XenError> {
        let domid = self.domid;
        self.run(tx, path, |tree, _, abs| Ok((tree.read(domid, abs)?, Vec::new())))
    }

    fn write(&self, tx: TxId, path: &str, value: &[u8]) -> Result<(), XenError> {
        let domid = self.domid;
        self.run(tx, path, |tree, gen, abs| Ok(((), tree.write(domid, abs, Some(value), gen)?)))
    }

    fn mkdir(&self, tx: TxId, path: &str) -> Result<(), XenError> {
        let domid = self.domid;
        self.run(tx, path, |tree, gen, abs| Ok(((), tree.write(domid, abs, None, gen)?)))
    }

    fn rm(&self, tx: TxId, path: &str) -> Result<(), XenError> {
        let domid = self.domid;
        self.run(tx, path, |tree, gen, abs| Ok(((), tree.rm(domid, abs, gen)?)))
    }

    fn directory(&self, tx: TxId, path: &str) -> Result<Vec<String>, XenError> {
        let domid = self.domid;
        self.run(tx, path, |tree, _, abs| Ok((tree.directory(domid, abs)?, Vec::new())))
    }

    fn get_perms(&self, tx: TxId, path: &str) -> Result<Vec<Permission>, XenError> {
        let domid = self.domid;
        self.run(tx, path, |tree, _, abs| Ok((tree.get_perms(domid, abs)?, Vec::new())))
    }

    fn set_perms(&self, tx: TxId, path: &str, perms: &[Permission]) -> Result<(), XenError> {
        let domid = self.domid;
        self.run(tx, path, |tree, gen, abs| Ok(((), tree.set_perms(domid, abs, perms, gen)?)))
    }

    fn transaction_start(&self) -> Result<TxId, XenError> {
        let mut st = lock(&self.shared);
        connected(&st, self.conn)?;
        let conn = self.conn;
        if st.txs.values().filter(|t| t.conn == conn).count() >= MAX_TRANSACTIONS_PER_CONNECTION {
            return Err(XenError::Os { what: "xenstore: too many transactions".into(), errno: libc::ENOSPC });
        }
        let id = loop {
            let id = st.next_tx;
            st.next_tx = st.next_tx.wrapping_add(1).max(1);
            if !st.txs.contains_key(&id) {
                break id;
            }
        };
        let base = st.tree.clone();
        let generation = st.generation;
        st.txs.insert(id, Tx { conn, work: base.clone(), base, generation, accessed: BTreeSet::new() });
        Ok(TxId(id))
    }

    fn transaction_end(&self, tx: TxId, commit: bool) -> Result<(), XenError> {
        let mut st = lock(&self.shared);
        connected(&st, self.conn)?;
        let t = match st.txs.get(&tx.0) {
            Some(t) if t.conn == self.conn => st.txs.remove(&tx.0).ok_or_else(|| unknown_tx(tx))?,
            _ => return Err(unknown_tx(tx)),
        };
        if !commit {
            return Ok(());
        }
        let State { tree, generation, conns, .. } = &mut *st;
        if t.accessed.iter().any(|p| tree.generation_of(p) != t.base.generation_of(p)) {
            return Err(XenError::Again);
        }
        // Apply the transaction's differences to the live tree.
        let mut changes = Vec::new();
        for (path, node) in &t.work.nodes {
            let same = t.base.nodes.get(path).is_some_and(|b| b.value == node.value && b.perms == node.perms);
            if !same {
                changes.push(Change { path: path.clone(), perms: node.perms.clone(), removed: false });
            }
        }
        for (path, node) in &t.base.nodes {
            if !t.work.nodes.contains_key(path) {
                changes.push(Change { path: path.clone(), perms: node.perms.clone(), removed: true });
            }
        }
        for c in &changes {
            *generation += 1;
            let gen = *generation;
            if c.removed {
                tree.nodes.remove(&c.path);
            } else if let Some(node) = t.work.nodes.get(&c.path) {
                let mut node = node.clone();
                node.generation = gen;
                tree.nodes.insert(c.path.clone(), node);
            }
            if let Some(p) = tree.nodes.get_mut(parent(&c.path)) {
                p.generation = gen;
            }
        }
        fire(conns, &changes);
        Ok(())
    }

    fn watch(&self, path: &str, token: &str) -> Result<(), XenError> {
        let (abs, relative_prefix) = if let Some(name) = path.strip_prefix('@') {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(XenError::Os {
                    what: format!("xenstore: invalid watch path {path:?}"),
                    errno: libc::EINVAL,
                });
            }
            (path.to_owned(), None)
        } else {
            let abs = absolute(self.domid, path)?;
            let rel = (!path.starts_with('/')).then(|| format!("/local/domain/{}/", self.domid));
            (abs, rel)
        };
        if token.len() > MAX_VALUE_LEN {
            return Err(XenError::Os { what: "xenstore: watch token too long".into(), errno: libc::E2BIG });
        }
        let mut st = lock(&self.shared);
        let conn = st.conns.get_mut(&self.conn).ok_or(XenError::Disconnected { what: "xenstore" })?;
        if conn.watches.iter().any(|w| w.abs == abs && w.token == token) {
            return Err(XenError::Os { what: format!("xenstore: watch {path} {token}"), errno: libc::EEXIST });
        }
        if conn.watches.len() >= MAX_WATCHES_PER_CONNECTION {
            return Err(XenError::Os { what: "xenstore: too many watches".into(), errno: libc::E2BIG });
        }
        conn.watches.push(Watch { abs, token: token.to_owned(), relative_prefix });
        if push_event(conn.domid, &mut conn.events, WatchEvent { path: path.to_owned(), token: token.to_owned() }) {
            let _ = conn.eventfd.write(1);
        }
        Ok(())
    }

    fn unwatch(&self, path: &str, token: &str) -> Result<(), XenError> {
        let abs = if path.starts_with('@') { path.to_owned() } else { absolute(self.domid, path)? };
        let mut st = lock(&self.shared);
        let conn = st.conns.get_mut(&self.conn).ok_or(XenError::Disconnected { what: "xenstore" })?;
        let before = conn.watches.len();
        conn.watches.retain(|w| !(w.abs == abs && w.token == token));
        if conn.watches.len() == before {
            return Err(XenError::NotFound { path: path.to_owned() });
        }
        Ok(())
    }

    fn watch_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    fn take_watch_events(&self, out: &mut Vec<WatchEvent>) -> Result<(), XenError> {
        let mut st = lock(&self.shared);
        // A dropped connection keeps its watch fd readable (it is not cleared here) so the owner notices.
        let conn = st.conns.get_mut(&self.conn).ok_or(XenError::Disconnected { what: "xenstore" })?;
        // Clear the eventfd under the lock: an event queued after this is signalled again.
        let _ = self.eventfd.read();
        out.extend(conn.events.drain(..));
        Ok(())
    }
}

#[cfg(test)]
mod tests;
