//! Launching the kernels of `decode.cu` (PTX built by build.rs) on candle's CUDA stream.

use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::cuda_backend::cudarc::driver::{
    DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::op::BackpropOp;
use candle_core::{bail, DType, Device, Result, Shape, Storage, Tensor};

use super::DecodeOptions;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode.ptx"));
const MODULE: &str = "mmllm_decode";
const FLASH_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attention.ptx"));
const FLASH_MODULE: &str = "mmllm_flash_attention";

fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        other => bail!("expected a CUDA tensor, got one on {other:?}"),
    }
}

/// The kernel of `names` (its f32, f16 and bf16 instances) for `dtype`.
fn kernel(names: [&'static str; 3], dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => names[0],
        DType::F16 => names[1],
        DType::BF16 => names[2],
        other => bail!("fused decode kernels support f32, f16 and bf16, not {other:?}"),
    })
}

macro_rules! instances {
    ($name:literal) => {
        [
            concat!($name, "_f32"),
            concat!($name, "_f16"),
            concat!($name, "_bf16"),
        ]
    };
}

/// Device address of the first element of `t`, which must be contiguous. The caller keeps
/// `t` alive while a kernel uses the address.
fn ptr(t: &Tensor) -> Result<u64> {
    if !t.layout().is_contiguous() {
        bail!(
            "fused kernel input of shape {:?} is not contiguous",
            t.dims()
        );
    }
    address(t)
}

/// Device address of the first element of `t`'s view, whatever its strides.
fn address(t: &Tensor) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        bail!("fused kernel input is not on a CUDA device");
    };
    let stream = cs.device.cuda_stream();
    let base = match &cs.slice {
        CudaStorageSlice::F32(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::F16(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::BF16(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::U32(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::I64(s) => s.device_ptr(&stream).0,
        _ => bail!(
            "fused kernel input has an unsupported dtype {:?}",
            t.dtype()
        ),
    };
    Ok(base + (layout.start_offset() * t.dtype().size_in_bytes()) as u64)
}

/// An uninitialised tensor of `shape` (every element is written by the kernel that fills it).
fn alloc(dev: &CudaDevice, dtype: DType, shape: impl Into<Shape>) -> Result<Tensor> {
    let shape = shape.into();
    let n = shape.elem_count();
    // SAFETY: the kernels write every element before anything reads the tensor.
    let storage = unsafe {
        match dtype {
            DType::F32 => CudaStorage::wrap_cuda_slice(dev.alloc::<f32>(n)?, dev.clone()),
            DType::F16 => CudaStorage::wrap_cuda_slice(dev.alloc::<half::f16>(n)?, dev.clone()),
            DType::BF16 => CudaStorage::wrap_cuda_slice(dev.alloc::<half::bf16>(n)?, dev.clone()),
            DType::U32 => CudaStorage::wrap_cuda_slice(dev.alloc::<u32>(n)?, dev.clone()),
            other => bail!("cannot allocate {other:?} for a fused kernel"),
        }
    };
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        shape,
        BackpropOp::none(),
        false,
    ))
}

macro_rules! launch {
    ($dev:expr, $name:expr, $cfg:expr, $($arg:expr),* $(,)?) => {
        launch!(@module MODULE, PTX, $dev, $name, $cfg, $($arg),*)
    };
    (@module $module:expr, $ptx:expr, $dev:expr, $name:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let func = $dev.get_or_load_custom_func($name, $module, $ptx)?;
        let mut builder = func.builder();
        $(builder.arg($arg);)*
        // SAFETY: the argument list matches the kernel's signature in decode.cu, and every
        // pointer refers to a live tensor of the size the kernel indexes.
        unsafe { builder.launch($cfg) }.map_err(candle_core::Error::wrap)?;
    }};
}

