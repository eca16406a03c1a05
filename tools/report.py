"""A run report: one folder with a self-contained HTML page and its PNG charts, from a saved run
(pytest-benchmark's autosave or --benchmark-json).

    python -m tools.report RUN.json [--compare BASE.json] --out report/
    python -m tools.report --latest [--compare-previous] --out report/   # newest run under .benchmarks/

Charts: per workload, each benchmark's GPU time and speedup vs its baseline; achieved GB/s and
TFLOP/s against the rooflines measured in that session; decode TPOT per tier x KV format; the
stream-priority timelines the run kept; with a second run, the change of every benchmark both
have, marked where it exceeds the run-to-run noise. Each chart function returns the data it drew.
"""

import argparse
import base64
import html
import json
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen first: no display)

ROW_INCHES = 0.16  # height per benchmark row
NOISE_FLOOR = 0.02  # changes under 2% are never called, however quiet the rounds
SPEEDUP_PREFERENCE = ("speedup_vs_baseline", "speedup_vs_anchor", "speedup_vs_bf16", "speedup_vs_graphs")
TRIALS = "partial"  # .benchmarks/<gpu>/partial/: single-workload runs and trials, never a night's run


class ReportError(Exception):
    pass


def read_run(path):
    """A saved run's JSON, with what the tools read of it: ReportError naming the file otherwise."""
    try:
        run = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: not a saved run: not valid JSON ({exc})") from exc
    if not isinstance(run, dict) or not isinstance(run.get("benchmarks"), list) or not run["benchmarks"]:
        raise ReportError(f"{path}: not a saved run: no list of benchmarks")
    if not isinstance(run.get("machine_info", {}).get("gpu", {}).get("name"), str):
        raise ReportError(f"{path}: not a saved run of this suite: machine_info has no gpu name")
    for b in run["benchmarks"]:
        if not isinstance(b, dict) or not all(isinstance(b.get("stats", {}).get(s), (int, float))
                                              for s in ("median", "iqr")):
            raise ReportError(f"{path}: benchmark {b.get('name') if isinstance(b, dict) else b!r} has no "
                              "stats median and iqr")
    return run


def load(path):
    """(machine info, [benchmark rows]) of a saved run; a row: gate_id, workload, seconds, iqr,
    extra_info. A benchmark saved without a gate_id (its test failed after timing) goes by its name."""
    run = read_run(path)
    rows = []
    for b in run["benchmarks"]:
        extra = b.get("extra_info", {})
        gate_id = extra.get("gate_id", b["name"])
        rows.append(dict(gate_id=gate_id, workload=gate_id.split("/")[0], seconds=b["stats"]["median"],
                         iqr=b["stats"]["iqr"], extra=extra))
    return run.get("machine_info", {}), rows


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def workload_chart(rows, workload, path, clock="GPU time"):
    """GPU time (log) and speedup vs baseline per benchmark of one workload. Returns
    [(gate_id, seconds, speedup or None)] in drawing order."""
    mine = [r for r in rows if r["workload"] == workload]
    drawn = []
    for r in mine:
        name = next((m for m in SPEEDUP_PREFERENCE if m in r["extra"]), None)
        drawn.append((r["gate_id"], r["seconds"], r["extra"][name] if name else None))
    labels = [g.split("/", 1)[-1] for g, _, _ in drawn]
    fig, (left, right) = plt.subplots(1, 2, sharey=True, figsize=(13, 1.5 + ROW_INCHES * len(drawn)))
    y = range(len(drawn))
    left.barh(y, [1e6 * s for _, s, _ in drawn])
    left.set_xscale("log")
    left.set_xlabel(f"{clock}, us (median)")
    left.set_yticks(y, labels, fontsize=6)
    left.invert_yaxis()
    right.barh(y, [s or 0.0 for _, _, s in drawn], color=["tab:green" if (s or 0) >= 1 else "tab:red" for _, _, s in drawn])
    right.axvline(1.0, color="black", linewidth=0.8)
    right.set_xlabel("speedup vs baseline (baseline, anchor, bf16 or graphs)")
    fig.suptitle(workload)
    _save(fig, path)
    return drawn


