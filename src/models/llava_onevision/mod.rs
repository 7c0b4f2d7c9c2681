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
    load: |ctx| Ok(Box::new(model::load(ctx)?)),
};

/// The chat template llava-hf/llava-onevision-qwen2-0.5b-ov-hf ships, for checkpoints without
/// one: Qwen's `<|im_start|>` turns with every image of a turn first, then every video, then
/// the text.
pub const FALLBACK_CHAT_TEMPLATE: &str = include_str!("chat_template.jinja");

/// Images and videos per prompt by default: one of each, as vLLM serves the model unless
/// `--limit-mm-per-prompt` raises it.
pub const DEFAULT_LIMIT: usize = 1;

/// What `config.json` alone says: images and videos, `<image>` / `<video>` placeholders.
pub fn defaults(config: &serde_json::Value) -> Result<FamilyDefaults> {
    let parsed = Config::from_value(config)?;
    Ok(FamilyDefaults {
        family: "llava_onevision",
        max_positions: Some(parsed.text.max_position_embeddings),
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
        use crate::prompt::template::{ChatTemplate, ContentPart, Message, TemplateFiles};
        let files = TemplateFiles::default();
        let template = ChatTemplate::select(&files, Some(FALLBACK_CHAT_TEMPLATE))
            .unwrap()
            .unwrap();
        let text = ContentPart::Text {
            text: "Compare.".into(),
        };
        let content = vec![text, ContentPart::Video {}, ContentPart::Image {}];
        let user = Message {
            role: "user".into(),
            content,
        };
        assert_eq!(
            template.render(&[user], true).unwrap(),
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
