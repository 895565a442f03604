//! The prologues and epilogues: each turns one Torque event into one or two `berth`
//! node-side actions (see docs/design.md), run as root as pbs_mom runs them.
//!
//! - `prologue` (mother superior): `berth container create`, then `berth container
//!   wire` with the job's nodes and slots from `$PBS_NODEFILE`.
//! - `prologue.parallel` (each sister): the same, with the nodes it knows of
//!   (`$PBS_MSHOST` and itself) and `--unlisted-nodes`, so that ssh reaches the job's
//!   other nodes by name too. A sister cannot know them: Torque gives it no nodefile
//!   (prolog.c `setup_pelog_environment` sets it only where MOM_HAS_NODEFILE) and runs
//!   prologue.parallel before it saves the job file holding exec_host
//!   (`im_join_job_as_sister`, src/resmom/mom_comm.c). The node's /etc/hosts and
//!   /etc/resolv.conf are bound into every container so those names resolve.
//! - `epilogue`, `epilogue.parallel`: `berth container destroy`, idempotent, so it
//!   also cleans up after a prologue that failed or never ran.
//!
//! Every prologue first removes what an earlier attempt of the same job left (pbs_mom
//! runs no epilogue after an aborted start), and gives `berth container create` only
//! its share of `$prologalarm` ([`Budget`]), so that a slow pull fails the job with a
//! line instead of getting it requeued by pbs_mom.
//!
//! Exit codes, from Torque 6.1.3 (src/resmom/start_exec.c, `run_prologue_scripts`): a
//! prologue exiting 1 aborts the job (JOB_EXEC_FAIL2), any other non-zero status
//! requeues it (JOB_EXEC_RETRY_PROLOGUE). An aborted job's error file is never
//! delivered (it stays in the mom's spool dir), so the user would not see why. Hence a
//! prologue that cannot make the container records its one line in
//! `<runtime_dir>/<job>/prologue-error` and exits 0; the job starter prints that line
//! into the job's error file and fails the job; the epilogue's destroy removes it.
//! Only a failure to record exits 1. Never holds container logic of its own.

