// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The rings `blkif_dataplane` keeps served from one input to the next ("lanes").
//!
//! Starting and stopping a data plane per input (mapping and unmapping its ring, binding its port, building and
//! dropping its worker on the I/O thread) was half of the target's own work, and its code paths a large share of
//! the coverage features libFuzzer collects after every input. So a data plane is kept with its ring and serves
//! every later input of the same connection (`LaneKey`: ABI, ring page order, features, in-flight limit): an
//! input then only queues its requests on the ring where the last one stopped, notifies, and checks the answers.
//!
//! What a lane carries from one input to the next is its ring's position (the indexes go on, and wrap: inputs
//! that started at index 0 never did) and, with persistent grants, the grants its cache holds. Neither changes a
//! verdict (the model's statuses depend on neither; a persistent grant's outcome is already `None` where it could
//! differ), but either may change the code path a request takes. So that a failure that needs them still
//! reproduces, a lane serves at most [`LANE_LIFE`] inputs and lives at most `history::WINDOW` inputs of all
//! lanes, the inputs are recorded in order, and a failing input writes the last of them (every live lane's
//! included) to `artifacts/blkif_dataplane/lane-<pid>-<n>/` (see `history`): the replay example runs that
//! directory's files in order, as they ran. `BLKIF_DATAPLANE_FRESH=1` gives every input a new lane
//! (the behaviour before lanes).
//!
//! A lane ends (its data plane stopped, its slot free again) after an input that harmed its ring (a read into the
//! ring's pages, descriptors from a ring's page), forged the producer index, halted the ring, or read into the ring
//! pages of another lane (that lane ends too); after [`LANE_LIFE`] inputs, when the next input of its key comes
//! (which gets a new lane); when it started `history::WINDOW` inputs (of all lanes) ago; and, least recently used
//! first, when a new connection needs its slot.

use std::any::Any;
use std::time::Duration;

use transport_xen::blkif::{BlkifLayout, BlkifResponse, FrontRing};
use transport_xen::dataplane::Dataplane;
use transport_xen::emulated::evtchn::EmulatedEventChannel;
use transport_xen::emulated::GuestDomain;
use transport_xen::services::{EventChannel, EvtchnPort, GrantRef, XEN_PAGE_SIZE};
use vm_memory::Bytes;

use super::{history, Fixture};

/// Ring slots, so at most this many lanes at once.
pub(super) const SLOTS: usize = 8;
// (The slot sets are `u32` bit masks.)
const _: () = assert!(SLOTS <= 32);
/// Pages per slot: room for a ring of page order 2.
pub(super) const SLOT_PAGES: usize = 4;
/// Inputs a lane serves before it ends: bounds the history a failure may depend on.
pub(super) const LANE_LIFE: usize = 32;

/// Ring pages and a guest port set aside for one lane at a time.
pub(super) struct RingSlot {
    /// The first of its [`SLOT_PAGES`] consecutive guest pages.
    pub first: usize,
    /// Their grant refs (granted writable to dom0).
    pub grefs: Vec<GrantRef>,
    /// The frontend's port offered to dom0 (unbound again when a data plane stops).
    pub port: EvtchnPort,
}

/// What a data plane is started with: an input of the same key is served by the same lane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LaneKey {
    /// The input's flags with its effective ring page order (ABI, order, features, read-only disk).
    pub flags: u8,
    pub in_flight: u32,
}

impl LaneKey {
    /// Pages of its ring.
    pub fn ring_pages(self) -> usize {
        1 << ((self.flags >> 1) & 3)
    }
}

/// The frontend's side of a lane's ring (on its slot's pages: it must not outlive the fixture).
pub(super) struct Front<L: BlkifLayout> {
    pub ring: FrontRing<L>,
}

/// A ring served by a data plane across inputs.
pub(super) struct Lane {
    pub key: LaneKey,
    pub slot: usize,
    /// The `Front<L>` of the key's ABI.
    front: Box<dyn Any>,
    /// Started after its first input queued its requests (a data plane's first turn finds them).
    pub dp: Option<Dataplane>,
    last_used: u64,
    /// Inputs served (their bytes are in `history`).
    served: usize,
    /// The count of all lanes' inputs when it started (see `Lanes::take_too_old`).
    born: u64,
}

