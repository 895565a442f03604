//! The node's image store and runtime dir are root's, whatever the job user does: their
//! umask, a hand-edited record, a lock file held forever, another user's private image.
//! Each test runs its attack as a regular user (alice, bob) on the slurm-test-env
//! cluster, on the first compute host, and checks the host as root afterwards.
//! docs/security.md says which boundary each one guards.

use berth_e2e::{cluster, job_of, repo_root, stdout_ok, Cluster};
use berth_testkit::{digest, tar_of, Compression, Entry, Image, Layer};
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The node's store and runtime dir, as the test cluster's admin config names them.
const STORE: &str = "/var/lib/berth";
const RUNTIME: &str = "/run/berth";


fn sh(line: &str) {
    let out = Command::new("sh").args(["-c", line]).output().unwrap();
    assert!(out.status.success(), "{line}: {}", String::from_utf8_lossy(&out.stderr));
}

/// `registry/minimal:latest` copied to a tag no node has seen (`login` for the registry that needs one).
fn fresh_tag(registry: &str, login: Option<&str>, case: &str) -> String {
    let image = format!("{registry}/minimal:{case}-{}", std::process::id());
    let creds = login.map(|l| format!("--src-creds '{l}' --dest-creds '{l}'")).unwrap_or_default();
    sh(&format!(
        "skopeo copy -q --src-tls-verify=false --dest-tls-verify=false {creds} docker://{registry}/minimal:latest docker://{image}"
    ));
    image
}

/// Every entry of the node's store and runtime dir that is not root's or that group or
/// others may write, one `MODE OWNER PATH` line each (layer contents, the containers'
/// overlay contents and symlinks excepted: their modes are the image's).
fn loose_entries(cluster: &Cluster, node: &str) -> String {
    let store_parts = ["lock", "overlay-xattrs", "blobs", "layers", "refs", "locks", "tmp", "access"].map(|p| format!("{STORE}/{p}")).join(" ");
    let line = format!(
        "{{ find {STORE} {RUNTIME} -maxdepth 0; find {store_parts} {RUNTIME} -mindepth 1 \
           \\( -path '{STORE}/layers/*/*/*' -o -path '{RUNTIME}/*/*/upper/*' -o -path '{RUNTIME}/*/*/work/*' -o -path '{RUNTIME}/*/*/root/*' \\) -prune \
           -o -print; }} 2>/dev/null | while read -r p; do \
           [ -L \"$p\" ] && continue; \
           if [ \"$(stat -c %u \"$p\")\" != 0 ] || [ $(( 0$(stat -c %a \"$p\") & 022 )) != 0 ]; then stat -c '%A %U %n' \"$p\"; fi; \
         done"
    );
    stdout_ok(&cluster.on_node(node, &line))
}

