"""The perf recorder (SPEC 4, 5): metrics into extra_info, gates and their failures, the end-of-run
table, which of a benchmark's times and ratios are partly the host's (suite.timing), and, through
pytest-benchmark's own fixture, that the statistic it saves is the GPU time of cold rounds."""

import copy
import json
import pickle
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kernels.stream_read import BLOCK, STEPS, TILINGS, stream_read
from suite.expectations import Expectations
from suite.perf import PerfRecorder
from suite.roofline import Roofline
from suite.test_expectations import GATE, SPEEDUP, write
from suite.timing import HOST_SLACK_CYCLES, WARMUP_CALLS, HostGate, RoundStart, Seconds, measure, run_benchmark


class FakeBenchmark:  # all that PerfRecorder.record uses of pytest-benchmark's fixture
    def __init__(self):
        self.extra_info = {}


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


@pytest.mark.parametrize("updating", [False, True])
def test_perf_refuses_a_metric_that_is_not_a_number(tmp_path, updating):
    # a NaN passes no comparison, so it would slip past a gate and into a floor: the measuring failed
    rec, bench = gpu_recorder(tmp_path, updating=updating), FakeBenchmark()
    with pytest.raises(ValueError, match=f"{GATE}: metrics that are not finite numbers: .*'{SPEEDUP}': nan"):
        rec.record(bench, GATE, 1e-3, shape={}, bytes_moved=5e8, baseline_seconds=float("nan"))
    assert rec.measured == {}


def test_perf_gates_nothing_under_quick(tmp_path):
    # the same measurement that fails its gate above: --quick's shorter loops were never calibrated
    rec, bench = gpu_recorder(tmp_path, updating=False), FakeBenchmark()
    rec.quick = True
    rec.record(bench, GATE, 1e-3, shape={}, bytes_moved=5e8, baseline_seconds=1.2e-3)
    assert bench.extra_info["gate"] == "quick: not gated" and [r.verdict for r in rec.rows] == ["quick: not gated"]


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


def test_perf_flags_a_gate_that_passes_near_its_floor(tmp_path):
    rec = gpu_recorder(tmp_path, updating=False)
    verdicts = []
    for speedup in (1.6, 1.5):  # floor 1.5: 1.067x and 1.0x of it
        bench = FakeBenchmark()
        rec.record(bench, GATE, 1e-3, shape={}, bytes_moved=5e8, baseline_seconds=speedup * 1e-3)
        verdicts.append(bench.extra_info["gate"])
    assert verdicts == ["pass", f"pass (near floor: {SPEEDUP} 1.5 vs 1.5)"]


def test_perf_flags_noisy_rounds(tmp_path):
    rec, bench = gpu_recorder(tmp_path, updating=False), FakeBenchmark()
    bench.extra_info["iqr_over_median"] = 0.3
    with pytest.raises(pytest.fail.Exception, match="noisy"):
        rec.record(bench, GATE, 1e-3, shape={}, bytes_moved=5e8, baseline_seconds=1e-4)
    assert "noisy: IQR 30% of median" in bench.extra_info["gate"]


def test_perf_marks_what_the_host_is_in(tmp_path):
    # The end table says which times and ratios are partly the host's, and an update hands those
    # metrics on for a wider margin: a host-timed benchmark's every metric, and a speedup over a
    # baseline whose measurement was host-timed (suite.timing.Seconds).
    rec = gpu_recorder(tmp_path, updating=True)
    cases = {"gpu": (False, 1e-4, [], "recorded"),
             "host-timed": (True, 1e-4, ["roofline_fraction", SPEEDUP], "recorded (host-timed)"),
             "host-timed baseline": (False, Seconds(1e-4, True), [SPEEDUP], "recorded (host-timed baseline)")}
    for name, (host_in_timing, baseline, dependent, verdict) in cases.items():
        bench = FakeBenchmark()
        bench.extra_info["host_in_timing"] = host_in_timing
        rec.record(bench, f"{GATE}-{name}", 1e-3, shape={}, bytes_moved=5e8, baseline_seconds=baseline)
        assert (bench.extra_info["host_dependent_metrics"], bench.extra_info["gate"]) == (dependent, verdict), name
        assert rec.host_dependent[f"{GATE}-{name}"] == set(dependent)
    assert rec.table()[-1].endswith("recorded (host-timed baseline)")


