//! Fused kernels for the decode step of the Llama/Qwen2 decoder: a single-token decode is a
//! few hundred tiny ops, each of which costs more host time to launch than GPU time to run, so
//! on CUDA the per-layer small ops run as one kernel each (`decode.cu`). Every kernel has a
//! CPU reference here, built from candle ops in Hugging Face's order, and a test comparing the
//! two on the GPU.

use candle_core::{DType, Result, Tensor, D};

pub mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
pub use cuda::{
    copy_to_f32, decode_attention, embedding, flash_attention, flash_attention_supported, matmul_t,
    prefill_rope_kv, profile_step, rope_write_kv, upload_safetensors, write, Graph, StepTable,
};

/// Without CUDA, attention takes the eager path everywhere.
#[cfg(not(feature = "cuda"))]
pub fn flash_attention_supported(
    _device: &candle_core::Device,
    _dtype: DType,
    _head_dim: usize,
) -> bool {
    false
}

/// Never called without CUDA: [`flash_attention_supported`] is false there.
#[cfg(not(feature = "cuda"))]
pub fn flash_attention(
    _q: &Tensor,
    _k: &Tensor,
    _v: &Tensor,
    _causal_start: Option<usize>,
    _scale: f32,
) -> Result<Tensor> {
    candle_core::bail!("flash attention needs a binary built with --features cuda")
}

/// Without CUDA there is no GPU time to separate from host time.
#[cfg(not(feature = "cuda"))]
pub fn profile_step<E: From<candle_core::Error>>(
    _device: &candle_core::Device,
    _step: &mut dyn FnMut() -> std::result::Result<(), E>,
) -> std::result::Result<(f64, f64), E> {
    Err(candle_core::Error::Msg(
        "profiling decode steps needs a binary built with --features cuda".into(),
    )
    .into())
}

/// The switches for comparing decode paths on one card, read from the environment once (by
/// [`DecodeOptions::from_env`], when a model loads) and passed down to what they steer; the
/// kernels themselves read no environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    /// The fused decode kernels: on unless `MMLLM_UNFUSED_DECODE` is set to something.
    pub fused: bool,
    /// A captured CUDA graph for single-sequence decode: on unless `MMLLM_CUDA_GRAPH=0`.
    pub cuda_graph: bool,
    /// The GEMV kernel for the few rows of a decode step: on unless `MMLLM_DECODE_GEMV=0`
    /// (then cuBLAS through candle's matmul).
    pub gemv: bool,
    /// Output columns per warp of the GEMV kernel: 1, or 2 with `MMLLM_GEMV_COLS=2`.
    pub gemv_cols: usize,
}

impl Default for DecodeOptions {
    /// Every switch unset: fused kernels, CUDA graph, GEMV with one column a warp.
    fn default() -> Self {
        Self {
            fused: true,
            cuda_graph: true,
            gemv: true,
            gemv_cols: 1,
        }
    }
}

impl DecodeOptions {
    /// The switches as the environment sets them now.
    pub fn from_env() -> Self {
        Self::from_lookup(&|name| std::env::var_os(name))
    }

    /// The switches as `get` (an environment lookup) sets them.
    pub fn from_lookup(get: &dyn Fn(&str) -> Option<std::ffi::OsString>) -> Self {
        let is = |name: &str, value: &str| get(name).is_some_and(|v| v == value);
        Self {
            fused: get("MMLLM_UNFUSED_DECODE").is_none_or(|v| v.is_empty()),
            cuda_graph: !is("MMLLM_CUDA_GRAPH", "0"),
            gemv: !is("MMLLM_DECODE_GEMV", "0"),
            gemv_cols: if is("MMLLM_GEMV_COLS", "2") { 2 } else { 1 },
        }
    }
}

/// `(x + residual, rms_norm(x + residual) * weight)` over the last dimension; without a
/// residual the first output is `x` itself. HF's order: the sum is rounded to the dtype, the
/// norm is taken in f32 and rounded before the weight multiplies it.
pub fn add_rms_norm(
    x: &Tensor,
    residual: Option<&Tensor>,
    weight: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda::add_rms_norm(x, residual, weight, eps);
    }
    let sum = match residual {
        Some(r) => (x + r)?,
        None => x.clone(),
    };
    let dtype = sum.dtype();
    let f = sum.to_dtype(DType::F32)?;
    let var = f.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = f.broadcast_div(&(var + eps)?.sqrt()?)?;
    let out = normed.to_dtype(dtype)?.broadcast_mul(weight)?;
    Ok((sum, out))
}

