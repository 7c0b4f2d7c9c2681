//! Phi-3-vision (`phi3_v`) against the authors' code (transformers 4.44.2, their
//! `Phi3VImageProcessor`, `Phi3VProcessor` and `Phi3VForCausalLM`) on a tiny random checkpoint
//! (tests/fixtures/generate_phi3v.py): token counts for odd and extreme sizes at 1, 4 and 16
//! crops, pixel values of real photos at num_crops 4 and 16, image features, prompt ids,
//! first-step and per-step logits (1e-4 relative, f32, CPU) and greedy ids for one image, two
//! images, a `--raw` prompt with tags, and a generation that crosses
//! `original_max_position_embeddings` (LongRoPE's switch to the long factors); then the CLI,
//! the batch manifest and the exit-2 errors.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use mmllm::media::image::{decode_image, ImageLimits};
use mmllm::media::{MediaItem, RgbImage};
use mmllm::models::phi3_v::{self, preprocessor, Phi3VModel, TAGS};
use mmllm::models::{Expansion, LoadContext, Model, ProcessorKwargs};
use mmllm::prompt::splice_numbered;
use serde_json::{json, Value};

use crate::util::{
    check_generation, flat, json_line, max_abs_diff, mmllm, read_json, repo, run_mmllm,
    tensor_rel_err, tensors, token_ids,
};

const CASES: [&str; 5] = [
    "c4_portrait",
    "c16_landscape",
    "c16_wide",
    "two_images",
    "raw_tags",
];
const STEPS: usize = 12;
const GLOBAL_ATOL: f32 = 1e-5;
const FEATURE_RTOL: f32 = 1e-5;

fn dir() -> PathBuf {
    repo().join("tests/fixtures/phi3v-tiny")
}

fn load() -> Phi3VModel {
    let ctx = LoadContext::from_dir(&dir(), &Device::Cpu, DType::F32).expect("config.json");
    phi3_v::load(&ctx).expect("load the tiny checkpoint")
}

fn case(name: &str) -> (HashMap<String, Tensor>, Value) {
    let expected = dir().join("expected");
    (
        tensors(&expected.join(format!("{name}.safetensors"))),
        read_json(&expected.join(format!("{name}.json"))),
    )
}

fn data(name: &str) -> PathBuf {
    repo().join("tests/data").join(name)
}

