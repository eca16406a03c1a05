"""Tests of the regression gates' files (SPEC 5, 7): hardware keys, expectations files, their
verdicts and update, and gates derived from a saved run."""

import json
from pathlib import Path

import pytest

from suite.expectations import Expectations, ExpectationsError, hardware_key, update

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


@pytest.mark.parametrize("name, key", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100_pcie"), ("NVIDIA H100 NVL", "h100_nvl"),
    ("NVIDIA H200", "h200"), ("NVIDIA H200 NVL", "h200_nvl"), ("NVIDIA GH200 480GB", "gh200"),
    ("NVIDIA B200", "b200"), ("NVIDIA GB200", "gb200"), ("NVIDIA GB10", "gb10"),
    ("NVIDIA A100-SXM4-80GB", "nvidia_a100_sxm4_80gb"), ("cpu", "cpu"), ("(Prototype) GPU-X!", "prototype_gpu_x")])
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
    verdicts = Expectations.load(tmp_path, "b200").check(GATE, {SPEEDUP: 1.07, "roofline_fraction": 0.9})
    assert [(v.metric, v.ok) for v in verdicts] == [(SPEEDUP, False), ("roofline_fraction", True)]


def test_update_keeps_a_small_metric_to_significant_digits(tmp_path):
    # a launch-bound kernel's roofline fraction: 3 decimals would have floored 0.009612 at 0.008, 17% low
    entry = entry_of(update(tmp_path, "h100", {GATE: {"roofline_fraction": 0.009612}}, margin=0.15, provenance=PROV_A))
    assert (entry["roofline_fraction"]["floor"], entry["roofline_fraction"]["measured"]) == (0.00817, 0.009612)


def test_update_never_lowers_a_floor_unless_asked(tmp_path):
    def floor(value, **kw):
        path = update(tmp_path, "gb10", {GATE: {SPEEDUP: value}}, margin=0.0, provenance=PROV_A, **kw)
        return entry_of(path)[SPEEDUP]["floor"]
    assert (floor(1.0), floor(0.5), floor(0.5, allow_lower=True), floor(2.0)) == (1.0, 1.0, 0.5, 2.0)


def test_a_new_gpus_file_starts_from_the_default_floors_in_force(tmp_path):
    # no b200.json: default.json gated this GPU, and calibrating it must not lower or drop those floors
    write(tmp_path, "default", {"decode_attention/*/paged/*": {SPEEDUP: {"floor": 1.0}},
                                "*/unrunnable/*": {"hw_skip_reason": "needs a feature"}})
    path = update(tmp_path, "b200", {GATE: {SPEEDUP: 0.6, "roofline_fraction": 0.3}}, margin=0.15,
                  provenance=PROV_A)
    entry = entry_of(path)
    assert entry[SPEEDUP]["floor"] == 1.0 and entry["roofline_fraction"]["floor"] == pytest.approx(0.255)
    assert Expectations.load(tmp_path, "b200").hw_skip_reason("x/unrunnable/y") == "needs a feature"
    lowered = entry_of(update(tmp_path, "b200", {GATE: {SPEEDUP: 0.6}}, margin=0.15, provenance=PROV_A,
                              allow_lower=True))
    assert lowered[SPEEDUP]["floor"] == pytest.approx(0.51)


def test_update_writes_no_floor_that_cannot_fail(tmp_path):
    # An overlap measured as 0 would make a floor of 0, which every run passes: no gate.
    entry = entry_of(update(tmp_path, "h100", {GATE: {SPEEDUP: 1.0, "overlap_fraction": 0.0}}, margin=0.1,
                            provenance=PROV_A))
    assert SPEEDUP in entry and "overlap_fraction" not in entry
    path = update(tmp_path, "h100", {"b/none": {"overlap_fraction": 0.0}}, margin=0.1, provenance=PROV_A)
    assert "b/none" not in json.loads(path.read_text())["gates"]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_update_refuses_a_measurement_that_is_not_a_number(tmp_path, value):
    # NaN compares false with the old floor, so it would replace it; the file would then fail to load
    update(tmp_path, "h100", {GATE: {SPEEDUP: 1.0}}, margin=0.1, provenance=PROV_A)
    with pytest.raises(ExpectationsError, match=f"{GATE} {SPEEDUP}: measured {value}, no floor derives from it"):
        update(tmp_path, "h100", {GATE: {SPEEDUP: value}}, margin=0.1, provenance=PROV_A)
    assert entry_of(tmp_path / "h100.json")[SPEEDUP]["floor"] == pytest.approx(0.9)


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


