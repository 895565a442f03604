//! Who runs inside a container: the job user's uid, gid and groups; opening the
//! sources of the user's own mounts with the user's credentials (never root's); and
//! dropping to the user before exec (groups, ids, no capabilities, no_new_privs).
//! Must never decide what gets mounted or exec'd: it only checks and drops.

use crate::sys::{self, Forked};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};
use serde::{Deserialize, Serialize};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("user {uid} may not read {path}: {source}")]
    Denied { uid: u32, path: PathBuf, source: Errno },
    #[error("cannot check access to {path} as user {uid}: {source}")]
    Check { uid: u32, path: PathBuf, source: Errno },
    #[error("cannot switch to user {uid} (gid {gid}): {step} failed: {source}")]
    Drop { uid: u32, gid: u32, step: &'static str, source: Errno },
    #[error("{why} (as user {uid})")]
    AsUser { uid: u32, why: String },
    #[error("berth's process running as user {uid} gave no answer within {} s{} and was killed (a FIFO, a FUSE mount or a stopped process of the user's in its way?)", .waited.as_secs(), .opening.as_ref().map(|p| format!(" opening {}", p.display())).unwrap_or_default())]
    NoAnswer { uid: u32, waited: Duration, opening: Option<PathBuf> },
}

/// The identity tasks run as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the primary gid need not be repeated).
    pub groups: Vec<u32>,
}

impl Credentials {
    /// The calling process's real identity and supplementary groups.
    pub fn current() -> Credentials {
        let groups = nix::unistd::getgroups().unwrap_or_default();
        Credentials {
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            groups: groups.into_iter().map(Gid::as_raw).collect(),
        }
    }

    /// The user's home directory from the password database, if it has one that exists.
    pub fn home(&self) -> Option<PathBuf> {
        let user = nix::unistd::User::from_uid(Uid::from_raw(self.uid)).ok()??;
        user.dir.is_dir().then_some(user.dir)
    }

    /// Takes on this identity for good: empties the capability bounding set, sets
    /// no_new_privs, sets groups, gid and uid (real, effective, saved), then clears every
    /// capability set. Needs root; afterwards nothing can regain privilege.
    pub fn become_user(&self) -> Result<(), UserError> {
        let fail = |step, source| UserError::Drop { uid: self.uid, gid: self.gid, step, source };
        sys::drop_bounding_set().map_err(|e| fail("emptying the capability bounding set", e))?;
        self.become_user_keeping_bounding_set()
    }

    /// As [`Self::become_user`] but the bounding set stays: for a task about to enter a
    /// user namespace of its own, whose root gets the bounding set's capabilities in
    /// that namespace only.
    pub fn become_user_keeping_bounding_set(&self) -> Result<(), UserError> {
        let fail = |step, source| UserError::Drop { uid: self.uid, gid: self.gid, step, source };
        nix::sys::prctl::set_no_new_privs().map_err(|e| fail("setting no_new_privs", e))?;
        self.set_ids().map_err(|(step, e)| fail(step, e))?;
        sys::clear_capabilities().map_err(|e| fail("clearing capabilities", e))
    }

    /// In a user namespace that maps only this user: keeps the ids (and the groups,
    /// which cannot be set there), empties the bounding set, sets no_new_privs and
    /// clears every capability set.
    pub fn drop_capabilities(&self) -> Result<(), UserError> {
        let fail = |step, source| UserError::Drop { uid: self.uid, gid: self.gid, step, source };
        sys::drop_bounding_set().map_err(|e| fail("emptying the capability bounding set", e))?;
        nix::sys::prctl::set_no_new_privs().map_err(|e| fail("setting no_new_privs", e))?;
        sys::clear_capabilities().map_err(|e| fail("clearing capabilities", e))
    }

    fn set_ids(&self) -> Result<(), (&'static str, Errno)> {
        let groups: Vec<Gid> = self.groups.iter().copied().map(Gid::from_raw).collect();
        nix::unistd::setgroups(&groups).map_err(|e| ("setgroups", e))?;
        let gid = Gid::from_raw(self.gid);
        nix::unistd::setresgid(gid, gid, gid).map_err(|e| ("setresgid", e))?;
        let uid = Uid::from_raw(self.uid);
        nix::unistd::setresuid(uid, uid, uid).map_err(|e| ("setresuid", e))
    }

