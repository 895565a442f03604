//! A client for the OCI distribution (Docker registry v2) API: manifests with content
//! negotiation, blobs as streams, bearer-token and basic auth, redirects to blob
//! storage, proxies as Docker uses them, retries with backoff on transient failures,
//! and plain HTTP only for localhost and registries the admin lists as insecure.
//!
//! Credentials go only to the registry's own origin (scheme, host and port, as the
//! HTTP client parses the URL it connects to): never on a redirect elsewhere, never
//! after a downgrade to plain HTTP. A token realm gets the login over https, or over
//! plain HTTP only on the registry's own origin or a host the admin lists as insecure.
//! Owns the network; never writes to disk and never trusts a byte it has not hashed
//! (digest checks on blobs are the caller's, as it streams them); reads manifests,
//! configs and token answers into memory only up to their caps.

pub mod auth;
pub mod manifest;
pub mod proxy;

use crate::config::Config;
use crate::reference::Reference;
use auth::{Challenge, Credentials, Login};
use sha2::{Digest as _, Sha256};
use std::io::Read;
use std::sync::Mutex;
use std::time::Duration;
use url::{Origin, Url};

/// Largest manifest or index berth reads into memory (containerd's cap).
pub const MAX_MANIFEST: u64 = 4 << 20;
/// Largest image config berth reads into memory.
pub const MAX_CONFIG: u64 = 8 << 20;
/// Largest token service answer.
const MAX_TOKEN: u64 = 1 << 20;
/// Tries per request when the failure may pass (connection errors, 408, 429, 5xx).
pub(crate) const ATTEMPTS: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry {registry} is not in the admin's allowed_registries")]
    NotAllowed { registry: String },
    #[error("cannot reach registry {registry}: {why} (is the registry up and the address right?)")]
    Unreachable { registry: String, why: String },
    #[error("{what} not found on {registry}: check the repository name and tag")]
    NotFound { registry: String, what: String },
    #[error("registry {registry} refused the credentials for {repository}: check `docker login` or the admin credentials file")]
    WrongCredentials { registry: String, repository: String },
    #[error("registry {registry} denied access to {repository}: the repository may not exist, or needs a login (`docker login {registry}`)")]
    Denied { registry: String, repository: String },
    #[error("{registry}'s pull rate limit is reached ({detail}): log in with `docker login` for a higher limit, use a mirror, or wait")]
    RateLimited { registry: String, detail: String },
    #[error("registry {registry} answered {status} for {url}: {body}")]
    Status { registry: String, status: u16, url: String, body: String },
    #[error("registry {registry} sent a bad response for {what}: {why}")]
    Protocol { registry: String, what: String, why: String },
    #[error("registry {registry} wants the login sent to its token service {realm} over plain HTTP on another host: berth sends logins over plain HTTP only to the registry itself or to hosts in insecure_registries (ask the admin to list that host, or use a registry whose token service speaks https)")]
    PlainHttpRealm { registry: String, realm: String },
    #[error("the digest of {what} from {registry} does not match: expected {expected}, got {actual}")]
    DigestMismatch { registry: String, what: String, expected: String, actual: String },
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
}

/// One registry and repository, with its authentication state shared by all threads.
pub struct Client {
    registry: String,
    repository: String,
    base: String,
    /// The origin credentials may go to: the registry's own.
    origin: Origin,
    /// Which hosts may be spoken to over plain HTTP.
    config: Config,
    direct: ureq::Agent,
    proxies: proxy::ProxyEnv,
    http_proxied: Option<ureq::Agent>,
    https_proxied: Option<ureq::Agent>,
    login: Option<Login>,
    authorization: Mutex<Option<String>>,
}

/// A manifest as fetched, with its digest (computed over the exact bytes).
pub struct Document {
    pub digest: String,
    pub media_type: String,
    pub bytes: Vec<u8>,
}

