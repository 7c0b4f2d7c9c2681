//! Qwen2-Audio on the tiny random checkpoint against transformers (references made by
//! tests/fixtures/generate_qwen2_audio.py): input features, the audio token count, the rendered
//! and tokenized prompt, projected audio features, first-step and per-step logits, greedy ids,
//! and `mmllm audio` end to end.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use mmllm::media::{Audio, MediaItem, Modality};
use mmllm::models::qwen2_audio::{output_lengths, Qwen2AudioModel, DEFAULT_CHAT_TEMPLATE};
use mmllm::models::{EncodedItem, Expansion, Model};
use mmllm::prompt::splice;
use mmllm::prompt::template::{ChatTemplate, ContentPart, Message, TemplateFiles};
use serde_json::Value;

use crate::util::{
    check_generation, json_line, read_json, read_wav, repo, run_mmllm, tensor_ids, tensor_rel_err,
    tensors, token_ids, LOGITS_RTOL,
};

/// First-step and per-step logits: relative to the largest |logit| (f32, CPU).
/// Log-mel features: absolute.
const FEATURES_ATOL: f32 = 1e-5;

fn fixture() -> PathBuf {
    repo().join("tests/fixtures/qwen2-audio-tiny")
}

fn case(name: &str) -> (HashMap<String, Tensor>, Value) {
    let dir = fixture().join("expected");
    let tensors = tensors(&dir.join(format!("{name}.safetensors")));
    let meta = read_json(&dir.join(format!("{name}.json")));
    (tensors, meta)
}

fn load() -> Qwen2AudioModel {
    Qwen2AudioModel::load(&fixture(), &Device::Cpu, DType::F32).unwrap()
}

fn audios(meta: &Value) -> Vec<Audio> {
    meta["audio"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| read_wav(&repo().join(f.as_str().unwrap())))
        .collect()
}