    /// Runs `f` with this user's file-system identity (fsuid, fsgid, groups), then
    /// restores the caller's. For opening the user's files as the user inside a
    /// namespace where forking a checker is not possible. Needs root; single-threaded.
    pub fn with_fs_identity<T>(&self, f: impl FnOnce() -> T) -> Result<T, UserError> {
        if self.is_caller() {
            return Ok(f());
        }
        let fail = |step, source| UserError::Drop { uid: self.uid, gid: self.gid, step, source };
        let saved = nix::unistd::getgroups().map_err(|e| fail("getgroups", e))?;
        let groups: Vec<Gid> = self.groups.iter().copied().map(Gid::from_raw).collect();
        nix::unistd::setgroups(&groups).map_err(|e| fail("setgroups", e))?;
        let old_gid = nix::unistd::setfsgid(Gid::from_raw(self.gid));
        let old_uid = nix::unistd::setfsuid(Uid::from_raw(self.uid));
        let result = f();
        nix::unistd::setfsuid(old_uid);
        nix::unistd::setfsgid(old_gid);
        nix::unistd::setgroups(&saved).map_err(|e| fail("restoring groups", e))?;
        Ok(result)
    }

    /// Whether the calling process already runs with exactly these credentials.
    pub fn is_caller(&self) -> bool {
        let (uid, euid) = (nix::unistd::getuid().as_raw(), nix::unistd::geteuid().as_raw());
        let (gid, egid) = (nix::unistd::getgid().as_raw(), nix::unistd::getegid().as_raw());
        uid == euid && gid == egid && *self == Credentials::current()
    }

    /// Opens each path as this user would (in a child that has switched to the user),
    /// and returns the open files, so that what gets mounted is exactly what the user
    /// was allowed to read, with no window for swapping a symlink in between. A child
    /// that has not answered within `timeout` is killed (see [`Self::run_as_user`]).
    pub fn open_as_user(&self, paths: &[PathBuf], timeout: Duration) -> Result<Vec<OwnedFd>, UserError> {
        if paths.is_empty() {
            return Ok(Vec::new());
        }
        if self.is_caller() {
            // The caller is this user, unprivileged or not: its own rights are the user's.
            return paths
                .iter()
                .map(|path| {
                    open_checked(path).map_err(|source| UserError::Denied { uid: self.uid, path: path.clone(), source })
                })
                .collect();
        }
        let check = |path: &Path, source| UserError::Check { uid: self.uid, path: path.to_path_buf(), source };
        let (parent, child) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
            .map_err(|e| check(&paths[0], e))?;
        let pid = match sys::fork().map_err(|e| check(&paths[0], e))? {
            Forked::Child => {
                drop(parent);
                if sys::close_from_3_except(child.as_raw_fd()).is_err() {
                    sys::exit_now(1)
                }
                let code = match self.set_ids() {
                    Err((_, errno)) => {
                        let _ = sys::send_fd(child.as_fd(), -(errno as i32), None);
                        1
                    }
                    Ok(()) => {
                        for path in paths {
                            let sent = match open_checked(path) {
                                Ok(fd) => sys::send_fd(child.as_fd(), 0, Some(fd.as_fd())),
                                Err(errno) => sys::send_fd(child.as_fd(), errno as i32, None),
                            };
                            if sent.is_err() {
                                break;
                            }
                        }
                        0
                    }
                };
                // Leave without running the parent's destructors or atexit handlers.
                sys::exit_now(code)
            }
            Forked::Parent(pid) => pid,
        };
        drop(child);
        // A child that became the user is the user's to stop: never wait on it for long.
        // One deadline for all its answers, each receive bounded by what is left of it.
        let deadline = std::time::Instant::now() + timeout;
        let mut fds = Vec::with_capacity(paths.len());
        let mut result = Ok(());
        let receive = || loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break Err(Errno::EAGAIN);
            }
            let left = nix::sys::time::TimeVal::new(left.as_secs() as i64, left.subsec_micros().max(1) as i64);
            nix::sys::socket::setsockopt(&parent, nix::sys::socket::sockopt::ReceiveTimeout, &left)?;
            // A socket with a receive timeout is not restarted after a signal (signal(7)).
            match sys::recv_fd(parent.as_fd()) {
                Err(Errno::EINTR) => continue,
                other => break other,
            }
        };
        for path in paths {
            match receive() {
                Ok((0, Some(fd))) => fds.push(fd),
                Ok((status, _)) if status < 0 => {
                    result = Err(check(path, Errno::from_raw(-status)));
                    break;
                }
                Ok((status, _)) => {
                    result = Err(UserError::Denied { uid: self.uid, path: path.clone(), source: Errno::from_raw(status) });
                    break;
                }
                Err(Errno::EAGAIN) => {
                    result = Err(UserError::NoAnswer { uid: self.uid, waited: timeout, opening: Some(path.clone()) });
                    break;
                }
                Err(e) => {
                    result = Err(check(path, e));
                    break;
                }
            }
        }
        drop(parent);
        reap(pid, result.is_err());
        result.map(|()| fds)
    }
}

