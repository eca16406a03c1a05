"""Sweep the persistent decode kernel's launch constants on the GPU; prints GB/s per config.

    python -m tools.tune_decode_attention
"""

import itertools

import torch

from kernels import decode_attention as da
from suite.decode_cases import DecodeCase, make_inputs, seeded_lengths
from suite.timing import measure

SHAPES = [(1, 4096, False), (64, 4096, False), (16, 4096, True), (64, 16384, True)]
CONFIGS = list(itertools.product((4, 8), (2, 3, 4), (1, 2, 4)))  # warps, stages, programs per SM


def main():
    for (batch, length, variable), layout in itertools.product(SHAPES, ("contiguous", "paged")):
        lengths = seeded_lengths(batch, length, variable, seed=0)
        case = DecodeCase(lengths, 32, 8, 128, torch.bfloat16, layout, 16)
        inputs = make_inputs(case, "cuda")
        results = []
        for warps, stages, per_sm in CONFIGS:
            da.NUM_WARPS, da.NUM_STAGES, da.PROGRAMS_PER_SM = warps, stages, per_sm
            seconds = measure(da.triton_persistent(**inputs), device="cuda", rounds=20)
            results.append((case.bytes_moved() / seconds / 1e9, warps, stages, per_sm))
        results.sort(reverse=True)
        best = ", ".join(f"w{w} s{s} p{p}: {g:,.0f}" for g, w, s, p in results[:4])
        worst = ", ".join(f"w{w} s{s} p{p}: {g:,.0f}" for g, w, s, p in results[-2:])
        print(f"B{batch} L{length} {'var' if variable else 'uni'} {layout:10s} best {best} | worst {worst}",
              flush=True)


if __name__ == "__main__":
    main()
