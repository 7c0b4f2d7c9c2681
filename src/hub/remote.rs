//! The download side of the Hub: `HEAD resolve/<revision>/<file>` for the commit and ETag
//! (following redirects only while they stay on the Hub), the bytes into `blobs/<etag>` with a
//! progress bar, the `snapshots/<commit>/<file>` pointer and the `refs/<revision>` file, as
//! `huggingface_hub` writes them. The token only ever goes to the Hub's own hosts.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context};

use super::{HubOptions, DEFAULT_ENDPOINT};
use crate::error::{Error, Result};

/// How to fetch files missing from a cached snapshot.
#[derive(Clone)]
pub(super) struct Remote {
    /// `…/models--org--name`.
    repo_cache: PathBuf,
    pub(super) repo_id: String,
    pub(super) offline: bool,
    pub(super) endpoint: String,
    token: Option<String>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("repo_cache", &self.repo_cache)
            .field("offline", &self.offline)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// Outcome of asking the Hub for one file.
pub(super) enum Fetched {
    Found {
        path: PathBuf,
        commit: String,
    },
    /// The file does not exist at that revision (the repository does).
    Missing,
}

/// File metadata from the Hub's `resolve` endpoint.
struct Metadata {
    commit: String,
    etag: String,
    size: Option<u64>,
    /// Where the bytes are: the same URL, or a CDN link for LFS/Xet files.
    location: String,
}

impl Remote {
    /// `repo_id` on `opts`' endpoint, cached in `repo_cache` (`…/models--org--name`).
    pub(super) fn new(repo_cache: PathBuf, repo_id: &str, opts: &HubOptions) -> Remote {
        Remote {
            repo_cache,
            repo_id: repo_id.to_string(),
            offline: opts.offline,
            endpoint: opts.endpoint.clone(),
            token: opts.token.clone(),
        }
    }

    fn agent(&self, follow_redirects: bool) -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(if follow_redirects { 10 } else { 0 })
            .max_redirects_will_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            // Multi-GB downloads: no global timeout, but a stalled connection must fail.
            .timeout_per_read(Some(Duration::from_secs(60)))
            .user_agent(concat!("mmllm/", env!("CARGO_PKG_VERSION")))
            .build()
            .into()
    }

    fn url(&self, revision: &str, name: &str) -> String {
        format!(
            "{}/{}/resolve/{}/{}",
            self.endpoint,
            self.repo_id,
            quote(revision, false),
            quote(name, true)
        )
    }

    /// The endpoint and the Hub's own hosts, where the token may go (huggingface_hub's rule).
    fn is_hub_origin(&self, url: &str) -> bool {
        let o = origin(url);
        [self.endpoint.as_str(), DEFAULT_ENDPOINT, "https://hf.co"]
            .iter()
            .any(|e| origin(e) == o)
    }

    fn auth_for(&self, url: &str) -> Option<String> {
        // Signed CDN links carry their own credentials; the token stays on the Hub.
        let token = self.token.as_ref()?;
        self.is_hub_origin(url).then(|| format!("Bearer {token}"))
    }

    fn network_error(&self, name: &str, e: ureq::Error) -> Error {
        Error::Runtime(anyhow!(
            "{}/{name}: could not reach {} ({e}); set HF_HUB_OFFLINE=1 to use only the cache",
            self.repo_id,
            self.endpoint
        ))
    }

