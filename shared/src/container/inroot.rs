//! berth's own files inside a container, read and written as root: the wiring's
//! additions to `/etc/passwd`, `/etc/group` and `/etc/hosts`, `/.berth/...` (the wiring
//! dir's mount point, the Slurm hostfile), mount points for a step's PMIx dirs.
//!
//! Owns how root reaches such a path: from a descriptor of the container's root, one
//! `openat2` with no symlink followed in any component (the image's, a user's), no
//! magic link, nothing above the root, and for writes no mount crossed, so a write
//! lands in the container's own upper dir, never in a host file reached through a bind
//! mount, `/proc` or `/sys`. Reads take regular files only, never block (a FIFO) and
//! stop at a size cap (`/dev/zero`, a huge file). Must never resolve a path the image
//! or the job user controls any other way, and never create anything on a mount
//! bound from the host.

use crate::sys::open_beneath;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, SFlag};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

/// What root reads of the image's small files (passwd, group, hosts) at most.
pub const READ_LIMIT: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
#[error("cannot {action} the container's {}: {why}", path.display())]
pub struct InRootError {
    pub action: &'static str,
    pub path: PathBuf,
    pub why: String,
    /// The kernel's answer, when it gave one (EXDEV: the path is on a mount).
    pub errno: Option<Errno>,
}

impl InRootError {
    fn new(action: &'static str, path: &Path, errno: Errno) -> InRootError {
        let why = match errno {
            Errno::ELOOP => "it or a directory above it is a symlink, and berth follows none where it acts as root; fix the image".to_string(),
            Errno::EXDEV => "it or a directory above it is a mount (bound from the host), and berth writes as root only into the image's own files".to_string(),
            e => e.desc().to_string(),
        };
        InRootError { action, path: path.to_path_buf(), why, errno: Some(errno) }
    }

    fn other(action: &'static str, path: &Path, why: String) -> InRootError {
        InRootError { action, path: path.to_path_buf(), why, errno: None }
    }

    /// Whether the path (or a directory above it) is a mount point.
    pub fn is_on_a_mount(&self) -> bool {
        self.errno == Some(Errno::EXDEV)
    }

    /// Whether the container's file system refused the write as read-only.
    pub fn is_read_only(&self) -> bool {
        self.errno == Some(Errno::EROFS)
    }
}

type Result<T> = std::result::Result<T, InRootError>;

/// The current root (`/`, inside a container once joined), as a descriptor to start from.
pub fn current_root() -> Result<OwnedFd> {
    let raw = nix::fcntl::open("/", OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| InRootError::new("open", Path::new("/"), e))?;
    // SAFETY: open just returned this descriptor; nothing else owns it.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
}

/// The normal components of an absolute path without `..`.
fn parts(path: &Path) -> Result<Vec<&std::ffi::OsStr>> {
    let bad = || InRootError::other("reach", path, "not an absolute path without '..'".into());
    if !path.is_absolute() {
        return Err(bad());
    }
    path.components()
        .filter(|c| !matches!(c, Component::RootDir | Component::CurDir))
        .map(|c| match c {
            Component::Normal(name) => Ok(name),
            _ => Err(bad()),
        })
        .collect()
}

/// Opens a directory of the container, creating it and its missing parents (0755):
/// never through a symlink, never on a mount (writes beneath it then land in the
/// container's own files).
pub fn mkdirs(root: BorrowedFd<'_>, path: &Path) -> Result<OwnedFd> {
    walk(root, path, false, &[])
}

/// Opens a directory of the container to mount something on, creating it and its
/// missing parents (0755) only on the file systems `create_on` lists (by device):
/// never through a symlink, but across mounts, since mount points may lie in the
/// container's own tmpfs mounts (`/tmp`).
pub fn mount_point(root: BorrowedFd<'_>, path: &Path, create_on: &[u64]) -> Result<OwnedFd> {
    walk(root, path, true, create_on)
}

