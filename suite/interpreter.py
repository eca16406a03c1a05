"""Running the Triton kernels on the CPU: TRITON_INTERPRET=1 and the interpreter's known defects."""

import os

import numpy

INTERPRET_ENV = "TRITON_INTERPRET"


def enable_if_no_gpu(cuda_available: bool) -> bool:
    """Turn the interpreter on (before any kernel module is imported) when no GPU is visible."""
    if not cuda_available:
        os.environ[INTERPRET_ENV] = "1"
    return os.environ.get(INTERPRET_ENV, "0") == "1"


def check_numpy():
    # Triton 3.6's interpreter breaks with numpy >= 2.4: a loop bound read with tl.load or
    # tl.program_id raises "only 0-dimensional arrays can be converted to Python scalars".
    major, minor = (int(p) for p in numpy.__version__.split(".")[:2])
    if (major, minor) >= (2, 4):
        raise RuntimeError(f"TRITON_INTERPRET=1 needs numpy<2.4 (found {numpy.__version__}): "
                           "install the project's 'interpret' extra")


def fix_casts():
    """Work around Triton 3.6 interpreter defects, so the kernel code is the same on CPU and GPU:
    - bf16 is kept as raw uint16 bits and forgotten in two places: tl.dot multiplies bf16
      operands as integers, and casts between bf16 and integer types convert the bits. Both now
      go through fp32 (exact).
    - Narrowing to fp8-e4m3 drops the carry when rounding up overflows the mantissa (31.7 -> 16)
      and rounds half up; the GPU rounds to nearest even. torch's conversion does that.
    - Narrowing to bf16 truncates (the default rounding, to nearest even on the GPU, reaches the
      interpreter as none); torch's conversion rounds as the GPU does. Truncation doubled every bf16
      rounding's error on the CPU: the request path's decode steps (triton_persistent's loop)
      measured 1.0-1.6 x 2^-7 relative error where eager torch measured 0.5.
    """
    import torch
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    create_dot = InterpreterBuilder.create_dot
    cast_impl = InterpreterBuilder.cast_impl
    create_fp_to_fp = InterpreterBuilder.create_fp_to_fp

    def rounded_to_bf16(src):  # src: fp32
        data = torch.from_numpy(numpy.ascontiguousarray(src.data, dtype=numpy.float32)).to(torch.bfloat16)
        return TensorHandle(data.view(torch.int16).numpy().view(numpy.uint16), tl.bfloat16)

    def fp_to_fp(self, src, dst_type, rounding_mode):
        if dst_type.scalar != tl.float8e4nv or src.dtype.scalar not in (tl.float32, tl.float16):
            return create_fp_to_fp(self, src, dst_type, rounding_mode)
        data = torch.from_numpy(src.data.astype(numpy.float32)).to(torch.float8_e4m3fn)
        return TensorHandle(data.view(torch.uint8).numpy(), dst_type.scalar)

    def widened_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = (self.cast_impl(x, tl.float32) if x.dtype.scalar == tl.bfloat16 else x for x in (a, b))
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def cast_through_fp32(self, src, dst_type):
        ends = (src.dtype.scalar, dst_type.scalar)
        if tl.bfloat16 not in ends or ends[0] == ends[1]:
            return cast_impl(self, src, dst_type)
        if tl.float32 not in ends:
            src = cast_through_fp32(self, src, tl.float32)
        return rounded_to_bf16(src) if ends[1] == tl.bfloat16 else cast_impl(self, src, dst_type)

    InterpreterBuilder.create_dot = widened_dot
    InterpreterBuilder.cast_impl = cast_through_fp32
    InterpreterBuilder.create_fp_to_fp = fp_to_fp
