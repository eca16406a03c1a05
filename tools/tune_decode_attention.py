"""Sweep triton_persistent's launch knobs on the GPU, shape by shape, against its own plan, SDPA and the
paged-read floor.

    python -m tools.tune_decode_attention [--shapes 16x4096 64x4096] [--layouts contiguous paged] [--quant none int8]

Prints, per shape, the launch the plan picks (kernels/decode_plan.py) and its time, and for fp16/bf16
caches SDPA's (the fastest backend on a contiguous cache, timed as the benchmark times it) and, paged,
the paged-read floor's; then the fastest configs (K/V step / stages / programs per SM / chunk) as ratios
to the plan. Every config is checked against the float64 reference before it is timed; the fastest few
are timed again, interleaved with the plan, and ranked by their medians.
"""

import argparse
import itertools
import statistics

import torch
from triton.runtime.errors import OutOfResources

from kernels import decode_attention as da, decode_plan, hw
from suite.anchors import fastest_decode_sdpa, paged_read_floor
from suite.decode_cases import DecodeCase, checked, make_inputs, plant_block_edges, seeded_lengths
from suite.timing import measure
from tools._args import decode_shape, require_cuda

BLOCK_KS = (32, 64, 128)
STAGES = (2, 3, 4, 5)  # 5: one-wave tiles that load their block table every step (PAGED_ONE_WAVE_STAGES)
PROGRAMS_PER_SM = (1, 2, 3, 4)
# every path by which the launcher picks a stage count: one value forced on all of them
STAGE_CONSTANTS = ("NUM_STAGES", "LONG_TILE_STAGES", "PAGED_ONE_WAVE_STAGES")
ROUNDS = 20
FINALISTS, REPEATS = 5, 3


def _bind(inputs, stages, **knobs):
    """A checked launch of triton_persistent with these knobs at `stages`, or None where the build does
    not fit the GPU."""
    saved = {name: getattr(decode_plan, name) for name in STAGE_CONSTANTS}
    for name in STAGE_CONSTANTS:
        setattr(decode_plan, name, stages)
    try:
        return checked(da.triton_persistent(**inputs, **knobs), inputs)
    except OutOfResources:
        return None
    finally:
        for name, value in saved.items():
            setattr(decode_plan, name, value)


def _sdpa_seconds(case):
    # SDPA on a contiguous cache of the same lengths
    dense = make_inputs(DecodeCase(case.seq_lens, case.q_heads, case.kv_heads, case.head_dim, case.dtype,
                                   "contiguous"), "cuda")
    return fastest_decode_sdpa(dense, torch.device("cuda"), ROUNDS)[2]


def tune(batch, length, layout, quant):
    case = DecodeCase(seeded_lengths(batch, length, False, seed=0), 32, 8, 128, torch.bfloat16, layout, quant=quant)
    inputs = make_inputs(case, "cuda")
    plant_block_edges(inputs, case)  # checks that see one dropped row
    sms = hw.num_sms("cuda")
    dims = da.check_decode_args(inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["seq_lens"],
                                inputs["block_table"], None, inputs.get("k_scale"), inputs.get("v_scale"))
    gpu = dict(shared_per_sm=hw.shared_memory_per_sm("cuda"), dram_gbps=hw.peak_dram_gbps("cuda"))
    page_size = case.page_size if layout == "paged" else None
    plan = decode_plan.plan_persistent(dims, sms, page_size, **gpu)
    planned = checked(da.triton_persistent(**inputs), inputs)
    launches, seen = {}, set()
    for block_k, stages, per_sm, chunk in itertools.product(BLOCK_KS, STAGES, PROGRAMS_PER_SM,
                                                            (plan.chunk, plan.chunk // 2)):
        if block_k > chunk:
            continue
        knobs = dict(block_k=block_k, num_programs=per_sm * sms, chunk=chunk)
        grid = decode_plan.plan_persistent(dims, sms, page_size, **gpu, **knobs).grid  # at most one program a tile
        if (block_k, stages, grid, chunk) not in seen:
            seen.add((block_k, stages, grid, chunk))
            launch = _bind(inputs, stages, **knobs)
            if launch is not None:
                launches[block_k, stages, per_sm, chunk] = launch
    first = {config: measure(launch, device="cuda", rounds=ROUNDS) for config, launch in launches.items()}
    finalists = sorted(first, key=first.get)[:FINALISTS]
    times = {config: [] for config in ["plan", *finalists]}
    for _ in range(REPEATS):
        for config in times:
            times[config].append(measure(planned if config == "plan" else launches[config], device="cuda",
                                         rounds=ROUNDS))
    median = {config: statistics.median(t) for config, t in times.items()}
    print(f"B{batch} L{length} {layout} {quant}: {plan}", flush=True)
    line = f"  plan {median['plan'] * 1e6:.1f} us"
    if quant == "none":  # anchors of fp16/bf16 caches
        line += f"; SDPA {_sdpa_seconds(case) * 1e6:.1f} us"
        if layout == "paged":
            line += f"; paged-read floor {paged_read_floor(inputs, torch.device('cuda'), ROUNDS) * 1e6:.1f} us"
    ranked = sorted(finalists, key=median.get)
    print(f"{line}; of {len(launches)} configs (K/V step/stages/programs per SM/chunk): " +
          ", ".join(f"{'/'.join(map(str, c))} {median[c] * 1e6:.1f} us {median['plan'] / median[c]:.3f}x"
                    for c in ranked), flush=True)


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
    for (batch, length), layout, quant in itertools.product(args.shapes, args.layouts, args.quant):
        tune(batch, length, layout, quant)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
