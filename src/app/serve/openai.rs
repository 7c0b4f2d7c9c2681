//! The OpenAI Chat Completions wire format: parsing a request body into a checked
//! [`ChatRequest`] (every problem a 400 naming the offending part, e.g.
//! `messages[1].content[0].image_url.url`), errors in OpenAI's shape, and the JSON of
//! responses and stream chunks. Pure: no I/O, no model; [`parse_chat_request`] is what a fuzz
//! target calls.

use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::app::plan::InputKind;
use crate::media::Modality;

/// An error as OpenAI sends it: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn bad(param: impl Into<String>, message: impl Into<String>) -> Self {
        let param = param.into();
        let message = message.into();
        Self {
            status: 400,
            message: if param.is_empty() {
                message
            } else {
                format!("{param}: {message}")
            },
            kind: "invalid_request_error",
            param: (!param.is_empty()).then_some(param),
            code: None,
        }
    }

    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// Where a media part's bytes are.
#[derive(Debug, Clone, PartialEq)]
pub enum MediaRef {
    /// `http(s)://`, `data:` or `file://` as the client wrote it.
    Url(String),
    /// Inline bytes (`input_audio`, `image_embeds`).
    Bytes { mime: String, bytes: Vec<u8> },
}

/// One content part of a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Text(String),
    Media {
        /// The JSON path errors name.
        param: String,
        kind: InputKind,
        source: MediaRef,
        /// Further tensors for embeds (`image_grid_thw`, `image_sizes`), serialized.
        extra: Vec<(String, Vec<u8>)>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (`developer` is read as `system`).
    pub role: String,
    pub parts: Vec<Part>,
}

/// Generation parameters, checked for range and type (not yet against a model).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Params {
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<u64>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// `logprobs: true`, with `top_logprobs` alternatives (0 to 20).
    pub logprobs: Option<usize>,
    pub ignore_eos: bool,
}

/// A parsed chat completion request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub params: Params,
    pub stream: bool,
    pub include_usage: bool,
    /// vLLM's extension: also return the generated token ids (`choices[0].token_ids`).
    pub return_token_ids: bool,
}

/// Most messages and content parts one request may hold (each is cheap; the cap keeps a
/// hostile body from costing more than its size).
const MAX_MESSAGES: usize = 4096;
const MAX_STOP: usize = 16;

