//! Slurm users running MPI programs from an image with berth's SPANK plugin, on the
//! slurm-test-env cluster, with no flag but `--container`: `mpirun` (Open MPI) and
//! `mpiexec.mpich` started by a batch script inside the image (also with
//! `$BERTH_HOSTFILE`), `srun --mpi=pmi2` (MPICH) and `srun --mpi=pmix` (Open MPI).
//! Under Slurm both MPIs start their daemons with `srun` (Open MPI's plm/slurm, MPICH's
//! Hydra slurm bootstrap), which the image reaches through berth's `/.berth/bin`
//! wrappers, so every rank enters its node's container like any other task. Every test
//! checks every rank (0..N-1, each once, on the node the allocation puts it) and that
//! nothing of the job is left on any node afterwards.

use berth_e2e::{assert_nodes_clean, cluster, job_of, job_pids_shell, stdout_ok, Cluster};

/// Ranks per node in every test: `--ntasks-per-node=2`.
const PER_NODE: usize = 2;

fn mpi_image(cluster: &Cluster) -> String {
    format!("{}/mpi:latest", cluster.registry())
}

/// Writes `script` to `NAME.sh` in the user's home, runs `sbatch --wait OPTIONS NAME.sh`
/// and returns the job's output (`NAME.out`); panics with it when the job failed.
fn sbatch(cluster: &Cluster, user: &str, name: &str, options: &str, script: &str) -> String {
    let line = format!(
        "rm -f {name}.out && cat > {name}.sh <<'BERTH_EOF'\n{script}BERTH_EOF\n\
         sbatch --wait -o {name}.out {options} {name}.sh >/dev/null; rc=$?; cat {name}.out; exit $rc"
    );
    stdout_ok(&cluster.run_as(user, &line))
}

/// The programs' `rank R of N on HOST os=ID` lines: every rank once, `PER_NODE` a node
/// in node order, each from the image (`/opt/berth-test/bin` exists only there).
fn assert_every_rank_in_the_image_on_every_node(output: &str, nodes: &[String]) {
    let mut ranks: Vec<&str> = output.lines().filter(|l| l.starts_with("rank ")).collect();
    ranks.sort_by_key(|l| l.split(' ').nth(1).and_then(|r| r.parse::<usize>().ok()));
    let n = PER_NODE * nodes.len();
    let expect: Vec<String> = (0..n).map(|rank| format!("rank {rank} of {n} on {} os=debian", nodes[rank / PER_NODE])).collect();
    assert_eq!(ranks, expect, "{output}");
}

/// The test programs must not exist on the hosts, or a rank run outside the image would pass.
fn assert_hosts_lack_the_programs(cluster: &Cluster) {
    for node in cluster.nodes() {
        assert!(!cluster.on_node(&node, "test -e /opt/berth-test").status.success(), "{node} must not have /opt/berth-test");
    }
}

/// A batch script: `#SBATCH` lines (sbatch reads them only before the first command),
/// the job id, then the launch.
fn script(directives: &str, launch: &str) -> String {
    format!("#!/bin/bash\n{directives}echo JOB=$SLURM_JOB_ID\n{launch}\necho rc=$?\n")
}

#[test]
fn sbatch_container_mpirun_openmpi_lands_in_the_image_on_every_node() {
    let cluster = cluster();
    assert_hosts_lack_the_programs(&cluster);
    let nodes = cluster.nodes();
    let n = PER_NODE * nodes.len();
    let options = format!("-N{} --ntasks-per-node={PER_NODE} --container={}", nodes.len(), mpi_image(&cluster));
    let out = sbatch(&cluster, "alice", "slurm-mpi-openmpi", &options, &script("", &format!("mpirun -np {n} /opt/berth-test/bin/hello-openmpi")));
    assert!(out.contains("rc=0"), "{out}");
    assert_every_rank_in_the_image_on_every_node(&out, &nodes);
    assert_nodes_clean(&cluster, &job_of(&out));
}

