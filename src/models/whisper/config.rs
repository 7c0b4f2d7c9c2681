//! Whisper's `config.json` and `generation_config.json`, parsed once.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::models::common::whisper_encoder::WhisperEncoderConfig;

/// The architecture fields of `config.json`: the encoder's (every key required but
/// `activation_function`) and the decoder's.
#[derive(Debug, Clone, Deserialize)]
pub struct WhisperConfig {
    /// `d_model`, the encoder sizes, `num_mel_bins`, `max_source_positions` and
    /// `activation_function` (shared by the decoder).
    #[serde(flatten)]
    pub encoder: WhisperEncoderConfig,
    pub decoder_layers: usize,
    pub decoder_attention_heads: usize,
    pub decoder_ffn_dim: usize,
    pub vocab_size: usize,
    pub max_target_positions: usize,
    #[serde(default)]
    pub scale_embedding: bool,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub decoder_start_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<Value>,
}

fn default_true() -> bool {
    true
}

impl WhisperConfig {
    pub fn from_value(config: &Value, what: &str) -> Result<Self> {
        let c: Self = serde_json::from_value(config.clone()).map_err(|e| {
            Error::input(
                what,
                format!("not a Whisper config: {e}"),
                "a Whisper config.json",
            )
        })?;
        let e = &c.encoder;
        if e.d_model == 0
            || e.encoder_attention_heads == 0
            || c.decoder_attention_heads == 0
            || !e.d_model.is_multiple_of(e.encoder_attention_heads)
            || !e.d_model.is_multiple_of(c.decoder_attention_heads)
        {
            return Err(Error::input(
                what,
                format!(
                    "d_model {} is not divisible by the attention heads ({}, {})",
                    e.d_model, e.encoder_attention_heads, c.decoder_attention_heads
                ),
                "d_model a multiple of encoder/decoder_attention_heads",
            ));
        }
        if e.activation_function != "gelu" {
            return Err(Error::input(
                what,
                format!("activation_function {:?}", e.activation_function),
                "\"gelu\" (the only activation Whisper checkpoints use)",
            ));
        }
        Ok(c)
    }
}

/// Transcribe in the spoken language, or translate into English (multilingual models only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Task {
    #[default]
    Transcribe,
    Translate,
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::Transcribe => "transcribe",
            Task::Translate => "translate",
        }
    }
}

/// The decoding fields of `generation_config.json` (falling back to `config.json`).
#[derive(Debug, Clone, Default)]
pub struct GenerationConfig {
    pub decoder_start_token_id: u32,
    pub eos_token_ids: Vec<u32>,
    pub no_timestamps_token_id: Option<u32>,
    /// `(position, token)`; a `None` token means "detect" (multilingual language slot).
    pub forced_decoder_ids: Vec<(usize, Option<u32>)>,
    pub suppress_tokens: Vec<u32>,
    pub begin_suppress_tokens: Vec<u32>,
    pub lang_to_id: BTreeMap<String, u32>,
    pub task_to_id: BTreeMap<String, u32>,
    pub is_multilingual: bool,
}

fn ids(v: Option<&Value>, key: &str, what: &str) -> Result<Vec<u32>> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Number(n)) => Ok(vec![as_id(n.as_u64(), key, what)?]),
        Some(Value::Array(items)) => items.iter().map(|i| as_id(i.as_u64(), key, what)).collect(),
        Some(other) => Err(Error::input(
            what,
            format!("`{key}` is {other}"),
            "a token id or a list of token ids",
        )),
    }
}

fn as_id(v: Option<u64>, key: &str, what: &str) -> Result<u32> {
    v.and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| Error::input(what, format!("`{key}` holds a non-id"), "token ids"))
}

fn id_map(v: Option<&Value>, key: &str, what: &str) -> Result<BTreeMap<String, u32>> {
    match v {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| Ok((k.clone(), as_id(v.as_u64(), key, what)?)))
            .collect(),
        Some(other) => Err(Error::input(
            what,
            format!("`{key}` is {other}"),
            "an object of token ids",
        )),
    }
}

