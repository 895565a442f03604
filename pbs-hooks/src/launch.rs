//! `berth-pbs-enter`: the program OpenPBS's execjob_launch hook puts in place of a
//! container job's shell and of its TM tasks. pbs_mom execs it as the JOB USER (not
//! root), so it is installed setuid root, and therefore any local user can run it at any
//! time with any arguments, environment, descriptors, limits and working directory.
//! Its whole power is: let the caller run a program AS THEMSELVES inside THEIR OWN
//! job's container on this node, which they could reach anyway (the job's shell runs
//! there). Everything it trusts is root's: the admin config (a root-owned file) and
//! the container record `berth container create` left in the root-only runtime dir,
//! whose user must be the caller's REAL uid ([`berth_engine::container::join_own`]).
//! The job id, the program and the environment are the caller's and steer nothing but
//! which of the caller's containers is entered and what runs there as the caller.
//!
//! Order, as root: the environment is taken as data and removed; cwd `/`, umask 022,
//! root's own limits, every inherited descriptor above 2 closed on exec; the config;
//! a failure the begin hook recorded for this caller's job is printed (the job's error
//! file) and the launch fails; else the job script is opened by a child that has become
//! the caller (top shell only), the container joined, and `exec_joined` drops to
//! the container's user (the caller) for good before exec'ing.
//!
//! Owns the launch and the begin hook's failure record; never creates, destroys or pulls.

use berth_engine::config::Config;
use berth_engine::container::{self, env, ContainerError};
use berth_engine::identity::{Credentials, UserError};
use berth_engine::privileged::Limits;
use berth_engine::runtime::{self, JobDir, RuntimeDir, RuntimeError};
use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// A setuid program's C library drops the variables it deems unsafe (`LD_PRELOAD`,
/// `LD_LIBRARY_PATH`, `TMPDIR`, `MALLOC_*`, ...) before `main`; the job's program must
/// still get them. So the launch hook also passes each such `NAME` as
/// `BERTH_PBS_ENV_NAME`, and the launcher hands it on as `NAME` to the job's program
/// only (it is the caller's own data either way).
pub const KEPT_PREFIX: &str = "BERTH_PBS_ENV_";

/// glibc's unsecure variables (`unsecvars.h`), by prefix where it has families: what a
/// setuid program's C library drops before `main`.
const DROPPED_BY_SETUID: &[&str] = &[
    "LD_", "MALLOC_", "GLIBC_", "GCONV_PATH", "GETCONF_DIR", "HOSTALIASES", "LOCALDOMAIN", "LOCPATH", "NIS_PATH", "NLSPATH", "RESOLV_HOST_CONF",
    "RES_OPTIONS", "TMPDIR", "TZDIR",
];

/// The job's environment as the launcher's caller passes it: each variable glibc drops
/// for a setuid program also as `BERTH_PBS_ENV_NAME`, which [`restore_kept`] gives back.
pub fn with_kept(vars: &[env::Var]) -> Vec<env::Var> {
    let mut out = vars.to_vec();
    for (name, value) in vars {
        if name.to_str().is_some_and(|n| DROPPED_BY_SETUID.iter().any(|d| n.starts_with(d))) {
            let mut kept = OsString::from(KEPT_PREFIX);
            kept.push(name);
            out.push((kept, value.clone()));
        }
    }
    out
}

/// The job's environment with the kept names restored.
pub fn restore_kept(vars: Vec<env::Var>) -> Vec<env::Var> {
    let mut kept: Vec<env::Var> = Vec::new();
    let mut plain: Vec<env::Var> = Vec::new();
    for (name, value) in vars {
        match name.to_str().and_then(|n| n.strip_prefix(KEPT_PREFIX)).filter(|n| !n.is_empty()) {
            Some(original) => kept.push((original.into(), value)),
            None => plain.push((name, value)),
        }
    }
    plain.retain(|(name, _)| !kept.iter().any(|(k, _)| k == name));
    plain.extend(kept);
    plain
}

