"""Right-sized decode (SPEC 2.7): the decode loop and decode attention per tier x KV format.

Loop: TPOT per backend (triton: the persistent decode-loop kernel; graphs: the CUDA-graph loop
with triton_split_kv's fused dequantization; cuda: the native persistent loop, bf16 caches), with
the speedup vs the same backend on the bf16 cache. Attention: triton_persistent alone at the
tier's shape, GB/s counting the bytes really moved. Both check correctness first (against the
reference on the cache as stored; attention also on keys planted at block edges, as timed), the bf16
baseline too when measured on demand, and record the accuracy quantization costs vs unquantized.
"""

import pytest

from kernels import decode_loop, kv_quant, tiny_decoder
from suite import reference
from suite.decode_cases import (VARIANTS, DecodeCase, checked, make_case_tensors, make_inputs, plant_block_edges,
                                poisoned_out, quant_params, quantization_loss)
from suite.loop_cases import (DTYPE, bind, check_loop, loop_seconds, loop_variants, make_loop_inputs, relative_errors,
                              steps_of, tiers, time_loop)
from suite.timing import measure, run_benchmark

pytestmark = pytest.mark.decode

WORKLOAD = "right_sized_decode"
BACKENDS = ("triton", "graphs", "cuda")
# The native loop (cuda_persistent) reads fp16/bf16 caches only: backend cuda has no quantized items.
CUDA_FORMATS = ("none",)


def pytest_generate_tests(metafunc):
    config = metafunc.config
    chosen = config.getoption("quantization")
    formats = quant_params([f for f in kv_quant.QUANTIZATIONS if chosen in ("all", f)])
    tier_names = list(tiers(config))
    if "backend" in metafunc.fixturenames:  # the loop: format x tier x backend
        backends = [b for b in BACKENDS if config.getoption("backend") in ("all", b)]
        metafunc.parametrize("fmt, tier_name, backend", [
            pytest.param(f.values[0], t, b, id=f"{f.id}-{t}-{b}",
                         marks=[*f.marks, *([pytest.mark.requires_cuda] if b != "triton" else [])])
            for f in formats for t in tier_names for b in backends if b != "cuda" or f.values[0] in CUDA_FORMATS])
    elif "fmt" in metafunc.fixturenames:
        metafunc.parametrize("fmt", formats)
        metafunc.parametrize("tier_name", tier_names)


def _decoder(backend, config):
    # triton, cuda: the persistent loops; graphs: full_and_piecewise (fused dequant through QuantizedKV)
    block_k = config.getoption("block_k") or decode_loop.BLOCK_N
    variants = loop_variants(("full_and_piecewise",), config.getoption("max_capture"), block_k)
    return variants[{"triton": "triton_persistent", "graphs": "graphs_full_and_piecewise",
                     "cuda": "cuda_persistent"}[backend]]


def _vs_bf16(perf, device, key, fmt, seconds, bf16_seconds):
    """{"bf16": seconds} of the same benchmark on the bf16 cache (recorded by its fmt none run,
    or measured now), for the speedup_vs_bf16 gate; none for the bf16 run itself or without a GPU."""
    if device.type != "cuda":
        return {}
    if fmt == "none":
        perf.set_baseline(WORKLOAD, key, seconds)
        return {}
    return {"bf16": perf.baseline(WORKLOAD, key, bf16_seconds)}


def test_right_sized_decode_loop(benchmark, tier_name, fmt, backend, device, perf, rounds, pytestconfig):
    tier = tiers(pytestconfig)[tier_name]
    steps = steps_of(tier, pytestconfig)
    gate_id = f"{WORKLOAD}/loop-{backend}-{fmt}/{tier_name}"
    perf.skip_if_not_applicable(gate_id)
    weights = tiny_decoder.random_weights(tier.q_heads, tier.kv_heads, tier.head_dim, DTYPE, device)
    inputs = make_loop_inputs(weights, tier.prompt_lens(), steps, device, fmt)
    decode = _decoder(backend, pytestconfig)
    launch = bind(decode, weights, inputs, steps)
    inputs.poison()
    out = launch()
    expected = check_loop(out, weights, inputs, steps, fmt)
    if fmt != "none":  # what quantization costs: the outputs vs the unquantized reference
        unquantized = reference.decode_loop(weights, inputs.prompts, steps, tiny_decoder.RMS_EPS)
        benchmark.extra_info["accuracy_loss_rel"] = max(relative_errors(out, unquantized))
        benchmark.extra_info["reference_error_rel"] = max(relative_errors(out, expected))
    seconds = time_loop(benchmark, launch, inputs, steps, device, rounds, perf)
    speedups = _vs_bf16(perf, device, f"loop-{backend}/{tier_name}", fmt, seconds,
                        lambda: loop_seconds(decode, weights, tier, steps, device, rounds))
    perf.record(benchmark, gate_id, seconds, shape=dict(tier.__dict__, tier=tier_name, quantization=fmt,
                                                         backend=backend, steps=steps),
                speedups=speedups, rate=f"TPOT {1e3 * seconds / steps:.3f} ms")


def test_right_sized_decode_attention(benchmark, tier_name, fmt, device, perf, rounds, pytestconfig):
    tier = tiers(pytestconfig)[tier_name]
    gate_id = f"{WORKLOAD}/attention-{fmt}/{tier_name}"
    perf.skip_if_not_applicable(gate_id)
    # The attention of the loop's middle step: each sequence's prompt plus half the steps.
    lengths = tuple(n + steps_of(tier, pytestconfig) // 2 for n in tier.prompt_lens())
    case = DecodeCase(lengths, tier.q_heads, tier.kv_heads, tier.head_dim, DTYPE, "contiguous", quant=fmt)
    knobs = dict(block_k=pytestconfig.getoption("block_k"), num_programs=pytestconfig.getoption("num_programs"))
    inputs, exact = make_case_tensors(case, device)
    out = poisoned_out(inputs)
    # tight: against the reference on the dequantized cache
    launch = checked(VARIANTS["triton_persistent"](**inputs, **knobs, out=out), inputs)
    if fmt != "none":
        benchmark.extra_info["accuracy_loss_max_abs"] = quantization_loss(out, inputs, exact)
    # the loss over random keys, as recorded before; then the check that sees one dropped row, on the
    # inputs timed (each planted key quantized with its row's scale)
    plant_block_edges(inputs, case)
    out.fill_(float("nan"))
    checked(launch, inputs)
    seconds = run_benchmark(benchmark, launch, device=device, rounds=rounds)

    def bf16_seconds():
        plain_case = DecodeCase(lengths, tier.q_heads, tier.kv_heads, tier.head_dim, DTYPE, "contiguous")
        plain = make_inputs(plain_case, device)
        plant_block_edges(plain, plain_case)
        return measure(checked(VARIANTS["triton_persistent"](**plain, **knobs, out=poisoned_out(plain)), plain),
                       device=device, rounds=rounds)

    speedups = _vs_bf16(perf, device, f"attention/{tier_name}", fmt, seconds, bf16_seconds)
    perf.record(benchmark, gate_id, seconds, shape=dict(tier=tier_name, quantization=fmt, seq_lens_sum=sum(lengths),
                                                         **knobs),
                bytes_moved=case.bytes_moved(), speedups=speedups)
