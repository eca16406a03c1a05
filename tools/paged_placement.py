"""What does page placement cost a paged decode? triton_persistent over one paged cache whose block
table places each sequence's pages four ways, beside the same kernel on the contiguous copy of the
cache and the sdpa anchor (which reads that copy: kernels/sdpa_decode.py gathers it before launch);
under each placement's row, the paged-read floor (suite/anchors.py: a bare read of the same pages).

    python -m tools.paged_placement [--shapes 16x4096 64x1024] [--page-size 16] [--rounds 30]

Placements (the K/V bytes read are the same in all four):
- random: pages scattered over the whole cache, as the suite's benchmarks place them;
- random_2mb: pages shuffled only within each 2 MB of the cache, so a sequence touches the same
  2 MB regions in the same order as `consecutive` (what is left is not address translation);
- ascending: random pages, each sequence's in ascending address order;
- consecutive: each sequence's pages one after another.
"""

import argparse

import torch

from kernels import decode_attention, sdpa_decode
from suite.anchors import paged_read_floor
from suite.decode_cases import DecodeCase, checked, make_inputs, plant_block_edges, seeded_lengths
from suite.timing import measure
from tools._args import decode_shape, positive_int, require_cuda

REGION = 2 << 20  # bytes of the coarsest address-translation page on Hopper


def placements(table, page_bytes):
    # table: [B, pages] int32 of a cache whose every page is used -> {name: [B, pages] int32}
    batch, pages = table.shape
    consecutive = torch.arange(batch * pages, device=table.device, dtype=torch.int32)
    per_region = max(1, REGION // page_bytes)
    local = torch.cat([part[torch.randperm(part.numel(), device=table.device)]
                       for part in consecutive.split(per_region)])
    return {"random": table, "random_2mb": local.view(batch, pages),
            "ascending": table.sort(dim=1).values.contiguous(), "consecutive": consecutive.view(batch, pages)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", type=decode_shape, help="BATCHxLENGTH, uniform lengths",
                        default=[(16, 1024), (16, 4096), (16, 16384), (64, 1024), (64, 4096), (4, 16384)])
    parser.add_argument("--page-size", type=positive_int, default=16)
    parser.add_argument("--rounds", type=positive_int, default=30)
    args = parser.parse_args()
    for batch, length in args.shapes:
        if length % args.page_size:
            parser.error(f"--shapes: length {length} is not a multiple of --page-size {args.page_size}")
    require_cuda(parser, "paged_placement")
    columns = ("sdpa", "contiguous", "random", "random_2mb", "ascending", "consecutive")
    print("us (sdpa / x) " + " ".join(f"{name:>17s}" for name in columns))
    for batch, length in args.shapes:
        case = DecodeCase(seeded_lengths(batch, length, False, seed=0), 32, 8, 128, torch.bfloat16, "paged",
                          args.page_size)
        inputs = make_inputs(case, "cuda")
        plant_block_edges(inputs, case)  # checks that see one dropped row (placements other than random move them)
        contiguous = dict(inputs, block_table=None,
                          **{name: sdpa_decode.pad_paged(inputs[name], inputs["block_table"], length).contiguous()
                             for name in ("k_cache", "v_cache")})
        page_bytes = inputs["k_cache"][0].numel() * inputs["k_cache"].element_size()
        times = {"sdpa": measure(checked(sdpa_decode.sdpa(**inputs), inputs), device="cuda", rounds=args.rounds),
                 "contiguous": measure(checked(decode_attention.triton_persistent(**contiguous), contiguous),
                                       device="cuda", rounds=args.rounds)}
        floors = {}
        for name, table in placements(inputs["block_table"], page_bytes).items():
            placed = dict(inputs, block_table=table)
            times[name] = measure(checked(decode_attention.triton_persistent(**placed), placed), device="cuda",
                                  rounds=args.rounds)
            floors[name] = paged_read_floor(placed, torch.device("cuda"), args.rounds)
        print(f"B{batch}-L{length} ps{args.page_size}".ljust(14) + " ".join(
            f"{times[name] * 1e6:9.1f} ({times['sdpa'] / times[name]:.3f})" for name in columns), flush=True)
        print("  floor".ljust(14) + " " * 36 + " ".join(
            f"{floors[name] * 1e6:9.1f} ({times['sdpa'] / floors[name]:.3f})" for name in columns[2:]), flush=True)
        del inputs, contiguous
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
