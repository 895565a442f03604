//! Slurm users running images: `srun`/`sbatch`/`salloc` with berth's SPANK plugin on the
//! slurm-test-env cluster (real slurmctld and slurmd). Every test names what a user
//! does, and every test checks that the job left nothing behind on the nodes.

use berth_e2e::{assert_nodes_clean, cluster, job_of, stdout_ok, Cluster};
use std::process::Output;
use std::time::{Duration, Instant};

/// The test image `minimal` (busybox, "berth minimal" in /etc/os-release) in the registry.
fn minimal(cluster: &Cluster) -> String {
    format!("{}/minimal:latest", cluster.registry())
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn srun_container_runs_the_image_os_on_every_node() {
    let cluster = cluster();
    let n = cluster.nodes().len();
    let out = cluster.run(&format!(
        "srun -N{n} --container={} sh -c 'echo JOB=$SLURM_JOB_ID; grep ^NAME= /etc/os-release'",
        minimal(&cluster)
    ));
    let stdout = stdout_ok(&out);
    assert_eq!(stdout.matches("NAME=\"berth minimal\"").count(), n, "{stdout}");
    assert_nodes_clean(&cluster, &job_of(&stdout));
}

#[test]
fn srun_container_image_option_means_the_same_as_container() {
    let cluster = cluster();
    let out = cluster.run(&format!(
        "srun -N2 --container-image={} sh -c 'echo JOB=$SLURM_JOB_ID; grep ^NAME= /etc/os-release'",
        minimal(&cluster)
    ));
    let stdout = stdout_ok(&out);
    assert_eq!(stdout.matches("NAME=\"berth minimal\"").count(), 2, "{stdout}");
    assert_nodes_clean(&cluster, &job_of(&stdout));
}

#[test]
fn a_bare_command_name_is_found_on_the_images_path_with_rank_variables_kept() {
    let cluster = cluster();
    // busybox's `ascii` applet exists in the image only.
    assert!(!cluster.on_node(&cluster.nodes()[0], "command -v ascii").status.success(), "the host must not have `ascii`");
    let out = cluster.run(&format!("srun -N2 -l --container={} ascii", minimal(&cluster)));
    let stdout = stdout_ok(&out);
    assert!(stdout.lines().any(|l| l.starts_with("0: ")) && stdout.lines().any(|l| l.starts_with("1: ")), "{stdout}");
    let out = cluster.run(&format!(
        "srun -N2 -n2 --container={} sh -c 'echo JOB=$SLURM_JOB_ID; echo rank=$SLURM_PROCID path=$PATH'",
        minimal(&cluster)
    ));
    let stdout = stdout_ok(&out);
    for rank in 0..2 {
        assert!(stdout.contains(&format!("rank={rank} path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")), "{stdout}");
    }
    assert_nodes_clean(&cluster, &job_of(&stdout));
}

#[test]
fn sbatch_container_runs_the_batch_script_inside_the_image() {
    let cluster = cluster();
    let out = cluster.run(&format!(
        "rm -f srun-e2e-batch.out && printf '#!/bin/sh\\necho JOB=$SLURM_JOB_ID\\ngrep ^NAME= /etc/os-release\\n' > srun-e2e-batch.sh && \
         sbatch --wait -N1 -o srun-e2e-batch.out --container={} srun-e2e-batch.sh >/dev/null && cat srun-e2e-batch.out",
        minimal(&cluster)
    ));
    let stdout = stdout_ok(&out);
    assert!(stdout.contains("NAME=\"berth minimal\""), "{stdout}");
    assert_nodes_clean(&cluster, &job_of(&stdout));
}

#[test]
fn a_batch_script_inside_the_image_calls_srun_and_scontrol() {
    let cluster = cluster();
    let out = cluster.run(&format!(
        "rm -f srun-e2e-inner.out && printf '#!/bin/sh\necho JOB=$SLURM_JOB_ID\nsrun -N2 -l grep ^NAME= /etc/os-release\necho inner=$?\n\
         scontrol show job $SLURM_JOB_ID | grep -o JobState=RUNNING\n' > srun-e2e-inner.sh && \
         sbatch --wait -N2 -o srun-e2e-inner.out --container={} srun-e2e-inner.sh >/dev/null && cat srun-e2e-inner.out",
        minimal(&cluster)
    ));
    let stdout = stdout_ok(&out);
    for rank in 0..2 {
        assert!(stdout.contains(&format!("{rank}: NAME=\"berth minimal\"")), "{stdout}");
    }
    assert!(stdout.contains("inner=0") && stdout.contains("JobState=RUNNING"), "{stdout}");
    assert_nodes_clean(&cluster, &job_of(&stdout));
}

#[test]
fn options_given_to_the_allocation_reach_every_srun_unless_it_says_otherwise() {
    let cluster = cluster();
    let out = cluster.run(&format!(
        "salloc -N1 --container-image={} sh -c 'srun sh -c \"echo JOB=\\$SLURM_JOB_ID; grep ^NAME= /etc/os-release\"; \
         srun --container-image={}/not-there:1 true; echo second=$?'",
        minimal(&cluster),
        cluster.registry()
    ));
    let (stdout, stderr) = text(&out);
    assert!(stdout.contains("NAME=\"berth minimal\""), "the allocation's image applies: {stdout} {stderr}");
    assert!(stdout.contains("second=1"), "srun's own --container-image wins: {stdout} {stderr}");
    assert!(stderr.contains("not-there:1"), "{stderr}");
    assert_nodes_clean(&cluster, &job_of(&stdout));
}

#[test]
fn steps_of_one_job_share_the_node_container() {
    let cluster = cluster();
    let out = cluster.run(&format!(
        "salloc -N1 --container-image={} sh -c 'srun sh -c \"echo JOB=\\$SLURM_JOB_ID; echo kept > /tmp/step-one\"; srun cat /tmp/step-one'",
        minimal(&cluster)
    ));
    let stdout = stdout_ok(&out);
    assert!(stdout.lines().any(|l| l == "kept"), "{stdout}");
    assert_nodes_clean(&cluster, &job_of(&stdout));
}

#[test]
fn tasks_of_a_step_on_one_node_share_one_container() {
    let cluster = cluster();
    let out = cluster.run(&format!(
        "srun -N1 -n4 --container={} sh -c 'echo JOB=$SLURM_JOB_ID; echo ns=$(readlink /proc/self/ns/mnt)'",
        minimal(&cluster)
    ));
    let stdout = stdout_ok(&out);
    let mut namespaces: Vec<&str> = stdout.lines().filter(|l| l.starts_with("ns=")).collect();
    assert_eq!(namespaces.len(), 4, "{stdout}");
    namespaces.dedup();
    assert_eq!(namespaces.len(), 1, "one mount namespace for the node's tasks: {stdout}");
    assert_nodes_clean(&cluster, &job_of(&stdout));
}

#[test]
fn a_bad_image_fails_the_step_with_one_clear_line() {
    let cluster = cluster();
    let image = format!("{}/no-such-image:1", cluster.registry());
    let out = cluster.run(&format!("salloc -N2 sh -c 'echo JOB=$SLURM_JOB_ID; srun -N2 --container={image} true; echo rc=$?'"));
    let (stdout, stderr) = text(&out);
    assert!(stdout.contains("rc=1"), "the step fails: {stdout}");
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("error: berth:")).collect();
    assert_eq!(ours.len(), 2, "one line per node: {stderr}");
    assert!(ours.iter().all(|l| l.contains(&format!("cannot start image {image}: "))), "{stderr}");
    assert_nodes_clean(&cluster, &job_of(&stdout));
}