fn threads_for(n: usize) -> u32 {
    (n.div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// Launch shape of the elementwise kernels, whose threads stride over `n` elements.
fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 65535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub fn add_rms_norm(
    x: &Tensor,
    residual: Option<&Tensor>,
    weight: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let dev = cuda_device(x)?;
    let n = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / n;
    let x = x.contiguous()?;
    let norm = alloc(&dev, x.dtype(), x.shape())?;
    let (sum, residual_ptr, sum_ptr) = match residual {
        Some(r) => {
            let r = r.contiguous()?;
            let sum = alloc(&dev, x.dtype(), x.shape())?;
            let (rp, sp) = (ptr(&r)?, ptr(&sum)?);
            (sum, rp, sp)
        }
        None => (x.clone(), 0u64, 0u64),
    };
    let (xp, wp, np) = (ptr(&x)?, ptr(weight)?, ptr(&norm)?);
    let (n32, eps32) = (n as i32, eps as f32);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads_for(n), 1, 1),
        shared_mem_bytes: 0,
    };
    let name = kernel(instances!("add_rms_norm"), x.dtype())?;
    launch!(
        dev,
        name,
        cfg,
        &xp,
        &residual_ptr,
        &wp,
        &sum_ptr,
        &np,
        &n32,
        &eps32
    );
    Ok((sum, norm))
}

pub fn silu_mul(gate_up: &Tensor) -> Result<Tensor> {
    let dev = cuda_device(gate_up)?;
    let gate_up = gate_up.contiguous()?;
    let mut dims = gate_up.dims().to_vec();
    let last = dims.len() - 1;
    let inter = dims[last] / 2;
    dims[last] = inter;
    let rows = gate_up.elem_count() / (2 * inter);
    let out = alloc(&dev, gate_up.dtype(), dims)?;
    let (gp, op) = (ptr(&gate_up)?, ptr(&out)?);
    let (rows32, inter32) = (rows as i32, inter as i32);
    let (name, per) = vectorised(
        instances!("silu_mul"),
        instances!("silu_mul_vec"),
        &gate_up,
        inter,
    )?;
    launch!(
        dev,
        name,
        elementwise(rows * inter / per),
        &gp,
        &op,
        &rows32,
        &inter32
    );
    Ok(out)
}

