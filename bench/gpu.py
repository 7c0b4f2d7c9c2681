#!/usr/bin/env python3
"""mmllm on one GPU, side by side with Hugging Face transformers on the same card:
parity of the tiny LLaVA and Qwen2-VL fixtures on the GPU (f32 and bf16), then speed at the
real shapes of LLaVA-1.5-7B, Qwen2-VL-2B and Llama-3.2-1B (random weights, bf16): TTFT
(vision encoder and prefill), decode tok/s at batch 1 over a fixed number of new tokens (EOS
ignored), output tok/s with 16 prompts, and where a decode step's time goes (`mmllm
profile-decode`: host time to enqueue a step vs GPU time to run it, with the fused decode
kernels and without them, MMLLM_UNFUSED_DECODE=1), against the copy-bandwidth limit.

Runs on a machine with an NVIDIA GPU, PyTorch and transformers, no Rust toolchain and no
network, given an `mmllm` binary built with `--features cuda`:

    python3 bench/gpu.py --mmllm ./mmllm [--skip-7b] [--skip-qwen] [--skip-1b] [--commit C]

Prints tables on stdout, writes every measured row as JSON to
`bench/results/<date>-<card>.json` (or --json), and exits non-zero if a parity check fails.
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import transformers
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "tests/fixtures/llava-tiny")
QWEN_TINY = os.path.join(REPO, "tests/fixtures/qwen2-vl-tiny")
ULTRAVOX_TINY = os.path.join(REPO, "tests/fixtures/ultravox-tiny")
PHOTO = os.path.join(REPO, "tests/data/llava_photo_1.jpg")
PROMPT = "What is in this image?"


RESULTS = []  # one dict per measured row, written as JSON at the end


BASELINE = None  # --baseline: an older mmllm binary measured beside the new one


def record(workload, unit, hf, mmllm, limit=None, goal=None, note=None, baseline=None):
    """One row of the JSON table (hf/mmllm/limit/baseline in `unit`; None where not measured)."""
    RESULTS.append({"workload": workload, "unit": unit, "hf": hf, "mmllm": mmllm,
                    "baseline": baseline, "limit": limit, "goal": goal, "note": note})


def run_mmllm(binary, model, *extra, image=PHOTO):
    cmd = [binary, "image", "--model", model, "--output", "jsonl", *extra, image, PROMPT]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"mmllm failed ({out.returncode}): {' '.join(cmd)}")
    return json.loads(out.stdout.strip().splitlines()[-1]), wall, " ".join(cmd)


def top_error(res, greedy, step_top):
    """Greedy ids equal, and the largest error of the reference's top-5 logprobs over the
    steps whose tokens agree so far (step_top: [(ids, logprobs)] per step)."""
    max_err = 0.0
    for step, (got, (wids, wlps)) in enumerate(zip(res["logprobs"], step_top)):
        if res["token_ids"][:step + 1] != greedy[:step + 1]:
            break
        by_id = {t["token_id"]: t["logprob"] for t in got["top"]}
        for wid, wlp in zip(wids, wlps):
            if wid in by_id:
                max_err = max(max_err, abs(by_id[wid] - wlp))
    return res["token_ids"] == greedy, max_err


def tiny_parity(binary):
    """Greedy ids and top-5 logprobs of the tiny fixtures on the GPU (fused decode kernels)
    vs HF's CPU f32 reference."""
    llava = json.load(open(os.path.join(TINY, "expected/photo_1.json")))
    qwen = json.load(open(os.path.join(QWEN_TINY, "expected/one_image.json")))
    cases = [
        ("LLaVA", TINY, PHOTO, llava["greedy_ids"],
         [(t["ids"], t["logprobs"]) for t in llava["step_top"]], ["--ignore-eos"]),
        ("Qwen2-VL", QWEN_TINY, os.path.join(REPO, "tests/data", qwen["image_files"][0]),
         qwen["greedy_ids"], list(zip(qwen["top5_ids"], qwen["top5_logprobs"])), []),
    ]
    rows = []
    ok = True
    for name, model, image, greedy, step_top, extra in cases:
        for dtype in ["f32", "bf16"]:
            res, _, cmd = run_mmllm(binary, model, "--device", "cuda", "--dtype", dtype,
                                    "--max-tokens", str(len(greedy)), "--logprobs", "5",
                                    *extra, image=image)
            ids_equal, max_err = top_error(res, greedy, step_top)
            rows.append((f"{name} {dtype}", ids_equal, max_err, cmd))
            if dtype == "f32" and (not ids_equal or max_err > 1e-3):
                ok = False
    return rows, ok


