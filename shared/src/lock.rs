//! Advisory file locks (`flock`) that coordinate every berth process on a node: the
//! store's lock, its per-layer locks, and the runtime dir's job locks (`teardown`).
//! A lock is released when its file is closed, including when the process is killed,
//! so a crashed pull never leaves a store locked.
//!
//! A lock file is its owner's alone (0600, never opened through a symlink, refused when
//! someone else made it: [`crate::fsmode::open_private`]): anyone who can open a lock
//! file can hold it forever. And no wait is endless: each acquisition gives up after a
//! bound, with one line naming the lock. Owns lock files; never deletes them (deleting
//! a lock file another process has open would split the lock in two).

use rustix::fs::FlockOperation;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The longest a pull waits for another process fetching the same layer or config,
/// and only while that process shows progress ([`acquire_unless_stalled`]).
pub const PULL_WAIT: Duration = Duration::from_secs(30 * 60);
/// How long a holder of a pull's lock may go without showing progress ([`Lock::touch`])
/// before waiters stop waiting for it and do the work themselves.
pub const STALLED_AFTER: Duration = Duration::from_secs(5);
/// How long a reader or pull waits for a `gc` or `verify` holding the store.
pub const STORE_WAIT: Duration = Duration::from_secs(10 * 60);
/// How long a container action waits for another action on the same job or node.
pub const JOB_WAIT: Duration = Duration::from_secs(3 * 60);

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot open the lock {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("gave up after {} s waiting for the lock {path} ({what}): another berth process still holds it; try again later, or see who holds it with `fuser -v {path}`", waited.as_secs())]
    TimedOut { path: PathBuf, what: &'static str, waited: Duration },
}

impl LockError {
    /// The open failed because the file is not there (a read-only store nobody locked).
    pub fn is_not_found(&self) -> bool {
        matches!(self, LockError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }

    /// The open failed for lack of permission (the lock is another user's, e.g. root's).
    pub fn is_denied(&self) -> bool {
        matches!(self, LockError::Open { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied)
    }
}

/// A held lock; dropping it unlocks.
#[derive(Debug)]
pub struct Lock {
    file: File,
}

impl Lock {
    /// The locked file (to check that it is still the one at its path).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Shows waiters that the holder is making progress: sets the lock file's mtime to now.
    pub fn touch(&self) {
        let now = rustix::fs::Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_NOW };
        // Only a hint to waiters: failing to give it makes them go ahead on their own.
        let _ = rustix::fs::futimens(&self.file, &rustix::fs::Timestamps { last_access: now, last_modification: now });
    }
}

/// For locks that only save duplicate work (publishing is atomic and idempotent), so
/// that no holder another user can stop or slow holds anyone up: takes the exclusive
/// lock at `path` (marking it fresh), or returns `None` when its holder has shown no
/// progress ([`Lock::touch`]) for [`STALLED_AFTER`] since we began waiting, or after
/// [`PULL_WAIT`] in all; the caller then does the work without the lock.
pub fn acquire_unless_stalled(path: &Path) -> Result<Option<Lock>, LockError> {
    let file = crate::fsmode::open_private(path).map_err(|source| LockError::Open { path: path.to_path_buf(), source })?;
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {
                let lock = Lock { file };
                lock.touch();
                return Ok(Some(lock));
            }
            Err(rustix::io::Errno::WOULDBLOCK | rustix::io::Errno::INTR) => {}
            Err(e) => return Err(LockError::Open { path: path.to_path_buf(), source: e.into() }),
        }
        let waited = start.elapsed();
        let quiet_for = file.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok()).unwrap_or(Duration::MAX);
        if (waited >= STALLED_AFTER && quiet_for >= STALLED_AFTER) || waited >= PULL_WAIT {
            return Ok(None);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// Opens (creating when missing) the private lock file at `path` and takes the lock,
/// waiting at most `within`; `what` says in the error what the lock guards.
pub fn acquire(path: &Path, exclusive: bool, within: Duration, what: &'static str) -> Result<Lock, LockError> {
    let file = crate::fsmode::open_private(path).map_err(|source| LockError::Open { path: path.to_path_buf(), source })?;
    lock_within(file, path, exclusive, within, what)
}

/// Takes the lock on an open file, polling (flock has no timeout) with a growing pause.
pub fn lock_within(file: File, path: &Path, exclusive: bool, within: Duration, what: &'static str) -> Result<Lock, LockError> {
    let op = if exclusive { FlockOperation::NonBlockingLockExclusive } else { FlockOperation::NonBlockingLockShared };
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        match rustix::fs::flock(&file, op) {
            Ok(()) => return Ok(Lock { file }),
            Err(rustix::io::Errno::WOULDBLOCK | rustix::io::Errno::INTR) => {}
            Err(e) => return Err(LockError::Open { path: path.to_path_buf(), source: e.into() }),
        }
        let waited = start.elapsed();
        if waited >= within {
            return Err(LockError::TimedOut { path: path.to_path_buf(), what, waited });
        }
        std::thread::sleep(pause.min(within - waited));
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn try_acquire(p: &Path, exclusive: bool) -> Option<Lock> {
        match acquire(p, exclusive, Duration::ZERO, "a test") {
            Ok(l) => Some(l),
            Err(LockError::TimedOut { .. }) => None,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn exclusive_excludes_and_shared_shares() {
        let p = std::env::temp_dir().join(format!("berth-lock-{}", std::process::id()));
        let shared1 = acquire(&p, false, PULL_WAIT, "a test").unwrap();
        let shared2 = try_acquire(&p, false);
        assert!(shared2.is_some());
        assert!(try_acquire(&p, true).is_none());
        drop((shared1, shared2));
        let ex = try_acquire(&p, true);
        assert!(ex.is_some());
        assert!(try_acquire(&p, false).is_none());
        drop(ex);
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn a_waiter_goes_ahead_without_a_holder_that_shows_no_progress_and_waits_for_one_that_does() {
        let p = std::env::temp_dir().join(format!("berth-lock-stalled-{}", std::process::id()));
        let held = acquire_unless_stalled(&p).unwrap().expect("a free lock is taken");
        // A holder that stops: the waiter goes ahead after STALLED_AFTER, not PULL_WAIT.
        let start = Instant::now();
        assert!(acquire_unless_stalled(&p).unwrap().is_none());
        assert!(start.elapsed() >= STALLED_AFTER && start.elapsed() < STALLED_AFTER + Duration::from_secs(2), "{:?}", start.elapsed());
        // A holder that shows progress keeps the waiter waiting, until it lets go.
        let start = Instant::now();
        let waited = std::thread::scope(|s| {
            let waiter = s.spawn(|| acquire_unless_stalled(&p).unwrap());
            for _ in 0..8 {
                held.touch();
                std::thread::sleep(Duration::from_secs(1));
            }
            drop(held);
            waiter.join().unwrap()
        });
        assert!(waited.is_some() && start.elapsed() >= Duration::from_secs(8), "{:?}", start.elapsed());
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn a_lock_held_elsewhere_times_out_with_one_line_naming_it() {
        let p = std::env::temp_dir().join(format!("berth-lock-held-{}", std::process::id()));
        let _held = acquire(&p, true, PULL_WAIT, "a test").unwrap();
        let start = Instant::now();
        let err = acquire(&p, false, Duration::from_millis(300), "the image store").unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(300) && start.elapsed() < Duration::from_secs(3));
        let line = err.to_string();
        assert!(line.contains(&p.display().to_string()) && line.contains("the image store") && !line.contains('\n'), "{line}");
        std::fs::remove_file(&p).unwrap();
    }
}
