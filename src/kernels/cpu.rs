//! CPU kernels for what candle's CPU backend runs on one thread: the matrix-vector products of
//! a decode step (the `gemm` crate takes a single-threaded path when one side has one row,
//! so decode read the weights at one core's bandwidth) and the bf16 -> f32 conversion of
//! weights at load.

use candle_core::{DType, Device, Module, Result, Tensor};
use rayon::prelude::*;

/// Rows of `x` up to which [`matmul_t`] multiplies by the weight one output at a time (a
/// decode step); above it, candle's blocked GEMM is faster.
pub const MAX_GEMV_ROWS: usize = 4;

/// Output columns per parallel task: enough work to amortise scheduling, enough tasks to
/// spread over the cores.
const COLS_PER_TASK: usize = 64;

/// `x @ w^T` for `x` `(..., k)` and `w` `(n, k)`, as `candle_nn::Linear` computes it without
/// the bias. On the CPU with f32 and at most [`MAX_GEMV_ROWS`] rows it runs [`gemv_t`] over
/// all cores; otherwise candle's matmul.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, k) = w.dims2()?;
    let rows = x.elem_count() / k.max(1);
    let fast = matches!(x.device(), Device::Cpu)
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && x.dim(candle_core::D::Minus1)? == k
        && (1..=MAX_GEMV_ROWS).contains(&rows)
        && k > 0
        && w.is_contiguous();
    if !fast {
        return candle_nn::Linear::new(w.clone(), None).forward(x);
    }
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let ws = w.storage_and_layout();
    let wv = match &*ws.0 {
        candle_core::Storage::Cpu(s) => s.as_slice::<f32>()?,
        _ => candle_core::bail!("matmul_t: weight not on the CPU"),
    };
    let start = ws.1.start_offset();
    let out = gemv_t(&xs, rows, &wv[start..start + n * k], n, k);
    let mut shape = x.dims().to_vec();
    *shape.last_mut().expect("rank >= 1") = n;
    Tensor::from_vec(out, shape, x.device())
}

/// `l.forward(x)`, with [`matmul_t`] for the product: a decode step's few rows run over all
/// cores.
pub fn linear(l: &candle_nn::Linear, x: &Tensor) -> Result<Tensor> {
    let y = matmul_t(x, l.weight())?;
    match l.bias() {
        Some(b) => super::bias_add(&y, b),
        None => Ok(y),
    }
}

/// `out[r][j] = x[r] . w[j]` for `rows` rows of `x` (`rows * k`) and `n` rows of `w` (`n *
/// k`), row-major `(rows, n)`; output columns are split over the rayon pool so that every
/// core streams its share of `w`.
pub fn gemv_t(x: &[f32], rows: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    assert_eq!(x.len(), rows * k, "gemv_t: x");
    assert_eq!(w.len(), n * k, "gemv_t: w");
    assert!(rows > 0 && k > 0, "gemv_t: empty");
    // Column-major while computing, so that each task writes one contiguous slice.
    let mut cols = vec![0f32; n * rows];
    cols.par_chunks_mut(COLS_PER_TASK * rows)
        .zip(w.par_chunks(COLS_PER_TASK * k))
        .for_each(|(out, w)| {
            for (j, wj) in w.chunks_exact(k).enumerate() {
                for r in 0..rows {
                    out[j * rows + r] = dot(&x[r * k..(r + 1) * k], wj);
                }
            }
        });
    if rows == 1 {
        return cols;
    }
    let mut out = vec![0f32; rows * n];
    for j in 0..n {
        for r in 0..rows {
            out[r * n + j] = cols[j * rows + r];
        }
    }
    out
}

/// Dot product with sixteen independent partial sums, so that the compiler can keep them in
/// vector registers (a single running sum is a serial chain it may not reorder).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, which is all `dot_avx2` is compiled for.
        return unsafe { dot_avx2(a, b) };
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_portable(a, b)
}

#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (ac, bc) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..L {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = 0f32;
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    acc.iter().sum::<f32>() + s
}

/// Query rows per task of [`attention`]: one head's block of scores (rows x keys f32, 384 KB
/// for 1500 keys) stays in a core's L2 between its GEMM, softmax and product with v.
const ATTN_ROWS: usize = 64;

