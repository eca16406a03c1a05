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
// At B <= 4 an SM runs one CTA of 4 warps, so nothing hides latency: the dependent round trips
// at a tile's ends and the instructions per block set the time. Hence every seq_lens load is
// issued before any is used, q loads while the first block is awaited, one thread publishes a
// tile with an acq_rel atomic, the cross-chunk merge loads 16 partials at once, and the copy
// loop's trip count, swizzle and shared addresses are compile-time or per-thread constants.
//
// Defines: ELEM_BF16 (1 bf16, 0 fp16), HEAD_DIM (64, 128), STAGES (blocks in flight), GROUP_MAX (4, 8 or 16: at least the
// query heads per KV head, which are a run-time argument; it sizes the merge buffer),
// PAGED (1: k, v are [pages, page_size, Hkv, D] through block_table; 0: [B, Hkv, L_max, D]).
#include "attention.cuh"

constexpr int WARPS = ATT_WARPS;
constexpr int THREADS = WARPS * 32;
constexpr int MIN_CTAS = 3;  // CTAs per SM the register budget must allow (the launcher's CTAS_PER_SM)
constexpr int ROWS_PER_PASS = THREADS / CHUNKS;  // rows one pass of the CTA's copies covers
constexpr int PASSES = BLOCK_N / ROWS_PER_PASS;  // cp.async pairs per thread per block
constexpr int MERGE_BATCH = 16;  // partials loaded at once by the cross-chunk merge
constexpr int MAX_BATCH = 1024;
constexpr int SCAN_PER_THREAD = MAX_BATCH / THREADS;

static_assert(THREADS % CHUNKS == 0 && BLOCK_N % ROWS_PER_PASS == 0, "whole passes of whole rows");
static_assert(ROWS_PER_PASS % 8 == 0, "a thread's rows share their swizzle (row % 8)");

// Dynamic shared memory: STAGES x (K, V) blocks, the warps' softmax states for the merge, then the
// work list's prefix sums (batch ints). The launcher computes the same size
// (kernels/cuda_decode_attention.py); a smaller one traps.
constexpr int MERGE_OFFSET = STAGES * STAGE_BYTES;
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
    int capacity;  // most positions a sequence may hold: L_max, or the block table's width x page_size
};

// ---- the work list ----

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
        int len = a.seq_lens[lo], n_chunks = (len + a.chunk - 1) >> (__ffs(a.chunk) - 1);  // chunk: a power of two
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

// All threads: K and V rows of block j of the tile into the stage at shared address `stage`; rows
// past the end zero-filled. Thread t copies chunk t % CHUNKS of rows t / CHUNKS + p * ROWS_PER_PASS.
__device__ __forceinline__ void issue(const Args& a, const Stream& s, u32 stage) {
    const int r0 = threadIdx.x / CHUNKS, c = threadIdx.x % CHUNKS;
    const u32 dst = stage + swz(r0, c);  // + p * ROWS_PER_PASS * ROW_BYTES: same swizzle (row % 8)
    const int pos0 = s.tile.start + s.j * BLOCK_N + r0;
    const long long head = (long long)s.tile.kvh * a.stride_kh + c * 8;
#if PAGED
    // Positions -> (page, slot): every table load first (one round trip), then the copies.
    const int* table = a.block_table + s.tile.b * a.stride_bt;
    const int ps = a.page_size;
    int page[PASSES], slot[PASSES];
    if ((ps & (ps - 1)) == 0) {
        const int shift = __ffs(ps) - 1;
#pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            int pos = pos0 + p * ROWS_PER_PASS;
            pos = pos < s.tile.end ? pos : s.tile.start;
            page[p] = table[pos >> shift];
            slot[p] = pos & (ps - 1);
        }
    } else {
#pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            int pos = pos0 + p * ROWS_PER_PASS;
            pos = pos < s.tile.end ? pos : s.tile.start;
            int idx = pos / ps;
            page[p] = table[idx];
            slot[p] = pos - idx * ps;
        }
    }
#pragma unroll
    for (int p = 0; p < PASSES; ++p) {
        bool valid = pos0 + p * ROWS_PER_PASS < s.tile.end;
        // unsigned: page, slot >= 0, so no sign extension in the 64-bit products
        u64 off = (u64)(u32)page[p] * (u64)a.stride_kx + (u64)(u32)slot[p] * (u64)a.stride_ky + (u64)head;
        cp_async_16_zfill(dst + p * ROWS_PER_PASS * ROW_BYTES, a.k + off, valid);
        cp_async_16_zfill(dst + KV_BYTES + p * ROWS_PER_PASS * ROW_BYTES, a.v + off, valid);
    }
