//! `--min-pixels` / `--max-pixels` end to end: `mmllm image|video` with the flags reproduces
//! Hugging Face's `processor(..., min_pixels=..., max_pixels=...)` on the tiny Qwen2-VL and
//! Qwen2.5-VL fixtures (tests/fixtures/generate_qwen2_vl_pixels.py writes
//! `tests/fixtures/<model>/expected/pixels_<case>.json`): the same grid (so the same prompt
//! length), the same greedy ids and the same first-step top-5 log-probs. Each case's grid differs
//! from the default run's, so the flags demonstrably take effect. Families without a pixel budget
//! (LLaVA) refuse the flags.

use std::process::Output;

use serde_json::Value;

use crate::util::{json_line, read_json, repo};

fn fixture(model: &str) -> String {
    repo()
        .join("tests/fixtures")
        .join(model)
        .display()
        .to_string()
}

fn expected(model: &str, case: &str) -> Value {
    read_json(&repo().join(format!(
        "tests/fixtures/{model}/expected/pixels_{case}.json"
    )))
}

fn mmllm(args: &[String]) -> Output {
    crate::util::mmllm().args(args).output().unwrap()
}

/// Runs the CLI and parses its one JSONL record.
fn run_jsonl(args: &[String]) -> Value {
    json_line(&mmllm(args))
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// `mmllm image|video --model <fixture> --output jsonl --max-tokens N --logprobs 5
/// [--min-pixels A] [--max-pixels B] <media> <prompt>`, without the pixel flags when
/// `with_kwargs` is false (the default run).
fn args_for(model: &str, want: &Value, with_kwargs: bool, max_tokens: u64) -> Vec<String> {
    let modality = want["modality"].as_str().unwrap();
    let mut args: Vec<String> = vec![
        modality.into(),
        "--model".into(),
        fixture(model),
        "--output".into(),
        "jsonl".into(),
        "--max-tokens".into(),
        max_tokens.to_string(),
        "--logprobs".into(),
        "5".into(),
    ];
    if with_kwargs {
        let kwargs = want["kwargs"].as_object().unwrap();
        assert!(!kwargs.is_empty());
        for (key, flag) in [
            ("min_pixels", "--min-pixels"),
            ("max_pixels", "--max-pixels"),
        ] {
            if let Some(n) = kwargs.get(key) {
                args.push(flag.into());
                args.push(n.as_u64().unwrap().to_string());
            }
        }
    }
    for m in want["media"].as_array().unwrap() {
        args.push(
            repo()
                .join("tests/data")
                .join(m.as_str().unwrap())
                .display()
                .to_string(),
        );
    }
    args.push(want["prompt"].as_str().unwrap().into());
    args
}

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= (1e-4 * want.abs()).max(1e-5)
}

/// The first generated token's top-5 against HF's `(token_id, logprob)` pairs. A token missing
/// from our top 5 is allowed only as a tie at the boundary (HF's value equals our 5th's).
fn check_top5(got: &Value, want: &Value, what: &str) {
    let first = &got["logprobs"][0];
    let top = first["top"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no logprobs[0].top in {got}"));
    assert_eq!(top.len(), 5, "{what}: {first}");
    let ours: Vec<(u64, f64)> = top
        .iter()
        .map(|e| {
            (
                e["token_id"].as_u64().unwrap(),
                e["logprob"].as_f64().unwrap(),
            )
        })
        .collect();
    let theirs: Vec<(u64, f64)> = want
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
        .collect();
    assert_eq!(
        first["token_id"].as_u64(),
        Some(theirs[0].0),
        "{what}: first token"
    );
    assert!(
        close(first["logprob"].as_f64().unwrap(), theirs[0].1),
        "{what}: first token logprob {} vs HF {}",
        first["logprob"],
        theirs[0].1
    );
    for (id, lp) in &theirs {
        match ours.iter().find(|(i, _)| i == id) {
            Some((_, ours_lp)) => assert!(
                close(*ours_lp, *lp),
                "{what}: token {id}: logprob {ours_lp} vs HF {lp} (ours {ours:?}, HF {theirs:?})"
            ),
            None => assert!(
                close(ours[4].1, *lp),
                "{what}: HF's top-5 token {id} ({lp}) is not in ours {ours:?}"
            ),
        }
    }
}

fn check_case(model: &str, case: &str) {
    let want = expected(model, case);
    let what = format!("{model}/{case} {}", want["kwargs"]);
    let max_tokens = want["max_tokens"].as_u64().unwrap();
    let greedy = u64s(&want["greedy_ids"]);
    assert_eq!(greedy.len() as u64, max_tokens);

    let got = run_jsonl(&args_for(model, &want, true, max_tokens));
    assert_eq!(
        got["usage"]["prompt_tokens"].as_u64(),
        want["prompt_tokens"].as_u64(),
        "{what}: prompt tokens (HF grid {})",
        want[format!("{}_grid_thw", want["modality"].as_str().unwrap())]
    );
    assert_eq!(u64s(&got["token_ids"]), greedy, "{what}: greedy ids");
    check_top5(&got, &want["top5_first_step"], &what);

    // The same run without the flags takes the checkpoint's processor config: another grid.
    let default = run_jsonl(&args_for(model, &want, false, 1));
    let default_tokens = default["usage"]["prompt_tokens"].as_u64();
    assert_eq!(
        default_tokens,
        want["default_prompt_tokens"].as_u64(),
        "{what}: default run's prompt tokens"
    );
    assert_ne!(
        default_tokens,
        got["usage"]["prompt_tokens"].as_u64(),
        "{what}: the flags did not change the prompt"
    );
}

const QWEN2: &str = "qwen2-vl-tiny";
const QWEN25: &str = "qwen2_5-vl-tiny";

#[test]
fn qwen2_vl_max_pixels_shrinks_an_image() {
    // 517x333: [1,6,8] by default, [1,4,6] with max_pixels 6000.
    check_case(QWEN2, "max_china");
}

#[test]
fn qwen2_vl_min_pixels_grows_a_small_image() {
    // 56x56: [1,4,4] by default, [1,8,8] with min_pixels 8000.
    check_case(QWEN2, "min_frame");
}

#[test]
fn qwen2_vl_min_and_max_pixels_together() {
    // 637x127: [1,2,16] by default, [1,12,52] with min 100000 / max 200000.
    check_case(QWEN2, "both_flower");
}

#[test]
fn qwen2_vl_max_pixels_applies_to_video_frames() {
    // 8 frames of 56x56: [4,4,4] by default, [4,2,2] with max_pixels 1568 (below the
    // checkpoint's min_pixels 3136: max_pixels is tested first and wins, as in transformers).
    check_case(QWEN2, "max_video");
}

#[test]
fn qwen2_5_vl_max_pixels_shrinks_an_image() {
    check_case(QWEN25, "max_china");
}

#[test]
fn qwen2_5_vl_min_pixels_grows_a_small_image() {
    check_case(QWEN25, "min_frame");
}

#[test]
fn qwen2_5_vl_min_and_max_pixels_together() {
    check_case(QWEN25, "both_flower");
}

#[test]
fn llava_refuses_min_pixels() {
    let args: Vec<String> = vec![
        "image".into(),
        "--model".into(),
        fixture("llava-tiny"),
        "--min-pixels".into(),
        "1000".into(),
        repo()
            .join("tests/data/llava_photo_1.jpg")
            .display()
            .to_string(),
        "hi".into(),
    ];
    let out = mmllm(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(stderr.contains("--min-pixels"), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
