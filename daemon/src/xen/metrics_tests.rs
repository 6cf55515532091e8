// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The merged endpoint against fake workers: two that answer as a worker does (a real [`ControlServer`] over a
//! registry with Xen queue labels), one that never answers, one that floods, one that names another guest, one
//! that sends something else than an exposition. The merged text is parsed with `prometheus-parse`, as a
//! scraper would, and strictly line by line.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use device_blk::stats::{QueueStats, Registry};
use device_blk::{RequestKind, Status};
use prometheus_parse::{Sample, Scrape, Value};

use super::*;
use crate::control::ControlServer;

/// A worker's registry: `queues` queues of guest `domid`, with `reads` 4 KiB reads each.
fn worker_registry(domid: DomId, queues: usize, reads: u64) -> (Arc<Registry>, Vec<Arc<QueueStats>>) {
    let registry = Registry::new();
    let mut held = Vec::new();
    for queue in 0..queues {
        let stats = Arc::new(QueueStats::default());
        for _ in 0..reads {
            stats.started();
            stats.finished(RequestKind::Read, Duration::from_micros(80), 4096, Status::Ok, None);
        }
        stats.bytes_written.fetch_add(512 * (u64::from(domid)), Ordering::Relaxed);
        let labels = vec![("transport", "xen".to_string()), ("domid", domid.to_string()), ("queue", queue.to_string())];
        registry.register(labels, &stats);
        held.push(stats);
    }
    (registry, held)
}

/// A fake worker's control socket that reads the request, then answers `reply` (or nothing, holding the
/// connection) and closes.
fn fake_worker(path: &Path, reply: Option<Vec<u8>>) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(path).expect("bind");
    std::thread::spawn(move || {
        let Ok((mut stream, _)) = listener.accept() else { return };
        let mut line = [0u8; 17];
        let _ = stream.read_exact(&mut line);
        match reply {
            Some(reply) => {
                let _ = stream.write_all(&reply);
            }
            // Silent: hold the connection until the supervisor gives up on it (it closes its end).
            None => {
                let mut rest = Vec::new();
                let _ = stream.read_to_end(&mut rest);
            }
        }
    })
}

/// Every sample of `scrape` by `name{labels sorted}`.
fn by_series(scrape: &Scrape) -> BTreeMap<String, Value> {
    scrape
        .samples
        .iter()
        .map(|Sample { metric, labels, value, .. }| {
            let mut labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            (format!("{metric}{{{}}}", labels.join(",")), value.clone())
        })
        .collect()
}

fn gauge(samples: &BTreeMap<String, Value>, series: &str) -> f64 {
    match samples.get(series) {
        Some(Value::Gauge(v) | Value::Counter(v) | Value::Untyped(v)) => *v,
        other => panic!("{series}: {other:?}"),
    }
}