#[test]
fn container_mounts_bind_user_paths_read_only_when_asked() {
    let cluster = cluster();
    let out = cluster.run(&format!(
        "mkdir -p srun-e2e-data && echo payload > srun-e2e-data/file && \
         srun -N1 --container={} --container-mounts=$HOME/srun-e2e-data:/data:ro \
         sh -c 'echo JOB=$SLURM_JOB_ID; cat /data/file; touch /data/new 2>/dev/null && echo writable || echo read-only'",
        minimal(&cluster)
    ));
    let stdout = stdout_ok(&out);
    assert!(stdout.contains("payload") && stdout.contains("read-only"), "{stdout}");
    assert_nodes_clean(&cluster, &job_of(&stdout));
}

#[test]
fn container_workdir_sets_where_tasks_start() {
    let cluster = cluster();
    let out = cluster.run(&format!("srun -N1 --container={} --container-workdir=/etc sh -c 'echo JOB=$SLURM_JOB_ID; pwd'", minimal(&cluster)));
    let stdout = stdout_ok(&out);
    assert!(stdout.lines().any(|l| l == "/etc"), "{stdout}");
    let out = cluster.run(&format!("srun -N1 --container={} --container-workdir=/no/such/dir true", minimal(&cluster)));
    assert!(!out.status.success());
    assert!(text(&out).1.contains("--container-workdir=/no/such/dir does not exist in the image"), "{:?}", text(&out));
    assert_nodes_clean(&cluster, &job_of(&stdout));
}

