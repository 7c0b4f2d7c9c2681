#!/usr/bin/env python3
"""Where the GPU time of time-to-first-token goes, kernel by kernel: Nsight Compute (`ncu`)
over one `mmllm image --max-tokens 1` (image preprocessing, vision tower, one prefill) on the
random real-shape checkpoints that `bench/gpu.py` builds. Prints, for each model, the kernels
ranked by total GPU time (ncu serialises kernels, so gaps between launches are not counted;
`mmllm profile-decode` gives the synchronised totals).

    python3 bench/gpu_profile.py --mmllm ./mmllm [--skip-7b] [--skip-qwen] [--csv-dir DIR]
"""

import argparse
import csv
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu  # noqa: E402  (the checkpoint builders and the photo)

from PIL import Image  # noqa: E402


def ncu_kernels(binary, model, image, csv_dir, tag):
    """(kernel name -> [count, total µs]) for one `mmllm image --max-tokens 1`."""
    cmd = [binary, "image", "--model", model, "--device", "cuda", "--dtype", "bf16",
           "--max-tokens", "1", "--output", "jsonl", image, gpu.PROMPT]
    subprocess.run(cmd, capture_output=True, check=True)  # warm-up: PTX JIT cache, page cache
    env = dict(os.environ, MMLLM_CUDA_GRAPH="0")
    out = subprocess.run(["ncu", "--clock-control", "none", "--metrics", "gpu__time_duration.sum",
                          "--csv", *cmd], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"ncu failed ({out.returncode})")
    text = out.stdout[out.stdout.find('"ID"'):]
    if csv_dir:
        with open(os.path.join(csv_dir, f"ncu-{tag}.csv"), "w") as f:
            f.write(text)
    per = defaultdict(lambda: [0, 0.0])
    order = []
    for row in csv.DictReader(io.StringIO(text)):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(row["Metric Value"].replace(",", ""))
        unit = row["Metric Unit"]
        us = value / 1e3 if unit == "nsecond" else value * 1e3 if unit == "msecond" else value
        name = row["Kernel Name"].split("(")[0][:90]
        per[name][0] += 1
        per[name][1] += us
        order.append((name, us, row.get("Grid Size", ""), row.get("Block Size", "")))
    return per, order


def report(title, per, order):
    total = sum(v[1] for v in per.values())
    print(f"\n### {title}: {len(order)} kernels, {total / 1e3:.2f} ms of GPU time")
    print("| kernel | launches | total ms | share | mean µs |")
    print("|---|---|---|---|---|")
    for name, (n, us) in sorted(per.items(), key=lambda kv: -kv[1][1])[:25]:
        print(f"| `{name}` | {n} | {us / 1e3:.2f} | {100 * us / total:.1f}% | {us / n:.1f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mmllm", required=True)
    ap.add_argument("--skip-7b", action="store_true")
    ap.add_argument("--skip-qwen", action="store_true")
    ap.add_argument("--csv-dir")
    args = ap.parse_args()
    if not args.skip_qwen:
        d = tempfile.mkdtemp(prefix="qwen2vl2b-")
        image = os.path.join(d, "photo_448.png")
        Image.open(gpu.PHOTO).convert("RGB").resize((448, 448), Image.BICUBIC).save(image)
        t0 = time.perf_counter()
        del_model = gpu.make_qwen2vl_2b(d)
        del del_model
        print(f"built Qwen2-VL-2B shape in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        per, order = ncu_kernels(args.mmllm, d, image, args.csv_dir, "qwen2vl2b")
        report("Qwen2-VL-2B shape, 448x448 image, bf16 (encode + prefill)", per, order)
        shutil.rmtree(d, ignore_errors=True)
    if not args.skip_7b:
        d = tempfile.mkdtemp(prefix="llava7b-")
        model = gpu.make_llava7b(d)
        del model
        per, order = ncu_kernels(args.mmllm, d, gpu.PHOTO, args.csv_dir, "llava7b")
        report("LLaVA-1.5-7B shape, 336 crop, bf16 (encode + prefill)", per, order)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
