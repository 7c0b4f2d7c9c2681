//! Model resolution: `--model` (alias | Hugging Face repo id | local directory) becomes a
//! [`ModelDir`] whose files are on disk. Owns the Hugging Face cache layout, written exactly as
//! `huggingface_hub` writes it (`models--org--name/{refs,blobs,snapshots}`) so that Python tools
//! and mmllm share downloads, plus offline mode and downloads with a progress bar.
//! Must not import `models`, `engine`, `cli` or `app`: families receive a `ModelDir`.
//!
//! `resolve` turns the argument into a directory (aliases, local paths, repo ids, the cache's
//! refs and snapshots); `remote` brings missing files into the cache.

mod remote;
mod resolve;

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::json::read_json;
use remote::{Fetched, Remote};

pub use remote::join_url;
pub use resolve::repo_folder_name;

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

/// Resolves `--model`: an alias, an existing directory (which must hold `config.json`), or a
/// repo id `org/name[@revision]` looked up in the Hugging Face cache. A cached revision is used
/// as is, without network; an uncached one has its `config.json` downloaded to learn the
/// commit (unless offline, which is then an error). An alias wins over a same-named directory
/// in the working directory (write `./llava` for the directory); `org/name` that exists as a
/// directory is that directory, as in transformers.
///
/// `aliases` is the `(alias, repo id)` table, matched case-insensitively.
pub fn resolve(model: &str, aliases: &[(&str, &str)], opts: &HubOptions) -> Result<ModelDir> {
    resolve::resolve_model(model, aliases, opts)
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
        if let Some(commit) = &self.commit {
            if remote.known_missing(commit, name) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_file_names() {
        assert!(check_relative("sub/a.json").is_ok());
        assert!(check_relative("../a.json").is_err());
        assert!(check_relative("/etc/passwd").is_err());
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
