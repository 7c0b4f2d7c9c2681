//! Ultravox on the tiny random checkpoint against fixie-ai/ultravox's reference code
//! (tests/fixtures/ultravox-tiny, made by tests/fixtures/generate_ultravox.py): features,
//! chunking, audio embeddings, prompt ids, first-step logits, greedy ids, and the CLI end to end,
//! for the 16 kHz speech file (two encoder chunks), a 1.5 s clip of it (one unpadded chunk) and
//! the 44.1 kHz file (resampled).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use mmllm::media::{Audio, MediaItem, Modality};
use mmllm::models::ultravox::{UltravoxModel, AUDIO_PLACEHOLDER};
use mmllm::models::{Model, Spliced};

use crate::util::{
    self, argmax, flat, json_line, mmllm, read_json, read_wav, rel_err, repo, run_mmllm,
    tensor_ids, token_ids,
};

fn fixture() -> PathBuf {
    repo().join("tests/fixtures/ultravox-tiny")
}

/// The reference cases of generate_ultravox.py.
const CASES: [&str; 3] = ["speech", "short", "speech_44k"];

fn expected(case: &str) -> serde_json::Value {
    read_json(&fixture().join(format!("expected/{case}.json")))
}

fn tensors(case: &str) -> HashMap<String, Tensor> {
    util::tensors(&fixture().join(format!("expected/{case}.safetensors")))
}

/// The audio of a case, as decoded from its file (before any resampling).
fn audio(case: &str) -> Audio {
    match case {
        "speech" => read_wav(&repo().join("tests/data/speech_16k.wav")),
        "short" => {
            let mut a = read_wav(&repo().join("tests/data/speech_16k.wav"));
            a.samples.truncate(23_999);
            a
        }
        "speech_44k" => read_wav(&repo().join("tests/data/speech_44k.wav")),
        other => panic!("unknown case {other}"),
    }
}

fn model() -> UltravoxModel {
    UltravoxModel::load(&fixture(), &Device::Cpu, DType::F32).unwrap()
}

/// The rendered prompt tokenized as the pipeline does (BOS already in the text) and spliced.
fn prompt_ids(model: &UltravoxModel, item: &mmllm::models::EncodedItem, case: &str) -> Spliced {
    let want = expected(case);
    let tok = tokenizers::Tokenizer::from_file(fixture().join("tokenizer.json")).unwrap();
    let enc = tok
        .encode(want["rendered_prompt"].as_str().unwrap(), false)
        .unwrap();
    let placeholder = tok.token_to_id(AUDIO_PLACEHOLDER).unwrap();
    // <|audio|> sits past the language model's vocabulary, as in the hub tokenizer.
    assert_eq!(placeholder as usize, model.info().vocab_size);
    mmllm::prompt::splice(
        enc.get_ids(),
        &[(Modality::Audio, placeholder)],
        &[(Modality::Audio, item.expansion.clone())],
        "prompt",
    )
    .unwrap()
}

#[test]
fn features_and_chunks_match_the_processor() {
    let m = model();
    for case in CASES {
        features_case(&m, case);
    }
}

