"""stream_priority benchmarks (SPEC 2.6): decode-step latency (p50, p99) of a running batch
while a long prefill runs, with equal stream priorities and with decode high / prefill low, for
two prefill tiles (a CTA of a bigger tile holds its SM longer: Hopper does not preempt it).

Per (priority, tile): the scenario's GPU time is pytest-benchmark's statistic; the table's time
column and the gate are the p99 decode-step latency (decode_high gated as a speedup over
same_priority's p99 at the same tile). A Chrome trace and a timeline PNG of one scenario are kept
beside the saved runs; their paths are printed at the end."""

import datetime
from pathlib import Path

import pytest
import torch

from kernels import decode_graphs, request_path, tiny_decoder
from suite.loop_cases import DTYPE, TIERS
from suite.priority import PRIORITIES, Scenario, kernel_intervals, percentile, timeline_png
from suite.timing import run_benchmark

pytestmark = [pytest.mark.decode, pytest.mark.prefill, pytest.mark.requires_cuda]

WORKLOAD = "stream_priority"
DECODE_TIER = TIERS["medium"]  # the running batch: B8, d_model 512
PREFILL_TOKENS = 16384  # the new request's prompt
STEPS = 32  # decode steps enqueued behind the prefill per scenario
TILES = ((64, 64), (128, 64))  # the prefill attention's (BLOCK_M, BLOCK_N)


@pytest.fixture(scope="module")
def contention(device):
    """The running batch's one-step decode graph and the long prefill, per tile."""
    w = tiny_decoder.random_weights(DECODE_TIER.q_heads, DECODE_TIER.kv_heads, DECODE_TIER.head_dim, DTYPE, device)
    prompts = [torch.randn(n, w.d_model, dtype=DTYPE, device=device) for n in DECODE_TIER.prompt_lens()]
    h, k_cache, v_cache, seq_lens = tiny_decoder.prefill(w, prompts, capacity=DECODE_TIER.prompt + STEPS)
    start = seq_lens.clone()
    step = decode_graphs.graph_decode(w, h, k_cache, v_cache, seq_lens, 1, mode="full")
    long_prompt = [torch.randn(PREFILL_TOKENS, w.d_model, dtype=DTYPE, device=device)]
    prefills = {tile: request_path.bind(w, long_prompt, 1, "baseline", tile=tile).prefill for tile in TILES}
    return step, prefills, lambda: seq_lens.copy_(start)


def _trace(scenario, storage, name):
    """One scenario under torch.profiler: the Chrome trace and its timeline PNG (paths)."""
    folder = Path(storage.removeprefix("file://")) / "traces"
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{name}-{datetime.datetime.now():%Y%m%d_%H%M%S}"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        scenario()
        torch.cuda.synchronize()
    prof.export_chrome_trace(f"{stem}.json")
    lanes = kernel_intervals(f"{stem}.json")
    labels = {s: ("prefill stream" if any("prefill" in n for _, _, n in v) else "decode stream")
              for s, v in lanes.items()}
    timeline_png(lanes, labels, f"{stem}.png", name)
    return f"{stem}.json", f"{stem}.png"


@pytest.mark.parametrize("tile", TILES, ids=lambda t: f"tile{t[0]}x{t[1]}")
@pytest.mark.parametrize("priority", PRIORITIES)
def test_stream_priority(benchmark, priority, tile, contention, device, perf, rounds, pytestconfig):
    step, prefills, reset = contention
    gate_id = f"{WORKLOAD}/{priority}/tile{tile[0]}x{tile[1]}"
    perf.skip_if_not_applicable(gate_id)
    reset()
    alone = step().clone()  # correctness: contention must not change what a step computes
    reset()
    scenario = Scenario(prefills[tile], step, STEPS, priority)
    scenario()
    torch.cuda.synchronize()
    reset()
    torch.testing.assert_close(step(), alone, rtol=0, atol=0)

    def before():
        scenario.collect()
        reset()

    run_benchmark(benchmark, scenario, device=device, rounds=rounds, before=before)
    scenario.collect()
    if not scenario.latencies_ms:
        pytest.fail(f"{gate_id}: no decode step overlapped the prefill; the scenario measures nothing")
    p50, p99 = percentile(scenario.latencies_ms, 50), percentile(scenario.latencies_ms, 99)
    prefill_s = percentile(scenario.prefill_ms, 50) / 1e3
    benchmark.extra_info.update(p50_us=1e3 * p50, p99_us=1e3 * p99, overlapped_steps=len(scenario.latencies_ms),
                                prefill_ms=1e3 * prefill_s, prefill_tokens_per_s=PREFILL_TOKENS / prefill_s,
                                tile=list(tile))
    reset()
    name = f"{WORKLOAD}-{priority}-{tile[0]}x{tile[1]}"
    trace, png = _trace(scenario, pytestconfig.getoption("benchmark_storage"), name)
    benchmark.extra_info.update(chrome_trace=trace, timeline_png=png)
    perf.artifacts += [(f"{gate_id} trace", trace), (f"{gate_id} timeline", png)]
    key = f"tile{tile}"
    speedups = {}
    if priority == "same_priority":
        perf.set_baseline(WORKLOAD, key, p99 / 1e3)
    else:
        speedups["baseline"] = perf.baseline(WORKLOAD, key, lambda: pytest.fail(
            "same_priority must run first at this tile (its p99 is the baseline)"))
    perf.record(benchmark, gate_id, p99 / 1e3, shape=dict(priority=priority, tile=list(tile), steps=STEPS,
                                                          prefill_tokens=PREFILL_TOKENS),
                speedups=speedups, rate=f"p50 {1e3 * p50:.0f} us, p99 {1e3 * p99:.0f} us")