fn walk(root: BorrowedFd<'_>, path: &Path, cross_mounts: bool, create_on: &[u64]) -> Result<OwnedFd> {
    // No O_NOFOLLOW: with O_PATH it would open a final symlink itself (ENOTDIR);
    // RESOLVE_NO_SYMLINKS refuses it with ELOOP instead.
    let dir_flags = OFlag::O_PATH | OFlag::O_DIRECTORY;
    let mut current = open_beneath(root, Path::new("."), dir_flags, 0, cross_mounts).map_err(|e| InRootError::new("open", Path::new("/"), e))?;
    let mut so_far = PathBuf::from("/");
    for name in parts(path)? {
        so_far.push(name);
        let open = |dir: BorrowedFd<'_>| open_beneath(dir, Path::new(name), dir_flags, 0, cross_mounts);
        current = match open(current.as_fd()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => {
                if cross_mounts {
                    let dev = nix::sys::stat::fstat(current.as_raw_fd()).map_err(|e| InRootError::new("inspect", &so_far, e))?.st_dev;
                    if !create_on.contains(&dev) {
                        let why = "its parent is bound from the host, and berth creates nothing on the host; create it there or leave it out".to_string();
                        return Err(InRootError::other("create", &so_far, why));
                    }
                }
                match nix::sys::stat::mkdirat(Some(current.as_raw_fd()), name, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(InRootError::new("create", &so_far, e)),
                }
                open(current.as_fd()).map_err(|e| InRootError::new("open", &so_far, e))?
            }
            Err(e) => return Err(InRootError::new("open", &so_far, e)),
        };
    }
    Ok(current)
}

/// Opens a file of the container that must be a regular one: `flags` plus no symlink,
/// no blocking open (a FIFO) and no mount crossed; anything but a regular file is refused.
fn open_regular(root: BorrowedFd<'_>, path: &Path, flags: OFlag, mode: u32, action: &'static str, cross_mounts: bool) -> Result<std::fs::File> {
    let flags = flags | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
    let fd = open_beneath(root, path, flags, mode, cross_mounts).map_err(|e| InRootError::new(action, path, e))?;
    let stat = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| InRootError::new(action, path, e))?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(InRootError::other(action, path, "not a regular file; fix the image".into()));
    }
    Ok(std::fs::File::from(fd))
}

/// A file of the container as text, at most `limit` bytes; `None` when it is missing.
/// On the container's own file system only, as root is about to write it.
pub fn read(root: BorrowedFd<'_>, path: &Path, limit: u64) -> Result<Option<String>> {
    read_file(root, path, limit, false)
}

/// [`read`] of a file that may also be bound in (a mount), for reading only.
pub fn read_across_mounts(root: BorrowedFd<'_>, path: &Path, limit: u64) -> Result<Option<String>> {
    read_file(root, path, limit, true)
}

fn read_file(root: BorrowedFd<'_>, path: &Path, limit: u64, cross_mounts: bool) -> Result<Option<String>> {
    let file = match open_regular(root, path, OFlag::O_RDONLY, 0, "read", cross_mounts) {
        Err(InRootError { errno: Some(Errno::ENOENT), .. }) => return Ok(None),
        other => other?,
    };
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes).map_err(|e| InRootError::other("read", path, e.to_string()))?;
    if bytes.len() as u64 > limit {
        return Err(InRootError::other("read", path, format!("larger than {limit} bytes; fix the image")));
    }
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

fn split(path: &Path) -> Result<(&Path, &std::ffi::OsStr)> {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => Ok((parent, name)),
        _ => Err(InRootError::other("write", path, "not a file's path".into())),
    }
}

/// Appends `text` to a file of the container (created 0644 with its directories when
/// missing), on a line of its own.
pub fn append(root: BorrowedFd<'_>, path: &Path, text: &str) -> Result<()> {
    let (parent, _) = split(path)?;
    mkdirs(root, parent)?;
    let existing = read(root, path, READ_LIMIT)?.unwrap_or_default();
    let mut file = open_regular(root, path, OFlag::O_WRONLY | OFlag::O_APPEND | OFlag::O_CREAT, 0o644, "add to", false)?;
    let mut out = String::new();
    if !existing.is_empty() && !existing.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(text);
    file.write_all(out.as_bytes()).map_err(|e| InRootError::other("add to", path, e.to_string()))
}

