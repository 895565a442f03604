//! End-to-end tests of MPI across a job's containers on the test cluster, without the
//! Slurm plugin: on every node, as the adapters will, `berth container create` (the
//! `mpi` image from the cluster's registry) then `berth container wire`; then Open MPI's
//! `mpirun` and MPICH's `mpiexec` started in the first node's container must start every
//! rank inside the containers of the same job on every node. Each test destroys its
//! jobs, even when it fails, and checks that nothing is left.

use berth_e2e::{berth_binary, cluster, stdout_ok, Cluster};

const MPI: &str = "registry:5000/mpi:latest";
/// busybox only: no ssh, no sshd, no bash, no glibc, no entry for the job user.
const MINIMAL: &str = "registry:5000/minimal:latest";

/// A numeric job id unique to this test run and test (numeric ids get distinct ports).
fn job_id(test: u32) -> String {
    format!("{}{}", 100 + std::process::id() % 800, test)
}

/// A job's containers, created and wired on every node; destroyed on drop.
struct Job {
    cluster: Cluster,
    id: String,
    nodes: Vec<String>,
    port: u16,
}

impl Job {
    fn start(user: &str, test: u32, slots: u32) -> Job {
        Job::start_image(MPI, user, test, slots)
    }

    fn start_image(image: &str, user: &str, test: u32, slots: u32) -> Job {
        let cluster = cluster();
        let nodes = cluster.nodes();
        assert!(nodes.len() >= 2, "these tests need at least 2 compute hosts");
        let mut job = Job { cluster, id: job_id(test), nodes, port: 0 };
        let slots = vec![slots.to_string(); job.nodes.len()].join(",");
        for node in job.nodes.clone() {
            let create = format!(
                "{} container create --job {} --user {user} --image {image} --no-home >/dev/null",
                berth_binary().display(),
                job.id
            );
            stdout_ok(&job.cluster.on_node(&node, &create));
            let wire = format!("{} container wire --job {} --nodes {} --slots {slots}", berth_binary().display(), job.id, job.nodes.join(","));
            let wired: serde_json::Value = serde_json::from_str(&stdout_ok(&job.cluster.on_node(&node, &wire))).expect("wire prints JSON");
            job.port = wired["port"].as_u64().expect("a port") as u16;
        }
        job
    }

    /// Runs a shell line as the job user in the container on the job's first node.
    fn exec(&self, shell: &str) -> std::process::Output {
        let line = format!("cd / && timeout 120 {} container exec --job {} -- sh -c {}", berth_binary().display(), self.id, quote(shell));
        self.cluster.on_node(&self.nodes[0], &line)
    }

    /// The inode of the container's mount namespace on `node`.
    fn mnt_inode(&self, node: &str) -> String {
        stdout_ok(&self.cluster.on_node(node, &format!("stat -L -c %i /run/berth/{}/node/mnt", self.id))).trim().to_string()
    }

    fn destroy(&self) {
        for node in &self.nodes {
            stdout_ok(&self.cluster.on_node(node, &format!("{} container destroy --job {}", berth_binary().display(), self.id)));
        }
    }

