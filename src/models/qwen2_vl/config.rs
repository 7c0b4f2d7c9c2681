//! Qwen2-VL / Qwen2.5-VL configuration: `config.json` (flat hub layout or transformers 5's nested
//! `text_config`) and the image/video processor configs (`processor_config.json`, or the older
//! `preprocessor_config.json` / `video_preprocessor_config.json`). Parsed once, with the same
//! defaults as transformers' config classes.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::models::ProcessorKwargs;

/// Which member of the family: they differ in the vision tower and the video M-RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Qwen2-VL: LayerNorm + fc1/fc2 MLP blocks, full attention per image.
    Qwen2Vl,
    /// Qwen2.5-VL: RMSNorm + SwiGLU blocks, window attention except in `fullatt_block_indexes`,
    /// and temporal positions spaced by `tokens_per_second`.
    Qwen25Vl,
}

impl Variant {
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "qwen2_vl" => Some(Variant::Qwen2Vl),
            "qwen2_5_vl" => Some(Variant::Qwen25Vl),
            _ => None,
        }
    }

    pub fn family_name(self) -> &'static str {
        match self {
            Variant::Qwen2Vl => "qwen2_vl",
            Variant::Qwen25Vl => "qwen2_5_vl",
        }
    }
}

/// The Qwen2 language model with M-RoPE.
#[derive(Debug, Clone)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// How the `head_dim / 2` rotary frequencies split among the temporal, height and width
    /// position rows.
    pub mrope_section: Vec<usize>,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub tie_word_embeddings: bool,
}

/// The vision tower.
#[derive(Debug, Clone)]
pub struct VisionConfig {
    pub depth: usize,
    /// Width of the vision blocks (`embed_dim` for Qwen2-VL, `hidden_size` for Qwen2.5-VL).
    pub width: usize,
    pub num_heads: usize,
    /// Hidden width of the block MLP.
    pub mlp_hidden: usize,
    pub hidden_act: String,
    /// Output width of the patch merger (the language model's hidden size).
    pub out_hidden: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub spatial_merge_size: usize,
    pub rope_theta: f64,
    /// Qwen2.5-VL: window attention span in pixels, and the blocks that attend over the whole image.
    pub window_size: usize,
    pub fullatt_block_indexes: Vec<usize>,
    /// Qwen2.5-VL: temporal M-RoPE positions per second of video.
    pub tokens_per_second: f64,
}

#[derive(Debug, Clone)]
pub struct Qwen2VlConfig {
    pub variant: Variant,
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
}

fn bad(problem: impl Into<String>) -> Error {
    Error::input("config.json", problem, "a Qwen2-VL or Qwen2.5-VL config")
}

fn usize_at(v: &Value, key: &str) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| bad(format!("`{key}` is {x}, not a non-negative integer"))),
    }
}

fn f64_at(v: &Value, key: &str) -> Result<Option<f64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .ok_or_else(|| bad(format!("`{key}` is {x}, not a number"))),
    }
}

fn str_at(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

fn usize_list(v: &Value, key: &str) -> Result<Option<Vec<usize>>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|x| {
                x.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| bad(format!("`{key}` holds {x}, not an integer")))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(x) => Err(bad(format!("`{key}` is {x}, not a list of integers"))),
    }
}

