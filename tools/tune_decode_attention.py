"""Sweep the Triton decode kernels' launch constants on the GPU; prints GB/s per config, best first.

    python -m tools.tune_decode_attention [--quant int8 int4 fp8] [--shapes 64x4096 1x4096]
"""

import argparse
import itertools

import torch

from kernels import decode_attention as da, decode_plan, hw
from suite.decode_cases import DecodeCase, checked, make_inputs, plant_block_edges, seeded_lengths
from suite.timing import measure
from tools._args import decode_shape, require_cuda

# Module constants of kernels/decode_plan.py to sweep, then the launcher's chunk (last).
SWEEP = {"BLOCK_N": (32, 64, 128), "NUM_STAGES": (2, 3), "NUM_WARPS": (4, 8), "PROGRAMS_PER_SM": (2, 3, 4),
         "chunk": (1024, 2048)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quant", nargs="+", default=["none"], choices=("none", "int8", "int4", "fp8"))
    parser.add_argument("--shapes", nargs="+", type=decode_shape, default=[(64, 4096)],
                        help="BATCHxLENGTH, uniform lengths")
    parser.add_argument("--layouts", nargs="+", default=["contiguous"], choices=("contiguous", "paged"))
    args = parser.parse_args()
    require_cuda(parser, "tune_decode_attention")
    if "fp8" in args.quant and not hw.fp8_fused_ready()[0]:
        parser.error(f"--quant fp8: {hw.fp8_fused_ready()[1]}")
    names = list(SWEEP)
    for shape, layout, quant in itertools.product(args.shapes, args.layouts, args.quant):
        batch, length = shape
        case = DecodeCase(seeded_lengths(batch, length, False, seed=0), 32, 8, 128, torch.bfloat16, layout,
                          quant=quant)
        inputs = make_inputs(case, "cuda")
        plant_block_edges(inputs, case)  # checks that see one dropped row
        results = []
        for values in itertools.product(*SWEEP.values()):
            config = dict(zip(names, values))
            for name in names[:-1]:
                setattr(decode_plan, name, config[name])
            launch = da.triton_persistent(**inputs, chunk=config["chunk"], block_k=config["BLOCK_N"],
                                          num_programs=config["PROGRAMS_PER_SM"] * hw.num_sms("cuda"))
            seconds = measure(checked(launch, inputs), device="cuda", rounds=20)  # timed once it is right
            results.append((case.bytes_moved() / seconds / 1e9, seconds, values))
        results.sort(key=lambda r: -r[0])
        print(f"B{batch} L{length} {layout} {quant} ({'/'.join(names)}): " +
              ", ".join(f"{'/'.join(map(str, v))} {g:,.0f} GB/s {s * 1e6:.1f} us" for g, s, v in results[:5]),
              flush=True)


if __name__ == "__main__":
    main()