#[test]
fn sbatch_container_image_mpiexec_mpich_lands_in_the_image_on_every_node() {
    let cluster = cluster();
    assert_hosts_lack_the_programs(&cluster);
    let nodes = cluster.nodes();
    let n = PER_NODE * nodes.len();
    // The options in the script this time, with berth's own option name.
    let directives = format!("#SBATCH -N{}\n#SBATCH --ntasks-per-node={PER_NODE}\n#SBATCH --container-image={}\n", nodes.len(), mpi_image(&cluster));
    let launch = format!("mpiexec.mpich -n {n} /opt/berth-test/bin/hello-mpich");
    let out = sbatch(&cluster, "alice", "slurm-mpi-mpich", "", &script(&directives, &launch));
    assert!(out.contains("rc=0"), "{out}");
    assert_every_rank_in_the_image_on_every_node(&out, &nodes);
    assert_nodes_clean(&cluster, &job_of(&out));
}

#[test]
fn srun_mpi_pmi2_container_gives_every_rank_its_own_rank() {
    let cluster = cluster();
    assert_hosts_lack_the_programs(&cluster);
    let nodes = cluster.nodes();
    // Debian's MPICH speaks PMI to Slurm's pmi2 plugin; N copies of "rank 0 of 1"
    // would mean the ranks never reached it from inside the container.
    let out = cluster.run(&format!(
        "srun -N{} --ntasks-per-node={PER_NODE} --mpi=pmi2 --container={} sh -c 'test $SLURM_PROCID = 0 && echo JOB=$SLURM_JOB_ID; exec /opt/berth-test/bin/hello-mpich'",
        nodes.len(),
        mpi_image(&cluster)
    ));
    let out = stdout_ok(&out);
    assert_every_rank_in_the_image_on_every_node(&out, &nodes);
    assert_nodes_clean(&cluster, &job_of(&out));
}

#[test]
fn a_batch_script_in_the_image_runs_srun_mpi_pmi2() {
    let cluster = cluster();
    let nodes = cluster.nodes();
    // A job environment that names pmix (as users export SLURM_MPI_TYPE to make it srun's
    // default) must not stop the batch step, which has no PMIx server.
    let options = format!("-N{} --ntasks-per-node={PER_NODE} --export=ALL,SLURM_MPI_TYPE=pmix --container={}", nodes.len(), mpi_image(&cluster));
    let out = sbatch(&cluster, "bob", "slurm-mpi-srun", &options, &script("", "srun --mpi=pmi2 /opt/berth-test/bin/hello-mpich"));
    assert!(out.contains("rc=0"), "{out}");
    assert_every_rank_in_the_image_on_every_node(&out, &nodes);
    assert_nodes_clean(&cluster, &job_of(&out));
}

#[test]
fn two_users_mpi_jobs_share_the_nodes_at_once() {
    let cluster = cluster();
    let nodes = cluster.nodes();
    let n = PER_NODE * nodes.len();
    // Two ranks a node each: both jobs fit on the 4-CPU nodes together. Each records
    // when its ranks ran, to show that the jobs overlapped.
    let options = format!("-N{} --ntasks-per-node={PER_NODE} --container={}", nodes.len(), mpi_image(&cluster));
    let body = format!(
        "echo start=$(date +%s.%N)\nsleep 4\nmpirun -np {n} /opt/berth-test/bin/hello-openmpi\nrc=$?\nmpiexec.mpich -n {n} /opt/berth-test/bin/hello-mpich | sed 's/^rank/mpich rank/'\necho end=$(date +%s.%N)\n(exit $rc)"
    );
    let (alice, bob) = std::thread::scope(|s| {
        let a = s.spawn(|| sbatch(&cluster, "alice", "slurm-mpi-shared", &options, &script("", &body)));
        let b = s.spawn(|| sbatch(&cluster, "bob", "slurm-mpi-shared", &options, &script("", &body)));
        (a.join().expect("alice's job"), b.join().expect("bob's job"))
    });
    let time = |out: &str, key: &str| -> f64 {
        out.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse().ok()).unwrap_or_else(|| panic!("no {key} in {out}"))
    };
    for out in [&alice, &bob] {
        assert!(out.contains("rc=0"), "{out}");
        assert_every_rank_in_the_image_on_every_node(out, &nodes);
        let mpich: String = out.lines().filter_map(|l| l.strip_prefix("mpich ")).map(|l| format!("{l}\n")).collect();
        assert_every_rank_in_the_image_on_every_node(&mpich, &nodes);
    }
    let overlap = time(&alice, "start=").max(time(&bob, "start=")) < time(&alice, "end=").min(time(&bob, "end="));
    assert!(overlap, "the two jobs did not run at the same time: {alice} {bob}");
    assert_nodes_clean(&cluster, &job_of(&alice));
    assert_nodes_clean(&cluster, &job_of(&bob));
}