#[test]
fn every_guest_is_merged_under_one_help_and_hostile_workers_are_left_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = |domid: DomId| dir.path().join(format!("dom{domid}.ctl"));
    // Guests 1 and 2: real control servers, as the workers run them.
    let (r1, _q1) = worker_registry(1, 2, 3);
    let mut c1 = ControlServer::bind(&socket(1), r1).expect("bind");
    c1.start().expect("start");
    let (r2, _q2) = worker_registry(2, 1, 5);
    let mut c2 = ControlServer::bind(&socket(2), r2).expect("bind");
    c2.start().expect("start");
    // Guest 3 never answers; guest 4 floods; guest 5 claims to be guest 1 (and adds a label of its own);
    // guest 6 answers something else; guest 7's socket is gone.
    let silent = fake_worker(&socket(3), None);
    let flood = fake_worker(&socket(4), Some(vec![b'#'; 3 << 20]));
    let liar = fake_worker(
        &socket(5),
        Some(
            b"# HELP blkbackd_read_bytes_total whatever it likes\n# TYPE blkbackd_read_bytes_total counter\n\
              blkbackd_read_bytes_total{transport=\"xen\",domid=\"1\",queue=\"0\",note=\"a \\\"quoted\\\" value\"} 1e3\n"
                .to_vec(),
        ),
    );
    let junk = fake_worker(&socket(6), Some(b"blkbackd_read_bytes_total{queue=\"0\"} -1\n".to_vec()));

    let view = FleetView {
        workers: (1..=7).map(|d| (d, socket(d))).collect(),
        vbds: [(1, 2), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1), (7, 1)].into(),
        restarts: [(2, 3)].into(),
        grants: [(1, grant_figures(1056, 65_536, 0, 1)), (2, grant_figures(8, 8, 40, 6))].into(),
    };
    let families = Families::of_this_build();
    let text = scrape_and_render(&families, &Mutex::new(view), &Limits::DEFAULT);
    for handle in [silent, flood, liar, junk] {
        handle.join().expect("fake worker");
    }

    // Each HELP and TYPE once; every sample under its family's TYPE.
    let mut helps = BTreeSet::new();
    let mut typed = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            assert!(helps.insert(rest.split(' ').next().expect("name").to_string()), "HELP twice: {line}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            assert!(typed.insert(rest.split(' ').next().expect("name").to_string()), "TYPE twice: {line}");
        } else {
            let name = line.split(['{', ' ']).next().expect("name");
            let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
            assert!(typed.contains(name) || typed.contains(family), "a sample before its TYPE: {line}");
        }
    }
    assert_eq!(helps, typed);
    assert!(helps.contains("blkbackd_request_duration_seconds") && helps.contains("blkbackd_xen_workers"));

    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("prometheus-parse");
    let samples = by_series(&scrape);
    let domids: BTreeSet<&str> = scrape.samples.iter().filter_map(|s| s.labels.get("domid")).collect();
    assert_eq!(domids, ["1", "2", "3", "4", "5", "6", "7"].into(), "{text}");

    // Guests 1 and 2: their numbers, under their own domid.
    for queue in ["0", "1"] {
        let read = format!("blkbackd_requests_total{{domid=1,op=read,queue={queue},transport=xen}}");
        assert_eq!(gauge(&samples, &read), 3.0, "{text}");
        let bytes = format!("blkbackd_read_bytes_total{{domid=1,queue={queue},transport=xen}}");
        assert_eq!(gauge(&samples, &bytes), 3.0 * 4096.0);
    }
    assert_eq!(gauge(&samples, "blkbackd_read_bytes_total{domid=2,queue=0,transport=xen}"), 5.0 * 4096.0);
    assert_eq!(gauge(&samples, "blkbackd_written_bytes_total{domid=2,queue=0,transport=xen}"), 1024.0);
    match samples.get("blkbackd_request_duration_seconds{domid=2,op=read,queue=0,transport=xen}") {
        Some(Value::Histogram(buckets)) => {
            assert_eq!(buckets.last().map(|b| (b.less_than, b.count)), Some((f64::INFINITY, 5.0)));
        }
        other => panic!("guest 2's read histogram: {other:?}\n{text}"),
    }
    // Guest 5 lied about its domid: its one sample is its own, relabelled; its HELP text is not passed on; its
    // label value is escaped again (prometheus-parse keeps the escapes as they are).
    assert_eq!(
        gauge(&samples, r#"blkbackd_read_bytes_total{domid=5,note=a \"quoted\" value,queue=0,transport=xen}"#),
        1000.0
    );
    assert!(samples.keys().all(|k| !(k.contains("domid=1,") && k.contains("note="))), "{text}");
    assert!(!text.contains("whatever it likes"));

    // The supervisor's series: workers, vbds, restarts, and whose statistics this scrape has.
    assert_eq!(gauge(&samples, "blkbackd_xen_workers{}"), 7.0);
    assert_eq!(gauge(&samples, "blkbackd_xen_vbds{domid=1}"), 2.0);
    assert_eq!(gauge(&samples, "blkbackd_xen_worker_restarts_total{domid=2}"), 3.0);
    assert_eq!(gauge(&samples, "blkbackd_xen_worker_restarts_total{domid=1}"), 0.0);
    // The grant pages each broker charges its worker (read from its ledger at the scrape, not from the worker).
    for (series, one, two) in [
        ("blkbackd_xen_worker_grant_pages", 1056.0, 8.0),
        ("blkbackd_xen_worker_grant_pages_budget", 65_536.0, 8.0),
        ("blkbackd_xen_worker_grant_maps_refused_total", 0.0, 40.0),
        ("blkbackd_xen_worker_grant_reclaims_total", 1.0, 6.0),
    ] {
        assert_eq!(gauge(&samples, &format!("{series}{{domid=1}}")), one, "{text}");
        assert_eq!(gauge(&samples, &format!("{series}{{domid=2}}")), two, "{text}");
        assert!(!samples.contains_key(&format!("{series}{{domid=3}}")), "guest 3 has no ledger in the view");
    }
    let ok: Vec<(DomId, f64)> =
        (1..=7).map(|d| (d, gauge(&samples, &format!("blkbackd_xen_worker_scrape_ok{{domid={d}}}")))).collect();
    assert_eq!(ok, [(1, 1.0), (2, 1.0), (3, 0.0), (4, 0.0), (5, 1.0), (6, 0.0), (7, 0.0)], "{text}");
    // Nothing of the flood, the junk or the silent guest's samples.
    for d in [3, 4, 6, 7] {
        let own = format!("domid={d}");
        assert!(
            samples.keys().all(|k| !k.contains(&own) || k.starts_with("blkbackd_xen_")),
            "guest {d} has worker samples:\n{text}"
        );
    }
}