impl Lane {
    /// The frontend ring (of the ABI its key names).
    pub fn front<L: BlkifLayout + 'static>(&mut self) -> &mut Front<L> {
        self.split::<L>().0
    }

    /// The frontend ring and the data plane, apart.
    pub fn split<L: BlkifLayout + 'static>(&mut self) -> (&mut Front<L>, &mut Option<Dataplane>) {
        (self.front.downcast_mut::<Front<L>>().expect("a lane's ring has the ABI of its key"), &mut self.dp)
    }

    /// The inputs it served (the one running now included).
    pub fn served(&self) -> usize {
        self.served
    }

    /// Whether it may serve another input.
    pub fn has_life_left(&self) -> bool {
        self.served < LANE_LIFE
    }

    fn record(&mut self, data: &[u8]) {
        history::record(data);
        self.served += 1;
    }
}

/// The live lanes (but the one an input has taken out while it runs).
#[derive(Default)]
pub(super) struct Lanes {
    live: Vec<Lane>,
    clock: u64,
    /// Inputs so far, all lanes'.
    inputs: u64,
    /// `BLKIF_DATAPLANE_FRESH`: a new lane for every input.
    pub fresh: bool,
}

impl Lanes {
    pub fn new() -> Lanes {
        Lanes { fresh: std::env::var_os("BLKIF_DATAPLANE_FRESH").is_some_and(|v| v != "0"), ..Lanes::default() }
    }

    /// Take the lane of `key` out (the input gives it back with [`Lanes::keep`], or ends it).
    pub fn take(&mut self, key: LaneKey) -> Option<Lane> {
        let i = self.live.iter().position(|l| l.key == key)?;
        Some(self.live.swap_remove(i))
    }

    /// Give a lane back after its input.
    pub fn keep(&mut self, mut lane: Lane) {
        self.clock += 1;
        lane.last_used = self.clock;
        self.live.push(lane);
    }

    /// The lanes whose slot is in `slots` (a bit per slot), taken out one by one (to be ended).
    pub fn take_slot(&mut self, slots: u32) -> Option<Lane> {
        let i = self.live.iter().position(|l| slots & (1 << l.slot) != 0)?;
        Some(self.live.swap_remove(i))
    }

    /// A lane that started [`history::WINDOW`] or more inputs ago, taken out (to be ended): the inputs the
    /// history keeps must include every live lane's first.
    pub fn take_too_old(&mut self) -> Option<Lane> {
        let now = self.inputs;
        let i = self.live.iter().position(|l| now - l.born >= history::WINDOW)?;
        Some(self.live.swap_remove(i))
    }

    /// The live lanes.
    pub fn iter(&self) -> impl Iterator<Item = &Lane> {
        self.live.iter()
    }

    /// A slot no live lane holds (the least recently used lane is taken out to be ended if none is free).
    fn free_slot(&mut self) -> (usize, Option<Lane>) {
        let mut used = 0u32;
        for l in &self.live {
            used |= 1 << l.slot;
        }
        if let Some(slot) = (0..SLOTS).find(|&s| used & (1 << s) == 0) {
            return (slot, None);
        }
        let oldest = (0..self.live.len()).min_by_key(|&i| self.live[i].last_used).expect("every slot is held");
        let lane = self.live.swap_remove(oldest);
        (lane.slot, Some(lane))
    }
}

/// The lane for `key` with `data` recorded as its next input: the live one, or a new one on a free slot (its ring
/// zeroed and initialised; its data plane not started yet).
pub(super) fn lane_for<L: BlkifLayout + 'static>(f: &mut Fixture, key: LaneKey, data: &[u8]) -> Lane {
    f.lanes.inputs += 1;
    while let Some(old) = f.lanes.take_too_old() {
        end(f, old);
    }
    let live = if f.lanes.fresh { None } else { f.lanes.take(key) };
    // A lane that served its life ends here rather than after its last input: the new one is made in the same
    // input, which then frees about as much as it allocates (libFuzzer runs an input again, and then has
    // LeakSanitizer scan the heap, when it allocated more than it freed twice in a row).
    let live = match live {
        Some(old) if !old.has_life_left() => {
            end(f, old);
            None
        }
        other => other,
    };
    let mut lane = match live {
        Some(lane) => lane,
        None => {
            let (slot, evicted) = f.lanes.free_slot();
            if let Some(old) = evicted {
                end(f, old);
            }
            let s = &f.slots[slot];
            let addr = GuestDomain::page_addr(s.first);
            f.guest.memory().write_slice(&ZEROS, addr).expect("clear ring");
            let base = f.guest.page_ptr(s.first).expect("ring page");
            // SAFETY: `key.ring_pages()` (at most `SLOT_PAGES`) consecutive guest pages, contiguous in the guest's mapping,
            // allocated for the fixture's life (never freed); the ring lives only as long as its lane, which the
            // fixture owns.
            let ring = unsafe { FrontRing::<L>::init(base, XEN_PAGE_SIZE * key.ring_pages()) }.expect("ring");
            Lane { key, slot, front: Box::new(Front { ring }), dp: None, last_used: 0, served: 0, born: f.lanes.inputs }
        }
    };
    lane.record(data);
    lane
}

