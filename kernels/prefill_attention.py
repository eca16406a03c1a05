"""Prefill attention (SPEC 2.3): causal attention inside each prompt of a batch.

Prompts are packed over the batch: q [T, Hq, D], k, v [T, Hkv, D] (sequence b owns rows
cu_seqlens[b] .. cu_seqlens[b+1]; heads and D contiguous in a row, the row stride free, so views
of a fused qkv projection work); the output is [T, Hq, D]. GQA: query head h reads KV head
h // (Hq // Hkv).

Both Triton variants are flash attention's forward pass: one program per (query block of one
sequence, query head), an online softmax over key blocks, the blocks strictly below the diagonal
without masks, the diagonal ones with the causal mask; query blocks are listed longest-first.
- triton_cp_async: pointer loads, software-pipelined with num_stages >= 2 (cp.async on sm_80+);
- triton_tma: Q, K and V tiles through tensor descriptors (TMA on sm_90+), tile (BLOCK_M,
  BLOCK_N) from the caller (--tma-tile-size / TMA_TILE_SIZE). The output is stored through
  pointers: a descriptor store of a sequence's last block would write into the next sequence.
A launch attends the prompts as bound: its query blocks come from cu_seqlens at bind, and the kernel
reads a copy taken then, so cu_seqlens changed afterwards cannot move a read or a store (bind again).
"""

import contextlib
import math

import torch
import torch.nn.attention
import torch.nn.functional
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels import hw
from kernels.checks import (ATTENTION_DTYPES, SharedMemoryTooSmall, check_head_dim, check_power_of_two,
                            check_shape, check_tensor, check_unit_stride_last)
from kernels.sdpa_decode import BACKENDS  # one table of SDPA backends for the suite

# head dim -> default (BLOCK_M, BLOCK_N) per variant: the fastest of tools/tune_prefill_attention on
# an H100 (bf16, Hq 32, Hkv 8, P 4096-8192); a warp per 16 query rows (the mma's M) at every tile.
TILE = {"triton_cp_async": {64: (128, 64), 128: (128, 128)}, "triton_tma": {64: (128, 64), 128: (64, 64)}}
ROWS_PER_WARP = 16
MIN_TILE = 16  # tl.dot's dims are >= 16
NUM_STAGES = 3  # >= 2: the loads of block i + 1 overlap block i's math


