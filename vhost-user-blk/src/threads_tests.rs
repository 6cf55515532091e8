// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! I/O threads serving several queues each, driven from the test thread the way vhost-user-backend drives them
//! (`handle_event` with the thread's vrings; the eventfds the backend registers are watched by a small event loop
//! here): every queue is served with the right data, and a flooded queue does not starve the others of its
//! thread.

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace};
use vmm_sys_util::epoll::EventSet;

use super::{Event, Layout, Registrar};
use crate::{AtomicGuestMemory, BlkVring, GuestMemory, VhostUserBlkBackend, VhostUserBlkOptions};
use device_blk::disk::{DirectIo, DiskOptions};
use device_blk::engine::EngineKind;
use device_blk::request::ID_BYTES;
use device_blk::Disk;

const QUEUE_SIZE: u16 = 256;
const SECTORS_PER_QUEUE: u64 = 64 * 8;

/// What a thread registered: (fd, event id), watched by [`run_until`].
#[derive(Default)]
struct Recorder(Mutex<Vec<(RawFd, u64)>>);

struct RecorderRef(Arc<Recorder>);

impl Registrar for RecorderRef {
    fn register(&self, fd: RawFd, _events: EventSet, data: u64) -> std::io::Result<()> {
        self.0 .0.lock().expect("recorder").push((fd, data));
        Ok(())
    }
}

/// A device of `queues` queues on `threads` I/O threads, with guest memory and a vring per queue.
struct Device {
    _dir: tempfile::TempDir,
    backend: Arc<VhostUserBlkBackend>,
    recorders: Vec<Arc<Recorder>>,
    atomic: AtomicGuestMemory,
    vrings: Vec<BlkVring>,
    layout: Layout,
}

impl Device {
    fn new(queues: u16, threads: u16, engine: EngineKind) -> Device {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0u8; 512 * 64 * 8 * usize::from(queues)]).expect("image");
        let disk = Arc::new(Disk::open(&path, &DiskOptions::default().with_direct_io(DirectIo::Off)).expect("open"));
        let options = VhostUserBlkOptions {
            num_queues: queues,
            io_threads: Some(threads),
            engine,
            io_depth: Some(32),
            ..VhostUserBlkOptions::new([0; ID_BYTES])
        };
        let backend = Arc::new(VhostUserBlkBackend::new(disk, options).expect("backend"));
        let atomic = AtomicGuestMemory::new(GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("memory"));
        backend.update_memory(atomic.clone()).expect("memory");
        let recorders: Vec<Arc<Recorder>> = (0..threads).map(|_| Arc::default()).collect();
        let registrars = recorders.iter().map(|r| Box::new(RecorderRef(Arc::clone(r))) as Box<dyn Registrar>).collect();
        backend.attach_registrars(registrars).expect("attach");
        let vrings = (0..queues).map(|_| BlkVring::new(atomic.clone(), QUEUE_SIZE).expect("vring")).collect();
        Device { _dir: dir, backend, recorders, atomic, vrings, layout: Layout { queues, threads } }
    }

    /// The vrings of thread `t`, in the order vhost-user-backend hands them over (its queue mask, ascending).
    fn thread_vrings(&self, t: u16) -> Vec<BlkVring> {
        let mask = self.backend.queues_per_thread()[usize::from(t)];
        (0..self.vrings.len()).filter(|q| mask >> q & 1 == 1).map(|q| self.vrings[q].clone()).collect()
    }

    /// The driver side of queue `q`, with its vring pointed at the driver's rings.
    fn guest<'a>(&self, q: u16, mem: &'a GuestMemory) -> Guest<'a> {
        let mq = MockSplitQueue::create(mem, GuestAddress(0x1_0000 * u64::from(q)), QUEUE_SIZE);
        let vring = &self.vrings[usize::from(q)];
        vring.set_queue_size(QUEUE_SIZE);
        let (desc, avail, used) = (mq.desc_table_addr(), mq.avail_addr(), mq.used_addr());
        vring.set_queue_info(desc.0, avail.0, used.0).expect("ring addresses");
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        Guest { mq, mem, q: u64::from(q) }
    }

    /// What vhost-user-backend does for an event of thread `t`.
    fn event(&self, t: u16, id: u64) {
        let vrings = self.thread_vrings(t);
        let id = u16::try_from(id).expect("event id");
        self.backend.handle_event(id, EventSet::IN, &vrings, usize::from(t)).expect("handle_event");
    }

    /// Dispatch thread `t`'s readable eventfds until `done` (an event must come within 10 s).
    fn run_until(&self, t: u16, done: impl Fn() -> bool) {
        let exit = Event::exit_id(self.layout.queues);
        while !done() {
            let registered: Vec<(RawFd, u64)> = self.recorders[usize::from(t)].0.lock().expect("recorder").clone();
            let mut fds: Vec<libc::pollfd> =
                registered.iter().map(|&(fd, _)| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
            let n = libc::nfds_t::try_from(fds.len()).expect("nfds");
            // SAFETY: `fds` is a valid array of `n` pollfd structures for the duration of the call.
            assert!(unsafe { libc::poll(fds.as_mut_ptr(), n, 10_000) } > 0, "no event within 10 s");
            for (pfd, &(_, id)) in fds.iter().zip(&registered) {
                if pfd.revents != 0 && id != exit {
                    self.event(t, id);
                }
            }
        }
    }
}

