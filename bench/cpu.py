#!/usr/bin/env python3
"""mmllm on the CPU, side by side with Hugging Face transformers on the same machine (issue #16):

  1. a 12-megapixel JPEG: decode + CLIP preprocessing (LLaVA-1.5's processor settings),
     Pillow + transformers' PIL `CLIPImageProcessor` (use_fast=False) vs `mmllm
     profile-preprocess`; the pixel values are compared for equality;
  2. the same JPEG: decode + Qwen2-VL preprocessing (transformers' default
     `Qwen2VLImageProcessor` settings, PIL backend), pixels compared;
  3. Whisper tiny.en (real weights, `scripts/fetch_whisper_tiny_en.sh`), one 5-second
     utterance end to end: HF feature extraction + `generate` in a warm process vs `mmllm
     audio` (its generation time, load excluded; the process wall time is printed too);
  4. Qwen2-VL-2B at its real shape, f32, one 448x448 image: load s, time to first token s,
     decode tok/s. The random-weight checkpoint (bf16, as the real one) is built once with
     transformers' classes into `--cache`; HF and mmllm never hold it at the same time.

Runs in the reference venv (torch, transformers, Pillow, numpy), given a release build:

    cargo build --release
    /root/.cache/mmllm-ref-venv/bin/python bench/cpu.py --mmllm target/release/mmllm [--skip-2b]

Times are the best of `--runs` runs after a warm-up (the 2B row: see `qwen2b_rows`). Prints
a markdown table and writes bench/results/<date>-cpu-<cpu name>.json (one object per row:
workload, hf, mmllm, unit, goal, cpu, cores, commit). Exits non-zero if pixels differ.
"""

import argparse
import datetime
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import wave

