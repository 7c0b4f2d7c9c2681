//! The decoder's layers: RMSNorm, grouped-query attention with q/k/v in one matmul, the
//! SwiGLU MLP, rotary tables and the causal mask, as the unfused (CPU and plain candle) path
//! runs them; the fused CUDA step (`fused.rs`) reads their weights.

use candle_core::{DType, Device, Tensor};
use candle_nn::{linear_b, Linear, VarBuilder};

use super::config::{LlamaConfig, Rope, RopeScaling};
use crate::kernels;
// `l.forward(x)`, with a decode step's few CPU rows through the multithreaded GEMV.
use crate::kernels::cpu::linear;
use crate::models::kv::KvCache;

/// Inverse rotary frequencies in f32, computed as transformers does (f32 throughout). For
/// LongRoPE these are the short factors' (see [`long_inv_freqs`]).
pub(super) fn inv_freqs(rope: &Rope, head_dim: usize) -> Vec<f32> {
    let dim = head_dim as f32;
    let base: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1.0 / rope.theta.powf(i as f32 / dim))
        .collect();
    match rope.scaling {
        RopeScaling::Default => base,
        RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
        RopeScaling::LongRope {
            ref short_factor, ..
        } => divided(rope.theta, head_dim, short_factor),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen > low_wavelen {
                        f / factor
                    } else if wavelen < high_wavelen {
                        f
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// LongRoPE's long-factor frequencies and the length past which a forward takes them; `None`
/// for other scalings.
pub(super) fn long_inv_freqs(rope: &Rope, head_dim: usize) -> Option<(Vec<f32>, usize)> {
    match &rope.scaling {
        RopeScaling::LongRope {
            long_factor,
            original_max_position_embeddings,
            ..
        } => Some((
            divided(rope.theta, head_dim, long_factor),
            *original_max_position_embeddings,
        )),
        _ => None,
    }
}

/// `1 / (factor * theta ^ (i / dim))` in f32, in Phi-3's order of operations.
fn divided(theta: f32, head_dim: usize, factors: &[f32]) -> Vec<f32> {
    let dim = head_dim as f32;
    (0..head_dim)
        .step_by(2)
        .zip(factors)
        .map(|(i, f)| 1.0 / (f * theta.powf(i as f32 / dim)))
        .collect()
}

/// An RMSNorm's weight; the norm itself is [`kernels::add_rms_norm`] with the config's eps,
/// fused with the residual add before it (one kernel on CUDA).
pub(super) struct RmsNorm {
    pub(super) weight: Tensor,
}

impl RmsNorm {
    pub(super) fn new(size: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            // The hint only matters for freshly initialised weights (tests); files ignore it.
            weight: vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?,
        })
    }
}

/// Self-attention with q, k and v projected by one matmul (their weights concatenated at load).
pub(super) struct Attention {
    pub(super) qkv: Linear,
    pub(super) qkv_bias: Option<Tensor>,
    pub(super) o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// The flash attention kernel where it applies; off only to compare with the eager path.
    pub(super) use_flash: bool,
}

/// One matmul for several projections of the same input: the weights of `parts` stacked by
/// output row, and their biases (all or none) likewise.
fn fuse(parts: &[Linear]) -> candle_core::Result<(Linear, Option<Tensor>)> {
    let weights: Vec<&Tensor> = parts.iter().map(|l| l.weight()).collect();
    let biases: Option<Vec<&Tensor>> = parts.iter().map(|l| l.bias()).collect();
    let bias = biases.map(|b| Tensor::cat(&b, 0)).transpose()?;
    Ok((Linear::new(kernels::cpu::cat_rows(&weights)?, None), bias))
}

/// A projection stored already fused (Phi-3's `qkv_proj`, `gate_up_proj`), split as [`fuse`]
/// returns its parts: the weight, and the bias apart.
fn stored_fused(l: Linear) -> (Linear, Option<Tensor>) {
    (Linear::new(l.weight().clone(), None), l.bias().cloned())
}

/// `l`'s first `rows` output rows (weight and bias) multiplied by `factor`.
fn scale_rows(
    l: Linear,
    bias: Option<Tensor>,
    rows: usize,
    factor: f32,
) -> candle_core::Result<(Linear, Option<Tensor>)> {
    let scale = |t: &Tensor| -> candle_core::Result<Tensor> {
        let rest = t.dim(0)? - rows;
        Tensor::cat(
            &[
                t.narrow(0, 0, rows)?.affine(factor as f64, 0.0)?,
                t.narrow(0, rows, rest)?,
            ],
            0,
        )
    };
    Ok((
        Linear::new(scale(l.weight())?, None),
        bias.as_ref().map(scale).transpose()?,
    ))
}

