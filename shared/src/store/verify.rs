//! Checking a store after a crash, a full disk or a suspicion: with the store locked
//! exclusively (no pull or gc running), rehashes every blob, checks that each ref
//! record is reachable under its own name and agrees with its manifest and config,
//! that every layer it names is a whole directory tree of the kinds unpack writes, and
//! that no debris is left (`tmp/` work, stray files). Reports problems, one line each;
//! never changes anything (`berth gc` removes debris, `berth rm` + a pull repairs an image).
//!
//! Completeness of a layer dir rests on publication: a layer is unpacked in `tmp/` and
//! renamed into `layers/` whole, so a crash leaves a partial layer only in `tmp/`, which
//! is reported here as debris. What verify checks in `layers/` is that every tree can be
//! read to its last entry and holds nothing unpack would not have written.

use super::{read_record, Store, StoreError};
use crate::reference::is_sha256_digest;
use crate::registry::manifest::{self, Fetched};
use oci_spec::image::ImageConfiguration;
use rustix::fs::{FileType, Mode, OFlags};
use sha2::{Digest as _, Sha256};
use std::collections::HashSet;
use std::path::Path;

/// What a verify found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub images: usize,
    pub layers: usize,
    pub blobs: usize,
    /// One line per problem, naming the file and what to do.
    pub problems: Vec<String>,
}

/// Entries a store root may hold.
const KNOWN_TOP: [&str; 7] = ["lock", "overlay-xattrs", "blobs", "layers", "refs", "locks", "access"];

pub(super) fn check(store: &Store) -> Result<VerifyReport, StoreError> {
    let root = &store.root;
    let mut report = VerifyReport::default();
    let problems = &mut report.problems;

    for name in super::gc::list(store, root)? {
        if !KNOWN_TOP.contains(&name.as_str()) && name != "tmp" {
            problems.push(format!("{}: not part of a store (remove it by hand)", root.join(&name).display()));
        }
    }
    for name in super::gc::list(store, &root.join("tmp"))? {
        problems.push(format!("{}: leftover of an interrupted pull or gc (run `berth gc`)", root.join("tmp").join(name).display()));
    }
    match std::fs::read_to_string(root.join("overlay-xattrs")) {
        Ok(kind) if matches!(kind.trim(), "trusted" | "user") => {}
        Ok(kind) => problems.push(format!("{}: unknown kind '{}' (expected trusted or user)", root.join("overlay-xattrs").display(), kind.trim())),
        Err(e) => problems.push(format!("{}: {e}", root.join("overlay-xattrs").display())),
    }

    // Blobs: each file's content must hash to its name.
    let mut blobs = HashSet::new();
    let blob_dir = root.join("blobs/sha256");
    for name in super::gc::list(store, &blob_dir)? {
        let path = blob_dir.join(&name);
        if !is_hex(&name) {
            problems.push(format!("{}: not a blob name (remove it by hand)", path.display()));
            continue;
        }
        match hash_file(&path) {
            Ok(hex) if hex == name => {
                blobs.insert(name);
            }
            Ok(hex) => problems.push(format!("{}: content hashes to sha256:{hex}, not its name (run `berth gc` after `berth rm` of the images using it, then pull again)", path.display())),
            Err(e) => problems.push(format!("{}: cannot read: {e}", path.display())),
        }
    }
    report.blobs = blobs.len();

    // Layer dirs: named by a digest, a directory, readable throughout.
    let mut layers = HashSet::new();
    for dir in ["layers/sha256", "layers/chain"] {
        for name in super::gc::list(store, &root.join(dir))? {
            let rel = format!("{dir}/{name}");
            let path = root.join(&rel);
            if !is_hex(&name) {
                problems.push(format!("{}: not a layer name (remove it by hand)", path.display()));
                continue;
            }
            match check_tree(&path) {
                Ok(()) => {
                    layers.insert(rel);
                }
                Err(why) => problems.push(format!("{}: {why} (run `berth rm` of the images using it, `berth gc`, then pull again)", path.display())),
            }
        }
    }
    report.layers = layers.len();

    // Access entries: each names a store path and says who may reuse what is there. One
    // whose content is gone is not a problem (content at that path can only be the same
    // bytes again, and gc drops it); a damaged one is, since it would deny or grant.
    for name in super::gc::list(store, &root.join("access"))? {
        let path = root.join("access").join(&name);
        if super::content_of_access(&name).is_none() {
            problems.push(format!("{}: not an access entry (remove it by hand)", path.display()));
        } else if super::read_trusted(&path).ok().and_then(|b| serde_json::from_slice::<super::Access>(&b).ok()).is_none() {
            problems.push(format!("{}: not a valid access entry, or not the store owner's alone (remove it by hand: pulls then download that content once more)", path.display()));
        }
    }

    // Refs: reachable under their own name, consistent with manifest, config and layers.
    let refs = root.join("refs");
    for name in super::gc::list(store, &refs)? {
        let path = refs.join(&name);
        let record = match read_record(&path) {
            Ok(r) => r,
            Err(e) => {
                problems.push(format!("{}: not a ref record ({e}) (run `berth gc`)", path.display()));
                continue;
            }
        };
        let bad = |why: String| format!("{} ({}): {why} (run `berth rm {}` and pull it again)", record.reference, path.display(), record.reference);
        if store.ref_path(&record.reference) != path {
            problems.push(bad("the record is not under the name of its reference, so nothing finds it".into()));
            continue;
        }
        report.images += 1;
        let mut missing = false;
        for (what, digest) in [("manifest", &record.manifest_digest), ("image config", &record.config_digest)] {
            if !is_sha256_digest(digest) || !blobs.contains(digest.trim_start_matches("sha256:")) {
                problems.push(bad(format!("its {what} {digest} is missing or damaged")));
                missing = true;
            }
        }
        for rel in &record.layers {
            if !layers.contains(rel) {
                problems.push(bad(format!("its layer {rel} is missing or damaged")));
                missing = true;
            }
        }
        if missing {
            continue;
        }
        if let Err(why) = agrees_with_manifest(store, &record) {
            problems.push(bad(why));
        }
    }
    Ok(report)
}

