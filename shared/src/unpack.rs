//! Layer application: one tar stream (already decompressed) written into one empty
//! layer directory in overlayfs form, and the flattening of a stack of such
//! directories into a plain root filesystem (`berth export`).
//!
//! Every layer is hostile input. All paths are resolved here, component by component
//! from a directory fd with `O_NOFOLLOW`, so nothing is ever written through a symlink;
//! `..` and absolute paths are refused; hard links may only point inside the layer
//! (links to files of lower layers are recorded and copied up by [`link_from_lowers`]);
//! device nodes are dropped; image xattrs that would forge overlay markers are dropped.
//!
//! Overlay form: an OCI whiteout `.wh.NAME` becomes a 0/0 character device `NAME`
//! (allowed without `CAP_MKNOD` since Linux 5.8, so it works for non-root too); an
//! opaque marker `.wh..wh..opq` becomes the xattr `<prefix>opaque=y` on its directory,
//! with prefix `trusted.overlay.` when unpacking as root and `user.overlay.` otherwise
//! (non-root cannot set `trusted.*`; such layers are mounted with overlay's `userxattr`
//! option, in a user namespace, Linux 5.11+). Ownership is kept only when run as root.
//!
//! Bounded: a tar extension record (GNU long name or link, PAX header), which the tar
//! reader holds in memory, may be at most [`MAX_HEADER_RECORD`] bytes ([`Guard`] sees
//! each header before the tar reader reads its record); the bytes and entries an image
//! writes are counted against the admin's caps ([`Budget`]), so a decompression bomb
//! stops at the cap, not at a full disk.
//!
//! Modes are the tar entries' exactly (set through the fd, so the caller's umask takes
//! nothing away and adds nothing); directories a stream implies without listing them
//! get 0755.
//!
//! Never follows a symlink from the image while writing, never writes outside the
//! directory it was given, never touches the network.
//!
//! Split: `unpack/links.rs` completes hard links to lower layers
//! ([`link_from_lowers`]), `unpack/flatten.rs` flattens layer dirs ([`flatten`]); this
//! file applies a layer and owns the guards, caps and path resolution they share.

use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

mod flatten;
mod links;
#[cfg(test)]
mod tests;

pub use flatten::flatten;
pub use links::link_from_lowers;

/// Largest tar extension record (GNU long name or link, PAX header) berth reads.
pub const MAX_HEADER_RECORD: u64 = 1 << 20;

/// Overlay xattr prefix for layers unpacked by root.
pub const TRUSTED_PREFIX: &str = "trusted.overlay.";
/// Overlay xattr prefix for layers unpacked without root (mount with `userxattr`).
pub const USER_PREFIX: &str = "user.overlay.";

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("hostile layer: entry '{path}' {why}")]
    Hostile { path: String, why: &'static str },
    #[error("cannot write '{path}': {source}")]
    Io { path: String, source: std::io::Error },
    #[error("the layer is not a valid tar stream: {0}")]
    Tar(std::io::Error),
    #[error("the layer has a tar header record of {size} bytes, larger than berth's cap of 1 MiB (a broken or hostile layer)")]
    HeaderTooLarge { size: u64 },
    #[error("the image unpacks to more than max_image_size ({limit}); raise max_image_size in the admin config if it is meant to be this large")]
    TooLarge { limit: String },
    #[error("the image has more than max_image_files ({limit}) files; raise max_image_files in the admin config if it is meant to have this many")]
    TooManyFiles { limit: u64 },
}

impl UnpackError {
    /// Whether the underlying cause is a full file system (so callers can say "free space").
    pub fn is_no_space(&self) -> bool {
        match self {
            UnpackError::Io { source, .. } | UnpackError::Tar(source) => is_no_space(source),
            _ => false,
        }
    }

    /// Whether the layer itself is refused (hostile, or beyond a cap), whatever its digest.
    pub fn is_refused(&self) -> bool {
        matches!(self, UnpackError::Hostile { .. } | UnpackError::HeaderTooLarge { .. } | UnpackError::TooLarge { .. } | UnpackError::TooManyFiles { .. })
    }
}