impl Attention {
    /// `qk_scale` multiplies the q and k projections: LongRoPE's attention factor, which
    /// transformers applies to cos and sin. Rotation is linear in cos and sin, so scaling q
    /// and k before it is the same product, and it holds for the fused decode step too.
    pub(super) fn new(
        cfg: &LlamaConfig,
        vb: VarBuilder,
        qk_scale: f32,
    ) -> candle_core::Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (heads, kv) = (cfg.num_attention_heads, cfg.kv_heads());
        let bias = cfg.attention_bias;
        let qkv_bias = bias || cfg.qkv_bias;
        let (qkv, qkv_bias) = if vb.contains_tensor("qkv_proj.weight") {
            stored_fused(linear_b(
                h,
                (heads + 2 * kv) * hd,
                qkv_bias,
                vb.pp("qkv_proj"),
            )?)
        } else {
            fuse(&[
                linear_b(h, heads * hd, qkv_bias, vb.pp("q_proj"))?,
                linear_b(h, kv * hd, qkv_bias, vb.pp("k_proj"))?,
                linear_b(h, kv * hd, qkv_bias, vb.pp("v_proj"))?,
            ])?
        };
        let (qkv, qkv_bias) = if qk_scale == 1.0 {
            (qkv, qkv_bias)
        } else {
            scale_rows(qkv, qkv_bias, (heads + kv) * hd, qk_scale)?
        };
        Ok(Self {
            qkv,
            qkv_bias,
            o: linear_b(heads * hd, h, bias, vb.pp("o_proj"))?,
            heads,
            kv_heads: kv,
            head_dim: hd,
            use_flash: true,
        })
    }

    /// q, k, v `(rows, heads, hd)`-shaped per `split`, biases added.
    fn project(
        &self,
        xs: &Tensor,
        split: impl Fn(Tensor, usize) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let mut qkv = linear(&self.qkv, xs)?;
        if let Some(b) = &self.qkv_bias {
            qkv = kernels::bias_add(&qkv, b)?;
        }
        let (q_w, kv_w) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let last = qkv.rank() - 1;
        Ok((
            split(qkv.narrow(last, 0, q_w)?, self.heads)?,
            split(qkv.narrow(last, q_w, kv_w)?, self.kv_heads)?,
            split(qkv.narrow(last, q_w + kv_w, kv_w)?, self.kv_heads)?,
        ))
    }

    pub(super) fn forward(
        &self,
        xs: &Tensor,
        rot: &Rotary,
        mask: Option<&Tensor>,
        layer: usize,
        cache: &mut KvCache,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        #[cfg(feature = "cuda")]
        if b == 1 && self.flash(xs) {
            return self.forward_flash_prefill(xs, rot, layer, cache);
        }
        let (q, k, v) = self.project(xs, |x, heads| {
            x.reshape((b, t, heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        })?;
        let q = candle_nn::rotary_emb::rope(&q, &rot.cos, &rot.sin)?;
        let k = candle_nn::rotary_emb::rope(&k, &rot.cos, &rot.sin)?;
        let (k, v) = cache.append(layer, &k, &v)?;
        let width = self.heads * self.head_dim;
        let out = if self.flash(&q) {
            // Causal after the cached positions: query i sits at position s - t + i.
            let start = k.dim(2)? - t;
            let scale = (self.head_dim as f32).powf(-0.5);
            kernels::flash_attention(&q, &k, &v, Some(start), scale)?.reshape((b, t, width))?
        } else {
            self.attend(&q, &k, &v, mask)?
                .transpose(1, 2)?
                .reshape((b, t, width))?
        };
        linear(&self.o, &out)
    }

    /// [`Attention::forward`] of one sequence on CUDA: the bias, rope and the cache write in
    /// one kernel reading the projection's output, then the flash kernel, causal after the
    /// cached positions (query `i` sits at position `start + i`).
    #[cfg(feature = "cuda")]
    fn forward_flash_prefill(
        &self,
        xs: &Tensor,
        rot: &Rotary,
        layer: usize,
        cache: &mut KvCache,
    ) -> candle_core::Result<Tensor> {
        let t = xs.dim(1)?;
        let qkv = linear(&self.qkv, xs)?;
        let start = cache.len();
        let (k_all, v_all) = cache.reserve(layer, t)?;
        let q = kernels::prefill_rope_kv(
            &qkv,
            self.qkv_bias.as_ref(),
            &rot.cos,
            &rot.sin,
            &k_all,
            &v_all,
            start,
            self.heads,
        )?;
        let (k, v) = (
            k_all.narrow(2, 0, start + t)?,
            v_all.narrow(2, 0, start + t)?,
        );
        let scale = (self.head_dim as f32).powf(-0.5);
        let out = kernels::flash_attention(&q, &k, &v, Some(start), scale)?;
        linear(&self.o, &out.reshape((1, t, self.heads * self.head_dim))?)
    }

    /// Whether attention on `device` in `dtype` runs in the fused kernel (CUDA, f16 or
    /// bf16): then the decoder builds no mask, the kernel being causal by construction.
    pub(super) fn flash_on(&self, device: &Device, dtype: DType) -> bool {
        self.use_flash && kernels::flash_attention_supported(device, dtype, self.head_dim)
    }

    fn flash(&self, q: &Tensor) -> bool {
        self.flash_on(q.device(), q.dtype())
    }

    /// One new position for each of `B` sequences: `xs` is `(B, hidden)`, row `i` belonging
    /// to `caches[i]`; `rot` holds each row's own position `(B, 1, head_dim / 2)`. The
    /// projections run once over all rows; attention runs per sequence over its own cache.
    pub(super) fn forward_batch(
        &self,
        xs: &Tensor,
        rot: &Rotary,
        layer: usize,
        caches: &mut [&mut KvCache],
    ) -> candle_core::Result<Tensor> {
        let b = xs.dim(0)?;
        // With one position per row, `(B, heads * hd)` is `(B, heads, 1, hd)` in memory.
        let (q, k, v) = self.project(xs, |x, heads| {
            x.contiguous()?.reshape((b, heads, 1, self.head_dim))
        })?;
        let q = candle_nn::rotary_emb::rope(&q, &rot.cos, &rot.sin)?;
        let k = candle_nn::rotary_emb::rope(&k, &rot.cos, &rot.sin)?;
        let mut outs = Vec::with_capacity(b);
        for (i, cache) in caches.iter_mut().enumerate() {
            let (ck, cv) = cache.append(layer, &k.narrow(0, i, 1)?, &v.narrow(0, i, 1)?)?;
            let qi = q.narrow(0, i, 1)?;
            let out = if self.flash(&qi) {
                let scale = (self.head_dim as f32).powf(-0.5);
                kernels::flash_attention(&qi, &ck, &cv, None, scale)?
            } else {
                self.attend(&qi, &ck, &cv, None)?
            };
            outs.push(out.reshape((1, self.heads * self.head_dim))?);
        }
        linear(&self.o, &Tensor::cat(&outs, 0)?)
    }

    /// Scaled dot-product attention of `q` `(b, heads, t, hd)` over cached `k`, `v`
    /// `(b, kv_heads, s, hd)`; returns `(b, heads, t, hd)`.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let rep = self.heads / self.kv_heads;
        let k = repeat_kv(k, rep)?;
        let v = repeat_kv(v, rep)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let mut scores = (q.matmul(&k.t()?)? * scale)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        // Softmax in f32 then back, as HF's eager attention does.
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(q.dtype())?;
        probs.matmul(&v.contiguous()?)
    }
}

