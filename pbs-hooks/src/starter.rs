//! The job starter (`$job_starter` in mom_priv/config): pbs_mom execs it in place of
//! the job's shell with `STARTER SHELL [ARGS...]` and the job script on stdin (Torque
//! 6.1.3, src/resmom/start_exec.c, `mom_jobstarter_execute_job`: it overwrites the
//! shell's own argv[0], `-bash` for a login shell, with the starter's path). With
//! `$job_starter_run_privileged true` it runs as root and pbs_mom leaves switching to
//! the job's user to it.
//!
//! A job with a container on this node: exec `berth container exec` (which joins the
//! container and becomes its user) with `PBS_NODEFILE` set to the wiring's hostfile
//! inside. pbs_mom hands the shell the script's host path on a pipe (stdin,
//! `[exec ]PATH [ARGS]`, start_exec.c under SHELL_INVOKE); that path does not exist in
//! the container, so the starter opens the script as the shell's stdin and has the shell
//! source it from there (qsub -F's ARGS as its arguments). The image's values of the
//! names listed with `container-env` are passed as `--env`, so they beat the job's. A
//! job whose prologue failed: print the prologue's line
//! (the job's error file) and fail. Any other job: become the job user and exec the
//! shell as pbs_mom would.
//!
//! Which job and whose: never from the job's environment (`PBS_JOBID`, `USER`), which
//! the user passes with `qsub -v`. A batch job's are the script pbs_mom names on the
//! pipe: its file name is the job id, its owner the job's user (pbs_mom chowns it,
//! start_exec.c). An interactive job's user owns the job's terminal on stdin; its id
//! is only looked up in `PBS_JOBID`, and a container is entered only when it is that
//! user's. The job's environment reaches the job's program only, as data
//! (`--job-env-fd`), never as the environment of a root process.
//! Never creates anything; what the prologue did not make does not exist.

use crate::entry::Caller;
use berth_engine::config::{Config, ConfigError};
use berth_engine::container::{self, env, ContainerError};
use berth_engine::privileged::{self, Limits};
use berth_engine::runtime::{self, ContainerDir, JobDir};
use berth_engine::wiring::files;
use nix::unistd::Uid;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;

#[derive(Debug, thiserror::Error)]
pub enum StarterError {
    #[error("no shell to start: pbs_mom runs the job starter as `STARTER SHELL ...`; set $job_starter to this binary")]
    NoShell,
    #[error("cannot tell the job's user: stdin is neither pbs_mom's pipe naming the job script nor the job's terminal; this binary is pbs_mom's $job_starter, not a command")]
    NoJob,
    #[error("the job's script or terminal belongs to root: berth-pbs starts no job as root")]
    RootJob,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error("{0}")]
    PrologueFailed(String),
    #[error("cannot read the job script's name that pbs_mom sends on stdin: {0}")]
    ScriptName(String),
    #[error("cannot open the job script {path}: {source}")]
    Script { path: String, source: std::io::Error },
    #[error("cannot give the job its stdin again: {0}")]
    Stdin(nix::errno::Errno),
    #[error("cannot give the job its own limits back: {0}")]
    Limits(std::io::Error),
    #[error("cannot exec {program}: {source}")]
    Exec { program: String, source: std::io::Error },
}

const SOURCE: &str = "exec 9<&0 </dev/null; . /proc/self/fd/9";
const SOURCE_WITH_ARGS: &str = "exec 9<&0 </dev/null; . /proc/self/fd/9 \"$@\"";

/// The job as pbs_mom alone can say it.
struct Job {
    /// Its id, for finding its container; `None` when unknown.
    id: Option<String>,
    uid: Uid,
    /// A batch job's script, opened, with the `[exec ]PATH [ARGS]` line pbs_mom sent
    /// and the ARGS of it.
    script: Option<(std::fs::File, Vec<u8>, Vec<String>)>,
}

