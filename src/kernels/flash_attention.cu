// Attention for prefill and vision towers in the FlashAttention-2 manner: one block of 4 warps
// takes 64 query rows of one (batch, head); key/value tiles of 64 rows pass through shared
// memory, scores stay in registers (tensor-core mma.sync m16n8k16, f32 accumulation) with an
// online softmax, so no score matrix is ever written to memory and one launch covers every
// head. Tiles arrive by cp.async: the values of a tile load while its scores are computed, the
// next keys while the values are applied; ldmatrix.trans reads the values as the mma's B
// operand from their row-major tile. Causal (query i sees keys <= causal_start + i) or bidirectional; grouped-query heads
// read their key/value head directly. f16/bf16 only: the f32 path stays the eager one, which
// is what the f32 parity tests hold to HF's numbers.
// Compiled to PTX by build.rs; a test in cuda.rs compares it with the eager path.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define FA_ROWS 64  // query rows per block (16 per warp)
#define FA_KEYS 64  // keys per shared-memory tile

__device__ __forceinline__ void mma(float *c, const uint32_t *a, uint32_t b0, uint32_t b1,
                                    __nv_bfloat16) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma(float *c, const uint32_t *a, uint32_t b0, uint32_t b1, __half) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as one register of two 16-bit values, the first in the low half.
__device__ __forceinline__ uint32_t pack(float lo, float hi, __nv_bfloat16) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}
__device__ __forceinline__ uint32_t pack(float lo, float hi, __half) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

template <typename T> __device__ __forceinline__ uint32_t ld32(const T *p) {
    return *reinterpret_cast<const uint32_t *>(p);
}

__device__ __forceinline__ unsigned smem(const void *p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

// Starts copying keys (or values) k0 .. k0 + FA_KEYS of a (rows, HD) matrix with row stride
// `row` into the padded tile `dst` (FA_KEYS, STR), 16 bytes per cp.async; rows at or past `s`
// are filled with zeros. Commits one group.
template <typename T, int HD, int STR>
__device__ __forceinline__ void load_tile(T *dst, const T *src, long long row, int k0, int s) {
    for (int c = threadIdx.x; c < FA_KEYS * HD / 8; c += blockDim.x) {
        const int r = c / (HD / 8), d = (c % (HD / 8)) * 8, key = k0 + r;
        const bool in = key < s;
        const T *from = in ? src + key * row + d : src;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem(dst + r * STR + d)),
                     "l"(from), "r"(in ? 16 : 0));
    }
    asm volatile("cp.async.commit_group;\n" ::);
}

// Waits until at most N committed copy groups of this thread are still in flight.
template <int N> __device__ __forceinline__ void wait_copies() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Element strides (batch, head, row) of q, k, v and out, passed by value; the head dimension
// is contiguous.
struct Strides {
    long long s[12];
};

