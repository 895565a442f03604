//! Pulling one image into the store: manifest (and platform choice), config, then
//! every missing layer on its own thread, downloaded, hashed and decompressed while
//! streaming into a fresh `tmp/` dir, verified (blob digest, size and the config's
//! diff_id), and only then renamed into `layers/`. Owns the pull pipeline; never
//! publishes anything unverified, and never reuses a layer or config another user
//! pulled with a login unless this user downloaded its bytes too (`Store::may_reuse`).

use super::progress::{LayerBar, Reporter};
use super::{Access, Progress, Record, Store, StoreError, StoredImage};
use crate::lock;
use crate::reference::{is_sha256_digest, Reference};
use crate::registry::auth::Credentials;
use crate::registry::manifest::{self, Compression, Fetched, Platform};
use crate::registry::{Client, RegistryError};
use crate::unpack::{self, UnpackError};
use oci_spec::image::{Descriptor, ImageConfiguration, ImageManifest};
use sha2::{Digest as _, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Attempts per layer when the download itself fails (not when content is wrong).
const LAYER_ATTEMPTS: u32 = 3;

pub(super) fn pull(store: &Store, r: &Reference, platform: &Platform, progress: Progress) -> Result<StoredImage, StoreError> {
    let key = r.to_string();
    let reg = |source| StoreError::Registry { reference: key.clone(), source };
    let credentials = match &store.job_user {
        Some(user) => Credentials::load_for(user.clone(), &store.config),
        None => Credentials::load(&store.config),
    }
    .map_err(|e| reg(e.into()))?;
    let client = Client::new(&store.config, r, &credentials).map_err(reg)?;
    let (manifest_digest, manifest_bytes, manifest) = fetch_manifest(&client, r, platform, &key)?;
    let access = access(store, r, &credentials, &manifest_digest);
    let bad = |why: String| StoreError::BadImage { reference: key.clone(), why };

    let config_digest = manifest.config().digest().to_string();
    if !is_sha256_digest(&config_digest) {
        return Err(bad(format!("config digest {config_digest} is not a sha256 digest")));
    }
    if manifest.config().size() > crate::registry::MAX_CONFIG {
        return Err(bad(format!("the image config of {} bytes is larger than berth's cap of 8 MiB", manifest.config().size())));
    }
    let config_path = store.blob_path(&config_digest);
    let config_rel = format!("blobs/sha256/{}", config_digest.trim_start_matches("sha256:"));
    // Another image's config (its Env, its diff_ids) only for users who may reuse it.
    let stored = || {
        std::fs::read(&config_path).ok().filter(|b| crate::registry::sha256_digest(b) == config_digest).filter(|_| store.may_reuse(&config_rel))
    };
    let config_bytes = match stored() {
        Some(b) => b,
        None => {
            // Under the blob's lock, so that concurrent pulls of one image fetch it once;
            // but never waiting for a holder that is stopped or stalled (another user's
            // job may be): the write is atomic, a concurrent identical one harmless.
            let lock_path = store.root.join("locks").join(format!("{}.lock", config_digest.trim_start_matches("sha256:")));
            let _lock = lock::acquire_unless_stalled(&lock_path)?;
            match stored() {
                Some(b) => b,
                None => {
                    // small_blob checks the bytes against the digest: they prove possession.
                    let b = client.small_blob(&config_digest).map_err(|e| mismatch_or(e, &key, "image config"))?;
                    super::write_atomic(&store.root, &config_path, &b).map_err(|e| io_err(store, &key, &config_path, e))?;
                    store.grant(&config_rel, &access)?;
                    b
                }
            }
        }
    };
    let manifest_path = store.blob_path(&manifest_digest);
    super::write_atomic(&store.root, &manifest_path, &manifest_bytes).map_err(|e| io_err(store, &key, &manifest_path, e))?;
    let image_config = ImageConfiguration::from_reader(&config_bytes[..]).map_err(|e| bad(format!("the image config is not valid: {e}")))?;
    let diff_ids = image_config.rootfs().diff_ids().clone();
    let layers = manifest.layers().clone();
    if diff_ids.len() != layers.len() {
        return Err(bad(format!("the manifest has {} layers but the config lists {} diff_ids", layers.len(), diff_ids.len())));
    }
    for (d, l) in diff_ids.iter().zip(&layers) {
        if !is_sha256_digest(d) || !is_sha256_digest(l.digest().as_ref()) {
            return Err(bad(format!("layer digests must be sha256 (got {d} and {})", l.digest())));
        }
        manifest::layer_compression(l.media_type().as_ref()).map_err(|e| bad(e.to_string()))?;
    }
    let chain_ids = chain_ids(&diff_ids);

    let reporter = Reporter::new(progress, &key);
    // Layers this user may take as they are; any other is downloaded (and, when already
    // published, only checked against its digests: possession, not a second copy).
    let present: Vec<Option<String>> =
        diff_ids.iter().zip(&chain_ids).map(|(d, c)| published(store, d, c).filter(|rel| store.may_reuse(rel))).collect();
    // Sizes are the manifest's word: added without overflow.
    let missing_bytes = layers.iter().zip(&present).filter(|(_, p)| p.is_none()).fold(0u64, |sum, (l, _)| sum.saturating_add(l.size()));
    reporter.start(present.iter().filter(|p| p.is_none()).count(), layers.len(), missing_bytes);
    // What this pull may unpack: layers already in the store were counted when they came.
    let budget = unpack::Budget::new(store.config.max_image_bytes(), &store.config.max_image_size, store.config.max_image_files);

    let outcomes: Vec<Result<Outcome, StoreError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = layers
            .iter()
            .zip(diff_ids.iter().zip(&chain_ids))
            .zip(&present)
            .map(|((layer, (diff_id, chain_id)), present)| {
                let (client, reporter, key, budget, access) = (&client, &reporter, &key, &budget, &access);
                scope.spawn(move || match present {
                    Some(rel) => Ok(Outcome::Published(rel.clone())),
                    None => fetch_layer(store, client, reporter, key, budget, access, layer, diff_id, chain_id),
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(StoreError::BadImage { reference: key.clone(), why: "a layer thread panicked".into() })))
            .collect()
    });

    let mut rels: Vec<String> = Vec::new();
    let mut first_error = None;
    let mut pending: Vec<Pending> = Vec::new();
    for (i, outcome) in outcomes.into_iter().enumerate() {
        match outcome {
            Ok(Outcome::Published(rel)) => rels.push(rel),
            Ok(Outcome::NeedsLowers { tmp, links }) => {
                pending.push((i, tmp, links));
                rels.push(String::new());
            }
            Err(e) => {
                first_error.get_or_insert(e);
                rels.push(String::new());
            }
        }
    }
    if let Some(e) = first_error {
        for (_, tmp, _) in pending {
            let _ = super::gc::remove_tree(&tmp);
        }
        return Err(e);
    }
    // Layers with hard links into lower layers, lowest first, now that their lowers are final.
    for (i, tmp, links) in pending {
        let hex = chain_ids[i].trim_start_matches("sha256:");
        let rel = format!("layers/chain/{hex}");
        let dest = store.root.join(&rel);
        // Only saves linking twice: a stalled holder is not waited for (publish_dir
        // tolerates a concurrent identical publish).
        let _l = lock::acquire_unless_stalled(&store.root.join("locks").join(format!("chain-{hex}.lock")))?;
        if dest.is_dir() {
            // Published meanwhile by another pull; ours was downloaded and verified too.
            let _ = super::gc::remove_tree(&tmp);
        } else {
            let lowers: Vec<PathBuf> = rels[..i].iter().map(|r| store.root.join(r)).collect();
            let linked = unpack::link_from_lowers(&tmp, &lowers, &links, &store.opts);
            if let Err(source) = linked {
                let _ = super::gc::remove_tree(&tmp);
                return Err(unpack_err(store, &key, layers[i].digest().as_ref(), source));
            }
            publish_dir(&tmp, &dest).map_err(|e| io_err(store, &key, &dest, e))?;
        }
        store.grant(&rel, &access)?;
        rels[i] = rel;
    }

    let config = crate::image::ImageConfig::from_oci(image_config.config().as_ref());
    let record = Record {
        reference: key.clone(),
        manifest_digest: manifest_digest.clone(),
        config_digest,
        layers: rels.clone(),
        size: layers.iter().fold(0u64, |sum, l| sum.saturating_add(l.size())),
        config: config.clone(),
        access,
    };
    store.write_record(&record)?;
    reporter.finish(&manifest_digest);
    Ok(StoredImage {
        reference: key,
        manifest_digest,
        layer_dirs: rels.iter().map(|r| store.root.join(r)).collect(),
        config,
        userxattr: store.opts.userxattr,
    })
}

/// The parts of a (verified) image config a container needs.
/// Who may reuse what this pull stores: everyone when no login was at hand (the pull
/// itself was anonymous) or when the registry also serves the manifest anonymously;
/// else the puller alone, until others show their access (`Store::check_access`).
fn access(store: &Store, r: &Reference, credentials: &Credentials, manifest_digest: &str) -> Access {
    let puller = store.job_user.as_ref().map_or_else(|| rustix::process::geteuid().as_raw(), |u| u.ids.uid);
    let private = || Access::Users(vec![puller]);
    match credentials.lookup(&r.registry) {
        Ok(None) => return Access::Public,
        Ok(Some(_)) => {}
        Err(_) => return private(),
    }
    let anonymous = Credentials::none();
    match Client::new(&store.config, r, &anonymous).and_then(|c| c.manifest(manifest_digest)) {
        Ok(_) => Access::Public,
        Err(_) => private(),
    }
}

/// A layer waiting for its lowers: index, tmp dir, hard links (link, target) into lowers.
type Pending = (usize, PathBuf, Vec<(String, String)>);

enum Outcome {
    /// The layer dir, relative to the store root.
    Published(String),
    /// Unpacked into `tmp` but has hard links into lower layers.
    NeedsLowers { tmp: PathBuf, links: Vec<(String, String)> },
}

/// Where a layer already is in the store, if it is.
fn published(store: &Store, diff_id: &str, chain_id: &str) -> Option<String> {
    let by_diff = format!("layers/sha256/{}", diff_id.trim_start_matches("sha256:"));
    let by_chain = format!("layers/chain/{}", chain_id.trim_start_matches("sha256:"));
    [by_diff, by_chain].into_iter().find(|rel| store.root.join(rel).is_dir())
}

/// OCI chain ids: `chain[0] = diff[0]`, `chain[i] = sha256(chain[i-1] + " " + diff[i])`.
pub(super) fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => format!("sha256:{:x}", Sha256::digest(format!("{prev} {d}").as_bytes())),
        };
        out.push(next);
    }
    out
}

