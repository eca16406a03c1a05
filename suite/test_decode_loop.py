"""The tiny decoder's decode loop (SPEC 1, 2.2): every variant against the float64 reference."""

import dataclasses
import gc
import re
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels import cuda_build, decode_graphs, decode_loop, kv_quant, tiny_decoder
from kernels.checks import SharedMemoryTooSmall
from suite import reference
from suite.decode_cases import quant_params
from suite.loop_cases import (DTYPE, EPS, TIERS, bind, check_loop, check_outputs, loop_variants, make_loop_inputs,
                              needs_cuda, step_errors)
from suite.views import misaligned, padded_rows

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
    launch = bind(decode, weights, inputs, steps)
    inputs.poison()
    out = launch()
    assert out is inputs.out  # the loop wrote the poisoned buffer it was given
    check_loop(out, weights, inputs, steps, fmt)


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
@pytest.mark.parametrize("group", [8, 16])
def test_wide_query_groups(name, group, device):
    # 8 and 16 query heads per KV head: the native loop's GROUP_MAX 8 and 16 builds (the mma tile's
    # rows 8-15 carry data only past 8 heads), which the drawn groups (at most 4) never reach
    weights = tiny_decoder.random_weights(group, 1, 64, torch.bfloat16, device)
    _run_case((name, LOOP_VARIANTS[name]), weights, (37, 5), 3, device)


@pytest.mark.parametrize("name", _params(["triton_persistent", "cuda_persistent"]))
def test_long_prompts(name, device):
    # Many attention blocks per step and a partial last one, for the persistent kernels.
    lens = (300, 129, 1) if device.type == "cuda" else (90, 1)
    weights = tiny_decoder.random_weights(4, 2, 64, torch.bfloat16, device)
    _run_case((name, LOOP_VARIANTS[name]), weights, lens, 3, device)


def _continued_reference(weights, prompts, pasts, steps):
    """float64 outputs [B, steps, d_model] of `steps` decode steps from each prompt's last output, after
    the positions its cache holds, pasts[b] = (k, v) [Hkv, S_b, D]: a launch from lengths not reset."""
    out = []
    for prompt, (k, v) in zip(prompts, pasts):
        empty = torch.zeros(weights.kv_heads, 0, weights.head_dim, dtype=torch.float64, device=prompt.device)
        x, seq = reference.decoder_layer(weights, prompt, empty, empty, tiny_decoder.RMS_EPS)[0][-1:], []
        for _ in range(steps):
            x, k, v = reference.decoder_layer(weights, x, k, v, tiny_decoder.RMS_EPS)
            seq.append(x[0])
        out.append(torch.stack(seq))
    return torch.stack(out)


@pytest.mark.parametrize("name", _params(["triton_persistent", "cuda_persistent"]))
def test_a_launch_from_lengths_not_reset_skips_the_sequences_that_no_longer_fit(name, device):
    # Capacity 24, 2 steps a launch, launched twice. After the first, sequence 0 holds 23 positions:
    # its 2 more would reach its next head's rows; sequence 2 holds 22 and fills the cache exactly;
    # sequence 1's length is then set to -1 (a bad reset): its append would be sequence 0's last row.
    steps, capacity = 2, 24
    weights = tiny_decoder.random_weights(4, 2, 64, torch.bfloat16, device)
    inputs = make_loop_inputs(weights, [21, 5, 20, 19], steps, device, capacity=capacity)
    launch = bind(LOOP_VARIANTS[name], weights, inputs, steps)
    inputs.poison()
    check_loop(launch(), weights, inputs, steps)
    inputs.seq_lens[1] = -1
    lens = inputs.seq_lens.clone()
    fits = (lens >= 0) & (lens + steps <= capacity)
    assert fits.tolist() == [False, False, True, True]
    before = {key: c.clone() for key, c in inputs.caches.items()}
    inputs.poison()
    inputs.out[~fits] = torch.randn_like(inputs.out[~fits])  # finite: only the kernel's NaN is NaN there
    out = launch()
    assert inputs.seq_lens.tolist() == torch.where(fits, lens + steps, lens).tolist()
    assert out[~fits].isnan().all(), "a sequence that no longer fits has an output that is not NaN"
    positions = torch.arange(capacity, device=device)
    appended = fits[:, None] & (positions >= lens[:, None]) & (positions < (lens + steps)[:, None])  # [B, L]
    for key, cache in inputs.caches.items():
        kept = ~appended[:, None].expand(-1, cache.shape[1], -1)  # [B, Hkv, L]
        assert torch.equal(cache[kept], before[key][kept]), f"{key}: a row no fitting sequence appends changed"
    fitting, held = fits.nonzero().flatten().tolist(), lens.tolist()
    pasts = [(before["k_cache"][b, :, : held[b]].double(), before["v_cache"][b, :, : held[b]].double())
             for b in fitting]
    expected = _continued_reference(weights, [inputs.prompts[b] for b in fitting], pasts, steps)
    check_outputs(out[fits], expected, weights.w_qkv.dtype, steps)


# Run in a child process: on a GPU the failure is a device-side assert, which ends the CUDA context.
_LAUNCH_PAST_THE_CACHE = """
import sys
import torch
from kernels import decode_graphs, tiny_decoder
from suite.loop_cases import bind, loop_variants, make_loop_inputs
name, device = sys.argv[1:]
weights = tiny_decoder.random_weights(4, 2, 64, torch.bfloat16, device)
inputs = make_loop_inputs(weights, [21, 5], 2, device, capacity=24)
launch = bind(loop_variants(decode_graphs.GRAPH_MODES, max_capture=4)[name], weights, inputs, 2)
launch()
print("first launch:", inputs.seq_lens.tolist(), flush=True)
launch()  # from 23 positions of 24: the second step appends at position 24
print("second launch:", inputs.seq_lens.tolist(), flush=True)
"""


@pytest.mark.parametrize("name", _params(["eager", "graphs_full", "graphs_piecewise"]))
def test_a_torch_loop_launched_past_the_cache_fails_loudly(name, device):
    # The eager and graph loops check lengths when bound, not per launch: a launch from lengths not
    # reset raises at the step whose KV append indexes position L_max, before writing it.
    done = subprocess.run([sys.executable, "-c", _LAUNCH_PAST_THE_CACHE, name, device.type], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert "first launch: [23, 7]" in done.stdout, done.stderr[-2000:]
    assert done.returncode != 0 and "second launch" not in done.stdout, "a launch past the cache ran to its end"
    failure = "device-side assert triggered" if device.type == "cuda" else "index 24 is out of bounds"
    assert failure in done.stderr, done.stderr[-2000:]


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


def test_check_fails_on_one_unwritten_step_or_element():
    # Among the medium tier's 64 steps, step 0 of one sequence left zeroed (memory never written),
    # or one element left NaN (the poison): each step is checked on its own, so the right ones
    # around it hide nothing (one error over all 64 steps let the zeroed step pass: 0.031 < 0.125).
    tier = TIERS["medium"]
    w = tiny_decoder.random_weights(tier.q_heads, tier.kv_heads, tier.head_dim, DTYPE, "cpu")
    prompts = [torch.randn(n, w.d_model, dtype=DTYPE) for n in (9, 30)]
    expected = reference.decode_loop(w, prompts, tier.steps, tiny_decoder.RMS_EPS)
    out = expected.to(DTYPE)
    check_outputs(out, expected, DTYPE, tier.steps)  # the reference rounded to bf16 passes
    zeroed, poisoned = out.clone(), out.clone()
    zeroed[1, 0] = 0
    poisoned[0, 40, 7] = float("nan")
    with pytest.raises(AssertionError, match=r"sequence 1 step 0: relative error 1\.00e\+00"):
        check_outputs(zeroed, expected, DTYPE, tier.steps)
    with pytest.raises(AssertionError, match="sequence 0 step 40: relative error nan"):
        check_outputs(poisoned, expected, DTYPE, tier.steps)


def test_check_fails_on_one_wrong_element():
    # One element of the medium tier's last step off by one rms of its step: the step's norm moves by
    # 1/sqrt(d_model) = 0.044 of itself, inside its bound (0.125); the element's own bound is not.
    tier = TIERS["medium"]
    w = tiny_decoder.random_weights(tier.q_heads, tier.kv_heads, tier.head_dim, DTYPE, "cpu")
    prompts = [torch.randn(n, w.d_model, dtype=DTYPE) for n in (9, 30)]
    expected = reference.decode_loop(w, prompts, tier.steps, tiny_decoder.RMS_EPS)
    last = expected[1, -1]
    i = int(last.abs().argmin())
    wrong = expected.to(DTYPE)
    wrong[1, -1, i] += last.pow(2).mean().sqrt().item()
    assert step_errors(wrong, expected)[1, -1] < 2 * EPS[DTYPE] * tier.steps ** 0.5  # the normwise check passes it
    with pytest.raises(AssertionError, match=f"sequence 1 step {tier.steps - 1} element {i}: "):
        check_outputs(wrong, expected, DTYPE, tier.steps)


def test_eager_in_float32_is_the_reference(device):
    # Same math in float32: agreement to float32 rounding proves prefill, KV append, masking and
    # the step-to-step feed are the reference's.
    w = tiny_decoder.random_weights(8, 2, 64, torch.bfloat16, device)
    w = tiny_decoder.Weights(w.w_qkv.float(), w.w_o.float(), w.gamma.float(), 8, 2, 64)
    prompts = [torch.randn(n, w.d_model, device=device) for n in (5, 17, 1)]
    h, k_cache, v_cache, seq_lens = tiny_decoder.prefill(w, prompts, capacity=40)
    out = torch.full((3, 16, w.d_model), float("nan"), device=device)  # poisoned
    tiny_decoder.eager_decode(w, h, k_cache, v_cache, seq_lens, 16, out=out)
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
    with pytest.raises(ValueError, match="prompts: need at least one sequence"):
        tiny_decoder.prefill(w, [], capacity=8)
    with pytest.raises(ValueError, match="capacity 8 is shorter than the longest prompt"):
        tiny_decoder.prefill(w, prompts, capacity=8)
    with pytest.raises(ValueError, match=r"prompts\[0\] has shape"):
        tiny_decoder.prefill(w, [prompts[0][:, :10]], capacity=16)
    h, k_cache, v_cache, seq_lens = tiny_decoder.prefill(w, prompts, capacity=12)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        tiny_decoder.eager_decode(w, h, k_cache, v_cache, seq_lens, 0)
    with pytest.raises(ValueError, match="exceeds the cache capacity 12"):
        tiny_decoder.eager_decode(w, h, k_cache, v_cache, seq_lens, 4)
    with pytest.raises(ValueError, match=r"out has shape \(1, 3, 256\), expected \(1, 2, 256\)"):
        tiny_decoder.eager_decode(w, h, k_cache, v_cache, seq_lens, 2,
                                  out=torch.empty(1, 3, w.d_model, dtype=torch.float16, device=device))
    # decode_step's QuantizedKV, built directly (eager_decode and graph_decode bind one only after
    # check_decode, which refuses scales beside an unquantized cache)
    with pytest.raises(TypeError, match=r"k_cache has dtype torch.float16: QuantizedKV needs one of \("):
        tiny_decoder.QuantizedKV(w, k_cache, v_cache, None, None, seq_lens)


@pytest.mark.requires_cuda
def test_graph_replays_the_same_steps_and_picks_its_mode(device):
    w = tiny_decoder.random_weights(4, 2, 64, torch.bfloat16, device)
    prompts = [torch.randn(n, w.d_model, dtype=torch.bfloat16, device=device) for n in (3, 30)]
    h, k_cache, v_cache, seq_lens = tiny_decoder.prefill(w, prompts, capacity=64)
    start = seq_lens.clone()
    out = torch.empty(2, 8, w.d_model, dtype=torch.bfloat16, device=device)
    launch = decode_graphs.graph_decode(w, h, k_cache, v_cache, seq_lens, 8, mode="full_and_piecewise", max_capture=4,
                                        out=out)
    assert launch.mode == "piecewise"  # 8 steps > max_capture 4
    first = launch().clone()
    seq_lens.copy_(start)
    out.fill_(float("nan"))  # the replay must write every step again
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
        (dict(out=torch.empty(2, 4, w.d_model, device=device)), TypeError, "out has dtype torch.float32"),
        (dict(out=h.new_empty(2, 3, w.d_model)), ValueError, r"out has shape \(2, 3, 256\), expected \(2, 4, 256\)"),
        (dict(out=h.new_empty(2, w.d_model, 4).transpose(1, 2)), ValueError, "out must be contiguous"),
        (dict(out=h.new_empty(2, 4, w.d_model, device="meta")), ValueError, "out is on meta"),
    ]
    for change, error, match in cases:
        args = dict(h=h, k=k, v=v, steps=4) | change
        kw = {name: args[name] for name in ("k_scale", "v_scale", "block_k", "out") if name in args}
        with pytest.raises(error, match=match):
            decode_loop.triton_persistent(w, args["h"], args["k"], args["v"], lens, args["steps"], **kw)


