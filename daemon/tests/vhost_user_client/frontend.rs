// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A vhost-user frontend by hand (the `vhost` crate's `Frontend`) with one split virtqueue at fixed guest
//! addresses, that does what a migrating VMM does and `virtio-driver` cannot: hand the backend a dirty log
//! (`SET_LOG_BASE` with a memfd), turn logging on (`SET_FEATURES` with `VHOST_F_LOG_ALL`, `SET_VRING_ADDR` with
//! `VHOST_VRING_F_LOG`), and read the log back. One request at a time, synchronously.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{fence, AtomicU16, Ordering};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::memory::SharedMem;
use super::wait_readable;

/// The log's page size (`VHOST_LOG_PAGE`).
pub const PAGE: usize = 4096;
/// Descriptors in the ring.
pub const QUEUE_SIZE: u16 = 16;
/// Guest page of the descriptor table.
pub const DESC_PAGE: usize = 0;
/// Guest page of the available ring.
pub const AVAIL_PAGE: usize = 1;
/// Guest page of the used ring.
pub const USED_PAGE: usize = 2;
/// Guest page of the request header.
pub const HEADER_PAGE: usize = 3;
/// Guest page of the status byte.
pub const STATUS_PAGE: usize = 4;
/// Bytes of dirty log (one bit per page: far more than the guest RAM needs).
pub const LOG_BYTES: usize = 4096;

/// `VIRTIO_F_VERSION_1`.
const VERSION_1: u64 = 1 << 32;
/// `VHOST_VRING_F_LOG`: log the used ring's writes at `log_addr`.
const VRING_F_LOG: u32 = 1;

/// A data buffer of a request: guest page, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    /// Guest page where it starts.
    pub page: usize,
    /// Length in bytes.
    pub len: u32,
    /// Whether the device writes it.
    pub writable: bool,
}

/// A connected frontend with guest RAM at guest address 0 and one enabled queue.
pub struct LogClient {
    frontend: Frontend,
    /// Guest RAM (guest address 0 is its first byte).
    pub mem: SharedMem,
    /// The dirty log shared with the backend once [`enable_logging`](Self::enable_logging) ran.
    pub log: SharedMem,
    kick: EventFd,
    call: EventFd,
    /// Virtio features acknowledged so far.
    acked: u64,
    /// What the backend offered.
    pub offered_features: u64,
    /// Protocol features the backend offered.
    pub offered_protocol: VhostUserProtocolFeatures,
    avail_idx: u16,
}

