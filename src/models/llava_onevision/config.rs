//! LLaVA-OneVision's `config.json` (`LlavaOnevisionConfig`, with transformers' defaults) and its
//! processor configs, parsed once and checked before any weights load.

use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::models::common::clip_processor::ClipProcessorConfig;
use crate::models::common::clip_vision::{siglip_config, ClipVisionConfig};
use crate::models::common::files::read_optional_json;
use crate::models::common::llama::LlamaConfig;

fn bad(problem: impl Into<String>, expected: impl Into<String>) -> Error {
    Error::input("config.json", problem, expected)
}

/// The keys of `LlavaOnevisionConfig` that change what the model computes.
#[derive(Debug, Deserialize)]
struct Raw {
    #[serde(default)]
    vision_config: Option<Value>,
    #[serde(default)]
    text_config: Option<Value>,
    #[serde(default, alias = "image_token_id")]
    image_token_index: Option<u32>,
    #[serde(default, alias = "video_token_id")]
    video_token_index: Option<u32>,
    #[serde(default)]
    projector_hidden_act: Option<String>,
    #[serde(default)]
    vision_feature_select_strategy: Option<String>,
    #[serde(default)]
    vision_feature_layer: Option<Value>,
    #[serde(default)]
    multimodal_projector_bias: Option<bool>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    image_grid_pinpoints: Option<Vec<[u32; 2]>>,
    #[serde(default)]
    vision_aspect_ratio: Option<String>,
}

/// transformers' `vision_config` defaults for LLaVA-OneVision: SigLIP so400m at 384 px.
fn default_vision() -> Value {
    json!({"hidden_size": 1152, "intermediate_size": 4304, "patch_size": 14, "image_size": 384,
           "num_hidden_layers": 26, "num_attention_heads": 16})
}

/// transformers' `Qwen2Config` defaults, where they differ from the Llama decoder's.
fn qwen2_defaults() -> Value {
    json!({"vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
           "max_position_embeddings": 32768, "rope_theta": 10000.0})
}

/// A parsed and checked LLaVA-OneVision configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub vision: ClipVisionConfig,
    /// The Qwen2 language model (q/k/v biases set).
    pub text: LlamaConfig,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub projector_act: candle_nn::Activation,
    pub projector_bias: bool,
    /// Vision hidden states whose concatenation is projected (HF numbering, 0 = embeddings).
    pub feature_layers: Vec<usize>,
    pub tie_word_embeddings: bool,
    /// Resolutions an image may be tiled to, `(height, width)`.
    pub grid_pinpoints: Vec<(u32, u32)>,
    /// `N` of `anyres_max_N`: the crop budget past which features are downsampled.
    pub max_crops: usize,
}

