//! A Llama decoder (as `LlamaForCausalLM` in transformers) driven by input embeddings:
//! RMSNorm, rotary positions (HF's rotate-half layout; default, linear, llama3 and LongRoPE
//! scaling), q/k/v and gate/up projections stored apart or fused (Phi-3),
//! grouped-query attention over the engine-owned [`KvCache`], SwiGLU MLP, tied or untied
//! `lm_head`. With `qkv_bias` it is also the Qwen2 decoder (biased q/k/v, unbiased `o_proj`).
//! Knows no vision and no tokenizer.
//!
//! `config.rs` parses and checks the config, `layers.rs` holds the layers of the plain
//! (candle ops) path, `fused.rs` the fused CUDA decode step and its CUDA graph.

mod config;
mod fused;
mod layers;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, linear_b, Embedding, Linear, VarBuilder};

pub use config::{LlamaConfig, Rope, RopeScaling, TokenIds};
use layers::{causal_mask, inv_freqs, long_inv_freqs, Attention, Block, Mlp, RmsNorm, Rotary};

use crate::error::{Error, Result};
use crate::kernels::{self, DecodeOptions};
use crate::models::kv::KvCache;
#[cfg(feature = "cuda")]
use fused::DecodeGraph;

/// LongRoPE's second table of frequencies.
struct LongRope {
    inv_freqs: Vec<f32>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    inv_freqs_dev: Tensor,
    original: usize,
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
    /// LongRoPE's long-factor frequencies, taken by a forward whose positions pass
    /// `original` (`None` for other scalings).
    long_rope: Option<LongRope>,
    /// Which position row (M-RoPE: temporal, height, width) each frequency rotates by;
    /// all 0 for plain rotary positions.
    row_of: Vec<usize>,
    /// The decode switches read at load (see [`DecodeOptions`]).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    decode: DecodeOptions,
    /// Decode steps run as fused kernels (CUDA, unless `decode.fused` is off, so that both
    /// paths can be timed and compared on one machine).
    fused_decode: bool,
    /// With `fused_decode`, single-sequence decode replays a captured CUDA graph (unless
    /// `o_proj` or the MLP has biases, or `decode.cuda_graph` is off).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    graph_enabled: bool,
    #[cfg(feature = "cuda")]
    graph: std::sync::Mutex<Option<DecodeGraph>>,
    #[cfg(feature = "cuda")]
    graph_failed: std::sync::atomic::AtomicBool,
    device: Device,
    dtype: DType,
}

impl Llama {
    /// Loads from `vb` at the prefix holding `embed_tokens`, `layers`, `norm`; `lm_head` is
    /// the prefix of the output projection (ignored when `tied` and absent). The decode
    /// switches are read from the environment ([`DecodeOptions::from_env`]).
    pub fn load(
        cfg: &LlamaConfig,
        vb: VarBuilder,
        lm_head: VarBuilder,
        tied: bool,
    ) -> Result<Self> {
        Self::load_with(cfg, vb, lm_head, tied, DecodeOptions::from_env())
    }

