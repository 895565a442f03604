//! A job's container on one node: create it (a mount namespace, plus UTS/IPC when
//! asked, with its root pivoted into the image's overlay), pin it in the job's runtime
//! dir, let tasks enter it, and run commands in it as the job user.
//!
//! Owns the runtime dir layout of one container, `<runtime_dir>/<job>/<name>/`:
//! `mnt` (and `uts`, `ipc`): the pinned namespaces (bind mounts of nsfs files);
//! `env`: the container's environment (see [`env`] for format and merge rules);
//! `workdir`: the task's working directory inside the container (bytes, no newline);
//! `state.json`: what create was asked for; `upper/`, `work/`: the overlay's writable
//! part; `root/`: the overlay's mount point (mounted only inside the container).
//!
//! Must never write into an image's layer dirs, never leave a mount in the host's
//! namespace other than the pins, and never run anything as root inside a container.

pub mod env;
pub mod inroot;
pub mod mounts;
pub mod remap;
pub mod sys;
pub mod user;

use crate::config::Config;
use crate::rootfs::{Overlay, RootfsError};
use crate::teardown::{self, TeardownError};
use crate::store::lock;
use mounts::{Bind, Layout, MountError};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
pub use user::{Credentials, UserError};

/// The container name of per-node mode (all tasks of the job on the node share it).
pub const PER_NODE: &str = "node";

/// The per-rank container name of task `rank`.
pub fn per_rank(rank: u32) -> String {
    format!("rank-{rank}")
}

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("bad {what} '{value}': use letters, digits, '.', '_' or '-' (not starting with '.')")]
    BadName { what: &'static str, value: String },
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
    #[error("bad image config {path}: {why}")]
    ImageConfig { path: PathBuf, why: String },
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
}

type Result<T, E = ContainerError> = std::result::Result<T, E>;

pub use crate::store::ImageConfig;

impl ImageConfig {
    /// Reads an OCI image config (`{"config": {"Env": [...], ...}}`) as registries
    /// serve it and `umoci`/`skopeo` store it.
    pub fn from_oci_json(path: &Path) -> Result<ImageConfig> {
        let bad = |why: String| ContainerError::ImageConfig { path: path.to_path_buf(), why };
        let text = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let value: serde_json::Value = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        let config = value.get("config").cloned().unwrap_or(serde_json::Value::Null);
        let list = |key: &str| -> Vec<String> {
            config
                .get(key)
                .and_then(|v| v.as_array())
                .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
                .unwrap_or_default()
        };
        let text_of = |key: &str| config.get(key).and_then(|v| v.as_str()).filter(|s| !s.is_empty()).map(String::from);
        Ok(ImageConfig {
            env: list("Env"),
            entrypoint: list("Entrypoint"),
            cmd: list("Cmd"),
            working_dir: text_of("WorkingDir"),
            user: text_of("User"),
        })
    }
}

/// An image ready to become a container's root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// What the user asked for, for messages and `list`.
    pub reference: String,
    /// Unpacked layers in overlayfs form, lowest first.
    pub layer_dirs: Vec<PathBuf>,
    pub config: ImageConfig,
    /// The layers carry `user.overlay.*` xattrs (a store written without root).
    #[serde(default)]
    pub userxattr: bool,
}

impl From<crate::store::StoredImage> for Image {
    fn from(image: crate::store::StoredImage) -> Image {
        Image { reference: image.reference, layer_dirs: image.layer_dirs, config: image.config, userxattr: image.userxattr }
    }
}

/// A bind mount the job's user asked for; its source is checked with the user's rights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserMount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

impl UserMount {
    /// Parses `SRC[:DST][:ro|rw]` (DST defaults to SRC).
    pub fn parse(spec: &str) -> Option<UserMount> {
        let parts: Vec<&str> = spec.split(':').collect();
        let (paths, read_only) = match parts.last() {
            Some(&"ro") => (&parts[..parts.len() - 1], true),
            Some(&"rw") => (&parts[..parts.len() - 1], false),
            _ => (&parts[..], false),
        };
        let (source, target) = match paths {
            [s] => (*s, *s),
            [s, t] => (*s, *t),
            _ => return None,
        };
        (source.starts_with('/') && target.starts_with('/')).then(|| UserMount {
            source: source.into(),
            target: target.into(),
            read_only,
        })
    }
}

