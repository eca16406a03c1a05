"""The launch triton_persistent picks for each minimal decode-attention shape on a GPU of N SMs:
grid, K/V step (BLOCK_N), chunk, stages and warps per program, from the launcher alone (no GPU,
nothing compiled).

    python -m tools.decode_launches [--sms 132] [--page-size 16]

Run it without TRITON_INTERPRET: the interpreter replaces the kernel whose launch this captures.
"""

import argparse
import itertools

import torch

from kernels import decode_attention, hw
from suite.decode_cases import seeded_lengths
from suite.kernel_ir import capture_launch


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


def launches(sms, page_size):
    """{(shape, layout): (grid, BLOCK_N, chunk, stages, warps)} over the minimal profile's decode shapes."""
    real_sms, real_registers = hw.num_sms, decode_attention.build_registers
    hw.num_sms = lambda device: sms
    decode_attention.build_registers = lambda *args, **kwargs: 0  # no compile: no register cap is decided
    try:
        result = {}
        for variable, batch, length in itertools.product((False, True), (1, 4, 16, 64), (1024, 4096, 16384)):
            lens = seeded_lengths(batch, length, variable, seed=hash((batch, length)))
            for layout in ("contiguous", "paged"):
                inputs = _inputs(lens, layout, page_size)
                grids = []
                kernel, args, meta = capture_launch(decode_attention, "_persistent",
                                                    lambda: decode_attention.triton_persistent(**inputs)(), grids)
                shape = f"B{batch}-L{length}-{'var' if variable else 'uniform'}"
                result[shape, layout] = (grids[0][0], meta["BLOCK_N"], args[kernel.arg_names.index("chunk_size")],
                                         meta["num_stages"], meta["num_warps"])
        return result
    finally:
        hw.num_sms, decode_attention.build_registers = real_sms, real_registers


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sms", type=int, default=132, help="SM count (H100 SXM: 132, B200: 148)")
    parser.add_argument("--page-size", type=int, default=16)
    args = parser.parse_args()
    if args.sms < 1 or args.page_size < 1:
        parser.error("--sms and --page-size must be positive")
    print("shape               layout      grid  BLOCK_N  chunk  stages  warps")
    for (shape, layout), (grid, block_n, chunk, stages, warps) in launches(args.sms, args.page_size).items():
        print(f"{shape:19s} {layout:10s} {grid:5d} {block_n:8d} {chunk:6d} {stages:7d} {warps:6d}")


if __name__ == "__main__":
    main()