/// Bidirectional multi-head attention, `softmax(q_h k_h^T * scale + mask) v_h` for each head,
/// with q `(..., n, heads * hd)` and k, v `(..., kv_n, heads * hd)` (the projections' own
/// layout, heads side by side) and the result in that layout; `mask` (`kv_n` elements) is
/// added to every row of scores, `scale` (if any) multiplies them first. This is what
/// candle's ops compute (split heads, matmul, scale, mask, `softmax_last_dim`, matmul,
/// merge heads), and on the CPU in f32 it runs without materialising all heads' `n * kv_n`
/// scores: tasks of [`ATTN_ROWS`] query rows over the rayon pool, each taking every head in
/// turn through a single-threaded GEMM, the softmax in place (as candle's, element for
/// element) and a GEMM with v written straight into the output rows. Elsewhere, candle's ops.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: Option<f64>,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let d = q.dim(candle_core::D::Minus1)?;
    let (n, kv_n) = (q.elem_count() / d.max(1), k.elem_count() / d.max(1));
    let fast = matches!(q.device(), Device::Cpu)
        && [q, k, v].iter().all(|t| t.dtype() == DType::F32)
        && mask.is_none_or(|m| m.dtype() == DType::F32 && m.elem_count() == kv_n)
        && heads > 0
        && d % heads == 0
        && k.dims() == v.dims()
        && k.dim(candle_core::D::Minus1)? == d
        && n > 0
        && kv_n > 0;
    if !fast {
        return attention_candle(q, k, v, heads, scale, mask);
    }
    let flat = |t: &Tensor| -> Result<Vec<f32>> { t.flatten_all()?.to_vec1() };
    let mask = mask.map(flat).transpose()?;
    let out = attention_f32(
        &flat(q)?,
        &flat(k)?,
        &flat(v)?,
        [n, kv_n, heads, d / heads],
        scale.map(|s| s as f32),
        mask.as_deref(),
    );
    Tensor::from_vec(out, q.shape(), q.device())
}