#[test]
fn scancel_of_a_running_mpirun_job_leaves_nothing_on_any_node() {
    let cluster = cluster();
    let nodes = cluster.nodes();
    let n = PER_NODE * nodes.len();
    let options = format!("-N{} --ntasks-per-node={PER_NODE} -o /dev/null --container={}", nodes.len(), mpi_image(&cluster));
    let line = format!("sbatch --parsable {options} --wrap 'mpirun -np {n} sleep 300'");
    let job = stdout_ok(&cluster.run(&line)).trim().to_string();
    // Running when every node has the job's container and the job's `sleep` ranks.
    let running = format!("test -e /run/berth/{job}/node/mnt && test $(ps -o comm= -p $({}) | grep -cx sleep) = {PER_NODE}", job_pids_shell(&job));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for node in &nodes {
        while !cluster.on_node(node, &running).status.success() {
            assert!(std::time::Instant::now() < deadline, "job {job} never ran its ranks on {node}");
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }
    stdout_ok(&cluster.run(&format!("scancel {job}")));
    assert_nodes_clean(&cluster, &job);
}

/// The option that names the image for a `--mpi=pmix` step. Slurm 24.11's pmix plugin
/// fails a step that carries Slurm's own `--container` when there is no oci.conf
/// ("Cannot bind() UNIX socket (null)/stepd.slurm.pmix.J.S", before any plugin hook), so
/// there it must be berth's `--container-image`; 22.05 takes either.
fn pmix_image_option(cluster: &Cluster) -> &'static str {
    let version = stdout_ok(&cluster.run("srun --version"));
    if version.starts_with("slurm 22.") {
        "--container"
    } else {
        "--container-image"
    }
}

#[test]
fn srun_mpi_pmix_container_runs_openmpi_ranks_on_every_node() {
    let cluster = cluster();
    assert_hosts_lack_the_programs(&cluster);
    let nodes = cluster.nodes();
    // Open MPI's ranks reach slurmstepd's PMIx server from inside the container; a rank
    // that did not would fail MPI_Init (or print "rank 0 of 1" as a singleton). Two
    // steps in one job: the second step's PMIx dirs reach the container the first made.
    let step = format!(
        "srun --mpi=pmix -N{} --ntasks-per-node={PER_NODE} {}={} /opt/berth-test/bin/hello-openmpi",
        nodes.len(),
        pmix_image_option(&cluster),
        mpi_image(&cluster)
    );
    let out = cluster.run(&format!(
        "salloc -N{} --ntasks-per-node={PER_NODE} bash -c 'echo JOB=$SLURM_JOB_ID; {step} && echo second step && {step}'",
        nodes.len()
    ));
    let out = stdout_ok(&out);
    let (first, second) = out.split_once("second step").unwrap_or_else(|| panic!("the first step failed: {out}"));
    assert_every_rank_in_the_image_on_every_node(first, &nodes);
    assert_every_rank_in_the_image_on_every_node(second, &nodes);
    assert_nodes_clean(&cluster, &job_of(&out));
}

#[test]
fn a_batch_script_on_the_host_runs_srun_mpi_pmix_in_the_image() {
    let cluster = cluster();
    let nodes = cluster.nodes();
    // The script runs on the node, only the step in the image.
    let options = format!("-N{} --ntasks-per-node={PER_NODE}", nodes.len());
    let launch = format!("srun --mpi=pmix --container-image={} /opt/berth-test/bin/hello-openmpi", mpi_image(&cluster));
    let out = sbatch(&cluster, "bob", "slurm-mpi-pmix", &options, &script("", &launch));
    assert!(out.contains("rc=0"), "{out}");
    assert_every_rank_in_the_image_on_every_node(&out, &nodes);
    assert_nodes_clean(&cluster, &job_of(&out));
}

