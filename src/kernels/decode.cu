// Fused kernels for the Llama/Qwen2 decoder (the decode step of one new position per sequence,
// and the prefill's rope and cache write), the vision towers' rotary embedding, and the bias
// and activation after a projection. Each has a CPU reference in mod.rs and a test comparing
// the two.
// Rounding follows HF's bf16/f16 order where it is observable: a value that HF materialises
// as a tensor of the model dtype is rounded to that dtype here too.
// Compiled to PTX by build.rs with the nvcc the candle build uses; no fast-math (cosf/sinf
// and expf must be the accurate ones).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
    return __float2bfloat16(v);
}

// Rounds through the storage type: what a tensor of dtype T holds for the float v.
template <typename T> __device__ __forceinline__ float rnd(float v) { return to_f(from_f<T>(v)); }

// Elementwise kernels over contiguous tensors: each thread takes VEC consecutive elements,
// loaded and stored 16 bytes at a time where VEC * sizeof(T) == 16 (the caller checks n and
// the alignment), one at a time with VEC == 1.
template <typename T, int VEC> __device__ __forceinline__ void load_vec(T (&dst)[VEC], const T *src) {
    if constexpr (VEC * sizeof(T) == 16) {
        *reinterpret_cast<uint4 *>(dst) = *reinterpret_cast<const uint4 *>(src);
    } else {
        for (int k = 0; k < VEC; ++k) dst[k] = src[k];
    }
}

