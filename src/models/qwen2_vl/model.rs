//! The Qwen2 language model with multimodal rotary positions (M-RoPE), and [`Qwen2VlModel`], the
//! family's [`Model`]: it encodes images, videos and precomputed image embeds, computes the
//! 3-row position ids of a spliced prompt exactly as transformers' `get_rope_index`, and keeps
//! the resulting offset in [`KvCache::rope_delta`] for decoding.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::config::{Processors, Qwen2VlConfig, TextConfig, Variant};
use super::preprocessor::{preprocess_image, preprocess_video, Patches};
use super::vision::VisionTower;
use crate::error::{Error, Result};
use crate::media::{Embeds, MediaItem, Modality, Video};
use crate::models::common::files::{mmap_weights, weight_files};
use crate::models::common::llama::{Llama, LlamaConfig};
use crate::models::kv::KvCache;
use crate::models::{
    splice_embeddings, EncodedItem, Expansion, ItemGrid, LoadContext, Model, ModelInfo,
    ProcessorKwargs, Spliced,
};

/// The Qwen2 decoder of the family: the shared Llama decoder with q/k/v biases and M-RoPE
/// positions.
fn load_text(cfg: &TextConfig, vb: VarBuilder, lm_head: VarBuilder) -> Result<Llama> {
    let llama = LlamaConfig {
        model_type: None,
        vocab_size: cfg.vocab_size,
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        num_hidden_layers: cfg.num_hidden_layers,
        num_attention_heads: cfg.num_attention_heads,
        num_key_value_heads: Some(cfg.num_key_value_heads),
        head_dim: Some(cfg.head_dim),
        hidden_act: cfg.hidden_act.clone(),
        max_position_embeddings: cfg.max_position_embeddings,
        rms_norm_eps: cfg.rms_norm_eps,
        tie_word_embeddings: cfg.tie_word_embeddings,
        attention_bias: false,
        qkv_bias: true,
        mlp_bias: false,
        mrope_section: Some(cfg.mrope_section.clone()),
        rope_theta: Some(cfg.rope_theta),
        rope_scaling: None,
        rope_parameters: None,
        bos_token_id: None,
        eos_token_id: None,
    };
    // The output projection is `lm_head` when present, else the embedding (Qwen2-VL-2B ties).
    Llama::load(&llama, vb, lm_head, true)
}

/// transformers' `get_rope_index` over a spliced prompt: text tokens advance all three rows
/// together; item `span.item`'s tokens get `(start + t*interval, start + y, start + x)` over its
/// merged grid, after which the text position resumes at `start + max(h, w) / merge`.
/// Returns the positions and `rope_delta = max position + 1 - len`.
pub fn rope_index(
    ids_len: usize,
    spans: &[crate::models::Span],
    grids: &[ItemGrid],
    merge: usize,
) -> Result<(Vec<[i64; 3]>, i64)> {
    let mut spans: Vec<_> = spans.to_vec();
    spans.sort_by_key(|s| s.start);
    let mut out = Vec::with_capacity(ids_len);
    let mut at = 0usize;
    let mut pos: i64 = 0;
    for span in &spans {
        if span.start < at || span.start + span.len > ids_len {
            return Err(anyhow::anyhow!("media spans overlap or run past the prompt").into());
        }
        for _ in at..span.start {
            out.push([pos; 3]);
            pos += 1;
        }
        let g = grids.get(span.item).ok_or_else(|| {
            anyhow::anyhow!("no grid for media item {} of the prompt", span.item + 1)
        })?;
        let [t, h, w] = g.grid_thw;
        let (lh, lw) = (h / merge, w / merge);
        if t * lh * lw != span.len {
            return Err(anyhow::anyhow!(
                "media item {} has a {t}x{h}x{w} grid ({} tokens) but {} prompt slots",
                span.item + 1,
                t * lh * lw,
                span.len
            )
            .into());
        }
        for ti in 0..t {
            // float32 product truncated toward zero, as `(arange(t) * interval).long()`.
            let tp = (ti as f32 * g.time_interval) as i64 + pos;
            for y in 0..lh {
                for x in 0..lw {
                    out.push([tp, pos + y as i64, pos + x as i64]);
                }
            }
        }
        pos += lh.max(lw) as i64;
        at = span.start + span.len;
    }
    for _ in at..ids_len {
        out.push([pos; 3]);
        pos += 1;
    }
    let max = out
        .iter()
        .flat_map(|p| p.iter().copied())
        .max()
        .unwrap_or(-1);
    Ok((out, max + 1 - ids_len as i64))
}

