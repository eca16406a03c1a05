"""stream_priority (SPEC 2.6): decode steps of running requests while a long prefill runs.

A scenario enqueues a long prefill on one stream and then decode steps, one after another, on
another; each decode step is bracketed by CUDA events on its stream, so its latency includes
any wait for SMs held by prefill CTAs. Hopper does not preempt running CTAs: a high-priority
stream's CTAs only win the SMs that free up, so what priorities buy depends on how long each
prefill CTA runs (its tile) and on whether a decode CTA fits in what one retiring prefill CTA frees
(a CTA that needs more waits while lower-priority CTAs that fit keep taking the space).

The decode step is a CUDA graph; a replay ignores its stream's priority (kernels/graph_priority.py),
so the step's kernel nodes carry the decode stream's priority themselves.
"""

import argparse
import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kernels import decode_graphs, hw, request_path, tiny_decoder
from suite.loop_cases import DTYPE, TIERS

PRIORITIES = ("same_priority", "decode_high")
SLACK_CYCLES = 20_000_000  # ~10 ms at 2 GHz: longer than a scenario's or a probe round's enqueue
PREFILL_TOKENS = 16384  # the new request's prompt
STEPS = 32  # decode steps enqueued behind the prefill per scenario
TILES = ((64, 64), (128, 64))  # the prefill attention's (BLOCK_M, BLOCK_N)


def decode_priority(variant):
    """The decode stream's priority: the prefill's (the lowest) or the highest."""
    if variant not in PRIORITIES:
        raise ValueError(f"variant must be one of {PRIORITIES}, got {variant!r}")
    lowest, highest = torch.cuda.Stream.priority_range()  # lower numbers run first
    return highest if variant == "decode_high" else lowest


@dataclass
class Scenario:
    prefill: callable  # enqueues the long prefill
    decode_step: callable  # enqueues one decode step
    steps: int  # decode steps per scenario
    variant: str  # same_priority or decode_high
    latencies_ms: list = field(default_factory=list)  # overlapped steps, every finished scenario
    prefill_ms: list = field(default_factory=list)

    def __post_init__(self):
        lowest, _ = torch.cuda.Stream.priority_range()
        self.prefill_stream = torch.cuda.Stream(priority=lowest)
        self.decode_stream = torch.cuda.Stream(priority=decode_priority(self.variant))
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
        events[1].synchronize()  # the prefill's end: the decode steps may finish first
        events[-1].synchronize()
        start, end = events[0], events[1]
        self.prefill_ms.append(start.elapsed_time(end))
        for i in range(self.steps):
            s, e = events[2 + 2 * i], events[3 + 2 * i]
            if start.elapsed_time(s) < start.elapsed_time(end):
                self.latencies_ms.append(s.elapsed_time(e))


class Contention:
    """A probe round's setup: host slack, then the prefill on the lowest-priority stream and, on the
    current (decode) stream, a one-CTA wait of `delay_cycles`, by when the prefill holds the GPU.
    Work timed on the current stream right after it meets the running prefill."""

    def __init__(self, prefill, delay_cycles):
        lowest, _ = torch.cuda.Stream.priority_range()
        self.prefill, self.delay_cycles = prefill, delay_cycles
        self.prefill_stream = torch.cuda.Stream(priority=lowest)
        self.slack_cycles = SLACK_CYCLES

    def __call__(self):
        torch.cuda.synchronize()
        decode = torch.cuda.current_stream()
        torch.cuda._sleep(self.slack_cycles)  # the host enqueues everything below before the GPU starts
        self.prefill_stream.wait_stream(decode)
        with torch.cuda.stream(self.prefill_stream):
            self.prefill()
        torch.cuda._sleep(self.delay_cycles)


