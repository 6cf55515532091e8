// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Data isolation on the emulated host: a request never reads or writes outside the granted bytes it names
//! (`first_sect`..`last_sect` of each page) or outside the disk — including disks whose size is not a multiple of
//! 4 KiB nor of 512 (the trailing partial sector is never exposed and never modified) — and a response never
//! carries bytes of another request, another vbd or another guest. Both grant modes (map, and copy through the
//! shared bounce pool), both ABIs where the layout matters.

mod dataplane_util;

use std::os::unix::fs::FileExt;

use dataplane_util::{pattern, Bed, BedConfig};
use transport_xen::blkif::{encode, BlkifLayout, BlkifSegment, RawRequest, OP_READ, OP_WRITE, RSP_ERROR, RSP_OKAY};
use transport_xen::blkif::{X86_32, X86_64};
use transport_xen::emulated::{GrantedPages, GuestDomain};
use transport_xen::grant_memory::GrantMode;
use vm_memory::{Address, Bytes};

const MIB: u64 = 1 << 20;
const CANARY: u8 = 0xc5;
const PAGE_CANARY: u8 = 0xa7;
const MODES: [GrantMode; 2] = [GrantMode::Map, GrantMode::Copy];

fn seg(gref: u32, first: u8, last: u8) -> BlkifSegment {
    BlkifSegment { gref, first_sect: first, last_sect: last }
}

fn page_bytes(bed: &Bed<impl BlkifLayout>, page: usize) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    bed.guest.memory().read_slice(&mut b, GuestDomain::page_addr(page)).expect("read guest page");
    b
}

fn fill_page(bed: &Bed<impl BlkifLayout>, page: usize, bytes: &[u8]) {
    bed.guest.memory().write_slice(bytes, GuestDomain::page_addr(page)).expect("fill guest page");
}

/// Segments covering `sectors` sectors from the first byte of consecutive pages of `pages`.
fn segments(pages: &GrantedPages, sectors: u64) -> Vec<BlkifSegment> {
    (0..sectors.div_ceil(8))
        .map(|i| {
            let n = (sectors - i * 8).min(8);
            seg(pages.grefs[usize::try_from(i).expect("few")], 0, u8::try_from(n - 1).expect("<= 7"))
        })
        .collect()
}

/// One odd-sized disk: the last whole block reads and writes, anything beyond is refused, the bytes past the last
/// whole block and the guest pages of refused reads are never touched.
fn odd_disk<L: BlkifLayout>(size: u64, mode: GrantMode) {
    let mut bed = Bed::<L>::new(BedConfig { disk_bytes: size, ..Default::default() }.mode(mode));
    let geometry = *bed.disk.geometry();
    let lbs = u64::from(geometry.logical_block_size.bytes());
    let block = lbs / 512;
    let cap = geometry.capacity.0;
    assert_eq!(cap * 512, size / lbs * lbs, "capacity: whole logical blocks only");
    let exposed = cap * 512;
    // Disk content: a pattern up to the capacity, a canary beyond it.
    let content = pattern(usize::try_from(exposed).expect("small"), size);
    bed.file.as_file().write_all_at(&content, 0).expect("fill");
    let tail = usize::try_from(size - exposed).expect("small");
    bed.file.as_file().write_all_at(&vec![CANARY; tail], exposed).expect("canary");

    let pages = bed.fronts[0].grant_pages(4, false).expect("pages");
    let last = cap - block;
    let read = |id, sector, sectors| encode::rw::<L>(OP_READ, id, sector, &segments(&pages, sectors));
    let write = |id, sector, sectors| encode::rw::<L>(OP_WRITE, id, sector, &segments(&pages, sectors));
    let refused = [
        ("read past the end by one block", read(2, last, 2 * block)),
        ("read at the capacity", read(3, cap, block)),
        ("read of the block after the capacity", read(4, cap + block, block)),
        ("write past the end by one block", write(5, last, 2 * block)),
        ("write at the capacity", write(6, cap, block)),
    ];
    fill_page(&bed, pages.first, &[PAGE_CANARY; 4096]);
    fill_page(&bed, pages.first + 1, &[PAGE_CANARY; 4096]);
    for (name, r) in &refused {
        assert_eq!(bed.roundtrip(0, &[*r]), vec![RSP_ERROR], "{size} {mode:?}: {name}");
    }
    for page in 0..2 {
        assert_eq!(page_bytes(&bed, pages.first + page), vec![PAGE_CANARY; 4096], "refused reads wrote nothing");
    }
    // The last whole block reads what is on disk.
    assert_eq!(bed.roundtrip(0, &[read(7, last, block)]), vec![RSP_OKAY], "{size} {mode:?}: last block");
    let at = usize::try_from(last * 512).expect("small");
    assert_eq!(page_bytes(&bed, pages.first)[..usize::try_from(lbs).expect("small")], content[at..]);
    // And takes a write.
    let new = pattern(usize::try_from(lbs).expect("small"), size + 1);
    fill_page(&bed, pages.first, &new);
    assert_eq!(bed.roundtrip(0, &[write(8, last, block)]), vec![RSP_OKAY], "{size} {mode:?}: write last block");
    assert_eq!(bed.file_bytes(last * 512, new.len()), new);
    // Nothing beyond the exposed capacity changed, the file did not grow, and the refused writes wrote nothing.
    assert_eq!(bed.file_bytes(exposed, tail), vec![CANARY; tail], "{size} {mode:?}: the partial tail is untouched");
    assert_eq!(bed.file.as_file().metadata().expect("stat").len(), size);
    assert_eq!(bed.file_bytes(0, at), content[..at], "{size} {mode:?}: nothing else written");
    bed.stop();
    bed.fronts[0].release_pages(pages).expect("nothing stays mapped");
}

