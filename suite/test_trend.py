"""The drift check over saved runs (tools/trend.py): a change is called only beyond the larger of
--min-change and the benchmarks' own run-to-run spread, only when the newest runs agree, never for
host-timed benchmarks; the recorded regression that the one-run compare missed is caught."""

import json
from pathlib import Path

import pytest

from tools import report, trend

RUNS = Path(__file__).parent.parent / ".benchmarks" / "h100" / "Linux-CPython-3.12-64bit"
H100 = "NVIDIA H100 80GB HBM3"
STABLE = (100.0, 101.0, 99.0, 100.5, 99.5, 100.0)  # us: six nights of one benchmark


@pytest.fixture(autouse=True)
def on_a_machine_without_a_gpu(monkeypatch):
    # without a named run the newest of this machine's GPU is judged: the runs saved here belong to none
    monkeypatch.setattr(report, "this_gpu", lambda: None)


def _rows(*benchmarks):
    """report.load's rows: (gate_id, us[, host_timed])."""
    return [dict(gate_id=g, seconds=us * 1e-6, iqr=0.0, extra=dict(gate_id=g, host_in_timing=host))
            for g, us, host in ((*b, False)[:3] for b in benchmarks)]


def _verdicts(recent, history, min_change=0.05):
    return {d.gate_id: d.verdict for d in trend.drift(recent, history, min_change)}


def test_a_step_under_the_compare_threshold_that_holds_is_slower():
    history = [_rows(("k", us)) for us in STABLE]
    drifts = trend.drift([_rows(("k", 109.8)), _rows(("k", 109.8))], history, 0.05)
    assert [(d.verdict, round(d.change, 3), d.runs) for d in drifts] == [("slower", 0.098, 6)]


def test_one_slow_run_is_not_a_trend_unless_asked():
    history = [_rows(("k", us)) for us in STABLE]
    assert _verdicts([_rows(("k", 100.2)), _rows(("k", 112.0))], history) == {"k": "steady"}
    assert _verdicts([_rows(("k", 112.0))], history) == {"k": "slower"}
    assert _verdicts([_rows(("k", 88.0)), _rows(("k", 87.0))], history) == {"k": "faster"}


def test_a_noisy_benchmark_needs_a_change_beyond_its_spread():
    history = [_rows(("noisy", us), ("quiet", 100.0)) for us in (90.0, 110.0, 92.0, 108.0, 95.0, 105.0)]
    recent = [_rows(("noisy", 115.0), ("quiet", 106.0))] * 2
    assert _verdicts(recent, history) == {"noisy": "steady", "quiet": "slower"}
    assert _verdicts(recent, history, min_change=0.08) == {"noisy": "steady", "quiet": "steady"}


def test_host_timed_benchmarks_and_short_histories_are_not_judged():
    history = [_rows(("eager", us, True), ("new", us)) for us in STABLE[:2]] + \
              [_rows(("eager", us, True)) for us in STABLE[2:]]
    assert trend.drift([_rows(("eager", 300.0, True), ("new", 300.0))] * 2, history, 0.05) == []
    # GPU-timed history, the newest run host-timed: not judged; the reverse: judged on the GPU-timed runs alone
    gpu_history = [_rows(("eager", us)) for us in STABLE]
    assert trend.drift([_rows(("eager", 300.0))] * 1 + [_rows(("eager", 300.0, True))], gpu_history, 0.05) == []
    mixed = [_rows(("eager", 900.0, True))] * 3 + gpu_history[:3]
    assert _verdicts([_rows(("eager", 300.0))] * 2, mixed) == {"eager": "slower"}
    # a confirming run that was host-timed confirms nothing
    assert _verdicts([_rows(("eager", 300.0, True)), _rows(("eager", 300.0))], gpu_history) == {"eager": "steady"}


def test_runs_saved_before_host_timing_was_recorded_count_only_for_gpu_timed_benchmarks():
    def unkeyed(gate, us):
        return [dict(gate_id=gate, seconds=us * 1e-6, iqr=0.0, extra=dict(gate_id=gate))]
    history = [unkeyed("k", us) + unkeyed("eager", 50.0) for us in STABLE[:3]] + \
              [_rows(("k", us), ("eager", 100.0, True)) for us in STABLE[3:]]
    recent = [_rows(("k", 120.0), ("eager", 100.0))] * 2
    drifts = {d.gate_id: d for d in trend.drift(recent, history, 0.05)}
    assert drifts["k"].runs == 6 and "eager" not in drifts  # eager: 3 unkeyed runs left out, 0 GPU-timed


def _save(folder, name, when, gpu, us):
    folder.mkdir(parents=True, exist_ok=True)
    run = dict(datetime=when, machine_info=dict(gpu=dict(name=gpu)),
               benchmarks=[dict(name="test_k", stats=dict(median=us * 1e-6, iqr=0.0), extra_info=dict(gate_id="k"))])
    (folder / name).write_text(json.dumps(run))


