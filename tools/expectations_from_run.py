"""Derive expectations/<gpu>.json from a saved run instead of rerunning it on the GPU.

    python -m tools.expectations_from_run .benchmarks/h100/Linux-CPython-3.12-64bit/0002_*.json \
        --margin 0.15 [--allow-lower] [--commit HASH] [--metrics speedup_vs_paged_read ...]

Reads each benchmark's gate_id and gate metrics (expectations.METRICS, or only --metrics: a new
metric gated without touching the others) from extra_info, and writes floors exactly as
`pytest --expectations-update` would, with the run's machine info as provenance.
"""

import argparse
import datetime
import json

from suite.expectations import METRICS, hardware_key, update


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a pytest-benchmark JSON (autosave or --benchmark-json)")
    parser.add_argument("--margin", type=float, default=0.10)
    parser.add_argument("--allow-lower", action="store_true")
    parser.add_argument("--commit", help="commit of the code that ran (when the run had no git)")
    parser.add_argument("--expectations-dir", default="expectations")
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS))
    args = parser.parse_args()
    run = json.load(open(args.run))
    gpu = run["machine_info"]["gpu"]
    measured = {b["extra_info"]["gate_id"]: {m: b["extra_info"][m] for m in args.metrics if m in b["extra_info"]}
                for b in run["benchmarks"] if "gate_id" in b["extra_info"]}
    provenance = {"commit": args.commit or run["commit_info"].get("id"),
                  "date": run["datetime"][:10] if "datetime" in run else datetime.date.today().isoformat(),
                  "gpu": gpu["name"], "driver": gpu.get("driver"), "torch": gpu["torch"],
                  "triton": gpu["triton"], "run": args.run}
    path = update(args.expectations_dir, hardware_key(gpu["name"]), measured, margin=args.margin,
                  provenance=provenance, allow_lower=args.allow_lower)
    print(f"{len(measured)} gates from {args.run} -> {path}")


if __name__ == "__main__":
    main()