template <typename T, int VEC> __device__ __forceinline__ void store_vec(T *dst, const T (&src)[VEC]) {
    if constexpr (VEC * sizeof(T) == 16) {
        *reinterpret_cast<uint4 *>(dst) = *reinterpret_cast<const uint4 *>(src);
    } else {
        for (int k = 0; k < VEC; ++k) dst[k] = src[k];
    }
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// Sum over the block; every thread gets the result. `scratch` holds 32 floats.
__device__ float block_sum(float v, float *scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < warps ? scratch[lane] : 0.f;
    return warp_sum(t);
}

// out_sum = x + residual (rounded to T), out_norm = rms_norm(out_sum) * weight, one block per
// row of n. Without a residual (residual == nullptr) the norm reads x and out_sum is unused.
template <typename T>
__device__ void add_rms_norm(const T *x, const T *residual, const T *weight, T *out_sum,
                             T *out_norm, int n, float eps) {
    __shared__ float scratch[32];
    size_t row = blockIdx.x;
    x += row * n;
    out_norm += row * n;
    if (residual) {
        residual += row * n;
        out_sum += row * n;
    }
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = to_f(x[i]);
        if (residual) {
            T s = from_f<T>(v + to_f(residual[i]));
            out_sum[i] = s;
            v = to_f(s);
        }
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    float inv = rsqrtf(ss / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = residual ? to_f(out_sum[i]) : to_f(x[i]);
        out_norm[i] = from_f<T>(rnd<T>(v * inv) * to_f(weight[i]));
    }
}

// out[r, i] = silu(gate_up[r, i]) * gate_up[r, inter + i], the activation rounded to T first.
// VEC divides inter.
template <typename T, int VEC>
__device__ void silu_mul(const T *gate_up, T *out, int rows, int inter) {
    size_t total = (size_t)rows * inter;
    for (size_t c = blockIdx.x * (size_t)blockDim.x + threadIdx.x; c < total / VEC;
         c += (size_t)gridDim.x * blockDim.x) {
        size_t k = c * VEC, r = k / inter, i = k % inter;
        alignas(16) T g[VEC];
        alignas(16) T u[VEC];
        load_vec<T, VEC>(g, gate_up + r * 2 * inter + i);
        load_vec<T, VEC>(u, gate_up + r * 2 * inter + inter + i);
        for (int e = 0; e < VEC; ++e) {
            float x = to_f(g[e]);
            g[e] = from_f<T>(rnd<T>(x / (1.f + expf(-x))) * to_f(u[e]));
        }
        store_vec<T, VEC>(out + k, g);
    }
}

// The step table (int64, uploaded once per step) for `rows` sequences and `layers` layers:
//   [0, rows)            rotary position of each row's new token
//   [rows, 2 rows)       cache slot it is written to (the cache length before the step)
//   [2 rows, 3 rows)     cache capacity (positions) of each row
//   then per layer l, row r: key cache pointer at 3 rows + 2 (l rows + r), value pointer next.
// Caches are (kv_heads, capacity, head_dim) in T.
struct Step {
    const int64_t *t;
    int rows;
    __device__ int64_t pos(int r) const { return t[r]; }
    __device__ int64_t slot(int r) const { return t[rows + r]; }
    __device__ int64_t cap(int r) const { return t[2 * rows + r]; }
    template <typename T> __device__ T *k(int layer, int r) const {
        return (T *)t[3 * rows + 2 * (layer * rows + r)];
    }
    template <typename T> __device__ T *v(int layer, int r) const {
        return (T *)t[3 * rows + 2 * (layer * rows + r) + 1];
    }
};

// Pair (j, j + half) of head h in one row of the fused q/k/v projection, for the rope kernels:
// the bias added (if any, rounded as a separate add does), rotated by (c, s) in HF's order (each
// product rounded to T, then their sum) into o. For a key head (h >= heads) also its value
// pair, biased, into v.
template <typename T>
__device__ __forceinline__ void rope_pair(const T *row, const T *bias, int h, int j, int heads,
                                          int kv_heads, int head_dim, float c, float s, T (&o)[2],
                                          T (&v)[2]) {
    int half = head_dim / 2, a = h * head_dim + j, b = a + half;
    float x1 = to_f(row[a]), x2 = to_f(row[b]);
    if (bias) {
        x1 = rnd<T>(x1 + to_f(bias[a]));
        x2 = rnd<T>(x2 + to_f(bias[b]));
    }
    o[0] = from_f<T>(rnd<T>(x1 * c) + rnd<T>(-x2 * s));
    o[1] = from_f<T>(rnd<T>(x2 * c) + rnd<T>(x1 * s));
    if (h >= heads) {
        int va = (kv_heads + h) * head_dim + j, vb = va + half;
        float v1 = to_f(row[va]), v2 = to_f(row[vb]);
        if (bias) {
            v1 += to_f(bias[va]);
            v2 += to_f(bias[vb]);
        }
        v[0] = from_f<T>(v1);
        v[1] = from_f<T>(v2);
    }
}

// Grid (rows, heads + kv_heads), block >= head_dim / 2 threads. Adds the q/k/v bias (if any,
// rounding as a separate add does), applies rotary embeddings (HF's rotate-half layout, cos and
// sin rounded to T as HF casts them) to q and k, writes q to q_out (rows, heads, head_dim) and
// k, v into the caches at the row's slot.
template <typename T>
__device__ void rope_write_kv(const T *qkv, const T *bias, const float *inv_freq, const int64_t *table,
                              int rows, int layer, T *q_out, int heads, int kv_heads, int head_dim) {
    Step step{table, rows};
    int r = blockIdx.x, h = blockIdx.y, half = head_dim / 2;
    int width = (heads + 2 * kv_heads) * head_dim;
    const T *row = qkv + (size_t)r * width;
    float pos = (float)step.pos(r);
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        float angle = pos * inv_freq[j];
        T o[2], vp[2];
        rope_pair<T>(row, bias, h, j, heads, kv_heads, head_dim, rnd<T>(cosf(angle)),
                     rnd<T>(sinf(angle)), o, vp);
        if (h < heads) {
            T *q = q_out + ((size_t)r * heads + h) * head_dim;
            q[j] = o[0];
            q[j + half] = o[1];
        } else {
            size_t at = ((size_t)(h - heads) * step.cap(r) + step.slot(r)) * head_dim;
            T *k = step.k<T>(layer, r) + at, *v = step.v<T>(layer, r) + at;
            k[j] = o[0];
            k[j + half] = o[1];
            v[j] = vp[0];
            v[j + half] = vp[1];
        }
    }
}