/// `silu(gate) * up` where the last dimension of `gate_up` is `[gate | up]`; the activation is
/// rounded to the dtype before the product, as HF's `act_fn(gate_proj(x)) * up_proj(x)`.
pub fn silu_mul(gate_up: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if gate_up.device().is_cuda() {
        return cuda::silu_mul(gate_up);
    }
    let inter = gate_up.dim(D::Minus1)? / 2;
    let gate = gate_up.narrow(D::Minus1, 0, inter)?;
    let up = gate_up.narrow(D::Minus1, inter, inter)?;
    candle_nn::ops::silu(&gate)? * up
}

/// Index of the largest value of `logits` `(vocab,)` f32, ties to the lowest index and a NaN
/// winning, as `torch.argmax`. On CUDA only the index crosses to the host.
pub fn argmax(logits: &Tensor) -> Result<u32> {
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        return cuda::argmax(logits);
    }
    let row: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
    Ok(argmax_slice(&row))
}

/// [`argmax`] over a host slice.
pub fn argmax_slice(values: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in values.iter().enumerate() {
        if v.is_nan() {
            return i as u32;
        }
        if v > best_v || i == 0 {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

/// `x + bias`, `bias` `(n,)` broadcast over the rows of `x` `(..., n)`: a projection's bias.
/// On CUDA one vectorised pass (candle's broadcast add indexes each element through the
/// strides, at a tenth of the bandwidth); the same bits either way.
pub fn bias_add(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && bias.rank() == 1 && bias.dtype() == x.dtype() {
        return cuda::bias_add(x, bias, None);
    }
    x.broadcast_add(bias)
}

/// `residual + l(x)`: a projection joining the residual stream. On CUDA the bias and the
/// residual add are one pass after the product (each rounded as its own add would be).
pub fn linear_residual(l: &candle_nn::Linear, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
    let y = cpu::matmul_t(x, l.weight())?;
    match l.bias() {
        #[cfg(feature = "cuda")]
        Some(b) if y.device().is_cuda() && b.rank() == 1 && b.dtype() == y.dtype() => {
            cuda::bias_add(&y, b, Some(residual))
        }
        Some(b) => residual + y.broadcast_add(b)?,
        None => residual + y,
    }
}

/// `x * sigmoid(1.702 x)`, transformers' `QuickGELUActivation` (CLIP and Qwen2-VL's vision
/// MLPs). On CUDA one kernel in f32 (candle's ops take three passes and round the constant).
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        return cuda::quick_gelu(x);
    }
    x * candle_nn::ops::sigmoid(&(x * 1.702)?)?
}

/// `rotate_half`: `[-x2, x1]` over the last dimension.
pub fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// The vision towers' rotary embedding of q and k: `qkv` `(n, 3, heads, head_dim)` from the
/// fused projection, `cos`/`sin` `(n, 1, head_dim)` f32; returns the rotated q and k
/// `(n, heads, head_dim)` in `qkv`'s dtype, computed in f32 as transformers does
/// (`x * cos + rotate_half(x) * sin`). One kernel on CUDA, with the same bits.
pub fn vision_rotary(qkv: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if qkv.device().is_cuda() {
        return cuda::vision_rotary(qkv, cos, sin);
    }
    vision_rotary_reference(qkv, cos, sin)
}

fn vision_rotary_reference(qkv: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor)> {
    let rope = |part: usize| -> Result<Tensor> {
        let t = qkv.narrow(1, part, 1)?.squeeze(1)?.to_dtype(DType::F32)?;
        (t.broadcast_mul(cos)? + rotate_half(&t)?.broadcast_mul(sin)?)?.to_dtype(qkv.dtype())
    };
    Ok((rope(0)?, rope(1)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn decode_options_read_each_switch() {
        let with = |pairs: &[(&str, &str)]| {
            let pairs: Vec<(String, String)> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            DecodeOptions::from_lookup(&move |name| {
                pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.into())
            })
        };
        assert_eq!(with(&[]), DecodeOptions::default());
        assert_eq!(
            with(&[("MMLLM_UNFUSED_DECODE", ""), ("MMLLM_CUDA_GRAPH", "1")]),
            DecodeOptions::default()
        );
        assert_eq!(
            with(&[
                ("MMLLM_UNFUSED_DECODE", "1"),
                ("MMLLM_CUDA_GRAPH", "0"),
                ("MMLLM_DECODE_GEMV", "0"),
                ("MMLLM_GEMV_COLS", "2"),
            ]),
            DecodeOptions {
                fused: false,
                cuda_graph: false,
                gemv: false,
                gemv_cols: 2,
            }
        );
        // Only the exact values switch: anything else keeps the default.
        let other = with(&[("MMLLM_DECODE_GEMV", "00"), ("MMLLM_GEMV_COLS", "3")]);
        assert_eq!(other, DecodeOptions::default());
    }

    #[test]
    fn argmax_ties_go_low_and_nan_wins() {
        assert_eq!(argmax_slice(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax_slice(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax_slice(&[1.0, f32::NAN, 5.0, f32::NAN]), 1);
    }

    #[test]
    fn add_rms_norm_reference_matches_formula() -> Result<()> {
        let x = Tensor::new(&[[1f32, -2.0, 3.0, 0.5]], &Device::Cpu)?;
        let r = Tensor::new(&[[0.5f32, 0.5, -1.0, 0.0]], &Device::Cpu)?;
        let w = Tensor::new(&[1f32, 2.0, 0.5, -1.0], &Device::Cpu)?;
        let (sum, out) = add_rms_norm(&x, Some(&r), &w, 1e-6)?;
        let s = [1.5f32, -1.5, 2.0, 0.5];
        assert_eq!(sum.to_vec2::<f32>()?[0], s);
        let rms = (s.iter().map(|v| v * v).sum::<f32>() / 4.0 + 1e-6).sqrt();
        let want: Vec<f32> = s
            .iter()
            .zip([1.0, 2.0, 0.5, -1.0])
            .map(|(v, w)| v / rms * w)
            .collect();
        for (g, w) in out.to_vec2::<f32>()?[0].iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
        Ok(())
    }

    #[test]
    fn silu_mul_reference_matches_formula() -> Result<()> {
        let gu = Tensor::new(&[[1f32, -2.0, 3.0, 0.5]], &Device::Cpu)?;
        let got = silu_mul(&gu)?.to_vec2::<f32>()?;
        let silu = |g: f32| g / (1.0 + (-g).exp());
        assert!((got[0][0] - silu(1.0) * 3.0).abs() < 1e-6);
        assert!((got[0][1] - silu(-2.0) * 0.5).abs() < 1e-6);
        Ok(())
    }

    /// Largest absolute difference between two tensors of any dtype and device, relative to
    /// the largest magnitude of the reference `a`.
    #[cfg(feature = "cuda")]
    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        let a = a
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?;
        let b = b
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?;
        let scale = a.abs()?.max(0)?.to_scalar::<f32>()?;
        Ok((a - b)?.abs()?.max(0)?.to_scalar::<f32>()? / scale)
    }

    /// The vision rotary kernel gives the same bits as the candle ops it replaces, on the
    /// same GPU, in each dtype.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_vision_rotary_equals_candle_ops() -> Result<()> {
        let gpu = Device::new_cuda(0)?;
        let (n, heads, hd) = (37, 3, 80);
        let qkv = Tensor::randn(0f32, 1.0, (n, 3, heads, hd), &gpu)?;
        let angles = Tensor::randn(0f32, 3.0, (n, 1, hd), &gpu)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let qkv = qkv.to_dtype(dtype)?;
            let (q, k) = vision_rotary(&qkv, &cos, &sin)?;
            let (q_ref, k_ref) = vision_rotary_reference(&qkv, &cos, &sin)?;
            assert_eq!(q.dims(), [n, heads, hd]);
            for (got, want) in [(q, q_ref), (k, k_ref)] {
                let got = got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let want = want.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                assert_eq!(got, want, "{dtype:?}");
            }
        }
        Ok(())
    }

    /// The bias kernel (alone, and with a residual after a projection) gives the bits of
    /// candle's adds, on the vector path (rows of 64), the scalar one (rows of 37) and a view at
    /// an odd offset; silu_mul and the quick GELU kernel follow the f32 formulas within the
    /// dtype's rounding.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_bias_add_and_quick_gelu_follow_candle_ops() -> Result<()> {
        let gpu = Device::new_cuda(0)?;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for (rows, n, offset) in [(33, 64, 0), (5, 37, 0), (9, 64, 3)] {
                let all = Tensor::randn(0f32, 2.0, rows * n + offset, &gpu)?.to_dtype(dtype)?;
                let x = all.narrow(0, offset, rows * n)?.reshape((rows, n))?;
                let bias = Tensor::randn(0f32, 1.0, n, &gpu)?.to_dtype(dtype)?;
                let got = bias_add(&x, &bias)?
                    .to_dtype(DType::F32)?
                    .to_vec2::<f32>()?;
                let want = x
                    .broadcast_add(&bias)?
                    .to_dtype(DType::F32)?
                    .to_vec2::<f32>()?;
                assert_eq!(got, want, "bias_add {dtype:?} {rows}x{n}+{offset}");

                let residual = Tensor::randn(0f32, 1.0, (rows, n), &gpu)?.to_dtype(dtype)?;
                let w = Tensor::randn(0f32, 0.3, (n, 24), &gpu)?.to_dtype(dtype)?;
                let input = Tensor::randn(0f32, 1.0, (rows, 24), &gpu)?.to_dtype(dtype)?;
                let l = candle_nn::Linear::new(w.clone(), Some(bias.clone()));
                let got = linear_residual(&l, &input, &residual)?;
                let product =
                    candle_core::Module::forward(&candle_nn::Linear::new(w, None), &input)?;
                let want = (&residual + product.broadcast_add(&bias)?)?;
                let flat = |t: Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
                assert_eq!(
                    flat(got)?,
                    flat(want)?,
                    "linear_residual {dtype:?} {rows}x{n}"
                );

                // silu_mul's vector (n = 64) and scalar (n = 37) paths.
                let gate_up = Tensor::cat(&[&x, &x.affine(0.5, 0.1)?], 1)?;
                let got = silu_mul(&gate_up)?;
                let f = gate_up.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                let want = silu_mul(&f)?;
                let diff = max_diff(&want, &got)?;
                assert!(diff < 1e-2, "silu_mul {dtype:?} {rows}x{n}: {diff}");

                let got = quick_gelu(&x)?;
                let f = x.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                let want = (&f * candle_nn::ops::sigmoid(&(&f * 1.702)?)?)?;
                let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
                let diff = max_diff(&want, &got)?;
                assert!(
                    diff < tol,
                    "quick_gelu {dtype:?} {rows}x{n}+{offset}: {diff}"
                );
            }
        }
        Ok(())
    }

    /// The prefill kernel (bias, rope, cache write) gives the bits of HF's order of operations
    /// in f16 and bf16 (f32 within an ulp): q `(1, heads, t, hd)`, and the cache rows `start..start + t` of k and v with
    /// the rows around them untouched.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_prefill_rope_kv_equals_candle_ops() -> Result<()> {
        let gpu = Device::new_cuda(0)?;
        let (heads, kv, hd, t, start, cap) = (4, 2, 64, 7, 5, 16);
        let width = (heads + 2 * kv) * hd;
        let qkv = Tensor::randn(0f32, 1.0, (1, t, width), &gpu)?;
        let bias = Tensor::randn(0f32, 1.0, width, &gpu)?;
        let angles = Tensor::randn(0f32, 3.0, (t, hd / 2), &gpu)?;
        let cache = Tensor::randn(0f32, 1.0, (1, kv, cap, hd), &gpu)?;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let (cos, sin) = (
                angles.cos()?.to_dtype(dtype)?,
                angles.sin()?.to_dtype(dtype)?,
            );
            for bias in [None, Some(bias.to_dtype(dtype)?)] {
                let qkv = qkv.to_dtype(dtype)?;
                let fresh = || -> Result<(Tensor, Tensor)> {
                    Ok((cache.to_dtype(dtype)?, (cache.to_dtype(dtype)? * 0.5)?))
                };
                let (k_got, v_got) = fresh()?;
                let q_got = prefill_rope_kv(
                    &qkv,
                    bias.as_ref(),
                    &cos,
                    &sin,
                    &k_got,
                    &v_got,
                    start,
                    heads,
                )?;

                let biased = match &bias {
                    Some(b) => qkv.broadcast_add(b)?,
                    None => qkv.clone(),
                };
                let part = |from: usize, n: usize| -> Result<Tensor> {
                    biased
                        .narrow(2, from * hd, n * hd)?
                        .reshape((1, t, n, hd))?
                        .transpose(1, 2)?
                        .contiguous()
                };
                // HF's `x * cos + rotate_half(x) * sin`, each product rounded to the dtype.
                let (cos2, sin2) = (
                    Tensor::cat(&[&cos, &cos], 1)?,
                    Tensor::cat(&[&sin, &sin], 1)?,
                );
                let rope = |x: Tensor| -> Result<Tensor> {
                    x.broadcast_mul(&cos2)? + rotate_half(&x)?.broadcast_mul(&sin2)?
                };
                let q_want = rope(part(0, heads)?)?;
                let k_new = rope(part(heads, kv)?)?;
                let (k_want, v_want) = fresh()?;
                k_want.slice_set(&k_new, 2, start)?;
                v_want.slice_set(&part(heads + kv, kv)?, 2, start)?;
                for (name, got, want) in [
                    ("q", q_got, q_want),
                    ("k", k_got, k_want),
                    ("v", v_got, v_want),
                ] {
                    let case = format!("{name} {dtype:?} bias {}", bias.is_some());
                    if dtype == DType::F32 {
                        // f32 products and sums may be contracted to fma differently.
                        let diff = max_diff(&want, &got)?;
                        assert!(diff < 1e-6, "{case}: {diff}");
                    } else {
                        let flat =
                            |x: Tensor| x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
                        assert_eq!(flat(got)?, flat(want)?, "{case}");
                    }
                }
            }
        }
        Ok(())
    }

    /// Softmax attention in f32 on the CPU, keys and values repeated for grouped heads:
    /// `(b, t, heads, hd)`, as [`flash_attention`] returns it.
    #[cfg(feature = "cuda")]
    fn attention_reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        causal_start: Option<usize>,
        scale: f64,
    ) -> Result<Tensor> {
        let f = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
        let (q, k, v) = (f(q)?, f(k)?, f(v)?);
        let (b, heads, t, hd) = q.dims4()?;
        let (_, kv, s, _) = k.dims4()?;
        let repeat = |x: Tensor| {
            x.unsqueeze(2)?
                .expand((b, kv, heads / kv, s, hd))?
                .reshape((b, heads, s, hd))
        };
        let (k, v) = (repeat(k)?, repeat(v)?);
        let mut scores = (q.contiguous()?.matmul(&k.t()?)? * scale)?;
        if let Some(start) = causal_start {
            let mask: Vec<f32> = (0..t)
                .flat_map(|i| {
                    (0..s).map(move |j| {
                        if j > start + i {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                })
                .collect();
            scores = scores.broadcast_add(&Tensor::from_vec(mask, (t, s), &Device::Cpu)?)?;
        }
        candle_nn::ops::softmax_last_dim(&scores)?
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()
    }

    /// The flash attention kernel against the f32 reference on random inputs: every head size
    /// it is built for, grouped heads, causal with and without cached positions, one query
    /// (decode), bidirectional, several query and key tiles, batches, and strided views (q
    /// straight from a `(b, t, heads, hd)` projection, k and v from a longer cache).
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_flash_attention_matches_f32_reference() -> Result<()> {
        let gpu = Device::new_cuda(0)?;
        // (batch, heads, kv heads, head_dim, t, s, causal start)
        let cases = [
            (1, 4, 2, 64, 37, 37, Some(0)),
            (1, 4, 4, 128, 37, 57, Some(20)),
            (2, 6, 2, 80, 1, 70, None),
            (1, 4, 4, 96, 130, 130, None),
            (2, 8, 2, 128, 200, 203, Some(3)),
            (1, 3, 1, 64, 129, 129, Some(0)),
            (1, 16, 16, 80, 1024, 1024, None),
        ];
        for (dtype, tol) in [(DType::BF16, 1e-2), (DType::F16, 2e-3)] {
            for &(b, heads, kv, hd, t, s, causal) in &cases {
                let scale = (hd as f64).powf(-0.5);
                let q = Tensor::randn(0f32, 1.0, (b, t, heads, hd), &gpu)?
                    .to_dtype(dtype)?
                    .transpose(1, 2)?;
                let cache = |seed: f32| -> Result<Tensor> {
                    Tensor::randn(seed, 1.0, (b, kv, s + 5, hd), &gpu)?
                        .to_dtype(dtype)?
                        .narrow(2, 0, s)
                };
                let (k, v) = (cache(0.0)?, cache(0.5)?);
                let got = flash_attention(&q, &k, &v, causal, scale as f32)?;
                assert_eq!(got.dims(), [b, t, heads, hd]);
                let want = attention_reference(&q, &k, &v, causal, scale)?;
                let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                let err = ((&got - &want)?
                    .sqr()?
                    .sum_all()?
                    .sqrt()?
                    .to_scalar::<f32>()?)
                    / want.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
                let case = format!("{dtype:?} b{b} h{heads}/{kv} d{hd} t{t} s{s} {causal:?}");
                assert!(
                    err.is_finite() && err <= tol,
                    "{case}: relative error {err}"
                );
            }
        }
        Ok(())
    }

    /// Each CUDA kernel against its CPU reference, in f32 (to rounding) and bf16 (to a few
    /// bf16 steps: the CPU reference rounds after every op, the kernels once).
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_kernels_match_cpu_references() -> Result<()> {
        let gpu = Device::new_cuda(0)?;
        let cases: Vec<Vec<f32>> = vec![
            vec![1.0, 3.0, 3.0, 2.0],
            vec![f32::NEG_INFINITY; 3],
            vec![1.0, f32::NAN, 5.0, f32::NAN],
            (0..50_000).map(|i| ((i * 7919) % 1000) as f32).collect(),
        ];
        for v in cases {
            assert_eq!(argmax(&Tensor::new(v.as_slice(), &gpu)?)?, argmax_slice(&v));
        }
        let cpu = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 300), &cpu)?;
        let r = Tensor::randn(0f32, 1.0, (3, 300), &cpu)?;
        let w = Tensor::randn(1f32, 0.2, 300, &cpu)?;
        let gu = Tensor::randn(0f32, 2.0, (3, 2, 200), &cpu)?.reshape((3, 400))?;
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            let on = |t: &Tensor, d: &Device| t.to_dtype(dtype)?.to_device(d);
            let (sum_c, norm_c) =
                add_rms_norm(&on(&x, &cpu)?, Some(&on(&r, &cpu)?), &on(&w, &cpu)?, 1e-5)?;
            let (sum_g, norm_g) =
                add_rms_norm(&on(&x, &gpu)?, Some(&on(&r, &gpu)?), &on(&w, &gpu)?, 1e-5)?;
            assert!(max_diff(&sum_c, &sum_g)? <= tol, "{dtype:?} sum");
            assert!(max_diff(&norm_c, &norm_g)? <= tol, "{dtype:?} norm");
            let (_, plain_c) = add_rms_norm(&on(&x, &cpu)?, None, &on(&w, &cpu)?, 1e-5)?;
            let (_, plain_g) = add_rms_norm(&on(&x, &gpu)?, None, &on(&w, &gpu)?, 1e-5)?;
            assert!(
                max_diff(&plain_c, &plain_g)? <= tol,
                "{dtype:?} norm without residual"
            );
            for rows in [1, 3, 8, 9] {
                let x = Tensor::randn(0f32, 1.0, (rows, 264), &cpu)?;
                // An odd column count exercises the last warp's tail with two columns a warp.
                let w = Tensor::randn(0f32, 1.0, (71, 264), &cpu)?;
                let want = on(&x, &cpu)?.matmul(&on(&w, &cpu)?.t()?)?;
                for cols in [1, 2] {
                    let opts = DecodeOptions {
                        gemv_cols: cols,
                        ..DecodeOptions::default()
                    };
                    let got = matmul_t(&on(&x, &gpu)?, &on(&w, &gpu)?, &opts)?;
                    assert_eq!(got.dims(), [rows, 71]);
                    let diff = max_diff(&want, &got)?;
                    assert!(
                        diff <= tol,
                        "{dtype:?} matmul_t, {rows} rows, {cols} cols: {diff}"
                    );
                }
            }
            let act_c = silu_mul(&on(&gu, &cpu)?)?;
            let act_g = silu_mul(&on(&gu, &gpu)?)?;
            assert_eq!(act_g.dims(), [3, 200]);
            assert!(max_diff(&act_c, &act_g)? <= tol, "{dtype:?} silu_mul");
        }
        Ok(())
    }
}
