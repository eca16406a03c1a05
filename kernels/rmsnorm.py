"""RMSNorm as one Triton kernel (SPEC 1): x * rsqrt(mean(x^2) + eps) * gamma per row, statistics
in fp32, the result in x's dtype. torch's eager version (kernels/tiny_decoder.rmsnorm) takes about
nine kernels, each a pass over the rows in fp32; this one reads x once and writes once."""

import torch
import triton
import triton.language as tl

from kernels.checks import check_shape, check_tensor, check_unit_stride_last
from kernels.tiny_decoder import RMS_EPS

MAX_COLS = 16384  # one program holds a whole row


@triton.jit
def _rmsnorm(x_ptr, gamma_ptr, out_ptr, stride_x, stride_o, n_cols, eps, BLOCK: tl.constexpr):
    # one program per row
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n_cols + eps)
    gamma = tl.load(gamma_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (x * rstd * gamma).to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm(x, gamma, *, out=None, eps=RMS_EPS):
    # x: [N, d_model] (rows may be strided, columns contiguous); gamma: [d_model] -> [N, d_model]
    check_tensor("x", x, dtypes=(torch.float16, torch.bfloat16, torch.float32), ndim=2)
    rows, cols = x.shape
    if x.stride(1) != 1:
        raise ValueError(f"x must have contiguous rows, got strides {x.stride()}")
    if not 1 <= cols <= MAX_COLS:
        raise ValueError(f"x: d_model {cols} outside [1, {MAX_COLS}]")
    check_tensor("gamma", gamma, dtypes=(torch.float16, torch.bfloat16, torch.float32), ndim=1, device=x.device,
                 device_of="x")
    check_shape("gamma", gamma, (cols,))
    check_unit_stride_last("gamma", gamma)  # read as one contiguous row
    out = torch.empty_like(x) if out is None else out
    check_tensor("out", out, dtypes=(x.dtype,), device=x.device, device_of="x")
    check_shape("out", out, x.shape)
    if out.stride(1) != 1:
        raise ValueError(f"out must have contiguous rows, got strides {out.stride()}")
    block = triton.next_power_of_2(cols)
    _rmsnorm[(rows,)](x, gamma.contiguous(), out, x.stride(0), out.stride(0), cols, eps, BLOCK=block,
                      num_warps=min(16, max(1, block // 256)))
    return out