/// A ledger's figures as a broker would have left them.
fn grant_figures(pages: u64, budget: u64, refused: u64, reclaims: u64) -> SharedGrantFigures {
    let figures = GrantFigures::default();
    let fields = [
        (&figures.pages, pages),
        (&figures.budget, budget),
        (&figures.refused, refused),
        (&figures.reclaims, reclaims),
    ];
    for (field, value) in fields {
        field.store(value, Ordering::Relaxed);
    }
    SharedGrantFigures(Arc::new(figures))
}

#[test]
fn a_worker_answer_is_checked_line_by_line() {
    let families = Families::of_this_build();
    let ok = |text: &str| families.parse_worker(text.as_bytes(), 9);
    let bad = |text: &str| match families.parse_worker(text.as_bytes(), 9) {
        Err(ScrapeError::Malformed { what, .. }) => what,
        other => panic!("{text:?} accepted: {other:?}"),
    };
    // The worker's own rendering is accepted, and comes out the same but for the forced domid.
    let (registry, _held) = worker_registry(9, 1, 2);
    let own = registry.render_prometheus();
    let parsed = ok(&own).expect("a worker's exposition");
    let merged = families.render(&FleetView::default(), &[(9, Ok(parsed))]);
    for line in own.lines().filter(|l| !l.starts_with('#')) {
        assert!(merged.lines().any(|m| m == line), "{line} missing from\n{merged}");
    }
    // A domid added where there was none.
    let parsed = ok("blkbackd_in_flight_requests{transport=\"xen\",queue=\"0\"} 2\n").expect("no domid");
    assert_eq!(parsed.by_family[0], ["blkbackd_in_flight_requests{transport=\"xen\",domid=\"9\",queue=\"0\"} 2"]);

    assert!(bad("blkbackd_evil_total 1\n").contains("unknown family"));
    assert!(bad("# TYPE blkbackd_read_bytes_total gauge\n").contains("TYPE"));
    assert!(bad("# HELP process_cpu_seconds_total x\n").contains("HELP"));
    assert!(bad("# EOF\n").contains("comment"));
    assert!(bad("blkbackd_read_bytes_total NaN\n").contains("not finite"));
    assert!(bad("blkbackd_read_bytes_total +Inf\n").contains("not finite"));
    assert!(bad("blkbackd_read_bytes_total -3\n").contains("negative"));
    assert!(bad("blkbackd_read_bytes_total 1 1700000000\n").contains("timestamp"));
    assert!(bad("blkbackd_read_bytes_total{queue=\"0\"}\n").contains("space"));
    assert!(bad("blkbackd_read_bytes_total{queue=\"0} 1\n").contains("unterminated"));
    assert!(bad("blkbackd_read_bytes_total{queue=\"\u{1b}\"} 1\n").contains("control"));
    assert!(bad("blkbackd_read_bytes_total{queue=\"0\",queue=\"1\"} 1\n").contains("repeated"));
    assert!(bad("blkbackd_read_bytes_total{__name__=\"x\"} 1\n").contains("label name"));
    assert!(bad(&format!("blkbackd_read_bytes_total{{q=\"{}\"}} 1\n", "x".repeat(200))).contains("too long"));
    let many: Vec<String> = (0..17).map(|i| format!("l{i}=\"v\"")).collect();
    assert!(bad(&format!("blkbackd_read_bytes_total{{{}}} 1\n", many.join(","))).contains("too many"));
    assert!(bad("blkbackd_read_bytes_total{queue=\"0\"} 1\nblkbackd_read_bytes_total{queue=\"0\"} 2\n")
        .contains("repeated"));
    // Another guest's domid is the same series as the worker's own once relabelled: a repeat.
    assert!(bad("blkbackd_read_bytes_total{domid=\"1\"} 1\nblkbackd_read_bytes_total{domid=\"9\"} 2\n")
        .contains("repeated"));
    assert!(bad("blkbackd_request_duration_seconds_bucket{op=\"read\"} 1\n").contains("le"));
    assert!(bad("blkbackd_request_duration_seconds{op=\"read\"} 1\n").contains("unknown family"));
    assert!(matches!(families.parse_worker(b"\xff\xfe", 9), Err(ScrapeError::Malformed { line: 0, .. })));
    let lots: String = (0..=MAX_SAMPLES).map(|i| format!("blkbackd_in_flight_requests{{queue=\"{i}\"}} 0\n")).collect();
    assert!(bad(&lots).contains("samples"));
}

