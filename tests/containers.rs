//! End-to-end tests of a job's container on a node: `berth container create|exec|
//! destroy|list` and `berth run`. Most run as root on this machine against an image
//! built from busybox-static (two layers and a setuid test program), each with its own
//! runtime dir, destroying what they made even when they fail. Those named `on_a_node_`
//! run on the test cluster's compute hosts with images from its registry.

use berth_e2e::{berth_binary, cluster, stdout_ok};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const NOBODY: &str = "65534";

/// An image in two layers, a berth config pointing at a private runtime dir, and a job.
struct Fixture {
    dir: PathBuf,
    job: String,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        assert!(nix::unistd::geteuid().is_root(), "these tests run as root");
        let dir = std::env::temp_dir().join(format!("berth-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let l0 = dir.join("l0");
        let l1 = dir.join("l1");
        for d in ["bin", "etc", "work", "scratch"] {
            std::fs::create_dir_all(l0.join(d)).unwrap();
        }
        std::fs::set_permissions(l0.join("scratch"), std::fs::Permissions::from_mode(0o1777)).unwrap();
        std::fs::copy("/bin/busybox", l0.join("bin/busybox")).expect("busybox-static is installed");
        for applet in ["sh", "id", "cat", "ls", "true", "grep", "sleep", "echo", "env", "pwd", "touch", "readlink", "mount"] {
            std::os::unix::fs::symlink("busybox", l0.join("bin").join(applet)).unwrap();
        }
        std::fs::write(l0.join("etc/os-release"), "NAME=\"berth lower\"\nID=berthtest-lower\n").unwrap();
        std::fs::create_dir_all(l1.join("etc")).unwrap();
        std::fs::create_dir_all(l1.join("usr/local/bin")).unwrap();
        std::fs::write(l1.join("etc/os-release"), "NAME=\"berth test\"\nID=berthtest\n").unwrap();
        let source = dir.join("showeuid.c");
        std::fs::write(&source, "#include <stdio.h>\n#include <unistd.h>\nint main(void){printf(\"euid=%d\\n\",(int)geteuid());return 0;}\n").unwrap();
        let suid = l1.join("usr/local/bin/showeuid");
        let cc = Command::new("cc").args(["-static", "-O2", "-o"]).arg(&suid).arg(&source).output().expect("run cc");
        assert!(cc.status.success(), "cc failed: {}", String::from_utf8_lossy(&cc.stderr));
        std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"config":{"Env":["PATH=/usr/local/bin:/bin","IMG=yes","SLURM_JOB_ID=from-image"],"Cmd":["/bin/sh","-c","echo default-cmd; pwd"],"WorkingDir":"/work"}}"#,
        )
        .unwrap();
        std::fs::write(dir.join("berth.toml"), format!("runtime_dir = \"{}\"\nmount_home = false\n", dir.join("rt").display())).unwrap();
        Fixture { dir, job: "1001".into() }
    }

    fn layers(&self) -> String {
        format!("{},{}", self.dir.join("l0").display(), self.dir.join("l1").display())
    }

    fn berth(&self, args: &[&str]) -> Output {
        Command::new(berth_binary()).env("BERTH_CONFIG", self.dir.join("berth.toml")).args(args).output().expect("run berth")
    }

    fn create(&self, extra: &[&str]) -> Output {
        let layers = self.layers();
        let config = self.dir.join("config.json");
        let mut args = vec!["container", "create", "--job", &self.job, "--user", NOBODY, "--gid", NOBODY, "--groups", "100"];
        args.extend(["--layers", &layers, "--image-config", config.to_str().unwrap(), "--image", "test:1"]);
        args.extend(extra);
        self.berth(&args)
    }

    fn exec(&self, extra: &[&str], shell: &str) -> Output {
        let mut args = vec!["container", "exec", "--job", &self.job];
        args.extend(extra);
        args.extend(["--", "sh", "-c", shell]);
        self.berth(&args)
    }

    fn destroy(&self) -> Output {
        self.berth(&["container", "destroy", "--job", &self.job])
    }

    fn job_dir(&self) -> PathBuf {
        self.dir.join("rt").join(&self.job)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.destroy();
        let rt = self.dir.join("rt");
        let _ = nix::mount::umount2(&rt, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn text(out: &Output) -> String {
    stdout_ok(out)
}

fn mounts_mentioning(path: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(path.to_str().unwrap()))
        .map(String::from)
        .collect()
}

#[test]
fn task_sees_the_images_os_release_not_the_hosts() {
    let f = Fixture::new("osrelease");
    text(&f.create(&[]));
    let out = text(&f.exec(&[], "cat /etc/os-release; pwd"));
    assert!(out.contains("ID=berthtest\n"), "{out}");
    assert!(!out.contains("ID=debian"), "{out}");
    assert!(out.ends_with("/work\n"), "the image's WorkingDir: {out}");
}

#[test]
fn every_mount_is_nosuid_nodev_except_device_nodes() {
    let f = Fixture::new("mounts");
    text(&f.create(&[]));
    let info = text(&f.exec(&[], "cat /proc/self/mountinfo"));
    let mut seen = Vec::new();
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (target, options) = (fields[4], fields[5]);
        seen.push(target.to_string());
        assert!(options.split(',').any(|o| o == "nosuid"), "{target} lacks nosuid: {line}");
        let device = target == "/dev/pts" || ["null", "zero", "full", "random", "urandom", "tty"].iter().any(|d| target == format!("/dev/{d}"));
        if !device {
            assert!(options.split(',').any(|o| o == "nodev"), "{target} lacks nodev: {line}");
        }
        if target == "/sys" {
            assert!(options.starts_with("ro"), "/sys must be read-only: {line}");
        }
    }
    for wanted in ["/", "/proc", "/sys", "/dev", "/dev/null", "/dev/pts", "/dev/shm", "/tmp"] {
        assert!(seen.iter().any(|s| s == wanted), "{wanted} is not mounted: {seen:?}");
    }
    let out = text(&f.exec(&[], "echo ok > /dev/null && cat /dev/null && echo devices-work"));
    assert_eq!(out, "devices-work\n");
}

