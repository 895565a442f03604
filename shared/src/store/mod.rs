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
//!                                  (a private image's record is root's alone, 0600)
//! <store>/access/<kind>-<hex>      who may reuse a layer dir or config blob (`Access`)
//! <store>/locks/<hex>.lock         one lock per layer being fetched
//! <store>/tmp/                     work in progress; gc empties it
//! ```
//!
//! Everything is written into `tmp/` and published by an atomic rename only after its
//! digests were verified, so a pull killed at any moment leaves at worst debris in
//! `tmp/`. Concurrent pulls of a layer serialize on its lock: the first fetches, the
//! others find it published. Owns the store directory; never mounts anything and never
//! changes a published layer.
//!
//! A root store is shared by every user of the node, so nothing in it depends on the
//! caller (every entry gets its mode explicitly, `fsmode`), and nothing read back from
//! it is believed unless root wrote it: a record must be root's and writable by no one
//! else, names its config by digest (the config is read from that verified blob, never
//! from the record) and its layers only as `layers/sha256/<hex>` or `layers/chain/<hex>`
//! of that config's diff_ids; a record failing any of this is treated as absent, so the
//! image is pulled again. An image that needed a login is reused without the registry
//! only by the users who showed it theirs (see [`Access`]).
//!
//! A digest is not a capability: any image's config can name any diff_id, and any
//! manifest any config digest. So a layer dir or config blob that came with a login is
//! reused by another image's pull only for the users who proved they have its bytes
//! (`access/`): a user not yet entitled downloads the blob from their own registry,
//! and only when its bytes hash to the manifest's digest and, uncompressed, to the
//! config's diff_id is the uid added. Content published without a login is public.
//! Content is published before its access entry, so a crash leaves at worst content
//! without one, which counts as not public: the next user proves possession again.

mod gc;

mod progress;
mod pull;
#[cfg(test)]
mod pull_tests;
mod verify;

pub use gc::GcReport;
pub use verify::VerifyReport;
pub use progress::{human_bytes, short, Progress};

use crate::config::{Config, DEFAULT_CONFIG_PATH};
use crate::image::{Image, ImageConfig};
use crate::lock;
use crate::reference::{Reference, ReferenceError};
use crate::registry::manifest::{ManifestError, Platform};
use crate::registry::RegistryError;
use crate::unpack::{self, UnpackError};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
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
    #[error("cannot pull {reference}: layer {layer}: registry {registry} sent only {got} of {expected} bytes in {secs} s, slower than the minimum rate of {rate}/s (min_pull_rate); try again later or ask the admin")]
    TooSlow { reference: String, registry: String, layer: String, got: u64, expected: u64, secs: u64, rate: String },
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
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    #[error("cannot use {reference} from the image store: another user pulled it with a login and {source}")]
    NoAccess { reference: String, source: RegistryError },
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

impl From<StoredImage> for Image {
    fn from(image: StoredImage) -> Image {
        Image { reference: image.reference, layer_dirs: image.layer_dirs, config: image.config, userxattr: image.userxattr }
    }
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
    /// A copy for `berth images`-like readers; containers get the config blob's.
    config: ImageConfig,
    #[serde(default)]
    access: Access,
}

/// Who may reuse a stored image without asking its registry (a record's `access`), or
/// a layer dir or config blob without downloading it again (its `access/` entry).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Access {
    /// Pulled before berth recorded this (or, for content, a crash before its entry was
    /// written): every job user asks the registry once, or proves possession.
    #[default]
    Unknown,
    /// The registry serves it without a login.
    Public,
    /// It needed a login: these uids showed the registry theirs (the puller first); for
    /// content, these uids downloaded its bytes and they matched its digests.
    Users(Vec<u32>),
}