impl GenerationConfig {
    /// `generation` is `generation_config.json` when the model ships one; keys it lacks are
    /// read from `config.json` as transformers does for old checkpoints.
    pub fn from_values(generation: Option<&Value>, config: &Value, what: &str) -> Result<Self> {
        let get = |key: &str| -> Option<&Value> {
            generation
                .and_then(|g| g.get(key))
                .filter(|v| !v.is_null())
                .or_else(|| config.get(key).filter(|v| !v.is_null()))
        };
        let start = ids(
            get("decoder_start_token_id"),
            "decoder_start_token_id",
            what,
        )?;
        let Some(&decoder_start_token_id) = start.first() else {
            return Err(Error::input(
                what,
                "no decoder_start_token_id",
                "decoder_start_token_id in generation_config.json or config.json",
            ));
        };
        let forced_decoder_ids = match get("forced_decoder_ids") {
            None => Vec::new(),
            Some(Value::Array(pairs)) => pairs
                .iter()
                .map(|p| {
                    let pos = p.get(0).and_then(Value::as_u64);
                    let tok = p.get(1);
                    match (pos, tok) {
                        (Some(pos), Some(Value::Null)) => Ok((pos as usize, None)),
                        (Some(pos), Some(t)) => Ok((
                            pos as usize,
                            Some(as_id(t.as_u64(), "forced_decoder_ids", what)?),
                        )),
                        _ => Err(Error::input(
                            what,
                            format!("forced_decoder_ids entry {p}"),
                            "[position, token id or null] pairs",
                        )),
                    }
                })
                .collect::<Result<_>>()?,
            Some(other) => {
                return Err(Error::input(
                    what,
                    format!("forced_decoder_ids is {other}"),
                    "a list of [position, token id] pairs",
                ))
            }
        };
        let lang_to_id = id_map(get("lang_to_id"), "lang_to_id", what)?;
        let is_multilingual = match get("is_multilingual") {
            Some(v) => v.as_bool().unwrap_or(false),
            None => !lang_to_id.is_empty(),
        };
        Ok(Self {
            decoder_start_token_id,
            eos_token_ids: ids(get("eos_token_id"), "eos_token_id", what)?,
            no_timestamps_token_id: ids(
                get("no_timestamps_token_id"),
                "no_timestamps_token_id",
                what,
            )?
            .first()
            .copied(),
            forced_decoder_ids,
            suppress_tokens: ids(get("suppress_tokens"), "suppress_tokens", what)?,
            begin_suppress_tokens: ids(
                get("begin_suppress_tokens"),
                "begin_suppress_tokens",
                what,
            )?,
            lang_to_id,
            task_to_id: id_map(get("task_to_id"), "task_to_id", what)?,
            is_multilingual,
        })
    }

    /// The forced decoder prompt, as `WhisperForConditionalGeneration.generate` builds it
    /// (without timestamps): `<|startoftranscript|>`, then for multilingual models the
    /// language and task tokens, then `<|notimestamps|>`.
    pub fn decoder_prompt(&self, task: Task, language: Option<&str>) -> Result<Vec<u32>> {
        let mut init = vec![self.decoder_start_token_id];
        if !self.is_multilingual {
            if let Some(lang) = language {
                return Err(Error::input(
                    "language",
                    format!("{lang:?} given to an English-only Whisper model"),
                    "no language for .en models",
                ));
            }
            if task == Task::Translate {
                return Err(Error::input(
                    "task",
                    "translate asked of an English-only Whisper model",
                    "transcribe for .en models",
                ));
            }
            // No task or language: the (deprecated) forced_decoder_ids still apply.
            let mut forced = self.forced_decoder_ids.clone();
            forced.sort();
            for (i, (pos, tok)) in forced.iter().enumerate() {
                if *pos != i + 1 {
                    break;
                }
                if let Some(tok) = tok {
                    init.push(*tok);
                }
            }
        } else {
            let Some(lang) = language else {
                return Err(Error::input(
                    "language",
                    "not given for a multilingual Whisper model",
                    "a language code such as en (or detect it with detect_language)",
                ));
            };
            init.push(self.language_id(lang)?);
            let task_id = self.task_to_id.get(task.name()).copied().ok_or_else(|| {
                Error::input(
                    "task",
                    format!("{} is not in this model's task_to_id", task.name()),
                    "a task listed in generation_config.json",
                )
            })?;
            init.push(task_id);
        }
        if let Some(nt) = self.no_timestamps_token_id {
            if init.last() != Some(&nt) {
                init.push(nt);
            }
        }
        Ok(init)
    }