impl Config {
    pub fn from_value(value: &Value) -> Result<Self> {
        let raw: Raw = serde_json::from_value(value.clone())
            .map_err(|e| bad(e.to_string(), "a LLaVA-OneVision config.json"))?;
        let vision = siglip_config(raw.vision_config.as_ref().unwrap_or(&default_vision()))?;
        let text_value = raw.text_config.unwrap_or_else(|| json!({}));
        match text_value.get("model_type").and_then(Value::as_str) {
            None | Some("qwen2") => {}
            Some(other) => {
                return Err(bad(
                    format!("text_config.model_type is {other:?}"),
                    "a Qwen2 language model (model_type \"qwen2\")",
                ))
            }
        }
        if text_value.get("use_sliding_window") == Some(&Value::Bool(true)) {
            return Err(bad(
                "text_config.use_sliding_window is true",
                "full attention in every layer",
            ));
        }
        let mut merged = qwen2_defaults();
        if let (Some(out), Some(given)) = (merged.as_object_mut(), text_value.as_object()) {
            out.extend(given.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let mut text: LlamaConfig = serde_json::from_value(merged)
            .map_err(|e| bad(format!("text_config: {e}"), "a Qwen2 text_config"))?;
        // Qwen2 is the Llama decoder with q/k/v biases (checked above: model_type qwen2).
        text.model_type = None;
        text.qkv_bias = true;
        text.rope()?;

        let image_token_id = raw.image_token_index.unwrap_or(151646);
        let video_token_id = raw.video_token_index.unwrap_or(151647);
        let placeholders = [
            ("image_token_index", image_token_id),
            ("video_token_index", video_token_id),
        ];
        if let Some((name, id)) = placeholders
            .into_iter()
            .find(|&(_, id)| id as usize >= text.vocab_size)
        {
            let problem = format!("{name} {id} is not below vocab_size {}", text.vocab_size);
            return Err(bad(
                problem,
                "placeholder token ids inside text_config's vocabulary",
            ));
        }
        let act_name = raw.projector_hidden_act.unwrap_or_else(|| "gelu".into());
        let projector_act = serde_json::from_value(json!(act_name)).map_err(|_| {
            bad(
                format!("unsupported projector_hidden_act {act_name:?}"),
                "gelu, gelu_pytorch_tanh, gelu_new, silu or relu",
            )
        })?;
        let strategy = raw
            .vision_feature_select_strategy
            .unwrap_or_else(|| "full".into());
        if strategy != "full" {
            // SigLIP has no class token to drop; transformers' anyres packing then fails too.
            return Err(bad(
                format!("vision_feature_select_strategy {strategy:?}"),
                "\"full\" (SigLIP has no class token)",
            ));
        }
        let feature_layers = feature_layers(raw.vision_feature_layer, vision.num_hidden_layers)?;
        let grid_pinpoints = raw
            .image_grid_pinpoints
            .map(|p| p.into_iter().map(|[h, w]| (h, w)).collect())
            .unwrap_or_else(|| default_pinpoints(384));
        check_pinpoints(&grid_pinpoints, "config.json image_grid_pinpoints")?;
        let aspect = raw
            .vision_aspect_ratio
            .unwrap_or_else(|| "anyres_max_9".into());
        Ok(Self {
            vision,
            text,
            image_token_id,
            video_token_id,
            projector_act,
            projector_bias: raw.multimodal_projector_bias.unwrap_or(true),
            feature_layers,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            grid_pinpoints,
            max_crops: max_crops(&aspect)?,
        })
    }

    /// Vision patches per side of one crop (27 for SigLIP at 384 px).
    pub fn patches_per_side(&self) -> usize {
        self.vision.image_size / self.vision.patch_size
    }

    /// Encoder layers that must run to reach the deepest selected hidden state.
    pub fn vision_layers_needed(&self) -> usize {
        self.feature_layers.iter().copied().max().unwrap_or(0)
    }
}

/// `vision_feature_layer`: one index or a list (default -1), negative from the end of the
/// `num_layers + 1` hidden states.
fn feature_layers(value: Option<Value>, num_layers: usize) -> Result<Vec<usize>> {
    let value = value.unwrap_or(json!(-1));
    let list: Vec<i64> = match &value {
        Value::Array(items) => items.iter().filter_map(Value::as_i64).collect(),
        other => other.as_i64().into_iter().collect(),
    };
    let count = num_layers as i64 + 1;
    let expected = format!("an index or a list of indexes in -{count}..{count}");
    let well_formed = value
        .as_array()
        .map_or(list.len() == 1, |a| a.len() == list.len());
    if list.is_empty() || !well_formed {
        return Err(bad(format!("vision_feature_layer {value}"), expected));
    }
    list.into_iter()
        .map(|i| {
            let abs = if i < 0 { count + i } else { i };
            if (0..count).contains(&abs) {
                Ok(abs as usize)
            } else {
                Err(bad(format!("vision_feature_layer {i}"), expected.clone()))
            }
        })
        .collect()
}

/// The `anyres_max_9` pinpoints transformers uses by default, for crops of `size` pixels:
/// every `(size * i, size * j)` for `i, j` in `1..=6`.
fn default_pinpoints(size: u32) -> Vec<(u32, u32)> {
    (1..=6)
        .flat_map(|i| (1..=6).map(move |j| (size * i, size * j)))
        .collect()
}

fn check_pinpoints(pinpoints: &[(u32, u32)], what: &str) -> Result<()> {
    if pinpoints.is_empty() || pinpoints.iter().any(|&(h, w)| h == 0 || w == 0) {
        return Err(Error::input(
            what,
            format!("pinpoints {pinpoints:?}"),
            "a non-empty list of positive [height, width] pairs",
        ));
    }
    Ok(())
}

/// `N` of `anyres_max_N`, read as transformers does (`int(s.strip("anyres_max_"))`).
fn max_crops(aspect: &str) -> Result<usize> {
    aspect
        .trim_matches(|c| "anyres_max_".contains(c))
        .parse::<usize>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            bad(
                format!("vision_aspect_ratio {aspect:?}"),
                "anyres_max_N with a positive N (e.g. anyres_max_9)",
            )
        })
}