/// The top shell's script arrives as a path on stdin; the shell sources it from fd 9
/// (the path is the node's, absent in the container). As the Torque job starter does.
const SOURCE: &str = "exec 9<&0 </dev/null; . /proc/self/fd/9";
const SOURCE_WITH_ARGS: &str = "exec 9<&0 </dev/null; . /proc/self/fd/9 \"$@\"";

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("usage: berth-pbs-enter --job JOBID -- PROGRAM [ARGS...] (run by the OpenPBS execjob_launch hook and the Torque job starter)")]
    Usage,
    #[error("is not setuid root: install it owned by root, mode 4755, on a file system without nosuid (docs/admin.md)")]
    NotSetuid,
    #[error("starts no job as root")]
    RootCaller,
    #[error(transparent)]
    Config(#[from] berth_engine::config::ConfigError),
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("{0}")]
    Recorded(String),
    #[error("cannot read the job script's name that pbs_mom sends on stdin: {0}")]
    ScriptName(String),
    #[error("cannot open the job script {path} as you: {why}")]
    Script { path: String, why: String },
    #[error("cannot set up the launch ({step}): {source}")]
    Setup { step: &'static str, source: std::io::Error },
}

impl LaunchError {
    /// The exit status: the program's conventions (125 when berth failed before it).
    pub fn status(&self) -> u8 {
        match self {
            LaunchError::Container(ContainerError::NoProgram { .. }) => 127,
            LaunchError::Container(ContainerError::Exec { .. }) => 126,
            LaunchError::Recorded(_) => 1,
            _ => 125,
        }
    }
}

/// What the caller asked for. No config file: any user may start this program, and a
/// root-owned file is no sign of the admin's (every file of a pulled image is one; a
/// config naming such a dir as `runtime_dir` would make the image's files the
/// container records): the launcher reads `/etc/berth/berth.toml` only.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub job: String,
    pub program: Vec<OsString>,
    /// pbs_mom starts the job's top shell with argv[0] `-NAME` (a login shell).
    pub top_shell: bool,
}

/// The name berth keeps an OpenPBS job under. Array subjobs are `12[3].server`, and
/// berth's job names are `[A-Za-z0-9._-]`, so the brackets become `_` (`12_3_.server`),
/// which no PBS job id is itself.
pub fn runtime_job(id: &str) -> String {
    id.replace(['[', ']'], "_")
}

/// Parses `argv` (argv[0] included).
pub fn parse(argv: &[OsString]) -> Result<Request, LaunchError> {
    let (first, rest) = argv.split_first().ok_or(LaunchError::Usage)?;
    let top_shell = first.as_encoded_bytes().first() == Some(&b'-');
    let mut job = None;
    let mut words = rest.iter();
    loop {
        match words.next().and_then(|w| w.to_str()) {
            Some("--job") => job = Some(runtime_job(words.next().and_then(|w| w.to_str()).ok_or(LaunchError::Usage)?)),
            Some("--") => break,
            _ => return Err(LaunchError::Usage),
        }
    }
    let program: Vec<OsString> = words.cloned().collect();
    let job = job.ok_or(LaunchError::Usage)?;
    runtime::check_name("job id", &job)?;
    if program.is_empty() {
        return Err(LaunchError::Usage);
    }
    Ok(Request { job, program, top_shell })
}