#[test]
fn a_working_directory_below_another_users_private_dir_is_refused_not_entered_as_root() {
    let cluster = cluster();
    let node = cluster.nodes()[0].clone();
    let private = berth_e2e::BobsPrivateDir::new(&cluster, &node, "workdir");
    let workdir = format!("/h{}/proj", private.dir.trim_start_matches("/home"));
    let srun = |workdir: &str| cluster.run(&format!("srun -N1 -w {node} --container={} --container-mounts=/home:/h --container-workdir={workdir} sh -c 'pwd; cat secret.txt'", minimal(&cluster)));
    let out = srun(&workdir);
    // Nor does root look a path up for alice: one that is not there fails the same way.
    let missing = srun(&format!("{workdir}-missing"));
    drop(private);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success() && !stdout.contains("bob's secret") && !stdout.contains("/proj"), "a task got into bob's dir: {stdout} {stderr}");
    assert!(stderr.contains(&format!("cannot enter the working directory {workdir}")) && stderr.contains("Permission denied"), "{stderr}");
    let (_, stderr) = text(&missing);
    assert!(!missing.status.success() && stderr.contains("Permission denied") && !stderr.contains("does not exist"), "{stderr}");
}

#[test]
fn home_is_mounted_unless_the_user_opts_out() {
    let cluster = cluster();
    let image = minimal(&cluster);
    let out = cluster.run(&format!(
        "cd /tmp && touch $HOME/srun-e2e-home && srun -N1 --container={image} sh -c 'echo JOB=$SLURM_JOB_ID; ls $HOME/srun-e2e-home'"
    ));
    let stdout = stdout_ok(&out);
    assert!(stdout.contains("srun-e2e-home"), "{stdout}");
    assert_nodes_clean(&cluster, &job_of(&stdout));
    let out = cluster.run(&format!(
        "cd /tmp && srun -N1 --container={image} --no-container-mount-home sh -c 'echo JOB=$SLURM_JOB_ID; ls $HOME/srun-e2e-home 2>/dev/null || echo no-home'"
    ));
    let stdout = stdout_ok(&out);
    assert!(stdout.contains("no-home"), "{stdout}");
    assert_nodes_clean(&cluster, &job_of(&stdout));
}

#[test]
fn container_per_rank_gives_each_task_its_own_root() {
    let cluster = cluster();
    let out = cluster.run(&format!(
        "srun -N1 -n2 --container={} --container-per-rank sh -c 'echo JOB=$SLURM_JOB_ID; touch /tmp/rank-$SLURM_PROCID; sleep 1; echo seen $(ls /tmp | grep -c rank-)'",
        minimal(&cluster)
    ));
    let stdout = stdout_ok(&out);
    assert_eq!(stdout.matches("seen 1").count(), 2, "each rank sees only its own file: {stdout}");
    assert_nodes_clean(&cluster, &job_of(&stdout));
}

#[test]
fn container_readonly_forbids_writes_to_the_image_root() {
    let cluster = cluster();
    let out = cluster.run(&format!(
        "srun -N1 --container={} --container-readonly sh -c 'echo JOB=$SLURM_JOB_ID; touch /var/x 2>/dev/null && echo writable || echo read-only'",
        minimal(&cluster)
    ));
    let stdout = stdout_ok(&out);
    assert!(stdout.contains("read-only"), "{stdout}");
    assert_nodes_clean(&cluster, &job_of(&stdout));
}

/// A shell line that runs the node's own `berth` (the one plugstack.conf names) as `$B`.
const NODE_BERTH: &str = "B=$(sed -n 's/^berth_binary = \"\\(.*\\)\"$/\\1/p' /etc/berth/berth.toml);";

