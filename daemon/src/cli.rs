// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The command line: one subcommand per transport (and `demo`), each in its own module.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use device_blk::disk::{parse_diskseq_arg, DirectIo};
use device_blk::{DiskOptions, EngineKind};
use vhost_user_blk::DEFAULT_QUEUE_SIZE;

use crate::sandbox::SandboxArgs;
#[cfg(feature = "demo")]
use crate::sandbox::SeccompMode;

/// What the help and version texts say of `blkbackd demo`, which only the feature `demo` builds in.
#[cfg(feature = "demo")]
macro_rules! demo_text {
    (example) => {
        "  blkbackd demo\n"
    };
    (version) => {
        "\nemulated Xen host: built in (blkbackd demo)"
    };
}
#[cfg(not(feature = "demo"))]
macro_rules! demo_text {
    (example) => {
        ""
    };
    (version) => {
        "\nemulated Xen host: not built in (no feature `demo`)"
    };
}

/// A per-guest userspace block backend: Xen blkif and vhost-user-blk over io_uring.
#[derive(Debug, Parser)]
#[command(
    name = "blkbackd",
    version,
    long_version = LONG_VERSION,
    propagate_version = true,
    after_help = concat!(
        "Examples:\n",
        demo_text!(example),
        "  blkbackd xen --frontend-domid 7\n  \
        blkbackd vhost-user --socket-path /run/blkbackd/vm1.sock --disk /dev/loop3 --diskseq 42\n\n\
        Logs go to stderr; RUST_LOG sets the level (e.g. RUST_LOG=debug)."
    )
)]
pub struct Cli {
    /// Log format on stderr: `human` (default) or `json` (one object per line, for journald and log shippers).
    #[arg(long, global = true, value_enum, value_name = "FORMAT", default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// What to serve.
    #[command(subcommand)]
    pub command: Command,
}