def roofline_chart(machine, rows, path):
    """Achieved GB/s (memory-bound benchmarks) and TFLOP/s (compute-bound) against the session's
    rooflines. Returns {"gbps": [(gate_id, bytes, GB/s)], "tflops": [...], "roofline": {...}}."""
    roof = machine.get("gpu", {}).get("roofline") or next(
        (r["extra"]["roofline"] for r in rows if "roofline" in r["extra"]), {})
    gbps = [(r["gate_id"], r["extra"]["bytes_moved"], r["extra"]["achieved_gbps"]) for r in rows
            if "achieved_gbps" in r["extra"]]
    tflops = [(r["gate_id"], r["extra"]["flops"], r["extra"]["achieved_tflops"]) for r in rows
              if "achieved_tflops" in r["extra"]]
    fig, (mem, comp) = plt.subplots(1, 2, figsize=(13, 5))
    for ax, points, unit, ceilings in ((mem, gbps, "GB/s", ("read_gbps", "copy_gbps", "h2d_gbps")),
                                       (comp, tflops, "TFLOP/s", ("matmul_tflops",))):
        for workload in sorted({g.split("/")[0] for g, _, _ in points}):
            mine = [(x, v) for g, x, v in points if g.split("/")[0] == workload]
            ax.scatter([x for x, _ in mine], [v for _, v in mine], s=10, label=workload)
        for i, name in enumerate(n for n in ceilings if n in roof):
            ax.axhline(roof[name], linestyle="--", linewidth=1, color="gray")
            ax.annotate(f"{name} {roof[name]:,.0f}", (0.01 + 0.33 * i, roof[name]), xycoords=("axes fraction", "data"),
                        fontsize=8, va="bottom")
        if not points:
            ax.text(0.5, 0.5, f"no benchmark reports {unit} in this run", transform=ax.transAxes, ha="center")
        ax.set_xscale("log")
        ax.set_xlabel("bytes moved" if unit == "GB/s" else "FLOPs")
        ax.set_ylabel(f"achieved {unit}")
        if points:
            ax.legend(fontsize=7)
    fig.suptitle("achieved vs the rooflines measured in this session")
    _save(fig, path)
    return {"gbps": gbps, "tflops": tflops, "roofline": roof}


def tpot_chart(rows, path):
    """Decode TPOT per tier, one bar per loop (decode_loop variants, right_sized_decode backend x
    KV format). Returns {tier: [(label, tpot_ms)]}."""
    tiers = {}
    for r in rows:
        if "tpot_ms" not in r["extra"]:
            continue
        shape = r["extra"].get("shape", {})
        label = r["gate_id"].split("/")[1] if r["workload"] != "right_sized_decode" else \
            f"{shape.get('backend')}-{shape.get('quantization')}"
        tiers.setdefault(shape.get("tier", "?"), []).append((label, r["extra"]["tpot_ms"]))
    fig, axes = plt.subplots(1, max(1, len(tiers)), figsize=(5 * max(1, len(tiers)), 5), squeeze=False)
    for ax, (tier, bars) in zip(axes[0], sorted(tiers.items())):
        ax.barh(range(len(bars)), [v for _, v in bars])
        ax.set_yticks(range(len(bars)), [label for label, _ in bars], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("TPOT, ms")
        ax.set_title(tier)
    fig.suptitle("decode TPOT per tier x KV format")
    _save(fig, path)
    return tiers


class Change(NamedTuple):
    label: str  # gate_id, with " (host-timed)" where the benchmark times the host too
    base_seconds: float
    seconds: float
    change: float  # seconds / base_seconds - 1
    noise: float
    verdict: str


def compare(base_rows, rows):
    """A Change for every benchmark in both runs. noise is the larger relative IQR of the two, at
    least NOISE_FLOOR; a change beyond it is 'slower' or 'faster', else 'within noise'. A benchmark
    that times the host too (extra_info host_in_timing, suite/compare.py) is labelled so after its
    gate_id: its changes are the host's."""
    base = {r["gate_id"]: r for r in base_rows}
    out = []
    for r in rows:
        b = base.get(r["gate_id"])
        if b is None:
            continue
        change = r["seconds"] / b["seconds"] - 1
        noise = max(r["iqr"] / r["seconds"], b["iqr"] / b["seconds"], NOISE_FLOOR)
        verdict = "within noise" if abs(change) <= noise else ("slower" if change > 0 else "faster")
        label = r["gate_id"] + (" (host-timed)" if r.get("extra", {}).get("host_in_timing") else "")
        out.append(Change(label, b["seconds"], r["seconds"], change, noise, verdict))
    return out


def compare_chart(changes, path, clock="GPU time"):
    colors = {"slower": "tab:red", "faster": "tab:green", "within noise": "lightgray"}
    fig, ax = plt.subplots(figsize=(10, 1.5 + ROW_INCHES * len(changes)))
    y = range(len(changes))
    ax.barh(y, [100 * c.change for c in changes], color=[colors[c.verdict] for c in changes])
    ax.errorbar([0] * len(changes), y, xerr=[100 * c.noise for c in changes], fmt="none", ecolor="gray",
                linewidth=0.6)
    ax.set_yticks(y, [c.label for c in changes], fontsize=6)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(f"{clock} change, % (gray whiskers: the run-to-run noise)")
    ax.set_title("this run vs the base run")
    _save(fig, path)
    return changes


def _img(path):
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(Path(path).name)}">'


