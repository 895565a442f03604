//! Removing a job's containers from a node: kill every process of the container's
//! cgroup ([`cgroup`]: also those that left its namespaces) and every process whose
//! mount namespace is the container's, unpin the namespaces, remove the runtime dir
//! (upper dirs included). Reads only the job's runtime dir, its cgroup and /proc.
//! Idempotent: safe twice, after a crash half-way through create, or when create never
//! ran. Must never touch a process or file outside the job: it matches processes by
//! cgroup and namespace identity, never by name or user, and signals them through a
//! pidfd taken before the match is checked, so a recycled pid is never hit.

pub mod cgroup;

use nix::errno::Errno;
use nix::mount::MntFlags;
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Files in a container's dir that may hold a pinned namespace.
pub const PINS: &[&str] = &["mnt", "uts", "ipc"];
/// How long processes may take to die after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TeardownError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot remove {path}: {source}")]
    Remove { path: PathBuf, source: std::io::Error },
    #[error("cannot unmount {path}: {source}")]
    Unmount { path: PathBuf, source: Errno },
    #[error("processes {pids:?} in container {dir} survived SIGKILL for {secs} s (stuck in the kernel?)")]
    Stuck { dir: PathBuf, pids: Vec<i32>, secs: u64 },
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
}

/// What destroy did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Destroyed {
    pub containers: usize,
    pub killed: usize,
}

/// Whether `path` is a bind mount of a namespace file.
pub fn is_pinned(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).map(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC).unwrap_or(false)
}

/// Takes the job's lock (`<job dir>/.lock`, root's alone, waited for at most
/// [`JOB_WAIT`](crate::lock::JOB_WAIT)), creating the job dir when `create`; `None`
/// when the job dir does not exist and `create` is false. Retries when the dir was
/// removed by a destroy while we waited, so the lock always guards the live dir.
pub fn lock_job(job_dir: &Path, create: bool) -> Result<Option<crate::lock::Lock>, TeardownError> {
    use crate::lock;
    use std::os::unix::fs::DirBuilderExt;
    let path = job_dir.join(".lock");
    loop {
        if create {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .recursive(true)
                .create(job_dir)
                .map_err(|source| TeardownError::Read { path: job_dir.to_path_buf(), source })?;
        }
        if !create && !job_dir.is_dir() {
            return Ok(None);
        }
        let locked = match lock::acquire(&path, true, lock::JOB_WAIT, "a job's containers, held by another create, wire or destroy") {
            Ok(l) => l,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        let held = locked.file().metadata().map_err(|source| TeardownError::Read { path: path.clone(), source })?;
        match std::fs::metadata(&path) {
            Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => return Ok(Some(locked)),
            _ => continue,
        }
    }
}

/// Destroys every container of `job` under `runtime_dir` and removes `<runtime_dir>/<job>`.
pub fn destroy_job(runtime_dir: &Path, job: &str) -> Result<Destroyed, TeardownError> {
    let job_dir = runtime_dir.join(job);
    let Some(_lock) = lock_job(&job_dir, false)? else {
        return Ok(Destroyed::default());
    };
    let mut done = Destroyed::default();
    let entries = std::fs::read_dir(&job_dir).map_err(|source| TeardownError::Read { path: job_dir.clone(), source })?;
    for entry in entries {
        let entry = entry.map_err(|source| TeardownError::Read { path: job_dir.clone(), source })?;
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            done.killed += destroy_container(&entry.path())?;
            done.containers += 1;
        }
    }
    remove_all(&job_dir)?;
    Ok(done)
}

/// Destroys one container given its dir; returns how many processes were killed.
/// The caller holds the job's lock.
pub fn destroy_container(dir: &Path) -> Result<usize, TeardownError> {
    let mut killed = cgroup::kill(dir, KILL_TIMEOUT)?;
    let mnt = dir.join("mnt");
    if is_pinned(&mnt) {
        let meta = std::fs::metadata(&mnt).map_err(|source| TeardownError::Read { path: mnt.clone(), source })?;
        // A pin that is a symlink to an anchor's /proc entry could, after the anchor
        // died, name a reused pid's namespace: kill only what matches the record.
        let is_link = std::fs::symlink_metadata(&mnt).map(|m| m.file_type().is_symlink()).unwrap_or(false);
        let matches = match recorded_inode(dir) {
            Some(inode) => inode == meta.ino(),
            None => !is_link,
        };
        if matches {
            killed += kill_members(dir, (meta.dev(), meta.ino()))?;
        }
    }
    for pin in PINS {
        let path = dir.join(pin);
        let is_link = std::fs::symlink_metadata(&path).map(|m| m.file_type().is_symlink()).unwrap_or(false);
        while !is_link && is_pinned(&path) {
            nix::mount::umount2(&path, MntFlags::MNT_DETACH).map_err(|source| TeardownError::Unmount { path: path.clone(), source })?;
        }
    }
    remove_all(dir)?;
    Ok(killed)
}

/// The container's mount namespace inode as create recorded it in `state.json`.
fn recorded_inode(dir: &Path) -> Option<u64> {
    let text = std::fs::read(dir.join("state.json")).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&text).ok()?;
    value.get("mnt_inode")?.as_u64().filter(|i| *i != 0)
}

fn remove_all(path: &Path) -> Result<(), TeardownError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(TeardownError::Remove { path: path.to_path_buf(), source }),
    }
}

/// The pids whose mount namespace is `ns` (device, inode), this process excepted.
pub fn members(ns: (u64, u64)) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()).filter(|pid| *pid != me && in_namespace(*pid, ns)).collect()
}

fn in_namespace(pid: i32, ns: (u64, u64)) -> bool {
    std::fs::metadata(format!("/proc/{pid}/ns/mnt")).map(|m| (m.dev(), m.ino()) == ns).unwrap_or(false)
}

fn kill_members(dir: &Path, ns: (u64, u64)) -> Result<usize, TeardownError> {
    let start = Instant::now();
    let mut killed = HashSet::new();
    loop {
        let pids = members(ns);
        if pids.is_empty() {
            return Ok(killed.len());
        }
        if start.elapsed() > KILL_TIMEOUT {
            return Err(TeardownError::Stuck { dir: dir.to_path_buf(), pids, secs: KILL_TIMEOUT.as_secs() });
        }
        for pid in pids {
            // The pidfd pins the process; checked again through it, so a pid recycled
            // since the scan is never hit. Errors: it died meanwhile, as wanted.
            let Some(pidfd) = cgroup::pidfd(pid) else { continue };
            if in_namespace(pid, ns) && rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL).is_ok() {
                killed.insert(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("berth-teardown-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn destroying_a_job_that_never_ran_succeeds_twice() {
        let rt = scratch("absent");
        assert_eq!(destroy_job(&rt, "42").unwrap(), Destroyed::default());
        assert_eq!(destroy_job(&rt, "42").unwrap(), Destroyed::default());
    }

    #[test]
    fn leftovers_of_a_crashed_create_are_removed() {
        let rt = scratch("leftover");
        let c = rt.join("7").join("node");
        std::fs::create_dir_all(c.join("upper/etc")).unwrap();
        std::fs::write(c.join("mnt"), b"").unwrap();
        std::fs::write(c.join("upper/etc/passwd"), b"x").unwrap();
        let done = destroy_job(&rt, "7").unwrap();
        assert_eq!(done, Destroyed { containers: 1, killed: 0 });
        assert!(!rt.join("7").exists());
        std::fs::remove_dir_all(&rt).unwrap();
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
