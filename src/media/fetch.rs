//! The rules for fetching media a user names by URL, one module for the command line, batch
//! and `serve` alike (vLLM's CVE history is the checklist: SSRF, its redirect and DNS
//! rebinding bypasses).
//!
//! - `http(s)://` only, every redirect hop checked again (scheme, domain list, address), at most
//!   [`MAX_REDIRECTS`] hops.
//! - The host's resolved addresses are checked, and the connection goes to the address that was
//!   checked (the check runs inside the HTTP client's resolver), so a DNS answer that changes
//!   between check and connect cannot reach a refused address. Loopback, private, link-local,
//!   shared (CGNAT), metadata and other non-public ranges are refused unless
//!   [`FetchPolicy::allow_private`] (`--allow-private-media-urls`).
//! - `file://` URLs (server requests) only below [`FetchPolicy::local_root`], after resolving
//!   `..` and symbolic links.
//! - Per-modality timeouts and byte caps (the caller passes the cap).
//!
//! The hub downloader (`HF_ENDPOINT`) is operator configuration and does not come through here.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};

use super::Modality;
use crate::error::{Error, Result};

/// Redirects a media URL may take.
pub const MAX_REDIRECTS: usize = 5;

/// What a media fetch may reach. The default refuses non-public addresses and `file://`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchPolicy {
    /// Allow loopback, private, link-local and metadata addresses (`--allow-private-media-urls`).
    pub allow_private: bool,
    /// When set, URL hosts must be one of these (lowercase; `--allowed-media-domains`).
    pub allowed_domains: Option<Vec<String>>,
    /// `file://` URLs are served only below this directory (canonical; serve's
    /// `--allowed-local-media-path`). `None`: refused.
    pub local_root: Option<PathBuf>,
}

impl FetchPolicy {
    /// Anything goes: for tests against a loopback server.
    pub fn permissive() -> Self {
        Self {
            allow_private: true,
            ..Self::default()
        }
    }

    /// Sets the `file://` root, resolving it (it must be an existing directory).
    pub fn with_local_root(mut self, dir: &Path) -> Result<Self> {
        let canon = dir.canonicalize().map_err(|e| {
            Error::usage(format!(
                "--allowed-local-media-path {}: {e} (expected an existing directory)",
                dir.display()
            ))
        })?;
        if !canon.is_dir() {
            return Err(Error::usage(format!(
                "--allowed-local-media-path {}: not a directory (expected an existing directory)",
                dir.display()
            )));
        }
        self.local_root = Some(canon);
        Ok(self)
    }

    /// Parses `--allowed-media-domains a.org,b.org`.
    pub fn with_domains(mut self, list: &str) -> Result<Self> {
        let domains: Vec<String> = list
            .split(',')
            .map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase())
            .filter(|d| !d.is_empty())
            .collect();
        if domains.is_empty() || domains.iter().any(|d| d.contains(['/', ':', '@', ' '])) {
            return Err(Error::usage(format!(
                "--allowed-media-domains {list:?}: expected comma-separated host names such as \
                 upload.wikimedia.org,example.org"
            )));
        }
        self.allowed_domains = Some(domains);
        Ok(self)
    }

    /// Checks a URL before each request: http(s) scheme and the domain list. `shown` names the
    /// URL the user gave (errors name it, not the hop).
    fn check_url(&self, url: &str, shown: &str) -> Result<()> {
        let lower: String = url.chars().take(8).collect::<String>().to_ascii_lowercase();
        if !(lower.starts_with("http://") || lower.starts_with("https://")) {
            return Err(Error::input(
                shown,
                format!("{} is not http(s)", redact_userinfo(url)),
                "an http:// or https:// URL (redirects included)",
            ));
        }
        let Some(domains) = &self.allowed_domains else {
            return Ok(());
        };
        let host = host_of(url).unwrap_or_default();
        if !domains.contains(&host) {
            return Err(Error::input(
                shown,
                format!("host {host:?} is not an allowed media domain"),
                format!("a URL on {}", domains.join(", ")),
            ));
        }
        Ok(())
    }

    /// The local path a `file://` URL names, if it lies below the allowed directory (after
    /// resolving `..` and links).
    pub fn local_file(&self, url: &str) -> Result<PathBuf> {
        let shown = abbreviate(url);
        let Some(root) = &self.local_root else {
            return Err(Error::input(
                shown,
                "file:// URLs are not allowed here",
                "an http(s):// or data: URL (the server accepts file:// only below \
                 --allowed-local-media-path)",
            ));
        };
        let rest = &url["file://".len()..];
        // `file:///p` and `file://localhost/p`; another host is not this machine.
        let path = match rest.strip_prefix("localhost") {
            Some(p) if p.starts_with('/') => p,
            _ if rest.starts_with('/') => rest,
            _ => {
                return Err(Error::input(
                    shown,
                    "a file:// URL must name an absolute local path",
                    "file:///absolute/path",
                ))
            }
        };
        let decoded = percent_decode(path)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| {
                Error::input(&shown, "malformed percent escapes", "a valid file:// URL")
            })?;
        let outside = || {
            Error::input(
                &shown,
                "is not below the allowed local media directory",
                format!("a file under {}", root.display()),
            )
        };
        let canon = Path::new(&decoded).canonicalize().map_err(|e| {
            // Do not reveal whether paths outside the root exist.
            if Path::new(&decoded).starts_with(root) {
                Error::input(&shown, e.to_string(), "an existing file")
            } else {
                outside()
            }
        })?;
        if !canon.starts_with(root) {
            return Err(outside());
        }
        Ok(canon)
    }
}