/// Name and elements per thread of an elementwise kernel over `t` (contiguous): the 16-byte
/// vector instance when `n` (a row, or the whole tensor) and the address allow it.
fn vectorised(
    base: [&'static str; 3],
    vec: [&'static str; 3],
    t: &Tensor,
    n: usize,
) -> Result<(&'static str, usize)> {
    let per = 16 / t.dtype().size_in_bytes();
    if n.is_multiple_of(per) && address(t)?.is_multiple_of(16) {
        Ok((kernel(vec, t.dtype())?, per))
    } else {
        Ok((kernel(base, t.dtype())?, 1))
    }
}

pub fn bias_add(x: &Tensor, bias: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
    let dev = cuda_device(x)?;
    let x = x.contiguous()?;
    let n = bias.elem_count();
    let residual = residual.map(|r| r.contiguous()).transpose()?;
    let residual_fits = residual
        .as_ref()
        .is_none_or(|r| r.dims() == x.dims() && r.dtype() == x.dtype());
    if x.dim(candle_core::D::Minus1)? != n || bias.dtype() != x.dtype() || !residual_fits {
        bail!(
            "bias_add: x {:?} {:?}, bias {:?} {:?}",
            x.dims(),
            x.dtype(),
            bias.dims(),
            bias.dtype()
        );
    }
    let bias = bias.contiguous()?;
    let out = alloc(&dev, x.dtype(), x.shape())?;
    let total = x.elem_count();
    let (name, per) = vectorised(instances!("bias_add"), instances!("bias_add_vec"), &x, n)?;
    // The bias's and the residual's addresses must allow the vector loads too.
    let aligned = |t: Option<&Tensor>| -> Result<bool> {
        Ok(t.map(address)
            .transpose()?
            .is_none_or(|a| a.is_multiple_of(16)))
    };
    let (name, per) = if per > 1 && !(aligned(Some(&bias))? && aligned(residual.as_ref())?) {
        (kernel(instances!("bias_add"), x.dtype())?, 1)
    } else {
        (name, per)
    };
    let rp = residual.as_ref().map(ptr).transpose()?.unwrap_or(0);
    let (xp, bp, op) = (ptr(&x)?, ptr(&bias)?, ptr(&out)?);
    let (total64, n32) = (total as u64, n as i32);
    launch!(
        dev,
        name,
        elementwise(total / per),
        &xp,
        &bp,
        &rp,
        &op,
        &total64,
        &n32
    );
    Ok(out)
}

pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    let dev = cuda_device(x)?;
    let x = x.contiguous()?;
    let out = alloc(&dev, x.dtype(), x.shape())?;
    let total = x.elem_count();
    let (name, per) = vectorised(
        instances!("quick_gelu"),
        instances!("quick_gelu_vec"),
        &x,
        total,
    )?;
    let (xp, op, total64) = (ptr(&x)?, ptr(&out)?, total as u64);
    launch!(dev, name, elementwise(total / per), &xp, &op, &total64);
    Ok(out)
}

/// [`super::prefill_rope_kv`] in one kernel.
#[allow(clippy::too_many_arguments)]
pub fn prefill_rope_kv(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    cos: &Tensor,
    sin: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    start: usize,
    heads: usize,
) -> Result<Tensor> {
    let dev = cuda_device(qkv)?;
    let qkv = qkv.contiguous()?;
    let (_, kv_heads, cap, head_dim) = k_cache.dims4()?;
    let half = head_dim / 2;
    let t = qkv.elem_count() / ((heads + 2 * kv_heads) * head_dim).max(1);
    let dtype = qkv.dtype();
    let fits = qkv.dims().last() == Some(&((heads + 2 * kv_heads) * head_dim))
        && t > 0
        && start + t <= cap
        && cos.dims() == [t, half]
        && sin.dims() == [t, half]
        && v_cache.dims() == k_cache.dims()
        && k_cache.dim(0)? == 1
        && [cos.dtype(), sin.dtype(), k_cache.dtype(), v_cache.dtype()]
            .iter()
            .all(|&d| d == dtype)
        && bias
            .is_none_or(|b| b.dims() == [(heads + 2 * kv_heads) * head_dim] && b.dtype() == dtype);
    if !fits {
        bail!(
            "prefill_rope_kv: qkv {:?}, cos {:?}, cache {:?} at {start}",
            qkv.dims(),
            cos.dims(),
            k_cache.dims()
        );
    }
    let q = alloc(&dev, dtype, (1, heads, t, head_dim))?;
    let bias_ptr = match bias {
        Some(b) => ptr(b)?,
        None => 0,
    };
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    let ptrs = [
        ptr(&qkv)?,
        bias_ptr,
        ptr(&cos)?,
        ptr(&sin)?,
        ptr(&q)?,
        ptr(k_cache)?,
        ptr(v_cache)?,
    ];
    let ints = [
        t as i32,
        start as i32,
        cap as i32,
        heads as i32,
        kv_heads as i32,
        head_dim as i32,
    ];
    let cfg = LaunchConfig {
        grid_dim: (t as u32, 1, 1),
        block_dim: (threads_for((heads + kv_heads) * half).min(256), 1, 1),
        shared_mem_bytes: 0,
    };
    let name = kernel(instances!("prefill_rope_kv"), dtype)?;
    launch!(
        dev, name, cfg, &ptrs[0], &ptrs[1], &ptrs[2], &ptrs[3], &ptrs[4], &ptrs[5], &ptrs[6],
        &ints[0], &ints[1], &ints[2], &ints[3], &ints[4], &ints[5]
    );
    Ok(q)
}

pub fn argmax(logits: &Tensor) -> Result<u32> {
    let dev = cuda_device(logits)?;
    let logits = logits.to_dtype(DType::F32)?.contiguous()?;
    let n = logits.elem_count();
    let out = alloc(&dev, DType::U32, 1)?;
    let (lp, op, n32) = (ptr(&logits)?, ptr(&out)?, n as i32);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(dev, "argmax_f32", cfg, &lp, &op, &n32);
    out.to_vec1::<u32>().map(|v| v[0])
}

/// The per-step table the attention kernels read (layout in decode.cu): each row's rotary
/// position, cache slot and capacity, and every layer's key/value cache address.
pub struct StepTable {
    table: Tensor,
    rows: usize,
    /// How many blocks split each row's keys in the attention kernel.
    splits: usize,
}

/// Keys per attention block when the split count follows the cache length (eager steps).
const KEYS_PER_SPLIT: usize = 32;

impl StepTable {
    /// The table's values. `positions[r]`: rotary position of row `r`'s new token;
    /// `slots[r]`, `capacities[r]`: its cache length before the step and capacity;
    /// `layers[l][r]`: layer `l`'s key and value caches `(1, kv_heads, capacity, head_dim)`
    /// of row `r`.
    pub fn values(
        positions: &[i64],
        slots: &[usize],
        capacities: &[usize],
        layers: &[Vec<(&Tensor, &Tensor)>],
    ) -> Result<Vec<i64>> {
        let rows = positions.len();
        let mut host = Vec::with_capacity(3 * rows + 2 * rows * layers.len());
        host.extend_from_slice(positions);
        host.extend(slots.iter().map(|&s| s as i64));
        host.extend(capacities.iter().map(|&c| c as i64));
        for layer in layers {
            for (k, v) in layer {
                host.push(ptr(k)? as i64);
                host.push(ptr(v)? as i64);
            }
        }
        Ok(host)
    }

    /// A table of [`StepTable::values`] for `rows` rows uploaded for one step, whose longest
    /// cache holds `longest` positions after it: keys split about every `KEYS_PER_SPLIT`.
    pub fn upload(device: &Device, values: &[i64], rows: usize, longest: usize) -> Result<Self> {
        Ok(Self {
            table: Tensor::new(values, device)?,
            rows,
            splits: longest.div_ceil(KEYS_PER_SPLIT).clamp(1, 256),
        })
    }

    /// A table in `table` (int64, filled with [`write`] before each use) with a fixed split
    /// count: what a captured graph reads, whatever the cache lengths of later steps.
    pub fn persistent(table: &Tensor, rows: usize, splits: usize) -> Self {
        Self {
            table: table.clone(),
            rows,
            splits,
        }
    }

    fn address(&self) -> Result<u64> {
        ptr(&self.table)
    }
}

/// Copies `values` from the host into the start of the contiguous tensor `dst`, in stream
/// order (what a captured graph reads is written this way before each launch).
pub fn write<T: candle_core::WithDType>(dst: &Tensor, values: &[T]) -> Result<()> {
    if dst.dtype() != T::DTYPE || dst.elem_count() < values.len() {
        bail!(
            "write: {} {:?} values into {:?} of {:?}",
            values.len(),
            T::DTYPE,
            dst.dims(),
            dst.dtype()
        );
    }
    let dev = cuda_device(dst)?;
    let stream = dev.cuda_stream();
    // SAFETY: `dst` is a live device tensor at least as long as `values`; a copy from pageable
    // host memory is staged before the call returns, so `values` may be dropped after it.
    unsafe {
        candle_core::cuda_backend::cudarc::driver::result::memcpy_htod_async(
            ptr(dst)?,
            values,
            stream.cu_stream(),
        )
    }
    .map_err(candle_core::Error::wrap)
}

/// Token embeddings `(rows, hidden)` of the ids in the device tensor `ids` (u32).
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let dev = cuda_device(table)?;
    let (_, hidden) = table.dims2()?;
    let rows = ids.elem_count();
    let out = alloc(&dev, table.dtype(), (rows, hidden))?;
    let (tp, ip, op) = (ptr(table)?, ptr(ids)?, ptr(&out)?);
    let dims = [rows as i32, hidden as i32];
    let name = kernel(instances!("embedding"), table.dtype())?;
    launch!(
        dev,
        name,
        elementwise(rows * hidden),
        &tp,
        &ip,
        &op,
        &dims[0],
        &dims[1]
    );
    Ok(out)
}

