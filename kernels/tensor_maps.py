"""TMA tensor maps from cuTensorMapEncodeTiled (cuda-python), for the kernels in kernels/cuda/."""

import torch

from kernels.cuda_build import bindings, check

MAX_BOX = 256  # elements per box dimension
ALIGN = 16  # bytes: global address and every stride


def _data_type(dtype):
    driver, _ = bindings()
    types = driver.CUtensorMapDataType
    if dtype == torch.float16:
        return types.CU_TENSOR_MAP_DATA_TYPE_FLOAT16
    if dtype == torch.bfloat16:
        return types.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
    if dtype.itemsize == 1:  # int8, fp8: moved as bytes
        return types.CU_TENSOR_MAP_DATA_TYPE_UINT8
    raise TypeError(f"no tensor-map data type for {dtype}")


def tiled(tensor, dims, strides, box):
    """A tensor map over tensor's storage. dims, box: element counts, innermost first; strides:
    element strides of dims[1:] (the innermost dimension is contiguous). Out-of-bounds box
    elements load as zeros and are not stored."""
    driver, _ = bindings()
    item = tensor.element_size()
    if tensor.data_ptr() % ALIGN:
        raise ValueError(f"tensor map: address {tensor.data_ptr():#x} is not {ALIGN}-byte aligned")
    if any(s * item % ALIGN for s in strides):
        raise ValueError(f"tensor map: strides {strides} x {item} bytes must be multiples of {ALIGN} bytes")
    if any(not 0 < b <= MAX_BOX for b in box) or box[0] * item % ALIGN:
        raise ValueError(f"tensor map: box {box} must be 1..{MAX_BOX} a side, {ALIGN}-byte rows")
    u32, u64 = driver.cuuint32_t, driver.cuuint64_t
    return check(driver.cuTensorMapEncodeTiled(
        _data_type(tensor.dtype), len(dims), tensor.data_ptr(), [u64(d) for d in dims],
        [u64(s * item) for s in strides], [u32(b) for b in box], [u32(1)] * len(dims),
        driver.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE, driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_NONE,
        driver.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        driver.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE), f"cuTensorMapEncodeTiled(dims={dims}, box={box})")
