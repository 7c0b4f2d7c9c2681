//! Every knob reaches the model or is refused: `--image-grid-thw` (and the manifest's
//! `image_grid_thw`) carries the grid of embeddings given without one, `min_pixels` /
//! `max_pixels` act in manifests as on the command line and as HF's processor kwargs on
//! every grid of tests/fixtures/generate_qwen2_vl_pixels.py's table, and settings a family
//! cannot use are exit-2 errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use mmllm::media::image::{decode_image, ImageLimits};
use mmllm::models::qwen2_vl::preprocessor::preprocess_image;
use mmllm::models::qwen2_vl::Processors;
use mmllm::models::ProcessorKwargs;

use crate::util::{json_line, read_json, repo, run_mmllm, token_ids};

fn qwen() -> PathBuf {
    repo().join("tests/fixtures/qwen2-vl-tiny")
}

/// The committed image embeddings split in two files: the features alone, and the grid.
fn split_embeds(dir: &Path) -> (PathBuf, PathBuf) {
    let both: HashMap<String, Tensor> = candle_core::safetensors::load(
        qwen().join("expected/embeds_one_image.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let (features, grid) = (
        dir.join("features.safetensors"),
        dir.join("grid.safetensors"),
    );
    let only = |name: &str| HashMap::from([(name.to_string(), both[name].clone())]);
    candle_core::safetensors::save(&only("image_embeds"), &features).unwrap();
    candle_core::safetensors::save(&only("image_grid_thw"), &grid).unwrap();
    (features, grid)
}

#[test]
fn image_grid_thw_from_a_separate_file_reaches_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let (features, grid) = split_embeds(dir.path());
    let (model, features, grid) = (
        qwen().display().to_string(),
        features.display().to_string(),
        grid.display().to_string(),
    );
    let want = read_json(&qwen().join("expected/one_image.json"));
    let base = [
        "embeds",
        "--model",
        &model,
        "--output",
        "jsonl",
        "--max-tokens",
        "16",
    ];
    let prompt = "What is in this image?";

    let with = json_line(&run_mmllm(
        &[&base[..], &["--image-grid-thw", &grid, &features, prompt]].concat(),
    ));
    let want_ids = token_ids(&want["greedy_ids"]);
    assert_eq!(token_ids(&with["token_ids"]), want_ids);

    // Without the grid the embeddings cannot be placed: an input error, not a guess.
    let without = run_mmllm(&[&base[..], &[&features, prompt]].concat());
    assert_eq!(without.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&without.stderr).contains("image_grid_thw"));

    // A grid both in the file and by flag is refused rather than silently replaced.
    let combined = qwen().join("expected/embeds_one_image.safetensors");
    let twice = run_mmllm(
        &[
            &base[..],
            &[
                "--image-grid-thw",
                &grid,
                combined.to_str().unwrap(),
                prompt,
            ],
        ]
        .concat(),
    );
    assert_eq!(twice.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&twice.stderr).contains("given twice"));

    // The same through a manifest, with the grid file relative to the manifest.
    let manifest = dir.path().join("jobs.yaml");
    std::fs::write(
        &manifest,
        format!(
            "defaults:\n  model: {model}\n  max_tokens: 16\njobs:\n  - id: e\n    prompt: {prompt:?}\n    embeds: [features.safetensors]\n    image_grid_thw: grid.safetensors\n"
        ),
    )
    .unwrap();
    let out = run_mmllm(&["batch", manifest.to_str().unwrap()]);
    assert_eq!(token_ids(&json_line(&out)["token_ids"]), want_ids);
}

