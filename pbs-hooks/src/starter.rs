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
//! Never creates anything; what the prologue did not make does not exist.

use berth_engine::config::{Config, ConfigError};
use berth_engine::container::{self, env, ContainerError};
use berth_engine::wiring::files;
use nix::unistd::{Gid, Uid, User};
use std::os::unix::process::CommandExt;
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum StarterError {
    #[error("no shell to start: pbs_mom runs the job starter as `STARTER SHELL ...`; set $job_starter to this binary")]
    NoShell,
    #[error("PBS_JOBID is not set: this binary is pbs_mom's $job_starter, not a command")]
    NoJob,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error("job {job} has a container but the job starter is not root: add `$job_starter_run_privileged true` to mom_priv/config")]
    NotRoot { job: String },
    #[error("no user '{user}' on this node")]
    NoUser { user: String },
    #[error("cannot become user {user}: {step}: {source}")]
    Become { user: String, step: &'static str, source: nix::errno::Errno },
    #[error("{0}")]
    PrologueFailed(String),
    #[error("cannot read the job script's name that pbs_mom sends on stdin: {0}")]
    ScriptName(String),
    #[error("cannot open the job script {path}: {source}")]
    Script { path: String, source: std::io::Error },
    #[error("cannot exec {program}: {source}")]
    Exec { program: String, source: std::io::Error },
}

const SOURCE: &str = "exec 9<&0 </dev/null; . /proc/self/fd/9";
const SOURCE_WITH_ARGS: &str = "exec 9<&0 </dev/null; . /proc/self/fd/9 \"$@\"";

/// Replaces this process with the job's shell; returns only on failure.
pub fn start(config: &Config, args: &[String]) -> StarterError {
    let Some((shell, shell_args)) = args.split_first() else { return StarterError::NoShell };
    let Ok(job) = std::env::var("PBS_JOBID") else { return StarterError::NoJob };
    let dir = match container::container_dir(config, &job, container::PER_NODE) {
        Ok(dir) => dir,
        Err(e) => return e.into(),
    };
    if let Some(line) = crate::hooks::failure_file(config, &job).and_then(|f| std::fs::read_to_string(f).ok()) {
        return StarterError::PrologueFailed(line.trim_end().to_string());
    }
    if !dir.join("mnt").exists() {
        return native(shell, shell_args);
    }
    if !nix::unistd::geteuid().is_root() {
        return StarterError::NotRoot { job };
    }
    let script_args = match script_on_stdin() {
        Ok(args) => args,
        Err(e) => return e,
    };
    let mut command = Command::new(&config.berth_binary);
    command.args(["container", "exec", "--job", &job]);
    if crate::hooks::remap_root_file(config, &job).is_some_and(|f| f.exists()) {
        command.arg("--remap-root");
    }
    for (name, value) in image_values(config, &job, &dir) {
        let mut entry = name;
        entry.push("=");
        entry.push(value);
        command.arg("--env").arg(entry);
    }
    if dir.join("wiring.json").exists() {
        command.args(["--env", &format!("PBS_NODEFILE={}", files::path("hostfile"))]);
    }
    // The script is stdin now; the shell moves it to fd 9, gives the job /dev/null as
    // stdin (as pbs_mom's drained pipe would be; mpirun would otherwise eat the rest
    // of the script) and sources it through the fd, which works across the mount
    // namespace. Needs a POSIX shell (sh, bash, ksh, zsh).
    let source = if script_args.is_empty() { SOURCE } else { SOURCE_WITH_ARGS };
    command.arg("--").arg(shell).args(shell_args).args(["-c", source, shell]).args(script_args);
    let source = command.exec();
    StarterError::Exec { program: config.berth_binary.display().to_string(), source }
}

