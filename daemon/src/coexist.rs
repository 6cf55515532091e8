// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Refusing to run beside the kernel's own block backend.
//!
//! Linux's `xen-blkback` registers the driver `vbd` on the `xen-backend` bus and so claims every
//! `backend/vbd/<domid>/<devid>` node of its domain, exactly the nodes `blkbackd xen` serves. Two backends answering
//! one frontend corrupt the xenbus handshake (both write `state`, both map the ring), so there can be only one per
//! backend domain. [`check_kernel_blkback`] looks at sysfs before anything touches xenstore and turns a loaded
//! `xen-blkback` into one line saying how to remove it.
//!
//! What sysfs shows (names from Linux's `drivers/block/xen-blkback` and `drivers/xen/xenbus`):
//! - `/sys/module/xen_blkback/initstate` exists only for a module that is loaded (a built-in driver has no
//!   `initstate`, although `/sys/module/xen_blkback` may exist for its parameters);
//! - `/sys/bus/xen-backend/drivers/vbd` exists while the driver is registered, module or built in (the xenbus core
//!   names a driver after its first device type, `vbd`).
//!
//! Its module alias `xen-backend:vbd` makes udev load the module again as soon as the toolstack writes a
//! `backend/vbd` node, so unloading alone is not enough: it must also be blacklisted.

use std::io;
use std::path::Path;

use anyhow::{bail, Context};

/// The module's directory under `/sys/module` (the module name with `_`, as the kernel spells it there).
const MODULE_DIR: &str = "module/xen_blkback";
/// The driver the module registers on the Xen backend bus.
const DRIVER_DIR: &str = "bus/xen-backend/drivers/vbd";

/// How the kernel's block backend is present, if it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KernelBlkback {
    /// Not loaded, not built in (or built in but not registered): blkbackd may serve `backend/vbd`.
    Absent,
    /// Loaded as the module `xen_blkback`: it can be unloaded and blacklisted.
    Module,
    /// Built into the running kernel and registered: it cannot be unloaded.
    BuiltIn,
}

/// Fails with one line if the kernel's `xen-blkback` is loaded or built in and registered, since it serves the very
/// `backend/vbd` nodes blkbackd would serve. `sysfs` is `/sys` in production (a fake tree in tests).
pub fn check_kernel_blkback(sysfs: &Path) -> anyhow::Result<()> {
    let found = detect(sysfs)?;
    tracing::debug!(?found, sysfs = %sysfs.display(), "looked for the kernel's xen-blkback");
    match found {
        KernelBlkback::Absent => Ok(()),
        KernelBlkback::Module => bail!(
            "the kernel's xen-blkback module is loaded and serves the same backend/vbd nodes as blkbackd (one block \
             backend per domain): with no guest disk attached, unload and blacklist it with `modprobe -r xen-blkback \
             && echo 'blacklist xen-blkback' > /etc/modprobe.d/blkbackd.conf`, then start blkbackd again"
        ),
        KernelBlkback::BuiltIn => bail!(
            "the kernel's xen-blkback is built into this kernel and serves the same backend/vbd nodes as blkbackd \
             (one block backend per domain); it cannot be unloaded: boot with `initcall_blacklist=xen_blkif_init` on \
             the kernel command line (or a kernel that builds it as a module), or run blkbackd in a driver domain \
             (--backend-domid)"
        ),
    }
}

/// What sysfs under `sysfs` says about the kernel's block backend.
fn detect(sysfs: &Path) -> anyhow::Result<KernelBlkback> {
    let module_loaded = present(&sysfs.join(MODULE_DIR).join("initstate"))?;
    let driver_registered = present(&sysfs.join(DRIVER_DIR))?;
    Ok(match (module_loaded, driver_registered) {
        (true, _) => KernelBlkback::Module,
        (false, true) => KernelBlkback::BuiltIn,
        (false, false) => KernelBlkback::Absent,
    })
}

