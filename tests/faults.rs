//! Faults: what a user sees, and what a node keeps, when the input is bad, the registry
//! is broken or hostile, a disk fills up, or `berth` is killed at a random moment.
//! Every fault must give one clear line where the user looks, fail the job or command
//! cleanly, leave nothing mounted or running, and leave a store `berth verify` accepts.
//!
//! The broken registry is berth-testkit's fake registry serving one image per
//! repository, each broken in one way; it listens on loopback (for `berth` run here)
//! or on the loopback of a compute host's network namespace (for `srun` jobs there:
//! `localhost` registries are spoken to over plain HTTP). Unit tests of the engine
//! (`shared/src/store/pull_tests.rs`) cover corrupt and truncated blobs, auth, 429/5xx,
//! unknown tags and a full store on the engine's side; here are the user's side and
//! the cases they do not have.

use berth_e2e::{assert_nodes_clean, berth_binary, busybox_layer, cluster, image, push_image, stdout_ok};
use berth_testkit::{noise, tar_of, Auth, Blob, Compression, Entry, EntryType, Fault, Image, Layer, Registry, MANIFEST};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How one repository of the broken registry is broken.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Breakage {
    /// Served as it should be.
    Healthy,
    /// The manifest is cut off in the middle of its JSON.
    BadJson,
    /// A schema1 manifest (a media type berth does not run).
    WrongMediaType,
    /// The manifest names a layer the registry does not have.
    MissingBlob,
    /// One byte of the layer is flipped.
    DigestMismatch,
    /// The manifest never ends.
    EndlessManifest,
    /// The layer never ends.
    EndlessBlob,
    /// The layer is followed by more bytes than the manifest's size.
    LongerBlob,
    /// The connection dies half-way through the layer, every time.
    DiesMidBlob,
    /// Every request needs a login nobody has.
    Denied,
    /// Needs the test login; then sends every blob, by redirect, to the registry's other
    /// port, written so that a naive parse of the URL sees the registry's own host:
    /// `http://127.0.0.1:OTHER\@127.0.0.1:THIS/...`.
    LoginRedirectsAway,
    /// Needs a bearer token whose realm is plain HTTP on another host (the node's own
    /// address, not a registry the admin lists as insecure).
    LoginRealmElsewhere,
    /// The manifest says the config is 1 GiB, and the config never ends.
    HugeConfig,
    /// The layer starts with a GNU long-name record of 512 MiB.
    LongNameBomb,
    /// The layer starts with a PAX record of 512 MiB.
    PaxBomb,
    /// The layer holds 3000 empty files.
    ManyFiles,
}

const REPOS: &[(&str, Breakage)] = &[
    ("healthy", Breakage::Healthy),
    ("bad-json", Breakage::BadJson),
    ("media-type", Breakage::WrongMediaType),
    ("missing-blob", Breakage::MissingBlob),
    ("mismatch", Breakage::DigestMismatch),
    ("endless-manifest", Breakage::EndlessManifest),
    ("endless-blob", Breakage::EndlessBlob),
    ("longer-blob", Breakage::LongerBlob),
    ("dies-mid-blob", Breakage::DiesMidBlob),
    ("denied", Breakage::Denied),
    ("bomb", Breakage::Healthy),
    ("login-redirects-away", Breakage::LoginRedirectsAway),
    ("login-realm-elsewhere", Breakage::LoginRealmElsewhere),
    ("huge-config", Breakage::HugeConfig),
    ("long-name-bomb", Breakage::LongNameBomb),
    ("pax-bomb", Breakage::PaxBomb),
    ("many-files", Breakage::ManyFiles),
];

/// The login the `login-*` repositories want.
const LOGIN: (&str, &str) = ("berth-faults", "s3cret");

/// The broken registry on 127.0.0.1, and its second port ("another host", on every
/// address of its host): a blob store and a token service that take anyone and log
/// every request.
struct BrokenRegistry {
    registry: Registry,
    elsewhere: Registry,
}

impl BrokenRegistry {
    /// Starts the registry on 127.0.0.1 of this process's network namespace, or of the
    /// one at `netns` (a compute host's, e.g. `/run/netns/berth0-node1`).
    fn start(netns: Option<PathBuf>) -> BrokenRegistry {
        BrokenRegistry::start_on(netns, "127.0.0.1")
    }