    /// Token id of a language given as a code (`en`) or token (`<|en|>`).
    pub fn language_id(&self, lang: &str) -> Result<u32> {
        let lower = lang.to_ascii_lowercase();
        let token = if lower.starts_with("<|") {
            lower
        } else {
            format!("<|{lower}|>")
        };
        self.lang_to_id.get(&token).copied().ok_or_else(|| {
            let known: Vec<&str> = self
                .lang_to_id
                .keys()
                .map(|k| k.trim_start_matches("<|").trim_end_matches("|>"))
                .collect();
            Error::input(
                "language",
                format!("{lang:?} is not supported by this model"),
                format!("one of {}", known.join(", ")),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn english_only() -> GenerationConfig {
        let gen = json!({
            "decoder_start_token_id": 50257, "eos_token_id": 50256, "no_timestamps_token_id": 50362,
            "forced_decoder_ids": [[1, 50362]], "is_multilingual": false,
            "suppress_tokens": [1, 2], "begin_suppress_tokens": [220, 50256]
        });
        GenerationConfig::from_values(Some(&gen), &json!({}), "generation_config.json").unwrap()
    }

    #[test]
    fn english_only_prompt_follows_forced_decoder_ids() {
        let g = english_only();
        assert_eq!(
            g.decoder_prompt(Task::Transcribe, None).unwrap(),
            vec![50257, 50362]
        );
        assert_eq!(g.eos_token_ids, vec![50256]);
        assert_eq!(g.begin_suppress_tokens, vec![220, 50256]);
        assert_eq!(
            g.decoder_prompt(Task::Translate, None)
                .unwrap_err()
                .exit_code(),
            2
        );
        assert_eq!(
            g.decoder_prompt(Task::Transcribe, Some("en"))
                .unwrap_err()
                .exit_code(),
            2
        );
    }

    #[test]
    fn multilingual_prompt_has_language_and_task() {
        let gen = json!({
            "decoder_start_token_id": 50258, "no_timestamps_token_id": 50363,
            "forced_decoder_ids": [[1, null], [2, 50359]],
            "lang_to_id": {"<|en|>": 50259, "<|fr|>": 50265},
            "task_to_id": {"transcribe": 50359, "translate": 50358}
        });
        // eos only in config.json: read from there, as transformers falls back.
        let cfg = json!({"eos_token_id": 50257});
        let g = GenerationConfig::from_values(Some(&gen), &cfg, "g").unwrap();
        assert!(g.is_multilingual);
        assert_eq!(g.eos_token_ids, vec![50257]);
        assert_eq!(
            g.decoder_prompt(Task::Transcribe, Some("FR")).unwrap(),
            vec![50258, 50265, 50359, 50363]
        );
        assert_eq!(
            g.decoder_prompt(Task::Translate, Some("<|en|>")).unwrap(),
            vec![50258, 50259, 50358, 50363]
        );
        let err = g.decoder_prompt(Task::Transcribe, Some("zz")).unwrap_err();
        assert!(err.to_string().contains("one of en, fr"), "{err}");
        assert!(g.decoder_prompt(Task::Transcribe, None).is_err());
    }

    #[test]
    fn encoder_keys_are_required_and_shared_with_the_decoder() {
        let mut cfg = json!({
            "d_model": 384, "encoder_layers": 4, "decoder_layers": 4,
            "encoder_attention_heads": 6, "decoder_attention_heads": 6,
            "encoder_ffn_dim": 1536, "decoder_ffn_dim": 1536, "num_mel_bins": 80,
            "vocab_size": 51864, "max_source_positions": 1500, "max_target_positions": 448
        });
        let c = WhisperConfig::from_value(&cfg, "config.json").unwrap();
        assert_eq!(c.encoder.d_model, 384);
        assert_eq!(c.encoder.activation_function, "gelu");
        assert_eq!(c.decoder_layers, 4);
        cfg.as_object_mut().unwrap().remove("num_mel_bins");
        let err = WhisperConfig::from_value(&cfg, "config.json").unwrap_err();
        assert!(err.to_string().contains("num_mel_bins"), "{err}");
    }

    #[test]
    fn missing_start_token_is_an_input_error() {
        let err = GenerationConfig::from_values(None, &json!({}), "config.json").unwrap_err();
        assert!(err.to_string().contains("decoder_start_token_id"), "{err}");
    }
}
