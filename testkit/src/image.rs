//! OCI images made in memory: content-addressed blobs, a config naming the layers'
//! diff_ids and saying what runs, a manifest naming the blobs; written as an OCI layout
//! (for `skopeo` to push), read from one, or served by [`crate::Registry`].

use crate::layer::{Compression, Layer};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use std::path::Path;

pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// `sha256:` and the hex digest of these bytes.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// A content-addressed blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    pub digest: String,
    pub bytes: Vec<u8>,
}

impl Blob {
    pub fn of(bytes: Vec<u8>) -> Blob {
        Blob { digest: digest(&bytes), bytes }
    }
}

/// An image: its layers, its config and the manifest naming them.
#[derive(Clone, Debug)]
pub struct Image {
    pub layers: Vec<Layer>,
    pub config: Blob,
    pub manifest: Blob,
}

impl Image {
    /// A linux/amd64 image of these layers, whose config's `config` (what runs: `Cmd`,
    /// `Env`, `WorkingDir`, `User`) is `runtime`.
    pub fn new(layers: Vec<Layer>, runtime: Value) -> Image {
        Image::assemble(layers, json!({ "architecture": "amd64", "os": "linux", "config": runtime }))
    }

    /// As `new`, of gzip layers of these tar streams.
    pub fn gzip(tars: &[Vec<u8>], runtime: Value) -> Image {
        Image::new(tars.iter().map(|t| Layer::new(t, Compression::Gzip)).collect(), runtime)
    }

    /// The image tagged `tag` in the OCI layout at `dir`.
    pub fn from_layout(dir: &Path, tag: &str) -> Image {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        };
        let blob = |digest: &Value| Blob::of(read(&format!("blobs/sha256/{}", digest.as_str().unwrap().trim_start_matches("sha256:"))));
        let json = |bytes: &[u8]| -> Value { serde_json::from_slice(bytes).unwrap() };
        let index = json(&read("index.json"));
        let tagged = index["manifests"].as_array().unwrap().iter().find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag);
        let manifest = blob(&tagged.unwrap_or_else(|| panic!("{} has no tag {tag}", dir.display()))["digest"]);
        let descriptors = json(&manifest.bytes);
        let config = blob(&descriptors["config"]["digest"]);
        let diff_ids = json(&config.bytes)["rootfs"]["diff_ids"].clone();
        let layers = descriptors["layers"]
            .as_array()
            .unwrap()
            .iter()
            .zip(diff_ids.as_array().unwrap())
            .map(|(d, diff_id)| Layer { blob: blob(&d["digest"]), media_type: d["mediaType"].as_str().unwrap().to_string(), diff_id: diff_id.as_str().unwrap().to_string() })
            .collect();
        Image { layers, config, manifest }
    }

    /// This image with more layers on top; the rest of its config as it was.
    pub fn add_layers(self, more: Vec<Layer>) -> Image {
        let config = serde_json::from_slice(&self.config.bytes).unwrap();
        let mut layers = self.layers;
        layers.extend(more);
        Image::assemble(layers, config)
    }

    /// The config with these layers' diff_ids, and the manifest naming them.
    fn assemble(layers: Vec<Layer>, mut config: Value) -> Image {
        config["rootfs"] = json!({ "type": "layers", "diff_ids": layers.iter().map(|l| &l.diff_id).collect::<Vec<_>>() });
        let config = Blob::of(serde_json::to_vec(&config).unwrap());
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": { "mediaType": CONFIG, "digest": config.digest, "size": config.bytes.len() },
            "layers": layers.iter().map(|l| json!({ "mediaType": l.media_type, "digest": l.blob.digest, "size": l.blob.bytes.len() })).collect::<Vec<_>>(),
        });
        Image { layers, config, manifest: Blob::of(serde_json::to_vec(&manifest).unwrap()) }
    }

    /// Writes the image as an OCI layout at `dir` with one tag.
    pub fn write_layout(&self, dir: &Path, tag: &str) {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        for b in self.layers.iter().map(|l| &l.blob).chain([&self.config, &self.manifest]) {
            std::fs::write(blobs.join(b.digest.trim_start_matches("sha256:")), &b.bytes).unwrap();
        }
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let index = json!({
            "schemaVersion": 2,
            "manifests": [{ "mediaType": MANIFEST, "digest": self.manifest.digest, "size": self.manifest.bytes.len(),
                            "annotations": { "org.opencontainers.image.ref.name": tag } }],
        });
        std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{tar_of, Entry};

    #[test]
    fn a_layout_reads_back_as_written_and_takes_more_layers() {
        let dir = std::env::temp_dir().join(format!("berth-testkit-layout-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let image = Image::gzip(&[tar_of(&[Entry::File("a", b"1", 0o644)])], json!({ "Cmd": ["/bin/sh"] }));
        image.write_layout(&dir, "t");
        let back = Image::from_layout(&dir, "t");
        assert_eq!((&back.config, &back.manifest, back.layers[0].diff_id.as_str()), (&image.config, &image.manifest, image.layers[0].diff_id.as_str()));
        let more = back.add_layers(vec![Layer::new(&tar_of(&[Entry::File("b", b"2", 0o644)]), Compression::None).claiming("sha256:claimed")]);
        let config: Value = serde_json::from_slice(&more.config.bytes).unwrap();
        assert_eq!(config["rootfs"]["diff_ids"], json!([image.layers[0].diff_id, "sha256:claimed"]));
        assert_eq!(config["config"]["Cmd"], json!(["/bin/sh"]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