    /// HEAD `resolve/<revision>/<name>`, following redirects only while they stay on the Hub,
    /// as huggingface_hub's `get_hf_file_metadata` does.
    fn metadata(&self, name: &str, revision: &str) -> Result<Option<Metadata>> {
        let agent = self.agent(false);
        let mut url = self.url(revision, name);
        for _ in 0..5 {
            let mut req = agent.head(&url).header("Accept-Encoding", "identity");
            if let Some(auth) = self.auth_for(&url) {
                req = req.header("Authorization", auth);
            }
            let resp = req.call().map_err(|e| self.network_error(name, e))?;
            let status = resp.status().as_u16();
            let header = |h: &str| {
                resp.headers()
                    .get(h)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let redirect = (300..400).contains(&status);
            let location = header("location")
                .filter(|_| redirect)
                .map(|loc| join_url(&url, &loc));
            if let Some(target) = &location {
                // Redirects that stay on the Hub (renamed repos) are followed; one to a CDN
                // carries the file's metadata itself and is where the bytes are.
                if origin(target) == origin(&url) || self.is_hub_origin(target) {
                    url = target.clone();
                    continue;
                }
            }
            let repo_rev = format!("{}@{revision}", self.repo_id);
            match status {
                200..=399 => {}
                404 => {
                    return match header("x-error-code").as_deref() {
                        Some("RepoNotFound") => Err(Error::input(
                            repo_rev,
                            format!("repository not found on {}", self.endpoint),
                            "an existing repository (private ones need HF_TOKEN)",
                        )),
                        Some("RevisionNotFound") => Err(Error::input(
                            repo_rev,
                            "revision not found",
                            "an existing branch, tag or commit",
                        )),
                        _ => Ok(None),
                    }
                }
                401 => {
                    return Err(Error::input(
                        repo_rev,
                        format!("repository not found on {} or access denied", self.endpoint),
                        "an existing repository; private or gated ones need HF_TOKEN",
                    ))
                }
                403 => {
                    return Err(Error::input(
                        repo_rev,
                        "access denied (gated model?)",
                        "a token (HF_TOKEN) of an account that accepted the model's terms",
                    ))
                }
                _ => {
                    return Err(Error::Runtime(anyhow!(
                        "{}/{name}: {} answered HTTP {status} for {url}",
                        self.repo_id,
                        self.endpoint
                    )))
                }
            }
            let commit = header("x-repo-commit").ok_or_else(|| {
                anyhow!(
                    "{}/{name}: the answer from {url} lacks the X-Repo-Commit header \
                     (is HF_ENDPOINT a Hugging Face Hub?)",
                    self.repo_id
                )
            })?;
            let etag = header("x-linked-etag")
                .or_else(|| header("etag"))
                .map(|e| normalize_etag(&e))
                .ok_or_else(|| {
                    anyhow!(
                        "{}/{name}: the answer from {url} lacks an ETag",
                        self.repo_id
                    )
                })?;
            let safe = |s: &str| {
                !s.is_empty()
                    && !s.starts_with('.')
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            };
            if !safe(&commit) || !safe(&etag) {
                return Err(Error::Runtime(anyhow!(
                    "{}/{name}: unexpected commit {commit:?} or ETag {etag:?} from {url}",
                    self.repo_id
                )));
            }
            let size = header("x-linked-size")
                .or_else(|| header("content-length").filter(|_| !redirect))
                .and_then(|s| s.parse().ok());
            let location = location.unwrap_or(url);
            return Ok(Some(Metadata {
                commit,
                etag,
                size,
                location,
            }));
        }
        Err(Error::Runtime(anyhow!(
            "{}/{name}: too many redirects from {}",
            self.repo_id,
            self.endpoint
        )))
    }

    /// Brings `name` at `revision` into the cache: blob, snapshot symlink, ref.
    pub(super) fn download(&self, name: &str, revision: &str) -> Result<Fetched> {
        let Some(meta) = self.metadata(name, revision)? else {
            return Ok(Fetched::Missing);
        };
        let blob = self.repo_cache.join("blobs").join(&meta.etag);
        if !blob.is_file() {
            self.fetch_blob(name, &meta, &blob)?;
        }
        let pointer = self
            .repo_cache
            .join("snapshots")
            .join(&meta.commit)
            .join(name);
        link_pointer(&blob, &pointer, name)?;
        if revision != meta.commit {
            self.write_ref(revision, &meta.commit)?;
        }
        Ok(Fetched::Found {
            path: pointer,
            commit: meta.commit,
        })
    }

    fn fetch_blob(&self, name: &str, meta: &Metadata, blob: &Path) -> Result<()> {
        let dir = blob
            .parent()
            .ok_or_else(|| anyhow!("blob path {} has no parent", blob.display()))?;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the cache folder {}", dir.display()))?;
        // A unique temporary name: concurrent downloads of the same blob never share a file,
        // and the final name only ever holds a complete blob (rename is atomic).
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tmp = dir.join(format!(
            "{}.{}-{nanos:08x}.incomplete",
            meta.etag,
            std::process::id()
        ));
        let result = self.fetch_to(name, meta, &tmp);
        match result {
            Ok(()) => std::fs::rename(&tmp, blob)
                .with_context(|| format!("moving {} to {}", tmp.display(), blob.display()))?,
            Err(e) => {
                // Best effort: the error that matters is the download's.
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        }
        Ok(())
    }

    fn fetch_to(&self, name: &str, meta: &Metadata, tmp: &Path) -> Result<()> {
        let agent = self.agent(true);
        let mut req = agent
            .get(&meta.location)
            .header("Accept-Encoding", "identity");
        if let Some(auth) = self.auth_for(&meta.location) {
            req = req.header("Authorization", auth);
        }
        let mut resp = req.call().map_err(|e| self.network_error(name, e))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(Error::Runtime(anyhow!(
                "{}/{name}: download answered HTTP {status}",
                self.repo_id
            )));
        }
        let expected_len = resp.body().content_length().or(meta.size);
        let mut file =
            std::fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let bar = progress_bar(&format!("{}/{name}", self.repo_id), expected_len);
        let mut reader = resp.body_mut().as_reader();
        let mut buf = vec![0u8; 256 * 1024];
        let mut written: u64 = 0;
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| anyhow!("{}/{name}: download interrupted: {e}", self.repo_id))?;
            if n == 0 {
                break;
            }
            file.write_all(&buf[..n])
                .with_context(|| format!("writing {}", tmp.display()))?;
            written += n as u64;
            if let Some(bar) = &bar {
                bar.set_position(written);
            }
        }
        file.sync_all()
            .with_context(|| format!("writing {}", tmp.display()))?;
        if let Some(bar) = &bar {
            bar.finish_and_clear();
        }
        if let Some(len) = expected_len {
            if len != written {
                return Err(Error::Runtime(anyhow!(
                    "{}/{name}: download truncated ({written} of {len} bytes)",
                    self.repo_id
                )));
            }
        }
        Ok(())
    }

    /// Points `refs/<revision>` at `commit` (atomically, by rename).
    fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        let path = self.repo_cache.join("refs").join(revision);
        if std::fs::read_to_string(&path).is_ok_and(|c| c == commit) {
            return Ok(());
        }
        let dir = path
            .parent()
            .ok_or_else(|| anyhow!("ref path {} has no parent", path.display()))?;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the cache folder {}", dir.display()))?;
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("ref"),
            std::process::id()
        ));
        // No trailing newline: huggingface_hub compares the file's text to the hash.
        std::fs::write(&tmp, commit).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Whether an earlier 404 for `name` at `commit` was recorded by [`Remote::mark_missing`]
    /// (or by huggingface_hub), so nobody asks the Hub again.
    pub(super) fn known_missing(&self, commit: &str, name: &str) -> bool {
        self.missing_marker(commit, name).is_file()
    }

    fn missing_marker(&self, commit: &str, name: &str) -> PathBuf {
        self.repo_cache.join(".no_exist").join(commit).join(name)
    }

    /// Records a 404 the way huggingface_hub does (`.no_exist/<commit>/<name>`); best effort.
    pub(super) fn mark_missing(&self, commit: &str, name: &str) {
        let marker = self.missing_marker(commit, name);
        if let Some(dir) = marker.parent() {
            if std::fs::create_dir_all(dir).is_ok() {
                let _ = std::fs::File::create(&marker);
            }
        }
    }
}

