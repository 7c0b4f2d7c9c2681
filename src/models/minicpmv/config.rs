//! MiniCPM-V 2.6's `config.json` (`MiniCPMVConfig`: Qwen2's keys plus the vision tower,
//! resampler and slicing settings), its `preprocessor_config.json` (`MiniCPMVImageProcessor`)
//! and the special token ids its placeholders are written with (from `tokenizer.json`).

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::models::common::clip_vision::{siglip_config, ClipVisionConfig};
use crate::models::common::files::{read_json, read_optional_json};
use crate::models::common::llama::LlamaConfig;

/// The only version this family runs.
pub const VERSION: f64 = 2.6;

fn config_error(problem: impl Into<String>, expected: impl Into<String>) -> Error {
    Error::input("config.json", problem, expected)
}

/// `MiniCPMVConfig` keys with the authors' defaults.
#[derive(Debug, Clone, Deserialize)]
struct Raw {
    #[serde(default = "default_query_num")]
    query_num: usize,
    #[serde(default = "yes")]
    use_image_id: bool,
    #[serde(default = "yes")]
    drop_vision_last_layer: bool,
    #[serde(default)]
    slice_config: Option<SliceConfig>,
}

fn default_query_num() -> usize {
    64
}

fn yes() -> bool {
    true
}

/// `MiniCPMVSliceConfig`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub struct SliceConfig {
    #[serde(default = "default_patch")]
    pub patch_size: usize,
    #[serde(default = "default_slices")]
    pub max_slice_nums: usize,
    #[serde(default = "default_scale")]
    pub scale_resolution: usize,
}

fn default_patch() -> usize {
    14
}
fn default_slices() -> usize {
    9
}
fn default_scale() -> usize {
    448
}

/// What the model needs from `config.json`.
#[derive(Debug, Clone)]
pub struct Config {
    /// The Qwen2 language model (`MiniCPMVConfig` is a `Qwen2Config`).
    pub text: LlamaConfig,
    /// The navit SigLIP tower (`vision_config`, SigLIP-400M's defaults).
    pub vision: ClipVisionConfig,
    /// Vision layers run: all but the last when `drop_vision_last_layer`.
    pub vision_layers: usize,
    /// Resampler queries per slice (64).
    pub query_num: usize,
    pub use_image_id: bool,
    pub slice: SliceConfig,
}

/// The version a config declares, refusing every one but 2.6 by name.
pub fn check_version(value: &serde_json::Value) -> Result<()> {
    let version = match value.get("version") {
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        Some(serde_json::Value::String(s)) => s.parse::<f64>().ok(),
        _ => None,
    };
    match version {
        Some(v) if (v - VERSION).abs() < 1e-9 => Ok(()),
        Some(v) => Err(config_error(
            format!("MiniCPM-V version {v} is not supported (its processor and placeholders differ)"),
            "MiniCPM-V 2.6 (\"version\": 2.6)",
        )),
        None => Err(config_error(
            "a MiniCPM-V config without \"version\" (MiniCPM-V 2.0 or MiniCPM-Llama3-V 2.5), which \
             this family does not run",
            "MiniCPM-V 2.6 (\"version\": 2.6)",
        )),
    }
}