def test_a_gated_metric_that_was_not_measured_fails(tmp_path):
    # A benchmark that stops reporting a metric its entry gates must not pass by saying nothing.
    write(tmp_path, "h100", {GATE: {SPEEDUP: {"floor": 1.0}, "roofline_fraction": {"floor": 0.5}}})
    verdicts = Expectations.load(tmp_path, "h100").check(GATE, {"roofline_fraction": 0.9})
    assert [(v.metric, v.ok) for v in verdicts] == [(SPEEDUP, False), ("roofline_fraction", True)]
    assert f"{SPEEDUP} not measured, floor 1.000" in str(verdicts[0])


def test_update_keeps_what_a_matching_pattern_set(tmp_path):
    # The exact entry an update writes wins over the pattern, so it must keep the pattern's higher
    # floor, its hand-set floor and its ungated metric, and a gate the update does not change stays
    # the pattern's alone.
    hand = {"floor": 0.5, "why": "set by hand"}
    ungated = {"ungated": "host-bound"}
    path = write(tmp_path, "h100", {"decode_attention/*": {SPEEDUP: {"floor": 0.95}, "speedup_vs_baseline": hand,
                                                          "overlap_fraction": ungated}})
    update(tmp_path, "h100", {GATE: {SPEEDUP: 0.5, "speedup_vs_baseline": 9.0, "overlap_fraction": 0.2},
                              "decode_attention/sdpa/paged/B4": {SPEEDUP: 0.5}},
           margin=0.1, provenance=PROV_A)
    gates = json.loads(path.read_text())["gates"]
    assert set(gates) == {"decode_attention/*"}
    update(tmp_path, "h100", {GATE: {SPEEDUP: 2.0, "speedup_vs_baseline": 9.0, "overlap_fraction": 0.2}},
           margin=0.1, provenance=PROV_A)
    entry = entry_of(path)
    assert (entry[SPEEDUP]["floor"], entry["speedup_vs_baseline"], entry["overlap_fraction"]) == (1.8, hand, ungated)
    exp = Expectations.load(tmp_path, "h100")
    assert [(v.metric, v.floor) for v in exp.check(GATE, {SPEEDUP: 2.0, "speedup_vs_baseline": 9.0})] == [
        (SPEEDUP, 1.8), ("speedup_vs_baseline", 0.5)]


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


def test_expectations_from_a_run_of_uncommitted_code_say_so(tmp_path, monkeypatch):
    # run 0022 was saved from a tree with uncommitted changes: its floors must not cite the commit bare
    from tools import expectations_from_run
    run = next((REPO / ".benchmarks" / "h100" / "Linux-CPython-3.12-64bit").glob("0022_*.json"))
    monkeypatch.setattr("sys.argv", ["x", str(run), "--expectations-dir", str(tmp_path), "--metrics", SPEEDUP])
    expectations_from_run.main()
    commits = {e["provenance"]["commit"] for e in Expectations.load(tmp_path, "h100").gates.values()}
    assert commits == {"bd84a9585e11f8af588ff50072218518c1ce0b2c-dirty"}


def test_expectations_from_a_saved_run_for_named_metrics_only(tmp_path, monkeypatch):
    from tools import expectations_from_run
    run = sorted((REPO / ".benchmarks" / "h100").glob("*/0002_*.json"))[-1]
    monkeypatch.setattr("sys.argv", ["x", str(run), "--expectations-dir", str(tmp_path), "--metrics", SPEEDUP])
    expectations_from_run.main()
    gates = Expectations.load(tmp_path, "h100").gates
    assert gates and all(set(entry) == {SPEEDUP, "provenance"} for entry in gates.values())


def test_expectations_from_several_runs_take_each_metrics_lowest(tmp_path, monkeypatch):
    # Several nights of one GPU: each floor sits below the lowest value any of them measured.
    from tools import expectations_from_run
    run = sorted((REPO / ".benchmarks" / "h100").glob("*/0002_*.json"))[-1]
    second = json.loads(run.read_text())
    gates = {b["extra_info"]["gate_id"]: b["extra_info"] for b in second["benchmarks"]}
    slower, faster = "decode_attention/triton_persistent/contiguous/B64-L4096-var", \
        "decode_attention/triton_persistent/paged/B64-L4096-var"
    first = {g: gates[g][SPEEDUP] for g in (slower, faster)}
    gates[slower][SPEEDUP] *= 0.5
    gates[faster][SPEEDUP] *= 2.0
    path = tmp_path / "second.json"
    path.write_text(json.dumps(second))
    monkeypatch.setattr("sys.argv", ["x", str(run), str(path), "--margin", "0.2", "--expectations-dir", str(tmp_path)])
    expectations_from_run.main()
    derived = Expectations.load(tmp_path, "h100").gates
    assert derived[slower][SPEEDUP]["floor"] == pytest.approx(0.8 * 0.5 * first[slower], abs=1e-3)
    assert derived[faster][SPEEDUP]["floor"] == pytest.approx(0.8 * first[faster], abs=1e-3)
    assert "the lowest of 2" in derived[slower]["provenance"]["runs"]


