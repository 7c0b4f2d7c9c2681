//! `mmllm serve`: the OpenAI-compatible HTTP server, one more front over the same pipeline as
//! the CLI and `batch`. A request becomes the same [`Plan`] (same limits, same errors), its
//! media are fetched under the shared fetch rules (`media::fetch`) and decoded off the async
//! runtime, and its sequence joins the one engine thread's continuous batch
//! ([`engine`]). Errors are OpenAI-shaped 4xx; user input never causes a 500.

pub mod engine;
pub mod metrics;
pub mod openai;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request as HttpRequest, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokenizers::Tokenizer;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use self::engine::{Job, Msg};
use self::metrics::Metrics;
use self::openai::{ApiError, ChatRequest, MediaRef, Part};
use super::pipeline::{self, Resolved};
use super::plan::{GenSettings, MediaArg, Plan, DEFAULT_MAX_TOKENS};
use crate::cli::{OutputFormat, ServeArgs};
use crate::engine::device::DeviceChoice;
use crate::engine::generate::{Completion, Event, FinishReason};
use crate::engine::sampler::SamplingParams;
use crate::engine::scheduler::SchedulerConfig;
use crate::error::{Error, Result};
use crate::media::source::{FetchPolicy, Source};
use crate::media::video::FrameSampling;
use crate::models::ProcessorKwargs;
use crate::prompt::build::{Turn, TurnPart};

/// Largest request body by default (base64 media included); `--max-request-bytes` changes it.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 << 20;
/// Bytes of KV cache the sequences in flight may reserve together (as for `batch`).
const KV_BUDGET_BYTES: usize = 8 << 30;

/// What every handler shares.
struct AppState {
    model: String,
    created: u64,
    resolved: Arc<Resolved>,
    tokenizer: Arc<Tokenizer>,
    api_key: Option<String>,
    fetch: FetchPolicy,
    limits: BTreeMap<crate::media::Modality, usize>,
    device: DeviceChoice,
    dtype: crate::engine::device::DTypeChoice,
    max_request_bytes: usize,
    /// Requests accepted and not finished, against `capacity` (429 past it).
    in_flight: AtomicUsize,
    capacity: usize,
    draining: AtomicBool,
    jobs: std::sync::Mutex<Option<SyncSender<Job>>>,
    metrics: Arc<Metrics>,
}