fn image(name: &str) -> RgbImage {
    let path = data(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    decode_image(&bytes, name, &ImageLimits::default()).unwrap()
}

fn files(meta: &Value) -> Vec<String> {
    meta["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect()
}

fn kwargs(meta: &Value) -> ProcessorKwargs {
    ProcessorKwargs {
        num_crops: meta["num_crops"].as_u64(),
        ..Default::default()
    }
}

#[test]
fn image_token_counts_match_the_reference_for_every_size() {
    let table = read_json(&dir().join("expected/token_counts.json"));
    let mut failures = 0;
    for row in table.as_array().unwrap() {
        let (h, w) = (
            row["height"].as_u64().unwrap() as u32,
            row["width"].as_u64().unwrap() as u32,
        );
        for n in [1, 4, 16] {
            let ours = preprocessor::image_tokens(w, h, n);
            match row[format!("c{n}")].as_u64() {
                Some(theirs) => assert_eq!(ours, Some(theirs as usize), "{h}x{w}, {n} crops"),
                // The reference fails to resize it: so does the processor, with exit 2.
                None => {
                    failures += 1;
                    assert_eq!(ours, None, "{h}x{w}, {n} crops");
                    let img = RgbImage::new(w, h);
                    let err = load_processor()
                        .preprocess(&img, n, "photo.jpg")
                        .unwrap_err();
                    assert_eq!(err.exit_code(), 2);
                    assert!(err.to_string().contains("photo.jpg"), "{err}");
                }
            }
        }
    }
    assert!(failures > 0, "no size the reference refuses");
}

fn load_processor() -> preprocessor::ImageProcessor {
    phi3_v::config::image_processor(&dir()).unwrap()
}

/// HD images (uint8, sampled), per-crop sums of the whole pixel tensor (zero padding
/// included) and the global views (sampled) of real photos at 4 and 16 crops.
#[test]
fn pixel_values_match_the_reference() {
    let processor = load_processor();
    assert_eq!(processor.num_crops, 4);
    for name in CASES {
        let (want, meta) = case(name);
        let n = meta["num_crops"].as_u64().unwrap() as usize;
        let sums: Vec<f64> = want["crop_sums"].flatten_all().unwrap().to_vec1().unwrap();
        let globals = flat(&want["global_sample"]);
        for (i, file) in files(&meta).iter().enumerate() {
            let img = image(file);
            let hd = processor.hd_image(&img, n, file).unwrap();
            let size = [hd.height() as u64, hd.width() as u64];
            assert_eq!(
                json!(size),
                meta["image_sizes"][i],
                "{name} {file}: HD size"
            );
            let sample: Vec<u8> = (0..hd.height())
                .step_by(5)
                .flat_map(|y| (0..hd.width()).step_by(5).map(move |x| (x, y)))
                .flat_map(|(x, y)| hd.get_pixel(x, y).0)
                .collect();
            let want_sample: Vec<u8> = want[&format!("hd_u8_sample_{i}")]
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(sample, want_sample, "{name} {file}: HD image");

            let px = processor.preprocess(&img, n, file).unwrap();
            assert_eq!(px.total, n + 1);
            let plane = 336 * 336;
            for crop in 0..px.total {
                for c in 0..3 {
                    let at = (crop * 3 + c) * plane;
                    let ours: f64 = px.data[at..at + plane].iter().map(|&v| v as f64).sum();
                    let theirs = sums[(i * px.total + crop) * 3 + c];
                    assert!(
                        (ours - theirs).abs() <= 1e-2,
                        "{name} {file}: crop {crop} channel {c}: sum {ours} vs {theirs}"
                    );
                }
            }
            let side = 112;
            let ours: Vec<f32> = (0..3)
                .flat_map(|c| (0..side).flat_map(move |y| (0..side).map(move |x| (c, y, x))))
                .map(|(c, y, x)| px.data[c * plane + 3 * y * 336 + 3 * x])
                .collect();
            let theirs = &globals[i * 3 * side * side..(i + 1) * 3 * side * side];
            let err = max_abs_diff(&ours, theirs);
            assert!(
                err <= GLOBAL_ATOL,
                "{name} {file}: global view max abs {err}"
            );
        }
    }
}

/// The prompt of a case, spliced as the app does: chunks between tags tokenized on their own.
fn spliced(
    model: &Phi3VModel,
    meta: &Value,
) -> (mmllm::prompt::Spliced, Vec<mmllm::models::EncodedItem>) {
    let tok = tokenizers::Tokenizer::from_file(dir().join("tokenizer.json")).unwrap();
    let items: Vec<MediaItem> = files(meta)
        .iter()
        .map(|f| MediaItem::Image(image(f)))
        .collect();
    let encoded: Vec<_> = items
        .iter()
        .map(|item| model.encode_with(item, &kwargs(meta)).unwrap())
        .collect();
    let expansions: Vec<(usize, Expansion)> = encoded
        .iter()
        .enumerate()
        .map(|(i, e)| (i, e.expansion.clone()))
        .collect();
    let prompt = splice_numbered(
        meta["prompt"].as_str().unwrap(),
        &TAGS,
        &expansions,
        "prompt",
        |chunk| Ok(tok.encode(chunk, true).unwrap().get_ids().to_vec()),
    )
    .unwrap();
    (prompt, encoded)
}

#[test]
fn features_prompt_ids_logits_and_greedy_ids_match_the_reference() {
    let model = load();
    for name in CASES {
        let (want, meta) = case(name);
        let (prompt, encoded) = spliced(&model, &meta);
        // The authors' ids mark image n's slots with -n.
        let theirs: Vec<i64> = meta["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(prompt.ids.len(), theirs.len(), "{name}: prompt length");
        let mut marked: Vec<i64> = prompt.ids.iter().map(|&id| id as i64).collect();
        for span in &prompt.spans {
            for slot in &mut marked[span.start..span.start + span.len] {
                *slot = -(span.item as i64 + 1);
            }
        }
        assert_eq!(marked, theirs, "{name}: prompt ids");
        let slots: Vec<u64> = encoded.iter().map(|e| e.expansion.slots as u64).collect();
        assert_eq!(json!(slots), meta["num_img_tokens"], "{name}: image tokens");

        let feats: Vec<Tensor> = encoded.iter().map(|e| e.features.clone()).collect();
        let feats = Tensor::cat(&feats, 0).unwrap();
        let err = tensor_rel_err(&feats, &want["image_features"]);
        eprintln!("{name}: features rel err {err:.2e}");
        assert!(err <= FEATURE_RTOL, "{name}: features rel err {err}");

        let mut cache = model.new_cache(prompt.ids.len() + STEPS).unwrap();
        let first = model.prefill(&prompt, &encoded, &mut cache).unwrap();
        let mut want = want.clone();
        want.insert(
            "logits".into(),
            want["step_logits"].get(0).unwrap().contiguous().unwrap(),
        );
        check_generation(&model, first, &mut cache, &want, &meta, name);
    }
}

/// The tiny config's `original_max_position_embeddings` lies inside the first case's
/// generation, so the steps above cover both factor tables and the switch between them; and
/// the long factors do change the logits (a model that never switched would fail there).
#[test]
fn a_generation_crosses_original_max_position_embeddings() {
    let (_, meta) = case("c4_portrait");
    let original = meta["original_max_position_embeddings"].as_u64().unwrap() as usize;
    let prompt = meta["prompt_tokens"].as_u64().unwrap() as usize;
    assert!(
        prompt < original && original < prompt + STEPS,
        "{prompt} {original}"
    );
    let cfg = read_json(&dir().join("config.json"));
    assert_eq!(cfg["original_max_position_embeddings"], json!(original));

    // Same weights with the long factors equal to the short ones: identical logits before
    // the switch, different after it.
    let tmp = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(dir()).unwrap() {
        let f = f.unwrap();
        if f.file_type().unwrap().is_file() {
            std::fs::copy(f.path(), tmp.path().join(f.file_name())).unwrap();
        }
    }
    let mut short_only = cfg.clone();
    short_only["rope_scaling"]["long_factor"] = cfg["rope_scaling"]["short_factor"].clone();
    std::fs::write(tmp.path().join("config.json"), short_only.to_string()).unwrap();
    let ctx = LoadContext::from_dir(tmp.path(), &Device::Cpu, DType::F32).unwrap();
    let altered = phi3_v::load(&ctx).unwrap();
    let model = load();
    let logits = |m: &Phi3VModel| {
        let (prompt, encoded) = spliced(m, &meta);
        let mut cache = m.new_cache(prompt.ids.len() + STEPS).unwrap();
        let mut out = vec![m.prefill(&prompt, &encoded, &mut cache).unwrap()];
        for &id in token_ids(&meta["greedy_ids"]).iter().take(STEPS - 1) {
            out.push(m.decode(id, &mut cache).unwrap());
        }
        out
    };
    let (a, b) = (logits(&model), logits(&altered));
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        let diff = max_abs_diff(&flat(x), &flat(y));
        // Step s decodes position prompt + s - 1 (step 0 is the prefill).
        let end = prompt + step;
        if end <= original {
            assert_eq!(diff, 0.0, "step {step} (positions end at {end})");
        } else {
            assert!(diff > 1e-3, "step {step} (positions end at {end}): {diff}");
        }
    }
}

#[test]
fn video_and_audio_are_refused() {
    let model = load();
    let audio = MediaItem::Audio(mmllm::media::Audio {
        samples: vec![0.0; 160],
        sample_rate: 16000,
    });
    assert_eq!(model.encode(&audio).unwrap_err().exit_code(), 2);
}

// ------------------------------------------------------------------------- the CLI, end to end

/// `mmllm image --model <tiny> --output jsonl --max-tokens 12 --ignore-eos <rest>`.
fn cli(rest: &[&str]) -> Value {
    let out = mmllm()
        .arg("image")
        .arg("--model")
        .arg(dir())
        .args(["--output", "jsonl", "--max-tokens", "12", "--ignore-eos"])
        .args(rest)
        .output()
        .unwrap();
    json_line(&out)
}

fn assert_reproduces(name: &str, got: &Value) {
    let (_, meta) = case(name);
    assert_eq!(
        token_ids(&got["token_ids"]),
        token_ids(&meta["greedy_ids"]),
        "{name}"
    );
    assert_eq!(
        got["usage"]["prompt_tokens"], meta["prompt_tokens"],
        "{name}: prompt tokens"
    );
}

fn paths(meta: &Value) -> Vec<String> {
    files(meta)
        .iter()
        .map(|f| data(f).display().to_string())
        .collect()
}

#[test]
fn cli_two_images_reproduce_the_reference() {
    let (_, meta) = case("two_images");
    let p = paths(&meta);
    let got = cli(&[
        &p[0],
        &p[1],
        "What is in each image?",
        "--limit-mm-per-prompt",
        "image=2",
    ]);
    assert_reproduces("two_images", &got);
    // One image, the checkpoint's 4 crops.
    let (_, meta) = case("c4_portrait");
    assert_reproduces(
        "c4_portrait",
        &cli(&[&paths(&meta)[0], "What is in this image?"]),
    );
}

#[test]
fn cli_num_crops_sets_the_grid() {
    for name in ["c16_landscape", "c16_wide"] {
        let (_, meta) = case(name);
        let got = cli(&["--num-crops", "16", &paths(&meta)[0], "Describe it."]);
        assert_reproduces(name, &got);
    }
}

#[test]
fn cli_raw_prompt_with_tags_reproduces_the_reference() {
    let (_, meta) = case("raw_tags");
    let p = paths(&meta);
    let got = cli(&[
        "--raw",
        "--limit-mm-per-prompt",
        "image=2",
        &p[0],
        &p[1],
        meta["prompt"].as_str().unwrap(),
    ]);
    assert_reproduces("raw_tags", &got);
}

#[test]
fn batch_num_crops_sets_the_grid_per_job() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, c16) = case("c16_landscape");
    let (_, c4) = case("c4_portrait");
    let manifest = json!({
        "defaults": {"model": dir(), "max_tokens": 12, "ignore_eos": true},
        "jobs": [
            {"id": "c16", "prompt": "Describe it.", "images": paths(&c16), "num_crops": 16},
            {"id": "c4", "prompt": "What is in this image?", "images": paths(&c4)},
        ]
    });
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
    for (line, name) in lines.iter().zip(["c16_landscape", "c4_portrait"]) {
        assert_reproduces(name, line);
    }
}

