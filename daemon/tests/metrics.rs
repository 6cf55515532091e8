// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What Prometheus sees of `blkbackd vhost-user`: the text exposition parses (with `prometheus-parse`, plus the
//! strict checks it does not make: every sample's family has `# HELP` and `# TYPE`, histogram buckets are
//! cumulative and end in `+Inf`, `_count` equals the `+Inf` bucket), the per-queue counters keep counting across
//! VMM reconnects, and `--metrics-listen` serves the same text over HTTP.

mod vhost_user_client;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use prometheus_parse::{Scrape, Value};
use vhost_user_client::daemon::blkbackd;
use vhost_user_client::{BlkClient, Daemon, Op, Scratch};

/// `n` writes and `n / 2` reads of 4 KiB on a new connection, which is closed afterwards.
fn one_connection(socket: &std::path::Path, n: u64) {
    let mut client = BlkClient::connect(socket, 1, 128, false, 1 << 20).expect("connect");
    let writes: Vec<Op> = (0..n).map(|i| Op::Write { offset: i * 4096, at: 0, len: 4096 }).collect();
    assert!(client.run(&writes, 4).iter().all(|&status| status == 0));
    let reads: Vec<Op> = (0..n / 2).map(|i| Op::Read { offset: i * 4096, at: 0, len: 4096 }).collect();
    assert!(client.run(&reads, 4).iter().all(|&status| status == 0));
}

fn stats_prometheus(control: &str) -> String {
    let out = Command::new(blkbackd()).args(["stats", "--control", control, "--prometheus"]).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// Parse `text` strictly; the samples by `name{labels}` (labels sorted, `le` kept for buckets).
fn parse_strictly(text: &str) -> HashMap<String, f64> {
    // Line by line: the grammar, and HELP then TYPE before every sample of a family.
    let (mut helped, mut typed) = (HashSet::new(), HashMap::new());
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP name text");
            assert!(!help.is_empty() && helped.insert(name.to_string()), "empty or repeated HELP: {line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(helped.contains(name), "TYPE before HELP: {line}");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(typed.insert(name.to_string(), kind.to_string()).is_none(), "repeated TYPE: {line}");
            continue;
        }
        assert!(!line.starts_with('#') && !line.is_empty(), "unexpected line {line:?}");
        let (series, value) = line.rsplit_once(' ').expect("name value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number: {line}"));
        let name = series.split('{').next().expect("name");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suffix| name.strip_suffix(suffix))
            .find(|base| typed.get(*base).is_some_and(|k| k == "histogram"))
            .unwrap_or(name);
        let kind = typed.get(family).unwrap_or_else(|| panic!("a sample without TYPE: {line}"));
        assert_eq!(kind == "counter", name.ends_with("_total"), "counters and only counters end in _total: {line}");
        let mut labels: Vec<&str> = series[name.len()..].trim_matches(['{', '}']).split(',').collect();
        labels.sort_unstable();
        assert!(samples.insert(format!("{name}{{{}}}", labels.join(",")), value).is_none(), "repeated: {line}");
    }
    // The parser agrees: types as declared, histograms grouped with their buckets in order.
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("prometheus-parse");
    assert_eq!(scrape.docs.len(), typed.len(), "{:?}", scrape.docs);
    let mut histograms = 0;
    for sample in &scrape.samples {
        match &sample.value {
            Value::Counter(_) => assert!(sample.metric.ends_with("_total"), "{}", sample.metric),
            Value::Gauge(_) => {}
            Value::Histogram(buckets) => {
                histograms += 1;
                let counts: Vec<f64> = buckets.iter().map(|b| b.count).collect();
                assert!(counts.windows(2).all(|w| w[0] <= w[1]), "not cumulative: {counts:?}");
                assert!(buckets.windows(2).all(|w| w[0].less_than < w[1].less_than), "bounds out of order");
                let last = buckets.last().expect("buckets");
                assert!(last.less_than.is_infinite(), "the last bucket is +Inf");
                let mut labels: Vec<String> = sample.labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
                labels.sort_unstable();
                let count = samples[&format!("{}_count{{{}}}", sample.metric, labels.join(","))];
                assert_eq!(count, last.count, "_count equals the +Inf bucket");
                assert!(samples.contains_key(&format!("{}_sum{{{}}}", sample.metric, labels.join(","))), "_sum");
            }
            Value::Untyped(_) => {
                assert!(sample.metric.ends_with("_sum") || sample.metric.ends_with("_count"), "{}", sample.metric)
            }
            Value::Summary(_) => panic!("no summaries expected: {}", sample.metric),
        }
    }
    assert!(histograms > 0, "no histogram parsed");
    samples
}