/// `--version --verbose` text: the version and what this build can do.
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\ntransports: vhost-user-blk, xen (blkif: x86_64/x86_32 ABIs, multi-page rings, multi-queue, indirect, \
     persistent grants, grant map and grant copy)",
    "\nI/O engines: io_uring, sync (preadv/pwritev)",
    "\nxenstore: diskseq pin, opened node (delete-on-close)",
    demo_text!(version)
);

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a disk to vhost-user-blk frontends (QEMU, cloud-hypervisor, ...) on a Unix socket, one connection
    /// after another, until SIGTERM or SIGINT.
    #[command(after_help = "Examples:\n  \
        blkbackd vhost-user --socket-path /run/blkbackd/vm1.sock --disk /srv/vm1.img --queues 2\n  \
        blkbackd vhost-user --socket-path /run/blkbackd/vm2.sock --disk /dev/loop3 --diskseq 42 --read-only\n  \
        blkbackd vhost-user --socket-path /run/blkbackd/vm3.sock --disk /srv/vm3.img --user blkbackd \\\n      \
        --socket-group kvm --socket-mode 0660 --pidfile /run/blkbackd/vm3.pid\n  \
        blkbackd vhost-user --fd 3 --disk /srv/vm4.img        (a listening socket the VMM passes)\n\n\
        Privileges: once the disk and sockets are open, blkbackd drops every capability (and with --user becomes that\n\
        user) and filters its system calls (--seccomp enforce: an unexpected call ends it with a log line naming the\n\
        call; --seccomp log while developing: see dmesg). For the socket files to be removed on exit, their directory\n\
        must be writable by the --user.\n\n\
        Socket activation: started by a systemd socket unit (LISTEN_FDS), blkbackd serves the socket it passes and\n\
        tells systemd once it is ready (Type=notify).\n\n\
        QEMU: -chardev socket,id=blk0,path=/run/blkbackd/vm1.sock,reconnect-ms=1000\n\
        -device vhost-user-blk-pci,chardev=blk0,num-queues=2\n\
        (guest memory must be shared: -object memory-backend-memfd,id=mem,size=4G,share=on -numa node,memdev=mem)")]
    VhostUser(VhostUserArgs),
    /// Serve Xen vbds (blkif over grant tables and event channels) from this domain, as a host service: a small
    /// privileged supervisor watches backend/vbd and runs one unprivileged worker process per guest (of every guest,
    /// or of the `--frontend-domid` ones). Runs until SIGTERM or SIGINT, then closes every vbd.
    #[command(after_help = "Examples:\n  \
        blkbackd xen                      (every guest; systemctl start blkbackd-xen runs this)\n  \
        blkbackd xen --frontend-domid 7 --frontend-domid 9 --user 65534:65534\n  \
        blkbackd xen --cleanup 7      (after a crash: close domain 7's vbds so its I/O fails instead of hanging)\n  \
        blkbackd xen --cleanup 7 --devid 51728   (only backend/vbd/7/51728: block-blkbackd's remove)\n\n\
        Privileges: the supervisor keeps root to open disks and /dev/xen devices; each guest's worker process gets\n\
        them as descriptors, runs as --user (default: blkbackd) with no capability, no_new_privs, in an empty\n\
        read-only root and network namespace of its own, under a system call filter (no open, socket, exec), and\n\
        reaches xenstore only through the supervisor, only its own guest's vbd nodes. --seccomp log (see dmesg)\n\
        or off to debug.\n\n\
        xl disk spec: 'format=raw, vdev=xvdb, access=rw, backendtype=phy, script=block-blkbackd, target=/srv/vm7.img'")]
    Xen(XenArgs),
    /// One guest's worker process, started by `blkbackd xen`.
    #[command(hide = true)]
    XenWorker(XenWorkerArgs),
    /// Print the live statistics of a running blkbackd (per queue: requests, bytes, errors, in-flight, latency).
    #[command(after_help = "Examples:\n  \
        blkbackd stats --control /run/blkbackd/vm1.ctl\n  \
        blkbackd stats --control /run/blkbackd/vm1.ctl --prometheus")]
    Stats(StatsArgs),
    /// Make a running blkbackd look at its disks' sizes now, and tell its guests about a disk that grew (Xen:
    /// new `sectors`, as Linux blkback does; vhost-user: the config-change message). Both also look every second
    /// by themselves.
    #[command(after_help = "Examples:\n  \
        truncate -s +10G /srv/vm7.img && blkbackd resize --control /run/blkbackd-xen/dom7.ctl\n  \
        lvextend -L +10G vg/vm1 && blkbackd resize --control /run/blkbackd/vm1.ctl")]
    Resize(ResizeArgs),
    /// Write the man pages (blkbackd.1, blkbackd-<subcommand>.1) into DIR (for packaging).
    #[command(hide = true)]
    Man {
        /// Where to write them.
        dir: PathBuf,
    },
    /// Run the Xen path end to end on a built-in emulated Xen host (no hypervisor, no arguments): one guest, one
    /// temporary disk, a verified workload.
    #[cfg(feature = "demo")]
    #[command(after_help = "Example:\n  blkbackd demo")]
    Demo(DemoArgs),
}

