//! The few system calls the plugin makes itself. Joining a container is the engine's
//! (`berth_engine::container::join`); this module owns `no_new_privs` for the task's
//! exec and finding the plugin's own file.

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

/// The directory this plugin was loaded from (plugstack.conf names it by path, so a
/// Slurm command run inside a container needs it at the same place).
pub fn own_dir() -> Option<std::path::PathBuf> {
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    let addr = own_dir as *const libc::c_void;
    // SAFETY: dladdr only writes into `info`, which is valid, zeroed storage.
    let found = unsafe { libc::dladdr(addr, info.as_mut_ptr()) };
    // SAFETY: dladdr succeeded (non-zero), so it initialised `info`.
    let info = unsafe { info.assume_init() };
    if found == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname is a NUL-terminated path owned by the dynamic loader.
    let path = unsafe { std::ffi::CStr::from_ptr(info.dli_fname) }.to_string_lossy().into_owned();
    std::path::Path::new(&path).parent().map(std::path::Path::to_path_buf)
}

/// SIGKILLs `pid`; a process already gone is not an error worth reporting.
pub fn kill_now(pid: i32) {
    // SAFETY: kill takes no pointers; a stale pid at worst gets ESRCH.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}
