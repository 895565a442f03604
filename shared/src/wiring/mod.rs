//! MPI wiring of a job's container on one node, so that `ssh NODE`, Open MPI's
//! `mpirun` and MPICH's `mpiexec` started in one node's container land in the other
//! nodes' containers of the same job.
//!
//! Owns what `<runtime_dir>/<job>/<name>/wiring/` holds (mounted read-only at
//! `/.berth/wiring` in the container: berth's OpenSSH, the job's keys and configs, the
//! hostfile), `wiring.json` and `sshd.log` beside it (their paths:
//! [`crate::runtime::ContainerDir`]), and the entries it adds to the container's
//! env file (`BERTH_HOSTFILE`, the MPI launchers' ssh) and to the container's
//! /etc/passwd, /etc/group and /etc/hosts (in its upper dir). Every node derives the
//! job's keys and port alone from the node's wiring secret ([`secrets`]), so nodes
//! need no channel between them.
//!
//! Must never write a file outside the container and the job's runtime dir (no user
//! file on the host), never run sshd as root or with capabilities, and never leave a
//! process that `container destroy` would not find (sshd and everything it starts live
//! in the container's mount namespace).

pub mod files;
mod inside;
pub mod openssh;
pub mod secrets;

use crate::config::{Config, ConfigError};
use crate::container::{self, env, ContainerError};
use crate::runtime::{ContainerDir, RuntimeDir, RuntimeError};
use files::Node;
use nix::errno::Errno;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long sshd may take to answer on its port.
const START_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum WiringError {
    #[error("berth's wiring secret {path} cannot be used: {why}")]
    Secret { path: PathBuf, why: String },
    #[error("cannot encode the job's ssh keys: {0}")]
    Key(String),
    #[error("{0}")]
    Request(String),
    #[error("cannot resolve node '{node}' on this node: {why}")]
    Resolve { node: String, why: String },
    #[error("port {port} (job {job}'s, from wiring_ports) is taken on this node: {source}; free it or widen wiring_ports")]
    PortTaken { port: u16, job: String, source: std::io::Error },
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("cannot {action}: {source}")]
    Sys { action: &'static str, source: Errno },
    #[error("berth's OpenSSH: {0}")]
    OpenSsh(String),
    #[error("in the container of job {job}: {why}")]
    Inside { job: String, why: String },
    #[error("sshd of job {job} did not start on port {port}: {why} (log: {log})")]
    Sshd { job: String, port: u16, why: String, log: PathBuf },
    #[error("job {job} is half wired (a wiring dir but no running sshd): destroy the job's container and create it again")]
    HalfWired { job: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

type Result<T, E = WiringError> = std::result::Result<T, E>;

/// What the scheduler adapters ask for: the job's nodes in allocation order (the
/// first is where the batch script runs) and each one's slots.
#[derive(Debug, Clone)]
pub struct Request {
    pub job: String,
    /// The container on this node ([`container::PER_NODE`] by default).
    pub name: String,
    pub nodes: Vec<String>,
    /// One per node; empty means one slot each.
    pub slots: Vec<u32>,
    /// The list may lack some of the job's nodes (a Torque sister's prologue knows only
    /// the mother superior and itself): route every other host name to the job's port
    /// too, resolved by the container's resolver.
    pub unlisted_nodes: bool,
}

/// What `wiring.json` records and `berth container wire` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Wired {
    pub job: String,
    pub name: String,
    pub port: u16,
    pub sshd_pid: i32,
    /// The hostfile's path inside the container (also `$BERTH_HOSTFILE` there).
    pub hostfile: String,
    pub nodes: Vec<String>,
    #[serde(default)]
    pub reused: bool,
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> WiringError + 'a {
    move |source| WiringError::Io { action, path: path.to_path_buf(), source }
}

/// Node names end up in ssh and sshd configs: host names only.
fn check_node(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(WiringError::Request(format!("bad node name '{name}': use a host name")))
    }
}