/// A loaded Qwen2-VL or Qwen2.5-VL checkpoint.
pub struct Qwen2VlModel {
    cfg: Qwen2VlConfig,
    processors: Processors,
    vision: VisionTower,
    text: Llama,
    info: ModelInfo,
    dtype: DType,
    device: Device,
}

/// Loads a Qwen2-VL / Qwen2.5-VL model directory (`config.json`, `*.safetensors`, processor
/// configs). Accepts both the hub's weight names (`visual.*`, `model.*`) and transformers 5's
/// (`model.visual.*`, `model.language_model.*`).
pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Qwen2VlModel> {
    load_from(&LoadContext::from_dir(dir, device, dtype)?)
}

/// [`load`] with the parsed `config.json` of `ctx`.
pub fn load_from(ctx: &LoadContext) -> Result<Qwen2VlModel> {
    let (dir, device, dtype) = (ctx.dir.as_path(), &ctx.device, ctx.dtype);
    let cfg = Qwen2VlConfig::from_value(&ctx.config)?;
    let processors = Processors::load(dir)?;
    let files = weight_files(dir)?;
    let vb = mmap_weights(&files, dtype, device)?;
    let (visual, lm) = if vb.contains_tensor("model.language_model.embed_tokens.weight") {
        (vb.pp("model.visual"), vb.pp("model.language_model"))
    } else {
        (vb.pp("visual"), vb.pp("model"))
    };
    let vision = VisionTower::load(&cfg.vision, cfg.variant, visual)?;
    let text_model = load_text(&cfg.text, lm, vb.pp("lm_head"))?;
    let info = ModelInfo {
        hidden_size: cfg.text.hidden_size,
        vocab_size: cfg.text.vocab_size,
        max_positions: cfg.text.max_position_embeddings,
    };
    Ok(Qwen2VlModel {
        cfg,
        processors,
        vision,
        text: text_model,
        info,
        dtype,
        device: device.clone(),
    })
}

impl Qwen2VlModel {
    pub fn config(&self) -> &Qwen2VlConfig {
        &self.cfg
    }

    pub fn processors(&self) -> &Processors {
        &self.processors
    }

    /// Runs the vision tower on preprocessed patches of one item: `(tokens, hidden)`.
    pub fn encode_patches(&self, pixel_values: &Tensor, grid_thw: [usize; 3]) -> Result<Tensor> {
        self.vision.forward(pixel_values, &[grid_thw])
    }

    fn slots(&self, grid: [usize; 3]) -> usize {
        let m = self.cfg.vision.spatial_merge_size;
        grid[0] * (grid[1] / m) * (grid[2] / m)
    }

    /// Encodes an item into features placed on its patch grid (what M-RoPE needs of it);
    /// `kwargs` bound the resized pixel count as transformers' `min_pixels`/`max_pixels`
    /// processor kwargs do, for images and video frames alike.
    fn encode_item(&self, item: &MediaItem, kwargs: &ProcessorKwargs) -> Result<EncodedItem> {
        let (features, grid, slot_token) = match item {
            MediaItem::Image(img) => {
                let p = preprocess_image(img, &self.processors.image.with_kwargs(kwargs))?;
                let f = self.run_patches(&p)?;
                (
                    f,
                    ItemGrid {
                        grid_thw: p.grid_thw,
                        time_interval: 1.0,
                    },
                    self.cfg.image_token_id,
                )
            }
            MediaItem::Video(video) => {
                let p =
                    preprocess_video(&video.frames, &self.processors.video.with_kwargs(kwargs))?;
                let f = self.run_patches(&p)?;
                let interval = self.video_time_interval(video);
                (
                    f,
                    ItemGrid {
                        grid_thw: p.grid_thw,
                        time_interval: interval,
                    },
                    self.cfg.video_token_id,
                )
            }
            MediaItem::Embeds(e) if e.modality == Modality::Audio => {
                return Err(Error::input(
                    "audio embeds",
                    format!("{} does not accept audio", self.cfg.variant.family_name()),
                    "image or video embeds",
                ))
            }
            MediaItem::Embeds(e) => {
                let (f, grid) = self.check_embeds(e)?;
                let token = match e.modality {
                    Modality::Video => self.cfg.video_token_id,
                    _ => self.cfg.image_token_id,
                };
                (f, grid, token)
            }
            MediaItem::Audio(_) => {
                return Err(Error::input(
                    "audio",
                    format!("{} does not accept audio", self.cfg.variant.family_name()),
                    "image, video or image embeds",
                ))
            }
        };
        let expansion = Expansion {
            before: Vec::new(),
            slot_token,
            slots: self.slots(grid.grid_thw),
            after: Vec::new(),
            slot_ids: Vec::new(),
        };
        Ok(EncodedItem::new(expansion, features).with_grid(grid))
    }