/// A job started in the background; its stdout lines come through `lines`.
struct Background {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

fn background(cluster: &Cluster, user: &str, line: &str) -> Background {
    let _ = cluster;
    let mut child = Command::new(repo_root().join("slurm-test-env/run"))
        .args(["--as", user, "bash", "-c", line])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    Background { child, lines }
}

impl Background {
    /// Waits for a line starting with `prefix`; returns it.
    fn line(&self, prefix: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) => {}
                Err(e) => panic!("no line {prefix}... from the background job within {within:?}: {e}"),
            }
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The one line berth wrote for a failed job (the job's other lines are Slurm's own).
fn berth_error(out: &Output) -> String {
    assert!(!out.status.success(), "the job should fail: {}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("error: berth: ")).collect();
    assert_eq!(lines.len(), 1, "one berth line, got: {err}");
    lines[0].to_string()
}

#[test]
fn with_umask_0_a_pull_leaves_nothing_another_user_can_change_and_bob_gets_the_images_env() {
    let cluster = cluster();
    let node = cluster.nodes()[0].clone();
    let users = cluster.users();
    let (alice, bob) = (&users[0], &users[1]);
    let image = fresh_tag(&cluster.registry(), None, "umask0");

    // alice, umask 0, pulls; while her job runs, root looks at the node.
    let job = background(
        &cluster,
        alice,
        &format!("umask 0; srun -w {node} --container-image={image} --container-pull=always sh -c 'echo JOB=$SLURM_JOB_ID; sleep 20'"),
    );
    let id = job.line("JOB=", Duration::from_secs(120)).trim_start_matches("JOB=").to_string();
    let loose = loose_entries(&cluster, &node);
    drop(job);
    let _ = cluster.run_as("root", &format!("scancel {id}"));
    assert_eq!(loose, "", "store or runtime entries others can change after a umask-0 pull (job {id})");

    // alice edits the record of the image if she can, on the node, outside any container.
    let edit = cluster.run_as(
        alice,
        &format!(
            "srun -w {node} sh -c 'f=$(grep -l \"{image}\" {STORE}/refs/*.json); \
             sed \"s#\\\"env\\\": \\[#\\\"env\\\": [\\\"BERTH_EVIL=alice\\\",#\" $f >/tmp/edit-$$ && cat /tmp/edit-$$ >$f; echo edit=$?; rm -f /tmp/edit-$$'"
        ),
    );
    let edited = String::from_utf8_lossy(&edit.stdout).into_owned();

    // bob's job on the same image gets the image's env, not alice's edit.
    let out = cluster.run_as(bob, &format!("srun -w {node} --container-image={image} sh -c 'echo JOB=$SLURM_JOB_ID; echo EVIL=${{BERTH_EVIL:-none}}'"));
    let stdout = stdout_ok(&out);
    assert!(stdout.contains("EVIL=none"), "bob's job ran with alice's edit of the record ({edited}): {stdout}");
    berth_e2e::assert_nodes_clean(&cluster, &job_of(&stdout));
}

#[test]
fn a_record_edited_on_the_node_to_leave_the_store_or_change_the_env_is_not_used() {
    let cluster = cluster();
    let node = cluster.nodes()[0].clone();
    let alice = &cluster.users()[0];
    let image = fresh_tag(&cluster.registry(), None, "edited");
    let evil = format!("/var/tmp/berth-evil-root-{}", std::process::id());
    let run = || cluster.run_as(alice, &format!("srun -w {node} --container-image={image} sh -c 'echo JOB=$SLURM_JOB_ID; grep ^NAME= /etc/os-release; echo EVIL=${{BERTH_EVIL:-none}}'"));
    stdout_ok(&run());

    // A root file system of the attacker's choosing: the image's own, with another name.
    let record = format!("$(grep -l '{image}' {STORE}/refs/*.json)");
    stdout_ok(&cluster.on_node(
        &node,
        &format!(
            "l=$(grep -o '\"layers/sha256/[0-9a-f]*\"' {record} | head -1 | tr -d '\"'); rm -rf {evil}; cp -a {STORE}/$l {evil} && \
             echo 'NAME=\"evil\"' >{evil}/etc/os-release"
        ),
    ));
    let cases = [
        ("an absolute layer path", format!("s#\"layers/sha256/[0-9a-f]*\"#\"{evil}\"#")),
        ("a layer path with ..", format!("s#\"layers/sha256/[0-9a-f]*\"#\"layers/sha256/../../../..{evil}\"#")),
        ("a changed env", "s#\"env\": \\[#\"env\": [\"BERTH_EVIL=root\",#".to_string()),
    ];
    for (case, sed) in cases {
        stdout_ok(&cluster.on_node(&node, &format!("f={record}; sed -i '{sed}' $f && grep -q -e {evil} -e BERTH_EVIL $f")));
        let out = run();
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.success() {
            assert!(stdout.contains("NAME=\"berth minimal\"") && stdout.contains("EVIL=none"), "{case}: the job used the edited record: {stdout}");
        } else {
            let line = berth_error(&out);
            assert!(line.contains("record"), "{case}: {line}");
        }
    }
    let _ = cluster.on_node(&node, &format!("rm -rf {evil}"));
}

#[test]
fn a_user_holding_the_lock_files_blocks_no_other_users_job() {
    let cluster = cluster();
    let node = cluster.nodes()[0].clone();
    let users = cluster.users();
    let (alice, bob) = (&users[0], &users[1]);
    let image = format!("{}/minimal:latest", cluster.registry());
    // The runtime dir and the store exist once a container ran on the node.
    stdout_ok(&cluster.run_as(alice, &format!("srun -w {node} --container-image={image} true")));

    // bob, on the node outside any container, locks every lock file he can open.
    let holder = background(
        &cluster,
        bob,
        &format!(
            "srun -w {node} bash -c 'echo JOB=$SLURM_JOB_ID; n=3; for f in {STORE}/lock {RUNTIME}/.lock {STORE}/locks/*; do \
               if eval \"exec $n<$f\" 2>/dev/null && flock -x $n; then echo held $f; n=$((n+1)); fi; done; echo READY; sleep 600'"
        ),
    );
    let id = holder.line("JOB=", Duration::from_secs(60)).trim_start_matches("JOB=").to_string();
    holder.line("READY", Duration::from_secs(60));

    let started = Instant::now();
    let out = cluster.run_as(alice, &format!("timeout 90 srun -w {node} --container-image={image} sh -c 'echo JOB=$SLURM_JOB_ID; echo started'"));
    let took = started.elapsed();
    let _ = cluster.run_as("root", &format!("scancel {id}"));
    drop(holder);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.code() != Some(124), "alice's job waited {took:?} for bob's locks: {stdout}");
    if out.status.success() {
        assert!(stdout.contains("started"), "{stdout}");
    } else {
        let line = berth_error(&out);
        assert!(line.contains("lock"), "{line}");
    }
}

/// `GET path...` lines of a registry's access log written since byte `from`.
fn gets_since(log: &str, from: u64, path: &str) -> usize {
    let bytes = std::fs::read(berth_e2e::state_dir().join("log/head").join(log)).unwrap();
    String::from_utf8_lossy(&bytes[from as usize..]).lines().filter(|l| l.contains(&format!("\"GET {path}"))).count()
}

fn log_size(log: &str) -> u64 {
    std::fs::metadata(berth_e2e::state_dir().join("log/head").join(log)).unwrap().len()
}

#[test]
fn another_user_cannot_reuse_a_private_image_without_access_and_reuse_costs_no_round_trip() {
    let cluster = cluster();
    let node = cluster.nodes()[0].clone();
    let users = cluster.users();
    let (alice, bob) = (&users[0], &users[1]);
    let out = Command::new(repo_root().join("slurm-test-env/registry")).arg("--auth").output().unwrap();
    let words: Vec<String> = String::from_utf8_lossy(&out.stdout).split_whitespace().map(String::from).collect();
    let (registry, login) = (words[0].clone(), words[1].clone());
    let image = fresh_tag(&registry, Some(&login), "private");
    let pid = std::process::id();

    // alice's and bob's Docker configs: hers with the login, his empty, a second of his with the login.
    let auth = String::from_utf8(Command::new("sh").args(["-c", &format!("printf %s '{login}' | base64 -w0")]).output().unwrap().stdout).unwrap();
    let json = format!("{{\"auths\":{{\"{registry}\":{{\"auth\":\"{auth}\"}}}}}}");
    let dir = |u: &str, what: &str| format!("/home/{u}/berth-store-test-{pid}/{what}");
    let (alice_dc, bob_empty, bob_dc) = (dir(alice, "dc"), dir(bob, "empty"), dir(bob, "dc"));
    for (user, d, config) in [(alice, &alice_dc, Some(&json)), (bob, &bob_empty, None), (bob, &bob_dc, Some(&json))] {
        sh(&format!("install -d -o {user} -g {user} -m 0700 $(dirname {d}) {d}"));
        if let Some(text) = config {
            sh(&format!("printf '%s' '{text}' >{d}/config.json && chown {user}: {d}/config.json && chmod 600 {d}/config.json"));
        }
    }
    let job = |user: &str, dc: &str| {
        cluster.run_as(user, &format!("DOCKER_CONFIG={dc} srun -w {node} --container-image={image} sh -c 'echo JOB=$SLURM_JOB_ID; grep ^NAME= /etc/os-release'"))
    };
    let result = std::panic::catch_unwind(|| {
        let first = stdout_ok(&job(alice, &alice_dc));
        assert!(first.contains("NAME=\"berth minimal\""), "{first}");

        // bob, with no login, does not get alice's private image from the node's store.
        let line = berth_error(&job(bob, &bob_empty));
        assert!(line.contains(&registry) && line.contains("denied"), "{line}");

        // alice reuses it with no registry round trip; bob with his own login may use it.
        let from = log_size("registry-auth.log");
        let again = stdout_ok(&job(alice, &alice_dc));
        assert!(again.contains("NAME=\"berth minimal\""), "{again}");
        assert_eq!(gets_since("registry-auth.log", from, "/v2/minimal/manifests/"), 0, "alice's warm start asked the registry");
        let bobs = stdout_ok(&job(bob, &bob_dc));
        assert!(bobs.contains("NAME=\"berth minimal\""), "{bobs}");
    });
    let _ = Command::new("rm").args(["-rf", &dir(alice, ""), &dir(bob, "")]).status();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }

    // A public image: another user's warm start asks nobody either.
    let public = format!("{}/minimal:latest", cluster.registry());
    stdout_ok(&cluster.run_as(alice, &format!("srun -w {node} --container-image={public} true")));
    let from = log_size("registry.log");
    stdout_ok(&cluster.run_as(bob, &format!("srun -w {node} --container-image={public} true")));
    // Only this tag: other tests pull other tags of minimal meanwhile.
    assert_eq!(gets_since("registry.log", from, "/v2/minimal/manifests/latest"), 0, "bob's warm start of a public image asked the registry");
}

/// Pushes `minimal:latest`'s layers plus `extra` (uncompressed tars) as `registry/name`.
/// Each extra layer's diff_id in the config is its own, or the one given: a config may
/// claim any diff_id, and `skopeo copy` pushes it as it is.
fn push_with_layers(dir: &std::path::Path, registry: &str, login: Option<&str>, name: &str, extra: &[(Vec<u8>, Option<String>)]) -> String {
    let layers = extra
        .iter()
        .map(|(tar, diff_id)| {
            let layer = Layer::new(tar, Compression::None);
            match diff_id {
                Some(claimed) => layer.claiming(claimed),
                None => layer,
            }
        })
        .collect();
    let layout = dir.join(name.replace([':', '/'], "-"));
    Image::from_layout(&berth_e2e::image_layout("minimal"), "latest").add_layers(layers).write_layout(&layout, "latest");
    let image = format!("{registry}/{name}");
    let creds = login.map(|l| format!("--dest-creds '{l}'")).unwrap_or_default();
    sh(&format!("skopeo copy -q --dest-tls-verify=false {creds} oci:{}:latest docker://{image}", layout.display()));
    image
}