/// The job's nodes with their addresses (this node's resolver; IPv4 first) and slots.
pub fn resolve(request: &Request) -> Result<Vec<Node>> {
    if request.nodes.is_empty() {
        return Err(WiringError::Request("no nodes given".into()));
    }
    if !request.slots.is_empty() && request.slots.len() != request.nodes.len() {
        return Err(WiringError::Request(format!("{} nodes but {} slot counts", request.nodes.len(), request.slots.len())));
    }
    let counts = request.nodes.iter().enumerate().map(|(i, name)| (name.as_str(), u64::from(request.slots.get(i).copied().unwrap_or(1))));
    files::check_slots(counts).map_err(WiringError::Request)?;
    let mut seen = std::collections::HashSet::new();
    request
        .nodes
        .iter()
        .enumerate()
        .map(|(i, name)| {
            check_node(name)?;
            if !seen.insert(name) {
                return Err(WiringError::Request(format!("node '{name}' is listed twice")));
            }
            let slots = request.slots.get(i).copied().unwrap_or(1);
            if slots == 0 {
                return Err(WiringError::Request(format!("node '{name}' has 0 slots")));
            }
            let addrs: Vec<IpAddr> = (name.as_str(), 0)
                .to_socket_addrs()
                .map_err(|e| WiringError::Resolve { node: name.clone(), why: e.to_string() })?
                .map(|a| a.ip())
                .collect();
            let addr = addrs
                .iter()
                .find(|a| a.is_ipv4())
                .or(addrs.first())
                .copied()
                .ok_or_else(|| WiringError::Resolve { node: name.clone(), why: "no address".into() })?;
            Ok(Node { name: name.clone(), addr, slots })
        })
        .collect()
}

/// The container env with the wiring's entries: the hostfile, berth's ssh first on
/// PATH and as Open MPI's and MPICH's launcher.
fn wired_env(current: &[env::Var]) -> Vec<env::Var> {
    let ssh = files::path("bin/ssh");
    let bin = files::path("bin");
    let path = env::get(current, "PATH").map(|p| p.to_string_lossy().into_owned()).unwrap_or_else(|| env::DEFAULT_PATH.to_string());
    let mut vars: Vec<env::Var> = current.iter().filter(|(k, _)| !matches!(k.to_str(), Some("PATH"))).cloned().collect();
    let mut set = |k: &str, v: String| {
        vars.retain(|(key, _)| key != k);
        vars.push((k.into(), v.into()));
    };
    set("PATH", if path.split(':').any(|d| d == bin) { path } else { format!("{bin}:{path}") });
    set("BERTH_HOSTFILE", files::path("hostfile"));
    set("OMPI_MCA_plm_rsh_agent", ssh.clone());
    set("HYDRA_LAUNCHER", "ssh".into());
    set("HYDRA_LAUNCHER_EXEC", ssh);
    vars
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<()> {
    let mut file = crate::fsmode::create_file(path, mode).map_err(io("create", path))?;
    file.write_all(text.as_bytes()).map_err(io("write", path))
}

/// Whether `pid` runs in the mount namespace pinned at `mnt`.
fn runs_in(pid: i32, mnt: &Path) -> bool {
    let (Ok(ns), Ok(proc_ns)) = (std::fs::metadata(mnt), std::fs::metadata(format!("/proc/{pid}/ns/mnt"))) else { return false };
    (ns.dev(), ns.ino()) == (proc_ns.dev(), proc_ns.ino())
}

/// The host's name for the user, their group's, their home and shell.
fn host_identity(uid: u32, gid: u32) -> (String, String, String, String) {
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).ok().flatten();
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)).ok().flatten();
    (
        user.as_ref().map(|u| u.name.clone()).unwrap_or_else(|| format!("u{uid}")),
        group.map(|g| g.name).unwrap_or_else(|| format!("g{gid}")),
        user.as_ref().map(|u| u.dir.to_string_lossy().into_owned()).unwrap_or_else(|| "/".into()),
        user.map(|u| u.shell.to_string_lossy().into_owned()).unwrap_or_else(|| "/bin/sh".into()),
    )
}

