// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Reading a frontend's connection parameters from xenstore (`transport_xen::xenbus::frontend_nodes::
//! read_connect_config`): `protocol`, `feature-persistent`, `multi-queue-num-queues`, `ring-page-order`, and per
//! queue `event-channel` and `ring-ref` / `ring-refN`, at the root or under `queue-N/`, each present with a
//! fuzzed value, absent, or failing to read (EACCES, EAGAIN, EIO), against what the backend advertised.
//!
//! Layout: `u8` max queues, `u8` max ring page order, `u16` max indirect segments, `u8` persistent grants
//! offered, then nodes until the input ends: `u8` node selector, `u8` kind (0 value, 1 EACCES, 2 EAGAIN, 3 EIO),
//! `u8`-length value.
//!
//! Invariants: the result is a configuration exactly when every node a model of Linux blkback's reading reads is
//! present and valid, and then it is the model's configuration; counts are bounded before use: no more nodes are
//! read than the advertised maxima allow; store errors other than EACCES come back as store errors, frontend
//! faults as a `Fatal` with a positive errno.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};

use transport_xen::connect::{ConnectConfig, QueueRing};
use transport_xen::services::{Permission, TxId, WatchEvent, XenError, XenStore};
use transport_xen::xenbus::frontend_nodes::{read_connect_config, Advertised};
use transport_xen::xenbus::nodes;

use crate::input::{Reader, Writer};

const FRONTEND: &str = "/local/domain/7/device/vbd/51712";

/// The node names the selector picks from, and their full paths (built once per process: the names are the
/// same for every input).
fn node_names() -> &'static [(String, String)] {
    static NAMES: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();
    NAMES.get_or_init(|| build_node_names().into_iter().map(|n| (format!("{FRONTEND}/{n}"), n)).collect())
}

fn build_node_names() -> Vec<String> {
    let mut names: Vec<String> =
        ["protocol", "feature-persistent", "multi-queue-num-queues", "ring-page-order"].map(String::from).to_vec();
    for dir in ["".to_string(), "queue-0/".into(), "queue-1/".into(), "queue-2/".into(), "queue-3/".into()] {
        names.push(format!("{dir}event-channel"));
        names.push(format!("{dir}ring-ref"));
        names.extend((0..16).map(|i| format!("{dir}ring-ref{i}")));
    }
    names
}

/// An in-memory xenstore that only reads, and counts the reads.
#[derive(Debug, Default)]
struct Nodes {
    map: HashMap<String, Result<Vec<u8>, XenError>>,
    reads: AtomicUsize,
}

impl Nodes {
    fn get(&self, name: &str) -> Option<&Result<Vec<u8>, XenError>> {
        self.map.get(&format!("{FRONTEND}/{name}"))
    }
}

fn refused() -> XenError {
    XenError::Os { what: "not a reading call".into(), errno: libc::EINVAL }
}

impl XenStore for Nodes {
    fn read(&self, _tx: TxId, path: &str) -> Result<Vec<u8>, XenError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.map.get(path).cloned().unwrap_or_else(|| Err(XenError::NotFound { path: path.into() }))
    }
    fn write(&self, _: TxId, _: &str, _: &[u8]) -> Result<(), XenError> {
        Err(refused())
    }
    fn mkdir(&self, _: TxId, _: &str) -> Result<(), XenError> {
        Err(refused())
    }
    fn rm(&self, _: TxId, _: &str) -> Result<(), XenError> {
        Err(refused())
    }
    fn directory(&self, _: TxId, _: &str) -> Result<Vec<String>, XenError> {
        Err(refused())
    }
    fn get_perms(&self, _: TxId, _: &str) -> Result<Vec<Permission>, XenError> {
        Err(refused())
    }
    fn set_perms(&self, _: TxId, _: &str, _: &[Permission]) -> Result<(), XenError> {
        Err(refused())
    }
    fn transaction_start(&self) -> Result<TxId, XenError> {
        Err(refused())
    }
    fn transaction_end(&self, _: TxId, _: bool) -> Result<(), XenError> {
        Err(refused())
    }
    fn watch(&self, _: &str, _: &str) -> Result<(), XenError> {
        Err(refused())
    }
    fn unwatch(&self, _: &str, _: &str) -> Result<(), XenError> {
        Err(refused())
    }
    fn watch_fd(&self) -> RawFd {
        -1
    }
    fn take_watch_events(&self, _: &mut Vec<WatchEvent>) -> Result<(), XenError> {
        Ok(())
    }
}

