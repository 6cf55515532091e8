// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The ring half of the supervisor path: answering what a dead backend left behind.
//!
//! When a backend process dies, the requests it had taken from the ring (and those the frontend queued after) are
//! never answered, and Linux blkfront has no request timeout: the guest's I/O waits forever, even after the vbd
//! goes Closed (blkfront then stops queueing new requests, but keeps waiting for those on the ring).
//! [`fail_unanswered`] maps the rings again, answers every request between the last *published* response and the
//! request producer with `BLKIF_RSP_ERROR`, and notifies the frontend, so those requests fail with an I/O error.
//!
//! Only for a backend that is gone: answering a ring that a live backend still serves would corrupt it.

use std::time::{Duration, Instant};

use crate::blkif::{BlkifLayout, X86_32, X86_64};
use crate::connect::{BlkifAbi, ConnectConfig, QueueRing};
use crate::dataplane::mapped_ring::MappedRing;
use crate::dataplane::DataplaneError;
use crate::services::{DomId, EventChannel, EventChannelOpener, GrantTable, MapAccess};

/// How often the rings are looked at again while `settle` lasts.
const RECHECK: Duration = Duration::from_millis(50);

/// Answer every unanswered request on `config`'s rings with `BLKIF_RSP_ERROR` and notify the frontend. The rings
/// are watched for `settle` more (a frontend that had not yet seen the vbd close may still queue requests), and
/// everything that arrives meanwhile is answered too. Returns how many requests were answered.
///
/// A queue whose ring cannot be mapped or whose port cannot be bound (the frontend is gone) is skipped and
/// reported after the others were handled.
pub fn fail_unanswered<G: GrantTable, O: EventChannelOpener>(
    grants: &G,
    evtchn: &O,
    config: &ConnectConfig,
    settle: Duration,
) -> Result<usize, DataplaneError> {
    let deadline = Instant::now() + settle;
    let mut answered = 0;
    let mut first_error = None;
    for (index, ring) in config.queues.iter().enumerate() {
        let result = match config.abi {
            BlkifAbi::X86_64 => {
                fail_queue::<X86_64, G, O>(grants, evtchn, config.frontend_domid, index, ring, deadline)
            }
            BlkifAbi::X86_32 => {
                fail_queue::<X86_32, G, O>(grants, evtchn, config.frontend_domid, index, ring, deadline)
            }
        };
        match result {
            Ok(n) => answered += n,
            Err(e) => {
                tracing::warn!(queue = index, error = %e, "cannot answer the requests left on the ring");
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) if answered == 0 => Err(e),
        _ => Ok(answered),
    }
}

fn fail_queue<L: BlkifLayout, G: GrantTable, O: EventChannelOpener>(
    grants: &G,
    evtchn: &O,
    domid: DomId,
    index: usize,
    ring: &QueueRing,
    deadline: Instant,
) -> Result<usize, DataplaneError> {
    let pages = ring.ring_refs.len();
    let mapping = grants
        .map(domid, &ring.ring_refs, MapAccess::ReadWrite)
        .map_err(|source| DataplaneError::MapRing { queue: index, pages, cause: source })?;
    let mut back = MappedRing::<L, G::Mapping>::resume(mapping)
        .map_err(|source| DataplaneError::Ring { queue: index, cause: source })?;
    let evtchn_err = |source| DataplaneError::Evtchn { queue: index, remote_port: ring.remote_port, cause: source };
    let mut channel = evtchn.open().map_err(evtchn_err)?;
    let port = channel.bind_interdomain(domid, ring.remote_port).map_err(evtchn_err)?;
    let mut answered = 0;
    let mut first = true;
    let result = loop {
        let avail = match back.fail_unconsumed() {
            Ok(n) => n as usize,
            Err(source) => break Err(DataplaneError::Ring { queue: index, cause: source }),
        };
        answered += avail;
        if avail > 0 || std::mem::take(&mut first) {
            back.push_responses();
            // Always, and once even with nothing to answer: whatever event index the frontend left, it must look
            // at the ring now (a closing Linux blkfront restarts the queues it stopped only on an event, and the
            // requests held there are dispatched only then: see `xenbus::backend::closing`).
            if let Err(e) = channel.notify(port) {
                tracing::warn!(queue = index, error = %e, "evtchn notify failed");
            }
        }
        if Instant::now() >= deadline {
            break Ok(answered);
        }
        std::thread::sleep(RECHECK.min(deadline.saturating_duration_since(Instant::now())));
    };
    if let Err(e) = channel.unbind(port) {
        tracing::debug!(queue = index, error = %e, "evtchn unbind");
    }
    if answered > 0 {
        tracing::info!(queue = index, answered, "answered the requests a dead backend left with an I/O error");
    }
    result
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::blkif::{BlkifResponse, RawRequest, OP_INDIRECT, OP_READ, OP_WRITE, RSP_ERROR};
    use crate::emulated::{EmulatedHost, RingFrontend};

    fn request<L: BlkifLayout>(op: u8, id: u64) -> RawRequest {
        let mut raw = RawRequest::default();
        raw.put(0, &[op, 1]);
        raw.put(L::REQ_ID, &id.to_le_bytes());
        raw
    }

    /// A backend that takes every request on `fe`'s ring, answers those whose id `answer` picks (OK), pushes if
    /// `push`, and dies.
    fn dead_backend<L: BlkifLayout>(host: &EmulatedHost, fe: &RingFrontend<L>, answer: fn(u64) -> bool, push: bool) {
        let queue = fe.queue_ring();
        let grants = host.grant_table(0);
        let m = grants.map(5, &queue.ring_refs, MapAccess::ReadWrite).expect("map");
        let mut dead = MappedRing::<L, _>::attach(m).expect("ring");
        dead.unconsumed().expect("requests");
        let mut raw = RawRequest::default();
        while dead.next_request(&mut raw) {
            if answer(raw.id::<L>()) {
                dead.put_response(&BlkifResponse { id: raw.id::<L>(), operation: raw.operation(), status: 0 });
            }
        }
        if push {
            dead.push_responses();
        }
    }

    /// The connection of guest 5 with `fe`'s one ring.
    fn one_queue<L: BlkifLayout>(fe: &RingFrontend<L>, abi: BlkifAbi) -> ConnectConfig {
        ConnectConfig {
            frontend_domid: 5,
            abi,
            queues: vec![fe.queue_ring()],
            persistent_grants: false,
            max_indirect_segments: 0,
        }
    }

    fn answers_everything_left<L: BlkifLayout>(abi: BlkifAbi) {
        let host = EmulatedHost::new().expect("host");
        let guest = Arc::new(host.add_guest(5, 64).expect("guest"));
        let mut fe = RingFrontend::<L>::new(guest, 0, 0).expect("ring");
        // A dead backend answered the first two requests; the next three are left.
        let first: Vec<RawRequest> = (0..2).map(|i| request::<L>(OP_READ, 100 + i)).collect();
        assert_eq!(fe.submit(&first).expect("submit"), 2);
        // It answered both and pushed.
        dead_backend::<L>(&host, &fe, |_| true, true);
        assert_eq!(fe.wait_responses(2, Duration::from_secs(5)).expect("first answers").len(), 2);
        // The last one indirect: answered with its indirect operation, as blkfront checks (a write here).
        let left: Vec<RawRequest> =
            (0..3).map(|i| request::<L>(if i == 2 { OP_INDIRECT } else { OP_WRITE }, 7 + i)).collect();
        assert_eq!(fe.submit(&left).expect("submit"), 3);
        let config = one_queue(&fe, abi);
        let answered =
            fail_unanswered(&host.grant_table(0), &host.evtchn_opener(0), &config, Duration::ZERO).expect("answered");
        assert_eq!(answered, 3);
        let responses = fe.wait_responses(3, Duration::from_secs(5)).expect("error answers");
        let got: Vec<(u64, u8, i16)> = responses.iter().map(|r| (r.id, r.operation, r.status)).collect();
        assert_eq!(got, vec![(7, OP_WRITE, RSP_ERROR), (8, OP_WRITE, RSP_ERROR), (9, OP_WRITE, RSP_ERROR)]);
        assert_eq!(host.live_mappings(), 0, "the ring is unmapped again");
    }

    #[test]
    fn every_unanswered_request_gets_an_error_x86_64() {
        answers_everything_left::<X86_64>(BlkifAbi::X86_64);
    }

    #[test]
    fn every_unanswered_request_gets_an_error_x86_32() {
        answers_everything_left::<X86_32>(BlkifAbi::X86_32);
    }

    /// A backend killed in the middle of a batch (responses written, no event sent yet): what it answered keeps
    /// its answer, and only the requests it never answered are failed, with their own ids and operations.
    #[test]
    fn a_backend_killed_mid_batch_leaves_its_answers_and_only_the_rest_fails() {
        let host = EmulatedHost::new().expect("host");
        let guest = Arc::new(host.add_guest(5, 64).expect("guest"));
        let mut fe = RingFrontend::<X86_64>::new(guest, 0, 0).expect("ring");
        let batch: Vec<RawRequest> = (0..4).map(|i| request::<X86_64>(OP_READ + (i % 2) as u8, 20 + i)).collect();
        assert_eq!(fe.submit(&batch).expect("submit"), 4);
        // It took all four, answered the first two, then died before pushing (no event, no push_responses).
        dead_backend::<X86_64>(&host, &fe, |id| id < 22, false);
        let config = one_queue(&fe, BlkifAbi::X86_64);
        let answered =
            fail_unanswered(&host.grant_table(0), &host.evtchn_opener(0), &config, Duration::ZERO).expect("answered");
        assert_eq!(answered, 2, "only the two it never answered");
        let responses = fe.wait_responses(4, Duration::from_secs(5)).expect("four answers");
        let got: Vec<(u64, u8, i16)> = responses.iter().map(|r| (r.id, r.operation, r.status)).collect();
        let expected = vec![(20, OP_READ, 0), (21, OP_WRITE, 0), (22, OP_READ, RSP_ERROR), (23, OP_WRITE, RSP_ERROR)];
        assert_eq!(got, expected, "each answer carries its own request's id and operation");
    }

    /// Nothing left to answer: the frontend still gets an event (requests it held back are dispatched only then).
    #[test]
    fn the_frontend_is_notified_even_with_nothing_left() {
        let host = EmulatedHost::new().expect("host");
        let guest = Arc::new(host.add_guest(5, 64).expect("guest"));
        let mut fe = RingFrontend::<X86_64>::new(guest, 0, 0).expect("ring");
        assert_eq!(fe.submit(&[request::<X86_64>(OP_READ, 1)]).expect("submit"), 1);
        // It answered and published, and died before its event.
        dead_backend::<X86_64>(&host, &fe, |_| true, true);
        while fe.wait_event(Duration::from_millis(20)) {}
        let config = one_queue(&fe, BlkifAbi::X86_64);
        let answered =
            fail_unanswered(&host.grant_table(0), &host.evtchn_opener(0), &config, Duration::ZERO).expect("answered");
        assert_eq!(answered, 0);
        assert!(fe.wait_event(Duration::from_secs(5)), "no event");
        assert_eq!(fe.wait_responses(1, Duration::ZERO).expect("the answer it left").len(), 1);
    }

    #[test]
    fn a_producer_beyond_the_ring_is_refused() {
        let host = EmulatedHost::new().expect("host");
        let guest = Arc::new(host.add_guest(5, 64).expect("guest"));
        let mut fe = RingFrontend::<X86_64>::new(guest, 0, 0).expect("ring");
        fe.ring().set_req_prod_raw(1000);
        let config = one_queue(&fe, BlkifAbi::X86_64);
        let result = fail_unanswered(&host.grant_table(0), &host.evtchn_opener(0), &config, Duration::ZERO);
        assert!(matches!(result, Err(DataplaneError::Ring { .. })), "{result:?}");
        assert_eq!(host.live_mappings(), 0);
    }
}
