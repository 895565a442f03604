//! An image as a container takes it: its layers (overlay lower dirs, lowest first) and
//! the parts of its OCI config a container needs, plus a bind mount a user asks for.
//! The store produces images, `--layers`/`--image-config` describe one by hand, and the
//! container consumes them; this module depends on neither.
//!
//! Owns reading an image config: one mapping from OCI's `config` section (through
//! oci-spec, as the store's pull reads the whole config) for both the store and
//! `--image-config FILE`. Never opens a layer or checks a mount source (create does,
//! with the user's rights).

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The parts of an image config a container needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("bad image config {path}: {why}")]
pub struct ImageConfigError {
    pub path: PathBuf,
    pub why: String,
}

impl ImageConfig {
    /// From the `config` section of an OCI image config (absent: nothing to take).
    pub fn from_oci(config: Option<&oci_spec::image::Config>) -> ImageConfig {
        ImageConfig {
            env: config.and_then(|c| c.env().clone()).unwrap_or_default(),
            entrypoint: config.and_then(|c| c.entrypoint().clone()).unwrap_or_default(),
            cmd: config.and_then(|c| c.cmd().clone()).unwrap_or_default(),
            working_dir: config.and_then(|c| c.working_dir().clone()).filter(|w| !w.is_empty()),
            user: config.and_then(|c| c.user().clone()).filter(|u| !u.is_empty()),
        }
    }

    /// Reads an OCI image config file (`{"config": {"Env": [...], ...}}`) as registries
    /// serve it and `umoci`/`skopeo` store it. Only its `config` section is read, so a
    /// file without the fields a store needs (architecture, rootfs) does as well.
    pub fn from_oci_json(path: &Path) -> Result<ImageConfig, ImageConfigError> {
        #[derive(Deserialize)]
        struct ConfigOnly {
            #[serde(default)]
            config: Option<oci_spec::image::Config>,
        }
        let bad = |why: String| ImageConfigError { path: path.to_path_buf(), why };
        let text = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let file: ConfigOnly = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        Ok(ImageConfig::from_oci(file.config.as_ref()))
    }
}

/// An image ready to become a container's root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// What the user asked for, for messages and `list`.
    pub reference: String,
    /// Unpacked layers in overlayfs form, lowest first.
    pub layer_dirs: Vec<PathBuf>,
    pub config: ImageConfig,
    /// The layers carry `user.overlay.*` xattrs (a store written without root).
    #[serde(default)]
    pub userxattr: bool,
}

/// A bind mount the job's user asked for; its source is checked with the user's rights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserMount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

impl UserMount {
    /// Parses `SRC[:DST][:ro|rw]` (DST defaults to SRC).
    pub fn parse(spec: &str) -> Option<UserMount> {
        let parts: Vec<&str> = spec.split(':').collect();
        let (paths, read_only) = match parts.last() {
            Some(&"ro") => (&parts[..parts.len() - 1], true),
            Some(&"rw") => (&parts[..parts.len() - 1], false),
            _ => (&parts[..], false),
        };
        let (source, target) = match paths {
            [s] => (*s, *s),
            [s, t] => (*s, *t),
            _ => return None,
        };
        (source.starts_with('/') && target.starts_with('/')).then(|| UserMount {
            source: source.into(),
            target: target.into(),
            read_only,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_mounts_parse_with_optional_target_and_mode() {
        let m = UserMount::parse("/data:/in:ro").unwrap();
        assert_eq!((m.source.as_path(), m.target.as_path(), m.read_only), (Path::new("/data"), Path::new("/in"), true));
        let m = UserMount::parse("/data").unwrap();
        assert_eq!(m.target, Path::new("/data"));
        assert!(!m.read_only);
        assert!(UserMount::parse("data:/in").is_none());
        assert!(UserMount::parse("/a:/b:/c").is_none());
    }

    fn read(test: &str, json: &str) -> Result<ImageConfig, ImageConfigError> {
        let path = std::env::temp_dir().join(format!("berth-config-{test}-{}.json", std::process::id()));
        std::fs::write(&path, json).unwrap();
        let config = ImageConfig::from_oci_json(&path);
        std::fs::remove_file(&path).unwrap();
        config
    }

    #[test]
    fn oci_image_config_fields_are_read() {
        let config = read("fields", r#"{"architecture":"amd64","config":{"Env":["PATH=/bin"],"Cmd":["sh"],"WorkingDir":"/w","User":"1000"}}"#).unwrap();
        assert_eq!(config.env, ["PATH=/bin"]);
        assert_eq!(config.cmd, ["sh"]);
        assert_eq!(config.working_dir.as_deref(), Some("/w"));
        assert_eq!(config.user.as_deref(), Some("1000"));
        assert!(config.entrypoint.is_empty());
        assert_eq!(read("empty", "{}").unwrap(), ImageConfig::default());
    }

    #[test]
    fn a_config_field_of_the_wrong_type_is_refused_not_ignored() {
        let err = read("wrong", r#"{"config":{"Env":"PATH=/bin"}}"#).unwrap_err();
        assert!(err.to_string().starts_with("bad image config "), "{err}");
    }
}