#[test]
fn task_runs_as_the_job_user_with_no_capabilities_and_no_new_privs() {
    let f = Fixture::new("creds");
    text(&f.create(&[]));
    let status = text(&f.exec(&[], "cat /proc/self/status"));
    let field = |name: &str| -> String {
        status.lines().find(|l| l.starts_with(&format!("{name}:"))).unwrap_or_else(|| panic!("{name} missing")).split_whitespace().skip(1).collect::<Vec<_>>().join(" ")
    };
    assert_eq!(field("Uid"), "65534 65534 65534 65534");
    assert_eq!(field("Gid"), "65534 65534 65534 65534");
    assert_eq!(field("Groups"), "100");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(cap), "0000000000000000", "{cap}");
    }
    assert_eq!(field("NoNewPrivs"), "1");
}

#[test]
fn a_setuid_binary_in_the_image_gains_nothing() {
    let f = Fixture::new("setuid");
    // The test program does gain root outside a container: the check below can fail.
    let host = Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
        .arg(f.dir.join("l1/usr/local/bin/showeuid"))
        .output()
        .unwrap();
    assert_eq!(text(&host), "euid=0\n");
    text(&f.create(&[]));
    assert_eq!(text(&f.exec(&[], "showeuid")), "euid=65534\n");
}

#[test]
fn host_file_descriptors_do_not_leak_into_the_container() {
    let f = Fixture::new("fds");
    text(&f.create(&[]));
    let cmd = format!(
        "exec 7</etc/hostname 9</etc/passwd; BERTH_CONFIG={} {} container exec --job {} -- ls /proc/self/fd",
        f.dir.join("berth.toml").display(),
        berth_binary().display(),
        f.job
    );
    let out = text(&Command::new("bash").args(["-c", &cmd]).output().unwrap());
    let fds: Vec<&str> = out.split_whitespace().collect();
    // 0-2, plus the directory ls itself is reading.
    assert!(fds.len() <= 4 && !fds.contains(&"7") && !fds.contains(&"9"), "{fds:?}");
}

#[test]
fn a_forbidden_user_mount_is_refused_with_a_clear_error() {
    let f = Fixture::new("forbidden");
    let secret = f.dir.join("secret");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o700)).unwrap();
    let spec = format!("{}:/secret", secret.display());
    let out = f.create(&["--mount", &spec]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("berth: user 65534 may not read "), "{err}");
    assert!(err.contains("secret") && err.trim_end().lines().count() == 1, "{err}");
    assert!(!f.job_dir().join("node").exists(), "a refused create leaves no container");
}