/// Parses and checks a `POST /v1/chat/completions` body.
pub fn parse_chat_request(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad("", format!("the body is not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(ApiError::bad("", "the body must be a JSON object"));
    };
    let model = match obj.get("model") {
        Some(Value::String(m)) => m.clone(),
        _ => {
            return Err(ApiError::bad(
                "model",
                "missing (expected the model id as a string)",
            ))
        }
    };
    for unsupported in ["tools", "functions", "tool_choice", "response_format"] {
        if obj.get(unsupported).is_some_and(|v| !v.is_null()) {
            return Err(ApiError::bad(
                unsupported,
                "is not supported by this server (expected it absent)",
            ));
        }
    }
    if let Some(n) = obj.get("n").filter(|v| !v.is_null()) {
        if n.as_u64() != Some(1) {
            return Err(ApiError::bad(
                "n",
                format!("{n}: only one choice per request is supported (expected n = 1)"),
            ));
        }
    }
    for penalty in ["presence_penalty", "frequency_penalty"] {
        if let Some(v) = obj.get(penalty).filter(|v| !v.is_null()) {
            if v.as_f64() != Some(0.0) {
                return Err(ApiError::bad(
                    penalty,
                    format!("{v}: not supported (expected 0; repetition_penalty is)"),
                ));
            }
        }
    }
    if obj
        .get("logit_bias")
        .is_some_and(|v| v.as_object().is_some_and(|m| !m.is_empty()))
    {
        return Err(ApiError::bad(
            "logit_bias",
            "not supported (expected it absent)",
        ));
    }
    let messages = match obj.get("messages") {
        Some(Value::Array(list)) if !list.is_empty() => {
            if list.len() > MAX_MESSAGES {
                return Err(ApiError::bad(
                    "messages",
                    format!("{} messages (expected at most {MAX_MESSAGES})", list.len()),
                ));
            }
            list.iter()
                .enumerate()
                .map(|(i, m)| parse_message(m, &format!("messages[{i}]")))
                .collect::<Result<Vec<_>, _>>()?
        }
        _ => {
            return Err(ApiError::bad(
                "messages",
                "missing or empty (expected a list of messages)",
            ))
        }
    };
    if !messages.iter().any(|m| m.role == "user") {
        return Err(ApiError::bad(
            "messages",
            "no user message (expected at least one)",
        ));
    }
    let embeds_messages = messages
        .iter()
        .filter(|m| {
            m.parts.iter().any(|p| {
                matches!(
                    p,
                    Part::Media {
                        kind: InputKind::Embeds(_),
                        ..
                    }
                )
            })
        })
        .count();
    if embeds_messages > 1 {
        return Err(ApiError::bad(
            "messages",
            "image_embeds in more than one message (expected them in one message at most)",
        ));
    }
    let stream = opt_bool(&obj, "stream")?.unwrap_or(false);
    let include_usage = match obj.get("stream_options").filter(|v| !v.is_null()) {
        None => false,
        Some(Value::Object(o)) => opt_bool(o, "include_usage")
            .map_err(|e| ApiError::bad("stream_options.include_usage", e.message))?
            .unwrap_or(false),
        Some(_) => return Err(ApiError::bad("stream_options", "expected an object")),
    };
    if include_usage && !stream {
        return Err(ApiError::bad(
            "stream_options",
            "only allowed with stream: true",
        ));
    }
    Ok(ChatRequest {
        model,
        messages,
        params: parse_params(&obj)?,
        stream,
        include_usage,
        return_token_ids: opt_bool(&obj, "return_token_ids")?.unwrap_or(false),
    })
}

fn parse_params(obj: &Map<String, Value>) -> Result<Params, ApiError> {
    let max_completion = opt_u64(obj, "max_completion_tokens")?;
    let max_tokens = opt_u64(obj, "max_tokens")?;
    let (max_tokens, name) = match (max_completion, max_tokens) {
        (Some(n), _) => (Some(n), "max_completion_tokens"),
        (None, n) => (n, "max_tokens"),
    };
    if max_tokens == Some(0) {
        return Err(ApiError::bad(name, "0 (expected at least 1)"));
    }
    let temperature = opt_f64(obj, "temperature")?;
    if temperature.is_some_and(|t| !(0.0..=100.0).contains(&t)) {
        return Err(ApiError::bad(
            "temperature",
            "out of range (expected 0 to 2)",
        ));
    }
    let top_p = opt_f64(obj, "top_p")?;
    if top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        return Err(ApiError::bad(
            "top_p",
            "out of range (expected 0 < top_p <= 1)",
        ));
    }
    let top_k = match obj.get("top_k").filter(|v| !v.is_null()) {
        None => None,
        Some(v) => match v.as_i64() {
            // vLLM: -1 (and 0) turn it off.
            Some(-1) | Some(0) => None,
            Some(k) if k > 0 => Some(k as u64),
            _ => {
                return Err(ApiError::bad(
                    "top_k",
                    format!("{v} (expected a positive integer, or -1 for all tokens)"),
                ))
            }
        },
    };
    let repetition_penalty = opt_f64(obj, "repetition_penalty")?;
    if repetition_penalty.is_some_and(|p| !(p > 0.0 && p.is_finite())) {
        return Err(ApiError::bad(
            "repetition_penalty",
            "out of range (expected a positive number)",
        ));
    }
    let seed = match obj.get("seed").filter(|v| !v.is_null()) {
        None => None,
        // OpenAI takes any 64-bit integer; negative ones map onto the same 64 bits.
        Some(v) => Some(
            v.as_u64()
                .or(v.as_i64().map(|s| s as u64))
                .ok_or_else(|| ApiError::bad("seed", format!("{v} (expected an integer)")))?,
        ),
    };
    let stop = match obj.get("stop").filter(|v| !v.is_null()) {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(list)) if list.len() <= MAX_STOP => list
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::bad("stop", "expected a string or a list of strings"))?,
        Some(_) => {
            return Err(ApiError::bad(
                "stop",
                format!("expected a string or a list of at most {MAX_STOP} strings"),
            ))
        }
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::bad(
            "stop",
            "an empty string (expected some text)",
        ));
    }
    let logprobs = opt_bool(obj, "logprobs")?.unwrap_or(false);
    let top = opt_u64(obj, "top_logprobs")?;
    if top.is_some_and(|n| n > 20) {
        return Err(ApiError::bad(
            "top_logprobs",
            "out of range (expected 0 to 20)",
        ));
    }
    if top.is_some() && !logprobs {
        return Err(ApiError::bad(
            "top_logprobs",
            "given without logprobs (expected logprobs: true with it)",
        ));
    }
    Ok(Params {
        max_tokens,
        temperature,
        top_p,
        top_k,
        repetition_penalty,
        seed,
        stop,
        logprobs: logprobs.then_some(top.unwrap_or(0) as usize),
        ignore_eos: opt_bool(obj, "ignore_eos")?.unwrap_or(false),
    })
}

