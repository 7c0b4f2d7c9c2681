//! LLaVA-OneVision's processors, as transformers' `LlavaOnevisionImageProcessorPil` and
//! `LlavaOnevisionVideoProcessor` compute them, and the one place that says how many tokens an
//! image becomes ([`Packing`]), used both for the prompt and for the features.
//!
//! An image alone in its prompt is tiled (`anyres`): the best-fitting resolution of
//! `image_grid_pinpoints` is chosen, the image is resized into it keeping its aspect ratio
//! (PIL bicubic), centred on black padding and cut into crops of the vision size, after a
//! resized copy of the whole image (the base). An image among several is padded to a square
//! with the mean colour and resized, one crop only. Video frames are resized to the vision size
//! with torchvision's filter ([`tv_resize`]) and normalised as its fused rescale-normalise does.

use super::config::{Config, ImageProcessorConfig, VideoProcessorConfig};
use crate::error::{Error, Result};
use crate::media::RgbImage;
use crate::models::common::resize::resize;
use crate::models::common::tv_resize;

/// Preprocessed crops of one image: `(count, 3, height, width)` values, the base image first.
#[derive(Debug, Clone)]
pub struct ImagePixels {
    pub data: Vec<f32>,
    pub count: usize,
    pub height: usize,
    pub width: usize,
    /// `(rows, cols)` of the crops after the base image; `None` for a padded square (an image
    /// among several in its prompt), which is the base image alone.
    pub grid: Option<(usize, usize)>,
}

/// transformers' `select_best_resolution`: the pinpoint `(height, width)` that keeps the most of
/// the image's resolution once it is scaled into it, then wastes the least.
pub fn select_best_resolution(height: u32, width: u32, pinpoints: &[(u32, u32)]) -> (u32, u32) {
    let (oh, ow) = (f64::from(height), f64::from(width));
    let original = u64::from(height) * u64::from(width);
    let mut best = pinpoints.first().copied().unwrap_or((height, width));
    let (mut max_effective, mut min_wasted) = (0u64, u64::MAX);
    for &(h, w) in pinpoints {
        let scale = (f64::from(w) / ow).min(f64::from(h) / oh);
        // Python's int() truncates.
        let scaled = (ow * scale) as u64 * (oh * scale) as u64;
        let effective = scaled.min(original);
        let wasted = (u64::from(w) * u64::from(h)).saturating_sub(effective);
        if effective > max_effective || (effective == max_effective && wasted < min_wasted) {
            (max_effective, min_wasted, best) = (effective, wasted, (h, w));
        }
    }
    best
}

/// transformers' `get_patch_output_size`: the `(height, width)` the image is resized to inside
/// `target`, keeping its aspect ratio.
fn patch_output_size(height: u32, width: u32, target: (u32, u32)) -> (u32, u32) {
    let (th, tw) = target;
    let scale_w = f64::from(tw) / f64::from(width);
    let scale_h = f64::from(th) / f64::from(height);
    if scale_w < scale_h {
        (((f64::from(height) * scale_w).ceil() as u32).min(th), tw)
    } else {
        (th, ((f64::from(width) * scale_h).ceil() as u32).min(tw))
    }
}

/// Copies `img` onto a `width x height` canvas of `color` at `(left, top)`.
fn pasted(
    img: &RgbImage,
    width: u32,
    height: u32,
    left: u32,
    top: u32,
    color: [u8; 3],
) -> RgbImage {
    let mut out = RgbImage::from_pixel(width, height, ::image::Rgb(color));
    for (x, y, px) in img.enumerate_pixels() {
        if x + left < width && y + top < height {
            out.put_pixel(x + left, y + top, *px);
        }
    }
    out
}

fn check_size(img: &RgbImage) -> Result<()> {
    if img.width() == 0 || img.height() == 0 {
        return Err(Error::input(
            "image",
            format!("size {}x{} has no pixels", img.width(), img.height()),
            "an image at least 1 pixel wide and high",
        ));
    }
    Ok(())
}

/// The tokens an image of `height x width` becomes in a prompt holding `prompt_images` images:
/// the one count the prompt and the features must agree on (see [`Packing`]).
pub fn image_tokens(
    cfg: &Config,
    image: &ImageProcessorConfig,
    height: u32,
    width: u32,
    prompt_images: usize,
) -> usize {
    let side = cfg.patches_per_side();
    if prompt_images > 1 {
        return side * side + 1;
    }
    let crops = image.crop_grid(height, width);
    Packing::new(height, width, crops, side, cfg.max_crops).tokens()
}

impl ImageProcessorConfig {
    /// `(rows, cols)` of the crops an image alone in its prompt is cut into.
    pub fn crop_grid(&self, height: u32, width: u32) -> (usize, usize) {
        let (bh, bw) = select_best_resolution(height, width, &self.grid_pinpoints);
        (
            bh.div_ceil(self.crop) as usize,
            bw.div_ceil(self.crop) as usize,
        )
    }