/// The login registry's address and its `USER:PASSWORD`.
fn auth_registry() -> (String, String) {
    let out = Command::new(repo_root().join("slurm-test-env/registry")).arg("--auth").output().unwrap();
    let words: Vec<String> = String::from_utf8_lossy(&out.stdout).split_whitespace().map(String::from).collect();
    (words[0].clone(), words[1].clone())
}

/// A Docker config dir of `user`'s (0700, theirs) holding the login for `registry`.
fn docker_config_with_login(user: &str, dir: &str, registry: &str, login: &str) {
    let auth = String::from_utf8(Command::new("sh").args(["-c", &format!("printf %s '{login}' | base64 -w0")]).output().unwrap().stdout).unwrap();
    let json = format!("{{\"auths\":{{\"{registry}\":{{\"auth\":\"{auth}\"}}}}}}");
    sh(&format!("install -d -o {user} -g {user} -m 0700 $(dirname {dir}) {dir}"));
    sh(&format!("printf '%s' '{json}' >{dir}/config.json && chown {user}: {dir}/config.json && chmod 600 {dir}/config.json"));
}

/// alice's private image (its own repository, so that other tests' counts of
/// requests for `minimal` are not disturbed: minimal plus a layer with `/berth-secret.txt`) pulled on `node`
/// with her login: returns the secret, the secret layer's tar and the image.
fn alices_private_image_on(cluster: &Cluster, node: &str, case: &str) -> (String, Vec<u8>, String) {
    let alice = &cluster.users()[0];
    let (registry, login) = auth_registry();
    let pid = std::process::id();
    let secret = format!("alice-private-{case}-{pid}");
    let secret_tar = tar_of(&[Entry::File("berth-secret.txt", secret.as_bytes(), 0o644)]);
    let work = std::env::temp_dir().join(format!("berth-store-boundary-{case}-{pid}"));
    let image = push_with_layers(&work, &registry, Some(&login), &format!("berth-private:{case}-{pid}"), &[(secret_tar.clone(), None)]);
    let _ = std::fs::remove_dir_all(&work);
    let dc = format!("/home/{alice}/berth-store-test-{case}-{pid}/dc");
    docker_config_with_login(alice, &dc, &registry, &login);
    let out = cluster.run_as(alice, &format!("DOCKER_CONFIG={dc} srun -w {node} --container-image={image} cat /berth-secret.txt"));
    let _ = Command::new("rm").args(["-rf", &format!("/home/{alice}/berth-store-test-{case}-{pid}")]).status();
    assert_eq!(stdout_ok(&out).trim(), secret);
    (secret, secret_tar, image)
}