/// The lowercase host of an http(s) URL (IPv6 without brackets).
fn host_of(url: &str) -> Option<String> {
    let uri: ureq::http::Uri = url.parse().ok()?;
    let host = uri.host()?;
    Some(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .trim_end_matches('.')
            .to_ascii_lowercase(),
    )
}

/// Why an address is refused, or `None` for a public unicast address.
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    let why = match (a, b) {
        (127, _) => "a loopback address",
        (10, _) | (192, 168) => "a private address",
        (172, 16..=31) => "a private address",
        (169, 254) => "a link-local (cloud metadata) address",
        (100, 64..=127) => "a shared (carrier-grade NAT, cloud metadata) address",
        (0, _) => "an unspecified address",
        (192, 0) if c == 0 || c == 2 => "a reserved address",
        (198, 18..=19) => "a reserved address",
        (198, 51) if c == 100 => "a reserved address",
        (203, 0) if c == 113 => "a reserved address",
        (224..=255, _) => "a multicast, broadcast or reserved address",
        _ => return None,
    };
    Some(why)
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return non_public_v4(v4);
    }
    let seg = ip.segments();
    if ip.is_loopback() {
        return Some("a loopback address");
    }
    if ip.is_unspecified() {
        return Some("an unspecified address");
    }
    // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) carry an IPv4 address that gets reached.
    if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6] == [0, 0, 0, 0] {
        let v4 = Ipv4Addr::new(
            (seg[6] >> 8) as u8,
            seg[6] as u8,
            (seg[7] >> 8) as u8,
            seg[7] as u8,
        );
        return non_public_v4(v4);
    }
    if seg[0] == 0x2002 {
        let v4 = Ipv4Addr::new(
            (seg[1] >> 8) as u8,
            seg[1] as u8,
            (seg[2] >> 8) as u8,
            seg[2] as u8,
        );
        return non_public_v4(v4);
    }
    match seg[0] {
        0xfc00..=0xfdff => Some("a private (unique local, cloud metadata) address"),
        0xfe80..=0xfebf => Some("a link-local address"),
        0xff00..=0xffff => Some("a multicast address"),
        // IPv4-compatible (::a.b.c.d), deprecated and never public.
        0 if seg[1..6] == [0, 0, 0, 0, 0] => Some("a reserved address"),
        _ => None,
    }
}

/// The address check, run as the HTTP client's resolver so that the connection goes to the
/// very addresses that were checked.
#[derive(Debug)]
struct CheckedResolver {
    allow_private: bool,
}

/// A refused address, carried through the HTTP client's error.
#[derive(Debug)]
struct Refused {
    addr: SocketAddr,
    why: &'static str,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "resolves to {}, {}", self.addr.ip(), self.why)
    }
}

impl std::error::Error for Refused {}

impl Resolver for CheckedResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> std::result::Result<ResolvedSocketAddrs, ureq::Error> {
        let addrs = DefaultResolver::default().resolve(uri, config, timeout)?;
        if !self.allow_private {
            // One refused address refuses the host: the client may try any of them.
            for addr in addrs.iter() {
                if let Some(why) = non_public(addr.ip()) {
                    return Err(ureq::Error::Other(Box::new(Refused { addr: *addr, why })));
                }
            }
        }
        Ok(addrs)
    }
}