#[test]
fn disk_of_1_mib_plus_1536_bytes() {
    for mode in MODES {
        odd_disk::<X86_64>(MIB + 1536, mode);
    }
}

#[test]
fn disk_of_1_mib_plus_100_bytes() {
    for mode in MODES {
        odd_disk::<X86_64>(MIB + 100, mode);
    }
}

#[test]
fn disk_of_1_mib_plus_1636_bytes_x86_32() {
    for mode in MODES {
        odd_disk::<X86_32>(MIB + 1636, mode);
    }
}

/// Partial segments: the backend touches exactly the bytes `first_sect..=last_sect` names, in every page.
fn partial_segments<L: BlkifLayout>(mode: GrantMode) {
    let mut bed = Bed::<L>::new(BedConfig { max_indirect: 32, ..Default::default() }.mode(mode));
    let disk = pattern(64 << 10, 77);
    bed.file.as_file().write_all_at(&disk, 0).expect("fill disk");
    let rw = bed.fronts[0].grant_pages(2, false).expect("read pages");
    let ro = bed.fronts[0].grant_pages(2, true).expect("write pages");
    let desc = bed.fronts[0].grant_pages(1, true).expect("descriptor page");
    // (segments as (page, first_sect, last_sect), disk sector): one sector in the middle of a page, the last
    // sector of one page and the first of the next, sectors 2..=4 of one page and 5..=7 of the next.
    type Shape = Vec<(usize, u8, u8)>;
    let shapes: [(Shape, u64); 3] =
        [(vec![(0, 3, 3)], 10), (vec![(0, 7, 7), (1, 0, 0)], 20), (vec![(0, 2, 4), (1, 5, 7)], 33)];
    for (n, (shape, sector)) in shapes.iter().enumerate() {
        let id = 10 * n as u64;
        let sectors: u64 = shape.iter().map(|(_, f, l)| u64::from(l - f) + 1).sum();
        let at = |s: u64| usize::try_from(s * 512).expect("small");
        for indirect in [false, true] {
            // Read: the guest pages keep their canary outside the segments.
            for p in 0..2 {
                fill_page(&bed, rw.first + p, &[PAGE_CANARY; 4096]);
            }
            let segs: Vec<BlkifSegment> = shape.iter().map(|&(p, f, l)| seg(rw.grefs[p], f, l)).collect();
            let r = request::<L>(&bed, OP_READ, id + 1, *sector, &segs, indirect.then_some(&desc));
            assert_eq!(bed.roundtrip(0, &[r]), vec![RSP_OKAY], "{mode:?} read {shape:?} indirect {indirect}");
            let mut expect = [vec![PAGE_CANARY; 4096], vec![PAGE_CANARY; 4096]];
            let mut s = *sector;
            for &(p, f, l) in shape {
                let (from, to) = (usize::from(f) * 512, (usize::from(l) + 1) * 512);
                expect[p][from..to].copy_from_slice(&disk[at(s)..at(s) + to - from]);
                s += u64::from(l - f) + 1;
            }
            for (p, expected) in expect.iter().enumerate() {
                assert!(page_bytes(&bed, rw.first + p) == *expected, "{mode:?} read {shape:?} page {p}");
            }
            // Write: exactly the segment bytes reach the disk; the neighbouring sectors keep their content.
            let data = pattern(8192, id + 2 + u64::from(indirect));
            for p in 0..2 {
                let mut page = vec![PAGE_CANARY; 4096];
                for &(sp, f, l) in shape.iter().filter(|(sp, ..)| *sp == p) {
                    let (from, to) = (usize::from(f) * 512, (usize::from(l) + 1) * 512);
                    page[from..to].copy_from_slice(&data[sp * 4096 + from..sp * 4096 + to]);
                }
                fill_page(&bed, ro.first + p, &page);
            }
            let segs: Vec<BlkifSegment> = shape.iter().map(|&(p, f, l)| seg(ro.grefs[p], f, l)).collect();
            let w = request::<L>(&bed, OP_WRITE, id + 3, *sector, &segs, indirect.then_some(&desc));
            assert_eq!(bed.roundtrip(0, &[w]), vec![RSP_OKAY], "{mode:?} write {shape:?} indirect {indirect}");
            let mut written = Vec::new();
            for &(p, f, l) in shape {
                written
                    .extend_from_slice(&data[p * 4096 + usize::from(f) * 512..p * 4096 + (usize::from(l) + 1) * 512]);
            }
            let before = bed.file_bytes((sector - 1) * 512, 512);
            assert_eq!(before, disk[at(sector - 1)..at(*sector)], "{mode:?}: the sector before is untouched");
            assert!(bed.file_bytes(sector * 512, written.len()) == written, "{mode:?} write {shape:?}: the segments");
            let after = at(sector + sectors);
            assert_eq!(bed.file_bytes(after as u64, 512), disk[after..after + 512], "{mode:?}: the sector after");
            // Put the disk back for the next round.
            bed.file.as_file().write_all_at(&disk[at(*sector)..at(sector + sectors)], sector * 512).expect("restore");
        }
    }
    bed.stop();
    for p in [rw, ro, desc] {
        bed.fronts[0].release_pages(p).expect("nothing stays mapped");
    }
}