/// Whether `path` exists; an error other than "not found" (e.g. no permission to look) is reported, not guessed.
fn present(path: &Path) -> anyhow::Result<bool> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot look for {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh fake sysfs root (a temporary directory, removed on drop).
    struct FakeSysfs(tempfile::TempDir);

    impl FakeSysfs {
        fn new() -> Self {
            let root = tempfile::tempdir().expect("create the fake sysfs");
            std::fs::create_dir_all(root.path().join("module")).expect("create the fake sysfs");
            std::fs::create_dir_all(root.path().join("bus/xen-backend/drivers")).expect("create the fake sysfs");
            FakeSysfs(root)
        }

        fn path(&self) -> &Path {
            self.0.path()
        }

        fn mkdir(&self, relative: &str) {
            std::fs::create_dir_all(self.path().join(relative)).expect("create a fake sysfs directory");
        }

        fn write(&self, relative: &str, text: &str) {
            std::fs::write(self.path().join(relative), text).expect("write a fake sysfs file");
        }
    }

    fn message(result: anyhow::Result<()>) -> String {
        format!("{:#}", result.expect_err("xen-blkback should have been found"))
    }

    #[test]
    fn nothing_loaded_passes() {
        let sysfs = FakeSysfs::new();
        // Other backends (netback) on the same bus are no concern.
        sysfs.mkdir("bus/xen-backend/drivers/vif");
        sysfs.mkdir("module/xen_netback/parameters");
        sysfs.write("module/xen_netback/initstate", "live\n");
        check_kernel_blkback(sysfs.path()).expect("no xen-blkback: blkbackd may run");
    }

    #[test]
    fn loaded_module_is_refused_with_the_commands_to_remove_it() {
        let sysfs = FakeSysfs::new();
        sysfs.mkdir("module/xen_blkback/parameters");
        sysfs.write("module/xen_blkback/initstate", "live\n");
        sysfs.mkdir("bus/xen-backend/drivers/vbd");
        let text = message(check_kernel_blkback(sysfs.path()));
        assert!(text.contains("backend/vbd"), "{text}");
        assert!(text.contains("modprobe -r xen-blkback"), "{text}");
        assert!(text.contains("blacklist xen-blkback"), "{text}");
        assert!(text.contains("/etc/modprobe.d/"), "{text}");
        assert!(!text.contains('\n'), "one line: {text}");
    }

    #[test]
    fn module_still_initialising_counts_as_loaded() {
        let sysfs = FakeSysfs::new();
        sysfs.mkdir("module/xen_blkback");
        sysfs.write("module/xen_blkback/initstate", "coming\n");
        assert_eq!(detect(sysfs.path()).expect("detect"), KernelBlkback::Module);
    }

    #[test]
    fn built_in_bound_driver_is_refused_with_the_boot_parameter() {
        let sysfs = FakeSysfs::new();
        // A built-in driver with parameters has /sys/module/xen_blkback/parameters but no initstate.
        sysfs.mkdir("module/xen_blkback/parameters");
        sysfs.mkdir("bus/xen-backend/drivers/vbd");
        let text = message(check_kernel_blkback(sysfs.path()));
        assert!(text.contains("built into this kernel"), "{text}");
        assert!(text.contains("cannot be unloaded"), "{text}");
        assert!(text.contains("initcall_blacklist=xen_blkif_init"), "{text}");
        assert!(!text.contains("modprobe -r"), "{text}");
        assert!(!text.contains('\n'), "one line: {text}");
    }

    #[test]
    fn built_in_without_parameters_directory_is_found_by_its_driver() {
        let sysfs = FakeSysfs::new();
        sysfs.mkdir("bus/xen-backend/drivers/vbd");
        assert_eq!(detect(sysfs.path()).expect("detect"), KernelBlkback::BuiltIn);
    }

    #[test]
    fn no_sysfs_at_all_passes() {
        let sysfs = FakeSysfs::new();
        let missing = sysfs.path().join("no-such-dir");
        assert_eq!(detect(&missing).expect("detect"), KernelBlkback::Absent);
    }
}
