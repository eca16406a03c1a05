"""cuda_persistent decode attention (SPEC 2.1): triton_persistent's design in CUDA C++
(kernels/cuda/decode_attention.cu), behind the same API and argument checks.

fp16/bf16 caches only: the quantized formats are read by the Triton variants.
"""

import ctypes
import math

import torch
import triton

from kernels import cuda_build, hw
from kernels.decode_attention import MAX_BATCH, check_decode_args
from kernels.decode_plan import PAGED_TILES_PER_SM, choose_chunk
from kernels.checks import HEAD_DIMS, check_power_of_two

THREADS = 128
# H100, tools/tune_cuda_decode_attention.py: 2 stages x 3 CTAs per SM (~73 KB of shared memory
# each at D=128) beat 3 x 2 and 3 x 3 by 2-5% at B16-B64, L4096-L16384; no setting mattered at B1.
CTAS_PER_SM = 3
STAGES = 2  # blocks of K and V (64 positions each) in flight per CTA
BLOCK_N, WARPS = 64, 4  # as decode_attention.cu (it traps when given less shared memory than it uses)
GROUP_CLASSES = (4, 8, 16)  # GROUP_MAX builds: query heads per KV head, up to the 16 rows of an mma tile
ROW_ALIGN = 16  # bytes: cp.async moves K and V rows in 16-byte chunks


class _Args(ctypes.Structure):  # decode_attention.cu's Args, field for field
    _fields_ = [(name, ctypes.c_void_p) for name in
                ("q", "k", "v", "seq_lens", "block_table", "part_o", "part_lse", "counters", "out")] + \
        [("qk_scale", ctypes.c_float)] + \
        [(name, ctypes.c_int64) for name in
         ("stride_qb", "stride_qh", "stride_kx", "stride_ky", "stride_kh", "stride_bt", "stride_ob", "stride_oh")] + \
        [(name, ctypes.c_int32) for name in
         ("page_size", "max_chunks", "num_q_heads", "num_kv_heads", "group", "chunk", "batch", "capacity")]


def group_max(group):
    return next(g for g in GROUP_CLASSES if g >= group)


def smem_bytes(head_dim, group, stages, batch):
    return stages * 2 * BLOCK_N * head_dim * 2 + WARPS * group_max(group) * (head_dim + 2) * 4 + batch * 4


def _check_native(q, k_cache, v_cache, dims, out):
    if dims.quant != "none":
        raise ValueError(f"k_cache: cuda_persistent reads fp16/bf16 caches, got {dims.quant} "
                         "(the Triton variants read the quantized formats)")
    if q.device.type != "cuda":
        raise ValueError(f"q is on {q.device}: cuda_persistent needs a CUDA tensor")
    group = dims.num_q_heads // dims.num_kv_heads
    if group > GROUP_CLASSES[-1]:
        raise ValueError(f"q: {group} query heads per KV head exceed cuda_persistent's {GROUP_CLASSES[-1]}")
    if dims.batch > MAX_BATCH:
        raise ValueError(f"q: batch {dims.batch} exceeds cuda_persistent's MAX_BATCH {MAX_BATCH}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.data_ptr() % ROW_ALIGN or any(s * t.element_size() % ROW_ALIGN for s in t.stride()[:-1]):
            raise ValueError(f"{name}: rows must be {ROW_ALIGN}-byte aligned (strides {t.stride()})")
    for name, t in (("q", q), ("out", out)):
        if t is not None and (t.data_ptr() % 4 or any(s % 2 for s in t.stride()[:-1])):
            raise ValueError(f"{name}: head rows must be 4-byte aligned (strides {t.stride()})")


def cuda_persistent(q, k_cache, v_cache, seq_lens, block_table=None, *, k_scale=None, v_scale=None, out=None,
                    chunk=None, num_programs=None, stages=STAGES):
    # q: [B, Hq, D]; k/v: [B, Hkv, L_max, D] or [pages, page_size, Hkv, D]; seq_lens: [B] int32
    dims = check_decode_args(q, k_cache, v_cache, seq_lens, block_table, out, k_scale, v_scale)
    _check_native(q, k_cache, v_cache, dims, out)
    batch, num_q_heads, num_kv_heads, head_dim, capacity = dims[:5]
    group = num_q_heads // num_kv_heads
    sms = hw.num_sms(q.device)
    if chunk is None:
        chunk = choose_chunk(dims, sms, PAGED_TILES_PER_SM if block_table is not None else 1)
    check_power_of_two("chunk", chunk)
    if num_programs is not None and (not isinstance(num_programs, int) or num_programs < 1):
        raise ValueError(f"num_programs must be a positive int, got {num_programs!r}")
    if stages not in (2, 3, 4):
        raise ValueError(f"stages must be 2, 3 or 4, got {stages!r}")
    max_chunks = triton.cdiv(capacity, chunk)
    out = torch.empty_like(q) if out is None else out
    part_o = torch.empty(batch, num_q_heads, max_chunks, head_dim, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(batch, num_q_heads, max_chunks, device=q.device, dtype=torch.float32)
    counters = torch.zeros(batch * num_kv_heads, dtype=torch.int32, device=q.device)  # self-resetting
    paged = block_table is not None
    if paged:
        kx, ky, kh = k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)
        table, stride_bt, page_size = block_table, block_table.stride(0), k_cache.shape[1]
    else:
        kx, ky, kh = k_cache.stride(0), k_cache.stride(2), k_cache.stride(1)
        table, stride_bt, page_size = seq_lens, 0, 1  # no table: any valid address
    args = _Args(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), seq_lens.data_ptr(), table.data_ptr(),
                 part_o.data_ptr(), part_lse.data_ptr(), counters.data_ptr(), out.data_ptr(),
                 math.log2(math.e) / math.sqrt(head_dim), q.stride(0), q.stride(1), kx, ky, kh, stride_bt,
                 out.stride(0), out.stride(1), page_size, max_chunks, num_q_heads, num_kv_heads, group, chunk, batch,
                 capacity)
    defines = (("ELEM_BF16", int(q.dtype == torch.bfloat16)), ("GROUP_MAX", group_max(group)),
               ("HEAD_DIM", head_dim), ("PAGED", int(paged)), ("STAGES", stages))
    kernel = cuda_build.kernel("decode_attention", "decode_persistent", q.device.index, defines)
    smem = smem_bytes(head_dim, group, stages, batch)
    kernel.check_shared(smem, q.device)
    if num_programs is None:  # one wave: CTAS_PER_SM, or fewer where an SM holds fewer (100 KB SMs: one)
        num_programs = sms * min(CTAS_PER_SM, kernel.blocks_per_sm(THREADS, smem))
    grid = min(num_programs, batch * num_kv_heads * max_chunks)

    def launch():
        kernel((grid,), (THREADS,), smem, cuda_build.struct(args))
        return out

    # args holds raw pointers: the tensors behind them live as long as the launch
    launch.tensors = (q, k_cache, v_cache, seq_lens, table, part_o, part_lse, counters, out)
    return launch


def builds():
    """Every set of -D defines cuda_persistent compiles with (the compile check's list)."""
    return [dict(ELEM_BF16=bf16, GROUP_MAX=g, HEAD_DIM=d, PAGED=p, STAGES=STAGES) for bf16 in (0, 1)
            for g in GROUP_CLASSES for d in HEAD_DIMS for p in (0, 1)]
