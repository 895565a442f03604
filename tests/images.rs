//! Images: what a user does with `berth pull|images|inspect|rm|gc|export` against the
//! test cluster's registry, checked file by file against `umoci unpack` of the same
//! image (paths, types, modes, owners, link targets, contents, hard-link groups).
//! Runs as root in this machine's root namespace, which reaches the registry directly.

use berth_e2e::{berth_binary, cluster, image_layout, stdout_ok};
use berth_engine::config::Config;
use berth_engine::store::{Progress, PullPolicy, Store};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// A scratch dir with an admin config naming the cluster's registry as insecure and a
/// store of its own; removed on drop.
struct Scratch {
    dir: PathBuf,
    registry: String,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        let registry = cluster().registry();
        let dir = std::env::temp_dir().join(format!("berth-e2e-{name}-{}", std::process::id()));
        let _ = Command::new("rm").arg("-rf").arg(&dir).status();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("berth.toml"),
            format!("store_dir = \"{}\"\ninsecure_registries = [\"{registry}\"]\n", dir.join("store").display()),
        )
        .unwrap();
        Scratch { dir, registry }
    }

    fn berth(&self, args: &[&str]) -> Output {
        Command::new(berth_binary())
            .args(args)
            .env("BERTH_CONFIG", self.dir.join("berth.toml"))
            .env_remove("BERTH_STORE")
            .output()
            .expect("run berth")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.berth(args);
        assert!(out.status.success(), "berth {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The single stderr line of a failed command.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.berth(args);
        assert!(!out.status.success(), "berth {args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(err.trim_end().lines().count(), 1, "one error line, got: {err}");
        assert!(err.starts_with("berth: "), "{err}");
        err.trim_end().to_string()
    }

    fn image(&self, name: &str) -> String {
        format!("{}/{name}", self.registry)
    }

    fn config(&self) -> Config {
        Config { store_dir: self.dir.join("store"), insecure_registries: vec![self.registry.clone()], ..Config::default() }
    }

    /// `umoci unpack` of the image as the registry serves it: the cluster's layout when its
    /// tag is the same manifest, else a `skopeo copy` of the registry's image.
    fn umoci_rootfs(&self, name: &str, layout_tag: &str, manifest_digest: &str) -> PathBuf {
        let layout = image_layout(name);
        let index: String = std::fs::read_to_string(layout.join("index.json")).unwrap_or_default();
        let bundle = self.dir.join(format!("umoci-{name}-{layout_tag}"));
        let source = if index.contains(manifest_digest) {
            format!("{}:{layout_tag}", layout.display())
        } else {
            let copy = self.dir.join(format!("copy-{name}"));
            let out = Command::new("skopeo")
                .args(["copy", "--quiet", "--src-tls-verify=false"])
                .arg(format!("docker://{}@{manifest_digest}", self.image(name)))
                .arg(format!("oci:{}:{layout_tag}", copy.display()))
                .output()
                .unwrap();
            assert!(out.status.success(), "skopeo copy: {}", String::from_utf8_lossy(&out.stderr));
            format!("{}:{layout_tag}", copy.display())
        };
        let out = Command::new("umoci").args(["unpack", "--image", &source]).arg(&bundle).output().unwrap();
        assert!(out.status.success(), "umoci unpack {source}: {}", String::from_utf8_lossy(&out.stderr));
        bundle.join("rootfs")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = Command::new("rm").arg("-rf").arg(&self.dir).status();
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Node {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    link: Option<PathBuf>,
}

/// Every entry of a tree (devices excepted: berth drops them, the runtime provides /dev),
/// and its hard-link groups.
fn tree(root: &Path, owners: bool) -> (BTreeMap<PathBuf, Node>, BTreeSet<Vec<PathBuf>>) {
    fn walk(root: &Path, rel: &Path, owners: bool, out: &mut BTreeMap<PathBuf, Node>, inodes: &mut HashMap<(u64, u64), Vec<PathBuf>>) {
        let mut entries: Vec<_> = std::fs::read_dir(root.join(rel)).unwrap().map(|e| e.unwrap()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let here = rel.join(e.file_name());
            let m = std::fs::symlink_metadata(root.join(&here)).unwrap();
            let ft = m.file_type();
            let kind = if ft.is_dir() {
                "dir"
            } else if ft.is_file() {
                "file"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_fifo() {
                "fifo"
            } else if ft.is_socket() {
                "socket"
            } else {
                continue;
            };
            let link = ft.is_symlink().then(|| std::fs::read_link(root.join(&here)).unwrap());
            let (uid, gid) = if owners { (m.uid(), m.gid()) } else { (0, 0) };
            let mode = if ft.is_symlink() { 0 } else { m.mode() & 0o7777 };
            out.insert(here.clone(), Node { kind, mode, uid, gid, link });
            if ft.is_file() && m.nlink() > 1 {
                inodes.entry((m.dev(), m.ino())).or_default().push(here.clone());
            }
            if ft.is_dir() {
                walk(root, &here, owners, out, inodes);
            }
        }
    }
    let mut out = BTreeMap::new();
    let mut inodes = HashMap::new();
    walk(root, Path::new(""), owners, &mut out, &mut inodes);
    let groups = inodes.into_values().filter(|g| g.len() > 1).map(|mut g| {
        g.sort();
        g
    });
    (out, groups.collect())
}

/// Asserts two root filesystems are the same file by file.
fn assert_same_tree(expected: &Path, actual: &Path, owners: bool) {
    let (a, ga) = tree(expected, owners);
    let (b, gb) = tree(actual, owners);
    let mut diffs = Vec::new();
    for path in a.keys().chain(b.keys()).collect::<BTreeSet<_>>() {
        match (a.get(path), b.get(path)) {
            (Some(x), Some(y)) if x == y => {
                if x.kind == "file" && std::fs::read(expected.join(path)).unwrap() != std::fs::read(actual.join(path)).unwrap() {
                    diffs.push(format!("{}: contents differ", path.display()));
                }
            }
            (x, y) => diffs.push(format!("{}: umoci {x:?} berth {y:?}", path.display())),
        }
    }
    if ga != gb {
        diffs.push(format!("hard-link groups: umoci {ga:?} berth {gb:?}"));
    }
    assert!(diffs.is_empty(), "{} differences between {} and {}:\n{}", diffs.len(), expected.display(), actual.display(), diffs[..diffs.len().min(30)].join("\n"));
    assert!(a.len() > 3, "suspiciously empty tree: {}", expected.display());
}

/// Pulls `image` into an empty store, exports it and compares with umoci's unpack of
/// the layout's `umoci_tag` (the same manifest), or of the registry's `twin` tag.
fn pull_and_compare(name: &str, tag: &str, umoci_tag: &str, twin: Option<&str>) {
    let s = Scratch::new(&format!("{name}-{tag}"));
    let out = s.ok(&["pull", "--quiet", &s.image(&format!("{name}:{tag}"))]);
    let digest = out.split_whitespace().nth(1).expect("pull prints REF DIGEST").to_string();
    assert!(digest.starts_with("sha256:"), "{out}");
    let export = s.dir.join("export");
    s.ok(&["export", &s.image(&format!("{name}:{tag}")), export.to_str().unwrap()]);
    // umoci cannot read zstd layers: compare with the gzip twin, which has the same diff_ids.
    let umoci_digest = match twin {
        None => digest,
        Some(twin) => {
            let out = s.ok(&["pull", "--quiet", &s.image(&format!("{name}:{twin}"))]);
            out.split_whitespace().nth(1).unwrap().to_string()
        }
    };
    let expected = s.umoci_rootfs(name, umoci_tag, &umoci_digest);
    assert_same_tree(&expected, &export, true);
}

#[test]
fn pull_oci_image_matches_umoci_unpack() {
    pull_and_compare("minimal", "latest", "latest", None);
}

#[test]
fn pull_docker_schema2_image_matches_umoci_unpack() {
    pull_and_compare("minimal", "docker", "latest", Some("latest"));
}

#[test]
fn pull_zstd_image_matches_umoci_unpack_of_its_gzip_twin() {
    pull_and_compare("minimal", "zstd", "latest", Some("latest"));
}

#[test]
fn pull_index_picks_the_host_platform_and_skips_attestations() {
    pull_and_compare("minimal", "multi", "amd64", None);
    let s = Scratch::new("platform");
    s.ok(&["pull", "--quiet", "--platform", "linux/arm64", &s.image("minimal:multi")]);
    let export = s.dir.join("export");
    s.ok(&["export", &s.image("minimal:multi"), export.to_str().unwrap()]);
    let platform = std::fs::read_to_string(export.join("etc/berth-platform")).unwrap();
    assert!(platform.contains("arm64"), "{platform}");
    let err = s.fails(&["pull", "--platform", "linux/s390x", &s.image("minimal:multi")]);
    assert!(err.contains("no manifest for platform linux/s390x") && !err.contains("unknown/unknown"), "{err}");
}

#[test]
fn pull_layers_image_with_whiteouts_opaque_dirs_and_hard_links_matches_umoci_unpack() {
    pull_and_compare("layers", "latest", "latest", None);
}

#[test]
fn pull_mpi_image_matches_umoci_unpack() {
    pull_and_compare("mpi", "latest", "latest", None);
}

/// The container engineer's view: the layer dirs, mounted as overlay lowers, give the
/// same tree as umoci (whiteouts and opaque dirs in overlay form).
#[test]
fn layer_dirs_mount_as_overlay_like_umoci_unpack() {
    let s = Scratch::new("overlay");
    let store = Store::open(&s.config()).unwrap();
    let image = store.resolve(&s.image("layers:latest"), PullPolicy::Missing, Progress::Silent).unwrap();
    assert!(!image.userxattr, "root stores use trusted.overlay xattrs");
    let lower: Vec<String> = image.layer_dirs.iter().rev().map(|d| d.display().to_string()).collect();
    let mnt = s.dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &format!("ro,lowerdir={}", lower.join(":"))])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(mounted.success());
    let expected = s.umoci_rootfs("layers", "latest", &image.manifest_digest);
    let result = std::panic::catch_unwind(|| assert_same_tree(&expected, &mnt, true));
    let _ = Command::new("umount").arg(&mnt).status();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    // A second resolve is a lookup: same dirs, no pull.
    let again = store.resolve(&s.image("layers:latest"), PullPolicy::Never, Progress::Silent).unwrap();
    assert_eq!(again.layer_dirs, image.layer_dirs);
}

#[test]
fn images_inspect_rm_and_gc_manage_the_store() {
    let s = Scratch::new("manage");
    s.ok(&["pull", "--quiet", &s.image("minimal:latest")]);
    s.ok(&["pull", "--quiet", &s.image("layers:latest")]);
    let list = s.ok(&["images"]);
    assert!(list.starts_with("REFERENCE") && list.contains(&s.image("minimal:latest")) && list.contains(&s.image("layers:latest")), "{list}");
    let config: serde_json::Value = serde_json::from_str(&s.ok(&["inspect", &s.image("minimal:latest")])).unwrap();
    assert_eq!(config["os"], "linux");
    assert!(config["rootfs"]["diff_ids"].as_array().is_some_and(|d| !d.is_empty()));
    s.ok(&["rm", &s.image("layers:latest")]);
    let gc = s.ok(&["gc"]);
    assert!(gc.starts_with("removed ") && !gc.starts_with("removed 0 layers"), "{gc}");
    assert!(!s.ok(&["images"]).contains("layers:latest"));
    let export = s.dir.join("export");
    s.ok(&["export", "--store", s.dir.join("store").to_str().unwrap(), &s.image("minimal:latest"), export.to_str().unwrap()]);
    assert!(export.join("bin/busybox").is_file());
    let err = s.fails(&["rm", &s.image("layers:latest")]);
    assert!(err.contains("is not in the image store"), "{err}");
}

#[test]
fn pull_errors_are_one_clear_line_and_leave_the_store_consistent() {
    let s = Scratch::new("errors");
    let (no_repo, no_tag, minimal) = (s.image("no-such-repo:latest"), s.image("minimal:no-such-tag"), s.image("minimal:latest"));
    let cases = [
        (vec!["pull", "Not A Reference"], "is not an image reference"),
        (vec!["pull", "ubuntu@sha256:1234"], "the digest must be sha256:"),
        (vec!["pull", &no_repo], "not found"),
        (vec!["pull", &no_tag], "not found"),
        (vec!["pull", "127.0.0.1:1/minimal:latest"], "cannot reach registry 127.0.0.1:1"),
        (vec!["inspect", &minimal], "pull it first"),
        (vec!["export", "127.0.0.1:1/x", "/nonexistent-dir"], "cannot reach registry"),
    ];
    for (args, expected) in cases {
        let err = s.fails(&args);
        assert!(err.contains(expected), "berth {args:?}: {err}");
    }
    assert_eq!(s.ok(&["images"]).lines().count(), 1, "nothing stored");
    assert!(s.ok(&["gc"]).starts_with("removed 0 layers, 0 blobs, 0 leftovers"));
}

#[test]
fn concurrent_pulls_of_one_image_all_succeed_and_store_each_layer_once() {
    let s = Scratch::new("concurrent");
    let image = s.image("mpi:latest");
    let children: Vec<_> = (0..4)
        .map(|_| {
            Command::new(berth_binary())
                .args(["pull", "--quiet", &image])
                .env("BERTH_CONFIG", s.dir.join("berth.toml"))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    for o in &outputs {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let first = String::from_utf8_lossy(&outputs[0].stdout).to_string();
    assert!(outputs.iter().all(|o| String::from_utf8_lossy(&o.stdout) == first));
    let config: serde_json::Value = serde_json::from_str(&s.ok(&["inspect", &image])).unwrap();
    let layers = config["rootfs"]["diff_ids"].as_array().unwrap().len();
    let stored = std::fs::read_dir(s.dir.join("store/layers/sha256")).unwrap().count()
        + std::fs::read_dir(s.dir.join("store/layers/chain")).unwrap().count();
    assert_eq!(stored, layers);
    assert!(std::fs::read_dir(s.dir.join("store/tmp")).unwrap().next().is_none());
}

#[test]
fn a_pull_killed_at_any_moment_leaves_a_store_the_next_pull_completes() {
    let s = Scratch::new("killed");
    let image = s.image("mpi:latest");
    let mut killed_mid_pull = 0;
    for delay_ms in [20, 60, 150, 300] {
        let mut child = Command::new(berth_binary())
            .args(["pull", "--quiet", &image])
            .env("BERTH_CONFIG", s.dir.join("berth.toml"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_none() {
            killed_mid_pull += 1;
        }
        let _ = child.kill();
        let _ = child.wait();
        // Whatever was published is whole; the rest is debris gc removes.
        s.ok(&["gc"]);
        assert!(std::fs::read_dir(s.dir.join("store/tmp")).unwrap().next().is_none());
        // The killed pull's layers, if any were published, stay for the next pull: drop the record only.
        let _ = s.berth(&["rm", &image]);
    }
    assert!(killed_mid_pull >= 2, "only {killed_mid_pull} kills landed during a pull");
    let out = s.ok(&["pull", "--quiet", &image]);
    let digest = out.split_whitespace().nth(1).unwrap().to_string();
    let export = s.dir.join("export");
    s.ok(&["export", &image, export.to_str().unwrap()]);
    let expected = s.umoci_rootfs("mpi", "latest", &digest);
    assert_same_tree(&expected, &export, true);
}

#[test]
fn a_regular_user_pulls_into_a_store_of_their_own_and_reads_roots_store() {
    let cluster = cluster();
    let user = &cluster.users()[0];
    let s = Scratch::new("user");
    s.ok(&["pull", "--quiet", &s.image("layers:latest")]);
    let home = s.dir.join("home");
    std::fs::create_dir(&home).unwrap();
    let passwd = Command::new("id").args(["-u", user]).output().unwrap();
    let uid = String::from_utf8_lossy(&passwd.stdout).trim().to_string();
    assert!(Command::new("chown").arg(format!("{uid}:{uid}")).arg(&home).status().unwrap().success());
    std::fs::set_permissions(&s.dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let as_user = |args: &[&str], with_config: bool| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid", user, "--regid", user, "--init-groups", "--"]).arg(berth_binary()).args(args);
        c.env("HOME", &home).env_remove("XDG_DATA_HOME").env_remove("BERTH_STORE");
        if with_config {
            c.env("BERTH_CONFIG", s.dir.join("berth.toml"));
        } else {
            c.env("BERTH_CONFIG", s.dir.join("none.toml"));
        }
        c.output().unwrap()
    };
    // No config at all: a per-user store under ~/.local/share/berth.
    std::fs::write(s.dir.join("none.toml"), format!("insecure_registries = [\"{}\"]\nstore_dir = \"/nonexistent\"\n", s.registry)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid", user, "--regid", user, "--init-groups", "--"])
        .arg(berth_binary())
        .args(["pull", "--quiet", "--store", home.join(".local/share/berth").to_str().unwrap(), &s.image("layers:latest")])
        .env("HOME", &home)
        .env("BERTH_CONFIG", s.dir.join("none.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "user pull: {}", String::from_utf8_lossy(&out.stderr));
    let user_export = home.join("export");
    let out = Command::new("setpriv")
        .args(["--reuid", user, "--regid", user, "--init-groups", "--"])
        .arg(berth_binary())
        .args(["export", "--store", home.join(".local/share/berth").to_str().unwrap(), &s.image("layers:latest"), user_export.to_str().unwrap()])
        .env("HOME", &home)
        .env("BERTH_CONFIG", s.dir.join("none.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "user export: {}", String::from_utf8_lossy(&out.stderr));
    let root_export = s.dir.join("root-export");
    s.ok(&["export", &s.image("layers:latest"), root_export.to_str().unwrap()]);
    // Same tree but for owners (a user cannot chown), and unreadable dirs aside.
    assert_same_tree(&root_export, &user_export, false);
    // Root's store, read-only for the user: listing works, pulling says what to do.
    let list = as_user(&["images"], true);
    assert!(String::from_utf8_lossy(&list.stdout).contains("layers:latest"), "{}", String::from_utf8_lossy(&list.stderr));
    let denied = as_user(&["pull", &s.image("minimal:latest")], true);
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(!denied.status.success() && err.contains("read-only for this user"), "{err}");
}

/// Runs `slurm-test-env/registry` with an option and splits its line into words.
fn test_env_words(option: &str) -> Vec<String> {
    let out = Command::new(berth_e2e::repo_root().join("slurm-test-env/registry")).arg(option).output().unwrap();
    assert!(out.status.success(), "slurm-test-env/registry {option}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).split_whitespace().map(String::from).collect()
}

/// The proxy variables berth reads, all cleared, then `set` applied.
fn with_proxy_env(mut command: Command, set: &[(&str, &str)]) -> Output {
    for var in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"] {
        command.env_remove(var);
    }
    command.envs(set.iter().copied()).output().expect("run berth")
}

#[test]
fn pulls_go_through_the_http_proxy_as_dockers_do_and_bypass_it_for_no_proxy() {
    let s = Scratch::new("proxy");
    let words = test_env_words("--proxy");
    let (proxy, log) = (format!("http://{}", words[0]), PathBuf::from(&words[1]));
    let image = s.image("minimal:latest");
    let registry_host = s.registry.split(':').next().unwrap().to_string();
    let mut stores = 0;
    // A pull into an empty store of its own, with these variables; returns what the proxy logged meanwhile.
    let mut pull = |set: &[(&str, &str)]| -> (Output, String) {
        stores += 1;
        let before = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let mut command = Command::new(berth_binary());
        let store = s.dir.join(format!("store-{stores}"));
        command.args(["pull", "--quiet", "--store", store.to_str().unwrap(), &image]).env("BERTH_CONFIG", s.dir.join("berth.toml"));
        let out = with_proxy_env(command, set);
        let text = std::fs::read(&log).unwrap_or_default();
        (out, String::from_utf8_lossy(&text[before.min(text.len() as u64) as usize..]).into_owned())
    };
    let manifest_line = format!("GET http://{}/v2/minimal/manifests/latest", s.registry);
    let blob_line = format!("GET http://{}/v2/minimal/blobs/sha256:", s.registry);

    // HTTP_PROXY: the plain-HTTP registry is reached through the proxy, manifest and blobs.
    let (out, logged) = pull(&[("HTTP_PROXY", &proxy)]);
    assert!(out.status.success(), "pull through the proxy: {}", String::from_utf8_lossy(&out.stderr));
    assert!(logged.contains(&manifest_line) && logged.contains(&blob_line), "the proxy did not log the pull: {logged}");
    // The lower-case form is honoured too (a dead proxy makes the pull fail, with one line).
    let (out, _) = pull(&[("http_proxy", "http://127.0.0.1:9")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.trim_end().lines().count() == 1 && err.contains("cannot reach registry"), "{err}");
    // NO_PROXY naming the registry's host (by name or by network): direct, nothing logged.
    for no_proxy in [registry_host.clone(), format!("example.org, {registry_host}/24"), s.registry.clone(), "*".into()] {
        let (out, logged) = pull(&[("HTTP_PROXY", &proxy), ("NO_PROXY", &no_proxy)]);
        assert!(out.status.success(), "NO_PROXY={no_proxy}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(!logged.contains(&s.registry), "NO_PROXY={no_proxy} went through the proxy: {logged}");
    }
    // A NO_PROXY that names another port of that host does not bypass (as Go matches host:port).
    let other_port = format!("{registry_host}:1");
    let (out, logged) = pull(&[("HTTP_PROXY", &proxy), ("no_proxy", &other_port)]);
    assert!(out.status.success() && logged.contains(&manifest_line), "NO_PROXY={other_port}: {logged}");
    // As Docker: HTTPS_PROXY is for https only and ALL_PROXY is not read: this plain-HTTP pull goes direct.
    let (out, logged) = pull(&[("HTTPS_PROXY", &proxy), ("ALL_PROXY", &proxy)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!logged.contains(&s.registry), "HTTPS_PROXY/ALL_PROXY were used for a plain-HTTP registry: {logged}");
}

/// A shell line for a Slurm job as `user` on the cluster: prints the job id and the image's OS name.
fn srun_minimal(cluster: &berth_e2e::Cluster, user: &str, env: &str, image: &str) -> Output {
    cluster.run_as(user, &format!("{env} srun -N1 --container={image} sh -c 'echo JOB=$SLURM_JOB_ID; grep ^NAME= /etc/os-release'"))
}

/// The one line berth wrote for a failed job (the job's other lines are Slurm's own).
fn berth_error(out: &Output) -> String {
    assert!(!out.status.success(), "the job should fail: {}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("error: berth: ")).collect();
    assert_eq!(lines.len(), 1, "one berth line, got: {err}");
    lines[0].to_string()
}

/// Files a test puts into users' homes, removed on drop.
struct Planted(Vec<PathBuf>);

impl Drop for Planted {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = Command::new("rm").arg("-rf").arg(p).status();
        }
    }
}

fn sh(line: &str) {
    let out = Command::new("sh").args(["-c", line]).output().unwrap();
    assert!(out.status.success(), "{line}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A fresh tag of `minimal` on the login-protected `registry`, per case and test run: a
/// node's store already holding a tag would not ask the registry.
fn fresh_tag(registry: &str, login: &str, case: &str) -> String {
    let image = format!("{registry}/minimal:{case}-{}", std::process::id());
    sh(&format!(
        "skopeo copy -q --src-tls-verify=false --dest-tls-verify=false --src-creds '{login}' --dest-creds '{login}' \
         docker://{registry}/minimal:latest docker://{image}"
    ));
    image
}

#[test]
fn job_pulls_log_in_as_the_job_user_with_their_own_docker_config_and_helpers() {
    let cluster = cluster();
    let words = test_env_words("--auth");
    let (registry, login) = (words[0].clone(), words[1].clone());
    let users = cluster.users();
    let (alice, bob) = (&users[0], &users[1]);
    let pid = std::process::id();
    let tag = |case: &str| fresh_tag(&registry, &login, case);
    let auth = String::from_utf8(Command::new("sh").args(["-c", &format!("printf %s '{login}' | base64 -w0")]).output().unwrap().stdout).unwrap();
    let config_json = format!("{{\"auths\":{{\"{registry}\":{{\"auth\":\"{auth}\"}}}}}}");
    let home = |u: &str| PathBuf::from(format!("/home/{u}"));
    let alice_docker = home(alice).join(".docker");
    assert!(!alice_docker.join("config.json").exists(), "{} exists: this test will not overwrite it", alice_docker.join("config.json").display());
    let bob_dir = home(bob).join(format!("berth-auth-test-{pid}"));
    // ~/.docker goes too when this test made it.
    let planted_docker = if alice_docker.exists() { alice_docker.join("config.json") } else { alice_docker.clone() };
    let _planted = Planted(vec![planted_docker, bob_dir.clone()]);

    // alice: ~/.docker/config.json (her own, 0600) holds the login: the job pulls.
    sh(&format!("install -d -o {alice} -g {alice} -m 0700 {0} && printf '%s' '{config_json}' >{0}/config.json && chown {alice}: {0}/config.json && chmod 600 {0}/config.json", alice_docker.display()));
    let out = srun_minimal(&cluster, alice, "", &tag("alice"));
    let stdout = stdout_ok(&out);
    assert!(stdout.contains("NAME=\"berth minimal\""), "{stdout}");
    berth_e2e::assert_nodes_clean(&cluster, stdout.lines().find_map(|l| l.strip_prefix("JOB=")).unwrap().trim());

    // bob: no login of his own (an empty DOCKER_CONFIG): one clear line, the job fails.
    let (empty, linked, helped) = (bob_dir.join("empty"), bob_dir.join("linked"), bob_dir.join("helped"));
    sh(&format!("install -d -o {bob} -g {bob} {} {} {} {} {}/bin", bob_dir.display(), empty.display(), linked.display(), helped.display(), helped.display()));
    let line = berth_error(&srun_minimal(&cluster, bob, &format!("DOCKER_CONFIG={}", empty.display()), &tag("bob-none")));
    assert!(line.contains(&format!("registry {registry} denied access")) && line.contains("needs a login"), "{line}");

    // bob's config.json is a symlink to a root-only file holding the login: read as bob, so refused.
    let secret = bob_dir.join("root-only.json");
    sh(&format!("printf '%s' '{config_json}' >{0} && chown root:root {0} && chmod 600 {0} && ln -s {0} {1}/config.json", secret.display(), linked.display()));
    let line = berth_error(&srun_minimal(&cluster, bob, &format!("DOCKER_CONFIG={}", linked.display()), &tag("bob-linked")));
    assert!(line.contains("cannot read registry credentials") && line.contains("Permission denied"), "{line}");

    // bob's credential helper, found on the job's PATH and run as bob, answers with the login.
    let (user, password) = login.split_once(':').unwrap();
    let ran_as = helped.join("ran-as");
    std::fs::write(
        helped.join("bin/docker-credential-berthtest"),
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 1\nread -r server\nid -u >{}\n[ \"$server\" = {registry} ] || {{ echo 'credentials not found in native keychain'; exit 1; }}\n\
             printf '{{\"ServerURL\":\"%s\",\"Username\":\"{user}\",\"Secret\":\"{password}\"}}\\n' \"$server\"\n",
            ran_as.display()
        ),
    )
    .unwrap();
    std::fs::write(helped.join("config.json"), format!("{{\"credHelpers\":{{\"{registry}\":\"berthtest\"}}}}")).unwrap();
    sh(&format!("chown -R {bob}: {0} && chmod 755 {0}/bin/docker-credential-berthtest", helped.display()));
    let env = format!("DOCKER_CONFIG={0} PATH={0}/bin:$PATH", helped.display());
    let out = srun_minimal(&cluster, bob, &env, &tag("bob-helper"));
    let stdout = stdout_ok(&out);
    assert!(stdout.contains("NAME=\"berth minimal\""), "{stdout}");
    let bob_uid = String::from_utf8(Command::new("id").args(["-u", bob]).output().unwrap().stdout).unwrap();
    assert_eq!(std::fs::read_to_string(&ran_as).unwrap().trim(), bob_uid.trim(), "the helper must run as bob");
}

/// alice names credential helpers of her own that never answer: one sleeps forever
/// (`credsStore`), one leaves a process holding its output open and exits
/// (`credHelpers`). Each of her jobs fails with one line naming the helper once the
/// 30 s a helper gets have passed, nothing of the helpers stays on the node, and bob's
/// pull from the same registry on the same node meanwhile is not held up.
#[test]
fn a_job_users_credential_helper_that_never_answers_fails_the_job_with_one_line_and_holds_up_no_other_user() {
    let cluster = cluster();
    let words = test_env_words("--auth");
    let (registry, login) = (words[0].clone(), words[1].clone());
    let users = cluster.users();
    let (alice, bob) = (&users[0], &users[1]);
    let node = cluster.nodes()[0].clone();
    let pid = std::process::id();
    let tag = |case: &str| fresh_tag(&registry, &login, case);
    let home = |u: &str| PathBuf::from(format!("/home/{u}"));
    let (alice_dir, bob_dir) = (home(alice).join(format!("berth-helper-hang-{pid}")), home(bob).join(format!("berth-helper-hang-{pid}")));
    let _planted = Planted(vec![alice_dir.clone(), bob_dir.clone()]);
    // Names of this run's own, so that what is left on the node is told apart from other runs'.
    let (hangs, lingers) = (format!("berthhang{pid}"), format!("berthlinger{pid}"));
    let held = format!("sleep {}", 1000 + pid % 1000);
    for (case, helper, config, script) in [
        ("hangs", &hangs, format!("{{\"credsStore\":\"{hangs}\"}}"), "#!/bin/sh\nexec sleep 1000\n".to_string()),
        ("lingers", &lingers, format!("{{\"credHelpers\":{{\"{registry}\":\"{lingers}\"}}}}"), format!("#!/bin/sh\n{held} &\nexit 0\n")),
    ] {
        let dir = alice_dir.join(case);
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::write(dir.join("config.json"), config).unwrap();
        std::fs::write(dir.join(format!("bin/docker-credential-{helper}")), script).unwrap();
        sh(&format!("chmod 755 {0}/bin/docker-credential-{helper}", dir.display()));
    }
    sh(&format!("chown -R {alice}: {}", alice_dir.display()));
    let auth = String::from_utf8(Command::new("sh").args(["-c", &format!("printf %s '{login}' | base64 -w0")]).output().unwrap().stdout).unwrap();
    std::fs::create_dir_all(&bob_dir).unwrap();
    std::fs::write(bob_dir.join("config.json"), format!("{{\"auths\":{{\"{registry}\":{{\"auth\":\"{auth}\"}}}}}}")).unwrap();
    sh(&format!("chown -R {bob}: {0} && chmod 600 {0}/config.json", bob_dir.display()));
    let images = [tag("hangs"), tag("lingers"), tag("bob")];

    let job = |user: &str, dir: &Path, image: &str| {
        let started = std::time::Instant::now();
        let env = format!("DOCKER_CONFIG={0} PATH={0}/bin:$PATH timeout 120", dir.display());
        let out = cluster.run_as(user, &format!("{env} srun -N1 -w {node} --container={image} sh -c 'echo JOB=$SLURM_JOB_ID; grep ^NAME= /etc/os-release'"));
        (out, started.elapsed())
    };
    let (alices, (bobs, bob_took)) = std::thread::scope(|s| {
        let alices: Vec<_> = [("hangs", &images[0]), ("lingers", &images[1])]
            .into_iter()
            .map(|(case, image)| {
                let dir = alice_dir.join(case);
                let job = &job;
                s.spawn(move || job(alice, &dir, image))
            })
            .collect();
        // bob starts once alice's helpers are running.
        std::thread::sleep(Duration::from_secs(3));
        let bobs = job(bob, &bob_dir, &images[2]);
        (alices.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>(), bobs)
    });
    let stdout = stdout_ok(&bobs);
    assert!(stdout.contains("NAME=\"berth minimal\""), "{stdout}");
    assert!(bob_took < Duration::from_secs(25), "bob's job took {bob_took:?} while alice's helpers hung");
    for ((out, took), helper) in alices.iter().zip([&hangs, &lingers]) {
        let line = berth_error(out);
        assert!(line.contains(&format!("docker-credential-{helper}")) && line.contains("no answer within 30 s"), "{line}");
        assert!(*took >= Duration::from_secs(30) && *took < Duration::from_secs(60), "{helper}: the job took {took:?}");
    }
    // Nothing of alice's helpers runs on the node any more (killed with their process group).
    let left = cluster.on_node(&node, &format!("pgrep -a -u {alice} -f '{hangs}|{lingers}|{held}' || true"));
    assert_eq!(String::from_utf8_lossy(&left.stdout).trim(), "", "left running on {node}");
}

#[test]
fn gc_keeps_the_layers_of_a_live_container_and_frees_them_after_destroy() {
    let cluster = cluster();
    let node = &cluster.nodes()[0];
    let user = &cluster.users()[0];
    let pid = std::process::id();
    let image = format!("{}/minimal:latest", cluster.registry());
    // A store of its own in the node's private state dir, so gc touches no other test's images.
    let berth = format!("BERTH_STORE=/var/lib/berth/gc-test-{pid} berth");
    // The nodes run the berth the cluster installed (berth_binary), which is not on PATH.
    let on_path = "PATH=$(dirname $(grep ^berth_binary /etc/berth/berth.toml | cut -d'\"' -f2)):$PATH";
    let run = |line: &str| stdout_ok(&cluster.on_node(node, &format!("{on_path}; {line}")));
    let job = format!("gc-test-{pid}");
    let result = std::panic::catch_unwind(|| {
        for round in ["destroyed", "crashed"] {
            run(&format!("{berth} pull --quiet {image}"));
            let created = run(&format!("{berth} container create --job {job} --user {user} --no-home --image {image}"));
            assert!(created.contains("\"reused\":false"), "{created}");
            run(&format!("{berth} rm {image}"));
            let gc = run(&format!("{berth} gc"));
            assert!(gc.starts_with("removed 0 layers") && gc.contains("kept 1 unreferenced layers"), "{round}: {gc}");
            // The container still reads its image's files.
            let listed = run(&format!("berth container exec --job {job} -- /bin/busybox cat /etc/os-release"));
            assert!(listed.contains("berth minimal"), "{listed}");
            if round == "crashed" {
                // The container's namespace dies with nothing left to hold it (its pin gone,
                // as after a crash), while its state stays: it must not keep the layers.
                run(&format!(
                    "mnt=/run/berth/{job}/node/mnt; if [ -L $mnt ]; then kill -9 $(readlink $mnt | cut -d/ -f3); sleep 0.5; else umount $mnt; fi"
                ));
                let gc = run(&format!("{berth} gc"));
                assert!(gc.starts_with("removed 1 layers") && gc.contains("kept 0 "), "{round}: {gc}");
            }
            run(&format!("berth container destroy --job {job}"));
            let gc = run(&format!("{berth} gc"));
            let expected = if round == "crashed" { "removed 0 layers" } else { "removed 1 layers" };
            assert!(gc.starts_with(expected) && gc.contains("kept 0 "), "{round}: {gc}");
        }
    });
    let _ = cluster.on_node(node, &format!("{on_path}; berth container destroy --job {job}; rm -rf /var/lib/berth/gc-test-{pid}"));
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
