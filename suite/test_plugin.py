"""Tests of the suite's own plugin logic (SPEC 3, 4, 7): hardware markers, option validation, launch
counting, comparisons between runs, the hardware predicates and the hypothesis profiles. The perf
recorder and its end table are tested in test_perf.py, the gates' files in test_expectations.py."""

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import settings

from kernels import hw
from suite.expectations import hardware_key
from suite.plugin import device_name
from suite.test_expectations import GATE, SPEEDUP, write

REPO = Path(__file__).resolve().parents[1]


# --- the plugin end to end, in an inner pytest run (suite/conftest.py's `inner`) ---


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
    nvcc = shutil.which("nvcc")
    assert skipped.get("requires_nvcc") == (None if nvcc else "needs nvcc: nvcc not found on PATH")
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


def test_a_probe_that_fails_where_the_hardware_has_the_feature_fails_the_tests(inner, monkeypatch):
    # a broken fused FP8 kernel (or TMA build) on hardware that has the feature is a defect: the tests
    # that need it fail (an error at setup), naming the probe's error, and the rest still run
    inner.makepyfile("import pytest\n@pytest.mark.requires_fp8_fused\ndef test_x():\n    pass\n"
                     "def test_y():\n    pass\n")

    def broken():
        raise hw.ProbeFailed("the fused FP8 decode kernel failed on a GPU: RuntimeError: wrong values")

    monkeypatch.setitem(hw.PREDICATES, "requires_fp8_fused", (hw.PREDICATES["requires_fp8_fused"][0], broken))
    result = inner.runpytest("-p", "suite.plugin")
    result.assert_outcomes(errors=1, passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*requires_fp8_fused: the hardware has fused FP8 decode (sm_89+), but the fused "
                                 "FP8 decode kernel failed on a GPU: RuntimeError: wrong values*"])


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
    (["--expectations-allow-lower"], ["--expectations-allow-lower needs --expectations-update"]),
    (["--quick", "--expectations-update", "--benchmark-autosave"],
     ["--quick with --expectations-update and --benchmark-autosave: a quick look is not a measurement"]),
    (["--quick", "--benchmark-save=x"], ["--quick with --benchmark-save"]),
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
    assert "TMA_TILE_SIZE (the default of --tma-tile-size) '100': needs powers of two" in result.stderr.str()


def test_malformed_expectations_dir_is_a_usage_error(inner, tmp_path):
    path = write(tmp_path, "default", {GATE: {SPEEDUP: {"floor": "fast"}}})
    inner.makepyfile("def test_x():\n    pass\n")
    result = inner.runpytest("-p", "suite.plugin", "--expectations-dir", str(tmp_path))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert str(path) in err and f"'gates.{GATE}'.{SPEEDUP}.floor" in err and "'fast'" in err