/// `blkbackd vhost-user`.
#[derive(Debug, Args)]
pub struct VhostUserArgs {
    /// Unix socket to listen on (a stale socket file nobody listens on is replaced). Without it: `--fd`, or the
    /// socket systemd passes (socket activation, `LISTEN_FDS`).
    #[arg(long = "socket-path", visible_alias = "socket", value_name = "PATH", conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,
    /// Serve on this inherited descriptor: a Unix stream socket that already listens (the VMM or service manager
    /// that starts blkbackd bound it).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(0..))]
    pub fd: Option<i32>,
    /// Print what this backend supports as the vhost-user backend conventions define it (JSON) and exit; every
    /// other argument is ignored.
    #[arg(long)]
    pub print_capabilities: bool,
    /// Permission bits of the socket file `--socket-path` creates, in octal (e.g. 0660 with --socket-group, or
    /// 0666): who may connect. Default: as the umask leaves them.
    #[arg(long, value_name = "MODE", requires = "socket_path", conflicts_with = "fd",
          value_parser = crate::vhost_user::parse_mode)]
    pub socket_mode: Option<u32>,
    /// Group of the socket file `--socket-path` creates (NAME or GID), e.g. the group an unprivileged QEMU runs
    /// in (needs root, or membership of that group).
    #[arg(long, value_name = "NAME|GID", requires = "socket_path", conflicts_with = "fd",
          value_parser = crate::vhost_user::parse_group)]
    pub socket_group: Option<u32>,
    /// Write the process id to this file once listening (removed on exit if its directory lets the --user).
    #[arg(long, value_name = "PATH")]
    pub pidfile: Option<PathBuf>,
    /// The disk to serve.
    #[command(flatten)]
    pub disk: DiskArgs,
    /// Request queues (the most the frontend may use).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=i64::from(vhost_user_blk::MAX_QUEUES)))]
    pub queues: u16,
    /// I/O threads serving the queues, from 1 to --queues: queue q is served by thread q % N, which batches the
    /// work of all its queues per wake-up (bounded per queue, so that a busy queue cannot starve the others).
    /// Default: 1. Measured (docs/performance.md): CPU time per I/O grows with the number of threads (a thread
    /// serving fewer queues wakes for a smaller share of the I/O: at 8 queues, 3.1 µs per I/O with one thread,
    /// 4.9 with eight) and IOPS did not improve; raise it when the one thread uses a whole CPU.
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=i64::from(vhost_user_blk::MAX_QUEUES)))]
    pub io_threads: Option<u16>,
    /// Largest virtqueue size the frontend may set: a power of two from 4 to 32768.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_QUEUE_SIZE, value_parser = parse_queue_size)]
    pub queue_size: u16,
    /// Most requests in flight per queue (default: the queue size); more wait in the ring until some complete.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub io_depth: Option<u32>,
    /// Serial number returned by GET_ID (at most 20 bytes; default: `diskseq-<n>` for a block device, else the
    /// file name).
    #[arg(long, value_name = "S")]
    pub serial: Option<String>,
    /// I/O engine.
    #[arg(long, value_enum, default_value_t = EngineArg::Auto)]
    pub engine: EngineArg,
    /// Serve live statistics on this Unix socket (read them with `blkbackd stats --control PATH`).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Serve the statistics to Prometheus over HTTP: `GET /metrics` on IP:PORT (e.g. 127.0.0.1:9185; port 0 picks
    /// a free one, logged) or on a Unix socket path (anything with a `/`).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<crate::metrics_http::MetricsAddr>,
    /// Privileges.
    #[command(flatten)]
    pub sandbox: SandboxArgs,
    /// Serve from the host's mount and network namespaces. By default, once its disk and sockets are open,
    /// blkbackd moves to a mount namespace whose root is empty and read-only and to a network namespace of its
    /// own (with a user namespace of its own when it lacks CAP_SYS_ADMIN and CAP_SYS_CHROOT), so that a process
    /// its guest took over reaches no file and no socket by name, not even through an io_uring ring of its own
    /// making, which the system call filter cannot see into. Only for hosts that allow neither.
    #[arg(long)]
    pub no_namespaces: bool,
    /// Adaptive polling: after a kick or a completion, keep polling the queue and its I/O completions (guest
    /// kicks off) until nothing happened for N µs, then sleep. Lower latency under load at the cost of CPU while
    /// busy; an idle daemon still sleeps. 0: never poll.
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(vhost_user_blk::MAX_POLL_US)))]
    pub poll_us: u32,
    /// How a batch of requests goes to io_uring: `unplugged` (at most two per system call, so that the block
    /// layer neither holds them back nor merges them: each reaches the disk as the guest made it), `whole` (one
    /// system call per batch), or `auto`: unplugged where requests reach a block layer, whole for a file in
    /// memory (tmpfs), which has none.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = BatchingArg::Auto)]
    pub io_batching: BatchingArg,
}

impl VhostUserArgs {
    /// The checks clap cannot make: no more I/O threads than queues, and some socket to listen on (a path, a
    /// descriptor, or socket activation).
    pub fn check_socket(&self) -> Result<(), clap::Error> {
        if let Some(threads) = self.io_threads.filter(|&t| t > self.queues) {
            return Err(Self::usage_error(
                clap::error::ErrorKind::ValueValidation,
                format!(
                    "invalid value '{threads}' for '--io-threads <N>': more I/O threads than queues ({}); give \
                     --io-threads from 1 to --queues",
                    self.queues
                ),
            ));
        }
        if self.socket_path.is_some() || self.fd.is_some() || crate::vhost_user::activation_requested() {
            return Ok(());
        }
        Err(Self::usage_error(
            clap::error::ErrorKind::MissingRequiredArgument,
            "no socket to listen on: give --socket-path <PATH> or --fd <N>, or start blkbackd from a systemd \
             socket unit (LISTEN_FDS)"
                .to_string(),
        ))
    }

