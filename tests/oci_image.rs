//! Small OCI images made in memory for the fault and load tests: gzip layers of given
//! files, a config naming their diff_ids, a manifest; served by a test's own registry
//! or written as an OCI layout for `slurm-test-env/push`. Included with `#[path]` by
//! the test files that need it.

use berth_engine::registry::sha256_digest;
use std::io::Write;
use std::path::Path;

pub const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A content-addressed blob.
#[derive(Clone)]
pub struct Blob {
    pub digest: String,
    pub bytes: Vec<u8>,
}

impl Blob {
    pub fn of(bytes: Vec<u8>) -> Blob {
        Blob { digest: sha256_digest(&bytes), bytes }
    }
}

/// One entry of a layer.
pub enum Entry<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8], u32),
    Symlink(&'a str, &'a str),
}

pub struct Image {
    pub layers: Vec<Blob>,
    pub config: Blob,
    pub manifest: Blob,
}

/// A tar stream of the entries, owned by root, as an image builder writes it.
pub fn tar(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        match e {
            Entry::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            Entry::File(p, data, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap();
            }
            Entry::Symlink(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// An image of gzip layers made from these tar streams, running `cmd` by default.
pub fn image(tars: &[Vec<u8>], cmd: &[&str]) -> Image {
    let diff_ids: Vec<String> = tars.iter().map(|t| sha256_digest(t)).collect();
    let layers: Vec<Blob> = tars.iter().map(|t| Blob::of(gzip(t))).collect();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Cmd": cmd, "Env": ["PATH=/bin"] },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let config = Blob::of(serde_json::to_vec(&config).unwrap());
    let manifest = manifest_for(&config, &layers.iter().map(|l| (l.digest.clone(), l.bytes.len() as u64)).collect::<Vec<_>>());
    Image { layers, config, manifest }
}

/// A manifest naming a config and layers given as (digest, size).
pub fn manifest_for(config: &Blob, layers: &[(String, u64)]) -> Blob {
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.digest, "size": config.bytes.len() },
        "layers": layers.iter().map(|(d, s)| serde_json::json!({ "mediaType": LAYER_GZIP, "digest": d, "size": s })).collect::<Vec<_>>(),
    });
    Blob::of(serde_json::to_vec(&manifest).unwrap())
}

impl Image {
    /// Writes the image as an OCI layout with one tag.
    pub fn write_layout(&self, dir: &Path, tag: &str) {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        for b in self.layers.iter().chain([&self.config, &self.manifest]) {
            std::fs::write(blobs.join(b.digest.trim_start_matches("sha256:")), &b.bytes).unwrap();
        }
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{ "mediaType": MANIFEST, "digest": self.manifest.digest, "size": self.manifest.bytes.len(),
                            "annotations": { "org.opencontainers.image.ref.name": tag } }],
        });
        std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    }
}

/// The layer every runnable test image starts with: the host's static busybox as
/// `/bin/busybox`, with `sh`, `true`, `cat` and `sleep` linked to it.
pub fn busybox_layer(stamp: &str) -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static is installed");
    tar(&[
        Entry::Dir("bin"),
        Entry::File("bin/busybox", &busybox, 0o755),
        Entry::Symlink("bin/sh", "busybox"),
        Entry::Symlink("bin/true", "busybox"),
        Entry::Symlink("bin/cat", "busybox"),
        Entry::Symlink("bin/sleep", "busybox"),
        Entry::File("stamp", stamp.as_bytes(), 0o644),
    ])
}

/// Bytes no compressor shrinks, different for every seed.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