    /// As `start`, with the host's address as other hosts reach it (for the realm of
    /// `login-realm-elsewhere`).
    fn start_on(netns: Option<PathBuf>, public_host: &str) -> BrokenRegistry {
        let registry = Registry::start_on("127.0.0.1", netns.as_deref());
        let elsewhere = Registry::start_on("0.0.0.0", netns.as_deref());
        let other = elsewhere.port();
        for (repo, breakage) in REPOS {
            let img = image_for(repo);
            registry.publish(repo, "1", &img);
            let mut st = registry.lock();
            let (repo, layer, config) = (repo.to_string(), img.layers[0].blob.digest.clone(), img.config.digest.clone());
            let answer = |content_type: &str, body: &[u8]| Fault::Answer { status: "200 OK".into(), content_type: Some(content_type.into()), body: body.to_vec() };
            match breakage {
                Breakage::Healthy | Breakage::LongNameBomb | Breakage::PaxBomb | Breakage::ManyFiles => {}
                Breakage::BadJson => {
                    st.manifest_faults.insert(repo, answer(MANIFEST, br#"{"schemaVersion":2,"layers":["#));
                }
                Breakage::WrongMediaType => {
                    let schema1 = br#"{"schemaVersion":1,"name":"media-type","tag":"1","fsLayers":[]}"#;
                    st.manifest_faults.insert(repo, answer("application/vnd.docker.distribution.manifest.v1+prettyjws", schema1));
                }
                Breakage::MissingBlob => {
                    st.blobs.remove(&layer);
                }
                Breakage::DigestMismatch => {
                    st.faults.insert(layer, Fault::Corrupt);
                }
                Breakage::EndlessManifest => {
                    st.manifest_faults.insert(repo, Fault::Endless);
                }
                Breakage::EndlessBlob => {
                    st.faults.insert(layer, Fault::Endless);
                }
                Breakage::LongerBlob => {
                    st.faults.insert(layer, Fault::Longer);
                }
                Breakage::DiesMidBlob => {
                    st.faults.insert(layer, Fault::Truncate { times: u32::MAX });
                }
                Breakage::Denied => {
                    st.auth.insert(repo, Auth::Bearer("nobody".into(), "has this".into()));
                }
                Breakage::LoginRedirectsAway => {
                    st.auth.insert(repo.clone(), Auth::Basic(LOGIN.0.into(), LOGIN.1.into()));
                    st.redirect_blobs.insert(repo, format!("http://127.0.0.1:{other}\\@{}", registry.addr));
                }
                Breakage::LoginRealmElsewhere => {
                    st.auth.insert(repo, Auth::BearerFrom(format!("http://{public_host}:{other}/token")));
                }
                Breakage::HugeConfig => {
                    st.faults.insert(config, Fault::Endless);
                }
            }
        }
        registry.share_blobs_with(&elsewhere);
        BrokenRegistry { registry, elsewhere }
    }

    fn addr(&self) -> &str {
        &self.registry.addr
    }

    /// The `Authorization` headers that reached the registry's other port.
    fn leaked(&self) -> Vec<String> {
        self.elsewhere.lock().requests.iter().filter_map(|(path, a)| a.as_ref().map(|a| format!("{path}: {a}"))).collect()
    }

    fn image(&self, repo: &str) -> String {
        format!("{}/{repo}:1", self.addr())
    }
}

/// A small runnable image per repository; `bomb`'s one layer is 64 MiB of zeros that
/// compress to some 64 KiB; `huge-config`'s manifest says its config is 1 GiB.
fn image_for(repo: &str) -> Image {
    match repo {
        "bomb" => image(&[tar_of(&[Entry::File("bomb", &vec![0u8; 64 << 20], 0o644)])], &["/bin/true"]),
        "many-files" => {
            let names: Vec<String> = (0..3000).map(|i| format!("f{i}")).collect();
            let entries: Vec<Entry> = names.iter().map(|n| Entry::File(n, b"", 0o644)).collect();
            image(&[tar_of(&entries)], &["/bin/true"])
        }
        "long-name-bomb" => header_bomb(EntryType::GNULongName).clone(),
        "pax-bomb" => header_bomb(EntryType::XHeader).clone(),
        "huge-config" => {
            let mut img = image(&[busybox_layer(repo)], &["/bin/true"]);
            let mut manifest: serde_json::Value = serde_json::from_slice(&img.manifest.bytes).unwrap();
            manifest["config"]["size"] = serde_json::json!(1u64 << 30);
            img.manifest = Blob::of(serde_json::to_vec(&manifest).unwrap());
            img
        }
        _ => image(&[busybox_layer(repo)], &["/bin/true"]),
    }
}

/// An image whose one layer starts with an extension record (GNU long name or PAX) of
/// 512 MiB of zeros, which gzip makes some 512 KiB; built once per test process.
fn header_bomb(kind: EntryType) -> &'static Image {
    static BOMBS: std::sync::OnceLock<(Image, Image)> = std::sync::OnceLock::new();
    let (long_name, pax) = BOMBS.get_or_init(|| {
        let make = |kind: EntryType| {
            let layer = Layer::streamed(&[Entry::Record(kind, 512 << 20, b""), Entry::File("after", b"x", 0o644)], Compression::Gzip);
            Image::new(vec![layer], serde_json::json!({ "Cmd": ["/bin/true"] }))
        };
        (make(EntryType::GNULongName), make(EntryType::XHeader))
    });
    if kind == EntryType::XHeader {
        pax
    } else {
        long_name
    }
}

fn base64(text: &str) -> String {
    let out = Command::new("base64").arg("-w0").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().and_then(|mut c| {
        c.stdin.take().unwrap().write_all(text.as_bytes())?;
        c.wait_with_output()
    });
    String::from_utf8(out.unwrap().stdout).unwrap()
}

/// A store, a runtime dir and an admin config of their own for `berth` run here as
/// root; unmounted and removed on drop.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        assert!(nix::unistd::geteuid().is_root(), "these tests run as root");
        let dir = std::env::temp_dir().join(format!("berth-faults-{name}-{}", std::process::id()));
        let _ = Command::new("rm").arg("-rf").arg(&dir).status();
        std::fs::create_dir_all(dir.join("store")).unwrap();
        let s = Scratch { dir };
        // The broken registries listen on loopback, which root's pulls use in plain
        // HTTP only when the site lists it.
        s.write_config(&["127.0.0.1"]);
        s
    }

    fn write_config(&self, insecure: &[&str]) {
        self.write_config_with(insecure, "");
    }

    /// The config with more lines of TOML.
    fn write_config_with(&self, insecure: &[&str], extra: &str) {
        let insecure: Vec<String> = insecure.iter().map(|r| format!("\"{r}\"")).collect();
        std::fs::write(
            self.dir.join("berth.toml"),
            format!(
                "store_dir = \"{}\"\nruntime_dir = \"{}\"\nmount_home = false\ninsecure_registries = [{}]\n{extra}",
                self.store().display(),
                self.dir.join("rt").display(),
                insecure.join(", ")
            ),
        )
        .unwrap();
    }

    fn store(&self) -> PathBuf {
        self.dir.join("store")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(berth_binary());
        c.args(args).env("BERTH_CONFIG", self.dir.join("berth.toml")).env_remove("BERTH_STORE");
        c
    }

    fn berth(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run berth")
    }

    fn ok(&self, args: &[&str]) -> String {
        stdout_ok(&self.berth(args))
    }

    /// Asserts the store is whole: `berth verify` finds nothing.
    fn verifies(&self) {
        let out = self.berth(&["verify"]);
        assert!(
            out.status.success(),
            "berth verify: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let rt = self.dir.join("rt");
        if let Ok(jobs) = std::fs::read_dir(&rt) {
            for job in jobs.flatten() {
                let _ = self.berth(&["container", "destroy", "--job", &job.file_name().to_string_lossy()]);
            }
        }
        for m in [rt, self.store()] {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = Command::new("rm").arg("-rf").arg(&self.dir).status();
    }
}

/// The one line a failed command printed, after checking it failed and printed only that.
fn one_error_line(what: &str, out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{what} should fail; stdout: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(err.trim_end().lines().count(), 1, "{what}: one error line, got: {err}");
    assert!(err.starts_with("berth: "), "{what}: {err}");
    err.trim_end().to_string()
}

#[test]
fn malformed_references_and_options_are_one_line_each() {
    let s = Scratch::new("malformed");
    let cases: &[(&[&str], &str)] = &[
        (&["pull", ""], "is not an image reference"),
        (&["pull", "has space"], "is not an image reference"),
        (&["pull", "a:b:c"], "is not an image reference"),
        (&["pull", "x@sha256:zz"], "the digest must be sha256:"),
        (&["pull", "--platform", "linux", "busybox"], "--platform linux: expected os/arch"),
        (&["pull", &"a".repeat(5000)], "too long"),
        (&["container", "create", "--job", "../x", "--user", "65534", "--image", "busybox"], "job"),
        (&["container", "create", "--job", "j1", "--user", "65534", "--image", "busybox", "--pull", "sometimes"], "not a pull policy"),
        (&["container", "create", "--job", "j1", "--user", "no-such-user-x", "--image", "busybox", "--pull", "never"], "no-such-user-x"),
        (&["container", "create", "--job", "j1", "--user", "65534", "--image", "busybox", "--pull", "never"], "pull it first"),
        (&["container", "create", "--job", "j1", "--user", "65534", "--layers", "/nonexistent-layer"], "/nonexistent-layer"),
        (&["container", "exec", "--job", "j1", "--", "true"], "has not run"),
        (&["container", "create", "--user", "65534"], "required arguments were not provided: --job <JOB>"),
        (&["pull", "--no-such-option", "busybox"], "unexpected argument '--no-such-option'"),
    ];
    for (args, expected) in cases {
        let line = one_error_line(&format!("berth {args:?}"), &s.berth(args));
        assert!(line.contains(expected), "berth {args:?}: {line}");
    }
    assert!(!s.dir.join("rt/j1/node").exists() && !s.dir.join("rt/../x").exists(), "a refused create makes no container");
    s.verifies();
}

#[test]
fn a_broken_registry_fails_the_pull_with_one_line_and_leaves_a_store_that_verifies() {
    let reg = BrokenRegistry::start(None);
    let s = Scratch::new("broken");
    let cases = [
        ("bad-json", "the manifest is not valid JSON"),
        ("media-type", "which is not an image"),
        ("missing-blob", "the registry does not have"),
        ("mismatch", "does not match its digest"),
        ("endless-manifest", "larger than berth's cap of 4 MiB"),
        ("huge-config", "larger than berth's cap of 8 MiB"),
        ("endless-blob", "longer than the manifest says"),
        ("longer-blob", "longer than the manifest says"),
        ("dies-mid-blob", "the download broke off after"),
        ("denied", "denied access"),
    ];
    for (repo, expected) in cases {
        let started = Instant::now();
        let line = one_error_line(repo, &s.berth(&["pull", "--quiet", &reg.image(repo)]));
        assert!(line.contains(&format!("cannot pull {}", reg.image(repo))) && line.contains(expected), "{repo}: {line}");
        assert!(started.elapsed() < Duration::from_secs(60), "{repo} took {:?}", started.elapsed());
        s.verifies();
    }
    assert_eq!(s.ok(&["images"]).lines().count(), 1, "nothing was stored");
    // The same registry serves a healthy image, so the failures above are the breakages'.
    s.ok(&["pull", "--quiet", &reg.image("healthy")]);
    s.verifies();
}

#[test]
fn a_decompression_bomb_fills_only_a_tmp_dir_that_is_removed() {
    let reg = BrokenRegistry::start(None);
    let s = Scratch::new("bomb");
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"]).arg(s.store()).status().unwrap();
    assert!(mounted.success());
    let line = one_error_line("bomb", &s.berth(&["pull", "--quiet", &reg.image("bomb")]));
    assert!(line.contains("no space left in the image store") && line.ends_with("free space or run `berth gc`"), "{line}");
    s.verifies();
    let used = nix::sys::statvfs::statvfs(&s.store()).unwrap();
    let used_kib = (used.blocks() - used.blocks_free()) * used.fragment_size() / 1024;
    assert!(used_kib < 1024, "the bomb's bytes were removed: {used_kib} KiB still used");
}

#[test]
fn tar_header_records_of_any_size_fail_with_one_line_and_little_memory() {
    let reg = BrokenRegistry::start(None);
    let s = Scratch::new("header-bomb");
    for repo in ["long-name-bomb", "pax-bomb"] {
        // 256 MiB of heap is ample for a pull; a 512 MiB record read into memory is not.
        let mut c = Command::new("sh");
        c.args(["-c", "ulimit -d 262144; exec \"$0\" \"$@\""]).arg(berth_binary()).args(["pull", "--quiet", &reg.image(repo)]);
        c.env("BERTH_CONFIG", s.dir.join("berth.toml")).env_remove("BERTH_STORE");
        let line = one_error_line(repo, &c.output().unwrap());
        assert!(line.contains("tar header record") && line.contains("larger than berth's cap of 1 MiB"), "{repo}: {line}");
        s.verifies();
    }
}

#[test]
fn an_image_beyond_max_image_size_or_max_image_files_stops_at_the_cap_with_one_line() {
    let reg = BrokenRegistry::start(None);
    let s = Scratch::new("caps");
    s.write_config_with(&["127.0.0.1"], "max_image_size = \"16M\"\nmax_image_files = 1000\n");
    // 64 MiB of zeros against a 16 MiB cap: stopped at the cap, not at a full disk.
    let line = one_error_line("bomb", &s.berth(&["pull", "--quiet", &reg.image("bomb")]));
    assert!(line.contains("unpacks to more than max_image_size (16M)") && line.contains("raise max_image_size"), "{line}");
    s.verifies();
    let line = one_error_line("many-files", &s.berth(&["pull", "--quiet", &reg.image("many-files")]));
    assert!(line.contains("more than max_image_files (1000) files") && line.contains("raise max_image_files"), "{line}");
    s.verifies();
    assert!(std::fs::read_dir(s.store().join("tmp")).unwrap().next().is_none(), "nothing of either image is left in tmp/");
    // The defaults let both through.
    s.write_config(&["127.0.0.1"]);
    s.ok(&["pull", "--quiet", &reg.image("many-files")]);
    s.ok(&["pull", "--quiet", &reg.image("bomb")]);
    s.verifies();
}

/// The address of a compute host on the test bridge (as `slurm-test-env/lib.sh` gives it).
fn node_addr(node: &str) -> String {
    let k: u32 = std::env::var("BERTH_TEST_CLUSTER").ok().and_then(|k| k.parse().ok()).unwrap_or(0);
    let n: u32 = node.trim_start_matches("node").parse().unwrap();
    format!("10.203.{}.{}", 77 + k, 10 + n)
}

#[test]
fn a_jobs_registry_login_never_reaches_another_port_by_redirect_or_a_plain_http_realm_of_another_host() {
    let cluster = cluster();
    let (node, netns) = node_and_netns();
    let reg = BrokenRegistry::start_on(Some(netns), &node_addr(&node));
    let alice = &cluster.users()[0];
    // alice's login for the broken registry, in a Docker config dir of hers that the job names.
    let dir = format!("/home/{alice}/berth-faults-login-{}", std::process::id());
    let auth = base64(&format!("{}:{}", LOGIN.0, LOGIN.1));
    stdout_ok(&cluster.run_as(
        alice,
        &format!("mkdir -p {dir} && printf '{{\"auths\":{{\"{}\":{{\"auth\":\"{auth}\"}}}}}}' >{dir}/config.json && chmod 600 {dir}/config.json", reg.addr()),
    ));
    let (away, realm) = (reg.image("login-redirects-away"), reg.image("login-realm-elsewhere"));
    // One job per image (a job's container has one image).
    let job = |image: &str| cluster.run(&format!("DOCKER_CONFIG={dir} srun -N1 -w {node} --container={image} sh -c 'echo JOB=$SLURM_JOB_ID'; echo rc=$?"));
    let (redirected, realmed) = (job(&away), job(&realm));
    let _ = cluster.run_as(alice, &format!("rm -rf {dir}"));
    let text = |out: &Output| (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    let ((out1, err1), (out2, err2)) = (text(&redirected), text(&realmed));
    assert_eq!(reg.leaked(), Vec::<String>::new(), "alice's login reached another port: {out1} {err1} {out2} {err2}");
    // Blobs on another port are fetched without the login; the realm is refused with one line.
    assert!(out1.contains("rc=0"), "{out1} {err1}");
    assert_nodes_clean(&cluster, &berth_e2e::job_of(&out1));
    assert!(out2.contains("rc=1"), "{out2} {err2}");
    let ours: Vec<&str> = err2.lines().filter(|l| l.contains("error: berth:")).collect();
    assert_eq!(ours.len(), 1, "{err2}");
    assert!(ours[0].contains(&format!("cannot start image {realm}: ")) && ours[0].contains("over plain HTTP"), "{}", ours[0]);
}

#[test]
fn processes_that_leave_the_containers_namespaces_or_its_session_do_not_outlive_the_job() {
    let cluster = cluster();
    let (node, _) = node_and_netns();
    let image = format!("{}/minimal:latest", cluster.registry());
    // A user namespace with its own mount namespace (what any user may make), and a
    // double-forked daemon in a session of its own.
    let escape = "unshare -Urm sleep 1000 </dev/null >/dev/null 2>&1 & setsid sh -c \\\"sleep 1001 </dev/null >/dev/null 2>&1 &\\\"; sleep 1";
    let out = stdout_ok(&cluster.run(&format!("srun -N1 -w {node} --container={image} sh -c \"echo JOB=\\$SLURM_JOB_ID; {escape}; echo started\"")));
    assert!(out.contains("started"), "{out}");
    assert_nodes_clean(&cluster, &berth_e2e::job_of(&out));
    // The same from a batch job that is cancelled while its task runs.
    let out = stdout_ok(&cluster.run(&format!(
        "sbatch --parsable -N1 -w {node} --wrap \"srun --container={image} sh -c '{escape}; sleep 300'\""
    )));
    let job = out.trim().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let running = cluster.on_node(&node, &format!("test -n \"$({})\" && pgrep -f 'sleep 1001' >/dev/null", berth_e2e::job_pids_shell(&job)));
        if running.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "job {job} never started its task");
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(1));
    stdout_ok(&cluster.run(&format!("scancel {job}")));
    assert_nodes_clean(&cluster, &job);
}

