//! Registry credentials and authentication challenges: the user's Docker
//! `config.json` (`$DOCKER_CONFIG` or `~/.docker`, credential helpers included), the
//! admin's credentials file (same form), and `WWW-Authenticate` parsing for
//! bearer-token and basic auth. The user's config is read, and their helpers run, with
//! the user's own rights only: by the calling process when it is that user, else by a
//! child that has become the job's user ([`JobUser`]); root never opens a path the user
//! controls. A helper that does not answer within the admin's
//! `credential_helper_timeout` is killed, and so is a child running as the user that
//! does not answer within `user_child_timeout`, so neither can hold a root pull (and
//! the store's locks) for long. Owns reading credentials; never sends them anywhere
//! (the client decides where).

use base64::Engine;
use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read registry credentials {path}: {source} (fix its permissions, or remove it)")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("registry credentials {path} are not valid JSON: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("credential helper docker-credential-{helper} failed for {registry}: {why}")]
    Helper { helper: String, registry: String, why: String },
    #[error("cannot read the registry logins of user {uid} in {dir}: {source}")]
    UserConfig { uid: u32, dir: PathBuf, source: crate::identity::UserError },
    #[error("DOCKER_CONFIG={0} is not an absolute path: give the directory holding config.json by its full path")]
    RelativeDockerConfig(PathBuf),
    #[error(transparent)]
    AsUser(#[from] crate::identity::UserError),
}

/// A user name and password (or identity token) for one registry.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Login {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Login({}, <hidden>)", self.username)
    }
}

#[derive(serde::Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(serde::Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default, rename = "identitytoken")]
    identity_token: Option<String>,
}

/// The job user root pulls for (`berth container create --user`): whose Docker config
/// is read, as them, and where their credential helpers are found.
#[derive(Debug, Clone)]
pub struct JobUser {
    pub ids: crate::identity::Credentials,
    /// The job's `DOCKER_CONFIG`; else `~/.docker` of the user's passwd home.
    pub docker_config: Option<PathBuf>,
    /// The job's `PATH`, where `docker-credential-*` helpers are looked up; else a
    /// system default.
    pub path: Option<OsString>,
}

/// The environment a credential helper runs with: the caller's own, or the job user's.
enum HelperEnv {
    Inherited,
    Job { home: Option<PathBuf>, path: OsString },
}

/// Where credentials come from, in order: the user's Docker config, then the admin's file.
#[derive(Default)]
pub struct Credentials {
    job_user: Option<JobUser>,
    sources: Vec<DockerConfig>,
    bounds: Bounds,
}

/// How long helpers and a child running as the job user may take (the admin's
/// `credential_helper_timeout` and `user_child_timeout`).
#[derive(Clone, Copy)]
struct Bounds {
    helper: Duration,
    child: Duration,
}

impl Default for Bounds {
    fn default() -> Bounds {
        Bounds::of(&crate::config::Config::default())
    }
}

impl Bounds {
    fn of(config: &crate::config::Config) -> Bounds {
        Bounds { helper: config.credential_helper_timeout(), child: config.user_child_timeout() }
    }
}

impl Credentials {
    /// No credentials at all (anonymous pulls only).
    pub fn none() -> Credentials {
        Credentials::default()
    }

    /// The calling user's Docker config (if any) and the admin's credentials file
    /// (`credentials_file`, if set).
    pub fn load(config: &crate::config::Config) -> Result<Credentials, AuthError> {
        let mut sources = Vec::new();
        let user_dir = std::env::var_os("DOCKER_CONFIG")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")));
        if let Some(dir) = user_dir {
            if let Some(c) = read_config(&dir.join("config.json"))? {
                sources.push(c);
            }
        }
        sources.extend(admin_source(config.credentials_file.as_deref())?);
        Ok(Credentials { job_user: None, sources, bounds: Bounds::of(config) })
    }