// Attention of one new query per row over its cache (slot + 1 positions), in f32 with an
// online softmax, split over the keys (flash-decoding): grid (rows, heads, splits), block of
// ATT_WARPS warps. Block s takes keys [s * chunk, (s + 1) * chunk) of its row, each warp every
// ATT_WARPS-th of them, and writes its partial max, sum and weighted values to `part`
// (rows, heads, splits, 2 + head_dim); decode_attention_combine merges the splits.
// q (rows, heads, head_dim), head_dim <= 256.
#define ATT_WARPS 4
#define MAXD 8  // head_dim / 32, rounded up

template <typename T>
__device__ void decode_attention_split(const T *q, const int64_t *table, int rows, int layer,
                                       float *part, int heads, int kv_heads, int head_dim,
                                       float scale) {
    Step step{table, rows};
    __shared__ float s_m[ATT_WARPS], s_l[ATT_WARPS];
    __shared__ float s_acc[ATT_WARPS][MAXD * 32];
    int r = blockIdx.x, h = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int kvh = h / (heads / kv_heads);
    int64_t len = step.slot(r) + 1, cap = step.cap(r);
    int64_t chunk = (len + splits - 1) / splits;
    int64_t begin = split * chunk, end = min(len, begin + chunk);
    const T *kc = step.k<T>(layer, r) + (size_t)kvh * cap * head_dim;
    const T *vc = step.v<T>(layer, r) + (size_t)kvh * cap * head_dim;
    const T *qr = q + ((size_t)r * heads + h) * head_dim;
    float qv[MAXD], acc[MAXD];
#pragma unroll
    for (int i = 0; i < MAXD; i++) {
        int d = lane + 32 * i;
        qv[i] = d < head_dim ? to_f(qr[d]) : 0.f;
        acc[i] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    for (int64_t j = begin + warp; j < end; j += ATT_WARPS) {
        const T *kj = kc + j * head_dim;
        const T *vj = vc + j * head_dim;
        float kv[MAXD], vv[MAXD];
#pragma unroll
        for (int i = 0; i < MAXD; i++) {
            int d = lane + 32 * i;
            kv[i] = d < head_dim ? to_f(kj[d]) : 0.f;
            vv[i] = d < head_dim ? to_f(vj[d]) : 0.f;
        }
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < MAXD; i++) dot += qv[i] * kv[i];
        float s = warp_sum(dot) * scale;
        float m_new = fmaxf(m, s);
        float corr = expf(m - m_new), p = expf(s - m_new);
        l = l * corr + p;
#pragma unroll
        for (int i = 0; i < MAXD; i++) acc[i] = acc[i] * corr + p * vv[i];
        m = m_new;
    }
    if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < MAXD; i++) s_acc[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    if (warp == 0) {
        float gm = -INFINITY;
        for (int w = 0; w < ATT_WARPS; w++) gm = fmaxf(gm, s_m[w]);
        float gl = 0.f;
        for (int w = 0; w < ATT_WARPS; w++)
            if (s_l[w] > 0.f) gl += s_l[w] * expf(s_m[w] - gm);
        float *out = part + (((size_t)r * heads + h) * splits + split) * (2 + head_dim);
        if (lane == 0) {
            out[0] = gm;
            out[1] = gl;
        }
        for (int i = 0; i < MAXD; i++) {
            int d = lane + 32 * i;
            if (d >= head_dim) continue;
            float o = 0.f;
            for (int w = 0; w < ATT_WARPS; w++)
                if (s_l[w] > 0.f) o += s_acc[w][d] * expf(s_m[w] - gm);
            out[2 + d] = o;
        }
    }
}

// Merges the splits of decode_attention_split: grid (rows, heads), block >= head_dim threads.
// out (rows, heads * head_dim).
template <typename T>
__device__ void decode_attention_combine(const float *part, T *out, int heads, int head_dim,
                                         int splits) {
    int r = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
    if (d >= head_dim) return;
    const float *p = part + ((size_t)r * heads + h) * splits * (2 + head_dim);
    float gm = -INFINITY;
    for (int s = 0; s < splits; s++)
        if (p[s * (2 + head_dim) + 1] > 0.f) gm = fmaxf(gm, p[s * (2 + head_dim)]);
    float gl = 0.f, o = 0.f;
    for (int s = 0; s < splits; s++) {
        const float *ps = p + s * (2 + head_dim);
        if (ps[1] > 0.f) {
            float w = expf(ps[0] - gm);
            gl += ps[1] * w;
            o += ps[2 + d] * w;
        }
    }
    out[((size_t)r * heads + h) * head_dim + d] = from_f<T>(o / gl);
}

