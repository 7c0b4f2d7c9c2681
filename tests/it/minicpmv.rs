//! MiniCPM-V 2.6 against the authors' code (transformers 4.40.2) on a tiny random checkpoint
//! (tests/fixtures/generate_minicpmv.py): the processor's slices of real photographs (small,
//! 3x3, very wide, 1:33 and 33:1 strips; several `max_slice_nums`) byte for byte, placeholder ids for many sizes,
//! vision features, prompt ids, first-step logits (1e-4 relative, f32, CPU) and greedy ids for
//! one image, two images and 8 video frames; embeddings with `image_sizes` in both forms; then
//! the same ids through the CLI and a batch manifest, and the refusals.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use mmllm::media::image::{decode_image, ImageLimits};
use mmllm::media::{Embeds, MediaItem, Modality, RgbImage, Video};
use mmllm::models::minicpmv::{self, MiniCpmVModel};
use mmllm::models::{EncodedItem, Expansion, LoadContext, Model, ProcessorKwargs};
use mmllm::prompt::splice;
use serde_json::Value;

use crate::util::{
    argmax, flat, json_line, max_abs_diff, mmllm, read_json, repo, run_mmllm, tensor_rel_err,
    tensors, token_ids, LOGITS_RTOL,
};

const CASES: [&str; 9] = [
    "small",
    "grid3x3",
    "grid3x3_msn4",
    "grid3x3_msn1",
    "wide",
    "tall_extreme",
    "wide_extreme",
    "two_images",
    "video",
];

fn dir() -> PathBuf {
    repo().join("tests/fixtures/minicpmv-tiny")
}

