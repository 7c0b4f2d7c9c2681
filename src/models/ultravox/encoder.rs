//! Ultravox's audio path: its `ModifiedWhisperEncoder` (Whisper's encoder that takes up to,
//! not exactly, `2 * max_source_positions` mel frames, slices the positional table to the
//! input, and masks keys past the valid frames) and `UltravoxProjector` (stack `stack_factor`
//! frames, RMSNorm, linear, SwiGLU, RMSNorm, linear).

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use super::config::UltravoxConfig;
use crate::error::Result;
use crate::models::common::whisper_encoder::{ScaleAt, WhisperEncoder, WhisperEncoderConfig};
/// `RMSNorm(eps=1e-6)` in ultravox_model.py.
const PROJ_RMS_EPS: f64 = 1e-6;

fn linear(d_in: usize, d_out: usize, bias: bool, vb: VarBuilder) -> candle_core::Result<Linear> {
    if bias {
        candle_nn::linear(d_in, d_out, vb)
    } else {
        candle_nn::linear_no_bias(d_in, d_out, vb)
    }
}

/// Whisper's encoder over a variable number of frames.
pub struct AudioEncoder {
    tower: WhisperEncoder,
}

impl AudioEncoder {
    /// Loads from `vb` at the prefix holding `conv1`, `layers`, `layer_norm` (`audio_tower`).
    pub fn load(c: &WhisperEncoderConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            tower: WhisperEncoder::load(c, ScaleAt::Scores, vb)?,
        })
    }

    /// `(1, n_mels, frames)` features, of which the first `valid_frames` are real, to
    /// `(1, ceil(frames / 2), d_model)`. Keys past `(valid_frames - 1) / 2 + 1` are masked
    /// with `finfo(dtype).min`, as Ultravox's extended attention mask does.
    pub fn forward(&self, features: &Tensor, valid_frames: usize) -> Result<Tensor> {
        let x = self.tower.embed(features)?;
        let n = x.dim(1)?;
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
        let x = self.tower.layers(&x, mask.as_ref())?;
        self.tower.norm(&x)
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
