"""Narrowing casts inside a Triton kernel round as torch does (to nearest, ties to even), on the GPU and
in the interpreter, whose own bf16 narrowing truncates (suite/interpreter.py: fix_casts)."""

import pytest
import torch
import triton
import triton.language as tl

N = 1024
ONE_ULP_BF16 = 2.0**-7  # at 1.0


@triton.jit
def _narrow(x_ptr, y_ptr, N: tl.constexpr, ROUNDING: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    if ROUNDING == "default":
        y = x.to(y_ptr.dtype.element_ty)
    else:
        y = x.to(y_ptr.dtype.element_ty, fp_downcast_rounding=ROUNDING)
    tl.store(y_ptr + offs, y)


def _values(src, dst, device):
    # random values, then ties (halfway between two bf16 values: to even, up and down), round-ups
    # that carry into the exponent, and the largest finite value both types hold
    x = torch.randn(N, dtype=torch.float64) * 100
    edges = torch.tensor([1 + ONE_ULP_BF16 / 2, 1 + 3 * ONE_ULP_BF16 / 2, -(1 + ONE_ULP_BF16 / 2),
                          2 - ONE_ULP_BF16 / 4, min(torch.finfo(src).max, torch.finfo(dst).max)], dtype=torch.float64)
    x[: edges.numel()] = edges
    return x.to(src).to(device)


def _narrowed(x, out_dtype, rounding):
    y = torch.full((N,), float("nan"), dtype=out_dtype, device=x.device)  # poisoned
    _narrow[(1,)](x, y, N, rounding)
    return y


@pytest.mark.parametrize("src, dst", [(torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16),
                                      (torch.float32, torch.float16)], ids=["fp32-bf16", "fp16-bf16", "fp32-fp16"])
def test_narrowing_rounds_to_nearest_even(device, src, dst):
    x = _values(src, dst, device)
    # a rounding mode is only accepted where the bits narrow (fp16 -> bf16 is a conversion, not that)
    for rounding in ("default", "rtne") if src.itemsize > dst.itemsize else ("default",):
        y = _narrowed(x, dst, rounding)
        expected = x.to(dst)  # torch rounds to nearest, ties to even
        assert torch.equal(y.view(torch.int16), expected.view(torch.int16)), (
            f"{rounding}: {(y.view(torch.int16) != expected.view(torch.int16)).sum().item()} of {N} differ")


def test_narrowing_toward_zero_truncates(device):
    x = _values(torch.float32, torch.bfloat16, device)
    y = _narrowed(x, torch.bfloat16, "rtz")
    truncated = (x.view(torch.int32) >> 16).to(torch.int16)  # bf16 is fp32's upper 16 bits
    assert torch.equal(y.view(torch.int16), truncated)
    assert not torch.equal(truncated, x.to(torch.bfloat16).view(torch.int16))  # the values tell them apart
