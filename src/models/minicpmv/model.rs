//! The loaded MiniCPM-V 2.6 model: each slice of an image through the navit SigLIP tower
//! (`vpm`: patches at their bucketed positions, `post_layernorm`), then the perceiver
//! resampler (64 learned queries attending to the slice's patches plus 2-D sin-cos positions
//! at the slice's own grid), into Qwen2 (`llm`, the shared Llama decoder with q/k/v biases).
//! Mirrors the authors' `MiniCPMV.get_vllm_embedding`, `SiglipVisionEmbeddings` and
//! `Resampler`.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{layer_norm, linear_b, LayerNorm, LayerNormConfig, Linear, VarBuilder};

use super::config::{Config, Processor, Tokens};
use super::preprocessor::{normalize, placeholder_ids, slice_image, sliced_grid};
use crate::error::{Error, Result};
use crate::media::{Embeds, MediaItem, Modality, RgbImage};
use crate::models::common::clip_vision::ClipVisionTower;
use crate::models::common::files::{mmap_weights, weight_files};
use crate::models::common::llama::Llama;
use crate::models::{EncodedItem, Expansion, LoadContext, Model, ModelInfo, ProcessorKwargs};

/// Largest image side `image_sizes` may give (pixels): beyond any real photograph, and keeps
/// the slice arithmetic far from overflow.
const MAX_SIDE: f64 = 1_000_000.0;

/// `torch.arange(start, end, step)` in float32 as PyTorch computes it on the CPU: the length
/// `ceil((end - start) / step)` and each value `start + i * step` in double, then rounded.
fn torch_arange(start: f64, end: f64, step: f64) -> Vec<f32> {
    let n = ((end - start) / step).ceil().max(0.0) as usize;
    (0..n).map(|i| (start + i as f64 * step) as f32).collect()
}

/// Navit SigLIP's position ids for a slice of `rows x cols` patches: each patch's fractional
/// coordinates bucketed (`torch.bucketize(right=True)`) into the `per_side x per_side` table.
pub fn navit_position_ids(rows: usize, cols: usize, per_side: usize) -> Vec<u32> {
    let side = 1.0 / per_side as f64;
    let boundaries = torch_arange(side, 1.0, side);
    let bucket = |x: f32| boundaries.iter().filter(|b| **b <= x).count();
    let h: Vec<usize> = torch_arange(0.0, 1.0 - 1e-6, 1.0 / rows as f64)
        .into_iter()
        .map(bucket)
        .collect();
    let w: Vec<usize> = torch_arange(0.0, 1.0 - 1e-6, 1.0 / cols as f64)
        .into_iter()
        .map(bucket)
        .collect();
    h.iter()
        .flat_map(|bh| w.iter().map(move |bw| (bh * per_side + bw) as u32))
        .collect()
}

/// The resampler's 2-D sin-cos position embeddings for a `rows x cols` grid `(rows * cols,
/// dim)`, computed in float32 as the authors' numpy code: the first half encodes the column
/// (their `grid[0]` holds `w`), the second the row, each as `[sin, cos]` of the position
/// times `1 / 10000^(i / (dim / 4))`.
pub fn sincos_2d(dim: usize, rows: usize, cols: usize) -> Vec<f32> {
    let quarter = dim / 4;
    let omega: Vec<f32> = (0..quarter)
        .map(|i| 1.0f32 / 10000f32.powf(i as f32 / quarter as f32))
        .collect();
    let mut out = Vec::with_capacity(rows * cols * dim);
    for r in 0..rows {
        for c in 0..cols {
            for pos in [c as f32, r as f32] {
                out.extend(omega.iter().map(|o| (pos * o).sin()));
                out.extend(omega.iter().map(|o| (pos * o).cos()));
            }
        }
    }
    out
}

/// The perceiver resampler: `query_num` learned queries, one multi-head cross-attention.
struct Resampler {
    query: Tensor,
    kv_proj: Option<Linear>,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: Linear,
    ln_q: LayerNorm,
    ln_kv: LayerNorm,
    ln_post: LayerNorm,
    proj: Tensor,
    heads: usize,
    dim: usize,
}