/// What `create` is asked for.
#[derive(Debug, Clone)]
pub struct Spec {
    pub job: String,
    /// [`PER_NODE`] or [`per_rank`]`(N)`, or any name the caller picks.
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
}

/// What `state.json` records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub job: String,
    pub name: String,
    pub image: Image,
    pub user: Credentials,
    pub workdir: String,
    pub namespaces: Vec<String>,
    /// Inode of the container's mount namespace, checked by `join` so that a pin
    /// never leads anywhere else.
    #[serde(default)]
    pub mnt_inode: u64,
}

impl State {
    fn of(spec: &Spec, workdir: String, namespaces: Vec<String>, mnt_inode: u64) -> State {
        State {
            job: spec.job.clone(),
            name: spec.name.clone(),
            image: spec.image.clone(),
            user: spec.user.clone(),
            workdir,
            namespaces,
            mnt_inode,
        }
    }
}

/// A created (or reused) container, as `create` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Created {
    pub job: String,
    pub name: String,
    pub dir: PathBuf,
    pub mnt: PathBuf,
    pub env: PathBuf,
    pub workdir: String,
    pub reused: bool,
    pub pins: Vec<PathBuf>,
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
        Err(ContainerError::BadName { what, value: value.to_string() })
    }
}

/// `<runtime_dir>/<job>/<name>`.
pub fn container_dir(config: &Config, job: &str, name: &str) -> Result<PathBuf> {
    check_name("job id", job)?;
    check_name("container name", name)?;
    Ok(config.runtime_dir.join(job).join(name))
}

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

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    // A leftover of a crashed create; the job's lock is held, so it is nobody's work.
    let _ = std::fs::remove_file(&tmp);
    crate::fsmode::replace(&tmp, path, bytes, 0o644).map_err(io("write", path))
}

use std::os::unix::fs::OpenOptionsExt;

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

/// Makes the runtime dir a private mount unless it is one. The node-wide lock this
/// takes is only for the node's first creates: a create its job stops (`scancel -s
/// STOP`) can hold up no other user's once the runtime dir is private, and a waiter
/// re-checks between short waits, so a holder stopped after its mount holds up nobody.
fn make_runtime_dir_private(config: &Config) -> Result<()> {
    let path = config.runtime_dir.join(".lock");
    let start = std::time::Instant::now();
    while !is_private_mount(&config.runtime_dir)? {
        let what = "the runtime dir's mount, held by another create";
        match lock::acquire(&path, true, std::time::Duration::from_millis(250), what) {
            Ok(_runtime_lock) => return make_private(&config.runtime_dir),
            Err(lock::LockError::TimedOut { .. }) if start.elapsed() < lock::JOB_WAIT => {}
            Err(lock::LockError::TimedOut { path, what, .. }) => {
                return Err(teardown::TeardownError::from(lock::LockError::TimedOut { path, what, waited: start.elapsed() }).into())
            }
            Err(e) => return Err(teardown::TeardownError::from(e).into()),
        }
    }
    Ok(())
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

fn require_root() -> Result<()> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(ContainerError::NotRoot)
    }
}

/// Creates the container `spec.name` of `spec.job` on this node, or reuses it when it
/// exists (per-node sharing across tasks and steps). Concurrent creates of one job
/// are serialised by the job's lock.
pub fn create(config: &Config, spec: &Spec) -> Result<Created> {
    require_root()?;
    let dir = container_dir(config, &spec.job, &spec.name)?;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    crate::fsmode::ensure_dir(&config.runtime_dir, 0o755).map_err(io("create", &config.runtime_dir))?;
    make_runtime_dir_private(config)?;
    let job_dir = config.runtime_dir.join(&spec.job);
    let _lock = teardown::lock_job(&job_dir, true)?;
    if let Some(state) = live_state(&dir) {
        let mismatch = |what| ContainerError::Mismatch { job: spec.job.clone(), name: spec.name.clone(), what };
        if state.user != spec.user {
            return Err(mismatch("another user"));
        }
        if state.image.layer_dirs != spec.image.layer_dirs {
            return Err(mismatch("another image"));
        }
        return Ok(created(&dir, &state, true));
    }
    // Leftovers of a create that crashed: start clean.
    teardown::destroy_container(&dir)?;
    match build(config, spec, &dir) {
        Ok(state) => Ok(created(&dir, &state, false)),
        Err(err) => {
            // Best effort: the error that made create fail is the one to report.
            let _ = teardown::destroy_container(&dir);
            Err(err)
        }
    }
}

/// The state of a finished container at `dir`: pinned, with a readable `state.json`
/// naming the namespace the pin opens. Anything less (under the job lock) is what a
/// crashed create or a dead anchor left: a pin without state, or a symlink pin to a
/// reused pid's namespace.
fn live_state(dir: &Path) -> Option<State> {
    let mnt = dir.join("mnt");
    if !teardown::is_pinned(&mnt) {
        return None;
    }
    let state = read_state(dir).ok()?;
    let inode = std::fs::metadata(&mnt).ok()?.ino();
    (state.mnt_inode == 0 || state.mnt_inode == inode).then_some(state)
}

fn created(dir: &Path, state: &State, reused: bool) -> Created {
    Created {
        job: state.job.clone(),
        name: state.name.clone(),
        dir: dir.to_path_buf(),
        mnt: dir.join("mnt"),
        env: dir.join("env"),
        workdir: state.workdir.clone(),
        reused,
        pins: state.namespaces.iter().map(|n| dir.join(n)).collect(),
    }
}

/// Opens the sources of every bind mount: the user's own with the user's rights.
fn open_sources(config: &Config, spec: &Spec) -> Result<Layout> {
    let mut checked: Vec<(PathBuf, PathBuf, bool)> = Vec::new();
    if spec.home {
        if let Some(home) = spec.user.home() {
            checked.push((home.clone(), home, false));
        }
    }
    if let Some(submit) = &spec.submit_dir {
        checked.push((submit.clone(), submit.clone(), false));
    }
    for m in &spec.mounts {
        mounts::check_user_target(&m.target, m.read_only).map_err(|why| MountError::BadTarget {
            source_path: m.source.clone(),
            target: m.target.clone(),
            why,
        })?;
        checked.push((m.source.clone(), m.target.clone(), m.read_only));
    }
    let sources: Vec<PathBuf> = checked.iter().map(|(s, _, _)| s.clone()).collect();
    let fds = spec.user.open_as_user(&sources, config.user_child_timeout())?;
    let mut layout = Layout { read_only_root: spec.read_only, ..Layout::default() };
    for site in &config.site_mounts {
        layout.binds.push(Bind {
            source: open_fd(&site.source, OFlag::O_PATH)?,
            source_path: site.source.clone(),
            target: site.target.clone(),
            read_only: site.read_only,
            as_user: false,
        });
    }
    for ((source_path, target, read_only), source) in checked.into_iter().zip(fds) {
        layout.binds.push(Bind { source, source_path, target, read_only, as_user: true });
    }
    for device in &spec.devices {
        let target = device.clone();
        // Opened as root with no access check: it must really be a device node under
        // /dev, never e.g. /dev/../root/secret, which would bypass the host's directory modes.
        let bad = |why| MountError::BadTarget { source_path: device.clone(), target: device.clone(), why };
        if !target.starts_with("/dev/") || target.components().any(|c| c == std::path::Component::ParentDir) {
            return Err(bad("devices must be under /dev, without '..'").into());
        }
        let source = open_fd(device, OFlag::O_PATH | OFlag::O_NOFOLLOW)?;
        let kind = nix::sys::stat::fstat(source.as_raw_fd()).map_err(sys_err("inspect a device"))?.st_mode & libc::S_IFMT;
        if kind != libc::S_IFCHR && kind != libc::S_IFBLK {
            return Err(bad("it is not a device node").into());
        }
        layout.devices.push(Bind { source, source_path: device.clone(), target, read_only: false, as_user: false });
    }
    Ok(layout)
}

