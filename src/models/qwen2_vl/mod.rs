//! Qwen2-VL and Qwen2.5-VL (`model_type` `qwen2_vl`, `qwen2_5_vl`): images, several per prompt,
//! videos (native clips or frames), and precomputed image embeds with their `image_grid_thw`.
//! `config` parses the checkpoint, `preprocessor` reproduces transformers' image/video processors
//! (`tv_resize`: the torchvision resize its video processor uses), `vision` is the vision tower
//! and `model` the M-RoPE language model and the [`Model`] impl.
//!
//! [`Model`]: crate::models::Model

pub mod config;
pub mod model;
pub mod preprocessor;
pub use crate::models::common::tv_resize;
pub mod vision;

use std::collections::BTreeMap;

use serde_json::Value;

pub use crate::models::ItemGrid;
pub use config::{ProcessorConfig, Processors, Qwen2VlConfig, Variant};
pub use model::{load, Qwen2VlModel};

use crate::error::{Error, Result};
use crate::media::Modality;
use crate::models::{Family, FamilyDefaults, PromptStyle};

/// `model_type`s this family claims.
pub const MODEL_TYPES: &[&str] = &["qwen2_vl", "qwen2_5_vl"];
/// `architectures` this family claims.
pub const ARCHITECTURES: &[&str] = &[
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
];

/// Images per prompt by default: the Qwen2-VL / Qwen2.5-VL model card's vLLM example serves
/// with `limit_mm_per_prompt={"image": 10, "video": 10}`.
pub const DEFAULT_IMAGE_LIMIT: usize = 10;
/// Videos per prompt by default (same model-card example).
pub const DEFAULT_VIDEO_LIMIT: usize = 10;

/// What `config.json` alone says: image and video inputs, `<|image_pad|>` / `<|video_pad|>`
/// placeholders (the chat template writes `<|vision_start|>`/`<|vision_end|>` around them),
/// image embeds accepted.
pub fn defaults(config: &Value) -> Result<FamilyDefaults> {
    let model_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let variant = Variant::from_model_type(model_type).ok_or_else(|| {
        Error::input(
            "config.json",
            format!("model_type is `{model_type}`"),
            "`qwen2_vl` or `qwen2_5_vl`",
        )
    })?;
    let parsed = config::Qwen2VlConfig::from_value(config)?;
    Ok(FamilyDefaults {
        family: variant.family_name(),
        limits: BTreeMap::from([
            (Modality::Image, DEFAULT_IMAGE_LIMIT),
            (Modality::Video, DEFAULT_VIDEO_LIMIT),
        ]),
        prompt: PromptStyle {
            placeholders: BTreeMap::from([
                (Modality::Image, "<|image_pad|>".to_string()),
                (Modality::Video, "<|video_pad|>".to_string()),
            ]),
            ..Default::default()
        },
        embeds: Some(Modality::Image),
        embeds_tensors: &["image_grid_thw"],
        embeds_hidden: Some(parsed.text.hidden_size),
        max_positions: Some(parsed.text.max_position_embeddings),
        processor_kwargs: &["min_pixels", "max_pixels"],
        ..Default::default()
    })
}

/// Qwen2-VL's and Qwen2.5-VL's entry in the family table.
pub const FAMILY: Family = Family {
    name: "qwen2_vl",
    model_types: MODEL_TYPES,
    architectures: ARCHITECTURES,
    aliases: &[
        ("qwen2-vl", "Qwen/Qwen2-VL-2B-Instruct"),
        ("qwen2.5-vl", "Qwen/Qwen2.5-VL-3B-Instruct"),
    ],
    defaults,
    load: |ctx| Ok(Box::new(model::load_from(ctx)?)),
};
