//! The Llama / Qwen2 decoder's `config.json` keys (`LlamaConfig` with transformers' defaults),
//! the rotary settings they resolve to, and the checks run before loading.

use serde::Deserialize;

use crate::error::{Error, Result};

/// One token id or several (`eos_token_id` may be either).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// `LlamaConfig` with transformers' defaults for missing keys.
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (no grouping).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: String,
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "defaults::rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the q/k/v projections but not on `o_proj` (Qwen2). Not a `config.json` key:
    /// families whose decoder is Qwen2 set it after parsing; `attention_bias` covers all four.
    #[serde(skip)]
    pub qkv_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    /// M-RoPE: how the `head_dim / 2` rotary frequencies split among the temporal, height and
    /// width position rows (Qwen2-VL). Not a Llama `config.json` key; set by such families.
    #[serde(skip)]
    pub mrope_section: Option<Vec<usize>>,
    /// Legacy location of the rotary base (transformers < 5).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Legacy rotary scaling (transformers < 5).
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers >= 5: `{rope_type, rope_theta, factor, ...}`.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
}

mod defaults {
    pub fn vocab_size() -> usize {
        32000
    }
    pub fn hidden_size() -> usize {
        4096
    }
    pub fn intermediate_size() -> usize {
        11008
    }
    pub fn num_hidden_layers() -> usize {
        32
    }
    pub fn num_attention_heads() -> usize {
        32
    }
    pub fn hidden_act() -> String {
        "silu".into()
    }
    pub fn max_position_embeddings() -> usize {
        2048
    }
    pub fn rms_norm_eps() -> f64 {
        1e-6
    }
}

fn config_error(problem: String, expected: &str) -> Error {
    Error::input("config.json", problem, expected)
}

/// How rotary frequencies are scaled.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    Linear {
        factor: f32,
    },
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: f32,
    },
    /// LongRoPE (`su` / `longrope`, Phi-3): per-frequency divisors, the short ones while a
    /// forward's positions stay within `original_max_position_embeddings`, the long ones once
    /// they pass it; cos and sin are scaled by `attention_factor`.
    LongRope {
        short_factor: Vec<f32>,
        long_factor: Vec<f32>,
        original_max_position_embeddings: usize,
        attention_factor: f32,
    },
}

/// Rotary settings resolved from either config layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f32,
    pub scaling: RopeScaling,
}

