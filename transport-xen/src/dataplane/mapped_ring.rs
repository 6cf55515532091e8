// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A blkif back ring that owns the grant mapping of its pages: the pages stay mapped exactly as long as the ring
//! can be used, whatever struct the ring is kept in and in whatever order that struct's fields drop.

use std::ops::{Deref, DerefMut};

use crate::blkif::{BackRing, BlkifLayout, RingError};
use crate::services::GrantMapping;

/// A [`BackRing`] over the pages of `M`, which it owns.
pub(crate) struct MappedRing<L, M: GrantMapping> {
    ring: BackRing<L>,
    mapping: M,
}

impl<L: BlkifLayout, M: GrantMapping> MappedRing<L, M> {
    /// Attach to the ring the frontend initialised in `mapping`'s pages, starting at index 0.
    pub(crate) fn attach(mapping: M) -> Result<Self, RingError> {
        // SAFETY: the pages are mapped for `mapping.len()` bytes until `mapping` is dropped, which happens only
        // with this value: the ring is never used without its mapping. (A mapping's pages do not move with it.)
        let ring = unsafe { BackRing::new(mapping.as_ptr(), mapping.len()) }?;
        Ok(MappedRing { ring, mapping })
    }

    /// Attach to a ring another backend served and left, resuming after its last response.
    pub(crate) fn resume(mapping: M) -> Result<Self, RingError> {
        // SAFETY: as in `attach`.
        let ring = unsafe { BackRing::resume(mapping.as_ptr(), mapping.len()) }?;
        Ok(MappedRing { ring, mapping })
    }

    /// The mapping of the ring's pages.
    pub(crate) fn mapping(&self) -> &M {
        &self.mapping
    }
}

impl<L, M: GrantMapping> Deref for MappedRing<L, M> {
    type Target = BackRing<L>;
    fn deref(&self) -> &BackRing<L> {
        &self.ring
    }
}

impl<L, M: GrantMapping> DerefMut for MappedRing<L, M> {
    fn deref_mut(&mut self) -> &mut BackRing<L> {
        &mut self.ring
    }
}