#else
    const long long base = s.tile.b * a.stride_kx + head;
    const u16* k = a.k + base;
    const u16* v = a.v + base;
#pragma unroll
    for (int p = 0; p < PASSES; ++p) {
        int pos = pos0 + p * ROWS_PER_PASS;
        bool valid = pos < s.tile.end;
        u64 off = (u64)(u32)(valid ? pos : s.tile.start) * (u64)a.stride_ky;  // pos >= 0
        cp_async_16_zfill(dst + p * ROWS_PER_PASS * ROW_BYTES, k + off, valid);
        cp_async_16_zfill(dst + KV_BYTES + p * ROWS_PER_PASS * ROW_BYTES, v + off, valid);
    }
#endif
}

// ---- the end of a tile ----

// Four consecutive elements d..d+3 of output head h of sequence b (rows 4-byte aligned: the launcher checks).
__device__ __forceinline__ void store_out4(const Args& a, int b, int h, int d, float4 o) {
    u32* out = reinterpret_cast<u32*>(a.out + b * a.stride_ob + h * a.stride_oh + d);
    out[0] = pack2(o.x, o.y);
    out[1] = pack2(o.z, o.w);
}

__device__ __forceinline__ int atomic_add_acq_rel_gpu(int* p, int v) {
    int old;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
    return old;
}

// Every output of sequence b as NaN, by one thread: a length outside [1, capacity] at launch.
__device__ void store_nan_sequence(const Args& a, int b) {
    const float nan = __int_as_float(0x7fc00000);
    for (int h = 0; h < a.num_q_heads; ++h)
        for (int d = 0; d < HEAD_DIM; d += 4) store_out4(a, b, h, d, make_float4(nan, nan, nan, nan));
}

// Combine the warps' states in `merge` into the tile's result: the output (single chunk) or a
// partial, then the cross-chunk merge by whichever tile of (b, kvh) finishes last. Threads take
// (head, 4 consecutive d) items.
__device__ void finish_tile(const Args& a, const Tile& tile, const float* merge, int* last_flag) {
    const long long head0 = (long long)tile.b * a.num_q_heads + tile.kvh * a.group;
    for (int i = threadIdx.x; i < a.group * QUADS; i += THREADS) {
        const int g = i / QUADS, d = (i % QUADS) * 4;
        float m, l;
        float4 o = merge_warps(merge, g, d, &m, &l);
        o = scale4(o, __frcp_rn(l));
        if (tile.n_chunks == 1) {
            store_out4(a, tile.b, tile.kvh * a.group + g, d, o);
        } else {
            const long long part = (head0 + g) * a.max_chunks + tile.c;
            *reinterpret_cast<float4*>(a.part_o + part * HEAD_DIM + d) = o;
            if (d == 0) a.part_lse[part] = m + __log2f(l);
        }
    }
    if (tile.n_chunks == 1) return;
    // The barrier orders every thread's partial stores before thread 0's release (CTA scope; the
    // release is cumulative); its acquire makes the other tiles' partials visible to the CTA
    // through the second barrier (the pattern of CUTLASS's semaphore and Triton's _persistent).
    __syncthreads();
    if (threadIdx.x == 0) {
        int* counter = a.counters + tile.b * a.num_kv_heads + tile.kvh;
        *last_flag = atomic_add_acq_rel_gpu(counter, 1) == tile.n_chunks - 1;
        if (*last_flag) atomicExch(counter, 0);  // ready for the next launch
    }
    __syncthreads();
    if (!*last_flag) return;
    for (int i = threadIdx.x; i < a.group * QUADS; i += THREADS) {
        const int g = i / QUADS, d = (i % QUADS) * 4;
        const long long part = (head0 + g) * a.max_chunks;
        float m = NEG_INF, l = 0.f;
        float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int c0 = 0; c0 < tile.n_chunks; c0 += MERGE_BATCH) {
            float lse[MERGE_BATCH];
            float4 po[MERGE_BATCH];
#pragma unroll
            for (int u = 0; u < MERGE_BATCH; ++u) {  // all loads in flight at once; .cg: never from L1
                const bool ok = c0 + u < tile.n_chunks;
                lse[u] = ok ? __ldcg(a.part_lse + part + c0 + u) : NEG_INF;
                po[u] = ok ? __ldcg(reinterpret_cast<const float4*>(a.part_o + (part + c0 + u) * HEAD_DIM + d))
                           : make_float4(0.f, 0.f, 0.f, 0.f);
            }
            float m_new = m;
#pragma unroll
            for (int u = 0; u < MERGE_BATCH; ++u) m_new = fmaxf(m_new, lse[u]);
            const float alpha = exp2_approx(m - m_new);  // 0 for the first batch (m = -inf)
            l *= alpha;
            o = scale4(o, alpha);
#pragma unroll
            for (int u = 0; u < MERGE_BATCH; ++u) {
                const float w = exp2_approx(lse[u] - m_new);  // 0 past n_chunks
                l += w;
                o = make_float4(o.x + w * po[u].x, o.y + w * po[u].y, o.z + w * po[u].z, o.w + w * po[u].w);
            }
            m = m_new;
        }
        store_out4(a, tile.b, tile.kvh * a.group + g, d, scale4(o, __frcp_rn(l)));
    }
}

