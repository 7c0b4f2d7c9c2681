//! Model resolution through a fake Hugging Face Hub on loopback and hand-built caches laid out
//! as huggingface_hub writes them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mmllm::error::Result;
use mmllm::hub::{HubOptions, ModelDir};
use mmllm::models::registry::aliases;

use crate::util::input_error;
use crate::util_http::{Reply, Request, Server};

/// `--model` resolution with the family table's aliases, as the app resolves it.
fn resolve(model: &str, opts: &HubOptions) -> Result<ModelDir> {
    mmllm::hub::resolve(model, &aliases(), opts)
}

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A content hash standing in for the Hub's git sha1 / LFS sha256 (FNV-1a, hex).
fn etag_of(bytes: &[u8], lfs: bool) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h = (h ^ *b as u64).wrapping_mul(0x100000001b3);
    }
    if lfs {
        format!("{h:016x}{:016x}{h:016x}{:016x}", !h, h.rotate_left(7))
    } else {
        format!("{h:016x}{:016x}{:08x}", !h, h as u32)
    }
}

/// The Hub and its CDN: two loopback servers, hence two origins, as on huggingface.co.
struct FakeHub {
    hub: Server,
    cdn: Server,
}

/// Serves repo `org/tiny` like huggingface.co: `resolve/{main|COMMIT}/{file}` with ETag and
/// X-Repo-Commit; `*.safetensors` are "LFS" files redirected to the CDN with X-Linked-Etag;
/// `org/old-name` is a renamed repo redirected (relative `Location`) to `org/tiny`.
fn fake_hub(files: &[(&str, Vec<u8>)]) -> FakeHub {
    let files: Arc<BTreeMap<String, Vec<u8>>> = Arc::new(
        files
            .iter()
            .map(|(n, b)| (n.to_string(), b.clone()))
            .collect(),
    );
    let cdn = {
        let files = Arc::clone(&files);
        Server::start(move |req: &Request| {
            let etag = req.path.trim_start_matches('/');
            match files.values().find(|b| etag_of(b, true) == etag) {
                Some(b) => Reply::ok(b.clone()),
                None => Reply::status(404),
            }
        })
    };
    let cdn_base = cdn.url("");
    let hub = Server::start(move |req: &Request| {
        if let Some(rest) = req.path.strip_prefix("/org/old-name/") {
            return Reply::status(307).header("Location", format!("/org/tiny/{rest}"));
        }
        let Some(rest) = req.path.strip_prefix("/org/tiny/resolve/") else {
            return Reply::status(404).header("X-Error-Code", "RepoNotFound");
        };
        let Some((rev, name)) = rest.split_once('/') else {
            return Reply::status(400);
        };
        if rev != "main" && rev != COMMIT {
            return Reply::status(404).header("X-Error-Code", "RevisionNotFound");
        }
        let Some(bytes) = files.get(name) else {
            return Reply::status(404)
                .header("X-Error-Code", "EntryNotFound")
                .header("X-Repo-Commit", COMMIT);
        };
        if name.ends_with(".safetensors") {
            let sha = etag_of(bytes, true);
            Reply::status(302)
                .header("Location", format!("{cdn_base}/{sha}"))
                .header("X-Linked-Etag", format!("\"{sha}\""))
                .header("X-Linked-Size", bytes.len().to_string())
                .header("ETag", "\"pointer-file-sha1\"")
                .header("X-Repo-Commit", COMMIT)
        } else {
            Reply::ok(bytes.clone())
                .header("ETag", format!("W/\"{}\"", etag_of(bytes, false)))
                .header("X-Repo-Commit", COMMIT)
        }
    });
    FakeHub { hub, cdn }
}

fn options(hub: &Server, cache: &Path, offline: bool) -> HubOptions {
    HubOptions {
        offline,
        endpoint: hub.url(""),
        token: Some("secret-token".into()),
        cache_dir: cache.to_path_buf(),
    }
}

fn config_bytes() -> Vec<u8> {
    br#"{"model_type": "llava", "hidden_size": 8}"#.to_vec()
}