/// Runs the server until SIGTERM (or SIGINT), then drains: no new requests, in-flight ones
/// finish within the grace period.
pub fn run(args: &ServeArgs) -> Result<()> {
    let mut fetch = FetchPolicy {
        allow_private: args.allow_private_media_urls,
        ..FetchPolicy::default()
    };
    if let Some(dir) = &args.allowed_local_media_path {
        fetch = fetch.with_local_root(dir)?;
    }
    if let Some(list) = &args.allowed_media_domains {
        fetch = fetch.with_domains(list)?;
    }
    let limits = match &args.limit_mm_per_prompt {
        Some(spec) => super::plan::parse_limits(spec)?,
        None => BTreeMap::new(),
    };
    let device = DeviceChoice::parse(&args.device)?;
    let resolved = Arc::new(pipeline::resolve(&args.model)?);
    // The server-wide limits must suit the model: checked once, before weights load.
    probe_plan(&args.model, &limits, device, args.dtype.into(), &fetch)
        .check_against(&resolved.defaults, &BTreeMap::new())?;
    let loaded = pipeline::load(&resolved, device, args.dtype.into())?;
    let per_position = loaded.model.new_cache(1)?.bytes_per_position().max(1);
    let config = SchedulerConfig {
        max_seqs: args.max_seqs.max(1),
        max_kv_positions: (KV_BUDGET_BYTES / per_position).max(1),
    };
    let metrics = Arc::new(Metrics::default());
    let (jobs_tx, jobs_rx) = std::sync::mpsc::sync_channel::<Job>(args.max_waiting.max(1));
    let tokenizer = Arc::clone(&loaded.tokenizer);
    let engine = {
        let resolved = Arc::clone(&resolved);
        let metrics = Arc::clone(&metrics);
        std::thread::Builder::new()
            .name("mmllm-engine".into())
            .spawn(move || engine::run(resolved, loaded, config, jobs_rx, metrics))?
    };
    let state = Arc::new(AppState {
        model: args.model.clone(),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        resolved,
        tokenizer,
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        fetch,
        limits,
        device,
        dtype: args.dtype.into(),
        max_request_bytes: args.max_request_bytes,
        in_flight: AtomicUsize::new(0),
        capacity: config.max_seqs + args.max_waiting.max(1),
        draining: AtomicBool::new(false),
        jobs: std::sync::Mutex::new(Some(jobs_tx)),
        metrics,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let grace = Duration::from_secs_f64(args.shutdown_grace.max(0.0));
    let result = runtime.block_on(serve(Arc::clone(&state), &args.host, args.port, grace));
    // No more jobs: the engine finishes what it holds and stops.
    if let Ok(mut jobs) = state.jobs.lock() {
        jobs.take();
    }
    if result.is_ok() {
        let _ = engine.join();
    }
    runtime.shutdown_timeout(Duration::from_millis(100));
    result
}

/// A plan with no media, only to check the server-wide settings against the model.
fn probe_plan(
    model: &str,
    limits: &BTreeMap<crate::media::Modality, usize>,
    device: DeviceChoice,
    dtype: crate::engine::device::DTypeChoice,
    fetch: &FetchPolicy,
) -> Plan {
    Plan {
        model: model.to_string(),
        id: String::new(),
        prompt: String::new(),
        system: None,
        turns: None,
        raw: false,
        chat_template: None,
        media: Vec::new(),
        extra_tensors: Vec::new(),
        limits: limits.clone(),
        frames: FrameSampling::Default,
        as_images: false,
        sample_rate: None,
        kwargs: ProcessorKwargs::default(),
        gen: GenSettings {
            sampling: SamplingParams {
                temperature: 0.0,
                top_p: None,
                top_k: None,
                repetition_penalty: None,
                seed: 0,
            },
            max_tokens: DEFAULT_MAX_TOKENS,
            stop: Vec::new(),
            logprobs: None,
            ignore_eos: false,
        },
        output: OutputFormat::Jsonl,
        device,
        dtype,
        dry_run: false,
        fetch: fetch.clone(),
    }
}

async fn serve(state: Arc<AppState>, host: &str, port: u16, grace: Duration) -> Result<()> {
    let app = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/audio/transcriptions", post(transcriptions))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(Arc::clone(&state), count))
        // Bodies are read with their own limit (an OpenAI-shaped 413); a slow upload may not
        // hold a connection forever.
        .layer(DefaultBodyLimit::disable())
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            Duration::from_secs(60),
        ))
        .with_state(Arc::clone(&state));
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .map_err(|e| Error::usage(format!("--host {host} --port {port}: cannot listen: {e}")))?;
    let addr: SocketAddr = listener.local_addr()?;
    eprintln!(
        "mmllm: serving {} on http://{addr} (OpenAI API at http://{addr}/v1)",
        state.model
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let drain_state = Arc::clone(&state);
    let shutdown = async move {
        wait_for_signal().await;
        eprintln!(
            "mmllm: serve: stopping: no new requests; {} in flight finish (grace {:.0} s)",
            drain_state.in_flight.load(Ordering::Relaxed),
            grace.as_secs_f64()
        );
        drain_state.draining.store(true, Ordering::Relaxed);
        let _ = stop_tx.send(true);
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown);
    let mut stop_rx = stop_rx;
    let deadline = async move {
        while !*stop_rx.borrow() {
            if stop_rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        r = server => r?,
        _ = deadline => {
            eprintln!(
                "mmllm: serve: grace period over with {} request(s) unfinished",
                state.in_flight.load(Ordering::Relaxed)
            );
            return Err(Error::Runtime(anyhow::anyhow!("requests cut at shutdown")));
        }
    }
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Counts every answer by status for `/metrics`.
async fn count(State(state): State<Arc<AppState>>, req: HttpRequest, next: Next) -> Response {
    let response = next.run(req).await;
    state.metrics.request(response.status().as_u16());
    response
}

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut response = (status, axum::Json(e.body())).into_response();
    if e.status == 429 || e.status == 503 {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

async fn not_found() -> Response {
    error_response(&ApiError::new(404, "not_found_error", "no such route").with_code("not_found"))
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Ordering::Relaxed) {
        return error_response(&ApiError::new(503, "service_unavailable", "shutting down"));
    }
    (StatusCode::OK, axum::Json(json!({"status": "ok"}))).into_response()
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(&state.model),
    )
        .into_response()
}

async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&state, &headers) {
        return error_response(&e);
    }
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": state.model,
            "object": "model",
            "created": state.created,
            "owned_by": "mmllm",
            "root": state.resolved.dir.display().to_string(),
            "max_model_len": Value::Null,
        }],
    }))
    .into_response()
}

