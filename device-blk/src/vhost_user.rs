//! The `VhostUserBackend` implementation serving a `Disk` over vhost-user-blk.