/// Creates `snapshots/<commit>/<name>` as a relative symlink to the blob, as huggingface_hub
/// does (`../../blobs/<etag>`, one more `../` per sub-folder of `name`).
fn link_pointer(blob: &Path, pointer: &Path, name: &str) -> Result<()> {
    let dir = pointer
        .parent()
        .ok_or_else(|| anyhow!("snapshot path {} has no parent", pointer.display()))?;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the cache folder {}", dir.display()))?;
    let depth = Path::new(name).components().count() + 1;
    let mut target = PathBuf::new();
    for _ in 0..depth {
        target.push("..");
    }
    target.push("blobs");
    if let Some(etag) = blob.file_name() {
        target.push(etag);
    }
    // A stale or dangling pointer is replaced.
    if std::fs::symlink_metadata(pointer).is_ok() {
        std::fs::remove_file(pointer)
            .with_context(|| format!("replacing {}", pointer.display()))?;
    }
    #[cfg(unix)]
    std::os::unix::fs::symlink(&target, pointer)
        .with_context(|| format!("linking {} to {}", pointer.display(), target.display()))?;
    // Without symlinks huggingface_hub copies the blob; so do we.
    #[cfg(not(unix))]
    std::fs::copy(blob, pointer)
        .with_context(|| format!("copying {} to {}", blob.display(), pointer.display()))?;
    Ok(())
}

