//! Continuous batching (`engine::scheduler`) on the tiny LLaVA fixture: every request's greedy
//! result must be the one `generate` gives for it alone, whatever joins or leaves the batch
//! around it. Also an ignored benchmark: `cargo test --test it batching_bench -- --ignored
//! --nocapture` prints jobs/s and tokens/s of batched against sequential runs.

use std::path::Path;
use std::time::Instant;

use mmllm::app::pipeline::{self, Loaded, Resolved};
use mmllm::app::plan::Plan;
use mmllm::engine::device::{DTypeChoice, DeviceChoice};
use mmllm::engine::generate::{generate, Completion, Request, Sequence};
use mmllm::engine::scheduler::{self, SchedulerConfig, Stats};
use mmllm::error::{Error, Result};
use mmllm::manifest;

use crate::util::{mmllm, repo};

/// `(prompt, photos, max_tokens)` per job, as manifest jobs on the tiny LLaVA.
fn setup(jobs: &[(&str, &[&str], usize)]) -> (Resolved, Loaded, Vec<Request>) {
    setup_for("llava-tiny", jobs)
}

/// The same for the tiny model fixture `model`.
fn setup_for(model: &str, jobs: &[(&str, &[&str], usize)]) -> (Resolved, Loaded, Vec<Request>) {
    setup_with(model, "images", "image=2", jobs)
}

/// Jobs whose media (files under tests/data) go under manifest key `key`.
fn setup_with(
    model: &str,
    key: &str,
    limit: &str,
    jobs: &[(&str, &[&str], usize)],
) -> (Resolved, Loaded, Vec<Request>) {
    let mut yaml = String::from("jobs:\n");
    for (i, (prompt, photos, max_tokens)) in jobs.iter().enumerate() {
        let images: Vec<String> = photos
            .iter()
            .map(|p| format!("\"{}\"", repo().join("tests/data").join(p).display()))
            .collect();
        yaml.push_str(&format!(
            "  - id: job{i}\n    model: \"{}\"\n    prompt: {prompt:?}\n    {key}: [{}]\n    max_tokens: {max_tokens}\n    temperature: 0\n    limit_mm_per_prompt: {limit}\n",
            repo().join("tests/fixtures").join(model).display(),
            images.join(", ")
        ));
    }
    let parsed = manifest::parse(&yaml, "jobs.yaml", Path::new("."), false).unwrap();
    let device = DeviceChoice::Cpu;
    let plans: Vec<Plan> = parsed
        .iter()
        .map(|job| Plan::from_job(job, device, DTypeChoice::F32, &Default::default()).unwrap())
        .collect();
    let resolved = pipeline::resolve(parsed[0].model()).unwrap();
    let loaded = pipeline::load(&resolved, device, DTypeChoice::F32).unwrap();
    let mut no_stdin = std::io::empty();
    let requests = plans
        .iter()
        .map(|plan| {
            let media = pipeline::prepare_media(plan, &resolved, &mut no_stdin).unwrap();
            pipeline::request(plan, &resolved, &loaded, &media).unwrap()
        })
        .collect();
    (resolved, loaded, requests)
}

fn alone(loaded: &Loaded, requests: &[Request]) -> Vec<Completion> {
    requests
        .iter()
        .map(|r| generate(loaded.model.as_ref(), &loaded.tokenizer, r, &mut |_| Ok(())).unwrap())
        .collect()
}

/// Runs `items` through the scheduler; returns `(index, completion)` in completion order.
fn batched(
    loaded: &Loaded,
    config: SchedulerConfig,
    items: Vec<(usize, Result<Request>)>,
) -> (Vec<(usize, Result<Completion>)>, Stats) {
    let mut done = Vec::new();
    let stats = scheduler::run(
        loaded.model.as_ref(),
        &loaded.tokenizer,
        config,
        &mut items.into_iter(),
        &mut |i, c| {
            done.push((i, c));
            Ok(())
        },
    )
    .unwrap();
    (done, stats)
}