fn authorize(state: &AppState, headers: &HeaderMap) -> std::result::Result<(), ApiError> {
    let Some(key) = &state.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compare without an early exit, so timing tells nothing about the key.
    let same = given.len() == key.len()
        && given
            .bytes()
            .zip(key.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(ApiError::new(
            401,
            "authentication_error",
            "invalid or missing API key (expected Authorization: Bearer <key>)",
        )
        .with_code("invalid_api_key"))
    }
}

/// One place in the server's capacity, given back when dropped (the answer is complete, or
/// the client left).
struct Slot(Arc<AppState>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn take_slot(state: &Arc<AppState>) -> std::result::Result<Slot, ApiError> {
    if state.draining.load(Ordering::Relaxed) {
        return Err(ApiError::new(
            503,
            "service_unavailable",
            "the server is shutting down",
        ));
    }
    let before = state.in_flight.fetch_add(1, Ordering::Relaxed);
    let slot = Slot(Arc::clone(state));
    if before >= state.capacity {
        return Err(ApiError::new(
            429,
            "rate_limit_error",
            format!(
                "the server is at capacity ({} requests running or queued); retry later",
                state.capacity
            ),
        )
        .with_code("server_busy"));
    }
    Ok(slot)
}

async fn read_body(state: &AppState, body: Body) -> std::result::Result<Bytes, ApiError> {
    axum::body::to_bytes(body, state.max_request_bytes)
        .await
        .map_err(|e| {
            // http-body-util's LengthLimitError: "length limit exceeded".
            let too_large = format!("{e:#}").contains("length limit")
                || std::error::Error::source(&e)
                    .is_some_and(|s| s.to_string().contains("length limit"));
            if too_large {
                ApiError::new(
                    413,
                    "invalid_request_error",
                    format!(
                        "the request body is larger than {} bytes (expected a smaller body; \
                         see --max-request-bytes)",
                        state.max_request_bytes
                    ),
                )
                .with_code("request_too_large")
            } else {
                ApiError::bad("", format!("cannot read the request body: {e}"))
            }
        })
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match chat(state, headers, body).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

async fn chat(
    state: Arc<AppState>,
    headers: HeaderMap,
    body: Body,
) -> std::result::Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let slot = take_slot(&state)?;
    let body = read_body(&state, body).await?;
    let req = openai::parse_chat_request(&body)?;
    if req.model != state.model {
        return Err(ApiError::new(
            404,
            "not_found_error",
            format!(
                "The model `{}` does not exist (expected {})",
                req.model, state.model
            ),
        )
        .with_code("model_not_found"));
    }
    let (plan, names) = plan_for(&state, &req)?;
    // Limits first, then fetch and decode off the async threads.
    let work_state = Arc::clone(&state);
    let decode_names = names.clone();
    let prepared = tokio::task::spawn_blocking(move || {
        pipeline::prepare_media(&plan, &work_state.resolved, &mut std::io::empty())
            .map(|media| (plan, media))
            .map_err(|e| api_error(e, &decode_names))
    })
    .await
    .map_err(|e| ApiError::new(500, "internal_error", format!("media task failed: {e}")))??;
    let (plan, media) = prepared;
    let mut rx = submit(&state, plan, media)?;
    let id = format!("chatcmpl-{:016x}", rand::random::<u64>());
    if req.stream {
        // Wait for the first message so that a request that fails before its first token
        // (media the model refuses, a prompt too long) gets its 4xx status, not a stream.
        let first = rx.recv().await;
        if let Some(Msg::Done(Err(e))) = &first {
            return Err(api_error(clone_error(e), &names));
        }
        return Ok(stream_response(state, slot, req, id, first, rx));
    }
    let completion = loop {
        match rx.recv().await {
            Some(Msg::Done(result)) => break result.map_err(|e| api_error(e, &names))?,
            Some(Msg::Event(_)) => {}
            None => {
                return Err(ApiError::new(
                    500,
                    "internal_error",
                    "the engine dropped the request",
                ))
            }
        }
    };
    drop(slot);
    record(&state, &completion);
    Ok(axum::Json(completion_body(&state, &req, &id, &completion)).into_response())
}

/// `POST /v1/audio/transcriptions` (OpenAI's audio API, multipart) for Whisper models: the
/// same request `mmllm audio --model whisper FILE [LANGUAGE]` builds, greedy unless a
/// temperature is given.
async fn transcriptions(State(state): State<Arc<AppState>>, req: HttpRequest) -> Response {
    match transcribe(state, req).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

async fn transcribe(
    state: Arc<AppState>,
    req: HttpRequest,
) -> std::result::Result<Response, ApiError> {
    use axum::extract::FromRequest;
    authorize(&state, req.headers())?;
    if state.resolved.defaults.family != "whisper" {
        return Err(ApiError::bad(
            "model",
            format!(
                "{} ({}) does not transcribe (expected a Whisper model)",
                state.model, state.resolved.defaults.family
            ),
        ));
    }
    let slot = take_slot(&state)?;
    let (parts, body) = req.into_parts();
    let bytes = read_body(&state, body).await?;
    let req = HttpRequest::from_parts(parts, Body::from(bytes));
    let mut form = axum::extract::Multipart::from_request(req, &())
        .await
        .map_err(|e| ApiError::bad("", format!("expected a multipart/form-data body: {e}")))?;
    let mut file = None;
    let mut fields = BTreeMap::new();
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(ApiError::bad("", format!("malformed multipart body: {e}"))),
        };
        let name = field.name().unwrap_or("").to_string();
        let data = field
            .bytes()
            .await
            .map_err(|e| ApiError::bad(&name, format!("cannot read the field: {e}")))?;
        if name == "file" {
            file = Some(data.to_vec());
        } else {
            let text = String::from_utf8(data.to_vec())
                .map_err(|_| ApiError::bad(&name, "not UTF-8 text"))?;
            fields.insert(name, text);
        }
    }
    let file = file.ok_or_else(|| ApiError::bad("file", "missing (expected the audio file)"))?;
    match fields.get("model") {
        Some(m) if *m == state.model => {}
        other => {
            return Err(ApiError::new(
                404,
                "not_found_error",
                format!(
                    "The model `{}` does not exist (expected {})",
                    other.map(String::as_str).unwrap_or(""),
                    state.model
                ),
            )
            .with_code("model_not_found"))
        }
    }
    let format = fields.get("response_format").map_or("json", String::as_str);
    if !matches!(format, "json" | "text") {
        return Err(ApiError::bad(
            "response_format",
            format!("{format:?} (expected json or text)"),
        ));
    }
    let temperature = match fields.get("temperature") {
        None => 0.0,
        Some(t) => t
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|t| t.is_finite() && *t >= 0.0)
            .ok_or_else(|| ApiError::bad("temperature", format!("{t:?} (expected a number)")))?,
    };
    let mut plan = probe_plan(
        &state.model,
        &state.limits,
        state.device,
        state.dtype,
        &state.fetch,
    );
    // Whisper's prompt text is its task and language, as on the command line.
    plan.prompt = fields.get("language").cloned().unwrap_or_default();
    plan.gen.sampling.temperature = temperature;
    plan.media.push(MediaArg {
        source: Source::DataUrl {
            mime: "audio/*".into(),
            bytes: file,
        },
        kind: super::plan::InputKind::Media(crate::media::Modality::Audio),
    });
    let names = vec![(plan.media[0].source.display(), "file".to_string())];
    let completion = run_plan(&state, plan, &names).await?;
    drop(slot);
    record(&state, &completion);
    if format == "text" {
        return Ok(completion.text.into_response());
    }
    Ok(axum::Json(json!({"text": completion.text})).into_response())
}

