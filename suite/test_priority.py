"""stream_priority's measuring pieces that need no GPU: percentiles, the trace reader, the
timeline picture."""

import json

import pytest
import torch

from suite.priority import kernel_intervals, main, percentile, timeline_png


def test_percentile_interpolates():
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert (percentile(values, 0), percentile(values, 50), percentile(values, 100)) == (1.0, 3.0, 5.0)
    assert percentile(values, 99) == pytest.approx(4.96)
    assert percentile([7.0], 99) == 7.0


def _trace(tmp_path):
    events = [{"cat": "kernel", "name": "_prefill_0d1d", "ts": 100.0, "dur": 900.0, "args": {"stream": 7}},
              {"cat": "kernel", "name": "decode_step", "ts": 150.0, "dur": 40.0, "args": {"stream": 13}},
              {"cat": "kernel", "name": "decode_step", "ts": 1010.0, "dur": 40.0, "args": {"stream": 13}},
              {"cat": "cpu_op", "name": "aten::mm", "ts": 90.0, "dur": 5.0}]  # host events are not kernels
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    return path


def test_kernel_intervals_reads_kernels_per_stream(tmp_path):
    lanes = kernel_intervals(_trace(tmp_path))
    assert lanes == {7: [(100.0, 900.0, "_prefill_0d1d")],
                     13: [(150.0, 40.0, "decode_step"), (1010.0, 40.0, "decode_step")]}


def test_timeline_png_draws_every_interval(tmp_path):
    lanes = kernel_intervals(_trace(tmp_path))
    path = tmp_path / "timeline.png"
    drawn = timeline_png(lanes, {7: "prefill stream", 13: "decode stream"}, path, "test")
    assert drawn == {7: 1, 13: 2}
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_trace_command_refuses_a_tile_it_does_not_run(capsys):
    with pytest.raises(SystemExit):
        main(["--priority", "decode_high", "--tile", "32", "32", "--folder", "unused"])
    assert "--tile must be one of" in capsys.readouterr().err


def test_trace_command_needs_a_gpu(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: the trace runs (test_stream_priority_bench.py)")
    with pytest.raises(SystemExit) as exit_info:
        main(["--folder", str(tmp_path)])
    assert exit_info.value.code == 2 and "stream_priority traces CUDA streams" in capsys.readouterr().err
