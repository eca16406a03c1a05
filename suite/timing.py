"""GPU time as pytest-benchmark's statistic (SPEC 4).

pytest-benchmark reads its timer before and after each timed call. CudaEventClock records a CUDA
event at each read and advances only by the GPU time between the pair, so the statistic that
pytest-benchmark stores, compares and autosaves is GPU time (NVIDIA Fuser's benchmarks do the same).
The L2 flush runs as pedantic's setup: enqueued before the start event, outside the timed region.
"""

import gc
import statistics
import time

import pytest
import torch

from kernels import hw
from kernels.stream_read import stream_read

FLUSH_BYTES_MIN = 256 << 20
# After the flush the GPU spins this long, untimed (~1 ms at 2 GHz), while the host records the
# start event, enqueues the timed launches and records the end event. A host delay shorter than
# this cannot reach the events; with 100 us, stalls of the host on the H100 machine put a quarter
# of some benchmarks' rounds at 2-7x their time.
HOST_SLACK_CYCLES = 2_000_000
WARMUP_CALLS = 3  # JIT compilation and autotuning happen here, never in a timed round (>= 2: see _warm_up)
# cover_enqueue: the slack is this many times the host's slowest warm enqueue of launch(), in
# cycles of a 2 GHz SM clock (about the fastest target's; a slower clock only sleeps longer).
ENQUEUE_MARGIN = 2.0
SLEEP_CYCLES_PER_S = 2e9


class Seconds(float):
    """A median in seconds that remembers whether the host was in its timed span (the host's enqueue
    outlasted the slack before the start event): a ratio against it is partly the host's speed."""

    def __new__(cls, value, host_in_timing):
        seconds = super().__new__(cls, value)
        seconds.host_in_timing = host_in_timing
        return seconds

    def __getnewargs__(self):  # copies and pickles keep the flag
        return float(self), self.host_in_timing


class CudaEventClock:
    def __init__(self):
        self.now = 0.0
        self._start = None

    def __call__(self) -> float:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        if self._start is None:
            self._start = event
        else:
            event.synchronize()
            self.now += self._start.elapsed_time(event) / 1e3
            self._start = None
        return self.now