def random_bf16(model_class, config):
    """`model_class(config)` with random weights (seed 0), built in bf16 on the GPU."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = model_class(config)
        torch.set_default_dtype(torch.float32)
    # transformers 5 prefers a config's own dtype to the default one (the tiny Qwen2-VL
    # fixture's says float32: its checkpoint and HF's run were f32 before 2026-11-27 run 9).
    return model.to(torch.bfloat16)


def copy_tokenizer_files(src, dst, skip):
    """The fixture's files (tokenizer, templates, processor settings) except those in `skip`."""
    for f in os.listdir(src):
        if f not in skip and os.path.isfile(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), dst)


def make_llava7b(out_dir):
    """Random LLaVA-1.5-7B-shaped checkpoint in bf16 with the tiny fixture's tokenizer files."""
    tok = json.load(open(os.path.join(TINY, "config.json")))
    vision = transformers.CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=tok["pad_token_id"])
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok["image_token_index"],
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu")
    model = random_bf16(transformers.LlavaForConditionalGeneration, config)
    model.save_pretrained(out_dir, safe_serialization=True)
    copy_tokenizer_files(TINY, out_dir, ("config.json", "model.safetensors", "generation_config.json"))
    return model


def qwen2vl_2b_config():
    """The tiny Qwen2-VL fixture's config at Qwen2-VL-2B's real shape (bench/cpu.py too)."""
    cfg = transformers.AutoConfig.from_pretrained(QWEN_TINY)
    t, v = cfg.text_config, cfg.vision_config
    t.hidden_size, t.intermediate_size, t.num_hidden_layers = 1536, 8960, 28
    t.num_attention_heads, t.num_key_value_heads, t.vocab_size = 12, 2, 151936
    t.max_position_embeddings = 32768
    t.layer_types = ["full_attention"] * 28
    t.rope_parameters = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
    v.depth, v.embed_dim, v.num_heads, v.hidden_size, v.mlp_ratio = 32, 1280, 16, 1536, 4
    cfg.tie_word_embeddings = True
    return cfg


def qwen2vl_2b_files(out_dir):
    """Beside a saved Qwen2-VL-2B-shape model: the tiny fixture's tokenizer files, and its
    processor settings with the real model's pixel bounds (the tiny fixture's are tiny)."""
    copy_tokenizer_files(QWEN_TINY, out_dir, ("config.json", "model.safetensors",
                                              "generation_config.json", "processor_config.json"))
    proc = json.load(open(os.path.join(QWEN_TINY, "processor_config.json")))
    for key in ("image_processor", "video_processor"):
        if key in proc:
            proc[key]["size"] = {"shortest_edge": 3136, "longest_edge": 12845056}
    json.dump(proc, open(os.path.join(out_dir, "processor_config.json"), "w"), indent=2)


def make_qwen2vl_2b(out_dir):
    """Random Qwen2-VL-2B-shaped checkpoint (bf16) with the tiny fixture's tokenizer files."""
    model = random_bf16(transformers.Qwen2VLForConditionalGeneration, qwen2vl_2b_config())
    model.save_pretrained(out_dir, safe_serialization=True)
    qwen2vl_2b_files(out_dir)
    return model


