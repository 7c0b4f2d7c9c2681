//! Qwen2-VL / Qwen2.5-VL against transformers 5.23 on tiny random checkpoints
//! (tests/fixtures/generate_qwen2_vl.py): preprocessing shapes and values, M-RoPE positions,
//! first-step logits (1e-4 relative, f32, CPU) and 16 greedy tokens for one image, two images,
//! an 8-frame video and precomputed image embeds.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use mmllm::media::{Embeds, MediaItem, Modality, RgbImage, Video};
use mmllm::models::qwen2_vl::preprocessor::{preprocess_image, preprocess_video};
use mmllm::models::qwen2_vl::{self, ItemGrid, ProcessorConfig, Qwen2VlModel};
use mmllm::models::{EncodedItem, Expansion, Model};
use mmllm::prompt::{splice, Spliced};
use serde_json::Value;

use crate::util::{
    argmax, check_generation, max_abs_diff, read_json, repo, tensor_rel_err, tensors, token_ids,
};

const PIXEL_ATOL: f32 = 1e-5;
const MODELS: [&str; 2] = ["qwen2-vl-tiny", "qwen2_5-vl-tiny"];

fn fixture(model: &str) -> PathBuf {
    repo().join("tests/fixtures").join(model)
}

fn expected(name: &str) -> HashMap<String, Tensor> {
    tensors(&fixture("qwen2-vl-tiny").join("expected").join(name))
}

fn case(model: &str, name: &str) -> (HashMap<String, Tensor>, Value) {
    let dir = fixture(model).join("expected");
    let tensors = tensors(&dir.join(format!("{name}.safetensors")));
    let meta: Value = read_json(&dir.join(format!("{name}.json")));
    (tensors, meta)
}

fn load(model: &str) -> Qwen2VlModel {
    qwen2_vl::load(&fixture(model), &Device::Cpu, DType::F32).expect("load tiny model")
}

fn png(path: &Path) -> RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

/// JPEG through libjpeg-turbo, as Pillow decodes it.
fn jpeg(path: &Path) -> RgbImage {
    let bytes = std::fs::read(path).unwrap();
    let img = turbojpeg::decompress(&bytes, turbojpeg::PixelFormat::RGB).unwrap();
    assert_eq!(img.pitch, img.width * 3);
    RgbImage::from_raw(img.width as u32, img.height as u32, img.pixels).unwrap()
}

fn frames() -> Vec<RgbImage> {
    (0..8)
        .map(|i| png(&repo().join(format!("tests/data/qwen_video/frame_{i}.png"))))
        .collect()
}

fn i64s(t: &Tensor) -> Vec<i64> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn grids(t: &Tensor) -> Vec<[usize; 3]> {
    i64s(t)
        .chunks(3)
        .map(|g| [g[0] as usize, g[1] as usize, g[2] as usize])
        .collect()
}

fn assert_pixels(ours: &[f32], theirs: &Tensor, what: &str) {
    let theirs: Vec<f32> = theirs.flatten_all().unwrap().to_vec1().unwrap();
    let err = max_abs_diff(ours, &theirs);
    eprintln!("{what}: pixel max abs err {err:.3e}");
    assert!(err <= PIXEL_ATOL, "{what}: pixel values differ by {err}");
}

// ---------------------------------------------------------------- preprocessing

