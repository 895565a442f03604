//! Manifest content negotiation: the media types berth asks for, parsing what comes
//! back (OCI index and manifest, Docker manifest list and schema2), and picking one
//! platform's manifest from an index. Owns no I/O.

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// The `Accept` header for manifest requests, most specific first.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("the registry sent a manifest of type '{0}', which is not an image (berth reads OCI and Docker schema2 images)")]
    UnsupportedType(String),
    #[error("the manifest is not valid JSON of its type: {0}")]
    Invalid(String),
    #[error("layer media type '{0}' is not a tar, tar+gzip or tar+zstd layer")]
    UnsupportedLayer(String),
    #[error("no manifest for platform {wanted} in the index (it has: {available})")]
    NoPlatform { wanted: String, available: String },
}

/// What a manifest request returned, parsed by kind.
#[derive(Debug)]
pub enum Fetched {
    Index(Box<ImageIndex>),
    Image(Box<ImageManifest>),
}

/// Parses a manifest by the Content-Type the registry sent, falling back to the
/// `mediaType` field (and to the shape of the document) when the header is generic.
pub fn parse(content_type: &str, body: &[u8]) -> Result<Fetched, ManifestError> {
    let ct = content_type.split(';').next().unwrap_or("").trim();
    let kind = match ct {
        OCI_INDEX | DOCKER_LIST | OCI_MANIFEST | DOCKER_MANIFEST => ct.to_string(),
        _ => {
            let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| ManifestError::Invalid(e.to_string()))?;
            match v.get("mediaType").and_then(|m| m.as_str()) {
                Some(m) => m.to_string(),
                None if v.get("manifests").is_some() => OCI_INDEX.to_string(),
                None if v.get("layers").is_some() => OCI_MANIFEST.to_string(),
                None => ct.to_string(),
            }
        }
    };
    match kind.as_str() {
        OCI_INDEX | DOCKER_LIST => {
            ImageIndex::from_reader(body).map(|i| Fetched::Index(Box::new(i))).map_err(|e| ManifestError::Invalid(e.to_string()))
        }
        OCI_MANIFEST | DOCKER_MANIFEST => {
            ImageManifest::from_reader(body).map(|m| Fetched::Image(Box::new(m))).map_err(|e| ManifestError::Invalid(e.to_string()))
        }
        other => Err(ManifestError::UnsupportedType(other.to_string())),
    }
}

/// The compression of a layer, from the OCI or Docker layer media type.
pub fn layer_compression(media_type: &str) -> Result<Compression, ManifestError> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar" | "application/vnd.oci.image.layer.nondistributable.v1.tar" => {
            Ok(Compression::None)
        }
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd" | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
            Ok(Compression::Zstd)
        }
        other => Err(ManifestError::UnsupportedLayer(other.to_string())),
    }
}

