//! Qwen2-Audio's audio tower (`Qwen2AudioEncoder`): Whisper's two convolutions, learned
//! positions and pre-LN layers, then `AvgPool1d(2, 2)` and a final layer norm; and the
//! multi-modal projector (one linear layer) into the language model's hidden size.
//!
//! HF runs the layers over all `max_source_positions` positions with the keys past the audio's
//! valid length masked out, and keeps only the first `tokens` pooled rows. Every kept row
//! depends only on valid positions, so this runs the layers over the valid positions alone:
//! the same values, without the padding's cost.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use super::output_lengths;
use crate::error::{Error, Result};
use crate::models::common::whisper_encoder::{ScaleAt, WhisperEncoder, WhisperEncoderConfig};

/// The audio tower plus the projector.
pub struct AudioEncoder {
    /// Its final layer norm runs after the pooling.
    tower: WhisperEncoder,
    projector: Linear,
    n_mels: usize,
    frames: usize,
    dtype: DType,
}

impl AudioEncoder {
    /// `tower` holds `conv1`, `layers`, `layer_norm`…; `projector` holds `linear`.
    pub fn load(
        c: &WhisperEncoderConfig,
        text_hidden: usize,
        tower: VarBuilder,
        projector: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            tower: WhisperEncoder::load(c, ScaleAt::Queries, tower.clone())?,
            projector: candle_nn::linear(c.d_model, text_hidden, projector.pp("linear"))?,
            n_mels: c.num_mel_bins,
            frames: c.max_frames(),
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
        let x = self.tower.embed(&input_features.to_dtype(self.dtype)?)?;
        let x = self.tower.layers(&x.narrow(1, 0, conv_len)?, None)?;
        // AvgPool1d(2, 2) over time: the mean of each pair of positions.
        let d = x.dim(D::Minus1)?;
        let pooled = x
            .narrow(1, 0, 2 * tokens)?
            .reshape((tokens, 2, d))?
            .mean(1)?;
        let y = self.tower.norm(&pooled)?;
        Ok(self.projector.forward(&y)?)
    }
}
