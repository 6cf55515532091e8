// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Probing one vbd: the first look at a backend directory in Initialising (or, when taking over from a previous
//! backend, in whatever state it left), the feature nodes published before InitWait.

use super::*;

impl VbdBackend {
    pub(super) fn probe(&mut self, store_state: Option<XenbusState>) -> Result<bool, XenError> {
        // `Some(previous)`: taking over from a previous backend that left the vbd in `previous`.
        let previous = match store_state {
            Some(XenbusState::Initialising) => None,
            Some(
                s @ (XenbusState::InitWait
                | XenbusState::Initialised
                | XenbusState::Connected
                | XenbusState::Closing
                | XenbusState::Closed),
            ) if self.adopt => Some(s),
            _ => return Ok(false),
        };
        let store = &*self.store;
        let fe_path = read_optional(store, TxId::NONE, &self.paths.node("frontend"))?;
        let fe_id = read_optional(store, TxId::NONE, &self.paths.node("frontend-id"))?;
        let (Some(fe_path), Some(fe_id)) = (fe_path, fe_id) else { return Ok(false) };
        // From here on a store error leaves the vbd unprobed (the next event retries); a bad node fails it.
        let frontend = nodes::parse_xenstore_path("frontend", &fe_path)
            .and_then(|path| Ok(Frontend { path, domid: nodes::parse_domid("frontend-id", &fe_id)? }));
        let frontend = match frontend {
            Ok(f) if f.domid == self.id.domid => f,
            Ok(f) => {
                let msg = format!("frontend-id {} does not match the vbd's domain {}", f.domid, self.id.domid);
                self.phase = Phase::Active;
                self.fatal(Fatal::new(libc::EINVAL, msg));
                return Ok(false);
            }
            Err(e) => {
                self.phase = Phase::Active;
                self.fatal(Fatal::new(e.errno(), format!("reading other end details: {e}")));
                return Ok(false);
            }
        };

        // Whether the previous backend process held the device: `opened` is reset to 0 below (this process holds
        // nothing yet) and set to 1 again once it has opened the device itself.
        if previous.is_some() {
            let opened = read_optional(store, TxId::NONE, &self.paths.node("opened"))?;
            self.held_before = opened.as_deref() == Some(b"1".as_slice());
        }
        let c = &*self.config;
        let flag = |b: bool| if b { "1" } else { "0" };
        let mut probe_nodes: Vec<(&str, String)> = vec![
            // The seed: "opened" = "0" tells userspace diskseq is supported and that "1" will follow the open.
            ("opened", "0".into()),
            ("multi-queue-max-queues", c.max_queues.to_string()),
            ("max-ring-page-order", c.max_ring_page_order.to_string()),
            ("feature-persistent", flag(c.persistent_grants).into()),
            ("feature-flush-cache", "1".into()),
            ("feature-barrier", "1".into()),
        ];
        if c.max_indirect_segments > 0 {
            probe_nodes.push(("feature-max-indirect-segments", c.max_indirect_segments.to_string()));
        }
        self.write_nodes(&probe_nodes)?;
        let token = frontend_token(self.id);
        let fe_state = format!("{}/state", frontend.path);
        self.store.watch(&fe_state, &token)?;
        self.watching = Some(fe_state);
        self.frontend = Some(frontend);
        self.phase = Phase::Active;
        match previous {
            None => self.switch_state(XenbusState::InitWait)?,
            Some(previous) => self.take_over(previous)?,
        }
        tracing::info!(vbd = %self.id, frontend = %self.frontend.as_ref().map_or("", |f| &f.path), "probed");
        Ok(true)
    }

    /// Continue from the state `previous` a previous backend left the vbd in (see [`adopt`](Self::adopt)); the
    /// frontend's state is then handled by [`check_frontend`](Self::check_frontend) as usual.
    pub(super) fn take_over(&mut self, previous: XenbusState) -> Result<(), XenError> {
        let fe_state = self.frontend_state()?;
        tracing::info!(vbd = %self.id, previous = %previous, frontend = %fe_state, "taking over from a previous backend");
        match (previous, fe_state) {
            (_, XenbusState::Initialising) | (XenbusState::InitWait, _) => self.switch_state(XenbusState::InitWait),
            (XenbusState::Closed, _) => {
                self.state = XenbusState::Closed;
                let online = read_optional(&*self.store, TxId::NONE, &self.paths.node("online"))?;
                if !nodes::parse_online(online.as_deref()) {
                    // Detached (online = 0): nothing to open, only the toolstack's removal to wait for.
                    tracing::info!(vbd = %self.id, "closed and offline: nothing to take over");
                    self.release();
                    self.phase = Phase::Done;
                }
                Ok(())
            }
            (_, XenbusState::Initialised | XenbusState::Connected) => {
                tracing::warn!(
                    vbd = %self.id,
                    "the frontend still uses the rings of a backend that is gone: asking it to close and start over"
                );
                // Requests the previous backend left unanswered are answered by `blkbackd xen --cleanup` only.
                self.state = previous;
                self.switch_state(XenbusState::Closing)
            }
            _ => {
                self.state = previous;
                Ok(())
            }
        }
    }
}

impl VbdBackend {
    /// The open of a device the previous backend process held failed: say why that happens and what to do.
    ///
    /// A delete-on-close disk (a loop device the hotplug script set to clear itself on last close, as
    /// `block-blkbackd` does) goes away with the last process holding it, so when a backend process dies, its
    /// successor finds the device gone, or its number reused for another file: the diskseq pin then refuses it
    /// (ENODEV), so another file is never served. The vbd stays as the previous backend left it (the supervisor
    /// has closed a connected one), with `opened` = 0 (no process holds the device) and this reason in its `error`
    /// node. Detaching the disk (`xl block-detach`: the script's `remove` finds no loop device of this vbd and
    /// exits 0) and attaching it again serves the image anew.
    pub(super) fn explain_lost_device(&self, mut fatal: Fatal) -> Fatal {
        if self.held_before && matches!(fatal.errno, libc::ENODEV | libc::ENOENT | libc::ENXIO) {
            fatal.message.push_str(
                ": the device the previous backend process held is gone (a delete-on-close loop device goes away \
                 with the last process holding it); detach the disk and attach it again",
            );
        }
        fatal
    }
}