    /// Nothing of the job left on any node: no process, no listener, no mount, no dir.
    fn assert_gone(&self) {
        for node in &self.nodes {
            let check = format!(
                "test ! -e /run/berth/{j} || echo dir left; ss -ltnH | grep -q ':{p} ' && echo port {p} still listening; \
                 grep -q '/run/berth/{j}/' /proc/self/mountinfo && echo mount left; pgrep -fx 'sleep 9{j}' && echo process left; true",
                j = self.id,
                p = self.port
            );
            assert_eq!(stdout_ok(&self.cluster.on_node(node, &check)).trim(), "", "job {} left something on {node}", self.id);
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        for node in &self.nodes {
            let _ = self.cluster.on_node(node, &format!("{} container destroy --job {}", berth_binary().display(), self.id));
        }
    }
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The ranks' lines.
fn ranks(out: &std::process::Output) -> Vec<String> {
    stdout_ok(out).lines().filter(|l| l.starts_with("rank ")).map(String::from).collect()
}

/// Two ranks a node, in hostfile order: `rank R of N on NODE os=debian` (the image's).
fn assert_every_rank_in_the_image_on_every_node(lines: &[String], nodes: &[String]) {
    let n = 2 * nodes.len();
    let mut lines = lines.to_vec();
    lines.sort_by_key(|l| l.split(' ').nth(1).and_then(|r| r.parse::<usize>().ok()));
    let expect: Vec<String> = (0..n).map(|rank| format!("rank {rank} of {n} on {} os=debian", nodes[rank / 2])).collect();
    assert_eq!(lines, expect);
}

/// `-np` for two ranks a node.
fn np(job: &Job) -> usize {
    2 * job.nodes.len()
}

#[test]
fn mpirun_lands_in_containers() {
    let job = Job::start("alice", 1, 2);
    let out = job.exec(&format!("mpirun -np {} --hostfile $BERTH_HOSTFILE /opt/berth-test/bin/hello-openmpi", np(&job)));
    assert_every_rank_in_the_image_on_every_node(&ranks(&out), &job.nodes);
    // The host is Debian too: prove the ranks run in the job's own containers.
    let out = job.exec(&format!("mpirun -np {} --hostfile $BERTH_HOSTFILE sh -c 'echo ns $(hostname) $(stat -L -c %i /proc/self/ns/mnt)'", np(&job)));
    let mut seen: Vec<String> = stdout_ok(&out).lines().filter(|l| l.starts_with("ns ")).map(String::from).collect();
    seen.sort();
    let mut expect: Vec<String> = job.nodes.iter().flat_map(|n| vec![format!("ns {n} {}", job.mnt_inode(n)); 2]).collect();
    expect.sort();
    assert_eq!(seen, expect);
    job.destroy();
    job.assert_gone();
}

#[test]
fn mpiexec_mpich_lands_in_containers() {
    let job = Job::start("alice", 2, 2);
    // The image's `mpiexec` is Open MPI's (Debian alternatives); MPICH's is mpiexec.mpich.
    let out = job.exec(&format!("mpiexec.mpich -f $BERTH_HOSTFILE -n {} /opt/berth-test/bin/hello-mpich", np(&job)));
    assert_every_rank_in_the_image_on_every_node(&ranks(&out), &job.nodes);
    job.destroy();
    job.assert_gone();
}

#[test]
fn plain_ssh_between_containers_and_the_hostfile() {
    let job = Job::start("alice", 3, 3);
    let out = job.exec("cat $BERTH_HOSTFILE; ssh node2 'id -un; grep ^ID= /etc/os-release; stat -L -c %i /proc/self/ns/mnt'");
    let text = stdout_ok(&out);
    let n = &job.nodes;
    let hostfile: String = n.iter().map(|node| format!("{node}\n").repeat(3)).collect();
    let expect = format!("{hostfile}alice\nID=debian\n{}\n", job.mnt_inode(&n[1]));
    assert_eq!(text, expect);
    job.destroy();
    job.assert_gone();
}

#[test]
fn two_jobs_on_the_same_nodes_do_not_collide_and_cannot_log_into_each_other() {
    let alice = Job::start("alice", 4, 2);
    let bob = Job::start("bob", 5, 2);
    assert_ne!(alice.port, bob.port);
    let run = format!("mpirun -np {} --hostfile $BERTH_HOSTFILE /opt/berth-test/bin/hello-openmpi", np(&alice));
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| alice.exec(&run));
        let b = s.spawn(|| bob.exec(&run));
        (a.join().expect("alice's run"), b.join().expect("bob's run"))
    });
    assert_every_rank_in_the_image_on_every_node(&ranks(&a), &alice.nodes);
    assert_every_rank_in_the_image_on_every_node(&ranks(&b), &bob.nodes);

    // Bob's job, aimed at alice's port: her sshd's host key is not his job's...
    let node2 = &bob.nodes[1];
    let out = bob.exec(&format!("ssh -o Port={} {node2} true", alice.port));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Host key verification failed"), "{out:?}");
    // ...and with the host key check off, his job's key does not open her sshd.
    let out = bob.exec(&format!(
        "ssh -o Port={} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o GlobalKnownHostsFile=/dev/null {node2} echo in",
        alice.port
    ));
    assert!(!out.status.success(), "bob got into alice's container: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("in"));

    alice.destroy();
    // Bob's job is untouched by the end of alice's.
    assert_every_rank_in_the_image_on_every_node(&ranks(&bob.exec(&run)), &bob.nodes);
    bob.destroy();
    alice.assert_gone();
    bob.assert_gone();
}

#[test]
fn destroy_leaves_no_sshd_nor_anything_started_through_it() {
    let job = Job::start("alice", 6, 1);
    let id = &job.id;
    // A process started on node2 over ssh that detaches from the session.
    let out = job.exec(&format!("ssh {} \"setsid sleep 9{id} </dev/null >/dev/null 2>&1 &\"", job.nodes[1]));
    stdout_ok(&out);
    let seen = job.cluster.on_node(&job.nodes[1], &format!("sleep 1; pgrep -fx 'sleep 9{id}'"));
    assert!(!stdout_ok(&seen).trim().is_empty(), "the detached process should run before destroy");
    let listening = job.cluster.on_node(&job.nodes[1], &format!("ss -ltnH | grep ':{} '", job.port));
    assert!(stdout_ok(&listening).contains("0.0.0.0"));
    job.destroy();
    job.assert_gone();
}

#[test]
fn wiring_twice_returns_the_running_sshd() {
    let job = Job::start("alice", 7, 1);
    let wire = format!("{} container wire --job {} --nodes {}", berth_binary().display(), job.id, job.nodes.join(","));
    let again: serde_json::Value = serde_json::from_str(&stdout_ok(&job.cluster.on_node(&job.nodes[0], &wire))).expect("JSON");
    assert_eq!(again["reused"], true);
    assert_eq!(again["port"].as_u64(), Some(u64::from(job.port)));
    job.destroy();
    job.assert_gone();
}

#[test]
fn ssh_works_in_an_image_without_ssh_bash_or_the_user() {
    let job = Job::start_image(MINIMAL, "bob", 8, 1);
    let out = job.exec("grep ^bob: /etc/passwd; ssh node2 'id -un; grep ^ID= /etc/os-release; echo $BERTH_HOSTFILE'");
    let text = stdout_ok(&out);
    let uid = nix::unistd::User::from_name("bob").expect("passwd").expect("bob exists").uid;
    assert!(text.starts_with(&format!("bob:x:{uid}:")), "{text}");
    assert!(text.contains(":/bin/sh\n"), "bash is not in the image, so the shell is /bin/sh: {text}");
    assert!(text.ends_with("bob\nID=busybox\n/.berth/wiring/hostfile\n"), "{text}");
    job.destroy();
    job.assert_gone();
}
