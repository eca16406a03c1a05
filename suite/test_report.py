"""The run report (tools/report.py), built from recorded runs: every chart exists and shows the
data it claims."""

import json
import shutil
from pathlib import Path

import pytest

from tools import report

RUNS = Path(__file__).parent.parent / ".benchmarks" / "h100" / "Linux-CPython-3.12-64bit"
RUN = RUNS / "0005_3e7add7_20261126_210332.json"
BASE = RUNS / "0004_0c468d9_20261126_193812.json"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def on_a_machine_without_a_gpu(monkeypatch):
    # --latest's default is this machine's GPU: the runs these tests save belong to no machine
    monkeypatch.setattr(report, "this_gpu", lambda: None)


def _medians(path):
    return {b["extra_info"]["gate_id"]: b["stats"]["median"] for b in json.loads(path.read_text())["benchmarks"]}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return out, report.build(RUN, out, BASE)


def test_every_chart_is_written_and_embedded(built):
    out, drawn = built
    page = (out / "index.html").read_text()
    for name in drawn:
        assert (out / name).read_bytes()[:8] == PNG
    assert page.count("data:image/png;base64,") == len(drawn)  # self-contained: no file links


def test_workload_charts_show_every_benchmark_with_its_median_and_speedup(built):
    _, drawn = built
    runs = json.loads(RUN.read_text())["benchmarks"]
    for workload in ("decode_attention", "decode_loop", "prefill_kv_write", "right_sized_decode"):
        expected = [(b["extra_info"]["gate_id"], b["stats"]["median"]) for b in runs
                    if b["extra_info"]["gate_id"].startswith(workload + "/")]
        assert [(g, s) for g, s, _ in drawn[f"workload_{workload}.png"]] == expected
    cuda = {g: s for g, _, s in drawn["workload_decode_attention.png"]}
    assert cuda["decode_attention/cuda_persistent/contiguous/B64-L4096-uniform"] == pytest.approx(0.9346, abs=1e-4)


def test_roofline_chart_uses_the_sessions_rooflines(built):
    _, drawn = built
    data = drawn["roofline.png"]
    machine = json.loads(RUN.read_text())["machine_info"]["gpu"]["roofline"]
    assert data["roofline"] == machine
    assert len(data["gbps"]) == sum(1 for b in json.loads(RUN.read_text())["benchmarks"]
                                    if "achieved_gbps" in b["extra_info"])
    assert data["tflops"] == []  # this run has no compute-bound benchmark


def test_tpot_chart_has_every_tier_and_loop(built):
    _, drawn = built
    tiers = drawn["tpot.png"]
    assert set(tiers) == {"small", "medium", "large"}
    assert ("triton_persistent", pytest.approx(0.0134, abs=1e-3)) in [(label, v) for label, v in tiers["small"]]
    assert any(label == "graphs-int4" for label, _ in tiers["medium"])


def test_compare_flags_only_changes_beyond_noise():
    base = [dict(gate_id=g, seconds=1.0, iqr=0.05) for g in ("a", "b", "c", "d")]
    new = [dict(gate_id="a", seconds=1.03, iqr=0.05),  # 3% < 5% noise
           dict(gate_id="b", seconds=1.2, iqr=0.01),  # 20% > 5%: slower
           dict(gate_id="c", seconds=0.5, iqr=0.01),  # 50% faster
           dict(gate_id="d", seconds=1.5, iqr=0.01, extra=dict(host_in_timing=True)),  # the host's change
           dict(gate_id="e", seconds=1.0, iqr=0.0)]  # not in the base run
    verdicts = {c.label: c.verdict for c in report.compare(base, new)}
    assert verdicts == {"a": "within noise", "b": "slower", "c": "faster", "d (host-timed)": "slower"}
    # the larger relative IQR of the two runs: a quiet base and a noisy new run hide a 10% change
    quiet = [dict(gate_id="f", seconds=1.0, iqr=0.01)]
    noisy = [dict(gate_id="f", seconds=1.1, iqr=0.22)]  # 20% of its median
    assert [c.verdict for c in report.compare(quiet, noisy)] == ["within noise"]