/// Writes `src` converted to f32 into the existing f32 tensor `dst` of the same size.
pub fn copy_to_f32(src: &Tensor, dst: &Tensor) -> Result<()> {
    let dev = cuda_device(src)?;
    let n = src.elem_count();
    if dst.dtype() != DType::F32 || dst.elem_count() != n {
        bail!(
            "copy_to_f32: {:?} into {:?} {:?}",
            src.dims(),
            dst.dims(),
            dst.dtype()
        );
    }
    let src = src.contiguous()?;
    let (sp, dp, n32) = (ptr(&src)?, ptr(dst)?, n as i32);
    let name = kernel(instances!("copy_to_f32"), src.dtype())?;
    launch!(dev, name, elementwise(n), &sp, &dp, &n32);
    Ok(())
}

/// A captured CUDA graph: one launch replays every kernel `body` enqueued.
pub struct Graph(candle_core::cuda_backend::cudarc::driver::CudaGraph);

// SAFETY: a graph may be used from any thread as long as calls on it are serialised; its
// owner keeps it behind a mutex.
unsafe impl Send for Graph {}

impl Graph {
    /// Captures what `body` enqueues on the device's stream (nothing runs). `body` must not
    /// copy between host and device or wait on the GPU, and every tensor it allocates must
    /// be dropped before it returns (the graph then owns that memory).
    pub fn capture<E: From<candle_core::Error>>(
        device: &Device,
        body: &mut dyn FnMut() -> std::result::Result<(), E>,
    ) -> std::result::Result<Self, E> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let Device::Cuda(dev) = device else {
            return Err(candle_core::Error::Msg("graph capture needs a CUDA device".into()).into());
        };
        let stream = dev.cuda_stream();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(candle_core::Error::wrap)?;
        let captured = body();
        // End the capture whatever happened, so the stream is usable again.
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        captured?;
        let graph = graph
            .map_err(candle_core::Error::wrap)?
            .ok_or_else(|| candle_core::Error::Msg("captured an empty graph".into()))?;
        graph.upload().map_err(candle_core::Error::wrap)?;
        Ok(Self(graph))
    }

    pub fn launch(&self) -> Result<()> {
        self.0.launch().map_err(candle_core::Error::wrap)
    }
}