/// `W/"abc"` or `"abc"` -> `abc`, like huggingface_hub's `_normalize_etag`.
fn normalize_etag(etag: &str) -> String {
    etag.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

/// Percent-encodes like Python's `urllib.parse.quote` (`/` kept only when `keep_slash`).
fn quote(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `scheme://host:port` of a URL (lower-cased, default port made explicit), for origin checks.
fn origin(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let scheme = scheme.to_ascii_lowercase();
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority
        .rsplit('@')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    // A port is what follows the last ':' unless that ':' is inside an IPv6 literal.
    let has_port = host_port
        .rsplit_once(':')
        .is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if has_port {
        format!("{scheme}://{host_port}")
    } else {
        let port = match scheme.as_str() {
            "https" => 443,
            "http" => 80,
            _ => 0,
        };
        format!("{scheme}://{host_port}:{port}")
    }
}

/// Resolves a `Location` header against the URL that sent it.
pub fn join_url(base: &str, location: &str) -> String {
    if location.contains("://") {
        return location.to_string();
    }
    let (scheme, rest) = base.split_once("://").unwrap_or(("http", base));
    if let Some(net_path) = location.strip_prefix("//") {
        return format!("{scheme}://{net_path}");
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if location.starts_with('/') {
        return format!("{scheme}://{authority}{location}");
    }
    let path = &rest[authority.len()..];
    let path = path.split(['?', '#']).next().unwrap_or("");
    let dir = path.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
    format!("{scheme}://{authority}{dir}/{location}")
}

/// A byte progress bar on stderr, only when stderr is a terminal.
fn progress_bar(label: &str, len: Option<u64>) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = match len {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::no_length(),
    };
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    let template = if len.is_some() {
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
    } else {
        "{msg} {bytes} {bytes_per_sec}"
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(format!("downloading {label}"));
    Some(bar)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_and_quoting() {
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(normalize_etag("\"abc\""), "abc");
        assert_eq!(quote("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(quote("sub dir/a.json", true), "sub%20dir/a.json");
        assert_eq!(origin("HTTP://Host:8/a/b?c"), "http://host:8");
        assert_eq!(origin("https://u@hf.co/x"), "https://hf.co:443");
        assert_eq!(origin("http://[::1]/x"), "http://[::1]:80");
        assert_eq!(join_url("http://h:1/a/b?q", "/c"), "http://h:1/c");
        assert_eq!(join_url("http://h:1/a/b", "c"), "http://h:1/a/c");
        assert_eq!(join_url("https://h/a", "//cdn/x"), "https://cdn/x");
        assert_eq!(join_url("https://h/a", "http://cdn/x"), "http://cdn/x");
    }
}
