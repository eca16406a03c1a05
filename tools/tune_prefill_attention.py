"""Sweep the Triton prefill kernels' tiles, warps and stages on the GPU, beside SDPA's backends;
prints TFLOP/s per config, best first.

    python -m tools.tune_prefill_attention [--shapes 1x4096 4x4096 1x8192] [--head-dim 128]
"""

import argparse
import itertools

import torch
import torch.nn.attention
import torch.nn.functional
import triton

from kernels import prefill_attention as pa
from kernels.checks import SharedMemoryTooSmall
from kernels.sdpa_decode import BACKENDS
from suite.anchors import unless_declined
from suite.prefill_cases import PrefillCase, check_output, make_inputs, plant_block_edges
from suite.timing import measure
from tools._args import require_cuda, shape

TILES = ((64, 32), (64, 64), (128, 32), (128, 64), (128, 128))
WARPS = (4, 8)
STAGES = (2, 3, 4)
ROUNDS = 20


def _sdpa_rows(case, device):
    """SDPA on [B, H, P, D] (uniform prompts) per backend: with enable_gqa, and with K, V
    expanded to Hq heads first (outside the timed call)."""
    batch, prompt = len(case.prompt_lens), case.prompt_lens[0]
    q = torch.randn(batch, case.q_heads, prompt, case.head_dim, dtype=case.dtype, device=device)
    k, v = (torch.randn(batch, case.kv_heads, prompt, case.head_dim, dtype=case.dtype, device=device)
            for _ in "kv")
    group = case.q_heads // case.kv_heads
    expanded = (k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
    rows = []
    for backend, (kk, vv, gqa) in itertools.product(BACKENDS, ((k, v, True), (*expanded, False))):
        def launch():
            with torch.nn.attention.sdpa_kernel([BACKENDS[backend]]):
                return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
        if unless_declined(launch) is None:
            continue
        seconds = measure(launch, device=device, rounds=ROUNDS, cold=False)
        rows.append((case.flops() / seconds / 1e12, seconds, f"sdpa {backend} {'gqa' if gqa else 'expanded'}"))
    return rows


def _triton_rows(case, inputs, device):
    rows = []
    for name, tile, warps, stages in itertools.product(("triton_cp_async", "triton_tma"), TILES, WARPS, STAGES):
        pa.ROWS_PER_WARP = tile[0] // warps
        pa.NUM_STAGES = stages
        launcher = getattr(pa, name)
        kwargs = dict(tile=tile, num_stages=stages) if name == "triton_cp_async" else dict(tile=tile)
        try:
            launch = launcher(**inputs, **kwargs)
            out = launch()
        except (triton.runtime.errors.OutOfResources, SharedMemoryTooSmall) as exc:  # too large for this GPU
            print(f"  skipped {name} {tile[0]}x{tile[1]} w{warps} s{stages}: {exc}", flush=True)
            continue
        check_output(out, inputs)  # a configuration is timed only once it is right
        seconds = measure(launch, device=device, rounds=ROUNDS, cold=False)
        rows.append((case.flops() / seconds / 1e12, seconds, f"{name} {tile[0]}x{tile[1]} w{warps} s{stages}"))
        print(f"  {rows[-1][0]:6.0f} TFLOP/s  {rows[-1][2]}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", type=shape, default=[(1, 4096), (4, 4096), (1, 8192)],
                        help="BATCHxPROMPT")
    parser.add_argument("--head-dim", type=int, default=128, choices=(64, 128))
    args = parser.parse_args()
    require_cuda(parser, "tune_prefill_attention")
    device = torch.device("cuda")
    for batch, prompt in args.shapes:
        case = PrefillCase((prompt,) * batch, 32, 8, args.head_dim, torch.bfloat16)
        print(f"{case}:", flush=True)
        inputs = make_inputs(case, device)
        plant_block_edges(inputs, case)  # checks that see one dropped row
        rows = _sdpa_rows(case, device) + _triton_rows(case, inputs, device)
        rows.sort(key=lambda r: -r[0])
        print(f"{case}, best first:", flush=True)
        for tflops, seconds, what in rows[:12]:
            print(f"  {tflops:6.0f} TFLOP/s {seconds * 1e6:9.1f} us  {what}", flush=True)


if __name__ == "__main__":
    main()
