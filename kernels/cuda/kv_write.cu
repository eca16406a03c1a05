// prefill_kv_write (SPEC 2.4): the prompt's K and V, packed over the batch as [tokens, Hkv, D]
// (sequence b owns tokens cu_seqlens[b] .. cu_seqlens[b+1]), into the paged cache
// [pages, page_size, Hkv, D], optionally quantized to int8 or fp8-e4m3 with a float32 scale per
// token and KV head (kernels/kv_quant.py's formats: scale = amax / QMAX, codes rounded to nearest).
//
// Work: tiles of tile_tokens tokens of one sequence's K or V; tile_tokens divides page_size, so a
// tile never crosses a page and is contiguous at both ends. Grids are persistent: CTA c takes
// tiles c, c + gridDim.x, ... of the list (K then V, sequence by sequence).
//
// Defines: ELEM_BF16 (1: bf16 input, 0: fp16); HEAD_DIM; CACHE_FMT (0: the input's dtype,
// 1: int8, 2: fp8-e4m3).
#include "common.cuh"

#define QUANT (CACHE_FMT != 0)
#if CACHE_FMT == 1
#define QMAX 127.0f
#elif CACHE_FMT == 2
#define QMAX 448.0f
#endif
#define FLT_TINY 1.17549435e-38f  // torch.finfo(float32).tiny: the smallest scale kv_quant allows

constexpr int CACHE_BYTES = QUANT ? 1 : 2;      // per stored value
constexpr int CP_STAGES = 3;
constexpr int TMA_STAGES = 4;                    // bf16/fp16: tiles in flight per CTA
constexpr int TMA_QUANT_STAGES = 3;              // quantized: input tiles in flight; two output buffers

struct Tiles {
    const int* cu_seqlens;
    int batch, tile_tokens;
    int kv, b, t, n_tiles;  // K (0) or V (1), the sequence, the tile within it, its tile count

    __device__ Tiles(const int* cu, int batch_, int tile_tokens_)
        : cu_seqlens(cu), batch(batch_), tile_tokens(tile_tokens_), kv(0), b(0), t(blockIdx.x) {
        settle();
    }
    __device__ void settle() {
        while (kv < 2) {
            n_tiles = (cu_seqlens[b + 1] - cu_seqlens[b] + tile_tokens - 1) / tile_tokens;
            if (t < n_tiles) return;
            t -= n_tiles;
            if (++b == batch) {
                b = 0;
                ++kv;
            }
        }
    }
    __device__ bool done() const { return kv >= 2; }
    __device__ void next() {
        t += gridDim.x;
        settle();
    }
};

struct Tile {
    int kv, src_token, dst_token, n;  // n <= tile_tokens tokens from src_token to dst_token on
};

__device__ __forceinline__ Tile locate(const Tiles& it, const int* block_table, int max_pages, int page_size) {
    int start = it.cu_seqlens[it.b], t0 = it.t * it.tile_tokens;
    int page = block_table[it.b * max_pages + t0 / page_size];
    return {it.kv, start + t0, page * page_size + t0 % page_size,
            min(it.tile_tokens, it.cu_seqlens[it.b + 1] - start - t0)};
}

#if QUANT
constexpr int LANES_PER_ROW = HEAD_DIM / 8;  // threads quantizing one (token, head) row, 8 values each
constexpr int TMA_ALIGN = 128;               // shared-memory alignment of a TMA store's source

// Quantizes 8 values of one (token, head) row, LANES_PER_ROW lanes to a row; returns 8 bytes.
// The whole warp must call it (shuffles); `active` false lanes contribute nothing.
// x * (1 / scale) may differ from kv_quant's x / scale by an ulp before rounding to the format:
// the oracle allows for it (suite/kv_write_cases.py), and one division per row is far cheaper.
__device__ __forceinline__ uint2 quantize8(const u8* staged, bool active, float* scale_out) {
    uint4 raw = active ? *reinterpret_cast<const uint4*>(staged) : make_uint4(0, 0, 0, 0);
    const u16* vals = reinterpret_cast<const u16*>(&raw);
    float x[8], amax = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        x[i] = elem_to_f32(vals[i]);
        amax = fmaxf(amax, fabsf(x[i]));
    }
#pragma unroll
    for (int m = LANES_PER_ROW / 2; m > 0; m /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, m));
    float scale = fmaxf(amax / QMAX, FLT_TINY), inv = 1.0f / scale;
    *scale_out = scale;
    u32 word[2];
