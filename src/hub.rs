//! Model resolution: `--model` (alias | Hugging Face repo id | local directory) becomes a
//! [`ModelDir`] whose files are on disk. Owns the Hugging Face cache layout, written exactly as
//! `huggingface_hub` writes it (`models--org--name/{refs,blobs,snapshots}`) so that Python tools
//! and mmllm share downloads, plus offline mode and downloads with a progress bar.
//! Must not import `models`, `engine`, `cli` or `app`: families receive a `ModelDir`.

use std::collections::BTreeSet;
use std::io::{IsTerminal, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context};

use crate::error::{Error, Result};

/// What a model directory must hold, for error messages.
const EXPECTED_MODEL_DIR: &str = "a model directory holding config.json, model.safetensors \
     (or model.safetensors.index.json and its shards), tokenizer.json and the processor config \
     (preprocessor_config.json / processor_config.json)";

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where and how to reach the Hugging Face Hub and its local cache.
#[derive(Clone)]
pub struct HubOptions {
    /// `HF_HUB_OFFLINE=1`: use the cache only, never the network.
    pub offline: bool,
    /// `$HF_ENDPOINT` without a trailing slash (default `https://huggingface.co`).
    pub endpoint: String,
    /// Sent as `Authorization: Bearer …` to the endpoint (never to other hosts).
    pub token: Option<String>,
    /// The hub cache root (the folder holding `models--org--name`).
    pub cache_dir: PathBuf,
}

impl std::fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubOptions")
            .field("offline", &self.offline)
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("cache_dir", &self.cache_dir)
            .finish()
    }
}

impl HubOptions {
    /// Reads the same environment variables as `huggingface_hub`.
    pub fn from_env() -> Result<HubOptions> {
        Self::from_lookup(&|name| std::env::var(name).ok())
    }

    /// [`HubOptions::from_env`] with variables read through `lookup` (testable without
    /// touching the process environment). Cache root: `$HF_HUB_CACHE`, else
    /// `$HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`,
    /// else `~/.cache/huggingface/hub`. Token: `$HF_TOKEN`, else `$HUGGING_FACE_HUB_TOKEN`,
    /// else the file `$HF_TOKEN_PATH` (default `$HF_HOME/token`) that `hf auth login` writes.
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<HubOptions> {
        let get = |name: &str| lookup(name).filter(|v| !v.is_empty());
        let home = || -> Result<PathBuf> {
            get("HOME").map(PathBuf::from).ok_or_else(|| {
                Error::usage(
                    "cannot locate the Hugging Face cache: HOME is not set \
                     (expected HF_HUB_CACHE, HF_HOME or HOME)",
                )
            })
        };
        let expand = |v: String| -> Result<PathBuf> {
            match v.strip_prefix("~/") {
                Some(rest) => Ok(home()?.join(rest)),
                None if v == "~" => home(),
                None => Ok(PathBuf::from(v)),
            }
        };
        let hf_home = match get("HF_HOME") {
            Some(v) => expand(v)?,
            None => match get("XDG_CACHE_HOME") {
                Some(v) => expand(v)?.join("huggingface"),
                None => home()?.join(".cache").join("huggingface"),
            },
        };
        let cache_dir = match get("HF_HUB_CACHE").or_else(|| get("HUGGINGFACE_HUB_CACHE")) {
            Some(v) => expand(v)?,
            None => hf_home.join("hub"),
        };
        let truthy = |name: &str| {
            get(name).is_some_and(|v| {
                matches!(
                    v.trim().to_ascii_uppercase().as_str(),
                    "1" | "ON" | "YES" | "TRUE"
                )
            })
        };
        let offline = truthy("HF_HUB_OFFLINE") || truthy("TRANSFORMERS_OFFLINE");
        let endpoint = get("HF_ENDPOINT")
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
            .trim_end_matches('/')
            .to_string();
        let token = match get("HF_TOKEN").or_else(|| get("HUGGING_FACE_HUB_TOKEN")) {
            Some(t) => Some(t),
            None => {
                let path = match get("HF_TOKEN_PATH") {
                    Some(v) => expand(v)?,
                    None => hf_home.join("token"),
                };
                // A missing or unreadable token file just means anonymous access.
                std::fs::read_to_string(path).ok()
            }
        };
        let token = token
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        Ok(HubOptions {
            offline,
            endpoint,
            token,
            cache_dir,
        })
    }
}

