//! Hard links of a layer that point at files of lower layers: the target is copied up
//! into the layer (with its parents' metadata and its whole hard-link group), then
//! linked. Owns reading the lower layers; never writes into one, and resolves every
//! path from a directory fd with `O_NOFOLLOW`, as the rest of unpack does.

use super::{clean, finish_at, gid, io, open_beneath, os, show, times, uid, Meta, Options, UnpackError, DIR_FLAGS, IMPLIED_DIR_MODE};
use rustix::fd::OwnedFd;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Completes a layer whose hard links point at files of lower layers: each target is
/// copied up from the highest lower layer that has it (with the metadata of its parent
/// directories), then linked, so the layer alone gives the same hard-link group as
/// applying the layers in order. `lowers` are the layer dirs below, lowest first.
pub fn link_from_lowers(layer: &Path, lowers: &[PathBuf], links: &[(String, String)], opts: &Options) -> Result<(), UnpackError> {
    let root: OwnedFd = rustix::fs::open(layer, DIR_FLAGS, Mode::empty()).map_err(|e| io(&[], e))?;
    for (link, target) in links {
        let tcomps = clean(target.as_bytes())?;
        let lcomps = clean(link.as_bytes())?;
        let (Some((tname, tparent)), Some((lname, lparent))) = (tcomps.split_last(), lcomps.split_last()) else {
            return Err(UnpackError::Hostile { path: link.clone(), why: "is a hard link to the layer root" });
        };
        if open_beneath(&root, &tcomps[..tcomps.len() - 1], false).ok().and_then(|d| rustix::fs::statat(&d, os(tname), AtFlags::SYMLINK_NOFOLLOW).ok()).is_none() {
            copy_up(&root, lowers, &tcomps, opts)?;
        }
        let tdir = open_beneath(&root, tparent, false)?;
        let ldir = open_beneath(&root, lparent, true)?;
        rustix::fs::linkat(&tdir, os(tname), &ldir, os(lname), AtFlags::empty()).map_err(|e| io(&lcomps, e))?;
    }
    Ok(())
}

fn copy_up(root: &OwnedFd, lowers: &[PathBuf], comps: &[Vec<u8>], opts: &Options) -> Result<(), UnpackError> {
    let missing = || UnpackError::Hostile { path: show(comps), why: "is the target of a hard link but exists in no layer" };
    let (name, parent) = comps.split_last().ok_or_else(missing)?;
    for lower in lowers.iter().rev() {
        let lroot: OwnedFd = rustix::fs::open(lower, DIR_FLAGS, Mode::empty()).map_err(|e| io(&[], e))?;
        let Ok(ldir) = open_beneath(&lroot, parent, false) else { continue };
        let st = match rustix::fs::statat(&ldir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(io(comps, e)),
        };
        let ft = FileType::from_raw_mode(st.st_mode);
        if ft == FileType::CharacterDevice && st.st_rdev == 0 {
            return Err(missing());
        }
        ensure_parents(root, &lroot, parent, opts)?;
        let up = open_beneath(root, parent, false)?;
        let meta = Meta { mode: st.st_mode & 0o7777, uid: st.st_uid, gid: st.st_gid, mtime: st.st_mtime };
        match ft {
            FileType::RegularFile => {
                let src = rustix::fs::openat(&ldir, os(name), OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty()).map_err(|e| io(comps, e))?;
                let dst = rustix::fs::openat(&up, os(name), OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::from_raw_mode(0o600))
                    .map_err(|e| io(comps, e))?;
                let mut dst = std::fs::File::from(dst);
                std::io::copy(&mut std::fs::File::from(src), &mut dst).map_err(|e| io(comps, e))?;
                let dst = OwnedFd::from(dst);
                if opts.as_root {
                    rustix::fs::fchown(&dst, Some(uid(meta.uid)), Some(gid(meta.gid))).map_err(|e| io(comps, e))?;
                }
                rustix::fs::fchmod(&dst, Mode::from_raw_mode(meta.mode)).map_err(|e| io(comps, e))?;
                rustix::fs::futimens(&dst, &times(meta.mtime)).map_err(|e| io(comps, e))?;
            }
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(&ldir, os(name), Vec::new()).map_err(|e| io(comps, e))?;
                rustix::fs::symlinkat(os(target.as_bytes()), &up, os(name)).map_err(|e| io(comps, e))?;
                finish_at(&up, name, &meta, opts, comps)?;
            }
            FileType::Fifo => {
                rustix::fs::mknodat(&up, os(name), FileType::Fifo, Mode::from_raw_mode(meta.mode), 0).map_err(|e| io(comps, e))?;
                finish_at(&up, name, &meta, opts, comps)?;
            }
            _ => return Err(UnpackError::Hostile { path: show(comps), why: "is a hard link to a directory or device" }),
        }
        if ft == FileType::RegularFile && st.st_nlink > 1 {
            let above = &lowers[lowers.iter().position(|l| l == lower).map_or(lowers.len(), |i| i + 1)..];
            copy_up_siblings(root, lower, &lroot, above, comps, (st.st_dev, st.st_ino), opts)?;
        }
        return Ok(());
    }
    Err(missing())
}