@pytest.mark.parametrize("tiling", [(BLOCK, STEPS, 8), *TILINGS])
def test_stream_read_reads_every_word_once(device, tiling):
    # the read roofline's and the L2 flush's kernel: the programs' xors make the xor of every word,
    # over a size that ends mid-step
    words = torch.randint(-2**31, 2**31 - 1, (3 * tiling[0] * tiling[1] + 1234,), dtype=torch.int32, device=device)
    partial = stream_read(words, *tiling)()
    expected = words.cpu().numpy()
    assert int(np.bitwise_xor.reduce(partial.cpu().numpy())) == int(np.bitwise_xor.reduce(expected))


def test_seconds_carry_the_host_flag_through_copies_and_save_as_numbers():
    seconds = Seconds(1.5e-3, True)
    assert copy.deepcopy(seconds).host_in_timing and pickle.loads(pickle.dumps(seconds)).host_in_timing
    assert json.loads(json.dumps({"gpu_time_s": seconds})) == {"gpu_time_s": 1.5e-3}
    assert not hasattr(seconds / 2, "host_in_timing")  # a derived value is a plain float


def _gate(timeout_s):
    waits, word = [], np.zeros(1, dtype=np.uint32)  # word: the flag the GPU would read
    return HostGate(waits.append, word, timeout_s), waits, word


def _until(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.001)
    return condition()


def test_a_held_round_opens_with_the_token_it_waits_for():
    gate, waits, word = _gate(timeout_s=60)
    for token in (1, 2):
        gate.hold()
        assert waits[-1] == token and word[0] == token - 1  # the stream waits; nothing opened it yet
        gate.release()
        assert word[0] == token
    gate.release()  # nothing held: no effect
    assert (word[0], gate.stalls) == (2, 0)


def test_the_watchdog_opens_a_round_nobody_releases_and_counts_it():
    gate, waits, word = _gate(timeout_s=0.02)
    gate.hold()  # as a launch() that waits on the GPU: the host never gets to release()
    assert _until(lambda: word[0] == 1), "the watchdog never opened the held round"
    assert gate.stalls == 1
    gate.release()  # already open
    gate.hold()
    gate.release()
    time.sleep(0.1)  # past the timeout: a released round is not counted
    assert (word[0], gate.stalls) == (2, 1)


def test_the_host_is_in_the_timing_when_it_outlasts_the_slack_or_a_held_round_stalled():
    slack_s = HOST_SLACK_CYCLES / 2e9
    gate = _gate(timeout_s=60)[0]
    assert RoundStart(None, HOST_SLACK_CYCLES, 2 * slack_s).host_in_timing(stalls=0, rounds=30)
    assert not RoundStart(None, HOST_SLACK_CYCLES, slack_s / 2).host_in_timing(stalls=0, rounds=30)
    assert RoundStart(None, 0, 1e-6).host_in_timing(stalls=0, rounds=30)  # host_bound: no slack at all
    held = RoundStart(gate, HOST_SLACK_CYCLES, 2 * slack_s)
    assert not held.host_in_timing(stalls=0, rounds=30)
    # a host hiccup that stalled a few rounds leaves the median alone; a launch that stalls every round does not
    assert not held.host_in_timing(stalls=15, rounds=30) and held.host_in_timing(stalls=16, rounds=30)
    assert held.host_in_timing(stalls=31, rounds=30)  # every round and the warm-up round
    assert RoundStart(gate, 0, 0).describe() == "held until the host enqueued the round"
    assert RoundStart(None, HOST_SLACK_CYCLES, 0).describe() == f"after {1e3 * slack_s:.1f} ms of host slack"


class PedanticBenchmark(FakeBenchmark):  # what run_benchmark uses of pytest-benchmark's fixture
    stats = SimpleNamespace(stats=SimpleNamespace(median=1.0, iqr=0.0))
    disabled = False

    def pedantic(self, target, setup, rounds, warmup_rounds):  # as pytest-benchmark: timer, target, timer
        for _ in range(rounds + warmup_rounds):
            setup()
            self._timer()
            target()
            self._timer()