/// How many bytes and files the layers of one image may still write, shared by the
/// threads unpacking them.
#[derive(Debug)]
pub struct Budget {
    bytes_left: AtomicU64,
    files_left: AtomicU64,
    /// `max_image_size` as the admin wrote it, for the error.
    size_limit: String,
    files_limit: u64,
}

impl Budget {
    pub fn new(max_bytes: u64, size_limit: &str, max_files: u64) -> Budget {
        Budget { bytes_left: AtomicU64::new(max_bytes), files_left: AtomicU64::new(max_files), size_limit: size_limit.into(), files_limit: max_files }
    }

    /// No cap at all (for callers that unpack what they trust).
    pub fn unlimited() -> Budget {
        Budget::new(u64::MAX, "unlimited", u64::MAX)
    }

    fn take(left: &AtomicU64, n: u64) -> bool {
        left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(n)).is_ok()
    }

    fn bytes(&self, n: u64) -> Result<(), UnpackError> {
        Budget::take(&self.bytes_left, n).then_some(()).ok_or_else(|| UnpackError::TooLarge { limit: self.size_limit.clone() })
    }

    fn file(&self) -> Result<(), UnpackError> {
        Budget::take(&self.files_left, 1).then_some(()).ok_or(UnpackError::TooManyFiles { limit: self.files_limit })
    }
}

/// Watches a tar stream on its way to the tar reader, block by block as the format
/// lays them out, and fails the read that would carry an extension record (GNU `L`/`K`,
/// PAX `x`/`g`) larger than [`MAX_HEADER_RECORD`] before the reader buffers it. Follows
/// what the reader follows: sizes from headers, a PAX `size` for the next entry, GNU
/// sparse extension blocks; stops watching at the first zero block (the reader's end).
struct Guard<R> {
    inner: R,
    state: GuardState,
    block: Vec<u8>,
    /// The PAX record being read (to find a `size` for the next entry).
    record: Vec<u8>,
    pax_size: Option<u64>,
    /// Where a GNU sparse header's extension blocks lead: its data.
    after_sparse: Option<GuardState>,
    refused: Option<u64>,
}

enum GuardState {
    Header,
    SparseExtension,
    /// `left` bytes of data and padding; `pax`: the length of a PAX record among them.
    Data { left: u64, pax: Option<u64> },
    Done,
}

const BLOCK: usize = 512;

impl<R: Read> Guard<R> {
    fn new(inner: R) -> Self {
        Guard { inner, state: GuardState::Header, block: Vec::with_capacity(BLOCK), record: Vec::new(), pax_size: None, after_sparse: None, refused: None }
    }

    /// Advances over bytes the reader is about to get; `Err(size)` for a record over the cap.
    fn watch(&mut self, mut bytes: &[u8]) -> Result<(), u64> {
        while !bytes.is_empty() {
            match &mut self.state {
                GuardState::Done => return Ok(()),
                GuardState::Data { left, pax } => {
                    let n = (*left).min(bytes.len() as u64) as usize;
                    if pax.is_some() {
                        self.record.extend_from_slice(&bytes[..n]);
                    }
                    *left -= n as u64;
                    bytes = &bytes[n..];
                    if *left == 0 {
                        if let Some(len) = *pax {
                            self.record.truncate(len as usize);
                            self.pax_size = pax_size(&self.record);
                            self.record.clear();
                        }
                        self.state = GuardState::Header;
                    }
                }
                GuardState::Header | GuardState::SparseExtension => {
                    let n = (BLOCK - self.block.len()).min(bytes.len());
                    self.block.extend_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    if self.block.len() == BLOCK {
                        let block = std::mem::take(&mut self.block);
                        self.next_state(&block)?;
                        self.block = block;
                        self.block.clear();
                    }
                }
            }
        }
        Ok(())
    }