/// The record's layers are those its manifest and config name, in order.
fn agrees_with_manifest(store: &Store, record: &super::Record) -> Result<(), String> {
    let bytes = std::fs::read(store.blob_path(&record.manifest_digest)).map_err(|e| format!("cannot read its manifest: {e}"))?;
    let image = match manifest::parse("", &bytes) {
        Ok(Fetched::Image(m)) => m,
        Ok(Fetched::Index(_)) => return Err("its manifest is an index, not an image".into()),
        Err(e) => return Err(format!("its manifest: {e}")),
    };
    if image.config().digest().to_string() != record.config_digest {
        return Err(format!("its manifest names config {}, the record {}", image.config().digest(), record.config_digest));
    }
    let config_bytes = std::fs::read(store.blob_path(&record.config_digest)).map_err(|e| format!("cannot read its config: {e}"))?;
    let config = ImageConfiguration::from_reader(&config_bytes[..]).map_err(|e| format!("its config is not valid: {e}"))?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != record.layers.len() || image.layers().len() != record.layers.len() {
        return Err(format!("it lists {} layers, its manifest {} and its config {}", record.layers.len(), image.layers().len(), diff_ids.len()));
    }
    for ((rel, diff_id), chain_id) in record.layers.iter().zip(diff_ids).zip(super::pull::chain_ids(diff_ids)) {
        let by_diff = format!("layers/sha256/{}", diff_id.trim_start_matches("sha256:"));
        let by_chain = format!("layers/chain/{}", chain_id.trim_start_matches("sha256:"));
        if *rel != by_diff && *rel != by_chain {
            return Err(format!("layer {rel} is not the one its config names ({diff_id})"));
        }
    }
    Ok(())
}

