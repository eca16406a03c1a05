"""Decode attention (SPEC 2.1): one query token per sequence over a variable-length KV cache.

Layouts: contiguous k/v [B, Hkv, L_max, D], or paged k/v [num_pages, page_size, Hkv, D] with a
block table [B, max_pages] (int32). GQA: query head h reads KV head h // (Hq // Hkv).

Both Triton variants split every sequence into chunk-sized tiles per KV head; a tile attends
all g = Hq // Hkv query heads of its KV head at once (K and V are read once per tile) and the
chunks of a sequence are merged by their log-sum-exp.
- triton_split_kv: flash-decoding, grid (B * Hkv, max_chunks), tiles past a sequence's end exit;
  partials go to a workspace and a second kernel merges them.
- triton_persistent: one launch of up to 4 programs per SM, fewer where the work has fewer tiles
  (kernels/decode_plan.py chooses unless num_programs is given; `python -m tools.decode_launches`
  lists the grids), all resident at once (registers are capped where a build needs more); each program
  walks a work list of (sequence, KV head, chunk) tiles built in-kernel from seq_lens, so every
  program gets the same number of equal-sized tiles however unequal the lengths are. Where the
  grid has a program per (sequence, chunk, KV head) of the capacity (decode_plan.DIRECT_CHUNK says
  for which chunks), program t takes its tile from t alone, with no work list before its first
  loads. A single-chunk tile writes the output directly; otherwise the last tile of a (sequence,
  KV head) to finish merges its partials.

Quantized caches (int8, fp8, int4) are read as 16-bit units split into fp16 planes
(kernels/kv_planes.py) wherever they view as such, else byte by byte (_attend_chunk). A tile's
device functions (attend, store, merge) live in kernels/decode_tiles.py, shared with the decode
loops and paged offload.

Each launcher checks its arguments (one device sync for the value checks), takes its launch (chunk,
K/V step, programs, warps) from kernels/decode_plan.py, allocates output and workspace, and returns
a zero-argument `launch()` so benchmarks time kernel launches only. A launch() owns its workspace
and merge counters: run it on one stream at a time. seq_lens may change between calls: the kernels
check each length against the capacity at every call (a sequence outside [1, capacity] gets NaN in
all its outputs and reads nothing past the cache); the block table's entries were checked when
bound, and a length may grow only into entries that name pages of the cache.
"""

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels import decode_plan as plan, hw, kv_quant
from kernels.decode_tiles import _attend_tile, _finish_tile, _merge_heads, _store_heads, _store_partial
from kernels.kv_planes import quant_units, unit_view
from kernels.checks import (ATTENTION_DTYPES, check_distinct_elements, check_head_dim, check_shape, check_tensor,
                            check_unit_stride_last)

MAX_BATCH = 1024  # the persistent kernel holds the whole batch's seq_lens in registers
MAX_CAPACITY = 2**30  # positions are 32-bit in the kernels: a length plus a chunk must not wrap
MAX_GRID_Y = 65535  # CUDA's limit on a grid's y: triton_split_kv's chunks of the cache's capacity
# seq_lens lanes of a batch > 1: batches 2..16 share one build, which costs nothing (H100, B2-B8:
# 0.96-1.01x the time of exact lanes); a single sequence keeps its one-lane build (B1 not measured at 16).
MIN_BLOCK_B = 16
# Integer arguments that change with the shape but not the code worth generating: Triton would
# otherwise build a kernel per combination of "== 1" and "divisible by 16" among them (the GPU run of
# the minimal profile spent 149 of test_decode_attention.py's 166 s building 140 kernels). The K/V
# strides stay specialized: their divisibility sets the width of the tile loads.
VARYING_INTS = ("stride_sx", "stride_sy", "stride_sh", "stride_bt", "page_size", "page_shift", "max_chunks",
                "num_q_heads", "num_kv_heads", "capacity")
SCALES = ("k_scale_ptr", "v_scale_ptr")  # per-row fp32 loads: their alignment changes no load width


@triton.jit
def _fits(seq_len, capacity):
    # A bound launch reads seq_lens again at every call, after its host check: a length that no longer
    # fits the cache [1, capacity] gets NaN in all its outputs, with no read past the cache and no merge
    # counter touched (SPEC 7: nothing is silently computed on wrong data); the launch's other
    # sequences run as ever.
    return (seq_len >= 1) & (seq_len <= capacity)