// y (rows, n) = x (rows, k) @ w (n, k)^T for ROWS <= 8 rows, accumulated in f32: the
// single-token matmuls of decode, which read every weight once. One warp per COLS output
// columns;
// each lane keeps GEMV_UNROLL independent 16-byte weight loads in flight (the weights stream
// through once, so the loads skip L1; the few x rows stay cached). k must be a multiple of
// 16 / sizeof(T) and rows 16-byte aligned.
#define GEMV_WARPS 4
#define GEMV_UNROLL 4

template <typename T>
__device__ __forceinline__ void dot_vec(const uint4 &wv, const uint4 &xv, float &acc) {
    const T *wt = (const T *)&wv;
    const T *xt = (const T *)&xv;
#pragma unroll
    for (int e = 0; e < (int)(16 / sizeof(T)); e++) acc += to_f(wt[e]) * to_f(xt[e]);
}

template <typename T, int ROWS, int COLS>
__device__ void gemv(const T *x, const T *w, T *y, int n, int k) {
    constexpr int VEC = 16 / sizeof(T);
    int lane = threadIdx.x & 31;
    int col0 = (blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5)) * COLS;
    if (col0 >= n) return;
    const uint4 *wr[COLS];
#pragma unroll
    for (int cc = 0; cc < COLS; cc++) wr[cc] = (const uint4 *)(w + (size_t)min(col0 + cc, n - 1) * k);
    const uint4 *xr = (const uint4 *)x;
    int chunks = k / VEC;
    float acc[COLS][ROWS];
#pragma unroll
    for (int cc = 0; cc < COLS; cc++)
#pragma unroll
        for (int b = 0; b < ROWS; b++) acc[cc][b] = 0.f;
    int c = lane;
    for (; c + 32 * (GEMV_UNROLL - 1) < chunks; c += 32 * GEMV_UNROLL) {
        uint4 wv[COLS][GEMV_UNROLL];
#pragma unroll
        for (int cc = 0; cc < COLS; cc++)
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; u++) wv[cc][u] = __ldcs(wr[cc] + c + 32 * u);
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
#pragma unroll
            for (int b = 0; b < ROWS; b++) {
                uint4 xv = __ldg(xr + (size_t)b * chunks + c + 32 * u);
#pragma unroll
                for (int cc = 0; cc < COLS; cc++) dot_vec<T>(wv[cc][u], xv, acc[cc][b]);
            }
        }
    }
    for (; c < chunks; c += 32) {
        uint4 wv[COLS];
#pragma unroll
        for (int cc = 0; cc < COLS; cc++) wv[cc] = __ldcs(wr[cc] + c);
#pragma unroll
        for (int b = 0; b < ROWS; b++) {
            uint4 xv = __ldg(xr + (size_t)b * chunks + c);
#pragma unroll
            for (int cc = 0; cc < COLS; cc++) dot_vec<T>(wv[cc], xv, acc[cc][b]);
        }
    }
#pragma unroll
    for (int cc = 0; cc < COLS; cc++) {
#pragma unroll
        for (int b = 0; b < ROWS; b++) {
            float v = warp_sum(acc[cc][b]);
            if (lane == 0 && col0 + cc < n) y[(size_t)b * n + col0 + cc] = from_f<T>(v);
        }
    }
}

// out (rows, hidden) = table[ids[r]]: the token embeddings of a decode step whose ids sit on
// the device (a captured CUDA graph reads them from a buffer filled before each launch).
template <typename T>
__device__ void embedding(const T *table, const uint32_t *ids, T *out, int rows, int hidden) {
    size_t total = (size_t)rows * hidden;
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < total;
         k += (size_t)gridDim.x * blockDim.x)
        out[k] = table[(size_t)ids[k / hidden] * hidden + k % hidden];
}

