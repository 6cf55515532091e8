// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `blkbackd xen --metrics-listen ADDR`: one Prometheus endpoint for every guest.
//!
//! Design: the supervisor serves `GET /metrics` itself ([`crate::metrics_http`], on a thread of its own: the main
//! loop never waits for it) and, at each scrape, asks every live worker for its exposition over the control socket
//! it already creates for it (`--control-dir DIR`, `DIR/dom<D>.ctl`; hence `--metrics-listen` requires
//! `--control-dir`: no second channel per worker, and `blkbackd stats --control` reads the same numbers). The
//! main loop only publishes a [`FleetView`] (workers, vbds, restarts) under a mutex after each round; the
//! endpoint's thread copies it and does the slow part, [`scrape::scrape_all`], without holding anything.
//!
//! A worker is guest-controlled code once its guest took it over, so its answer is never passed on as it came:
//! it is read within a deadline and a byte bound ([`scrape::Limits`]), parsed line by line against the families
//! this very build renders (the supervisor runs the same executable: an empty [`Registry`] gives their names,
//! types and help), and every sample is rendered again from the parsed name, labels and number. A `domid` label
//! is forced to the worker's own guest (a worker cannot speak for another guest); anything unexpected (an unknown
//! family or `# TYPE`, a malformed line, a number that is negative or not finite, a repeated series, more than
//! [`MAX_SAMPLES`] samples, a label value over [`MAX_LABEL_VALUE`] bytes) drops that worker's samples from this
//! scrape, logs why, and sets `blkbackd_xen_worker_scrape_ok{domid}` to 0; other guests are not affected.
//!
//! The merged text has each `# HELP`/`# TYPE` once, with every guest's samples under it, then the supervisor's
//! own series: `blkbackd_xen_workers`, `blkbackd_xen_vbds{domid}`, `blkbackd_xen_worker_restarts_total{domid}`,
//! `blkbackd_xen_worker_scrape_ok{domid}`, and the grant pages each worker's broker charges it
//! (`blkbackd_xen_worker_grant_*{domid}`, read from the broker's ledger: a worker cannot change them). A worker's
//! counters live in the worker: when it dies and a new one takes the guest over, that guest's `blkbackd_*_total`
//! counters start again from 0. Prometheus treats that as a counter reset (`rate()` and `increase()` stay right);
//! `blkbackd_xen_worker_restarts_total` says when it happened.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use device_blk::stats::Registry;
use transport_xen::separation::grants::GrantFigures;
use transport_xen::services::DomId;

use super::scrape::{self, Limits, ScrapeError};
use crate::metrics_http::{MetricsAddr, MetricsServer};

/// The most samples taken from one worker (a queue renders under a hundred).
pub const MAX_SAMPLES: usize = 65_536;
/// The most labels on one sample.
pub const MAX_LABELS: usize = 16;
/// The longest label value, in bytes.
pub const MAX_LABEL_VALUE: usize = 128;

/// What the supervisor knows of its guests, published by its main loop for the endpoint's thread.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetView {
    /// Each running worker's control socket.
    pub workers: BTreeMap<DomId, PathBuf>,
    /// The vbds of each guest in scope that has any.
    pub vbds: BTreeMap<DomId, usize>,
    /// Each guest's worker deaths that were not asked for (while the guest has vbds).
    pub restarts: BTreeMap<DomId, u64>,
    /// Each running worker's grant pages, as its broker keeps them (not with `--direct-grants`).
    pub grants: BTreeMap<DomId, SharedGrantFigures>,
}

/// A worker's grant figures ([`GrantFigures`]), read at each scrape; views compare them by identity.
#[derive(Clone, Debug)]
pub struct SharedGrantFigures(pub Arc<GrantFigures>);

