//! A container's own cgroup, so that teardown finds every process of the container,
//! also those that left its namespaces (`unshare -Urm`: a user namespace with a mount
//! namespace of its own, which any user may make) or its session (a double-forked
//! daemon). Processes go in at create (the anchor) and at every join, before they
//! enter the container; their children inherit it, and a job user cannot move out of
//! a root-owned cgroup. Teardown kills the cgroup (`cgroup.kill`, else each member by
//! pidfd) and removes it.
//!
//! The cgroup lives in the cgroup v2 hierarchy (found in `/proc/self/mountinfo`; when
//! the node mounts none, berth mounts one at `<runtime_dir>/.cgroup2`). Where that
//! hierarchy enables no controller at its root (hybrid nodes, whose controllers are
//! all v1's), a cgroup only tracks processes, and the container's is
//! `<cgroup2>/berth/<id>`. Where v2 carries the controllers (the systemd default), a
//! cgroup also sets limits, and moving a task out of the one the scheduler or systemd
//! gave it would lift them. There:
//! - with a scheduler whose own cgroups track the job's processes (Slurm's
//!   `proctrack/cgroup`; [`Tracking::Scheduler`]) berth makes none and relies on them
//!   plus the mount-namespace scan of [`super`] (a Slurm step's cgroup also ends with
//!   the step, before the job's container);
//! - else (Torque, whose tracking is the job's session; OpenPBS)
//!   the container's cgroup is a leaf `berth-<id>` below the cgroup of the process that
//!   creates it (pbs_mom's, through its hooks), so what the mom's cgroup limits still
//!   limits the job. A process enters it only from that same cgroup: one the scheduler
//!   placed elsewhere (OpenPBS's cgroups hook) stays there, tracked and limited by it.
//!
//! Owns `<cgroup2>/berth/<id>` and `<creator's cgroup>/berth-<id>`, and the container
//! dir's `cgroup` file naming it; never writes to any other cgroup, never signals a
//! process it has not pinned by pidfd and seen in its cgroup.

use crate::runtime::{ContainerDir, RuntimeDir};
use rustix::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};


#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot {action} the container's cgroup {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("cannot mount a cgroup2 hierarchy at {path}: {source} (the node needs cgroup v2 in its kernel)")]
    Mount { path: PathBuf, source: nix::errno::Errno },
    #[error("processes {pids:?} of the container's cgroup {path} survived SIGKILL for {secs} s (stuck in the kernel?)")]
    Stuck { path: PathBuf, pids: Vec<i32>, secs: u64 },
}

type Result<T> = std::result::Result<T, CgroupError>;

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io { action, path: path.to_path_buf(), source }
}

/// The first cgroup2 mount of this mount namespace, from mountinfo.
fn mounted_hierarchy() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let point = left.split(' ').nth(4)?;
        (right.split(' ').next()? == "cgroup2").then(|| PathBuf::from(unescape(point)))
    })
}

/// mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let mut out = String::new();
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        match rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok()) {
            Some(b) => {
                out.push(b as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out + rest
}

/// The cgroup2 hierarchy berth puts containers in, mounting one in the runtime dir
/// when the node has none, and whether it carries controllers.
fn hierarchy(runtime: &RuntimeDir) -> Result<(PathBuf, bool)> {
    let root = match mounted_hierarchy() {
        Some(root) => root,
        None => {
            let own = runtime.cgroup2_mount();
            crate::fsmode::ensure_dir(&own, 0o755).map_err(io("create", &own))?;
            nix::mount::mount(Some("berth"), &own, Some("cgroup2"), nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV | nix::mount::MsFlags::MS_NOEXEC, None::<&str>)
                .map_err(|source| CgroupError::Mount { path: own.clone(), source })?;
            own
        }
    };
    let controllers = root.join("cgroup.subtree_control");
    let enabled = std::fs::read_to_string(&controllers).map_err(io("read", &controllers))?;
    Ok((root, !enabled.trim().is_empty()))
}

/// The calling process's cgroup v2 path relative to the hierarchy's root (`/` for the
/// root), from `/proc/self/cgroup`.
fn own_cgroup() -> Result<String> {
    let path = Path::new("/proc/self/cgroup");
    let text = std::fs::read_to_string(path).map_err(io("read", path))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|rel| rel.trim().to_string())
        .ok_or_else(|| io("read", path)(std::io::Error::new(std::io::ErrorKind::InvalidData, "no cgroup v2 entry")))
}

/// Who tracks a job's processes by cgroup where cgroup v2 carries controllers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracking {
    /// The scheduler's own cgroups (Slurm's `proctrack/cgroup`): berth makes none there.
    Scheduler,
    /// Nobody but berth (Torque, OpenPBS): a leaf below the creator's cgroup.
    Berth,
}