/// A resolved model: a directory whose files are (or can be brought) on disk.
#[derive(Debug, Clone)]
pub struct ModelDir {
    /// The local directory, or the cache snapshot `…/models--org--name/snapshots/<commit>`.
    pub root: PathBuf,
    /// `org/name` when the model came from the Hub (directly or through an alias).
    pub repo_id: Option<String>,
    /// The requested revision (branch, tag or commit; `main` unless `@revision` was given).
    pub revision: Option<String>,
    /// The commit the snapshot belongs to.
    pub commit: Option<String>,
    remote: Option<Remote>,
}

/// How to fetch files missing from a cached snapshot.
#[derive(Clone)]
struct Remote {
    /// `…/models--org--name`.
    repo_cache: PathBuf,
    repo_id: String,
    offline: bool,
    endpoint: String,
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

/// Resolves `--model`: an alias, an existing directory (which must hold `config.json`), or a
/// repo id `org/name[@revision]` looked up in the Hugging Face cache. A cached revision is used
/// as is, without network; an uncached one has its `config.json` downloaded to learn the
/// commit (unless offline, which is then an error). An alias wins over a same-named directory
/// in the working directory (write `./llava` for the directory); `org/name` that exists as a
/// directory is that directory, as in transformers.
pub fn resolve(model: &str, aliases: &[(&str, &str)], opts: &HubOptions) -> Result<ModelDir> {
    if model.is_empty() {
        return Err(Error::input(
            "--model",
            "empty model name",
            expected_model(aliases),
        ));
    }
    let explicit_path = looks_like_path(model);
    // A malformed `@revision` is reported below, after an existing directory had its chance.
    if let (false, Ok((name, revision))) = (explicit_path, split_revision(model)) {
        if let Some((_, repo)) = aliases
            .iter()
            .find(|(alias, _)| alias.eq_ignore_ascii_case(name))
        {
            return resolve_repo(repo, revision, opts);
        }
    }
    let path = Path::new(model);
    if path.exists() {
        return local_dir(model, path);
    }
    if explicit_path {
        return Err(Error::input(
            model,
            "no such directory",
            "an existing model directory holding config.json",
        ));
    }
    let (name, revision) = split_revision(model)?;
    if is_repo_id(name) {
        return resolve_repo(name, revision, opts);
    }
    Err(Error::input(
        model,
        "not a known alias, a Hugging Face repo id or an existing directory",
        expected_model(aliases),
    ))
}

fn expected_model(aliases: &[(&str, &str)]) -> String {
    let names: Vec<&str> = aliases.iter().map(|(a, _)| *a).collect();
    format!(
        "an alias ({}), a Hugging Face repo id such as org/name[@revision], or a directory \
         holding config.json",
        names.join(", ")
    )
}

/// Arguments that can only mean a filesystem path.
fn looks_like_path(model: &str) -> bool {
    model.starts_with('/')
        || model.starts_with('.')
        || model.starts_with('~')
        || model.contains('\\')
        || model.ends_with('/')
        || model.matches('/').count() > 1
}

fn split_revision(model: &str) -> Result<(&str, Option<&str>)> {
    match model.split_once('@') {
        None => Ok((model, None)),
        Some((name, rev)) if !rev.is_empty() && !name.is_empty() => {
            let bad = rev
                .split('/')
                .any(|part| part.is_empty() || part == "." || part == "..");
            if bad {
                return Err(Error::input(
                    model,
                    "invalid revision",
                    "a branch, tag or commit after @, e.g. org/name@main",
                ));
            }
            Ok((name, Some(rev)))
        }
        Some(_) => Err(Error::input(
            model,
            "empty name or revision around @",
            "org/name@revision",
        )),
    }
}

/// `org/name` with the Hub's allowed characters.
fn is_repo_id(s: &str) -> bool {
    let Some((org, name)) = s.split_once('/') else {
        return false;
    };
    let ok = |part: &str| {
        !part.is_empty()
            && part.len() <= 96
            && part != "."
            && part != ".."
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    ok(org) && ok(name)
}

fn local_dir(model: &str, path: &Path) -> Result<ModelDir> {
    if !path.is_dir() {
        return Err(Error::input(
            model,
            "is a file, not a directory",
            EXPECTED_MODEL_DIR,
        ));
    }
    if !path.join("config.json").is_file() {
        return Err(Error::input(
            model,
            "has no config.json",
            EXPECTED_MODEL_DIR,
        ));
    }
    Ok(ModelDir {
        root: path.to_path_buf(),
        repo_id: None,
        revision: None,
        commit: None,
        remote: None,
    })
}

/// `models--org--name`, as `huggingface_hub.file_download.repo_folder_name` spells it.
pub fn repo_folder_name(repo_id: &str) -> String {
    format!("models--{}", repo_id.replace('/', "--"))
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn resolve_repo(repo_id: &str, revision: Option<&str>, opts: &HubOptions) -> Result<ModelDir> {
    let revision = revision.unwrap_or("main");
    let repo_cache = opts.cache_dir.join(repo_folder_name(repo_id));
    let remote = Remote {
        repo_cache: repo_cache.clone(),
        repo_id: repo_id.to_string(),
        offline: opts.offline,
        endpoint: opts.endpoint.clone(),
        token: opts.token.clone(),
    };
    let cached_commit = if is_commit_hash(revision) {
        Some(revision.to_string())
    } else {
        read_ref(&repo_cache, revision)?
    };
    let commit = match cached_commit {
        Some(c) => c,
        None if opts.offline => {
            return Err(Error::input(
                format!("{repo_id}@{revision}"),
                format!(
                    "not in the Hugging Face cache (looked for {}) and HF_HUB_OFFLINE=1 \
                     forbids downloading it",
                    repo_cache.join("refs").join(revision).display()
                ),
                "a model downloaded before (e.g. by `hf download` or an earlier online run), \
                 or HF_HUB_OFFLINE unset",
            ))
        }
        None => match remote.download("config.json", revision)? {
            Fetched::Found { commit, .. } => commit,
            Fetched::Missing => {
                return Err(Error::input(
                    format!("{repo_id}@{revision}"),
                    format!("the repository on {} has no config.json", opts.endpoint),
                    "a transformers model repository",
                ))
            }
        },
    };
    Ok(ModelDir {
        root: repo_cache.join("snapshots").join(&commit),
        repo_id: Some(repo_id.to_string()),
        revision: Some(revision.to_string()),
        commit: Some(commit),
        remote: Some(remote),
    })
}

/// The commit hash stored in `refs/<revision>`, if that ref is cached.
fn read_ref(repo_cache: &Path, revision: &str) -> Result<Option<String>> {
    let path = repo_cache.join("refs").join(revision);
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let commit = s.trim();
            if commit.is_empty() || commit.contains(['/', '\\']) || commit.starts_with('.') {
                return Err(Error::input(
                    path.display().to_string(),
                    "corrupt Hugging Face cache ref",
                    "a commit hash",
                ));
            }
            Ok(Some(commit.to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::input(
            path.display().to_string(),
            e.to_string(),
            "a readable Hugging Face cache ref",
        )),
    }
}

impl ModelDir {
    /// The path of `name` (relative to the model root, e.g. `config.json`), downloading it into
    /// the cache when the model comes from the Hub and the file is missing.
    pub fn file(&self, name: &str) -> Result<PathBuf> {
        check_relative(name)?;
        let path = self.root.join(name);
        if path.is_file() {
            return Ok(path);
        }
        let Some(remote) = &self.remote else {
            return Err(Error::input(
                path.display().to_string(),
                "missing from the model directory",
                format!("{name} in {}", self.root.display()),
            ));
        };
        if remote.offline {
            return Err(self.offline_missing(name));
        }
        match remote.download(name, self.commit_or_revision())? {
            Fetched::Found { path, .. } => Ok(path),
            Fetched::Missing => Err(Error::input(
                format!("{}/{name}", remote.repo_id),
                format!("not found on {}", remote.endpoint),
                format!("{name} in the repository"),
            )),
        }
    }

    /// Like [`ModelDir::file`] for files a model may lack (`chat_template.jinja`, …): `None`
    /// when the Hub answers 404, or, offline, when the file is not cached.
    pub fn optional_file(&self, name: &str) -> Result<Option<PathBuf>> {
        check_relative(name)?;
        let path = self.root.join(name);
        if path.is_file() {
            return Ok(Some(path));
        }
        let Some(remote) = &self.remote else {
            return Ok(None);
        };
        // huggingface_hub records known-missing files there so nobody asks the Hub again.
        if let Some(commit) = &self.commit {
            if remote
                .repo_cache
                .join(".no_exist")
                .join(commit)
                .join(name)
                .is_file()
            {
                return Ok(None);
            }
        }
        if remote.offline {
            return Ok(None);
        }
        match remote.download(name, self.commit_or_revision())? {
            Fetched::Found { path, .. } => Ok(Some(path)),
            Fetched::Missing => {
                if let Some(commit) = &self.commit {
                    remote.mark_missing(commit, name);
                }
                Ok(None)
            }
        }
    }

    /// The safetensors weight files: `model.safetensors`, or every shard named in
    /// `model.safetensors.index.json` (deduplicated, sorted by name), each brought on disk.
    pub fn weight_files(&self) -> Result<Vec<PathBuf>> {
        const SINGLE: &str = "model.safetensors";
        const INDEX: &str = "model.safetensors.index.json";
        // Prefer what is already on disk, so a cached model never touches the network.
        let single_local = self.root.join(SINGLE).is_file();
        let index_local = self.root.join(INDEX).is_file();
        let index = if single_local {
            return Ok(vec![self.root.join(SINGLE)]);
        } else if index_local {
            self.root.join(INDEX)
        } else if let Some(p) = self.optional_file(SINGLE)? {
            return Ok(vec![p]);
        } else if let Some(p) = self.optional_file(INDEX)? {
            p
        } else {
            let mut problem = format!("no {SINGLE} or {INDEX}");
            if self.root.join("pytorch_model.bin").is_file() {
                problem
                    .push_str(" (pytorch_model.bin is not supported: convert it to safetensors)");
            }
            return Err(Error::input(
                self.display(),
                problem,
                format!("{SINGLE}, or {INDEX} and the shards it lists"),
            ));
        };
        let shards = read_index_shards(&index)?;
        shards.iter().map(|s| self.file(s)).collect()
    }

    /// `config.json`, parsed.
    pub fn config(&self) -> Result<serde_json::Value> {
        let path = self.file("config.json")?;
        read_json(&path)
    }

    /// What errors call this model: the repo id (with revision) or the directory.
    pub fn display(&self) -> String {
        match (&self.repo_id, &self.revision) {
            (Some(repo), Some(rev)) if rev != "main" => format!("{repo}@{rev}"),
            (Some(repo), _) => repo.clone(),
            _ => self.root.display().to_string(),
        }
    }

    fn commit_or_revision(&self) -> &str {
        self.commit
            .as_deref()
            .or(self.revision.as_deref())
            .unwrap_or("main")
    }

    fn offline_missing(&self, name: &str) -> Error {
        Error::input(
            name,
            format!(
                "not in the Hugging Face cache (looked in {}) and HF_HUB_OFFLINE=1 forbids \
                 downloading it",
                self.root.display()
            ),
            format!(
                "{name} downloaded before for {}, or HF_HUB_OFFLINE unset",
                self.display()
            ),
        )
    }
}

/// Parses a JSON file; errors name the file.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::input(
            path.display().to_string(),
            e.to_string(),
            "a readable JSON file",
        )
    })?;
    serde_json::from_str(&text).map_err(|e| {
        Error::input(
            path.display().to_string(),
            format!("invalid JSON: {e}"),
            "a valid JSON file",
        )
    })
}

