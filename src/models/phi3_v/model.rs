//! The loaded Phi-3-vision model: the CLIP ViT-L/14-336 tower (its depth and MLP width read
//! from the checkpoint, as the authors fix its config in code) -> the hidden state
//! `layer_idx` from the end, CLS dropped -> 2x2 patch merge -> crops and global view with the
//! learnable `sub_GN` (end of every row) and `glb_GN` (between them) separators -> the MLP
//! projection -> Phi-3 (the shared decoder with its fused projections and LongRoPE). Mirrors
//! the authors' `Phi3ImageEmbedding` (`get_img_features`, `hd_feature_transform`).

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{linear_b, Linear, VarBuilder};

use super::config::{image_processor, Config, HdOrder};
use super::preprocessor::{tokens_for_hd, HdPixels, ImageProcessor, CROP};
use crate::error::{Error, Result};
use crate::media::{MediaItem, RgbImage};
use crate::models::common::clip_vision::{ClipVisionConfig, ClipVisionTower};
use crate::models::common::files::{mmap_weights, weight_files};
use crate::models::common::llama::Llama;
use crate::models::{EncodedItem, Expansion, LoadContext, Model, ModelInfo, ProcessorKwargs};

/// The image embedding's weights.
const EMBED: &str = "model.vision_embed_tokens";
/// The CLIP tower inside it.
const TOWER: &str = "model.vision_embed_tokens.img_processor.vision_model";
/// Fixed in the authors' code (`CLIP_VIT_LARGE_PATCH14_336_CONFIG`), not in `config.json`.
const HEADS: usize = 16;
const PATCH: usize = 14;
/// Patches per side of a crop, and merged (2x2) patches per side.
const SIDE: usize = CROP / PATCH;
const MERGED: usize = SIDE / 2;
/// Most CLIP layers read from a checkpoint (the real tower has 24).
const MAX_TOWER_LAYERS: usize = 256;

/// A loaded Phi-3-vision checkpoint.
pub struct Phi3VModel {
    cfg: Config,
    processor: ImageProcessor,
    info: ModelInfo,
    vision: ClipVisionTower,
    /// Which of the tower's hidden states is taken (HF numbering, 0 = embeddings).
    feature_layer: usize,
    /// `(1, 4 * width)` each.
    sub_gn: Tensor,
    glb_gn: Tensor,
    proj_in: Linear,
    proj_out: Linear,
    lm: Llama,
    device: Device,
    dtype: DType,
}

/// The tower's config from its tensors: width from the patch embedding, MLP width from the
/// first `fc1`, depth from the layers present.
fn tower_config(vb: &VarBuilder) -> Result<ClipVisionConfig> {
    let width = vb
        .get_unchecked("embeddings.patch_embedding.weight")?
        .dim(0)?;
    let mlp = vb
        .get_unchecked("encoder.layers.0.mlp.fc1.weight")?
        .dim(0)?;
    let layers = (0..MAX_TOWER_LAYERS)
        .take_while(|i| vb.contains_tensor(&format!("encoder.layers.{i}.mlp.fc1.weight")))
        .count();
    if width % HEADS != 0 {
        return Err(Error::input(
            "model.safetensors",
            format!("vision tower width {width} does not split into {HEADS} heads"),
            "a CLIP ViT-L/14-336 tower (width 1024)",
        ));
    }
    let cfg = serde_json::json!({
        "hidden_size": width, "intermediate_size": mlp, "num_hidden_layers": layers,
        "num_attention_heads": HEADS, "image_size": CROP, "patch_size": PATCH,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    });
    Ok(serde_json::from_value(cfg).map_err(|e| anyhow::anyhow!("tower config: {e}"))?)
}

/// Loads a Phi-3-vision model directory (`config.json` already parsed in `ctx`), memory-mapping
/// the weights. Outside the CLI: `load(&LoadContext::from_dir(dir, device, dtype)?)`.
pub fn load(ctx: &LoadContext) -> Result<Phi3VModel> {
    let (dir, device, dtype) = (ctx.dir.as_path(), &ctx.device, ctx.dtype);
    let cfg = Config::from_value(&ctx.config)?;
    let processor = image_processor(dir)?;
    let vb = mmap_weights(&weight_files(dir)?, dtype, device)?;
    let tower_vb = vb.pp(TOWER);
    let tower = tower_config(&tower_vb)?;
    let states = tower.num_hidden_layers as i64 + 1;
    let feature_layer = if cfg.layer_idx < 0 {
        states + cfg.layer_idx
    } else {
        cfg.layer_idx
    };
    if !(0..states).contains(&feature_layer) {
        return Err(Error::input(
            "config.json",
            format!(
                "img_processor.layer_idx {} for a tower of {} layers",
                cfg.layer_idx, tower.num_hidden_layers
            ),
            "a hidden state of the tower",
        ));
    }
    let feature_layer = feature_layer as usize;
    let vision = ClipVisionTower::load(&tower, feature_layer, tower_vb)?;
    let merged = 4 * tower.hidden_size;
    let hidden = cfg.text.hidden_size;
    let embed = vb.pp(EMBED);
    let sub_gn = embed
        .get((1, 1, 1, merged), "sub_GN")?
        .reshape((1, merged))?;
    let glb_gn = embed.get((1, 1, merged), "glb_GN")?.reshape((1, merged))?;
    let proj_in = linear_b(merged, hidden, true, embed.pp("img_projection.0"))?;
    let proj_out = linear_b(hidden, hidden, true, embed.pp("img_projection.2"))?;
    let tied = cfg.text.tie_word_embeddings;
    let lm = Llama::load(&cfg.text, vb.pp("model"), vb.pp("lm_head"), tied)?;
    Ok(Phi3VModel {
        info: ModelInfo {
            hidden_size: hidden,
            vocab_size: cfg.text.vocab_size,
            max_positions: cfg.text.max_position_embeddings,
        },
        cfg,
        processor,
        vision,
        feature_layer,
        sub_gn,
        glb_gn,
        proj_in,
        proj_out,
        lm,
        device: device.clone(),
        dtype,
    })
}

