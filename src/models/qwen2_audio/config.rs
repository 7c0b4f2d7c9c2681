//! Qwen2-Audio's `config.json` (`Qwen2AudioConfig`): the audio encoder's fields, the Qwen2
//! text model's (with `Qwen2Config`'s defaults, which the released checkpoints rely on: their
//! `text_config` names only a few keys) and the `<|AUDIO|>` token id; plus the feature
//! extractor settings from `preprocessor_config.json` / `processor_config.json`.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::models::common::files::read_optional_json;
use crate::models::common::llama::{LlamaConfig, TokenIds};
use crate::models::common::mel::MelConfig;
use crate::models::common::whisper_encoder::WhisperEncoderConfig;

fn config_error(problem: impl Into<String>, expected: impl Into<String>) -> Error {
    Error::input("config.json", problem.into(), expected.into())
}

/// `Qwen2AudioEncoderConfig`'s defaults (those of Qwen2-Audio-7B), for the keys an
/// `audio_config` lacks.
fn audio_defaults() -> WhisperEncoderConfig {
    WhisperEncoderConfig {
        d_model: 1280,
        encoder_layers: 32,
        encoder_attention_heads: 20,
        encoder_ffn_dim: 5120,
        num_mel_bins: 128,
        max_source_positions: 1500,
        activation_function: "gelu".into(),
    }
}

/// The `Qwen2Config` fields the decoder uses, with `Qwen2Config`'s defaults.
#[derive(Debug, Clone, Deserialize)]
struct Qwen2TextConfig {
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default = "defaults::vocab_size")]
    vocab_size: usize,
    #[serde(default = "defaults::hidden_size")]
    hidden_size: usize,
    #[serde(default = "defaults::intermediate_size")]
    intermediate_size: usize,
    #[serde(default = "defaults::num_layers")]
    num_hidden_layers: usize,
    #[serde(default = "defaults::num_heads")]
    num_attention_heads: usize,
    /// `Qwen2Config` defaults it to 32, and `None` to `num_attention_heads`.
    #[serde(default = "defaults::num_kv_heads")]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default = "defaults::silu")]
    hidden_act: String,
    #[serde(default = "defaults::max_position_embeddings")]
    max_position_embeddings: usize,
    #[serde(default = "defaults::rms_norm_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<Value>,
    #[serde(default)]
    rope_parameters: Option<Value>,
    #[serde(default)]
    use_sliding_window: bool,
    #[serde(default)]
    eos_token_id: Option<TokenIds>,
}

mod defaults {
    pub fn vocab_size() -> usize {
        151936
    }
    pub fn hidden_size() -> usize {
        4096
    }
    pub fn intermediate_size() -> usize {
        22016
    }
    pub fn num_layers() -> usize {
        32
    }
    pub fn num_heads() -> usize {
        32
    }
    pub fn num_kv_heads() -> Option<usize> {
        Some(32)
    }
    pub fn silu() -> String {
        "silu".into()
    }
    pub fn max_position_embeddings() -> usize {
        32768
    }
    pub fn rms_norm_eps() -> f64 {
        1e-6
    }
    pub fn audio_token_index() -> u32 {
        151646
    }
}

/// A parsed, checked `Qwen2AudioConfig`.
#[derive(Debug, Clone)]
pub struct Qwen2AudioConfig {
    pub audio: WhisperEncoderConfig,
    /// The Qwen2 decoder as a [`LlamaConfig`] with `qkv_bias` set.
    pub text: LlamaConfig,
    /// The `<|AUDIO|>` id (`audio_token_index`, alias `audio_token_id`).
    pub audio_token_id: u32,
}

