//! The loaded LLaVA model: CLIP tower -> feature selection -> 2-layer projector -> Llama.
//! Reads weights in both the transformers 4.x layout (`language_model.model.*`,
//! `vision_tower.vision_model.*`) and the 5.x layouts (`model.language_model.*`, ...).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{linear_b, Linear, VarBuilder};

use super::config::{Config, GenerationConfig, SelectStrategy};
use crate::error::{Error, Result};
use crate::kernels;
use crate::kernels::cpu::linear;
use crate::media::{Embeds, MediaItem, Modality};
use crate::models::common::clip_processor::ClipProcessorConfig;
use crate::models::common::clip_vision::ClipVisionTower;
use crate::models::common::files::{mmap_weights, weight_files};
use crate::models::common::llama::Llama;
use crate::models::{EncodedItem, Expansion, LoadContext, Model, ModelInfo, ProcessorKwargs};

/// The projector's activation.
#[derive(Debug, Clone, Copy)]
enum Act {
    Gelu,
    GeluTanh,
    QuickGelu,
    Silu,
    Relu,
}

impl Act {
    fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Self::Gelu,
            "gelu_pytorch_tanh" | "gelu_new" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "silu" => Self::Silu,
            "relu" => Self::Relu,
            other => {
                return Err(Error::input(
                    "config.json",
                    format!("unsupported projector_hidden_act {other:?}"),
                    "gelu, gelu_pytorch_tanh, gelu_new, quick_gelu, silu or relu",
                ))
            }
        })
    }

    fn apply(self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Gelu => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
            Self::QuickGelu => kernels::quick_gelu(xs),
            Self::Silu => candle_nn::ops::silu(xs),
            Self::Relu => xs.relu(),
        }
    }
}

struct Projector {
    linear_1: Linear,
    act: Act,
    linear_2: Linear,
}

/// Where each part's weights live in a checkpoint.
struct Prefixes {
    vision: &'static str,
    projector: &'static str,
    text: &'static str,
    lm_head: &'static str,
}

/// Finds the layout of the checkpoint by probing one tensor per part.
fn prefixes(vb: &VarBuilder) -> Result<Prefixes> {
    let pick = |candidates: &[&'static str], probe: &str, part: &str| {
        candidates
            .iter()
            .copied()
            .find(|p| vb.contains_tensor(&format!("{p}{probe}")))
            .ok_or_else(|| {
                Error::input(
                    "model weights",
                    format!("no {part} tensor {probe:?} under any known prefix"),
                    format!("one of {candidates:?}"),
                )
            })
    };
    let vision = pick(
        &[
            "vision_tower.vision_model.",
            "model.vision_tower.vision_model.",
            "vision_tower.",
            "model.vision_tower.",
        ],
        "embeddings.class_embedding",
        "vision tower",
    )?;
    let projector = pick(
        &["multi_modal_projector.", "model.multi_modal_projector."],
        "linear_1.weight",
        "projector",
    )?;
    let text = pick(
        &[
            "language_model.model.",
            "model.language_model.",
            "language_model.",
        ],
        "embed_tokens.weight",
        "language model",
    )?;
    let lm_head = ["language_model.lm_head.", "lm_head."]
        .into_iter()
        .find(|p| vb.contains_tensor(&format!("{p}weight")))
        .unwrap_or("lm_head.");
    Ok(Prefixes {
        vision,
        projector,
        text,
        lm_head,
    })
}

/// A loaded LLaVA-1.5 model.
pub struct LlavaModel {
    config: Config,
    info: ModelInfo,
    vision: ClipVisionTower,
    projector: Projector,
    lm: Llama,
    processor: ClipProcessorConfig,
    eos_token_ids: Vec<u32>,
    device: Device,
    dtype: DType,
}