def test_expectations_from_runs_of_two_gpus_are_refused(tmp_path, monkeypatch, capsys):
    from tools import expectations_from_run
    run = sorted((REPO / ".benchmarks" / "h100").glob("*/0002_*.json"))[-1]
    other = json.loads(run.read_text())
    other["machine_info"]["gpu"]["name"] = "NVIDIA B200"
    path = tmp_path / "b200.json"
    path.write_text(json.dumps(other))
    monkeypatch.setattr("sys.argv", ["x", str(run), str(path), "--expectations-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        expectations_from_run.main()
    assert exit_info.value.code == 2
    assert "from different GPUs" in capsys.readouterr().err and not list(tmp_path.glob("h100.json"))


@pytest.mark.parametrize("verdict", ["quick: not gated", "smoke (no GPU)"])
def test_expectations_from_a_quick_or_smoke_run_are_refused(tmp_path, monkeypatch, capsys, verdict):
    # --quick saved with --benchmark-json (T=8, 10 rounds) or a CPU smoke run: nothing to calibrate with
    from tools import expectations_from_run
    run = json.loads(sorted((REPO / ".benchmarks" / "h100").glob("*/0002_*.json"))[-1].read_text())
    run["benchmarks"][3]["extra_info"]["gate"] = verdict
    path = tmp_path / "quick.json"
    path.write_text(json.dumps(run))
    monkeypatch.setattr("sys.argv", ["x", str(path), "--expectations-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        expectations_from_run.main()
    assert exit_info.value.code == 2 and not list(tmp_path.glob("h100.json"))
    assert f"its benchmarks say '{verdict}': not a measurement" in capsys.readouterr().err


@pytest.mark.parametrize("margin", ["-0.5", "1.2"])
def test_expectations_from_run_refuses_a_margin_outside_0_1(tmp_path, monkeypatch, capsys, margin):
    # -0.5 would put every floor above what was measured; 1.2 would write no floor at all
    from tools import expectations_from_run
    run = sorted((REPO / ".benchmarks" / "h100").glob("*/0002_*.json"))[-1]
    monkeypatch.setattr("sys.argv", ["x", str(run), "--margin", margin, "--expectations-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        expectations_from_run.main()
    assert exit_info.value.code == 2
    assert f"--margin {float(margin)}: must be in [0, 1)" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_host_dependent_metrics_get_the_wider_margin(tmp_path):
    # Partly the host's speed: at least HOST_MARGIN below what was measured, and marked so.
    from suite.expectations import HOST_MARGIN
    measured = {"w/a/c": {SPEEDUP: 4.0, "roofline_fraction": 0.9}}
    update(tmp_path, "h100", measured, margin=0.15, provenance={"commit": "x"}, host_dependent={"w/a/c": {SPEEDUP}})
    entry = Expectations.load(tmp_path, "h100").gates["w/a/c"]
    assert entry[SPEEDUP] == {"floor": 4.0 * (1 - HOST_MARGIN), "measured": 4.0, "margin": HOST_MARGIN,
                              "host_timed": True}
    assert entry["roofline_fraction"] == {"floor": 0.765, "measured": 0.9, "margin": 0.15}


def test_expectations_from_a_run_with_host_timed_benchmarks(tmp_path, monkeypatch):
    # Run 0016 (saved before host_dependent_metrics) marks its host-timed benchmarks host_in_timing:
    # the pageable copy's rate is one; SDPA's decode time is not.
    from suite.expectations import HOST_MARGIN
    from tools import expectations_from_run
    run = next((REPO / ".benchmarks" / "h100" / "Linux-CPython-3.12-64bit").glob("0016_*.json"))
    monkeypatch.setattr("sys.argv", ["x", str(run), "--margin", "0.15", "--expectations-dir", str(tmp_path)])
    expectations_from_run.main()
    gates = Expectations.load(tmp_path, "h100").gates
    assert gates["kv_locality/pageable/256x4096"]["roofline_fraction"]["margin"] == HOST_MARGIN
    assert gates["decode_attention/triton_persistent/contiguous/B64-L4096-uniform"][SPEEDUP]["margin"] == 0.15
