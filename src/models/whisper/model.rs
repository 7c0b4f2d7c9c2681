//! Whisper's decoder: self-attention on the engine's [`KvCache`], cross-attention on the
//! encoder output kept in `KvCache::cross` (the encoder is `common::whisper_encoder`).

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};

use super::config::WhisperConfig;
use crate::error::{Error, Result};
use crate::kernels::cpu::linear as linear_cpu;
use crate::models::kv::KvCache;

const LN_EPS: f64 = 1e-5;

fn linear(d_in: usize, d_out: usize, bias: bool, vb: VarBuilder) -> candle_core::Result<Linear> {
    if bias {
        candle_nn::linear(d_in, d_out, vb)
    } else {
        candle_nn::linear_no_bias(d_in, d_out, vb)
    }
}

fn layer_norm(d: usize, vb: VarBuilder) -> candle_core::Result<LayerNorm> {
    candle_nn::layer_norm(d, LN_EPS, vb)
}

/// Scaled dot-product attention over `(1, heads, n, head_dim)` tensors; softmax in f32.
fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let head_dim = q.dim(D::Minus1)?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let mut w = (q.matmul(&k.t()?)? * scale)?;
    if let Some(mask) = mask {
        w = w.broadcast_add(mask)?;
    }
    let dtype = w.dtype();
    let w = candle_nn::ops::softmax_last_dim(&w.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
    w.matmul(v)
}

#[derive(Debug, Clone)]
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
            q: linear(d, d, true, vb.pp("q_proj"))?,
            k: linear(d, d, false, vb.pp("k_proj"))?,
            v: linear(d, d, true, vb.pp("v_proj"))?,
            out: linear(d, d, true, vb.pp("out_proj"))?,
            heads,
        })
    }

    /// `(1, n, d)` -> `(1, heads, n, head_dim)`.
    fn split(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        x.reshape((b, n, self.heads, d / self.heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    fn merge(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, h, n, hd) = x.dims4()?;
        x.transpose(1, 2)?.reshape((b, n, h * hd))
    }

    fn project_kv(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            self.split(&linear_cpu(&self.k, x)?)?,
            self.split(&linear_cpu(&self.v, x)?)?,
        ))
    }

    fn forward_with(
        &self,
        x: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let q = self.split(&linear_cpu(&self.q, x)?)?;
        let y = attend(&q, k, v, mask)?;
        linear_cpu(&self.out, &self.merge(&y)?)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    norm: LayerNorm,
}