use crate::entry::Caller;
use crate::request::{Pelog, Request, RequestError};
use berth_engine::image::UserMount;
use berth_engine::config::{Config, ConfigError};
use berth_engine::privileged;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot run {binary}: {source}; check berth_binary in the berth config")]
    Spawn { binary: String, source: std::io::Error },
    #[error("cannot read the job's nodefile {path}: {source}")]
    Nodefile { path: String, source: std::io::Error },
    #[error("{0}: ask for fewer MPI processes per node")]
    Slots(String),
    #[error("{action}: {why}")]
    Berth { action: &'static str, why: String },
    #[error("cannot write {path}: {source}")]
    Record { path: String, source: std::io::Error },
    #[error(transparent)]
    Remap(#[from] berth_engine::container::remap::RemapError),
    #[error("{action}: not done in the prologue's share of $prologalarm ({seconds} s in mom_priv/config; a first pull of a large image takes longest): ask the admin to raise it, or try again once the image is on the nodes")]
    Timeout { action: &'static str, seconds: u64 },
}

/// How the job's nodes are known on this node.
pub enum Role {
    MotherSuperior,
    Sister,
    /// Every node of the job and its slots, in order, known from elsewhere (OpenPBS's
    /// exec_host and schedselect).
    Known(Vec<String>, Vec<u32>),
}

/// Runs `berth ARGS`; its last stderr line (without the `berth: ` prefix) on failure.
fn berth(config: &Config, caller: &Caller, action: &'static str, args: &[&str]) -> Result<String, HookError> {
    berth_within(config, caller, action, args, None)
}

/// `berth`, killed when it is still running at `deadline`. It gets a cleared
/// environment with pbs_mom's proxies and the `BERTH_CONFIG` the hook loaded (as root,
/// only a root-owned file gets this far).
fn berth_within(config: &Config, caller: &Caller, action: &'static str, args: &[&str], deadline: Option<Budget>) -> Result<String, HookError> {
    use std::io::Read;
    let binary = config.berth_binary.display().to_string();
    let mut child = privileged::command(&config.berth_binary, &berth_env(caller, true))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| HookError::Spawn { binary: binary.clone(), source })?;
    // berth prints one line either way, far less than a pipe holds: poll, then read.
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(source) => return Err(HookError::Spawn { binary, source }),
        }
        if let Some(budget) = &deadline {
            if budget.until <= Instant::now() {
                let _ = child.kill();
                let _ = child.wait();
                return Err(HookError::Timeout { action, seconds: budget.alarm });
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (mut stdout, mut stderr) = (String::new(), String::new());
    child.stdout.take().map(|mut o| o.read_to_string(&mut stdout));
    child.stderr.take().map(|mut e| e.read_to_string(&mut stderr));
    if status.success() {
        return Ok(stdout);
    }
    let line = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message");
    let why = line.strip_prefix("berth: ").unwrap_or(line).to_string();
    Err(HookError::Berth { action, why: format!("{why} ({binary} exited with {status})") })
}

/// Torque's default `$prologalarm` (PBS_PROLOG_TIME, src/include/mom_config.h).
const DEFAULT_PROLOGALARM: u64 = 300;

/// How long the prologue's own work may take.
struct Budget {
    until: Instant,
    /// `$prologalarm`, for the message.
    alarm: u64,
}

impl Budget {
    /// pbs_mom SIGKILLs a prologue's whole session 10 s before `$prologalarm` when it
    /// is over 10 s, at it otherwise (`get_child_exit_status`, src/resmom/prolog.c).
    /// Besides, the mother superior requeues a job still starting after `$prologalarm`
    /// (`TMOMScanForStarting`, src/resmom/mom_main.c), and that time holds the sisters'
    /// prologue.parallel and then its own prologue, one after the other. Either way the
    /// job is requeued with whatever the prologue left. So each prologue takes half,
    /// less a margin to remove the half-made container and record why.
    fn from_mom_config(start: Instant) -> Budget {
        // pbs_mom runs prologues in mom_priv, where its config is.
        let alarm = std::fs::read_to_string("config").ok().and_then(|text| prologalarm(&text)).unwrap_or(DEFAULT_PROLOGALARM);
        let killed_at = if alarm > 10 { alarm - 10 } else { alarm };
        let half_ms = killed_at * 500;
        let ours = if half_ms > 12_000 { half_ms - 3_000 } else { half_ms * 3 / 4 };
        Budget { until: start + Duration::from_millis(ours), alarm }
    }
}

/// `$prologalarm N` from mom_priv/config's text.
fn prologalarm(config: &str) -> Option<u64> {
    config.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some("$prologalarm")).then(|| words.next()?.parse().ok()).flatten()
    })
}

/// What `berth` gets of the hook's environment: the `BERTH_CONFIG` the hook loaded
/// (as root, only a root-owned file nobody else writes gets this far) and, where that
/// environment is pbs_mom's (`daemon`: the prologues and epilogues, not the job
/// starter), its proxies.
pub fn berth_env(caller: &Caller, daemon: bool) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    let mut passed = if daemon { privileged::daemon_variables(|name| caller.var(name).map(ToOwned::to_owned)) } else { Vec::new() };
    if let Some(path) = &caller.config_var {
        passed.push((berth_engine::config::CONFIG_VAR.into(), path.clone()));
    }
    passed
}

/// Nodes in the order given, each with the sum of its counts (its slots), checked
/// against the engine's caps (`files::check_slots`) and never expanded: the counts
/// come from the user's request (`mpiprocs`, `ppn`).
pub fn nodes_and_slots(counts: impl IntoIterator<Item = (String, u64)>) -> Result<(Vec<String>, Vec<u32>), HookError> {
    let mut nodes: Vec<String> = Vec::new();
    let mut sums: Vec<u64> = Vec::new();
    for (name, count) in counts {
        match nodes.iter().position(|n| *n == name) {
            Some(i) => sums[i] = sums[i].saturating_add(count),
            None => {
                nodes.push(name);
                sums.push(count);
            }
        }
    }
    let slots = berth_engine::wiring::files::check_slots(nodes.iter().map(String::as_str).zip(sums)).map_err(HookError::Slots)?;
    Ok((nodes, slots))
}

/// The hosts of a nodefile (one line per slot), read a line at a time.
pub fn nodefile_hosts(file: impl std::io::BufRead) -> impl Iterator<Item = std::io::Result<String>> {
    file.lines().filter(|l| !l.as_ref().is_ok_and(|l| l.trim().is_empty())).map(|l| l.map(|l| l.trim().to_string()))
}

