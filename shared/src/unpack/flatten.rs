//! Flattening (`berth export`): a stack of layer dirs in overlay form applied in order
//! into one plain root filesystem. Owns reading overlay form back (whiteouts, opaque
//! directories, hard-link groups within a layer); never writes into a layer dir.

use super::{times, Meta, Options, UnpackError, TRUSTED_PREFIX, USER_PREFIX};
use rustix::fs::{AtFlags, FileType, Mode, CWD};
use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Whether a layer-dir entry is an overlay whiteout.
pub(super) fn is_whiteout(meta: &std::fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

pub(super) fn is_opaque(path: &Path) -> bool {
    let mut buf = [0u8; 4];
    [TRUSTED_PREFIX, USER_PREFIX]
        .iter()
        .any(|p| matches!(rustix::fs::lgetxattr(path, format!("{p}opaque").as_str(), &mut buf), Ok(1) if buf[0] == b'y'))
}

fn fs_err(path: &Path, e: std::io::Error) -> UnpackError {
    UnpackError::Io { path: path.display().to_string(), source: e }
}

fn remove_any(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Flattens layer dirs (lowest first, in overlay form) into `dest`, the root
/// filesystem that applying the layers in order gives: whiteouts delete, opaque
/// directories hide what is below, hard-link groups stay groups.
/// `dest` must be an existing directory that berth alone writes to while this runs.
pub fn flatten(layers: &[PathBuf], dest: &Path, opts: &Options) -> Result<(), UnpackError> {
    let mut state = Flatten { opts: *opts, links: HashMap::new(), dirs: HashMap::new() };
    for layer in layers {
        state.links.clear();
        state.walk(layer, dest, Path::new(""))?;
    }
    let mut dirs: Vec<_> = state.dirs.into_iter().collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.0.components().count()));
    for (rel, m) in dirs {
        let path = dest.join(&rel);
        match std::fs::symlink_metadata(&path) {
            Ok(cur) if cur.is_dir() => {}
            _ => continue,
        }
        if opts.as_root {
            std::os::unix::fs::lchown(&path, Some(m.uid), Some(m.gid)).map_err(|e| fs_err(&path, e))?;
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(m.mode)).map_err(|e| fs_err(&path, e))?;
        rustix::fs::utimensat(CWD, &path, &times(m.mtime), AtFlags::SYMLINK_NOFOLLOW).map_err(|e| fs_err(&path, e.into()))?;
    }
    Ok(())
}

struct Flatten {
    opts: Options,
    /// (dev, ino) of a source file in the current layer -> the first dest path written for it.
    links: HashMap<(u64, u64), PathBuf>,
    /// Directory metadata to apply at the end (last layer to mention a dir wins).
    dirs: HashMap<PathBuf, Meta>,
}

impl Flatten {
    fn walk(&mut self, src_root: &Path, dest_root: &Path, rel: &Path) -> Result<(), UnpackError> {
        let src_dir = src_root.join(rel);
        let mut entries: Vec<_> = std::fs::read_dir(&src_dir)
            .map_err(|e| fs_err(&src_dir, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| fs_err(&src_dir, e))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let rel = rel.join(entry.file_name());
            let src = src_root.join(&rel);
            let dest = dest_root.join(&rel);
            let meta = std::fs::symlink_metadata(&src).map_err(|e| fs_err(&src, e))?;
            let m = Meta { mode: meta.mode() & 0o7777, uid: meta.uid(), gid: meta.gid(), mtime: meta.mtime() };
            if is_whiteout(&meta) {
                remove_any(&dest).map_err(|e| fs_err(&dest, e))?;
                self.dirs.retain(|p, _| !p.starts_with(&rel));
                continue;
            }
            if meta.is_dir() {
                let existing = std::fs::symlink_metadata(&dest).ok();
                if existing.as_ref().is_some_and(|e| !e.is_dir()) {
                    remove_any(&dest).map_err(|e| fs_err(&dest, e))?;
                }
                if existing.as_ref().is_some_and(|e| e.is_dir()) && is_opaque(&src) {
                    remove_any(&dest).map_err(|e| fs_err(&dest, e))?;
                    self.dirs.retain(|p, _| !p.starts_with(&rel));
                }
                if std::fs::symlink_metadata(&dest).is_err() {
                    std::fs::create_dir(&dest).map_err(|e| fs_err(&dest, e))?;
                }
                self.dirs.insert(rel.clone(), m);
                self.walk(src_root, dest_root, &rel)?;
                continue;
            }
            remove_any(&dest).map_err(|e| fs_err(&dest, e))?;
            self.dirs.retain(|p, _| !p.starts_with(&rel));
            let key = (meta.dev(), meta.ino());
            if meta.nlink() > 1 {
                if let Some(first) = self.links.get(&key) {
                    std::fs::hard_link(first, &dest).map_err(|e| fs_err(&dest, e))?;
                    continue;
                }
            }
            let ft = meta.file_type();
            if ft.is_file() {
                std::fs::copy(&src, &dest).map_err(|e| fs_err(&dest, e))?;
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&src).map_err(|e| fs_err(&src, e))?;
                std::os::unix::fs::symlink(&target, &dest).map_err(|e| fs_err(&dest, e))?;
            } else if ft.is_fifo() {
                rustix::fs::mknodat(CWD, &dest, FileType::Fifo, Mode::from_raw_mode(0o600), 0).map_err(|e| fs_err(&dest, e.into()))?;
            } else {
                continue;
            }
            if self.opts.as_root {
                std::os::unix::fs::lchown(&dest, Some(m.uid), Some(m.gid)).map_err(|e| fs_err(&dest, e))?;
            }
            if !ft.is_symlink() {
                std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(m.mode)).map_err(|e| fs_err(&dest, e))?;
            }
            rustix::fs::utimensat(CWD, &dest, &times(m.mtime), AtFlags::SYMLINK_NOFOLLOW).map_err(|e| fs_err(&dest, e.into()))?;
            if meta.nlink() > 1 {
                self.links.insert(key, dest);
            }
        }
        Ok(())
    }
}
