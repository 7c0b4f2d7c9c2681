//! A Llama decoder (as `LlamaForCausalLM` in transformers) driven by input embeddings:
//! RMSNorm, rotary positions (HF's rotate-half layout; default, linear and llama3 scaling),
//! grouped-query attention over the engine-owned [`KvCache`], SwiGLU MLP, tied or untied
//! `lm_head`. With `qkv_bias` it is also the Qwen2 decoder (biased q/k/v, unbiased `o_proj`).
//! Knows no vision and no tokenizer.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, linear_b, Embedding, Linear, VarBuilder};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::kernels;
use crate::models::kv::KvCache;

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

/// RMSNorm, normalised in f32 in HF's order ([`kernels::add_rms_norm`]; one kernel on CUDA).
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
        Ok(kernels::add_rms_norm(xs, None, &self.weight, self.eps)?.1)
    }
}

/// Self-attention with q, k and v projected by one matmul (their weights concatenated at load).
struct Attention {
    qkv: Linear,
    qkv_bias: Option<Tensor>,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// One matmul for several projections of the same input: the weights of `parts` stacked by
/// output row, and their biases (all or none) likewise.
fn fuse(parts: &[Linear]) -> candle_core::Result<(Linear, Option<Tensor>)> {
    let weights: Vec<&Tensor> = parts.iter().map(|l| l.weight()).collect();
    let biases: Option<Vec<&Tensor>> = parts.iter().map(|l| l.bias()).collect();
    let bias = biases.map(|b| Tensor::cat(&b, 0)).transpose()?;
    Ok((Linear::new(Tensor::cat(&weights, 0)?, None), bias))
}

impl Attention {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (heads, kv) = (cfg.num_attention_heads, cfg.kv_heads());
        let bias = cfg.attention_bias;
        let qkv_bias = bias || cfg.qkv_bias;
        let (qkv, qkv_bias) = fuse(&[
            linear_b(h, heads * hd, qkv_bias, vb.pp("q_proj"))?,
            linear_b(h, kv * hd, qkv_bias, vb.pp("k_proj"))?,
            linear_b(h, kv * hd, qkv_bias, vb.pp("v_proj"))?,
        ])?;
        Ok(Self {
            qkv,
            qkv_bias,
            o: linear_b(heads * hd, h, bias, vb.pp("o_proj"))?,
            heads,
            kv_heads: kv,
            head_dim: hd,
        })
    }