import numpy as np
import torch
import transformers
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu  # noqa: E402  (the Qwen2-VL-2B-shape checkpoint's config and files)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAVA_PROCESSOR = os.path.join(REPO, "tests/fixtures/image/llava15_preprocessor_config.json")
SOURCE_PHOTO = os.path.join(REPO, "tests/data/minicpmv_china_1330x1240.jpg")
PHOTO = os.path.join(REPO, "tests/data/llava_photo_1.jpg")
SPEECH = os.path.join(REPO, "tests/data/speech_16k.wav")
PROMPT = "What is in this image?"


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def commit():
    try:
        out = subprocess.run(["git", "-C", REPO, "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def best_of(fn, runs):
    """Best wall seconds of `runs` calls of `fn` after one untimed call; and fn's last result."""
    result = fn()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def run(cmd, env=None):
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"failed ({out.returncode}): {' '.join(cmd)}")
    return out.stdout, wall


def make_12mp_jpeg(path):
    """A 4000x3000 JPEG (quality 90) made from a test photo: upscaled, with seeded noise so that
    it carries the fine detail (and the entropy-coded size, ~2 MB) of a camera image."""
    img = Image.open(SOURCE_PHOTO).convert("RGB").resize((4000, 3000), Image.BICUBIC)
    a = np.asarray(img).astype(np.int16)
    noise = np.random.default_rng(0).normal(0, 4, a.shape).round().astype(np.int16)
    Image.fromarray(np.clip(a + noise, 0, 255).astype(np.uint8)).save(path, quality=90)


def preprocessing_rows(binary, jpeg, runs, workdir):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = json.load(open(LLAVA_PROCESSOR))
    cfg = {k: v for k, v in cfg.items() if k not in ("image_processor_type", "processor_class")}
    cases = [
        ("12-MP JPEG decode + CLIP preprocessing (LLaVA-1.5 settings)", "clip",
         CLIPImageProcessorPil(**cfg), ["--config", LLAVA_PROCESSOR]),
        ("12-MP JPEG decode + Qwen2-VL preprocessing (transformers defaults)", "qwen2-vl",
         Qwen2VLImageProcessorPil(), []),
    ]
    rows, ok = [], True
    for workload, name, proc, extra in cases:
        def hf():
            im = Image.open(jpeg)
            im.load()
            return proc(images=im, return_tensors="np")["pixel_values"]

        hf_s, want = best_of(hf, runs)
        dump = os.path.join(workdir, f"{name}.npy")
        cmd = [binary, "profile-preprocess", "--processor", name, *extra, "--runs", str(runs),
               "--dump", dump, jpeg]
        out, _ = run(cmd)
        got_line = json.loads(out.strip().splitlines()[-1])
        got = np.load(dump)
        equal = got.shape == want.shape and np.array_equal(got, want)
        ok &= equal
        rows.append({
            "workload": workload, "hf": round(hf_s * 1e3, 1), "mmllm": round(got_line["total_ms"], 1),
            "unit": "ms", "goal": "mmllm <= hf / 3, pixels identical",
            "pixels_equal": bool(equal),
            "note": f"pixels equal: {equal}; mmllm decode {got_line['decode_ms']:.1f} ms + preprocess "
                    f"{got_line['preprocess_ms']:.1f} ms; shape {list(want.shape)}",
            "command": " ".join(cmd),
        })
    return rows, ok


def five_second_wav(path):
    """One 5.0-second utterance at 16 kHz: the test recording twice, cut to 5 s."""
    with wave.open(SPEECH) as w:
        rate, frames = w.getframerate(), w.readframes(w.getnframes())
        params = w.getparams()
    samples = (frames * 2)[: 5 * rate * params.sampwidth * params.nchannels]
    with wave.open(path, "wb") as w:
        w.setparams(params)
        w.writeframes(samples)
    return np.frombuffer(samples, dtype=np.int16).astype(np.float32) / 32768.0, rate


def whisper_row(binary, model_dir, runs, workdir):
    wav = os.path.join(workdir, "speech_5s.wav")
    audio, rate = five_second_wav(wav)
    processor = transformers.WhisperProcessor.from_pretrained(model_dir)
    model = transformers.WhisperForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32).eval()

    def hf():
        feats = processor(audio, sampling_rate=rate, return_tensors="pt").input_features
        with torch.no_grad():
            ids = model.generate(feats)
        return processor.batch_decode(ids, skip_special_tokens=True)[0]

    hf_s, hf_text = best_of(hf, runs)
    del model
    gc.collect()
    cmd = [binary, "audio", "--model", model_dir, "--device", "cpu", "--dtype", "f32",
           "--output", "jsonl", wav]
    best, line, wall = None, None, None
    for _ in range(runs):
        out, w = run(cmd)
        res = json.loads(out.strip().splitlines()[-1])
        if best is None or res["timing"]["total_ms"] < best:
            best, line, wall = res["timing"]["total_ms"], res, w
    same = line["text"].strip() == hf_text.strip()
    return {
        "workload": "Whisper tiny.en, one 5-second utterance, end to end", "hf": round(hf_s, 3),
        "mmllm": round(best / 1e3, 3), "unit": "s", "goal": "mmllm <= hf / 1.5 (<= 0.35 s)",
        "note": f"HF warm process (features + generate); mmllm generation time of one `mmllm audio` "
                f"(load {line['timing']['load_ms']:.0f} ms and process start excluded; wall "
                f"{wall:.2f} s); transcripts equal: {same}",
        "command": " ".join(cmd),
    }


def make_qwen2vl_2b(out_dir):
    """Random Qwen2-VL-2B-shaped checkpoint (bf16, seed 0) with the tiny fixture's tokenizer
    files and the real model's pixel bounds, as bench/gpu.py builds it, on the CPU."""
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = transformers.Qwen2VLForConditionalGeneration(gpu.qwen2vl_2b_config())
    torch.set_default_dtype(torch.float32)
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    del model
    gc.collect()
    gpu.qwen2vl_2b_files(out_dir)


