//! Create: builds a container (its cgroup, its overlay, new namespaces with the root
//! pivoted into the image), pins its namespaces in the runtime dir, with an anchor
//! process where the kernel refuses the bind, and records `env`, `workdir` and
//! `state.json`; has the runtime dir prepared first (root's, 0755, a private mount:
//! [`RuntimeDir::prepare`], the same step slurmd takes as it starts). Owns writing a
//! container's files (at the paths [`ContainerDir`] names) and reading `state.json`
//! back; never enters a finished container (join does) and never removes one
//! (teardown does).

use crate::sys;
use super::mounts::{self, Bind, Layout, MountError};
use super::{env, enter_workdir, fork_in_cgroup, io, ns_flag, open_fd, require_root, sys_err, ContainerError, Result, Spec};
use crate::image::Image;
use crate::identity::Credentials;
use crate::config::Config;
use crate::rootfs::Overlay;
use crate::runtime::{ContainerDir, RuntimeDir};
use crate::lock;
use crate::teardown;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use serde::{Deserialize, Serialize};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

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
    pub(super) fn of(spec: &Spec, workdir: String, namespaces: Vec<String>, mnt_inode: u64) -> State {
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

/// The job's lock is held: a leftover temp file is a crashed create's, nobody's work.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::fsmode::replace_whole(path, bytes, 0o644).map_err(io("write", path))
}

/// Creates the container `spec.name` of `spec.job` on this node, or reuses it when it
/// exists (per-node sharing across tasks and steps). Concurrent creates of one job
/// are serialised by the job's lock.
pub fn create(config: &Config, spec: &Spec) -> Result<Created> {
    require_root()?;
    let runtime = RuntimeDir::of(config);
    let job = runtime.job(&spec.job)?;
    let dir = job.container(&spec.name)?;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    runtime.prepare(lock::JOB_WAIT)?;
    let _lock = job.lock(true)?;
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
    match build(&runtime, config, spec, &dir) {
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
fn live_state(dir: &ContainerDir) -> Option<State> {
    let mnt = dir.mnt();
    if !dir.is_pinned() {
        return None;
    }
    let state = read_state(dir).ok()?;
    let inode = std::fs::metadata(&mnt).ok()?.ino();
    (state.mnt_inode == 0 || state.mnt_inode == inode).then_some(state)
}

fn created(dir: &ContainerDir, state: &State, reused: bool) -> Created {
    Created {
        job: state.job.clone(),
        name: state.name.clone(),
        dir: dir.path().to_path_buf(),
        mnt: dir.mnt(),
        env: dir.env(),
        workdir: state.workdir.clone(),
        reused,
        pins: state.namespaces.iter().map(|n| dir.pin(n)).collect(),
    }
}

/// Opens the sources of every bind mount: the user's own with the user's rights.
pub(super) fn open_sources(config: &Config, spec: &Spec) -> Result<Layout> {
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
pub(super) fn env_and_workdir(spec: &Spec) -> Result<(Vec<env::Var>, String)> {
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

fn build(runtime: &RuntimeDir, config: &Config, spec: &Spec, dir: &ContainerDir) -> Result<State> {
    let (container_env, workdir) = env_and_workdir(spec)?;

    let layout = open_sources(config, spec)?;
    dir.make().map_err(io("create", dir.path()))?;
    // Before any process of the container exists: teardown finds them all through it.
    teardown::cgroup::create(dir, runtime, spec.tracking).map_err(|e| match e {
        teardown::cgroup::CgroupError::Io { action, path, source } => io(action, &path)(source),
        e => teardown::TeardownError::from(e).into(),
    })?;
    let overlay = Overlay { layers: spec.image.layer_dirs.clone(), upper: dir.upper(), work: dir.work(), userxattr: spec.image.userxattr };
    overlay.check_layers()?;
    overlay.prepare()?;
    let root = dir.root();
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
        crate::fsmode::create_file(&dir.pin(ns), 0o644).map_err(io("create", &dir.pin(ns)))?;
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
    write_atomic(&dir.env(), &env::encode(&container_env))?;
    write_atomic(&dir.workdir(), state.workdir.as_bytes())?;
    let json = serde_json::to_vec_pretty(&state).map_err(|e| ContainerError::Io {
        action: "encode",
        path: dir.state(),
        source: e.into(),
    })?;
    write_atomic(&dir.state(), &json)?;
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
fn pin(dir: &ContainerDir, namespaces: &[String], fds: &[OwnedFd]) -> Result<Option<OwnedFd>> {
    let mut bound = Vec::new();
    for (ns, fd) in namespaces.iter().zip(fds) {
        let target = dir.pin(ns);
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

fn pin_with_anchor(dir: &ContainerDir, namespaces: &[String], fds: &[OwnedFd]) -> Result<OwnedFd> {
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
        let target = dir.pin(ns);
        std::fs::remove_file(&target).map_err(io("replace", &target))?;
        std::os::unix::fs::symlink(format!("/proc/{anchor}/ns/{ns}"), &target).map_err(io("create", &target))?;
    }
    // The anchor has joined once its namespace shows up behind the pin.
    let mnt = dir.mnt();
    let want = nix::sys::stat::fstat(fds[0].as_raw_fd()).map_err(sys_err("inspect the container's namespace"))?.st_ino;
    for _ in 0..1000 {
        if std::fs::metadata(&mnt).map(|m| m.ino()).ok() == Some(want) {
            return Ok(commit_write);
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Err(ContainerError::Sys { action: "start the container's anchor", source: Errno::ETIMEDOUT })
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
pub(super) fn reopen_sources(layout: &mut Layout, user: &Credentials) -> Result<()> {
    user.with_fs_identity(|| mounts::reopen_sources(layout, true))??;
    Ok(mounts::reopen_sources(layout, false)?)
}

/// Mounts the tree into the overlay mounted at `root` and pivots into it.
pub(super) fn finish_root(root: &Path, layout: Layout, hostname: Option<&str>) -> Result<()> {
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
pub(super) fn make_rprivate() -> Result<()> {
    nix::mount::mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .map_err(sys_err("make the container's mounts private"))
}

/// Reads a container's `state.json`.
pub fn read_state(dir: &ContainerDir) -> Result<State> {
    let path = dir.state();
    let bytes = std::fs::read(&path).map_err(io("read", &path))?;
    serde_json::from_slice(&bytes).map_err(|e| ContainerError::Io { action: "parse", path, source: e.into() })
}
