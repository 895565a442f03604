//! Escapes: what a hostile image author or job user tries in order to reach the host
//! or another user's job, and berth refusing it. Each test builds its image here
//! (layers as tar streams, written into an OCI layout and pushed to the test cluster's
//! registry under a unique name), pulls it with `berth pull` or `container create
//! --image`, and checks the host afterwards. Runs as root in this machine's root
//! namespace, which reaches the registry directly; tests named `on_a_node_` use the
//! cluster's compute hosts. docs/security.md says which boundary each one guards.

use berth_e2e::{berth_binary, cluster, push_image, stdout_ok};
use berth_testkit::{digest, tar_of, Entry as E, Image};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const NOBODY: &str = "65534";

/// busybox-static with the applets the tests use, /etc/passwd with root only, and
/// /tmp and /var/tmp world-writable as in most distributions' images.
fn busybox_layer() -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static is installed");
    let applets = [
        "sh", "cat", "id", "ls", "echo", "readlink", "pwd", "touch", "sleep", "stat", "grep", "test", "mkdir", "seq", "head", "true", "env", "wc",
    ];
    let links: Vec<String> = applets.iter().map(|a| format!("bin/{a}")).collect();
    let mut entries = vec![E::Dir("bin/", 0o755), E::Dir("etc/", 0o755), E::Dir("work/", 0o755), E::Dir("var/", 0o755), E::Dir("var/tmp/", 0o1777)];
    entries.push(E::File("bin/busybox", &busybox, 0o755));
    entries.extend(links.iter().map(|l| E::Symlink(l, "busybox")));
    entries.push(E::File("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644));
    tar_of(&entries)
}

/// A scratch dir with a store, a runtime dir, an admin config naming the cluster's
/// registry, and a job id; destroys the job and removes everything on drop.
struct Lab {
    dir: PathBuf,
    registry: String,
    job: String,
}

impl Lab {
    fn new(name: &str) -> Lab {
        assert!(nix::unistd::geteuid().is_root(), "these tests run as root");
        let registry = cluster().registry();
        let dir = std::env::temp_dir().join(format!("berth-escapes-{name}-{}", std::process::id()));
        let _ = Command::new("rm").arg("-rf").arg(&dir).status();
        std::fs::create_dir_all(dir.join("outside")).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let lab = Lab { dir, registry, job: format!("esc-{name}-{}", std::process::id()) };
        lab.write_config("");
        lab
    }

    /// The admin config, with `extra` TOML appended.
    fn write_config(&self, extra: &str) {
        std::fs::write(
            self.dir.join("berth.toml"),
            format!(
                "store_dir = \"{}\"\nruntime_dir = \"{}\"\ninsecure_registries = [\"{}\"]\nmount_home = false\n{extra}",
                self.dir.join("store").display(),
                self.dir.join("rt").display(),
                self.registry
            ),
        )
        .unwrap();
    }

    fn outside(&self) -> PathBuf {
        self.dir.join("outside")
    }

    fn berth(&self, args: &[&str]) -> Output {
        Command::new(berth_binary()).args(args).env("BERTH_CONFIG", self.dir.join("berth.toml")).output().expect("run berth")
    }

    /// Pushes an image of `layers` (gzip-compressed) whose config runs with `config` as
    /// `escapes-<name>-<pid>:latest`; returns the reference.
    fn push(&self, name: &str, layers: &[Vec<u8>], config: serde_json::Value) -> String {
        push_image(&Image::gzip(layers, config), &format!("escapes-{name}-{}:latest", std::process::id()))
    }

    /// `container create` of this lab's job as nobody (groups 100), with `extra` flags.
    fn create(&self, image: &str, extra: &[&str]) -> Output {
        let mut args = vec!["container", "create", "--job", &self.job, "--user", NOBODY, "--gid", NOBODY, "--groups", "100", "--image", image];
        args.extend(extra);
        self.berth(&args)
    }

    fn exec(&self, shell: &str) -> Output {
        self.berth(&["container", "exec", "--job", &self.job, "--", "sh", "-c", shell])
    }

    fn destroy(&self) {
        let _ = self.berth(&["container", "destroy", "--job", &self.job]);
    }

    /// The unpacked layer dir (in the store) holding `rel`.
    fn layer_with(&self, rel: &str) -> PathBuf {
        let layers = self.dir.join("store/layers/sha256");
        std::fs::read_dir(&layers)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|d| d.join(rel).symlink_metadata().is_ok())
            .unwrap_or_else(|| panic!("no layer in {} has {rel}", layers.display()))
    }

    fn assert_outside_untouched(&self) {
        let left: Vec<_> = std::fs::read_dir(self.outside()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "something was written outside: {left:?}");
        let mounted = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounted.contains(self.outside().to_str().unwrap()), "a mount landed on the host: {mounted}");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.destroy();
        let _ = nix::mount::umount2(&self.dir.join("rt"), nix::mount::MntFlags::MNT_DETACH);
        let _ = Command::new("rm").arg("-rf").arg(&self.dir).status();
    }
}

/// The one stderr line of a command that must fail.
fn one_error_line(out: &Output) -> String {
    assert!(!out.status.success(), "should have failed; stdout: {}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    assert_eq!(err.lines().count(), 1, "one error line: {err}");
    assert!(err.starts_with("berth: "), "{err}");
    err
}

#[test]
fn pulled_layers_that_reach_outside_their_dir_are_refused_and_write_nothing() {
    let lab = Lab::new("pull");
    let outside = lab.outside();
    let abs = format!("{}/abs", outside.display());
    // The layer is unpacked in <store>/tmp/<dir>/: three levels up is the lab's dir.
    let shadow_links = std::fs::metadata("/etc/shadow").unwrap().nlink();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("dotdot", tar_of(&[E::File("../../../outside/dotdot", b"x", 0o644)])),
        ("absolute", tar_of(&[E::File(&abs, b"x", 0o644)])),
        ("write-through-symlink", tar_of(&[E::Symlink("l", outside.to_str().unwrap()), E::File("l/through", b"x", 0o644)])),
        ("dir-through-symlink", tar_of(&[E::Symlink("l", "../../../outside"), E::Dir("l/made/", 0o755)])),
        ("hardlink-to-host-file", tar_of(&[E::HardLink("shadow", "/etc/shadow")])),
        ("hardlink-dotdot", tar_of(&[E::HardLink("shadow", "../../../../../../etc/shadow")])),
        ("hardlink-through-symlink", tar_of(&[E::Symlink("etc", "/etc"), E::HardLink("shadow", "etc/shadow")])),
        ("whiteout-through-symlink", tar_of(&[E::Symlink("l", outside.to_str().unwrap()), E::File("l/.wh.victim", b"", 0o644)])),
    ];
    for (name, tar) in cases {
        let image = lab.push(name, &[busybox_layer(), tar], serde_json::json!({}));
        let err = one_error_line(&lab.berth(&["pull", "--quiet", &image]));
        assert!(err.contains("hostile layer: entry '"), "{name}: {err}");
        lab.assert_outside_untouched();
        assert_eq!(std::fs::metadata("/etc/shadow").unwrap().nlink(), shadow_links, "{name} linked /etc/shadow");
        let tmp: Vec<_> = std::fs::read_dir(lab.dir.join("store/tmp")).unwrap().collect();
        assert!(tmp.is_empty(), "{name} left {tmp:?} in the store's tmp");
    }
    // Across layers: a symlink in one layer, a write "through" it in the next lands in
    // the upper layer's own dir, in the store and in an export alike.
    let image = lab.push("two-layers", &[busybox_layer(), tar_of(&[E::Symlink("l", outside.to_str().unwrap())]), tar_of(&[E::Dir("l/", 0o755), E::File("l/x", b"in", 0o644)])], serde_json::json!({}));
    stdout_ok(&lab.berth(&["pull", "--quiet", &image]));
    let export = lab.dir.join("export");
    stdout_ok(&lab.berth(&["export", &image, export.to_str().unwrap()]));
    assert_eq!(std::fs::read(export.join("l/x")).unwrap(), b"in");
    assert!(std::fs::symlink_metadata(export.join("l")).unwrap().is_dir());
    lab.assert_outside_untouched();
}