impl Client {
    /// A client for the reference's registry and repository.
    pub fn new(config: &Config, reference: &Reference, credentials: &Credentials) -> Result<Client, RegistryError> {
        let endpoint = reference.endpoint(&config.default_registry).to_string();
        if !config.is_allowed(&reference.registry) && !config.is_allowed(&endpoint) {
            return Err(RegistryError::NotAllowed { registry: reference.registry.clone() });
        }
        let scheme = if config.is_insecure(&endpoint) || config.is_insecure(&reference.registry) { "http" } else { "https" };
        let builder = || {
            ureq::AgentBuilder::new()
                .redirects(0)
                .timeout_connect(Duration::from_secs(15))
                .timeout_read(Duration::from_secs(60))
                .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
        };
        let proxies = proxy::ProxyEnv::from_env();
        let proxied = |url: &Option<String>, var: &str| -> Result<Option<ureq::Agent>, RegistryError> {
            url.as_ref()
                .map(|url| {
                    ureq::Proxy::new(url).map(|p| builder().proxy(p).build()).map_err(|e| RegistryError::Unreachable {
                        registry: endpoint.clone(),
                        why: format!("bad proxy {var}={url}: {e}"),
                    })
                })
                .transpose()
        };
        let http_proxied = proxied(&proxies.http, "HTTP_PROXY")?;
        let https_proxied = proxied(&proxies.https, "HTTPS_PROXY")?;
        let base = format!("{scheme}://{endpoint}");
        let origin = Url::parse(&base)
            .map_err(|e| RegistryError::Unreachable { registry: endpoint.clone(), why: format!("{base} is not a URL: {e}") })?
            .origin();
        Ok(Client {
            registry: reference.registry.clone(),
            repository: reference.repository.clone(),
            base,
            origin,
            config: config.clone(),
            direct: builder().build(),
            proxies,
            http_proxied,
            https_proxied,
            login: credentials.lookup(&reference.registry)?,
            authorization: Mutex::new(None),
        })
    }

    /// Fetches a manifest by tag or digest; a digest reference is verified.
    pub fn manifest(&self, reference: &str) -> Result<Document, RegistryError> {
        let url = format!("{}/v2/{}/manifests/{}", self.base, self.repository, reference);
        let what = format!("manifest {}:{}", self.repository, reference);
        let response = self.get(&url, Some(manifest::ACCEPT), &what)?;
        let media_type = response.content_type().to_string();
        let bytes = read_limited(response, &self.registry, &what, MAX_MANIFEST)?;
        let digest = sha256_digest(&bytes);
        if crate::reference::is_sha256_digest(reference) && digest != reference {
            return Err(RegistryError::DigestMismatch {
                registry: self.registry.clone(),
                what,
                expected: reference.to_string(),
                actual: digest,
            });
        }
        Ok(Document { digest, media_type, bytes })
    }

    /// Fetches an image config (at most [`MAX_CONFIG`] bytes) and verifies its digest.
    pub fn small_blob(&self, digest: &str) -> Result<Vec<u8>, RegistryError> {
        let what = format!("blob {digest}");
        let bytes = read_limited(self.blob(digest)?, &self.registry, &what, MAX_CONFIG)?;
        let actual = sha256_digest(&bytes);
        if actual != digest {
            return Err(RegistryError::DigestMismatch { registry: self.registry.clone(), what, expected: digest.into(), actual });
        }
        Ok(bytes)
    }

    /// Opens a blob as a stream. The caller hashes it and checks the digest.
    pub fn blob(&self, digest: &str) -> Result<ureq::Response, RegistryError> {
        let url = format!("{}/v2/{}/blobs/{}", self.base, self.repository, digest);
        self.get(&url, None, &format!("blob {digest} of {}", self.repository))
    }

    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The agent for a URL: through the proxy Docker would use for it, or direct.
    fn agent_for(&self, url: &str) -> &ureq::Agent {
        let https = url.get(..8).is_some_and(|s| s.eq_ignore_ascii_case("https://"));
        let chosen = match self.proxies.for_url(url) {
            None => None,
            Some(_) if https => self.https_proxied.as_ref(),
            Some(_) => self.http_proxied.as_ref(),
        };
        chosen.unwrap_or(&self.direct)
    }

