"""The launch triton_persistent picks for each minimal decode-attention shape on a GPU of N SMs:
grid, K/V step (BLOCK_N), chunk, stages and warps per program, and whether each program takes its tile
from the grid alone ("direct": a program per tile of the capacity, no work list), from the launcher alone
(no GPU; for an H100-sized SM nothing compiled). With --registers each launch is also compiled
(suite/kernel_ir.py, no GPU either, a few minutes): its register cap (the launcher's, "-" for
none), registers per thread and stack bytes (spills show as a stack). --gpu sm_120 plans for a
100 KB SM (GB10: --sms 48), which compiles the builds: how many share an SM decides the launch.
--dram-gbps plans for a GPU of that peak DRAM bandwidth (H200: 4814; unset: planned as an H100).

    python -m tools.decode_launches [--sms 132] [--gpu sm_90] [--dram-gbps 4814] [--page-size 16] [--registers]
        [--shapes B1-L4096-uniform ...]

Run it without TRITON_INTERPRET: the interpreter replaces the kernel whose launch this captures.
"""

import argparse
import itertools

import torch

from kernels import decode_attention, hw
from tools._args import positive_int
from suite.decode_cases import seeded_lengths
from suite.interpreter import INTERPRET_ENV
from suite.kernel_ir import GPUS, capture_launch, compile_for, planned_for, resource_usage


def _inputs(lens, layout, page_size):
    # empty tensors of the benchmarks' shapes (Hq 32, Hkv 8, D 128, bf16): the launch is captured, not run
    batch, longest = len(lens), max(lens)
    common = dict(q=torch.empty(batch, 32, 128, dtype=torch.bfloat16), seq_lens=torch.tensor(lens, dtype=torch.int32))
    if layout == "contiguous":
        cache = torch.empty(batch, 8, longest, 128, dtype=torch.bfloat16)
        return common | dict(k_cache=cache, v_cache=cache)
    pages = [-(-n // page_size) for n in lens]
    cache = torch.empty(sum(pages), page_size, 8, 128, dtype=torch.bfloat16)
    table = torch.zeros(batch, max(pages), dtype=torch.int32)
    first = 0
    for row, count in enumerate(pages):
        table[row, :count] = torch.arange(first, first + count)
        first += count
    return common | dict(k_cache=cache, v_cache=cache, block_table=table)


def launches(sms, page_size, registers=False, shapes=None, gpu="sm_90", dram_gbps=None):
    """{(shape, layout): (grid, BLOCK_N, chunk, stages, warps, direct)} over the minimal profile's decode shapes
    (or those named in `shapes`) on the named GPU (suite.kernel_ir.GPUS); registers: each compiled for
    it, with (cap, registers, stack bytes), on a GPU of dram_gbps peak DRAM bandwidth (None: an H100's
    plan). Off an H100-sized SM the launcher's builds are compiled anyway: how many share an SM decides
    the launch."""
    real_sms, real_resources = hw.num_sms, decode_attention.build_resources
    hw.num_sms = lambda device: sms
    if not registers and GPUS[gpu][1:] == GPUS["sm_90"][1:]:
        decode_attention.build_resources = lambda *args, **kwargs: (0, 0)  # no compile: no register cap
    try:
        result, usage = {}, {}
        for variable, batch, length in itertools.product((False, True), (1, 4, 16, 64), (1024, 4096, 16384)):
            shape = f"B{batch}-L{length}-{'var' if variable else 'uniform'}"
            if shapes is not None and shape not in shapes:
                continue
            lens = seeded_lengths(batch, length, variable, seed=hash((batch, length)))
            for layout in ("contiguous", "paged"):
                inputs = _inputs(lens, layout, page_size)
                grids = []
                with planned_for(gpu, dram_gbps) as target:
                    kernel, args, meta = capture_launch(decode_attention, "_persistent",
                                                        lambda: decode_attention.triton_persistent(**inputs)(), grids,
                                                        target)
                launch = (grids[0][0], meta["BLOCK_N"], args[kernel.arg_names.index("chunk_size")],
                          meta["num_stages"], meta["num_warps"], meta["TILE_PER_PROGRAM"])
                if registers:
                    build = tuple(sorted(meta.items()))  # one compile per distinct build
                    if build not in usage:
                        usage[build] = resource_usage(compile_for(kernel, args, meta, target).asm["cubin"])
                    launch += (meta.get("maxnreg"), usage[build]["REG"], usage[build]["STACK"])
                result[shape, layout] = launch
        return result
    finally:
        hw.num_sms, decode_attention.build_resources = real_sms, real_resources


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sms", type=positive_int, default=132, help="SM count (H100 SXM: 132, B200: 148)")
    parser.add_argument("--page-size", type=positive_int, default=16)
    parser.add_argument("--gpu", choices=sorted(GPUS), default="sm_90",
                        help="plan for this GPU's shared memory and compile for it (sm_120: GB10, with --sms 48)")
    parser.add_argument("--dram-gbps", type=positive_int, help="peak DRAM GB/s (H100 SXM 3352, H200 4814); "
                        "unset: planned as an H100")
    parser.add_argument("--registers", action="store_true", help="compile each launch for --gpu: cap, registers, stack")
    parser.add_argument("--shapes", nargs="+", help="only these, e.g. B1-L4096-uniform B64-L1024-var")
    args = parser.parse_args()
    known = {f"B{b}-L{n}-{kind}" for b in (1, 4, 16, 64) for n in (1024, 4096, 16384) for kind in ("uniform", "var")}
    if args.shapes and set(args.shapes) - known:
        parser.error(f"--shapes: unknown {sorted(set(args.shapes) - known)}; minimal shapes are B{{1,4,16,64}}-"
                     f"L{{1024,4096,16384}}-{{uniform,var}}")
    if hw.interpreting():  # the launcher skips its register and shared-memory fit there: other launches
        parser.error(f"run without {INTERPRET_ENV}=1: the launches it lists would not be the GPU's")
    columns = "shape               layout      grid  BLOCK_N  chunk  stages  warps  direct"
    print(columns + ("  cap  regs  stack" if args.registers else ""))
    for (shape, layout), launch in launches(args.sms, args.page_size, args.registers, args.shapes, args.gpu,
                                            args.dram_gbps).items():
        grid, block_n, chunk, stages, warps, direct = launch[:6]
        line = (f"{shape:19s} {layout:10s} {grid:5d} {block_n:8d} {chunk:6d} {stages:7d} {warps:6d} "
                f"{'yes' if direct else '-':>7}")
        if args.registers:
            cap, regs, stack = launch[6:]
            line += f" {cap or '-':>4} {regs:5d} {stack:6d}"
        print(line)


if __name__ == "__main__":
    main()