/// Makes the cgroup of the container at `dir` (in `runtime`) and records it in the
/// dir; nothing where cgroup v2 carries controllers and `tracking` is the scheduler's.
pub fn create(dir: &ContainerDir, runtime: &RuntimeDir, tracking: Tracking) -> Result<()> {
    let (root, controllers) = hierarchy(runtime)?;
    // Unique on the node while the container dir lives, whatever the job ids (also
    // across test clusters sharing one kernel).
    let meta = std::fs::metadata(dir.path()).map_err(io("inspect", dir.path()))?;
    let id = format!("{}-{}", meta.dev(), meta.ino());
    let mut record = Vec::new();
    let path = match (controllers, tracking) {
        (false, _) => root.join("berth").join(id),
        (true, Tracking::Scheduler) => return Ok(()),
        (true, Tracking::Berth) => {
            let parent = own_cgroup()?;
            record = format!("\n{BELOW}{parent}").into_bytes();
            root.join(parent.trim_start_matches('/')).join(format!("berth-{id}"))
        }
    };
    std::fs::create_dir_all(&path).map_err(io("create", &path))?;
    let file = dir.cgroup_record();
    let contents = [path.as_os_str().as_encoded_bytes(), &record].concat();
    // Create holds the job's lock.
    crate::fsmode::replace_whole(&file, &contents, 0o644).map_err(io("record", &file))
}

/// The record's second line, when the cgroup is a leaf below its creator's cgroup.
const BELOW: &str = "below ";

