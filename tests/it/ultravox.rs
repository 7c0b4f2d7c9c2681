//! Ultravox on the tiny random checkpoint against fixie-ai/ultravox's reference code
//! (tests/fixtures/ultravox-tiny, made by tests/fixtures/generate_ultravox.py): features,
//! chunking, audio embeddings, prompt ids, first-step logits, greedy ids, and the CLI end to end,
//! for the 16 kHz speech file (two encoder chunks), a 1.5 s clip of it (one unpadded chunk) and
//! the 44.1 kHz file (resampled).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use candle_core::{DType, Device, Tensor};
use mmllm::media::{Audio, MediaItem, Modality};
use mmllm::models::ultravox::{UltravoxModel, AUDIO_PLACEHOLDER};
use mmllm::models::{Model, Spliced};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture() -> PathBuf {
    root().join("tests/fixtures/ultravox-tiny")
}

/// The reference cases of generate_ultravox.py.
const CASES: [&str; 3] = ["speech", "short", "speech_44k"];

fn expected(case: &str) -> serde_json::Value {
    let path = fixture().join(format!("expected/{case}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn tensors(case: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixture().join(format!("expected/{case}.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
}

fn int_list(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// 16-bit PCM mono WAV as f32 (x / 32768, as soundfile reads it).
fn read_wav(path: &Path) -> Audio {
    let mut reader = hound::WavReader::open(path).unwrap();
    let spec = reader.spec();
    assert_eq!((spec.channels, spec.bits_per_sample), (1, 16));
    let samples = reader
        .samples::<i16>()
        .map(|s| f32::from(s.unwrap()) / 32768.0)
        .collect();
    Audio {
        samples,
        sample_rate: spec.sample_rate,
    }
}

/// The audio of a case, as decoded from its file (before any resampling).
fn audio(case: &str) -> Audio {
    match case {
        "speech" => read_wav(&root().join("tests/data/speech_16k.wav")),
        "short" => {
            let mut a = read_wav(&root().join("tests/data/speech_16k.wav"));
            a.samples.truncate(23_999);
            a
        }
        "speech_44k" => read_wav(&root().join("tests/data/speech_44k.wav")),
        other => panic!("unknown case {other}"),
    }
}

fn model() -> UltravoxModel {
    UltravoxModel::load(&fixture(), &Device::Cpu, DType::F32).unwrap()
}

/// max |a - b| / max |b|.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, y| m.max(y.abs()));
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
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
    assert_eq!(lens, int_list(&t["audio_lens"]), "{case}");
    assert_eq!(tokens, int_list(&t["audio_token_len"]), "{case}");
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
    assert_eq!(prompt.ids, int_list(&t["input_ids"]), "{case}: prompt ids");
    let starts: Vec<u64> = want["audio_token_start_idx"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(prompt.spans.len(), 1);
    assert_eq!(prompt.spans[0].start as u64, starts[0]);

    let greedy = int_list(&t["greedy_ids"]);
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
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap())
            .unwrap();
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

fn mmllm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mmllm"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap()
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
    let wav = root().join(want["audio"].as_str().unwrap());
    let out = mmllm(&[
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
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let got: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    let ids: Vec<u32> = got["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, int_list(&t["greedy_ids"]), "{case}");
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
