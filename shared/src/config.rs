//! The admin's settings for berth on a node: one TOML file (default
//! `/etc/berth/berth.toml`, or `$BERTH_CONFIG`) read by the `berth` command, the
//! Torque hooks and, as `key=value` arguments in `plugstack.conf`, the Slurm plugin
//! (which hands them to `berth` on a pipe, `--config-stdin`).
//! As root, settings come only from a root-owned file nobody else can write (the file
//! and every directory above it, see `privileged`): `$BERTH_CONFIG` and `$BERTH_STORE`
//! name such a place or are refused, since a job user may have set them.
//! Owns parsing and defaults; never touches the file system beyond reading the file.

use serde::Deserialize;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the admin config is read from when `$BERTH_CONFIG` is not set.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/berth/berth.toml";

/// The variable naming another config file.
pub const CONFIG_VAR: &str = "BERTH_CONFIG";

/// The variable naming another image store.
pub const STORE_VAR: &str = "BERTH_STORE";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read berth config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("berth config {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("unknown berth setting '{key}': known settings are {known}")]
    UnknownKey { key: String, known: String },
    #[error("berth setting '{key}' has a bad value '{value}': {why}")]
    BadValue { key: String, value: String, why: String },
    #[error("{var}={} is refused as root: {why}; as root berth takes settings only from root-owned places nobody else can write: unset {var} or name such a place", path.display())]
    UntrustedVar { var: &'static str, path: PathBuf, why: crate::privileged::Refused },
    #[error("berth config {} is refused as root: {why}; make it and every directory above it root's and writable by root alone", path.display())]
    UntrustedFile { path: PathBuf, why: crate::privileged::Refused },
    #[error("cannot read the berth config from stdin: {0}")]
    Stdin(std::io::Error),
}

/// How a site directory is bound into every container.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[derive(Serialize)]
#[serde(deny_unknown_fields)]
pub struct SiteMount {
    pub source: PathBuf,
    pub target: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

/// Every setting an admin can make. Field names are the TOML keys and the
/// `plugstack.conf` keys alike.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[derive(Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The node's image store (blobs, unpacked layers, the ref index).
    pub store_dir: PathBuf,
    /// Per-job state: `<runtime_dir>/<job>/...`.
    pub runtime_dir: PathBuf,
    /// The `berth` binary that the scheduler adapters run as root.
    pub berth_binary: PathBuf,
    /// Directories bound into every container.
    pub site_mounts: Vec<SiteMount>,
    /// Bind the job user's home directory into containers unless the user opts out.
    pub mount_home: bool,
    /// Registry host for references that name none (Docker's default).
    pub default_registry: String,
    /// When not empty, only these registries may be pulled from.
    pub allowed_registries: Vec<String>,
    /// Registries spoken to over plain HTTP (localhost always is).
    pub insecure_registries: Vec<String>,
    /// Whether users may ask for a container per rank.
    pub allow_per_rank: bool,
    /// Honour the image's `USER` (and let users ask for root) by running tasks as that
    /// user inside a user namespace that maps it to the job user. Off: the image's
    /// `USER` is ignored and tasks run as the job user.
    pub remap_user: bool,
    /// Root-owned file of registry credentials in Docker's config.json form.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    /// error, warn, info, debug.
    pub log_level: String,
    /// Root-only file, identical on every node, that keys the per-job secrets of MPI
    /// wiring (ssh keys, port); the munge key by default.
    pub wiring_secret_file: PathBuf,
    /// The ports jobs' in-container sshds listen on, `LO-HI`.
    pub wiring_ports: String,
    /// The most bytes one pull may unpack into the store (`64G`; suffixes K, M, G, T).
    pub max_image_size: String,
    /// The most files (and dirs, links, ...) one pull may unpack into the store.
    pub max_image_files: u64,
    /// The slowest a layer download may be on average, in bytes a second (`100K`;
    /// suffixes K, M, G): a layer of N bytes gets 30 s plus N / this rate in all.
    pub min_pull_rate: String,
    /// Seconds a job user's credential helper may take to answer before it is killed
    /// with its process group.
    pub credential_helper_timeout: u64,
    /// Seconds root waits for one of its children that became the job user (reading
    /// their Docker config, running their helpers, opening their mount sources) before
    /// it kills it: the user may stop it or hang it on a FIFO or FUSE mount of theirs.
    /// Bounds the helpers that child runs too, whatever `credential_helper_timeout` says.
    pub user_child_timeout: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            store_dir: PathBuf::from("/var/lib/berth"),
            runtime_dir: PathBuf::from("/run/berth"),
            berth_binary: PathBuf::from("/usr/bin/berth"),
            site_mounts: Vec::new(),
            mount_home: true,
            default_registry: "registry-1.docker.io".to_string(),
            allowed_registries: Vec::new(),
            insecure_registries: Vec::new(),
            allow_per_rank: true,
            remap_user: false,
            credentials_file: None,
            log_level: "info".to_string(),
            wiring_secret_file: PathBuf::from("/etc/munge/munge.key"),
            wiring_ports: "20000-29999".to_string(),
            max_image_size: "64G".to_string(),
            max_image_files: 2_000_000,
            min_pull_rate: "100K".to_string(),
            credential_helper_timeout: 30,
            user_child_timeout: 60,
        }
    }
}

