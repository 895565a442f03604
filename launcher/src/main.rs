//! `berth`: a thin command over the engine. Parses arguments, loads the admin
//! config, calls one engine action, and turns any error into one line on stderr.
//! As root it is a root entry point (the schedulers' adapters run it): it takes its
//! config only from root-owned places or `--config-stdin`, and works under its own
//! limits, not those of the job user whose step started it.

mod images;

use berth_engine::config::Config;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

mod containers;
mod wiring;

#[derive(Parser)]
#[command(name = "berth", version, about = "Run Docker/OCI images as the environment of HPC batch jobs")]
struct Cli {
    /// The node's image store (overrides the admin config's store_dir; default
    /// $BERTH_STORE, which root takes only when it names a root-owned directory).
    #[arg(long, global = true, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Read the admin config from stdin (the Slurm plugin's settings) instead of
    /// $BERTH_CONFIG or /etc/berth/berth.toml.
    #[arg(long, global = true, hide = true)]
    config_stdin: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the effective admin configuration as TOML (berth.toml's form).
    Config,
    /// The node-side container actions of the scheduler adapters (root only).
    #[command(subcommand)]
    Container(containers::ContainerCommand),
    /// Run a command in an image, as you, in a throwaway container.
    Run(containers::RunArgs),
    #[command(flatten)]
    Images(images::ImageCommand),
    /// (root) Become a job's user, with their groups, and exec a program with the
    /// job's environment read from a descriptor: how the Torque job starter, a static
    /// binary that cannot look users up, starts a job without a container.
    #[command(hide = true)]
    AsUser(containers::AsUserArgs),
}

fn main() -> ExitCode {
    // Run as root by slurmstepd or pbs_mom with the job user's umask: not theirs to choose.
    berth_engine::fsmode::root_umask();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print as clap prints them.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("berth: {} (see --help)", usage_error_line(&e.to_string()));
            return ExitCode::from(2);
        }
    };
    // `container exec` and `as-user` become the job's program: they keep the job's limits.
    if berth_engine::privileged::is_root() {
        if !matches!(cli.command, Command::Container(containers::ContainerCommand::Exec(_)) | Command::AsUser(_)) {
            berth_engine::privileged::Limits::for_root();
        }
        // Whatever the starter left open stays out of what berth runs.
        let _ = berth_engine::sys::cloexec_from(3);
    }
    let loaded = if cli.config_stdin { Config::from_stdin() } else { Config::load() };
    let store = match &cli.store {
        Some(_) => Ok(None),
        None => Config::store_from_var(std::env::var_os(berth_engine::config::STORE_VAR).as_deref()),
    };
    let (mut config, store) = match (loaded, store) {
        (Ok(config), Ok(store)) => (config, cli.store.or(store)),
        (Err(err), _) | (_, Err(err)) => {
            eprintln!("berth: {err}");
            return ExitCode::from(2);
        }
    };
    config.store_dir = store.unwrap_or_else(|| berth_engine::store::default_store_dir(&config));
    match cli.command {
        Command::Config => {
            print!("{}", config.to_toml());
            ExitCode::SUCCESS
        }
        Command::Container(command) => containers::container(&config, command),
        Command::Run(args) => containers::run(&config, args),
        Command::AsUser(args) => containers::as_user(args),
        Command::Images(command) => match images::run(command, &config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(line) => {
                eprintln!("berth: {line}");
                ExitCode::FAILURE
            }
        },
    }
}

/// A clap usage error as one line, like every other berth error: its first paragraph
/// (the message and any list of arguments under it), without clap's `error: ` prefix.
fn usage_error_line(rendered: &str) -> String {
    let paragraph: Vec<&str> = rendered.lines().map(str::trim).take_while(|l| !l.is_empty()).collect();
    paragraph.join(" ").trim_start_matches("error: ").to_string()
}
