//! The store's pull path against a real HTTP registry on loopback (berth-testkit's):
//! verification, faults, auth, redirects, concurrency and a full disk, each ending in
//! one clear error and a consistent store.

use super::*;
use berth_testkit::{tar_of, Auth, Compression, Entry, Fault, Image, Layer, Registry};

/// A layer of one file, mode 0644.
fn file(name: &str, data: &[u8]) -> Vec<u8> {
    tar_of(&[Entry::File(name, data, 0o644)])
}

/// Publishes gzip layers of these tar streams as `repo:1`, with workdir `/w` and env `A=1`.
fn publish(reg: &Registry, repo: &str, tars: &[Vec<u8>]) -> Image {
    let image = Image::gzip(tars, serde_json::json!({ "Env": ["A=1"], "Cmd": ["/bin/sh"], "WorkingDir": "/w" }));
    reg.publish(repo, "1", &image);
    image
}

fn store_at(name: &str, reg: &Registry) -> (Store, PathBuf) {
    let dir = std::env::temp_dir().join(format!("berth-pull-{name}-{}", std::process::id()));
    let _ = gc::remove_tree(&dir);
    let config = Config { store_dir: dir.clone(), insecure_registries: vec![reg.addr.clone()], ..Config::default() };
    (Store::open(&config).unwrap(), dir)
}

fn with_credentials(store: Store, dir: &Path, user: &str, pass: &str) -> Store {
    let file = dir.join("creds.json");
    let auth = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    };
    let registry = store.config.insecure_registries[0].clone();
    std::fs::write(&file, format!(r#"{{"auths":{{"{registry}":{{"auth":"{auth}"}}}}}}"#)).unwrap();
    let config = Config { credentials_file: Some(file), ..store.config.clone() };
    Store::open(&config).unwrap()
}

fn published_layers(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("layers/sha256")).unwrap().count() + std::fs::read_dir(dir.join("layers/chain")).unwrap().count()
}

fn tmp_is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir.join("tmp")).unwrap().next().is_none()
}

#[test]
fn pulls_verify_publish_and_reuse_layers() {
    let reg = Registry::start();
    publish(&reg, "app", &[file("a", b"one"), file("b", b"two")]);
    let (store, dir) = store_at("reuse", &reg);
    let image = store.resolve(&format!("{}/app:1", reg.addr), PullPolicy::Missing, Progress::Silent).unwrap();
    assert_eq!(image.layer_dirs.len(), 2);
    assert_eq!(std::fs::read(image.layer_dirs[1].join("b")).unwrap(), b"two");
    assert_eq!(image.config.working_dir.as_deref(), Some("/w"));
    assert_eq!(image.config.env, vec!["A=1"]);
    assert_eq!(reg.lock().blob_gets, 3, "config and two layers");
    let again = store.resolve(&format!("{}/app:1", reg.addr), PullPolicy::Always, Progress::Silent).unwrap();
    assert_eq!(again.layer_dirs, image.layer_dirs);
    assert_eq!(reg.lock().blob_gets, 3, "nothing fetched twice");
    assert!(tmp_is_empty(&dir));
    gc::remove_tree(&dir).unwrap();
}

#[test]
fn plain_gzip_and_zstd_layers_are_pulled_alike() {
    let reg = Registry::start();
    let kinds = [Compression::None, Compression::Gzip, Compression::Zstd];
    let layers = kinds.iter().map(|c| Layer::new(&file(&format!("{c:?}"), b"same"), *c)).collect();
    reg.publish("app", "1", &Image::new(layers, serde_json::json!({})));
    let (store, dir) = store_at("compressions", &reg);
    let image = store.resolve(&format!("{}/app:1", reg.addr), PullPolicy::Missing, Progress::Silent).unwrap();
    for (layer, kind) in image.layer_dirs.iter().zip(kinds) {
        assert_eq!(std::fs::read(layer.join(format!("{kind:?}"))).unwrap(), b"same", "{kind:?}");
    }
    assert!(tmp_is_empty(&dir));
    gc::remove_tree(&dir).unwrap();
}

#[test]
fn unknown_repository_or_tag_is_one_clear_line() {
    let reg = Registry::start();
    publish(&reg, "app", &[file("a", b"one")]);
    let (store, dir) = store_at("unknown", &reg);
    for r in [format!("{}/app:2", reg.addr), format!("{}/nothing:1", reg.addr)] {
        let err = store.resolve(&r, PullPolicy::Missing, Progress::Silent).unwrap_err().to_string();
        assert!(err.starts_with(&format!("cannot pull {r}: manifest")) && err.contains("not found") && !err.contains('\n'), "{err}");
    }
    gc::remove_tree(&dir).unwrap();
}