/// Puts a file of the container in place with `text` (mode `mode`, directories made
/// when missing): a new temp file renamed over it, so readers never see half of it and
/// whatever was at the path (a symlink included) is replaced, never followed.
pub fn replace(root: BorrowedFd<'_>, path: &Path, text: &str, mode: u32) -> Result<()> {
    let (parent, name) = split(path)?;
    let dir = mkdirs(root, parent)?;
    let tmp_name = format!(".{}.{}", name.to_string_lossy(), std::process::id());
    let tmp = Path::new(&tmp_name);
    let _ = nix::unistd::unlinkat(Some(dir.as_raw_fd()), tmp, nix::unistd::UnlinkatFlags::NoRemoveDir);
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL;
    let fd = open_beneath(dir.as_fd(), tmp, flags | OFlag::O_NOFOLLOW, mode, false).map_err(|e| InRootError::new("write", path, e))?;
    let mut file = std::fs::File::from(fd);
    let written = file
        .write_all(text.as_bytes())
        .map_err(|e| InRootError::other("write", path, e.to_string()))
        .and_then(|()| nix::sys::stat::fchmod(file.as_raw_fd(), Mode::from_bits_truncate(mode)).map_err(|e| InRootError::new("write", path, e)))
        .and_then(|()| nix::fcntl::renameat(Some(dir.as_raw_fd()), tmp, Some(dir.as_raw_fd()), name).map_err(|e| InRootError::new("write", path, e)));
    if written.is_err() {
        let _ = nix::unistd::unlinkat(Some(dir.as_raw_fd()), tmp, nix::unistd::UnlinkatFlags::NoRemoveDir);
    }
    written
}

/// The file system (device) of a directory of the container, reached without symlinks
/// (across mounts): what [`mount_point`] may create on.
pub fn device(root: BorrowedFd<'_>, path: &Path) -> Option<u64> {
    let fd = open_beneath(root, path, OFlag::O_PATH | OFlag::O_DIRECTORY, 0, true).ok()?;
    nix::sys::stat::fstat(fd.as_raw_fd()).ok().map(|s| s.st_dev)
}

