//! A small but real registry for the store's tests: the distribution API's GET
//! endpoints over HTTP on loopback, serving images built in memory, with the faults a
//! real network has (corrupted and truncated blobs, redirects to another host) and
//! basic or bearer-token auth. Test-only.

use flate2::write::GzEncoder;
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Fault {
    /// Flip one byte of the blob (same length).
    Corrupt,
    /// Send the headers for the whole blob, then half the bytes, then close.
    Truncate { times: u32 },
}

#[derive(Clone)]
pub enum Auth {
    Basic(String, String),
    Bearer(String, String),
}

#[derive(Default)]
pub struct State {
    manifests: HashMap<String, (String, Vec<u8>)>,
    blobs: HashMap<String, Vec<u8>>,
    pub faults: HashMap<String, Fault>,
    pub auth: Option<Auth>,
    /// Blob requests redirect to this base URL (another "host").
    pub redirect_blobs_to: Option<String>,
    /// Authorization headers seen, by path.
    pub seen_auth: Vec<(String, Option<String>)>,
    pub blob_gets: usize,
    /// Every manifest request answers this status line and body instead.
    pub manifest_answer: Option<(String, String)>,
}

pub struct TestRegistry {
    pub addr: String,
    pub state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl TestRegistry {
    pub fn start() -> TestRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st, a) = (state.clone(), stop.clone(), addr.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
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
        TestRegistry { addr, state, stop }
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Publishes an image of gzip layers (given as tar bytes) as `repo:tag`; returns layer digests.
    pub fn image(&self, repo: &str, tag: &str, tars: &[Vec<u8>]) -> Vec<String> {
        let mut st = self.lock();
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for t in tars {
            let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(t).unwrap();
            let gz = enc.finish().unwrap();
            diff_ids.push(digest(t));
            let d = digest(&gz);
            layers.push(format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{d}","size":{}}}"#, gz.len()));
            st.blobs.insert(d, gz);
        }
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["A=1"],"Cmd":["/bin/sh"],"WorkingDir":"/w"}},"rootfs":{{"type":"layers","diff_ids":[{}]}}}}"#,
            diff_ids.iter().map(|d| format!("\"{d}\"")).collect::<Vec<_>>().join(",")
        );
        let cd = digest(config.as_bytes());
        st.blobs.insert(cd.clone(), config.clone().into_bytes());
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{}}},"layers":[{}]}}"#,
            config.len(),
            layers.join(",")
        );
        let md = digest(manifest.as_bytes());
        let entry = ("application/vnd.oci.image.manifest.v1+json".to_string(), manifest.into_bytes());
        st.manifests.insert(format!("{repo}:{md}"), entry.clone());
        st.manifests.insert(format!("{repo}:{tag}"), entry);
        layers.iter().map(|l| l.split('"').nth(7).unwrap().to_string()).collect()
    }
}

impl TestRegistry {
    /// Serves this registry's blobs under `/storage/` of `other` too (a "blob store" host).
    pub fn share_blobs_with(&self, other: &TestRegistry) {
        let blobs = self.lock().blobs.clone();
        other.lock().blobs.extend(blobs);
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
    }
}

pub fn digest(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

/// A tar of regular files, for test layers.
pub fn tar_files(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_size(data.len() as u64);
        h.set_entry_type(tar::EntryType::Regular);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
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

fn serve(mut conn: TcpStream, state: &Mutex<State>, addr: &str) -> std::io::Result<()> {
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
    let mut st = state.lock().unwrap();
    st.seen_auth.push((path.clone(), authorization.clone()));
    let b64 = |u: &str, p: &str| {
        use base64::Engine;
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}")))
    };
    if let Some(query) = path.strip_prefix("/token?") {
        let ok = match &st.auth {
            Some(Auth::Bearer(u, p)) => authorization.as_deref() == Some(&b64(u, p)),
            _ => false,
        };
        let _ = query;
        drop(st);
        return if ok {
            respond(&mut conn, "200 OK", &[("Content-Type", "application/json".into())], br#"{"token":"good-token"}"#)
        } else {
            respond(&mut conn, "401 Unauthorized", &[], b"{}")
        };
    }
    // Anywhere in the path: a redirect may put more in front (`http://a\@b/storage/...`).
    if let Some((_, rest)) = path.split_once("/storage/") {
        let body = st.blobs.get(rest).cloned();
        drop(st);
        return match body {
            Some(b) => respond(&mut conn, "200 OK", &[], &b),
            None => respond(&mut conn, "404 Not Found", &[], b""),
        };
    }
    let Some(api) = path.strip_prefix("/v2/") else { return respond(&mut conn, "404 Not Found", &[], b"") };
    let authorized = match &st.auth {
        None => true,
        Some(Auth::Basic(u, p)) => authorization.as_deref() == Some(&b64(u, p)),
        Some(Auth::Bearer(..)) => authorization.as_deref() == Some("Bearer good-token"),
    };
    if !authorized {
        let challenge = match &st.auth {
            Some(Auth::Basic(..)) => r#"Basic realm="test""#.to_string(),
            _ => format!(r#"Bearer realm="http://{addr}/token",service="test""#),
        };
        drop(st);
        return respond(&mut conn, "401 Unauthorized", &[("WWW-Authenticate", challenge)], br#"{"errors":[{"code":"UNAUTHORIZED"}]}"#);
    }
    let (repo_kind, reference) = api.rsplit_once('/').unwrap_or(("", ""));
    let (repo, kind) = repo_kind.rsplit_once('/').unwrap_or(("", ""));
    match kind {
        "manifests" if st.manifest_answer.is_some() => {
            let (status, body) = st.manifest_answer.clone().unwrap_or_default();
            drop(st);
            respond(&mut conn, &status, &[], body.as_bytes())
        }
        "manifests" => {
            let found = st.manifests.get(&format!("{repo}:{reference}")).cloned();
            drop(st);
            match found {
                Some((ct, body)) => respond(&mut conn, "200 OK", &[("Content-Type", ct)], &body),
                None => respond(&mut conn, "404 Not Found", &[], br#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#),
            }
        }
        "blobs" => {
            st.blob_gets += 1;
            if let Some(base) = st.redirect_blobs_to.clone() {
                drop(st);
                return respond(&mut conn, "307 Temporary Redirect", &[("Location", format!("{base}/storage/{reference}"))], b"");
            }
            let Some(mut body) = st.blobs.get(reference).cloned() else {
                drop(st);
                return respond(&mut conn, "404 Not Found", &[], br#"{"errors":[{"code":"BLOB_UNKNOWN"}]}"#);
            };
            match st.faults.get(reference).copied() {
                Some(Fault::Corrupt) => {
                    let mid = body.len() / 2;
                    body[mid] ^= 0xff;
                }
                Some(Fault::Truncate { times }) if times > 0 => {
                    st.faults.insert(reference.to_string(), Fault::Truncate { times: times - 1 });
                    drop(st);
                    let head = format!("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", body.len());
                    conn.write_all(head.as_bytes())?;
                    conn.write_all(&body[..body.len() / 2])?;
                    return conn.shutdown(std::net::Shutdown::Both);
                }
                _ => {}
            }
            drop(st);
            respond(&mut conn, "200 OK", &[], &body)
        }
        _ => {
            drop(st);
            let mut sink = Vec::new();
            let _ = reader.take(0).read_to_end(&mut sink);
            respond(&mut conn, "200 OK", &[], b"{}")
        }
    }
}
