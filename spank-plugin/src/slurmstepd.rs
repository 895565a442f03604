//! Remote context: slurmstepd on a compute node. Owns when the job's container is
//! created and how each task enters it.
//!
//! - `init_post_opt` (root, once per step and node, options known): decide whether the
//!   step wants a container and gather who it is for. Nothing can fail here that the
//!   user should see: an error from this hook makes slurmstepd fail the whole launch
//!   ("Plugin stack initialization failed"), which for a batch job drains the node.
//! - `task_init_privileged` (root, in each forked task before it becomes the user): run
//!   `berth container create` (per-node: every task asks for `node`, berth creates it
//!   once and reuses it; per-rank: `rank-<N>`). Running here rather than in slurmstepd
//!   itself means the work is charged to the job and killed with it by `scancel`, and a
//!   failure fails the task with one line in the user's output. Then join the container
//!   with the engine's `container::join` (open + `setns` of the namespaces pinned in
//!   `<runtime_dir>/<job>/<name>/`, `chdir` to its working directory; no threads, no
//!   HTTP) and set the container's environment. Slurm searches `PATH` for a bare command
//!   after this hook, inside the container and with the image's `PATH`.
//!   For a `--mpi=pmix` step it also binds the step's PMIx dirs into the container
//!   (`pmix.rs`), and every task writes `$BERTH_HOSTFILE` there (`hostfile.rs`).
//! - `task_init` (as the user, just before exec): slurmstepd has `chdir`ed back to the
//!   job's directory after `task_init_privileged`, so the working directory is set again;
//!   and `no_new_privs`, so nothing the task execs gains privileges. Where the admin
//!   set `remap_user`, the task enters a user namespace of its own here, as the image's
//!   USER or root (`--container-remap-root`) mapped to the job user.

use crate::args::{Args, Mount};
use crate::berth::{self, CreateRequest};
use crate::env;
use crate::ffi::{self, Spank};
use crate::hostfile;
use crate::pmix;
use crate::slurm_client;
use crate::sys;
use berth_engine::config::Config;
use berth_engine::container;
use berth_engine::runtime::RuntimeDir;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// What `init_post_opt` learnt about this step on this node; written once, then only
/// read (also by the forked tasks, which inherit it).
struct Prepared {
    job: u32,
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    image: String,
    args: Args,
    /// Mounts the plugin adds itself: the batch script's directory, Slurm's client.
    extra_mounts: Vec<Mount>,
}

static PREPARED: OnceLock<Prepared> = OnceLock::new();
/// Bound read-only from the node into every container (docker and enroot do the same).
const NAME_SERVICE_FILES: &[&str] = &["/etc/hosts", "/etc/resolv.conf"];
/// Where Slurm reads slurm.conf when nothing says otherwise (Debian's and Slurm's default).
const DEFAULT_SLURM_CONF: &str = "/etc/slurm/slurm.conf";
/// The task's working directory inside the container, chosen in `task_init_privileged`
/// and entered in `task_init`, as the user.
static WORKDIR: OnceLock<Workdir> = OnceLock::new();

struct Workdir {
    path: PathBuf,
    /// The user's `--container-workdir`, for the error that names it.
    asked: bool,
}
/// Whom the task runs as in a user namespace of its own (the admin's `remap_user`),
/// chosen in `task_init_privileged` where the image's passwd file can be read.
static INSIDE: OnceLock<container::remap::InsideIds> = OnceLock::new();

/// Where the image comes from, given `--container-image` and Slurm's own `--container`
/// (which reaches us as `SLURM_CONTAINER`). An OCI bundle path is left to Slurm.
pub fn choose_image(args_image: Option<&str>, slurm_container: Option<&str>) -> Option<String> {
    if let Some(image) = args_image {
        return Some(image.to_string());
    }
    let value = slurm_container?.trim();
    let is_bundle = value.starts_with('/') || value.starts_with('.') || Path::new(value).is_dir();
    (!value.is_empty() && !is_bundle).then(|| value.to_string())
}

/// Container name for one task: one per node, or one per rank (the engine's names).
pub fn container_name(per_rank: bool, global_rank: u32) -> String {
    if per_rank {
        container::per_rank(global_rank)
    } else {
        container::PER_NODE.to_string()
    }
}

