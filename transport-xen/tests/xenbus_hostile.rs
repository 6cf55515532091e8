// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Hostile frontends at the control-plane level: every node a guest writes, written wrong on purpose. Each case
//! runs on its own vbd of its own guest, served by the same backend process as a well-behaved vbd that must stay
//! connected and untouched throughout. Each case must end in the `error` node + Closing, be torn down (Closed),
//! or be ignored — never a panic, a hang, or a data plane started on bad input.

mod xenbus_support;

use std::time::{Duration, Instant};

use transport_xen::connect::BlkifAbi;
use transport_xen::frontend::handshake::{self, Publication, PublishedRing};
use transport_xen::services::{TxId, XenStore};
use transport_xen::xenbus::{Fatal, XenbusState};
use xenbus_support::{Bed, RingEvent, T};

#[derive(Clone, Copy, Debug)]
enum Expect {
    /// The `error` node contains this, and the state is Closing.
    Fatal(&'static str),
    /// The device is torn down: state Closed.
    Closed,
    /// Nothing happens: the state stays what it is.
    Ignored(XenbusState),
}

/// Node overrides on top of a valid single-queue publication; `None` removes the node.
struct Case {
    name: &'static str,
    nodes: Vec<(&'static str, Option<Vec<u8>>)>,
    state: &'static [u8],
    expect: Expect,
}

fn case(name: &'static str, nodes: &[(&'static str, Option<&[u8]>)], state: &'static [u8], expect: Expect) -> Case {
    Case { name, nodes: nodes.iter().map(|(n, v)| (*n, v.map(<[u8]>::to_vec))).collect(), state, expect }
}

