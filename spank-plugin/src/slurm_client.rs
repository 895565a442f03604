//! Slurm's own commands inside a container: a batch script that runs in an image (which
//! has no Slurm) can still call `srun`, `sbatch`, `scontrol`, ...
//!
//! How: the node's root file system is bound read-only at `/.berth/host`, and a small
//! wrapper per command in `/.berth/bin` (appended to the task's `PATH`) runs the host's
//! binary with the host's dynamic loader and libraries from there, so the image's C
//! library never matters. What the host's Slurm finds by absolute path is bound at the
//! same path: its config directory, the munge socket directory, its plugin directory
//! (also the binaries' RUNPATH) and the directory of this plugin (plugstack.conf names
//! it). The tasks such an `srun` starts enter the job's containers like any other.
//!
//! Owns finding those host paths (stat only) and writing the wrappers; never runs
//! anything. The wrappers are the same for every job on a node and live in
//! `<runtime_dir>/.slurm-client/`.

use crate::args::Mount;
use std::io;
use std::path::{Path, PathBuf};

/// Where the host's root is bound inside a container.
pub const HOST_ROOT: &str = "/.berth/host";
/// Where the wrappers are bound inside a container.
pub const BIN_DIR: &str = "/.berth/bin";

const COMMANDS: &[&str] = &["srun", "sbatch", "salloc", "scontrol", "squeue", "scancel", "sinfo", "sacct", "sstat"];
const COMMAND_DIRS: &[&str] = &["/usr/bin", "/usr/local/bin", "/bin", "/opt/slurm/bin"];
/// Dynamic loaders by architecture; the first that exists is the host's.
const LOADERS: &[&str] = &["/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1", "/lib64/ld64.so.2"];
const LIB_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/usr/local/lib",
    "/lib",
    "/usr/lib",
];
/// Paths Slurm and munge use by their absolute names (Debian, RPM and source layouts).
const SAME_PATH_DIRS: &[&str] = &[
    "/etc/slurm",
    "/etc/slurm-llnl",
    "/usr/local/etc/slurm",
    "/run/munge",
    "/var/run/munge",
    "/usr/lib/x86_64-linux-gnu/slurm-wlm",
    "/usr/lib/aarch64-linux-gnu/slurm-wlm",
    "/usr/lib64/slurm",
    "/usr/lib/slurm",
    "/usr/local/lib/slurm",
    "/opt/slurm",
];

/// The development link of the node's libpmix, which Slurm's pmix plugin `dlopen`s by
/// its absolute path when an `srun --mpi=pmix` starts (Debian's build). Images carry
/// the runtime library (`libpmix.so.2`) at most, never this link, so binding the
/// node's file there shadows nothing the image's programs use.
const PMIX_DEV_LINKS: &[&str] = &["/usr/lib/x86_64-linux-gnu/pmix2/lib/libpmix.so", "/usr/lib/aarch64-linux-gnu/pmix2/lib/libpmix.so"];

/// What the node's Slurm client consists of, as found on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostClient {
    loader: PathBuf,
    lib_dirs: Vec<PathBuf>,
    commands: Vec<(String, PathBuf)>,
    same_path_dirs: Vec<PathBuf>,
    /// Those of [`PMIX_DEV_LINKS`] the host has.
    pmix_links: Vec<PathBuf>,
}

impl HostClient {
    /// Looks the client up on this host; `None` when there is no loader or no `srun`.
    /// `plugin_dir` is the directory this plugin was loaded from.
    pub fn discover(plugin_dir: Option<&Path>) -> Option<HostClient> {
        let loader = LOADERS.iter().map(Path::new).find(|p| p.exists())?.canonicalize().ok()?;
        let lib_dirs = LIB_DIRS.iter().map(PathBuf::from).filter(|d| d.is_dir() && !d.is_symlink()).collect();
        let commands: Vec<(String, PathBuf)> = COMMANDS
            .iter()
            .filter_map(|name| {
                let found = COMMAND_DIRS.iter().map(|d| Path::new(d).join(name)).find(|p| p.is_file())?;
                Some((name.to_string(), found.canonicalize().ok()?))
            })
            .collect();
        if !commands.iter().any(|(name, _)| name == "srun") {
            return None;
        }
        let mut same_path_dirs: Vec<PathBuf> =
            SAME_PATH_DIRS.iter().map(PathBuf::from).filter(|d| d.is_dir() && !d.is_symlink()).collect();
        if let Some(dir) = plugin_dir.filter(|d| d.is_absolute() && !same_path_dirs.iter().any(|s| d.starts_with(s))) {
            same_path_dirs.push(dir.to_path_buf());
        }
        let pmix_links = PMIX_DEV_LINKS.iter().map(PathBuf::from).filter(|link| link.is_file()).collect();
        Some(HostClient { loader, lib_dirs, commands, same_path_dirs, pmix_links })
    }

