//! The runtime dir (`runtime_dir` in the admin config, default `/run/berth`): where a
//! node keeps what its jobs' containers are made of while they live. Every part that
//! reads or writes in it (create, join, list, wiring, teardown, the Slurm plugin, the
//! Torque/PBS hooks) asks this module for the path.
//!
//! | path | what | whose |
//! |---|---|---|
//! | `.lock` | node-wide lock, taken only to make the dir a private mount ([`RuntimeDir::prepare`]) | here |
//! | `.cgroup2/` | the cgroup2 hierarchy berth mounts when the node has none | `teardown::cgroup` |
//! | `.slurm-client/` | Slurm's commands, offered inside containers | the Slurm plugin |
//! | `<job>/` (0700) | everything one job owns on the node ([`JobDir`]) | |
//! | `<job>/.lock` | the job's lock ([`JobDir::lock`]) | here |
//! | `<job>/container-env`, `remap-root` | what the Torque prologue / OpenPBS begin hook noted for the job's shell | `pbs-hooks` |
//! | `<job>/prologue-error`, `launch-error` | a failed prologue's / begin hook's line, for the job starter / launcher | `pbs-hooks` |
//! | `<job>/<name>/` (0700) | one container ([`ContainerDir`]) | container |
//! | `<job>/<name>/mnt`, `uts`, `ipc` | the pinned namespaces ([`PINS`]) | container, teardown |
//! | `<job>/<name>/env`, `workdir`, `state.json` | the container's environment, working directory, record | container |
//! | `<job>/<name>/cgroup` | the container's cgroup, named | `teardown::cgroup` |
//! | `<job>/<name>/upper/`, `work/`, `root/` | the overlay's writable part and mount point | container (`rootfs`) |
//! | `<job>/<name>/wiring/`, `wiring.json`, `sshd.log` | MPI wiring's files, record and sshd's log | wiring |
//!
//! Owns that layout (every path in the dir is made here, from a job id and a container
//! name checked by [`check_name`], or from the dir's own entries), the dir's
//! preparation (root's, 0755, a private mount), the job locks and what counts as a pin.
//! Never decides what a file holds (its owner, in the table, does), never removes
//! anything (teardown does), and never follows a symlink where it lists or locks.

use crate::config::Config;
use crate::lock::{self, Lock, LockError};
use nix::errno::Errno;
use nix::mount::MsFlags;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Files in a container's dir that may hold a pinned namespace.
pub const PINS: &[&str] = &["mnt", "uts", "ipc"];

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("bad {what} '{value}': use letters, digits, '.', '_' or '-' (not starting with '.')")]
    BadName { what: &'static str, value: String },
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("cannot {action} {path}: no space left on its file system; free space there (the runtime dir is runtime_dir in the admin config)")]
    NoSpace { action: &'static str, path: PathBuf },
    #[error("cannot {action}: {source}")]
    Sys { action: &'static str, source: Errno },
    #[error(transparent)]
    Lock(#[from] LockError),
}

type Result<T, E = RuntimeError> = std::result::Result<T, E>;

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RuntimeError + 'a {
    move |source| {
        if crate::unpack::is_no_space(&source) {
            return RuntimeError::NoSpace { action, path: path.to_path_buf() };
        }
        RuntimeError::Io { action, path: path.to_path_buf(), source }
    }
}

fn sys_err(action: &'static str) -> impl FnOnce(Errno) -> RuntimeError {
    move |source| RuntimeError::Sys { action, source }
}

/// Job ids and container names become directory names: keep them plain.
pub fn check_name(what: &'static str, value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && !value.starts_with('.')
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::BadName { what, value: value.to_string() })
    }
}

/// Whether `path` is a bind mount of a namespace file.
pub fn is_pinned(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).map(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC).unwrap_or(false)
}

/// The node's runtime dir.
#[derive(Debug, Clone)]
pub struct RuntimeDir {
    path: PathBuf,
}

impl RuntimeDir {
    /// The runtime dir the admin config names.
    pub fn of(config: &Config) -> RuntimeDir {
        RuntimeDir::at(&config.runtime_dir)
    }

