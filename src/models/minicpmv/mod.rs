//! MiniCPM-V 2.6 (`model_type` `minicpmv` with `"version": 2.6`, the authors' `MiniCPMV`
//! from `openbmb/MiniCPM-V-2_6`, not in transformers): a navit SigLIP tower, a perceiver
//! resampler and a Qwen2 LM, for sliced high-resolution images, several images per prompt,
//! video frames sent as images, and image embeddings laid out by `image_sizes`. `config`
//! parses the checkpoint and its processor config, `preprocessor` reproduces
//! `MiniCPMVImageProcessor` (slicing and placeholders), `model` the vision path of
//! `MiniCPMV.get_vllm_embedding`. Other MiniCPM-V versions are refused by name.
//!
//! The chat template's placeholder is `<image>` (the authors write `(<image>./</image>)` and
//! expand that string; the expansion is the same tokens): each becomes
//! `<image_id>N</image_id><image>` + 64 `<unk>` + `</image>`, then the slices row by row. A
//! video's frames go in as images the way the model card sends them (no image ids, at most 2
//! slices each, at most 64 frames), its placeholder `<unk>` in the rendered prompt.

pub mod config;
pub mod model;
pub mod preprocessor;

pub use config::Config;
pub use model::{load, MiniCpmVModel};

use crate::error::Result;
use crate::media::Modality;
use crate::models::{Family, FamilyDefaults, PromptStyle};

/// MiniCPM-V's entry in the family table.
pub const FAMILY: Family = Family {
    name: "minicpmv",
    model_types: &["minicpmv"],
    architectures: &["MiniCPMV"],
    aliases: &[("minicpm-v", "openbmb/MiniCPM-V-2_6")],
    defaults,
    load: |ctx| Ok(Box::new(model::load(ctx)?)),
};

/// MiniCPM-V-2_6's chat template (Qwen2 ChatML with a default system turn), for checkpoints
/// without one.
pub const FALLBACK_CHAT_TEMPLATE: &str = include_str!("chat_template.jinja");

/// Images per prompt by default: vLLM serves MiniCPM-V with one unless
/// `--limit-mm-per-prompt` raises it.
pub const DEFAULT_LIMIT: usize = 1;

/// `max_slice_nums` for video frames, as the model card sets it for video.
pub const VIDEO_MAX_SLICE_NUMS: usize = 2;

/// At most this many frames of a video, picked uniformly as the model card's `encode_video`.
pub const MAX_NUM_FRAMES: usize = 64;

/// What `config.json` alone says: images, video and image embeddings (with `image_sizes`),
/// `max_slice_nums`; any version but 2.6 refused.
pub fn defaults(config: &serde_json::Value) -> Result<FamilyDefaults> {
    let parsed = Config::from_value(config)?;
    // The same placeholder token cannot stand for two modalities: a video's frames take
    // `<unk>`, which the rendered prompt holds nowhere else.
    let placeholders = [(Modality::Image, "<image>"), (Modality::Video, "<unk>")];
    Ok(FamilyDefaults {
        family: "minicpmv",
        embeds: Some(Modality::Image),
        embeds_tensors: &["image_sizes"],
        processor_kwargs: &["max_slice_nums"],
        // No `embeds_hidden`: the app's early check takes `(tokens, hidden)` forms only, and
        // this family also takes vLLM's per-slice `(slices, 64, hidden)`; it checks once loaded.
        max_positions: Some(parsed.text.max_position_embeddings),
        limits: placeholders
            .iter()
            .map(|(m, _)| (*m, DEFAULT_LIMIT))
            .collect(),
        prompt: PromptStyle {
            placeholders: placeholders
                .iter()
                .map(|(m, p)| (*m, p.to_string()))
                .collect(),
            fallback_chat_template: Some(FALLBACK_CHAT_TEMPLATE),
            string_content: true,
            ..Default::default()
        },
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tiny() -> serde_json::Value {
        json!({"model_type": "minicpmv", "version": 2.6, "hidden_size": 128,
               "num_attention_heads": 4, "vision_config": {"hidden_size": 32,
               "num_attention_heads": 2, "num_hidden_layers": 2}})
    }

    #[test]
    fn defaults_take_images_video_and_sized_embeds() {
        let d = defaults(&tiny()).unwrap();
        assert_eq!(d.limits[&Modality::Image], 1);
        assert_eq!(d.embeds, Some(Modality::Image));
        assert_eq!(d.embeds_tensors, ["image_sizes"]);
        assert_eq!(d.processor_kwargs, ["max_slice_nums"]);
        let mut v25 = tiny();
        v25["version"] = json!(2.5);
        let e = defaults(&v25).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("2.5"), "{e}");
    }

    #[test]
    fn fallback_template_writes_the_default_system_turn() {
        use crate::prompt::template::{ChatTemplate, TemplateFiles, TextMessage};
        let files = TemplateFiles::default();
        let template = ChatTemplate::select(&files, Some(FALLBACK_CHAT_TEMPLATE))
            .unwrap()
            .unwrap();
        let user = TextMessage {
            role: "user".into(),
            content: "<image>\nWhat?".into(),
        };
        assert_eq!(
            template.render_text(&[user], true).unwrap(),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\
             <image>\nWhat?<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