/// The image processor's settings (`LlavaOnevisionImageProcessorPil`).
#[derive(Debug, Clone)]
pub struct ImageProcessorConfig {
    /// Resize, rescale and normalisation of every crop and of the base image.
    pub clip: ClipProcessorConfig,
    /// `(height, width)` every crop and the base image are resized to.
    pub size: (u32, u32),
    /// Side of the crops the padded image is cut into.
    pub crop: u32,
    pub grid_pinpoints: Vec<(u32, u32)>,
    /// The colour a prompt's images are padded to a square with when it holds several:
    /// `int(mean * 255)`.
    pub pad_color: [u8; 3],
}

/// The video processor's settings (`LlavaOnevisionVideoProcessor`).
#[derive(Debug, Clone)]
pub struct VideoProcessorConfig {
    /// Resize target and normalisation (frames are resized with torchvision's filter).
    pub clip: ClipProcessorConfig,
    pub size: (u32, u32),
}

/// Both processors of a model directory.
#[derive(Debug, Clone)]
pub struct Processors {
    pub image: ImageProcessorConfig,
    pub video: VideoProcessorConfig,
}

impl Processors {
    /// Reads the processors as transformers does: the `image_processor` / `video_processor`
    /// objects of `processor_config.json`, else `preprocessor_config.json` (images) and
    /// `video_preprocessor_config.json` then `preprocessor_config.json` (video); the classes'
    /// defaults for what none of them sets.
    pub fn load(dir: &Path) -> Result<Self> {
        let combined = read_optional_json(&dir.join("processor_config.json"))?;
        let nested = |key: &str| combined.as_ref().and_then(|c| c.get(key)).cloned();
        let legacy = read_optional_json(&dir.join("preprocessor_config.json"))?;
        let (image, image_file) = match nested("image_processor") {
            Some(v) => (Some(v), "processor_config.json"),
            None => (legacy.clone(), "preprocessor_config.json"),
        };
        let (video, video_file) = match nested("video_processor") {
            Some(v) => (Some(v), "processor_config.json"),
            None => match read_optional_json(&dir.join("video_preprocessor_config.json"))? {
                Some(v) => (Some(v), "video_preprocessor_config.json"),
                None => (legacy, "preprocessor_config.json"),
            },
        };
        let image = image.unwrap_or_else(|| json!({}));
        let (clip, size) = clip_config(&image, image_file)?;
        let crop = match image.get("crop_size") {
            Some(Value::Object(c)) => c.get("height").and_then(Value::as_u64),
            _ => None,
        }
        .map_or(size.0, |h| h as u32);
        let grid_pinpoints = match image.get("image_grid_pinpoints") {
            None | Some(Value::Null) => default_pinpoints(384),
            Some(v) => serde_json::from_value::<Vec<[u32; 2]>>(v.clone())
                .map_err(|e| {
                    Error::input(
                        image_file,
                        format!("image_grid_pinpoints: {e}"),
                        "a list of [height, width] pairs",
                    )
                })?
                .into_iter()
                .map(|[h, w]| (h, w))
                .collect(),
        };
        check_pinpoints(&grid_pinpoints, image_file)?;
        let pad_color = clip.image_mean.map(|m| (m * 255.0) as u8);
        let (video_clip, video_size) =
            clip_config(&video.unwrap_or_else(|| json!({})), video_file)?;
        Ok(Self {
            image: ImageProcessorConfig {
                clip,
                size,
                crop,
                grid_pinpoints,
                pad_color,
            },
            video: VideoProcessorConfig {
                clip: video_clip,
                size: video_size,
            },
        })
    }
}

