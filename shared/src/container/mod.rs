//! A job's container on one node: create it (a mount namespace, plus UTS/IPC when
//! asked, with its root pivoted into the image's overlay), pin it in the job's runtime
//! dir, let tasks enter it, and run commands in it as the job user.
//!
//! Owns what a container's dir holds (its paths: [`crate::runtime::ContainerDir`]): the
//! pins of its namespaces (bind mounts of nsfs files), its environment (see [`env`]
//! for format and merge rules), its working directory, its `state.json` record and its
//! overlay.
//!
//! Must never write into an image's layer dirs, never leave a mount in the host's
//! namespace other than the pins, and never run anything as root inside a container.
//!
//! Split by verb: `spec.rs` what create and run are asked for (image config, user
//! mounts); `create.rs` building, pinning and recording a container; `join.rs`
//! entering one and exec'ing as its user; `run.rs` `berth run`; `list.rs` the live
//! containers and the layers they use. This file keeps the public names (re-exported
//! from those files), the error type and the small helpers they share; its only verb
//! is `destroy`, which hands over to [`teardown`].

pub mod env;
pub mod inroot;
pub mod mounts;
pub mod remap;

mod create;
mod join;
mod list;
mod run;
mod spec;

use crate::config::Config;
use crate::identity::UserError;
use crate::rootfs::RootfsError;
use crate::runtime::{RuntimeDir, RuntimeError};
use crate::teardown::{self, TeardownError};
use mounts::MountError;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sched::CloneFlags;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
pub use create::{create, read_state, Created, State};
pub use join::{enter_workdir, exec_joined, fork_in_cgroup, join, join_own, Joined};
pub use list::{layers_in_use, list, Listed};
pub use run::{command_line, run};
pub use spec::Spec;

/// The container name of per-node mode (all tasks of the job on the node share it).
pub const PER_NODE: &str = "node";

/// The per-rank container name of task `rank`.
pub fn per_rank(rank: u32) -> String {
    format!("rank-{rank}")
}

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("berth container actions need root (run by the scheduler's plugin or hooks, or with sudo)")]
    NotRoot,
    #[error("no container '{name}' for job {job} on this node: `berth container create` has not run, or destroy already did")]
    NotFound { job: String, name: String },
    #[error("container '{name}' of job {job} on this node is not yours (uid {uid}): you may enter only your own job's container")]
    NotYours { job: String, name: String, uid: u32 },
    #[error("{path} may not lead root into a container: {why}")]
    Untrusted { path: PathBuf, why: String },
    #[error("container '{name}' of job {job} already exists for {what}; destroy it first or pick another --name")]
    Mismatch { job: String, name: String, what: &'static str },
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("cannot {action} {path}: no space left on its file system; free space there (the runtime dir is runtime_dir in the admin config)")]
    NoSpace { action: &'static str, path: PathBuf },
    #[error("cannot {action}: {source}")]
    Sys { action: &'static str, source: Errno },
    #[error("bad environment entry '{entry}': expected KEY=VALUE")]
    BadEnv { entry: String },
    #[error(transparent)]
    ImageConfig(#[from] crate::image::ImageConfigError),
    #[error("cannot enter the working directory {dir} in the container as the job's user: {source} (pick one the user can enter, with --container-workdir or container-workdir=)")]
    Workdir { dir: String, source: Errno },
    #[error("the working directory {dir} resolves through a /proc link to a descriptor (or a symlink loop), which could lead out of the container; pick a directory of the image")]
    WorkdirEscapes { dir: String },
    #[error("'{program}' not found in the container's PATH ({path})")]
    NoProgram { program: String, path: String },
    #[error("cannot execute {program} in the container: {source}")]
    Exec { program: String, source: Errno },
    #[error("no command to run: the image has no Entrypoint or Cmd; give one after --")]
    NoCommand,
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    User(#[from] UserError),
    #[error(transparent)]
    Remap(#[from] remap::RemapError),
    #[error(transparent)]
    Teardown(#[from] TeardownError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

type Result<T, E = ContainerError> = std::result::Result<T, E>;

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ContainerError + 'a {
    move |source| {
        if crate::unpack::is_no_space(&source) {
            return ContainerError::NoSpace { action, path: path.to_path_buf() };
        }
        ContainerError::Io { action, path: path.to_path_buf(), source }
    }
}

fn sys_err(action: &'static str) -> impl FnOnce(Errno) -> ContainerError {
    move |source| ContainerError::Sys { action, source }
}

fn open_fd(path: &Path, flags: OFlag) -> Result<OwnedFd> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((flags | OFlag::O_CLOEXEC).bits())
        .open(path)
        .map(OwnedFd::from)
        .map_err(io("open", path))
}

use std::os::unix::fs::OpenOptionsExt;

fn require_root() -> Result<()> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(ContainerError::NotRoot)
    }
}

fn ns_flag(ns: &str) -> CloneFlags {
    match ns {
        "uts" => CloneFlags::CLONE_NEWUTS,
        "ipc" => CloneFlags::CLONE_NEWIPC,
        _ => CloneFlags::CLONE_NEWNS,
    }
}

/// Destroys every container of `job` on this node (see [`teardown`]).
pub fn destroy(config: &Config, job: &str) -> Result<teardown::Destroyed> {
    require_root()?;
    let job = RuntimeDir::of(config).job(job)?;
    Ok(teardown::destroy_job(&job)?)
}