/// A direct request, or an indirect one whose descriptors are written into `desc`.
fn request<L: BlkifLayout>(
    bed: &Bed<L>,
    op: u8,
    id: u64,
    sector: u64,
    segs: &[BlkifSegment],
    desc: Option<&GrantedPages>,
) -> RawRequest {
    let Some(desc) = desc else { return encode::rw::<L>(op, id, sector, segs) };
    let mem = bed.guest.memory();
    for (i, s) in segs.iter().enumerate() {
        mem.write_slice(&s.encode(), GuestDomain::page_addr(desc.first).unchecked_add(i as u64 * 8)).expect("desc");
    }
    encode::indirect::<L>(op, id, sector, u16::try_from(segs.len()).expect("few"), &desc.grefs)
}

#[test]
fn partial_segments_touch_only_their_bytes_x86_64() {
    for mode in MODES {
        partial_segments::<X86_64>(mode);
    }
}

#[test]
fn partial_segments_touch_only_their_bytes_x86_32() {
    for mode in MODES {
        partial_segments::<X86_32>(mode);
    }
}

/// Many reads in one batch, each of its own disk region into its own page, with refused reads among them: every
/// page holds exactly its region (nothing of another request, even through the shared bounce pool), and the
/// pages of refused reads keep their canary.
fn one_batch_many_requests(mode: GrantMode) {
    let mut bed = Bed::<X86_64>::new(BedConfig::default().mode(mode));
    let sectors = bed.disk.geometry().capacity.0;
    let disk = pattern(1 << 20, 5);
    bed.file.as_file().write_all_at(&disk, 0).expect("fill");
    let count = 30;
    let pages = bed.fronts[0].grant_pages(count, false).expect("pages");
    for round in 0..4u64 {
        for p in 0..count {
            fill_page(&bed, pages.first + p, &[PAGE_CANARY; 4096]);
        }
        let requests: Vec<RawRequest> = (0..count)
            .map(|i| {
                let (id, g) = (round * 100 + i as u64, pages.grefs[i]);
                // Every fifth request reads past the end; the others read a region picked by round and index.
                let sector = if i % 5 == 4 { sectors - 4 } else { ((i as u64 * 7 + round * 13) % 250) * 8 };
                encode::rw::<X86_64>(OP_READ, id, sector, &[seg(g, 0, 7)])
            })
            .collect();
        let statuses = bed.roundtrip(0, &requests);
        for (i, status) in statuses.iter().enumerate() {
            let page = page_bytes(&bed, pages.first + i);
            if i % 5 == 4 {
                assert_eq!(*status, RSP_ERROR);
                assert!(page.iter().all(|&b| b == PAGE_CANARY), "{mode:?} round {round}: refused read {i} wrote");
            } else {
                assert_eq!(*status, RSP_OKAY);
                let at = usize::try_from(((i as u64 * 7 + round * 13) % 250) * 4096).expect("small");
                assert!(page == disk[at..at + 4096], "{mode:?} round {round}: read {i} got foreign bytes");
            }
        }
    }
    bed.stop();
    bed.fronts[0].release_pages(pages).expect("nothing stays mapped");
}