fn opt_bool(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(ApiError::bad(key, format!("{v} (expected true or false)"))),
    }
}

fn opt_u64(obj: &Map<String, Value>, key: &str) -> Result<Option<u64>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| ApiError::bad(key, format!("{v} (expected a non-negative integer)"))),
    }
}

fn opt_f64(obj: &Map<String, Value>, key: &str) -> Result<Option<f64>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| ApiError::bad(key, format!("{v} (expected a number)"))),
    }
}

fn parse_message(m: &Value, at: &str) -> Result<ChatMessage, ApiError> {
    let Value::Object(obj) = m else {
        return Err(ApiError::bad(at, "expected a message object"));
    };
    let role = match obj.get("role").and_then(Value::as_str) {
        Some("system" | "developer") => "system",
        Some("user") => "user",
        Some("assistant") => "assistant",
        Some(other) => {
            return Err(ApiError::bad(
                format!("{at}.role"),
                format!("{other:?} (expected system, user or assistant)"),
            ))
        }
        None => return Err(ApiError::bad(format!("{at}.role"), "missing")),
    };
    let parts = match obj.get("content") {
        Some(Value::String(s)) => vec![Part::Text(s.clone())],
        Some(Value::Null) | None if role == "assistant" => Vec::new(),
        Some(Value::Array(list)) => {
            if list.len() > MAX_MESSAGES {
                return Err(ApiError::bad(
                    format!("{at}.content"),
                    format!("{} parts (expected at most {MAX_MESSAGES})", list.len()),
                ));
            }
            list.iter()
                .enumerate()
                .map(|(i, p)| parse_part(p, &format!("{at}.content[{i}]")))
                .collect::<Result<Vec<_>, _>>()?
        }
        _ => {
            return Err(ApiError::bad(
                format!("{at}.content"),
                "expected a string or a list of content parts",
            ))
        }
    };
    if role != "user" {
        if let Some(Part::Media { param, .. }) =
            parts.iter().find(|p| matches!(p, Part::Media { .. }))
        {
            return Err(ApiError::bad(
                param.clone(),
                format!("media in a {role} message (expected media in user messages only)"),
            ));
        }
    }
    Ok(ChatMessage {
        role: role.to_string(),
        parts,
    })
}

