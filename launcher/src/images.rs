//! `berth pull|images|inspect|rm|gc|verify|export`: the image store commands. Each parses its
//! arguments, makes one store call and prints the result; errors go back to `main` as
//! one line. Never reaches into the store's files itself.

use berth_engine::config::Config;
use berth_engine::registry::manifest::Platform;
use berth_engine::store::{human_bytes, short, Progress, PullPolicy, Store};
use clap::Subcommand;
use std::path::PathBuf;
use std::time::SystemTime;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Download an image into the store (e.g. `ubuntu:22.04`, `nvcr.io/nvidia/pytorch:24.01-py3`).
    Pull {
        image: String,
        /// Platform to pick from a multi-platform image, as os/arch[/variant] (default: this machine's).
        #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
        platform: Option<String>,
        /// Print nothing but errors.
        #[arg(long, short)]
        quiet: bool,
    },
    /// List the images in the store: reference, digest, size, last use.
    Images,
    /// Print an image's config (environment, entrypoint, ...) as JSON.
    Inspect { image: String },
    /// Remove an image from the store (its layers go at the next `berth gc` if unused).
    Rm {
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Remove layers no image and no live container uses, and the leftovers of interrupted pulls.
    Gc,
    /// Check the store: rehash blobs, check refs, layer dirs and debris; one line per problem.
    Verify,
    /// Write an image's flattened root filesystem into DIR (pulled first if missing).
    Export { image: String, dir: PathBuf },
}

/// Runs one image command; the error is the one line `main` prints.
pub fn run(command: ImageCommand, config: &Config) -> Result<(), String> {
    let store = Store::open(config).map_err(|e| e.to_string())?;
    match command {
        ImageCommand::Pull { image, platform, quiet } => {
            let platform = platform
                .map(|p| Platform::parse(&p).ok_or_else(|| format!("--platform {p}: expected os/arch[/variant], e.g. linux/arm64")))
                .transpose()?;
            let progress = if quiet { Progress::Silent } else { Progress::auto() };
            let image = store
                .resolve_for(&image, PullPolicy::Always, platform.as_ref(), progress)
                .map_err(|e| e.to_string())?;
            println!("{} {}", image.reference, image.manifest_digest);
        }
        ImageCommand::Images => {
            let images = store.images().map_err(|e| e.to_string())?;
            let width = images.iter().map(|i| i.reference.len()).max().unwrap_or(0).max("REFERENCE".len());
            println!("{:width$}  {:19}  {:>10}  LAST USED", "REFERENCE", "DIGEST", "SIZE");
            for i in images {
                println!(
                    "{:width$}  {:19}  {:>10}  {}",
                    i.reference,
                    short(&i.manifest_digest),
                    human_bytes(i.size),
                    i.last_used.map_or_else(|| "-".to_string(), ago)
                );
            }
        }
        ImageCommand::Inspect { image } => {
            let text = store.inspect(&image).map_err(|e| e.to_string())?;
            let pretty = serde_json::from_str::<serde_json::Value>(&text)
                .and_then(|v| serde_json::to_string_pretty(&v))
                .unwrap_or(text);
            println!("{pretty}");
        }
        ImageCommand::Rm { images } => {
            for image in images {
                store.remove(&image).map_err(|e| e.to_string())?;
                println!("removed {image}");
            }
        }
        ImageCommand::Gc => {
            let report = store.gc().map_err(|e| e.to_string())?;
            println!(
                "removed {} layers, {} blobs, {} leftovers of interrupted pulls; kept {} unreferenced layers live containers use",
                report.layers, report.blobs, report.leftovers, report.in_use
            );
        }
        ImageCommand::Verify => {
            let report = store.verify().map_err(|e| e.to_string())?;
            for problem in &report.problems {
                println!("{problem}");
            }
            if !report.problems.is_empty() {
                return Err(format!("the image store {} has {} problems, listed above", store.root().display(), report.problems.len()));
            }
            println!("{}: {} images, {} layers, {} blobs verified", store.root().display(), report.images, report.layers, report.blobs);
        }
        ImageCommand::Export { image, dir } => {
            store.export(&image, &dir, Progress::auto()).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

fn ago(t: SystemTime) -> String {
    let secs = SystemTime::now().duration_since(t).map_or(0, |d| d.as_secs());
    match secs {
        0..=59 => format!("{secs} s ago"),
        60..=3599 => format!("{} min ago", secs / 60),
        3600..=86399 => format!("{} h ago", secs / 3600),
        _ => format!("{} days ago", secs / 86400),
    }
}
