"""Hardware predicates. Each returns (ok, what_was_probed) so a skip can say both.

Probes that launch kernels run once per process (functools.cache).
"""

import ctypes
import functools
import glob
import os
import shutil
from pathlib import Path

import torch
import triton

# Programs per "SM" when Triton runs in the interpreter on the CPU: small, so that persistent
# loops really iterate over several tiles per program on tiny test shapes.
INTERPRETER_SMS = 4
# The interpreter has no shared memory: launches are planned as for an H100 (228 KB an SM, 227 KB a block).
INTERPRETER_SHARED_MEMORY = 228 * 1024
INTERPRETER_SHARED_MEMORY_PER_BLOCK = 227 * 1024


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def has_cuda():
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    return True, f"CUDA device 0: {torch.cuda.get_device_name(0)}"


def capability():
    return torch.cuda.get_device_capability(0) if torch.cuda.is_available() else (0, 0)


def num_sms(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def shared_memory_per_sm(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return INTERPRETER_SHARED_MEMORY
    return torch.cuda.get_device_properties(device).shared_memory_per_multiprocessor


def shared_memory_per_block(device) -> int:
    """The most shared memory a block may opt in to: what Triton checks a build against at launch."""
    device = torch.device(device)
    if device.type != "cuda":
        return INTERPRETER_SHARED_MEMORY_PER_BLOCK
    index = torch.cuda.current_device() if device.index is None else device.index
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def peak_dram_gbps(device):
    """The GPU's peak DRAM bandwidth in GB/s from its memory clock and bus width (double data rate),
    as triton.testing.get_dram_gbps computes it; None without a GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = torch.cuda.current_device() if device.index is None else device.index
    props = triton.runtime.driver.active.utils.get_device_properties(index)
    return props["mem_clock_rate"] * 1e3 * props["mem_bus_width"] * 2 / 8 / 1e9  # kHz, bits


def l2_bytes(device) -> int:
    return torch.cuda.get_device_properties(torch.device(device)).L2_cache_size


class ProbeFailed(RuntimeError):
    """A probe kernel failed where the hardware has its feature: a defect of the kernel, its build or the
    driver, not a missing feature, so what needs the feature fails rather than skips."""


@functools.cache
def _probe(run_probe, what, where, *args):
    # (True, what ran) or (False, why it failed) of run_probe(*args), once per process
    try:
        run_probe(*args)
    except Exception as exc:  # kept: every call raises it as ProbeFailed
        return False, f"{what} failed {where}: {type(exc).__name__}: {exc}"
    return True, f"{what} ran exactly {where}"


def _must_pass(run_probe, what, where, *args):
    ok, probed = _probe(run_probe, what, where, *args)
    if not ok:
        raise ProbeFailed(probed)
    return ok, probed


def _kernel_probe(min_capability, run_probe, what, *args):
    ok, why = has_cuda()
    if not ok:
        return False, why
    if capability() < min_capability:
        return False, f"compute capability {capability()} < {min_capability}"
    if interpreting():
        return False, "TRITON_INTERPRET=1 does not compile for the device"
    return _must_pass(run_probe, what, f"on {torch.cuda.get_device_name(0)} (capability {capability()})", *args)


def tma_ready():
    """Both ways the suite emits TMA: a CUDA kernel (NVRTC, cp.async.bulk.tensor) and Triton's
    tensor descriptors. Raises ProbeFailed where either fails on sm_90+."""
    from kernels.probes import cuda_tma_probe, triton_tma_probe

    ok, cuda_probed = _kernel_probe((9, 0), cuda_tma_probe, "TMA probe kernel (CUDA, cp.async.bulk.tensor)")
    if not ok:
        return ok, cuda_probed
    _, triton_probed = _kernel_probe((9, 0), triton_tma_probe, "TMA probe kernel (Triton tensor descriptors)")
    return True, f"{cuda_probed}; {triton_probed}"


def fp8_fused_ready():
    """The fused FP8 decode kernel with its values checked, from sm_89 and in the interpreter on the
    CPU. Raises ProbeFailed where it runs and fails or is wrong."""
    from kernels.probes import fp8_decode_probe

    what = "the fused FP8 decode kernel (triton_persistent on an fp8-e4m3 cache)"
    if interpreting() and not torch.cuda.is_available():
        return _must_pass(fp8_decode_probe, what, "in the Triton interpreter (CPU)", "cpu")
    return _kernel_probe((8, 9), fp8_decode_probe, what, "cuda")


NODES = "/sys/devices/system/node"


def memory_nodes(root=NODES) -> list:
    """Ids of the NUMA nodes that have memory, ascending."""
    nodes = []
    for meminfo in sorted(glob.glob(f"{root}/node[0-9]*/meminfo")):
        with open(meminfo) as f:
            if any("MemTotal:" in line and int(line.split()[-2]) > 0 for line in f):
                nodes.append(int(os.path.basename(os.path.dirname(meminfo))[4:]))
    return sorted(nodes)


def numa_nodes_with_memory() -> int:
    return len(memory_nodes())


def placeable_nodes(root=NODES) -> list:
    """Nodes with memory and CPUs, ascending: a thread on their CPUs places pages there by first
    touch. (A memory-only node, such as a Grace GPU's HBM or a CXL expander, has no CPU to touch from.)"""
    def has_cpus(node):
        path = Path(root) / f"node{node}" / "cpulist"
        return path.exists() and path.read_text().strip() != ""
    return [node for node in memory_nodes(root) if has_cpus(node)]


def pin_thread(cpus):
    """Run the calling thread on these CPUs only (first touches then place pages on their node)."""
    os.sched_setaffinity(0, cpus)


def numa_remote(root=NODES):
    nodes = placeable_nodes(root)
    if len(nodes) < 2:
        return False, f"{root} lists {len(nodes)} NUMA node(s) with memory and CPUs"
    return True, f"{len(nodes)} NUMA nodes with memory and CPUs"


def multi_gpu():
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        return False, f"torch.cuda.device_count() == {count}"
    if not torch.cuda.can_device_access_peer(0, 1):
        return False, "GPUs 0 and 1 have no peer access"
    return True, f"{count} GPUs, 0 <-> 1 peer access"


PCI_DEVICES = "/sys/bus/pci/devices"
PCIE_GENERATIONS = {"2.5": 1, "5.0": 2, "8.0": 3, "16.0": 4, "32.0": 5, "64.0": 6}  # GT/s per lane


def pci_path(device, root=PCI_DEVICES):
    """The GPU's PCI device directory in sysfs."""
    props = torch.cuda.get_device_properties(torch.device(device))
    return Path(root) / f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"


def pcie_link(path):
    """'PCIe Gen5 x16' from a PCI device directory's current_link_speed ('32.0 GT/s PCIe') and
    current_link_width; None where sysfs does not say."""
    try:
        speed = (path / "current_link_speed").read_text().split()[0]
        width = (path / "current_link_width").read_text().strip()
    except (OSError, IndexError):
        return None
    gen = PCIE_GENERATIONS.get(speed)
    return f"PCIe Gen{gen} x{width}" if gen else f"PCIe {speed} GT/s x{width}"


def host_link(device, root=PCI_DEVICES):
    """(kind, how it was found) of the GPU's link to host memory. NVLink-C2C where the GPU reads
    pageable host memory through the host's own page tables (Grace: the coherent chip-to-chip link;
    x86 HMM reads pageable memory through its own tables instead); else PCIe, as sysfs negotiated it."""
    from kernels.cuda_build import bindings, check

    driver, _ = bindings()
    index = torch.device(device).index or 0
    attr = driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES
    if check(driver.cuDeviceGetAttribute(attr, index), "cuDeviceGetAttribute"):
        return "NVLink-C2C", "the GPU reads pageable host memory through the host's page tables"
    path = pci_path(device, root)
    link = pcie_link(path)
    if link is None:
        return "PCIe", f"{path}: no current_link_speed/width"
    return "PCIe", f"{link} ({path})"


NVML_NVLINK_MAX_LINKS = 18
NVML_NVLINK_DEVICE_TYPE_SWITCH = 2


class _NvmlPciInfo(ctypes.Structure):  # nvmlPciInfo_t
    _fields_ = [("busIdLegacy", ctypes.c_char * 16), ("domain", ctypes.c_uint), ("bus", ctypes.c_uint),
                ("device", ctypes.c_uint), ("pciDeviceId", ctypes.c_uint), ("pciSubSystemId", ctypes.c_uint),
                ("busId", ctypes.c_char * 32)]


def peer_link(a, b):
    """(kind, how it was found) of the link between GPUs a and b: 'peer NVLink' when an active
    NVLink of GPU a reaches b's PCI address or an NVSwitch, else 'peer PCIe' (NVML, through ctypes);
    'none' without peer access. A missing NVML is said, not guessed."""
    if not torch.cuda.can_device_access_peer(a, b):
        return "none", f"GPUs {a} and {b} have no peer access"
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError as exc:
        return "peer (link unknown)", f"libnvidia-ml.so.1 not loadable: {exc}"
    if nvml.nvmlInit_v2():
        return "peer (link unknown)", "nvmlInit_v2 failed"
    try:
        ids = [torch.cuda.get_device_properties(d) for d in (a, b)]
        bus_id = f"{ids[0].pci_domain_id:08x}:{ids[0].pci_bus_id:02x}:{ids[0].pci_device_id:02x}.0".encode()
        handle = ctypes.c_void_p()
        if nvml.nvmlDeviceGetHandleByPciBusId_v2(bus_id, ctypes.byref(handle)):
            return "peer (link unknown)", f"NVML has no device at {bus_id.decode()}"
        direct = switched = 0
        for link in range(NVML_NVLINK_MAX_LINKS):
            state, kind, pci = ctypes.c_uint(), ctypes.c_int(), _NvmlPciInfo()
            if nvml.nvmlDeviceGetNvLinkState(handle, link, ctypes.byref(state)) or state.value != 1:
                continue
            if not nvml.nvmlDeviceGetNvLinkRemoteDeviceType(handle, link, ctypes.byref(kind)) \
                    and kind.value == NVML_NVLINK_DEVICE_TYPE_SWITCH:
                switched += 1
            elif not nvml.nvmlDeviceGetNvLinkRemotePciInfo_v2(handle, link, ctypes.byref(pci)) and \
                    (pci.domain, pci.bus, pci.device) == (ids[1].pci_domain_id, ids[1].pci_bus_id, ids[1].pci_device_id):
                direct += 1
    finally:
        nvml.nvmlShutdown()
    if direct:
        return "peer NVLink", f"{direct} active NVLinks from GPU {a} to GPU {b} (NVML)"
    if switched:
        return "peer NVLink", f"GPU {a} has {switched} active NVLinks to NVSwitches (NVML)"
    return "peer PCIe", f"no active NVLink of GPU {a} reaches GPU {b} (NVML)"


def nvcc():
    path = shutil.which("nvcc")
    if path is None:
        return False, "nvcc not found on PATH"
    return True, f"nvcc at {path}"


# marker name -> predicate; suite/plugin.py turns a False into a skip with "needs <feature>: <probe>", and
# a ProbeFailed into a failure of each test that needs the feature.
PREDICATES = {
    "requires_cuda": ("a CUDA device", has_cuda),
    "requires_tma": ("TMA (sm_90+ and a TMA probe kernel)", tma_ready),
    "requires_fp8_fused": ("fused FP8 decode (sm_89+)", fp8_fused_ready),
    "requires_numa_remote": ("a remote NUMA node", numa_remote),
    "requires_multi_gpu": ("two GPUs with peer access", multi_gpu),
    "requires_nvcc": ("nvcc", nvcc),
}