fn parse_part(p: &Value, at: &str) -> Result<Part, ApiError> {
    let Value::Object(obj) = p else {
        return Err(ApiError::bad(at, "expected a content part object"));
    };
    let kind = obj.get("type").and_then(Value::as_str).unwrap_or("");
    let url_of = |key: &str, modality: Modality| -> Result<Part, ApiError> {
        let param = format!("{at}.{key}.url");
        // `{"url": "..."}`, or the URL as a plain string (vLLM accepts both).
        let url = match obj.get(key) {
            Some(Value::String(u)) => u.as_str(),
            Some(Value::Object(o)) => o.get("url").and_then(Value::as_str).unwrap_or(""),
            _ => "",
        };
        if url.is_empty() {
            return Err(ApiError::bad(param, "missing (expected a URL)"));
        }
        Ok(Part::Media {
            param,
            kind: InputKind::Media(modality),
            source: MediaRef::Url(url.to_string()),
            extra: Vec::new(),
        })
    };
    match kind {
        "text" => match obj.get("text") {
            Some(Value::String(t)) => Ok(Part::Text(t.clone())),
            _ => Err(ApiError::bad(
                format!("{at}.text"),
                "missing (expected a string)",
            )),
        },
        "image_url" => url_of("image_url", Modality::Image),
        "video_url" => url_of("video_url", Modality::Video),
        "audio_url" => url_of("audio_url", Modality::Audio),
        "input_audio" => {
            let param = format!("{at}.input_audio");
            let Some(Value::Object(a)) = obj.get("input_audio") else {
                return Err(ApiError::bad(param, "missing (expected {data, format})"));
            };
            let format = a.get("format").and_then(Value::as_str).unwrap_or("");
            if !matches!(format, "wav" | "mp3" | "flac" | "ogg" | "m4a") {
                return Err(ApiError::bad(
                    format!("{param}.format"),
                    format!("{format:?} (expected wav, mp3, flac, ogg or m4a)"),
                ));
            }
            let data = a.get("data").and_then(Value::as_str).unwrap_or("");
            let bytes = decode_base64(data, &format!("{param}.data"))?;
            Ok(Part::Media {
                param,
                kind: InputKind::Media(Modality::Audio),
                source: MediaRef::Bytes {
                    mime: format!("audio/{format}"),
                    bytes,
                },
                extra: Vec::new(),
            })
        }
        "image_embeds" => {
            let param = format!("{at}.image_embeds");
            let (main, extra) = match obj.get("image_embeds") {
                Some(Value::String(b64)) => (decode_base64(b64, &param)?, Vec::new()),
                Some(Value::Object(o)) => {
                    let mut main = None;
                    let mut extra = Vec::new();
                    for (key, value) in o {
                        let at_key = format!("{param}.{key}");
                        let Some(b64) = value.as_str() else {
                            return Err(ApiError::bad(at_key, "expected a base64 string"));
                        };
                        match key.as_str() {
                            "image_embeds" => main = Some(decode_base64(b64, &at_key)?),
                            "image_grid_thw" | "image_sizes" => {
                                extra.push((key.clone(), decode_base64(b64, &at_key)?))
                            }
                            _ => {
                                return Err(ApiError::bad(
                                    at_key,
                                    "unknown key (expected image_embeds, image_grid_thw or \
                                     image_sizes)",
                                ))
                            }
                        }
                    }
                    let main = main
                        .ok_or_else(|| ApiError::bad(format!("{param}.image_embeds"), "missing"))?;
                    (main, extra)
                }
                _ => {
                    return Err(ApiError::bad(
                        param,
                        "expected base64 of a serialized tensor, or an object with image_embeds",
                    ))
                }
            };
            Ok(Part::Media {
                param,
                kind: InputKind::Embeds(Modality::Image),
                source: MediaRef::Bytes {
                    mime: "application/octet-stream".into(),
                    bytes: main,
                },
                extra,
            })
        }
        "" => Err(ApiError::bad(format!("{at}.type"), "missing")),
        other => Err(ApiError::bad(
            format!("{at}.type"),
            format!(
                "unknown content type {other:?} (expected text, image_url, video_url, \
                 input_audio, audio_url or image_embeds)"
            ),
        )),
    }
}

fn decode_base64(data: &str, param: &str) -> Result<Vec<u8>, ApiError> {
    if data.is_empty() {
        return Err(ApiError::bad(param, "empty (expected base64 data)"));
    }
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let compact: Vec<u8> = data.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    engine
        .decode(compact)
        .map_err(|e| ApiError::bad(param, format!("invalid base64 ({e})")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> ApiError {
        parse_chat_request(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn parts_and_params() {
        let r = parse_chat_request(
            br#"{"model":"m","messages":[
                {"role":"system","content":"be brief"},
                {"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x.org/a.png"}},
                                           {"type":"text","text":"what?"}]}],
                "max_tokens":5,"stop":"\n","logprobs":true,"top_logprobs":3,"seed":-1}"#,
        )
        .unwrap();
        assert_eq!(r.messages.len(), 2);
        assert_eq!(r.params.max_tokens, Some(5));
        assert_eq!(r.params.stop, vec!["\n".to_string()]);
        assert_eq!(r.params.logprobs, Some(3));
        assert_eq!(r.params.seed, Some(u64::MAX));
        assert!(matches!(&r.messages[1].parts[0], Part::Media { param, .. }
            if param == "messages[1].content[0].image_url.url"));
    }

    #[test]
    fn errors_name_the_part() {
        let e = err(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"picture"}]}]}"#);
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0].type"));
        assert!(e.message.contains("picture"), "{}", e.message);
        let e = err(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":2}"#);
        assert_eq!(e.param.as_deref(), Some("n"));
        let e = err(r#"{"model":"m","messages":[{"role":"user","content":[
            {"type":"input_audio","input_audio":{"data":"!!","format":"wav"}}]}]}"#);
        assert_eq!(
            e.param.as_deref(),
            Some("messages[0].content[0].input_audio.data")
        );
        for bad in ["", "[]", "{}", r#"{"model":"m","messages":[]}"#, "\u{0}"] {
            assert_eq!(err(bad).status, 400, "{bad:?}");
        }
    }
}
