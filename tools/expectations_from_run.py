"""Derive expectations/<gpu>.json from saved runs instead of rerunning them on the GPU.

    python -m tools.expectations_from_run .benchmarks/b200/Linux-CPython-3.12-64bit/000[1-3]_*.json \
        --margin 0.15 [--allow-lower] [--commit HASH] [--metrics speedup_vs_paged_read ...]

Reads each benchmark's gate_id and gate metrics (expectations.METRICS, or only --metrics: a new
metric gated without touching the others) from extra_info, and writes floors exactly as
`pytest --expectations-update` would (host-dependent metrics, as the runs recorded them, with at least
expectations.HOST_MARGIN), with the run's machine info as provenance. Given several runs
of one GPU (several nights, say), each metric's floor is set below the lowest value any of them
measured: ratios that involve the host's speed (an eager loop, a pageable copy) moved by up to 1.8x
between processes on one H100 host, so one run's value is not a floor for them.
"""

import argparse
import datetime
import os

from suite.expectations import METRICS, hardware_key, update
from suite.options import fraction
from suite.perf import QUICK, SMOKE
from tools.report import ReportError, read_run

NOT_MEASUREMENTS = (QUICK, SMOKE)


def lowest(runs, metrics):
    """({gate_id: {metric: the lowest value the runs measured}}, {gate_id: metrics any run recorded as
    partly the host's speed}) over every benchmark with a gate_id."""
    measured, host_dependent = {}, {}
    for run in runs:
        for b in run["benchmarks"]:
            extra = b["extra_info"]
            if "gate_id" not in extra:
                continue
            entry = measured.setdefault(extra["gate_id"], {})
            for m in metrics:
                if extra.get(m) is not None:
                    entry[m] = min(entry.get(m, extra[m]), extra[m])
            # runs saved before host_dependent_metrics existed carry host_in_timing only
            host = extra.get("host_dependent_metrics", [m for m in metrics if extra.get("host_in_timing")])
            host_dependent.setdefault(extra["gate_id"], set()).update(host)
    return measured, host_dependent


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="run", help="pytest-benchmark JSONs (autosave or --benchmark-json) "
                        "of one GPU")
    parser.add_argument("--margin", type=float, default=0.10)
    parser.add_argument("--allow-lower", action="store_true")
    parser.add_argument("--commit", help="commit of the code that ran (when the run had no git)")
    parser.add_argument("--expectations-dir", default="expectations")
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS))
    args = parser.parse_args()
    if fraction(args.margin):
        parser.error(f"--margin {args.margin}: {fraction(args.margin)}")
    missing = [path for path in args.runs if not os.path.isfile(path)]
    if missing:
        parser.error(f"run: no such file: {', '.join(missing)}")
    try:
        runs = [read_run(path) for path in args.runs]
    except ReportError as exc:
        parser.error(str(exc))
    for path, run in zip(args.runs, runs):
        unfit = sorted({b["extra_info"].get("gate") for b in run["benchmarks"]} & set(NOT_MEASUREMENTS))
        if unfit:
            parser.error(f"run {path}: its benchmarks say {', '.join(map(repr, unfit))}: not a measurement to "
                         "derive floors from")
    keys = {path: hardware_key(run["machine_info"]["gpu"]["name"]) for path, run in zip(args.runs, runs)}
    if len(set(keys.values())) > 1:
        parser.error(f"runs: from different GPUs ({', '.join(f'{p}: {k}' for p, k in keys.items())}); "
                     "derive each GPU's file from its own runs")
    newest = max(range(len(runs)), key=lambda i: runs[i].get("datetime", ""))
    run, gpu = runs[newest], runs[newest]["machine_info"]["gpu"]
    measured, host_dependent = lowest(runs, args.metrics)
    commit = run.get("commit_info", {}).get("id")
    if commit and run["commit_info"].get("dirty"):  # as the plugin's provenance: not the commit as it ran
        commit += "-dirty"
    provenance = {"commit": args.commit or commit,
                  "date": run["datetime"][:10] if "datetime" in run else datetime.date.today().isoformat(),
                  "gpu": gpu["name"], "driver": gpu.get("driver"), "torch": gpu.get("torch"),
                  "triton": gpu.get("triton"), "run": args.runs[newest]}
    if len(runs) > 1:
        provenance["runs"] = f"the lowest of {len(runs)}: {', '.join(args.runs)}"
    path = update(args.expectations_dir, keys[args.runs[0]], measured, margin=args.margin,
                  provenance=provenance, allow_lower=args.allow_lower, host_dependent=host_dependent)
    print(f"{len(measured)} gates from {len(runs)} run(s) -> {path}")


if __name__ == "__main__":
    main()