/// End a lane: stop its data plane, which must leave nothing of its own mapped or bound.
pub(super) fn end(f: &mut Fixture, lane: Lane) {
    if let Some(dp) = lane.dp {
        dp.stop();
    }
    check_accounting(f, true);
}

/// What is mapped and bound is exactly what the live lanes hold: one port each and one mapping of their ring,
/// and data pages only while a lane with persistent grants lives (every other mapping ends with its request).
/// With `each_page`, also that every page of each live ring is mapped once (a lock and a lookup per page: done
/// when a lane starts or ends, not after every input); at least once while a lane with persistent grants lives,
/// which may hold another lane's ring page that a request wrote from.
pub(super) fn check_accounting(f: &Fixture, each_page: bool) {
    let grants = f.host.grants();
    let persistent = f.lanes.iter().any(|l| l.dp.is_some() && l.key.flags & 0x08 != 0);
    let mut started = 0;
    for l in f.lanes.iter().filter(|l| l.dp.is_some()) {
        started += 1;
        for &g in f.slots[l.slot].grefs[..l.key.ring_pages()].iter().filter(|_| each_page) {
            let maps = grants.map_count(super::DOMID, g);
            assert!(maps == 1 || (persistent && maps > 1), "a live lane's ring page {g:#x} is mapped {maps} times");
        }
    }
    let bound = f.host.evtchn_switch().open_ports(0);
    assert_eq!(bound, started, "{bound} backend ports bound for {started} live data planes");
    let mapped = f.host.live_mappings();
    if persistent {
        assert!(mapped >= started, "{mapped} mappings for {started} live rings");
    } else {
        assert_eq!(mapped, started, "grant mappings leaked: {mapped} mappings for {started} live rings");
    }
}

/// Zeroes for a slot's pages.
static ZEROS: [u8; SLOT_PAGES * XEN_PAGE_SIZE] = [0; SLOT_PAGES * XEN_PAGE_SIZE];

impl<L: BlkifLayout> Front<L> {
    /// At least `count` responses (every published one) into `out`, waiting on the event channel up to `timeout`;
    /// as blkfront, re-arms the response event index before returning (`RingFrontend::wait_responses`).
    pub fn wait_responses(
        &mut self,
        evtchn: &mut EmulatedEventChannel,
        count: usize,
        timeout: Duration,
        out: &mut Vec<BlkifResponse>,
        ports: &mut Vec<EvtchnPort>,
    ) -> Result<(), String> {
        let deadline = std::time::Instant::now() + timeout;
        out.clear();
        loop {
            while let Some(r) = self.ring.take_response() {
                out.push(r);
            }
            let more = self.ring.final_check_for_responses();
            if out.len() >= count && !more {
                return Ok(());
            }
            if more {
                continue;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(format!("{} of {count} responses after {timeout:?}", out.len()));
            }
            let mut pfd = libc::pollfd { fd: evtchn.fd(), events: libc::POLLIN, revents: 0 };
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, ms) };
            drain_events(evtchn, ports);
        }
    }
}

/// Take and unmask every pending event of the guest's event channel.
pub(super) fn drain_events(evtchn: &mut EmulatedEventChannel, ports: &mut Vec<EvtchnPort>) {
    ports.clear();
    let _ = evtchn.pending(ports);
    for &p in ports.iter() {
        let _ = evtchn.unmask(p);
    }
}