    /// The wrapper script for one host command.
    pub fn wrapper(&self, binary: &Path) -> String {
        let host = |p: &Path| format!("{HOST_ROOT}{}", p.display());
        let libs: Vec<String> = self.lib_dirs.iter().map(|d| host(d)).collect();
        format!(
            "#!/bin/sh\n# berth: the host's {name}, run with the host's loader and libraries.\nexec '{loader}' --library-path '{libs}' '{binary}' \"$@\"\n",
            name = binary.file_name().map_or(String::new(), |n| n.to_string_lossy().into_owned()),
            loader = host(&self.loader),
            libs = libs.join(":"),
            binary = host(binary),
        )
    }

    /// Writes the wrappers into `dir` (atomically, root-owned, world-readable) unless
    /// they are already there with the same content. Modes are set, not left to
    /// slurmd's umask; the temporary file is made new (never followed), and an old one
    /// of a killed run is replaced.
    pub fn install(&self, dir: &Path) -> io::Result<()> {
        berth_engine::fsmode::ensure_dir(dir, 0o755)?;
        for (name, binary) in &self.commands {
            let text = self.wrapper(binary);
            let path = dir.join(name);
            if std::fs::read_to_string(&path).is_ok_and(|old| old == text) {
                continue;
            }
            let tmp = dir.join(format!(".{name}.{}", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            berth_engine::fsmode::replace(&tmp, &path, text.as_bytes(), 0o755)?;
        }
        Ok(())
    }

    /// The mounts a container needs for the wrappers in `bin_dir` (on the host) to work.
    pub fn mounts(&self, bin_dir: &Path) -> Vec<Mount> {
        let mut mounts = vec![
            Mount { source: "/".into(), target: HOST_ROOT.into(), read_only: true },
            Mount { source: bin_dir.to_path_buf(), target: BIN_DIR.into(), read_only: true },
        ];
        mounts.extend(self.same_path_dirs.iter().map(|d| Mount {
            source: d.clone(),
            target: d.clone(),
            read_only: !d.starts_with("/run") && !d.starts_with("/var/run"),
        }));
        mounts.extend(self.pmix_links.iter().map(|link| Mount { source: link.clone(), target: link.clone(), read_only: true }));
        mounts
    }
}

/// `PATH` with the wrappers' directory last, so the image's own commands win.
pub fn path_with_wrappers(path: Option<&str>) -> String {
    match path {
        Some(path) if path.split(':').any(|d| d == BIN_DIR) => path.to_string(),
        Some(path) if !path.is_empty() => format!("{path}:{BIN_DIR}"),
        _ => format!("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:{BIN_DIR}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> HostClient {
        HostClient {
            loader: "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2".into(),
            lib_dirs: vec!["/lib/x86_64-linux-gnu".into(), "/usr/lib/x86_64-linux-gnu".into()],
            commands: vec![("srun".into(), "/usr/bin/srun".into())],
            same_path_dirs: vec!["/etc/slurm".into(), "/run/munge".into(), "/opt/site/lib".into()],
            pmix_links: vec!["/usr/lib/x86_64-linux-gnu/pmix2/lib/libpmix.so".into()],
        }
    }

    #[test]
    fn the_wrapper_runs_the_host_binary_with_the_host_loader_and_libraries() {
        assert_eq!(
            client().wrapper(Path::new("/usr/bin/srun")),
            "#!/bin/sh\n# berth: the host's srun, run with the host's loader and libraries.\n\
             exec '/.berth/host/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2' \
             --library-path '/.berth/host/lib/x86_64-linux-gnu:/.berth/host/usr/lib/x86_64-linux-gnu' \
             '/.berth/host/usr/bin/srun' \"$@\"\n"
        );
    }

    #[test]
    fn mounts_bind_the_host_read_only_and_slurm_paths_in_place() {
        let mounts = client().mounts(Path::new("/run/berth/.slurm-client"));
        let specs: Vec<String> = mounts.iter().map(ToString::to_string).collect();
        assert_eq!(
            specs,
            [
                "/:/.berth/host:ro",
                "/run/berth/.slurm-client:/.berth/bin:ro",
                "/etc/slurm:/etc/slurm:ro",
                "/run/munge:/run/munge",
                "/opt/site/lib:/opt/site/lib:ro",
                "/usr/lib/x86_64-linux-gnu/pmix2/lib/libpmix.so:/usr/lib/x86_64-linux-gnu/pmix2/lib/libpmix.so:ro"
            ]
        );
    }

    #[test]
    fn wrappers_come_last_on_path_and_only_once() {
        assert_eq!(path_with_wrappers(Some("/usr/bin:/bin")), "/usr/bin:/bin:/.berth/bin");
        assert_eq!(path_with_wrappers(Some("/usr/bin:/.berth/bin")), "/usr/bin:/.berth/bin");
        assert!(path_with_wrappers(None).ends_with(":/.berth/bin"));
    }

    #[test]
    fn install_writes_executable_wrappers_once() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("berth-spank-wrappers-{}", std::process::id()));
        let client = client();
        client.install(&dir).unwrap();
        client.install(&dir).unwrap();
        let srun = dir.join("srun");
        assert_eq!(std::fs::read_to_string(&srun).unwrap(), client.wrapper(Path::new("/usr/bin/srun")));
        assert_eq!(std::fs::metadata(&srun).unwrap().permissions().mode() & 0o777, 0o755);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temp files left");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
