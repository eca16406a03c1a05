"""The SDPA anchors' backends (suite/anchors.py): a backend torch declines is left out, any other
error propagates, and every backend that runs holds the decode and prefill checks on planted keys."""

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels.prefill_attention import VARIANTS as PREFILL_VARIANTS
from kernels.sdpa_decode import BACKENDS, sdpa
from suite import decode_cases, prefill_cases
from suite.anchors import declined, sdpa_backends, unless_declined
from suite.decode_cases import DecodeCase, seeded_lengths
from suite.prefill_cases import PrefillCase

pytestmark = [pytest.mark.decode, pytest.mark.prefill]  # the anchors of both

CPU = torch.device("cpu")  # the backends' choice alone: nothing timed
DECLINING = {"cudnn": "No available kernel. Aborting execution.",
            "efficient": "No viable backend for scaled_dot_product_attention was found."}


def _launches(raising):
    # make_launch for sdpa_backends: backend b's launch raises raising[b], the others return a tensor
    def make_launch(backend):
        def launch():
            if backend in raising:
                raise RuntimeError(raising[backend])
            return torch.ones(2)
        return launch
    return make_launch


def test_a_declining_backend_is_left_out():
    checked = []
    timed = sdpa_backends(_launches(DECLINING), checked.append, CPU, rounds=1)
    assert sorted(timed) == sorted(set(BACKENDS) - set(DECLINING))
    assert len(checked) == len(timed)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_an_error_other_than_a_decline_propagates(backend):
    error = "CUDA error: an illegal memory access was encountered"
    with pytest.raises(RuntimeError, match="illegal memory access"):
        sdpa_backends(_launches({**DECLINING, backend: error}), lambda out: None, CPU, rounds=1)


def test_torch_declines_as_the_anchors_expect(device):
    # the installed torch's own message: flash takes fp16/bf16 only on CUDA; the CPU has no cuDNN
    backend = SDPBackend.FLASH_ATTENTION if device.type == "cuda" else SDPBackend.CUDNN_ATTENTION
    q = torch.randn(1, 2, 1, 64, device=device)  # float32
    with sdpa_kernel([backend]), warnings.catch_warnings(), pytest.raises(RuntimeError) as raised:
        warnings.simplefilter("ignore", UserWarning)  # torch's reasons, before it raises
        F.scaled_dot_product_attention(q, q, q)
    assert declined(raised.value), raised.value


def _planted_decode(device):
    # on a GPU the benchmarks' longest sequences and both dtypes; in the interpreter's CPU, small ones
    if device.type == "cuda":
        shapes = [(16, 16384, 32, 8, 128), (64, 4096, 32, 8, 64)]
    else:
        shapes = [(2, 200, 4, 2, 64)]
    for b, n, hq, hkv, d in shapes:
        for variable, dtype in itertools.product((False, True), (torch.bfloat16, torch.float16)):
            case = DecodeCase(seeded_lengths(b, n, variable, seed=n), hq, hkv, d, dtype, "contiguous", 1)
            inputs = decode_cases.make_inputs(case, device)
            decode_cases.plant_block_edges(inputs, case)
            yield (lambda backend, inputs=inputs: sdpa(**inputs, backend=backend)), inputs, decode_cases.check_output


def _planted_prefill(device):
    # on a GPU the benchmarks' longest prompts, alone and four of variable length, their heads, both
    # dtypes; in the interpreter's CPU, small ones
    if device.type == "cuda":
        lens, heads = [(16384,), seeded_lengths(4, 8192, True, seed=4 * 8192)], (32, 8, 128)
    else:
        lens, heads = [(300, 77)], (4, 2, 64)
    for n, dtype in itertools.product(lens, (torch.bfloat16, torch.float16)):
        case = PrefillCase(n, *heads, dtype)
        inputs = prefill_cases.make_inputs(case, device)
        prefill_cases.plant_block_edges(inputs, case)
        yield ((lambda backend, inputs=inputs: PREFILL_VARIANTS["sdpa"](**inputs, backend=backend,
                                                                        out=decode_cases.poisoned_out(inputs))),
               inputs, prefill_cases.check_output)


@pytest.mark.parametrize("planted", [pytest.param(_planted_decode, id="decode"),
                                     pytest.param(_planted_prefill, id="prefill")])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_every_sdpa_backend_holds_the_check_on_planted_keys(backend, planted, device):
    # The benchmarks check every backend on planted inputs before timing it. Planted scores are ~10,
    # which bf16 holds to 1/256 of themselves: the math backend computes scores in float32 unless
    # torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp is set (the suite never sets it).
    ran = 0
    for make_launch, inputs, check in planted(device):
        out = unless_declined(make_launch(backend))
        if out is not None:
            check(out, inputs)
            ran += 1
    if not ran:
        pytest.skip(f"SDPA's {backend} backend declines every case on {device.type}")
