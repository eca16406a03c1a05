"""The tiny decoder's decode loop (SPEC 1, 2.2): every variant against the float64 reference."""

import gc
import re
import weakref

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels import cuda_build, decode_graphs, decode_loop, kv_quant, tiny_decoder
from kernels.checks import SharedMemoryTooSmall
from suite import reference
from suite.decode_cases import quant_params
from suite.loop_cases import bind, check_loop, loop_variants, make_loop_inputs, needs_cuda

pytestmark = pytest.mark.decode

# max_capture 4: hypothesis draws T on both sides of it, so full_and_piecewise runs both modes.
LOOP_VARIANTS = loop_variants(decode_graphs.GRAPH_MODES, max_capture=4)


def _params(names):
    return [pytest.param(n, marks=[pytest.mark.requires_cuda] if needs_cuda(n) else []) for n in names]


@pytest.fixture(params=_params(sorted(LOOP_VARIANTS)))
def loop_variant(request):
    return request.param, LOOP_VARIANTS[request.param]


def _run_case(loop_variant, weights, prompt_lens, steps, device, fmt="none"):
    _, decode = loop_variant
    inputs = make_loop_inputs(weights, prompt_lens, steps, device, fmt)
    check_loop(bind(decode, weights, inputs, steps)(), weights, inputs, steps, fmt)


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


@pytest.mark.parametrize("name", _params(["triton_persistent", "cuda_persistent"]))
def test_long_prompts(name, device):
    # Many attention blocks per step and a partial last one, for the persistent kernels.
    lens = (300, 129, 1) if device.type == "cuda" else (90, 1)
    weights = tiny_decoder.random_weights(4, 2, 64, torch.bfloat16, device)
    _run_case((name, LOOP_VARIANTS[name]), weights, lens, 3, device)


@pytest.mark.parametrize("fmt", kv_quant.FORMATS)
def test_cuda_persistent_refuses_quantized_caches(fmt, device):  # refused before anything runs: no GPU needed
    weights = tiny_decoder.random_weights(4, 2, 64, torch.bfloat16, device)
    inputs = make_loop_inputs(weights, [20, 7], 2, device, fmt)
    with pytest.raises(ValueError, match="cuda_persistent reads fp16/bf16 caches"):
        bind(LOOP_VARIANTS["cuda_persistent"], weights, inputs, 2)


def test_a_native_block_larger_than_the_gpus_is_refused(monkeypatch):
    # Before anything is launched, naming the bytes: dynamic (the launcher's) and static (the build's).
    monkeypatch.setattr(cuda_build.hw, "shared_memory_per_block", lambda device: 99 * 1024)
    monkeypatch.setattr(cuda_build.Kernel, "static_smem", lambda self: 2048)
    kernel = cuda_build.Kernel(None, "decode_loop.decode_loop_persistent")
    kernel.check_shared(99 * 1024 - 2048, "cuda")
    with pytest.raises(SharedMemoryTooSmall, match=re.escape(f"needs {99 * 1024 + 1} bytes of shared memory per "
                                                             f"block ({99 * 1024 - 2047} dynamic), more than the "
                                                             f"{99 * 1024}")):
        kernel.check_shared(99 * 1024 - 2047, "cuda")


@pytest.mark.requires_cuda
def test_a_native_loop_larger_than_the_gpus_blocks_is_skipped(monkeypatch, device):
    # The native loop keeps two 128-position K/V stages in shared memory: over 128 KB at D128, more
    # than consumer Blackwell's 99 KB blocks hold. There its tests and benchmarks skip, saying so.
    monkeypatch.setattr(cuda_build.hw, "shared_memory_per_block", lambda device: 99 * 1024)
    weights = tiny_decoder.random_weights(4, 2, 128, torch.bfloat16, device)
    inputs = make_loop_inputs(weights, [20, 7], 2, device)
    with pytest.raises(pytest.skip.Exception, match="decode_loop_persistent needs [0-9]+ bytes of shared memory"):
        bind(LOOP_VARIANTS["cuda_persistent"], weights, inputs, 2)