#if CACHE_FMT == 1
#pragma unroll
    for (int w = 0; w < 2; ++w) {
        word[w] = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int q = int(fminf(fmaxf(rintf(x[4 * w + i] * inv), -QMAX), QMAX));
            word[w] |= u32(q & 0xff) << (8 * i);
        }
    }
#else
#pragma unroll
    for (int w = 0; w < 2; ++w)
        word[w] = u32(f32x2_to_e4m3(x[4 * w] * inv, x[4 * w + 1] * inv)) |
                  (u32(f32x2_to_e4m3(x[4 * w + 2] * inv, x[4 * w + 3] * inv)) << 16);
#endif
    return make_uint2(word[0], word[1]);
}

// Quantizes a staged tile of `rows` (token, head) rows; writes the bytes to out at row pitch
// `pitch` per token and the scales to scale[first_row + row].
__device__ __forceinline__ void quantize_tile(const u8* staged, int rows, int kv_heads, u8* out, int pitch,
                                              float* scale, long long first_row) {
    int lane = threadIdx.x % LANES_PER_ROW, per_pass = blockDim.x / LANES_PER_ROW;
    for (int base = 0; base < rows; base += per_pass) {  // uniform trip count: every lane shuffles
        int row = base + threadIdx.x / LANES_PER_ROW;
        bool active = row < rows;
        float s;
        uint2 q = quantize8(staged + ((long long)row * HEAD_DIM + lane * 8) * 2, active, &s);
        if (!active) continue;
        *reinterpret_cast<uint2*>(out + (row / kv_heads) * pitch + (row % kv_heads) * HEAD_DIM + lane * 8) = q;
        if (lane == 0) scale[first_row + row] = s;
    }
}
#endif

// ---------------------------------------------------------------------------------------------
// native_cp_async: every thread stages 16-byte chunks with cp.async, CP_STAGES tiles in flight;
// the tile then goes from shared memory to the cache (quantized on the way when asked).
// k, v: [tokens, Hkv, D] with token stride token_stride (elements); block: 256 threads.
extern "C" __global__ void __launch_bounds__(256)
    kv_write_cp_async(const u16* k, const u16* v, long long token_stride, const int* cu_seqlens,
                      const int* block_table, int batch, int max_pages, int page_size, int kv_heads,
                      int tile_tokens, u8* k_cache, u8* v_cache, float* k_scale, float* v_scale) {
    extern __shared__ __align__(1024) u8 smem[];
    const int row_bytes = kv_heads * HEAD_DIM * 2, chunks_per_token = row_bytes / 16;
    const int tile_bytes = tile_tokens * row_bytes;
    Tiles produce(cu_seqlens, batch, tile_tokens), consume = produce;

    auto issue = [&](u8* stage) {
        Tile tile = locate(produce, block_table, max_pages, page_size);
        const u8* src = reinterpret_cast<const u8*>(tile.kv ? v : k) + tile.src_token * token_stride * 2;
        for (int c = threadIdx.x; c < tile.n * chunks_per_token; c += blockDim.x) {
            int r = c / chunks_per_token, j = c % chunks_per_token;
            cp_async_16(stage + c * 16, src + r * token_stride * 2 + j * 16);
        }
        produce.next();
    };

    for (int s = 0; s < CP_STAGES - 1; ++s) {
        if (!produce.done()) issue(smem + s * tile_bytes);
        cp_async_commit();
    }
    for (int i = 0; !consume.done(); ++i, consume.next()) {
        if (!produce.done()) issue(smem + ((i + CP_STAGES - 1) % CP_STAGES) * tile_bytes);
        cp_async_commit();
        cp_async_wait<CP_STAGES - 1>();  // tile i has landed
        __syncthreads();
        const u8* stage = smem + (i % CP_STAGES) * tile_bytes;
        Tile tile = locate(consume, block_table, max_pages, page_size);
        u8* cache = tile.kv ? v_cache : k_cache;
#if QUANT
        quantize_tile(stage, tile.n * kv_heads, kv_heads, cache + (long long)tile.dst_token * kv_heads * HEAD_DIM,
                      kv_heads * HEAD_DIM, tile.kv ? v_scale : k_scale, (long long)tile.dst_token * kv_heads);
#else
        uint4* dst = reinterpret_cast<uint4*>(cache + (long long)tile.dst_token * row_bytes);
        for (int c = threadIdx.x; c < tile.n * chunks_per_token; c += blockDim.x)
            dst[c] = reinterpret_cast<const uint4*>(stage)[c];
#endif
        __syncthreads();  // stage i % CP_STAGES is refilled next iteration
    }
}