/// The compute host the node tests use, and its network namespace.
fn node_and_netns() -> (String, PathBuf) {
    let node = cluster().nodes()[0].clone();
    let k = std::env::var("BERTH_TEST_CLUSTER").unwrap_or_else(|_| "0".into());
    (node.clone(), PathBuf::from(format!("/run/netns/berth{k}-{node}")))
}

#[test]
fn a_broken_registry_or_a_bad_option_fails_the_job_with_one_line_on_srun() {
    let cluster = cluster();
    let (node, netns) = node_and_netns();
    let reg = BrokenRegistry::start(Some(netns));
    let cases = [
        (reg.image("mismatch"), "does not match its digest"),
        (reg.image("dies-mid-blob"), "the download broke off after"),
        (reg.image("missing-blob"), "the registry does not have"),
        ("localhost:1/nothing:1".to_string(), "cannot reach registry localhost:1"),
        (format!("{}/minimal:no-such-tag", cluster.registry()), "not found"),
    ];
    let script: String = cases.iter().map(|(image, _)| format!("srun --container={image} true; echo rc=$?; ")).collect();
    let out = cluster.run(&format!("salloc -N1 -w {node} sh -c 'echo JOB=$SLURM_JOB_ID; {script}'"));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.matches("rc=").count(), cases.len(), "{stdout} {stderr}");
    assert!(!stdout.contains("rc=0"), "every step fails: {stdout}");
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("error: berth:")).collect();
    assert_eq!(ours.len(), cases.len(), "one line per failed step: {stderr}");
    for ((image, expected), line) in cases.iter().zip(&ours) {
        assert!(line.contains(&format!("cannot start image {image}: ")) && line.contains(expected), "{image}: {line}");
    }
    let job = stdout.lines().find_map(|l| l.strip_prefix("JOB=")).expect("JOB= line").trim().to_string();
    assert_nodes_clean(&cluster, &job);
    let verify = cluster.on_node(&node, &format!("{} verify", berth_binary().display()));
    assert!(verify.status.success(), "the node's store: {}", String::from_utf8_lossy(&verify.stdout));

    // Options srun itself refuses, before anything runs on a node: one line each.
    let bad_options = [
        ("--container-mounts=relative:/x", "SRC must be an absolute path"),
        ("--container-mounts=/tmp:/", "cannot mount over the container's root"),
        ("--container-pull=sometimes", "expected missing, always or never"),
        ("--container-workdir=relative", "must be an absolute path"),
        ("--container-image=-x", "does not start with '-'"),
        ("--container-env=1BAD", "is not a variable name"),
    ];
    for (option, expected) in bad_options {
        let out = cluster.run(&format!("srun -N1 --container={} {option} true", cluster.registry() + "/minimal:latest"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{option} was accepted");
        let ours: Vec<&str> = stderr.lines().filter(|l| l.contains(expected)).collect();
        assert_eq!(ours.len(), 1, "{option}: one line saying what is wrong: {stderr}");
    }
}

#[test]
fn a_full_store_or_runtime_dir_on_a_node_fails_create_with_one_line_and_leaves_nothing() {
    let cluster = cluster();
    let (node, _) = node_and_netns();
    let registry = cluster.registry();
    let dir = format!("/tmp/berth-faults-full-{}", std::process::id());
    let b = berth_binary().display().to_string();
    let user = &cluster.users()[0];
    // Small file systems, mounted in the node's own mount namespace only.
    let setup = format!(
        "set -e; mkdir -p {dir}/store {dir}/rt {dir}/rt2; mount -t tmpfs -o size=8m tmpfs {dir}/store; \
         mount -t tmpfs -o size=8k tmpfs {dir}/rt; \
         printf 'store_dir = \"{dir}/store\"\\nruntime_dir = \"{dir}/rt2\"\\ninsecure_registries = [\"{registry}\"]\\n' >{dir}/full-store.toml; \
         printf 'store_dir = \"/var/lib/berth\"\\nruntime_dir = \"{dir}/rt\"\\ninsecure_registries = [\"{registry}\"]\\n' >{dir}/full-rt.toml"
    );
    let cleanup = format!("umount -l {dir}/store {dir}/rt {dir}/rt2 2>/dev/null; rm -rf {dir}");
    let result = std::panic::catch_unwind(|| {
        stdout_ok(&cluster.on_node(&node, &setup));
        // The store fills while pulling a 97 MiB image.
        let out = cluster.on_node(&node, &format!("BERTH_CONFIG={dir}/full-store.toml {b} container create --job full1 --user {user} --image {registry}/mpi:latest"));
        let line = one_error_line("create with a full store", &out);
        assert!(line.contains("no space left in the image store") && line.contains("berth gc"), "{line}");
        let after = stdout_ok(&cluster.on_node(
            &node,
            &format!("BERTH_CONFIG={dir}/full-store.toml {b} verify >/dev/null && echo verified; test -e {dir}/rt2/full1/node && echo container-left || echo no-container"),
        ));
        assert_eq!(after, "verified\nno-container\n", "the store verifies and no container was made");
        // The runtime dir fills while the container is made.
        let out = cluster.on_node(&node, &format!("BERTH_CONFIG={dir}/full-rt.toml {b} container create --job full2 --user {user} --image {registry}/minimal:latest"));
        let line = one_error_line("create with a full runtime dir", &out);
        assert!(line.contains("no space left on its file system; free space there"), "{line}");
        eprintln!("runtime dir full: {line}");
        // Only the job's lock stays, for the job's other tasks; the epilogue removes it.
        let left = stdout_ok(&cluster.on_node(&node, &format!("ls -A {dir}/rt/full2 2>/dev/null; grep -c '{dir}/rt/' /proc/self/mountinfo || true")));
        assert_eq!(left.trim(), ".lock\n0", "nothing left of the container: {left}");
        let left = stdout_ok(&cluster.on_node(&node, &format!("BERTH_CONFIG={dir}/full-rt.toml {b} container destroy --job full2 >/dev/null; ls {dir}/rt")));
        assert_eq!(left.trim(), "", "the epilogue leaves nothing: {left}");
        // Once there is room again, the same job starts.
        stdout_ok(&cluster.on_node(&node, &format!("mount -o remount,size=64m {dir}/rt")));
        let out = cluster.on_node(&node, &format!("BERTH_CONFIG={dir}/full-rt.toml {b} container create --job full2 --user {user} --image {registry}/minimal:latest && BERTH_CONFIG={dir}/full-rt.toml {b} container exec --job full2 -- true && BERTH_CONFIG={dir}/full-rt.toml {b} container destroy --job full2"));
        stdout_ok(&out);
    });
    let _ = cluster.on_node(&node, &cleanup);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// A small seeded generator (xorshift), so a failing sequence of kills can be replayed.
struct Rng(u64);

impl Rng {
    fn from_env(test: &str) -> Rng {
        let seed = std::env::var("BERTH_FAULTS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
        });
        eprintln!("{test}: seed {seed} (replay with BERTH_FAULTS_SEED={seed})");
        Rng(seed | 1)
    }

    /// Uniform in 0..n (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Live (not zombie) processes started by this scratch's berth, the anchors it forks included.
fn berth_processes_of(s: &Scratch) -> Vec<String> {
    let marker = format!("BERTH_CONFIG={}", s.dir.join("berth.toml").display());
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        if !environ.split(|b| *b == 0).any(|v| v == marker.as_bytes()) {
            continue;
        }
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        if !status.contains("State:\tZ") && pid != std::process::id() {
            found.push(format!("{pid}: {}", String::from_utf8_lossy(&std::fs::read(entry.path().join("cmdline")).unwrap_or_default()).replace('\0', " ")));
        }
    }
    found
}

fn mounts_under(path: &Path) -> Vec<String> {
    let p = path.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo").unwrap().lines().filter(|l| l.contains(&p)).map(String::from).collect()
}

/// Starts `berth ARGS`, kills it with SIGKILL after `delay`; whether it was still running.
fn kill_after(s: &Scratch, args: &[&str], delay: Duration) -> bool {
    let mut child = s.command(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    std::thread::sleep(delay);
    let running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    running
}

#[test]
fn berth_killed_at_random_points_of_pull_unpack_create_and_destroy_leaves_a_node_the_next_job_uses() {
    let registry = cluster().registry();
    let s = Scratch::new("killed");
    s.write_config(&[&registry]);
    let image = format!("{registry}/mpi:latest");
    let create = |job: &str| -> Vec<String> {
        ["container", "create", "--job", job, "--user", "65534", "--gid", "65534", "--image", &image].iter().map(|a| a.to_string()).collect()
    };
    let mut rng = Rng::from_env("kill -9");
    // How long the uncached create and the destroy take here: the kills land anywhere in them.
    let timed = |args: &[&str]| {
        let t = Instant::now();
        s.ok(args);
        t.elapsed()
    };
    let create_time = timed(&create("calibrate").iter().map(|a| &**a).collect::<Vec<_>>());
    let destroy_time = timed(&["container", "destroy", "--job", "calibrate"]);
    let (mut mid_create, mut mid_destroy) = (0, 0);
    for round in 0..4 {
        let job = format!("k{round}");
        // Evict the image, so that create pulls and unpacks it again.
        let _ = s.berth(&["rm", &image]);
        s.ok(&["gc"]);
        let delay = Duration::from_micros(rng.below(create_time.as_micros() as u64 + 1));
        let args = create(&job);
        mid_create += kill_after(&s, &args.iter().map(|a| &**a).collect::<Vec<_>>(), delay) as u32;
        eprintln!("round {round}: create killed after {delay:?}");
        // The next create of the job succeeds and runs a task.
        s.ok(&args.iter().map(|a| &**a).collect::<Vec<_>>());
        assert!(!s.ok(&["container", "exec", "--job", &job, "--", "cat", "/etc/debian_version"]).trim().is_empty());
        let delay = Duration::from_micros(rng.below(destroy_time.as_micros() as u64 + 1));
        mid_destroy += kill_after(&s, &["container", "destroy", "--job", &job], delay) as u32;
        eprintln!("round {round}: destroy killed after {delay:?}");
        let done: serde_json::Value = serde_json::from_str(&s.ok(&["container", "destroy", "--job", &job])).unwrap();
        assert!(done["containers"].as_u64().unwrap() <= 1, "{done}");
        assert!(!s.dir.join("rt").join(&job).exists(), "round {round}: the job dir is gone");
        assert!(mounts_under(&s.dir.join("rt").join(&job)).is_empty(), "round {round}: {:?}", mounts_under(&s.dir.join("rt")));
        assert!(berth_processes_of(&s).is_empty(), "round {round}: left running: {:?}", berth_processes_of(&s));
        s.ok(&["gc"]);
        s.verifies();
    }
    eprintln!("kills during create: {mid_create} of 4, during destroy: {mid_destroy} of 4");
}

#[test]
fn a_node_with_debris_of_crashed_jobs_runs_the_next_job() {
    let cluster = cluster();
    let (node, _) = node_and_netns();
    let b = berth_binary().display().to_string();
    let user = &cluster.users()[0];
    let image = format!("{}/minimal:latest", cluster.registry());
    let job = format!("debris-{}", std::process::id());
    // A half-made container (upper dir, no pin, no state), a pin whose anchor is long
    // gone, a pin into a live process that is not the job's (a reused pid), a stale
    // lock file, a stray file and half a state file: what a node keeps after crashes.
    let debris = format!(
        "set -e; d=/run/berth/{job}; mkdir -p $d/node/upper/etc $d/node/work $d/rank-0 $d/rank-1; : >$d/.lock; \
         echo half >$d/node/upper/etc/file; ln -s /proc/999999999/ns/mnt $d/rank-0/mnt; echo '{{\"mnt_ino' >$d/rank-0/state.json; \
         setsid unshare -m sleep 300 </dev/null >/dev/null 2>&1 & echo $! >/tmp/berth-faults-{job}.pid; \
         sleep 0.5; ln -s /proc/$(cat /tmp/berth-faults-{job}.pid)/ns/mnt $d/rank-1/mnt; echo stray >$d/stray"
    );
    stdout_ok(&cluster.on_node(&node, &debris));
    let innocent = std::fs::read_to_string(format!("/tmp/berth-faults-{job}.pid")).unwrap().trim().to_string();
    let result = std::panic::catch_unwind(|| {
        // The next job of that id on the node: create, run, and a second step reusing it.
        let out = stdout_ok(&cluster.on_node(
            &node,
            &format!(
                "{b} container create --job {job} --user {user} --image {image} && {b} container exec --job {job} -- sh -c 'test ! -e /etc/file && echo fresh' && \
                 {b} container create --job {job} --user {user} --image {image} --rank 1 && {b} container exec --job {job} --rank 1 -- true && echo rank-ok"
            ),
        ));
        assert!(out.contains("fresh") && out.contains("rank-ok"), "{out}");
        // The epilogue, twice: everything goes, but not the process that was never the job's.
        let out = stdout_ok(&cluster.on_node(&node, &format!("{b} container destroy --job {job}; {b} container destroy --job {job}; test ! -e /run/berth/{job} && echo gone")));
        assert!(out.contains("gone") && out.contains("\"containers\":0"), "{out}");
        assert!(Path::new(&format!("/proc/{innocent}")).exists(), "destroy killed a process that was not in the job's container");
        // A real job on that node still runs.
        let out = stdout_ok(&cluster.run(&format!("srun -N1 -w {node} --container={image} sh -c 'echo JOB=$SLURM_JOB_ID; cat /etc/os-release'")));
        assert!(out.contains("berth minimal"), "{out}");
        let id = out.lines().find_map(|l| l.strip_prefix("JOB=")).unwrap().trim().to_string();
        assert_nodes_clean(&cluster, &id);
    });
    let _ = Command::new("kill").arg("-KILL").arg(&innocent).status();
    let _ = std::fs::remove_file(format!("/tmp/berth-faults-{job}.pid"));
    let _ = cluster.on_node(&node, &format!("{b} container destroy --job {job}; rm -rf /run/berth/{job}"));
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn on_a_node_create_and_destroy_killed_at_random_moments_leave_no_anchor_mount_or_dir() {
    // On the test cluster's nodes the kernel may refuse the nsfs bind, so pins may be
    // anchor processes: a create killed half-way must not leave one behind.
    let cluster = cluster();
    let (node, _) = node_and_netns();
    let b = berth_binary().display().to_string();
    let user = &cluster.users()[0];
    let image = format!("{}/minimal:latest", cluster.registry());
    let job = format!("kill-node-{}", std::process::id());
    let create = format!("{b} container create --job $J --user {user} --image {image}");
    let calibrate = format!(
        "J={job}-c; s=$(date +%s%N); {create} >/dev/null && e=$(date +%s%N) && {b} container destroy --job $J >/dev/null && echo $(( (e - s) / 1000 ))"
    );
    let create_us: u64 = stdout_ok(&cluster.on_node(&node, &calibrate)).trim().parse().unwrap();
    let mut rng = Rng::from_env("kill -9 on a node");
    let mut mid_create = 0;
    for round in 0..16 {
        // `timeout` and the shell cost part of the calibrated time: aim at the first two thirds.
        let (d1, d2) = (rng.below(create_us * 2 / 3 + 1), rng.below(create_us / 2 + 1));
        let script = format!(
            "J={job}-{round}; timeout -s KILL {}.{:06} {create} >/dev/null 2>&1; echo create-status=$?; \
             {create} >/dev/null && {b} container exec --job $J -- true && echo next-ok; \
             timeout -s KILL {}.{:06} {b} container destroy --job $J >/dev/null 2>&1; \
             {b} container destroy --job $J >/dev/null && test ! -e /run/berth/$J && echo destroyed; \
             pgrep -f -- \"--job $J( |\\$)\" >/dev/null && echo process-left || echo no-process; \
             echo mounts=$(grep -c \" /run/berth/$J/\" /proc/self/mountinfo)",
            d1 / 1_000_000,
            d1 % 1_000_000,
            d2 / 1_000_000,
            d2 % 1_000_000
        );
        let out = stdout_ok(&cluster.on_node(&node, &script));
        eprintln!("round {round}: create killed after {d1} us, destroy after {d2} us: {}", out.replace('\n', " "));
        assert!(out.contains("next-ok\ndestroyed\nno-process\nmounts=0\n"), "round {round} (delays {d1} us, {d2} us): {out}");
        mid_create += out.contains("create-status=137") as u32;
    }
    eprintln!("kills that landed during create: {mid_create} of 16");
}

/// Pushes an image no node has seen (a busybox layer stamped `REPO SEED` and `noise_len`
/// bytes of noise, both unique to this run) as `REPO:1` to the cluster's registry;
/// returns its reference there.
fn push_unique_image(repo: &str, noise_len: usize) -> String {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let noise = noise(noise_len, seed);
    push_image(&image(&[busybox_layer(&format!("{repo} {seed}")), tar_of(&[Entry::File("noise", &noise, 0o644)])], &["/bin/true"]), &format!("{repo}:1"))
}

/// A registry that trickles: a proxy to the cluster's registry, on 127.0.0.1 of a
/// compute host's network namespace, that relays everything at once except blobs over
/// 1 MiB, whose bodies it sends 4 KiB at once and then one byte every `gap` (under
/// berth's per-read timeout, so no read ever times out), until told to hurry.
struct TrickleRegistry {
    addr: String,
    /// Blob bodies it has started to trickle.
    trickling: Arc<AtomicUsize>,
    /// Set: the rest of every body goes at once.
    hurry: Arc<std::sync::atomic::AtomicBool>,
}

impl TrickleRegistry {
    fn start(netns: PathBuf, upstream: String, gap: Duration) -> TrickleRegistry {
        let (tx, rx) = std::sync::mpsc::channel();
        let trickling = Arc::new(AtomicUsize::new(0));
        let hurry = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (counter, hurried) = (trickling.clone(), hurry.clone());
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&netns).unwrap_or_else(|e| panic!("{}: {e}", netns.display()));
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("enter the host's network namespace");
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            tx.send(listener.local_addr().unwrap().to_string()).unwrap();
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (upstream, counter, hurried) = (upstream.clone(), counter.clone(), hurried.clone());
                std::thread::spawn(move || {
                    let _ = relay(conn, &upstream, &counter, &hurried, gap);
                });
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(60)).expect("the trickling registry started");
        TrickleRegistry { addr, trickling, hurry }
    }
}

/// Relays one request (as HTTP/1.0, so the upstream closes after its answer) and its answer.
fn relay(mut conn: TcpStream, upstream: &str, trickling: &AtomicUsize, hurry: &std::sync::atomic::AtomicBool, gap: Duration) -> std::io::Result<()> {
    use std::io::Read;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("GET").to_string(), parts.next().unwrap_or("/").to_string());
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: {upstream}\r\n");
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
        if name != "host" && name != "connection" {
            head.push_str(&line);
        }
    }
    head.push_str("\r\n");
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(head.as_bytes())?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").map_or(answer.len(), |p| p + 4);
    let (answer_head, body) = answer.split_at(split);
    let text = String::from_utf8_lossy(answer_head);
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or_default().to_string();
    let kept: String = lines.filter(|l| !l.is_empty() && !l.to_ascii_lowercase().starts_with("connection:")).map(|l| format!("{l}\r\n")).collect();
    conn.write_all(format!("{status}\r\n{kept}Connection: close\r\n\r\n").as_bytes())?;
    if method == "GET" && path.contains("/blobs/") && body.len() > 1 << 20 {
        trickling.fetch_add(1, Ordering::SeqCst);
        conn.write_all(&body[..4096])?;
        for (i, byte) in body.iter().enumerate().skip(4096) {
            if hurry.load(Ordering::SeqCst) {
                return conn.write_all(&body[i..]);
            }
            std::thread::sleep(gap);
            conn.write_all(std::slice::from_ref(byte))?;
        }
        Ok(())
    } else {
        conn.write_all(body)
    }
}

