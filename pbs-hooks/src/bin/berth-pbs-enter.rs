//! `berth-pbs-enter`: setuid root; enters the caller's own OpenPBS job's container and
//! execs a program there as the caller. See `berth_pbs::launch` for what it trusts.

use std::process::ExitCode;

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let vars: Vec<(std::ffi::OsString, std::ffi::OsString)> = std::env::vars_os().collect();
    let err = berth_pbs::launch::launch(argv, vars);
    // pbs_mom gives this stderr to the job's error file; a recorded line is complete.
    match &err {
        berth_pbs::launch::LaunchError::Recorded(line) => eprintln!("{line}"),
        err => eprintln!("berth-pbs-enter: {err}"),
    }
    ExitCode::from(err.status())
}
