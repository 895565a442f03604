//! A container's root file system: an overlay whose lower layers are the image's
//! unpacked layer directories (shared, read-only, never written) and whose upper and
//! work directories belong to one container. Owns the overlay mount and its option
//! string; never writes into a layer directory and never copies image content.

use nix::errno::Errno;
use nix::mount::MsFlags;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The kernel reads mount options from one page, NUL included.
const MAX_OPTIONS: usize = 4095;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("the image has no layers")]
    NoLayers,
    #[error("layer directory {path} is missing or not a directory")]
    LayerMissing { path: PathBuf },
    #[error("path {path} holds ',', ':' or '\\', which overlayfs options cannot carry")]
    BadPath { path: PathBuf },
    #[error("cannot prepare {path}: {source}")]
    Prepare { path: PathBuf, source: std::io::Error },
    #[error("the image's {count} layer paths are too long for one overlay mount ({len} bytes of options)")]
    TooLong { count: usize, len: usize },
    #[error("cannot mount the overlay at {target}: {source}")]
    Mount { target: PathBuf, source: Errno },
}

/// Where one container's overlay lives.
#[derive(Debug, Clone)]
pub struct Overlay {
    /// Lowest layer first (the order the image lists them).
    pub layers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    /// Layers mark whiteouts and opaque dirs with `user.overlay.*` xattrs (a store
    /// written without root); required for a mount inside a user namespace.
    pub userxattr: bool,
}

impl Overlay {
    /// The overlay of `layers` with upper and work directories under `dir`.
    pub fn in_dir(layers: Vec<PathBuf>, dir: &Path) -> Overlay {
        Overlay { layers, upper: dir.join("upper"), work: dir.join("work"), userxattr: false }
    }

