//! Images: what a user does with `berth pull|images|inspect|rm|gc|export` against the
//! test cluster's registry, checked file by file against `umoci unpack` of the same
//! image (paths, types, modes, owners, link targets, contents, hard-link groups).
//! Runs as root in this machine's root namespace, which reaches the registry directly.

use berth_e2e::{berth_binary, cluster, image_layout};
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