    /// Resize to `size`, rescale and normalise each of `crops` (the base image first).
    fn finish(&self, crops: &[RgbImage], grid: Option<(usize, usize)>) -> Result<ImagePixels> {
        let (h, w) = (self.size.0 as usize, self.size.1 as usize);
        let mut data = Vec::with_capacity(crops.len() * 3 * h * w);
        for crop in crops {
            data.extend(self.clip.preprocess(crop)?.data);
        }
        Ok(ImagePixels {
            data,
            count: crops.len(),
            height: h,
            width: w,
            grid,
        })
    }

    /// An image alone in its prompt: the base image, then its crops row by row.
    pub fn anyres(&self, img: &RgbImage) -> Result<ImagePixels> {
        check_size(img)?;
        let (height, width) = (img.height(), img.width());
        let best = select_best_resolution(height, width, &self.grid_pinpoints);
        let (nh, nw) = patch_output_size(height, width, best);
        let scaled = resize(img, nw, nh, self.clip.resample);
        let (bh, bw) = best;
        let padded = pasted(&scaled, bw, bh, (bw - nw) / 2, (bh - nh) / 2, [0; 3]);
        let c = self.crop;
        let (rows, cols) = self.crop_grid(height, width);
        let mut crops = Vec::with_capacity(1 + rows * cols);
        crops.push(img.clone());
        for y in (0..bh).step_by(c as usize) {
            for x in (0..bw).step_by(c as usize) {
                let view = ::image::imageops::crop_imm(&padded, x, y, c.min(bw - x), c.min(bh - y));
                crops.push(view.to_image());
            }
        }
        self.finish(&crops, Some((rows, cols)))
    }

    /// An image among several in its prompt: padded to a square with the mean colour, whole.
    pub fn padded_square(&self, img: &RgbImage) -> Result<ImagePixels> {
        check_size(img)?;
        let (w, h) = img.dimensions();
        let side = w.max(h);
        let square = if w == h {
            img.clone()
        } else {
            pasted(
                img,
                side,
                side,
                (side - w) / 2,
                (side - h) / 2,
                self.pad_color,
            )
        };
        self.finish(&[square], None)
    }
}

impl VideoProcessorConfig {
    /// The frames of one clip: each resized to `size` as torchvision does, then normalised in
    /// float32 as `(x - mean / rescale) / (std / rescale)` (transformers' fused rescale and
    /// normalise). `(frames, 3, height, width)` values.
    pub fn frames(&self, frames: &[RgbImage]) -> Result<Vec<f32>> {
        if frames.is_empty() {
            return Err(Error::input(
                "video",
                "it has no frames",
                "at least one decoded frame",
            ));
        }
        let c = &self.clip;
        let inv = (1.0 / c.rescale_factor) as f32;
        let (mean, std): ([f32; 3], [f32; 3]) = if c.do_rescale && c.do_normalize {
            (
                c.image_mean.map(|m| m as f32 * inv),
                c.image_std.map(|s| s as f32 * inv),
            )
        } else if c.do_normalize {
            (
                c.image_mean.map(|m| m as f32),
                c.image_std.map(|s| s as f32),
            )
        } else {
            ([0.0; 3], [1.0; 3])
        };
        let unfused_scale = (c.do_rescale && !c.do_normalize).then_some(c.rescale_factor as f32);
        let (h, w) = self.size;
        let plane = (h * w) as usize;
        let mut out = Vec::with_capacity(frames.len() * 3 * plane);
        for frame in frames {
            check_size(frame)?;
            let frame = if c.do_resize {
                tv_resize::resize_bicubic(frame, w, h)
            } else {
                frame.clone()
            };
            if frame.dimensions() != (w, h) {
                return Err(Error::input(
                    "video",
                    format!(
                        "a {}x{} frame with resizing disabled",
                        frame.width(),
                        frame.height()
                    ),
                    format!("{w}x{h} frames"),
                ));
            }
            let start = out.len();
            out.resize(start + 3 * plane, 0.0);
            for (i, px) in frame.pixels().enumerate() {
                for ch in 0..3 {
                    let x = f32::from(px.0[ch]);
                    out[start + ch * plane + i] = match unfused_scale {
                        Some(s) => x * s,
                        None => (x - mean[ch]) / std[ch],
                    };
                }
            }
        }
        Ok(out)
    }
}

