// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! How one vbd's backend writes into its store directory: the state, its nodes and the error node, each in one
//! transaction that first checks the directory is still the one we probed (not removed, not re-created).

use super::{VbdBackend, MAX_ERROR_MESSAGE, TX_ATTEMPTS};
use crate::services::{read_optional, with_transaction, TxId, XenError};
use crate::xenbus::device::Fatal;
use crate::xenbus::state::XenbusState;

/// What the store's backend `state` says about the directory we are about to write into.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Directory {
    Ours,
    Recreated,
}

impl VbdBackend {
    /// `xenbus_dev_fatal`: the error node, then Closing.
    pub(super) fn fatal(&mut self, mut fatal: Fatal) {
        if fatal.message.len() > MAX_ERROR_MESSAGE {
            let mut end = MAX_ERROR_MESSAGE;
            while !fatal.message.is_char_boundary(end) {
                end -= 1;
            }
            fatal.message.truncate(end);
        }
        tracing::error!(vbd = %self.id, errno = fatal.errno, "{}", fatal.message);
        let value = format!("{} {}", fatal.errno, fatal.message);
        if let Err(e) = self.store.write(TxId::NONE, &self.paths.error, value.as_bytes()) {
            tracing::warn!(vbd = %self.id, error = %e, "cannot write the error node");
        }
        self.error = Some(fatal);
        if self.state < XenbusState::Closing {
            if let Err(e) = self.switch_state(XenbusState::Closing) {
                tracing::warn!(vbd = %self.id, error = %e, "cannot switch to Closing");
            }
        }
    }

    /// `xenbus_switch_state`: write `state` unless the directory is gone (never re-create a removed device),
    /// and never write over a close the toolstack asked for (its Closing) with an earlier state.
    pub(super) fn switch_state(&mut self, new: XenbusState) -> Result<(), XenError> {
        #[derive(PartialEq)]
        enum Outcome {
            Written,
            Removed,
            Recreated,
            CloseRequested,
        }
        let path = self.paths.node("state");
        let store = &*self.store;
        let ours = self.state;
        let outcome = with_transaction(store, TX_ATTEMPTS, |tx| {
            let Some(current) = read_optional(store, tx, &path)? else { return Ok(Outcome::Removed) };
            let current = XenbusState::parse(&current).ok();
            if self.directory(current) == Directory::Recreated {
                return Ok(Outcome::Recreated);
            }
            let requested_close = current == Some(XenbusState::Closing) && ours < XenbusState::Closing;
            if requested_close && new < XenbusState::Closing {
                return Ok(Outcome::CloseRequested);
            }
            store.write(tx, &path, new.as_node().as_bytes())?;
            Ok(Outcome::Written)
        })?;
        match outcome {
            Outcome::Written => {
                tracing::debug!(vbd = %self.id, from = %self.state, to = %new, "state");
                self.state = new;
            }
            Outcome::CloseRequested => {
                tracing::info!(vbd = %self.id, "the toolstack asked the device to close");
                self.state = XenbusState::Closing;
            }
            Outcome::Removed => {}
            Outcome::Recreated => self.recreated = true,
        }
        Ok(())
    }

    /// What the store's backend `state` says about the directory we are about to act on. Once we wrote a state
    /// we never write Initialising again: reading it means the toolstack removed the directory and created it
    /// again before we saw the removal (watch events coalesce, and our reads are not one transaction). That is a
    /// new vbd (its feature nodes are gone, its `params` may name another disk): nothing of ours may be written
    /// into it, and the old vbd is forgotten before the new one is probed.
    pub(super) fn directory(&self, store_state: Option<XenbusState>) -> Directory {
        if store_state == Some(XenbusState::Initialising) && self.state != XenbusState::Unknown {
            Directory::Recreated
        } else {
            Directory::Ours
        }
    }

    /// Write backend nodes in one transaction, unless the directory is gone or was re-created.
    pub(super) fn write_nodes(&mut self, values: &[(&str, String)]) -> Result<(), XenError> {
        let store = &*self.store;
        let state = self.paths.node("state");
        let recreated = with_transaction(store, TX_ATTEMPTS, |tx| {
            let Some(current) = read_optional(store, tx, &state)? else { return Ok(false) };
            if self.directory(XenbusState::parse(&current).ok()) == Directory::Recreated {
                return Ok(true);
            }
            for (name, value) in values {
                store.write(tx, &self.paths.node(name), value.as_bytes())?;
            }
            Ok(false)
        })?;
        self.recreated |= recreated;
        Ok(())
    }
}
