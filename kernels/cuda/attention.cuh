// The tensor-core attention core shared by decode_attention.cu and decode_loop.cu: K and V
// blocks staged in shared memory (16-byte chunks, XOR-swizzled), ATT_WARPS warps each taking 16
// positions of a block with mma.sync m16n8k16 (the query heads of one KV head as the M rows):
// S = Q K^T, an online softmax in registers, O += P V; then the warps' states merge through
// shared memory. Shared memory is addressed by 32-bit shared-window addresses throughout (no
// generic-to-shared conversion per access).
//
// Defines: ELEM_BF16, HEAD_DIM (64, 128), GROUP_MAX (4, 8, 16: at least the query heads per KV
// head); ATT_WARPS (default 4).
#pragma once
#include "common.cuh"

#ifndef ATT_WARPS
#define ATT_WARPS 4
#endif

constexpr int WARP_N = 16;                   // positions per warp per block
constexpr int BLOCK_N = ATT_WARPS * WARP_N;  // positions per pipeline stage
constexpr int CHUNKS = HEAD_DIM / 8;         // 16-byte chunks per K or V row
constexpr int K_STEPS = HEAD_DIM / 16;       // mma k-steps of Q K^T
constexpr int D_TILES = HEAD_DIM / 8;        // mma n-tiles of O
constexpr int QUADS = HEAD_DIM / 4;          // float4s per head row (the warps' merge)
constexpr int ROW_BYTES = HEAD_DIM * 2;
constexpr int KV_BYTES = BLOCK_N * ROW_BYTES;  // one block of K (or V)
constexpr int STAGE_BYTES = 2 * KV_BYTES;      // K then V
constexpr int MERGE_FLOATS = ATT_WARPS * GROUP_MAX * (HEAD_DIM + 2);  // the warps' m, l and O

static_assert(GROUP_MAX >= 1 && GROUP_MAX <= 16, "query heads per KV head: the 16 rows of an mma tile");

__device__ __forceinline__ void cp_async_16_zfill(u32 dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// d += a (16x16, row) . b (16x8, col), fp32 accumulators
__device__ __forceinline__ void mma(float* d, const u32* a, u32 b0, u32 b1) {
#if ELEM_BF16
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};"
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};"
#endif
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
#if ELEM_BF16
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}

__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Byte offset of 16-byte chunk c of row r in a K or V block: chunks XOR-swizzled by the row so
// that ldmatrix's eight rows of one chunk column fall in different banks.
__device__ __forceinline__ u32 swz(int r, int c) { return r * ROW_BYTES + ((c ^ (r & 7)) << 4); }

// Q as mma A fragments: rows = the GROUP query heads of a KV head (zero past `group`), read from
// q (global or shared memory) with stride_h elements between heads.
__device__ __forceinline__ void load_q(u32 (*qa)[4], const u16* q, long long stride_h, int group, int lane) {
    const int r0 = lane / 4, cq = (lane % 4) * 2;
#pragma unroll
    for (int ks = 0; ks < K_STEPS; ++ks)
#pragma unroll
        for (int h = 0; h < 4; ++h) {
            int row = r0 + (h % 2) * 8, col = ks * 16 + cq + (h / 2) * 8;
            qa[ks][h] = row < group ? *reinterpret_cast<const u32*>(q + row * stride_h + col) : 0u;
        }
}

// One warp's online-softmax state over the positions it has seen: rows lane / 4 and lane / 4 + 8.
struct WarpSoftmax {
    float o[D_TILES][4], m[2], l[2];