@pytest.mark.requires_cuda
def test_host_time_in_a_measurement_is_recorded():
    # 2000 eager launches take longer to enqueue than the round's slack: the GPU waits on the host.
    x = torch.ones(16, device="cuda")
    timed = {}
    for name, launch in {"one": lambda: x.add_(1), "eager": lambda: [x.add_(1) for _ in range(2000)]}.items():
        bench = PedanticBenchmark()
        seconds = run_benchmark(bench, launch, device=x.device, rounds=2)
        timed[name] = (bench.extra_info["host_in_timing"], seconds.host_in_timing,
                       measure(launch, device=x.device, rounds=2).host_in_timing)
    assert timed == {"one": (False, False, False), "eager": (True, True, True)}


@pytest.mark.requires_cuda
def test_a_host_late_in_a_held_round_is_not_timed():
    # Warm calls enqueue fast, so rounds are held; timed calls then stall the host 3 ms before the kernel.
    # With the GPU started after a sleep instead of the host's release, each round would time the stall.
    x = torch.ones(16, device="cuda")

    def stalling():
        calls = []

        def launch():
            calls.append(None)
            if len(calls) > WARMUP_CALLS:
                time.sleep(0.003)
            x.add_(1)
        return launch

    bench = PedanticBenchmark()
    run_benchmark(bench, stalling(), device=x.device, rounds=3)
    seconds = measure(stalling(), device=x.device, rounds=3)
    assert bench.extra_info["round_start"] == "held until the host enqueued the round"
    assert not bench.extra_info["host_in_timing"] and not seconds.host_in_timing
    assert seconds < 1e-3, f"{seconds * 1e3:.2f} ms: the host's 3 ms stall was timed"


@pytest.mark.requires_cuda
def test_a_launch_that_waits_on_the_gpu_in_a_held_round_is_released_and_marked():
    # .item() waits for the GPU, which waits for the host's release: the watchdog opens the round.
    x = torch.ones(16, device="cuda")
    bench = PedanticBenchmark()
    run_benchmark(bench, lambda: x.add_(1).sum().item(), device=x.device, rounds=2)
    assert bench.extra_info["host_in_timing"] and bench.extra_info["gate_stalls"] == 3  # with the warm-up round
    assert measure(lambda: x.add_(1).sum().item(), device=x.device, rounds=2).host_in_timing


# --- run_benchmark through pytest-benchmark's own fixture, in an inner pytest run ---

SMOKE_SLEEP_S = 0.02
# GPU test of the stored statistic: ~2 ms of GPU work (torch.cuda._sleep spins this many SM cycles,
# 2.0 ms at the H100's 1980 MHz), then 10 ms of host time inside every timed call. A host clock stores
# >= 10 ms (the call) or >= 12 ms (the call, then a sync); the GPU's clock the ~2 ms alone.
SLEEP_CYCLES = 4_000_000
HOST_DELAY_S = 0.01
# The stored median against the same kernel on a bare event pair just before and after: both spans hold
# the kernel and the same few-us launch from a queued stream (0.2% of 2 ms), and the spin lasts cycles /
# SM clock, which a one-SM spin holds at boost. 5% allows a clock step of ~100 MHz between them and
# still lies 5x below the nearest host-timed value.
GPU_TIME_REL = 0.05
# GPU test of the flush: a quarter of the L2 (12.5 MiB on an H100, in 400 programs of 32 KB) read with
# the L2 flushed before every round, and warm (the last round left it all in L2). H100: cold ~8 us (the
# same tiling read 16 MiB cold in 9.18 us, an empty grid takes 3.2 us under this clock:
# notes/decode_attention.md), so >= 3.2 + 4.1 us at the 3.18 TB/s read roofline; warm reads L2, >= 5.5
# TB/s (H100 PCIe, Chips and Cheese 2023; the SXM clocks higher), so <= 3.2 + 2.4 us. The ratio is >= 1.3
# by these bounds; 1.2 leaves room for a slower L2 and is ~10x the noise of 30-round medians (1-2%). A
# flush that left the buffer in L2 gives 1.0.
COLD_OVER_WARM = 1.2

SMOKE = f"""
    import time

    from suite.timing import run_benchmark

    def test_smoke(benchmark):
        run_benchmark(benchmark, lambda: time.sleep({SMOKE_SLEEP_S}), device="cpu", rounds=5)
"""

