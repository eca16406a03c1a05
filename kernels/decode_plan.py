"""How the Triton decode-attention kernels are launched (kernels/decode_attention.py): chunk, K/V step,
programs, warps, stages and register cap, for a call's dims and the GPU's SM count. Pure Python:
every rule here is a measured choice (H100 sweeps, notes/decode_attention.md), and
`python -m tools.decode_launches` prints what it picks for each minimal shape without a GPU.
"""

from typing import NamedTuple

import triton

from kernels.checks import check_power_of_two

BLOCK_N = 64  # KV positions per inner step
# Quantized caches convert every element before the dots: longer steps amortize it (H100, B64-L4096:
# 128 beat 64 by 2-12% for int8, fp8 and int4 in tools/tune_decode_attention.py).
QUANT_BLOCK_N = 128
# Chunk heuristic (choose_chunk), from chunk sweeps of every minimal shape on an H100: the chunk
# halves from MAX_CHUNK while the tiles would leave more than IDLE_SMS of the SMs idle (a split costs
# a merge, which costs more than a few idle SMs); below SHORT_CHUNK only while more than half would
# be idle (a 128-position tile is two steps, and merging its partials costs about as much).
MIN_CHUNK = 128
SHORT_CHUNK = 256
MAX_CHUNK = 2048
IDLE_SMS = 1 / 8
# Paged tiles of variable lengths: two tiles per SM. Measured with per-step table loads (H100,
# B4-L4096: 33.7 us in chunks of 512 vs 39.8 in chunks of 1024) and again with hoisted tables (one
# tile per SM lost 9% and 5% at B16-L1024 and B16-L4096 var).
PAGED_TILES_PER_SM = 2
MERGE_ROWS_PER_WARP = 16  # (head, chunk) partials merged per step: [GROUP, 16 x warps // GROUP, D] fp32
# A single sequence on one program per SM merges 32 per warp: its build then takes 224 registers where
# ptxas gave the 16-row build 128 and spilled two, and every batch-1 shape ran 4-7% faster (H100, three
# interleaved medians, us, 16 vs 32 rows, contiguous / paged: B1-L1024 10.46 / 9.70, 10.78 / 10.16;
# B1-L4096 14.24 / 13.52, 14.27 / 13.66; B1-L16384 30.37 / 29.34, 31.42 / 30.74; B1-L4096 var 13.07 /
# 12.38, 13.33 / 12.72). Batch 4 (one program per SM too) was level or up to 1.7% slower, and launches
# with 2-3 programs per SM, whose register cap 32 rows exceed, lost 1-14%; 64 rows lost everywhere.
SINGLE_MERGE_ROWS_PER_WARP = 32
NUM_WARPS = 4
NUM_STAGES = 3
# A paged tile's block-table entries (at most this many) are loaded once per tile, before its loop
# (_attend_chunk's TABLE_PAGES), and each step takes its rows' pages from registers: the loop's only
# global loads are K and V, which get two buffers at NUM_STAGES as for a contiguous cache. 256 int32
# entries are 2 registers per thread at 4 warps. H100, 24 paged minimal shapes vs the per-step load:
# geomean 1.03x faster, B64-L1024 var 69.5 -> 64.3 us, B4-L1024 var 14.9 -> 13.3 us.
MAX_TABLE_PAGES = 256
# Tiles with more pages (page sizes < 8 at chunk 2048) and the quantized planes load their rows'
# table entries every step. The pipeliner gives that load a stage of its own, so 3 stages leave the
# K and V tiles one buffer (no prefetch); 5 give them two. That pays where each program has one tile
# (split-KV's CTAs always), whose latency nothing else hides (H100, per-step loads: B16-L4096 100 vs
# 107 us, B4-L16384 var 46 vs 54 us); with more tiles than programs 3 stages were as fast or faster
# (B64-L4096 376 vs 387 us).
PAGED_ONE_WAVE_STAGES = 5
# Equal paged tiles of LONG_TILE positions or more, hoisted tables, one program per SM and one
# tile per program: a third K/V buffer (4 stages; three 32 KB buffers at 64-position steps, 104 KB a
# build) keeps more of the randomly placed rows in flight. H100, 16-position pages, five interleaved
# medians (.dbg/s10/bench_stages2.py), 3 vs 4 stages: B16-L4096 96.7 vs 95.0 us, B4-L16384 98.3 vs
# 96.5 (SDPA on the contiguous copy 91.9 and 96.8). Level or slower elsewhere: tiles of 256-1024
# positions (B4-L1024 14.0 vs 14.3, B16-L1024 29.2 vs 29.1), contiguous caches (B16-L4096 94.4 vs
# 94.8, B16-L16384 349.0 vs 352.9), 1-2 programs per SM at 3-5 stages where the plan takes 4 (paged
# B16-L16384 and B64: level or slower), variable lengths on 3 per SM (B16-L4096 var 65.2 vs 71.0),
# other steps x stages (32 x 4-8, 64 x 3-6, 128 x 2-3: 95.2-103.9 us at B16-L4096 against 95.0).
# Only where an SM has SM_SHARED bytes (H100, H200, B200): smaller ones (consumer Blackwell such as
# GB10 has about 100 KB per SM) may not hold such a build.
LONG_TILE = 4096
LONG_TILE_STAGES = 4
# Equal contiguous tiles of LONG_TILE positions or more take the same 4 stages where the GPU's
# peak DRAM bandwidth per SM (hw.peak_dram_gbps / SMs) reaches DEEP_GBPS_PER_SM: each SM must keep
# more bytes in flight to draw its share. H200 (37 GB/s per SM), three interleaved medians, 3 vs 4
# stages, us: B16-L4096 69.0 vs 66.8, B16-L16384 255.0 vs 243.3, B64-L4096 253.1 vs 245.9, B64-L16384
# 983.3 vs 950.3; one-warp B64-L1024 66.7 vs 67.9 and B16-L1024 22.5 vs 22.4 (shorter tiles: left at
# 3). H100 (25 GB/s per SM): level or slower (B16-L4096 94.4 vs 94.8, B16-L16384 349.0 vs 352.9), so it
# stays at 3 there.
DEEP_GBPS_PER_SM = 30
# On such memory, equal fp16/bf16 tiles of LONG_STEP_TILE positions or more, one per SM (contiguous, or
# paged with hoisted tables), take K/V steps of LONG_BLOCK_N positions at NUM_STAGES instead: two 64 KB
# buffers keep more bytes in flight than three of 32 KB. H200, five interleaved medians of 30 cold
# rounds, us, 64-position steps (4 stages at 4096+ positions) vs 128 at 3 stages: paged B4-L4096 25.6
# vs 24.4, B4-L16384 75.0 vs 69.5, B16-L1024 23.9 vs 22.8, B16-L4096 73.6 vs 67.9; contiguous B1-L16384
# 23.9 vs 23.5, B4-L4096 24.2 vs 23.7, B4-L16384 68.4 vs 67.8, B16-L1024 22.5 vs 22.0, B16-L4096 66.4
# vs 66.2, B16-L16384 243.1 vs 242.8. 128 x 2 or 4 stages, 256 x 2 and 8 warps were slower, and so were
# 128-position steps on tiles of 256 positions (B1-L4096 12.5 vs 12.8, paged 12.7 vs 13.5). On the
# H100, paged B16-L4096 at 128 x 3 was no faster than 64 x 4 (notes/decode_attention.md, tenth session).
LONG_BLOCK_N = 128
LONG_STEP_TILE = 1024
# Persistent grid = SM count x this at most for fp16/bf16 caches, except where tiles take
# SHORT_BLOCK_N steps on up to SHORT_PROGRAMS_PER_SM per SM (below). 3 CTAs fit an SM at <= 72 KB of
# shared memory and <= 168 registers x 128 threads each (suite/kernel_ir.py prints what a build
# uses). With equal tiles (uniform lengths, contiguous cache) choose_programs may take 2 per SM,
# when that fills the last wave better (B64-L4096 1024 tiles, 365 us on 264 programs vs 373 us on
# 396), and then no more programs than share the tiles equally. Where an SM's shared memory holds
# fewer of the build (consumer Blackwell: 100 KB, one 72 KB build), triton_persistent plans again
# with max_programs_per_sm, so the grid stays one wave; untuned there: no such GPU has run it.
PROGRAMS_PER_SM = 3
QUANT_PROGRAMS_PER_SM = 2  # quantized caches: H100, B64-L4096, int8 243 vs 282 us, fp8 227 vs 259 us
# Quantized tiles are instruction-bound: uniform lengths take longer tiles (longest_equal_tile) only
# while every SM still gets this many. H100, L4096 uniform, whole-sequence tiles vs chunks of 2048:
# B64 int4 109.4 vs 122.3 us, int8 190.7 vs 203.8, fp8 188.9 vs 200.1 (paged alike); at B16 (one
# tile per SM) int4 lost 12% (38.5 vs 34.5) while int8 and fp8 gained 5%.
QUANT_EQUAL_TILES_PER_SM = 2
MIN_PROGRAMS_PER_SM = 2  # 1 per SM was 20-35% slower than 2 on every shape tuned
# fp16/bf16 tiles that outnumber one wave of programs take K/V steps of SHORT_BLOCK_N positions (H100
# sweeps, notes/decode_attention.md; elsewhere 32-position steps lost 5-12%, B1-B16 uniform):
# - contiguous, where every program has two or more tiles: B64-L4096 350.3-350.4 vs 353.6-353.7 us
#   (SDPA 353.9-354.2), B64-L16384 1382.1-1388.0 vs 1391.2-1393.1, B64-L1024 95.2 vs 95.8;
# - paged (hoisted tables) on up to SHORT_PROGRAMS_PER_SM programs per SM, which half-size steps fit,
#   so fewer or no tile changes each wait on a table load: B64-L1024 95.7-95.8 vs 98.8-99.0 us,
#   B64-L16384 1426.8-1428.4 vs 1444.7-1445.7, B64-L4096 359.0-360.1 vs 360.8-360.9;
# - unequal tiles (variable lengths), each a whole sequence, that one wave of SHORT_PROGRAMS_PER_SM
#   per SM holds, on a program each, where PROGRAMS_PER_SM per SM would leave some programs a second
#   tile: B64-L1024 var 56.9 vs 59.5 us, paged 58.9 vs 64.7 (runs 0025 vs 0024). Where sequences
#   split into chunks it was mixed (B4-L16384 var 42.6 vs 40.2, paged B4-L4096 var 22.9 vs 24.4), and
#   with more tiles than that wave B64-L4096 var lost 3%.
SHORT_BLOCK_N = 32
SHORT_PROGRAMS_PER_SM = 4
# Short equal tiles (of at most ONE_WARP_MAX_TILE positions) of a contiguous cache that outnumber the
# programs twice and fit one wave of SHORT_PROGRAMS_PER_SM per SM: a one-warp program per tile. Each
# warp then keeps its own softmax state, where the 4 warps of a program exchange row maxima, sums and
# P through shared memory at every step. H100, B64-L1024 uniform, two sweeps: 93.50 and 93.92 us vs
# 94.72 and 94.74 on 256 4-warp programs (SDPA 93.89, 94.18). Longer tiles lost (B64-L4096 353.95 vs
# 351.28), paged ones too (B64-L1024 96.54 vs 96.13), and so did one or two warps at B1-B16, where
# tiles are split or one per SM (0.5-15% slower; notes/decode_attention.md, sixth session).
ONE_WARP_MAX_TILE = 1024
# Where the grid has a program per (sequence, chunk, KV head) of the capacity, each takes its tile from
# its program id (tile_per_program), with no work list built from seq_lens before its first loads:
# whole sequences, one sequence's chunks, and several sequences' chunks of DIRECT_CHUNK positions or
# more; a KV head's chunks lie on consecutive programs. H200, cuDNN SDPA on the contiguous cache in
# brackets, us, work list vs program per tile (.dbg/s22/one.py, chunked.py: five interleaved medians of
# 30 cold rounds; .dbg/s23/order*.py: three runs of 5-9 on three machines, ranges):
# - whole sequences: contiguous B16-L1024 22.03 vs 21.66 (21.89), B16-L4096 65.98 vs 65.73 (65.98),
#   B64-L1024 67.36 vs 66.62, B16-L1024 var 21.04 vs 20.48; paged B16-L1024 22.78 vs 22.34 (21.92),
#   B64-L1024 68.34 vs 67.46, B64-L4096 248.99 vs 248.02;
# - one sequence's chunks: contiguous / paged B1-L1024 9.25 / 9.66 vs 9.02 / 9.47, B1-L4096 12.54 /
#   12.67 vs 12.24 / 12.29, B1-L16384 23.26 / 24.10 vs 22.96 / 23.52 (taken chunk-major then; a KV
#   head's chunks on consecutive programs were level: B1-L4096 12.05-12.10 vs 12.11-12.18 contiguous,
#   12.16-12.21 vs 12.16-12.22 paged; B1-L16384 0.2 us faster contiguous, 0.2 slower paged);
# - several sequences' chunks: B4-L4096 23.41-23.65 vs 23.30-23.54 contiguous, 24.45-24.48 vs
#   23.94-24.11 paged (25.5); B4-L16384 67.52-67.86 vs 67.38-67.68 contiguous, 68.98-69.52 vs
#   68.51-69.17 paged (68.4-69.4); paged B16-L16384 249.70 vs 247.18 (238.86). Taken chunk-major (a
#   chunk's KV heads on consecutive programs) they were level with the work list. Shorter chunks lost:
#   B4-L1024 (256 positions) 12.64-12.77 vs 12.82-12.86 contiguous, 13.07-13.09 vs 13.30 paged.
# Programs of several whole sequences keep the work list: contiguous B64-L4096 on 256 programs took
# 245.7 us with it, 257.3 mapped from the program id with a seq_lens load per tile, 248.2 with the
# lengths loaded as the work list loads them.
DIRECT_CHUNK = 1024
# Sequences of unequal length with at most one (sequence, KV head) per SM: in whole-sequence tiles the
# longest sequence's program finishes last by far. Chunks of at most 1/UNEQUAL_SPLIT of the longest
# spread it over that many programs of the work list. H200, contiguous, three interleaved medians of
# 40 cold rounds (.dbg/s24/varsweep.py): B16-L1024 var 20.2 us at chunk 2048 (whole sequences) vs 18.1
# at 256, 18.9 at 512; B16-L4096 var 49.2 at 2048 vs 45.2 at 1024, 47.5 at 512 (SDPA 29.9, 71.7).
# Paged launches took those chunks already (PAGED_TILES_PER_SM). More sequences than SMs keep whole
# ones: B64-L1024 var 46.8 at 2048 vs 52.7 at 256.
UNEQUAL_SPLIT = 4
# Registers per SM and the most per thread. Uncapped, paged builds at BLOCK_B < 64 take 186-204
# registers, so only 2 of 3 programs per SM were resident and the third ran after them (H100, paged
# B4-L16384 var: 54.2 us uncapped, 42.7 capped at 168). A cap is set only where the build needs it:
# one that changes no count still reschedules (paged B64-L1024 var, 168 registers either way: 72.5 us
# uncapped, 80.4 capped).
SM_REGISTERS = 65536
MAX_THREAD_REGISTERS = 255
# Shared memory per SM (H100, H200, B200); each resident program takes its build's bytes plus the
# CUDA runtime's per-block reserve.
SM_SHARED = 228 * 1024
BLOCK_RESERVED_SHARED = 1024


