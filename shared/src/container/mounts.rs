//! The mount tree inside a container's root, built before `pivot_root`: `/proc`, a
//! read-only `/sys`, a minimal `/dev` (standard nodes, the job's devices, `pts`,
//! `shm`), `/tmp`, and bind mounts (home, submit dir, site and user mounts).
//! Owns mount targets and flags. Every target is resolved inside the container's root
//! (`openat2` with RESOLVE_IN_ROOT), so an image's symlinks can never point a mount at
//! the host; berth's own mount points (`/.berth/...`, `/proc`, `/sys`, `/dev`, `/tmp`)
//! follow no symlink at all; missing mount points are created through the overlay,
//! hence in the container's upper dir. Must never choose a mount source itself: sources arrive as
//! descriptors already checked by the caller, and are opened again here only to bind
//! them from the new namespace after checking they are still the same files.
//!
//! Every mount is `nosuid,nodev`, except the bind mounts of device nodes and `devpts`,
//! which must allow device access to work at all (they are `nosuid,noexec`).

use crate::sys::{open_beneath, open_in_root};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::MsFlags;
use nix::sys::stat::{Mode, SFlag};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot create the mount point {target} in the container: {source}")]
    Target { target: PathBuf, source: Errno },
    #[error("cannot mount {what} at {target} in the container: {source}")]
    Mount { what: String, target: PathBuf, source: Errno },
    #[error("cannot mount {source_path} at {target}: {why}")]
    BadTarget { source_path: PathBuf, target: PathBuf, why: &'static str },
    #[error("cannot open the host's {path}: {source}")]
    Host { path: PathBuf, source: Errno },
    #[error("{path} changed while it was being mounted (replaced by another file); try again")]
    Changed { path: PathBuf },
    #[error("cannot create the mount point {target} in the container: {parent} is bound from the host, and berth creates nothing on the host; create it there yourself or pick another target")]
    InHostDir { target: PathBuf, parent: PathBuf },
    #[error("cannot make berth's mount point {target} in the container: it or a directory above it is a symlink in the image, and berth's own mount points follow none; fix the image")]
    Symlink { target: PathBuf },
}

/// One bind mount into the container.
#[derive(Debug)]
pub struct Bind {
    /// The host file or directory, already opened (and access-checked) by the caller.
    /// A mount can only be bound from the caller's own mount namespace, so `populate`
    /// opens `source_path` again inside the new namespace and refuses to go on unless
    /// it is the very same file.
    pub source: OwnedFd,
    /// The host path the source was opened from, for messages.
    pub source_path: PathBuf,
    /// An absolute path inside the container.
    pub target: PathBuf,
    pub read_only: bool,
    /// Opened with the job user's rights (home, submit dir, user mounts), so it must be
    /// opened again with them: a root-squashed NFS home refuses root.
    pub as_user: bool,
}

/// What goes into a container besides its image.
#[derive(Debug, Default)]
pub struct Layout {
    /// Home, submit dir, site and user mounts.
    pub binds: Vec<Bind>,
    /// Extra device nodes the job may use (targets under `/dev`).
    pub devices: Vec<Bind>,
    /// Forbid writes to the container's root (its mounts keep their own modes).
    pub read_only_root: bool,
    /// Inside a user namespace: fresh proc/sysfs are refused and host mounts with
    /// submounts can only be bound whole, so bind recursively and fall back to the
    /// host's /proc.
    pub in_user_namespace: bool,
}

const STANDARD_DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];
const RESERVED: &[&str] = &["/proc", "/sys", "/dev"];
/// berth's own tree in every container (wiring, Slurm's client, the node's root).
const BERTH_DIR: &str = "/.berth";
/// Files berth appends to as root (`wiring`): a user's bind there would make root write
/// into whatever host file the user could merely read.
const WRITTEN_BY_BERTH: &[&str] = &["/etc/passwd", "/etc/group", "/etc/hosts"];