    /// q, k, v `(rows, heads, hd)`-shaped per `split`, biases added.
    fn project(
        &self,
        xs: &Tensor,
        split: impl Fn(Tensor, usize) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let mut qkv = self.qkv.forward(xs)?;
        if let Some(b) = &self.qkv_bias {
            qkv = qkv.broadcast_add(b)?;
        }
        let (q_w, kv_w) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let last = qkv.rank() - 1;
        Ok((
            split(qkv.narrow(last, 0, q_w)?, self.heads)?,
            split(qkv.narrow(last, q_w, kv_w)?, self.kv_heads)?,
            split(qkv.narrow(last, q_w + kv_w, kv_w)?, self.kv_heads)?,
        ))
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
        let (q, k, v) = self.project(xs, |x, heads| {
            x.reshape((b, t, heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        })?;
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
        // With one position per row, `(B, heads * hd)` is `(B, heads, 1, hd)` in memory.
        let (q, k, v) = self.project(xs, |x, heads| {
            x.contiguous()?.reshape((b, heads, 1, self.head_dim))
        })?;
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

/// SwiGLU MLP with the gate and up projections in one matmul.
struct Mlp {
    gate_up: Linear,
    gate_up_bias: Option<Tensor>,
    down: Linear,
}

impl Mlp {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        let (gate_up, gate_up_bias) = fuse(&[
            linear_b(h, i, bias, vb.pp("gate_proj"))?,
            linear_b(h, i, bias, vb.pp("up_proj"))?,
        ])?;
        Ok(Self {
            gate_up,
            gate_up_bias,
            down: linear_b(i, h, bias, vb.pp("down_proj"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut gate_up = self.gate_up.forward(xs)?;
        if let Some(b) = &self.gate_up_bias {
            gate_up = gate_up.broadcast_add(b)?;
        }
        self.down.forward(&kernels::silu_mul(&gate_up)?)
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
    /// `inv_freqs` on the device, for the fused decode step.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    inv_freqs_dev: Tensor,
    /// Which position row (M-RoPE: temporal, height, width) each frequency rotates by;
    /// all 0 for plain rotary positions.
    row_of: Vec<usize>,
    /// Decode steps run as fused kernels (CUDA; `MMLLM_UNFUSED_DECODE=1` turns it off, so
    /// that both paths can be timed and compared on one machine).
    fused_decode: bool,
    /// With `fused_decode`, single-sequence decode replays a captured CUDA graph (unless
    /// `o_proj` or the MLP has biases, or `MMLLM_CUDA_GRAPH=0`).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    graph_enabled: bool,
    #[cfg(feature = "cuda")]
    graph: std::sync::Mutex<Option<DecodeGraph>>,
    #[cfg(feature = "cuda")]
    graph_failed: std::sync::atomic::AtomicBool,
    device: Device,
    dtype: DType,
}

/// Key splits of the attention kernel in a captured decode step (fixed at capture; each
/// block then takes 1/32 of whatever the cache length is).
#[cfg(feature = "cuda")]
const GRAPH_KEY_SPLITS: usize = 32;

/// A captured single-sequence decode step and the device buffers it reads and writes.
#[cfg(feature = "cuda")]
struct DecodeGraph {
    graph: kernels::Graph,
    ids: Tensor,
    table: Tensor,
    logits: Tensor,
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
        let inv_freqs = inv_freqs(&cfg.rope()?, cfg.head_dim());
        let row_of = match &cfg.mrope_section {
            Some(sections) => sections
                .iter()
                .enumerate()
                .flat_map(|(row, &n)| std::iter::repeat_n(row % 3, n))
                .collect(),
            None => vec![0; inv_freqs.len()],
        };
        let device = vb.device().clone();
        let fused_decode =
            cfg!(feature = "cuda") && device.is_cuda() && kernels::fused_decode_requested();
        Ok(Self {
            cfg: cfg.clone(),
            norm: RmsNorm::new(h, cfg.rms_norm_eps, vb.pp("norm"))?,
            embed,
            blocks,
            lm_head,
            inv_freqs_dev: Tensor::new(inv_freqs.as_slice(), &device)?,
            inv_freqs,
            row_of,
            fused_decode,
            graph_enabled: !cfg.attention_bias
                && !cfg.mlp_bias
                && std::env::var("MMLLM_CUDA_GRAPH").as_deref() != Ok("0"),
            #[cfg(feature = "cuda")]
            graph: std::sync::Mutex::new(None),
            #[cfg(feature = "cuda")]
            graph_failed: std::sync::atomic::AtomicBool::new(false),
            device,
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

    /// cos/sin tables for `positions` (one `[temporal, height, width]` row each; frequency
    /// `j` rotates by row `row_of[j]`), shaped `shape` (its product = positions × half).
    fn rotary_at(&self, positions: &[[i64; 3]], shape: &[usize]) -> candle_core::Result<Rotary> {
        let half = self.inv_freqs.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for pos in positions {
            for (f, &row) in self.inv_freqs.iter().zip(&self.row_of) {
                // f32 product, as HF computes `position * inv_freq` in float32.
                let angle = pos[row] as f32 * f;
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

    /// Rotary position of the next token of `cache`: its length shifted by its `rope_delta`.
    fn next_position(cache: &KvCache) -> i64 {
        cache.len() as i64 + cache.rope_delta
    }

    /// Runs the decoder over `embeds` `(t, hidden)` or `(1, t, hidden)` placed after the cached
    /// positions (rotary positions continue from the cache length plus its `rope_delta`) and
    /// returns the logits of the last position `(vocab,)` as f32. Advances the cache by `t`.
    pub fn forward_embeds(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let t = match embeds.rank() {
            2 => embeds.dim(0)?,
            _ => embeds.dim(1)?,
        };
        let start = Self::next_position(cache);
        let positions: Vec<[i64; 3]> = (start..start + t as i64).map(|p| [p; 3]).collect();
        self.forward_embeds_at(embeds, &positions, cache)
    }

    /// [`Llama::forward_embeds`] with explicit rotary positions, one `[temporal, height,
    /// width]` row per embedding (M-RoPE; plain rotary reads the first).
    pub fn forward_embeds_at(
        &self,
        embeds: &Tensor,
        positions: &[[i64; 3]],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let embeds = &match embeds.rank() {
            2 => embeds.unsqueeze(0)?,
            _ => embeds.clone(),
        };
        let (b, t, h) = embeds.dims3()?;
        // The cache holds one sequence.
        if b != 1 || h != self.cfg.hidden_size || t == 0 || positions.len() != t {
            return Err(Error::input(
                "embeddings",
                format!(
                    "shape {:?} for {} positions",
                    embeds.dims(),
                    positions.len()
                ),
                format!("(1, seq > 0, {}), one position each", self.cfg.hidden_size),
            ));
        }
        if t == 1 && self.fused_decode && positions[0] == [Self::next_position(cache); 3] {
            let logits = self.decode_fused(&embeds.reshape((1, h))?, &mut [cache])?;
            return Ok(logits.flatten_all()?);
        }
        let start = cache.len();
        let half = self.inv_freqs.len();
        let rot = self.rotary_at(positions, &[t, half])?;
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
        #[cfg(feature = "cuda")]
        if let ([id], [cache]) = (ids, &mut *caches) {
            if self.graph_usable() {
                return Ok(vec![self.decode_graph(*id, cache)?]);
            }
        }
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
        if self.fused_decode {
            return self.decode_fused(embeds, caches);
        }
        let half = self.inv_freqs.len();
        let positions: Vec<[i64; 3]> = caches.iter().map(|c| [Self::next_position(c); 3]).collect();
        let rot = self.rotary_at(&positions, &[b, 1, half])?;
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

    /// The decode step as fused kernels (see `crate::kernels`), enqueued without waiting:
    /// per layer one norm (fused with the residual add), the q/k/v GEMV, one kernel for
    /// bias + rotary + cache write, the attention kernels (split over keys, then merged),
    /// `o_proj`, the gate/up GEMV, one SwiGLU kernel and `down_proj`. Returns `(B, vocab)`
    /// f32 logits and advances each cache by one.
    #[cfg(feature = "cuda")]
    fn decode_fused(&self, embeds: &Tensor, caches: &mut [&mut KvCache]) -> Result<Tensor> {
        let values = self.step_table_values(caches)?;
        let longest = caches.iter().map(|c| c.len() + 1).max().unwrap_or(1);
        let table = kernels::StepTable::upload(&self.device, &values, caches.len(), longest)?;
        let h = self.fused_layers(embeds.to_dtype(self.dtype)?.contiguous()?, &table)?;
        for cache in caches.iter_mut() {
            cache.advance(1);
        }
        Ok(self.linear(&self.lm_head, &h)?.to_dtype(DType::F32)?)
    }

    /// The step table's values for `caches` (allocating their layers on first use); refuses
    /// a full cache.
    #[cfg(feature = "cuda")]
    fn step_table_values(&self, caches: &mut [&mut KvCache]) -> Result<Vec<i64>> {
        if let Some(c) = caches.iter().find(|c| c.len() >= c.capacity()) {
            return Err(anyhow::anyhow!("KV cache full: capacity {}", c.capacity()).into());
        }
        let positions: Vec<i64> = caches.iter().map(|c| Self::next_position(c)).collect();
        let slots: Vec<usize> = caches.iter().map(|c| c.len()).collect();
        let capacities: Vec<usize> = caches.iter().map(|c| c.capacity()).collect();
        let layers = (0..self.blocks.len())
            .map(|l| caches.iter_mut().map(|c| c.layer(l)).collect())
            .collect::<candle_core::Result<Vec<Vec<_>>>>()?;
        let layer_refs: Vec<Vec<(&Tensor, &Tensor)>> = layers
            .iter()
            .map(|l| l.iter().map(|(k, v)| (k, v)).collect())
            .collect();
        Ok(kernels::StepTable::values(
            &positions,
            &slots,
            &capacities,
            &layer_refs,
        )?)
    }

    /// A linear layer on the few rows of a decode step (GEMV), plus its bias if any.
    #[cfg(feature = "cuda")]
    fn linear(&self, l: &Linear, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = kernels::matmul_t(x, l.weight())?;
        match l.bias() {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// The decoder layers of a fused decode step over input embeddings `x` `(B, hidden)`;
    /// returns the final norm's output `(B, hidden)`.
    #[cfg(feature = "cuda")]
    fn fused_layers(
        &self,
        mut x: Tensor,
        table: &kernels::StepTable,
    ) -> candle_core::Result<Tensor> {
        let (heads, kv_heads, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.kv_heads(),
            self.cfg.head_dim(),
        );
        let eps = self.cfg.rms_norm_eps;
        let first_norm = match self.blocks.first() {
            Some(block) => &block.norm1.weight,
            None => &self.norm.weight,
        };
        let mut h = kernels::add_rms_norm(&x, None, first_norm, eps)?.1;
        for (i, block) in self.blocks.iter().enumerate() {
            let attn = &block.attn;
            let qkv = self.linear(&attn.qkv, &h)?;
            let q = kernels::rope_write_kv(
                &qkv,
                attn.qkv_bias.as_ref(),
                &self.inv_freqs_dev,
                table,
                i,
                heads,
                kv_heads,
                hd,
            )?;
            let o = self.linear(&attn.o, &kernels::decode_attention(&q, table, i, kv_heads)?)?;
            let (x_mid, h_mid) = kernels::add_rms_norm(&x, Some(&o), &block.norm2.weight, eps)?;
            let mlp = &block.mlp;
            let mut gate_up = self.linear(&mlp.gate_up, &h_mid)?;
            if let Some(b) = &mlp.gate_up_bias {
                gate_up = gate_up.broadcast_add(b)?;
            }
            let down = self.linear(&mlp.down, &kernels::silu_mul(&gate_up)?)?;
            let next_norm = match self.blocks.get(i + 1) {
                Some(next) => &next.norm1.weight,
                None => &self.norm.weight,
            };
            (x, h) = kernels::add_rms_norm(&x_mid, Some(&down), next_norm, eps)?;
        }
        Ok(h)
    }

    /// One token of one sequence: through a captured CUDA graph of the fused step when it
    /// can (one launch instead of a few hundred), else as [`Llama::decode_batch`] would.
    /// The graph is captured on the first call, after that call's step ran eagerly.
    pub fn decode(&self, id: u32, cache: &mut KvCache) -> Result<Tensor> {
        Ok(self.decode_batch(&[id], &mut [cache])?.remove(0))
    }

    #[cfg(feature = "cuda")]
    fn graph_usable(&self) -> bool {
        self.fused_decode
            && self.graph_enabled
            && !self.graph_failed.load(std::sync::atomic::Ordering::Relaxed)
    }

    #[cfg(feature = "cuda")]
    fn decode_graph(&self, id: u32, cache: &mut KvCache) -> Result<Tensor> {
        let mut slot = self
            .graph
            .lock()
            .map_err(|_| anyhow::anyhow!("decode graph lock poisoned"))?;
        let Some(g) = slot.as_ref() else {
            let logits = self.decode_fused(&self.embed_tokens(&[id])?, &mut [cache])?;
            match self.capture_graph() {
                Ok(g) => *slot = Some(g),
                Err(e) => {
                    eprintln!("mmllm: CUDA graph capture failed ({e}); decoding without it");
                    self.graph_failed
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            return Ok(logits.get(0)?);
        };
        let values = self.step_table_values(&mut [&mut *cache])?;
        kernels::write(&g.ids, &[id])?;
        kernels::write(&g.table, &values)?;
        g.graph.launch()?;
        cache.advance(1);
        // A copy: the graph's output buffer is overwritten by the next step.
        Ok(g.logits.get(0)?.copy()?)
    }

    /// Captures the fused decode step of one sequence, reading the token id and step table
    /// from device buffers that each launch refills.
    #[cfg(feature = "cuda")]
    fn capture_graph(&self) -> Result<DecodeGraph> {
        let dev = &self.device;
        let ids = Tensor::zeros(1, DType::U32, dev)?;
        let table = Tensor::zeros(3 + 2 * self.blocks.len(), DType::I64, dev)?;
        let logits = Tensor::zeros((1, self.cfg.vocab_size), DType::F32, dev)?;
        let step = kernels::StepTable::persistent(&table, 1, GRAPH_KEY_SPLITS);
        let graph = kernels::Graph::capture(dev, &mut || -> candle_core::Result<()> {
            let x = kernels::embedding(self.embed.embeddings(), &ids)?;
            let h = self.fused_layers(x, &step)?;
            kernels::copy_to_f32(&self.linear(&self.lm_head, &h)?, &logits)
        })?;
        Ok(DecodeGraph {
            graph,
            ids,
            table,
            logits,
        })
    }

    #[cfg(not(feature = "cuda"))]
    fn decode_fused(&self, _embeds: &Tensor, _caches: &mut [&mut KvCache]) -> Result<Tensor> {
        unreachable!("fused decode is only enabled with the cuda feature")
    }
}

/// The [`Model`](crate::models::Model) methods of a family whose language model is the
/// [`Llama`] decoder held in field `$lm`: token embeddings, caches, forward and decode.
macro_rules! delegate_to_llama {
    ($lm:ident) => {
        fn embed_tokens(&self, ids: &[u32]) -> $crate::error::Result<candle_core::Tensor> {
            self.$lm.embed_tokens(ids)
        }

        fn new_cache(&self, capacity: usize) -> $crate::error::Result<$crate::models::kv::KvCache> {
            Ok(self.$lm.new_cache(capacity))
        }

        fn forward(
            &self,
            embeds: &candle_core::Tensor,
            cache: &mut $crate::models::kv::KvCache,
        ) -> $crate::error::Result<candle_core::Tensor> {
            self.$lm.forward_embeds(embeds, cache)
        }

        fn decode(
            &self,
            id: u32,
            cache: &mut $crate::models::kv::KvCache,
        ) -> $crate::error::Result<candle_core::Tensor> {
            self.$lm.decode(id, cache)
        }

        fn decode_batch(
            &self,
            ids: &[u32],
            caches: &mut [&mut $crate::models::kv::KvCache],
        ) -> $crate::error::Result<Vec<candle_core::Tensor>> {
            self.$lm.decode_batch(ids, caches)
        }
    };
}
pub(crate) use delegate_to_llama;

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

    /// Largest absolute difference relative to the largest magnitude of `want` (f32 logits),
    /// after checking that `want` is not degenerate.
    fn rel_diff(want: &Tensor, got: &Tensor) -> Result<f32> {
        let want = want.to_dtype(DType::F32)?.flatten_all()?;
        let got = got.to_dtype(DType::F32)?.flatten_all()?;
        let spread = (want.max(0)? - want.min(0)?)?.to_scalar::<f32>()?;
        assert!(spread > 1e-2, "degenerate logits: spread {spread}");
        let scale = want.abs()?.max(0)?.to_scalar::<f32>()?;
        let diff = (want - got)?.abs()?.max(0)?.to_scalar::<f32>()?;
        Ok(diff / scale)
    }

    /// Random weights for `cfg` saved in `dir`, so that the models a test compares load the
    /// same ones.
    #[cfg(feature = "cuda")]
    fn save_random(cfg: &LlamaConfig, dir: &std::path::Path) -> Result<std::path::PathBuf> {
        let map = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        Llama::load(cfg, vb.pp("model"), vb.pp("lm_head"), true)?;
        let file = dir.join("w.safetensors");
        map.save(&file)?;
        Ok(file)
    }

    #[cfg(feature = "cuda")]
    fn load_saved(cfg: &LlamaConfig, file: &std::path::Path, dtype: DType) -> Result<Llama> {
        let device = Device::new_cuda(0)?;
        // SAFETY: the file was written by `save_random` and is not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[file], dtype, &device)? };
        Llama::load(cfg, vb.pp("model"), vb.pp("lm_head"), true)
    }

    /// The fused CUDA decode step (kernels for norm + residual, bias + rotary + cache write,
    /// attention, SwiGLU) must equal the unfused path on the same GPU: over several steps,
    /// batched sequences of different lengths, grouped-query attention, q/k/v biases and
    /// M-RoPE positions shifted by a `rope_delta`. f32 to 1e-5; bf16 within bf16 rounding.
    #[cfg(feature = "cuda")]
    #[test]
    fn fused_cuda_decode_equals_unfused() -> Result<()> {
        let dir = tempfile::tempdir().map_err(candle_core::Error::wrap)?;
        for (kv_heads, qkv_bias, mrope) in [(4, false, false), (2, true, true)] {
            let mut cfg = cfg(&format!(
                r#"{{"vocab_size": 64, "hidden_size": 64, "intermediate_size": 96,
                    "num_hidden_layers": 3, "num_attention_heads": 4,
                    "num_key_value_heads": {kv_heads}, "rms_norm_eps": 1e-5,
                    "tie_word_embeddings": true}}"#
            ));
            cfg.qkv_bias = qkv_bias;
            cfg.mrope_section = mrope.then(|| vec![2, 3, 3]);
            let file = save_random(&cfg, dir.path())?;
            for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 3e-2)] {
                let load = |fused: bool| -> Result<Llama> {
                    let mut m = load_saved(&cfg, &file, dtype)?;
                    m.fused_decode = fused;
                    Ok(m)
                };
                let (fused, plain) = (load(true)?, load(false)?);
                // The long prompt spreads attention over several key splits.
                let long: Vec<u32> = (0..100).map(|i| (i * 7 + 3) % 64).collect();
                let prompts: [&[u32]; 3] = [&[3, 17, 4], &long, &[7]];
                let mut caches = Vec::new();
                for model in [&fused, &plain] {
                    let mut cs = Vec::new();
                    for p in prompts {
                        let mut c = model.new_cache(p.len() + 4);
                        model.forward_embeds(&model.embed_tokens(p)?, &mut c)?;
                        c.rope_delta = if mrope { -2 } else { 0 };
                        cs.push(c);
                    }
                    caches.push(cs);
                }
                let mut ids = vec![12u32, 30, 2];
                for step in 0..3 {
                    let mut outs = Vec::new();
                    for (model, cs) in [&fused, &plain].into_iter().zip(caches.iter_mut()) {
                        let mut refs: Vec<&mut KvCache> = cs.iter_mut().collect();
                        outs.push(
                            model.forward_decode_batch(&model.embed_tokens(&ids)?, &mut refs)?,
                        );
                    }
                    let diff = rel_diff(&outs[1], &outs[0])?;
                    assert!(
                        diff < tol,
                        "{dtype:?} kv_heads {kv_heads} step {step}: {diff}"
                    );
                    ids = (0..3)
                        .map(|i| crate::kernels::argmax(&outs[1].get(i)?))
                        .collect::<candle_core::Result<_>>()?;
                }
                // A single sequence through forward_embeds takes the fused path too.
                let mut one = [fused.new_cache(4), plain.new_cache(4)];
                let mut last = Vec::new();
                for (model, c) in [&fused, &plain].into_iter().zip(one.iter_mut()) {
                    model.forward_embeds(&model.embed_tokens(&[5, 6])?, c)?;
                    last.push(model.forward_embeds(&model.embed_tokens(&[9])?, c)?);
                }
                let diff = rel_diff(&last[1], &last[0])?;
                assert!(diff < tol, "{dtype:?} single sequence: {diff}");
            }
        }
        Ok(())
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

    /// A two-layer model on the CPU with freshly initialised random weights.
    fn random_model(kv_heads: usize) -> Result<Llama> {
        let cfg = cfg(&format!(
            r#"{{"vocab_size": 50, "hidden_size": 32, "intermediate_size": 48,
                "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": {kv_heads}, "rms_norm_eps": 1e-5,
                "tie_word_embeddings": true}}"#
        ));
        let map = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        // The model keeps its tensors after the VarMap is dropped.
        Llama::load(&cfg, vb.pp("model"), vb.pp("lm_head"), true)
    }

    /// Decoding through the cache must equal recomputing the whole sequence, with and without
    /// grouped-query attention (without it the cached keys reach the matmul as strided views).
    #[test]
    fn cached_decode_equals_full_prefill() -> Result<()> {
        for kv_heads in [4, 2] {
            let model = random_model(kv_heads)?;
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

            let diff = rel_diff(&full, &stepped)?;
            assert!(diff < 1e-5, "kv_heads {kv_heads}: {diff}");
        }
        Ok(())
    }

    /// Batched decode over caches of different lengths must equal decoding each sequence
    /// alone, with and without grouped-query attention.
    #[test]
    fn decode_batch_equals_per_sequence_decode() -> Result<()> {
        for kv_heads in [4, 2] {
            let model = random_model(kv_heads)?;
            let prompts: [&[u32]; 3] = [&[3, 17, 4], &[42, 9, 11, 23, 5, 8, 1], &[7]];
            let next = [12u32, 30, 2];
            let mut alone = Vec::new();
            let mut batched: Vec<KvCache> = Vec::new();
            for (prompt, &id) in prompts.iter().zip(&next) {
                let mut cache = model.new_cache(prompt.len() + 2);
                let embeds = model.embed_tokens(prompt)?.unsqueeze(0)?;
                model.forward_embeds(&embeds, &mut cache)?;
                batched.push(cache.try_clone()?);
                let step = model.embed_tokens(&[id])?.unsqueeze(0)?;
                alone.push(model.forward_embeds(&step, &mut cache)?);
            }
            let mut refs: Vec<&mut KvCache> = batched.iter_mut().collect();
            let logits = model.forward_decode_batch(&model.embed_tokens(&next)?, &mut refs)?;
            assert_eq!(logits.dims(), [3, 50]);
            for (i, (want, prompt)) in alone.iter().zip(&prompts).enumerate() {
                assert_eq!(batched[i].len(), prompt.len() + 1);
                let diff = rel_diff(want, &logits.get(i)?)?;
                assert!(diff < 1e-5, "kv_heads {kv_heads}, sequence {i}: {diff}");
            }
        }
        Ok(())
    }

    /// Single-sequence decode through the captured CUDA graph must equal the eager fused
    /// step, over several steps and for a second sequence (another cache, capacity and
    /// length) replaying the same graph; with q/k/v biases and M-RoPE positions.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_graph_decode_equals_eager_fused_decode() -> Result<()> {
        let dir = tempfile::tempdir().map_err(candle_core::Error::wrap)?;
        let mut cfg = cfg(
            r#"{"vocab_size": 64, "hidden_size": 64, "intermediate_size": 96,
                "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                "rms_norm_eps": 1e-5, "tie_word_embeddings": true}"#,
        );
        cfg.qkv_bias = true;
        cfg.mrope_section = Some(vec![2, 3, 3]);
        let file = save_random(&cfg, dir.path())?;
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 3e-2)] {
            let load = |graph: bool| -> Result<Llama> {
                let mut m = load_saved(&cfg, &file, dtype)?;
                m.graph_enabled = graph;
                Ok(m)
            };
            let (graphed, eager) = (load(true)?, load(false)?);
            assert!(graphed.fused_decode && eager.fused_decode);
            let long: Vec<u32> = (0..70).map(|i| (i * 5 + 1) % 64).collect();
            for prompt in [&[3u32, 17, 4][..], &long] {
                let mut caches = [
                    graphed.new_cache(prompt.len() + 8),
                    eager.new_cache(prompt.len() + 6),
                ];
                for (model, c) in [&graphed, &eager].into_iter().zip(caches.iter_mut()) {
                    model.forward_embeds(&model.embed_tokens(prompt)?, c)?;
                    c.rope_delta = -3;
                }
                let mut id = 9u32;
                for step in 0..6 {
                    let [cg, ce] = &mut caches;
                    let got = graphed.decode(id, cg)?;
                    let want = eager.decode(id, ce)?;
                    assert_eq!(cg.len(), ce.len());
                    let diff = rel_diff(&want, &got)?;
                    assert!(
                        diff < tol,
                        "{dtype:?} prompt {} step {step}: {diff}",
                        prompt.len()
                    );
                    id = crate::kernels::argmax(&want)?;
                }
            }
            assert!(
                graphed.graph.lock().map(|g| g.is_some()).unwrap_or(false),
                "no graph captured"
            );
            assert!(!graphed
                .graph_failed
                .load(std::sync::atomic::Ordering::Relaxed));
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