#[test]
fn responses_carry_only_their_own_bytes_map() {
    one_batch_many_requests(GrantMode::Map);
}

#[test]
fn responses_carry_only_their_own_bytes_copy() {
    one_batch_many_requests(GrantMode::Copy);
}

mod backend_support;

/// Two guests with a vbd each on one backend, doing I/O at the same time with batches in flight: every read
/// returns exactly what that guest wrote there (its own generation of the pattern), never the other guest's.
#[test]
fn two_guests_at_once_never_see_each_others_bytes() {
    use transport_xen::dataplane::DataplaneOptions;
    use transport_xen::frontend::load::{check_pattern, fill_pattern, Rng};
    use transport_xen::frontend::{Blkfront, BlkfrontConfig, Completion, IoRequest, XVDA};
    use transport_xen::xenbus::BackendConfig;

    for (round, mode) in MODES.into_iter().enumerate() {
        let host = backend_support::Host::new();
        let options = {
            let mut o = DataplaneOptions::default();
            o.grant_mode = mode;
            o
        };
        let backend = backend_support::BackendProcess::real(&host.host, BackendConfig::default(), options);
        let base = 60 + 2 * u16::try_from(round).expect("two rounds");
        let guests =
            [host.host.add_guest(base, 1024).expect("guest"), host.host.add_guest(base + 1, 1024).expect("guest")];
        for g in &guests {
            host.add_disk(g.domid(), 8 << 20);
        }
        std::thread::scope(|s| {
            for guest in &guests {
                s.spawn(move || {
                    let config = BlkfrontConfig { queues: 2, persistent: mode == GrantMode::Map, ..Default::default() };
                    let mut front = Blkfront::connect(guest, XVDA, config).expect("connect");
                    let mut rng = Rng::new(u64::from(guest.domid()));
                    for batch in 0..12u32 {
                        let generation = u32::from(guest.domid()) * 1000 + batch;
                        // 16 writes of 4..32 KiB at distinct places, all in flight at once, then 16 reads of them.
                        let places: Vec<(u64, usize)> = (0..16u64)
                            .map(|i| (i * 1024 + 8 * rng.below(64) as u64, 4096 * (1 + rng.below(8))))
                            .collect();
                        let data: Vec<Vec<u8>> = places
                            .iter()
                            .map(|&(sector, len)| {
                                let mut d = vec![0u8; len];
                                fill_pattern(&mut d, sector, generation);
                                d
                            })
                            .collect();
                        for (i, (&(sector, _), d)) in places.iter().zip(&data).enumerate() {
                            let q = i % 2;
                            assert!(front.submit(q, &IoRequest::Write { sector, data: d }, i as u64).expect("submit"));
                        }
                        let done = run(&mut front);
                        assert!(done.iter().all(|c| c.status == RSP_OKAY), "writes");
                        for (i, &(sector, len)) in places.iter().enumerate() {
                            assert!(front.submit(i % 2, &IoRequest::Read { sector, len }, i as u64).expect("submit"));
                        }
                        for c in run(&mut front) {
                            assert_eq!(c.status, RSP_OKAY);
                            let (sector, len) = places[usize::try_from(c.tag).expect("small")];
                            assert_eq!(c.data.len(), len);
                            assert_eq!(
                                check_pattern(&c.data, sector, generation),
                                None,
                                "{mode:?} dom {}",
                                guest.domid()
                            );
                        }
                    }
                    front.close().expect("close");
                });
            }
        });
        backend.stop().expect("stop");
        assert_eq!(host.host.live_mappings(), 0);
    }

    /// Kick both queues and wait for every request in flight.
    fn run(front: &mut Blkfront<'_>) -> Vec<Completion> {
        let mut out = Vec::new();
        for q in 0..2 {
            front.kick(q).expect("kick");
        }
        for q in 0..2 {
            while front.in_flight(q) > 0 {
                front.poll(q, &mut out).expect("completions");
            }
        }
        out
    }
}
