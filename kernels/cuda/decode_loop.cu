// cuda_persistent decode loop (SPEC 2.2): kernels/decode_loop.py's design in CUDA C++. One launch
// runs all T steps; CTA b is pinned to sequence b and runs its steps back to back: RMSNorm, the
// QKV GEMV, the KV append at position seq_len, attention over positions 0..seq_len (the tensor-
// core core of attention.cuh, K and V streamed from the cache in 128-position blocks), the
// output GEMV and the residual, which is the next step's input. Every vector of a step lives in
// shared memory; nothing returns to the host. Rounding points match the Triton loop: x, q, the
// appended k and v and the attention output in the model dtype; qkv and h in fp32.
//
// Defines: ELEM_BF16, HEAD_DIM (64, 128), GROUP_MAX (4, 8, 16), STAGES (K/V blocks in flight).
#define ATT_WARPS 8
#include "attention.cuh"

constexpr int THREADS = ATT_WARPS * 32;
constexpr int GEMV_COLS = 32 * 8;  // columns of one warp pass: 8 per lane, one 16-byte load
// Weight rows a lane loads before its first FMA. The GEMVs wait on L2 and HBM latency, not
// bandwidth: on an H100 the small tier took 398-474 us with 4 rows in flight (by ptxas's
// schedule), 296-310 us with 32.
constexpr int GEMV_ROWS_IN_FLIGHT = 32;

struct LoopArgs {
    const u16 *h_in, *w_qkv, *w_o, *gamma;
    u16 *k, *v;     // caches [B, Hkv, L_max, D]
    int* seq_lens;  // advanced by steps, or kept where the steps no longer fit
    u16* out;       // [B, steps, d_model]
    float eps, qk_scale;
    long long stride_kb, stride_kh, stride_kl;
    int steps, capacity, kv_heads, group, d_model, width;  // capacity: L_max
};

// y = x @ W for one token: x float[K] in shared memory, W [K, N] row-major in global memory.
// Warp w sums rows [w K / ATT_WARPS, (w + 1) K / ATT_WARPS); lanes take 8 columns each. The
// warps' partial sums go to partial [ATT_WARPS][N]; the caller adds them up after a barrier.
__device__ __forceinline__ void gemv(const float* x, const u16* w, int k_dim, int n_dim, float* partial, int lane,
                                     int warp) {
    const int rows = k_dim / ATT_WARPS, k0 = warp * rows;
    for (int n0 = lane * 8; n0 < n_dim; n0 += GEMV_COLS) {
        float acc[8] = {};
        const u16* wp = w + (long long)k0 * n_dim + n0;
#pragma unroll GEMV_ROWS_IN_FLIGHT
        for (int k = 0; k < rows; ++k) {
            uint4 raw = __ldg(reinterpret_cast<const uint4*>(wp + (long long)k * n_dim));
            const u16* wv = reinterpret_cast<const u16*>(&raw);
            float xk = x[k0 + k];
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[i] += xk * elem_to_f32(wv[i]);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) partial[warp * n_dim + n0 + i] = acc[i];
    }
}

__device__ __forceinline__ float sum_partials(const float* partial, int n_dim, int n) {
    float y = 0.f;
#pragma unroll
    for (int w = 0; w < ATT_WARPS; ++w) y += partial[w * n_dim + n];
    return y;
}

__device__ __forceinline__ float round_elem(float x) { return elem_to_f32(f32_to_elem(x)); }