fn fd_path(fd: BorrowedFd<'_>) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// Normal components of an absolute path; `None` if it has `..` or is relative.
fn components(path: &Path) -> Option<Vec<&std::ffi::OsStr>> {
    if !path.is_absolute() {
        return None;
    }
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => out.push(name),
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Why a bind target is refused, if it is.
pub fn check_target(target: &Path) -> Result<(), &'static str> {
    let parts = components(target).ok_or("the target must be an absolute path without '..'")?;
    if parts.is_empty() {
        return Err("the container's root cannot be replaced");
    }
    if RESERVED.iter().any(|r| target.starts_with(r)) {
        return Err("/proc, /sys and /dev are berth's to set up");
    }
    Ok(())
}

/// Whether `target` is one of berth's own mount points, which follow no symlink.
fn is_berths_own(target: &Path) -> bool {
    target.starts_with(BERTH_DIR) || target == Path::new("/tmp") || RESERVED.iter().any(|r| target.starts_with(r))
}

/// Why a target of the job user's own bind mounts is refused, if it is: besides
/// [`check_target`], a writable bind into berth's `/.berth` or onto a file berth
/// appends to as root (root would write into any host file the user may only read).
/// Read-only binds there are fine: the Slurm plugin binds the node's `/etc/hosts` and
/// its `/.berth/host` and `/.berth/bin` so.
pub fn check_user_target(target: &Path, read_only: bool) -> Result<(), &'static str> {
    check_target(target)?;
    if !read_only && target.starts_with(BERTH_DIR) {
        return Err("binds into /.berth, berth's own, must be read-only (add :ro)");
    }
    // A directory above them too (/etc): root would write into the bound dir.
    if !read_only && WRITTEN_BY_BERTH.iter().any(|w| Path::new(w).starts_with(target)) {
        return Err("berth adds the job's user and nodes to /etc/passwd, /etc/group and /etc/hosts as root, so binds onto them or onto /etc must be read-only (add :ro)");
    }
    Ok(())
}

/// Opens `path` inside `root`, creating it (a directory, or an empty file when
/// `dir` is false) and its missing parents, but never in a directory on a file system
/// of `host_devs` (host directories already bound in): root must not create files on
/// the host where a job user asks for a mount point.
fn ensure(root: BorrowedFd<'_>, path: &Path, dir: bool, host_devs: &[u64]) -> Result<OwnedFd, MountError> {
    let err = |source| MountError::Target { target: path.to_path_buf(), source };
    // berth's own mount points (its tree, /proc, /sys, /dev, /tmp) are where berth
    // later writes as root or what it relies on: the image may not redirect them with
    // a symlink, not even inside the container. Resolution stops at the first symlink
    // (ELOOP) or the first missing component (ENOENT), so ENOENT means no symlink
    // lies on the part that exists.
    if is_berths_own(path) && matches!(open_beneath(root, path, OFlag::O_PATH, 0, true), Err(Errno::ELOOP)) {
        return Err(MountError::Symlink { target: path.to_path_buf() });
    }
    let want = if dir { OFlag::O_PATH | OFlag::O_DIRECTORY } else { OFlag::O_PATH };
    match open_in_root(root, path, want, 0) {
        Ok(fd) => return Ok(fd),
        Err(Errno::ENOENT) => {}
        Err(e) => return Err(err(e)),
    }
    let parts = components(path).ok_or_else(|| err(Errno::EINVAL))?;
    let mut current = PathBuf::from("/");
    for (i, name) in parts.iter().enumerate() {
        let parent = open_in_root(root, &current, OFlag::O_PATH | OFlag::O_DIRECTORY, 0).map_err(err)?;
        let exists = open_in_root(parent.as_fd(), Path::new(name), OFlag::O_PATH, 0).is_ok();
        if !exists && host_devs.contains(&nix::sys::stat::fstat(parent.as_raw_fd()).map_err(err)?.st_dev) {
            return Err(MountError::InHostDir { target: path.to_path_buf(), parent: current });
        }
        if i + 1 == parts.len() && !dir {
            let flags = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW;
            match open_in_root(parent.as_fd(), Path::new(name), flags, 0o644) {
                Ok(_) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(err(e)),
            }
        } else {
            match nix::sys::stat::mkdirat(Some(parent.as_raw_fd()), *name, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(err(e)),
            }
        }
        current.push(name);
    }
    open_in_root(root, path, want, 0).map_err(err)
}

fn mount_on(
    what: &str,
    source: Option<&str>,
    target_fd: BorrowedFd<'_>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), MountError> {
    nix::mount::mount(source, fd_path(target_fd).as_str(), fstype, flags, data).map_err(|source| MountError::Mount {
        what: what.to_string(),
        target: target.to_path_buf(),
        source,
    })
}

