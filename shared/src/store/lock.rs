//! Advisory file locks (`flock`) that coordinate every process using one store.
//! A lock is released when its file is closed, including when the process is killed,
//! so a crashed pull never leaves a store locked. Owns lock files; never deletes them
//! (deleting a lock file another process has open would split the lock in two).

use rustix::fs::FlockOperation;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// A held lock; dropping it unlocks.
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

/// Opens (creating when allowed) a lock file and takes the lock, waiting for it.
/// A read-only caller (store pulled by root, used by a user) opens the file read-only,
/// which is enough for `flock`.
pub fn acquire(path: &Path, exclusive: bool) -> std::io::Result<Lock> {
    let file = match OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o644).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied || e.raw_os_error() == Some(rustix::io::Errno::ROFS.raw_os_error()) => {
            File::open(path)?
        }
        Err(e) => return Err(e),
    };
    let op = if exclusive { FlockOperation::LockExclusive } else { FlockOperation::LockShared };
    loop {
        match rustix::fs::flock(&file, op) {
            Ok(()) => return Ok(Lock { _file: file }),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Takes the lock only if it is free right now.
pub fn try_acquire(path: &Path, exclusive: bool) -> std::io::Result<Option<Lock>> {
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o644).open(path)?;
    let op = if exclusive { FlockOperation::NonBlockingLockExclusive } else { FlockOperation::NonBlockingLockShared };
    match rustix::fs::flock(&file, op) {
        Ok(()) => Ok(Some(Lock { _file: file })),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_excludes_and_shared_shares() {
        let p = std::env::temp_dir().join(format!("berth-lock-{}", std::process::id()));
        let shared1 = acquire(&p, false).unwrap();
        let shared2 = try_acquire(&p, false).unwrap();
        assert!(shared2.is_some());
        assert!(try_acquire(&p, true).unwrap().is_none());
        drop((shared1, shared2));
        let ex = try_acquire(&p, true).unwrap();
        assert!(ex.is_some());
        assert!(try_acquire(&p, false).unwrap().is_none());
        drop(ex);
        std::fs::remove_file(&p).unwrap();
    }
}
