//! Which proxy a request goes through, by Docker's rules (Go's
//! `httpproxy.FromEnvironment`, which dockerd and containerd use for pulls):
//! `HTTPS_PROXY` for https URLs, `HTTP_PROXY` for http URLs (upper case first, then
//! lower case; an empty value is unset), no fallback from one to the other and no
//! `ALL_PROXY`; `NO_PROXY` is a comma-separated list of `*`, host names (matching the
//! name and its subdomains; `.name` and `*.name` only subdomains), IP addresses and
//! CIDR ranges, each optionally with `:port`; `localhost` and loopback addresses never
//! go through a proxy. Owns the decision only; never opens a connection.

use std::net::IpAddr;

/// The proxy settings of the environment.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProxyEnv {
    pub http: Option<String>,
    pub https: Option<String>,
    no_proxy: Vec<Bypass>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Bypass {
    All,
    /// `.example.com` (subdomains) with `also_self` for `example.com` itself.
    Domain { suffix: String, also_self: bool, port: Option<u16> },
    Ip { ip: IpAddr, port: Option<u16> },
    Net { base: IpAddr, prefix: u8 },
}

impl ProxyEnv {
    /// From this process's environment.
    pub fn from_env() -> ProxyEnv {
        let get = |upper: &str, lower: &str| {
            [upper, lower].iter().find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
        };
        ProxyEnv::new(get("HTTP_PROXY", "http_proxy"), get("HTTPS_PROXY", "https_proxy"), get("NO_PROXY", "no_proxy").as_deref())
    }

    pub fn new(http: Option<String>, https: Option<String>, no_proxy: Option<&str>) -> ProxyEnv {
        // As Go: a proxy given without a scheme is an HTTP proxy.
        let with_scheme = |p: String| if p.contains("://") { p } else { format!("http://{p}") };
        ProxyEnv {
            http: http.map(with_scheme),
            https: https.map(with_scheme),
            no_proxy: no_proxy.unwrap_or("").split(',').filter_map(parse_bypass).collect(),
        }
    }

    /// The proxy URL for a request to `scheme://host[:port]`, or `None` to go direct.
    pub fn for_url(&self, url: &str) -> Option<&str> {
        let (scheme, rest) = url.split_once("://")?;
        let proxy = match scheme.to_ascii_lowercase().as_str() {
            "http" => self.http.as_deref()?,
            "https" => self.https.as_deref()?,
            _ => return None,
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let (host, port) = split_host_port(authority);
        let port = port.unwrap_or(if scheme.eq_ignore_ascii_case("https") { 443 } else { 80 });
        (!self.bypasses(&host.to_ascii_lowercase(), port)).then_some(proxy)
    }

    fn bypasses(&self, host: &str, port: u16) -> bool {
        let ip = host.parse::<IpAddr>().ok();
        if host == "localhost" || ip.is_some_and(|ip| ip.is_loopback()) {
            return true;
        }
        self.no_proxy.iter().any(|b| match b {
            Bypass::All => true,
            Bypass::Ip { ip: want, port: p } => ip == Some(*want) && p.is_none_or(|p| p == port),
            Bypass::Net { base, prefix } => ip.is_some_and(|ip| in_net(ip, *base, *prefix)),
            Bypass::Domain { suffix, also_self, port: p } => {
                (host.ends_with(suffix.as_str()) || (*also_self && host == &suffix[1..])) && p.is_none_or(|p| p == port)
            }
        })
    }
}

fn parse_bypass(entry: &str) -> Option<Bypass> {
    let entry = entry.trim().to_ascii_lowercase();
    if entry.is_empty() {
        return None;
    }
    if entry == "*" {
        return Some(Bypass::All);
    }
    if let Some((net, prefix)) = entry.split_once('/') {
        let base = net.parse::<IpAddr>().ok()?;
        let prefix = prefix.parse::<u8>().ok().filter(|p| *p <= if base.is_ipv4() { 32 } else { 128 })?;
        return Some(Bypass::Net { base, prefix });
    }
    if let Ok(ip) = entry.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        return Some(Bypass::Ip { ip, port: None });
    }
    let (host, port) = split_host_port(&entry);
    let port = match port {
        Some(p) => Some(p),
        // `name:junk`: Go drops entries it cannot parse.
        None if host.len() != entry.len() => return None,
        None => None,
    };
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(Bypass::Ip { ip, port });
    }
    let host = host.strip_prefix('*').unwrap_or(host);
    if host.is_empty() || host == "." {
        return None;
    }
    let (suffix, also_self) = if host.starts_with('.') { (host.to_string(), false) } else { (format!(".{host}"), true) };
    Some(Bypass::Domain { suffix, also_self, port })
}

