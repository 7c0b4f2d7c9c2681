//! Caps on the decode paths (issue #15): audio duration enforced while decoding (hound, ffmpeg
//! and `.npy`), and ffmpeg restricted to single-file demuxers, so a playlist cannot make it
//! read other files. Every refusal is exit 2 naming the input and the cap's override.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Instant;

use crate::util::{json_line, mmllm, npy_f32, repo};

fn ultravox() -> String {
    repo()
        .join("tests/fixtures/ultravox-tiny")
        .display()
        .to_string()
}

/// Runs the system ffmpeg (quietly) to make test media.
fn ffmpeg(args: &[&str]) {
    let out = Command::new("ffmpeg")
        .args(["-nostdin", "-hide_banner", "-loglevel", "error", "-y"])
        .args(args)
        .output()
        .expect("ffmpeg runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A one-second 64x48 test-pattern MP4 at 4 fps.
fn test_clip(path: &Path) {
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=64x48:rate=4:duration=1",
        "-pix_fmt",
        "yuv420p",
        path.to_str().unwrap(),
    ]);
}

/// A temporary copy of the files of fixture `name` (to break one of them).
fn copy_of_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(repo().join("tests/fixtures").join(name)).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
    }
    dir
}

/// `mmllm audio --dry-run` on `file` with the ultravox fixture, `MMLLM_MAX_AUDIO_SECONDS` set
/// when given.
fn dry_run_audio(file: &Path, max_seconds: Option<&str>, extra: &[&str]) -> Output {
    let mut cmd = mmllm();
    cmd.args(["audio", "--model", &ultravox(), "--dry-run"])
        .args(extra)
        .arg(file)
        .arg("hi");
    match max_seconds {
        Some(s) => cmd.env("MMLLM_MAX_AUDIO_SECONDS", s),
        None => cmd.env_remove("MMLLM_MAX_AUDIO_SECONDS"),
    };
    cmd.output().unwrap()
}

fn refused(out: &Output, words: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty());
    for w in words {
        assert!(stderr.contains(w), "{w:?} not in: {stderr}");
    }
}

#[test]
fn compressed_silence_that_decodes_past_an_hour_is_stopped_during_decode() {
    let dir = tempfile::tempdir().unwrap();
    let bomb = dir.path().join("two_hours.flac");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "anullsrc=r=8000:cl=mono",
        "-t",
        "7300",
        "-c:a",
        "flac",
        bomb.to_str().unwrap(),
    ]);
    let size = std::fs::metadata(&bomb).unwrap().len();
    assert!(size < 4 << 20, "a small file: {size} bytes");
    let started = Instant::now();
    let out = dry_run_audio(&bomb, None, &[]);
    refused(
        &out,
        &[
            "two_hours.flac",
            "more than 3600 s",
            "MMLLM_MAX_AUDIO_SECONDS",
        ],
    );
    // One hour at 8 kHz is 115 MB of float32: decoding stops there, not after two hours.
    assert!(started.elapsed().as_secs() < 60);
}

#[test]
fn the_audio_duration_cap_holds_on_every_decode_path_and_can_be_raised() {
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("three_seconds.wav");
    let mp3 = dir.path().join("three_seconds.mp3");
    for (path, codec) in [(&wav, "pcm_s16le"), (&mp3, "libmp3lame")] {
        ffmpeg(&[
            "-f",
            "lavfi",
            "-i",
            "sine=f=440:r=16000:d=3",
            "-c:a",
            codec,
            path.to_str().unwrap(),
        ]);
    }
    // A (2, 48000) float32 .npy: 3 s at 16 kHz, in two channels.
    let npy = dir.path().join("three_seconds.npy");
    std::fs::write(&npy, npy_f32(&[2, 48000], &vec![0.0; 2 * 48000])).unwrap();

    for (file, extra) in [
        (&wav, &[][..]),
        (&mp3, &[][..]),
        (&npy, &["--sample-rate", "16000"][..]),
    ] {
        let name = file.file_name().unwrap().to_str().unwrap();
        let out = dry_run_audio(file, Some("2"), extra);
        refused(&out, &[name, "more than 2 s", "MMLLM_MAX_AUDIO_SECONDS"]);
        let line = json_line(&dry_run_audio(file, Some("4"), extra));
        let seconds = line["media"][0]["seconds"].as_f64().unwrap();
        assert!((2.9..3.2).contains(&seconds), "{name}: {seconds} s");
    }
    let out = dry_run_audio(&wav, Some("soon"), &[]);
    refused(&out, &["MMLLM_MAX_AUDIO_SECONDS"]);
}

