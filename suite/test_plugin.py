"""Tests of the suite's own plugin logic (SPEC 3, 5, 7): hardware keys, expectations files and their
update, hardware markers, option validation, the perf recorder, and the hardware predicates."""

import glob
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import settings

from kernels import hw
from suite.expectations import Expectations, ExpectationsError, hardware_key, update
from suite.perf import PerfRecorder
from suite.plugin import device_name
from suite.roofline import Roofline

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]
GATE = "decode_attention/triton_split_kv/paged/B4"
PROV_A, PROV_B = {"commit": "aaa", "gpu": "NVIDIA H100 80GB HBM3"}, {"commit": "bbb", "gpu": "NVIDIA H100 80GB HBM3"}
SPEEDUP = "speedup_vs_anchor"


def write(directory, key, gates):
    path = directory / f"{key}.json"
    path.write_text(json.dumps({"gates": gates}))
    return path


def entry_of(path, gate=GATE):
    return json.loads(path.read_text())["gates"][gate]


class FakeBenchmark:  # all that PerfRecorder.record uses of pytest-benchmark's fixture
    def __init__(self):
        self.extra_info = {}


@pytest.mark.parametrize("name, key", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100"), ("NVIDIA H200", "h200"),
    ("NVIDIA B200", "b200"), ("NVIDIA GB10", "gb10"), ("NVIDIA A100-SXM4-80GB", "nvidia_a100_sxm4_80gb"),
    ("cpu", "cpu"), ("(Prototype) GPU-X!", "prototype_gpu_x")])
def test_hardware_key(name, key):
    assert hardware_key(name) == key


def test_load_picks_key_file_then_default_then_nothing(tmp_path):
    h100 = write(tmp_path, "h100", {GATE: {SPEEDUP: {"floor": 0.9}}})
    default = write(tmp_path, "default", {GATE: {SPEEDUP: {"floor": 0.5}}})
    exp = Expectations.load(tmp_path, "h100")
    assert exp.path == h100 and [(v.floor, v.ok) for v in exp.check(GATE, {SPEEDUP: 0.7})] == [(0.9, False)]
    exp = Expectations.load(tmp_path, "b200")
    assert exp.path == default and [(v.floor, v.ok) for v in exp.check(GATE, {SPEEDUP: 0.7})] == [(0.5, True)]
    assert Expectations.load(tmp_path / "missing", "h100").check(GATE, {SPEEDUP: 0.1}) == []


def test_exact_key_beats_pattern_and_hw_skip_reason(tmp_path):
    # The pattern comes first in the file: the exact key must still win.
    write(tmp_path, "gb10", {"decode_attention/*/paged/*": {"hw_skip_reason": "no paged decode on GB10"},
                             GATE: {SPEEDUP: {"floor": 1.2}}})
    exp = Expectations.load(tmp_path, "gb10")
    assert exp.hw_skip_reason(GATE) is None and [v.floor for v in exp.check(GATE, {SPEEDUP: 2})] == [1.2]
    assert exp.hw_skip_reason("decode_attention/sdpa/paged/B8") == "no paged decode on GB10"
    assert exp.hw_skip_reason("decode_attention/sdpa/contiguous/B8") is None


def test_check_verdicts_and_their_message(tmp_path):
    path = write(tmp_path, "h200", {GATE: {SPEEDUP: {"floor": 0.95, "measured": 1.07},
                                           "roofline_fraction": {"floor": 0.8, "measured": 0.91}}})
    exp = Expectations.load(tmp_path, "h200")
    verdicts = {v.metric: v for v in exp.check(GATE, {SPEEDUP: 0.95, "roofline_fraction": 0.5})}
    assert verdicts[SPEEDUP].ok is True and "FAILED" not in str(verdicts[SPEEDUP])  # at the floor passes
    assert verdicts["roofline_fraction"].ok is False
    for part in ("FAILED", GATE, "roofline_fraction", "0.500", "0.800", str(path)):
        assert part in str(verdicts["roofline_fraction"])
    # A metric not measured in this run (None or absent) is not gated.
    assert [v.metric for v in exp.check(GATE, {SPEEDUP: None, "roofline_fraction": 1})] == ["roofline_fraction"]


