// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The toolstack's part, as libxl and the `block` hotplug script do it: create a vbd's backend and frontend
//! directories in one transaction with their permissions, write `physical-device` + `diskseq` in one transaction
//! once the backend shows `opened`, detach (`online` = 0, `state` = Closing), remove.

use std::sync::Arc;
use std::time::Duration;

use crate::services::{with_transaction, DomId, PermAccess, Permission, TxId, XenError, XenStore};
use crate::xenbus::nodes::PhysicalDevice;
use crate::xenbus::state::{VbdId, VbdPaths, XenbusState};

use super::wait::{wait_for, WaitError};

/// `virtual-device` of the first xvd disk (xvda: major 202, minor 0).
pub const XVDA: u32 = 51712;

/// A disk to attach, as `xl` would describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    /// The guest.
    pub frontend_domid: DomId,
    /// `virtual-device`.
    pub devid: u32,
    /// `params` (the image or device path), if any.
    pub params: Option<String>,
    /// `mode` = `r`.
    pub read_only: bool,
    /// `device-type` (`disk` or `cdrom`).
    pub device_type: String,
    /// `script`: the hotplug script libxl would run (which then writes `physical-device`); `None` for images
    /// served directly from `params`.
    pub script: Option<String>,
}

impl DiskSpec {
    /// A writable disk `xvda` of `domid` backed by `params`.
    pub fn new(domid: DomId, params: impl Into<String>) -> DiskSpec {
        DiskSpec {
            frontend_domid: domid,
            devid: XVDA,
            params: Some(params.into()),
            read_only: false,
            device_type: "disk".into(),
            script: None,
        }
    }

    /// The vbd's id.
    pub fn id(&self) -> VbdId {
        VbdId { domid: self.frontend_domid, devid: self.devid }
    }
}

/// The toolstack, over a dom0 connection.
#[derive(Clone)]
pub struct Toolstack {
    store: Arc<dyn XenStore>,
    backend_domid: DomId,
    backend_domain_path: String,
}

impl std::fmt::Debug for Toolstack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Toolstack").field("backend_domid", &self.backend_domid).finish()
    }
}

/// The frontend directory of a vbd (`/local/domain/<domid>/device/vbd/<devid>`).
pub fn frontend_path(id: VbdId) -> String {
    format!("/local/domain/{}/device/vbd/{}", id.domid, id.devid)
}

impl Toolstack {
    /// A toolstack for a backend in dom0, over a dom0 `store` connection.
    pub fn new(store: Arc<dyn XenStore>) -> Toolstack {
        Toolstack { store, backend_domid: 0, backend_domain_path: "/local/domain/0".into() }
    }

    /// The backend's paths for `id`.
    pub fn paths(&self, id: VbdId) -> VbdPaths {
        VbdPaths::new(&self.backend_domain_path, id)
    }

    /// The dom0 connection.
    pub fn store(&self) -> &Arc<dyn XenStore> {
        &self.store
    }

    /// Create the vbd's backend and frontend directories in one transaction (libxl's `device_disk_add`): the
    /// backend directory readable by the guest, the frontend directory owned by the guest and readable by the
    /// backend, both in state Initialising.
    pub fn add_disk(&self, spec: &DiskSpec) -> Result<VbdId, XenError> {
        let id = spec.id();
        let be = self.paths(id).backend;
        let fe = frontend_path(id);
        let store = &*self.store;
        let be_perms = [
            Permission { domid: self.backend_domid, access: PermAccess::None },
            Permission { domid: spec.frontend_domid, access: PermAccess::Read },
        ];
        let fe_perms = [
            Permission { domid: spec.frontend_domid, access: PermAccess::None },
            Permission { domid: self.backend_domid, access: PermAccess::Read },
        ];
        let mut backend_nodes = vec![
            ("frontend", fe.clone()),
            ("frontend-id", spec.frontend_domid.to_string()),
            ("online", "1".into()),
            ("state", XenbusState::Initialising.as_node()),
            ("mode", if spec.read_only { "r" } else { "w" }.into()),
            ("type", "phy".into()),
            ("removable", "0".into()),
            ("bootable", "1".into()),
            ("device-type", spec.device_type.clone()),
            ("dev", "xvda".into()),
        ];
        if let Some(params) = &spec.params {
            backend_nodes.push(("params", params.clone()));
        }
        if let Some(script) = &spec.script {
            backend_nodes.push(("script", script.clone()));
        }
        let frontend_nodes = [
            ("backend", be.clone()),
            ("backend-id", self.backend_domid.to_string()),
            ("state", XenbusState::Initialising.as_node()),
            ("virtual-device", spec.devid.to_string()),
            ("device-type", spec.device_type.clone()),
        ];
        with_transaction(store, 16, |tx| {
            rm_if_exists(store, tx, &be)?;
            rm_if_exists(store, tx, &fe)?;
            store.mkdir(tx, &be)?;
            store.set_perms(tx, &be, &be_perms)?;
            store.mkdir(tx, &fe)?;
            store.set_perms(tx, &fe, &fe_perms)?;
            for (name, value) in &backend_nodes {
                store.write(tx, &format!("{be}/{name}"), value.as_bytes())?;
            }
            for (name, value) in &frontend_nodes {
                store.write(tx, &format!("{fe}/{name}"), value.as_bytes())?;
            }
            Ok(())
        })?;
        Ok(id)
    }