#[test]
fn settings_a_family_cannot_use_are_refused_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let (features, grid) = split_embeds(dir.path());
    let photo = repo().join("tests/data/llava_photo_1.jpg");
    let llava = repo().join("tests/fixtures/llava-tiny");
    let mut cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "embeds".into(),
                "--model".into(),
                qwen().display().to_string(),
                "--image-sizes".into(),
                grid.display().to_string(),
                features.display().to_string(),
                "hi".into(),
            ],
            "--image-sizes",
        ),
        (
            vec![
                "embeds".into(),
                "--model".into(),
                llava.display().to_string(),
                "--image-grid-thw".into(),
                grid.display().to_string(),
                features.display().to_string(),
                "hi".into(),
            ],
            "--image-grid-thw",
        ),
        (
            vec![
                "image".into(),
                "--model".into(),
                llava.display().to_string(),
                "--max-pixels".into(),
                "5000".into(),
                photo.display().to_string(),
                "hi".into(),
            ],
            "--max-pixels",
        ),
        (
            vec![
                "image".into(),
                "--model".into(),
                qwen().display().to_string(),
                "--min-pixels".into(),
                "0".into(),
                photo.display().to_string(),
                "hi".into(),
            ],
            "--min-pixels",
        ),
    ];
    let whisper = repo().join("tests/fixtures/whisper-tiny-random");
    let speech = repo().join("tests/data/speech_16k.wav");
    let template = repo().join("tests/fixtures/qwen2-vl-tiny/chat_template.jinja");
    for (flag, value) in [
        ("--system", Some("Be brief.")),
        ("--chat-template", template.to_str()),
        ("--raw", None),
    ] {
        let mut args = vec![
            "audio".to_string(),
            "--model".into(),
            whisper.display().to_string(),
            flag.into(),
        ];
        args.extend(value.map(str::to_string));
        args.extend([speech.display().to_string(), String::new()]);
        cases.push((args, flag));
    }
    for (args, flag) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_mmllm(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn manifest_pixel_budgets_act_as_the_flags_do() {
    let want = read_json(&qwen().join("expected/pixels_max_china.json"));
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("jobs.yaml");
    let photo = repo().join("tests/data/qwen_china_517x333.jpg");
    let llava = repo().join("tests/fixtures/llava-tiny");
    std::fs::write(
        &manifest,
        format!(
            "defaults:\n  model: {}\n  max_tokens: 16\n  images: [{}]\n  prompt: {:?}\njobs:\n  - id: budget\n    max_pixels: {}\n  - id: plain\n  - id: llava\n    model: {}\n    max_pixels: 6000\n",
            qwen().display(),
            photo.display(),
            want["prompt"].as_str().unwrap(),
            want["kwargs"]["max_pixels"],
            llava.display()
        ),
    )
    .unwrap();
    let out = run_mmllm(&["batch", manifest.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "the llava job fails alone");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["usage"]["prompt_tokens"], want["prompt_tokens"]);
    assert_eq!(
        serde_json::json!(token_ids(&lines[0]["token_ids"])),
        want["greedy_ids"],
        "max_pixels in the manifest gives HF's ids"
    );
    assert_eq!(
        lines[1]["usage"]["prompt_tokens"],
        want["default_prompt_tokens"]
    );
    assert_eq!(lines[2]["error"]["kind"], "input");
    assert!(lines[2]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_pixels"));
}

/// transformers' grids for images under many `min_pixels`/`max_pixels` pairs (including
/// min > max, where its smart_resize lets either bound break), through the same processor
/// settings the CLI builds.
#[test]
fn pixel_kwargs_give_transformers_grids() {
    let table = read_json(&qwen().join("expected/pixels_grids.json"));
    let processors = Processors::load(&qwen()).unwrap();
    let mut checked = 0;
    for row in table.as_array().unwrap() {
        if row["modality"] != "image" || row.get("error").is_some() {
            continue;
        }
        let kwargs = ProcessorKwargs {
            min_pixels: row["kwargs"]["min_pixels"].as_u64(),
            max_pixels: row["kwargs"]["max_pixels"].as_u64(),
            ..Default::default()
        };
        let name = row["media"][0].as_str().unwrap();
        let bytes = std::fs::read(repo().join("tests/data").join(name)).unwrap();
        let img = decode_image(&bytes, name, &ImageLimits::default()).unwrap();
        let patches = preprocess_image(&img, &processors.image.with_kwargs(&kwargs)).unwrap();
        let want: Vec<usize> = row["grid_thw"][0]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(patches.grid_thw.to_vec(), want, "{name} {kwargs:?}");
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} rows checked");
}

/// The README lists every manifest key, so a new setting is documented where users look.
#[test]
fn the_readme_lists_every_manifest_key() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    for key in mmllm::manifest::KEYS {
        assert!(readme.contains(&format!("`{key}`")), "README lacks `{key}`");
    }
}

/// `--sample-rate` gives a `.npy` array its rate (the dry run reports it) and is refused for a
/// file whose header already has one.
#[test]
fn sample_rate_applies_to_npy_audio_only() {
    let model = repo().join("tests/fixtures/qwen2-audio-tiny");
    let model = model.to_str().unwrap();
    let npy = repo().join("tests/data/audio/sine440_44k.npy");
    let wav = repo().join("tests/data/speech_16k.wav");
    let plan = json_line(&run_mmllm(&[
        "audio",
        "--model",
        model,
        "--dry-run",
        "--sample-rate",
        "44100",
        npy.to_str().unwrap(),
        "hi",
    ]));
    assert_eq!(plan["media"][0]["sample_rate"], 44100);
    let out = run_mmllm(&[
        "audio",
        "--model",
        model,
        "--dry-run",
        "--sample-rate",
        "16000",
        wav.to_str().unwrap(),
        "hi",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--sample-rate"));
    // A rate past u32 is refused, not wrapped to 1 Hz.
    let out = run_mmllm(&[
        "audio",
        "--model",
        model,
        "--dry-run",
        "--sample-rate",
        "4294967297",
        npy.to_str().unwrap(),
        "hi",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("4294967297 Hz"));
}