#[test]
fn a_playlist_cannot_make_ffmpeg_read_another_local_file() {
    let dir = tempfile::tempdir().unwrap();
    let segment = dir.path().join("secret.aac");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "sine=f=440:d=1",
        "-c:a",
        "aac",
        "-f",
        "adts",
        segment.to_str().unwrap(),
    ]);
    let hls = format!(
        "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{}\n#EXT-X-ENDLIST\n",
        segment.display()
    );
    let concat = format!("ffconcat version 1.0\nfile '{}'\n", segment.display());
    for (name, text) in [
        ("list.mp3", &hls),
        ("list.m3u8", &hls),
        ("list.txt", &concat),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let out = dry_run_audio(&path, None, &[]);
        refused(&out, &[name, "not a decodable audio file"]);
    }
    // The segment itself, a single-file format, decodes.
    json_line(&dry_run_audio(&segment, None, &[]));

    let video = dir.path().join("clip.mp4");
    test_clip(&video);
    let list = dir.path().join("clips.m3u8");
    std::fs::write(
        &list,
        format!(
            "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{}\n#EXT-X-ENDLIST\n",
            video.display()
        ),
    )
    .unwrap();
    let qwen = repo().join("tests/fixtures/qwen2-vl-tiny");
    let out = mmllm()
        .args(["video", "--model", qwen.to_str().unwrap(), "--dry-run"])
        .arg(&list)
        .arg("hi")
        .output()
        .unwrap();
    refused(&out, &["clips.m3u8"]);
}

#[test]
fn a_whisper_prompt_is_checked_before_anything_loads() {
    // A copy of the tiny Whisper fixture whose weights are garbage: a refusal must come before
    // they are read, and `--dry-run` must refuse what a real run would.
    let dir = copy_of_fixture("whisper-tiny-random");
    std::fs::write(dir.path().join("model.safetensors"), b"not weights").unwrap();
    let speech = repo().join("tests/data/speech_16k.wav");
    let run = |extra: &[&str], prompt: &str| {
        mmllm()
            .args(["audio", "--model", dir.path().to_str().unwrap()])
            .args(extra)
            .arg(&speech)
            .arg(prompt)
            .output()
            .unwrap()
    };
    for extra in [&["--dry-run"][..], &[][..]] {
        let out = run(extra, "describe the speaker");
        refused(
            &out,
            &["prompt", "\"describe\" is not a Whisper task or language"],
        );
    }
    let line = json_line(&run(&["--dry-run"], "translate, fr"));
    assert_eq!(line["family"], "whisper");
}