/// The container's environment (image Env, then the spec's) and working directory:
/// the spec's, else the submit dir (bound in, so it exists: `srun ./app` works from
/// where the user submitted), else the image's WorkingDir, else `/`.
fn env_and_workdir(spec: &Spec) -> Result<(Vec<env::Var>, String)> {
    let bad = |e: std::ffi::OsString| ContainerError::BadEnv { entry: e.to_string_lossy().into() };
    let image_env = env::parse_list(&spec.image.config.env).map_err(bad)?;
    let extra_env = env::parse_list(&spec.env).map_err(bad)?;
    let workdir = spec
        .workdir
        .clone()
        .or_else(|| spec.submit_dir.as_ref().map(|d| d.to_string_lossy().into_owned()))
        .or_else(|| spec.image.config.working_dir.clone())
        .unwrap_or_else(|| "/".to_string());
    Ok((env::merge(&[], &image_env, &extra_env), workdir))
}

fn build(config: &Config, spec: &Spec, dir: &Path) -> Result<State> {
    let (container_env, workdir) = env_and_workdir(spec)?;

    let layout = open_sources(config, spec)?;
    crate::fsmode::ensure_dir(dir, 0o700).map_err(io("create", dir))?;
    // Before any process of the container exists: teardown finds them all through it.
    teardown::cgroup::create(dir, &config.runtime_dir).map_err(|e| match e {
        teardown::cgroup::CgroupError::Io { action, path, source } => io(action, &path)(source),
        e => teardown::TeardownError::from(e).into(),
    })?;
    let mut overlay = Overlay::in_dir(spec.image.layer_dirs.clone(), dir);
    overlay.userxattr = spec.image.userxattr;
    overlay.check_layers()?;
    overlay.prepare()?;
    let root = dir.join("root");
    crate::fsmode::ensure_dir(&root, 0o755).map_err(io("create", &root))?;

    let mut flags = CloneFlags::CLONE_NEWNS;
    let mut namespaces = vec!["mnt".to_string()];
    if spec.hostname.is_some() {
        flags |= CloneFlags::CLONE_NEWUTS;
        namespaces.push("uts".into());
    }
    if spec.ipc {
        flags |= CloneFlags::CLONE_NEWIPC;
        namespaces.push("ipc".into());
    }
    for ns in &namespaces {
        crate::fsmode::create_file(&dir.join(ns), 0o644).map_err(io("create", &dir.join(ns)))?;
    }
    // Our own namespaces, to come back to.
    let home: Vec<(OwnedFd, CloneFlags)> = namespaces
        .iter()
        .map(|ns| Ok((open_fd(&Path::new("/proc/self/ns").join(ns), OFlag::O_RDONLY)?, ns_flag(ns))))
        .collect::<Result<_>>()?;

    nix::sched::unshare(flags).map_err(sys_err("create the container's namespaces"))?;
    let inside = assemble(&overlay, &root, layout, &spec.user, spec.hostname.as_deref()).and_then(|()| {
        // Refused here once for all later entries, the Slurm plugin's own chdir included.
        match enter_workdir(&workdir) {
            Err(e @ ContainerError::WorkdirEscapes { .. }) => return Err(e),
            _ => nix::unistd::chdir("/").map_err(sys_err("enter the container's root"))?,
        }
        namespaces.iter().map(|ns| open_fd(&Path::new("/proc/thread-self/ns").join(ns), OFlag::O_RDONLY)).collect::<Result<Vec<_>>>()
    });
    // Back to the host's namespaces whatever happened; if that fails this process
    // is stranded in the container and must not go on.
    for (fd, flag) in &home {
        if let Err(e) = nix::sched::setns(fd.as_fd(), *flag) {
            eprintln!("berth: cannot return to the host's namespaces: {e}");
            std::process::exit(70);
        }
    }
    let pinned = inside?;
    let mnt_inode = nix::sys::stat::fstat(pinned[0].as_raw_fd()).map_err(sys_err("inspect the container's namespace"))?.st_ino;
    let anchor = pin(dir, &namespaces, &pinned)?;

    let state = State::of(spec, workdir, namespaces, mnt_inode);
    write_atomic(&dir.join("env"), &env::encode(&container_env))?;
    write_atomic(&dir.join("workdir"), state.workdir.as_bytes())?;
    let json = serde_json::to_vec_pretty(&state).map_err(|e| ContainerError::Io {
        action: "encode",
        path: dir.join("state.json"),
        source: e.into(),
    })?;
    write_atomic(&dir.join("state.json"), &json)?;
    if let Some(commit) = anchor {
        nix::unistd::write(&commit, b"1").map_err(sys_err("keep the container's anchor"))?;
    }
    Ok(state)
}

