// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Emulated event channels: a switch connecting ports in pairs, with `/dev/xen/evtchn` delivery semantics.
//!
//! Each handle ([`EmulatedEventChannel`], one "open of `/dev/xen/evtchn`") has an eventfd that becomes readable
//! when one of its bound ports is notified. A delivered port is masked: further notifications only mark it
//! pending, and [`EventChannel::unmask`] delivers it once more if it was. A guest allocates an unbound port for
//! a remote domain ([`EmulatedEventChannel::alloc_unbound`]); the backend binds to it with
//! [`EventChannel::bind_interdomain`]. Closing one end leaves the other end unbound, as Xen does.

use std::collections::VecDeque;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::keyed_map::KeyedMap;
use crate::services::{DomId, EventChannel, EventChannelOpener, EvtchnPort, XenError};

/// Ports one domain may have open (Xen's 2-level ABI limit on 64-bit guests is 4096).
pub const MAX_PORTS_PER_DOMAIN: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PortState {
    Unbound { remote: DomId },
    Interdomain { remote: DomId, remote_port: EvtchnPort },
}

#[derive(Debug)]
struct Port {
    handle: u64,
    state: PortState,
    masked: bool,
    pending: bool,
    sent: u64,
    received: u64,
}

#[derive(Debug)]
struct Handle {
    queue: VecDeque<EvtchnPort>,
    eventfd: Arc<EventFd>,
}

#[derive(Debug, Default)]
struct SwitchState {
    ports: KeyedMap<(DomId, EvtchnPort), Port>,
    next_port: KeyedMap<DomId, EvtchnPort>,
    handles: KeyedMap<u64, Handle>,
    next_handle: u64,
}

impl SwitchState {
    fn alloc_port(&mut self, domid: DomId, handle: u64, state: PortState) -> Result<EvtchnPort, XenError> {
        if self.ports.keys().filter(|(d, _)| *d == domid).count() >= MAX_PORTS_PER_DOMAIN {
            return Err(XenError::Os { what: format!("evtchn: domain {domid} has no free port"), errno: libc::ENOSPC });
        }
        let next = self.next_port.entry(domid).or_insert(1);
        let port = loop {
            let p = *next;
            *next = if *next as usize >= MAX_PORTS_PER_DOMAIN { 1 } else { *next + 1 };
            if !self.ports.contains_key(&(domid, p)) {
                break p;
            }
        };
        self.ports.insert((domid, port), Port { handle, state, masked: false, pending: false, sent: 0, received: 0 });
        Ok(port)
    }

    /// Deliver an event to `(domid, port)`: queue it on its handle unless it is masked.
    fn raise(&mut self, domid: DomId, port: EvtchnPort) {
        let Some(p) = self.ports.get_mut(&(domid, port)) else {
            return;
        };
        p.received += 1;
        if p.masked {
            p.pending = true;
            return;
        }
        p.masked = true;
        let handle = p.handle;
        if let Some(h) = self.handles.get_mut(&handle) {
            h.queue.push_back(port);
            let _ = h.eventfd.write(1);
        }
    }

    fn close(&mut self, domid: DomId, port: EvtchnPort) {
        if let Some(p) = self.ports.remove(&(domid, port)) {
            if let PortState::Interdomain { remote, remote_port } = p.state {
                if let Some(r) = self.ports.get_mut(&(remote, remote_port)) {
                    r.state = PortState::Unbound { remote: domid };
                }
            }
            if let Some(h) = self.handles.get_mut(&p.handle) {
                h.queue.retain(|&q| q != port);
            }
        }
    }
}

/// The host's event-channel switch: every domain's ports.
#[derive(Clone, Debug, Default)]
pub struct EvtchnSwitch {
    state: Arc<Mutex<SwitchState>>,
}

impl EvtchnSwitch {
    /// An empty switch.
    pub fn new() -> EvtchnSwitch {
        EvtchnSwitch::default()
    }

