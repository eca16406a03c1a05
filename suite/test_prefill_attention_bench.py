"""Prefill attention benchmarks (SPEC 2.3): TFLOP/s (causal FLOPs counted once) against the
session's bf16 matmul roofline; speedups vs the SDPA anchor (its fastest backend, cuDNN on
Hopper), vs SDPA's FlashAttention-2 and cuDNN backends by name, and vs triton_cp_async (the
baseline).

Each benchmark checks its output against the float64 reference before timing. Compute-bound:
timed warm (no L2 flush)."""

import pytest
import torch

from kernels.prefill_attention import VARIANTS
from suite.anchors import sdpa_backends, timed_part
from suite.decode_cases import poisoned_out, seeded_lengths
from suite.options import parse_tile
from suite.prefill_cases import PrefillCase, check_output, make_inputs, variant_params
from suite.timing import measure, run_benchmark

pytestmark = pytest.mark.prefill

WORKLOAD = "prefill_attention"
ANCHOR = "sdpa"
BASELINE = "triton_cp_async"
FA2 = "flash"  # SDPA's FlashAttention-2 backend: issue 5's bar
CUDNN = "cudnn"  # SDPA's fastest backend on Hopper: the ratio issue 5 asks to report


def _case(batch, prompt, variable, head_dim=128, dtype=torch.bfloat16):
    lens = seeded_lengths(batch, prompt, variable, seed=batch * prompt)
    return PrefillCase(lens, 32, 8, head_dim, dtype)


MINIMAL = [(1, 4096, False), (4, 4096, False), (1, 8192, False), (8, 2048, True)]
FULL = MINIMAL + [(1, 16384, False), (16, 1024, False), (4, 8192, True)]
SMOKE = [PrefillCase((37, 20), 4, 2, 64, torch.bfloat16)]  # no GPU: one interpreted run each
SMOKE_TILE = (16, 16)


def pytest_generate_tests(metafunc):
    if "prefill_case" not in metafunc.fixturenames:
        return
    if not torch.cuda.is_available():
        cases = SMOKE
    else:
        cases = [_case(*s) for s in (FULL if metafunc.config.getoption("profile") == "full" else MINIMAL)]
    # the anchor first, then the baseline: each is timed before the variants compared with it
    order = [ANCHOR, BASELINE] + sorted(v for v in VARIANTS if v not in (ANCHOR, BASELINE))
    metafunc.parametrize("variant", variant_params(order))
    metafunc.parametrize("prefill_case", cases, ids=str)


def _sdpa_seconds(inputs, device, rounds):
    """{backend: seconds} of every SDPA backend that runs these inputs correctly."""
    timed = sdpa_backends(lambda backend: VARIANTS[ANCHOR](**inputs, backend=backend, out=poisoned_out(inputs)),
                          lambda out: check_output(out, inputs), device, rounds, cold=False)
    return {backend: seconds for backend, (_, seconds) in timed.items()}


def _checked_seconds(inputs, device, rounds):
    # the baseline, its own benchmark not run this session: correctness before timing too
    launch = VARIANTS[BASELINE](**inputs, out=poisoned_out(inputs))
    check_output(launch(), inputs)
    return measure(timed_part(launch), device=device, rounds=rounds, cold=False)


def test_prefill_attention(benchmark, variant, prefill_case, device, perf, rounds, pytestconfig):
    case = prefill_case
    gate_id = f"{WORKLOAD}/{variant}/{case}"
    perf.skip_if_not_applicable(gate_id)
    inputs = make_inputs(case, device)
    knobs = {}
    if variant != ANCHOR:
        tile = pytestconfig.getoption("tma_tile_size") if variant == "triton_tma" else None
        knobs["tile"] = parse_tile(tile) if tile else (SMOKE_TILE if device.type != "cuda" else None)
    launch = VARIANTS[variant](**inputs, **knobs, out=poisoned_out(inputs))
    check_output(launch(), inputs)  # correctness before timing
    seconds = run_benchmark(benchmark, timed_part(launch), device=device, rounds=rounds, cold=False)
    speedups = {}
    if device.type == "cuda":
        sdpa = perf.baseline(WORKLOAD, f"sdpa-all/{case}", lambda: _sdpa_seconds(inputs, device, rounds))
        benchmark.extra_info["sdpa_seconds"] = sdpa
        if variant != ANCHOR:
            speedups["anchor"] = min(sdpa.values())
            speedups.update({name: sdpa[name] for name in (FA2, CUDNN) if name in sdpa})
        if variant == BASELINE:
            perf.set_baseline(WORKLOAD, str(case), seconds)
        elif variant != ANCHOR:
            speedups["baseline"] = perf.baseline(WORKLOAD, str(case), lambda: _checked_seconds(inputs, device, rounds))
    shape = dict(variant=variant, case=str(case), **({} if variant == ANCHOR else dict(tile=launch.tile)))
    perf.record(benchmark, gate_id, seconds, shape=shape,
                flops=case.flops(), roofline_kind="matmul", speedups=speedups)