// out = float(x), elementwise, into an existing buffer.
template <typename T> __device__ void copy_to_f32(const T *x, float *out, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        out[i] = to_f(x[i]);
}

// The vision towers' rotary embedding in f32, as transformers applies it:
// x * cos + rotate_half(x) * sin over the head dimension, then rounded to T. qkv is
// (n, 3, heads, hd) straight from the fused projection; q_out and k_out are (n, heads, hd);
// cos and sin are (n, hd) f32. Separate rounded products and sum (no fma), as the candle ops
// it replaces compute them, so the results are the same bits.
template <typename T>
__device__ void vision_rotary(const T *qkv, const float *cos, const float *sin, T *q_out,
                              T *k_out, int n, int heads, int hd) {
    // One thread per (row, q or k, head, pair j < half): it writes d = j and d = j + half.
    const int half = hd / 2, width = heads * hd, per_row = 2 * heads * half;
    const int total = n * per_row;  // the caller checks that this fits an int
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        const int row = i / per_row, rest = i % per_row;
        const int which = rest / (heads * half);  // 0: q, 1: k
        const int h = rest % (heads * half) / half, j = rest % half;
        const T *x = qkv + (size_t)row * 3 * width + which * width + h * hd;
        const float x1 = to_f(x[j]), x2 = to_f(x[j + half]);
        const float *c = cos + (size_t)row * hd, *s = sin + (size_t)row * hd;
        T *out = (which == 0 ? q_out : k_out) + (size_t)row * width + h * hd;
        out[j] = from_f<T>(__fadd_rn(__fmul_rn(x1, c[j]), __fmul_rn(-x2, s[j])));
        out[j + half] =
            from_f<T>(__fadd_rn(__fmul_rn(x2, c[j + half]), __fmul_rn(x1, s[j + half])));
    }
}

// out = x + bias (+ residual), the bias (n) broadcast over the rows of x (total / n, n): a
// projection's bias, then the residual stream it joins, each rounded as a separate add would.
// VEC divides n, so a thread's elements share a row.
template <typename T, int VEC>
__device__ void bias_add(const T *x, const T *bias, const T *residual, T *out, size_t total,
                         int n) {
    for (size_t c = blockIdx.x * (size_t)blockDim.x + threadIdx.x; c < total / VEC;
         c += (size_t)gridDim.x * blockDim.x) {
        size_t i = c * VEC;
        alignas(16) T xv[VEC];
        alignas(16) T bv[VEC];
        alignas(16) T rv[VEC];
        load_vec<T, VEC>(xv, x + i);
        load_vec<T, VEC>(bv, bias + i % n);
        if (residual) load_vec<T, VEC>(rv, residual + i);
        for (int k = 0; k < VEC; ++k) {
            float v = to_f(xv[k]) + to_f(bv[k]);
            xv[k] = residual ? from_f<T>(rnd<T>(v) + to_f(rv[k])) : from_f<T>(v);
        }
        store_vec<T, VEC>(out + i, xv);
    }
}

// out = x * sigmoid(1.702 x) (transformers' QuickGELUActivation), computed in f32 with the
// scaled input and the sigmoid rounded to T, as HF materialises them.
template <typename T, int VEC> __device__ void quick_gelu(const T *x, T *out, size_t total) {
    for (size_t c = blockIdx.x * (size_t)blockDim.x + threadIdx.x; c < total / VEC;
         c += (size_t)gridDim.x * blockDim.x) {
        alignas(16) T xv[VEC];
        load_vec<T, VEC>(xv, x + c * VEC);
        for (int k = 0; k < VEC; ++k) {
            float v = to_f(xv[k]);
            float s = rnd<T>(1.f / (1.f + expf(-rnd<T>(v * 1.702f))));
            xv[k] = from_f<T>(v * s);
        }
        store_vec<T, VEC>(out + c * VEC, xv);
    }
}

