// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The emulated Xen host: one xenstore, one event-channel switch, the domains' grant tables, and guest domains
//! whose memory is a memfd.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex, PoisonError};

use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::evtchn::{EmulatedEventChannel, EmulatedEvtchnOpener, EvtchnSwitch};
use super::grants::{EmulatedGrantTable, GrantHost};
use super::xenstore::EmulatedXenStore;
use crate::services::{DomId, GrantRef, PermAccess, Permission, TxId, XenError, XenStore, XEN_PAGE_SIZE};

/// Most pages an emulated guest may have (1 GiB).
pub const MAX_GUEST_PAGES: usize = 1 << 18;

#[derive(Debug)]
struct HostInner {
    store: EmulatedXenStore,
    evtchn: EvtchnSwitch,
    grants: Arc<GrantHost>,
}

/// An emulated Xen host. Cheap to clone (all clones are the same host).
#[derive(Clone, Debug)]
pub struct EmulatedHost {
    inner: Arc<HostInner>,
}

impl EmulatedHost {
    /// A host with an empty xenstore (plus `/local/domain/0`), no guests.
    pub fn new() -> Result<EmulatedHost, XenError> {
        let store = EmulatedXenStore::new()?;
        store.mkdir(TxId::NONE, "/local/domain/0")?;
        let inner = HostInner { store, evtchn: EvtchnSwitch::new(), grants: Arc::new(GrantHost::default()) };
        Ok(EmulatedHost { inner: Arc::new(inner) })
    }

    /// A new dom0 xenstore connection (what a backend process opens).
    pub fn xenstore(&self) -> Result<EmulatedXenStore, XenError> {
        self.inner.store.connect(0)
    }

    /// A new xenstore connection acting as `domid`.
    pub fn xenstore_as(&self, domid: DomId) -> Result<EmulatedXenStore, XenError> {
        self.inner.store.connect(domid)
    }

    /// The event-channel switch (for counters and opening handles of any domain).
    pub fn evtchn_switch(&self) -> &EvtchnSwitch {
        &self.inner.evtchn
    }

    /// An event-channel opener for `domid` (the backend passes `evtchn_opener(0)` to the data plane).
    pub fn evtchn_opener(&self, domid: DomId) -> EmulatedEvtchnOpener {
        EmulatedEvtchnOpener::new(self.inner.evtchn.clone(), domid)
    }

    /// A grant-table handle through which `domid` maps and copies grants (the backend uses `grant_table(0)`).
    pub fn grant_table(&self, domid: DomId) -> EmulatedGrantTable {
        EmulatedGrantTable::new(self.inner.grants.clone(), domid)
    }

    /// Every domain's grant table (counters, grant state).
    pub fn grants(&self) -> &Arc<GrantHost> {
        &self.inner.grants
    }

    /// Grant mappings currently alive, across all grantees: 0 once a backend has released everything.
    pub fn live_mappings(&self) -> usize {
        self.inner.grants.live_mappings()
    }

    /// Grant map calls (batches) so far.
    pub fn map_calls(&self) -> u64 {
        self.inner.grants.map_calls()
    }

    /// Grant copy calls (batches) so far.
    pub fn copy_calls(&self) -> u64 {
        self.inner.grants.copy_calls()
    }

    /// Create guest `domid` with `pages` pages of memfd-backed memory, its xenstore home as a toolstack makes it
    /// (`/local/domain/<domid>` owned by dom0 and readable by the guest; `device` and `data` below it owned by
    /// the guest), and fire `@introduceDomain`. Dropping the [`GuestDomain`] destroys it.
    pub fn add_guest(&self, domid: DomId, pages: usize) -> Result<GuestDomain, XenError> {
        if domid == 0 || pages == 0 || pages > MAX_GUEST_PAGES {
            return Err(XenError::Os { what: format!("add_guest({domid}, {pages} pages)"), errno: libc::EINVAL });
        }
        let memfd = Arc::new(memfd(&format!("xen-guest-{domid}"), pages * XEN_PAGE_SIZE)?);
        let file_offset = FileOffset::from_arc(memfd.clone(), 0);
        let memory = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            pages * XEN_PAGE_SIZE,
            Some(file_offset),
        )])
        .map_err(|e| XenError::Os { what: format!("guest {domid} memory: {e}"), errno: libc::ENOMEM })?;
        let memory = Arc::new(memory);
        self.inner.grants.add_domain(domid, memfd, memory.clone(), pages)?;
        let store = &self.inner.store;
        let home = format!("/local/domain/{domid}");
        let setup = || -> Result<(), XenError> {
            store.mkdir(TxId::NONE, &home)?;
            let ro =
                [Permission { domid: 0, access: PermAccess::None }, Permission { domid, access: PermAccess::Read }];
            store.set_perms(TxId::NONE, &home, &ro)?;
            for sub in ["device", "data"] {
                let path = format!("{home}/{sub}");
                store.mkdir(TxId::NONE, &path)?;
                store.set_perms(TxId::NONE, &path, &[Permission { domid, access: PermAccess::None }])?;
            }
            Ok(())
        };
        if let Err(e) = setup() {
            self.inner.grants.remove_domain(domid);
            return Err(e);
        }
        store.fire_special("@introduceDomain");
        Ok(GuestDomain { host: self.clone(), domid, memory, pages, allocated: Mutex::new(vec![false; pages]) })
    }
}

