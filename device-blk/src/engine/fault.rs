// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fault injection: an [`IoEngine`] wrapper that fails chosen operations with a chosen errno, for tests that
//! prove disk errors reach the guest as I/O errors (and never as success) on every transport.
//!
//! A [`FaultPlan`] is a shared, thread-safe list of [`FaultRule`]s; the test keeps one handle and gives clones
//! to the [`FaultyEngine`]s it wraps around real engines (one per queue), so it can add or remove rules while
//! the queues run, and count what was injected. Each rule picks operations by kind, by byte range, every Nth
//! match, and a number of times (or always), and fails them at one of two points:
//! - [`FaultPoint::Refuse`]: the operation never reaches the disk and completes at once with the errno;
//! - [`FaultPoint::Complete`]: the operation is carried out by the wrapped engine, and its completion reports the
//!   errno instead of its result (a device that fails a request after touching the medium).
//!
//! Injected completions travel the same path as real ones: they come out of [`reap`](IoEngine::reap) and
//! [`reap_ready`](IoEngine::reap_ready), count in [`has_completions`](IoEngine::has_completions) and
//! [`in_flight`](IoEngine::in_flight), and [`submit`](IoEngine::submit) signals the wrapped engine's completion
//! eventfd for them, so an event loop sleeping on [`completion_fd`](IoEngine::completion_fd) wakes up.
//!
//! ```
//! # use std::sync::Arc;
//! # use device_blk::{Disk, DiskOptions, EngineKind};
//! use device_blk::engine::fault::{FaultPlan, FaultRule, OpKind};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let path = dir.path().join("disk.img");
//! # std::fs::write(&path, vec![0u8; 1 << 20])?;
//! # let disk = Arc::new(Disk::open(&path, &DiskOptions::default())?);
//! let plan = FaultPlan::new();
//! // Every third write into the first MiB fails with EIO, twice; then writes succeed again.
//! let rule = plan.add(FaultRule::new(libc::EIO).on(OpKind::Write).range(0..1 << 20).every(3).times(2));
//! let engine = plan.wrap(EngineKind::Auto.build(disk, 32)?);
//! # drop(engine);
//! assert_eq!(plan.injected(rule), 0);
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::ops::Range;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::{Completion, EngineError, IoEngine, IoOp};

/// The kind of an [`IoOp`], for matching.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// [`IoOp::Read`].
    Read,
    /// [`IoOp::Write`].
    Write,
    /// [`IoOp::Flush`].
    Flush,
    /// [`IoOp::Discard`] (plain or secure).
    Discard,
    /// [`IoOp::WriteZeroes`] (with or without unmap).
    WriteZeroes,
}

impl OpKind {
    /// The kind of `op`.
    pub fn of(op: &IoOp<'_>) -> OpKind {
        match op {
            IoOp::Read { .. } => OpKind::Read,
            IoOp::Write { .. } => OpKind::Write,
            IoOp::Flush => OpKind::Flush,
            IoOp::Discard { .. } => OpKind::Discard,
            IoOp::WriteZeroes { .. } => OpKind::WriteZeroes,
        }
    }

    fn bit(self) -> u8 {
        match self {
            OpKind::Read => 1,
            OpKind::Write => 2,
            OpKind::Flush => 4,
            OpKind::Discard => 8,
            OpKind::WriteZeroes => 16,
        }
    }
}

/// The bytes of the disk `op` touches (`None` for a flush, which has no range).
fn extent(op: &IoOp<'_>) -> Option<Range<u64>> {
    let (offset, len) = match *op {
        IoOp::Read { offset, iovecs } | IoOp::Write { offset, iovecs } => {
            (offset, iovecs.iter().map(|v| v.iov_len as u64).fold(0u64, u64::saturating_add))
        }
        IoOp::Discard { offset, len, .. } | IoOp::WriteZeroes { offset, len, .. } => (offset, len),
        IoOp::Flush => return None,
    };
    Some(offset..offset.saturating_add(len))
}

/// Where an injected failure happens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FaultPoint {
    /// The operation never reaches the disk: it completes at once with the errno (a device that rejects it).
    #[default]
    Refuse,
    /// The wrapped engine carries the operation out, and its completion reports the errno instead of the result
    /// (a device that fails a request after touching the medium: a failed write may have changed the disk).
    Complete,
}

/// Which operations fail, how often, and how.
///
/// A new rule matches every operation and fails every match; the builder methods narrow it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultRule {
    errno: i32,
    kinds: u8,
    range: Option<Range<u64>>,
    every: u64,
    times: Option<u64>,
    point: FaultPoint,
}

impl FaultRule {
    /// A rule failing every operation with `errno` (a positive errno, e.g. `libc::EIO`), at
    /// [`FaultPoint::Refuse`].
    pub fn new(errno: i32) -> Self {
        FaultRule { errno, kinds: 0, range: None, every: 1, times: None, point: FaultPoint::Refuse }
    }

    /// Match operations of `kind` (call again to add more kinds; without a call, every kind matches).
    #[must_use]
    pub fn on(mut self, kind: OpKind) -> Self {
        self.kinds |= kind.bit();
        self
    }