impl Resampler {
    fn load(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (d, kv) = (cfg.text.hidden_size, cfg.vision.hidden_size);
        let ln = LayerNormConfig::from(1e-6);
        let attn = vb.pp("attn");
        Ok(Self {
            query: vb.get((cfg.query_num, d), "query")?,
            kv_proj: if kv == d {
                None
            } else {
                Some(linear_b(kv, d, false, vb.pp("kv_proj"))?)
            },
            in_proj_weight: attn.get((3 * d, d), "in_proj_weight")?,
            in_proj_bias: attn.get(3 * d, "in_proj_bias")?,
            out_proj: linear_b(d, d, true, attn.pp("out_proj"))?,
            ln_q: layer_norm(d, ln, vb.pp("ln_q"))?,
            ln_kv: layer_norm(d, ln, vb.pp("ln_kv"))?,
            ln_post: layer_norm(d, ln, vb.pp("ln_post"))?,
            proj: vb.get((d, d), "proj")?,
            heads: d / 128,
            dim: d,
        })
    }

    /// One slice's patches `(patches, kv_dim)` on a `rows x cols` grid to `(query_num, dim)`.
    fn forward(&self, x: &Tensor, rows: usize, cols: usize) -> Result<Tensor> {
        let d = self.dim;
        let x = match &self.kv_proj {
            Some(p) => p.forward(x)?,
            None => x.clone(),
        };
        let x = self.ln_kv.forward(&x)?;
        let pos = Tensor::from_vec(sincos_2d(d, rows, cols), (rows * cols, d), x.device())?
            .to_dtype(x.dtype())?;
        let q = self.ln_q.forward(&self.query)?;
        let project = |input: &Tensor, i: usize| -> Result<Tensor> {
            let w = self.in_proj_weight.narrow(0, i * d, d)?;
            let b = self.in_proj_bias.narrow(0, i * d, d)?;
            Ok(input.matmul(&w.t()?)?.broadcast_add(&b)?)
        };
        let hd = d / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            let n = t.dim(0)?;
            Ok(t.reshape((n, self.heads, hd))?
                .transpose(0, 1)?
                .contiguous()?)
        };
        let q = split((project(&q, 0)? * (hd as f64).powf(-0.5))?)?;
        let k = split(project(&(&x + pos)?, 1)?)?;
        let v = split(project(&x, 2)?)?;
        let scores = q.matmul(&k.t()?)?;
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?;
        let out = probs
            .matmul(&v)?
            .transpose(0, 1)?
            .reshape((self.query.dim(0)?, d))?;
        let out = self.ln_post.forward(&self.out_proj.forward(&out)?)?;
        Ok(out.matmul(&self.proj)?)
    }
}

/// At most `max` frames, picked as the model card's `uniform_sample`: frame
/// `int(i * gap + gap / 2)` for `gap = len / max`.
fn uniform_frames(frames: &[RgbImage], max: usize) -> Vec<RgbImage> {
    if frames.len() <= max {
        return frames.to_vec();
    }
    let gap = frames.len() as f64 / max as f64;
    (0..max)
        .map(|i| frames[((i as f64 * gap + gap / 2.0) as usize).min(frames.len() - 1)].clone())
        .collect()
}

/// The vision path of one slice: the navit tower (`vpm`), its final norm, the resampler.
struct Vision {
    tower: ClipVisionTower,
    post_layernorm: LayerNorm,
    resampler: Resampler,
}

/// A loaded MiniCPM-V 2.6 checkpoint.
pub struct MiniCpmVModel {
    cfg: Config,
    /// `MiniCPMVImageProcessor`'s settings.
    processor: Processor,
    /// The ids placeholders are written with.
    tokens: Tokens,
    info: ModelInfo,
    vision: Vision,
    /// Qwen2.
    lm: Llama,
    device: Device,
    dtype: DType,
}