fn load() -> MiniCpmVModel {
    let ctx = LoadContext::from_dir(&dir(), &Device::Cpu, DType::F32).expect("config.json");
    minicpmv::load(&ctx).expect("load the tiny checkpoint")
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

fn image(path: &Path) -> RgbImage {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    decode_image(&bytes, &path.display().to_string(), &ImageLimits::default()).unwrap()
}

fn files(meta: &Value) -> Vec<String> {
    meta["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| data(f.as_str().unwrap()).display().to_string())
        .collect()
}

fn is_video(meta: &Value) -> bool {
    meta["use_image_id"] == Value::Bool(false)
}

/// The case's media as the CLI sends them: images, or the frames as one video.
fn media(meta: &Value) -> Vec<MediaItem> {
    let images: Vec<RgbImage> = files(meta).iter().map(|f| image(Path::new(f))).collect();
    if is_video(meta) {
        let n = images.len();
        return vec![MediaItem::Video(Video {
            frames: images,
            timestamps: (0..n).map(|i| i as f64).collect(),
            source_fps: 1.0,
            duration: n as f64,
        })];
    }
    images.into_iter().map(MediaItem::Image).collect()
}

fn kwargs(meta: &Value) -> ProcessorKwargs {
    ProcessorKwargs {
        max_slice_nums: meta["max_slice_nums"].as_u64().filter(|_| !is_video(meta)),
        ..Default::default()
    }
}

fn encode_all(
    model: &MiniCpmVModel,
    items: &[MediaItem],
    kwargs: &ProcessorKwargs,
) -> Vec<EncodedItem> {
    items
        .iter()
        .zip(kwargs.for_items(items))
        .map(|(item, k)| model.encode_with(item, &k).unwrap())
        .collect()
}

/// FNV-1a (64 bit), as the generator digests the processor's uint8 slices.
fn fnv1a(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// The reference's prompt as our template writes it (`<image>` for each `(<image>./</image>)`,
/// one `<unk>` line for the frames of a video), tokenized.
fn our_prompt_ids(meta: &Value) -> Vec<u32> {
    let tok = tokenizers::Tokenizer::from_file(dir().join("tokenizer.json")).unwrap();
    let mut text = meta["prompt"].as_str().unwrap().to_string();
    if is_video(meta) {
        let frames = "(<image>./</image>)\n".repeat(files(meta).len());
        text = text.replace(&frames, "<unk>\n");
    } else {
        text = text.replace("(<image>./</image>)", "<image>");
    }
    tok.encode(text, false).unwrap().get_ids().to_vec()
}

/// Splices `encoded` into the case's prompt; the ids must be the reference's.
fn spliced(
    model: &MiniCpmVModel,
    meta: &Value,
    items: &[MediaItem],
    encoded: &[EncodedItem],
    name: &str,
) -> mmllm::prompt::Spliced {
    let t = model.tokens();
    let expansions: Vec<(Modality, Expansion)> = items
        .iter()
        .zip(encoded)
        .map(|(m, e)| (m.modality(), e.expansion.clone()))
        .collect();
    let prompt = splice(
        &our_prompt_ids(meta),
        &[(Modality::Image, t.im_start), (Modality::Video, t.unk)],
        &expansions,
        "prompt",
    )
    .unwrap();
    assert_eq!(
        prompt.ids,
        token_ids(&meta["prompt_ids"]),
        "{name}: prompt ids"
    );
    prompt
}

/// Prefill, then greedy decoding: first-step logits within 1e-4 and the reference's ids.
fn check_generation(
    model: &MiniCpmVModel,
    prompt: &mmllm::prompt::Spliced,
    encoded: &[EncodedItem],
    want: &HashMap<String, Tensor>,
    meta: &Value,
    name: &str,
) {
    let want_ids = token_ids(&meta["greedy_ids"]);
    let mut cache = model.new_cache(prompt.ids.len() + want_ids.len()).unwrap();
    let mut logits = model.prefill(prompt, encoded, &mut cache).unwrap();
    let err = tensor_rel_err(&logits, &want["logits"]);
    eprintln!("{name}: first-step logits rel err {err:.3e}");
    assert!(
        err <= LOGITS_RTOL,
        "{name}: first-step logits rel err {err}"
    );
    let mut ids = Vec::new();
    for step in 0..want_ids.len() {
        let id = argmax(&logits.to_vec1::<f32>().unwrap());
        ids.push(id);
        if step + 1 < want_ids.len() {
            logits = model.decode(id, &mut cache).unwrap();
        }
    }
    assert_eq!(ids, want_ids, "{name}: greedy ids");
}

// ------------------------------------------------------------------------------ preprocessing

#[test]
fn slices_of_real_photographs_match_the_processor_byte_for_byte() {
    let model = load();
    for name in CASES {
        let (want, meta) = case(name);
        let msn = meta["max_slice_nums"].as_u64().map(|n| n as usize);
        let mut got = Vec::new();
        for f in files(&meta) {
            got.extend(model.slices(&image(Path::new(&f)), msn).0);
        }
        let slices = meta["slices"].as_array().unwrap();
        assert_eq!(got.len(), slices.len(), "{name}: slice count");
        for (i, (g, w)) in got.iter().zip(slices).enumerate() {
            let (gw, gh) = g.dimensions();
            assert_eq!(
                (u64::from(gw), u64::from(gh)),
                (w["width"].as_u64().unwrap(), w["height"].as_u64().unwrap()),
                "{name}: slice {i} size"
            );
            assert_eq!(
                [u64::from(gh) / 14, u64::from(gw) / 14],
                [
                    w["tgt_size"][0].as_u64().unwrap(),
                    w["tgt_size"][1].as_u64().unwrap()
                ],
                "{name}: slice {i} tgt_size"
            );
            assert_eq!(
                fnv1a(g.as_raw()),
                w["fnv1a"].as_str().unwrap(),
                "{name}: slice {i} pixels"
            );
        }
        // The first 16 patches of the first slice, normalised and laid out as the processor's
        // `reshape_by_patch` (3, 14, patches * 14).
        let px = flat(&model.slice_pixels(&got[0]).unwrap());
        let (w, h) = got[0].dimensions();
        let (w, h) = (w as usize, h as usize);
        let cols = w / 14;
        let mut strip = Vec::new();
        for c in 0..3 {
            for r in 0..14 {
                for k in 0..16 {
                    let (pr, pc) = (k / cols, k % cols);
                    for x in 0..14 {
                        strip.push(px[c * h * w + (pr * 14 + r) * w + pc * 14 + x]);
                    }
                }
            }
        }
        let diff = max_abs_diff(&strip, &flat(&want["pixels_first_slice"]));
        assert!(diff <= 1e-6, "{name}: normalised pixels differ by {diff}");
    }
}

#[test]
fn placeholders_match_the_processor_for_every_size() {
    let model = load();
    let rows = read_json(&dir().join("expected/placeholders.json"));
    let rows = rows.as_array().unwrap();
    assert!(rows.len() > 200);
    for row in rows {
        let (w, h) = (
            row["width"].as_u64().unwrap() as u32,
            row["height"].as_u64().unwrap() as u32,
        );
        let msn = row["max_slice_nums"].as_u64().unwrap() as usize;
        let index = row["index"].as_u64().unwrap() as usize;
        let ids = model.placeholder(w, h, Some(msn), Some(index));
        let text: Vec<String> = ids.iter().map(u32::to_string).collect();
        let what = format!("{w}x{h}, max_slice_nums {msn}, image {index}");
        assert_eq!(
            ids.len() as u64,
            row["len"].as_u64().unwrap(),
            "{what}: count"
        );
        assert_eq!(
            fnv1a(text.join(",").as_bytes()),
            row["fnv1a"].as_str().unwrap(),
            "{what}: ids"
        );
        let grid = minicpmv::preprocessor::sliced_grid(w, h, msn, 448);
        let want: Option<(usize, usize)> = row["grid"].as_array().map(|g| {
            (
                g[0].as_u64().unwrap() as usize,
                g[1].as_u64().unwrap() as usize,
            )
        });
        assert_eq!(grid, want, "{what}: grid");
    }
}

// ------------------------------------------------------------------------------------- model

#[test]
fn vision_features_match_the_resampler_output() {
    let model = load();
    for name in ["small", "grid3x3", "two_images"] {
        let (want, meta) = case(name);
        for (i, f) in files(&meta).iter().enumerate() {
            let (got, _) = model.image_features(&image(Path::new(f)), None).unwrap();
            let err = tensor_rel_err(&got, &want[&format!("features_{i}")]);
            eprintln!("{name}: image {i} features rel err {err:.3e}");
            assert!(err <= 1e-4, "{name}: image {i} features rel err {err}");
        }
    }
}

#[test]
fn logits_and_greedy_ids_match_the_reference() {
    let model = load();
    for name in CASES {
        let (want, meta) = case(name);
        let items = media(&meta);
        let encoded = encode_all(&model, &items, &kwargs(&meta));
        let prompt = spliced(&model, &meta, &items, &encoded, name);
        check_generation(&model, &prompt, &encoded, &want, &meta, name);
    }
}

fn embeds_item(features: &Tensor, size: &Value, per_slice: bool) -> MediaItem {
    let (n, d) = features.dims2().unwrap();
    let emb = if per_slice {
        features.reshape((n / 64, 64, d)).unwrap()
    } else {
        features.unsqueeze(0).unwrap()
    };
    let sizes: Vec<i64> = size
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let sizes = Tensor::from_vec(sizes, (1, 2), &Device::Cpu).unwrap();
    MediaItem::Embeds(Embeds {
        modality: Modality::Image,
        tensors: [
            ("image_embeds".to_string(), emb),
            ("image_sizes".to_string(), sizes),
        ]
        .into(),
    })
}

#[test]
fn embeds_with_image_sizes_reproduce_the_image_path() {
    let model = load();
    for (name, per_slice) in [("small", false), ("grid3x3", true), ("two_images", false)] {
        let (want, meta) = case(name);
        let items: Vec<MediaItem> = meta["image_sizes"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, size)| embeds_item(&want[&format!("features_{i}")], size, per_slice))
            .collect();
        let encoded = encode_all(&model, &items, &ProcessorKwargs::default());
        let prompt = spliced(&model, &meta, &items, &encoded, name);
        check_generation(
            &model,
            &prompt,
            &encoded,
            &want,
            &meta,
            &format!("{name} embeds"),
        );
    }
}

#[test]
fn embeds_of_the_wrong_shape_or_size_are_input_errors() {
    let model = load();
    let (want, meta) = case("grid3x3");
    let feats = &want["features_0"];
    // The size of a small image: 1 slice expected, 10 given.
    let small = embeds_item(feats, &serde_json::json!([517, 333]), false);
    let err = model.encode(&small).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("(1, 64, 128)"), "{err}");
    // No image_sizes at all.
    let MediaItem::Embeds(mut e) = embeds_item(feats, &meta["image_sizes"][0], false) else {
        unreachable!()
    };
    e.tensors.remove("image_sizes");
    let err = model.encode(&MediaItem::Embeds(e.clone())).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("image_sizes"), "{err}");
    // A size that is not a pair of whole pixel counts.
    e.tensors.insert(
        "image_sizes".into(),
        Tensor::new(&[[1330f32, 0.5]], &Device::Cpu).unwrap(),
    );
    assert_eq!(
        model.encode(&MediaItem::Embeds(e)).unwrap_err().exit_code(),
        2
    );
}