#[test]
fn allowed_user_mounts_appear_read_only_when_asked() {
    let f = Fixture::new("usermount");
    let data = f.dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("hello"), "from host\n").unwrap();
    std::fs::set_permissions(&f.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let spec = format!("{}:/in/data:ro", data.display());
    text(&f.create(&["--mount", &spec]));
    let out = text(&f.exec(&[], "cat /in/data/hello; grep ' /in/data ' /proc/self/mountinfo; touch /in/data/x 2>&1 || echo refused"));
    assert!(out.starts_with("from host\n"), "{out}");
    assert!(out.contains(" /in/data ro,nosuid,nodev"), "{out}");
    assert!(out.trim_end().ends_with("refused"), "{out}");
    assert!(!f.dir.join("l0/in").exists(), "mount points go to the upper dir");
}

#[test]
fn mount_points_the_image_lacks_are_made_in_the_upper_dir() {
    let f = Fixture::new("upper");
    text(&f.create(&[]));
    for layer in ["l0", "l1"] {
        for dir in ["proc", "sys", "dev", "tmp"] {
            assert!(!f.dir.join(layer).join(dir).exists(), "{layer}/{dir} was created in a shared layer");
        }
    }
    for dir in ["proc", "sys", "dev", "tmp"] {
        assert!(f.job_dir().join("node/upper").join(dir).is_dir(), "upper/{dir}");
    }
}

#[test]
fn per_node_container_is_shared_across_two_steps() {
    let f = Fixture::new("pernode");
    let first: serde_json::Value = serde_json::from_str(&text(&f.create(&[]))).unwrap();
    assert_eq!(first["reused"], false);
    let ns1 = text(&f.exec(&[], "echo step1 > /scratch/mark; readlink /proc/self/ns/mnt"));
    let second: serde_json::Value = serde_json::from_str(&text(&f.create(&[]))).unwrap();
    assert_eq!(second["reused"], true);
    let ns2 = text(&f.exec(&[], "cat /scratch/mark; readlink /proc/self/ns/mnt"));
    assert_eq!(ns2, format!("step1\n{ns1}"));
}

#[test]
fn concurrent_creates_of_one_job_build_one_container() {
    let f = Fixture::new("concurrent");
    let children: Vec<_> = (0..4)
        .map(|_| {
            let layers = f.layers();
            Command::new(berth_binary())
                .env("BERTH_CONFIG", f.dir.join("berth.toml"))
                .args(["container", "create", "--job", &f.job, "--user", NOBODY, "--gid", NOBODY, "--layers", &layers])
                .output()
        })
        .collect();
    let reused: Vec<bool> = children
        .into_iter()
        .map(|c| serde_json::from_str::<serde_json::Value>(&text(&c.unwrap())).unwrap()["reused"].as_bool().unwrap())
        .collect();
    assert_eq!(reused.iter().filter(|r| !**r).count(), 1, "{reused:?}");
}

#[test]
fn per_rank_containers_are_separate() {
    let f = Fixture::new("perrank");
    let a: serde_json::Value = serde_json::from_str(&text(&f.create(&["--rank", "0"]))).unwrap();
    let b: serde_json::Value = serde_json::from_str(&text(&f.create(&["--rank", "1"]))).unwrap();
    assert_eq!(a["name"], "rank-0");
    assert_eq!(b["reused"], false);
    let ns0 = text(&f.exec(&["--rank", "0"], "echo zero > /scratch/mine; readlink /proc/self/ns/mnt"));
    let ns1 = text(&f.exec(&["--rank", "1"], "cat /scratch/mine 2>/dev/null || echo absent; readlink /proc/self/ns/mnt"));
    assert!(ns1.starts_with("absent\n"), "{ns1}");
    assert_ne!(ns0.lines().last(), ns1.lines().last());
    assert!(f.job_dir().join("rank-0/upper/scratch/mine").exists());
    assert!(!f.job_dir().join("rank-1/upper/scratch/mine").exists());
}

