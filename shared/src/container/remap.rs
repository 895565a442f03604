//! User remapping: where the admin sets `remap_user`, a task runs as the image's
//! `USER` (or as root, when the user asks for it) inside a user namespace that maps
//! that one id to the job user. On the host the task stays the job user; the
//! namespace's capabilities reach only what the job user owns. Without `remap_user`
//! the image's `USER` is ignored and nothing here runs.
//!
//! The namespace is made by the task itself, as the job user, after it has joined the
//! container and dropped to the user: the kernel lets an unprivileged process map its
//! own ids, so no privileged helper is involved and the container's mount namespace
//! (owned by the host's user namespace) keeps every mount locked.

use super::inroot;
use crate::identity::Credentials;
use crate::config::Config;
use nix::errno::Errno;
use nix::sched::CloneFlags;
use std::os::fd::AsFd;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum RemapError {
    #[error("this site does not allow running as root in containers (--container-remap-root / --remap-root); ask the admin to set remap_user = true, or drop the option")]
    NotAllowed,
    #[error("the image's USER '{user}' is not in the image's {file}; fix the image or ask the admin to turn remap_user off")]
    UnknownUser { user: String, file: &'static str },
    #[error("cannot read the image's {file} as the job user: {source}")]
    Read { file: &'static str, source: std::io::Error },
    #[error("cannot run as the image's user in a user namespace: {step} failed: {source}; the node may forbid unprivileged user namespaces (sysctl user.max_user_namespaces)")]
    Namespace { step: &'static str, source: Errno },
}

/// The ids a task takes inside its user namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InsideIds {
    pub uid: u32,
    pub gid: u32,
}

impl InsideIds {
    pub const ROOT: InsideIds = InsideIds { uid: 0, gid: 0 };
}

/// Whom a task of this container runs as inside: `None` for the job user as is.
/// `want_root` is the user's `--container-remap-root`. Reads the image's
/// `/etc/passwd` and `/etc/group` (call after joining the container) with the job
/// user's rights and through no symlink, regular files only, size-capped.
///
/// An image without `USER` runs as the job user even with `remap_user`: most HPC
/// images have none, and Docker's root default would make MPI launchers refuse to run.
pub fn choose(config: &Config, image_user: Option<&str>, want_root: bool, user: &Credentials) -> Result<Option<InsideIds>, RemapError> {
    if !config.remap_user {
        return if want_root { Err(RemapError::NotAllowed) } else { Ok(None) };
    }
    if want_root {
        return Ok(Some(InsideIds::ROOT));
    }
    let Some(spec) = image_user.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    // No symlink, no FIFO, no endless file (`inroot`): a FIFO or /dev/zero at
    // /etc/passwd would hang the task's root process or exhaust its memory.
    let read = |file: &'static str| -> Result<String, RemapError> {
        let text = user
            .with_fs_identity(|| inroot::current_root().and_then(|root| inroot::read_across_mounts(root.as_fd(), Path::new(file), inroot::READ_LIMIT)))
            .map_err(|e| RemapError::Read { file, source: std::io::Error::other(e.to_string()) })?;
        // An image without the file can still name numeric ids.
        text.map(Option::unwrap_or_default).map_err(|e| RemapError::Read { file, source: std::io::Error::other(e.to_string()) })
    };
    let (name, group) = match spec.split_once(':') {
        Some((name, group)) => (name, Some(group)),
        None => (spec, None),
    };
    let passwd = read("/etc/passwd")?;
    let (uid, primary_gid) = match name.parse::<u32>() {
        Ok(uid) => (uid, lookup(&passwd, |f| f[2] == name).and_then(|f| f[3].parse().ok()).unwrap_or(0)),
        Err(_) => {
            let fields = lookup(&passwd, |f| f[0] == name)
                .ok_or_else(|| RemapError::UnknownUser { user: spec.to_string(), file: "/etc/passwd" })?;
            let id = |i: usize| fields[i].parse::<u32>().ok();
            match (id(2), id(3)) {
                (Some(uid), Some(gid)) => (uid, gid),
                _ => return Err(RemapError::UnknownUser { user: spec.to_string(), file: "/etc/passwd" }),
            }
        }
    };
    let gid = match group {
        None => primary_gid,
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup(&read("/etc/group")?, |f| f[0] == group)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| RemapError::UnknownUser { user: spec.to_string(), file: "/etc/group" })?,
        },
    };
    Ok(Some(InsideIds { uid, gid }))
}

/// The first line of a passwd/group file (at least 4 fields) that `matches`.
fn lookup(text: &str, matches: impl Fn(&[&str]) -> bool) -> Option<Vec<&str>> {
    text.lines().map(|line| line.split(':').collect::<Vec<_>>()).find(|f| f.len() >= 4 && matches(f))
}

/// Enters a new user namespace in which the caller's current effective ids appear as
/// `inside`. Call as the job user (after dropping from root), single-threaded, just
/// before exec.
pub fn enter(inside: InsideIds) -> Result<(), RemapError> {
    let fail = |step| move |source| RemapError::Namespace { step, source };
    let (uid, gid) = (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw());
    // After a drop from root the process is not dumpable, which makes its /proc files
    // root's and the maps below unwritable by the process itself.
    nix::sys::prctl::set_dumpable(true).map_err(fail("making the task dumpable"))?;
    nix::sched::unshare(CloneFlags::CLONE_NEWUSER).map_err(fail("unshare(CLONE_NEWUSER)"))?;
    for (file, text) in [
        ("/proc/self/setgroups", "deny".to_string()),
        ("/proc/self/uid_map", format!("{} {uid} 1", inside.uid)),
        ("/proc/self/gid_map", format!("{} {gid} 1", inside.gid)),
    ] {
        std::fs::write(file, text).map_err(|e| RemapError::Namespace {
            step: file,
            source: Errno::from_raw(e.raw_os_error().unwrap_or(Errno::EIO as i32)),
        })?;
    }
    // Not dumpable again until exec: until then the process still holds what its root
    // parent left it (slurmstepd's memory, descriptors marked close-on-exec), which
    // another process of the job user must not ptrace or read through /proc.
    nix::sys::prctl::set_dumpable(false).map_err(fail("making the task undumpable again"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(remap: bool) -> Config {
        Config { remap_user: remap, ..Config::default() }
    }

    fn me() -> Credentials {
        Credentials::current()
    }

    #[test]
    fn without_the_admins_setting_user_is_ignored_and_root_refused() {
        assert_eq!(choose(&config(false), Some("root"), false, &me()).unwrap(), None);
        assert!(matches!(choose(&config(false), None, true, &me()), Err(RemapError::NotAllowed)));
    }

    #[test]
    fn with_it_root_on_request_and_numeric_users_need_no_files() {
        assert_eq!(choose(&config(true), None, true, &me()).unwrap(), Some(InsideIds::ROOT));
        assert_eq!(choose(&config(true), None, false, &me()).unwrap(), None);
        assert_eq!(choose(&config(true), Some("4242:77"), false, &me()).unwrap(), Some(InsideIds { uid: 4242, gid: 77 }));
    }

    #[test]
    fn passwd_lines_are_matched_by_field() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\napp:x:1001:1002::/home/app:/bin/sh\n";
        assert_eq!(lookup(passwd, |f| f[0] == "app").map(|f| f[2]), Some("1001"));
        assert_eq!(lookup(passwd, |f| f[0] == "ap"), None);
    }
}