fn fetch_manifest(client: &Client, r: &Reference, platform: &Platform, key: &str) -> Result<(String, Vec<u8>, ImageManifest), StoreError> {
    let man = |source| StoreError::Manifest { reference: key.to_string(), source };
    let doc = client.manifest(r.manifest_ref()).map_err(|e| mismatch_or(e, key, "manifest"))?;
    match manifest::parse(&doc.media_type, &doc.bytes).map_err(man)? {
        Fetched::Image(m) => Ok((doc.digest, doc.bytes, *m)),
        Fetched::Index(index) => {
            let chosen = manifest::select_platform(&index, platform).map_err(man)?;
            let digest = chosen.digest().to_string();
            if chosen.size() > crate::registry::MAX_MANIFEST {
                return Err(StoreError::BadImage { reference: key.into(), why: format!("the platform manifest of {} bytes is larger than berth's cap of 4 MiB", chosen.size()) });
            }
            if !is_sha256_digest(&digest) {
                return Err(StoreError::BadImage { reference: key.into(), why: format!("index entry {digest} is not a sha256 digest") });
            }
            let doc = client.manifest(&digest).map_err(|e| mismatch_or(e, key, "platform manifest"))?;
            match manifest::parse(&doc.media_type, &doc.bytes).map_err(man)? {
                Fetched::Image(m) => Ok((doc.digest, doc.bytes, *m)),
                Fetched::Index(_) => Err(StoreError::BadImage { reference: key.into(), why: "the index points to another index".into() }),
            }
        }
    }
}