impl Credentials {
    /// Runs `f` in a forked child that has become this user for good
    /// ([`Credentials::become_user`]) and returns what it returned, passed back as JSON.
    /// For work on the user's behalf that must have only the user's rights: reading the
    /// user's files, running the user's programs. The child is the user's to stop (or to
    /// hang on a FIFO or FUSE mount of theirs): killed when it has not answered within
    /// `timeout` (the admin's `user_child_timeout`). Needs root; single-threaded caller.
    pub fn run_as_user<T: Serialize + serde::de::DeserializeOwned>(&self, timeout: Duration, f: impl FnOnce() -> T) -> Result<T, UserError> {
        use std::io::Write;
        let failed = |step, source| UserError::Drop { uid: self.uid, gid: self.gid, step, source };
        let (mut parent, mut child) = std::os::unix::net::UnixStream::pair().map_err(|e| failed("socketpair", io_errno(&e)))?;
        let pid = match sys::fork().map_err(|e| failed("fork", e))? {
            Forked::Child => {
                drop(parent);
                if sys::close_from_3_except(child.as_raw_fd()).is_err() {
                    sys::exit_now(1)
                }
                let answer: Result<T, String> = self.become_user().map(|()| f()).map_err(|e| e.to_string());
                let code = match serde_json::to_vec(&answer).map(|bytes| child.write_all(&bytes)) {
                    Ok(Ok(())) => 0,
                    _ => 1,
                };
                // Leave without running the parent's destructors or atexit handlers.
                sys::exit_now(code)
            }
            Forked::Parent(pid) => pid,
        };
        drop(child);
        let mut bytes = Vec::new();
        let read = read_within(&mut parent, &mut bytes, timeout);
        reap(pid, read.is_err());
        read.map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => UserError::NoAnswer { uid: self.uid, waited: timeout, opening: None },
            _ => failed("reading the child's answer", io_errno(&e)),
        })?;
        match serde_json::from_slice::<Result<T, String>>(&bytes) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(why)) => Err(UserError::AsUser { uid: self.uid, why }),
            Err(_) => Err(UserError::AsUser { uid: self.uid, why: "the child running as the user died without an answer".into() }),
        }
    }
}

