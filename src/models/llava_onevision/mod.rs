//! LLaVA-OneVision (`model_type` `llava_onevision`, `LlavaOnevisionForConditionalGeneration`):
//! a SigLIP tower, a 2-layer projector and a Qwen2 LM, for images (tiled `anyres_max_9`, or
//! padded to a square when a prompt holds several, as transformers does) and videos (frames
//! pooled 2x2). `config` parses the checkpoint and its processor configs, `preprocessor`
//! reproduces `LlavaOnevisionImageProcessorPil` / `LlavaOnevisionVideoProcessor` and counts the
//! tokens an image becomes, `model` packs the features as `LlavaOnevisionModel` does.

pub mod config;
pub mod model;
pub mod preprocessor;

use std::collections::BTreeMap;

pub use config::{Config, Processors};
pub use model::{load, LlavaOnevisionModel};

use crate::error::Result;
use crate::media::Modality;
use crate::models::{Family, FamilyDefaults, PromptStyle};

/// LLaVA-OneVision's entry in the family table.
pub const FAMILY: Family = Family {
    name: "llava_onevision",
    model_types: &["llava_onevision"],
    architectures: &["LlavaOnevisionForConditionalGeneration"],
    aliases: &[(
        "llava-onevision",
        "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
    )],
    defaults,
    load: |ctx| Ok(Box::new(model::load_from(ctx)?)),
};

/// The chat template llava-hf/llava-onevision-qwen2-0.5b-ov-hf ships, for checkpoints without
/// one: Qwen's `<|im_start|>` turns with every image of a turn first, then every video, then
/// the text.
pub const FALLBACK_CHAT_TEMPLATE: &str = concat!(
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}",
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}",
    "{{ '<image>\n' }}{% endfor %}",
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}",
    "{{ '<video>\n' }}{% endfor %}",
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}",
    "{{ content['text'] }}{% endfor %}",
    "{{'<|im_end|>' + '\n'}}{% endfor %}",
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
);

/// Images and videos per prompt by default: one of each, as vLLM serves the model unless
/// `--limit-mm-per-prompt` raises it.
pub const DEFAULT_LIMIT: usize = 1;

/// What `config.json` alone says: images and videos, `<image>` / `<video>` placeholders.
pub fn defaults(config: &serde_json::Value) -> Result<FamilyDefaults> {
    Config::from_value(config)?;
    Ok(FamilyDefaults {
        family: "llava_onevision",
        limits: BTreeMap::from([
            (Modality::Image, DEFAULT_LIMIT),
            (Modality::Video, DEFAULT_LIMIT),
        ]),
        prompt: PromptStyle {
            placeholders: BTreeMap::from([
                (Modality::Image, "<image>".to_string()),
                (Modality::Video, "<video>".to_string()),
            ]),
            fallback_chat_template: Some(FALLBACK_CHAT_TEMPLATE),
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
    fn fallback_template_renders_images_then_videos_then_text() {
        let mut env = minijinja::Environment::new();
        env.add_template("t", FALLBACK_CHAT_TEMPLATE).unwrap();
        let messages = json!([{"role": "user", "content": [
            {"type": "text", "text": "Compare."}, {"type": "video"}, {"type": "image"}]}]);
        let out = env
            .get_template("t")
            .unwrap()
            .render(minijinja::value::Serde(
                json!({"messages": messages, "add_generation_prompt": true}),
            ))
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\n<image>\n<video>\nCompare.<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn defaults_take_one_image_and_one_video() {
        let d = defaults(&json!({"model_type": "llava_onevision",
            "text_config": {"model_type": "qwen2", "vocab_size": 152000}}))
        .unwrap();
        assert_eq!(d.limits[&Modality::Image], 1);
        assert_eq!(d.limits[&Modality::Video], 1);
        assert_eq!(d.embeds, None);
        assert!(d.processor_kwargs.is_empty());
        assert_eq!(d.prompt.placeholders[&Modality::Video], "<video>");
        // transformers' defaults throughout (Qwen2's vocabulary holds the placeholder ids).
        assert!(defaults(&json!({"model_type": "llava_onevision"})).is_ok());
        let bad = json!({"model_type": "llava_onevision", "video_token_index": 200000});
        assert_eq!(defaults(&bad).unwrap_err().exit_code(), 2);
    }
}
