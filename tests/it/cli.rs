//! The command-line contract: exit codes, error messages naming the input, stdout kept for
//! results, and `--help`/man/completions generated from the one clap definition.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::util::{mmllm, repo};

fn data(name: &str) -> String {
    repo().join("tests/data").join(name).display().to_string()
}

/// A model directory holding only the tiny LLaVA's config.json: anything that tries to read
/// weights fails, so an error from it proves validation ran before loading.
fn config_only_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        repo().join("tests/fixtures/llava-tiny/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    dir
}

fn run(args: &[&str]) -> Output {
    run_with_stdin(args, b"")
}

fn run_with_stdin(args: &[&str], stdin: &[u8]) -> Output {
    use std::io::Write;
    // No default model from the environment: the errors for a missing `--model` must show.
    let mut child = mmllm()
        .env_remove("MMLLM_MODEL")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

/// Exit 2, nothing on stdout, and stderr is one `mmllm: error:` message containing `needle`.
fn assert_input_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        out.stdout.is_empty(),
        "stdout must stay empty: {:?}",
        out.stdout
    );
    assert!(stderr.starts_with("mmllm: error: "), "stderr: {stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
}

fn model_arg(dir: &Path) -> String {
    dir.display().to_string()
}

#[test]
fn missing_file_is_named() {
    let m = config_only_model();
    let out = run(&[
        "image",
        "--model",
        &model_arg(m.path()),
        "no-such-photo.jpg",
        "hi",
    ]);
    assert_input_error(&out, "no-such-photo.jpg");
}

#[test]
fn corrupt_image_is_an_input_error() {
    let m = config_only_model();
    let bad = data("not_an_image.jpg");
    let out = run(&["image", "--model", &model_arg(m.path()), &bad, "hi"]);
    assert_input_error(&out, "not_an_image.jpg");
}

#[test]
fn more_images_than_the_limit_fail_before_loading() {
    let m = config_only_model();
    let img = data("llava_photo_1.jpg");
    let out = run(&[
        "image",
        "--model",
        &model_arg(m.path()),
        &img,
        &img,
        "compare",
    ]);
    assert_input_error(&out, "limit-mm-per-prompt");
    let out = run(&[
        "image",
        "--model",
        &model_arg(m.path()),
        "--limit-mm-per-prompt",
        "image=1",
        &img,
        &img,
        "compare",
    ]);
    assert_input_error(&out, "at most 1");
}

#[test]
fn raw_prompt_placeholders_must_match_media() {
    let m = config_only_model();
    let img = data("llava_photo_1.jpg");
    let out = run(&[
        "image",
        "--model",
        &model_arg(m.path()),
        "--raw",
        &img,
        "USER: no placeholder here ASSISTANT:",
    ]);
    assert_input_error(&out, "0 <image> placeholder(s) for 1 image item(s)");
}

#[test]
fn stdin_used_twice_is_refused() {
    let m = config_only_model();
    let out = run(&["image", "--model", &model_arg(m.path()), "-", "-"]);
    assert_input_error(&out, "standard input is used more than once");
}

#[test]
fn malformed_data_url_is_refused() {
    let m = config_only_model();
    let out = run(&[
        "image",
        "--model",
        &model_arg(m.path()),
        "data:image/png;base64,@@@not-base64@@@",
        "hi",
    ]);
    assert_input_error(&out, "data:");
    let out = run(&[
        "image",
        "--model",
        &model_arg(m.path()),
        "data:image/png",
        "hi",
    ]);
    assert_input_error(&out, "data:");
}

#[test]
fn modality_the_model_does_not_take_is_refused() {
    let m = config_only_model();
    let wav = data("speech_16k.wav");
    let out = run(&[
        "audio",
        "--model",
        &model_arg(m.path()),
        &wav,
        "what is said?",
    ]);
    assert_input_error(&out, "does not accept audio");
}