@triton.jit
def _load_kv(ptr, desc, start, n0, kvh, stride_t, length,
             TRANSPOSE: tl.constexpr, USE_TMA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    # rows n0 .. n0 + BLOCK_N of the prompt's K (TRANSPOSE: as [D, BLOCK_N]) or V ([BLOCK_N, D])
    if USE_TMA:
        tile = desc.load([start + n0, kvh * HEAD_DIM])
        if TRANSPOSE:
            tile = tile.T
    else:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        if TRANSPOSE:
            tile = tl.load(ptr + (start + offs_n)[None, :] * stride_t + kvh * HEAD_DIM + offs_d[:, None],
                           mask=(offs_n < length)[None, :], other=0.0)
        else:
            tile = tl.load(ptr + (start + offs_n)[:, None] * stride_t + kvh * HEAD_DIM + offs_d[None, :],
                           mask=(offs_n < length)[:, None], other=0.0)
    return tile


@triton.jit
def _attend_blocks(acc, m_i, l_i, q, k_ptr, v_ptr, k_desc, v_desc, start, kvh, stride_kt, stride_vt, lo, hi,
                   offs_m, length, qk_scale, MASKED: tl.constexpr, USE_TMA: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr):
    # keys [lo, hi) in blocks of BLOCK_N, folded into the online softmax (acc, m_i, l_i)
    for n0 in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
        k = _load_kv(k_ptr, k_desc, start, n0, kvh, stride_kt, length, True, USE_TMA, HEAD_DIM, BLOCK_N)
        s = tl.dot(q, k) * qk_scale
        if MASKED:  # causal, and the prompt's end
            offs_n = n0 + tl.arange(0, BLOCK_N)
            s = tl.where((offs_n[None, :] <= offs_m[:, None]) & (offs_n < length)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv(v_ptr, v_desc, start, n0, kvh, stride_vt, length, False, USE_TMA, HEAD_DIM, BLOCK_N)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prefill(q_ptr, k_ptr, v_ptr, o_ptr, q_desc, k_desc, v_desc, cu_ptr, block_seq_ptr, block_m_ptr, qk_scale,
             stride_qt, stride_kt, stride_vt, stride_ot,
             GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             USE_TMA: tl.constexpr, NUM_STAGES: tl.constexpr):
    # grid (query blocks, Hq); block i is rows block_m[i] .. + BLOCK_M of sequence block_seq[i]
    h = tl.program_id(1)
    kvh = h // GROUP
    b = tl.load(block_seq_ptr + tl.program_id(0))
    m0 = tl.load(block_m_ptr + tl.program_id(0))
    start = tl.load(cu_ptr + b)
    length = tl.load(cu_ptr + b + 1) - start
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    if USE_TMA:
        q = q_desc.load([start + m0, h * HEAD_DIM])
    else:
        q = tl.load(q_ptr + (start + offs_m)[:, None] * stride_qt + h * HEAD_DIM + offs_d[None, :],
                    mask=(offs_m < length)[:, None], other=0.0)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    # keys below the block's first row: every query row sees them all, no mask
    acc, m_i, l_i = _attend_blocks(acc, m_i, l_i, q, k_ptr, v_ptr, k_desc, v_desc, start, kvh, stride_kt, stride_vt,
                                   0, m0, offs_m, length, qk_scale, False, USE_TMA, HEAD_DIM, BLOCK_N, NUM_STAGES)
    # the diagonal blocks, up to the block's last row (or the prompt's end)
    acc, m_i, l_i = _attend_blocks(acc, m_i, l_i, q, k_ptr, v_ptr, k_desc, v_desc, start, kvh, stride_kt, stride_vt,
                                   m0, tl.minimum(m0 + BLOCK_M, length), offs_m, length, qk_scale, True, USE_TMA,
                                   HEAD_DIM, BLOCK_N, NUM_STAGES)
    o = acc / l_i[:, None]
    tl.store(o_ptr + (start + offs_m)[:, None] * stride_ot + h * HEAD_DIM + offs_d[None, :],
             o.to(o_ptr.dtype.element_ty), mask=(offs_m < length)[:, None])


def check_prefill_args(q, k, v, cu_seqlens, out):
    """Validate a prefill-attention call (SPEC 7); returns (batch, q_heads, kv_heads, head_dim,
    prompt lengths). Syncs once, for the value checks."""
    check_tensor("q", q, dtypes=ATTENTION_DTYPES, ndim=3)
    tokens, q_heads, head_dim = q.shape
    check_head_dim("q", head_dim)
    check_tensor("k", k, dtypes=(q.dtype,), ndim=3, device=q.device)
    check_tensor("v", v, dtypes=(q.dtype,), device=q.device)
    check_shape("k", k, (tokens, k.shape[1], head_dim))
    check_shape("v", v, k.shape)
    kv_heads = k.shape[1]
    if kv_heads < 1 or q_heads % kv_heads:
        raise ValueError(f"q has {q_heads} heads, not a multiple of k's {kv_heads} KV heads")
    if out is not None:
        check_tensor("out", out, dtypes=(q.dtype,), device=q.device)
        check_shape("out", out, q.shape)
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        if t is not None and (t.stride(2) != 1 or t.stride(1) != head_dim):
            raise ValueError(f"{name} must hold each token's [heads, D] contiguously, got strides {t.stride()}")
    check_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32,), ndim=1, device=q.device)
    check_unit_stride_last("cu_seqlens", cu_seqlens)
    if cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must hold batch + 1 >= 2 offsets, got shape {tuple(cu_seqlens.shape)}")
    offsets = cu_seqlens.tolist()
    lengths = [e - s for s, e in zip(offsets, offsets[1:])]
    if offsets[0] != 0 or min(lengths) < 1:
        raise ValueError(f"cu_seqlens must start at 0 and increase (every prompt >= 1 token), got {offsets}")
    if offsets[-1] != tokens:  # a token past the last prompt would be left unwritten in out
        raise ValueError(f"cu_seqlens ends at {offsets[-1]}, not at q's {tokens} tokens (every token is in a prompt)")
    return len(lengths), q_heads, kv_heads, head_dim, lengths


