//! transformers' slow `CLIPImageProcessor` (PIL backend, `use_fast=False`): resize with Pillow,
//! center crop (zero padding when the image is smaller), rescale in f64 then cast to f32, and
//! normalise in f32, producing CHW `pixel_values` equal to HF's. Configured from a
//! `preprocessor_config.json`; the defaults are HF's.

use serde::Deserialize;
use serde_json::Value;

use super::resize::{resize, Filter};
use crate::error::{Error, Result};
use crate::media::RgbImage;

/// Largest intermediate image the resize before the crop may make (64 Mi pixels, 192 MiB).
const MAX_RESIZED_PIXELS: u64 = 1 << 26;

/// OpenAI CLIP normalisation constants (transformers' `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`).
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Target of the resize step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTarget {
    /// Shorter side to `shortest_edge`, aspect kept (HF `default_to_square=False`); with
    /// `longest_edge`, HF's `get_size_with_aspect_ratio`.
    ShortestEdge {
        shortest_edge: u32,
        longest_edge: Option<u32>,
    },
    /// Exactly `height x width`.
    Exact { height: u32, width: u32 },
}

/// The fields of `preprocessor_config.json` that `CLIPImageProcessor` uses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawConfig")]
pub struct ClipProcessorConfig {
    pub do_resize: bool,
    pub size: ResizeTarget,
    /// The PIL resampling filter (`resample` code 1, 2 or 3).
    pub resample: Filter,
    pub do_center_crop: bool,
    /// `(height, width)` of the center crop.
    pub crop_size: (u32, u32),
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    /// Inputs are already RGB8 (see `media::image`); kept for completeness.
    pub do_convert_rgb: bool,
}

impl Default for ClipProcessorConfig {
    fn default() -> Self {
        ClipProcessorConfig {
            do_resize: true,
            size: ResizeTarget::ShortestEdge {
                shortest_edge: 224,
                longest_edge: None,
            },
            resample: Filter::Bicubic,
            do_center_crop: true,
            crop_size: (224, 224),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
            do_convert_rgb: true,
        }
    }
}

/// CHW `pixel_values` of one image.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelValues {
    /// `3 * height * width` values, channel-major.
    pub data: Vec<f32>,
    pub height: u32,
    pub width: u32,
}

#[derive(Deserialize)]
struct RawConfig {
    do_resize: Option<bool>,
    size: Option<Value>,
    resample: Option<i64>,
    do_center_crop: Option<bool>,
    crop_size: Option<Value>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<Value>,
    image_std: Option<Value>,
    do_convert_rgb: Option<bool>,
}

impl TryFrom<RawConfig> for ClipProcessorConfig {
    type Error = String;

    fn try_from(raw: RawConfig) -> Result<Self, String> {
        let d = ClipProcessorConfig::default();
        let resample = match raw.resample {
            None => d.resample,
            Some(code) => Filter::from_pil_code(code).ok_or_else(|| {
                format!("resample {code} is not supported (expected 1 lanczos, 2 bilinear or 3 bicubic)")
            })?,
        };
        let size = match raw.size {
            None | Some(Value::Null) => d.size,
            Some(v) => parse_size(&v)?,
        };
        let crop_size = match raw.crop_size {
            None | Some(Value::Null) => d.crop_size,
            Some(v) => match parse_size(&v)? {
                ResizeTarget::Exact { height, width } => (height, width),
                // A bare int crop size means a square (HF default_to_square=True).
                ResizeTarget::ShortestEdge {
                    shortest_edge,
                    longest_edge: None,
                } if v.is_u64() => (shortest_edge, shortest_edge),
                _ => return Err(format!("crop_size {v} must be an int or {{height, width}}")),
            },
        };
        Ok(ClipProcessorConfig {
            do_resize: raw.do_resize.unwrap_or(d.do_resize),
            size,
            resample,
            do_center_crop: raw.do_center_crop.unwrap_or(d.do_center_crop),
            crop_size,
            do_rescale: raw.do_rescale.unwrap_or(d.do_rescale),
            rescale_factor: raw.rescale_factor.unwrap_or(d.rescale_factor),
            do_normalize: raw.do_normalize.unwrap_or(d.do_normalize),
            image_mean: parse_triple(raw.image_mean, d.image_mean, "image_mean")?,
            image_std: parse_triple(raw.image_std, d.image_std, "image_std")?,
            do_convert_rgb: raw.do_convert_rgb.unwrap_or(d.do_convert_rgb),
        })
    }
}