#[test]
fn grids_match_transformers_for_odd_sizes() {
    let shapes: Value = read_json(&fixture("qwen2-vl-tiny").join("expected/shapes.json"));
    let model_cfg = qwen2_vl::Processors::load(&fixture("qwen2-vl-tiny"))
        .unwrap()
        .image;
    for row in shapes.as_array().unwrap() {
        let (h, w) = (
            row["height"].as_u64().unwrap() as u32,
            row["width"].as_u64().unwrap() as u32,
        );
        let img = RgbImage::from_pixel(w, h, image::Rgb([120, 30, 200]));
        for (key, cfg) in [
            ("fixture", &model_cfg),
            ("default", &ProcessorConfig::image_default()),
        ] {
            let p = preprocess_image(&img, cfg).unwrap();
            let want: Vec<usize> = row[key]["grid"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(p.grid_thw.to_vec(), want, "{w}x{h} with the {key} config");
            assert_eq!(p.pixel_values.len(), p.num_patches() * 1176);
        }
    }
}

#[test]
fn small_image_with_low_min_pixels_keeps_its_grid() {
    // 28 high x 56 wide, min_pixels lowered to one merged patch: no upscaling.
    let cfg = ProcessorConfig {
        min_pixels: 28 * 28,
        ..ProcessorConfig::image_default()
    };
    let img = RgbImage::from_fn(56, 28, |x, y| image::Rgb([x as u8, y as u8, 7]));
    let p = preprocess_image(&img, &cfg).unwrap();
    assert_eq!(p.grid_thw, [1, 2, 4]);
    let t = p.to_tensor(&Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[8, 1176]);
    // Row 1 is the patch right of the first (same merge block); its first value is channel 0
    // of pixel (y=0, x=14), normalized.
    let v: Vec<Vec<f32>> = t.to_vec2().unwrap();
    let expect = ((14.0f64 / 255.0) as f32 - cfg.image_mean[0]) / cfg.image_std[0];
    assert!((v[1][0] - expect).abs() < 1e-6);
    // The temporal copy of an image repeats the frame: T index 1 equals T index 0.
    assert_eq!(v[1][..196], v[1][196..392]);
}

#[test]
fn aspect_ratio_over_200_is_an_input_error() {
    let img = RgbImage::new(402, 2);
    let err = preprocess_image(&img, &ProcessorConfig::image_default()).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("aspect ratio"), "{err}");
}

#[test]
fn image_on_the_patch_grid_matches_transformers_pixels() {
    // 56x56 needs no resize, so this checks normalization and patch order exactly.
    let cfg = qwen2_vl::Processors::load(&fixture("qwen2-vl-tiny"))
        .unwrap()
        .image;
    let p = preprocess_image(&frames()[0], &cfg).unwrap();
    let e = expected("pixels_frame0.safetensors");
    assert_eq!(p.grid_thw.to_vec(), grids(&e["image_grid_thw"])[0].to_vec());
    assert_pixels(&p.pixel_values, &e["pixel_values"], "frame0 as image");
}

#[test]
fn video_frames_match_transformers_pixels() {
    let cfg = qwen2_vl::Processors::load(&fixture("qwen2-vl-tiny"))
        .unwrap()
        .video;
    let p = preprocess_video(&frames(), &cfg).unwrap();
    let e = expected("pixels_video.safetensors");
    assert_eq!(p.grid_thw.to_vec(), grids(&e["video_grid_thw"])[0].to_vec());
    assert_pixels(&p.pixel_values, &e["pixel_values_videos"], "video");
}

#[test]
fn odd_frame_count_is_padded_with_the_last_frame() {
    let cfg = qwen2_vl::Processors::load(&fixture("qwen2-vl-tiny"))
        .unwrap()
        .video;
    let f = frames();
    let p = preprocess_video(&f[..3], &cfg).unwrap();
    assert_eq!(p.grid_thw, [2, 4, 4]);
    // Temporal group 1 holds frames 2 and 2 (padded): its two T slices are equal.
    let row = &p.pixel_values[16 * 1176..17 * 1176];
    assert_eq!(row[..196], row[196..392]);
}

#[test]
fn photo_pixel_values_match_transformers() {
    let cfg = qwen2_vl::Processors::load(&fixture("qwen2-vl-tiny"))
        .unwrap()
        .image;
    for (file, name) in [
        ("qwen_china_517x333.jpg", "pixels_china.safetensors"),
        ("qwen_flower_637x127.jpg", "pixels_flower.safetensors"),
    ] {
        let img = jpeg(&repo().join("tests/data").join(file));
        let p = preprocess_image(&img, &cfg).unwrap();
        let e = expected(name);
        assert_eq!(
            p.grid_thw.to_vec(),
            grids(&e["image_grid_thw"])[0].to_vec(),
            "{file}"
        );
        assert_pixels(&p.pixel_values, &e["pixel_values"], file);
    }
}

// ---------------------------------------------------------------- model parity

