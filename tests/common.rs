//! What every end-to-end test needs: the running slurm-test-env cluster, reached only
//! through its scripts (`slurm-test-env/run`, `on`, `registry`, `push`), and the
//! berth binaries built from this workspace.
//!
//! Tests never bring the cluster up themselves: `tests/run-all` does, once, and tears
//! it down even when a test fails. A test run without it fails with a line saying so.

use berth_testkit::{tar_of, Entry, Image};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The repository root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// The `berth` binary built from this workspace in this test build's profile (the
/// release one for `tests/run-all`, whose cluster runs it), or `$BERTH_BIN`.
pub fn berth_binary() -> PathBuf {
    let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
    let path = std::env::var_os("BERTH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target").join(profile).join("berth"));
    assert!(
        path.exists(),
        "{} is missing: run `cargo build{} -p berth` first",
        path.display(),
        if cfg!(debug_assertions) { "" } else { " --release" }
    );
    path
}

/// The test cluster, as its scripts present it.
pub struct Cluster {
    scripts: PathBuf,
}

/// The cluster brought up by `slurm-test-env/up`; panics with what to do when it is down.
pub fn cluster() -> Cluster {
    let scripts = repo_root().join("slurm-test-env");
    let status = Command::new(scripts.join("status")).output().expect("run slurm-test-env/status");
    assert!(
        status.status.success(),
        "the test cluster is not up ({}): run `slurm-test-env/up` or the README's test command",
        String::from_utf8_lossy(&status.stderr).trim()
    );
    Cluster { scripts }
}

impl Cluster {
    fn script(&self, name: &str) -> Command {
        Command::new(self.scripts.join(name))
    }

    /// The registry's address as the hosts (and this machine's root namespace) reach it.
    pub fn registry(&self) -> String {
        let out = self.script("registry").output().expect("run slurm-test-env/registry");
        assert!(out.status.success(), "slurm-test-env/registry failed");
        String::from_utf8(out.stdout).expect("utf-8").trim().to_string()
    }

    /// Runs a shell command line on the head host as the cluster's first regular user.
    pub fn run(&self, shell: &str) -> Output {
        self.run_as(&self.users()[0], shell)
    }

    /// Runs a shell command line on the head host as `user` (or `root`).
    pub fn run_as(&self, user: &str, shell: &str) -> Output {
        self.script("run").args(["--as", user, "bash", "-c", shell]).output().expect("run slurm-test-env/run")
    }

    /// Runs a shell command line as root on one compute host (e.g. `node1`).
    pub fn on_node(&self, node: &str, shell: &str) -> Output {
        self.script("on").args([node, "bash", "-c", shell]).output().expect("run slurm-test-env/on")
    }

    /// The compute hosts' names, `node1`..`nodeN`.
    pub fn nodes(&self) -> Vec<String> {
        lines(&self.script("status").arg("--nodes").output().expect("run slurm-test-env/status"))
    }

    /// The two regular users jobs run as.
    pub fn users(&self) -> Vec<String> {
        lines(&self.script("status").arg("--users").output().expect("run slurm-test-env/status"))
    }
}

/// The OCI layout that slurm-test-env built for a test image (`minimal`, `mpi`, `layers`).
pub fn image_layout(name: &str) -> PathBuf {
    let root = std::env::var_os("BERTH_TEST_IMAGES").map(PathBuf::from).unwrap_or_else(|| "/var/cache/berth-test-env/images".into());
    root.join(name)
}

/// The layer every runnable test image starts with: the host's static busybox as
/// `/bin/busybox`, with `sh`, `true`, `cat` and `sleep` linked to it, and `/stamp`.
pub fn busybox_layer(stamp: &str) -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static is installed");
    tar_of(&[
        Entry::Dir("bin", 0o755),
        Entry::File("bin/busybox", &busybox, 0o755),
        Entry::Symlink("bin/sh", "busybox"),
        Entry::Symlink("bin/true", "busybox"),
        Entry::Symlink("bin/cat", "busybox"),
        Entry::Symlink("bin/sleep", "busybox"),
        Entry::File("stamp", stamp.as_bytes(), 0o644),
    ])
}

/// An image of gzip layers of these tar streams, running `cmd` with `PATH=/bin`.
pub fn image(tars: &[Vec<u8>], cmd: &[&str]) -> Image {
    Image::gzip(tars, serde_json::json!({ "Cmd": cmd, "Env": ["PATH=/bin"] }))
}