#[test]
fn media_root_confines_a_manifest_to_one_folder_after_links_and_dots() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("jobs");
    let outside = dir.path().join("private");
    std::fs::create_dir_all(root.join("frames")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let photo = repo().join("tests/data/llava_photo_1.jpg");
    std::fs::copy(&photo, root.join("inside.jpg")).unwrap();
    std::fs::copy(&photo, outside.join("secret.jpg")).unwrap();
    std::fs::copy(&photo, root.join("frames/0.jpg")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.jpg"), root.join("link.jpg")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.jpg"), root.join("frames/1.jpg")).unwrap();
    std::fs::write(outside.join("template.jinja"), "{{ messages }}").unwrap();
    let model = repo().join("tests/fixtures/qwen2-vl-tiny");
    let run = |job: &str| {
        let manifest = root.join("jobs.jsonl");
        std::fs::write(&manifest, job).unwrap();
        mmllm()
            .args(["batch", "--strict", "--media-root"])
            .arg(&root)
            .arg(&manifest)
            .output()
            .unwrap()
    };
    let m = model.display();
    for (job, shown) in [
        (
            r#""images": ["../private/secret.jpg"]"#,
            "../private/secret.jpg",
        ),
        (r#""images": ["link.jpg"]"#, "link.jpg"),
        (r#""videos": ["frames"]"#, "1.jpg"),
        (
            r#""chat_template": "../private/template.jinja""#,
            "template.jinja",
        ),
        (r#""images": ["missing.jpg"]"#, "cannot be resolved"),
    ] {
        let out = run(&format!(
            r#"{{"id": "a", "model": "{m}", "prompt": "hi", "max_tokens": 2, {job}}}"#
        ));
        refused(&out, &[shown, "--media-root"]);
    }
    // Inside the root, the job runs; without the flag, the linked file is read as before.
    let ok = run(&format!(
        r#"{{"id": "a", "model": "{m}", "prompt": "hi", "max_tokens": 2, "images": ["inside.jpg"]}}"#
    ));
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let manifest = root.join("jobs.jsonl");
    std::fs::write(
        &manifest,
        format!(r#"{{"id": "a", "model": "{m}", "prompt": "hi", "max_tokens": 2, "images": ["link.jpg"]}}"#),
    )
    .unwrap();
    let free = mmllm().arg("batch").arg(&manifest).output().unwrap();
    assert_eq!(
        free.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&free.stderr)
    );
}

#[test]
fn clap_usage_errors_take_the_mmllm_error_form_and_exit_2() {
    let out = mmllm().args(["image", "--bogus-flag"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with("mmllm: error: unexpected argument '--bogus-flag'"),
        "{stderr}"
    );
    // --help still prints on stdout with status 0.
    let help = mmllm().args(["image", "--help"]).output().unwrap();
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("--model"));
}

#[test]
fn a_truncated_weights_file_is_named_in_our_error_form() {
    let dir = copy_of_fixture("llava-tiny");
    let weights = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap();
    f.set_len(len / 2).unwrap();
    let photo = repo().join("tests/data/llava_photo_1.jpg");
    let out = mmllm()
        .args(["image", "--model", dir.path().to_str().unwrap()])
        .arg(&photo)
        .arg("hi")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "mmllm: error: {}: not a complete safetensors file",
            weights.display()
        )),
        "{stderr}"
    );
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn embeds_of_the_wrong_width_are_refused_before_load_and_by_dry_run() {
    use candle_core::{Device, Tensor};
    let dir = tempfile::tempdir().unwrap();
    for (fixture, hidden) in [
        ("llava-tiny", "hidden_size"),
        ("qwen2-vl-tiny", "hidden_size"),
    ] {
        let model = repo().join("tests/fixtures").join(fixture);
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
        let width = config
            .get("text_config")
            .and_then(|t| t.get(hidden))
            .or_else(|| config.get(hidden))
            .and_then(|v| v.as_u64())
            .unwrap() as usize;
        let path = dir.path().join(format!("{fixture}.safetensors"));
        let wrong =
            Tensor::zeros((1, 4, width + 1), candle_core::DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(
            &std::collections::HashMap::from([("image_embeds".to_string(), wrong)]),
            &path,
        )
        .unwrap();
        let out = mmllm()
            .args(["embeds", "--model", model.to_str().unwrap(), "--dry-run"])
            .arg(&path)
            .arg("hi")
            .output()
            .unwrap();
        let expected = format!(", {width}) or (1, ");
        refused(
            &out,
            &[
                path.to_str().unwrap(),
                "image_embeds has shape [1, 4, ",
                &expected,
            ],
        );
    }
}

#[test]
fn the_job_count_cap_holds_for_jsonl_and_yaml_manifests() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("jobs.jsonl");
    let yaml = dir.path().join("jobs.yaml");
    let job = |i: usize| format!(r#"{{"id": "j{i}", "model": "/nowhere", "prompt": "hi"}}"#);
    std::fs::write(&jsonl, (0..4).map(|i| job(i) + "\n").collect::<String>()).unwrap();
    let items: String = (0..4).map(|i| format!("  - {}\n", job(i))).collect();
    std::fs::write(&yaml, format!("jobs:\n{items}")).unwrap();
    for manifest in [&jsonl, &yaml] {
        let run = |cap: &str| {
            mmllm()
                .args(["batch", "--strict"])
                .arg(manifest)
                .env("MMLLM_MAX_JOBS", cap)
                .output()
                .unwrap()
        };
        refused(
            &run("3"),
            &["holds 4 jobs", "at most 3 jobs", "MMLLM_MAX_JOBS"],
        );
        // At the cap, validation goes on to the jobs themselves (here: a model that is missing).
        let out = run("4");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("MMLLM_MAX_JOBS"), "{stderr}");
        assert!(stderr.contains("/nowhere"), "{stderr}");
    }
}

