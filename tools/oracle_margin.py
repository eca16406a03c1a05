"""How close each decode-attention variant comes to the correctness check's rounding bound
(suite/decode_cases.py): random cases over the property tests' space on the GPU, the worst error / bound
per variant and KV format. A kernel that starts rounding more shows here before a check fails.

    python -m tools.oracle_margin [--seconds 400] [--seed 24]

Cases: 1-16 sequences of 1-5000 positions, 1-8 KV heads, query groups up to 16, head dim 64 or 128,
fp16 or bf16, page sizes 1, 3, 16, 54 and 64, strided views, int8, int4 and fp8 caches, half of them with
keys planted at the block edges. A case beyond the bound is printed when found, and the tool exits 1.
"""

import argparse
import random
import sys
import time

import torch

from kernels.checks import HEAD_DIMS
from suite.decode_cases import (FUSED_DEQUANT, PAGE_SIZES, VARIANTS, DecodeCase, block_edges, bound_ratio,
                                make_case_tensors, plant_dominant_keys, poisoned_out, reference_and_spreads,
                                rounding_bound)
from tools._args import positive_int, require_cuda

FORMATS = ("none", "none", "int8", "int4", "fp8")  # half the cases unquantized


def draw(rng):
    """A random case of the property tests' GPU space, and whether to plant keys at its block edges."""
    batch, kv_heads, quant = rng.randint(1, 16), rng.choice((1, 2, 4, 8)), rng.choice(FORMATS)
    case = DecodeCase(seq_lens=tuple(rng.randint(1, 5000) for _ in range(batch)),
                      q_heads=kv_heads * rng.choice((1, 2, 3, 4, 5, 8, 16)), kv_heads=kv_heads,
                      head_dim=rng.choice(HEAD_DIMS), dtype=rng.choice((torch.float16, torch.bfloat16)),
                      layout=rng.choice(("contiguous", "paged")), page_size=rng.choice(PAGE_SIZES),
                      spare=rng.randint(0, 70), strided=quant == "none" and rng.random() < 0.5, quant=quant)
    return case, rng.random() < 0.5


def margin(launcher, case, planted, device):
    """The worst |out - reference| / bound over the elements of one launch on fresh inputs."""
    inputs, _ = make_case_tensors(case, device)
    if planted:
        plant_dominant_keys(inputs, [block_edges(n, case.page_size) for n in case.seq_lens])
    out = launcher(**inputs, out=poisoned_out(inputs))()
    expected, spread, absolute = reference_and_spreads(inputs)
    return bound_ratio(out, expected, rounding_bound(case.dtype, expected, spread, absolute)).nan_to_num(
        float("inf")).max().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=positive_int, default=400, help="stop drawing cases after this long")
    parser.add_argument("--seed", type=int, default=24)
    args = parser.parse_args()
    require_cuda(parser, "oracle_margin")
    device, rng, worst, cases, beyond = torch.device("cuda"), random.Random(args.seed), {}, 0, 0
    start = time.monotonic()
    while time.monotonic() - start < args.seconds:
        case, planted = draw(rng)
        for name, launcher in VARIANTS.items():
            if case.quant != "none" and name not in FUSED_DEQUANT:
                continue
            try:
                ratio = margin(launcher, case, planted, device)
            except ValueError as exc:  # a launcher's documented refusal (cuda_persistent's limits)
                print(f"refused by {name}: {exc}")
                continue
            key = (name, case.quant)
            worst[key] = max(worst.get(key, 0.0), ratio)
            if ratio > 1:
                beyond += 1
                print(f"BEYOND THE BOUND {ratio:.3f}: {name} {case} planted={planted}", flush=True)
        cases += 1
    print(f"{cases} cases in {time.monotonic() - start:.0f} s on {torch.cuda.get_device_name(0)}; worst error / "
          "bound:")
    for (name, quant), ratio in sorted(worst.items()):
        print(f"  {name:18s} {quant:5s} {ratio:.3f}")
    sys.exit(1 if beyond else 0)


if __name__ == "__main__":
    main()
