//! Ultravox's audio path: its `ModifiedWhisperEncoder` (Whisper's encoder that takes up to,
//! not exactly, `2 * max_source_positions` mel frames, slices the positional table to the
//! input, and masks keys past the valid frames) and `UltravoxProjector` (stack `stack_factor`
//! frames, RMSNorm, linear, SwiGLU, RMSNorm, linear).

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Conv1d, Conv1dConfig, LayerNorm, Linear, VarBuilder};

use super::config::{AudioConfig, UltravoxConfig};
use crate::error::{Error, Result};

const LN_EPS: f64 = 1e-5;
/// `RMSNorm(eps=1e-6)` in ultravox_model.py.
const PROJ_RMS_EPS: f64 = 1e-6;

fn linear(d_in: usize, d_out: usize, bias: bool, vb: VarBuilder) -> candle_core::Result<Linear> {
    if bias {
        candle_nn::linear(d_in, d_out, vb)
    } else {
        candle_nn::linear_no_bias(d_in, d_out, vb)
    }
}

struct EncoderLayer {
    attn_norm: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    mlp_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// Whisper's encoder over a variable number of frames.
pub struct AudioEncoder {
    conv1: Conv1d,
    conv2: Conv1d,
    positions: Tensor,
    layers: Vec<EncoderLayer>,
    norm: LayerNorm,
    heads: usize,
    n_mels: usize,
    max_frames: usize,
}

impl AudioEncoder {
    /// Loads from `vb` at the prefix holding `conv1`, `layers`, `layer_norm` (`audio_tower`).
    pub fn load(c: &AudioConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = c.d_model;
        let conv = |stride| Conv1dConfig {
            padding: 1,
            stride,
            ..Default::default()
        };
        let ln = |vb: VarBuilder| candle_nn::layer_norm(d, LN_EPS, vb);
        let layers = (0..c.encoder_layers)
            .map(|i| {
                let vb = vb.pp("layers").pp(i);
                let a = vb.pp("self_attn");
                Ok(EncoderLayer {
                    attn_norm: ln(vb.pp("self_attn_layer_norm"))?,
                    q: linear(d, d, true, a.pp("q_proj"))?,
                    k: linear(d, d, false, a.pp("k_proj"))?,
                    v: linear(d, d, true, a.pp("v_proj"))?,
                    out: linear(d, d, true, a.pp("out_proj"))?,
                    mlp_norm: ln(vb.pp("final_layer_norm"))?,
                    fc1: linear(d, c.encoder_ffn_dim, true, vb.pp("fc1"))?,
                    fc2: linear(c.encoder_ffn_dim, d, true, vb.pp("fc2"))?,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            conv1: candle_nn::conv1d(c.num_mel_bins, d, 3, conv(1), vb.pp("conv1"))?,
            conv2: candle_nn::conv1d(d, d, 3, conv(2), vb.pp("conv2"))?,
            positions: vb
                .pp("embed_positions")
                .get((c.max_source_positions, d), "weight")?,
            layers,
            norm: ln(vb.pp("layer_norm"))?,
            heads: c.encoder_attention_heads,
            n_mels: c.num_mel_bins,
            max_frames: 2 * c.max_source_positions,
        })
    }

    /// `(1, n_mels, frames)` features, of which the first `valid_frames` are real, to
    /// `(1, ceil(frames / 2), d_model)`. Keys past `(valid_frames - 1) / 2 + 1` are masked
    /// with `finfo(dtype).min`, as Ultravox's extended attention mask does.
    pub fn forward(&self, features: &Tensor, valid_frames: usize) -> Result<Tensor> {
        let (b, n_mels, frames) = features.dims3()?;
        if b != 1 || n_mels != self.n_mels || frames == 0 || frames > self.max_frames {
            return Err(Error::input(
                "input_features",
                format!("shape {:?}", features.dims()),
                format!("(1, {}, 1..={})", self.n_mels, self.max_frames),
            ));
        }
        let x = self.conv1.forward(features)?.gelu_erf()?;
        let x = self.conv2.forward(&x)?.gelu_erf()?.transpose(1, 2)?;
        let n = x.dim(1)?;
        let mut x = x.broadcast_add(&self.positions.narrow(0, 0, n)?)?;
        let valid = (valid_frames.max(1) - 1) / 2 + 1;
        let mask = if valid < n {
            let min = match x.dtype() {
                // torch.finfo(dtype).min of the half types.
                DType::F16 => -65504.0,
                DType::BF16 => -3.389_531_4e38,
                _ => f32::MIN,
            };
            let row: Vec<f32> = (0..n).map(|j| if j < valid { 0.0 } else { min }).collect();
            Some(Tensor::from_vec(row, (1, 1, 1, n), &Device::Cpu)?.to_device(x.device())?)
        } else {
            None
        };
        for layer in &self.layers {
            let h = layer.attn_norm.forward(&x)?;
            x = (&x + self.attend(layer, &h, mask.as_ref())?)?;
            let h = layer
                .fc1
                .forward(&layer.mlp_norm.forward(&x)?)?
                .gelu_erf()?;
            x = (&x + layer.fc2.forward(&h)?)?;
        }
        Ok(self.norm.forward(&x)?)
    }

    fn attend(
        &self,
        layer: &EncoderLayer,
        x: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let hd = d / self.heads;
        let split = |t: Tensor| {
            t.reshape((b, n, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(layer.q.forward(x)?)?;
        let k = split(layer.k.forward(x)?)?;
        let v = split(layer.v.forward(x)?)?;
        let mut w = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        if let Some(mask) = mask {
            w = w.broadcast_add(&mask.to_dtype(w.dtype())?)?;
        }
        let dtype = w.dtype();
        let w = candle_nn::ops::softmax_last_dim(&w.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
        let y = w.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))?;
        layer.out.forward(&y)
    }
}

/// Llama-style RMSNorm (f32 statistics) with a learned weight.
struct RmsNorm {
    weight: Tensor,
}

impl RmsNorm {
    fn load(size: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = xs.dtype();
        let x = xs.to_dtype(DType::F32)?;
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x.broadcast_div(&(var + PROJ_RMS_EPS)?.sqrt()?)?;
        normed.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

/// `UltravoxProjector`: encoder frames to language-model embeddings.
pub struct Projector {
    stack_factor: usize,
    ln_pre: RmsNorm,
    linear_1: Linear,
    ln_mid: Option<RmsNorm>,
    linear_2: Linear,
    ln_post: Option<RmsNorm>,
}

impl Projector {
    /// Loads `multi_modal_projector` for a language model of `text_hidden` width.
    pub fn load(
        c: &UltravoxConfig,
        text_hidden: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let dim_in = c.audio.d_model * c.stack_factor;
        let dim_mid = c.projector_hidden / 2;
        let (ln_mid, ln_post) = if c.projector_ln_mid {
            (Some(RmsNorm::load(dim_mid, vb.pp("ln_mid"))?), None)
        } else {
            (None, Some(RmsNorm::load(text_hidden, vb.pp("ln_post"))?))
        };
        Ok(Self {
            stack_factor: c.stack_factor,
            ln_pre: RmsNorm::load(dim_in, vb.pp("ln_pre"))?,
            linear_1: linear(dim_in, c.projector_hidden, false, vb.pp("linear_1"))?,
            ln_mid,
            linear_2: linear(dim_mid, text_hidden, false, vb.pp("linear_2"))?,
            ln_post,
        })
    }

    /// `(1, frames, d_model)` -> `(1, ceil(frames / stack_factor), text_hidden)`; the last
    /// stack is zero padded.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let s = self.stack_factor;
        let t_pad = t.div_ceil(s) * s;
        let x = if t_pad > t {
            x.pad_with_zeros(1, 0, t_pad - t)?
        } else {
            x.clone()
        };
        let x = x.reshape((b, t_pad / s, c * s))?;
        let h = self.linear_1.forward(&self.ln_pre.forward(&x)?)?;
        // SwiGLU: the first half is the value, the second the gate.
        let half = h.dim(D::Minus1)? / 2;
        let value = h.narrow(D::Minus1, 0, half)?;
        let gate = h.narrow(D::Minus1, half, half)?;
        let mut h = (candle_nn::ops::silu(&gate)? * value)?;
        if let Some(n) = &self.ln_mid {
            h = n.forward(&h)?;
        }
        let mut h = self.linear_2.forward(&h)?;
        if let Some(n) = &self.ln_post {
            h = n.forward(&h)?;
        }
        Ok(h)
    }
}