/// How an image's crop features become its tokens: the crops' patch grids side by side
/// (`rows x cols` crops of `side x side` patches), unpadded back to the image's aspect ratio,
/// then bilinearly downsampled when they exceed the `anyres_max_N` budget; one newline token
/// ends every row, and the base image's `side * side` tokens come first. The same arithmetic
/// as transformers' `pack_image_features` and its processor's `_get_number_of_features`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packing {
    /// Patch rows and columns of all crops together.
    pub full: (usize, usize),
    /// First row and column kept by unpadding.
    pub offset: (usize, usize),
    /// Rows and columns kept by unpadding.
    pub unpadded: (usize, usize),
    /// Rows and columns after downsampling (equal to `unpadded` when under the budget).
    pub out: (usize, usize),
    /// Tokens of the base image.
    pub base: usize,
}

impl Packing {
    /// `height x width` is the original image, `crops` its `(rows, cols)`, `side` the patches per
    /// crop side and `max_crops` the `N` of `anyres_max_N`.
    pub fn new(
        height: u32,
        width: u32,
        crops: (usize, usize),
        side: usize,
        max_crops: usize,
    ) -> Self {
        let (mut ch, mut cw) = (crops.0 * side, crops.1 * side);
        let full = (ch, cw);
        let mut offset = (0, 0);
        let (h, w) = (f64::from(height), f64::from(width));
        if w / h > cw as f64 / ch as f64 {
            let new_h = round7_trunc(h * (cw as f64 / w));
            let pad = ch.saturating_sub(new_h) / 2;
            ch -= 2 * pad;
            offset.0 = pad;
        } else {
            let new_w = round7_trunc(w * (ch as f64 / h));
            let pad = cw.saturating_sub(new_w) / 2;
            cw -= 2 * pad;
            offset.1 = pad;
        }
        let ratio = ((ch * cw) as f64 / (max_crops * side * side) as f64).sqrt();
        let out = if ratio > 1.1 {
            (
                py_floordiv(ch as f64, ratio) as usize,
                py_floordiv(cw as f64, ratio) as usize,
            )
        } else {
            (ch, cw)
        };
        Self {
            full,
            offset,
            unpadded: (ch, cw),
            out,
            base: side * side,
        }
    }

    /// Tokens of the image: the base, then each output row and its newline.
    pub fn tokens(&self) -> usize {
        self.base + self.out.0 * (self.out.1 + 1)
    }
}

/// Python's `int(round(x, 7))` for `x >= 0`.
fn round7_trunc(x: f64) -> usize {
    ((x * 1e7).round_ties_even() / 1e7) as usize
}

/// Python's float floor division `a // b` (CPython's `float_floor_div`), which can differ from
/// `floor(a / b)` by one where the quotient rounds up to an integer.
fn py_floordiv(a: f64, b: f64) -> f64 {
    let m = a % b;
    let mut div = (a - m) / b;
    if m != 0.0 && ((b < 0.0) != (m < 0.0)) {
        div -= 1.0;
    }
    if div == 0.0 {
        return 0f64.copysign(a / b);
    }
    let f = div.floor();
    if div - f > 0.5 {
        f + 1.0
    } else {
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pinpoints(size: u32) -> Vec<(u32, u32)> {
        (1..=6)
            .flat_map(|i| (1..=6).map(move |j| (size * i, size * j)))
            .collect()
    }

    #[test]
    fn best_resolution_follows_transformers() {
        let p = pinpoints(42);
        assert_eq!(select_best_resolution(59, 83, &p), (84, 84));
        assert_eq!(select_best_resolution(333, 517, &p), (168, 252));
        assert_eq!(select_best_resolution(127, 637, &p), (84, 252));
        assert_eq!(select_best_resolution(9, 11, &p), (42, 42));
        let real = pinpoints(384);
        assert_eq!(select_best_resolution(1080, 1920, &real), (1152, 1920));
    }

    #[test]
    fn packing_counts_the_processor_tokens() {
        // 83x59 in 2x2 crops of 3x3 patches: 4 of 6 rows kept, no downsampling.
        let p = Packing::new(59, 83, (2, 2), 3, 9);
        assert_eq!((p.offset, p.unpadded, p.out), ((1, 0), (4, 6), (4, 6)));
        assert_eq!(p.tokens(), 9 + 4 * 7);
        // 517x333 in 4x6 crops: 12x18 patches, downsampled by sqrt(216 / 81).
        let p = Packing::new(333, 517, (4, 6), 3, 9);
        assert_eq!((p.unpadded, p.out), ((12, 18), (7, 11)));
        assert_eq!(p.tokens(), 93);
    }

    #[test]
    fn python_floor_division() {
        assert_eq!(py_floordiv(12.0, 1.632993161855452), 7.0);
        assert_eq!(py_floordiv(1.0, 0.1), 9.0); // floor(1 / 0.1) would be 10
        assert_eq!(py_floordiv(7.0, 7.0), 1.0);
    }
}