/// Loads a MiniCPM-V 2.6 directory (`config.json` parsed in `ctx`, weights, its
/// `preprocessor_config.json` and `tokenizer.json`), memory-mapping the weights.
pub fn load(ctx: &LoadContext) -> Result<MiniCpmVModel> {
    let (dir, device) = (ctx.dir.as_path(), &ctx.device);
    let cfg = Config::from_value(&ctx.config)?;
    let (processor, tokens) = (Processor::load(dir, &cfg)?, Tokens::load(dir)?);
    let vb = mmap_weights(&weight_files(dir)?, ctx.dtype, device)?;
    let ln = LayerNormConfig::from(cfg.vision.layer_norm_eps);
    let vision = Vision {
        tower: ClipVisionTower::load_siglip(&cfg.vision, cfg.vision_layers, vb.pp("vpm"))?,
        post_layernorm: layer_norm(cfg.vision.hidden_size, ln, vb.pp("vpm.post_layernorm"))?,
        resampler: Resampler::load(&cfg, vb.pp("resampler"))?,
    };
    let lm = Llama::load(
        &cfg.text,
        vb.pp("llm.model"),
        vb.pp("llm.lm_head"),
        cfg.text.tie_word_embeddings,
    )?;
    Ok(MiniCpmVModel {
        info: ModelInfo {
            hidden_size: cfg.text.hidden_size,
            vocab_size: cfg.text.vocab_size,
            max_positions: cfg.text.max_position_embeddings,
        },
        cfg,
        processor,
        tokens,
        vision,
        lm,
        device: device.clone(),
        dtype: ctx.dtype,
    })
}

/// How one item is cut and written: slice budget and whether images are numbered.
#[derive(Debug, Clone, Copy)]
struct Layout {
    max_slices: usize,
    image_id: Option<usize>,
}

impl MiniCpmVModel {
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    /// The slices of an image as the processor cuts them (`max_slices` none: the
    /// processor config's).
    pub fn slices(
        &self,
        img: &RgbImage,
        max_slices: Option<usize>,
    ) -> (Vec<RgbImage>, Option<(usize, usize)>) {
        let p = &self.processor;
        let s = slice_image(
            img,
            max_slices.unwrap_or(p.max_slice_nums),
            p.scale_resolution,
            p.patch_size,
        );
        (s.images, s.grid)
    }

    /// The placeholder ids of an image of `width x height` (`image_id`: its number when
    /// images are numbered).
    pub fn placeholder(
        &self,
        width: u32,
        height: u32,
        max_slices: Option<usize>,
        image_id: Option<usize>,
    ) -> Vec<u32> {
        let p = &self.processor;
        let grid = sliced_grid(
            width,
            height,
            max_slices.unwrap_or(p.max_slice_nums),
            p.scale_resolution,
        );
        placeholder_ids(&self.tokens, self.cfg.query_num, grid, image_id)
    }

    /// One slice's normalised pixels `(1, 3, h, w)`.
    pub fn slice_pixels(&self, slice: &RgbImage) -> Result<Tensor> {
        let (w, h) = slice.dimensions();
        let p = &self.processor;
        let data = normalize(slice, p.norm_mean, p.norm_std);
        Ok(Tensor::from_vec(
            data,
            (1, 3, h as usize, w as usize),
            &self.device,
        )?)
    }

    /// One slice's resampled features `(query_num, hidden)`.
    pub fn slice_features(&self, slice: &RgbImage) -> Result<Tensor> {
        let (w, h) = slice.dimensions();
        let patch = self.cfg.vision.patch_size;
        let (rows, cols) = (h as usize / patch, w as usize / patch);
        let per_side = self.cfg.vision.image_size / patch;
        let ids = navit_position_ids(rows, cols, per_side);
        let ids = Tensor::from_vec(ids, rows * cols, &self.device)?;
        let pixels = self.slice_pixels(slice)?.to_dtype(self.dtype)?;
        let v = &self.vision;
        let hidden = v.tower.navit_hidden_state(&pixels, &ids)?;
        let hidden = v.post_layernorm.forward(&hidden)?.squeeze(0)?;
        v.resampler.forward(&hidden, rows, cols)
    }

    /// An image's features, every slice's in order `(slices * query_num, hidden)`, with the
    /// slice grid.
    pub fn image_features(
        &self,
        img: &RgbImage,
        max_slices: Option<usize>,
    ) -> Result<(Tensor, Option<(usize, usize)>)> {
        let (slices, grid) = self.slices(img, max_slices);
        let feats = slices
            .iter()
            .map(|s| self.slice_features(s))
            .collect::<Result<Vec<_>>>()?;
        Ok((Tensor::cat(&feats, 0)?, grid))
    }

