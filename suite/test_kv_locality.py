"""kv_locality's host-side pieces (SPEC 2.8): NUMA topology, thread pinning, the table, the command
without a GPU; and, on a GPU, that every source's copy arrives bit for bit."""

import ctypes
import errno
import mmap
import os

import pytest
import torch

from kernels import hw
from suite import kv_locality

pytestmark = pytest.mark.offload


def _fake_nodes(tmp_path, nodes):
    # nodes: {node: (cpulist, MemTotal kB)}, laid out as /sys/devices/system/node
    for node, (cpulist, mem_kb) in nodes.items():
        folder = tmp_path / f"node{node}"
        folder.mkdir()
        (folder / "cpulist").write_text(cpulist + "\n")
        (folder / "meminfo").write_text(f"Node {node} MemTotal:       {mem_kb} kB\nNode {node} MemFree: 1 kB\n")
    return tmp_path


def test_parse_cpulist():
    assert kv_locality.parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert kv_locality.parse_cpulist("5") == [5]


def test_remote_node_is_another_node_with_memory_and_cpus(tmp_path):
    # node 1: memory, no CPUs (a Grace GPU's HBM, a CXL expander); node 2: CPUs, no memory
    root = _fake_nodes(tmp_path, {0: ("0-1", 1000), 1: ("", 4096), 2: ("2-3", 0), 3: ("4-5", 2000)})
    assert kv_locality.remote_node(0, root) == 3
    assert kv_locality.remote_node(3, root) == 0
    (tmp_path / "single").mkdir()
    assert kv_locality.remote_node(0, _fake_nodes(tmp_path / "single", {0: ("0", 1000)})) is None


def test_on_node_runs_pinned_to_the_nodes_cpus(tmp_path):
    before = os.sched_getaffinity(0)
    cpu = sorted(before)[0]
    root = _fake_nodes(tmp_path, {0: (str(cpu), 1000)})
    assert kv_locality.on_node(0, lambda: os.sched_getaffinity(0), root) == {cpu}
    assert os.sched_getaffinity(0) == before  # only the worker thread was pinned
    with pytest.raises(ZeroDivisionError):  # what make() raises reaches the caller
        kv_locality.on_node(0, lambda: 1 / 0, root)


def test_table_reports_each_source_against_pinned_local():
    lines = kv_locality.table({"pageable": 15.0, "pinned_local": 50.0, "hbm": 3000.0})
    assert lines[1].split() == ["pageable", "15.0", "0.30x"] and lines[3].split() == ["hbm", "3000.0", "60.00x"]


def test_unknown_source_is_refused():
    with pytest.raises(ValueError, match="source must be one of"):
        kv_locality.allocate("swap", 4, 4, "cpu")


def test_command_validates_its_flags_and_needs_a_gpu(capsys):
    with pytest.raises(SystemExit):
        kv_locality.main(["--rows", "0"])
    assert "--rows must be >= 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            kv_locality.main([])
        assert "kv_locality copies into a GPU" in capsys.readouterr().err


def test_page_nodes_reports_where_each_page_lies():
    # touched pages lie on a node with memory; a page never touched has none yet (-ENOENT)
    size = 4 * os.sysconf("SC_PAGE_SIZE")
    pages = mmap.mmap(-1, size)
    address = ctypes.addressof(ctypes.c_char.from_buffer(pages))
    ctypes.memset(address, 1, size // 2)
    nodes = kv_locality.page_nodes(address, size)
    assert nodes[2:] == [-errno.ENOENT] * 2 and set(nodes[:2]) <= set(hw.memory_nodes())


@pytest.mark.requires_cuda
def test_pinned_slab_lies_on_its_node_and_is_page_locked():
    node = kv_locality.gpu_node(0)[0]
    slab = kv_locality.pinned_on_node((64, 1024), torch.float16, node)
    assert slab.is_pinned() and slab.shape == (64, 1024) and slab.abs().sum() > 0
    assert set(kv_locality.page_nodes(slab.data_ptr(), slab.numel() * 2)) == {node}


@pytest.mark.requires_cuda
@pytest.mark.parametrize("source", [pytest.param(s, marks=[pytest.mark.requires_numa_remote] if s == "pinned_remote"
                                                 else []) for s in kv_locality.SOURCES])
def test_copy_arrives_bit_for_bit(source, device):
    src, dst = kv_locality.allocate(source, 33, 4096, device)
    assert src.is_pinned() == source.startswith("pinned")
    kv_locality.copies(src, dst, 2)()
    torch.cuda.synchronize()
    assert torch.equal(dst.cpu().view(torch.int16), src.cpu().view(torch.int16))