#[test]
fn pulled_device_nodes_are_dropped_and_very_long_paths_stay_inside() {
    let lab = Lab::new("devices");
    let deep: String = (0..70).map(|i| format!("{i:0>60}/")).collect();
    let tar = tar_of(&[
        E::Char("mem", 1, 1),
        E::Block("sda", 8, 0),
        E::Dir("dev/", 0o755),
        E::Char("dev/kmsg", 1, 11),
        E::File(&format!("{deep}leaf"), b"deep", 0o644),
    ]);
    let image = lab.push("devices", &[busybox_layer(), tar], serde_json::json!({}));
    stdout_ok(&lab.berth(&["pull", "--quiet", &image]));
    let dir = lab.layer_with("dev");
    for node in ["mem", "sda", "dev/kmsg"] {
        assert!(dir.join(node).symlink_metadata().is_err(), "{node} was unpacked");
    }
    let out = Command::new("find").arg(lab.dir.join("store/layers")).args(["-type", "b", "-o", "-type", "c", "-o", "-name", "leaf", "-type", "f"]).output().unwrap();
    let found = stdout_ok(&out);
    assert_eq!(found.lines().count(), 1, "only the deep file, no device: {found}");
    assert!(found.trim_end().ends_with(&format!("{deep}leaf")) && found.starts_with(dir.to_str().unwrap()), "{found}");
    let err = one_error_line(&lab.berth(&["pull", "--quiet", &lab.push("longname", &[tar_of(&[E::File(&"n".repeat(300), b"", 0o644)])], serde_json::json!({}))]));
    assert!(err.contains("File name too long"), "{err}");
    lab.assert_outside_untouched();
}

/// A vfs_cap_data v2 value granting `caps` permitted and effective.
fn file_capability(caps: u32) -> Vec<u8> {
    let mut v = Vec::new();
    for word in [0x0200_0001u32, caps, 0, 0, 0] {
        v.extend_from_slice(&word.to_le_bytes());
    }
    v
}

#[test]
fn setuid_setgid_file_capabilities_and_the_images_root_user_gain_nothing() {
    let lab = Lab::new("privs");
    // Not busybox: it drops a setuid privilege by itself for most applets.
    let source = lab.dir.join("status.c");
    std::fs::write(&source, "#include <stdio.h>\nint main(void){FILE*f=fopen(\"/proc/self/status\",\"r\");int c;while((c=fgetc(f))!=EOF)putchar(c);return 0;}\n").unwrap();
    let program = lab.dir.join("status");
    let cc = Command::new("cc").args(["-static", "-O2", "-o"]).arg(&program).arg(&source).output().expect("run cc");
    assert!(cc.status.success(), "cc: {}", String::from_utf8_lossy(&cc.stderr));
    let status = std::fs::read(&program).unwrap();
    // cap_dac_override (1), cap_setuid (7), cap_sys_admin (21).
    let caps = file_capability((1 << 1) | (1 << 7) | (1 << 21));
    let tar = tar_of(&[
        E::Dir("priv/", 0o755),
        E::Dir("priv/suid/", 0o755),
        E::Dir("priv/sgid/", 0o755),
        E::Dir("priv/caps/", 0o755),
        E::File("priv/suid/status", &status, 0o4755),
        E::File("priv/sgid/status", &status, 0o2755),
        E::Pax(&[("SCHILY.xattr.security.capability", &caps)]),
        E::File("priv/caps/status", &status, 0o755),
    ]);
    let image = lab.push("privs", &[busybox_layer(), tar], serde_json::json!({"User": "0:0", "WorkingDir": "/work"}));
    stdout_ok(&lab.create(&image, &[]));
    // Outside a container the same files do grant privilege: the checks below can fail.
    let dir = lab.layer_with("priv/caps/status");
    let on_host = |program: &str| {
        stdout_ok(&Command::new("setpriv").args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"]).arg(dir.join(program)).output().unwrap())
    };
    let field = |status: &str, name: &str| status.lines().find(|l| l.starts_with(&format!("{name}:"))).unwrap_or_default().split_whitespace().skip(1).collect::<Vec<_>>().join(" ");
    assert_eq!(field(&on_host("priv/suid/status"), "Uid"), "65534 0 0 0");
    assert_eq!(field(&on_host("priv/sgid/status"), "Gid"), "65534 0 0 0");
    assert_ne!(field(&on_host("priv/caps/status"), "CapEff"), "0000000000000000");
    for program in ["priv/suid/status", "priv/sgid/status", "priv/caps/status"] {
        let status = stdout_ok(&lab.berth(&["container", "exec", "--job", &lab.job, "--", &format!("/{program}")]));
        assert_eq!(field(&status, "Uid"), "65534 65534 65534 65534", "{program}");
        assert_eq!(field(&status, "Gid"), "65534 65534 65534 65534", "{program}");
        for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(field(&status, cap), "0000000000000000", "{program} {cap}");
        }
    }
    assert_eq!(stdout_ok(&lab.exec("id -u; id -g")), "65534\n65534\n", "the image's User 0:0 is ignored");
}

#[test]
fn mount_targets_that_are_symlinks_in_the_image_stay_inside_the_container() {
    let lab = Lab::new("targets");
    // A host dir the image names in its symlinks, and which the image also has (the
    // container's /tmp is a tmpfs, hence not under /tmp), so each mount has a place to land.
    let outside = PathBuf::from(format!("/var/tmp/berth-escapes-outside-{}", std::process::id()));
    std::fs::create_dir_all(&outside).unwrap();
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _remove = Remove(outside.clone());
    let o = outside.to_str().unwrap();
    let inside_copy = format!("{}/", o.trim_start_matches('/'));
    let up = format!("../../../../../../../..{o}");
    let tar = tar_of(&[
        E::Dir(&inside_copy, 0o755),
        E::Symlink("data", o),
        E::Symlink("rel", &up),
        E::Dir("opt/", 0o755),
        E::Symlink("opt/site", o),
        E::Symlink("wd", o),
    ]);
    let image = lab.push("targets", &[busybox_layer(), tar], serde_json::json!({}));
    let src = lab.dir.join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("marker"), "from src\n").unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o755)).unwrap();
    lab.write_config(&format!("[[site_mounts]]\nsource = \"{}\"\ntarget = \"/opt/site/in\"\nread_only = true\n", src.display()));
    let s = src.display().to_string();
    stdout_ok(&lab.create(&image, &["--mount", &format!("{s}:/data/in"), "--mount", &format!("{s}:/rel/in:ro"), "--workdir", "/wd"]));
    let out = stdout_ok(&lab.exec(&format!("cat /data/in/marker /rel/in/marker /opt/site/in/marker; pwd -P; ls {o}/")));
    assert_eq!(out, format!("from src\nfrom src\nfrom src\n{o}\nin\n"), "the targets resolved inside the container's root");
    lab.destroy();
    assert!(std::fs::read_dir(&outside).unwrap().next().is_none(), "something was made in the host's {o}");
    assert!(!std::fs::read_to_string("/proc/self/mountinfo").unwrap().contains(o), "a mount landed on the host's {o}");
}

