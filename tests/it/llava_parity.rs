//! LLaVA-1.5 parity with Hugging Face transformers on the tiny random checkpoint in
//! `tests/fixtures/llava-tiny` (made by `tests/fixtures/generate.py`).
//!
//! Inputs are the fixture's own `input_ids` and pixels (not our preprocessor). Logits are
//! compared with `max |ours - hf| / max |hf|` over the vocabulary, which must be <= 1e-4.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use mmllm::error::Error;
use mmllm::media::{Embeds, MediaItem, Modality};
use mmllm::models::llava::{self, LlavaModel};
use mmllm::models::Model;

use crate::util::{argmax, read_json, repo, tensor_ids, tensor_rel_err, tensors};

const REL_TOL: f32 = 1e-4;

fn fixture_dir() -> PathBuf {
    repo().join("tests/fixtures/llava-tiny")
}

fn load_model() -> LlavaModel {
    load_on(&Device::Cpu, DType::F32)
}

fn load_on(device: &Device, dtype: DType) -> LlavaModel {
    llava::load(&fixture_dir(), device, dtype).expect("load tiny llava")
}

fn expected(name: &str) -> HashMap<String, Tensor> {
    tensors(&fixture_dir().join("expected").join(name))
}

fn meta(name: &str) -> serde_json::Value {
    read_json(&fixture_dir().join("expected").join(name))
}

/// Rebuilds HF's `pixel_values` from the stored uint8 crop with the PIL backend's arithmetic
/// (recorded in the case's JSON; the generator asserts it is bit-exact).
fn pixel_values(case: &HashMap<String, Tensor>) -> Tensor {
    let cfg: serde_json::Value = read_json(&fixture_dir().join("processor_config.json"));
    let ip = &cfg["image_processor"];
    let scale = ip["rescale_factor"].as_f64().unwrap();
    let mean: Vec<f32> = ip["image_mean"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let std: Vec<f32> = ip["image_std"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let u8s = &case["pixel_u8"];
    let (c, h, w) = u8s.dims3().unwrap();
    let raw: Vec<u8> = u8s.flatten_all().unwrap().to_vec1().unwrap();
    let plane = h * w;
    let data: Vec<f32> = raw
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let ch = i / plane;
            ((v as f64 * scale) as f32 - mean[ch]) / std[ch]
        })
        .collect();
    Tensor::from_vec(data, (1, c, h, w), &Device::Cpu).unwrap()
}

fn log_softmax(v: &[f32]) -> Vec<f64> {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = v.iter().map(|&x| (x as f64 - max).exp()).sum();
    v.iter().map(|&x| x as f64 - max - sum.ln()).collect()
}

/// Prefill with `prompt_embeds`, then greedy decoding of `steps` tokens one at a time through
/// the KV cache. EOS logits are masked as HF's `min_new_tokens` does. Returns the first-step
/// logits, the ids, and each step's logits.
fn greedy(
    model: &LlavaModel,
    prompt_embeds: &Tensor,
    steps: usize,
) -> (Tensor, Vec<u32>, Vec<Vec<f32>>) {
    let prompt_len = prompt_embeds.dim(0).unwrap();
    let mut cache = model.new_cache(prompt_len + steps).unwrap();
    let mut logits = model.forward(prompt_embeds, &mut cache).unwrap();
    let first = logits.clone();
    let (mut ids, mut all) = (vec![], vec![]);
    for step in 0..steps {
        let mut v: Vec<f32> = logits.to_vec1().unwrap();
        all.push(v.clone());
        for &eos in model.eos_token_ids() {
            v[eos as usize] = f32::NEG_INFINITY;
        }
        let next = argmax(&v);
        ids.push(next);
        if step + 1 < steps {
            let e = model.embed_tokens(&[next]).unwrap();
            logits = model.forward(&e, &mut cache).unwrap();
        }
    }
    assert_eq!(cache.len(), prompt_len + steps - 1);
    (first, ids, all)
}

