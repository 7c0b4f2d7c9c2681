//! Pillow-exact `Image.resize` for RGB8 images (libImaging/Resample.c).
//!
//! Separable convolution: per output pixel, a window of input pixels weighted by the filter,
//! whose support is stretched by the downscale factor (antialiasing). Weights are computed in
//! f64, normalised to sum 1, then turned into 22-bit fixed point; accumulation starts at half a
//! unit (rounding) and is clipped to 0..=255. The horizontal pass normally runs first into an
//! 8-bit intermediate restricted to the rows the vertical pass needs; a pass whose axis keeps its
//! size is skipped, and Pillow 13 runs the vertical pass first when the height shrinks much more
//! than the width. The results equal Pillow's byte for byte.

use rayon::prelude::*;

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

/// Width of the vectorised dot products (eight i32 lanes of AVX2).
const LANES: usize = 8;

/// Fixed-point weights of one axis: for output index `i`, inputs `start[i]..start[i]+len[i]`
/// weighted by `kk[i * ksize..]`. `ksize` is Pillow's window rounded up to a multiple of
/// [`LANES`]; the weights past `len[i]` are zero.
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
    let window = support.ceil() as usize * 2 + 1;
    let ksize = window.next_multiple_of(LANES);
    let out = out_size as usize;
    let mut c = Coeffs {
        ksize,
        start: Vec::with_capacity(out),
        len: Vec::with_capacity(out),
        kk: vec![0; out * ksize],
    };
    let mut k = vec![0f64; window];
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

#[inline(always)]
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

/// Output rows per parallel task: enough work to amortise scheduling, small enough to balance.
const ROWS_PER_TASK: usize = 8;

/// One horizontal pass over `rows` rows of `src` (row width `src_w`) starting at row `row0`;
/// rows run in parallel.
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
    let out_stride = out_w * 3;
    if out_stride == 0 {
        return out;
    }
    out.par_chunks_mut(out_stride * ROWS_PER_TASK)
        .enumerate()
        .for_each_init(
            // Three planes of one source row, each padded by `ksize` zeros so every output
            // pixel reads a full `ksize` window (the weights past `len` are zero).
            || vec![0u8; 3 * (src_w + c.ksize)],
            |planes, (task, chunk)| {
                for (i, out_row) in chunk.chunks_exact_mut(out_stride).enumerate() {
                    let y = row0 + task * ROWS_PER_TASK + i;
                    horizontal_row(&src[y * stride..(y + 1) * stride], planes, c, out_row);
                }
            },
        );
    out
}

fn horizontal_row(line: &[u8], planes: &mut [u8], c: &Coeffs, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked above); the function is safe code compiled
        // with AVX2 enabled so that its integer loops vectorise eight lanes wide.
        unsafe { horizontal_row_avx2(line, planes, c, out) };
        return;
    }
    horizontal_row_generic(line, planes, c, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn horizontal_row_avx2(line: &[u8], planes: &mut [u8], c: &Coeffs, out: &mut [u8]) {
    horizontal_row_generic(line, planes, c, out);
}

/// One row: deinterleave into planes, then per output pixel and channel one fixed-length dot
/// product. Integer sums are exact in any order, so this equals Pillow's loop bit for bit.
#[inline(always)]
fn horizontal_row_generic(line: &[u8], planes: &mut [u8], c: &Coeffs, out: &mut [u8]) {
    let plane_len = planes.len() / 3;
    let (r, rest) = planes.split_at_mut(plane_len);
    let (g, b) = rest.split_at_mut(plane_len);
    for (((px, r), g), b) in line.chunks_exact(3).zip(&mut *r).zip(&mut *g).zip(&mut *b) {
        (*r, *g, *b) = (px[0], px[1], px[2]);
    }
    let k = c.ksize;
    for ((o, kk), &start) in out
        .chunks_exact_mut(3)
        .zip(c.kk.chunks_exact(k))
        .zip(&c.start)
    {
        for (o, plane) in o.iter_mut().zip([&*r, &*g, &*b]) {
            *o = clip8(dot(&plane[start..start + k], kk));
        }
    }
}

#[inline(always)]
fn dot(p: &[u8], k: &[i32]) -> i32 {
    let mut acc = [0i32; LANES];
    for (p, k) in p.chunks_exact(LANES).zip(k.chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += i32::from(p[i]) * k[i];
        }
    }
    acc.iter().sum::<i32>() + (1 << (PRECISION_BITS - 1))
}

/// One vertical pass; `src` holds the source rows from `row0` on, each `w` pixels wide. Output
/// rows run in parallel.
fn vertical(src: &[u8], w: usize, row0: usize, c: &Coeffs, out_h: usize) -> Vec<u8> {
    let mut out = vec![0u8; out_h * w * 3];
    let stride = w * 3;
    if stride == 0 {
        return out;
    }
    out.par_chunks_mut(stride * ROWS_PER_TASK)
        .enumerate()
        .for_each_init(
            || vec![0i32; stride],
            |acc, (task, chunk)| {
                for (i, out_row) in chunk.chunks_exact_mut(stride).enumerate() {
                    let yy = task * ROWS_PER_TASK + i;
                    let ymin = c.start[yy] - row0;
                    let taps = &c.kk[yy * c.ksize..yy * c.ksize + c.len[yy]];
                    let rows = &src[ymin * stride..(ymin + taps.len()) * stride];
                    vertical_row(rows, taps, acc, out_row);
                }
            },
        );
    out
}

