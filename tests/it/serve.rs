//! `mmllm serve` driven the way users drive it: the official `openai` Python client (from the
//! venv `scripts/test_venv.sh` makes) for every content type, with each greedy answer equal to
//! the CLI's for the same inputs; and raw HTTP for the server's own rules (errors, 401, 413,
//! 429, a client that disconnects, SIGTERM).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::{json_line, mmllm, repo, run_mmllm, token_ids};
use crate::util_http::{Reply, Server};

/// A running `mmllm serve` on a free loopback port, killed when dropped.
struct Serve {
    child: Child,
    base: String,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Serve {
    fn start(model: &str, extra: &[&str]) -> Serve {
        let mut child = mmllm()
            .args(["serve", "--model", model, "--port", "0", "--device", "cpu"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let keep = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(i) = line.find("on http://") {
                    let addr = line[i + 3..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_string();
                    let _ = tx.send(addr);
                }
                keep.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("serve did not start: {}", log.lock().unwrap()));
        Serve {
            child,
            base,
            stderr: log,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// POSTs JSON; the status, the headers we look at and the body as JSON (or text).
fn post(url: &str, body: &str, headers: &[(&str, &str)]) -> (u16, Option<String>, Value) {
    let mut req = agent().post(url).header("Content-Type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut resp = req.send(body).unwrap();
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, retry, value)
}

fn get(url: &str) -> (u16, String) {
    let mut resp = agent().get(url).call().unwrap();
    (
        resp.status().as_u16(),
        resp.body_mut().read_to_string().unwrap_or_default(),
    )
}

/// The value of a Prometheus sample whose line starts with `prefix`.
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {prefix} in\n{text}"))
}

fn python() -> PathBuf {
    let py = repo().join("target/test-venv/bin/python");
    assert!(
        py.exists(),
        "{} is missing: run `bash scripts/test_venv.sh` first (it installs the pinned openai \
         client the server tests use)",
        py.display()
    );
    py
}

/// Runs tests/serve_client.py with `spec`; its parsed output.
fn client(spec: Value) -> Value {
    let out = std::process::Command::new(python())
        .arg(repo().join("tests/serve_client.py"))
        .arg(spec.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The CLI's greedy jsonl answer for the same inputs.
fn cli(command: &str, model: &str, extra: &[&str], inputs: &[&str], prompt: &str) -> Value {
    let mut args = vec![
        command,
        "--model",
        model,
        "--output",
        "jsonl",
        "--max-tokens",
        "8",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(inputs);
    args.push(prompt);
    json_line(&run_mmllm(&args))
}

fn same_answer(name: &str, got: &Value, want: &Value) {
    assert_eq!(
        token_ids(&got["token_ids"]),
        token_ids(&want["token_ids"]),
        "{name}: token ids"
    );
    assert_eq!(got["text"], want["text"], "{name}: text");
    assert!(
        !token_ids(&got["token_ids"]).is_empty(),
        "{name}: no tokens"
    );
}

#[test]
fn openai_client_gets_the_cli_answers_for_every_vision_input() {
    let model_dir = repo().join("tests/fixtures/qwen2-vl-tiny");
    let model = model_dir.to_str().unwrap();
    let data = repo().join("tests/data");
    let photo = data.join("qwen_china_517x333.jpg");
    let photo2 = data.join("ov_china_83x59.jpg");
    let video = data.join("video/counter.mp4");
    let embeds = model_dir.join("expected/embeds_one_image.safetensors");
    let bytes = std::fs::read(&photo).unwrap();
    let http = Server::start(move |_| Reply::ok(bytes.clone()));
    let serve = Serve::start(
        model,
        &[
            "--allow-private-media-urls",
            "--allowed-local-media-path",
            data.to_str().unwrap(),
            "--limit-mm-per-prompt",
            "image=2,video=1",
        ],
    );
    let url = http.url("/photo.jpg");
    let p = |s: &Path| s.to_str().unwrap().to_string();
    use std::path::Path;
    let out = client(json!({
        "base_url": serve.url("/v1"),
        "model": model,
        "cases": {
            "image_url": {"kind": "image_url", "url": url, "prompt": "What is in this image?"},
            "image_b64": {"kind": "image_b64", "path": p(&photo2), "prompt": "Describe it."},
            "two_images": {"kind": "two_images", "url": url, "path": p(&photo2), "prompt": "Compare them."},
            "video": {"kind": "video_url", "url": format!("file://{}", p(&video)), "prompt": "What happens?"},
            "embeds": {"kind": "image_embeds", "path": p(&embeds), "prompt": "What is in this image?"},
            "logprobs": {"kind": "logprobs", "url": url, "prompt": "What is in this image?"},
            "stream": {"kind": "stream", "url": url, "prompt": "What is in this image?"},
            "unknown_part": {"kind": "bad", "messages": [{"role": "user", "content": [{"type": "picture"}]}]},
            "n2": {"kind": "bad", "messages": [{"role": "user", "content": "hi"}], "params": {"n": 2}},
            "wrong_model": {"kind": "bad", "model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
            "three_images": {"kind": "bad", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "x"}]}]},
            "outside_file": {"kind": "bad", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}},
                {"type": "text", "text": "x"}]}]},
            "bad_embeds": {"kind": "bad", "messages": [{"role": "user", "content": [
                {"type": "image_embeds", "image_embeds": "AAAA"}, {"type": "text", "text": "x"}]}]},
        },
    }));
    let r = &out["results"];
    let q = "What is in this image?";
    let one = cli("image", model, &[], &[&p(&photo)], q);
    same_answer("image by URL", &r["image_url"], &one);
    same_answer(
        "image by base64",
        &r["image_b64"],
        &cli("image", model, &[], &[&p(&photo2)], "Describe it."),
    );
    same_answer(
        "two images",
        &r["two_images"],
        &cli(
            "image",
            model,
            &["--limit-mm-per-prompt", "image=2"],
            &[&p(&photo), &p(&photo2)],
            "Compare them.",
        ),
    );
    same_answer(
        "video",
        &r["video"],
        &cli("video", model, &[], &[&p(&video)], "What happens?"),
    );
    same_answer(
        "image embeds",
        &r["embeds"],
        &cli("embeds", model, &[], &[&p(&embeds)], q),
    );
    same_answer("streamed", &r["stream"], &one);
    assert_eq!(
        r["stream"]["completion_tokens"],
        json!(token_ids(&one["token_ids"]).len())
    );
    assert!(
        r["stream"]["chunks"].as_u64().unwrap() > 1,
        "{}",
        r["stream"]
    );

