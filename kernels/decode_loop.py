"""The persistent decode loop (SPEC 2.2): one launch runs all T decode steps of the tiny decoder.

One program (CTA) is pinned to each sequence and runs its T steps back to back: RMSNorm, the
QKV projection, the KV append at position seq_len (quantized in-kernel when the cache is),
attention over positions 0..seq_len with the dequantization fused (decode_tiles'
`_attend_chunk`), the output projection and the residual, whose result is the next step's input.
Nothing returns to the host between steps; a step's vectors live in a per-sequence scratch
row, and a CTA barrier orders each stage's stores before the next stage's loads.

The projections are GEMVs (one token per sequence) written as tl.dot on a 16-row tile whose
first row is the token, so Triton pipelines the weight loads; every CTA streams the whole
weight matrices from L2 each step, which is what ends this design's advantage as d_model grows.
"""

import math

import torch
import triton
import triton.language as tl

from kernels import kv_quant
from kernels.checks import ATTENTION_DTYPES, check_power_of_two, check_tensor
from kernels.decode_tiles import _attend_chunk, _store_heads
from kernels.tiny_decoder import RMS_EPS, check_decode, decode_out

BLOCK_N = 64  # KV positions per attention step (--block-k)
BLOCK_K = 64  # reduction rows of a weight tile
BLOCK_OUT = 256  # output columns of a weight tile (H100 sweep: notes/decode_loop.md, sixteenth session)
DOT_ROWS = 16  # tl.dot needs M >= 16: the token is row 0, rows 1..15 are zero
NUM_WARPS = 8  # a 256-column tile on 4 warps spills more (sm_90, int8 large: 248-byte stack; 8 warps: 128)
NUM_STAGES = 3
ROUND_MAGIC: tl.constexpr = tl.constexpr(12582912.0)  # 1.5 * 2^23


@triton.jit
def _gemv(x_ptr, w_ptr, n0, K: tl.constexpr, N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_OUT: tl.constexpr):
    # x[K] @ w[K, N] for columns [n0, n0 + BLOCK_OUT) -> [BLOCK_OUT] fp32 (w row-major)
    rows = tl.arange(0, 16)
    offs_n = n0 + tl.arange(0, BLOCK_OUT)
    acc = tl.zeros([16, BLOCK_OUT], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_k[None, :] + rows[:, None] * 0, mask=(rows == 0)[:, None], other=0.0)
        w = tl.load(w_ptr + offs_k[:, None] * N + offs_n[None, :], mask=(offs_n < N)[None, :], other=0.0)
        acc = tl.dot(x, w, acc)
    return tl.sum(acc, 0)


