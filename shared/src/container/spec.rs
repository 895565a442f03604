//! What `create` and `run` are asked for: the [`Spec`] that carries the image, the
//! job's user, their mounts and options. Never opens, mounts or checks a path (create
//! does, with the user's rights).

use crate::identity::Credentials;
use crate::image::{Image, UserMount};
use std::path::PathBuf;

/// What `create` is asked for.
#[derive(Debug, Clone)]
pub struct Spec {
    pub job: String,
    /// [`PER_NODE`](super::PER_NODE) or [`per_rank`](super::per_rank)`(N)`, or any name the caller picks.
    pub name: String,
    pub image: Image,
    pub user: Credentials,
    /// Bind the user's home (from the password database) at the same path.
    pub home: bool,
    /// Bound at the same path; the working directory unless `workdir` is set.
    pub submit_dir: Option<PathBuf>,
    pub mounts: Vec<UserMount>,
    /// Device nodes the job may use, bound at the same path.
    pub devices: Vec<PathBuf>,
    /// Overrides the image's WorkingDir.
    pub workdir: Option<String>,
    /// Added to the image's Env (later entries win).
    pub env: Vec<String>,
    pub read_only: bool,
    /// A new UTS namespace with this host name.
    pub hostname: Option<String>,
    /// A new IPC namespace.
    pub ipc: bool,
    /// Who tracks the job's processes by cgroup where cgroup v2 carries controllers.
    pub tracking: crate::teardown::cgroup::Tracking,
}
