//! Running the `berth` binary as root for the node-side actions (docs/design.md:
//! create, destroy). Owns the command lines and turning berth's failure into one line
//! for the user; never does the container work itself (no HTTP, threads or mounts in
//! slurmstepd).

use crate::args::{Args, Mount, Pull};
use berth_engine::config::Config;
use berth_engine::privileged;
use std::io::Write;
use std::path::Path;
use std::process::Stdio;

/// Who a container is for and what goes into it.
pub struct CreateRequest<'a> {
    pub job: u32,
    pub uid: u32,
    pub gid: u32,
    pub groups: &'a [u32],
    pub image: &'a str,
    /// Per-rank mode: this task's rank; per-node mode: `None`.
    pub rank: Option<u32>,
    /// The step's directory on the host: bound in, and the default working directory.
    pub submit_dir: Option<&'a Path>,
    pub args: &'a Args,
    /// Mounts the plugin adds itself (the batch script's directory).
    pub extra_mounts: &'a [Mount],
    /// The job's `DOCKER_CONFIG` and `PATH`: where berth finds the user's registry
    /// logins and credential helpers (read and run as the user).
    pub docker_config: Option<&'a str>,
    pub path: Option<&'a str>,
}

/// The arguments of `berth container create` for one container.
pub fn create_args(req: &CreateRequest<'_>) -> Vec<String> {
    let mut argv: Vec<String> = vec![
        "container".into(),
        "create".into(),
        "--job".into(),
        req.job.to_string(),
        "--user".into(),
        req.uid.to_string(),
        "--gid".into(),
        req.gid.to_string(),
        // A step's cgroup ends with the step, before the job's container; where cgroup
        // v2 carries controllers Slurm's proctrack/cgroup tracks the job (docs/admin.md).
        "--scheduler-cgroups".into(),
    ];
    if !req.groups.is_empty() {
        argv.push("--groups".into());
        argv.push(req.groups.iter().map(u32::to_string).collect::<Vec<_>>().join(","));
    }
    argv.extend(["--image".into(), req.image.to_string()]);
    if let Some(rank) = req.rank {
        argv.extend(["--rank".into(), rank.to_string()]);
    }
    // The default needs no flag, which keeps the common command line short.
    if req.args.pull != Pull::Missing {
        argv.extend(["--pull".into(), req.args.pull.as_str().to_string()]);
    }
    if let Some(dir) = req.submit_dir {
        argv.extend(["--submit-dir".into(), dir.display().to_string()]);
    }
    for mount in req.args.mounts.iter().chain(req.extra_mounts) {
        argv.push("--mount".into());
        argv.push(mount.to_string());
    }
    if req.args.no_mount_home {
        argv.push("--no-home".into());
    }
    if req.args.readonly {
        argv.push("--readonly".into());
    }
    if let Some(dir) = req.docker_config {
        argv.extend(["--docker-config".into(), dir.to_string()]);
    }
    if let Some(path) = req.path {
        argv.extend(["--helper-path".into(), path.to_string()]);
    }
    argv
}

pub fn create(config: &Config, req: &CreateRequest<'_>) -> Result<(), String> {
    run(config, &create_args(req)).map(drop).map_err(|why| format!("berth: cannot start image {}: {why}", req.image))
}

pub fn destroy(config: &Config, job: u32) -> Result<(), String> {
    let argv = ["container".to_string(), "destroy".into(), "--job".into(), job.to_string()];
    run(config, &argv).map(drop).map_err(|why| format!("berth: cannot tear down the containers of job {job}: {why}"))
}

/// Runs berth with the plugin's config on its stdin (`--config-stdin`), so it acts on
/// exactly the plugstack.conf settings, with a cleared environment (slurmstepd's
/// proxies only: see `privileged::command`). Returns berth's last stderr line on failure.
fn run(config: &Config, argv: &[String]) -> Result<Vec<u8>, String> {
    let toml = crate::config::to_toml(config)?;
    let binary: &Path = &config.berth_binary;
    // Last, so that the command line still starts `container create --job J` (slurmd.rs
    // finds a lost create by it).
    let mut child = privileged::command(binary, &privileged::daemon_variables(|name| std::env::var_os(name)))
        .args(argv)
        .arg("--config-stdin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| format!("cannot run {} ({err}); check berth_binary in plugstack.conf", binary.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A config is a few hundred bytes: it fits the pipe, so this cannot block on berth.
        // A berth that exits before reading it (bad arguments) closes the pipe: its own
        // message on stderr is the one worth reporting, so a broken pipe is not an error.
        match stdin.write_all(toml.as_bytes()) {
            Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => {
                return Err(format!("cannot pass the config to {}: {err}", binary.display()))
            }
            _ => {}
        }
    }
    let out = child.wait_with_output().map_err(|err| format!("lost {}: {err}", binary.display()))?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    Err(failure_line(&out.stderr, out.status))
}

