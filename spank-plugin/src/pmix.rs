//! `srun --mpi=pmix` into containers. Slurm's PMIx plugin runs a PMIx server in each
//! node's slurmstepd; the ranks, its clients, reach it over TCP on loopback (the
//! container shares the node's network) but also need two of the step's directories at
//! the paths their `PMIX_*` variables name:
//! - `<SlurmdSpoolDir>/pmix.<job>.<step>/`: the server's data store (shared memory the
//!   clients map read-write, its locks included);
//! - `<base>/spmix_appdir_<uid>_<job>.<step>/`: the clients' own tmpdir (Open MPI puts
//!   its session dir there); base: `$SLURM_PMIX_TMPDIR`, mpi.conf's
//!   `PMIxCliTmpDirBase`, `$TMPDIR`, `TmpFS` (the first of these that holds the dir).
//!
//! slurmstepd makes both, owned by the job user, before it forks the tasks. They are
//! per step and the container lives for the whole job, so every pmix step binds its own
//! into the container at the same paths (nosuid, nodev), once per node: the first task
//! binds, the others find them there. The binds go with the container.
//!
//! The client dir's path comes from the job's environment (the user's): both dirs are
//! opened without following a symlink at their end and must belong to the job's user,
//! as Slurm makes them, so no other user's dir, nor root's, is ever bound.
//!
//! Owns finding the dirs and binding them; must never bind anything but these two dirs.

use crate::ffi::NodeSettings;
use berth_engine::container::inroot;
use berth_engine::sys::{attach_tree, clone_tree_of, restrict_tree, MountRestrictions};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Whether a step's `SLURM_MPI_TYPE` is one of Slurm's PMIx plugins (`pmix`, `pmix_v4`, ...).
pub fn is_pmix(mpi_type: Option<&str>) -> bool {
    mpi_type.is_some_and(|t| t.starts_with("pmix"))
}

/// `PMIxCliTmpDirBase` from mpi.conf's text (`Key=Value` lines, keys in any case).
pub fn client_base_from_mpi_conf(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| {
        let line = line.split('#').next()?.trim();
        let (key, value) = line.split_once('=')?;
        let value = value.trim();
        (key.trim().eq_ignore_ascii_case("PMIxCliTmpDirBase") && !value.is_empty()).then(|| PathBuf::from(value))
    })
}

/// Where a step's two dirs may be, in the PMIx plugin's order of preference; the caller
/// keeps the server dir and the first client dir that exist.
pub struct Candidates {
    pub server: PathBuf,
    pub clients: Vec<PathBuf>,
}

/// The step's dirs, from the node's settings and the step's environment
/// (`SLURM_PMIX_TMPDIR`, `TMPDIR`) and mpi.conf's base.
pub fn candidates(node: &NodeSettings, env_base: Option<&str>, mpi_conf_base: Option<PathBuf>, tmpdir: Option<&str>, job: u32, step: u32, uid: u32) -> Candidates {
    let name = format!("spmix_appdir_{uid}_{job}.{step}");
    let bases = [env_base.map(PathBuf::from), mpi_conf_base, tmpdir.map(PathBuf::from), node.tmp_fs.clone(), Some(PathBuf::from("/tmp"))];
    let mut clients: Vec<PathBuf> = Vec::new();
    for base in bases.into_iter().flatten() {
        let dir = base.join(&name);
        if !clients.contains(&dir) {
            clients.push(dir);
        }
    }
    Candidates { server: node.spool_dir.join(format!("pmix.{job}.{step}")), clients }
}

/// A step dir, cloned from the node's mount namespace, waiting to be attached in the
/// container's.
pub struct Detached {
    path: PathBuf,
    tree: OwnedFd,
    dev: u64,
    ino: u64,
}

/// Opens a step dir on the node without following a symlink at its end, and checks it
/// is a directory of the job's user (Slurm makes both dirs so): the client dir's path
/// comes from the job's environment, which is the user's to set.
fn open_step_dir(dir: &Path, uid: u32) -> Result<(OwnedFd, std::fs::Metadata), String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)
        .map_err(|e| format!("cannot open {}: {e}", dir.display()))?;
    let meta = file.metadata().map_err(|e| format!("cannot inspect {}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory (a symlink?); Slurm's PMIx plugin makes it one", dir.display()));
    }
    if meta.uid() != uid {
        return Err(format!("{} belongs to uid {}, not to the job's user; berth binds only the job's own PMIx dirs", dir.display(), meta.uid()));
    }
    Ok((OwnedFd::from(file), meta))
}

