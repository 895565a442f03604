//! End-to-end tests of berth's Torque hooks on the test cluster with a real TORQUE
//! 6.1.3 (`slurm-test-env/torque-up`): jobs submitted with `qsub` as alice, run by
//! pbs_mom through mom_priv/prologue, prologue.parallel, the job starter, epilogue and
//! epilogue.parallel (all `berth-pbs`). Each test checks that nothing of its job is
//! left on any node afterwards.

use berth_e2e::{assert_escaping_job_left_nothing, with_and_without_cgroup_v2_controllers, assert_pbs_job_gone, busybox_layer, cluster, launcher_script_refusals, pbs_job_files, push_image, quote, state_dir, stdout_ok, BobsPrivateDir, Cluster, SweepMarked, ESCAPING_JOB};
use berth_testkit::{tar_of, Entry};
use std::sync::{RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

/// Every test shares the cluster's moms; the one that shortens their `$prologalarm`
/// holds this for writing, so it runs alone.
static MOMS: RwLock<()> = RwLock::new(());

fn shared_moms() -> RwLockReadGuard<'static, ()> {
    MOMS.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

const IMAGE: &str = "registry:5000/mpi:latest";
const QSUB: &str = "/opt/torque/bin/qsub";
const QSTAT: &str = "/opt/torque/bin/qstat";

/// A job's files in a directory of alice's home unique to this run and test.
struct Job {
    cluster: Cluster,
    dir: String,
    id: String,
    user: String,
}

fn torque() -> Cluster {
    let cluster = cluster();
    let nodes = cluster.nodes().len();
    assert!(nodes >= 4, "the Torque tests need 4 compute hosts, the cluster has {nodes}: run `slurm-test-env/up 4`, then `slurm-test-env/torque-up`");
    let out = cluster.run(&format!("{QSTAT} -B"));
    assert!(
        out.status.success(),
        "Torque is not up on the test cluster ({}): run `slurm-test-env/torque-up`",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    cluster
}

impl Job {
    /// Writes `script` and submits it with `resources` (`qsub -l`).
    fn submit(test: &str, resources: &str, script: &str) -> Job {
        Job::submit_as("alice", test, resources, "", "", script)
    }

    /// Writes `script` and submits it as alice with qsub's arguments `args` (shell words) only.
    fn submit_with(test: &str, args: &str, script: &str) -> Job {
        Job::submit_as("alice", test, "", "", args, script)
    }

    /// Writes `script` and submits it as `user` with `resources`, after running `setup`
    /// (in the job's fresh dir) and with `qsub_args` besides.
    fn submit_as(user: &str, test: &str, resources: &str, setup: &str, qsub_args: &str, script: &str) -> Job {
        let (cluster, dir, out) = Job::qsub(user, test, resources, setup, qsub_args, script);
        let id = stdout_ok(&out).trim().to_string();
        assert!(id.ends_with(".head"), "qsub printed {id}");
        Job { cluster, dir, id, user: user.to_string() }
    }

    /// Runs qsub as `user` in the test's fresh directory; its output.
    fn qsub(user: &str, test: &str, resources: &str, setup: &str, qsub_args: &str, script: &str) -> (Cluster, String, std::process::Output) {
        let cluster = torque();
        let dir = format!("pbs-e2e-{}-{test}", std::process::id());
        let setup = if setup.is_empty() { String::new() } else { format!("{setup} && ") };
        let resources = if resources.is_empty() { String::new() } else { format!("-l {}", quote(resources)) };
        let line = format!(
            "rm -rf {dir} && mkdir {dir} && cd {dir} && {setup}printf '%s' {} > job.sh && {QSUB} {resources} {qsub_args} -o $PWD/out -e $PWD/err job.sh",
            quote(script),
        );
        let out = cluster.run_as(user, &line);
        (cluster, dir, out)
    }

    fn state(&self) -> String {
        let out = self.cluster.run_as(&self.user, &format!("{QSTAT} -f {} 2>/dev/null | sed -n 's/^ *job_state = //p'", self.id));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn wait_for(&self, state: &str, limit: Duration) {
        let start = Instant::now();
        loop {
            let now = self.state();
            // A finished job is C for keep_completed seconds, then gone.
            if now == state || (state == "C" && now.is_empty()) {
                return;
            }
            assert!(start.elapsed() < limit, "job {} still in state '{now}' after {limit:?}", self.id);
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Waits until the job is done and its files are delivered; (stdout, stderr).
    fn finish(&self) -> (String, String) {
        self.wait_for("C", Duration::from_secs(300));
        pbs_job_files(&self.cluster, &self.user, &self.dir, &self.id)
    }

    fn exit_status(&self) -> Option<i64> {
        let out = self.cluster.run_as(&self.user, &format!("{QSTAT} -f {} 2>/dev/null | sed -n 's/^ *exit_status = //p'", self.id));
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    /// Nothing of the job on any node: no runtime dir, no mount, no process.
    fn assert_gone(&self) {
        assert_pbs_job_gone(&self.cluster, &self.id)
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        let _ = self.cluster.run_as(&self.user, &format!("/opt/torque/bin/qdel {} 2>/dev/null; rm -rf {}", self.id, self.dir));
    }
}

const MPIRUN: &str = "#!/bin/bash\nmpirun -hostfile $PBS_NODEFILE /opt/berth-test/bin/hello-openmpi\n";

fn ranks(stdout: &str) -> Vec<String> {
    let mut lines: Vec<String> = stdout.lines().filter(|l| l.starts_with("rank ")).map(String::from).collect();
    lines.sort();
    lines
}

#[test]
fn qsub_container_one_node_runs_mpirun_in_the_image() {
    let _moms = shared_moms();
    let script = format!("{MPIRUN}echo \"in $(pwd) from $PBS_O_WORKDIR\"\n");
    let job = Job::submit("one", &format!("nodes=1:ppn=2,other=container={IMAGE}"), &script);
    let (out, err) = job.finish();
    let dir = out.lines().find_map(|l| l.strip_prefix("in ")).unwrap_or_default();
    let (cwd, submit) = dir.split_once(" from ").unwrap_or_default();
    assert!(!submit.is_empty() && cwd == submit, "the script should start in the submit dir: {dir}");
    let ranks = ranks(&out);
    assert_eq!(ranks.len(), 2, "stdout: {out} stderr: {err}");
    let node = ranks[0].split_whitespace().nth(5).unwrap_or_default().to_string();
    assert_eq!(ranks, [format!("rank 0 of 2 on {node} os=debian"), format!("rank 1 of 2 on {node} os=debian")], "{err}");
    assert_eq!(job.exit_status(), Some(0), "{err}");
    job.assert_gone();
}

#[test]
fn qsub_container_two_nodes_runs_ranks_on_both() {
    let _moms = shared_moms();
    let script = format!("{MPIRUN}cat $PBS_NODEFILE | sed 's/^/nodefile /'\n");
    let job = Job::submit("two", &format!("nodes=2:ppn=2,other=container={IMAGE}"), &script);
    let (out, err) = job.finish();
    let nodefile: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("nodefile ")).collect();
    assert_eq!(nodefile.len(), 4, "stdout: {out} stderr: {err}");
    let (first, second) = (nodefile[0], nodefile[2]);
    assert_ne!(first, second, "{nodefile:?}");
    let expect: Vec<String> = (0..4).map(|r| format!("rank {r} of 4 on {} os=debian", nodefile[r])).collect();
    assert_eq!(ranks(&out), expect, "stderr: {err}");
    assert_eq!(job.exit_status(), Some(0), "{err}");
    job.assert_gone();
}

#[test]
fn qsub_bad_image_fails_with_one_line() {
    let _moms = shared_moms();
    // Two nodes: the sister's prologue.parallel fails too, and its epilogue.parallel
    // must clean up there.
    let job = Job::submit("bad", "nodes=2:ppn=1,other=container=registry:5000/no-such-image:1", "#!/bin/bash\necho ran\n");
    let (out, err) = job.finish();
    assert!(!out.contains("ran"), "the script ran: {out}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with(&format!("berth-pbs prologue: job {} on ", job.id)), "{err}");
    assert!(lines[0].contains("registry:5000/no-such-image:1") && lines[0].contains("not found"), "{err}");
    assert_eq!(job.exit_status(), Some(1));
    job.assert_gone();
}

#[test]
fn qsub_without_container_runs_natively_as_the_user() {
    let _moms = shared_moms();
    let script = "#!/bin/bash\nid -un\ntest -d /opt/berth-test && echo in-image || echo on-host\ntest -e /run/berth/$PBS_JOBID && echo container-made; true\n";
    let job = Job::submit("native", "nodes=1:ppn=1", script);
    let (out, err) = job.finish();
    assert_eq!(out, "alice\non-host\n", "stderr: {err}");
    assert_eq!(err, "");
    assert_eq!(job.exit_status(), Some(0));
    job.assert_gone();
}

#[test]
fn qdel_mid_run_leaves_nothing() {
    let _moms = shared_moms();
    let script = "#!/bin/bash\necho started\nexec -a berth-e2e-$PBS_JOBID sleep 600\n";
    let job = Job::submit("qdel", &format!("nodes=2:ppn=1,other=container={IMAGE}"), script);
    job.wait_for("R", Duration::from_secs(300));
    let start = Instant::now();
    loop {
        // Output is delivered only at the end: look for the job's process instead.
        let running = job.cluster.nodes().iter().any(|n| {
            stdout_ok(&job.cluster.on_node(n, &format!("pgrep -f '[b]erth-e2e-{}' >/dev/null && echo yes; true", job.id))).contains("yes")
        });
        if running {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "job {} never started sleeping", job.id);
        std::thread::sleep(Duration::from_millis(500));
    }
    stdout_ok(&job.cluster.run(&format!("/opt/torque/bin/qdel {}", job.id)));
    job.wait_for("C", Duration::from_secs(120));
    job.assert_gone();
}

/// Ranks' lines as (rank, node); asserts each is in the image.
fn rank_nodes(stdout: &str, want: usize) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = stdout
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() == 7 && w[0] == "rank" && w[6] == "os=debian" && w[3] == want.to_string()).then(|| (w[1].parse().unwrap_or(usize::MAX), w[5].to_string()))
        })
        .collect();
    out.sort();
    out
}

#[test]
fn qsub_four_nodes_runs_openmpi_and_mpich_on_every_node() {
    let _moms = shared_moms();
    // Every rank and every ssh hop between sisters (Open MPI's tree spawn, and the
    // explicit hop below) must land in the job's containers.
    let script = "#!/bin/bash\n\
        mpirun -hostfile $PBS_NODEFILE /opt/berth-test/bin/hello-openmpi | sed 's/^/ompi /'\n\
        mpiexec.mpich -f $PBS_NODEFILE -n 8 /opt/berth-test/bin/hello-mpich | sed 's/^/mpich /'\n\
        nodes=($(sort -u $PBS_NODEFILE)); here=$(hostname)\n\
        others=(); for n in \"${nodes[@]}\"; do [ $n = $here ] || others+=($n); done\n\
        echo \"hop $(ssh ${others[0]} ssh ${others[1]} hostname) to ${others[1]}\"\n";
    let job = Job::submit("four", &format!("nodes=4:ppn=2,other=container={IMAGE}"), script);
    let (out, err) = job.finish();
    for mpi in ["ompi", "mpich"] {
        let lines: String = out.lines().filter_map(|l| l.strip_prefix(&format!("{mpi} "))).map(|l| format!("{l}\n")).collect();
        let ranks = rank_nodes(&lines, 8);
        assert_eq!(ranks.iter().map(|r| r.0).collect::<Vec<_>>(), (0..8).collect::<Vec<_>>(), "{mpi}: stdout: {out} stderr: {err}");
        let mut nodes: Vec<&str> = ranks.iter().map(|r| r.1.as_str()).collect();
        nodes.sort();
        nodes.dedup();
        assert_eq!(nodes.len(), 4, "{mpi} ranks on {nodes:?}: {out}");
    }
    let hop = out.lines().find_map(|l| l.strip_prefix("hop ")).unwrap_or_default();
    let words: Vec<&str> = hop.split_whitespace().collect();
    assert!(words.len() == 3 && words[0] == words[2], "sister to sister ssh: '{hop}' stdout: {out} stderr: {err}");
    assert_eq!(job.exit_status(), Some(0), "{err}");
    job.assert_gone();
}

#[test]
fn two_jobs_share_nodes_at_once() {
    let _moms = shared_moms();
    // Each job waits (bounded) for the other to be running, so both hold the same
    // four nodes together; their wirings (ports, keys, hostfiles) must not meet.
    let tag = format!("pbs-e2e-{}-together", std::process::id());
    let script = |me: &str, other: &str| {
        format!(
            "#!/bin/bash\ntouch ~/{tag}-{me}\nfor i in $(seq 300); do test -e ~/{tag}-{other} && break; sleep 0.2; done\n\
             test -e ~/{tag}-{other} && echo together\n{MPIRUN}"
        )
    };
    let a = Job::submit("share-a", &format!("nodes=4:ppn=2,other=container={IMAGE}"), &script("a", "b"));
    let b = Job::submit("share-b", &format!("nodes=4:ppn=2,other=container={IMAGE}"), &script("b", "a"));
    let results = [a.finish(), b.finish()];
    let _ = a.cluster.run(&format!("rm -f ~/{tag}-a ~/{tag}-b"));
    for (job, (out, err)) in [&a, &b].into_iter().zip(results) {
        assert!(out.starts_with("together\n"), "job {} never ran beside the other: {out} {err}", job.id);
        let ranks = rank_nodes(&out, 8);
        let mut nodes: Vec<&str> = ranks.iter().map(|r| r.1.as_str()).collect();
        nodes.sort();
        nodes.dedup();
        assert_eq!((ranks.len(), nodes.len()), (8, 4), "job {}: stdout: {out} stderr: {err}", job.id);
        assert_eq!(job.exit_status(), Some(0), "{err}");
    }
    a.assert_gone();
    b.assert_gone();
}

#[test]
fn qsub_container_options_reach_every_node() {
    let _moms = shared_moms();
    let cluster = torque();
    let data = format!("pbs-e2e-{}-data", std::process::id());
    stdout_ok(&cluster.run(&format!("rm -rf ~/{data} && mkdir ~/{data} && echo in-data > ~/{data}/f && echo marker > ~/{data}-home")));
    let home = stdout_ok(&cluster.run("echo $HOME")).trim().to_string();
    let options = format!(
        "nodes=2:ppn=1,other=container={IMAGE};container-mounts={home}/{data}:/data:ro;container-workdir=/data;no-container-mount-home;container-pull=always;container-readonly"
    );
    let check = format!(
        "cat /data/f; touch /data/x 2>/dev/null || echo ro; test -e {home}/{data}-home && echo home || echo no-home; \
         grep -Eq \"^[0-9]+ [0-9]+ [0-9:]+ [^ ]+ / ro[, ]\" /proc/self/mountinfo && echo root-ro || echo root-rw"
    );
    let script = format!(
        "#!/bin/bash\necho \"first $(pwd) $(({check}) | tr '\\n' ' ')\"\n\
         sister=$(sort -u $PBS_NODEFILE | grep -vx $(hostname))\n\
         echo \"sister $(ssh $sister '{check}' | tr '\\n' ' ')\"\n"
    );
    let job = Job::submit("options", &options, &script);
    let (out, err) = job.finish();
    let _ = cluster.run(&format!("rm -rf ~/{data} ~/{data}-home"));
    assert!(out.contains("first /data in-data ro no-home root-ro \n"), "stdout: {out} stderr: {err}");
    assert!(out.contains("sister in-data ro no-home root-ro \n"), "stdout: {out} stderr: {err}");
    assert_eq!(job.exit_status(), Some(0), "{err}");
    job.assert_gone();
}

#[test]
fn qsub_bad_option_fails_with_one_line() {
    let _moms = shared_moms();
    let job = Job::submit("badopt", &format!("nodes=2:ppn=1,other=container={IMAGE};container-mounts=data"), "#!/bin/bash\necho ran\n");
    let (out, err) = job.finish();
    assert!(!out.contains("ran"), "the script ran: {out}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with(&format!("berth-pbs prologue: job {} on ", job.id)), "{err}");
    assert!(lines[0].ends_with("container-mounts=data: expected SRC[:DST][:ro] with absolute paths"), "{err}");
    assert_eq!(job.exit_status(), Some(1));
    job.assert_gone();
}

/// `$prologalarm` on every mom for as long as it lives, then Torque's test value again.
struct PrologAlarm<'a> {
    cluster: &'a Cluster,
}

impl<'a> PrologAlarm<'a> {
    fn set(cluster: &'a Cluster, seconds: u32) -> PrologAlarm<'a> {
        let alarm = PrologAlarm { cluster };
        alarm.apply(seconds);
        alarm
    }

    /// Edits mom_priv/config and sends pbs_mom SIGHUP (its pid from mom.lock), which
    /// makes it read the file again.
    fn apply(&self, seconds: u32) {
        for node in self.cluster.nodes() {
            stdout_ok(&self.cluster.on_node(
                &node,
                &format!(
                    "sed -i 's/^\\$prologalarm .*/$prologalarm {seconds}/' /var/spool/torque/mom_priv/config && \
                     grep -qx '.prologalarm {seconds}' /var/spool/torque/mom_priv/config && \
                     kill -HUP $(cat /var/spool/torque/mom_priv/mom.lock)"
                ),
            ));
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

impl Drop for PrologAlarm<'_> {
    fn drop(&mut self) {
        self.apply(300);
    }
}

#[test]
fn slow_pull_fails_the_job_within_prologalarm_and_leaves_nothing() {
    let _moms = MOMS.write().unwrap_or_else(|poisoned| poisoned.into_inner());
    let cluster = torque();
    // A registry that takes connections and never answers (it ends itself in 90 s).
    let port = 6000 + std::process::id() % 1000;
    let pidfile = format!("pbs-e2e-{}-hang.pid", std::process::id());
    let hang = format!(
        "import socket, time\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', {port}))\ns.listen(16)\ns.settimeout(1)\nheld = []\nend = time.time() + 90\n\
         while time.time() < end:\n    try:\n        held.append(s.accept()[0])\n    except OSError:\n        pass\n"
    );
    stdout_ok(&cluster.run(&format!("nohup timeout 95 python3 -c {} >/dev/null 2>&1 & echo $! > {pidfile}", quote(&hang))));
    let alarm = PrologAlarm::set(&cluster, 8);
    let job = Job::submit("alarm", &format!("nodes=2:ppn=1,other=container=head:{port}/slow:1"), "#!/bin/bash\necho ran\n");
    let (out, err) = job.finish();
    drop(alarm);
    let _ = cluster.run(&format!("kill $(cat {pidfile}) 2>/dev/null; rm -f {pidfile}"));
    assert!(!out.contains("ran"), "the script ran: {out}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with(&format!("berth-pbs prologue: job {} on ", job.id)), "{err}");
    assert!(lines[0].contains("not done in the prologue's share of $prologalarm (8 s in mom_priv/config"), "{err}");
    assert_eq!(job.exit_status(), Some(1));
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
    let _moms = MOMS.write().unwrap_or_else(|poisoned| poisoned.into_inner());
    let script = "#!/bin/bash\necho uid=$(id -u); touch made-by-root\n";
    let resources = format!("nodes=1:ppn=1,other=container={IMAGE};container-remap-root");
    let job = Job::submit("remap-off", &resources, script);
    let (out, err) = job.finish();
    assert!(!out.contains("uid="), "the script ran: {out}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("does not allow running as root") && err.contains("remap_user"), "{err}");
    job.assert_gone();

    let cluster = torque();
    stdout_ok(&cluster.on_node(&cluster.nodes()[0], "echo 'remap_user = true' >> /etc/berth/berth.toml"));
    let _remap = RemapUser { cluster: &cluster };
    let job = Job::submit("remap-on", &resources, script);
    let (out, err) = job.finish();
    assert!(out.contains("uid=0"), "stdout: {out} stderr: {err}");
    assert_eq!(job.exit_status(), Some(0), "{err}");
    let owner = stdout_ok(&cluster.run(&format!("stat -c %U {}/made-by-root", job.dir)));
    assert_eq!(owner.trim(), cluster.users()[0], "a file made by remapped root must be the user's");
    job.assert_gone();
}

/// Shell lines (run in a job's dir, as its user) that build `preload.so`: a library
/// whose constructor appends the effective uid of every process loading it to
/// `uids` in that dir, and `evil.toml`, a berth config whose `berth_binary` is
/// `evil.sh`, which records its uid in `evil-ran` and then does what berth would.
const HOSTILE_ENV: &str = "printf '%s' '#include <stdio.h>\n#include <unistd.h>\n__attribute__((constructor)) static void f(void) { FILE *o = fopen(UIDS, \"a\"); if (o) { fprintf(o, \"%d\\n\", (int)geteuid()); fclose(o); } }\n' > preload.c \
     && gcc -shared -fPIC -DUIDS=\"\\\"$PWD/uids\\\"\" -o preload.so preload.c && touch uids && chmod 666 uids \
     && printf '#!/bin/sh\nid -u >> %s/evil-ran\nexec /usr/bin/env \"$@\"\n' \"$PWD\" > evil.sh && chmod 755 evil.sh \
     && printf 'berth_binary = \"%s/evil.sh\"\n' \"$PWD\" > evil.toml";

impl Job {
    /// What the hostile files of [`HOSTILE_ENV`] recorded: the uids that loaded the
    /// library, and whether the config's program ran at all.
    fn hostile_records(&self) -> (Vec<String>, String) {
        let out = self.cluster.run_as(&self.user, &format!("cd {} && cat uids; echo '#--evil--'; cat evil-ran 2>/dev/null; true", self.dir));
        let text = stdout_ok(&out);
        let (uids, evil) = text.split_once("#--evil--\n").unwrap_or((&text, ""));
        (uids.lines().map(String::from).collect(), evil.trim().to_string())
    }
}

/// `qsub -v` and `#PBS -v` reach the job starter, which runs as root: neither a berth
/// config of the user's nor a loader variable may act as root there, with a container
/// or without; the job's own processes still get both variables.
#[test]
fn qsub_v_berth_config_and_loader_variables_never_act_as_root() {
    let _moms = shared_moms();
    let vars = "BERTH_CONFIG=$PWD/evil.toml,LD_PRELOAD=$PWD/preload.so,GLIBC_TUNABLES=glibc.malloc.check=3";
    let script = "#!/bin/bash\necho \"preload=$LD_PRELOAD\"\ntest -d /opt/berth-test && echo in-image || echo on-host\nid -u\n";
    let cases = [
        ("hostile-qsub-v", format!("nodes=1:ppn=1,other=container={IMAGE}"), format!("-v \"{vars}\""), script.to_string()),
        ("hostile-native", "nodes=1:ppn=1".to_string(), format!("-v \"{vars}\""), script.to_string()),
        (
            "hostile-pbs-v",
            format!("nodes=1:ppn=1,other=container={IMAGE}"),
            String::new(),
            // #PBS lines cannot expand $PWD: the job's dir is fixed per test, below home.
            script.replacen("#!/bin/bash\n", &format!("#!/bin/bash\n#PBS -v {}\n", vars.replace("$PWD", &format!("/home/alice/pbs-e2e-{}-hostile-pbs-v", std::process::id()))), 1),
        ),
    ];
    let jobs: Vec<(Job, &str)> = cases
        .iter()
        .map(|(test, resources, args, script)| (Job::submit_as("alice", test, resources, HOSTILE_ENV, args, script), if test.contains("native") { "on-host" } else { "in-image" }))
        .collect();
    for (job, place) in &jobs {
        let (out, err) = job.finish();
        let (uids, evil) = job.hostile_records();
        assert!(evil.is_empty(), "job {}: the user's berth_binary ran, as uid {evil}; stderr: {err}", job.id);
        assert!(!uids.iter().any(|u| u == "0"), "job {}: LD_PRELOAD loaded into a root process (uids {uids:?}); stderr: {err}", job.id);
        assert!(out.contains(&format!("preload=/home/alice/{}/preload.so", job.dir)) && out.contains(place), "job {}: {out} stderr: {err}", job.id);
        assert!(!uids.is_empty(), "job {}: the job's own processes did not get LD_PRELOAD: {out}", job.id);
        assert_eq!(job.exit_status(), Some(0), "{err}");
        job.assert_gone();
    }
}

/// The job starter must know the job and its user from pbs_mom, not from variables the
/// user passes: `PBS_JOBID` naming another user's running job (with its container on
/// the same node) and `USER=root` must neither enter that container nor run as root.
#[test]
fn forged_pbs_jobid_and_user_enter_no_other_job_and_run_as_no_one_else() {
    let _moms = shared_moms();
    let cluster = torque();
    let node = cluster.nodes()[0].clone();
    let bobs = Job::submit_as("bob", "victim", &format!("nodes={node}:ppn=1,other=container={IMAGE}"), "", "", "#!/bin/bash\nsleep 60\n");
    bobs.wait_for("R", Duration::from_secs(240));
    let script = "#!/bin/bash\nid -un\ntest -d /opt/berth-test && echo in-image || echo on-host\n";
    let args = format!("-v PBS_JOBID={},USER=bob,LOGNAME=bob,PBS_O_LOGNAME=bob", bobs.id);
    let forged = Job::submit_as("alice", "forged-id", &format!("nodes={node}:ppn=1"), "", &args, script);
    let (out, err) = forged.finish();
    assert_eq!(out, "alice\non-host\n", "stderr: {err}");
    let args = "-v USER=root,LOGNAME=root";
    let root = Job::submit_as("alice", "forged-root", &format!("nodes={node}:ppn=1"), "", args, script);
    let (out, err) = root.finish();
    assert_eq!(out, "alice\non-host\n", "stderr: {err}");
    drop(bobs);
}

#[test]
fn pbs_l_container_in_the_script_runs_every_rank_in_the_image_on_two_nodes() {
    let _moms = shared_moms();
    // The line users write; berth's submit filter on the submit host turns it into
    // `-l other=container=IMAGE` (Torque has no `container` resource).
    let script = format!("#!/bin/bash\n#PBS -l container={IMAGE}\n#PBS -l nodes=2:ppn=2\nmpirun -hostfile $PBS_NODEFILE /opt/berth-test/bin/hello-openmpi\n");
    let job = Job::submit_with("filter-alone", "", &script);
    let (out, err) = job.finish();
    let nodes = rank_nodes(&out, 4);
    assert_eq!(nodes.len(), 4, "stdout: {out} stderr: {err}");
    assert_eq!(nodes.iter().map(|(_, n)| n.as_str()).collect::<std::collections::BTreeSet<_>>().len(), 2, "stdout: {out} stderr: {err}");
    assert!(ranks(&out).iter().all(|r| r.ends_with("os=debian")), "stdout: {out} stderr: {err}");
    assert_eq!(job.exit_status(), Some(0), "{err}");
    job.assert_gone();
}

#[test]
fn pbs_l_container_among_other_resources_and_berth_items_reaches_every_node() {
    let _moms = shared_moms();
    // One combined -l list, more berth items written the same way, and the user's own
    // `other=` (the site's business) merged in.
    let script = format!(
        "#!/bin/bash\n#PBS -N filtered -l nodes=2:ppn=1,container={IMAGE},walltime=00:05:00\n\
         #PBS -l container-workdir=/opt/berth-test,container-readonly\n#PBS -l other=site-note\n\
         cat > $PBS_O_WORKDIR/check.sh <<'EOF'\n\
         echo \"at $(hostname) in $(pwd) $(awk '$5==\"/\" {{f=substr($6,1,2)}} END {{print f}}' /proc/self/mountinfo) $(. /etc/os-release; echo os=$ID)\"\n\
         EOF\n\
         mpirun -hostfile $PBS_NODEFILE sh $PBS_O_WORKDIR/check.sh\n"
    );
    let job = Job::submit_with("filter-combined", "", &script);
    let (out, err) = job.finish();
    // Open MPI may start more ranks than the nodefile's slots: one distinct line per node.
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("at ")).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    assert_eq!(lines.len(), 2, "stdout: {out} stderr: {err}");
    assert_ne!(lines[0].split_whitespace().nth(1), lines[1].split_whitespace().nth(1), "both nodes: {lines:?}");
    for line in &lines {
        assert!(line.ends_with("in /opt/berth-test ro os=debian"), "{line} (stderr: {err})");
    }
    let list = stdout_ok(&job.cluster.run(&format!("{QSTAT} -f {} | tr -d '\\n\\t ' | grep -o 'Resource_List.other=[^R]*'", job.id)));
    assert!(list.contains("site-note") && list.contains(&format!("container={IMAGE}")), "{list}");
    assert_eq!(job.exit_status(), Some(0), "{err}");
    job.assert_gone();
}

#[test]
fn qsub_l_container_on_the_command_line_is_refused_with_the_form_to_write() {
    let _moms = shared_moms();
    // qsub gives a submit filter no way to change its own arguments, and its server
    // knows no `container` resource: the filter refuses with the forms that work.
    let (cluster, dir, out) = Job::qsub("alice", "filter-cmdline", "", "", &format!("-l nodes=2:ppn=1,container={IMAGE}"), MPIRUN);
    let _ = cluster.run(&format!("rm -rf {dir}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "qsub accepted it: {}", String::from_utf8_lossy(&out.stdout));
    let line = err.lines().find(|l| l.starts_with("berth: ")).unwrap_or_default();
    assert!(line.contains(&format!("`#PBS -l container={IMAGE}`")) && line.contains(&format!("-l other=container={IMAGE}")), "{err}");
}

/// `qsub -D DIR` (or `PBS_O_ROOTDIR=DIR` among the job's variables) makes pbs_mom
/// chroot into DIR before it execs the job starter, which runs as root: a program of
/// the user's at the starter's path inside DIR would run as root. berth's submit
/// filter refuses such a job at qsub with one line. (A job that reaches pbs_server
/// past the filter is not stopped yet: docs/security.md, open issues.)
#[test]
fn qsub_with_a_job_root_dir_is_refused_at_submission_with_one_line() {
    let _moms = shared_moms();
    let script = "#!/bin/bash\necho ran\n";
    for (test, args, script) in [
        ("rootdir-d", "-D $PWD/root", script.to_string()),
        ("rootdir-v", "-v PBS_O_ROOTDIR=$PWD/root", script.to_string()),
        ("rootdir-pbs-d", "", script.replacen("\n", "\n#PBS -D /home/alice\n", 1)),
    ] {
        let (cluster, dir, out) = Job::qsub("alice", test, "nodes=1:ppn=1", "true", args, &script);
        let _ = cluster.run_as("alice", &format!("rm -rf {dir}"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{test}: qsub took the job: {}", String::from_utf8_lossy(&out.stdout));
        // berth's one line, then qsub's own `submit filter returned an error code`.
        let ours: Vec<&str> = err.lines().filter(|l| l.starts_with("berth: ")).collect();
        assert!(ours.len() == 1 && ours[0].contains("root directory is refused"), "{test}: {err}");
    }
}

/// Every file of a pulled image is root's in root-only dirs of the store, so "a
/// root-owned file nobody else writes" is no test of an admin's config: an image of
/// the user's holding a `berth.toml`, named with `qsub -v BERTH_CONFIG=` once the
/// prologue has pulled it, must not become the root job starter's config.
#[test]
fn a_berth_config_inside_a_pulled_image_never_configures_the_root_job_starter() {
    let _moms = shared_moms();
    let cluster = torque();
    let test = "image-config";
    let dir = format!("/home/alice/pbs-e2e-{}-{test}", std::process::id());
    let toml = format!("berth_binary = \"{dir}/evil.sh\"\n");
    let layer = tar_of(&[Entry::File("berth.toml", toml.as_bytes(), 0o644)]);
    let image = berth_e2e::image(&[busybox_layer(test), layer], &["/bin/sh"]);
    let repo = format!("pbs-{test}-{}", std::process::id());
    push_image(&image, &format!("{repo}:1"));
    let store = "/var/lib/berth";
    let config = format!("{store}/layers/sha256/{}/berth.toml", image.layers[1].diff_id.trim_start_matches("sha256:"));
    let job = Job::submit_as(
        "alice",
        test,
        &format!("nodes=1:ppn=1,other=container={}/{repo}:1", cluster.registry()),
        HOSTILE_ENV,
        &format!("-v BERTH_CONFIG={config}"),
        "#!/bin/sh\necho ran\n",
    );
    let (out, err) = job.finish();
    let (_, evil) = job.hostile_records();
    assert!(evil.is_empty(), "job {}: the berth_binary of the image's berth.toml ran, as uid {evil}; stdout: {out} stderr: {err}", job.id);
    job.assert_gone();
}

/// Shell lines (run in a job's dir, as its user) that make `root/`, a job root
/// directory holding the home dir pbs_mom changes to after its chroot, with a static
/// program at the job starter's path that creates `root/ran-as` (owned by whoever it
/// ran as); and `submit`, qsub without its filter: the job's attributes straight to
/// pbs_server through libtorque, as any user may.
const FAKE_ROOT: &str = "mkdir -p root/var/spool/torque/mom_priv root/tmp root$HOME && chmod 777 root \
    && printf '%s' '#include <stdio.h>\nint main(void) { FILE *o = fopen(\"/ran-as\", \"a\"); if (o) fclose(o); return 0; }\n' > fake.c \
    && gcc -static -o root/var/spool/torque/mom_priv/job_starter fake.c \
    && printf '%s' '#include <stdio.h>\n#include <pbs_ifl.h>\nint main(int argc, char **argv) {\n  if (argc != 5) return 2;\n  struct attropl res = { NULL, \"Resource_List\", \"nodes\", argv[4], SET };\n  struct attropl other = { &res, \"Resource_List\", \"other\", argv[3], SET };\n  struct attropl vars = { argv[3][0] ? &other : &res, \"Variable_List\", NULL, argv[2], SET };\n  int c = pbs_connect(NULL);\n  char *id = c < 0 ? NULL : pbs_submit(c, &vars, argv[1], NULL, NULL);\n  if (!id) { fprintf(stderr, \"submit failed\\n\"); return 1; }\n  puts(id);\n  return 0;\n}\n' > submit.c \
    && gcc -I/opt/torque/include -o submit submit.c -L/opt/torque/lib -Wl,-rpath,/opt/torque/lib -ltorque";

/// A job with a root directory that reaches pbs_server past the submit filter: pbs_mom
/// chroots into it and execs whatever the user put at the job starter's path, which
/// must never run as root (it did with `$job_starter_run_privileged`: 'ran-as made by
/// uid 0'), with a container or without.
#[test]
fn a_job_root_dir_past_the_filter_never_runs_the_users_program_as_root() {
    let _moms = shared_moms();
    let cluster = torque();
    let mut jobs = Vec::new();
    for (test, other) in [("rootdir-native", String::new()), ("rootdir-image", format!("container={IMAGE}"))] {
        let dir = format!("pbs-e2e-{}-{test}", std::process::id());
        let line = format!(
            "rm -rf {dir} && mkdir {dir} && cd {dir} && {FAKE_ROOT} && printf '#!/bin/bash\\necho ran\\n' > job.sh \
             && ./submit job.sh \"PBS_O_HOME=$HOME,PBS_O_WORKDIR=$PWD,PBS_O_ROOTDIR=$PWD/root\" {} 1:ppn=1",
            quote(&other)
        );
        let id = stdout_ok(&cluster.run_as("alice", &line)).trim().to_string();
        assert!(id.ends_with(".head"), "submit printed {id}");
        jobs.push(Job { cluster: torque(), dir, id, user: "alice".into() });
    }
    for job in &jobs {
        job.wait_for("C", Duration::from_secs(240));
        let owner = stdout_ok(&job.cluster.run_as("alice", &format!("stat -c %u {}/root/ran-as 2>/dev/null; true", job.dir)));
        assert_ne!(owner.trim(), "0", "job {}: the user's program at the job starter's path ran as root", job.id);
        job.assert_gone();
    }
}

/// Finding 2 of the launcher's review, under Torque (the unprivileged job starter hands
/// the shell to the same setuid `berth-pbs-enter`): a script path on its stdin was
/// opened with the caller's fsuid but root's other capabilities, so alice read a file
/// through bob's process's `/proc/PID/cwd` and the kernel's addresses in
/// `/proc/kallsyms`. Opened by a child that became the caller, regular files only.
#[test]
fn the_launcher_opens_the_script_on_stdin_as_the_caller_with_no_capability() {
    let _moms = shared_moms();
    let cluster = torque();
    let node = cluster.nodes()[0].clone();
    let job = Job::submit("script-caps", &format!("nodes={node}:ppn=1,other=container={IMAGE}"), "#!/bin/bash\nexec -a berth-e2e-$PBS_JOBID sleep 600\n");
    job.wait_for("R", Duration::from_secs(240));
    let start = Instant::now();
    let alices = loop {
        let pid = stdout_ok(&cluster.on_node(&node, &format!("pgrep -f '^berth-e2e-{} '; true", job.id))).trim().to_string();
        if !pid.is_empty() {
            break pid;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "job {}'s script never started on {node}", job.id);
        std::thread::sleep(Duration::from_millis(300));
    };
    let bob = BobsPrivateDir::new(&cluster, &node, "script-caps");
    let bobs = bob.pid.clone();
    let enter = format!("{}/bin/berth-pbs-enter", state_dir().display());
    let denied = "Permission denied (os error 13)";
    let cases = [
        (format!("/proc/{bobs}/cwd/secret.txt"), denied.to_string()),
        ("/proc/kallsyms".to_string(), "not a regular file (a file of the kernel's proc file system)".to_string()),
        (format!("/proc/{bobs}/ns/mnt"), denied.to_string()),
        (format!("/proc/{alices}/ns/mnt"), "not a regular file (a file of the kernel's nsfs file system)".to_string()),
    ];
    let seen = launcher_script_refusals(&cluster, &node, &enter, &job.id, &cases);
    drop(bob);
    assert!(!seen.iter().any(|l| l.starts_with("  ^")), "{}", seen.join("\n"));
    drop(job);
}

/// Torque's `qsub -w DIR` sets `PBS_O_WORKDIR`, which the prologue gave berth only when
/// root found a directory there: alice held a job, swapped a dir of hers in the path
/// for a link into bob's 0700 dir and released it; her job failed when bob had that
/// subdir and ran when he had not. The submit dir is now looked up as the job's user:
/// both jobs end alike.
#[test]
fn a_submit_dir_below_another_users_private_dir_tells_nothing_of_what_is_there() {
    let _moms = shared_moms();
    let cluster = torque();
    let node = cluster.nodes()[0].clone();
    let private = format!("/home/bob/pbs-e2e-{}-private", std::process::id());
    stdout_ok(&cluster.on_node(&node, &format!("rm -rf {private} && install -d -o bob -g bob -m 0700 {private} && install -d -o bob -g bob -m 0755 {private}/exists")));
    let dir = format!("pbs-e2e-{}-submit-dir", std::process::id());
    let line = format!(
        "rm -rf {dir} && mkdir {dir} && cd {dir} && printf '#!/bin/bash\\necho ran\\n' > job.sh && for w in exists missing; do \
         mkdir -p $w/d/$w && {QSUB} -h -w $PWD/$w/d/$w -l nodes={node}:ppn=1,other=container={IMAGE} -o $PWD/out-$w -e $PWD/err-$w job.sh \
         && rm -rf $w/d && ln -s {private} $w/d || exit 1; done; /opt/torque/bin/qrls $(/opt/torque/bin/qselect -u alice -s H)"
    );
    let ids = stdout_ok(&cluster.run_as("alice", &line));
    let ids: Vec<&str> = ids.lines().collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    let jobs: Vec<Job> = ids.iter().map(|id| Job { cluster: torque(), dir: dir.clone(), id: id.to_string(), user: "alice".into() }).collect();
    let mut ends = Vec::new();
    for (job, w) in jobs.iter().zip(["exists", "missing"]) {
        let id = &job.id;
        job.wait_for("C", Duration::from_secs(240));
        let start = Instant::now();
        let files = loop {
            let out = cluster.run_as("alice", &format!("cd {dir} && test -e out-{w} && test -e err-{w} && cat out-{w} && echo '#--err--' && cat err-{w}"));
            if out.status.success() {
                break String::from_utf8_lossy(&out.stdout).replace(w, "W").replace(id, "JOB");
            }
            assert!(start.elapsed() < Duration::from_secs(60), "job {id}'s output files never arrived");
            std::thread::sleep(Duration::from_millis(500));
        };
        job.assert_gone();
        ends.push(files);
    }
    let _ = cluster.on_node(&node, &format!("rm -rf {private}"));
    assert_eq!(ends[0], ends[1], "bob's dir has an 'exists' and no 'missing', and alice's jobs tell them apart");
}

/// A job that leaves the container's mount namespace, its session and both
/// ([`ESCAPING_JOB`]); Torque tracks a job by its session, so the last of these
/// outlived the job where berth made no cgroup of its own: on nodes whose cgroup v2
/// carries controllers (the systemd default).
fn a_job_that_escapes_leaves_nothing() {
    let job = Job::submit("escape", &format!("nodes=1:ppn=1,other=container={IMAGE}"), &format!("#!/bin/bash\n{ESCAPING_JOB}"));
    let _sweep = SweepMarked(job.id.clone());
    let (out, err) = job.finish();
    assert_eq!(job.exit_status(), Some(0), "stdout: {out} stderr: {err}");
    assert_escaping_job_left_nothing(&job.cluster, &job.id, &out, &err);
}

#[test]
fn processes_that_leave_the_containers_namespaces_or_its_session_do_not_outlive_the_job_with_or_without_cgroup_v2_controllers() {
    // Alone: the controller it enables is machine-wide.
    let _moms = MOMS.write().unwrap_or_else(|poisoned| poisoned.into_inner());
    with_and_without_cgroup_v2_controllers(a_job_that_escapes_leaves_nothing);
}
