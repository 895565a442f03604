//! `berth container create|exec|destroy|list` (the node-side actions the scheduler
//! adapters run as root) and `berth run` (try an image by hand). Parses arguments into
//! one engine call each and turns errors into one line; must never hold container
//! logic of its own.

use berth_engine::config::Config;
use berth_engine::registry::auth::JobUser;
use berth_engine::container::{self, Spec};
use berth_engine::image::{Image, ImageConfig, UserMount};
use berth_engine::identity::{Credentials, UserError};
use berth_engine::teardown::cgroup::Tracking;
use clap::{Args, Subcommand};
use berth_engine::store::{Held, Progress, PullPolicy, Store};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum ContainerCommand {
    /// Create the container of a job on this node (or reuse it), print it as JSON.
    Create(CreateArgs),
    /// Run a command inside a job's container as its user.
    Exec(ExecArgs),
    /// Kill everything in a job's containers and remove all their state. Idempotent.
    Destroy(DestroyArgs),
    /// List the containers on this node.
    List(ListArgs),
    /// Start the job's MPI wiring in its container on this node (sshd, ssh config, hostfile).
    Wire(crate::wiring::WireArgs),
}

/// Where the image comes from.
#[derive(Args)]
pub struct ImageArgs {
    /// When to pull the image from its registry into the store: missing, always, never.
    #[arg(long, default_value = "missing", value_name = "POLICY")]
    pull: PullPolicy,
    /// The image's unpacked layer directories, lowest first (comma-separated or repeated).
    #[arg(long, value_delimiter = ',', value_name = "DIR")]
    layers: Vec<PathBuf>,
    /// The image's OCI config JSON (Env, Entrypoint, Cmd, WorkingDir).
    #[arg(long, value_name = "FILE")]
    image_config: Option<PathBuf>,
}

#[derive(Args)]
pub struct Which {
    /// The scheduler's job id.
    #[arg(long)]
    job: String,
    /// The container's name (per-node mode: `node`).
    #[arg(long, default_value = container::PER_NODE, conflicts_with = "rank")]
    name: String,
    /// Per-rank mode: the container of this task rank (name `rank-N`).
    #[arg(long)]
    rank: Option<u32>,
}

impl Which {
    fn name(&self) -> String {
        self.rank.map(container::per_rank).unwrap_or_else(|| self.name.clone())
    }
}

/// What goes into a container besides the image.
#[derive(Args)]
pub struct Contents {
    /// Do not bind the user's home directory.
    #[arg(long)]
    no_home: bool,
    /// Bind SRC at DST (default SRC), read-only with `:ro`; SRC must be readable by the user.
    #[arg(long = "mount", value_name = "SRC[:DST][:ro]")]
    mounts: Vec<String>,
    /// The working directory inside the container (default: the image's WorkingDir).
    #[arg(long)]
    workdir: Option<String>,
    /// Set KEY=VALUE in the container's environment.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Forbid writes to the container's root file system.
    #[arg(long)]
    readonly: bool,
}

#[derive(Args)]
pub struct CreateArgs {
    #[command(flatten)]
    which: Which,
    /// The job's user (name or uid).
    #[arg(long)]
    user: String,
    /// The job's primary group id (default: the user's).
    #[arg(long)]
    gid: Option<u32>,
    /// The job's supplementary group ids (default: the user's groups).
    #[arg(long, value_delimiter = ',')]
    groups: Option<Vec<u32>>,
    /// The image (e.g. `ubuntu:22.04`), resolved through the node's store and pulled
    /// as `--pull` says; with `--layers`, only its name for `list`.
    #[arg(long, default_value = "")]
    image: String,
    #[command(flatten)]
    image_args: ImageArgs,
    #[command(flatten)]
    contents: Contents,
    /// The job's submit directory: bound in, and the working directory unless the image
    /// has one; left out when the user finds no directory there on this node.
    #[arg(long)]
    submit_dir: Option<PathBuf>,
    /// A device node the job may use (repeatable).
    #[arg(long = "device", value_name = "PATH")]
    devices: Vec<PathBuf>,
    /// The job's DOCKER_CONFIG: the directory of the user's config.json with registry
    /// logins (default: ~/.docker of the user), read with the user's rights.
    #[arg(long, value_name = "DIR")]
    docker_config: Option<PathBuf>,
    /// The job's PATH, where the user's docker-credential-* helpers are looked up.
    #[arg(long, value_name = "PATH")]
    helper_path: Option<std::ffi::OsString>,
    /// Give the container its own UTS namespace with this host name.
    #[arg(long)]
    hostname: Option<String>,
    /// Give the container its own IPC namespace.
    #[arg(long)]
    ipc: bool,
    /// Where cgroup v2 carries controllers, the scheduler's own cgroups track the job's
    /// processes (Slurm's proctrack/cgroup): berth makes no cgroup of its own there.
    #[arg(long)]
    scheduler_cgroups: bool,
}