impl Phi3VModel {
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }

    /// The crops per image: the request's `num_crops`, else the checkpoint's.
    pub fn num_crops(&self, kwargs: &ProcessorKwargs) -> usize {
        kwargs
            .num_crops
            .map_or(self.processor.num_crops, |n| n as usize)
    }

    /// Preprocesses one image as the authors' processor does.
    pub fn pixels(&self, img: &RgbImage, num_crops: usize) -> Result<HdPixels> {
        self.processor.preprocess(img, num_crops, "image")
    }

    /// Merges each 2x2 block of a `(n, 24, 24, C)` patch grid into `(n, 12, 12, 4C)`, in the
    /// (row, column) order of the block.
    fn merge_2x2(x: &Tensor) -> Result<Tensor> {
        let (n, _, _, c) = x.dims4()?;
        Ok(x.reshape((n, MERGED, 2, MERGED, 2 * c))?
            .permute((0, 1, 3, 2, 4))?
            .reshape((n, MERGED, MERGED, 4 * c))?)
    }

    /// Rows of merged features `(rows, cols, 4C)` with `sub_GN` after every row, flattened.
    fn with_row_ends(&self, grid: &Tensor) -> Result<Tensor> {
        let (rows, cols, c) = grid.dims3()?;
        let ends = self.sub_gn.reshape((1, 1, c))?.broadcast_as((rows, 1, c))?;
        Ok(Tensor::cat(&[grid, &ends.contiguous()?], 1)?.reshape((rows * (cols + 1), c))?)
    }

    /// An image's projected features `(tokens, hidden)` from its pixel values.
    pub fn image_features(&self, px: &HdPixels) -> Result<Tensor> {
        let (rows, cols) = px.grid;
        let crops = 1 + rows * cols;
        let pixels = Tensor::from_slice(px.used(), (crops, 3, CROP, CROP), &self.device)?
            .to_dtype(self.dtype)?;
        let states = self.vision.hidden_states(&pixels, &[self.feature_layer])?;
        let state = &states[0];
        let c = state.dim(2)?;
        // Drop CLS: (crops, 576, C) as a 24x24 grid.
        let patches = state
            .narrow(1, 1, SIDE * SIDE)?
            .reshape((crops, SIDE, SIDE, c))?;
        let merged = Self::merge_2x2(&patches)?;
        let global = self.with_row_ends(&merged.get(0)?)?;
        let sub = merged
            .narrow(0, 1, rows * cols)?
            .reshape((rows, cols, MERGED, MERGED, 4 * c))?
            .permute((0, 2, 1, 3, 4))?
            .reshape((rows * MERGED, cols * MERGED, 4 * c))?;
        let sub = self.with_row_ends(&sub)?;
        let glb_gn = self.glb_gn.to_dtype(sub.dtype())?;
        let parts = match self.cfg.order {
            HdOrder::SubGlb => [sub, glb_gn, global],
            HdOrder::GlbSub => [global, glb_gn, sub],
        };
        let feats = Tensor::cat(&parts, 0)?;
        let want = tokens_for_hd(cols * CROP, rows * CROP);
        if feats.dim(0)? != want {
            return Err(Error::Runtime(anyhow::anyhow!(
                "{} image features for {want} tokens",
                feats.dim(0)?
            )));
        }
        let x = self.proj_in.forward(&feats)?.gelu_erf()?;
        Ok(self.proj_out.forward(&x)?)
    }
}

impl Model for Phi3VModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn encode_with(&self, item: &MediaItem, kwargs: &ProcessorKwargs) -> Result<EncodedItem> {
        let MediaItem::Image(img) = item else {
            return Err(Error::input(
                item.modality().name(),
                format!("Phi-3-vision does not take {} input", item.modality()),
                "images",
            ));
        };
        let px = self.pixels(img, self.num_crops(kwargs))?;
        let features = self.image_features(&px)?;
        let expansion = Expansion {
            before: Vec::new(),
            // The authors' processor writes negative ids, clamped to 0 before the embedding;
            // these slots are replaced by the features.
            slot_token: 0,
            slots: features.dim(0)?,
            slot_ids: Vec::new(),
            after: Vec::new(),
        };
        Ok(EncodedItem::new(expansion, features))
    }

    crate::models::common::llama::delegate_to_llama!(lm);
}