/// Items of a case built from transformers' recorded pixel values (so model parity does not
/// depend on the resampler).
fn items_from_hf_pixels(
    model: &Qwen2VlModel,
    model_name: &str,
    case_name: &str,
    meta: &Value,
) -> (Vec<(Modality, EncodedItem)>, Vec<ItemGrid>) {
    let cfg = model.config();
    let mut items = Vec::new();
    let mut item_grids = Vec::new();
    let mut push = |modality, pv: Tensor, grid: [usize; 3], interval: f32| {
        let features = model.encode_patches(&pv, grid).unwrap();
        let token = if modality == Modality::Video {
            cfg.video_token_id
        } else {
            cfg.image_token_id
        };
        let slots = grid[0] * grid[1] / 2 * grid[2] / 2;
        let expansion = Expansion {
            before: vec![],
            slot_token: token,
            slots,
            after: vec![],
            slot_ids: Vec::new(),
        };
        items.push((
            modality,
            EncodedItem {
                expansion,
                features,
                grid: None,
            },
        ));
        item_grids.push(ItemGrid {
            grid_thw: grid,
            time_interval: interval,
        });
    };
    if case_name == "video" {
        let e = expected("pixels_video.safetensors");
        let grid = grids(&e["video_grid_thw"])[0];
        // Qwen2.5-VL: tokens_per_second * second_per_grid_t.
        let interval = match meta.get("second_per_grid_ts") {
            Some(s) if model_name.starts_with("qwen2_5") => {
                cfg.vision.tokens_per_second as f32 * s[0].as_f64().unwrap() as f32
            }
            _ => 1.0,
        };
        push(
            Modality::Video,
            e["pixel_values_videos"].clone(),
            grid,
            interval,
        );
    } else {
        let names: &[&str] = if case_name == "one_image" {
            &["china"]
        } else {
            &["china", "flower"]
        };
        for n in names {
            let e = expected(&format!("pixels_{n}.safetensors"));
            push(
                Modality::Image,
                e["pixel_values"].clone(),
                grids(&e["image_grid_thw"])[0],
                1.0,
            );
        }
    }
    (items, item_grids)
}

fn spliced(model: &Qwen2VlModel, meta: &Value, items: &[(Modality, EncodedItem)]) -> Spliced {
    let cfg = model.config();
    let expansions: Vec<(Modality, Expansion)> = items
        .iter()
        .map(|(m, it)| (*m, it.expansion.clone()))
        .collect();
    splice(
        &token_ids(&meta["prompt_ids"]),
        &[
            (Modality::Image, cfg.image_token_id),
            (Modality::Video, cfg.video_token_id),
        ],
        &expansions,
        "prompt",
    )
    .unwrap()
}

fn run_hf_pixels_case(model_name: &str, case_name: &str) {
    run_hf_pixels_case_with(&load(model_name), model_name, case_name);
}

fn run_hf_pixels_case_with(model: &Qwen2VlModel, model_name: &str, case_name: &str) {
    let (want, meta) = case(model_name, case_name);
    let what = format!("{model_name}/{case_name}");
    let (items, item_grids) = items_from_hf_pixels(model, model_name, case_name, &meta);
    let prompt = spliced(model, &meta, &items);
    assert_eq!(
        prompt.ids.iter().map(|&i| i as i64).collect::<Vec<_>>(),
        i64s(&want["input_ids"]),
        "{what}: expanded input ids"
    );
    let (positions, delta) = model.position_ids(&prompt, &item_grids).unwrap();
    let hf_pos = i64s(&want["position_ids"]);
    let n = positions.len();
    for row in 0..3 {
        let ours: Vec<i64> = positions.iter().map(|p| p[row]).collect();
        assert_eq!(
            ours,
            hf_pos[row * n..(row + 1) * n],
            "{what}: position row {row}"
        );
    }
    assert_eq!(delta, i64s(&want["rope_deltas"])[0], "{what}: rope delta");

    let encoded: Vec<EncodedItem> = items.into_iter().map(|(_, it)| it).collect();
    let mut cache = model.new_cache(prompt.ids.len() + 32).unwrap();
    let first = model
        .prefill_with_grids(&prompt, &encoded, &item_grids, &mut cache)
        .unwrap();
    assert_eq!(cache.rope_delta, delta);
    check_generation(model, first, &mut cache, &want, &meta, &what);
}

