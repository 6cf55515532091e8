// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Test bed for the data-plane tests: an emulated host, one guest with one `RingFrontend` per queue, a temporary
//! disk file, and a running `Dataplane`; plus a minimal frontend that moves data through the rings with real
//! grants (direct or indirect requests).
#![allow(dead_code)]

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use device_blk::{Disk, DiskOptions, EngineKind};
use transport_xen::blkif::{encode, BlkifLayout, BlkifResponse, BlkifSegment, RawRequest, OP_READ, OP_WRITE};
use transport_xen::connect::ConnectConfig;
use transport_xen::dataplane::{Dataplane, DataplaneOptions};
use transport_xen::emulated::{EmulatedHost, GrantedPages, GuestDomain, RingFrontend};
use transport_xen::grant_memory::GrantMode;
use transport_xen::services::{EventChannelOpener, GrantTable};
use vm_memory::{Address, Bytes};

/// Deterministic test data.
#[allow(unused_imports)]
pub use test_kit::pattern;

/// The guest's domain id.
pub const DOMID: u16 = 7;
/// How long any wait may take.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// How a test bed is set up.
#[derive(Clone, Debug)]
pub struct BedConfig {
    pub order: u32,
    pub queues: usize,
    pub persistent: bool,
    pub max_indirect: u32,
    pub options: DataplaneOptions,
    pub read_only: bool,
    pub disk_bytes: u64,
    pub guest_pages: usize,
    /// The I/O engine: `Auto` (io_uring where the kernel has it); `Sync` completes each request as it is
    /// queued, so a round that queues without submitting is seen at once.
    pub engine: EngineKind,
}

impl Default for BedConfig {
    fn default() -> Self {
        BedConfig {
            order: 0,
            queues: 1,
            persistent: false,
            max_indirect: 0,
            options: DataplaneOptions::default(),
            read_only: false,
            disk_bytes: 8 << 20,
            guest_pages: 4096,
            engine: EngineKind::Auto,
        }
    }
}

impl BedConfig {
    pub fn mode(mut self, mode: GrantMode) -> Self {
        self.options.grant_mode = mode;
        self
    }
}

/// Request shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Direct,
    Indirect,
}

/// A running test bed.
pub struct Bed<L: BlkifLayout> {
    pub host: EmulatedHost,
    pub guest: Arc<GuestDomain>,
    pub file: tempfile::NamedTempFile,
    pub disk: Arc<Disk>,
    pub fronts: Vec<RingFrontend<L>>,
    pub dp: Option<Dataplane>,
    pub config: BedConfig,
    /// Data pages granted once (read-write) and reused, as blkfront does with persistent grants.
    pub pool: Option<GrantedPages>,
    next_id: u64,
}

impl<L: BlkifLayout> Bed<L> {
    pub fn new(config: BedConfig) -> Bed<L> {
        Bed::new_with(config, Bed::start)
    }

    /// A bed whose data plane `start` starts (e.g. over wrapped hypervisor services).
    pub fn new_with(
        config: BedConfig,
        start: impl FnOnce(&Bed<L>) -> Result<Dataplane, transport_xen::dataplane::DataplaneError>,
    ) -> Bed<L> {
        Bed::prepared(config, |_| {}, start)
    }

    /// A bed whose frontend `prepare` sets up before the data plane starts (e.g. requests queued on the ring
    /// without an event: the backend's first look at the ring finds them).
    pub fn new_prepared(config: BedConfig, prepare: impl FnOnce(&mut Bed<L>)) -> Bed<L> {
        Bed::prepared(config, prepare, Bed::start)
    }

    fn prepared(
        config: BedConfig,
        prepare: impl FnOnce(&mut Bed<L>),
        start: impl FnOnce(&Bed<L>) -> Result<Dataplane, transport_xen::dataplane::DataplaneError>,
    ) -> Bed<L> {
        let host = EmulatedHost::new().expect("host");
        let guest = Arc::new(host.add_guest(DOMID, config.guest_pages).expect("guest"));
        let file = tempfile::NamedTempFile::new().expect("temp file");
        file.as_file().set_len(config.disk_bytes).expect("size");
        let options = DiskOptions::default().with_read_only(config.read_only);
        let disk = Arc::new(Disk::open(file.path(), &options).expect("disk"));
        let fronts: Vec<RingFrontend<L>> =
            (0..config.queues).map(|_| RingFrontend::new(guest.clone(), config.order, 0).expect("front")).collect();
        let pool = config.persistent.then(|| fronts[0].grant_pages(512, false).expect("pool"));
        let mut bed = Bed { host, guest, file, disk, fronts, dp: None, config, pool, next_id: 1 };
        prepare(&mut bed);
        let dp = start(&bed).expect("data plane");
        if bed.config.engine == EngineKind::Auto {
            assert!(dp.engine().starts_with("io_uring"), "tests run on real io_uring, not {}", dp.engine());
        }
        bed.dp = Some(dp);
        bed
    }

    pub fn connect_config(&self) -> ConnectConfig {
        ConnectConfig {
            frontend_domid: DOMID,
            abi: L::ABI,
            queues: self.fronts.iter().map(RingFrontend::queue_ring).collect(),
            persistent_grants: self.config.persistent,
            max_indirect_segments: self.config.max_indirect,
        }
    }

    /// Connect again after [`stop`](Self::stop): the frontend initialises its rings again, as a reconnecting
    /// frontend does (a new data plane starts at index 0), then a new data plane starts.
    pub fn restart(&mut self) -> Result<Dataplane, transport_xen::dataplane::DataplaneError> {
        for front in &mut self.fronts {
            front.reinit_ring().expect("ring");
        }
        self.start()
    }