impl Qwen2VlConfig {
    /// Parses `config.json`.
    pub fn from_value(config: &Value) -> Result<Self> {
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let variant = Variant::from_model_type(model_type).ok_or_else(|| {
            bad(format!(
                "model_type is `{model_type}`, not `qwen2_vl` or `qwen2_5_vl`"
            ))
        })?;
        // transformers 5 nests the language model under `text_config`; hub checkpoints are flat.
        let text_v = config
            .get("text_config")
            .filter(|t| t.is_object())
            .unwrap_or(config);
        let text_or_top = |key: &str| -> Result<Option<usize>> {
            Ok(usize_at(text_v, key)?.or(usize_at(config, key)?))
        };
        let hidden_size = text_or_top("hidden_size")?.unwrap_or(8192);
        let num_attention_heads = text_or_top("num_attention_heads")?.unwrap_or(64);
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
            return Err(bad(format!(
                "hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}"
            )));
        }
        let head_dim = hidden_size / num_attention_heads;
        let num_key_value_heads =
            text_or_top("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(bad(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            )));
        }
        let rope = ["rope_parameters", "rope_scaling"]
            .iter()
            .find_map(|k| text_v.get(*k).or(config.get(*k)).filter(|r| r.is_object()));
        let rope_theta = match rope.map(|r| f64_at(r, "rope_theta")).transpose()?.flatten() {
            Some(t) => t,
            None => f64_at(text_v, "rope_theta")?
                .or(f64_at(config, "rope_theta")?)
                .unwrap_or(1_000_000.0),
        };
        if let Some(kind) = rope.and_then(|r| {
            r.get("rope_type")
                .or_else(|| r.get("type"))
                .and_then(Value::as_str)
        }) {
            if !matches!(kind, "default" | "mrope") {
                return Err(bad(format!(
                    "rope type `{kind}` is not supported (only plain M-RoPE)"
                )));
            }
        }
        let mrope_section = rope
            .map(|r| usize_list(r, "mrope_section"))
            .transpose()?
            .flatten()
            .unwrap_or_else(|| vec![16, 24, 24]);
        if mrope_section.iter().sum::<usize>() * 2 != head_dim {
            return Err(bad(format!(
                "mrope_section {mrope_section:?} does not sum to head_dim / 2 = {}",
                head_dim / 2
            )));
        }
        let tie = config
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .or_else(|| text_v.get("tie_word_embeddings").and_then(Value::as_bool))
            .unwrap_or(false);
        let text = TextConfig {
            vocab_size: text_or_top("vocab_size")?.unwrap_or(152064),
            hidden_size,
            intermediate_size: text_or_top("intermediate_size")?.unwrap_or(29568),
            num_hidden_layers: text_or_top("num_hidden_layers")?.unwrap_or(80),
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f64_at(text_v, "rms_norm_eps")?
                .or(f64_at(config, "rms_norm_eps")?)
                .unwrap_or(1e-5),
            rope_theta,
            mrope_section,
            max_position_embeddings: text_or_top("max_position_embeddings")?.unwrap_or(32768),
            hidden_act: str_at(text_v, "hidden_act").unwrap_or_else(|| "silu".into()),
            tie_word_embeddings: tie,
        };

        let empty = Value::Object(Default::default());
        let vis = config.get("vision_config").unwrap_or(&empty);
        let vision = match variant {
            Variant::Qwen2Vl => {
                let width = usize_at(vis, "embed_dim")?.unwrap_or(1280);
                let ratio = f64_at(vis, "mlp_ratio")?.unwrap_or(4.0);
                VisionConfig {
                    depth: usize_at(vis, "depth")?.unwrap_or(32),
                    width,
                    num_heads: usize_at(vis, "num_heads")?.unwrap_or(16),
                    mlp_hidden: (width as f64 * ratio) as usize,
                    hidden_act: str_at(vis, "hidden_act").unwrap_or_else(|| "quick_gelu".into()),
                    out_hidden: usize_at(vis, "hidden_size")?.unwrap_or(3584),
                    in_channels: 3,
                    patch_size: 14,
                    temporal_patch_size: 2,
                    spatial_merge_size: 2,
                    rope_theta: 10000.0,
                    window_size: 0,
                    fullatt_block_indexes: Vec::new(),
                    tokens_per_second: 1.0,
                }
            }
            Variant::Qwen25Vl => VisionConfig {
                depth: usize_at(vis, "depth")?.unwrap_or(32),
                width: usize_at(vis, "hidden_size")?.unwrap_or(3584),
                num_heads: usize_at(vis, "num_heads")?.unwrap_or(16),
                mlp_hidden: usize_at(vis, "intermediate_size")?.unwrap_or(3420),
                hidden_act: str_at(vis, "hidden_act").unwrap_or_else(|| "silu".into()),
                out_hidden: usize_at(vis, "out_hidden_size")?.unwrap_or(3584),
                in_channels: 3,
                patch_size: 14,
                temporal_patch_size: 2,
                spatial_merge_size: 2,
                rope_theta: 10000.0,
                window_size: usize_at(vis, "window_size")?.unwrap_or(112),
                fullatt_block_indexes: usize_list(vis, "fullatt_block_indexes")?
                    .unwrap_or_else(|| vec![7, 15, 23, 31]),
                tokens_per_second: f64_at(vis, "tokens_per_second")?.unwrap_or(4.0),
            },
        };
        let mut vision = vision;
        vision.in_channels = usize_at(vis, "in_channels")?
            .or(usize_at(vis, "in_chans")?)
            .unwrap_or(3);
        vision.patch_size = usize_at(vis, "patch_size")?.unwrap_or(14);
        vision.temporal_patch_size = usize_at(vis, "temporal_patch_size")?.unwrap_or(2);
        vision.spatial_merge_size = usize_at(vis, "spatial_merge_size")?.unwrap_or(2);
        if let Some(r) = vis.get("rope_parameters").filter(|r| r.is_object()) {
            vision.rope_theta = f64_at(r, "rope_theta")?.unwrap_or(10000.0);
        }
        if vision.num_heads == 0 || vision.width % vision.num_heads != 0 {
            return Err(bad(format!(
                "vision width {} is not a multiple of its {} heads",
                vision.width, vision.num_heads
            )));
        }
        if (vision.width / vision.num_heads) % 4 != 0 {
            return Err(bad("vision head_dim is not a multiple of 4 (2-D rotary)"));
        }
        if vision.patch_size == 0
            || vision.temporal_patch_size == 0
            || vision.spatial_merge_size == 0
        {
            return Err(bad(
                "vision patch, temporal patch and merge sizes must be positive",
            ));
        }
        if vision.out_hidden != text.hidden_size {
            return Err(bad(format!(
                "vision output width {} differs from the language model's hidden size {}",
                vision.out_hidden, text.hidden_size
            )));
        }

