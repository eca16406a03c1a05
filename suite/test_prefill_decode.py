"""The request path (SPEC 2.5): prefill then T decode steps, against the float64 reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels import request_path, tiny_decoder
from suite import reference
from suite.loop_cases import check_outputs

pytestmark = [pytest.mark.prefill, pytest.mark.decode]

INTERPRETER_TILE = (16, 16)  # the interpreter runs every program on the CPU: small tiles
NEEDS = {"baseline": [], "optimized": [pytest.mark.requires_tma] if torch.cuda.is_available() else []}


@pytest.fixture(params=[pytest.param(v, marks=NEEDS[v]) for v in request_path.VARIANTS])
def variant(request):
    return request.param


def _run_case(variant, weights, prompt_lens, steps, device):
    prompts = [torch.randn(n, weights.d_model, dtype=weights.w_qkv.dtype, device=device) for n in prompt_lens]
    tile = None if device.type == "cuda" else INTERPRETER_TILE
    request = request_path.bind(weights, prompts, steps, variant, tile=tile)
    expected = reference.decode_loop(weights, prompts, steps, tiny_decoder.RMS_EPS)
    for _ in range(2):  # a bound request runs again as it ran first: it resets seq_lens itself
        request.out.fill_(float("nan"))  # poisoned: every step must write every element
        out = request()
        assert out is request.out
        check_outputs(out, expected, weights.w_qkv.dtype, steps)


@given(data=st.data())
def test_matches_reference(variant, device, data):
    gpu = device.type == "cuda"
    kv_heads = data.draw(st.sampled_from((1, 2)), label="kv_heads")
    weights = tiny_decoder.random_weights(kv_heads * data.draw(st.sampled_from((1, 2, 4)), label="group"), kv_heads,
                                          data.draw(st.sampled_from((64, 128)), label="head_dim"),
                                          data.draw(st.sampled_from((torch.float16, torch.bfloat16))), device)
    prompt_lens = data.draw(st.lists(st.integers(1, 300 if gpu else 40), min_size=1, max_size=4), label="prompts")
    _run_case(variant, weights, prompt_lens, data.draw(st.integers(1, 8 if gpu else 3), label="steps"), device)


def test_awkward_prompts(variant, device):
    weights = tiny_decoder.random_weights(4, 2, 64, torch.bfloat16, device)
    _run_case(variant, weights, (1, 17, 54), 2, device)


def test_bad_arguments(device):
    weights = tiny_decoder.random_weights(4, 2, 64, torch.bfloat16, device)
    prompts = [torch.randn(5, weights.d_model, dtype=torch.bfloat16, device=device)]
    with pytest.raises(ValueError, match="variant must be one of"):
        request_path.bind(weights, prompts, 2, "fastest")
    with pytest.raises(ValueError, match="prompts: need at least one sequence"):
        request_path.bind(weights, [], 2, "baseline")
    with pytest.raises(ValueError, match=r"prompts\[0\] has shape \(5, 100\)"):
        request_path.bind(weights, [torch.randn(5, 100, dtype=torch.bfloat16, device=device)], 2, "baseline")
