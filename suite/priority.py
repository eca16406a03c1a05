"""stream_priority (SPEC 2.6): decode steps of running requests while a long prefill runs.

A scenario enqueues a long prefill on one stream and then decode steps, one after another, on
another; each decode step is bracketed by CUDA events on its stream, so its latency includes
any wait for SMs held by prefill CTAs. Hopper does not preempt running CTAs: a high-priority
stream's CTAs only win the SMs that free up, so what priorities buy depends on how long each
prefill CTA runs (its tile).
"""

import json
from dataclasses import dataclass, field

import torch

PRIORITIES = ("same_priority", "decode_high")


@dataclass
class Scenario:
    prefill: callable  # enqueues the long prefill
    decode_step: callable  # enqueues one decode step
    steps: int  # decode steps per scenario
    variant: str  # same_priority or decode_high
    latencies_ms: list = field(default_factory=list)  # overlapped steps, every finished scenario
    prefill_ms: list = field(default_factory=list)

    def __post_init__(self):
        if self.variant not in PRIORITIES:
            raise ValueError(f"variant must be one of {PRIORITIES}, got {self.variant!r}")
        lowest, highest = torch.cuda.current_stream().priority_range()  # lower numbers run first
        decode_priority = highest if self.variant == "decode_high" else lowest
        self.prefill_stream = torch.cuda.Stream(priority=lowest)
        self.decode_stream = torch.cuda.Stream(priority=decode_priority)
        self._events = None

    def __call__(self):
        caller = torch.cuda.current_stream()
        for stream in (self.prefill_stream, self.decode_stream):
            stream.wait_stream(caller)  # nothing starts before the caller's work (L2 flush, slack)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2 * self.steps + 2)]
        with torch.cuda.stream(self.prefill_stream):
            events[0].record()
            self.prefill()
            events[1].record()
        with torch.cuda.stream(self.decode_stream):
            for i in range(self.steps):
                events[2 + 2 * i].record()
                self.decode_step()
                events[3 + 2 * i].record()
        caller.wait_stream(self.prefill_stream)
        caller.wait_stream(self.decode_stream)
        self._events = events

    def collect(self):
        """Fold the last finished scenario's event times in: each decode step that started before
        the prefill ended (all of them, if it ran first), and the prefill's time."""
        if self._events is None:
            return
        events, self._events = self._events, None
        events[-1].synchronize()
        start, end = events[0], events[1]
        self.prefill_ms.append(start.elapsed_time(end))
        for i in range(self.steps):
            s, e = events[2 + 2 * i], events[3 + 2 * i]
            if start.elapsed_time(s) < start.elapsed_time(end):
                self.latencies_ms.append(s.elapsed_time(e))


def percentile(values, q):
    """The q-th percentile (0..100) by linear interpolation; values must be non-empty."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def kernel_intervals(trace_path):
    """{stream: [(start_us, duration_us, kernel name)]} from a Chrome trace of torch.profiler."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    lanes = {}
    for e in events:
        if e.get("cat") == "kernel" and "dur" in e:
            stream = e.get("args", {}).get("stream", e.get("tid"))
            lanes.setdefault(stream, []).append((float(e["ts"]), float(e["dur"]), e.get("name", "")))
    return lanes


def timeline_png(lanes, labels, path, title):
    """Per-stream kernel intervals as horizontal bars; labels: {stream: name}. Returns the number
    of intervals drawn per stream."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(start for intervals in lanes.values() for start, _, _ in intervals)
    streams = sorted(lanes, key=str)
    fig, ax = plt.subplots(figsize=(12, 1 + 0.6 * len(streams)))
    drawn = {}
    for row, stream in enumerate(streams):
        bars = [((start - t0) / 1e3, dur / 1e3) for start, dur, _ in lanes[stream]]
        ax.broken_barh(bars, (row - 0.35, 0.7))
        drawn[stream] = len(bars)
    ax.set_yticks(range(len(streams)), [labels.get(s, f"stream {s}") for s in streams])
    ax.set_xlabel("ms")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn
