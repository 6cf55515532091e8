// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the privileged supervisor reads from a guest's worker process (`transport_xen::separation`): one packet
//! decoded as a `Request`, then judged by the guest's `Policy`.
//!
//! Layout: `u8` guest domid (0 is taken as 1), then the packet.
//!
//! Invariants: decoding never panics and never allocates beyond the packet; a request that decodes encodes back
//! to a packet that decodes to the same request; the policy allows a read only of a well-formed path inside the
//! guest's backend, error or frontend subtree, and a write only of `<backend>/<devid>/<published node>` or
//! `<errors>/<devid>/error` — checked against a model written apart from the policy, component by component.

use transport_xen::separation::policy::{Access, Policy, WRITABLE};
use transport_xen::separation::wire::{decode, encode, Request};

const DOM0: &str = "/local/domain/0";

fn components(path: &str) -> Option<Vec<&str>> {
    let rest = path.strip_prefix('/')?;
    let parts: Vec<&str> = rest.split('/').collect();
    let ok = path.len() <= 3072 && parts.iter().all(|c| !c.is_empty() && *c != "." && *c != ".." && !c.contains('\0'));
    ok.then_some(parts)
}

fn under(parts: &[&str], root: &[&str]) -> bool {
    parts.len() >= root.len() && parts[..root.len()] == *root
}

/// The model: what a worker of `domid` may read and write.
fn model(path: &str, access: Access, domid: u16) -> bool {
    let Some(parts) = components(path) else { return false };
    let d = domid.to_string();
    let backend = ["local", "domain", "0", "backend", "vbd", d.as_str()];
    let errors = ["local", "domain", "0", "error", "backend", "vbd", d.as_str()];
    let frontends = ["local", "domain", d.as_str(), "device", "vbd"];
    let leaf = |root: &[&str]| -> Option<&str> {
        (parts.len() == root.len() + 2 && under(&parts, root) && parts[root.len()].parse::<u32>().is_ok())
            .then(|| parts[root.len() + 1])
    };
    match access {
        Access::Read => under(&parts, &backend) || under(&parts, &errors) || under(&parts, &frontends),
        Access::Write => leaf(&backend).is_some_and(|name| WRITABLE.contains(&name)) || leaf(&errors) == Some("error"),
    }
}

/// Run one input.
pub fn run(data: &[u8]) {
    let Some((&d, packet)) = data.split_first() else { return };
    let domid = u16::from(d.max(1));
    let Ok(request) = decode::<Request>(packet) else { return };
    let again = encode(&request).expect("a decoded request encodes");
    assert_eq!(decode::<Request>(&again).expect("and decodes"), request);
    let policy = Policy::for_guest(DOM0, domid);
    let (path, access) = match &request {
        Request::Read { path, .. }
        | Request::Directory { path, .. }
        | Request::GetPerms { path, .. }
        | Request::Watch { path, .. }
        | Request::Unwatch { path, .. } => (path, Access::Read),
        Request::Write { path, .. } => (path, Access::Write),
        _ => return,
    };
    let allowed = policy.check(path, access).is_ok();
    assert_eq!(allowed, model(path, access, domid), "{access:?} {path:?} for domain {domid}");
}

/// The seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    let one = |domid: u8, request: Request| {
        let mut v = vec![domid];
        v.extend(encode(&request).expect("encode"));
        v
    };
    let p = |s: &str| s.to_string();
    vec![
        one(7, Request::Read { tx: 0, path: p("/local/domain/0/backend/vbd/7/51712/params") }),
        one(7, Request::Read { tx: 0, path: p("/local/domain/0/backend/vbd/8/51712/params") }),
        one(7, Request::Write { tx: 3, path: p("/local/domain/0/backend/vbd/7/51712/state"), value: b"4".to_vec() }),
        one(7, Request::Write { tx: 0, path: p("/local/domain/0/backend/vbd/7/51712/params"), value: b"/x".to_vec() }),
        one(7, Request::Write { tx: 0, path: p("/local/domain/0/error/backend/vbd/7/51712/error"), value: vec![] }),
        one(7, Request::Directory { tx: 0, path: p("/local/domain/7/device/vbd") }),
        one(7, Request::Watch { path: p("/local/domain/0/backend/vbd/7"), token: p("t") }),
        one(7, Request::Read { tx: 0, path: p("/local/domain/0/backend/vbd/7/../8") }),
        one(1, Request::OpenDisk { devid: 51712 }),
        one(7, Request::MapGrants { refs: vec![8, 9, u32::MAX] }),
        one(1, Request::TransactionEnd { tx: 9, commit: true }),
        one(1, Request::SetPerms { tx: 0, path: p("/local/domain/0/backend/vbd/1"), perms: vec![(1, b'b')] }),
    ]
}