/// Wrong tags, too many images and settings the family lacks are refused with exit 2 before
/// any weights load: the model directory here has no weights at all.
#[test]
fn cli_refuses_before_loading() {
    let bare = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(dir().join(f), bare.path().join(f)).unwrap();
    }
    let photo = data("ov_china_83x59.jpg");
    let photo = photo.to_str().unwrap();
    let two = ["--limit-mm-per-prompt", "image=2", "--raw", photo, photo];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![photo, photo, "x"], "image"),
        (vec!["--raw", photo, "<|image_2|> x"], "<|image_2|>"),
        (vec!["--raw", photo, "no tag"], "<|image_1|> is missing"),
        (
            [&two[..], &["<|image_2|><|image_1|>"]].concat(),
            "<|image_2|>",
        ),
        (
            [&two[..], &["<|image_1|><|image_1|>"]].concat(),
            "<|image_1|>",
        ),
        (
            vec!["--raw", photo, "<|image_1|><|image_2|>"],
            "<|image_2|>",
        ),
        (vec![photo, "What is <|image_1|>?"], "templated prompt"),
        (vec!["--num-crops", "0", photo, "x"], "--num-crops"),
        (vec!["--num-crops", "65", photo, "x"], "--num-crops"),
        (vec!["--max-pixels", "1000", photo, "x"], "max_pixels"),
    ];
    for (args, named) in cases {
        let out = mmllm()
            .arg("image")
            .arg("--model")
            .arg(bare.path())
            .args(&args)
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
    // A family without the setting refuses --num-crops.
    let other = repo().join("tests/fixtures/llava-onevision-tiny");
    let out = run_mmllm(&[
        "image",
        "--model",
        other.to_str().unwrap(),
        "--num-crops",
        "4",
        photo,
        "x",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("num_crops"));
}