fn cases() -> Vec<Case> {
    use Expect::*;
    let huge = |b: u8| Some(vec![b; 4096]);
    let mut v = vec![
        case("ring-ref not a number", &[("ring-ref", Some(b"abc"))], b"3", Fatal("ring-ref")),
        case("ring-ref not UTF-8", &[("ring-ref", Some(b"\xff\xfe"))], b"3", Fatal("ring-ref")),
        case("ring-ref missing", &[("ring-ref", None)], b"3", Fatal("ring-ref: missing")),
        case("ring-ref above 2^32", &[("ring-ref", Some(b"4294967296"))], b"3", Fatal("ring-ref")),
        case("ring-ref negative", &[("ring-ref", Some(b"-8"))], b"3", Fatal("ring-ref")),
        case(
            "ring-page-order above max",
            &[("ring-page-order", Some(b"5"))],
            b"3",
            Fatal("ring page order exceed max:4"),
        ),
        case("ring-page-order garbage", &[("ring-page-order", Some(b"1x"))], b"3", Fatal("ring-page-order")),
        case(
            "ring-refN short of 2^order",
            &[
                ("ring-page-order", Some(b"2")),
                ("ring-ref0", Some(b"1")),
                ("ring-ref1", Some(b"2")),
                ("ring-ref2", Some(b"3")),
            ],
            b"3",
            Fatal("ring-ref3: missing"),
        ),
        case("event-channel 0", &[("event-channel", Some(b"0"))], b"3", Fatal("event-channel")),
        case("event-channel missing", &[("event-channel", None)], b"3", Fatal("event-channel: missing")),
        case("event-channel with space", &[("event-channel", Some(b" 10"))], b"3", Fatal("event-channel")),
        case("protocol unknown", &[("protocol", Some(b"arm-abi"))], b"3", Fatal("unknown fe protocol")),
        case("protocol not UTF-8", &[("protocol", Some(b"x86_64-abi\xff"))], b"3", Fatal("unknown fe protocol")),
        case("zero queues", &[("multi-queue-num-queues", Some(b"0"))], b"3", Fatal("guest requested 0 queues")),
        case(
            "more queues than advertised",
            &[("multi-queue-num-queues", Some(b"5"))],
            b"3",
            Fatal("guest requested 5 queues, exceeding the maximum of 4."),
        ),
        case(
            "queue count overflow",
            &[("multi-queue-num-queues", Some(b"99999999999999999999999"))],
            b"3",
            Fatal("multi-queue-num-queues"),
        ),
        case(
            "second queue missing",
            &[
                ("multi-queue-num-queues", Some(b"2")),
                ("queue-0/ring-ref", Some(b"1")),
                ("queue-0/event-channel", Some(b"3")),
            ],
            b"3",
            Fatal("queue-1/event-channel: missing"),
        ),
        case("feature-persistent garbage", &[("feature-persistent", Some(b"yes"))], b"3", Fatal("feature-persistent")),
        case("frontend claims InitWait", &[], b"2", Fatal("saw state 2 at frontend")),
        case("frontend claims Reconfiguring", &[], b"7", Fatal("saw state 7 at frontend")),
        case("frontend state garbage", &[], b"4x", Closed),
        case("frontend state not UTF-8", &[], b"\xc3\x28", Closed),
        case("frontend goes straight to Connected", &[], b"4", Ignored(XenbusState::Connected)),
        case("frontend never answers", &[], b"1", Ignored(XenbusState::InitWait)),
    ];
    v.push(Case {
        name: "ring-ref of 4096 bytes",
        nodes: vec![("ring-ref", huge(b'9'))],
        state: b"3",
        expect: Fatal("longer than 20"),
    });
    v.push(Case {
        name: "protocol of 4096 bytes",
        nodes: vec![("protocol", huge(b'x'))],
        state: b"3",
        expect: Fatal("unknown fe protocol"),
    });
    v.push(Case {
        name: "event-channel of 4096 bytes",
        nodes: vec![("event-channel", huge(0xff))],
        state: b"3",
        expect: Fatal("event-channel"),
    });
    // The largest values xenstore takes (4096 bytes), in every other node the backend parses.
    let huge_cases: [(&'static str, &'static str, u8, &'static str); 5] = [
        ("multi-queue-num-queues of 4096 bytes", "multi-queue-num-queues", b'1', "longer than 20"),
        ("ring-page-order of 4096 bytes", "ring-page-order", b'0', "longer than 20"),
        ("feature-persistent of 4096 bytes", "feature-persistent", b'1', "feature-persistent"),
        ("protocol of 4096 NUL bytes", "protocol", 0, "unknown fe protocol"),
        ("event-channel of 4096 digits", "event-channel", b'7', "longer than 20"),
    ];
    for (name, node, byte, text) in huge_cases {
        v.push(Case { name, nodes: vec![(node, huge(byte))], state: b"3", expect: Fatal(text) });
    }
    v.push(Case {
        name: "ring-ref1 of 4096 bytes (order 1)",
        nodes: vec![
            ("ring-ref", None),
            ("ring-page-order", Some(b"1".to_vec())),
            ("ring-ref0", Some(b"8".to_vec())),
            ("ring-ref1", huge(b'9')),
        ],
        state: b"3",
        expect: Fatal("ring-ref1"),
    });
    v.push(Case {
        name: "queue-1/ring-ref not UTF-8 (two queues)",
        nodes: vec![
            ("multi-queue-num-queues", Some(b"2".to_vec())),
            ("queue-0/ring-ref", Some(b"8".to_vec())),
            ("queue-0/event-channel", Some(b"3".to_vec())),
            ("queue-1/ring-ref", Some(b"\xff\x80".to_vec())),
            ("queue-1/event-channel", Some(b"4".to_vec())),
        ],
        state: b"3",
        expect: Fatal("queue-1/ring-ref"),
    });
    v.push(Case { name: "frontend state of 4096 bytes", nodes: vec![], state: &[b'3'; 4096], expect: Closed });
    v
}

fn write_frontend(store: &dyn XenStore, fe: &str, nodes: &[(&'static str, Option<Vec<u8>>)]) {
    let base: [(&str, &[u8]); 4] =
        [("ring-ref", b"100"), ("event-channel", b"10"), ("protocol", b"x86_64-abi"), ("feature-persistent", b"1")];
    for (name, value) in base {
        if !nodes.iter().any(|(n, _)| *n == name) {
            store.write(TxId::NONE, &format!("{fe}/{name}"), value).expect("write base node");
        }
    }
    for (name, value) in nodes {
        let path = format!("{fe}/{name}");
        match value {
            Some(v) => store.write(TxId::NONE, &path, v).expect("write hostile node"),
            None => {
                let _ = store.rm(TxId::NONE, &path);
            }
        }
    }
}

fn settle() {
    std::thread::sleep(Duration::from_millis(150));
}

#[test]
fn hostile_frontend_nodes_fail_or_are_ignored_and_the_good_vbd_keeps_working() {
    let bed = Bed::new();
    let _good_guest = bed.guest(1);
    let good = bed.add_image_disk(1, false);
    bed.wait_state(good, XenbusState::InitWait);
    let good_store = bed.host.xenstore_as(1).expect("guest 1");
    let publication = Publication {
        ring_page_order: 0,
        rings: vec![PublishedRing { refs: vec![8], port: 3 }],
        abi: Some(BlkifAbi::X86_64),
        persistent: true,
    };
    handshake::publish(&good_store, &bed.frontend(good), &publication).expect("publish");
    bed.wait_state(good, XenbusState::Connected);

    let cases = cases();
    assert!(cases.len() >= 33, "{} cases", cases.len());
    let mut guests = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let domid = 100 + u16::try_from(i).expect("few cases");
        guests.push(bed.guest(domid));
        let id = bed.add_image_disk(domid, false);
        bed.wait_state(id, XenbusState::InitWait);
        let store = bed.host.xenstore_as(domid).expect("guest store");
        let fe = bed.frontend(id);
        write_frontend(&store, &fe, &c.nodes);
        store.write(TxId::NONE, &format!("{fe}/state"), c.state).expect("state");
        match c.expect {
            Expect::Fatal(text) => {
                let error = bed.wait_fatal(id);
                assert!(error.contains(text), "{}: error node {error:?} lacks {text:?}", c.name);
                assert!(bed.rings.started(domid).is_empty(), "{}: a data plane was started", c.name);
            }
            Expect::Closed => {
                bed.wait_state(id, XenbusState::Closed);
                assert!(bed.rings.started(domid).is_empty(), "{}", c.name);
            }
            Expect::Ignored(state) => {
                settle();
                assert_eq!(bed.backend_node(id, "state"), Some(state.as_node().into_bytes()), "{}", c.name);
                assert!(bed.toolstack.error(id).expect("read").is_none(), "{}", c.name);
            }
        }
    }
    assert_eq!(bed.backend_node(good, "state").as_deref(), Some(&b"4"[..]), "the good vbd is still connected");
    assert_eq!(bed.rings.started(1).len(), 1);
    assert!(!bed.rings.events().contains(&RingEvent::Stopped(1)), "the good vbd's data plane was never stopped");
}

/// Connect guest `domid` with a valid publication, returning its store and frontend path.
fn connected(
    bed: &Bed,
    domid: u16,
) -> (transport_xen::emulated::EmulatedXenStore, String, transport_xen::xenbus::VbdId) {
    let id = bed.add_image_disk(domid, false);
    bed.wait_state(id, XenbusState::InitWait);
    let store = bed.host.xenstore_as(domid).expect("guest store");
    let fe = bed.frontend(id);
    write_frontend(&store, &fe, &[]);
    store.write(TxId::NONE, &format!("{fe}/state"), b"3").expect("state");
    bed.wait_state(id, XenbusState::Connected);
    (store, fe, id)
}

#[test]
fn rings_rewritten_after_connect_are_ignored() {
    let bed = Bed::new();
    let _g = bed.guest(2);
    let (store, fe, id) = connected(&bed, 2);
    for (name, value) in [("ring-ref", &b"999"[..]), ("event-channel", b"0"), ("protocol", b"bogus"), ("state", b"3")] {
        store.write(TxId::NONE, &format!("{fe}/{name}"), value).expect("rewrite");
    }
    settle();
    assert_eq!(bed.backend_node(id, "state").as_deref(), Some(&b"4"[..]));
    assert_eq!(bed.rings.started(2).len(), 1);
    assert_eq!(bed.rings.started(2)[0].queues[0].ring_refs, vec![100]);
}

#[test]
fn nodes_rewritten_during_the_connect_yield_one_consistent_snapshot_or_a_clean_failure() {
    let bed = Bed::new();
    let _g = bed.guest(3);
    let id = bed.add_image_disk(3, false);
    bed.wait_state(id, XenbusState::InitWait);
    let store = bed.host.xenstore_as(3).expect("guest store");
    let fe = bed.frontend(id);
    write_frontend(&store, &fe, &[]);
    let spammer = {
        let store = bed.host.xenstore_as(3).expect("guest store");
        let fe = fe.clone();
        std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_millis(300);
            let mut n = 0u32;
            while Instant::now() < end {
                n += 1;
                let (rref, port) = if n % 2 == 0 { (b"200", b"20") } else { (b"300", b"30") };
                let _ = store.write(TxId::NONE, &format!("{fe}/ring-ref"), rref);
                let _ = store.write(TxId::NONE, &format!("{fe}/event-channel"), port);
            }
        })
    };
    store.write(TxId::NONE, &format!("{fe}/state"), b"3").expect("state");
    spammer.join().expect("spammer");
    let state = bed.toolstack.wait_backend_state(id, T, |s| s == XenbusState::Connected || s == XenbusState::Closing);
    match state.expect("a decision") {
        XenbusState::Connected => {
            let q = &bed.rings.started(3)[0].queues[0];
            let pair = (q.ring_refs[0], q.remote_port);
            // Any state the store passed through: the spammer's two writes are not one transaction, and it
            // writes the ring first (its first ring with the original port 10 is a state the store was in).
            let seen_states = [(100, 10), (300, 10), (200, 20), (300, 30), (200, 30), (300, 20)];
            assert!(seen_states.contains(&pair), "{pair:?}");
        }
        _ => assert!(bed.toolstack.error(id).expect("read").is_some()),
    }
}