    /// The expansion of placeholder `ids` and the features of its slots: the `<unk>` runs take
    /// `feats` rows in order, the tokens between them (`</image><slice>`, newlines) their own
    /// embeddings, as `get_vllm_embedding` scatters the features into the embedded prompt.
    fn expand(&self, ids: Vec<u32>, feats: &Tensor) -> Result<EncodedItem> {
        let unk = self.tokens.unk;
        let (Some(first), Some(last)) = (
            ids.iter().position(|&t| t == unk),
            ids.iter().rposition(|&t| t == unk),
        ) else {
            return Err(Error::Runtime(anyhow::anyhow!(
                "a placeholder without slots"
            )));
        };
        let slot_ids = ids[first..=last].to_vec();
        let mut pieces = Vec::new();
        let (mut row, mut at) = (0, 0);
        while at < slot_ids.len() {
            let is_unk = slot_ids[at] == unk;
            let run = slot_ids[at..]
                .iter()
                .take_while(|&&t| (t == unk) == is_unk)
                .count();
            if is_unk {
                pieces.push(feats.narrow(0, row, run)?);
                row += run;
            } else {
                pieces.push(self.lm.embed_tokens(&slot_ids[at..at + run])?);
            }
            at += run;
        }
        if row != feats.dim(0)? {
            return Err(Error::Runtime(anyhow::anyhow!(
                "{} feature rows for {row} placeholder slots",
                feats.dim(0)?
            )));
        }
        let features = Tensor::cat(&pieces, 0)?;
        let expansion = Expansion {
            before: ids[..first].to_vec(),
            slot_token: unk,
            slots: slot_ids.len(),
            after: ids[last + 1..].to_vec(),
            slot_ids,
        };
        Ok(EncodedItem::new(expansion, features))
    }

    /// Images, or video frames sent as images, joined by newlines as the authors' `chat`
    /// writes one `(<image>./</image>)` per line.
    fn encode_images(&self, images: &[RgbImage], layout: Layout) -> Result<EncodedItem> {
        let mut ids = Vec::new();
        let mut feats = Vec::new();
        for (i, img) in images.iter().enumerate() {
            if i > 0 {
                ids.push(self.tokens.newline);
            }
            let (f, grid) = self.image_features(img, Some(layout.max_slices))?;
            let id = layout.image_id.map(|n| n + i);
            ids.extend(placeholder_ids(&self.tokens, self.cfg.query_num, grid, id));
            feats.push(f);
        }
        self.expand(ids, &Tensor::cat(&feats, 0)?)
    }

    /// Checks precomputed embeddings of one image against its `image_sizes` and lays them out.
    fn encode_embeds(&self, e: &Embeds, layout: Layout) -> Result<EncodedItem> {
        let (w, h) = self.embeds_size(e)?;
        let grid = sliced_grid(w, h, layout.max_slices, self.processor.scale_resolution);
        let slices = 1 + grid.map_or(0, |(c, r)| c * r);
        let (q, d) = (self.cfg.query_num, self.info.hidden_size);
        let emb = e
            .tensors
            .get("image_embeds")
            .ok_or_else(|| Error::input("embeds", "no image_embeds tensor", "image embeddings"))?;
        let expected = format!(
            "(1, {}, {d}) or the per-slice form ({slices}, {q}, {d}) for an image of {w}x{h} \
             ({slices} slice(s) of {q} tokens)",
            slices * q
        );
        let dims = emb.dims().to_vec();
        let ok = match dims.as_slice() {
            [n, t] => *n == slices * q && *t == d,
            [1, n, t] => *n == slices * q && *t == d,
            [s, n, t] => *s == slices && *n == q && *t == d,
            _ => false,
        };
        if !ok {
            let problem = match dims.as_slice() {
                [k, _, _] if *k > 1 && *k != slices => format!(
                    "image_embeds of shape {dims:?} (one embeddings file holds one image: pass one \
                     file per image)"
                ),
                _ => format!("image_embeds of shape {dims:?}"),
            };
            return Err(Error::input("embeds", problem, expected));
        }
        let feats = emb
            .reshape((slices * q, d))?
            .to_device(&self.device)?
            .to_dtype(self.dtype)?;
        let ids = placeholder_ids(&self.tokens, q, grid, layout.image_id);
        self.expand(ids, &feats)
    }

