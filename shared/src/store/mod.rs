//! The node's content-addressed image store, shared by every job and every `berth`
//! process on the node:
//!
//! ```text
//! <store>/lock                     shared by pulls and readers, exclusive for gc
//! <store>/overlay-xattrs           "trusted" or "user": how opaque dirs are marked here
//! <store>/blobs/sha256/<hex>       manifests and image configs, verified
//! <store>/layers/sha256/<hex>/     an unpacked layer, by diff_id (uncompressed digest)
//! <store>/layers/chain/<hex>/      a layer with hard links into lower layers, by chain id
//! <store>/refs/<hex>.json          ref index: one record per normalized reference
//! <store>/locks/<hex>.lock         one lock per layer being fetched
//! <store>/tmp/                     work in progress; gc empties it
//! ```
//!
//! Everything is written into `tmp/` and published by an atomic rename only after its
//! digests were verified, so a pull killed at any moment leaves at worst debris in
//! `tmp/`. Concurrent pulls of a layer serialize on its lock: the first fetches, the
//! others find it published. Owns the store directory; never mounts anything and never
//! changes a published layer.

mod gc;
pub mod lock;
mod progress;
mod pull;
#[cfg(test)]
mod pull_tests;
#[cfg(test)]
mod testreg;
mod verify;

pub use gc::GcReport;
pub use verify::VerifyReport;
pub use progress::{human_bytes, short, Progress};

use crate::config::{Config, DEFAULT_CONFIG_PATH};
use crate::reference::{Reference, ReferenceError};
use crate::registry::manifest::{ManifestError, Platform};
use crate::registry::RegistryError;
use crate::unpack::{self, UnpackError};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("cannot pull {reference}: {source}")]
    Registry { reference: String, source: RegistryError },
    #[error("cannot pull {reference}: {source}")]
    Manifest { reference: String, source: ManifestError },
    #[error("cannot use the image store {path}: {source} (check --store / BERTH_STORE / store_dir)")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("the image store {path} is read-only for this user: pull as root, or give --store DIR (or BERTH_STORE) for a store of your own")]
    ReadOnly { path: PathBuf },
    #[error("{reference} is not in the image store {store}: pull it first with `berth pull {reference}`")]
    NotPulled { reference: String, store: PathBuf },
    #[error("cannot pull {reference}: layer {layer}: {source}")]
    Unpack { reference: String, layer: String, source: UnpackError },
    #[error("cannot pull {reference}: layer {layer}: the download broke off after {got} of {expected} bytes ({why}); try again")]
    Truncated { reference: String, layer: String, got: u64, expected: u64, why: String },
    #[error("cannot pull {reference}: {what} does not match its digest (expected {expected}, got {actual}): the registry or something on the way corrupted it")]
    DigestMismatch { reference: String, what: String, expected: String, actual: String },
    #[error("cannot pull {reference}: no space left in the image store {store} ({detail}): free space or run `berth gc`")]
    NoSpace { reference: String, store: PathBuf, detail: String },
    #[error("cannot pull {reference}: {why}")]
    BadImage { reference: String, why: String },
    #[error("image store {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("gc removed nothing: cannot tell which layers the containers in {runtime_dir} use ({why}); run gc as root")]
    InUse { runtime_dir: PathBuf, why: String },
    #[error("cannot export {reference} to {dest}: {why}")]
    Export { reference: String, dest: PathBuf, why: String },
}

/// When to contact the registry (`--pull`, and the adapters' `container-pull`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Pull only when the reference is not in the store.
    #[default]
    Missing,
    /// Always ask the registry (fetching only what changed).
    Always,
    /// Never pull; fail when the reference is not in the store.
    Never,
}

impl PullPolicy {
    /// The word `--pull` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Missing => "missing",
            PullPolicy::Always => "always",
            PullPolicy::Never => "never",
        }
    }
}

impl std::str::FromStr for PullPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "missing" => Ok(PullPolicy::Missing),
            "always" => Ok(PullPolicy::Always),
            "never" => Ok(PullPolicy::Never),
            _ => Err(format!("'{s}' is not a pull policy: use missing, always or never")),
        }
    }
}

/// The parts of an image config a container needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

/// An image ready to mount.
#[derive(Debug, Clone)]
pub struct StoredImage {
    /// Normalized, e.g. `docker.io/library/ubuntu:22.04`.
    pub reference: String,
    /// `sha256:...` of the image manifest (for an index: of the platform's manifest).
    pub manifest_digest: String,
    /// Unpacked layer dirs, lowest first, in overlayfs form: whiteouts are 0/0 char
    /// devices, opaque dirs carry `trusted.overlay.opaque=y` (or `user.overlay.opaque=y`
    /// when `userxattr`).
    pub layer_dirs: Vec<PathBuf>,
    pub config: ImageConfig,
    /// The layers mark opaque dirs with `user.overlay.*`: mount with the `userxattr`
    /// option (from a user namespace). False for stores written by root.
    pub userxattr: bool,
}

