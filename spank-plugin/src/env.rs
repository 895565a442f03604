//! Which of the container's variables a task takes. The rules are the engine's
//! (`berth_engine::container::env`, shared with the Torque hooks): the container's
//! value wins, except for protected names the job already sets (scheduler and MPI
//! variables, `HOME`, `USER`, `LOGNAME`). The plugin adds one rule of its own:
//! names the user lists with `--container-env` are always the container's.
//! Owns only that choice; never reads or sets an environment itself.

use berth_engine::container::env::{is_protected, Var};
use std::ffi::OsStr;

/// The variables to set in the task, given the container's environment (from `join`),
/// the names listed with `--container-env`, and whether the job has a name.
pub fn to_set(container: &[Var], listed: &[String], job_has: impl Fn(&OsStr) -> bool) -> Vec<Var> {
    container
        .iter()
        .filter(|(name, _)| listed.iter().any(|n| OsStr::new(n) == name) || !(is_protected(name) && job_has(name)))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn vars(list: &[(&str, &str)]) -> Vec<Var> {
        list.iter().map(|(k, v)| (OsString::from(k), OsString::from(v))).collect()
    }

    #[test]
    fn container_values_win_except_protected_ones_the_job_has() {
        let container = vars(&[("PATH", "/opt/app/bin:/usr/bin"), ("LANG", "C.UTF-8"), ("HOME", "/root"), ("SLURM_PROCID", "9"), ("PMIX_RANK", "9")]);
        let job = ["PATH", "LANG", "HOME", "SLURM_PROCID", "PMIX_RANK"];
        let set = to_set(&container, &[], |n| job.iter().any(|j| OsStr::new(j) == n));
        assert_eq!(set, vars(&[("PATH", "/opt/app/bin:/usr/bin"), ("LANG", "C.UTF-8")]));
    }

    #[test]
    fn listed_names_come_from_the_container_and_missing_protected_ones_too() {
        let container = vars(&[("HOME", "/root"), ("USER", "app")]);
        let set = to_set(&container, &["HOME".into()], |n| n == OsStr::new("HOME"));
        assert_eq!(set, vars(&[("HOME", "/root"), ("USER", "app")]));
    }
}
