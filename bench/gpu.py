#!/usr/bin/env python3
"""mmllm on one GPU, side by side with Hugging Face transformers on the same card:
parity of the tiny LLaVA fixture (f32 and bf16), then speed at the real shapes of
LLaVA-1.5-7B and Qwen2-VL-2B (random weights, bf16, batch 1): TTFT (vision encoder and
prefill) and decode tok/s over a fixed number of new tokens (EOS ignored).

Runs on a machine with an NVIDIA GPU, PyTorch and transformers, no Rust toolchain and no
network, given an `mmllm` binary built with `--features cuda`:

    python3 bench/gpu.py --mmllm ./mmllm [--skip-7b] [--skip-qwen]

Prints a table on stdout and exits non-zero if a parity check fails.
"""

import argparse
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
PHOTO = os.path.join(REPO, "tests/data/llava_photo_1.jpg")
PROMPT = "What is in this image?"


def run_mmllm(binary, model, *extra, image=PHOTO):
    cmd = [binary, "image", "--model", model, "--output", "jsonl", *extra, image, PROMPT]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"mmllm failed ({out.returncode}): {' '.join(cmd)}")
    return json.loads(out.stdout.strip().splitlines()[-1]), wall, " ".join(cmd)


def tiny_parity(binary):
    """Greedy ids and top-5 logprobs of the tiny fixture on the GPU vs HF's CPU f32 reference."""
    expected = json.load(open(os.path.join(TINY, "expected/photo_1.json")))
    rows = []
    ok = True
    for dtype in ["f32", "bf16"]:
        res, _, cmd = run_mmllm(binary, TINY, "--device", "cuda", "--dtype", dtype,
                                "--max-tokens", str(len(expected["greedy_ids"])),
                                "--ignore-eos", "--logprobs", "5")
        ids_equal = res["token_ids"] == expected["greedy_ids"]
        # Compare the top-5 logprobs of steps whose tokens agree so far.
        max_err = 0.0
        for step, (got, want) in enumerate(zip(res["logprobs"], expected["step_top"])):
            if res["token_ids"][:step + 1] != expected["greedy_ids"][:step + 1]:
                break
            for t, (wid, wlp) in zip(got["top"], zip(want["ids"], want["logprobs"])):
                if t["token_id"] == wid:
                    max_err = max(max_err, abs(t["logprob"] - wlp))
        rows.append((dtype, ids_equal, max_err, cmd))
        if dtype == "f32" and (not ids_equal or max_err > 1e-3):
            ok = False
    return rows, ok


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
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = transformers.LlavaForConditionalGeneration(config)
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    for f in os.listdir(TINY):
        if f not in ("config.json", "model.safetensors", "generation_config.json") and \
                os.path.isfile(os.path.join(TINY, f)):
            shutil.copy(os.path.join(TINY, f), out_dir)
    return model


def make_qwen2vl_2b(out_dir):
    """Random Qwen2-VL-2B-shaped checkpoint (bf16) with the tiny fixture's tokenizer files."""
    cfg = transformers.AutoConfig.from_pretrained(QWEN_TINY)
    t, v = cfg.text_config, cfg.vision_config
    t.hidden_size, t.intermediate_size, t.num_hidden_layers = 1536, 8960, 28
    t.num_attention_heads, t.num_key_value_heads, t.vocab_size = 12, 2, 151936
    t.max_position_embeddings = 32768
    t.layer_types = ["full_attention"] * 28
    t.rope_parameters = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
    v.depth, v.embed_dim, v.num_heads, v.hidden_size, v.mlp_ratio = 32, 1280, 16, 1536, 4
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = transformers.Qwen2VLForConditionalGeneration(cfg)
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    for f in os.listdir(QWEN_TINY):
        if f not in ("config.json", "model.safetensors", "generation_config.json", "processor_config.json") \
                and os.path.isfile(os.path.join(QWEN_TINY, f)):
            shutil.copy(os.path.join(QWEN_TINY, f), out_dir)
    # The real model's pixel bounds (the tiny fixture's are tiny).
    proc = json.load(open(os.path.join(QWEN_TINY, "processor_config.json")))
    for key in ("image_processor", "video_processor"):
        if key in proc:
            proc[key]["size"] = {"shortest_edge": 3136, "longest_edge": 12845056}
    json.dump(proc, open(os.path.join(out_dir, "processor_config.json"), "w"), indent=2)
    return model


