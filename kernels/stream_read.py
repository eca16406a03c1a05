"""A streaming read: the read-roofline calibration kernel (reads every byte once, writes one
float per program)."""

import torch
import triton
import triton.language as tl

BLOCK = 8192  # int32 words per program step (32 KB)
STEPS = 8  # steps per program: 256 KB per program keeps the grid small


@triton.jit
def _read(x_ptr, partial_ptr, n, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * BLOCK * STEPS
    acc = tl.zeros([BLOCK], tl.int32)
    for step in tl.static_range(STEPS):
        offs = base + step * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(x_ptr + offs, mask=offs < n, other=0)
    tl.store(partial_ptr + tl.program_id(0), tl.xor_sum(acc, 0))


def stream_read(x):
    # x: any contiguous tensor; returns a launch() that reads all of it
    words = x.view(torch.int32).flatten()
    grid = (triton.cdiv(words.numel(), BLOCK * STEPS),)
    partial = torch.empty(grid[0], dtype=torch.int32, device=x.device)

    def launch():
        _read[grid](words, partial, words.numel(), BLOCK=BLOCK, STEPS=STEPS, num_warps=8)
        return partial

    return launch
