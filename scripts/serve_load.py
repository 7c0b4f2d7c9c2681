"""Load for a running `mmllm serve`, through the official `openai` client.

  load:  N concurrent clients for S seconds per round, a third of them sending bad requests;
         every good answer must equal EXPECTED (greedy), every bad one must get its 4xx, and
         the server's resident memory (/proc/PID) is reported after each round.
  bench: N concurrent clients send R good requests in all; prints requests/s and output tok/s.

python3 scripts/serve_load.py load  --base-url URL --model M --image IMG --expected TEXT --pid PID
python3 scripts/serve_load.py bench --base-url URL --model M --image IMG --clients 8 --requests 64
Prints one JSON object on stdout.
"""
import argparse
import base64
import json
import sys
import threading
import time

import openai

ap = argparse.ArgumentParser()
ap.add_argument("mode", choices=["load", "bench"])
ap.add_argument("--base-url", required=True)
ap.add_argument("--model", required=True)
ap.add_argument("--image", required=True)
ap.add_argument("--prompt", default="Describe the image.")
ap.add_argument("--expected")
ap.add_argument("--pid", type=int)
ap.add_argument("--clients", type=int, default=32)
ap.add_argument("--seconds", type=float, default=20)
ap.add_argument("--rounds", type=int, default=1)
ap.add_argument("--requests", type=int, default=64)
ap.add_argument("--max-tokens", type=int, default=8)
ap.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-tokens (bench)")
args = ap.parse_args()

with open(args.image, "rb") as f:
    image_url = "data:image/jpeg;base64," + base64.b64encode(f.read()).decode()
client = openai.OpenAI(base_url=args.base_url, api_key="none", max_retries=0, timeout=120)


def good():
    r = client.chat.completions.create(
        model=args.model, max_tokens=args.max_tokens, temperature=0,
        extra_body={"ignore_eos": True} if args.ignore_eos else None,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": args.prompt}]}])
    return r.choices[0].message.content, r.usage.completion_tokens


BAD = [
    (400, dict(messages=[{"role": "user", "content": [{"type": "picture"}]}])),
    (400, dict(messages=[{"role": "user", "content": "hi"}], n=2)),
    (400, dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,bm90IGFuIGltYWdl"}},
        {"type": "text", "text": "x"}]}])),
    (404, dict(messages=[{"role": "user", "content": "hi"}], model="no-such-model")),
    (400, dict(messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "ftp://example.org/clip.mp4"}},
        {"type": "text", "text": "x"}]}])),
]


def bad(i):
    want, kw = BAD[i % len(BAD)]
    kw = dict(kw)
    model = kw.pop("model", args.model)
    try:
        client.chat.completions.create(model=model, max_tokens=4, **kw)
        return want, 200
    except openai.APIStatusError as e:
        return want, e.status_code


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


lock = threading.Lock()


def load_round():
    stats = {"good": 0, "wrong": [], "bad": 0, "bad_wrong": [], "errors": []}
    deadline = time.time() + args.seconds

    def worker(k):
        i = 0
        while time.time() < deadline:
            try:
                if k % 3 == 2:
                    want, got = bad(k + i)
                    with lock:
                        stats["bad"] += 1
                        if got != want:
                            stats["bad_wrong"].append([want, got])
                else:
                    text, _ = good()
                    with lock:
                        stats["good"] += 1
                        if text != args.expected:
                            stats["wrong"].append(text)
            except Exception as e:  # a failed good request is a failure of the test
                with lock:
                    stats["errors"].append(repr(e)[:200])
            i += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats["rss_kib"] = rss_kib(args.pid) if args.pid else None
    return stats


if args.mode == "load":
    print(json.dumps({"rounds": [load_round() for _ in range(args.rounds)]}))
    sys.exit(0)

# bench
done = {"requests": 0, "tokens": 0}
todo = list(range(args.requests))


def bench_worker():
    while True:
        with lock:
            if not todo:
                return
            todo.pop()
        _, n = good()
        with lock:
            done["requests"] += 1
            done["tokens"] += n


start = time.time()
threads = [threading.Thread(target=bench_worker) for _ in range(args.clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
secs = time.time() - start
print(json.dumps({"clients": args.clients, "requests": done["requests"], "seconds": round(secs, 3),
                  "requests_per_s": round(done["requests"] / secs, 2),
                  "output_tokens_per_s": round(done["tokens"] / secs, 1)}))
