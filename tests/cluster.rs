//! The test cluster itself: what every other end-to-end test stands on.

use berth_e2e::{cluster, lines, stdout_ok};
use std::process::Command;

#[test]
fn srun_runs_on_every_compute_host() {
    let cluster = cluster();
    let nodes = cluster.nodes();
    let out = cluster.run(&format!("srun -N{} hostname", nodes.len()));
    let mut names = lines(&out);
    names.sort();
    assert_eq!(names, nodes, "one task per compute host, each with its own host name");
}

#[test]
fn jobs_run_as_the_submitting_regular_user() {
    let cluster = cluster();
    for user in cluster.users() {
        assert_ne!(user, "root");
        let out = cluster.run_as(&user, "srun -N1 id -un");
        assert_eq!(stdout_ok(&out).trim(), user);
    }
}

#[test]
fn batch_job_writes_its_output_in_the_users_home() {
    let cluster = cluster();
    let out = cluster.run(
        "rm -f cluster-batch.out && sbatch --wait -N1 -o cluster-batch.out --wrap 'echo batch on $(hostname)' \
         >/dev/null && cat cluster-batch.out",
    );
    assert!(stdout_ok(&out).starts_with("batch on node"), "{}", stdout_ok(&out));
}

#[test]
fn compute_hosts_have_private_node_local_dirs() {
    let cluster = cluster();
    let nodes = cluster.nodes();
    for dir in ["/var/lib/berth", "/run/berth"] {
        stdout_ok(&cluster.on_node(&nodes[0], &format!("echo mine > {dir}/private-probe")));
        for other in &nodes[1..] {
            let out = cluster.on_node(other, &format!("test ! -e {dir}/private-probe && echo absent"));
            assert_eq!(stdout_ok(&out).trim(), "absent", "{dir} on {other} must not see {}'s files", nodes[0]);
        }
        stdout_ok(&cluster.on_node(&nodes[0], &format!("rm {dir}/private-probe")));
    }
}

#[test]
fn hosts_reach_each_other_only_on_the_test_network() {
    let cluster = cluster();
    let node = &cluster.nodes()[0];
    let routes = stdout_ok(&cluster.on_node(node, "ip -4 route"));
    assert!(!routes.contains("default"), "test hosts must have no way out: {routes}");
    let out = cluster.on_node(node, "getent hosts head registry");
    assert!(stdout_ok(&out).contains("registry"));
}

#[test]
fn registry_serves_every_test_image_in_each_media_type_family() {
    let cluster = cluster();
    let registry = cluster.registry();
    let expect = [
        ("minimal:latest", "application/vnd.oci.image.layer.v1.tar+gzip"),
        ("minimal:docker", "application/vnd.docker.image.rootfs.diff.tar.gzip"),
        ("minimal:zstd", "application/vnd.oci.image.layer.v1.tar+zstd"),
        ("minimal:multi", "application/vnd.oci.image.manifest.v1+json"),
        ("layers:latest", "application/vnd.oci.image.layer.v1.tar+gzip"),
        ("mpi:latest", "application/vnd.oci.image.layer.v1.tar+gzip"),
    ];
    for (image, media_type) in expect {
        let raw = Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false", &format!("docker://{registry}/{image}")])
            .output()
            .expect("run skopeo");
        let raw = stdout_ok(&raw);
        assert!(raw.contains(media_type), "{image} should carry {media_type}: {raw}");
        let config = Command::new("skopeo")
            .args(["inspect", "--tls-verify=false", &format!("docker://{registry}/{image}")])
            .output()
            .expect("run skopeo");
        assert!(stdout_ok(&config).contains("\"amd64\""), "{image} resolves to linux/amd64");
    }
}