    /// A runtime dir at `path` (tests, and callers that hold only the path).
    pub fn at(path: &Path) -> RuntimeDir {
        RuntimeDir { path: path.to_path_buf() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The mount point of the cgroup2 hierarchy berth mounts when the node has none.
    pub fn cgroup2_mount(&self) -> PathBuf {
        self.path.join(".cgroup2")
    }

    /// Where the Slurm plugin installs Slurm's commands for containers.
    pub fn slurm_client(&self) -> PathBuf {
        self.path.join(".slurm-client")
    }

    /// The dir of job `id`, refused unless `id` is plain ([`check_name`]).
    pub fn job(&self, id: &str) -> Result<JobDir> {
        check_name("job id", id)?;
        Ok(JobDir { path: self.path.join(id) })
    }

    /// The dir of container `name` of job `job` ([`RuntimeDir::job`], [`JobDir::container`]).
    pub fn container(&self, job: &str, name: &str) -> Result<ContainerDir> {
        self.job(job)?.container(name)
    }

    /// The job dirs present: directories (not followed through a symlink) whose names
    /// are plain ([`check_name`]), so never `.cgroup2` or `.slurm-client`.
    pub fn jobs(&self) -> std::io::Result<Vec<JobDir>> {
        Ok(subdirs(&self.path)?
            .into_iter()
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| check_name("job id", n).is_ok()))
            .map(|path| JobDir { path })
            .collect())
    }

    /// Makes the runtime dir what every container in it needs: root's dir of mode 0755
    /// (exactly, whatever the caller's umask, which this leaves alone: in slurmd it is
    /// slurmd's) and a private mount. `container::create` runs it first; berth.so runs
    /// it in slurmd as slurmd starts, before any job can run on the node, so that no
    /// create needs the node-wide lock this may take. Waits at most `wait` for another
    /// holder of that lock.
    pub fn prepare(&self, wait: Duration) -> Result<()> {
        crate::fsmode::ensure_dir(&self.path, 0o755).map_err(io("create", &self.path))?;
        self.make_private(wait)
    }

