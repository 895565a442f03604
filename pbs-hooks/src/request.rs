//! What Torque hands a prologue or epilogue, and the image a job asks for.
//!
//! The argument lists are Torque 6.1.3's (`setup_pelog_arguments` in
//! src/resmom/prolog.c): prologue and prologue.parallel get
//! `JOBID USER GROUP JOBNAME RESOURCE_LIST QUEUE ACCOUNT SCRIPT`; epilogue and
//! epilogue.parallel get `JOBID USER GROUP JOBNAME SESSION RESOURCE_LIST RESOURCES_USED
//! QUEUE ACCOUNT EXIT_STATUS SCRIPT`. Missing values come as empty strings.
//!
//! The image comes from the resource list: `other=container=IMAGE` (Torque's qsub
//! refuses an unknown `container` resource, `Unknown resource type
//! Resource_List.container`, and its generic string resource `other` is passed to
//! every mom), or `container=IMAGE` where the server defines that resource (PBS
//! Professional, OpenPBS). On the mother superior, a `#BERTH container=IMAGE` line among
//! the script's leading comments works too (qsub ignores it; sisters never see it). Owns parsing only; never
//! touches the node.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("expected at least {want} arguments from pbs_mom, got {got}: install this binary as mom_priv/{hook}")]
    Arguments { hook: &'static str, want: usize, got: usize },
    #[error("cannot read the job script {path}: {source}")]
    Script { path: PathBuf, source: std::io::Error },
    #[error("the job asks for two images, '{first}' and '{second}': give one container=IMAGE")]
    TwoImages { first: String, second: String },
    #[error("container= is empty: give container=IMAGE, e.g. container=ubuntu:22.04")]
    EmptyImage,
}

/// The resource name users give the image with.
pub const RESOURCE: &str = "container";

/// A prologue's or epilogue's arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pelog {
    pub job: String,
    pub user: String,
    pub resources: String,
    /// The job script on the mother superior (absent on sisters).
    pub script: Option<PathBuf>,
}

impl Pelog {
    /// Parses `argv[1..]` of a prologue (`epilogue == false`) or an epilogue.
    pub fn parse(hook: &'static str, args: &[String], epilogue: bool) -> Result<Pelog, RequestError> {
        let (want, resources, script) = if epilogue { (11, 5, 10) } else { (8, 4, 7) };
        if args.len() < want {
            return Err(RequestError::Arguments { hook, want, got: args.len() });
        }
        let script = Some(PathBuf::from(&args[script])).filter(|p| p.is_file());
        Ok(Pelog { job: args[0].clone(), user: args[1].clone(), resources: args[resources].clone(), script })
    }

    /// The image the job asks for, if any: the resource list first, then the script.
    pub fn image(&self) -> Result<Option<String>, RequestError> {
        if let Some(image) = from_resource_list(&self.resources)? {
            return Ok(Some(image));
        }
        match &self.script {
            Some(path) => from_script(path),
            None => Ok(None),
        }
    }
}

/// `container=IMAGE` from a comma-separated `name=value` list.
pub fn from_resource_list(list: &str) -> Result<Option<String>, RequestError> {
    let mut found: Option<String> = None;
    for item in list.split(',') {
        let Some((name, value)) = item.trim().split_once('=') else { continue };
        // Torque 6.1.3 refuses unknown resources at qsub; its generic `other`
        // resource reaches every mom, so `other=container=IMAGE` carries it there.
        let value = match (name.trim(), value.trim().split_once('=')) {
            (RESOURCE, _) => value,
            ("other", Some((RESOURCE, image))) => image,
            _ => continue,
        };
        let value = value.trim();
        if value.is_empty() {
            return Err(RequestError::EmptyImage);
        }
        match &found {
            Some(first) if first != value => {
                return Err(RequestError::TwoImages { first: first.clone(), second: value.to_string() })
            }
            _ => found = Some(value.to_string()),
        }
    }
    Ok(found)
}

/// `container=IMAGE` from the script's `#PBS -l` directives, which qsub reads up to the
/// first line that is neither blank nor a comment.
pub fn from_script(path: &Path) -> Result<Option<String>, RequestError> {
    let text = std::fs::read(path).map_err(|source| RequestError::Script { path: path.to_path_buf(), source })?;
    from_script_text(&String::from_utf8_lossy(&text))
}

fn from_script_text(text: &str) -> Result<Option<String>, RequestError> {
    let mut found: Option<String> = None;
    for line in text.lines() {
        let line = line.trim_start();
        if !(line.is_empty() || line.starts_with('#')) {
            break;
        }
        let lists: Vec<&str> = if let Some(rest) = line.strip_prefix("#BERTH") {
            rest.split_whitespace().collect()
        } else if let Some(rest) = line.strip_prefix("#PBS") {
            let mut lists = Vec::new();
            let mut words = rest.split_whitespace();
            while let Some(word) = words.next() {
                match word {
                    "-l" => lists.push(words.next().unwrap_or("")),
                    w if w.starts_with("-l") => lists.push(&w[2..]),
                    _ => {}
                }
            }
            lists
        } else {
            continue;
        };
        for list in lists {
            if let Some(image) = from_resource_list(list)? {
                match &found {
                    Some(first) if *first != image => {
                        return Err(RequestError::TwoImages { first: first.clone(), second: image })
                    }
                    _ => found = Some(image),
                }
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn prologue_and_epilogue_arguments_follow_torque() {
        let p = Pelog::parse(
            "prologue",
            &args(&["7.head", "alice", "alice", "job", "nodes=2:ppn=2,container=mpi:latest", "batch", "", "/nonexistent/7.head.SC"]),
            false,
        )
        .unwrap();
        assert_eq!((p.job.as_str(), p.user.as_str(), p.script.as_deref()), ("7.head", "alice", None));
        assert_eq!(p.image().unwrap().as_deref(), Some("mpi:latest"));
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
        assert_eq!(from_resource_list("nodes=1,walltime=00:10:00").unwrap(), None);
        assert_eq!(
            from_resource_list("neednodes=2,container=registry:5000/mpi:latest,nodes=2").unwrap().as_deref(),
            Some("registry:5000/mpi:latest")
        );
        assert!(matches!(from_resource_list("container=").unwrap_err(), RequestError::EmptyImage));
        assert!(matches!(from_resource_list("container=a,container=b").unwrap_err(), RequestError::TwoImages { .. }));
        assert_eq!(
            from_resource_list("nodes=2:ppn=2,other=container=registry:5000/mpi:latest").unwrap().as_deref(),
            Some("registry:5000/mpi:latest")
        );
        assert_eq!(from_resource_list("other=something-else").unwrap(), None);
    }

    #[test]
    fn script_directives_stop_at_the_first_command() {
        let script = "#!/bin/bash\n#PBS -N x\n#PBS -l nodes=2:ppn=2\n\n#PBS -l walltime=1:00,container=mpi:latest\n# note\nmpirun hostname\n#PBS -l container=other\n";
        assert_eq!(from_script_text(script).unwrap().as_deref(), Some("mpi:latest"));
        assert_eq!(from_script_text("#PBS -lcontainer=a\n").unwrap().as_deref(), Some("a"));
        assert_eq!(from_script_text("echo hi\n#PBS -l container=a\n").unwrap(), None);
        assert!(from_script_text("#PBS -l container=a\n#PBS -l container=b\n").is_err());
        assert_eq!(from_script_text("#!/bin/sh\n#BERTH container=mpi:latest\n").unwrap().as_deref(), Some("mpi:latest"));
    }
}
