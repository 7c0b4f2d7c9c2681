//! The one table of model families. A family is chosen from `config.json` (`model_type`, then
//! `architectures`), never from the alias the user typed.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::{FamilyDefaults, Model};
use crate::error::{Error, Result};

/// What a loader receives: a model directory whose files are all present.
pub struct LoadContext<'a> {
    pub dir: &'a Path,
    /// The directories of [`FamilyDefaults::extra_models`], in that order, each with its
    /// `config.json` and weights present.
    pub extra_dirs: &'a [PathBuf],
    pub config: &'a serde_json::Value,
    pub device: &'a Device,
    pub dtype: DType,
}

/// One model family.
pub struct Family {
    pub name: &'static str,
    /// `model_type` values this family claims.
    pub model_types: &'static [&'static str],
    /// `architectures` entries this family claims.
    pub architectures: &'static [&'static str],
    /// Cheap facts from `config.json` alone (limits, placeholders, template fallback).
    pub defaults: fn(&serde_json::Value) -> Result<FamilyDefaults>,
    pub load: fn(&LoadContext) -> Result<Box<dyn Model>>,
}

/// Every family mmllm runs.
pub static FAMILIES: &[Family] = &[
    super::llava::FAMILY,
    super::qwen2_vl::FAMILY,
    super::qwen2_audio::FAMILY,
    super::whisper::FAMILY,
    super::ultravox::FAMILY,
];

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