    /// A usage error of `blkbackd vhost-user` (exit code 2, with the usage line).
    fn usage_error(kind: clap::error::ErrorKind, message: String) -> clap::Error {
        let mut command = <Cli as clap::CommandFactory>::command();
        let sub = command.find_subcommand_mut("vhost-user").map(|s| s.clone().bin_name("blkbackd vhost-user"));
        sub.unwrap_or(command).error(kind, message)
    }
}

/// `--queue-size`: a power of two the virtqueue code supports.
fn parse_queue_size(text: &str) -> Result<u16, String> {
    let max = vhost_user_blk::MAX_QUEUE_SIZE;
    match text.parse::<u16>() {
        Ok(n) if n.is_power_of_two() && (4..=max).contains(&n) => Ok(n),
        _ => Err(format!("not a power of two from 4 to {max} (4, 8, 16, ..., {max})")),
    }
}

/// `--io-batching`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BatchingArg {
    /// Unplugged where requests reach a block layer, whole for a file in memory.
    Auto,
    /// At most two requests per io_uring_enter (no block-layer plug).
    Unplugged,
    /// A whole batch per io_uring_enter.
    Whole,
}

impl From<BatchingArg> for device_blk::engine::Batching {
    fn from(arg: BatchingArg) -> Self {
        match arg {
            BatchingArg::Auto => Self::Auto,
            BatchingArg::Unplugged => Self::Unplugged,
            BatchingArg::Whole => Self::Whole,
        }
    }
}

/// `blkbackd stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// The daemon's control socket (its `--control`).
    #[arg(long, value_name = "PATH")]
    pub control: PathBuf,
    /// Prometheus text format instead of the human one.
    #[arg(long)]
    pub prometheus: bool,
}

/// `blkbackd resize`.
#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// The daemon's control socket (`--control`, or `DIR/dom<D>.ctl` of `blkbackd xen --control-dir DIR`).
    #[arg(long, value_name = "PATH")]
    pub control: PathBuf,
}

/// `blkbackd xen`.
#[derive(Debug, Args)]
pub struct XenArgs {
    /// Serve only the vbds of this frontend domain (`backend/vbd/D/*`; repeat for more); default: every domain.
    #[arg(long, value_name = "D")]
    pub frontend_domid: Vec<u16>,
    /// The domain this backend runs in (dom0 or a driver domain).
    #[arg(long, value_name = "B", default_value_t = 0)]
    pub backend_domid: u16,
    /// How each guest's worker serves its vbds.
    #[command(flatten)]
    pub serving: XenServingArgs,
    /// Live statistics: each guest's worker answers `blkbackd stats --control DIR/dom<D>.ctl` (the supervisor
    /// creates the socket when the worker starts and removes it when it ends).
    #[arg(long, value_name = "DIR")]
    pub control_dir: Option<PathBuf>,
    /// One Prometheus endpoint for every guest: `GET /metrics` on IP:PORT (e.g. 127.0.0.1:9469) or a Unix socket
    /// path, answered by the supervisor with every worker's statistics (read through `--control-dir`'s sockets,
    /// which it therefore requires: 2 s and 1 MiB at most per worker, checked and merged) and its own series
    /// (`blkbackd_xen_workers`, `blkbackd_xen_vbds`, `blkbackd_xen_worker_restarts_total`). Off by default; the
    /// packaged unit has no network: see the README for the drop-in that allows it.
    #[arg(long, value_name = "ADDR", requires = "control_dir", conflicts_with = "cleanup")]
    pub metrics_listen: Option<crate::metrics_http::MetricsAddr>,
    /// Do not serve: move every vbd of domain D to Closed with an `error` node (for a hotplug script or a
    /// service manager after a blkbackd died), then exit.
    #[arg(long, value_name = "D", conflicts_with = "frontend_domid")]
    pub cleanup: Option<u16>,
    /// With `--cleanup`: only the vbd with this device id (`backend/vbd/D/N`; a hotplug script's `remove`).
    #[arg(long, value_name = "N", requires = "cleanup")]
    pub devid: Option<u32>,
    /// The grant pages each guest's worker may hold registered or mapped, counted by the supervisor (which alone
    /// registers and drops them): each takes a page of this domain's memory (outside any cgroup) and, mapped, a
    /// Xen maptrack entry of this domain, which every guest shares. A worker at its budget gets its next map
    /// refused (its guest's I/O fails, no other guest's). The default, 65536 (256 MiB), holds 15 vbds of 4 queues
    /// with full persistent-grant caches; the budget is per worker, so size this domain's memory for guests ×
    /// budget or lower it. Not applied with --direct-grants (the worker registers by itself).
    #[arg(long, value_name = "N", default_value_t = transport_xen::separation::grants::DEFAULT_GRANT_PAGE_BUDGET,
          value_parser = clap::value_parser!(u64).range(1024..=1 << 24), conflicts_with = "cleanup")]
    pub max_grant_pages: u64,
    /// Serve even though the kernel's xen-blkback is loaded (both would answer the same vbds: only for tests
    /// that know no guest uses the kernel backend).
    #[arg(long, hide = true)]
    pub allow_kernel_blkback: bool,
    /// The guests' workers: `--user NAME|UID[:GID]` (default: the `blkbackd` system user the package creates)
    /// and their system call filter.
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

