// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! An in-test xenstored: speaks the wire protocol over a real unix socket with its own framing code (independent
//! of the crate's codec), serves a small in-memory tree with watches and transactions, and can be scripted to
//! misbehave.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use transport_xen::xen::XenBusStore;

pub const XS_DIRECTORY: u32 = 1;
pub const XS_READ: u32 = 2;
pub const XS_GET_PERMS: u32 = 3;
pub const XS_WATCH: u32 = 4;
pub const XS_UNWATCH: u32 = 5;
pub const XS_TRANSACTION_START: u32 = 6;
pub const XS_TRANSACTION_END: u32 = 7;
pub const XS_WRITE: u32 = 11;
pub const XS_MKDIR: u32 = 12;
pub const XS_RM: u32 = 13;
pub const XS_SET_PERMS: u32 = 14;
pub const XS_WATCH_EVENT: u32 = 15;
pub const XS_ERROR: u32 = 16;

/// One request as the fake received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Req {
    pub ty: u32,
    pub req_id: u32,
    pub tx_id: u32,
    pub payload: Vec<u8>,
}

impl Req {
    /// The NUL-separated strings of the payload.
    pub fn strings(&self) -> Vec<&[u8]> {
        let body = self.payload.strip_suffix(&[0]).unwrap_or(&self.payload);
        body.split(|&b| b == 0).collect()
    }

    pub fn path(&self) -> String {
        String::from_utf8_lossy(self.strings()[0]).into_owned()
    }
}

/// A message in wire form.
pub fn frame(ty: u32, req_id: u32, tx_id: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for v in [ty, req_id, tx_id, u32::try_from(payload.len()).expect("small")] {
        out.extend_from_slice(&v.to_ne_bytes());
    }
    out.extend_from_slice(payload);
    out
}

/// A watch event in wire form (req_id garbage on purpose: the kernel leaves it uninitialized).
pub fn event(path: &str, token: &str) -> Vec<u8> {
    frame(XS_WATCH_EVENT, 0xdead_beef, 0, format!("{path}\0{token}\0").as_bytes())
}

