//! Slurm users running images: `srun`/`sbatch`/`salloc` with berth's SPANK plugin on the
//! slurm-test-env cluster (real slurmctld and slurmd). Every test names what a user
//! does, and every test checks that the job left nothing behind on the nodes.

use berth_e2e::{assert_nodes_clean, cluster, stdout_ok, Cluster};
use std::process::Output;
use std::time::{Duration, Instant};

/// The test image `minimal` (busybox, "berth minimal" in /etc/os-release) in the registry.
fn minimal(cluster: &Cluster) -> String {
    format!("{}/minimal:latest", cluster.registry())
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The job id a task printed as `JOB=<id>` (scheduler variables survive the container).
fn job_of(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.split_once("JOB=").map(|(_, id)| id.trim().to_string()))
        .unwrap_or_else(|| panic!("no JOB= line in {stdout:?}"))
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

#[test]
fn scancel_and_a_killed_slurmstepd_leave_nothing_behind() {
    let cluster = cluster();
    let node = cluster.nodes()[0].clone();
    let job = stdout_ok(&cluster.run(&format!(
        "sbatch --parsable -N1 -w {node} -o /dev/null --container={} --wrap 'sleep 300'",
        minimal(&cluster)
    )))
    .trim()
    .to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cluster.on_node(&node, &format!("test -e /run/berth/{job}/node/mnt")).status.success() {
        assert!(Instant::now() < deadline, "job {job} never got its container");
        std::thread::sleep(Duration::from_millis(200));
    }
    cluster.on_node(&node, &format!("pkill -KILL -f 'slurmstepd: \\[{job}\\.batch\\]'"));
    stdout_ok(&cluster.run(&format!("scancel {job}")));
    assert_nodes_clean(&cluster, &job);
}
