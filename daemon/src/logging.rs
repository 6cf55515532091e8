// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Logs: `tracing` to stderr, filtered by `RUST_LOG` (default `info`). Records of libraries that use `log`
//! (vhost, vhost-user-backend, virtio-queue) are forwarded too. `--log-format json` writes one JSON object per
//! line instead.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// Install the subscriber. Call once, first thing.
pub fn init(format: LogFormat) {
    let (filter, bad_filter) = match EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, None),
        Err(e) => (EnvFilter::new("info"), std::env::var("RUST_LOG").ok().map(|v| (v, e))),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    match format {
        LogFormat::Human => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        // Spans (vbd, queue) become fields of every record: what journald and log shippers index on.
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(true).init(),
    }
    if let Some((value, error)) = bad_filter.filter(|(v, _)| !v.is_empty()) {
        tracing::warn!(%error, "ignoring RUST_LOG={value:?}, logging at info level");
    }
}