    fn run_patches(&self, p: &Patches) -> Result<Tensor> {
        let pv = p.to_tensor(&self.device)?;
        self.encode_patches(&pv, p.grid_thw)
    }

    /// Qwen2.5-VL spaces temporal positions by `tokens_per_second * seconds per temporal patch`,
    /// where the sampled frame rate is transformers' `VideoMetadata.sampled_fps` (24 when
    /// unknown); Qwen2-VL steps by 1.
    fn video_time_interval(&self, video: &Video) -> f32 {
        if self.cfg.variant != Variant::Qwen25Vl {
            return 1.0;
        }
        let n = video.frames.len() as f64;
        let fps = if video.source_fps > 0.0 && video.duration > 0.0 {
            let total = (video.duration * video.source_fps).round().max(n);
            n / total * video.source_fps
        } else if video.source_fps > 0.0 {
            video.source_fps
        } else {
            24.0
        };
        let second_per_grid = (self.processors.video.temporal_patch_size as f64 / fps) as f32;
        self.cfg.vision.tokens_per_second as f32 * second_per_grid
    }

    /// Shape-checks precomputed embeds: `image_embeds` (or `video_embeds`) of shape
    /// `(tokens, hidden)` or `(1, tokens, hidden)` and its `(1, 3)` grid.
    fn check_embeds(&self, e: &Embeds) -> Result<(Tensor, ItemGrid)> {
        let (names, grid_names): (&[&str], &[&str]) = match e.modality {
            Modality::Video => (&["video_embeds", "embeds"], &["video_grid_thw", "grid_thw"]),
            _ => (&["image_embeds", "embeds"], &["image_grid_thw", "grid_thw"]),
        };
        let what = names[0];
        let emb = names
            .iter()
            .find_map(|n| e.tensors.get(*n))
            .or_else(|| {
                (e.tensors.len() == 1)
                    .then(|| e.tensors.values().next())
                    .flatten()
            })
            .ok_or_else(|| {
                Error::input(
                    what,
                    format!(
                        "no `{what}` tensor among {:?}",
                        e.tensors.keys().collect::<Vec<_>>()
                    ),
                    format!("a `{what}` tensor of shape (tokens, hidden)"),
                )
            })?;
        let grid_name = grid_names[0];
        let grid_t = grid_names
            .iter()
            .find_map(|n| e.tensors.get(*n))
            .ok_or_else(|| {
                Error::input(
                    what,
                    format!("`{grid_name}` is missing; Qwen2-VL embeds need each item's grid"),
                    format!("a `{grid_name}` tensor of shape (1, 3) beside `{what}`"),
                )
            })?;
        let hidden = self.cfg.text.hidden_size;
        let emb = match emb.dims() {
            [_, h] if *h == hidden => emb.clone(),
            [1, _, h] if *h == hidden => emb.squeeze(0)?,
            dims => {
                return Err(Error::input(
                    what,
                    format!("shape {dims:?}"),
                    format!("(tokens, {hidden}) or (1, tokens, {hidden}): one item per input"),
                ))
            }
        };
        let grid_vals: Vec<f64> = match grid_t.dims() {
            [3] | [1, 3] => grid_t.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?,
            dims => {
                return Err(Error::input(
                    grid_name,
                    format!("shape {dims:?}"),
                    "shape (1, 3): t, h, w of the one item",
                ))
            }
        };
        let m = self.cfg.vision.spatial_merge_size;
        if grid_vals
            .iter()
            .any(|&v| v < 1.0 || v.fract() != 0.0 || v > 1e6)
        {
            return Err(Error::input(
                grid_name,
                format!("values {grid_vals:?}"),
                "positive integers t, h, w",
            ));
        }
        let grid = [
            grid_vals[0] as usize,
            grid_vals[1] as usize,
            grid_vals[2] as usize,
        ];
        if !grid[1].is_multiple_of(m) || !grid[2].is_multiple_of(m) {
            return Err(Error::input(
                grid_name,
                format!("grid {grid:?} has h or w not a multiple of the merge size {m}"),
                format!("h and w multiples of {m}"),
            ));
        }
        let tokens = emb.dim(0)?;
        if tokens != self.slots(grid) {
            return Err(Error::input(
                what,
                format!(
                    "{tokens} embedding rows but {grid_name} {grid:?} implies {}",
                    self.slots(grid)
                ),
                "t*h*w / merge^2 rows, consistent with the grid",
            ));
        }
        // Qwen2.5-VL video: without `second_per_grid_ts` transformers assumes 1 s per temporal
        // patch, so positions step by `tokens_per_second`.
        let time_interval =
            if e.modality == Modality::Video && self.cfg.variant == Variant::Qwen25Vl {
                let seconds = match e.tensors.get("second_per_grid_ts") {
                    None => 1.0,
                    Some(t) => {
                        let v: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
                        match v.as_slice() {
                            [s] if s.is_finite() && *s >= 0.0 => *s,
                            _ => {
                                return Err(Error::input(
                                    "second_per_grid_ts",
                                    format!("values {v:?}"),
                                    "one non-negative number of seconds per temporal patch",
                                ))
                            }
                        }
                    }
                };
                self.cfg.vision.tokens_per_second as f32 * seconds
            } else {
                1.0
            };
        let emb = emb.to_device(&self.device)?.to_dtype(self.dtype)?;
        Ok((
            emb,
            ItemGrid {
                grid_thw: grid,
                time_interval,
            },
        ))
    }