#[test]
fn a_batch_script_in_the_image_runs_srun_mpi_pmix() {
    let cluster = cluster();
    assert_hosts_lack_the_programs(&cluster);
    let nodes = cluster.nodes();
    // The node's srun, run by the script inside the image, loads the node's libpmix by
    // its absolute development-link path, which berth binds in (images lack the link).
    let options = format!("-N{} --ntasks-per-node={PER_NODE} --container-image={}", nodes.len(), mpi_image(&cluster));
    let launch = "srun --mpi=pmix /opt/berth-test/bin/hello-openmpi";
    let out = sbatch(&cluster, "alice", "slurm-mpi-pmix-inside", &options, &script("", launch));
    assert!(out.contains("rc=0"), "{out}");
    assert_every_rank_in_the_image_on_every_node(&out, &nodes);
    assert_nodes_clean(&cluster, &job_of(&out));
}

#[test]
fn srun_mpi_pmi2_cannot_start_debians_openmpi_and_open_mpi_says_why() {
    let cluster = cluster();
    let nodes = cluster.nodes();
    // Debian's Open MPI has no PMI-1/PMI-2 client (ompi_info lists pmix components
    // ext3x, isolated and flux: no s1/s2, it was configured without --with-pmi), so its
    // ranks refuse a pmi2 launch: what docs/user.md says. If this starts to pass, the
    // docs are wrong.
    let out = cluster.run(&format!(
        "srun -N{} --ntasks-per-node={PER_NODE} --mpi=pmi2 --container={} sh -c 'echo JOB=$SLURM_JOB_ID; exec /opt/berth-test/bin/hello-openmpi' 2>&1; echo rc=$?",
        nodes.len(),
        mpi_image(&cluster)
    ));
    let out = stdout_ok(&out);
    assert!(!out.contains("rc=0") && out.contains("OMPI was not built with SLURM's PMI support"), "{out}");
    assert!(!out.lines().any(|l| l.starts_with("rank ")), "{out}");
    assert_nodes_clean(&cluster, &job_of(&out));
}

#[test]
fn mpirun_and_mpiexec_with_berth_hostfile_land_in_the_image_on_every_node() {
    let cluster = cluster();
    let nodes = cluster.nodes();
    let n = PER_NODE * nodes.len();
    let options = format!("-N{} --ntasks-per-node={PER_NODE} --container={}", nodes.len(), mpi_image(&cluster));
    // The hostfile names each node once per slot; both MPIs still launch through srun.
    let launch = format!(
        "echo hostfile=$BERTH_HOSTFILE; tr '\\n' ' ' <$BERTH_HOSTFILE; echo\n\
         mpirun -hostfile $BERTH_HOSTFILE -np {n} /opt/berth-test/bin/hello-openmpi || exit 1\n\
         mpiexec.mpich -f $BERTH_HOSTFILE -n {n} /opt/berth-test/bin/hello-mpich | sed 's/^rank/mpich rank/'"
    );
    let out = sbatch(&cluster, "alice", "slurm-mpi-hostfile", &options, &script("", &launch));
    assert!(out.contains("rc=0"), "{out}");
    assert!(out.contains("hostfile=/.berth/slurm/hostfile"), "{out}");
    let lines: String = nodes.iter().map(|node| format!("{node} ").repeat(PER_NODE)).collect();
    assert!(out.lines().any(|l| l == lines), "one line per slot, {lines:?}: {out}");
    assert_every_rank_in_the_image_on_every_node(&out, &nodes);
    let mpich: String = out.lines().filter_map(|l| l.strip_prefix("mpich ")).map(|l| format!("{l}\n")).collect();
    assert_every_rank_in_the_image_on_every_node(&mpich, &nodes);
    assert_nodes_clean(&cluster, &job_of(&out));
}