fn refused_of(e: &ureq::Error) -> Option<&Refused> {
    match e {
        ureq::Error::Other(inner) => inner.downcast_ref::<Refused>(),
        _ => None,
    }
}

/// The environment variable that overrides the fetch timeout of `modality`.
pub fn fetch_timeout_var(modality: Modality) -> &'static str {
    match modality {
        Modality::Image => "MMLLM_IMAGE_FETCH_TIMEOUT",
        Modality::Video => "MMLLM_VIDEO_FETCH_TIMEOUT",
        Modality::Audio => "MMLLM_AUDIO_FETCH_TIMEOUT",
    }
}

/// The built-in fetch timeout of `modality` (images 5 s, video 30 s, audio 10 s).
pub fn default_fetch_timeout(modality: Modality) -> Duration {
    Duration::from_secs(match modality {
        Modality::Image => 5,
        Modality::Video => 30,
        Modality::Audio => 10,
    })
}

/// The whole-fetch timeout for a URL of `modality`: the `MMLLM_<MODALITY>_FETCH_TIMEOUT`
/// environment variable in seconds, else the default. An invalid value is a usage error.
pub fn fetch_timeout(modality: Modality) -> Result<Duration> {
    fetch_timeout_with(modality, &|name| std::env::var(name).ok())
}

/// [`fetch_timeout`] reading variables through `lookup` (testable without touching the
/// process environment).
pub fn fetch_timeout_with(
    modality: Modality,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Duration> {
    let var = fetch_timeout_var(modality);
    let Some(raw) = lookup(var) else {
        return Ok(default_fetch_timeout(modality));
    };
    let secs: Option<f64> = raw.trim().parse().ok();
    match secs {
        Some(s) if s.is_finite() && s > 0.0 && s < 1e9 => Ok(Duration::from_secs_f64(s)),
        _ => Err(Error::usage(format!(
            "{var}={raw:?} is not a timeout (expected a positive number of seconds, e.g. {var}={})",
            default_fetch_timeout(modality).as_secs()
        ))),
    }
}

fn format_secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{}", s as u64)
    } else {
        format!("{s}")
    }
}

/// Fetches `url` under `policy`: at most `cap` bytes within `timeout` (zero: no limit).
pub fn fetch_url(
    url: &str,
    modality: Modality,
    cap: u64,
    timeout: Duration,
    policy: &FetchPolicy,
) -> Result<Vec<u8>> {
    let shown = redact_userinfo(url);
    let timed_out = || {
        let secs = format_secs(timeout);
        Error::input(
            &shown,
            format!("fetch timed out after {secs} s"),
            format!(
                "a server that answers within {secs} s (raise the limit with {}=<seconds>)",
                fetch_timeout_var(modality)
            ),
        )
    };
    let expected = format!("a reachable {modality} URL");
    let refused = |r: &Refused| {
        Error::input(
            &shown,
            r.to_string(),
            "a URL on a public address (--allow-private-media-urls allows private ones)",
        )
    };
    let config = ureq::Agent::config_builder()
        // Zero means "no limit", for callers that resolved none.
        .timeout_global(Some(timeout).filter(|t| !t.is_zero()))
        .http_status_as_error(false)
        // Redirects are followed here, one hop at a time, so each target is checked.
        .max_redirects(0)
        .max_redirects_will_error(false)
        // A proxy would make the resolver check the proxy's address, not the target's.
        .proxy(None)
        .user_agent(concat!("mmllm/", env!("CARGO_PKG_VERSION")))
        .build();
    let agent = ureq::Agent::with_parts(
        config,
        ureq::unversioned::transport::DefaultConnector::new(),
        CheckedResolver {
            allow_private: policy.allow_private,
        },
    );
    let mut current = url.to_string();
    let mut hops = 0;
    let mut response = loop {
        policy.check_url(&current, &shown)?;
        let response = match agent.get(&current).call() {
            Ok(r) => r,
            Err(e) if is_timeout(&e) => return Err(timed_out()),
            Err(e) => match refused_of(&e) {
                Some(r) => return Err(refused(r)),
                None => return Err(Error::input(&shown, format!("fetch failed: {e}"), expected)),
            },
        };
        if !matches!(response.status().as_u16(), 301 | 302 | 303 | 307 | 308) {
            break response;
        }
        let Some(location) = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
        else {
            return Err(Error::input(
                &shown,
                format!("HTTP {} redirect without a Location", response.status()),
                format!("a {modality} URL that answers 200 OK"),
            ));
        };
        let next = crate::hub::join_url(&current, location);
        if !(next.starts_with("http://") || next.starts_with("https://")) {
            return Err(Error::input(
                &shown,
                format!(
                    "redirected to {}, which is not http(s)",
                    abbreviate(&redact_userinfo(&next))
                ),
                "redirects to http:// or https:// URLs only",
            ));
        }
        hops += 1;
        if hops > MAX_REDIRECTS {
            return Err(Error::input(
                &shown,
                format!("more than {MAX_REDIRECTS} redirects"),
                format!("a {modality} URL that answers within {MAX_REDIRECTS} redirects"),
            ));
        }
        current = next;
    };
    let status = response.status();
    if !status.is_success() {
        return Err(Error::input(
            &shown,
            format!("server answered HTTP {status}"),
            format!("a {modality} URL that answers 200 OK"),
        ));
    }
    if let Some(len) = response.body().content_length() {
        if len > cap {
            return Err(over_cap(shown, modality, cap));
        }
    }
    let mut reader = response.body_mut().as_reader();
    let bytes = match read_capped(&mut reader, cap) {
        Ok(b) => b,
        Err(e) if is_io_timeout(&e) => return Err(timed_out()),
        Err(e) => {
            return Err(Error::input(
                &shown,
                format!("download failed: {e}"),
                expected,
            ))
        }
    };
    if bytes.len() as u64 > cap {
        return Err(over_cap(shown, modality, cap));
    }
    Ok(bytes)
}

