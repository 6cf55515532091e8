// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the real-Xen lab tests share: the lab script (`../shared/xen-lab`), when to skip, a lab that is stopped
//! when dropped, waiting for another lab on the machine, the release binary, and the `KEY k=v ...` report lines
//! the dom0 scripts print.
// Each lab test binary uses a part of this module.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The lab's driver script, next to the repository as CI lays it out (`../shared/xen-lab/xen-lab`).
pub fn lab_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/xen-lab/xen-lab")
}

/// A file of `tests/tests/xen_lab_support`.
pub fn support(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/xen_lab_support").join(name)
}

/// Why the lab cannot run here, if it cannot.
pub fn why_skip() -> Option<String> {
    if std::env::var("BLKBACKD_SKIP_XEN_LAB").as_deref() == Ok("1") {
        return Some("BLKBACKD_SKIP_XEN_LAB=1".to_string());
    }
    // SAFETY: geteuid only reads the caller's credentials.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (QEMU, loop devices)".to_string());
    }
    let script = lab_script();
    if !script.is_file() {
        return Some(format!("no lab script at {}", script.display()));
    }
    None
}

/// A lab work directory of its own; QEMU is stopped when dropped, whatever happened.
#[derive(Debug)]
pub struct Lab {
    pub dir: PathBuf,
    /// QEMU's memory (MiB).
    pub mem_mib: u32,
    /// More `XENLAB_*` settings.
    env: Vec<(String, String)>,
}

impl Lab {
    pub fn new(dir: &str, mem_mib: u32) -> Lab {
        let lab = Lab { dir: PathBuf::from(dir), mem_mib, env: Vec::new() };
        std::fs::create_dir_all(lab.share_bin()).expect("create the lab share");
        lab
    }

    /// Run the lab with `key` = `value` in the environment.
    pub fn with_env(mut self, key: &str, value: &str) -> Lab {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// `share/bin` on the host, `/mnt/host/bin` in dom0.
    pub fn share_bin(&self) -> PathBuf {
        self.dir.join("share/bin")
    }

    /// Run `xen-lab ARGS`, returning (success, combined output).
    pub fn xen_lab(&self, args: &[&str]) -> (bool, String) {
        let started = Instant::now();
        let out = Command::new("bash")
            .arg(lab_script())
            .args(args)
            .env("XENLAB_DIR", &self.dir)
            .env("XENLAB_MEM", self.mem_mib.to_string())
            .env("XENLAB_EXEC_TIMEOUT", "1200")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("cannot run the xen-lab script");
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        eprintln!("xen-lab {} -> {} in {:.0?}", args.first().copied().unwrap_or(""), out.status, started.elapsed());
        (out.status.success(), text)
    }

    /// `xen-lab build`, then the hypervisor the lab boots: `xen` (a multiboot ELF image, as `xen-lab build` unpacks
    /// Debian's) in place of Debian's, or Debian's again when `xen` is `None` and an earlier run put another one
    /// there (the build's stamp does not cover the hypervisor, so it is rebuilt then).
    pub fn build_with_xen(&self, xen: Option<&Path>) -> (bool, String) {
        let marker = self.dir.join("xen.replaced");
        if xen.is_none() && marker.exists() {
            let _ = std::fs::remove_file(self.dir.join("build.stamp"));
            let _ = std::fs::remove_file(&marker);
        }
        let (ok, mut out) = self.xen_lab(&["build"]);
        if let (true, Some(xen)) = (ok, xen) {
            if let Err(e) = std::fs::copy(xen, self.dir.join("xen")) {
                return (false, format!("{out}\ncopy {} into the lab: {e}", xen.display()));
            }
            let _ = std::fs::write(&marker, xen.to_string_lossy().as_bytes());
            out.push_str(&format!("\nthe lab boots {}", xen.display()));
        }
        (ok, out)
    }

    /// `xen-lab setup`, waiting for the package manager when another process holds its lock (another lab's
    /// setup, or an `apt-get` beside the test), up to [`SETUP_LOCK_WAIT`]: a held lock is not a failure of the
    /// lab.
    pub fn setup(&self) -> (bool, String) {
        retry_while_locked(|| self.xen_lab(&["setup"]))
    }

    /// A file of the run's output directory (`share/out`).
    pub fn out(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join("share/out").join(name)).unwrap_or_else(|e| format!("({name}: {e})"))
    }

    /// QEMU processes of other labs (the machine runs one lab at a time: two make both too slow to judge).
    pub fn other_labs(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
        let ours = self.dir.to_string_lossy().into_owned();
        entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
            .filter_map(|e| {
                let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
                let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                // (An exiting QEMU, a zombie, has an empty command line.)
                (comm.trim() == "qemu-system-x86" && !cmdline.trim().is_empty() && !cmdline.contains(&ours)).then(
                    || {
                        let head = cmdline.chars().take(120).collect::<String>();
                        format!("pid {}: {head}", e.file_name().to_string_lossy())
                    },
                )
            })
            .collect()
    }