#[test]
fn tokenizer_matches_transformers_prompt_ids() {
    let tok =
        tokenizers::Tokenizer::from_file(fixture("qwen2-vl-tiny").join("tokenizer.json")).unwrap();
    for name in ["one_image", "two_images", "video"] {
        let (_, meta) = case("qwen2-vl-tiny", name);
        let enc = tok.encode(meta["text"].as_str().unwrap(), false).unwrap();
        assert_eq!(
            enc.get_ids(),
            token_ids(&meta["prompt_ids"]).as_slice(),
            "{name}"
        );
    }
}

#[test]
fn qwen2_vl_one_image_matches_transformers() {
    run_hf_pixels_case(MODELS[0], "one_image");
}

#[test]
fn qwen2_vl_two_images_match_transformers() {
    run_hf_pixels_case(MODELS[0], "two_images");
}

#[test]
fn qwen2_vl_video_matches_transformers() {
    run_hf_pixels_case(MODELS[0], "video");
}

#[test]
fn qwen2_5_vl_one_image_matches_transformers() {
    run_hf_pixels_case(MODELS[1], "one_image");
}

#[test]
fn qwen2_5_vl_two_images_match_transformers() {
    run_hf_pixels_case(MODELS[1], "two_images");
}

#[test]
fn qwen2_5_vl_video_matches_transformers() {
    run_hf_pixels_case(MODELS[1], "video");
}

/// The same checkpoint as the hub ships Qwen2-VL: flat `config.json` with `rope_scaling`
/// `{"type": "mrope"}` and `in_chans`, weights named `visual.*` / `model.*` in two shards, and a
/// `preprocessor_config.json` with `min_pixels`/`max_pixels` and no video config.
fn hub_layout_copy(model_name: &str) -> tempfile::TempDir {
    let src = fixture(model_name);
    let dir = tempfile::tempdir().unwrap();
    let tensors = tensors(&src.join("model.safetensors"));
    let renamed: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| {
            let k = if let Some(r) = k.strip_prefix("model.visual.") {
                format!("visual.{r}")
            } else if let Some(r) = k.strip_prefix("model.language_model.") {
                format!("model.{r}")
            } else {
                k
            };
            (k, v)
        })
        .collect();
    // Sharded in two, with the index the hub ships.
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut weight_map = serde_json::Map::new();
    for (k, v) in renamed {
        let shard = if k.starts_with("visual.") {
            "model-00001-of-00002.safetensors"
        } else {
            "model-00002-of-00002.safetensors"
        };
        weight_map.insert(k.clone(), Value::from(shard));
        if k.starts_with("visual.") {
            a.insert(k, v);
        } else {
            b.insert(k, v);
        }
    }
    candle_core::safetensors::save(&a, dir.path().join("model-00001-of-00002.safetensors"))
        .unwrap();
    candle_core::safetensors::save(&b, dir.path().join("model-00002-of-00002.safetensors"))
        .unwrap();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();

    let mut config: Value = read_json(&src.join("config.json"));
    let obj = config.as_object_mut().unwrap();
    let text = obj.remove("text_config").unwrap();
    let rope = text["rope_parameters"].clone();
    for (k, v) in text.as_object().unwrap() {
        if !["rope_parameters", "model_type"].contains(&k.as_str()) {
            obj.insert(k.clone(), v.clone());
        }
    }
    obj.insert("rope_theta".into(), rope["rope_theta"].clone());
    obj.insert(
        "rope_scaling".into(),
        serde_json::json!({"type": "mrope", "mrope_section": rope["mrope_section"]}),
    );
    let vision = obj
        .get_mut("vision_config")
        .unwrap()
        .as_object_mut()
        .unwrap();
    let ch = vision.remove("in_channels").unwrap();
    vision.insert("in_chans".into(), ch);
    vision.remove("rope_parameters");
    if model_name == MODELS[0] {
        // Qwen2-VL's hub config leaves the vision activation to its default (quick_gelu).
        vision.remove("hidden_act");
    }
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();

    let processor: Value = read_json(&src.join("processor_config.json"));
    let mut image = processor["image_processor"].clone();
    let size = image.as_object_mut().unwrap().remove("size").unwrap();
    image["min_pixels"] = size["shortest_edge"].clone();
    image["max_pixels"] = size["longest_edge"].clone();
    std::fs::write(
        dir.path().join("preprocessor_config.json"),
        image.to_string(),
    )
    .unwrap();
    dir
}