/// Enters and execs; returns only the error. `argv` and `vars` are the process's own.
pub fn launch(argv: Vec<OsString>, vars: Vec<env::Var>) -> LaunchError {
    let euid = nix::unistd::geteuid();
    let caller = nix::unistd::getuid();
    if !euid.is_root() {
        return LaunchError::NotSetuid;
    }
    if caller.is_root() {
        return LaunchError::RootCaller;
    }
    // The caller's environment is data for the job's program; nothing of root's reads it.
    for (name, _) in &vars {
        std::env::remove_var(name);
    }
    let setup = |step| move |e: nix::errno::Errno| LaunchError::Setup { step, source: e.into() };
    if let Err(e) = nix::unistd::chdir("/").map_err(setup("chdir /")) {
        return e;
    }
    let umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let limits = Limits::for_root();
    if let Err(e) = berth_engine::sys::cloexec_from(3).map_err(setup("close inherited descriptors")) {
        return e;
    }
    let vars = restore_kept(vars);
    let request = match parse(&argv) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let config = match Config::load_from(None) {
        Ok(c) => c,
        Err(e) => return e.into(),
    };
    if let Some(line) = recorded_failure(&config, &request.job, caller.as_raw()) {
        return LaunchError::Recorded(line);
    }
    let script = match request.top_shell && stdin_is_pipe() {
        true => match open_script(&config) {
            Ok(s) => Some(s),
            Err(e) => return e,
        },
        false => None,
    };
    // What the begin hook recorded beside the container, read on the host (join leaves
    // it); it only shapes the caller's own program's environment.
    let (job_dir, node) = match RuntimeDir::of(&config).job(&request.job).and_then(|job| Ok((job.clone(), job.container(container::PER_NODE)?))) {
        Ok(dirs) => dirs,
        Err(e) => return e.into(),
    };
    let remap_root = job_dir.remap_root().exists();
    let listed = std::fs::read_to_string(job_dir.container_env()).unwrap_or_default();
    let wired = node.wiring_record().exists();
    let mut joined = match container::join_own(&config, &request.job, container::PER_NODE, caller.as_raw()) {
        Ok(j) => j,
        Err(e) => return e.into(),
    };
    if let Err(e) = joined.choose_inside(&config, remap_root) {
        return e.into();
    }
    let mut overrides: Vec<String> = image_values(&listed, &joined.env);
    if wired {
        overrides.push(format!("PBS_NODEFILE={}", berth_engine::wiring::files::path("hostfile")));
    }
    let mut program: Vec<String> = request.program.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    if let Some((file, args)) = script {
        if let Err(e) = nix::unistd::dup2(file.as_raw_fd(), 0).map_err(setup("give the shell the script")) {
            return e;
        }
        let shell = program[0].clone();
        let source = if args.is_empty() { SOURCE } else { SOURCE_WITH_ARGS };
        program = [shell.clone(), "-c".into(), source.into(), shell].into_iter().chain(args).collect();
    }
    if let Err(source) = limits.give_back() {
        return LaunchError::Setup { step: "give the job its limits back", source };
    }
    nix::sys::stat::umask(umask);
    container::exec_joined(&joined, &program, &vars, &overrides).into()
}

/// pbs_mom's one line on the shell's stdin (`[exec ]PATH [ARGS]`, at most 64 KiB),
/// read a byte at a time so that nothing after it is taken from the pipe.
pub fn read_script_line() -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    let mut stdin = std::io::stdin().lock();
    while line.len() < 64 * 1024 {
        match stdin.read(&mut byte)? {
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
    }
    Ok(line)
}

fn stdin_is_pipe() -> bool {
    use nix::sys::stat::{fstat, SFlag};
    fstat(0).is_ok_and(|s| SFlag::from_bits_truncate(s.st_mode) & SFlag::S_IFMT == SFlag::S_IFIFO)
}

/// Reads pbs_mom's `PATH [ARGS]` line from stdin and opens PATH as the caller: in a
/// child that has fully become the caller (`open_as_user`), never with root's rights.
/// Not with the caller's fsuid alone either: that keeps CAP_SYS_PTRACE, which opens
/// another user's `/proc/PID/cwd/...` and `/proc/PID/ns/*`, and CAP_SYSLOG, for which
/// `/proc/kallsyms` shows the kernel's addresses to whoever opened it.
fn open_script(config: &Config) -> Result<(std::fs::File, Vec<String>), LaunchError> {
    let line = read_script_line().map_err(|e| LaunchError::ScriptName(e.to_string()))?;
    let words = shell_words(&String::from_utf8_lossy(&line));
    let mut words = words.into_iter();
    let path = match words.next() {
        Some(first) if first == "exec" => words.next(),
        other => other,
    }
    .ok_or_else(|| LaunchError::ScriptName("nothing arrived".into()))?;
    let failed = |why: String| LaunchError::Script { path: path.clone(), why };
    let opened = Credentials::current().open_as_user(&[PathBuf::from(&path)], config.user_child_timeout()).map_err(|e| match e {
        UserError::Denied { source, .. } => failed(std::io::Error::from(source).to_string()),
        e => failed(e.to_string()),
    })?;
    let file = std::fs::File::from(opened.into_iter().next().ok_or_else(|| failed("nothing was opened".into()))?);
    check_script(&file).map_err(failed)?;
    Ok((file, words.collect()))
}

/// What a job script may be: a regular file of a file system that holds files. Not a
/// device, FIFO or directory, and not a "regular" file of the kernel's own interfaces
/// (procfs, nsfs, sysfs, ...), which are views of processes, namespaces and the kernel
/// that may check who opened them.
pub fn check_script(file: &std::fs::File) -> Result<(), String> {
    use nix::sys::statfs::{self, fstatfs};
    let kernel = [
        (statfs::PROC_SUPER_MAGIC, "proc"),
        (statfs::NSFS_MAGIC, "nsfs"),
        (statfs::SYSFS_MAGIC, "sysfs"),
        (statfs::DEBUGFS_MAGIC, "debugfs"),
        (statfs::TRACEFS_MAGIC, "tracefs"),
        (statfs::SECURITYFS_MAGIC, "securityfs"),
        (statfs::SELINUX_MAGIC, "selinuxfs"),
        (statfs::SMACK_MAGIC, "smackfs"),
        (statfs::BPF_FS_MAGIC, "bpf"),
        (statfs::CGROUP_SUPER_MAGIC, "cgroup"),
        (statfs::CGROUP2_SUPER_MAGIC, "cgroup2"),
        (statfs::RDTGROUP_SUPER_MAGIC, "resctrl"),
    ];
    let is_file = file.metadata().map_err(|e| e.to_string())?.is_file();
    if !is_file {
        return Err("not a regular file".into());
    }
    let kind = fstatfs(file).map_err(|e| std::io::Error::from(e).to_string())?.filesystem_type();
    match kernel.iter().find(|(magic, _)| *magic == kind) {
        Some((_, name)) => Err(format!("not a regular file (a file of the kernel's {name} file system)")),
        None => Ok(()),
    }
}

/// The words of pbs_mom's line as the shell would split them: pbs_mom escapes the
/// shell's special characters with `\` (an array subjob's script is `12\[3\].head.SC`).
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    word.get_or_insert_with(String::new).push(next);
                }
            }
            c if c.is_whitespace() => words.extend(word.take()),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    words
}

/// The image's values of the names the job listed with `container-env` (recorded by
/// the begin hook), which beat the job's own.
fn image_values(listed: &str, image: &[env::Var]) -> Vec<String> {
    let names: Vec<&str> = listed.lines().filter(|l| !l.is_empty()).collect();
    image
        .iter()
        .filter(|(name, _)| names.iter().any(|n| name == n))
        .map(|(name, value)| {
            let mut entry = name.clone();
            entry.push("=");
            entry.push(value);
            entry.to_string_lossy().into_owned()
        })
        .collect()
}

/// The job's dir in the runtime dir; `None` for a job id that cannot name one.
pub fn job_dir(config: &Config, job: &str) -> Option<JobDir> {
    RuntimeDir::of(config).job(job).ok()
}

/// Records the begin hook's failure line for the launch, in the job's runtime dir
/// (made root's alone, as create's, when missing).
pub fn record_failure(config: &Config, job: &str, uid: u32, line: &str) -> std::io::Result<()> {
    let dir = job_dir(config, job).ok_or_else(|| std::io::Error::other("bad job id"))?;
    dir.ensure()?;
    write_record(&dir.launch_error(), format!("{uid}\n{}\n", line.trim_end()).as_bytes())
}

/// A hook's note in the job's root-only runtime dir: root's, 0600, whole or absent,
/// never written through a link, whatever umask pbs_mom gave.
pub fn write_record(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    berth_engine::fsmode::replace_whole(path, bytes, 0o600)
}