const JOBS: &[(&str, &[&str], usize)] = &[
    ("What is in this image?", &["llava_photo_1.jpg"], 9),
    (
        "Describe this photo in great detail, please, with colours and shapes.",
        &["llava_photo_2.jpg"],
        3,
    ),
    ("Hi", &["llava_photo_2.jpg"], 14),
    (
        "Compare these.",
        &["llava_photo_1.jpg", "llava_photo_2.jpg"],
        6,
    ),
    ("One word?", &["llava_photo_1.jpg"], 1),
];

fn same(got: &Completion, want: &Completion, what: &str) {
    assert_eq!(got.token_ids, want.token_ids, "{what}");
    assert_eq!(got.text, want.text, "{what}");
    assert_eq!(got.finish_reason, want.finish_reason, "{what}");
    assert_eq!(got.prompt_tokens, want.prompt_tokens, "{what}");
}

#[test]
fn batched_greedy_equals_each_job_alone() {
    let (_, loaded, requests) = setup(JOBS);
    let want = alone(&loaded, &requests);
    // The jobs differ in prompt length (and so in cache length) and in max_tokens.
    let lens: Vec<usize> = requests.iter().map(|r| r.prompt.ids.len()).collect();
    assert!(lens.windows(2).any(|w| w[0] != w[1]), "{lens:?}");
    assert!(want.iter().any(|c| c.token_ids.len() > 5));

    for max_seqs in [2, 3, 8] {
        let config = SchedulerConfig {
            max_seqs,
            max_kv_positions: usize::MAX,
        };
        let items = requests.iter().cloned().map(Ok).enumerate().collect();
        let (done, stats) = batched(&loaded, config, items);
        // The one-token job finishes at its prefill and never joins a decode step.
        assert_eq!(stats.peak_seqs, max_seqs.min(4), "max_seqs {max_seqs}");
        let mut seen: Vec<usize> = done.iter().map(|(i, _)| *i).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..requests.len()).collect::<Vec<_>>());
        for (i, got) in &done {
            let got = got.as_ref().unwrap();
            same(got, &want[*i], &format!("max_seqs {max_seqs}, job {i}"));
        }
        // Shorter jobs finish (and are reported) before longer ones that started with them.
        if max_seqs == 8 {
            let order: Vec<usize> = done.iter().map(|(i, _)| *i).collect();
            assert_eq!(order.first(), Some(&4), "{order:?}");
            assert_eq!(order.last(), Some(&2), "{order:?}");
        }
    }
}

/// Qwen2-VL continues each sequence at its own M-RoPE text position (cache length plus the
/// rope delta its prefill found); batched decode must keep those apart.
#[test]
fn qwen2_vl_batched_greedy_equals_each_job_alone() {
    let jobs: &[(&str, &[&str], usize)] = &[
        ("What is in this image?", &["llava_photo_1.jpg"], 7),
        ("Hi", &[], 10),
        (
            "Compare these two.",
            &["llava_photo_1.jpg", "llava_photo_2.jpg"],
            4,
        ),
    ];
    let (_, loaded, requests) = setup_for("qwen2-vl-tiny", jobs);
    let want = alone(&loaded, &requests);
    let config = SchedulerConfig {
        max_seqs: 2,
        max_kv_positions: usize::MAX,
    };
    let items = requests.iter().cloned().map(Ok).enumerate().collect();
    let (done, stats) = batched(&loaded, config, items);
    assert_eq!(stats.peak_seqs, 2);
    assert_eq!(done.len(), 3);
    for (i, got) in &done {
        same(got.as_ref().unwrap(), &want[*i], &format!("job {i}"));
    }
}

/// The audio families whose language model is the shared Llama decoder batch their decode
/// steps too, with the same greedy results as each job alone.
#[test]
fn audio_families_batched_greedy_equals_each_job_alone() {
    let jobs: &[(&str, &[&str], usize)] = &[
        ("What is said?", &["speech_16k.wav"], 7),
        ("Repeat it.", &["speech_44k.wav"], 10),
        ("What is said?", &["speech_16k.wav"], 3),
    ];
    for model in ["qwen2-audio-tiny", "ultravox-tiny"] {
        let (_, loaded, requests) = setup_with(model, "audios", "audio=1", jobs);
        let want = alone(&loaded, &requests);
        let config = SchedulerConfig {
            max_seqs: 2,
            max_kv_positions: usize::MAX,
        };
        let items = requests.iter().cloned().map(Ok).enumerate().collect();
        let (done, stats) = batched(&loaded, config, items);
        assert_eq!(stats.peak_seqs, 2, "{model}");
        assert_eq!(done.len(), 3, "{model}");
        for (i, got) in &done {
            same(
                got.as_ref().unwrap(),
                &want[*i],
                &format!("{model} job {i}"),
            );
        }
    }
}

/// `decode_batch` against per-sequence `decode` on both families' real fixtures, caches of
/// different lengths (and, for Qwen2-VL, different rope deltas): logits within 1e-5.
#[test]
fn decode_batch_equals_decode_on_fixtures() {
    for model in ["llava-tiny", "qwen2-vl-tiny"] {
        let jobs: &[(&str, &[&str], usize)] = &[
            ("What is in this image?", &["llava_photo_1.jpg"], 4),
            ("Hi", &[], 4),
            ("Describe both, briefly.", &["llava_photo_2.jpg"], 4),
        ];
        let (_, loaded, requests) = setup_for(model, jobs);
        let m = loaded.model.as_ref();
        let mut caches = Vec::new();
        for r in &requests {
            let mut cache = m.new_cache(r.prompt.ids.len() + 4).unwrap();
            m.prefill(&r.prompt, &r.items, &mut cache).unwrap();
            caches.push(cache);
        }
        let deltas: Vec<i64> = caches.iter().map(|c| c.rope_delta).collect();
        let ids = [5u32, 17, 9];
        let mut single: Vec<_> = caches.iter().map(|c| c.try_clone().unwrap()).collect();
        let want: Vec<Vec<f32>> = ids
            .iter()
            .zip(single.iter_mut())
            .map(|(&id, c)| m.decode(id, c).unwrap().to_vec1().unwrap())
            .collect();
        let mut refs: Vec<_> = caches.iter_mut().collect();
        // Mismatched ids and caches are refused before any cache is touched.
        assert!(m.decode_batch(&ids[..2], &mut refs).is_err());
        let got = m.decode_batch(&ids, &mut refs).unwrap();
        assert_eq!(got.len(), 3);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let g: Vec<f32> = g.to_vec1().unwrap();
            let diff = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff < 1e-5,
                "{model} sequence {i}: {diff} (deltas {deltas:?})"
            );
            assert_eq!(caches[i].len(), single[i].len());
        }
        if model == "qwen2-vl-tiny" {
            assert!(deltas.iter().any(|&d| d != 0), "{deltas:?}");
        }
    }
}

#[test]
fn kv_cap_queues_requests_and_errors_pass_through() {
    let (_, loaded, requests) = setup(&JOBS[..3]);
    let want = alone(&loaded, &requests);
    // Room for the first two jobs only: the third waits for one of them to finish.
    let cap = requests[..2]
        .iter()
        .map(|r| r.prompt.ids.len() + r.max_tokens)
        .sum();
    let config = SchedulerConfig {
        max_seqs: 8,
        max_kv_positions: cap,
    };
    let mut items: Vec<(usize, Result<Request>)> =
        requests.iter().cloned().map(Ok).enumerate().collect();
    items.insert(1, (9, Err(Error::usage("bad media"))));
    let (done, stats) = batched(&loaded, config, items);
    assert_eq!(stats.peak_seqs, 2);
    assert_eq!(done.len(), 4);
    // The failed item is reported as soon as it is pulled, before anything finishes.
    assert_eq!(done[0].0, 9);
    assert!(done[0].1.is_err());
    for (i, got) in &done[1..] {
        same(got.as_ref().unwrap(), &want[*i], &format!("job {i}"));
    }
    // A single request larger than the cap still runs.
    let config = SchedulerConfig {
        max_seqs: 8,
        max_kv_positions: 10,
    };
    let (done, stats) = batched(&loaded, config, vec![(0, Ok(requests[0].clone()))]);
    assert_eq!(stats.peak_seqs, 1);
    same(done[0].1.as_ref().unwrap(), &want[0], "over the cap");
}