def test_missing_expectations_dir_is_a_usage_error(inner, tmp_path):
    # A misspelt folder would otherwise gate nothing, or fail an --expectations-update run at its end.
    inner.makepyfile("def test_x():\n    pass\n")
    result = inner.runpytest("-p", "suite.plugin", "--expectations-dir", str(tmp_path / "expectatons"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"--expectations-dir '{tmp_path / 'expectatons'}': no such folder" in result.stderr.str()


# --- hardware predicates ---

def test_has_cuda():
    expected = ((True, f"CUDA device 0: {torch.cuda.get_device_name(0)}") if torch.cuda.is_available()
                else (False, "torch.cuda.is_available() is False"))
    assert hw.has_cuda() == expected


def test_numa_remote_counts_nodes_with_memory_and_cpus(tmp_path):
    ok, probed = hw.numa_remote()
    assert (ok and "NUMA nodes with memory and CPUs" in probed) or (not ok and "/sys/devices/system/node" in probed)
    # node1: CPUs, no memory; node3: memory, no CPUs (a Grace GPU's HBM, a CXL expander): no first touch there
    for node, cpus, kb in ((0, "0-3", 1000), (1, "4-7", 0), (3, "", 4096), (2, "8", 64)):
        (tmp_path / f"node{node}").mkdir()
        (tmp_path / f"node{node}" / "cpulist").write_text(cpus + "\n")
        (tmp_path / f"node{node}" / "meminfo").write_text(f"Node {node} MemTotal:  {kb} kB\nNode {node} MemFree: 5 kB")
        if node == 3:
            assert hw.numa_remote(tmp_path) == (False, f"{tmp_path} lists 1 NUMA node(s) with memory and CPUs")
    assert hw.numa_remote(tmp_path) == (True, "2 NUMA nodes with memory and CPUs")
    assert hw.placeable_nodes(tmp_path) == [0, 2]


def test_nvcc_found_on_path(tmp_path, monkeypatch):
    found = shutil.which("nvcc")
    assert hw.nvcc() == ((True, f"nvcc at {found}") if found else (False, "nvcc not found on PATH"))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert hw.nvcc() == (False, "nvcc not found on PATH")
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert hw.nvcc() == (True, f"nvcc at {fake}")


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


def test_benchmark_disable_runs_a_benchmark_once_and_skips_it(inner):
    # pytest-benchmark's --benchmark-disable keeps no stats: the launch runs once, then a skip says why.
    inner.makepyfile("""
        from suite.timing import run_benchmark

        CALLS = []

        def test_timed(benchmark):
            run_benchmark(benchmark, lambda: CALLS.append(1), device="cpu", rounds=5)

        def test_called_once():
            assert CALLS == [1]
    """)
    result = inner.runpytest("-p", "suite.plugin", "--benchmark-disable", "-rs")
    assert result.ret == 0, result.stdout.str()
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*--benchmark-disable: launched once after its correctness check*"])


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


HOST_AND_GPU_TIMED = """
    import os
    import time

    import pytest

    @pytest.mark.parametrize("host", [False, True], ids=["gpu", "host"])
    def test_timed(benchmark, host):
        benchmark.extra_info["host_in_timing"] = host  # as suite.timing.run_benchmark sets it
        benchmark.pedantic(time.sleep, args=(float(os.environ["SLEEP_S"]),), rounds=3)
"""


def test_compare_fail_holds_gpu_time_only(inner, tmp_path, monkeypatch):
    # Both benchmarks get 20x slower than the saved run: the GPU-timed one fails the comparison,
    # the host-timed one is listed at the end (suite/compare.py says why).
    inner.makepyfile(HOST_AND_GPU_TIMED)
    storage = f"--benchmark-storage=file://{tmp_path}"
    monkeypatch.setenv("SLEEP_S", "0.001")
    assert inner.runpytest_subprocess("-p", "suite.plugin", storage, "--benchmark-autosave").ret == 0
    monkeypatch.setenv("SLEEP_S", "0.02")
    result = inner.runpytest_subprocess("-p", "suite.plugin", storage, "--benchmark-compare",
                                        "--benchmark-compare-fail=median:10%")
    out = result.stdout.str() + result.stderr.str()
    assert result.ret != 0, out
    regressed = out.split("Performance has regressed")[1]  # pytest-benchmark's list: it fails the run
    listed = out.split("host time in the measurement: listed, not failed")[1].split("Performance has regressed")[0]
    assert "test_timed[gpu]" in regressed and "test_timed[host]" not in regressed
    assert "::test_timed[host]: Field 'median' has failed" in listed and "test_timed[gpu]:" not in listed


@pytest.mark.filterwarnings("ignore:Can't compare")  # pytest-benchmark's own warning, before the usage error
def test_compare_fail_without_a_saved_run_is_a_usage_error_at_the_start(inner, tmp_path):
    inner.makepyfile("def test_x():\n    raise AssertionError('ran')\n")
    result = inner.runpytest("-p", "suite.plugin", f"--benchmark-storage=file://{tmp_path}", "--benchmark-compare",
                             "--benchmark-compare-fail=median:10%")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "no saved run of this GPU to compare with" in result.stderr.str()
    assert "ran" not in result.stdout.str()


def test_compare_fail_without_compare_is_a_usage_error_naming_it(inner, tmp_path):
    inner.makepyfile("def test_x():\n    raise AssertionError('ran')\n")
    result = inner.runpytest("-p", "suite.plugin", f"--benchmark-storage=file://{tmp_path}",
                             "--benchmark-compare-fail=median:10%")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--benchmark-compare-fail needs --benchmark-compare" in result.stderr.str()
    assert "ran" not in result.stdout.str()


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


def test_an_inner_run_leaves_the_outer_runs_hypothesis_profile(inner):
    # the profile is the process's: an inner run that kept its own would set every later test's examples
    outer = settings.get_current_profile_name()
    unlike = "full" if outer != "full" else "minimal"  # the inner run loads "cpu" here, --profile's on a GPU
    settings.load_profile(unlike)
    try:
        inner.makepyfile("def test_x():\n    pass\n")
        result = inner.runpytest("-p", "suite.plugin", "--profile", "minimal" if unlike == "full" else "full")
        assert result.ret == 0, result.stdout.str()
        assert settings.get_current_profile_name() == unlike
    finally:
        settings.load_profile(outer)


def test_provenance_marks_uncommitted_code(tmp_path, monkeypatch):
    # floors measured on a dirty tree must not cite the commit as if it had run
    from suite import plugin
    monkeypatch.setattr(plugin, "gpu_info", lambda config: {"name": "GPU", "torch": "t", "triton": "t"})
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    (tmp_path / "a.py").write_text("x = 1\n")
    for args in (["init", "-q"], ["add", "a.py"], ["commit", "-qm", "a"]):
        subprocess.run(git + args, check=True)
    config = SimpleNamespace(rootpath=tmp_path)
    clean = plugin.provenance(config)["commit"]
    (tmp_path / "a.py").write_text("x = 2\n")
    assert not clean.endswith("-dirty") and plugin.provenance(config)["commit"] == f"{clean}-dirty"