/// The recorded failure line of `job`, only when root alone wrote it and it is `uid`'s.
pub fn recorded_failure(config: &Config, job: &str, uid: u32) -> Option<String> {
    use std::io::Read;
    let path = job_dir(config, job)?.launch_error();
    let mut file = berth_engine::privileged::open_root_owned(&path).ok()?;
    let mut text = Vec::new();
    file.by_ref().take(64 * 1024).read_to_end(&mut text).ok()?;
    let text = String::from_utf8(text).ok()?;
    let (owner, line) = text.split_once('\n')?;
    (owner.trim().parse::<u32>().ok()? == uid).then(|| line.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_top_shell_is_told_by_its_login_argv0() {
        let top = parse(&os(&["-berth-pbs-enter", "--job", "7.head", "--", "/bin/bash"])).unwrap();
        assert!(top.top_shell);
        assert_eq!((top.job.as_str(), top.program.len()), ("7.head", 1));
        let task = parse(&os(&["/x/berth-pbs-enter", "--job", "7.head", "--", "/bin/echo", "a b"])).unwrap();
        assert!(!task.top_shell);
        assert!(matches!(parse(&os(&["e", "--config", "/etc/b.toml", "--job", "7.head", "--", "/bin/sh"])), Err(LaunchError::Usage)), "no config of the caller's");
        assert_eq!(task.program, os(&["/bin/echo", "a b"]));
    }

    #[test]
    fn kept_names_come_back_for_the_jobs_program() {
        let vars: Vec<env::Var> = vec![
            ("PATH".into(), "/bin".into()),
            ("BERTH_PBS_ENV_LD_LIBRARY_PATH".into(), "/opt/lib".into()),
            ("TMPDIR".into(), "/stale".into()),
            ("BERTH_PBS_ENV_TMPDIR".into(), "/var/tmp/pbs.7.head".into()),
            ("BERTH_PBS_ENV_".into(), "x".into()),
        ];
        let got = restore_kept(vars);
        let want: Vec<env::Var> = vec![
            ("PATH".into(), "/bin".into()),
            ("BERTH_PBS_ENV_".into(), "x".into()),
            ("LD_LIBRARY_PATH".into(), "/opt/lib".into()),
            ("TMPDIR".into(), "/var/tmp/pbs.7.head".into()),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn the_script_line_is_split_and_unescaped_as_the_shell_would() {
        assert_eq!(shell_words("/spool/jobs/18\\[2\\].head.SC a\\ b  c\n"), ["/spool/jobs/18[2].head.SC", "a b", "c"]);
        assert_eq!(shell_words("exec /spool/jobs/7.head.SC"), ["exec", "/spool/jobs/7.head.SC"]);
        assert!(shell_words("  ").is_empty());
    }

    #[test]
    fn a_script_is_a_regular_file_of_a_file_system_never_a_view_of_the_kernel() {
        let path = std::env::temp_dir().join(format!("berth-launch-script-{}", std::process::id()));
        std::fs::write(&path, "echo hi\n").unwrap();
        let regular = check_script(&std::fs::File::open(&path).unwrap());
        std::fs::remove_file(&path).unwrap();
        assert_eq!(regular, Ok(()));
        let open = |p: &str| std::fs::File::open(p).unwrap();
        assert_eq!(check_script(&open("/proc/self/status")).unwrap_err(), "not a regular file (a file of the kernel's proc file system)");
        assert_eq!(check_script(&open("/proc/self/ns/mnt")).unwrap_err(), "not a regular file (a file of the kernel's nsfs file system)");
        assert_eq!(check_script(&open("/dev/null")).unwrap_err(), "not a regular file");
        assert_eq!(check_script(&open("/")).unwrap_err(), "not a regular file");
    }

    #[test]
    fn array_subjobs_get_a_plain_name() {
        assert_eq!(runtime_job("12[3].head"), "12_3_.head");
        assert_eq!(runtime_job("12.head"), "12.head");
        let sub = parse(&os(&["e", "--job", "12[3].head", "--", "/bin/sh"])).unwrap();
        assert_eq!(sub.job, "12_3_.head");
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(matches!(parse(&os(&["e", "--job", "7.head"])), Err(LaunchError::Usage)));
        assert!(matches!(parse(&os(&["e", "--job", "7.head", "--"])), Err(LaunchError::Usage)));
        assert!(matches!(parse(&os(&["e", "--", "/bin/sh"])), Err(LaunchError::Usage)));
        assert!(matches!(parse(&os(&["e", "--job", "../7", "--", "/bin/sh"])), Err(LaunchError::Runtime(RuntimeError::BadName { .. }))));
        assert!(matches!(parse(&os(&["e", "--jobs", "7", "--", "/bin/sh"])), Err(LaunchError::Usage)));
    }

    #[test]
    fn a_recorded_failure_reaches_only_its_own_user() {
        if !berth_engine::privileged::is_root() {
            return;
        }
        let root = PathBuf::from(format!("/run/berth-launch-test-{}", std::process::id()));
        let config = Config { runtime_dir: root.clone(), ..Config::default() };
        record_failure(&config, "9.head", 1000, "berth-pbs begin: job 9.head: bad image\n").unwrap();
        assert_eq!(recorded_failure(&config, "9.head", 1000).as_deref(), Some("berth-pbs begin: job 9.head: bad image"));
        assert_eq!(recorded_failure(&config, "9.head", 1001), None, "another user's job");
        assert_eq!(recorded_failure(&config, "8.head", 1000), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
