"""Argument checks shared by the public launchers (SPEC 7): each error names the argument."""

import torch

ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 128)


class SharedMemoryTooSmall(ValueError):
    """A launch needs more shared memory per block than this GPU has (consumer Blackwell: 99 KB)."""


def check_tensor(name, t, *, dtypes=None, ndim=None, device=None, device_of="q"):
    # device: the device `t` must be on, that of the argument named device_of
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {', '.join(str(d) for d in dtypes)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (same device as {device_of})")


def check_shape(name, t, expected):
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(expected)}")


def check_unit_stride_last(name, t):
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")


def check_distinct_elements(name, t):
    """Refuse a view whose elements share memory (expanded, or strides that overlap): a kernel writing
    it would overwrite one element's value with another's. Dims by increasing stride: each stride must
    pass the farthest element the smaller ones reach."""
    reach = 0
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride <= reach:
            raise ValueError(f"{name} has elements that share memory (shape {tuple(t.shape)}, strides "
                             f"{t.stride()}): an output needs one place per element")
        reach += stride * (size - 1)


def check_head_dim(name, head_dim, supported=HEAD_DIMS):
    if head_dim not in supported:
        raise ValueError(f"{name}: head dim {head_dim} is not supported; supported: {supported}")


def check_power_of_two(name, value):
    if not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a positive power of two, got {value!r}")


def output(out, shape, dtype, device):
    """A new output tensor when out is None, else the caller's buffer, checked: a contiguous tensor
    of this shape, dtype and device."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    check_tensor("out", out, dtypes=(dtype,))
    check_shape("out", out, shape)
    if out.device != device:
        raise ValueError(f"out is on {out.device}, expected {device}")
    if not out.is_contiguous():
        raise ValueError(f"out must be contiguous, got strides {out.stride()}")
    return out
