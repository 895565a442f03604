//! User remapping (the admin's `remap_user`): the image's USER, or root on request,
//! inside a user namespace that maps it to the job user. One test, because it turns the
//! setting on for the whole cluster (plugstack.conf) while it runs: cargo runs test
//! files one after another, so no other file sees it, and a guard turns it off again
//! even when an assertion fails.

use berth_e2e::{assert_nodes_clean, cluster, image_layout, job_of, stdout_ok, Cluster};
use std::process::Command;

const PLUGSTACK: &str = "/etc/slurm/plugstack.conf";

/// Adds `remap_user=true` to the plugin's line while alive.
struct RemapOn<'a> {
    cluster: &'a Cluster,
    node: String,
}

impl<'a> RemapOn<'a> {
    fn new(cluster: &'a Cluster) -> RemapOn<'a> {
        let node = cluster.nodes()[0].clone();
        stdout_ok(&cluster.on_node(&node, &format!("sed -i '/berth.so/s/$/ remap_user=true/' {PLUGSTACK}")));
        RemapOn { cluster, node }
    }
}

impl Drop for RemapOn<'_> {
    fn drop(&mut self) {
        // /etc/slurm is one directory shared by every test host.
        let _ = self.cluster.on_node(&self.node, &format!("sed -i 's/ remap_user=true//' {PLUGSTACK}"));
    }
}

/// Pushes the `minimal` image again with `USER` set to `user`, under a name of its own.
fn minimal_with_user(cluster: &Cluster, user: &str, name: &str) -> String {
    let dir = std::env::temp_dir().join(format!("berth-remap-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let copy = Command::new("cp").arg("-a").arg(image_layout("minimal")).arg(&dir).status().expect("run cp");
    assert!(copy.success(), "cannot copy the minimal image layout");
    let config = Command::new("umoci")
        .args(["config", "--image", &format!("{}:latest", dir.display()), "--config.user", user])
        .output()
        .expect("run umoci");
    stdout_ok(&config);
    let push = Command::new(berth_e2e::repo_root().join("slurm-test-env/push"))
        .args([&format!("{}:latest", dir.display()), &format!("{name}:latest")])
        .output()
        .expect("run slurm-test-env/push");
    stdout_ok(&push);
    let _ = std::fs::remove_dir_all(&dir);
    format!("{}/{name}:latest", cluster.registry())
}

#[test]
fn remapping_runs_tasks_as_the_images_user_or_root_and_they_stay_the_job_user_on_the_node() {
    let cluster = cluster();
    let user = &cluster.users()[0];
    let minimal = format!("{}/minimal:latest", cluster.registry());
    let with_user = minimal_with_user(&cluster, "4242:4343", "minimal-user");

    // Off (the default): the image's USER is ignored and root is refused with one line.
    let out = cluster.run(&format!("srun -N1 --container={with_user} id -u"));
    assert_eq!(stdout_ok(&out).trim(), stdout_ok(&cluster.run("id -u")).trim(), "USER must be ignored without remap_user");
    let out = cluster.run(&format!("srun -N1 --container={minimal} --container-remap-root id -u"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("does not allow running as root") && stderr.contains("remap_user"), "{stderr}");

    let _on = RemapOn::new(&cluster);
    // Root on request, on both nodes; what it writes in the home is the user's on the node.
    let marker = format!("remap-{}", std::process::id());
    let out = cluster.run(&format!(
        "srun -N2 --container={minimal} --container-remap-root sh -c 'echo JOB=$SLURM_JOB_ID; echo uid=$(id -u); touch ~/{marker}.$SLURM_NODEID'"
    ));
    let stdout = stdout_ok(&out);
    assert_eq!(stdout.matches("uid=0").count(), 2, "{stdout}");
    let owners = stdout_ok(&cluster.run(&format!("stat -c %U ~/{marker}.*; rm -f ~/{marker}.*")));
    assert_eq!(owners.lines().filter(|l| *l == user.as_str()).count(), 2, "files made by remapped root must be {user}'s: {owners}");
    assert_nodes_clean(&cluster, &job_of(&stdout));

    // The image's USER is honoured, with no capability in the host's namespace.
    let out = cluster.run(&format!(
        "srun -N1 --container={with_user} sh -c 'echo JOB=$SLURM_JOB_ID; id -u; id -g; cat /proc/self/uid_map; grep CapEff /proc/self/status'"
    ));
    let stdout = stdout_ok(&out);
    let host_uid = stdout_ok(&cluster.run("id -u")).trim().to_string();
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.starts_with("JOB=")).collect();
    assert_eq!(lines[0], "4242", "{stdout}");
    assert_eq!(lines[1], "4343", "{stdout}");
    assert_eq!(lines[2].split_whitespace().collect::<Vec<_>>(), ["4242", host_uid.as_str(), "1"], "{stdout}");
    assert_eq!(lines[3].split_whitespace().nth(1), Some("0000000000000000"), "{stdout}");
    assert_nodes_clean(&cluster, &job_of(&stdout));

    // Remapped root cannot do what the node's root can: the node's shadow file stays shut.
    let out = cluster.run(&format!("srun -N1 --container={minimal} --container-remap-root cat /.berth/host/etc/shadow"));
    assert!(!out.status.success(), "remapped root read the node's /etc/shadow: {}", String::from_utf8_lossy(&out.stdout));
}
