//! `mmllm image` / `mmllm embeds` end to end on the tiny LLaVA fixture: our decoding, CLIP
//! preprocessing, chat template, tokenization, model and sampler together must reproduce what
//! Hugging Face transformers produced for the same photo and prompt
//! (tests/fixtures/llava-tiny/expected, made by tests/fixtures/generate.py).

use std::process::Stdio;

use crate::util::{json_line, mmllm, read_json, repo, run_mmllm, token_ids};

fn fixture() -> String {
    repo()
        .join("tests/fixtures/llava-tiny")
        .display()
        .to_string()
}

fn expected(case: &str) -> serde_json::Value {
    read_json(&repo().join(format!("tests/fixtures/llava-tiny/expected/{case}.json")))
}

fn check_against_hf(case: &str, got: &serde_json::Value) {
    let want = expected(case);
    assert_eq!(
        token_ids(&got["token_ids"]),
        token_ids(&want["greedy_ids"]),
        "{case}"
    );
    assert_eq!(got["usage"]["prompt_tokens"], want["num_prompt_tokens"]);
    assert_eq!(
        got["usage"]["completion_tokens"].as_u64().unwrap(),
        want["greedy_ids"].as_array().unwrap().len() as u64
    );
    assert_eq!(got["finish_reason"], "length");
    let steps = got["logprobs"].as_array().unwrap();
    let want_steps = want["step_top"].as_array().unwrap();
    assert_eq!(steps.len(), want_steps.len());
    for (step, (g, w)) in steps.iter().zip(want_steps).enumerate() {
        let top = g["top"].as_array().unwrap();
        let got_ids: Vec<u32> = top
            .iter()
            .map(|t| u32::try_from(t["token_id"].as_u64().unwrap()).unwrap())
            .collect();
        assert_eq!(
            got_ids,
            token_ids(&w["ids"]),
            "{case} step {step} top-5 ids"
        );
        for (t, wl) in top.iter().zip(w["logprobs"].as_array().unwrap()) {
            let (a, b) = (t["logprob"].as_f64().unwrap(), wl.as_f64().unwrap());
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "{case} step {step}: logprob {a} vs HF {b}"
            );
        }
        assert_eq!(g["token_id"], top[0]["token_id"], "greedy takes the best");
        assert_eq!(g["logprob"], top[0]["logprob"]);
    }
}

#[test]
fn image_prompt_reproduces_hugging_face() {
    for case in ["photo_1", "photo_2"] {
        let want = expected(case);
        let image = repo().join(want["image"].as_str().unwrap());
        let n = want["greedy_ids"].as_array().unwrap().len().to_string();
        let out = run_mmllm(&[
            "image",
            "--model",
            &fixture(),
            "--output",
            "jsonl",
            "--logprobs",
            "5",
            "--max-tokens",
            &n,
            image.to_str().unwrap(),
            want["prompt"].as_str().unwrap(),
        ]);
        check_against_hf(case, &json_line(&out));
    }
}

#[test]
fn raw_prompt_and_embeds_take_the_same_path() {
    let want = expected("photo_1");
    let image = repo().join(want["image"].as_str().unwrap());
    let n = want["greedy_ids"].as_array().unwrap().len().to_string();
    let common = ["--output", "jsonl", "--logprobs", "5", "--max-tokens", &n];
    let raw = want["rendered_prompt"].as_str().unwrap();
    let model = fixture();
    let image = image.to_str().unwrap();
    let mut raw_args = vec!["image", "--model", &model];
    raw_args.extend(common);
    raw_args.extend(["--raw", image, raw]);
    check_against_hf("photo_1", &json_line(&run_mmllm(&raw_args)));

    let embeds = repo().join("tests/fixtures/llava-tiny/expected/image_embeds.safetensors");
    let mut embeds_args = vec!["embeds", "--model", &model];
    embeds_args.extend(common);
    embeds_args.extend([embeds.to_str().unwrap(), want["prompt"].as_str().unwrap()]);
    check_against_hf("photo_1", &json_line(&run_mmllm(&embeds_args)));
}

#[test]
fn text_output_streams_the_same_text_and_stop_strings_cut_it() {
    let want = expected("photo_1");
    let image = repo().join(want["image"].as_str().unwrap());
    let image = image.to_str().unwrap();
    let prompt = want["prompt"].as_str().unwrap();
    let model = fixture();
    let json = json_line(&run_mmllm(&[
        "image",
        "--model",
        &model,
        "--output",
        "jsonl",
        "--max-tokens",
        "16",
        image,
        prompt,
    ]));
    let full = json["text"].as_str().unwrap().to_string();
    let text = run_mmllm(&[
        "image",
        "--model",
        &model,
        "--max-tokens",
        "16",
        image,
        prompt,
    ]);
    assert_eq!(text.status.code(), Some(0));
    assert_eq!(String::from_utf8(text.stdout).unwrap(), format!("{full}\n"));

    // A stop string from the middle of the output: everything before it, and nothing after.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 6, "need some text to cut: {full:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = &full[..full.find(&stop).unwrap()];
    let out = json_line(&run_mmllm(&[
        "image",
        "--model",
        &model,
        "--output",
        "jsonl",
        "--max-tokens",
        "16",
        "--stop",
        &stop,
        image,
        prompt,
    ]));
    assert_eq!(out["text"].as_str().unwrap(), cut, "stop {stop:?}");
    assert_eq!(out["finish_reason"], "stop");
}

#[test]
fn embeds_of_the_wrong_shape_name_the_expected_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.npy");
    // A (2, 3) float32 .npy: wrong rank for LLaVA's (num_items, 576, hidden).
    std::fs::write(&bad, crate::util::npy_f32(&[2, 3], &[0.0; 6])).unwrap();
    let out = run_mmllm(&["embeds", "--model", &fixture(), bad.to_str().unwrap(), "hi"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(
        stderr.contains("bad.npy") && stderr.contains("576"),
        "{stderr}"
    );
}

#[test]
fn closed_stdout_is_not_an_error() {
    let want = expected("photo_1");
    let image = repo().join(want["image"].as_str().unwrap());
    let mut child = mmllm()
        .args(["image", "--model", &fixture(), "--max-tokens", "64"])
        .arg(&image)
        .arg("describe")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away before any output, like `| head -c0`
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
