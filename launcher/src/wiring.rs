//! `berth container wire`: the node-side action that starts a job's MPI wiring in its
//! container on this node (see the engine's `wiring`). Parses arguments into one engine
//! call and turns errors into one line; must never hold wiring logic of its own.

use berth_engine::config::Config;
use berth_engine::container;
use berth_engine::wiring::{self, Request};
use clap::Args;
use std::process::ExitCode;

#[derive(Args)]
pub struct WireArgs {
    /// The scheduler's job id.
    #[arg(long)]
    job: String,
    /// The container on this node (per-node mode: `node`).
    #[arg(long, default_value = container::PER_NODE)]
    name: String,
    /// The job's nodes in allocation order, as the nodes name each other (comma-separated).
    #[arg(long, value_delimiter = ',', required = true)]
    nodes: Vec<String>,
    /// Slots per node, in the same order (default: 1 each).
    #[arg(long, value_delimiter = ',')]
    slots: Vec<u32>,
    /// `--nodes` may lack some of the job's nodes: route any other host name to the
    /// job's port too (Torque's sisters, which know only the first node and themselves).
    #[arg(long)]
    unlisted_nodes: bool,
}

pub fn wire(config: &Config, args: WireArgs) -> ExitCode {
    let request = Request { job: args.job, name: args.name, nodes: args.nodes, slots: args.slots, unlisted_nodes: args.unlisted_nodes };
    match wiring::wire(config, &request) {
        Ok(wired) => {
            println!("{}", serde_json::to_string(&wired).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("berth container wire: {e}");
            ExitCode::from(1)
        }
    }
}
