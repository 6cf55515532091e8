//! Logs: `tracing` to stderr, filtered by `RUST_LOG` (default `info`). Records of libraries that use `log`
//! (vhost, vhost-user-backend, virtio-queue) are forwarded too.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Install the subscriber. Call once, first thing.
pub fn init() {
    let (filter, bad_filter) = match EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, None),
        Err(e) => (EnvFilter::new("info"), std::env::var("RUST_LOG").ok().map(|v| (v, e))),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    if let Some((value, error)) = bad_filter.filter(|(v, _)| !v.is_empty()) {
        tracing::warn!(%error, "ignoring RUST_LOG={value:?}, logging at info level");
    }
}
