// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `blkbackd demo`: the whole Xen path on an emulated host, with no hypervisor and no arguments.
//!
//! An emulated Xen host (xenstore, event channels, grant tables over memfd guest memory), the xenbus backend
//! serving one vbd over a temporary 64 MiB disk file with the real data plane (io_uring where available), and an
//! emulated Linux blkfront in guest domain 1 that performs the xenbus handshake and drives I/O through the
//! shared ring with real grants. The demo writes and verifies the whole disk, runs a random 4 KiB read/write load
//! at queue depths 1, 16 and 32 (every read verified), verifies the whole disk again, closes the device and
//! checks that no grant mapping is left. Any mismatch or error ends it with a non-zero exit code. The data-plane
//! threads drop every capability and run under the Xen worker system call filter, as in `blkbackd xen`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use device_blk::EngineKind;
use transport_xen::dataplane::DataplaneOptions;
use transport_xen::emulated::EmulatedHost;
use transport_xen::frontend::load::{fill_and_verify, random_load, verify_blocks, LoadStats};
use transport_xen::frontend::{BackendThread, Blkfront, BlkfrontConfig, DiskSpec, Indirect, Toolstack, XVDA};
use transport_xen::xenbus::dataplane_server::DataplaneServer;
use transport_xen::xenbus::{BackendConfig, Scope};

use crate::sandbox::{self, SeccompMode};

const DISK_BYTES: u64 = 64 << 20;
const GUEST_DOMID: u16 = 1;
/// Guest memory: rings, and data pages for 32 requests of 128 KiB in flight.
const GUEST_PAGES: usize = 8192;
const BLOCK: usize = 4096;
const LOAD_TIME: Duration = Duration::from_secs(3);
const DEPTHS: [usize; 3] = [1, 16, 32];

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<TempDir> {
        let path = std::env::temp_dir().join(format!("blkbackd-demo-{}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Run the demo; the data-plane threads are sandboxed as in `blkbackd xen` (with `seccomp` as their filter mode).
pub fn run(seccomp: SeccompMode) -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let image = dir.0.join("xvda.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(DISK_BYTES))
        .with_context(|| format!("creating the disk image {}", image.display()))?;

    let host = EmulatedHost::new().context("starting the emulated Xen host")?;
    let rings = DataplaneServer::new(Arc::new(host.grant_table(0)), host.evtchn_opener(0), EngineKind::Auto, {
        let mut o = DataplaneOptions::default();
        o.worker_init = Some(sandbox::xen_worker_init(seccomp, sandbox::GrantAccess::Brokered)?);
        o
    });
    let backend = BackendThread::spawn(&host, Arc::new(rings), BackendConfig::default(), Scope::AllDomains)
        .context("starting the backend")?;
    let guest = host.add_guest(GUEST_DOMID, GUEST_PAGES).context("creating guest domain 1")?;
    let toolstack = Toolstack::new(Arc::new(host.xenstore()?));
    let image_str = image.to_str().context("the temporary directory's path is not UTF-8")?;
    toolstack.add_disk(&DiskSpec::new(GUEST_DOMID, image_str)).context("attaching the vbd")?;

    let config =
        BlkfrontConfig { ring_page_order: 2, persistent: true, indirect: Indirect::WhenNeeded, ..Default::default() };
    let mut front = Blkfront::connect(&guest, XVDA, config).context("blkfront handshake")?;
    // Close in order even when the workload fails, so a failure leaves nothing mapped behind.
    let outcome = workload(&mut front, &image);
    let closed = front.close().context("closing the device");
    let stopped = backend.stop().context("stopping the backend");
    outcome.and(closed).and(stopped)?;
    let leaked = host.live_mappings();
    if leaked != 0 {
        bail!("{leaked} grant mappings left after the backend stopped");
    }
    println!();
    println!("verify OK");
    Ok(())
}

/// Write and verify the whole disk, run the random load at each depth, verify again.
fn workload(front: &mut Blkfront<'_>, image: &std::path::Path) -> anyhow::Result<()> {
    let info = *front.info();
    println!(
        "blkbackd demo: emulated Xen host, dom{GUEST_DOMID} xvda -> {} ({} MiB)",
        image.display(),
        DISK_BYTES >> 20
    );
    println!(
        "  connected: {} sectors, {}-byte sectors, ring of {} entries, persistent grants {}, indirect segments {}, \
         flush {}, discard {}",
        info.sectors,
        info.sector_size,
        front.ring_size(),
        on_off(info.persistent),
        info.max_indirect_segments,
        on_off(info.flush),
        on_off(info.discard),
    );
    if info.sectors * 512 != DISK_BYTES {
        bail!("the backend reports {} sectors for a {DISK_BYTES}-byte disk", info.sectors);
    }

    let started = Instant::now();
    let bytes = fill_and_verify(front, info.sectors, 128 << 10, 16, 1).context("whole-disk write and verify")?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "  wrote and read back {} MiB in {secs:.2} s ({:.0} MiB/s), verified",
        bytes >> 20,
        2.0 * (bytes >> 20) as f64 / secs
    );

    let blocks = usize::try_from(info.sectors * 512 / BLOCK as u64).context("disk too large")?;
    let mut gens = vec![1u32; blocks];
    println!();
    println!("  random 4 KiB I/O, 50% reads (every read verified), {} s per depth", LOAD_TIME.as_secs());
    println!("  {:>5} {:>10} {:>10} {:>10} {:>10}", "QD", "IOPS", "p50", "p99", "ops");
    for (i, depth) in DEPTHS.into_iter().enumerate() {
        let stats = random_load(front, &mut gens, BLOCK, depth, LOAD_TIME, 0x5eed + i as u64)
            .with_context(|| format!("random load at queue depth {depth}"))?;
        print_row(&stats);
    }
    verify_blocks(front, &gens, BLOCK, 32).context("final whole-disk verify")?;
    Ok(())
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

fn print_row(s: &LoadStats) {
    println!(
        "  {:>5} {:>10.0} {:>10} {:>10} {:>10}",
        s.depth,
        s.iops(),
        format!("{:.1} us", s.p50.as_secs_f64() * 1e6),
        format!("{:.1} us", s.p99.as_secs_f64() * 1e6),
        s.ops
    );
}