/// Pushes the image to the cluster's registry as `NAME:TAG` (through an OCI layout for
/// `slurm-test-env/push`, removed after); returns its reference there.
pub fn push_image(image: &Image, name_tag: &str) -> String {
    let (_, tag) = name_tag.rsplit_once(':').expect("NAME:TAG");
    let layout = std::env::temp_dir().join(format!("berth-push-{}-{}", name_tag.replace([':', '/'], "-"), std::process::id()));
    let _ = std::fs::remove_dir_all(&layout);
    image.write_layout(&layout, tag);
    let out = Command::new(repo_root().join("slurm-test-env/push")).arg(format!("{}:{tag}", layout.display())).arg(name_tag).output().unwrap();
    let _ = std::fs::remove_dir_all(&layout);
    stdout_ok(&out);
    format!("{}/{name_tag}", cluster().registry())
}

/// A command's stdout, split into lines; panics with its stderr when it failed.
pub fn lines(out: &Output) -> Vec<String> {
    assert!(out.status.success(), "command failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect()
}

/// A command's stdout as text, for assertions; includes stderr in the panic if it failed.
pub fn stdout_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "command failed ({}): stdout: {} stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The job id a task printed as `JOB=<id>` (scheduler variables survive the container;
/// `srun -l` prefixes are skipped).
pub fn job_of(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.split_once("JOB=").map(|(_, id)| id.trim().to_string()))
        .unwrap_or_else(|| panic!("no JOB= line in {stdout:?}"))
}

/// A shell line printing the pids (space-separated) of a Slurm job's processes on the
/// host: those with `SLURM_JOB_ID=<job>` in their environment (ranks, MPI daemons, whatever they left
/// running) among the processes of the host's network namespace (the test hosts share
/// the machine's pid namespace; a container shares its host's network).
pub fn job_pids_shell(job: &str) -> String {
    format!(
        "net=$(stat -L -c %i /proc/self/ns/net); for p in /proc/[0-9]*; do \
           [ \"$(stat -L -c %i $p/ns/net 2>/dev/null)\" = \"$net\" ] || continue; \
           tr '\\0' '\\n' <$p/environ 2>/dev/null | grep -qx 'SLURM_JOB_ID={job}' && printf '%s ' ${{p#/proc/}}; \
         done; true"
    )
}

/// Waits (the epilog runs after the job ends) until no compute host holds the job's
/// runtime dir, a mount under it, or a process of the job ([`job_pids_shell`]).
pub fn assert_nodes_clean(cluster: &Cluster, job: &str) {
    let check = format!(
        "test ! -e /run/berth/{job} && ! grep -q ' /run/berth/{job}/' /proc/self/mountinfo && test -z \"$({})\"",
        job_pids_shell(job)
    );
    for node in cluster.nodes() {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if cluster.on_node(&node, &check).status.success() {
                break;
            }
            let seen = cluster.on_node(&node, &format!("ls -la /run/berth; grep berth /proc/self/mountinfo; ps -o pid,args -p $({})", job_pids_shell(job)));
            assert!(Instant::now() < deadline, "job {job} left state on {node}: {}", String::from_utf8_lossy(&seen.stdout));
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// The cluster's state dir, as `slurm-test-env/lib.sh` names it.
pub fn state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BERTH_TEST_STATE") {
        return dir.into();
    }
    match std::env::var("BERTH_TEST_CLUSTER").ok().filter(|k| k != "0") {
        Some(k) => format!("/var/lib/berth-test-env-{k}").into(),
        None => "/var/lib/berth-test-env".into(),
    }
}

/// A shell word for `sh -c`.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A dir of bob's on `node` that only bob may search (`dir`, 0700), holding a
/// searchable `proj/` with a readable `secret.txt` ("bob's secret") and a process of
/// bob's sitting in it (`pid`): what alice must never reach through berth's root code.
/// The process and the dir go on drop.
pub struct BobsPrivateDir<'a> {
    cluster: &'a Cluster,
    node: String,
    pub dir: String,
    pub pid: String,
}

