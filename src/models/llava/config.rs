//! LLaVA's `config.json` and `generation_config.json`, with transformers' defaults, and the
//! one function that says how many feature slots an image takes.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::models::common::clip_vision::ClipVisionConfig;
use crate::models::common::llama::{LlamaConfig, TokenIds};

/// `vision_feature_layer`: one hidden-state index or several (concatenated on features).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum FeatureLayer {
    One(i64),
    Many(Vec<i64>),
}

impl FeatureLayer {
    pub fn to_vec(&self) -> Vec<i64> {
        match self {
            FeatureLayer::One(i) => vec![*i],
            FeatureLayer::Many(v) => v.clone(),
        }
    }
}

/// Which vision tokens become image features.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SelectStrategy {
    /// Drop the class token.
    Default,
    /// Keep the class token.
    Full,
}

/// `LlavaConfig`.
#[derive(Debug, Clone, Deserialize)]
pub struct LlavaConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    /// Absent: LLaVA-1.5's CLIP ViT-L/14-336 (transformers' `sub_configs_defaults`).
    #[serde(default)]
    pub vision_config: Option<ClipVisionConfig>,
    /// Absent: transformers' `LlamaConfig()` defaults.
    #[serde(default)]
    pub text_config: Option<LlamaConfig>,
    #[serde(default)]
    pub image_token_index: Option<u32>,
    /// Newer spelling of `image_token_index`.
    #[serde(default)]
    pub image_token_id: Option<u32>,
    #[serde(default = "defaults::projector_hidden_act")]
    pub projector_hidden_act: String,
    #[serde(default = "defaults::vision_feature_select_strategy")]
    pub vision_feature_select_strategy: SelectStrategy,
    #[serde(default = "defaults::vision_feature_layer")]
    pub vision_feature_layer: FeatureLayer,
    #[serde(default = "defaults::multimodal_projector_bias")]
    pub multimodal_projector_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

mod defaults {
    use super::{FeatureLayer, SelectStrategy};
    pub fn projector_hidden_act() -> String {
        "gelu".into()
    }
    pub fn vision_feature_select_strategy() -> SelectStrategy {
        SelectStrategy::Default
    }
    pub fn vision_feature_layer() -> FeatureLayer {
        FeatureLayer::One(-2)
    }
    pub fn multimodal_projector_bias() -> bool {
        true
    }
}

/// transformers' vision defaults for LLaVA when `vision_config` is absent.
fn llava_default_vision() -> ClipVisionConfig {
    ClipVisionConfig {
        hidden_size: 1024,
        intermediate_size: 4096,
        num_hidden_layers: 24,
        num_attention_heads: 16,
        num_channels: 3,
        image_size: 336,
        patch_size: 14,
        hidden_act: "quick_gelu".into(),
        layer_norm_eps: 1e-5,
    }
}

fn bad_config(problem: String, expected: impl Into<String>) -> Error {
    Error::input("config.json", problem, expected)
}

/// A parsed and checked LLaVA configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub vision: ClipVisionConfig,
    pub text: LlamaConfig,
    pub image_token_id: u32,
    pub projector_hidden_act: String,
    pub strategy: SelectStrategy,
    /// Indexes into the vision tower's hidden states (HF numbering, 0 = embeddings).
    pub feature_layers: Vec<usize>,
    pub projector_bias: bool,
    pub tie_word_embeddings: bool,
}

