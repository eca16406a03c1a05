"""Decode-loop benchmarks (SPEC 2.2): TPOT, launches per step and speedup vs eager, per tier.

Each variant first runs the tier's T steps and is checked against the float64 reference, then
is timed: every round restores the prompt lengths (untimed) and starts with the L2 flushed.
"""

import pytest

from kernels import decode_graphs, tiny_decoder
from suite.loop_cases import (DTYPE, bind, check_loop, loop_seconds, loop_variants, make_loop_inputs, needs_cuda,
                              steps_of, tiers, time_loop)
from suite.timing import measure

pytestmark = pytest.mark.decode

WORKLOAD = "decode_loop"
BASELINE = "eager"
GRAPHS = "graphs_full"  # the graph baseline the persistent kernels are compared with
PERSISTENT = ("triton_persistent", "cuda_persistent")


def graph_modes(config):
    chosen = config.getoption("graph_mode")
    return decode_graphs.GRAPH_MODES if chosen == "all" else (chosen,)


def variants(config):
    return loop_variants(graph_modes(config), config.getoption("max_capture"))


def pytest_generate_tests(metafunc):
    if "loop_name" in metafunc.fixturenames:
        config = metafunc.config
        names = [pytest.param(n, marks=[pytest.mark.requires_cuda] if needs_cuda(n) else []) for n in variants(config)]
        metafunc.parametrize("loop_name", names)
        metafunc.parametrize("tier_name", list(tiers(config)))


def test_decode_loop(benchmark, loop_name, tier_name, device, perf, rounds, pytestconfig):
    tier = tiers(pytestconfig)[tier_name]
    steps = steps_of(tier, pytestconfig)
    gate_id = f"{WORKLOAD}/{loop_name}/{tier_name}"
    perf.skip_if_not_applicable(gate_id)
    weights = tiny_decoder.random_weights(tier.q_heads, tier.kv_heads, tier.head_dim, DTYPE, device)
    inputs = make_loop_inputs(weights, tier.prompt_lens(), steps, device)
    decoders = variants(pytestconfig)
    launch = bind(decoders[loop_name], weights, inputs, steps)
    inputs.poison()
    check_loop(launch(), weights, inputs, steps)  # correctness before timing
    seconds = time_loop(benchmark, launch, inputs, steps, device, rounds, perf)
    # TTFT: the prefill of this tier's prompts, the same call on the same prompts and capacity that made
    # the caches the check above passed (make_loop_inputs): checked through every step's output
    if loop_name == BASELINE and device.type == "cuda":
        benchmark.extra_info["ttft_ms"] = 1e3 * measure(
            lambda: tiny_decoder.prefill(weights, inputs.prompts, inputs.caches["k_cache"].shape[2]),
            device=device, rounds=rounds)
    speedups = {}
    if device.type == "cuda":
        perf.set_baseline(WORKLOAD, f"{loop_name}/{tier_name}", seconds)
        # the baselines exist whatever --graph-mode selected
        baselines = loop_variants(decode_graphs.GRAPH_MODES, pytestconfig.getoption("max_capture"))
        for name, key in ((BASELINE, "baseline"), (GRAPHS, "graphs")):
            if loop_name != name and (name != GRAPHS or loop_name in PERSISTENT):
                speedups[key] = perf.baseline(WORKLOAD, f"{name}/{tier_name}", lambda: loop_seconds(
                    baselines[name], weights, tier, steps, device, rounds))
    perf.record(benchmark, gate_id, seconds, shape=dict(tier.__dict__, variant=loop_name, tier=tier_name, steps=steps),
                speedups=speedups, rate=f"TPOT {1e3 * seconds / steps:.3f} ms")
