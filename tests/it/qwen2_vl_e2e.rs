//! `mmllm image` / `mmllm video` end to end on the tiny Qwen2-VL fixture: decoding, smart
//! resize, patching, the chat template, M-RoPE and greedy decoding together reproduce the ids
//! Hugging Face transformers produced (tests/fixtures/generate_qwen2_vl.py).

use crate::util::{mmllm, read_json, repo, run_mmllm, token_ids};

fn expected(case: &str) -> serde_json::Value {
    read_json(&repo().join(format!("tests/fixtures/qwen2-vl-tiny/expected/{case}.json")))
}

fn run(args: &[&str]) -> serde_json::Value {
    let out = run_mmllm(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn model() -> String {
    repo()
        .join("tests/fixtures/qwen2-vl-tiny")
        .display()
        .to_string()
}

#[test]
fn one_and_two_images_reproduce_hugging_face() {
    for (case, prompt) in [
        ("one_image", "What is in this image?"),
        ("two_images", "Compare the two pictures."),
    ] {
        let want = expected(case);
        let text = want["text"].as_str().unwrap();
        assert!(text.contains(prompt), "{case}: fixture prompt is {text:?}");
        let files: Vec<String> = want["image_files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                repo()
                    .join("tests/data")
                    .join(f.as_str().unwrap())
                    .display()
                    .to_string()
            })
            .collect();
        let m = model();
        let mut args = vec![
            "image",
            "--model",
            &m,
            "--output",
            "jsonl",
            "--max-tokens",
            "16",
        ];
        args.extend(files.iter().map(String::as_str));
        args.push(prompt);
        let got = run(&args);
        assert_eq!(
            token_ids(&got["token_ids"]),
            token_ids(&want["greedy_ids"]),
            "{case}"
        );
        // The fixture's ids hold one <|image_pad|> per image; ours are expanded to t·h·w/4.
        let grids = want["image_grid_thw"].as_array().unwrap();
        let slots: u64 = grids
            .iter()
            .map(|g| {
                g.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap())
                    .product::<u64>()
                    / 4
            })
            .sum();
        let unexpanded = want["prompt_ids"].as_array().unwrap().len() as u64;
        assert_eq!(
            got["usage"]["prompt_tokens"].as_u64(),
            Some(unexpanded - grids.len() as u64 + slots),
            "{case}"
        );
    }
}

#[test]
fn a_directory_of_frames_is_a_video() {
    let want = expected("video");
    let frames = repo().join("tests/data/qwen_video");
    let m = model();
    let got = run(&[
        "video",
        "--model",
        &m,
        "--output",
        "jsonl",
        "--max-tokens",
        "16",
        frames.to_str().unwrap(),
        "What happens in this video?",
    ]);
    assert_eq!(token_ids(&got["token_ids"]), token_ids(&want["greedy_ids"]));
}

#[test]
fn embeds_with_their_grid_reproduce_the_image_path() {
    let want = expected("one_image");
    let embeds = repo().join("tests/fixtures/qwen2-vl-tiny/expected/embeds_one_image.safetensors");
    let m = model();
    let got = run(&[
        "embeds",
        "--model",
        &m,
        "--output",
        "jsonl",
        "--max-tokens",
        "16",
        embeds.to_str().unwrap(),
        "What is in this image?",
    ]);
    assert_eq!(token_ids(&got["token_ids"]), token_ids(&want["greedy_ids"]));
}

#[test]
fn video_files_natively_and_as_images() {
    let m = model();
    let clip = repo().join("tests/data/video/counter.mp4");
    let clip = clip.to_str().unwrap();
    let native = run(&[
        "video",
        "--model",
        &m,
        "--output",
        "jsonl",
        "--max-tokens",
        "4",
        "--num-frames",
        "8",
        clip,
        "What happens?",
    ]);
    assert_eq!(native["usage"]["completion_tokens"], 4);

    // --as-images: the sampled frames become image items, in order, with their timestamps.
    let plan = run(&[
        "video",
        "--model",
        &m,
        "--dry-run",
        "--as-images",
        "--num-frames",
        "4",
        clip,
        "Describe",
    ]);
    let media = plan["media"].as_array().unwrap();
    assert_eq!(media.len(), 4);
    assert!(media.iter().all(|x| x["kind"] == "image"));
    assert!(media[3]["input"].as_str().unwrap().starts_with(clip));
    let out = run(&[
        "video",
        "--model",
        &m,
        "--output",
        "jsonl",
        "--max-tokens",
        "4",
        "--as-images",
        "--num-frames",
        "4",
        clip,
        "Describe these frames",
    ]);
    assert_eq!(out["usage"]["completion_tokens"], 4);

    // Frames sent as images count against the image limit, before any weights load.
    let refused = mmllm()
        .args([
            "video",
            "--model",
            &m,
            "--as-images",
            "--num-frames",
            "11",
            clip,
            "x",
        ])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("11 image items"));
}