fn pixel_case(model: &LlavaModel, case_name: &str) {
    let case = expected(&format!("{case_name}.safetensors"));
    let info = meta(&format!("{case_name}.json"));
    let ids = tensor_ids(&case["input_ids"]);
    let features = model.encode_pixels(&pixel_values(&case)).unwrap();
    let feat_err = tensor_rel_err(
        &features.to_dtype(DType::F32).unwrap(),
        &case["image_features"],
    );
    let slot = model.config().image_token_id;
    let embeds =
        llava::splice_features(&model.embed_tokens(&ids).unwrap(), &ids, slot, &features).unwrap();
    let steps = info["new_tokens"].as_u64().unwrap() as usize;
    let (first, greedy_ids, all) = greedy(model, &embeds, steps);
    let logit_err = tensor_rel_err(&first, &case["first_logits"]);
    eprintln!(
        "{case_name}: image features rel err {feat_err:.3e}, first logits rel err {logit_err:.3e}"
    );
    assert!(
        feat_err <= REL_TOL,
        "{case_name}: image features rel err {feat_err}"
    );
    assert!(
        logit_err <= REL_TOL,
        "{case_name}: first logits rel err {logit_err}"
    );
    assert_eq!(
        greedy_ids,
        tensor_ids(&case["greedy_ids"]),
        "{case_name}: greedy ids"
    );

    // HF's per-step top-5 log-probs, looked up in our distribution of the same step.
    let top_ids: Vec<Vec<i64>> = case["step_top_ids"].to_vec2().unwrap();
    let top_lp: Vec<Vec<f32>> = case["step_top_logprobs"].to_vec2().unwrap();
    let mut worst = 0f64;
    for (step, logits) in all.iter().enumerate() {
        let ours = log_softmax(logits);
        for (id, lp) in top_ids[step].iter().zip(&top_lp[step]) {
            let d = (ours[*id as usize] - *lp as f64).abs() / (lp.abs() as f64).max(1.0);
            worst = worst.max(d);
        }
    }
    eprintln!("{case_name}: worst top-5 logprob rel err over {steps} steps {worst:.3e}");
    assert!(
        worst <= REL_TOL as f64,
        "{case_name}: top-5 logprobs rel err {worst}"
    );
}

#[test]
fn photo_1_logits_and_greedy_ids_match_hf() {
    pixel_case(&load_model(), "photo_1");
}

#[test]
fn photo_2_logits_and_greedy_ids_match_hf() {
    pixel_case(&load_model(), "photo_2");
}

fn embeds_item(t: Tensor) -> MediaItem {
    MediaItem::Embeds(Embeds {
        modality: Modality::Image,
        tensors: BTreeMap::from([("image_embeds".to_string(), t)]),
    })
}

#[test]
fn embeds_path_matches_hf_and_pixel_path() {
    let model = load_model();
    let photo = expected("photo_1.safetensors");
    let case = expected("embeds_photo_1.safetensors");
    let image_embeds = expected("image_embeds.safetensors")["image_embeds"].clone();
    let ids = tensor_ids(&photo["input_ids"]);

    let encoded = model.encode(&embeds_item(image_embeds)).unwrap();
    assert_eq!(encoded.expansion.slots, 576);
    assert_eq!(encoded.expansion.slot_token, model.config().image_token_id);
    assert_eq!(
        ids.iter()
            .filter(|&&i| i == encoded.expansion.slot_token)
            .count(),
        encoded.expansion.slots,
        "fixture prompt holds one image's worth of slots"
    );
    let embeds = llava::splice_features(
        &model.embed_tokens(&ids).unwrap(),
        &ids,
        encoded.expansion.slot_token,
        &encoded.features,
    )
    .unwrap();
    let (first, greedy_ids, _) = greedy(&model, &embeds, 16);
    let hf_err = tensor_rel_err(&first, &case["first_logits"]);
    let pixel_err = tensor_rel_err(&first, &photo["first_logits"]);
    eprintln!("embeds: first logits rel err vs HF embeds path {hf_err:.3e}, vs HF pixel path {pixel_err:.3e}");
    assert!(hf_err <= REL_TOL, "embeds vs HF: {hf_err}");
    assert!(pixel_err <= REL_TOL, "embeds vs pixel path: {pixel_err}");
    assert_eq!(greedy_ids, tensor_ids(&case["greedy_ids"]));
    assert_eq!(greedy_ids, tensor_ids(&photo["greedy_ids"]));
}