@triton.jit
def _store_nan_heads(out_ptr, stride_ob, stride_oh, b, kvh, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_H: tl.constexpr):
    _store_heads(out_ptr, stride_ob, stride_oh, b, kvh, tl.full([BLOCK_H, HEAD_DIM], float("nan"), tl.float32),
                 GROUP, HEAD_DIM, BLOCK_H)


@triton.jit(do_not_specialize=VARYING_INTS, do_not_specialize_on_alignment=SCALES)
def _split_kv(q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, seq_lens_ptr, block_table_ptr, part_o_ptr,
              part_lse_ptr, qk_scale, stride_qb, stride_qh, stride_kx, stride_ky, stride_kh,
              stride_sx, stride_sy, stride_sh, stride_bt,
              page_size, page_shift, max_chunks, num_q_heads, num_kv_heads, chunk_size, capacity,
              GROUP: tl.constexpr, PAGED: tl.constexpr, QUANT: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
              K_UNIT: tl.constexpr, V_UNIT: tl.constexpr, PAGE_POW2: tl.constexpr, TABLE_PAGES: tl.constexpr):
    # grid (B * Hkv, max_chunks): one tile each; tiles past the sequence's end exit, and so do all
    # of a sequence that no longer fits the cache (_split_kv_merge writes its NaN).
    b = tl.program_id(0) // num_kv_heads
    kvh = tl.program_id(0) % num_kv_heads
    chunk = tl.program_id(1)
    start = chunk * chunk_size
    seq_len = tl.load(seq_lens_ptr + b)
    if (start < seq_len) & _fits(seq_len, capacity):
        acc, m_i, l_i = _attend_tile(q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, block_table_ptr, b, kvh,
                                     start, tl.minimum(start + chunk_size, seq_len), qk_scale,
                                     stride_qb, stride_qh, stride_kx, stride_ky, stride_kh,
                                     stride_sx, stride_sy, stride_sh, stride_bt, page_size, page_shift,
                                     GROUP, PAGED, QUANT, HEAD_DIM, BLOCK_H, BLOCK_N, K_UNIT, V_UNIT, PAGE_POW2,
                                     TABLE_PAGES)
        _store_partial(part_o_ptr, part_lse_ptr, b, kvh, chunk, acc, m_i, l_i, num_q_heads, max_chunks,
                       GROUP, HEAD_DIM, BLOCK_H)


@triton.jit(do_not_specialize=("num_q_heads", "max_chunks", "capacity"))
def _split_kv_merge(part_o_ptr, part_lse_ptr, seq_lens_ptr, out_ptr, stride_ob, stride_oh,
                    num_q_heads, max_chunks, chunk_size, capacity,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr,
                    MERGE_C: tl.constexpr):
    # grid (B, Hkv)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    if _fits(seq_len, capacity):
        _merge_heads(part_o_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh, b, kvh, tl.cdiv(seq_len, chunk_size),
                     num_q_heads, max_chunks, GROUP, HEAD_DIM, BLOCK_G, MERGE_C)
    else:
        _store_nan_heads(out_ptr, stride_ob, stride_oh, b, kvh, GROUP, HEAD_DIM, BLOCK_G)


