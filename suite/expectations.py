"""Regression gates keyed by hardware (SPEC 5).

A file `expectations/<key>.json` per GPU (key from the GPU name), `default.json` for the rest:

    {"gates": {"<workload>/<variant>/<layout>/<case>": {
        "speedup_vs_anchor": {"floor": 0.95, "measured": 1.07},
        "roofline_fraction": {"floor": 0.80, "measured": 0.91},
        "provenance": {"commit": ..., "date": ..., "gpu": ..., "driver": ..., "torch": ..., "triton": ...}},
      "<pattern with * or ?>": {"hw_skip_reason": "why this cannot run on this GPU"}}}

Every gate metric is a ratio where higher is better. An exact key wins; otherwise the longest
matching pattern (the most specific) does. A metric may be {"ungated": "why"} instead of a floor:
measured and reported, never gated, and left alone by an update (for a value the host sets, not
the code under test: a pageable copy's rate, say).
"""

import copy
import fnmatch
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

# speedup_vs_<baseline>: anchor (what users run instead), baseline (the workload's baseline variant),
# graphs (the CUDA-graph decode loop), bf16 (the same kernel on an unquantized cache), triton (the
# Triton counterpart of a native CUDA variant), flash / cudnn (an SDPA backend by name), paged_read (a bare
# read of the same pages), gathered_sdpa (SDPA with the pages gathered in every call)
METRICS = ("speedup_vs_anchor", "speedup_vs_baseline", "speedup_vs_graphs", "speedup_vs_bf16", "speedup_vs_triton",
           "speedup_vs_flash", "speedup_vs_cudnn", "speedup_vs_paged_read", "speedup_vs_gathered_sdpa",
           "roofline_fraction", "overlap_fraction")
ENTRY_KEYS = set(METRICS) | {"provenance", "hw_skip_reason"}
# (part of the device name, key), the more specific first. A board with another memory system or SM
# count is another key: its times differ (an H100 PCIe has 114 SMs and about 2 TB/s against the SXM's
# 132 and 3.35), and runs are saved and compared per key, so sharing one would compare a PCIe runner
# with SXM runs (refused: the names differ) instead of telling it to calibrate. GH200 and GB200 name
# their superchips' GPUs, which "H200" and "B200" would otherwise match.
KNOWN_GPUS = (("GB10", "gb10"), ("GB200", "gb200"), ("B200", "b200"), ("GH200", "gh200"), ("H200 NVL", "h200_nvl"),
              ("H200", "h200"), ("H100 NVL", "h100_nvl"), ("H100 PCIe", "h100_pcie"), ("H100", "h100"))
DEFAULT_KEY = "default"


class ExpectationsError(Exception):
    pass


def hardware_key(gpu_name: str) -> str:
    for marker, key in KNOWN_GPUS:
        if marker.lower() in gpu_name.lower():
            return key
    return re.sub(r"[^a-z0-9]+", "_", gpu_name.lower()).strip("_")


@dataclass
class Verdict:
    gate_id: str
    metric: str
    measured: float | None  # None: the benchmark no longer reports a metric its entry gates
    floor: float
    path: Path

    @property
    def ok(self):
        return self.measured is not None and self.measured >= self.floor

    def __str__(self):
        word = "ok" if self.ok else "FAILED"
        value = "not measured" if self.measured is None else f"measured {self.measured:.3f}"
        return f"gate {word}: {self.gate_id} {self.metric} {value}, floor {self.floor:.3f} ({self.path})"


def _read(path):
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExpectationsError(f"{path}: not valid JSON: {exc}") from exc
    _validate(path, data)
    return data


def _validate(path, data):
    if not isinstance(data, dict) or not isinstance(data.get("gates"), dict):
        raise ExpectationsError(f"{path}: key 'gates': expected an object of gate entries")
    for gate_id, entry in data["gates"].items():
        where = f"{path}: key 'gates.{gate_id}'"
        if not isinstance(entry, dict):
            raise ExpectationsError(f"{where}: expected an object")
        unknown = set(entry) - ENTRY_KEYS
        if unknown:
            raise ExpectationsError(f"{where}: unknown field(s) {sorted(unknown)}; allowed {sorted(ENTRY_KEYS)}")
        if "hw_skip_reason" in entry and not isinstance(entry["hw_skip_reason"], str):
            raise ExpectationsError(f"{where}.hw_skip_reason: expected a string")
        for metric in METRICS:
            if metric in entry and _is_ungated(entry[metric]):
                why = entry[metric]["ungated"]
                if not isinstance(why, str) or not why.strip() or "floor" in entry[metric]:
                    raise ExpectationsError(f"{where}.{metric}.ungated: expected a reason (a non-empty string) "
                                            f"and no floor, got {entry[metric]!r}")
            elif metric in entry:
                floor = entry[metric].get("floor") if isinstance(entry[metric], dict) else None
                if not isinstance(floor, (int, float)) or isinstance(floor, bool) or not math.isfinite(floor) \
                        or floor < 0:
                    raise ExpectationsError(f"{where}.{metric}.floor: expected a number >= 0, got {floor!r}")


