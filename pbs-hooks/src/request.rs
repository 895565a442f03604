//! What Torque hands a prologue or epilogue, and the container a job asks for.
//!
//! The argument lists are Torque 6.1.3's (`setup_pelog_arguments` in
//! src/resmom/prolog.c): prologue and prologue.parallel get
//! `JOBID USER GROUP JOBNAME RESOURCE_LIST QUEUE ACCOUNT SCRIPT`; epilogue and
//! epilogue.parallel get `JOBID USER GROUP JOBNAME SESSION RESOURCE_LIST RESOURCES_USED
//! QUEUE ACCOUNT EXIT_STATUS SCRIPT`. Missing values come as empty strings.
//!
//! The resource list is the only request every node's prologue sees: a sister runs
//! prologue.parallel before it has saved the job (`im_join_job_as_sister`,
//! src/resmom/mom_comm.c), so it has no job file, no nodefile and none of the job's
//! variables. The container and its options therefore come from Torque's generic
//! string resource `other` (qsub refuses an unknown `container` resource), written as
//! the Slurm plugin's option names: `other=container=IMAGE;container-mounts=/a:/b`.
//! Items are separated by `;`, spaces or commas; a word without `=` after a list
//! option (`container-mounts`, `container-env`) continues its list. Torque joins the
//! resource list with commas and does not escape the ones inside `other`, so a
//! comma-separated piece that is no `NAME=` of another resource belongs to `other`.
//! `container=...` as a resource of its own (PBS Professional, OpenPBS, where the
//! server defines it) works the same. Owns parsing only; never touches the node.

use berth_engine::image::UserMount;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("expected at least {want} arguments from pbs_mom, got {got}: install this binary as mom_priv/{hook}")]
    Arguments { hook: &'static str, want: usize, got: usize },
    #[error("the job asks for two images, '{first}' and '{second}': give one container=IMAGE")]
    TwoImages { first: String, second: String },
    #[error("container= is empty: give container=IMAGE, e.g. -l other=container=ubuntu:22.04")]
    EmptyImage,
    #[error("unknown option '{name}' in -l other=: known are {}", KNOWN.join(", "))]
    Unknown { name: String },
    #[error("{option}={value}: {why}")]
    BadValue { option: &'static str, value: String, why: &'static str },
    #[error("container-per-rank does not apply under Torque: your MPI starts the ranks over ssh in the one container of each node; drop it")]
    PerRank,
}

const IMAGE: &str = "container";
const IMAGE_LONG: &str = "container-image";
const MOUNTS: &str = "container-mounts";
const WORKDIR: &str = "container-workdir";
const ENV: &str = "container-env";
const NO_HOME: &str = "no-container-mount-home";
const PER_RANK: &str = "container-per-rank";
const PULL: &str = "container-pull";
const READONLY: &str = "container-readonly";
const REMAP_ROOT: &str = "container-remap-root";
pub(crate) const KNOWN: &[&str] = &[IMAGE, IMAGE_LONG, MOUNTS, WORKDIR, ENV, NO_HOME, PER_RANK, PULL, READONLY, REMAP_ROOT];

/// A prologue's or epilogue's arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pelog {
    pub job: String,
    pub user: String,
    pub resources: String,
    /// The job script's path in the mom's spool (it exists on the mother superior only).
    pub script: PathBuf,
}

impl Pelog {
    /// Parses `argv[1..]` of a prologue (`epilogue == false`) or an epilogue.
    pub fn parse(hook: &'static str, args: &[String], epilogue: bool) -> Result<Pelog, RequestError> {
        let (want, resources, script) = if epilogue { (11, 5, 10) } else { (8, 4, 7) };
        if args.len() < want {
            return Err(RequestError::Arguments { hook, want, got: args.len() });
        }
        Ok(Pelog { job: args[0].clone(), user: args[1].clone(), resources: args[resources].clone(), script: PathBuf::from(&args[script]) })
    }

    /// The container the job asks for, if any.
    pub fn request(&self) -> Result<Option<Request>, RequestError> {
        Request::from_resource_list(&self.resources)
    }
}

/// When to pull: the engine's policy, under the option's name.
pub use berth_engine::store::PullPolicy as Pull;

/// The container a job asks for, with the Slurm plugin's options.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Request {
    pub image: String,
    /// `SRC[:DST][:ro]`, each checked.
    pub mounts: Vec<String>,
    pub workdir: Option<String>,
    /// Names taken from the image even when the job sets them.
    pub env: Vec<String>,
    pub no_home: bool,
    pub pull: Pull,
    pub readonly: bool,
    /// The job script runs as root in a user namespace mapped to the job user (where
    /// the admin set `remap_user`).
    pub remap_root: bool,
}

