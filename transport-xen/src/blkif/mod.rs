// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The blkif protocol: request/response layouts of both ABIs, the shared ring, request decoding and validation.
//!
//! Everything is generic over [`BlkifLayout`] ([`X86_64`] or [`X86_32`]): one implementation, two sets of
//! offsets. Requests are copied out of the shared ring once ([`BackRing::next_request`] into a [`RawRequest`]),
//! then decoded and checked ([`BlkifRequest::decode`]); nothing re-reads guest memory for a request's fields.

pub mod abi;
pub mod request;
pub mod ring;

pub use abi::{BlkifLayout, X86_32, X86_64};
pub use request::{
    encode, BlkifOp, BlkifRequest, BlkifResponse, BlkifSegment, IndirectPages, RawRequest, RequestFault,
    MAX_DIRECT_SEGMENTS, MAX_INDIRECT_PAGES, OP_DISCARD, OP_FLUSH_DISKCACHE, OP_INDIRECT, OP_READ, OP_RESERVED_1,
    OP_WRITE, OP_WRITE_BARRIER, RSP_EOPNOTSUPP, RSP_ERROR, RSP_OKAY, SEGMENTS_PER_INDIRECT_PAGE,
};
pub use ring::{BackRing, FrontRing, RingError};
