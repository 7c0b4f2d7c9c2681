//! Regression tests for the hostile-input trial (issue #15): inputs that cost gigabytes or
//! hung, or that were accepted and turned into garbage, are refused with exit 2 and a message
//! naming the cap; absurd counts are clamped.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::util::{json_line, mmllm, repo, run_mmllm};

fn llava() -> String {
    repo()
        .join("tests/fixtures/llava-tiny")
        .display()
        .to_string()
}

fn photo() -> String {
    repo()
        .join("tests/data/llava_photo_1.jpg")
        .display()
        .to_string()
}

/// Exit 2, nothing on stdout, and stderr containing every one of `words`.
fn refused(out: &std::process::Output, words: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty());
    for w in words {
        assert!(stderr.contains(w), "{w:?} not in: {stderr}");
    }
}

#[test]
fn max_tokens_past_the_context_is_clamped_not_overflowed() {
    let out = run_mmllm(&[
        "image",
        "--model",
        &llava(),
        "--output",
        "jsonl",
        "--ignore-eos",
        "--max-tokens",
        "18446744073709551615",
        &photo(),
        "hi",
    ]);
    let line = json_line(&out);
    assert_eq!(line["finish_reason"], "length");
    let used = line["usage"]["prompt_tokens"].as_u64().unwrap()
        + line["usage"]["completion_tokens"].as_u64().unwrap();
    // Generation stops at the model's context (the last token needs no cache slot).
    assert_eq!(used, 2048 + 1);
}

#[test]
fn embeddings_with_nan_or_infinity_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = repo().join("tests/fixtures/qwen2-vl-tiny/expected/embeds_one_image.safetensors");
    let tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(&src, &Device::Cpu).unwrap();
    for (name, bad) in [
        ("nan.safetensors", f32::NAN),
        ("inf.safetensors", f32::INFINITY),
    ] {
        let e = &tensors["image_embeds"];
        let mut v: Vec<f32> = e.flatten_all().unwrap().to_vec1().unwrap();
        v[3] = bad;
        let poisoned = Tensor::from_vec(v, e.shape(), &Device::Cpu).unwrap();
        let mut all = tensors.clone();
        all.insert("image_embeds".into(), poisoned);
        let path = dir.path().join(name);
        candle_core::safetensors::save(&all, &path).unwrap();
        let model = repo().join("tests/fixtures/qwen2-vl-tiny");
        let out = run_mmllm(&[
            "embeds",
            "--model",
            model.to_str().unwrap(),
            "--dry-run",
            path.to_str().unwrap(),
            "hi",
        ]);
        refused(&out, &[name, "NaN or infinite"]);
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn chat_templates_are_capped_in_size_and_work() {
    let dir = tempfile::tempdir().unwrap();
    let huge = write(dir.path(), "huge.jinja", &"x".repeat((1 << 20) + 1));
    let out = run_mmllm(&[
        "image",
        "--model",
        &llava(),
        "--chat-template",
        &huge,
        &photo(),
        "hi",
    ]);
    refused(&out, &["huge.jinja", "too large"]);

    // Two nested loops of 100000 would run for hours: the render stops on its fuel.
    let endless = write(
        dir.path(),
        "endless.jinja",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}<image>",
    );
    let out = run_mmllm(&[
        "image",
        "--model",
        &llava(),
        "--chat-template",
        &endless,
        &photo(),
        "hi",
    ]);
    refused(&out, &["endless.jinja", "fuel"]);
}

#[test]
fn prompts_over_the_byte_cap_are_refused_before_loading() {
    let long = "word ".repeat(100);
    let out = mmllm()
        .args(["image", "--model", &llava(), &photo(), &long])
        .env("MMLLM_MAX_PROMPT_BYTES", "100")
        .output()
        .unwrap();
    refused(&out, &["prompt", "MMLLM_MAX_PROMPT_BYTES"]);
    let out = mmllm()
        .args(["image", "--model", &llava(), "--dry-run", &photo(), &long])
        .env("MMLLM_MAX_PROMPT_BYTES", "1000")
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn a_thin_strip_is_refused_before_its_huge_resize() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("strip.png");
    image::RgbImage::from_pixel(20000, 1, image::Rgb([200, 10, 10]))
        .save(&path)
        .unwrap();
    let out = run_mmllm(&["image", "--model", &llava(), path.to_str().unwrap(), "hi"]);
    refused(&out, &["strip.png", "20000x1", "resized"]);
}