        let id = |key: &str, default: u32| -> Result<u32> {
            Ok(usize_at(config, key)?.map(|n| n as u32).unwrap_or(default))
        };
        Ok(Self {
            variant,
            text,
            vision,
            image_token_id: id("image_token_id", 151655)?,
            video_token_id: id("video_token_id", 151656)?,
            vision_start_token_id: id("vision_start_token_id", 151652)?,
            vision_end_token_id: id("vision_end_token_id", 151653)?,
        })
    }
}

/// One of the image or video processors' settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessorConfig {
    pub min_pixels: u64,
    pub max_pixels: u64,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub rescale_factor: f64,
    pub do_resize: bool,
    pub do_rescale: bool,
    pub do_normalize: bool,
    /// Video only: also cap each frame's pixels to an even share of `max_video_tokens`.
    pub cap_pixels_per_frame: bool,
    pub max_video_tokens: u64,
}

// OpenAI CLIP's statistics, written as transformers writes them (rounded to f32 here).
#[allow(clippy::excessive_precision)]
const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

impl ProcessorConfig {
    /// transformers' `Qwen2VLImageProcessor` defaults.
    pub fn image_default() -> Self {
        Self {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            rescale_factor: 1.0 / 255.0,
            do_resize: true,
            do_rescale: true,
            do_normalize: true,
            cap_pixels_per_frame: false,
            max_video_tokens: 128_000,
        }
    }

    /// transformers' `Qwen2VLVideoProcessor` defaults.
    pub fn video_default() -> Self {
        Self {
            min_pixels: 128 * 28 * 28,
            max_pixels: 28 * 28 * 768,
            ..Self::image_default()
        }
    }

    /// These settings with the request's `min_pixels`/`max_pixels` in place of the
    /// checkpoint's, as transformers applies those processor kwargs.
    pub fn with_kwargs(&self, kwargs: &ProcessorKwargs) -> Self {
        Self {
            min_pixels: kwargs.min_pixels.unwrap_or(self.min_pixels),
            max_pixels: kwargs.max_pixels.unwrap_or(self.max_pixels),
            ..self.clone()
        }
    }