// ------------------------------------------------------------------------- the CLI, end to end

fn cli(command: &str, rest: &[&str]) -> Value {
    let out = mmllm()
        .arg(command)
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
        got["usage"]["prompt_tokens"].as_u64(),
        Some(token_ids(&meta["prompt_ids"]).len() as u64),
        "{name}: prompt tokens"
    );
}

#[test]
fn cli_images_reproduce_the_reference() {
    for name in ["small", "grid3x3", "wide", "tall_extreme"] {
        let (_, meta) = case(name);
        let f = files(&meta);
        let got = cli("image", &[&f[0], meta["question"].as_str().unwrap()]);
        assert_reproduces(name, &got);
    }
}

#[test]
fn cli_max_slice_nums_reaches_the_processor() {
    for (name, n) in [("grid3x3_msn4", "4"), ("grid3x3_msn1", "1")] {
        let (_, meta) = case(name);
        let f = files(&meta);
        let got = cli(
            "image",
            &[
                "--max-slice-nums",
                n,
                &f[0],
                meta["question"].as_str().unwrap(),
            ],
        );
        assert_reproduces(name, &got);
    }
    let (_, meta) = case("small");
    let f = files(&meta);
    let zero = run_mmllm(&[
        "image",
        "--model",
        dir().to_str().unwrap(),
        "--max-slice-nums",
        "0",
        &f[0],
        "x",
    ]);
    assert_eq!(zero.status.code(), Some(2));
    // Other families have no such setting: refused before loading.
    let ov = repo().join("tests/fixtures/llava-onevision-tiny");
    let other = run_mmllm(&[
        "image",
        "--model",
        ov.to_str().unwrap(),
        "--max-slice-nums",
        "2",
        &f[0],
        "x",
    ]);
    assert_eq!(other.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&other.stderr).contains("max_slice_nums"));
}

