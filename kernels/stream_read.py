"""A streaming read: the read-roofline calibration kernel (reads every byte once, writes one
int32 per program)."""

import torch
import triton
import triton.language as tl

BLOCK = 8192  # int32 words per program step (32 KB)
STEPS = 8  # steps per program: 256 KB per program keeps the grid small
# The read roofline's tilings (BLOCK, STEPS, warps); the fastest is the ceiling. H100, 4 GiB read
# cold: 8192 x 16 x 8 warps 3181 GB/s, 8192 x 8 x 8 3155, 4096 x 16 x 8 3143 (1 GiB: 3148, 3090,
# 3091); 16384-word steps and persistent grids of 1-4 programs per SM were no faster (3092-3150).
TILINGS = ((8192, 16, 8), (8192, 8, 8), (4096, 16, 8))


@triton.jit
def _read(x_ptr, partial_ptr, n, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * BLOCK * STEPS
    acc = tl.zeros([BLOCK], tl.int32)
    for step in tl.static_range(STEPS):
        offs = base + step * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(x_ptr + offs, mask=offs < n, other=0)
    tl.store(partial_ptr + tl.program_id(0), tl.xor_sum(acc, 0))


def stream_read(x, block=BLOCK, steps=STEPS, num_warps=8):
    # x: any contiguous tensor; returns a launch() that reads all of it
    words = x.view(torch.int32).flatten()
    grid = (triton.cdiv(words.numel(), block * steps),)
    partial = torch.empty(grid[0], dtype=torch.int32, device=x.device)

    def launch():
        _read[grid](words, partial, words.numel(), BLOCK=block, STEPS=steps, num_warps=num_warps)
        return partial

    return launch