extern "C" __global__ void __launch_bounds__(THREADS, MIN_CTAS) decode_persistent(const Args a) {
    extern __shared__ __align__(128) u8 smem_raw[];
    const u32 stages = smem_addr(smem_raw);
    float* merge = reinterpret_cast<float*>(smem_raw + MERGE_OFFSET);
    int* tile_end = reinterpret_cast<int*>(smem_raw + TILE_END_OFFSET);
    __shared__ int warp_sums[WARPS];
    __shared__ int last_flag;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (dynamic_smem_bytes() < TILE_END_OFFSET + a.batch * 4) __trap();

    // Work list: inclusive prefix sums of cdiv(len_b, chunk) * Hkv tiles, a block-wide scan. Every
    // load is issued before any is used: one round trip.
    int lens[SCAN_PER_THREAD];
#pragma unroll
    for (int i = 0; i < SCAN_PER_THREAD; ++i) {
        int b = threadIdx.x * SCAN_PER_THREAD + i;
        lens[i] = b < a.batch ? a.seq_lens[b] : 0;
    }
    const int chunk_shift = __ffs(a.chunk) - 1;  // chunk: a power of two (the launcher checks)
    int counts[SCAN_PER_THREAD], running = 0;
#pragma unroll
    for (int i = 0; i < SCAN_PER_THREAD; ++i) {
        // A bound launch reads seq_lens again at every call: a length that no longer fits the cache gets
        // no tiles (nothing read past the cache, no counter touched) and NaN outputs, from CTA b % grid.
        const int b = threadIdx.x * SCAN_PER_THREAD + i;
        if (lens[i] < 1 || lens[i] > a.capacity) {
            if (b < a.batch && b % gridDim.x == blockIdx.x) store_nan_sequence(a, b);
            lens[i] = 0;
        }
        counts[i] = ((lens[i] + a.chunk - 1) >> chunk_shift) * a.num_kv_heads;
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
            issue(a, prod, stages + s * STAGE_BYTES);
            prod.next(a);
        }
        cp_async_commit();
    }

    int i = 0;  // blocks consumed: block i is in stage i % STAGES
    while (!cons.done()) {
        const Tile tile = cons.tile;
        u32 qa[K_STEPS][4];  // in flight while the tile's first block is awaited
        load_q(qa, a.q + tile.b * a.stride_qb + tile.kvh * a.group * a.stride_qh, a.stride_qh, a.group, lane);
        WarpSoftmax state;
        state.reset();
        for (;; ++i) {
            if (!prod.done()) {
                issue(a, prod, stages + ((i + STAGES - 1) % STAGES) * STAGE_BYTES);
                prod.next(a);
            }
            cp_async_commit();
            cp_async_wait<STAGES - 1>();
            __syncthreads();
            const u32 kst = stages + (i % STAGES) * STAGE_BYTES;
            const int first = tile.start + cons.j * BLOCK_N + warp * WARP_N;  // this warp's 16 positions
            if (first < tile.end) state.attend(kst, kst + KV_BYTES, qa, first, tile.end, a.qk_scale, lane, warp);
            if (cons.last_block()) break;
            __syncthreads();  // stage i % STAGES is refilled next
            cons.next(a);
        }
        ++i;
        state.store(merge, a.group, lane, warp);  // the warps' states into shared memory, merged there
        __syncthreads();
        finish_tile(a, tile, merge, &last_flag);
        __syncthreads();  // the last block's stage and the merge buffer are refilled next
        cons.next(a);
    }
}
