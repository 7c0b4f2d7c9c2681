//! `config.json` of a Phi-3-vision checkpoint (the authors' `Phi3VConfig`) and its
//! `preprocessor_config.json` (`Phi3VImageProcessor`).

use std::path::Path;

use serde_json::{json, Value};

use super::preprocessor::ImageProcessor;
use crate::error::{Error, Result};
use crate::models::common::clip_processor::{OPENAI_CLIP_MEAN, OPENAI_CLIP_STD};
use crate::models::common::files::read_optional_json;
use crate::models::common::llama::LlamaConfig;

/// Where the global view's features go relative to the crops' (`hd_transform_order`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HdOrder {
    /// Crops, `glb_GN`, global view (Phi-3(.5)-vision).
    SubGlb,
    /// Global view, `glb_GN`, crops.
    GlbSub,
}

/// What the loader and the prompt need from `config.json`.
#[derive(Debug, Clone)]
pub struct Config {
    /// The Phi-3 language model as the shared decoder reads it.
    pub text: LlamaConfig,
    /// Hidden state of the CLIP tower taken, counted from the end when negative (-2).
    pub layer_idx: i64,
    pub order: HdOrder,
}

fn bad(problem: String, expected: &str) -> Error {
    Error::input("config.json", problem, expected)
}

impl Config {
    pub fn from_value(v: &Value) -> Result<Self> {
        let obj = v
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into(), "a Phi3VConfig object"))?;
        let mut text = obj.clone();
        text.remove("model_type");
        // `Phi3VConfig`'s defaults for the keys the language model reads.
        for (key, default) in [
            ("vocab_size", json!(32064)),
            ("hidden_size", json!(3072)),
            ("intermediate_size", json!(8192)),
            ("num_hidden_layers", json!(32)),
            ("num_attention_heads", json!(32)),
            ("hidden_act", json!("silu")),
            ("max_position_embeddings", json!(4096)),
            ("rms_norm_eps", json!(1e-5)),
            ("rope_theta", json!(10000.0)),
        ] {
            text.entry(key).or_insert(default);
        }
        // LongRoPE reads the pre-training context from the rotary object.
        let original = obj
            .get("original_max_position_embeddings")
            .cloned()
            .unwrap_or(json!(4096));
        if let Some(Value::Object(rope)) = text.get_mut("rope_scaling") {
            rope.entry("original_max_position_embeddings")
                .or_insert(original);
        }
        let text: LlamaConfig = serde_json::from_value(Value::Object(text))
            .map_err(|e| bad(format!("{e}"), "a Phi3VConfig"))?;
        text.rope()?;
        if let Some(window) = obj.get("sliding_window").and_then(Value::as_u64) {
            // The eager attention of the authors' code masks past the window.
            if (window as usize) < text.max_position_embeddings {
                return Err(bad(
                    format!(
                        "sliding_window {window} is shorter than max_position_embeddings {}",
                        text.max_position_embeddings
                    ),
                    "no sliding window, or one covering the whole context",
                ));
            }
        }

        let embd = obj
            .get("embd_layer")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                bad(
                    "no embd_layer object".into(),
                    "embd_layer with the image embedding settings",
                )
            })?;
        let flag = |k: &str| embd.get(k).and_then(Value::as_bool).unwrap_or(false);
        let projection = embd.get("projection_cls").and_then(Value::as_str);
        if !flag("use_hd_transform")
            || !flag("with_learnable_separator")
            || projection != Some("mlp")
        {
            return Err(bad(
                format!(
                    "embd_layer {} is not the HD transform with learnable separators and an MLP \
                     projection",
                    Value::Object(embd.clone())
                ),
                "use_hd_transform and with_learnable_separator true, projection_cls \"mlp\"",
            ));
        }
        // The authors' default when the key is absent.
        let order = match embd
            .get("hd_transform_order")
            .and_then(Value::as_str)
            .unwrap_or("glb_sub")
        {
            "sub_glb" => HdOrder::SubGlb,
            "glb_sub" => HdOrder::GlbSub,
            other => {
                return Err(bad(
                    format!("unsupported hd_transform_order {other:?}"),
                    "sub_glb or glb_sub",
                ))
            }
        };
        let img = obj
            .get("img_processor")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                bad(
                    "no img_processor object".into(),
                    "img_processor naming the CLIP vision model",
                )
            })?;
        if img.get("name").and_then(Value::as_str) != Some("clip_vision_model") {
            return Err(bad(
                format!("img_processor.name is {:?}", img.get("name")),
                "\"clip_vision_model\"",
            ));
        }
        if img
            .get("type_feature")
            .and_then(Value::as_str)
            .unwrap_or("patch")
            != "patch"
        {
            return Err(bad(
                format!(
                    "img_processor.type_feature is {:?}",
                    img.get("type_feature")
                ),
                "\"patch\"",
            ));
        }
        let layer_idx = match img.get("layer_idx") {
            None => -2,
            Some(v) => v
                .as_i64()
                .ok_or_else(|| bad(format!("img_processor.layer_idx {v}"), "an integer"))?,
        };
        Ok(Self {
            text,
            layer_idx,
            order,
        })
    }
}

