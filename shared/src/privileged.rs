//! What berth's root code takes from whoever started it. A scheduler starts root
//! entry points (the Slurm plugin's `berth` runs, the Torque hooks, the job starter)
//! in processes a job user shaped: their environment, limits, descriptors and working
//! directory. This module owns the three rules that keep that out of root's work:
//!
//! - paths that steer root (`BERTH_CONFIG`, `BERTH_STORE`) count only when root alone
//!   could have put them there ([`open_root_owned`], [`check_root_owned_dir`]);
//! - every process root code starts gets a cleared environment plus an explicit list
//!   ([`command`]);
//! - a root entry point resets the limits it works under and gives the job's own back
//!   to the job's program ([`Limits`]).
//!
//! Never decides what a job may do; only where root's inputs may come from.

use rustix::fd::OwnedFd;
use rustix::fs::{FileType, Mode, OFlags, Stat};
use rustix::process::{Resource, Rlimit};
use std::ffi::{OsStr, OsString};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

/// `PATH` of every process berth's root code starts.
pub const ROOT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The only variables a root process berth starts takes from its starter's environment,
/// and only where that environment is the daemon's (slurmd's, pbs_mom's), never a job's:
/// how the node reaches registries.
pub const DAEMON_VARIABLES: &[&str] = &["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"];

/// Why a path may not steer root.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("{path} is not absolute")]
    Relative { path: PathBuf },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is owned by uid {uid}, not root")]
    NotRoot { path: PathBuf, uid: u32 },
    #[error("{path} is writable by group or others (mode {mode:o})")]
    Writable { path: PathBuf, mode: u32 },
    #[error("{path} changed while it was checked (a symlink or rename in its way)")]
    Changed { path: PathBuf },
    #[error("{path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path} is not a directory")]
    NotADir { path: PathBuf },
}

/// Whether this process acts as root, hence must refuse what a user could have set.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Opens `path` for reading only when root alone could have put it there: the file
/// and every directory above it are root's and writable by nobody else. A root-owned
/// directory that others may write under the sticky bit (`/tmp`) counts, since others
/// cannot rename or remove root's entries in it. Symlinks are resolved first; then
/// every component of the result is opened from its parent without following a
/// symlink and checked on the opened descriptor, so a swap meanwhile fails.
pub fn open_root_owned(path: &Path) -> Result<std::fs::File, Refused> {
    let real = std::fs::canonicalize(path).map_err(|source| Refused::Io { path: path.to_path_buf(), source })?;
    let (parent, name) = walk_dirs(&real, real.components().count() - 1)?;
    let fd = openat(&parent, &name, OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC, &real)?;
    let stat = fstat(&fd, &real)?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return Err(Refused::NotAFile { path: real });
    }
    owned_by_root_alone(&stat, &real, false)?;
    Ok(std::fs::File::from(fd))
}

/// Checks that `path` is a root-owned directory nobody else can write, or does not
/// exist yet below one that nobody else can write (so nobody else can make it first).
/// Returns the path as checked, with no symlink in it: the caller uses that, not
/// `path`, whose links a user may repoint after the check.
pub fn check_root_owned_dir(path: &Path) -> Result<PathBuf, Refused> {
    if !path.is_absolute() {
        return Err(Refused::Relative { path: path.to_path_buf() });
    }
    let existing = path.ancestors().find(|a| a.symlink_metadata().is_ok()).unwrap_or(Path::new("/"));
    let tail = path.strip_prefix(existing).unwrap_or(Path::new(""));
    if tail.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(Refused::Changed { path: path.to_path_buf() });
    }
    let real = std::fs::canonicalize(existing).map_err(|source| Refused::Io { path: existing.to_path_buf(), source })?;
    if !real.is_dir() {
        return Err(Refused::NotADir { path: real });
    }
    let (dir, _) = walk_dirs(&real, real.components().count())?;
    // Others could make entries in a sticky dir before root does.
    owned_by_root_alone(&fstat(&dir, &real)?, &real, false)?;
    Ok(real.join(tail))
}

