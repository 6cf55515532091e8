// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#![no_main]
//! See `blkback_fuzz::targets::xenbus_nodes` for the input layout and the invariants.
libfuzzer_sys::fuzz_target!(|data: &[u8]| blkback_fuzz::targets::xenbus_nodes::run(data));