def test_compare_chart_on_recorded_runs(built):
    _, drawn = built
    changes = drawn["compare.png"]
    gates = [{b["extra_info"]["gate_id"] for b in json.loads(p.read_text())["benchmarks"]} for p in (BASE, RUN)]
    assert sorted(c.label for c in changes) == sorted(gates[0] & gates[1])  # every benchmark both runs have


def test_cli_latest_compares_with_the_previous_run_of_the_same_gpu(tmp_path, monkeypatch):
    runs = tmp_path / ".benchmarks" / "h100" / "Linux-CPython-3.12-64bit"
    runs.mkdir(parents=True)
    shutil.copy(RUN, runs / "0002_b.json")  # newest by its recorded datetime, whatever the file times
    shutil.copy(BASE, runs / "0001_a.json")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["report", "--latest", "--compare-previous", "--out", "out"])
    report.main()
    page = (tmp_path / "out" / "index.html").read_text()
    assert "0002_b.json" in page and "Compared with 0001_a.json" in page


def test_cli_latest_is_the_newest_run_of_this_machines_gpu_or_of_gpu(tmp_path, monkeypatch, capsys):
    # a nightly runner's report describes its own GPU's run, never a newer one another GPU saved
    for gpu, name, when in (("h100", "0007_new.json", "2026-12-02"), ("h200", "0003_old.json", "2026-12-01")):
        folder = tmp_path / ".benchmarks" / gpu / "Linux-CPython-3.12-64bit"
        folder.mkdir(parents=True)
        (folder / name).write_text(json.dumps(json.loads(RUN.read_text()) | {"datetime": f"{when}T03:00:00"}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(report, "this_gpu", lambda: "h200")
    for argv, picked in ((["--latest"], "0003_old.json"), (["--latest", "--gpu", "h100"], "0007_new.json")):
        monkeypatch.setattr("sys.argv", ["report", *argv, "--out", "out"])
        report.main()
        assert picked in capsys.readouterr().out and picked in (tmp_path / "out" / "index.html").read_text()
    monkeypatch.setattr(report, "this_gpu", lambda: "b200")
    monkeypatch.setattr("sys.argv", ["report", "--latest", "--out", "out"])
    with pytest.raises(SystemExit) as exit_info:
        report.main()
    assert exit_info.value.code == 2
    assert "--latest: no saved run under .benchmarks/b200/ (this machine's GPU" in capsys.readouterr().err


def test_stream_priority_timelines_are_embedded(tmp_path):
    from suite.priority import timeline_png

    png = tmp_path / "timeline.png"
    timeline_png({7: [(0.0, 900.0, "_prefill")], 13: [(50.0, 40.0, "decode"), (400.0, 40.0, "decode")]},
                 {7: "prefill stream", 13: "decode stream"}, png, "stream_priority-decode_high-128x64")
    run = json.loads(RUN.read_text())
    run["benchmarks"][0]["extra_info"].update(gate_id="stream_priority/decode_high/tile128x64", timeline_png=str(png))
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    drawn = report.build(path, tmp_path / "out")
    page = (tmp_path / "out" / "index.html").read_text()
    assert "Timeline: stream_priority/decode_high/tile128x64" in page
    assert page.count("data:image/png;base64,") == len(drawn) + 1  # the timeline, as kept by the run


def test_side_by_side_table_lists_both_runs_times(built):
    out, drawn = built
    page = (out / "index.html").read_text()
    base = _medians(BASE)
    first = drawn["compare.png"][0]
    assert f"<td>{first.label}</td><td>{1e6 * base[first.label]:,.1f}</td>" in page
    assert page.count("<tr><td>") == len(drawn["compare.png"])


def test_side_by_side_table_lists_a_host_timed_benchmark(tmp_path):
    # The nightly run of 2026-11-27 at fae0d1e had host-timed benchmarks, which the report keyed
    # by their label: it raised a KeyError after the suite had passed.
    run = json.loads(RUN.read_text())
    timed = run["benchmarks"][0]
    timed["extra_info"]["host_in_timing"] = True
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    drawn = report.build(path, tmp_path / "out", BASE)
    page = (tmp_path / "out" / "index.html").read_text()
    gate = timed["extra_info"]["gate_id"]
    base = _medians(BASE)
    assert f"{gate} (host-timed)" in [c.label for c in drawn["compare.png"]]
    assert (f"<td>{gate} (host-timed)</td><td>{1e6 * base[gate]:,.1f}</td>"
            f"<td>{1e6 * timed['stats']['median']:,.1f}</td>") in page


def test_runs_of_different_gpus_are_not_compared(tmp_path, monkeypatch):
    h200 = RUNS.parents[1] / "h200" / "Linux-CPython-3.12-64bit" / "0001_6daf42d_20261126_184310.json"
    with pytest.raises(report.ReportError, match="NVIDIA H200.*NVIDIA H100 80GB HBM3.*different GPUs"):
        report.build(h200, tmp_path / "out", RUN)
    monkeypatch.setattr("sys.argv", ["report", str(RUN), "--compare", str(h200), "--out", str(tmp_path / "cli")])
    with pytest.raises(SystemExit) as exit_info:
        report.main()
    assert exit_info.value.code == 2 and not (tmp_path / "cli" / "index.html").exists()


def test_a_benchmark_saved_without_a_gate_id_is_drawn_by_its_name(tmp_path):
    # pytest-benchmark saves a benchmark whose test failed after timing, before perf.record named it.
    run = json.loads(RUN.read_text())
    del run["benchmarks"][0]["extra_info"]["gate_id"]
    name = run["benchmarks"][0]["name"]
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    drawn = report.build(path, tmp_path / "out")
    assert drawn[f"workload_{name}.png"] == [(name, run["benchmarks"][0]["stats"]["median"], None)]


def test_cli_latest_leaves_out_trials_and_says_when_nothing_is_compared(tmp_path, monkeypatch, capsys):
    gpu = tmp_path / ".benchmarks" / "h100"
    (gpu / "Linux-CPython-3.12-64bit").mkdir(parents=True)
    (gpu / report.TRIALS).mkdir()
    shutil.copy(BASE, gpu / "Linux-CPython-3.12-64bit" / "0001_a.json")
    trial = json.loads(RUN.read_text())
    trial["datetime"] = "2999-01-01T00:00:00"  # newer than any run: still not the latest night's
    (gpu / report.TRIALS / "0002_trial.json").write_text(json.dumps(trial))
    monkeypatch.chdir(tmp_path)
    assert report.saved_runs() == [Path(".benchmarks/h100/Linux-CPython-3.12-64bit/0001_a.json")]
    monkeypatch.setattr("sys.argv", ["report", "--latest", "--compare-previous", "--out", "out"])
    report.main()
    assert "no run of this GPU saved before" in capsys.readouterr().out
    assert "0001_a.json" in (tmp_path / "out" / "index.html").read_text()


@pytest.mark.parametrize("argv", [[], [str(RUN), "--latest"], [str(RUN), "--compare-previous"],
                                  [str(RUN), "--gpu", "h100"],
                                  ["--latest", "--compare-previous", "--compare", str(BASE)]])
def test_cli_usage_errors(argv, monkeypatch, tmp_path):
    monkeypatch.setattr("sys.argv", ["report", *argv, "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        report.main()
    assert exit_info.value.code == 2


def test_a_run_without_a_gpu_is_labelled_host_time(tmp_path):
    run = json.loads(RUN.read_text())
    run["machine_info"]["gpu"] = {"name": "cpu"}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    report.build(path, tmp_path / "out")
    page = (tmp_path / "out" / "index.html").read_text()
    assert "host time (smoke run, no GPU) and speedup" in page and "GPU time and speedup" not in page