/// The review's cross-user denial of service (review 13, finding 4): alice's job pulls
/// an image from a registry that trickles its big layer, so her root `berth` sits in the
/// download holding that layer's lock, and she stops her step with
/// `scancel -s STOP`. bob's job needing the same image on that node must still start,
/// well within the half hour a pull waits for another's lock. Then alice's step goes on
/// and the registry hurries: her pull, which lost the race to publish, drops its copy
/// and her job runs on bob's, leaving a store that verifies.
#[test]
fn a_stopped_or_trickling_pull_of_one_user_does_not_hold_up_another_users_job_needing_the_same_layers() {
    let cluster = cluster();
    let (node, netns) = node_and_netns();
    let repo = format!("stopped-pull-{}", std::process::id());
    let image = push_unique_image(&repo, 8 << 20);
    let trickle = TrickleRegistry::start(netns, cluster.registry(), Duration::from_secs(2));
    let users = cluster.users();
    let (alice, bob) = (&users[0], &users[1]);
    let alices_image = format!("{}/{repo}:1", trickle.addr);
    let alice_out = format!("/home/{alice}/{repo}.out");
    let alice_job = stdout_ok(&cluster.run_as(
        alice,
        &format!("sbatch --parsable -N1 -w {node} -o {alice_out} --wrap \"srun --container={alices_image} cat /stamp\""),
    ))
    .trim()
    .to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    while trickle.trickling.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "alice's job {alice_job} never started to download the big layer");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Her root berth is in the download (and, before the fix, holds the layer's lock).
    std::thread::sleep(Duration::from_secs(2));
    stdout_ok(&cluster.run_as(alice, &format!("scancel -s STOP {alice_job}.0")));
    let start = Instant::now();
    let out = cluster.run_as(bob, &format!("timeout 150 srun -N1 -w {node} --container={image} sh -c 'echo JOB=$SLURM_JOB_ID; cat /stamp; echo'"));
    let took = start.elapsed();
    let stopped = cluster.on_node(&node, "grep -l '^State:.*stopped' /proc/[0-9]*/status | wc -l");
    let _ = cluster.run_as(alice, &format!("scancel -s CONT {alice_job}.0"));
    trickle.hurry.store(true, Ordering::SeqCst);
    let alice_deadline = Instant::now() + Duration::from_secs(90);
    while !stdout_ok(&cluster.run_as(alice, &format!("squeue -h -j {alice_job} 2>/dev/null"))).trim().is_empty() {
        if Instant::now() > alice_deadline {
            let _ = cluster.run_as(alice, &format!("scancel {alice_job}"));
            panic!("alice's job {alice_job} did not end once it went on");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let alice_said = stdout_ok(&cluster.run_as(alice, &format!("cat {alice_out}; rm -f {alice_out}")));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && stdout.contains(&format!("{repo} ")),
        "bob's job did not start while alice's pull was stopped ({} s; processes stopped on {node}: {}): {stdout} {stderr}",
        took.as_secs(),
        String::from_utf8_lossy(&stopped.stdout).trim()
    );
    assert!(took < Duration::from_secs(60), "bob's job took {} s to start", took.as_secs());
    eprintln!("bob's job started and ended in {:.1} s while alice's pull was stopped", took.as_secs_f64());
    assert_nodes_clean(&cluster, &berth_e2e::job_of(&stdout));
    assert!(alice_said.contains(&format!("{repo} ")), "alice's job, once it went on: {alice_said}");
    assert_nodes_clean(&cluster, &alice_job);
    let verify = cluster.on_node(&node, &format!("{} verify", berth_binary().display()));
    assert!(verify.status.success(), "the node's store: {}", String::from_utf8_lossy(&verify.stdout));
}

/// The trickling registry alone: a layer download that keeps every read under the
/// per-read timeout still ends, at 30 s plus its size at `min_pull_rate` (100K by
/// default), with one line naming the registry and the rate.
#[test]
fn a_registry_trickling_a_layer_fails_the_pull_at_the_minimum_rate_with_one_line() {
    let cluster = cluster();
    let (node, netns) = node_and_netns();
    let repo = format!("trickled-{}", std::process::id());
    push_unique_image(&repo, 2 << 20);
    let trickle = TrickleRegistry::start(netns, cluster.registry(), Duration::from_secs(2));
    let image = format!("{}/{repo}:1", trickle.addr);
    let start = Instant::now();
    let out = cluster.run(&format!("timeout 200 srun -N1 -w {node} --container={image} true; echo rc=$?"));
    let took = start.elapsed();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(trickle.trickling.load(Ordering::SeqCst) >= 1, "the big layer was never asked for: {stdout} {stderr}");
    assert!(stdout.contains("rc=1"), "{stdout} {stderr}");
    // 2 MiB at 100K/s: 30 s + 20 s, plus one read's gap.
    assert!(took < Duration::from_secs(90), "the pull took {} s to give up", took.as_secs());
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("error: berth:")).collect();
    assert_eq!(ours.len(), 1, "{stderr}");
    assert!(ours[0].contains(&format!("registry {} ", trickle.addr)) && ours[0].contains("minimum rate of 100K/s (min_pull_rate)"), "{}", ours[0]);
    let b = berth_binary().display().to_string();
    let verify = cluster.on_node(&node, &format!("{b} verify"));
    assert!(verify.status.success(), "the node's store: {}", String::from_utf8_lossy(&verify.stdout));
}