def build(run_path, out_dir, base_path=None):
    """Write out_dir/index.html and its PNGs; returns {chart file: the data it drew}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine, rows = load(run_path)
    drawn, sections = {}, []
    gpu = machine.get("gpu", {})
    # a run without a GPU is a smoke run timed by the host clock (suite.timing.run_benchmark)
    clock = "GPU time" if gpu.get("name", "cpu") != "cpu" else "host time (smoke run, no GPU)"
    for workload in sorted({r["workload"] for r in rows}):
        name = f"workload_{workload}.png"
        drawn[name] = workload_chart(rows, workload, out / name, clock)
        sections.append((f"{workload}: {clock} and speedup", name))
    drawn["roofline.png"] = roofline_chart(machine, rows, out / "roofline.png")
    sections.append(("Achieved vs roofline", "roofline.png"))
    drawn["tpot.png"] = tpot_chart(rows, out / "tpot.png")
    sections.append(("Decode TPOT per tier x KV format", "tpot.png"))
    for r in rows:
        timeline = r["extra"].get("timeline_png")
        if timeline and Path(timeline).exists():
            sections.append((f"Timeline: {r['gate_id']}", str(Path(timeline).resolve())))
    changes = []
    if base_path:
        base_machine, base_rows = load(base_path)
        base_gpu = base_machine.get("gpu", {}).get("name")
        if base_gpu != gpu.get("name"):
            raise ReportError(f"{run_path} ran on {gpu.get('name')!r}, {base_path} on {base_gpu!r}: runs of "
                              f"different GPUs are not compared")
        changes = compare(base_rows, rows)
        drawn["compare.png"] = compare_chart(changes, out / "compare.png", clock)
        sections.append((f"Compared with {Path(base_path).name}", "compare.png"))
    body = [f"<h1>Kernel suite run: {html.escape(Path(run_path).name)}</h1>",
            f"<p>{html.escape(gpu.get('name', 'unknown GPU'))}, torch {html.escape(str(gpu.get('torch')))}, "
            f"triton {html.escape(str(gpu.get('triton')))}, rooflines {html.escape(json.dumps(gpu.get('roofline')))}; "
            f"{len(rows)} benchmarks.</p>"]
    for title, png in sections:
        body.append(f"<h2>{html.escape(title)}</h2>{_img(png if Path(png).is_absolute() else out / png)}")
    if changes:
        flagged = sum(c.verdict != "within noise" for c in changes)
        ordered = sorted(changes, key=lambda c: (c.verdict == "within noise", -abs(c.change)))  # flagged first
        body.append(f"<h2>Side by side: {flagged} of {len(changes)} changed beyond noise</h2><table>"
                    "<tr><th>benchmark</th><th>base, us</th><th>this run, us</th><th>change</th><th>noise</th>"
                    "<th>verdict</th></tr>" +
                    "".join(f"<tr><td>{html.escape(c.label)}</td><td>{1e6 * c.base_seconds:,.1f}</td>"
                            f"<td>{1e6 * c.seconds:,.1f}</td><td>{100 * c.change:+.1f}%</td><td>{100 * c.noise:.1f}%</td>"
                            f"<td>{c.verdict}</td></tr>" for c in ordered) + "</table>")
    (out / "index.html").write_text("<!doctype html><meta charset='utf-8'><title>kernel suite report</title>"
                                    "<style>img{max-width:100%}td,th{padding:2px 8px}</style>" + "".join(body))
    return drawn


def saved_runs(root=".benchmarks", gpu=None):
    """Saved runs under root (autosave's <gpu>/<machine>/NNNN_*.json, trials left out), of one GPU's
    folder when gpu is given, oldest first by the time each run recorded (a fresh checkout gives every
    file the same mtime)."""
    found = Path(root).glob(f"{gpu or '*'}/*/[0-9][0-9][0-9][0-9]_*.json")
    return sorted((p for p in found if p.parent.name != TRIALS),
                  key=lambda p: (read_run(p).get("datetime", ""), p.name))


def this_gpu():
    """The folder this machine's GPU saves its runs under (suite/plugin.py), None without a GPU."""
    import torch

    from suite.expectations import hardware_key

    return hardware_key(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None


def latest_of(gpu):
    """(gpu's saved runs, oldest first; what --latest names) with gpu None for this machine's GPU, or
    every GPU's runs without one. Raises ReportError when there is none."""
    gpu = gpu or this_gpu()
    runs = saved_runs(gpu=gpu)
    if not runs:
        where = f".benchmarks/{gpu}/ (this machine's GPU; --gpu names another)" if gpu else ".benchmarks/"
        raise ReportError(f"no saved run under {where}")
    return runs, f"the newest saved run of {gpu}" if gpu else "the newest saved run of any GPU"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", help="a saved run (JSON)")
    parser.add_argument("--latest", action="store_true",
                        help="the newest saved run of --gpu (by default this machine's GPU; any GPU without one)")
    parser.add_argument("--gpu", help="with --latest: the GPU's folder under .benchmarks/ (h100, h200, b200, ...)")
    parser.add_argument("--compare", help="a second run to compare with")
    parser.add_argument("--compare-previous", action="store_true", help="with --latest: the run saved before it")
    parser.add_argument("--out", default="report")
    args = parser.parse_args()
    if args.latest == bool(args.run):
        parser.error("give either a run or --latest")
    if args.compare_previous and (not args.latest or args.compare):
        parser.error("--compare-previous goes with --latest and without --compare")
    if args.gpu and not args.latest:
        parser.error("--gpu goes with --latest")
    for flag, path in (("run", args.run), ("--compare", args.compare)):
        if path and not Path(path).is_file():
            parser.error(f"{flag}: no such file: {path}")
    base = args.compare
    if args.latest:
        try:
            runs, which = latest_of(args.gpu)
        except ReportError as exc:
            parser.error(f"--latest: {exc}")
        args.run = runs[-1]
        print(f"--latest: {args.run}, {which}")
        same_gpu = [r for r in runs[:-1] if r.parent == args.run.parent]
        if args.compare_previous:
            if same_gpu:
                base = same_gpu[-1]
            else:
                print(f"--compare-previous: no run of this GPU saved before {args.run}: nothing to compare")
    try:
        build(args.run, args.out, base)
    except ReportError as exc:
        parser.error(str(exc))
    print(f"report: {Path(args.out) / 'index.html'}")


if __name__ == "__main__":
    main()
