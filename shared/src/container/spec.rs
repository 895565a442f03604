//! What `create` and `run` are asked for: the image (its layers and its OCI config,
//! read here from the JSON registries serve), the user's bind mounts as given on the
//! command line, and the [`Spec`] that carries them. Owns parsing these; never opens,
//! mounts or checks a path (create does, with the user's rights).

use super::{ContainerError, Result};
use crate::identity::Credentials;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub use crate::store::ImageConfig;

impl ImageConfig {
    /// Reads an OCI image config (`{"config": {"Env": [...], ...}}`) as registries
    /// serve it and `umoci`/`skopeo` store it.
    pub fn from_oci_json(path: &Path) -> Result<ImageConfig> {
        let bad = |why: String| ContainerError::ImageConfig { path: path.to_path_buf(), why };
        let text = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let value: serde_json::Value = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        let config = value.get("config").cloned().unwrap_or(serde_json::Value::Null);
        let list = |key: &str| -> Vec<String> {
            config
                .get(key)
                .and_then(|v| v.as_array())
                .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
                .unwrap_or_default()
        };
        let text_of = |key: &str| config.get(key).and_then(|v| v.as_str()).filter(|s| !s.is_empty()).map(String::from);
        Ok(ImageConfig {
            env: list("Env"),
            entrypoint: list("Entrypoint"),
            cmd: list("Cmd"),
            working_dir: text_of("WorkingDir"),
            user: text_of("User"),
        })
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

impl From<crate::store::StoredImage> for Image {
    fn from(image: crate::store::StoredImage) -> Image {
        Image { reference: image.reference, layer_dirs: image.layer_dirs, config: image.config, userxattr: image.userxattr }
    }
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

/// What `create` is asked for.
#[derive(Debug, Clone)]
pub struct Spec {
    pub job: String,
    /// [`PER_NODE`](super::PER_NODE) or [`per_rank`](super::per_rank)`(N)`, or any name the caller picks.
    pub name: String,
    pub image: Image,
    pub user: Credentials,
    /// Bind the user's home (from the password database) at the same path.
    pub home: bool,
    /// Bound at the same path; the working directory unless `workdir` is set.
    pub submit_dir: Option<PathBuf>,
    pub mounts: Vec<UserMount>,
    /// Device nodes the job may use, bound at the same path.
    pub devices: Vec<PathBuf>,
    /// Overrides the image's WorkingDir.
    pub workdir: Option<String>,
    /// Added to the image's Env (later entries win).
    pub env: Vec<String>,
    pub read_only: bool,
    /// A new UTS namespace with this host name.
    pub hostname: Option<String>,
    /// A new IPC namespace.
    pub ipc: bool,
    /// Who tracks the job's processes by cgroup where cgroup v2 carries controllers.
    pub tracking: crate::teardown::cgroup::Tracking,
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

    #[test]
    fn oci_image_config_fields_are_read() {
        let path = std::env::temp_dir().join(format!("berth-config-{}.json", std::process::id()));
        std::fs::write(&path, r#"{"architecture":"amd64","config":{"Env":["PATH=/bin"],"Cmd":["sh"],"WorkingDir":"/w","User":"1000"}}"#).unwrap();
        let config = ImageConfig::from_oci_json(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(config.env, ["PATH=/bin"]);
        assert_eq!(config.cmd, ["sh"]);
        assert_eq!(config.working_dir.as_deref(), Some("/w"));
        assert_eq!(config.user.as_deref(), Some("1000"));
        assert!(config.entrypoint.is_empty());
    }
}
