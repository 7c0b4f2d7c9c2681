//! `mmllm batch`: strict manifest errors with positions, jobs that fail alone, manifest order,
//! and `--resume` after `kill -9` keeping exactly one result per job.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use crate::util::{mmllm, read_jsonl, repo};

fn batch(manifest: &Path, extra: &[&str]) -> Output {
    mmllm()
        .arg("batch")
        .arg(manifest)
        .args(extra)
        .output()
        .unwrap()
}

/// A manifest in a temp dir with the tiny LLaVA as default model and photos copied beside it.
fn workspace(jobs: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    for name in ["llava_photo_1.jpg", "llava_photo_2.jpg", "not_an_image.jpg"] {
        std::fs::copy(repo().join("tests/data").join(name), dir.path().join(name)).unwrap();
    }
    let model = repo().join("tests/fixtures/llava-tiny");
    let text = format!(
        "defaults:\n  model: {}\n  max_tokens: 6\njobs:\n{jobs}",
        model.display()
    );
    let path = dir.path().join("jobs.yaml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

#[test]
fn schema_errors_are_all_reported_with_positions_before_loading() {
    let (_dir, path) = workspace(
        "  - id: a\n    prompt: hi\n    imgs: [x.jpg]\n  - id: a\n    prompt: hi\n    max_tokens: lots\n",
    );
    let out = batch(&path, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(
        stderr.contains("jobs.yaml:7:5: job 1: unknown key `imgs`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("jobs.yaml:8:5: duplicate job id \"a\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("jobs.yaml:10:17: job 2: `max_tokens` is \"lots\""),
        "{stderr}"
    );
}

#[test]
fn bad_jobs_fail_alone_and_lines_follow_the_manifest() {
    let (dir, path) = workspace(
        "  - id: good1\n    prompt: What is in this image?\n    images: [llava_photo_1.jpg]\n\
         \x20 - id: corrupt\n    prompt: hi\n    images: [not_an_image.jpg]\n\
         \x20 - id: missing\n    prompt: hi\n    images: [nowhere.jpg]\n\
         \x20 - id: toomany\n    prompt: hi\n    images: [llava_photo_1.jpg, llava_photo_2.jpg]\n\
         \x20 - id: good2\n    prompt: Describe.\n    images: [llava_photo_2.jpg]\n",
    );
    let results = dir.path().join("out.jsonl");
    let out = batch(&path, &["-o", results.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("3 of 5 job(s) failed"), "{stderr}");
    let got = read_jsonl(&results);
    let ids: Vec<&str> = got.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["good1", "corrupt", "missing", "toomany", "good2"]);
    for bad in &got[1..4] {
        assert_eq!(bad["error"]["kind"], "input", "{bad}");
    }
    assert!(got[1]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not_an_image.jpg"));
    assert!(got[2]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("nowhere.jpg"));
    assert!(got[3]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("at most 1"));

    // Each good job equals the same prompt run alone.
    let alone = mmllm()
        .args(["image", "--model"])
        .arg(repo().join("tests/fixtures/llava-tiny"))
        .args(["--output", "jsonl", "--max-tokens", "6"])
        .arg(dir.path().join("llava_photo_1.jpg"))
        .arg("What is in this image?")
        .output()
        .unwrap();
    let alone: serde_json::Value = serde_json::from_slice(&alone.stdout).unwrap();
    assert_eq!(got[0]["token_ids"], alone["token_ids"]);
    assert_eq!(got[0]["text"], alone["text"]);
    assert_eq!(got[4]["usage"]["completion_tokens"], 6);
}

#[test]
fn strict_checks_all_media_up_front() {
    let (dir, path) = workspace(
        "  - id: a\n    prompt: hi\n    images: [nowhere.jpg]\n  - id: b\n    prompt: hi\n    images: [not_an_image.jpg]\n",
    );
    let results = dir.path().join("out.jsonl");
    let out = batch(&path, &["--strict", "-o", results.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("nowhere.jpg") && stderr.contains("not_an_image.jpg"),
        "{stderr}"
    );
    assert!(!results.exists() || std::fs::read(&results).unwrap().is_empty());
}

#[test]
fn kill_then_resume_keeps_one_result_per_job() {
    let jobs: String = (0..8)
        .map(|i| {
            format!(
                "  - id: job{i}\n    prompt: Picture {i}?\n    images: [llava_photo_{}.jpg]\n",
                1 + i % 2
            )
        })
        .collect();
    let (dir, path) = workspace(&jobs);
    let clean = dir.path().join("clean.jsonl");
    let out = batch(&path, &["-o", clean.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let results = dir.path().join("out.jsonl");
    let mut child = mmllm()
        .arg("batch")
        .arg(&path)
        .args(["-o", results.to_str().unwrap()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for a few finished lines, then kill -9 mid-run.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let n = std::fs::read_to_string(&results).map_or(0, |t| t.lines().count());
        if n >= 2 || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = std::fs::read(&results).unwrap();
    let whole_before = &before[..before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1)];

    let out = batch(&path, &["--resume", "-o", results.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = std::fs::read(&results).unwrap();
    assert!(
        after.starts_with(whole_before),
        "lines finished before the kill are kept byte for byte"
    );
    let got = read_jsonl(&results);
    let mut ids: Vec<String> = got
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    let mut want: Vec<String> = (0..8).map(|i| format!("job{i}")).collect();
    want.sort();
    assert_eq!(ids, want, "exactly one line per job id");
    let clean = read_jsonl(&clean);
    for line in &got {
        let twin = clean.iter().find(|c| c["id"] == line["id"]).unwrap();
        assert_eq!(line["token_ids"], twin["token_ids"], "{}", line["id"]);
        assert_eq!(line["text"], twin["text"]);
    }
}

#[test]
fn jsonl_manifests_and_unordered_output() {
    let dir = tempfile::tempdir().unwrap();
    let model = repo().join("tests/fixtures/llava-tiny");
    let photo = repo().join("tests/data/llava_photo_1.jpg");
    let text: String = ["x", "y"]
        .iter()
        .map(|id| {
            format!(
                "{}\n",
                serde_json::json!({"id": id, "model": model, "prompt": "hi", "images": [photo], "max_tokens": 3})
            )
        })
        .collect();
    let path = dir.path().join("jobs.jsonl");
    std::fs::write(&path, text).unwrap();
    let out = batch(&path, &["--unordered"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut ids: Vec<String> = stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, ["x", "y"]);
}

#[test]
fn the_example_manifest_runs() {
    // examples/jobs.yaml names models and media relative to its own folder.
    let out = batch(&repo().join("examples/jobs.yaml"), &[]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ids: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids, ["portrait", "landscape", "pair", "frames"]);
}