def generate_seconds(model, inputs, n):
    """Wall seconds of one greedy HF `generate` of exactly `n` new tokens."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def hf_timings(model, inputs, inputs16, new_tokens):
    """TTFT (best of 3 after a warm-up), batch-1 decode tok/s after the first token, and
    output tok/s of the 16 prompts of `inputs16` in one padded batch."""
    model.eval()
    generate_seconds(model, inputs, 2)  # warm-up
    ttft = min(generate_seconds(model, inputs, 1) for _ in range(3))
    total = generate_seconds(model, inputs, new_tokens)
    batch_tps = 16 * new_tokens / generate_seconds(model, inputs16, new_tokens)
    return ttft, (new_tokens - 1) / (total - ttft), batch_tps


def hf_speed(model, model_dir, image, new_tokens):
    """HF generate on the same card: TTFT, batch-1 decode tok/s, prompt length, and output
    tok/s over 16 identical prompts in one padded batch (PIL image processor, as mmllm)."""
    processor = transformers.AutoProcessor.from_pretrained(model_dir, use_fast=False)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)

    def prompts(n):
        processor.tokenizer.padding_side = "left"
        b = processor(images=[Image.open(image)] * n, text=[text] * n, padding=True,
                      return_tensors="pt").to("cuda")
        b["pixel_values"] = b["pixel_values"].to(torch.bfloat16)
        return b

    inputs = prompts(1)
    ttft, tps, batch_tps = hf_timings(model, inputs, prompts(16), new_tokens)
    return ttft, tps, inputs["input_ids"].shape[1], batch_tps


def run_batch(binary, model, image, new_tokens, jobs, max_seqs):
    """`mmllm batch` of `jobs` jobs (model loaded once), each with `image`, or with
    `image[i]` when `image` is a list: all result lines and the wall time."""
    d = tempfile.mkdtemp(prefix="batch-")
    manifest = os.path.join(d, "jobs.yaml")
    with open(manifest, "w") as f:
        f.write(f"defaults:\n  model: {model}\n  max_tokens: {new_tokens}\n  ignore_eos: true\njobs:\n")
        for i in range(jobs):
            img = image[i % len(image)] if isinstance(image, list) else image
            f.write(f"  - id: j{i}\n    prompt: {json.dumps(PROMPT)}\n    images: [{json.dumps(img)}]\n")
    cmd = [binary, "batch", manifest, "--device", "cuda", "--dtype", "bf16", "--max-seqs", str(max_seqs)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"mmllm batch failed ({out.returncode})")
    lines = [json.loads(l) for l in out.stdout.strip().splitlines()]
    shutil.rmtree(d, ignore_errors=True)
    kind = "distinct images" if isinstance(image, list) else "identical jobs"
    return lines, wall, " ".join(cmd) + f"  (manifest: {jobs} {kind}, model {model})"


def batch_tps(binary, model, image, new_tokens, jobs):
    """Output tok/s of `jobs` jobs at --max-seqs `jobs`, wall time minus model load."""
    lines, wall, cmd = run_batch(binary, model, image, new_tokens, jobs=jobs, max_seqs=jobs)
    load_s = lines[0]["timing"]["load_ms"] / 1e3
    return sum(l["usage"]["completion_tokens"] for l in lines) / max(wall - load_s, 1e-9), cmd


def large_jpegs(n, out_dir):
    """`n` distinct 12-megapixel (4000x3000) JPEGs made from the test photo: each a different
    crop, flip and tint, saved at quality 92, so no two decode or preprocess alike."""
    src = Image.open(PHOTO).convert("RGB")
    paths = []
    for i in range(n):
        w, h = src.size
        crop = src.crop((i % 7, i % 5, w - (i % 3), h - (i % 4)))
        img = crop.resize((4000, 3000), Image.BICUBIC)
        if i % 2:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        tint = Image.new("RGB", img.size, ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256))
        img = Image.blend(img, tint, 0.1 + 0.02 * (i % 5))
        path = os.path.join(out_dir, f"large_{i:02d}.jpg")
        img.save(path, quality=92)
        paths.append(path)
    return paths


def copy_bandwidth():
    """Device-to-device copy throughput (bytes read + written per second) of 1 GiB."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    bw = 2 * x.numel() * 10 / (time.perf_counter() - t0)
    del x, y
    torch.cuda.empty_cache()
    return bw