    fn lock(&self) -> MutexGuard<'_, SwitchState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Open a handle for `domid` (like opening `/dev/xen/evtchn` in that domain).
    pub fn open(&self, domid: DomId) -> Result<EmulatedEventChannel, XenError> {
        let eventfd =
            Arc::new(EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| XenError::os("evtchn: eventfd", &e))?);
        let mut st = self.lock();
        st.next_handle += 1;
        let handle = st.next_handle;
        st.handles.insert(handle, Handle { queue: VecDeque::new(), eventfd: eventfd.clone() });
        Ok(EmulatedEventChannel { switch: self.clone(), handle, domid, eventfd, ports: Vec::new() })
    }

    /// Notifications sent from `(domid, port)` so far.
    pub fn sent(&self, domid: DomId, port: EvtchnPort) -> u64 {
        self.lock().ports.get(&(domid, port)).map_or(0, |p| p.sent)
    }

    /// Notifications that reached `(domid, port)` so far (delivered or merged into a pending one).
    pub fn received(&self, domid: DomId, port: EvtchnPort) -> u64 {
        self.lock().ports.get(&(domid, port)).map_or(0, |p| p.received)
    }

    /// Ports open in `domid` (for leak checks).
    pub fn open_ports(&self, domid: DomId) -> usize {
        self.lock().ports.keys().filter(|(d, _)| *d == domid).count()
    }
}

/// One event-channel handle of one domain. Dropping it closes its ports.
#[derive(Debug)]
pub struct EmulatedEventChannel {
    switch: EvtchnSwitch,
    handle: u64,
    domid: DomId,
    eventfd: Arc<EventFd>,
    ports: Vec<EvtchnPort>,
}

impl EmulatedEventChannel {
    /// The domain this handle belongs to.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// Allocate an unbound port that `remote` may bind to (`EVTCHNOP_alloc_unbound`, what a frontend does).
    pub fn alloc_unbound(&mut self, remote: DomId) -> Result<EvtchnPort, XenError> {
        let port = self.switch.lock().alloc_port(self.domid, self.handle, PortState::Unbound { remote })?;
        self.ports.push(port);
        Ok(port)
    }

    /// Whether `port` is connected to a peer.
    pub fn is_connected(&self, port: EvtchnPort) -> bool {
        matches!(
            self.switch.lock().ports.get(&(self.domid, port)).map(|p| p.state),
            Some(PortState::Interdomain { .. })
        )
    }

    fn own(&self, port: EvtchnPort) -> Result<(), XenError> {
        if self.ports.contains(&port) {
            Ok(())
        } else {
            Err(XenError::Os { what: format!("evtchn: port {port} is not bound here"), errno: libc::EINVAL })
        }
    }
}

impl Drop for EmulatedEventChannel {
    fn drop(&mut self) {
        let mut st = self.switch.lock();
        for port in self.ports.drain(..) {
            st.close(self.domid, port);
        }
        st.handles.remove(&self.handle);
    }
}

impl EventChannel for EmulatedEventChannel {
    fn bind_interdomain(&mut self, remote: DomId, remote_port: EvtchnPort) -> Result<EvtchnPort, XenError> {
        let mut st = self.switch.lock();
        let domid = self.domid;
        match st.ports.get(&(remote, remote_port)).map(|p| p.state) {
            Some(PortState::Unbound { remote: r }) if r == domid => {}
            Some(_) => {
                return Err(XenError::Os {
                    what: format!("evtchn: port {remote_port} of domain {remote} is not offered to domain {domid}"),
                    errno: libc::EINVAL,
                })
            }
            None => {
                return Err(XenError::Os {
                    what: format!("evtchn: domain {remote} has no port {remote_port}"),
                    errno: libc::ENOENT,
                })
            }
        }
        let local = st.alloc_port(domid, self.handle, PortState::Interdomain { remote, remote_port })?;
        if let Some(r) = st.ports.get_mut(&(remote, remote_port)) {
            r.state = PortState::Interdomain { remote: domid, remote_port: local };
        }
        drop(st);
        self.ports.push(local);
        Ok(local)
    }

    fn unbind(&mut self, port: EvtchnPort) -> Result<(), XenError> {
        self.own(port)?;
        self.switch.lock().close(self.domid, port);
        self.ports.retain(|&p| p != port);
        Ok(())
    }