    /// Match only operations whose bytes overlap `bytes` (flushes, having no range, then never match).
    #[must_use]
    pub fn range(mut self, bytes: Range<u64>) -> Self {
        self.range = Some(bytes);
        self
    }

    /// Fail only every `n`th matching operation: the `n`th, `2n`th, ... (0 counts as 1).
    #[must_use]
    pub fn every(mut self, n: u64) -> Self {
        self.every = n.max(1);
        self
    }

    /// Fail at most `n` times, then let operations through.
    #[must_use]
    pub fn times(mut self, n: u64) -> Self {
        self.times = Some(n);
        self
    }

    /// Fail once.
    #[must_use]
    pub fn once(self) -> Self {
        self.times(1)
    }

    /// Fail every time it fires (the default).
    #[must_use]
    pub fn always(mut self) -> Self {
        self.times = None;
        self
    }

    /// Fail at `point`.
    #[must_use]
    pub fn at(mut self, point: FaultPoint) -> Self {
        self.point = point;
        self
    }

    fn matches(&self, kind: OpKind, extent: Option<&Range<u64>>) -> bool {
        if self.kinds != 0 && self.kinds & kind.bit() == 0 {
            return false;
        }
        match (&self.range, extent) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(r), Some(e)) => e.start < r.end && r.start < e.end,
        }
    }
}

/// Identifies a rule of a [`FaultPlan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleId(u64);

/// A failure to inject into one operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The errno the operation completes with.
    pub errno: i32,
    /// Where it fails.
    pub point: FaultPoint,
}

#[derive(Debug)]
struct Entry {
    id: RuleId,
    rule: FaultRule,
    matched: u64,
    injected: u64,
}

#[derive(Debug, Default)]
struct Rules {
    entries: Vec<Entry>,
    next_id: u64,
    injected: u64,
}

/// A shared, thread-safe set of fault rules. Clones share the rules and the counters.
///
/// For each operation, every rule whose filter (kind, range) matches counts it; the first rule, in the order
/// added, whose count is a multiple of its `every` and which has injections left, fails it.
#[derive(Clone, Debug, Default)]
pub struct FaultPlan(Arc<Mutex<Rules>>);

impl FaultPlan {
    /// A plan without rules (nothing fails).
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Rules> {
        // The rules stay consistent even if a holder panicked: every update is a single assignment.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Add `rule` after the existing ones.
    pub fn add(&self, rule: FaultRule) -> RuleId {
        let mut rules = self.lock();
        let id = RuleId(rules.next_id);
        rules.next_id += 1;
        rules.entries.push(Entry { id, rule, matched: 0, injected: 0 });
        id
    }

    /// Remove a rule; whether it was there.
    pub fn remove(&self, id: RuleId) -> bool {
        let mut rules = self.lock();
        let before = rules.entries.len();
        rules.entries.retain(|e| e.id != id);
        rules.entries.len() != before
    }

    /// Remove every rule (the counters of injections so far stay).
    pub fn clear(&self) {
        self.lock().entries.clear();
    }

    /// Operations rule `id` matched so far (0 for a removed rule).
    pub fn matched(&self, id: RuleId) -> u64 {
        self.lock().entries.iter().find(|e| e.id == id).map_or(0, |e| e.matched)
    }

    /// Failures rule `id` injected so far (0 for a removed rule).
    pub fn injected(&self, id: RuleId) -> u64 {
        self.lock().entries.iter().find(|e| e.id == id).map_or(0, |e| e.injected)
    }

    /// Failures injected by every rule, including removed ones.
    pub fn total_injected(&self) -> u64 {
        self.lock().injected
    }

    /// Decide the fate of `op`, counting it.
    pub fn decide(&self, op: &IoOp<'_>) -> Option<Fault> {
        let kind = OpKind::of(op);
        let extent = extent(op);
        let mut rules = self.lock();
        let mut fault = None;
        for entry in &mut rules.entries {
            if !entry.rule.matches(kind, extent.as_ref()) {
                continue;
            }
            entry.matched += 1;
            let left = entry.rule.times.is_none_or(|n| entry.injected < n);
            if fault.is_none() && left && entry.matched % entry.rule.every == 0 {
                entry.injected += 1;
                fault = Some(Fault { errno: entry.rule.errno, point: entry.rule.point });
            }
        }
        if fault.is_some() {
            rules.injected += 1;
        }
        fault
    }

    /// Wrap `inner` in a [`FaultyEngine`] following this plan.
    pub fn wrap(&self, inner: Box<dyn IoEngine>) -> Box<dyn IoEngine> {
        Box::new(FaultyEngine::new(inner, self.clone()))
    }

    /// An [`EngineWrapper`](super::EngineWrapper) that wraps every engine a transport builds in this plan
    /// (`DataplaneOptions::engine_wrapper`, `VhostUserBlkOptions::engine_wrapper`).
    pub fn wrapper(&self) -> super::EngineWrapper {
        let plan = self.clone();
        super::EngineWrapper::new(move |engine| plan.wrap(engine))
    }
}

/// An [`IoEngine`] that passes operations to a wrapped engine, except those its [`FaultPlan`] fails.
///
/// Allocation-free after construction, like the engines it wraps (the plan's lock aside).
pub struct FaultyEngine {
    inner: Box<dyn IoEngine>,
    plan: FaultPlan,
    /// Operations refused at enqueue, waiting to be reaped.
    refused: VecDeque<Completion>,
    /// Tokens of operations in the wrapped engine whose completion reports an errno.
    poisoned: Vec<(u64, i32)>,
}

impl std::fmt::Debug for FaultyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyEngine")
            .field("inner", &self.inner.name())
            .field("refused", &self.refused.len())
            .field("poisoned", &self.poisoned.len())
            .finish()
    }
}