@pytest.mark.parametrize("text, names", [
    ("{not json", ["not valid JSON"]),
    (json.dumps({"gate": {}}), ["'gates'"]),
    (json.dumps({"gates": {GATE: {SPEEDUP: {"floor": "0.9"}}}}), [f"'gates.{GATE}'", f"{SPEEDUP}.floor", "'0.9'"]),
    (json.dumps({"gates": {GATE: {"speedup_vs_anchr": {"floor": 0.9}}}}), [f"'gates.{GATE}'", "speedup_vs_anchr"]),
    (json.dumps({"gates": {GATE: {"roofline_fraction": {"floor": -0.1}}}}), [f"'gates.{GATE}'", "fraction.floor"]),
    ('{"gates": {"%s": {"roofline_fraction": {"floor": NaN}}}}' % GATE, [f"'gates.{GATE}'"]),
    (json.dumps({"gates": {GATE: {SPEEDUP: {"ungated": ""}}}}), [f"'gates.{GATE}'", f"{SPEEDUP}.ungated"]),
    (json.dumps({"gates": {GATE: {SPEEDUP: {"ungated": "host", "floor": 1.0}}}}), [f"{SPEEDUP}.ungated", "no floor"]),
], ids=["not-json", "no-gates", "string-floor", "unknown-field", "negative-floor", "nan-floor", "ungated-no-reason",
        "ungated-with-floor"])
def test_malformed_expectations_name_file_and_key(tmp_path, text, names):
    path = tmp_path / "h100.json"
    path.write_text(text)
    with pytest.raises(ExpectationsError) as info:
        Expectations.load(tmp_path, "h100")
    assert [part for part in [str(path)] + names if part not in str(info.value)] == []


def test_update_writes_floor_with_margin_and_provenance(tmp_path):
    path = update(tmp_path, "b200", {GATE: {SPEEDUP: 1.2, "roofline_fraction": 0.9, "gpu_time_s": 3e-5}},
                  margin=0.1, provenance=PROV_A)
    entry = entry_of(path)
    assert path == tmp_path / "b200.json" and entry["roofline_fraction"]["floor"] == pytest.approx(0.81)
    assert (entry[SPEEDUP]["floor"], entry[SPEEDUP]["measured"]) == pytest.approx((1.08, 1.2))
    assert entry["provenance"] == PROV_A and "gpu_time_s" not in entry
    # What update writes, load reads back as a gate.
    assert [v.ok for v in Expectations.load(tmp_path, "b200").check(GATE, {SPEEDUP: 1.07})] == [False]


def test_update_never_lowers_a_floor_unless_asked(tmp_path):
    def floor(value, **kw):
        path = update(tmp_path, "gb10", {GATE: {SPEEDUP: value}}, margin=0.0, provenance=PROV_A, **kw)
        return entry_of(path)[SPEEDUP]["floor"]
    assert (floor(1.0), floor(0.5), floor(0.5, allow_lower=True), floor(2.0)) == (1.0, 1.0, 0.5, 2.0)


def test_update_writes_no_floor_that_cannot_fail(tmp_path):
    # An overlap measured as 0 would make a floor of 0, which every run passes: no gate.
    entry = entry_of(update(tmp_path, "h100", {GATE: {SPEEDUP: 1.0, "overlap_fraction": 0.0}}, margin=0.1,
                            provenance=PROV_A))
    assert SPEEDUP in entry and "overlap_fraction" not in entry
    path = update(tmp_path, "h100", {"b/none": {"overlap_fraction": 0.0}}, margin=0.1, provenance=PROV_A)
    assert "b/none" not in json.loads(path.read_text())["gates"]


def test_update_keeps_the_measured_value_and_provenance_of_a_kept_floor(tmp_path):
    update(tmp_path, "h100", {GATE: {SPEEDUP: 1.0}}, margin=0.0, provenance=PROV_A)
    entry = entry_of(update(tmp_path, "h100", {GATE: {SPEEDUP: 0.5}}, margin=0.0, provenance=PROV_B))
    assert entry[SPEEDUP]["floor"] == 1.0
    assert (entry[SPEEDUP]["measured"], entry["provenance"]) == (1.0, PROV_A)