const KNOWN_KEYS: &[&str] = &[
    "store_dir",
    "runtime_dir",
    "berth_binary",
    "site_mounts",
    "mount_home",
    "default_registry",
    "allowed_registries",
    "insecure_registries",
    "allow_per_rank",
    "remap_user",
    "credentials_file",
    "log_level",
    "wiring_secret_file",
    "wiring_ports",
    "max_image_size",
    "max_image_files",
    "min_pull_rate",
    "credential_helper_timeout",
    "user_child_timeout",
];

impl Config {
    /// Reads `$BERTH_CONFIG`, else the default path; a missing default file means defaults.
    pub fn load() -> Result<Config, ConfigError> {
        Config::load_from(std::env::var_os(CONFIG_VAR).as_deref())
    }

    /// [`Config::load`] with `named` as the value of `$BERTH_CONFIG` (a caller that
    /// keeps its starter's environment apart passes it). As root, the file must be
    /// root's alone.
    pub fn load_from(named: Option<&std::ffi::OsStr>) -> Result<Config, ConfigError> {
        let path = named.map_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH), PathBuf::from);
        if named.is_none() && !path.exists() {
            return Ok(Config::default());
        }
        if !crate::privileged::is_root() {
            return Config::from_file(&path);
        }
        let file = crate::privileged::open_root_owned(&path).map_err(|why| match named {
            Some(_) => ConfigError::UntrustedVar { var: CONFIG_VAR, path: path.clone(), why },
            None => ConfigError::UntrustedFile { path: path.clone(), why },
        })?;
        Config::from_reader(file, &path)
    }

    /// The config on stdin (`berth --config-stdin`: the Slurm plugin's settings, on a
    /// pipe from root, never through a variable).
    pub fn from_stdin() -> Result<Config, ConfigError> {
        use std::io::Read;
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).map_err(ConfigError::Stdin)?;
        Config::from_toml(&text).map_err(|message| ConfigError::Parse { path: PathBuf::from("<stdin>"), message })
    }

    fn from_reader(mut file: std::fs::File, path: &Path) -> Result<Config, ConfigError> {
        use std::io::Read;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Config::from_toml(&text).map_err(|message| ConfigError::Parse { path: path.to_path_buf(), message })
    }

    /// The store `$BERTH_STORE` names (`value`), if any. As root it must be a root-owned
    /// directory nobody else can write, or one only root can make.
    pub fn store_from_var(value: Option<&std::ffi::OsStr>) -> Result<Option<PathBuf>, ConfigError> {
        let Some(value) = value else { return Ok(None) };
        let path = PathBuf::from(value);
        if crate::privileged::is_root() {
            return crate::privileged::check_root_owned_dir(&path).map(Some).map_err(|why| ConfigError::UntrustedVar { var: STORE_VAR, path: path.clone(), why });
        }
        Ok(Some(path))
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.message().to_string())?;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }

    /// The settings as a TOML file an admin can paste back (`berth config`): every
    /// key, defaults included; an unset `credentials_file` is left out.
    pub fn to_toml(&self) -> String {
        // Cannot fail: every field is a string, number, bool, path or table of them.
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print the settings as TOML: {e}\n"))
    }

    /// Applies one `key=value` setting, as the Slurm plugin receives them from
    /// `plugstack.conf`. Lists are comma-separated; a site mount is `SRC:DST[:ro]`.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let bad = |why: &str| ConfigError::BadValue {
            key: key.to_string(),
            value: value.to_string(),
            why: why.to_string(),
        };
        let list = || -> Vec<String> {
            value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        };
        match key {
            "store_dir" => self.store_dir = absolute(value).ok_or_else(|| bad("must be an absolute path"))?,
            "runtime_dir" => self.runtime_dir = absolute(value).ok_or_else(|| bad("must be an absolute path"))?,
            "berth_binary" => self.berth_binary = absolute(value).ok_or_else(|| bad("must be an absolute path"))?,
            "credentials_file" => {
                self.credentials_file = Some(absolute(value).ok_or_else(|| bad("must be an absolute path"))?)
            }
            "site_mounts" => {
                self.site_mounts = list()
                    .iter()
                    .map(|spec| parse_site_mount(spec).ok_or_else(|| bad("expected SRC:DST[:ro] with absolute paths")))
                    .collect::<Result<_, _>>()?
            }
            "mount_home" => self.mount_home = parse_bool(value).ok_or_else(|| bad("expected true or false"))?,
            "allow_per_rank" => self.allow_per_rank = parse_bool(value).ok_or_else(|| bad("expected true or false"))?,
            "remap_user" => self.remap_user = parse_bool(value).ok_or_else(|| bad("expected true or false"))?,
            "default_registry" => self.default_registry = value.to_string(),
            "allowed_registries" => self.allowed_registries = list(),
            "insecure_registries" => self.insecure_registries = list(),
            "log_level" => self.log_level = value.to_string(),
            "wiring_secret_file" => {
                self.wiring_secret_file = absolute(value).ok_or_else(|| bad("must be an absolute path"))?
            }
            "wiring_ports" => self.wiring_ports = value.to_string(),
            "max_image_size" => self.max_image_size = value.to_string(),
            "max_image_files" => self.max_image_files = value.parse().map_err(|_| bad("expected a number of files"))?,
            "min_pull_rate" => self.min_pull_rate = value.to_string(),
            "credential_helper_timeout" => self.credential_helper_timeout = value.parse().map_err(|_| bad("expected a number of seconds"))?,
            "user_child_timeout" => self.user_child_timeout = value.parse().map_err(|_| bad("expected a number of seconds"))?,
            _ => {
                return Err(ConfigError::UnknownKey {
                    key: key.to_string(),
                    known: KNOWN_KEYS.join(", "),
                })
            }
        }
        self.validate()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !matches!(self.log_level.as_str(), "error" | "warn" | "info" | "debug") {
            return Err(ConfigError::BadValue {
                key: "log_level".into(),
                value: self.log_level.clone(),
                why: "expected error, warn, info or debug".into(),
            });
        }
        for (key, path) in [
            ("store_dir", &self.store_dir),
            ("runtime_dir", &self.runtime_dir),
            ("berth_binary", &self.berth_binary),
            ("wiring_secret_file", &self.wiring_secret_file),
        ] {
            if !path.is_absolute() {
                return Err(ConfigError::BadValue {
                    key: key.into(),
                    value: path.display().to_string(),
                    why: "must be an absolute path".into(),
                });
            }
        }
        self.wiring_port_range()?;
        if parse_size(&self.max_image_size).is_none() {
            return Err(ConfigError::BadValue {
                key: "max_image_size".into(),
                value: self.max_image_size.clone(),
                why: "expected a size in bytes, or with a suffix K, M, G or T (e.g. 64G)".into(),
            });
        }
        if parse_size(&self.min_pull_rate).is_none_or(|r| r == 0) {
            return Err(ConfigError::BadValue {
                key: "min_pull_rate".into(),
                value: self.min_pull_rate.clone(),
                why: "expected bytes a second above 0, or with a suffix K, M or G (e.g. 100K)".into(),
            });
        }
        for (key, seconds) in [("credential_helper_timeout", self.credential_helper_timeout), ("user_child_timeout", self.user_child_timeout)] {
            if seconds == 0 {
                return Err(ConfigError::BadValue { key: key.into(), value: "0".into(), why: "expected seconds above 0".into() });
            }
        }
        for mount in &self.site_mounts {
            if !mount.source.is_absolute() || !mount.target.is_absolute() {
                return Err(ConfigError::BadValue {
                    key: "site_mounts".into(),
                    value: format!("{}:{}", mount.source.display(), mount.target.display()),
                    why: "both paths must be absolute".into(),
                });
            }
        }
        Ok(())
    }

    /// `max_image_size` in bytes.
    pub fn max_image_bytes(&self) -> u64 {
        parse_size(&self.max_image_size).unwrap_or(u64::MAX)
    }

    /// `min_pull_rate` in bytes a second.
    pub fn min_pull_rate_bytes(&self) -> u64 {
        parse_size(&self.min_pull_rate).unwrap_or(100 << 10).max(1)
    }

    /// `credential_helper_timeout` as a duration.
    pub fn credential_helper_timeout(&self) -> Duration {
        Duration::from_secs(self.credential_helper_timeout)
    }

    /// `user_child_timeout` as a duration.
    pub fn user_child_timeout(&self) -> Duration {
        Duration::from_secs(self.user_child_timeout)
    }

    /// `wiring_ports` as an inclusive range of unprivileged ports.
    pub fn wiring_port_range(&self) -> Result<(u16, u16), ConfigError> {
        let bad = || ConfigError::BadValue {
            key: "wiring_ports".into(),
            value: self.wiring_ports.clone(),
            why: "expected LO-HI, two ports from 1024 to 65535 with LO <= HI".into(),
        };
        let (lo, hi) = self.wiring_ports.split_once('-').ok_or_else(bad)?;
        let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
        let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
        if lo < 1024 || lo > hi {
            return Err(bad());
        }
        Ok((lo, hi))
    }

    /// Whether plain HTTP may be used for this registry host (with port, if any).
    /// Loopback is implicit only for a user's own pulls: as root, a `localhost:PORT` is
    /// whichever node user listens there first, who would get other users' logins in
    /// the clear and define what the reference is for their jobs. A site that runs a
    /// registry on loopback lists it.
    pub fn is_insecure(&self, registry: &str) -> bool {
        let host = registry.rsplit_once(':').map_or(registry, |(h, _)| h);
        (!crate::privileged::is_root() && matches!(host, "localhost" | "127.0.0.1" | "[::1]"))
            || self.insecure_registries.iter().any(|r| r == registry || r == host)
    }

    /// Whether the admin lets jobs pull from this registry host.
    pub fn is_allowed(&self, registry: &str) -> bool {
        self.allowed_registries.is_empty() || self.allowed_registries.iter().any(|r| r == registry)
    }
}