extern "C" __global__ void __launch_bounds__(THREADS) decode_loop_persistent(const LoopArgs a) {
    extern __shared__ __align__(1024) u8 smem_raw[];
    // Shared memory: [K/V stages | GEMV partials] (never live at once), merge, h, x, attn, qkv, q.
    const int union_bytes = max(STAGES * STAGE_BYTES, ATT_WARPS * max(a.width, a.d_model) * 4);
    const u32 stages = smem_addr(smem_raw);
    float* partial = reinterpret_cast<float*>(smem_raw);
    float* merge = reinterpret_cast<float*>(smem_raw + union_bytes);
    float* h = merge + MERGE_FLOATS;    // [d_model] fp32: the running hidden state
    float* x = h + a.d_model;           // [d_model]: the normalized input, rounded to the dtype
    float* attn = x + a.d_model;        // [Hq D]: the attention output, rounded to the dtype
    float* qkv = attn + a.d_model;      // [width] fp32
    u16* q = reinterpret_cast<u16*>(qkv + a.width);  // [Hq D] in the dtype: the mma A operand
    __shared__ float red[ATT_WARPS];
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, b = blockIdx.x;
    if (dynamic_smem_bytes() < union_bytes + (MERGE_FLOATS + 3 * a.d_model + a.width) * 4 + a.d_model * 2)
        __trap();

    int seq_len = a.seq_lens[b];
    if (seq_len < 0 || seq_len > a.capacity - a.steps) {  // its steps would append outside the cache
        // nothing appended, seq_len kept: NaN outputs fail the caller's checks
        const u16 nan = f32_to_elem(__int_as_float(0x7fc00000));
        u16* out = a.out + (long long)b * a.steps * a.d_model;
        for (int i = tid; i < a.steps * a.d_model; i += THREADS) out[i] = nan;
        return;
    }
    for (int i = tid; i < a.d_model; i += THREADS) h[i] = elem_to_f32(a.h_in[(long long)b * a.d_model + i]);
    const long long cache_row0 = (long long)b * a.stride_kb;
    for (int t = 0; t < a.steps; ++t) {
        // RMSNorm
        float ss = 0.f;
        __syncthreads();  // h of the previous step is complete
        for (int i = tid; i < a.d_model; i += THREADS) ss += h[i] * h[i];
#pragma unroll
        for (int m = 16; m > 0; m /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, m);
        if (lane == 0) red[warp] = ss;
        __syncthreads();
        ss = 0.f;
#pragma unroll
        for (int w = 0; w < ATT_WARPS; ++w) ss += red[w];
        float inv_rms = rsqrtf(ss / a.d_model + a.eps);
        for (int i = tid; i < a.d_model; i += THREADS) x[i] = round_elem(h[i] * inv_rms * elem_to_f32(a.gamma[i]));
        __syncthreads();

        // q, k, v = x @ W_qkv; q to the dtype; k, v appended at position seq_len
        gemv(x, a.w_qkv, a.d_model, a.width, partial, lane, warp);
        __syncthreads();
        for (int n = tid; n < a.width; n += THREADS) qkv[n] = sum_partials(partial, a.width, n);
        __syncthreads();
        for (int n = tid; n < a.d_model; n += THREADS) q[n] = f32_to_elem(qkv[n]);
        for (int i = tid; i < a.kv_heads * HEAD_DIM; i += THREADS) {
            int kvh = i / HEAD_DIM, d = i % HEAD_DIM;
            long long row = cache_row0 + kvh * a.stride_kh + seq_len * a.stride_kl + d;
            a.k[row] = f32_to_elem(qkv[a.d_model + i]);
            a.v[row] = f32_to_elem(qkv[a.d_model + a.kv_heads * HEAD_DIM + i]);
        }
        ++seq_len;
        __syncthreads();  // q and this CTA's appended rows are visible to the whole CTA

        // attention over positions 0..seq_len - 1, one KV head at a time
        const int blocks = (seq_len + BLOCK_N - 1) / BLOCK_N;
        for (int kvh = 0; kvh < a.kv_heads; ++kvh) {
            const long long head_row = cache_row0 + kvh * a.stride_kh;
            auto issue = [&](int j, u32 stage) {
                for (int i = tid; i < BLOCK_N * CHUNKS; i += THREADS) {
                    int r = i / CHUNKS, c = i % CHUNKS, pos = j * BLOCK_N + r;
                    bool valid = pos < seq_len;
                    long long off = head_row + (valid ? pos : 0) * a.stride_kl + c * 8;
                    cp_async_16_zfill(stage + swz(r, c), a.k + off, valid);
                    cp_async_16_zfill(stage + KV_BYTES + swz(r, c), a.v + off, valid);
                }
            };
            u32 qa[K_STEPS][4];
            load_q(qa, q + kvh * a.group * HEAD_DIM, HEAD_DIM, a.group, lane);
            WarpSoftmax state;
            state.reset();
            for (int s = 0; s < STAGES - 1; ++s) {
                if (s < blocks) issue(s, stages + s * STAGE_BYTES);
                cp_async_commit();
            }
            for (int j = 0; j < blocks; ++j) {
                if (j + STAGES - 1 < blocks) issue(j + STAGES - 1, stages + ((j + STAGES - 1) % STAGES) * STAGE_BYTES);
                cp_async_commit();
                cp_async_wait<STAGES - 1>();
                __syncthreads();
                const u32 kst = stages + (j % STAGES) * STAGE_BYTES;
                int first = j * BLOCK_N + warp * WARP_N;
                if (first < seq_len)
                    state.attend(kst, kst + KV_BYTES, qa, first, seq_len, a.qk_scale, lane, warp);
                __syncthreads();  // the stage is refilled next
            }
            state.store(merge, a.group, lane, warp);
            __syncthreads();
            for (int i = tid; i < a.group * QUADS; i += THREADS) {
                int g = i / QUADS, d = (i % QUADS) * 4;
                float m, l;
                float4 o = merge_warps(merge, g, d, &m, &l);
                o = scale4(o, __frcp_rn(l));
                float* out = attn + (kvh * a.group + g) * HEAD_DIM + d;
                out[0] = round_elem(o.x);
                out[1] = round_elem(o.y);
                out[2] = round_elem(o.z);
                out[3] = round_elem(o.w);
            }
            __syncthreads();  // the merge buffer is reused by the next head
        }
        cp_async_wait<0>();

        // h += attn @ W_o: the step's output and the next step's input
        gemv(attn, a.w_o, a.d_model, a.d_model, partial, lane, warp);
        __syncthreads();
        for (int n = tid; n < a.d_model; n += THREADS) {
            h[n] += sum_partials(partial, a.d_model, n);
            a.out[((long long)b * a.steps + t) * a.d_model + n] = f32_to_elem(h[n]);
        }
    }
    if (tid == 0) a.seq_lens[b] = seq_len;
}
