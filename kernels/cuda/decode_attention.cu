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
#include "attention.cuh"

constexpr int WARPS = ATT_WARPS;
constexpr int THREADS = WARPS * 32;
constexpr int MERGE_BATCH = 8;  // partials loaded at once by the cross-chunk merge
constexpr int MAX_BATCH = 1024;
constexpr int SCAN_PER_THREAD = MAX_BATCH / THREADS;

// Dynamic shared memory: STAGES x (K, V) blocks, the warps' softmax states for the merge, then the
// work list's prefix sums (batch ints). The launcher computes the same size
// (kernels/cuda_decode_attention.py); a smaller one traps.
constexpr int MERGE_OFFSET = STAGES * STAGE_ELEMS * 2;
constexpr int TILE_END_OFFSET = MERGE_OFFSET + MERGE_FLOATS * 4;

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
__device__ void finish_tile(const Args& a, const Tile& tile, const float* merge, int* last_flag) {
    long long head0 = (long long)tile.b * a.num_q_heads + tile.kvh * a.group;
    for (int i = threadIdx.x; i < a.group * HEAD_DIM; i += THREADS) {
        int g = i / HEAD_DIM, d = i % HEAD_DIM;
        float m, l, o = merge_warps(merge, g, d, &m, &l);
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

    u32 qa[K_STEPS][4];
    WarpSoftmax state;
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
            load_q(qa, a.q + tile.b * a.stride_qb + tile.kvh * a.group * a.stride_qh, a.stride_qh, a.group, lane);
            state.reset();
        }
        const u16* kst = stages + (i % STAGES) * STAGE_ELEMS;
        int first = tile.start + cons.j * BLOCK_N + warp * WARP_N;  // this warp's 16 positions
        if (first < tile.end) state.attend(kst, kst + BLOCK_N * HEAD_DIM, qa, first, tile.end, a.qk_scale, lane, warp);
        if (cons.last_block()) {  // the warps' states into shared memory, merged there
            state.store(merge, a.group, lane, warp);
            __syncthreads();
            finish_tile(a, tile, merge, &last_flag);
        }
        __syncthreads();  // stage i % STAGES (and the merge buffer) are refilled next
        cons.next(a);
    }
}
