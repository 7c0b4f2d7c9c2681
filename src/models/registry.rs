//! The one table of model families: the only module that knows them all. A family is chosen from `config.json` (`model_type`, then
//! `architectures`), never from the alias the user typed.

use super::Family;
use crate::error::{Error, Result};

/// Every family mmllm runs.
pub static FAMILIES: &[Family] = &[
    super::llava::FAMILY,
    super::llava_onevision::FAMILY,
    super::qwen2_vl::FAMILY,
    super::qwen2_audio::FAMILY,
    super::whisper::FAMILY,
    super::ultravox::FAMILY,
    super::minicpmv::FAMILY,
];

/// Every `--model` alias with its repo id, from the family table.
pub fn aliases() -> Vec<(&'static str, &'static str)> {
    FAMILIES
        .iter()
        .flat_map(|f| f.aliases.iter().copied())
        .collect()
}

/// The family for a parsed `config.json`; `model` names the model in errors.
pub fn family_for(config: &serde_json::Value, model: &str) -> Result<&'static Family> {
    let model_type = config.get("model_type").and_then(|v| v.as_str());
    let architectures: Vec<&str> = config
        .get("architectures")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    FAMILIES
        .iter()
        .find(|f| model_type.is_some_and(|t| f.model_types.contains(&t)))
        .or_else(|| {
            FAMILIES
                .iter()
                .find(|f| architectures.iter().any(|a| f.architectures.contains(a)))
        })
        .ok_or_else(|| {
            let supported: Vec<&str> = FAMILIES
                .iter()
                .flat_map(|f| f.model_types.iter().copied())
                .collect();
            Error::input(
                model,
                format!(
                    "unsupported model_type {} (architectures {:?})",
                    model_type.unwrap_or("<none>"),
                    architectures
                ),
                format!("one of: {}", supported.join(", ")),
            )
        })
}
