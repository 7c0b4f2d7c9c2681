//! Ultravox's `config.json`: the Whisper encoder (`audio_config`), the projector fields at the
//! top level, and the Llama language model (`text_config`), parsed once.

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::models::common::llama::LlamaConfig;
use crate::models::common::whisper_encoder::WhisperEncoderConfig;

/// transformers' `WhisperConfig` defaults for the encoder keys an `audio_config` lacks (its
/// decoder is not used).
fn audio_defaults() -> WhisperEncoderConfig {
    WhisperEncoderConfig {
        d_model: 384,
        encoder_layers: 4,
        encoder_attention_heads: 6,
        encoder_ffn_dim: 1536,
        num_mel_bins: 80,
        max_source_positions: 1500,
        activation_function: "gelu".into(),
    }
}

/// The `audio_config` keys besides the encoder's.
#[derive(Debug, Clone, Deserialize)]
struct AudioKind {
    #[serde(default)]
    model_type: Option<String>,
    /// Not used (the encoder does not scale its input); parsed so that a malformed value is
    /// refused.
    #[serde(default)]
    #[allow(dead_code)]
    scale_embedding: bool,
}

mod defaults {
    pub fn stack_factor() -> usize {
        8
    }
    pub fn hidden_size() -> usize {
        4096
    }
    pub fn projector_act() -> String {
        "swiglu".into()
    }
}

/// The top-level Ultravox fields.
#[derive(Debug, Clone, Deserialize)]
struct Top {
    #[serde(default = "defaults::stack_factor")]
    stack_factor: usize,
    /// The projector's inner width (`linear_1`'s output).
    #[serde(default = "defaults::hidden_size")]
    hidden_size: usize,
    #[serde(default = "defaults::projector_act")]
    projector_act: String,
    /// v0.5+: RMSNorm after the activation; before: after `linear_2`.
    #[serde(default)]
    projector_ln_mid: bool,
    #[serde(default)]
    audio_latency_block_size: Option<usize>,
    #[serde(default)]
    text_model_id: Option<String>,
    #[serde(default)]
    audio_model_id: Option<String>,
}

/// A parsed Ultravox configuration.
#[derive(Debug, Clone)]
pub struct UltravoxConfig {
    pub audio: WhisperEncoderConfig,
    /// `None` when `config.json` names the language model by `text_model_id` instead of
    /// embedding `text_config` (the hub checkpoints do: their weights hold no `language_model.*`).
    pub text: Option<LlamaConfig>,
    pub text_model_id: Option<String>,
    pub stack_factor: usize,
    pub projector_hidden: usize,
    pub projector_ln_mid: bool,
}

/// Convolution stride product of the Whisper encoder: frames per encoder position.
pub const ENCODER_DS_FACTOR: usize = 2;

fn bad(what: &str, problem: impl Into<String>, expected: impl Into<String>) -> Error {
    Error::input(what, problem, expected)
}