fn parse_size(v: &Value) -> Result<ResizeTarget, String> {
    let get = |k: &str| -> Result<Option<u32>, String> {
        match v.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|&n| n > 0)
                .map(Some)
                .ok_or_else(|| format!("size field {k} = {x} is not a positive integer")),
        }
    };
    if let Some(n) = v.as_u64() {
        // An int size with default_to_square=False is the shortest edge.
        let n = u32::try_from(n)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("size {v} is not a positive integer"))?;
        return Ok(ResizeTarget::ShortestEdge {
            shortest_edge: n,
            longest_edge: None,
        });
    }
    match (get("height")?, get("width")?, get("shortest_edge")?) {
        (Some(height), Some(width), _) => Ok(ResizeTarget::Exact { height, width }),
        (_, _, Some(shortest_edge)) => Ok(ResizeTarget::ShortestEdge {
            shortest_edge,
            longest_edge: get("longest_edge")?,
        }),
        _ => Err(format!(
            "size {v} must be an int, {{shortest_edge}} or {{height, width}}"
        )),
    }
}

fn parse_triple(v: Option<Value>, default: [f64; 3], name: &str) -> Result<[f64; 3], String> {
    match v {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => n
            .as_f64()
            .map(|x| [x; 3])
            .ok_or_else(|| format!("{name} = {n} is not a finite number")),
        Some(Value::Array(a)) if a.len() == 3 => {
            let mut out = [0.0; 3];
            for (o, x) in out.iter_mut().zip(&a) {
                *o = x
                    .as_f64()
                    .ok_or_else(|| format!("{name} holds a non-number {x}"))?;
            }
            Ok(out)
        }
        Some(other) => Err(format!("{name} = {other} must be a number or 3 numbers")),
    }
}

impl ClipProcessorConfig {
    /// Parses a `preprocessor_config.json` text.
    pub fn from_json(text: &str) -> serde_json::Result<Self> {
        serde_json::from_str(text)
    }

    /// `(height, width)` after the resize step (HF `get_resize_output_image_size` with
    /// `default_to_square=False`, or `get_size_with_aspect_ratio` when `longest_edge` is set).
    pub fn resized_size(&self, height: u32, width: u32) -> (u32, u32) {
        if !self.do_resize {
            return (height, width);
        }
        match self.size {
            ResizeTarget::Exact { height, width } => (height, width),
            ResizeTarget::ShortestEdge {
                shortest_edge,
                longest_edge: None,
            } => {
                let (short, long) = if width <= height {
                    (width, height)
                } else {
                    (height, width)
                };
                // Python: int(size * long / short), the product exact, the division in f64.
                let new_long =
                    ((u64::from(shortest_edge) * u64::from(long)) as f64 / f64::from(short)) as u32;
                if width <= height {
                    (new_long, shortest_edge)
                } else {
                    (shortest_edge, new_long)
                }
            }
            ResizeTarget::ShortestEdge {
                shortest_edge,
                longest_edge: Some(max_size),
            } => size_with_aspect_ratio(height, width, shortest_edge, max_size),
        }
    }

    /// `(height, width)` of the output `pixel_values` for an input of the given size.
    pub fn output_size(&self, height: u32, width: u32) -> (u32, u32) {
        if self.do_center_crop {
            self.crop_size
        } else {
            self.resized_size(height, width)
        }
    }

