// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The data plane under the io_uring completion modes of older kernels, with the engine full: a frontend queueing
//! far more requests than a queue may have in flight, on a thread of its own per ring and on a shared I/O thread
//! (whose ring made on another thread before any vbd, as a locked-down worker makes it, or with its first lane).
//!
//! Which wake-ups the thread gets depends on the mode: with `DEFER_TASKRUN` (6.1 on) completions are posted only
//! when the thread enters the kernel; with `COOP_TASKRUN` (5.19 on) at its next transition; interrupting rings
//! (older) post them at once. A ring that waits for room in its engine must still be woken when a completion
//! frees it, in every mode: a lost wake-up there hangs the queue (as `vhost-user-blk` did under backpressure
//! before Linux 6.1). `COMPLETION_MODE_CAP` makes a newer kernel behave like an older one; each mode runs in a
//! child process (the cap is read from the environment), which is killed if the load does not finish in time.

mod xenbus_support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use device_blk::engine::COMPLETION_MODE_CAP;
use transport_xen::dataplane::{DataplaneOptions, IoThreads};
use transport_xen::frontend::load::{fill_and_verify, random_load, verify_blocks};
use transport_xen::frontend::{Blkfront, BlkfrontConfig, DiskSpec, XVDA};
use transport_xen::xenbus::BackendConfig;
use xenbus_support::Bed;

const CHILD_ENV: &str = "BLKBACKD_COMPLETION_MODE_CHILD";
/// What a child may take: the load runs for well under a second per shape.
const CHILD_TIMEOUT: Duration = Duration::from_secs(60);

/// The child side: serve a frontend at depth 32 through queues of 2 in flight each, verified, on each shape.
#[test]
fn child() {
    let Ok(shape) = std::env::var(CHILD_ENV) else { return };
    let options = {
        let mut o = DataplaneOptions::default();
        o.max_in_flight = 2;
        o.io_threads = match shape.as_str() {
            "pool" => Some(IoThreads::new(1)),
            // As a locked-down worker: the thread's ring made on this thread, before any vbd.
            "pool-rings-made-first" => {
                let pool = IoThreads::new(1);
                assert_eq!(pool.make_rings().expect("io_uring"), 1);
                Some(pool)
            }
            _ => None,
        };
        o
    };
    let bed = Bed::real(BackendConfig::default(), options);
    let guest = bed.big_guest(5, 2048);
    let image = bed.image("d5.img", 4);
    bed.toolstack.add_disk(&DiskSpec::new(5, image.to_str().expect("utf-8"))).expect("add disk");
    let config = BlkfrontConfig { queues: 2, ring_page_order: 1, persistent: true, ..BlkfrontConfig::default() };
    let mut front = Blkfront::connect(&guest, XVDA, config).expect("connect");
    assert_eq!(front.queue_count(), 2);
    let sectors = front.info().sectors;
    fill_and_verify(&mut front, sectors, 64 << 10, 16, 1).expect("fill at depth 16");
    let mut gens = vec![1u32; usize::try_from(sectors / 8).expect("small")];
    // The engine is io_uring in every mode (the disk is in a ring's table of registered files), not the
    // synchronous fallback.
    assert!(in_an_io_uring_file_table(&image), "{shape}: the disk is served by no io_uring");
    let stats = random_load(&mut front, &mut gens, 4096, 32, Duration::from_millis(400), 7).expect("load");
    assert!(stats.ops > 64, "{stats:?}");
    verify_blocks(&mut front, &gens, 4096, 32).expect("verify");
    front.close().expect("close");
    assert_eq!(bed.host.live_mappings(), 0);
}

/// Whether any io_uring of this process has `path` in its registered file table (its `fdinfo` lists them).
fn in_an_io_uring_file_table(path: &std::path::Path) -> bool {
    let needle = path.to_string_lossy().into_owned();
    std::fs::read_dir("/proc/self/fdinfo").expect("fdinfo").flatten().any(|e| {
        std::fs::read_to_string(e.path()).is_ok_and(|info| info.contains("UserFiles") && info.contains(&needle))
    })
}

/// Run the child for `shape` with the completion mode capped at `mode` (`None`: the kernel's best).
fn run_child(shape: &str, mode: Option<&str>) {
    let mut command = Command::new(std::env::current_exe().expect("the test binary"));
    command.args(["--exact", "child", "--nocapture", "--test-threads=1"]).env(CHILD_ENV, shape);
    match mode {
        Some(mode) => command.env(COMPLETION_MODE_CAP, mode),
        None => command.env_remove(COMPLETION_MODE_CAP),
    };
    let mut child = command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("start the child");
    // Read on the side: a child blocked on a full pipe would look hung.
    let mut pipe = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut pipe, &mut text);
        text
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > CHILD_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{shape}, completion mode {mode:?}: the load hung (killed after {CHILD_TIMEOUT:?})");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = reader.join().unwrap_or_default();
    assert!(status.success(), "{shape}, completion mode {mode:?}: {status}\n{stderr}");
}

#[test]
fn full_engines_are_woken_in_every_completion_mode() {
    for shape in ["pool", "pool-rings-made-first", "thread-per-ring"] {
        for mode in [None, Some("cooperative"), Some("interrupting")] {
            run_child(shape, mode);
        }
    }
}