#[test]
fn results_are_never_written_over_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("jobs.yaml");
    let text = format!(
        "jobs:\n  - id: a\n    model: {}\n    prompt: hi\n    images: [{}]\n",
        llava(),
        photo()
    );
    std::fs::write(&manifest, &text).unwrap();
    let out = run_mmllm(&[
        "batch",
        manifest.to_str().unwrap(),
        "-o",
        dir.path().join("./jobs.yaml").to_str().unwrap(),
    ]);
    refused(&out, &["jobs.yaml", "manifest itself"]);
    assert_eq!(std::fs::read_to_string(&manifest).unwrap(), text);
}

#[test]
fn defaults_copied_into_many_jobs_are_capped_before_expanding() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("jobs.yaml");
    let mut text = format!(
        "defaults:\n  model: {}\n  system: \"{}\"\njobs:\n",
        llava(),
        "x".repeat(300_000)
    );
    for i in 0..4000 {
        text.push_str(&format!("  - id: j{i}\n    prompt: hi\n"));
    }
    std::fs::write(&manifest, text).unwrap();
    let out = run_mmllm(&["batch", manifest.to_str().unwrap()]);
    refused(&out, &["jobs.yaml", "4000 jobs", "defaults"]);
}

#[test]
fn videos_are_refused_before_decoding_more_frames_than_the_cap() {
    let model = repo().join("tests/fixtures/qwen2-vl-tiny");
    let model = model.to_str().unwrap();
    let clip = repo().join("tests/data/video/counter.mp4");
    let frames = repo().join("tests/data/qwen_video");
    for input in [&clip, &frames] {
        let run = |extra: &[&str]| {
            mmllm()
                .args(["video", "--model", model, "--dry-run"])
                .args(extra)
                .arg(input)
                .arg("hi")
                .env("MMLLM_MAX_VIDEO_FRAMES", "4")
                .output()
                .unwrap()
        };
        // Every frame by default: more than 4, refused before any is decoded.
        refused(
            &run(&[]),
            &["frames would be decoded", "MMLLM_MAX_VIDEO_FRAMES"],
        );
        let plan = json_line(&run(&["--num-frames", "4"]));
        assert_eq!(plan["media"][0]["frames"], 4);
    }
}

/// A playlist naming a URL is media a user may be handed; ffmpeg must not fetch what it names.
#[test]
fn ffmpeg_never_fetches_urls_named_inside_media() {
    let server = crate::util_http::Server::start(|_| crate::util_http::Reply::ok(vec![0u8; 188]));
    let dir = tempfile::tempdir().unwrap();
    let playlist = dir.path().join("clip.m3u8");
    std::fs::write(
        &playlist,
        format!(
            "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{}\n#EXT-X-ENDLIST\n",
            server.url("/segment.ts")
        ),
    )
    .unwrap();
    let model = repo().join("tests/fixtures/qwen2-vl-tiny");
    let out = run_mmllm(&[
        "video",
        "--model",
        model.to_str().unwrap(),
        "--dry-run",
        playlist.to_str().unwrap(),
        "hi",
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        server.requests().is_empty(),
        "ffmpeg fetched {:?}",
        server.requests()
    );
}

#[test]
fn results_thrown_away_are_reported_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("jobs.yaml");
    let out = dir.path().join("out.jsonl");
    std::fs::write(
        &manifest,
        format!(
            "defaults:\n  model: {}\n  max_tokens: 1\njobs:\n  - id: a\n    prompt: hi\n    images: [{}]\n",
            llava(),
            photo()
        ),
    )
    .unwrap();
    let run = |extra: &[&str]| {
        mmllm()
            .args([
                "batch",
                manifest.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    assert!(run(&[]).status.success());
    let again = run(&[]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("replacing 1 earlier result line"));

    // A corrupt line in the middle is dropped by --resume, and said.
    let good = std::fs::read_to_string(&out).unwrap();
    std::fs::write(&out, format!("not json\n{good}")).unwrap();
    let resumed = run(&["--resume"]);
    assert!(resumed.status.success());
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(
        stderr.contains("drops 1 line(s) that are not results (lines [1])"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), good);
}