    __device__ __forceinline__ void reset() {
#pragma unroll
        for (int t = 0; t < D_TILES; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;
        m[0] = m[1] = NEG_INF;
        l[0] = l[1] = 0.f;
    }

    // This warp's 16 rows of a staged block (kst, vst: shared addresses of the block's K and V);
    // `first` is the position of its first row, positions >= end are masked. scale: log2(e) / sqrt(D).
    __device__ __forceinline__ void attend(u32 kst, u32 vst, const u32 (*qa)[4], int first, int end, float scale,
                                           int lane, int warp) {
        const int cq = (lane % 4) * 2;
        float s[2][4] = {};
        const int krow = warp * WARP_N + (lane / 16) * 8 + lane % 8;
#pragma unroll
        for (int ks = 0; ks < K_STEPS; ++ks) {
            u32 b[4];
            ldmatrix_x4(b, kst + swz(krow, ks * 2 + (lane / 8) % 2));
            mma(s[0], qa[ks], b[0], b[1]);
            mma(s[1], qa[ks], b[2], b[3]);
        }
        float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                bool valid = first + t * 8 + cq + e % 2 < end;
                s[t][e] = valid ? s[t][e] * scale : NEG_INF;
                mx[e / 2] = fmaxf(mx[e / 2], s[t][e]);
            }
        float alpha[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
            float m_new = fmaxf(m[h], mx[h]);
            alpha[h] = exp2_approx(m[h] - m_new);
            m[h] = m_new;
            l[h] *= alpha[h];
        }
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[t][e] = exp2_approx(s[t][e] - m[e / 2]);
                l[e / 2] += s[t][e];
            }
        u32 pa[4] = {pack2(s[0][0], s[0][1]), pack2(s[0][2], s[0][3]), pack2(s[1][0], s[1][1]),
                     pack2(s[1][2], s[1][3])};
#pragma unroll
        for (int t = 0; t < D_TILES; ++t) {
            o[t][0] *= alpha[0];
            o[t][1] *= alpha[0];
            o[t][2] *= alpha[1];
            o[t][3] *= alpha[1];
        }
        const int vrow = warp * WARP_N + ((lane / 8) % 2) * 8 + lane % 8;
#pragma unroll
        for (int dp = 0; dp < D_TILES / 2; ++dp) {
            u32 b[4];
            ldmatrix_x4_trans(b, vst + swz(vrow, dp * 2 + lane / 16));
            mma(o[2 * dp], pa, b[0], b[1]);
            mma(o[2 * dp + 1], pa, b[2], b[3]);
        }
    }

    // Into merge: m [ATT_WARPS][GROUP_MAX], l [ATT_WARPS][GROUP_MAX], O [ATT_WARPS][GROUP_MAX][D].
    __device__ __forceinline__ void store(float* merge, int group, int lane, int warp) {
        float* m_w = merge;
        float* l_w = merge + ATT_WARPS * GROUP_MAX;
        float* o_w = merge + 2 * ATT_WARPS * GROUP_MAX;
        const int cq = (lane % 4) * 2;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
            l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
            int row = lane / 4 + h * 8;
            if (row >= group) continue;
            if (lane % 4 == 0) {
                m_w[warp * GROUP_MAX + row] = m[h];
                l_w[warp * GROUP_MAX + row] = l[h];
            }
#pragma unroll
            for (int t = 0; t < D_TILES; ++t)
                *reinterpret_cast<float2*>(o_w + (warp * GROUP_MAX + row) * HEAD_DIM + t * 8 + cq) =
                    make_float2(o[t][2 * h], o[t][2 * h + 1]);
        }
    }
};

__device__ __forceinline__ float4 scale4(float4 o, float s) { return make_float4(o.x * s, o.y * s, o.z * s, o.w * s); }

// Head g, elements d..d+3 of the warps' merged state: returns O (unnormalized), sets m and l.
__device__ __forceinline__ float4 merge_warps(const float* merge, int g, int d, float* m_out, float* l_out) {
    const float* m_w = merge;
    const float* l_w = merge + ATT_WARPS * GROUP_MAX;
    const float* o_w = merge + 2 * ATT_WARPS * GROUP_MAX;
    float m = NEG_INF;
#pragma unroll
    for (int w = 0; w < ATT_WARPS; ++w) m = fmaxf(m, m_w[w * GROUP_MAX + g]);
    float l = 0.f;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int w = 0; w < ATT_WARPS; ++w) {
        const float s = exp2_approx(m_w[w * GROUP_MAX + g] - m);
        const float4 ow = *reinterpret_cast<const float4*>(o_w + (w * GROUP_MAX + g) * HEAD_DIM + d);
        l += l_w[w * GROUP_MAX + g] * s;
        o = make_float4(o.x + ow.x * s, o.y + ow.y * s, o.z + ow.z * s, o.w + ow.w * s);
    }
    *m_out = m;
    *l_out = l;
    return o;
}