fn mismatch_or(e: RegistryError, key: &str, what: &str) -> StoreError {
    match e {
        RegistryError::NotFound { what: blob, .. } if blob.starts_with("blob ") => missing_blob(key, what),
        RegistryError::DigestMismatch { expected, actual, .. } => {
            StoreError::DigestMismatch { reference: key.into(), what: what.into(), expected, actual }
        }
        source => StoreError::Registry { reference: key.into(), source },
    }
}

/// A blob the manifest names but the registry lacks: the image, not the name, is broken.
fn missing_blob(key: &str, what: &str) -> StoreError {
    StoreError::BadImage {
        reference: key.into(),
        why: format!("the registry does not have the {what} its manifest names (the image is incomplete there: push it again)"),
    }
}

fn io_err(store: &Store, key: &str, path: &Path, e: std::io::Error) -> StoreError {
    if unpack::is_no_space(&e) {
        return StoreError::NoSpace { reference: key.into(), store: store.root.clone(), detail: format!("writing {}", path.display()) };
    }
    StoreError::Io { path: path.to_path_buf(), source: e }
}

fn unpack_err(store: &Store, key: &str, layer: &str, source: UnpackError) -> StoreError {
    if source.is_no_space() {
        return StoreError::NoSpace { reference: key.into(), store: store.root.clone(), detail: format!("unpacking layer {}", super::short(layer)) };
    }
    StoreError::Unpack { reference: key.into(), layer: super::short(layer).to_string(), source }
}