#[test]
fn unknown_model_directory_or_repo_is_named() {
    let out = run(&["image", "--model", "/no/such/model/dir", "x.jpg", "hi"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/model/dir"));
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_flags_are_usage_errors() {
    let m = config_only_model();
    let model = model_arg(m.path());
    for args in [
        vec!["image", "--model", &model, "--temperature", "-1", "hi"],
        vec!["image", "--model", &model, "--device", "tpu", "hi"],
        vec![
            "image",
            "--model",
            &model,
            "--limit-mm-per-prompt",
            "image",
            "hi",
        ],
        vec!["image", "--model", &model, "--top-p", "1.5", "hi"],
        vec!["image", "--model", &model, "--no-such-flag", "hi"],
        vec![
            "video",
            "--model",
            &model,
            "--num-frames",
            "0",
            "x.mp4",
            "hi",
        ],
    ] {
        let out = run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn dry_run_decodes_media_and_prints_the_plan_without_weights() {
    let m = config_only_model();
    let img = data("llava_photo_1.jpg");
    let out = run_with_stdin(
        &[
            "image",
            "--model",
            &model_arg(m.path()),
            "--dry-run",
            &img,
            "-p",
            "-",
        ],
        b"What is in this image?\n",
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["family"], "llava");
    assert_eq!(plan["prompt"], "What is in this image?");
    assert_eq!(plan["media"][0]["width"], 333);
    assert_eq!(plan["media"][0]["height"], 517);
    assert_eq!(plan["limits"]["image"], 1);
}

#[test]
fn help_documents_every_flag() {
    let out = run(&["image", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--model",
        "--output",
        "--max-tokens",
        "--temperature",
        "--top-p",
        "--top-k",
        "--repetition-penalty",
        "--seed",
        "--stop",
        "--logprobs",
        "--device",
        "--dtype",
        "--limit-mm-per-prompt",
        "--chat-template",
        "--system",
        "--raw",
        "--prompt",
    ] {
        assert!(help.contains(flag), "image --help lacks {flag}");
    }
    let out = run(&["video", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--num-frames", "--fps", "--as-images"] {
        assert!(help.contains(flag), "video --help lacks {flag}");
    }
    let out = run(&["batch", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--output",
        "--strict",
        "--resume",
        "--unordered",
        "--shard",
        "--shards",
    ] {
        assert!(help.contains(flag), "batch --help lacks {flag}");
    }
}

#[test]
fn committed_man_pages_and_completions_are_current() {
    let tmp = tempfile::tempdir().unwrap();
    let out = mmllm()
        .args(["generate-docs", "--out-dir"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for sub in ["man", "completions"] {
        let fresh = tmp.path().join(sub);
        let mut names: Vec<_> = std::fs::read_dir(&fresh)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert!(!names.is_empty());
        for name in names {
            let committed = repo().join(sub).join(&name);
            let want = std::fs::read(fresh.join(&name)).unwrap();
            let have = std::fs::read(&committed).unwrap_or_default();
            assert!(
                want == have,
                "{} is stale: run `cargo run -- generate-docs --out-dir .`",
                committed.display()
            );
        }
    }
}

#[test]
fn corrupt_audio_is_an_input_error() {
    let model = repo().join("tests/fixtures/whisper-tiny-random");
    let out = run(&[
        "audio",
        "--model",
        &model_arg(&model),
        &data("not_an_image.jpg"),
        "transcribe",
    ]);
    assert_input_error(&out, "not_an_image.jpg");
}

#[test]
#[cfg(target_os = "linux")]
fn interrupt_exits_130() {
    let m = config_only_model();
    // The prompt comes from stdin, which stays open: the process waits until interrupted.
    let mut child = mmllm()
        .args(["image", "--model", &model_arg(m.path()), "-p", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the process catches SIGINT (bit 1 of SigCgt), however slow its start.
    let status = format!("/proc/{}/status", child.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let caught = std::fs::read_to_string(&status)
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("SigCgt:"))?.to_string();
                u64::from_str_radix(line.trim_start_matches("SigCgt:").trim(), 16).ok()
            })
            .is_some_and(|mask| mask & 0x2 != 0);
        if caught || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    // Keep stdin open until the child is gone: `wait_with_output` would close it, and an empty
    // prompt read before the signal handler's thread runs would end the process with 2.
    let stdin = child.stdin.take();
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    assert_eq!(out.status.code(), Some(130));
    assert!(out.stdout.is_empty());
}