/// The cgroup recorded for the container at `dir`, if it has one, and the cgroup
/// (relative to the hierarchy's root) it is a leaf below, if it is one.
fn recorded(dir: &ContainerDir) -> Result<Option<(PathBuf, Option<String>)>> {
    let record = dir.cgroup_record();
    match std::fs::read_to_string(&record) {
        Ok(text) => {
            let (path, below) = match text.split_once('\n') {
                Some((path, rest)) => (path, rest.strip_prefix(BELOW).map(String::from)),
                None => (text.as_str(), None),
            };
            Ok(Some((PathBuf::from(path), below)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read", &record)(e)),
    }
}

/// The container's cgroup, open: the directory (for clone3's `CLONE_INTO_CGROUP`,
/// see [`crate::sys::fork_into_cgroup`]) and its `cgroup.procs`.
pub struct Cgroup {
    pub path: PathBuf,
    pub dir: OwnedFd,
    pub procs: OwnedFd,
    /// Whether the process that opened it goes in: always, unless the cgroup is a leaf
    /// below its creator's cgroup and the process is in another one (one the scheduler
    /// placed it in, whose limits it keeps there).
    pub takes_caller: bool,
}

impl Cgroup {
    /// Moves the calling process (and so all it forks from now on) into the cgroup,
    /// where it [takes the caller](Cgroup::takes_caller). Call before the process
    /// enters the container. Fails once teardown has removed the cgroup, however long
    /// ago it was opened. Costs an RCU grace period on most kernels: a process berth
    /// forks itself starts in the cgroup instead.
    pub fn join_self(&self) -> Result<()> {
        if !self.takes_caller {
            return Ok(());
        }
        rustix::io::write(&self.procs, b"0").map(drop).map_err(|e| io("enter", &self.path)(e.into()))
    }
}

/// Opens the cgroup recorded for the container at `dir`, if it has one.
pub fn open(dir: &ContainerDir) -> Result<Option<Cgroup>> {
    use rustix::fs::{Mode, OFlags};
    let Some((path, below)) = recorded(dir)? else { return Ok(None) };
    let cgroup = rustix::fs::open(&path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).map_err(|e| io("open", &path)(e.into()))?;
    let procs = rustix::fs::openat(&cgroup, "cgroup.procs", OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty()).map_err(|e| io("open", &path)(e.into()))?;
    let takes_caller = match below {
        None => true,
        Some(parent) => own_cgroup()? == parent,
    };
    Ok(Some(Cgroup { path, dir: cgroup, procs, takes_caller }))
}

/// Kills every process in the container's cgroup and removes it; returns how many
/// processes were signalled.
pub fn kill(dir: &ContainerDir, timeout: Duration) -> Result<usize> {
    let Some((path, _)) = recorded(dir)? else { return Ok(0) };
    if !path.is_dir() {
        return Ok(0);
    }
    let procs = path.join("cgroup.procs");
    let members = || -> Result<Vec<i32>> {
        Ok(std::fs::read_to_string(&procs).map_err(io("read", &procs))?.lines().filter_map(|l| l.trim().parse().ok()).collect())
    };
    let mut killed: std::collections::HashSet<i32> = std::collections::HashSet::new();
    // Atomic where the kernel has it (5.14): no fork escapes between read and kill.
    let kill_file = path.join("cgroup.kill");
    if kill_file.exists() {
        killed.extend(members()?);
        std::fs::write(&kill_file, "1").map_err(io("kill", &path))?;
    }
    let start = Instant::now();
    loop {
        let pids = members()?;
        if pids.is_empty() {
            break;
        }
        if start.elapsed() > timeout {
            return Err(CgroupError::Stuck { path, pids, secs: timeout.as_secs() });
        }
        for pid in pids {
            if kill_if_member(pid, &path) {
                killed.insert(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // An empty cgroup.procs can still hold tasks that are exiting (a killed mpirun's
    // threads): rmdir says EBUSY until the kernel has let them go. A process that joined
    // since the sweep (OpenPBS's launcher, which any user can start, enters the cgroup
    // before the namespaces) is killed too, not waited for.
    loop {
        match std::fs::remove_dir(&path) {
            Ok(()) => return Ok(killed.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(killed.len()),
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32) && start.elapsed() <= timeout => {
                for pid in members().unwrap_or_default() {
                    if kill_if_member(pid, &path) {
                        killed.insert(pid);
                    }
                }
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(io("remove", &path)(e)),
        }
    }
}

/// SIGKILL to `pid` through a pidfd, if the process the pidfd pins is in the cgroup at
/// `path`: a pid that was recycled after the cgroup listed it is never hit.
fn kill_if_member(pid: i32, path: &Path) -> bool {
    let Some(pidfd) = pidfd(pid) else { return false };
    // While the pinned process lives, /proc/<pid> is that process; if it died since, the
    // signal below goes nowhere whatever /proc/<pid> shows now.
    let member = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|text| text.lines().find_map(|l| l.strip_prefix("0::").map(String::from)))
        .is_some_and(|rel| path.ends_with(rel.trim_start_matches('/')) && !rel.trim_start_matches('/').is_empty());
    member && rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL).is_ok()
}

/// A pidfd for `pid`, or `None` when it is gone.
pub(super) fn pidfd(pid: i32) -> Option<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid)?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn mountinfo_escapes_are_read() {
        assert_eq!(unescape(r"/sys/fs/cgroup/un\040ified"), "/sys/fs/cgroup/un ified");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape(r"/odd\x"), r"/odd\x");
    }

    /// A runtime dir holding a container dir `c` with its cgroup made; `None` (the test
    /// skipped) where berth makes none: not root, or cgroup v2 carries controllers.
    fn container_with_cgroup(test: &str) -> Option<(PathBuf, ContainerDir)> {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: making a cgroup needs root");
            return None;
        }
        let runtime = std::env::temp_dir().join(format!("berth-cgroup-{test}-{}", std::process::id()));
        let dir = RuntimeDir::at(&runtime).container("7", "c").unwrap();
        std::fs::create_dir_all(dir.path()).unwrap();
        create(&dir, &RuntimeDir::at(&runtime), Tracking::Scheduler).unwrap();
        if recorded(&dir).unwrap().is_none() {
            eprintln!("skipped: this node's cgroup v2 carries controllers, so berth makes no cgroup");
            std::fs::remove_dir_all(&runtime).unwrap();
            return None;
        }
        Some((runtime, dir))
    }

    #[test]
    fn a_child_forked_into_the_cgroup_starts_there_and_dies_with_it() {
        let Some((runtime, dir)) = container_with_cgroup("fork") else { return };
        let (path, _) = recorded(&dir).unwrap().unwrap();
        let cgroup = open(&dir).unwrap().unwrap();
        let child = match crate::sys::fork_into_cgroup(cgroup.dir.as_fd(), cgroup.procs.as_fd()).unwrap() {
            // Nothing that allocates: the test harness has other threads.
            crate::sys::Forked::Child => loop {
                nix::unistd::pause();
            },
            crate::sys::Forked::Parent(pid) => pid,
        };
        // A failed assertion must not leave the child paused forever.
        struct KillOnDrop(nix::unistd::Pid);
        impl Drop for KillOnDrop {
            fn drop(&mut self) {
                let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGKILL);
            }
        }
        let _guard = KillOnDrop(child);
        let membership = std::fs::read_to_string(format!("/proc/{child}/cgroup")).unwrap();
        let rel = membership.lines().find_map(|l| l.strip_prefix("0::")).unwrap().trim_start_matches('/');
        assert!(!rel.is_empty() && path.ends_with(rel), "child in {rel}, cgroup {}", path.display());
        assert_eq!(kill(&dir, Duration::from_secs(10)).unwrap(), 1);
        let status = nix::sys::wait::waitpid(child, None).unwrap();
        assert!(matches!(status, nix::sys::wait::WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGKILL, _)), "{status:?}");
        assert!(!path.exists());
        std::fs::remove_dir_all(&runtime).unwrap();
    }

    #[test]
    fn a_cgroup_opened_before_teardown_cannot_be_joined_after_it() {
        let Some((runtime, dir)) = container_with_cgroup("late") else { return };
        // A launcher stopped between opening the cgroup and joining it, while the job ends.
        let cgroup = open(&dir).unwrap().unwrap();
        assert_eq!(kill(&dir, Duration::from_secs(10)).unwrap(), 0);
        assert!(cgroup.join_self().is_err(), "joined a removed cgroup");
        assert!(!cgroup.path.exists());
        std::fs::remove_dir_all(&runtime).unwrap();
    }

    #[test]
    fn a_leaf_below_its_creators_cgroup_is_recorded_with_that_cgroup() {
        let runtime = std::env::temp_dir().join(format!("berth-cgroup-record-{}", std::process::id()));
        let dir = RuntimeDir::at(&runtime).container("7", "c").unwrap();
        std::fs::create_dir_all(dir.path()).unwrap();
        std::fs::write(dir.cgroup_record(), "/sys/fs/cgroup/system.slice/pbs_mom.service/berth-1-2\nbelow /system.slice/pbs_mom.service").unwrap();
        let (path, below) = recorded(&dir).unwrap().unwrap();
        assert_eq!(path, Path::new("/sys/fs/cgroup/system.slice/pbs_mom.service/berth-1-2"));
        assert_eq!(below.as_deref(), Some("/system.slice/pbs_mom.service"));
        // Records of containers made before leaves existed: one line, entered by all.
        std::fs::write(dir.cgroup_record(), "/sys/fs/cgroup/berth/1-2").unwrap();
        assert_eq!(recorded(&dir).unwrap().unwrap(), (PathBuf::from("/sys/fs/cgroup/berth/1-2"), None));
        std::fs::remove_dir_all(&runtime).unwrap();
    }

    #[test]
    fn a_container_without_a_cgroup_has_nothing_to_kill_or_open() {
        let runtime = std::env::temp_dir().join(format!("berth-cgroup-none-{}", std::process::id()));
        let dir = RuntimeDir::at(&runtime).container("7", "c").unwrap();
        std::fs::create_dir_all(dir.path()).unwrap();
        assert_eq!(kill(&dir, Duration::from_secs(1)).unwrap(), 0);
        assert!(open(&dir).unwrap().is_none());
        std::fs::remove_dir_all(&runtime).unwrap();
    }
}
