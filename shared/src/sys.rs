//! The narrow seam between berth's container code and the kernel calls that neither
//! `nix` nor `std` wrap safely: fork, openat2 confined to a root or beneath a dir,
//! capability sets, close_range and the new mount API. Owns every `unsafe` block of
//! the container code; must never hold policy (what to mount, whom to run as): callers
//! decide, this only performs.

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::unistd::Pid;
use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Which side of a fork we are on.
pub enum Forked {
    Child,
    Parent(Pid),
}

/// Forks the calling process. berth forks only while single-threaded (the `berth`
/// binary never starts threads), so the child may do anything, not only
/// async-signal-safe calls.
pub fn fork() -> nix::Result<Forked> {
    // SAFETY: the berth binary is single-threaded when it forks, so no lock can be
    // held by another thread in the child; the child either execs or exits.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Child => Ok(Forked::Child),
        nix::unistd::ForkResult::Parent { child } => Ok(Forked::Parent(child)),
    }
}

/// clone3's argument block (linux/sched.h, `CLONE_ARGS_SIZE_VER2`), spelled out here
/// because not every libc target defines it.
#[repr(C, align(8))]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Forks like [`fork`], the child starting in the cgroup v2 directory `cgroup`:
/// clone3's `CLONE_INTO_CGROUP` seeds a cgroup without the global lock that a write to
/// `cgroup.procs` takes, which waits for an RCU grace period (10 ms and more) on most
/// kernels. Where the kernel has no clone3 (before 5.7), the child writes itself into
/// `procs` before it returns, and exits with 125 if it cannot.
pub fn fork_into_cgroup(cgroup: BorrowedFd<'_>, procs: BorrowedFd<'_>) -> nix::Result<Forked> {
    let args = CloneArgs { flags: CLONE_INTO_CGROUP, exit_signal: libc::SIGCHLD as u64, cgroup: cgroup.as_raw_fd() as u64, ..Default::default() };
    // SAFETY: as for `fork`: the berth binary is single-threaded here and the child
    // either execs or exits. No stack is given, so the child runs on a copy of ours like
    // a forked child. glibc's fork handlers do not run; with one thread they have no
    // lock to reset, and glibc (2.34 and later) signals itself through gettid, not the
    // thread id it caches, so that stale value does not misdirect a raise().
    let rc = unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>()) };
    match rc {
        0 => Ok(Forked::Child),
        pid if pid > 0 => Ok(Forked::Parent(Pid::from_raw(pid as i32))),
        _ => match Errno::last() {
            Errno::ENOSYS | Errno::E2BIG => match fork()? {
                Forked::Child => {
                    if nix::unistd::write(procs, b"0").is_err() {
                        exit_now(125);
                    }
                    Ok(Forked::Child)
                }
                parent => Ok(parent),
            },
            e => Err(e),
        },
    }
}

/// Opens `path` relative to `root` as if `root` were `/`: `..` and absolute symlinks
/// never leave it, and magic links (/proc/self/...) are refused.
pub fn open_in_root(root: BorrowedFd<'_>, path: &Path, flags: OFlag, mode: u32) -> nix::Result<OwnedFd> {
    openat2(root, path, flags, mode, libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS)
}

/// Opens `path` beneath `dir` following no symlink at all (ELOOP), in any component,
/// nor `..` above `dir`; with `cross_mounts` false, also crossing no mount point
/// (EXDEV), so what it opens is on `dir`'s own file system. For root's own writes into
/// a directory someone else filled (an image).
pub fn open_beneath(dir: BorrowedFd<'_>, path: &Path, flags: OFlag, mode: u32, cross_mounts: bool) -> nix::Result<OwnedFd> {
    let mut resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    if !cross_mounts {
        resolve |= libc::RESOLVE_NO_XDEV;
    }
    openat2(dir, path, flags, mode, resolve)
}