def test_update_gives_a_floor_kept_beside_a_new_one_its_own_provenance(tmp_path):
    update(tmp_path, "h100", {GATE: {SPEEDUP: 1.0}}, margin=0.0, provenance=PROV_A)
    entry = entry_of(update(tmp_path, "h100", {GATE: {SPEEDUP: 0.5, "roofline_fraction": 0.9}}, margin=0.0,
                            provenance=PROV_B))
    assert entry["provenance"] == PROV_B and "provenance" not in entry["roofline_fraction"]
    assert (entry[SPEEDUP]["floor"], entry[SPEEDUP]["provenance"]) == (1.0, PROV_A)
    verdicts = Expectations.load(tmp_path, "h100").check(GATE, {SPEEDUP: 0.99, "roofline_fraction": 0.95})
    assert [(v.metric, v.ok) for v in verdicts] == [(SPEEDUP, False), ("roofline_fraction", True)]


def test_update_leaves_a_floor_set_by_hand(tmp_path):
    path = tmp_path / "h100.json"
    hand = {"floor": 4.0, "measured": 8.0, "margin": 0.15, "why": "the baseline is host-bound"}
    path.write_text(json.dumps({"gates": {GATE: {SPEEDUP: hand}}}))
    update(tmp_path, "h100", {GATE: {SPEEDUP: 9.0}}, margin=0.1, provenance=PROV_A)
    assert entry_of(path)[SPEEDUP] == hand


def test_an_ungated_metric_is_recorded_not_gated_and_kept_by_update(tmp_path):
    ungated = {"ungated": "pageable H2D is host-bound"}
    path = write(tmp_path, "h100", {GATE: {"roofline_fraction": ungated, SPEEDUP: {"floor": 2.0}}})
    exp = Expectations.load(tmp_path, "h100")
    assert [v.metric for v in exp.check(GATE, {"roofline_fraction": 0.01, SPEEDUP: 3.0})] == [SPEEDUP]
    assert exp.ungated(GATE) == ["roofline_fraction"] and exp.ungated("other/gate") == []
    update(tmp_path, "h100", {GATE: {"roofline_fraction": 0.9, SPEEDUP: 3.0}}, margin=0.0, provenance=PROV_A)
    assert entry_of(path)["roofline_fraction"] == ungated and entry_of(path)[SPEEDUP]["floor"] == 3.0


@pytest.mark.parametrize("text", [
    json.dumps({"gates": {GATE: {"floor": 1.0}}}),
    "{not json",
], ids=["unknown-field", "not-json"])
def test_update_refuses_a_malformed_existing_file_naming_it(tmp_path, text):
    path = tmp_path / "h100.json"
    path.write_text(text)
    with pytest.raises(ExpectationsError, match="h100.json"):
        update(tmp_path, "h100", {GATE: {SPEEDUP: 2.0}}, margin=0.1, provenance=PROV_A)
    assert path.read_text() == text


# --- the plugin end to end, in an inner pytest run with the repository's own pytest.ini ---

@pytest.fixture
def inner(pytester):
    pytester.syspathinsert(REPO)
    pytester.makefile(".ini", pytest=(REPO / "pytest.ini").read_text())
    return pytester


def test_hardware_markers_skip_naming_feature_and_probe(inner):
    inner.makepyfile(test_hw="import pytest\n" + "".join(
        f"@pytest.mark.{marker}\ndef test_{marker}():\n    pass\n" for marker in hw.PREDICATES))
    result = inner.runpytest("-rs", "--strict-markers", "-p", "suite.plugin")
    reports = [r for r in result.reprec.getreports("pytest_runtest_logreport") if r.when == "setup" and r.skipped]
    skipped = {r.nodeid.split("::test_")[1]: r.longrepr[2].removeprefix("Skipped: ") for r in reports}
    if not torch.cuda.is_available():
        no_cuda = "torch.cuda.is_available() is False"
        assert skipped["requires_cuda"] == f"needs a CUDA device: {no_cuda}"
        assert skipped["requires_tma"] == f"needs TMA (sm_90+ and a TMA probe kernel): {no_cuda}"
        assert "requires_fp8_fused" not in skipped, skipped  # the fused FP8 kernel runs in the interpreter
        assert skipped["requires_multi_gpu"] == "needs two GPUs with peer access: torch.cuda.device_count() == 0"
        result.stdout.fnmatch_lines(["SKIPPED [[]1[]] test_hw.py:*: needs a CUDA device: " + no_cuda])
    numa_ok, numa_probe = hw.numa_remote()
    assert skipped.get("requires_numa_remote") == (None if numa_ok else f"needs a remote NUMA node: {numa_probe}")
    assert "requires_nvcc" not in skipped  # nvcc is on PATH here
    assert result.ret == 0 and result.parseoutcomes()["passed"] == len(hw.PREDICATES) - len(skipped)