pub fn init_post_opt(sp: &Spank, config: &Config, args: Args) -> Result<(), String> {
    let step = sp.step_id().map_err(|e| e.to_string())?;
    if step == ffi::SLURM_EXTERN_CONT {
        return Ok(());
    }
    let slurm_container = sp.getenv("SLURM_CONTAINER").map_err(|e| e.to_string())?;
    let Some(image) = choose_image(args.image.as_deref(), slurm_container.as_deref()) else {
        return Ok(());
    };
    // The batch script lives in slurmd's spool directory, which the image lacks.
    let mut extra_mounts = Vec::new();
    if step == ffi::SLURM_BATCH_SCRIPT {
        let argv = sp.argv().map_err(|e| e.to_string())?;
        if let Some(dir) = argv.first().and_then(|script| Path::new(script).parent()) {
            extra_mounts.push(Mount { source: dir.to_path_buf(), target: dir.to_path_buf(), read_only: true });
        }
    }
    // The node's name service files: MPI launchers started in the container (MPICH's
    // proxies, Open MPI's orted) call back to the node of `mpirun` by its host name,
    // which must resolve inside the image as it does on the node.
    for file in NAME_SERVICE_FILES {
        if Path::new(file).is_file() && !args.mounts.iter().any(|m| m.target == Path::new(file)) {
            extra_mounts.push(Mount { source: file.into(), target: file.into(), read_only: true });
        }
    }
    // Slurm's commands inside the container; without them the container still works.
    match slurm_client::HostClient::discover(sys::own_dir().as_deref()) {
        Some(client) => {
            let bin_dir = RuntimeDir::of(config).slurm_client();
            match client.install(&bin_dir) {
                Ok(()) => extra_mounts.extend(client.mounts(&bin_dir)),
                Err(err) => ffi::log_info(&format!("berth: no Slurm commands in containers: cannot write {}: {err}", bin_dir.display())),
            }
        }
        None => ffi::log_debug("berth: no Slurm client found on this node to offer inside containers"),
    }
    let prepared = Prepared {
        job: sp.job_id().map_err(|e| e.to_string())?,
        uid: sp.uid().map_err(|e| e.to_string())?,
        gid: sp.gid().map_err(|e| e.to_string())?,
        groups: sp.supplementary_gids().map_err(|e| e.to_string())?,
        image,
        args,
        extra_mounts,
    };
    // A second call in the same process would be Slurm's bug; the first one stands.
    let _ = PREPARED.set(prepared);
    Ok(())
}