/// Waits until `check` succeeds on `node`, or panics with `what` after `secs`.
fn wait_on_node(cluster: &Cluster, node: &str, check: &str, secs: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cluster.on_node(node, check).status.success() {
        assert!(Instant::now() < deadline, "{what} on {node}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// No berth process of `job` on `node` (a `container create` still pulling, say), and a
/// store that `berth gc` finds consistent: nothing left in its `tmp/`.
fn assert_no_berth_work_left(cluster: &Cluster, node: &str, job: &str) {
    wait_on_node(cluster, node, &format!("! pgrep -f -- '--jo[b] {job} '"), 20, &format!("a berth process of job {job} is still running"));
    let out = cluster.on_node(node, &format!("{NODE_BERTH} \"$B\" gc >/dev/null && test -z \"$(ls -A /var/lib/berth/tmp)\""));
    assert!(out.status.success(), "the store on {node} is not clean after job {job}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn scancel_and_a_killed_slurmstepd_leave_nothing_behind() {
    let cluster = cluster();
    let node = cluster.nodes()[0].clone();
    let image = minimal(&cluster);
    let job = stdout_ok(&cluster.run(&format!("sbatch --parsable -N1 -w {node} -o /dev/null --container={image} --wrap 'sleep 300'")))
        .trim()
        .to_string();
    wait_on_node(&cluster, &node, &format!("test -e /run/berth/{job}/node/mnt"), 30, &format!("job {job} never got its container"));
    // Also a step of its own, whose slurmstepd dies the same way.
    let step = cluster.run(&format!("srun --jobid={job} --overlap -w {node} --container={image} sleep 300 >/dev/null 2>&1 & sleep 0.1; echo started"));
    stdout_ok(&step);
    wait_on_node(&cluster, &node, &format!("pgrep -f 'slurmstepd: \\[{job}\\.0\\]'"), 30, &format!("step {job}.0 never started"));
    cluster.on_node(&node, &format!("pkill -KILL -f 'slurmstepd: \\[{job}\\.0\\]'"));
    cluster.on_node(&node, &format!("pkill -KILL -f 'slurmstepd: \\[{job}\\.batch\\]'"));
    stdout_ok(&cluster.run(&format!("scancel {job}")));
    assert_nodes_clean(&cluster, &job);
    assert_no_berth_work_left(&cluster, &node, &job);
    // The image is still whole in the store: the next job starts from it.
    let out = stdout_ok(&cluster.run(&format!("srun -N1 -w {node} --container={image} --container-pull=never sh -c 'echo JOB=$SLURM_JOB_ID; grep ^NAME= /etc/os-release'")));
    assert!(out.contains("NAME=\"berth minimal\""), "{out}");
    assert_nodes_clean(&cluster, &job_of(&out));
}

/// The registry host's link, rate-limited with `tc` in its network namespace while
/// this lives, so that a pull is slow for real.
struct SlowRegistryLink {
    netns: String,
}

impl SlowRegistryLink {
    fn new(rate: &str) -> SlowRegistryLink {
        let cluster_id = std::env::var("BERTH_TEST_CLUSTER").unwrap_or_else(|_| "0".into());
        let netns = format!("berth{cluster_id}-head");
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &netns, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "32kb", "latency", "2s"])
            .output()
            .expect("run ip netns exec tc");
        assert!(out.status.success(), "cannot rate-limit {netns}: {}", String::from_utf8_lossy(&out.stderr));
        SlowRegistryLink { netns }
    }
}

impl Drop for SlowRegistryLink {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "exec", &self.netns, "tc", "qdisc", "del", "dev", "eth0", "root"]).output();
    }
}