    /// A job user's Docker config, read at lookup time by a child running as that user,
    /// then the admin's credentials file (root's, read here).
    pub fn load_for(user: JobUser, config: &crate::config::Config) -> Result<Credentials, AuthError> {
        if let Some(dir) = &user.docker_config {
            if !dir.is_absolute() {
                return Err(AuthError::RelativeDockerConfig(dir.clone()));
            }
        }
        let sources = admin_source(config.credentials_file.as_deref())?.into_iter().collect();
        Ok(Credentials { job_user: Some(user), sources, bounds: Bounds::of(config) })
    }

    /// Parses one config.json text (for tests and for callers holding the text).
    pub fn from_json(text: &str) -> Result<Credentials, serde_json::Error> {
        Ok(Credentials { job_user: None, sources: vec![serde_json::from_str(text)?], bounds: Bounds::default() })
    }

    /// The login for a registry name as written in references (`docker.io`, `host:5000`).
    pub fn lookup(&self, registry: &str) -> Result<Option<Login>, AuthError> {
        let keys = keys_for(registry);
        if let Some(user) = &self.job_user {
            if let Some(login) = lookup_as(user, &keys, self.bounds)? {
                return Ok(Some(login));
            }
        }
        for source in &self.sources {
            if let Some(login) = lookup_in(source, &keys, &HelperEnv::Inherited, self.bounds.helper)? {
                return Ok(Some(login));
            }
        }
        Ok(None)
    }
}

fn admin_source(admin_file: Option<&Path>) -> Result<Option<DockerConfig>, AuthError> {
    admin_file.map(read_config).transpose().map(Option::flatten)
}

/// One config's login for a registry: its helper for that registry, its `auths`
/// entry, then its default helper (`credsStore`), as Docker orders them.
fn lookup_in(source: &DockerConfig, keys: &[String], env: &HelperEnv, timeout: Duration) -> Result<Option<Login>, AuthError> {
    if let Some(helper) = keys.iter().find_map(|k| source.cred_helpers.get(k)) {
        return run_helper(helper, &keys[0], env, timeout);
    }
    for key in keys {
        if let Some(login) = source.auths.get(key).and_then(entry_login) {
            return Ok(Some(login));
        }
    }
    match &source.creds_store {
        Some(store) => run_helper(store, &keys[0], env, timeout),
        None => Ok(None),
    }
}

/// Looks the login up in the job user's Docker config, in a child that has become the
/// user: the config (and any symlink to it) is opened, and helpers run, with the
/// user's rights only. A child that does not answer in time (the user stopped it, or
/// their config is a FIFO) is killed; the helpers it runs get no more time than it has.
fn lookup_as(user: &JobUser, keys: &[String], bounds: Bounds) -> Result<Option<Login>, AuthError> {
    let home = user.ids.home();
    let Some(dir) = user.docker_config.clone().or_else(|| home.as_ref().map(|h| h.join(".docker"))) else {
        return Ok(None);
    };
    let env = HelperEnv::Job {
        home,
        path: user.path.clone().unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
    };
    let helper = bounds.helper.min(bounds.child);
    let answer = user
        .ids
        .run_as_user(bounds.child, || -> Result<Option<Login>, String> {
            let config = read_config(&dir.join("config.json")).map_err(|e| e.to_string())?;
            match config {
                Some(config) => lookup_in(&config, keys, &env, helper).map_err(|e| e.to_string()),
                None => Ok(None),
            }
        })
        .map_err(|source| AuthError::UserConfig { uid: user.ids.uid, dir: dir.clone(), source })?;
    answer.map_err(|why| AuthError::AsUser(crate::identity::UserError::AsUser { uid: user.ids.uid, why }))
}

fn read_config(path: &Path) -> Result<Option<DockerConfig>, AuthError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| AuthError::Parse { path: path.to_path_buf(), source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(AuthError::Read { path: path.to_path_buf(), source }),
    }
}

/// The keys Docker uses in `auths` for a registry: Hub has its historical URL.
fn keys_for(registry: &str) -> Vec<String> {
    if registry == crate::reference::DOCKER_HUB || registry == "registry-1.docker.io" || registry == "index.docker.io" {
        vec![
            "https://index.docker.io/v1/".into(),
            "index.docker.io".into(),
            "docker.io".into(),
            "registry-1.docker.io".into(),
        ]
    } else {
        vec![registry.to_string(), format!("https://{registry}"), format!("http://{registry}"), format!("https://{registry}/v1/")]
    }
}