pub fn task_init_privileged(sp: &Spank, config: &Config) -> Result<(), String> {
    let Some(prepared) = PREPARED.get() else {
        return Ok(());
    };
    if prepared.args.per_rank && !config.allow_per_rank {
        return Err("berth: this site does not allow --container-per-rank; drop the option".into());
    }
    let rank = if prepared.args.per_rank { Some(sp.task_global_id().map_err(|e| e.to_string())?) } else { None };
    // slurmstepd has already changed to the step's directory: the submit directory.
    let submit_dir = std::env::current_dir().ok();
    let docker_config = sp.getenv("DOCKER_CONFIG").map_err(|e| e.to_string())?;
    let path = sp.getenv("PATH").map_err(|e| e.to_string())?;
    let req = CreateRequest {
        job: prepared.job,
        uid: prepared.uid,
        gid: prepared.gid,
        groups: &prepared.groups,
        image: &prepared.image,
        rank,
        submit_dir: submit_dir.as_deref(),
        args: &prepared.args,
        extra_mounts: &prepared.extra_mounts,
        docker_config: docker_config.as_deref(),
        path: path.as_deref(),
    };
    berth::create(config, &req)?;

    let name = container_name(prepared.args.per_rank, rank.unwrap_or(0));
    let job = prepared.job.to_string();
    // What comes from the node's mount namespace must be taken before joining.
    let pmix = pmix_dirs(sp, prepared)?;
    let job_lock = match &pmix {
        Some(_) => RuntimeDir::of(config).job(&job).and_then(|dir| dir.lock(false)).map_err(|err| format!("berth: {err}"))?,
        None => None,
    };
    let mut joined = container::join(config, &job, &name).map_err(|err| format!("berth: {err}"))?;
    if let Some(dirs) = &pmix {
        pmix::attach(dirs).map_err(|why| format!("berth: srun --mpi=pmix: {why}"))?;
    }
    drop(job_lock);
    joined.choose_inside(config, prepared.args.remap_root).map_err(|err| format!("berth: {err}"))?;
    if let Some(inside) = joined.inside {
        let _ = INSIDE.set(inside);
    }
    let hostfile = write_hostfile(sp)?;
    // Slurm's meaning of a step's directory (sbatch -D, srun --chdir, the submit
    // directory) is kept when the container has it; join chose the container's own
    // (the image's WorkingDir, else /) for when it does not.
    // Entered as the engine does, inside the container's root and through no magic link:
    // `--container-workdir=/proc/self/fd/N` is not checked by create (a reused
    // container never sees it) and would otherwise start the task in a host directory.
    // The user's `--container-workdir` is not even looked up here, as root: whether it
    // exists would tell what lies in another user's private dir bound in.
    let workdir = match (&prepared.args.workdir, submit_dir) {
        (Some(dir), _) => Workdir { path: dir.clone(), asked: true },
        (None, Some(dir)) if enter_workdir(&dir).is_ok() => Workdir { path: dir, asked: false },
        (None, _) => Workdir { path: PathBuf::from(&joined.state.workdir), asked: false },
    };
    let _ = WORKDIR.set(workdir);
    let job_has = |name: &OsStr| name.to_str().is_some_and(|name| matches!(sp.getenv(name), Ok(Some(_))));
    for (name, value) in env::to_set(&joined.env, &prepared.args.env, job_has) {
        sp.setenv(&name, &value).map_err(|e| format!("berth: cannot set {}: {e}", name.to_string_lossy()))?;
    }
    if hostfile {
        sp.setenv(OsStr::new("BERTH_HOSTFILE"), OsStr::new(hostfile::PATH)).map_err(|e| format!("berth: cannot set BERTH_HOSTFILE: {e}"))?;
    }
    if prepared.extra_mounts.iter().any(|m| m.target == Path::new(slurm_client::BIN_DIR)) {
        let path = sp.getenv("PATH").map_err(|e| e.to_string())?;
        let path = slurm_client::path_with_wrappers(path.as_deref());
        sp.setenv(OsStr::new("PATH"), OsStr::new(&path)).map_err(|e| format!("berth: cannot set PATH: {e}"))?;
    }
    Ok(())
}

/// For a step of Slurm's PMIx plugin, its server and client dirs, cloned from the node
/// (see `pmix.rs`); `None` for other steps.
fn pmix_dirs(sp: &Spank, prepared: &Prepared) -> Result<Option<Vec<pmix::Detached>>, String> {
    let getenv = |name: &str| sp.getenv(name).map_err(|e| e.to_string());
    let step = sp.step_id().map_err(|e| e.to_string())?;
    // The batch and interactive steps never run an MPI plugin, whatever SLURM_MPI_TYPE
    // the job's environment carries (users export it to make pmix srun's default).
    if step == ffi::SLURM_BATCH_SCRIPT || step == ffi::SLURM_INTERACTIVE_STEP || !pmix::is_pmix(getenv("SLURM_MPI_TYPE")?.as_deref()) {
        return Ok(None);
    }
    let node = ffi::node_settings().ok_or("berth: srun --mpi=pmix: cannot read SlurmdSpoolDir from slurmstepd's config; run without --mpi=pmix and report it to your admins")?;
    // mpi.conf sits beside slurm.conf: the one slurmstepd names (Slurm 22.05), else the
    // one its environment or Slurm's default path names (24.11 leaves the path unset).
    let conf_files = [node.conf_file.clone(), std::env::var_os("SLURM_CONF").map(PathBuf::from), Some(PathBuf::from(DEFAULT_SLURM_CONF))];
    let mpi_conf_base = conf_files
        .iter()
        .flatten()
        .filter_map(|conf| std::fs::read_to_string(conf.parent()?.join("mpi.conf")).ok())
        .find_map(|text| pmix::client_base_from_mpi_conf(&text));
    let candidates = pmix::candidates(
        &node,
        getenv("SLURM_PMIX_TMPDIR")?.as_deref(),
        mpi_conf_base,
        getenv("TMPDIR")?.as_deref(),
        prepared.job,
        step,
        prepared.uid,
    );
    pmix::detach(&candidates, prepared.uid)
        .map(Some)
        .map_err(|why| format!("berth: srun --mpi=pmix: {why}; use mpirun or --mpi=pmi2 meanwhile, and show this line to your admins"))
}