#[test]
fn features_match_the_processor_at_16k_and_44k() {
    let model = load();
    for name in ["speech_16k", "speech_44k", "two_audios"] {
        let (want, meta) = case(name);
        let head = &want["input_features_head"];
        let tail = &want["input_features_tail"];
        let (_, _, head_len) = head.dims3().unwrap();
        for (i, audio) in audios(&meta).iter().enumerate() {
            let what = format!("{name} audio {i}");
            let mel = model.log_mel(audio).unwrap();
            assert_eq!((mel.n_mels, mel.frames), (128, 3000), "{what}");
            assert_eq!(
                mel.valid_frames as u64,
                meta["valid_frames"][i].as_u64().unwrap(),
                "{what}: feature attention mask"
            );
            let ours = Tensor::from_slice(&mel.data, (128, 3000), &Device::Cpu).unwrap();
            let err = (ours.narrow(1, 0, head_len).unwrap() - head.get(i).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            // Past the head every frame is padding: equal to HF's per-bin maximum there.
            let rest = ours.narrow(1, head_len, 3000 - head_len).unwrap();
            let want_tail = tail.get(i).unwrap().unsqueeze(1).unwrap();
            let tail_err = rest
                .broadcast_sub(&want_tail)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            eprintln!("{what}: features max abs err {err:.2e}, padding {tail_err:.2e}");
            assert!(err <= FEATURES_ATOL, "{what}: features max abs err {err}");
            assert!(
                tail_err <= FEATURES_ATOL,
                "{what}: padding frames err {tail_err}"
            );
        }
    }
}

#[test]
fn audio_token_counts_follow_the_processor() {
    let path = fixture().join("expected/audio_token_counts.json");
    let counts = read_json(&path);
    let model = load();
    for (samples, want) in counts.as_object().unwrap() {
        let n: usize = samples.parse().unwrap();
        let mel = model
            .log_mel(&Audio {
                samples: vec![0.0; n],
                sample_rate: 16000,
            })
            .unwrap();
        let frames = want["valid_frames"].as_u64().unwrap() as usize;
        assert_eq!(mel.valid_frames, frames, "{n} samples");
        let tokens = want["tokens"].as_u64().unwrap() as usize;
        assert_eq!(output_lengths(frames).1, tokens, "{n} samples");
        assert_eq!(model.expansion(frames).slots, tokens, "{n} samples");
    }
}

/// The prompt as the CLI builds it: the model's chat template over one user turn (audio parts,
/// then the text), tokenized, each `<|AUDIO|>` expanded.
fn prompt_ids(meta: &Value, items: &[EncodedItem]) -> (String, Vec<u32>, Vec<u32>) {
    let files = TemplateFiles {
        jinja: Some(std::fs::read_to_string(fixture().join("chat_template.jinja")).unwrap()),
        ..Default::default()
    };
    let template = ChatTemplate::select(&files, Some(DEFAULT_CHAT_TEMPLATE))
        .unwrap()
        .unwrap();
    let mut content: Vec<ContentPart> = items
        .iter()
        .map(|_| ContentPart::media(Modality::Audio))
        .collect();
    content.push(ContentPart::Text {
        text: meta["prompt"].as_str().unwrap().to_string(),
    });
    let text = template
        .render(
            &[Message {
                role: "user".into(),
                content,
            }],
            true,
        )
        .unwrap();
    let tok = tokenizers::Tokenizer::from_file(fixture().join("tokenizer.json")).unwrap();
    let ids = tok.encode(text.as_str(), true).unwrap().get_ids().to_vec();
    let audio_id = tok.token_to_id("<|AUDIO|>").unwrap();
    let expansions: Vec<(Modality, Expansion)> = items
        .iter()
        .map(|it| (Modality::Audio, it.expansion.clone()))
        .collect();
    let spliced = splice(&ids, &[(Modality::Audio, audio_id)], &expansions, "prompt").unwrap();
    (text, ids, spliced.ids)
}

fn check_case(model: &Qwen2AudioModel, name: &str) {
    let (want, meta) = case(name);
    let items: Vec<EncodedItem> = audios(&meta)
        .into_iter()
        .map(|a| model.encode(&MediaItem::Audio(a)).unwrap())
        .collect();
    let slots: Vec<usize> = items.iter().map(|it| it.expansion.slots).collect();
    let want_slots: Vec<usize> = meta["num_audio_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(slots, want_slots, "{name}: audio tokens");

    let rows: Vec<Tensor> = items.iter().map(|it| it.features.clone()).collect();
    let features = Tensor::cat(&rows, 0).unwrap();
    let err = tensor_rel_err(&features, &want["audio_features"]);
    eprintln!("{name}: projected audio features rel err {err:.2e}");
    assert!(err <= LOGITS_RTOL, "{name}: audio features rel err {err}");

    let (text, ids, expanded) = prompt_ids(&meta, &items);
    assert_eq!(text, meta["rendered_prompt"].as_str().unwrap(), "{name}");
    assert_eq!(ids, token_ids(&meta["prompt_ids"]), "{name}: prompt ids");
    assert_eq!(
        expanded,
        tensor_ids(&want["input_ids"]),
        "{name}: expanded input ids"
    );

    let prompt = mmllm::models::Spliced {
        ids: expanded,
        spans: splice(
            &ids,
            &[(Modality::Audio, model.config().audio_token_id)],
            &items
                .iter()
                .map(|it| (Modality::Audio, it.expansion.clone()))
                .collect::<Vec<_>>(),
            "prompt",
        )
        .unwrap()
        .spans,
    };
    let mut cache = model.new_cache(prompt.ids.len() + 16).unwrap();
    let first = model.prefill(&prompt, &items, &mut cache).unwrap();
    check_generation(model, first, &mut cache, &want, &meta, name);
}

#[test]
fn tiny_qwen2_audio_matches_transformers() {
    let model = load();
    for name in ["speech_16k", "speech_44k", "two_audios"] {
        check_case(&model, name);
    }
}

#[test]
fn refuses_other_modalities_and_zero_token_audio_has_no_slots() {
    let model = load();
    let img = image::RgbImage::new(4, 4);
    let err = model.encode(&MediaItem::Image(img)).unwrap_err();
    assert_eq!(err.exit_code(), 2, "{err}");
    // 100 samples: one valid frame, no audio token (the processor's floor division).
    let item = model
        .encode(&MediaItem::Audio(Audio {
            samples: vec![0.1; 100],
            sample_rate: 16000,
        }))
        .unwrap();
    assert_eq!(item.expansion.slots, 0);
    assert_eq!(item.features.dims(), [0, 64]);
}

fn check_cli(name: &str, got: &Value) {
    let (_, meta) = case(name);
    let want_ids = token_ids(&meta["greedy_ids"]);
    assert_eq!(token_ids(&got["token_ids"]), want_ids, "{name}: token ids");
    assert_eq!(
        got["usage"]["prompt_tokens"], meta["num_prompt_tokens"],
        "{name}"
    );
    assert_eq!(got["finish_reason"], "length", "{name}");
    // HF's greedy ids never reach an EOS id, so stopping at EOS changes nothing.
    let eos = token_ids(&meta["eos_token_ids"]);
    assert!(want_ids.iter().all(|id| !eos.contains(id)));
}

#[test]
fn cli_audio_reproduces_hugging_face() {
    let model = fixture().display().to_string();
    for name in ["speech_16k", "speech_44k"] {
        let (_, meta) = case(name);
        let wav = repo().join(meta["audio"][0].as_str().unwrap());
        let out = run_mmllm(&[
            "audio",
            "--model",
            &model,
            wav.to_str().unwrap(),
            "What is said?",
            "--output",
            "jsonl",
            "--max-tokens",
            "16",
        ]);
        check_cli(name, &json_line(&out));
    }
}

#[test]
fn cli_two_audios_and_raw_prompt_reproduce_hugging_face() {
    let model = fixture().display().to_string();
    let (_, meta) = case("two_audios");
    let wavs: Vec<String> = meta["audio"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| repo().join(f.as_str().unwrap()).display().to_string())
        .collect();
    let common = ["--output", "jsonl", "--max-tokens", "16"];
    let mut args = vec!["audio", "--model", &model];
    args.extend(common);
    args.extend(wavs.iter().map(String::as_str));
    args.push("What is said?");
    check_cli("two_audios", &json_line(&run_mmllm(&args)));

    // --raw: the rendered prompt, verbatim.
    let (_, one) = case("speech_16k");
    let wav = repo().join(one["audio"][0].as_str().unwrap());
    let out = run_mmllm(&[
        "audio",
        "--model",
        &model,
        "--raw",
        "--output",
        "jsonl",
        "--max-tokens",
        "16",
        wav.to_str().unwrap(),
        one["rendered_prompt"].as_str().unwrap(),
    ]);
    check_cli("speech_16k", &json_line(&out));
}

/// A copy of the fixture as transformers 5 names the weights (`model.audio_tower.`,
/// `model.multi_modal_projector.`, `model.language_model.`, `lm_head.`), sharded with an index,
/// and with the feature extractor in its own `preprocessor_config.json` (the hub's layout).
fn v5_layout_copy() -> tempfile::TempDir {
    let src = fixture();
    let dir = tempfile::tempdir().unwrap();
    let tensors = tensors(&src.join("model.safetensors"));
    let (mut audio, mut text) = (HashMap::new(), HashMap::new());
    let mut weight_map = serde_json::Map::new();
    for (k, v) in tensors {
        let (k, shard) = if let Some(r) = k.strip_prefix("language_model.model.") {
            (format!("model.language_model.{r}"), 2)
        } else if let Some(r) = k.strip_prefix("language_model.") {
            (r.to_string(), 2)
        } else {
            (format!("model.{k}"), 1)
        };
        let file = format!("model-0000{shard}-of-00002.safetensors");
        weight_map.insert(k.clone(), Value::from(file));
        if shard == 1 { &mut audio } else { &mut text }.insert(k, v);
    }
    for (i, part) in [audio, text].iter().enumerate() {
        let file = dir
            .path()
            .join(format!("model-0000{}-of-00002.safetensors", i + 1));
        candle_core::safetensors::save(part, file).unwrap();
    }
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let processor = read_json(&src.join("processor_config.json"));
    std::fs::write(
        dir.path().join("preprocessor_config.json"),
        processor["feature_extractor"].to_string(),
    )
    .unwrap();
    dir
}

#[test]
fn transformers_5_layout_loads_the_same_model() {
    let dir = v5_layout_copy();
    let model = Qwen2AudioModel::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
    check_case(&model, "speech_16k");
}

#[test]
fn mismatched_feature_extractor_is_an_input_error() {
    let dir = v5_layout_copy();
    let pre = dir.path().join("preprocessor_config.json");
    let mut v = read_json(&pre);
    v["feature_size"] = 80.into();
    std::fs::write(&pre, v.to_string()).unwrap();
    let err = Qwen2AudioModel::load(dir.path(), &Device::Cpu, DType::F32)
        .err()
        .unwrap();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("128 mel bins"), "{err}");
}

#[test]
fn runs_in_bf16() {
    let model = Qwen2AudioModel::load(&fixture(), &Device::Cpu, DType::BF16).unwrap();
    let (want, meta) = case("speech_16k");
    let items: Vec<EncodedItem> = audios(&meta)
        .into_iter()
        .map(|a| model.encode(&MediaItem::Audio(a)).unwrap())
        .collect();
    let (_, ids, expanded) = prompt_ids(&meta, &items);
    let spans = splice(
        &ids,
        &[(Modality::Audio, model.config().audio_token_id)],
        &[(Modality::Audio, items[0].expansion.clone())],
        "prompt",
    )
    .unwrap()
    .spans;
    let prompt = mmllm::models::Spliced {
        ids: expanded,
        spans,
    };
    let mut cache = model.new_cache(prompt.ids.len() + 1).unwrap();
    let logits = model.prefill(&prompt, &items, &mut cache).unwrap();
    // bf16 is not held to the f32 tolerance: only the logits' direction is checked.
    let a: Vec<f32> = logits.to_vec1().unwrap();
    let b: Vec<f32> = want["logits"].to_vec1().unwrap();
    let dot: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let cos = dot / (norm(&a) * norm(&b));
    eprintln!("bf16 first-step logits cosine {cos}");
    assert!(cos > 0.99, "bf16 logits cosine {cos}");
}
