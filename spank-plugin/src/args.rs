//! The user's options (`srun --container-image=...`, `#SBATCH --container-mounts=...`):
//! their table, their parsing and their validation. Owns what a user may ask for;
//! never decides what the node allows (the engine checks mounts against the user's
//! access, the admin config decides per-rank) and never touches the file system.
//!
//! Slurm may call an option's callback more than once (local and remote, or again
//! from the environment), so every option *sets* its value: the last one given wins.

use std::fmt;
use std::path::{Component, Path, PathBuf};

/// One option of the table shown by `srun --help` / `sbatch --help`.
pub struct OptionSpec {
    pub name: &'static str,
    /// One word naming the argument; `None` for a flag.
    pub arginfo: Option<&'static str>,
    pub usage: &'static str,
    pub opt: Opt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opt {
    Image = 1,
    Mounts,
    Workdir,
    Env,
    NoMountHome,
    PerRank,
    Pull,
    Readonly,
    RemapRoot,
}

impl Opt {
    /// The `val` Slurm hands back to the option callback.
    pub fn from_val(val: i32) -> Option<Opt> {
        OPTIONS.iter().map(|spec| spec.opt).find(|opt| *opt as i32 == val)
    }
}

pub const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "container-image",
        arginfo: Some("IMAGE"),
        usage: "[berth] run every task inside this Docker/OCI image (same as --container=IMAGE)",
        opt: Opt::Image,
    },
    OptionSpec {
        name: "container-mounts",
        arginfo: Some("SRC:DST[:ro][,...]"),
        usage: "[berth] bind host paths you can access into the container",
        opt: Opt::Mounts,
    },
    OptionSpec {
        name: "container-workdir",
        arginfo: Some("DIR"),
        usage: "[berth] working directory of the tasks inside the container",
        opt: Opt::Workdir,
    },
    OptionSpec {
        name: "container-env",
        arginfo: Some("NAME[,NAME...]"),
        usage: "[berth] take these variables from the image even when the job has them",
        opt: Opt::Env,
    },
    OptionSpec {
        name: "no-container-mount-home",
        arginfo: None,
        usage: "[berth] do not bind your home directory into the container",
        opt: Opt::NoMountHome,
    },
    OptionSpec {
        name: "container-per-rank",
        arginfo: None,
        usage: "[berth] give every task its own container instead of one per node",
        opt: Opt::PerRank,
    },
    OptionSpec {
        name: "container-pull",
        arginfo: Some("missing|always|never"),
        usage: "[berth] when to pull the image from its registry (default: missing)",
        opt: Opt::Pull,
    },
    OptionSpec {
        name: "container-readonly",
        arginfo: None,
        usage: "[berth] make the container's root file system read-only",
        opt: Opt::Readonly,
    },
    OptionSpec {
        name: "container-remap-root",
        arginfo: None,
        usage: "[berth] run as root inside the container, mapped to you (where the site allows it)",
        opt: Opt::RemapRoot,
    },
];

/// When to pull: the engine's policy, under the option's name.
pub use berth_engine::store::PullPolicy as Pull;

/// A user's bind mount, `SRC:DST[:ro]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

impl fmt::Display for Mount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source.display(), self.target.display())?;
        if self.read_only {
            f.write_str(":ro")?;
        }
        Ok(())
    }
}

/// Everything the user asked for, as parsed so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Args {
    pub image: Option<String>,
    pub mounts: Vec<Mount>,
    pub workdir: Option<PathBuf>,
    pub env: Vec<String>,
    pub no_mount_home: bool,
    pub per_rank: bool,
    pub pull: Pull,
    pub readonly: bool,
    pub remap_root: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--{option}={value}: {why}")]
pub struct ArgError {
    pub option: &'static str,
    pub value: String,
    pub why: String,
}

impl Args {
    /// Applies one option as Slurm hands it to the callback.
    pub fn apply(&mut self, opt: Opt, value: Option<&str>) -> Result<(), ArgError> {
        let name = OPTIONS.iter().find(|spec| spec.opt == opt).map_or("container", |spec| spec.name);
        let value = value.unwrap_or("").trim();
        let bad = |why: &str| ArgError { option: name, value: value.to_string(), why: why.to_string() };
        match opt {
            Opt::Image => self.image = Some(parse_image(value).map_err(|why| bad(&why))?),
            Opt::Mounts => self.mounts = parse_mounts(value).map_err(|why| bad(&why))?,
            Opt::Workdir => {
                let dir = Path::new(value);
                if !dir.is_absolute() {
                    return Err(bad("the working directory must be an absolute path inside the container"));
                }
                self.workdir = Some(dir.to_path_buf());
            }
            Opt::Env => self.env = parse_env_names(value).map_err(|why| bad(&why))?,
            Opt::NoMountHome => self.no_mount_home = true,
            Opt::PerRank => self.per_rank = true,
            Opt::Readonly => self.readonly = true,
            Opt::RemapRoot => self.remap_root = true,
            Opt::Pull => {
                self.pull = match value {
                    "missing" => Pull::Missing,
                    "always" => Pull::Always,
                    "never" => Pull::Never,
                    _ => return Err(bad("expected missing, always or never")),
                }
            }
        }
        Ok(())
    }
}

/// A Docker/OCI reference as the user typed it (`ubuntu:22.04`, `host:5000/team/app@sha256:...`).
/// The engine resolves it; here we only refuse what can never be one.
fn parse_image(value: &str) -> Result<String, String> {
    if value.is_empty() {
        return Err("expected an image reference such as ubuntu:22.04".into());
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("an image reference has no spaces".into());
    }
    if value.starts_with('-') {
        return Err("an image reference does not start with '-'".into());
    }
    Ok(value.to_string())
}