/// Read one request; `None` at EOF.
pub fn read_req(stream: &mut UnixStream) -> Option<Req> {
    let mut head = [0u8; 16];
    stream.read_exact(&mut head).ok()?;
    let word = |i: usize| u32::from_ne_bytes(head[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
    let mut payload = vec![0u8; word(3) as usize];
    stream.read_exact(&mut payload).ok()?;
    Some(Req { ty: word(0), req_id: word(1), tx_id: word(2), payload })
}

/// The tree and knobs of the well-behaved fake.
#[derive(Default)]
pub struct FakeState {
    pub tree: Mutex<BTreeMap<String, Vec<u8>>>,
    pub perms: Mutex<BTreeMap<String, Vec<u8>>>,
    pub watches: Mutex<Vec<(String, String)>>,
    pub requests: Mutex<Vec<Req>>,
    /// Commits to refuse with EAGAIN before accepting one.
    pub conflicts: AtomicU32,
    pub tx_started: AtomicU32,
    /// Send an unrelated watch event before every reply.
    pub event_before_reply: AtomicBool,
    /// Split every reply into single-byte writes.
    pub dribble: AtomicBool,
}

impl FakeState {
    /// The reply (or replies and events) for one request, as wire bytes.
    pub fn handle(&self, req: &Req) -> Vec<u8> {
        self.requests.lock().expect("lock").push(req.clone());
        let ok = |ty| frame(ty, req.req_id, req.tx_id, b"OK\0");
        let err = |name: &str| frame(XS_ERROR, req.req_id, req.tx_id, format!("{name}\0").as_bytes());
        let mut out = Vec::new();
        if self.event_before_reply.load(Ordering::SeqCst) {
            out.extend(event("/noise", "noise"));
        }
        let strings = req.strings();
        let path = req.path();
        let mut fired = Vec::new();
        match req.ty {
            XS_READ => match self.tree.lock().expect("lock").get(&path) {
                Some(v) => out.extend(frame(XS_READ, req.req_id, req.tx_id, v)),
                None => out.extend(err("ENOENT")),
            },
            XS_WRITE | XS_MKDIR => {
                let value = if req.ty == XS_WRITE {
                    let at = req.payload.iter().position(|&b| b == 0).expect("path NUL") + 1;
                    req.payload[at..].to_vec()
                } else {
                    Vec::new()
                };
                let mut tree = self.tree.lock().expect("lock");
                let mut parent = String::new();
                for part in path.trim_start_matches('/').split('/') {
                    parent = format!("{parent}/{part}");
                    tree.entry(parent.clone()).or_default();
                }
                if req.ty == XS_WRITE {
                    tree.insert(path.clone(), value);
                }
                fired.push(path.clone());
                out.extend(ok(req.ty));
            }
            XS_RM => {
                self.tree.lock().expect("lock").retain(|k, _| k != &path && !k.starts_with(&format!("{path}/")));
                fired.push(path.clone());
                out.extend(ok(XS_RM));
            }
            XS_DIRECTORY => {
                let tree = self.tree.lock().expect("lock");
                if !tree.contains_key(&path) {
                    out.extend(err("ENOENT"));
                } else {
                    let prefix = format!("{path}/");
                    let mut body = Vec::new();
                    for k in tree.keys() {
                        if let Some(child) = k.strip_prefix(&prefix) {
                            if !child.contains('/') {
                                body.extend_from_slice(child.as_bytes());
                                body.push(0);
                            }
                        }
                    }
                    out.extend(frame(XS_DIRECTORY, req.req_id, req.tx_id, &body));
                }
            }
            XS_GET_PERMS => {
                let perms = self.perms.lock().expect("lock").get(&path).cloned().unwrap_or_else(|| b"n0\0".to_vec());
                out.extend(frame(XS_GET_PERMS, req.req_id, req.tx_id, &perms));
            }
            XS_SET_PERMS => {
                let at = req.payload.iter().position(|&b| b == 0).expect("path NUL") + 1;
                self.perms.lock().expect("lock").insert(path.clone(), req.payload[at..].to_vec());
                out.extend(ok(XS_SET_PERMS));
            }
            XS_TRANSACTION_START => {
                let id = self.tx_started.fetch_add(1, Ordering::SeqCst) + 1;
                out.extend(frame(XS_TRANSACTION_START, req.req_id, 0, format!("{id}\0").as_bytes()));
            }
            XS_TRANSACTION_END => {
                let refuse = strings[0] == b"T"
                    && self.conflicts.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1)).is_ok();
                out.extend(if refuse { err("EAGAIN") } else { ok(XS_TRANSACTION_END) });
            }
            XS_WATCH => {
                let token = String::from_utf8_lossy(strings[1]).into_owned();
                self.watches.lock().expect("lock").push((path.clone(), token.clone()));
                // xenstored acknowledges, then fires the watch once.
                out.extend(ok(XS_WATCH));
                out.extend(event(&path, &token));
            }
            XS_UNWATCH => {
                let token = String::from_utf8_lossy(strings[1]).into_owned();
                self.watches.lock().expect("lock").retain(|(p, t)| !(p == &path && t == &token));
                out.extend(ok(XS_UNWATCH));
            }
            _ => out.extend(err("ENOSYS")),
        }
        for changed in fired {
            for (watched, token) in self.watches.lock().expect("lock").iter() {
                if changed == *watched || changed.starts_with(&format!("{watched}/")) {
                    out.extend(event(&changed, token));
                }
            }
        }
        out
    }
}

/// A running fake xenstored and a client connected to it.
pub struct Fake {
    pub store: XenBusStore,
    pub state: Arc<FakeState>,
    server: Option<JoinHandle<()>>,
}

impl Fake {
    /// The well-behaved fake over a socket pair.
    pub fn start() -> Fake {
        let state = Arc::new(FakeState::default());
        let server_state = Arc::clone(&state);
        Fake::scripted(move |req, stream| {
            let bytes = server_state.handle(&req);
            if server_state.dribble.load(Ordering::SeqCst) {
                for b in bytes {
                    stream.write_all(&[b])?;
                }
                Ok(())
            } else {
                stream.write_all(&bytes)
            }
        })
        .with_state(state)
    }

    /// A fake whose every answer comes from `respond` (which writes raw bytes, or returns an error to hang up).
    pub fn scripted(mut respond: impl FnMut(Req, &mut UnixStream) -> std::io::Result<()> + Send + 'static) -> Fake {
        let (client, mut server) = UnixStream::pair().expect("socketpair");
        let store = XenBusStore::from_stream(client).expect("client").with_request_timeout(Duration::from_secs(10));
        let server = std::thread::spawn(move || {
            while let Some(req) = read_req(&mut server) {
                if respond(req, &mut server).is_err() {
                    break;
                }
            }
        });
        Fake { store, state: Arc::new(FakeState::default()), server: Some(server) }
    }

    fn with_state(mut self, state: Arc<FakeState>) -> Fake {
        self.state = state;
        self
    }

    /// Close the client and wait for the server thread to finish.
    pub fn finish(mut self) {
        let server = self.server.take();
        drop(self);
        if let Some(server) = server {
            server.join().expect("fake server thread");
        }
    }
}

/// Whether `fd` is readable within `timeout_ms`.
pub fn readable(fd: std::os::fd::RawFd, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    n == 1
}
