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


def triton_tma_probe():
    # src, dst: [2 * TILE, TILE] fp16; a host tensor descriptor is a TMA descriptor on sm_90+.
    src = torch.randn(2 * PROBE_TILE, PROBE_TILE, device="cuda", dtype=torch.float16)
    dst = torch.full_like(src, float("nan"))
    block = [PROBE_TILE, PROBE_TILE]
    _tma_copy[(2,)](TensorDescriptor.from_tensor(src, block), TensorDescriptor.from_tensor(dst, block), PROBE_TILE)
    torch.cuda.synchronize()
    if not torch.equal(src, dst):
        raise RuntimeError("tensor-descriptor copy returned wrong data")


def cuda_tma_probe():
    """kernels/cuda/tma_probe.cu: a tile in through cp.async.bulk.tensor + mbarrier and out through
    a tensor-map store, compiled by NVRTC; a toolchain that cannot emit tensor-map instructions
    fails here."""
    from kernels import cuda_build, tensor_maps

    src = torch.randn(2 * PROBE_TILE, PROBE_TILE, device="cuda", dtype=torch.float16)
    dst = torch.full_like(src, float("nan"))
    maps = [tensor_maps.tiled(t, (PROBE_TILE, 2 * PROBE_TILE), (PROBE_TILE,), (PROBE_TILE, PROBE_TILE))
            for t in (src, dst)]
    box_bytes = PROBE_TILE * PROBE_TILE * src.element_size()
    kernel = cuda_build.kernel("tma_probe", "tma_probe", src.device.index)
    kernel((2,), (32,), box_bytes, *map(cuda_build.struct, maps), cuda_build.int32(PROBE_TILE),
           cuda_build.int32(box_bytes))
    torch.cuda.synchronize()
    if not torch.equal(src, dst):
        raise RuntimeError("the CUDA TMA kernel returned wrong data")


def fp8_decode_probe(device):
    """The fused FP8 decode kernel on a small fp8-e4m3 cache, against plain-torch math in float64."""
    from kernels import decode_attention, kv_quant

    q = torch.randn(2, 4, 64, device=device, dtype=torch.bfloat16)
    (k, k_scale), (v, v_scale) = (kv_quant.quantize(torch.randn(2, 2, 80, 64, device=device), "fp8") for _ in "kv")
    seq_lens = torch.tensor([80, 33], dtype=torch.int32, device=device)
    out = decode_attention.triton_persistent(q, k, v, seq_lens, k_scale=k_scale, v_scale=v_scale)()
    for b, n in enumerate(seq_lens.tolist()):
        kb = (k[b, :, :n].double() * k_scale[b, :, :n, None]).repeat_interleave(2, 0)  # e4m3 * scale
        vb = (v[b, :, :n].double() * v_scale[b, :, :n, None]).repeat_interleave(2, 0)
        p = torch.softmax(q[b].double()[:, None] @ kb.transpose(1, 2) / 8.0, -1)
        if not torch.allclose(out[b].double(), (p @ vb)[:, 0], atol=2e-2, rtol=2e-2):  # bf16 output
            raise RuntimeError("fused fp8-e4m3 decode attention returned wrong values")
