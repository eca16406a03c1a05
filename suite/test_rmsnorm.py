"""The fused RMSNorm against the float64 reference, and bad input."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels.rmsnorm import rmsnorm
from kernels.tiny_decoder import RMS_EPS
from suite import reference

TOLERANCE_F32 = 1e-5  # fp32 output: summation order only
# fp16/bf16 output: the fp32 result rounded once, one ulp relative (in the Triton interpreter, 150
# random cases came to 0.50 of it in fp16 and in bf16); absolutely, fp16's subnormal spacing
HALF_ATOL = 2.0**-24


@given(rows=st.integers(1, 37), cols=st.sampled_from((1, 54, 97, 256, 1000)),
       dtype=st.sampled_from((torch.float16, torch.bfloat16, torch.float32)), strided=st.booleans())
def test_matches_reference(device, rows, cols, dtype, strided):
    x = torch.randn(rows, 2 * cols if strided else cols, dtype=dtype, device=device)[:, :cols]
    assert x.stride(0) == (2 if strided else 1) * cols  # strided rows really are
    gamma = torch.randn(cols, dtype=dtype, device=device)
    out = torch.full_like(x, float("nan"))  # poisoned
    rmsnorm(x, gamma, out=out)
    atol, rtol = (TOLERANCE_F32,) * 2 if dtype == torch.float32 else (HALF_ATOL, torch.finfo(dtype).eps)
    torch.testing.assert_close(out.double(), reference.rmsnorm(x, gamma, RMS_EPS), atol=atol, rtol=rtol)


@pytest.mark.parametrize("make, error, match", [
    (lambda d: (torch.randn(4, 8, device=d).t(), torch.randn(4, device=d)), ValueError, "x must have contiguous rows"),
    (lambda d: (torch.randn(4, 8, device=d), torch.randn(7, device=d)), ValueError, "gamma has shape"),
    (lambda d: (torch.randn(4, 8, device=d).int(), torch.randn(8, device=d)), TypeError, "x has dtype"),
    (lambda d: (torch.randn(4, 8, device=d), torch.randn(8, device=d).long()), TypeError,
     "gamma has dtype torch.int64"),
    (lambda d: (torch.randn(4, 8, device=d), torch.randn(16, device=d)[::2]), ValueError,
     r"gamma must be contiguous in its last dimension, got strides \(2,\)"),
    (lambda d: (torch.randn(4, 8, device=d), torch.randn(8, device="meta")), ValueError,
     r"gamma is on meta, expected .* \(same device as x\)"),
    (lambda d: (torch.randn(8, device=d), torch.randn(8, device=d)), ValueError, "x must have 2 dimensions"),
    (lambda d: (torch.randn(4, 0, device=d), torch.randn(0, device=d)), ValueError,
     r"x: d_model 0 outside \[1, 16384\]"),
    (lambda d: (torch.randn(2, 16385, device=d), torch.randn(16385, device=d)), ValueError,
     r"x: d_model 16385 outside \[1, 16384\]"),
    (lambda d: (torch.randn(4, 8, device=d), torch.randn(8, device=d), torch.randn(8, 4, device=d).t()), ValueError,
     r"out must have contiguous rows, got strides \(1, 4\)"),
])
def test_bad_input_names_the_argument(device, make, error, match):
    x, gamma, *out = make(device)  # and out, where given
    with pytest.raises(error, match=match):
        rmsnorm(x, gamma, out=out[0] if out else None)
