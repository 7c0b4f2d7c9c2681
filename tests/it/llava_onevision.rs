//! LLaVA-OneVision against transformers 5.23 on a tiny random checkpoint, sharded
//! (tests/fixtures/generate_llava_onevision.py): token counts for many image sizes (tiny and
//! real processor settings), pixel values, packed image and pooled video features, first-step
//! logits (1e-4 relative, f32, CPU) and 16 greedy tokens for one image (2x2 crops), images that
//! trigger the anyres_max_9 downsampling (517x333, 1031x1013, tall, wide), one smaller than a
//! patch, two images in one prompt and an 8-frame video; then the same ids through the CLI.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use mmllm::media::image::{decode_image, ImageLimits};
use mmllm::media::video::{decode_video, FrameSampling};
use mmllm::media::{MediaItem, Modality, RgbImage, Video};
use mmllm::models::llava_onevision::{self, preprocessor, Config, LlavaOnevisionModel, Processors};
use mmllm::models::{EncodedItem, Expansion, LoadContext, Model, ProcessorKwargs};
use mmllm::prompt::splice;
use serde_json::{json, Value};

use crate::util::{
    check_generation, flat, json_line, max_abs_diff, mmllm, read_json, repo, run_mmllm, tensor_ids,
    tensor_rel_err, tensors, token_ids,
};

const PIXEL_ATOL: f32 = 1e-6;
const FEATURE_RTOL: f32 = 1e-5;
const IMAGE_CASES: [&str; 7] = [
    "one_image",
    "large_image",
    "huge_image",
    "tall_image",
    "wide_image",
    "tiny_image",
    "two_images",
];
const VIDEO_CASES: [&str; 2] = ["video", "video_mp4"];

fn dir() -> PathBuf {
    repo().join("tests/fixtures/llava-onevision-tiny")
}

fn load() -> LlavaOnevisionModel {
    let ctx = LoadContext::from_dir(&dir(), &Device::Cpu, DType::F32).expect("config.json");
    llava_onevision::load(&ctx).expect("load the tiny checkpoint")
}

fn case(name: &str) -> (HashMap<String, Tensor>, Value) {
    let expected = dir().join("expected");
    (
        tensors(&expected.join(format!("{name}.safetensors"))),
        read_json(&expected.join(format!("{name}.json"))),
    )
}

/// An image file as the CLI decodes it.
fn image(path: &PathBuf) -> RgbImage {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    decode_image(&bytes, &path.display().to_string(), &ImageLimits::default()).unwrap()
}

fn data(name: &str) -> PathBuf {
    repo().join("tests/data").join(name)
}

/// The case's media, in prompt order.
fn media(meta: &Value) -> Vec<MediaItem> {
    if let Some(files) = meta["image_files"].as_array() {
        return files
            .iter()
            .map(|f| MediaItem::Image(image(&data(f.as_str().unwrap()))))
            .collect();
    }
    if let Some(file) = meta["video_file"].as_str() {
        let n = meta["num_frames"].as_u64().unwrap() as usize;
        let video = decode_video(&data(file), file, &FrameSampling::NumFrames(n)).unwrap();
        return vec![MediaItem::Video(video)];
    }
    let frames_dir = data(meta["frames_dir"].as_str().unwrap());
    let frames: Vec<RgbImage> = (0..8)
        .map(|i| image(&frames_dir.join(format!("frame_{i}.png"))))
        .collect();
    vec![MediaItem::Video(Video {
        timestamps: (0..8).map(f64::from).collect(),
        frames,
        source_fps: 1.0,
        duration: 8.0,
    })]
}

fn prompt_kwargs(items: &[MediaItem]) -> ProcessorKwargs {
    ProcessorKwargs::default().for_prompt(items)
}

/// Every item of a case's prompt encoded as the app does (knowing how many images it holds).
fn encode_all(model: &LlavaOnevisionModel, items: &[MediaItem]) -> Vec<EncodedItem> {
    let kwargs = prompt_kwargs(items);
    let encode = |item| model.encode_with(item, &kwargs).unwrap();
    items.iter().map(encode).collect()
}

