//! A Llama decoder (as `LlamaForCausalLM` in transformers) driven by input embeddings:
//! RMSNorm, rotary positions (HF's rotate-half layout; default, linear and llama3 scaling),
//! grouped-query attention over the engine-owned [`KvCache`], SwiGLU MLP, tied or untied
//! `lm_head`. With `qkv_bias` it is also the Qwen2 decoder (biased q/k/v, unbiased `o_proj`).
//! Knows no vision and no tokenizer.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{embedding, linear_b, Embedding, Linear, VarBuilder};
use serde::Deserialize;

use crate::engine::kv::KvCache;
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
            other => {
                return Err(config_error(
                    format!("unsupported text_config rope scaling type {other:?}"),
                    "rope_type default, linear or llama3",
                ))
            }
        };
        Ok(Rope { theta, scaling })
    }

    fn validate(&self) -> Result<()> {
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
        self.rope()?;
        Ok(())
    }
}

/// Inverse rotary frequencies in f32, computed as transformers does (f32 throughout).
fn inv_freqs(rope: &Rope, head_dim: usize) -> Vec<f32> {
    let dim = head_dim as f32;
    let base: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1.0 / rope.theta.powf(i as f32 / dim))
        .collect();
    match rope.scaling {
        RopeScaling::Default => base,
        RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
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

/// RMSNorm, normalised in f32. On CUDA one fused kernel (per-op launch cost dominates
/// decode there); elsewhere HF's exact order: normalise in f32, cast back, scale by the weight.
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            // The hint only matters for freshly initialised weights (tests); files ignore it.
            weight: vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?,
            eps,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if xs.device().is_cuda() {
            return candle_nn::ops::rms_norm(&xs.contiguous()?, &self.weight, self.eps as f32);
        }
        let dtype = xs.dtype();
        let x = xs.to_dtype(DType::F32)?;
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (heads, kv) = (cfg.num_attention_heads, cfg.kv_heads());
        let bias = cfg.attention_bias;
        let qkv_bias = bias || cfg.qkv_bias;
        Ok(Self {
            q: linear_b(h, heads * hd, qkv_bias, vb.pp("q_proj"))?,
            k: linear_b(h, kv * hd, qkv_bias, vb.pp("k_proj"))?,
            v: linear_b(h, kv * hd, qkv_bias, vb.pp("v_proj"))?,
            o: linear_b(heads * hd, h, bias, vb.pp("o_proj"))?,
            heads,
            kv_heads: kv,
            head_dim: hd,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        rot: &Rotary,
        mask: Option<&Tensor>,
        layer: usize,
        cache: &mut KvCache,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        let split = |x: Tensor, heads: usize| -> candle_core::Result<Tensor> {
            x.reshape((b, t, heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q.forward(xs)?, self.heads)?;
        let k = split(self.k.forward(xs)?, self.kv_heads)?;
        let v = split(self.v.forward(xs)?, self.kv_heads)?;
        let q = candle_nn::rotary_emb::rope(&q, &rot.cos, &rot.sin)?;
        let k = candle_nn::rotary_emb::rope(&k, &rot.cos, &rot.sin)?;
        let (k, v) = cache.append(layer, &k, &v)?;
        let out = self.attend(&q, &k, &v, mask)?.transpose(1, 2)?.reshape((
            b,
            t,
            self.heads * self.head_dim,
        ))?;
        self.o.forward(&out)
    }

    /// One new position for each of `B` sequences: `xs` is `(B, hidden)`, row `i` belonging
    /// to `caches[i]`; `rot` holds each row's own position `(B, 1, head_dim / 2)`. The
    /// projections run once over all rows; attention runs per sequence over its own cache.
    fn forward_batch(
        &self,
        xs: &Tensor,
        rot: &Rotary,
        layer: usize,
        caches: &mut [&mut KvCache],
    ) -> candle_core::Result<Tensor> {
        let b = xs.dim(0)?;
        // With one position per row, `(B, heads * hd)` is already `(B, heads, 1, hd)` in memory.
        let split = |x: Tensor, heads: usize| x.reshape((b, heads, 1, self.head_dim));
        let q = split(self.q.forward(xs)?, self.heads)?;
        let k = split(self.k.forward(xs)?, self.kv_heads)?;
        let v = split(self.v.forward(xs)?, self.kv_heads)?;
        let q = candle_nn::rotary_emb::rope(&q, &rot.cos, &rot.sin)?;
        let k = candle_nn::rotary_emb::rope(&k, &rot.cos, &rot.sin)?;
        let mut outs = Vec::with_capacity(b);
        for (i, cache) in caches.iter_mut().enumerate() {
            let (ck, cv) = cache.append(layer, &k.narrow(0, i, 1)?, &v.narrow(0, i, 1)?)?;
            let out = self.attend(&q.narrow(0, i, 1)?, &ck, &cv, None)?;
            outs.push(out.reshape((1, self.heads * self.head_dim))?);
        }
        self.o.forward(&Tensor::cat(&outs, 0)?)
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

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate: linear_b(h, i, bias, vb.pp("gate_proj"))?,
            up: linear_b(h, i, bias, vb.pp("up_proj"))?,
            down: linear_b(i, h, bias, vb.pp("down_proj"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let gated = (candle_nn::ops::silu(&self.gate.forward(xs)?)? * self.up.forward(xs)?)?;
        self.down.forward(&gated)
    }
}

struct Block {
    norm1: RmsNorm,
    attn: Attention,
    norm2: RmsNorm,
    mlp: Mlp,
}

/// cos/sin tables `(t, head_dim / 2)` for the positions of one forward.
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

/// A loaded Llama language model.
pub struct Llama {
    cfg: LlamaConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    inv_freqs: Vec<f32>,
    device: Device,
    dtype: DType,
}

impl Llama {
    /// Loads from `vb` at the prefix holding `embed_tokens`, `layers`, `norm`; `lm_head` is
    /// the prefix of the output projection (ignored when `tied` and absent).
    pub fn load(
        cfg: &LlamaConfig,
        vb: VarBuilder,
        lm_head: VarBuilder,
        tied: bool,
    ) -> Result<Self> {
        cfg.validate()?;
        let h = cfg.hidden_size;
        let embed = embedding(cfg.vocab_size, h, vb.pp("embed_tokens"))?;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp("layers").pp(i);
                Ok(Block {
                    norm1: RmsNorm::new(h, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
                    attn: Attention::new(cfg, vb.pp("self_attn"))?,
                    norm2: RmsNorm::new(h, cfg.rms_norm_eps, vb.pp("post_attention_layernorm"))?,
                    mlp: Mlp::new(cfg, vb.pp("mlp"))?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let lm_head = if tied && !lm_head.contains_tensor("weight") {
            Linear::new(embed.embeddings().clone(), None)
        } else {
            linear_b(h, cfg.vocab_size, false, lm_head)?
        };
        Ok(Self {
            cfg: cfg.clone(),
            norm: RmsNorm::new(h, cfg.rms_norm_eps, vb.pp("norm"))?,
            embed,
            blocks,
            lm_head,
            inv_freqs: inv_freqs(&cfg.rope()?, cfg.head_dim()),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// A cache for `capacity` positions in the model's dtype and device.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(
            self.cfg.num_hidden_layers,
            self.cfg.kv_heads(),
            self.cfg.head_dim(),
            capacity,
            self.dtype,
            &self.device,
        )
    }

    /// Token embeddings `(ids.len(), hidden)`.
    pub fn embed_tokens(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            return Err(Error::input(
                "prompt",
                format!("token id {bad} is outside the vocabulary"),
                format!("ids below {}", self.cfg.vocab_size),
            ));
        }
        let ids = Tensor::new(ids, &self.device)?;
        Ok(self.embed.forward(&ids)?)
    }

    fn rotary(&self, start: usize, len: usize) -> candle_core::Result<Rotary> {
        let half = self.inv_freqs.len();
        self.rotary_at(start..start + len, &[len, half])
    }

    /// cos/sin tables for `positions`, shaped `shape` (its product = positions × half).
    fn rotary_at(
        &self,
        positions: impl ExactSizeIterator<Item = usize>,
        shape: &[usize],
    ) -> candle_core::Result<Rotary> {
        let half = self.inv_freqs.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for pos in positions {
            for f in &self.inv_freqs {
                // f32 product, as HF computes `position * inv_freq` in float32.
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let table = |v: Vec<f32>| {
            Tensor::from_vec(v, shape, &Device::Cpu)?
                .to_dtype(self.dtype)?
                .to_device(&self.device)
        };
        Ok(Rotary {
            cos: table(cos)?,
            sin: table(sin)?,
        })
    }

    /// Runs the decoder over `embeds` `(t, hidden)` or `(1, t, hidden)` placed after the cached
    /// positions and returns the logits of the last position `(vocab,)` as f32. Advances the
    /// cache by `t`.
    pub fn forward_embeds(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let embeds = &match embeds.rank() {
            2 => embeds.unsqueeze(0)?,
            _ => embeds.clone(),
        };
        let (b, t, h) = embeds.dims3()?;
        // The cache holds one sequence.
        if b != 1 || h != self.cfg.hidden_size || t == 0 {
            return Err(Error::input(
                "embeddings",
                format!("shape {:?}", embeds.dims()),
                format!("(1, seq > 0, {})", self.cfg.hidden_size),
            ));
        }
        let start = cache.len();
        let rot = self.rotary(start, t)?;
        let mask = if t > 1 {
            Some(causal_mask(start, t, self.dtype, &self.device)?)
        } else {
            None
        };
        let mut xs = embeds.to_dtype(self.dtype)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let attn =
                block
                    .attn
                    .forward(&block.norm1.forward(&xs)?, &rot, mask.as_ref(), i, cache)?;
            xs = (xs + attn)?;
            xs = (&xs + block.mlp.forward(&block.norm2.forward(&xs)?)?)?;
        }
        cache.advance(t);
        let last = xs.narrow(1, t - 1, 1)?;
        let logits = self.lm_head.forward(&self.norm.forward(&last)?)?;
        Ok(logits.flatten_all()?.to_dtype(DType::F32)?)
    }

    /// [`Model::decode_batch`](crate::models::Model::decode_batch) for families whose language
    /// model is this decoder: one new token per sequence, logits `(vocab,)` per sequence.
    pub fn decode_batch(&self, ids: &[u32], caches: &mut [&mut KvCache]) -> Result<Vec<Tensor>> {
        crate::models::check_batch(ids, caches)?;
        let logits = self.forward_decode_batch(&self.embed_tokens(ids)?, caches)?;
        Ok((0..ids.len())
            .map(|i| logits.get(i))
            .collect::<candle_core::Result<_>>()?)
    }

    /// One new position for each of several sequences: row `i` of `embeds` `(B, hidden)`
    /// follows the positions in `caches[i]`. Every weight matmul (projections, MLP,
    /// `lm_head`) runs once over the `B` rows; attention and rotary positions stay per
    /// sequence, so caches of different lengths need no padding. Returns `(B, vocab)` f32
    /// logits and advances each cache by one.
    pub fn forward_decode_batch(
        &self,
        embeds: &Tensor,
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let (b, h) = embeds.dims2()?;
        if b != caches.len() || h != self.cfg.hidden_size || b == 0 {
            return Err(Error::input(
                "embeddings",
                format!("shape {:?} for {} caches", embeds.dims(), caches.len()),
                format!("(one row per cache, {})", self.cfg.hidden_size),
            ));
        }
        let half = self.inv_freqs.len();
        let positions: Vec<usize> = caches.iter().map(|c| c.len()).collect();
        let rot = self.rotary_at(positions.into_iter(), &[b, 1, half])?;
        let mut xs = embeds.to_dtype(self.dtype)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let attn = block
                .attn
                .forward_batch(&block.norm1.forward(&xs)?, &rot, i, caches)?;
            xs = (xs + attn)?;
            xs = (&xs + block.mlp.forward(&block.norm2.forward(&xs)?)?)?;
        }
        for cache in caches.iter_mut() {
            cache.advance(1);
        }
        let logits = self.lm_head.forward(&self.norm.forward(&xs)?)?;
        Ok(logits.to_dtype(DType::F32)?)
    }
}

/// `(t, start + t)` additive mask: query `i` (at position `start + i`) sees keys `0..=start + i`.
fn causal_mask(
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

    fn cfg(json: &str) -> LlamaConfig {
        serde_json::from_str(json).unwrap()
    }

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

    /// Decoding through the cache must equal recomputing the whole sequence, with and without
    /// grouped-query attention (without it the cached keys reach the matmul as strided views).
    #[test]
    fn cached_decode_equals_full_prefill() -> Result<()> {
        for kv_heads in [4, 2] {
            let cfg = cfg(&format!(
                r#"{{"vocab_size": 50, "hidden_size": 32, "intermediate_size": 48,
                    "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": {kv_heads}, "rms_norm_eps": 1e-5,
                    "tie_word_embeddings": true}}"#
            ));
            let map = candle_nn::VarMap::new();
            let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
            let model = Llama::load(&cfg, vb.pp("model"), vb.pp("lm_head"), true)?;
            let ids = [3u32, 17, 4, 42, 9, 11, 23];
            let embeds = model.embed_tokens(&ids)?.unsqueeze(0)?;

            let mut full_cache = model.new_cache(ids.len());
            let full = model.forward_embeds(&embeds, &mut full_cache)?;

            let mut cache = model.new_cache(ids.len());
            // A 2-token chunk after 4 cached positions exercises the mask offset.
            model.forward_embeds(&embeds.narrow(1, 0, 4)?, &mut cache)?;
            model.forward_embeds(&embeds.narrow(1, 4, 2)?, &mut cache)?;
            let stepped = model.forward_embeds(&embeds.narrow(1, 6, 1)?, &mut cache)?;
            assert_eq!(cache.len(), ids.len());

            let spread = (full.max(0)? - full.min(0)?)?.to_scalar::<f32>()?;
            assert!(spread > 1e-2, "degenerate logits: spread {spread}");
            let diff = (full - stepped)?.abs()?.max(0)?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "kv_heads {kv_heads}: {diff}");
        }
        Ok(())
    }

    /// Batched decode over caches of different lengths must equal decoding each sequence
    /// alone, with and without grouped-query attention.
    #[test]
    fn decode_batch_equals_per_sequence_decode() -> Result<()> {
        for kv_heads in [4, 2] {
            let cfg = cfg(&format!(
                r#"{{"vocab_size": 50, "hidden_size": 32, "intermediate_size": 48,
                    "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": {kv_heads}, "rms_norm_eps": 1e-5,
                    "tie_word_embeddings": true}}"#
            ));
            let map = candle_nn::VarMap::new();
            let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
            let model = Llama::load(&cfg, vb.pp("model"), vb.pp("lm_head"), true)?;
            let prompts: [&[u32]; 3] = [&[3, 17, 4], &[42, 9, 11, 23, 5, 8, 1], &[7]];
            let next = [12u32, 30, 2];
            let mut alone = Vec::new();
            let mut batched: Vec<KvCache> = Vec::new();
            for (prompt, &id) in prompts.iter().zip(&next) {
                let mut cache = model.new_cache(prompt.len() + 2);
                let embeds = model.embed_tokens(prompt)?.unsqueeze(0)?;
                model.forward_embeds(&embeds, &mut cache)?;
                batched.push(cache.clone());
                let step = model.embed_tokens(&[id])?.unsqueeze(0)?;
                alone.push(model.forward_embeds(&step, &mut cache)?);
            }
            let mut refs: Vec<&mut KvCache> = batched.iter_mut().collect();
            let logits = model.forward_decode_batch(&model.embed_tokens(&next)?, &mut refs)?;
            assert_eq!(logits.dims(), [3, 50]);
            for (i, (want, prompt)) in alone.iter().zip(&prompts).enumerate() {
                assert_eq!(batched[i].len(), prompt.len() + 1);
                let spread = (want.max(0)? - want.min(0)?)?.to_scalar::<f32>()?;
                assert!(spread > 1e-2, "degenerate logits: spread {spread}");
                let diff = (want - logits.get(i)?)?.abs()?.max(0)?.to_scalar::<f32>()?;
                assert!(diff < 1e-5, "kv_heads {kv_heads}, sequence {i}: {diff}");
            }
        }
        Ok(())
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