@triton.jit(do_not_specialize=VARYING_INTS + ("batch", "table_width"), do_not_specialize_on_alignment=SCALES)
def _persistent(q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, seq_lens_ptr, block_table_ptr, part_o_ptr,
                part_lse_ptr, qk_scale, stride_qb, stride_qh, stride_kx, stride_ky, stride_kh,
                stride_sx, stride_sy, stride_sh, stride_bt,
                page_size, page_shift, max_chunks, num_q_heads, num_kv_heads, chunk_size, capacity,
                counters_ptr, out_ptr, stride_ob, stride_oh, batch, table_width,
                GROUP: tl.constexpr, PAGED: tl.constexpr, QUANT: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_G: tl.constexpr, MERGE_C: tl.constexpr, BLOCK_B: tl.constexpr,
                K_UNIT: tl.constexpr, V_UNIT: tl.constexpr, PAGE_POW2: tl.constexpr,
                TABLE_PAGES: tl.constexpr, TILE_PER_PROGRAM: tl.constexpr, WHOLE_SEQUENCES: tl.constexpr):
    if TILE_PER_PROGRAM:
        # A program per tile of every sequence's capacity (decode_plan.PersistentLaunch.tile_per_program):
        # program t takes sequence b, KV head and chunk, in that order (a KV head's chunks on consecutive
        # programs), from the grid alone, so its q, seq_lens entry and block-table entries load at once.
        # WHOLE_SEQUENCES: one chunk holds the capacity. A chunk past its sequence's end attends nothing
        # and writes nothing. A sequence that no longer fits is read as its first row alone, a row that
        # exists, in one chunk, and written as NaN.
        t = tl.program_id(0)
        if WHOLE_SEQUENCES:
            b = t // num_kv_heads
            kvh = t % num_kv_heads
            seq_len = tl.load(seq_lens_ptr + b)
            fits = _fits(seq_len, capacity)
            acc, m_i, l_i = _attend_tile(q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, block_table_ptr, b, kvh,
                                         0, tl.where(fits, seq_len, 1), qk_scale, stride_qb, stride_qh, stride_kx,
                                         stride_ky, stride_kh, stride_sx, stride_sy, stride_sh, stride_bt, page_size,
                                         page_shift, GROUP, PAGED, QUANT, HEAD_DIM, BLOCK_H, BLOCK_N, K_UNIT, V_UNIT,
                                         PAGE_POW2, TABLE_PAGES, True, table_width)
            l_i = tl.where(fits, l_i, float("nan"))  # [BLOCK_H], the cheapest place for the NaN
            _store_heads(out_ptr, stride_ob, stride_oh, b, kvh, acc / l_i[:, None], GROUP, HEAD_DIM, BLOCK_H)
        else:
            b = t // (num_kv_heads * max_chunks)
            kvh = t // max_chunks % num_kv_heads
            chunk = t % max_chunks
            seq_len = tl.load(seq_lens_ptr + b)
            fits = _fits(seq_len, capacity)
            seq_len = tl.where(fits, seq_len, 1)
            start = chunk * chunk_size
            acc, m_i, l_i = _attend_tile(q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, block_table_ptr, b, kvh,
                                         start, tl.minimum(start + chunk_size, seq_len), qk_scale, stride_qb,
                                         stride_qh, stride_kx, stride_ky, stride_kh, stride_sx, stride_sy, stride_sh,
                                         stride_bt, page_size, page_shift, GROUP, PAGED, QUANT, HEAD_DIM, BLOCK_H,
                                         BLOCK_N, K_UNIT, V_UNIT, PAGE_POW2, TABLE_PAGES, True, table_width)
            if start < seq_len:
                _finish_tile(part_o_ptr, part_lse_ptr, counters_ptr, out_ptr, stride_ob, stride_oh, b, kvh, chunk,
                             tl.cdiv(seq_len, chunk_size), acc, m_i, tl.where(fits, l_i, float("nan")), num_q_heads,
                             num_kv_heads, max_chunks, GROUP, HEAD_DIM, BLOCK_H, BLOCK_G, MERGE_C)
        return
    # Work list: tile t -> (sequence b, KV head, chunk), sequences in order, each contributing
    # cdiv(len_b, chunk_size) * Hkv tiles; every program derives it from seq_lens. A sequence that no
    # longer fits is listed with length -1: one tile per KV head, which reads its first row and writes
    # NaN (no reduction beyond the work list's own).
    offs_b = tl.arange(0, BLOCK_B)
    lens = tl.load(seq_lens_ptr + offs_b, mask=offs_b < batch, other=0)
    lens = tl.where(_fits(lens, capacity) | (offs_b >= batch), lens, -1)
    n_chunks = tl.where(lens < 0, 1, tl.cdiv(lens, chunk_size))
    tiles = n_chunks * num_kv_heads
    ends = tl.cumsum(tiles, 0)
    for t in tl.range(tl.program_id(0), tl.sum(tiles, 0), tl.num_programs(0)):
        b = tl.sum((ends <= t).to(tl.int32), 0)
        this = offs_b == b
        local = t - tl.sum(tl.where(this, ends - tiles, 0), 0)
        nc = tl.sum(tl.where(this, n_chunks, 0), 0)
        kvh = local // nc
        chunk = local % nc
        start = chunk * chunk_size
        seq_len = tl.sum(tl.where(this, lens, 0), 0)
        acc, m_i, l_i = _attend_tile(q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, block_table_ptr, b, kvh,
                                     start, tl.minimum(start + chunk_size, tl.abs(seq_len)), qk_scale, stride_qb,
                                     stride_qh, stride_kx, stride_ky, stride_kh, stride_sx, stride_sy, stride_sh,
                                     stride_bt, page_size, page_shift, GROUP, PAGED, QUANT, HEAD_DIM, BLOCK_H, BLOCK_N,
                                     K_UNIT, V_UNIT, PAGE_POW2, TABLE_PAGES)
        _finish_tile(part_o_ptr, part_lse_ptr, counters_ptr, out_ptr, stride_ob, stride_oh, b, kvh, chunk, nc,
                     acc, m_i, tl.where(seq_len > 0, l_i, float("nan")), num_q_heads, num_kv_heads, max_chunks,
                     GROUP, HEAD_DIM, BLOCK_H, BLOCK_G, MERGE_C)