#[test]
fn destroy_leaves_nothing_and_can_run_twice() {
    let f = Fixture::new("destroy");
    text(&f.create(&[]));
    text(&f.create(&["--rank", "3"]));
    // A process that outlives its step, as a daemon a task left behind would.
    let pid = text(&f.exec(&[], "sleep 300 </dev/null >/dev/null 2>&1 & echo $!"));
    let ns = std::fs::read_link(format!("/proc/{}/ns/mnt", pid.trim())).unwrap();
    let list = text(&f.berth(&["container", "list", "--json"]));
    assert!(list.contains("\"processes\":1"), "{list}");
    assert!(!mounts_mentioning(&f.job_dir()).is_empty());
    let done: serde_json::Value = serde_json::from_str(&text(&f.destroy())).unwrap();
    assert_eq!(done["containers"], 2);
    assert!(done["killed"].as_u64().unwrap() >= 1, "{done}");
    assert!(mounts_mentioning(&f.job_dir()).is_empty(), "{:?}", mounts_mentioning(&f.job_dir()));
    assert!(!f.job_dir().exists());
    let pid = pid.trim();
    // Gone, or a zombie waiting for an init that does not reap (it runs nothing).
    let state = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    assert!(state.is_empty() || state.contains("State:\tZ"), "process {pid} of the container survived: {state}");
    let in_ns: Vec<_> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| std::fs::read_link(e.path().join("ns/mnt")).map(|l| l == ns).unwrap_or(false))
        .map(|e| e.file_name())
        .collect();
    assert!(in_ns.is_empty(), "processes left in the container's namespace: {in_ns:?}");
    let again: serde_json::Value = serde_json::from_str(&text(&f.destroy())).unwrap();
    assert_eq!(again["containers"], 0);
}

#[test]
fn destroy_without_create_succeeds() {
    let f = Fixture::new("nocreate");
    let out: serde_json::Value = serde_json::from_str(&text(&f.berth(&["container", "destroy", "--job", "777"]))).unwrap();
    assert_eq!(out["containers"], 0);
}

#[test]
fn exec_into_a_missing_container_says_what_to_do() {
    let f = Fixture::new("missing");
    let out = f.exec(&[], "true");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`berth container create` has not run"), "{err}");
}

#[test]
fn job_environment_keeps_scheduler_variables_over_the_images() {
    let f = Fixture::new("env");
    text(&f.create(&["--env", "FROM_CREATE=1"]));
    let out = Command::new(berth_binary())
        .env("BERTH_CONFIG", f.dir.join("berth.toml"))
        .env("SLURM_JOB_ID", "1001")
        .env("PATH", "/host/only")
        .args(["container", "exec", "--job", &f.job, "--env", "LATE=2", "--", "env"])
        .output()
        .unwrap();
    let env = text(&out);
    for want in ["SLURM_JOB_ID=1001", "PATH=/usr/local/bin:/bin", "IMG=yes", "FROM_CREATE=1", "LATE=2"] {
        assert!(env.lines().any(|l| l == want), "{want} missing in {env}");
    }
}