fn read_index_shards(index: &Path) -> Result<Vec<String>> {
    let value = read_json(index)?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| {
            Error::input(
                index.display().to_string(),
                "no weight_map object",
                "a safetensors index with {\"weight_map\": {tensor: shard file}}",
            )
        })?;
    let mut shards = BTreeSet::new();
    for (tensor, shard) in map {
        let Some(shard) = shard.as_str() else {
            return Err(Error::input(
                index.display().to_string(),
                format!("weight_map[{tensor:?}] is not a file name"),
                "shard file names as strings",
            ));
        };
        shards.insert(shard.to_string());
    }
    if shards.is_empty() {
        return Err(Error::input(
            index.display().to_string(),
            "empty weight_map",
            "at least one shard",
        ));
    }
    Ok(shards.into_iter().collect())
}

/// File names come from index files and callers: keep them inside the model directory.
fn check_relative(name: &str) -> Result<()> {
    let path = Path::new(name);
    let ok = !name.is_empty()
        && !name.contains('\\')
        && path.components().all(|c| matches!(c, Component::Normal(_)));
    if ok {
        Ok(())
    } else {
        Err(Error::input(
            name,
            "not a plain relative file name",
            "a file inside the model directory, without .. or a leading /",
        ))
    }
}

/// Outcome of asking the Hub for one file.
enum Fetched {
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
    fn download(&self, name: &str, revision: &str) -> Result<Fetched> {
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

    /// Records a 404 the way huggingface_hub does (`.no_exist/<commit>/<name>`); best effort.
    fn mark_missing(&self, commit: &str, name: &str) {
        let marker = self.repo_cache.join(".no_exist").join(commit).join(name);
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
fn join_url(base: &str, location: &str) -> String {
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

    #[test]
    fn names() {
        assert!(is_repo_id("llava-hf/llava-1.5-7b-hf"));
        assert!(!is_repo_id("a/b/c"));
        assert!(!is_repo_id("../x"));
        assert!(looks_like_path("./x"));
        assert!(looks_like_path("a/b/c"));
        assert!(!looks_like_path("org/name"));
        assert!(check_relative("sub/a.json").is_ok());
        assert!(check_relative("../a.json").is_err());
        assert!(check_relative("/etc/passwd").is_err());
        assert_eq!(
            repo_folder_name("Qwen/Qwen2-VL-2B-Instruct"),
            "models--Qwen--Qwen2-VL-2B-Instruct"
        );
    }

    #[test]
    fn cache_root_precedence() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let o = HubOptions::from_lookup(&env(&[("HOME", "/h"), ("HF_TOKEN_PATH", "/nonexistent")]));
        assert_eq!(
            o.ok().map(|o| o.cache_dir),
            Some(PathBuf::from("/h/.cache/huggingface/hub"))
        );
        let o = HubOptions::from_lookup(&env(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/x")]));
        assert_eq!(
            o.ok().map(|o| o.cache_dir),
            Some(PathBuf::from("/x/huggingface/hub"))
        );
        let o = HubOptions::from_lookup(&env(&[
            ("HOME", "/h"),
            ("XDG_CACHE_HOME", "/x"),
            ("HF_HOME", "~/hf"),
        ]));
        assert_eq!(
            o.ok().map(|o| o.cache_dir),
            Some(PathBuf::from("/h/hf/hub"))
        );
        let o = HubOptions::from_lookup(&env(&[
            ("HF_HOME", "/hf"),
            ("HF_HUB_CACHE", "/c"),
            ("HF_HUB_OFFLINE", "yes"),
            ("HF_ENDPOINT", "http://e/"),
            ("HF_TOKEN", " t "),
        ]));
        let o = o.ok();
        assert_eq!(
            o.as_ref().map(|o| o.cache_dir.clone()),
            Some(PathBuf::from("/c"))
        );
        assert_eq!(o.as_ref().map(|o| o.offline), Some(true));
        assert_eq!(o.as_ref().map(|o| o.endpoint.as_str()), Some("http://e"));
        assert_eq!(o.as_ref().and_then(|o| o.token.as_deref()), Some("t"));
        let o = HubOptions::from_lookup(&env(&[("HF_HOME", "/hf"), ("HF_HUB_OFFLINE", "0")]));
        assert_eq!(o.ok().map(|o| o.offline), Some(false));
    }
}
