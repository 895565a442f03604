//! How a task's environment is made from the job's and the image's. Owns the merge
//! rules; never reads the job environment itself (the caller passes a lookup) and never
//! sets anything (it returns what to set).
//!
//! Rules, in order:
//! 1. Scheduler variables (`SLURM_*`, `SLURMD_*`, `SPANK_*`, `PMI*`, `PMIX_*`) are always
//!    the task's own: per-rank values must survive.
//! 2. `PATH` is the image's: host directories mean nothing inside the image, and a bare
//!    command name is looked up on the image's `PATH`.
//! 3. Names the user listed with `--container-env` are the image's.
//! 4. Names the job does not have are the image's.
//! 5. Everything else stays the job's.

/// Parses the `env` file that `berth container create` writes: `NAME=value` entries
/// separated by NUL bytes, or by newlines when the file holds no NUL.
pub fn parse_env_file(bytes: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(bytes);
    let separator = if bytes.contains(&0) { '\0' } else { '\n' };
    text.split(separator)
        .filter_map(|entry| {
            let (name, value) = entry.split_once('=')?;
            (!name.is_empty() && !name.contains(char::is_whitespace)).then(|| (name.to_string(), value.to_string()))
        })
        .collect()
}

fn is_scheduler_owned(name: &str) -> bool {
    ["SLURM_", "SLURMD_", "SPANK_", "PMI", "PMIX_", "_SLURM_SPANK_OPTION_"].iter().any(|prefix| name.starts_with(prefix))
}

/// The variables to set in the task, given the image's environment, the names the user
/// wants from the image, and whether the job already has a name.
pub fn merge(image: &[(String, String)], from_image: &[String], job_has: impl Fn(&str) -> bool) -> Vec<(String, String)> {
    image
        .iter()
        .filter(|(name, _)| {
            !is_scheduler_owned(name) && (name == "PATH" || from_image.iter().any(|n| n == name) || !job_has(name))
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn env_file_parses_nul_and_newline_forms() {
        let nul = parse_env_file(b"PATH=/usr/bin:/bin\0LANG=C.UTF-8\0EMPTY=\0");
        assert_eq!(nul, pairs(&[("PATH", "/usr/bin:/bin"), ("LANG", "C.UTF-8"), ("EMPTY", "")]));
        let lines = parse_env_file(b"A=1\nB=x=y\n\nbroken\n");
        assert_eq!(lines, pairs(&[("A", "1"), ("B", "x=y")]));
    }

    #[test]
    fn image_path_wins_and_job_values_stay_unless_listed() {
        let image = pairs(&[("PATH", "/opt/app/bin:/usr/bin"), ("LANG", "C.UTF-8"), ("HOME", "/root"), ("APP_HOME", "/opt/app")]);
        let job = ["PATH", "HOME", "LANG"];
        let set = merge(&image, &["LANG".into()], |n| job.contains(&n));
        assert_eq!(set, pairs(&[("PATH", "/opt/app/bin:/usr/bin"), ("LANG", "C.UTF-8"), ("APP_HOME", "/opt/app")]));
    }

    #[test]
    fn scheduler_variables_are_never_taken_from_the_image() {
        let image = pairs(&[("SLURM_PROCID", "7"), ("PMI_RANK", "7"), ("PMIX_RANK", "7"), ("SLURMD_NODENAME", "x")]);
        let listed: Vec<String> = image.iter().map(|(k, _)| k.clone()).collect();
        assert!(merge(&image, &listed, |_| false).is_empty());
    }
}