#[test]
fn dry_run_refuses_a_prompt_longer_than_the_context() {
    let model = repo().join("tests/fixtures/llava-tiny");
    let photo = repo().join("tests/data/llava_photo_1.jpg");
    let run = |words: usize| {
        mmllm()
            .args(["image", "--model", model.to_str().unwrap(), "--dry-run"])
            .arg(&photo)
            .args(["-p", &"hello ".repeat(words)])
            .output()
            .unwrap()
    };
    // The fixture's context is 2048 positions.
    refused(
        &run(5000),
        &["prompt", "tokens", "fewer than the model's 2048 positions"],
    );
    json_line(&run(100));
}

#[test]
fn video_frames_are_held_to_the_image_pixel_cap() {
    let dir = tempfile::tempdir().unwrap();
    let video = dir.path().join("clip.mp4");
    test_clip(&video);
    let qwen = repo().join("tests/fixtures/qwen2-vl-tiny");
    let run = |cap: &str| {
        mmllm()
            .args(["video", "--model", qwen.to_str().unwrap(), "--dry-run"])
            .arg(&video)
            .arg("hi")
            .env("MMLLM_MAX_IMAGE_PIXELS", cap)
            .output()
            .unwrap()
    };
    refused(
        &run("3000"),
        &["clip.mp4", "64x48", "MMLLM_MAX_IMAGE_PIXELS"],
    );
    let line = json_line(&run("3072"));
    assert_eq!(line["media"][0]["width"], 64);
}

#[test]
fn audio_past_the_models_window_is_reported_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let long = dir.path().join("long.wav");
    let short = dir.path().join("short.wav");
    for (path, secs) in [(&long, "31"), (&short, "29")] {
        ffmpeg(&[
            "-f",
            "lavfi",
            "-i",
            &format!("sine=f=440:r=16000:d={secs}"),
            "-c:a",
            "pcm_s16le",
            path.to_str().unwrap(),
        ]);
    }
    for fixture in ["whisper-tiny-random", "qwen2-audio-tiny"] {
        let model = repo().join("tests/fixtures").join(fixture);
        let run = |file: &Path| {
            let out = mmllm()
                .args([
                    "audio",
                    "--model",
                    model.to_str().unwrap(),
                    "--max-tokens",
                    "1",
                ])
                .arg(file)
                .arg(if fixture.starts_with("whisper") {
                    "transcribe"
                } else {
                    "hi"
                })
                .output()
                .unwrap();
            assert_eq!(
                out.status.code(),
                Some(0),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stderr).to_string()
        };
        let stderr = run(&long);
        assert!(
            stderr.contains("long.wav: 31.0 s of audio") && stderr.contains("only the first 30 s"),
            "{fixture}: {stderr}"
        );
        assert!(!run(&short).contains("warning"), "{fixture}");
    }
}

#[test]
fn media_with_non_utf8_names_are_read_and_a_non_utf8_prompt_is_refused() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let name = std::ffi::OsStr::from_bytes(b"caf\xe9.jpg");
    let photo = dir.path().join(name);
    std::fs::copy(repo().join("tests/data/llava_photo_1.jpg"), &photo).unwrap();
    let model = repo().join("tests/fixtures/llava-tiny");
    let run = |prompt: &std::ffi::OsStr| {
        mmllm()
            .args(["image", "--model", model.to_str().unwrap(), "--dry-run"])
            .arg(&photo)
            .arg(prompt)
            .output()
            .unwrap()
    };
    let line = json_line(&run("hi".as_ref()));
    assert_eq!(line["media"][0]["width"], 333);
    assert!(line["media"][0]["input"]
        .as_str()
        .unwrap()
        .ends_with("caf\u{fffd}.jpg"));
    let out = run(std::ffi::OsStr::from_bytes(b"h\xe9"));
    refused(&out, &["the prompt", "not valid UTF-8"]);
}