fn is_timeout(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Timeout(_) => true,
        ureq::Error::Io(io) => is_io_timeout(io),
        _ => false,
    }
}

/// ureq reports body-read timeouts as an `io::Error` wrapping its own `Timeout`.
fn is_io_timeout(e: &std::io::Error) -> bool {
    if matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    ) {
        return true;
    }
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<ureq::Error>())
        .is_some_and(is_timeout)
}

/// At most 60 characters of a URL, for errors (data: URLs can be megabytes long).
fn abbreviate(s: &str) -> String {
    if s.chars().count() <= 60 {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(60).collect::<String>())
    }
}

pub(crate) fn percent_decode(s: &str) -> std::result::Result<Vec<u8>, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(b) => out.push(b),
                None => return Err(format!("bad percent escape at byte {i}")),
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

pub(crate) fn over_cap(input: String, modality: Modality, cap: u64) -> Error {
    Error::input(
        input,
        format!(
            "larger than the {} cap for a {modality} input",
            human_bytes(cap)
        ),
        format!("a {modality} of at most {}", human_bytes(cap)),
    )
}

pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64;
    let mut unit = "bytes";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// Reads at most `cap + 1` bytes, so that "over the cap" is detectable without reading more.
pub(crate) fn read_capped(r: &mut dyn Read, cap: u64) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    r.take(cap.saturating_add(1)).read_to_end(&mut out)?;
    Ok(out)
}

/// A URL as errors and results may show it: a password (`user:secret@`) becomes `***`.
pub(crate) fn redact_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            let shown = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_string()
            };
            format!("{scheme}://{shown}@{host}{tail}")
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_ranges() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.100.100.200",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "::127.0.0.1",
        ] {
            let addr: IpAddr = ip.parse().unwrap();
            assert!(non_public(addr).is_some(), "{ip} must be refused");
        }
        for ip in [
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
        ] {
            let addr: IpAddr = ip.parse().unwrap();
            assert_eq!(non_public(addr), None, "{ip} is public");
        }
    }

    #[test]
    fn domains_are_exact_hosts() {
        let p = FetchPolicy::default()
            .with_domains("Example.org, cdn.example.org")
            .unwrap();
        assert!(p.check_url("https://example.org/a.png", "u").is_ok());
        assert!(p.check_url("https://CDN.example.org./a.png", "u").is_ok());
        assert!(p.check_url("https://evil.org/a.png", "u").is_err());
        assert!(p.check_url("https://example.org.evil.org/", "u").is_err());
        assert!(p.check_url("https://example.org@evil.org/", "u").is_err());
        assert!(FetchPolicy::default().with_domains(" , ").is_err());
    }
}