impl LogClient {
    /// Connect, negotiate (`LOG_SHMFD` if offered), map `mem_len` bytes of guest RAM and start queue 0.
    pub fn connect(socket: &Path, mem_len: usize) -> io::Result<Self> {
        let mut frontend = Frontend::connect(socket, 1).map_err(io::Error::other)?;
        frontend.set_owner().map_err(io::Error::other)?;
        let offered_features = frontend.get_features().map_err(io::Error::other)?;
        let acked = offered_features & (VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits());
        frontend.set_features(acked).map_err(io::Error::other)?;
        let offered_protocol = frontend.get_protocol_features().map_err(io::Error::other)?;
        frontend
            .set_protocol_features(offered_protocol & VhostUserProtocolFeatures::LOG_SHMFD)
            .map_err(io::Error::other)?;
        let mem = SharedMem::new(mem_len)?;
        let log = SharedMem::new(LOG_BYTES)?;
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: mem_len as u64,
            userspace_addr: mem.addr() as u64,
            mmap_offset: 0,
            mmap_handle: mem.fd(),
        };
        frontend.set_mem_table(&[region]).map_err(io::Error::other)?;
        let kick = EventFd::new(EFD_NONBLOCK)?;
        let call = EventFd::new(EFD_NONBLOCK)?;
        let mut client =
            LogClient { frontend, mem, log, kick, call, acked, offered_features, offered_protocol, avail_idx: 0 };
        client.frontend.set_vring_num(0, QUEUE_SIZE).map_err(io::Error::other)?;
        client.frontend.set_vring_addr(0, &client.vring_config(false)).map_err(io::Error::other)?;
        client.frontend.set_vring_base(0, 0).map_err(io::Error::other)?;
        client.frontend.set_vring_call(0, &client.call).map_err(io::Error::other)?;
        client.frontend.set_vring_kick(0, &client.kick).map_err(io::Error::other)?;
        client.frontend.set_vring_enable(0, true).map_err(io::Error::other)?;
        Ok(client)
    }

    fn vring_config(&self, log: bool) -> VringConfigData {
        let base = self.mem.addr() as u64;
        let page = |p: usize| base + (p * PAGE) as u64;
        VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: if log { VRING_F_LOG } else { 0 },
            desc_table_addr: page(DESC_PAGE),
            used_ring_addr: page(USED_PAGE),
            avail_ring_addr: page(AVAIL_PAGE),
            // The log address is a guest physical address.
            log_addr: log.then_some((USED_PAGE * PAGE) as u64),
        }
    }

    /// Start migration logging the way QEMU does: `SET_LOG_BASE` with the log memfd, `SET_FEATURES` with
    /// `VHOST_F_LOG_ALL`, and `SET_VRING_ADDR` with `VHOST_VRING_F_LOG`, each of the last two waited for (QEMU waits
    /// for the back-end to have processed them before it goes on: with `REPLY_ACK`, or else with a `GET_FEATURES`
    /// round trip, as here). Without that wait the next request raced with `SET_VRING_ADDR` (about one run in 40):
    /// vhost-user-backend 0.24 reads the used index from guest memory and sets the queue's next used index from it
    /// in two steps, so a completion between them was undone (the next used index went back by one) and the next
    /// request's answer rewrote the same used index: the client waited for it forever.
    pub fn enable_logging(&mut self) -> io::Result<()> {
        let region =
            VhostUserDirtyLogRegion { mmap_size: LOG_BYTES as u64, mmap_offset: 0, mmap_handle: self.log.fd() };
        self.frontend.set_log_base(0, Some(region)).map_err(io::Error::other)?;
        self.acked |= VhostUserVirtioFeatures::LOG_ALL.bits();
        self.frontend.set_features(self.acked).map_err(io::Error::other)?;
        self.frontend.get_features().map_err(io::Error::other)?;
        self.frontend.set_vring_addr(0, &self.vring_config(true)).map_err(io::Error::other)?;
        self.frontend.get_features().map_err(io::Error::other)?;
        Ok(())
    }

    /// The guest pages whose bit is set in the log.
    pub fn dirty_pages(&self) -> Vec<usize> {
        let log = self.log.bytes(0..LOG_BYTES);
        (0..self.mem.len() / PAGE).filter(|&p| log[p / 8] & (1 << (p % 8)) != 0).collect()
    }

    /// Clear the log (as a VMM does after copying the dirty pages); nothing may be in flight.
    pub fn clear_log(&mut self) {
        self.log.bytes_mut(0..LOG_BYTES).fill(0);
    }

    /// Run one request of `virtio_type` at `sector` over `bufs`; returns the status byte and the used length.
    pub fn run(&mut self, virtio_type: u32, sector: u64, bufs: &[Buf]) -> (u8, u32) {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&virtio_type.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.bytes_mut(HEADER_PAGE * PAGE..HEADER_PAGE * PAGE + 16).copy_from_slice(&header);
        self.mem.bytes_mut(STATUS_PAGE * PAGE..STATUS_PAGE * PAGE + 1)[0] = 0xff;
        let mut descs = vec![((HEADER_PAGE * PAGE) as u64, 16u32, false)];
        descs.extend(bufs.iter().map(|b| ((b.page * PAGE) as u64, b.len, b.writable)));
        descs.push(((STATUS_PAGE * PAGE) as u64, 1, true));
        assert!(descs.len() <= usize::from(QUEUE_SIZE), "too many buffers");
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let flags: u16 = (if last { 0 } else { 1 }) | (if writable { 2 } else { 0 });
            let next = u16::try_from(i + 1).unwrap_or(0) % QUEUE_SIZE;
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&next.to_le_bytes());
            let at = DESC_PAGE * PAGE + 16 * i;
            self.mem.bytes_mut(at..at + 16).copy_from_slice(&raw);
        }
        // The chain's head is descriptor 0, in the next avail slot; then publish the new index.
        let slot = usize::from(self.avail_idx % QUEUE_SIZE);
        let at = AVAIL_PAGE * PAGE + 4 + 2 * slot;
        self.mem.bytes_mut(at..at + 2).copy_from_slice(&0u16.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.index(AVAIL_PAGE * PAGE + 2).store(self.avail_idx.to_le(), Ordering::Release);
        fence(Ordering::SeqCst);
        self.kick.write(1).expect("kick");
        while u16::from_le(self.index(USED_PAGE * PAGE + 2).load(Ordering::Acquire)) != self.avail_idx {
            wait_readable(&[self.call.as_raw_fd()]);
            let _ = self.call.read();
        }
        let at = USED_PAGE * PAGE + 4 + 8 * slot;
        let elem = self.mem.bytes(at..at + 8);
        let id = u32::from_le_bytes([elem[0], elem[1], elem[2], elem[3]]);
        assert_eq!(id, 0, "the used element names the chain's head");
        let used_len = u32::from_le_bytes([elem[4], elem[5], elem[6], elem[7]]);
        (self.mem.bytes(STATUS_PAGE * PAGE..STATUS_PAGE * PAGE + 1)[0], used_len)
    }

    /// The 16-bit ring index at byte `offset` of guest RAM.
    fn index(&self, offset: usize) -> &AtomicU16 {
        assert!(offset % 2 == 0 && offset + 2 <= self.mem.len());
        // SAFETY: in bounds (checked), 2-aligned (the mapping is page-aligned), and only ever accessed atomically
        // or by the backend's own atomics; the reference lives no longer than `self.mem`.
        unsafe { &*self.mem.ptr(offset).cast::<AtomicU16>() }
    }
}
