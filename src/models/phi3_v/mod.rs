//! Phi-3-vision and Phi-3.5-vision (`model_type` `phi3_v`, `Phi3VForCausalLM`, the authors'
//! remote code): images tiled into up to `num_crops` 336-pixel crops plus a global view
//! (`Phi3VImageProcessor`), a CLIP ViT-L/14-336 tower, 2x2-merged features with learnable
//! row and global separators, an MLP projection and a Phi-3 LM with LongRoPE. Prompts carry
//! numbered tags `<|image_1|>`, `<|image_2|>`, …, each chunk between them tokenized on its
//! own, as `Phi3VProcessor` does. `config` parses the checkpoint, `preprocessor` reproduces
//! the image processor and its token count, `model` the image embedding.

pub mod config;
pub mod model;
pub mod preprocessor;

use std::collections::BTreeMap;

pub use config::Config;
pub use model::{load, Phi3VModel};

use crate::error::Result;
use crate::media::Modality;
use crate::models::{Family, FamilyDefaults, PromptStyle};
use crate::prompt::NumberedTags;

/// Phi-3-vision's entry in the family table.
pub const FAMILY: Family = Family {
    name: "phi3_v",
    model_types: &["phi3_v"],
    architectures: &["Phi3VForCausalLM"],
    aliases: &[("phi3v", "microsoft/Phi-3.5-vision-instruct")],
    defaults,
    load: |ctx| Ok(Box::new(model::load(ctx)?)),
};

/// The chat template microsoft/Phi-3.5-vision-instruct ships, for checkpoints without one.
pub const FALLBACK_CHAT_TEMPLATE: &str = include_str!("chat_template.jinja");

/// Images per prompt by default, as vLLM serves the model unless `--limit-mm-per-prompt`
/// raises it.
pub const DEFAULT_LIMIT: usize = 1;

/// The tags the processor splits prompts at.
pub const TAGS: NumberedTags = NumberedTags {
    modality: Modality::Image,
    prefix: "<|image_",
    suffix: "|>",
};

/// What `config.json` alone says: images, numbered tags, the `num_crops` setting.
pub fn defaults(config: &serde_json::Value) -> Result<FamilyDefaults> {
    Config::from_value(config)?;
    Ok(FamilyDefaults {
        family: "phi3_v",
        limits: BTreeMap::from([(Modality::Image, DEFAULT_LIMIT)]),
        prompt: PromptStyle {
            fallback_chat_template: Some(FALLBACK_CHAT_TEMPLATE),
            // The template takes the content as a string: the tags, one per line, then the
            // text, as the model card writes it.
            string_content: true,
            numbered_tags: Some(TAGS),
            ..Default::default()
        },
        processor_kwargs: &["num_crops"],
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_template_renders_the_user_turn() {
        use crate::prompt::template::{ChatTemplate, TemplateFiles, TextMessage};
        let template =
            ChatTemplate::select(&TemplateFiles::default(), Some(FALLBACK_CHAT_TEMPLATE))
                .unwrap()
                .unwrap();
        let user = TextMessage {
            role: "user".into(),
            content: "<|image_1|>\nHi".into(),
        };
        assert_eq!(
            template.render_text(&[user], true).unwrap(),
            "<|user|>\n<|image_1|>\nHi<|end|>\n<|assistant|>\n"
        );
    }

    #[test]
    fn tags_must_be_one_to_n_in_order() {
        let ok = "a <|image_1|> b <|image_2|>";
        assert!(TAGS.check(ok, 2, "p").is_ok());
        for (text, n, named) in [
            ("<|image_2|> <|image_1|>", 2, "<|image_2|>"),
            ("<|image_1|> <|image_1|>", 2, "<|image_1|>"),
            ("<|image_1|> <|image_3|>", 2, "<|image_3|>"),
            ("<|image_1|>", 2, "<|image_2|>"),
            ("<|image_1|> <|image_2|>", 1, "<|image_2|>"),
            ("<|image_0|>", 1, "<|image_0|>"),
            (
                "<|image_99999999999999999999|>",
                1,
                "<|image_99999999999999999999|>",
            ),
        ] {
            let err = TAGS.check(text, n, "--raw prompt").unwrap_err();
            assert_eq!(err.exit_code(), 2);
            assert!(err.to_string().contains(named), "{text}: {err}");
        }
        // Not tags: no digits, no closing.
        assert!(TAGS.check("<|image_|> <|image_1", 0, "p").is_ok());
    }
}