#[test]
fn hub_layout_checkpoints_load_the_same_model() {
    for m in MODELS {
        let dir = hub_layout_copy(m);
        let model = qwen2_vl::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
        let original = qwen2_vl::Processors::load(&fixture(m)).unwrap();
        assert_eq!(model.processors().image, original.image);
        // No video config: the image processor's settings apply to video, as in transformers.
        assert_eq!(
            model.processors().video.max_pixels,
            original.image.max_pixels
        );
        run_hf_pixels_case_with(&model, m, "two_images");
    }
}

// ---------------------------------------------------------------- through the Model trait

/// encode -> splice -> prefill -> decode, as the engine drives a model.
fn run_trait_case(model_name: &str, case_name: &str, media: Vec<MediaItem>) {
    let model = load(model_name);
    let (want, meta) = case(model_name, case_name);
    let what = format!("{model_name}/{case_name} (Model trait)");
    let items: Vec<(Modality, EncodedItem)> = media
        .iter()
        .map(|m| (m.modality(), model.encode(m).unwrap()))
        .collect();
    let prompt = spliced(&model, &meta, &items);
    assert_eq!(
        prompt.ids.iter().map(|&i| i as i64).collect::<Vec<_>>(),
        i64s(&want["input_ids"]),
        "{what}: expanded input ids"
    );
    let encoded: Vec<EncodedItem> = items.into_iter().map(|(_, it)| it).collect();
    let mut cache = model.new_cache(prompt.ids.len() + 32).unwrap();
    let first = model.prefill(&prompt, &encoded, &mut cache).unwrap();
    assert_eq!(
        cache.rope_delta,
        i64s(&want["rope_deltas"])[0],
        "{what}: rope delta"
    );
    check_generation(&model, first, &mut cache, &want, &meta, &what);
}

fn clip() -> MediaItem {
    // 8 frames sampled at 2 fps from a 4 s clip, as the fixture's VideoMetadata says.
    MediaItem::Video(Video {
        frames: frames(),
        timestamps: (0..8).map(|i| i as f64 * 0.5).collect(),
        source_fps: 2.0,
        duration: 4.0,
    })
}

#[test]
fn video_end_to_end_matches_transformers() {
    for m in MODELS {
        run_trait_case(m, "video", vec![clip()]);
    }
}

fn embeds_item(model_name: &str) -> MediaItem {
    let path = fixture(model_name).join("expected/embeds_one_image.safetensors");
    let tensors: BTreeMap<String, Tensor> = tensors(&path).into_iter().collect();
    MediaItem::Embeds(Embeds {
        modality: Modality::Image,
        tensors,
    })
}

#[test]
fn embeds_reproduce_the_image_path() {
    for m in MODELS {
        run_trait_case(m, "one_image", vec![embeds_item(m)]);
    }
}

fn video_embeds_item(model_name: &str, keep_seconds: bool) -> MediaItem {
    let path = fixture(model_name).join("expected/embeds_video.safetensors");
    let mut tensors: BTreeMap<String, Tensor> = tensors(&path).into_iter().collect();
    if !keep_seconds {
        tensors.remove("second_per_grid_ts");
    }
    MediaItem::Embeds(Embeds {
        modality: Modality::Video,
        tensors,
    })
}

#[test]
fn video_embeds_reproduce_the_video_path() {
    for m in MODELS {
        run_trait_case(m, "video", vec![video_embeds_item(m, true)]);
    }
    // The fixture clip has 1 s per temporal patch, which is also transformers' assumption
    // when `second_per_grid_ts` is absent.
    run_trait_case(
        MODELS[1],
        "video",
        vec![video_embeds_item(MODELS[1], false)],
    );
}

