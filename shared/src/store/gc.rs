//! Garbage collection: with the store locked exclusively (no pull or reader running),
//! removes layer dirs and blobs no reference uses, everything in `tmp/` (leftovers of
//! interrupted pulls) and the per-layer lock files. Owns deletion; never removes
//! anything a ref record names.

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
}

pub(super) fn collect(store: &Store) -> Result<GcReport, StoreError> {
    let root = &store.root;
    let mut keep_layers = HashSet::new();
    let mut keep_blobs = HashSet::new();
    let refs = root.join("refs");
    for entry in list(store, &refs)? {
        let path = refs.join(&entry);
        match super::read_record(&path) {
            Ok(r) => {
                keep_layers.extend(r.layers);
                keep_blobs.insert(r.manifest_digest.trim_start_matches("sha256:").to_string());
                keep_blobs.insert(r.config_digest.trim_start_matches("sha256:").to_string());
            }
            // A record that cannot be read names nothing; it goes too.
            Err(_) => remove_tree(&path).map_err(|e| store.io(&path, e))?,
        }
    }
    let mut report = GcReport::default();
    for dir in ["layers/sha256", "layers/chain"] {
        for name in list(store, &root.join(dir))? {
            if !keep_layers.contains(&format!("{dir}/{name}")) {
                let path = root.join(dir).join(&name);
                // Renamed into tmp first, so a layer dir disappears all at once.
                let doomed = super::unique_tmp(root, "gc");
                std::fs::rename(&path, &doomed).map_err(|e| store.io(&path, e))?;
                remove_tree(&doomed).map_err(|e| store.io(&doomed, e))?;
                report.layers += 1;
            }
        }
    }
    for name in list(store, &root.join("blobs/sha256"))? {
        if !keep_blobs.contains(&name) {
            let path = root.join("blobs/sha256").join(&name);
            std::fs::remove_file(&path).map_err(|e| store.io(&path, e))?;
            report.blobs += 1;
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
