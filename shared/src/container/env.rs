//! The environment a task sees inside a container, and the `env` file that carries the
//! container's part of it to whoever enters (the Slurm plugin, `berth container exec`).
//! Owns the merge rules; never reads the process environment itself (callers pass it).
//!
//! Rules, in order (later wins):
//! 1. the job's environment (what the scheduler or the caller's shell gives the task);
//! 2. the container's environment (the image's `Env`, then `--env` given at create),
//!    except for protected keys the job already sets: scheduler and MPI launcher
//!    variables (`SLURM_*`, `SLURMD_*`, `SPANK_*`, `PBS_*`, `PMI_*`, `PMIX_*`,
//!    `OMPI_*`, `MPIR_*`) and the user's identity (`HOME`, `USER`, `LOGNAME`);
//! 3. overrides given when entering (`berth container exec --env`, `berth run --env`).
//!
//! If nobody set `PATH`, the usual Debian default is used.
//!
//! File format: `KEY=VALUE` entries, each followed by one NUL byte, in order; values
//! may hold any byte but NUL (newlines included). Keys are never empty and hold no `=`.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

/// `PATH` when neither the job nor the image sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const PROTECTED_PREFIXES: &[&str] = &["SLURM_", "SLURMD_", "SPANK_", "PBS_", "PMI_", "PMIX_", "OMPI_", "MPIR_"];
const PROTECTED_KEYS: &[&str] = &["HOME", "USER", "LOGNAME"];

/// One environment entry.
pub type Var = (OsString, OsString);

/// Whether the job's value of `key` beats the container's.
pub fn is_protected(key: &OsStr) -> bool {
    let key = key.as_bytes();
    PROTECTED_KEYS.iter().any(|k| k.as_bytes() == key)
        || PROTECTED_PREFIXES.iter().any(|p| key.starts_with(p.as_bytes()))
}

/// Splits `KEY=VALUE`; `None` when there is no `=` or the key is empty.
pub fn parse_assignment(entry: &OsStr) -> Option<Var> {
    let bytes = entry.as_bytes();
    let eq = bytes.iter().position(|b| *b == b'=')?;
    (eq > 0).then(|| (OsStr::from_bytes(&bytes[..eq]).to_owned(), OsStr::from_bytes(&bytes[eq + 1..]).to_owned()))
}

fn set(vars: &mut Vec<Var>, key: OsString, value: OsString) {
    match vars.iter_mut().find(|(k, _)| *k == key) {
        Some(entry) => entry.1 = value,
        None => vars.push((key, value)),
    }
}

/// Applies the rules above. Order of first appearance is kept.
pub fn merge(job: &[Var], container: &[Var], overrides: &[Var]) -> Vec<Var> {
    let mut vars: Vec<Var> = Vec::with_capacity(job.len() + container.len() + overrides.len() + 1);
    for (k, v) in job {
        set(&mut vars, k.clone(), v.clone());
    }
    for (k, v) in container {
        if is_protected(k) && job.iter().any(|(jk, _)| jk == k) {
            continue;
        }
        set(&mut vars, k.clone(), v.clone());
    }
    for (k, v) in overrides {
        set(&mut vars, k.clone(), v.clone());
    }
    if !vars.iter().any(|(k, _)| k == "PATH") {
        vars.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    vars
}

/// The `env` file's bytes for these entries.
pub fn encode(vars: &[Var]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in vars {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// Reads an `env` file's bytes; entries without `=` are skipped.
pub fn decode(bytes: &[u8]) -> Vec<Var> {
    bytes
        .split(|b| *b == 0)
        .filter(|e| !e.is_empty())
        .filter_map(|e| parse_assignment(OsStr::from_bytes(e)))
        .collect()
}

/// `KEY=VALUE` strings (an image's `Env`, `--env` arguments) as entries; returns the
/// first entry that is not an assignment as the error.
pub fn parse_list<S: AsRef<OsStr>>(entries: &[S]) -> Result<Vec<Var>, OsString> {
    entries
        .iter()
        .map(|e| parse_assignment(e.as_ref()).ok_or_else(|| e.as_ref().to_owned()))
        .collect()
}

/// Entries as `KEY=VALUE` C strings for execve; entries holding NUL cannot exist on
/// Linux and are dropped.
pub fn to_cstrings(vars: &[Var]) -> Vec<std::ffi::CString> {
    vars.iter()
        .filter_map(|(k, v)| {
            let mut bytes = k.clone().into_vec();
            bytes.push(b'=');
            bytes.extend_from_slice(v.as_bytes());
            std::ffi::CString::new(bytes).ok()
        })
        .collect()
}

/// The value of `key`, if set.
pub fn get<'a>(vars: &'a [Var], key: &str) -> Option<&'a OsStr> {
    vars.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_os_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: &[&str]) -> Vec<Var> {
        parse_list(list).unwrap()
    }

    #[test]
    fn image_env_overrides_job_env_but_not_scheduler_variables() {
        let job = vars(&["PATH=/host/bin", "SLURM_JOB_ID=7", "HOME=/home/ann", "TERM=xterm"]);
        let image = vars(&["PATH=/opt/app/bin:/usr/bin", "SLURM_JOB_ID=1", "HOME=/root", "LANG=C.UTF-8"]);
        let merged = merge(&job, &image, &[]);
        assert_eq!(get(&merged, "PATH").unwrap(), "/opt/app/bin:/usr/bin");
        assert_eq!(get(&merged, "SLURM_JOB_ID").unwrap(), "7");
        assert_eq!(get(&merged, "HOME").unwrap(), "/home/ann");
        assert_eq!(get(&merged, "LANG").unwrap(), "C.UTF-8");
        assert_eq!(get(&merged, "TERM").unwrap(), "xterm");
    }

    #[test]
    fn protected_keys_from_the_image_apply_when_the_job_lacks_them() {
        let merged = merge(&[], &vars(&["HOME=/root"]), &[]);
        assert_eq!(get(&merged, "HOME").unwrap(), "/root");
        assert_eq!(get(&merged, "PATH").unwrap(), DEFAULT_PATH);
    }

    #[test]
    fn overrides_win_over_everything() {
        let merged = merge(&vars(&["SLURM_X=1"]), &vars(&["A=image"]), &vars(&["A=user", "SLURM_X=2"]));
        assert_eq!(get(&merged, "A").unwrap(), "user");
        assert_eq!(get(&merged, "SLURM_X").unwrap(), "2");
    }

    #[test]
    fn env_file_round_trips_values_with_newlines_and_equals() {
        let list = vars(&["A=line1\nline2", "B=x=y", "EMPTY="]);
        let bytes = encode(&list);
        assert_eq!(bytes.iter().filter(|b| **b == 0).count(), 3);
        assert_eq!(decode(&bytes), list);
    }

    #[test]
    fn assignments_need_a_key_and_an_equals_sign() {
        assert!(parse_assignment(OsStr::new("=x")).is_none());
        assert!(parse_assignment(OsStr::new("NOEQ")).is_none());
        assert_eq!(parse_list(&["A=1", "bad"]).unwrap_err(), "bad");
    }
}