/// A driver putting 4 KiB read/write requests (header, data, status) in its queue's rings. Each queue has its own
/// area of guest memory and its own sectors of the disk.
struct Guest<'a> {
    mq: MockSplitQueue<'a, GuestMemory>,
    mem: &'a GuestMemory,
    q: u64,
}

impl Guest<'_> {
    fn area(&self) -> u64 {
        0x10_0000 * (self.q + 1)
    }

    fn status_addr(&self, slot: u64) -> GuestAddress {
        GuestAddress(self.area() + 0x1000 + slot)
    }

    fn data_addr(&self, slot: u64) -> GuestAddress {
        GuestAddress(self.area() + 0x2000 + 4096 * slot)
    }

    /// The pattern of block `block` of this queue.
    fn pattern(&self, block: u64) -> Vec<u8> {
        (0..4096u64).map(|i| ((self.q * 131 + block * 7 + i) % 251) as u8).collect()
    }

    /// Publish requests for `blocks` (slot n carries the nth; descriptors from `first_desc`): writes of each
    /// block's pattern, or reads.
    fn publish(&self, write: bool, blocks: std::ops::Range<u64>, first_desc: u16) {
        let mut descs = Vec::new();
        for (n, block) in blocks.clone().enumerate() {
            let slot = block % 32 + if write { 0 } else { 32 };
            let virtio_type = if write { VIRTIO_BLK_T_OUT } else { VIRTIO_BLK_T_IN };
            let sector = self.q * SECTORS_PER_QUEUE + block * 8;
            let mut header = [0u8; 16];
            header[..4].copy_from_slice(&virtio_type.to_le_bytes());
            header[8..].copy_from_slice(&sector.to_le_bytes());
            let header_addr = self.area() + 16 * slot;
            self.mem.write_slice(&header, GuestAddress(header_addr)).expect("header");
            self.mem.write_obj(0xffu8, self.status_addr(slot)).expect("status");
            let data = if write { self.pattern(block) } else { vec![0; 4096] };
            self.mem.write_slice(&data, self.data_addr(slot)).expect("data");
            let flags = |f: u32| u16::try_from(f).expect("ring flag");
            let data_flags = if write { 0 } else { VRING_DESC_F_WRITE };
            let base = first_desc + 3 * u16::try_from(n).expect("index");
            descs.push(SplitDescriptor::new(header_addr, 16, flags(VRING_DESC_F_NEXT), base + 1));
            descs.push(SplitDescriptor::new(
                self.data_addr(slot).0,
                4096,
                flags(data_flags | VRING_DESC_F_NEXT),
                base + 2,
            ));
            descs.push(SplitDescriptor::new(self.status_addr(slot).0, 1, flags(VRING_DESC_F_WRITE), 0));
        }
        let raw: Vec<RawDescriptor> = descs.into_iter().map(RawDescriptor::from).collect();
        self.mq.add_desc_chains(&raw, first_desc).expect("publish the chains");
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj::<u16>(self.mq.used_addr().unchecked_add(2)).expect("used idx")
    }

    fn status(&self, slot: u64) -> u8 {
        self.mem.read_obj(self.status_addr(slot)).expect("status")
    }
}

