"""What the compiler makes of a launcher's choices, on any machine: capture the arguments a launcher
passes to its Triton kernel, compile that kernel for a GPU (no GPU needed) and read its TTGIR,
registers and shared memory.

    python -m suite.kernel_ir [--gpu sm_120]   # decode and prefill attention's builds, as JSON

Run it without TRITON_INTERPRET: the interpreter replaces the kernels that this compiles.
"""

import argparse
import contextlib
import itertools
import json
import re
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
import triton
from triton._C.libtriton import native_specialize_impl  # Triton's own argument types (tensor descriptors)
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.errors import OutOfResources
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels import hw

# name -> (target, shared memory per SM, the most a block may opt in to): H100/H200, B200, and consumer
# Blackwell (sm_120 and sm_121: RTX 50, GB10), whose SMs hold 100 KB and a block 99 KB, as an sm_86's.
GPUS = {"sm_90": (GPUTarget("cuda", 90, 32), 228 * 1024, 227 * 1024),
        "sm_100": (GPUTarget("cuda", 100, 32), 228 * 1024, 227 * 1024),
        "sm_120": (GPUTarget("cuda", 120, 32), 100 * 1024, 99 * 1024)}
SM90 = GPUS["sm_90"][0]
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32", torch.int16: "i16",
          torch.int8: "i8", torch.uint8: "u8", torch.float8_e4m3fn: "fp8e4nv"}
OPTIONS = ("num_warps", "num_stages", "maxnreg")
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"  # ships with Triton


def capture_launch(module, kernel_name, run, grids=None, target=SM90):
    """(kernel, args, meta) of the one `kernel[grid](*args, **meta)` that run() makes (binding the
    launcher included: launchers hold on to the kernel), without running it; its grid is appended
    to `grids` if given. A launcher's `kernel.warmup(...)` compiles for target instead of the device."""
    kernel, calls = getattr(module, kernel_name), []

    class Recorder:
        def __getitem__(self, grid):
            if grids is not None:
                grids.append(grid)
            return lambda *args, **meta: calls.append((args, meta))

        def warmup(self, *args, grid, **meta):
            compiled = compile_for(kernel, args, meta, target)

            def init_handles():  # where Triton refuses a build larger than a block (planned_for's GPU)
                limit = hw.shared_memory_per_block("cpu")
                if compiled.metadata.shared > limit:
                    raise OutOfResources(compiled.metadata.shared, limit, "shared memory")

            return SimpleNamespace(n_regs=registers(compiled), metadata=compiled.metadata, _init_handles=init_handles)

    setattr(module, kernel_name, Recorder())
    try:
        run()
    finally:
        setattr(module, kernel_name, kernel)
    assert len(calls) == 1, f"{kernel_name}: expected one launch, got {len(calls)}"
    return kernel, *calls[0]


def _names(kernel, listed):
    return {kernel.arg_names[i] if isinstance(i, int) else i for i in listed or ()}