def test_require_fused_fp8_aborts_instead_of_skipping(inner, monkeypatch):
    inner.makepyfile("import pytest\n@pytest.mark.requires_fp8_fused\ndef test_x():\n    pass\n")
    missing = lambda: (False, "compute capability (8, 0) < (8, 9)")  # noqa: E731
    monkeypatch.setattr(hw, "fp8_fused_ready", missing)
    monkeypatch.setitem(hw.PREDICATES, "requires_fp8_fused", (hw.PREDICATES["requires_fp8_fused"][0], missing))
    skipped = inner.runpytest("-p", "suite.plugin", "-rs")
    assert skipped.ret == 0 and skipped.parseoutcomes()["skipped"] == 1
    result = inner.runpytest("-p", "suite.plugin", "--require-fused-fp8")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--require-fused-fp8: fused FP8 decode is missing: compute capability (8, 0)*"])


@pytest.mark.parametrize("args", [
    ["--strict-markers"],
    [],
], ids=["flag", "pytest.ini"])
def test_strict_markers_reject_an_unknown_marker(inner, args):
    inner.makepyfile("import pytest\n@pytest.mark.requires_warp_drive\ndef test_x():\n    pass\n")
    result = inner.runpytest("-p", "suite.plugin", *args)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*'requires_warp_drive' not found in `markers` configuration option*"])


