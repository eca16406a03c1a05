"""The `perf` fixture's recorder: metrics into extra_info, gates, baselines, the end-of-run table."""

import math
from dataclasses import dataclass

import pytest
import torch

from suite import roofline
from suite.expectations import Expectations
from suite.timing import count_launches

SMOKE = "smoke (no GPU)"  # verdicts of measurements that are not gated and calibrate nothing
QUICK = "quick: not gated"
NOISY = 0.10  # interquartile range over median above which a measurement is flagged
# A passing gate within this factor of its floor is flagged in the table: the next few percent of
# drift fail it. Run 0009 let a 10% regression of the native decode loop through (the compare
# threshold is 10%, the floors 85% of a calibration), leaving its gate 2% above the floor.
NEAR_FLOOR = 1.05


@dataclass
class Row:
    gate_id: str
    seconds: float
    throughput: str
    roofline_pct: str
    speedup: str
    verdict: str


class PerfRecorder:
    def __init__(self, device, expectations: Expectations, updating: bool, quick=False):
        self.device = torch.device(device)
        self.expectations = expectations
        self.updating = updating
        self.quick = quick  # --quick: shorter loops than the gates were calibrated on, so nothing is gated
        self.rows = []
        self.measured = {}  # gate_id -> metrics, for --expectations-update
        self.host_dependent = {}  # gate_id -> its metrics that are partly the host's speed
        self.baselines = {}  # (workload, case) -> seconds
        self._roofline = None
        self.update_path = None  # set when --expectations-update wrote a file
        self.artifacts = []  # (what, path) of files a benchmark kept with the run: printed at the end
        self.launch_counts = []  # (benchmark, launch, before, steps): counted when every timing is done
        self.failed = set()  # node ids of failed tests: their launches are not counted
        self.count_errors = []  # (test, error) of launch counts that raised

    @property
    def on_gpu(self):
        return self.device.type == "cuda"

    def roofline(self):
        """Calibrated on first use, once per session; None without a GPU."""
        if self._roofline is None and self.on_gpu:
            self._roofline = roofline.calibrate(self.device)
        return self._roofline

    def skip_if_not_applicable(self, gate_id):
        reason = self.expectations.hw_skip_reason(gate_id) if self.on_gpu else None
        if reason:
            self.rows.append(Row(gate_id, float("nan"), "", "", "", f"N/A: {reason}"))
            pytest.skip(f"N/A on this GPU ({self.expectations.path}): {reason}")

    def count_launches_later(self, benchmark, launch, before, steps):
        """Launches per step into the benchmark's extra_info, counted at the session's end: counting
        profiles, and after a profile every later launch of the process is slower (an eager decode
        loop's TPOT rose 0.52 -> 0.78 ms on an H100), which must not reach any timing."""
        self.launch_counts.append((benchmark, launch, before, steps))

    def count_deferred_launches(self):
        """Counts for the tests that passed. A count that raises is reported, not raised: the run
        must still be saved. After a CUDA error the context is lost, so the rest go uncounted."""
        pending, self.launch_counts = self.launch_counts, []
        lost = None
        for benchmark, launch, before, steps in pending:
            if benchmark.fullname in self.failed:
                continue
            error = lost
            if lost is None:
                try:
                    calls, work = count_launches(launch, before)
                except Exception as exc:  # reported in extra_info and the summary; the run is still saved
                    error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                    if isinstance(exc, torch.AcceleratorError):
                        lost = f"not counted: an earlier count lost the CUDA context ({error})"
                else:
                    benchmark.extra_info.update(launch_calls_per_step=calls / steps,
                                                gpu_work_items_per_step=work / steps)
                    continue
            benchmark.extra_info["launch_count_error"] = error
            self.count_errors.append((benchmark.fullname, error))

    def set_baseline(self, workload, case, seconds):
        self.baselines[(workload, case)] = seconds

    def baseline(self, workload, case, measure):
        """Seconds of the workload's baseline at `case`: recorded by its own benchmark, or measured now."""
        key = (workload, case)
        if key not in self.baselines:
            self.baselines[key] = measure()
        return self.baselines[key]

    def record(self, benchmark, gate_id, seconds, *, shape, bytes_moved=None, flops=None,
               roofline_kind="read", baseline_seconds=None, speedups=None, rate=None, metrics=None):
        """baseline_seconds: the anchor's time; speedups: {name: seconds} of other baselines,
        recorded as speedup_vs_<name> (see expectations.METRICS); rate: the table's achieved
        column when the headline metric is neither GB/s nor TFLOP/s (e.g. TPOT); metrics: other
        gated metrics measured by the benchmark itself (e.g. overlap_fraction)."""
        extra = benchmark.extra_info
        extra.update(shape=shape, gpu_time_s=seconds, gate_id=gate_id, **(metrics or {}))
        metrics, throughput, pct, speedup, achieved = dict(metrics or {}), "", "", "", None
        if bytes_moved is not None:
            achieved = bytes_moved / seconds / 1e9
            extra.update(bytes_moved=bytes_moved, achieved_gbps=achieved)
            throughput = f"{achieved:,.0f} GB/s"
        if flops is not None:
            achieved = flops / seconds / 1e12
            extra.update(flops=flops, achieved_tflops=achieved)
            throughput = f"{achieved:,.1f} TFLOP/s"
        if rate is not None:
            throughput = rate
        roof = self.roofline()
        if roof is not None and achieved is not None:
            fraction = achieved / roof.ceiling(roofline_kind)
            extra.update(roofline=roof.as_dict(), roofline_kind=roofline_kind, roofline_fraction=fraction)
            metrics["roofline_fraction"] = fraction
            pct = f"{100 * fraction:.0f}%"
        speedups = ({"anchor": baseline_seconds} if baseline_seconds is not None else {}) | (speedups or {})
        for name, base in speedups.items():
            metrics[f"speedup_vs_{name}"] = extra[f"speedup_vs_{name}"] = base / seconds
        speedup = " ".join(f"{base / seconds:.2f}x" + ("" if name == "anchor" else f" vs {name}")
                           for name, base in speedups.items())

        # Partly the host's speed: every metric of a host-timed benchmark, and a speedup over a baseline
        # whose own measurement was host-timed (suite.timing.Seconds)
        host_timed = bool(extra.get("host_in_timing"))
        host_baselines = {f"speedup_vs_{name}" for name, base in speedups.items()
                          if getattr(base, "host_in_timing", False)}
        host_dependent = sorted(m for m in metrics if host_timed or m in host_baselines)
        extra["host_dependent_metrics"] = host_dependent
        broken = {m: v for m, v in metrics.items() if v is not None and not math.isfinite(v)}
        if broken:  # neither a gate's measurement nor a floor's: the measuring itself went wrong
            raise ValueError(f"{gate_id}: metrics that are not finite numbers: {broken}")
        verdicts = self.expectations.check(gate_id, metrics) if self.on_gpu and not self.quick else []
        failed = [v for v in verdicts if not v.ok]
        if self.updating and self.on_gpu:
            self.measured[gate_id] = metrics
            self.host_dependent[gate_id] = set(host_dependent)
            verdict = "recorded"
        elif not self.on_gpu:
            verdict = SMOKE
        elif self.quick:
            verdict = QUICK
        elif not verdicts:
            verdict = "no gate"
        else:
            verdict = "FAIL" if failed else "pass"
            near = [v for v in verdicts if v.ok and v.measured < NEAR_FLOOR * v.floor]
            if near and not failed:
                verdict += f" (near floor: {', '.join(f'{v.metric} {v.measured:.4g} vs {v.floor:.4g}' for v in near)})"
        ungated = self.expectations.ungated(gate_id) if self.on_gpu and not self.updating else []
        if ungated:
            verdict += f" ({', '.join(ungated)} ungated: {self.expectations.path.name})"
        spread = extra.get("iqr_over_median", 0.0)
        if spread > NOISY:
            verdict += f" (noisy: IQR {100 * spread:.0f}% of median)"
        if host_timed:
            verdict += " (host-timed)"
        elif host_dependent:
            verdict += " (host-timed baseline)"
        extra["gate"] = verdict
        self.rows.append(Row(gate_id, seconds, throughput, pct, speedup, verdict))
        if failed and not self.updating:
            hint = [f"the rounds were noisy (IQR {100 * spread:.0f}% of the median): rerun before believing it"] \
                if spread > NOISY else []
            pytest.fail("\n".join([str(v) for v in failed] + hint), pytrace=False)

    def below_floors_in_force(self):
        """Under --expectations-update: the gates this run measured below the floor in force, which the
        update keeps unless allowed to lower it (the next plain run then fails them)."""
        return [v for gate_id, metrics in sorted(self.measured.items())
                for v in self.expectations.check(gate_id, metrics) if not v.ok]

    def table(self):
        if not self.rows:
            return []
        unit = "GPU us" if self.on_gpu else "host us"
        header = ("workload/variant/layout/case", unit, "achieved", "% roofline", "speedup", "gate")
        cells = [header] + [(r.gate_id, f"{r.seconds * 1e6:,.1f}", r.throughput, r.roofline_pct, r.speedup,
                             r.verdict) for r in self.rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
        return ["  ".join(c.ljust(w) if i in (0, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                for row in cells]
