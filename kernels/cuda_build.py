"""Build layer for the CUDA C++ sources in kernels/cuda/ (SPEC 2.1, 2.4): NVRTC through cuda-python.

Why NVRTC and not torch's extension builder: a source compiles in well under a second with no
host compiler, where torch.utils.cpp_extension took 63 s on the H100 machine; kernels are plain
`extern "C" __global__` functions, launched through the driver API on torch's current stream,
so they can be captured in CUDA graphs like any torch kernel.

Each (source, defines, architecture) compiles once per process and is cached on disk under
$KERNEL_SUITE_CACHE (default ~/.cache/kernel-suite/cubin), keyed by the source text and every
header it can include, the options, the architecture, NVRTC's version and the NVRTC library files
loaded (path, size, modification time: nvrtcVersion names major.minor only, and a patch release
compiles differently too): a change of any of them never reuses a stale build. Every CUDA call's status is
checked; a failed compile raises with NVRTC's log.
"""

import ctypes
import functools
import hashlib
import os
import tempfile
from pathlib import Path

import torch

from kernels import hw
from kernels.checks import SharedMemoryTooSmall

SOURCE_DIR = Path(__file__).parent / "cuda"
CACHE_DIR = Path(os.environ.get("KERNEL_SUITE_CACHE", Path.home() / ".cache" / "kernel-suite")) / "cubin"
STD = "--std=c++17"
MAX_STATIC_SMEM = 48 * 1024  # beyond this a kernel must opt in to dynamic shared memory


class CudaError(RuntimeError):
    pass


def bindings():
    """cuda-python's driver and NVRTC modules: a declared dependency, so missing is an error."""
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError as exc:
        raise ImportError("the CUDA kernels need cuda-python (pip install cuda-bindings nvidia-cuda-nvrtc): "
                          f"{exc}") from exc
    return driver, nvrtc


def check(result, call):
    """cuda-python returns (status, *values): raise on any status but success, else the values."""
    driver, nvrtc = bindings()
    status, *values = result if isinstance(result, tuple) else (result,)
    if isinstance(status, nvrtc.nvrtcResult):
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CudaError(f"{call}: {nvrtc.nvrtcGetErrorString(status)[1].decode()}")
    elif status != driver.CUresult.CUDA_SUCCESS:
        name = driver.cuGetErrorName(status)[1]
        raise CudaError(f"{call}: {name.decode() if name else status}")
    return values[0] if len(values) == 1 else values


def arch_for(capability) -> str:
    """NVRTC's target for a compute capability. sm_90a / sm_100a ('a': the arch-specific features,
    wgmma and friends) run only on exactly that capability, which is the device being targeted."""
    major, minor = capability
    return f"sm_{major}{minor}a" if major >= 9 else f"sm_{major}{minor}"


def nvrtc_version():
    return tuple(check(bindings()[1].nvrtcVersion(), "nvrtcVersion"))


@functools.cache
def nvrtc_identity():
    """NVRTC's version and the library files that answer it, as (path, size, mtime) from this
    process's mappings (Linux, where cuda-bindings is installed)."""
    version = nvrtc_version()  # loads the library
    with open("/proc/self/maps") as maps:
        paths = sorted({line.split()[-1] for line in maps if "libnvrtc" in line.rsplit("/", 1)[-1]})
    return version, [(path, os.stat(path).st_size, os.stat(path).st_mtime_ns) for path in paths]


def _headers():
    return {p.name: p.read_bytes() for p in sorted(SOURCE_DIR.glob("*.cuh"))}


def options(arch, defines):
    return [STD, f"--gpu-architecture={arch}", f"--include-path={SOURCE_DIR}"] + \
        [f"-D{name}={value}" for name, value in sorted(defines.items())]


def cache_key(source, arch, defines):
    digest = hashlib.sha256()
    for part in [source.encode(), *(n.encode() + b"\0" + t for n, t in _headers().items()),
                 " ".join(options(arch, defines)).encode(), repr(nvrtc_identity()).encode()]:
        digest.update(part + b"\0")
    return digest.hexdigest()[:32]


def compile_cubin(name, arch, defines=None) -> bytes:
    """kernels/cuda/<name>.cu compiled for `arch` with -D`defines`: the cubin, from the disk cache
    when this exact build was made before."""
    defines = defines or {}
    source = (SOURCE_DIR / f"{name}.cu").read_text()
    path = CACHE_DIR / f"{name}-{arch}-{cache_key(source, arch, defines)}.cubin"
    if path.exists():
        return path.read_bytes()
    cubin = nvrtc_compile(name, arch, defines, source)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=CACHE_DIR, delete=False) as f:  # atomic: no torn cubins
        f.write(cubin)
    os.replace(f.name, path)
    return cubin