impl<'a> BobsPrivateDir<'a> {
    pub fn new(cluster: &'a Cluster, node: &str, test: &str) -> BobsPrivateDir<'a> {
        let dir = format!("/home/bob/berth-e2e-{}-{test}", std::process::id());
        let mark = format!("berth-e2e-victim-{}-{test}", std::process::id());
        let pid = stdout_ok(&cluster.on_node(
            node,
            &format!(
                "rm -rf {dir} && install -d -o bob -g bob -m 0700 {dir} && install -d -o bob -g bob -m 0755 {dir}/proj \
                 && echo \"bob's secret\" > {dir}/proj/secret.txt && chown bob: {dir}/proj/secret.txt && chmod 644 {dir}/proj/secret.txt \
                 && setsid -f runuser -u bob -- bash -c 'cd {dir}/proj && exec -a {mark} sleep 600' </dev/null >/dev/null 2>&1; \
                 for i in $(seq 50); do pgrep -f '^{mark}' && exit 0; sleep 0.1; done; exit 1"
            ),
        ))
        .trim()
        .to_string();
        BobsPrivateDir { cluster, node: node.to_string(), dir, pid }
    }
}

impl Drop for BobsPrivateDir<'_> {
    fn drop(&mut self) {
        let _ = self.cluster.on_node(&self.node, &format!("kill {}; rm -rf {}", self.pid, self.dir));
    }
}

/// The setuid launcher `enter`, run by alice on `node` as pbs_mom runs a job's shell
/// (argv0 `-…`, the script's path on stdin) into her running job `job`, with a program
/// of hers that prints what it got on stdin: fed each path of `cases`, it must refuse
/// with status 125 and one line ending in the case's reason. Returns what happened, a
/// line per case, plus a `  ^` line after each case that was not refused so.
pub fn launcher_script_refusals(cluster: &Cluster, node: &str, enter: &str, job: &str, cases: &[(String, String)]) -> Vec<String> {
    let cat = format!("/home/alice/berth-e2e-{}-cat.sh", std::process::id());
    stdout_ok(&cluster.on_node(node, &format!("printf '#!/bin/sh\\nexec cat\\n' > {cat} && chown alice: {cat} && chmod 755 {cat}")));
    let mut seen = Vec::new();
    for (path, why) in cases {
        let line = format!("printf '%s\\n' {path} | bash -c 'exec -a -berth-pbs-enter {enter} --job {job} -- {cat}'");
        let out = cluster.on_node(node, &format!("cd / && runuser -u alice -- env -i PATH=/usr/bin:/bin HOME=/home/alice sh -c {}", quote(&line)));
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        seen.push(format!("{path}: status {:?}, stdout {:?}, stderr {:?}", out.status.code(), stdout.lines().take(2).collect::<Vec<_>>(), stderr.trim_end()));
        if !(out.status.code() == Some(125) && stdout.is_empty() && stderr.trim_end() == format!("berth-pbs-enter: cannot open the job script {path} as you: {why}")) {
            seen.push(format!("  ^ expected refusal: {why}"));
        }
    }
    let _ = cluster.on_node(node, &format!("rm -f {cat}"));
    seen
}

/// A finished PBS job's output files, `out` and `err` in `dir` of `user`'s home, once
/// both are delivered (pbs_mom copies them after the job ends); (stdout, stderr).
pub fn pbs_job_files(cluster: &Cluster, user: &str, dir: &str, job: &str) -> (String, String) {
    let start = Instant::now();
    loop {
        let out = cluster.run_as(user, &format!("cd {dir} && test -e out && test -e err && cat out && echo '#--err--' && cat err"));
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let (o, e) = text.split_once("#--err--\n").unwrap_or((&text, ""));
            return (o.to_string(), e.to_string());
        }
        assert!(start.elapsed() < Duration::from_secs(60), "job {job}'s output files never arrived");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Nothing of PBS job `job` on any node: no runtime dir, no mount, no process marked
/// `berth-e2e-JOB`. The epilogue runs after the job is reported done: waits up to 30 s.
pub fn assert_pbs_job_gone(cluster: &Cluster, job: &str) {
    for node in cluster.nodes() {
        let check = format!(
            "test ! -e /run/berth/{job} || echo dir left; grep -q '/run/berth/{job}/' /proc/self/mountinfo && echo mount left; \
             pgrep -f '[b]erth-e2e-{job}' && echo process left; true"
        );
        let start = Instant::now();
        loop {
            let left = stdout_ok(&cluster.on_node(&node, &check)).trim().to_string();
            if left.is_empty() {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "job {job} left on {node}: {left}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// The machine's cgroup v2 hierarchy (its first cgroup2 mount), as the test cluster's
/// hosts see it too.
pub fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let point = left.split(' ').nth(4)?;
        (right.split(' ').next()? == "cgroup2").then(|| PathBuf::from(point))
    })
}

/// Whether the machine's cgroup v2 root enables controllers (the systemd default).
pub fn cgroup2_carries_controllers() -> bool {
    cgroup2_root().and_then(|r| std::fs::read_to_string(r.join("cgroup.subtree_control")).ok()).is_some_and(|c| !c.trim().is_empty())
}

/// A controller enabled at the cgroup v2 root while this lives (machine-wide), so
/// that berth sees a node whose v2 hierarchy carries controllers, as under systemd's
/// default. `None` where the root already carries some (the node is such a node
/// already) or has none to enable (all are cgroup v1's).
pub struct ControllerAtRoot {
    subtree_control: PathBuf,
    controller: String,
}

impl ControllerAtRoot {
    pub fn enable() -> Option<ControllerAtRoot> {
        let root = cgroup2_root()?;
        let subtree_control = root.join("cgroup.subtree_control");
        if cgroup2_carries_controllers() {
            return None;
        }
        let available = std::fs::read_to_string(root.join("cgroup.controllers")).ok()?;
        let controller = available.split_whitespace().next()?.to_string();
        std::fs::write(&subtree_control, format!("+{controller}")).unwrap_or_else(|e| panic!("cannot enable {controller} at {}: {e}", root.display()));
        Some(ControllerAtRoot { subtree_control, controller })
    }
}

impl Drop for ControllerAtRoot {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.subtree_control, format!("-{}", self.controller));
    }
}

