//! berth's own OpenSSH for containers: the node's `ssh` and `sshd` binaries with their
//! shared-library closure and their loader, copied into a job's wiring dir, so they run
//! in any image (none of Docker Hub's usual images carry sshd) through that loader.
//! Reads the host's binaries and asks the host's loader for their libraries; must never
//! run anything from an image, nor write outside the dir it is given.

use super::WiringError;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The node's OpenSSH client and server (Debian's paths).
pub const HOST_SSH: &str = "/usr/bin/ssh";
pub const HOST_SSHD: &str = "/usr/sbin/sshd";

fn bad(why: String) -> WiringError {
    WiringError::OpenSsh(why)
}

/// The ELF interpreter (PT_INTERP) of a 64-bit little-endian executable.
pub fn interpreter(binary: &Path) -> Result<PathBuf, WiringError> {
    let elf = std::fs::read(binary).map_err(|e| bad(format!("cannot read {}: {e}", binary.display())))?;
    let not_elf = || bad(format!("{} is not a 64-bit little-endian ELF executable", binary.display()));
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return Err(not_elf());
    }
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u64_at = |o: usize| elf.get(o..o + 8).and_then(|b| b.try_into().ok()).map(|b| u64::from_le_bytes(b) as usize);
    let phoff = u64_at(0x20).ok_or_else(not_elf)?;
    let (phentsize, phnum) = (u16_at(0x36).ok_or_else(not_elf)?, u16_at(0x38).ok_or_else(not_elf)?);
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let p_type = elf.get(ph..ph + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).ok_or_else(not_elf)?;
        if p_type == 3 {
            let (offset, size) = (u64_at(ph + 8).ok_or_else(not_elf)?, u64_at(ph + 32).ok_or_else(not_elf)?);
            let raw = elf.get(offset..offset + size).ok_or_else(not_elf)?;
            let text = raw.split(|b| *b == 0).next().unwrap_or_default();
            return Ok(PathBuf::from(String::from_utf8_lossy(text).into_owned()));
        }
    }
    Err(bad(format!("{} has no ELF interpreter (statically linked?)", binary.display())))
}

/// The shared libraries `binary` loads, as (soname, host path), asked of its loader.
pub fn libraries(loader: &Path, binary: &Path) -> Result<Vec<(String, PathBuf)>, WiringError> {
    let out = Command::new(loader)
        .arg("--list")
        .arg(binary)
        .env_clear()
        .output()
        .map_err(|e| bad(format!("cannot run {} --list {}: {e}", loader.display(), binary.display())))?;
    if !out.status.success() {
        return Err(bad(format!("{} --list {} failed: {}", loader.display(), binary.display(), String::from_utf8_lossy(&out.stderr).trim())));
    }
    parse_list(&String::from_utf8_lossy(&out.stdout))
        .map_err(|line| bad(format!("{}: a library of {} is missing: {line}", loader.display(), binary.display())))
}

/// Parses the loader's `--list` output (ldd's format); a line `=> not found` is an error.
fn parse_list(text: &str) -> Result<Vec<(String, PathBuf)>, String> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        let Some((name, rest)) = line.split_once(" => ") else { continue };
        let path = rest.split(" (").next().unwrap_or("").trim();
        if path.is_empty() || path == "not found" {
            return Err(line.to_string());
        }
        libs.push((name.trim().to_string(), PathBuf::from(path)));
    }
    Ok(libs)
}

/// Copies ssh, sshd, their libraries and their loader into `dir` (`ssh`, `sshd`,
/// `lib/`); returns the loader's file name (run as `lib/<loader>`).
pub fn stage(dir: &Path) -> Result<String, WiringError> {
    let (ssh, sshd) = (Path::new(HOST_SSH), Path::new(HOST_SSHD));
    for b in [ssh, sshd] {
        if !b.is_file() {
            return Err(bad(format!("{} is missing on this node: install OpenSSH (Debian: openssh-client, openssh-server)", b.display())));
        }
    }
    let loader = interpreter(sshd)?;
    let loader_name = loader.file_name().map(|n| n.to_string_lossy().into_owned()).ok_or_else(|| bad(format!("odd loader path {}", loader.display())))?;
    let lib = dir.join("lib");
    crate::fsmode::ensure_dir(&lib, 0o755).map_err(|e| bad(format!("cannot create {}: {e}", lib.display())))?;
    let copy = |from: &Path, to: PathBuf| -> Result<(), WiringError> {
        std::fs::copy(from, &to).map_err(|e| bad(format!("cannot copy {} to {}: {e}", from.display(), to.display())))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).map_err(|e| bad(format!("cannot chmod {}: {e}", to.display())))
    };
    copy(&loader, lib.join(&loader_name))?;
    for binary in [ssh, sshd] {
        for (name, path) in libraries(&loader, binary)? {
            if !lib.join(&name).exists() {
                copy(&path, lib.join(&name))?;
            }
        }
        let name = binary.file_name().unwrap_or_default();
        copy(binary, dir.join(name))?;
    }
    Ok(loader_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loaders_list_is_parsed_and_missing_libraries_are_errors() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibcrypto.so.3 => /lib/x86_64-linux-gnu/libcrypto.so.3 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(parse_list(text).unwrap(), vec![("libcrypto.so.3".to_string(), PathBuf::from("/lib/x86_64-linux-gnu/libcrypto.so.3"))]);
        assert!(parse_list("\tlibfoo.so.1 => not found\n").is_err());
    }

    #[test]
    fn the_hosts_sshd_has_a_loader_and_a_closure() {
        if !Path::new(HOST_SSHD).exists() {
            eprintln!("skipped: no {HOST_SSHD}");
            return;
        }
        let loader = interpreter(Path::new(HOST_SSHD)).unwrap();
        assert!(loader.to_string_lossy().contains("ld-linux"), "{}", loader.display());
        let libs = libraries(&loader, Path::new(HOST_SSHD)).unwrap();
        assert!(libs.iter().any(|(n, _)| n.starts_with("libc.so")), "{libs:?}");
        assert!(interpreter(Path::new("/etc/passwd")).is_err());
    }
}
