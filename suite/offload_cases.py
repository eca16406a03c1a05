"""Offload cases: nvlink_offload (SPEC 2.9), a paged decode batch with spare pages to swap, and
paged_kv_offload (SPEC 2.10), a context in host memory; their oracles."""

from dataclasses import dataclass

import torch

from kernels import decode_attention, kv_quant, kv_swap
from suite.decode_cases import (DecodeCase, check_output, make_inputs, plant_block_edges,
                                plant_dominant_keys)


@dataclass(frozen=True)
class SwapCase:
    batch: int
    length: int  # every resident sequence's cache length
    swap_pages: int  # pages swapped out and pages swapped in per round
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16
    dtype: torch.dtype = torch.bfloat16

    def decode_case(self):
        # two sets of spare pages: the ones leaving and the ones arriving, outside every block table
        return DecodeCase((self.length,) * self.batch, self.q_heads, self.kv_heads, self.head_dim, self.dtype,
                          "paged", page_size=self.page_size, spare=2 * self.swap_pages)

    def swap_bytes(self):
        # out and in, K and V
        return 2 * 2 * self.swap_pages * self.page_size * self.kv_heads * self.head_dim * self.dtype.itemsize

    def __str__(self):
        return f"B{self.batch}-L{self.length}-swap{self.swap_pages}x{self.page_size}"


def spare_pages(inputs):
    """Pages of the cache no block table references, in index order (int64, on the cache's device)."""
    num_pages = inputs["k_cache"].shape[0]
    used = torch.zeros(num_pages, dtype=torch.bool, device=inputs["k_cache"].device)
    table = inputs["block_table"]
    used[table[table >= 0].long()] = True
    return (~used).nonzero().flatten()


@dataclass
class Bound:
    inputs: dict  # the decode step's q, caches, seq_lens, block_table
    out: torch.Tensor  # the step's output [B, Hq, D]
    round: kv_swap.SwapRound
    out_pages: torch.Tensor
    in_pages: torch.Tensor


def peer_of(device):
    """The other GPU of a two-GPU pair (variant peer's slots)."""
    return torch.device("cuda", 1 if (device.index or 0) == 0 else 0)


def bind_case(case, variant, device):
    """Fresh inputs (never zeros; dominant keys at block edges: decode_cases.plant_block_edges), the decode
    step (triton_persistent, paged) and the variant's round."""
    inputs = make_inputs(case.decode_case(), device)
    plant_block_edges(inputs, case.decode_case())
    spare = spare_pages(inputs)
    out_pages, in_pages = spare[: case.swap_pages], spare[case.swap_pages:]
    out = torch.empty_like(inputs["q"])
    step = decode_attention.triton_persistent(**inputs, out=out)
    round_ = kv_swap.bind(variant, step, inputs["k_cache"], inputs["v_cache"], out_pages, in_pages,
                          peer=peer_of(device) if variant == "peer" else None)
    return Bound(inputs, out, round_, out_pages, in_pages)


def check_round(case, bound):
    """Run one round with the step's output poisoned and check all of it: the step's attention
    against the float64 reference, the pages that left bit for bit in their host slots, the slots
    that arrived bit for bit in their pages, every other page untouched."""
    k, v = bound.inputs["k_cache"], bound.inputs["v_cache"]
    before = (k.clone(), v.clone())
    host = bound.round.space.host
    arriving = host[:, case.swap_pages:].clone()
    bound.out.fill_(float("nan"))
    bound.round()
    if k.is_cuda:
        torch.cuda.synchronize()
    check_output(bound.out, bound.inputs)
    # compared where the caches live: a multi-threaded CPU pass over pinned host memory just before
    # timing slows the host link (test_kv_locality_bench.py says by how much)
    for i, (cache, old) in enumerate(zip((k, v), before)):
        assert torch.equal(host[i, : case.swap_pages].to(cache.device), old[bound.out_pages]), "a page left changed"
        assert torch.equal(cache[bound.in_pages], arriving[i].to(cache.device)), "a page arrived changed"
        untouched = torch.ones(cache.shape[0], dtype=torch.bool, device=cache.device)
        untouched[bound.in_pages] = False
        assert torch.equal(cache[untouched], old[untouched]), "a page outside the swap changed"


def bind_checked(case, variant, device):
    """bind_case's Bound, once one round has passed check_round: every timed round, a baseline
    measured on demand included, is checked first."""
    bound = bind_case(case, variant, device)
    check_round(case, bound)
    return bound


@dataclass(frozen=True)
class ContextCase:
    """paged_kv_offload: B sequences of `length` tokens whose KV lives in host memory, streamed
    through the GPU `chunk` tokens at a time."""
    batch: int
    length: int
    chunk: int
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    dtype: torch.dtype = torch.bfloat16

    def __str__(self):
        return f"B{self.batch}-L{self.length}-chunk{self.chunk}"


def chunk_edges(length, chunk):
    """Positions of a context where one dropped or repeated row shows, whatever its chunks: its ends, and
    either side of its first chunk boundary and of its last chunk's start."""
    last = (length - 1) // chunk * chunk
    return {0, length - 1} | {p for boundary in (chunk, last) if 0 < boundary < length for p in (boundary - 1, boundary)}


def make_context(case, device):
    """Fresh random q [B, Hq, D] and k, v [B, L, Hkv, D] (never zeros), all on `device`, with dominant keys
    planted at chunk_edges (decode_cases.plant_dominant_keys: over random keys one row of L moves the
    output by ~1/L, inside the tolerance from L ~ 100 in bf16). The variants store k, v in host memory
    themselves."""
    q = torch.randn(case.batch, case.q_heads, case.head_dim, dtype=case.dtype, device=device)
    k, v = (torch.randn(case.batch, case.length, case.kv_heads, case.head_dim, dtype=case.dtype, device=device)
            for _ in "kv")
    plant_dominant_keys(dict(q=q, k_cache=k.transpose(1, 2), block_table=None),  # a [B, Hkv, L, D] view of k
                        [chunk_edges(case.length, case.chunk)] * case.batch)
    return q, k, v


def check_context_output(out, q, k, v, fmt):
    """out against float64 attention over the whole context (the fp8 values as stored), computed
    where q, k, v are (the GPU's float64 takes seconds where the CPU's took most of a minute)."""
    inputs = dict(q=q, k_cache=k.transpose(1, 2), v_cache=v.transpose(1, 2), block_table=None,  # [B, Hkv, L, D]
                  seq_lens=torch.full((q.shape[0],), k.shape[1], dtype=torch.int32))
    if fmt == "fp8":
        (inputs["k_cache"], inputs["k_scale"]), (inputs["v_cache"], inputs["v_scale"]) = (
            kv_quant.quantize(inputs[name], "fp8") for name in ("k_cache", "v_cache"))
    check_output(out, inputs)