class RoundSetup:
    """Before each timed round: reset state (`before`, e.g. sequence lengths a decode loop
    advanced), read a buffer 4x the L2 (when cold), then give the host slack.

    The flush reads rather than writes: reading evicts whatever the last round left (dirty lines
    are written back here, untimed) and leaves the L2 full of clean lines, which the timed call
    evicts for free. A 256 MB zero_() left 50 MB of dirty lines whose write-back landed in the
    timed call: 7 of 35 us for B16-L1024 decode attention on an H100."""

    def __init__(self, device, cold, before=None, slack_cycles=HOST_SLACK_CYCLES):
        size = max(FLUSH_BYTES_MIN, 4 * hw.l2_bytes(device))
        self.flush = stream_read(torch.ones(size // 4, dtype=torch.int32, device=device)) if cold else None
        self.before = before
        self.slack_cycles = slack_cycles

    def __call__(self):
        if self.before is not None:
            self.before()
        if self.flush is not None:
            self.flush()
        torch.cuda._sleep(self.slack_cycles)


def _warm_up(launch, before=None, cover_enqueue=False, host_bound=False):
    """Run launch() untimed; returns the host slack (cycles) a timed round gets (HOST_SLACK_CYCLES,
    with cover_enqueue enough for the whole enqueue of launch() to finish before the GPU starts,
    with host_bound none: the host's own work is part of what is measured) and the host's slowest
    warm enqueue of launch() (seconds)."""
    enqueue = []
    for _ in range(WARMUP_CALLS):
        if before is not None:
            before()
        torch.cuda.synchronize()
        start = time.perf_counter()
        launch()
        enqueue.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    # The first call builds (Triton JIT, autotuning, CUDA's lazy module loading), which no timed round
    # does: a lone x.add_, first in its process, took 12-30 ms to enqueue on an H100, then 0.01-0.1 ms.
    enqueue_s = max(enqueue[1:])
    if host_bound:
        return 0, enqueue_s
    if not cover_enqueue:
        return HOST_SLACK_CYCLES, enqueue_s
    return max(HOST_SLACK_CYCLES, int(ENQUEUE_MARGIN * enqueue_s * SLEEP_CYCLES_PER_S)), enqueue_s


def run_benchmark(benchmark, launch, *, device, rounds, cold=True, before=None, cover_enqueue=False,
                  round_setup=None, host_bound=False):
    """Time launch() through pytest-benchmark; returns the median in seconds.

    On a GPU the clock is CudaEventClock and each round starts cold when `cold`, after
    `before()` (untimed). cover_enqueue: the round's host slack covers launch()'s whole enqueue,
    so host dispatch cost (e.g. of many small copies) stays out of the GPU time; leave it off
    where that cost is part of what is measured (eager loops). host_bound: no slack at all, for
    launches whose host work (filling staging buffers, say) is on the critical path: the timed span
    starts with it. round_setup replaces the whole
    untimed setup (flush, slack) for measurements that stage their own contention. Without a GPU
    this is a smoke run: one round on the host clock (benchmark.extra_info['clock'] says so).
    Under --benchmark-disable (pytest-benchmark's "run once, no stats") the test ends as a skip
    after that one call: its correctness check has run, nothing was timed or gated.
    """
    if benchmark.disabled or torch.device(device).type != "cuda":
        benchmark.pedantic(launch, setup=before, rounds=1)
        if benchmark.disabled:
            pytest.skip("--benchmark-disable: launched once after its correctness check; nothing timed or gated")
        benchmark.extra_info["clock"] = "host (smoke run, no GPU)"
        return benchmark.stats.stats.median
    slack, enqueue_s = _warm_up(launch, before, cover_enqueue, host_bound)
    benchmark._timer = CudaEventClock()  # pytest-benchmark has no public hook for the timer
    benchmark._disable_gc = True  # as --benchmark-disable-gc: no collection between the events
    benchmark.extra_info["clock"] = "cuda_event"
    benchmark.extra_info["l2"] = "flushed before every round" if cold else "warm"
    if round_setup is None:
        benchmark.extra_info["host_slack_ms"] = 1e3 * slack / SLEEP_CYCLES_PER_S
        round_setup = RoundSetup(device, cold, before, slack)
    # The GPU waits for the host within the timed span: what is timed is partly the host's speed,
    # which --benchmark-compare-fail does not hold to its threshold (suite/compare.py).
    host_in_timing = enqueue_s * SLEEP_CYCLES_PER_S > round_setup.slack_cycles
    benchmark.extra_info.update(host_enqueue_ms=1e3 * enqueue_s, host_in_timing=host_in_timing)
    benchmark.pedantic(launch, setup=round_setup, rounds=rounds, warmup_rounds=1)
    stats = benchmark.stats.stats
    benchmark.extra_info["iqr_over_median"] = stats.iqr / stats.median
    return Seconds(stats.median, host_in_timing)


def measure(launch, *, device, rounds, cold=True, before=None, cover_enqueue=False, host_bound=False) -> Seconds:
    """Median GPU seconds of launch() outside pytest-benchmark (baselines, roofline), same clock."""
    slack, enqueue_s = _warm_up(launch, before, cover_enqueue, host_bound)
    clock, setup = CudaEventClock(), RoundSetup(device, cold, before, slack)
    times = []
    gc.disable()
    try:
        for _ in range(rounds):
            setup()
            start = clock()
            launch()
            times.append(clock() - start)
    finally:
        gc.enable()
    return Seconds(statistics.median(times), enqueue_s * SLEEP_CYCLES_PER_S > slack)


LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                "cudaLaunchCooperativeKernel", "cudaGraphLaunch", "cuGraphLaunch", "cudaMemcpyAsync",
                "cudaMemsetAsync")


def count_launches(launch, before=None):
    """(host launch calls, GPU work items) of one launch(), counted by the profiler: the calls
    that enqueue work (kernels, graphs, async copies and sets), and the kernels, copies and sets
    the GPU ran, graph-launched ones included. It leaves the profiler's hooks in the process,
    which slow later launches: benchmarks count after all timing (PerfRecorder.count_launches_later)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if before is not None:
        before()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        launch()
        torch.cuda.synchronize()
    events = prof.events()
    calls = sum(1 for e in events if e.name in LAUNCH_CALLS)
    work = sum(1 for e in events if e.device_type == DeviceType.CUDA)
    return calls, work
