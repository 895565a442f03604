//! The admin's `plugstack.conf` arguments (`required /usr/lib/slurm/berth.so key=value ...`)
//! turned into the engine's `Config`. Owns only the `key=value` splitting; every key's
//! meaning and check lives in `berth_engine::config::Config::set`, so the plugin and the
//! `berth` command cannot disagree about a setting.

use berth_engine::config::Config;

/// Builds the node's config from the plugin's arguments, defaults first.
pub fn from_plugstack<S: AsRef<str>>(args: &[S]) -> Result<Config, String> {
    let mut config = Config::default();
    for arg in args {
        let arg = arg.as_ref();
        let (key, value) = arg
            .split_once('=')
            .ok_or_else(|| format!("plugstack.conf argument '{arg}' is not key=value"))?;
        config.set(key.trim(), value.trim()).map_err(|err| format!("plugstack.conf: {err}"))?;
    }
    Ok(config)
}

/// The config as TOML, handed to the `berth` binary so that it acts on exactly the
/// settings the plugin was given.
pub fn to_toml(config: &Config) -> Result<String, String> {
    toml::to_string(config).map_err(|err| format!("cannot write the berth config for the berth binary: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn keys_override_defaults() {
        let config = from_plugstack(&["store_dir=/scratch/berth", "mount_home=false", "berth_binary=/opt/berth/bin/berth"]).unwrap();
        assert_eq!(config.store_dir, Path::new("/scratch/berth"));
        assert_eq!(config.berth_binary, Path::new("/opt/berth/bin/berth"));
        assert!(!config.mount_home);
        assert_eq!(config.runtime_dir, Path::new("/run/berth"));
    }

    #[test]
    fn unknown_keys_and_bare_words_are_clear_errors() {
        let err = from_plugstack(&["stor_dir=/x"]).unwrap_err();
        assert!(err.contains("unknown berth setting 'stor_dir'") && err.contains("store_dir"), "{err}");
        let err = from_plugstack(&["verbose"]).unwrap_err();
        assert!(err.contains("'verbose' is not key=value"), "{err}");
        assert!(from_plugstack(&["runtime_dir=run"]).is_err());
    }

    #[test]
    fn the_toml_handed_to_berth_reads_back_the_same() {
        let config = from_plugstack(&["site_mounts=/scratch:/scratch:ro", "insecure_registries=10.0.0.1:5000", "credentials_file=/etc/berth/auth.json"]).unwrap();
        let text = to_toml(&config).unwrap();
        assert_eq!(Config::from_toml(&text).unwrap(), config);
        let defaults = Config::default();
        assert_eq!(Config::from_toml(&to_toml(&defaults).unwrap()).unwrap(), defaults);
    }
}