/// Adds the q/k/v bias, rotates q and k and writes k, v into the caches of layer `layer` at
/// each row's slot. `qkv` is `(rows, (heads + 2 kv_heads) head_dim)`; returns q
/// `(rows, heads, head_dim)`.
#[allow(clippy::too_many_arguments)]
pub fn rope_write_kv(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    inv_freq: &Tensor,
    table: &StepTable,
    layer: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<Tensor> {
    let dev = cuda_device(qkv)?;
    let qkv = qkv.contiguous()?;
    let rows = table.rows;
    if qkv.dims() != [rows, (heads + 2 * kv_heads) * head_dim] {
        bail!(
            "rope_write_kv: qkv of shape {:?} for {rows} rows",
            qkv.dims()
        );
    }
    let q = alloc(&dev, qkv.dtype(), (rows, heads, head_dim))?;
    let bias_ptr = match bias {
        Some(b) => ptr(b)?,
        None => 0,
    };
    let (qkvp, fp, tp, qp) = (ptr(&qkv)?, ptr(inv_freq)?, table.address()?, ptr(&q)?);
    let args = [rows as i32, layer as i32];
    let dims = [heads as i32, kv_heads as i32, head_dim as i32];
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, (heads + kv_heads) as u32, 1),
        block_dim: (threads_for(head_dim / 2), 1, 1),
        shared_mem_bytes: 0,
    };
    let name = kernel(instances!("rope_write_kv"), qkv.dtype())?;
    launch!(
        dev, name, cfg, &qkvp, &bias_ptr, &fp, &tp, &args[0], &args[1], &qp, &dims[0], &dims[1],
        &dims[2]
    );
    Ok(q)
}

/// Attention of each row's query `(rows, heads, head_dim)` over its layer-`layer` cache up to
/// and including the slot just written; returns `(rows, heads * head_dim)`. The keys are
/// split over blocks (about `KEYS_PER_SPLIT` each) whose partial softmaxes a second kernel
/// merges, so that a long cache is read by many SMs at once.
pub fn decode_attention(
    q: &Tensor,
    table: &StepTable,
    layer: usize,
    kv_heads: usize,
) -> Result<Tensor> {
    const THREADS: u32 = 128; // ATT_WARPS warps in decode.cu
    let dev = cuda_device(q)?;
    let (rows, heads, head_dim) = q.dims3()?;
    if head_dim > 256 || rows != table.rows {
        bail!("decode_attention: q of shape {:?}", q.dims());
    }
    let splits = table.splits;
    let part = alloc(&dev, DType::F32, rows * heads * splits * (2 + head_dim))?;
    let out = alloc(&dev, q.dtype(), (rows, heads * head_dim))?;
    let (qp, tp, pp, op) = (ptr(q)?, table.address()?, ptr(&part)?, ptr(&out)?);
    let args = [rows as i32, layer as i32];
    let dims = [
        heads as i32,
        kv_heads as i32,
        head_dim as i32,
        splits as i32,
    ];
    let scale = (head_dim as f32).powf(-0.5);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, heads as u32, splits as u32),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let name = kernel(instances!("decode_attention_split"), q.dtype())?;
    launch!(
        dev, name, cfg, &qp, &tp, &args[0], &args[1], &pp, &dims[0], &dims[1], &dims[2], &scale
    );
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, heads as u32, 1),
        block_dim: (threads_for(head_dim), 1, 1),
        shared_mem_bytes: 0,
    };
    let name = kernel(instances!("decode_attention_combine"), q.dtype())?;
    launch!(dev, name, cfg, &pp, &op, &dims[0], &dims[2], &dims[3]);
    Ok(out)
}

