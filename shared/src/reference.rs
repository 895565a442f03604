//! Image references as users type them (`ubuntu`, `nvcr.io/nvidia/pytorch:24.01-py3`,
//! `IMAGE:tag@sha256:...`), parsed and normalized the way Docker does: default registry
//! `docker.io`, implicit `library/` for one-component Hub names, default tag `latest`.
//! Owns the grammar and normalization; never touches the network or the file system.

use std::fmt;

/// The registry name Docker Hub references normalize to.
pub const DOCKER_HUB: &str = "docker.io";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error("'{input}' is not an image reference: {why} (expected e.g. ubuntu:22.04 or registry.example.org:5000/team/app:1.4)")]
    Invalid { input: String, why: &'static str },
}

/// A parsed, normalized image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Registry name as written in normalized references (`docker.io`, `nvcr.io`, `host:5000`).
    pub registry: String,
    /// Repository path inside the registry (`library/ubuntu`).
    pub repository: String,
    /// The tag; `latest` when neither tag nor digest was given.
    pub tag: Option<String>,
    /// `sha256:<64 hex>`; when present it wins over the tag.
    pub digest: Option<String>,
}

impl Reference {
    pub fn parse(input: &str) -> Result<Reference, ReferenceError> {
        let bad = |why| ReferenceError::Invalid { input: input.to_string(), why };
        if input.is_empty() {
            return Err(bad("it is empty"));
        }
        if input.len() > 4096 {
            return Err(bad("it is too long"));
        }
        let (name_tag, digest) = match input.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (input, None),
        };
        if let Some(d) = digest {
            if !is_sha256_digest(d) {
                return Err(bad("the digest must be sha256: followed by 64 lowercase hex digits"));
            }
        }
        // A tag is after the last ':' that follows the last '/', so `host:5000/app` has none.
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => (&name_tag[..last_slash + i], Some(&name_tag[last_slash + i + 1..])),
            None => (name_tag, None),
        };
        if let Some(t) = tag {
            if !is_tag(t) {
                return Err(bad("the tag must be 1-128 letters, digits, '_', '.' or '-', not starting with '.' or '-'"));
            }
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" || first.chars().any(|c| c.is_ascii_uppercase()) =>
            {
                (first, rest)
            }
            _ => (DOCKER_HUB, name),
        };
        if !is_registry(registry) {
            return Err(bad("the registry must be a host name with an optional :port"));
        }
        let registry = if registry == "index.docker.io" { DOCKER_HUB } else { registry };
        if path.is_empty() || !path.split('/').all(is_path_component) {
            return Err(bad("repository names are lowercase letters, digits and separators ('.', '_', '__', '-') between '/'"));
        }
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        if registry.len() + 1 + repository.len() > 255 {
            return Err(bad("the repository name is longer than 255 characters"));
        }
        let tag = match (tag, digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some("latest".to_string()),
            (None, Some(_)) => None,
        };
        Ok(Reference {
            registry: registry.to_string(),
            repository,
            tag,
            digest: digest.map(String::from),
        })
    }

    /// What to ask the registry's manifest endpoint for: the digest when there is one.
    pub fn manifest_ref(&self) -> &str {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d,
            (None, Some(t)) => t,
            (None, None) => "latest",
        }
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The host (and port) to connect to: Docker Hub goes to `default_registry`
    /// (`registry-1.docker.io` unless the admin points it at a mirror).
    pub fn endpoint<'a>(&'a self, default_registry: &'a str) -> &'a str {
        if self.registry == DOCKER_HUB {
            default_registry
        } else {
            &self.registry
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// `sha256:` and 64 lowercase hex digits: the only digests berth accepts, so a digest
/// can be used as a file name in the store without escaping.
pub fn is_sha256_digest(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

fn is_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter().all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn is_registry(r: &str) -> bool {
    let (host, port) = match r.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || r.starts_with('[') => (h, Some(p)),
        _ => (r, None),
    };
    let host_ok = if host.starts_with('[') && host.ends_with(']') {
        host.len() > 2 && host[1..host.len() - 1].bytes().all(|c| c.is_ascii_hexdigit() || c == b':')
    } else {
        !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
            })
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|c| c.is_ascii_digit()));
    host_ok && port_ok
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`, Docker's path component grammar.
fn is_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

fn is_alnum(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn normalizes_every_form_users_type() {
        let table: &[(&str, &str, &str, Option<&str>, bool)] = &[
            ("ubuntu", "docker.io", "library/ubuntu", Some("latest"), false),
            ("ubuntu:22.04", "docker.io", "library/ubuntu", Some("22.04"), false),
            ("library/ubuntu", "docker.io", "library/ubuntu", Some("latest"), false),
            ("docker.io/library/ubuntu:22.04", "docker.io", "library/ubuntu", Some("22.04"), false),
            ("index.docker.io/ubuntu", "docker.io", "library/ubuntu", Some("latest"), false),
            ("nvcr.io/nvidia/pytorch:24.01-py3", "nvcr.io", "nvidia/pytorch", Some("24.01-py3"), false),
            ("registry.example.org:5000/team/app:1.4", "registry.example.org:5000", "team/app", Some("1.4"), false),
            ("localhost/app", "localhost", "app", Some("latest"), false),
            ("127.0.0.1:5000/minimal", "127.0.0.1:5000", "minimal", Some("latest"), false),
            ("bitnami/redis", "docker.io", "bitnami/redis", Some("latest"), false),
        ];
        for (input, registry, repo, tag, _) in table {
            let r = Reference::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!((r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()), (*registry, *repo, *tag), "{input}");
            assert_eq!(r.digest, None);
        }
        assert_eq!(Reference::parse("ubuntu").unwrap().to_string(), "docker.io/library/ubuntu:latest");
    }

    #[test]
    fn digest_wins_over_tag() {
        let r = Reference::parse(&format!("ubuntu@{D}")).unwrap();
        assert_eq!((r.tag.as_deref(), r.manifest_ref()), (None, D));
        assert_eq!(r.to_string(), format!("docker.io/library/ubuntu@{D}"));
        let r = Reference::parse(&format!("host:5000/a/b:1.0@{D}")).unwrap();
        assert_eq!((r.tag.as_deref(), r.manifest_ref()), (Some("1.0"), D));
        assert_eq!(r.registry, "host:5000");
    }

    #[test]
    fn rejects_bad_references_with_a_reason() {
        for bad in [
            "",
            "Ubuntu",
            "ubuntu:",
            "ubuntu:-x",
            "ubuntu@sha256:abc",
            &format!("ubuntu@md5:{}", &D[7..]),
            "a//b",
            "a/../b",
            "-a",
            "a-",
            "a..b",
            "host:port/x",
            "reg.io/",
            "ubuntu:tag with space",
            "ubuntu:22.04:extra",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        let msg = Reference::parse("Ubuntu").unwrap_err().to_string();
        assert!(msg.contains("'Ubuntu'") && msg.contains("lowercase"), "{msg}");
    }

    #[test]
    fn hub_references_go_to_the_configured_endpoint() {
        let r = Reference::parse("ubuntu").unwrap();
        assert_eq!(r.endpoint("registry-1.docker.io"), "registry-1.docker.io");
        let r = Reference::parse("nvcr.io/nvidia/cuda").unwrap();
        assert_eq!(r.endpoint("registry-1.docker.io"), "nvcr.io");
    }
}
