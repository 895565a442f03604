//! How `berth-pbs` starts as root. pbs_mom runs it with an environment a job user
//! shaped: the job starter gets the job's whole environment (`qsub -v`, `#PBS -v`),
//! the prologue a few of the job's variables. berth-pbs is linked statically, so no
//! loader runs (`LD_PRELOAD`, `LD_AUDIT` mean nothing to it), but static glibc still
//! reads `GLIBC_TUNABLES` at start and keeps `LD_LIBRARY_PATH` for the NSS modules it
//! loads for `getpwnam`. So, as root, the first thing berth-pbs does is put its
//! environment into a sealed memfd and exec itself again with only [`CALLER_ENV`]
//! naming that descriptor; the second run reads the starter's environment from it as
//! data ([`Caller`]) and gives it to nobody but the job's own program.
//!
//! Owns the re-exec and the caller's environment; never decides what a hook does.

use berth_engine::container::env::{self, Var};
use rustix::fd::{AsFd, AsRawFd, OwnedFd};
use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

/// The one variable of the second run: the descriptor holding the caller's environment.
const CALLER_ENV: &str = "BERTH_PBS_CALLER_ENV";

#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("cannot keep the job's environment apart ({step}): {source}; berth-pbs refuses to act as root with it")]
    Stash { step: &'static str, source: std::io::Error },
    #[error("cannot read the job's environment from descriptor {fd}: {source}")]
    Read { fd: i32, source: std::io::Error },
}

/// The environment pbs_mom gave berth-pbs, kept as data.
pub struct Caller {
    pub env: Vec<Var>,
    /// `BERTH_CONFIG` as root accepted it (passed on to `berth`), if set.
    pub config_var: Option<OsString>,
    /// The sealed memfd holding `env` (root only), to hand to `berth container exec`.
    pub fd: Option<OwnedFd>,
}

impl Caller {
    fn new(env: Vec<Var>, fd: Option<OwnedFd>) -> Caller {
        let config_var = env::get(&env, berth_engine::config::CONFIG_VAR).map(ToOwned::to_owned);
        Caller { env, config_var, fd }
    }

    /// The same caller with `extra` variables set (the OpenPBS hook's job fields, which
    /// arrive as arguments where Torque's arrive in the environment).
    pub fn with(&self, extra: Vec<Var>) -> Caller {
        let mut env: Vec<Var> = self.env.iter().filter(|(name, _)| !extra.iter().any(|(n, _)| n == name)).cloned().collect();
        env.extend(extra);
        Caller { env, config_var: self.config_var.clone(), fd: None }
    }

    pub fn var(&self, name: &str) -> Option<&OsStr> {
        env::get(&self.env, name)
    }

    pub fn var_string(&self, name: &str) -> Option<String> {
        self.var(name).map(|v| v.to_string_lossy().into_owned())
    }
}

/// As root: the first run stashes the environment and re-execs (never returns on
/// success); the second run returns the stashed environment. Not root: the process's
/// own environment, which steers nothing but the user's own process.
pub fn start() -> Result<Caller, EntryError> {
    if !berth_engine::privileged::is_root() {
        return Ok(Caller::new(std::env::vars_os().collect(), None));
    }
    let vars: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    if let [(name, value)] = vars.as_slice() {
        if name == CALLER_ENV {
            let fd: i32 = value.to_str().and_then(|v| v.parse().ok()).unwrap_or(-1);
            return read_stash(fd);
        }
    }
    Err(reexec(&vars))
}

/// Writes `vars` into a sealed memfd and execs /proc/self/exe with the same arguments
/// and only [`CALLER_ENV`]; returns only the error.
fn reexec(vars: &[Var]) -> EntryError {
    use rustix::fs::{MemfdFlags, SealFlags};
    let fail = |step| move |e: rustix::io::Errno| EntryError::Stash { step, source: e.into() };
    let run = || -> Result<std::convert::Infallible, EntryError> {
        // Not close-on-exec: the second run inherits it.
        let memfd = rustix::fs::memfd_create("berth-pbs-caller-env", MemfdFlags::ALLOW_SEALING).map_err(fail("memfd_create"))?;
        let bytes = env::encode(vars);
        let mut written = 0;
        while written < bytes.len() {
            written += rustix::io::write(&memfd, &bytes[written..]).map_err(fail("write"))?;
        }
        rustix::fs::fcntl_add_seals(&memfd, SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL).map_err(fail("seal"))?;
        let marker = CString::new(format!("{CALLER_ENV}={}", memfd.as_fd().as_raw_fd())).map_err(|_| fail("marker")(rustix::io::Errno::INVAL))?;
        let args: Vec<CString> = std::env::args_os().map(|a| CString::new(a.as_bytes())).collect::<Result<_, _>>().map_err(|_| fail("arguments")(rustix::io::Errno::INVAL))?;
        let exe = CString::new("/proc/self/exe").map_err(|_| fail("exe")(rustix::io::Errno::INVAL))?;
        nix::unistd::execve(&exe, &args, &[marker]).map_err(|e| EntryError::Stash { step: "exec /proc/self/exe", source: e.into() })
    };
    match run() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn read_stash(fd: i32) -> Result<Caller, EntryError> {
    let read_err = |source| EntryError::Read { fd, source };
    // Opened again through /proc: a fresh offset, and an owned descriptor without unsafe.
    let file = std::fs::File::open(format!("/proc/self/fd/{fd}")).map_err(read_err)?;
    let bytes = std::fs::read(format!("/proc/self/fd/{}", file.as_raw_fd())).map_err(read_err)?;
    // The inherited one closes on the next exec; the reopened one is what we hand on.
    let _ = berth_engine::sys::cloexec_from(3);
    Ok(Caller::new(env::decode(&bytes), Some(OwnedFd::from(file))))
}