def qwen2b_rows(binary, cache, new_tokens, workdir):
    """HF: load (from_pretrained in f32), TTFT (best of 2 `generate` of one token after nothing
    else ran), decode tok/s over `new_tokens`. mmllm: one `mmllm image` run's timing."""
    if not os.path.isfile(os.path.join(cache, "model.safetensors.index.json")) and \
            not os.path.isfile(os.path.join(cache, "model.safetensors")):
        os.makedirs(cache, exist_ok=True)
        t0 = time.perf_counter()
        make_qwen2vl_2b(cache)
        print(f"built random Qwen2-VL-2B-shape checkpoint in {time.perf_counter() - t0:.0f} s "
              f"at {cache}", file=sys.stderr)
    image = os.path.join(workdir, "photo_448.png")
    Image.open(PHOTO).convert("RGB").resize((448, 448), Image.BICUBIC).save(image)

    t0 = time.perf_counter()
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        cache, dtype=torch.float32).eval()
    hf_load = time.perf_counter() - t0
    processor = transformers.AutoProcessor.from_pretrained(cache, use_fast=False)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)

    def generate(n):
        t0 = time.perf_counter()
        inputs = processor(images=[Image.open(image)], text=[text], return_tensors="pt")
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t0

    hf_ttft = min(generate(1) for _ in range(2))
    hf_total = generate(new_tokens)
    hf_tps = (new_tokens - 1) / (hf_total - hf_ttft)
    del model
    gc.collect()

    cmd = [binary, "image", "--model", cache, "--device", "cpu", "--dtype", "f32", "--output",
           "jsonl", "--max-tokens", str(new_tokens), "--ignore-eos", image, "-p", PROMPT]
    out, wall = run(cmd)
    timing = json.loads(out.strip().splitlines()[-1])["timing"]
    base = {"note": "random weights at the real shape (bf16 checkpoint, run in f32), 448x448 image, "
                    f"{new_tokens} new tokens", "command": " ".join(cmd)}
    return [
        {**base, "workload": "Qwen2-VL-2B f32 CPU: load", "hf": round(hf_load, 2),
         "mmllm": round(timing["load_ms"] / 1e3, 2), "unit": "s", "goal": "mmllm <= 5 s"},
        {**base, "workload": "Qwen2-VL-2B f32 CPU: time to first token", "hf": round(hf_ttft, 2),
         "mmllm": round(timing["ttft_ms"] / 1e3, 2), "unit": "s", "goal": "mmllm <= hf (<= 14 s)"},
        {**base, "workload": "Qwen2-VL-2B f32 CPU: decode", "hf": round(hf_tps, 2),
         "mmllm": round(timing["tokens_per_s"], 2), "unit": "tok/s", "goal": "mmllm >= hf (>= 4)"},
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mmllm", required=True, help="an mmllm release binary")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per measurement")
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
    ap.add_argument("--whisper", default=os.environ.get(
        "MMLLM_WHISPER_TINY_EN", os.path.join(target, "whisper-tiny.en")),
        help="real Whisper tiny.en weights (scripts/fetch_whisper_tiny_en.sh)")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/mmllm-bench/qwen2vl-2b"),
                    help="directory of the random Qwen2-VL-2B-shape checkpoint (built if absent)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--skip-whisper", action="store_true")
    ap.add_argument("--skip-2b", action="store_true")
    ap.add_argument("--out-dir", default=os.path.join(REPO, "bench/results"))
    args = ap.parse_args()
    binary = os.path.abspath(args.mmllm)
    cpu, cores, sha = cpu_name(), len(os.sched_getaffinity(0)), commit()
    print(f"cpu: {cpu}; {cores} cores; torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"transformers {transformers.__version__}; commit {sha}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmllm-cpu-bench-") as workdir:
        jpeg = os.path.join(workdir, "photo_12mp.jpg")
        make_12mp_jpeg(jpeg)
        pre, ok = preprocessing_rows(binary, jpeg, args.runs, workdir)
        rows += pre
        if not args.skip_whisper:
            if os.path.isfile(os.path.join(args.whisper, "model.safetensors")):
                rows.append(whisper_row(binary, args.whisper, args.runs, workdir))
            else:
                print(f"skipping Whisper: no weights at {args.whisper} "
                      "(bash scripts/fetch_whisper_tiny_en.sh)", file=sys.stderr)
        if not args.skip_2b:
            rows += qwen2b_rows(binary, args.cache, args.new_tokens, workdir)
    for r in rows:
        r.update(cpu=cpu, cores=cores, commit=sha)
    print("\n| workload | HF | mmllm | unit | mmllm vs HF | goal |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        faster = r["hf"] / r["mmllm"] if r["unit"] != "tok/s" else r["mmllm"] / r["hf"]
        print(f"| {r['workload']} | {r['hf']} | {r['mmllm']} | {r['unit']} | {faster:.2f}x | {r['goal']} |")
    for r in rows:
        print(f"- {r['workload']}: {r.get('note', '')}\n  `{r['command']}`")
    slug = re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-")
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"{datetime.date.today().isoformat()}-cpu-{slug}.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")
    print(f"\nwrote {path}")
    if not ok:
        raise SystemExit("pixel values differ from transformers'")


if __name__ == "__main__":
    main()