    fn next_state(&mut self, block: &[u8]) -> Result<(), u64> {
        if matches!(self.state, GuardState::SparseExtension) {
            // `isextended` of a GNU sparse extension block.
            if block[504] == 0 {
                self.state = self.after_sparse.take().unwrap_or(GuardState::Header);
            }
            return Ok(());
        }
        if block.iter().all(|b| *b == 0) {
            self.state = GuardState::Done;
            return Ok(());
        }
        let header = tar::Header::from_byte_slice(block);
        let Ok(size) = header.entry_size() else {
            // The reader refuses this header itself.
            self.state = GuardState::Done;
            return Ok(());
        };
        let kind = header.entry_type();
        let record = kind.is_gnu_longname() || kind.is_gnu_longlink() || kind.is_pax_local_extensions() || kind.is_pax_global_extensions();
        if record && size > MAX_HEADER_RECORD {
            return Err(size);
        }
        let size = if record { size } else { self.pax_size.take().unwrap_or(size) };
        let padded = size.div_ceil(BLOCK as u64).saturating_mul(BLOCK as u64);
        let data = GuardState::Data { left: padded, pax: kind.is_pax_local_extensions().then_some(size) };
        self.state = if padded == 0 { GuardState::Header } else { data };
        if kind.is_gnu_sparse() && header.as_gnu().is_some_and(|g| g.is_extended()) {
            self.after_sparse = Some(std::mem::replace(&mut self.state, GuardState::SparseExtension));
        }
        Ok(())
    }
}

/// The `size` record of a PAX extension, as the tar reader takes it.
fn pax_size(record: &[u8]) -> Option<u64> {
    tar::PaxExtensions::new(record).filter_map(Result::ok).find(|e| e.key() == Ok("size")).and_then(|e| e.value().ok()?.parse().ok())
}

impl<R: Read> Read for Guard<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Err(size) = self.watch(&buf[..n]) {
            self.refused = Some(size);
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "tar header record over the cap"));
        }
        Ok(n)
    }
}

/// Whether an I/O error (or one it wraps) is ENOSPC or EDQUOT.
pub fn is_no_space(e: &std::io::Error) -> bool {
    if matches!(e.raw_os_error(), Some(code) if code == Errno::NOSPC.raw_os_error() || code == Errno::DQUOT.raw_os_error()) {
        return true;
    }
    e.get_ref().and_then(|inner| inner.downcast_ref::<std::io::Error>()).is_some_and(is_no_space)
}

/// How to write layers.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Keep owners and image xattrs outside `user.*` (needs root).
    pub as_root: bool,
    /// Mark opaque directories with `user.overlay.*` instead of `trusted.overlay.*`.
    pub userxattr: bool,
}

impl Options {
    /// Root keeps owners and uses `trusted.overlay.*`; anyone else neither.
    pub fn for_caller() -> Options {
        let root = rustix::process::geteuid().is_root();
        Options { as_root: root, userxattr: !root }
    }

    pub fn overlay_prefix(&self) -> &'static str {
        if self.userxattr {
            USER_PREFIX
        } else {
            TRUSTED_PREFIX
        }
    }
}

/// What unpacking a layer found that needs the layers below it.
#[derive(Debug, Default)]
pub struct Unpacked {
    /// Hard links (`link`, `target`) whose target is not in this layer.
    pub external_links: Vec<(String, String)>,
}

type Comps = Vec<Vec<u8>>;

/// Splits a tar path into clean components; refuses `..` and absolute paths.
fn clean(raw: &[u8]) -> Result<Comps, UnpackError> {
    let shown = || String::from_utf8_lossy(raw).into_owned();
    if raw.starts_with(b"/") {
        return Err(UnpackError::Hostile { path: shown(), why: "is an absolute path" });
    }
    let mut comps = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(UnpackError::Hostile { path: shown(), why: "contains '..'" }),
            _ => comps.push(c.to_vec()),
        }
    }
    Ok(comps)
}

fn show(comps: &[Vec<u8>]) -> String {
    String::from_utf8_lossy(&comps.join(&b'/')).into_owned()
}

fn io(path: &[Vec<u8>], e: impl Into<std::io::Error>) -> UnpackError {
    UnpackError::Io { path: show(path), source: e.into() }
}

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

const DIR_FLAGS: OFlags = OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);

/// The mode of a directory the tar stream implies but does not list, whatever the
/// caller's umask (set through the fd: mkdir's mode is filtered by the umask).
const IMPLIED_DIR_MODE: u32 = 0o755;