    // Logprobs: the chosen tokens' and the alternatives' log-probabilities equal the CLI's.
    same_answer("logprobs", &r["logprobs"], &one);
    let want = &cli("image", model, &["--logprobs", "2"], &[&p(&photo)], q)["logprobs"];
    let got = r["logprobs"]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(got.len(), want.as_array().unwrap().len());
    for (g, w) in got.iter().zip(want.as_array().unwrap()) {
        assert_eq!(g["token_id"], w["token_id"]);
        let (a, b) = (
            g["logprob"].as_f64().unwrap(),
            w["logprob"].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        assert_eq!(g["top_logprobs"].as_array().unwrap().len(), 2);
        assert_eq!(g["top_logprobs"][1]["token_id"], w["top"][1]["token_id"]);
    }

    let e = &out["errors"];
    let expect = |name: &str, status: u64, param: Option<&str>, words: &[&str]| {
        let got = &e[name];
        assert_eq!(got["status"], json!(status), "{name}: {got}");
        if let Some(param) = param {
            assert_eq!(got["param"], json!(param), "{name}: {got}");
        }
        let message = got["message"].as_str().unwrap_or("");
        for w in words {
            assert!(message.contains(w), "{name}: {message:?} lacks {w:?}");
        }
    };
    expect(
        "unknown_part",
        400,
        Some("messages[0].content[0].type"),
        &["picture"],
    );
    expect("n2", 400, Some("n"), &["n = 1"]);
    expect("wrong_model", 404, None, &["gpt-4o"]);
    expect("three_images", 400, None, &["3 image items", "at most 2"]);
    expect(
        "outside_file",
        400,
        Some("messages[0].content[0].image_url.url"),
        &["not below"],
    );
    expect(
        "bad_embeds",
        400,
        Some("messages[0].content[0].image_embeds"),
        &[],
    );
    drop(serve);
}

#[test]
fn openai_client_sends_audio_as_the_cli_does() {
    let model_dir = repo().join("tests/fixtures/qwen2-audio-tiny");
    let model = model_dir.to_str().unwrap();
    let wav = repo().join("tests/data/speech_16k.wav");
    let bytes = std::fs::read(&wav).unwrap();
    let http = Server::start(move |_| Reply::ok(bytes.clone()));
    let serve = Serve::start(model, &["--allow-private-media-urls"]);
    let out = client(json!({
        "base_url": serve.url("/v1"),
        "model": model,
        "cases": {
            "input_audio": {"kind": "input_audio", "path": wav.to_str().unwrap(), "prompt": "What is said?"},
            "audio_url": {"kind": "audio_url", "url": http.url("/speech.wav"), "prompt": "What is said?"},
        },
    }));
    let want = cli(
        "audio",
        model,
        &[],
        &[wav.to_str().unwrap()],
        "What is said?",
    );
    same_answer("input_audio", &out["results"]["input_audio"], &want);
    same_answer("audio_url", &out["results"]["audio_url"], &want);
}

/// The server's own rules over raw HTTP: auth, body size, private URLs, a full queue, a client
/// that leaves mid-stream (its sequence is freed), and SIGTERM (in-flight requests finish).
#[test]
fn server_rules_capacity_disconnects_and_sigterm() {
    let model = repo().join("tests/fixtures/qwen2-vl-tiny");
    let model = model.to_str().unwrap();
    let serve = Serve::start(
        model,
        &[
            "--api-key",
            "sekrit",
            "--max-seqs",
            "1",
            "--max-waiting",
            "1",
            "--max-request-bytes",
            "4096",
        ],
    );
    let chat = serve.url("/v1/chat/completions");
    let auth = [("Authorization", "Bearer sekrit")];
    let long = json!({"model": model, "messages": [{"role": "user", "content": "count"}],
                      "max_tokens": 100000, "ignore_eos": true, "temperature": 0})
    .to_string();

    let (status, _, body) = post(&chat, &long, &[]);
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let (status, _, _) = post(&chat, &long, &[("Authorization", "Bearer wrong")]);
    assert_eq!(status, 401);
    assert_eq!(get(&serve.url("/health")).0, 200, "health needs no key");

    let big = json!({"model": model, "messages": [{"role": "user", "content": "x".repeat(5000)}]});
    let (status, _, body) = post(&chat, &big.to_string(), &auth);
    assert_eq!(status, 413, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--max-request-bytes"));

    let private = json!({"model": model, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}},
        {"type": "text", "text": "x"}]}]});
    let (status, _, body) = post(&chat, &private.to_string(), &auth);
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("link-local"), "{message}");
    assert_eq!(
        body["error"]["param"],
        "messages[0].content[0].image_url.url"
    );

    // A streaming client that leaves: its sequence is cancelled and freed.
    let streamed = json!({"model": model, "messages": [{"role": "user", "content": "count"}],
                          "max_tokens": 100000, "ignore_eos": true, "stream": true});
    let mut sock = TcpStream::connect(serve.addr()).unwrap();
    let body = streamed.to_string();
    write!(
        sock,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekrit\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
    let running = |text: &str| metric(text, "mmllm:num_requests_running{");
    assert_eq!(running(&get(&serve.url("/metrics")).1), 1.0);
    drop(sock);
    let start = Instant::now();
    loop {
        let text = get(&serve.url("/metrics")).1;
        if running(&text) == 0.0 {
            assert_eq!(metric(&text, "mmllm:requests_cancelled_total{"), 1.0);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "not freed:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // One running and one waiting fill the server; a third gets 429 with Retry-After.
    let t1 = {
        let (chat, long) = (chat.clone(), long.clone());
        std::thread::spawn(move || post(&chat, &long, &[("Authorization", "Bearer sekrit")]))
    };
    std::thread::sleep(Duration::from_millis(50));
    let t2 = {
        let (chat, long) = (chat.clone(), long.clone());
        std::thread::spawn(move || post(&chat, &long, &[("Authorization", "Bearer sekrit")]))
    };
    std::thread::sleep(Duration::from_millis(50));
    let (status, retry, body) = post(&chat, &long, &auth);
    assert_eq!(status, 429, "{body}");
    assert_eq!(retry.as_deref(), Some("1"));
    for t in [t1, t2] {
        let (status, _, body) = t.join().unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(
            body["usage"]["completion_tokens"].as_u64().unwrap() > 400,
            "{body}"
        );
    }

    // SIGTERM while a request runs: it completes, then the server exits 0.
    let t = {
        let (chat, long) = (chat.clone(), long.clone());
        std::thread::spawn(move || post(&chat, &long, &[("Authorization", "Bearer sekrit")]))
    };
    std::thread::sleep(Duration::from_millis(100));
    let mut serve = serve;
    let pid = serve.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let (status, _, body) = t.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        body["usage"]["completion_tokens"].as_u64().unwrap() > 400,
        "{body}"
    );
    let code = serve.child.wait().unwrap();
    assert!(code.success(), "{code:?}: {}", serve.stderr.lock().unwrap());
    assert!(TcpStream::connect(serve.addr()).is_err(), "still listening");
}

/// `client.audio.transcriptions.create` on a Whisper model: the text `mmllm audio` gives.
#[test]
fn openai_client_transcribes_with_whisper() {
    let model_dir = repo().join("tests/fixtures/whisper-tiny-random");
    let model = model_dir.to_str().unwrap();
    let wav = repo().join("tests/data/speech_16k.wav");
    let serve = Serve::start(model, &[]);
    let out = client(json!({
        "base_url": serve.url("/v1"),
        "model": model,
        "cases": {"speech": {"kind": "transcription", "path": wav.to_str().unwrap()}},
    }));
    let want = json_line(&run_mmllm(&[
        "audio",
        "--model",
        model,
        "--output",
        "jsonl",
        wav.to_str().unwrap(),
    ]));
    assert!(!want["text"].as_str().unwrap().is_empty());
    assert_eq!(out["results"]["speech"]["text"], want["text"]);

    // A model that does not transcribe says so.
    let other = repo().join("tests/fixtures/qwen2-vl-tiny");
    let serve = Serve::start(other.to_str().unwrap(), &[]);
    let boundary = "XyZ";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n--{boundary}--\r\n"
    );
    let mut resp = agent()
        .post(serve.url("/v1/audio/transcriptions"))
        .header(
            "Content-Type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .send(body.as_str())
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let text = resp.body_mut().read_to_string().unwrap();
    assert!(text.contains("does not transcribe"), "{text}");
}

/// A bounded load test: 32 concurrent clients for three rounds of 4 s, a third sending bad
/// requests. Every good answer equals the CLI's, every bad request gets its 4xx, the server
/// stays up, and its memory does not grow round over round.
#[test]
fn load_good_and_bad_requests_concurrently() {
    let model_dir = repo().join("tests/fixtures/qwen2-vl-tiny");
    let model = model_dir.to_str().unwrap();
    let image = repo().join("tests/data/ov_china_11x9.jpg");
    let image = image.to_str().unwrap();
    let want = cli("image", model, &[], &[image], "Describe the image.");
    let serve = Serve::start(model, &[]);
    let out = std::process::Command::new(python())
        .arg(repo().join("scripts/serve_load.py"))
        .args(["load", "--base-url", &serve.url("/v1"), "--model", model])
        .args([
            "--image",
            image,
            "--expected",
            want["text"].as_str().unwrap(),
        ])
        .args(["--pid", &serve.child.id().to_string()])
        .args(["--clients", "32", "--seconds", "4", "--rounds", "3"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rounds = report["rounds"].as_array().unwrap();
    for (i, r) in rounds.iter().enumerate() {
        eprintln!("load round {i}: {r}");
        assert!(r["good"].as_u64().unwrap() > 0, "round {i}: {r}");
        assert!(r["bad"].as_u64().unwrap() > 0, "round {i}: {r}");
        assert_eq!(r["wrong"], json!([]), "round {i}");
        assert_eq!(r["bad_wrong"], json!([]), "round {i}");
        assert_eq!(r["errors"], json!([]), "round {i}");
    }
    // Memory is flat once warm: the last round ends within 15% (+32 MiB) of the first.
    let rss = |i: usize| rounds[i]["rss_kib"].as_f64().unwrap();
    assert!(
        rss(2) <= rss(0) * 1.15 + 32.0 * 1024.0,
        "RSS grew: {} -> {} KiB",
        rss(0),
        rss(2)
    );
    assert_eq!(get(&serve.url("/health")).0, 200);
    let metrics = get(&serve.url("/metrics")).1;
    assert_eq!(metric(&metrics, "mmllm:num_requests_running{"), 0.0);
}

/// `--allowed-media-domains` refuses other hosts (checked before any connection);
/// `--shutdown-grace 0` cuts a running request at SIGTERM instead of waiting for it; `--host`
/// is the address listened on.
#[test]
fn media_domains_and_shutdown_grace() {
    let model = repo().join("tests/fixtures/qwen2-vl-tiny");
    let model = model.to_str().unwrap();
    let bytes = std::fs::read(repo().join("tests/data/ov_china_11x9.jpg")).unwrap();
    let http = Server::start(move |_| Reply::ok(bytes.clone()));
    let serve = Serve::start(
        model,
        &[
            "--allow-private-media-urls",
            "--allowed-media-domains",
            "127.0.0.1",
            "--shutdown-grace",
            "0",
            "--host",
            "127.0.0.2",
        ],
    );
    assert!(
        serve.base.starts_with("http://127.0.0.2:"),
        "{}",
        serve.base
    );
    let chat = serve.url("/v1/chat/completions");
    let ask = |url: &str| {
        let body = json!({"model": model, "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "x"}]}]});
        post(&chat, &body.to_string(), &[])
    };
    let url = http.url("/a.jpg");
    assert_eq!(ask(&url).0, 200);
    let (status, _, body) = ask(&url.replacen("127.0.0.1", "localhost", 1));
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"localhost\" is not an allowed media domain"),
        "{body}"
    );
    assert_eq!(
        http.requests().len(),
        1,
        "the refused URL was never fetched"
    );

    let long = json!({"model": model, "messages": [{"role": "user", "content": "count"}],
                      "max_tokens": 100000, "ignore_eos": true})
    .to_string();
    let t = {
        let chat = chat.clone();
        std::thread::spawn(move || {
            agent()
                .post(&chat)
                .header("Content-Type", "application/json")
                .send(long.as_str())
                .map(|r| r.status().as_u16())
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let mut serve = serve;
    let start = Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &serve.child.id().to_string()])
        .status()
        .unwrap();
    let code = serve.child.wait().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(code.code(), Some(1));
    let said = || serve.stderr.lock().unwrap().contains("grace period over");
    let waited = Instant::now();
    while !said() && waited.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(said(), "{}", serve.stderr.lock().unwrap());
    assert!(
        !matches!(t.join().unwrap(), Ok(200)),
        "the cut request did not succeed"
    );
}
