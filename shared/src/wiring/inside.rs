//! The part of wiring that runs in a job's container's mount namespace, in a forked
//! child of `berth`: adds the job user, group and nodes to the container's
//! /etc/passwd, /etc/group and /etc/hosts (in its upper dir, through the overlay, also
//! when the root is read-only; not a read-only /etc/hosts, which is the node's own),
//! attaches the wiring dir read-only at /.berth/wiring, and starts sshd as the job user
//! (no capabilities, no_new_privs, in its own session). Every path is resolved inside
//! the container's root. Must never run anything as root inside the container, nor
//! leave the host's mount namespace changed.

use super::files::{self, Node};
use crate::container::sys::{self, open_in_root};
use crate::container::Credentials;
use nix::errno::Errno;
use nix::mount::MsFlags;
use nix::sys::statvfs::FsFlags;
use nix::fcntl::OFlag;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// A detached, read-only, nosuid, nodev copy of the mount at `dir`, to be attached
/// inside a container.
pub fn detached_read_only(dir: &Path) -> nix::Result<OwnedFd> {
    let tree = sys::clone_tree(dir)?;
    let restrictions = sys::MountRestrictions { read_only: true, nosuid: true, nodev: true, noexec: false };
    sys::restrict_tree(tree.as_fd(), &restrictions)?;
    Ok(tree)
}

/// What the child needs to know.
pub struct Inside<'a> {
    pub user: &'a Credentials,
    pub user_name: &'a str,
    pub group_name: &'a str,
    pub home: &'a str,
    pub shell: &'a str,
    pub nodes: &'a [Node],
    /// From [`detached_read_only`].
    pub tree: BorrowedFd<'a>,
    /// sshd's stdout and stderr.
    pub log: BorrowedFd<'a>,
    /// The loader's file name in `openssh/lib`.
    pub loader: &'a str,
}

/// Runs in the forked child, already in the container's mount namespace: prepares
/// the container and forks sshd; returns sshd's pid.
pub fn prepare_and_start(what: &Inside<'_>) -> Result<i32, String> {
    // A read-only root (`create --readonly`) is a read-only bind remount of the
    // overlay: lift it for the additions below and put it back before sshd starts, so
    // the job never sees it writable.
    let root_flags = nix::sys::statvfs::statvfs("/").map_err(|e| format!("cannot stat the container's root: {e}"))?.flags();
    let read_only = root_flags.contains(FsFlags::ST_RDONLY);
    if read_only {
        remount_root(root_flags, false)?;
    }
    let prepared = prepare(what);
    if read_only {
        remount_root(root_flags, true)?;
    }
    prepared?;
    start_sshd(what)
}

/// The job user, group and nodes in the container's files; the wiring dir attached.
fn prepare(what: &Inside<'_>) -> Result<(), String> {
    let root = open_in_root_dir(Path::new("/")).map_err(|e| format!("cannot open the container's root: {e}"))?;
    let root = root.as_fd();
    let passwd = read(root, "/etc/passwd")?;
    if !files::has_id(&passwd, what.user.uid) {
        let shell = if open_in_root(root, Path::new(what.shell), OFlag::O_PATH, 0).is_ok() { what.shell } else { "/bin/sh" };
        append(root, "/etc/passwd", &files::passwd_line(what.user_name, what.user.uid, what.user.gid, what.home, shell))?;
    }
    let group = read(root, "/etc/group")?;
    if !files::has_id(&group, what.user.gid) {
        append(root, "/etc/group", &files::group_line(what.group_name, what.user.gid))?;
    }
    let hosts = read(root, "/etc/hosts")?;
    let lines = files::hosts_lines(&hosts, what.nodes);
    // A read-only /etc/hosts is the node's own, bound in by the adapter (Torque's
    // hooks): names resolve as on the node, nothing to add.
    let read_only = matches!(open_in_root(root, Path::new("/etc/hosts"), OFlag::O_WRONLY | OFlag::O_NOFOLLOW, 0), Err(Errno::EROFS));
    if !lines.is_empty() && !read_only {
        append(root, "/etc/hosts", &lines)?;
    }
    let target = mkdirs(root, files::MOUNT_POINT)?;
    sys::attach_tree(what.tree, target.as_fd())
        .map_err(|e| format!("cannot mount the wiring dir at {}: {e}", files::MOUNT_POINT))
}

/// Remounts the container's root (a bind of its overlay) read-only or writable,
/// keeping its other per-mount flags.
fn remount_root(flags: FsFlags, read_only: bool) -> Result<(), String> {
    let mut ms = MsFlags::MS_REMOUNT | MsFlags::MS_BIND;
    for (fs, m) in [(FsFlags::ST_NOSUID, MsFlags::MS_NOSUID), (FsFlags::ST_NODEV, MsFlags::MS_NODEV), (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC)] {
        if flags.contains(fs) {
            ms |= m;
        }
    }
    if read_only {
        ms |= MsFlags::MS_RDONLY;
    }
    nix::mount::mount(None::<&str>, "/", None::<&str>, ms, None::<&str>)
        .map_err(|e| format!("cannot make the container's read-only root {} for the wiring: {e}", if read_only { "read-only again" } else { "writable" }))
}