    /// Makes the runtime dir a private mount unless it is one. The node-wide lock this
    /// takes is only for a node whose slurmd did not make the dir private (another
    /// scheduler, or slurmd failed to): a create its job stops (`scancel -s STOP`) can
    /// hold up no other user's once the runtime dir is private, and a waiter re-checks
    /// between short waits, so a holder stopped after its mount holds up nobody.
    fn make_private(&self, wait: Duration) -> Result<()> {
        let path = self.path.join(".lock");
        let start = Instant::now();
        while !is_private_mount(&self.path)? {
            let what = "the runtime dir's mount, held by another create";
            match lock::acquire(&path, true, Duration::from_millis(250), what) {
                Ok(_runtime_lock) => return make_private(&self.path),
                Err(LockError::TimedOut { .. }) if start.elapsed() < wait => {}
                Err(LockError::TimedOut { path, what, .. }) => return Err(LockError::TimedOut { path, what, waited: start.elapsed() }.into()),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Whether `dir` is a mount point (the topmost at its path) and, if so, whether it
/// propagates (shared or slave); also its canonical path.
fn mount_state(dir: &Path) -> Result<(PathBuf, Option<bool>)> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(io("read", Path::new("/proc/self/mountinfo")))?;
    let canonical = dir.canonicalize().map_err(io("resolve", dir))?;
    let wanted = canonical.to_string_lossy().replace(' ', "\\040");
    let entry = mountinfo.lines().rev().find(|l| l.split(' ').nth(4) == Some(wanted.as_str()));
    let propagates = entry.map(|line| line.split(' ').nth(6).is_some_and(|f| f.contains(':')));
    Ok((canonical, propagates))
}

/// Whether `dir` is already a private mount point: then [`make_private`] has nothing to
/// do, and needs no lock (no create undoes it).
fn is_private_mount(dir: &Path) -> Result<bool> {
    Ok(mount_state(dir)?.1 == Some(false))
}

/// Makes `dir` a mount point with private propagation (as `ip netns` does for
/// /run/netns), so pins made in it never propagate into other mount namespaces.
/// The caller holds the runtime dir's lock: two binds would stack, and the upper one
/// would hide the pins made in the lower.
fn make_private(dir: &Path) -> Result<()> {
    let (canonical, propagates) = mount_state(dir)?;
    match propagates {
        Some(false) => return Ok(()),
        Some(true) => {}
        None => nix::mount::mount(Some(&canonical), &canonical, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(sys_err("bind-mount the runtime dir on itself"))?,
    }
    nix::mount::mount(None::<&str>, &canonical, None::<&str>, MsFlags::MS_PRIVATE, None::<&str>)
        .map_err(sys_err("make the runtime dir a private mount"))
}

/// The directories in `dir`, never followed through a symlink.
fn subdirs(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            out.push(entry.path());
        }
    }
    Ok(out)
}

/// `<runtime_dir>/<job>/`: made only from a plain job id or found in the runtime dir.
#[derive(Debug, Clone)]
pub struct JobDir {
    path: PathBuf,
}

impl JobDir {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether berth made anything for the job on this node.
    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    /// The dir of container `name`, refused unless `name` is plain ([`check_name`]).
    pub fn container(&self, name: &str) -> Result<ContainerDir> {
        check_name("container name", name)?;
        Ok(ContainerDir { path: self.path.join(name) })
    }

    /// Every container dir of the job, as teardown must find them: each directory in
    /// the job dir (not followed through a symlink), whatever its name.
    pub fn containers(&self) -> std::io::Result<Vec<ContainerDir>> {
        Ok(subdirs(&self.path)?.into_iter().map(|path| ContainerDir { path }).collect())
    }

    /// The names the job takes from the image (`container-env`, one a line), noted by
    /// the Torque prologue / OpenPBS begin hook.
    pub fn container_env(&self) -> PathBuf {
        self.path.join("container-env")
    }

    /// Present when the job's shell runs as remapped root (noted by the PBS hooks).
    pub fn remap_root(&self) -> PathBuf {
        self.path.join("remap-root")
    }

    /// A failed Torque prologue's line, for the job starter.
    pub fn prologue_error(&self) -> PathBuf {
        self.path.join("prologue-error")
    }

    /// A failed OpenPBS begin hook's line, for the launcher: the job user's uid on the
    /// first line, the line for the job's error file on the second.
    pub fn launch_error(&self) -> PathBuf {
        self.path.join("launch-error")
    }

    /// Makes the job dir (mode 0700, whatever the umask; a symlink or someone else's
    /// dir there is refused) when missing, in a runtime dir made 0755 when missing:
    /// for creates, and for the PBS hooks' notes, which may come before any create.
    pub fn ensure(&self) -> std::io::Result<()> {
        crate::fsmode::ensure_dir(&self.path, 0o700)
    }

    /// Takes the job's lock (`<job dir>/.lock`, root's alone, waited for at most
    /// [`JOB_WAIT`](crate::lock::JOB_WAIT)), creating the job dir (0700) when `create`;
    /// `None` when the job dir does not exist and `create` is false. Retries when the
    /// dir was removed by a destroy while we waited, so the lock always guards the live
    /// dir.
    pub fn lock(&self, create: bool) -> Result<Option<Lock>> {
        let job_dir = &self.path;
        let path = job_dir.join(".lock");
        // "read", whatever failed: the lines teardown gave when it owned the lock.
        let read = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RuntimeError::Io { action: "read", path, source }
        };
        loop {
            if create {
                self.ensure().map_err(read(job_dir))?;
            }
            if !create && !job_dir.is_dir() {
                return Ok(None);
            }
            let locked = match lock::acquire(&path, true, lock::JOB_WAIT, "a job's containers, held by another create, wire or destroy") {
                Ok(l) => l,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e.into()),
            };
            let held = locked.file().metadata().map_err(read(&path))?;
            match std::fs::metadata(&path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => return Ok(Some(locked)),
                _ => continue,
            }
        }
    }
}

/// `<runtime_dir>/<job>/<name>/`: made only from a plain container name of a
/// [`JobDir`], or found in one.
#[derive(Debug, Clone)]
pub struct ContainerDir {
    path: PathBuf,
}