@pytest.fixture
def saved(tmp_path, monkeypatch):
    """Six stable nights, then two 9% slower, in .benchmarks/h100/...; a faster H200 run in the same
    folder and a slow trial under partial/, neither of which counts."""
    folder = tmp_path / ".benchmarks" / "h100" / "Linux-CPython-3.12-64bit"
    for night, us in enumerate(STABLE + (109.0, 109.0), start=1):
        _save(folder, f"{night:04d}_x.json", f"2026-11-{night:02d}T03:00:00", H100, us)
    _save(folder, "0009_h200.json", "2026-11-05T03:30:00", "NVIDIA H200", 60.0)
    _save(tmp_path / ".benchmarks" / "h100" / "partial", "0010_trial.json", "2026-12-01T00:00:00", H100, 500.0)
    monkeypatch.chdir(tmp_path)
    return folder


def test_cli_fails_on_a_slower_benchmark_and_names_it(saved, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["trend", "--fail"])
    with pytest.raises(SystemExit) as exit_info:
        trend.main()
    out = capsys.readouterr().out
    assert exit_info.value.code == 1
    assert "0008_x.json: 1 GPU-timed benchmarks against the median of 6 earlier runs" in out
    assert "slower   +9.0%" in out and "100.0 -> 109.0 us  k  [6 runs]" in out


def test_cli_lists_without_failing_and_judges_a_named_run(saved, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["trend"])
    trend.main()
    assert "1 slower, 0 faster" in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", ["trend", str(saved / "0006_x.json"), "--fail"])
    trend.main()  # nights 1-4 against 5-6: steady
    assert "1 GPU-timed benchmarks against the median of 4 earlier runs" in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", ["trend", "--history", "3"])
    trend.main()  # nights 4-6 against 7-8
    assert "against the median of 3 earlier runs" in capsys.readouterr().out
    for named in (saved / "0008_x.json", Path(".benchmarks/h100/Linux-CPython-3.12-64bit/0008_x.json")):
        monkeypatch.setattr("sys.argv", ["trend", str(named), "--fail"])  # absolute or relative: judged alike
        with pytest.raises(SystemExit) as exit_info:
            trend.main()
        assert exit_info.value.code == 1 and "1 slower" in capsys.readouterr().out


def test_cli_judges_the_newest_run_of_this_machines_gpu_or_of_gpu(saved, monkeypatch, capsys):
    _save(saved.parent.parent / "h200" / "Linux-CPython-3.12-64bit", "0001_y.json", "2026-12-09T03:00:00",
          "NVIDIA H200", 60.0)  # the newest run of all, of another GPU
    monkeypatch.setattr(report, "this_gpu", lambda: "h100")
    for argv in (["trend"], ["trend", "--gpu", "h100"]):
        monkeypatch.setattr("sys.argv", argv)
        trend.main()
        assert "0008_x.json: 1 GPU-timed benchmarks" in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", ["trend", "--gpu", "h200"])
    with pytest.raises(SystemExit) as exit_info:
        trend.main()
    assert exit_info.value.code == 0 and "0001_y.json: nothing judged" in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", ["trend", "--gpu", "b200"])
    with pytest.raises(SystemExit) as exit_info:
        trend.main()
    assert exit_info.value.code == 2 and "no saved run under .benchmarks/b200/" in capsys.readouterr().err


def test_cli_says_when_too_few_runs_leave_nothing_to_judge(saved, monkeypatch, capsys):
    # nights 1-4: the newest 2 against 2 earlier runs, one short of a verdict
    monkeypatch.setattr("sys.argv", ["trend", str(saved / "0004_x.json")])
    with pytest.raises(SystemExit) as exit_info:
        trend.main()
    assert exit_info.value.code == 0 and "nothing judged: 4 saved runs of this GPU" in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", ["trend", str(saved / "0004_x.json"), "--fail"])
    with pytest.raises(SystemExit) as exit_info:
        trend.main()
    assert exit_info.value.code == 2


def test_the_native_loop_regression_that_the_compare_missed_is_caught():
    # 0abf55b made decode_loop/cuda_persistent 9-10% slower in run 0009, under the nightly compare's
    # 10%, and it stayed so for ten runs; run 0010 is the second run after it.
    drifts = {d.gate_id: d for d in trend.drift(
        [trend.load(RUNS / "0009_4774e62_20261127_065500.json")[1], trend.load(RUNS / "0010_6a9c2c7_20261127_112408.json")[1]],
        [trend.load(path)[1] for path in sorted(RUNS.glob("000[1-8]_*.json"))], 0.05)}
    verdicts = {g: drifts[g].verdict for g in ("decode_loop/cuda_persistent/medium", "decode_loop/cuda_persistent/large",
                                                "right_sized_decode/loop-cuda-none/small",
                                                "right_sized_decode/loop-cuda-none/medium")}
    assert verdicts == {"decode_loop/cuda_persistent/medium": "slower", "decode_loop/cuda_persistent/large": "steady",
                        "right_sized_decode/loop-cuda-none/small": "slower",
                        "right_sized_decode/loop-cuda-none/medium": "slower"}
