//! Listing: the containers of this node as `berth container list` shows them, and the
//! image layers live containers use (what the store's gc must keep). Owns telling a
//! live container from a dead one's leftovers; only reads the runtime dir, walked
//! through [`crate::runtime`], never changes it.

use super::{io, read_state, Result};
use crate::config::Config;
use crate::runtime::{JobDir, RuntimeDir};
use crate::teardown;
use serde::Serialize;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

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
    let runtime = RuntimeDir::of(config);
    let jobs: Vec<JobDir> = match job {
        Some(j) => vec![runtime.job(j)?],
        None => match runtime.jobs() {
            Ok(jobs) => jobs,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io("read", runtime.path())(e)),
        },
    };
    for job_dir in jobs {
        let Ok(containers) = job_dir.containers() else { continue };
        for dir in containers {
            if !dir.is_pinned() {
                continue;
            }
            let Ok(state) = read_state(&dir) else { continue };
            let processes = std::fs::metadata(dir.mnt())
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

/// The image layer dirs of every live container in `runtime`: what the store's gc
/// must keep. A container is live while its `mnt` pin opens the namespace its
/// `state.json` names; a pin whose anchor died (a crash) names nothing, so a dead
/// container never keeps layers. What this caller cannot read is skipped (job dirs are
/// root's, 0700: a non-root gc only ever collects a store of its own).
pub fn layers_in_use(runtime: &RuntimeDir) -> Result<Vec<PathBuf>> {
    let jobs = match runtime.jobs() {
        Ok(jobs) => jobs,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied) => return Ok(Vec::new()),
        Err(e) => return Err(io("read", runtime.path())(e)),
    };
    let mut layers = Vec::new();
    for job_dir in jobs {
        let Ok(containers) = job_dir.containers() else { continue };
        for dir in containers {
            let Ok(state) = read_state(&dir) else { continue };
            let live = std::fs::metadata(dir.mnt()).is_ok_and(|m| m.ino() == state.mnt_inode) && dir.is_pinned();
            if live {
                layers.extend(state.image.layer_dirs);
            }
        }
    }
    Ok(layers)
}