fn openat2(dir: BorrowedFd<'_>, path: &Path, flags: OFlag, mode: u32, resolve: u64) -> nix::Result<OwnedFd> {
    let rel = path.strip_prefix("/").unwrap_or(path);
    let rel = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
    let cpath = CString::new(rel.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let how = OpenHow {
        flags: (flags | OFlag::O_CLOEXEC).bits() as u64,
        mode: if flags.contains(OFlag::O_CREAT) { u64::from(mode) } else { 0 },
        resolve,
    };
    loop {
        // SAFETY: `cpath` is a valid NUL-terminated string and `how` a fully
        // initialised open_how whose size we pass; the kernel reads both and returns
        // a new descriptor or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                cpath.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd >= 0 {
            // SAFETY: the kernel just returned this descriptor to us; nobody else owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        }
        match Errno::last() {
            Errno::EAGAIN | Errno::EINTR => continue,
            e => return Err(e),
        }
    }
}

/// Empties the capability bounding set, so nothing exec'd later can regain a
/// capability, even through a file capability. Needs CAP_SETPCAP (root has it).
pub fn drop_bounding_set() -> nix::Result<()> {
    for cap in 0..=63 {
        // SAFETY: prctl(PR_CAPBSET_DROP, cap) takes two integers and touches no memory.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc != 0 {
            match Errno::last() {
                // Past the last capability this kernel knows.
                Errno::EINVAL => break,
                e => return Err(e),
            }
        }
    }
    Ok(())
}

/// Clears the ambient, effective, permitted and inheritable capability sets.
pub fn clear_capabilities() -> nix::Result<()> {
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes integers only and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, 0, 0) };
    if rc != 0 {
        return Err(Errno::last());
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    // _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set.
    let header = Header { version: 0x2008_0522, pid: 0 };
    let data = [Data { effective: 0, permitted: 0, inheritable: 0 }; 2];
    // SAFETY: header and data have the layout capset(2) documents for version 3
    // (one header, two data words) and outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header as *const Header, data.as_ptr()) };
    if rc != 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Marks every descriptor from `first` up close-on-exec, so none of the host side's
/// open files reach the program that is exec'd next.
pub fn cloexec_from(first: u32) -> nix::Result<()> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only changes descriptor flags.
    let rc = unsafe { libc::close_range(first, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as i32) };
    if rc == 0 {
        return Ok(());
    }
    // Kernels before 5.11: walk the open descriptors instead.
    for fd in open_fds(first, u32::MAX)? {
        let fd = fd as i32;
        // Descriptors that closed meanwhile (the read_dir one) fail with EBADF: harmless.
        let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
    }
    Ok(())
}

/// Closes every descriptor from 3 up but `keep`: a forked child about to become a
/// user must not hold root's open files (the store's locks above all), which the user
/// could then pin by stopping it.
pub fn close_from_3_except(keep: i32) -> nix::Result<()> {
    let keep = u32::try_from(keep).map_err(|_| Errno::EBADF)?;
    let ranges = [(3, keep.checked_sub(1)), (keep + 1, Some(u32::MAX))];
    for (first, last) in ranges {
        let Some(last) = last.filter(|last| *last >= first) else { continue };
        // SAFETY: close_range only closes descriptors. The caller is a freshly forked
        // single-threaded child that uses no descriptor in the range again before it
        // exits (its Rust owners are never dropped: the child leaves with `exit_now`).
        let rc = unsafe { libc::close_range(first, last, 0) };
        if rc != 0 {
            // Kernels before 5.9: close the open ones one by one.
            for fd in open_fds(first, last)? {
                let _ = nix::unistd::close(fd as i32);
            }
        }
    }
    Ok(())
}

/// This process's open descriptors in `first..=last`, from /proc/self/fd (for kernels
/// without close_range).
fn open_fds(first: u32, last: u32) -> nix::Result<Vec<u32>> {
    Ok(std::fs::read_dir("/proc/self/fd")
        .map_err(|_| Errno::last())?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| (first..=last).contains(fd))
        .collect())
}

/// Sends one status word and, when given, one descriptor over a Unix socket.
pub fn send_fd(sock: BorrowedFd<'_>, status: i32, fd: Option<BorrowedFd<'_>>) -> nix::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let bytes = status.to_ne_bytes();
    let iov = [std::io::IoSlice::new(&bytes)];
    let raw = fd.map(|f| [f.as_raw_fd()]);
    let cmsgs: Vec<ControlMessage<'_>> = raw.as_ref().map(|r| ControlMessage::ScmRights(r)).into_iter().collect();
    sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None).map(|_| ())
}

/// Receives what `send_fd` sent: the status word and the descriptor, if any.
pub fn recv_fd(sock: BorrowedFd<'_>) -> nix::Result<(i32, Option<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut bytes = [0u8; 4];
    let mut iov = [std::io::IoSliceMut::new(&mut bytes)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    if msg.bytes != 4 {
        return Err(Errno::EPIPE);
    }
    let mut fd = None;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for raw in fds {
                // SAFETY: SCM_RIGHTS just installed this descriptor in our table; we
                // are its only owner.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                fd.get_or_insert(owned);
            }
        }
    }
    Ok((i32::from_ne_bytes(bytes), fd))
}

