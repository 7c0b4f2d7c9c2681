//! Whisper's audio encoder, as Whisper, Qwen2-Audio and Ultravox run it: two GELU
//! convolutions (the second with stride 2), learned positions, pre-LN transformer layers and a
//! final layer norm. The families differ only around it (which frames they keep, masked keys,
//! pooling), so they call its three stages themselves.

use candle_core::{Module, Tensor};
use candle_nn::{Conv1d, Conv1dConfig, LayerNorm, Linear, VarBuilder};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

const LN_EPS: f64 = 1e-5;

/// The encoder keys of a Whisper `config.json`, which Qwen2-Audio's and Ultravox's
/// `audio_config` share; only their defaults differ (see [`WhisperEncoderConfig::from_value`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhisperEncoderConfig {
    pub d_model: usize,
    pub encoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub encoder_ffn_dim: usize,
    pub num_mel_bins: usize,
    pub max_source_positions: usize,
    #[serde(default = "gelu")]
    pub activation_function: String,
}

fn gelu() -> String {
    "gelu".into()
}

impl WhisperEncoderConfig {
    /// Parses the object `value`, taking each key it lacks from `defaults` (a family's
    /// transformers defaults) as serde's `#[serde(default = ...)]` would. A Whisper
    /// `config.json`, which has no such defaults, embeds the struct with `#[serde(flatten)]`.
    pub fn from_value(value: &Value, defaults: &Self) -> serde_json::Result<Self> {
        let mut merged = serde_json::to_value(defaults)?;
        match (&mut merged, value) {
            (Value::Object(keys), Value::Object(given)) => {
                keys.extend(given.iter().map(|(k, v)| (k.clone(), v.clone())));
                serde_json::from_value(merged)
            }
            _ => serde_json::from_value(value.clone()),
        }
    }

    /// Mel frames the positions cover: `2 * max_source_positions` (3000, 30 s, for Whisper).
    pub fn max_frames(&self) -> usize {
        2 * self.max_source_positions
    }
}

/// Where the attention scale is applied: transformers' Qwen2-Audio encoder scales the queries
/// before the product, Whisper's (and Ultravox's) the scores after it. Kept apart so that each
/// family rounds as its reference does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleAt {
    Queries,
    Scores,
}