fn entry_login(entry: &AuthEntry) -> Option<Login> {
    if let Some(token) = &entry.identity_token {
        let username = entry.username.clone().unwrap_or_else(|| "<token>".into());
        return Some(Login { username, password: token.clone() });
    }
    if let Some(auth) = &entry.auth {
        let decoded = base64::engine::general_purpose::STANDARD.decode(auth.trim()).ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (u, p) = text.split_once(':')?;
        return Some(Login { username: u.into(), password: p.into() });
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) => Some(Login { username: u.clone(), password: p.clone() }),
        _ => None,
    }
}

/// Runs `docker-credential-<helper> get` with the server URL on stdin, as Docker does
/// (the docker-credential-helpers protocol: JSON `Username`/`Secret` on stdout); killed
/// with its process group when it has not answered within `timeout`.
fn run_helper(helper: &str, server: &str, env: &HelperEnv, timeout: Duration) -> Result<Option<Login>, AuthError> {
    let err = |why: String| AuthError::Helper { helper: helper.into(), registry: server.into(), why };
    if !helper.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.')) {
        return Err(err("the helper name is not a plain program name".into()));
    }
    let program = format!("docker-credential-{helper}");
    let mut command = Command::new(&program);
    if let HelperEnv::Job { home, path } = env {
        // Only what a helper needs of the job's environment; root's stays out.
        let resolved = std::env::split_paths(path)
            .map(|d| d.join(&program))
            .find(|p| p.is_file())
            .ok_or_else(|| err(format!("{program} is not in the job's PATH ({})", path.to_string_lossy())))?;
        command = Command::new(resolved);
        command.env_clear().env("PATH", path);
        if let Some(home) = home {
            command.env("HOME", home).current_dir(home);
        } else {
            command.current_dir("/");
        }
    }
    let child = command
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: on timeout, what it started goes with it.
        .process_group(0)
        .spawn()
        .map_err(|e| err(e.to_string()))?;
    let out = finish_within(child, server.as_bytes(), timeout).map_err(err)?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        if text.contains("credentials not found") {
            return Ok(None);
        }
        return Err(err(text.trim().to_string()));
    }
    #[derive(serde::Deserialize)]
    struct HelperOut {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let parsed: HelperOut = serde_json::from_slice(&out.stdout).map_err(|e| err(e.to_string()))?;
    Ok(Some(Login { username: parsed.username, password: parsed.secret }))
}

/// Feeds `input` to a child and collects its output; kills its process group when it
/// has not closed its output and exited within `timeout` (a helper that never exits,
/// or leaves a process holding its output open).
fn finish_within(mut child: Child, input: &[u8], timeout: Duration) -> Result<Output, String> {
    let deadline = Instant::now() + timeout;
    let give_up = |child: &mut Child| {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
        format!("no answer within {} s (killed)", timeout.as_secs())
    };
    // Writing and reading may each block on the helper: each on a thread of its own.
    if let Some(mut stdin) = child.stdin.take() {
        let input = input.to_vec();
        std::thread::spawn(move || stdin.write_all(&input));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let pipes: [Option<Box<dyn Read + Send>>; 2] =
        [child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>), child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>)];
    for (i, pipe) in pipes.into_iter().enumerate() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            let _ = tx.send((i, bytes));
        });
    }
    drop(tx);
    let mut outs = [Vec::new(), Vec::new()];
    for _ in 0..2 {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((i, bytes)) => outs[i] = bytes,
            Err(_) => return Err(give_up(&mut child)),
        }
    }
    let [stdout, stderr] = outs;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok(Output { status, stdout, stderr });
        }
        if Instant::now() >= deadline {
            return Err(give_up(&mut child));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The `Authorization` value for basic auth.
pub fn basic(login: &Login) -> String {
    let raw = format!("{}:{}", login.username, login.password);
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq, Eq)]
pub enum Challenge {
    Bearer { realm: String, service: Option<String>, scope: Option<String> },
    Basic,
}