/// Asserts that `pointer` is a relative symlink to `../…/blobs/<etag>` holding `bytes`.
fn assert_pointer(repo: &Path, name: &str, etag: &str, bytes: &[u8]) {
    let pointer = repo.join("snapshots").join(COMMIT).join(name);
    let target = std::fs::read_link(&pointer).expect("snapshot entry is a symlink");
    let ups = "../".repeat(Path::new(name).components().count() + 1);
    assert_eq!(
        target,
        PathBuf::from(format!("{ups}blobs/{etag}")),
        "{name}"
    );
    assert_eq!(
        std::fs::read(repo.join("blobs").join(etag)).expect("blob"),
        bytes
    );
    assert_eq!(std::fs::read(&pointer).expect("through the link"), bytes);
}

#[test]
fn download_writes_the_huggingface_hub_layout_then_works_offline() {
    let weights = b"fake safetensors bytes".to_vec();
    let extra = b"{\"a\": 1}".to_vec();
    let server = fake_hub(&[
        ("config.json", config_bytes()),
        ("model.safetensors", weights.clone()),
        ("tokenizer.json", b"{}".to_vec()),
        ("sub/extra.json", extra.clone()),
    ]);
    let cache = tempfile::tempdir().expect("temp dir");
    let opts = options(&server.hub, cache.path(), false);

    let dir = resolve("org/tiny", &opts).expect("resolve online");
    let repo = cache.path().join("models--org--tiny");
    assert_eq!(dir.repo_id.as_deref(), Some("org/tiny"));
    assert_eq!(dir.commit.as_deref(), Some(COMMIT));
    assert_eq!(dir.root, repo.join("snapshots").join(COMMIT));
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).expect("refs/main"),
        COMMIT
    );
    assert_eq!(dir.config().expect("config")["model_type"], "llava");
    let weight_files = dir.weight_files().expect("weights");
    assert_eq!(weight_files, vec![dir.root.join("model.safetensors")]);
    dir.file("sub/extra.json").expect("file in a sub-folder");
    dir.file("tokenizer.json").expect("tokenizer");

    assert_pointer(
        &repo,
        "config.json",
        &etag_of(&config_bytes(), false),
        &config_bytes(),
    );
    // LFS files are stored under X-Linked-Etag, not the pointer file's ETag.
    assert_pointer(
        &repo,
        "model.safetensors",
        &etag_of(&weights, true),
        &weights,
    );
    assert_pointer(&repo, "sub/extra.json", &etag_of(&extra, false), &extra);
    let leftovers: Vec<_> = std::fs::read_dir(repo.join("blobs"))
        .expect("blobs")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("incomplete"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The token goes to the Hub, never to the CDN.
    let requests = server.hub.requests();
    assert!(requests
        .iter()
        .all(|r| r.header("authorization") == Some("Bearer secret-token")));
    let cdn_requests = server.cdn.requests();
    assert_eq!(cdn_requests.len(), 1, "{cdn_requests:?}");
    assert!(cdn_requests[0].header("authorization").is_none());

    // Offline: everything cached resolves without a single request.
    let before = server.hub.requests().len();
    let offline = options(&server.hub, cache.path(), true);
    let dir = resolve("org/tiny", &offline).expect("resolve offline");
    assert_eq!(dir.config().expect("config")["hidden_size"], 8);
    assert_eq!(
        dir.file("tokenizer.json").expect("cached"),
        dir.root.join("tokenizer.json")
    );
    assert_eq!(dir.weight_files().expect("weights").len(), 1);
    assert_eq!(
        dir.optional_file("chat_template.jinja").expect("optional"),
        None
    );
    let (input, problem, _) = input_error(dir.file("preprocessor_config.json"));
    assert_eq!(input, "preprocessor_config.json");
    assert!(
        problem.contains(&dir.root.display().to_string()),
        "{problem}"
    );
    assert!(problem.contains("HF_HUB_OFFLINE"), "{problem}");
    assert_eq!(
        server.hub.requests().len(),
        before,
        "offline mode made requests"
    );

    // Offline and never downloaded: the error names the repo.
    let (input, problem, _) = input_error(resolve("org/other", &offline));
    assert!(input.contains("org/other"), "{input}");
    assert!(problem.contains("HF_HUB_OFFLINE"), "{problem}");
}