/// The image processor's settings: `preprocessor_config.json` (hub repos), else the
/// `image_processor` of `processor_config.json` (what transformers 5 saves), else CLIP's
/// defaults at the vision tower's size.
pub fn processor_config(dir: &Path, image_size: u32) -> Result<ClipProcessorConfig> {
    let read = |name: &str| -> Result<Option<String>> {
        match std::fs::read_to_string(dir.join(name)) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::input(
                name,
                format!("cannot read: {e}"),
                "a readable JSON file",
            )),
        }
    };
    let bad = |name: &str, e: serde_json::Error| {
        Error::input(
            name,
            format!("not a CLIP image processor config: {e}"),
            "Hugging Face CLIPImageProcessor settings",
        )
    };
    if let Some(text) = read("preprocessor_config.json")? {
        return ClipProcessorConfig::from_json(&text)
            .map_err(|e| bad("preprocessor_config.json", e));
    }
    if let Some(text) = read("processor_config.json")? {
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad("processor_config.json", e))?;
        if let Some(ip) = value.get("image_processor") {
            return ClipProcessorConfig::from_json(&ip.to_string())
                .map_err(|e| bad("processor_config.json", e));
        }
    }
    let default = serde_json::json!({
        "size": {"shortest_edge": image_size},
        "crop_size": {"height": image_size, "width": image_size},
    });
    ClipProcessorConfig::from_json(&default.to_string()).map_err(|e| bad("defaults", e))
}

/// Loads a LLaVA model directory (`config.json`, `model.safetensors` or a sharded index,
/// optional `generation_config.json`), memory-mapping the weights.
pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<LlavaModel> {
    load_from(&LoadContext::from_dir(dir, device, dtype)?)
}

/// [`load`] with the parsed `config.json` of `ctx`.
pub fn load_from(ctx: &LoadContext) -> Result<LlavaModel> {
    let (dir, device, dtype) = (ctx.dir.as_path(), &ctx.device, ctx.dtype);
    let config = Config::from_value(&ctx.config)?;
    let generation = GenerationConfig::from_dir(dir)?;
    let files = weight_files(dir)?;
    let vb = mmap_weights(&files, dtype, device)?;
    let p = prefixes(&vb)?;

    let vision = ClipVisionTower::load(
        &config.vision,
        config.vision_layers_needed(),
        vb.pp(p.vision.trim_end_matches('.')),
    )?;
    let text_hidden = config.text.hidden_size;
    let proj_in = config.vision.hidden_size * config.feature_layers.len();
    let pvb = vb.pp(p.projector.trim_end_matches('.'));
    let projector = Projector {
        linear_1: linear_b(
            proj_in,
            text_hidden,
            config.projector_bias,
            pvb.pp("linear_1"),
        )?,
        act: Act::parse(&config.projector_hidden_act)?,
        linear_2: linear_b(
            text_hidden,
            text_hidden,
            config.projector_bias,
            pvb.pp("linear_2"),
        )?,
    };
    let processor = processor_config(dir, config.vision.image_size as u32)?;
    let lm = Llama::load(
        &config.text,
        vb.pp(p.text.trim_end_matches('.')),
        vb.pp(p.lm_head.trim_end_matches('.')),
        config.tie_word_embeddings,
    )?;
    let eos_token_ids = generation
        .eos_token_id
        .or_else(|| config.text.eos_token_id.clone())
        .map(|ids| ids.to_vec())
        .unwrap_or_default();
    Ok(LlavaModel {
        info: ModelInfo {
            hidden_size: text_hidden,
            vocab_size: config.text.vocab_size,
            max_positions: config.text.max_position_embeddings,
        },
        config,
        vision,
        projector,
        lm,
        processor,
        eos_token_ids,
        device: device.clone(),
        dtype,
    })
}

impl LlavaModel {
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// End-of-sequence ids: `generation_config.json`, else `text_config.eos_token_id`.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// How one image appears in the prompt: `slots` copies of the image token.
    pub fn image_expansion(&self) -> Result<Expansion> {
        Ok(Expansion {
            before: vec![],
            slot_token: self.config.image_token_id,
            slots: self.config.image_slots()?,
            after: vec![],
            slot_ids: Vec::new(),
        })
    }