/// Renames a verified layer dir from `tmp/` into place. When a concurrent pull
/// published the same layer first (its dir is there and not empty), ours is an
/// identical, verified copy: it is dropped and theirs kept.
fn publish_dir(tmp: &Path, dest: &Path) -> std::io::Result<()> {
    match std::fs::rename(tmp, dest) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) && dest.is_dir() => {
            let _ = super::gc::remove_tree(tmp);
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Fetches one layer unless another process published it while we waited for its lock.
/// The lock only saves downloading a layer twice: a holder that stops or slows (another
/// user's job can) is waited for only while it shows progress, then we fetch on our own.
#[allow(clippy::too_many_arguments)]
fn fetch_layer(
    store: &Store,
    client: &Client,
    reporter: &Reporter,
    key: &str,
    budget: &unpack::Budget,
    access: &Access,
    layer: &Descriptor,
    diff_id: &str,
    chain_id: &str,
) -> Result<Outcome, StoreError> {
    let hex = diff_id.trim_start_matches("sha256:");
    let lock_path = store.root.join("locks").join(format!("{hex}.lock"));
    let lock = lock::acquire_unless_stalled(&lock_path)?;
    let already = published(store, diff_id, chain_id);
    if let Some(rel) = already.clone().filter(|rel| store.may_reuse(rel)) {
        return Ok(Outcome::Published(rel));
    }
    let digest = layer.digest().to_string();
    let bar = reporter.layer(&digest, layer.size());
    let mut attempt = 0;
    loop {
        attempt += 1;
        // Published but not yet this user's: the bytes are checked, not unpacked again.
        let into = match &already {
            Some(_) => LayerTarget::Nowhere,
            None => LayerTarget::Dir(store.tmp_dir("layer")?),
        };
        match download_and_unpack(store, client, key, budget, layer, diff_id, &into, &bar, lock.as_ref()) {
            Ok(_) if already.is_some() => {
                let rel = already.clone().unwrap_or_default();
                store.grant(&rel, access)?;
                bar.done("done");
                return Ok(Outcome::Published(rel));
            }
            Ok(links) if links.is_empty() => {
                let rel = format!("layers/sha256/{hex}");
                let dest = store.root.join(&rel);
                publish_dir(into.tmp(), &dest).map_err(|e| io_err(store, key, &dest, e))?;
                store.grant(&rel, access)?;
                bar.done("done");
                return Ok(Outcome::Published(rel));
            }
            Ok(links) => {
                bar.done("done");
                return Ok(Outcome::NeedsLowers { tmp: into.tmp().to_path_buf(), links });
            }
            Err(e) => {
                if let LayerTarget::Dir(tmp) = &into {
                    let _ = super::gc::remove_tree(tmp);
                }
                let retry = matches!(e, StoreError::Truncated { .. }) && attempt < LAYER_ATTEMPTS;
                if !retry {
                    bar.done("failed");
                    return Err(e);
                }
                bar.restart();
                std::thread::sleep(std::time::Duration::from_millis(500 * u64::from(attempt)));
            }
        }
    }
}

/// Counts and hashes what passes through; refuses to read past `limit` bytes.
struct Hashing<'a, R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    limit: u64,
    bar: Option<&'a LayerBar>,
    /// The transport error that ended the stream, if one did.
    failed: Option<String>,
    /// The stream went on past `limit`.
    overlong: bool,
    /// The download's deadline and the lock its progress is shown on, if any.
    pace: Option<Pace<'a>>,
    /// The deadline passed.
    too_slow: bool,
}