fn memfd(name: &str, size: usize) -> Result<File, XenError> {
    let cname =
        std::ffi::CString::new(name).map_err(|_| XenError::Os { what: "memfd name".into(), errno: libc::EINVAL })?;
    // SAFETY: a valid NUL-terminated name; the call creates a new descriptor.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(XenError::os("memfd_create", &std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new descriptor that we own from here on.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64).map_err(|e| XenError::os("memfd: set size", &e))?;
    Ok(file)
}

/// An emulated guest domain: its memory, grants, event channels and xenstore connection.
#[derive(Debug)]
pub struct GuestDomain {
    host: EmulatedHost,
    domid: DomId,
    memory: Arc<GuestMemoryMmap>,
    pages: usize,
    allocated: Mutex<Vec<bool>>,
}

impl GuestDomain {
    /// The domain id.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// The host this guest runs on.
    pub fn host(&self) -> &EmulatedHost {
        &self.host
    }

    /// Size of the guest's memory in pages.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The guest's view of its memory: guest-physical address `page * 4096 + offset`.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The guest-physical address of the start of `page`.
    pub fn page_addr(page: usize) -> GuestAddress {
        GuestAddress((page * XEN_PAGE_SIZE) as u64)
    }

    /// Our (the emulator's) pointer to the first byte of `page` of the guest's memory, if it exists.
    /// Consecutive pages are contiguous.
    pub fn page_ptr(&self, page: usize) -> Option<*mut u8> {
        if page >= self.pages {
            return None;
        }
        self.memory.get_host_address(Self::page_addr(page)).ok()
    }

    /// Allocate `count` contiguous free pages (first fit); `None` if there is no such run.
    pub fn alloc_pages(&self, count: usize) -> Option<usize> {
        let mut a = self.allocated.lock().unwrap_or_else(PoisonError::into_inner);
        if count == 0 || count > a.len() {
            return None;
        }
        let first = (0..=a.len() - count).find(|&s| a[s..s + count].iter().all(|used| !used))?;
        a[first..first + count].iter_mut().for_each(|used| *used = true);
        Some(first)
    }

    /// Free pages from [`alloc_pages`](Self::alloc_pages).
    pub fn free_pages(&self, first: usize, count: usize) {
        let mut a = self.allocated.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(run) = a.get_mut(first..first.saturating_add(count)) {
            run.iter_mut().for_each(|used| *used = false);
        }
    }

    /// Grant dom0 access to `page` (`gnttab_grant_foreign_access`).
    pub fn grant_access(&self, page: usize, readonly: bool) -> Result<GrantRef, XenError> {
        self.grant_access_to(0, page, readonly)
    }

    /// Grant `grantee` access to `page`.
    pub fn grant_access_to(&self, grantee: DomId, page: usize, readonly: bool) -> Result<GrantRef, XenError> {
        self.host.inner.grants.grant_access(self.domid, grantee, page, readonly)
    }

    /// Revoke a grant; fails with `EBUSY` while it is mapped.
    pub fn end_access(&self, gref: GrantRef) -> Result<(), XenError> {
        self.host.inner.grants.end_access(self.domid, gref)
    }

    /// Open an event-channel handle in this domain.
    pub fn evtchn(&self) -> Result<EmulatedEventChannel, XenError> {
        self.host.inner.evtchn.open(self.domid)
    }

    /// A xenstore connection acting as this domain.
    pub fn xenstore(&self) -> Result<EmulatedXenStore, XenError> {
        self.host.xenstore_as(self.domid)
    }
}

impl Drop for GuestDomain {
    fn drop(&mut self) {
        self.host.inner.grants.remove_domain(self.domid);
        let _ = self.host.inner.store.rm(TxId::NONE, &format!("/local/domain/{}", self.domid));
        self.host.inner.store.fire_special("@releaseDomain");
    }
}

#[cfg(test)]
mod tests;
