//! The part of wiring that runs in a job's container's mount namespace, in a forked
//! child of `berth`: adds the job user, group and nodes to the container's
//! /etc/passwd, /etc/group and /etc/hosts (in its upper dir, through the overlay, also
//! when the root is read-only; not a read-only /etc/hosts, which is the node's own),
//! attaches the wiring dir read-only at /.berth/wiring, and starts sshd as the job user
//! (no capabilities, no_new_privs, in its own session). Every file it reads or writes
//! as root is reached through `container::inroot` (no symlink, no mount crossed,
//! regular files only). Must never run anything as root inside the container, nor
//! leave the host's mount namespace changed.

use super::files::{self, Node};
use crate::container::inroot;
use crate::sys::{self, open_in_root};
use crate::identity::Credentials;
use nix::errno::Errno;
use nix::mount::MsFlags;
use nix::sys::statvfs::FsFlags;
use nix::fcntl::OFlag;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
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
/// Every path through [`inroot`]: an image whose /etc, /etc/passwd or /.berth is a
/// symlink (to /proc, a bound host dir, anywhere) fails here with one line.
fn prepare(what: &Inside<'_>) -> Result<(), String> {
    let root = inroot::current_root().map_err(|e| e.to_string())?;
    let root = root.as_fd();
    let text = |path: &str| inroot::read(root, Path::new(path), inroot::READ_LIMIT).map(Option::unwrap_or_default);
    let passwd = text("/etc/passwd").map_err(|e| e.to_string())?;
    if !files::has_id(&passwd, what.user.uid) {
        let shell = if open_in_root(root, Path::new(what.shell), OFlag::O_PATH, 0).is_ok() { what.shell } else { "/bin/sh" };
        let line = files::passwd_line(what.user_name, what.user.uid, what.user.gid, what.home, shell);
        inroot::append(root, Path::new("/etc/passwd"), &line).map_err(|e| e.to_string())?;
    }
    let group = text("/etc/group").map_err(|e| e.to_string())?;
    if !files::has_id(&group, what.user.gid) {
        inroot::append(root, Path::new("/etc/group"), &files::group_line(what.group_name, what.user.gid)).map_err(|e| e.to_string())?;
    }
    // An /etc/hosts on a mount is the node's own, bound in by the adapter: names
    // resolve as on the node, nothing to add (and nothing root may write).
    match text("/etc/hosts") {
        Err(e) if e.is_on_a_mount() => {}
        Err(e) => return Err(e.to_string()),
        Ok(hosts) => {
            let lines = files::hosts_lines(&hosts, what.nodes);
            if !lines.is_empty() {
                inroot::append(root, Path::new("/etc/hosts"), &lines).map_err(|e| e.to_string())?;
            }
        }
    }
    let target = inroot::mkdirs(root, Path::new(files::MOUNT_POINT)).map_err(|e| e.to_string())?;
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