/// Parses `Bearer realm="...",service="...",scope="..."` or `Basic realm="..."`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params = HashMap::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let key = key.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        params.insert(key, value.to_string());
        s = next.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge::Bearer {
        realm: params.remove("realm")?,
        service: params.remove("service"),
        scope: params.remove("scope"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_and_basic_challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/ubuntu:pull".into()),
            }
        );
        assert_eq!(parse_challenge(r#"Basic realm="Registry Realm""#), Some(Challenge::Basic));
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge(r#"Bearer service="x""#), None);
    }

    #[test]
    fn finds_logins_by_registry_key_forms() {
        let creds = Credentials::from_json(
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNz"},
                        "reg.example:5000":{"username":"a","password":"b"},
                        "https://other.example":{"auth":"eDp5OnoK"}}}"#,
        )
        .unwrap();
        assert_eq!(creds.lookup("docker.io").unwrap(), Some(Login { username: "user".into(), password: "pass".into() }));
        assert_eq!(creds.lookup("reg.example:5000").unwrap().unwrap().username, "a");
        assert_eq!(creds.lookup("other.example").unwrap().unwrap().password, "y:z\n");
        assert_eq!(creds.lookup("nobody.example").unwrap(), None);
        assert_eq!(basic(&Login { username: "user".into(), password: "pass".into() }), "Basic dXNlcjpwYXNz");
    }

    #[test]
    fn a_job_users_config_is_read_with_their_rights_only() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root to switch users");
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("berth-auth-as-user-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let config = dir.join("config.json");
        std::fs::write(&config, r#"{"auths":{"reg.example:5000":{"username":"a","password":"b"}}}"#).unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
        let nobody = crate::identity::Credentials { uid: 65534, gid: 65534, groups: vec![] };
        let user = JobUser { ids: nobody, docker_config: Some(dir.clone()), path: None };
        let creds = Credentials::load_for(user.clone(), &crate::config::Config::default()).unwrap();
        let err = creds.lookup("reg.example:5000").unwrap_err().to_string();
        assert!(err.contains("cannot read registry credentials") && err.contains("Permission denied") && err.ends_with("(as user 65534)"), "{err}");
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(creds.lookup("reg.example:5000").unwrap().unwrap().username, "a");
        assert_eq!(creds.lookup("other.example").unwrap(), None);
        let relative = JobUser { docker_config: Some("rel/dir".into()), ..user };
        assert!(matches!(Credentials::load_for(relative, &crate::config::Config::default()), Err(AuthError::RelativeDockerConfig(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_helper_that_never_answers_or_keeps_its_output_open_is_killed_at_the_timeout() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("berth-helper-timeout-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let helpers = [
            ("hang", "#!/bin/sh\nexec /bin/sleep 100\n"),
            ("lingers", "#!/bin/sh\nread -r server\n/bin/sleep 100 &\necho '{\"Username\":\"u\",\"Secret\":\"s\"}'\n"),
            ("answers", "#!/bin/sh\nread -r server\necho \"{\\\"Username\\\":\\\"u\\\",\\\"Secret\\\":\\\"$server\\\"}\"\n"),
        ];
        for (name, script) in helpers {
            let path = dir.join(format!("docker-credential-{name}"));
            std::fs::write(&path, script).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let env = HelperEnv::Job { home: None, path: dir.clone().into_os_string() };
        for name in ["hang", "lingers"] {
            let started = Instant::now();
            let err = run_helper(name, "r.example", &env, Duration::from_secs(1)).unwrap_err().to_string();
            assert!(err.contains(&format!("docker-credential-{name} failed for r.example: no answer within 1 s")), "{err}");
            assert!(started.elapsed() < Duration::from_secs(10), "{name} took {:?}", started.elapsed());
        }
        let login = run_helper("answers", "r.example", &env, Duration::from_secs(10)).unwrap().unwrap();
        assert_eq!((login.username.as_str(), login.password.as_str()), ("u", "r.example"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_helper_names_that_are_not_programs() {
        let creds = Credentials::from_json(r#"{"credHelpers":{"r.example":"../../bin/sh"}}"#).unwrap();
        assert!(creds.lookup("r.example").is_err());
    }
}