/// Writes `$BERTH_HOSTFILE` in the container (inside it, as root); whether it is there.
/// A job without the allocation's variables, or a read-only container root, goes without
/// one: a line in the slurmd log says why. An image that puts a symlink or a mount
/// where the hostfile goes fails the task with one line.
fn write_hostfile(sp: &Spank) -> Result<bool, String> {
    // The job's nodes and slots do not change between its tasks and steps: the first
    // task in this container wrote it.
    if hostfile::exists() {
        return Ok(true);
    }
    let var = |name: &str| sp.getenv(name).ok().flatten().ok_or_else(|| format!("{name} is not set"));
    let text = var("SLURM_JOB_NODELIST").and_then(|list| {
        let nodes = hostfile::expand_hostlist(&list)?;
        let slots = hostfile::expand_counts(&var("SLURM_JOB_CPUS_PER_NODE")?)?;
        hostfile::text(&nodes, &slots)
    });
    let without = |why: String| {
        ffi::log_info(&format!("berth: no BERTH_HOSTFILE in this container: {why}"));
        Ok(false)
    };
    match text.map(|text| hostfile::write(&text)) {
        Ok(Ok(())) => Ok(true),
        Ok(Err(e)) if e.is_read_only() => without(e.to_string()),
        Ok(Err(e)) => Err(format!("berth: {e}")),
        Err(why) => without(why),
    }
}

/// Changes to `dir` resolved inside the container's root, never through a magic link.
fn enter_workdir(dir: &Path) -> Result<(), container::ContainerError> {
    container::enter_workdir(&dir.to_string_lossy())
}

pub fn task_init() -> Result<(), String> {
    let Some(workdir) = WORKDIR.get() else {
        return Ok(());
    };
    match enter_workdir(&workdir.path) {
        Ok(()) => {}
        Err(container::ContainerError::Workdir { source, .. }) if workdir.asked && source as i32 == libc::ENOENT => {
            return Err(format!("berth: --container-workdir={} does not exist in the image", workdir.path.display()))
        }
        Err(err) if workdir.asked => return Err(format!("berth: --container-workdir: {err}")),
        Err(err) => return Err(format!("berth: {err}")),
    }
    sys::no_new_privs().map_err(|err| format!("berth: cannot set no_new_privs: {err}"))?;
    // Last, as the user: the new user namespace must be the task's own.
    if let Some(inside) = INSIDE.get() {
        container::remap::enter(*inside).map_err(|err| format!("berth: {err}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_image_wins_over_slurm_container() {
        assert_eq!(choose_image(Some("alpine"), Some("ubuntu")), Some("alpine".into()));
        assert_eq!(choose_image(None, Some("localhost:5000/minimal")), Some("localhost:5000/minimal".into()));
        assert_eq!(choose_image(None, None), None);
        assert_eq!(choose_image(None, Some("")), None);
    }

    #[test]
    fn oci_bundle_paths_are_left_to_slurm() {
        assert_eq!(choose_image(None, Some("/srv/bundles/app")), None);
        assert_eq!(choose_image(None, Some("./bundle")), None);
        // An existing directory named without a leading '/' or '.' (tests run in the crate).
        assert_eq!(choose_image(None, Some("src")), None);
    }

    #[test]
    fn containers_are_named_per_node_or_per_rank() {
        assert_eq!(container_name(false, 5), "node");
        assert_eq!(container_name(true, 5), "rank-5");
    }
}
