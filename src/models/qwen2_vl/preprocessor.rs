//! Qwen2-VL image and video preprocessing, identical to transformers' `Qwen2VLImageProcessorPil`
//! and `Qwen2VLVideoProcessor`: `smart_resize` to a multiple of `patch * merge` within
//! `[min_pixels, max_pixels]`, bicubic resize (PIL for images, torchvision for video frames),
//! rescale + normalize, temporal grouping (an image is repeated `temporal_patch_size` times; a
//! clip is padded with its last frame), and patches flattened as `(t, h/m, w/m, m, m)` rows of
//! `(C, T, P, P)` values.

use candle_core::{Device, Tensor};

use super::config::ProcessorConfig;
use crate::error::{Error, Result};
use crate::media::RgbImage;
use crate::models::common::resize::{resize, Filter};
use crate::models::common::tv_resize;

const VIDEO: &str = "video";

/// Patches of one image or video and its `(t, h, w)` grid in patches.
#[derive(Debug, Clone)]
pub struct Patches {
    /// `(t*h*w, C*T*P*P)` float32 values.
    pub pixel_values: Vec<f32>,
    pub grid_thw: [usize; 3],
    pub patch_dim: usize,
}

impl Patches {
    pub fn num_patches(&self) -> usize {
        self.grid_thw.iter().product()
    }

    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &self.pixel_values,
            (self.num_patches(), self.patch_dim),
            device,
        )?)
    }
}