impl Request {
    /// The request in a resource list (`nodes=2:ppn=2,other=container=IMG;...`), or
    /// None when it names no container.
    pub fn from_resource_list(list: &str) -> Result<Option<Request>, RequestError> {
        let mut berth: Vec<String> = Vec::new();
        for (name, value) in resources(list) {
            match name.trim() {
                "other" if mentions_container(&value) => berth.push(value),
                IMAGE => berth.push(format!("{IMAGE}={value}")),
                _ => {}
            }
        }
        if berth.is_empty() {
            return Ok(None);
        }
        Request::from_items(&berth.join(";")).map(Some)
    }

    /// Parses the items of `other` (see the module comment).
    fn from_items(text: &str) -> Result<Request, RequestError> {
        let mut request = Request::default();
        let mut image: Option<String> = None;
        let mut list: Option<&'static str> = None;
        for word in text.split(|c: char| c == ';' || c == ',' || c.is_whitespace()).filter(|w| !w.is_empty()) {
            let (name, value) = match word.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (word, None),
            };
            let known = KNOWN.iter().copied().find(|k| *k == name);
            let (option, value) = match (known, value, list) {
                (Some(option), _, _) => (option, value),
                // A word of the list before it: `container-mounts=/a:/b,/c:/d`.
                (None, None, Some(option)) => (option, Some(word)),
                // `other` is the site's too: its own items pass by; a misspelt berth item does not.
                _ if !looks_like_berths(name) => continue,
                _ => return Err(RequestError::Unknown { name: name.to_string() }),
            };
            list = None;
            let bad = |why| RequestError::BadValue { option, value: value.unwrap_or("").to_string(), why };
            match (option, value) {
                (NO_HOME, None) => request.no_home = true,
                (READONLY, None) => request.readonly = true,
                (REMAP_ROOT, None) => request.remap_root = true,
                (PER_RANK, None) => return Err(RequestError::PerRank),
                (NO_HOME | READONLY | PER_RANK | REMAP_ROOT, Some(_)) => return Err(bad("a flag takes no value")),
                (_, None) => return Err(bad("needs a value")),
                (IMAGE | IMAGE_LONG, Some(v)) => {
                    if v.is_empty() {
                        return Err(RequestError::EmptyImage);
                    }
                    match &image {
                        Some(first) if first != v => return Err(RequestError::TwoImages { first: first.clone(), second: v.to_string() }),
                        _ => image = Some(v.to_string()),
                    }
                }
                (MOUNTS, Some(v)) => {
                    if UserMount::parse(v).is_none() {
                        return Err(bad("expected SRC[:DST][:ro] with absolute paths"));
                    }
                    request.mounts.push(v.to_string());
                    list = Some(MOUNTS);
                }
                (ENV, Some(v)) => {
                    let plain = !v.is_empty() && !v.starts_with(|c: char| c.is_ascii_digit()) && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                    if !plain {
                        return Err(bad("expected variable names, e.g. container-env=PATH,LANG"));
                    }
                    request.env.push(v.to_string());
                    list = Some(ENV);
                }
                (WORKDIR, Some(v)) => {
                    if !v.starts_with('/') {
                        return Err(bad("expected an absolute directory inside the container"));
                    }
                    request.workdir = Some(v.to_string());
                }
                (PULL, Some(v)) => {
                    request.pull = match v {
                        "missing" => Pull::Missing,
                        "always" => Pull::Always,
                        "never" => Pull::Never,
                        _ => return Err(bad("expected missing, always or never")),
                    }
                }
                _ => unreachable!("every known option is matched above"),
            }
        }
        request.image = image.ok_or_else(|| RequestError::BadValue {
            option: IMAGE,
            value: String::new(),
            why: "options without an image: add container=IMAGE",
        })?;
        Ok(request)
    }
}

/// A name in berth's namespace: `container...` or `no-container...`.
fn looks_like_berths(name: &str) -> bool {
    name.starts_with("container") || name.starts_with("no-container")
}

/// Whether an `other` value is berth's: any of its items names a berth option.
fn mentions_container(value: &str) -> bool {
    value
        .split(|c: char| c == ';' || c == ',' || c.is_whitespace())
        .any(|w| KNOWN.contains(&w.split_once('=').map_or(w, |(n, _)| n)))
}

