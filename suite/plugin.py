"""The suite's pytest plugin: options, hardware markers, machine info, gates and the end table."""

import datetime
import shutil
import subprocess
import time

import pytest
import torch
import triton
from hypothesis import HealthCheck, settings
from triton import knobs

from kernels import hw
from suite import compare, options
from suite.expectations import Expectations, ExpectationsError, hardware_key, update
from suite.perf import PerfRecorder

DEFAULT_STORAGE = "file://./.benchmarks"
# max_examples per hypothesis test. On a GPU nearly every example draws a new specialization of
# each kernel it runs (dtype, head dim, group, page size, ...): about a second of Triton JIT per
# kernel, which is most of the minimal profile's time from a cold cache (run 0011: 228 of 359 s).
HYPOTHESIS_PROFILES = {"cpu": 25, "minimal": 3, "full": 200}
ROUNDS = {"minimal": 30, "full": 200}
QUICK_ROUNDS = 10
RECORDER = pytest.StashKey[PerfRecorder]()
EXEMPTED = pytest.StashKey[list]()  # (test, failed check) of host-timed benchmarks: suite/compare.py
FILE_TIMER = "kernel-suite-file-timer"
SLOWEST_FILES = 12
MOST_JIT_TESTS = 10
CLOCK_BEFORE = pytest.StashKey[str]()
PROBE_FAILED = pytest.StashKey[str]()  # on an item whose feature's probe failed where the hardware has it
PROFILE_BEFORE = pytest.StashKey[str]()

