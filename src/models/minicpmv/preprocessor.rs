//! `MiniCPMVImageProcessor` (MiniCPM-V 2.6), exactly: the slice grid chosen by the log-ratio
//! rule (`get_sliced_grid`), the source image resized to its best size (`find_best_resize`),
//! the refined image cut into slices (`get_refine_size`, `split_to_patches`), all with
//! Pillow's bicubic filter and at multiples of the patch size; then the placeholder ids each
//! image becomes (`get_slice_image_placeholder`).

use super::config::Tokens;
use crate::media::RgbImage;
use crate::models::common::resize::{resize, Filter};

/// Python's `round` (half to even) then `max(.., patch) ` at a multiple of `patch`
/// (`ensure_divide`).
fn ensure_divide(length: f64, patch: usize) -> usize {
    let n = (length / patch as f64).round_ties_even().max(0.0) as usize;
    (n * patch).max(patch)
}

/// `find_best_resize`: the size `(width, height)` with about `scale^2` pixels (when larger, or
/// always with `allow_upscale`) and the aspect ratio kept, at multiples of `patch`.
fn find_best_resize(
    (width, height): (f64, f64),
    scale: usize,
    patch: usize,
    allow_upscale: bool,
) -> (usize, usize) {
    let (mut w, mut h) = (width, height);
    let s = scale as f64;
    if width * height > s * s || allow_upscale {
        let r = width / height;
        h = (s / r.sqrt()).trunc();
        w = (h * r).trunc();
    }
    (ensure_divide(w, patch), ensure_divide(h, patch))
}

/// `get_refine_size`: the size the image is resized to before it is cut into `grid` slices.
fn refine_size(
    (width, height): (usize, usize),
    (cols, rows): (usize, usize),
    scale: usize,
    patch: usize,
) -> (usize, usize) {
    let refine_w = ensure_divide(width as f64, cols);
    let refine_h = ensure_divide(height as f64, rows);
    let cell = (refine_w as f64 / cols as f64, refine_h as f64 / rows as f64);
    let (w, h) = find_best_resize(cell, scale, patch, true);
    (w * cols, h * rows)
}

/// `get_sliced_grid`: `(columns, rows)` of slices for an image of `width x height`, or `None`
/// when it is not sliced.
pub fn sliced_grid(
    width: u32,
    height: u32,
    max_slices: usize,
    scale: usize,
) -> Option<(usize, usize)> {
    let (w, h) = (width as f64, height as f64);
    let log_ratio = (w / h).ln();
    let ratio = w * h / (scale as f64 * scale as f64);
    let multiple = (ratio.ceil() as usize).min(max_slices);
    if multiple <= 1 {
        return None;
    }
    let mut best = (1, 1);
    let mut min_error = f64::INFINITY;
    for n in [multiple - 1, multiple, multiple + 1] {
        if n == 1 || n > max_slices {
            continue;
        }
        for m in (1..=n).filter(|m| n.is_multiple_of(*m)) {
            let error = (log_ratio - (m as f64 / (n / m) as f64).ln()).abs();
            if error < min_error {
                best = (m, n / m);
                min_error = error;
            }
        }
    }
    Some(best)
}

/// One image cut as the processor cuts it: the source image, then the slices row by row.
#[derive(Debug, Clone)]
pub struct Sliced {
    pub images: Vec<RgbImage>,
    /// `(columns, rows)` when sliced.
    pub grid: Option<(usize, usize)>,
}

/// `get_sliced_images` (slice mode on): the resized source image and its slices.
pub fn slice_image(img: &RgbImage, max_slices: usize, scale: usize, patch: usize) -> Sliced {
    let (width, height) = img.dimensions();
    let size = (width as f64, height as f64);
    let grid = sliced_grid(width, height, max_slices, scale);
    let Some((cols, rows)) = grid else {
        let (w, h) = find_best_resize(size, scale, patch, true);
        return Sliced {
            images: vec![resize(img, w as u32, h as u32, Filter::Bicubic)],
            grid,
        };
    };
    let (w, h) = find_best_resize(size, scale, patch, false);
    let mut images = vec![resize(img, w as u32, h as u32, Filter::Bicubic)];
    let (rw, rh) = refine_size(
        (width as usize, height as usize),
        (cols, rows),
        scale,
        patch,
    );
    let refined = resize(img, rw as u32, rh as u32, Filter::Bicubic);
    let (cw, ch) = ((rw / cols) as u32, (rh / rows) as u32);
    for r in 0..rows as u32 {
        for c in 0..cols as u32 {
            images.push(::image::imageops::crop_imm(&refined, c * cw, r * ch, cw, ch).to_image());
        }
    }
    Sliced { images, grid }
}

/// A slice as the vision tower takes it: normalised `(3, h, w)` floats, channel-major, as
/// `(x / 255 - mean) / std` in float32.
pub fn normalize(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (f32::from(px[c]) / 255.0 - mean[c]) / std[c];
        }
    }
    out
}

/// The placeholder ids an image becomes (`get_slice_image_placeholder`): an optional
/// `<image_id>N</image_id>`, `<image>` with `query_num` `<unk>`s and `</image>`, then per grid
/// row its slices (`<slice>`, `<unk>`s, `</slice>`), rows joined by newlines.
pub fn placeholder_ids(
    tokens: &Tokens,
    query_num: usize,
    grid: Option<(usize, usize)>,
    image_id: Option<usize>,
) -> Vec<u32> {
    let mut ids = Vec::new();
    if let Some(n) = image_id {
        ids.push(tokens.im_id_start);
        ids.extend(tokens.number(n));
        ids.push(tokens.im_id_end);
    }
    ids.push(tokens.im_start);
    ids.extend(std::iter::repeat_n(tokens.unk, query_num));
    ids.push(tokens.im_end);
    if let Some((cols, rows)) = grid {
        for r in 0..rows {
            if r > 0 {
                ids.push(tokens.newline);
            }
            for _ in 0..cols {
                ids.push(tokens.slice_start);
                ids.extend(std::iter::repeat_n(tokens.unk, query_num));
                ids.push(tokens.slice_end);
            }
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_rounding_and_grids() {
        // round(2.5) == 2 in Python: 35 / 14 = 2.5 -> 28.
        assert_eq!(ensure_divide(35.0, 14), 28);
        assert_eq!(ensure_divide(3.0, 14), 14);
        assert_eq!(sliced_grid(448, 448, 9, 448), None);
        assert_eq!(sliced_grid(1330, 1240, 9, 448), Some((3, 3)));
        assert_eq!(sliced_grid(1330, 1240, 4, 448), Some((2, 2)));
        assert_eq!(sliced_grid(1330, 1240, 1, 448), None);
        assert_eq!(sliced_grid(1800, 220, 9, 448), Some((3, 1)));
    }
}
