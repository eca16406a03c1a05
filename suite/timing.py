"""GPU time as pytest-benchmark's statistic (SPEC 4).

pytest-benchmark reads its timer before and after each timed call. CudaEventClock records a CUDA
event at each read and advances only by the GPU time between the pair, so the statistic that
pytest-benchmark stores, compares and autosaves is GPU time (NVIDIA Fuser's benchmarks do the same).
The L2 flush runs as pedantic's setup: enqueued before the start event, outside the timed region.
Where the host is not part of what is measured, the stream then waits on a HostGate until the host
has enqueued the whole round (nvbench holds its launches behind a blocking kernel for the same reason).
"""

import functools
import gc
import statistics
import threading
import time
from typing import NamedTuple

import numpy as np
import pytest
import torch

from kernels import cuda_build, hw
from kernels.stream_read import stream_read

FLUSH_BYTES_MIN = 256 << 20
# Rounds not held by the HostGate (launch() enqueues for longer than this: the host is part of what is
# measured) start after the GPU spins this long, untimed (~1 ms at 2 GHz), while the host records the
# start event and enqueues. With 100 us, stalls of the host on the H100 machine put a quarter of some
# benchmarks' rounds at 2-7x their time.
HOST_SLACK_CYCLES = 2_000_000
SLEEP_CYCLES_PER_S = 2e9  # of a 2 GHz SM clock (about the fastest target's; a slower one only sleeps longer)
# A held round's watchdog opens the gate after this long: launch() itself waits on the GPU (a sync, a
# pageable copy), which the held stream would never reach.
GATE_TIMEOUT_S = 0.05
WARMUP_CALLS = 3  # JIT compilation and autotuning happen here, never in a timed round (>= 2: see _warm_up)


class Seconds(float):
    """A median in seconds that remembers whether the host was in its timed span (RoundStart.host_in_timing):
    a ratio against it is partly the host's speed."""

    def __new__(cls, value, host_in_timing):
        seconds = super().__new__(cls, value)
        seconds.host_in_timing = host_in_timing
        return seconds

    def __getnewargs__(self):  # copies and pickles keep the flag
        return float(self), self.host_in_timing


class HostGate:
    """Holds a stream at the start of a timed round until the host has enqueued all of it.

    hold() enqueues `wait(token)`: the stream waits until the flag `word` (a 1-element uint32 array the
    GPU reads) reaches token. release(), once the round's end event is enqueued, writes the token. The
    start event runs after the wait, so no host delay (a stalled host, a slow launcher) lies between the
    start and end events. H100, a 2 ms host stall every 50th round (notes/measuring.md): after the 1 ms
    sleep 42-68 of 2100 rounds were inflated, by up to 2.6 ms; held, none, and the medians as before
    (B1-L4096 decode 13.70 us, B64-L4096 350.2). A launch() that itself waits on the GPU would wait on
    the held stream forever: a watchdog opens the flag after timeout_s and counts a stall; that round's
    time is then partly the host's."""

    def __init__(self, wait, word, timeout_s=GATE_TIMEOUT_S):
        self._wait = wait
        self._word = word
        self.timeout_s = timeout_s
        self._token = 0
        self._held = None  # the token the stream waits for, until the flag reaches it
        self.stalls = 0
        self._lock = threading.Condition()
        threading.Thread(target=self._watch, name="HostGate watchdog", daemon=True).start()

    def hold(self):
        with self._lock:
            self._token = (self._token + 1) & 0xFFFFFFFF  # the wait compares cyclically
            self._wait(self._token)
            self._held = self._token
            self._lock.notify()

    def release(self):
        with self._lock:
            if self._held is not None:
                self._open()

    def _open(self):  # the lock held
        self._word[0] = self._held
        self._held = None
        self._lock.notify()

    def _watch(self):
        with self._lock:
            while True:
                self._lock.wait_for(lambda: self._held is not None)
                token = self._held
                if not self._lock.wait_for(lambda: self._held != token, timeout=self.timeout_s):
                    self.stalls += 1
                    self._open()


