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


def fix_bf16_dot():
    """Triton 3.6's interpreter multiplies bf16 operands of tl.dot as their raw uint16 bits.

    Widen bf16 operands to fp32 first (exact), so the kernel code is the same on CPU and GPU.
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder

    create_dot = InterpreterBuilder.create_dot

    def widened_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = (self.cast_impl(x, tl.float32) if x.dtype.scalar == tl.bfloat16 else x for x in (a, b))
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    InterpreterBuilder.create_dot = widened_dot
