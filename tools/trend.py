"""Drift that a compare with one run misses: the newest saved run of a GPU against the median of
that GPU's earlier runs, benchmark by benchmark (GPU-timed ones).

    python -m tools.trend [RUN | --gpu KEY] [--history 8] [--confirm 2] [--min-change 0.05] [--fail]

`--benchmark-compare-fail=median:10%` holds each run to the one saved before it. A step just under
the threshold passes it, and so do small steps that add up over nights: the native decode loop
lost 9-11% in one commit (runs 0008 -> 0009) and stayed there for ten runs, unflagged. Here the
reference is the median of up to --history earlier runs, and a benchmark is called slower (or
faster) when each of the newest --confirm runs moved from the reference by more than the larger
of --min-change and NOISE_SIGMAS times the spread of the earlier runs' medians. Host-timed
benchmarks are left out, as suite/compare.py leaves them out of the compare's failures.
"""

import argparse
import statistics
import sys
from pathlib import Path
from typing import NamedTuple

from tools._args import positive_int
from tools.report import ReportError, latest_of, load, read_run

NOISE_SIGMAS = 4.0  # the run-to-run spread (robust sigma from the MAD) a change must exceed
MAD_TO_SIGMA = 1.4826  # MAD x this = sigma for normally distributed medians
MIN_RUNS = 3  # previous runs a benchmark needs before it is judged


class Drift(NamedTuple):
    gate_id: str
    reference: float  # seconds: the median of the earlier runs' medians
    seconds: float  # the newest run's median
    change: float  # seconds / reference - 1
    threshold: float  # the |change| beyond which it is called
    runs: int  # earlier runs that had it
    verdict: str  # "slower", "faster" or "steady"


def drift(recent, history, min_change):
    """Drift of each GPU-timed benchmark of the newest run against history. recent: the newest runs'
    rows (report.load's), oldest first, each of which must have moved the same way beyond the
    threshold for a verdict (one run that landed on a slow machine is not a trend); history: the
    rows of the runs before them. Benchmarks found in fewer than MIN_RUNS of history are not judged.
    A host-timed row counts nowhere; runs saved before host_in_timing was recorded count only for
    benchmarks no run records as host-timed."""
    host_timed = {r["gate_id"] for run in history + recent for r in run if r["extra"].get("host_in_timing")}

    def gpu_timed(r):
        known = r["extra"].get("host_in_timing")
        return known is False or (known is None and r["gate_id"] not in host_timed)

    past = {}
    for run in history:
        for r in filter(gpu_timed, run):
            past.setdefault(r["gate_id"], []).append(r["seconds"])
    confirming = [{r["gate_id"]: r["seconds"] for r in filter(gpu_timed, run)} for run in recent[:-1]]
    out = []
    for r in recent[-1]:
        medians = past.get(r["gate_id"], [])
        if not gpu_timed(r) or len(medians) < MIN_RUNS:
            continue
        reference = statistics.median(medians)
        spread = MAD_TO_SIGMA * statistics.median(abs(m - reference) for m in medians) / reference
        threshold = max(min_change, NOISE_SIGMAS * spread)
        changes = [run[r["gate_id"]] / reference - 1 for run in confirming if r["gate_id"] in run]
        changes.append(r["seconds"] / reference - 1)
        if len(changes) == len(recent) and all(c > threshold for c in changes):
            verdict = "slower"
        elif len(changes) == len(recent) and all(c < -threshold for c in changes):
            verdict = "faster"
        else:
            verdict = "steady"
        out.append(Drift(r["gate_id"], reference, r["seconds"], changes[-1], threshold, len(medians), verdict))
    return out


def runs_of(latest):
    """The saved runs up to and including `latest` in its own folder and on its GPU, oldest first (by
    the time each run recorded)."""
    def when(path):
        return read_run(path).get("datetime", "")

    latest = Path(latest).resolve()
    newest, gpu = when(latest), load(latest)[0].get("gpu", {}).get("name")
    earlier = sorted((p for p in latest.parent.glob("[0-9][0-9][0-9][0-9]_*.json")
                      if p != latest and when(p) < newest and load(p)[0].get("gpu", {}).get("name") == gpu),
                     key=lambda p: (when(p), p.name))
    return earlier + [latest]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", help="a saved run (default: the newest of --gpu)")
    parser.add_argument("--gpu", help="without a run: the GPU's folder under .benchmarks/ whose newest run is judged "
                                      "(default: this machine's GPU; any GPU without one)")
    parser.add_argument("--history", type=positive_int, default=8, help="previous runs of the GPU to compare with")
    parser.add_argument("--min-change", type=float, default=0.05, help="smallest change called (0.05: 5%%)")
    parser.add_argument("--confirm", type=positive_int, default=2,
                        help="the newest runs that must all have moved beyond the threshold (1: the newest alone)")
    parser.add_argument("--fail", action="store_true", help="exit 1 when a benchmark is slower")
    args = parser.parse_args()
    if not 0 < args.min_change < 1:
        parser.error(f"--min-change {args.min_change}: must be in (0, 1)")
    if args.run and not Path(args.run).is_file():
        parser.error(f"run: no such file: {args.run}")
    if args.run and args.gpu:
        parser.error("give either a run or --gpu")
    try:
        latest = Path(args.run) if args.run else latest_of(args.gpu)[0][-1]
        mine = runs_of(latest)
        recent, history = mine[-args.confirm:], mine[:-args.confirm][-args.history:]
        recent_rows, history_rows = [load(p)[1] for p in recent], [load(p)[1] for p in history]
    except ReportError as exc:
        parser.error(str(exc))
    if len(recent) < args.confirm or len(history) < MIN_RUNS:  # nothing can be judged: say so, never "0 slower"
        print(f"{latest}: nothing judged: {len(mine)} saved runs of this GPU in {latest.resolve().parent}, "
              f"and a verdict needs {MIN_RUNS} earlier runs beside the newest {args.confirm} (--confirm)")
        sys.exit(2 if args.fail else 0)
    drifts = drift(recent_rows, history_rows, args.min_change)
    slower = sorted((d for d in drifts if d.verdict == "slower"), key=lambda d: -d.change)
    faster = sorted((d for d in drifts if d.verdict == "faster"), key=lambda d: d.change)
    print(f"{latest}: {len(drifts)} GPU-timed benchmarks against the median of {len(history)} earlier runs of this "
          f"GPU, called when the newest {len(recent)} moved alike; {len(slower)} slower, {len(faster)} faster")
    for d in slower + faster:
        print(f"  {d.verdict:6s} {100 * d.change:+6.1f}% (called beyond {100 * d.threshold:.1f}%)  "
              f"{1e6 * d.reference:,.1f} -> {1e6 * d.seconds:,.1f} us  {d.gate_id}  [{d.runs} runs]")
    if args.fail and slower:
        sys.exit(1)


if __name__ == "__main__":
    main()