#[test]
fn a_symlink_swapped_under_a_mount_target_while_berth_mounts_never_leads_out() {
    let lab = Lab::new("race");
    let image = lab.push("race", &[busybox_layer()], serde_json::json!({}));
    stdout_ok(&lab.berth(&["pull", "--quiet", &image]));
    let src = lab.dir.join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Whoever can write the layer dir (only root: see
    // `a_node_user_cannot_add_files_to_a_shared_layer`) swaps what berth is about to
    // mount on: a dir, then a symlink out, again and again.
    let var_tmp = lab.layer_with("var/tmp");
    let target = var_tmp.join("var/tmp/race");
    let swapper = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while :; do mkdir {t} 2>/dev/null; rmdir {t} 2>/dev/null; ln -s {o} {t} 2>/dev/null; rm -f {t}; done",
            t = target.display(),
            o = lab.outside().display()
        ))
        .spawn()
        .unwrap();
    let mut swapper = scopeguard(swapper);
    let spec = format!("{}:/var/tmp/race/in", src.display());
    let mut built = 0;
    for _ in 0..15 {
        if lab.create(&image, &["--mount", &spec]).status.success() {
            built += 1;
        }
        lab.destroy();
        lab.assert_outside_untouched();
    }
    let _ = swapper.0.kill();
    eprintln!("{built} of 15 creates succeeded under the race");
    lab.assert_outside_untouched();
}

#[test]
fn a_node_user_cannot_add_files_to_a_shared_layer() {
    let lab = Lab::new("layer-perms");
    let image = lab.push("layer-perms", &[busybox_layer()], serde_json::json!({}));
    stdout_ok(&lab.berth(&["pull", "--quiet", &image]));
    // The image's /var/tmp is 1777, as in most distributions; the store's layers are not
    // the node users' to enter.
    let var_tmp = lab.layer_with("var/tmp").join("var/tmp");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&var_tmp).unwrap().permissions().mode() & 0o7777, 0o1777, "the image's mode is kept");
    let out = Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", "touch"])
        .arg(var_tmp.join("planted"))
        .output()
        .unwrap();
    assert!(!out.status.success() && !var_tmp.join("planted").exists(), "a node user planted a file in a shared layer");
    for sub in ["layers", "blobs", "tmp"] {
        let mode = std::fs::metadata(lab.dir.join("store").join(sub)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "store/{sub}");
    }
    // Containers still read the layer (overlay reads it as root) and the user still lists images.
    stdout_ok(&lab.create(&image, &[]));
    lab.destroy();
    let list = Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
        .arg(berth_binary())
        .args(["images", "--store"])
        .arg(lab.dir.join("store"))
        .env("BERTH_CONFIG", lab.dir.join("berth.toml"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&list.stdout).contains("escapes-layer-perms"), "{}", String::from_utf8_lossy(&list.stderr));
}

/// Kills a child process when dropped (a test that fails leaves no loop running).
struct Guard(std::process::Child);
fn scopeguard(child: std::process::Child) -> Guard {
    Guard(child)
}
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn no_host_descriptor_or_directory_reaches_a_task() {
    let lab = Lab::new("fds");
    let host_dir = lab.dir.join("hostcwd");
    std::fs::create_dir(&host_dir).unwrap();
    std::fs::write(host_dir.join("host-marker"), "").unwrap();
    let image = lab.push("fds", &[busybox_layer()], serde_json::json!({"WorkingDir": "/work"}));
    // A caller with descriptors open on host dirs and a host working directory (what
    // slurmstepd or a hook could hand over), like CVE-2024-21626's leaked fd.
    let with_fds = |args: &str| -> Output {
        let cmd = format!(
            "cd {h} && exec 3</ 4<{h} 5</etc 6<{h} 7<{h} 8<{h} 9</etc/shadow; BERTH_CONFIG={c} {b} {args}",
            h = host_dir.display(),
            c = lab.dir.join("berth.toml").display(),
            b = berth_binary().display()
        );
        Command::new("bash").args(["-c", &cmd]).output().unwrap()
    };
    stdout_ok(&with_fds(&format!("container create --job {} --user {NOBODY} --image {image}", lab.job)));
    // A hostile entrypoint guessing descriptor numbers and looking for the host's root.
    let probe = "ls /proc/self/fd/ | wc -l; readlink /proc/self/cwd; \
                 for n in $(seq 3 64); do ls /proc/self/fd/$n/ /proc/self/fd/$n/../ 2>/dev/null; done; \
                 ls /proc/1/root/etc/ /proc/1/cwd/ 2>/dev/null; echo end";
    let out = stdout_ok(&with_fds(&format!("container exec --job {} -- sh -c '{probe}'", lab.job)));
    assert!(!out.contains("host-marker") && !out.contains("shadow"), "a host directory was reachable: {out}");
    let lines: Vec<&str> = out.lines().collect();
    // 0, 1, 2 and the one ls reads /proc/self/fd through.
    assert!(lines[0].parse::<u32>().unwrap() <= 4, "{out}");
    assert_eq!(&lines[1..], ["/work", "end"], "{out}");
    lab.destroy();
    // A working directory naming a descriptor: the task never starts in a host dir.
    for n in 3..=9 {
        let created = with_fds(&format!("container create --job {} --user {NOBODY} --image {image} --workdir /proc/self/fd/{n}", lab.job));
        if created.status.success() {
            let out = with_fds(&format!("container exec --job {} -- sh -c 'pwd; ls'", lab.job));
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(!text.contains("host-marker") && !text.contains("passwd"), "workdir fd {n}: {text}");
        }
        lab.destroy();
    }
}

