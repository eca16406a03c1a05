"""Request-path benchmarks (SPEC 2.5), per decode tier: the whole request's GPU time (prefill then
T steps), TTFT (the prefill alone) and TPOT (the decode alone, per step), optimized vs baseline.

Each variant's decode outputs, and the baseline's when measured on demand, are checked against the
float64 reference before timing. A request restores the prompt lengths first (a copy of B int32s,
inside its time); the decode alone is timed after an untimed restore. Rounds start with the L2
flushed."""

import pytest
import torch

from kernels import request_path, tiny_decoder
from suite import reference
from suite.loop_cases import DTYPE, check_outputs, steps_of, tiers
from suite.timing import measure, run_benchmark

pytestmark = [pytest.mark.prefill, pytest.mark.decode]

WORKLOAD = "prefill_decode"
BASELINE = "baseline"
SMOKE_TILE = (16, 16)  # no GPU: the interpreter's prefill attention tile
NEEDS = {"baseline": [], "optimized": [pytest.mark.requires_tma] if torch.cuda.is_available() else []}


def pytest_generate_tests(metafunc):
    if "request_variant" in metafunc.fixturenames:
        metafunc.parametrize("request_variant", [pytest.param(v, marks=NEEDS[v]) for v in request_path.VARIANTS])
        metafunc.parametrize("tier_name", list(tiers(metafunc.config)))


def test_prefill_decode(benchmark, request_variant, tier_name, device, perf, rounds, pytestconfig):
    tier = tiers(pytestconfig)[tier_name]
    steps = steps_of(tier, pytestconfig)
    gate_id = f"{WORKLOAD}/{request_variant}/{tier_name}"
    perf.skip_if_not_applicable(gate_id)
    weights = tiny_decoder.random_weights(tier.q_heads, tier.kv_heads, tier.head_dim, DTYPE, device)
    prompts = [torch.randn(n, weights.d_model, dtype=DTYPE, device=device) for n in tier.prompt_lens()]
    expected = reference.decode_loop(weights, prompts, steps, tiny_decoder.RMS_EPS)
    request = _checked_request(weights, prompts, steps, request_variant, expected,  # correctness before timing
                               tile=None if device.type == "cuda" else SMOKE_TILE)
    seconds = run_benchmark(benchmark, request, device=device, rounds=rounds)  # a request resets seq_lens
    speedups, rate = {}, "smoke (no GPU)"
    if device.type == "cuda":
        ttft = measure(request.prefill, device=device, rounds=rounds)
        tpot = measure(request.decode, device=device, rounds=rounds, before=request.reset) / steps
        benchmark.extra_info.update(ttft_ms=1e3 * ttft, tpot_ms=1e3 * tpot, steps=steps)
        rate = f"TTFT {1e3 * ttft:.2f} ms, TPOT {1e3 * tpot:.3f} ms"
        key = tier_name
        if request_variant == BASELINE:
            perf.set_baseline(WORKLOAD, key, (seconds, ttft, tpot))
        else:
            base = perf.baseline(WORKLOAD, key,
                                 lambda: _baseline_times(weights, prompts, steps, expected, device, rounds))
            speedups["baseline"] = base[0]
            benchmark.extra_info.update(ttft_speedup_vs_baseline=base[1] / ttft,
                                        tpot_speedup_vs_baseline=base[2] / tpot)
    perf.record(benchmark, gate_id, seconds, shape=dict(tier.__dict__, tier=tier_name, variant=request_variant,
                                                         steps=steps),
                speedups=speedups, rate=rate)


def _checked_request(weights, prompts, steps, variant, expected, tile=None):
    """The variant's request, once its outputs (poisoned first: every step must write every element)
    have passed check_outputs against `expected`, the reference's on the same weights and prompts."""
    request = request_path.bind(weights, prompts, steps, variant, tile=tile)
    request.out.fill_(float("nan"))
    check_outputs(request(), expected, DTYPE, steps)
    return request


def _baseline_times(weights, prompts, steps, expected, device, rounds):
    """(request, TTFT, TPOT) seconds of the baseline on the same prompts, checked first."""
    request = _checked_request(weights, prompts, steps, BASELINE, expected)
    whole = measure(request, device=device, rounds=rounds)
    ttft = measure(request.prefill, device=device, rounds=rounds)
    return whole, ttft, measure(request.decode, device=device, rounds=rounds, before=request.reset) / steps