/// Creates missing parent directories in the layer with the metadata the lower layer
/// gives them: overlay shows the upper directory's owner and mode.
fn ensure_parents(root: &OwnedFd, lroot: &OwnedFd, parent: &[Vec<u8>], opts: &Options) -> Result<(), UnpackError> {
    for depth in 1..=parent.len() {
        let here = &parent[..depth];
        let Some((dname, dparent)) = here.split_last() else { continue };
        let up = open_beneath(root, dparent, false)?;
        if rustix::fs::statat(&up, os(dname), AtFlags::SYMLINK_NOFOLLOW).is_ok() {
            continue;
        }
        rustix::fs::mkdirat(&up, os(dname), Mode::from_raw_mode(IMPLIED_DIR_MODE)).map_err(|e| io(here, e))?;
        let dst = open_beneath(root, here, false)?;
        rustix::fs::fchmod(&dst, Mode::from_raw_mode(IMPLIED_DIR_MODE)).map_err(|e| io(here, e))?;
        if let Ok(src) = open_beneath(lroot, here, false) {
            let sst = rustix::fs::fstat(&src).map_err(|e| io(here, e))?;
            if opts.as_root {
                rustix::fs::fchown(&dst, Some(uid(sst.st_uid)), Some(gid(sst.st_gid))).map_err(|e| io(here, e))?;
            }
            rustix::fs::fchmod(&dst, Mode::from_raw_mode(sst.st_mode & 0o7777)).map_err(|e| io(here, e))?;
            rustix::fs::futimens(&dst, &times(sst.st_mtime)).map_err(|e| io(here, e))?;
        }
    }
    Ok(())
}

/// A copied-up file keeps its whole hard-link group: every other path of the lower
/// layer with the same inode, unless a layer above it (or this one) has that path.
fn copy_up_siblings(
    root: &OwnedFd,
    lower: &Path,
    lroot: &OwnedFd,
    above: &[PathBuf],
    target: &[Vec<u8>],
    inode: (u64, u64),
    opts: &Options,
) -> Result<(), UnpackError> {
    let mut siblings = Vec::new();
    find_inode(lower, Path::new(""), inode, &mut siblings).map_err(|e| io(target, e))?;
    let (tname, tparent) = target.split_last().ok_or_else(|| io(target, std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    for rel in siblings {
        let comps = clean(rel.as_os_str().as_bytes())?;
        if comps == target {
            continue;
        }
        let shadowed = |layer_root: &Path| (1..=comps.len()).any(|n| std::fs::symlink_metadata(layer_root.join(os(&comps[..n].join(&b'/')))).is_ok_and(|m| n == comps.len() || !m.is_dir()));
        let Some((name, parent)) = comps.split_last() else { continue };
        let in_layer = open_beneath(root, parent, false).ok().is_some_and(|d| rustix::fs::statat(&d, os(name), AtFlags::SYMLINK_NOFOLLOW).is_ok());
        if in_layer || above.iter().any(|l| shadowed(l)) {
            continue;
        }
        ensure_parents(root, lroot, parent, opts)?;
        let tdir = open_beneath(root, tparent, false)?;
        let ldir = open_beneath(root, parent, false)?;
        rustix::fs::linkat(&tdir, os(tname), &ldir, os(name), AtFlags::empty()).map_err(|e| io(&comps, e))?;
    }
    Ok(())
}

fn find_inode(root: &Path, rel: &Path, inode: (u64, u64), out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(root.join(rel))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        let here = rel.join(entry.file_name());
        if meta.is_dir() {
            find_inode(root, &here, inode, out)?;
        } else if (meta.dev(), meta.ino()) == inode {
            out.push(here);
        }
    }
    Ok(())
}