    /// Overrides `self` with the keys present in one processor's JSON object; `size`
    /// (`shortest_edge`/`longest_edge`) first, then the older `min_pixels`/`max_pixels`, which
    /// win as in transformers.
    pub fn apply(mut self, v: &Value, file: &str) -> Result<Self> {
        let bad = |key: &str| {
            Error::input(
                file,
                format!("`{key}` has an unexpected type"),
                "a Qwen2-VL processor config",
            )
        };
        let uint = |key: &str, within: &Value| -> Result<Option<u64>> {
            match within.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x.as_u64().map(Some).ok_or_else(|| bad(key)),
            }
        };
        if let Some(size) = v.get("size").filter(|s| s.is_object()) {
            if let Some(n) = uint("shortest_edge", size)?.or(uint("min_pixels", size)?) {
                self.min_pixels = n;
            }
            if let Some(n) = uint("longest_edge", size)?.or(uint("max_pixels", size)?) {
                self.max_pixels = n;
            }
        }
        if let Some(n) = uint("min_pixels", v)? {
            self.min_pixels = n;
        }
        if let Some(n) = uint("max_pixels", v)? {
            self.max_pixels = n;
        }
        if let Some(n) = uint("patch_size", v)? {
            self.patch_size = n as usize;
        }
        if let Some(n) = uint("temporal_patch_size", v)? {
            self.temporal_patch_size = n as usize;
        }
        if let Some(n) = uint("merge_size", v)? {
            self.merge_size = n as usize;
        }
        for (key, dst) in [
            ("image_mean", &mut self.image_mean),
            ("image_std", &mut self.image_std),
        ] {
            match v.get(key) {
                None | Some(Value::Null) => {}
                Some(Value::Array(xs)) if xs.len() == 3 => {
                    for (d, x) in dst.iter_mut().zip(xs) {
                        *d = x.as_f64().ok_or_else(|| bad(key))? as f32;
                    }
                }
                Some(Value::Number(x)) => {
                    *dst = [x.as_f64().ok_or_else(|| bad(key))? as f32; 3];
                }
                Some(_) => return Err(bad(key)),
            }
        }
        if let Some(x) = v.get("rescale_factor").filter(|x| !x.is_null()) {
            self.rescale_factor = x.as_f64().ok_or_else(|| bad("rescale_factor"))?;
        }
        if let Some(n) = uint("max_video_tokens", v)? {
            self.max_video_tokens = n;
        }
        for (key, dst) in [
            ("do_resize", &mut self.do_resize),
            ("do_rescale", &mut self.do_rescale),
            ("do_normalize", &mut self.do_normalize),
            ("cap_pixels_per_frame", &mut self.cap_pixels_per_frame),
        ] {
            if let Some(x) = v.get(key).filter(|x| !x.is_null()) {
                *dst = x.as_bool().ok_or_else(|| bad(key))?;
            }
        }
        if self.patch_size == 0 || self.temporal_patch_size == 0 || self.merge_size == 0 {
            return Err(Error::input(
                file,
                "patch_size, temporal_patch_size and merge_size must be positive",
                "a Qwen2-VL processor config",
            ));
        }
        Ok(self)
    }
}

/// Image and video processor settings of a model directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Processors {
    pub image: ProcessorConfig,
    pub video: ProcessorConfig,
}

impl Processors {
    /// Reads `processor_config.json` (transformers 5: `image_processor`/`video_processor`
    /// objects) or else `preprocessor_config.json` and `video_preprocessor_config.json`. As in
    /// transformers, a checkpoint without a video config uses the image config for video.
    pub fn load(dir: &Path) -> Result<Self> {
        let read = |name: &str| -> Result<Option<Value>> {
            let path = dir.join(name);
            if !path.exists() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(&path)?;
            serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| Error::input(path.display().to_string(), e.to_string(), "valid JSON"))
        };
        let combined = read("processor_config.json")?;
        let image_v = match combined.as_ref().and_then(|c| c.get("image_processor")) {
            Some(v) => Some((v.clone(), "processor_config.json")),
            None => read("preprocessor_config.json")?.map(|v| (v, "preprocessor_config.json")),
        };
        let video_v = match combined.as_ref().and_then(|c| c.get("video_processor")) {
            Some(v) => Some((v.clone(), "processor_config.json")),
            None => read("video_preprocessor_config.json")?
                .map(|v| (v, "video_preprocessor_config.json"))
                .or_else(|| image_v.clone()),
        };
        let image = match &image_v {
            Some((v, file)) => ProcessorConfig::image_default().apply(v, file)?,
            None => ProcessorConfig::image_default(),
        };
        let video = match &video_v {
            Some((v, file)) => ProcessorConfig::video_default().apply(v, file)?,
            None => ProcessorConfig::video_default(),
        };
        Ok(Self { image, video })
    }
}