    /// GET with auth, manual redirects and retries. Credentials go only to the
    /// registry's own origin, compared on the URL exactly as the request uses it.
    fn get(&self, url: &str, accept: Option<&str>, what: &str) -> Result<ureq::Response, RegistryError> {
        let bad_url = |u: &str, e: url::ParseError| RegistryError::Protocol { registry: self.registry.clone(), what: what.into(), why: format!("bad URL {u}: {e}") };
        let mut url = Url::parse(url).map_err(|e| bad_url(url, e))?;
        let mut authenticated_once = false;
        let mut redirects = 0;
        let mut attempt = 0;
        loop {
            let same_host = url.origin() == self.origin;
            let mut request = self.agent_for(url.as_str()).request_url("GET", &url);
            if let Some(a) = accept {
                request = request.set("Accept", a);
            }
            let auth_value = if same_host { self.lock_auth().clone() } else { None };
            if let Some(value) = &auth_value {
                request = request.set("Authorization", value);
            }
            let result = request.call();
            let transient = |why: String, attempt: &mut u32| -> Result<(), RegistryError> {
                *attempt += 1;
                if *attempt >= ATTEMPTS {
                    return Err(RegistryError::Unreachable { registry: self.registry.clone(), why });
                }
                std::thread::sleep(Duration::from_millis(200 * 3u64.pow(*attempt - 1)));
                Ok(())
            };
            match result {
                Ok(response) if (300..400).contains(&response.status()) => {
                    let location = response.header("Location").map(String::from).ok_or_else(|| RegistryError::Protocol {
                        registry: self.registry.clone(),
                        what: what.into(),
                        why: format!("redirect {} without a Location", response.status()),
                    })?;
                    redirects += 1;
                    if redirects > 5 {
                        return Err(RegistryError::Protocol { registry: self.registry.clone(), what: what.into(), why: "too many redirects".into() });
                    }
                    let next = url.join(&location).map_err(|e| bad_url(&location, e))?;
                    if !matches!(next.scheme(), "http" | "https") {
                        return Err(RegistryError::Protocol { registry: self.registry.clone(), what: what.into(), why: format!("redirect to {next}, which is not http or https") });
                    }
                    url = next;
                }
                Ok(response) => return Ok(response),
                Err(ureq::Error::Status(401, response)) if same_host => {
                    if authenticated_once {
                        return Err(if self.login.is_some() {
                            RegistryError::WrongCredentials { registry: self.registry.clone(), repository: self.repository.clone() }
                        } else {
                            RegistryError::Denied { registry: self.registry.clone(), repository: self.repository.clone() }
                        });
                    }
                    authenticated_once = true;
                    let challenge = response.header("WWW-Authenticate").and_then(auth::parse_challenge);
                    let value = self.authenticate(challenge)?;
                    *self.lock_auth() = Some(value);
                }
                Err(ureq::Error::Status(status, response)) => {
                    let body = response.into_string().unwrap_or_default();
                    let body = body.trim().chars().take(300).collect::<String>();
                    match status {
                        404 => return Err(RegistryError::NotFound { registry: self.registry.clone(), what: what.into() }),
                        403 => return Err(RegistryError::Denied { registry: self.registry.clone(), repository: self.repository.clone() }),
                        429 if body.contains("toomanyrequests") || self.registry == crate::reference::DOCKER_HUB => {
                            return Err(RegistryError::RateLimited { registry: self.registry.clone(), detail: body });
                        }
                        408 | 429 | 500..=599 => transient(format!("{url} answered {status}"), &mut attempt)?,
                        _ => return Err(RegistryError::Status { registry: self.registry.clone(), status, url: url.to_string(), body }),
                    }
                }
                Err(ureq::Error::Transport(t)) => {
                    let mut why = t.to_string();
                    if url.scheme() == "https" && why.contains("InvalidContentType") {
                        why.push_str("; if this registry speaks plain HTTP, the admin lists it in insecure_registries");
                    }
                    transient(why, &mut attempt)?
                }
            }
        }
    }

