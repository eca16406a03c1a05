"""Sweep cuda_persistent's launch knobs against triton_persistent on the GPU, shape by shape.

    python -m tools.tune_cuda_decode_attention [--shapes 1x4096 64x4096] [--layouts contiguous paged] [--var]

Prints, per shape, triton_persistent's time and the best cuda_persistent configs (stages, CTAs per
SM, chunk) as a ratio to it: the numbers behind kernels/cuda_decode_attention.py's defaults.
"""

import argparse
import itertools

import torch

from kernels import cuda_decode_attention, decode_attention, hw
from suite.decode_cases import DecodeCase, checked, make_inputs, plant_block_edges, seeded_lengths
from suite.timing import measure
from tools._args import decode_shape, require_cuda

STAGES = (2, 3, 4)
CTAS_PER_SM = (1, 2, 3)
CHUNKS = (None, 256, 512, 1024)  # None: decode_plan.choose_chunk, as the launcher defaults
ROUNDS = 20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", type=decode_shape, default=[(1, 4096), (64, 4096)],
                        help="BATCHxLENGTH")
    parser.add_argument("--layouts", nargs="+", default=["contiguous"], choices=("contiguous", "paged"))
    parser.add_argument("--var", action="store_true", help="lengths uniform in [L/8, L] instead of all L")
    args = parser.parse_args()
    require_cuda(parser, "tune_cuda_decode_attention")
    sms = hw.num_sms("cuda")
    for shape, layout in itertools.product(args.shapes, args.layouts):
        batch, length = shape
        case = DecodeCase(seeded_lengths(batch, length, args.var, seed=batch * length), 32, 8, 128, torch.bfloat16,
                          layout)
        inputs = make_inputs(case, "cuda")
        plant_block_edges(inputs, case)  # checks that see one dropped row
        # every launch is timed only once it is right
        triton_s = measure(checked(decode_attention.triton_persistent(**inputs), inputs), device="cuda", rounds=ROUNDS)
        results = []
        for stages, ctas, chunk in itertools.product(STAGES, CTAS_PER_SM, CHUNKS):
            launch = cuda_decode_attention.cuda_persistent(**inputs, stages=stages, num_programs=ctas * sms,
                                                           chunk=chunk)
            seconds = measure(checked(launch, inputs), device="cuda", rounds=ROUNDS)
            results.append((triton_s / seconds, seconds, f"stages={stages} ctas/SM={ctas} chunk={chunk}"))
        results.sort(key=lambda r: -r[0])
        print(f"B{batch} L{length} {layout} {'var' if args.var else 'uniform'}: triton {triton_s * 1e6:.1f} us; "
              + ", ".join(f"{name} {s * 1e6:.1f} us {r:.2f}x" for r, s, name in results[:4]), flush=True)


if __name__ == "__main__":
    main()
