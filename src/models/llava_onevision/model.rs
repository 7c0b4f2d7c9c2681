//! The loaded LLaVA-OneVision model: SigLIP tower -> 2-layer projector -> image packing (anyres
//! crops, unpadding, `anyres_max_N` downsampling, newline tokens) or video pooling -> Qwen2 (the
//! shared Llama decoder with q/k/v biases). Mirrors transformers' `LlavaOnevisionModel`
//! (`get_image_features`, `pack_image_features`, `get_video_features`, `apply_pooling`).

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{linear_b, Linear, VarBuilder};

use super::config::{Config, Processors};
use super::preprocessor::{image_tokens, ImagePixels, Packing};
use crate::error::{Error, Result};
use crate::media::{MediaItem, RgbImage};
use crate::models::common::clip_vision::ClipVisionTower;
use crate::models::common::files::{mmap_weights, weight_files, weight_prefix};
use crate::models::common::llama::Llama;
use crate::models::{EncodedItem, Expansion, LoadContext, Model, ModelInfo, ProcessorKwargs};

/// Where the vision tower, projector and language model live, in the layouts transformers 4
/// and 5 write, and a tensor each must hold.
const LAYOUTS: [(&str, &[&str], &str); 3] = [
    (
        "vision tower",
        &[
            "vision_tower.vision_model",
            "model.vision_tower.vision_model",
            "vision_tower",
            "model.vision_tower",
        ],
        "embeddings.patch_embedding.weight",
    ),
    (
        "projector",
        &["multi_modal_projector", "model.multi_modal_projector"],
        "linear_1.weight",
    ),
    (
        "language model",
        &[
            "language_model.model",
            "model.language_model",
            "language_model",
        ],
        "embed_tokens.weight",
    ),
];

/// PyTorch's `upsample_bilinear2d` (`align_corners=False`, no antialias) along one axis as an
/// `(output, input)` matrix, its indices and weights computed in float32 as PyTorch does.
fn bilinear_matrix(input: usize, output: usize) -> Vec<f32> {
    let scale = input as f32 / output as f32;
    let mut m = vec![0f32; output * input];
    for o in 0..output {
        let src = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(input - 1);
        let l1 = (src - i0 as f32).clamp(0.0, 1.0);
        let i1 = if i0 + 1 < input { i0 + 1 } else { i0 };
        m[o * input + i0] += 1.0 - l1;
        m[o * input + i1] += l1;
    }
    m
}

/// Bilinear resampling of `(n, rows, cols, hidden)` features to `(n, out.0, out.1, hidden)`, as
/// `F.interpolate(mode="bilinear")` on the `(hidden, rows, cols)` layout: columns first, then
/// rows, each a matrix product with the axis's interpolation weights.
fn resample(x: &Tensor, out: (usize, usize)) -> Result<Tensor> {
    let (n, rows, cols, hidden) = x.dims4()?;
    let (dev, dtype) = (x.device(), x.dtype());
    let wc = Tensor::from_vec(bilinear_matrix(cols, out.1), (out.1, cols), dev)?.to_dtype(dtype)?;
    let wr = Tensor::from_vec(bilinear_matrix(rows, out.0), (out.0, rows), dev)?.to_dtype(dtype)?;
    let x = wc.broadcast_matmul(&x.reshape((n * rows, cols, hidden))?.contiguous()?)?;
    let x = wr.broadcast_matmul(&x.reshape((n, rows, out.1 * hidden))?.contiguous()?)?;
    Ok(x.reshape((n, out.0, out.1, hidden))?)
}

struct Projector {
    linear_1: Linear,
    act: candle_nn::Activation,
    linear_2: Linear,
}