impl Access {
    /// What one user's verified download adds to what is known: public stays public.
    fn with(self, added: &Access) -> Access {
        match (self, added) {
            (Access::Public, _) | (_, Access::Public) => Access::Public,
            (Access::Users(mut uids), Access::Users(more)) => {
                for uid in more {
                    if !uids.contains(uid) {
                        uids.push(*uid);
                    }
                }
                Access::Users(uids)
            }
            (Access::Users(uids), Access::Unknown) => Access::Users(uids),
            (Access::Unknown, added) => added.clone(),
        }
    }
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

/// The store's dirs and their modes, set on every open by whoever owns the store.
/// Only the owner may enter layers, blobs, locks and tmp: layers keep the image's modes,
/// so an image's `1777` `/tmp` would otherwise let any user of the node add files to a
/// layer every container of that image shares; blobs may come from private
/// repositories; a lock others could open they could hold. Overlay reads lower layers
/// with the mounter's (root's) credentials, so containers do not need more. The ref
/// index stays readable (`berth images` for everyone), but only public images' records
/// are (`PRIVATE_FILE_MODE`): a private one names its layers' diff_ids and its Env.
const SUBDIRS: [(&str, u32); 9] = [
    ("blobs", 0o700),
    ("blobs/sha256", 0o700),
    ("layers", 0o700),
    ("layers/sha256", 0o700),
    ("layers/chain", 0o700),
    ("refs", 0o755),
    ("locks", 0o700),
    ("tmp", 0o700),
    ("access", 0o700),
];

/// Files of the index and blobs: readable (within their dirs' modes), the owner's to write.
const FILE_MODE: u32 = 0o644;

/// Records of images that are not public, and `access/` entries: the owner's alone.
const PRIVATE_FILE_MODE: u32 = 0o600;

/// Reads a file of the store only if the caller may believe it ([`crate::fsmode::trusted`]:
/// root's or the caller's, writable by nobody else), never through a symlink.
fn read_trusted(path: &Path) -> std::io::Result<Vec<u8>> {
    use rustix::fs::{FileType, Mode, OFlags};
    use std::io::Read;
    let fd = rustix::fs::open(path, OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
    let st = rustix::fs::fstat(&fd)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile || !crate::fsmode::trusted(&st) {
        return Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, format!("{} is not the store owner's alone", path.display())));
    }
    let mut bytes = Vec::new();
    std::fs::File::from(fd).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Whether a record's layer path is one of the store's own: `layers/sha256/<hex>` or
/// `layers/chain/<hex>`, 64 lowercase hex digits.
fn is_layer_path(rel: &str) -> bool {
    let hex = rel.strip_prefix("layers/sha256/").or_else(|| rel.strip_prefix("layers/chain/"));
    hex.is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

impl Store {
    /// Opens (creating when it can) the store at `config.store_dir`. A store the caller
    /// cannot write is opened read-only: images already pulled can be used.
    pub fn open(config: &Config) -> Result<Store, StoreError> {
        let root = config.store_dir.clone();
        let open_err = |source| StoreError::Open { path: root.clone(), source };
        let as_root = rustix::process::geteuid().is_root();
        // The caller's own store (root's, for root) gets its modes; anyone else's is read only.
        let writable = match crate::fsmode::ensure_dir(&root, 0o755) {
            Ok(()) => true,
            Err(e) if !as_root && root.is_dir() => {
                drop(e);
                false
            }
            Err(e) => return Err(open_err(e)),
        };
        if writable {
            for (sub, mode) in SUBDIRS {
                crate::fsmode::ensure_dir(&root.join(sub), mode).map_err(open_err)?;
            }
        }
        let marker = root.join("overlay-xattrs");
        let userxattr = match read_trusted(&marker).map(|b| String::from_utf8_lossy(&b).into_owned()) {
            Ok(s) => s.trim() == "user",
            // Missing, or not the owner's alone: written anew.
            Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied) && writable => {
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
            if let Some((image, record)) = self.load(&key)? {
                self.check_access(&r, record)?;
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
        match lock::acquire(&path, exclusive, lock::STORE_WAIT, "the image store, held by a gc or verify") {
            Ok(l) => Ok(Some(l)),
            // Another user's store (root's): its lock is its owner's alone. Such a caller
            // only reads what it may read; a gc removing an image under it fails its run.
            Err(e) if !self.writable && (e.is_not_found() || e.is_denied()) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Reuse of an image that needed a login: by its puller and users who showed the
    /// registry their access, freely; by anyone else only after the registry serves
    /// them its manifest (by digest) with their own credentials. Callers without a job
    /// user (root itself, a user's own store) are not asked.
    fn check_access(&self, r: &Reference, mut record: Record) -> Result<(), StoreError> {
        let Some(user) = &self.job_user else { return Ok(()) };
        let uid = user.ids.uid;
        match &record.access {
            Access::Public => return Ok(()),
            Access::Users(uids) if uids.contains(&uid) => return Ok(()),
            Access::Users(_) | Access::Unknown => {}
        }
        let denied = |source| StoreError::NoAccess { reference: record.reference.clone(), source };
        let credentials = crate::registry::auth::Credentials::load_for(user.clone(), &self.config).map_err(|e| denied(e.into()))?;
        let client = crate::registry::Client::new(&self.config, r, &credentials).map_err(denied)?;
        client.manifest(&record.manifest_digest).map_err(denied)?;
        if self.writable {
            // Served to a user with no login for it: the image is public after all.
            let anonymous = matches!(credentials.lookup(&r.registry), Ok(None));
            record.access = match std::mem::take(&mut record.access) {
                _ if anonymous => Access::Public,
                Access::Users(mut uids) => {
                    uids.push(uid);
                    Access::Users(uids)
                }
                _ => Access::Users(vec![uid]),
            };
            // Only a cache of the registry's answer: failing to keep it costs a round trip next time.
            let _ = self.write_record(&record);
        }
        Ok(())
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

    /// The record of a key, if there is one the caller may believe (else `None`).
    fn record(&self, key: &str) -> Result<Option<Record>, StoreError> {
        let path = self.ref_path(key);
        let bytes = match read_trusted(&path) {
            Ok(b) => b,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied) => return Ok(None),
            Err(e) => return Err(self.io(&path, e)),
        };
        Ok(serde_json::from_slice::<Record>(&bytes).ok().filter(|r| r.reference == key))
    }

    /// The stored image for a key, if its record checks out and every layer is present:
    /// config from the digest-verified blob, layers only the store's dirs of that
    /// config's diff_ids. Anything else is as if not pulled.
    fn load(&self, key: &str) -> Result<Option<(StoredImage, Record)>, StoreError> {
        let Some(record) = self.record(key)? else { return Ok(None) };
        if !crate::reference::is_sha256_digest(&record.manifest_digest) || !crate::reference::is_sha256_digest(&record.config_digest) {
            return Ok(None);
        }
        let Ok(config_bytes) = read_trusted(&self.blob_path(&record.config_digest)) else { return Ok(None) };
        if crate::registry::sha256_digest(&config_bytes) != record.config_digest {
            return Ok(None);
        }
        let Ok(image_config) = oci_spec::image::ImageConfiguration::from_reader(&config_bytes[..]) else { return Ok(None) };
        let diff_ids = image_config.rootfs().diff_ids();
        if diff_ids.len() != record.layers.len() {
            return Ok(None);
        }
        let chain_ids = pull::chain_ids(diff_ids);
        for ((rel, diff_id), chain_id) in record.layers.iter().zip(diff_ids).zip(&chain_ids) {
            let ours = [format!("layers/sha256/{}", diff_id.trim_start_matches("sha256:")), format!("layers/chain/{}", chain_id.trim_start_matches("sha256:"))];
            if !is_layer_path(rel) || !ours.contains(rel) {
                return Ok(None);
            }
        }
        let layer_dirs: Vec<PathBuf> = record.layers.iter().map(|l| self.root.join(l)).collect();
        let is_dir = |d: &PathBuf| std::fs::symlink_metadata(d).is_ok_and(|m| m.is_dir());
        if !layer_dirs.iter().all(is_dir) {
            return Ok(None);
        }
        let image = StoredImage {
            reference: record.reference.clone(),
            manifest_digest: record.manifest_digest.clone(),
            layer_dirs,
            config: ImageConfig::from_oci(image_config.config().as_ref()),
            userxattr: self.opts.userxattr,
        };
        Ok(Some((image, record)))
    }

    /// Marks a reference as used now (its record's mtime), when the caller may.
    fn touch(&self, key: &str) {
        let now = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_NOW },
            last_modification: rustix::fs::Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_NOW },
        };
        let _ = rustix::fs::utimensat(rustix::fs::CWD, self.ref_path(key), &now, rustix::fs::AtFlags::SYMLINK_NOFOLLOW);
    }

    fn write_record(&self, record: &Record) -> Result<(), StoreError> {
        let path = self.ref_path(&record.reference);
        let text = serde_json::to_vec_pretty(record).map_err(|e| self.io(&path, e.into()))?;
        let mode = if record.access == Access::Public { FILE_MODE } else { PRIVATE_FILE_MODE };
        write_atomic_mode(&self.root, &path, &text, mode).map_err(|e| self.io(&path, e))
    }

    /// The `access/` entry of a layer dir or blob, named by its store path
    /// (`layers/sha256/<hex>` -> `access/layers-sha256-<hex>`).
    fn access_path(&self, rel: &str) -> PathBuf {
        debug_assert!(content_of_access(&rel.replace('/', "-")).as_deref() == Some(rel));
        self.root.join("access").join(rel.replace('/', "-"))
    }

    /// Who may reuse a layer dir or blob; `Unknown` when its entry is missing or not
    /// the store owner's alone.
    fn content_access(&self, rel: &str) -> Access {
        read_trusted(&self.access_path(rel)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    /// Whether this pull may use a layer dir or blob already in the store without
    /// downloading it. Callers without a job user (root itself, a user's own store)
    /// may, as with records.
    fn may_reuse(&self, rel: &str) -> bool {
        let Some(user) = &self.job_user else { return true };
        match self.content_access(rel) {
            Access::Public => true,
            Access::Users(uids) => uids.contains(&user.ids.uid),
            Access::Unknown => false,
        }
    }

    /// Records that the content at `rel` was downloaded and verified by a pull whose
    /// access is `added`. Called only after the content is published and its digests
    /// checked; serialized per entry so concurrent pulls lose no uid. A holder of the
    /// entry's lock that is stopped (another user's job may be) is not waited for: the
    /// update is then made unlocked and read back, again while another's write lost it.
    /// A uid lost all the same only costs its user a download (access fails closed).
    fn grant(&self, rel: &str, added: &Access) -> Result<(), StoreError> {
        let path = self.access_path(rel);
        let lock_path = self.root.join("locks").join(format!("access-{}.lock", rel.replace('/', "-")));
        let lock = lock::acquire_unless_stalled(&lock_path)?;
        for _ in 0..3 {
            let before = self.content_access(rel);
            let after = before.clone().with(added);
            if after == before {
                return Ok(());
            }
            let text = serde_json::to_vec(&after).map_err(|e| self.io(&path, e.into()))?;
            write_atomic_mode(&self.root, &path, &text, PRIVATE_FILE_MODE).map_err(|e| self.io(&path, e))?;
            if lock.is_some() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// A fresh directory under `tmp/` for work in progress (a layer's root: 0755 unless
    /// its tar says otherwise).
    fn tmp_dir(&self, what: &str) -> Result<PathBuf, StoreError> {
        let path = unique_tmp(&self.root, what);
        crate::fsmode::create_dir(&path, 0o755).map_err(|e| self.io(&path, e))?;
        Ok(path)
    }
}

/// The store path (`layers/sha256/<hex>`, `layers/chain/<hex>`, `blobs/sha256/<hex>`)
/// an `access/` entry's name stands for, if it names one.
fn content_of_access(name: &str) -> Option<String> {
    ["layers-sha256-", "layers-chain-", "blobs-sha256-"].iter().find_map(|prefix| {
        let hex = name.strip_prefix(prefix)?;
        let hex_ok = hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        hex_ok.then(|| format!("{}/{hex}", prefix.trim_end_matches('-').replacen('-', "/", 1)))
    })
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
    write_atomic_mode(root, path, bytes, FILE_MODE)
}

/// [`write_atomic`] with an explicit mode.
fn write_atomic_mode(root: &Path, path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    crate::fsmode::replace(&unique_tmp(root, "file"), path, bytes, mode)
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
        for (sub, _) in SUBDIRS {
            assert!(dir.join(sub).is_dir(), "{sub}");
        }
        assert!(store.images().unwrap().is_empty());
        let err = store.resolve("ubuntu", PullPolicy::Never, Progress::Silent).unwrap_err().to_string();
        assert_eq!(err, format!("docker.io/library/ubuntu:latest is not in the image store {}: pull it first with `berth pull docker.io/library/ubuntu:latest`", dir.display()));
        assert!(matches!(store.remove("ubuntu"), Err(StoreError::NotPulled { .. })));
        assert!(matches!(store.resolve("Bad Ref", PullPolicy::Missing, Progress::Silent), Err(StoreError::Reference(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A config blob with two layers (diff_ids `sha256:11..`, `sha256:22..`) and `Env`,
    /// written into the store; returns the record that names it and its layer dirs.
    fn stored_image(store: &Store, dir: &Path, env: &str) -> Record {
        let diff_ids = [format!("sha256:{}", "1".repeat(64)), format!("sha256:{}", "2".repeat(64))];
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["{env}"]}},"rootfs":{{"type":"layers","diff_ids":["{}","{}"]}}}}"#,
            diff_ids[0], diff_ids[1]
        );
        let config_digest = crate::registry::sha256_digest(config.as_bytes());
        write_atomic(dir, &store.blob_path(&config_digest), config.as_bytes()).unwrap();
        let chain = pull::chain_ids(&diff_ids);
        let layers = vec![format!("layers/sha256/{}", "1".repeat(64)), format!("layers/chain/{}", chain[1].trim_start_matches("sha256:"))];
        for l in &layers {
            std::fs::create_dir_all(dir.join(l)).unwrap();
        }
        Record {
            reference: "docker.io/library/x:latest".into(),
            manifest_digest: format!("sha256:{}", "0".repeat(64)),
            config_digest,
            layers,
            size: 42,
            config: ImageConfig { env: vec![env.into()], ..ImageConfig::default() },
            access: Access::Public,
        }
    }

    #[test]
    fn records_round_trip_and_missing_layers_mean_not_pulled() {
        let (store, dir) = store_in("records");
        let record = stored_image(&store, &dir, "A=1");
        store.write_record(&record).unwrap();
        let image = store.resolve("x", PullPolicy::Never, Progress::Silent).unwrap();
        assert_eq!(image.layer_dirs, record.layers.iter().map(|l| dir.join(l)).collect::<Vec<_>>());
        assert_eq!(image.config.env, vec!["A=1"]);
        assert_eq!(store.images().unwrap()[0].size, 42);
        std::fs::remove_dir(dir.join(&record.layers[1])).unwrap();
        assert!(matches!(store.resolve("x", PullPolicy::Never, Progress::Silent), Err(StoreError::NotPulled { .. })));
        store.remove("x").unwrap();
        assert!(store.images().unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_record_is_used_only_as_the_store_owner_wrote_it_and_as_its_config_says() {
        use std::os::unix::fs::PermissionsExt;
        let (store, dir) = store_in("tampered");
        let good = stored_image(&store, &dir, "A=1");
        let outside = dir.join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        let path = store.ref_path(&good.reference);
        let with = |f: &dyn Fn(&mut Record)| {
            let mut r = good.clone();
            f(&mut r);
            r
        };
        let sha_other = format!("sha256:{}", "3".repeat(64));
        let bad: Vec<(&str, Record)> = vec![
            ("an absolute layer path", with(&|r| r.layers[0] = outside.display().to_string())),
            ("a layer path with ..", with(&|r| r.layers[0] = format!("layers/sha256/../../{}", outside.file_name().unwrap().to_string_lossy()))),
            ("another image's layer", with(&|r| r.layers[0] = format!("layers/sha256/{}", "3".repeat(64)))),
            ("layers swapped", with(&|r| r.layers.reverse())),
            ("a config that is not stored", with(&|r| r.config_digest = sha_other.clone())),
            ("a digest that is not one", with(&|r| r.config_digest = "sha256:../../refs/x".into())),
            ("another reference", with(&|r| r.reference = "docker.io/library/y:latest".into())),
        ];
        std::fs::create_dir_all(dir.join(format!("layers/sha256/{}", "3".repeat(64)))).unwrap();
        for (case, record) in bad {
            let text = serde_json::to_vec_pretty(&record).unwrap();
            write_atomic(&dir, &path, &text).unwrap();
            assert!(matches!(store.resolve("x", PullPolicy::Never, Progress::Silent), Err(StoreError::NotPulled { .. })), "{case}");
        }
        // The record's own copy of the config is not what containers get.
        store.write_record(&with(&|r| r.config.env = vec!["EVIL=1".into()])).unwrap();
        assert_eq!(store.resolve("x", PullPolicy::Never, Progress::Silent).unwrap().config.env, vec!["A=1"]);
        // Writable by others, or not the owner's: as if absent.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(matches!(store.resolve("x", PullPolicy::Never, Progress::Silent), Err(StoreError::NotPulled { .. })));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            assert!(matches!(store.resolve("x", PullPolicy::Never, Progress::Silent), Err(StoreError::NotPulled { .. })));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_store_opened_under_any_umask_has_exact_modes_and_private_locks() {
        use std::os::unix::fs::MetadataExt;
        let (store, dir) = store_in("modes");
        // An earlier berth with the caller's umask 0 left these.
        for sub in ["refs", "layers"] {
            std::fs::set_permissions(dir.join(sub), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        }
        drop(store);
        let store = Store::open(&Config { store_dir: dir.clone(), ..Config::default() }).unwrap();
        let mode = |p: &str| std::fs::symlink_metadata(dir.join(p)).unwrap().mode() & 0o7777;
        for (sub, want) in SUBDIRS {
            assert_eq!(mode(sub), want, "{sub}");
        }
        let record = stored_image(&store, &dir, "A=1");
        store.write_record(&record).unwrap();
        store.resolve("x", PullPolicy::Never, Progress::Silent).unwrap();
        assert_eq!((mode("lock"), mode("overlay-xattrs")), (0o600, 0o644));
        let rel = store.ref_path(&record.reference).strip_prefix(&dir).unwrap().to_path_buf();
        assert_eq!(mode(rel.to_str().unwrap()), 0o644);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_private_record_is_the_owners_alone_and_access_entries_name_only_store_content() {
        use std::os::unix::fs::MetadataExt;
        let (store, dir) = store_in("private");
        let mut record = stored_image(&store, &dir, "SECRET=1");
        record.access = Access::Users(vec![1001]);
        store.write_record(&record).unwrap();
        let mode = || std::fs::metadata(store.ref_path(&record.reference)).unwrap().mode() & 0o7777;
        assert_eq!(mode(), 0o600);
        record.access = Access::Public;
        store.write_record(&record).unwrap();
        assert_eq!(mode(), 0o644);

        let hex = "a".repeat(64);
        for rel in [format!("layers/sha256/{hex}"), format!("layers/chain/{hex}"), format!("blobs/sha256/{hex}")] {
            let name = store.access_path(&rel).file_name().unwrap().to_string_lossy().into_owned();
            assert_eq!(content_of_access(&name), Some(rel));
        }
        for name in ["layers-sha256-../../x", "refs-sha256-aa", &format!("layers-sha256-{}", "A".repeat(64))] {
            assert_eq!(content_of_access(name), None, "{name}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn access_grows_by_verified_downloads_and_public_stays_public() {
        let users = |u: &[u32]| Access::Users(u.to_vec());
        assert_eq!(Access::Unknown.with(&users(&[1])), users(&[1]));
        assert_eq!(users(&[1]).with(&users(&[2])), users(&[1, 2]));
        assert_eq!(users(&[1]).with(&users(&[1])), users(&[1]));
        assert_eq!(users(&[1]).with(&Access::Public), Access::Public);
        assert_eq!(Access::Public.with(&users(&[2])), Access::Public);
        assert_eq!(users(&[1]).with(&Access::Unknown), users(&[1]));
    }

    #[test]
    fn granted_content_is_recorded_with_a_private_mode_and_gc_drops_entries_of_what_is_gone() {
        use std::os::unix::fs::MetadataExt;
        let (store, dir) = store_in("grant");
        let rel = format!("layers/sha256/{}", "b".repeat(64));
        std::fs::create_dir_all(dir.join(&rel)).unwrap();
        assert_eq!(store.content_access(&rel), Access::Unknown, "no entry: not public");
        store.grant(&rel, &Access::Users(vec![1001])).unwrap();
        store.grant(&rel, &Access::Users(vec![1002])).unwrap();
        assert_eq!(store.content_access(&rel), Access::Users(vec![1001, 1002]));
        assert_eq!(std::fs::metadata(store.access_path(&rel)).unwrap().mode() & 0o7777, 0o600);
        assert!(store.verify().unwrap().problems.is_empty());
        // A crash between publishing content and its entry leaves a store verify accepts.
        std::fs::remove_file(store.access_path(&rel)).unwrap();
        assert!(store.verify().unwrap().problems.is_empty());
        assert_eq!(store.content_access(&rel), Access::Unknown);
        store.grant(&rel, &Access::Users(vec![1001])).unwrap();
        // Unreferenced, the layer goes at gc, and its entry with it.
        store.gc().unwrap();
        assert!(!dir.join(&rel).exists() && !store.access_path(&rel).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pull_policy_parses() {
        assert_eq!("never".parse::<PullPolicy>().unwrap(), PullPolicy::Never);
        assert!("sometimes".parse::<PullPolicy>().is_err());
    }
}
