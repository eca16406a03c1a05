"""Sweep the persistent decode kernel's launch constants on the GPU; prints GB/s per config.

    python -m tools.tune_decode_attention
"""

import itertools

import torch

from kernels import decode_attention as da
from suite.decode_cases import DecodeCase, make_inputs, seeded_lengths
from suite.timing import measure

SHAPES = [(1, 4096, False), (4, 4096, False), (1, 16384, False), (64, 4096, False), (16, 4096, True)]
CONFIGS = list(itertools.product((2, 3), (1, 2, 4), (None, 128, 256, 512)))  # stages, programs/SM, chunk


def main():
    for (batch, length, variable), layout in itertools.product(SHAPES, ("contiguous", "paged")):
        lengths = seeded_lengths(batch, length, variable, seed=0)
        case = DecodeCase(lengths, 32, 8, 128, torch.bfloat16, layout, 16)
        inputs = make_inputs(case, "cuda")
        results = []
        for stages, per_sm, chunk in CONFIGS:
            da.NUM_STAGES, da.PROGRAMS_PER_SM = stages, per_sm
            seconds = measure(da.triton_persistent(**inputs, chunk=chunk), device="cuda", rounds=20)
            results.append((case.bytes_moved() / seconds / 1e9, stages, per_sm, chunk))
        results.sort(key=lambda r: -r[0])
        best = ", ".join(f"s{s} p{p} c{c}: {g:,.0f}" for g, s, p, c in results[:5])
        worst = ", ".join(f"s{s} p{p} c{c}: {g:,.0f}" for g, s, p, c in results[-2:])
        print(f"B{batch} L{length} {'var' if variable else 'uni'} {layout:10s} best {best} | worst {worst}",
              flush=True)


if __name__ == "__main__":
    main()