#[test]
fn queues_map_to_threads_round_robin() {
    assert_eq!(Layout { queues: 4, threads: 2 }.masks(), [0b0101, 0b1010]);
    assert_eq!(Layout { queues: 5, threads: 3 }.masks(), [0b01001, 0b10010, 0b00100]);
    assert_eq!(Layout { queues: 3, threads: 1 }.masks(), [0b111]);
    assert_eq!(Layout { queues: 64, threads: 64 }.masks()[63], 1 << 63);
    assert_eq!(Layout { queues: 5, threads: 2 }.queues_of(1), [1, 3]);
    // Ids: kicks by position in the thread, ours above the queue count; anything else is not ours.
    let (n, local) = (4, 2);
    assert_eq!(Event::decode(1, n, local), Event::Kick(1));
    assert_eq!(Event::decode(2, n, local), Event::Unknown(2));
    assert_eq!(Event::decode(4, n, local), Event::Unknown(4));
    assert_eq!(Event::decode(u16::try_from(Event::exit_id(n)).expect("id"), n, local), Event::Exit);
    assert_eq!(Event::decode(u16::try_from(Event::name_id(n)).expect("id"), n, local), Event::Name);
    for l in 0..local {
        let c = u16::try_from(Event::completion_id(n, l)).expect("id");
        let r = u16::try_from(Event::resume_id(n, l)).expect("id");
        assert_eq!((Event::decode(c, n, local), Event::decode(r, n, local)), (Event::Completion(l), Event::Resume(l)));
    }
    let past = u16::try_from(Event::completion_id(n, local)).expect("id");
    assert_eq!(Event::decode(past, n, local), Event::Unknown(past));
    assert_eq!(Event::decode(u16::MAX, n, local), Event::Unknown(u16::MAX));
}

#[test]
fn every_queue_is_served_with_fewer_threads_than_queues() {
    const BLOCKS: u64 = 16;
    for engine in [EngineKind::Sync, EngineKind::IoUring] {
        for threads in [1, 2, 3] {
            let device = Device::new(4, threads, engine);
            assert_eq!(device.backend.io_threads(), usize::from(threads));
            let mem = device.atomic.memory();
            let guests: Vec<Guest> = (0..4).map(|q| device.guest(q, &mem)).collect();
            for (write, first_desc, expected) in [(true, 0, BLOCKS), (false, 48, 2 * BLOCKS)] {
                for guest in &guests {
                    guest.publish(write, 0..BLOCKS, first_desc);
                }
                for t in 0..threads {
                    for local in 0..device.layout.queues_of(t).len() {
                        device.event(t, local as u64);
                    }
                    let mine: Vec<&Guest> = device.layout.queues_of(t).into_iter().map(|q| &guests[q]).collect();
                    device.run_until(t, || mine.iter().all(|g| u64::from(g.used_idx()) == expected));
                }
            }
            for guest in &guests {
                for block in 0..BLOCKS {
                    let context = format!("{engine:?}, {threads} threads, queue {}, block {block}", guest.q);
                    assert_eq!((guest.status(block), guest.status(32 + block)), (0, 0), "{context}");
                    let mut back = vec![0u8; 4096];
                    mem.read_slice(&mut back, guest.data_addr(32 + block)).expect("data");
                    assert!(back == guest.pattern(block), "{context}: the data read back differs");
                }
            }
            device.backend.shutdown();
            for t in 0..threads {
                let vrings = device.thread_vrings(t);
                let exit = u16::try_from(Event::exit_id(4)).expect("id");
                let result = device.backend.handle_event(exit, EventSet::IN, &vrings, usize::from(t));
                assert!(result.is_err(), "the exit event ends the thread");
            }
        }
    }
}