pub fn this_host() -> String {
    nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The job's nodes and slots as this node can know them.
fn job_nodes(caller: &Caller, role: &Role) -> Result<(Vec<String>, Vec<u32>), HookError> {
    let me = this_host();
    match role {
        Role::MotherSuperior => match caller.var_string("PBS_NODEFILE") {
            Some(path) => {
                let failed = |source| HookError::Nodefile { path: path.clone(), source };
                let file = std::fs::File::open(&path).map_err(failed)?;
                let mut unread = None;
                let hosts = nodefile_hosts(std::io::BufReader::new(file)).map_while(|h| h.map_err(|e| unread = Some(e)).ok());
                let counted = nodes_and_slots(hosts.map(|h| (h, 1)));
                match unread {
                    Some(source) => Err(failed(source)),
                    None => counted,
                }
            }
            None => Ok((vec![me], vec![1])),
        },
        Role::Known(nodes, slots) => Ok((nodes.clone(), slots.clone())),
        Role::Sister => {
            let mut nodes: Vec<String> = caller.var_string("PBS_MSHOST").into_iter().filter(|h| !h.is_empty()).collect();
            if !nodes.contains(&me) {
                nodes.push(me);
            }
            let slots = vec![1; nodes.len()];
            Ok((nodes, slots))
        }
    }
}

/// The node's name service files, bound read-only into every container so that the
/// job's node names resolve inside as on the node (a sister's wiring knows only some of
/// them by address; MPICH's proxies call back by name). A user's mount of the same
/// path wins.
const NAME_SERVICE_FILES: &[&str] = &["/etc/hosts", "/etc/resolv.conf"];

/// prologue / prologue.parallel: the job's container on this node, wired for MPI.
/// Returns the request, or None for a job that asked for no container.
pub fn prologue(config: &Config, caller: &Caller, pelog: &Pelog, role: Role, start: Instant) -> Result<Option<Request>, HookError> {
    // A requeued job's earlier attempt may have left its container or failure line
    // here (pbs_mom runs no epilogue after an aborted start): start clean.
    if berth_pbs::launch::job_dir(config, &pelog.job).is_some_and(|dir| dir.exists()) {
        berth(config, caller, "cannot remove what an earlier attempt of the job left", &["container", "destroy", "--job", &pelog.job])?;
    }
    let Some(request) = pelog.request()? else { return Ok(None) };
    if request.remap_root && !config.remap_user {
        return Err(berth_engine::container::remap::RemapError::NotAllowed.into());
    }
    let (nodes, slots) = job_nodes(caller, &role)?;
    let mut create: Vec<String> = ["container", "create", "--job", &pelog.job, "--user", &pelog.user, "--image", &request.image, "--pull", request.pull.as_str()]
        .map(String::from)
        .to_vec();
    // Looked up by berth as the user (a missing one is left out), never stat'ed here as
    // root: it is the user's string (Torque's `qsub -w`).
    if let Some(dir) = caller.var_string("PBS_O_WORKDIR").filter(|d| Path::new(d).is_absolute()) {
        create.extend(["--submit-dir".into(), dir]);
    }
    for mount in &request.mounts {
        create.extend(["--mount".into(), mount.clone()]);
    }
    let user_targets: Vec<std::path::PathBuf> = request.mounts.iter().filter_map(|m| UserMount::parse(m)).map(|m| m.target).collect();
    for file in NAME_SERVICE_FILES {
        if Path::new(file).is_file() && !user_targets.iter().any(|t| t == Path::new(file)) {
            create.extend(["--mount".into(), format!("{file}:{file}:ro")]);
        }
    }
    if let Some(dir) = &request.workdir {
        create.extend(["--workdir".into(), dir.clone()]);
    }
    if request.no_home {
        create.push("--no-home".into());
    }
    if request.readonly {
        create.push("--readonly".into());
    }
    let nodes = nodes.join(",");
    let slots = slots.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let mut wire = vec!["container", "wire", "--job", &pelog.job, "--nodes", &nodes, "--slots", &slots];
    if matches!(role, Role::Sister) {
        wire.push("--unlisted-nodes");
    }
    let create: Vec<&str> = create.iter().map(String::as_str).collect();
    let budget = Budget::from_mom_config(start);
    let made = berth_within(config, caller, "cannot start the container", &create, Some(budget))
        .and_then(|_| record_image_env(config, &pelog.job, &request.env))
        .and_then(|_| record_remap_root(config, &pelog.job, request.remap_root))
        .and_then(|_| berth(config, caller, "cannot wire MPI between the job's containers", &wire));
    if let Err(e) = made {
        // create removes what it made when it fails; what failed after it: undo both.
        let _ = berth(config, caller, "cannot remove the container", &["container", "destroy", "--job", &pelog.job]);
        return Err(e);
    }
    Ok(Some(request))
}

/// Records the names the job takes from the image (one a line) in the job's runtime
/// dir, which create made and destroy removes, for the job starter.
fn record_image_env(config: &Config, job: &str, names: &[String]) -> Result<String, HookError> {
    let Some(path) = berth_pbs::launch::job_dir(config, job).map(|dir| dir.container_env()) else { return Ok(String::new()) };
    if names.is_empty() {
        return Ok(String::new());
    }
    let text: String = names.iter().map(|n| format!("{n}\n")).collect();
    berth_pbs::launch::write_record(&path, text.as_bytes()).map_err(|source| HookError::Record { path: path.display().to_string(), source })?;
    Ok(String::new())
}

/// Notes, for the job starter, that the job script runs as remapped root.
fn record_remap_root(config: &Config, job: &str, remap_root: bool) -> Result<String, HookError> {
    let Some(path) = berth_pbs::launch::job_dir(config, job).map(|dir| dir.remap_root()).filter(|_| remap_root) else { return Ok(String::new()) };
    berth_pbs::launch::write_record(&path, b"").map_err(|source| HookError::Record { path: path.display().to_string(), source })?;
    Ok(String::new())
}

/// Records a prologue's failure line for the job starter (root-only dir, as create's).
pub fn record_failure(config: &Config, job: &str, line: &str) -> std::io::Result<()> {
    let dir = berth_pbs::launch::job_dir(config, job).ok_or_else(|| std::io::Error::other("bad job id"))?;
    dir.ensure()?;
    berth_pbs::launch::write_record(&dir.prologue_error(), format!("{line}\n").as_bytes())?;
    // For an unprivileged job starter the setuid launcher prints it, to the job's user
    // alone: the owner of pbs_mom's copy of the job script (prologues run in mom_priv).
    if let Ok(script) = std::fs::symlink_metadata(format!("jobs/{job}.SC")) {
        use std::os::unix::fs::MetadataExt;
        berth_pbs::launch::record_failure(config, job, script.uid(), line)?;
    }
    Ok(())
}

/// epilogue / epilogue.parallel: nothing of the job left on this node.
pub fn epilogue(config: &Config, caller: &Caller, pelog: &Pelog) -> Result<(), HookError> {
    destroy(config, caller, &pelog.job)
}

/// `berth container destroy`: the job's containers on this node, gone.
pub fn destroy(config: &Config, caller: &Caller, job: &str) -> Result<(), HookError> {
    berth(config, caller, "cannot remove the job's containers", &["container", "destroy", "--job", job]).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodefile_gives_nodes_in_order_with_their_slots() {
        let hosts = nodefile_hosts("node2\nnode2\nnode1\n node2\n\nnode1\n".as_bytes()).map(|h| (h.unwrap(), 1));
        let (nodes, slots) = nodes_and_slots(hosts).unwrap();
        assert_eq!(nodes, ["node2", "node1"]);
        assert_eq!(slots, [3, 2]);
    }

    #[test]
    fn slot_counts_are_summed_as_numbers_and_capped() {
        let (nodes, slots) = nodes_and_slots([("node1".to_string(), 40_000), ("node2".to_string(), 1), ("node1".to_string(), 25_536)]).unwrap();
        assert_eq!((nodes.as_slice(), slots.as_slice()), (["node1", "node2"].map(String::from).as_slice(), [65_536, 1].as_slice()));
        let over = nodes_and_slots([("node1".to_string(), 40_000), ("node1".to_string(), 25_537)]).unwrap_err().to_string();
        assert!(over.starts_with("node 'node1' would get 65537 slots") && over.ends_with("ask for fewer MPI processes per node"), "{over}");
        assert!(nodes_and_slots([("node1".to_string(), u64::MAX), ("node1".to_string(), u64::MAX)]).is_err());
    }

    #[test]
    fn prologalarm_comes_from_mom_config() {
        assert_eq!(prologalarm("$pbsserver head\n$prologalarm 45\n$logevent 255\n"), Some(45));
        assert_eq!(prologalarm("$pbsserver head\n"), None);
        assert_eq!(prologalarm("$prologalarm soon\n"), None);
    }
}
