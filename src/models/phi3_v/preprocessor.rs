//! `Phi3VImageProcessor`, exactly: the HD transform (transpose portraits, pick the largest
//! grid of 336-pixel crops with `scale * ceil(scale / ratio) <= num_crops`, resize with
//! Pillow's bilinear filter, pad to a multiple of 336 with white, centred vertically,
//! transpose back), CLIP normalisation, a global view made with torch's bicubic
//! `interpolate` to 336x336, then the crops in row-major order.

use crate::error::{Error, Result};
use crate::media::RgbImage;
use crate::models::common::resize::{resize, Filter};

/// Crop side in pixels.
pub const CROP: usize = 336;
/// Tokens per crop after the 2x2 merge of a 24x24 patch grid, and per row of 12 merged
/// patches one separator.
const CROP_TOKENS: usize = 144;
const ROW_TOKENS: usize = 12;

/// The HD image's size `(width, height)` for an image of `width x height`, both multiples
/// of [`CROP`] along the padded axis; `None` when the resized short side rounds to 0 pixels
/// (the reference processor fails on such images).
pub fn hd_size(width: u32, height: u32, num_crops: usize) -> Option<(usize, usize)> {
    let (resized, transposed) = hd_resize(width, height, num_crops)?;
    let (w, h) = (resized.0, resized.1.div_ceil(CROP) * CROP);
    Some(if transposed { (h, w) } else { (w, h) })
}

/// The resized size `(width, height)` in the landscape frame, and whether the image is
/// transposed into it (`HD_transform`, in float64 as Python computes it).
fn hd_resize(width: u32, height: u32, num_crops: usize) -> Option<((usize, usize), bool)> {
    let transposed = width < height;
    let (w, h) = if transposed {
        (height, width)
    } else {
        (width, height)
    };
    if h == 0 {
        return None;
    }
    let ratio = w as f64 / h as f64;
    let mut scale = 1usize;
    while (scale as f64) * (scale as f64 / ratio).ceil() <= num_crops as f64 {
        scale += 1;
    }
    scale -= 1;
    let new_w = scale * CROP;
    let new_h = (new_w as f64 / ratio) as usize;
    (scale > 0 && new_h > 0).then_some(((new_w, new_h), transposed))
}

/// Tokens an image becomes, from its HD size: `(h/336 · w/336 + 1) · 144 + 1 + (h/336 + 1)
/// · 12` (the crops and the global view, each row with a separator, and one between them).
pub fn tokens_for_hd(hd_width: usize, hd_height: usize) -> usize {
    let (rows, cols) = (hd_height / CROP, hd_width / CROP);
    (rows * cols + 1) * CROP_TOKENS + 1 + (rows + 1) * ROW_TOKENS
}

/// Tokens an image of `width x height` becomes with `num_crops`; `None` where the
/// processor cannot resize it.
pub fn image_tokens(width: u32, height: u32, num_crops: usize) -> Option<usize> {
    hd_size(width, height, num_crops).map(|(w, h)| tokens_for_hd(w, h))
}

/// An image's pixel values as the processor returns them: the global view then the crops
/// row by row, each `(3, 336, 336)`, then zero crops up to `num_crops + 1`.
#[derive(Debug, Clone)]
pub struct HdPixels {
    /// `(total, 3, 336, 336)`, row-major.
    pub data: Vec<f32>,
    /// `num_crops + 1`.
    pub total: usize,
    /// Crops of the HD image (rows, columns).
    pub grid: (usize, usize),
}

impl HdPixels {
    /// The global view and the real crops (the zero padding left out).
    pub fn used(&self) -> &[f32] {
        &self.data[..(1 + self.grid.0 * self.grid.1) * 3 * CROP * CROP]
    }
}

/// The processor's settings (`preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    pub num_crops: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// PIL's `Image.transpose(TRANSPOSE)`: rows become columns.
fn transpose(img: &RgbImage) -> RgbImage {
    RgbImage::from_fn(img.height(), img.width(), |x, y| *img.get_pixel(y, x))
}

impl ImageProcessor {
    /// The padded HD image (`HD_transform`): `input` names the image in errors.
    pub fn hd_image(&self, img: &RgbImage, num_crops: usize, input: &str) -> Result<RgbImage> {
        let (w, h) = (img.width(), img.height());
        let Some(((new_w, new_h), transposed)) = hd_resize(w, h, num_crops) else {
            return Err(Error::input(
                input,
                format!(
                    "a {w}x{h} image is too elongated for {num_crops} crops: its short side \
                     resizes to 0 pixels"
                ),
                "an image whose sides are less unequal (or more crops)",
            ));
        };
        let landscape = if transposed {
            transpose(img)
        } else {
            img.clone()
        };
        let resized = resize(&landscape, new_w as u32, new_h as u32, Filter::Bilinear);
        let padded_h = new_h.div_ceil(CROP) * CROP;
        // int((target - height) / 2) above, the rest below.
        let top = (padded_h - new_h) / 2;
        let padded = RgbImage::from_fn(new_w as u32, padded_h as u32, |x, y| {
            let y = y as usize;
            if y < top || y >= top + new_h {
                image::Rgb([255, 255, 255])
            } else {
                *resized.get_pixel(x, (y - top) as u32)
            }
        });
        Ok(if transposed {
            transpose(&padded)
        } else {
            padded
        })
    }