#[test]
fn corrupted_blob_is_refused_and_nothing_is_published() {
    let reg = Registry::start();
    let image = publish(&reg, "app", &[file("a", &[7u8; 5000])]);
    reg.lock().faults.insert(image.layers[0].blob.digest.clone(), Fault::Corrupt);
    let (store, dir) = store_at("corrupt", &reg);
    let err = store.resolve(&format!("{}/app:1", reg.addr), PullPolicy::Missing, Progress::Silent).unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains("does not match its digest"), "{err}");
    assert_eq!(published_layers(&dir), 0);
    assert!(tmp_is_empty(&dir) && store.images().unwrap().is_empty());
    gc::remove_tree(&dir).unwrap();
}

#[test]
fn truncated_downloads_are_retried_then_reported() {
    let reg = Registry::start();
    let image = publish(&reg, "app", &[file("a", &[1u8; 20000])]);
    let (store, dir) = store_at("truncated", &reg);
    let r = format!("{}/app:1", reg.addr);
    reg.lock().faults.insert(image.layers[0].blob.digest.clone(), Fault::Truncate { times: 1 });
    store.resolve(&r, PullPolicy::Missing, Progress::Silent).unwrap();
    store.remove(&r).unwrap();
    store.gc().unwrap();
    reg.lock().faults.insert(image.layers[0].blob.digest.clone(), Fault::Truncate { times: 100 });
    let err = store.resolve(&r, PullPolicy::Missing, Progress::Silent).unwrap_err().to_string();
    assert!(err.contains("the download broke off after") && err.ends_with("try again"), "{err}");
    assert_eq!(published_layers(&dir), 0);
    assert!(tmp_is_empty(&dir));
    gc::remove_tree(&dir).unwrap();
}

#[test]
fn bearer_and_basic_auth_with_right_and_wrong_credentials() {
    for auth in [Auth::Bearer("u".into(), "p".into()), Auth::Basic("u".into(), "p".into())] {
        let reg = Registry::start();
        publish(&reg, "private", &[file("a", b"secret")]);
        reg.lock().auth.insert("private".into(), auth);
        let (store, dir) = store_at("auth", &reg);
        let r = format!("{}/private:1", reg.addr);
        let anonymous = store.resolve(&r, PullPolicy::Missing, Progress::Silent).unwrap_err().to_string();
        assert!(anonymous.contains("denied access") || anonymous.contains("token"), "{anonymous}");
        let wrong = with_credentials(Store::open(&store.config).unwrap(), &dir, "u", "nope");
        let err = wrong.resolve(&r, PullPolicy::Missing, Progress::Silent).unwrap_err().to_string();
        assert!(err.contains("refused the credentials"), "{err}");
        let right = with_credentials(store, &dir, "u", "p");
        right.resolve(&r, PullPolicy::Missing, Progress::Silent).unwrap();
        gc::remove_tree(&dir).unwrap();
    }
}

#[test]
fn redirects_to_blob_storage_never_carry_credentials() {
    let reg = Registry::start();
    let storage = Registry::start();
    publish(&reg, "private", &[file("a", b"x")]);
    reg.share_blobs_with(&storage);
    reg.lock().auth.insert("private".into(), Auth::Basic("u".into(), "p".into()));
    reg.lock().redirect_blobs.insert("private".into(), format!("http://{}", storage.addr));
    let (store, dir) = store_at("redirect", &reg);
    let store = with_credentials(store, &dir, "u", "p");
    store.resolve(&format!("{}/private:1", reg.addr), PullPolicy::Missing, Progress::Silent).unwrap();
    let seen = storage.lock().requests.clone();
    assert!(!seen.is_empty() && seen.iter().all(|(_, a)| a.is_none()), "{seen:?}");
    gc::remove_tree(&dir).unwrap();
}

#[test]
fn a_redirect_written_to_look_like_the_registry_never_carries_credentials() {
    let reg = Registry::start();
    let storage = Registry::start();
    publish(&reg, "private", &[file("a", b"x")]);
    reg.share_blobs_with(&storage);
    reg.lock().auth.insert("private".into(), Auth::Basic("u".into(), "p".into()));
    // For the HTTP client a backslash ends the authority: this is the storage host.
    reg.lock().redirect_blobs.insert("private".into(), format!("http://{}\\@{}", storage.addr, reg.addr));
    let (store, dir) = store_at("redirect-backslash", &reg);
    let store = with_credentials(store, &dir, "u", "p");
    store.resolve(&format!("{}/private:1", reg.addr), PullPolicy::Missing, Progress::Silent).unwrap();
    let seen = storage.lock().requests.clone();
    assert!(!seen.is_empty() && seen.iter().all(|(_, a)| a.is_none()), "{seen:?}");
    gc::remove_tree(&dir).unwrap();
}

