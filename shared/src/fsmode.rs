//! Files and directories with the mode berth names, whatever umask the caller gave it:
//! slurmstepd and pbs_mom start berth with the job user's umask (0 if the user likes), so
//! every file or dir berth makes in the node's store or runtime dir is created, then
//! set to its mode through the descriptor it was made with (`fchmod`), and root entry
//! points also set umask 022 ([`root_umask`]). Also the one check of what berth reads
//! back as root: [`trusted`], owned by root (or the caller) and writable by nobody else.
//!
//! Owns creating files and dirs with exact modes; never follows a symlink in the last
//! component of what it creates, never changes the mode of an entry it did not create
//! except through [`ensure_dir`], for berth's own directories.

use rustix::fd::OwnedFd;
use rustix::fs::{FileType, Mode, OFlags, Stat};
use std::fs::File;
use std::io::Write;
use std::path::Path;

const DIR: OFlags = OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);

/// For root entry points (the `berth` binary, the PBS hooks): a umask that filters
/// nothing berth needs, set before anything is created. Modes are set explicitly too.
pub fn root_umask() {
    if rustix::process::geteuid().is_root() {
        rustix::process::umask(Mode::from_raw_mode(0o022));
    }
}

/// Creates `path` (which must not exist) as a directory of exactly `mode`.
pub fn create_dir(path: &Path, mode: u32) -> std::io::Result<()> {
    rustix::fs::mkdir(path, Mode::from_raw_mode(mode & 0o700))?;
    let fd = rustix::fs::open(path, DIR, Mode::empty())?;
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
    Ok(())
}

/// Makes `path` a directory of exactly `mode`, creating missing parents with 0755. An
/// existing directory must be the caller's (else `PermissionDenied`) and gets `mode`;
/// `path` itself may not be a symlink (its parents may: an admin's `/var/lib -> /data`).
pub fn ensure_dir(path: &Path, mode: u32) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                if !parent.is_dir() {
                    ensure_dir(parent, 0o755)?;
                }
            }
            match create_dir(path, mode) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                other => return other,
            }
        }
        Err(e) => return Err(e),
        Ok(_) => {}
    }
    let fd = rustix::fs::open(path, DIR, Mode::empty())?;
    let st = rustix::fs::fstat(&fd)?;
    if st.st_uid != rustix::process::geteuid().as_raw() {
        return Err(not_ours(path, &st));
    }
    if st.st_mode & 0o7777 != mode {
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
    }
    Ok(())
}

/// Creates `path` (which must not exist, and is never followed) as a file of exactly `mode`.
pub fn create_file(path: &Path, mode: u32) -> std::io::Result<File> {
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::open(path, flags, Mode::from_raw_mode(mode & 0o700))?;
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
    Ok(File::from(fd))
}

/// Replaces `path` whole with `bytes` in a file of exactly `mode`, through
/// `<path>.tmp` (a leftover there, of a writer killed half-way, is removed first: the
/// caller holds whatever lock makes it the only writer of `path`).
pub fn replace_whole(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    replace(&tmp, path, bytes, mode)
}

/// Writes `bytes` to the new file `tmp` of `mode`, syncs it and renames it to `path`, so
/// readers see all or nothing; `tmp` is removed when anything fails.
pub fn replace(tmp: &Path, path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let result = (|| {
        let mut f = create_file(tmp, mode)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

/// Opens a lock file that only its owner can open: created 0600 when missing, never
/// through a symlink, and refused unless it is a regular file of the caller's with no
/// access for group or others (a lock others could open, they could hold forever).
pub fn open_private(path: &Path) -> std::io::Result<File> {
    let flags = OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd: OwnedFd = rustix::fs::open(path, flags, Mode::from_raw_mode(0o600))?;
    let st = rustix::fs::fstat(&fd)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile || st.st_uid != rustix::process::geteuid().as_raw() {
        return Err(not_ours(path, &st));
    }
    if st.st_mode & 0o077 != 0 {
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o600))?;
    }
    Ok(File::from(fd))
}

/// Whether what `st` describes may be believed by the caller: owned by root or by the
/// caller, and writable by no one else. For root, only root's.
pub fn trusted(st: &Stat) -> bool {
    let me = rustix::process::geteuid().as_raw();
    (st.st_uid == 0 || st.st_uid == me) && st.st_mode & 0o022 == 0
}

fn not_ours(path: &Path, st: &Stat) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        format!(
            "{} belongs to uid {} (mode {:o}), not to uid {}: someone else made it; remove it",
            path.display(),
            st.st_uid,
            st.st_mode & 0o7777,
            rustix::process::geteuid().as_raw()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("berth-fsmode-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn modes_are_exact_whatever_the_umask() {
        // Modes with group and other write bits, which the usual umask (022) would take:
        // the process umask is shared with every other test, so it is not changed here.
        let d = scratch("modes");
        ensure_dir(&d.join("a/b"), 0o770).unwrap();
        create_dir(&d.join("c"), 0o775).unwrap();
        create_file(&d.join("f"), 0o666).unwrap();
        replace(&d.join("t"), &d.join("r"), b"x", 0o620).unwrap();
        assert_eq!((mode(&d.join("a")), mode(&d.join("a/b"))), (0o755, 0o770));
        assert_eq!((mode(&d.join("c")), mode(&d.join("f")), mode(&d.join("r"))), (0o775, 0o666, 0o620));
        assert!(!d.join("t").exists());
        assert!(create_dir(&d.join("c"), 0o755).is_err() && create_file(&d.join("f"), 0o644).is_err(), "never reuses what exists");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn existing_dirs_get_their_mode_and_nothing_is_followed_or_shared() {
        let d = scratch("exist");
        std::fs::create_dir(d.join("open")).unwrap();
        std::fs::set_permissions(d.join("open"), std::fs::Permissions::from_mode(0o777)).unwrap();
        ensure_dir(&d.join("open"), 0o755).unwrap();
        assert_eq!(mode(&d.join("open")), 0o755);
        std::os::unix::fs::symlink(d.join("open"), d.join("link")).unwrap();
        assert!(ensure_dir(&d.join("link"), 0o755).is_err(), "a symlink is never taken for the dir");
        assert!(create_file(&d.join("link"), 0o644).is_err());
        assert!(open_private(&d.join("link")).is_err(), "a lock file is never opened through a symlink");
        std::fs::write(d.join("shared.lock"), b"").unwrap();
        std::fs::set_permissions(d.join("shared.lock"), std::fs::Permissions::from_mode(0o666)).unwrap();
        open_private(&d.join("shared.lock")).unwrap();
        assert_eq!(mode(&d.join("shared.lock")), 0o600);
        let st = rustix::fs::stat(d.join("shared.lock")).unwrap();
        assert!(trusted(&st));
        std::fs::set_permissions(d.join("shared.lock"), std::fs::Permissions::from_mode(0o646)).unwrap();
        assert!(!trusted(&rustix::fs::stat(d.join("shared.lock")).unwrap()));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
