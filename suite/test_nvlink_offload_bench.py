"""nvlink_offload benchmarks (SPEC 2.9): a decode step of a resident paged batch while KV pages of
preempted sequences swap out to host memory and back in, per round.

pytest-benchmark's statistic is the round's GPU time (L2 flushed first). Beside it, measured in
the same way: the step alone and the variant's copies alone, giving the copies' GB/s (both
directions, K and V) and the fraction of the copy time hidden behind the step,
(step + copies - round) / copies, clipped to [0, 1] (overlap_fraction, gated). The link to host
memory (NVLink-C2C or PCIe, how found), or to the peer GPU for variant peer (slots in a second
GPU's memory, requires_multi_gpu; peer NVLink or PCIe, by NVML), goes into extra_info. Every
round's attention and pages are checked before timing."""

import pytest

from kernels import hw, kv_swap
from suite.offload_cases import SwapCase, bind_checked, peer_of
from suite.timing import measure, run_benchmark

pytestmark = pytest.mark.offload

WORKLOAD = "nvlink_offload"
BASELINE = "baseline"
# 32 resident sequences of 4096 tokens (537 MB of bf16 K+V read per step); per round one preempted
# sequence's 1024 tokens (64 pages of 16) leave and another's arrive: 4 MB each way.
DEFAULT = SwapCase(batch=32, length=4096, swap_pages=64)
SMOKE = SwapCase(batch=2, length=24, swap_pages=2, q_heads=2, kv_heads=1, head_dim=64, page_size=8)  # no GPU


def hidden_fraction(step_s, copy_s, round_s):
    """The fraction of the copy time that the round hides behind the step."""
    return min(1.0, max(0.0, (step_s + copy_s - round_s) / copy_s))


@pytest.mark.parametrize("variant", [pytest.param(v, marks=[pytest.mark.requires_multi_gpu] if v == "peer" else [])
                                     for v in kv_swap.VARIANTS])
def test_nvlink_offload(benchmark, variant, device, perf, rounds):
    case = DEFAULT if device.type == "cuda" else SMOKE
    gate_id = f"{WORKLOAD}/{variant}/{case}"
    perf.skip_if_not_applicable(gate_id)
    bound = bind_checked(case, variant, device)  # correctness before timing
    seconds = run_benchmark(benchmark, bound.round, device=device, rounds=rounds)
    metrics, speedups, rate = {}, {}, "smoke (no GPU)"
    if device.type == "cuda":
        step_s = measure(bound.round.step, device=device, rounds=rounds)
        copy_s = measure(bound.round.swap, device=device, rounds=rounds)
        metrics["overlap_fraction"] = hidden_fraction(step_s, copy_s, seconds)
        kind, how = hw.peer_link(device.index or 0, peer_of(device).index) if variant == "peer" \
            else hw.host_link(device)
        copy_gbps = case.swap_bytes() / copy_s / 1e9
        benchmark.extra_info.update(step_ms=1e3 * step_s, copy_ms=1e3 * copy_s, copy_gbps=copy_gbps,
                                    swap_bytes=case.swap_bytes(), link_kind=kind, link_found=how)
        rate = f"copies {copy_gbps:.1f} GB/s, {100 * metrics['overlap_fraction']:.0f}% hidden ({kind})"
        if variant == BASELINE:
            perf.set_baseline(WORKLOAD, str(case), seconds)
        else:
            speedups["baseline"] = perf.baseline(WORKLOAD, str(case), lambda: measure(
                bind_checked(case, BASELINE, device).round, device=device, rounds=rounds))
    perf.record(benchmark, gate_id, seconds, shape=dict(case.__dict__, dtype=str(case.dtype), variant=variant),
                speedups=speedups, rate=rate, metrics=metrics)


@pytest.mark.parametrize("step_s, copy_s, round_s, expected", [
    (1.0, 0.5, 1.0, 1.0), (1.0, 0.5, 1.5, 0.0), (1.0, 0.5, 1.25, 0.5), (1.0, 0.5, 1.7, 0.0), (1.0, 0.5, 0.9, 1.0)])
def test_hidden_fraction(step_s, copy_s, round_s, expected):
    assert hidden_fraction(step_s, copy_s, round_s) == pytest.approx(expected)