/// Bind-mounts `source` at `target` inside `root`, then applies `flags` to the new
/// mount (a bind mount takes its flags only from a remount).
fn bind(
    root: BorrowedFd<'_>,
    source: BorrowedFd<'_>,
    what: &str,
    target: &Path,
    flags: MsFlags,
    recursive: bool,
    host_devs: &[u64],
) -> Result<(), MountError> {
    let stat = nix::sys::stat::fstat(source.as_raw_fd()).map_err(|source| MountError::Mount {
        what: what.to_string(),
        target: target.to_path_buf(),
        source,
    })?;
    let is_dir = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR;
    let target_fd = ensure(root, target, is_dir, host_devs)?;
    let bind_flags = if recursive { MsFlags::MS_BIND | MsFlags::MS_REC } else { MsFlags::MS_BIND };
    mount_on(what, Some(fd_path(source).as_str()), target_fd.as_fd(), target, None, bind_flags, None)?;
    // Reopen: the old descriptor names the directory under the new mount.
    let mounted = open_in_root(root, target, OFlag::O_PATH, 0).map_err(|source| MountError::Target {
        target: target.to_path_buf(),
        source,
    })?;
    if recursive {
        // Submounts keep their own flags under a remount: restrict the whole tree.
        let restrictions = crate::sys::MountRestrictions {
            read_only: flags.contains(MsFlags::MS_RDONLY),
            nosuid: flags.contains(MsFlags::MS_NOSUID),
            nodev: flags.contains(MsFlags::MS_NODEV),
            noexec: flags.contains(MsFlags::MS_NOEXEC),
        };
        match crate::sys::restrict_tree(mounted.as_fd(), &restrictions) {
            Err(Errno::ENOSYS) => {}
            other => {
                return other.map_err(|source| MountError::Mount { what: what.to_string(), target: target.to_path_buf(), source })
            }
        }
    }
    // Keep restrictions the source's own mount has (a remount may not lift them).
    let inherited = nix::sys::statvfs::fstatvfs(source).map(|s| s.flags()).unwrap_or(nix::sys::statvfs::FsFlags::empty());
    let mut keep = MsFlags::empty();
    for (st, ms) in [
        (nix::sys::statvfs::FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (nix::sys::statvfs::FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (nix::sys::statvfs::FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (nix::sys::statvfs::FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (nix::sys::statvfs::FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if inherited.contains(st) {
            keep |= ms;
        }
    }
    mount_on(what, None, mounted.as_fd(), target, None, MsFlags::MS_REMOUNT | MsFlags::MS_BIND | flags | keep, None)
}

/// Opens every source again in the current (new) mount namespace, checking each is
/// the file the caller opened (same device and inode): the kernel binds only from
/// mounts of the caller's namespace. Call right after unshare, before anything hides
/// a source's path.
/// Only the sources whose `as_user` is `as_user` are opened: the caller runs this once
/// with the user's file-system identity and once with its own.
pub fn reopen_sources(layout: &mut Layout, as_user: bool) -> Result<(), MountError> {
    for b in layout.binds.iter_mut().chain(layout.devices.iter_mut()).filter(|b| b.as_user == as_user) {
        b.source = reopen(b)?;
    }
    Ok(())
}

fn reopen(bind: &Bind) -> Result<OwnedFd, MountError> {
    let path = bind.source_path.to_str().ok_or_else(|| MountError::Host { path: bind.source_path.clone(), source: Errno::EINVAL })?;
    let fd = host(path)?;
    let stat = |fd: BorrowedFd<'_>| nix::sys::stat::fstat(fd.as_raw_fd()).map(|s| (s.st_dev, s.st_ino));
    let here = stat(fd.as_fd()).map_err(|source| MountError::Host { path: bind.source_path.clone(), source })?;
    let checked = stat(bind.source.as_fd()).map_err(|source| MountError::Host { path: bind.source_path.clone(), source })?;
    if here != checked {
        return Err(MountError::Changed { path: bind.source_path.clone() });
    }
    Ok(fd)
}

fn host(path: &str) -> Result<OwnedFd, MountError> {
    let raw = nix::fcntl::open(path, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|source| MountError::Host { path: path.into(), source })?;
    // SAFETY: open just returned this descriptor; nothing else owns it.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
}

/// Builds the whole tree under `root` (the overlay's root, still in the host's view),
/// from sources already passed through [`reopen_sources`].
pub fn populate(root: BorrowedFd<'_>, layout: Layout) -> Result<(), MountError> {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let quiet = nosuid_nodev | MsFlags::MS_NOEXEC;
    let rec = layout.in_user_namespace;

    let proc_dir = Path::new("/proc");
    let fd = ensure(root, proc_dir, true, &[])?;
    if let Err(e) = mount_on("proc", Some("proc"), fd.as_fd(), proc_dir, Some("proc"), quiet, None) {
        if !rec {
            return Err(e);
        }
        // A user namespace may mount proc only for a PID namespace it owns.
        bind(root, host("/proc")?.as_fd(), "/proc", proc_dir, quiet, true, &[])?;
    }

    let sys_dir = Path::new("/sys");
    let fd = ensure(root, sys_dir, true, &[])?;
    if mount_on("sysfs", Some("sysfs"), fd.as_fd(), sys_dir, Some("sysfs"), quiet | MsFlags::MS_RDONLY, None).is_err() {
        // A network namespace we do not own refuses a fresh sysfs: show the host's, read-only.
        bind(root, host("/sys")?.as_fd(), "/sys", sys_dir, quiet | MsFlags::MS_RDONLY, true, &[])?;
    }

    let dev_dir = Path::new("/dev");
    let fd = ensure(root, dev_dir, true, &[])?;
    mount_on("/dev", Some("tmpfs"), fd.as_fd(), dev_dir, Some("tmpfs"), quiet, Some("mode=0755,size=64k"))?;
    let device_flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    for name in STANDARD_DEVICES {
        let host_path = format!("/dev/{name}");
        bind(root, host(&host_path)?.as_fd(), &host_path, Path::new(&host_path), device_flags, false, &[])?;
    }
    for device in &layout.devices {
        let what = device.source_path.display().to_string();
        bind(root, device.source.as_fd(), &what, &device.target, device_flags, false, &[])?;
    }
    let pts = Path::new("/dev/pts");
    let fd = ensure(root, pts, true, &[])?;
    mount_on("devpts", Some("devpts"), fd.as_fd(), pts, Some("devpts"), device_flags, Some("newinstance,ptmxmode=0666,mode=0620"))?;
    let shm = Path::new("/dev/shm");
    let fd = ensure(root, shm, true, &[])?;
    mount_on("/dev/shm", Some("tmpfs"), fd.as_fd(), shm, Some("tmpfs"), nosuid_nodev, Some("mode=1777"))?;
    let dev = open_in_root(root, dev_dir, OFlag::O_PATH | OFlag::O_DIRECTORY, 0)
        .map_err(|source| MountError::Target { target: dev_dir.into(), source })?;
    for (name, to) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        nix::unistd::symlinkat(to, Some(dev.as_raw_fd()), name)
            .map_err(|source| MountError::Target { target: dev_dir.join(name), source })?;
    }

    let tmp = Path::new("/tmp");
    let fd = ensure(root, tmp, true, &[])?;
    mount_on("/tmp", Some("tmpfs"), fd.as_fd(), tmp, Some("tmpfs"), nosuid_nodev, Some("mode=1777"))?;

    // Parents before children, so a mount inside another mount's target lands on top.
    let mut binds = layout.binds;
    binds.sort_by_key(|b| b.target.components().count());
    let mut host_devs = Vec::new();
    for b in &binds {
        check_target(&b.target).map_err(|why| MountError::BadTarget {
            source_path: b.source_path.clone(),
            target: b.target.clone(),
            why,
        })?;
        let flags = if b.read_only { nosuid_nodev | MsFlags::MS_RDONLY } else { nosuid_nodev };
        bind(root, b.source.as_fd(), &b.source_path.display().to_string(), &b.target, flags, rec, &host_devs)?;
        let source = nix::sys::stat::fstat(b.source.as_raw_fd()).map_err(|source| MountError::Host { path: b.source_path.clone(), source })?;
        host_devs.push(source.st_dev);
    }

    if layout.read_only_root {
        mount_on("the root", None, root, Path::new("/"), None, MsFlags::MS_REMOUNT | MsFlags::MS_BIND | nosuid_nodev | MsFlags::MS_RDONLY, None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_targets_must_be_absolute_clean_and_outside_berths_own_mounts() {
        assert!(check_target(Path::new("/data")).is_ok());
        assert!(check_target(Path::new("/home/ann/work")).is_ok());
        assert!(check_target(Path::new("data")).is_err());
        assert!(check_target(Path::new("/a/../etc")).is_err());
        assert!(check_target(Path::new("/")).is_err());
        assert!(check_target(Path::new("/proc/1")).is_err());
        assert!(check_target(Path::new("/dev")).is_err());
        assert!(check_target(Path::new("/devices")).is_ok());
    }

    #[test]
    fn user_targets_also_keep_off_berths_dir_and_the_files_berth_writes() {
        assert!(check_user_target(Path::new("/data"), false).is_ok());
        assert!(check_user_target(Path::new("/etc/passwd.d"), false).is_ok());
        assert!(check_user_target(Path::new("/etcetera"), false).is_ok());
        for bad in ["/.berth", "/.berth/wiring", "/.berth/host/etc", "/etc/passwd", "/etc/group", "/etc/hosts", "/etc", "/etc/"] {
            assert!(check_user_target(Path::new(bad), false).is_err(), "{bad}");
            assert!(check_user_target(Path::new(bad), true).is_ok(), "{bad} read-only");
        }
        for bad in ["/proc/sys", "/", "/dev/shm"] {
            assert!(check_user_target(Path::new(bad), true).is_err(), "{bad}");
        }
    }
}
