#!/usr/bin/env python3
"""Where the GPU time of time-to-first-token goes, kernel by kernel: Nsight Compute (`ncu`)
over one `mmllm image --max-tokens 1` (image preprocessing, vision tower, one prefill) on the
random real-shape checkpoints that `bench/gpu.py` builds. Prints, for each model, the kernels
ranked by total GPU time (ncu serialises kernels, so gaps between launches are not counted;
`mmllm profile-decode` gives the synchronised totals). The weight concatenations at load (the
leading run of `copy2d` kernels: q/k/v and gate/up fused into one matrix each) are counted
apart from the encode and prefill.

    python3 bench/gpu_profile.py --mmllm ./mmllm [--skip-7b] [--skip-qwen] [--csv-dir DIR]
    python3 bench/gpu_profile.py --from-csv DIR     # the tables again from saved ncu CSVs
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

TITLES = {"qwen2vl2b": "Qwen2-VL-2B shape, 448x448 image, bf16 (encode + prefill)",
          "llava7b": "LLaVA-1.5-7B shape, 336 crop, bf16 (encode + prefill)"}
UNIT_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}


def ncu_kernels(binary, model, image, csv_dir, tag):
    """(kernel name -> [count, total µs]) for one `mmllm image --max-tokens 1`."""
    cmd = [binary, "image", "--model", model, "--device", "cuda", "--dtype", "bf16",
           "--max-tokens", "1", "--output", "jsonl", image, gpu.PROMPT]
    warm = subprocess.run(cmd, capture_output=True, text=True)  # PTX JIT cache, page cache
    if warm.returncode != 0:
        sys.stderr.write(warm.stderr[-4000:])
        raise SystemExit(f"mmllm failed ({warm.returncode}): {' '.join(cmd)}")
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
    return aggregate(text)


def aggregate(text):
    """(kernel name -> [count, total µs], launches after load, load-time µs) from ncu's CSV."""
    launches = []
    for row in csv.DictReader(io.StringIO(text)):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        us = float(row["Metric Value"].replace(",", "")) * UNIT_US[row["Metric Unit"]]
        launches.append((row["Kernel Name"].split("(")[0][:90], us))
    load = 0
    while load < len(launches) and launches[load][0].startswith("copy2d"):
        load += 1
    per = defaultdict(lambda: [0, 0.0])
    for name, us in launches[load:]:
        per[name][0] += 1
        per[name][1] += us
    return per, launches[load:], sum(us for _, us in launches[:load])


def report(title, per, order, load_us):
    total = sum(v[1] for v in per.values())
    print(f"\n### {title}: {len(order)} kernels, {total / 1e3:.2f} ms of GPU time "
          f"(after {load_us / 1e3:.2f} ms of weight concatenation at load)")
    print("| kernel | launches | total ms | share | mean µs |")
    print("|---|---|---|---|---|")
    for name, (n, us) in sorted(per.items(), key=lambda kv: -kv[1][1])[:25]:
        print(f"| `{name}` | {n} | {us / 1e3:.2f} | {100 * us / total:.1f}% | {us / n:.1f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mmllm")
    ap.add_argument("--from-csv", help="print the tables from ncu-*.csv files in this folder")
    ap.add_argument("--skip-7b", action="store_true")
    ap.add_argument("--skip-qwen", action="store_true")
    ap.add_argument("--csv-dir")
    args = ap.parse_args()
    if args.from_csv:
        for tag, title in TITLES.items():
            path = os.path.join(args.from_csv, f"ncu-{tag}.csv")
            if os.path.exists(path):
                report(title, *aggregate(open(path).read()))
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    global gpu, Image
    import gpu  # the checkpoint builders and the photo
    from PIL import Image
    if not args.skip_qwen:
        d = tempfile.mkdtemp(prefix="qwen2vl2b-")
        image = os.path.join(d, "photo_448.png")
        Image.open(gpu.PHOTO).convert("RGB").resize((448, 448), Image.BICUBIC).save(image)
        t0 = time.perf_counter()
        del_model = gpu.make_qwen2vl_2b(d)
        del del_model
        print(f"built Qwen2-VL-2B shape in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        report(TITLES["qwen2vl2b"], *ncu_kernels(args.mmllm, d, image, args.csv_dir, "qwen2vl2b"))
        shutil.rmtree(d, ignore_errors=True)
    if not args.skip_7b:
        d = tempfile.mkdtemp(prefix="llava7b-")
        model = gpu.make_llava7b(d)
        del model
        report(TITLES["llava7b"], *ncu_kernels(args.mmllm, d, gpu.PHOTO, args.csv_dir, "llava7b"))
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