/// `name=value` resources of a comma-joined list. A piece continues the resource before
/// it when it has no `=`, or when it names a berth option and follows `other` or
/// `container` (whose values may hold commas).
fn resources(list: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for piece in list.split(',') {
        let after_berth = matches!(out.last(), Some((name, _)) if name == "other" || name == IMAGE);
        let continues = match piece.split_once('=') {
            Some((name, _)) => after_berth && KNOWN.contains(&name.trim()),
            None => true,
        };
        match (continues, out.last_mut()) {
            (true, Some((_, value))) => {
                value.push(',');
                value.push_str(piece);
            }
            _ => {
                let (name, value) = piece.split_once('=').unwrap_or((piece, ""));
                out.push((name.to_string(), value.to_string()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn parse(list: &str) -> Result<Option<Request>, RequestError> {
        Request::from_resource_list(list)
    }

    fn image(list: &str) -> Option<String> {
        parse(list).unwrap().map(|r| r.image)
    }

    #[test]
    fn prologue_and_epilogue_arguments_follow_torque() {
        let p = Pelog::parse(
            "prologue",
            &args(&["7.head", "alice", "alice", "job", "nodes=2:ppn=2,other=container=mpi:latest", "batch", "", "/spool/mom_priv/jobs/7.head.SC"]),
            false,
        )
        .unwrap();
        assert_eq!((p.job.as_str(), p.user.as_str()), ("7.head", "alice"));
        assert_eq!(p.script, PathBuf::from("/spool/mom_priv/jobs/7.head.SC"));
        assert_eq!(p.request().unwrap().unwrap().image, "mpi:latest");
        let e = Pelog::parse(
            "epilogue",
            &args(&["7.head", "alice", "alice", "job", "123", "container=x", "cput=0", "batch", "", "0", "/x.SC"]),
            true,
        )
        .unwrap();
        assert_eq!(e.resources, "container=x");
        let short = Pelog::parse("epilogue", &args(&["7.head", "alice"]), true).unwrap_err().to_string();
        assert!(short.contains("at least 11 arguments"), "{short}");
    }

    #[test]
    fn resource_list_gives_the_image_once() {
        assert_eq!(image("nodes=1,walltime=00:10:00"), None);
        assert_eq!(image("neednodes=2,container=registry:5000/mpi:latest,nodes=2").as_deref(), Some("registry:5000/mpi:latest"));
        assert_eq!(parse("container=").unwrap_err(), RequestError::EmptyImage);
        assert!(matches!(parse("container=a,container=b").unwrap_err(), RequestError::TwoImages { .. }));
        assert_eq!(image("nodes=2:ppn=2,other=container=registry:5000/mpi:latest").as_deref(), Some("registry:5000/mpi:latest"));
        assert_eq!(image("other=something-else"), None);
        assert_eq!(image("other=site=1:x=2,nodes=1"), None);
    }

    #[test]
    fn options_use_the_slurm_plugins_names_in_any_separator() {
        let want = Request {
            image: "mpi:latest".into(),
            mounts: vec!["/scratch:/data:ro".into(), "/tmp/x".into()],
            workdir: Some("/data".into()),
            env: vec!["PATH".into(), "LANG".into()],
            no_home: true,
            pull: Pull::Always,
            readonly: true,
            remap_root: false,
        };
        let semicolons = "nodes=2,other=container=mpi:latest;container-mounts=/scratch:/data:ro;container-mounts=/tmp/x;container-workdir=/data;container-env=PATH;container-env=LANG;no-container-mount-home;container-pull=always;container-readonly,walltime=00:10:00";
        assert_eq!(parse(semicolons).unwrap().unwrap(), want);
        // `other="..."` with commas and spaces: Torque passes the commas unescaped.
        let commas = "nodes=2,other=container-image=mpi:latest container-mounts=/scratch:/data:ro,/tmp/x,container-workdir=/data,container-env=PATH,LANG,no-container-mount-home,container-pull=always,container-readonly,walltime=00:10:00";
        assert_eq!(parse(commas).unwrap().unwrap(), want);
        let plain = parse("other=container=mpi:latest").unwrap().unwrap();
        assert_eq!((plain.pull, plain.no_home, plain.readonly, plain.mounts.len()), (Pull::Missing, false, false, 0));
    }

    #[test]
    fn bad_options_are_one_clear_error() {
        let err = |list: &str| parse(list).unwrap_err().to_string();
        assert!(err("other=container=a;container-mount=/x").contains("unknown option 'container-mount' in -l other=: known are container,"));
        assert!(err("other=container=a;container-pull=sometimes").contains("container-pull=sometimes: expected missing, always or never"));
        assert!(err("other=container=a;container-mounts=scratch").contains("absolute paths"));
        assert!(err("other=container=a;container-workdir=data").contains("absolute directory"));
        assert!(err("other=container=a;container-env=A-B").contains("variable names"));
        assert!(err("other=container=a;container-readonly=yes").contains("takes no value"));
        assert!(err("other=container=a;container-remap-root=1").contains("takes no value"));
        let remap = Request::from_resource_list("other=container=a;container-remap-root").unwrap().unwrap();
        assert!(remap.remap_root);
        assert!(err("other=container=a;container-workdir").contains("needs a value"));
        assert_eq!(parse("other=container=a;container-per-rank").unwrap_err(), RequestError::PerRank);
        assert!(err("other=container-mounts=/x").contains("add container=IMAGE"));
        // The site's own items in `other` are the site's business.
        assert_eq!(image("other=site=1;container=a;qos-thing").as_deref(), Some("a"));
    }
}
