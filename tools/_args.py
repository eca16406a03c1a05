"""Command-line checks the tools share (SPEC 7): argparse types, so a bad value is a usage error
naming its flag, and the CUDA check, made after them so bad arguments are reported on any machine."""

import argparse

from kernels import hw
from kernels.decode_attention import MAX_BATCH


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def shape(text, max_batch=None):
    """'16x4096' -> (16, 4096): BATCHxLENGTH, both >= 1, the batch at most max_batch."""
    try:
        batch, length = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not BATCHxLENGTH, e.g. 16x4096") from None
    if batch < 1 or length < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: batch and length must be >= 1")
    if max_batch is not None and batch > max_batch:
        raise argparse.ArgumentTypeError(f"{text!r}: batch {batch} exceeds the persistent kernels' MAX_BATCH "
                                         f"{max_batch}")
    return batch, length


def decode_shape(text):
    return shape(text, MAX_BATCH)


def require_cuda(parser, what):
    ok, probed = hw.has_cuda()
    if not ok:
        parser.error(f"{what} needs a CUDA device: {probed}")