def decode_bytes(model, text_config):
    """Weight bytes one decode step must read: the language model's layers and final norm,
    plus the output projection (vocab x hidden, bf16) — not the vision tower, nor the input
    embedding table, of which a step reads one row."""
    layers = 0
    for n, p in model.named_parameters():
        lm = "language_model." in n or n.startswith("model.layers.") or n == "model.norm.weight"
        if lm and "embed_tokens" not in n and "lm_head" not in n:
            layers += p.numel() * p.element_size()
    return layers + text_config.vocab_size * text_config.hidden_size * 2


PROFILE_VARIANTS = [
    ("fused kernels + CUDA graph (default)", {}),
    ("fused kernels, no graph", {"MMLLM_CUDA_GRAPH": "0"}),
    ("fused kernels, cuBLAS matmuls, no graph", {"MMLLM_CUDA_GRAPH": "0", "MMLLM_DECODE_GEMV": "0"}),
    ("unfused (candle ops)", {"MMLLM_UNFUSED_DECODE": "1"}),
    ("fused kernels + CUDA graph, GEMV 2 columns a warp", {"MMLLM_GEMV_COLS": "2"}),
]


def profile(binary, d, context, steps, image=None, env_extra=None):
    """`mmllm profile-decode`: one JSON line (step wall, host enqueue and GPU busy time)."""
    cmd = [binary, "profile-decode", "--model", d, "--device", "cuda", "--dtype", "bf16",
           "--context", str(context), "--steps", str(steps)]
    if image:
        cmd += ["--image", image]
    env = dict(os.environ, **(env_extra or {}))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"mmllm profile-decode failed ({out.returncode})")
    sys.stderr.write(out.stderr)
    prefix = " ".join(f"{k}={v}" for k, v in (env_extra or {}).items())
    return json.loads(out.stdout.strip().splitlines()[-1]), (prefix + " " if prefix else "") + " ".join(cmd)


VARIANTS = len(PROFILE_VARIANTS)

# Issue #16's goals per workload (H200, bf16).
GOALS = {
    "LLaVA-1.5-7B shape": {"ttft": "<= 20", "decode": ">= 270", "batch16": ">= 2500",
                           "oneshot": "<= 1200"},
    "Qwen2-VL-2B shape": {"ttft": "<= 12 (vision tower <= 6)", "decode": ">= 950",
                          "batch16": ">= 5000"},
}


def profile_rows(binary, d, context, steps, limit_tps, image=None):
    """Prints where a decode step's time goes for each decode path; returns the default's."""
    print(f"\n| decode step at context {context} (`mmllm profile-decode`) | step ms | tok/s | "
          f"% of bandwidth limit | host enqueue ms | GPU busy ms |")
    print("|---|---|---|---|---|---|")
    results = []
    for i, (name, env_extra) in enumerate(PROFILE_VARIANTS[:VARIANTS]):
        p, cmd = profile(binary, d, context, steps, image=image if i == 0 else None,
                         env_extra=env_extra)
        results.append((p, cmd))
        print(f"| {name} | {p['step_ms']:.2f} | {p['tokens_per_s']:.1f} | "
              f"{100 * p['tokens_per_s'] / limit_tps:.0f}% | {p['host_enqueue_ms']:.2f} | "
              f"{p['gpu_busy_ms']:.2f} |")
    fused = results[0][0]

    def part(key, what):
        return (f"{what} {fused[key + '_ms']:.1f} ms (host enqueue {fused[key + '_host_ms']:.1f}, "
                f"GPU {fused[key + '_gpu_ms']:.1f})")

    parts = part("prefill", f"prefill of {context} text tokens")
    if fused.get("encode_image_ms") is not None:
        parts = part("encode_image", "image encode (CPU preprocessing + vision tower)") + "; " + parts
    print(f"  TTFT parts (synchronised, best of 3): {parts}")
    for _, cmd in results:
        print(f"  command: {cmd}")
    return fused