#[test]
fn image_token_counts_match_transformers_for_every_size() {
    let table = read_json(&dir().join("expected/token_counts.json"));
    let tiny_cfg = Config::from_value(&read_json(&dir().join("config.json"))).unwrap();
    let tiny = Processors::load(&dir()).unwrap();
    // llava-hf/llava-onevision-qwen2-0.5b-ov-hf: transformers' defaults (SigLIP at 384 px in
    // patches of 14, the 36 pinpoints, anyres_max_9) and its legacy preprocessor_config.json.
    let real_cfg = Config::from_value(&json!({"model_type": "llava_onevision"})).unwrap();
    let real_dir = tempfile::tempdir().unwrap();
    let pinpoints: Vec<[u32; 2]> = (1..=6)
        .flat_map(|i| (1..=6).map(move |j| [384 * i, 384 * j]))
        .collect();
    let preprocessor_config = json!({
        "do_convert_rgb": true, "do_normalize": true, "do_pad": true, "do_rescale": true,
        "do_resize": true, "image_grid_pinpoints": pinpoints, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "LlavaOnevisionImageProcessor", "image_std": [0.5, 0.5, 0.5],
        "processor_class": "LlavaOnevisionProcessor", "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"height": 384, "width": 384}
    });
    std::fs::write(
        real_dir.path().join("preprocessor_config.json"),
        preprocessor_config.to_string(),
    )
    .unwrap();
    let real = Processors::load(real_dir.path()).unwrap();
    assert_eq!(real.image.grid_pinpoints, real_cfg.grid_pinpoints);
    assert_eq!(real.video.size, (384, 384));
    let rows = table.as_array().unwrap();
    for row in rows {
        let (h, w) = (
            row["height"].as_u64().unwrap() as u32,
            row["width"].as_u64().unwrap() as u32,
        );
        let ours = [
            preprocessor::image_tokens(&tiny_cfg, &tiny.image, h, w, 1),
            preprocessor::image_tokens(&real_cfg, &real.image, h, w, 1),
        ];
        let theirs = [row["tiny"].as_u64().unwrap(), row["real"].as_u64().unwrap()];
        assert_eq!(ours.map(|n| n as u64), theirs, "{h}x{w} (height x width)");
    }
    assert!(rows.len() >= 30);
    // An image among several: one padded square and its newline, whatever its size.
    assert_eq!(
        preprocessor::image_tokens(&real_cfg, &real.image, 9, 4000, 2),
        730
    );
}

#[test]
fn pixel_values_match_transformers() {
    let model = load();
    for name in [
        "one_image",
        "large_image",
        "wide_image",
        "tiny_image",
        "two_images",
    ] {
        let (want, meta) = case(name);
        let items = media(&meta);
        let n = prompt_kwargs(&items).prompt_images;
        let mut ours = Vec::new();
        for item in &items {
            let MediaItem::Image(img) = item else {
                unreachable!()
            };
            ours.extend(model.image_pixels(img, n).unwrap().data);
        }
        let err = max_abs_diff(&ours, &flat(&want["pixel_values"]));
        eprintln!("{name}: pixel max abs err {err:.2e}");
        assert!(err <= PIXEL_ATOL, "{name}: pixel values differ by {err}");
    }
    // Frames of 56x56 from PNGs, and of 64x48 decoded from an MP4 by ffmpeg: both resized by
    // torchvision's filter.
    for name in VIDEO_CASES {
        let (want, meta) = case(name);
        let MediaItem::Video(video) = &media(&meta)[0] else {
            unreachable!()
        };
        let ours = flat(&model.video_pixels(&video.frames).unwrap());
        let err = max_abs_diff(&ours, &flat(&want["pixel_values_videos"]));
        eprintln!("{name}: pixel max abs err {err:.2e}");
        assert!(err <= PIXEL_ATOL, "{name}: pixel values differ by {err}");
    }
}