#[test]
fn berth_run_honours_the_image_config_and_returns_the_exit_status() {
    let f = Fixture::new("run");
    let image = f.dir.join("l0");
    let upper = f.dir.join("l1");
    let config = f.dir.join("config.json");
    let run = |args: &[&str]| {
        let mut all = vec!["run", image.to_str().unwrap(), "--layers", upper.to_str().unwrap(), "--image-config", config.to_str().unwrap()];
        all.extend(args);
        f.berth(&all)
    };
    assert_eq!(text(&run(&[])), "default-cmd\n/work\n");
    let out = run(&["--env", "X=1", "--workdir", "/etc", "--", "sh", "-c", "echo $X $IMG; pwd; exit 3"]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1 yes\n/etc\n");
    let out = run(&["--readonly", "--", "sh", "-c", "touch /scratch/x 2>/dev/null || echo read-only"]);
    assert_eq!(text(&out), "read-only\n");
    let out = run(&["--", "nosuchprogram"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&out.stderr).contains("'nosuchprogram' not found"));
    let rt = f.dir.join("rt");
    let left: Vec<_> = std::fs::read_dir(&rt).map(|d| d.filter_map(|e| e.ok()).filter(|e| e.path().is_dir()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "berth run left {left:?}");
}

/// A job on one of the cluster's compute hosts, run with this workspace's berth and a
/// config that trusts the cluster's plain-HTTP registry; destroyed on drop.
struct NodeJob {
    node: String,
    job: String,
    config: PathBuf,
    image: String,
}

impl NodeJob {
    fn new(test: &str) -> NodeJob {
        let cluster = cluster();
        let registry = cluster.registry();
        let config = std::env::temp_dir().join(format!("berth-e2e-node-{test}-{}.toml", std::process::id()));
        std::fs::write(&config, format!("insecure_registries = [\"{registry}\"]\n")).unwrap();
        NodeJob {
            node: cluster.nodes()[0].clone(),
            job: format!("e2e-{test}-{}", std::process::id()),
            config,
            image: format!("{registry}/minimal:latest"),
        }
    }

    /// Runs a shell line as root on the node, with `$B` the berth command and `$J` the job.
    fn sh(&self, script: &str) -> Output {
        let prefix = format!("export BERTH_CONFIG={} J={}; B={};", self.config.display(), self.job, berth_binary().display());
        cluster().on_node(&self.node, &format!("{prefix} {script}"))
    }
}

impl Drop for NodeJob {
    fn drop(&mut self) {
        let _ = self.sh("$B container destroy --job $J");
        let _ = std::fs::remove_file(&self.config);
    }
}

#[test]
fn on_a_node_a_task_sees_the_image_as_the_job_user_with_nothing_more() {
    let job = NodeJob::new("image");
    let user = &cluster().users()[0];
    let out = text(&job.sh(&format!(
        "$B container create --job $J --user {user} --image {} >/dev/null && \
         $B container exec --job $J -- sh -c 'cat /etc/os-release; id -u; id -G; grep -E \"^(CapEff|CapBnd|NoNewPrivs)\" /proc/self/status; \
         grep -c -v nosuid /proc/self/mountinfo || true'",
        job.image
    )));
    let node_os = text(&job.sh("cat /etc/os-release"));
    assert!(out.contains("berth minimal"), "{out}");
    assert!(!node_os.contains("berth minimal"), "the node runs its own OS: {node_os}");
    let uid = text(&job.sh(&format!("id -u {user}")));
    let gids = text(&job.sh(&format!("id -G {user}")));
    assert!(out.contains(&format!("\n{uid}{gids}")), "uid and groups of {user}: {out}");
    assert!(out.contains("CapEff:\t0000000000000000\nCapBnd:\t0000000000000000\nNoNewPrivs:\t1\n"), "{out}");
    assert!(out.ends_with("\n0\n"), "every mount nosuid: {out}");
    // The job user's home is bound in (the admin default), nosuid,nodev.
    let home = text(&job.sh(&format!("$B container exec --job $J -- grep ' /home/{user} ' /proc/self/mountinfo")));
    assert!(home.split(' ').nth(5).is_some_and(|o| o.starts_with("rw,nosuid,nodev")), "{home}");
    // The image has no /proc, /sys or /dev: they were made in the upper dir only.
    let made = text(&job.sh("ls -d /var/lib/berth/layers/*/*/proc /var/lib/berth/layers/*/*/dev 2>/dev/null | wc -l; ls -d /run/berth/$J/node/upper/proc"));
    assert_eq!(made, format!("0\n/run/berth/{}/node/upper/proc\n", job.job));
}

#[test]
fn on_a_node_steps_share_the_container_and_ranks_get_their_own() {
    let job = NodeJob::new("sharing");
    let create = format!("$B container create --job $J --user {} --image {}", cluster().users()[0], job.image);
    let out = text(&job.sh(&format!(
        "{create} >/dev/null && $B container exec --job $J -- sh -c 'echo step1 > /tmp/mark' && \
         {create} && $B container exec --job $J -- cat /tmp/mark && \
         {create} --rank 0 >/dev/null && {create} --rank 1 >/dev/null && \
         $B container exec --job $J --rank 0 -- sh -c 'echo r0 > /tmp/mine' && \
         $B container exec --job $J --rank 1 -- sh -c 'cat /tmp/mine 2>/dev/null || echo rank1-separate' && \
         $B container exec --job $J --rank 0 -- readlink /proc/self/ns/mnt && \
         $B container exec --job $J --rank 1 -- readlink /proc/self/ns/mnt"
    )));
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].contains("\"reused\":true"), "{out}");
    assert_eq!(lines[1], "step1");
    assert_eq!(lines[2], "rank1-separate");
    assert_ne!(lines[3], lines[4], "ranks in different mount namespaces");
}