def speed_rows(name, binary, d, model, hf_fn, image, new_tokens, bandwidth, summary):
    text_config = model.config.get_text_config()
    lm_bytes = decode_bytes(model, text_config)
    limit_tps = bandwidth / lm_bytes
    hf_ttft, hf_tps, n_prompt, hf_batch_tps = hf_fn(model, d, image or PHOTO, new_tokens)
    del model
    torch.cuda.empty_cache()
    image = image or PHOTO
    extra = ["--device", "cuda", "--dtype", "bf16", "--max-tokens", str(new_tokens), "--ignore-eos"]
    run_mmllm(binary, d, *extra, image=image)  # warm-up (PTX JIT, page cache)
    cold, wall, cmd = run_mmllm(binary, d, *extra, image=image)
    lines, _, warm_cmd = run_batch(binary, d, image, new_tokens, jobs=3, max_seqs=1)
    warm = lines[-1]
    out_tps, batch_cmd = batch_tps(binary, d, image, new_tokens, 16)
    peak = {n: batch_tps(binary, d, image, new_tokens, n)[0] for n in (32, 64)}
    big_dir = tempfile.mkdtemp(prefix="large-")
    big_tps, big_cmd = batch_tps(binary, d, large_jpegs(16, big_dir), new_tokens, 16)
    shutil.rmtree(big_dir, ignore_errors=True)
    weight_bytes = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)
                       if f.endswith(".safetensors"))
    print(f"\n| {name}, bf16, {n_prompt} prompt tokens (HF count) | TTFT ms | decode tok/s (batch 1) | output tok/s, 16 prompts |")
    print("|---|---|---|---|")
    print(f"| HF transformers {transformers.__version__} generate (warm process) | {hf_ttft * 1e3:.1f} | {hf_tps:.1f} | {hf_batch_tps:.0f} |")
    print(f"| mmllm image, new process per prompt | {cold['timing']['ttft_ms']:.1f} | {cold['timing']['tokens_per_s']:.1f} | |")
    print(f"| mmllm batch, 3rd identical job (warm, --max-seqs 1) | {warm['timing']['ttft_ms']:.1f} | {warm['timing']['tokens_per_s']:.1f} | |")
    print(f"| mmllm batch, 16 jobs, --max-seqs 16 (wall minus load) | | | {out_tps:.0f} |")
    print(f"| mmllm batch, 32 / 64 jobs (--max-seqs 32 / 64) | | | {peak[32]:.0f} / {peak[64]:.0f} |")
    print(f"| mmllm batch, 16 distinct 12-MP JPEGs, --max-seqs 16 | | | {big_tps:.0f} |")
    print(f"  mmllm prompt tokens {cold['usage']['prompt_tokens']}; checkpoint {weight_bytes / 1e9:.2f} GB; "
          f"bytes read per decode step {lm_bytes / 1e9:.2f} GB -> limit {limit_tps:.0f} tok/s at "
          f"{bandwidth / 1e12:.2f} TB/s; load {cold['timing']['load_ms']:.0f} ms")
    print(f"  commands: {cmd}\n            {warm_cmd}\n            {batch_cmd}\n            {big_cmd}")
    fused = profile_rows(binary, d, cold["usage"]["prompt_tokens"], new_tokens, limit_tps, image=image)
    short = name.split(",")[0]
    goals = GOALS.get(short, {})
    base = {}
    if BASELINE:
        b_lines, _, _ = run_batch(BASELINE, d, image, new_tokens, jobs=3, max_seqs=1)
        base = {"ttft": b_lines[-1]["timing"]["ttft_ms"],
                "decode": b_lines[-1]["timing"]["tokens_per_s"],
                "batch16": batch_tps(BASELINE, d, image, new_tokens, 16)[0],
                "load": b_lines[0]["timing"]["load_ms"]}
        b_prof, _ = profile(BASELINE, d, cold["usage"]["prompt_tokens"], new_tokens, image=image)
        base["parts"] = [b_prof.get("encode_image_ms"), b_prof.get("prefill_ms")]
        print(f"  baseline {BASELINE}: TTFT {base['ttft']:.1f} ms, decode {base['decode']:.1f} "
              f"tok/s, 16 prompts {base['batch16']:.0f} tok/s, encode/prefill {base['parts']}")
    record(f"{short} TTFT (warm batch job, incl. preprocessing)", "ms", hf_ttft * 1e3,
           warm["timing"]["ttft_ms"], goal=goals.get("ttft"), baseline=base.get("ttft"))
    record(f"{short} TTFT parts: image encode / prefill (synchronised)", "ms", None,
           [fused.get("encode_image_ms"), fused.get("prefill_ms")],
           note=f"vision tower GPU {fused.get('encode_image_gpu_ms')} ms, prefill GPU "
                f"{fused.get('prefill_gpu_ms')} ms", baseline=base.get("parts"))
    record(f"{short} decode, batch 1", "tok/s", hf_tps, warm["timing"]["tokens_per_s"],
           limit=limit_tps, goal=goals.get("decode"),
           note=f"profile-decode {fused['tokens_per_s']:.1f} tok/s", baseline=base.get("decode"))
    record(f"{short} output, 16 prompts", "tok/s", hf_batch_tps, out_tps, goal=goals.get("batch16"),
           baseline=base.get("batch16"))
    record(f"{short} output, peak of 32 / 64 prompts", "tok/s", None, max(peak.values()),
           note=f"32: {peak[32]:.0f}, 64: {peak[64]:.0f}")
    record(f"{short} output, 16 distinct 12-MP JPEGs", "tok/s", None, big_tps,
           goal=f">= {0.9 * out_tps:.0f} (90% of the 16-prompt row)",
           note="Qwen2-VL keeps ~15k visual tokens of a 12-MP image (max_pixels 12845056)"
                if "Qwen2-VL" in short else None)
    record(f"{short} one-shot CLI, new process: load + TTFT", "ms", None,
           cold["timing"]["load_ms"] + cold["timing"]["ttft_ms"], goal=goals.get("oneshot"),
           note=f"load {cold['timing']['load_ms']:.0f} ms, TTFT {cold['timing']['ttft_ms']:.1f} ms"
                + (f"; baseline column: the baseline's load in `batch`, ms" if base else ""),
           baseline=base.get("load"))
    summary.append((name, hf_ttft * 1e3, warm["timing"]["ttft_ms"], hf_tps,
                    warm["timing"]["tokens_per_s"], fused["tokens_per_s"], limit_tps))