/// A user names one of slurmstepd's descriptors as the task's directory
/// (`--container-workdir=/proc/self/fd/N`, `srun --chdir=/proc/self/fd/N`, an image whose
/// WorkingDir is one; runc's CVE-2024-21626), or another of its magic links (`cwd`,
/// `root`). What the task process holds when the plugin enters the workdir: slurmstepd's
/// log, pipes and sockets, and for a `--mpi=pmix` step the two host dirs of the step's
/// PMIx plugin, detached to be bound in; none of them starts the task in a host dir: it
/// runs in a dir of the container or not at all.
#[test]
fn on_a_node_a_workdir_naming_a_descriptor_of_slurmstepd_never_starts_a_task_in_a_host_dir() {
    let c = cluster();
    let lab = Lab::new("stepfds");
    let node = c.nodes()[0].clone();
    let alice = c.users()[0].clone();
    let image = lab.push("stepfds", &[busybox_layer()], serde_json::json!({"WorkingDir": "/proc/self/fd/7"}));
    // The task's dir is in the container when the path getcwd gives names that same dir
    // there; a dir outside the container's root has no such path.
    let probe = "d=$(pwd -P 2>/dev/null); if test -n \"$d\" && test \"$(stat -c %d:%i .)\" = \"$(stat -c %d:%i \"$d\" 2>/dev/null)\"; \
                 then echo \"IN $d\"; else echo \"OUT $d\"; fi; ls -a";
    // The task's other magic links to host dirs, as root before it joins and as the user after.
    let others = "/proc/self/cwd /proc/self/root /proc/thread-self/cwd /proc/1/cwd /proc/1/root";
    let script = format!(
        "echo JOB=$SLURM_JOB_ID\nfor p in $(seq -f /proc/self/fd/%g 0 63) {others}; do\n  for how in workdir chdir; do\n    echo \"CASE $how $p\"\n    \
         if [ $how = workdir ]; then opt=--container-workdir=$p; else opt=--chdir=$p; fi\n    \
         timeout 60 srun --mpi=pmix $opt --container-image={image} sh -c '{probe}' 2>&1; echo \"rc=$?\"\n  done\ndone\n"
    );
    let name = format!("escapes-stepfds-{}", std::process::id());
    let out = c.run_as(
        &alice,
        &format!("cat > {name}.sh <<'BERTH_EOF'\n{script}BERTH_EOF\ntimeout 600 salloc -N1 -w {node} bash {name}.sh; rc=$?; rm -f {name}.sh; exit $rc"),
    );
    let text = stdout_ok(&out);
    let mut failed = Vec::new();
    let mut ran = 0;
    for case in text.split("CASE ").skip(1) {
        let (what, rest) = case.split_once('\n').unwrap_or((case, ""));
        let lines: Vec<&str> = rest.lines().filter(|l| l.contains("berth: ")).collect();
        if rest.contains("rc=0") {
            ran += 1;
            // In the container (the image's dirs, or the submit dir bound in), in none of
            // slurmstepd's dirs: its log dir, its spool, the PMIx dirs it detached.
            let dir = rest.lines().find_map(|l| l.strip_prefix("IN ")).unwrap_or("");
            let slurmstepds = dir.starts_with("/var/spool/slurmd") || dir.contains("spmix_appdir") || ["slurmd.log", "pmix_dstor"].iter().any(|m| rest.contains(m));
            if !dir.starts_with('/') || slurmstepds {
                failed.push(format!("{what}: the task started in a host dir: {rest:?}"));
            }
        } else if lines.len() != 1 {
            failed.push(format!("{what}: refused without one berth line: {rest:?}"));
        }
    }
    assert_eq!(text.matches("CASE ").count(), 2 * (64 + others.split(' ').count()), "{text}");
    assert!(ran > 0, "no case ran at all (srun --chdir to a missing dir runs in /tmp): {text}");
    assert!(failed.is_empty(), "{failed:#?}");
    berth_e2e::assert_nodes_clean(&c, &berth_e2e::job_of(&text));
}

#[test]
fn user_mounts_are_opened_with_the_users_rights() {
    let lab = Lab::new("usermounts");
    let image = lab.push("usermounts", &[busybox_layer()], serde_json::json!({}));
    let own = lab.dir.join("own");
    std::fs::create_dir(&own).unwrap();
    std::os::unix::fs::symlink("/root", own.join("to-root")).unwrap();
    std::os::unix::fs::chown(&own, Some(65534), Some(65534)).unwrap();
    for source in ["/root".to_string(), "/etc/shadow".into(), own.join("to-root").display().to_string()] {
        let err = one_error_line(&lab.create(&image, &["--mount", &format!("{source}:/x")]));
        assert!(err.starts_with(&format!("berth: user {NOBODY} may not read {source}")), "{err}");
        assert!(!lab.dir.join("rt").join(&lab.job).join("node").exists());
    }
}

#[test]
fn user_mounts_cannot_cover_what_berth_sets_up_or_writes_as_root() {
    let lab = Lab::new("sensitive");
    let image = lab.push("sensitive", &[busybox_layer()], serde_json::json!({}));
    let src = lab.dir.join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), "").unwrap();
    let (d, f) = (src.display().to_string(), src.join("f").display().to_string());
    for (source, target) in [
        (&d, "/proc"),
        (&d, "/proc/sys"),
        (&d, "/sys/fs"),
        (&d, "/dev"),
        (&d, "/dev/shm"),
        (&d, "/"),
        (&d, "/a/../proc"),
        (&d, "/.berth"),
        (&d, "/.berth/wiring"),
        (&f, "/etc/passwd"),
        (&f, "/etc/group"),
        (&f, "/etc/hosts"),
        (&"/etc/hosts".to_string(), "/etc/hosts"),
    ] {
        let err = one_error_line(&lab.create(&image, &["--mount", &format!("{source}:{target}")]));
        assert!(err.contains(&format!("cannot mount {source} at {target}: ")), "{target}: {err}");
    }
    // Devices are opened as root: only device nodes under /dev, never a way around the
    // host's directory modes (/root is 0700).
    for (device, why) in [("/dev/../root/.bashrc", "without '..'"), ("/dev/shm", "not a device node"), ("/etc/passwd", "under /dev")] {
        let err = one_error_line(&lab.create(&image, &["--device", device]));
        assert!(err.contains(&format!("cannot mount {device} at {device}: ")) && err.contains(why), "{device}: {err}");
    }
    // Read-only they are harmless (the Slurm plugin binds the node's /etc/hosts so).
    stdout_ok(&lab.create(&image, &["--mount", "/etc/hosts:/etc/hosts:ro"]));
}

#[test]
fn mount_points_are_never_created_in_host_directories() {
    let lab = Lab::new("hostdirs");
    let image = lab.push("hostdirs", &[busybox_layer()], serde_json::json!({}));
    let file = lab.dir.join("file");
    std::fs::write(&file, "x").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let probe = format!("berth-escape-probe-{}", std::process::id());
    // The job user may read /etc: binding it is fine, but a mount point nested in it
    // would be created on the host's /etc by root.
    let out = lab.create(&image, &["--mount", "/etc:/hostetc", "--mount", &format!("{}:/hostetc/{probe}", file.display())]);
    let created = Path::new("/etc").join(&probe).exists();
    let _ = std::fs::remove_file(Path::new("/etc").join(&probe));
    assert!(!created, "root created /etc/{probe} on the host");
    let err = one_error_line(&out);
    assert!(err.contains(&format!("cannot create the mount point /hostetc/{probe} in the container: /hostetc is bound from the host")), "{err}");
    let dir_probe = lab.create(&image, &["--mount", "/etc:/hostetc", "--mount", &format!("{}:/hostetc/{probe}/sub/file", file.display())]);
    let created = Path::new("/etc").join(&probe).exists();
    let _ = std::fs::remove_dir_all(Path::new("/etc").join(&probe));
    assert!(!created && !dir_probe.status.success(), "root created /etc/{probe}/ on the host");
    // Existing paths inside a bound host dir are fine.
    stdout_ok(&lab.create(&image, &["--mount", "/etc:/hostetc", "--mount", &format!("{}:/hostetc/hostname:ro", file.display())]));
    assert_eq!(stdout_ok(&lab.exec("cat /hostetc/hostname")), "x");
}