#[test]
fn embeds_with_a_leading_batch_dim_are_accepted() {
    let model = load(MODELS[0]);
    let MediaItem::Embeds(mut e) = embeds_item(MODELS[0]) else {
        unreachable!()
    };
    let emb = e.tensors["image_embeds"].unsqueeze(0).unwrap();
    e.tensors.insert("image_embeds".into(), emb);
    let item = model.encode(&MediaItem::Embeds(e)).unwrap();
    assert_eq!(item.expansion.slots, 12);
    assert_eq!(item.features.dims(), &[12, 64]);
}

#[test]
fn embeds_without_or_with_a_wrong_grid_are_input_errors() {
    let model = load(MODELS[0]);
    let MediaItem::Embeds(e) = embeds_item(MODELS[0]) else {
        unreachable!()
    };
    let mut missing = e.clone();
    missing.tensors.remove("image_grid_thw");
    let err = model.encode(&MediaItem::Embeds(missing)).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("image_grid_thw"), "{err}");

    let mut wrong = e.clone();
    wrong.tensors.insert(
        "image_grid_thw".into(),
        Tensor::new(&[[1i64, 6, 6]], &Device::Cpu).unwrap(),
    );
    let err = model.encode(&MediaItem::Embeds(wrong)).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("12 embedding rows"), "{err}");

    let mut hidden = e;
    hidden.tensors.insert(
        "image_embeds".into(),
        Tensor::zeros((12, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = model.encode(&MediaItem::Embeds(hidden)).unwrap_err();
    assert_eq!(err.exit_code(), 2);
}

#[test]
fn photos_end_to_end_match_transformers() {
    let img = |f: &str| MediaItem::Image(jpeg(&repo().join("tests/data").join(f)));
    for m in MODELS {
        run_trait_case(m, "one_image", vec![img("qwen_china_517x333.jpg")]);
        run_trait_case(
            m,
            "two_images",
            vec![
                img("qwen_china_517x333.jpg"),
                img("qwen_flower_637x127.jpg"),
            ],
        );
    }
}

#[test]
fn defaults_read_config_json_only() {
    for (m, family) in [(MODELS[0], "qwen2_vl"), (MODELS[1], "qwen2_5_vl")] {
        let config: Value = read_json(&fixture(m).join("config.json"));
        let d = qwen2_vl::defaults(&config).unwrap();
        assert_eq!(d.family, family);
        assert_eq!(d.prompt.placeholders[&Modality::Image], "<|image_pad|>");
        assert_eq!(d.prompt.placeholders[&Modality::Video], "<|video_pad|>");
        assert!(
            d.limits[&Modality::Image] > 1,
            "multi-image prompts are allowed"
        );
        assert_eq!(d.embeds, Some(Modality::Image));
        assert!(!d.limits.contains_key(&Modality::Audio));
    }
    let err = qwen2_vl::defaults(&serde_json::json!({"model_type": "llava"})).unwrap_err();
    assert_eq!(err.exit_code(), 2);
}

#[test]
fn bf16_weights_run_and_stay_close() {
    // The dtype plumbing (f32 rotary and softmax around bf16 matmuls) on CPU; bf16 rounding
    // makes exact parity impossible, so only closeness is checked.
    for m in MODELS {
        let model = qwen2_vl::load(&fixture(m), &Device::Cpu, DType::BF16).unwrap();
        let (want, meta) = case(m, "two_images");
        let (items, item_grids) = items_from_hf_pixels(&model, m, "two_images", &meta);
        let prompt = spliced(&model, &meta, &items);
        let encoded: Vec<EncodedItem> = items.into_iter().map(|(_, it)| it).collect();
        assert_eq!(encoded[0].features.dtype(), DType::BF16);
        let mut cache = model.new_cache(prompt.ids.len() + 4).unwrap();
        let first = model
            .prefill_with_grids(&prompt, &encoded, &item_grids, &mut cache)
            .unwrap();
        let err = tensor_rel_err(&first, &want["logits"]);
        eprintln!("{m}: bf16 first-step logits rel err {err:.3e}");
        assert!(err < 0.1, "{m}: bf16 logits rel err {err}");
        let next = model
            .decode(argmax(&first.to_vec1::<f32>().unwrap()), &mut cache)
            .unwrap();
        assert_eq!(next.dtype(), DType::F32);
    }
}

#[test]
fn video_resize_matches_torchvision_exactly() {
    // transformers' video processors resize with torchvision (uint8 bicubic, antialias), which
    // differs from PIL by 1 on some pixels: the references are torchvision's own output.
    let dir = repo().join("tests/data/qwen_tv_resize");
    let mut checked = 0;
    for i in 0.. {
        let input = dir.join(format!("in_{i}.png"));
        if !input.exists() {
            break;
        }
        let input = png(&input);
        let want = png(&dir.join(format!("out_{i}.png")));
        let ours = qwen2_vl::tv_resize::resize_bicubic(&input, want.width(), want.height());
        let diff = ours
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            diff,
            0,
            "{}x{} -> {}x{}: {diff} bytes differ",
            input.width(),
            input.height(),
            want.width(),
            want.height()
        );
        checked += 1;
    }
    assert_eq!(checked, 5);
}

#[test]
fn odd_size_video_frames_are_resized_like_transformers() {
    // The processor's output for odd-size frames is its normalization of torchvision's resize
    // (checked when the fixtures were made); here the whole path must equal that.
    let cfg = qwen2_vl::Processors::load(&fixture("qwen2-vl-tiny"))
        .unwrap()
        .video;
    let dir = repo().join("tests/data/qwen_tv_resize");
    for i in 0..5 {
        let input = png(&dir.join(format!("in_{i}.png")));
        let want = png(&dir.join(format!("out_{i}.png")));
        let ours = preprocess_video(&[input.clone(), input], &cfg).unwrap();
        let theirs = preprocess_video(&[want.clone(), want], &cfg).unwrap();
        assert_eq!(ours.grid_thw, theirs.grid_thw);
        assert_eq!(ours.pixel_values, theirs.pixel_values, "frame set {i}");
    }
}

#[test]
fn frames_of_different_sizes_are_an_input_error() {
    let cfg = qwen2_vl::Processors::load(&fixture("qwen2-vl-tiny"))
        .unwrap()
        .video;
    let f = frames();
    let err = preprocess_video(&[f[0].clone(), RgbImage::new(60, 56)], &cfg).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("frame 1 is 60x56"), "{err}");
    assert_eq!(preprocess_video(&[], &cfg).unwrap_err().exit_code(), 2);
}