#[test]
fn bob_cannot_mount_alices_private_layer_by_naming_its_diff_id_but_can_with_its_bytes() {
    let cluster = cluster();
    let node = cluster.nodes()[0].clone();
    let bob = &cluster.users()[1];
    let (secret, secret_tar, _) = alices_private_image_on(&cluster, &node, "leak");
    let secret_diff_id = digest(&secret_tar);
    let pid = std::process::id();
    let work = std::env::temp_dir().join(format!("berth-store-boundary-steal-{pid}"));
    let run = |image: &str| cluster.run_as(bob, &format!("srun -w {node} --container-image={image} sh -c 'echo JOB=$SLURM_JOB_ID; cat /berth-secret.txt; ls /bob-was-here'"));

    // bob's image, in a registry with no login, claims the diff_id; its blob is his own bytes.
    let bobs_tar = tar_of(&[Entry::File("bob-was-here", b"bob", 0o644)]);
    let steal = push_with_layers(&work, &cluster.registry(), None, &format!("berth-steal:steal-{pid}"), &[(bobs_tar, Some(secret_diff_id.clone()))]);
    let out = run(&steal);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains(&secret), "bob read alice's private layer through an image naming its diff_id: {stdout}");
    let line = berth_error(&out);
    assert!(line.contains("diff_id") && line.contains(&secret_diff_id), "{line}");

    // The same layer's bytes, in bob's own image: he showed he has it, so he may use it.
    let from = log_size("registry.log");
    let honest = push_with_layers(&work, &cluster.registry(), None, &format!("berth-steal:bytes-{pid}"), &[(secret_tar.clone(), None)]);
    let _ = std::fs::remove_dir_all(&work);
    let stdout = stdout_ok(&cluster.run_as(bob, &format!("srun -w {node} --container-image={honest} cat /berth-secret.txt")));
    assert_eq!(stdout.trim(), secret);
    // skopeo compresses the layer on the way: its blob digest is the registry's manifest's.
    let raw = Command::new("skopeo").args(["inspect", "--raw", "--tls-verify=false", &format!("docker://{honest}")]).output().unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    let layer_digest = manifest["layers"].as_array().unwrap().last().unwrap()["digest"].as_str().unwrap().to_string();
    assert!(gets_since("registry.log", from, &format!("/v2/berth-steal/blobs/{layer_digest}")) >= 1, "bob's pull did not fetch the layer it reused");
}

#[test]
fn another_user_cannot_read_the_record_of_a_private_image() {
    let cluster = cluster();
    let node = cluster.nodes()[0].clone();
    let bob = &cluster.users()[1];
    let (_, secret_tar, image) = alices_private_image_on(&cluster, &node, "record");
    let hex = digest(&secret_tar).replace("sha256:", "");
    // bob, on the node outside any container, looks for the private record's diff_id.
    let out = cluster.run_as(bob, &format!("srun -w {node} sh -c 'cat {STORE}/refs/*.json 2>/dev/null | grep -c {hex}; true'"));
    assert_eq!(stdout_ok(&out).trim(), "0", "bob read the record of alice's private image {image}");
    // The record is there, root's alone.
    let mode = stdout_ok(&cluster.on_node(&node, &format!("stat -c '%a %U' $(grep -l {hex} {STORE}/refs/*.json)")));
    assert_eq!(mode.trim(), "600 root");
}