/// Wires the job's container on this node: stages berth's OpenSSH, the job's keys,
/// configs and hostfile, attaches them at `/.berth/wiring`, adds the user and the nodes
/// to the container's files and its env, starts sshd as the job user on the job's port
/// and waits until it answers. Run on every node of the job after `container create`,
/// before the job's script. A second call while sshd runs returns it (`reused`).
pub fn wire(config: &Config, request: &Request) -> Result<Wired> {
    if !nix::unistd::geteuid().is_root() {
        return Err(ContainerError::NotRoot.into());
    }
    let job = RuntimeDir::of(config).job(&request.job)?;
    let dir = job.container(&request.name)?;
    let not_found = || ContainerError::NotFound { job: request.job.clone(), name: request.name.clone() };
    let _lock = job.lock(false)?.ok_or_else(not_found)?;
    let mnt = dir.mnt();
    if !dir.is_pinned() {
        return Err(not_found().into());
    }
    let record = dir.wiring_record();
    if let Ok(bytes) = std::fs::read(&record) {
        if let Ok(mut wired) = serde_json::from_slice::<Wired>(&bytes) {
            if runs_in(wired.sshd_pid, &mnt) {
                wired.reused = true;
                return Ok(wired);
            }
        }
    }
    let staged = dir.wiring();
    if staged.exists() {
        return Err(WiringError::HalfWired { job: request.job.clone() });
    }
    let state = container::read_state(&dir)?;
    let nodes = resolve(request)?;
    let secret = secrets::read_secret(&config.wiring_secret_file)?;
    let keys = secrets::derive(&secret, &request.job, state.user.uid, config.wiring_port_range()?)?;
    // A clear error now rather than an sshd that dies on bind.
    TcpListener::bind(("0.0.0.0", keys.port)).map_err(|source| WiringError::PortTaken { port: keys.port, job: request.job.clone(), source })?;

    let env_path = dir.env();
    let vars = wired_env(&env::decode(&std::fs::read(&env_path).map_err(io("read", &env_path))?));
    let plain: Vec<(String, String)> = vars.iter().filter_map(|(k, v)| Some((k.to_str()?.to_string(), v.to_str()?.to_string()))).collect();
    stage(&staged, request, &nodes, &keys, &plain, &state.user)?;
    crate::fsmode::replace_whole(&env_path, &env::encode(&vars), 0o644).map_err(io("write", &env_path))?;

    let log_path = dir.sshd_log();
    let log = std::fs::OpenOptions::new().append(true).create(true).mode(0o600).open(&log_path).map_err(io("create", &log_path))?;
    let loader = openssh::interpreter(Path::new(openssh::HOST_SSHD))?;
    let loader = loader.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let sshd_pid = start(&dir, &mnt, &staged, &nodes, &state.user, &loader, log.as_fd(), &request.job)?;
    wait_for_sshd(&request.job, keys.port, sshd_pid, &mnt, &log_path)?;
    let wired = Wired {
        job: request.job.clone(),
        name: request.name.clone(),
        port: keys.port,
        sshd_pid,
        hostfile: files::path("hostfile"),
        nodes: request.nodes.clone(),
        reused: false,
    };
    let json = serde_json::to_vec(&wired).map_err(|e| WiringError::Io { action: "encode", path: record.clone(), source: e.into() })?;
    crate::fsmode::replace_whole(&record, &json, 0o644).map_err(io("write", &record))?;
    Ok(wired)
}

/// Fills the wiring dir (root's, 0755; the private keys the user's, 0600).
fn stage(dir: &Path, request: &Request, nodes: &[Node], keys: &secrets::JobSecrets, env: &[(String, String)], user: &crate::identity::Credentials) -> Result<()> {
    crate::fsmode::create_dir(dir, 0o755).map_err(io("create", dir))?;
    let loader = openssh::stage(&dir.join("openssh"))?;
    let bin = dir.join("bin");
    crate::fsmode::create_dir(&bin, 0o755).map_err(io("create", &bin))?;
    write_file(&bin.join("ssh"), &files::ssh_wrapper(&loader), 0o755)?;
    write_file(&dir.join("hostfile"), &files::hostfile(nodes), 0o644)?;
    write_file(&dir.join("ssh_config"), &files::ssh_config(&request.job, nodes, keys.port, request.unlisted_nodes), 0o644)?;
    write_file(&dir.join("known_hosts"), &files::known_hosts(&request.job, &keys.host_public), 0o644)?;
    write_file(&dir.join("authorized_keys"), &files::authorized_keys(&keys.client_public), 0o644)?;
    write_file(&dir.join("sshd_config"), &files::sshd_config(keys.port, env), 0o644)?;
    write_file(&dir.join("id_ed25519.pub"), &format!("{}\n", keys.client_public), 0o644)?;
    for (name, text) in [("id_ed25519", &keys.client_key), ("host_ed25519", &keys.host_key)] {
        let path = dir.join(name);
        write_file(&path, text, 0o600)?;
        std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid)).map_err(io("chown", &path))?;
    }
    Ok(())
}

