//! Join and exec: enters a pinned container (its cgroup, then its namespaces, after
//! checking the pins lead where `state.json` says), drops to the container's user,
//! enters the working directory as that user and execs the task. Owns the order of
//! these steps; never creates or changes a container, and never resolves the working
//! directory or a program as root.

use crate::sys;
use super::{env, io, ns_flag, open_fd, read_state, remap, sys_err, ContainerError, Result, State};
use crate::config::Config;
use crate::runtime::{ContainerDir, RuntimeDir};
use crate::teardown::{self, TeardownError};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sched::CloneFlags;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Forks a child that starts in the cgroup of the container at `dir` (when it has one),
/// so that it and all it forks are found at teardown; `action` names the fork in errors.
pub fn fork_in_cgroup(dir: &ContainerDir, action: &'static str) -> Result<sys::Forked> {
    match teardown::cgroup::open(dir).map_err(TeardownError::from)?.filter(|cgroup| cgroup.takes_caller) {
        Some(cgroup) => sys::fork_into_cgroup(cgroup.dir.as_fd(), cgroup.procs.as_fd()).map_err(sys_err(action)),
        None => sys::fork().map_err(sys_err(action)),
    }
}

/// A container this process has joined: what a task needs next.
#[derive(Debug)]
pub struct Joined {
    pub state: State,
    /// The container's environment (to merge with the task's by [`env::merge`]).
    pub env: Vec<env::Var>,
    /// Whom the task runs as inside a user namespace ([`remap::choose`]); `None`: the
    /// job user as is.
    pub inside: Option<remap::InsideIds>,
}

impl Joined {
    /// Decides, inside the joined container, whom tasks run as (see [`remap::choose`]).
    pub fn choose_inside(&mut self, config: &Config, want_root: bool) -> Result<()> {
        self.inside = remap::choose(config, self.state.image.config.user.as_deref(), want_root, &self.state.user)?;
        Ok(())
    }
}

/// Joins the calling process to container `name` of `job`: its namespaces and its root,
/// which becomes the working directory. What the Slurm plugin does in
/// `task_init_privileged`, before Slurm drops to the user. Needs root and a
/// single-threaded caller (setns into a mount namespace requires it). The container's
/// working directory is entered only as the user ([`exec_joined`], the plugin's
/// `task_init`): resolved as root, a path through a bind of `/home` would reach into
/// another user's private directory and keep it as the task's cwd.
pub fn join(config: &Config, job: &str, name: &str) -> Result<Joined> {
    let dir = RuntimeDir::of(config).container(job, name)?;
    join_dir(&dir, job, name, None)
}

/// [`join`] for a privileged entry point any local user can start (the OpenPBS
/// launcher, setuid root): joins only when the container's user is `uid`, the caller's
/// real uid. The container's directory is opened once, checked to be root's alone, and
/// everything after (state, pins, env, cgroup) is read through that descriptor, so a
/// container destroyed and made again for someone else between the check and the use
/// is never the one entered: the state checked and the pin opened come from one
/// directory, and the pin's namespace must be the one that state names.
pub fn join_own(config: &Config, job: &str, name: &str, uid: u32) -> Result<Joined> {
    let runtime = RuntimeDir::of(config);
    let container = runtime.container(job, name)?;
    let path = container.path();
    let untrusted = |why: String| ContainerError::Untrusted { path: path.to_path_buf(), why };
    crate::privileged::check_root_owned_dir(runtime.path()).map_err(|e| untrusted(e.to_string()))?;
    let dir = match open_fd(path, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW) {
        Ok(dir) => dir,
        Err(ContainerError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(ContainerError::NotFound { job: job.into(), name: name.into() })
        }
        Err(e) => return Err(e),
    };
    let stat = nix::sys::stat::fstat(dir.as_raw_fd()).map_err(sys_err("inspect the container's directory"))?;
    if stat.st_uid != 0 || stat.st_mode & 0o022 != 0 {
        return Err(untrusted(format!("owned by uid {} with mode {:o}, not root's alone", stat.st_uid, stat.st_mode & 0o7777)));
    }
    let held = container.through(dir.as_fd());
    let joined = join_dir(&held, job, name, Some(uid));
    drop(dir);
    joined
}

