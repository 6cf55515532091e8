// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Hostile frontends end to end, against the real data plane (see `test_kit::xen_hostile`): each case asserts its
//! exact outcome and bounded backend CPU, and after each one a well-behaved vbd of another guest, served by the
//! same backend process, still reads back what it writes. (`daemon/tests/xen_hostile_process.rs` runs the same
//! cases next to a `blkbackd` process serving another guest.)

use test_kit::xen_hostile::{cases, run_cases, HostileBed};
use transport_xen::frontend::load::{check_pattern, fill_pattern};
use transport_xen::frontend::{Blkfront, BlkfrontConfig, XVDA};
use transport_xen::xenbus::XenbusState;

#[test]
fn hostile_frontends_end_to_end_and_the_other_vbd_keeps_working() {
    let mut bed = HostileBed::new();
    let bystander_guest = bed.guest(2, 512);
    let bystander = bed.add_disk(2);
    let config = BlkfrontConfig { persistent: true, queues: 2, ..BlkfrontConfig::default() };
    let mut front = Blkfront::connect(&bystander_guest, XVDA, config).expect("the bystander connects");
    let mut generation = 0;
    let mut check = |case: &str| {
        generation += 1;
        let mut data = vec![0u8; 16 << 10];
        fill_pattern(&mut data, 64, generation);
        front.write(64, &data).unwrap_or_else(|e| panic!("after {case}: bystander write: {e}"));
        let back = front.read(64, data.len()).unwrap_or_else(|e| panic!("after {case}: bystander read: {e}"));
        assert_eq!(check_pattern(&back, 64, generation), None, "after {case}");
    };
    let report = run_cases(&bed, 100, &mut check);
    assert_eq!(report.len(), cases().len());
    for (name, outcome) in &report {
        eprintln!("{name}: {outcome}");
    }
    assert_eq!(bed.state(bystander), Some(XenbusState::Connected));
    front.close().expect("the bystander closes cleanly");
    bed.stop_backend();
    assert_eq!(bed.host.live_mappings(), 0);
}