const QUEUE: &str = r#"queue="0",transport="vhost-user""#;

#[test]
fn counters_add_up_across_vmm_reconnects() {
    let scratch = Scratch::new(1 << 20, 0);
    let control = scratch.dir.path().join("ctl.sock");
    let control = control.to_str().expect("utf-8");
    let _daemon = Daemon::start(&scratch.socket, &scratch.disk, &["--control", control]);
    one_connection(&scratch.socket, 16);
    let first = stats_prometheus(control);
    eprintln!("after the first connection:\n{first}");
    one_connection(&scratch.socket, 8);
    // The first session's workers may still be winding down: wait for the totals rather than race them.
    let deadline = Instant::now() + Duration::from_secs(10);
    let samples = loop {
        let samples = parse_strictly(&stats_prometheus(control));
        let written = samples.get(&format!("blkbackd_written_bytes_total{{{QUEUE}}}")).copied();
        if written == Some(24.0 * 4096.0) || Instant::now() > deadline {
            break samples;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(samples[&format!("blkbackd_written_bytes_total{{{QUEUE}}}")], 24.0 * 4096.0, "{samples:?}");
    assert_eq!(samples[&format!("blkbackd_read_bytes_total{{{QUEUE}}}")], 12.0 * 4096.0);
    assert_eq!(samples[&format!(r#"blkbackd_requests_total{{op="write",{QUEUE}}}"#)], 24.0);
    assert_eq!(samples[&format!(r#"blkbackd_request_duration_seconds_count{{op="read",{QUEUE}}}"#)], 12.0);
    assert_eq!(samples[&format!("blkbackd_in_flight_requests{{{QUEUE}}}")], 0.0);
}

/// The address the daemon logged for `--metrics-listen` (port 0 there: the kernel chose).
fn logged_metrics_address(daemon: &Daemon) -> String {
    let log = daemon.stderr();
    let line = log.lines().find(|l| l.contains("metrics endpoint listening")).expect("the endpoint is logged");
    let address = line.split("address=").nth(1).expect("address field");
    address.split_whitespace().next().expect("address").to_string()
}

fn http_get(address: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(address).expect("connect to the metrics endpoint");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\n\r\n").expect("send");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("read");
    reply
}

#[test]
fn metrics_listen_serves_the_exposition_over_http() {
    let scratch = Scratch::new(1 << 20, 0);
    let control = scratch.dir.path().join("ctl.sock");
    let control = control.to_str().expect("utf-8");
    let daemon =
        Daemon::start(&scratch.socket, &scratch.disk, &["--control", control, "--metrics-listen", "127.0.0.1:0"]);
    let address = logged_metrics_address(&daemon);
    one_connection(&scratch.socket, 4);

    let reply = http_get(&address, "/metrics");
    let (head, body) = reply.split_once("\r\n\r\n").expect("head and body");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("Content-Type: text/plain; version=0.0.4"), "{head}");
    assert!(head.contains(&format!("Content-Length: {}", body.len())), "{head}");
    let samples = parse_strictly(body);
    assert_eq!(samples[&format!(r#"blkbackd_requests_total{{op="write",{QUEUE}}}"#)], 4.0, "{body}");
    assert_eq!(body, stats_prometheus(control), "the control socket and the endpoint say the same");

    assert!(http_get(&address, "/").starts_with("HTTP/1.1 404"));
    assert!(http_get(&address, "/metrics/x").starts_with("HTTP/1.1 404"));
}