/// One line of `berth images`.
#[derive(Debug, Clone)]
pub struct ImageSummary {
    pub reference: String,
    pub manifest_digest: String,
    /// Compressed size of the image's layers, as downloaded.
    pub size: u64,
    pub last_used: Option<SystemTime>,
}

/// What the ref index keeps per reference.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    reference: String,
    manifest_digest: String,
    config_digest: String,
    /// Layer dirs relative to the store root, lowest first.
    layers: Vec<String>,
    size: u64,
    config: ImageConfig,
}

/// The store lock, held shared: while it lives, `gc` waits.
#[derive(Debug)]
pub struct Held {
    _lock: Option<lock::Lock>,
}

/// The node's image store.
pub struct Store {
    root: PathBuf,
    config: Config,
    opts: unpack::Options,
    writable: bool,
    /// Pulls for this job user use their registry logins (read as them), not the caller's.
    job_user: Option<crate::registry::auth::JobUser>,
}

/// The store a caller uses when it gave no `--store`/`BERTH_STORE`: the admin's
/// `store_dir`, except that a non-root caller on a machine with no berth config gets a
/// store of its own (`$XDG_DATA_HOME/berth`, else `~/.local/share/berth`).
pub fn default_store_dir(config: &Config) -> PathBuf {
    let configured = std::env::var_os("BERTH_CONFIG").is_some() || Path::new(DEFAULT_CONFIG_PATH).exists();
    if configured || rustix::process::geteuid().is_root() {
        return config.store_dir.clone();
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")));
    match data {
        Some(d) => d.join("berth"),
        None => config.store_dir.clone(),
    }
}

const SUBDIRS: [&str; 6] = ["blobs/sha256", "layers/sha256", "layers/chain", "refs", "locks", "tmp"];

/// What of a root store only root may enter: layers keep the image's modes, so an
/// image's `1777` `/tmp` would otherwise let any user of the node add files to a layer
/// every container of that image shares; blobs may come from private repositories.
/// Overlay reads lower layers with the mounter's (root's) credentials, so containers
/// do not need more. The ref index stays readable (`berth images` for everyone).
const ROOT_ONLY: [&str; 3] = ["layers", "blobs", "tmp"];

fn keep_private(root: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for sub in ROOT_ONLY {
        let path = root.join(sub);
        if std::fs::metadata(&path)?.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    Ok(())
}

impl Store {
    /// Opens (creating when it can) the store at `config.store_dir`. A store the caller
    /// cannot write is opened read-only: images already pulled can be used.
    pub fn open(config: &Config) -> Result<Store, StoreError> {
        let root = config.store_dir.clone();
        let open_err = |source| StoreError::Open { path: root.clone(), source };
        let as_root = rustix::process::geteuid().is_root();
        match std::fs::create_dir_all(&root) {
            Ok(()) => {}
            Err(e) if root.is_dir() => drop(e),
            Err(e) => return Err(open_err(e)),
        }
        let writable = rustix::fs::access(&root, rustix::fs::Access::WRITE_OK).is_ok();
        if writable {
            for sub in SUBDIRS {
                std::fs::create_dir_all(root.join(sub)).map_err(open_err)?;
            }
            if as_root {
                keep_private(&root).map_err(open_err)?;
            }
        }
        let marker = root.join("overlay-xattrs");
        let userxattr = match std::fs::read_to_string(&marker) {
            Ok(s) => s.trim() == "user",
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && writable => {
                let kind = if as_root { "trusted" } else { "user" };
                write_atomic(&root, &marker, format!("{kind}\n").as_bytes()).map_err(open_err)?;
                !as_root
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => !as_root,
            Err(e) => return Err(open_err(e)),
        };
        Ok(Store {
            root,
            config: config.clone(),
            opts: unpack::Options { as_root, userxattr },
            writable,
            job_user: None,
        })
    }

    /// Pulls from here on log in as `user` would: with the registry logins of their
    /// Docker config and credential helpers (read and run as them), then the admin's
    /// credentials file. For root creating a job's container.
    pub fn for_job_user(mut self, user: crate::registry::auth::JobUser) -> Store {
        self.job_user = Some(user);
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Returns the image ready to mount; pulls per policy.
    pub fn resolve(&self, reference: &str, policy: PullPolicy, progress: Progress) -> Result<StoredImage, StoreError> {
        self.resolve_for(reference, policy, None, progress)
    }

    /// [`Store::resolve`] for a platform other than the host's.
    pub fn resolve_for(
        &self,
        reference: &str,
        policy: PullPolicy,
        platform: Option<&Platform>,
        progress: Progress,
    ) -> Result<StoredImage, StoreError> {
        self.resolve_held(reference, policy, platform, progress).map(|(image, _held)| image)
    }

    /// [`Store::resolve_for`], returning also a [`Held`] that keeps `gc` from running
    /// until it is dropped: a container creator keeps it until the container's
    /// `state.json` names the layers (from then on gc sees them in use).
    pub fn resolve_held(
        &self,
        reference: &str,
        policy: PullPolicy,
        platform: Option<&Platform>,
        progress: Progress,
    ) -> Result<(StoredImage, Held), StoreError> {
        let r = Reference::parse(reference)?;
        let key = r.to_string();
        let shared = Held { _lock: self.lock_store(false)? };
        if policy != PullPolicy::Always {
            if let Some(image) = self.load(&key)? {
                self.touch(&key);
                return Ok((image, shared));
            }
            if policy == PullPolicy::Never {
                return Err(StoreError::NotPulled { reference: key, store: self.root.clone() });
            }
        }
        if !self.writable {
            return Err(StoreError::ReadOnly { path: self.root.clone() });
        }
        let host = Platform::host();
        let image = pull::pull(self, &r, platform.unwrap_or(&host), progress)?;
        Ok((image, shared))
    }

    /// Every reference in the store.
    pub fn images(&self) -> Result<Vec<ImageSummary>, StoreError> {
        let dir = self.root.join("refs");
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(self.io(&dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| self.io(&dir, e))?;
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let Ok(record) = read_record(&path) else { continue };
            out.push(ImageSummary {
                reference: record.reference,
                manifest_digest: record.manifest_digest,
                size: record.size,
                last_used: entry.metadata().and_then(|m| m.modified()).ok(),
            });
        }
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    /// The image config of a pulled reference, as stored (JSON text).
    pub fn inspect(&self, reference: &str) -> Result<String, StoreError> {
        let key = Reference::parse(reference)?.to_string();
        let record = self.record(&key)?.ok_or_else(|| StoreError::NotPulled { reference: key.clone(), store: self.root.clone() })?;
        let path = self.blob_path(&record.config_digest);
        std::fs::read_to_string(&path).map_err(|e| self.io(&path, e))
    }

    /// Drops a reference from the index; its layers go at the next `gc` if unused.
    pub fn remove(&self, reference: &str) -> Result<(), StoreError> {
        let key = Reference::parse(reference)?.to_string();
        if !self.writable {
            return Err(StoreError::ReadOnly { path: self.root.clone() });
        }
        let _shared = self.lock_store(false)?;
        let path = self.ref_path(&key);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StoreError::NotPulled { reference: key, store: self.root.clone() }),
            Err(e) => Err(self.io(&path, e)),
        }
    }

    /// Removes unreferenced layers and blobs and the leftovers of interrupted pulls.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        if !self.writable {
            return Err(StoreError::ReadOnly { path: self.root.clone() });
        }
        let _exclusive = self.lock_store(true)?;
        gc::collect(self)
    }

    /// Checks the whole store (blobs rehashed, refs against manifests, configs and
    /// layer dirs, no debris) without changing it; waits for running pulls to end.
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        let _exclusive = self.lock_store(true)?;
        verify::check(self)
    }

    /// Writes the flattened root filesystem of an image (pulled if missing) into `dest`,
    /// which must not exist or be an empty directory.
    pub fn export(&self, reference: &str, dest: &Path, progress: Progress) -> Result<(), StoreError> {
        let image = self.resolve(reference, PullPolicy::Missing, progress)?;
        let err = |why: String| StoreError::Export { reference: image.reference.clone(), dest: dest.to_path_buf(), why };
        match std::fs::read_dir(dest) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(err("the directory is not empty".into()));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(dest).map_err(|e| err(e.to_string()))?,
            Err(e) => return Err(err(e.to_string())),
        }
        let _shared = self.lock_store(false)?;
        let opts = unpack::Options { as_root: self.opts.as_root, userxattr: image.userxattr };
        unpack::flatten(&image.layer_dirs, dest, &opts).map_err(|e| err(e.to_string()))
    }

    fn lock_store(&self, exclusive: bool) -> Result<Option<lock::Lock>, StoreError> {
        let path = self.root.join("lock");
        match lock::acquire(&path, exclusive) {
            Ok(l) => Ok(Some(l)),
            // A read-only store that nobody ever locked: nothing can be changing it.
            Err(e) if !self.writable && e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(&path, e)),
        }
    }

    fn io(&self, path: &Path, source: std::io::Error) -> StoreError {
        StoreError::Io { path: path.to_path_buf(), source }
    }

    fn ref_path(&self, key: &str) -> PathBuf {
        self.root.join("refs").join(format!("{:x}.json", Sha256::digest(key.as_bytes())))
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))
    }

    fn record(&self, key: &str) -> Result<Option<Record>, StoreError> {
        let path = self.ref_path(key);
        match read_record(&path) {
            Ok(r) => Ok(Some(r)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(&path, e)),
        }
    }

    /// The stored image for a key, if its record and every layer are present.
    fn load(&self, key: &str) -> Result<Option<StoredImage>, StoreError> {
        let Some(record) = self.record(key)? else { return Ok(None) };
        let layer_dirs: Vec<PathBuf> = record.layers.iter().map(|l| self.root.join(l)).collect();
        if !layer_dirs.iter().all(|d| d.is_dir()) {
            return Ok(None);
        }
        Ok(Some(StoredImage {
            reference: record.reference,
            manifest_digest: record.manifest_digest,
            layer_dirs,
            config: record.config,
            userxattr: self.opts.userxattr,
        }))
    }

    /// Marks a reference as used now (its record's mtime), when the caller may.
    fn touch(&self, key: &str) {
        let now = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_NOW },
            last_modification: rustix::fs::Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_NOW },
        };
        let _ = rustix::fs::utimensat(rustix::fs::CWD, self.ref_path(key), &now, rustix::fs::AtFlags::empty());
    }

    fn write_record(&self, record: &Record) -> Result<(), StoreError> {
        let path = self.ref_path(&record.reference);
        let text = serde_json::to_vec_pretty(record).map_err(|e| self.io(&path, e.into()))?;
        write_atomic(&self.root, &path, &text).map_err(|e| self.io(&path, e))
    }

    /// A fresh directory under `tmp/` for work in progress.
    fn tmp_dir(&self, what: &str) -> Result<PathBuf, StoreError> {
        let path = unique_tmp(&self.root, what);
        std::fs::create_dir(&path).map_err(|e| self.io(&path, e))?;
        Ok(path)
    }
}