#[test]
fn cli_two_images_need_a_raised_limit_and_reproduce_the_reference() {
    let (_, meta) = case("two_images");
    let f = files(&meta);
    let q = meta["question"].as_str().unwrap();
    let refused = run_mmllm(&["image", "--model", dir().to_str().unwrap(), &f[0], &f[1], q]);
    assert_eq!(refused.status.code(), Some(2));
    let got = cli(
        "image",
        &["--limit-mm-per-prompt", "image=2", &f[0], &f[1], q],
    );
    assert_reproduces("two_images", &got);
}

#[test]
fn cli_video_frames_reproduce_the_reference() {
    let (_, meta) = case("video");
    let frames = data("qwen_video");
    let got = cli(
        "video",
        &[frames.to_str().unwrap(), meta["question"].as_str().unwrap()],
    );
    assert_reproduces("video", &got);
}

/// Writes `tensors` as one safetensors file.
fn save(path: &Path, tensors: &[(&str, Tensor)]) {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

#[test]
fn cli_embeds_take_image_sizes_in_the_file_or_beside_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (want, meta) = case("grid3x3");
    let feats = want["features_0"].unsqueeze(0).unwrap();
    let sizes = Tensor::new(&[[1330i64, 1240]], &Device::Cpu).unwrap();
    let q = meta["question"].as_str().unwrap();
    let both = tmp.path().join("both.safetensors");
    save(
        &both,
        &[
            ("image_embeds", feats.clone()),
            ("image_sizes", sizes.clone()),
        ],
    );
    assert_reproduces("grid3x3", &cli("embeds", &[both.to_str().unwrap(), q]));

    let alone = tmp.path().join("feats.safetensors");
    let size_file = tmp.path().join("sizes.safetensors");
    save(&alone, &[("image_embeds", feats.clone())]);
    save(&size_file, &[("image_sizes", sizes)]);
    let got = cli(
        "embeds",
        &[
            "--image-sizes",
            size_file.to_str().unwrap(),
            alone.to_str().unwrap(),
            q,
        ],
    );
    assert_reproduces("grid3x3", &got);

    // Without image_sizes, or with the wrong size: exit 2 naming the expected shape.
    let model = dir().display().to_string();
    let out = run_mmllm(&["embeds", "--model", &model, alone.to_str().unwrap(), q]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("image_sizes"));
    let wrong = tmp.path().join("wrong.safetensors");
    let small = Tensor::new(&[[517i64, 333]], &Device::Cpu).unwrap();
    save(&wrong, &[("image_embeds", feats), ("image_sizes", small)]);
    let out = run_mmllm(&["embeds", "--model", &model, wrong.to_str().unwrap(), q]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("(1, 64, 128)"), "{stderr}");
}