impl ContainerDir {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The same container dir reached through `dir`, a descriptor of it: the magic link
    /// `/proc/self/fd/N` names that directory instance whatever happens to the path
    /// later, so every file of it read through this one is of one container.
    pub fn through(&self, dir: BorrowedFd<'_>) -> ContainerDir {
        ContainerDir { path: PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())) }
    }

    /// Makes the dir, root's alone (0700).
    pub fn make(&self) -> std::io::Result<()> {
        crate::fsmode::ensure_dir(&self.path, 0o700)
    }

    /// The pin of namespace `ns`, one of [`PINS`].
    pub fn pin(&self, ns: &str) -> PathBuf {
        self.path.join(ns)
    }

    /// The pin of the container's mount namespace.
    pub fn mnt(&self) -> PathBuf {
        self.pin("mnt")
    }

    /// Every file that may hold a pin ([`PINS`]).
    pub fn pins(&self) -> impl Iterator<Item = PathBuf> + '_ {
        PINS.iter().map(|ns| self.pin(ns))
    }

    /// Whether the container's mount namespace is pinned.
    pub fn is_pinned(&self) -> bool {
        is_pinned(&self.mnt())
    }

    /// The container's environment (`KEY=VALUE` entries, each followed by a NUL byte).
    pub fn env(&self) -> PathBuf {
        self.path.join("env")
    }

    /// The task's working directory inside the container (bytes, no newline).
    pub fn workdir(&self) -> PathBuf {
        self.path.join("workdir")
    }

    /// What create was asked for (`container::State`).
    pub fn state(&self) -> PathBuf {
        self.path.join("state.json")
    }

    /// The file naming the container's cgroup (`teardown::cgroup`).
    pub fn cgroup_record(&self) -> PathBuf {
        self.path.join("cgroup")
    }

    /// The overlay's upper dir.
    pub fn upper(&self) -> PathBuf {
        self.path.join("upper")
    }

    /// The overlay's work dir.
    pub fn work(&self) -> PathBuf {
        self.path.join("work")
    }

    /// The overlay's mount point (mounted only inside the container).
    pub fn root(&self) -> PathBuf {
        self.path.join("root")
    }

    /// The wiring's dir (mounted read-only at `/.berth/wiring` in the container).
    pub fn wiring(&self) -> PathBuf {
        self.path.join("wiring")
    }

    /// What wiring recorded of the sshd it started.
    pub fn wiring_record(&self) -> PathBuf {
        self.path.join("wiring.json")
    }

    /// The wiring sshd's log.
    pub fn sshd_log(&self) -> PathBuf {
        self.path.join("sshd.log")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("berth-runtime-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn names_are_plain() {
        assert!(check_name("job id", "12345").is_ok());
        assert!(check_name("container name", "rank-3").is_ok());
        for bad in ["", "..", ".hidden", "a/b", "a b", "x\n"] {
            assert!(check_name("job id", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn paths_come_only_from_plain_names() {
        let rt = RuntimeDir::at(Path::new("/run/berth"));
        assert_eq!(rt.container("7", "node").unwrap().state(), Path::new("/run/berth/7/node/state.json"));
        assert!(rt.job("../etc").is_err());
        assert!(rt.container("7", "..").is_err());
        assert_eq!(rt.container("7", "a/b").unwrap_err().to_string(), "bad container name 'a/b': use letters, digits, '.', '_' or '-' (not starting with '.')");
    }

    #[test]
    fn listing_finds_job_dirs_only() {
        let root = scratch("list");
        for dir in ["7", ".cgroup2", ".slurm-client", "8.head/node"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        std::fs::write(root.join(".lock"), b"").unwrap();
        std::os::unix::fs::symlink(root.join("7"), root.join("9")).unwrap();
        let rt = RuntimeDir::at(&root);
        let mut jobs: Vec<PathBuf> = rt.jobs().unwrap().iter().map(|j| j.path().to_path_buf()).collect();
        jobs.sort();
        assert_eq!(jobs, [root.join("7"), root.join("8.head")]);
        let containers: Vec<PathBuf> = rt.job("8.head").unwrap().containers().unwrap().iter().map(|c| c.path().to_path_buf()).collect();
        assert_eq!(containers, [root.join("8.head/node")]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_plain_file_is_not_a_pinned_namespace() {
        let rt = scratch("pin");
        std::fs::create_dir_all(&rt).unwrap();
        std::fs::write(rt.join("mnt"), b"").unwrap();
        assert!(!is_pinned(&rt.join("mnt")));
        assert!(!is_pinned(&rt.join("absent")));
        std::fs::remove_dir_all(&rt).unwrap();
    }
}