#[derive(Args)]
pub struct ExecArgs {
    #[command(flatten)]
    which: Which,
    /// Set KEY=VALUE for the command (wins over everything).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Run as root inside a user namespace mapped to the container's user (only where
    /// the admin sets remap_user; there the image's USER is honoured without it).
    #[arg(long)]
    remap_root: bool,
    /// Read the job's environment (`KEY=VALUE` entries, each ended by a NUL byte) from
    /// this descriptor instead of taking berth's own: a root caller keeps the job's
    /// variables out of the root process's environment this way.
    #[arg(long, value_name = "FD")]
    job_env_fd: Option<i32>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Args)]
pub struct AsUserArgs {
    /// The user's uid.
    #[arg(long)]
    uid: u32,
    /// The job's environment (`KEY=VALUE` entries, each ended by a NUL byte).
    #[arg(long, value_name = "FD")]
    job_env_fd: i32,
    /// The program's argv[0] (e.g. `-bash` for a login shell).
    #[arg(long)]
    arg0: Option<String>,
    /// The program and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Args)]
pub struct DestroyArgs {
    /// The scheduler's job id.
    #[arg(long)]
    job: String,
}

#[derive(Args)]
pub struct ListArgs {
    /// Only this job's containers.
    #[arg(long)]
    job: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct RunArgs {
    /// The image: a reference (e.g. `ubuntu:22.04`, pulled into the store when missing)
    /// or a directory holding an unpacked root file system.
    image: String,
    #[command(flatten)]
    image_args: ImageArgs,
    #[command(flatten)]
    contents: Contents,
    /// Replace the image's Entrypoint.
    #[arg(long)]
    entrypoint: Option<String>,
    /// Run as root inside a user namespace mapped to you (only where the admin sets
    /// remap_user; there the image's USER is honoured without it).
    #[arg(long)]
    remap_root: bool,
    /// The command and its arguments (default: the image's Cmd).
    #[arg(last = true)]
    command: Vec<String>,
}

/// The exit status of a command that never started: 127 when it is not found, 126 when
/// it cannot be executed, 125 when berth failed before (as docker and podman do).
fn not_started(err: container::ContainerError) -> ExitCode {
    let code = match err {
        container::ContainerError::NoProgram { .. } => 127,
        container::ContainerError::Exec { .. } => 126,
        _ => 125,
    };
    fail(err);
    ExitCode::from(code)
}

fn fail(err: impl std::fmt::Display) -> ExitCode {
    eprintln!("berth: {err}");
    ExitCode::from(1)
}

/// The image from the store (a reference, no `--layers`) or from directories. With a
/// store image comes the store's lock: hold it until the container records its layers,
/// so that a `berth gc` cannot remove them in between.
/// A `job_user` pulls with their own registry logins.
fn image(
    config: &Config,
    reference: String,
    args: &ImageArgs,
    lowest: Option<PathBuf>,
    job_user: Option<JobUser>,
    progress: Progress,
) -> Result<(Image, Option<Held>), String> {
    if args.layers.is_empty() && lowest.is_none() {
        if reference.is_empty() {
            return Err("no image: give --image REF (or --layers DIR,...)".into());
        }
        let mut store = Store::open(config).map_err(|e| e.to_string())?;
        if let Some(user) = job_user {
            store = store.for_job_user(user);
        }
        let (stored, held) = store.resolve_held(&reference, args.pull, None, progress).map_err(|e| e.to_string())?;
        return Ok((stored.into(), Some(held)));
    }
    from_dirs(reference, args, lowest).map(|image| (image, None)).map_err(|e| e.to_string())
}

fn from_dirs(reference: String, args: &ImageArgs, extra_lowest: Option<PathBuf>) -> Result<Image, container::ContainerError> {
    let config = match &args.image_config {
        Some(path) => ImageConfig::from_oci_json(path)?,
        None => ImageConfig::default(),
    };
    let mut layer_dirs: Vec<PathBuf> = extra_lowest.into_iter().collect();
    layer_dirs.extend(args.layers.iter().cloned());
    Ok(Image { reference, layer_dirs, config, userxattr: false })
}

/// The submit dir, when the user finds a directory at that path on this node, looked
/// up as the user (a child that became them), never as root: whether a path exists below
/// a directory the user may not search is not theirs to learn. A path they may not reach
/// fails the create, as their mounts do.
fn submit_dir(user: &Credentials, dir: Option<PathBuf>, timeout: std::time::Duration) -> Result<Option<PathBuf>, UserError> {
    use nix::errno::Errno;
    let Some(dir) = dir else { return Ok(None) };
    match user.open_as_user(std::slice::from_ref(&dir), timeout) {
        Ok(fds) => Ok(fds.into_iter().next().is_some_and(|fd| std::fs::File::from(fd).metadata().is_ok_and(|m| m.is_dir())).then_some(dir)),
        Err(UserError::Denied { source: Errno::ENOENT | Errno::ENOTDIR, .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

fn user_credentials(user: &str, gid: Option<u32>, groups: Option<Vec<u32>>) -> Result<Credentials, String> {
    use nix::unistd::{Gid, Uid, User};
    let entry = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)).ok().flatten(),
        Err(_) => Some(User::from_name(user).ok().flatten().ok_or_else(|| format!("no user '{user}' on this node"))?),
    };
    let uid = entry.as_ref().map(|u| u.uid.as_raw()).or_else(|| user.parse().ok()).ok_or_else(|| format!("no user '{user}'"))?;
    let gid = gid.or_else(|| entry.as_ref().map(|u| u.gid.as_raw())).ok_or_else(|| format!("user {uid} has no passwd entry: give --gid"))?;
    let groups = match groups {
        Some(groups) => groups,
        None => match &entry {
            Some(u) => {
                let name = std::ffi::CString::new(u.name.as_bytes()).map_err(|e| e.to_string())?;
                nix::unistd::getgrouplist(&name, Gid::from_raw(gid)).map_err(|e| format!("cannot list the groups of {}: {e}", u.name))?.into_iter().map(Gid::as_raw).collect()
            }
            None => Vec::new(),
        },
    };
    Ok(Credentials { uid, gid, groups })
}

fn user_mounts(specs: &[String]) -> Result<Vec<UserMount>, String> {
    specs
        .iter()
        .map(|s| UserMount::parse(s).ok_or_else(|| format!("bad --mount '{s}': expected SRC[:DST][:ro] with absolute paths")))
        .collect()
}

pub fn container(config: &Config, command: ContainerCommand) -> ExitCode {
    match command {
        ContainerCommand::Wire(args) => crate::wiring::wire(config, args),
        ContainerCommand::Create(args) => {
            // Refuse a bad job id or name before any pull.
            if let Err(e) = berth_engine::runtime::RuntimeDir::of(config).container(&args.which.job, &args.which.name()) {
                return fail(e);
            }
            let user = match user_credentials(&args.user, args.gid, args.groups.clone()) {
                Ok(user) => user,
                Err(e) => return fail(e),
            };
            let mounts = match user_mounts(&args.contents.mounts) {
                Ok(m) => m,
                Err(e) => return fail(e),
            };
            let submit_dir = match submit_dir(&user, args.submit_dir, config.user_child_timeout()) {
                Ok(dir) => dir,
                Err(e) => return fail(e),
            };
            // The job's user, unless berth already runs as them: then its own config is theirs.
            let job_user = (!user.is_caller()).then(|| JobUser {
                ids: user.clone(),
                docker_config: args.docker_config.clone(),
                path: args.helper_path.clone(),
            });
            let (image, _store_held) = match image(config, args.image.clone(), &args.image_args, None, job_user, Progress::Silent) {
                Ok(i) => i,
                Err(e) => return fail(e),
            };
            let spec = Spec {
                job: args.which.job.clone(),
                name: args.which.name(),
                image,
                user,
                home: config.mount_home && !args.contents.no_home,
                submit_dir,
                mounts,
                devices: args.devices,
                workdir: args.contents.workdir,
                env: args.contents.env,
                read_only: args.contents.readonly,
                hostname: args.hostname,
                ipc: args.ipc,
                tracking: if args.scheduler_cgroups { Tracking::Scheduler } else { Tracking::Berth },
            };
            match container::create(config, &spec) {
                Ok(created) => {
                    println!("{}", serde_json::to_string(&created).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        ContainerCommand::Exec(args) => {
            let job_env = match args.job_env_fd.map(read_job_env).transpose() {
                Ok(from_fd) => from_fd.unwrap_or_else(|| std::env::vars_os().collect()),
                Err(e) => return fail(e),
            };
            let joined = container::join(config, &args.which.job, &args.which.name())
                .and_then(|mut joined| joined.choose_inside(config, args.remap_root).map(|()| joined));
            let err = match joined {
                Ok(joined) => container::exec_joined(&joined, &args.command, &job_env, &args.env),
                Err(e) => e,
            };
            not_started(err)
        }
        ContainerCommand::Destroy(args) => match container::destroy(config, &args.job) {
            Ok(done) => {
                println!("{{\"job\":{},\"containers\":{},\"killed\":{}}}", serde_json::Value::from(args.job), done.containers, done.killed);
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        ContainerCommand::List(args) => match container::list(config, args.job.as_deref()) {
            Ok(list) if args.json => {
                println!("{}", serde_json::to_string(&list).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Ok(list) => {
                println!("{:<16} {:<12} {:>8} {:>6}  IMAGE", "JOB", "NAME", "UID", "PROCS");
                for c in list {
                    println!("{:<16} {:<12} {:>8} {:>6}  {}", c.job, c.name, c.uid, c.processes, c.image);
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
    }
}

/// `berth as-user`: the job's user as pbs_mom would make it (groups, gid, uid; no
/// other restriction, as the job runs on the host), then the program.
pub fn as_user(args: AsUserArgs) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let job_env = match read_job_env(args.job_env_fd) {
        Ok(env) => env,
        Err(e) => return fail(e),
    };
    let user = match user_credentials(&args.uid.to_string(), None, None) {
        Ok(user) if user.uid != 0 => user,
        Ok(_) => return fail("as-user: refusing uid 0"),
        Err(e) => return fail(e),
    };
    let groups: Vec<nix::unistd::Gid> = user.groups.iter().copied().map(nix::unistd::Gid::from_raw).collect();
    let (uid, gid) = (nix::unistd::Uid::from_raw(user.uid), nix::unistd::Gid::from_raw(user.gid));
    let become_user = nix::unistd::setgroups(&groups)
        .and_then(|()| nix::unistd::setresgid(gid, gid, gid))
        .and_then(|()| nix::unistd::setresuid(uid, uid, uid));
    if let Err(e) = become_user {
        return fail(format!("cannot become uid {}: {e}", user.uid));
    }
    let mut command = std::process::Command::new(&args.command[0]);
    command.args(&args.command[1..]).env_clear().envs(job_env.iter().map(|(k, v)| (k, v)));
    if let Some(arg0) = &args.arg0 {
        command.arg0(arg0);
    }
    let err = command.exec();
    not_started(container::ContainerError::Exec { program: args.command[0].clone(), source: nix::errno::Errno::from_raw(err.raw_os_error().unwrap_or(0)) })
}

/// The job's environment from `--job-env-fd` (read through /proc, from its start).
fn read_job_env(fd: i32) -> Result<Vec<container::env::Var>, String> {
    let bytes = std::fs::read(format!("/proc/self/fd/{fd}")).map_err(|e| format!("cannot read the job's environment from descriptor {fd} (--job-env-fd): {e}"))?;
    Ok(container::env::decode(&bytes))
}

pub fn run(config: &Config, args: RunArgs) -> ExitCode {
    let as_dir = Path::new(&args.image);
    let lowest = ((args.image.starts_with('/') || args.image.starts_with('.')) && as_dir.is_dir()).then(|| as_dir.to_path_buf());
    // `run` records no container in the runtime dir, so gc cannot see its layers in
    // use once this lock is gone (docs/images.md, Known limits).
    let image = match image(config, args.image.clone(), &args.image_args, lowest, None, Progress::auto()) {
        Ok((i, _)) => i,
        Err(e) => return fail(e),
    };
    let mounts = match user_mounts(&args.contents.mounts) {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    let entrypoint = args.entrypoint.map(|e| vec![e]);
    let argv = match container::command_line(&image.config, entrypoint.as_deref(), &args.command) {
        Ok(argv) => argv,
        Err(e) => return fail(e),
    };
    // The current directory is bound in, unless it is the root (nothing to bind).
    let cwd = std::env::current_dir().ok().filter(|d| d.parent().is_some());
    let image_workdir = image.config.working_dir.clone();
    let spec = Spec {
        job: format!("run-{}", std::process::id()),
        name: container::PER_NODE.to_string(),
        image,
        user: Credentials::current(),
        home: config.mount_home && !args.contents.no_home,
        submit_dir: cwd,
        mounts,
        devices: Vec::new(),
        // As docker: the image's WorkingDir before the current directory.
        workdir: args.contents.workdir.or_else(|| image_workdir.clone()),
        env: Vec::new(),
        read_only: args.contents.readonly,
        hostname: None,
        ipc: false,
        tracking: Tracking::Berth,
    };
    not_started(container::run(config, &spec, &argv, &args.contents.env, args.remap_root))
}