/// A layer download's bound on its total time (against a registry that trickles, each
/// read just under the per-read timeout), and the layer lock whose waiters it shows
/// progress.
struct Pace<'a> {
    deadline: std::time::Instant,
    lock: Option<&'a lock::Lock>,
    unshown: u64,
}

/// Bytes a download shows progress on its lock for (at least one a [`lock::STALLED_AFTER`],
/// i.e. some 13 KiB/s, keeps waiters waiting).
const PROGRESS_BYTES: u64 = 64 << 10;
/// What every layer download may take on top of its size at `min_pull_rate`.
const PULL_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

impl Pace<'_> {
    /// The time a download of `size` bytes may take at `min_rate` bytes a second.
    fn allowed(size: u64, min_rate: u64) -> std::time::Duration {
        PULL_GRACE + std::time::Duration::from_secs(size / min_rate.max(1))
    }
}

impl<'a, R: Read> Hashing<'a, R> {
    fn new(inner: R, limit: u64, bar: Option<&'a LayerBar>) -> Self {
        Hashing { inner, hasher: Sha256::new(), count: 0, limit, bar, failed: None, overlong: false, pace: None, too_slow: false }
    }

    fn paced(mut self, pace: Pace<'a>) -> Self {
        self.pace = Some(pace);
        self
    }

    fn digest(self) -> (String, u64) {
        (format!("sha256:{:x}", self.hasher.finalize()), self.count)
    }
}

impl<R: Read> Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.count >= self.limit {
            // Read one byte more than allowed to tell "exactly limit" from "too long".
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => {
                    self.overlong = true;
                    Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "the blob is longer than its descriptor says"))
                }
            };
        }
        let max = buf.len().min((self.limit - self.count).min(usize::MAX as u64) as usize);
        let n = match self.inner.read(&mut buf[..max]) {
            Ok(n) => n,
            Err(e) => {
                self.failed = Some(e.to_string());
                return Err(e);
            }
        };
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        if let Some(b) = self.bar {
            b.inc(n as u64);
        }
        if let Some(pace) = &mut self.pace {
            pace.unshown += n as u64;
            if pace.unshown >= PROGRESS_BYTES {
                pace.unshown = 0;
                if let Some(l) = pace.lock {
                    l.touch();
                }
            }
            if n > 0 && std::time::Instant::now() > pace.deadline {
                self.too_slow = true;
                return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the download is slower than min_pull_rate"));
            }
        }
        Ok(n)
    }
}

/// Where a downloaded layer goes.
enum LayerTarget {
    /// Unpacked into this fresh `tmp/` dir.
    Dir(PathBuf),
    /// Only hashed: the layer is published already, the download proves possession.
    Nowhere,
}

impl LayerTarget {
    fn tmp(&self) -> &Path {
        match self {
            LayerTarget::Dir(p) => p,
            LayerTarget::Nowhere => Path::new(""),
        }
    }
}

