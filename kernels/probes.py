"""Tiny probe kernels behind the hardware markers (kernels/hw.py). Each raises on any mismatch."""

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

PROBE_TILE = 64


@triton.jit
def _tma_copy(src_desc, dst_desc, TILE: tl.constexpr):
    row = tl.program_id(0) * TILE
    tile = src_desc.load([row, 0])
    dst_desc.store([row, 0], tile)


def tma_copy_probe():
    # src, dst: [2 * TILE, TILE] fp16; a host tensor descriptor is a TMA descriptor on sm_90+.
    src = torch.randn(2 * PROBE_TILE, PROBE_TILE, device="cuda", dtype=torch.float16)
    dst = torch.full_like(src, float("nan"))
    block = [PROBE_TILE, PROBE_TILE]
    _tma_copy[(2,)](TensorDescriptor.from_tensor(src, block), TensorDescriptor.from_tensor(dst, block), PROBE_TILE)
    torch.cuda.synchronize()
    if not torch.equal(src, dst):
        raise RuntimeError("tensor-descriptor copy returned wrong data")


@triton.jit
def _fp8_dequant(x_ptr, scale_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs).to(tl.float32)
    tl.store(out_ptr + offs, x * tl.load(scale_ptr))


def fp8_dequant_probe():
    n = 256
    x = torch.randn(n, device="cuda").to(torch.float8_e4m3fn)
    scale = torch.rand(1, device="cuda") + 0.5
    out = torch.full((n,), float("nan"), device="cuda")
    _fp8_dequant[(1,)](x, scale, out, n)
    torch.cuda.synchronize()
    if not torch.equal(out, x.float() * scale):
        raise RuntimeError("fp8-e4m3 dequantization returned wrong data")
