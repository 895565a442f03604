//! Listing: the containers of this node as `berth container list` shows them, and the
//! image layers live containers use (what the store's gc must keep). Owns telling a
//! live container from a dead one's leftovers; only reads the runtime dir, never
//! changes it.

use super::{check_name, io, read_state, Result};
use crate::config::Config;
use crate::teardown;
use serde::Serialize;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

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