/// Opens the first `count` components of absolute, symlink-free `real` one by one
/// (`/` first), each checked; returns the last directory and the next component.
fn walk_dirs(real: &Path, count: usize) -> Result<(OwnedFd, OsString), Refused> {
    let dir_flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut components = real.components();
    if components.next() != Some(Component::RootDir) {
        return Err(Refused::Relative { path: real.to_path_buf() });
    }
    let mut here = PathBuf::from("/");
    let mut dir = rustix::fs::open("/", dir_flags, Mode::empty()).map_err(|e| io_err(&here, e))?;
    let mut stat = fstat(&dir, &here)?;
    for _ in 1..count {
        let Some(Component::Normal(name)) = components.next() else { return Err(Refused::Changed { path: real.to_path_buf() }) };
        // The directory holding `name` must keep others from replacing it: not writable
        // by them, or sticky with `name` root's (checked next).
        owned_by_root_alone(&stat, &here, true)?;
        here.push(name);
        dir = openat(&dir, name, dir_flags, &here)?;
        stat = fstat(&dir, &here)?;
    }
    owned_by_root_alone(&stat, &here, true)?;
    let next = match components.next() {
        Some(Component::Normal(name)) => name.to_os_string(),
        Some(Component::CurDir) | None => OsString::from("."),
        _ => return Err(Refused::Changed { path: real.to_path_buf() }),
    };
    Ok((dir, next))
}

/// Root's, and writable by nobody else; with `sticky_enough`, a sticky directory
/// others may write counts (for an entry in it that is checked to be root's).
fn owned_by_root_alone(stat: &Stat, path: &Path, sticky_enough: bool) -> Result<(), Refused> {
    if stat.st_uid != 0 {
        return Err(Refused::NotRoot { path: path.to_path_buf(), uid: stat.st_uid });
    }
    let mode = stat.st_mode & 0o7777;
    let sticky_dir = FileType::from_raw_mode(stat.st_mode) == FileType::Directory && mode & 0o1000 != 0;
    if mode & 0o022 != 0 && !(sticky_enough && sticky_dir) {
        return Err(Refused::Writable { path: path.to_path_buf(), mode });
    }
    Ok(())
}

fn openat(dir: &OwnedFd, name: &OsStr, flags: OFlags, path: &Path) -> Result<OwnedFd, Refused> {
    rustix::fs::openat(dir, name, flags, Mode::empty()).map_err(|e| match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => Refused::Changed { path: path.to_path_buf() },
        e => io_err(path, e),
    })
}

fn fstat(fd: &OwnedFd, path: &Path) -> Result<Stat, Refused> {
    rustix::fs::fstat(fd).map_err(|e| io_err(path, e))
}

fn io_err(path: &Path, e: rustix::io::Errno) -> Refused {
    Refused::Io { path: path.to_path_buf(), source: e.into() }
}

/// A command for a program root code starts: a cleared environment with only
/// [`ROOT_PATH`] and `passed` (see [`daemon_variables`]), in `/`.
pub fn command(program: impl AsRef<OsStr>, passed: &[(OsString, OsString)]) -> Command {
    let mut command = Command::new(program);
    command.env_clear().env("PATH", ROOT_PATH).envs(passed.iter().map(|(k, v)| (k, v))).current_dir("/");
    command
}

/// The [`DAEMON_VARIABLES`] that `get` (the daemon's environment) sets.
pub fn daemon_variables(get: impl Fn(&str) -> Option<OsString>) -> Vec<(OsString, OsString)> {
    DAEMON_VARIABLES.iter().filter_map(|name| Some((OsString::from(name), get(name)?))).collect()
}

/// Descriptors a root process may hold at least: a pull and an unpack keep many open.
const ROOT_NOFILE: u64 = 65536;

/// The limits a root entry point found, to give back to the job's program.
pub struct Limits {
    found: Vec<(Resource, Rlimit)>,
}

impl Limits {
    /// Sets the limits root's own work needs, whatever the job user's shell set:
    /// no file size limit (a `ulimit -f` would kill a pull or a state write half way),
    /// no core dumps (root's memory holds secrets; the dump lands where the user's
    /// working directory was) and enough descriptors. Returns what was there.
    pub fn for_root() -> Limits {
        let found: Vec<(Resource, Rlimit)> =
            [Resource::Fsize, Resource::Core, Resource::Nofile].into_iter().map(|r| (r, rustix::process::getrlimit(r))).collect();
        // Hard limits are only raised (where root may: CAP_SYS_RESOURCE), never lowered,
        // so that giving the job's back needs no privilege. A failure leaves the job's,
        // which only makes root's work fail, not misbehave.
        let fsize = rustix::process::getrlimit(Resource::Fsize);
        if rustix::process::setrlimit(Resource::Fsize, Rlimit { current: None, maximum: None }).is_err() {
            let _ = rustix::process::setrlimit(Resource::Fsize, Rlimit { current: fsize.maximum, maximum: fsize.maximum });
        }
        let core = rustix::process::getrlimit(Resource::Core);
        let _ = rustix::process::setrlimit(Resource::Core, Rlimit { current: Some(0), maximum: core.maximum });
        let nofile = rustix::process::getrlimit(Resource::Nofile);
        let enough = |l: Option<u64>| l.is_none_or(|l| l >= ROOT_NOFILE);
        if !enough(nofile.current) || !enough(nofile.maximum) {
            let max = nofile.maximum.map(|m| m.max(ROOT_NOFILE));
            if rustix::process::setrlimit(Resource::Nofile, Rlimit { current: max, maximum: max }).is_err() {
                let _ = rustix::process::setrlimit(Resource::Nofile, Rlimit { current: nofile.maximum, maximum: nofile.maximum });
            }
        }
        Limits { found }
    }