// ---------------------------------------------------------------------------------------------
// native_tma: tiles move as TMA boxes. Tensor maps (3-D, innermost first):
//   src:       (D, Hkv, tokens)              box (D, Hkv, tile_tokens)
//   dst:       (D, Hkv, pages * page_size)   box (D, Hkv, tile_tokens)
//   dst_token: (D, Hkv, pages * page_size)   box (D, Hkv, 1): a tile's last, partial rows
// bf16/fp16 (block: 32 threads): one thread keeps TMA_STAGES loads in flight and stores each
// tile straight from shared memory. Quantized (block: 256 threads): the CTA quantizes each
// landed tile into one of two output buffers, which a TMA store then writes.
extern "C" __global__ void __launch_bounds__(256)
    kv_write_tma(const __grid_constant__ TensorMap k_src, const __grid_constant__ TensorMap v_src,
                 const __grid_constant__ TensorMap k_dst, const __grid_constant__ TensorMap v_dst,
                 const __grid_constant__ TensorMap k_dst_token, const __grid_constant__ TensorMap v_dst_token,
                 const int* cu_seqlens, const int* block_table, int batch, int max_pages, int page_size,
                 int kv_heads, int tile_tokens, float* k_scale, float* v_scale) {
    extern __shared__ __align__(1024) u8 smem[];
    constexpr int STAGES = QUANT ? TMA_QUANT_STAGES : TMA_STAGES;
    __shared__ u64 full[STAGES];
    const int tile_bytes = tile_tokens * kv_heads * HEAD_DIM * 2;
    const int out_row = kv_heads * HEAD_DIM * CACHE_BYTES;  // one token in the cache
    const bool leader = threadIdx.x == 0;
    Tiles produce(cu_seqlens, batch, tile_tokens), consume = produce;

    auto load = [&](int s) {  // leader only
        Tile tile = locate(produce, block_table, max_pages, page_size);
        mbarrier_expect_tx(&full[s], tile_bytes);
        tma_load_3d(smem + s * tile_bytes, tile.kv ? &v_src : &k_src, 0, 0, tile.src_token, &full[s]);
        produce.next();
    };
    auto store = [&](const Tile& tile, const u8* buf, int pitch) {  // leader only
        if (tile.n == tile_tokens) {
            tma_store_3d(tile.kv ? &v_dst : &k_dst, 0, 0, tile.dst_token, buf);
        } else {
            for (int r = 0; r < tile.n; ++r)
                tma_store_3d(tile.kv ? &v_dst_token : &k_dst_token, 0, 0, tile.dst_token + r, buf + r * pitch);
        }
        bulk_commit();
    };

    if (leader) {
        for (int s = 0; s < STAGES; ++s) mbarrier_init(&full[s], 1);
        fence_barrier_init();
        for (int s = 0; s < STAGES && !produce.done(); ++s) load(s);
    }
#if QUANT
    __syncthreads();  // barriers initialised before anyone waits on them
    // Two output buffers, TMA_ALIGN-pitched per token so partial tiles can be stored a token at a time.
    const int out_pitch = (out_row + TMA_ALIGN - 1) / TMA_ALIGN * TMA_ALIGN;
    u8* out_bufs = smem + STAGES * tile_bytes;
    for (int i = 0; !consume.done(); ++i, consume.next()) {
        int s = i % STAGES;
        u8* out = out_bufs + (i % 2) * tile_tokens * out_pitch;
        Tile tile = locate(consume, block_table, max_pages, page_size);
        int pitch = tile.n == tile_tokens ? out_row : out_pitch;  // a whole tile is one dense box
        mbarrier_wait(&full[s], (i / STAGES) & 1);
        if (leader) bulk_wait_read<1>();  // the store of tile i - 2 has read this output buffer
        __syncthreads();
        quantize_tile(smem + s * tile_bytes, tile.n * kv_heads, kv_heads, out, pitch, tile.kv ? v_scale : k_scale,
                      (long long)tile.dst_token * kv_heads);
        fence_async_shared();
        __syncthreads();  // the tile is quantized; its input stage is free
        if (leader) {
            store(tile, out, pitch);
            if (!produce.done()) load(s);
        }
    }
#else
    if (!leader) return;
    for (int i = 0; !consume.done(); ++i, consume.next()) {
        int s = i % STAGES;
        mbarrier_wait(&full[s], (i / STAGES) & 1);
        store(locate(consume, block_table, max_pages, page_size), smem + s * tile_bytes, out_row);
        if (i >= 1 && !produce.done()) {  // refill tile i - 1's stage once its store has read it
            bulk_wait_read<1>();
            load((i - 1) % STAGES);
        }
    }
#endif
    if (leader) bulk_wait_all();
}
