//! A Slurm job user's environment and process state against berth's root code: what
//! `srun` exports and what the user's shell sets (limits) must not steer or break the
//! `berth` runs the plugin makes as root, and the job's tasks still get all of it.
//! Each test runs as alice on the test cluster.

use berth_e2e::{cluster, stdout_ok, Cluster};

/// A dir of alice's home for one test, removed on drop.
struct Dir {
    cluster: Cluster,
    name: String,
}

impl Dir {
    fn new(test: &str, setup: &str) -> Dir {
        let cluster = cluster();
        let name = format!("root-env-e2e-{}-{test}", std::process::id());
        stdout_ok(&cluster.run(&format!("rm -rf {name} && mkdir {name} && cd {name} && {setup}")));
        Dir { cluster, name }
    }

    fn path(&self) -> String {
        format!("/home/alice/{}", self.name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = self.cluster.run(&format!("rm -rf {}", self.name));
    }
}

/// Builds `preload.so` (its constructor appends the effective uid of every process
/// loading it to `uids`) and `evil.toml`, a berth config whose `berth_binary` is
/// `evil.sh`, which records its uid in `evil-ran`.
const HOSTILE_ENV: &str = "printf '%s' '#include <stdio.h>\n#include <unistd.h>\n__attribute__((constructor)) static void f(void) { FILE *o = fopen(UIDS, \"a\"); if (o) { fprintf(o, \"%d\\n\", (int)geteuid()); fclose(o); } }\n' > preload.c \
     && gcc -shared -fPIC -DUIDS=\"\\\"$PWD/uids\\\"\" -o preload.so preload.c && touch uids && chmod 666 uids \
     && printf '#!/bin/sh\nid -u >> %s/evil-ran\nexec /usr/bin/env \"$@\"\n' \"$PWD\" > evil.sh && chmod 755 evil.sh \
     && printf 'berth_binary = \"%s/evil.sh\"\n' \"$PWD\" > evil.toml";

fn image(cluster: &Cluster) -> String {
    format!("{}/minimal:latest", cluster.registry())
}

/// `srun --export` hands slurmstepd the job's environment; the plugin's `berth` runs
/// as root from there: neither `BERTH_CONFIG` nor a loader variable may reach it, and
/// the task still sees both.
#[test]
fn srun_export_of_berth_config_and_loader_variables_never_acts_as_root() {
    let dir = Dir::new("export", HOSTILE_ENV);
    let d = dir.path();
    let cluster = &dir.cluster;
    let exports = format!("ALL,BERTH_CONFIG={d}/evil.toml,BERTH_STORE={d},LD_PRELOAD={d}/preload.so,LD_LIBRARY_PATH={d},GLIBC_TUNABLES=glibc.malloc.check=3");
    for pull in ["always", "missing"] {
        let out = cluster.run(&format!(
            "srun -N1 --export={exports} --container-image={} --container-pull={pull} sh -c 'echo preload=$LD_PRELOAD config=$BERTH_CONFIG'",
            image(cluster)
        ));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let records = stdout_ok(&cluster.run(&format!("cat {d}/uids; echo '#--evil--'; cat {d}/evil-ran 2>/dev/null; true")));
        let (uids, evil) = records.split_once("#--evil--\n").unwrap_or((&records, ""));
        assert!(evil.trim().is_empty(), "pull={pull}: the user's berth_binary ran as uid {evil}; {stderr}");
        assert!(!uids.lines().any(|u| u == "0"), "pull={pull}: LD_PRELOAD loaded into a root process (uids {uids:?}); {stderr}");
        assert!(out.status.success(), "pull={pull}: {stdout} {stderr}");
        assert_eq!(stdout.trim(), format!("preload={d}/preload.so config={d}/evil.toml"), "pull={pull}: the task keeps its environment; {stderr}");
    }
}

/// Limits the user sets before `srun` are the task's, not those of the root `berth`
/// the plugin runs: `ulimit -f` (a pull writes big files) and `ulimit -n` (an unpack
/// opens many) must not break creating the container, and the task still has them.
#[test]
fn ulimit_f_and_n_in_the_users_shell_bind_the_task_and_not_roots_work() {
    let dir = Dir::new("ulimit", "true");
    let cluster = &dir.cluster;
    // A fresh pull on the node, so that root writes whole layers.
    let image = format!("{}/mpi:latest", cluster.registry());
    let node = cluster.nodes()[0].clone();
    let _ = cluster.on_node(&node, "B=$(grep ^berth_binary /etc/berth/berth.toml | cut -d'\"' -f2); for i in $($B images | awk 'NR>1{print $1}'); do $B rm $i; done; $B gc");
    let out = cluster.run(&format!(
        "ulimit -f 1; ulimit -n 40; srun -w {node} -N1 --container-image={image} --container-pull=always \
         sh -c 'grep -E \"Max (file size|open files)\" /proc/self/limits | tr -s \" \"'"
    ));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout} {stderr}");
    // Slurm propagates the soft limits.
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.len() == 2 && lines[0].starts_with("Max file size 1024 ") && lines[1].starts_with("Max open files 40 "), "{stdout} {stderr}");
}