#[test]
fn optional_files_and_404s() {
    let server = fake_hub(&[("config.json", config_bytes())]);
    let cache = tempfile::tempdir().expect("temp dir");
    let opts = options(&server.hub, cache.path(), false);
    let dir = resolve("org/tiny", &opts).expect("resolve");
    assert_eq!(
        dir.optional_file("chat_template.jinja")
            .expect("404 is None"),
        None
    );
    // Recorded as huggingface_hub does, so the next run does not ask again.
    let marker = cache
        .path()
        .join("models--org--tiny/.no_exist")
        .join(COMMIT)
        .join("chat_template.jinja");
    assert!(marker.is_file());
    let before = server.hub.requests().len();
    assert_eq!(
        dir.optional_file("chat_template.jinja")
            .expect("cached 404"),
        None
    );
    assert_eq!(server.hub.requests().len(), before);

    let (input, problem, _) = input_error(dir.file("tokenizer.json"));
    assert!(
        input.contains("org/tiny") && input.contains("tokenizer.json"),
        "{input}"
    );
    assert!(problem.contains("not found"), "{problem}");
    let (_, problem, expected) = input_error(dir.weight_files());
    assert!(problem.contains("model.safetensors"), "{problem}");
    assert!(expected.contains("index"), "{expected}");

    let (input, problem, _) = input_error(resolve("org/absent", &opts));
    assert!(input.contains("org/absent"), "{input}");
    assert!(problem.contains("not found"), "{problem}");
    // A renamed repository: the Hub's same-origin redirect is followed.
    let renamed = resolve("org/old-name", &opts).expect("renamed repo");
    assert_eq!(renamed.config().expect("config")["model_type"], "llava");
    let (input, problem, _) = input_error(resolve("org/tiny@v9", &opts));
    assert_eq!(input, "org/tiny@v9");
    assert!(problem.contains("revision"), "{problem}");
}

#[test]
fn sharded_weights_follow_the_index() {
    let shard1 = b"shard one".to_vec();
    let shard2 = b"shard two".to_vec();
    let index = br#"{"metadata": {"total_size": 18}, "weight_map": {
        "z.weight": "model-00001-of-00002.safetensors",
        "a.weight": "model-00002-of-00002.safetensors",
        "b.weight": "model-00001-of-00002.safetensors"}}"#
        .to_vec();
    let server = fake_hub(&[
        ("config.json", config_bytes()),
        ("model.safetensors.index.json", index),
        ("model-00001-of-00002.safetensors", shard1.clone()),
        ("model-00002-of-00002.safetensors", shard2.clone()),
    ]);
    let cache = tempfile::tempdir().expect("temp dir");
    let dir = resolve("org/tiny", &options(&server.hub, cache.path(), false)).expect("resolve");
    let files = dir.weight_files().expect("shards");
    assert_eq!(
        files,
        vec![
            dir.root.join("model-00001-of-00002.safetensors"),
            dir.root.join("model-00002-of-00002.safetensors"),
        ]
    );
    assert_eq!(std::fs::read(&files[0]).expect("shard 1"), shard1);
    assert_eq!(std::fs::read(&files[1]).expect("shard 2"), shard2);
    // Offline afterwards: the same answer from the cache alone.
    let offline = resolve("org/tiny", &options(&server.hub, cache.path(), true)).expect("offline");
    assert_eq!(offline.weight_files().expect("cached shards"), files);
}

/// Writes `models--org--name` by hand, as huggingface_hub leaves it after a download.
fn handmade_cache(cache: &Path, repo_id: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let repo = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let snapshot = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(repo.join("refs")).expect("refs");
    std::fs::create_dir_all(repo.join("blobs")).expect("blobs");
    std::fs::write(repo.join("refs/main"), COMMIT).expect("ref");
    for (name, bytes) in files {
        let etag = etag_of(bytes, true);
        std::fs::write(repo.join("blobs").join(&etag), bytes).expect("blob");
        let pointer = snapshot.join(name);
        std::fs::create_dir_all(pointer.parent().expect("parent")).expect("snapshot dir");
        let ups = "../".repeat(Path::new(name).components().count() + 1);
        std::os::unix::fs::symlink(format!("{ups}blobs/{etag}"), &pointer).expect("symlink");
    }
    snapshot
}

#[test]
fn a_cache_written_by_python_tools_is_used_without_network() {
    let server = Server::start(|_| Reply::status(500));
    let cache = tempfile::tempdir().expect("temp dir");
    let snapshot = handmade_cache(
        cache.path(),
        "openai/whisper-tiny.en",
        &[
            ("config.json", &config_bytes()),
            ("model.safetensors", b"weights"),
        ],
    );
    // Online, but everything needed is cached: the (broken) server is never asked.
    let opts = options(&server, cache.path(), false);
    let dir = resolve("whisper", &opts).expect("alias through the cache");
    assert_eq!(dir.repo_id.as_deref(), Some("openai/whisper-tiny.en"));
    assert_eq!(dir.root, snapshot);
    assert_eq!(dir.config().expect("config")["model_type"], "llava");
    assert_eq!(
        dir.weight_files().expect("weights"),
        vec![snapshot.join("model.safetensors")]
    );
    let pinned = resolve(&format!("openai/whisper-tiny.en@{COMMIT}"), &opts).expect("by commit");
    assert_eq!(pinned.root, snapshot);
    assert!(server.requests().is_empty(), "{:?}", server.requests());
}