def _is_ungated(metric_entry):
    return isinstance(metric_entry, dict) and "ungated" in metric_entry


class Expectations:
    def __init__(self, path: Path, key: str, gates: dict):
        self.path, self.key, self.gates = path, key, gates

    @classmethod
    def load(cls, directory, key):
        directory = Path(directory)
        path = directory / f"{key}.json"
        if not path.exists():
            path = directory / f"{DEFAULT_KEY}.json"
        if not path.exists():
            return cls(path, key, {})
        return cls(path, key, _read(path)["gates"])

    def entry(self, gate_id):
        if gate_id in self.gates:
            return self.gates[gate_id]
        matches = [pattern for pattern in self.gates if fnmatch.fnmatchcase(gate_id, pattern)]
        return self.gates[max(matches, key=len)] if matches else None

    def hw_skip_reason(self, gate_id):
        return (self.entry(gate_id) or {}).get("hw_skip_reason")

    def check(self, gate_id, measured: dict) -> list:
        entry = self.entry(gate_id) or {}
        return [Verdict(gate_id, m, measured.get(m), entry[m]["floor"], self.path)
                for m in METRICS if m in entry and not _is_ungated(entry[m])]

    def ungated(self, gate_id) -> list:
        """The metrics of gate_id's entry marked {"ungated": why}."""
        entry = self.entry(gate_id) or {}
        return [m for m in METRICS if _is_ungated(entry.get(m))]


# The margin at least, below a metric that is partly the host's speed (suite/perf.py: a host-timed
# benchmark's, or a speedup over a host-timed baseline). On H100 hosts such values moved by up to 2x:
# the eager decode loop's median 1.8x between processes of one host, pageable H2D 7.4-14.3 GB/s over
# 12 runs, and kv_locality's pinned speedup over pageable fell from 4.81x to 3.90x in the next process
# after a calibration. Half the measured value still fails what breaks the path (pinned memory gone
# pageable: a 4x drop).
HOST_MARGIN = 0.5


def _significant(value, digits):
    # significant digits, not decimals: a fraction of 0.0096 floored to 3 decimals moved by 10%
    return float(f"{value:.{digits}g}")


def update(directory, key, measured: dict, *, margin: float, provenance: dict, allow_lower=False,
           host_dependent=None) -> Path:
    """Write floors = measured * (1 - margin) into <directory>/<key>.json; host_dependent: {gate_id:
    metrics} whose floors take max(margin, HOST_MARGIN) and say so ("host_timed": true).

    An existing floor is never lowered unless allow_lower, a floor set by hand (its entry has a
    "why") and an ungated metric are left as they are, and a measurement of zero writes no floor.
    A gate that only a pattern covers gets its own entry (an exact key wins over the pattern) that
    starts as a copy of the pattern's, so the same rules hold for what the pattern set.
    The entry's provenance becomes this run's when any floor is written; a floor kept beside it
    then carries its own run's provenance. A GPU without its own file is gated by default.json: its
    file starts as a copy of that, so these rules hold for what was in force.
    Returns the path written.
    """
    path = Path(directory) / f"{key}.json"
    source = path if path.exists() else Path(directory) / f"{DEFAULT_KEY}.json"
    data = _read(source) if source.exists() else {"gates": {}}
    gates = data["gates"]
    for gate_id, metrics in sorted(measured.items()):
        if not any(m in METRICS and v is not None for m, v in metrics.items()):
            continue  # nothing to gate (e.g. a baseline variant)
        created = gate_id not in gates
        entry = gates.setdefault(gate_id, copy.deepcopy(Expectations(path, key, gates).entry(gate_id) or {}))
        written = set()
        for metric, value in metrics.items():
            if metric not in METRICS or value is None:
                continue
            if "why" in entry.get(metric, {}) or _is_ungated(entry.get(metric)):
                continue  # a deliberate floor or no gate, with its reason: an update does not override it
            if not math.isfinite(value):
                raise ExpectationsError(f"{gate_id} {metric}: measured {value}, no floor derives from it")
            host = metric in (host_dependent or {}).get(gate_id, ())
            used = max(margin, HOST_MARGIN) if host else margin
            floor = _significant(value * (1 - used), 4)
            if floor <= 0:
                continue  # a floor of zero cannot fail: nothing measured to hold
            old = entry.get(metric, {}).get("floor")
            if old is not None and floor < old and not allow_lower:
                continue  # keep the higher floor with the measurement it came from
            entry[metric] = {"floor": floor, "measured": _significant(value, 5), "margin": used} | (
                {"host_timed": True} if host else {})
            written.add(metric)
        if written:
            old = entry.get("provenance")
            for metric in set(METRICS) - written:  # a floor kept beside them keeps its own run's provenance
                kept = entry.get(metric)
                if old not in (None, provenance) and isinstance(kept, dict) and "floor" in kept:
                    kept.setdefault("provenance", old)
            entry["provenance"] = provenance
        if not entry or (created and not written):
            del gates[gate_id]  # no gate, or nothing beyond what the pattern already says
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path