/// Opens `comps` below `root` without following any symlink; creates missing
/// directories (mode 0755) when `create`.
fn open_beneath(root: &OwnedFd, comps: &[Vec<u8>], create: bool) -> Result<OwnedFd, UnpackError> {
    let mut cur = rustix::fs::openat(root, ".", DIR_FLAGS, Mode::empty()).map_err(|e| io(&[], e))?;
    for (i, c) in comps.iter().enumerate() {
        let here = &comps[..=i];
        let next = match rustix::fs::openat(&cur, os(c), DIR_FLAGS, Mode::empty()) {
            Err(Errno::NOENT) if create => {
                let made = match rustix::fs::mkdirat(&cur, os(c), Mode::from_raw_mode(IMPLIED_DIR_MODE)) {
                    Ok(()) => true,
                    Err(Errno::EXIST) => false,
                    Err(e) => return Err(io(here, e)),
                };
                let fd = rustix::fs::openat(&cur, os(c), DIR_FLAGS, Mode::empty());
                match fd {
                    Ok(fd) if made => {
                        rustix::fs::fchmod(&fd, Mode::from_raw_mode(IMPLIED_DIR_MODE)).map_err(|e| io(here, e))?;
                        Ok(fd)
                    }
                    other => other,
                }
            }
            other => other,
        };
        cur = match next {
            Ok(fd) => fd,
            Err(Errno::LOOP | Errno::NOTDIR) => {
                return Err(UnpackError::Hostile { path: show(here), why: "is a symlink or a file, and entries may not be written through it" })
            }
            Err(e) => return Err(io(here, e)),
        };
    }
    Ok(cur)
}

/// Removes whatever is at `dir/name` unless it is a directory and `keep_dir`.
/// Returns whether a directory was kept.
fn clear_slot(dir: &OwnedFd, dir_path: &Path, name: &[u8], keep_dir: bool, shown: &[Vec<u8>]) -> Result<bool, UnpackError> {
    match rustix::fs::statat(dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => Ok(false),
        Err(e) => Err(io(shown, e)),
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
            if keep_dir {
                return Ok(true);
            }
            // std's remove_dir_all never follows symlinks inside the tree.
            std::fs::remove_dir_all(dir_path.join(os(name))).map_err(|e| io(shown, e))?;
            Ok(false)
        }
        Ok(_) => {
            rustix::fs::unlinkat(dir, os(name), AtFlags::empty()).map_err(|e| io(shown, e))?;
            Ok(false)
        }
    }
}

struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
}

fn times(mtime: i64) -> Timestamps {
    let t = Timespec { tv_sec: mtime, tv_nsec: 0 };
    Timestamps { last_access: t, last_modification: t }
}

/// Writes one layer's tar stream into `dest` (an existing, empty directory), with no
/// cap on what it writes.
pub fn unpack<R: Read>(reader: R, dest: &Path, opts: &Options) -> Result<Unpacked, UnpackError> {
    unpack_within(reader, dest, opts, &Budget::unlimited())
}

/// [`unpack`], counting every byte and entry written against `budget`.
pub fn unpack_within<R: Read>(reader: R, dest: &Path, opts: &Options, budget: &Budget) -> Result<Unpacked, UnpackError> {
    let mut guard = Guard::new(reader);
    let result = apply(&mut guard, dest, opts, budget);
    match guard.refused {
        Some(size) => Err(UnpackError::HeaderTooLarge { size }),
        None => result,
    }
}

