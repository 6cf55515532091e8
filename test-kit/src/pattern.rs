// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Deterministic test data.

/// Fill `out`, meant for the bytes at `disk_offset` of a disk, with the pattern of `seed`: different for every
/// seed and every 512-byte sector, so a byte read back from the wrong place or of the wrong write shows.
pub fn fill_pattern_at(seed: u64, disk_offset: u64, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        let pos = disk_offset + i as u64;
        let x = pos.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed.wrapping_mul(0xff51_afd7_ed55_8ccd) ^ (pos >> 9);
        *b = x.to_le_bytes()[7] ^ x.to_le_bytes()[3];
    }
}

/// `len` bytes of the pattern of `seed`, as at offset 0 (so `pattern(n, s)[a..b]` is the pattern at offset `a`).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    fill_pattern_at(seed, 0, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_and_sectors_differ_and_offsets_agree() {
        let a = pattern(8192, 1);
        assert_ne!(a, pattern(8192, 2));
        assert_ne!(a[..512], a[512..1024]);
        let mut at = vec![0u8; 1000];
        fill_pattern_at(1, 3000, &mut at);
        assert_eq!(at, a[3000..4000]);
    }
}