/// How a guest's vbds are served (the service passes these to every worker).
#[derive(Clone, Debug, Args)]
pub struct XenServingArgs {
    /// How guest data pages are reached: `auto` (persistent mappings for a frontend that uses persistent grants,
    /// as Linux blkfront does; otherwise grant copy with `--direct-grants`, maps of every request's grants
    /// without), `map` (map every request's grants), `copy` (grant copy through a bounce pool; persistent grants
    /// are not offered; needs `--direct-grants`).
    #[arg(long, value_enum, value_name = "MODE", default_value_t = GrantModeArg::Auto)]
    pub grant_mode: GrantModeArg,
    /// Most queues a frontend may use (`multi-queue-max-queues`).
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub max_queues: u32,
    /// Do not offer persistent grants.
    #[arg(long)]
    pub no_persistent: bool,
    /// I/O engine.
    #[arg(long, value_enum, default_value_t = EngineArg::Auto)]
    pub engine: EngineArg,
    /// Adaptive polling: after a round that took or answered requests, keep polling the shared ring and the I/O
    /// completions (the frontend's notifications off) until nothing happened for N µs, then sleep. Fewer
    /// event-channel round trips under load, at the cost of CPU while busy; an idle vbd still sleeps. 0: never.
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(transport_xen::dataplane::MAX_POLL_US)))]
    pub poll_us: u32,
    /// I/O threads serving the guest's rings (every queue of every vbd), each thread several rings with a bounded
    /// share of work per ring per pass (a busy ring cannot starve the others). Default: 1.
    /// Measured (docs/performance.md, emulated host): with one thread per ring the CPU time per I/O grew with the
    /// ring count (16 vbds: 2.2–3.6× the one-vbd figure); with one thread, 1.2–1.6× up to 4 rings and 1.5–2.0× at
    /// 16 vbds. Raise it when the one thread uses a whole CPU. Each thread's io_uring is made when the worker starts
    /// (a locked-down worker may make none), so there is no "one thread per ring": N threads serve up to N rings
    /// one each.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=transport_xen::dataplane::MAX_IO_THREADS as i64))]
    pub io_threads: u16,
    /// Let each guest's worker map and copy grants by itself. By default the supervisor registers every grant map
    /// a worker makes, always as the worker's own guest's, and the worker's system call filter refuses the calls
    /// that name a domain: Linux's grant device has no per-domain restriction, so a worker its guest took over
    /// could otherwise map pages other guests granted to this domain. Costs a round trip to the supervisor per map
    /// (rare with persistent grants, per request without); allows `--grant-mode copy`. For a driver domain that
    /// serves one guest, or guests that are trusted.
    #[arg(long)]
    pub direct_grants: bool,
}