fn apply<R: Read>(reader: R, dest: &Path, opts: &Options, budget: &Budget) -> Result<Unpacked, UnpackError> {
    let root: OwnedFd = rustix::fs::open(dest, DIR_FLAGS, Mode::empty()).map_err(|e| io(&[], e))?;
    let prefix = opts.overlay_prefix();
    let mut out = Unpacked::default();
    let mut dirs: Vec<(Comps, Meta)> = Vec::new();
    let mut cached: Option<(Comps, OwnedFd)> = None;
    let mut buf = vec![0u8; 256 * 1024];
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(UnpackError::Tar)? {
        let mut entry = entry.map_err(UnpackError::Tar)?;
        let comps = clean(&entry.path_bytes())?;
        let header = entry.header();
        let kind = header.entry_type();
        let meta = Meta {
            mode: header.mode().map_err(UnpackError::Tar)? & 0o7777,
            uid: header.uid().map_err(UnpackError::Tar)? as u32,
            gid: header.gid().map_err(UnpackError::Tar)? as u32,
            mtime: header.mtime().map_err(UnpackError::Tar)? as i64,
        };
        let Some((name, parent)) = comps.split_last() else {
            if kind.is_dir() {
                dirs.push((Vec::new(), meta));
            }
            continue;
        };
        if matches!(kind, tar::EntryType::XGlobalHeader | tar::EntryType::XHeader | tar::EntryType::GNULongName | tar::EntryType::GNULongLink) {
            continue;
        }
        budget.file()?;
        let dir = match cached.take() {
            Some((p, fd)) if p.as_slice() == parent => fd,
            _ => open_beneath(&root, parent, true)?,
        };
        let dir_path = dest.join(os(&parent.join(&b'/')));
        if name == b".wh..wh..opq" {
            set_xattr(&dir, &format!("{prefix}opaque"), b"y").map_err(|e| io(&comps, e))?;
        } else if let Some(hidden) = name.strip_prefix(b".wh.") {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(UnpackError::Hostile { path: show(&comps), why: "is a whiteout of nothing" });
            }
            let shown = [parent, &[hidden.to_vec()]].concat();
            clear_slot(&dir, &dir_path, hidden, false, &shown)?;
            rustix::fs::mknodat(&dir, os(hidden), FileType::CharacterDevice, Mode::empty(), rustix::fs::makedev(0, 0))
                .map_err(|e| io(&shown, e))?;
        } else {
            let xattrs = pax_xattrs(&mut entry, opts)?;
            match kind {
                tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                    clear_slot(&dir, &dir_path, name, false, &comps)?;
                    let fd = rustix::fs::openat(
                        &dir,
                        os(name),
                        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::from_raw_mode(0o600),
                    )
                    .map_err(|e| io(&comps, e))?;
                    let mut file = std::fs::File::from(fd);
                    loop {
                        let n = match entry.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => n,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                            Err(e) => return Err(UnpackError::Tar(e)),
                        };
                        budget.bytes(n as u64)?;
                        file.write_all(&buf[..n]).map_err(|e| io(&comps, e))?;
                    }
                    let fd = OwnedFd::from(file);
                    if opts.as_root {
                        rustix::fs::fchown(&fd, Some(uid(meta.uid)), Some(gid(meta.gid))).map_err(|e| io(&comps, e))?;
                    }
                    rustix::fs::fchmod(&fd, Mode::from_raw_mode(meta.mode)).map_err(|e| io(&comps, e))?;
                    for (k, v) in &xattrs {
                        set_xattr(&fd, k, v).map_err(|e| io(&comps, e))?;
                    }
                    rustix::fs::futimens(&fd, &times(meta.mtime)).map_err(|e| io(&comps, e))?;
                }
                tar::EntryType::Directory => {
                    if !clear_slot(&dir, &dir_path, name, true, &comps)? {
                        rustix::fs::mkdirat(&dir, os(name), Mode::from_raw_mode(0o755)).map_err(|e| io(&comps, e))?;
                    }
                    if !xattrs.is_empty() {
                        let fd = open_beneath(&root, &comps, false)?;
                        for (k, v) in &xattrs {
                            set_xattr(&fd, k, v).map_err(|e| io(&comps, e))?;
                        }
                    }
                    dirs.push((comps.clone(), meta));
                }
                tar::EntryType::Symlink => {
                    let target = entry.link_name_bytes().ok_or_else(|| UnpackError::Hostile { path: show(&comps), why: "is a symlink without a target" })?;
                    clear_slot(&dir, &dir_path, name, false, &comps)?;
                    rustix::fs::symlinkat(os(&target), &dir, os(name)).map_err(|e| io(&comps, e))?;
                    finish_at(&dir, name, &meta, opts, &comps)?;
                }
                tar::EntryType::Link => {
                    let raw = entry.link_name_bytes().ok_or_else(|| UnpackError::Hostile { path: show(&comps), why: "is a hard link without a target" })?;
                    let target = clean(&raw)?;
                    let Some((tname, tparent)) = target.split_last() else {
                        return Err(UnpackError::Hostile { path: show(&comps), why: "is a hard link to the layer root" });
                    };
                    clear_slot(&dir, &dir_path, name, false, &comps)?;
                    let linked = match open_beneath(&root, tparent, false) {
                        Ok(tdir) => rustix::fs::linkat(&tdir, os(tname), &dir, os(name), AtFlags::empty()),
                        Err(UnpackError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Err(Errno::NOENT),
                        Err(e) => return Err(e),
                    };
                    match linked {
                        Ok(()) => {}
                        Err(Errno::NOENT) => out.external_links.push((show(&comps), show(&target))),
                        Err(Errno::PERM) => return Err(UnpackError::Hostile { path: show(&comps), why: "is a hard link to a directory" }),
                        Err(e) => return Err(io(&comps, e)),
                    }
                }
                tar::EntryType::Fifo => {
                    clear_slot(&dir, &dir_path, name, false, &comps)?;
                    rustix::fs::mknodat(&dir, os(name), FileType::Fifo, Mode::from_raw_mode(0o600), 0).map_err(|e| io(&comps, e))?;
                    finish_at(&dir, name, &meta, opts, &comps)?;
                    rustix::fs::chmodat(&dir, os(name), Mode::from_raw_mode(meta.mode), AtFlags::empty()).map_err(|e| io(&comps, e))?;
                }
                // Device nodes are dropped: a container gets its devices from the runtime, never from an image.
                _ => {}
            }
        }
        cached = Some((parent.to_vec(), dir));
    }
    drop(cached);
    // Directory modes and times last, deepest first, so that read-only directories
    // can still be filled and children do not bump their parents' mtimes.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.0.len()));
    for (comps, meta) in dirs {
        let fd = open_beneath(&root, &comps, false)?;
        if opts.as_root {
            rustix::fs::fchown(&fd, Some(uid(meta.uid)), Some(gid(meta.gid))).map_err(|e| io(&comps, e))?;
        }
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(meta.mode)).map_err(|e| io(&comps, e))?;
        rustix::fs::futimens(&fd, &times(meta.mtime)).map_err(|e| io(&comps, e))?;
    }
    Ok(out)
}