/// Clones the existing dirs of `candidates` (server dir first, then the first client
/// dir found), each checked to be the job user's (`uid`); call before joining the
/// container. An error names the dir.
pub fn detach(candidates: &Candidates, uid: u32) -> Result<Vec<Detached>, String> {
    let client = candidates.clients.iter().find(|d| d.symlink_metadata().is_ok()).ok_or_else(|| {
        let tried: Vec<String> = candidates.clients.iter().map(|d| d.display().to_string()).collect();
        format!("no client dir of Slurm's PMIx plugin on this node (looked for {})", tried.join(", "))
    })?;
    let mut detached = Vec::new();
    for dir in [&candidates.server, client] {
        let (fd, meta) = open_step_dir(dir, uid)?;
        let tree = clone_tree_of(fd.as_fd()).map_err(|e| format!("cannot clone {}: {e}", dir.display()))?;
        let restrictions = MountRestrictions { read_only: false, nosuid: true, nodev: true, noexec: false };
        restrict_tree(tree.as_fd(), &restrictions).map_err(|e| format!("cannot restrict the bind of {}: {e}", dir.display()))?;
        detached.push(Detached { path: dir.clone(), tree, dev: meta.dev(), ino: meta.ino() });
    }
    Ok(detached)
}

/// Attaches the dirs at their own paths; call inside the container (after `join`, as
/// root), with the job's lock held so that the step's tasks on this node bind once.
/// Mount points are reached through the engine's `inroot`: never through a symlink of
/// the image's, and made only in the container's own files or its `/tmp`.
pub fn attach(detached: &[Detached]) -> Result<(), String> {
    let root = inroot::current_root().map_err(|e| e.to_string())?;
    let create_on: Vec<u64> = ["/", "/tmp"].into_iter().filter_map(|dir| inroot::device(root.as_fd(), Path::new(dir))).collect();
    for dir in detached {
        let target = inroot::mount_point(root.as_fd(), &dir.path, &create_on).map_err(|e| e.to_string())?;
        let there = std::fs::File::from(target.try_clone().map_err(|e| format!("cannot open {} in the container: {e}", dir.path.display()))?).metadata();
        if there.is_ok_and(|m| m.dev() == dir.dev && m.ino() == dir.ino) {
            continue;
        }
        attach_tree(dir.tree.as_fd(), target.as_fd()).map_err(|e| format!("cannot bind {} into the container: {e}", dir.path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeSettings {
        NodeSettings { spool_dir: "/var/spool/slurmd".into(), tmp_fs: Some("/local/tmp".into()), conf_file: None }
    }

    #[test]
    fn only_pmix_plugins_count() {
        assert!(is_pmix(Some("pmix")) && is_pmix(Some("pmix_v4")) && is_pmix(Some("pmix_v5")));
        assert!(!is_pmix(Some("pmi2")) && !is_pmix(Some("none")) && !is_pmix(None));
    }

    #[test]
    fn mpi_conf_gives_the_client_base() {
        assert_eq!(client_base_from_mpi_conf("# site\nPMIxDebug=1\npmixclitmpdirbase = /run/slurm # local\n"), Some("/run/slurm".into()));
        assert_eq!(client_base_from_mpi_conf("PMIxDebug=1\n"), None);
    }

    #[test]
    fn the_step_dirs_follow_the_pmix_plugins_names_and_order() {
        let c = candidates(&node(), Some("/scratch/pmix"), Some("/run/slurm".into()), Some("/tmp"), 42, 3, 1001);
        assert_eq!(c.server, Path::new("/var/spool/slurmd/pmix.42.3"));
        let clients: Vec<String> = c.clients.iter().map(|d| d.display().to_string()).collect();
        assert_eq!(
            clients,
            [
                "/scratch/pmix/spmix_appdir_1001_42.3",
                "/run/slurm/spmix_appdir_1001_42.3",
                "/tmp/spmix_appdir_1001_42.3",
                "/local/tmp/spmix_appdir_1001_42.3"
            ]
        );
    }

    #[test]
    fn a_missing_client_dir_is_named() {
        let c = candidates(&node(), None, None, None, 7, 0, 1001);
        let err = detach(&Candidates { server: "/nonexistent/pmix.7.0".into(), clients: vec!["/nonexistent/spmix_appdir_1001_7.0".into()] }, 1001)
            .err()
            .unwrap();
        assert!(err.contains("/nonexistent/spmix_appdir_1001_7.0"), "{err}");
        assert_eq!(c.clients.last().unwrap(), Path::new("/tmp/spmix_appdir_1001_7.0"));
    }
}