    /// The pixel values of one image with `num_crops` (the checkpoint's unless a request sets
    /// it); `input` names the image in errors.
    pub fn preprocess(&self, img: &RgbImage, num_crops: usize, input: &str) -> Result<HdPixels> {
        let hd = self.hd_image(img, num_crops, input)?;
        let (w, h) = (hd.width() as usize, hd.height() as usize);
        // ToTensor then Normalize, in float32.
        let mut norm = vec![0f32; 3 * h * w];
        for (i, px) in hd.pixels().enumerate() {
            for c in 0..3 {
                norm[c * h * w + i] = (px[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        let grid = (h / CROP, w / CROP);
        let total = num_crops + 1;
        let plane = CROP * CROP;
        let mut data = vec![0f32; total * 3 * plane];
        data[..3 * plane].copy_from_slice(&bicubic(&norm, h, w, CROP, CROP));
        for r in 0..grid.0 {
            for col in 0..grid.1 {
                let crop = 1 + r * grid.1 + col;
                for c in 0..3 {
                    for y in 0..CROP {
                        let src = c * h * w + (r * CROP + y) * w + col * CROP;
                        let dst = (crop * 3 + c) * plane + y * CROP;
                        data[dst..dst + CROP].copy_from_slice(&norm[src..src + CROP]);
                    }
                }
            }
        }
        Ok(HdPixels { data, total, grid })
    }
}

/// Source taps and weights of torch's bicubic `upsample_bicubic2d` (`align_corners=False`,
/// no antialias, A = -0.75) along one axis, in float32 as its CPU kernel computes them.
fn cubic_taps(input: usize, output: usize) -> Vec<([usize; 4], [f32; 4])> {
    const A: f32 = -0.75;
    let conv1 = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let conv2 = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| {
            let real = scale * (o as f32 + 0.5) - 0.5;
            let index = (real.floor() as i64).min(input as i64 - 1);
            let t = (real - index as f32).clamp(0.0, 1.0);
            let weights = [conv2(t + 1.0), conv1(t), conv1(1.0 - t), conv2(2.0 - t)];
            let taps =
                std::array::from_fn(|j| (index - 1 + j as i64).clamp(0, input as i64 - 1) as usize);
            (taps, weights)
        })
        .collect()
}

/// `F.interpolate(mode="bicubic")` of `(3, h, w)` planes to `(3, oh, ow)`: for each output
/// pixel the four rows' sums over four columns, then their weighted sum, in that order.
fn bicubic(src: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    let (ys, xs) = (cubic_taps(h, oh), cubic_taps(w, ow));
    let mut out = vec![0f32; 3 * oh * ow];
    for c in 0..3 {
        let plane = &src[c * h * w..(c + 1) * h * w];
        for (oy, (ty, wy)) in ys.iter().enumerate() {
            for (ox, (tx, wx)) in xs.iter().enumerate() {
                let row = |y: usize| {
                    let r = &plane[y * w..(y + 1) * w];
                    let mut t = r[tx[0]] * wx[0];
                    for k in 1..4 {
                        t += r[tx[k]] * wx[k];
                    }
                    t
                };
                let mut v = row(ty[0]) * wy[0];
                for k in 1..4 {
                    v += row(ty[k]) * wy[k];
                }
                out[c * oh * ow + oy * ow + ox] = v;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_follows_the_aspect_ratio() {
        // Square: 2x2 crops of 4, 4x4 of 16.
        assert_eq!(hd_size(500, 500, 4), Some((672, 672)));
        assert_eq!(hd_size(500, 500, 16), Some((1344, 1344)));
        // Portrait images are transposed, padded along the width.
        assert_eq!(hd_size(333, 517, 4), Some((672, 672)));
        // 1 crop: one 336 crop wide, the height padded up to it.
        assert_eq!(hd_size(800, 400, 1), Some((336, 336)));
        assert_eq!(tokens_for_hd(336, 336), 313);
        assert_eq!(tokens_for_hd(672, 672), 757);
        // Too elongated: the short side rounds to 0.
        assert_eq!(hd_size(3000, 1, 4), None);
        assert_eq!(hd_size(0, 0, 4), None);
    }

    #[test]
    fn bicubic_at_scale_one_is_the_identity() {
        let src: Vec<f32> = (0..3 * 4 * 5).map(|v| v as f32 * 0.25).collect();
        assert_eq!(bicubic(&src, 4, 5, 4, 5), src);
        let (taps, w) = cubic_taps(4, 2)[0];
        // real = 2 * 0.5 - 0.5 = 0.5: taps -1..2 clamped to 0, weights summing to 1.
        assert_eq!(taps, [0, 0, 1, 2]);
        assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