impl Config {
    pub fn from_value(value: &serde_json::Value) -> Result<Self> {
        check_version(value)?;
        let raw: Raw = serde_json::from_value(value.clone())
            .map_err(|e| config_error(format!("{e}"), "a MiniCPM-V 2.6 config"))?;
        let mut text: LlamaConfig = serde_json::from_value(value.clone())
            .map_err(|e| config_error(format!("{e}"), "a Qwen2 language model config"))?;
        text.qkv_bias = true;
        // MiniCPMVConfig is a Qwen2Config under its own model_type; the decoder checks none.
        text.model_type = None;
        // SigLIP-400M at 980 px, as MiniCPMVConfig.default_vision_config.
        let mut vision_value = serde_json::json!({
            "hidden_size": 1152, "image_size": 980, "intermediate_size": 4304,
            "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14,
        });
        if let (Some(out), Some(given)) = (
            vision_value.as_object_mut(),
            value.get("vision_config").and_then(|v| v.as_object()),
        ) {
            out.extend(given.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let vision = siglip_config(&vision_value)?;
        let vision_layers = vision.num_hidden_layers - usize::from(raw.drop_vision_last_layer);
        if vision_layers == 0 {
            return Err(config_error(
                "the vision tower has no layer left after dropping its last",
                "vision_config.num_hidden_layers of at least 2",
            ));
        }
        // MiniCPMVConfig without slice_config takes max_slice_nums=1.
        let slice = raw.slice_config.unwrap_or(SliceConfig {
            patch_size: 14,
            max_slice_nums: 1,
            scale_resolution: 448,
        });
        if slice.patch_size != vision.patch_size || slice.patch_size == 0 {
            return Err(config_error(
                format!(
                    "slice_config.patch_size {} differs from vision_config.patch_size {}",
                    slice.patch_size, vision.patch_size
                ),
                "the same non-zero patch size for slicing and the vision tower",
            ));
        }
        if slice.max_slice_nums == 0 || slice.scale_resolution < slice.patch_size {
            return Err(config_error(
                format!(
                    "slice_config max_slice_nums {} / scale_resolution {}",
                    slice.max_slice_nums, slice.scale_resolution
                ),
                "at least one slice and a scale_resolution of at least one patch",
            ));
        }
        if raw.query_num == 0 || text.hidden_size < 128 || !text.hidden_size.is_multiple_of(128) {
            return Err(config_error(
                format!(
                    "query_num {} with hidden_size {}",
                    raw.query_num, text.hidden_size
                ),
                "a positive query_num and a hidden_size that is a multiple of 128 (the \
                 resampler's head size)",
            ));
        }
        Ok(Self {
            text,
            vision,
            vision_layers,
            query_num: raw.query_num,
            use_image_id: raw.use_image_id,
            slice,
        })
    }
}

/// `MiniCPMVImageProcessor`'s settings (`preprocessor_config.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct Processor {
    #[serde(default = "default_slices")]
    pub max_slice_nums: usize,
    #[serde(default = "default_scale")]
    pub scale_resolution: usize,
    #[serde(default = "default_patch")]
    pub patch_size: usize,
    #[serde(default)]
    pub use_image_id: bool,
    #[serde(default = "default_query_num")]
    pub image_feature_size: usize,
    #[serde(default = "yes")]
    pub slice_mode: bool,
    #[serde(default = "half")]
    pub norm_mean: [f32; 3],
    #[serde(default = "half")]
    pub norm_std: [f32; 3],
}

fn half() -> [f32; 3] {
    [0.5; 3]
}

impl Processor {
    /// Reads `preprocessor_config.json` from `dir` and checks it against the model, as the
    /// authors' `chat` asserts.
    pub fn load(dir: &Path, cfg: &Config) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        let value = read_optional_json(&path)?.ok_or_else(|| {
            Error::input(
                path.display().to_string(),
                "missing",
                "the model's preprocessor_config.json (MiniCPMVImageProcessor)",
            )
        })?;
        let p: Processor = serde_json::from_value(value).map_err(|e| {
            Error::input(
                path.display().to_string(),
                format!("{e}"),
                "a MiniCPMVImageProcessor config",
            )
        })?;
        let agree = p.image_feature_size == cfg.query_num
            && p.patch_size == cfg.slice.patch_size
            && p.use_image_id == cfg.use_image_id
            && p.max_slice_nums == cfg.slice.max_slice_nums
            && p.scale_resolution == cfg.slice.scale_resolution
            && p.slice_mode
            && p.norm_std.iter().all(|s| *s > 0.0);
        if !agree {
            return Err(Error::input(
                path.display().to_string(),
                format!(
                    "image_feature_size {}, patch_size {}, use_image_id {}, max_slice_nums {}, \
                     scale_resolution {}, slice_mode {} disagree with config.json",
                    p.image_feature_size,
                    p.patch_size,
                    p.use_image_id,
                    p.max_slice_nums,
                    p.scale_resolution,
                    p.slice_mode
                ),
                "the values of config.json (query_num, slice_config, use_image_id), slice_mode \
                 on and positive norm_std",
            ));
        }
        Ok(p)
    }
}

/// The token ids MiniCPM-V's placeholders are written with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub im_start: u32,
    pub im_end: u32,
    pub slice_start: u32,
    pub slice_end: u32,
    pub unk: u32,
    pub im_id_start: u32,
    pub im_id_end: u32,
    /// `\n` (byte-level `Ċ`).
    pub newline: u32,
    /// `0`..`9`: Qwen2's pre-tokenizer splits numbers into single digits.
    pub digits: [u32; 10],
}

impl Tokens {
    /// Reads the ids from the model's `tokenizer.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let json = read_json(&path)?;
        let missing = |name: &str| {
            Error::input(
                path.display().to_string(),
                format!("no {name:?} token"),
                "MiniCPM-V 2.6's tokenizer (with <image>, <slice>, <image_id>, <unk>)",
            )
        };
        let added = |name: &str| -> Result<u32> {
            json.get("added_tokens")
                .and_then(|a| a.as_array())
                .and_then(|a| {
                    a.iter()
                        .find(|t| t.get("content").and_then(|c| c.as_str()) == Some(name))
                })
                .and_then(|t| t.get("id").and_then(|i| i.as_u64()))
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| missing(name))
        };
        let vocab = |name: &str| -> Result<u32> {
            json.pointer("/model/vocab")
                .and_then(|v| v.get(name))
                .and_then(|i| i.as_u64())
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| missing(name))
        };
        let mut digits = [0u32; 10];
        for (d, slot) in digits.iter_mut().enumerate() {
            *slot = vocab(&d.to_string())?;
        }
        Ok(Self {
            im_start: added("<image>")?,
            im_end: added("</image>")?,
            slice_start: added("<slice>")?,
            slice_end: added("</slice>")?,
            unk: added("<unk>")?,
            im_id_start: added("<image_id>")?,
            im_id_end: added("</image_id>")?,
            newline: vocab("Ċ")?,
            digits,
        })
    }

    /// The ids of a decimal number, one per digit.
    pub fn number(&self, n: usize) -> Vec<u32> {
        n.to_string()
            .bytes()
            .map(|b| self.digits[usize::from(b - b'0')])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_version_2_6_is_taken() {
        assert!(check_version(&json!({"version": 2.6})).is_ok());
        assert!(check_version(&json!({"version": "2.6"})).is_ok());
        let e = check_version(&json!({"version": 2.5})).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("version 2.5"), "{e}");
        let e = check_version(&json!({})).unwrap_err();
        assert!(e.to_string().contains("2.0"), "{e}");
    }
}