/// The node-wide runtime dir lock (`<runtime_dir>/.lock`) held by a create its job
/// stopped (here: held by a `flock` that never lets go, as a stopped create would):
/// once the runtime dir is a private mount, no create takes that lock, so bob's job
/// starts at once instead of failing after the 3 min a job lock is waited for.
#[test]
fn a_held_runtime_dir_lock_holds_up_no_create_once_the_runtime_dir_is_private() {
    let cluster = cluster();
    let (node, _) = node_and_netns();
    let image = format!("{}/minimal:latest", cluster.registry());
    let bob = &cluster.users()[1];
    // A first job makes the runtime dir private (a no-op where it already is).
    stdout_ok(&cluster.run_as(bob, &format!("srun -N1 -w {node} --container={image} true")));
    let holder = cluster.on_node(&node, "setsid flock -x /run/berth/.lock sleep 120 </dev/null >/dev/null 2>&1 & echo $!");
    let holder = stdout_ok(&holder).trim().to_string();
    let start = Instant::now();
    let out = cluster.run_as(bob, &format!("timeout 100 srun -N1 -w {node} --container={image} sh -c 'echo JOB=$SLURM_JOB_ID'"));
    let took = start.elapsed();
    let _ = cluster.on_node(&node, &format!("pkill -KILL -P {holder}; kill -KILL {holder}"));
    let text = stdout_ok(&out);
    assert!(took < Duration::from_secs(30), "bob's job took {} s with the runtime dir's lock held", took.as_secs());
    assert_nodes_clean(&cluster, &berth_e2e::job_of(&text));
}