def nvrtc_compile(name, arch, defines=None, source=None) -> bytes:
    """kernels/cuda/<name>.cu (or `source`) compiled by NVRTC, no cache: the cubin."""
    defines = defines or {}
    source = source if source is not None else (SOURCE_DIR / f"{name}.cu").read_text()
    _, nvrtc = bindings()
    program = check(nvrtc.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), 0, [], []),
                    "nvrtcCreateProgram")
    try:
        opts = [o.encode() for o in options(arch, defines)]
        status = nvrtc.nvrtcCompileProgram(program, len(opts), opts)[0]
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            size = check(nvrtc.nvrtcGetProgramLogSize(program), "nvrtcGetProgramLogSize")
            log = b" " * size
            check(nvrtc.nvrtcGetProgramLog(program, log), "nvrtcGetProgramLog")
            raise CudaError(f"NVRTC failed to compile {name}.cu for {arch} with {defines}:\n"
                            f"{log.decode(errors='replace')}")
        size = check(nvrtc.nvrtcGetCUBINSize(program), "nvrtcGetCUBINSize")
        cubin = b" " * size
        check(nvrtc.nvrtcGetCUBIN(program, cubin), "nvrtcGetCUBIN")
    finally:
        check(nvrtc.nvrtcDestroyProgram(program), "nvrtcDestroyProgram")
    return cubin


class Kernel:
    """One __global__ function of a loaded module; call it with grid, block, shared-memory bytes
    and (value, ctype) arguments: ctype None for a driver struct such as a tensor map."""

    def __init__(self, function, name):
        self.function, self.name = function, name
        self.smem_limit = None  # dynamic bytes a launch may ask for without opting in: set on first use

    def _allow(self, smem):
        driver, _ = bindings()
        if self.smem_limit is None:  # static and dynamic shared memory share the 48 KB a block gets unasked
            self.smem_limit = MAX_STATIC_SMEM - self.static_smem()
        if smem > self.smem_limit:
            check(driver.cuFuncSetAttribute(
                self.function, driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem),
                f"cuFuncSetAttribute({self.name}, max dynamic smem {smem})")
            self.smem_limit = smem

    def static_smem(self):
        driver, _ = bindings()
        return check(driver.cuFuncGetAttribute(driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
                                               self.function), f"cuFuncGetAttribute({self.name}, static smem)")

    def check_shared(self, smem, device):
        """SharedMemoryTooSmall where `smem` bytes of dynamic shared memory and the function's static
        ones exceed what a block may have."""
        need, limit = smem + self.static_smem(), hw.shared_memory_per_block(device)
        if need > limit:
            raise SharedMemoryTooSmall(f"{self.name} needs {need} bytes of shared memory per block ({smem} "
                                       f"dynamic), more than the {limit} a block may have on this GPU")

    def blocks_per_sm(self, threads, smem):
        """Blocks of `threads` threads and `smem` bytes of dynamic shared memory that one SM holds at
        once (the driver's occupancy calculator: registers, static and dynamic shared memory, the
        per-block reserve); check_shared first."""
        self._allow(smem)
        driver, _ = bindings()
        return check(driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(self.function, threads, smem),
                     f"cuOccupancyMaxActiveBlocksPerMultiprocessor({self.name}, {threads}, {smem})")

    def __call__(self, grid, block, smem, *args):
        driver, _ = bindings()
        self._allow(smem)
        grid, block = (tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3]
        stream = driver.CUstream(torch.cuda.current_stream().cuda_stream)
        values, ctypes_ = zip(*args)
        check(driver.cuLaunchKernel(self.function, *grid, *block, smem, stream, (values, ctypes_), 0),
              f"cuLaunchKernel({self.name}, grid={grid}, block={block}, smem={smem})")


def pointer(tensor):
    return tensor.data_ptr(), ctypes.c_void_p


def int32(value):
    return int(value), ctypes.c_int32


def int64(value):
    return int(value), ctypes.c_int64


def struct(value):
    return value, None


@functools.cache
def kernel(name, function, device_index, defines=()):
    """`function` of kernels/cuda/<name>.cu built for the device, loaded into torch's context."""
    driver, _ = bindings()
    device = torch.device("cuda", device_index)
    torch.cuda.init()
    with torch.cuda.device(device):
        torch.empty(1, device=device)  # torch's primary context exists and is current on this thread
        cubin = compile_cubin(name, arch_for(torch.cuda.get_device_capability(device)), dict(defines))
        module = check(driver.cuModuleLoadData(cubin), f"cuModuleLoadData({name})")
        return Kernel(check(driver.cuModuleGetFunction(module, function.encode()),
                            f"cuModuleGetFunction({name}.{function})"), f"{name}.{function}")