@functools.cache
def host_gate() -> HostGate:
    """The process's gate, holding whichever stream is current at hold(): a pinned flag the GPU reads
    through its device address (cuStreamWaitValue32, cyclic >=), and one watchdog thread for every round."""
    driver, _ = cuda_build.bindings()
    flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
    address = cuda_build.check(driver.cuMemHostGetDevicePointer(flag.data_ptr(), 0), "cuMemHostGetDevicePointer")

    def wait(token):
        stream = driver.CUstream(torch.cuda.current_stream().cuda_stream)
        cuda_build.check(driver.cuStreamWaitValue32(stream, address, token,
                                                    driver.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_GEQ),
                         "cuStreamWaitValue32")

    gate = HostGate(wait, flag.numpy().view(np.uint32))
    gate.flag = flag  # the pinned memory lives as long as the gate
    return gate


class CudaEventClock:
    """Advances by the GPU time between pairs of reads. Its two events are created once: with two new
    events every round, the host's enqueue was slow in bursts (H100, notes/measuring.md: 24 and 11 of
    2100 rounds outlasted the 1 ms sleep, inflated by 100-800 us; with the events reused, none). With
    a gate, the read that ends a round opens it."""

    def __init__(self, gate=None):
        self.now = 0.0
        self.gate = gate
        self._events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        self._started = False

    def __call__(self) -> float:
        start, end = self._events
        if not self._started:
            start.record()
        else:
            end.record()
            if self.gate is not None:
                self.gate.release()
            end.synchronize()
            self.now += start.elapsed_time(end) / 1e3
        self._started = not self._started
        return self.now