    fn lock_auth(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // A poisoned lock only means another thread panicked while holding a String: the value is still usable.
        self.authorization.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers a challenge: basic auth with the login, or a bearer token from the realm.
    fn authenticate(&self, challenge: Option<Challenge>) -> Result<String, RegistryError> {
        let denied = || RegistryError::Denied { registry: self.registry.clone(), repository: self.repository.clone() };
        match challenge {
            Some(Challenge::Basic) => self.login.as_ref().map(auth::basic).ok_or_else(denied),
            Some(Challenge::Bearer { realm, service, scope }) => {
                let scope = scope.unwrap_or_else(|| format!("repository:{}:pull", self.repository));
                let mut url = Url::parse(&realm)
                    .ok()
                    .filter(|u| matches!(u.scheme(), "http" | "https"))
                    .ok_or_else(|| RegistryError::Protocol { registry: self.registry.clone(), what: "token realm".into(), why: format!("{realm} is not an http(s) URL") })?;
                if self.login.is_some() && !self.realm_may_get_login(&url) {
                    return Err(RegistryError::PlainHttpRealm { registry: self.registry.clone(), realm });
                }
                if let Some(s) = &service {
                    url.query_pairs_mut().append_pair("service", s);
                }
                url.query_pairs_mut().append_pair("scope", &scope);
                let mut request = self.agent_for(url.as_str()).request_url("GET", &url);
                if let Some(login) = &self.login {
                    request = request.set("Authorization", &auth::basic(login));
                }
                let response = match request.call() {
                    Ok(r) => r,
                    Err(ureq::Error::Status(401 | 403, _)) if self.login.is_some() => {
                        return Err(RegistryError::WrongCredentials { registry: self.registry.clone(), repository: self.repository.clone() })
                    }
                    // No login and no anonymous token: the repository needs one (or does not exist).
                    Err(ureq::Error::Status(401 | 403, _)) => return Err(denied()),
                    Err(ureq::Error::Status(status, _)) => {
                        return Err(RegistryError::Status { registry: self.registry.clone(), status, url: realm, body: "token request refused".into() })
                    }
                    Err(ureq::Error::Transport(t)) => {
                        return Err(RegistryError::Unreachable { registry: self.registry.clone(), why: format!("token service {realm}: {t}") })
                    }
                };
                let bytes = read_limited(response, &self.registry, "token", MAX_TOKEN)?;
                #[derive(serde::Deserialize)]
                struct Token {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let t: Token = serde_json::from_slice(&bytes).map_err(|e| RegistryError::Protocol {
                    registry: self.registry.clone(),
                    what: "token".into(),
                    why: e.to_string(),
                })?;
                let token = t.token.or(t.access_token).ok_or_else(|| RegistryError::Protocol {
                    registry: self.registry.clone(),
                    what: "token".into(),
                    why: "no token in the answer".into(),
                })?;
                Ok(format!("Bearer {token}"))
            }
            None => Err(denied()),
        }
    }

    /// Whether a token realm may get the login: over https (as Docker), or over plain
    /// HTTP only on the registry's own origin or a host the admin lists as insecure
    /// (localhost always is), never to some other host in the clear.
    fn realm_may_get_login(&self, realm: &Url) -> bool {
        if realm.scheme() == "https" || realm.origin() == self.origin {
            return true;
        }
        let host = realm.host_str().unwrap_or("");
        let host_port = realm.port().map_or_else(|| host.to_string(), |p| format!("{host}:{p}"));
        self.config.is_insecure(&host_port)
    }
}

/// Reads a whole answer into memory, refusing one larger than `cap` bytes.
fn read_limited(response: ureq::Response, registry: &str, what: &str, cap: u64) -> Result<Vec<u8>, RegistryError> {
    let mut bytes = Vec::new();
    response
        .into_reader()
        .take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| RegistryError::Unreachable { registry: registry.into(), why: format!("reading {what}: {e}") })?;
    if bytes.len() as u64 > cap {
        return Err(RegistryError::Protocol { registry: registry.into(), what: what.into(), why: format!("larger than berth's cap of {} MiB", cap >> 20) });
    }
    Ok(bytes)
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_go_only_to_the_registrys_own_scheme_host_and_port() {
        let base = Url::parse("https://r.example").unwrap();
        let origin = base.origin();
        let same = |u: &str| base.join(u).unwrap().origin() == origin;
        assert!(same("/v2/a/blobs/x") && same("https://r.example:443/v2/") && same("https://R.EXAMPLE/v2/"));
        for elsewhere in [
            "http://r.example/v2/a/blobs/x",
            "https://r.example:444/v2/",
            "https://s3.example/b?sig=1",
            "//cdn.example/y",
            "https://r.example@evil.example/v2/",
            // A backslash ends the authority for the HTTP client: this is evil.example:8080.
            "https://evil.example:8080\\@r.example/v2/",
            "http://evil.example:8080\\@r.example/v2/",
        ] {
            assert!(!same(elsewhere), "{elsewhere} must not get the registry's credentials");
        }
        let mut token = Url::parse("https://auth.example/token?x=1").unwrap();
        token.query_pairs_mut().append_pair("scope", "repository:library/ubuntu:pull");
        assert_eq!(token.as_str(), "https://auth.example/token?x=1&scope=repository%3Alibrary%2Fubuntu%3Apull");
    }

    #[test]
    fn token_realms_get_the_login_over_https_or_plain_http_only_where_the_admin_allows() {
        let config = Config { insecure_registries: vec!["10.1.2.3:5000".into(), "auth.local".into()], ..Config::default() };
        let creds = Credentials::none();
        let client = |r: &str| Client::new(&config, &Reference::parse(r).unwrap(), &creds).unwrap();
        let realm = |u: &str| Url::parse(u).unwrap();
        let secure = client("reg.example/a");
        assert!(secure.realm_may_get_login(&realm("https://auth.elsewhere.example/token")));
        assert!(!secure.realm_may_get_login(&realm("http://reg.example/token")), "a downgrade of the registry's own host");
        assert!(!secure.realm_may_get_login(&realm("http://auth.elsewhere.example/token")));
        let insecure = client("10.1.2.3:5000/a");
        assert!(insecure.realm_may_get_login(&realm("http://10.1.2.3:5000/token")));
        assert!(insecure.realm_may_get_login(&realm("http://auth.local:8080/token")), "a host the admin listed");
        // Loopback realms: plain HTTP by themselves for a user's own pulls only.
        assert_eq!(insecure.realm_may_get_login(&realm("http://localhost:5001/token")), !crate::privileged::is_root());
        assert!(!insecure.realm_may_get_login(&realm("http://10.1.2.4:5000/token")));
        assert!(!insecure.realm_may_get_login(&realm("http://10.1.2.3:5001/token")), "another port of the registry's host");
    }

    #[test]
    fn plain_http_only_for_listed_registries_and_a_users_own_localhost() {
        let mut config = Config { insecure_registries: vec!["10.1.2.3:5000".into()], ..Config::default() };
        let creds = Credentials::none();
        // Loopback: plain for a user's own pulls, listed only for root's.
        let c = Client::new(&config, &Reference::parse("localhost:5000/a").unwrap(), &creds).unwrap();
        let root = crate::privileged::is_root();
        assert!(c.base.starts_with(if root { "https://" } else { "http://" }), "{}", c.base);
        let listed = Config { insecure_registries: vec!["localhost:5000".into()], ..Config::default() };
        let c = Client::new(&listed, &Reference::parse("localhost:5000/a").unwrap(), &creds).unwrap();
        assert!(c.base.starts_with("http://"));
        let c = Client::new(&config, &Reference::parse("10.1.2.3:5000/a").unwrap(), &creds).unwrap();
        assert!(c.base.starts_with("http://"));
        let c = Client::new(&config, &Reference::parse("reg.example/a").unwrap(), &creds).unwrap();
        assert_eq!(c.base, "https://reg.example");
        let c = Client::new(&config, &Reference::parse("ubuntu").unwrap(), &creds).unwrap();
        assert_eq!(c.base, "https://registry-1.docker.io");
        config.allowed_registries = vec!["reg.example".into()];
        assert!(matches!(
            Client::new(&config, &Reference::parse("ubuntu").unwrap(), &creds),
            Err(RegistryError::NotAllowed { .. })
        ));
    }

    #[test]
    fn unreachable_registry_is_one_clear_error() {
        let config = Config::default();
        // Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
        let r = Reference::parse("127.0.0.1:9/nothing").unwrap();
        let c = Client::new(&config, &r, &Credentials::none()).unwrap();
        let err = c.manifest("latest").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.starts_with("cannot reach registry 127.0.0.1:9"), "{err}");
    }
}
