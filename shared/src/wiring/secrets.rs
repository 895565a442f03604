//! The secrets of one job's MPI wiring, derived on every node alone: an ed25519 host
//! key, an ed25519 client key and a port, all from HMAC-SHA256 keyed with a root-only
//! file that is the same on every node (the admin's `wiring_secret_file`, the munge key
//! by default), over the job id and the job user's uid. No node talks to another, and
//! nobody without the secret file can compute another job's keys. Must never write a
//! secret anywhere: callers decide where the keys go.

use super::WiringError;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use ssh_key::private::{Ed25519Keypair, PrivateKey};
use ssh_key::LineEnding;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Bumped if the derivation ever changes, so old and new nodes never half-agree.
const DOMAIN: &[u8] = b"berth-wiring-v2";
/// Shorter secrets than this are not secrets.
const MIN_SECRET: usize = 16;

/// What every node of a job derives alike.
pub struct JobSecrets {
    /// The host key of every node's sshd (OpenSSH private key file text).
    pub host_key: String,
    /// `ssh-ed25519 AAAA... comment`, for known_hosts.
    pub host_public: String,
    /// The key the job's ssh clients log in with.
    pub client_key: String,
    /// `ssh-ed25519 AAAA... comment`, for authorized_keys.
    pub client_public: String,
    pub port: u16,
}

/// Reads the node's wiring secret: it must exist, be at least 16 bytes and be
/// readable by its owner only (anyone who can read it can log into every job).
pub fn read_secret(path: &Path) -> Result<Vec<u8>, WiringError> {
    let bad = |why: String| WiringError::Secret { path: path.to_path_buf(), why };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if meta.mode() & 0o077 != 0 {
        return Err(bad(format!("mode {:o} lets other users read it; make it 0600 or 0400", meta.mode() & 0o7777)));
    }
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    if bytes.len() < MIN_SECRET {
        return Err(bad(format!("only {} bytes; it needs at least {MIN_SECRET}", bytes.len())));
    }
    Ok(bytes)
}

fn mac(secret: &[u8], label: &str, job: &str, uid: u32) -> [u8; 32] {
    // HMAC takes keys of any length: new_from_slice cannot fail for it.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of every length"),
    };
    for part in [DOMAIN, label.as_bytes(), job.as_bytes(), uid.to_string().as_bytes()] {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// The job's port in `lo..=hi`. A plain numeric job id (Slurm's, PBS's `123.server`)
/// maps through a permutation of the range keyed by the secret, so jobs whose ids are
/// less than a span apart never share a port on a node, and no one without the
/// secret can tell which port a job (another user's, whose id `squeue`/`qstat` show)
/// will take and hold it first. Any other id takes its port from the HMAC.
pub fn port(secret: &[u8], job: &str, uid: u32, (lo, hi): (u16, u16)) -> u16 {
    let span = u32::from(hi - lo) + 1;
    let number = job.split_once('.').map_or(job, |(head, _)| head);
    let offset = match number.parse::<u64>() {
        Ok(n) if number.bytes().all(|b| b.is_ascii_digit()) => permute(secret, (n % u64::from(span)) as u32, span),
        _ => {
            let m = mac(secret, "port", job, uid);
            (u64::from_be_bytes([m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7]]) % u64::from(span)) as u32
        }
    };
    // `offset` is below `span`, so `lo + offset <= hi` fits in u16.
    lo + offset as u16
}

/// A keyed permutation of `0..span` (span <= 65536): a balanced Feistel network over
/// the smallest even number of bits that holds `span`, walked until it lands inside
/// (a permutation's cycle through `x < span` comes back below `span`).
fn permute(secret: &[u8], x: u32, span: u32) -> u32 {
    let bits = (32 - (span - 1).max(1).leading_zeros()).max(2).div_ceil(2) * 2;
    let half = bits / 2;
    let mask = (1u32 << half) - 1;
    let mut x = x;
    loop {
        let (mut left, mut right) = (x >> half, x & mask);
        for round in 0..6 {
            let m = mac(secret, "port-permutation", &format!("{round}:{right}"), 0);
            let f = u32::from_be_bytes([m[0], m[1], m[2], m[3]]) & mask;
            (left, right) = (right, left ^ f);
        }
        x = (left << half) | right;
        if x < span {
            return x;
        }
    }
}

