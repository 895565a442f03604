//! Local and allocator context: srun, sbatch and salloc on the submit host. Owns the
//! checks that can fail before anything is queued or launched, so a user learns about
//! a forbidden option at once rather than from a failed job.
//!
//! The options themselves travel without help: Slurm sends srun's SPANK options to every
//! slurmstepd of the step, and exports sbatch/salloc's into the job's environment
//! (`_SLURM_SPANK_OPTION_berth_*`), where the batch step and every srun inside the job
//! pick them up unless that srun gives its own.

use crate::args::Args;
use berth_engine::config::Config;

pub fn init_post_opt(config: &Config, args: &Args) -> Result<(), String> {
    if args.per_rank && !config.allow_per_rank {
        return Err("berth: this site does not allow --container-per-rank; drop the option".into());
    }
    if args.remap_root && !config.remap_user {
        return Err(format!("berth: {}", berth_engine::container::remap::RemapError::NotAllowed));
    }
    Ok(())
}