/// The image's values of the names the job listed with `container-env` (recorded by
/// the prologue), which must win over the job's own.
fn image_values(config: &Config, job: &str, dir: &std::path::Path) -> Vec<env::Var> {
    let Some(names) = crate::hooks::image_env_file(config, job).and_then(|f| std::fs::read_to_string(f).ok()) else { return Vec::new() };
    let image = std::fs::read(dir.join("env")).map(|bytes| env::decode(&bytes)).unwrap_or_default();
    let names: Vec<&str> = names.lines().collect();
    image.into_iter().filter(|(name, _)| names.iter().any(|n| name == n)).collect()
}

/// Reads `[exec ]PATH [ARGS]` from stdin, makes the script at PATH the new stdin and
/// returns ARGS.
fn script_on_stdin() -> Result<Vec<String>, StarterError> {
    use std::io::Read;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    let mut stdin = std::io::stdin().lock();
    while line.len() < 64 * 1024 {
        match stdin.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(StarterError::ScriptName(e.to_string())),
        }
    }
    drop(stdin);
    let line = String::from_utf8_lossy(&line).into_owned();
    let mut words = line.split_whitespace();
    let path = match words.next() {
        Some("exec") => words.next(),
        other => other,
    }
    .ok_or_else(|| StarterError::ScriptName("nothing arrived".into()))?
    .to_string();
    // Only the mom's own copy of a job script (mom_priv/jobs/*.SC) is opened as root.
    if !(path.contains("/mom_priv/jobs/") && path.ends_with(".SC")) {
        return Err(StarterError::ScriptName(format!("'{path}' is not a script in mom_priv/jobs")));
    }
    let script = std::fs::File::open(&path).map_err(|source| StarterError::Script { path: path.clone(), source })?;
    nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&script), 0)
        .map_err(|e| StarterError::Script { path: path.clone(), source: e.into() })?;
    Ok(words.map(String::from).collect())
}

/// The shell as pbs_mom would start it without a starter (a login shell, `-bash`, as
/// `$source_login_batch` defaults to), as the job user when started as root.
fn native(shell: &str, args: &[String]) -> StarterError {
    let argv0 = format!("-{}", shell.rsplit('/').next().unwrap_or(shell));
    if nix::unistd::geteuid().is_root() {
        if let Err(e) = become_job_user() {
            return e;
        }
    }
    let source = Command::new(shell).arg0(argv0).args(args).exec();
    StarterError::Exec { program: shell.to_string(), source }
}

/// The job's user is `$USER` in the job's environment (pbs_mom sets it to the euser).
fn become_job_user() -> Result<(), StarterError> {
    let name = std::env::var("USER").unwrap_or_default();
    let user = User::from_name(&name).ok().flatten().ok_or_else(|| StarterError::NoUser { user: name.clone() })?;
    let fail = |step, source| StarterError::Become { user: name.clone(), step, source };
    let cname = std::ffi::CString::new(name.as_bytes()).map_err(|_| StarterError::NoUser { user: name.clone() })?;
    let groups: Vec<Gid> = nix::unistd::getgrouplist(&cname, user.gid).map_err(|e| fail("getgrouplist", e))?;
    nix::unistd::setgroups(&groups).map_err(|e| fail("setgroups", e))?;
    nix::unistd::setresgid(user.gid, user.gid, user.gid).map_err(|e| fail("setresgid", e))?;
    let uid: Uid = user.uid;
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| fail("setresuid", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_names_take_the_images_values_when_it_has_them() {
        let root = std::env::temp_dir().join(format!("berth-pbs-starter-{}", std::process::id()));
        let config = Config { runtime_dir: root.clone(), ..Config::default() };
        let dir = root.join("7.head").join("node");
        std::fs::create_dir_all(&dir).unwrap();
        let image: Vec<env::Var> = vec![("HOME".into(), "/opt/app".into()), ("PATH".into(), "/opt/app/bin".into())];
        std::fs::write(dir.join("env"), env::encode(&image)).unwrap();
        assert!(image_values(&config, "7.head", &dir).is_empty(), "no names listed");
        std::fs::write(root.join("7.head").join("container-env"), "HOME\nOMPI_MCA_x\n").unwrap();
        let got = image_values(&config, "7.head", &dir);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(got, vec![("HOME".into(), "/opt/app".into())]);
    }
}