def choose_chunk(dims, sms, tiles_per_sm=1, max_chunk=MAX_CHUNK):
    """The largest power-of-two chunk in [MIN_CHUNK, max_chunk] whose tiles leave at most IDLE_SMS of
    tiles_per_sm * sms slots idle; below SHORT_CHUNK, only while more than half of the SMs would be.
    Tiles are counted from the lengths' total (exact for uniform lengths), not from the capacity."""
    def tiles(chunk):
        return dims.num_kv_heads * max(dims.batch, triton.cdiv(dims.total_len, chunk))

    chunk = max_chunk
    while chunk > SHORT_CHUNK and tiles(chunk) < (1 - IDLE_SMS) * tiles_per_sm * sms:
        chunk //= 2
    while chunk > MIN_CHUNK and tiles(chunk) < sms / 2:
        chunk //= 2
    return chunk


def longest_equal_tile(dims, page_size=None):
    """The longest chunk a persistent launch of uniform lengths may take: a whole sequence (paged:
    while the tile's block-table entries fit MAX_TABLE_PAGES). Such tiles stream without a merge
    and without a tile change: H100, bf16 B64-L16384 1398.7 us in chunks of 16384 vs 1460.1 in
    chunks of MAX_CHUNK (SDPA 1387.9), B16-L16384 352.5 vs 367.8 (SDPA 349.8). Lengths that differ
    keep MAX_CHUNK: shorter tiles balance them."""
    chunk = max(MAX_CHUNK, triton.next_power_of_2(dims.max_len))
    while page_size is not None and chunk > MAX_CHUNK and not table_pages(chunk, page_size):
        chunk //= 2
    return chunk


