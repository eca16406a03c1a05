"""Decode-attention cases: a description, fresh random tensors from it, and the variants."""

import random
from dataclasses import dataclass

import torch

from kernels import decode_attention, sdpa_decode

VARIANTS = {
    "sdpa": sdpa_decode.sdpa,  # the anchor
    "triton_split_kv": decode_attention.triton_split_kv,
    "triton_persistent": decode_attention.triton_persistent,
}
LAYOUTS = ("contiguous", "paged")
# Inputs are exact in the kernel dtype; the error comes from rounding P to that dtype for the
# P.V product and rounding the output: a few units of the dtype's epsilon (2^-10 fp16, 2^-7 bf16).
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclass(frozen=True)
class DecodeCase:
    seq_lens: tuple
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    layout: str
    page_size: int = 16
    spare: int = 0  # capacity beyond the longest sequence (positions, or pages when paged)
    strided: bool = False  # q, k, v as non-contiguous views

    @property
    def batch(self):
        return len(self.seq_lens)

    def kv_bytes(self):
        return 2 * sum(self.seq_lens) * self.kv_heads * self.head_dim * self.dtype.itemsize

    def bytes_moved(self):
        # K and V of every valid position, q in, out back
        return self.kv_bytes() + 2 * self.batch * self.q_heads * self.head_dim * self.dtype.itemsize


def _kv_pair(shape, strided, dtype, device, split_dim):
    # Two caches of `shape`; strided: views of one fused storage with a K/V axis at split_dim.
    if not strided:
        return (torch.randn(shape, dtype=dtype, device=device) for _ in range(2))
    fused = list(shape)
    fused.insert(split_dim, 2)
    kv = torch.randn(fused, dtype=dtype, device=device)
    return kv.select(split_dim, 0), kv.select(split_dim, 1)


def make_inputs(case: DecodeCase, device):
    """Fresh random tensors for `case` (never zeros): q, k_cache, v_cache, seq_lens, block_table."""
    b, d = case.batch, case.head_dim
    if case.strided:
        q = torch.randn(b, case.q_heads, 2 * d, dtype=case.dtype, device=device)[..., :d]
    else:
        q = torch.randn(b, case.q_heads, d, dtype=case.dtype, device=device)
    seq_lens = torch.tensor(case.seq_lens, dtype=torch.int32, device=device)
    if case.layout == "contiguous":
        capacity = max(case.seq_lens) + case.spare
        if case.strided:  # storage [B, L, 2, Hkv, D] viewed as [B, Hkv, L, D]
            k, v = _kv_pair((b, capacity, case.kv_heads, d), True, case.dtype, device, 2)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        else:
            k, v = _kv_pair((b, case.kv_heads, capacity, d), False, case.dtype, device, 0)
        return dict(q=q, k_cache=k, v_cache=v, seq_lens=seq_lens, block_table=None)
    pages_per_seq = [-(-n // case.page_size) for n in case.seq_lens]
    num_pages = sum(pages_per_seq) + case.spare
    k, v = _kv_pair((num_pages, case.page_size, case.kv_heads, d), case.strided, case.dtype, device, 1)
    # Pages scattered at random; unused table slots are -1, which no kernel may read.
    order = torch.randperm(num_pages).tolist()
    table = torch.full((b, max(pages_per_seq)), -1, dtype=torch.int32)
    for i, n in enumerate(pages_per_seq):
        table[i, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
    return dict(q=q, k_cache=k, v_cache=v, seq_lens=seq_lens, block_table=table.to(device))


def seeded_lengths(batch, max_len, variable, seed):
    """Benchmark lengths: all max_len, or uniform in [max_len / 8, max_len], fixed per seed."""
    if not variable:
        return (max_len,) * batch
    rng = random.Random(seed)
    return tuple(rng.randint(max_len // 8, max_len) for _ in range(batch))