/// A platform as `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// The machine berth runs on, named as Go (and so every registry) names it.
    pub fn host() -> Platform {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            "x86" => ("386", None),
            "arm" => ("arm", Some("v7")),
            "powerpc64" => ("ppc64le", None),
            "riscv64" => ("riscv64", None),
            "s390x" => ("s390x", None),
            other => (other, None),
        };
        Platform { os: "linux".into(), architecture: architecture.into(), variant: variant.map(String::from) }
    }

    /// Parses `os/arch[/variant]` as given to `--platform`.
    pub fn parse(s: &str) -> Option<Platform> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &&str| !p.is_empty() && p.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_');
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Some(Platform { os: os.to_string(), architecture: arch.to_string(), variant: None }),
            [os, arch, v] if ok(os) && ok(arch) && ok(v) => {
                Some(Platform { os: os.to_string(), architecture: arch.to_string(), variant: Some(v.to_string()) })
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// Picks the manifest for `wanted` from an index: attestation and unknown-platform
/// entries are skipped; a variant is matched when both sides name one (`arm64` and
/// `arm64/v8` are the same machine), an exact variant match is preferred.
pub fn select_platform<'a>(index: &'a ImageIndex, wanted: &Platform) -> Result<&'a Descriptor, ManifestError> {
    let mut best: Option<(&Descriptor, bool)> = None;
    let mut available = Vec::new();
    for d in index.manifests() {
        let is_attestation = d
            .annotations()
            .as_ref()
            .and_then(|a| a.get("vnd.docker.reference.type"))
            .is_some_and(|t| t == "attestation-manifest");
        let Some(p) = d.platform() else { continue };
        let (os, arch) = (p.os().to_string(), p.architecture().to_string());
        if is_attestation || os == "unknown" || arch == "unknown" {
            continue;
        }
        let variant = p.variant().clone();
        available.push(match &variant {
            Some(v) => format!("{os}/{arch}/{v}"),
            None => format!("{os}/{arch}"),
        });
        if os != wanted.os || arch != wanted.architecture {
            continue;
        }
        let exact = variant == wanted.variant;
        let compatible = exact || variant.is_none() || wanted.variant.is_none() || (arch == "arm64" && variant.as_deref() == Some("v8"));
        if !compatible {
            continue;
        }
        if best.is_none_or(|(_, e)| !e && exact) {
            best = Some((d, exact));
        }
    }
    best.map(|(d, _)| d).ok_or_else(|| ManifestError::NoPlatform {
        wanted: wanted.to_string(),
        available: if available.is_empty() { "nothing runnable".into() } else { available.join(", ") },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const L1: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn index_json(media: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{media}","manifests":[
            {{"mediaType":"{OCI_MANIFEST}","digest":"{CFG}","size":1,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}},
            {{"mediaType":"{OCI_MANIFEST}","digest":"{L1}","size":2,"platform":{{"architecture":"amd64","os":"linux"}}}},
            {{"mediaType":"{OCI_MANIFEST}","digest":"sha256:3333333333333333333333333333333333333333333333333333333333333333","size":3,
              "platform":{{"architecture":"unknown","os":"unknown"}},"annotations":{{"vnd.docker.reference.type":"attestation-manifest"}}}}]}}"#
        )
    }

    #[test]
    fn parses_both_families_by_header_or_body() {
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"{CFG}","size":10}},
            "layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"{L1}","size":20}}]}}"#
        );
        let Fetched::Image(m) = parse(DOCKER_MANIFEST, manifest.as_bytes()).unwrap() else { panic!("not an image") };
        assert_eq!(m.layers()[0].digest().to_string(), L1);
        assert!(matches!(parse("application/json", manifest.as_bytes()).unwrap(), Fetched::Image(_)));
        assert!(matches!(parse(DOCKER_LIST, index_json(DOCKER_LIST).as_bytes()).unwrap(), Fetched::Index(_)));
        assert!(matches!(parse("text/plain", index_json(OCI_INDEX).as_bytes()).unwrap(), Fetched::Index(_)));
        let err = parse("application/vnd.docker.distribution.manifest.v1+prettyjws", b"{}").unwrap_err();
        assert!(err.to_string().contains("v1+prettyjws"), "{err}");
        assert!(parse(OCI_MANIFEST, b"{not json").is_err());
    }

    #[test]
    fn selects_host_platform_and_skips_attestations() {
        let Fetched::Index(index) = parse(OCI_INDEX, index_json(OCI_INDEX).as_bytes()).unwrap() else { panic!() };
        let amd = select_platform(&index, &Platform::parse("linux/amd64").unwrap()).unwrap();
        assert_eq!(amd.digest().to_string(), L1);
        let arm = select_platform(&index, &Platform::parse("linux/arm64").unwrap()).unwrap();
        assert_eq!(arm.digest().to_string(), CFG);
        let arm = select_platform(&index, &Platform::parse("linux/arm64/v8").unwrap()).unwrap();
        assert_eq!(arm.digest().to_string(), CFG);
        let err = select_platform(&index, &Platform::parse("linux/s390x").unwrap()).unwrap_err().to_string();
        assert!(err.contains("linux/s390x") && err.contains("linux/amd64") && !err.contains("unknown"), "{err}");
        assert!(Platform::parse("linux").is_none() && Platform::parse("linux/amd64/v2/x").is_none());
    }

    #[test]
    fn layer_media_types_map_to_compression() {
        assert_eq!(layer_compression("application/vnd.oci.image.layer.v1.tar+zstd").unwrap(), Compression::Zstd);
        assert_eq!(layer_compression("application/vnd.docker.image.rootfs.diff.tar.gzip").unwrap(), Compression::Gzip);
        assert_eq!(layer_compression("application/vnd.oci.image.layer.v1.tar").unwrap(), Compression::None);
        assert!(layer_compression("application/vnd.in-toto+json").is_err());
    }
}
