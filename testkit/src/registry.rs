//! A fake registry: the distribution API's GETs over plain HTTP, serving images made
//! in memory, healthy or broken the ways real and hostile registries are (corrupt,
//! cut-off, endless and overlong answers, any status such as 429 or 503, redirects to
//! another host), with basic or bearer auth per repository and a log of every request.
//! It listens on an address of this process's network namespace or of another's (a
//! test host's), and stops when dropped. Knows nothing of berth.

use crate::image::{Image, MANIFEST};
use crate::layer::noise;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// The bearer token every fake registry's `/token` gives and every one takes.
pub const TOKEN: &str = "good-token";

/// What a repository asks of a client.
#[derive(Clone, Debug)]
pub enum Auth {
    /// Basic auth with this login.
    Basic(String, String),
    /// A bearer token from this registry's `/token`, which gives it for this basic login.
    Bearer(String, String),
    /// A bearer token from the token service at this realm (another host's).
    BearerFrom(String),
}

/// How a manifest or blob is answered instead of as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// One byte in the middle flipped (same length).
    Corrupt,
    /// The headers for the whole body, half of it, then the connection closes; so the
    /// next `times` requests, then it is served whole.
    Truncate { times: u32 },
    /// The body, then noise without end, with no length.
    Endless,
    /// The body and 1 MiB of noise after it, all in the length sent.
    Longer,
    /// This status line, content type and body.
    Answer { status: String, content_type: Option<String>, body: Vec<u8> },
}

/// What the registry serves, how, and what it was asked.
#[derive(Default)]
pub struct State {
    /// Manifests by `repository:tag` and `repository:digest`.
    manifests: HashMap<String, Vec<u8>>,
    /// Blobs by digest, of every repository.
    pub blobs: HashMap<String, Vec<u8>>,
    /// What each repository asks of a client; one not here asks nothing.
    pub auth: HashMap<String, Auth>,
    /// Each repository's manifests answered so.
    pub manifest_faults: HashMap<String, Fault>,
    /// Blobs answered so, by digest.
    pub faults: HashMap<String, Fault>,
    /// Each repository's blob requests redirected to `BASE/storage/DIGEST`, by base URL.
    pub redirect_blobs: HashMap<String, String>,
    /// Every request's path and `Authorization` header, in order.
    pub requests: Vec<(String, Option<String>)>,
    /// Blob requests under `/v2/`, redirected ones included.
    pub blob_gets: usize,
}

pub struct Registry {
    /// `IP:PORT` as it listens.
    pub addr: String,
    state: Arc<Mutex<State>>,
    listener: TcpListener,
    stop: Arc<AtomicBool>,
}

impl Registry {
    /// A registry on 127.0.0.1 of this process's network namespace.
    pub fn start() -> Registry {
        Registry::start_on("127.0.0.1", None)
    }

    /// A registry on `ip` (0.0.0.0: every address) of this process's network namespace,
    /// or of the one at `netns` (a test host's, e.g. `/run/netns/berth0-node1`).
    pub fn start_on(ip: &str, netns: Option<&Path>) -> Registry {
        let bind = (ip.to_string(), netns.map(Path::to_path_buf));
        // Only this short-lived thread moves: the socket stays the namespace's.
        let listener = std::thread::spawn(move || {
            if let Some(ns) = &bind.1 {
                let fd = std::fs::File::open(ns).unwrap_or_else(|e| panic!("{}: {e}", ns.display()));
                nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("enter the network namespace");
            }
            TcpListener::bind((bind.0.as_str(), 0)).unwrap()
        })
        .join()
        .expect("the registry's socket");
        let addr = listener.local_addr().unwrap().to_string();
        let (state, stop) = (Arc::new(Mutex::new(State::default())), Arc::new(AtomicBool::new(false)));
        let (accepting, s, st, a) = (listener.try_clone().unwrap(), state.clone(), stop.clone(), addr.clone());
        std::thread::spawn(move || {
            for conn in accepting.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (s, a) = (s.clone(), a.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &s, &a);
                });
            }
        });
        Registry { addr, state, listener, stop }
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().unwrap().port()
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Serves the image as `repo:tag` (and by its manifest's digest), its blobs with it.
    pub fn publish(&self, repo: &str, tag: &str, image: &Image) {
        let mut st = self.lock();
        for b in image.layers.iter().map(|l| &l.blob).chain([&image.config]) {
            st.blobs.insert(b.digest.clone(), b.bytes.clone());
        }
        st.manifests.insert(format!("{repo}:{tag}"), image.manifest.bytes.clone());
        st.manifests.insert(format!("{repo}:{}", image.manifest.digest), image.manifest.bytes.clone());
    }

    /// Serves this registry's blobs under `/storage/` of `other` too (a "blob store" host).
    pub fn share_blobs_with(&self, other: &Registry) {
        let blobs = self.lock().blobs.clone();
        other.lock().blobs.extend(blobs);
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accepting thread wherever the socket is, another namespace too.
        let _ = nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

fn respond(conn: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)
}

/// The request's path and its `Authorization` header.
fn read_request(conn: &TcpStream) -> std::io::Result<(String, Option<String>)> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut authorization = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                authorization = Some(v.trim().to_string());
            }
        }
    }
    Ok((path, authorization))
}