GPU_TIMED = f"""
    import time

    import torch

    from suite.timing import run_benchmark

    def sleep_seconds(reps=5):
        # queued behind a sleep, as a held round's kernel is when the gate opens: no enqueue is timed
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        times = []
        for _ in range(reps):
            torch.cuda._sleep({HOST_SLACK_CYCLES})
            start.record()
            torch.cuda._sleep({SLEEP_CYCLES})
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return sorted(times)[reps // 2]

    def test_sleep(benchmark):
        def launch():
            torch.cuda._sleep({SLEEP_CYCLES})
            time.sleep({HOST_DELAY_S})

        before = sleep_seconds()
        seconds = run_benchmark(benchmark, launch, device="cuda", rounds=10, cover_enqueue=True)
        benchmark.extra_info.update(returned_s=seconds, gpu_s=[before, sleep_seconds()])
"""

COLD_AND_WARM = """
    import pytest
    import torch

    from kernels import hw
    from kernels.stream_read import BLOCK, stream_read
    from suite.timing import run_benchmark

    @pytest.mark.parametrize("cold", [True, False], ids=["cold", "warm"])
    def test_read(benchmark, cold):
        words = torch.randint(-2**31, 2**31 - 1, (hw.l2_bytes("cuda") // 16,), dtype=torch.int32, device="cuda")
        run_benchmark(benchmark, stream_read(words, BLOCK, 1), device="cuda", rounds=30, cold=cold)
"""


@pytest.fixture
def benchmark_run(inner, tmp_path):
    """Runs the inner tests; returns what --benchmark-json saved, by test name."""

    def run(source):
        inner.makepyfile(source)
        out = tmp_path / "run.json"
        result = inner.runpytest("-p", "suite.plugin", f"--benchmark-json={out}")
        assert result.ret == 0, result.stdout.str()
        return {saved["name"]: saved for saved in json.loads(out.read_text())["benchmarks"]}

    return run


def test_a_smoke_run_stores_one_round_of_host_time_and_says_so(benchmark_run):
    (saved,) = benchmark_run(SMOKE).values()
    assert saved["extra_info"]["clock"] == "host (smoke run, no GPU)"
    assert saved["stats"]["rounds"] == 1 and saved["stats"]["median"] >= SMOKE_SLEEP_S


@pytest.mark.requires_cuda
def test_the_stored_median_is_gpu_time_without_the_hosts(benchmark_run):
    saved = benchmark_run(GPU_TIMED)["test_sleep"]
    extra, median = saved["extra_info"], saved["stats"]["median"]
    low, high = min(extra["gpu_s"]), max(extra["gpu_s"])
    assert high < HOST_DELAY_S / 2, f"the kernel took {high * 1e3:.2f} ms: too close to the host's delay to tell"
    assert (extra["clock"], extra["round_start"], extra["host_in_timing"]) == (
        "cuda_event", "held until the host enqueued the round", False)
    assert median == extra["returned_s"]  # run_benchmark returns the statistic pytest-benchmark saved
    assert low * (1 - GPU_TIME_REL) <= median <= high * (1 + GPU_TIME_REL), (
        f"stored median {median * 1e3:.3f} ms, the kernel alone {low * 1e3:.3f}-{high * 1e3:.3f} ms, "
        f"the host {HOST_DELAY_S * 1e3:.1f} ms more per call")


@pytest.mark.requires_cuda
def test_rounds_are_cold_unless_asked_warm(benchmark_run):
    saved = benchmark_run(COLD_AND_WARM)
    cold, warm = saved["test_read[cold]"], saved["test_read[warm]"]
    assert (cold["extra_info"]["l2"], warm["extra_info"]["l2"]) == ("flushed before every round", "warm")
    ratio = cold["stats"]["median"] / warm["stats"]["median"]
    assert ratio >= COLD_OVER_WARM, (f"cold {cold['stats']['median'] * 1e6:.2f} us, warm "
                                     f"{warm['stats']['median'] * 1e6:.2f} us: the flush left the buffer in L2")


def test_an_update_says_which_gates_it_kept_above_the_run(tmp_path):
    # a calibration run measuring below a floor in force keeps the floor (never lowered unless asked):
    # the run lists those gates, since the next plain run will fail them
    rec = gpu_recorder(tmp_path, updating=True)
    rec.record(FakeBenchmark(), GATE, 1e-3, shape={}, bytes_moved=5e8, baseline_seconds=1.2e-3)
    below = rec.below_floors_in_force()
    assert [(v.gate_id, v.metric, v.floor) for v in below] == [(GATE, SPEEDUP, 1.5)]