#[test]
fn interrupted_download_leaves_no_blob() {
    let server = Server::start(|req: &Request| {
        if req.path.ends_with("/config.json") {
            Reply::ok(config_bytes())
                .header("ETag", "\"cfg\"")
                .header("X-Repo-Commit", COMMIT)
        } else {
            // Promises 1000 bytes, sends 5, hangs up.
            Reply::ok(b"short".to_vec())
                .header("Content-Length", "1000")
                .header("ETag", "\"big\"")
                .header("X-Repo-Commit", COMMIT)
        }
    });
    let cache = tempfile::tempdir().expect("temp dir");
    let dir = resolve("org/tiny", &options(&server, cache.path(), false)).expect("resolve");
    let err = dir
        .file("model.safetensors")
        .expect_err("truncated download");
    assert_eq!(err.exit_code(), 1, "{err}");
    let blobs: Vec<String> = std::fs::read_dir(cache.path().join("models--org--tiny/blobs"))
        .expect("blobs")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        blobs,
        vec!["cfg".to_string()],
        "only the complete blob remains"
    );
    assert!(!dir.root.join("model.safetensors").exists());
}

#[test]
fn local_directories() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("m");
    std::fs::create_dir(&root).expect("mkdir");
    let opts = HubOptions {
        offline: true,
        endpoint: "http://127.0.0.1:9".into(),
        token: None,
        cache_dir: dir.path().join("cache"),
    };
    let arg = root.to_str().expect("utf-8 temp path");
    let (input, problem, expected) = input_error(resolve(arg, &opts));
    assert_eq!(input, arg);
    assert!(problem.contains("config.json"), "{problem}");
    assert!(
        expected.contains("safetensors") && expected.contains("tokenizer"),
        "{expected}"
    );

    std::fs::write(root.join("config.json"), b"{not json").expect("write");
    let model: ModelDir = resolve(arg, &opts).expect("directory with config.json");
    assert_eq!(model.repo_id, None);
    let (input, problem, _) = input_error(model.config());
    assert!(input.ends_with("config.json"), "{input}");
    assert!(problem.contains("JSON"), "{problem}");
    let (input, _, _) = input_error(model.file("tokenizer.json"));
    assert!(input.ends_with("tokenizer.json"), "{input}");
    assert_eq!(
        model
            .optional_file("chat_template.jinja")
            .expect("optional"),
        None
    );
    input_error(model.file("../escape.json"));
    input_error(model.weight_files());

    let missing = dir.path().join("nowhere");
    let (input, _, _) = input_error(resolve(missing.to_str().expect("utf-8"), &opts));
    assert!(input.ends_with("nowhere"));
}

#[test]
fn aliases_and_unknown_names() {
    let table = aliases();
    let get = |a: &str| table.iter().find(|(n, _)| *n == a).map(|(_, r)| *r);
    assert_eq!(get("llava"), Some("llava-hf/llava-1.5-7b-hf"));
    assert_eq!(get("qwen2-vl"), Some("Qwen/Qwen2-VL-2B-Instruct"));
    assert_eq!(get("ultravox"), Some("fixie-ai/ultravox-v0_5-llama-3_2-1b"));
    assert_eq!(get("qwen2.5-vl"), Some("Qwen/Qwen2.5-VL-3B-Instruct"));
    assert_eq!(get("whisper"), Some("openai/whisper-tiny.en"));
    let opts = HubOptions {
        offline: true,
        endpoint: "http://127.0.0.1:9".into(),
        token: None,
        cache_dir: PathBuf::from("/nonexistent-mmllm-cache"),
    };
    let (input, problem, expected) = input_error(resolve("lavva", &opts));
    assert_eq!(input, "lavva");
    assert!(problem.contains("alias"), "{problem}");
    assert!(
        expected.contains("llava") && expected.contains("org/name"),
        "{expected}"
    );
}