    /// Prefill with explicit grids (one per item, in item order): splices, computes M-RoPE
    /// positions, stores `rope_delta` in the cache and returns the last logits.
    pub fn prefill_with_grids(
        &self,
        prompt: &Spliced,
        items: &[EncodedItem],
        grids: &[ItemGrid],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let embeds = splice_embeddings(self, prompt, items)?;
        let (positions, delta) = rope_index(
            prompt.ids.len(),
            &prompt.spans,
            grids,
            self.cfg.vision.spatial_merge_size,
        )?;
        let logits = self.text.forward_embeds_at(&embeds, &positions, cache)?;
        cache.rope_delta = delta;
        Ok(logits)
    }

    /// The M-RoPE position ids of a spliced prompt and its `rope_delta`.
    pub fn position_ids(
        &self,
        prompt: &Spliced,
        grids: &[ItemGrid],
    ) -> Result<(Vec<[i64; 3]>, i64)> {
        rope_index(
            prompt.ids.len(),
            &prompt.spans,
            grids,
            self.cfg.vision.spatial_merge_size,
        )
    }
}

impl Model for Qwen2VlModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn encode_with(&self, item: &MediaItem, kwargs: &ProcessorKwargs) -> Result<EncodedItem> {
        self.encode_item(item, kwargs)
    }

    // Decode positions continue at the cache length plus the prompt's `rope_delta`.
    crate::models::common::llama::delegate_to_llama!(text);

    fn prefill(
        &self,
        prompt: &Spliced,
        items: &[EncodedItem],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let grids = items
            .iter()
            .enumerate()
            .map(|(i, it)| {
                it.grid.ok_or_else(|| {
                    Error::Runtime(anyhow::anyhow!(
                        "media item {} was not encoded by this model (no grid known)",
                        i + 1
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.prefill_with_grids(prompt, items, &grids, cache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::Span;

    #[test]
    fn rope_index_follows_get_rope_index() {
        // 2 text tokens, an image of grid 1x4x6 (2x3 merged), 1 text token.
        let spans = [Span {
            item: 0,
            start: 2,
            len: 6,
        }];
        let grids = [ItemGrid {
            grid_thw: [1, 4, 6],
            time_interval: 1.0,
        }];
        let (pos, delta) = rope_index(9, &spans, &grids, 2).unwrap();
        assert_eq!(pos[0], [0, 0, 0]);
        assert_eq!(pos[2], [2, 2, 2]);
        assert_eq!(pos[4], [2, 2, 4]);
        assert_eq!(pos[5], [2, 3, 2]);
        assert_eq!(pos[7], [2, 3, 4]);
        // Text resumes at start + max(h, w) / merge = 2 + 3.
        assert_eq!(pos[8], [5, 5, 5]);
        assert_eq!(delta, 6 - 9);
    }

    #[test]
    fn rope_index_spaces_video_time() {
        let spans = [Span {
            item: 0,
            start: 0,
            len: 2,
        }];
        let grids = [ItemGrid {
            grid_thw: [2, 2, 2],
            time_interval: 2.5,
        }];
        let (pos, _) = rope_index(2, &spans, &grids, 2).unwrap();
        assert_eq!(pos, vec![[0, 0, 0], [2, 0, 0]]);
    }
}