impl Mlp {
    fn load(d: usize, ffn: usize, vb: &VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            fc1: linear(d, ffn, true, vb.pp("fc1"))?,
            fc2: linear(ffn, d, true, vb.pp("fc2"))?,
            norm: layer_norm(d, vb.pp("final_layer_norm"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = linear_cpu(&self.fc1, &self.norm.forward(x)?)?.gelu_erf()?;
        x + linear_cpu(&self.fc2, &h)?
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    self_norm: LayerNorm,
    cross_attn: Attention,
    cross_norm: LayerNorm,
    mlp: Mlp,
}

#[derive(Debug, Clone)]
pub(super) struct Decoder {
    embed: Embedding,
    positions: Tensor,
    layers: Vec<DecoderLayer>,
    norm: LayerNorm,
    /// `(vocab, d_model)`: the token embeddings unless the checkpoint unties them.
    proj_out: Tensor,
    embed_scale: f64,
    pub(super) heads: usize,
    pub(super) max_positions: usize,
}

impl Decoder {
    pub(super) fn load(
        c: &WhisperConfig,
        vb: VarBuilder,
        proj_out: Option<VarBuilder>,
    ) -> candle_core::Result<Self> {
        let d = c.encoder.d_model;
        let embed = candle_nn::embedding(c.vocab_size, d, vb.pp("embed_tokens"))?;
        let layers = (0..c.decoder_layers)
            .map(|i| {
                let vb = vb.pp("layers").pp(i);
                Ok(DecoderLayer {
                    self_attn: Attention::load(d, c.decoder_attention_heads, vb.pp("self_attn"))?,
                    self_norm: layer_norm(d, vb.pp("self_attn_layer_norm"))?,
                    cross_attn: Attention::load(
                        d,
                        c.decoder_attention_heads,
                        vb.pp("encoder_attn"),
                    )?,
                    cross_norm: layer_norm(d, vb.pp("encoder_attn_layer_norm"))?,
                    mlp: Mlp::load(d, c.decoder_ffn_dim, &vb)?,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        let proj_out = match proj_out {
            Some(vb) => vb.get((c.vocab_size, d), "weight")?,
            None => embed.embeddings().clone(),
        };
        Ok(Self {
            positions: vb
                .pp("embed_positions")
                .get((c.max_target_positions, d), "weight")?,
            embed,
            layers,
            norm: layer_norm(d, vb.pp("layer_norm"))?,
            proj_out,
            embed_scale: if c.scale_embedding {
                (d as f64).sqrt()
            } else {
                1.0
            },
            heads: c.decoder_attention_heads,
            max_positions: c.max_target_positions,
        })
    }

    pub(super) fn embed_tokens(&self, ids: &[u32]) -> Result<Tensor> {
        let vocab = self.proj_out.dim(0)?;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::input(
                "prompt",
                format!("token id {bad} is outside the vocabulary"),
                format!("ids below {vocab}"),
            ));
        }
        let t = Tensor::new(ids, self.positions.device())?;
        let e = self.embed.forward(&t)?;
        Ok(if self.embed_scale != 1.0 {
            (e * self.embed_scale)?
        } else {
            e
        })
    }

    /// Cross-attention keys and values of every layer for `encoder_states` `(positions, d)`.
    pub(super) fn cross_kv(&self, encoder_states: &Tensor) -> Result<Vec<(Tensor, Tensor)>> {
        let x = encoder_states.unsqueeze(0)?;
        Ok(self
            .layers
            .iter()
            .map(|l| l.cross_attn.project_kv(&x))
            .collect::<candle_core::Result<_>>()?)
    }

    /// Runs `embeds` `(seq, d)` after the positions in `cache`; returns the last position's
    /// logits `(vocab,)` in f32.
    pub(super) fn forward(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (seq, _) = embeds.dims2()?;
        let start = cache.len();
        if seq == 0 {
            return Err(anyhow::anyhow!("empty decoder input").into());
        }
        if start + seq > self.max_positions {
            return Err(Error::input(
                "prompt",
                format!("{} decoder positions needed", start + seq),
                format!("at most {} (max_target_positions)", self.max_positions),
            ));
        }
        if cache.cross.len() != self.layers.len() {
            return Err(anyhow::anyhow!(
                "Whisper decoder run before its encoder output was attached (prefill first)"
            )
            .into());
        }
        let pos = self.positions.narrow(0, start, seq)?;
        let mut x = (embeds + pos)?.unsqueeze(0)?;
        let mask = if seq > 1 {
            let total = start + seq;
            let rows: Vec<f32> = (0..seq)
                .flat_map(|i| {
                    (0..total).map(move |j| {
                        if j <= start + i {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                })
                .collect();
            Some(Tensor::from_vec(rows, (1, 1, seq, total), x.device())?.to_dtype(x.dtype())?)
        } else {
            None
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.self_norm.forward(&x)?;
            let (k, v) = layer.self_attn.project_kv(&h)?;
            let (k, v) = cache.append(i, &k, &v)?;
            x = (&x + layer.self_attn.forward_with(&h, &k, &v, mask.as_ref())?)?;
            let h = layer.cross_norm.forward(&x)?;
            let (ck, cv) = &cache.cross[i];
            x = (&x + layer.cross_attn.forward_with(&h, ck, cv, None)?)?;
            x = layer.mlp.forward(&x)?;
        }
        cache.advance(seq);
        let last = self.norm.forward(&x.narrow(1, seq - 1, 1)?)?;
        let logits = last.squeeze(0)?.squeeze(0)?.unsqueeze(0)?;
        let logits = crate::kernels::cpu::matmul_t(&logits, &self.proj_out)?;
        Ok(logits.squeeze(0)?.to_dtype(DType::F32)?)
    }

    pub(super) fn device(&self) -> &Device {
        self.positions.device()
    }
}