#[test]
fn embeds_of_wrong_shape_or_dtype_are_input_errors() {
    let model = load_model();
    let dev = Device::Cpu;
    for bad in [
        Tensor::zeros((1, 575, 64), DType::F32, &dev).unwrap(),
        Tensor::zeros((2, 576, 64), DType::F32, &dev).unwrap(),
        Tensor::zeros((1, 576, 32), DType::F32, &dev).unwrap(),
        Tensor::zeros((1, 576, 64), DType::I64, &dev).unwrap(),
    ] {
        let dims = bad.dims().to_vec();
        match model.encode(&embeds_item(bad)) {
            Err(Error::Input { expected, .. }) => {
                assert!(expected.contains("(1, 576, 64)"), "{dims:?}: {expected}")
            }
            other => panic!("{dims:?}: expected an input error, got {other:?}"),
        }
    }
    // (576, hidden) without the item axis is accepted too.
    let flat = Tensor::zeros((576, 64), DType::F32, &dev).unwrap();
    assert!(model.encode(&embeds_item(flat)).is_ok());
}

#[test]
fn reduced_precision_stays_close_to_f32() {
    // bf16 and f16 cannot meet the f32 tolerance; this checks they run and stay near it.
    let case = expected("photo_1.safetensors");
    let ids = tensor_ids(&case["input_ids"]);
    let pixels = pixel_values(&case);
    for dtype in [DType::BF16, DType::F16] {
        let model = llava::load(&fixture_dir(), &Device::Cpu, dtype).unwrap();
        let features = model.encode_pixels(&pixels).unwrap();
        assert_eq!(features.dtype(), dtype);
        let embeds = llava::splice_features(
            &model.embed_tokens(&ids).unwrap(),
            &ids,
            model.config().image_token_id,
            &features,
        )
        .unwrap();
        let mut cache = model.new_cache(ids.len()).unwrap();
        let logits = model.forward(&embeds, &mut cache).unwrap();
        assert_eq!(logits.dtype(), DType::F32);
        let err = tensor_rel_err(&logits, &case["first_logits"]);
        eprintln!("{dtype:?}: first logits rel err {err:.3e}");
        assert!(err < 0.1, "{dtype:?}: rel err {err}");
    }
}

/// The same parity on a GPU (f32), and a bf16 run, when built with `--features cuda`.
#[cfg(feature = "cuda")]
#[test]
fn cuda_f32_matches_hf_and_bf16_runs() {
    let dev = Device::new_cuda(0).expect("a CUDA device");
    let model = load_on(&dev, DType::F32);
    pixel_case(&model, "photo_1");
    pixel_case(&model, "photo_2");

    let case = expected("photo_1.safetensors");
    let ids = tensor_ids(&case["input_ids"]);
    let model = load_on(&dev, DType::BF16);
    let features = model.encode_pixels(&pixel_values(&case)).unwrap();
    let embeds = llava::splice_features(
        &model.embed_tokens(&ids).unwrap(),
        &ids,
        model.config().image_token_id,
        &features,
    )
    .unwrap();
    let (first, greedy_ids, _) = greedy(&model, &embeds, 16);
    let err = tensor_rel_err(&first, &case["first_logits"]);
    eprintln!("cuda bf16: first logits rel err {err:.3e}, greedy {greedy_ids:?}");
    assert!(err < 0.1, "cuda bf16 rel err {err}");
}

/// The fixture's tokenizer, read by the `tokenizers` crate, gives HF's prompt ids once the
/// image placeholder is expanded to its slots (so prompt code can use this fixture too).
#[test]
fn fixture_tokenizer_reproduces_hf_prompt_ids() {
    let tok = tokenizers::Tokenizer::from_file(fixture_dir().join("tokenizer.json")).unwrap();
    let model = load_model();
    let expansion = model.image_expansion().unwrap();
    for case_name in ["photo_1", "photo_2"] {
        let info = meta(&format!("{case_name}.json"));
        let rendered = info["rendered_prompt"].as_str().unwrap();
        let enc = tok.encode(rendered, true).unwrap();
        let mut ids = vec![];
        for &id in enc.get_ids() {
            if id == expansion.slot_token {
                ids.extend(std::iter::repeat_n(id, expansion.slots));
            } else {
                ids.push(id);
            }
        }
        let hf = tensor_ids(&expected(&format!("{case_name}.safetensors"))["input_ids"]);
        assert_eq!(ids, hf, "{case_name}");
    }
}