/// Decodes a plan's media off the async threads, runs it on the engine and waits for the end.
async fn run_plan(
    state: &Arc<AppState>,
    plan: Plan,
    names: &[(String, String)],
) -> std::result::Result<Completion, ApiError> {
    let work_state = Arc::clone(state);
    let decode_names = names.to_vec();
    let (plan, media) = tokio::task::spawn_blocking(move || {
        pipeline::prepare_media(&plan, &work_state.resolved, &mut std::io::empty())
            .map(|media| (plan, media))
            .map_err(|e| api_error(e, &decode_names))
    })
    .await
    .map_err(|e| ApiError::new(500, "internal_error", format!("media task failed: {e}")))??;
    let mut rx = submit(state, plan, media)?;
    loop {
        match rx.recv().await {
            Some(Msg::Done(result)) => return result.map_err(|e| api_error(e, names)),
            Some(Msg::Event(_)) => {}
            None => {
                return Err(ApiError::new(
                    500,
                    "internal_error",
                    "the engine dropped the request",
                ))
            }
        }
    }
}

/// Queues a prepared request for the engine; the receiving end of its reply channel.
fn submit(
    state: &AppState,
    plan: Plan,
    media: Vec<crate::app::plan::MediaInput>,
) -> std::result::Result<UnboundedReceiver<Msg>, ApiError> {
    let (reply, rx) = unbounded_channel();
    let jobs = state.jobs.lock().ok();
    match jobs.as_ref().and_then(|j| j.as_ref()) {
        Some(jobs) => jobs
            .try_send(Job { plan, media, reply })
            .map_err(|e| match e {
                std::sync::mpsc::TrySendError::Full(_) => ApiError::new(
                    429,
                    "rate_limit_error",
                    "the engine's queue is full; retry later",
                )
                .with_code("server_busy"),
                std::sync::mpsc::TrySendError::Disconnected(_) => {
                    ApiError::new(503, "service_unavailable", "the engine has stopped")
                }
            })?,
        None => return Err(ApiError::new(503, "service_unavailable", "shutting down")),
    }
    state.metrics.waiting.fetch_add(1, Ordering::Relaxed);
    Ok(rx)
}

