//! slurmd context: the job epilog, run as root on every node of the job when the job
//! ends there, also when its slurmstepd was killed. Owns teardown: `berth container
//! destroy --job J` removes every container of the job on the node (idempotent).
//!
//! A teardown failure is logged in slurmd's log but not returned: a failing epilog
//! drains the node, and leftovers of one job (under its own runtime dir) do not harm
//! the next one. `berth gc` and the admin's log take it from there.

use crate::berth;
use crate::ffi::{self, Spank};
use berth_engine::config::Config;

pub fn job_epilog(sp: &Spank, config: &Config) -> Result<(), String> {
    let job = sp.job_id().map_err(|e| e.to_string())?;
    // Most jobs never asked for a container: do not run anything for them.
    if !config.runtime_dir.join(job.to_string()).exists() {
        return Ok(());
    }
    match berth::destroy(config, job) {
        Ok(()) => ffi::log_debug(&format!("berth: tore down the containers of job {job}")),
        Err(message) => ffi::log_error(&message),
    }
    Ok(())
}