@pytest.mark.parametrize("args, parts", [
    (["--page-size", "0"], ["--page-size 0: must be > 0"]),
    (["--page-size", "-16"], ["--page-size -16: must be > 0"]),
    (["--expectations-margin", "1.5"], ["--expectations-margin 1.5: must be in [0, 1)"]),
    (["--profile", "huge"], ["--profile", "invalid choice: 'huge'", "minimal", "full"]),
    (["--kv-layout", "diagonal"], ["--kv-layout", "invalid choice: 'diagonal'", "both", "contiguous", "paged"]),
    (["--tier", "huge"], ["--tier", "invalid choice: 'huge'", "small", "medium", "large"]),
    (["--quantization", "int2"], ["--quantization", "invalid choice: 'int2'", "none", "int8", "int4", "fp8"]),
    (["--backend", "cutlass"], ["--backend", "invalid choice: 'cutlass'", "triton", "graphs", "cuda"]),
    (["--graph-mode", "half"], ["--graph-mode", "invalid choice: 'half'", "full", "piecewise", "full_and_piecewise"]),
    (["--block-k", "48"], ["--block-k 48: must be a power of two >= 16"]),
    (["--block-k", "8"], ["--block-k 8: must be a power of two >= 16"]),
    (["--num-programs", "-1"], ["--num-programs -1: must be > 0"]),
    (["--max-capture", "0"], ["--max-capture 0: must be > 0"]),
    (["--rows", "0"], ["--rows 0: must be > 0"]),
    (["--iters", "-5"], ["--iters -5: must be > 0"]),
    (["--tma-tile-size", "96x64"], ["--tma-tile-size '96x64': needs powers of two >= 16"]),
    (["--tma-tile-size", "32x64"], ["--tma-tile-size '32x64': needs powers of two >= 16 with BLOCK_M a multiple"]),
    (["--tma-tile-size", "big"], ["--tma-tile-size 'big': must be BLOCK_MxBLOCK_N"]),
    (["--page-cache", "lukewarm"], ["--page-cache", "invalid choice: 'lukewarm'", "warm", "cold"]),
])
def test_bad_options_are_usage_errors(inner, args, parts):
    inner.makepyfile("def test_x():\n    pass\n")
    result = inner.runpytest("-p", "suite.plugin", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert [part for part in parts if part not in result.stderr.str()] == []


def test_good_options_reach_the_tests(inner):
    inner.makepyfile(f"""
        def test_options(pytestconfig, profile):
            assert profile == "full" and pytestconfig.getoption("expectations_margin") == 0.0
            assert pytestconfig.getoption("page_size") == 32 and pytestconfig.getoption("kv_layout") == "paged"
            assert pytestconfig.getoption("benchmark_storage") == "file://./.benchmarks/{hardware_key(device_name())}"
            assert (pytestconfig.getoption("tier"), pytestconfig.getoption("quantization")) == ("large", "int4")
            assert (pytestconfig.getoption("block_k"), pytestconfig.getoption("num_programs")) == (32, 100)
            assert pytestconfig.getoption("quick") and pytestconfig.getoption("graph_mode") == "piecewise"
            assert pytestconfig.getoption("tma_tile_size") == "128x32" and pytestconfig.getoption("validate")
            assert pytestconfig.getoption("page_cache") == "cold"
    """)
    result = inner.runpytest("-p", "suite.plugin", "--profile", "full", "--page-size", "32",
                             "--kv-layout", "paged", "--expectations-margin", "0", "--tier", "large",
                             "--quantization", "int4", "--block-k", "32", "--num-programs", "100", "--quick",
                             "--graph-mode", "piecewise", "--tma-tile-size", "128x32", "--validate",
                             "--page-cache", "cold")
    assert result.ret == 0, result.stdout.str()


def test_a_bad_tma_tile_size_env_var_is_a_usage_error(inner, monkeypatch):
    monkeypatch.setenv("TMA_TILE_SIZE", "100")  # read when the options are defined: a fresh process
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # this checkout's suite, whatever is installed
    inner.makepyfile("def test_x():\n    pass\n")
    result = inner.runpytest_subprocess("-p", "suite.plugin")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--tma-tile-size '100': needs powers of two" in result.stderr.str()


def test_malformed_expectations_dir_is_a_usage_error(inner, tmp_path):
    path = write(tmp_path, "default", {GATE: {SPEEDUP: {"floor": "fast"}}})
    inner.makepyfile("def test_x():\n    pass\n")
    result = inner.runpytest("-p", "suite.plugin", "--expectations-dir", str(tmp_path))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert str(path) in err and f"'gates.{GATE}'.{SPEEDUP}.floor" in err and "'fast'" in err


# --- the perf recorder ---

def gated(tmp_path):
    write(tmp_path, "h100", {GATE: {SPEEDUP: {"floor": 1.5}},
                             "decode_attention/*/contiguous/*": {"hw_skip_reason": "no contiguous here"}})
    return Expectations.load(tmp_path, "h100")


def test_perf_record_on_cpu_is_a_smoke_run_with_a_table(tmp_path):
    rec = PerfRecorder("cpu", gated(tmp_path), updating=False)
    assert rec.table() == []
    try:  # hw_skip_reason is about GPUs: without one, nothing is N/A
        rec.skip_if_not_applicable("decode_attention/sdpa/contiguous/B4")
    except pytest.skip.Exception as exc:
        pytest.fail(f"skipped without a GPU: {exc}")
    bench = FakeBenchmark()
    rec.record(bench, GATE, 2e-3, shape={"B": 4}, bytes_moved=4e6, baseline_seconds=2.4e-3)  # 1.2x < floor 1.5
    extra = bench.extra_info
    assert (extra["bytes_moved"], extra["gate"], extra["shape"]) == (4e6, "smoke (no GPU)", {"B": 4})
    assert extra["achieved_gbps"] == pytest.approx(2.0) and "roofline_fraction" not in extra and rec.measured == {}
    header, row = rec.table()
    assert header.split()[:2] == ["workload/variant/layout/case", "host"] and len(header) == len(row)
    assert header.index("gate") == row.index("smoke (no GPU)")
    assert row.startswith(GATE) and "2,000.0" in row and "2 GB/s" in row and "1.20x" in row


def test_staged_h2d_is_bound_by_the_slower_stage():
    roof = Roofline(copy_gbps=2000.0, read_gbps=1000.0, matmul_tflops=500.0, h2d_gbps=50.0,
                    h2d_pageable_gbps=15.0, host_copy_gbps=20.0)
    assert roof.ceiling("staged_h2d") == 20.0 and roof.ceiling("h2d_pageable") == 15.0
    assert Roofline(**{**roof.__dict__, "host_copy_gbps": 80.0}).ceiling("staged_h2d") == 50.0


def gpu_recorder(tmp_path, updating):
    # The GPU path without a GPU: a cuda device object and a roofline given instead of calibrated.
    rec = PerfRecorder("cuda", gated(tmp_path), updating=updating)
    rec._roofline = Roofline(copy_gbps=2000.0, read_gbps=1000.0, matmul_tflops=500.0, h2d_gbps=50.0,
                             h2d_pageable_gbps=15.0, host_copy_gbps=20.0)
    return rec


def test_perf_gate_failure_names_gate_measured_floor_and_file_unless_updating(tmp_path):
    rec, bench = gpu_recorder(tmp_path, updating=False), FakeBenchmark()
    with pytest.raises(pytest.fail.Exception) as info:
        rec.record(bench, GATE, 1e-3, shape={}, bytes_moved=5e8, baseline_seconds=1.2e-3)
    for part in (GATE, SPEEDUP, "1.200", "1.500", str(tmp_path / "h100.json")):
        assert part in str(info.value)
    assert bench.extra_info["gate"] == "FAIL" and bench.extra_info["roofline_fraction"] == pytest.approx(0.5)
    with pytest.raises(pytest.skip.Exception, match="no contiguous here"):
        rec.skip_if_not_applicable("decode_attention/sdpa/contiguous/B4")
    assert [r.verdict for r in rec.rows] == ["FAIL", "N/A: no contiguous here"]
    assert "50%" in rec.table()[1] and "GPU us" in rec.table()[0]
    # With --expectations-update the same run is recorded for the file instead of failing.
    rec, bench = gpu_recorder(tmp_path, updating=True), FakeBenchmark()
    rec.record(bench, GATE, 1e-3, shape={}, bytes_moved=5e8, baseline_seconds=1.2e-3)
    assert bench.extra_info["gate"] == "recorded"
    assert rec.measured[GATE] == pytest.approx({"roofline_fraction": 0.5, SPEEDUP: 1.2})


def test_perf_table_names_an_ungated_metric(tmp_path):
    rec, bench = gpu_recorder(tmp_path, updating=False), FakeBenchmark()
    write(tmp_path, "h100", {GATE: {"roofline_fraction": {"ungated": "host-bound"}}})
    rec.expectations = Expectations.load(tmp_path, "h100")
    rec.record(bench, GATE, 1e-3, shape={}, bytes_moved=1e3)  # 1 MB/s: far below any roofline, and no failure
    assert bench.extra_info["gate"] == "no gate (roofline_fraction ungated: h100.json)"


def test_perf_record_speedup_only_on_gpu(tmp_path):
    rec, bench = gpu_recorder(tmp_path, updating=True), FakeBenchmark()
    rec.record(bench, GATE, 1e-3, shape={}, baseline_seconds=2e-3)
    assert bench.extra_info[SPEEDUP] == pytest.approx(2.0)


# --- hardware predicates ---

def test_has_cuda():
    expected = ((True, f"CUDA device 0: {torch.cuda.get_device_name(0)}") if torch.cuda.is_available()
                else (False, "torch.cuda.is_available() is False"))
    assert hw.has_cuda() == expected


def test_numa_remote_counts_nodes_with_memory(tmp_path, monkeypatch):
    ok, probed = hw.numa_remote()
    assert (ok and "NUMA nodes with memory" in probed) or (not ok and "/sys/devices/system/node" in probed)
    monkeypatch.setattr(hw, "glob", SimpleNamespace(
        glob=lambda pattern: glob.glob(pattern.replace("/sys/devices/system/node", str(tmp_path)))))
    for node, kb in ((0, 1000), (1, 0), (2, 64)):  # node1: a memoryless node (CPUs only)
        (tmp_path / f"node{node}").mkdir()
        (tmp_path / f"node{node}" / "meminfo").write_text(f"Node {node} MemTotal:  {kb} kB\nNode {node} MemFree: 5 kB")
        if node == 1:
            assert hw.numa_remote() == (False, "/sys/devices/system/node lists 1 NUMA node(s) with memory")
    assert hw.numa_remote() == (True, "2 NUMA nodes with memory")


def test_nvcc_found_on_path(tmp_path, monkeypatch):
    assert hw.nvcc() == (True, f"nvcc at {shutil.which('nvcc')}")  # this machine has one
    monkeypatch.setenv("PATH", str(tmp_path))
    assert hw.nvcc() == (False, "nvcc not found on PATH")
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert hw.nvcc() == (True, f"nvcc at {fake}")


def test_the_most_specific_pattern_wins(tmp_path):
    general = {"roofline_fraction": {"floor": 0.5}}
    specific = {"roofline_fraction": {"floor": 0.5}, SPEEDUP: {"floor": 1.0}}
    (tmp_path / "default.json").write_text(json.dumps({"gates": {
        "decode_attention/triton_*/*/B64-*": general, "decode_attention/triton_persistent/*/B64-*-var": specific}}))
    exp = Expectations.load(tmp_path, "b200")
    assert exp.entry("decode_attention/triton_persistent/paged/B64-L4096-var") == specific
    assert exp.entry("decode_attention/triton_split_kv/paged/B64-L4096-var") == general
    assert exp.entry("decode_attention/triton_split_kv/paged/B4-L4096-var") is None


def test_expectations_from_a_saved_run(tmp_path, monkeypatch):
    # The committed H100 calibration run turns into gates for h100, floors = measured * (1 - margin).
    from tools import expectations_from_run
    run = sorted((REPO / ".benchmarks" / "h100").glob("*/0002_*.json"))[-1]
    monkeypatch.setattr("sys.argv", ["x", str(run), "--margin", "0.2", "--expectations-dir", str(tmp_path)])
    expectations_from_run.main()
    exp = Expectations.load(tmp_path, "h100")
    saved = {b["extra_info"]["gate_id"]: b["extra_info"] for b in json.loads(run.read_text())["benchmarks"]}
    assert set(exp.gates) == set(saved)
    gate = "decode_attention/triton_persistent/contiguous/B64-L4096-var"
    assert exp.gates[gate][SPEEDUP]["floor"] == pytest.approx(0.8 * saved[gate][SPEEDUP], abs=1e-3)
    assert exp.gates[gate]["provenance"]["gpu"] == "NVIDIA H100 80GB HBM3"


def test_expectations_from_a_saved_run_for_named_metrics_only(tmp_path, monkeypatch):
    from tools import expectations_from_run
    run = sorted((REPO / ".benchmarks" / "h100").glob("*/0002_*.json"))[-1]
    monkeypatch.setattr("sys.argv", ["x", str(run), "--expectations-dir", str(tmp_path), "--metrics", SPEEDUP])
    expectations_from_run.main()
    gates = Expectations.load(tmp_path, "h100").gates
    assert gates and all(set(entry) == {SPEEDUP, "provenance"} for entry in gates.values())


def test_perf_flags_noisy_rounds(tmp_path):
    rec, bench = gpu_recorder(tmp_path, updating=False), FakeBenchmark()
    bench.extra_info["iqr_over_median"] = 0.3
    with pytest.raises(pytest.fail.Exception, match="noisy"):
        rec.record(bench, GATE, 1e-3, shape={}, bytes_moved=5e8, baseline_seconds=1e-4)
    assert "noisy: IQR 30% of median" in bench.extra_info["gate"]


@pytest.mark.requires_cuda
def test_feature_probes_pass_where_the_hardware_has_the_feature():
    # On sm_90+ the TMA probe kernel must compile and run; on sm_89+ the fused FP8 decode kernel.
    capability = torch.cuda.get_device_capability(0)
    assert hw.tma_ready()[0] == (capability >= (9, 0)), hw.tma_ready()[1]
    assert hw.fp8_fused_ready()[0] == (capability >= (8, 9)), hw.fp8_fused_ready()[1]


def test_runs_from_different_gpus_are_not_compared():
    from suite import plugin
    ours = {"gpu": {"name": "NVIDIA H100 80GB HBM3"}}
    plugin.pytest_benchmark_compare_machine_info(None, None, ours, {"machine_info": ours})
    with pytest.raises(pytest.UsageError, match="'NVIDIA B200'.*'NVIDIA H100 80GB HBM3'"):
        plugin.pytest_benchmark_compare_machine_info(None, None, ours, {"machine_info": {"gpu": {"name": "NVIDIA B200"}}})


def test_launches_are_counted_after_every_timing_and_saved_with_the_run(inner, tmp_path):
    # the count happens at the session's end, yet reaches the JSON pytest-benchmark saves
    inner.makepyfile("""
        import suite.perf

        COUNTED = []
        suite.perf.count_launches = lambda launch, before: COUNTED.append(launch) or (10, 14)

        def test_loop(benchmark, perf):
            benchmark(lambda: None)
            perf.count_launches_later(benchmark, "the loop", None, steps=2)
            assert COUNTED == []  # not while timing may still follow
    """)
    out = tmp_path / "run.json"
    result = inner.runpytest("-p", "suite.plugin", f"--benchmark-json={out}")
    assert result.ret == 0, result.stdout.str()
    (saved,) = json.loads(out.read_text())["benchmarks"]
    assert (saved["extra_info"]["launch_calls_per_step"], saved["extra_info"]["gpu_work_items_per_step"]) == (5, 7)


def test_a_launch_count_that_raises_is_reported_and_the_run_still_saved(inner, tmp_path):
    # a failed test's launches are not counted; a count that raises reaches extra_info and the summary
    inner.makepyfile("""
        import suite.perf

        def count(launch, before):
            raise RuntimeError(f"{launch} broke")

        suite.perf.count_launches = count

        def test_counted(benchmark, perf):
            benchmark(lambda: None)
            perf.count_launches_later(benchmark, "the loop", None, steps=2)

        def test_failed(benchmark, perf):
            benchmark(lambda: None)
            perf.count_launches_later(benchmark, "the failed loop", None, steps=2)
            assert False
    """)
    out = tmp_path / "run.json"
    result = inner.runpytest("-p", "suite.plugin", f"--benchmark-json={out}")
    assert result.ret == 1, result.stdout.str()
    result.stdout.fnmatch_lines(["*launch counts that failed*", "*::test_counted: RuntimeError: the loop broke"])
    assert "the failed loop broke" not in result.stdout.str()
    saved = {b["name"]: b["extra_info"] for b in json.loads(out.read_text())["benchmarks"]}
    assert saved["test_counted"]["launch_count_error"] == "RuntimeError: the loop broke"
    assert "launch_count_error" not in saved["test_failed"]


def test_the_end_says_where_the_time_went(inner):
    inner.makepyfile(test_slow="import time\ndef test_a():\n    time.sleep(0.3)\n",
                     test_fast="def test_b():\n    pass\n")
    result = inner.runpytest("-p", "suite.plugin")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["time by test file, * s in all; slowest: test_slow.py 0.[3-9] s, test_fast.py 0.[0-2] s"])