/// Reads `from` to its end within `timeout` in all (a child writing a byte now and then
/// gets no more time than one that writes nothing).
fn read_within(from: &mut std::os::unix::net::UnixStream, bytes: &mut Vec<u8>, timeout: Duration) -> std::io::Result<()> {
    use std::io::Read;
    let deadline = std::time::Instant::now() + timeout;
    let mut chunk = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        from.set_read_timeout(Some(left))?;
        match from.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Waits for a child that became the user, killed first when it did not answer in time.
fn reap(pid: nix::unistd::Pid, kill: bool) {
    if kill {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
    let _ = nix::sys::wait::waitpid(pid, None);
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Opens `path` for reading (a directory too), which succeeds only with read access.
fn open_checked(path: &Path) -> Result<OwnedFd, Errno> {
    let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let raw = nix::fcntl::open(path, flags, Mode::empty())?;
    // SAFETY: open just returned this descriptor; nothing else owns it.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn a_child_that_becomes_the_user_holds_none_of_roots_files() {
        if !is_root() {
            eprintln!("skipped: needs root to switch users");
            return;
        }
        let path = std::env::temp_dir().join(format!("berth-user-held-{}", std::process::id()));
        let held = std::fs::File::create(&path).unwrap();
        let nobody = Credentials { uid: 65534, gid: 65534, groups: vec![] };
        let open: Vec<String> = nobody
            .run_as_user(Duration::from_secs(60), || {
                let fds = std::fs::read_dir("/proc/self/fd").map(|d| d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok()).collect::<Vec<_>>());
                fds.unwrap_or_default().iter().map(|p| p.display().to_string()).collect()
            })
            .unwrap();
        drop(held);
        std::fs::remove_file(&path).unwrap();
        assert!(!open.iter().any(|p| p == &path.display().to_string()), "the child held root's file: {open:?}");
    }

    #[test]
    fn a_child_that_becomes_the_user_and_never_answers_is_killed_at_the_timeout() {
        if !is_root() {
            eprintln!("skipped: needs root to switch users");
            return;
        }
        let nobody = Credentials { uid: 65534, gid: 65534, groups: vec![] };
        let started = std::time::Instant::now();
        let err = nobody.run_as_user(Duration::from_secs(1), || std::thread::sleep(Duration::from_secs(100))).unwrap_err();
        assert!(matches!(err, UserError::NoAnswer { uid: 65534, .. }), "{err}");
        assert!(err.to_string().contains("no answer within 1 s"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
        // A FIFO with no writer holds a child opening it as the user.
        let dir = std::env::temp_dir().join(format!("berth-user-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o666)).unwrap();
        let err = nobody.run_as_user(Duration::from_secs(1), || std::fs::read(&fifo).is_ok()).unwrap_err();
        assert!(matches!(err, UserError::NoAnswer { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_plain_user_cannot_open_a_private_directory_but_root_can() {
        if !is_root() {
            eprintln!("skipped: needs root to switch users");
            return;
        }
        let dir = std::env::temp_dir().join(format!("berth-user-test-{}", std::process::id()));
        let private = dir.join("private");
        let public = dir.join("public");
        std::fs::create_dir_all(&private).unwrap();
        std::fs::create_dir_all(&public).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o755)).unwrap();
        let nobody = Credentials { uid: 65534, gid: 65534, groups: vec![] };
        assert_eq!(nobody.open_as_user(std::slice::from_ref(&public), Duration::from_secs(60)).unwrap().len(), 1);
        let err = nobody.open_as_user(&[public.clone(), private.clone()], Duration::from_secs(60)).unwrap_err();
        assert!(matches!(err, UserError::Denied { source: Errno::EACCES, .. }), "{err}");
        assert!(err.to_string().contains("private"), "{err}");
        let root = Credentials { uid: 0, gid: 0, groups: vec![] };
        assert_eq!(root.open_as_user(std::slice::from_ref(&private), Duration::from_secs(60)).unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_opened_with_the_users_fs_identity_are_the_users_and_root_comes_back() {
        use std::os::unix::fs::MetadataExt;
        if !is_root() {
            eprintln!("skipped: needs root to switch identities");
            return;
        }
        let dir = std::env::temp_dir().join(format!("berth-fsid-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let nobody = Credentials { uid: 65534, gid: 65534, groups: vec![] };
        let made = nobody.with_fs_identity(|| std::fs::write(dir.join("as-user"), b"x")).unwrap();
        made.unwrap();
        std::fs::write(dir.join("as-root"), b"x").unwrap();
        assert_eq!(std::fs::metadata(dir.join("as-user")).unwrap().uid(), 65534);
        assert_eq!(std::fs::metadata(dir.join("as-root")).unwrap().uid(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