/// berth's own explanation (its last non-empty stderr line) or how it died.
fn failure_line(stderr: &[u8], status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    // berth's own line ("berth: ...") or an argument error ("error: ..."), else the last line.
    let line = lines.iter().rev().find(|l| l.starts_with("berth: ") || l.starts_with("error: ")).or(lines.last());
    if let Some(line) = line {
        return line.strip_prefix("berth: ").unwrap_or(line).to_string();
    }
    match (status.code(), status.signal()) {
        (_, Some(signal)) => format!("berth was killed by signal {signal}"),
        (Some(code), _) => format!("berth exited with status {code} and no message"),
        _ => "berth failed".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::Opt;
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    #[test]
    fn create_passes_identity_image_and_user_choices() {
        let mut args = Args::default();
        args.apply(Opt::Mounts, Some("/data:/in:ro")).unwrap();
        args.apply(Opt::NoMountHome, None).unwrap();
        args.apply(Opt::Readonly, None).unwrap();
        args.pull = Pull::Never;
        let script = [Mount { source: "/var/spool/slurmd/job00042".into(), target: "/var/spool/slurmd/job00042".into(), read_only: true }];
        let req = CreateRequest {
            job: 42,
            uid: 1001,
            gid: 1001,
            groups: &[1001, 27],
            image: "localhost:5000/minimal",
            rank: Some(3),
            submit_dir: Some(Path::new("/home/alice/run")),
            args: &args,
            extra_mounts: &script,
            docker_config: Some("/home/alice/.dc"),
            path: None,
        };
        assert_eq!(
            create_args(&req).join(" "),
            "container create --job 42 --user 1001 --gid 1001 --scheduler-cgroups --groups 1001,27 --image localhost:5000/minimal --rank 3 \
             --pull never --submit-dir /home/alice/run --mount /data:/in:ro \
             --mount /var/spool/slurmd/job00042:/var/spool/slurmd/job00042:ro --no-home --readonly --docker-config /home/alice/.dc"
        );
        let per_node = CreateRequest { rank: None, submit_dir: None, args: &Args::default(), extra_mounts: &[], docker_config: None, ..req };
        assert_eq!(
            create_args(&per_node).join(" "),
            "container create --job 42 --user 1001 --gid 1001 --scheduler-cgroups --groups 1001,27 --image localhost:5000/minimal"
        );
    }

    #[test]
    fn failure_line_is_berths_last_line_or_the_way_it_died() {
        let status = ExitStatus::from_raw(1 << 8);
        assert_eq!(failure_line(b"berth: pulling x: manifest unknown\n\n", status), "pulling x: manifest unknown");
        let clap = b"error: unexpected argument '--readonly' found\n\nUsage: berth container create\n\nFor more information, try '--help'.\n";
        assert_eq!(failure_line(clap, status), "error: unexpected argument '--readonly' found");
        assert_eq!(failure_line(b"progress\nlast words\n", status), "last words");
        assert_eq!(failure_line(b"", ExitStatus::from_raw(9)), "berth was killed by signal 9");
        assert_eq!(failure_line(b"", status), "berth exited with status 1 and no message");
    }

    #[test]
    fn a_missing_binary_names_the_setting_to_fix() {
        let mut config = Config::default();
        config.berth_binary = "/nonexistent/berth".into();
        let err = destroy(&config, 7).unwrap_err();
        assert!(err.contains("/nonexistent/berth") && err.contains("berth_binary"), "{err}");
    }

    #[test]
    fn berth_gets_the_plugin_config_on_stdin() {
        let dir = std::env::temp_dir().join(format!("berth-spank-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("berth");
        std::fs::write(&fake, "#!/bin/sh\ncat; echo \"$@\"; env\n").unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let mut config = Config::default();
        config.berth_binary = fake;
        config.store_dir = "/scratch/store".into();
        let out = String::from_utf8(run(&config, &["container".into(), "destroy".into()]).unwrap()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(out.contains("store_dir = \"/scratch/store\""), "{out}");
        assert!(out.contains("\ncontainer destroy --config-stdin\n"), "{out}");
        // Nothing of slurmstepd's environment but the proxies (none here) and a fixed PATH.
        let env: Vec<&str> = out.lines().skip_while(|l| !l.starts_with("container destroy")).skip(1).filter(|l| !["PWD=", "SHLVL=", "_="].iter().any(|p| l.starts_with(p)))
            .filter(|l| !privileged::DAEMON_VARIABLES.iter().any(|v| l.starts_with(&format!("{v}="))))
            .collect();
        assert_eq!(env, [format!("PATH={}", privileged::ROOT_PATH)], "{out}");
    }
}