def test_the_end_says_how_much_of_it_was_triton_jit(inner, monkeypatch):
    # the hooks Triton calls around building a specialization, called here as Triton would; this
    # session's own hooks are set aside, so the simulated builds are not counted here too
    from triton import knobs
    for hook in ("jit_cache_hook", "jit_post_compile_hook"):
        monkeypatch.setattr(knobs.runtime, hook, None)
    inner.makepyfile(test_jit="""
        import time
        from triton import knobs

        def build():
            assert not knobs.runtime.jit_cache_hook(key="k", repr="r")  # a true result would skip the build
            time.sleep(0.2)
            knobs.runtime.jit_post_compile_hook(key="k", repr="r")

        def test_two_builds():
            build()
            build()
    """, test_none="def test_b():\n    pass\n")
    result = inner.runpytest("-p", "suite.plugin")
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(["time by test file, * s in all (Triton JIT 0.[4-9] s, 2 builds); slowest: "
                                 "test_jit.py 0.[4-9] s (Triton JIT 0.[4-9] s, 2 builds), test_none.py 0.[0-2] s",
                                 "most Triton JIT by test: test_jit.py::test_two_builds 0.[4-9] s (2 builds)"])
    assert knobs.runtime.jit_cache_hook is None and knobs.runtime.jit_post_compile_hook is None  # put back


def test_minimal_profile_draws_the_same_shapes_every_run():
    # Same examples every night: a runner's Triton disk cache then serves the minimal run's builds.
    assert settings.get_profile("minimal").derandomize
    assert not settings.get_profile("full").derandomize
    assert not settings.get_profile("cpu").derandomize
    assert settings.get_profile("minimal").max_examples < settings.get_profile("full").max_examples