    /// `image_sizes` of one image: `(width, height)` as a `(2,)` or `(1, 2)` tensor.
    fn embeds_size(&self, e: &Embeds) -> Result<(u32, u32)> {
        let expected = "image_sizes of shape (1, 2) or (2,): the image's (width, height) in pixels";
        let t = e.tensors.get("image_sizes").ok_or_else(|| {
            Error::input(
                "embeds",
                "no image_sizes tensor (MiniCPM-V lays out an image's slices from its size)",
                format!("{expected}, in the embeddings file or given with --image-sizes FILE"),
            )
        })?;
        if !matches!(t.dims(), [2] | [1, 2]) {
            return Err(Error::input(
                "image_sizes",
                format!("shape {:?}", t.dims()),
                expected,
            ));
        }
        let v: Vec<f64> = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let side = |x: f64| ((1.0..=MAX_SIDE).contains(&x) && x.fract() == 0.0).then_some(x as u32);
        match (side(v[0]), side(v[1])) {
            (Some(w), Some(h)) => Ok((w, h)),
            _ => Err(Error::input(
                "image_sizes",
                format!("values {v:?}"),
                format!("whole pixel counts from 1 to {MAX_SIDE}"),
            )),
        }
    }
}

impl Model for MiniCpmVModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn encode_with(&self, item: &MediaItem, kwargs: &ProcessorKwargs) -> Result<EncodedItem> {
        let max_slices = kwargs
            .max_slice_nums
            .map(|n| n.min(u64::from(u16::MAX)) as usize)
            .unwrap_or(self.processor.max_slice_nums);
        let image = Layout {
            max_slices,
            image_id: self.processor.use_image_id.then_some(kwargs.image_index),
        };
        match item {
            MediaItem::Image(img) => self.encode_images(std::slice::from_ref(img), image),
            MediaItem::Embeds(e) if e.modality == Modality::Image => self.encode_embeds(e, image),
            MediaItem::Video(video) => self.encode_images(
                &uniform_frames(&video.frames, super::MAX_NUM_FRAMES),
                Layout {
                    max_slices: kwargs
                        .max_slice_nums
                        .map_or(super::VIDEO_MAX_SLICE_NUMS, |n| {
                            n.min(u64::from(u16::MAX)) as usize
                        }),
                    image_id: None,
                },
            ),
            other => Err(Error::input(
                other.modality().name(),
                format!("MiniCPM-V does not take {} input", other.modality()),
                "images, video frames or image embeddings",
            )),
        }
    }

    crate::models::common::llama::delegate_to_llama!(lm);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_ids_bucket_fractional_coordinates() {
        // A full 70x70 grid maps one to one.
        let ids = navit_position_ids(70, 70, 70);
        assert_eq!(ids.len(), 4900);
        assert!(ids.iter().enumerate().all(|(i, &id)| id as usize == i));
        // Two rows of three columns on a 4x4 table: rows 0 and 2, columns 0, 1 and 2.
        assert_eq!(navit_position_ids(2, 3, 4), [0, 1, 2, 8, 9, 10]);
    }

    #[test]
    fn long_videos_keep_64_frames_picked_as_the_model_card() {
        let frames: Vec<RgbImage> = (0..100u32).map(|i| RgbImage::new(i + 1, 1)).collect();
        let picked = uniform_frames(&frames, 64);
        assert_eq!(picked.len(), 64);
        // gap = 100 / 64: frames int(i * gap + gap / 2) = 0, 2, 3, 5, ...
        let widths: Vec<u32> = picked.iter().take(4).map(|f| f.width() - 1).collect();
        assert_eq!(widths, [0, 2, 3, 5]);
        assert_eq!(uniform_frames(&frames[..8], 64).len(), 8);
    }

    #[test]
    fn sincos_encodes_column_then_row() {
        let e = sincos_2d(8, 2, 3);
        // Row 1, column 2: [sin 2w, cos 2w] for two frequencies, then the same for 1.
        let at = &e[(3 + 2) * 8..(3 + 2) * 8 + 8];
        let om = [1.0f32, 1.0 / 10000f32.powf(0.5)];
        let want = [
            (2.0 * om[0]).sin(),
            (2.0 * om[1]).sin(),
            (2.0 * om[0]).cos(),
            (2.0 * om[1]).cos(),
            om[0].sin(),
            om[1].sin(),
            om[0].cos(),
            om[1].cos(),
        ];
        assert_eq!(at, want);
    }
}