fn record(state: &AppState, c: &Completion) {
    state
        .metrics
        .finished(c.prompt_tokens, c.token_ids.len(), c.ttft_s, c.total_s);
}

/// Errors are not `Clone`; the message is what travels.
fn clone_error(e: &Error) -> Error {
    match e {
        Error::Usage(m) => Error::Usage(m.clone()),
        Error::Input {
            input,
            problem,
            expected,
        } => Error::input(input, problem, expected),
        Error::Runtime(r) => Error::Runtime(anyhow::anyhow!("{r:#}")),
    }
}

/// A pipeline error as an API error: input and usage errors are 400s naming the part
/// (`names` maps each media input's display name to its JSON path).
fn api_error(e: Error, names: &[(String, String)]) -> ApiError {
    match e {
        Error::Input {
            input,
            problem,
            expected,
        } => {
            let param = names
                .iter()
                .find(|(shown, _)| input.starts_with(shown.as_str()))
                .map(|(_, p)| p.clone());
            let text = format!("{input}: {problem} (expected {expected})");
            match param {
                Some(p) => ApiError::bad(p, text),
                None => ApiError::bad("", text),
            }
        }
        Error::Usage(m) => ApiError::bad("", m),
        Error::Runtime(r) => {
            eprintln!("mmllm: serve: request failed: {r:#}");
            ApiError::new(500, "internal_error", format!("{r:#}"))
        }
    }
}

