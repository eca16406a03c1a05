// cuda_persistent decode attention (SPEC 2.1): the design of kernels/decode_attention.py's
// triton_persistent, natively. One launch, grid = SMs x CTAS_PER_SM; every CTA derives the work
// list of (sequence, KV head, chunk) tiles from seq_lens and takes tiles blockIdx.x,
// blockIdx.x + gridDim.x, ... A tile attends its GROUP query heads over its chunk of positions:
// - K, V stream through shared memory in blocks of BLOCK_N positions, STAGES blocks in flight
//   (16-byte cp.async, zero-filled past the sequence's end), across tile boundaries;
// - each of the 4 warps takes 16 positions of a block on the tensor cores (mma.sync m16n8k16,
//   query heads as the M rows): S = Q K^T, an online softmax in registers, O += P V;
// - at a tile's end the warps' partial softmax states merge through shared memory; a single-
//   chunk tile writes the output, else its normalized partial and log-sum-exp go to a workspace
//   and the tile that finishes last for its (sequence, KV head) merges them (an atomic counter
//   per (sequence, KV head), reset by that tile for the next launch).
//
// Defines: ELEM_BF16 (1 bf16, 0 fp16), HEAD_DIM (64, 128), STAGES (blocks in flight), GROUP_MAX (4, 8 or 16: at least the
// query heads per KV head, which are a run-time argument; it sizes the merge buffer),
// PAGED (1: k, v are [pages, page_size, Hkv, D] through block_table; 0: [B, Hkv, L_max, D]).
#include "common.cuh"

constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
constexpr int WARP_N = 16;                   // positions per warp per block
constexpr int BLOCK_N = WARPS * WARP_N;      // positions per pipeline stage
constexpr int CHUNKS = HEAD_DIM / 8;         // 16-byte chunks per K or V row
constexpr int K_STEPS = HEAD_DIM / 16;       // mma k-steps of Q K^T
constexpr int D_TILES = HEAD_DIM / 8;        // mma n-tiles of O
constexpr int STAGE_ELEMS = 2 * BLOCK_N * HEAD_DIM;  // K then V
constexpr int MERGE_BATCH = 8;              // partials loaded at once by the cross-chunk merge
constexpr int MAX_BATCH = 1024;
constexpr int SCAN_PER_THREAD = MAX_BATCH / THREADS;

static_assert(GROUP_MAX >= 1 && GROUP_MAX <= 16, "query heads per KV head: the 16 rows of an mma tile");

// Dynamic shared memory: STAGES x (K, V) blocks, the warps' softmax states for the merge, then the
// work list's prefix sums (batch ints). The launcher computes the same size
// (kernels/cuda_decode_attention.py); a smaller one traps.
constexpr int MERGE_OFFSET = STAGES * STAGE_ELEMS * 2;
constexpr int TILE_END_OFFSET = MERGE_OFFSET + WARPS * GROUP_MAX * (HEAD_DIM + 2) * 4;