// q is
// (batch, heads, t, HD), k and v (batch, kv_heads, s, HD), out (batch, heads, t, HD), each
// through its own strides. Grid: (ceil(t / 64), heads, batch), 128 threads.
template <typename T, int HD>
__device__ void flash_attention(const T *q, const T *k, const T *v, T *out, int t, int s,
                                int heads, int kv_heads, int causal_start, float scale_log2,
                                const Strides &st) {
    const long long *strides = st.s;
    constexpr int STR = HD + 8;  // padded rows: fragment loads and ldmatrix hit distinct banks
    __shared__ __align__(16) T ks[FA_KEYS * STR];
    __shared__ __align__(16) T vs[FA_KEYS * STR];
    const T zero_t = T();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, tq = lane & 3;
    const int b = blockIdx.z, h = blockIdx.y, kvh = h / (heads / kv_heads);
    const T *qb = q + b * strides[0] + h * strides[1];
    const T *kb = k + b * strides[3] + kvh * strides[4];
    const T *vb = v + b * strides[6] + kvh * strides[7];
    const long long q_row = strides[2], k_row = strides[5], v_row = strides[8];
    const int r_lo = blockIdx.x * FA_ROWS + warp * 16 + g, r_hi = r_lo + 8;

    uint32_t qf[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        const int c = kk * 16 + 2 * tq;
        qf[kk][0] = r_lo < t ? ld32(qb + r_lo * q_row + c) : 0u;
        qf[kk][1] = r_hi < t ? ld32(qb + r_hi * q_row + c) : 0u;
        qf[kk][2] = r_lo < t ? ld32(qb + r_lo * q_row + c + 8) : 0u;
        qf[kk][3] = r_hi < t ? ld32(qb + r_hi * q_row + c + 8) : 0u;
    }
    float o[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;

    int kend = s;
    if (causal_start >= 0) kend = min(s, causal_start + min(t, (int)(blockIdx.x + 1) * FA_ROWS));
    if (kend > 0) load_tile<T, HD, STR>(ks, kb, k_row, 0, s);
    for (int k0 = 0; k0 < kend; k0 += FA_KEYS) {
        load_tile<T, HD, STR>(vs, vb, v_row, k0, s);
        wait_copies<1>();  // this tile's keys have landed; its values may still be in flight
        __syncthreads();

        // Key groups inner: consecutive mma's accumulate into different registers, so they
        // overlap instead of waiting on each other.
        float sc[FA_KEYS / 8][4];
#pragma unroll
        for (int j = 0; j < FA_KEYS / 8; j++) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
#pragma unroll
            for (int j = 0; j < FA_KEYS / 8; j++) {
                const T *kp = ks + (j * 8 + g) * STR + kk * 16 + 2 * tq;
                mma(sc[j], qf[kk], ld32(kp), ld32(kp + 8), zero_t);
            }
        }
        // Scale into log2 units and mask; the row maxima of this tile.
        float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
        for (int j = 0; j < FA_KEYS / 8; j++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int key = k0 + j * 8 + 2 * tq + (i & 1);
                const int row = i < 2 ? r_lo : r_hi;
                const bool seen = key < s && (causal_start < 0 || key <= causal_start + row);
                const float x = seen ? sc[j][i] * scale_log2 : -INFINITY;
                sc[j][i] = x;
                if (i < 2) mx_lo = fmaxf(mx_lo, x);
                else mx_hi = fmaxf(mx_hi, x);
            }
        }
        // The four threads of a quad hold one row between them.
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
            mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffff, mx_lo, off));
            mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffff, mx_hi, off));
        }
        const float new_lo = fmaxf(m_lo, mx_lo), new_hi = fmaxf(m_hi, mx_hi);
        // A row with no key seen yet keeps -inf: subtract 0 instead, so exp2 gives 0, not NaN.
        const float ref_lo = new_lo == -INFINITY ? 0.f : new_lo;
        const float ref_hi = new_hi == -INFINITY ? 0.f : new_hi;
        const float alpha_lo = exp2f(m_lo - ref_lo), alpha_hi = exp2f(m_hi - ref_hi);
        m_lo = new_lo;
        m_hi = new_hi;
        float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
        for (int j = 0; j < FA_KEYS / 8; j++) {
            sc[j][0] = exp2f(sc[j][0] - ref_lo);
            sc[j][1] = exp2f(sc[j][1] - ref_lo);
            sc[j][2] = exp2f(sc[j][2] - ref_hi);
            sc[j][3] = exp2f(sc[j][3] - ref_hi);
            sum_lo += sc[j][0] + sc[j][1];
            sum_hi += sc[j][2] + sc[j][3];
        }
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
            sum_lo += __shfl_xor_sync(0xffffffff, sum_lo, off);
            sum_hi += __shfl_xor_sync(0xffffffff, sum_hi, off);
        }
        l_lo = l_lo * alpha_lo + sum_lo;
        l_hi = l_hi * alpha_hi + sum_hi;
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            o[n][0] *= alpha_lo;
            o[n][1] *= alpha_lo;
            o[n][2] *= alpha_hi;
            o[n][3] *= alpha_hi;
        }
        wait_copies<0>();
        __syncthreads();  // the values are in; every warp is done with the keys
        if (k0 + FA_KEYS < kend) load_tile<T, HD, STR>(ks, kb, k_row, k0 + FA_KEYS, s);
        // O += P V: the score accumulators of two key groups are the A operand of one step;
        // ldmatrix.trans gives two 8-wide column blocks of V's 16 keys at once.
#pragma unroll
        for (int c = 0; c < FA_KEYS / 16; c++) {
            const uint32_t a[4] = {
                pack(sc[2 * c][0], sc[2 * c][1], zero_t),
                pack(sc[2 * c][2], sc[2 * c][3], zero_t),
                pack(sc[2 * c + 1][0], sc[2 * c + 1][1], zero_t),
                pack(sc[2 * c + 1][2], sc[2 * c + 1][3], zero_t),
            };
            const int key = c * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
            for (int n = 0; n < HD / 8; n += 2) {
                uint32_t bf[4];
                asm volatile(
                    "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                    : "=r"(bf[0]), "=r"(bf[1]), "=r"(bf[2]), "=r"(bf[3])
                    : "r"(smem(vs + key * STR + (n + (lane >> 4)) * 8)));
                mma(o[n], a, bf[0], bf[1], zero_t);
                mma(o[n + 1], a, bf[2], bf[3], zero_t);
            }
        }
        __syncthreads();  // every warp is done with the values before the next tile's copy
    }
    const float inv_lo = l_lo > 0.f ? 1.f / l_lo : 0.f;
    const float inv_hi = l_hi > 0.f ? 1.f / l_hi : 0.f;
    T *ob = out + b * strides[9] + h * strides[10];
    const long long o_row = strides[11];
#pragma unroll
    for (int n = 0; n < HD / 8; n++) {
        const int c = n * 8 + 2 * tq;
        if (r_lo < t)
            *reinterpret_cast<uint32_t *>(ob + r_lo * o_row + c) =
                pack(o[n][0] * inv_lo, o[n][1] * inv_lo, zero_t);
        if (r_hi < t)
            *reinterpret_cast<uint32_t *>(ob + r_hi * o_row + c) =
                pack(o[n][2] * inv_hi, o[n][3] * inv_hi, zero_t);
    }
}

#define FLASH_INSTANCE(T, S, HD)                                                               \
    extern "C" __global__ void __launch_bounds__(128)                                          \
        flash_attention_##S##_##HD(const T *q, const T *k, const T *v, T *out, int t, int s,   \
                                   int heads, int kv_heads, int causal_start, float scale_log2, \
                                   const Strides strides) {                                    \
        flash_attention<T, HD>(q, k, v, out, t, s, heads, kv_heads, causal_start, scale_log2,  \
                               strides);                                                       \
    }

#define FLASH_DIMS(T, S)                                                                       \
    FLASH_INSTANCE(T, S, 64) FLASH_INSTANCE(T, S, 80) FLASH_INSTANCE(T, S, 96)                 \
    FLASH_INSTANCE(T, S, 128)

FLASH_DIMS(__half, f16)
FLASH_DIMS(__nv_bfloat16, bf16)