/// The request as the plan the CLI would build for the same inputs, and each media part's
/// (display name, JSON path) for error messages.
fn plan_for(
    state: &AppState,
    req: &ChatRequest,
) -> std::result::Result<(Plan, Vec<(String, String)>), ApiError> {
    let mut plan = probe_plan(
        &state.model,
        &state.limits,
        state.device,
        state.dtype,
        &state.fetch,
    );
    let mut turns = Vec::with_capacity(req.messages.len());
    let mut names = Vec::new();
    let mut last_user_text = String::new();
    for m in &req.messages {
        let mut parts = Vec::with_capacity(m.parts.len());
        let mut texts = Vec::new();
        for p in &m.parts {
            match p {
                Part::Text(t) => {
                    texts.push(t.as_str());
                    parts.push(TurnPart::Text(t.clone()));
                }
                Part::Media {
                    param,
                    kind,
                    source,
                    extra,
                } => {
                    let source = match source {
                        MediaRef::Url(url) => media_source(url, &state.fetch)
                            .map_err(|e| api_error(e, &[(url_prefix(url), param.clone())]))?,
                        MediaRef::Bytes { mime, bytes } => Source::DataUrl {
                            mime: mime.clone(),
                            bytes: bytes.clone(),
                        },
                    };
                    for (name, bytes) in extra {
                        plan.extra_tensors.push((
                            name.clone(),
                            Source::DataUrl {
                                mime: "application/octet-stream".into(),
                                bytes: bytes.clone(),
                            },
                        ));
                    }
                    names.push((source.display(), param.clone()));
                    plan.media.push(MediaArg {
                        source,
                        kind: *kind,
                    });
                    parts.push(TurnPart::Media);
                }
            }
        }
        if m.role == "user" {
            last_user_text = texts.join("\n");
        }
        turns.push(Turn {
            role: m.role.clone(),
            parts,
        });
    }
    let max_prompt = crate::media::env_u64("MMLLM_MAX_PROMPT_BYTES")
        .ok()
        .flatten()
        .unwrap_or(super::plan::DEFAULT_MAX_PROMPT_BYTES);
    let text_bytes: usize = turns
        .iter()
        .flat_map(|t| &t.parts)
        .map(|p| match p {
            TurnPart::Text(t) => t.len(),
            TurnPart::Media => 0,
        })
        .sum();
    if text_bytes as u64 > max_prompt {
        return Err(ApiError::bad(
            "messages",
            format!("{text_bytes} bytes of text (expected at most {max_prompt})"),
        ));
    }
    plan.prompt = last_user_text;
    plan.turns = Some(turns);
    let p = &req.params;
    plan.gen = GenSettings {
        sampling: SamplingParams {
            // OpenAI's default temperature is 1; pass 0 for greedy decoding.
            temperature: p.temperature.unwrap_or(1.0),
            top_p: p.top_p,
            top_k: p.top_k.map(|k| k as usize),
            repetition_penalty: p.repetition_penalty.map(|r| r as f32),
            seed: p.seed.unwrap_or_else(rand::random),
        },
        max_tokens: p.max_tokens.map_or(DEFAULT_MAX_TOKENS, |n| n as usize),
        stop: p.stop.clone(),
        logprobs: p.logprobs,
        ignore_eos: p.ignore_eos,
    };
    plan.gen
        .sampling
        .validate()
        .map_err(|e| ApiError::bad("", e.to_string()))?;
    // Counts, embeds and settings against the model, before any fetch.
    plan.check_against(&state.resolved.defaults, &plan.item_counts(None))
        .map_err(|e| api_error(e, &names))?;
    Ok((plan, names))
}

fn url_prefix(url: &str) -> String {
    url.chars().take(40).collect()
}

/// Where a media URL of a request points: http(s) and `data:` as on the command line,
/// `file://` only below `--allowed-local-media-path`; anything else is refused.
fn media_source(url: &str, fetch: &FetchPolicy) -> Result<Source> {
    let lower: String = url.chars().take(8).collect::<String>().to_ascii_lowercase();
    if lower.starts_with("file://") {
        return Ok(Source::Path(fetch.local_file(url)?));
    }
    if lower.starts_with("http://") || lower.starts_with("https://") || lower.starts_with("data:") {
        return Source::parse(url);
    }
    Err(Error::input(
        url_prefix(url),
        "unsupported URL",
        "an http(s)://, data: or (below --allowed-local-media-path) file:// URL",
    ))
}

fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage(c: &Completion) -> Value {
    json!({
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.token_ids.len(),
        "total_tokens": c.prompt_tokens + c.token_ids.len(),
    })
}

/// OpenAI's `logprobs.content`: per token its text, bytes, log-probability and alternatives.
fn logprobs_json(tokenizer: &Tokenizer, c: &Completion) -> Value {
    let Some(list) = &c.logprobs else {
        return Value::Null;
    };
    let entry = |id: u32, logprob: f32| {
        let text = tokenizer.decode(&[id], false).unwrap_or_default();
        json!({
            "token": text,
            "logprob": logprob,
            "bytes": text.as_bytes(),
            "token_id": id,
        })
    };
    let content: Vec<Value> = list
        .iter()
        .map(|t| {
            let mut e = entry(t.token_id, t.logprob);
            e["top_logprobs"] = t.top.iter().map(|a| entry(a.token_id, a.logprob)).collect();
            e
        })
        .collect();
    json!({ "content": content })
}

