//! From `--model` to a [`ModelDir`]: aliases, local directories, `org/name[@revision]` repo
//! ids and their lookup in the Hugging Face cache (`models--org--name/{refs,snapshots}`).

use std::path::Path;

use super::remote::{Fetched, Remote};
use super::{HubOptions, ModelDir};
use crate::error::{Error, Result};

/// What a model directory must hold, for error messages.
const EXPECTED_MODEL_DIR: &str = "a model directory holding config.json, model.safetensors \
     (or model.safetensors.index.json and its shards), tokenizer.json and the processor config \
     (preprocessor_config.json / processor_config.json)";

/// [`super::resolve()`].
pub(super) fn resolve_model(
    model: &str,
    aliases: &[(&str, &str)],
    opts: &HubOptions,
) -> Result<ModelDir> {
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
    let remote = Remote::new(repo_cache.clone(), repo_id, opts);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_repo_id("llava-hf/llava-1.5-7b-hf"));
        assert!(!is_repo_id("a/b/c"));
        assert!(!is_repo_id("../x"));
        assert!(looks_like_path("./x"));
        assert!(looks_like_path("a/b/c"));
        assert!(!looks_like_path("org/name"));
        assert_eq!(
            repo_folder_name("Qwen/Qwen2-VL-2B-Instruct"),
            "models--Qwen--Qwen2-VL-2B-Instruct"
        );
    }
}
