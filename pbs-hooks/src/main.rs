//! `berth-pbs`: berth's Torque/PBS hooks in one binary, dispatched on the name it is
//! run as (mom_priv/prologue, epilogue, prologue.parallel, epilogue.parallel and
//! job_starter are links to it) or on its first argument (`berth-pbs prologue ARGS`).
//! Every failure is one line on stderr, which pbs_mom puts in the job's error file:
//! what failed, why, what to do.
//!
//! As root it first keeps its starter's environment apart (`entry`) and sets its own
//! limits (`privileged::Limits`); what it needs of that environment it reads as data.

mod entry;
mod hooks;
mod openpbs;
mod request;
mod starter;
mod submit_filter;

use berth_engine::config::{Config, CONFIG_VAR};
use berth_engine::privileged::{self, Limits};
use hooks::Role;
use request::Pelog;
use std::process::ExitCode;

const HOOKS: &[&str] = &["prologue", "prologue.parallel", "epilogue", "epilogue.parallel", "job_starter"];

/// The submit filter's name: qsub runs `SUBMITFILTER` from torque.cfg, a path with no
/// arguments, so it is a link named so (or `berth-pbs qsub_filter ARGS...`).
const SUBMIT_FILTER: &str = "qsub_filter";

fn main() -> ExitCode {
    // pbs_mom's alarm runs from the prologue's start.
    let start = std::time::Instant::now();
    let mut caller = match entry::start() {
        Ok(caller) => caller,
        Err(e) => {
            eprintln!("berth-pbs: {e}");
            return ExitCode::from(1);
        }
    };
    let limits = privileged::is_root().then(Limits::for_root);
    let mut args: Vec<String> = std::env::args().collect();
    let called = args.first().map(|a| a.rsplit('/').next().unwrap_or(a).to_string()).unwrap_or_default();
    if called == SUBMIT_FILTER || args.get(1).is_some_and(|a| a == SUBMIT_FILTER) {
        let skip = if called == SUBMIT_FILTER { 1 } else { 2 };
        return submit_filter(&args[skip..]);
    }
    if args.get(1).is_some_and(|a| a == OPENPBS) {
        return openpbs(&caller, &args[2..], start);
    }
    let hook = if HOOKS.contains(&called.as_str()) {
        args.remove(0);
        called
    } else if args.len() > 1 && HOOKS.contains(&args[1].as_str()) {
        args.drain(..2).nth(1).unwrap_or_default()
    } else {
        eprintln!("berth-pbs: run as {} (a link in mom_priv named so), as {SUBMIT_FILTER} (torque.cfg's SUBMITFILTER), `berth-pbs HOOK ARGS...` or `berth-pbs {OPENPBS} EVENT ARGS...` (OpenPBS's hook)", HOOKS.join(", "));
        return ExitCode::from(2);
    };
    // Torque gives a prologue's output to the job's files; tag the line with the hook.
    let fail = |what: String| {
        eprintln!("berth-pbs {hook}: {what}");
        ExitCode::from(1)
    };
    // pbs_mom runs the prologue in the job's child after setting the job's umask
    // (src/resmom/start_exec.c, determine_umask), 077 for many users; what berth
    // stages for the job user (its OpenSSH, the hostfile) must stay readable to them.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    // The job starter's environment is the job's: no `BERTH_CONFIG` in it is root's to
    // read, not even a root-owned file (every file of a pulled image is one), so the
    // starter reads the default config and passes none on; the job keeps its variable.
    // The prologues and epilogues get pbs_mom's environment, the admin's.
    let loaded = if hook == "job_starter" {
        caller.config_var = None;
        Config::load_from(None)
    } else {
        Config::load_from(caller.var(CONFIG_VAR))
    };
    let config = match loaded {
        Ok(config) => config,
        Err(e) => return fail(e.to_string()),
    };
    match hook.as_str() {
        "job_starter" => match starter::start(&config, &args, &caller, limits.as_ref()) {
            // The prologue's own line, already complete.
            starter::StarterError::PrologueFailed(line) => {
                eprintln!("{line}");
                ExitCode::from(1)
            }
            e => fail(e.to_string()),
        },
        "prologue" | "prologue.parallel" => {
            let name = if hook == "prologue" { "prologue" } else { "prologue.parallel" };
            let role = if hook == "prologue" { Role::MotherSuperior } else { Role::Sister };
            let pelog = match Pelog::parse(name, &args, false) {
                Ok(p) => p,
                Err(e) => return fail(e.to_string()),
            };
            match hooks::prologue(&config, &caller, &pelog, role, start) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    // pbs_mom already gives this stderr to the job's error file; the
                    // job starter prints the recorded line there once, so only print
                    // it here when it cannot be recorded.
                    let line = format!("berth-pbs {hook}: job {} on {}: {e}", pelog.job, hooks::this_host());
                    match hooks::record_failure(&config, &pelog.job, &line) {
                        Ok(()) => ExitCode::SUCCESS,
                        Err(why) => {
                            eprintln!("{line}");
                            fail(format!("job {}: cannot record the failure for the job starter: {why}", pelog.job))
                        }
                    }
                }
            }
        }
        _ => {
            let name = if hook == "epilogue" { "epilogue" } else { "epilogue.parallel" };
            let pelog = match Pelog::parse(name, &args, true) {
                Ok(p) => p,
                Err(e) => return fail(e.to_string()),
            };
            match hooks::epilogue(&config, &caller, &pelog) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(format!("job {}: {e}", pelog.job)),
            }
        }
    }
}

/// OpenPBS's site hook runs `berth-pbs openpbs EVENT ARGS...` (see `openpbs`).
const OPENPBS: &str = "openpbs";

/// One OpenPBS hook action; its line on stderr, which the hook hands on (qsub's
/// stderr for `check`, the hook's log otherwise).
fn openpbs(caller: &entry::Caller, args: &[String], start: std::time::Instant) -> ExitCode {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let result = match args.first().map(String::as_str) {
        // The server's check needs no config (the server host may have none).
        Some("check") => openpbs::run(&Config::default(), caller, args, start),
        _ => match Config::load_from(caller.var(CONFIG_VAR)) {
            Ok(config) => openpbs::run(&config, caller, args, start),
            Err(e) => Err(openpbs::OpenPbsError::Hook(e.to_string())),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth: {e}");
            ExitCode::from(1)
        }
    }
}

/// qsub's submit filter: the job script from stdin to stdout, rewritten; one line on
/// stderr and exit 1 (qsub refuses the job) when it cannot be.
fn submit_filter(args: &[String]) -> ExitCode {
    use std::io::{Read, Write};
    let fail = |why: String| {
        eprintln!("berth: {why}");
        ExitCode::from(1)
    };
    let mut script = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut script) {
        return fail(format!("cannot read the job script qsub gives on stdin: {e}"));
    }
    let prefix = std::env::var("PBS_DPREFIX").ok();
    let root_dir_env = std::env::var_os("PBS_O_ROOTDIR").is_some();
    match submit_filter::filter(&script, args, prefix.as_deref(), root_dir_env) {
        Ok(out) => match std::io::stdout().write_all(out.as_bytes()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(format!("cannot hand the job script back to qsub: {e}")),
        },
        Err(e) => fail(e.to_string()),
    }
}