    /// Wait (up to `BLKBACKD_XEN_LAB_WAIT_S`, default 900 s) for other labs to end.
    pub fn wait_for_other_labs(&self) {
        let limit = std::env::var("BLKBACKD_XEN_LAB_WAIT_S").ok().and_then(|v| v.parse().ok()).unwrap_or(900);
        let started = Instant::now();
        for round in 0u64.. {
            let others = self.other_labs();
            if others.is_empty() {
                return;
            }
            if started.elapsed().as_secs() >= limit {
                eprintln!(
                    "another lab still runs after {limit} s; going ahead (expect slow timings):\n{}",
                    others.join("\n")
                );
                return;
            }
            if round.is_multiple_of(12) {
                eprintln!("waiting for another lab to end: {}", others.join("; "));
            }
            std::thread::sleep(std::time::Duration::from_secs(5));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.xen_lab(&["stop"]);
    }
}

/// How long [`Lab::setup`] waits for a package manager lock held by another process.
pub const SETUP_LOCK_WAIT: Duration = Duration::from_secs(600);

/// Run `setup` again while its output says that another process holds apt's or dpkg's lock, up to
/// [`SETUP_LOCK_WAIT`]; the last result otherwise.
pub fn retry_while_locked(setup: impl Fn() -> (bool, String)) -> (bool, String) {
    let started = Instant::now();
    loop {
        let (ok, out) = setup();
        let locked = !ok && (out.contains("Could not get lock") || out.contains("Unable to lock"));
        if !locked || started.elapsed() >= SETUP_LOCK_WAIT {
            return (ok, out);
        }
        eprintln!("xen-lab setup: the package manager's lock is held by another process; trying again in 10 s");
        std::thread::sleep(Duration::from_secs(10));
    }
}

/// The release blkbackd of this workspace, built now (its target dir is the one this test was built in); or the
/// binary `BLKBACKD_LAB_BIN` names (another commit's, to compare one lab run with another).
pub fn release_blkbackd() -> PathBuf {
    if let Some(bin) = std::env::var_os("BLKBACKD_LAB_BIN") {
        eprintln!("lab: blkbackd from BLKBACKD_LAB_BIN={}", bin.to_string_lossy());
        return PathBuf::from(bin);
    }
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().expect("target dir").to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let status = Command::new(cargo)
        .args(["build", "--release", "-p", "blkbackd", "--bin", "blkbackd"])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cannot run cargo build");
    assert!(status.success(), "cargo build --release -p blkbackd failed");
    let bin = target.join("release/blkbackd");
    assert!(bin.is_file(), "{} missing after the build", bin.display());
    bin
}

/// Build example `name` of package `package` in release mode; the path of its binary.
pub fn release_example(package: &str, name: &str) -> PathBuf {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().expect("target dir").to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let status = Command::new(cargo)
        .args(["build", "--release", "-p", package, "--example", name])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cannot run cargo build");
    assert!(status.success(), "cargo build --release -p {package} --example {name} failed");
    let bin = target.join("release/examples").join(name);
    assert!(bin.is_file(), "{} missing after the build", bin.display());
    bin
}

/// `KEY k=v k=[a b] ...`: the key and its fields (a `[...]` value may hold spaces).
pub fn fields(rest: &str) -> (String, BTreeMap<String, String>) {
    let mut words = rest.split_whitespace();
    let key = words.next().unwrap_or_default().to_string();
    let mut map = BTreeMap::new();
    let mut pending: Option<(String, String)> = None;
    for word in words {
        if let Some((k, mut v)) = pending.take() {
            v.push(' ');
            v.push_str(word);
            if word.ends_with(']') {
                map.insert(k, v);
            } else {
                pending = Some((k, v));
            }
            continue;
        }
        if let Some((k, v)) = word.split_once('=') {
            if v.starts_with('[') && !v.ends_with(']') {
                pending = Some((k.to_string(), v.to_string()));
            } else {
                map.insert(k.to_string(), v.to_string());
            }
        }
    }
    if let Some((k, v)) = pending {
        map.insert(k, v);
    }
    (key, map)
}

/// A field's value, empty when absent.
pub fn get<'a>(m: &'a BTreeMap<String, String>, k: &str) -> &'a str {
    m.get(k).map_or("", String::as_str)
}

/// A field's value as a number.
pub fn number(m: &BTreeMap<String, String>, k: &str) -> Option<f64> {
    m.get(k).and_then(|v| v.parse().ok())
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Assertions collected rather than stopping at the first, so one run says everything that is wrong.
#[derive(Debug, Default)]
pub struct Verdict {
    pub failed: Vec<String>,
    pub passed: Vec<String>,
}

impl Verdict {
    pub fn expect(&mut self, ok: bool, what: impl Into<String>) {
        let what = what.into();
        eprintln!("{} {what}", if ok { "PASS" } else { "FAIL" });
        if ok {
            self.passed.push(what)
        } else {
            self.failed.push(what)
        }
    }
}
