// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! CPU time and wake-ups of this process's threads, from `/proc/self/task` (the Xen benchmarks run the backend
//! and the emulated guest in one process and tell their threads apart by name).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

/// CPU time and wake-ups (voluntary context switches: the thread slept and was woken) of some threads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    pub(crate) cpu: Duration,
    pub(crate) wakeups: u64,
}

impl std::ops::Add for Usage {
    type Output = Usage;
    fn add(self, o: Usage) -> Usage {
        Usage { cpu: self.cpu + o.cpu, wakeups: self.wakeups + o.wakeups }
    }
}

impl std::ops::Sub for Usage {
    type Output = Usage;
    fn sub(self, o: Usage) -> Usage {
        Usage { cpu: self.cpu.saturating_sub(o.cpu), wakeups: self.wakeups.saturating_sub(o.wakeups) }
    }
}

impl std::iter::Sum for Usage {
    fn sum<I: Iterator<Item = Usage>>(iter: I) -> Usage {
        iter.fold(Usage::default(), |a, b| a + b)
    }
}

/// CPU time and wake-ups of this process's data-plane worker threads (`blkif-*`).
pub(crate) fn worker_usage() -> Result<Usage> {
    let mut total = Usage::default();
    for entry in std::fs::read_dir("/proc/self/task")? {
        let dir = entry?.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else { continue };
        if comm.starts_with("blkif-") {
            // A worker may end between the listing and the reads: it counts for nothing then.
            total = total + usage(&dir).unwrap_or_default();
        }
    }
    Ok(total)
}

/// CPU time and wake-ups of the calling thread.
pub(crate) fn thread_usage() -> Result<Usage> {
    usage(Path::new("/proc/thread-self"))
}

/// A thread's usage from its `/proc/<pid>/task/<tid>` directory: CPU time from `schedstat` (ns on CPU), wake-ups
/// from `status` (voluntary context switches; preemptions by other work on the machine are not counted).
pub(crate) fn usage(dir: &Path) -> Result<Usage> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    let ns: u64 = read("schedstat")?.split_whitespace().next().context("empty schedstat")?.parse()?;
    let wakeups = read("status")?
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .context("no voluntary_ctxt_switches in status")?;
    Ok(Usage { cpu: Duration::from_nanos(ns), wakeups })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn thread_usage_comes_from_proc() {
        let before = thread_usage().expect("own usage");
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(20) {
            std::hint::spin_loop();
        }
        let used = thread_usage().expect("own usage") - before;
        assert!(used.cpu >= Duration::from_millis(5), "{used:?}");
        assert_eq!(worker_usage().expect("no workers"), Usage::default(), "no blkif-* thread in this test");
    }
}