/// The repository a token request's `scope=repository:NAME:pull` names ("" for none).
fn scope_repository(query: &str) -> String {
    let scope = query.split('&').find_map(|p| p.strip_prefix("scope=")).unwrap_or("");
    let mut bytes = Vec::new();
    let mut rest = scope.as_bytes();
    while let Some((&c, tail)) = rest.split_first() {
        match tail.get(..2).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()) {
            Some(v) if c == b'%' => {
                bytes.push(v);
                rest = &tail[2..];
            }
            _ => {
                bytes.push(c);
                rest = tail;
            }
        }
    }
    let scope = String::from_utf8_lossy(&bytes).into_owned();
    scope.strip_prefix("repository:").and_then(|s| s.rsplit_once(':')).map_or(String::new(), |(name, _)| name.to_string())
}

/// The fault to answer with now, counting down a `Truncate`.
fn take_fault(faults: &mut HashMap<String, Fault>, key: &str) -> Option<Fault> {
    let fault = faults.get_mut(key)?;
    match fault {
        Fault::Truncate { times: 0 } => None,
        Fault::Truncate { times } => {
            *times -= 1;
            Some(Fault::Truncate { times: *times })
        }
        other => Some(other.clone()),
    }
}

/// Sends `body` as the fault says (as it is without one).
fn send(conn: &mut TcpStream, content_type: Option<&str>, mut body: Vec<u8>, fault: Option<Fault>) -> std::io::Result<()> {
    let headers: Vec<(&str, String)> = content_type.map(|t| ("Content-Type", t.to_string())).into_iter().collect();
    match fault {
        None => respond(conn, "200 OK", &headers, &body),
        Some(Fault::Corrupt) => {
            let mid = body.len() / 2;
            body[mid] ^= 0xff;
            respond(conn, "200 OK", &headers, &body)
        }
        Some(Fault::Truncate { .. }) => {
            conn.write_all(format!("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes())?;
            conn.write_all(&body[..body.len() / 2])?;
            conn.shutdown(std::net::Shutdown::Both)
        }
        Some(Fault::Endless) => {
            let mut head = "HTTP/1.1 200 OK\r\nConnection: close\r\n".to_string();
            for (k, v) in &headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            conn.write_all(format!("{head}\r\n").as_bytes())?;
            conn.write_all(&body)?;
            let more = noise(65536, 3);
            loop {
                conn.write_all(&more)?;
            }
        }
        Some(Fault::Longer) => {
            body.extend(noise(1 << 20, 5));
            respond(conn, "200 OK", &headers, &body)
        }
        Some(Fault::Answer { status, content_type, body }) => {
            let headers: Vec<(&str, String)> = content_type.map(|t| ("Content-Type", t)).into_iter().collect();
            respond(conn, &status, &headers, &body)
        }
    }
}

fn serve(mut conn: TcpStream, state: &Mutex<State>, addr: &str) -> std::io::Result<()> {
    // An endless answer to a client that stopped reading ends here.
    conn.set_write_timeout(Some(Duration::from_secs(60)))?;
    let (path, authorization) = read_request(&conn)?;
    let mut st = state.lock().unwrap();
    st.requests.push((path.clone(), authorization.clone()));
    if let Some(query) = path.strip_prefix("/token") {
        let ok = match st.auth.get(&scope_repository(query.trim_start_matches('?'))) {
            None => true,
            Some(Auth::Bearer(u, p)) => authorization == Some(basic(u, p)),
            Some(_) => false,
        };
        drop(st);
        return if ok {
            respond(&mut conn, "200 OK", &[("Content-Type", "application/json".into())], format!(r#"{{"token":"{TOKEN}"}}"#).as_bytes())
        } else {
            respond(&mut conn, "401 Unauthorized", &[], b"{}")
        };
    }
    // Anywhere in the path: a redirect may put more in front (`http://a\@b/storage/...`).
    if let Some((_, digest)) = path.split_once("/storage/") {
        let body = st.blobs.get(digest).cloned();
        drop(st);
        return match body {
            Some(b) => respond(&mut conn, "200 OK", &[], &b),
            None => respond(&mut conn, "404 Not Found", &[], b""),
        };
    }
    if path == "/v2/" {
        drop(st);
        return respond(&mut conn, "200 OK", &[], b"{}");
    }
    let parts = path.strip_prefix("/v2/").and_then(|api| api.rsplit_once('/')).and_then(|(rk, reference)| Some((rk.rsplit_once('/')?, reference)));
    let Some(((repo, kind), reference)) = parts else {
        drop(st);
        return respond(&mut conn, "404 Not Found", &[], b"");
    };
    let auth = st.auth.get(repo).cloned();
    let authorized = match &auth {
        None => true,
        Some(Auth::Basic(u, p)) => authorization == Some(basic(u, p)),
        Some(Auth::Bearer(..) | Auth::BearerFrom(_)) => authorization == Some(format!("Bearer {TOKEN}")),
    };
    if !authorized {
        drop(st);
        let challenge = match auth {
            Some(Auth::Basic(..)) => r#"Basic realm="test""#.to_string(),
            Some(Auth::BearerFrom(realm)) => format!(r#"Bearer realm="{realm}",service="test""#),
            _ => format!(r#"Bearer realm="http://{addr}/token",service="test""#),
        };
        return respond(&mut conn, "401 Unauthorized", &[("WWW-Authenticate", challenge)], br#"{"errors":[{"code":"UNAUTHORIZED"}]}"#);
    }
    match kind {
        "manifests" => {
            let fault = take_fault(&mut st.manifest_faults, repo);
            let found = st.manifests.get(&format!("{repo}:{reference}")).cloned();
            drop(st);
            match (found, fault) {
                (_, Some(answer @ Fault::Answer { .. })) => send(&mut conn, None, Vec::new(), Some(answer)),
                (Some(body), fault) => send(&mut conn, Some(MANIFEST), body, fault),
                (None, _) => respond(&mut conn, "404 Not Found", &[], br#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#),
            }
        }
        "blobs" => {
            st.blob_gets += 1;
            if let Some(base) = st.redirect_blobs.get(repo).cloned() {
                drop(st);
                return respond(&mut conn, "307 Temporary Redirect", &[("Location", format!("{base}/storage/{reference}"))], b"");
            }
            let fault = take_fault(&mut st.faults, reference);
            let found = st.blobs.get(reference).cloned();
            drop(st);
            match found {
                Some(body) => send(&mut conn, None, body, fault),
                None => respond(&mut conn, "404 Not Found", &[], br#"{"errors":[{"code":"BLOB_UNKNOWN"}]}"#),
            }
        }
        _ => {
            drop(st);
            respond(&mut conn, "404 Not Found", &[], b"")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_requests_name_their_repository_percent_encoded() {
        assert_eq!(scope_repository("service=test&scope=repository%3Alibrary%2Fubuntu%3Apull"), "library/ubuntu");
        assert_eq!(scope_repository("scope=repository:app:pull"), "app");
        assert_eq!(scope_repository("service=test"), "");
    }

    #[test]
    fn a_dropped_registry_stops_listening() {
        let reg = Registry::start();
        let addr = reg.addr.clone();
        assert!(TcpStream::connect(&addr).is_ok());
        drop(reg);
        std::thread::sleep(Duration::from_millis(100));
        assert!(TcpStream::connect(&addr).is_err());
    }
}
