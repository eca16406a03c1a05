"""Sweep the Triton decode kernels' launch constants on the GPU; prints GB/s per config, best first.

    python -m tools.tune_decode_attention
"""

import itertools

import torch

from kernels import decode_attention as da
from suite.decode_cases import DecodeCase, make_inputs, seeded_lengths
from suite.timing import measure

SHAPES = [(1, 4096, False), (1, 1024, False), (16, 1024, False)]
# Module constants of kernels/decode_attention.py to sweep, then the launcher's chunk (last).
SWEEP = {"BLOCK_N": (64, 128), "NUM_STAGES": (2, 3, 4), "NUM_WARPS": (4, 8), "chunk": (128, 256, 512)}


def main():
    names = list(SWEEP)
    for (batch, length, variable), layout in itertools.product(SHAPES, ("contiguous", "paged")):
        case = DecodeCase(seeded_lengths(batch, length, variable, seed=0), 32, 8, 128, torch.bfloat16, layout)
        inputs = make_inputs(case, "cuda")
        results = []
        for values in itertools.product(*SWEEP.values()):
            config = dict(zip(names, values))
            for name in names[:-1]:
                setattr(da, name, config[name])
            seconds = measure(da.triton_persistent(**inputs, chunk=config["chunk"]), device="cuda", rounds=20)
            results.append((case.bytes_moved() / seconds / 1e9, values))
        results.sort(key=lambda r: -r[0])
        print(f"B{batch} L{length} {'var' if variable else 'uni'} {layout}: " +
              ", ".join(f"{'/'.join(map(str, v))} {g:,.0f}" for g, v in results[:6]), flush=True)


if __name__ == "__main__":
    main()