fn keypair(secret: &[u8], label: &str, job: &str, uid: u32) -> Result<(String, String), WiringError> {
    let seed = mac(secret, label, job, uid);
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    let encode = |e: ssh_key::Error| WiringError::Key(e.to_string());
    key.set_comment(format!("berth-job-{job}-{label}"));
    let private = key.to_openssh(LineEnding::LF).map_err(encode)?;
    let public = key.public_key().to_openssh().map_err(encode)?;
    Ok((private.to_string(), public))
}

/// Everything the job's wiring needs, the same on every node of the job.
pub fn derive(secret: &[u8], job: &str, uid: u32, ports: (u16, u16)) -> Result<JobSecrets, WiringError> {
    let (host_key, host_public) = keypair(secret, "host", job, uid)?;
    let (client_key, client_public) = keypair(secret, "client", job, uid)?;
    Ok(JobSecrets { host_key, host_public, client_key, client_public, port: port(secret, job, uid, ports) })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn every_node_derives_the_same_keys_and_other_jobs_or_users_do_not() {
        let a = derive(SECRET, "41", 1000, (20000, 29999)).unwrap();
        let again = derive(SECRET, "41", 1000, (20000, 29999)).unwrap();
        assert_eq!(a.host_public, again.host_public);
        assert_eq!(a.client_public, again.client_public);
        assert_eq!(a.port, again.port);
        assert!(a.client_public.starts_with("ssh-ed25519 "), "{}", a.client_public);
        assert!(a.client_key.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
        assert_ne!(a.host_public, a.client_public);
        let other_job = derive(SECRET, "42", 1000, (20000, 29999)).unwrap();
        let other_user = derive(SECRET, "41", 1001, (20000, 29999)).unwrap();
        let other_site = derive(b"another site's secret, 32 bytes.", "41", 1000, (20000, 29999)).unwrap();
        for other in [&other_job, &other_user, &other_site] {
            assert_ne!(other.client_public, a.client_public);
            assert_ne!(other.host_public, a.host_public);
        }
    }

    #[test]
    fn numeric_job_ids_close_together_never_share_a_port() {
        let ports: std::collections::HashSet<u16> = (1000..1100).map(|j| port(SECRET, &j.to_string(), 1000, (20000, 20099))).collect();
        assert_eq!(ports.len(), 100);
        assert_eq!(port(SECRET, "123.server", 1, (20000, 29999)), port(SECRET, "123", 7, (20000, 29999)), "the same for every node and user");
        // Not the id's own place in the range: without the secret, another user's
        // job id (public) must not tell its port.
        let in_place = (1000..1100).filter(|j| port(SECRET, &j.to_string(), 1, (20000, 20099)) == 20000 + (j % 100) as u16).count();
        assert!(in_place < 10, "{in_place} of 100 ports follow the id");
        let other_secret = (1000..1100).filter(|j| port(SECRET, &j.to_string(), 1, (20000, 29999)) == port(b"another site's secret, 32 bytes.", &j.to_string(), 1, (20000, 29999))).count();
        assert!(other_secret < 5, "{other_secret} of 100 ports the same under another secret");
        for span in [1u16, 2, 3, 100, 10000] {
            let all: std::collections::HashSet<u16> = (0..u32::from(span)).map(|j| port(SECRET, &j.to_string(), 1, (20000, 20000 + span - 1))).collect();
            assert_eq!(all.len(), usize::from(span), "span {span}: a permutation");
        }
        let full: std::collections::HashSet<u16> = (0..65536u32).map(|j| port(SECRET, &j.to_string(), 1, (0, 65535))).collect();
        assert_eq!(full.len(), 65536);
        let array = port(SECRET, "123[4].server", 1, (20000, 29999));
        assert!((20000..=29999).contains(&array));
        assert_eq!(port(SECRET, "x", 1, (30000, 30000)), 30000);
    }

    #[test]
    fn a_secret_others_can_read_or_too_short_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("berth-secret-{}", std::process::id()));
        std::fs::write(&path, SECRET).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_secret(&path).unwrap_err().to_string().contains("other users"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret(&path).unwrap(), SECRET);
        std::fs::write(&path, b"short").unwrap();
        assert!(read_secret(&path).unwrap_err().to_string().contains("at least"));
        std::fs::remove_file(&path).unwrap();
    }
}