/// Runs its closure when dropped: a test's cleanup, also when the test fails.
struct AtEnd<F: FnMut()>(F);

impl<F: FnMut()> Drop for AtEnd<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// Restarts slurmd on `node` (no job of which may be running) as `slurm-test-env/up`
/// starts it, its runtime dir made a mount that propagates first, as on a node just
/// booted (systemd makes `/run` shared; no create has bound the dir on itself yet).
/// Returns, once slurmd has started, whether slurmd runs in the node's own mount
/// namespace and its `/proc/PID/mountinfo` line of the runtime dir.
fn restart_slurmd_with_a_shared_runtime_dir(cluster: &berth_e2e::Cluster, node: &str) -> (bool, String) {
    let log = berth_e2e::state_dir().join("log").join(node).join("slurmd.log");
    let starts = || std::fs::read_to_string(&log).unwrap_or_default().matches("slurmd started on").count();
    let before = starts();
    stdout_ok(&cluster.on_node(
        node,
        "pid=$(cat /run/slurm/slurmd.pid) && kill $pid && for i in $(seq 100); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done; \
         ! kill -0 $pid 2>/dev/null || { echo \"slurmd $pid did not stop\" >&2; exit 1; }; \
         mount --make-shared /run/berth && slurmd </dev/null >/dev/null 2>&1",
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while starts() == before {
        assert!(Instant::now() < deadline, "slurmd did not start again on {node}: see {}", log.display());
        std::thread::sleep(Duration::from_millis(100));
    }
    let seen = stdout_ok(&cluster.on_node(
        node,
        "pid=$(cat /run/slurm/slurmd.pid); [ \"$(readlink /proc/$pid/ns/mnt)\" = \"$(readlink /proc/self/ns/mnt)\" ] && echo same-namespace; \
         awk '$5 == \"/run/berth\"' /proc/$pid/mountinfo | tail -1",
    ));
    let mut lines = seen.lines();
    let first = lines.next().unwrap_or_default();
    if first == "same-namespace" {
        (true, lines.next().unwrap_or_default().to_string())
    } else {
        (false, first.to_string())
    }
}

/// The same lock held on a node where slurmd has just started and no job has run
/// since, whose runtime dir was not private before (as after boot). slurmd makes the
/// dir private as it starts (berth.so's `slurm_spank_init` in slurmd), before any job
/// can run there, so not even the node's first create takes the lock: bob's job starts
/// at once instead of failing after the 3 min a job lock is waited for. The node is
/// reserved for bob meanwhile, so that no other test's job sees slurmd restart.
#[test]
fn a_held_runtime_dir_lock_holds_up_no_create_on_a_node_whose_slurmd_just_started() {
    let cluster = cluster();
    let node = cluster.nodes().last().expect("a compute host").clone();
    let image = format!("{}/minimal:latest", cluster.registry());
    let bob = &cluster.users()[1];
    let resv = format!("berth-fresh-slurmd-{}", std::process::id());
    // Refused while a job runs on the node: wait for it to be free.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let create = format!("scontrol create reservation ReservationName={resv} Users={bob} Nodes={node} StartTime=now Duration=30");
        let out = cluster.run_as("root", &create);
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "cannot reserve {node}: {}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_secs(1));
    }
    let _reserved = AtEnd(|| {
        let _ = cluster.run_as("root", &format!("scontrol delete ReservationName={resv}"));
    });
    let _restored = AtEnd(|| {
        let _ = cluster.on_node(&node, "mount --make-private /run/berth; kill -0 $(cat /run/slurm/slurmd.pid) 2>/dev/null || slurmd </dev/null >/dev/null 2>&1");
    });
    let (own_namespace, mount) = restart_slurmd_with_a_shared_runtime_dir(&cluster, &node);
    let holder = stdout_ok(&cluster.on_node(&node, "setsid flock -x /run/berth/.lock sleep 300 </dev/null >/dev/null 2>&1 & echo $!")).trim().to_string();
    let held = AtEnd(|| {
        let _ = cluster.on_node(&node, &format!("pkill -KILL -P {holder}; kill -KILL {holder}"));
    });
    let start = Instant::now();
    let out = cluster.run_as(bob, &format!("timeout 200 srun -N1 -w {node} --reservation={resv} --container={image} sh -c 'echo JOB=$SLURM_JOB_ID'"));
    let took = start.elapsed();
    drop(held);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && took < Duration::from_secs(30),
        "bob's job took {} s with the runtime dir's lock held ({}): {stdout} {stderr}",
        took.as_secs(),
        out.status
    );
    eprintln!("bob's job started and ended in {:.1} s with the runtime dir's lock held", took.as_secs_f64());
    assert!(own_namespace, "slurmd on {node} runs in a mount namespace of its own, not the node's");
    let optional: Vec<&str> = mount.split(' ').skip(6).take_while(|f| *f != "-").collect();
    assert!(
        !mount.is_empty() && !optional.iter().any(|f| f.starts_with("shared:") || f.starts_with("master:")),
        "the runtime dir is not a private mount right after slurmd started: {mount:?}"
    );
    assert_nodes_clean(&cluster, &berth_e2e::job_of(&stdout));
}