/// The model: Linux blkback's reading of the frontend nodes; `None` when any node read is missing (where
/// required), unreadable or invalid.
fn model(store: &Nodes, adv: Advertised) -> Option<ConnectConfig> {
    let value = |name: &str| -> Result<Option<&[u8]>, ()> {
        match store.get(name) {
            None => Ok(None),
            Some(Ok(v)) => Ok(Some(v)),
            Some(Err(_)) => Err(()),
        }
    };
    let abi = nodes::parse_protocol(value("protocol").ok()?).ok()?;
    let persistent = match value("feature-persistent").ok()? {
        None => false,
        Some(v) => nodes::parse_flag("feature-persistent", v).ok()?,
    };
    let num_queues = nodes::parse_num_queues(value("multi-queue-num-queues").ok()?, adv.max_queues).ok()?;
    let order = match value("ring-page-order").ok()? {
        None => None,
        Some(v) => Some(nodes::parse_ring_page_order(v, adv.max_ring_page_order).ok()?),
    };
    let mut queues = Vec::new();
    for q in 0..num_queues {
        let dir = if num_queues == 1 { String::new() } else { format!("queue-{q}/") };
        let remote_port =
            nodes::parse_event_channel("event-channel", value(&format!("{dir}event-channel")).ok()??).ok()?;
        let names: Vec<String> = match order {
            None => vec!["ring-ref".into()],
            Some(o) => (0..1u32 << o).map(|i| format!("ring-ref{i}")).collect(),
        };
        let mut ring_refs = Vec::new();
        for n in names {
            ring_refs.push(nodes::parse_ring_ref(&n, value(&format!("{dir}{n}")).ok()??).ok()?);
        }
        queues.push(QueueRing { ring_refs, remote_port });
    }
    Some(ConnectConfig {
        frontend_domid: 7,
        abi,
        queues,
        persistent_grants: persistent && adv.persistent_grants,
        max_indirect_segments: adv.max_indirect_segments,
    })
}

/// Run one input.
pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let adv = Advertised {
        max_queues: u32::from(r.u8() % 8),
        max_ring_page_order: u32::from(r.u8() % 8),
        max_indirect_segments: u32::from(r.u16()),
        persistent_grants: r.bool(),
    };
    let names = node_names();
    let mut store = Nodes::default();
    while !r.is_empty() {
        let (path, name) = &names[usize::from(r.u8()) % names.len()];
        let kind = r.u8() % 4;
        let value = r.short_bytes().to_vec();
        let entry = match kind {
            0 => Ok(value),
            1 => Err(XenError::Access { what: name.clone() }),
            2 => Err(XenError::Again),
            _ => Err(XenError::Os { what: name.clone(), errno: libc::EIO }),
        };
        store.map.insert(path.clone(), entry);
    }

    let got = read_connect_config(&store, TxId(9), FRONTEND, 7, adv);
    let want = model(&store, adv);
    let reads = store.reads.load(Ordering::Relaxed);
    let max_reads = 4 + adv.max_queues.max(1) as usize * (1 + (1usize << adv.max_ring_page_order));
    assert!(reads <= max_reads, "{reads} reads with {adv:?}");
    match got {
        Ok(Ok(config)) => {
            assert_eq!(Some(&config), want.as_ref(), "configuration differs from the model");
            assert!(!config.queues.is_empty() && config.queues.len() as u32 <= adv.max_queues.max(1));
            for q in &config.queues {
                assert!(q.remote_port != 0);
                assert!(q.ring_refs.len().is_power_of_two() && q.ring_refs.len() <= 1 << adv.max_ring_page_order);
            }
        }
        Ok(Err(fatal)) => {
            assert!(want.is_none(), "refused a valid frontend: {fatal:?}");
            assert!(fatal.errno > 0, "{fatal:?}");
        }
        Err(e) => {
            assert!(want.is_none(), "store error {e:?} for a readable frontend");
            assert!(
                !matches!(e, XenError::Access { .. } | XenError::NotFound { .. }),
                "{e:?} must be the guest's fault"
            );
            let store_errors = store.map.values().any(|v| matches!(v, Err(XenError::Again | XenError::Os { .. })));
            assert!(store_errors, "store error {e:?} without one injected");
        }
    }
}

/// Seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    let names = node_names();
    let sel = |n: &str| names.iter().position(|(_, x)| x == n).expect("node") as u8;
    let node = |w: &mut Writer, n: &str, kind: u8, v: &[u8]| {
        w.u8(sel(n)).u8(kind).short_bytes(v);
    };
    let mut out = Vec::new();

    let mut w = Writer::new();
    w.u8(4).u8(4).u16(256).u8(1);
    node(&mut w, "protocol", 0, b"x86_64-abi");
    node(&mut w, "feature-persistent", 0, b"1");
    node(&mut w, "event-channel", 0, b"17");
    node(&mut w, "ring-ref", 0, b"8");
    out.push(w.finish());

    let mut w = Writer::new();
    w.u8(4).u8(4).u16(0).u8(0);
    node(&mut w, "multi-queue-num-queues", 0, b"2");
    node(&mut w, "ring-page-order", 0, b"1");
    for q in 0..2 {
        node(&mut w, &format!("queue-{q}/event-channel"), 0, format!("{}", 20 + q).as_bytes());
        node(&mut w, &format!("queue-{q}/ring-ref0"), 0, b"8");
        node(&mut w, &format!("queue-{q}/ring-ref1"), 0, b"9");
    }
    out.push(w.finish());

    let mut w = Writer::new();
    w.u8(1).u8(0).u16(0).u8(0);
    node(&mut w, "protocol", 0, b"arm-abi");
    node(&mut w, "multi-queue-num-queues", 0, b"3");
    node(&mut w, "ring-page-order", 0, b"9");
    node(&mut w, "event-channel", 1, b"");
    node(&mut w, "ring-ref", 2, b"");
    out.push(w.finish());
    out
}