    pub fn start(&self) -> Result<Dataplane, transport_xen::dataplane::DataplaneError> {
        self.start_over(Arc::new(self.host.grant_table(0)), &self.host.evtchn_opener(0))
    }

    /// Start a data plane over these grant and event-channel services.
    pub fn start_over<G: GrantTable + 'static, O: EventChannelOpener>(
        &self,
        grants: Arc<G>,
        evtchn: &O,
    ) -> Result<Dataplane, transport_xen::dataplane::DataplaneError> {
        Dataplane::start(
            self.disk.clone(),
            self.config.engine,
            grants,
            evtchn,
            &self.connect_config(),
            &self.config.options,
        )
    }

    pub fn dp(&self) -> &Dataplane {
        self.dp.as_ref().expect("running")
    }

    pub fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Stop the data plane and check that nothing stays mapped.
    pub fn stop(&mut self) {
        if let Some(dp) = self.dp.take() {
            dp.stop();
        }
        assert_eq!(self.host.live_mappings(), 0, "grant mappings leaked");
        assert_eq!(self.host.evtchn_switch().open_ports(0), 0, "backend ports left bound");
    }

    /// Submit raw requests on queue `q` and wait for their responses (by id, in request order).
    pub fn roundtrip(&mut self, q: usize, requests: &[RawRequest]) -> Vec<i16> {
        let mut statuses = HashMap::new();
        let mut sent = 0;
        while sent < requests.len() {
            let n = self.fronts[q].submit(&requests[sent..]).expect("submit");
            if n == 0 {
                for r in self.fronts[q].wait_responses(1, TIMEOUT).expect("responses") {
                    statuses.insert(r.id, r.status);
                }
            }
            sent += n;
        }
        let want = requests.len() - statuses.len();
        for r in self.fronts[q].wait_responses(want, TIMEOUT).expect("responses") {
            statuses.insert(r.id, r.status);
        }
        requests.iter().map(|r| statuses[&r.id::<L>()]).collect()
    }

    /// Collect responses of queue `q` as they come.
    pub fn responses(&mut self, q: usize, count: usize) -> Vec<BlkifResponse> {
        self.fronts[q].wait_responses(count, TIMEOUT).expect("responses")
    }

    /// Data pages for a transfer: the persistent pool, or fresh grants (read-only for writes, as blkfront does).
    fn data_pages(&self, count: usize, write: bool) -> GrantedPages {
        match &self.pool {
            Some(pool) => GrantedPages { first: pool.first, grefs: pool.grefs[..count].to_vec() },
            None => self.fronts[0].grant_pages(count, write).expect("grant data pages"),
        }
    }

    fn release(&self, pages: GrantedPages) {
        if self.pool.is_none() {
            self.fronts[0].release_pages(pages).expect("the backend unmapped every data page");
        }
    }

    /// Move `sectors` sectors at `sector` between the disk and guest memory through queue `q`; returns the
    /// statuses (one per request) and, for reads, the data.
    pub fn transfer(
        &mut self,
        q: usize,
        write: Option<&[u8]>,
        sector: u64,
        sectors: usize,
        shape: Shape,
    ) -> (Vec<i16>, Vec<u8>) {
        let pages = sectors.div_ceil(8);
        let data = self.data_pages(pages, write.is_some());
        let guest = self.guest.clone();
        let mem = guest.memory();
        if let Some(bytes) = write {
            mem.write_slice(bytes, GuestDomain::page_addr(data.first)).expect("fill");
        }
        let segs: Vec<BlkifSegment> = (0..pages)
            .map(|i| BlkifSegment {
                gref: data.grefs[i],
                first_sect: 0,
                last_sect: u8::try_from((sectors - i * 8).min(8) - 1).expect("sector"),
            })
            .collect();
        let op = if write.is_some() { OP_WRITE } else { OP_READ };
        let per = match shape {
            Shape::Direct => 11,
            Shape::Indirect => self.config.max_indirect as usize,
        };
        let mut requests = Vec::new();
        let mut descriptors = Vec::new();
        let mut s = sector;
        for chunk in segs.chunks(per) {
            let id = self.id();
            match shape {
                Shape::Direct => requests.push(encode::rw::<L>(op, id, s, chunk)),
                Shape::Indirect => {
                    let d = self.fronts[0].grant_pages(chunk.len().div_ceil(512), true).expect("descriptor pages");
                    for (i, seg) in chunk.iter().enumerate() {
                        let at = GuestDomain::page_addr(d.first).unchecked_add((i * 8) as u64);
                        mem.write_slice(&seg.encode(), at).expect("descriptor");
                    }
                    let n = u16::try_from(chunk.len()).expect("segments");
                    requests.push(encode::indirect::<L>(op, id, s, n, &d.grefs));
                    descriptors.push(d);
                }
            }
            s += chunk.iter().map(|g| u64::from(g.last_sect - g.first_sect) + 1).sum::<u64>();
        }
        let statuses = self.roundtrip(q, &requests);
        let mut out = vec![0u8; if write.is_some() { 0 } else { sectors * 512 }];
        if write.is_none() {
            mem.read_slice(&mut out, GuestDomain::page_addr(data.first)).expect("read back");
        }
        for d in descriptors {
            self.fronts[0].release_pages(d).expect("the backend unmapped every descriptor page");
        }
        self.release(data);
        (statuses, out)
    }

    /// The disk file's bytes at `offset`.
    pub fn file_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.file.as_file().read_exact_at(&mut b, offset).expect("read file");
        b
    }
}