#[test]
fn the_endpoint_serves_the_merge_over_http() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path: PathBuf = dir.path().join("dom4.ctl");
    let (registry, _held) = worker_registry(4, 1, 1);
    let mut control = ControlServer::bind(&path, registry).expect("bind");
    control.start().expect("start");
    let fleet: SharedFleet = Arc::new(Mutex::new(FleetView::default()));
    let addr: MetricsAddr = "127.0.0.1:0".parse().expect("addr");
    let mut server = endpoint(&addr, Arc::clone(&fleet)).expect("bind");
    server.start().expect("start");
    let MetricsAddr::Tcp(bound) = server.address.clone() else { panic!("tcp") };
    let get = || {
        let mut stream = std::net::TcpStream::connect(bound).expect("connect");
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
        let mut reply = String::new();
        stream.read_to_string(&mut reply).expect("read");
        reply
    };
    let empty = get();
    assert!(empty.starts_with("HTTP/1.1 200 OK") && empty.contains("\nblkbackd_xen_workers 0\n"), "{empty}");
    fleet.lock().expect("lock").workers.insert(4, path);
    let one = get();
    assert!(
        one.contains("blkbackd_requests_total{transport=\"xen\",domid=\"4\",queue=\"0\",op=\"read\"} 1\n"),
        "{one}"
    );
    assert!(one.contains("blkbackd_xen_worker_scrape_ok{domid=\"4\"} 1\n"), "{one}");
}