fn parse_mounts(value: &str) -> Result<Vec<Mount>, String> {
    let specs: Vec<&str> = value.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if specs.is_empty() {
        return Err("expected SRC:DST[:ro][,...]".into());
    }
    specs.into_iter().map(parse_mount).collect()
}

fn parse_mount(spec: &str) -> Result<Mount, String> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (source, target, read_only) = match parts.as_slice() {
        [source] => (*source, *source, false),
        [source, target] => (*source, *target, false),
        [source, target, "ro"] => (*source, *target, true),
        [source, target, "rw"] => (*source, *target, false),
        [_, _, flag] => return Err(format!("'{spec}': unknown flag '{flag}', expected ro or rw")),
        _ => return Err(format!("'{spec}': expected SRC:DST[:ro]")),
    };
    let source = clean_absolute(source).ok_or_else(|| format!("'{spec}': SRC must be an absolute path without '..'"))?;
    let target = clean_absolute(target).ok_or_else(|| format!("'{spec}': DST must be an absolute path without '..'"))?;
    if target == Path::new("/") {
        return Err(format!("'{spec}': cannot mount over the container's root"));
    }
    Ok(Mount { source, target, read_only })
}

fn clean_absolute(path: &str) -> Option<PathBuf> {
    let path = Path::new(path);
    let ok = path.is_absolute() && path.components().all(|c| !matches!(c, Component::ParentDir));
    ok.then(|| path.components().collect())
}

fn parse_env_names(value: &str) -> Result<Vec<String>, String> {
    let names: Vec<String> = value.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
    if names.is_empty() {
        return Err("expected NAME[,NAME...]".into());
    }
    for name in &names {
        let mut chars = name.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("'{name}' is not a variable name"));
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(opt: Opt, value: &str) -> Result<Args, ArgError> {
        let mut args = Args::default();
        args.apply(opt, Some(value)).map(|()| args)
    }

    #[test]
    fn every_option_has_a_distinct_val_that_maps_back() {
        for spec in OPTIONS {
            assert_eq!(Opt::from_val(spec.opt as i32), Some(spec.opt), "{}", spec.name);
            assert!(spec.name.len() < 75, "Slurm's SPANK_OPTION_MAXLEN");
        }
        assert_eq!(Opt::from_val(0), None);
        assert_eq!(Opt::from_val(99), None);
    }

    #[test]
    fn mounts_parse_with_defaults_and_flags() {
        let args = apply(Opt::Mounts, "/scratch, /data:/in:ro,/tmp/x:/out:rw").unwrap();
        assert_eq!(
            args.mounts,
            vec![
                Mount { source: "/scratch".into(), target: "/scratch".into(), read_only: false },
                Mount { source: "/data".into(), target: "/in".into(), read_only: true },
                Mount { source: "/tmp/x".into(), target: "/out".into(), read_only: false },
            ]
        );
        assert_eq!(args.mounts[1].to_string(), "/data:/in:ro");
    }

    #[test]
    fn bad_mounts_say_which_part_is_wrong() {
        let err = apply(Opt::Mounts, "/a:/b:rx").unwrap_err();
        assert!(err.to_string().contains("unknown flag 'rx'"), "{err}");
        assert!(apply(Opt::Mounts, "data:/in").unwrap_err().why.contains("SRC must be an absolute path"));
        assert!(apply(Opt::Mounts, "/data:in").unwrap_err().why.contains("DST must be"));
        assert!(apply(Opt::Mounts, "/data:/x/../etc").is_err());
        assert!(apply(Opt::Mounts, "/data:/").unwrap_err().why.contains("root"));
        assert!(apply(Opt::Mounts, "/a:/b:ro:x").is_err());
        assert!(apply(Opt::Mounts, " , ").is_err());
    }

    #[test]
    fn the_last_value_wins_when_slurm_calls_twice() {
        let mut args = Args::default();
        args.apply(Opt::Mounts, Some("/a:/a")).unwrap();
        args.apply(Opt::Mounts, Some("/a:/a")).unwrap();
        assert_eq!(args.mounts.len(), 1);
        args.apply(Opt::Image, Some("alpine")).unwrap();
        args.apply(Opt::Image, Some("ubuntu:22.04")).unwrap();
        assert_eq!(args.image.as_deref(), Some("ubuntu:22.04"));
    }

    #[test]
    fn image_pull_env_and_workdir_are_checked() {
        assert_eq!(apply(Opt::Image, " localhost:5000/minimal ").unwrap().image.as_deref(), Some("localhost:5000/minimal"));
        assert!(apply(Opt::Image, "").is_err());
        assert!(apply(Opt::Image, "ubuntu 22.04").is_err());
        assert_eq!(apply(Opt::Pull, "never").unwrap().pull, Pull::Never);
        assert!(apply(Opt::Pull, "sometimes").unwrap_err().why.contains("missing, always or never"));
        assert_eq!(apply(Opt::Env, "PATH, LANG").unwrap().env, vec!["PATH", "LANG"]);
        assert!(apply(Opt::Env, "1X").is_err());
        assert!(apply(Opt::Env, "A-B").is_err());
        assert!(apply(Opt::Workdir, "rel").is_err());
        assert_eq!(apply(Opt::Workdir, "/work").unwrap().workdir, Some(PathBuf::from("/work")));
    }

    #[test]
    fn flags_ignore_their_missing_argument() {
        let mut args = Args::default();
        for opt in [Opt::NoMountHome, Opt::PerRank, Opt::Readonly] {
            args.apply(opt, None).unwrap();
        }
        assert!(args.no_mount_home && args.per_rank && args.readonly);
    }
}