    /// [`Llama::load`] with the decode switches given.
    pub fn load_with(
        cfg: &LlamaConfig,
        vb: VarBuilder,
        lm_head: VarBuilder,
        tied: bool,
        decode: DecodeOptions,
    ) -> Result<Self> {
        cfg.validate()?;
        let rope = cfg.rope()?;
        let qk_scale = match rope.scaling {
            RopeScaling::LongRope {
                attention_factor, ..
            } => attention_factor,
            _ => 1.0,
        };
        let h = cfg.hidden_size;
        let embed = embedding(cfg.vocab_size, h, vb.pp("embed_tokens"))?;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp("layers").pp(i);
                Ok(Block {
                    norm1: RmsNorm::new(h, vb.pp("input_layernorm"))?,
                    attn: Attention::new(cfg, vb.pp("self_attn"), qk_scale)?,
                    norm2: RmsNorm::new(h, vb.pp("post_attention_layernorm"))?,
                    mlp: Mlp::new(cfg, vb.pp("mlp"))?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let lm_head = if tied && !lm_head.contains_tensor("weight") {
            Linear::new(embed.embeddings().clone(), None)
        } else {
            linear_b(h, cfg.vocab_size, false, lm_head)?
        };
        let inv_freqs = inv_freqs(&rope, cfg.head_dim());
        let row_of = match &cfg.mrope_section {
            Some(sections) => sections
                .iter()
                .enumerate()
                .flat_map(|(row, &n)| std::iter::repeat_n(row % 3, n))
                .collect(),
            None => vec![0; inv_freqs.len()],
        };
        let device = vb.device().clone();
        let long_rope = match long_inv_freqs(&rope, cfg.head_dim()) {
            Some((freqs, original)) => Some(LongRope {
                inv_freqs_dev: Tensor::new(freqs.as_slice(), &device)?,
                inv_freqs: freqs,
                original,
            }),
            None => None,
        };
        let fused_decode = cfg!(feature = "cuda") && device.is_cuda() && decode.fused;
        Ok(Self {
            cfg: cfg.clone(),
            norm: RmsNorm::new(h, vb.pp("norm"))?,
            embed,
            blocks,
            lm_head,
            inv_freqs_dev: Tensor::new(inv_freqs.as_slice(), &device)?,
            inv_freqs,
            long_rope,
            row_of,
            decode,
            fused_decode,
            graph_enabled: !cfg.attention_bias && !cfg.mlp_bias && decode.cuda_graph,
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

    /// The frequencies of a forward whose positions end at `end` (exclusive): LongRoPE's long
    /// ones once `end` passes the pre-training context, as Phi-3's rotary embedding compares
    /// `max(position_ids) + 1` on every forward (so a generation switches when it crosses).
    fn freqs_until(&self, end: i64) -> &[f32] {
        match &self.long_rope {
            Some(l) if end > l.original as i64 => &l.inv_freqs,
            _ => &self.inv_freqs,
        }
    }

    /// The device table of [`Llama::freqs_until`] shared by every cache of a fused step;
    /// `None` when LongRoPE puts them on different sides of the switch.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn fused_freqs(&self, caches: &[&mut KvCache]) -> Option<&Tensor> {
        let Some(l) = &self.long_rope else {
            return Some(&self.inv_freqs_dev);
        };
        let long = |c: &&mut KvCache| Self::next_position(c) + 1 > l.original as i64;
        if caches.iter().all(long) {
            Some(&l.inv_freqs_dev)
        } else if !caches.iter().any(long) {
            Some(&self.inv_freqs_dev)
        } else {
            None
        }
    }

    /// cos/sin tables for `positions` (one `[temporal, height, width]` row each; frequency
    /// `j` rotates by row `row_of[j]`), shaped `shape` (its product = positions × half).
    /// With `per_row` each position is its own forward (one sequence each, for LongRoPE's
    /// choice of frequencies); else they are one forward's.
    fn rotary_at(
        &self,
        positions: &[[i64; 3]],
        shape: &[usize],
        per_row: bool,
    ) -> candle_core::Result<Rotary> {
        let half = self.inv_freqs.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        let whole = positions.iter().map(|p| p[0] + 1).max().unwrap_or(0);
        for pos in positions {
            let freqs = self.freqs_until(if per_row { pos[0] + 1 } else { whole });
            for (f, &row) in freqs.iter().zip(&self.row_of) {
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
        if t == 1
            && self.fused_decode
            && positions[0] == [Self::next_position(cache); 3]
            && self.fused_freqs(&[&mut *cache]).is_some()
        {
            let logits = self.decode_fused(&embeds.reshape((1, h))?, &mut [cache])?;
            return Ok(logits.flatten_all()?);
        }
        let start = cache.len();
        let half = self.inv_freqs.len();
        let rot = self.rotary_at(positions, &[t, half], false)?;
        let flash = self.blocks[0].attn.flash_on(&self.device, self.dtype);
        let mask = if t > 1 && !flash {
            Some(causal_mask(start, t, self.dtype, &self.device)?)
        } else {
            None
        };
        let normed = self.run_blocks(&embeds.to_dtype(self.dtype)?, |block, i, h| {
            block.attn.forward(h, &rot, mask.as_ref(), i, cache)
        })?;
        cache.advance(t);
        let logits = kernels::cpu::linear(&self.lm_head, &normed.narrow(1, t - 1, 1)?)?;
        Ok(logits.flatten_all()?.to_dtype(DType::F32)?)
    }

    /// [`Model::decode_batch`](crate::models::Model::decode_batch) for families whose language
    /// model is this decoder: one new token per sequence, logits `(vocab,)` per sequence.
    pub fn decode_batch(&self, ids: &[u32], caches: &mut [&mut KvCache]) -> Result<Vec<Tensor>> {
        crate::models::check_batch(ids, caches)?;
        #[cfg(feature = "cuda")]
        if let ([id], [cache]) = (ids, &mut *caches) {
            // The graph holds the first table of frequencies (LongRoPE's short one).
            let first_table = self
                .long_rope
                .as_ref()
                .is_none_or(|l| Self::next_position(cache) < l.original as i64);
            if self.graph_usable() && first_table {
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
        if self.fused_decode && self.fused_freqs(caches).is_some() {
            return self.decode_fused(embeds, caches);
        }
        let half = self.inv_freqs.len();
        let positions: Vec<[i64; 3]> = caches.iter().map(|c| [Self::next_position(c); 3]).collect();
        let rot = self.rotary_at(&positions, &[b, 1, half], true)?;
        let normed = self.run_blocks(&embeds.to_dtype(self.dtype)?, |block, i, h| {
            block.attn.forward_batch(h, &rot, i, caches)
        })?;
        for cache in caches.iter_mut() {
            cache.advance(1);
        }
        let logits = kernels::cpu::linear(&self.lm_head, &normed)?;
        Ok(logits.to_dtype(DType::F32)?)
    }

    /// The blocks over `xs`, attention by `attend(block, layer, normed input)`; returns the
    /// output after the final norm. Each residual add goes with the norm after it (one kernel
    /// on CUDA; on the CPU the same add then norm as HF).
    fn run_blocks(
        &self,
        xs: &Tensor,
        mut attend: impl FnMut(&Block, usize, &Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let eps = self.cfg.rms_norm_eps;
        let norm_before = |i: usize| match self.blocks.get(i) {
            Some(block) => &block.norm1.weight,
            None => &self.norm.weight,
        };
        let (mut x, mut h) = kernels::add_rms_norm(xs, None, norm_before(0), eps)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let attn = attend(block, i, &h)?;
            let (mid, h_mid) = kernels::add_rms_norm(&x, Some(&attn), &block.norm2.weight, eps)?;
            let mlp = block.mlp.forward(&h_mid)?;
            (x, h) = kernels::add_rms_norm(&mid, Some(&mlp), norm_before(i + 1), eps)?;
        }
        Ok(h)
    }

    /// One token of one sequence: through a captured CUDA graph of the fused step when it
    /// can (one launch instead of a few hundred), else as [`Llama::decode_batch`] would.
    /// The graph is captured on the first call, after that call's step ran eagerly.
    pub fn decode(&self, id: u32, cache: &mut KvCache) -> Result<Tensor> {
        Ok(self.decode_batch(&[id], &mut [cache])?.remove(0))
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

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn cfg(json: &str) -> LlamaConfig {
        serde_json::from_str(json).unwrap()
    }

    /// Largest absolute difference relative to the largest magnitude of `want` (f32 logits),
    /// after checking that `want` is not degenerate.
    pub(super) fn rel_diff(want: &Tensor, got: &Tensor) -> Result<f32> {
        let want = want.to_dtype(DType::F32)?.flatten_all()?;
        let got = got.to_dtype(DType::F32)?.flatten_all()?;
        let spread = (want.max(0)? - want.min(0)?)?.to_scalar::<f32>()?;
        assert!(spread > 1e-2, "degenerate logits: spread {spread}");
        let scale = want.abs()?.max(0)?.to_scalar::<f32>()?;
        let diff = (want - got)?.abs()?.max(0)?.to_scalar::<f32>()?;
        Ok(diff / scale)
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

    /// A model whose q/k/v and gate/up projections are stored fused, as Phi-3 stores them,
    /// gives the same logits as one with them stored apart.
    #[test]
    fn stored_fused_projections_equal_separate_ones() -> Result<()> {
        let cfg = cfg(
            r#"{"vocab_size": 50, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": true}"#,
        );
        let map = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let apart = Llama::load(&cfg, vb.pp("model"), vb.pp("lm_head"), true)?;
        let mut tensors: std::collections::HashMap<String, Tensor> = map
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        for i in 0..2 {
            let p = format!("model.layers.{i}");
            let mut take = |names: &[&str], fused: &str| -> Result<()> {
                let parts = names
                    .iter()
                    .map(|n| tensors.remove(&format!("{p}.{n}.weight")).unwrap())
                    .collect::<Vec<_>>();
                tensors.insert(format!("{p}.{fused}.weight"), Tensor::cat(&parts, 0)?);
                Ok(())
            };
            take(
                &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                "self_attn.qkv_proj",
            )?;
            take(&["mlp.gate_proj", "mlp.up_proj"], "mlp.gate_up_proj")?;
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let fused = Llama::load(&cfg, vb.pp("model"), vb.pp("lm_head"), true)?;
        let ids = [3u32, 17, 4, 42];
        let run = |m: &Llama| -> Result<Tensor> {
            let mut cache = m.new_cache(ids.len());
            m.forward_embeds(&m.embed_tokens(&ids)?, &mut cache)
        };
        assert_eq!(rel_diff(&run(&apart)?, &run(&fused)?)?, 0.0);
        Ok(())
    }

    /// LongRoPE (Phi-3): a forward takes the long factors once its positions pass
    /// `original_max_position_embeddings` (8 here), and a batched decode decides per sequence,
    /// as each sequence decoded alone would.
    #[test]
    fn long_rope_switches_past_the_original_context() -> Result<()> {
        let json = |long: &str| {
            cfg(&format!(
                r#"{{"vocab_size": 50, "hidden_size": 32, "intermediate_size": 48,
                "num_hidden_layers": 2, "num_attention_heads": 4, "rms_norm_eps": 1e-5,
                "tie_word_embeddings": true, "max_position_embeddings": 32,
                "rope_scaling": {{"type": "su", "original_max_position_embeddings": 8,
                    "short_factor": [1.0, 1.5, 2.0, 1.2], "long_factor": {long}}}}}"#
            ))
        };
        let map = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let model = Llama::load(
            &json("[3.0, 5.0, 7.0, 9.0]"),
            vb.pp("model"),
            vb.pp("lm_head"),
            true,
        )?;
        let short_only = Llama::load(
            &json("[1.0, 1.5, 2.0, 1.2]"),
            vb.pp("model"),
            vb.pp("lm_head"),
            true,
        )?;
        assert_eq!(model.freqs_until(8), short_only.freqs_until(8));
        assert_ne!(model.freqs_until(9), short_only.freqs_until(9));
        let ids: Vec<u32> = (0..10).map(|i| (i * 7 + 3) % 50).collect();
        // Prompts of 7 and 8 tokens: the next position ends at 8 (short) and 9 (long).
        let mut alone = Vec::new();
        let mut caches = Vec::new();
        for (n, m) in [(7, &model), (8, &model), (7, &short_only), (8, &short_only)] {
            let mut c = m.new_cache(10);
            m.forward_embeds(&m.embed_tokens(&ids[..n])?, &mut c)?;
            caches.push(c.try_clone()?);
            alone.push(m.forward_embeds(&m.embed_tokens(&[ids[n]])?, &mut c)?);
        }
        assert_eq!(rel_diff(&alone[0], &alone[2])?, 0.0, "short side");
        assert!(rel_diff(&alone[1], &alone[3])? > 1e-3, "long side");
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().take(2).collect();
        let batched =
            model.forward_decode_batch(&model.embed_tokens(&[ids[7], ids[8]])?, &mut refs)?;
        for (i, want) in alone.iter().take(2).enumerate() {
            assert!(rel_diff(want, &batched.get(i)?)? < 1e-6, "sequence {i}");
        }
        // A 9-token prefill is one forward past the switch.
        let mut c = model.new_cache(9);
        let full = model.forward_embeds(&model.embed_tokens(&ids[..9])?, &mut c)?;
        let mut c = short_only.new_cache(9);
        let short = short_only.forward_embeds(&short_only.embed_tokens(&ids[..9])?, &mut c)?;
        assert!(rel_diff(&full, &short)? > 1e-3);
        Ok(())
    }
}