#[test]
fn hostile_layer_from_a_registry_fails_cleanly() {
    let reg = Registry::start();
    publish(&reg, "evil", &[file("../../escape", b"x")]);
    let (store, dir) = store_at("hostile", &reg);
    let err = store.resolve(&format!("{}/evil:1", reg.addr), PullPolicy::Missing, Progress::Silent).unwrap_err().to_string();
    assert!(err.contains("hostile layer: entry '../../escape' contains '..'"), "{err}");
    assert_eq!(published_layers(&dir), 0);
    assert!(tmp_is_empty(&dir) && !dir.parent().unwrap().join("escape").exists());
    gc::remove_tree(&dir).unwrap();
}

#[test]
fn concurrent_pulls_fetch_each_layer_once() {
    let reg = Registry::start();
    let tars: Vec<Vec<u8>> = (0..4u8).map(|i| file("f", &vec![i; 100_000])).collect();
    publish(&reg, "app", &tars);
    let (store, dir) = store_at("concurrent", &reg);
    let r = format!("{}/app:1", reg.addr);
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let (config, r) = (store.config.clone(), r.clone());
                s.spawn(move || Store::open(&config).unwrap().resolve(&r, PullPolicy::Missing, Progress::Silent).map(|i| i.layer_dirs))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let first = results[0].as_ref().unwrap().clone();
    assert!(results.iter().all(|r| r.as_ref().unwrap() == &first));
    let layer_gets = reg.lock().blob_gets;
    // Each process may fetch the small config; every layer is fetched exactly once.
    assert!((4 + 1..=4 + 4).contains(&layer_gets), "{layer_gets} blob requests");
    assert_eq!(published_layers(&dir), 4);
    gc::remove_tree(&dir).unwrap();
}

#[test]
fn a_full_disk_is_reported_and_leaves_the_store_consistent() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let reg = Registry::start();
    // Incompressible content, larger than the file system.
    let mut data = vec![0u8; 3 << 20];
    let mut x: u32 = 12345;
    for b in data.iter_mut() {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        *b = (x >> 16) as u8;
    }
    publish(&reg, "big", &[file("big", &data)]);
    let dir = std::env::temp_dir().join(format!("berth-pull-full-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mounted = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"]).arg(&dir).status().unwrap();
    assert!(mounted.success());
    let config = Config { store_dir: dir.join("store"), insecure_registries: vec![reg.addr.clone()], ..Config::default() };
    let store = Store::open(&config).unwrap();
    let err = store.resolve(&format!("{}/big:1", reg.addr), PullPolicy::Missing, Progress::Silent).unwrap_err().to_string();
    let layers = published_layers(&config.store_dir);
    let tmp_empty = tmp_is_empty(&config.store_dir);
    let _ = std::process::Command::new("umount").arg(&dir).status();
    let _ = std::fs::remove_dir(&dir);
    assert!(err.contains("no space left in the image store") && err.ends_with("free space or run `berth gc`"), "{err}");
    assert_eq!(layers, 0);
    assert!(tmp_empty);
}

#[test]
fn rate_limits_say_what_to_do_and_server_errors_are_retried_then_reported() {
    let reg = Registry::start();
    let (store, dir) = store_at("ratelimit", &reg);
    let r = format!("{}/app:1", reg.addr);
    let answer = |status: &str, body: &str| Fault::Answer { status: status.into(), content_type: None, body: body.into() };
    let limited = r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"toomanyrequests: You have reached your pull rate limit"}]}"#;
    reg.lock().manifest_faults.insert("app".into(), answer("429 Too Many Requests", limited));
    let err = store.resolve(&r, PullPolicy::Missing, Progress::Silent).unwrap_err().to_string();
    assert!(err.contains("pull rate limit is reached") && err.contains("docker login"), "{err}");
    reg.lock().manifest_faults.insert("app".into(), answer("503 Service Unavailable", "down for maintenance"));
    let err = store.resolve(&r, PullPolicy::Missing, Progress::Silent).unwrap_err().to_string();
    assert!(err.contains("cannot reach registry") && err.contains("503"), "{err}");
    assert!(reg.lock().requests.len() > super::super::registry::ATTEMPTS as usize, "503 is retried");
    gc::remove_tree(&dir).unwrap();
}