class RoundSetup:
    """Before each timed round: reset state (`before`, e.g. sequence lengths a decode loop
    advanced), read a buffer 4x the L2 (when cold), then hold the stream on `gate` until the round
    is enqueued, or without one give the host slack_cycles of GPU sleep.

    The flush reads rather than writes: reading evicts whatever the last round left (dirty lines
    are written back here, untimed) and leaves the L2 full of clean lines, which the timed call
    evicts for free. A 256 MB zero_() left 50 MB of dirty lines whose write-back landed in the
    timed call: 7 of 35 us for B16-L1024 decode attention on an H100."""

    def __init__(self, device, cold, before=None, slack_cycles=HOST_SLACK_CYCLES, gate=None):
        size = max(FLUSH_BYTES_MIN, 4 * hw.l2_bytes(device))
        self.flush = stream_read(torch.ones(size // 4, dtype=torch.int32, device=device)) if cold else None
        self.before = before
        self.slack_cycles = slack_cycles
        self.gate = gate

    def __call__(self):
        if self.before is not None:
            self.before()
        if self.flush is not None:
            self.flush()
        if self.gate is not None:
            self.gate.hold()
        elif self.slack_cycles:
            torch.cuda._sleep(self.slack_cycles)


class RoundStart(NamedTuple):
    gate: HostGate | None  # rounds held until enqueued, or None: the host races the GPU
    slack_cycles: int  # GPU sleep before an ungated round's start event
    enqueue_s: float  # the host's slowest warm enqueue of launch()

    def describe(self):
        if self.gate is not None:
            return "held until the host enqueued the round"
        return f"after {1e3 * self.slack_cycles / SLEEP_CYCLES_PER_S:.1f} ms of host slack"

    def stalls(self):
        """The gate's stalls so far in this process (0 for an ungated start): their difference over a
        measurement is how many of its rounds the watchdog opened."""
        return self.gate.stalls if self.gate is not None else 0

    def host_in_timing(self, stalls, rounds):
        """Whether the host is in the median of `rounds` timed rounds: an ungated enqueue longer than
        its slack, or held rounds that the watchdog had to open (`stalls` of them, a warm-up round's
        included) in more than half the rounds. A stalled round only ever takes longer, so fewer
        leave the median a round the host did not hold up (they are counted in gate_stalls)."""
        if self.gate is None:
            return self.enqueue_s * SLEEP_CYCLES_PER_S > self.slack_cycles
        return 2 * stalls > rounds


def _warm_up(launch, before=None, cover_enqueue=False, host_bound=False) -> RoundStart:
    """Run launch() untimed and choose how a timed round starts. Held (host_gate()) where the host is
    not part of what is measured: with cover_enqueue, or where launch()'s enqueue fits the
    HOST_SLACK_CYCLES an ungated round would give it. Otherwise the host races the GPU: an eager loop
    of many launches after HOST_SLACK_CYCLES, host_bound work (on the critical path) after none."""
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
        return RoundStart(None, 0, enqueue_s)
    held = cover_enqueue or enqueue_s * SLEEP_CYCLES_PER_S <= HOST_SLACK_CYCLES
    return RoundStart(host_gate() if held else None, HOST_SLACK_CYCLES, enqueue_s)


def run_benchmark(benchmark, launch, *, device, rounds, cold=True, before=None, cover_enqueue=False,
                  round_setup=None, host_bound=False):
    """Time launch() through pytest-benchmark; returns the median in seconds.

    On a GPU the clock is CudaEventClock and each round starts cold when `cold`, after
    `before()` (untimed), held until the host has enqueued it (RoundStart). cover_enqueue: held
    whatever the enqueue takes, so host dispatch cost (e.g. of many small copies) stays out of the
    GPU time; leave it off where that cost is part of what is measured (eager loops). host_bound:
    neither hold nor slack, for launches whose host work (filling staging buffers, say) is on the
    critical path: the timed span starts with it. round_setup replaces the whole untimed setup
    (flush, hold or slack) for measurements that stage their own contention. Without a GPU
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
    plan = _warm_up(launch, before, cover_enqueue, host_bound)
    if round_setup is not None:  # its own slack, no gate
        plan = plan._replace(gate=None, slack_cycles=round_setup.slack_cycles)
    benchmark._timer = CudaEventClock(plan.gate)  # pytest-benchmark has no public hook for the timer
    benchmark._disable_gc = True  # as --benchmark-disable-gc: no collection between the events
    benchmark.extra_info.update(clock="cuda_event", l2="flushed before every round" if cold else "warm",
                                round_start=plan.describe(), host_enqueue_ms=1e3 * plan.enqueue_s)
    if round_setup is None:
        round_setup = RoundSetup(device, cold, before, plan.slack_cycles, plan.gate)
    stalls = plan.stalls()
    benchmark.pedantic(launch, setup=round_setup, rounds=rounds, warmup_rounds=1)
    stalls = plan.stalls() - stalls
    # The GPU waits for the host within the timed span: what is timed is partly the host's speed,
    # which --benchmark-compare-fail does not hold to its threshold (suite/compare.py).
    host_in_timing = plan.host_in_timing(stalls, rounds)
    stats = benchmark.stats.stats
    benchmark.extra_info.update(host_in_timing=host_in_timing, iqr_over_median=stats.iqr / stats.median)
    if stalls:
        benchmark.extra_info["gate_stalls"] = stalls
    return Seconds(stats.median, host_in_timing)


def measure(launch, *, device, rounds, cold=True, before=None, cover_enqueue=False, host_bound=False) -> Seconds:
    """Median GPU seconds of launch() outside pytest-benchmark (baselines, roofline), same clock."""
    plan = _warm_up(launch, before, cover_enqueue, host_bound)
    clock, setup = CudaEventClock(plan.gate), RoundSetup(device, cold, before, plan.slack_cycles, plan.gate)
    stalls = plan.stalls()
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
    return Seconds(statistics.median(times), plan.host_in_timing(plan.stalls() - stalls, rounds))


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