/// Most crops a checkpoint's processor may ask for (each is a 336x336 float tensor).
const MAX_NUM_CROPS: u64 = 64;

/// Reads `preprocessor_config.json` (`Phi3VImageProcessor`'s defaults where absent).
pub fn image_processor(dir: &Path) -> Result<ImageProcessor> {
    let path = dir.join("preprocessor_config.json");
    let v = read_optional_json(&path)?.unwrap_or(Value::Null);
    let name = path.display().to_string();
    let num_crops = match v.get("num_crops") {
        None => 1,
        Some(n) => n
            .as_u64()
            .filter(|n| (1..=MAX_NUM_CROPS).contains(n))
            .ok_or_else(|| {
                Error::input(
                    &name,
                    format!("num_crops {n}"),
                    format!("1 to {MAX_NUM_CROPS} crops"),
                )
            })? as usize,
    };
    let triple = |key: &str, default: [f32; 3]| -> Result<[f32; 3]> {
        match v.get(key) {
            None => Ok(default),
            Some(x) => x
                .as_array()
                .filter(|a| a.len() == 3)
                .and_then(|a| {
                    let f: Vec<f32> = a
                        .iter()
                        .filter_map(|x| x.as_f64())
                        .map(|x| x as f32)
                        .collect();
                    <[f32; 3]>::try_from(f).ok()
                })
                .filter(|t| key != "image_std" || t.iter().all(|s| *s > 0.0))
                .ok_or_else(|| {
                    Error::input(&name, format!("{key} {x}"), "three numbers (std > 0)")
                }),
        }
    };
    Ok(ImageProcessor {
        num_crops,
        // float64 constants cast to float32, as torchvision's Normalize casts them.
        mean: triple("image_mean", OPENAI_CLIP_MEAN.map(|v| v as f32))?,
        std: triple("image_std", OPENAI_CLIP_STD.map(|v| v as f32))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real() -> Value {
        json!({
            "model_type": "phi3_v", "hidden_size": 3072, "vocab_size": 32064,
            "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
            "sliding_window": 262144,
            "rope_scaling": {"type": "su", "short_factor": vec![1.0; 48], "long_factor": vec![2.0; 48]},
            "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb",
                "projection_cls": "mlp", "use_hd_transform": true, "with_learnable_separator": true},
            "img_processor": {"image_dim_out": 1024, "model_name": "openai/clip-vit-large-patch14-336",
                "name": "clip_vision_model", "num_img_tokens": 144}
        })
    }

    #[test]
    fn reads_the_real_layout() {
        let c = Config::from_value(&real()).unwrap();
        assert_eq!((c.layer_idx, c.order), (-2, HdOrder::SubGlb));
        assert_eq!(c.text.num_hidden_layers, 32);
        match c.text.rope().unwrap().scaling {
            crate::models::common::llama::RopeScaling::LongRope {
                original_max_position_embeddings,
                attention_factor,
                ..
            } => {
                assert_eq!(original_max_position_embeddings, 4096);
                // sqrt(1 + ln(32) / ln(4096)), as the authors' code computes it.
                assert!(
                    (attention_factor - 1.190_238_3).abs() < 1e-6,
                    "{attention_factor}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        for (key, value) in [
            ("sliding_window", json!(2047)),
            ("embd_layer", json!({"projection_cls": "linear"})),
            ("img_processor", json!({"name": "siglip"})),
            (
                "rope_scaling",
                json!({"type": "su", "short_factor": [1.0], "long_factor": [1.0]}),
            ),
        ] {
            let mut v = real();
            v[key] = value;
            let err = Config::from_value(&v).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{key}: {err}");
        }
    }
}
