"""kv_locality (SPEC 2.8): an H2D copy of a [rows, cols] fp16 slab into HBM, by where the slab lives.

Sources: pageable host memory; pinned memory on the GPU's NUMA node (pinned_local) and on another
node (pinned_remote); another HBM buffer (hbm, device to device). Pinned pages are placed by first
touch: fresh anonymous pages are touched from a thread pinned to the CPUs of the chosen node, then
page-locked where they lie (cudaHostRegister), and where the host has several nodes every page's
node is checked. (torch's pinned allocator would hand back a freed block of the same size class,
pinned wherever its pages already lie.) Allocation and placement happen before timing; copies are timed with CUDA
events, `iters` copies per timed round. Asynchronous sources (pinned, hbm) are enqueued behind a
GPU-side wait that the host releases after dispatching all `iters` copies, so GB/s is the
link's; a pageable copy makes the host stage every byte, so its host cost is part of its GB/s.

    python -m suite.kv_locality [--rows 256] [--cols 4096] [--iters 200]
"""

import argparse
import ctypes
import math
import mmap
import os
import platform
import threading
from pathlib import Path

import torch

from kernels import hw

SOURCES = ("pageable", "pinned_local", "pinned_remote", "hbm")
DEFAULTS = dict(rows=256, cols=4096, iters=200)
NODES = hw.NODES
MOVE_PAGES = {"x86_64": 279, "aarch64": 239}  # the move_pages syscall's number per architecture


def parse_cpulist(text):
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11] (the kernel's cpulist format)."""
    cpus = []
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def node_cpus(node, root=NODES):
    return parse_cpulist((Path(root) / f"node{node}" / "cpulist").read_text())


def gpu_node(device=0):
    """(NUMA node of the GPU's PCI device, how it was found). A single-node system reports -1,
    which is node 0; a system without the sysfs entry is taken as node 0, and says so."""
    path = hw.pci_path(device) / "numa_node"
    if not path.exists():
        return 0, f"{path} missing: node 0 assumed"
    return max(int(path.read_text()), 0), f"{path}"


def remote_node(local, root=NODES):
    """Another node with memory and CPUs, or None."""
    return next((node for node in hw.placeable_nodes(root) if node != local), None)


def on_node(node, make, root=NODES):
    """make(), run in a thread pinned to the CPUs of `node`: its first touches place the pages
    there. Returns what make() returned; raises what it raised."""
    result = {}

    def run():
        try:
            hw.pin_thread(node_cpus(node, root))
            result["value"] = make()
        except BaseException as exc:  # re-raised in the caller below
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def page_nodes(address, size):
    """The NUMA node of every page of [address, address + size), by move_pages(2) given no target
    nodes (it only reports). Raises OSError where the kernel refuses."""
    arch = platform.machine()
    if arch not in MOVE_PAGES:
        raise OSError(f"move_pages: no syscall number known for {arch} (known: {sorted(MOVE_PAGES)})")
    page = os.sysconf("SC_PAGE_SIZE")
    count = -(-size // page)
    pages = (ctypes.c_void_p * count)(*range(address, address + count * page, page))
    status = (ctypes.c_int * count)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if libc.syscall(ctypes.c_long(MOVE_PAGES[arch]), 0, ctypes.c_ulong(count), pages, None, status, 0) != 0:
        raise OSError(ctypes.get_errno(), f"move_pages: {os.strerror(ctypes.get_errno())}")
    return list(status)


class _LockedPages(mmap.mmap):
    """Anonymous pages, page-locked once touched (registered), unlocked before they are unmapped:
    when the last tensor viewing them is gone."""
    address = None

    def __del__(self):
        if self.address is not None:
            torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(self.address))


def pinned_on_node(shape, dtype, node, root=NODES):
    """A host tensor of random values whose pages lie on `node`, page-locked for asynchronous copies.
    Where the host has several nodes with memory, every page's node is checked."""
    size = math.prod(shape) * dtype.itemsize
    pages = _LockedPages(-1, size)  # fresh pages: none is placed before the first touch below
    tensor = torch.frombuffer(pages, dtype=dtype).view(shape)
    address = tensor.data_ptr()
    on_node(node, lambda: ctypes.memset(address, 0x3C, size), root)  # one thread, on the node's CPUs
    if len(hw.memory_nodes(root)) > 1:
        misplaced = [n for n in page_nodes(address, size) if n != node]
        if misplaced:
            raise RuntimeError(f"pinned memory for node {node}: {len(misplaced)} pages landed elsewhere "
                               f"(move_pages reports {sorted(set(misplaced))})")
    tensor.normal_()
    torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(address, size, 0))
    pages.address = address
    return tensor


def allocate(source, rows, cols, device):
    """The source slab [rows, cols] fp16 (random, never zeros) and the HBM destination."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    dst = torch.empty(rows, cols, dtype=torch.float16, device=device)
    if source == "hbm":
        return torch.randn(rows, cols, dtype=torch.float16, device=device), dst
    if source == "pageable":
        return torch.randn(rows, cols, dtype=torch.float16), dst
    local, _ = gpu_node(torch.device(device).index or 0)
    node = local if source == "pinned_local" else remote_node(local)
    if node is None:
        raise RuntimeError("pinned_remote: no other NUMA node with memory (requires_numa_remote)")
    return pinned_on_node((rows, cols), torch.float16, node), dst


def copies(src, dst, iters):
    """launch(): `iters` copies of src into dst (asynchronous from pinned or device memory)."""
    blocking = not (src.is_pinned() or src.is_cuda)

    def launch():
        for _ in range(iters):
            dst.copy_(src, non_blocking=not blocking)

    return launch


def checked(launch, src, dst):
    """launch, once it has copied src into dst (poisoned first) bit for bit: every timed copy,
    a baseline measured on demand included, is checked first."""
    dst.fill_(float("nan"))
    launch()
    # compared where dst lies: a multi-threaded CPU pass over the pinned source just before timing
    # cut its H2D rate from 51 to 31-43 GB/s (IQR 14-29%) on the H100 machine
    assert torch.equal(dst.view(torch.int16), src.to(dst.device).view(torch.int16)), "the copy differs from its source"
    return launch


def table(results):
    """Lines of the standalone command's table: source, GB/s, ratio to pinned_local."""
    base = results.get("pinned_local")
    lines = [f"{'source':<14}{'GB/s':>10}{'vs pinned_local':>18}"]
    for source, gbps in results.items():
        ratio = f"{gbps / base:.2f}x" if base else "-"
        lines.append(f"{source:<14}{gbps:>10.1f}{ratio:>18}")
    return lines


def main(argv=None):
    from suite.timing import measure

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in DEFAULTS.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args(argv)
    for name in DEFAULTS:
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    ok, probed = hw.has_cuda()
    if not ok:
        parser.error(f"kv_locality copies into a GPU: {probed}")
    results = {}
    for source in SOURCES:
        if source == "pinned_remote" and not hw.numa_remote()[0]:
            print(f"pinned_remote: skipped, {hw.numa_remote()[1]}")
            continue
        src, dst = allocate(source, args.rows, args.cols, "cuda")
        seconds = measure(checked(copies(src, dst, args.iters), src, dst), device="cuda", rounds=5, cold=False,
                          cover_enqueue=source != "pageable")
        results[source] = args.iters * src.numel() * src.element_size() / seconds / 1e9
        del src, dst
    print("\n".join(table(results)))


if __name__ == "__main__":
    main()
