// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! systemd's readiness protocol (`Type=notify`): `READY=1`, `STATUS=...`, `STOPPING=1` as datagrams to the socket
//! named by `NOTIFY_SOCKET`.
//!
//! Written on std rather than a crate: the process installs a seccomp filter that forbids `socket(2)` once it is
//! set up, so the socket must be created and connected at start and every later message must be a plain `send`.
//! The small notify crates create a socket per message (and so would need `socket` after the filter is in place).
//! `NOTIFY_SOCKET` is a filesystem path (`/run/systemd/notify`) or, starting with `@`, a Linux abstract socket;
//! anything else (e.g. newer systemd's `vsock:`) is refused at construction. Unset, every call does nothing.

use std::ffi::OsStr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use anyhow::{bail, Context};

/// The environment variable systemd sets for a `Type=notify` service.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// A connected notification socket, or nothing when the process was not started by systemd with `Type=notify`.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<UnixDatagram>,
}

impl Notifier {
    /// Connects to `$NOTIFY_SOCKET` now (before any seccomp filter), or a no-op notifier if it is unset or empty.
    // `blkbackd xen` and `blkbackd vhost-user` call it first thing (tests use `from_value`: no env races).
    pub fn from_env() -> anyhow::Result<Self> {
        Self::from_value(std::env::var_os(NOTIFY_SOCKET).as_deref())
    }

    /// As [`Notifier::from_env`] with `value` as the variable's value: unset or empty disables the notifier.
    fn from_value(value: Option<&OsStr>) -> anyhow::Result<Self> {
        match value {
            Some(address) if !address.is_empty() => Self::connect(address),
            _ => Ok(Self::disabled()),
        }
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Self {
        Notifier { socket: None }
    }

    /// Connects to `address`, written as in `NOTIFY_SOCKET`: an absolute path, or `@name` for an abstract socket.
    pub fn connect(address: &OsStr) -> anyhow::Result<Self> {
        let shown = address.to_string_lossy();
        let bytes = address.as_bytes();
        let addr = match bytes.first() {
            Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]),
            Some(b'/') => SocketAddr::from_pathname(address),
            _ => bail!("NOTIFY_SOCKET={shown}: not an absolute path or an @abstract socket name"),
        }
        .with_context(|| format!("NOTIFY_SOCKET={shown}: invalid socket address"))?;
        let socket = UnixDatagram::unbound().context("cannot create the systemd notification socket")?;
        socket
            .connect_addr(&addr)
            .with_context(|| format!("cannot connect to systemd's notification socket {shown}"))?;
        tracing::debug!(socket = %shown, "connected to systemd's notification socket");
        Ok(Notifier { socket: Some(socket) })
    }

    /// Whether messages go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Tells systemd the service is up (`READY=1`).
    pub fn ready(&self) -> anyhow::Result<()> {
        self.send("READY=1")
    }

    /// Sets the one-line status `systemctl status` shows (`STATUS=...`; line breaks become spaces).
    pub fn status(&self, text: &str) -> anyhow::Result<()> {
        self.send(&format!("STATUS={}", text.replace('\n', " ")))
    }

    /// Tells systemd the service is shutting down (`STOPPING=1`).
    pub fn stopping(&self) -> anyhow::Result<()> {
        self.send("STOPPING=1")
    }

    /// One datagram with `message`, through the socket connected at construction (only `send(2)`).
    fn send(&self, message: &str) -> anyhow::Result<()> {
        let Some(socket) = &self.socket else { return Ok(()) };
        let sent = socket.send(message.as_bytes()).with_context(|| format!("cannot tell systemd {message}"))?;
        if sent != message.len() {
            bail!("cannot tell systemd {message}: sent {sent} of {} bytes", message.len());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;

    fn receive(listener: &UnixDatagram) -> String {
        listener.set_read_timeout(Some(Duration::from_secs(5))).expect("set a read timeout");
        let mut buf = [0u8; 512];
        let n = listener.recv(&mut buf).expect("a notification");
        String::from_utf8(buf[..n].to_vec()).expect("UTF-8")
    }

    /// A path socket `notify` in a fresh temporary directory (removed on drop).
    struct TempSocket(tempfile::TempDir);

    impl TempSocket {
        fn new() -> (Self, UnixDatagram) {
            let dir = tempfile::tempdir().expect("create a temporary directory");
            let listener = UnixDatagram::bind(dir.path().join("notify")).expect("bind the fake systemd socket");
            (TempSocket(dir), listener)
        }

        fn join(&self, name: &str) -> PathBuf {
            self.0.path().join(name)
        }
    }

    #[test]
    fn path_socket_receives_ready_status_and_stopping() {
        let (dir, listener) = TempSocket::new();
        let notifier = Notifier::connect(dir.join("notify").as_os_str()).expect("connect");
        assert!(notifier.is_enabled());
        notifier.ready().expect("READY=1");
        assert_eq!(receive(&listener), "READY=1");
        notifier.status("serving 2 guests\nand more").expect("STATUS");
        assert_eq!(receive(&listener), "STATUS=serving 2 guests and more");
        notifier.stopping().expect("STOPPING=1");
        assert_eq!(receive(&listener), "STOPPING=1");
    }

    #[test]
    fn abstract_socket_receives_ready() {
        let name = format!("blkbackd-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract address");
        let listener = UnixDatagram::bind_addr(&addr).expect("bind the fake abstract socket");
        let notifier = Notifier::connect(OsStr::new(&format!("@{name}"))).expect("connect");
        notifier.ready().expect("READY=1");
        assert_eq!(receive(&listener), "READY=1");
    }

    #[test]
    fn socket_is_connected_at_construction() {
        // Connecting to a missing socket fails at once, not at the first message: nothing is created later.
        let (dir, _listener) = TempSocket::new();
        let err = Notifier::connect(dir.join("absent").as_os_str()).expect_err("no such socket");
        assert!(format!("{err:#}").contains("cannot connect"), "{err:#}");
    }

    #[test]
    fn unsupported_addresses_are_refused() {
        for address in ["relative/path", "vsock:2:1234"] {
            let err = Notifier::connect(OsStr::new(address)).expect_err(address);
            assert!(format!("{err:#}").contains("NOTIFY_SOCKET"), "{err:#}");
        }
    }

    #[test]
    fn unset_or_empty_variable_disables_and_a_set_one_connects() {
        assert!(!Notifier::from_value(None).expect("unset").is_enabled());
        assert!(!Notifier::from_value(Some(OsStr::new(""))).expect("empty").is_enabled());
        let (dir, listener) = TempSocket::new();
        let notifier = Notifier::from_value(Some(dir.join("notify").as_os_str())).expect("set");
        notifier.ready().expect("READY=1");
        assert_eq!(receive(&listener), "READY=1");
    }

    #[test]
    fn disabled_notifier_sends_nothing_and_succeeds() {
        let notifier = Notifier::disabled();
        assert!(!notifier.is_enabled());
        notifier.ready().expect("no-op");
        notifier.status("x").expect("no-op");
        notifier.stopping().expect("no-op");
    }
}
