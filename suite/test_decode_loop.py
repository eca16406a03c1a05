"""The tiny decoder's decode loop (SPEC 1, 2.2): every variant against the float64 reference."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels import decode_graphs, decode_loop, kv_quant, tiny_decoder
from suite import reference

pytestmark = pytest.mark.decode

LOOP_VARIANTS = {"eager": tiny_decoder.eager_decode,
                 "triton_persistent": lambda *args, **kw: decode_loop.triton_persistent(*args, **kw)()}
for _mode in decode_graphs.GRAPH_MODES:
    LOOP_VARIANTS[f"graphs_{_mode}"] = (lambda mode: lambda *args: decode_graphs.graph_decode(
        *args, mode=mode, max_capture=4)())(_mode)
NEEDS_CUDA = {name for name in LOOP_VARIANTS if name.startswith("graphs")}
# Every step rounds the residual stream h to the model dtype (unit roundoff u = 2^-11 fp16,
# 2^-8 bf16), so the error is a random walk of T roundings: relative to |h|, about u * sqrt(T).
# Measured: 0.9 * 2^-10 (fp16) and 1.4 * 2^-7 (bf16) after 16 steps; the bound leaves 2-4x room.
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@pytest.fixture(params=[pytest.param(name, marks=[pytest.mark.requires_cuda] if name in NEEDS_CUDA else [])
                        for name in sorted(LOOP_VARIANTS)])
def loop_variant(request):
    return request.param, LOOP_VARIANTS[request.param]


def _prefill(weights, prompt_lens, steps, device):
    dtype = weights.w_qkv.dtype
    prompts = [torch.randn(n, weights.d_model, dtype=dtype, device=device) for n in prompt_lens]
    return prompts, tiny_decoder.prefill(weights, prompts, capacity=max(prompt_lens) + steps)


def _check_outputs(out, expected, dtype, steps):
    assert out.shape == expected.shape and torch.isfinite(out).all()
    for b in range(out.shape[0]):  # normwise, per sequence
        error = torch.linalg.norm(out[b].double() - expected[b]) / torch.linalg.norm(expected[b])
        assert error <= 2 * EPS[dtype] * math.sqrt(steps), f"sequence {b}: relative error {error:.2e}"


def _run_case(loop_variant, weights, prompt_lens, steps, device):
    _, decode = loop_variant
    prompts, (h, k_cache, v_cache, seq_lens) = _prefill(weights, prompt_lens, steps, device)
    out = decode(weights, h, k_cache, v_cache, seq_lens, steps)
    assert seq_lens.tolist() == [n + steps for n in prompt_lens]
    _check_outputs(out, reference.decode_loop(weights, prompts, steps, tiny_decoder.RMS_EPS), weights.w_qkv.dtype,
                   steps)


def _run_quantized_case(loop_variant, weights, prompt_lens, steps, device, fmt):
    """Two tight checks: (1) outputs against the reference attending the cache exactly as the
    kernel stored it; (2) every stored value against the reference's own k, v: within the grid's
    rounding (half a step) plus the model dtype's rounding of the inputs, for prompt and new tokens."""
    _, decode = loop_variant
    dtype = weights.w_qkv.dtype
    prompts, (h, k_cache, v_cache, seq_lens) = _prefill(weights, prompt_lens, steps, device)
    (k_cache, k_scale), (v_cache, v_scale) = kv_quant.quantize(k_cache, fmt), kv_quant.quantize(v_cache, fmt)
    out = decode(weights, h, k_cache, v_cache, seq_lens, steps, k_scale=k_scale, v_scale=v_scale)
    assert seq_lens.tolist() == [n + steps for n in prompt_lens]
    stored = [(reference.dequantize_kv(k_cache[b], k_scale[b]), reference.dequantize_kv(v_cache[b], v_scale[b]))
              for b in range(len(prompts))]
    expected, computed = reference.decode_loop_with_cache(weights, prompts, steps, tiny_decoder.RMS_EPS, stored)
    _check_outputs(out, expected, dtype, steps)
    for b, n in enumerate(prompt_lens):
        for name, cache, scale, exact in (("k", *stored[b][:1], k_scale[b], computed[b][0]),
                                          ("v", *stored[b][1:], v_scale[b], computed[b][1])):
            values, scale = cache[:, : n + steps], scale[:, : n + steps, None].double()
            grid = scale * 2.0**-9 + exact.abs() * 2.0**-4 if fmt == "fp8" else scale / 2
            # The kernel quantizes k, v computed from dtype-rounded inputs: a few units of EPS[dtype]
            # of the row's largest value move an element, across a rounding boundary at worst.
            slack = 8 * EPS[dtype] * math.sqrt(steps) * exact.abs().amax(-1, keepdim=True)
            excess = ((values - exact).abs() - grid - slack).max().item()
            assert excess <= 0, f"sequence {b}: a stored {name} is off its grid by {excess:.2e}"


def _limits(device):
    # The interpreter runs the persistent kernel's every tile on the CPU: keep its models small.
    if device.type == "cuda":
        return dict(groups=(1, 2, 4), max_prompt=70, max_steps=12)
    return dict(groups=(1, 2), max_prompt=40, max_steps=6)