def make_llama1b(out_dir):
    """Random Llama-3.2-1B-shaped LlamaForCausalLM (bf16) for HF, and the same weights as the
    text model of an Ultravox checkpoint (the tiny fixture's audio tower and projector, the
    projector's output widened to 2048) for mmllm, which has no text-only family."""
    tiny = json.load(open(os.path.join(ULTRAVOX_TINY, "config.json")))
    text = transformers.LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
        rope_parameters=tiny["text_config"]["rope_parameters"])
    model = random_bf16(transformers.LlamaForCausalLM, text)
    from safetensors.torch import load_file, save_file
    tensors = {k: v.to(torch.bfloat16) for k, v in
               load_file(os.path.join(ULTRAVOX_TINY, "model.safetensors")).items()
               if not k.startswith("language_model.")}
    tensors["multi_modal_projector.linear_2.weight"] = (
        torch.randn(2048, tensors["multi_modal_projector.linear_2.weight"].shape[1]) * 0.02
    ).to(torch.bfloat16)
    for k, v in model.state_dict().items():
        if k != "lm_head.weight":  # tied
            tensors["language_model." + k] = v.detach().cpu().contiguous()
    save_file(tensors, os.path.join(out_dir, "model.safetensors"))
    cfg = dict(tiny)
    cfg["text_config"] = {**tiny["text_config"], **{k: v for k, v in text.to_dict().items()
                                                   if k in tiny["text_config"]}}
    cfg["text_config"]["vocab_size"] = 128256
    cfg["vocab_size"] = 128256
    json.dump(cfg, open(os.path.join(out_dir, "config.json"), "w"), indent=2)
    copy_tokenizer_files(ULTRAVOX_TINY, out_dir, ("config.json", "model.safetensors"))
    return model