fn vertical_row(rows: &[u8], taps: &[i32], acc: &mut [i32], out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: as in `horizontal_row`.
        unsafe { vertical_row_avx2(rows, taps, acc, out) };
        return;
    }
    vertical_row_generic(rows, taps, acc, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn vertical_row_avx2(rows: &[u8], taps: &[i32], acc: &mut [i32], out: &mut [u8]) {
    vertical_row_generic(rows, taps, acc, out);
}

/// One output row: the weighted sum of `taps.len()` source rows, accumulated a whole row at a
/// time (contiguous, so it vectorises).
#[inline(always)]
fn vertical_row_generic(rows: &[u8], taps: &[i32], acc: &mut [i32], out: &mut [u8]) {
    acc.fill(1 << (PRECISION_BITS - 1));
    for (row, &ky) in rows.chunks_exact(acc.len()).zip(taps) {
        for (a, &p) in acc.iter_mut().zip(row) {
            *a += i32::from(p) * ky;
        }
    }
    for (o, &a) in out.iter_mut().zip(&*acc) {
        *o = clip8(a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pillow's loops as written in Resample.c, one pixel and one tap at a time, serial: the
    /// reference for the parallel, vectorised passes.
    fn reference(img: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
        let (in_w, in_h) = img.dimensions();
        let pass = |src: &[u8], sw: usize, sh: usize, c: &Coeffs, horizontal: bool| {
            let (ow, oh) = if horizontal {
                (c.start.len(), sh)
            } else {
                (sw, c.start.len())
            };
            let mut out = vec![0u8; ow * oh * 3];
            for y in 0..oh {
                for x in 0..ow {
                    let i = if horizontal { x } else { y };
                    let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
                    for t in 0..c.len[i] {
                        let (sx, sy) = if horizontal {
                            (c.start[i] + t, y)
                        } else {
                            (x, c.start[i] + t)
                        };
                        for ch in 0..3 {
                            ss[ch] +=
                                i32::from(src[(sy * sw + sx) * 3 + ch]) * c.kk[i * c.ksize + t];
                        }
                    }
                    for ch in 0..3 {
                        out[(y * ow + x) * 3 + ch] = clip8(ss[ch]);
                    }
                }
            }
            (out, ow, oh)
        };
        let (mut buf, mut w, mut h) = (img.as_raw().clone(), in_w as usize, in_h as usize);
        let vertical_first =
            height < in_h && i64::from(in_h - height) > 2 * (i64::from(in_w) - i64::from(width));
        let (hc, vc) = (coeffs(in_w, width, filter), coeffs(in_h, height, filter));
        let mut steps = vec![(width != in_w, true), (height != in_h, false)];
        if vertical_first {
            steps.reverse();
        }
        for (needed, horizontal) in steps {
            if needed {
                let c = if horizontal { &hc } else { &vc };
                (buf, w, h) = pass(&buf, w, h, c, horizontal);
            }
        }
        RgbImage::from_raw(w as u32, h as u32, buf).unwrap()
    }

    fn photo(name: &str) -> RgbImage {
        let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
        let bytes = std::fs::read(&path).unwrap();
        crate::media::image::decode_image(&bytes, &path, &Default::default()).unwrap()
    }

    /// A 12-megapixel photograph of odd size: a test photo upscaled, with deterministic noise so
    /// that it has the fine detail of a camera image.
    fn photo_12mp() -> RgbImage {
        let mut img = resize(
            &photo("minicpmv_china_1330x1240.jpg"),
            4001,
            2999,
            Filter::Bilinear,
        );
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for v in img.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *v = v.saturating_add((state % 9) as u8).saturating_sub(4);
        }
        img
    }

    #[test]
    fn parallel_vectorised_passes_equal_the_serial_reference() {
        // More threads than this machine may have, so the rows really are split.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap();
        let photos = [
            photo("qwen_china_517x333.jpg"),
            photo("qwen_flower_637x127.jpg"),
            photo("minicpmv_china_60x2000.jpg"),
            photo("ov_china_11x9.jpg"),
        ];
        for img in &photos {
            let (w, h) = img.dimensions();
            let sizes = [
                (336, 337),
                (w / 3 + 1, h / 2 + 1),
                (w * 2 + 1, h - 1),
                (w, h / 5 + 1),
                (7, 1),
            ];
            for (tw, th) in sizes {
                for filter in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos] {
                    let got = pool.install(|| resize(img, tw, th, filter));
                    assert!(
                        got == reference(img, tw, th, filter),
                        "{w}x{h} -> {tw}x{th} {filter:?}"
                    );
                }
            }
        }
        // 12 MP: CLIP's shortest edge 336, Qwen2-VL's default grid, a vertical-first shrink.
        let big = photo_12mp();
        for (tw, th) in [(448, 336), (1148, 840), (3001, 401)] {
            let got = pool.install(|| resize(&big, tw, th, Filter::Bicubic));
            assert!(
                got == reference(&big, tw, th, Filter::Bicubic),
                "12 MP -> {tw}x{th}"
            );
        }
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for filter in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos] {
            for (i, o) in [(517, 336), (100, 333), (7, 1)] {
                let c = coeffs(i, o, filter);
                for xx in 0..o as usize {
                    let s: i32 = c.kk[xx * c.ksize..xx * c.ksize + c.len[xx]].iter().sum();
                    assert!((s - (1 << PRECISION_BITS)).abs() <= c.len[xx] as i32, "{s}");
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