#[test]
fn manifest_jobs_take_image_sizes_and_max_slice_nums() {
    let tmp = tempfile::tempdir().unwrap();
    let (want, meta) = case("small");
    let feats = want["features_0"].unsqueeze(0).unwrap();
    save(
        &tmp.path().join("feats.safetensors"),
        &[("image_embeds", feats)],
    );
    save(
        &tmp.path().join("sizes.safetensors"),
        &[(
            "image_sizes",
            Tensor::new(&[[517i64, 333]], &Device::Cpu).unwrap(),
        )],
    );
    let (_, msn4) = case("grid3x3_msn4");
    let yaml = format!(
        "defaults:\n  model: {}\n  max_tokens: 12\n  ignore_eos: true\njobs:\n\
         \x20 - id: emb\n    prompt: {:?}\n    embeds: [feats.safetensors]\n    image_sizes: sizes.safetensors\n\
         \x20 - id: msn4\n    prompt: {:?}\n    images: [{:?}]\n    max_slice_nums: 4\n",
        dir().display(),
        meta["question"].as_str().unwrap(),
        msn4["question"].as_str().unwrap(),
        files(&msn4)[0],
    );
    let manifest = tmp.path().join("jobs.yaml");
    std::fs::write(&manifest, yaml).unwrap();
    let out = mmllm()
        .args(["batch", "--device", "cpu"])
        .arg(&manifest)
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        token_ids(&lines[0]["token_ids"]),
        token_ids(&meta["greedy_ids"]),
        "emb"
    );
    assert_eq!(
        token_ids(&lines[1]["token_ids"]),
        token_ids(&msn4["greedy_ids"]),
        "msn4"
    );
}

#[test]
fn other_minicpm_v_versions_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, tmp.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let mut config = read_json(&dir().join("config.json"));
    config["version"] = serde_json::json!(2.5);
    std::fs::write(tmp.path().join("config.json"), config.to_string()).unwrap();
    let (_, meta) = case("small");
    let f = files(&meta);
    let out = run_mmllm(&["image", "--model", tmp.path().to_str().unwrap(), &f[0], "x"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("MiniCPM-V version 2.5"), "{stderr}");
}