    /// Puts back the limits [`Limits::for_root`] found (before exec'ing the job's program).
    pub fn give_back(&self) -> std::io::Result<()> {
        for (resource, limit) in &self.found {
            rustix::process::setrlimit(*resource, *limit)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("berth-privileged-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    #[test]
    fn only_root_owned_files_in_root_owned_dirs_are_opened() {
        if !is_root() {
            return;
        }
        let dir = scratch("files");
        let file = dir.join("berth.toml");
        std::fs::write(&file, "x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(open_root_owned(&file).is_ok(), "a root-owned file in /tmp/<root dir> is root's");
        // A symlink to it from anywhere resolves to it.
        let link = dir.join("link.toml");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(open_root_owned(&link).is_ok());
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o664)).unwrap();
        assert!(matches!(open_root_owned(&file), Err(Refused::Writable { .. })));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(open_root_owned(&file), Err(Refused::Writable { .. })), "a dir others can write");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&file, Some(65534), None).unwrap();
        assert!(matches!(open_root_owned(&file), Err(Refused::NotRoot { uid: 65534, .. })));
        std::os::unix::fs::chown(&file, Some(0), None).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
        assert!(matches!(open_root_owned(&file), Err(Refused::NotRoot { .. })), "a dir of another user");
        std::os::unix::fs::chown(&dir, Some(0), None).unwrap();
        assert!(matches!(open_root_owned(&dir), Err(Refused::NotAFile { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_store_dir_must_be_roots_or_be_made_where_only_root_can() {
        if !is_root() {
            return;
        }
        let dir = scratch("dirs");
        assert!(check_root_owned_dir(&dir).is_ok());
        // Missing below a dir nobody else writes: fine; below a sticky /tmp: someone could make it first.
        assert!(check_root_owned_dir(&dir.join("store/sub")).is_ok());
        // Through a link: the answer is the linked-to path, which the caller uses, so
        // repointing the link after the check changes nothing.
        std::fs::create_dir(dir.join("real")).unwrap();
        std::os::unix::fs::symlink(dir.join("real"), dir.join("link")).unwrap();
        let real = std::fs::canonicalize(dir.join("real")).unwrap();
        assert_eq!(check_root_owned_dir(&dir.join("link/store")).unwrap(), real.join("store"));
        assert!(matches!(check_root_owned_dir(&std::env::temp_dir().join("berth-no-such-store")), Err(Refused::Writable { .. })));
        std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
        assert!(matches!(check_root_owned_dir(&dir), Err(Refused::NotRoot { .. })));
        assert!(matches!(check_root_owned_dir(Path::new("relative")), Err(Refused::Relative { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn root_gets_its_limits_and_gives_the_jobs_back() {
        let before: Vec<Rlimit> = [Resource::Fsize, Resource::Core, Resource::Nofile].into_iter().map(rustix::process::getrlimit).collect();
        let limits = Limits::for_root();
        assert_eq!(rustix::process::getrlimit(Resource::Core).current, Some(0));
        limits.give_back().unwrap();
        let after: Vec<Rlimit> = [Resource::Fsize, Resource::Core, Resource::Nofile].into_iter().map(rustix::process::getrlimit).collect();
        assert_eq!(before, after);
    }

    #[test]
    fn commands_root_starts_get_only_the_listed_environment() {
        let passed = daemon_variables(|name| (name == "HTTPS_PROXY").then(|| OsString::from("http://proxy:3128")));
        let out = command("/usr/bin/env", &passed).env_remove("NOTHING").output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        lines.sort();
        assert_eq!(lines, ["HTTPS_PROXY=http://proxy:3128", &format!("PATH={ROOT_PATH}")]);
    }
}
