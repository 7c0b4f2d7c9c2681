//! Qwen2-Audio (`model_type` `qwen2_audio`, `Qwen2AudioForConditionalGeneration`): Whisper's
//! log-mel front end (128 bins, padded to 30 s with a frame mask), a Whisper-style audio encoder
//! with average pooling, a linear projector, and a Qwen2 language model (the shared Llama
//! decoder with q/k/v biases). Each `<|AUDIO|>` placeholder becomes [`output_lengths`]`.1`
//! copies of itself, exactly as `Qwen2AudioProcessor` expands it; the chat template writes the
//! `<|audio_bos|>` / `<|audio_eos|>` around it, the processor adds nothing.

pub mod config;
pub mod encoder;
pub mod model;

use std::collections::BTreeMap;

pub use config::Qwen2AudioConfig;
pub use model::{load, Qwen2AudioModel};

use crate::error::Result;
use crate::media::Modality;
use crate::models::{Family, FamilyDefaults, PromptStyle};

/// Qwen2-Audio's entry in the family table.
pub const FAMILY: Family = Family {
    name: "qwen2_audio",
    model_types: &["qwen2_audio"],
    architectures: &["Qwen2AudioForConditionalGeneration"],
    aliases: &[("qwen2-audio", "Qwen/Qwen2-Audio-7B-Instruct")],
    defaults,
    load: |ctx| Ok(Box::new(Qwen2AudioModel::load_from(ctx)?)),
};

/// The placeholder a prompt writes for each audio (`Qwen2AudioProcessor.audio_token`).
pub const AUDIO_PLACEHOLDER: &str = "<|AUDIO|>";

/// `Qwen2AudioProcessor.default_chat_template`, which transformers uses when a checkpoint ships
/// no template (Qwen2-Audio-7B, the base model, ships none).
pub const DEFAULT_CHAT_TEMPLATE: &str = include_str!("default_chat_template.jinja");

/// `(encoder positions, audio tokens)` for an audio whose feature attention mask sums to
/// `valid_frames`: `Qwen2AudioEncoder._get_feat_extract_output_lengths`, i.e. the stride-2
/// convolution `(l - 1) // 2 + 1` then the pooling `(n - 2) // 2 + 1`, with Python's floor
/// division (a clip of one or two frames yields no token). `Qwen2AudioProcessor` expands each
/// `<|AUDIO|>` to the second number; the encoder keeps that many rows.
pub fn output_lengths(valid_frames: usize) -> (usize, usize) {
    let l = valid_frames as i64;
    let positions = (l - 1).div_euclid(2) + 1;
    let tokens = (positions - 2).div_euclid(2) + 1;
    (positions.max(0) as usize, tokens.max(0) as usize)
}

/// What Qwen2-Audio accepts, from `config.json` alone. vLLM sets no per-prompt audio limit for
/// Qwen2-Audio (`get_supported_mm_limits` is `{"audio": None}`): the context bounds it. The
/// default here is the number of full 30-s clips that fit the context (10 for
/// Qwen2-Audio-7B-Instruct: 8192 positions, 750 tokens a clip), at least 1.
pub fn defaults(config: &serde_json::Value) -> Result<FamilyDefaults> {
    let c = Qwen2AudioConfig::from_value(config)?;
    let (_, per_clip) = output_lengths(c.encoder_frames());
    let limit = (c.text.max_position_embeddings / per_clip.max(1)).max(1);
    Ok(FamilyDefaults {
        family: "qwen2_audio",
        max_positions: Some(c.text.max_position_embeddings),
        limits: BTreeMap::from([(Modality::Audio, limit)]),
        prompt: PromptStyle {
            placeholders: BTreeMap::from([(Modality::Audio, AUDIO_PLACEHOLDER.to_string())]),
            fallback_chat_template: Some(DEFAULT_CHAT_TEMPLATE),
            ..Default::default()
        },
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn output_lengths_follow_python_floor_division() {
        // (valid frames, encoder positions, tokens), from the processor's formula.
        let cases = [
            (0, 0, 0),
            (1, 1, 0),
            (2, 1, 0),
            (3, 2, 1),
            (4, 2, 1),
            (5, 3, 1),
            (279, 140, 70),
            (3000, 1500, 750),
        ];
        for (l, positions, tokens) in cases {
            assert_eq!(output_lengths(l), (positions, tokens), "{l} frames");
        }
    }

    #[test]
    fn defaults_fit_clips_into_the_context() {
        let d = defaults(&json!({"model_type": "qwen2_audio",
            "text_config": {"max_position_embeddings": 8192, "vocab_size": 156032}}))
        .unwrap();
        assert_eq!(d.family, "qwen2_audio");
        assert_eq!(d.limits[&Modality::Audio], 10);
        assert_eq!(d.limits.get(&Modality::Image), None);
        assert_eq!(d.prompt.placeholders[&Modality::Audio], "<|AUDIO|>");
        let short = defaults(&json!({"text_config": {"max_position_embeddings": 512}})).unwrap();
        assert_eq!(short.limits[&Modality::Audio], 1);
    }

    #[test]
    fn default_template_numbers_audio_parts() {
        let mut env = minijinja::Environment::new();
        env.add_template("t", DEFAULT_CHAT_TEMPLATE).unwrap();
        let text = env
            .get_template("t")
            .unwrap()
            .render(minijinja::value::Serde(json!({
                "messages": [{"role": "user", "content": [
                    {"type": "audio"}, {"type": "audio"}, {"type": "text", "text": "Hi"}]}],
                "add_generation_prompt": true})))
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\
             Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n\
             Audio 2: <|audio_bos|><|AUDIO|><|audio_eos|>\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