/// Streams one blob through hash, decompression, diff hash and the unpacker (or, for
/// `LayerTarget::Nowhere`, only the hashes). Returns the hard links that point into lower layers.
#[allow(clippy::too_many_arguments)]
fn download_and_unpack(
    store: &Store,
    client: &Client,
    key: &str,
    budget: &unpack::Budget,
    layer: &Descriptor,
    diff_id: &str,
    into: &LayerTarget,
    bar: &LayerBar,
    lock: Option<&lock::Lock>,
) -> Result<Vec<(String, String)>, StoreError> {
    let min_rate = store.config.min_pull_rate_bytes();
    let allowed = Pace::allowed(layer.size(), min_rate);
    let started = std::time::Instant::now();
    let digest = layer.digest().to_string();
    let compression = manifest::layer_compression(layer.media_type().as_ref())
        .map_err(|e| StoreError::BadImage { reference: key.into(), why: e.to_string() })?;
    let response = client.blob(&digest).map_err(|source| match source {
        RegistryError::Unreachable { why, .. } => {
            StoreError::Truncated { reference: key.into(), layer: super::short(&digest).into(), got: 0, expected: layer.size(), why }
        }
        RegistryError::NotFound { .. } => missing_blob(key, &format!("layer {}", super::short(&digest))),
        source => StoreError::Registry { reference: key.into(), source },
    })?;
    bar.phase("pulling");
    let pace = Pace { deadline: started + allowed, lock, unshown: 0 };
    let mut blob = Hashing::new(response.into_reader(), layer.size(), Some(bar)).paced(pace);
    let result = {
        let decoded: Box<dyn Read + '_> = match compression {
            Compression::None => Box::new(&mut blob),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(&mut blob)),
            Compression::Zstd => Box::new(
                zstd::stream::read::Decoder::new(&mut blob).map_err(|e| StoreError::BadImage { reference: key.into(), why: e.to_string() })?,
            ),
        };
        // Only hashed, the stream is still capped: a small blob may decompress without end.
        let cap = match into {
            LayerTarget::Dir(_) => u64::MAX,
            LayerTarget::Nowhere => store.config.max_image_bytes(),
        };
        let mut diff = Hashing::new(decoded, cap, None);
        let unpacked = match into {
            LayerTarget::Dir(tmp) => unpack::unpack_within(&mut diff, tmp, &store.opts, budget).map(|u| u.external_links),
            LayerTarget::Nowhere => Ok(Vec::new()),
        };
        // The tar end marker may leave padding unread; the diff_id covers it too.
        let drained = unpacked.is_ok() && std::io::copy(&mut diff, &mut std::io::sink()).is_ok();
        (unpacked, drained, diff.digest())
    };
    let (unpacked, drained, (diff_digest, _)) = result;
    // Past the deadline, the rest is not waited for; the drain itself may pass it too.
    let rest = if blob.too_slow { Ok(0) } else { std::io::copy(&mut blob, &mut std::io::sink()) };
    if blob.too_slow {
        return Err(StoreError::TooSlow {
            reference: key.into(),
            registry: client.registry().to_string(),
            layer: super::short(&digest).into(),
            got: blob.count,
            expected: layer.size(),
            secs: started.elapsed().as_secs(),
            rate: store.config.min_pull_rate.clone(),
        });
    }
    let transport_failed = blob.failed.clone();
    let overlong = blob.overlong;
    let (blob_digest, got) = blob.digest();
    let short = super::short(&digest).to_string();
    if overlong {
        // Whatever the first bytes were, this is not the blob the manifest describes.
        return Err(StoreError::BadImage {
            reference: key.into(),
            why: format!("layer {short} is longer than the manifest says ({} bytes): the registry sent another blob or garbage", layer.size()),
        });
    }
    if let Some(why) = transport_failed.or_else(|| rest.err().map(|e| e.to_string())).or_else(|| (got < layer.size()).then(|| "the stream ended early".to_string())) {
        if got < layer.size() {
            return Err(StoreError::Truncated { reference: key.into(), layer: short, got, expected: layer.size(), why });
        }
    }
    let links = match unpacked {
        Ok(links) => links,
        Err(e) if blob_digest != digest && !e.is_no_space() && !e.is_refused() => {
            return Err(StoreError::DigestMismatch { reference: key.into(), what: format!("layer {short}"), expected: digest, actual: blob_digest })
        }
        Err(e) => return Err(unpack_err(store, key, &digest, e)),
    };
    if blob_digest != digest {
        return Err(StoreError::DigestMismatch { reference: key.into(), what: format!("layer {short}"), expected: digest, actual: blob_digest });
    }
    if !drained || diff_digest != diff_id {
        return Err(StoreError::DigestMismatch {
            reference: key.into(),
            what: format!("uncompressed layer {short} (the config's diff_id)"),
            expected: diff_id.into(),
            actual: diff_digest,
        });
    }
    Ok(links)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let d = ["sha256:aa".to_string(), "sha256:bb".to_string()];
        let c = chain_ids(&d);
        assert_eq!(c[0], "sha256:aa");
        assert_eq!(c[1], format!("sha256:{:x}", Sha256::digest(b"sha256:aa sha256:bb")));
    }

    #[test]
    fn hashing_reader_refuses_blobs_longer_than_declared() {
        let data = vec![7u8; 100];
        let mut r = Hashing::new(&data[..], 99, None);
        let mut out = Vec::new();
        assert!(r.read_to_end(&mut out).is_err());
        let mut r = Hashing::new(&data[..], 100, None);
        r.read_to_end(&mut out).unwrap();
        let (digest, count) = r.digest();
        assert_eq!((digest, count), (format!("sha256:{:x}", Sha256::digest(&data)), 100));
    }
}