def hf_speed(model, model_dir, image, new_tokens):
    """HF generate on the same card: TTFT, batch-1 decode tok/s, prompt length, and output
    tok/s over 16 identical prompts in one padded batch (PIL image processor, as mmllm)."""
    processor = transformers.AutoProcessor.from_pretrained(model_dir, use_fast=False)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    model.eval()

    def prompts(n):
        processor.tokenizer.padding_side = "left"
        b = processor(images=[Image.open(image)] * n, text=[text] * n, padding=True,
                      return_tensors="pt").to("cuda")
        b["pixel_values"] = b["pixel_values"].to(torch.bfloat16)
        return b

    inputs = prompts(1)

    def timed(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(2)  # warm-up
    ttft = min(timed(1) for _ in range(3))
    total = timed(new_tokens)
    batch_tps = hf_concurrent(model, prompts(16), 16, new_tokens)
    return ttft, (new_tokens - 1) / (total - ttft), inputs["input_ids"].shape[1], batch_tps


def run_batch(binary, model, image, new_tokens, jobs, max_seqs):
    """`mmllm batch` of identical jobs (model loaded once): all result lines and the wall time."""
    d = tempfile.mkdtemp(prefix="batch-")
    manifest = os.path.join(d, "jobs.yaml")
    with open(manifest, "w") as f:
        f.write(f"defaults:\n  model: {model}\n  max_tokens: {new_tokens}\n  ignore_eos: true\njobs:\n")
        for i in range(jobs):
            f.write(f"  - id: j{i}\n    prompt: {json.dumps(PROMPT)}\n    images: [{json.dumps(image)}]\n")
    cmd = [binary, "batch", manifest, "--device", "cuda", "--dtype", "bf16", "--max-seqs", str(max_seqs)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"mmllm batch failed ({out.returncode})")
    lines = [json.loads(l) for l in out.stdout.strip().splitlines()]
    shutil.rmtree(d, ignore_errors=True)
    return lines, wall, " ".join(cmd) + f"  (manifest: {jobs} identical jobs, model {model})"


def hf_concurrent(model, inputs, n, new_tokens):
    """HF generate over `inputs`, n prompts in one padded batch: output tokens per second."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    torch.cuda.synchronize()
    return n * new_tokens / (time.perf_counter() - t0)


def speed_rows(name, binary, d, model, hf_fn, image, new_tokens):
    hf_ttft, hf_tps, n_prompt, hf_batch_tps = hf_fn(model, d, image or PHOTO, new_tokens)
    del model
    torch.cuda.empty_cache()
    image = image or PHOTO
    extra = ["--device", "cuda", "--dtype", "bf16", "--max-tokens", str(new_tokens), "--ignore-eos"]
    run_mmllm(binary, d, *extra, image=image)  # warm-up (PTX JIT, page cache)
    cold, wall, cmd = run_mmllm(binary, d, *extra, image=image)
    lines, _, warm_cmd = run_batch(binary, d, image, new_tokens, jobs=3, max_seqs=1)
    warm = lines[-1]
    lines16, wall16, batch_cmd = run_batch(binary, d, image, new_tokens, jobs=16, max_seqs=16)
    load_s = lines16[0]["timing"]["load_ms"] / 1e3
    out_tps = sum(l["usage"]["completion_tokens"] for l in lines16) / max(wall16 - load_s, 1e-9)
    weight_bytes = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)
                       if f.endswith(".safetensors"))
    print(f"\n| {name}, bf16, {n_prompt} prompt tokens (HF count) | TTFT ms | decode tok/s (batch 1) | output tok/s, 16 prompts |")
    print("|---|---|---|---|")
    print(f"| HF transformers {transformers.__version__} generate (warm process) | {hf_ttft * 1e3:.1f} | {hf_tps:.1f} | {hf_batch_tps:.0f} |")
    print(f"| mmllm image, new process per prompt | {cold['timing']['ttft_ms']:.1f} | {cold['timing']['tokens_per_s']:.1f} | |")
    print(f"| mmllm batch, 3rd identical job (warm, --max-seqs 1) | {warm['timing']['ttft_ms']:.1f} | {warm['timing']['tokens_per_s']:.1f} | |")
    print(f"| mmllm batch, 16 jobs, --max-seqs 16 (wall minus load) | | | {out_tps:.0f} |")
    print(f"  mmllm prompt tokens {cold['usage']['prompt_tokens']}; weights {weight_bytes / 1e9:.2f} GB; "
          f"load {cold['timing']['load_ms']:.0f} ms; process wall {wall:.1f} s; 16-job wall {wall16:.1f} s")
    print(f"  commands: {cmd}\n            {warm_cmd}\n            {batch_cmd}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mmllm", required=True)
    ap.add_argument("--skip-7b", action="store_true")
    ap.add_argument("--skip-qwen", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    print(f"card: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; "
          f"transformers {transformers.__version__}")
    rows, ok = tiny_parity(args.mmllm)
    print("\n| tiny LLaVA on GPU | greedy ids equal HF (CPU f32) | max top-5 logprob error |")
    print("|---|---|---|")
    for dtype, eq, err, _ in rows:
        print(f"| {dtype} | {eq} | {err:.2e} |")
    for _, _, _, cmd in rows:
        print(f"  command: {cmd}")
    if not args.skip_7b:
        d = tempfile.mkdtemp(prefix="llava7b-")
        t0 = time.perf_counter()
        model = make_llava7b(d)
        print(f"\nbuilt random LLaVA-1.5-7B-shape checkpoint in {time.perf_counter() - t0:.0f} s")
        speed_rows("LLaVA-1.5-7B shape, one 336-px crop + prompt", args.mmllm, d, model,
                   hf_speed, None, args.new_tokens)
        shutil.rmtree(d, ignore_errors=True)
    if not args.skip_qwen:
        d = tempfile.mkdtemp(prefix="qwen2vl2b-")
        image = os.path.join(d, "photo_448.png")
        Image.open(PHOTO).convert("RGB").resize((448, 448), Image.BICUBIC).save(image)
        t0 = time.perf_counter()
        model = make_qwen2vl_2b(d)
        print(f"\nbuilt random Qwen2-VL-2B-shape checkpoint in {time.perf_counter() - t0:.0f} s")
        speed_rows("Qwen2-VL-2B shape, one 448x448 image", args.mmllm, d, model,
                   hf_speed, image, args.new_tokens)
        shutil.rmtree(d, ignore_errors=True)
    if not ok:
        raise SystemExit("parity check failed on the GPU (f32)")


if __name__ == "__main__":
    main()