    /// Resize, center crop, rescale and normalise one RGB image as HF's slow processor does.
    pub fn preprocess(&self, img: &RgbImage) -> Result<PixelValues> {
        let (w, h) = img.dimensions();
        let (rh, rw) = self.resized_size(h, w);
        // A thin strip resized for its short side becomes enormous before the crop (a 140-byte
        // 20000x1 PNG would need gigabytes): refuse it before allocating.
        if u64::from(rh) * u64::from(rw) > MAX_RESIZED_PIXELS {
            return Err(Error::input(
                "image",
                format!("{w}x{h} would be resized to {rw}x{rh} before cropping"),
                format!(
                    "an image whose resized size stays under {MAX_RESIZED_PIXELS} pixels \
                     (a less extreme aspect ratio)"
                ),
            ));
        }
        let resized;
        let img = if (rh, rw) != (h, w) {
            resized = resize(img, rw, rh, self.resample);
            &resized
        } else {
            img
        };
        let (ch, cw, top, left) = if self.do_center_crop {
            let (ch, cw) = self.crop_size;
            // Python floor division; negative offsets mean zero padding.
            let top = (i64::from(rh) - i64::from(ch)).div_euclid(2);
            let left = (i64::from(rw) - i64::from(cw)).div_euclid(2);
            (ch, cw, top, left)
        } else {
            (rh, rw, 0, 0)
        };
        let mean = self.image_mean.map(|m| m as f32);
        let std = self.image_std.map(|s| s as f32);
        let plane = ch as usize * cw as usize;
        let mut data = vec![0f32; 3 * plane];
        for y in 0..ch {
            let sy = i64::from(y) + top;
            for x in 0..cw {
                let sx = i64::from(x) + left;
                let px = if (0..i64::from(rh)).contains(&sy) && (0..i64::from(rw)).contains(&sx) {
                    img.get_pixel(sx as u32, sy as u32).0
                } else {
                    [0, 0, 0]
                };
                let i = y as usize * cw as usize + x as usize;
                for c in 0..3 {
                    let mut v = if self.do_rescale {
                        (f64::from(px[c]) * self.rescale_factor) as f32
                    } else {
                        f32::from(px[c])
                    };
                    if self.do_normalize {
                        v = (v - mean[c]) / std[c];
                    }
                    data[c * plane + i] = v;
                }
            }
        }
        Ok(PixelValues {
            data,
            height: ch,
            width: cw,
        })
    }
}

/// HF `get_size_with_aspect_ratio((height, width), size, max_size)`.
fn size_with_aspect_ratio(height: u32, width: u32, size: u32, max_size: u32) -> (u32, u32) {
    let (h, w) = (f64::from(height), f64::from(width));
    let mut size = size;
    let mut raw_size = None;
    let (min_o, max_o) = (h.min(w), h.max(w));
    if max_o / min_o * f64::from(size) > f64::from(max_size) {
        let r = f64::from(max_size) * min_o / max_o;
        raw_size = Some(r);
        size = r.round_ties_even() as u32;
    }
    if (height <= width && height == size) || (width <= height && width == size) {
        (height, width)
    } else if width < height {
        let oh = match raw_size {
            Some(r) => (r * h / w) as u32,
            None => (f64::from(size) * h / w) as u32,
        };
        (oh, size)
    } else {
        let ow = match raw_size {
            Some(r) => (r * w / h) as u32,
            None => (f64::from(size) * w / h) as u32,
        };
        (size, ow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_hf_clip() {
        let c = ClipProcessorConfig::from_json("{}").unwrap();
        assert_eq!(c, ClipProcessorConfig::default());
    }

    #[test]
    fn int_sizes_follow_hf() {
        let c = ClipProcessorConfig::from_json(r#"{"size": 224, "crop_size": 224}"#).unwrap();
        assert_eq!(c.crop_size, (224, 224));
        assert_eq!(c.resized_size(427, 640), (224, 335));
        assert_eq!(c.resized_size(640, 427), (335, 224));
    }

    #[test]
    fn rejects_unsupported_resample() {
        assert!(ClipProcessorConfig::from_json(r#"{"resample": 0}"#).is_err());
    }

    #[test]
    fn small_image_is_zero_padded() {
        let c = ClipProcessorConfig {
            do_resize: false,
            crop_size: (4, 3),
            do_rescale: false,
            do_normalize: false,
            ..Default::default()
        };
        let img = RgbImage::from_pixel(1, 1, ::image::Rgb([9, 9, 9]));
        let pv = c.preprocess(&img).unwrap();
        // HF pads to 4x3 with the pixel at (ceil(3/2), ceil(2/2)) = row 2, column 1.
        let plane: Vec<f32> = pv.data[..12].to_vec();
        let mut want = vec![0f32; 12];
        want[2 * 3 + 1] = 9.0;
        assert_eq!(plane, want);
    }
}
