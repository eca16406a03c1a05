"""cuda_persistent decode loop (SPEC 2.2): one launch runs all T decode steps, a CTA pinned per
sequence (kernels/cuda/decode_loop.cu), behind triton_persistent's API and checks.

fp16/bf16 caches only: the quantized formats are read by the Triton and graph loops.
"""

import ctypes
import math

import torch

from kernels import cuda_build
from kernels.checks import ATTENTION_DTYPES, HEAD_DIMS, check_tensor
from kernels.cuda_decode_attention import GROUP_CLASSES, group_max
from kernels.tiny_decoder import RMS_EPS, check_decode, decode_out

ATT_WARPS = 8  # as decode_loop.cu (it traps when given less shared memory than it uses)
THREADS = ATT_WARPS * 32
BLOCK_N = ATT_WARPS * 16  # K/V positions per stage
STAGES = 2
ROW_ALIGN = 16  # bytes: cp.async moves K and V rows, and the GEMVs weight rows, in 16-byte chunks


class _LoopArgs(ctypes.Structure):  # decode_loop.cu's LoopArgs, field for field
    _fields_ = [(name, ctypes.c_void_p) for name in
                ("h_in", "w_qkv", "w_o", "gamma", "k", "v", "seq_lens", "out")] + \
        [("eps", ctypes.c_float), ("qk_scale", ctypes.c_float)] + \
        [(name, ctypes.c_int64) for name in ("stride_kb", "stride_kh", "stride_kl")] + \
        [(name, ctypes.c_int32) for name in ("steps", "capacity", "kv_heads", "group", "d_model", "width")]


def smem_bytes(head_dim, group, d_model, width):
    stages = STAGES * 2 * BLOCK_N * head_dim * 2
    union = max(stages, ATT_WARPS * max(width, d_model) * 4)  # K/V stages or the GEMV partial sums
    merge = ATT_WARPS * group_max(group) * (head_dim + 2)
    return union + (merge + 3 * d_model + width) * 4 + d_model * 2


def _check_native(weights, h, k_cache, v_cache, fmt):
    # after tiny_decoder.check_decode: what the native loop needs beyond every loop's checks
    w = weights
    if fmt != "none":
        raise ValueError(f"k_cache: cuda_persistent reads fp16/bf16 caches, got {fmt} "
                         "(the Triton and graph loops read the quantized formats)")
    check_tensor("h", h, dtypes=ATTENTION_DTYPES)  # fp16/bf16 models; the eager loop also runs float32
    if h.device.type != "cuda":
        raise ValueError(f"h is on {h.device}: cuda_persistent needs a CUDA tensor")
    if w.q_heads // w.kv_heads > GROUP_CLASSES[-1]:
        raise ValueError(f"weights: {w.q_heads // w.kv_heads} query heads per KV head exceed {GROUP_CLASSES[-1]}")
    for name, t in (("w_qkv", w.w_qkv), ("w_o", w.w_o), ("gamma", w.gamma)):
        if t.data_ptr() % ROW_ALIGN:
            raise ValueError(f"weights.{name} must be {ROW_ALIGN}-byte aligned")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.data_ptr() % ROW_ALIGN or any(s * t.element_size() % ROW_ALIGN for s in t.stride()[:-1]):
            raise ValueError(f"{name}: rows must be {ROW_ALIGN}-byte aligned (strides {t.stride()})")


def cuda_persistent(weights, h, k_cache, v_cache, seq_lens, steps, *, k_scale=None, v_scale=None, out=None):
    """One launch for `steps` decode steps -> launch() returning outputs [B, steps, d_model] (out
    when given). h: [B, d_model]; k/v: [B, Hkv, L_max, D]; seq_lens: [B] int32, advanced by `steps`.
    Lengths are checked against the capacity L_max here (one sync), then by the kernel at every
    launch (seq_lens not reset between launches, say; the benchmarks reset it): a sequence whose
    `steps` more positions no longer fit in [0, L_max) runs none of them (nothing written, its
    seq_len kept) and gets NaN in all its outputs [b, :, :]; the others run as ever."""
    w = weights
    fmt = check_decode(w, h, k_cache, v_cache, seq_lens, steps, k_scale, v_scale)
    _check_native(w, h, k_cache, v_cache, fmt)
    batch, group = h.shape[0], w.q_heads // w.kv_heads
    width = (w.q_heads + 2 * w.kv_heads) * w.head_dim
    out = decode_out(w, h, steps, out)
    args = _LoopArgs(h.data_ptr(), w.w_qkv.data_ptr(), w.w_o.data_ptr(), w.gamma.data_ptr(), k_cache.data_ptr(),
                     v_cache.data_ptr(), seq_lens.data_ptr(), out.data_ptr(), RMS_EPS,
                     math.log2(math.e) / math.sqrt(w.head_dim), k_cache.stride(0), k_cache.stride(1),
                     k_cache.stride(2), steps, k_cache.shape[2], w.kv_heads, group, w.d_model, width)
    defines = (("ELEM_BF16", int(h.dtype == torch.bfloat16)), ("GROUP_MAX", group_max(group)),
               ("HEAD_DIM", w.head_dim), ("STAGES", STAGES))
    kernel = cuda_build.kernel("decode_loop", "decode_loop_persistent", h.device.index, defines)
    smem = smem_bytes(w.head_dim, group, w.d_model, width)
    kernel.check_shared(smem, h.device)  # over 128 KB at D128: more than consumer Blackwell's blocks hold

    def launch():
        kernel((batch,), (THREADS,), smem, cuda_build.struct(args))
        return out

    # args holds raw pointers: the tensors behind them live as long as the launch
    launch.tensors = (h, w.w_qkv, w.w_o, w.gamma, k_cache, v_cache, seq_lens, out)
    return launch


def builds():
    """Every set of -D defines cuda_persistent compiles with (the compile check's list)."""
    return [dict(ELEM_BF16=bf16, GROUP_MAX=g, HEAD_DIM=d, STAGES=STAGES) for bf16 in (0, 1) for g in GROUP_CLASSES
            for d in HEAD_DIMS]