class DecodeDims(NamedTuple):
    batch: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    capacity: int  # most positions a sequence may hold
    min_len: int
    max_len: int
    quant: str  # kv_quant format of the caches: none, int8, int4, fp8
    total_len: int  # positions over the batch


def used_pages(seq_lens, block_table, page_size):
    """[B, max_pages] bool: the block-table entries a sequence's positions fall in; the rest may hold
    anything and are never read."""
    columns = torch.arange(block_table.shape[1], device=block_table.device)
    return columns[None, :] < (seq_lens[:, None] + page_size - 1) // page_size


def check_decode_args(q, k_cache, v_cache, seq_lens, block_table, out, k_scale=None, v_scale=None) -> DecodeDims:
    """Validate a decode-attention call (SPEC 7). Syncs once, for the value checks."""
    check_tensor("q", q, dtypes=ATTENTION_DTYPES, ndim=3)
    batch, num_q_heads, head_dim = q.shape
    if batch < 1:
        raise ValueError(f"q has batch {batch}: decode needs at least one sequence")
    check_head_dim("q", head_dim)
    check_unit_stride_last("q", q)
    fmt = kv_quant.check_caches(q.dtype, q.device, k_cache, v_cache, k_scale, v_scale)
    stored_dim = kv_quant.values_per_byte_row(fmt, head_dim)
    paged = block_table is not None
    if paged:
        num_pages, page_size, num_kv_heads, _ = k_cache.shape
        check_tensor("block_table", block_table, dtypes=(torch.int32,), ndim=2, device=q.device)
        if block_table.shape[0] != batch:
            raise ValueError(f"block_table has {block_table.shape[0]} rows, expected batch {batch}")
        check_unit_stride_last("block_table", block_table)
        capacity = block_table.shape[1] * page_size
        check_shape("k_cache", k_cache, (num_pages, page_size, num_kv_heads, stored_dim))
    else:
        check_shape("k_cache", k_cache, (batch, k_cache.shape[1], k_cache.shape[2], stored_dim))
        num_kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    if capacity > MAX_CAPACITY:
        name, holds = ("block_table", "its width x page_size") if paged else ("k_cache", "its length")
        raise ValueError(f"{name}: {holds}, {capacity} positions, exceeds the kernels' {MAX_CAPACITY} (32-bit positions)")
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"q has {num_q_heads} heads, not a multiple of k_cache's {num_kv_heads} KV heads")
    check_tensor("seq_lens", seq_lens, dtypes=(torch.int32,), ndim=1, device=q.device)
    check_shape("seq_lens", seq_lens, (batch,))
    check_unit_stride_last("seq_lens", seq_lens)
    if out is not None:
        check_tensor("out", out, dtypes=(q.dtype,), device=q.device)
        check_shape("out", out, q.shape)
        check_unit_stride_last("out", out)
        check_distinct_elements("out", out)

    # One sync for every value check: [min len, max len, total len, first bad block-table flat index].
    stats = [seq_lens.min(), seq_lens.max(), seq_lens.sum()]
    if paged:
        bad = used_pages(seq_lens, block_table, page_size) & ((block_table < 0) | (block_table >= num_pages))
        stats.append(torch.where(bad.flatten(), torch.arange(bad.numel(), device=q.device), bad.numel()).min())
    stats = torch.stack([s.to(torch.int64) for s in stats]).tolist()
    if stats[0] < 1:
        raise ValueError(f"seq_lens must be >= 1 (attention covers at least the new token), got min {stats[0]}")
    if stats[1] > capacity:
        raise ValueError(f"seq_lens max {stats[1]} exceeds the cache capacity {capacity}")
    if paged and stats[3] < block_table.numel():
        row, col = divmod(stats[3], block_table.shape[1])
        raise ValueError(f"block_table[{row}, {col}] = {int(block_table[row, col])} is outside "
                         f"[0, {num_pages}) (k_cache has {num_pages} pages)")
    return DecodeDims(batch, num_q_heads, num_kv_heads, head_dim, capacity, stats[0], stats[1], fmt, stats[2])


