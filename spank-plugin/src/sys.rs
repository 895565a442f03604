//! The one kernel call the plugin makes itself: entering a container's mount namespace.
//! Owns nothing else; everything heavier is done by the `berth` binary.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Moves the calling process into the mount namespace pinned at `handle` (a bind mount
/// of `/proc/PID/ns/mnt`). The kernel also moves the root and working directory to the
/// namespace's root. Must be called by a single-threaded process with CAP_SYS_ADMIN:
/// slurmstepd's forked task child in `task_init_privileged` is both.
pub fn enter_mount_namespace(handle: &File) -> io::Result<()> {
    // SAFETY: setns only reads the fd, which `handle` keeps open for the call.
    let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNS) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Opens a namespace handle without following it anywhere else.
pub fn open_namespace(path: &Path) -> io::Result<File> {
    File::open(path)
}
