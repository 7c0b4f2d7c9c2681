//! Bicubic antialiased resize of RGB8 frames exactly as transformers' video processors do it:
//! `torchvision.transforms.v2.functional.resize(uint8, BICUBIC, antialias=True)`, which on x86
//! CPUs with AVX2 runs PyTorch's uint8 kernel. That kernel follows Pillow's separable scheme
//! (Keys cubic, a = -0.5, support scaled by the downscale factor; horizontal pass, rounded to
//! uint8, then vertical) but quantises the weights to int16 with a per-axis precision instead of
//! Pillow's 22 fractional bits, so it differs from PIL by 1 on a few pixels.
//!
//! Note: on CPUs without AVX2 PyTorch takes a float path instead; the references were made on
//! an AVX-512 machine (which uses the AVX2 kernel).

use crate::media::RgbImage;

/// PyTorch's `cubic_convolution1`/`cubic_convolution2` with `A = -0.5`, in float64.
fn filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// Source taps of every output pixel along one axis, with int16-quantised weights.
struct Taps {
    start: Vec<usize>,
    weights: Vec<Vec<i32>>,
    precision: u32,
}

fn taps(in_size: usize, out_size: usize) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let (support, inv_scale) = if scale >= 1.0 {
        (2.0 * scale, 1.0 / scale)
    } else {
        (2.0, 1.0)
    };
    let max_taps = support.ceil() as usize * 2 + 1;
    let mut start = Vec::with_capacity(out_size);
    let mut float_weights = Vec::with_capacity(out_size);
    let mut w_max = 0f64;
    for i in 0..out_size {
        let center = scale * (i as f64 + 0.5);
        // Truncation toward zero, as the C++ casts do.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xend = ((center + support + 0.5) as i64).min(in_size as i64).max(0) as usize;
        let size = xend.saturating_sub(xmin).min(max_taps);
        let mut w: Vec<f64> = (0..size)
            .map(|j| filter(((j + xmin) as f64 - center + 0.5) * inv_scale))
            .collect();
        let total: f64 = w.iter().sum();
        if total != 0.0 {
            for v in &mut w {
                *v /= total;
                w_max = w_max.max(*v);
            }
        }
        start.push(xmin);
        float_weights.push(w);
    }
    let mut precision = 0u32;
    while precision < 22 {
        if (0.5 + w_max * (1u64 << (precision + 1)) as f64) as i64 >= 1 << 15 {
            break;
        }
        precision += 1;
    }
    let one = (1u64 << precision) as f64;
    let weights = float_weights
        .into_iter()
        .map(|w| {
            w.into_iter()
                .map(|v| {
                    let v = v * one;
                    if v < 0.0 {
                        (-0.5 + v) as i32
                    } else {
                        (0.5 + v) as i32
                    }
                })
                .collect()
        })
        .collect();
    Taps {
        start,
        weights,
        precision,
    }
}

/// One pass along x (`horizontal`) or y, rounding to uint8.
fn pass(img: &RgbImage, out_w: u32, out_h: u32, horizontal: bool) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let t = if horizontal {
        taps(in_w, out_w as usize)
    } else {
        taps(in_h, out_h as usize)
    };
    let src = img.as_raw();
    let mut out = RgbImage::new(out_w, out_h);
    let round = if t.precision > 0 {
        1i32 << (t.precision - 1)
    } else {
        0
    };
    let dst: &mut [u8] = &mut out;
    for y in 0..out_h as usize {
        for x in 0..out_w as usize {
            let (i, fixed) = if horizontal { (x, y) } else { (y, x) };
            let mut acc = [round; 3];
            for (k, &w) in t.weights[i].iter().enumerate() {
                let s = t.start[i] + k;
                let (sx, sy) = if horizontal { (s, fixed) } else { (fixed, s) };
                let p = (sy * in_w + sx) * 3;
                for c in 0..3 {
                    acc[c] += src[p + c] as i32 * w;
                }
            }
            let o = (y * out_w as usize + x) * 3;
            for c in 0..3 {
                dst[o + c] = (acc[c] >> t.precision).clamp(0, 255) as u8;
            }
        }
    }
    out
}

/// Resizes `img` to `width` x `height` as torchvision's uint8 bicubic antialiased resize does.
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let mut cur = img.clone();
    if width != cur.width() {
        cur = pass(&cur, width, cur.height(), true);
    }
    if height != cur.height() {
        cur = pass(&cur, cur.width(), height, false);
    }
    cur
}
