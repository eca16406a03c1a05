"""The SDPA anchors' backends: each one that runs the inputs, checked, then timed.

An anchor's launch may carry `timed`: the SDPA call alone, which is what gets timed; launch()
itself adds the layout changes that let the suite's oracle check the result."""

import warnings

from kernels.sdpa_decode import BACKENDS
from suite.timing import measure


def timed_part(launch):
    return getattr(launch, "timed", launch)


def sdpa_backends(make_launch, check, device, rounds, cold=True):
    """{backend: (launch, seconds)} of every SDPA backend that runs make_launch(backend) correctly
    (check(out) before timing; seconds 0.0 without a GPU)."""
    timed = {}
    for backend in BACKENDS:
        launch = make_launch(backend)
        try:
            with warnings.catch_warnings():  # torch warns why a backend declines before it raises
                warnings.simplefilter("ignore", UserWarning)
                out = launch()
        except RuntimeError:  # this backend does not support the inputs (mask, GQA, dtype...)
            continue
        check(out)  # correctness before timing, every backend
        timed[backend] = (launch, measure(timed_part(launch), device=device, rounds=rounds, cold=cold)
                          if device.type == "cuda" else 0.0)
    return timed