/// Replaces this process with the job's shell; returns only on failure.
pub fn start(config: &Config, args: &[String], caller: &Caller, limits: Option<&Limits>) -> StarterError {
    let Some((shell, shell_args)) = args.split_first() else { return StarterError::NoShell };
    let job = match identify(caller) {
        Ok(job) => job,
        Err(e) => return e,
    };
    if job.uid.is_root() && nix::unistd::geteuid().is_root() {
        return StarterError::RootJob;
    }
    let Some(id) = job.id.clone() else { return native(config, shell, shell_args, &job, caller, limits) };
    if !nix::unistd::geteuid().is_root() {
        return through_launcher(config, shell, shell_args, &job, &id, caller);
    }
    let Some(job_dir) = berth_pbs::launch::job_dir(config, &id) else { return native(config, shell, shell_args, &job, caller, limits) };
    if let Ok(line) = std::fs::read_to_string(job_dir.prologue_error()) {
        return StarterError::PrologueFailed(line.trim_end().to_string());
    }
    // The job's own container only: one whose user is the job's.
    let dir = match job_dir.container(container::PER_NODE) {
        Ok(dir) => dir,
        Err(_) => return native(config, shell, shell_args, &job, caller, limits),
    };
    let ours = dir.mnt().exists()
        && container::list(config, Some(&id)).is_ok_and(|list| list.iter().any(|c| c.name == container::PER_NODE && c.uid == job.uid.as_raw()));
    if !ours {
        return native(config, shell, shell_args, &job, caller, limits);
    }
    let mut command = privileged::command(&config.berth_binary, &crate::hooks::berth_env(caller, false));
    command.args(["container", "exec", "--job", &id]);
    // The job's environment, for the job's program alone.
    if let Err(e) = hand_on(caller, &mut command) {
        return StarterError::Exec { program: config.berth_binary.display().to_string(), source: e.into() };
    }
    if job_dir.remap_root().exists() {
        command.arg("--remap-root");
    }
    for (name, value) in image_values(&job_dir, &dir) {
        let mut entry = name;
        entry.push("=");
        entry.push(value);
        command.arg("--env").arg(entry);
    }
    if dir.wiring_record().exists() {
        command.args(["--env", &format!("PBS_NODEFILE={}", files::path("hostfile"))]);
    }
    command.arg("--").arg(shell).args(shell_args);
    if let Some((script, _, script_args)) = job.script {
        // The script is stdin now; the shell moves it to fd 9, gives the job /dev/null as
        // stdin (as pbs_mom's drained pipe would be; mpirun would otherwise eat the rest
        // of the script) and sources it through the fd, which works across the mount
        // namespace. Needs a POSIX shell (sh, bash, ksh, zsh).
        if let Err(e) = nix::unistd::dup2(script.as_raw_fd(), 0) {
            return StarterError::Stdin(e);
        }
        let source = if script_args.is_empty() { SOURCE } else { SOURCE_WITH_ARGS };
        command.args(["-c", source, shell]).args(script_args);
    }
    if let Some(limits) = limits {
        if let Err(e) = limits.give_back() {
            return StarterError::Limits(e);
        }
    }
    let source = command.exec();
    StarterError::Exec { program: config.berth_binary.display().to_string(), source }
}