def build(device):
    """The running batch (loop_cases' medium tier) with its one-step decode graph per priority
    (kernel nodes at the decode stream's priority), the long prefill per tile, and a reset of
    the batch's lengths. -> (steps {priority: launch}, prefills {tile: launch}, reset)"""
    tier = TIERS["medium"]  # B8, d_model 512
    w = tiny_decoder.random_weights(tier.q_heads, tier.kv_heads, tier.head_dim, DTYPE, device)
    prompts = [torch.randn(n, w.d_model, dtype=DTYPE, device=device) for n in tier.prompt_lens()]
    h, k_cache, v_cache, seq_lens = tiny_decoder.prefill(w, prompts, capacity=tier.prompt + STEPS)
    start = seq_lens.clone()
    steps = {p: decode_graphs.graph_decode(w, h, k_cache, v_cache, seq_lens, 1, mode="full",
                                           priority=decode_priority(p)) for p in PRIORITIES}
    long_prompt = [torch.randn(PREFILL_TOKENS, w.d_model, dtype=DTYPE, device=device)]
    prefills = {tile: request_path.bind(w, long_prompt, 1, "baseline", tile=tile).prefill for tile in TILES}
    return steps, prefills, lambda: seq_lens.copy_(start)


def trace(scenarios, folder):
    """Each (priority, tile) scenario, warmed up, under torch.profiler (after the timed rounds' host
    slack): its Chrome trace and timeline PNG under folder. -> [(trace path, PNG path)], in order.
    Run it in a process of its own (python -m suite.priority): the profiler's CUDA hooks outlive
    the profile and slow every later kernel launch of the process (the eager decode's TPOT tripled
    in a run after it). All scenarios share one process and one build: a process per scenario
    cost the minimal profile a torch import, a CUDA context and a decoder build each."""
    steps, prefills, reset = build(torch.device("cuda"))
    paths = []
    for priority, tile in scenarios:
        scenario = Scenario(prefills[tile], steps[priority], STEPS, priority)
        scenario()
        torch.cuda.synchronize()
        reset()
        name = f"stream_priority-{priority}-{tile[0]}x{tile[1]}"
        stem = Path(folder) / f"{name}-{datetime.datetime.now():%Y%m%d_%H%M%S}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            torch.cuda._sleep(SLACK_CYCLES)  # as in the timed rounds: everything enqueued before it runs
            scenario()
            torch.cuda.synchronize()
        reset()
        prof.export_chrome_trace(f"{stem}.json")
        lanes = kernel_intervals(f"{stem}.json")
        labels = {s: ("prefill stream" if any("prefill" in n for _, _, n in v) else "decode stream")
                  for s, v in lanes.items()}
        timeline_png(lanes, labels, f"{stem}.png", name)
        paths.append((f"{stem}.json", f"{stem}.png"))
    return paths


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


def main(argv=None):
    parser = argparse.ArgumentParser(description="Trace stream_priority scenarios: a Chrome trace and a timeline "
                                                 "PNG each; prints priority, BLOCK_M, BLOCK_N, trace and PNG per "
                                                 "scenario, tab-separated")
    parser.add_argument("--priority", choices=PRIORITIES, nargs="+", default=list(PRIORITIES))
    parser.add_argument("--tile", type=int, nargs=2, action="append", metavar=("BLOCK_M", "BLOCK_N"),
                        help=f"repeat for several; default every tile of {TILES}")
    parser.add_argument("--folder", required=True)
    args = parser.parse_args(argv)
    tiles = [tuple(t) for t in args.tile] if args.tile else list(TILES)
    for tile in tiles:
        if tile not in TILES:
            parser.error(f"--tile must be one of {TILES}, got {tile}")
    ok, probed = hw.has_cuda()
    if not ok:
        parser.error(f"stream_priority traces CUDA streams: {probed}")
    scenarios = [(priority, tile) for tile in tiles for priority in args.priority]
    for (priority, tile), (trace_path, png) in zip(scenarios, trace(scenarios, args.folder)):
        print(priority, *tile, trace_path, png, sep="\t")


if __name__ == "__main__":
    main()