/// `x (rows, k) @ w (n, k)^T` for the few rows of a decode step, with the GEMV kernel of
/// `opts.gemv_cols` (1 or 2) output columns per warp when it applies (rows <= 8, contiguous,
/// 16-byte aligned rows, and `opts.gemv` on), else candle's matmul (cuBLAS).
pub fn matmul_t(x: &Tensor, w: &Tensor, opts: &DecodeOptions) -> Result<Tensor> {
    const GEMV: [[[&str; 3]; 8]; 2] = [
        [
            instances!("gemv1"),
            instances!("gemv2"),
            instances!("gemv3"),
            instances!("gemv4"),
            instances!("gemv5"),
            instances!("gemv6"),
            instances!("gemv7"),
            instances!("gemv8"),
        ],
        [
            instances!("gemv1c2"),
            instances!("gemv2c2"),
            instances!("gemv3c2"),
            instances!("gemv4c2"),
            instances!("gemv5c2"),
            instances!("gemv6c2"),
            instances!("gemv7c2"),
            instances!("gemv8c2"),
        ],
    ];
    const WARPS: usize = 4; // GEMV_WARPS in decode.cu
    let cols = opts.gemv_cols;
    let (rows, k) = x.dims2()?;
    let (n, k2) = w.dims2()?;
    let vec = 16 / x.dtype().size_in_bytes();
    let eligible = opts.gemv
        && (1..=2).contains(&cols)
        && (1..=GEMV[0].len()).contains(&rows)
        && k == k2
        && k % vec == 0
        && x.dtype() == w.dtype()
        && x.is_contiguous()
        && w.is_contiguous()
        && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16);
    if !eligible {
        return x.matmul(&w.t()?);
    }
    let (xp, wp) = (ptr(x)?, ptr(w)?);
    if xp % 16 != 0 || wp % 16 != 0 {
        return x.matmul(&w.t()?);
    }
    let dev = cuda_device(x)?;
    let y = alloc(&dev, x.dtype(), (rows, n))?;
    let yp = ptr(&y)?;
    let dims = [n as i32, k as i32];
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(WARPS * cols) as u32, 1, 1),
        block_dim: (32 * WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let name = kernel(GEMV[cols - 1][rows - 1], x.dtype())?;
    launch!(dev, name, cfg, &xp, &wp, &yp, &dims[0], &dims[1]);
    Ok(y)
}

/// Times one call of `step` (which enqueues GPU work without waiting for it) two ways:
/// the host seconds it takes to enqueue while a spinning kernel holds the GPU (so the queue
/// cannot drain and nothing waits on the GPU), and the GPU seconds the queued work then takes
/// back to back. Returns `(host_s, gpu_s)`.
pub fn profile_step<E: From<candle_core::Error>>(
    device: &Device,
    step: &mut dyn FnMut() -> std::result::Result<(), E>,
) -> std::result::Result<(f64, f64), E> {
    let Device::Cuda(dev) = device else {
        return Err(candle_core::Error::Msg("profiling needs --device cuda".into()).into());
    };
    let stream = dev.cuda_stream();
    // ~50 ms at H100 clocks: far longer than enqueueing one step takes.
    let cycles: i64 = 100_000_000;
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(dev, "spin", cfg, &cycles);
    // Timing events (cudarc's default flags disable timing).
    let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let start = stream
        .record_event(timing)
        .map_err(candle_core::Error::wrap)?;
    let t0 = std::time::Instant::now();
    step()?;
    let host = t0.elapsed().as_secs_f64();
    let end = stream
        .record_event(timing)
        .map_err(candle_core::Error::wrap)?;
    end.synchronize().map_err(candle_core::Error::wrap)?;
    let gpu_ms = start.elapsed_ms(&end).map_err(candle_core::Error::wrap)?;
    Ok((host, gpu_ms as f64 / 1e3))
}

/// Element strides (batch, head, row) of q, k, v and out: `struct Strides` in
/// flash_attention.cu, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
struct FlashStrides([i64; 12]);

// SAFETY: plain data with the layout of the kernel's parameter struct.
unsafe impl DeviceRepr for FlashStrides {}