/// Runs `job` as the machine is, then (where its cgroup v2 root carries no controller
/// yet and has one to enable) again with one enabled, as on a systemd host. The caller
/// holds its suite's lock alone: the controller is machine-wide.
pub fn with_and_without_cgroup_v2_controllers(job: impl Fn()) {
    job();
    match ControllerAtRoot::enable() {
        Some(_on) => job(),
        None => eprintln!("this machine's cgroup v2 root carries controllers already, or has none to enable: the first job was the only case"),
    }
}

/// A PBS job script's body that leaves the container's mount namespace (`unshare
/// -Urm`: a user namespace of its own, which any user may make), its session
/// (`setsid`), and both, each a process marked `berth-e2e-$PBS_JOBID`; then prints
/// the host and the script's cgroup.
pub const ESCAPING_JOB: &str = "m=berth-e2e-$PBS_JOBID\n\
    unshare -Urm sh -c \"sleep 1000; : $m\" </dev/null >/dev/null 2>&1 &\n\
    setsid sh -c \"sleep 1001; : $m\" </dev/null >/dev/null 2>&1 &\n\
    setsid unshare -Urm sh -c \"sleep 1002; : $m\" </dev/null >/dev/null 2>&1 &\n\
    sleep 1\necho \"host=$(hostname) cgroup=$(sed -n 's/^0:://p' /proc/self/cgroup)\"\n";

/// After an [`ESCAPING_JOB`] ended: nothing of it on any node; and where cgroup v2
/// carries controllers, its script ran in a cgroup of its own below its pbs_mom's
/// (torque-up and pbs-up give each mom one, as systemd does), whose limits it kept.
pub fn assert_escaping_job_left_nothing(cluster: &Cluster, job: &str, out: &str, err: &str) {
    let (host, cgroup) = out
        .lines()
        .find_map(|l| l.strip_prefix("host=")?.split_once(" cgroup="))
        .unwrap_or_else(|| panic!("no host= line: {out} {err}"));
    assert_pbs_job_gone(cluster, job);
    if cgroup2_carries_controllers() {
        let k = std::env::var("BERTH_TEST_CLUSTER").unwrap_or_else(|_| "0".into());
        let mom = format!("/berth-test-{k}/{host}-pbs_mom/");
        assert!(cgroup.starts_with(&mom) && cgroup.len() > mom.len(), "the job's script runs in {cgroup}, not in a cgroup of its own below pbs_mom's {mom}");
    }
}

/// Kills every process marked `berth-e2e-JOB` on the cluster's nodes when dropped:
/// whatever a test's outcome, no sleeper of an escaping job stays.
pub struct SweepMarked(pub String);

impl Drop for SweepMarked {
    fn drop(&mut self) {
        let cluster = cluster();
        for node in cluster.nodes() {
            let _ = cluster.on_node(&node, &format!("pkill -KILL -f '[b]erth-e2e-{}'", self.0));
        }
    }
}