impl Projector {
    fn load(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (input, hidden) = (
            cfg.vision.hidden_size * cfg.feature_layers.len(),
            cfg.text.hidden_size,
        );
        let bias = cfg.projector_bias;
        Ok(Self {
            linear_1: linear_b(input, hidden, bias, vb.pp("linear_1"))?,
            act: cfg.projector_act,
            linear_2: linear_b(hidden, hidden, bias, vb.pp("linear_2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.act.forward(&self.linear_1.forward(xs)?)?;
        Ok(self.linear_2.forward(&xs)?)
    }
}

/// A loaded LLaVA-OneVision checkpoint.
pub struct LlavaOnevisionModel {
    cfg: Config,
    processors: Processors,
    info: ModelInfo,
    vision: ClipVisionTower,
    projector: Projector,
    /// `image_newline` `(1, 1, hidden)`.
    newline: Tensor,
    lm: Llama,
    device: Device,
    dtype: DType,
}

/// Loads a LLaVA-OneVision model directory (`config.json` already parsed in `ctx`,
/// `model.safetensors` or a sharded index, processor configs), memory-mapping the weights.
/// Outside the CLI: `load(&LoadContext::from_dir(dir, device, dtype)?)`.
pub fn load(ctx: &LoadContext) -> Result<LlavaOnevisionModel> {
    let (dir, device, dtype) = (ctx.dir.as_path(), &ctx.device, ctx.dtype);
    let cfg = Config::from_value(&ctx.config)?;
    let processors = Processors::load(dir)?;
    let size = cfg.vision.image_size as u32;
    let image = &processors.image;
    if image.size != (size, size) || image.crop != size || processors.video.size != (size, size) {
        return Err(Error::input(
            dir.display().to_string(),
            format!(
                "the processors resize to {:?} (crops of {}, video {:?}) but the vision tower \
                 takes {size}x{size}",
                image.size, image.crop, processors.video.size
            ),
            "processor sizes equal to vision_config.image_size",
        ));
    }
    if image.grid_pinpoints != cfg.grid_pinpoints {
        return Err(Error::input(
            dir.display().to_string(),
            "the image processor's image_grid_pinpoints differ from config.json's",
            "the same pinpoints in both (transformers' processor and model must agree)",
        ));
    }
    let vb = mmap_weights(&weight_files(dir)?, dtype, device)?;
    let p = LAYOUTS
        .iter()
        .map(|(part, candidates, probe)| weight_prefix(&vb, candidates, probe, part))
        .collect::<Result<Vec<_>>>()?;
    let vision =
        ClipVisionTower::load_siglip(&cfg.vision, cfg.vision_layers_needed(), vb.pp(p[0]))?;
    let projector = Projector::load(&cfg, vb.pp(p[1]))?;
    let hidden = cfg.text.hidden_size;
    let newline = ["image_newline", "model.image_newline"]
        .into_iter()
        .find(|n| vb.contains_tensor(n))
        .unwrap_or("image_newline");
    let newline = vb.get(hidden, newline)?.reshape((1, 1, hidden))?;
    let lm_head = ["language_model.lm_head", "lm_head"]
        .into_iter()
        .find(|n| vb.contains_tensor(&format!("{n}.weight")))
        .unwrap_or("lm_head");
    let tied = cfg.tie_word_embeddings || cfg.text.tie_word_embeddings;
    let lm = Llama::load(&cfg.text, vb.pp(p[2]), vb.pp(lm_head), tied)?;
    Ok(LlavaOnevisionModel {
        info: ModelInfo {
            hidden_size: hidden,
            vocab_size: cfg.text.vocab_size,
            max_positions: cfg.text.max_position_embeddings,
        },
        cfg,
        processors,
        vision,
        projector,
        newline,
        lm,
        device: device.clone(),
        dtype,
    })
}

impl LlavaOnevisionModel {
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn processors(&self) -> &Processors {
        &self.processors
    }

    /// Preprocesses one image as transformers does for a prompt holding `prompt_images`
    /// images: tiled when it is alone, padded to a square otherwise.
    pub fn image_pixels(&self, img: &RgbImage, prompt_images: usize) -> Result<ImagePixels> {
        if prompt_images > 1 {
            self.processors.image.padded_square(img)
        } else {
            self.processors.image.anyres(img)
        }
    }

    /// The tokens an image of `height x width` becomes in a prompt holding `prompt_images`.
    pub fn image_tokens(&self, height: u32, width: u32, prompt_images: usize) -> usize {
        image_tokens(
            &self.cfg,
            &self.processors.image,
            height,
            width,
            prompt_images,
        )
    }

    /// The projected vision features of preprocessed images `(n, 3, S, S)`: `(n, S/P * S/P,
    /// hidden)`.
    pub fn project(&self, pixels: &Tensor) -> Result<Tensor> {
        let pixels = pixels.to_device(&self.device)?.to_dtype(self.dtype)?;
        let states = self
            .vision
            .hidden_states(&pixels, &self.cfg.feature_layers)?;
        self.projector.forward(&Tensor::cat(&states, 2)?)
    }

    /// An image's features `(tokens, hidden)` from its preprocessed crops, packed as
    /// transformers' `pack_image_features`. `height x width` is the original image.
    pub fn image_features(&self, px: &ImagePixels, height: u32, width: u32) -> Result<Tensor> {
        let pixels =
            Tensor::from_slice(&px.data, (px.count, 3, px.height, px.width), &self.device)?;
        let feats = self.project(&pixels)?;
        let (_, n, hidden) = feats.dims3()?;
        let base = feats.get(0)?;
        let Some((rows, cols)) = px.grid else {
            // A padded square: its features and one newline.
            return Ok(Tensor::cat(&[base, self.newline.reshape((1, hidden))?], 0)?);
        };
        let side = self.cfg.patches_per_side();
        let pack = Packing::new(height, width, (rows, cols), side, self.cfg.max_crops);
        if n != side * side || px.count != 1 + rows * cols {
            return Err(Error::Runtime(anyhow::anyhow!(
                "{} crops of {n} patches for a {rows}x{cols} grid of {side}x{side}",
                px.count
            )));
        }
        let grid = feats
            .narrow(0, 1, rows * cols)?
            .reshape((rows, cols, side, side, hidden))?
            .permute((0, 2, 1, 3, 4))?
            .reshape((1, pack.full.0, pack.full.1, hidden))?
            .narrow(1, pack.offset.0, pack.unpadded.0)?
            .narrow(2, pack.offset.1, pack.unpadded.1)?;
        let grid = if pack.out == pack.unpadded {
            grid
        } else {
            resample(&grid, pack.out)?
        };
        let (r, c) = pack.out;
        let newline = self.newline.broadcast_as((r, 1, hidden))?;
        let rows_with_newline = Tensor::cat(&[grid.squeeze(0)?, newline], 1)?;
        let packed = Tensor::cat(
            &[base, rows_with_newline.reshape((r * (c + 1), hidden))?],
            0,
        )?;
        debug_assert_eq!(packed.dim(0)?, pack.tokens());
        Ok(packed)
    }

    /// A clip's features `(frames * pooled^2 + 1, hidden)` from its preprocessed frames `(frames,
    /// 3, S, S)`: every frame's patch grid pooled bilinearly to half its side (rounded up), all
    /// frames in order, then one newline.
    pub fn video_features(&self, pixels: &Tensor) -> Result<Tensor> {
        let feats = self.project(pixels)?;
        let (frames, _, hidden) = feats.dims3()?;
        let side = self.cfg.patches_per_side();
        let pooled = side.div_ceil(2);
        let grid = feats.reshape((frames, side, side, hidden))?;
        let grid = resample(&grid, (pooled, pooled))?;
        Ok(Tensor::cat(
            &[
                grid.reshape((frames * pooled * pooled, hidden))?,
                self.newline.reshape((1, hidden))?,
            ],
            0,
        )?)
    }

    /// Preprocessed frames of a clip `(frames, 3, S, S)`.
    pub fn video_pixels(&self, frames: &[RgbImage]) -> Result<Tensor> {
        let (h, w) = self.processors.video.size;
        let data = self.processors.video.frames(frames)?;
        Ok(Tensor::from_vec(
            data,
            (frames.len(), 3, h as usize, w as usize),
            &self.device,
        )?)
    }

    fn expansion(&self, slot_token: u32, slots: usize) -> Expansion {
        Expansion {
            before: Vec::new(),
            slot_token,
            slots,
            after: Vec::new(),
            slot_ids: Vec::new(),
        }
    }
}

impl Model for LlavaOnevisionModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn encode_with(&self, item: &MediaItem, kwargs: &ProcessorKwargs) -> Result<EncodedItem> {
        let (token, features) = match item {
            MediaItem::Image(img) => {
                let px = self.image_pixels(img, kwargs.prompt_images)?;
                let f = self.image_features(&px, img.height(), img.width())?;
                (self.cfg.image_token_id, f)
            }
            MediaItem::Video(video) => {
                let f = self.video_features(&self.video_pixels(&video.frames)?)?;
                (self.cfg.video_token_id, f)
            }
            other => {
                return Err(Error::input(
                    other.modality().name(),
                    format!("LLaVA-OneVision does not take {} input", other.modality()),
                    "images or videos",
                ))
            }
        };
        let slots = features.dim(0)?;
        Ok(EncodedItem::new(self.expansion(token, slots), features))
    }

    crate::models::common::llama::delegate_to_llama!(lm);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_matrix_matches_pytorch_weights() {
        // 3 -> 2 (video pooling of a 3x3 grid): src = 1.5 * (o + 0.5) - 0.5 = 0.25, 1.75.
        assert_eq!(bilinear_matrix(3, 2), [0.75, 0.25, 0.0, 0.0, 0.25, 0.75]);
        // 4 -> 2: src = 0.5, 2.5.
        assert_eq!(
            bilinear_matrix(4, 2),
            [0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5]
        );
        // Upsampling clamps at the edges.
        assert_eq!(bilinear_matrix(2, 4)[..2], [1.0, 0.0]);
        assert_eq!(bilinear_matrix(2, 4)[6..], [0.0, 1.0]);
    }
}
