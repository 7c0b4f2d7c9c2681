//! The fused CUDA decode step of [`Llama`]: per layer a few kernels of `crate::kernels`
//! instead of a few hundred candle ops, and for a single sequence one captured CUDA graph
//! replayed per token. Without the `cuda` feature only a stub remains (never called: the
//! model's `fused_decode` is then always off).

#[cfg(feature = "cuda")]
use candle_core::DType;
use candle_core::Tensor;
#[cfg(feature = "cuda")]
use candle_nn::Linear;

use super::Llama;
use crate::error::Result;
#[cfg(feature = "cuda")]
use crate::kernels;
use crate::models::kv::KvCache;

/// Key splits of the attention kernel in a captured decode step (fixed at capture; each
/// block then takes 1/32 of whatever the cache length is).
#[cfg(feature = "cuda")]
const GRAPH_KEY_SPLITS: usize = 32;

/// A captured single-sequence decode step and the device buffers it reads and writes.
#[cfg(feature = "cuda")]
pub(super) struct DecodeGraph {
    graph: kernels::Graph,
    ids: Tensor,
    table: Tensor,
    logits: Tensor,
}

impl Llama {
    /// The decode step as fused kernels (see `crate::kernels`), enqueued without waiting:
    /// per layer one norm (fused with the residual add), the q/k/v GEMV, one kernel for
    /// bias + rotary + cache write, the attention kernels (split over keys, then merged),
    /// `o_proj`, the gate/up GEMV, one SwiGLU kernel and `down_proj`. Returns `(B, vocab)`
    /// f32 logits and advances each cache by one.
    #[cfg(feature = "cuda")]
    pub(super) fn decode_fused(
        &self,
        embeds: &Tensor,
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let freqs = self
            .fused_freqs(caches)
            .ok_or_else(|| anyhow::anyhow!("fused decode over both LongRoPE tables"))?
            .clone();
        let values = self.step_table_values(caches)?;
        let longest = caches.iter().map(|c| c.len() + 1).max().unwrap_or(1);
        let table = kernels::StepTable::upload(&self.device, &values, caches.len(), longest)?;
        let h = self.fused_layers(embeds.to_dtype(self.dtype)?.contiguous()?, &table, &freqs)?;
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
        let y = kernels::matmul_t(x, l.weight(), &self.decode)?;
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
        inv_freqs: &Tensor,
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
                inv_freqs,
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
                gate_up = kernels::bias_add(&gate_up, b)?;
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

    #[cfg(feature = "cuda")]
    pub(super) fn graph_usable(&self) -> bool {
        self.fused_decode
            && self.graph_enabled
            && !self.graph_failed.load(std::sync::atomic::Ordering::Relaxed)
    }

    #[cfg(feature = "cuda")]
    pub(super) fn decode_graph(&self, id: u32, cache: &mut KvCache) -> Result<Tensor> {
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
            let h = self.fused_layers(x, &step, &self.inv_freqs_dev)?;
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
    pub(super) fn decode_fused(
        &self,
        _embeds: &Tensor,
        _caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        unreachable!("fused decode is only enabled with the cuda feature")
    }
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use candle_core::{DType, Device};
    use candle_nn::VarBuilder;

    use super::super::tests::{cfg, rel_diff};
    use super::*;
    use crate::models::common::llama::LlamaConfig;

    /// Random weights for `cfg` saved in `dir`, so that the models a test compares load the
    /// same ones.
    fn save_random(cfg: &LlamaConfig, dir: &std::path::Path) -> Result<std::path::PathBuf> {
        let map = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        Llama::load(cfg, vb.pp("model"), vb.pp("lm_head"), true)?;
        let file = dir.join("w.safetensors");
        map.save(&file)?;
        Ok(file)
    }

    fn load_saved(cfg: &LlamaConfig, file: &std::path::Path, dtype: DType) -> Result<Llama> {
        let device = Device::new_cuda(0)?;
        let vb = crate::models::common::files::mmap_weights(&[file], dtype, &device)?;
        Llama::load(cfg, vb.pp("model"), vb.pp("lm_head"), true)
    }

    /// The fused CUDA decode step (kernels for norm + residual, bias + rotary + cache write,
    /// attention, SwiGLU) must equal the unfused path on the same GPU: over several steps,
    /// batched sequences of different lengths, grouped-query attention, q/k/v biases and
    /// M-RoPE positions shifted by a `rope_delta`. f32 to 1e-5; bf16 within bf16 rounding.
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

    /// A bf16 prefill on the GPU through the flash attention kernel (causal, no mask) must
    /// equal the eager bf16 prefill (mask, scores materialised) of the same weights within
    /// bf16 rounding: a first chunk of several query tiles, then a second chunk after it in
    /// the cache, for head sizes 64 and 128 with grouped-query heads.
    #[test]
    fn flash_prefill_equals_eager_prefill() -> Result<()> {
        let dir = tempfile::tempdir().map_err(candle_core::Error::wrap)?;
        for (hidden, heads, kv_heads, bias) in [(256, 4, 2, false), (256, 2, 1, true)] {
            let mut cfg = cfg(&format!(
                r#"{{"vocab_size": 64, "hidden_size": {hidden}, "intermediate_size": 96,
                    "num_hidden_layers": 2, "num_attention_heads": {heads},
                    "num_key_value_heads": {kv_heads}, "rms_norm_eps": 1e-5,
                    "tie_word_embeddings": true}}"#
            ));
            // The prefill kernel adds the q/k/v bias itself.
            cfg.qkv_bias = bias;
            let file = save_random(&cfg, dir.path())?;
            let flash = load_saved(&cfg, &file, DType::BF16)?;
            let mut eager = load_saved(&cfg, &file, DType::BF16)?;
            for block in &mut eager.blocks {
                block.attn.use_flash = false;
            }
            let first: Vec<u32> = (0..150).map(|i| (i * 11 + 5) % 64).collect();
            let second: Vec<u32> = (0..70).map(|i| (i * 3 + 1) % 64).collect();
            let mut logits = Vec::new();
            for model in [&eager, &flash] {
                let mut cache = model.new_cache(first.len() + second.len());
                let a = model.forward_embeds(&model.embed_tokens(&first)?, &mut cache)?;
                let b = model.forward_embeds(&model.embed_tokens(&second)?, &mut cache)?;
                logits.push((a, b));
            }
            for (part, want, got) in [
                ("first chunk", &logits[0].0, &logits[1].0),
                ("second chunk", &logits[0].1, &logits[1].1),
            ] {
                let diff = rel_diff(want, got)?;
                assert!(diff < 3e-2, "head_dim {} {part}: {diff}", hidden / heads);
            }
        }
        Ok(())
    }