/// The job and its user from stdin: pbs_mom's pipe with the script's name (batch), or
/// the job's terminal (interactive).
fn identify(caller: &Caller) -> Result<Job, StarterError> {
    use nix::sys::stat::{fstat, SFlag};
    let stdin = fstat(0).map_err(|_| StarterError::NoJob)?;
    let kind = SFlag::from_bits_truncate(stdin.st_mode) & SFlag::S_IFMT;
    if kind == SFlag::S_IFIFO {
        let (line, path, script_args) = script_line()?;
        // Only the mom's own copy of a job script (mom_priv/jobs/*.SC) is opened as root.
        let name = path.rsplit('/').next().unwrap_or("");
        let id = name.strip_suffix(".SC").filter(|_| path.contains("/mom_priv/jobs/")).ok_or_else(|| StarterError::ScriptName(format!("'{path}' is not a script in mom_priv/jobs")))?;
        let script = std::fs::File::open(&path).map_err(|source| StarterError::Script { path: path.clone(), source })?;
        berth_pbs::launch::check_script(&script).map_err(|why| StarterError::Script { path: path.clone(), source: std::io::Error::other(why) })?;
        let owner = fstat(script.as_raw_fd()).map_err(|e| StarterError::Script { path: path.clone(), source: e.into() })?.st_uid;
        let id = runtime::check_name("job", id).ok().map(|()| id.to_string());
        return Ok(Job { id, uid: Uid::from_raw(owner), script: Some((script, line, script_args)) });
    }
    if kind == SFlag::S_IFCHR && nix::unistd::isatty(0).unwrap_or(false) {
        return Ok(Job { id: caller.var_string("PBS_JOBID"), uid: Uid::from_raw(stdin.st_uid), script: None });
    }
    Err(StarterError::NoJob)
}

/// The image's values of the names the job listed with `container-env` (recorded by
/// the prologue), which must win over the job's own.
fn image_values(job: &JobDir, dir: &ContainerDir) -> Vec<env::Var> {
    let Ok(names) = std::fs::read_to_string(job.container_env()) else { return Vec::new() };
    let image = std::fs::read(dir.env()).map(|bytes| env::decode(&bytes)).unwrap_or_default();
    let names: Vec<&str> = names.lines().collect();
    image.into_iter().filter(|(name, _)| names.iter().any(|n| name == n)).collect()
}

/// Reads `[exec ]PATH [ARGS]` from stdin: the line as sent, PATH and ARGS.
fn script_line() -> Result<(Vec<u8>, String, Vec<String>), StarterError> {
    let line = berth_pbs::launch::read_script_line().map_err(|e| StarterError::ScriptName(e.to_string()))?;
    let text = String::from_utf8_lossy(&line).into_owned();
    let mut words = text.split_whitespace();
    let path = match words.next() {
        Some("exec") => words.next(),
        other => other,
    }
    .ok_or_else(|| StarterError::ScriptName("nothing arrived".into()))?
    .to_string();
    Ok((line, path, words.map(String::from).collect()))
}

/// The shell as pbs_mom would start it without a starter (a login shell, `-bash`, as
/// `$source_login_batch` defaults to), as the job user, with the job's environment and
/// limits, reading the line pbs_mom sent. As root through `berth as-user`: this static
/// binary cannot look users up (glibc's NSS modules need the dynamic loader).
fn native(config: &Config, shell: &str, args: &[String], job: &Job, caller: &Caller, limits: Option<&Limits>) -> StarterError {
    let argv0 = format!("-{}", shell.rsplit('/').next().unwrap_or(shell));
    if let Some((_, line, _)) = &job.script {
        if let Err(e) = refeed_stdin(line) {
            return StarterError::Stdin(e);
        }
    }
    let mut command = if nix::unistd::geteuid().is_root() {
        let mut command = privileged::command(&config.berth_binary, &crate::hooks::berth_env(caller, false));
        // pbs_mom chose the job's directory; the shell starts there.
        command.current_dir(std::env::current_dir().unwrap_or_else(|_| "/".into()));
        command.args(["as-user".to_string(), format!("--uid={}", job.uid.as_raw()), format!("--arg0={argv0}")]);
        if let Err(e) = hand_on(caller, &mut command) {
            return StarterError::Exec { program: config.berth_binary.display().to_string(), source: e.into() };
        }
        command.arg("--").arg(shell).args(args);
        command
    } else {
        let mut command = std::process::Command::new(shell);
        command.arg0(argv0).args(args).env_clear().envs(caller.env.iter().map(|(k, v)| (k, v)));
        command
    };
    if let Some(limits) = limits {
        if let Err(e) = limits.give_back() {
            return StarterError::Limits(e);
        }
    }
    let source = command.exec();
    StarterError::Exec { program: format!("{:?}", command.get_program()), source }
}