def build_resources(kernel, grid, args, meta):
    """(registers per thread, shared memory bytes) of the build that kernel[grid](*args, **meta)
    launches (compiled, not run)."""
    compiled = kernel.warmup(*args, grid=grid, **meta)
    compiled._init_handles()  # loading the module reads its register count
    return compiled.n_regs, compiled.metadata.shared


def _bind(kernel, grid, extra_args, extra_meta, q, k_cache, v_cache, k_scale, v_scale, seq_lens, block_table,
          out, chunk, dims, fused_merge, block_k, one_wave, resident_per_sm=None, num_warps=None, merge_rows=None,
          deep_pipeline=False):
    batch, num_q_heads, num_kv_heads, head_dim, capacity = dims[:5]
    num_warps = plan.NUM_WARPS if num_warps is None else num_warps
    merge_rows = plan.MERGE_ROWS_PER_WARP if merge_rows is None else merge_rows
    paged = block_table is not None
    max_chunks = triton.cdiv(capacity, chunk)
    out = torch.empty_like(q) if out is None else out
    part_o = torch.empty(batch, num_q_heads, max_chunks, head_dim, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(batch, num_q_heads, max_chunks, device=q.device, dtype=torch.float32)
    quantized = dims.quant != "none"
    if not quantized:  # unused by the kernel; any tensor will do
        k_scale = v_scale = k_cache[:1, :1, :1, 0]
    k_unit, v_unit = quant_units(dims.quant, k_cache, v_cache, head_dim, num_warps, paged)
    # the kernel reads the rows as units: the strides below are K's view's, V's follow in-kernel
    k_cache, v_cache = unit_view(k_cache, k_unit), unit_view(v_cache, v_unit)
    hoisted = plan.table_pages(chunk, k_cache.shape[1]) if paged and (k_unit, v_unit) == (1, 1) else 0
    if deep_pipeline:
        num_stages = plan.LONG_TILE_STAGES
    else:
        num_stages = plan.PAGED_ONE_WAVE_STAGES if paged and one_wave and not hoisted else plan.NUM_STAGES
    if paged:
        strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                   *((k_scale.stride(0), k_scale.stride(1), k_scale.stride(2)) if quantized else (0, 0, 0)),
                   block_table.stride(0))
        page_size, table = k_cache.shape[1], block_table
    else:
        strides = (k_cache.stride(0), k_cache.stride(2), k_cache.stride(1),
                   *((k_scale.stride(0), k_scale.stride(2), k_scale.stride(1)) if quantized else (0, 0, 0)), 0)
        page_size, table = 1, seq_lens  # table is unused when not PAGED
    group = num_q_heads // num_kv_heads
    block_h = max(16, triton.next_power_of_2(group))  # tl.dot needs M >= 16
    block_g = triton.next_power_of_2(group)
    merge = dict(BLOCK_G=block_g, MERGE_C=max(1, merge_rows * num_warps // block_g))
    args = (q, k_cache, v_cache, k_scale, v_scale, seq_lens, table, part_o, part_lse,
            math.log2(math.e) / math.sqrt(head_dim), q.stride(0), q.stride(1), *strides,
            page_size, page_size.bit_length() - 1, max_chunks, num_q_heads, num_kv_heads, chunk, capacity,
            *extra_args(out))
    meta = dict(GROUP=group, PAGED=paged, QUANT=dims.quant, HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_N=block_k,
                K_UNIT=k_unit, V_UNIT=v_unit,
                PAGE_POW2=paged and page_size & (page_size - 1) == 0, TABLE_PAGES=hoisted,
                num_warps=num_warps, num_stages=num_stages, **extra_meta, **(merge if fused_merge else {}))
    fits_per_sm = resident_per_sm
    if resident_per_sm is not None and not hw.interpreting():  # the interpreter has no registers
        cap = plan.resident_registers(resident_per_sm, num_warps)
        registers, shared = build_resources(kernel, grid(max_chunks), args, meta)
        if registers > cap:
            meta["maxnreg"] = cap
        fits_per_sm = hw.shared_memory_per_sm(q.device) // (shared + plan.BLOCK_RESERVED_SHARED)
    merge_args = (part_o, part_lse, seq_lens, out, out.stride(0), out.stride(1), num_q_heads, max_chunks, chunk,
                  capacity)

    def launch():
        kernel[grid(max_chunks)](*args, **meta)
        if not fused_merge:
            _split_kv_merge[(batch, num_kv_heads)](*merge_args, GROUP=group, HEAD_DIM=head_dim, **merge)
        return out

    launch.fits_per_sm = fits_per_sm  # programs of this build that the SM's shared memory holds
    return launch


def triton_split_kv(q, k_cache, v_cache, seq_lens, block_table=None, *, k_scale=None, v_scale=None, out=None,
                    chunk=None, block_k=None):
    # q: [B, Hq, D]; k/v: [B, Hkv, L_max, D] or [pages, page_size, Hkv, D] (kv_quant formats:
    # k/v_scale [B, Hkv, L_max] or [pages, page_size, Hkv] float32); seq_lens: [B] int32
    dims = check_decode_args(q, k_cache, v_cache, seq_lens, block_table, out, k_scale, v_scale)
    chunk = plan.resolve_chunk(chunk, dims, hw.num_sms(q.device), block_table is not None)
    if triton.cdiv(dims.capacity, chunk) > MAX_GRID_Y:
        raise ValueError(f"chunk {chunk}: the cache's capacity of {dims.capacity} positions takes "
                         f"{triton.cdiv(dims.capacity, chunk)} chunks, more than a grid holds ({MAX_GRID_Y}); "
                         "pass a larger chunk")
    return _bind(_split_kv, lambda max_chunks: (dims.batch * dims.num_kv_heads, max_chunks), lambda out: (), {},
                 q, k_cache, v_cache, k_scale, v_scale, seq_lens, block_table, out, chunk, dims, fused_merge=False,
                 block_k=plan.resolve_block_k(block_k, chunk, dims.quant), one_wave=True)


def triton_persistent(q, k_cache, v_cache, seq_lens, block_table=None, *, k_scale=None, v_scale=None, out=None,
                      chunk=None, block_k=None, num_programs=None, num_warps=None):
    # q: [B, Hq, D]; k/v: [B, Hkv, L_max, D] or [pages, page_size, Hkv, D] (kv_quant formats:
    # k/v_scale [B, Hkv, L_max] or [pages, page_size, Hkv] float32); seq_lens: [B] int32
    dims = check_decode_args(q, k_cache, v_cache, seq_lens, block_table, out, k_scale, v_scale)
    batch = dims.batch
    if batch > MAX_BATCH:
        raise ValueError(f"q: batch {batch} exceeds the persistent kernel's MAX_BATCH {MAX_BATCH}")
    counters = torch.zeros(batch * dims.num_kv_heads, dtype=torch.int32, device=q.device)  # self-resetting
    table_width = 0 if block_table is None else block_table.shape[1]
    most_per_sm = None
    while True:
        launch = plan.plan_persistent(dims, hw.num_sms(q.device), k_cache.shape[1] if block_table is not None else None,
                                      shared_per_sm=hw.shared_memory_per_sm(q.device),
                                      dram_gbps=hw.peak_dram_gbps(q.device), chunk=chunk, block_k=block_k,
                                      num_programs=num_programs, num_warps=num_warps, max_programs_per_sm=most_per_sm)
        bound = _bind(_persistent, lambda _: (launch.grid,),
                      lambda out: (counters, out, out.stride(0), out.stride(1), batch, table_width),
                      dict(BLOCK_B=1 if batch == 1 else max(MIN_BLOCK_B, triton.next_power_of_2(batch)),
                           TILE_PER_PROGRAM=launch.tile_per_program,
                           WHOLE_SEQUENCES=launch.tile_per_program and launch.chunk >= dims.capacity),
                      q, k_cache, v_cache, k_scale, v_scale, seq_lens, block_table, out, launch.chunk, dims,
                      fused_merge=True, block_k=launch.block_k, one_wave=launch.one_wave,
                      resident_per_sm=launch.programs_per_sm, num_warps=launch.num_warps,
                      merge_rows=launch.merge_rows, deep_pipeline=launch.deep_pipeline)
        # A persistent grid is one wave: where this GPU's SMs hold fewer of the build than planned
        # (100 KB SMs: consumer Blackwell), plan for one program per SM fewer, whose build may be
        # smaller (shorter steps). Ends by one per SM, which fits: Triton refuses a larger build.
        if num_programs is not None or bound.fits_per_sm >= launch.programs_per_sm:
            return bound
        most_per_sm = launch.programs_per_sm - 1