#[test]
fn on_a_node_destroy_leaves_nothing_and_runs_twice() {
    let job = NodeJob::new("teardown");
    let out = text(&job.sh(&format!(
        "$B container create --job $J --user {} --image {} >/dev/null && \
         pid=$($B container exec --job $J -- sh -c 'sleep 300 </dev/null >/dev/null 2>&1 & echo $!') && \
         ns=$(readlink /proc/$pid/ns/mnt) && \
         grep -c /run/berth/$J /proc/mounts; \
         $B container destroy --job $J; $B container destroy --job $J; \
         grep -c /run/berth/$J /proc/mounts; ls /run/berth/$J 2>&1 | grep -c 'No such'; \
         st=$(awk '/^State:/ {{print $2}}' /proc/$pid/status 2>/dev/null); \
         [ -n \"$st\" ] && [ \"$st\" != Z ] && echo alive || echo gone; \
         for p in /proc/[0-9]*; do readlink $p/ns/mnt; done 2>/dev/null | grep -c \"$ns\" || true",
        cluster().users()[0],
        job.image
    )));
    let lines: Vec<&str> = out.lines().collect();
    // The pin is the only host mount (none when the kernel refused the bind and an
    // anchor process holds the namespace instead; destroy then kills it too).
    assert!(lines[0] == "1" || lines[0] == "0", "{out}");
    assert!(lines[1].contains("\"containers\":1") && !lines[1].contains("\"killed\":0"), "{out}");
    assert!(lines[2].contains("\"containers\":0"), "{out}");
    assert_eq!(&lines[3..], ["0", "1", "gone", "0"], "no mount, no dir, no process left: {out}");
}

#[test]
fn a_plain_user_runs_an_image_rootless() {
    let f = Fixture::new("rootless");
    let image = f.dir.join("l0");
    let upper = f.dir.join("l1");
    let config = f.dir.join("config.json");
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", "env", "-i", "PATH=/usr/bin:/bin"])
            .arg(format!("BERTH_CONFIG={}", f.dir.join("berth.toml").display()))
            .arg(berth_binary())
            .args(["run", image.to_str().unwrap(), "--layers", upper.to_str().unwrap(), "--image-config", config.to_str().unwrap()])
            .args(args)
            .current_dir("/")
            .output()
            .unwrap()
    };
    let out = text(&as_nobody(&[
        "--",
        "sh",
        "-c",
        "cat /etc/os-release; id -u; showeuid; grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; \
         grep -c -v nosuid /proc/self/mountinfo; echo w > /tmp/f && cat /tmp/f",
    ]));
    assert!(out.starts_with("NAME=\"berth test\"\nID=berthtest\n65534\neuid=65534\n"), "{out}");
    assert!(out.ends_with("CapEff:\t0000000000000000\nCapBnd:\t0000000000000000\nNoNewPrivs:\t1\n0\nw\n"), "{out}");
    let out = as_nobody(&["--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    let out = as_nobody(&["--mount", "/root:/r", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("berth: user 65534 may not read /root"), "{err}");
}

#[test]
fn a_plain_user_pulls_into_a_store_of_their_own_and_runs_rootless() {
    let registry = cluster().registry();
    let f = Fixture::new("rootless-store");
    let store = f.dir.join("store");
    std::fs::create_dir(&store).unwrap();
    std::os::unix::fs::chown(&store, Some(65534), Some(65534)).unwrap();
    std::fs::write(
        f.dir.join("berth.toml"),
        format!("insecure_registries = [\"{registry}\"]\nstore_dir = \"{}\"\nmount_home = false\n", store.display()),
    )
    .unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", "env", "-i", "PATH=/usr/bin:/bin"])
        .arg(format!("BERTH_CONFIG={}", f.dir.join("berth.toml").display()))
        .arg(berth_binary())
        .args(["run", &format!("{registry}/minimal:latest"), "--", "sh", "-c"])
        .arg("head -1 /etc/os-release; id -u; echo kept > /etc/new && cat /etc/new")
        .current_dir("/")
        .output()
        .unwrap();
    assert_eq!(text(&out), "NAME=\"berth minimal\"\n65534\nkept\n");
    let owned = std::fs::read_dir(store.join("layers/sha256")).unwrap().count();
    assert!(owned >= 1, "the image was unpacked into the user's store");
}

#[test]
fn site_mounts_devices_host_name_and_ipc_namespace_are_as_configured() {
    let f = Fixture::new("configured");
    let site = f.dir.join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("tool"), "site tool\n").unwrap();
    let config = std::fs::read_to_string(f.dir.join("berth.toml")).unwrap();
    std::fs::write(
        f.dir.join("berth.toml"),
        format!("{config}[[site_mounts]]\nsource = \"{}\"\ntarget = \"/opt/site\"\nread_only = true\n", site.display()),
    )
    .unwrap();
    text(&f.create(&["--hostname", "c1", "--ipc", "--device", "/dev/loop-control"]));
    let out = text(&f.exec(
        &[],
        "cat /opt/site/tool; grep ' /opt/site ' /proc/self/mountinfo | cut -d' ' -f6; hostname; \
         test -c /dev/loop-control && echo device; readlink /proc/self/ns/ipc",
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..4], ["site tool", "ro,nosuid,nodev,relatime", "c1", "device"], "{out}");
    let host_ipc = std::fs::read_link("/proc/self/ns/ipc").unwrap();
    assert_ne!(Path::new(lines[4]), host_ipc, "own IPC namespace");
    let host_name = nix::unistd::gethostname().unwrap();
    assert_ne!(host_name, "c1", "the host keeps its name");
    let pins: Vec<String> = ["mnt", "uts", "ipc"].iter().map(|p| f.job_dir().join("node").join(p).display().to_string()).collect();
    assert_eq!(mounts_mentioning(&f.job_dir()).len(), 3, "three pins");
    text(&f.destroy());
    for pin in pins {
        assert!(mounts_mentioning(Path::new(&pin)).is_empty(), "{pin} still mounted");
    }
}