def llama_rows(binary, d, model, new_tokens, bandwidth, summary):
    """Llama-3.2-1B: HF generate on 128 random prompt ids vs mmllm's decode of the same
    weights (profile-decode over a 128-token context)."""
    context = 128
    lm_bytes = decode_bytes(model, model.config)
    limit_tps = bandwidth / lm_bytes
    torch.manual_seed(1)
    ids = torch.randint(10, 128000, (1, context), device="cuda")

    def prompts(n):
        return {"input_ids": ids.repeat(n, 1), "attention_mask": torch.ones_like(ids).repeat(n, 1)}

    ttft, hf_tps, hf_batch = hf_timings(model, prompts(1), prompts(16), new_tokens)
    del model
    torch.cuda.empty_cache()
    print(f"\n| Llama-3.2-1B shape, bf16, {context} prompt tokens | TTFT ms | decode tok/s (batch 1) | output tok/s, 16 prompts |")
    print("|---|---|---|---|")
    print(f"| HF transformers {transformers.__version__} generate (warm process) | {ttft * 1e3:.1f} | {hf_tps:.1f} | {hf_batch:.0f} |")
    print(f"  bytes read per decode step {lm_bytes / 1e9:.2f} GB -> limit {limit_tps:.0f} tok/s")
    fused = profile_rows(binary, d, context, new_tokens, limit_tps)
    record("Llama-3.2-1B decode, batch 1 (profile-decode)", "tok/s", hf_tps, fused["tokens_per_s"],
           limit=limit_tps, goal=">= 1200")
    record("Llama-3.2-1B prefill of 128 tokens (synchronised)", "ms", ttft * 1e3, fused["prefill_ms"])
    summary.append(("Llama-3.2-1B shape (mmllm: text model of an Ultravox checkpoint)", ttft * 1e3,
                    fused["prefill_ms"], hf_tps, None, fused["tokens_per_s"], limit_tps))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mmllm", required=True)
    ap.add_argument("--skip-7b", action="store_true")
    ap.add_argument("--skip-qwen", action="store_true")
    ap.add_argument("--skip-1b", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--baseline", default=None,
                    help="an older mmllm binary: its TTFT, decode and 16-prompt rows beside ours")
    ap.add_argument("--commit", default=None, help="the binary's commit, for the JSON rows")
    ap.add_argument("--json", default=None, help="JSON output path "
                    "(default bench/results/<date>-<card>.json)")
    ap.add_argument("--variants", type=int, default=len(PROFILE_VARIANTS),
                    help="profile only the first N decode paths (the default path first)")
    args = ap.parse_args()
    global VARIANTS, BASELINE
    VARIANTS = max(1, args.variants)
    BASELINE = args.baseline
    bandwidth = copy_bandwidth()
    print(f"card: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; "
          f"transformers {transformers.__version__}; copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    rows, ok = tiny_parity(args.mmllm)
    print("\n| tiny fixture on GPU | greedy ids equal HF (CPU f32) | max top-5 logprob error |")
    print("|---|---|---|")
    for case, eq, err, _ in rows:
        print(f"| {case} | {eq} | {err:.2e} |")
    for _, _, _, cmd in rows:
        print(f"  command: {cmd}")
    summary = []
    if not args.skip_7b:
        d = tempfile.mkdtemp(prefix="llava7b-")
        t0 = time.perf_counter()
        model = make_llava7b(d)
        print(f"\nbuilt random LLaVA-1.5-7B-shape checkpoint in {time.perf_counter() - t0:.0f} s")
        speed_rows("LLaVA-1.5-7B shape, one 336-px crop + prompt", args.mmllm, d, model,
                   hf_speed, None, args.new_tokens, bandwidth, summary)
        shutil.rmtree(d, ignore_errors=True)
    if not args.skip_qwen:
        d = tempfile.mkdtemp(prefix="qwen2vl2b-")
        image = os.path.join(d, "photo_448.png")
        Image.open(PHOTO).convert("RGB").resize((448, 448), Image.BICUBIC).save(image)
        t0 = time.perf_counter()
        model = make_qwen2vl_2b(d)
        print(f"\nbuilt random Qwen2-VL-2B-shape checkpoint in {time.perf_counter() - t0:.0f} s")
        speed_rows("Qwen2-VL-2B shape, one 448x448 image", args.mmllm, d, model,
                   hf_speed, image, args.new_tokens, bandwidth, summary)
        shutil.rmtree(d, ignore_errors=True)
    if not args.skip_1b:
        d = tempfile.mkdtemp(prefix="llama1b-")
        t0 = time.perf_counter()
        model = make_llama1b(d)
        print(f"\nbuilt random Llama-3.2-1B-shape checkpoint in {time.perf_counter() - t0:.0f} s")
        llama_rows(args.mmllm, d, model, args.new_tokens, bandwidth, summary)
        shutil.rmtree(d, ignore_errors=True)
    print("\n## Summary (bf16, batch 1; mmllm TTFT: warm batch job incl. CPU preprocessing, "
          "or for Llama the synchronised prefill)")
    print("| workload | HF TTFT ms | mmllm TTFT ms | HF decode tok/s | mmllm decode tok/s (generation) "
          "| mmllm decode tok/s (profile) | bandwidth limit tok/s |")
    print("|---|---|---|---|---|---|---|")
    for name, hf_ttft, mm_ttft, hf_tps, mm_tps, prof_tps, limit in summary:
        mm = f"{mm_tps:.1f}" if mm_tps is not None else ""
        print(f"| {name} | {hf_ttft:.1f} | {mm_ttft:.1f} | {hf_tps:.1f} | {mm} | {prof_tps:.1f} | {limit:.0f} |")
    write_json(args, bandwidth)
    if not ok:
        raise SystemExit("parity check failed on the GPU (f32)")


def write_json(args, bandwidth):
    """Every recorded row, with the card and commit, as JSON; and the rows as markdown."""
    card = torch.cuda.get_device_name(0)
    commit = args.commit
    if commit is None:
        try:
            commit = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                                    text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    path = args.json or os.path.join(
        REPO, "bench/results",
        f"{datetime.date.today().isoformat()}-{card.replace('NVIDIA ', '').replace(' ', '-')}.json")
    rows = [dict(r, card=card, commit=commit, hf_version=transformers.__version__,
                 copy_bandwidth_tb_s=round(bandwidth / 1e12, 3)) for r in RESULTS]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"\n## All rows ({card}, commit {commit}; JSON: {path})")
    print("| workload | unit | HF | mmllm | mmllm baseline | limit | goal | note |")
    print("|---|---|---|---|---|---|---|---|")

    def fmt(v):
        if v is None:
            return ""
        if isinstance(v, list):
            return " / ".join(fmt(x) for x in v)
        return f"{v:.1f}" if isinstance(v, float) else str(v)
    for r in RESULTS:
        print(f"| {r['workload']} | {r['unit']} | {fmt(r['hf'])} | {fmt(r['mmllm'])} | "
              f"{fmt(r['baseline'])} | "
              f"{fmt(r['limit'])} | {r['goal'] or ''} | {r['note'] or ''} |")


if __name__ == "__main__":
    main()