    fn notify(&self, port: EvtchnPort) -> Result<(), XenError> {
        self.own(port)?;
        let mut st = self.switch.lock();
        let Some(p) = st.ports.get_mut(&(self.domid, port)) else {
            return Err(XenError::Os { what: format!("evtchn: port {port} closed"), errno: libc::EINVAL });
        };
        p.sent += 1;
        match p.state {
            PortState::Interdomain { remote, remote_port } => st.raise(remote, remote_port),
            // Xen drops events on a port whose peer is gone.
            PortState::Unbound { .. } => {}
        }
        Ok(())
    }

    fn fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    fn pending(&mut self, out: &mut Vec<EvtchnPort>) -> Result<(), XenError> {
        let mut st = self.switch.lock();
        let h = st.handles.get_mut(&self.handle).ok_or(XenError::Disconnected { what: "evtchn" })?;
        let _ = self.eventfd.read();
        out.extend(h.queue.drain(..));
        Ok(())
    }

    fn unmask(&mut self, port: EvtchnPort) -> Result<(), XenError> {
        self.own(port)?;
        let mut st = self.switch.lock();
        let Some(p) = st.ports.get_mut(&(self.domid, port)) else {
            return Err(XenError::Os { what: format!("evtchn: port {port} closed"), errno: libc::EINVAL });
        };
        p.masked = false;
        if p.pending {
            p.pending = false;
            p.received -= 1; // counted when it arrived
            st.raise(self.domid, port);
        }
        Ok(())
    }
}

/// Opens event-channel handles for one domain (the backend's `EventChannelOpener`).
#[derive(Clone, Debug)]
pub struct EmulatedEvtchnOpener {
    switch: EvtchnSwitch,
    domid: DomId,
}

impl EmulatedEvtchnOpener {
    /// An opener for handles of `domid`.
    pub fn new(switch: EvtchnSwitch, domid: DomId) -> Self {
        EmulatedEvtchnOpener { switch, domid }
    }
}

impl EventChannelOpener for EmulatedEvtchnOpener {
    type Channel = EmulatedEventChannel;

    fn open(&self) -> Result<EmulatedEventChannel, XenError> {
        self.switch.open(self.domid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: RawFd) -> bool {
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    }

    #[test]
    fn pairs_deliver_once_until_unmasked() {
        let sw = EvtchnSwitch::new();
        let mut guest = sw.open(5).expect("open");
        let mut back = EmulatedEvtchnOpener::new(sw.clone(), 0).open().expect("open");
        let gport = guest.alloc_unbound(0).expect("alloc");
        assert!(back.bind_interdomain(5, gport + 1).is_err(), "no such port");
        let bport = back.bind_interdomain(5, gport).expect("bind");
        assert!(guest.is_connected(gport));
        assert!(back.bind_interdomain(5, gport).is_err(), "already bound");

        guest.notify(gport).expect("notify");
        guest.notify(gport).expect("notify while masked");
        assert!(readable(back.fd()));
        let mut ports = Vec::new();
        back.pending(&mut ports).expect("pending");
        assert_eq!(ports, vec![bport]);
        assert!(!readable(back.fd()), "masked: the second notification is only pending");
        back.unmask(bport).expect("unmask");
        assert!(readable(back.fd()), "pending event delivered on unmask");
        ports.clear();
        back.pending(&mut ports).expect("pending");
        back.unmask(bport).expect("unmask");
        assert_eq!(ports, vec![bport]);
        assert!(!readable(back.fd()));
        assert_eq!((sw.sent(5, gport), sw.received(0, bport)), (2, 2));

        back.notify(bport).expect("notify back");
        ports.clear();
        guest.pending(&mut ports).expect("pending");
        assert_eq!(ports, vec![gport]);

        back.unbind(bport).expect("unbind");
        assert!(!guest.is_connected(gport));
        guest.notify(gport).expect("notify into the void is dropped");
        assert!(back.notify(bport).is_err());
        drop(back);
        drop(guest);
        assert_eq!(sw.open_ports(0) + sw.open_ports(5), 0);
    }

    #[test]
    fn only_the_named_remote_may_bind() {
        let sw = EvtchnSwitch::new();
        let mut guest = sw.open(5).expect("open");
        let port = guest.alloc_unbound(0).expect("alloc");
        let mut intruder = sw.open(6).expect("open");
        assert!(intruder.bind_interdomain(5, port).is_err());
        assert!(intruder.notify(port).is_err(), "not our port");
    }
}
