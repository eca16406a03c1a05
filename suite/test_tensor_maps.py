"""TMA tensor maps (kernels/tensor_maps.py): what cuTensorMapEncodeTiled would reject is refused
first, naming the problem (no GPU needed: the checks run before the driver call)."""

import pytest
import torch

from kernels import tensor_maps


@pytest.mark.parametrize("dims, strides, box, message", [
    ((64, 10), (68,), (64, 8), "strides"),  # 68 x 2 bytes is not a multiple of 16
    ((64, 10), (64,), (64, 300), "box"),  # a side beyond 256
    ((4, 10), (64,), (4, 8), "box"),  # 4 x 2 bytes: a box row under 16 bytes
])
def test_refuses_what_tma_cannot_encode(dims, strides, box, message):
    t = torch.zeros(10, 72, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=message):
        tensor_maps.tiled(t, dims, strides, box)


def test_refuses_a_misaligned_address():
    t = torch.zeros(1000, dtype=torch.bfloat16)[1:]  # 2 bytes past an aligned start
    with pytest.raises(ValueError, match="not 16-byte aligned"):
        tensor_maps.tiled(t, (64, 10), (64,), (64, 8))


def test_refuses_a_dtype_it_has_no_tensor_map_type_for():
    t = torch.zeros(10, 72, dtype=torch.float32)  # address, strides and box fit: only the dtype is wrong
    with pytest.raises(TypeError, match="no tensor-map data type for torch.float32"):
        tensor_maps.tiled(t, (64, 10), (72,), (64, 8))
