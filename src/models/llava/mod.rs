//! LLaVA-1.5 (`model_type` `llava`, `LlavaForConditionalGeneration`): a CLIP ViT tower, a
//! 2-layer projector and a Llama LM. Owns the family's config parsing, defaults and model;
//! image preprocessing is the shared CLIP processor's.

pub mod config;
pub mod model;

use std::collections::BTreeMap;

pub use config::{image_slots, Config, GenerationConfig};
pub use model::{load, splice_features, LlavaModel};

use crate::error::Result;
use crate::media::Modality;
use crate::models::{Family, FamilyDefaults, PromptStyle};

/// LLaVA-1.5's entry in the family table.
pub const FAMILY: Family = Family {
    name: "llava",
    model_types: &["llava"],
    architectures: &["LlavaForConditionalGeneration"],
    aliases: &[("llava", "llava-hf/llava-1.5-7b-hf")],
    defaults,
    load: |ctx| Ok(Box::new(model::load_from(ctx)?)),
};

/// The placeholder a prompt writes for each image.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// The documented LLaVA-1.5 prompt (`USER: <image>\n{text}\nASSISTANT:`) as a chat template,
/// for checkpoints that ship none. Message content may be a string or a list of parts.
pub const FALLBACK_CHAT_TEMPLATE: &str = include_str!("fallback_chat_template.jinja");

/// What LLaVA accepts, from `config.json` alone: one image (or its embeddings) per prompt.
pub fn defaults(config: &serde_json::Value) -> Result<FamilyDefaults> {
    // Parsing checks the config, including that the slot count is computable.
    let parsed = Config::from_value(config)?;
    let slots = parsed.image_slots()?;
    Ok(FamilyDefaults {
        family: "llava",
        limits: BTreeMap::from([(Modality::Image, 1)]),
        prompt: PromptStyle {
            placeholders: BTreeMap::from([(Modality::Image, IMAGE_PLACEHOLDER.to_string())]),
            fallback_chat_template: Some(FALLBACK_CHAT_TEMPLATE),
            ..Default::default()
        },
        embeds: Some(Modality::Image),
        embeds_hidden: Some(parsed.text.hidden_size),
        embeds_tokens: Some(slots),
        max_positions: Some(parsed.text.max_position_embeddings),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(messages: serde_json::Value) -> String {
        let mut env = minijinja::Environment::new();
        env.add_template("t", FALLBACK_CHAT_TEMPLATE).unwrap();
        env.get_template("t")
            .unwrap()
            .render(minijinja::value::Serde(
                json!({"messages": messages, "add_generation_prompt": true}),
            ))
            .unwrap()
    }

    #[test]
    fn fallback_template_renders_the_documented_prompt() {
        let parts = json!([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "What is in this image?"}]}]);
        assert_eq!(
            render(parts),
            "USER: <image>\nWhat is in this image?\nASSISTANT:"
        );
        let plain = json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<image>\nHi"}]);
        assert_eq!(render(plain), "Be brief.\nUSER: <image>\nHi\nASSISTANT:");
    }

    #[test]
    fn defaults_allow_one_image_and_image_embeds() {
        // transformers' all-default LlavaConfig puts the image token (32000) outside the
        // default Llama vocabulary (32000), which HF cannot embed either: give a vocabulary.
        assert!(defaults(&json!({"model_type": "llava"})).is_err());
        let d = defaults(&json!({"model_type": "llava", "text_config": {"vocab_size": 32064}}))
            .unwrap();
        assert_eq!(d.family, "llava");
        assert_eq!(d.limits.get(&Modality::Image), Some(&1));
        assert_eq!(d.limits.get(&Modality::Audio), None);
        assert_eq!(d.prompt.placeholders[&Modality::Image], "<image>");
        assert_eq!(d.embeds, Some(Modality::Image));
        let odd = json!({"model_type": "llava", "text_config": {"vocab_size": 32064},
            "vision_config": {"image_size": 330, "patch_size": 14}});
        assert!(defaults(&odd).is_err());
    }
}