@triton.jit
def _append_kv(qkv_ptr, cache_ptr, scale_ptr, row, scale_row, QUANT: tl.constexpr, QMAX: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    # One head's new k (or v), fp32 in qkv_ptr[0:D], into the cache row (and its scale), in the
    # formats of kernels/kv_quant.py: scale = amax / qmax per token and head.
    half = tl.arange(0, HEAD_DIM // 2)
    lo = tl.load(qkv_ptr + half)
    hi = tl.load(qkv_ptr + HEAD_DIM // 2 + half)
    if QUANT == "none":
        tl.store(cache_ptr + row + half, lo.to(cache_ptr.dtype.element_ty))
        tl.store(cache_ptr + row + HEAD_DIM // 2 + half, hi.to(cache_ptr.dtype.element_ty))
    else:
        amax = tl.maximum(tl.max(tl.abs(lo), 0), tl.max(tl.abs(hi), 0))
        scale = tl.maximum(amax / QMAX, 1.1754943508222875e-38)  # float32 tiny, as kv_quant
        tl.store(scale_ptr + scale_row, scale)
        lo = lo / scale
        hi = hi / scale
        if QUANT == "fp8":
            tl.store(cache_ptr + row + half, lo.to(tl.float8e4nv))
            tl.store(cache_ptr + row + HEAD_DIM // 2 + half, hi.to(tl.float8e4nv))
        else:
            # Round half to even, as torch.round: adding and removing 1.5 * 2^23 leaves the fp32
            # adder's rounding on the integer grid (|x| <= 127 here). Same on CPU and GPU.
            lo = tl.clamp((lo + ROUND_MAGIC) - ROUND_MAGIC, -QMAX, QMAX).to(tl.int32)
            hi = tl.clamp((hi + ROUND_MAGIC) - ROUND_MAGIC, -QMAX, QMAX).to(tl.int32)
            if QUANT == "int8":
                tl.store(cache_ptr + row + half, lo.to(tl.int8))
                tl.store(cache_ptr + row + HEAD_DIM // 2 + half, hi.to(tl.int8))
            else:
                tl.store(cache_ptr + row + half, ((lo + 8) | ((hi + 8) << 4)).to(tl.uint8))


# steps and the scale strides change with the test case, not with the code worth generating (see
# kernels/decode_attention.py VARYING_INTS); the K/V strides stay specialized for the load widths.
@triton.jit(do_not_specialize=("steps", "capacity", "stride_sb", "stride_sh", "stride_sl"),
            do_not_specialize_on_alignment=("k_scale_ptr", "v_scale_ptr"))
def _decode_loop(h_ptr, w_qkv_ptr, w_o_ptr, gamma_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, seq_lens_ptr,
                 out_ptr, scratch_ptr, model_scratch_ptr, steps, capacity, eps, qk_scale,
                 stride_kb, stride_kh, stride_kl, stride_sb, stride_sh, stride_sl,
                 Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, QUANT: tl.constexpr,
                 QMAX: tl.constexpr,
                 BLOCK_DM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_OUT: tl.constexpr):
    # grid (B,): program b runs sequence b's steps. Scratch rows (per sequence):
    #   scratch [h: d_model | qkv: (Hq + 2 Hkv) D] fp32; model_scratch [x: d_model | q: Hq D | attn: Hq D]
    D_MODEL: tl.constexpr = Q_HEADS * HEAD_DIM
    WIDTH: tl.constexpr = (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM
    GROUP: tl.constexpr = Q_HEADS // KV_HEADS
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_DM)
    in_model = offs < D_MODEL
    seq_len = tl.load(seq_lens_ptr + b)
    if (seq_len < 0) | (seq_len > capacity - steps):  # its steps would append outside the cache [0, capacity)
        nan = tl.full([BLOCK_DM], float("nan"), tl.float32).to(out_ptr.dtype.element_ty)
        for t in range(steps):  # nothing appended, seq_len kept: NaN outputs fail the caller's checks
            tl.store(out_ptr + (b * steps + t) * D_MODEL + offs, nan, mask=in_model)
        return
    h_row = scratch_ptr + b * (D_MODEL + WIDTH)
    qkv_row = h_row + D_MODEL
    x_row = model_scratch_ptr + b * (3 * D_MODEL)
    q_row = x_row + D_MODEL
    attn_row = q_row + D_MODEL
    gamma = tl.load(gamma_ptr + offs, mask=in_model, other=0.0).to(tl.float32)
    tl.store(h_row + offs, tl.load(h_ptr + b * D_MODEL + offs, mask=in_model).to(tl.float32), mask=in_model)
    for t in range(steps):
        tl.debug_barrier()  # h of the previous step is stored
        h = tl.load(h_row + offs, mask=in_model, other=0.0)
        x = h * tl.math.rsqrt(tl.sum(h * h, 0) / D_MODEL + eps) * gamma
        tl.store(x_row + offs, x.to(x_row.dtype.element_ty), mask=in_model)
        tl.debug_barrier()
        for n0 in range(0, WIDTH, BLOCK_OUT):  # q, k, v = x @ W_qkv
            cols = n0 + tl.arange(0, BLOCK_OUT)
            tl.store(qkv_row + cols, _gemv(x_row, w_qkv_ptr, n0, D_MODEL, WIDTH, BLOCK_K, BLOCK_OUT), mask=cols < WIDTH)
        tl.debug_barrier()
        tl.store(q_row + offs, tl.load(qkv_row + offs, mask=in_model).to(q_row.dtype.element_ty), mask=in_model)
        for kvh in range(KV_HEADS):  # append k, v at position seq_len
            head = tl.cast(kvh, tl.int64)  # 64-bit: (Hkv - 1) * stride_kh may pass 2**31
            row = b.to(tl.int64) * stride_kb + head * stride_kh + seq_len.to(tl.int64) * stride_kl
            scale_row = b.to(tl.int64) * stride_sb + head * stride_sh + seq_len.to(tl.int64) * stride_sl
            _append_kv(qkv_row + D_MODEL + kvh * HEAD_DIM, k_ptr, k_scale_ptr, row, scale_row, QUANT, QMAX,
                       HEAD_DIM)
            _append_kv(qkv_row + D_MODEL + (KV_HEADS + kvh) * HEAD_DIM, v_ptr, v_scale_ptr, row, scale_row,
                       QUANT, QMAX, HEAD_DIM)
        seq_len += 1
        tl.debug_barrier()
        for kvh in range(KV_HEADS):  # attention over positions 0..seq_len - 1, the new one included
            acc, m_i, l_i = _attend_chunk(model_scratch_ptr + D_MODEL, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr,
                                          seq_lens_ptr, b, kvh, 0, seq_len, qk_scale,
                                          3 * D_MODEL, HEAD_DIM, stride_kb, stride_kl, stride_kh,
                                          stride_sb, stride_sl, stride_sh, 0, 1, 0,
                                          GROUP, False, QUANT, HEAD_DIM, BLOCK_H, BLOCK_N, False)
            _store_heads(model_scratch_ptr + 2 * D_MODEL, 3 * D_MODEL, HEAD_DIM, b, kvh, acc / l_i[:, None],
                         GROUP, HEAD_DIM, BLOCK_H)
        tl.debug_barrier()
        for n0 in range(0, D_MODEL, BLOCK_OUT):  # h += attn @ W_o; h is the step's output
            cols = n0 + tl.arange(0, BLOCK_OUT)
            h_new = tl.load(h_row + cols, mask=cols < D_MODEL) + _gemv(attn_row, w_o_ptr, n0, D_MODEL, D_MODEL,
                                                                        BLOCK_K, BLOCK_OUT)
            tl.store(h_row + cols, h_new, mask=cols < D_MODEL)
            tl.store(out_ptr + (b * steps + t) * D_MODEL + cols, h_new.to(out_ptr.dtype.element_ty),
                     mask=cols < D_MODEL)
    tl.store(seq_lens_ptr + b, seq_len)


def triton_persistent(weights, h, k_cache, v_cache, seq_lens, steps, *, k_scale=None, v_scale=None,
                      block_k=BLOCK_N, out=None):
    """One launch for `steps` decode steps -> launch() returning outputs [B, steps, d_model]
    (out when given). h: [B, d_model]; k/v: [B, Hkv, L_max, D] (or a kv_quant format with k/v_scale
    [B, Hkv, L_max]); seq_lens: [B] int32, advanced by `steps` like every decode loop. Lengths are
    checked against the capacity L_max here (one sync), then by the kernel at every launch (seq_lens
    not reset between launches, say; the benchmarks reset it): a sequence whose `steps` more
    positions no longer fit in [0, L_max) runs none of them (nothing written, its seq_len kept) and
    gets NaN in all its outputs [b, :, :]; the others run as ever."""
    w = weights
    fmt = check_decode(w, h, k_cache, v_cache, seq_lens, steps, k_scale, v_scale)
    check_tensor("h", h, dtypes=ATTENTION_DTYPES)  # fp16/bf16 models; the eager loop also runs float32
    check_power_of_two("block_k", block_k)
    if block_k < DOT_ROWS:
        raise ValueError(f"block_k {block_k} must be >= {DOT_ROWS} (tl.dot needs >= 16)")
    batch = h.shape[0]
    if fmt == "none":  # unused by the kernel; any tensor will do
        k_scale = v_scale = h
        scale_strides = (0, 0, 0)
    else:
        scale_strides = k_scale.stride()
    width = (w.q_heads + 2 * w.kv_heads) * w.head_dim
    scratch = torch.empty(batch, w.d_model + width, device=h.device, dtype=torch.float32)
    model_scratch = torch.empty(batch, 3 * w.d_model, device=h.device, dtype=h.dtype)
    out = decode_out(w, h, steps, out)
    args = (h, w.w_qkv, w.w_o, w.gamma, k_cache, v_cache, k_scale, v_scale, seq_lens, out, scratch, model_scratch,
            steps, k_cache.shape[2], RMS_EPS, math.log2(math.e) / math.sqrt(w.head_dim),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *scale_strides)
    meta = dict(Q_HEADS=w.q_heads, KV_HEADS=w.kv_heads, HEAD_DIM=w.head_dim, QUANT=fmt,
                QMAX=kv_quant.QMAX.get(fmt, 1.0),  # unused unquantized
                BLOCK_DM=triton.next_power_of_2(w.d_model),
                BLOCK_H=max(DOT_ROWS, triton.next_power_of_2(w.q_heads // w.kv_heads)), BLOCK_N=block_k,
                BLOCK_K=min(BLOCK_K, w.d_model), BLOCK_OUT=BLOCK_OUT, num_warps=NUM_WARPS, num_stages=NUM_STAGES)

    def launch():
        _decode_loop[(batch,)](*args, **meta)
        return out

    return launch