impl FaultyEngine {
    /// Wrap `inner`, failing what `plan` says.
    ///
    /// Tokens of operations in flight must be distinct (as [`BlockQueue`](crate::BlockQueue)'s are): a
    /// [`FaultPoint::Complete`] failure is attached to the token.
    pub fn new(inner: Box<dyn IoEngine>, plan: FaultPlan) -> Self {
        let capacity = inner.capacity();
        FaultyEngine { inner, plan, refused: VecDeque::with_capacity(capacity), poisoned: Vec::with_capacity(capacity) }
    }

    /// The plan this engine follows.
    pub fn plan(&self) -> &FaultPlan {
        &self.plan
    }

    /// Make the completion eventfd readable: refused operations wait to be reaped.
    fn signal(&self) -> Result<(), EngineError> {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes from a live buffer to the wrapped engine's eventfd, which it keeps open.
        let n = unsafe { libc::write(self.inner.completion_fd(), one.as_ptr().cast(), one.len()) };
        if n < 0 {
            let source = std::io::Error::last_os_error();
            // A counter at its maximum is readable anyway.
            if source.raw_os_error() != Some(libc::EAGAIN) {
                return Err(EngineError::Io { what: "eventfd write", cause: source });
            }
        }
        Ok(())
    }

    /// Hand `c` on, with its result replaced if its operation was poisoned.
    fn deliver(poisoned: &mut Vec<(u64, i32)>, c: Completion, on_complete: &mut dyn FnMut(Completion)) {
        match poisoned.iter().position(|&(token, _)| token == c.token) {
            Some(i) => {
                let (_, errno) = poisoned.swap_remove(i);
                on_complete(Completion { token: c.token, result: Err(errno) });
            }
            None => on_complete(c),
        }
    }

    fn reap_with(&mut self, clear: bool, on_complete: &mut dyn FnMut(Completion)) {
        let poisoned = &mut self.poisoned;
        let mut pass = |c: Completion| Self::deliver(poisoned, c, on_complete);
        if clear {
            self.inner.reap(&mut pass);
        } else {
            self.inner.reap_ready(&mut pass);
        }
        while let Some(c) = self.refused.pop_front() {
            on_complete(c);
        }
    }
}

impl IoEngine for FaultyEngine {
    unsafe fn enqueue(&mut self, op: IoOp<'_>, token: u64) -> Result<(), EngineError> {
        if self.in_flight() >= self.capacity() {
            return Err(EngineError::Full(self.capacity()));
        }
        match self.plan.decide(&op) {
            Some(Fault { errno, point: FaultPoint::Refuse }) => {
                self.refused.push_back(Completion { token, result: Err(errno) });
                Ok(())
            }
            Some(Fault { errno, point: FaultPoint::Complete }) => {
                // SAFETY: the caller's guarantees for `op` are passed on unchanged.
                unsafe { self.inner.enqueue(op, token) }?;
                self.poisoned.push((token, errno));
                Ok(())
            }
            // SAFETY: as above.
            None => unsafe { self.inner.enqueue(op, token) },
        }
    }

    fn submit(&mut self) -> Result<(), EngineError> {
        self.inner.submit()?;
        if !self.refused.is_empty() {
            self.signal()?;
        }
        Ok(())
    }

    fn reap(&mut self, on_complete: &mut dyn FnMut(Completion)) {
        self.reap_with(true, on_complete);
    }

    fn reap_ready(&mut self, on_complete: &mut dyn FnMut(Completion)) {
        self.reap_with(false, on_complete);
    }

    fn has_completions(&mut self) -> bool {
        !self.refused.is_empty() || self.inner.has_completions()
    }

    fn clear_completion_signal(&mut self) {
        self.inner.clear_completion_signal();
    }

    fn completion_fd(&self) -> RawFd {
        self.inner.completion_fd()
    }

    fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.refused.len()
    }

    fn buffer_alignment(&self) -> usize {
        self.inner.buffer_alignment()
    }

    fn name(&self) -> &'static str {
        "faulty"
    }

    fn ring_restricted(&self) -> Option<bool> {
        self.inner.ring_restricted()
    }

    unsafe fn register_buffer(&mut self, base: *mut u8, len: usize) -> bool {
        // SAFETY: forwarded contract.
        unsafe { self.inner.register_buffer(base, len) }
    }
}

#[cfg(test)]
#[path = "fault_tests.rs"]
mod tests;