def _offset_weight(name):
    return lambda a: a | dict(w=dataclasses.replace(a["w"], **{name: misaligned(getattr(a["w"], name))}))


LOOP_BAD_INPUTS = {  # what is wrong: (change to valid (weights, h, k, v, seq_lens), error, message)
    "h rows strided": (lambda a: a | dict(h=padded_rows(a["h"])), ValueError,
                       r"h must be contiguous, got strides \(257, 1\)"),
    "w_qkv transposed": (lambda a: a | dict(w=dataclasses.replace(a["w"], w_qkv=a["w"].w_qkv.t().contiguous().t())),
                         ValueError, "weights.w_qkv must be contiguous"),
    "w_o shape": (lambda a: a | dict(w=dataclasses.replace(a["w"], w_o=a["w"].w_o[:, :64])), ValueError,
                  r"weights.w_o has shape \(256, 64\), expected \(256, 256\)"),
    "cache dtype": (lambda a: a | dict(k=a["k"].half(), v=a["v"].half()), TypeError, "k_cache has dtype torch.float16"),
    "int8 cache without scales": (lambda a: a | dict(k=a["k"].to(torch.int8), v=a["v"].to(torch.int8)), ValueError,
                                  "k_scale is required"),
    "seq_lens int64": (lambda a: a | dict(lens=a["lens"].long()), TypeError, "seq_lens has dtype torch.int64"),
    "seq_lens shape": (lambda a: a | dict(lens=a["lens"][:1]), ValueError,
                       r"seq_lens has shape \(1,\), expected \(2,\)"),
    "seq_lens strided": (lambda a: a | dict(lens=a["lens"].repeat_interleave(2)[::2]), ValueError,
                         r"seq_lens must be contiguous in its last dimension, got strides \(2,\)"),
    "seq_lens device": (lambda a: a | dict(lens=a["lens"].to("meta")), ValueError, "seq_lens is on meta"),
    "seq_lens negative": (lambda a: a | dict(lens=a["lens"] - 6), ValueError,
                          r"seq_lens must be >= 0 \(positions the cache holds\), got min -1"),
}