// The prefill's counterpart of rope_write_kv, for t new rows of one sequence after `start`
// cached positions: one block per row, its threads over (head, pair) of q and k. qkv is
// (t, (heads + 2 kv_heads) head_dim) straight from the fused projection; cos and sin are the
// rows' (t, head_dim / 2) tables in T. Adds the bias, rotates q and k in HF's order (each
// product rounded to T, then their sum), writes q as (heads, t, head_dim) and k, v into the
// caches (kv_heads, cap, head_dim) at positions start .. start + t.
template <typename T>
__device__ void prefill_rope_kv(const T *qkv, const T *bias, const T *cos, const T *sin,
                                T *q_out, T *k_cache, T *v_cache, int t, int start, int cap,
                                int heads, int kv_heads, int head_dim) {
    int r = blockIdx.x, half = head_dim / 2;
    int width = (heads + 2 * kv_heads) * head_dim;
    const T *row = qkv + (size_t)r * width;
    for (int p = threadIdx.x; p < (heads + kv_heads) * half; p += blockDim.x) {
        int h = p / half, j = p % half;
        T o[2], vp[2];
        rope_pair<T>(row, bias, h, j, heads, kv_heads, head_dim, to_f(cos[(size_t)r * half + j]),
                     to_f(sin[(size_t)r * half + j]), o, vp);
        if (h < heads) {
            T *q = q_out + ((size_t)h * t + r) * head_dim;
            q[j] = o[0];
            q[j + half] = o[1];
        } else {
            size_t at = ((size_t)(h - heads) * cap + start + r) * head_dim;
            k_cache[at + j] = o[0];
            k_cache[at + j + half] = o[1];
            v_cache[at + j] = vp[0];
            v_cache[at + j + half] = vp[1];
        }
    }
}

#define DTYPES(X) X(float, f32) X(__half, f16) X(__nv_bfloat16, bf16)

#define GEMV_INSTANCE(T, S, R)                                                                 \
    extern "C" __global__ void gemv##R##_##S(const T *x, const T *w, T *y, int n, int k) {     \
        gemv<T, R, 1>(x, w, y, n, k);                                                          \
    }                                                                                          \
    extern "C" __global__ void gemv##R##c2_##S(const T *x, const T *w, T *y, int n, int k) {   \
        gemv<T, R, 2>(x, w, y, n, k);                                                          \
    }

