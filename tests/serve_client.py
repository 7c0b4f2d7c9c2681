"""Drives a running `mmllm serve` with the official `openai` client (tests/it/serve.rs).

Reads a JSON spec (argv[1]) naming the server and the inputs, sends one request per case
with greedy decoding, and prints one JSON object: case -> {text, token_ids, ...}, plus
"errors": case -> {status, param, message} for the requests that must fail.
"""
import base64
import json
import sys

import openai

spec = json.loads(sys.argv[1])
client = openai.OpenAI(base_url=spec["base_url"], api_key=spec.get("api_key", "none"), max_retries=0)
model = spec["model"]
MAX = spec.get("max_tokens", 8)


def b64(path):
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode()


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def ask(content, **kw):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=MAX,
        temperature=0,
        extra_body={"return_token_ids": True},
        **kw,
    )
    d = r.model_dump()
    c = d["choices"][0]
    assert d["model"] == model, d
    assert d["usage"]["completion_tokens"] == len(c["token_ids"]), d
    return {
        "text": c["message"]["content"],
        "token_ids": c["token_ids"],
        "finish_reason": c["finish_reason"],
        "prompt_tokens": d["usage"]["prompt_tokens"],
        "logprobs": c["logprobs"],
    }


out = {}
errors = {}
cases = spec["cases"]
for name, case in cases.items():
    kind = case["kind"]
    text = {"type": "text", "text": case.get("prompt", "")}
    if kind == "image_url":
        out[name] = ask([image_part(case["url"]), text])
    elif kind == "image_b64":
        out[name] = ask([image_part("data:image/jpeg;base64," + b64(case["path"])), text])
    elif kind == "two_images":
        out[name] = ask([image_part(case["url"]), image_part("data:image/jpeg;base64," + b64(case["path"])), text])
    elif kind == "video_url":
        out[name] = ask([{"type": "video_url", "video_url": {"url": case["url"]}}, text])
    elif kind == "image_embeds":
        out[name] = ask([{"type": "image_embeds", "image_embeds": b64(case["path"])}, text])
    elif kind == "input_audio":
        out[name] = ask([{"type": "input_audio", "input_audio": {"data": b64(case["path"]), "format": "wav"}}, text])
    elif kind == "audio_url":
        out[name] = ask([{"type": "audio_url", "audio_url": {"url": case["url"]}}, text])
    elif kind == "logprobs":
        out[name] = ask([image_part(case["url"]), text], logprobs=True, top_logprobs=2)
    elif kind == "stream":
        pieces, ids, usage, finish = [], None, None, None
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": [image_part(case["url"]), text]}],
            max_tokens=MAX,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"return_token_ids": True},
        )
        for chunk in stream:
            d = chunk.model_dump()
            if d.get("usage"):
                usage = d["usage"]
            for c in d["choices"]:
                if c["delta"].get("content"):
                    pieces.append(c["delta"]["content"])
                if c.get("finish_reason"):
                    finish = c["finish_reason"]
                    ids = c.get("token_ids")
        out[name] = {"text": "".join(pieces), "token_ids": ids, "finish_reason": finish,
                     "chunks": len(pieces), "completion_tokens": usage and usage["completion_tokens"]}
    elif kind == "transcription":
        with open(case["path"], "rb") as f:
            r = client.audio.transcriptions.create(model=model, file=f)
        out[name] = {"text": r.text}
    elif kind == "bad":
        try:
            client.chat.completions.create(model=case.get("model", model), messages=case["messages"],
                                           max_tokens=MAX, **case.get("params", {}))
            errors[name] = {"status": 200}
        except openai.APIStatusError as e:
            body = e.body if isinstance(e.body, dict) else {}
            errors[name] = {"status": e.status_code, "param": body.get("param"),
                            "message": body.get("message", str(e))}
    else:
        raise SystemExit(f"unknown case kind {kind}")

print(json.dumps({"results": out, "errors": errors}))