impl PartialEq for SharedGrantFigures {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SharedGrantFigures {}

/// The view the main loop updates and the endpoint reads.
pub type SharedFleet = Arc<Mutex<FleetView>>;

/// Bind the endpoint at `addr` (started with [`MetricsServer::start`]).
pub fn endpoint(addr: &MetricsAddr, fleet: SharedFleet) -> anyhow::Result<MetricsServer> {
    let families = Families::of_this_build();
    MetricsServer::bind_with(addr, Arc::new(move || scrape_and_render(&families, &fleet, &Limits::DEFAULT)))
}

/// One scrape: every live worker's exposition, checked and merged, and the supervisor's series.
pub fn scrape_and_render(families: &Families, fleet: &Mutex<FleetView>, limits: &Limits) -> String {
    let view = fleet.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let targets: Vec<(DomId, PathBuf)> = view.workers.iter().map(|(&d, p)| (d, p.clone())).collect();
    let answers = scrape::scrape_all(&targets, limits)
        .into_iter()
        .map(|(domid, answer)| {
            let parsed = answer.and_then(|text| families.parse_worker(&text, domid));
            if let Err(error) = &parsed {
                tracing::warn!(domid, %error, "metrics: the worker's statistics are left out of this scrape");
            }
            (domid, parsed)
        })
        .collect::<Vec<_>>();
    families.render(&view, &answers)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn parse(text: &str) -> Option<Kind> {
        match text {
            "counter" => Some(Kind::Counter),
            "gauge" => Some(Kind::Gauge),
            "histogram" => Some(Kind::Histogram),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

#[derive(Debug)]
struct Family {
    name: String,
    kind: Kind,
    help: String,
}

/// The families a worker renders, as this build renders them.
#[derive(Debug)]
pub struct Families {
    list: Vec<Family>,
}

/// One worker's samples, rendered again, by family (in [`Families`]' order).
#[derive(Debug)]
pub struct WorkerSamples {
    by_family: Vec<Vec<String>>,
}

impl Families {
    /// From the `# HELP` and `# TYPE` lines of an empty registry's exposition.
    pub fn of_this_build() -> Families {
        let text = Registry::new().render_prometheus();
        let mut list: Vec<Family> = Vec::new();
        for line in text.lines() {
            if let Some((name, help)) = line.strip_prefix("# HELP ").and_then(|r| r.split_once(' ')) {
                list.push(Family { name: name.to_string(), kind: Kind::Gauge, help: help.to_string() });
            } else if let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|r| r.split_once(' ')) {
                if let (Some(family), Some(kind)) = (list.iter_mut().find(|f| f.name == name), Kind::parse(kind)) {
                    family.kind = kind;
                }
            }
        }
        Families { list }
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.list.iter().position(|f| f.name == name)
    }

    /// The family of a sample name (a histogram's `_bucket`, `_sum`, `_count` included), and whether it is a
    /// bucket.
    fn family_of(&self, sample: &str) -> Option<(usize, bool)> {
        if let Some(index) = self.index(sample).filter(|&i| self.list[i].kind != Kind::Histogram) {
            return Some((index, false));
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = sample.strip_suffix(suffix)?;
            let index = self.index(base).filter(|&i| self.list[i].kind == Kind::Histogram)?;
            Some((index, *suffix == "_bucket"))
        })
    }

    /// Check `text`, a worker's answer, line by line, and render its samples again with `domid` as their guest.
    pub fn parse_worker(&self, text: &[u8], domid: DomId) -> Result<WorkerSamples, ScrapeError> {
        let text = std::str::from_utf8(text).map_err(|e| malformed(0, format!("not UTF-8 ({e})")))?;
        let mut by_family = vec![Vec::new(); self.list.len()];
        let mut seen = BTreeSet::new();
        let mut relabelled = 0usize;
        for (number, line) in text.split('\n').enumerate().map(|(i, l)| (i + 1, l)) {
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap_or_default();
                self.index(name).ok_or_else(|| malformed(number, "HELP of a family this build does not have"))?;
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').ok_or_else(|| malformed(number, "TYPE without a type"))?;
                let index = self.index(name).ok_or_else(|| malformed(number, "TYPE of an unknown family"))?;
                if Kind::parse(kind) != Some(self.list[index].kind) {
                    return Err(malformed(number, "TYPE other than this build's"));
                }
                continue;
            }
            if line.starts_with('#') {
                return Err(malformed(number, "a comment other than HELP or TYPE"));
            }
            let (name, mut labels, value) = parse_sample(line).map_err(|what| malformed(number, what))?;
            let (index, bucket) =
                self.family_of(name).ok_or_else(|| malformed(number, "a sample of an unknown family"))?;
            if bucket != labels.iter().any(|(k, _)| *k == "le") {
                return Err(malformed(number, "`le` on a sample other than a bucket, or a bucket without it"));
            }
            let own = domid.to_string();
            match labels.iter_mut().find(|(k, _)| *k == "domid") {
                Some((_, v)) if *v != own => {
                    *v = own;
                    relabelled += 1;
                }
                Some(_) => {}
                None => {
                    let at = labels.iter().position(|(k, _)| *k == "transport").map_or(0, |i| i + 1);
                    labels.insert(at, ("domid", own));
                }
            }
            let mut series = name.to_string();
            render_labels(&mut series, labels.iter().map(|(k, v)| (*k, v.as_str())));
            if !seen.insert(series.clone()) {
                return Err(malformed(number, "a series repeated"));
            }
            if seen.len() > MAX_SAMPLES {
                return Err(malformed(number, format!("more than {MAX_SAMPLES} samples")));
            }
            let _ = write!(series, " {value}");
            by_family[index].push(series);
        }
        if relabelled > 0 {
            tracing::warn!(domid, samples = relabelled, "metrics: the worker named another guest; relabelled");
        }
        Ok(WorkerSamples { by_family })
    }

    /// The merged exposition: each worker family once with every guest's samples, then the supervisor's.
    pub fn render(&self, view: &FleetView, answers: &[(DomId, Result<WorkerSamples, ScrapeError>)]) -> String {
        let mut out = String::new();
        for (index, family) in self.list.iter().enumerate() {
            header(&mut out, &family.name, family.kind, &family.help);
            for samples in answers.iter().filter_map(|(_, a)| a.as_ref().ok()) {
                for line in &samples.by_family[index] {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        header(&mut out, "blkbackd_xen_workers", Kind::Gauge, "Worker processes running, one per guest with vbds.");
        let _ = writeln!(out, "blkbackd_xen_workers {}", view.workers.len());
        header(&mut out, "blkbackd_xen_vbds", Kind::Gauge, "The guest's vbds under backend/vbd.");
        for (domid, n) in &view.vbds {
            let _ = writeln!(out, "blkbackd_xen_vbds{{domid=\"{domid}\"}} {n}");
        }
        header(
            &mut out,
            "blkbackd_xen_worker_restarts_total",
            Kind::Counter,
            "Deaths of the guest's worker that were not asked for (each followed by a new worker, unless it died more \
             than 5 times in a minute). A new worker's blkbackd_* counters start again from 0 (a counter reset).",
        );
        let restarts = view.vbds.keys().chain(view.workers.keys()).collect::<BTreeSet<_>>();
        for domid in restarts {
            let n = view.restarts.get(domid).copied().unwrap_or(0);
            let _ = writeln!(out, "blkbackd_xen_worker_restarts_total{{domid=\"{domid}\"}} {n}");
        }
        render_grants(&mut out, &view.grants);
        header(
            &mut out,
            "blkbackd_xen_worker_scrape_ok",
            Kind::Gauge,
            "1 if this scrape has the guest's worker's statistics; 0 if they are left out (no answer in time, too \
             large or malformed: the supervisor's log says why).",
        );
        for (domid, answer) in answers {
            let _ = writeln!(out, "blkbackd_xen_worker_scrape_ok{{domid=\"{domid}\"}} {}", u8::from(answer.is_ok()));
        }
        out
    }
}

/// One of a ledger's figures.
type GrantField = fn(&GrantFigures) -> &AtomicU64;

/// Each worker's grant figures, as its broker keeps them: the only figures of a worker that do not come from the
/// worker itself.
fn render_grants(out: &mut String, grants: &BTreeMap<DomId, SharedGrantFigures>) {
    let series: [(&str, Kind, &str, GrantField); 4] = [
        (
            "blkbackd_xen_worker_grant_pages",
            Kind::Gauge,
            "Grant pages the guest's worker holds (registered for it on the grant device and not dropped yet: each \
             takes a page of this domain's memory).",
            |f| &f.pages,
        ),
        (
            "blkbackd_xen_worker_grant_pages_budget",
            Kind::Gauge,
            "Grant pages the guest's worker may hold (blkbackd xen --max-grant-pages).",
            |f| &f.budget,
        ),
        (
            "blkbackd_xen_worker_grant_maps_refused_total",
            Kind::Counter,
            "Grant maps refused because the guest's worker held its budget of grant pages (its requests failed). \
             Starts again from 0 with a new worker.",
            |f| &f.refused,
        ),
        (
            "blkbackd_xen_worker_grant_reclaims_total",
            Kind::Counter,
            "Times the guest's worker was stopped for a moment so that the grant registrations it no longer maps \
             could be dropped. Starts again from 0 with a new worker.",
            |f| &f.reclaims,
        ),
    ];
    for (name, kind, help, field) in series {
        header(out, name, kind, help);
        for (domid, figures) in grants {
            let _ = writeln!(out, "{name}{{domid=\"{domid}\"}} {}", field(&figures.0).load(Ordering::Relaxed));
        }
    }
}

fn malformed(line: usize, what: impl Into<String>) -> ScrapeError {
    ScrapeError::Malformed { line, what: what.into() }
}

fn header(out: &mut String, name: &str, kind: Kind, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {}", kind.name());
}

fn render_labels<'a>(out: &mut String, labels: impl Iterator<Item = (&'a str, &'a str)>) {
    let parts: Vec<String> = labels
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")))
        .collect();
    if !parts.is_empty() {
        let _ = write!(out, "{{{}}}", parts.join(","));
    }
}

type Labels<'a> = Vec<(&'a str, String)>;

/// `name{k="v",...} value`, as the workers write it (no timestamp); the value non-negative and finite.
fn parse_sample(line: &str) -> Result<(&str, Labels<'_>, f64), &'static str> {
    let name_end = line.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')).unwrap_or(line.len());
    let (name, mut rest) = line.split_at(name_end);
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("a sample without a metric name");
    }
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            if labels.len() == MAX_LABELS {
                return Err("too many labels");
            }
            let key_end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            let (key, after) = rest.split_at(key_end);
            if key.is_empty() || key.starts_with(|c: char| c.is_ascii_digit()) || key.starts_with("__") {
                return Err("a malformed label name");
            }
            if labels.iter().any(|(k, _)| *k == key) {
                return Err("a label repeated");
            }
            let after = after.strip_prefix("=\"").ok_or("a label without =\"value\"")?;
            let (value, after) = label_value(after)?;
            labels.push((key, value));
            rest = after.strip_prefix(',').unwrap_or(after);
            if !after.starts_with([',', '}']) {
                return Err("labels not separated by commas");
            }
        }
    }
    let number = rest.strip_prefix(' ').ok_or("no space before the value")?;
    if number.contains(' ') {
        return Err("more than a value after the series (a timestamp?)");
    }
    let value: f64 = number.parse().map_err(|_| "a value that is not a number")?;
    if !value.is_finite() || value < 0.0 {
        return Err("a value that is negative or not finite");
    }
    Ok((name, labels, value))
}

/// A quoted label value up to its closing quote (unescaped), and what follows it.
fn label_value(text: &str) -> Result<(String, &str), &'static str> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((value, &text[i + 1..])),
            '\\' => match chars.next() {
                Some((_, '\\')) => value.push('\\'),
                Some((_, '"')) => value.push('"'),
                Some((_, 'n')) => value.push('\n'),
                _ => return Err("a bad escape in a label value"),
            },
            c if c.is_control() => return Err("a control character in a label value"),
            c => value.push(c),
        }
        if value.len() > MAX_LABEL_VALUE {
            return Err("a label value too long");
        }
    }
    Err("an unterminated label value")
}

#[cfg(test)]
#[path = "metrics_tests.rs"]
mod tests;