struct Layer {
    attn_norm: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    mlp_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

pub struct WhisperEncoder {
    conv1: Conv1d,
    conv2: Conv1d,
    /// `(max_source_positions, d_model)`.
    positions: Tensor,
    layers: Vec<Layer>,
    norm: LayerNorm,
    heads: usize,
    scale_at: ScaleAt,
    n_mels: usize,
}

impl WhisperEncoder {
    /// Loads from `vb` at the prefix holding `conv1`, `layers`, `layer_norm`.
    pub fn load(
        s: &WhisperEncoderConfig,
        scale_at: ScaleAt,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let d = s.d_model;
        let ln = |vb: VarBuilder| candle_nn::layer_norm(d, LN_EPS, vb);
        let conv = |stride| Conv1dConfig {
            padding: 1,
            stride,
            ..Default::default()
        };
        let layers = (0..s.encoder_layers)
            .map(|i| {
                let vb = vb.pp("layers").pp(i);
                let a = vb.pp("self_attn");
                Ok(Layer {
                    attn_norm: ln(vb.pp("self_attn_layer_norm"))?,
                    q: candle_nn::linear(d, d, a.pp("q_proj"))?,
                    k: candle_nn::linear_no_bias(d, d, a.pp("k_proj"))?,
                    v: candle_nn::linear(d, d, a.pp("v_proj"))?,
                    out: candle_nn::linear(d, d, a.pp("out_proj"))?,
                    mlp_norm: ln(vb.pp("final_layer_norm"))?,
                    fc1: candle_nn::linear(d, s.encoder_ffn_dim, vb.pp("fc1"))?,
                    fc2: candle_nn::linear(s.encoder_ffn_dim, d, vb.pp("fc2"))?,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            conv1: candle_nn::conv1d(s.num_mel_bins, d, 3, conv(1), vb.pp("conv1"))?,
            conv2: candle_nn::conv1d(d, d, 3, conv(2), vb.pp("conv2"))?,
            positions: vb
                .pp("embed_positions")
                .get((s.max_source_positions, d), "weight")?,
            layers,
            norm: ln(vb.pp("layer_norm"))?,
            heads: s.encoder_attention_heads,
            scale_at,
            n_mels: s.num_mel_bins,
        })
    }

    /// Most mel frames the positions cover (`2 * max_source_positions`).
    pub fn max_frames(&self) -> usize {
        2 * self.positions.dims()[0]
    }

    /// The convolutions plus positions: `(1, n_mels, frames)` -> `(1, ceil(frames / 2), d)`.
    pub fn embed(&self, features: &Tensor) -> Result<Tensor> {
        let (b, n_mels, frames) = features.dims3()?;
        if b != 1 || n_mels != self.n_mels || frames == 0 || frames > self.max_frames() {
            return Err(Error::input(
                "input_features",
                format!("shape {:?}", features.dims()),
                format!("(1, {}, 1..={})", self.n_mels, self.max_frames()),
            ));
        }
        let x = self.conv1.forward(features)?.gelu_erf()?;
        let x = self.conv2.forward(&x)?.gelu_erf()?.transpose(1, 2)?;
        let n = x.dim(1)?;
        Ok(x.broadcast_add(&self.positions.narrow(0, 0, n)?)?)
    }

    /// The transformer layers over `x` `(1, n, d)`; `mask` is added to every head's scores
    /// (`(1, 1, 1, n)`, 0 for keys kept and a large negative number for the others).
    pub fn layers(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let mask = mask.map(|m| m.to_dtype(x.dtype())).transpose()?;
        let mut x = x.clone();
        for layer in &self.layers {
            let h = layer.attn_norm.forward(&x)?;
            x = (&x + self.attend(layer, &h, mask.as_ref())?)?;
            let h = layer
                .fc1
                .forward(&layer.mlp_norm.forward(&x)?)?
                .gelu_erf()?;
            x = (&x + layer.fc2.forward(&h)?)?;
        }
        Ok(x)
    }

    /// The final layer norm.
    pub fn norm(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.norm.forward(x)?)
    }

    /// Bidirectional attention of one layer, softmax in f32.
    fn attend(
        &self,
        layer: &Layer,
        x: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let hd = x.dim(2)? / self.heads;
        // Each reference's own expression for the scale (they can differ in the last bit).
        let scale = match self.scale_at {
            ScaleAt::Queries => (hd as f64).powf(-0.5),
            ScaleAt::Scores => 1.0 / (hd as f64).sqrt(),
        };
        let q = layer.q.forward(x)?;
        let q = match self.scale_at {
            ScaleAt::Queries => (q * scale)?,
            ScaleAt::Scores => q,
        };
        let score_scale = (self.scale_at == ScaleAt::Scores).then_some(scale);
        let (k, v) = (layer.k.forward(x)?, layer.v.forward(x)?);
        // On the CPU without all heads' (n, n) scores in memory at once.
        let y = crate::kernels::cpu::attention(&q, &k, &v, self.heads, score_scale, mask)?;
        layer.out.forward(&y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn missing_keys_take_the_family_defaults() {
        let defaults = WhisperEncoderConfig {
            d_model: 8,
            encoder_layers: 1,
            encoder_attention_heads: 2,
            encoder_ffn_dim: 16,
            num_mel_bins: 80,
            max_source_positions: 10,
            activation_function: "gelu".into(),
        };
        let given = json!({"d_model": 16, "model_type": "whisper"});
        let c = WhisperEncoderConfig::from_value(&given, &defaults).unwrap();
        let want = WhisperEncoderConfig {
            d_model: 16,
            ..defaults.clone()
        };
        assert_eq!(c, want);
        assert_eq!(c.max_frames(), 20);
        // A key given as null is refused, as with serde's own defaults; so is a non-object.
        assert!(WhisperEncoderConfig::from_value(&json!({"d_model": null}), &defaults).is_err());
        assert!(WhisperEncoderConfig::from_value(&json!([1]), &defaults).is_err());
    }
}