/// Pins the new namespaces at `<dir>/<ns>`: a bind mount of each nsfs file. Some
/// kernels refuse that bind now and then with EINVAL (seen on 6.18 inside the test
/// cluster's node namespaces, never in the initial one); then a small anchor process
/// joins the namespaces and idles, and each pin becomes a symlink to its
/// `/proc/<pid>/ns/<ns>`. Either way, opening the pin opens the namespace; destroy
/// kills the anchor with everything else inside. Returns the anchor's commit pipe,
/// to be written once the container's state is on disk (see `sys::become_anchor`).
fn pin(dir: &Path, namespaces: &[String], fds: &[OwnedFd]) -> Result<Option<OwnedFd>> {
    let mut bound = Vec::new();
    for (ns, fd) in namespaces.iter().zip(fds) {
        let target = dir.join(ns);
        let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
        match nix::mount::mount(Some(source.as_str()), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>) {
            Ok(()) => bound.push(target),
            Err(Errno::EINVAL) => {
                for done in &bound {
                    let _ = nix::mount::umount2(done, MntFlags::MNT_DETACH);
                }
                return pin_with_anchor(dir, namespaces, fds).map(Some);
            }
            Err(e) => return Err(sys_err("pin the container's namespace")(e)),
        }
    }
    Ok(None)
}