impl LlamaConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Rotary base and scaling from `rope_parameters` (transformers >= 5) or
    /// `rope_theta` + `rope_scaling` (older configs). Unsupported scalings are an error.
    pub fn rope(&self) -> Result<Rope> {
        let params = self
            .rope_parameters
            .as_ref()
            .or(self.rope_scaling.as_ref())
            .filter(|v| !v.is_null());
        let field = |name: &str| params.and_then(|p| p.get(name)).and_then(|v| v.as_f64());
        let theta = field("rope_theta").or(self.rope_theta).unwrap_or(10000.0) as f32;
        let kind = params
            .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let need = |name: &str| {
            field(name).map(|v| v as f32).ok_or_else(|| {
                config_error(
                    format!("text_config rope scaling {kind:?} lacks {name:?}"),
                    "a complete rope_scaling / rope_parameters object",
                )
            })
        };
        let scaling = match kind {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear {
                factor: need("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: need("factor")?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_position_embeddings: need("original_max_position_embeddings")?,
            },
            "su" | "longrope" => self.long_rope(params, kind)?,
            other => {
                return Err(config_error(
                    format!("unsupported text_config rope scaling type {other:?}"),
                    "rope_type default, linear, llama3 or longrope",
                ))
            }
        };
        Ok(Rope { theta, scaling })
    }

    /// LongRoPE's factors (one per rotary frequency), the pre-training context (in the rotary
    /// object as transformers >= 4.45 writes it; Phi-3 families with it at the top level of
    /// `config.json` copy it in) and the attention factor: given, or
    /// `sqrt(1 + ln(max / original) / ln(original))` when the context is extended, as Phi-3's
    /// `Phi3SuScaledRotaryEmbedding` computes it (in f64, applied in f32).
    fn long_rope(&self, params: Option<&serde_json::Value>, kind: &str) -> Result<RopeScaling> {
        let half = self.head_dim() / 2;
        let factors = |name: &str| -> Result<Vec<f32>> {
            let list = params
                .and_then(|p| p.get(name))
                .and_then(|v| v.as_array())
                .map(|a| a.iter().filter_map(|x| x.as_f64()).map(|x| x as f32));
            match list.map(Iterator::collect::<Vec<f32>>) {
                Some(v) if v.len() == half && v.iter().all(|f| f.is_finite() && *f > 0.0) => Ok(v),
                _ => Err(config_error(
                    format!("rope scaling {kind:?}: {name} is missing or malformed"),
                    &format!("{half} positive numbers (head_dim / 2)"),
                )),
            }
        };
        let original = params
            .and_then(|p| p.get("original_max_position_embeddings"))
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .filter(|&n| n > 1)
            .ok_or_else(|| {
                config_error(
                    format!("rope scaling {kind:?} without original_max_position_embeddings"),
                    "original_max_position_embeddings above 1",
                )
            })?;
        let scale = self.max_position_embeddings as f64 / original as f64;
        let attention_factor = match params.and_then(|p| p.get("attention_factor")) {
            Some(v) => v.as_f64().ok_or_else(|| {
                config_error(
                    format!("rope scaling {kind:?}: attention_factor {v} is not a number"),
                    "a number",
                )
            })?,
            None if scale <= 1.0 => 1.0,
            None => (1.0 + scale.ln() / (original as f64).ln()).sqrt(),
        };
        Ok(RopeScaling::LongRope {
            short_factor: factors("short_factor")?,
            long_factor: factors("long_factor")?,
            original_max_position_embeddings: original,
            attention_factor: attention_factor as f32,
        })
    }

    pub(super) fn validate(&self) -> Result<()> {
        if let Some(mt) = &self.model_type {
            if mt != "llama" {
                return Err(config_error(
                    format!("text_config.model_type {mt:?} is not supported here"),
                    "a llama text model",
                ));
            }
        }
        let heads = self.num_attention_heads;
        let kv = self.kv_heads();
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
            return Err(config_error(
                format!(
                    "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
                ),
                "attention heads divisible by key/value heads",
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(config_error(
                format!("head_dim {} is odd", self.head_dim()),
                "an even head_dim for rotary embeddings",
            ));
        }
        if self.hidden_act != "silu" {
            return Err(config_error(
                format!("unsupported text_config.hidden_act {:?}", self.hidden_act),
                "silu",
            ));
        }
        if let Some(sections) = &self.mrope_section {
            if sections.iter().sum::<usize>() != self.head_dim() / 2 {
                return Err(config_error(
                    format!("mrope_section {sections:?} does not cover head_dim / 2"),
                    "sections summing to head_dim / 2",
                ));
            }
        }
        self.rope()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::cfg;
    use super::*;

    #[test]
    fn rope_from_v5_parameters_and_legacy_keys() {
        let v5 = cfg(r#"{"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}"#);
        assert_eq!(v5.rope().unwrap().theta, 500000.0);
        let legacy = cfg(r#"{"rope_theta": 1000.0, "rope_scaling": null}"#);
        assert_eq!(legacy.rope().unwrap().theta, 1000.0);
        assert_eq!(legacy.rope().unwrap().scaling, RopeScaling::Default);
        let none = cfg("{}");
        assert_eq!(none.rope().unwrap().theta, 10000.0);
    }

    #[test]
    fn rejects_unsupported_rope_scaling() {
        let c = cfg(r#"{"rope_scaling": {"type": "yarn", "factor": 4.0}}"#);
        let err = c.rope().unwrap_err().to_string();
        assert!(err.contains("yarn"), "{err}");
        let incomplete = cfg(r#"{"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}"#);
        assert!(incomplete.rope().is_err());
    }

    #[test]
    fn eos_ids_int_or_list() {
        assert_eq!(
            cfg(r#"{"eos_token_id": 2}"#).eos_token_id.unwrap().to_vec(),
            [2]
        );
        assert_eq!(
            cfg(r#"{"eos_token_id": [2, 7]}"#)
                .eos_token_id
                .unwrap()
                .to_vec(),
            [2, 7]
        );
    }
}
