//! The Qwen2-VL / Qwen2.5-VL vision tower: patch embedding (a Conv3d whose stride equals its
//! kernel, so a matmul over flattened patches), 2-D rotary attention blocks run separately per
//! image or frame (Qwen2.5-VL: per window, except the full-attention blocks), and the patch
//! merger that concatenates each `merge x merge` block and projects it to the language model.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{LayerNorm, Linear, RmsNorm, VarBuilder};

use super::config::{Variant, VisionConfig};
use crate::error::{Error, Result};
use crate::kernels;
// Projections with the bias in one pass on CUDA.
use crate::kernels::cpu::linear;

/// Activation by transformers' name.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Act {
    QuickGelu,
    GeluErf,
    GeluTanh,
    Silu,
}

impl Act {
    pub(crate) fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "quick_gelu" => Act::QuickGelu,
            "gelu" => Act::GeluErf,
            "gelu_pytorch_tanh" | "gelu_new" => Act::GeluTanh,
            "silu" | "swish" => Act::Silu,
            other => {
                return Err(Error::input(
                    "config.json",
                    format!("activation `{other}` is not supported"),
                    "quick_gelu, gelu, gelu_pytorch_tanh or silu",
                ))
            }
        })
    }

    pub(crate) fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Act::QuickGelu => kernels::quick_gelu(x),
            Act::GeluErf => x.gelu_erf(),
            Act::GeluTanh => x.gelu(),
            Act::Silu => x.silu(),
        }
    }
}

enum Norm {
    Layer(LayerNorm),
    Rms(RmsNorm),
}

impl Norm {
    fn load(variant: Variant, dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(match variant {
            Variant::Qwen2Vl => Norm::Layer(candle_nn::layer_norm(dim, 1e-6, vb)?),
            Variant::Qwen25Vl => Norm::Rms(candle_nn::rms_norm(dim, 1e-6, vb)?),
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Norm::Layer(n) => n.forward(x),
            Norm::Rms(n) => n.forward(x),
        }
    }
}

enum Mlp {
    /// Qwen2-VL: fc2(act(fc1(x))).
    Plain { fc1: Linear, fc2: Linear, act: Act },
    /// Qwen2.5-VL: down(act(gate(x)) * up(x)), with biases.
    Gated {
        gate: Linear,
        up: Linear,
        down: Linear,
        act: Act,
    },
}

impl Mlp {
    /// `residual + mlp(x)`.
    fn forward(&self, x: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Mlp::Plain { fc1, fc2, act } => {
                kernels::linear_residual(fc2, &act.apply(&linear(fc1, x)?)?, residual)
            }
            Mlp::Gated {
                gate,
                up,
                down,
                act,
            } => kernels::linear_residual(
                down,
                &(act.apply(&linear(gate, x)?)? * linear(up, x)?)?,
                residual,
            ),
        }
    }
}

/// Attention scores materialised at once in the vision tower (64M floats = 256 MiB in f32).
const MAX_SCORE_ELEMS: usize = 64 << 20;

struct Block {
    norm1: Norm,
    norm2: Norm,
    qkv: Linear,
    proj: Linear,
    mlp: Mlp,
}

impl Block {
    /// `x`: `(n, width)`; `cos`/`sin`: `(n, 1, head_dim)`; `segments`: boundaries of the
    /// independent attention groups along `n`.
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        segments: &[usize],
        heads: usize,
    ) -> candle_core::Result<Tensor> {
        let (n, width) = x.dims2()?;
        let head_dim = width / heads;
        let h = self.norm1.forward(x)?;
        let qkv = linear(&self.qkv, &h)?.reshape((n, 3, heads, head_dim))?;
        let dtype = qkv.dtype();
        // The rotary embedding is applied in float32, as transformers does.
        let (q, k) = kernels::vision_rotary(&qkv, cos, sin)?;
        let v = qkv.narrow(1, 2, 1)?.squeeze(1)?;
        let o = if kernels::flash_attention_supported(x.device(), dtype, head_dim) {
            flash_segments(&q, &k, &v, segments)?
        } else {
            eager_segments(&q, &k, &v, segments)?
        };
        let x = kernels::linear_residual(&self.proj, &o, x)?;
        self.mlp.forward(&self.norm2.forward(&x)?, &x)
    }
}