fn pin_with_anchor(dir: &Path, namespaces: &[String], fds: &[OwnedFd]) -> Result<OwnedFd> {
    let (commit_read, commit_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(sys_err("start the container's anchor"))?;
    let anchor = match fork_in_cgroup(dir, "start the container's anchor")? {
        sys::Forked::Child => {
            for (ns, fd) in namespaces.iter().zip(fds) {
                if nix::sched::setns(fd.as_fd(), ns_flag(ns)).is_err() {
                    sys::exit_now(1);
                }
            }
            sys::become_anchor(&commit_read)
        }
        sys::Forked::Parent(pid) => pid,
    };
    drop(commit_read);
    for ns in namespaces {
        let target = dir.join(ns);
        std::fs::remove_file(&target).map_err(io("replace", &target))?;
        std::os::unix::fs::symlink(format!("/proc/{anchor}/ns/{ns}"), &target).map_err(io("create", &target))?;
    }
    // The anchor has joined once its namespace shows up behind the pin.
    let mnt = dir.join("mnt");
    let want = nix::sys::stat::fstat(fds[0].as_raw_fd()).map_err(sys_err("inspect the container's namespace"))?.st_ino;
    for _ in 0..1000 {
        if std::fs::metadata(&mnt).map(|m| m.ino()).ok() == Some(want) {
            return Ok(commit_write);
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Err(ContainerError::Sys { action: "start the container's anchor", source: Errno::ETIMEDOUT })
}

/// Forks a child that starts in the cgroup of the container at `dir` (when it has one),
/// so that it and all it forks are found at teardown; `action` names the fork in errors.
pub fn fork_in_cgroup(dir: &Path, action: &'static str) -> Result<sys::Forked> {
    match teardown::cgroup::open(dir).map_err(TeardownError::from)? {
        Some(cgroup) => sys::fork_into_cgroup(cgroup.dir.as_fd(), cgroup.procs.as_fd()).map_err(sys_err(action)),
        None => sys::fork().map_err(sys_err(action)),
    }
}

fn ns_flag(ns: &str) -> CloneFlags {
    match ns {
        "uts" => CloneFlags::CLONE_NEWUTS,
        "ipc" => CloneFlags::CLONE_NEWIPC,
        _ => CloneFlags::CLONE_NEWNS,
    }
}

/// Runs inside a new mount namespace: mounts the root and its tree and pivots into it.
fn assemble(overlay: &Overlay, root: &Path, mut layout: Layout, user: &Credentials, hostname: Option<&str>) -> Result<()> {
    make_rprivate()?;
    reopen_sources(&mut layout, user)?;
    overlay.mount(root)?;
    finish_root(root, layout, hostname)
}

/// Opens the bind sources again in the new namespace: the user's with the user's
/// file-system identity, the admin's (site mounts, devices) as root.
fn reopen_sources(layout: &mut Layout, user: &Credentials) -> Result<()> {
    user.with_fs_identity(|| mounts::reopen_sources(layout, true))??;
    Ok(mounts::reopen_sources(layout, false)?)
}

/// Mounts the tree into the overlay mounted at `root` and pivots into it.
fn finish_root(root: &Path, layout: Layout, hostname: Option<&str>) -> Result<()> {
    let root_fd = open_fd(root, OFlag::O_PATH | OFlag::O_DIRECTORY)?;
    mounts::populate(root_fd.as_fd(), layout)?;
    if let Some(name) = hostname {
        nix::unistd::sethostname(name).map_err(sys_err("set the container's host name"))?;
    }
    nix::unistd::fchdir(root_fd.as_raw_fd()).map_err(sys_err("enter the container's root"))?;
    nix::unistd::pivot_root(".", ".").map_err(sys_err("pivot_root into the container"))?;
    nix::mount::umount2(".", MntFlags::MNT_DETACH).map_err(sys_err("detach the host's root"))?;
    nix::unistd::chdir("/").map_err(sys_err("enter the container's root"))
}

/// Nothing mounted from here on may propagate back to the host.
fn make_rprivate() -> Result<()> {
    nix::mount::mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .map_err(sys_err("make the container's mounts private"))
}

/// Reads a container's `state.json`.
pub fn read_state(dir: &Path) -> Result<State> {
    let path = dir.join("state.json");
    let bytes = std::fs::read(&path).map_err(io("read", &path))?;
    serde_json::from_slice(&bytes).map_err(|e| ContainerError::Io { action: "parse", path, source: e.into() })
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
    let dir = container_dir(config, job, name)?;
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
    let path = container_dir(config, job, name)?;
    let untrusted = |why: String| ContainerError::Untrusted { path: path.clone(), why };
    crate::privileged::check_root_owned_dir(&config.runtime_dir).map_err(|e| untrusted(e.to_string()))?;
    let dir = match open_fd(&path, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW) {
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
    // The magic link names this directory instance whatever happens to the path.
    let held = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    let joined = join_dir(&held, job, name, Some(uid));
    drop(dir);
    joined
}

fn join_dir(dir: &Path, job: &str, name: &str, owner: Option<u32>) -> Result<Joined> {
    if !teardown::is_pinned(&dir.join("mnt")) {
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
    let env_path = dir.join("env");
    let env = env::decode(&std::fs::read(&env_path).map_err(io("read", &env_path))?);
    // Opened before the pins: a destroy that runs between here and the join removes the
    // cgroup first, and joining it below then fails, instead of entering the dead
    // container's namespaces (held open by the descriptors) outside any cgroup.
    let cgroup = teardown::cgroup::open(dir).map_err(TeardownError::from)?;
    let fds: Vec<(OwnedFd, CloneFlags)> = state
        .namespaces
        .iter()
        .map(|ns| Ok((open_fd(&dir.join(ns), OFlag::O_RDONLY)?, ns_flag(ns))))
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
enum Privileges {
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

fn exec_as(joined: &Joined, argv: &[String], job_env: &[env::Var], overrides: &[String], drop: Privileges) -> ContainerError {
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

/// The command `berth run` executes: Entrypoint + (the given command, else Cmd).
pub fn command_line(config: &ImageConfig, entrypoint: Option<&[String]>, args: &[String]) -> Result<Vec<String>> {
    let mut argv: Vec<String> = entrypoint.map(<[String]>::to_vec).unwrap_or_else(|| config.entrypoint.clone());
    if args.is_empty() {
        if entrypoint.is_none() {
            argv.extend(config.cmd.iter().cloned());
        }
    } else {
        argv.extend(args.iter().cloned());
    }
    if argv.is_empty() {
        return Err(ContainerError::NoCommand);
    }
    Ok(argv)
}

/// Where `berth run` mounts its scratch tmpfs inside its own namespace. Anything the
/// container needs from the host is opened before, so hiding the host's /tmp is safe.
const RUN_SCRATCH: &str = "/tmp";

/// `berth run`: builds a throwaway container in a new mount namespace of this very
/// process and execs `argv` in it as `spec.user`, as `ch-run` does: no pins, no
/// runtime dir entry, no process left to wait. The upper and work dirs sit on a tmpfs
/// mounted only inside the container, so the writable layer vanishes with the
/// namespace when the last process in it exits.
///
/// As root, `spec.user` may be anyone. As a plain user (rootless), `spec.user` must be
/// the caller: the process enters a new user namespace mapping only its own uid and
/// gid, so supplementary groups show as the overflow group and cannot be changed.
/// Returns only on failure.
pub fn run(config: &Config, spec: &Spec, argv: &[String], overrides: &[String], want_root: bool) -> ContainerError {
    let attempt = || -> Result<std::convert::Infallible> {
        let rootless = !nix::unistd::geteuid().is_root();
        if rootless && !spec.user.is_caller() {
            return Err(ContainerError::NotRoot);
        }
        let (container_env, workdir) = env_and_workdir(spec)?;
        let mut layout = open_sources(config, spec)?;
        layout.in_user_namespace = rootless;
        // unshare(CLONE_NEWUSER) needs a single-threaded process; a pull may have left
        // threads behind: go on in a child and pass its exit status on.
        if rootless && sys::thread_count() > 1 {
            if let sys::Forked::Parent(pid) = sys::fork().map_err(sys_err("fork"))? {
                sys::exit_now(wait_status(pid)?);
            }
        }
        let mut flags = CloneFlags::CLONE_NEWNS;
        if rootless {
            flags |= CloneFlags::CLONE_NEWUSER;
        }
        nix::sched::unshare(flags).map_err(sys_err("create the container's namespaces"))?;
        if rootless {
            map_self(&spec.user)?;
        }
        make_rprivate()?;
        reopen_sources(&mut layout, &spec.user)?;
        let mut overlay = Overlay::in_dir(spec.image.layer_dirs.clone(), Path::new(RUN_SCRATCH));
        overlay.userxattr = spec.image.userxattr || rootless;
        let layers = overlay.open_layers()?;
        nix::mount::mount(Some("berth-run"), RUN_SCRATCH, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0700"))
            .map_err(sys_err("mount the container's scratch tmpfs"))?;
        overlay.prepare()?;
        let root = Path::new(RUN_SCRATCH).join("root");
        std::fs::create_dir(&root).map_err(io("create", &root))?;
        overlay.mount_from(&layers, &root)?;
        drop(layers);
        finish_root(&root, layout, spec.hostname.as_deref())?;
        let state = State::of(spec, workdir, vec!["mnt".into()], 0);
        let mut joined = Joined { state, env: container_env, inside: None };
        joined.choose_inside(config, want_root)?;
        let job_env: Vec<env::Var> = std::env::vars_os().collect();
        Err(if rootless { exec_as(&joined, argv, &job_env, overrides, Privileges::InUserNamespace) } else { exec_joined(&joined, argv, &job_env, overrides) })
    };
    match attempt() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// Maps the caller's uid and gid to themselves in the user namespace just entered.
fn map_self(user: &Credentials) -> Result<()> {
    for (file, text) in [
        ("/proc/self/setgroups", "deny".to_string()),
        ("/proc/self/uid_map", format!("{0} {0} 1", user.uid)),
        ("/proc/self/gid_map", format!("{0} {0} 1", user.gid)),
    ] {
        std::fs::write(file, text).map_err(io("write", Path::new(file)))?;
    }
    Ok(())
}

fn wait_status(pid: nix::unistd::Pid) -> Result<i32> {
    use nix::sys::wait::WaitStatus;
    loop {
        match nix::sys::wait::waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(sys_err("wait for the container")(e)),
        }
    }
}

/// A container as `list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    pub job: String,
    pub name: String,
    pub image: String,
    pub uid: u32,
    pub processes: usize,
}

/// The containers of every job (or of `job`) on this node.
pub fn list(config: &Config, job: Option<&str>) -> Result<Vec<Listed>> {
    let mut out = Vec::new();
    let jobs: Vec<PathBuf> = match job {
        Some(j) => {
            check_name("job id", j)?;
            vec![config.runtime_dir.join(j)]
        }
        None => match std::fs::read_dir(&config.runtime_dir) {
            Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io("read", &config.runtime_dir)(e)),
        },
    };
    for job_dir in jobs {
        let Ok(entries) = std::fs::read_dir(&job_dir) else { continue };
        for entry in entries.filter_map(|e| e.ok()) {
            let dir = entry.path();
            let mnt = dir.join("mnt");
            if !teardown::is_pinned(&mnt) {
                continue;
            }
            let Ok(state) = read_state(&dir) else { continue };
            let processes = std::fs::metadata(&mnt)
                .map(|m| {
                    use std::os::unix::fs::MetadataExt;
                    teardown::members((m.dev(), m.ino())).len()
                })
                .unwrap_or(0);
            out.push(Listed { job: state.job, name: state.name, image: state.image.reference, uid: state.user.uid, processes });
        }
    }
    out.sort_by(|a, b| (&a.job, &a.name).cmp(&(&b.job, &b.name)));
    Ok(out)
}

/// The image layer dirs of every live container under `runtime_dir`: what the store's
/// gc must keep. A container is live while its `mnt` pin opens the namespace its
/// `state.json` names; a pin whose anchor died (a crash) names nothing, so a dead
/// container never keeps layers. What this caller cannot read is skipped (job dirs are
/// root's, 0700: a non-root gc only ever collects a store of its own).
pub fn layers_in_use(runtime_dir: &Path) -> Result<Vec<PathBuf>> {
    let jobs = match std::fs::read_dir(runtime_dir) {
        Ok(entries) => entries,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied) => return Ok(Vec::new()),
        Err(e) => return Err(io("read", runtime_dir)(e)),
    };
    let mut layers = Vec::new();
    for job_dir in jobs.filter_map(|e| e.ok().map(|e| e.path())) {
        let Ok(containers) = std::fs::read_dir(&job_dir) else { continue };
        for dir in containers.filter_map(|e| e.ok().map(|e| e.path())) {
            let Ok(state) = read_state(&dir) else { continue };
            let live = std::fs::metadata(dir.join("mnt")).is_ok_and(|m| m.ino() == state.mnt_inode) && teardown::is_pinned(&dir.join("mnt"));
            if live {
                layers.extend(state.image.layer_dirs);
            }
        }
    }
    Ok(layers)
}

/// Destroys every container of `job` on this node (see [`teardown`]).
pub fn destroy(config: &Config, job: &str) -> Result<teardown::Destroyed> {
    require_root()?;
    check_name("job id", job)?;
    Ok(teardown::destroy_job(&config.runtime_dir, job)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain() {
        assert!(check_name("job id", "12345").is_ok());
        assert!(check_name("container name", "rank-3").is_ok());
        for bad in ["", "..", ".hidden", "a/b", "a b", "x\n"] {
            assert!(check_name("job id", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn user_mounts_parse_with_optional_target_and_mode() {
        let m = UserMount::parse("/data:/in:ro").unwrap();
        assert_eq!((m.source.as_path(), m.target.as_path(), m.read_only), (Path::new("/data"), Path::new("/in"), true));
        let m = UserMount::parse("/data").unwrap();
        assert_eq!(m.target, Path::new("/data"));
        assert!(!m.read_only);
        assert!(UserMount::parse("data:/in").is_none());
        assert!(UserMount::parse("/a:/b:/c").is_none());
    }

    #[test]
    fn run_uses_entrypoint_then_args_or_cmd() {
        let config = ImageConfig {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["default".into()],
            ..ImageConfig::default()
        };
        assert_eq!(command_line(&config, None, &[]).unwrap(), ["/entry", "default"]);
        assert_eq!(command_line(&config, None, &["x".into()]).unwrap(), ["/entry", "x"]);
        assert_eq!(command_line(&config, Some(&["/sh".into()]), &[]).unwrap(), ["/sh"]);
        assert!(matches!(command_line(&ImageConfig::default(), None, &[]), Err(ContainerError::NoCommand)));
    }

    #[test]
    fn oci_image_config_fields_are_read() {
        let path = std::env::temp_dir().join(format!("berth-config-{}.json", std::process::id()));
        std::fs::write(&path, r#"{"architecture":"amd64","config":{"Env":["PATH=/bin"],"Cmd":["sh"],"WorkingDir":"/w","User":"1000"}}"#).unwrap();
        let config = ImageConfig::from_oci_json(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(config.env, ["PATH=/bin"]);
        assert_eq!(config.cmd, ["sh"]);
        assert_eq!(config.working_dir.as_deref(), Some("/w"));
        assert_eq!(config.user.as_deref(), Some("1000"));
        assert!(config.entrypoint.is_empty());
    }
}