fn open_in_root_dir(path: &Path) -> nix::Result<OwnedFd> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_PATH | OFlag::O_DIRECTORY).bits())
        .open(path)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    Ok(OwnedFd::from(file))
}

/// A file of the container as text; a missing file is empty.
fn read(root: BorrowedFd<'_>, path: &str) -> Result<String, String> {
    match open_in_root(root, Path::new(path), OFlag::O_RDONLY, 0) {
        Ok(fd) => {
            let mut text = String::new();
            std::fs::File::from(fd).read_to_string(&mut text).map_err(|e| format!("cannot read the container's {path}: {e}"))?;
            Ok(text)
        }
        Err(Errno::ENOENT) => Ok(String::new()),
        Err(e) => Err(format!("cannot open the container's {path}: {e}")),
    }
}

/// Appends lines to a file of the container (created 0644 when missing, on a new line).
fn append(root: BorrowedFd<'_>, path: &str, lines: &str) -> Result<(), String> {
    let parent = Path::new(path).parent().unwrap_or(Path::new("/"));
    mkdirs(root, &parent.to_string_lossy())?;
    let existing = read(root, path)?;
    let flags = OFlag::O_WRONLY | OFlag::O_APPEND | OFlag::O_CREAT | OFlag::O_NOFOLLOW;
    let fd = open_in_root(root, Path::new(path), flags, 0o644).map_err(|e| format!("cannot open the container's {path} to add to it: {e}"))?;
    let mut text = String::new();
    if !existing.is_empty() && !existing.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(lines);
    std::fs::File::from(fd).write_all(text.as_bytes()).map_err(|e| format!("cannot add to the container's {path}: {e}"))
}

/// Creates a directory of the container and its parents (0755), returns it opened.
fn mkdirs(root: BorrowedFd<'_>, path: &str) -> Result<OwnedFd, String> {
    let mut current = std::path::PathBuf::from("/");
    for part in Path::new(path).components().skip(1) {
        let parent = open_in_root(root, &current, OFlag::O_PATH | OFlag::O_DIRECTORY, 0).map_err(|e| format!("cannot open {} in the container: {e}", current.display()))?;
        match nix::sys::stat::mkdirat(Some(parent.as_raw_fd()), part.as_os_str(), nix::sys::stat::Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(format!("cannot create {}/{} in the container: {e}", current.display(), part.as_os_str().to_string_lossy())),
        }
        current.push(part);
    }
    open_in_root(root, &current, OFlag::O_PATH | OFlag::O_DIRECTORY, 0).map_err(|e| format!("cannot open {} in the container: {e}", current.display()))
}

/// Forks sshd: its own session, stdin /dev/null, output to the log, as the job user.
fn start_sshd(what: &Inside<'_>) -> Result<i32, String> {
    let dir = files::MOUNT_POINT;
    let argv: Vec<String> = vec![
        format!("{dir}/openssh/lib/{}", what.loader),
        "--library-path".into(),
        format!("{dir}/openssh/lib"),
        format!("{dir}/openssh/sshd"),
        // -D: stay in the foreground (berth made the session); -e: log to stderr;
        // -r: no re-exec, which would run sshd without berth's loader.
        "-D".into(),
        "-e".into(),
        "-r".into(),
        "-f".into(),
        files::path("sshd_config"),
    ];
    let cargs: Vec<CString> = argv.iter().map(|a| CString::new(a.as_bytes())).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    let env = [c"PATH=/usr/local/bin:/usr/bin:/bin".to_owned()];
    let devnull = nix::fcntl::open("/dev/null", OFlag::O_RDWR | OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty()).map_err(|e| format!("cannot open the container's /dev/null: {e}"))?;
    match sys::fork().map_err(|e| format!("cannot fork sshd: {e}"))? {
        sys::Forked::Parent(pid) => Ok(pid.as_raw()),
        sys::Forked::Child => {
            let fail = |what: String| -> ! {
                let _ = nix::unistd::write(std::io::stderr(), format!("berth: cannot start sshd: {what}\n").as_bytes());
                sys::exit_now(127)
            };
            if let Err(e) = nix::unistd::setsid() {
                fail(format!("setsid: {e}"));
            }
            for (from, to) in [(devnull, 0), (what.log.as_raw_fd(), 1), (what.log.as_raw_fd(), 2)] {
                if let Err(e) = nix::unistd::dup2(from, to) {
                    fail(format!("dup2: {e}"));
                }
            }
            if let Err(e) = what.user.become_user() {
                fail(e.to_string());
            }
            if let Err(e) = nix::unistd::chdir("/") {
                fail(format!("chdir /: {e}"));
            }
            if let Err(e) = sys::cloexec_from(3) {
                fail(format!("close the host's descriptors: {e}"));
            }
            let err = nix::unistd::execve(&cargs[0], &cargs, &env).err().unwrap_or(Errno::EINVAL);
            fail(format!("exec {}: {err}", argv[0]))
        }
    }
}