impl Qwen2AudioConfig {
    pub fn from_value(config: &Value) -> Result<Self> {
        let sub = |key: &str| -> Value {
            match config.get(key) {
                Some(v) if v.is_object() => v.clone(),
                _ => Value::Object(Default::default()),
            }
        };
        let audio = WhisperEncoderConfig::from_value(&sub("audio_config"), &audio_defaults())
            .map_err(|e| config_error(format!("audio_config: {e}"), "a Qwen2-Audio config"))?;
        let text: Qwen2TextConfig = serde_json::from_value(sub("text_config"))
            .map_err(|e| config_error(format!("text_config: {e}"), "a Qwen2-Audio config"))?;
        let audio_token_id = match config
            .get("audio_token_index")
            .or_else(|| config.get("audio_token_id"))
        {
            None | Some(Value::Null) => defaults::audio_token_index(),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| config_error(format!("audio_token_index is {v}"), "a token id"))?,
        };
        Self::check_audio(&audio)?;
        if let Some(mt) = text.model_type.as_deref() {
            if mt != "qwen2" {
                return Err(config_error(
                    format!("text_config.model_type {mt:?}"),
                    "\"qwen2\" (the Qwen2-Audio language model)",
                ));
            }
        }
        if text.use_sliding_window {
            return Err(config_error(
                "text_config.use_sliding_window is true",
                "full attention in every layer, as Qwen2-Audio checkpoints use",
            ));
        }
        if audio_token_id as usize >= text.vocab_size {
            return Err(config_error(
                format!(
                    "audio_token_index {audio_token_id} is outside the vocabulary of {}",
                    text.vocab_size
                ),
                "an audio token id below text_config.vocab_size",
            ));
        }
        let text = LlamaConfig {
            model_type: None,
            vocab_size: text.vocab_size,
            hidden_size: text.hidden_size,
            intermediate_size: text.intermediate_size,
            num_hidden_layers: text.num_hidden_layers,
            num_attention_heads: text.num_attention_heads,
            num_key_value_heads: text.num_key_value_heads,
            head_dim: text.head_dim,
            hidden_act: text.hidden_act,
            max_position_embeddings: text.max_position_embeddings,
            rms_norm_eps: text.rms_norm_eps,
            tie_word_embeddings: text.tie_word_embeddings,
            attention_bias: false,
            mlp_bias: false,
            qkv_bias: true,
            mrope_section: None,
            rope_theta: text.rope_theta,
            rope_scaling: text.rope_scaling,
            rope_parameters: text.rope_parameters,
            bos_token_id: None,
            eos_token_id: text.eos_token_id,
        };
        // Rotary settings are checked here so that `defaults` refuses what `load` would.
        text.rope()?;
        Ok(Self {
            audio,
            text,
            audio_token_id,
        })
    }

    fn check_audio(a: &WhisperEncoderConfig) -> Result<()> {
        if a.d_model == 0
            || a.encoder_attention_heads == 0
            || !a.d_model.is_multiple_of(a.encoder_attention_heads)
        {
            return Err(config_error(
                format!(
                    "audio_config.d_model {} is not divisible by encoder_attention_heads {}",
                    a.d_model, a.encoder_attention_heads
                ),
                "d_model a multiple of encoder_attention_heads",
            ));
        }
        if a.activation_function != "gelu" {
            return Err(config_error(
                format!(
                    "audio_config.activation_function {:?}",
                    a.activation_function
                ),
                "\"gelu\"",
            ));
        }
        if a.max_source_positions < 2 {
            return Err(config_error(
                format!(
                    "audio_config.max_source_positions {}",
                    a.max_source_positions
                ),
                "at least 2 encoder positions",
            ));
        }
        Ok(())
    }

    /// Mel frames the encoder takes: it refuses any other length, as HF's does.
    pub fn encoder_frames(&self) -> usize {
        self.audio.max_frames()
    }
}

/// The feature extractor settings of `dir`: `preprocessor_config.json`, else the
/// `feature_extractor` object of `processor_config.json` (transformers 5), else Whisper's
/// defaults with the encoder's mel bins. Checked against the encoder: `n_mels` bins over the
/// `2 * max_source_positions` frames it requires.
pub fn mel_config(dir: &Path, config: &Qwen2AudioConfig) -> Result<MelConfig> {
    let pre = dir.join("preprocessor_config.json");
    let combined = dir.join("processor_config.json");
    let (value, file) = match read_optional_json(&pre)? {
        Some(v) => (Some(v), "preprocessor_config.json"),
        None => (
            read_optional_json(&combined)?.and_then(|v| v.get("feature_extractor").cloned()),
            "processor_config.json",
        ),
    };
    let mel = match &value {
        Some(v) => {
            if let Some(d) = v.get("dither").and_then(Value::as_f64) {
                if d != 0.0 {
                    return Err(Error::input(
                        file,
                        format!("dither {d}"),
                        "dither 0 (random dithering cannot be reproduced)",
                    ));
                }
            }
            MelConfig::from_preprocessor(v, file)?
        }
        None => MelConfig::whisper(config.audio.num_mel_bins),
    };
    let frames = config.encoder_frames();
    if mel.n_mels != config.audio.num_mel_bins || mel.n_samples / mel.hop_length != frames {
        return Err(Error::input(
            file,
            format!(
                "{} mel bins over {} frames",
                mel.n_mels,
                mel.n_samples / mel.hop_length
            ),
            format!(
                "{} mel bins over {frames} frames, as config.json's audio_config says",
                config.audio.num_mel_bins
            ),
        ));
    }
    Ok(mel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The released Qwen2-Audio-7B-Instruct `config.json` names only a few text keys.
    #[test]
    fn sparse_released_config_takes_qwen2_defaults() {
        let c = Qwen2AudioConfig::from_value(&json!({
            "model_type": "qwen2_audio",
            "audio_config": {"model_type": "qwen2_audio_encoder"},
            "audio_token_index": 151646,
            "text_config": {"model_type": "qwen2", "intermediate_size": 11008,
                "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "vocab_size": 156032,
                "eos_token_id": 151645}
        }))
        .unwrap();
        assert_eq!(c.audio.d_model, 1280);
        assert_eq!(c.audio.encoder_layers, 32);
        assert_eq!(c.audio.num_mel_bins, 128);
        assert_eq!(c.encoder_frames(), 3000);
        assert_eq!(c.text.hidden_size, 4096);
        assert_eq!(c.text.kv_heads(), 32);
        assert_eq!(c.text.head_dim(), 128);
        assert_eq!(c.text.intermediate_size, 11008);
        assert!(c.text.qkv_bias && !c.text.attention_bias);
        assert!(!c.text.tie_word_embeddings);
        assert_eq!(c.text.rope().unwrap().theta, 10000.0);
        assert_eq!(c.audio_token_id, 151646);
    }

    #[test]
    fn refuses_what_the_model_cannot_run() {
        let bad = [
            json!({"text_config": {"model_type": "llama"}}),
            json!({"text_config": {"use_sliding_window": true}}),
            json!({"audio_config": {"d_model": 100, "encoder_attention_heads": 3}}),
            json!({"audio_config": {"activation_function": "relu"}}),
            json!({"audio_token_index": 10, "text_config": {"vocab_size": 10}}),
            json!({"text_config": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}}),
        ];
        for v in bad {
            assert!(Qwen2AudioConfig::from_value(&v).is_err(), "{v}");
        }
    }
}
