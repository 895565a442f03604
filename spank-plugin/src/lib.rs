//! berth's Slurm SPANK plugin (installed as `berth.so`): `srun --container=IMAGE` and
//! `sbatch --container=IMAGE` run every task, and the batch script, inside the image.
//!
//! Slurm loads the plugin into several programs; each has its own file, as in pyxis:
//! - `srun.rs`: srun / sbatch / salloc on the submit host (local, allocator context)
//! - `slurmstepd.rs`: slurmstepd on the compute node (remote context): create and join
//! - `slurmd.rs`: slurmd itself (as it starts: the runtime dir) and its job epilog
//!   (teardown)
//!
//! `args.rs` holds the user's options, `config.rs` the admin's plugstack.conf keys,
//! `slurm_client.rs` makes `srun` and friends work inside containers,
//! `pmix.rs` binds the PMIx server's step dirs for `srun --mpi=pmix`, `hostfile.rs`
//! writes `$BERTH_HOSTFILE`,
//! `berth.rs` runs the `berth` binary, `env.rs` picks the task's variables; `ffi.rs` and
//! `sys.rs` are the only places with `unsafe`; joining a container is the engine's
//! `container::join`.
//!
//! Every `extern "C"` entry point runs its work under `catch_unwind` and turns every
//! error into a SPANK error code plus one line for the user: a panic must never unwind
//! into slurmstepd.

mod args;
mod berth;
mod config;
mod env;
mod ffi;
mod hostfile;
mod pmix;
mod slurm_client;
mod slurmd;
mod slurmstepd;
mod srun;
mod sys;

use args::{Args, Opt};
use berth_engine::config::Config;
use ffi::{spank_t, Context, Spank};
use std::ffi::{c_char, c_int, c_uint};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, OnceLock};

/// The symbols Slurm's plugin loader looks for (`SPANK_PLUGIN(berth, 1)` in C).
#[no_mangle]
pub static plugin_name: [u8; 6] = *b"berth\0";
#[no_mangle]
pub static plugin_type: [u8; 6] = *b"spank\0";
/// Must equal the loading Slurm's version: taken from the headers built against.
#[no_mangle]
pub static plugin_version: c_uint = ffi::SLURM_VERSION_NUMBER;
#[no_mangle]
pub static spank_plugin_version: c_uint = 1;

/// The admin config from plugstack.conf, parsed once per process by the first hook that
/// runs (Slurm does not call `slurm_spank_init` before the job epilog, but every hook
/// gets the plugstack.conf arguments).
static CONFIG: OnceLock<Config> = OnceLock::new();
/// The user's options as Slurm's callbacks deliver them.
static ARGS: Mutex<Option<Args>> = Mutex::new(None);

fn with_args<T>(f: impl FnOnce(&mut Args) -> T) -> T {
    let mut guard = ARGS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    f(guard.get_or_insert_with(Args::default))
}

fn config(ac: c_int, av: *mut *mut c_char) -> Result<&'static Config, String> {
    if let Some(config) = CONFIG.get() {
        return Ok(config);
    }
    let config = config::from_plugstack(&ffi::plugin_args(ac, av)).map_err(|err| format!("berth.so: {err}"))?;
    Ok(CONFIG.get_or_init(|| config))
}

/// Runs one hook's work: `Ok` is success; `Err` and panics become one error line and
/// a SPANK failure.
fn guard(hook: &str, work: impl FnOnce() -> Result<(), String>) -> c_int {
    match catch_unwind(AssertUnwindSafe(work)) {
        Ok(Ok(())) => ffi::SUCCESS,
        Ok(Err(message)) => {
            ffi::log_error(&message);
            ffi::FAILURE
        }
        Err(_) => {
            ffi::log_error(&format!("berth: internal error in {hook}; please report it to your admins"));
            ffi::FAILURE
        }
    }
}

/// Called for each of our options, locally and in slurmstepd.
unsafe extern "C" fn option_callback(val: c_int, optarg: *const c_char, _remote: c_int) -> c_int {
    guard("an option", || {
        let opt = Opt::from_val(val).ok_or_else(|| format!("berth: unknown option value {val}"))?;
        let value = ffi::optarg(optarg);
        with_args(|args| args.apply(opt, value.as_deref())).map_err(|err| format!("berth: {err}"))
    })
}

#[no_mangle]
pub extern "C" fn slurm_spank_init(sp: spank_t, ac: c_int, av: *mut *mut c_char) -> c_int {
    guard("slurm_spank_init", || {
        let config = config(ac, av)?;
        let context = ffi::context();
        if context == Context::Slurmd {
            // slurmd does not start when its slurm_spank_init fails: an error (or a
            // panic) is only the guard's one line in its log, and creates take over.
            guard("slurm_spank_init in slurmd", || slurmd::init(config));
        }
        if matches!(context, Context::Local | Context::Remote | Context::Allocator) {
            let sp = Spank::new(sp);
            for spec in args::OPTIONS {
                sp.register_option(spec.name, spec.arginfo, spec.usage, spec.opt as c_int, option_callback)
                    .map_err(|err| format!("berth: cannot register --{}: {err}", spec.name))?;
            }
        }
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn slurm_spank_init_post_opt(sp: spank_t, ac: c_int, av: *mut *mut c_char) -> c_int {
    guard("slurm_spank_init_post_opt", || {
        let args = with_args(|args| args.clone());
        match ffi::context() {
            Context::Local | Context::Allocator => srun::init_post_opt(config(ac, av)?, &args),
            Context::Remote => slurmstepd::init_post_opt(&Spank::new(sp), config(ac, av)?, args),
            _ => Ok(()),
        }
    })
}

#[no_mangle]
pub extern "C" fn slurm_spank_task_init_privileged(sp: spank_t, ac: c_int, av: *mut *mut c_char) -> c_int {
    guard("slurm_spank_task_init_privileged", || slurmstepd::task_init_privileged(&Spank::new(sp), config(ac, av)?))
}

#[no_mangle]
pub extern "C" fn slurm_spank_task_init(_sp: spank_t, _ac: c_int, _av: *mut *mut c_char) -> c_int {
    guard("slurm_spank_task_init", slurmstepd::task_init)
}

#[no_mangle]
pub extern "C" fn slurm_spank_job_epilog(sp: spank_t, ac: c_int, av: *mut *mut c_char) -> c_int {
    guard("slurm_spank_job_epilog", || slurmd::job_epilog(&Spank::new(sp), config(ac, av)?))
}