/// The hostile driver of a queue with rings at `avail` and `used`: publishes malformed chains (descriptor 0, a lone
/// header, answered at once) until a whole ring of them is waiting ahead of what the device returned, as a driver
/// racing the device always is by the time the device looks again.
fn flood(mem: &GuestMemory, avail: GuestAddress, used: GuestAddress) {
    let idx = |base: GuestAddress| base.unchecked_add(2);
    let mut published: u16 = mem.load(idx(avail), Ordering::Acquire).expect("avail idx");
    let returned: u16 = mem.load(idx(used), Ordering::Acquire).expect("used idx");
    while published.wrapping_sub(returned) < QUEUE_SIZE {
        let entry = avail.unchecked_add(4 + 2 * u64::from(published % QUEUE_SIZE));
        mem.write_obj(0u16, entry).expect("avail entry");
        published = published.wrapping_add(1);
    }
    mem.store(published, idx(avail), Ordering::Release).expect("avail idx");
}

fn readable(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
}

#[test]
fn a_flooded_queue_does_not_starve_the_other_queues_of_its_thread() {
    const BATCH: u64 = 8;
    const ROUNDS: u64 = 8;
    // One thread, three queues: queue 0 flooded by a hostile driver, queues 1 and 2 quiet.
    let device = Device::new(3, 1, EngineKind::Sync);
    let mem = device.atomic.memory();
    let flooded = device.guest(0, &mem);
    let quiet: Vec<Guest> = (1..3).map(|q| device.guest(q, &mem)).collect();
    // The hostile driver's own rings (going round and round the ring, it would reach the mock's used ring, which
    // overlaps the second half of the mock's avail ring), over the mock's descriptor table.
    let (avail, used) = (GuestAddress(0x8000), GuestAddress(0x9000));
    device.vrings[0].set_queue_info(flooded.mq.desc_table_addr().0, avail.0, used.0).expect("ring addresses");
    let header = flooded.mq.desc_table_addr();
    mem.write_obj(0x10_0000u64, header).expect("descriptor address");
    mem.write_obj(16u32, header.unchecked_add(8)).expect("descriptor length");
    mem.write_obj(0u32, header.unchecked_add(12)).expect("descriptor flags and next");
    // The queues start (their first kick), the flooded one with its ring already full.
    let index_of = |ring: GuestAddress| mem.load::<u16>(ring.unchecked_add(2), Ordering::Acquire).expect("idx");
    flood(&mem, avail, used);
    for local in 0..3 {
        device.event(0, local);
    }
    let resume = device.recorders[0]
        .0
        .lock()
        .expect("recorder")
        .iter()
        .find(|&&(_, id)| id == Event::resume_id(3, 0))
        .map(|&(fd, _)| fd)
        .expect("the flooded queue's resume eventfd");
    for round in 0..ROUNDS {
        flood(&mem, avail, used);
        let before = index_of(used);
        // The quiet queues publish a batch and do not kick: only the flooded queue's events come.
        for guest in &quiet {
            guest.publish(true, 0..BATCH, 0);
        }
        assert!(readable(resume), "round {round}: the flooded queue asks to come back for the rest");
        device.event(0, Event::resume_id(3, 0));
        // One event of the thread, the flooded queue's, served the quiet queues too: every request of the batch is
        // answered.
        for guest in &quiet {
            assert_eq!(
                u64::from(guest.used_idx()),
                (round + 1) * BATCH,
                "round {round}: queue {} served in the flooded queue's round",
                guest.q
            );
            assert!((0..BATCH).all(|slot| guest.status(slot) == 0), "round {round}: queue {} answered OK", guest.q);
        }
        // And the flooded queue's share of the round stayed bounded by its ring.
        let taken = index_of(used).wrapping_sub(before);
        assert_eq!(taken, QUEUE_SIZE, "round {round}: the flooded queue's round is a ring's worth");
    }
    assert!(readable(resume), "the flooded queue still asks to come back");
    assert!(flooded.used_idx() == 0, "the flooded queue used its own rings");
}