    /// Preprocessed `pixel_values` `(B, 3, S, S)` -> projected features `(B * slots, hidden)`.
    /// Images preprocessed and stacked into one vision-tower pass; one item each.
    fn encode_images(&self, images: &[&MediaItem]) -> Result<Vec<EncodedItem>> {
        let mut pixels = Vec::with_capacity(images.len());
        for item in images {
            let MediaItem::Image(img) = item else {
                return Err(Error::Runtime(anyhow::anyhow!("not an image")));
            };
            let px = self.processor.preprocess(img)?;
            let (h, w) = (px.height as usize, px.width as usize);
            pixels.push(Tensor::from_vec(px.data, (1, 3, h, w), &self.device)?);
        }
        let features = self.encode_pixels(&Tensor::cat(&pixels, 0)?)?;
        let expansion = self.image_expansion()?;
        let slots = expansion.slots;
        (0..images.len())
            .map(|i| {
                Ok(EncodedItem::new(
                    expansion.clone(),
                    features.narrow(0, i * slots, slots)?,
                ))
            })
            .collect()
    }

    pub fn encode_pixels(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let pixel_values = pixel_values.to_device(&self.device)?;
        let states = self
            .vision
            .hidden_states(&pixel_values, &self.config.feature_layers)?;
        let selected = states
            .into_iter()
            .map(|s| match self.config.strategy {
                SelectStrategy::Default => {
                    let n = s.dim(1)?;
                    s.narrow(1, 1, n - 1)
                }
                SelectStrategy::Full => Ok(s),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let features = Tensor::cat(&selected, 2)?;
        let p = &self.projector;
        let hidden = linear(&p.linear_2, &p.act.apply(&linear(&p.linear_1, &features)?)?)?;
        let (b, n, h) = hidden.dims3()?;
        Ok(hidden.reshape((b * n, h))?)
    }

    /// Checks precomputed `image_embeds` `(1, slots, hidden)` or `(slots, hidden)` and returns
    /// them as `(slots, hidden)` on the model's device and dtype.
    pub fn check_image_embeds(&self, embeds: &Embeds) -> Result<Tensor> {
        let slots = self.config.image_slots()?;
        let hidden = self.info.hidden_size;
        let expected = format!("(1, {slots}, {hidden})");
        if embeds.modality != Modality::Image {
            return Err(Error::input(
                "embeds",
                format!("modality {} is not accepted by LLaVA", embeds.modality),
                format!("image embeddings of shape {expected}"),
            ));
        }
        let Some(t) = embeds.tensors.get("image_embeds") else {
            let names: Vec<&String> = embeds.tensors.keys().collect();
            return Err(Error::input(
                "embeds",
                format!("no tensor named image_embeds (found {names:?})"),
                format!("a tensor image_embeds of shape {expected}"),
            ));
        };
        if !matches!(
            t.dtype(),
            DType::F32 | DType::F16 | DType::BF16 | DType::F64
        ) {
            return Err(Error::input(
                "image_embeds",
                format!("dtype {:?}", t.dtype()),
                format!("a floating-point tensor of shape {expected}"),
            ));
        }
        let ok = match t.dims() {
            [1, s, h] | [s, h] => *s == slots && *h == hidden,
            _ => false,
        };
        if !ok {
            return Err(Error::input(
                "image_embeds",
                format!("shape {:?}", t.dims()),
                expected,
            ));
        }
        Ok(t.reshape((slots, hidden))?
            .to_device(&self.device)?
            .to_dtype(self.dtype)?)
    }
}

/// Replaces the embeddings of the `slot_token` positions of `ids` by the rows of `features`
/// `(n_slots, hidden)`, in order. The counts must agree.
pub fn splice_features(
    token_embeds: &Tensor,
    ids: &[u32],
    slot_token: u32,
    features: &Tensor,
) -> Result<Tensor> {
    let n_slots = ids.iter().filter(|&&id| id == slot_token).count();
    let (n_features, _) = features.dims2()?;
    if n_slots != n_features {
        return Err(Error::input(
            "prompt",
            format!("{n_slots} image tokens but {n_features} image features"),
            "one image token per image feature",
        ));
    }
    let features = features.to_dtype(token_embeds.dtype())?;
    let mut parts = Vec::new();
    let (mut start, mut used) = (0usize, 0usize);
    while start < ids.len() {
        let is_slot = ids[start] == slot_token;
        let len = ids[start..]
            .iter()
            .take_while(|&&id| (id == slot_token) == is_slot)
            .count();
        if is_slot {
            parts.push(features.narrow(0, used, len)?);
            used += len;
        } else {
            parts.push(token_embeds.narrow(0, start, len)?);
        }
        start += len;
    }
    Ok(Tensor::cat(&parts, 0)?)
}

impl Model for LlavaModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn encode_with(&self, item: &MediaItem, _kwargs: &ProcessorKwargs) -> Result<EncodedItem> {
        match item {
            MediaItem::Embeds(embeds) => Ok(EncodedItem::new(
                self.image_expansion()?,
                self.check_image_embeds(embeds)?,
            )),
            MediaItem::Image(img) => {
                let px = self.processor.preprocess(img)?;
                let (h, w) = (px.height as usize, px.width as usize);
                let pixels = Tensor::from_vec(px.data, (1, 3, h, w), &self.device)?;
                Ok(EncodedItem::new(
                    self.image_expansion()?,
                    self.encode_pixels(&pixels)?,
                ))
            }
            other => Err(Error::input(
                other.modality().name(),
                format!("LLaVA-1.5 does not take {} input", other.modality()),
                "an image or image embeddings",
            )),
        }
    }

    /// Images are stacked into one vision-tower pass (every crop has the same size); other
    /// items are encoded one by one.
    fn encode_batch(&self, items: &[(&MediaItem, &ProcessorKwargs)]) -> Vec<Result<EncodedItem>> {
        let images: Vec<usize> = (0..items.len())
            .filter(|&i| matches!(items[i].0, MediaItem::Image(_)))
            .collect();
        let mut out: Vec<Option<Result<EncodedItem>>> = items
            .iter()
            .map(|(item, kwargs)| match item {
                MediaItem::Image(_) => None,
                other => Some(self.encode_with(other, kwargs)),
            })
            .collect();
        if images.len() > 1 {
            match self.encode_images(&images.iter().map(|&i| items[i].0).collect::<Vec<_>>()) {
                Ok(encoded) => {
                    for (i, e) in images.iter().zip(encoded) {
                        out[*i] = Some(Ok(e));
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    for i in &images {
                        out[*i] = Some(Err(Error::Runtime(anyhow::anyhow!("{msg}"))));
                    }
                }
            }
        }
        out.into_iter()
            .zip(items)
            .map(|(r, (item, kwargs))| r.unwrap_or_else(|| self.encode_with(item, kwargs)))
            .collect()
    }

    crate::models::common::llama::delegate_to_llama!(lm);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_slot_rows_in_order() -> Result<()> {
        let dev = Device::Cpu;
        let embeds = Tensor::new(&[[1f32, 1.], [2., 2.], [3., 3.], [4., 4.], [5., 5.]], &dev)?;
        let feats = Tensor::new(&[[10f32, 10.], [20., 20.]], &dev)?;
        let out = splice_features(&embeds, &[5, 9, 9, 6, 7], 9, &feats)?;
        let rows: Vec<Vec<f32>> = out.to_vec2()?;
        assert_eq!(rows, [[1., 1.], [10., 10.], [20., 20.], [4., 4.], [5., 5.]]);
        let err = splice_features(&embeds, &[5, 9, 1, 6, 7], 9, &feats).unwrap_err();
        assert!(err
            .to_string()
            .contains("1 image tokens but 2 image features"));
        Ok(())
    }
}
