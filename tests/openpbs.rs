//! End-to-end tests of berth on a real OpenPBS (`slurm-test-env/pbs-up`): jobs that
//! alice submits with `#PBS -l container=IMAGE`, run through berth's site hook
//! (queuejob, execjob_begin, execjob_launch, execjob_epilogue/end/abort) and the setuid
//! launcher `berth-pbs-enter`; and that launcher attacked directly by regular users on
//! a node, as any local user could. Each job test checks nothing of its job is left on
//! any node afterwards.

use berth_e2e::{assert_escaping_job_left_nothing, with_and_without_cgroup_v2_controllers, assert_pbs_job_gone, cluster, launcher_script_refusals, pbs_job_files, quote, state_dir, stdout_ok, BobsPrivateDir, Cluster, SweepMarked, ESCAPING_JOB};
use std::sync::{RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

/// Every test shares the cluster's berth config; the one that turns `remap_user` on
/// holds this for writing, so it runs alone.
static CONFIG: RwLock<()> = RwLock::new(());

fn shared_config() -> RwLockReadGuard<'static, ()> {
    CONFIG.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

const IMAGE: &str = "registry:5000/mpi:latest";
const ENV: &str = "PBS_CONF_FILE=/var/spool/pbs/pbs.conf";
const BIN: &str = "/opt/pbs/bin";
const MPIRUN: &str = "mpirun -hostfile $PBS_NODEFILE /opt/berth-test/bin/hello-openmpi\n";

fn openpbs() -> Cluster {
    let cluster = cluster();
    let out = cluster.run(&format!("env {ENV} {BIN}/qstat -B"));
    assert!(
        out.status.success(),
        "OpenPBS is not up on the test cluster ({}): run `slurm-test-env/up 2`, then `slurm-test-env/pbs-up --profile release`",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    cluster
}

/// A job's files in a directory of the user's home unique to this run and test.
struct Job {
    cluster: Cluster,
    dir: String,
    id: String,
    user: String,
}

impl Job {
    /// Runs qsub as `user` with `args` (shell words) in the test's fresh dir.
    fn qsub(user: &str, test: &str, args: &str, script: &str) -> (Cluster, String, std::process::Output) {
        let cluster = openpbs();
        let dir = format!("openpbs-e2e-{}-{test}", std::process::id());
        let line = format!(
            "rm -rf {dir} && mkdir {dir} && cd {dir} && printf '%s' {} > job.sh && env {ENV} {BIN}/qsub {args} -o $PWD/out -e $PWD/err job.sh",
            quote(script)
        );
        let out = cluster.run_as(user, &line);
        (cluster, dir, out)
    }

    fn submit(test: &str, args: &str, script: &str) -> Job {
        let (cluster, dir, out) = Job::qsub("alice", test, args, script);
        let id = stdout_ok(&out).trim().to_string();
        assert!(id.ends_with(".head"), "qsub printed {id}");
        Job { cluster, dir, id, user: "alice".into() }
    }

    fn attr(&self, name: &str) -> String {
        let out = self.cluster.run_as(&self.user, &format!("env {ENV} {BIN}/qstat -xf {} 2>/dev/null | sed -n 's/^ *{name} = //p'", self.id));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn wait_for(&self, state: &str, limit: Duration) {
        let start = Instant::now();
        loop {
            let now = self.attr("job_state");
            if now == state {
                return;
            }
            assert!(start.elapsed() < limit, "job {} still in state '{now}' after {limit:?}", self.id);
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Waits until the job is finished and its files are delivered; (stdout, stderr).
    fn finish(&self) -> (String, String) {
        self.wait_for("F", Duration::from_secs(300));
        pbs_job_files(&self.cluster, &self.user, &self.dir, &self.id)
    }

    fn exit_status(&self) -> Option<i64> {
        self.attr("Exit_status").parse().ok()
    }

    /// Nothing of the job on any node: no runtime dir, no mount, no process marked
    /// `berth-e2e-JOB`, no sshd of its container.
    fn assert_gone(&self) {
        assert_pbs_job_gone(&self.cluster, &self.id)
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        let _ = self.cluster.run_as(&self.user, &format!("env {ENV} {BIN}/qdel -W force {} 2>/dev/null; rm -rf {}", self.id, self.dir));
    }
}

fn ranks(stdout: &str) -> Vec<String> {
    let mut lines: Vec<String> = stdout.lines().filter(|l| l.starts_with("rank ")).map(String::from).collect();
    lines.sort();
    lines
}

#[test]
fn one_node_job_runs_mpirun_in_the_image() {
    let _config = shared_config();
    let script = format!("#!/bin/bash\n#PBS -l container={IMAGE}\n#PBS -l select=1:ncpus=2:mpiprocs=2\n{MPIRUN}echo \"in $(pwd) from $PBS_O_WORKDIR\"\n");
    let job = Job::submit("one", "", &script);
    let (out, err) = job.finish();
    let ranks = ranks(&out);
    assert_eq!(ranks.len(), 2, "stdout: {out} stderr: {err}");
    let node = ranks[0].split_whitespace().nth(5).unwrap_or_default().to_string();
    assert_eq!(ranks, [format!("rank 0 of 2 on {node} os=debian"), format!("rank 1 of 2 on {node} os=debian")], "{err}");
    let dir = out.lines().find_map(|l| l.strip_prefix("in ")).unwrap_or_default();
    let (cwd, submit) = dir.split_once(" from ").unwrap_or_default();
    assert!(!submit.is_empty() && cwd == submit, "the script should start in the submit dir: {dir}");
    assert_eq!(job.exit_status(), Some(0), "{err}");
    job.assert_gone();
}

#[test]
fn two_node_job_runs_ranks_in_the_image_on_both_hosts() {
    let _config = shared_config();
    let script = format!(
        "#!/bin/bash\n#PBS -l container={IMAGE}\n#PBS -l select=2:ncpus=2:mpiprocs=2\n#PBS -l place=scatter\n\
         {MPIRUN}sed 's/^/nodefile /' $PBS_NODEFILE\n"
    );
    let job = Job::submit("two", "", &script);
    let (out, err) = job.finish();
    let nodefile: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("nodefile ")).collect();
    assert_eq!(nodefile.len(), 4, "stdout: {out} stderr: {err}");
    assert_ne!(nodefile[0], nodefile[2], "{nodefile:?}");
    let expect: Vec<String> = (0..4).map(|r| format!("rank {r} of 4 on {} os=debian", nodefile[r])).collect();
    assert_eq!(ranks(&out), expect, "stderr: {err}");
    assert_eq!(job.exit_status(), Some(0), "{err}");
    job.assert_gone();
}

#[test]
fn tm_tasks_land_in_the_jobs_containers_on_every_node() {
    let _config = shared_config();
    // pbsdsh is the node's, bound in with its config; each task it starts through
    // pbs_mom's TM passes execjob_launch and the launcher on its own node.
    let resource = format!("container={IMAGE};container-mounts=/opt/pbs:/opt/pbs:ro;container-mounts=/var/spool/pbs/pbs.conf:/var/spool/pbs/pbs.conf:ro");
    let script = "#!/bin/bash\n/opt/pbs/bin/pbsdsh -- /bin/sh -c 'echo \"tm $(cat /proc/sys/kernel/hostname) $(test -d /opt/berth-test && echo in-image || echo on-host) $(id -un)\"'\n";
    let job = Job::submit("tm", &format!("-l select=2:ncpus=1 -l place=scatter -l {}", quote(&resource)), script);
    let (out, err) = job.finish();
    let mut tasks: Vec<&str> = out.lines().filter(|l| l.starts_with("tm ")).collect();
    tasks.sort();
    let nodes = job.cluster.nodes();
    let want: Vec<String> = nodes.iter().take(2).map(|n| format!("tm {n} in-image alice")).collect();
    assert_eq!(tasks, want, "stdout: {out} stderr: {err}");
    assert_eq!(job.exit_status(), Some(0), "{err}");
    job.assert_gone();
}

#[test]
fn qsub_of_a_program_runs_it_in_the_image_with_its_arguments() {
    let _config = shared_config();
    // `qsub -- PROGRAM ARGS`: no shell, argv exactly as given, through the launch.
    let cluster = openpbs();
    let dir = format!("openpbs-e2e-{}-program", std::process::id());
    let line = format!(
        "rm -rf {dir} && mkdir {dir} && cd {dir} && env {ENV} {BIN}/qsub -l select=1:ncpus=1 -l container={IMAGE} -o $PWD/out -e $PWD/err \
         -- /bin/sh -c 'test -d /opt/berth-test && echo \"in-image [$0] [$1]\"' 'a b' c"
    );
    let id = stdout_ok(&cluster.run(&line)).trim().to_string();
    let job = Job { cluster, dir, id, user: "alice".into() };
    let (out, err) = job.finish();
    assert_eq!(out, "in-image [a b] [c]\n", "stderr: {err}");
    assert_eq!(job.exit_status(), Some(0), "{err}");
    job.assert_gone();
}

#[test]
fn array_subjobs_each_run_in_the_image() {
    let _config = shared_config();
    // Subjob ids hold brackets (`12[1].head`), which pbs_mom also escapes in the
    // script's path it sends the shell.
    let cluster = openpbs();
    let dir = format!("openpbs-e2e-{}-array", std::process::id());
    let script = format!("#!/bin/bash\n#PBS -l container={IMAGE}\n#PBS -l select=1:ncpus=1\necho \"idx=$PBS_ARRAY_INDEX $(test -d /opt/berth-test && echo in-image || echo on-host)\"\n");
    let line = format!(
        "rm -rf {dir} && mkdir {dir} && cd {dir} && printf '%s' {} > job.sh && env {ENV} {BIN}/qsub -J 1-2 -o $PWD/out.^array_index^ -e $PWD/err.^array_index^ job.sh",
        quote(&script)
    );
    let id = stdout_ok(&cluster.run(&line)).trim().to_string();
    assert!(id.ends_with("[].head"), "qsub printed {id}");
    let job = Job { cluster, dir, id, user: "alice".into() };
    job.wait_for("F", Duration::from_secs(300));
    for i in 1..=2 {
        let start = Instant::now();
        let out = loop {
            let out = job.cluster.run(&format!("cd {} && cat out.{i} err.{i}", job.dir));
            if out.status.success() {
                break String::from_utf8_lossy(&out.stdout).into_owned();
            }
            assert!(start.elapsed() < Duration::from_secs(60), "subjob {i}'s files never arrived");
            std::thread::sleep(Duration::from_millis(500));
        };
        assert_eq!(out, format!("idx={i} in-image\n"));
    }
    let base = job.id.trim_end_matches("[].head");
    for node in job.cluster.nodes() {
        let start = Instant::now();
        loop {
            let left = stdout_ok(&job.cluster.on_node(&node, &format!("ls /run/berth | grep '^{base}_' ; grep ' /run/berth/{base}_' /proc/self/mountinfo; true")));
            if left.trim().is_empty() {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "subjobs left on {node}: {left}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

#[test]
fn the_job_keeps_the_variables_a_setuid_launchers_libc_drops() {
    let _config = shared_config();
    // TMPDIR (pbs_mom's, per job) and LD_LIBRARY_PATH (the user's) cross the setuid
    // berth-pbs-enter as BERTH_PBS_ENV_* and reach the job under their own names.
    let script = format!("#!/bin/bash\n#PBS -l container={IMAGE}\n#PBS -l select=1:ncpus=1\necho \"tmpdir=$TMPDIR lib=$LD_LIBRARY_PATH\"\nenv | grep -c ^BERTH_PBS_ENV_; true\n");
    let job = Job::submit("kept", "-v LD_LIBRARY_PATH=/opt/berth-e2e/lib", &script);
    let (out, err) = job.finish();
    assert_eq!(out, format!("tmpdir=/var/tmp/pbs.{} lib=/opt/berth-e2e/lib\n0\n", job.id), "stderr: {err}");
    assert_eq!(job.exit_status(), Some(0), "{err}");
    job.assert_gone();
}

#[test]
fn a_bad_reference_is_refused_by_qsub_with_one_line() {
    let _config = shared_config();
    let (_cluster, _dir, out) = Job::qsub("alice", "badref", "-l select=1:ncpus=1 -l container=Registry:5000/UPPER", "#!/bin/bash\necho ran\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "qsub took it: {}", String::from_utf8_lossy(&out.stdout));
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("qsub: berth: container=Registry:5000/UPPER: "), "{err}");
    assert!(lines[0].contains("is not an image reference"), "{err}");
}

#[test]
fn a_missing_image_fails_the_job_with_one_line_and_never_runs_it() {
    let _config = shared_config();
    let job = Job::submit("missing", "-l select=2:ncpus=1 -l place=scatter -l container=registry:5000/no-such-image:1", "#!/bin/bash\necho ran\n");
    let (out, err) = job.finish();
    assert!(!out.contains("ran"), "the script ran: {out}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with(&format!("berth-pbs begin: job {} on ", job.id)), "{err}");
    assert!(lines[0].contains("registry:5000/no-such-image:1") && lines[0].contains("not found"), "{err}");
    assert_eq!(job.exit_status(), Some(1));
    job.assert_gone();
}

#[test]
fn qdel_mid_run_leaves_nothing_on_any_node() {
    let _config = shared_config();
    // The top shell sleeps on the first node; an ssh'd sleep runs in the sister's
    // container under its sshd, outside anything pbs_mom tracks.
    let script = format!(
        "#!/bin/bash\n#PBS -l container={IMAGE}\n#PBS -l select=2:ncpus=1\n#PBS -l place=scatter\n\
         sister=$(sort -u $PBS_NODEFILE | grep -vx $(hostname))\n\
         ssh $sister \"exec -a berth-e2e-$PBS_JOBID sleep 600\" &\nexec -a berth-e2e-$PBS_JOBID sleep 600\n"
    );
    let job = Job::submit("qdel", "", &script);
    job.wait_for("R", Duration::from_secs(300));
    let start = Instant::now();
    loop {
        let running = stdout_ok(&job.cluster.on_node("node1", &format!("pgrep -f '[b]erth-e2e-{}' | wc -l", job.id))).trim().parse::<u32>().unwrap_or(0);
        if running >= 2 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "job {} never started both sleeps", job.id);
        std::thread::sleep(Duration::from_millis(500));
    }
    stdout_ok(&job.cluster.run(&format!("env {ENV} {BIN}/qdel {}", job.id)));
    job.wait_for("F", Duration::from_secs(120));
    job.assert_gone();
}

#[test]
fn a_job_without_a_container_is_untouched() {
    let _config = shared_config();
    let script = "#!/bin/bash\n#PBS -l select=1:ncpus=1\nid -un\ntest -d /opt/berth-test && echo in-image || echo on-host\n\
                  echo \"shell $(tr '\\0' ' ' </proc/$$/cmdline)\"\ntest -e /run/berth/$PBS_JOBID && echo container-made; true\n";
    let job = Job::submit("native", "", script);
    let (out, err) = job.finish();
    assert_eq!(out, "alice\non-host\nshell /bin/bash /var/spool/pbs/mom_priv/jobs/".to_string() + &job.id + ".SC \n", "stderr: {err}");
    assert_eq!(err, "");
    assert_eq!(job.exit_status(), Some(0));
    job.assert_gone();
}

// The launcher, attacked directly. pbs_mom starts it as the job user; any local user can
// start it just the same, with anything in argv, the environment and descriptors.

/// Runs `shell` on `node` as `user`, from a clean login-like environment plus `env`.
fn as_user_on(cluster: &Cluster, node: &str, user: &str, env: &str, shell: &str) -> std::process::Output {
    cluster.on_node(node, &format!("cd / && runuser -u {user} -- env -i PATH=/usr/bin:/bin HOME=/home/{user} {env} sh -c {}", quote(shell)))
}

fn launcher() -> (String, String) {
    let state = state_dir();
    (format!("{}/bin/berth-pbs-enter", state.display()), format!("{}/etc/berth/berth.toml", state.display()))
}

/// A running container job of alice's, its script sleeping on node1 until dropped.
fn running_job(test: &str) -> Job {
    let script = format!("#!/bin/bash\n#PBS -l container={IMAGE}\nexec -a berth-e2e-$PBS_JOBID sleep 600\n");
    let job = Job::submit(test, "-l select=1:host=node1:ncpus=1", &script);
    job.wait_for("R", Duration::from_secs(300));
    let start = Instant::now();
    // The script's own process, not the container's mount: the mount is there before the
    // hook has written the job's user into the image's /etc/passwd.
    while !job.cluster.on_node("node1", &format!("pgrep -f '^berth-e2e-{} ' >/dev/null", job.id)).status.success() {
        assert!(start.elapsed() < Duration::from_secs(60), "job {}'s script never started on node1", job.id);
        std::thread::sleep(Duration::from_millis(300));
    }
    job
}

#[test]
fn the_launcher_enters_only_the_callers_own_running_job() {
    let _config = shared_config();
    let job = running_job("own");
    let (enter, _) = launcher();
    let probe = "id -un; test -d /opt/berth-test && echo in-image; grep -E '^(CapEff|CapPrm|NoNewPrivs)' /proc/self/status | tr -s '\\t ' ' '";
    let inside = format!("{enter} --job {} -- /bin/sh -c {}", job.id, quote(probe));
    // Alice, by hand, into her own job: as herself, in the image, without privileges.
    let own = as_user_on(&job.cluster, "node1", "alice", "", &inside);
    let text = String::from_utf8_lossy(&own.stdout);
    assert!(own.status.success(), "alice into her own job: {text} {}", String::from_utf8_lossy(&own.stderr));
    assert_eq!(text, "alice\nin-image\nCapPrm: 0000000000000000\nCapEff: 0000000000000000\nNoNewPrivs: 1\n");
    // Bob, into alice's job: refused before anything runs.
    let other = as_user_on(&job.cluster, "node1", "bob", "", &inside);
    let err = String::from_utf8_lossy(&other.stderr);
    assert_eq!(other.status.code(), Some(125), "bob got in: {} {err}", String::from_utf8_lossy(&other.stdout));
    assert!(other.stdout.is_empty());
    assert!(err.trim_end().ends_with(&format!("container 'node' of job {} on this node is not yours (uid {}): you may enter only your own job's container", job.id, uid("bob", &job.cluster))), "{err}");
    // Alice on a node where the job has no container.
    let elsewhere = as_user_on(&job.cluster, "node2", "alice", "", &inside);
    assert_eq!(elsewhere.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&elsewhere.stderr).contains(&format!("no container 'node' for job {} on this node", job.id)));
    drop(job);
}

fn uid(user: &str, cluster: &Cluster) -> String {
    stdout_ok(&cluster.on_node("node1", &format!("id -u {user}"))).trim().to_string()
}

#[test]
fn the_launcher_refuses_a_finished_job_and_a_users_config() {
    let _config = shared_config();
    let job = running_job("finished");
    let id = job.id.clone();
    let cluster = openpbs();
    stdout_ok(&cluster.run(&format!("env {ENV} {BIN}/qdel {id}")));
    job.wait_for("F", Duration::from_secs(120));
    job.assert_gone();
    let (enter, config) = launcher();
    let finished = as_user_on(&cluster, "node1", "alice", "", &format!("{enter} --job {id} -- /bin/id"));
    assert_eq!(finished.status.code(), Some(125), "{}", String::from_utf8_lossy(&finished.stdout));
    assert!(finished.stdout.is_empty());
    assert!(String::from_utf8_lossy(&finished.stderr).contains(&format!("no container 'node' for job {id} on this node")));
    // No config of the caller's at all: hers would name a runtime dir she made, and
    // even a root-owned one may be a file of an image she pulled.
    for config in ["~/openpbs-e2e.toml", config.as_str()] {
        let own = as_user_on(
            &cluster,
            "node1",
            "alice",
            "",
            &format!("mkdir -p ~/openpbs-e2e-rt && printf 'runtime_dir = \"%s\"\\n' ~/openpbs-e2e-rt > ~/openpbs-e2e.toml && {enter} --config {config} --job {id} -- /bin/id; echo rc=$?; rm -rf ~/openpbs-e2e-rt ~/openpbs-e2e.toml"),
        );
        let (out, err) = (String::from_utf8_lossy(&own.stdout), String::from_utf8_lossy(&own.stderr));
        assert_eq!(out, "rc=125\n", "{err}");
        assert!(err.contains("usage: berth-pbs-enter --job JOBID"), "{err}");
    }
}

#[test]
fn the_launcher_ignores_a_hostile_environment() {
    let _config = shared_config();
    let job = running_job("hostile");
    let (enter, _) = launcher();
    let cluster = openpbs();
    // A preload library that records the euid of every process that loads it.
    let home = "/home/alice";
    let lib = format!("{home}/openpbs-e2e-preload.so");
    let log = format!("{home}/openpbs-e2e-preload.log");
    let source = format!(
        "#include <stdio.h>\n#include <unistd.h>\n__attribute__((constructor)) static void f(void) {{ FILE *l = fopen(\"{log}\", \"a\"); if (l) {{ fprintf(l, \"euid=%d\\n\", (int)geteuid()); fclose(l); }} }}\n"
    );
    stdout_ok(&cluster.on_node(
        "node1",
        &format!("printf '%s' {} > /tmp/openpbs-e2e-preload.c && cc -shared -fPIC -o {lib} /tmp/openpbs-e2e-preload.c && chown alice: {lib} && rm -f {log} /tmp/openpbs-e2e-preload.c", quote(&source)),
    ));
    // As the launch hook passes them (BERTH_PBS_ENV_*, see docs/design.md) and plain.
    let hostile = format!(
        "LD_PRELOAD={lib} BERTH_PBS_ENV_LD_PRELOAD={lib} LD_LIBRARY_PATH={home} GLIBC_TUNABLES=glibc.malloc.check=3 \
         BERTH_PBS_ENV_GLIBC_TUNABLES=glibc.malloc.check=3 BERTH_CONFIG={home}/nope.toml BERTH_STORE={home} LOCALDOMAIN=x"
    );
    let out = as_user_on(&cluster, "node1", "alice", &hostile, &format!("{enter} --job {} -- /bin/sh -c 'echo preload=$LD_PRELOAD; id -un'", job.id));
    let logged = stdout_ok(&cluster.on_node("node1", &format!("cat {log} 2>/dev/null; rm -f {lib} {log}")));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    // The job's own program gets its environment as data, and runs as alice.
    assert_eq!(text, format!("preload={lib}\nalice\n"));
    assert!(!logged.contains("euid=0"), "a root process loaded the user's library: {logged}");
    // Posing as the job's shell (argv[0] `-...`, a path on a pipe), the script named is
    // opened as alice, not as root.
    let shadow = as_user_on(
        &cluster,
        "node1",
        "alice",
        "",
        &format!("echo /etc/shadow | bash -c 'exec -a -berth-pbs-enter {enter} --job {} -- /bin/bash'", job.id),
    );
    let err = String::from_utf8_lossy(&shadow.stderr);
    assert_eq!(shadow.status.code(), Some(125), "{}", String::from_utf8_lossy(&shadow.stdout));
    assert!(shadow.stdout.is_empty());
    assert_eq!(err.trim_end(), "berth-pbs-enter: cannot open the job script /etc/shadow as you: Permission denied (os error 13)");
    drop(job);
}

/// Finding 2 of the launcher's review: the script path on stdin was opened with the
/// caller's fsuid but root's other capabilities (CAP_SYS_PTRACE opens another user's
/// `/proc/PID/cwd` and `ns/*`, CAP_SYSLOG shows `/proc/kallsyms`' addresses). Opened by
/// a child that became the caller, and only a regular file of a file system is a script.
#[test]
fn the_launcher_opens_the_script_on_stdin_as_the_caller_with_no_capability() {
    let _config = shared_config();
    let job = running_job("script-caps");
    let (enter, _) = launcher();
    let bob = BobsPrivateDir::new(&job.cluster, "node1", "script-caps");
    assert!(!as_user_on(&job.cluster, "node1", "alice", "", &format!("cat /proc/{}/cwd/secret.txt", bob.pid)).status.success(), "alice reads bob's dir by herself");
    let alices = stdout_ok(&job.cluster.on_node("node1", &format!("pgrep -f '^berth-e2e-{} '", job.id))).trim().to_string();
    let denied = "Permission denied (os error 13)";
    let cases = [
        (format!("/proc/{}/cwd/secret.txt", bob.pid), denied.to_string()),
        ("/proc/kallsyms".to_string(), "not a regular file (a file of the kernel's proc file system)".to_string()),
        (format!("/proc/{}/ns/mnt", bob.pid), denied.to_string()),
        (format!("/proc/{alices}/ns/mnt"), "not a regular file (a file of the kernel's nsfs file system)".to_string()),
    ];
    let seen = launcher_script_refusals(&job.cluster, "node1", &enter, &job.id, &cases);
    let failed: Vec<&String> = seen.iter().filter(|l| l.starts_with("  ^")).collect();
    drop(bob);
    assert!(failed.is_empty(), "{}", seen.join("\n"));
    drop(job);
}

/// Finding 4 of the launcher's review: `mpiprocs` was expanded line by line into root's
/// memory and the hostfile (`mpiprocs=1000000` made a 6 MB file on /run). Counts are
/// numbers now, and one past the cap fails the job with one line before anything is made.
#[test]
fn an_absurd_mpiprocs_fails_the_job_with_one_line_and_writes_no_hostfile() {
    let _config = shared_config();
    let script = format!("#!/bin/bash\n#PBS -l container={IMAGE}\necho ran; wc -l < $PBS_NODEFILE\n");
    let job = Job::submit("mpiprocs", "-l select=1:host=node2:ncpus=1:mpiprocs=1000000", &script);
    let (out, err) = job.finish();
    assert!(!out.contains("ran"), "the job ran with a hostfile of {out}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("node 'node2' would get 1000000 slots") && err.contains("berth lists at most 65536 on one node: ask for fewer MPI processes per node"),
        "{err}"
    );
    job.assert_gone();
    // Above the CPUs but within the cap: oversubscribing stays the user's choice.
    let job = Job::submit("mpiprocs-over", "-l select=1:host=node2:ncpus=1:mpiprocs=3", &script);
    let (out, err) = job.finish();
    assert_eq!(out, "ran\n3\n", "{err}");
    job.assert_gone();
}

/// `remap_user = true` in the nodes' berth config (one file every host binds) while alive.
struct RemapUser<'a> {
    cluster: &'a Cluster,
}

impl Drop for RemapUser<'_> {
    fn drop(&mut self) {
        let node = &self.cluster.nodes()[0];
        let _ = self.cluster.on_node(node, "sed -i '/^remap_user = true$/d' /etc/berth/berth.toml");
    }
}

#[test]
fn remap_root_runs_the_script_as_root_mapped_to_the_user_where_the_site_allows_it() {
    // Alone: the config change would reach every job starting meanwhile.
    let _config = CONFIG.write().unwrap_or_else(|poisoned| poisoned.into_inner());
    let script = "#!/bin/bash\n#PBS -l select=1:ncpus=1\necho uid=$(id -u); touch made-by-root\n";
    let resource = format!("-l {}", quote(&format!("container={IMAGE};container-remap-root")));
    let job = Job::submit("remap-off", &resource, script);
    let (out, err) = job.finish();
    assert!(!out.contains("uid="), "the script ran: {out}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("does not allow running as root") && err.contains("remap_user"), "{err}");
    job.assert_gone();

    let cluster = openpbs();
    stdout_ok(&cluster.on_node(&cluster.nodes()[0], "echo 'remap_user = true' >> /etc/berth/berth.toml"));
    let _remap = RemapUser { cluster: &cluster };
    let job = Job::submit("remap-on", &resource, script);
    let (out, err) = job.finish();
    assert!(out.contains("uid=0"), "stdout: {out} stderr: {err}");
    assert_eq!(job.exit_status(), Some(0), "{err}");
    let owner = stdout_ok(&cluster.run(&format!("stat -c %U {}/made-by-root", job.dir)));
    assert_eq!(owner.trim(), "alice", "a file made by remapped root must be the user's");
    job.assert_gone();
}

#[test]
fn a_working_directory_below_another_users_private_dir_is_refused_not_entered_as_root() {
    let _config = shared_config();
    let cluster = openpbs();
    let private = BobsPrivateDir::new(&cluster, "node1", "workdir");
    // alice may bind /home; she may not search bob's dir. Entered with root's rights,
    // the task would keep bob's subdir as its cwd and read the secret through it.
    let workdir = format!("/h{}/proj", private.dir.trim_start_matches("/home"));
    let script = format!("#!/bin/bash\n#PBS -l select=1:host=node1:ncpus=1\n#PBS -l container={IMAGE};container-mounts=/home:/h;container-workdir={workdir}\npwd; cat secret.txt\n");
    let job = Job::submit("workdir", "", &script);
    let (out, err) = job.finish();
    assert!(!out.contains("bob's secret") && !out.contains("/proj"), "alice's job got into bob's dir: {out} {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains(&format!("cannot enter the working directory {workdir}")) && lines[0].contains("Permission denied"), "{err}");
    assert_ne!(job.exit_status(), Some(0));
    job.assert_gone();
}

/// A job that leaves the container's mount namespace, its session and both
/// ([`ESCAPING_JOB`]): pbs_mom tracks a job by its session, so only berth's cgroup
/// finds the last of these, also where cgroup v2 carries controllers.
fn a_job_that_escapes_leaves_nothing() {
    let script = format!("#!/bin/bash\n#PBS -l container={IMAGE}\n#PBS -l select=1:ncpus=1\n{ESCAPING_JOB}");
    let job = Job::submit("escape", "", &script);
    let _sweep = SweepMarked(job.id.clone());
    let (out, err) = job.finish();
    assert_eq!(job.exit_status(), Some(0), "stdout: {out} stderr: {err}");
    assert_escaping_job_left_nothing(&job.cluster, &job.id, &out, &err);
}

#[test]
fn processes_that_leave_the_containers_namespaces_or_its_session_do_not_outlive_the_job_with_or_without_cgroup_v2_controllers() {
    // Alone: the controller it enables is machine-wide.
    let _config = CONFIG.write().unwrap_or_else(|poisoned| poisoned.into_inner());
    with_and_without_cgroup_v2_controllers(a_job_that_escapes_leaves_nothing);
}