/// Prints a table of batched vs sequential throughput on this machine; never asserts speed.
#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn batching_bench() {
    for model in ["llava-tiny", "qwen2-vl-tiny"] {
        bench(model);
    }
}

fn bench(model: &str) {
    let photos: [&[&str]; 2] = [&["llava_photo_1.jpg"], &["llava_photo_2.jpg"]];
    let prompts = ["What is in this image?", "Describe it.", "Any people here?"];
    let jobs: Vec<(&str, &[&str], usize)> = (0..24)
        .map(|i| (prompts[i % 3], photos[i % 2], 32))
        .collect();
    let (_, loaded, requests) = setup_for(model, &jobs);
    println!("\n{model}: {} jobs, max_tokens 32, f32 CPU", requests.len());
    println!(
        "{:<22} {:>8} {:>8} {:>10} {:>8}",
        "mode", "secs", "jobs/s", "tokens/s", "tokens"
    );
    let report = |mode: &str, secs: f64, tokens: usize| {
        println!(
            "{mode:<22} {secs:>8.2} {:>8.2} {:>10.1} {tokens:>8}",
            requests.len() as f64 / secs,
            tokens as f64 / secs
        );
    };
    // Warm up once, then report the best of three runs of each mode.
    alone(&loaded, &requests[..2]);
    let best = |run: &dyn Fn() -> usize| {
        let mut secs = f64::INFINITY;
        let mut tokens = 0;
        for _ in 0..3 {
            let t = Instant::now();
            tokens = run();
            secs = secs.min(t.elapsed().as_secs_f64());
        }
        (secs, tokens)
    };
    let (secs, tokens) = best(&|| {
        alone(&loaded, &requests)
            .iter()
            .map(|c| c.token_ids.len())
            .sum()
    });
    report("sequential (generate)", secs, tokens);
    // The prefills alone (every mode runs them one by one), to see what decoding costs.
    let (secs, _) = best(&|| {
        for r in &requests {
            Sequence::prefill(loaded.model.as_ref(), &loaded.tokenizer, r, &mut |_| Ok(()))
                .unwrap();
        }
        0
    });
    report("prefills only", secs, 0);
    // Decode steps alone over 8 prefilled caches: 24 tokens each, one sequence at a time
    // (`decode`) against all 8 per step (`decode_batch`).
    let m = loaded.model.as_ref();
    let prefilled: Vec<_> = requests[..8]
        .iter()
        .map(|r| {
            let mut cache = m.new_cache(r.prompt.ids.len() + 32).unwrap();
            m.prefill(&r.prompt, &r.items, &mut cache).unwrap();
            cache
        })
        .collect();
    let (secs, tokens) = best(&|| {
        let mut caches: Vec<_> = prefilled.iter().map(|c| c.try_clone().unwrap()).collect();
        for c in caches.iter_mut() {
            for _ in 0..24 {
                m.decode(5, c).unwrap();
            }
        }
        8 * 24
    });
    report("decode only, 1 by 1", secs, tokens);
    let (secs, tokens) = best(&|| {
        let mut caches: Vec<_> = prefilled.iter().map(|c| c.try_clone().unwrap()).collect();
        let mut refs: Vec<_> = caches.iter_mut().collect();
        for _ in 0..24 {
            m.decode_batch(&[5; 8], &mut refs).unwrap();
        }
        8 * 24
    });
    report("decode only, 8 per step", secs, tokens);
    for max_seqs in [1, 4, 8, 16, 24] {
        let config = SchedulerConfig {
            max_seqs,
            max_kv_positions: usize::MAX,
        };
        let (secs, tokens) = best(&|| {
            let items = requests.iter().cloned().map(Ok).enumerate().collect();
            let (done, _) = batched(&loaded, config, items);
            done.iter()
                .map(|(_, c)| c.as_ref().unwrap().token_ids.len())
                .sum()
        });
        report(&format!("batched max_seqs {max_seqs}"), secs, tokens);
    }
}

/// Through the CLI: the lines of `mmllm batch` do not depend on `--max-seqs`, and 0 is refused.
#[test]
fn cli_results_do_not_depend_on_max_seqs() {
    let dir = tempfile::tempdir().unwrap();
    let model = repo().join("tests/fixtures/llava-tiny");
    let photo = |n: u32| repo().join(format!("tests/data/llava_photo_{n}.jpg"));
    let mut yaml = format!("defaults:\n  model: \"{}\"\njobs:\n", model.display());
    for (i, (prompt, n, max_tokens)) in [
        ("What is in this image?", 1, 8),
        ("Hi", 2, 3),
        ("Tell me more about it, in detail.", 1, 11),
        ("Colours?", 2, 5),
        ("And this?", 1, 2),
    ]
    .iter()
    .enumerate()
    {
        yaml.push_str(&format!(
            "  - id: j{i}\n    prompt: {prompt:?}\n    images: [\"{}\"]\n    max_tokens: {max_tokens}\n",
            photo(*n).display()
        ));
    }
    let manifest = dir.path().join("jobs.yaml");
    std::fs::write(&manifest, yaml).unwrap();
    let run = |max_seqs: &str| {
        let out = mmllm()
            .args(["batch", "--device", "cpu", "--max-seqs", max_seqs])
            .arg(&manifest)
            .output()
            .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<(String, serde_json::Value)> = stdout
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["id"].as_str().unwrap().to_string(),
                    v["token_ids"].clone(),
                )
            })
            .collect();
        (
            out.status.code(),
            lines,
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, one, stderr) = run("1");
    assert_eq!(code, Some(0), "{stderr}");
    let ids: Vec<&str> = one.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["j0", "j1", "j2", "j3", "j4"]);
    for max_seqs in ["2", "8"] {
        let (code, lines, stderr) = run(max_seqs);
        assert_eq!(code, Some(0), "{stderr}");
        assert_eq!(lines, one, "--max-seqs {max_seqs}");
    }
    let (code, lines, stderr) = run("0");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(lines.is_empty());
    assert!(stderr.contains("--max-seqs"), "{stderr}");
}

/// Batched vision encoding: LLaVA stacks the images of several prompts into one tower pass;
/// each item's features equal encoding it alone, and non-image items pass through in order.
#[test]
fn llava_encode_batch_equals_encoding_each_item() {
    use mmllm::media::MediaItem;
    use mmllm::models::ProcessorKwargs;
    let (_, loaded, _) = setup(&[("Hi", &[], 1)]);
    let decode = |name: &str| {
        let bytes = std::fs::read(repo().join("tests/data").join(name)).unwrap();
        let limits = mmllm::media::image::ImageLimits::default();
        MediaItem::Image(mmllm::media::image::decode_image(&bytes, name, &limits).unwrap())
    };
    let embeds_bytes =
        std::fs::read(repo().join("tests/fixtures/llava-tiny/expected/image_embeds.safetensors"))
            .unwrap();
    let embeds = MediaItem::Embeds(
        mmllm::media::embeds::load_embeds(
            &embeds_bytes,
            "image_embeds.safetensors",
            mmllm::media::Modality::Image,
        )
        .unwrap(),
    );
    let items = [
        decode("llava_photo_1.jpg"),
        embeds,
        decode("llava_photo_2.jpg"),
        decode("llava_photo_1.jpg"),
    ];
    let kwargs = ProcessorKwargs::default();
    let refs: Vec<(&MediaItem, &ProcessorKwargs)> = items.iter().map(|i| (i, &kwargs)).collect();
    let batched = loaded.model.encode_batch(&refs);
    assert_eq!(batched.len(), items.len());
    for (i, (item, got)) in items.iter().zip(batched).enumerate() {
        let got = got.unwrap();
        let want = loaded.model.encode(item).unwrap();
        assert_eq!(got.expansion, want.expansion, "item {i}");
        let diff = (got.features - want.features)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff <= 1e-5, "item {i}: features differ by {diff}");
    }
}