/// Ends a forked child at once, without running the parent's exit handlers or
/// flushing buffers the parent also holds.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit only ends the process; it touches no Rust state.
    unsafe { libc::_exit(code) }
}

/// How many threads this process has (1 when /proc cannot tell).
pub fn thread_count() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Threads:").and_then(|n| n.trim().parse().ok())))
        .unwrap_or(1)
}

/// Restrictions [`restrict_tree`] can add to a mount tree.
pub struct MountRestrictions {
    pub read_only: bool,
    pub nosuid: bool,
    pub nodev: bool,
    pub noexec: bool,
}

/// Adds restrictions to the mount at `mount` (an O_PATH descriptor of its root) and to
/// every mount below it, in one call (mount_setattr with AT_RECURSIVE, Linux 5.12+).
/// Flags a mount already has stay; nothing is ever lifted.
pub fn restrict_tree(mount: BorrowedFd<'_>, r: &MountRestrictions) -> nix::Result<()> {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    let mut set = 0u64;
    for (on, bit) in [(r.read_only, 0x1), (r.nosuid, 0x2), (r.nodev, 0x4), (r.noexec, 0x8)] {
        if on {
            set |= bit;
        }
    }
    let attr = MountAttr { attr_set: set, attr_clr: 0, propagation: 0, userns_fd: 0 };
    const AT_RECURSIVE: libc::c_uint = 0x8000;
    // SAFETY: the path is a valid empty C string, `attr` is a fully initialised
    // mount_attr whose size we pass; the kernel only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mount.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint | AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(Errno::last())
    }
}

/// A detached copy of the single mount at `dir` (open_tree with OPEN_TREE_CLONE), to be
/// attached in another mount namespace with [`attach_tree`]: the kernel binds nothing
/// across mount namespaces otherwise.
pub fn clone_tree(dir: &Path) -> nix::Result<OwnedFd> {
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    let cpath = CString::new(dir.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    // SAFETY: cpath is a valid NUL-terminated string; open_tree returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, cpath.as_ptr(), OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel just returned this descriptor; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Like [`clone_tree`], of the file or directory `fd` is open on (an `O_PATH`
/// descriptor will do), so the mount is of exactly what was opened and checked.
pub fn clone_tree_of(fd: BorrowedFd<'_>) -> nix::Result<OwnedFd> {
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    // SAFETY: the path is a valid empty C string and `fd` is open; open_tree returns a
    // new descriptor or -1.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            fd.as_raw_fd(),
            c"".as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_EMPTY_PATH as libc::c_uint,
        )
    };
    if tree < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel just returned this descriptor; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(tree as i32) })
}

/// Attaches a detached mount tree (from [`clone_tree`]) on the directory `target`.
pub fn attach_tree(tree: BorrowedFd<'_>, target: BorrowedFd<'_>) -> nix::Result<()> {
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
    const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
    // SAFETY: both descriptors are open, the paths are valid empty C strings; the kernel
    // only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(Errno::last())
    }
}

/// Turns a forked child into a namespace anchor: a new session, stdin/stdout/stderr on
/// /dev/null (so nobody waiting for the parent's output waits for it), every other
/// descriptor closed but `commit`, the read end of a pipe from create. The anchor
/// stays only once create wrote a byte to it (after the container's state is on
/// disk); if create dies before, the pipe ends, the anchor exits and the namespace
/// goes with it, so a killed create leaves no anchor nobody can identify. Then idle
/// until killed.
pub fn become_anchor(commit: &OwnedFd) -> ! {
    const COMMIT_FD: i32 = 3;
    let _ = nix::unistd::dup2(commit.as_raw_fd(), COMMIT_FD);
    let _ = nix::unistd::setsid();
    let _ = nix::unistd::chdir("/");
    if let Ok(null) = nix::fcntl::open("/dev/null", OFlag::O_RDWR, nix::sys::stat::Mode::empty()) {
        for fd in 0..3 {
            let _ = nix::unistd::dup2(null, fd);
        }
    }
    // SAFETY: close_range only closes descriptors; nothing here uses them any more
    // (the pipe's write end, which the parent holds, is among them).
    unsafe { libc::close_range(COMMIT_FD as u32 + 1, u32::MAX, 0) };
    let mut byte = [0u8; 1];
    loop {
        match nix::unistd::read(COMMIT_FD, &mut byte) {
            Ok(1) => break,
            Err(Errno::EINTR) => continue,
            _ => exit_now(0),
        }
    }
    let _ = nix::unistd::close(COMMIT_FD);
    loop {
        nix::unistd::pause();
    }
}