fn completion_body(state: &AppState, req: &ChatRequest, id: &str, c: &Completion) -> Value {
    let mut choice = json!({
        "index": 0,
        "message": {"role": "assistant", "content": c.text},
        "logprobs": logprobs_json(&state.tokenizer, c),
        "finish_reason": finish_reason(c.finish_reason),
    });
    if req.return_token_ids {
        choice["token_ids"] = json!(c.token_ids);
    }
    json!({
        "id": id,
        "object": "chat.completion",
        "created": unix_now(),
        "model": state.model,
        "choices": [choice],
        "usage": usage(c),
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Server-sent events in OpenAI's chunk format: a first chunk with the role, one per piece of
/// text, a last one with `finish_reason` (and the logprobs), the usage chunk when asked, then
/// `[DONE]`. Dropping the stream (the client left) closes the channel and cancels the sequence.
fn stream_response(
    state: Arc<AppState>,
    slot: Slot,
    req: ChatRequest,
    id: String,
    first: Option<Msg>,
    rx: UnboundedReceiver<Msg>,
) -> Response {
    struct Stream {
        state: Arc<AppState>,
        _slot: Slot,
        req: ChatRequest,
        id: String,
        created: u64,
        pending: Option<Msg>,
        rx: UnboundedReceiver<Msg>,
        sent_role: bool,
        finished: bool,
    }
    let chunk = |s: &Stream, delta: Value, finish: Value, extra: Option<(&str, Value)>| {
        let mut choice =
            json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish});
        if let Some((k, v)) = extra {
            choice[k] = v;
        }
        let mut body = json!({
            "id": s.id,
            "object": "chat.completion.chunk",
            "created": s.created,
            "model": s.state.model,
            "choices": [choice],
        });
        if s.req.include_usage {
            body["usage"] = Value::Null;
        }
        sse(&body)
    };
    let init = Stream {
        state,
        _slot: slot,
        req,
        id,
        created: unix_now(),
        pending: first,
        rx,
        sent_role: false,
        finished: false,
    };
    let stream = futures_util::stream::unfold(init, move |mut s| async move {
        if s.finished {
            return None;
        }
        if !s.sent_role {
            s.sent_role = true;
            let out = chunk(
                &s,
                json!({"role": "assistant", "content": ""}),
                Value::Null,
                None,
            );
            return Some((Ok::<_, Infallible>(out), s));
        }
        let msg = match s.pending.take() {
            Some(m) => Some(m),
            None => s.rx.recv().await,
        };
        let out = match msg {
            Some(Msg::Event(Event::Text(t))) => chunk(&s, json!({"content": t}), Value::Null, None),
            Some(Msg::Event(Event::Started { .. })) => Bytes::new(),
            Some(Msg::Done(Ok(c))) => {
                s.finished = true;
                record(&s.state, &c);
                let mut out = Vec::new();
                let mut extra = vec![];
                if c.logprobs.is_some() {
                    extra.push(("logprobs", logprobs_json(&s.state.tokenizer, &c)));
                }
                if s.req.return_token_ids {
                    extra.push(("token_ids", json!(c.token_ids)));
                }
                let mut last = chunk(&s, json!({}), json!(finish_reason(c.finish_reason)), None);
                if !extra.is_empty() {
                    // Re-render with the extras on the choice.
                    let mut v: Value =
                        serde_json::from_slice(last.strip_prefix(b"data: ").unwrap_or(&last))
                            .unwrap_or(Value::Null);
                    for (k, e) in extra {
                        v["choices"][0][k] = e;
                    }
                    last = sse(&v);
                }
                out.extend_from_slice(&last);
                if s.req.include_usage {
                    let body = json!({
                        "id": s.id,
                        "object": "chat.completion.chunk",
                        "created": s.created,
                        "model": s.state.model,
                        "choices": [],
                        "usage": usage(&c),
                    });
                    out.extend_from_slice(&sse(&body));
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                Bytes::from(out)
            }
            Some(Msg::Done(Err(e))) => {
                s.finished = true;
                let mut out = sse(&api_error(e, &[]).body()).to_vec();
                out.extend_from_slice(b"data: [DONE]\n\n");
                Bytes::from(out)
            }
            None => {
                s.finished = true;
                Bytes::from_static(b"data: [DONE]\n\n")
            }
        };
        Some((Ok(out), s))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn sse(v: &Value) -> Bytes {
    let mut out = b"data: ".to_vec();
    out.extend_from_slice(v.to_string().as_bytes());
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}
