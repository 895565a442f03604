//! Garbage collection: with the store locked exclusively (no pull, reader or container
//! create running), removes layer dirs and blobs no reference uses, everything in
//! `tmp/` (leftovers of interrupted pulls), the per-layer lock files and the `access/`
//! entries of what is gone (each removed before its content: a crash leaves content
//! without an entry, which only costs a download). Owns deletion;
//! never removes anything a ref record names, nor a layer a live container on this
//! node uses (its `state.json` in the runtime dir names it, even after `berth rm`).

use super::{Store, StoreError};
use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// What a gc removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub layers: usize,
    pub blobs: usize,
    pub leftovers: usize,
    /// Layers no reference names that were kept because live containers use them.
    pub in_use: usize,
}

pub(super) fn collect(store: &Store) -> Result<GcReport, StoreError> {
    let root = &store.root;
    let mut keep_layers = HashSet::new();
    let mut keep_blobs = HashSet::new();
    let refs = root.join("refs");
    for entry in list(store, &refs)? {
        let path = refs.join(&entry);
        let trusted = super::read_trusted(&path)
            .and_then(|b| serde_json::from_slice::<super::Record>(&b).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)));
        match trusted {
            Ok(r) => {
                keep_layers.extend(r.layers);
                keep_blobs.insert(r.manifest_digest.trim_start_matches("sha256:").to_string());
                keep_blobs.insert(r.config_digest.trim_start_matches("sha256:").to_string());
            }
            // A record that cannot be read, or that others could have written (the
            // caller's umask before berth set modes itself), names nothing; it goes too.
            Err(_) => remove_tree(&path).map_err(|e| store.io(&path, e))?,
        }
    }
    let mut used_by_containers = HashSet::new();
    let in_use = crate::container::layers_in_use(&crate::runtime::RuntimeDir::of(&store.config))
        .map_err(|source| StoreError::InUse { runtime_dir: store.config.runtime_dir.clone(), why: source.to_string() })?;
    // The container recorded the dirs as this store named them; a store reached through
    // a symlinked path names them otherwise, hence the canonical form too.
    let canonical_root = root.canonicalize().unwrap_or_else(|_| root.clone());
    for dir in in_use {
        let canonical = dir.canonicalize().unwrap_or_else(|_| dir.clone());
        if let Some(rel) = dir.strip_prefix(root).ok().or_else(|| canonical.strip_prefix(&canonical_root).ok()) {
            used_by_containers.insert(rel.to_string_lossy().into_owned());
        }
    }
    let mut report = GcReport::default();
    for dir in ["layers/sha256", "layers/chain"] {
        for name in list(store, &root.join(dir))? {
            let rel = format!("{dir}/{name}");
            if keep_layers.contains(&rel) {
                continue;
            }
            if used_by_containers.contains(&rel) {
                report.in_use += 1;
                continue;
            }
            let path = root.join(dir).join(&name);
            remove_access(store, &rel)?;
            // Renamed into tmp first, so a layer dir disappears all at once.
            let doomed = super::unique_tmp(root, "gc");
            std::fs::rename(&path, &doomed).map_err(|e| store.io(&path, e))?;
            remove_tree(&doomed).map_err(|e| store.io(&doomed, e))?;
            report.layers += 1;
        }
    }
    for name in list(store, &root.join("blobs/sha256"))? {
        if !keep_blobs.contains(&name) {
            let path = root.join("blobs/sha256").join(&name);
            remove_access(store, &format!("blobs/sha256/{name}"))?;
            std::fs::remove_file(&path).map_err(|e| store.io(&path, e))?;
            report.blobs += 1;
        }
    }
    // Entries whose content is gone (or that name nothing berth stores).
    for name in list(store, &root.join("access"))? {
        if super::content_of_access(&name).is_none_or(|rel| root.join(rel).symlink_metadata().is_err()) {
            let path = root.join("access").join(&name);
            std::fs::remove_file(&path).map_err(|e| store.io(&path, e))?;
        }
    }
    for name in list(store, &root.join("tmp"))? {
        let path = root.join("tmp").join(&name);
        remove_tree(&path).map_err(|e| store.io(&path, e))?;
        if !name.starts_with("gc-") {
            report.leftovers += 1;
        }
    }
    // Safe only because every layer lock is taken under the shared store lock we exclude.
    for name in list(store, &root.join("locks"))? {
        let path = root.join("locks").join(&name);
        std::fs::remove_file(&path).map_err(|e| store.io(&path, e))?;
    }
    Ok(report)
}

fn remove_access(store: &Store, rel: &str) -> Result<(), StoreError> {
    let path = store.access_path(rel);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(store.io(&path, e)),
        _ => Ok(()),
    }
}

pub(super) fn list(store: &Store, dir: &Path) -> Result<Vec<String>, StoreError> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()).map_err(|err| store.io(dir, err)))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(store.io(dir, e)),
    }
}

/// Removes a file or a whole tree, never following symlinks; directories without
/// write permission (images have them) are opened up first so a non-root owner can
/// delete what it unpacked.
pub(super) fn remove_tree(path: &Path) -> std::io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return std::fs::remove_file(path);
    }
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            open_up(path)?;
            std::fs::remove_dir_all(path)
        }
        Err(e) => Err(e),
    }
}

fn open_up(dir: &Path) -> std::io::Result<()> {
    let mode = std::fs::symlink_metadata(dir)?.permissions().mode();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o700))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            open_up(&entry.path())?;
        }
    }
    Ok(())
}
