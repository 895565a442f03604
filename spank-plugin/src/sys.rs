//! The one kernel call the plugin makes itself. Joining a container is the engine's
//! (`berth_engine::container::join`); this module owns only what is left for the very
//! last moment before the task's exec.

use std::io;

/// Sets `no_new_privs` on the calling task: from here on, no exec can gain privileges
/// (setuid, file capabilities), inside the image or out of it.
pub fn no_new_privs() -> io::Result<()> {
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) takes no pointers.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