def choose_programs(tiles, sms, per_sm, equal_tiles):
    """per_sm programs per SM or, with equal tiles, the count in [MIN_PROGRAMS_PER_SM, per_sm] per SM
    whose waves are fullest (the most programs among equals), less the programs a part-full last
    wave would leave without a tile: every program then gets the same number of tiles. H100, 512
    whole-sequence tiles: 256 programs vs 264, B64-L4096 352.8 vs 355.0 us, B64-L16384 1385.9 vs
    1393.9, B64-L1024 94.8 vs 95.4, paged B64-L1024 98.3 vs 99.1."""
    if not equal_tiles:
        return per_sm * sms

    def fullness(n):
        programs = min(n * sms, tiles)
        return tiles / (triton.cdiv(tiles, programs) * programs)

    n = max(range(min(MIN_PROGRAMS_PER_SM, per_sm), per_sm + 1), key=lambda n: (fullness(n), n))
    return triton.cdiv(tiles, triton.cdiv(tiles, min(n * sms, tiles)))


def resident_registers(per_sm, num_warps):
    """The most registers per thread that let per_sm programs of num_warps warps share an SM."""
    return min(MAX_THREAD_REGISTERS, SM_REGISTERS // (per_sm * num_warps * 32) // 8 * 8)  # 8 per thread granules


def _table_entries(chunk, page_size):
    # a power of two >= the pages a tile of chunk positions can touch: a power-of-two page size
    # divides the chunk's start or holds the whole chunk; any other may straddle one more page
    if page_size & (page_size - 1) == 0:
        pages = max(1, chunk // page_size)
    else:
        pages = triton.cdiv(chunk, page_size) + 1
    return triton.next_power_of_2(pages)


def table_pages(chunk, page_size):
    """TABLE_PAGES of a paged launch: one size per page size where MAX_CHUNK's tiles fit (fewer
    builds: a shorter chunk's entries are masked), else the chunk's, else 0 (one load per step)."""
    for positions in (max(chunk, MAX_CHUNK), chunk):
        if _table_entries(positions, page_size) <= MAX_TABLE_PAGES:
            return _table_entries(positions, page_size)
    return 0


def resolve_chunk(chunk, dims, sms, paged):
    """chunk as given (checked), or choose_chunk's for a launch of this many SMs."""
    if chunk is None:
        return choose_chunk(dims, sms, PAGED_TILES_PER_SM if paged else 1)
    check_power_of_two("chunk", chunk)
    if chunk < 16:
        raise ValueError(f"chunk {chunk} must be >= 16 (a chunk holds at least one 16-position step)")
    return chunk


def resolve_block_k(block_k, chunk, quant):
    """block_k as given (checked), or the default K/V step for this chunk and cache format."""
    if block_k is None:  # chunk is a power of two >= 16 here (resolve_chunk)
        block_k = min(chunk, BLOCK_N if quant == "none" else QUANT_BLOCK_N)
    check_power_of_two("block_k", block_k)
    if block_k < 16 or block_k > chunk:
        raise ValueError(f"block_k {block_k} must be in [16, chunk {chunk}] (tl.dot needs >= 16)")
    return block_k


class PersistentLaunch(NamedTuple):
    chunk: int  # positions per tile
    block_k: int  # K/V positions per inner step
    grid: int  # programs
    num_warps: int
    one_wave: bool  # every tile on a program of its own
    programs_per_sm: int  # what the register cap must let share an SM
    merge_rows: int  # partials per warp in each step of the merge
    deep_pipeline: bool  # LONG_TILE_STAGES, not the cache format's default
    tile_per_program: bool  # a program per (sequence, chunk, KV head) of the capacity: no work list


def plan_persistent(dims, sms, page_size=None, *, shared_per_sm=SM_SHARED, dram_gbps=None, chunk=None,
                    block_k=None, num_programs=None, num_warps=None, max_programs_per_sm=None):
    """triton_persistent's launch for dims on sms SMs of shared_per_sm bytes of shared memory each and
    dram_gbps of peak DRAM bandwidth (None: unknown, planned as an H100) (page_size: a paged cache's);
    the knobs given are checked and kept, the rest chosen, with at most max_programs_per_sm programs
    per SM (the launcher's, where an SM holds fewer of its build)."""
    if num_warps is not None and num_warps not in (1, 2, 4, 8):
        raise ValueError(f"num_warps must be 1, 2, 4 or 8, got {num_warps!r}")
    if max_programs_per_sm is not None and (not isinstance(max_programs_per_sm, int) or max_programs_per_sm < 1):
        raise ValueError(f"max_programs_per_sm must be a positive int, got {max_programs_per_sm!r}")

    def at_most(per_sm):
        return per_sm if max_programs_per_sm is None else min(per_sm, max_programs_per_sm)

    paged = page_size is not None
    uniform = dims.min_len == dims.max_len
    fast_memory = dram_gbps is not None and dram_gbps / sms >= DEEP_GBPS_PER_SM and shared_per_sm >= SM_SHARED
    if chunk is None and uniform:
        per_sm = 1 if dims.quant == "none" else QUANT_EQUAL_TILES_PER_SM
        chunk = max(choose_chunk(dims, sms, per_sm, longest_equal_tile(dims, page_size)),
                    resolve_chunk(None, dims, sms, paged))
    elif chunk is None and dims.batch * dims.num_kv_heads <= sms:
        chunk = min(resolve_chunk(None, dims, sms, paged),
                    max(SHORT_CHUNK, triton.next_power_of_2(dims.max_len) // UNEQUAL_SPLIT))
    chunk = resolve_chunk(chunk, dims, sms, paged)
    max_tiles = dims.batch * dims.num_kv_heads * triton.cdiv(dims.capacity, chunk)
    tiles = dims.batch * dims.num_kv_heads * triton.cdiv(dims.max_len, chunk)  # at most, for these lengths
    hoisted = dims.quant == "none" and paged and table_pages(chunk, page_size) > 0
    if num_programs is None:
        per_sm = at_most(PROGRAMS_PER_SM if dims.quant == "none" else QUANT_PROGRAMS_PER_SM)
        short_per_sm = at_most(SHORT_PROGRAMS_PER_SM)
        # Paged tiles count as equal only with their table hoisted: per-row table loads make a tile
        # latency-bound, and it gained from every program (H100, B16-L16384: 384 us on 396 programs
        # vs 402 on 264).
        equal = uniform and (not paged or hoisted)
        num_programs = choose_programs(tiles, sms, per_sm, equal)
        if block_k is None and dims.quant == "none" and (not paged or hoisted) and tiles > num_programs:
            if equal and paged:
                block_k, num_programs = SHORT_BLOCK_N, choose_programs(tiles, sms, short_per_sm, True)
            elif equal and tiles >= 2 * num_programs:
                block_k = SHORT_BLOCK_N
                if (num_warps is None and not paged and min(chunk, dims.max_len) <= ONE_WARP_MAX_TILE
                        and tiles <= short_per_sm * sms):
                    num_warps, num_programs = 1, tiles
            elif not equal and chunk >= dims.max_len and tiles <= short_per_sm * sms:
                block_k, num_programs = SHORT_BLOCK_N, tiles
    elif not isinstance(num_programs, int) or num_programs < 1:
        raise ValueError(f"num_programs must be a positive int, got {num_programs!r}")
    grid = min(num_programs, max_tiles)
    per_sm = triton.cdiv(grid, sms)
    if (block_k is None and num_warps in (None, NUM_WARPS) and fast_memory and uniform and dims.quant == "none"
            and (not paged or hoisted) and tiles <= grid and per_sm == 1
            and min(chunk, dims.max_len) >= LONG_STEP_TILE):
        block_k = LONG_BLOCK_N
    merge_rows = SINGLE_MERGE_ROWS_PER_WARP if dims.batch == 1 and per_sm == 1 else MERGE_ROWS_PER_WARP
    block_k = resolve_block_k(block_k, chunk, dims.quant)
    num_warps = NUM_WARPS if num_warps is None else num_warps
    long_tiles = (uniform and dims.quant == "none" and min(chunk, dims.max_len) >= LONG_TILE
                  and block_k <= BLOCK_N and shared_per_sm >= SM_SHARED)
    if paged:
        deep = long_tiles and hoisted and tiles <= grid and per_sm == 1
    else:
        deep = long_tiles and num_warps > 1 and fast_memory
    tile_per_program = grid == max_tiles and (chunk >= min(dims.capacity, DIRECT_CHUNK) or dims.batch == 1)
    return PersistentLaunch(chunk, block_k, grid, num_warps, tiles <= grid, per_sm, merge_rows, deep, tile_per_program)