# Quantized caches: one graph variant suffices (the step is eager's; full_and_piecewise with
# max_capture 4 replays both graph modes as T varies), which keeps the GPU run short.
QUANTIZED_LOOPS = ("eager", "graphs_full_and_piecewise", "triton_persistent")


@pytest.fixture(params=_params(QUANTIZED_LOOPS))
def quantized_loop(request):
    return request.param, LOOP_VARIANTS[request.param]


@pytest.mark.parametrize("kv_format", quant_params(kv_quant.FORMATS))
@given(data=st.data())
def test_quantized_cache_matches_reference(quantized_loop, kv_format, device, data):
    kv_heads = data.draw(st.sampled_from((1, 2)), label="kv_heads")
    weights = tiny_decoder.random_weights(2 * kv_heads, kv_heads, data.draw(st.sampled_from((64, 128))),
                                          data.draw(st.sampled_from((torch.float16, torch.bfloat16))), device)
    prompt_lens = data.draw(st.lists(st.integers(1, 40), min_size=1, max_size=3), label="prompt_lens")
    _run_case(quantized_loop, weights, prompt_lens, data.draw(st.integers(1, 6), label="steps"), device, kv_format)


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


@pytest.mark.requires_cuda
def test_a_graph_keeps_every_tensor_it_replays_alive(device, monkeypatch):
    """The graph's kernels use tensors by address, the quantized cache's workspaces (made before
    capture) among them: launch() alone must keep them alive, or a replay writes freed memory."""
    bound = []

    def bind_quantized(*args):
        bound.append(tiny_decoder.bind_quantized(*args))
        return bound[-1]

    monkeypatch.setattr(decode_graphs, "bind_quantized", bind_quantized)
    w = tiny_decoder.random_weights(4, 2, 64, torch.bfloat16, device)
    inputs = make_loop_inputs(w, [5, 17], 3, device, "int8")
    launch = bind(decode_graphs.graph_decode, w, inputs, 3)
    used = [w.w_qkv, w.w_o, w.gamma, *inputs.caches.values(), inputs.seq_lens, bound.pop()]  # h is copied
    alive = [weakref.ref(x) for x in used]
    del w, inputs, used
    gc.collect()
    assert all(ref() is not None for ref in alive), "graph_decode's launch lets what its graph uses be freed"
    launch()
    torch.cuda.synchronize()  # the replay after the caller let go raises no fault


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


def test_persistent_loop_bad_input_names_the_argument(device):
    w = tiny_decoder.random_weights(4, 2, 64, torch.bfloat16, device)
    inputs = make_loop_inputs(w, [5, 9], 4, device)
    h, k, v, lens = inputs.h, inputs.caches["k_cache"], inputs.caches["v_cache"], inputs.seq_lens
    k8, k_scale = kv_quant.quantize(k, "int8")
    v8, v_scale = kv_quant.quantize(v, "int8")
    cases = [
        (dict(h=h.half()), TypeError, "h has dtype"),
        (dict(k=k[:, :1], v=v[:, :1]), ValueError, "k_cache has shape"),
        (dict(v=v8), TypeError, "v_cache has dtype"),
        (dict(k=k8, v=v8), ValueError, "k_scale is required"),
        (dict(k=k8, v=v8, k_scale=k_scale, v_scale=v_scale[..., :-1]), ValueError, "v_scale has shape"),
        (dict(k_scale=k_scale, v_scale=v_scale), ValueError, "is given but k_cache"),
        (dict(steps=0), ValueError, "steps must be >= 1"),
        (dict(steps=40), ValueError, "exceeds the cache capacity"),
        (dict(block_k=48), ValueError, "block_k must be a positive power of two"),
        (dict(block_k=8), ValueError, "block_k 8 must be >= 16"),
    ]
    for change, error, match in cases:
        args = dict(h=h, k=k, v=v, steps=4) | change
        kw = {name: args[name] for name in ("k_scale", "v_scale", "block_k") if name in args}
        with pytest.raises(error, match=match):
            decode_loop.triton_persistent(w, args["h"], args["k"], args["v"], lens, args["steps"], **kw)