@pytest.mark.parametrize("bad", LOOP_BAD_INPUTS)
def test_every_loop_checks_its_arguments(loop_variant, device, bad):
    # tiny_decoder.check_decode, shared by every loop: refused when bound, before a step runs.
    change, error, match = LOOP_BAD_INPUTS[bad]
    w = tiny_decoder.random_weights(4, 2, 64, torch.bfloat16, device)
    inputs = make_loop_inputs(w, [5, 9], 4, device)
    a = change(dict(w=w, h=inputs.h, k=inputs.caches["k_cache"], v=inputs.caches["v_cache"], lens=inputs.seq_lens))
    with pytest.raises(error, match=match):
        loop_variant[1](a["w"], a["h"], a["k"], a["v"], a["lens"], 2)()


NATIVE_LOOP_BAD_INPUTS = {  # what is wrong: ((q_heads, kv_heads), change to valid inputs, message)
    "group beyond 16": ((32, 1), lambda a: a, "weights: 32 query heads per KV head exceed 16"),
    "w_qkv address": ((4, 2), _offset_weight("w_qkv"), r"weights\.w_qkv must be 16-byte aligned"),
    "w_o address": ((4, 2), _offset_weight("w_o"), r"weights\.w_o must be 16-byte aligned"),
    "gamma address": ((4, 2), _offset_weight("gamma"), r"weights\.gamma must be 16-byte aligned"),
    "k_cache rows 130 bytes apart": ((4, 2), lambda a: a | dict(k=padded_rows(a["k"]), v=padded_rows(a["v"])),
                                     r"k_cache: rows must be 16-byte aligned \(strides \(\d+, \d+, 65, 1\)\)"),
    "v_cache address": ((4, 2), lambda a: a | dict(v=misaligned(a["v"])), "v_cache: rows must be 16-byte aligned"),
}