@given(data=st.data())
def test_matches_reference(loop_variant, device, data):
    limits = _limits(device)
    kv_heads = data.draw(st.sampled_from((1, 2)), label="kv_heads")
    weights = tiny_decoder.random_weights(kv_heads * data.draw(st.sampled_from(limits["groups"]), label="group"),
                                          kv_heads, data.draw(st.sampled_from((64, 128)), label="head_dim"),
                                          data.draw(st.sampled_from((torch.float16, torch.bfloat16))), device)
    prompt_lens = data.draw(st.lists(st.integers(1, limits["max_prompt"]), min_size=1, max_size=4),
                            label="prompt_lens")
    _run_case(loop_variant, weights, prompt_lens, data.draw(st.integers(1, limits["max_steps"]), label="steps"),
              device)


@pytest.mark.parametrize("kv_format", tuple(kv_quant.FORMATS))
@given(data=st.data())
def test_quantized_cache_matches_reference(kv_format, device, data):
    kv_heads = data.draw(st.sampled_from((1, 2)), label="kv_heads")
    weights = tiny_decoder.random_weights(2 * kv_heads, kv_heads, data.draw(st.sampled_from((64, 128))),
                                          data.draw(st.sampled_from((torch.float16, torch.bfloat16))), device)
    prompt_lens = data.draw(st.lists(st.integers(1, 40), min_size=1, max_size=3), label="prompt_lens")
    loop = ("triton_persistent", LOOP_VARIANTS["triton_persistent"])
    _run_quantized_case(loop, weights, prompt_lens, data.draw(st.integers(1, 6), label="steps"), device, kv_format)


def test_eager_in_float32_is_the_reference(device):
    # Same math in float32: agreement to float32 rounding proves prefill, KV append, masking and
    # the step-to-step feed are the reference's.
    w = tiny_decoder.random_weights(8, 2, 64, torch.bfloat16, device)
    w = tiny_decoder.Weights(w.w_qkv.float(), w.w_o.float(), w.gamma.float(), 8, 2, 64)
    prompts = [torch.randn(n, w.d_model, device=device) for n in (5, 17, 1)]
    h, k_cache, v_cache, seq_lens = tiny_decoder.prefill(w, prompts, capacity=40)
    out = tiny_decoder.eager_decode(w, h, k_cache, v_cache, seq_lens, 16)
    expected = reference.decode_loop(w, prompts, 16, tiny_decoder.RMS_EPS)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("bad, error, match", [
    (dict(head_dim=96), ValueError, "head_dim 96"),
    (dict(q_heads=6, kv_heads=4), ValueError, "not a multiple"),
    (dict(dtype=torch.float32), TypeError, "dtype torch.float32"),
])
def test_bad_weights(device, bad, error, match):
    args = dict(q_heads=4, kv_heads=2, head_dim=64, dtype=torch.float16) | bad
    with pytest.raises(error, match=match):
        tiny_decoder.random_weights(**args, device=device)


def test_bad_prefill_and_decode_arguments(device):
    w = tiny_decoder.random_weights(4, 2, 64, torch.float16, device)
    prompts = [torch.randn(9, w.d_model, dtype=torch.float16, device=device)]
    with pytest.raises(ValueError, match="capacity 8 is shorter than the longest prompt"):
        tiny_decoder.prefill(w, prompts, capacity=8)
    with pytest.raises(ValueError, match=r"prompts\[0\] has shape"):
        tiny_decoder.prefill(w, [prompts[0][:, :10]], capacity=16)
    h, k_cache, v_cache, seq_lens = tiny_decoder.prefill(w, prompts, capacity=12)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        tiny_decoder.eager_decode(w, h, k_cache, v_cache, seq_lens, 0)
    with pytest.raises(ValueError, match="exceeds the cache capacity 12"):
        tiny_decoder.eager_decode(w, h, k_cache, v_cache, seq_lens, 4)


@pytest.mark.requires_cuda
def test_graph_replays_the_same_steps_and_picks_its_mode(device):
    w = tiny_decoder.random_weights(4, 2, 64, torch.bfloat16, device)
    prompts = [torch.randn(n, w.d_model, dtype=torch.bfloat16, device=device) for n in (3, 30)]
    h, k_cache, v_cache, seq_lens = tiny_decoder.prefill(w, prompts, capacity=64)
    start = seq_lens.clone()
    launch = decode_graphs.graph_decode(w, h, k_cache, v_cache, seq_lens, 8, mode="full_and_piecewise", max_capture=4)
    assert launch.mode == "piecewise"  # 8 steps > max_capture 4
    first = launch().clone()
    seq_lens.copy_(start)
    torch.testing.assert_close(launch(), first, atol=0, rtol=0)
    assert decode_graphs.graph_decode(w, h, k_cache, v_cache, seq_lens.copy_(start), 4,
                                      mode="full_and_piecewise", max_capture=4).mode == "full"


def test_graph_decode_bad_arguments(device):
    w = tiny_decoder.random_weights(4, 2, 64, torch.float16, device)
    h, k_cache, v_cache, seq_lens = tiny_decoder.prefill(
        w, [torch.randn(3, w.d_model, dtype=torch.float16, device=device)], capacity=8)
    if device.type != "cuda":
        with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
            decode_graphs.graph_decode(w, h, k_cache, v_cache, seq_lens, 2)
        return
    with pytest.raises(ValueError, match="mode must be one of"):
        decode_graphs.graph_decode(w, h, k_cache, v_cache, seq_lens, 2, mode="half")
    with pytest.raises(ValueError, match="max_capture must be >= 1"):
        decode_graphs.graph_decode(w, h, k_cache, v_cache, seq_lens, 2, max_capture=0)