/// The resize/rescale/normalise settings of one processor object, with the LLaVA-OneVision
/// classes' defaults (384x384, no center crop), and its `(height, width)` target.
fn clip_config(value: &Value, file: &str) -> Result<(ClipProcessorConfig, (u32, u32))> {
    let mut v = value.clone();
    if let Some(obj) = v.as_object_mut() {
        obj.entry("size")
            .or_insert_with(|| json!({"height": 384, "width": 384}));
        obj.entry("do_center_crop").or_insert(json!(false));
        if obj.get("do_center_crop") == Some(&Value::Null) {
            obj.insert("do_center_crop".into(), json!(false));
        }
    }
    let clip = ClipProcessorConfig::from_json(&v.to_string()).map_err(|e| {
        Error::input(
            file,
            format!("not a LLaVA-OneVision processor config: {e}"),
            "Hugging Face LlavaOnevision image/video processor settings",
        )
    })?;
    if clip.do_center_crop {
        return Err(Error::input(
            file,
            "do_center_crop is true",
            "no center crop (LLaVA-OneVision's processors resize to `size`)",
        ));
    }
    let size = match clip.size {
        crate::models::common::clip_processor::ResizeTarget::Exact { height, width } => {
            (height, width)
        }
        crate::models::common::clip_processor::ResizeTarget::ShortestEdge {
            shortest_edge, ..
        } => (shortest_edge, shortest_edge),
    };
    Ok((clip, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `config.json` of llava-hf/llava-onevision-qwen2-0.5b-ov-hf (the keys that matter).
    fn real() -> Value {
        json!({
            "architectures": ["LlavaOnevisionForConditionalGeneration"],
            "image_token_index": 151646,
            "video_token_index": 151647,
            "model_type": "llava_onevision",
            "projector_hidden_act": "gelu",
            "text_config": {
                "hidden_size": 896, "intermediate_size": 4864, "max_position_embeddings": 32768,
                "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
                "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
                "tie_word_embeddings": true, "vocab_size": 152000
            },
            "vision_aspect_ratio": "anyres_max_9",
            "vision_config": {
                "hidden_size": 1152, "image_size": 384, "intermediate_size": 4304,
                "model_type": "siglip_vision_model", "num_attention_heads": 16,
                "num_hidden_layers": 26, "patch_size": 14, "vision_use_head": false
            },
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full"
        })
    }

    #[test]
    fn real_config_parses_with_transformers_defaults() {
        let c = Config::from_value(&real()).unwrap();
        assert_eq!(c.patches_per_side(), 27);
        assert_eq!(c.feature_layers, [26]);
        assert_eq!(c.vision.hidden_act, "gelu_pytorch_tanh");
        assert_eq!(c.vision.layer_norm_eps, 1e-6);
        assert!(c.text.qkv_bias);
        assert_eq!(c.text.kv_heads(), 2);
        assert_eq!(c.grid_pinpoints.len(), 36);
        assert_eq!(c.grid_pinpoints[7], (768, 768));
        assert_eq!(c.max_crops, 9);
        assert_eq!((c.image_token_id, c.video_token_id), (151646, 151647));
        assert_eq!(c.projector_act, candle_nn::Activation::Gelu);
    }

    #[test]
    fn bad_configs_are_input_errors() {
        for (key, value) in [
            ("vision_feature_layer", json!(-28)),
            ("vision_feature_layer", json!([])),
            ("vision_feature_select_strategy", json!("default")),
            ("vision_aspect_ratio", json!("anyres")),
            ("projector_hidden_act", json!("swish_cubed")),
            ("image_token_index", json!(160000)),
            ("image_grid_pinpoints", json!([])),
        ] {
            let mut v = real();
            v[key] = value.clone();
            let err = Config::from_value(&v).unwrap_err();
            assert!(matches!(err, Error::Input { .. }), "{key} {value}: {err}");
        }
        let mut v = real();
        v["text_config"]["model_type"] = json!("llama");
        assert!(Config::from_value(&v).is_err());
    }

    #[test]
    fn aspect_ratio_reads_like_python_strip() {
        assert_eq!(max_crops("anyres_max_9").unwrap(), 9);
        assert_eq!(max_crops("anyres_max_16").unwrap(), 16);
        assert!(max_crops("anyres_max_").is_err());
    }
}