/// Attention within each segment: `q`, `k`, `v` are `(n, heads, head_dim)`; returns
/// `(n, heads * head_dim)`. One flash kernel launch a segment, reading strided views.
fn flash_segments(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &[usize],
) -> candle_core::Result<Tensor> {
    let (_, heads, head_dim) = q.dims3()?;
    // (1, heads, len, head_dim) views of each segment; the kernel's output is
    // (1, len, heads, head_dim), i.e. the segment's rows of `(n, width)`.
    let heads_view =
        |t: &Tensor, s: usize, len: usize| t.narrow(0, s, len)?.transpose(0, 1)?.unsqueeze(0);
    let mut outs = Vec::with_capacity(segments.len());
    for w in segments.windows(2) {
        let (s, len) = (w[0], w[1] - w[0]);
        if len == 0 {
            continue;
        }
        let o = kernels::flash_attention(
            &heads_view(q, s, len)?,
            &heads_view(k, s, len)?,
            &heads_view(v, s, len)?,
            None,
            (head_dim as f32).powf(-0.5),
        )?;
        outs.push(o.reshape((len, heads * head_dim))?);
    }
    Tensor::cat(&outs, 0)
}

/// [`flash_segments`] with the scores materialised, softmax in f32 as transformers' eager
/// attention does.
fn eager_segments(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &[usize],
) -> candle_core::Result<Tensor> {
    let (n, heads, head_dim) = q.dims3()?;
    let dtype = q.dtype();
    // (heads, n, head_dim)
    let q = q.transpose(0, 1)?.contiguous()?;
    let k = k.transpose(0, 1)?.contiguous()?;
    let v = v.transpose(0, 1)?.contiguous()?;
    let scale = (head_dim as f64).powf(-0.5);
    let mut outs = Vec::with_capacity(segments.len());
    for w in segments.windows(2) {
        let (s, len) = (w[0], w[1] - w[0]);
        if len == 0 {
            continue;
        }
        // A large image's score matrix is len^2 per head: take heads a few at a time.
        let chunk = (MAX_SCORE_ELEMS / (len * len)).clamp(1, heads);
        let mut parts = Vec::with_capacity(heads.div_ceil(chunk));
        for h0 in (0..heads).step_by(chunk) {
            let hn = chunk.min(heads - h0);
            let qs = q.narrow(0, h0, hn)?.narrow(1, s, len)?;
            let ks = k.narrow(0, h0, hn)?.narrow(1, s, len)?;
            let vs = v.narrow(0, h0, hn)?.narrow(1, s, len)?;
            let att = (qs.matmul(&ks.t()?)? * scale)?;
            let att =
                candle_nn::ops::softmax_last_dim(&att.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
            parts.push(att.matmul(&vs)?);
        }
        outs.push(Tensor::cat(&parts, 0)?);
    }
    Tensor::cat(&outs, 1)?
        .transpose(0, 1)?
        .reshape((n, heads * head_dim))
}

struct Merger {
    ln_q: Norm,
    fc1: Linear,
    fc2: Linear,
    unit: usize,
}

impl Merger {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, width) = x.dims2()?;
        let h = self
            .ln_q
            .forward(x)?
            .reshape((n / self.unit, width * self.unit))?;
        linear(&self.fc2, &linear(&self.fc1, &h)?.gelu_erf()?)
    }
}

/// The vision tower of one checkpoint.
pub struct VisionTower {
    cfg: VisionConfig,
    variant: Variant,
    /// Conv3d kernel flattened to `(width, C*T*P*P)`.
    patch_embed: Tensor,
    blocks: Vec<Block>,
    merger: Merger,
    /// `head_dim / 4` inverse frequencies shared by the height and width rotations.
    inv_freq: Vec<f32>,
    dtype: DType,
    device: Device,
}

/// Inverse rotary frequencies `1 / theta^(2i/dim)`, `i < dim/2`, rounded to float32 as
/// transformers computes them.
pub(crate) fn inv_freq(theta: f64, dim: usize) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / dim as f32;
            1.0 / (theta as f32).powf(e)
        })
        .collect()
}