    /// Opens the layer dirs, so that [`Overlay::mount_from`] can name them after their
    /// paths are hidden (by a tmpfs mounted over a parent, for instance).
    pub fn open_layers(&self) -> Result<Vec<OwnedFd>, RootfsError> {
        self.layers
            .iter()
            .map(|layer| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
                    .open(layer)
                    .map(OwnedFd::from)
                    .map_err(|_| RootfsError::LayerMissing { path: layer.clone() })
            })
            .collect()
    }

    /// Mounts the overlay at `target` with `nosuid,nodev`, naming the layers by the
    /// descriptors [`Overlay::open_layers`] returned (short options whatever the paths).
    pub fn mount_from(&self, layers: &[OwnedFd], target: &Path) -> Result<(), RootfsError> {
        let lower: Vec<String> = layers.iter().rev().map(|fd| format!("/proc/self/fd/{}", fd.as_raw_fd())).collect();
        let mut options = format!("lowerdir={},upperdir={},workdir={}", lower.join(":"), checked(&self.upper)?, checked(&self.work)?);
        if self.userxattr {
            options.push_str(",userxattr");
        }
        if options.len() > MAX_OPTIONS {
            return Err(RootfsError::TooLong { count: layers.len(), len: options.len() });
        }
        nix::mount::mount(Some("overlay"), target, Some("overlay"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some(options.as_str()))
            .map_err(|source| RootfsError::Mount { target: target.to_path_buf(), source })
    }

    /// The option string, naming layers relative to `base` when given (every layer must
    /// then sit directly in `base`).
    fn options(&self, base: Option<&Path>) -> Result<String, RootfsError> {
        if self.layers.is_empty() {
            return Err(RootfsError::NoLayers);
        }
        let mut lower = Vec::with_capacity(self.layers.len());
        // overlayfs lists the topmost layer first.
        for layer in self.layers.iter().rev() {
            let shown = match base {
                Some(base) => layer.strip_prefix(base).unwrap_or(layer),
                None => layer,
            };
            lower.push(checked(shown)?);
        }
        let userxattr = if self.userxattr { ",userxattr" } else { "" };
        Ok(format!(
            "lowerdir={},upperdir={},workdir={}{userxattr}",
            lower.join(":"),
            checked(&self.upper)?,
            checked(&self.work)?
        ))
    }

    /// Checks that every layer dir exists.
    pub fn check_layers(&self) -> Result<(), RootfsError> {
        match self.layers.iter().find(|layer| !layer.is_dir()) {
            Some(layer) => Err(RootfsError::LayerMissing { path: layer.clone() }),
            None => Ok(()),
        }
    }

    /// Creates the upper and work directories (the root directory's mode comes from upper).
    pub fn prepare(&self) -> Result<(), RootfsError> {
        // The upper dir's mode is the container root's: exactly 0755, whatever the umask.
        for dir in [&self.upper, &self.work] {
            crate::fsmode::ensure_dir(dir, 0o755).map_err(|source| RootfsError::Prepare { path: dir.clone(), source })?;
        }
        Ok(())
    }

    /// Mounts the overlay at `target` with `nosuid,nodev`. Long layer lists are named
    /// relative to their common directory, from which the mount is made.
    pub fn mount(&self, target: &Path) -> Result<(), RootfsError> {
        self.check_layers()?;
        let mut options = self.options(None)?;
        let mut base = None;
        if options.len() > MAX_OPTIONS {
            let parent = self.layers[0].parent().map(Path::to_path_buf);
            if let Some(parent) = parent.filter(|p| self.layers.iter().all(|l| l.parent() == Some(p))) {
                options = self.options(Some(&parent))?;
                base = Some(parent);
            }
            if options.len() > MAX_OPTIONS {
                return Err(RootfsError::TooLong { count: self.layers.len(), len: options.len() });
            }
        }
        let mount_err = |source| RootfsError::Mount { target: target.to_path_buf(), source };
        let previous = match &base {
            Some(base) => {
                let here = std::fs::File::open(".").map_err(|e| RootfsError::Prepare { path: ".".into(), source: e })?;
                nix::unistd::chdir(base.as_path()).map_err(mount_err)?;
                Some(here)
            }
            None => None,
        };
        let result = nix::mount::mount(
            Some("overlay"),
            target,
            Some("overlay"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(options.as_str()),
        );
        if let Some(here) = previous {
            nix::unistd::fchdir(std::os::fd::AsRawFd::as_raw_fd(&here)).map_err(mount_err)?;
        }
        result.map_err(mount_err)
    }
}

fn checked(path: &Path) -> Result<String, RootfsError> {
    let bytes = path.as_os_str().as_bytes();
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.contains([',', ':', '\\']) => Ok(s.to_string()),
        _ => Err(RootfsError::BadPath { path: path.to_path_buf() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(layers: &[&str]) -> Overlay {
        Overlay::in_dir(layers.iter().map(PathBuf::from).collect(), Path::new("/run/berth/7/node"))
    }

    #[test]
    fn lower_layers_are_listed_topmost_first() {
        let options = overlay(&["/s/l/a", "/s/l/b", "/s/l/c"]).options(None).unwrap();
        assert_eq!(
            options,
            "lowerdir=/s/l/c:/s/l/b:/s/l/a,upperdir=/run/berth/7/node/upper,workdir=/run/berth/7/node/work"
        );
    }

    #[test]
    fn relative_names_drop_the_common_directory() {
        let options = overlay(&["/s/l/a", "/s/l/b"]).options(Some(Path::new("/s/l"))).unwrap();
        assert!(options.starts_with("lowerdir=b:a,"), "{options}");
    }

    #[test]
    fn paths_that_would_break_the_option_string_are_refused() {
        for bad in ["/s/a,b", "/s/a:b", "/s/a\\b"] {
            assert!(matches!(overlay(&[bad]).options(None), Err(RootfsError::BadPath { .. })), "{bad}");
        }
        assert!(matches!(overlay(&[]).options(None), Err(RootfsError::NoLayers)));
    }

    #[test]
    fn a_missing_layer_is_named() {
        let err = overlay(&["/nonexistent/berth/layer"]).check_layers().unwrap_err();
        assert!(err.to_string().contains("/nonexistent/berth/layer"), "{err}");
    }
}