/// transformers' `smart_resize`: the `(height, width)` nearest to the input's that are multiples
/// of `factor`, with `min_pixels <= h*w <= max_pixels` where possible. Python's rounding
/// (half to even) and float arithmetic are reproduced so the grid matches exactly.
pub fn smart_resize(
    height: u32,
    width: u32,
    factor: u32,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(u32, u32)> {
    smart_resize_named("image", height, width, factor, min_pixels, max_pixels)
}

/// [`smart_resize`] whose errors name `what` (`image` or `video`).
fn smart_resize_named(
    what: &str,
    height: u32,
    width: u32,
    factor: u32,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(u32, u32)> {
    if height == 0 || width == 0 {
        return Err(Error::input(
            what,
            format!("size {width}x{height} has no pixels"),
            "an image at least 1 pixel wide and high",
        ));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > 200.0 {
        return Err(Error::input(
            what,
            format!("size {width}x{height} has an aspect ratio of {ratio:.1}"),
            "an absolute aspect ratio of at most 200",
        ));
    }
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    if h_bar < f || w_bar < f || !(h_bar * w_bar).is_finite() {
        return Err(Error::input(
            what,
            format!("size {width}x{height} resizes to {w_bar}x{h_bar} pixels"),
            format!("a size that resizes to at least {factor}x{factor} (check min_pixels)"),
        ));
    }
    Ok((h_bar as u32, w_bar as u32))
}

/// The normalized float32 value of every byte, per channel: the processors map each 8-bit
/// sample independently, so a table gives exactly their values.
fn normalize_table(cfg: &ProcessorConfig, fused: bool) -> [[f32; 256]; 3] {
    // The PIL image processor rescales in float64 then casts, then normalizes in float32; the
    // video processor fuses both into `(x - mean/scale) / (std/scale)` in float32.
    let scale = cfg.rescale_factor;
    let fused_mean: [f32; 3] = std::array::from_fn(|c| cfg.image_mean[c] * (1.0 / scale) as f32);
    let fused_std: [f32; 3] = std::array::from_fn(|c| cfg.image_std[c] * (1.0 / scale) as f32);
    std::array::from_fn(|c| {
        std::array::from_fn(|x| {
            if fused && cfg.do_rescale && cfg.do_normalize {
                (x as f32 - fused_mean[c]) / fused_std[c]
            } else {
                let mut v = if cfg.do_rescale {
                    (x as f64 * scale) as f32
                } else {
                    x as f32
                };
                if cfg.do_normalize {
                    v = (v - cfg.image_mean[c]) / cfg.image_std[c];
                }
                v
            }
        })
    })
}

/// Normalizes `frames` (all one size, count a multiple of `T`) through `table` straight into
/// patch rows, without an intermediate float image.
fn patchify(frames: &[&RgbImage], table: &[[f32; 256]; 3], cfg: &ProcessorConfig) -> Patches {
    let (p, m, tp) = (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size);
    let (height, width) = frames
        .first()
        .map_or((0, 0), |f| (f.height() as usize, f.width() as usize));
    let (gt, gh, gw) = (frames.len() / tp, height / p, width / p);
    let channels = 3;
    let patch_dim = channels * tp * p * p;
    let mut out = Vec::with_capacity(gt * gh * gw * patch_dim);
    for t in 0..gt {
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for mh in 0..m {
                    for mw in 0..m {
                        let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                        for (c, table) in table.iter().enumerate() {
                            for frame in &frames[t * tp..(t + 1) * tp] {
                                let raw = frame.as_raw();
                                for py in 0..p {
                                    let row = ((y0 + py) * width + x0) * channels;
                                    let px = &raw[row..row + p * channels];
                                    out.extend(
                                        px.iter()
                                            .skip(c)
                                            .step_by(channels)
                                            .map(|&v| table[v as usize]),
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Patches {
        pixel_values: out,
        grid_thw: [gt, gh, gw],
        patch_dim,
    }
}

/// Resizes one frame to the grid `smart_resize` picks (or checks it already fits when the
/// config disables resizing). Images resize as PIL does (the image processor); video frames as
/// torchvision does (the video processor).
fn resized(what: &str, img: &RgbImage, cfg: &ProcessorConfig) -> Result<RgbImage> {
    let factor = (cfg.patch_size * cfg.merge_size) as u32;
    if !cfg.do_resize {
        if !img.width().is_multiple_of(factor)
            || !img.height().is_multiple_of(factor)
            || img.width() == 0
        {
            return Err(Error::input(
                what,
                format!(
                    "size {}x{} is not a multiple of {factor} and resizing is disabled",
                    img.width(),
                    img.height()
                ),
                format!("a size that is a multiple of {factor}"),
            ));
        }
        return Ok(img.clone());
    }
    let (h, w) = smart_resize_named(
        what,
        img.height(),
        img.width(),
        factor,
        cfg.min_pixels,
        cfg.max_pixels,
    )?;
    Ok(if what == VIDEO {
        tv_resize::resize_bicubic(img, w, h)
    } else {
        resize(img, w, h, Filter::Bicubic)
    })
}

/// `Qwen2VLImageProcessorPil` on one image: grid `[1, h, w]`.
pub fn preprocess_image(img: &RgbImage, cfg: &ProcessorConfig) -> Result<Patches> {
    let img = resized("image", img, cfg)?;
    let frames = vec![&img; cfg.temporal_patch_size];
    Ok(patchify(&frames, &normalize_table(cfg, false), cfg))
}

/// `Qwen2VLVideoProcessor` on the frames of one clip (already sampled): every frame is resized
/// to the grid of the first, and the count is padded to a multiple of `temporal_patch_size`
/// by repeating the last frame.
pub fn preprocess_video(frames: &[RgbImage], cfg: &ProcessorConfig) -> Result<Patches> {
    let first = frames
        .first()
        .ok_or_else(|| Error::input("video", "it has no frames", "at least one decoded frame"))?;
    if let Some((i, f)) = frames
        .iter()
        .enumerate()
        .find(|(_, f)| f.dimensions() != first.dimensions())
    {
        return Err(Error::input(
            "video",
            format!(
                "frame {i} is {}x{} but frame 0 is {}x{}",
                f.width(),
                f.height(),
                first.width(),
                first.height()
            ),
            "frames of one size",
        ));
    }
    let capped;
    let cfg = if cfg.cap_pixels_per_frame {
        // transformers' `cap_pixels_per_frame`: each frame gets an even share of 90% of
        // `max_video_tokens` tokens' pixels, but never less than 1.05 * min_pixels.
        let factor = (cfg.patch_size * cfg.merge_size) as u64;
        let total = ((cfg.max_video_tokens * factor * factor) as f64 * 0.9) as u64;
        let share = total * cfg.temporal_patch_size as u64 / frames.len() as u64;
        let floor = (cfg.min_pixels as f64 * 1.05) as u64;
        capped = ProcessorConfig {
            max_pixels: cfg.max_pixels.min(share).max(floor),
            ..cfg.clone()
        };
        &capped
    } else {
        cfg
    };
    let resized_frames = frames
        .iter()
        .map(|f| resized(VIDEO, f, cfg))
        .collect::<Result<Vec<_>>>()?;
    let mut refs: Vec<&RgbImage> = resized_frames.iter().collect();
    // Padded by repeating the last frame.
    while let Some(&last) = refs
        .last()
        .filter(|_| !refs.len().is_multiple_of(cfg.temporal_patch_size))
    {
        refs.push(last);
    }
    Ok(patchify(&refs, &normalize_table(cfg, true), cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_matches_python_rounding() {
        // 42/28 = 1.5 rounds to 2, 70/28 = 2.5 rounds to 2 (half to even), as in Python.
        assert_eq!(
            smart_resize(42, 70, 28, 56 * 56, 1 << 30).unwrap(),
            (56, 56)
        );
        // Too many pixels: floor after scaling by sqrt(h*w/max).
        assert_eq!(smart_resize(333, 517, 28, 3136, 12544).unwrap(), (84, 112));
        // Too few: ceil after scaling up.
        assert_eq!(smart_resize(28, 56, 28, 3136, 12544).unwrap(), (56, 84));
        assert_eq!(smart_resize(28, 56, 28, 784, 12544).unwrap(), (28, 56));
    }

    #[test]
    fn smart_resize_refuses_extreme_aspect_ratios_and_empty_images() {
        let err = smart_resize(1, 201, 28, 3136, 1 << 20).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("aspect ratio"), "{err}");
        assert!(smart_resize(1, 200, 28, 3136, 1 << 20).is_ok());
        assert_eq!(
            smart_resize(0, 10, 28, 3136, 1 << 20)
                .unwrap_err()
                .exit_code(),
            2
        );
        // A tiny image is scaled up to min_pixels, as transformers does, not refused.
        assert_eq!(smart_resize(3, 3, 28, 3136, 1 << 20).unwrap(), (56, 56));
        // With min_pixels 0 it would round to nothing: an input error, not a zero grid.
        assert_eq!(
            smart_resize(3, 3, 28, 0, 1 << 20).unwrap_err().exit_code(),
            2
        );
    }
}
