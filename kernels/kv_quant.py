"""Quantized KV caches (SPEC 1, 2.7): what the bytes in memory are, and how to make them.

A quantized cache keeps the layout of its bf16/fp16 counterpart (contiguous [B, Hkv, L, D] or
paged [pages, page_size, Hkv, D]) with a float32 scale per token and KV head beside it
(shape = the cache's shape without D). Value x is stored as round(x / scale):
- int8: torch.int8, |q| <= 127, scale = amax / 127;
- fp8: torch.float8_e4m3fn, scale = amax / 448 (e4m3's largest finite value);
- int4: torch.uint8 with the last dimension D / 2, two values per byte: byte i holds element i
  in its low nibble and element i + D / 2 in its high nibble, each as q + 8 with |q| <= 7,
  scale = amax / 7. Splitting the row in halves (not even/odd) lets a kernel dot each half of q
  with one nibble plane, without interleaving registers.
The cache's dtype names its format. Dequantization happens inside the attention kernels.
"""

import torch

from kernels.checks import check_shape, check_tensor, check_unit_stride_last

FORMATS = {"int8": torch.int8, "int4": torch.uint8, "fp8": torch.float8_e4m3fn}
QUANTIZATIONS = ("none",) + tuple(FORMATS)
QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}
INT4_BIAS = 8


def format_of(cache) -> str:
    """'none' for an fp16/bf16 cache, else the quantized format its dtype names."""
    for name, dtype in FORMATS.items():
        if cache.dtype == dtype:
            return name
    return "none"


def values_per_byte_row(fmt, head_dim):
    """Length of the stored last dimension for head_dim values."""
    return head_dim // 2 if fmt == "int4" else head_dim


def quantize(x, fmt):
    """x: [..., D] float -> (data [..., D or D/2], scale [...] float32), per row of D values."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {tuple(FORMATS)}, got {fmt!r}")
    x = x.float()
    scale = (x.abs().amax(-1) / QMAX[fmt]).clamp_min(torch.finfo(torch.float32).tiny)
    y = x / scale[..., None]
    if fmt == "fp8":
        return y.to(torch.float8_e4m3fn), scale
    q = y.round().clamp(-QMAX[fmt], QMAX[fmt]).to(torch.int32)
    if fmt == "int8":
        return q.to(torch.int8), scale
    half = x.shape[-1] // 2
    packed = (q[..., :half] + INT4_BIAS) | ((q[..., half:] + INT4_BIAS) << 4)
    return packed.to(torch.uint8), scale


def check_caches(dtype, device, k_cache, v_cache, k_scale, v_scale, device_of="q") -> str:
    """Validate a KV cache pair (SPEC 7): the model dtype, or a format here with float32 scales of
    the cache's shape without D; unit stride in D; K and V (and their scales) strided alike.
    Returns the format."""
    check_tensor("k_cache", k_cache, dtypes=(dtype,) + tuple(FORMATS.values()), ndim=4, device=device,
                 device_of=device_of)
    check_tensor("v_cache", v_cache, dtypes=(k_cache.dtype,), ndim=4, device=device, device_of=device_of)
    check_shape("v_cache", v_cache, k_cache.shape)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_unit_stride_last(name, cache)
    if v_cache.stride() != k_cache.stride():
        raise ValueError(f"v_cache strides {v_cache.stride()} must equal k_cache strides {k_cache.stride()}")
    fmt = format_of(k_cache)
    if fmt == "none":
        for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
            if scale is not None:
                raise ValueError(f"{name} is given but k_cache ({k_cache.dtype}) is not quantized")
        return fmt
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None:
            raise ValueError(f"{name} is required: k_cache is quantized ({fmt}, {k_cache.dtype})")
        check_tensor(name, scale, dtypes=(torch.float32,), ndim=3, device=device, device_of=device_of)
        check_shape(name, scale, k_cache.shape[:-1])
    if v_scale.stride() != k_scale.stride():
        raise ValueError(f"v_scale strides {v_scale.stride()} must equal k_scale strides {k_scale.stride()}")
    return fmt