#[test]
fn packed_and_pooled_features_match_transformers() {
    let model = load();
    for name in IMAGE_CASES.iter().chain(&VIDEO_CASES) {
        let (want, meta) = case(name);
        let items = media(&meta);
        let encoded = encode_all(&model, &items);
        let ours =
            Tensor::cat(&encoded.iter().map(|e| &e.features).collect::<Vec<_>>(), 0).unwrap();
        let key = if name.starts_with("video") {
            "video_features"
        } else {
            "image_features"
        };
        assert_eq!(ours.dims(), want[key].dims(), "{name}: feature shape");
        let err = tensor_rel_err(&ours, &want[key]);
        eprintln!("{name}: features rel err {err:.2e}");
        assert!(err <= FEATURE_RTOL, "{name}: features rel err {err}");
        if let Some(lens) = meta["image_feature_lens"].as_array() {
            for ((item, e), len) in items.iter().zip(&encoded).zip(lens) {
                let MediaItem::Image(img) = item else {
                    unreachable!()
                };
                let len = len.as_u64().unwrap() as usize;
                let n = model.image_tokens(img.height(), img.width(), items.len());
                assert_eq!(
                    (e.expansion.slots, n),
                    (len, len),
                    "{name}: slots, count, HF's"
                );
            }
        }
    }
}

/// tokenize -> encode -> splice -> prefill -> greedy decode through the `Model` trait, as the
/// engine runs it.
#[test]
fn logits_and_greedy_ids_match_transformers() {
    let model = load();
    let cfg = model.config();
    let tok = tokenizers::Tokenizer::from_file(dir().join("tokenizer.json")).unwrap();
    for name in IMAGE_CASES.iter().chain(&VIDEO_CASES) {
        let (want, meta) = case(name);
        let ids = tok.encode(meta["text"].as_str().unwrap(), false).unwrap();
        assert_eq!(
            ids.get_ids(),
            token_ids(&meta["prompt_ids"]),
            "{name}: prompt ids"
        );
        let items = media(&meta);
        let encoded = encode_all(&model, &items);
        let expansions: Vec<(Modality, Expansion)> = items
            .iter()
            .zip(&encoded)
            .map(|(m, e)| (m.modality(), e.expansion.clone()))
            .collect();
        let prompt = splice(
            &token_ids(&meta["prompt_ids"]),
            &[
                (Modality::Image, cfg.image_token_id),
                (Modality::Video, cfg.video_token_id),
            ],
            &expansions,
            "prompt",
        )
        .unwrap();
        assert_eq!(
            prompt.ids,
            tensor_ids(&want["input_ids"]),
            "{name}: expanded ids"
        );
        let mut cache = model.new_cache(prompt.ids.len() + 32).unwrap();
        let first = model.prefill(&prompt, &encoded, &mut cache).unwrap();
        check_generation(&model, first, &mut cache, &want, &meta, name);
    }
}

#[test]
fn the_checkpoint_is_sharded_and_audio_is_refused() {
    assert!(dir().join("model.safetensors.index.json").is_file());
    assert!(!dir().join("model.safetensors").exists());
    let model = load();
    let audio = MediaItem::Audio(mmllm::media::Audio {
        samples: vec![0.0; 160],
        sample_rate: 16000,
    });
    let err = model.encode(&audio).unwrap_err();
    assert_eq!(err.exit_code(), 2, "{err}");
}

// ------------------------------------------------------------------------- the CLI, end to end

/// `mmllm <command> --model <tiny> --output jsonl --max-tokens 16 --ignore-eos <rest>` (the
/// reference decoded 16 tokens past any end of sequence).
fn cli(command: &str, rest: &[&str]) -> Value {
    let out = mmllm()
        .arg(command)
        .arg("--model")
        .arg(dir())
        .args(["--output", "jsonl", "--max-tokens", "16", "--ignore-eos"])
        .args(rest)
        .output()
        .unwrap();
    json_line(&out)
}

fn assert_reproduces(name: &str, got: &Value) {
    let (want, meta) = case(name);
    assert_eq!(
        token_ids(&got["token_ids"]),
        token_ids(&meta["greedy_ids"]),
        "{name}"
    );
    assert_eq!(
        got["usage"]["prompt_tokens"].as_u64(),
        Some(want["input_ids"].dim(0).unwrap() as u64),
        "{name}: prompt tokens"
    );
}