impl UltravoxConfig {
    pub fn from_value(config: &Value, what: &str) -> Result<Self> {
        let top: Top = serde_json::from_value(config.clone()).map_err(|e| {
            bad(
                what,
                format!("not an Ultravox config: {e}"),
                "an Ultravox config.json",
            )
        })?;
        let audio_value = config.get("audio_config").ok_or_else(|| {
            let problem = match &top.audio_model_id {
                Some(id) => {
                    format!("no audio_config (the encoder is named by audio_model_id {id})")
                }
                None => "no audio_config".to_string(),
            };
            bad(what, problem, "an Ultravox config.json with audio_config")
        })?;
        let audio_error = |e| bad(what, format!("audio_config: {e}"), "a Whisper audio_config");
        let audio = WhisperEncoderConfig::from_value(audio_value, &audio_defaults())
            .map_err(audio_error)?;
        let kind: AudioKind = serde_json::from_value(audio_value.clone()).map_err(audio_error)?;
        if kind.model_type.as_deref().is_some_and(|t| t != "whisper") {
            return Err(bad(
                what,
                format!("audio_config.model_type {:?}", kind.model_type),
                "a Whisper audio encoder (the only one Ultravox v0.5 uses)",
            ));
        }
        if audio.activation_function != "gelu" {
            return Err(bad(
                what,
                format!(
                    "audio_config.activation_function {:?}",
                    audio.activation_function
                ),
                "\"gelu\"",
            ));
        }
        if audio.d_model == 0
            || audio.encoder_attention_heads == 0
            || !audio.d_model.is_multiple_of(audio.encoder_attention_heads)
            || audio.max_source_positions == 0
        {
            return Err(bad(
                what,
                format!(
                    "audio_config d_model {} with {} heads, max_source_positions {}",
                    audio.d_model, audio.encoder_attention_heads, audio.max_source_positions
                ),
                "d_model a positive multiple of encoder_attention_heads and max_source_positions > 0",
            ));
        }
        if top.projector_act != "swiglu" {
            return Err(bad(
                what,
                format!("projector_act {:?}", top.projector_act),
                "\"swiglu\" (Ultravox v0.4+)",
            ));
        }
        if top.stack_factor == 0 || top.hidden_size == 0 || !top.hidden_size.is_multiple_of(2) {
            return Err(bad(
                what,
                format!(
                    "stack_factor {} and hidden_size {}",
                    top.stack_factor, top.hidden_size
                ),
                "stack_factor > 0 and an even projector hidden_size",
            ));
        }
        if top.audio_latency_block_size.is_some_and(|b| b > 0) {
            return Err(bad(
                what,
                "audio_latency_block_size is set (streaming-latency masking)",
                "audio_latency_block_size null, as the released checkpoints have",
            ));
        }
        let text = match config.get("text_config") {
            Some(v) => Some(
                serde_json::from_value::<LlamaConfig>(v.clone())
                    .map_err(|e| bad(what, format!("text_config: {e}"), "a Llama text_config"))?,
            ),
            None => None,
        };
        if let Some(t) = &text {
            if t.model_type.as_deref().is_some_and(|m| m != "llama") {
                return Err(bad(
                    what,
                    format!("text_config.model_type {:?}", t.model_type),
                    "a Llama language model",
                ));
            }
        } else if top.text_model_id.is_none() {
            return Err(bad(
                what,
                "neither text_config nor text_model_id",
                "an Ultravox config.json naming its language model",
            ));
        }
        Ok(Self {
            audio,
            text,
            text_model_id: top.text_model_id,
            stack_factor: top.stack_factor,
            projector_hidden: top.hidden_size,
            projector_ln_mid: top.projector_ln_mid,
        })
    }

    /// Mel frames the encoder takes at once (`max_source_positions * 2`): longer audio is cut
    /// into chunks of this many frames, as `UltravoxPipeline` sets `audio_context_size`.
    pub fn context_frames(&self) -> usize {
        self.audio.max_source_positions * ENCODER_DS_FACTOR
    }
}

/// One encoder pass of an audio item: mel frames `offset .. offset + frames` (zero padded to
/// the full context when it is a shorter continuation chunk) and the audio tokens it yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub offset: usize,
    /// Valid mel frames in this chunk (`audio_lens`).
    pub frames: usize,
    /// Frames fed to the encoder: `frames`, or the whole context for a padded continuation.
    pub padded_frames: usize,
    /// Audio tokens taken from this chunk (`audio_token_len`).
    pub tokens: usize,
}

/// How `UltravoxProcessor` splits `total_frames` mel frames (the attention-mask sum) over an
/// encoder context of `context` frames, and how many audio tokens each chunk yields:
/// `ceil(frames / (encoder_ds_factor * stack_factor))`. The single source of both the prompt
/// expansion and the encoder passes.
pub fn chunk_plan(total_frames: usize, context: usize, stack_factor: usize) -> Vec<Chunk> {
    let per_token = ENCODER_DS_FACTOR * stack_factor;
    (0..total_frames)
        .step_by(context.max(1))
        .map(|offset| {
            let frames = (total_frames - offset).min(context);
            Chunk {
                offset,
                frames,
                padded_frames: if offset > 0 { context } else { frames },
                tokens: frames.div_ceil(per_token),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_follow_the_processor() {
        // 279 frames over a 200-frame context: 200 + 79 (padded to 200), 13 + 5 tokens.
        let plan = chunk_plan(279, 200, 8);
        assert_eq!(
            plan,
            vec![
                Chunk {
                    offset: 0,
                    frames: 200,
                    padded_frames: 200,
                    tokens: 13
                },
                Chunk {
                    offset: 200,
                    frames: 79,
                    padded_frames: 200,
                    tokens: 5
                },
            ]
        );
        // Under the context: one unpadded chunk.
        assert_eq!(
            chunk_plan(2, 3000, 8),
            vec![Chunk {
                offset: 0,
                frames: 2,
                padded_frames: 2,
                tokens: 1
            }]
        );
        let long = chunk_plan(6000, 3000, 8);
        assert_eq!(long.len(), 2);
        assert_eq!(long[1].tokens, 188);
    }
}
