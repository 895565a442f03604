//! `berth run`: a throwaway container in this very process's new mount namespace (and,
//! rootless, a user namespace mapping only the caller), built with create's steps and
//! entered with join's exec. Owns the command line (Entrypoint + command or Cmd) and
//! the scratch tmpfs; never pins, never writes to the runtime dir.

use crate::sys;
use super::create::{env_and_workdir, finish_root, make_rprivate, open_sources, reopen_sources};
use super::join::{exec_as, Privileges};
use super::{env, exec_joined, io, sys_err, ContainerError, Joined, Result, Spec, State};
use crate::image::ImageConfig;
use crate::identity::Credentials;
use crate::config::Config;
use crate::rootfs::Overlay;
use nix::errno::Errno;
use nix::mount::MsFlags;
use nix::sched::CloneFlags;
use std::path::Path;

/// The command `berth run` executes: Entrypoint + (the given command, else Cmd).
pub fn command_line(config: &ImageConfig, entrypoint: Option<&[String]>, args: &[String]) -> Result<Vec<String>> {
    let mut argv: Vec<String> = entrypoint.map(<[String]>::to_vec).unwrap_or_else(|| config.entrypoint.clone());
    if args.is_empty() {
        if entrypoint.is_none() {
            argv.extend(config.cmd.iter().cloned());
        }
    } else {
        argv.extend(args.iter().cloned());
    }
    if argv.is_empty() {
        return Err(ContainerError::NoCommand);
    }
    Ok(argv)
}

/// Where `berth run` mounts its scratch tmpfs inside its own namespace. Anything the
/// container needs from the host is opened before, so hiding the host's /tmp is safe.
const RUN_SCRATCH: &str = "/tmp";

/// `berth run`: builds a throwaway container in a new mount namespace of this very
/// process and execs `argv` in it as `spec.user`, as `ch-run` does: no pins, no
/// runtime dir entry, no process left to wait. The upper and work dirs sit on a tmpfs
/// mounted only inside the container, so the writable layer vanishes with the
/// namespace when the last process in it exits.
///
/// As root, `spec.user` may be anyone. As a plain user (rootless), `spec.user` must be
/// the caller: the process enters a new user namespace mapping only its own uid and
/// gid, so supplementary groups show as the overflow group and cannot be changed.
/// Returns only on failure.
pub fn run(config: &Config, spec: &Spec, argv: &[String], overrides: &[String], want_root: bool) -> ContainerError {
    let attempt = || -> Result<std::convert::Infallible> {
        let rootless = !nix::unistd::geteuid().is_root();
        if rootless && !spec.user.is_caller() {
            return Err(ContainerError::NotRoot);
        }
        let (container_env, workdir) = env_and_workdir(spec)?;
        let mut layout = open_sources(config, spec)?;
        layout.in_user_namespace = rootless;
        // unshare(CLONE_NEWUSER) needs a single-threaded process; a pull may have left
        // threads behind: go on in a child and pass its exit status on.
        if rootless && sys::thread_count() > 1 {
            if let sys::Forked::Parent(pid) = sys::fork().map_err(sys_err("fork"))? {
                sys::exit_now(wait_status(pid)?);
            }
        }
        let mut flags = CloneFlags::CLONE_NEWNS;
        if rootless {
            flags |= CloneFlags::CLONE_NEWUSER;
        }
        nix::sched::unshare(flags).map_err(sys_err("create the container's namespaces"))?;
        if rootless {
            map_self(&spec.user)?;
        }
        make_rprivate()?;
        reopen_sources(&mut layout, &spec.user)?;
        let mut overlay = Overlay::in_dir(spec.image.layer_dirs.clone(), Path::new(RUN_SCRATCH));
        overlay.userxattr = spec.image.userxattr || rootless;
        let layers = overlay.open_layers()?;
        nix::mount::mount(Some("berth-run"), RUN_SCRATCH, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0700"))
            .map_err(sys_err("mount the container's scratch tmpfs"))?;
        overlay.prepare()?;
        let root = Path::new(RUN_SCRATCH).join("root");
        std::fs::create_dir(&root).map_err(io("create", &root))?;
        overlay.mount_from(&layers, &root)?;
        drop(layers);
        finish_root(&root, layout, spec.hostname.as_deref())?;
        let state = State::of(spec, workdir, vec!["mnt".into()], 0);
        let mut joined = Joined { state, env: container_env, inside: None };
        joined.choose_inside(config, want_root)?;
        let job_env: Vec<env::Var> = std::env::vars_os().collect();
        Err(if rootless { exec_as(&joined, argv, &job_env, overrides, Privileges::InUserNamespace) } else { exec_joined(&joined, argv, &job_env, overrides) })
    };
    match attempt() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// Maps the caller's uid and gid to themselves in the user namespace just entered.
fn map_self(user: &Credentials) -> Result<()> {
    for (file, text) in [
        ("/proc/self/setgroups", "deny".to_string()),
        ("/proc/self/uid_map", format!("{0} {0} 1", user.uid)),
        ("/proc/self/gid_map", format!("{0} {0} 1", user.gid)),
    ] {
        std::fs::write(file, text).map_err(io("write", Path::new(file)))?;
    }
    Ok(())
}

fn wait_status(pid: nix::unistd::Pid) -> Result<i32> {
    use nix::sys::wait::WaitStatus;
    loop {
        match nix::sys::wait::waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(sys_err("wait for the container")(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_uses_entrypoint_then_args_or_cmd() {
        let config = ImageConfig {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["default".into()],
            ..ImageConfig::default()
        };
        assert_eq!(command_line(&config, None, &[]).unwrap(), ["/entry", "default"]);
        assert_eq!(command_line(&config, None, &["x".into()]).unwrap(), ["/entry", "x"]);
        assert_eq!(command_line(&config, Some(&["/sh".into()]), &[]).unwrap(), ["/sh"]);
        assert!(matches!(command_line(&ImageConfig::default(), None, &[]), Err(ContainerError::NoCommand)));
    }
}