__device__ __forceinline__ void cp_async_16_zfill(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(u32* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(u32* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
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

// Element offset of 16-byte chunk c of row r in a stage: chunks XOR-swizzled by the row so that
// ldmatrix's eight rows of one chunk column fall in different banks.
__device__ __forceinline__ int swz(int r, int c) { return r * HEAD_DIM + ((c ^ (r & 7)) * 8); }

struct Args {
    const u16 *q, *k, *v;
    const int *seq_lens, *block_table;
    float *part_o, *part_lse;
    int* counters;
    u16* out;
    float qk_scale;  // log2(e) / sqrt(D): scores in the exp2 domain
    long long stride_qb, stride_qh, stride_kx, stride_ky, stride_kh, stride_bt, stride_ob, stride_oh;
    int page_size, max_chunks, num_q_heads, num_kv_heads, group, chunk, batch;
};

struct Tile {
    int b, kvh, c, n_chunks, start, end;
};

// The CTA's stream of (tile, block): tiles blockIdx.x + i * gridDim.x, each in blocks of BLOCK_N.
struct Stream {
    const int* tile_end;  // shared: inclusive prefix sums of tiles per sequence
    int total, t, j;
    Tile tile;
    __device__ void locate(const Args& a) {
        int lo = 0, hi = a.batch - 1;  // first sequence whose prefix passes t
        while (lo < hi) {
            int mid = (lo + hi) / 2;
            if (tile_end[mid] > t) hi = mid; else lo = mid + 1;
        }
        int len = a.seq_lens[lo], n_chunks = (len + a.chunk - 1) / a.chunk;
        int local = t - (lo ? tile_end[lo - 1] : 0), c = local % n_chunks;
        tile = {lo, local / n_chunks, c, n_chunks, c * a.chunk, min(c * a.chunk + a.chunk, len)};
    }
    __device__ bool done() const { return t >= total; }
    __device__ bool last_block() const { return tile.start + (j + 1) * BLOCK_N >= tile.end; }
    __device__ void next(const Args& a) {
        if (!last_block()) {
            ++j;
            return;
        }
        j = 0;
        t += gridDim.x;
        if (!done()) locate(a);
    }
};

// Element offset of position pos's K (and V) row; K and V share strides.
__device__ __forceinline__ long long row_offset(const Args& a, const Tile& tile, int pos) {
    long long x = tile.b, y = pos;
#if PAGED
    x = a.block_table[tile.b * a.stride_bt + pos / a.page_size];
    y = pos % a.page_size;
#endif
    return x * a.stride_kx + y * a.stride_ky + tile.kvh * a.stride_kh;
}

// All threads: K and V rows of block j of the tile into a stage; rows past the end zero-filled.
__device__ __forceinline__ void issue(const Args& a, const Stream& s, u16* stage) {
    for (int i = threadIdx.x; i < BLOCK_N * CHUNKS; i += THREADS) {
        int r = i / CHUNKS, c = i % CHUNKS, pos = s.tile.start + s.j * BLOCK_N + r;
        bool valid = pos < s.tile.end;
        long long off = row_offset(a, s.tile, valid ? pos : s.tile.start) + c * 8;
        cp_async_16_zfill(stage + swz(r, c), a.k + off, valid);
        cp_async_16_zfill(stage + BLOCK_N * HEAD_DIM + swz(r, c), a.v + off, valid);
    }
}

// Combine the warps' states in `merge` into the tile's result: the output (single chunk) or a
// partial, then the cross-chunk merge by whichever tile of (b, kvh) finishes last.
__device__ void finish_tile(const Args& a, const Tile& tile, float* merge, int* last_flag) {
    const float* m_w = merge;
    const float* l_w = merge + WARPS * GROUP_MAX;
    const float* o_w = merge + 2 * WARPS * GROUP_MAX;
    long long head0 = (long long)tile.b * a.num_q_heads + tile.kvh * a.group;
    for (int i = threadIdx.x; i < a.group * HEAD_DIM; i += THREADS) {
        int g = i / HEAD_DIM, d = i % HEAD_DIM;
        float m = NEG_INF;
        for (int w = 0; w < WARPS; ++w) m = fmaxf(m, m_w[w * GROUP_MAX + g]);
        float l = 0.f, o = 0.f;
        for (int w = 0; w < WARPS; ++w) {
            float scale = exp2_approx(m_w[w * GROUP_MAX + g] - m);
            l += l_w[w * GROUP_MAX + g] * scale;
            o += o_w[(w * GROUP_MAX + g) * HEAD_DIM + d] * scale;
        }
        if (tile.n_chunks == 1) {
            a.out[tile.b * a.stride_ob + (tile.kvh * a.group + g) * a.stride_oh + d] = f32_to_elem(o / l);
        } else {
            long long part = (head0 + g) * a.max_chunks + tile.c;
            a.part_o[part * HEAD_DIM + d] = o / l;
            if (d == 0) a.part_lse[part] = m + __log2f(l);
        }
    }
    if (tile.n_chunks == 1) return;
    __threadfence();  // this tile's partial is visible device-wide before the counter says so
    __syncthreads();
    if (threadIdx.x == 0) {
        int* counter = a.counters + tile.b * a.num_kv_heads + tile.kvh;
        *last_flag = atomicAdd(counter, 1) == tile.n_chunks - 1;
        if (*last_flag) atomicExch(counter, 0);  // ready for the next launch
    }
    __syncthreads();
    if (!*last_flag) return;
    __threadfence();
    for (int i = threadIdx.x; i < a.group * HEAD_DIM; i += THREADS) {
        int g = i / HEAD_DIM, d = i % HEAD_DIM;
        long long part = (head0 + g) * a.max_chunks;
        float m = NEG_INF, l = 0.f, o = 0.f;
        for (int c0 = 0; c0 < tile.n_chunks; c0 += MERGE_BATCH) {
            float lse[MERGE_BATCH], po[MERGE_BATCH];
#pragma unroll
            for (int u = 0; u < MERGE_BATCH; ++u) {  // all loads in flight at once; .cg: never from L1
                bool ok = c0 + u < tile.n_chunks;
                lse[u] = ok ? __ldcg(a.part_lse + part + c0 + u) : NEG_INF;
                po[u] = ok ? __ldcg(a.part_o + (part + c0 + u) * HEAD_DIM + d) : 0.f;
            }
#pragma unroll
            for (int u = 0; u < MERGE_BATCH; ++u) {
                if (c0 + u >= tile.n_chunks) break;
                float m_new = fmaxf(m, lse[u]);
                float alpha = exp2_approx(m - m_new), w = exp2_approx(lse[u] - m_new);
                l = l * alpha + w;
                o = o * alpha + w * po[u];
                m = m_new;
            }
        }
        a.out[tile.b * a.stride_ob + (tile.kvh * a.group + g) * a.stride_oh + d] = f32_to_elem(o / l);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS) decode_persistent(const Args a) {
    extern __shared__ __align__(1024) u8 smem_raw[];
    u16* stages = reinterpret_cast<u16*>(smem_raw);
    float* merge = reinterpret_cast<float*>(smem_raw + MERGE_OFFSET);
    int* tile_end = reinterpret_cast<int*>(smem_raw + TILE_END_OFFSET);
    __shared__ int warp_sums[WARPS];
    __shared__ int last_flag;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (dynamic_smem_bytes() < TILE_END_OFFSET + a.batch * 4) __trap();

    // Work list: inclusive prefix sums of cdiv(len_b, chunk) * Hkv tiles, a block-wide scan.
    int counts[SCAN_PER_THREAD], running = 0;
#pragma unroll
    for (int i = 0; i < SCAN_PER_THREAD; ++i) {
        int b = threadIdx.x * SCAN_PER_THREAD + i;
        counts[i] = b < a.batch ? (a.seq_lens[b] + a.chunk - 1) / a.chunk * a.num_kv_heads : 0;
        running += counts[i];
    }
    int scan = running;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
        int up = __shfl_up_sync(0xffffffffu, scan, off);
        if (lane >= off) scan += up;
    }
    if (lane == 31) warp_sums[warp] = scan;
    __syncthreads();
    int offset = scan - running;
    for (int w = 0; w < warp; ++w) offset += warp_sums[w];
#pragma unroll
    for (int i = 0; i < SCAN_PER_THREAD; ++i) {
        offset += counts[i];
        if (threadIdx.x * SCAN_PER_THREAD + i < a.batch) tile_end[threadIdx.x * SCAN_PER_THREAD + i] = offset;
    }
    __syncthreads();

    Stream prod{tile_end, tile_end[a.batch - 1], (int)blockIdx.x, 0, {}};
    if (prod.done()) return;
    prod.locate(a);
    Stream cons = prod;
    for (int s = 0; s < STAGES - 1; ++s) {
        if (!prod.done()) {
            issue(a, prod, stages + s * STAGE_ELEMS);
            prod.next(a);
        }
        cp_async_commit();
    }

    u32 qa[K_STEPS][4];  // Q as mma A fragments: rows = query heads of the KV head, zero past GROUP
    float o[D_TILES][4], m[2], l[2];  // rows lane / 4 and lane / 4 + 8
    const int r0 = lane / 4, r1 = r0 + 8, cq = (lane % 4) * 2;
    for (int i = 0; !cons.done(); ++i) {
        if (!prod.done()) {
            issue(a, prod, stages + ((i + STAGES - 1) % STAGES) * STAGE_ELEMS);
            prod.next(a);
        }
        cp_async_commit();
        cp_async_wait<STAGES - 1>();
        __syncthreads();
        const Tile& tile = cons.tile;
        if (cons.j == 0) {
            const u16* qb = a.q + tile.b * a.stride_qb + tile.kvh * a.group * a.stride_qh;
#pragma unroll
            for (int ks = 0; ks < K_STEPS; ++ks) {
#pragma unroll
                for (int h = 0; h < 4; ++h) {
                    int row = (h % 2) ? r1 : r0, col = ks * 16 + cq + (h / 2) * 8;
                    qa[ks][h] = row < a.group ? *reinterpret_cast<const u32*>(qb + row * a.stride_qh + col) : 0u;
                }
            }
#pragma unroll
            for (int t = 0; t < D_TILES; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;
            m[0] = m[1] = NEG_INF;
            l[0] = l[1] = 0.f;
        }
        const u16* kst = stages + (i % STAGES) * STAGE_ELEMS;
        const u16* vst = kst + BLOCK_N * HEAD_DIM;
        int first = tile.start + cons.j * BLOCK_N + warp * WARP_N;  // this warp's 16 positions
        if (first < tile.end) {
            float s[2][4] = {};
#pragma unroll
            for (int ks = 0; ks < K_STEPS; ++ks) {
                u32 b[4];
                ldmatrix_x4(b, kst + swz(warp * WARP_N + (lane / 16) * 8 + lane % 8, ks * 2 + (lane / 8) % 2));
                mma(s[0], qa[ks], b[0], b[1]);
                mma(s[1], qa[ks], b[2], b[3]);
            }
            float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
            for (int t = 0; t < 2; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    bool valid = first + t * 8 + cq + e % 2 < tile.end;
                    s[t][e] = valid ? s[t][e] * a.qk_scale : NEG_INF;
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
#pragma unroll
            for (int dp = 0; dp < D_TILES / 2; ++dp) {
                u32 b[4];
                ldmatrix_x4_trans(b, vst + swz(warp * WARP_N + ((lane / 8) % 2) * 8 + lane % 8, dp * 2 + lane / 16));
                mma(o[2 * dp], pa, b[0], b[1]);
                mma(o[2 * dp + 1], pa, b[2], b[3]);
            }
        }
        if (cons.last_block()) {  // the warps' states into shared memory, merged there
            float* m_w = merge;
            float* l_w = merge + WARPS * GROUP_MAX;
            float* o_w = merge + 2 * WARPS * GROUP_MAX;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
                l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
                int row = h ? r1 : r0;
                if (row < a.group) {
                    if (lane % 4 == 0) {
                        m_w[warp * GROUP_MAX + row] = m[h];
                        l_w[warp * GROUP_MAX + row] = l[h];
                    }
#pragma unroll
                    for (int t = 0; t < D_TILES; ++t) {
                        o_w[(warp * GROUP_MAX + row) * HEAD_DIM + t * 8 + cq] = o[t][2 * h];
                        o_w[(warp * GROUP_MAX + row) * HEAD_DIM + t * 8 + cq + 1] = o[t][2 * h + 1];
                    }
                }
            }
            __syncthreads();
            finish_tile(a, tile, merge, &last_flag);
        }
        __syncthreads();  // stage i % STAGES (and the merge buffer) are refilled next
        cons.next(a);
    }
}
