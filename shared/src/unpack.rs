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

use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, XattrFlags, CWD};
use rustix::io::Errno;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

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

/// Whether a layer-dir entry is an overlay whiteout.
fn is_whiteout(meta: &std::fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

fn is_opaque(path: &Path) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    enum E<'a> {
        File(&'a str, &'a [u8], u32),
        Dir(&'a str, u32),
        Sym(&'a str, &'a str),
        Hard(&'a str, &'a str),
        Fifo(&'a str),
        Char(&'a str),
    }

    fn tar_of(entries: &[E]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_600_000_000);
            let (path, data): (&str, &[u8]) = match e {
                E::File(p, d, m) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*m);
                    (p, d)
                }
                E::Dir(p, m) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*m);
                    (p, b"")
                }
                E::Sym(p, t) | E::Hard(p, t) => {
                    h.set_entry_type(if matches!(e, E::Sym(..)) { tar::EntryType::Symlink } else { tar::EntryType::Link });
                    h.set_mode(0o777);
                    // Written raw so hostile link names reach the unpacker unchanged.
                    let name = h.as_old_mut();
                    name.linkname[..t.len()].copy_from_slice(t.as_bytes());
                    (p, b"")
                }
                E::Fifo(p) => {
                    h.set_entry_type(tar::EntryType::Fifo);
                    h.set_mode(0o644);
                    (p, b"")
                }
                E::Char(p) => {
                    h.set_entry_type(tar::EntryType::Char);
                    h.set_mode(0o644);
                    (p, b"")
                }
            };
            // Raw name too: tar::Builder refuses '..' itself, and we want to test the unpacker.
            h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// A GNU header with every numeric field set, for `Builder::append_data` (long names).
    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h
    }

    fn opts() -> Options {
        Options::for_caller()
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("berth-unpack-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A tar of one extension record of `size` bytes (zeros, or `record`) and a file after it.
    fn with_record(kind: tar::EntryType, size: u64, record: &[u8]) -> Vec<u8> {
        let mut h = header(kind, 0o644, size);
        h.set_path("././@LongLink").unwrap();
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        let mut data = record.to_vec();
        data.resize(size as usize, 0);
        out.extend(&data);
        out.resize(out.len().div_ceil(512) * 512, 0);
        let mut b = tar::Builder::new(out);
        let mut f = header(tar::EntryType::Regular, 0o644, 1);
        b.append_data(&mut f, "after", &b"x"[..]).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn extension_records_over_the_cap_are_refused_before_they_are_read() {
        for kind in [tar::EntryType::GNULongName, tar::EntryType::GNULongLink, tar::EntryType::XHeader, tar::EntryType::XGlobalHeader] {
            let d = tmp("record-cap");
            let size = MAX_HEADER_RECORD + 1;
            let err = unpack(&with_record(kind, size, b"")[..], &d, &opts()).unwrap_err().to_string();
            assert_eq!(err, format!("the layer has a tar header record of {size} bytes, larger than berth's cap of 1 MiB (a broken or hostile layer)"), "{kind:?}");
        }
        // The cap itself, and what real images carry, pass.
        let d = tmp("record-ok");
        let mut name = "n/".repeat(200).into_bytes();
        name.extend(b"long\0");
        unpack(&with_record(tar::EntryType::GNULongName, name.len() as u64, &name)[..], &d, &opts()).unwrap();
        assert!(d.join("n/".repeat(200)).join("long").exists() && !d.join("after").exists(), "the long name names the entry after it");
        let d = tmp("record-at-cap");
        unpack(&with_record(tar::EntryType::XGlobalHeader, MAX_HEADER_RECORD, b"")[..], &d, &opts()).unwrap();
        assert!(d.join("after").exists());
    }

    #[test]
    fn the_guard_follows_pax_sizes_and_sparse_extension_blocks_as_the_reader_does() {
        // A PAX size record makes the next entry longer than its header says; the
        // guard must skip exactly that much, then refuse the oversized record behind it.
        let body = vec![7u8; 3000];
        let record = b"13 size=3000\n";
        let mut h = header(tar::EntryType::XHeader, 0o644, record.len() as u64);
        h.set_path("././@PaxHeader").unwrap();
        h.set_cksum();
        let mut t = h.as_bytes().to_vec();
        t.extend(record);
        t.resize(t.len().div_ceil(512) * 512, 0);
        let mut f = header(tar::EntryType::Regular, 0o644, 100);
        f.set_path("big").unwrap();
        f.set_cksum();
        t.extend(f.as_bytes());
        t.extend(&body);
        t.resize(t.len().div_ceil(512) * 512, 0);
        let mut bomb = with_record(tar::EntryType::GNULongName, MAX_HEADER_RECORD + 1, b"");
        t.append(&mut bomb);
        let d = tmp("pax-size");
        let err = unpack(&t[..], &d, &opts()).unwrap_err();
        assert!(matches!(err, UnpackError::HeaderTooLarge { .. }), "{err}");
        assert_eq!(std::fs::metadata(d.join("big")).unwrap().len(), 3000);

        let mut guard = Guard::new(&[][..]);
        let mut sparse = header(tar::EntryType::GNUSparse, 0o644, 512);
        sparse.as_gnu_mut().unwrap().isextended[0] = 1;
        sparse.set_cksum();
        let mut ext = [0u8; 512];
        ext[504] = 0;
        guard.watch(sparse.as_bytes()).unwrap();
        guard.watch(&ext).unwrap();
        guard.watch(&[1u8; 512]).unwrap();
        let big = with_record(tar::EntryType::XHeader, MAX_HEADER_RECORD + 1, b"");
        assert_eq!(guard.watch(&big[..512]), Err(MAX_HEADER_RECORD + 1), "the block after the sparse data is a header");
    }

    #[test]
    fn the_budget_caps_bytes_and_entries_across_layers() {
        let budget = Budget::new(10, "10", 3);
        let (l1, l2) = (tmp("budget-1"), tmp("budget-2"));
        unpack_within(&tar_of(&[E::File("a", b"12345", 0o644), E::File("b", b"", 0o644)])[..], &l1, &opts(), &budget).unwrap();
        let err = unpack_within(&tar_of(&[E::File("c", b"123456", 0o644)])[..], &l2, &opts(), &budget).unwrap_err();
        assert_eq!(err.to_string(), "the image unpacks to more than max_image_size (10); raise max_image_size in the admin config if it is meant to be this large");
        assert!(err.is_refused() && !err.is_no_space());
        let budget = Budget::new(u64::MAX, "64G", 2);
        let err = unpack_within(&tar_of(&[E::Dir("d/", 0o755), E::File("d/a", b"", 0o644), E::File("d/b", b"", 0o644)])[..], &tmp("budget-3"), &opts(), &budget).unwrap_err();
        assert!(matches!(err, UnpackError::TooManyFiles { limit: 2 }), "{err}");
    }

    #[test]
    fn writes_files_dirs_links_and_overlay_whiteouts() {
        let d = tmp("basic");
        let t = tar_of(&[
            E::Dir("./", 0o755),
            E::Dir("etc/", 0o755),
            E::File("etc/a", b"hello", 0o4755),
            E::Hard("etc/b", "etc/a"),
            E::Sym("etc/s", "/etc/a"),
            E::Fifo("etc/f"),
            E::Char("etc/tty"),
            E::File("etc/.wh.gone", b"", 0o644),
            E::Dir("ro/", 0o555),
            E::File("ro/x", b"x", 0o444),
            E::File("ro/.wh..wh..opq", b"", 0o644),
            E::Hard("new", "lower/file"),
        ]);
        let out = unpack(&t[..], &d, &opts()).unwrap();
        let a = std::fs::metadata(d.join("etc/a")).unwrap();
        assert_eq!(std::fs::read(d.join("etc/a")).unwrap(), b"hello");
        assert_eq!(a.mode() & 0o7777, 0o4755);
        assert_eq!(a.ino(), std::fs::metadata(d.join("etc/b")).unwrap().ino());
        assert_eq!(std::fs::read_link(d.join("etc/s")).unwrap(), Path::new("/etc/a"));
        assert!(std::fs::symlink_metadata(d.join("etc/f")).unwrap().file_type().is_fifo());
        assert!(std::fs::symlink_metadata(d.join("etc/tty")).is_err(), "device nodes are dropped");
        assert!(is_whiteout(&std::fs::symlink_metadata(d.join("etc/gone")).unwrap()));
        assert!(std::fs::symlink_metadata(d.join("etc/.wh.gone")).is_err());
        assert!(is_opaque(&d.join("ro")));
        assert_eq!(std::fs::metadata(d.join("ro")).unwrap().mode() & 0o7777, 0o555);
        assert_eq!(out.external_links, vec![("new".to_string(), "lower/file".to_string())]);
        let _ = std::fs::set_permissions(d.join("ro"), std::fs::Permissions::from_mode(0o755));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn refuses_every_path_escape() {
        let outside = tmp("outside");
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("dotdot", tar_of(&[E::File("../escape", b"x", 0o644)])),
            ("dotdot-inner", tar_of(&[E::Dir("a/", 0o755), E::File("a/../../escape", b"x", 0o644)])),
            ("absolute", tar_of(&[E::File("/tmp/escape", b"x", 0o644)])),
            ("symlink-parent", tar_of(&[E::Sym("l", outside.to_str().unwrap()), E::File("l/escape", b"x", 0o644)])),
            ("symlink-dotdot", tar_of(&[E::Sym("l", "../../../../"), E::File("l/escape", b"x", 0o644)])),
            ("hardlink-out", tar_of(&[E::Hard("h", "../../etc/passwd")])),
            ("hardlink-abs", tar_of(&[E::Hard("h", "/etc/passwd")])),
            ("hardlink-via-symlink", tar_of(&[E::Sym("l", "/etc"), E::Hard("h", "l/passwd")])),
            ("whiteout-dotdot", tar_of(&[E::File(".wh..", b"", 0o644)])),
        ];
        for (name, t) in cases {
            let d = tmp(name);
            let err = unpack(&t[..], &d, &opts()).expect_err(name);
            assert!(matches!(err, UnpackError::Hostile { .. }), "{name}: {err}");
            assert!(err.to_string().starts_with("hostile layer: entry '"), "{name}: {err}");
            assert!(std::fs::read_dir(&outside).unwrap().next().is_none(), "{name} wrote outside");
            assert!(!Path::new("/tmp/escape").exists() && !d.parent().unwrap().join("escape").exists(), "{name}");
            std::fs::remove_dir_all(&d).unwrap();
        }
        std::fs::remove_dir_all(&outside).unwrap();
    }

    #[test]
    fn whiteouts_opaque_markers_and_dirs_never_act_through_a_symlink() {
        let outside = tmp("outside-wh");
        std::fs::write(outside.join("victim"), b"keep").unwrap();
        let target = outside.to_str().unwrap();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("whiteout-via-symlink", tar_of(&[E::Sym("l", target), E::File("l/.wh.victim", b"", 0o644)])),
            ("opaque-via-symlink", tar_of(&[E::Sym("l", target), E::File("l/.wh..wh..opq", b"", 0o644)])),
            ("dir-via-symlink", tar_of(&[E::Sym("l", target), E::Dir("l/sub/", 0o755)])),
            ("fifo-via-symlink", tar_of(&[E::Sym("l", target), E::Fifo("l/pipe")])),
            ("symlink-via-symlink", tar_of(&[E::Sym("l", target), E::Sym("l/s", "/etc/shadow")])),
            ("hardlink-into-symlink-dir", tar_of(&[E::File("f", b"x", 0o644), E::Sym("l", target), E::Hard("l/h", "f")])),
        ];
        for (name, t) in cases {
            let d = tmp(name);
            let err = unpack(&t[..], &d, &opts()).expect_err(name);
            assert!(matches!(err, UnpackError::Hostile { .. }), "{name}: {err}");
            let left: Vec<_> = std::fs::read_dir(&outside).unwrap().map(|e| e.unwrap().file_name()).collect();
            assert_eq!(left, ["victim"], "{name} touched the symlink's target");
            assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"keep", "{name}");
            assert!(!is_whiteout(&std::fs::symlink_metadata(outside.join("victim")).unwrap()) && !is_opaque(&outside), "{name}");
            std::fs::remove_dir_all(&d).unwrap();
        }
        std::fs::remove_dir_all(&outside).unwrap();
    }

    #[test]
    fn a_symlink_replaced_by_a_directory_is_written_inside_the_layer() {
        let outside = tmp("outside-replaced");
        let d = tmp("replaced");
        let t = tar_of(&[E::Sym("l", outside.to_str().unwrap()), E::Dir("l/", 0o755), E::File("l/x", b"in", 0o644), E::Sym("m", "/etc"), E::File("m", b"file", 0o644)]);
        unpack(&t[..], &d, &opts()).unwrap();
        assert!(std::fs::symlink_metadata(d.join("l")).unwrap().is_dir());
        assert_eq!(std::fs::read(d.join("l/x")).unwrap(), b"in");
        assert_eq!(std::fs::read(d.join("m")).unwrap(), b"file", "a file replaces the symlink, not its target");
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
        std::fs::remove_dir_all(&d).unwrap();
        std::fs::remove_dir_all(&outside).unwrap();
    }

    #[test]
    fn device_nodes_are_dropped_whatever_their_kind() {
        let d = tmp("devices");
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, major, minor) in [("sda", tar::EntryType::Block, 8, 0), ("mem", tar::EntryType::Char, 1, 1), ("kmsg", tar::EntryType::Char, 1, 11)] {
            let mut h = header(kind, 0o666, 0);
            h.set_device_major(major).unwrap();
            h.set_device_minor(minor).unwrap();
            b.append_data(&mut h, path, &b""[..]).unwrap();
        }
        unpack(&b.into_inner().unwrap()[..], &d, &opts()).unwrap();
        assert!(std::fs::read_dir(&d).unwrap().next().is_none(), "no device node may come from an image");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn very_long_paths_stay_inside_and_overlong_names_fail_cleanly() {
        let d = tmp("long");
        // 80 levels of 60-byte names: 4.9 KB, beyond PATH_MAX, fine component by component.
        let deep: String = (0..80).map(|i| format!("{i:0>60}/")).collect();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = header(tar::EntryType::Regular, 0o644, 4);
        b.append_data(&mut h, format!("{deep}leaf"), &b"deep"[..]).unwrap();
        unpack(&b.into_inner().unwrap()[..], &d, &opts()).unwrap();
        let mut fd = rustix::fs::open(&d, DIR_FLAGS, Mode::empty()).unwrap();
        for c in deep.split('/').filter(|c| !c.is_empty()) {
            fd = rustix::fs::openat(&fd, c, DIR_FLAGS, Mode::empty()).unwrap();
        }
        let leaf = rustix::fs::openat(&fd, "leaf", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).unwrap();
        let mut text = String::new();
        std::fs::File::from(leaf).read_to_string(&mut text).unwrap();
        assert_eq!(text, "deep");
        std::fs::remove_dir_all(&d).unwrap();

        let d = tmp("overlong");
        let mut b = tar::Builder::new(Vec::new());
        let mut h = header(tar::EntryType::Regular, 0o644, 0);
        b.append_data(&mut h, "n".repeat(300), &b""[..]).unwrap();
        let err = unpack(&b.into_inner().unwrap()[..], &d, &opts()).unwrap_err();
        assert!(err.to_string().contains("File name too long"), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn hard_links_to_lower_layers_never_follow_a_lower_symlink_out() {
        let base = tmp("lower-symlink");
        let (l1, l2) = (base.join("l1"), base.join("l2"));
        std::fs::create_dir(&l1).unwrap();
        std::fs::create_dir(&l2).unwrap();
        unpack(&tar_of(&[E::Sym("etc", "/etc"), E::Sym("up", "../../..")])[..], &l1, &opts()).unwrap();
        for (name, target) in [("passwd-link", "etc/passwd"), ("up-link", "up/etc/passwd")] {
            let ext = unpack(&tar_of(&[E::Hard(name, target)])[..], &l2, &opts()).unwrap();
            assert_eq!(ext.external_links.len(), 1, "{name}");
            let err = link_from_lowers(&l2, &[l1.clone()], &ext.external_links, &opts()).unwrap_err();
            assert!(matches!(err, UnpackError::Hostile { .. }), "{name}: {err}");
            assert!(std::fs::symlink_metadata(l2.join(name)).is_err(), "{name}");
        }
        assert!(!l2.join("etc").exists(), "nothing of the host's /etc was copied up");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn rejects_forged_overlay_xattrs_and_garbage() {
        let d = tmp("garbage");
        let err = unpack(&b"this is not a tar archive at all, just text padding it out"[..], &d, &opts());
        // A short non-tar stream reads as an empty archive or an error; either way nothing is written.
        assert!(err.is_err() || std::fs::read_dir(&d).unwrap().next().is_none());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn lower_hard_links_are_copied_up_and_layers_flatten_like_applying_them() {
        let base = tmp("flatten");
        let (l1, l2, l3, out) = (base.join("l1"), base.join("l2"), base.join("l3"), base.join("out"));
        for p in [&l1, &l2, &l3, &out] {
            std::fs::create_dir(p).unwrap();
        }
        unpack(
            &tar_of(&[
                E::Dir("d/", 0o755),
                E::File("d/keep", b"k", 0o644),
                E::File("d/old", b"o", 0o644),
                E::Dir("opq/", 0o700),
                E::File("opq/hidden", b"h", 0o644),
                E::File("bin", b"b", 0o755),
                E::Sym("link", "bin"),
            ])[..],
            &l1,
            &opts(),
        )
        .unwrap();
        unpack(&tar_of(&[E::Dir("d/", 0o755), E::File("d/.wh.old", b"", 0o644), E::Dir("opq/", 0o750), E::File("opq/.wh..wh..opq", b"", 0o644), E::File("opq/new", b"n", 0o600)])[..], &l2, &opts()).unwrap();
        let ext = unpack(&tar_of(&[E::Dir("x/", 0o755), E::Hard("x/bin2", "bin")])[..], &l3, &opts()).unwrap();
        assert_eq!(ext.external_links.len(), 1);
        link_from_lowers(&l3, &[l1.clone(), l2.clone()], &ext.external_links, &opts()).unwrap();
        assert_eq!(std::fs::metadata(l3.join("bin")).unwrap().ino(), std::fs::metadata(l3.join("x/bin2")).unwrap().ino());
        flatten(&[l1, l2, l3], &out, &opts()).unwrap();
        assert_eq!(std::fs::read(out.join("d/keep")).unwrap(), b"k");
        assert!(!out.join("d/old").exists());
        assert!(!out.join("opq/hidden").exists());
        assert_eq!(std::fs::read(out.join("opq/new")).unwrap(), b"n");
        assert_eq!(std::fs::metadata(out.join("opq")).unwrap().mode() & 0o7777, 0o750);
        let (a, b) = (std::fs::metadata(out.join("bin")).unwrap(), std::fs::metadata(out.join("x/bin2")).unwrap());
        assert_eq!((a.ino(), a.nlink(), a.mode() & 0o777), (b.ino(), 2, 0o755));
        assert_eq!(std::fs::read_link(out.join("link")).unwrap(), Path::new("bin"));
        std::fs::remove_dir_all(&base).unwrap();
    }
}