def _bind(q, k, v, cu_seqlens, out, tile, use_tma, num_stages):
    batch, q_heads, kv_heads, head_dim, lengths = check_prefill_args(q, k, v, cu_seqlens, out)
    cu_seqlens = cu_seqlens.clone()  # the offsets checked and listed in blocks below, whatever the caller's become
    block_m, block_n = tile or TILE["triton_tma" if use_tma else "triton_cp_async"][head_dim]
    for name, size in (("BLOCK_M", block_m), ("BLOCK_N", block_n)):
        check_power_of_two(f"tile {name}", size)
        if size < MIN_TILE:
            raise ValueError(f"tile {name} {size} must be >= {MIN_TILE} (tl.dot)")
    if block_m % block_n:
        raise ValueError(f"tile: BLOCK_M {block_m} must be a multiple of BLOCK_N {block_n} (unmasked blocks "
                         "end where a query block starts)")
    if use_tma:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.data_ptr() % 16 or t.stride(0) * t.element_size() % 16:
                raise ValueError(f"{name}: tensor descriptors need 16-byte aligned rows, got stride {t.stride(0)}")
    # query blocks, longest first: the last blocks of the longest prompts see the most keys
    blocks = sorted(((m0, b) for b, n in enumerate(lengths) for m0 in range(0, n, block_m)), reverse=True)
    block_m_of = torch.tensor([m0 for m0, _ in blocks], dtype=torch.int32, device=q.device)
    block_seq = torch.tensor([b for _, b in blocks], dtype=torch.int32, device=q.device)
    out = torch.empty_like(q) if out is None else out
    grid = (len(blocks), q_heads)

    def build(block_n):
        descs = (None, None, None)
        if use_tma:
            descs = tuple(TensorDescriptor(t, [t.shape[0], t.shape[1] * head_dim], [t.stride(0), 1], [rows, head_dim])
                          for t, rows in ((q, block_m), (k, block_n), (v, block_n)))
        args = (q, k, v, out, *descs, cu_seqlens, block_seq, block_m_of, math.log2(math.e) / math.sqrt(head_dim),
                q.stride(0), k.stride(0), v.stride(0), out.stride(0))
        meta = dict(GROUP=q_heads // kv_heads, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
                    USE_TMA=use_tma, NUM_STAGES=num_stages, num_warps=block_m // ROWS_PER_WARP)
        return args, meta

    args, meta = build(block_n)
    if not hw.interpreting():  # the interpreter builds nothing
        # Triton refuses a launch whose build needs more shared memory than a block may have: a
        # default tile that does not fit this GPU (consumer Blackwell: 99 KB a block) halves BLOCK_N
        limit = hw.shared_memory_per_block(q.device)
        while (shared := _prefill.warmup(*args, grid=grid, **meta).metadata.shared) > limit:
            if tile is not None or block_n == MIN_TILE:
                raise SharedMemoryTooSmall(f"tile ({block_m}, {block_n}) at {num_stages} stages needs {shared} bytes "
                                           f"of shared memory, more than the {limit} a block may have on this GPU")
            block_n //= 2
            args, meta = build(block_n)

    def launch():
        _prefill[grid](*args, **meta)
        return out

    launch.tile = (block_m, block_n)
    return launch


def triton_cp_async(q, k, v, cu_seqlens, *, out=None, tile=None, num_stages=NUM_STAGES):
    # q: [T, Hq, D]; k, v: [T, Hkv, D]; cu_seqlens: [B + 1] int32 -> launch() returning [T, Hq, D]
    if num_stages < 2:
        raise ValueError(f"num_stages must be >= 2 (the pipelined loads are the point), got {num_stages}")
    return _bind(q, k, v, cu_seqlens, out, tile, False, num_stages)


def triton_tma(q, k, v, cu_seqlens, *, out=None, tile=None):
    # as triton_cp_async; tile: (BLOCK_M, BLOCK_N) of the tensor descriptors
    return _bind(q, k, v, cu_seqlens, out, tile, True, NUM_STAGES)


def sdpa(q, k, v, cu_seqlens, *, out=None, backend=None):
    """The anchor: torch SDPA, causal, on the prompts right-padded to the longest as [B, H, P_max, D]
    (padded once, before launch()); a padded key is never seen by a real query under the causal mask.
    launch() returns the packed [T, Hq, D] output; launch.timed is the SDPA call alone, the anchor's
    benchmarked part (the padding and the unpacking to the suite's layout are left out: the bar is
    the library's kernel at its best)."""
    batch, q_heads, kv_heads, head_dim, lengths = check_prefill_args(q, k, v, cu_seqlens, out)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    longest = max(lengths)
    starts = cu_seqlens[:-1].long()
    rows = starts[:, None] + torch.arange(longest, device=q.device)[None, :]  # [B, P_max]
    valid = torch.arange(longest, device=q.device)[None, :] < torch.tensor(lengths, device=q.device)[:, None]
    rows = torch.where(valid, rows, 0)

    def padded(t):  # [T, H, D] -> [B, H, P_max, D]
        return t[rows].transpose(1, 2).contiguous()

    qp, kp, vp = padded(q), padded(k), padded(v)
    packed_rows, padded_rows = rows[valid], valid.flatten().nonzero().flatten()  # indexed before launch
    out = torch.empty_like(q) if out is None else out

    def timed():
        with torch.nn.attention.sdpa_kernel([BACKENDS[backend]]) if backend else contextlib.nullcontext():
            return torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)

    def launch():
        o = timed().transpose(1, 2).flatten(0, 1)  # [B * P_max, Hq, D]
        out[packed_rows] = o[padded_rows]
        return out

    launch.timed = timed
    return launch


VARIANTS = {"sdpa": sdpa, "triton_cp_async": triton_cp_async, "triton_tma": triton_tma}