/// [`attention`] with candle's ops: the reference the fused path is tested against, and the
/// path for other devices and dtypes (softmax in f32).
pub fn attention_candle(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: Option<f64>,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let split = |t: &Tensor| {
        let d = t.dim(candle_core::D::Minus1)?;
        let rows = t.elem_count() / d;
        t.reshape((1, rows, heads, d / heads))?
            .transpose(1, 2)?
            .contiguous()
    };
    let mut w = split(q)?.matmul(&split(k)?.t()?)?;
    if let Some(scale) = scale {
        w = (w * scale)?;
    }
    if let Some(mask) = mask {
        w = w.broadcast_add(mask)?;
    }
    let dtype = w.dtype();
    let w = candle_nn::ops::softmax_last_dim(&w.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
    let y = w.matmul(&split(v)?)?.transpose(1, 2)?;
    y.reshape(q.shape())
}

/// The CPU body of [`attention`]: `dims` is `[n, kv_n, heads, hd]`, the slices row-major with
/// rows of `heads * hd`.
fn attention_f32(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: [usize; 4],
    scale: Option<f32>,
    mask: Option<&[f32]>,
) -> Vec<f32> {
    use candle_core::cpu::kernels::VecOps;
    let [n, kv_n, heads, hd] = dims;
    let d = heads * hd;
    assert!(q.len() == n * d && k.len() == kv_n * d && v.len() == kv_n * d);
    let mut out = vec![0f32; n * d];
    out.par_chunks_mut(ATTN_ROWS * d)
        .enumerate()
        .for_each(|(block, out)| {
            let rows = out.len() / d;
            let q = &q[block * ATTN_ROWS * d..];
            let mut scores = vec![0f32; rows * kv_n];
            for h in 0..heads {
                // SAFETY: every pointer/stride pair addresses inside its slice: q rows
                // `0..rows` and k, v rows `0..kv_n`, columns `h * hd..(h + 1) * hd`; scores is
                // `rows * kv_n` and out `rows * d`.
                unsafe {
                    // scores = q_h k_h^T: lhs (rows, hd) with row stride d; rhs (hd, kv_n)
                    // read from k's rows.
                    gemm::gemm(
                        rows,
                        kv_n,
                        hd,
                        scores.as_mut_ptr(),
                        1,
                        kv_n as isize,
                        false,
                        q.as_ptr().add(h * hd),
                        1,
                        d as isize,
                        k.as_ptr().add(h * hd),
                        d as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                for row in scores.chunks_exact_mut(kv_n) {
                    if let Some(scale) = scale {
                        row.iter_mut().for_each(|s| *s *= scale);
                    }
                    if let Some(mask) = mask {
                        row.iter_mut().zip(mask).for_each(|(s, m)| *s += m);
                    }
                    // As candle-nn's softmax_last_dim computes each row, but for a vectorised exp.
                    let mut max = f32::NEG_INFINITY;
                    // SAFETY: `row` holds `kv_n > 0` elements.
                    unsafe { f32::vec_reduce_max(row.as_ptr(), &mut max, kv_n) };
                    row.iter_mut().for_each(|s| *s -= max);
                    exp_in_place(row);
                    let mut sum = 0f32;
                    // SAFETY: as above.
                    unsafe { f32::vec_reduce_sum(row.as_ptr(), &mut sum, kv_n) };
                    row.iter_mut().for_each(|s| *s /= sum);
                }
                // SAFETY: as above; the destination is out's columns of head h.
                unsafe {
                    gemm::gemm(
                        rows,
                        hd,
                        kv_n,
                        out.as_mut_ptr().add(h * hd),
                        1,
                        d as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        kv_n as isize,
                        v.as_ptr().add(h * hd),
                        1,
                        d as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
        });
    out
}

/// `e^x` for every element in place: Cephes' `expf` (a degree-7 polynomial in
/// `r = x - n ln 2`, `n = round(x / ln 2)`, times `2^n` built from its exponent bits), in a
/// form the compiler vectorises; glibc's `expf`, one call an element, took a tenth of a Whisper
/// utterance in the attention softmax. Within 2 ulp of `f32::exp`; 0 below -87, where the
/// result leaves f32's normal range (only softmax inputs, at most 0, come here).
fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA, which is all `exp_avx2` is compiled for.
        return unsafe { exp_avx2(xs) };
    }
    xs.iter_mut().for_each(|x| *x = exp_one(*x));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_avx2(xs: &mut [f32]) {
    xs.iter_mut().for_each(|x| *x = exp_one(*x));
}

#[inline(always)]
fn exp_one(x: f32) -> f32 {
    // ln 2 split in two so that n * C1 is exact.
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * std::f32::consts::LOG2_E + 0.5).floor();
    let r = (xc - n * C1) - n * C2;
    let mut p = 1.987_569_1e-4f32;
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = p * r + c;
    }
    let y = p * r * r + r + 1.0;
    // 2^n: n + 127 lies in 1..=254 after the clamp; added to 1.5 * 2^23 it is the low
    // mantissa bits, shifted here into the exponent field (an `as i32` would not vectorise).
    let e = y * f32::from_bits((n + (12_582_912.0 + 127.0)).to_bits() << 23);
    if x < -87.0 {
        0.0
    } else {
        e
    }
}

/// `Tensor::cat(parts, 0)`, for the projections fused at load (q/k/v, gate/up: 3.4 GB of a
/// 2B model's f32 weights). On the CPU with contiguous f32 parts the rows are copied in
/// parallel into a buffer advised to huge pages: candle's copy ran on one thread into 4 KiB
/// pages, four fifths of the load's page faults. Elsewhere, candle's `cat`.
pub fn cat_rows(parts: &[&Tensor]) -> Result<Tensor> {
    let Some(first) = parts.first() else {
        candle_core::bail!("cat_rows: no tensors");
    };
    let tail = &first.dims()[1..];
    let fast = parts.iter().all(|t| {
        matches!(t.device(), Device::Cpu)
            && t.dtype() == DType::F32
            && t.is_contiguous()
            && t.rank() >= 1
            && &t.dims()[1..] == tail
    });
    if !fast {
        return Tensor::cat(parts, 0);
    }
    let rows: usize = parts.iter().map(|t| t.dim(0)).sum::<Result<usize>>()?;
    let mut shape = first.dims().to_vec();
    shape[0] = rows;
    let len: usize = parts.iter().map(|t| t.elem_count()).sum();
    let mut out = vec![0f32; len];
    advise_huge_pages(&mut out);
    let mut rest = out.as_mut_slice();
    for t in parts {
        let (dst, next) = rest.split_at_mut(t.elem_count());
        rest = next;
        let storage = t.storage_and_layout();
        let src = match &*storage.0 {
            candle_core::Storage::Cpu(s) => s.as_slice::<f32>()?,
            _ => candle_core::bail!("cat_rows: not on the CPU"),
        };
        let src = &src[storage.1.start_offset()..][..dst.len()];
        dst.par_chunks_mut(1 << 16)
            .zip(src.par_chunks(1 << 16))
            .for_each(|(d, s)| d.copy_from_slice(s));
    }
    Tensor::from_vec(out, shape, first.device())
}

/// Little-endian bf16 bytes as f32 values (exact: bf16 is f32's upper half), converted in
/// parallel chunks.
pub fn bf16_bytes_to_f32(bytes: &[u8]) -> Vec<f32> {
    let mut out = vec![0f32; bytes.len() / 2];
    advise_huge_pages(&mut out);
    out.par_chunks_mut(1 << 16)
        .zip(bytes.par_chunks(2 << 16))
        .for_each(|(o, b)| {
            for (v, p) in o.iter_mut().zip(b.chunks_exact(2)) {
                *v = f32::from_bits(u32::from(u16::from_le_bytes([p[0], p[1]])) << 16);
            }
        });
    out
}

/// Asks the kernel to back a large, not yet touched buffer with 2 MiB pages (where THP is in
/// `madvise` mode): a 2B model's f32 weights are 2.2M page faults in 4 KiB pages, and the
/// weights' TLB misses slow every matmul that streams them.
fn advise_huge_pages(buf: &mut [f32]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = buf.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(buf);
        let (lo, hi) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if hi > lo {
            // SAFETY: [lo, hi) lies inside `buf`'s allocation; MADV_HUGEPAGE is advice that
            // changes neither the contents nor the validity of the mapping.
            unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// glibc returns every freed block above 32 MiB to the kernel, so each large tensor of a
/// forward (a vision tower's or Whisper's attention scores, its MLP activations) comes back
/// as fresh pages, faulted in and zeroed: on Whisper tiny that was a third of the CPU time.
/// Keeping freed memory in the heap lets the next forward reuse it. Call once at start-up.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; it is called before other threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Largest error of `got` against the exact (f64) `x @ w^T`, relative to the sum of the
    /// products' magnitudes (the scale of a dot product's rounding error, whatever the order
    /// of summation; a plain relative error blows up where the sum cancels to near zero).
    fn max_err(got: &Tensor, x: &Tensor, w: &Tensor) -> f64 {
        let (n, k) = w.dims2().unwrap();
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let w: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let mut worst = 0f64;
        for (i, g) in got.iter().enumerate() {
            let (r, j) = (i / n, i % n);
            let (mut exact, mut scale) = (0f64, 0f64);
            for t in 0..k {
                let p = x[r * k + t] as f64 * w[j * k + t] as f64;
                exact += p;
                scale += p.abs();
            }
            worst = worst.max((*g as f64 - exact).abs() / scale.max(1e-30));
        }
        worst
    }

    /// The GEMV path against candle's matmul on odd sizes, 1..=MAX_GEMV_ROWS rows, 2-D and
    /// 3-D inputs (the decoder's `(1, 1, hidden)`).
    #[test]
    fn matmul_t_matches_candle_on_odd_sizes() -> Result<()> {
        let dev = Device::Cpu;
        for (rows, k, n) in [
            (1, 1, 1),
            (1, 37, 129),
            (3, 1537, 65),
            (4, 15, 1000),
            (2, 16, 64),
        ] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, k), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let want = x.matmul(&w.broadcast_left(1)?.t()?)?;
            let got = matmul_t(&x, &w)?;
            assert_eq!(got.dims(), want.dims());
            // As close to the exact product as candle's own GEMM is.
            let bound = 1e-6f64.max(2.0 * max_err(&want, &x, &w));
            assert!(max_err(&got, &x, &w) <= bound, "{rows}x{k}x{n}");
            let got2 = matmul_t(&x.squeeze(0)?, &w)?;
            assert_eq!(got2.dims(), want.squeeze(0)?.dims());
            assert!(max_err(&got2, &x, &w) <= bound, "{rows}x{k}x{n} (2-D)");
        }
        // Above the GEMV bound it is candle's own result.
        let x = Tensor::randn(0f32, 1.0, (1, MAX_GEMV_ROWS + 1, 33), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (7, 33), &dev)?;
        let want: Vec<f32> = x
            .matmul(&w.broadcast_left(1)?.t()?)?
            .flatten_all()?
            .to_vec1()?;
        let got: Vec<f32> = matmul_t(&x, &w)?.flatten_all()?.to_vec1()?;
        assert_eq!(got, want);
        Ok(())
    }

    /// The fused attention against candle's ops on random inputs of odd sizes: several row
    /// blocks and a ragged last one, one head and several, with and without scale and mask,
    /// queries and keys of different lengths.
    #[test]
    fn attention_matches_candle_on_odd_sizes() -> Result<()> {
        let dev = Device::Cpu;
        for (n, kv_n, heads, hd, scaled, masked) in [
            (1, 1, 1, 1, false, false),
            (3, 5, 2, 7, true, false),
            (ATTN_ROWS + 1, 37, 3, 16, true, true),
            (2 * ATTN_ROWS + 13, 3 * ATTN_ROWS - 5, 6, 64, true, false),
            (150, 150, 5, 13, false, true),
        ] {
            let d = heads * hd;
            let q = Tensor::randn(0f32, 1.0, (1, n, d), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (1, kv_n, d), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (1, kv_n, d), &dev)?;
            let scale = scaled.then(|| 1.0 / (hd as f64).sqrt());
            // Some keys masked out (a large negative number, as the encoders' masks).
            let mask = masked
                .then(|| {
                    let m: Vec<f32> = (0..kv_n)
                        .map(|j| if j % 3 == 2 { -1e9 } else { 0.0 })
                        .collect();
                    Tensor::from_vec(m, (1, 1, 1, kv_n), &dev)
                })
                .transpose()?;
            let want = attention_candle(&q, &k, &v, heads, scale, mask.as_ref())?;
            let got = attention(&q, &k, &v, heads, scale, mask.as_ref())?;
            assert_eq!(got.dims(), want.dims());
            let got: Vec<f32> = got.flatten_all()?.to_vec1()?;
            let want: Vec<f32> = want.flatten_all()?.to_vec1()?;
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // Outputs are averages of v (|v| ~ 1): only the summation order may differ.
            assert!(worst <= 1e-5, "{n}x{kv_n}, {heads} heads of {hd}: {worst}");
        }
        Ok(())
    }

    /// The vectorised exp against the library's on a fine grid of softmax inputs (and the
    /// scalar path, which the vectorised one must equal).
    #[test]
    fn exp_is_within_two_ulp_of_std() {
        let xs: Vec<f32> = (0..=200_000).map(|i| -100.0 + i as f32 * 5e-4).collect();
        let mut got = xs.clone();
        exp_in_place(&mut got);
        for (&x, &g) in xs.iter().zip(&got) {
            assert_eq!(g.to_bits(), exp_one(x).to_bits(), "{x}");
            let want = x.exp();
            if x < -87.0 {
                assert!(g == 0.0 && want < 1.7e-38, "{x}: {g}");
            } else {
                let ulp = (want.to_bits() as i64 - g.to_bits() as i64).abs();
                assert!(ulp <= 2, "{x}: {g} against {want} ({ulp} ulp)");
            }
        }
        let mut edge = [0.0f32, -0.0, f32::NEG_INFINITY, f32::NAN];
        exp_in_place(&mut edge);
        assert_eq!(&edge[..3], &[1.0, 1.0, 0.0]);
        assert!(edge[3].is_nan());
    }

    /// The parallel concatenation equals candle's, for parts of different row counts (one of
    /// them a narrowed view at an offset in its storage), 1-D and 2-D.
    #[test]
    fn cat_rows_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (37, 129), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (1000, 129), &dev)?;
        let c = Tensor::randn(0f32, 1.0, (3, 129), &dev)?;
        let narrowed = b.narrow(0, 5, 7)?;
        for parts in [vec![&a, &b, &c], vec![&c], vec![&a, &narrowed]] {
            let want: Vec<f32> = Tensor::cat(&parts, 0)?.flatten_all()?.to_vec1()?;
            let got = cat_rows(&parts)?;
            assert_eq!(got.dims(), Tensor::cat(&parts, 0)?.dims());
            assert_eq!(got.flatten_all()?.to_vec1::<f32>()?, want);
        }
        let v = Tensor::randn(0f32, 1.0, 70_001, &dev)?;
        let w = Tensor::randn(0f32, 1.0, 3, &dev)?;
        let want: Vec<f32> = Tensor::cat(&[&v, &w], 0)?.to_vec1()?;
        assert_eq!(cat_rows(&[&v, &w])?.to_vec1::<f32>()?, want);
        Ok(())
    }

    #[test]
    fn bf16_conversion_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        let t = Tensor::randn(0f32, 3.0, 200_001, &dev)?.to_dtype(DType::BF16)?;
        let bytes: Vec<u8> = t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect();
        let want: Vec<f32> = t.to_dtype(DType::F32)?.to_vec1()?;
        assert_eq!(bf16_bytes_to_f32(&bytes), want);
        Ok(())
    }
}