#define INSTANCES(T, S)                                                                        \
    extern "C" __global__ void add_rms_norm_##S(const T *x, const T *residual, const T *weight, \
                                                T *out_sum, T *out_norm, int n, float eps) {   \
        add_rms_norm<T>(x, residual, weight, out_sum, out_norm, n, eps);                       \
    }                                                                                          \
    extern "C" __global__ void silu_mul_##S(const T *gate_up, T *out, int rows, int inter) {   \
        silu_mul<T, 1>(gate_up, out, rows, inter);                                             \
    }                                                                                          \
    extern "C" __global__ void silu_mul_vec_##S(const T *gate_up, T *out, int rows,            \
                                                int inter) {                                   \
        silu_mul<T, 16 / sizeof(T)>(gate_up, out, rows, inter);                                \
    }                                                                                          \
    extern "C" __global__ void rope_write_kv_##S(const T *qkv, const T *bias,                  \
                                                 const float *inv_freq, const int64_t *table,  \
                                                 int rows, int layer, T *q_out, int heads,     \
                                                 int kv_heads, int head_dim) {                 \
        rope_write_kv<T>(qkv, bias, inv_freq, table, rows, layer, q_out, heads, kv_heads,      \
                         head_dim);                                                            \
    }                                                                                          \
    extern "C" __global__ void decode_attention_split_##S(                                  \
        const T *q, const int64_t *table, int rows, int layer, float *part, int heads,         \
        int kv_heads, int head_dim, float scale) {                                             \
        decode_attention_split<T>(q, table, rows, layer, part, heads, kv_heads, head_dim,      \
                                  scale);                                                      \
    }                                                                                          \
    extern "C" __global__ void decode_attention_combine_##S(const float *part, T *out,         \
                                                            int heads, int head_dim,           \
                                                            int splits) {                      \
        decode_attention_combine<T>(part, out, heads, head_dim, splits);                       \
    }                                                                                          \
    extern "C" __global__ void embedding_##S(const T *table, const uint32_t *ids, T *out,      \
                                             int rows, int hidden) {                           \
        embedding<T>(table, ids, out, rows, hidden);                                           \
    }                                                                                          \
    extern "C" __global__ void copy_to_f32_##S(const T *x, float *out, int n) {                \
        copy_to_f32<T>(x, out, n);                                                             \
    }                                                                                          \
    extern "C" __global__ void vision_rotary_##S(const T *qkv, const float *cos,               \
                                                 const float *sin, T *q_out, T *k_out, int n,  \
                                                 int heads, int hd) {                          \
        vision_rotary<T>(qkv, cos, sin, q_out, k_out, n, heads, hd);                           \
    }                                                                                          \
    extern "C" __global__ void bias_add_##S(const T *x, const T *bias, const T *residual,      \
                                            T *out, size_t total, int n) {                     \
        bias_add<T, 1>(x, bias, residual, out, total, n);                                      \
    }                                                                                          \
    extern "C" __global__ void bias_add_vec_##S(const T *x, const T *bias, const T *residual,  \
                                                T *out, size_t total, int n) {                 \
        bias_add<T, 16 / sizeof(T)>(x, bias, residual, out, total, n);                         \
    }                                                                                          \
    extern "C" __global__ void quick_gelu_##S(const T *x, T *out, size_t total) {              \
        quick_gelu<T, 1>(x, out, total);                                                       \
    }                                                                                          \
    extern "C" __global__ void quick_gelu_vec_##S(const T *x, T *out, size_t total) {          \
        quick_gelu<T, 16 / sizeof(T)>(x, out, total);                                          \
    }                                                                                          \
    extern "C" __global__ void prefill_rope_kv_##S(                                         \
        const T *qkv, const T *bias, const T *cos, const T *sin, T *q_out, T *k_cache,         \
        T *v_cache, int t, int start, int cap, int heads, int kv_heads, int head_dim) {        \
        prefill_rope_kv<T>(qkv, bias, cos, sin, q_out, k_cache, v_cache, t, start, cap, heads, \
                           kv_heads, head_dim);                                                \
    }                                                                                          \
    GEMV_INSTANCE(T, S, 1) GEMV_INSTANCE(T, S, 2) GEMV_INSTANCE(T, S, 3)                      \
    GEMV_INSTANCE(T, S, 4) GEMV_INSTANCE(T, S, 5) GEMV_INSTANCE(T, S, 6)                       \
    GEMV_INSTANCE(T, S, 7) GEMV_INSTANCE(T, S, 8)

DTYPES(INSTANCES)

// Index of the largest value of each row (one block per row); ties go to the lowest index and
// the first NaN wins, as torch.argmax.
extern "C" __global__ void argmax_f32(const float *x, uint32_t *out, int n) {
    __shared__ float sv[1024];
    __shared__ int si[1024];
    const float *row = x + (size_t)blockIdx.x * n;
    float best = -INFINITY;
    int bi = -1;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = row[i];
        bool nan = v != v, best_nan = best != best;
        if (bi < 0 || (nan && !best_nan) || (!best_nan && v > best)) {
            best = v;
            bi = i;
        }
    }
    sv[threadIdx.x] = best;
    si[threadIdx.x] = bi;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            float a = sv[threadIdx.x], b = sv[threadIdx.x + stride];
            int ia = si[threadIdx.x], ib = si[threadIdx.x + stride];
            bool an = a != a, bn = b != b;
            bool take_b = ib >= 0 && (ia < 0 || (bn && (!an || ib < ia)) ||
                                      (!an && !bn && (b > a || (b == a && ib < ia))));
            if (take_b) {
                sv[threadIdx.x] = b;
                si[threadIdx.x] = ib;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = (uint32_t)si[0];
}

// Busy-waits about `cycles` clock cycles: holds the stream so that work queued behind it runs
// back to back, which is how the decode profile measures GPU time apart from launch time.
extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) {
    }
}
