//! `berth`: a thin command over the engine. Parses arguments, loads the admin
//! config, calls one engine action, and turns any error into one line on stderr.

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
    /// The node's image store (overrides the admin config's store_dir).
    #[arg(long, global = true, env = "BERTH_STORE", value_name = "DIR")]
    store: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the effective admin configuration as TOML-like lines.
    Config,
    /// The node-side container actions of the scheduler adapters (root only).
    #[command(subcommand)]
    Container(containers::ContainerCommand),
    /// Run a command in an image, as you, in a throwaway container.
    Run(containers::RunArgs),
    #[command(flatten)]
    Images(images::ImageCommand),
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
    let mut config = match Config::load() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("berth: {err}");
            return ExitCode::from(2);
        }
    };
    config.store_dir = cli.store.unwrap_or_else(|| berth_engine::store::default_store_dir(&config));
    match cli.command {
        Command::Config => {
            println!("{config:#?}");
            ExitCode::SUCCESS
        }
        Command::Container(command) => containers::container(&config, command),
        Command::Run(args) => containers::run(&config, args),
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