    /// Single-sequence decode through the captured CUDA graph must equal the eager fused
    /// step, over several steps and for a second sequence (another cache, capacity and
    /// length) replaying the same graph; with q/k/v biases and M-RoPE positions.
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

    /// LongRoPE on the fused step: batches wholly before or past the switch take the fused
    /// kernels with that table; a batch across it takes the plain path; one sequence crossing
    /// it through `decode` (the CUDA graph holds the short table) matches the plain path.
    #[test]
    fn fused_cuda_decode_follows_long_rope() -> Result<()> {
        let dir = tempfile::tempdir().map_err(candle_core::Error::wrap)?;
        let cfg = cfg(
            r#"{"vocab_size": 64, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": true, "max_position_embeddings": 64,
            "rope_scaling": {"type": "su", "original_max_position_embeddings": 8,
                "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7],
                "long_factor": [2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]}}"#,
        );
        let file = save_random(&cfg, dir.path())?;
        let load = |fused: bool| -> Result<Llama> {
            let mut m = load_saved(&cfg, &file, DType::F32)?;
            m.fused_decode = fused;
            Ok(m)
        };
        let (fused, plain) = (load(true)?, load(false)?);
        let ids: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 64).collect();
        for lens in [[20, 30], [2, 3], [6, 20]] {
            let mut caches = Vec::new();
            for model in [&fused, &plain] {
                let mut cs = Vec::new();
                for n in lens {
                    let mut c = model.new_cache(n + 4);
                    model.forward_embeds(&model.embed_tokens(&ids[..n])?, &mut c)?;
                    cs.push(c);
                }
                caches.push(cs);
            }
            for step in 0..4 {
                let mut outs = Vec::new();
                for (model, cs) in [&fused, &plain].into_iter().zip(caches.iter_mut()) {
                    let mut refs: Vec<&mut KvCache> = cs.iter_mut().collect();
                    outs.push(
                        model.forward_decode_batch(&model.embed_tokens(&[5, 9])?, &mut refs)?,
                    );
                }
                let diff = rel_diff(&outs[1], &outs[0])?;
                assert!(diff < 1e-5, "{lens:?} step {step}: {diff}");
            }
        }
        let mut one = [fused.new_cache(12), plain.new_cache(12)];
        for (model, c) in [&fused, &plain].into_iter().zip(one.iter_mut()) {
            model.forward_embeds(&model.embed_tokens(&ids[..5])?, c)?;
        }
        for step in 0..5 {
            let want = plain.decode(ids[5 + step], &mut one[1])?;
            let got = fused.decode(ids[5 + step], &mut one[0])?;
            let diff = rel_diff(&want, &got)?;
            assert!(diff < 1e-5, "one sequence, step {step}: {diff}");
        }
        Ok(())
    }
}
