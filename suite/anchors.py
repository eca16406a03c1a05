"""What the kernels are measured against besides their own baselines: the SDPA anchors' backends
(each one that runs the inputs, checked, then timed) and the paged-read floor.

An anchor's launch may carry `timed`: the SDPA call alone, which is what gets timed; launch()
itself adds the layout changes that let the suite's oracle check the result."""

import warnings

import torch

from kernels import paged_read
from kernels.sdpa_decode import BACKENDS, sdpa
from suite import reference
from suite.decode_cases import check_output
from suite.timing import measure


# What torch raises when the backend forced on it cannot run the inputs (mask, GQA, dtype...): CUDA's
# "No available kernel. Aborting execution.", the CPU's "No viable backend for
# scaled_dot_product_attention was found." Any other error is a failure, not a decline.
DECLINES = ("No available kernel", "No viable backend")


def declined(error):
    """Whether RuntimeError `error` is SDPA's refusal of a backend for these inputs."""
    return any(message in str(error) for message in DECLINES)


def unless_declined(launch):
    """launch()'s output, or None where torch declines the SDPA backend forced on it for these inputs."""
    try:
        with warnings.catch_warnings():  # torch warns why a backend declines before it raises
            warnings.simplefilter("ignore", UserWarning)
            return launch()
    except RuntimeError as error:
        if not declined(error):
            raise
        return None


def timed_part(launch):
    return getattr(launch, "timed", launch)


def sdpa_backends(make_launch, check, device, rounds, cold=True):
    """{backend: (launch, seconds)} of every SDPA backend that runs make_launch(backend) correctly
    (check(out) before timing; seconds 0.0 without a GPU). A backend that declines the inputs is left
    out; any other error propagates."""
    timed = {}
    for backend in BACKENDS:
        launch = make_launch(backend)
        out = unless_declined(launch)
        if out is None:
            continue
        check(out)  # correctness before timing, every backend
        timed[backend] = (launch, measure(timed_part(launch), device=device, rounds=rounds, cold=cold)
                          if device.type == "cuda" else 0.0)
    return timed


def fastest_decode_sdpa(inputs, device, rounds, **options):
    """(backend, launch, seconds) of the fastest SDPA backend that runs these decode inputs correctly,
    timed as the decode benchmark times its anchor: no out= (SDPA allocates what it returns, and a
    copy into out would be timed too); options go to kernels.sdpa_decode.sdpa."""
    timed = sdpa_backends(lambda backend: sdpa(**inputs, backend=backend, **options),
                          lambda out: check_output(out, inputs), device, rounds)
    backend = min(timed, key=lambda b: timed[b][1])
    return backend, *timed[backend]


def check_partial_sums(partials, inputs):
    """paged_read's [B, Hkv, chunks] sums (one tensor per tiling) against the float64 reference,
    per (sequence, KV head); the reference is computed once for all of them."""
    args = inputs["k_cache"], inputs["v_cache"], inputs["seq_lens"], inputs["block_table"]
    expected = reference.kv_products(*args)
    # fp16/bf16 products are exact in fp32; only the fp32 sums round, far below 1e-6 of sum |k| |v|
    bound = 1e-6 * reference.kv_products(*args, absolute=True)
    for partial in partials:
        error = (partial.double().sum(-1) - expected).abs()
        if not torch.all(error <= bound):  # NaN (a program that wrote nothing) fails too
            b, h = divmod(int(torch.argmax(torch.nan_to_num(error / bound, nan=float("inf")))), error.shape[1])
            raise AssertionError(f"paged_read over {partial.shape[-1]} chunks: sequence {b}, KV head {h} summed "
                                 f"{error[b, h].item():.3g} away from the reference (bound {bound[b, h].item():.3g})")


def paged_read_floor(inputs, device, rounds):
    """Seconds of the fastest bare read of inputs' paged cache (kernels/paged_read.py): every tiling
    of CHUNKS up to one chunk per sequence, each checked (outputs poisoned first), then timed cold
    (0.0 without a GPU). What its page placement lets a paged kernel reach."""
    max_len = int(inputs["seq_lens"].max())
    chunks = [c for c in paged_read.CHUNKS if c < max_len]
    chunks += [c for c in paged_read.CHUNKS if c >= max_len][:1]  # longer ones tile alike: one per sequence
    launches = [paged_read.paged_read(**inputs, chunk=chunk) for chunk in chunks]
    for launch in launches:
        launch().fill_(float("nan"))
    check_partial_sums([launch() for launch in launches], inputs)
    if device.type != "cuda":
        return 0.0
    return min(measure(launch, device=device, rounds=rounds) for launch in launches)