/// A fresh image nobody has pulled: `minimal` plus a layer of `mb` MB of random bytes
/// (gzip cannot shrink it), pushed under a unique name. Returns the reference and the
/// big file's sha256.
fn push_fresh_big_image(cluster: &Cluster, mb: usize) -> (String, String) {
    let dir = std::env::temp_dir().join(format!("berth-e2e-big-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("rootfs")).unwrap();
    let layout = dir.join("layout");
    let script = format!(
        "set -e; cp -a {minimal} {layout}; head -c {mb}M /dev/urandom > {dir}/rootfs/big; \
         tar --owner=0 --group=0 -C {dir}/rootfs -cf {dir}/big.tar big; \
         umoci tag --image {layout}:latest big; umoci raw add-layer --image {layout}:big {dir}/big.tar; \
         sha256sum {dir}/rootfs/big | cut -d' ' -f1",
        minimal = berth_e2e::image_layout("minimal").display(),
        layout = layout.display(),
        dir = dir.display(),
    );
    let out = std::process::Command::new("bash").args(["-c", &script]).output().unwrap();
    let sha = stdout_ok(&out).trim().to_string();
    let name = format!("big-{}-{}:1", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs());
    let push = std::process::Command::new(berth_e2e::repo_root().join("slurm-test-env/push")).arg(format!("{}:big", layout.display())).arg(&name).output().unwrap();
    stdout_ok(&push);
    std::fs::remove_dir_all(&dir).unwrap();
    (format!("{}/{name}", cluster.registry()), sha)
}

#[test]
fn scancel_during_a_slow_image_pull_leaves_nothing_and_the_next_pull_completes() {
    let cluster = cluster();
    let node = cluster.nodes()[0].clone();
    let (image, sha) = push_fresh_big_image(&cluster, 48);
    let job = {
        // 48 MB at 2 Mbit/s takes over 3 minutes: the job is cancelled long before.
        let _slow = SlowRegistryLink::new("2mbit");
        let job = stdout_ok(&cluster.run(&format!("sbatch --parsable -N1 -w {node} -o /dev/null --container={image} --wrap 'sleep 1'")))
            .trim()
            .to_string();
        // Pulling: berth's create of this job runs and the store holds work in progress.
        let pulling = format!("pgrep -f -- '--jo[b] {job} ' >/dev/null && test -n \"$(ls -A /var/lib/berth/tmp 2>/dev/null)\"");
        wait_on_node(&cluster, &node, &pulling, 60, &format!("job {job} never started pulling {image}"));
        std::thread::sleep(Duration::from_secs(2));
        assert!(cluster.on_node(&node, &pulling).status.success(), "the pull of job {job} ended before scancel: the link is not slow");
        stdout_ok(&cluster.run(&format!("scancel {job}")));
        assert_nodes_clean(&cluster, &job);
        assert_no_berth_work_left(&cluster, &node, &job);
        job
    };
    // At full speed again: the next job pulls the whole image and sees the big file intact.
    let out = cluster.run(&format!("srun -N1 -w {node} --container={image} sh -c 'echo JOB=$SLURM_JOB_ID; sha256sum /big'"));
    let out = stdout_ok(&out);
    assert!(out.contains(&sha), "after cancelled job {job}: {out}");
    assert_nodes_clean(&cluster, &job_of(&out));
    assert_no_berth_work_left(&cluster, &node, &job_of(&out));
}

#[test]
fn a_slurmstepd_killed_during_a_slow_image_pull_leaves_nothing_and_the_next_pull_completes() {
    let cluster = cluster();
    let node = cluster.nodes()[0].clone();
    let (image, sha) = push_fresh_big_image(&cluster, 48);
    let job = {
        let _slow = SlowRegistryLink::new("2mbit");
        let job = stdout_ok(&cluster.run(&format!("sbatch --parsable -N1 -w {node} -o /dev/null --container={image} --wrap 'sleep 1'")))
            .trim()
            .to_string();
        let pulling = format!("pgrep -f -- '--jo[b] {job} ' >/dev/null && test -n \"$(ls -A /var/lib/berth/tmp 2>/dev/null)\"");
        wait_on_node(&cluster, &node, &pulling, 60, &format!("job {job} never started pulling {image}"));
        // The batch step's slurmstepd dies while its task waits for berth's pull: nobody
        // is left to kill the task when the job is cancelled.
        cluster.on_node(&node, &format!("pkill -KILL -f 'slurmstepd: \\[{job}\\.batch\\]'"));
        stdout_ok(&cluster.run(&format!("scancel {job}")));
        assert_nodes_clean(&cluster, &job);
        assert_no_berth_work_left(&cluster, &node, &job);
        job
    };
    let out = stdout_ok(&cluster.run(&format!("srun -N1 -w {node} --container={image} sh -c 'echo JOB=$SLURM_JOB_ID; sha256sum /big'")));
    assert!(out.contains(&sha), "after job {job}, whose slurmstepd was killed: {out}");
    assert_nodes_clean(&cluster, &job_of(&out));
    assert_no_berth_work_left(&cluster, &node, &job_of(&out));
    // Nothing of the killed job came back later either (a pull finishing after the epilog).
    assert_nodes_clean(&cluster, &job);
}