/// `123`, `16M`, `64G`: bytes, with binary suffixes K, M, G, T.
fn parse_size(value: &str) -> Option<u64> {
    let value = value.trim();
    let (digits, shift) = match value.char_indices().last()? {
        (i, 'K' | 'k') => (&value[..i], 10),
        (i, 'M' | 'm') => (&value[..i], 20),
        (i, 'G' | 'g') => (&value[..i], 30),
        (i, 'T' | 't') => (&value[..i], 40),
        _ => (value, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

fn absolute(value: &str) -> Option<PathBuf> {
    let path = PathBuf::from(value);
    path.is_absolute().then_some(path)
}

fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "true" | "yes" | "1" => Some(true),
        "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

fn parse_site_mount(spec: &str) -> Option<SiteMount> {
    let mut parts = spec.split(':');
    let source = absolute(parts.next()?)?;
    let target = absolute(parts.next()?)?;
    let read_only = match parts.next() {
        None => false,
        Some("ro") => true,
        Some("rw") => false,
        Some(_) => return None,
    };
    parts.next().is_none().then_some(SiteMount { source, target, read_only })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_paths() {
        let config = Config::default();
        assert_eq!(config.store_dir, Path::new("/var/lib/berth"));
        assert_eq!(config.runtime_dir, Path::new("/run/berth"));
        assert!(config.mount_home);
    }

    #[test]
    fn printed_settings_read_back_as_the_same_settings() {
        let mut config = Config::default();
        assert_eq!(Config::from_toml(&config.to_toml()).unwrap(), config);
        config.set("site_mounts", "/scratch:/scratch:ro,/opt/site:/site").unwrap();
        config.set("insecure_registries", "10.0.0.1:5000").unwrap();
        config.credentials_file = Some("/etc/berth/logins.json".into());
        let text = config.to_toml();
        assert!(text.contains("store_dir = \"/var/lib/berth\"") && text.contains("[[site_mounts]]"), "{text}");
        assert_eq!(Config::from_toml(&text).unwrap(), config, "{text}");
    }

    #[test]
    fn toml_file_overrides_defaults_and_rejects_unknown_keys() {
        let config = Config::from_toml(
            "store_dir = \"/scratch/berth\"\ninsecure_registries = [\"10.0.0.1:5000\"]\n\
             [[site_mounts]]\nsource = \"/scratch\"\ntarget = \"/scratch\"\nread_only = true\n",
        )
        .unwrap();
        assert_eq!(config.store_dir, Path::new("/scratch/berth"));
        assert!(config.is_insecure("10.0.0.1:5000"));
        assert!(!config.is_insecure("docker.io"));
        assert!(config.site_mounts[0].read_only);
        let err = Config::from_toml("stor_dir = \"/x\"").unwrap_err();
        assert!(err.contains("stor_dir"), "{err}");
    }

    #[test]
    fn as_root_a_config_or_store_a_user_could_write_is_refused_with_one_line() {
        if !crate::privileged::is_root() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("berth-config-owned-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("berth.toml");
        std::fs::write(&file, "store_dir = \"/scratch/berth\"\n").unwrap();
        assert_eq!(Config::load_from(Some(file.as_os_str())).unwrap().store_dir, Path::new("/scratch/berth"));
        std::os::unix::fs::chown(&file, Some(65534), None).unwrap();
        let err = Config::load_from(Some(file.as_os_str())).unwrap_err().to_string();
        assert!(err.starts_with(&format!("BERTH_CONFIG={} is refused as root: ", file.display())) && err.contains("not root") && err.contains("unset BERTH_CONFIG"), "{err}");
        std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
        let err = Config::store_from_var(Some(dir.as_os_str())).unwrap_err().to_string();
        assert!(err.starts_with(&format!("BERTH_STORE={} is refused as root", dir.display())), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn plugstack_settings_parse_lists_and_mounts() {
        let mut config = Config::default();
        config.set("site_mounts", "/scratch:/scratch:ro,/apps:/opt/apps").unwrap();
        config.set("allowed_registries", "a.example, b.example").unwrap();
        config.set("mount_home", "no").unwrap();
        assert_eq!(config.site_mounts.len(), 2);
        assert!(config.site_mounts[0].read_only && !config.site_mounts[1].read_only);
        assert!(config.is_allowed("b.example") && !config.is_allowed("c.example"));
        assert!(!config.mount_home);
    }

    #[test]
    fn plugstack_settings_reject_unknown_keys_and_bad_values() {
        let mut config = Config::default();
        let unknown = config.set("storedir", "/x").unwrap_err().to_string();
        assert!(unknown.contains("unknown berth setting 'storedir'"), "{unknown}");
        assert!(config.set("store_dir", "relative/path").is_err());
        assert!(config.set("site_mounts", "/a:/b:rx").is_err());
        assert!(config.set("log_level", "loud").is_err());
        let mut config = Config::default();
        assert!(config.set("wiring_ports", "900-2000").is_err());
        let mut config = Config::default();
        assert!(config.set("wiring_ports", "3000-2000").is_err());
        let mut config = Config::default();
        config.set("wiring_ports", "30000-30099").unwrap();
        assert_eq!(config.wiring_port_range().unwrap(), (30000, 30099));
        let mut config = Config::default();
        assert_eq!((config.credential_helper_timeout(), config.user_child_timeout()), (Duration::from_secs(30), Duration::from_secs(60)));
        config.set("credential_helper_timeout", "2").unwrap();
        config.set("user_child_timeout", "4").unwrap();
        assert_eq!(config.user_child_timeout(), Duration::from_secs(4));
        assert!(Config::default().set("credential_helper_timeout", "0").is_err());
        assert!(Config::from_toml("user_child_timeout = 0\n").is_err());
        // Loopback is plain HTTP by itself for a user's own pulls only.
        assert_eq!(config.is_insecure("localhost:5000"), !crate::privileged::is_root());
    }
}