#[test]
fn data_plane_refusal_and_halted_rings_fail_the_vbd_only() {
    let bed = Bed::new();
    let _g1 = bed.guest(4);
    let _g2 = bed.guest(5);
    let (_s4, _fe4, good) = connected(&bed, 4);

    bed.rings.fail_next_start(Fatal::new(libc::EINVAL, "mapping ring-ref 100 port 10: bad grant reference"));
    let id = bed.add_image_disk(5, false);
    bed.wait_state(id, XenbusState::InitWait);
    let store = bed.host.xenstore_as(5).expect("guest store");
    let fe = bed.frontend(id);
    write_frontend(&store, &fe, &[]);
    store.write(TxId::NONE, &format!("{fe}/state"), b"3").expect("state");
    assert_eq!(bed.wait_fatal(id), "22 mapping ring-ref 100 port 10: bad grant reference");

    bed.rings.halt(4, "req_prod 4000 is more than 32 ahead of req_cons 0");
    let error = bed.wait_fatal(good);
    assert!(error.starts_with("5 ring halted: req_prod 4000"), "{error}");
    assert_eq!(bed.rings.events().last(), Some(&RingEvent::Stopped(4)));
}

#[test]
fn frontend_removing_its_directory_tears_the_vbd_down() {
    let bed = Bed::new();
    let _g = bed.guest(6);
    let (store, fe, id) = connected(&bed, 6);
    store.rm(TxId::NONE, &fe).expect("guest removes its own device directory");
    bed.wait_state(id, XenbusState::Closed);
    assert_eq!(bed.rings.live(), 0);
}

