// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A test bed on the emulated Xen host: the host, a xenbus backend on its own thread, a toolstack (dom0's
//! xenstore connection) and a scratch directory for images, with the waits the tests make on the backend.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use device_blk::EngineKind;
use transport_xen::dataplane::DataplaneOptions;
use transport_xen::emulated::EmulatedHost;
use transport_xen::frontend::{BackendThread, Toolstack};
use transport_xen::services::{read_optional, TxId, XenStore};
use transport_xen::xenbus::dataplane_server::DataplaneServer;
use transport_xen::xenbus::{BackendConfig, RingServer, Scope, VbdId, XenbusState};

/// How long any single wait of these tests may take.
pub const T: Duration = Duration::from_secs(10);

/// An emulated host with a backend thread (serving every domain), a toolstack and a scratch directory; the
/// backend thread is stopped on drop.
pub struct XenBed {
    /// The emulated Xen host.
    pub host: EmulatedHost,
    /// Dom0's toolstack.
    pub toolstack: Toolstack,
    /// Scratch directory (images).
    pub dir: tempfile::TempDir,
    backend: Option<BackendThread>,
}

impl XenBed {
    /// A bed whose backend, configured by `config`, hands rings to `server`.
    pub fn start(host: EmulatedHost, config: BackendConfig, server: Arc<dyn RingServer>) -> XenBed {
        let backend = BackendThread::spawn(&host, server, config, Scope::AllDomains).expect("backend");
        let toolstack = Toolstack::new(Arc::new(host.xenstore().expect("dom0 connection")));
        XenBed { host, toolstack, dir: tempfile::tempdir().expect("tempdir"), backend: Some(backend) }
    }

    /// A bed on a fresh host with the real data plane.
    pub fn real(config: BackendConfig, options: DataplaneOptions) -> XenBed {
        let host = EmulatedHost::new().expect("host");
        let server =
            DataplaneServer::new(Arc::new(host.grant_table(0)), host.evtchn_opener(0), EngineKind::Auto, options);
        Self::start(host, config, Arc::new(server))
    }

    /// A zeroed (sparse) image file of `mib` MiB in the scratch directory.
    pub fn image(&self, name: &str, mib: u64) -> PathBuf {
        let path = self.dir.path().join(name);
        let f = std::fs::File::create(&path).expect("create image");
        f.set_len(mib << 20).expect("size image");
        path
    }

    /// The backend's xenstore connection view (dom0).
    pub fn store(&self) -> &dyn XenStore {
        &**self.toolstack.store()
    }

    /// A backend node's value.
    pub fn backend_node(&self, id: VbdId, name: &str) -> Option<Vec<u8>> {
        read_optional(self.store(), TxId::NONE, &self.toolstack.paths(id).node(name)).expect("read")
    }

    /// The backend's state node, parsed.
    pub fn state(&self, id: VbdId) -> Option<XenbusState> {
        self.backend_node(id, "state").and_then(|v| XenbusState::parse(&v).ok())
    }

    /// Wait for the backend state of `id` to be `state`.
    pub fn wait_state(&self, id: VbdId, state: XenbusState) {
        self.toolstack.wait_backend_state(id, T, |s| s == state).unwrap_or_else(|e| panic!("{id}: {e}"));
    }

    /// Wait until the vbd is failed: the `error` node exists and the state is Closing. Returns the error text.
    pub fn wait_fatal(&self, id: VbdId) -> String {
        self.wait_state(id, XenbusState::Closing);
        self.toolstack.error(id).expect("read error").unwrap_or_else(|| panic!("{id}: Closing without an error node"))
    }

    /// Stop the backend thread now (graceful shutdown).
    pub fn stop_backend(&mut self) {
        if let Some(b) = self.backend.take() {
            b.stop().expect("backend loop ended cleanly");
        }
    }
}

impl Drop for XenBed {
    fn drop(&mut self) {
        self.backend.take();
    }
}