#[test]
fn with_remap_user_the_images_user_or_root_is_mapped_to_the_job_user() {
    let f = Fixture::new("remap");
    // Off (the fixture's config): root is refused with one line saying who can allow it.
    let out = f.create(&[]);
    stdout_ok(&out);
    let out = f.exec(&["--remap-root"], "id -u");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("does not allow running as root") && err.contains("remap_user"), "{err}");
    stdout_ok(&f.destroy());

    let toml = f.dir.join("berth.toml");
    let mut settings = std::fs::read_to_string(&toml).unwrap();
    settings.push_str("remap_user = true\n");
    std::fs::write(&toml, settings).unwrap();
    let config = f.dir.join("config-user.json");
    std::fs::write(&config, r#"{"config":{"Env":["PATH=/usr/local/bin:/bin"],"User":"4242:4343"}}"#).unwrap();
    let layers = f.layers();
    stdout_ok(&f.berth(&[
        "container", "create", "--job", &f.job, "--user", NOBODY, "--gid", NOBODY,
        "--layers", &layers, "--image-config", config.to_str().unwrap(),
    ]));
    // The image's USER inside; the job user (nobody) outside, and a setuid binary gains nothing.
    let out = text(&f.exec(&[], "id -u; id -g; cat /proc/self/uid_map; showeuid; touch /scratch/mine"));
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(words, ["4242", "4343", "4242", NOBODY, "1", "euid=4242"], "{out}");
    let scratch = f.job_dir().join("node");
    let owner = Command::new("sh")
        .arg("-c")
        .arg(format!("find {} -name mine -path '*upper*' -exec stat -c %u {{}} +", scratch.display()))
        .output()
        .unwrap();
    assert_eq!(text(&owner).trim(), NOBODY, "a file made inside must belong to the job user on the host");
    // Root on request, still nobody on the host, with no way to the host's privileges.
    let out = text(&f.exec(&["--remap-root"], "id -u; cat /proc/self/uid_map; cat /proc/1/environ >/dev/null 2>&1 || echo denied"));
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(words, ["0", "0", NOBODY, "1", "denied"], "{out}");
}