#[test]
fn prefill_refuses_items_it_did_not_encode() {
    // M-RoPE needs each item's grid; features from elsewhere carry none.
    let model = load(MODELS[0]);
    let features = Tensor::zeros((12, 64), DType::F32, &Device::Cpu).unwrap();
    let item = EncodedItem {
        expansion: Expansion {
            before: vec![],
            slot_token: model.config().image_token_id,
            slots: 12,
            after: vec![],
            slot_ids: Vec::new(),
        },
        features,
        grid: None,
    };
    let prompt = Spliced {
        ids: vec![model.config().image_token_id; 12],
        spans: vec![mmllm::prompt::Span {
            item: 0,
            start: 0,
            len: 12,
        }],
    };
    let mut cache = model.new_cache(16).unwrap();
    let err = model.prefill(&prompt, &[item], &mut cache).unwrap_err();
    assert!(
        err.to_string().contains("not encoded by this model"),
        "{err}"
    );
}

#[test]
fn per_frame_pixel_cap_matches_transformers() {
    let cases: Value = read_json(&fixture("qwen2-vl-tiny").join("expected/video_cap.json"));
    let base = qwen2_vl::Processors::load(&fixture("qwen2-vl-tiny"))
        .unwrap()
        .video;
    let frame = png(&repo().join("tests/data/qwen_tv_resize/in_4.png"));
    for c in cases.as_array().unwrap() {
        let n = c["frames"].as_u64().unwrap() as usize;
        let cfg = ProcessorConfig {
            cap_pixels_per_frame: true,
            max_video_tokens: c["max_video_tokens"].as_u64().unwrap(),
            ..base.clone()
        };
        let p = preprocess_video(&vec![frame.clone(); n], &cfg).unwrap();
        let want: Vec<usize> = c["grid"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(p.grid_thw.to_vec(), want, "{c}");
    }
}