    /// The `block` hotplug script: wait for the backend's InitWait and its `opened` node (which says the backend
    /// checks `diskseq`), then write `physical-device` and `diskseq` in one transaction.
    pub fn hotplug(
        &self,
        id: VbdId,
        device: &[u8],
        diskseq: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<(), WaitError> {
        let paths = self.paths(id);
        let store = &*self.store;
        wait_for(store, &paths.node("state"), timeout, |v| {
            v.and_then(|v| XenbusState::parse(v).ok()).filter(|s| *s >= XenbusState::InitWait).map(|_| ())
        })?;
        wait_for(store, &paths.node("opened"), timeout, |v| v.map(|_| ()))?;
        with_transaction(store, 16, |tx| {
            store.write(tx, &paths.node("physical-device"), device)?;
            if let Some(seq) = diskseq {
                store.write(tx, &paths.node("diskseq"), seq)?;
            }
            store.write(tx, &paths.node("hotplug-status"), b"connected")
        })?;
        Ok(())
    }

    /// [`hotplug`](Self::hotplug) for a block device by number, pinned to its `diskseq` (in hex, as the seed).
    pub fn hotplug_device(
        &self,
        id: VbdId,
        device: PhysicalDevice,
        diskseq: Option<u64>,
        timeout: Duration,
    ) -> Result<(), WaitError> {
        let seq = diskseq.map(|s| format!("{s:x}"));
        self.hotplug(id, device.to_string().as_bytes(), seq.as_deref().map(str::as_bytes), timeout)
    }

    /// Wait until the backend holds the device (`opened` = `1`), after which the script may drop its reference.
    pub fn wait_opened(&self, id: VbdId, timeout: Duration) -> Result<(), WaitError> {
        super::wait::wait_for_value(&*self.store, &self.paths(id).node("opened"), b"1", timeout)
    }

    /// Wait until the backend's state satisfies `pred`, returning it.
    pub fn wait_backend_state(
        &self,
        id: VbdId,
        timeout: Duration,
        pred: impl Fn(XenbusState) -> bool,
    ) -> Result<XenbusState, WaitError> {
        wait_for(&*self.store, &self.paths(id).node("state"), timeout, |v| {
            v.and_then(|v| XenbusState::parse(v).ok()).filter(|s| pred(*s))
        })
    }

    /// The backend's `error` node, if any.
    pub fn error(&self, id: VbdId) -> Result<Option<String>, XenError> {
        Ok(crate::services::read_optional(&*self.store, TxId::NONE, &self.paths(id).error)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Detach as libxl does: `online` = 0 and `state` = Closing in one transaction.
    pub fn detach(&self, id: VbdId) -> Result<(), XenError> {
        let paths = self.paths(id);
        let store = &*self.store;
        with_transaction(store, 16, |tx| {
            store.write(tx, &paths.node("online"), b"0")?;
            store.write(tx, &paths.node("state"), XenbusState::Closing.as_node().as_bytes())
        })
    }

    /// Remove the vbd's backend, frontend and error nodes (after detach, or forcibly).
    pub fn remove(&self, id: VbdId) -> Result<(), XenError> {
        let paths = self.paths(id);
        let error_dir = paths.error.trim_end_matches("/error").to_string();
        let store = &*self.store;
        with_transaction(store, 16, |tx| {
            rm_if_exists(store, tx, &paths.backend)?;
            rm_if_exists(store, tx, &frontend_path(id))?;
            rm_if_exists(store, tx, &error_dir)
        })
    }
}

fn rm_if_exists(store: &dyn XenStore, tx: TxId, path: &str) -> Result<(), XenError> {
    match store.rm(tx, path) {
        Ok(()) | Err(XenError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}
