//! Qwen2-Audio's audio tower (`Qwen2AudioEncoder`): Whisper's two convolutions, learned
//! positions and pre-LN layers, then `AvgPool1d(2, 2)` and a final layer norm; and the
//! multi-modal projector (one linear layer) into the language model's hidden size.
//!
//! HF runs the layers over all `max_source_positions` positions with the keys past the audio's
//! valid length masked out, and keeps only the first `tokens` pooled rows. Every kept row
//! depends only on valid positions, so this runs the layers over the valid positions alone:
//! the same values, without the padding's cost.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{Conv1d, Conv1dConfig, LayerNorm, Linear, VarBuilder};

use super::config::AudioConfig;
use super::output_lengths;
use crate::error::{Error, Result};

const LN_EPS: f64 = 1e-5;

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl Attention {
    fn load(d: usize, heads: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            q: candle_nn::linear(d, d, vb.pp("q_proj"))?,
            k: candle_nn::linear_no_bias(d, d, vb.pp("k_proj"))?,
            v: candle_nn::linear(d, d, vb.pp("v_proj"))?,
            out: candle_nn::linear(d, d, vb.pp("out_proj"))?,
            heads,
        })
    }

    /// Bidirectional attention over `(1, n, d)`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let hd = d / self.heads;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, n, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        // HF scales the queries before the product (not the scores): same order here.
        let q = split((self.q.forward(x)? * (hd as f64).powf(-0.5))?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let w = q.matmul(&k.t()?)?;
        let dtype = w.dtype();
        let w = candle_nn::ops::softmax_last_dim(&w.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
        let y = w.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))?;
        self.out.forward(&y)
    }
}

struct Layer {
    attn_norm: LayerNorm,
    attn: Attention,
    mlp_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl Layer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.attn.forward(&self.attn_norm.forward(x)?)?)?;
        let h = self.fc1.forward(&self.mlp_norm.forward(&x)?)?.gelu_erf()?;
        &x + self.fc2.forward(&h)?
    }
}

/// The audio tower plus the projector.
pub struct AudioEncoder {
    conv1: Conv1d,
    conv2: Conv1d,
    /// `(max_source_positions, d_model)`.
    positions: Tensor,
    layers: Vec<Layer>,
    norm: LayerNorm,
    projector: Linear,
    n_mels: usize,
    frames: usize,
    dtype: DType,
}

impl AudioEncoder {
    /// `tower` holds `conv1`, `layers`, `layer_norm`…; `projector` holds `linear`.
    pub fn load(
        c: &AudioConfig,
        text_hidden: usize,
        tower: VarBuilder,
        projector: VarBuilder,
    ) -> Result<Self> {
        let d = c.d_model;
        let ln = |vb: VarBuilder| candle_nn::layer_norm(d, LN_EPS, vb);
        let conv = |stride| Conv1dConfig {
            padding: 1,
            stride,
            ..Default::default()
        };
        let layers = (0..c.encoder_layers)
            .map(|i| {
                let vb = tower.pp("layers").pp(i);
                Ok(Layer {
                    attn_norm: ln(vb.pp("self_attn_layer_norm"))?,
                    attn: Attention::load(d, c.encoder_attention_heads, vb.pp("self_attn"))?,
                    mlp_norm: ln(vb.pp("final_layer_norm"))?,
                    fc1: candle_nn::linear(d, c.encoder_ffn_dim, vb.pp("fc1"))?,
                    fc2: candle_nn::linear(c.encoder_ffn_dim, d, vb.pp("fc2"))?,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            conv1: candle_nn::conv1d(c.num_mel_bins, d, 3, conv(1), tower.pp("conv1"))?,
            conv2: candle_nn::conv1d(d, d, 3, conv(2), tower.pp("conv2"))?,
            positions: tower
                .pp("embed_positions")
                .get((c.max_source_positions, d), "weight")?,
            layers,
            norm: ln(tower.pp("layer_norm"))?,
            projector: candle_nn::linear(d, text_hidden, projector.pp("linear"))?,
            n_mels: c.num_mel_bins,
            frames: 2 * c.max_source_positions,
            dtype: tower.dtype(),
        })
    }

    /// Projected audio features `(tokens, text_hidden)` for `input_features`
    /// `(1, n_mels, 2 * max_source_positions)` whose attention mask sums to `valid_frames`;
    /// `tokens` is [`output_lengths`]`(valid_frames).1`.
    pub fn forward(&self, input_features: &Tensor, valid_frames: usize) -> Result<Tensor> {
        let dims = input_features.dims();
        if dims != [1, self.n_mels, self.frames] || valid_frames > self.frames {
            return Err(Error::input(
                "input_features",
                format!("shape {dims:?} with {valid_frames} valid frames"),
                format!(
                    "(1, {}, {}) with at most {} valid frames",
                    self.n_mels, self.frames, self.frames
                ),
            ));
        }
        let (conv_len, tokens) = output_lengths(valid_frames);
        let hidden = self.projector.weight().dim(0)?;
        if tokens == 0 {
            return Ok(Tensor::zeros(
                (0, hidden),
                self.dtype,
                input_features.device(),
            )?);
        }
        let x = input_features.to_dtype(self.dtype)?;
        let x = self.conv1.forward(&x)?.gelu_erf()?;
        let x = self.conv2.forward(&x)?.gelu_erf()?.transpose(1, 2)?;
        let mut x = x.broadcast_add(&self.positions)?.narrow(1, 0, conv_len)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        // AvgPool1d(2, 2) over time: the mean of each pair of positions.
        let d = x.dim(D::Minus1)?;
        let pooled = x
            .narrow(1, 0, 2 * tokens)?
            .reshape((tokens, 2, d))?
            .mean(1)?;
        let y = self.norm.forward(&pooled)?;
        Ok(self.projector.forward(&y)?)
    }
}