# minimal draws the same examples every run (derandomize), so a runner's Triton disk cache serves
# its builds from the second night on; full and the CPU run keep exploring new shapes.
for _name, _examples in HYPOTHESIS_PROFILES.items():
    settings.register_profile(_name, max_examples=_examples, deadline=None, derandomize=_name == "minimal",
                              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def device_name():
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def nvidia_smi(field):
    """field of the GPU torch benchmarks (its device 0), named by UUID: nvidia-smi's own numbering
    ignores CUDA_VISIBLE_DEVICES and torch's order."""
    if shutil.which("nvidia-smi") is None:
        return "unavailable (no nvidia-smi)"
    gpu = f"GPU-{torch.cuda.get_device_properties(0).uuid}"
    result = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits", "-i", gpu],
                            capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else f"unavailable ({result.stderr.strip()})"


def expectations_dir(config):
    return config.rootpath / config.getoption("expectations_dir")  # absolute paths stay absolute


def pytest_addoption(parser):
    options.add_options(parser)


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark opens its storage
def pytest_configure(config):
    options.validate(config)
    key = hardware_key(device_name())
    # Saved runs live per GPU, so --benchmark-compare only ever finds runs from this kind of GPU.
    if config.getoption("benchmark_storage") == DEFAULT_STORAGE:
        config.option.benchmark_storage = f"{DEFAULT_STORAGE}/{key}"
    on_gpu = torch.cuda.is_available()
    config.stash[PROFILE_BEFORE] = settings.get_current_profile_name()
    settings.load_profile(config.getoption("profile") if on_gpu else "cpu")
    given = config.getoption("expectations_dir")
    if given != options.EXPECTATIONS_DIR and not expectations_dir(config).is_dir():
        # else every gate would silently fall away (no file: no gates), or an update would fail at the end;
        # the default is the repository's own folder (absent only in the plugin's inner test runs)
        raise pytest.UsageError(f"--expectations-dir {given!r}: no such folder ({expectations_dir(config)})")
    try:
        expectations = Expectations.load(expectations_dir(config), key)
    except ExpectationsError as exc:
        raise pytest.UsageError(str(exc)) from exc
    config.stash[RECORDER] = PerfRecorder("cuda" if on_gpu else "cpu", expectations,
                                          config.getoption("expectations_update"), config.getoption("quick"))
    config.stash[CLOCK_BEFORE] = nvidia_smi("clocks.sm") if on_gpu else "n/a"
    config.pluginmanager.register(FileTimer(), FILE_TIMER)


def pytest_unconfigure(config):
    # hypothesis' profile is the process's: an inner pytest run (the plugin's own tests) would otherwise
    # leave every later test of the outer run on its profile (a full run went on with minimal's examples)
    profile = config.stash.get(PROFILE_BEFORE, None)
    if profile is not None:
        settings.load_profile(profile)


class FileTimer:
    """Seconds per test file (setup, call and teardown) and, of them, Triton's JIT: the kernel
    specializations built (or loaded from Triton's disk cache) and their seconds. Where a
    profile's time goes (SPEC: the minimal profile well under 10 minutes on one H100), printed at
    the end, with the tests that built the most. The JIT is timed between Triton's jit_cache_hook
    (a specialization missing from the process's cache) and its jit_post_compile_hook."""

    def __init__(self):
        self.seconds, self.jit_seconds, self.jit_builds = {}, {}, {}
        self.test_jit = {}  # nodeid: [seconds, builds]
        self.path, self.nodeid, self._jit_start = None, None, None
        self._hooks = (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = self._jit_begins, self._jit_ends

    def _jit_begins(self, **kwargs):
        self._jit_start = time.perf_counter()
        before = self._hooks[0]
        return before(**kwargs) if before else None  # a true result would skip the build

    def _jit_ends(self, **kwargs):
        if self._jit_start is not None and self.path is not None:
            seconds = time.perf_counter() - self._jit_start
            self.jit_seconds[self.path] = self.jit_seconds.get(self.path, 0.0) + seconds
            self.jit_builds[self.path] = self.jit_builds.get(self.path, 0) + 1
            test = self.test_jit.setdefault(self.nodeid, [0.0, 0])
            test[0] += seconds
            test[1] += 1
        self._jit_start = None
        if self._hooks[1]:
            self._hooks[1](**kwargs)

    def pytest_runtest_logstart(self, nodeid):
        self.path, self.nodeid = nodeid.split("::")[0], nodeid

    def pytest_runtest_logreport(self, report):
        path = report.nodeid.split("::")[0]
        self.seconds[path] = self.seconds.get(path, 0.0) + report.duration

    def pytest_unconfigure(self):
        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = self._hooks

    def _jit(self, path=None):
        builds = sum(self.jit_builds.values()) if path is None else self.jit_builds.get(path, 0)
        if not builds:
            return ""
        seconds = sum(self.jit_seconds.values()) if path is None else self.jit_seconds[path]
        return f" (Triton JIT {seconds:.1f} s, {builds} build{'s' * (builds > 1)})"

    def pytest_terminal_summary(self, terminalreporter):
        slowest = sorted(self.seconds.items(), key=lambda kv: -kv[1])[:SLOWEST_FILES]
        if slowest:
            terminalreporter.write_line(f"time by test file, {sum(self.seconds.values()):.0f} s in all{self._jit()}; "
                                        "slowest: " + ", ".join(f"{path} {s:.1f} s{self._jit(path)}"
                                                                for path, s in slowest))
        most = sorted(self.test_jit.items(), key=lambda kv: -kv[1][0])[:MOST_JIT_TESTS]
        if most:
            terminalreporter.write_line("most Triton JIT by test: " + ", ".join(
                f"{nodeid} {s:.1f} s ({n} build{'s' * (n > 1)})" for nodeid, (s, n) in most))


def pytest_collection_modifyitems(config, items):
    if config.getoption("require_fused_fp8"):  # asked for explicitly: abort rather than skip
        try:
            ok, probed = hw.fp8_fused_ready()
        except hw.ProbeFailed as exc:
            ok, probed = False, str(exc)
        if not ok:
            raise pytest.UsageError(f"--require-fused-fp8: fused FP8 decode is missing: {probed}")
    for item in items:
        for marker, (feature, predicate) in hw.PREDICATES.items():
            if item.get_closest_marker(marker):
                try:
                    ok, probed = predicate()
                except hw.ProbeFailed as exc:  # the hardware has the feature: a defect, so a failure
                    item.stash[PROBE_FAILED] = f"{marker}: the hardware has {feature}, but {exc}"
                    continue
                if not ok:
                    item.add_marker(pytest.mark.skip(reason=f"needs {feature}: {probed}"))


def pytest_runtest_setup(item):
    if PROBE_FAILED in item.stash:
        pytest.fail(item.stash[PROBE_FAILED], pytrace=False)


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def perf(pytestconfig):
    return pytestconfig.stash[RECORDER]


@pytest.fixture(scope="session")
def profile(pytestconfig):
    return pytestconfig.getoption("profile")


@pytest.fixture(scope="session")
def rounds(profile, pytestconfig):
    return QUICK_ROUNDS if pytestconfig.getoption("quick") else ROUNDS[profile]


def gpu_info(config):
    info = {"name": device_name(), "hardware_key": hardware_key(device_name()),
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "numa_nodes_with_memory": hw.numa_nodes_with_memory()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        recorder = config.stash[RECORDER]
        info.update(capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                    l2_mib=props.L2_cache_size / 2**20, driver=nvidia_smi("driver_version"),
                    sm_clock_mhz_before=config.stash[CLOCK_BEFORE], sm_clock_mhz_after=nvidia_smi("clocks.sm"),
                    roofline=recorder._roofline.as_dict() if recorder._roofline else None)
    return info


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["gpu"] = gpu_info(config)


def pytest_benchmark_compare_machine_info(config, benchmarksession, machine_info, compared_benchmark):
    saved = compared_benchmark["machine_info"].get("gpu", {}).get("name")
    if saved != machine_info["gpu"]["name"]:
        raise pytest.UsageError(f"refusing to compare runs from different GPUs: the saved run is from "
                                f"{saved!r}, this one is on {machine_info['gpu']['name']!r}")


def provenance(config):
    commit = "unknown (no git)"
    if shutil.which("git"):
        # -dirty: floors measured on uncommitted code must not cite the commit as if it had run
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                cwd=config.rootpath).stdout.strip() or "unknown (not a git checkout)"
    info = gpu_info(config)
    return {"commit": commit, "date": datetime.date.today().isoformat(), "gpu": info["name"],
            "driver": info.get("driver"), "torch": info["torch"], "triton": info["triton"]}


def pytest_sessionstart(session):
    session.config.stash[EXEMPTED] = compare.hold_gpu_time_only(session.config)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)  # outside pytest-benchmark's wrapper, which saves the run
def pytest_sessionfinish(session):
    config = session.config
    recorder = config.stash.get(RECORDER, None)
    if recorder is not None:
        recorder.count_deferred_launches()  # into extra_info before the run is saved
    if recorder is not None and recorder.measured:
        recorder.update_path = update(expectations_dir(config), hardware_key(device_name()), recorder.measured,
                                      margin=config.getoption("expectations_margin"), provenance=provenance(config),
                                      allow_lower=config.getoption("expectations_allow_lower"),
                                      host_dependent=recorder.host_dependent)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    recorder = item.config.stash.get(RECORDER, None)
    if report.failed and recorder is not None:
        recorder.failed.add(item.nodeid)  # its deferred launch count is dropped


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's, which raises on a regression
def pytest_terminal_summary(terminalreporter, config):
    recorder = config.stash.get(RECORDER, None)
    if recorder is not None and recorder.count_errors:
        terminalreporter.section("launch counts that failed")
        for test, error in recorder.count_errors:
            terminalreporter.write_line(f"{test}: {error}")
    exempted = config.stash.get(EXEMPTED, [])
    if exempted:
        terminalreporter.section("slower than the saved run, host time in the measurement: listed, not failed")
        for test, fail in exempted:
            terminalreporter.write_line(f"{test}: {fail}")
    if recorder is None or not recorder.rows:
        return
    terminalreporter.section("kernel suite: every benchmark, its gate")
    for line in recorder.table():
        terminalreporter.write_line(line)
    roof = recorder._roofline
    if roof is not None:
        terminalreporter.write_line(f"roofline measured this session on {device_name()}: {roof.as_dict()}")
    for what, path in recorder.artifacts:
        terminalreporter.write_line(f"{what}: {path}")
    if recorder.update_path is not None:
        terminalreporter.write_line(f"expectations updated: {recorder.update_path}")
        below = recorder.below_floors_in_force()
        if below and not config.getoption("expectations_allow_lower"):
            terminalreporter.write_line(f"{len(below)} measured below the floor in force, which the update kept "
                                        "(a plain run fails them; --expectations-allow-lower lowers them):", red=True)
            for verdict in below:
                terminalreporter.write_line(f"  {verdict}")