@pytest.mark.requires_cuda
@pytest.mark.parametrize("bad", NATIVE_LOOP_BAD_INPUTS)
def test_native_loop_checks_its_arguments(device, bad):
    # cuda_decode_loop._check_native: what the native loop needs beyond check_decode (every case passes that)
    heads, change, match = NATIVE_LOOP_BAD_INPUTS[bad]
    w = tiny_decoder.random_weights(*heads, 64, torch.bfloat16, device)
    inputs = make_loop_inputs(w, [5, 9], 4, device)
    a = change(dict(w=w, h=inputs.h, k=inputs.caches["k_cache"], v=inputs.caches["v_cache"], lens=inputs.seq_lens))
    with pytest.raises(ValueError, match=match):
        LOOP_VARIANTS["cuda_persistent"](a["w"], a["h"], a["k"], a["v"], a["lens"], 2)


@pytest.mark.parametrize("variant", ["triton_persistent", "cuda_persistent"])
def test_persistent_loops_refuse_a_float32_model(variant):  # refused before anything runs: no GPU needed
    # a float32 model passes every loop's checks (the eager loop runs it as its reference)
    w = tiny_decoder.random_weights(4, 2, 64, torch.bfloat16, "cpu")
    w = tiny_decoder.Weights(w.w_qkv.float(), w.w_o.float(), w.gamma.float(), 4, 2, 64)
    inputs = make_loop_inputs(w, [5, 9], 4, "cpu")
    with pytest.raises(TypeError, match=r"h has dtype torch.float32; supported: torch.float16, torch.bfloat16"):
        bind(LOOP_VARIANTS[variant], w, inputs, 2)


def test_native_loop_needs_a_cuda_tensor():  # refused before anything runs: no GPU needed
    w = tiny_decoder.random_weights(4, 2, 64, torch.bfloat16, "cpu")
    inputs = make_loop_inputs(w, [5, 9], 4, "cpu")
    with pytest.raises(ValueError, match="h is on cpu: cuda_persistent needs a CUDA tensor"):
        bind(LOOP_VARIANTS["cuda_persistent"], w, inputs, 2)
