//! virtio-blk: request parsing from descriptor chains, config space, features.
