//! Pillow-exact `Image.resize` for RGB8 images (libImaging/Resample.c).
//!
//! Separable convolution: per output pixel, a window of input pixels weighted by the filter,
//! whose support is stretched by the downscale factor (antialiasing). Weights are computed in
//! f64, normalised to sum 1, then turned into 22-bit fixed point; accumulation starts at half a
//! unit (rounding) and is clipped to 0..=255. The horizontal pass normally runs first into an
//! 8-bit intermediate restricted to the rows the vertical pass needs; a pass whose axis keeps its
//! size is skipped, and Pillow 13 runs the vertical pass first when the height shrinks much more
//! than the width. The results equal Pillow's byte for byte.

use crate::media::RgbImage;

/// Resampling filters, with Pillow's semantics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `Image.BILINEAR` (2): triangle, support 1.
    Bilinear,
    /// `Image.BICUBIC` (3): Keys cubic with a = -0.5, support 2.
    Bicubic,
    /// `Image.LANCZOS` (1): Lanczos-3, support 3.
    Lanczos,
}

impl Filter {
    /// The filter for a `PIL.Image.Resampling` integer code, if it is one we implement.
    pub fn from_pil_code(code: i64) -> Option<Filter> {
        match code {
            1 => Some(Filter::Lanczos),
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    // The expressions keep Pillow's operation order so the f64 results match bit for bit.
    fn eval(self, x: f64) -> f64 {
        match self {
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Fixed-point weights of one axis: for output index `i`, inputs `start[i]..start[i]+len[i]`
/// weighted by `kk[i * ksize..]`.
struct Coeffs {
    ksize: usize,
    start: Vec<usize>,
    len: Vec<usize>,
    kk: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the box `0..in_size`.
fn coeffs(in_size: u32, out_size: u32, filter: Filter) -> Coeffs {
    let scale = f64::from(in_size) / f64::from(out_size);
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let out = out_size as usize;
    let mut c = Coeffs {
        ksize,
        start: Vec::with_capacity(out),
        len: Vec::with_capacity(out),
        kk: vec![0; out * ksize],
    };
    let mut k = vec![0f64; ksize];
    let ss = 1.0 / filterscale;
    for xx in 0..out {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) cast truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size)) - xmin;
        let (xmin, xmax) = (xmin as usize, xmax.max(0) as usize);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let w = filter.eval(((x + xmin) as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for (x, kx) in k.iter().enumerate().take(xmax) {
            let v = if ww != 0.0 { kx / ww } else { *kx };
            c.kk[xx * ksize + x] = if v < 0.0 {
                (-0.5 + v * f64::from(1u32 << PRECISION_BITS)) as i32
            } else {
                (0.5 + v * f64::from(1u32 << PRECISION_BITS)) as i32
            };
        }
        c.start.push(xmin);
        c.len.push(xmax);
    }
    c
}

fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes `img` to `width x height` exactly as Pillow's `Image.resize((width, height), filter)`.
/// Zero target sizes give an empty image.
pub fn resize(img: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let (in_w, in_h) = img.dimensions();
    if (width, height) == (in_w, in_h) {
        return img.clone();
    }
    if width == 0 || height == 0 || in_w == 0 || in_h == 0 {
        return RgbImage::new(width, height);
    }
    let src = img.as_raw();
    let (iw, ih, w, h) = (
        in_w as usize,
        in_h as usize,
        width as usize,
        height as usize,
    );
    let out = if width == in_w {
        vertical(src, iw, 0, &coeffs(in_h, height, filter), h)
    } else if height == in_h {
        horizontal(src, iw, 0, ih, &coeffs(in_w, width, filter), w)
    } else {
        let horiz = coeffs(in_w, width, filter);
        let vert = coeffs(in_h, height, filter);
        // Pillow 13 runs the vertical pass first when the height shrinks by more than twice
        // as many pixels as the width does (python-pillow/Pillow#9549); the order changes the
        // rounding of the 8-bit intermediate, so it must be followed.
        if height < in_h && i64::from(in_h - height) > 2 * (i64::from(in_w) - i64::from(width)) {
            let tmp = vertical(src, iw, 0, &vert, h);
            horizontal(&tmp, iw, 0, h, &horiz, w)
        } else {
            // Only the rows the vertical pass reads are resampled horizontally.
            let first = vert.start[0];
            let last = vert.start[h - 1] + vert.len[h - 1];
            let tmp = horizontal(src, iw, first, last - first, &horiz, w);
            vertical(&tmp, w, first, &vert, h)
        }
    };
    RgbImage::from_raw(width, height, out).unwrap_or_else(|| RgbImage::new(width, height))
}

/// One horizontal pass over `rows` rows of `src` (row width `src_w`) starting at row `row0`.
fn horizontal(
    src: &[u8],
    src_w: usize,
    row0: usize,
    rows: usize,
    c: &Coeffs,
    out_w: usize,
) -> Vec<u8> {
    let mut out = vec![0u8; rows * out_w * 3];
    let stride = src_w * 3;
    for y in 0..rows {
        let line = &src[(y + row0) * stride..(y + row0 + 1) * stride];
        for xx in 0..out_w {
            let k = &c.kk[xx * c.ksize..];
            let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
            for (x, &kx) in k.iter().enumerate().take(c.len[xx]) {
                let p = &line[(x + c.start[xx]) * 3..];
                for ch in 0..3 {
                    ss[ch] += i32::from(p[ch]) * kx;
                }
            }
            let o = (y * out_w + xx) * 3;
            for ch in 0..3 {
                out[o + ch] = clip8(ss[ch]);
            }
        }
    }
    out
}

/// One vertical pass; `src` holds the source rows from `row0` on, each `w` pixels wide.
fn vertical(src: &[u8], w: usize, row0: usize, c: &Coeffs, out_h: usize) -> Vec<u8> {
    let mut out = vec![0u8; out_h * w * 3];
    let stride = w * 3;
    for yy in 0..out_h {
        let k = &c.kk[yy * c.ksize..];
        let ymin = c.start[yy] - row0;
        for xx in 0..w {
            let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
            for (y, &ky) in k.iter().enumerate().take(c.len[yy]) {
                let p = &src[(y + ymin) * stride + xx * 3..];
                for ch in 0..3 {
                    ss[ch] += i32::from(p[ch]) * ky;
                }
            }
            let o = (yy * w + xx) * 3;
            for ch in 0..3 {
                out[o + ch] = clip8(ss[ch]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for filter in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos] {
            for (i, o) in [(517, 336), (100, 333), (7, 1)] {
                let c = coeffs(i, o, filter);
                for xx in 0..o as usize {
                    let s: i32 = c.kk[xx * c.ksize..xx * c.ksize + c.len[xx]].iter().sum();
                    assert!((s - (1 << PRECISION_BITS)).abs() <= c.ksize as i32, "{s}");
                }
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(37, 23, ::image::Rgb([200, 3, 77]));
        for filter in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos] {
            let r = resize(&img, 101, 9, filter);
            assert_eq!(r.dimensions(), (101, 9));
            assert!(r.pixels().all(|p| p.0 == [200, 3, 77]));
        }
    }

    #[test]
    fn same_size_is_identity() {
        let img = RgbImage::from_fn(5, 4, |x, y| ::image::Rgb([x as u8 * 40, y as u8 * 50, 9]));
        assert_eq!(resize(&img, 5, 4, Filter::Bicubic), img);
    }
}