#[test]
fn frontend_state_flipping_randomly_never_leaves_a_data_plane_behind() {
    let bed = Bed::new();
    let _good_guest = bed.guest(7);
    let (_gs, _gfe, good) = connected(&bed, 7);
    let _g = bed.guest(8);
    let (store, fe, id) = connected(&bed, 8);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let huge = vec![b'4'; 4096];
    for i in 0..2000u32 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let digit = [b'0' + u8::try_from(x % 9).expect("a digit")];
        let value: &[u8] = match (x >> 8) % 8 {
            0..=5 => &digit,
            6 => b"\xc3\x28",
            _ => &huge,
        };
        store.write(TxId::NONE, &format!("{fe}/state"), value).expect("flip");
        if i % 50 == 0 {
            // Let the backend see some of the intermediate states, not only the last one.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    store.write(TxId::NONE, &format!("{fe}/state"), b"6").expect("Closed");
    bed.wait_state(id, XenbusState::Closed);
    settle();
    let started = bed.rings.started(8).len();
    let stopped = bed.rings.events().iter().filter(|e| **e == RingEvent::Stopped(8)).count();
    assert_eq!(started, stopped, "every data plane started for the flipping frontend was stopped");
    assert_eq!(bed.backend_node(id, "state").as_deref(), Some(&b"6"[..]));
    assert_eq!(bed.backend_node(good, "state").as_deref(), Some(&b"4"[..]), "the good vbd is still connected");
    assert!(!bed.rings.events().contains(&RingEvent::Stopped(7)));
}