#[test]
fn io_threads_are_between_one_and_the_queue_count() {
    let options = |queues, threads| VhostUserBlkOptions {
        num_queues: queues,
        io_threads: threads,
        ..VhostUserBlkOptions::new([0; ID_BYTES])
    };
    assert_eq!(options(8, None).effective_io_threads(), 1, "one thread by default");
    assert_eq!(options(8, Some(3)).effective_io_threads(), 3);
    assert!(options(4, Some(4)).validate().is_ok());
    for (queues, threads) in [(4, 0), (4, 5), (1, 2)] {
        assert_eq!(
            options(queues, Some(threads)).validate(),
            Err(crate::OptionsError::IoThreads { threads, queues }),
            "{threads} threads for {queues} queues"
        );
    }
}

#[test]
fn a_flooded_queue_does_not_starve_the_other_queues_on_the_shared_ring() {
    const BATCH: u64 = 8;
    const ROUNDS: u64 = 4;
    // As above, on io_uring: the three queues are lanes of the thread's one ring.
    let device = Device::new(3, 1, EngineKind::IoUring);
    let mem = device.atomic.memory();
    let flooded = device.guest(0, &mem);
    let quiet: Vec<Guest> = (1..3).map(|q| device.guest(q, &mem)).collect();
    let (avail, used) = (GuestAddress(0x8000), GuestAddress(0x9000));
    device.vrings[0].set_queue_info(flooded.mq.desc_table_addr().0, avail.0, used.0).expect("ring addresses");
    let header = flooded.mq.desc_table_addr();
    mem.write_obj(0x10_0000u64, header).expect("descriptor address");
    mem.write_obj(16u32, header.unchecked_add(8)).expect("descriptor length");
    mem.write_obj(0u32, header.unchecked_add(12)).expect("descriptor flags and next");
    let index_of = |ring: GuestAddress| mem.load::<u16>(ring.unchecked_add(2), Ordering::Acquire).expect("idx");
    flood(&mem, avail, used);
    for local in 0..3 {
        device.event(0, local);
    }
    let registered = device.recorders[0].0.lock().expect("recorder").clone();
    let completions = registered.iter().filter(|&&(_, id)| id == Event::completion_id(3, 0)).count();
    let others = (1..3).filter(|&l| registered.iter().any(|&(_, id)| id == Event::completion_id(3, l))).count();
    assert_eq!((completions, others), (1, 0), "one completion eventfd for the thread's ring: {registered:?}");
    for round in 0..ROUNDS {
        flood(&mem, avail, used);
        let before = index_of(used);
        for guest in &quiet {
            guest.publish(true, 0..BATCH, 0);
        }
        // Only the flooded queue's event: its round takes the quiet queues' requests too, and a ring's worth of
        // its own chains at most.
        device.event(0, Event::resume_id(3, 0));
        assert_eq!(index_of(used).wrapping_sub(before), QUEUE_SIZE, "round {round}: a ring's worth");
        // Their completions come through the thread's one completion eventfd.
        let want = u16::try_from((round + 1) * BATCH).expect("index");
        device.run_until(0, || quiet.iter().all(|g| g.used_idx() == want));
        for guest in &quiet {
            assert!((0..BATCH).all(|slot| guest.status(slot) == 0), "round {round}: queue {} answered OK", guest.q);
        }
    }
    assert!(flooded.used_idx() == 0, "the flooded queue used its own rings");
    device.backend.shutdown();
}
