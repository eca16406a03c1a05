"""Tests of the command-line tools under tools/ (SPEC 7): a bad argument is a usage error (exit 2)
naming its flag and, for choices, listing them, found before any GPU is looked for; a tool that
runs kernels refuses to start without a CUDA device, saying what was probed."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from suite.interpreter import INTERPRET_ENV

GPU_TOOLS = ("tune_decode_attention", "tune_cuda_decode_attention", "tune_prefill_attention",
             "persistence_crossover", "paged_placement", "oracle_margin")

BAD = [  # (tool, argv, what stderr must say)
    ("tune_decode_attention", ["--shapes", "64"], ["--shapes", "'64' is not BATCHxLENGTH"]),
    ("tune_decode_attention", ["--shapes", "64x4096", "0x4096"], ["--shapes", "must be >= 1"]),
    ("tune_decode_attention", ["--shapes", "2048x1024"], ["--shapes", "MAX_BATCH 1024"]),
    ("tune_decode_attention", ["--quant", "int3"], ["--quant", "'none', 'int8', 'int4', 'fp8'"]),
    ("tune_decode_attention", ["--layouts", "strided"], ["--layouts", "'contiguous', 'paged'"]),
    ("tune_cuda_decode_attention", ["--shapes", "4xL"], ["--shapes", "'4xL' is not BATCHxLENGTH"]),
    ("tune_cuda_decode_attention", ["--shapes", "1x4096x2"], ["--shapes", "is not BATCHxLENGTH"]),
    ("tune_cuda_decode_attention", ["--layouts", "blocked"], ["--layouts", "'contiguous', 'paged'"]),
    ("tune_prefill_attention", ["--shapes", "1x-4096"], ["--shapes", "must be >= 1"]),
    ("tune_prefill_attention", ["--head-dim", "96"], ["--head-dim", "64, 128"]),
    ("persistence_crossover", ["--steps", "0"], ["--steps", "must be >= 1, got 0"]),
    ("persistence_crossover", ["--steps", "x"], ["--steps", "'x' is not an int"]),
    ("persistence_crossover", ["--batches", "4", "-1"], ["--batches", "must be >= 1, got -1"]),
    ("paged_placement", ["--page-size", "0"], ["--page-size", "must be >= 1, got 0"]),
    ("paged_placement", ["--rounds", "0"], ["--rounds", "must be >= 1, got 0"]),
    ("paged_placement", ["--shapes", "64"], ["--shapes", "is not BATCHxLENGTH"]),
    ("paged_placement", ["--shapes", "16x1000"], ["--shapes", "not a multiple of --page-size 16"]),
    ("oracle_margin", ["--seconds", "0"], ["--seconds", "must be >= 1, got 0"]),
    ("oracle_margin", ["--seed", "x"], ["--seed", "invalid int value: 'x'"]),
    ("decode_launches", ["--sms", "0"], ["--sms", "must be >= 1, got 0"]),
    ("decode_launches", ["--page-size", "-16"], ["--page-size", "must be >= 1, got -16"]),
    ("decode_launches", ["--gpu", "sm_1"], ["--gpu", "'sm_100', 'sm_120', 'sm_90'"]),
    ("decode_launches", ["--dram-gbps", "0"], ["--dram-gbps", "must be >= 1, got 0"]),
    ("decode_launches", ["--shapes", "B2-L1-x"], ["--shapes", "unknown ['B2-L1-x']"]),
    ("expectations_from_run", ["missing.json"], ["run: no such file: missing.json"]),
    ("expectations_from_run", ["missing.json", "--metrics", "bogus"], ["--metrics", "'speedup_vs_anchor'"]),
    ("expectations_from_run", ["missing.json", "--margin", "1.5"], ["--margin 1.5: must be in [0, 1)"]),
    ("report", ["missing.json"], ["run: no such file: missing.json"]),
    ("report", ["--latest", "--compare", "missing.json"], ["--compare: no such file: missing.json"]),
    ("trend", ["missing.json"], ["run: no such file: missing.json"]),
    ("trend", ["--min-change", "1.5"], ["--min-change 1.5: must be in (0, 1)"]),
    ("trend", ["--history", "0"], ["--history", "must be >= 1, got 0"]),
    ("trend", ["--confirm", "-2"], ["--confirm", "must be >= 1, got -2"]),
    ("trend", [], ["no saved run under .benchmarks/"]),
]
# what a tool says of a file that is not a saved run: (content, message)
NOT_A_RUN = [
    ("{not json", "not a saved run: not valid JSON"),
    ("[1, 2]", "not a saved run: no list of benchmarks"),
    ('{"benchmarks": []}', "not a saved run: no list of benchmarks"),
    ('{"benchmarks": [{"name": "t", "stats": {"median": 1e-3, "iqr": 0}}]}',
     "not a saved run of this suite: machine_info has no gpu name"),
    ('{"machine_info": {"gpu": {"name": "G"}}, "benchmarks": [{"name": "t"}]}', "benchmark 't' has no stats median"),
]


@pytest.mark.parametrize("tool", ["report", "trend", "expectations_from_run"])
@pytest.mark.parametrize("content, says", NOT_A_RUN, ids=[says for _, says in NOT_A_RUN])
def test_a_file_that_is_not_a_saved_run_is_a_usage_error_naming_it(tool, content, says, tmp_path, monkeypatch,
                                                                  capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "0001_bad.json").write_text(content)
    code, err = run_main(tool, ["0001_bad.json"], monkeypatch, capsys)
    assert code == 2 and f"0001_bad.json: {says}" in err


def run_main(tool, argv, monkeypatch, capsys):
    """main() of tools.<tool> on argv: (exit code, stderr)."""
    module = importlib.import_module(f"tools.{tool}")
    monkeypatch.setattr("sys.argv", [tool, *argv])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("tool, argv, says", BAD, ids=[f"{t}:{' '.join(a)}" for t, a, _ in BAD])
def test_a_bad_argument_is_a_usage_error_naming_its_flag(tool, argv, says, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # missing.json is missing; nothing is written into the checkout
    code, err = run_main(tool, argv, monkeypatch, capsys)
    assert code == 2 and all(text in err for text in says), err
    assert "CUDA" not in err  # the arguments are checked first, on any machine


VALID = {  # a valid command of each GPU tool
    "tune_decode_attention": ["--shapes", "4x1024", "--quant", "none", "int8", "--layouts", "paged"],
    "tune_cuda_decode_attention": ["--shapes", "1x4096", "--layouts", "contiguous", "paged", "--var"],
    "tune_prefill_attention": ["--shapes", "1x1024", "--head-dim", "64"],
    "persistence_crossover": ["--batches", "1", "4", "--steps", "8"],
    "paged_placement": ["--shapes", "4x1024", "--page-size", "16", "--rounds", "3"],
    "oracle_margin": ["--seconds", "5", "--seed", "1"],
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the tools would run")
@pytest.mark.parametrize("defaults", [True, False], ids=["defaults", "given"])
@pytest.mark.parametrize("tool", GPU_TOOLS)
def test_a_gpu_tool_refuses_to_start_without_cuda(tool, defaults, monkeypatch, capsys):
    code, err = run_main(tool, [] if defaults else VALID[tool], monkeypatch, capsys)
    assert code == 2 and f"{tool} needs a CUDA device: torch.cuda.is_available() is False" in err, err


def test_decode_launches_needs_no_gpu_and_refuses_the_interpreter(monkeypatch, capsys):
    # in a process without the interpreter, as the README runs it: the launches the GPU would get
    env = {k: v for k, v in os.environ.items() if k != INTERPRET_ENV}
    listing = subprocess.run([sys.executable, "-m", "tools.decode_launches", "--shapes", "B1-L1024-uniform"], env=env,
                             cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert listing.returncode == 0, listing.stderr
    rows = [line.split()[:2] for line in listing.stdout.splitlines()[1:]]
    assert rows == [["B1-L1024-uniform", "contiguous"], ["B1-L1024-uniform", "paged"]]
    if os.environ.get(INTERPRET_ENV) == "1":  # this process: the launcher would skip its fit to the GPU
        code, err = run_main("decode_launches", ["--shapes", "B1-L1024-uniform"], monkeypatch, capsys)
        assert code == 2 and f"run without {INTERPRET_ENV}=1" in err