/// `(b, kv, s, d)` -> `(b, kv * rep, s, d)`, each key/value head serving `rep` query heads.
fn repeat_kv(x: &Tensor, rep: usize) -> candle_core::Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, s, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, kv, rep, s, d))?
        .reshape((b, kv * rep, s, d))
}

/// SwiGLU MLP with the gate and up projections in one matmul.
pub(super) struct Mlp {
    pub(super) gate_up: Linear,
    pub(super) gate_up_bias: Option<Tensor>,
    pub(super) down: Linear,
}

impl Mlp {
    pub(super) fn new(cfg: &LlamaConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        let (gate_up, gate_up_bias) = if vb.contains_tensor("gate_up_proj.weight") {
            stored_fused(linear_b(h, 2 * i, bias, vb.pp("gate_up_proj"))?)
        } else {
            fuse(&[
                linear_b(h, i, bias, vb.pp("gate_proj"))?,
                linear_b(h, i, bias, vb.pp("up_proj"))?,
            ])?
        };
        Ok(Self {
            gate_up,
            gate_up_bias,
            down: linear_b(i, h, bias, vb.pp("down_proj"))?,
        })
    }

    pub(super) fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut gate_up = linear(&self.gate_up, xs)?;
        if let Some(b) = &self.gate_up_bias {
            gate_up = kernels::bias_add(&gate_up, b)?;
        }
        linear(&self.down, &kernels::silu_mul(&gate_up)?)
    }
}

pub(super) struct Block {
    pub(super) norm1: RmsNorm,
    pub(super) attn: Attention,
    pub(super) norm2: RmsNorm,
    pub(super) mlp: Mlp,
}

/// cos/sin tables `(t, head_dim / 2)` for the positions of one forward.
pub(super) struct Rotary {
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
}

/// `(t, start + t)` additive mask: query `i` (at position `start + i`) sees keys `0..=start + i`.
pub(super) fn causal_mask(
    start: usize,
    t: usize,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let total = start + t;
    let data: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > start + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(data, (t, total), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let rope = Rope {
            theta: 500000.0,
            scaling: RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
        };
        let plain = inv_freqs(
            &Rope {
                theta: 500000.0,
                scaling: RopeScaling::Default,
            },
            64,
        );
        let scaled = inv_freqs(&rope, 64);
        assert_eq!(scaled[0], plain[0]);
        assert_eq!(scaled[31], plain[31] / 32.0);
    }

    #[test]
    fn causal_mask_offsets_by_cache_length() {
        let m: Vec<Vec<f32>> = causal_mask(2, 2, DType::F32, &Device::Cpu)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(m[0][..3], [0.0, 0.0, 0.0]);
        assert_eq!(m[0][3], f32::NEG_INFINITY);
        assert!(m[1].iter().all(|&v| v == 0.0));
    }
}