/// Head sizes flash_attention.cu is instantiated for.
const FLASH_HEAD_DIMS: [usize; 4] = [64, 80, 96, 128];

/// Whether [`flash_attention`] runs attention of this dtype and head size on `device`.
pub fn flash_attention_supported(device: &Device, dtype: DType, head_dim: usize) -> bool {
    device.is_cuda()
        && matches!(dtype, DType::BF16 | DType::F16)
        && FLASH_HEAD_DIMS.contains(&head_dim)
}

/// Address and (batch, head, row) element strides of a rank-4 view whose last dimension is
/// contiguous, with 16-byte aligned rows (what the kernel's vector loads need).
fn strided_ptr(t: &Tensor) -> Result<(u64, [i64; 3])> {
    let st = t.stride();
    if st.len() != 4 || st[3] != 1 || st[..3].iter().any(|s| s % 8 != 0) {
        bail!(
            "flash attention input of shape {:?} has strides {st:?}",
            t.dims()
        );
    }
    let address = address(t)?;
    if !address.is_multiple_of(16) {
        bail!("flash attention input is not 16-byte aligned");
    }
    Ok((address, [st[0] as i64, st[1] as i64, st[2] as i64]))
}

/// Softmax attention of `q` `(b, heads, t, hd)` over `k`, `v` `(b, kv_heads, s, hd)` (any
/// strides on the first three dimensions; grouped-query heads share their key/value head),
/// scores scaled by `scale`. With `causal_start`, query `i` sees keys `0..=start + i` (a
/// prefill after `start` cached positions); without, every key. Returns `(b, t, heads, hd)`
/// contiguous, i.e. the heads already side by side for the output projection.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal_start: Option<usize>,
    scale: f32,
) -> Result<Tensor> {
    let dev = cuda_device(q)?;
    let (b, heads, t, hd) = q.dims4()?;
    let (kb, kv_heads, s, khd) = k.dims4()?;
    if !flash_attention_supported(q.device(), q.dtype(), hd)
        || k.dims() != v.dims()
        || (kb, khd) != (b, hd)
        || k.dtype() != q.dtype()
        || v.dtype() != q.dtype()
        || kv_heads == 0
        || heads % kv_heads != 0
        || t == 0
        || s == 0
    {
        bail!(
            "flash attention: q {:?} {:?}, k {:?}, v {:?}",
            q.dims(),
            q.dtype(),
            k.dims(),
            v.dims()
        );
    }
    let out = alloc(&dev, q.dtype(), (b, t, heads, hd))?;
    let (qp, qs) = strided_ptr(q)?;
    let (kp, ks) = strided_ptr(k)?;
    let (vp, vs) = strided_ptr(v)?;
    let op = ptr(&out)?;
    // out (b, t, heads, hd) seen as (b, heads, t, hd).
    let os = [(t * heads * hd) as i64, hd as i64, (heads * hd) as i64];
    let strides = FlashStrides([
        qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], os[0], os[1], os[2],
    ]);
    let ints = [
        t as i32,
        s as i32,
        heads as i32,
        kv_heads as i32,
        causal_start.map_or(-1, |c| c as i32),
    ];
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let name = match q.dtype() {
        DType::BF16 => format!("flash_attention_bf16_{hd}"),
        _ => format!("flash_attention_f16_{hd}"),
    };
    let cfg = LaunchConfig {
        grid_dim: (t.div_ceil(64) as u32, heads as u32, b as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(
        @module FLASH_MODULE, FLASH_PTX, dev, &name, cfg, &qp, &kp, &vp, &op, &ints[0], &ints[1],
        &ints[2], &ints[3], &ints[4], &scale_log2, &strides
    );
    Ok(out)
}

/// [`super::vision_rotary`] in one kernel: `qkv` `(n, 3, heads, hd)` contiguous, `cos`/`sin`
/// `(n, 1, hd)` f32.
pub fn vision_rotary(qkv: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor)> {
    let dev = cuda_device(qkv)?;
    let (n, three, heads, hd) = qkv.dims4()?;
    // The kernel indexes the pairs with 32-bit integers.
    let fits = n * heads * hd <= i32::MAX as usize;
    if three != 3 || cos.dims() != [n, 1, hd] || sin.dims() != [n, 1, hd] || hd % 2 != 0 || !fits {
        bail!(
            "vision_rotary: qkv {:?}, cos {:?}, sin {:?}",
            qkv.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    let (cos, sin) = (
        cos.to_dtype(DType::F32)?.contiguous()?,
        sin.to_dtype(DType::F32)?.contiguous()?,
    );
    let q = alloc(&dev, qkv.dtype(), (n, heads, hd))?;
    let k = alloc(&dev, qkv.dtype(), (n, heads, hd))?;
    let (xp, cp, sp, qp, kp) = (ptr(qkv)?, ptr(&cos)?, ptr(&sin)?, ptr(&q)?, ptr(&k)?);
    let dims = [n as i32, heads as i32, hd as i32];
    let name = kernel(instances!("vision_rotary"), qkv.dtype())?;
    launch!(
        dev,
        name,
        elementwise(n * heads * hd),
        &xp,
        &cp,
        &sp,
        &qp,
        &kp,
        &dims[0],
        &dims[1],
        &dims[2]
    );
    Ok((q, k))
}

/// Bytes per pinned staging buffer of [`upload_safetensors`].
const STAGING_BYTES: usize = 64 << 20;

/// Every tensor of `st` on the CUDA `device`, converted to `dtype` there. The bytes pass
/// through two pinned staging buffers, one filled by several threads while the other's copy
/// to the GPU runs: a copy from pageable (here mmapped) memory is staged by the driver
/// itself at a fraction of the bus speed.
pub fn upload_safetensors(
    st: &candle_core::safetensors::MmapedSafetensors,
    dtype: DType,
    device: &Device,
) -> Result<std::collections::HashMap<String, Tensor>> {
    use candle_core::cuda_backend::cudarc::driver::{result, HostSlice};

    let Device::Cuda(dev) = device else {
        bail!("upload_safetensors needs a CUDA device");
    };
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    // SAFETY: staging bytes are written before they are copied.
    let mut staging = [
        unsafe { ctx.alloc_pinned::<u8>(STAGING_BYTES) }.map_err(candle_core::Error::wrap)?,
        unsafe { ctx.alloc_pinned::<u8>(STAGING_BYTES) }.map_err(candle_core::Error::wrap)?,
    ];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    let mut tensors = st.tensors();
    // File order: sequential reads when the page cache is cold.
    tensors.sort_by_key(|(_, view)| view.data().as_ptr() as usize);
    let mut out = std::collections::HashMap::with_capacity(tensors.len());
    let mut turn = 0;
    for (name, view) in tensors {
        let stored = match DType::try_from(view.dtype()) {
            Ok(d @ (DType::BF16 | DType::F16 | DType::F32)) => d,
            _ => {
                // Rare dtypes (integer buffers): candle's own path.
                out.insert(name.clone(), st.load(&name, device)?.to_dtype(dtype)?);
                continue;
            }
        };
        let bytes = view.data();
        let shape = Shape::from(view.shape());
        if bytes.len() != shape.elem_count() * stored.size_in_bytes() {
            bail!("tensor {name}: {} bytes for shape {shape:?}", bytes.len());
        }
        let tensor = alloc(dev, stored, shape)?;
        let base = ptr(&tensor)?;
        for (i, piece) in bytes.chunks(STAGING_BYTES).enumerate() {
            let buf = &mut staging[turn];
            turn ^= 1;
            // Waits until this buffer's previous copy has finished.
            let host = buf.as_mut_slice().map_err(candle_core::Error::wrap)?;
            let part = piece.len().div_ceil(threads).max(1 << 20);
            std::thread::scope(|scope| {
                for (dst, src) in host[..piece.len()].chunks_mut(part).zip(piece.chunks(part)) {
                    scope.spawn(move || dst.copy_from_slice(src));
                }
            });
            // SAFETY: the destination holds `bytes.len()` bytes from `base`; the staged
            // slice stays alive and unwritten until the event recorded when `_record`
            // drops (after the copy is queued) has passed.
            unsafe {
                let (host, _record) = buf.stream_synced_slice(&stream);
                result::memcpy_htod_async(
                    base + (i * STAGING_BYTES) as u64,
                    &host[..piece.len()],
                    stream.cu_stream(),
                )
                .map_err(candle_core::Error::wrap)?;
            }
        }
        out.insert(name, tensor.to_dtype(dtype)?);
    }
    stream.synchronize().map_err(candle_core::Error::wrap)?;
    Ok(out)
}