impl VisionTower {
    pub fn load(cfg: &VisionConfig, variant: Variant, vb: VarBuilder) -> Result<Self> {
        let w = cfg.width;
        let patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size * cfg.patch_size;
        let patch_embed = vb
            .pp("patch_embed.proj")
            .get(
                (
                    w,
                    cfg.in_channels,
                    cfg.temporal_patch_size,
                    cfg.patch_size,
                    cfg.patch_size,
                ),
                "weight",
            )?
            .reshape((w, patch_dim))?;
        let act = Act::from_name(&cfg.hidden_act)?;
        let mut blocks = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let b = vb.pp(format!("blocks.{i}"));
            let mlp_vb = b.pp("mlp");
            let mlp = match variant {
                Variant::Qwen2Vl => Mlp::Plain {
                    fc1: candle_nn::linear(w, cfg.mlp_hidden, mlp_vb.pp("fc1"))?,
                    fc2: candle_nn::linear(cfg.mlp_hidden, w, mlp_vb.pp("fc2"))?,
                    act,
                },
                Variant::Qwen25Vl => Mlp::Gated {
                    gate: candle_nn::linear(w, cfg.mlp_hidden, mlp_vb.pp("gate_proj"))?,
                    up: candle_nn::linear(w, cfg.mlp_hidden, mlp_vb.pp("up_proj"))?,
                    down: candle_nn::linear(cfg.mlp_hidden, w, mlp_vb.pp("down_proj"))?,
                    act,
                },
            };
            blocks.push(Block {
                norm1: Norm::load(variant, w, b.pp("norm1"))?,
                norm2: Norm::load(variant, w, b.pp("norm2"))?,
                qkv: candle_nn::linear(w, 3 * w, b.pp("attn.qkv"))?,
                proj: candle_nn::linear(w, w, b.pp("attn.proj"))?,
                mlp,
            });
        }
        let unit = cfg.spatial_merge_size * cfg.spatial_merge_size;
        let m = vb.pp("merger");
        let merger = Merger {
            ln_q: Norm::load(variant, w, m.pp("ln_q"))?,
            fc1: candle_nn::linear(w * unit, w * unit, m.pp("mlp.0"))?,
            fc2: candle_nn::linear(w * unit, cfg.out_hidden, m.pp("mlp.2"))?,
            unit,
        };
        let head_dim = w / cfg.num_heads;
        Ok(Self {
            cfg: cfg.clone(),
            variant,
            patch_embed,
            blocks,
            merger,
            inv_freq: inv_freq(cfg.rope_theta, head_dim / 2),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// Width of one flattened patch row.
    pub fn patch_dim(&self) -> usize {
        self.cfg.in_channels
            * self.cfg.temporal_patch_size
            * self.cfg.patch_size
            * self.cfg.patch_size
    }

    /// Encodes `pixel_values` `(sum t*h*w, C*T*P*P)` of the items whose grids are `grids`
    /// into `(sum t*h*w / merge^2, out_hidden)` features, items in order.
    pub fn forward(&self, pixel_values: &Tensor, grids: &[[usize; 3]]) -> Result<Tensor> {
        let m = self.cfg.spatial_merge_size;
        let unit = m * m;
        let total: usize = grids.iter().map(|g| g.iter().product::<usize>()).sum();
        let (rows, cols) = pixel_values.dims2()?;
        if rows != total || cols != self.patch_dim() {
            return Err(anyhow::anyhow!(
                "pixel values of shape ({rows}, {cols}) for grids {grids:?} (expected ({total}, {}))",
                self.patch_dim()
            )
            .into());
        }
        if let Some(g) = grids.iter().find(|g| g[1] % m != 0 || g[2] % m != 0) {
            return Err(
                anyhow::anyhow!("grid {g:?} is not a multiple of the merge size {m}").into(),
            );
        }
        let x = pixel_values
            .to_dtype(self.dtype)?
            .matmul(&self.patch_embed.t()?)?;

        // Rotary angles per patch, in the processor's block order.
        let quarter = self.inv_freq.len();
        let head_dim = 4 * quarter;
        let mut cos = Vec::with_capacity(total * head_dim);
        let mut sin = Vec::with_capacity(total * head_dim);
        for &[t, h, w] in grids {
            for _ in 0..t {
                for bh in 0..h / m {
                    for bw in 0..w / m {
                        for mh in 0..m {
                            for mw in 0..m {
                                let (ph, pw) = ((bh * m + mh) as f32, (bw * m + mw) as f32);
                                let angles: Vec<f32> = self
                                    .inv_freq
                                    .iter()
                                    .map(|f| ph * f)
                                    .chain(self.inv_freq.iter().map(|f| pw * f))
                                    .collect();
                                for _ in 0..2 {
                                    cos.extend(angles.iter().map(|a| a.cos()));
                                    sin.extend(angles.iter().map(|a| a.sin()));
                                }
                            }
                        }
                    }
                }
            }
        }
        let mut cos = Tensor::from_vec(cos, (total, head_dim), &self.device)?;
        let mut sin = Tensor::from_vec(sin, (total, head_dim), &self.device)?;

        // Attention groups: each frame of each item (cu_seqlens).
        let mut full = vec![0usize];
        for &[t, h, w] in grids {
            for _ in 0..t {
                full.push(full[full.len() - 1] + h * w);
            }
        }

        let mut x = x;
        let mut windows = full.clone();
        let mut reverse = None;
        if self.variant == Variant::Qwen25Vl {
            let (index, cu) = window_index(grids, m, self.cfg.window_size, self.cfg.patch_size)?;
            // Reorder at merge-unit granularity: a window is contiguous afterwards.
            let patch_index: Vec<u32> = index
                .iter()
                .flat_map(|&i| (0..unit).map(move |u| (i * unit + u) as u32))
                .collect();
            let idx = Tensor::from_vec(patch_index, total, &self.device)?;
            x = x.index_select(&idx, 0)?;
            cos = cos.index_select(&idx, 0)?;
            sin = sin.index_select(&idx, 0)?;
            let mut inverse = vec![0u32; index.len()];
            for (pos, &i) in index.iter().enumerate() {
                inverse[i] = pos as u32;
            }
            reverse = Some(Tensor::from_vec(inverse, index.len(), &self.device)?);
            windows = cu;
        }
        let cos = cos.unsqueeze(1)?;
        let sin = sin.unsqueeze(1)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let segments = if self.variant == Variant::Qwen25Vl
                && !self.cfg.fullatt_block_indexes.contains(&i)
            {
                &windows
            } else {
                &full
            };
            x = block.forward(&x, &cos, &sin, segments, self.cfg.num_heads)?;
        }
        let mut merged = self.merger.forward(&x)?;
        if let Some(rev) = reverse {
            merged = merged.index_select(&rev, 0)?;
        }
        Ok(merged)
    }
}

/// Qwen2.5-VL window attention: the order in which merged tokens are visited (windows of
/// `window_size / merge / patch` merged tokens per side, row-major within each frame) and the
/// patch boundaries of the windows (`cu_window_seqlens`, empty windows dropped).
pub fn window_index(
    grids: &[[usize; 3]],
    merge: usize,
    window_size: usize,
    patch_size: usize,
) -> Result<(Vec<usize>, Vec<usize>)> {
    let win = window_size / merge / patch_size;
    if win == 0 {
        return Err(anyhow::anyhow!(
            "window_size {window_size} is smaller than one merged patch ({} pixels)",
            merge * patch_size
        )
        .into());
    }
    let unit = merge * merge;
    let mut index = Vec::new();
    let mut cu = vec![0usize];
    let mut base = 0;
    for &[t, h, w] in grids {
        let (lh, lw) = (h / merge, w / merge);
        // transformers pads by a whole window even when the size divides evenly; the extra
        // windows are empty and dropped, so ceil division gives the same windows.
        let (nwh, nww) = (lh / win + 1, lw / win + 1);
        for ti in 0..t {
            for wy in 0..nwh {
                for wx in 0..nww {
                    let mut count = 0;
                    for y in wy * win..((wy + 1) * win).min(lh) {
                        for x in wx * win..((wx + 1) * win).min(lw) {
                            index.push(base + ti * lh * lw + y * lw + x);
                            count += 1;
                        }
                    }
                    if count > 0 {
                        cu.push(cu[cu.len() - 1] + count * unit);
                    }
                }
            }
        }
        base += t * lh * lw;
    }
    Ok((index, cu))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_index_groups_merged_tokens_by_window() {
        // One 1x(4x6) grid of patches = 2x3 merged tokens, windows of 2x2 merged tokens.
        let (index, cu) = window_index(&[[1, 4, 6]], 2, 56, 14).unwrap();
        assert_eq!(index, vec![0, 1, 3, 4, 2, 5]);
        assert_eq!(cu, vec![0, 16, 24]);
    }
}