/// The starter unprivileged (without `$job_starter_run_privileged`, as docs/admin.md
/// installs it): it runs as the job's user, who may not read the runtime dir, and
/// pbs_mom's chroot into a job root dir (`qsub -D`) has no root program to misuse. When
/// berth made anything for the job on this node (its runtime dir), the setuid
/// `berth-pbs-enter` beside this binary takes the shell: it trusts root's records only,
/// and enters the job's container as its user or prints the prologue's failure line.
/// The job id is the script's name; a wrong one gets the launcher's refusal, never
/// another user's container.
fn through_launcher(config: &Config, shell: &str, args: &[String], job: &Job, id: &str, caller: &Caller) -> StarterError {
    if !berth_pbs::launch::job_dir(config, id).is_some_and(|dir| dir.exists()) {
        return native(config, shell, args, job, caller, None);
    }
    if let Some((_, line, _)) = &job.script {
        if let Err(e) = refeed_stdin(line) {
            return StarterError::Stdin(e);
        }
    }
    let launcher = match std::env::current_exe() {
        Ok(exe) => exe.with_file_name(LAUNCHER),
        Err(source) => return StarterError::Exec { program: LAUNCHER.into(), source },
    };
    // A login name, as pbs_mom gives the job's shell: the launcher takes the script
    // line from stdin for it.
    let argv0 = format!("-{}", shell.rsplit('/').next().unwrap_or(shell));
    let mut command = std::process::Command::new(&launcher);
    command.arg0(argv0).args(["--job", id, "--", shell]).args(args).env_clear();
    command.envs(berth_pbs::launch::with_kept(&caller.env));
    let source = command.exec();
    StarterError::Exec { program: launcher.display().to_string(), source }
}

/// The setuid launcher, installed beside `berth-pbs`.
const LAUNCHER: &str = "berth-pbs-enter";

/// Passes the job's environment to `berth` as `--job-env-fd`.
fn hand_on(caller: &Caller, command: &mut std::process::Command) -> Result<(), nix::errno::Errno> {
    if let Some(fd) = &caller.fd {
        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()))?;
        command.args(["--job-env-fd", &fd.as_raw_fd().to_string()]);
    }
    Ok(())
}

/// Makes stdin a pipe holding `line` and a newline, as pbs_mom's was before the
/// starter read it (pbs_mom writes that one line and closes its end).
fn refeed_stdin(line: &[u8]) -> Result<(), nix::errno::Errno> {
    let (read, write): (OwnedFd, OwnedFd) = nix::unistd::pipe()?;
    let mut bytes = line.to_vec();
    bytes.push(b'\n');
    // One line of at most 64 KiB: it fits the pipe.
    let mut written = 0;
    while written < bytes.len() {
        written += nix::unistd::write(write.as_fd(), &bytes[written..])?;
    }
    drop(write);
    nix::unistd::dup2(read.as_raw_fd(), 0)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_names_take_the_images_values_when_it_has_them() {
        let root = std::env::temp_dir().join(format!("berth-pbs-starter-{}", std::process::id()));
        let job = runtime::RuntimeDir::at(&root).job("7.head").unwrap();
        let dir = job.container("node").unwrap();
        std::fs::create_dir_all(dir.path()).unwrap();
        let image: Vec<env::Var> = vec![("HOME".into(), "/opt/app".into()), ("PATH".into(), "/opt/app/bin".into())];
        std::fs::write(dir.env(), env::encode(&image)).unwrap();
        assert!(image_values(&job, &dir).is_empty(), "no names listed");
        std::fs::write(job.container_env(), "HOME\nOMPI_MCA_x\n").unwrap();
        let got = image_values(&job, &dir);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(got, vec![("HOME".into(), "/opt/app".into())]);
    }
}