fn is_hex(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// Walks a layer dir without following symlinks: every entry must be one of the kinds
/// unpack writes (dirs, files, symlinks, FIFOs, 0/0 whiteout devices) and every
/// directory must be readable to its end.
fn check_tree(path: &Path) -> Result<(), String> {
    let st = rustix::fs::lstat(path).map_err(|e| e.to_string())?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return Err("not a directory".into());
    }
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let fd = rustix::fs::open(&dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| format!("cannot open {}: {e}", dir.display()))?;
        let entries = rustix::fs::Dir::read_from(&fd).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let name = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name);
            let st = rustix::fs::statat(&fd, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| format!("cannot stat {}: {e}", dir.join(name).display()))?;
            match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory => stack.push(dir.join(name)),
                FileType::RegularFile | FileType::Symlink | FileType::Fifo => {}
                FileType::CharacterDevice if st.st_rdev == 0 => {}
                other => return Err(format!("{} is a {other:?}, which unpack never writes", dir.join(name).display())),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{gc, Progress, PullPolicy, Store};
    use crate::config::Config;
    use berth_testkit::{tar_of, Entry, Image, Registry};

    #[test]
    fn a_pulled_store_verifies_and_each_kind_of_damage_is_one_line() {
        let reg = Registry::start();
        let tars = [tar_of(&[Entry::File("a", b"one", 0o644)]), tar_of(&[Entry::File("b", b"two", 0o644)])];
        reg.publish("app", "1", &Image::gzip(&tars, serde_json::json!({})));
        let dir = std::env::temp_dir().join(format!("berth-verify-{}", std::process::id()));
        let _ = gc::remove_tree(&dir);
        let config = Config { store_dir: dir.clone(), insecure_registries: vec![reg.addr.clone()], ..Config::default() };
        let store = Store::open(&config).unwrap();
        let image = store.resolve(&format!("{}/app:1", reg.addr), PullPolicy::Missing, Progress::Silent).unwrap();
        let clean = store.verify().unwrap();
        assert_eq!((clean.images, clean.layers, clean.blobs, clean.problems.len()), (1, 2, 2, 0), "{clean:?}");

        // A flipped byte in the config, a layer gone, debris of a crash, a stray file.
        let config_blob = std::fs::read_dir(dir.join("blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| std::fs::read(p).unwrap().starts_with(b"{\"architecture\""))
            .unwrap();
        let mut bytes = std::fs::read(&config_blob).unwrap();
        bytes[3] ^= 1;
        std::fs::write(&config_blob, bytes).unwrap();
        gc::remove_tree(&image.layer_dirs[1]).unwrap();
        std::fs::create_dir(dir.join("tmp/layer-123-0-0")).unwrap();
        std::fs::write(dir.join("stray"), b"x").unwrap();
        let report = store.verify().unwrap();
        let p = &report.problems;
        assert!(p.iter().any(|l| l.contains("content hashes to sha256:")), "{p:?}");
        assert!(p.iter().any(|l| l.contains("its image config") && l.contains("missing or damaged")), "{p:?}");
        assert!(p.iter().any(|l| l.contains("its layer layers/sha256/") && l.ends_with("pull it again)")), "{p:?}");
        assert!(p.iter().any(|l| l.contains("tmp/layer-123-0-0: leftover") && l.ends_with("(run `berth gc`)")), "{p:?}");
        assert!(p.iter().any(|l| l.contains("stray: not part of a store")), "{p:?}");
        assert_eq!(p.len(), 5, "{p:?}");
        assert!(p.iter().all(|l| !l.contains('\n')));

        // gc removes the debris; rm + pull repairs the image; then all is clean again.
        std::fs::remove_file(dir.join("stray")).unwrap();
        store.remove(&format!("{}/app:1", reg.addr)).unwrap();
        store.gc().unwrap();
        store.resolve(&format!("{}/app:1", reg.addr), PullPolicy::Missing, Progress::Silent).unwrap();
        let again = store.verify().unwrap();
        assert!(again.problems.is_empty(), "{again:?}");
        gc::remove_tree(&dir).unwrap();
    }
}
