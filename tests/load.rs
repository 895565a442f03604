//! Load: many jobs on one node asking for one image at once, and many short jobs in a
//! row, on the slurm-test-env cluster. What is counted is what must not grow: blob
//! downloads (from the registry's access log), mounts, processes, namespaces, files
//! under the runtime dir and bytes in the store; never time.

use berth_e2e::{assert_nodes_clean, berth_binary, busybox_layer, cluster, push_image, stdout_ok, Cluster};
use berth_testkit::{noise, tar_of, Entry};
use std::time::{Duration, Instant};


/// Pushes an image no node has seen (a busybox layer and 24 MiB of noise, both
/// unique to this run) as `REPO:1`; returns its reference and its blobs' digests.
fn push_unique_image(repo: &str) -> (String, Vec<String>) {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let noise = noise(24 << 20, seed);
    let image = berth_e2e::image(&[busybox_layer(&format!("{repo} {seed}")), tar_of(&[Entry::File("noise", &noise, 0o644)])], &["/bin/true"]);
    let reference = push_image(&image, &format!("{repo}:1"));
    let mut blobs: Vec<String> = image.layers.iter().map(|l| l.blob.digest.clone()).collect();
    blobs.push(image.config.digest.clone());
    (reference, blobs)
}

/// The registry's access log lines for GETs of `path_prefix...` made since `from` (a byte offset).
fn gets_since(from: u64, path: &str) -> usize {
    let log = std::fs::read(berth_e2e::state_dir().join("log/head/registry.log")).unwrap();
    let text = String::from_utf8_lossy(&log[from as usize..]);
    text.lines().filter(|l| l.contains(&format!("\"GET {path} "))).count()
}

fn log_size() -> u64 {
    std::fs::metadata(berth_e2e::state_dir().join("log/head/registry.log")).unwrap().len()
}

#[test]
fn twenty_jobs_asking_at_once_for_one_uncached_image_download_each_blob_once_and_all_start() {
    let cluster = cluster();
    let node = cluster.nodes()[0].clone();
    let repo = format!("load-once-{}", std::process::id());
    let (image, blobs) = push_unique_image(&repo);
    let from = log_size();
    // Let 20 jobs share the node's 4 cores, for this test only.
    stdout_ok(&cluster.run_as("root", "scontrol update PartitionName=debug OverSubscribe=FORCE:20"));
    let out = cluster.run(&format!(
        "rm -rf load-once && mkdir load-once && for i in $(seq 20); do \
           srun -N1 -n1 -w {node} --oversubscribe --container={image} sh -c 'echo JOB=$SLURM_JOB_ID; cat /stamp; echo' >load-once/$i 2>&1 & \
         done; wait; cat load-once/*; rm -rf load-once"
    ));
    let _ = cluster.run_as("root", "scontrol update PartitionName=debug OverSubscribe=NO");
    let text = stdout_ok(&out);
    let jobs: Vec<String> = text.lines().filter_map(|l| l.strip_prefix("JOB=")).map(|j| j.trim().to_string()).collect();
    assert_eq!(jobs.len(), 20, "every job started in the image: {text}");
    assert_eq!(text.matches(&format!("{repo} ")).count(), 20, "{text}");
    let pullers = gets_since(from, &format!("/v2/{repo}/manifests/1"));
    for blob in &blobs {
        let gets = gets_since(from, &format!("/v2/{repo}/blobs/{blob}"));
        assert_eq!(gets, 1, "blob {blob} was downloaded {gets} times by {pullers} concurrent pulls");
    }
    eprintln!("20 jobs: {pullers} found the image missing and pulled at once; each of {} blobs downloaded once", blobs.len());
    assert!(pullers >= 2, "the jobs did not pull concurrently ({pullers}), so nothing was tested");
    for job in &jobs {
        assert_nodes_clean(&cluster, job);
    }
    let b = berth_binary().display().to_string();
    stdout_ok(&cluster.on_node(&node, &format!("{b} verify && {b} rm {image} && {b} gc")));
}

/// What a node holds that a job could leave behind: files under the runtime dir (the
/// Slurm client wrappers written once per node, and the cgroup2 hierarchy berth mounts
/// there when the node has none, which all test hosts share, aside), mounts under it, processes
/// outside the node's own mount namespace, and the store's entries and bytes.
fn footprint(cluster: &Cluster, node: &str) -> String {
    stdout_ok(&cluster.on_node(
        node,
        "echo runtime:; find /run/berth -mindepth 1 \\( -path /run/berth/.slurm-client -o -path /run/berth/.cgroup2 \\) -prune -o -print | sort; \
         echo mounts: $(grep -c ' /run/berth/' /proc/self/mountinfo); \
         net=$(stat -L -c %i /proc/self/ns/net); mnt=$(stat -L -c %i /proc/self/ns/mnt); n=0; ns=''; \
         for p in /proc/[0-9]*; do [ \"$(stat -L -c %i $p/ns/net 2>/dev/null)\" = \"$net\" ] || continue; \
           m=$(stat -L -c %i $p/ns/mnt 2>/dev/null) || continue; [ \"$m\" = \"$mnt\" ] && continue; n=$((n+1)); ns=\"$ns $m\"; done; \
         echo processes in other mount namespaces: $n; echo namespaces: $(echo $ns | tr ' ' '\\n' | sort -u | wc -w); \
         echo store: $(find /var/lib/berth -not -path '/var/lib/berth/locks/*' | wc -l) entries, $(du -sb --exclude=locks /var/lib/berth | cut -f1) bytes",
    ))
}

#[test]
fn two_hundred_short_jobs_in_a_row_leave_nothing_behind() {
    let cluster = cluster();
    let nodes = cluster.nodes();
    let node = nodes.last().unwrap().clone();
    let image = format!("{}/minimal:latest", cluster.registry());
    // The first job pulls the image; what it leaves is the baseline.
    let first = stdout_ok(&cluster.run(&format!("srun -N1 -w {node} --container={image} sh -c 'echo JOB=$SLURM_JOB_ID'")));
    assert_nodes_clean(&cluster, first.trim().trim_start_matches("JOB="));
    let before = footprint(&cluster, &node);
    let out = cluster.run(&format!(
        "ok=0; for i in $(seq 200); do srun -N1 -w {node} --container={image} true && ok=$((ok+1)); done; echo ok=$ok; \
         srun -N1 -w {node} --container={image} sh -c 'echo JOB=$SLURM_JOB_ID'"
    ));
    let text = stdout_ok(&out);
    assert!(text.contains("ok=200"), "{text} {}", String::from_utf8_lossy(&out.stderr));
    let last = text.lines().find_map(|l| l.strip_prefix("JOB=")).unwrap().trim().to_string();
    assert_nodes_clean(&cluster, &last);
    // The last epilog may still be finishing: wait until the node is back to the baseline.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let after = footprint(&cluster, &node);
        if after == before {
            break;
        }
        assert!(Instant::now() < deadline, "201 jobs later the node holds more:\nbefore:\n{before}\nafter:\n{after}");
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("after 201 jobs, as before:\n{before}");
}