def compile_for(kernel, args, meta, target=SM90):
    """Compile as Triton would for these arguments on a GPU of this target: 16-byte aligned pointers
    and ints divisible by 16 get the divisibility attribute, ints equal to 1 become constants, except
    where the kernel says not to specialize. Returns the compiled kernel (asm: ttgir, ptx, cubin)."""
    no_spec = _names(kernel, kernel.do_not_specialize)
    no_align = no_spec | _names(kernel, kernel.do_not_specialize_on_alignment)
    positional = dict(zip(kernel.arg_names, args))
    values = positional | {k: v for k, v in meta.items() if k not in OPTIONS}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        value = values[name]
        if name not in positional or value is None or (
                isinstance(value, int) and value == 1 and name not in no_spec):
            signature[name], constexprs[(i,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + DTYPES[value.dtype]
            if value.data_ptr() % 16 == 0 and name not in no_align:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, TensorDescriptor):
            signature[name] = native_specialize_impl(BaseBackend, value, False, True, True)[0]
        elif isinstance(value, int):
            signature[name] = "i32"
            if value % 16 == 0 and name not in no_spec:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    options = {k: meta[k] for k in OPTIONS if k in meta}
    return triton.compile(source, target=target, options=options)


def resource_usage(cubin):
    """cuobjdump's resource usage of a cubin: {"REG": registers per thread, "LOCAL": bytes, ...}."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True)
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage.stdout)}


def registers(compiled):
    """Registers per thread of a compiled Triton kernel."""
    return resource_usage(compiled.asm["cubin"])["REG"]


def buffered_tiles(ttgir, rows, cols, dtype="bf16"):
    """Leading dims of the shared-memory allocations of [rows, cols] tiles: a pipelined load's
    buffer count (1: no prefetch)."""
    return [int(n) for n in re.findall(rf"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x{rows}x{cols}x{dtype}", ttgir)]


@contextlib.contextmanager
def planned_for(gpu, dram_gbps=None):
    """Launchers plan for the named GPU's shared memory (GPUS) and dram_gbps of peak DRAM bandwidth
    (None: unknown) while this is open."""
    real = hw.shared_memory_per_sm, hw.shared_memory_per_block, hw.peak_dram_gbps
    _, per_sm, per_block = GPUS[gpu]
    hw.shared_memory_per_sm, hw.shared_memory_per_block = (lambda device: per_sm), (lambda device: per_block)
    hw.peak_dram_gbps = lambda device: dram_gbps
    try:
        yield GPUS[gpu][0]
    finally:
        hw.shared_memory_per_sm, hw.shared_memory_per_block, hw.peak_dram_gbps = real


FAST_LONG = "contiguous, long equal tiles, one per SM, fast memory"
FAST_LONG_PAGED = "paged, long equal tiles, one per SM, fast memory"
FAST_LONG_SHORT_STEPS = "contiguous, long equal tiles, short steps, fast memory"
FAST_MEMORY = (FAST_LONG, FAST_LONG_PAGED, FAST_LONG_SHORT_STEPS)


def decode_attention_builds(gpu="sm_90"):
    """{case: {stages, table_pages, block_n, warps, kv_buffers, registers, programs_per_sm, shared}} of
    triton_persistent's builds for small bf16 cases: the stages, hoisted table entries, K/V step and
    warps per program the launcher chose, the leading dims of its [BLOCK_N, D] K and V tile buffers,
    registers per thread, programs per SM in its grid and shared memory bytes per program. Cases:
    contiguous and paged as the launcher sizes them (every tile in one wave; paged with 2 and 3
    programs per SM); short steps: contiguous with four equal tiles per program, contiguous with
    short equal tiles twice the programs (a one-warp program each, 4 per SM), contiguous with more
    unequal tiles than 3 programs per SM hold (4 per SM), paged with more equal tiles than one wave
    of 3 per SM (4 per SM); paged on one program (many tiles per program); paged with one-position
    pages, whose tiles have too many pages to hoist their block-table entries (one table load per
    step); paged with equal tiles of LONG_TILE positions, one per SM (a deeper pipeline); and on
    memory of DEEP_GBPS_PER_SM per SM (an H200's), equal tiles of LONG_TILE positions, one per SM
    (both layouts: long steps) and contiguous ones in short steps, two per SM (a deeper pipeline).
    Planned and compiled for the named GPU (GPUS), on hw.num_sms("cpu") SMs; the case names say what
    an H100 gets (a smaller SM may plan them differently)."""
    from kernels import decode_attention, decode_plan
    from suite.decode_cases import DecodeCase, make_inputs

    result = {}
    two, three = (300, 500), (2000, 1500, 1800, 900, 1700, 1600)  # 2 and 3 programs per SM (2 KV heads, 4 SMs)
    for name, lens, layout, programs, page in (("contiguous", two, "contiguous", None, 16),
                                               ("contiguous, equal tiles, short steps", (300,) * 16, "contiguous",
                                                None, 16),
                                               ("contiguous, equal tiles, short steps, one warp", (300,) * 8,
                                                "contiguous", None, 16),
                                               ("paged, one wave", two, "paged", None, 16),
                                               ("paged, one wave, 3 per SM", three, "paged", None, 16),
                                               ("paged, many tiles per program", two, "paged", 1, 16),
                                               ("paged, equal tiles, short steps", (640,) * 8, "paged", None, 16),
                                               ("contiguous, unequal tiles, short steps",
                                                (900, 700, 500, 300, 850, 650, 450, 250), "contiguous", None, 16),
                                               ("paged, table per step, one wave", three, "paged", None, 1),
                                               ("paged, long equal tiles, one per SM", (4096,) * 2, "paged", None,
                                                16),
                                               (FAST_LONG, (4096,) * 2, "contiguous", None, 16),
                                               (FAST_LONG_PAGED, (4096,) * 2, "paged", None, 16),
                                               (FAST_LONG_SHORT_STEPS, (4096,) * 8, "contiguous", None, 16)):
        case = DecodeCase(lens, 8, 2, 128, torch.bfloat16, layout, page_size=page)
        inputs = make_inputs(case, "cpu")
        grids = []
        fast = name in FAST_MEMORY
        with planned_for(gpu, decode_plan.DEEP_GBPS_PER_SM * hw.num_sms("cpu") if fast else None) as target:
            kernel, args, meta = capture_launch(
                decode_attention, "_persistent",
                lambda: decode_attention.triton_persistent(**inputs, num_programs=programs)(), grids, target)
            compiled = compile_for(kernel, args, meta, target)
        result[name] = dict(stages=meta["num_stages"], table_pages=meta["TABLE_PAGES"], block_n=meta["BLOCK_N"],
                            warps=meta["num_warps"],
                            registers=registers(compiled),
                            kv_buffers=buffered_tiles(compiled.asm["ttgir"], meta["BLOCK_N"], case.head_dim),
                            programs_per_sm=-(-grids[0][0] // hw.num_sms("cpu")), shared=compiled.metadata.shared)
    return result


def prefill_attention_builds(gpu="sm_90"):
    """{"variant, D": {tile, shared}} of the Triton prefill variants' default builds (bf16), planned and
    compiled for the named GPU (GPUS): the (BLOCK_M, BLOCK_N) the launcher chose and shared memory bytes."""
    from kernels import prefill_attention

    result = {}
    for variant, head_dim in itertools.product(("triton_cp_async", "triton_tma"), (64, 128)):
        q = torch.randn(300, 8, head_dim, dtype=torch.bfloat16)
        k, v = torch.randn(2, 300, 2, head_dim, dtype=torch.bfloat16)
        cu_seqlens = torch.tensor([0, 200, 300], dtype=torch.int32)
        with planned_for(gpu) as target:
            kernel, args, meta = capture_launch(prefill_attention, "_prefill", lambda: getattr(
                prefill_attention, variant)(q, k, v, cu_seqlens)(), target=target)
            compiled = compile_for(kernel, args, meta, target)
        result[f"{variant}, D{head_dim}"] = dict(tile=[meta["BLOCK_M"], meta["BLOCK_N"]],
                                                 shared=compiled.metadata.shared)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", choices=sorted(GPUS), default="sm_90")
    gpu = parser.parse_args().gpu
    print(json.dumps(dict(decode_attention=decode_attention_builds(gpu), prefill_attention=prefill_attention_builds(gpu))))