#[test]
fn another_user_cannot_read_a_jobs_runtime_dir() {
    let lab = Lab::new("runtime");
    let image = lab.push("runtime", &[busybox_layer()], serde_json::json!({"Env": ["SECRET=in-env"]}));
    stdout_ok(&lab.create(&image, &["--env", "TOKEN=abc"]));
    let job_dir = lab.dir.join("rt").join(&lab.job);
    assert_eq!(std::fs::metadata(&job_dir).unwrap().mode() & 0o777, 0o700);
    for path in [job_dir.clone(), job_dir.join("node/env"), job_dir.join("node/state.json"), job_dir.join("node/upper")] {
        for uid in [NOBODY, "4242"] {
            let out = Command::new("setpriv").args(["--reuid", uid, "--regid", uid, "--clear-groups", "cat"]).arg(&path).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success() && err.contains("Permission denied"), "uid {uid} read {}: {err}", path.display());
        }
    }
}

#[test]
fn a_task_cannot_write_the_host_berth_binary_through_proc_self_exe() {
    let lab = Lab::new("selfexe");
    // The image carries the node's C library so that it can run berth's own binary
    // (/proc/self/exe while berth execs the task), with a preloaded library doing what
    // runc's CVE-2019-5736 exploit did: keep the binary open, wait for berth to exit,
    // reopen it for writing. It only opens; it never writes.
    let evil_c = lab.dir.join("evil.c");
    std::fs::write(
        &evil_c,
        r#"#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
__attribute__((constructor)) static void evil(void) {
    int direct = open("/proc/self/exe", O_WRONLY | O_APPEND);
    printf("direct: %s\n", direct < 0 ? strerror(errno) : "opened");
    int keep = open("/proc/self/exe", O_PATH);
    pid_t parent = getpid();
    fflush(stdout);
    if (fork() == 0) {
        for (int i = 0; i < 500 && getppid() == parent; i++) usleep(10000);
        char path[64];
        snprintf(path, sizeof path, "/proc/self/fd/%d", keep);
        int later = open(path, O_WRONLY | O_APPEND);
        printf("after exit: %s\n", later < 0 ? strerror(errno) : "opened");
        fflush(stdout);
        _exit(0);
    }
    _exit(0);
}
"#,
    )
    .unwrap();
    let evil_so = lab.dir.join("evil.so");
    let cc = Command::new("cc").args(["-shared", "-fPIC", "-O2", "-o"]).arg(&evil_so).arg(&evil_c).output().unwrap();
    assert!(cc.status.success(), "cc: {}", String::from_utf8_lossy(&cc.stderr));
    let ldd = stdout_ok(&Command::new("ldd").arg(berth_binary()).output().unwrap());
    let mut libs: Vec<(String, Vec<u8>)> = ldd
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(|p| (p.trim_start_matches('/').to_string(), std::fs::read(std::fs::canonicalize(p).unwrap()).unwrap()))
        .collect();
    libs.push(("evil.so".into(), std::fs::read(&evil_so).unwrap()));
    let mut entries = vec![E::Dir("lib/", 0o755), E::Dir("lib64/", 0o755), E::Dir("lib/x86_64-linux-gnu/", 0o755)];
    entries.extend(libs.iter().map(|(p, d)| E::File(p, d, 0o755)));
    let image = lab.push("selfexe", &[busybox_layer(), tar_of(&entries)], serde_json::json!({}));
    stdout_ok(&lab.create(&image, &[]));
    let before = digest(&std::fs::read(berth_binary()).unwrap());
    let out = lab.berth(&["container", "exec", "--job", &lab.job, "--env", "LD_PRELOAD=/evil.so", "--", "/proc/self/exe"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("direct: "), "the preloaded code ran in berth's binary: {text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("opened"), "{text}");
    // As root (an image's User honoured) this reopen would succeed: the CVE's write.
    assert!(text.contains("after exit: Permission denied"), "{text}");
    assert_eq!(digest(&std::fs::read(berth_binary()).unwrap()), before);
}

/// Runs a shell line as root on `node` and returns its stdout (panics on failure).
fn on(node: &str, shell: &str) -> String {
    stdout_ok(&cluster().on_node(node, shell))
}

#[test]
fn on_a_node_another_user_cannot_reach_a_jobs_keys_or_log_into_its_container() {
    let c = cluster();
    let node = c.nodes()[0].clone();
    let users = c.users();
    let (alice, bob) = (&users[0], &users[1]);
    let b = berth_binary().display().to_string();
    let base = 500 + std::process::id() % 400;
    let (job_a, job_b) = (format!("{base}1"), format!("{base}2"));
    let cleanup = format!("{b} container destroy --job {job_a}; {b} container destroy --job {job_b}");
    struct Cleanup(String, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = cluster().on_node(&self.0, &self.1);
        }
    }
    let _cleanup = Cleanup(node.clone(), cleanup);
    let mut ports = Vec::new();
    for (job, user) in [(&job_a, alice), (&job_b, bob)] {
        on(&node, &format!("{b} container create --job {job} --user {user} --image registry:5000/minimal:latest --no-home >/dev/null"));
        let wired: serde_json::Value = serde_json::from_str(&on(&node, &format!("{b} container wire --job {job} --nodes {node}"))).unwrap();
        ports.push(wired["port"].as_u64().unwrap());
    }
    // On the node, bob cannot read alice's job dir, keys or sshd log.
    for path in ["", "/node", "/node/wiring/id_ed25519", "/node/wiring/host_ed25519", "/node/sshd.log", "/node/env"] {
        let out = c.on_node(&node, &format!("setpriv --reuid {bob} --regid {bob} --init-groups cat /run/berth/{job_a}{path} 2>&1 || true"));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Permission denied"), "bob read /run/berth/{job_a}{path}: {text}");
    }
    // From bob's wired container, with bob's job key, alice's sshd lets nobody in:
    // strict host key checking stops the client, and without it the key is refused.
    let ssh = "/.berth/wiring/bin/ssh";
    let strict = c.on_node(&node, &format!("{b} container exec --job {job_b} -- {ssh} -p {} {node} true 2>&1", ports[0]));
    let text = String::from_utf8_lossy(&strict.stdout);
    assert!(!strict.status.success() && text.contains("Host key verification failed"), "{text}");
    let loose = c.on_node(
        &node,
        &format!("{b} container exec --job {job_b} -- {ssh} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -p {} {node} true 2>&1", ports[0]),
    );
    let text = String::from_utf8_lossy(&loose.stdout);
    assert!(!loose.status.success() && text.contains("Permission denied (publickey)"), "{text}");
    // The same command reaches bob's own container: the refusals above are not a broken setup.
    let own = c.on_node(&node, &format!("{b} container exec --job {job_b} -- {ssh} -p {} {node} id -un", ports[1]));
    assert_eq!(stdout_ok(&own).trim(), bob.as_str());
}

#[test]
fn on_a_node_berth_host_shows_the_nodes_root_read_only_with_its_permissions() {
    let c = cluster();
    // Quoting: the shell line runs inside the image (busybox), as the job user.
    let probe = "echo JOB=$SLURM_JOB_ID; grep \" /.berth/host \" /proc/self/mountinfo | cut -d\" \" -f6; \
                 cat /.berth/host/etc/shadow /.berth/host/etc/munge/munge.key 2>&1 >/dev/null; \
                 touch /.berth/host/etc/berth-escape-probe 2>&1; cat /.berth/host/etc/hostname >/dev/null && echo readable";
    let out = c.run(&format!("srun -N1 --container={}/minimal:latest sh -c '{probe}'", c.registry()));
    let text = stdout_ok(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[1].starts_with("ro,nosuid,nodev"), "{text}");
    assert_eq!(text.matches("Permission denied").count(), 2, "shadow and the munge key stay unreadable: {text}");
    assert!(text.contains("Read-only file system"), "{text}");
    assert!(text.trim_end().ends_with("readable"), "{text}");
    let job = lines[0].trim_start_matches("JOB=").to_string();
    berth_e2e::assert_nodes_clean(&c, &job);
}

/// A dir on the machine (every test host shares `/var/tmp`, and `/proc/1/root` inside a
/// container is the machine's root) holding a canary file; removed on drop.
struct Canary(PathBuf);

impl Canary {
    fn new(name: &str) -> Canary {
        let dir = PathBuf::from(format!("/var/tmp/berth-canary-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        for file in ["hostfile", "passwd"] {
            std::fs::write(dir.join(file), "canary\n").unwrap();
        }
        Canary(dir)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }

    /// Nothing added, removed or changed in the dir, as node1 sees it.
    fn assert_untouched(&self, node: &str, case: &str) {
        let seen = on(node, &format!("cd {} && for f in * .[!.]*; do [ -e \"$f\" ] && echo \"$f=$(cat \"$f\" 2>/dev/null)\"; done; true", self.path()));
        assert_eq!(seen, "hostfile=canary\npasswd=canary\n", "{case}: root wrote into the host's {}", self.path());
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The berth lines of a failed job's output (stdout and stderr together).
fn berth_lines(out: &Output) -> Vec<String> {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    text.lines().filter(|l| l.contains("berth: ")).map(String::from).collect()
}

#[test]
fn on_a_node_an_images_symlinks_never_carry_berths_root_writes_out_of_the_container() {
    let c = cluster();
    let lab = Lab::new("rootwrites");
    let node = c.nodes()[0].clone();
    let alice = c.users()[0].clone();
    let canary = Canary::new("rootwrites");
    let to_host = format!("/proc/1/root{}", canary.path());
    let up = format!("../../../../../..{}", canary.path());
    // The submit dir is alice's, bound into the container: a write "into the task's
    // cwd" would land there, on the host.
    let submit = format!("escapes-rootwrites-{}", std::process::id());
    stdout_ok(&c.run_as(&alice, &format!("rm -rf {submit}; mkdir {submit}")));
    let to_host_file = format!("{to_host}/hostfile");
    let cases: Vec<(&str, Vec<E>, &str)> = vec![
        // The Slurm hostfile, /.berth/slurm/hostfile.
        ("hostfile-dir-to-host", vec![E::Dir(".berth/", 0o755), E::Symlink(".berth/slurm", &to_host)], "/.berth/slurm"),
        ("hostfile-dir-to-cwd", vec![E::Dir(".berth/", 0o755), E::Symlink(".berth/slurm", "/proc/self/cwd")], "/.berth/slurm"),
        ("hostfile-dir-relative", vec![E::Dir(".berth/", 0o755), E::Symlink(".berth/slurm", &up)], "/.berth/slurm"),
        ("hostfile-itself-to-host", vec![E::Dir(".berth/", 0o755), E::Dir(".berth/slurm/", 0o755), E::Symlink(".berth/slurm/hostfile", &to_host_file)], ""),
        ("berth-dir-to-host", vec![E::Symlink(".berth", &to_host)], "/.berth"),
        ("berth-dir-a-file", vec![E::File(".berth", b"x", 0o644)], "/.berth"),
        // The mount point of the step's PMIx server dir, <SlurmdSpoolDir>/pmix.J.S.
        ("pmix-spool-to-host", vec![E::Dir("var/spool/", 0o755), E::Symlink("var/spool/slurmd", &to_host)], "/var/spool/slurmd"),
    ];
    let mut failed = Vec::new();
    for (name, entries, named) in cases {
        let image = lab.push(name, &[busybox_layer(), tar_of(&entries)], serde_json::json!({}));
        let mpi = if name.starts_with("pmix") { "--mpi=pmix" } else { "" };
        let out = c.run_as(&alice, &format!("cd {submit} && srun -N1 -w {node} {mpi} --container-image={image} sh -c 'echo JOB=$SLURM_JOB_ID; cat $BERTH_HOSTFILE'"));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines = berth_lines(&out);
        let left = stdout_ok(&c.run_as(&alice, &format!("ls -A {submit}; rm -rf {submit}/* {submit}/.[!.]*")));
        if let Err(e) = std::panic::catch_unwind(|| canary.assert_untouched(&node, name)) {
            failed.push(format!("{name}: {}", e.downcast_ref::<String>().cloned().unwrap_or_default()));
        } else if !left.is_empty() {
            failed.push(format!("{name}: root wrote {left:?} into alice's submit dir"));
        } else if out.status.success() && !(named.is_empty() && text.contains(&format!("\n{node}\n"))) {
            // Ran: then only with its hostfile in the container's own files.
            failed.push(format!("{name}: ran although berth must write through {named}: {text:?}"));
        } else if !out.status.success() && (lines.len() != 1 || !lines[0].contains(named)) {
            failed.push(format!("{name}: not one berth line naming {named}: {lines:?}"));
        }
    }
    stdout_ok(&c.run_as(&alice, &format!("rm -rf {submit}")));
    assert!(failed.is_empty(), "{failed:#?}");
}

#[test]
fn on_a_node_pmix_dirs_named_by_the_jobs_environment_are_bound_only_when_the_users_own() {
    let c = cluster();
    let lab = Lab::new("pmixenv");
    let node = c.nodes()[0].clone();
    let users = c.users();
    let (alice, bob) = (&users[0], &users[1]);
    let image = lab.push("pmixenv", &[busybox_layer()], serde_json::json!({}));
    let pid = std::process::id();
    let uid = stdout_ok(&c.run_as(alice, "id -u")).trim().to_string();
    // bob's dir (world-writable, as scratch dirs are), root's /root, and a symlink of
    // alice's to /root: Slurm's PMIx plugin makes the step's client dir there (as
    // root, for alice); whatever it does, berth binds nothing of bob's or root's.
    let bobs = format!("/var/tmp/berth-escapes-bob-{pid}");
    stdout_ok(&c.run_as(bob, &format!("rm -rf {bobs}; mkdir -m 1777 {bobs} && echo bob > {bobs}/bobs-file")));
    let link = format!("$HOME/escapes-pmix-link-{pid}");
    for (case, base) in [("bob", bobs.clone()), ("root", "/root".to_string()), ("symlink-to-root", link.clone())] {
        let line = format!(
            "rm -f {link}; ln -s /root {link}; export SLURM_PMIX_TMPDIR={base} TMPDIR={base}; \
             srun -N1 -w {node} --mpi=pmix --container-image={image} \
               sh -c 'echo JOB=$SLURM_JOB_ID; for d in $SLURM_PMIX_TMPDIR/spmix_appdir_*/; do stat -c %u:%U $d; ls $d/..; done'; rc=$?; rm -f {link}; exit $rc"
        );
        let out = c.run_as(alice, &line);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(!stdout.contains("bobs-file") && !stdout.contains(":root") && !stdout.contains(&format!(":{bob}")), "{case}: another user's dir was bound: {stdout}");
        // Slurm itself may refuse the dir (it cannot make it through the symlink); when
        // the task ran, the dir bound is alice's.
        if out.status.success() && stdout.contains("JOB=") {
            assert!(stdout.lines().any(|l| l.starts_with(&format!("{uid}:"))), "{case}: the client dir is alice's: {stdout}");
        }
        if stdout.contains("JOB=") {
            berth_e2e::assert_nodes_clean(&c, &berth_e2e::job_of(&stdout));
        }
    }
    let _ = c.run_as(bob, &format!("rm -rf {bobs}"));
}

#[test]
fn on_a_node_wiring_adds_to_the_images_own_files_only() {
    let c = cluster();
    let lab = Lab::new("wiring");
    let node = c.nodes()[0].clone();
    let alice = c.users()[0].clone();
    let b = berth_binary().display().to_string();
    let canary = Canary::new("wiring");
    let job = format!("{}7", 500 + std::process::id() % 400);
    struct Cleanup(String, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = cluster().on_node(&self.0, &self.1);
        }
    }
    let _cleanup = Cleanup(node.clone(), format!("{b} container destroy --job {job}"));
    // The node's own kernel state reached through /proc inside the container: its
    // domain name (its UTS namespace's, which the container shares).
    let domainname = on(&node, "cat /proc/sys/kernel/domainname");
    let to_host = format!("/proc/1/root{}", canary.path());
    let to_host_passwd = format!("{to_host}/passwd");
    let cases: Vec<(&str, Vec<E>, &str)> = vec![
        ("hosts-to-proc", vec![E::Symlink("etc/hosts", "/proc/sys/kernel/domainname")], "/etc/hosts"),
        ("passwd-to-proc", vec![E::Symlink("etc/passwd", "../proc/sys/kernel/domainname")], "/etc/passwd"),
        ("passwd-to-host", vec![E::Symlink("etc/passwd", &to_host_passwd)], "/etc/passwd"),
        ("etc-to-host", vec![E::Symlink("etc", &to_host)], "/etc"),
        ("passwd-a-fifo", vec![E::Fifo("etc/passwd", 0o666)], "/etc/passwd"),
        ("passwd-to-dev-zero", vec![E::Symlink("etc/passwd", "/dev/zero")], "/etc/passwd"),
        ("wiring-dir-to-tmp", vec![E::Dir(".berth/", 0o755), E::Symlink(".berth/wiring", "/tmp")], "/.berth/wiring"),
        ("etc-to-a-bound-host-dir", vec![E::Symlink("etc", "/data")], "/etc"),
    ];
    let mut failed = Vec::new();
    for (name, entries, named) in cases {
        // Without the busybox layer's /etc/passwd where the case replaces it.
        let mut base = busybox_layer();
        if name.starts_with("etc-") {
            base = tar_of(&[E::Dir("bin/", 0o755)]);
        }
        let image = lab.push(name, &[base, tar_of(&entries)], serde_json::json!({}));
        // alice binds a dir she may read (root's canary dir) at /data, where the image's
        // /etc leads in one case: root would add to the host's files there.
        on(&node, &format!("{b} container create --job {job} --user {alice} --image {image} --no-home --mount {}:/data >/dev/null", canary.path()));
        // A wire that hangs (a FIFO) or eats memory (/dev/zero) is stopped and counts as a failure.
        let out = c.on_node(&node, &format!("ulimit -v 2000000; timeout 30 {b} container wire --job {job} --nodes {node}"));
        let err = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
        let now = on(&node, "cat /proc/sys/kernel/domainname");
        if now != domainname {
            on(&node, &format!("printf %s '{}' >/proc/sys/kernel/domainname", domainname.trim_end()));
        }
        on(&node, &format!("{b} container destroy --job {job} >/dev/null"));
        if now != domainname {
            failed.push(format!("{name}: root wrote the node's domain name: {now:?}"));
        } else if let Err(e) = std::panic::catch_unwind(|| canary.assert_untouched(&node, name)) {
            failed.push(format!("{name}: {}", e.downcast_ref::<String>().cloned().unwrap_or_default()));
        } else if out.status.success() {
            failed.push(format!("{name}: wired although berth must write through {named}"));
        } else if !(err.lines().count() == 1 && err.starts_with("berth") && err.contains(named)) {
            failed.push(format!("{name}: not one line naming {named}: {err:?}"));
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
}

/// Another user holding a job's wiring port (here the site's one-port `wiring_ports`,
/// as a user could hold a whole range) fails that job's wiring alone, with one line
/// naming the port; the holder's process is not berth's to touch, and nothing of the
/// job stays on the node.
#[test]
fn on_a_node_a_wiring_port_another_user_holds_fails_that_job_alone_with_one_line() {
    let c = cluster();
    let lab = Lab::new("squat");
    let node = c.nodes()[0].clone();
    let (alice, bob) = (c.users()[0].clone(), c.users()[1].clone());
    let port = 30000 + std::process::id() % 5000;
    lab.write_config(&format!("wiring_ports = \"{port}-{port}\"\n"));
    let b = format!("env BERTH_CONFIG={} {}", lab.dir.join("berth.toml").display(), berth_binary().display());
    let job = lab.job.clone();
    struct Cleanup(String, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = cluster().on_node(&self.0, &self.1);
        }
    }
    let _cleanup = Cleanup(node.clone(), format!("{b} container destroy --job {job}; pkill -u {bob} -f 'squat-{port}'"));
    let holder = on(
        &node,
        &format!(
            "runuser -u {bob} -- python3 -c 'import socket, time; s = socket.socket(); s.bind((\"0.0.0.0\", {port})); s.listen(); time.sleep(120)' squat-{port} >/dev/null 2>&1 & echo $!"
        ),
    );
    let holder = holder.trim().to_string();
    on(&node, &format!("for i in $(seq 100); do ss -ltn | grep -q ':{port} ' && exit 0; sleep 0.1; done; echo never listened; exit 1"));
    let image = lab.push("squat", &[busybox_layer()], serde_json::json!({}));
    on(&node, &format!("{b} container create --job {job} --user {alice} --image {image} --no-home >/dev/null"));
    let out = c.on_node(&node, &format!("timeout 30 {b} container wire --job {job} --nodes {node}"));
    let err = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    assert!(!out.status.success(), "wired on a port {bob} holds");
    assert!(err.lines().count() == 1 && err.contains(&format!("port {port}")) && err.contains("taken"), "not one line naming the port: {err:?}");
    on(&node, &format!("{b} container destroy --job {job} >/dev/null"));
    let left = on(&node, &format!("kill -0 {holder} || echo {bob}\\'s process is gone; test -e {}/{job} && echo job dir left; grep -q '{job}' /proc/self/mountinfo && echo mount left; true", lab.dir.join("rt").display()));
    assert!(left.trim().is_empty(), "{}", left.trim());
}

/// berth's children that become the job user (to read their Docker config, run their
/// credential helpers, open their mount sources) run with the user's uid, so the user
/// can make them hang: a FIFO with no writer as the Docker config, a credential helper
/// that stops its parent (the child), a FIFO as a mount source. Root's create waits for
/// such a child at most `user_child_timeout` (4 s in this test's config) and fails
/// with one line; the child does not stay behind.
#[test]
fn on_a_node_a_user_who_hangs_berths_process_running_as_them_fails_their_create_with_one_line_at_the_bound() {
    let c = cluster();
    let lab = Lab::new("userchild");
    lab.write_config("credential_helper_timeout = 2\nuser_child_timeout = 4\n");
    let node = c.nodes()[0].clone();
    let alice = c.users()[0].clone();
    let pid = std::process::id();
    let image = lab.push("userchild", &[busybox_layer()], serde_json::json!({}));
    let b = format!("env BERTH_CONFIG={} {}", lab.dir.join("berth.toml").display(), berth_binary().display());
    let job = lab.job.clone();
    let dir = format!("/home/{alice}/berth-user-child-{pid}");
    let stops = format!("berthstop{pid}");
    struct Cleanup(String, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = cluster().on_node(&self.0, &self.1);
        }
    }
    let _cleanup = Cleanup(node.clone(), format!("{b} container destroy --job {job}; pkill -KILL -u {alice} -f 'container create --job {job} '; rm -rf {dir}"));
    // alice's own files.
    stdout_ok(&c.run_as(
        &alice,
        &format!(
            "rm -rf {dir} && mkdir -p {dir}/fifo {dir}/stop/bin {dir}/plain && mkfifo {dir}/fifo/config.json {dir}/plain/a-fifo \
             && printf '{{\"credsStore\":\"{stops}\"}}' > {dir}/stop/config.json \
             && printf '#!/bin/sh\\nkill -STOP $PPID\\n' > {dir}/stop/bin/docker-credential-{stops} && chmod 755 {dir}/stop/bin/docker-credential-{stops}"
        ),
    ));
    let cases = [
        ("a FIFO as her Docker config", format!("--docker-config {dir}/fifo"), true),
        ("a helper stopping its parent", format!("--docker-config {dir}/stop --helper-path {dir}/stop/bin:/usr/bin:/bin"), true),
        ("a FIFO as a mount source", format!("--docker-config {dir}/plain --mount {dir}/plain/a-fifo:/data"), false),
    ];
    let mut failed = Vec::new();
    for (case, extra, must_fail) in cases {
        let started = std::time::Instant::now();
        let out = c.on_node(&node, &format!("timeout 60 {b} container create --job {job} --user {alice} --no-home --image {image} {extra}"));
        let took = started.elapsed();
        let err = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
        let left = on(&node, &format!("pgrep -a -u {alice} -f 'container create --job {job} ' || true"));
        on(&node, &format!("{b} container destroy --job {job} >/dev/null"));
        if took > std::time::Duration::from_secs(20) {
            failed.push(format!("{case}: create took {took:?}: {err:?}"));
        } else if !left.trim().is_empty() {
            failed.push(format!("{case}: left running: {left}"));
        } else if must_fail && (out.status.success() || err.lines().count() != 1 || !err.starts_with("berth: ") || !err.contains("no answer within 4 s")) {
            failed.push(format!("{case}: not one line saying the process running as {alice} gave no answer within 4 s: {err:?}"));
        } else if !out.status.success() && (err.lines().count() != 1 || !err.starts_with("berth: ")) {
            failed.push(format!("{case}: not one line: {err:?}"));
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
}

/// A `localhost:PORT` registry is whichever node user listens there first. Root's
/// pulls never speak plain HTTP to it unless the site lists it: bob, listening on
/// node1's loopback, neither reads alice's login for that name nor learns what she
/// pulls, and her job fails with one line.
#[test]
fn on_a_node_a_localhost_registry_another_user_runs_gets_nothing_in_the_clear() {
    let c = cluster();
    let node = c.nodes()[0].clone();
    let (alice, bob) = (c.users()[0].clone(), c.users()[1].clone());
    let port = 31000 + std::process::id() % 3000;
    let log = format!("/tmp/berth-localhost-{port}.log");
    let server = format!(
        "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('127.0.0.1', {port}))\ns.listen()\ns.settimeout(90)\n\
         while True:\n    c, _ = s.accept()\n    c.settimeout(5)\n    try:\n        d = c.recv(4096)\n    except OSError:\n        d = b''\n    open('{log}', 'ab').write(d + b'\\n--\\n')\n    \
         c.sendall(b'HTTP/1.1 401 Unauthorized\\r\\nWww-Authenticate: Basic realm=x\\r\\nContent-Length: 0\\r\\n\\r\\n')\n    c.close()\n"
    );
    struct Cleanup(String, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = cluster().on_node(&self.0, &self.1);
        }
    }
    let _cleanup = Cleanup(node.clone(), format!("pkill -u {bob} -f berth-localhost-{port}; rm -f {log} /tmp/berth-localhost-{port}.py"));
    on(&node, &format!("printf '%s' {} > /tmp/berth-localhost-{port}.py && chmod 644 /tmp/berth-localhost-{port}.py", shell_quote(&server)));
    on(&node, &format!("runuser -u {bob} -- python3 /tmp/berth-localhost-{port}.py >/dev/null 2>&1 & true"));
    on(&node, &format!("for i in $(seq 100); do ss -ltn | grep -q '127.0.0.1:{port} ' && exit 0; sleep 0.1; done; echo never listened; exit 1"));
    // alice keeps a login for that name, as she would for a registry she uses.
    let dir = format!("berth-localhost-{port}");
    let out = c.run_as(
        &alice,
        &format!(
            "rm -rf {dir} && mkdir -p {dir} && printf '{{\"auths\": {{\"localhost:{port}\": {{\"auth\": \"%s\"}}}}}}' $(printf alice:hunter2 | base64) > {dir}/config.json \
             && DOCKER_CONFIG=$PWD/{dir} timeout 120 srun -w {node} -N1 --container-image=localhost:{port}/secret-project:1 true; echo rc=$?; rm -rf {dir}"
        ),
    );
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!stdout.contains("rc=0"), "the job ran: {stdout} {stderr}");
    let seen = on(&node, &format!("cat {log} 2>/dev/null; true"));
    assert!(!seen.contains("Authorization") && !seen.contains("GET /v2"), "{bob} read in the clear: {seen}");
    assert!(stderr.lines().any(|l| l.contains(&format!("localhost:{port}"))), "no line naming the registry: {stderr}");
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}