/// `host:port`, `[v6]:port`, `host` or `v6` -> host (without brackets) and port.
fn split_host_port(authority: &str) -> (&str, Option<u16>) {
    if let Some(rest) = authority.strip_prefix('[') {
        if let Some((host, after)) = rest.split_once(']') {
            return (host, after.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    match authority.rsplit_once(':') {
        // More than one colon and no brackets: a bare IPv6 address.
        Some((host, _)) if host.contains(':') => (authority, None),
        Some((host, port)) => match port.parse() {
            Ok(p) => (host, Some(p)),
            Err(_) => (host, None),
        },
        None => (authority, None),
    }
}

fn in_net(ip: IpAddr, base: IpAddr, prefix: u8) -> bool {
    match (ip, base) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) };
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix)) };
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(no_proxy: &str) -> ProxyEnv {
        ProxyEnv::new(Some("proxy:3128".into()), Some("http://sproxy:3128".into()), Some(no_proxy))
    }

    #[test]
    fn each_scheme_has_its_own_proxy_and_none_falls_back() {
        let e = env("");
        assert_eq!(e.for_url("http://reg.example:5000/v2/"), Some("http://proxy:3128"));
        assert_eq!(e.for_url("https://reg.example/v2/"), Some("http://sproxy:3128"));
        let only_http = ProxyEnv::new(Some("http://p:1".into()), None, None);
        assert_eq!(only_http.for_url("https://reg.example/v2/"), None);
        assert_eq!(only_http.for_url("http://reg.example/v2/"), Some("http://p:1"));
    }

    #[test]
    fn localhost_and_loopback_are_never_proxied() {
        let e = env("");
        for url in ["http://localhost:5000/v2/", "http://127.0.0.1:5000/v2/", "http://127.8.9.1/", "https://[::1]:5000/v2/"] {
            assert_eq!(e.for_url(url), None, "{url}");
        }
    }

    #[test]
    fn no_proxy_matches_as_go_does() {
        let e = env(" example.com, .sub.test ,*.star.test,10.1.0.0/16, 192.0.2.7, ported.test:5000, [2001:db8::1]");
        let direct = [
            "https://example.com/",
            "https://a.b.example.com/",
            "https://x.sub.test/",
            "https://x.star.test/",
            "http://10.1.200.3:5000/",
            "http://192.0.2.7:8080/",
            "http://ported.test:5000/",
            "http://[2001:db8::1]:5000/",
            "http://EXAMPLE.COM/",
        ];
        for url in direct {
            assert_eq!(e.for_url(url), None, "{url} should bypass");
        }
        let proxied = [
            "https://notexample.com/",
            "https://sub.test/",
            "https://star.test/",
            "http://10.2.0.1/",
            "http://192.0.2.8/",
            "http://ported.test:5001/",
            "http://ported.test/",
        ];
        for url in proxied {
            assert!(e.for_url(url).is_some(), "{url} should go through the proxy");
        }
        assert_eq!(env("*").for_url("https://anything.example/"), None);
        assert!(env("").for_url("https://anything.example/").is_some());
    }
}
