// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Support of the real-Xen lab tests: the shared Rust side (`lab`) and, next to it, the scripts they run in the
//! lab's dom0 and guests.

pub mod lab;