fn uid(u: u32) -> rustix::fs::Uid {
    rustix::fs::Uid::from_raw(u)
}

fn gid(g: u32) -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw(g)
}

/// Owner and mtime of a non-regular, non-directory entry, without following it.
fn finish_at(dir: &OwnedFd, name: &[u8], meta: &Meta, opts: &Options, comps: &[Vec<u8>]) -> Result<(), UnpackError> {
    if opts.as_root {
        rustix::fs::chownat(dir, os(name), Some(uid(meta.uid)), Some(gid(meta.gid)), AtFlags::SYMLINK_NOFOLLOW).map_err(|e| io(comps, e))?;
    }
    rustix::fs::utimensat(dir, os(name), &times(meta.mtime), AtFlags::SYMLINK_NOFOLLOW).map_err(|e| io(comps, e))
}

fn set_xattr(fd: &impl AsFd, name: &str, value: &[u8]) -> std::io::Result<()> {
    rustix::fs::fsetxattr(fd, name, value, XattrFlags::empty()).map_err(Into::into)
}

/// The entry's `SCHILY.xattr.*` PAX records that may be applied: never overlay
/// markers (an image must not forge whiteouts), and only `user.*` without root.
fn pax_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>, opts: &Options) -> Result<Vec<(String, Vec<u8>)>, UnpackError> {
    let mut out = Vec::new();
    let Some(exts) = entry.pax_extensions().map_err(UnpackError::Tar)? else { return Ok(out) };
    for ext in exts {
        let ext = ext.map_err(UnpackError::Tar)?;
        let Ok(key) = ext.key() else { continue };
        let Some(name) = key.strip_prefix("SCHILY.xattr.") else { continue };
        let forged = name.starts_with(TRUSTED_PREFIX) || name.starts_with(USER_PREFIX);
        if forged || (!opts.as_root && !name.starts_with("user.")) {
            continue;
        }
        out.push((name.to_string(), ext.value_bytes().to_vec()));
    }
    Ok(out)
}
