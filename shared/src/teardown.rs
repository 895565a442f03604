//! Removing a job's containers from a node: kill every process of the container's
//! cgroup ([`cgroup`]: also those that left its namespaces) and every process whose
//! mount namespace is the container's, unpin the namespaces, remove the runtime dir
//! (upper dirs included). Reads only the job's runtime dir (found through
//! [`crate::runtime`]), its cgroup and /proc.
//! Idempotent: safe twice, after a crash half-way through create, or when create never
//! ran. Must never touch a process or file outside the job: it matches processes by
//! cgroup and namespace identity, never by name or user, and signals them through a
//! pidfd taken before the match is checked, so a recycled pid is never hit.

pub mod cgroup;

use crate::runtime::{is_pinned, ContainerDir, JobDir};
use nix::errno::Errno;
use nix::mount::MntFlags;
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    Runtime(#[from] crate::runtime::RuntimeError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
}

/// What destroy did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Destroyed {
    pub containers: usize,
    pub killed: usize,
}

/// Destroys every container of the job and removes its dir.
pub fn destroy_job(job: &JobDir) -> Result<Destroyed, TeardownError> {
    let Some(_lock) = job.lock(false)? else {
        return Ok(Destroyed::default());
    };
    let mut done = Destroyed::default();
    let containers = job.containers().map_err(|source| TeardownError::Read { path: job.path().to_path_buf(), source })?;
    for dir in &containers {
        done.killed += destroy_container(dir)?;
        done.containers += 1;
    }
    remove_all(job.path())?;
    Ok(done)
}

/// Destroys one container given its dir; returns how many processes were killed.
/// The caller holds the job's lock.
pub fn destroy_container(dir: &ContainerDir) -> Result<usize, TeardownError> {
    let mut killed = cgroup::kill(dir, KILL_TIMEOUT)?;
    let mnt = dir.mnt();
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
            killed += kill_members(dir.path(), (meta.dev(), meta.ino()))?;
        }
    }
    for path in dir.pins() {
        let is_link = std::fs::symlink_metadata(&path).map(|m| m.file_type().is_symlink()).unwrap_or(false);
        while !is_link && is_pinned(&path) {
            nix::mount::umount2(&path, MntFlags::MNT_DETACH).map_err(|source| TeardownError::Unmount { path: path.clone(), source })?;
        }
    }
    remove_all(dir.path())?;
    Ok(killed)
}

/// The container's mount namespace inode as create recorded it in `state.json`.
fn recorded_inode(dir: &ContainerDir) -> Option<u64> {
    let text = std::fs::read(dir.state()).ok()?;
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

    fn job(rt: &Path, id: &str) -> JobDir {
        crate::runtime::RuntimeDir::at(rt).job(id).unwrap()
    }

    #[test]
    fn destroying_a_job_that_never_ran_succeeds_twice() {
        let rt = scratch("absent");
        assert_eq!(destroy_job(&job(&rt, "42")).unwrap(), Destroyed::default());
        assert_eq!(destroy_job(&job(&rt, "42")).unwrap(), Destroyed::default());
    }

    #[test]
    fn leftovers_of_a_crashed_create_are_removed() {
        let rt = scratch("leftover");
        let c = job(&rt, "7").container("node").unwrap();
        std::fs::create_dir_all(c.upper().join("etc")).unwrap();
        std::fs::write(c.mnt(), b"").unwrap();
        std::fs::write(c.upper().join("etc/passwd"), b"x").unwrap();
        let done = destroy_job(&job(&rt, "7")).unwrap();
        assert_eq!(done, Destroyed { containers: 1, killed: 0 });
        assert!(!job(&rt, "7").exists());
        std::fs::remove_dir_all(&rt).unwrap();
    }
}