fn join_dir(dir: &ContainerDir, job: &str, name: &str, owner: Option<u32>) -> Result<Joined> {
    if !dir.is_pinned() {
        return Err(ContainerError::NotFound { job: job.into(), name: name.into() });
    }
    let state = read_state(dir)?;
    if let Some(uid) = owner {
        if state.job != job || state.name != name {
            return Err(ContainerError::NotFound { job: job.into(), name: name.into() });
        }
        if state.user.uid != uid {
            return Err(ContainerError::NotYours { job: job.into(), name: name.into(), uid });
        }
    }
    let env_path = dir.env();
    let env = env::decode(&std::fs::read(&env_path).map_err(io("read", &env_path))?);
    // Opened before the pins: a destroy that runs between here and the join removes the
    // cgroup first, and joining it below then fails, instead of entering the dead
    // container's namespaces (held open by the descriptors) outside any cgroup.
    let cgroup = teardown::cgroup::open(dir).map_err(TeardownError::from)?;
    let fds: Vec<(OwnedFd, CloneFlags)> = state
        .namespaces
        .iter()
        .map(|ns| Ok((open_fd(&dir.pin(ns), OFlag::O_RDONLY)?, ns_flag(ns))))
        .collect::<Result<_>>()?;
    // For a caller that is not root, the namespace must be the one root recorded (a
    // pin may be a link to the anchor's /proc/PID/ns/mnt, whose pid can be reused).
    if state.mnt_inode == 0 && owner.is_some() {
        return Err(ContainerError::NotFound { job: job.into(), name: name.into() });
    }
    if state.mnt_inode != 0 {
        let inode = nix::sys::stat::fstat(fds[0].0.as_raw_fd()).map_err(sys_err("inspect the container's namespace"))?.st_ino;
        if inode != state.mnt_inode {
            return Err(ContainerError::NotFound { job: job.into(), name: name.into() });
        }
    }
    // The cgroup is a host path: entered before the namespaces, kept by all the task forks.
    if let Some(cgroup) = &cgroup {
        match cgroup.join_self() {
            Err(_) if !cgroup.path.exists() => return Err(ContainerError::NotFound { job: job.into(), name: name.into() }),
            other => other.map_err(TeardownError::from)?,
        }
    }
    for (fd, flag) in &fds {
        nix::sched::setns(fd.as_fd(), *flag).map_err(sys_err("join the container's namespaces"))?;
    }
    // setns(CLONE_NEWNS) has made the container's root our root and cwd.
    Ok(Joined { state, env, inside: None })
}

/// Changes to `workdir` resolved inside the current root (call once in the container),
/// never through a magic link: a WorkingDir such as `/proc/self/fd/7` would otherwise
/// land on whatever host directory the caller (slurmstepd, a hook) has open as fd 7,
/// outside the container (runc's CVE-2024-21626).
pub fn enter_workdir(workdir: &str) -> Result<()> {
    let root = open_fd(Path::new("/"), OFlag::O_PATH | OFlag::O_DIRECTORY)?;
    match sys::open_in_root(root.as_fd(), Path::new(workdir), OFlag::O_PATH | OFlag::O_DIRECTORY, 0) {
        Ok(dir) => nix::unistd::fchdir(dir.as_raw_fd()).map_err(|source| ContainerError::Workdir { dir: workdir.into(), source }),
        // RESOLVE_NO_MAGICLINKS refuses with ELOOP; a plain symlink loop looks the same and is refused as well.
        Err(Errno::ELOOP) => Err(ContainerError::WorkdirEscapes { dir: workdir.into() }),
        Err(source) => Err(ContainerError::Workdir { dir: workdir.into(), source }),
    }
}

/// Looks `program` up in `path` (a `PATH` value) as execvp would, inside the
/// container (call after [`join`]).
fn find_program(program: &str, path: &str) -> Result<PathBuf> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| nix::unistd::access(p.as_path(), nix::unistd::AccessFlags::X_OK).is_ok() && p.is_file())
        .ok_or_else(|| ContainerError::NoProgram { program: program.into(), path: path.into() })
}

/// How privileges are dropped before exec.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Privileges {
    /// From root: groups, gid, uid, then no capabilities.
    FromRoot,
    /// Inside a user namespace that maps only the caller: ids stay, groups cannot change.
    InUserNamespace,
}

/// Becomes the container's user (no capabilities, no_new_privs), enters the container's
/// working directory as that user, closes the host's descriptors on exec and execs
/// `argv` with the job's environment (`job_env`, passed as data: a root caller never
/// runs with it) merged with the container's. Call after [`join`]; returns only on
/// failure.
pub fn exec_joined(joined: &Joined, argv: &[String], job_env: &[env::Var], overrides: &[String]) -> ContainerError {
    exec_as(joined, argv, job_env, overrides, Privileges::FromRoot)
}

pub(super) fn exec_as(joined: &Joined, argv: &[String], job_env: &[env::Var], overrides: &[String], drop: Privileges) -> ContainerError {
    let run = || -> Result<std::convert::Infallible> {
        let overrides = env::parse_list(overrides).map_err(|e| ContainerError::BadEnv { entry: e.to_string_lossy().into() })?;
        let vars = env::merge(job_env, &joined.env, &overrides);
        let program = argv.first().ok_or(ContainerError::NoCommand)?;
        match (drop, joined.inside) {
            (Privileges::FromRoot, None) => joined.state.user.become_user()?,
            (Privileges::InUserNamespace, None) => joined.state.user.drop_capabilities()?,
            // The task keeps the capabilities of its own user namespace (what the image's
            // root expects); its bounding set stays, the host's capabilities go.
            (Privileges::FromRoot, Some(inside)) => {
                joined.state.user.become_user_keeping_bounding_set()?;
                remap::enter(inside)?;
            }
            (Privileges::InUserNamespace, Some(inside)) => remap::enter(inside)?,
        }
        enter_workdir(&joined.state.workdir)?;
        let path = env::get(&vars, "PATH").map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        let resolved = find_program(program, &path)?;
        let exec_err = |source| ContainerError::Exec { program: program.clone(), source };
        let cpath = CString::new(resolved.as_os_str().as_bytes()).map_err(|_| exec_err(Errno::EINVAL))?;
        let cargs: Vec<CString> = argv.iter().map(|a| CString::new(a.as_bytes())).collect::<Result<_, _>>().map_err(|_| exec_err(Errno::EINVAL))?;
        sys::cloexec_from(3).map_err(sys_err("mark the host's descriptors close-on-exec"))?;
        nix::unistd::execve(&cpath, &cargs, &env::to_cstrings(&vars)).map_err(exec_err)
    };
    match run() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}