impl Config {
    pub fn from_value(value: &serde_json::Value) -> Result<Self> {
        let raw: LlavaConfig = serde_json::from_value(value.clone())
            .map_err(|e| bad_config(e.to_string(), "a LLaVA config.json"))?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: LlavaConfig) -> Result<Self> {
        if let Some(mt) = &raw.model_type {
            if mt != "llava" {
                return Err(bad_config(
                    format!("model_type {mt:?} is not LLaVA"),
                    "model_type \"llava\"",
                ));
            }
        }
        let vision = raw.vision_config.unwrap_or_else(llava_default_vision);
        let text = match raw.text_config {
            Some(t) => t,
            None => serde_json::from_str("{}")
                .map_err(|e| bad_config(e.to_string(), "a text_config"))?,
        };
        let image_token_id = raw
            .image_token_index
            .or(raw.image_token_id)
            .unwrap_or(32000);
        if image_token_id as usize >= text.vocab_size {
            return Err(bad_config(
                format!(
                    "image_token_index {image_token_id} is outside the vocabulary of {}",
                    text.vocab_size
                ),
                "an image token id below text_config.vocab_size",
            ));
        }
        // hidden_states has num_hidden_layers + 1 entries; negative indexes count from its end.
        let count = vision.num_hidden_layers as i64 + 1;
        let feature_layers = raw
            .vision_feature_layer
            .to_vec()
            .into_iter()
            .map(|i| {
                let abs = if i < 0 { count + i } else { i };
                if (0..count).contains(&abs) {
                    Ok(abs as usize)
                } else {
                    Err(bad_config(
                        format!("vision_feature_layer {i} is outside the vision tower"),
                        format!("an index in -{count}..{count}"),
                    ))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        if feature_layers.is_empty() {
            return Err(bad_config(
                "vision_feature_layer is an empty list".into(),
                "at least one layer index",
            ));
        }
        match raw.projector_hidden_act.as_str() {
            "gelu" | "gelu_pytorch_tanh" | "gelu_new" | "quick_gelu" | "silu" | "relu" => {}
            other => {
                return Err(bad_config(
                    format!("unsupported projector_hidden_act {other:?}"),
                    "gelu, gelu_pytorch_tanh, gelu_new, quick_gelu, silu or relu",
                ))
            }
        }
        let tie = raw.tie_word_embeddings || text.tie_word_embeddings;
        let config = Self {
            vision,
            text,
            image_token_id,
            projector_hidden_act: raw.projector_hidden_act,
            strategy: raw.vision_feature_select_strategy,
            feature_layers,
            projector_bias: raw.multimodal_projector_bias,
            tie_word_embeddings: tie,
        };
        config.image_slots()?;
        config.text.rope()?;
        Ok(config)
    }

    /// Feature slots one image takes in the prompt. The single source of this number: used by
    /// `defaults`, `Expansion` and the feature shape checks.
    pub fn image_slots(&self) -> Result<usize> {
        image_slots(&self.vision, self.strategy)
    }

    /// Vision encoder layers that must run to reach the deepest selected hidden state.
    pub fn vision_layers_needed(&self) -> usize {
        self.feature_layers.iter().copied().max().unwrap_or(0)
    }
}

/// Patches, plus the class token when the strategy keeps it.
pub fn image_slots(vision: &ClipVisionConfig, strategy: SelectStrategy) -> Result<usize> {
    let patches = vision.num_patches()?;
    Ok(match strategy {
        SelectStrategy::Default => patches,
        SelectStrategy::Full => patches + 1,
    })
}

/// `generation_config.json` (only what the engine needs from it).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationConfig {
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<TokenIds>,
}

impl GenerationConfig {
    /// Reads `generation_config.json` in `dir`; absent file = empty config.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::input(path.display().to_string(), e.to_string(), "a readable file")
        })?;
        serde_json::from_str(&text).map_err(|e| {
            Error::input(
                path.display().to_string(),
                e.to_string(),
                "a generation_config.json with integer or list token ids",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The config.json of llava-hf/llava-1.5-7b-hf (transformers 4.x layout).
    fn llava_15_7b() -> serde_json::Value {
        json!({
            "architectures": ["LlavaForConditionalGeneration"],
            "ignore_index": -100,
            "image_token_index": 32000,
            "model_type": "llava",
            "pad_token_id": 32001,
            "projector_hidden_act": "gelu",
            "text_config": {
                "_name_or_path": "lmsys/vicuna-7b-v1.5",
                "architectures": ["LlamaForCausalLM"],
                "max_position_embeddings": 4096,
                "model_type": "llama",
                "rms_norm_eps": 1e-05,
                "torch_dtype": "float16",
                "vocab_size": 32064
            },
            "tie_word_embeddings": false,
            "torch_dtype": "float16",
            "transformers_version": "4.36.0.dev0",
            "vision_config": {
                "hidden_size": 1024,
                "image_size": 336,
                "intermediate_size": 4096,
                "model_type": "clip_vision_model",
                "num_attention_heads": 16,
                "num_hidden_layers": 24,
                "patch_size": 14,
                "projection_dim": 768,
                "vocab_size": 32000
            },
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
            "vocab_size": 32064
        })
    }

    #[test]
    fn real_llava_15_config_parses_with_hf_defaults() {
        let c = Config::from_value(&llava_15_7b()).unwrap();
        assert_eq!(c.image_slots().unwrap(), 576);
        assert_eq!(c.feature_layers, [23]);
        assert_eq!(c.vision_layers_needed(), 23);
        assert_eq!(c.text.hidden_size, 4096);
        assert_eq!(c.text.kv_heads(), 32);
        assert_eq!(c.text.head_dim(), 128);
        assert_eq!(c.image_token_id, 32000);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.text.rope().unwrap().theta, 10000.0);
    }

    #[test]
    fn full_strategy_keeps_class_token_and_layer_lists_resolve() {
        let mut v = llava_15_7b();
        v["vision_feature_select_strategy"] = json!("full");
        v["vision_feature_layer"] = json!([-2, -5, 3]);
        let c = Config::from_value(&v).unwrap();
        assert_eq!(c.image_slots().unwrap(), 577);
        assert_eq!(c.feature_layers, [23, 20, 3]);
    }

    #[test]
    fn image_token_id_spelling_and_missing_vision_config() {
        let mut v = llava_15_7b();
        v.as_object_mut().unwrap().remove("image_token_index");
        v.as_object_mut().unwrap().remove("vision_config");
        v["image_token_id"] = json!(32001);
        let c = Config::from_value(&v).unwrap();
        assert_eq!(c.image_token_id, 32001);
        assert_eq!(c.vision.hidden_size, 1024);
        assert_eq!(c.image_slots().unwrap(), 576);
    }

    #[test]
    fn bad_configs_are_input_errors() {
        for (key, value) in [
            ("vision_feature_layer", json!(-26)),
            ("vision_feature_select_strategy", json!("cls_only")),
            ("model_type", json!("qwen2_vl")),
            ("projector_hidden_act", json!("swish_cubed")),
            ("image_token_index", json!(99999)),
        ] {
            let mut v = llava_15_7b();
            v[key] = value;
            let err = Config::from_value(&v).unwrap_err();
            assert!(matches!(err, Error::Input { .. }), "{key}: {err}");
        }
    }

    #[test]
    fn generation_config_eos_int_or_list() {
        let g: GenerationConfig = serde_json::from_str(r#"{"eos_token_id": [2, 32000]}"#).unwrap();
        assert_eq!(g.eos_token_id.unwrap().to_vec(), [2, 32000]);
        let g: GenerationConfig = serde_json::from_str(r#"{"eos_token_id": 2}"#).unwrap();
        assert_eq!(g.eos_token_id.unwrap().to_vec(), [2]);
    }
}