fn read_record(path: &Path) -> std::io::Result<Record> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

fn unique_tmp(root: &Path, what: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    root.join("tmp").join(format!("{what}-{}-{n}-{nanos}", std::process::id()))
}

/// Writes a file under `tmp/` and renames it into place, so readers see all or nothing.
fn write_atomic(root: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp_root = root.join("tmp");
    std::fs::create_dir_all(&tmp_root)?;
    let tmp = unique_tmp(root, "file");
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_in(name: &str) -> (Store, PathBuf) {
        let dir = std::env::temp_dir().join(format!("berth-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config = Config { store_dir: dir.clone(), ..Config::default() };
        (Store::open(&config).unwrap(), dir)
    }

    #[test]
    fn a_new_store_has_its_layout_and_knows_nothing() {
        let (store, dir) = store_in("layout");
        for sub in SUBDIRS {
            assert!(dir.join(sub).is_dir(), "{sub}");
        }
        assert!(store.images().unwrap().is_empty());
        let err = store.resolve("ubuntu", PullPolicy::Never, Progress::Silent).unwrap_err().to_string();
        assert_eq!(err, format!("docker.io/library/ubuntu:latest is not in the image store {}: pull it first with `berth pull docker.io/library/ubuntu:latest`", dir.display()));
        assert!(matches!(store.remove("ubuntu"), Err(StoreError::NotPulled { .. })));
        assert!(matches!(store.resolve("Bad Ref", PullPolicy::Missing, Progress::Silent), Err(StoreError::Reference(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn records_round_trip_and_missing_layers_mean_not_pulled() {
        let (store, dir) = store_in("records");
        let layer = "layers/sha256/aa".to_string();
        std::fs::create_dir_all(dir.join(&layer)).unwrap();
        let record = Record {
            reference: "docker.io/library/x:latest".into(),
            manifest_digest: "sha256:00".into(),
            config_digest: "sha256:11".into(),
            layers: vec![layer.clone()],
            size: 42,
            config: ImageConfig { env: vec!["A=1".into()], ..ImageConfig::default() },
        };
        store.write_record(&record).unwrap();
        let image = store.resolve("x", PullPolicy::Never, Progress::Silent).unwrap();
        assert_eq!(image.layer_dirs, vec![dir.join(&layer)]);
        assert_eq!(image.config.env, vec!["A=1"]);
        assert_eq!(store.images().unwrap()[0].size, 42);
        std::fs::remove_dir(dir.join(&layer)).unwrap();
        assert!(matches!(store.resolve("x", PullPolicy::Never, Progress::Silent), Err(StoreError::NotPulled { .. })));
        store.remove("x").unwrap();
        assert!(store.images().unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pull_policy_parses() {
        assert_eq!("never".parse::<PullPolicy>().unwrap(), PullPolicy::Never);
        assert!("sometimes".parse::<PullPolicy>().is_err());
    }
}
