//! slurmd context: slurmd starting, and the job epilog.
//!
//! As slurmd starts (`slurm_spank_init`, context slurmd), before any job can run on the
//! node, the runtime dir is made a private mount, in slurmd's mount namespace, which
//! its slurmstepds and their `berth container create`s inherit: no create then takes
//! the node-wide lock that one stopped by its user (`scancel -s STOP`) would hold for
//! everyone. A failure there is one line in slurmd's log, never a failed start.
//!
//! The job epilog runs as root on every node of the job when the job ends there, also
//! when its slurmstepd was killed. Owns teardown: `berth container destroy --job J`
//! removes every container of the job on the node (idempotent).
//!
//! First it stops any `berth container create` of the job still running on the node:
//! a task whose slurmstepd was killed while berth pulled the image is orphaned, and its
//! create would otherwise make the container after the job is gone (and the task would
//! then run the job's program outside Slurm). Killing the create fails the task.
//!
//! A teardown failure is logged in slurmd's log but not returned: a failing epilog
//! drains the node, and leftovers of one job (under its own runtime dir) do not harm
//! the next one. `berth gc` and the admin's log take it from there.

use crate::berth;
use crate::ffi::{self, Spank};
use crate::sys;
use berth_engine::config::Config;
use berth_engine::runtime::RuntimeDir;
use std::time::Duration;

/// How long slurmd, starting, waits for a create holding the runtime dir's lock (one
/// that outlived a restart of slurmd, on a node whose dir was not private yet): a job's
/// process may be stopped, and slurmd's start must not wait on it.
const RUNTIME_DIR_WAIT: Duration = Duration::from_secs(5);

/// slurmd starting: makes the runtime dir a private mount (root's, 0755), as `berth
/// container create` would first do, under the same lock.
pub fn init(config: &Config) -> Result<(), String> {
    let runtime = RuntimeDir::of(config);
    let dir = runtime.path().display();
    runtime.prepare(RUNTIME_DIR_WAIT).map_err(|err| {
        format!("berth: cannot make the runtime dir {dir} a private mount as slurmd starts ({err}); each container create will make it private itself")
    })?;
    ffi::log_info(&format!("berth: the runtime dir {dir} is a private mount"));
    Ok(())
}

pub fn job_epilog(sp: &Spank, config: &Config) -> Result<(), String> {
    let job = sp.job_id().map_err(|e| e.to_string())?;
    let stopped = stop_creates(&config.berth_binary, job);
    if stopped > 0 {
        ffi::log_info(&format!("berth: stopped {stopped} container create(s) of job {job} left by a lost slurmstepd"));
    }
    // Most jobs never asked for a container: do not run anything for them.
    if !RuntimeDir::of(config).job(&job.to_string()).is_ok_and(|dir| dir.exists()) {
        return Ok(());
    }
    match berth::destroy(config, job) {
        Ok(()) => ffi::log_debug(&format!("berth: tore down the containers of job {job}")),
        Err(message) => ffi::log_error(&message),
    }
    Ok(())
}

/// Whether a process's argv (NUL-separated, from /proc/PID/cmdline) is `berth container
/// create --job JOB ...` run as `binary`, the way `berth.rs` runs it.
pub fn is_create_of(cmdline: &[u8], binary: &[u8], job: &str) -> bool {
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.len() >= 5 && args[0] == binary && args[1..5] == [b"container" as &[u8], b"create", b"--job", job.as_bytes()]
}

/// SIGKILLs every `berth container create` of `job` on this node and waits (up to 10 s)
/// for them to go; returns how many there were. Only those in the node's mount
/// namespace: a container's anchor is a fork of its create, inside the container, and
/// `berth container destroy` ends it with the rest.
fn stop_creates(binary: &std::path::Path, job: u32) -> usize {
    use std::os::unix::ffi::OsStrExt;
    let job = job.to_string();
    let node_ns = std::fs::read_link("/proc/self/ns/mnt").ok();
    let pids: Vec<i32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| is_create_of(&cmd, binary.as_os_str().as_bytes(), &job)))
        .filter(|pid| node_ns.is_some() && std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok() == node_ns)
        .collect();
    for &pid in &pids {
        sys::kill_now(pid);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pids.iter().any(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists()) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    pids.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_jobs_own_creates_match() {
        let cmd = b"/usr/bin/berth\0container\0create\0--job\x0042\0--user\x001001\0";
        assert!(is_create_of(cmd, b"/usr/bin/berth", "42"));
        assert!(!is_create_of(cmd, b"/usr/bin/berth", "4"));
        assert!(!is_create_of(b"/usr/bin/berth\0container\0destroy\0--job\x0042\0", b"/usr/bin/berth", "42"));
        assert!(!is_create_of(cmd, b"/opt/other/berth", "42"));
    }
}