fn features_case(m: &UltravoxModel, case: &str) {
    let want = expected(case);
    let t = tensors(case);
    let mel = m.log_mel(&audio(case)).unwrap();
    let chunks = m.chunks(mel.valid_frames);
    let lens: Vec<u32> = chunks.iter().map(|c| c.frames as u32).collect();
    let tokens: Vec<u32> = chunks.iter().map(|c| c.tokens as u32).collect();
    assert_eq!(lens, tensor_ids(&t["audio_lens"]), "{case}");
    assert_eq!(tokens, tensor_ids(&t["audio_token_len"]), "{case}");
    let ours: Vec<Tensor> = m
        .chunk_features(&mel)
        .unwrap()
        .into_iter()
        .map(|(_, x)| x)
        .collect();
    let ours = Tensor::cat(&ours, 0).unwrap();
    let theirs = &t["input_features"];
    assert_eq!(ours.dims(), theirs.dims());
    let max = flat(&ours)
        .iter()
        .zip(flat(theirs))
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    eprintln!("ultravox {case} features: max abs diff {max:e}");
    assert!(max <= 1e-5, "{case}: features differ by {max}");
    assert_eq!(
        m.expansion(mel.valid_frames).slots,
        want["audio_token_len"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .sum::<usize>()
    );
}

#[test]
fn audio_embeddings_prompt_logits_and_greedy_ids_match() {
    let m = model();
    for case in CASES {
        model_case(&m, case);
    }
}

fn model_case(m: &UltravoxModel, case: &str) {
    let want = expected(case);
    let t = tensors(case);
    let item = m.encode(&MediaItem::Audio(audio(case))).unwrap();
    let emb_err = rel_err(&flat(&item.features), &flat(&t["audio_embeds"]));
    eprintln!("ultravox {case} audio embeddings: relative error {emb_err:e}");
    assert!(
        emb_err <= 1e-4,
        "{case}: audio embeddings relative error {emb_err}"
    );

    let prompt = prompt_ids(m, &item, case);
    assert_eq!(
        prompt.ids,
        tensor_ids(&t["input_ids"]),
        "{case}: prompt ids"
    );
    let starts: Vec<u64> = want["audio_token_start_idx"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(prompt.spans.len(), 1);
    assert_eq!(prompt.spans[0].start as u64, starts[0]);

    let greedy = tensor_ids(&t["greedy_ids"]);
    let items = vec![item];
    let mut cache = m.new_cache(prompt.ids.len() + greedy.len()).unwrap();
    let logits = m.prefill(&prompt, &items, &mut cache).unwrap();
    let first = flat(&logits);
    let err = rel_err(&first, &flat(&t["first_logits"]));
    eprintln!("ultravox {case} first-step logits: relative error {err:e}");
    assert!(
        err <= 1e-4,
        "{case}: first-step logits relative error {err}"
    );

    let mut ids = vec![argmax(&first)];
    while ids.len() < greedy.len() {
        let l = m.decode(*ids.last().unwrap(), &mut cache).unwrap();
        ids.push(argmax(&flat(&l)));
    }
    assert_eq!(ids, greedy, "{case}: greedy ids");
}

#[test]
fn a_directory_without_its_language_model_is_an_input_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = read_json(&fixture().join("config.json"));
    let obj = config.as_object_mut().unwrap();
    obj.remove("text_config");
    obj.insert(
        "text_model_id".into(),
        "meta-llama/Llama-3.2-1B-Instruct".into(),
    );
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixture().join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let err = match UltravoxModel::load(dir.path(), &Device::Cpu, DType::F32) {
        Ok(_) => panic!("loaded without a language model"),
        Err(e) => e,
    };
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("text_model_id"), "{err}");
}

#[test]
fn cli_reproduces_the_reference_ids() {
    for case in ["speech", "speech_44k"] {
        cli_case(case);
    }
}

fn cli_case(case: &str) {
    let want = expected(case);
    let t = tensors(case);
    let model = fixture().display().to_string();
    let wav = repo().join(want["audio"].as_str().unwrap());
    let out = run_mmllm(&[
        "audio",
        "--model",
        &model,
        wav.to_str().unwrap(),
        want["prompt"].as_str().unwrap(),
        "--output",
        "jsonl",
        "--max-tokens",
        "16",
        "--logprobs",
        "5",
    ]);
    let got = json_line(&out);
    let ids = token_ids(&got["token_ids"]);
    assert_eq!(ids, tensor_ids(&t["greedy_ids"]), "{case}");
    assert_eq!(got["usage"]["prompt_tokens"], want["num_prompt_tokens"]);
    let steps = got["logprobs"].as_array().unwrap();
    let want_steps = want["step_top"].as_array().unwrap();
    assert_eq!(steps.len(), want_steps.len());
    for (step, (g, w)) in steps.iter().zip(want_steps).enumerate() {
        let top = g["top"].as_array().unwrap();
        let got_ids: Vec<u64> = top
            .iter()
            .map(|t| t["token_id"].as_u64().unwrap())
            .collect();
        let want_ids: Vec<u64> = w["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(got_ids, want_ids, "{case} step {step} top-5 ids");
        for (t, wl) in top.iter().zip(w["logprobs"].as_array().unwrap()) {
            let (a, b) = (t["logprob"].as_f64().unwrap(), wl.as_f64().unwrap());
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "{case} step {step}: logprob {a} vs HF {b}"
            );
        }
    }
}

/// A Llama 3 chat template that takes STRING content (`message['content'] | trim`), as the
/// hub checkpoint's Llama-3.2 template does, without its date/system preamble. With the user
/// turn `"<|audio|>\nWhat is said?"` it renders exactly the fixture's `rendered_prompt`
/// (`<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|audio|>\nWhat is
/// said?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n`), so the reference ids hold.
const STRING_CONTENT_TEMPLATE: &str = "{{- bos_token }}{%- for message in messages %}\
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\
{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}";