/// Forks a child that enters the container and starts sshd there (see [`inside`]);
/// returns sshd's pid.
#[allow(clippy::too_many_arguments)]
fn start(dir: &ContainerDir, mnt: &Path, staged: &Path, nodes: &[Node], user: &crate::identity::Credentials, loader: &str, log: std::os::fd::BorrowedFd<'_>, job: &str) -> Result<i32> {
    let (user_name, group_name, home, shell) = host_identity(user.uid, user.gid);
    let tree = inside::detached_read_only(staged).map_err(|source| WiringError::Sys { action: "make a read-only copy of the wiring dir's mount", source })?;
    let ns = std::fs::File::open(mnt).map_err(io("open", mnt))?;
    let (read_end, write_end) = nix::unistd::pipe().map_err(|source| WiringError::Sys { action: "make a pipe", source })?;
    let what = inside::Inside { user, user_name: &user_name, group_name: &group_name, home: &home, shell: &shell, nodes, tree: tree.as_fd(), log, loader };
    let inside_err = |why: String| WiringError::Inside { job: job.to_string(), why };
    // sshd and every session it starts stay in the container's cgroup.
    match container::fork_in_cgroup(dir, "start the wiring's sshd")? {
        crate::sys::Forked::Child => {
            drop(read_end);
            let report = match nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNS).map_err(|e| e.to_string()) {
                Err(e) => format!("err cannot join the container: {e}"),
                Ok(()) => match inside::prepare_and_start(&what) {
                    Ok(pid) => format!("ok {pid}"),
                    Err(why) => format!("err {why}"),
                },
            };
            let _ = nix::unistd::write(&write_end, report.as_bytes());
            crate::sys::exit_now(0)
        }
        crate::sys::Forked::Parent(child) => {
            drop(write_end);
            let mut report = String::new();
            let read = std::fs::File::from(read_end).read_to_string(&mut report);
            let _ = nix::sys::wait::waitpid(child, None);
            read.map_err(io("read the report of", dir.path()))?;
            match report.split_once(' ') {
                Some(("ok", pid)) => pid.trim().parse().map_err(|_| inside_err(format!("bad report '{report}'"))),
                Some(("err", why)) => Err(inside_err(why.to_string())),
                _ => Err(inside_err("the child died before reporting".into())),
            }
        }
    }
}

/// Waits until sshd accepts connections on its port and greets as an SSH server.
fn wait_for_sshd(job: &str, port: u16, pid: i32, mnt: &Path, log: &Path) -> Result<()> {
    let start = Instant::now();
    let fail = |why: String| {
        let tail = std::fs::read_to_string(log).unwrap_or_default();
        let last = tail.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_string();
        WiringError::Sshd { job: job.to_string(), port, why: if last.is_empty() { why } else { format!("{why}: {last}") }, log: log.to_path_buf() }
    };
    loop {
        if !runs_in(pid, mnt) {
            return Err(fail(format!("sshd (pid {pid}) exited")));
        }
        if let Ok(mut stream) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500)) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut greeting = [0u8; 8];
            if stream.read_exact(&mut greeting).is_ok() && &greeting == b"SSH-2.0-" {
                return Ok(());
            }
        }
        if start.elapsed() > START_TIMEOUT {
            return Err(fail(format!("no SSH greeting within {} s", START_TIMEOUT.as_secs())));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_env_gets_the_hostfile_and_berths_ssh_once() {
        let current: Vec<env::Var> = vec![("PATH".into(), "/usr/bin:/bin".into()), ("X".into(), "1".into())];
        let once = wired_env(&current);
        assert_eq!(env::get(&once, "PATH").unwrap(), "/.berth/wiring/bin:/usr/bin:/bin");
        assert_eq!(env::get(&once, "BERTH_HOSTFILE").unwrap(), "/.berth/wiring/hostfile");
        assert_eq!(env::get(&once, "OMPI_MCA_plm_rsh_agent").unwrap(), "/.berth/wiring/bin/ssh");
        let twice = wired_env(&once);
        assert_eq!(env::get(&twice, "PATH").unwrap(), "/.berth/wiring/bin:/usr/bin:/bin");
        assert_eq!(twice.len(), once.len());
    }

    #[test]
    fn requests_are_checked_before_anything_is_done() {
        let req = |nodes: &[&str], slots: &[u32]| Request {
            job: "1".into(),
            name: "node".into(),
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
            slots: slots.to_vec(),
            unlisted_nodes: false,
        };
        assert!(resolve(&req(&[], &[])).is_err());
        assert!(resolve(&req(&["localhost"], &[1, 2])).is_err());
        assert!(resolve(&req(&["-oProxyCommand=x"], &[])).is_err());
        assert!(resolve(&req(&["localhost", "localhost"], &[])).is_err());
        assert!(resolve(&req(&["localhost"], &[0])).is_err());
        let absurd = resolve(&req(&["localhost"], &[1_000_000])).unwrap_err().to_string();
        assert!(absurd.contains("would get 1000000 slots"), "{absurd}");
        let nodes = resolve(&req(&["localhost"], &[4])).unwrap();
        assert_eq!(nodes[0].slots, 4);
        assert!(nodes[0].addr.is_loopback());
    }
}