#[test]
fn cli_images_reproduce_hugging_face() {
    for name in ["one_image", "large_image", "huge_image"] {
        let (_, meta) = case(name);
        let file = data(meta["image_files"][0].as_str().unwrap());
        let got = cli("image", &[file.to_str().unwrap(), "What is in this image?"]);
        assert_reproduces(name, &got);
    }
    // Without --ignore-eos the answer ends where the reference first produced <|im_end|>.
    let (_, meta) = case("huge_image");
    let want = token_ids(&meta["greedy_ids"]);
    let eos = want
        .iter()
        .position(|&id| id == 422)
        .expect("the reference reaches EOS");
    let file = data(meta["image_files"][0].as_str().unwrap());
    let out = mmllm()
        .args(["image", "--output", "jsonl", "--model"])
        .args([dir(), file])
        .arg("What is in this image?")
        .output()
        .unwrap();
    let out = json_line(&out);
    assert_eq!(token_ids(&out["token_ids"]), want[..eos]);
    assert_eq!(out["finish_reason"], "stop");
}

#[test]
fn cli_two_images_need_a_raised_limit_and_reproduce_hugging_face() {
    let (_, meta) = case("two_images");
    let files: Vec<String> = meta["image_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| data(f.as_str().unwrap()).display().to_string())
        .collect();
    let model = dir().display().to_string();
    let refused = run_mmllm(&[
        "image",
        "--model",
        &model,
        &files[0],
        &files[1],
        "Compare the two pictures.",
    ]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("image"));
    let got = cli(
        "image",
        &[
            "--limit-mm-per-prompt",
            "image=2",
            &files[0],
            &files[1],
            "Compare the two pictures.",
        ],
    );
    assert_reproduces("two_images", &got);
}

#[test]
fn cli_video_frames_reproduce_hugging_face() {
    let frames = data("qwen_video");
    let got = cli(
        "video",
        &[frames.to_str().unwrap(), "What happens in this video?"],
    );
    assert_reproduces("video", &got);
}

#[test]
fn cli_video_file_reproduces_hugging_face() {
    // counter.mp4: 8 of its 50 frames of 64x48, sampled as transformers does and resized to the
    // tower's 42x42.
    let clip = data("video/counter.mp4");
    let got = cli(
        "video",
        &[
            "--num-frames",
            "8",
            clip.to_str().unwrap(),
            "What happens in this video?",
        ],
    );
    assert_reproduces("video_mp4", &got);
}

/// What the family does not take is refused with exit 2 before any weights load: the model
/// directory here has no weights at all.
#[test]
fn cli_refuses_before_loading_what_the_family_does_not_take() {
    let bare = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(dir().join(f), bare.path().join(f)).unwrap();
    }
    let photo = data("ov_china_83x59.jpg");
    let photo = photo.to_str().unwrap();
    let clip = data("video/counter.mp4");
    let clip = clip.to_str().unwrap();
    let wav = data("speech_16k.wav");
    let embeds = data("embeds/single.safetensors");
    let cases: [(&[&str], &str); 5] = [
        (&["image", photo, photo, "x"], "image"),
        (&["video", clip, clip, "x"], "video"),
        (&["image", "--max-pixels", "1000", photo, "x"], "max_pixels"),
        (&["audio", wav.to_str().unwrap(), "x"], "audio"),
        (&["embeds", embeds.to_str().unwrap(), "x"], "embeddings"),
    ];
    for (args, named) in cases {
        let out = mmllm()
            .arg(args[0])
            .arg("--model")
            .arg(bare.path())
            .args(&args[1..])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("safetensors"),
            "{args:?} reached the weights: {stderr}"
        );
    }
}

/// A batch whose jobs hold one and two images: each job's images are tiled or padded by the
/// count in its own prompt, as one-shot runs do, while they are encoded together.
#[test]
fn batch_jobs_tile_by_their_own_image_count() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, two) = case("two_images");
    let files: Vec<String> = two["image_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| data(f.as_str().unwrap()).display().to_string())
        .collect();
    let manifest = json!({
        "defaults": {"model": dir(), "max_tokens": 16, "ignore_eos": true},
        "jobs": [
            {"id": "two", "prompt": "Compare the two pictures.", "images": files,
             "limit_mm_per_prompt": "image=2"},
            {"id": "one", "prompt": "What is in this image?", "images": [files[0]]},
        ]
    });
    // JSON is YAML.
    let path = tmp.path().join("jobs.yaml");
    std::fs::write(&path, manifest.to_string()).unwrap();
    let out = mmllm().arg("batch").arg(&path).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (line, name) in lines.iter().zip(["two_images", "one_image"]) {
        assert_reproduces(name, line);
    }
}