impl XenServingArgs {
    /// The same options as command-line arguments (for a worker's command line).
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--grant-mode".to_string(),
            value_name(self.grant_mode),
            "--max-queues".to_string(),
            self.max_queues.to_string(),
            "--engine".to_string(),
            value_name(self.engine),
            "--poll-us".to_string(),
            self.poll_us.to_string(),
            "--io-threads".to_string(),
            self.io_threads.to_string(),
        ];
        if self.no_persistent {
            args.push("--no-persistent".to_string());
        }
        if self.direct_grants {
            args.push("--direct-grants".to_string());
        }
        args
    }
}

/// A value's name as clap parses it.
pub fn value_name(value: impl ValueEnum) -> String {
    value.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default()
}

/// `blkbackd xen-worker`: one guest's worker, started by `blkbackd xen` (never by hand).
#[derive(Debug, Args)]
pub struct XenWorkerArgs {
    /// The guest domain whose vbds this worker serves.
    #[arg(long, value_name = "D")]
    pub domid: u16,
    /// The backend domain's xenstore home (`/local/domain/<B>`).
    #[arg(long, value_name = "PATH")]
    pub domain_path: String,
    /// The inherited descriptor of the channel to the supervisor.
    #[arg(long, value_name = "FD", default_value_t = 3)]
    pub channel_fd: i32,
    /// Serving options.
    #[command(flatten)]
    pub serving: XenServingArgs,
    /// Privileges.
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

/// `blkbackd demo`.
#[cfg(feature = "demo")]
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// System call filter of the data-plane threads, as `blkbackd xen` installs it (they also drop every
    /// capability).
    #[arg(long, value_enum, value_name = "MODE", default_value_t = SeccompMode::Enforce)]
    pub seccomp: SeccompMode,
}

/// `--grant-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GrantModeArg {
    /// Persistent mappings with a frontend that uses persistent grants, grant copy without.
    Auto,
    /// Map the granted pages (persistent grants stay mapped; other grants are mapped per request).
    Map,
    /// Copy through a bounce pool with grant copy.
    Copy,
}

/// Which disk, and how to open it.
#[derive(Debug, Args)]
pub struct DiskArgs {
    /// Regular file or block device (`--blk-file`, the vhost-user conventions' name, is the same option).
    #[arg(long = "disk", visible_alias = "blk-file", value_name = "PATH")]
    pub path: PathBuf,
    /// Refuse the device unless its disk sequence number is N (decimal as in sysfs, or 0x hex).
    #[arg(long, value_name = "N", value_parser = parse_diskseq_arg)]
    pub diskseq: Option<u64>,
    /// Serve the disk read-only (needed for a file without write permission or on a read-only mount, and for a
    /// read-only block device).
    #[arg(long)]
    pub read_only: bool,
    /// O_DIRECT: `auto` uses it where the file system allows, `on` requires it, `off` never uses it.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = DirectArg::Auto)]
    pub direct: DirectArg,
}

impl DiskArgs {
    /// The options to open the disk with.
    pub fn options(&self) -> DiskOptions {
        let direct_io = match self.direct {
            DirectArg::Auto => DirectIo::Auto,
            DirectArg::On => DirectIo::Required,
            DirectArg::Off => DirectIo::Off,
        };
        DiskOptions::default()
            .with_read_only(self.read_only)
            .with_direct_io(direct_io)
            .with_expected_diskseq(self.diskseq)
    }
}

/// `--engine`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EngineArg {
    /// io_uring if the kernel allows it, else synchronous I/O.
    Auto,
    /// io_uring only.
    IoUring,
    /// Synchronous preadv/pwritev.
    Sync,
}

impl From<EngineArg> for EngineKind {
    fn from(arg: EngineArg) -> Self {
        match arg {
            EngineArg::Auto => EngineKind::Auto,
            EngineArg::IoUring => EngineKind::IoUring,
            EngineArg::Sync => EngineKind::Sync,
        }
    }
}

/// `--direct`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DirectArg {
    /// Where the file system allows it.
    Auto,
    /// Required.
    On,
    /// Never.
    Off,
}

#[cfg(test)]
#[path = "cli_tests.rs"]
mod tests;