/// alice sets every proxy variable (`HTTP_PROXY`, `HTTPS_PROXY`, lower case too, and
/// `NO_PROXY`) to a port she listens on, on the node her job runs on: a root pull made
/// with the job's environment would connect there (and carry other users' logins for
/// that registry through her). Root's pull for her job goes the way slurmd's
/// environment says (here direct): her listener sees no connection, for a plain-HTTP
/// registry (the job runs) or an https one. Her own `berth pull` with the same
/// variables does go to her listener, so the listener would see a leak.
#[test]
fn srun_with_proxy_variables_pointing_at_a_users_own_listener_gets_root_pull_nothing_through_it() {
    let dir = Dir::new("proxy", "true");
    let cluster = &dir.cluster;
    let d = dir.path();
    let node = cluster.nodes()[0].clone();
    let port = 34000 + std::process::id() % 3000;
    let log = format!("{d}/connections");
    // The listener, alice's: logs the first line of every connection, answers nothing.
    let server = format!(
        "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('127.0.0.1', {port}))\ns.listen()\n\
         while True:\n    c, _ = s.accept()\n    c.settimeout(2)\n    try:\n        d = c.recv(4096)\n    except OSError:\n        d = b''\n    \
         open('{log}', 'ab').write(b'CONNECTION ' + d.split(b'\\r\\n')[0] + b'\\n')\n    c.close()\n"
    );
    std::fs::write(format!("{d}/listener.py"), server).unwrap();
    let listener = stdout_ok(&cluster.on_node(&node, &format!("runuser -u alice -- timeout 300 python3 {d}/listener.py >/dev/null 2>&1 & echo $!")));
    struct Stop(String, String);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = berth_e2e::cluster().on_node(&self.0, &format!("kill {}", self.1));
        }
    }
    let _stop = Stop(node.clone(), listener.trim().to_string());
    stdout_ok(&cluster.on_node(&node, &format!("for i in $(seq 100); do ss -ltn | grep -q '127.0.0.1:{port} ' && exit 0; sleep 0.1; done; echo never listened; exit 1")));
    let proxy = format!("http://127.0.0.1:{port}");
    let vars = format!("HTTP_PROXY={proxy} http_proxy={proxy} HTTPS_PROXY={proxy} https_proxy={proxy} NO_PROXY=example.org no_proxy=example.org");
    let image = image(cluster);
    let logged = || stdout_ok(&cluster.run(&format!("cat {log} 2>/dev/null; rm -f {log}; true")));

    // Her own pull honours them: the listener sees it.
    let berth = "$(grep ^berth_binary /etc/berth/berth.toml | cut -d'\"' -f2)";
    let own = cluster.on_node(&node, &format!("runuser -u alice -- env {vars} timeout 60 {berth} pull --quiet --store {d}/store {image}"));
    assert!(!own.status.success(), "alice's own pull went around her proxy");
    let seen = logged();
    assert!(seen.contains("CONNECTION GET http://") && seen.contains("/v2/"), "the listener saw no pull: {seen:?} {}", String::from_utf8_lossy(&own.stderr));

    // Root's pull for her job, with the manifest asked of the registry again.
    let out = cluster.run(&format!(
        "{vars} timeout 120 srun -w {node} -N1 --container-image={image} --container-pull=always sh -c 'echo JOB=$SLURM_JOB_ID; echo $HTTPS_PROXY'"
    ));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let seen = logged();
    assert!(seen.is_empty(), "root's pull connected to alice's listener: {seen:?}");
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&proxy), "the task keeps its variables: {stdout}");
    berth_e2e::assert_nodes_clean(cluster, &berth_e2e::job_of(&stdout));

    // An https registry (the test registries are plain HTTP: this one does not exist), for
    // HTTPS_PROXY: her own pull asks her listener to connect; root's pull for her job
    // does not, and fails with one line naming the registry.
    let https = "berth-proxy-test.invalid";
    let own = cluster.on_node(&node, &format!("runuser -u alice -- env {vars} timeout 60 {berth} pull --quiet --store {d}/store {https}/x:1"));
    assert!(!own.status.success());
    let seen = logged();
    assert!(seen.contains(&format!("CONNECTION CONNECT {https}:443")), "the listener saw no https pull: {seen:?} {}", String::from_utf8_lossy(&own.stderr));
    let out = cluster.run(&format!("{vars} timeout 120 srun -w {node} -N1 --container-image={https}/x:1 true"));
    let seen = logged();
    assert!(seen.is_empty(), "root's https pull connected to alice's listener: {seen:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("error: berth: ")).collect();
    assert!(!out.status.success() && lines.len() == 1 && lines[0].contains(https), "{stderr}");
}