/// The published layout, built from the tiny fixture in `root`: `root/text` is a Llama
/// directory (config.json from `text_config`, `language_model.*` weights under their plain
/// Llama names) and `root/ultravox` an Ultravox directory naming it by `text_model_id` (an
/// absolute path), with only the encoder and projector weights and a string-content template.
/// Returns the Ultravox directory.
fn published_layout(root: &Path, text_model_id: &str) -> PathBuf {
    let text_dir = root.join("text");
    let uv_dir = root.join("ultravox");
    std::fs::create_dir_all(&text_dir).unwrap();
    std::fs::create_dir_all(&uv_dir).unwrap();

    let mut config = read_json(&fixture().join("config.json"));
    let obj = config.as_object_mut().unwrap();
    let text_config = obj.remove("text_config").unwrap();
    obj.insert("text_model_id".into(), text_model_id.into());
    std::fs::write(uv_dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(text_dir.join("config.json"), text_config.to_string()).unwrap();

    let bytes = std::fs::read(fixture().join("model.safetensors")).unwrap();
    let all = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut text = Vec::new();
    let mut rest = Vec::new();
    for (name, view) in all.tensors() {
        let view =
            safetensors::tensor::TensorView::new(view.dtype(), view.shape().to_vec(), view.data())
                .unwrap();
        match name.strip_prefix("language_model.") {
            Some(plain) => text.push((plain.to_string(), view)),
            None => rest.push((name, view)),
        }
    }
    assert!(!text.is_empty() && !rest.is_empty());
    assert!(text.iter().any(|(n, _)| n.starts_with("model.layers.")));
    safetensors::serialize_to_file(text, None, &text_dir.join("model.safetensors")).unwrap();
    safetensors::serialize_to_file(rest, None, &uv_dir.join("model.safetensors")).unwrap();

    for entry in std::fs::read_dir(fixture()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if path.is_file()
            && !["config.json", "model.safetensors", "chat_template.jinja"].contains(&name.as_str())
        {
            std::fs::copy(&path, uv_dir.join(&name)).unwrap();
        }
    }
    std::fs::write(uv_dir.join("chat_template.jinja"), STRING_CONTENT_TEMPLATE).unwrap();
    uv_dir
}

#[test]
fn the_published_layout_loads_its_text_model_id_and_reproduces_the_reference_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let text_dir = tmp.path().join("text");
    let dir = published_layout(tmp.path(), text_dir.to_str().unwrap());
    let want = expected("speech");
    let t = tensors("speech");
    let wav = repo().join(want["audio"].as_str().unwrap());
    let out = run_mmllm(&[
        "audio",
        "--model",
        dir.to_str().unwrap(),
        wav.to_str().unwrap(),
        want["prompt"].as_str().unwrap(),
        "--output",
        "jsonl",
        "--max-tokens",
        "16",
    ]);
    let got = json_line(&out);
    let ids = token_ids(&got["token_ids"]);
    assert_eq!(ids, tensor_ids(&t["greedy_ids"]));
    // Same prompt length as the reference: the string-content render matched token for token.
    assert_eq!(got["usage"]["prompt_tokens"], want["num_prompt_tokens"]);
}

#[test]
fn a_missing_text_model_id_directory_is_an_input_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-llama");
    let dir = published_layout(tmp.path(), missing.to_str().unwrap());
    let wav = repo().join("tests/data/speech_16k.wav");
    let out = run_mmllm(&[
        "audio",
        "--model",
        dir.to_str().unwrap(),
        wav.to_str().unwrap(),
        "What is said?",
        "--max-tokens",
        "2",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains(missing.to_str().unwrap()), "{stderr}");
    assert!(stderr.contains("text_model_id"), "{stderr}");
}

#[test]
fn an_uncached_text_model_id_offline_is_an_input_error_naming_the_repo() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = "meta-llama/Llama-3.2-1B-Instruct";
    let dir = published_layout(tmp.path(), repo);
    let cache = tmp.path().join("hub-cache");
    std::fs::create_dir_all(&cache).unwrap();
    let out = mmllm()
        .args([
            "audio",
            "--model",
            dir.to_str().unwrap(),
            util::repo()
                .join("tests/data/speech_16k.wav")
                .to_str()
                .unwrap(),
            "What is said?",
        ])
        .env("HF_HUB_CACHE", &cache)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains(repo), "{stderr}");
    assert!(stderr.contains("HF_HUB_OFFLINE"), "{stderr}");
}

#[test]
fn defaults_name_the_text_model_only_when_text_config_is_absent() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = published_layout(tmp.path(), "org/some-llama");
    let read = |d: &Path| read_json(&d.join("config.json"));
    let own = mmllm::models::ultravox::defaults(&read(&fixture())).unwrap();
    assert!(own.extra_models.is_empty());
    assert!(own.prompt.string_content);
    let published = mmllm::models::ultravox::defaults(&read(&dir)).unwrap();
    let refs: Vec<(&str, &str)> = published
        .extra_models
        .iter()
        .map(|e| (e.reference.as_str(), e.key))
        .collect();
    assert_eq!(refs, [("org/some-llama", "text_model_id")]);
}