/// Whether a regular file is at `path` in the container, reached without symlinks.
pub fn is_file(root: BorrowedFd<'_>, path: &Path) -> bool {
    open_beneath(root, path, OFlag::O_PATH | OFlag::O_NOFOLLOW, 0, false)
        .and_then(|fd| nix::sys::stat::fstat(fd.as_raw_fd()))
        .is_ok_and(|s| SFlag::from_bits_truncate(s.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(name: &str) -> (Dir, OwnedFd, PathBuf) {
        let base = std::env::temp_dir().join(format!("berth-inroot-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("root");
        let outside = base.join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let fd = std::fs::File::open(&root).unwrap().into();
        (Dir(base), fd, outside)
    }

    #[test]
    fn writes_follow_no_symlink_of_the_image_whatever_its_form() {
        let (dir, root, outside) = scratch("symlinks");
        let r = dir.0.join("root");
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::write(outside.join("passwd"), "host\n").unwrap();
        symlink(outside.join("passwd"), r.join("etc/passwd")).unwrap();
        symlink("../../outside", r.join("etc/group")).unwrap();
        symlink(&outside, r.join(".berth")).unwrap();
        symlink("/proc/self/cwd", r.join("cwd")).unwrap();
        for (path, what) in [
            ("/etc/passwd", "append"),
            ("/etc/group/x", "append"),
            ("/.berth/slurm/hostfile", "replace"),
            ("/cwd/hostfile", "replace"),
        ] {
            let result = if what == "append" { append(root.as_fd(), Path::new(path), "x\n") } else { replace(root.as_fd(), Path::new(path), "x\n", 0o644) };
            let err = result.unwrap_err();
            assert!(err.to_string().contains("is a symlink"), "{path}: {err}");
            assert!(err.to_string().starts_with("cannot "), "{path}: {err}");
        }
        assert_eq!(std::fs::read_to_string(outside.join("passwd")).unwrap(), "host\n");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1, "nothing made outside");
        assert!(read(root.as_fd(), Path::new("/etc/passwd"), READ_LIMIT).unwrap_err().to_string().contains("symlink"));
        assert!(mkdirs(root.as_fd(), Path::new("/.berth/wiring")).is_err());
    }

    #[test]
    fn files_are_appended_replaced_and_read_in_place() {
        let (dir, root, _) = scratch("plain");
        let r = dir.0.join("root");
        append(root.as_fd(), Path::new("/etc/passwd"), "a:x:1:1::/:/bin/sh\n").unwrap();
        std::fs::write(r.join("etc/group"), "root:x:0:").unwrap();
        append(root.as_fd(), Path::new("/etc/group"), "g:x:5:\n").unwrap();
        assert_eq!(std::fs::read_to_string(r.join("etc/group")).unwrap(), "root:x:0:\ng:x:5:\n");
        assert_eq!(read(root.as_fd(), Path::new("/etc/passwd"), READ_LIMIT).unwrap().unwrap(), "a:x:1:1::/:/bin/sh\n");
        assert_eq!(read(root.as_fd(), Path::new("/etc/none"), READ_LIMIT).unwrap(), None);
        // A symlink at the file itself is replaced, not followed.
        std::fs::create_dir_all(r.join(".berth/slurm")).unwrap();
        symlink("/etc/shadow", r.join(".berth/slurm/hostfile")).unwrap();
        replace(root.as_fd(), Path::new("/.berth/slurm/hostfile"), "n1\n", 0o644).unwrap();
        assert_eq!(std::fs::read_to_string(r.join(".berth/slurm/hostfile")).unwrap(), "n1\n");
        assert!(is_file(root.as_fd(), Path::new("/.berth/slurm/hostfile")));
        assert_eq!(std::fs::read_dir(r.join(".berth/slurm")).unwrap().count(), 1, "no temp file left");
    }

    #[test]
    fn reads_refuse_fifos_and_stop_at_the_cap() {
        let (dir, root, _) = scratch("reads");
        let r = dir.0.join("root");
        std::fs::create_dir_all(r.join("etc")).unwrap();
        nix::unistd::mkfifo(&r.join("etc/passwd"), Mode::from_bits_truncate(0o644)).unwrap();
        let err = read(root.as_fd(), Path::new("/etc/passwd"), READ_LIMIT).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        assert!(append(root.as_fd(), Path::new("/etc/passwd"), "x\n").is_err());
        std::fs::write(r.join("etc/group"), vec![b'x'; 100]).unwrap();
        let err = read(root.as_fd(), Path::new("/etc/group"), 99).unwrap_err();
        assert!(err.to_string().contains("larger than 99 bytes"), "{err}");
    }

    #[test]
    fn mount_points_are_made_only_where_allowed() {
        let (dir, root, _) = scratch("points");
        let r = dir.0.join("root");
        let dev = std::fs::metadata(&r).map(|m| std::os::unix::fs::MetadataExt::dev(&m)).unwrap();
        mount_point(root.as_fd(), Path::new("/var/spool/x"), &[dev]).unwrap();
        assert!(r.join("var/spool/x").is_dir());
        let err = mount_point(root.as_fd(), Path::new("/var/other"), &[]).unwrap_err();
        assert!(err.to_string().contains("berth creates nothing on the host"), "{err}");
        symlink("/", r.join("var/link")).unwrap();
        assert!(mount_point(root.as_fd(), Path::new("/var/link/y"), &[dev]).unwrap_err().to_string().contains("symlink"));
    }
}
