"""kv_locality benchmarks (SPEC 2.8): GB/s of the [rows, cols] fp16 slab into HBM per source, against
the pinned host-to-device peak measured in this session (hbm: the device copy roofline, bytes
read and written), and each pinned source's speedup over pageable (the baseline).

Flags --rows --cols --iters; the same measurement runs standalone: python -m suite.kv_locality."""

import pytest
import torch

from suite import kv_locality
from suite.timing import measure, run_benchmark

pytestmark = pytest.mark.offload

WORKLOAD = "kv_locality"
BASELINE = "pageable"


@pytest.mark.requires_cuda
@pytest.mark.parametrize("source", [pytest.param(s, marks=[pytest.mark.requires_numa_remote] if s == "pinned_remote"
                                                 else []) for s in kv_locality.SOURCES])
def test_kv_locality(benchmark, source, device, perf, rounds, pytestconfig):
    rows, cols, iters = (pytestconfig.getoption(name) for name in ("rows", "cols", "iters"))
    gate_id = f"{WORKLOAD}/{source}/{rows}x{cols}"
    perf.skip_if_not_applicable(gate_id)
    src, dst = kv_locality.allocate(source, rows, cols, device)  # allocation and placement: untimed
    launch = kv_locality.checked(kv_locality.copies(src, dst, iters), src, dst)  # correctness before timing
    # pinned and device sources copy asynchronously: each round is held until all `iters` copies are
    # enqueued, so the host's dispatch cost per copy stays out of the link's GB/s; a pageable
    # copy makes the host stage every byte, and that cost is what pageable measures
    seconds = run_benchmark(benchmark, launch, device=device, rounds=rounds, cold=False,
                            cover_enqueue=source != BASELINE)
    node, found = kv_locality.gpu_node(torch.device(device).index or 0)
    benchmark.extra_info.update(gpu_numa_node=node, gpu_numa_node_from=found)
    slab = src.numel() * src.element_size()
    device_copy = source == "hbm"
    if source == BASELINE:
        perf.set_baseline(WORKLOAD, f"{rows}x{cols}", seconds)

    def baseline_seconds():
        base_src, base_dst = kv_locality.allocate(BASELINE, rows, cols, device)
        return measure(kv_locality.checked(kv_locality.copies(base_src, base_dst, iters), base_src, base_dst),
                       device=device, rounds=rounds, cold=False)

    speedups = {} if source == BASELINE else {"baseline": perf.baseline(WORKLOAD, f"{rows}x{cols}", baseline_seconds)}
    perf.record(benchmark, gate_id, seconds, shape=dict(source=source, rows=rows, cols=cols, iters=iters),
                bytes_moved=iters * slab * (2 if device_copy else 1), roofline_kind="copy" if device_copy else "h2d",
                speedups=speedups)


def test_checked_refuses_a_copy_that_never_arrives():
    # no GPU needed: a pageable slab into host memory; the second call proves checked() poisons dst first
    src, dst = kv_locality.allocate(BASELINE, 4, 64, "cpu")
    kv_locality.checked(kv_locality.copies(src, dst, 1), src, dst)
    with pytest.raises(AssertionError, match="differs from its source"):
        kv_locality.checked(lambda: None, src, dst)
