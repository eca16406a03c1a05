"""Prefill-attention cases: a description, fresh random tensors from it, the oracle."""

import math
from dataclasses import dataclass

import pytest
import torch

from suite import reference
from suite.decode_cases import PLANTED_LOGIT, block_edges, check_close


def variant_params(names):
    """pytest params of prefill variants. triton_tma needs TMA on a GPU (sm_90+); without a GPU its
    tensor descriptors are emulated by Triton's interpreter, so its math runs on the CPU."""
    marks = [pytest.mark.requires_tma] if torch.cuda.is_available() else []
    return [pytest.param(n, marks=marks if n == "triton_tma" else [], id=n) for n in names]


@dataclass(frozen=True)
class PrefillCase:
    prompt_lens: tuple
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    fused_qkv: bool = False  # q, k, v as views of one [T, (Hq + 2 Hkv) D] projection

    def flops(self):
        # QK^T and PV over the causal triangle (diagonal included), each 2 flops per multiply-add
        return sum(4 * self.q_heads * self.head_dim * n * (n + 1) // 2 for n in self.prompt_lens)

    def __str__(self):
        lens = self.prompt_lens
        kind = f"P{lens[0]}" if len(set(lens)) == 1 else f"P{min(lens)}-{max(lens)}"
        return f"B{len(lens)}-{kind}-H{self.q_heads}x{self.kv_heads}-D{self.head_dim}" + \
            ("" if self.dtype == torch.bfloat16 else "-fp16")


def make_inputs(case: PrefillCase, device):
    """Fresh random q, k, v packed over the batch (never zeros) and cu_seqlens."""
    tokens, d = sum(case.prompt_lens), case.head_dim
    if case.fused_qkv:
        qkv = torch.randn(tokens, case.q_heads + 2 * case.kv_heads, d, dtype=case.dtype, device=device)
        q, k, v = qkv.split([case.q_heads, case.kv_heads, case.kv_heads], dim=1)
    else:
        q = torch.randn(tokens, case.q_heads, d, dtype=case.dtype, device=device)
        k, v = (torch.randn(tokens, case.kv_heads, d, dtype=case.dtype, device=device) for _ in "kv")
    offsets = [0]
    for n in case.prompt_lens:
        offsets.append(offsets[-1] + n)
    return dict(q=q, k=k, v=v, cu_seqlens=torch.tensor(offsets, dtype=torch.int32, device=device))


# A planted key keeps this much of its random key across the planted direction: the ~N(0, 1/4) it adds
# to a planted score keeps queries' outputs apart (their weights differ), and a query's weight of any
# planted key it sees within a few times the others'
PLANTED_SPREAD = 0.5


def _across(x, u):
    # x [..., D] less its component along the unit vector u [..., D] (broadcast)
    return x - (x * u).sum(-1, keepdim=True) * u


def plant_dominant_keys(inputs, positions):
    """Give the listed positions of each prompt (positions[b]: a set of its positions) keys that every
    query of the prompt scores about PLANTED_LOGIT, so a query takes about 1/(planted positions up to
    it) of its softmax weight from each one it sees. A kernel that drops or repeats one of them, for
    any tile of queries after it, then misses the reference by far more than the tolerance; over random
    keys alone a row dropped for queries far beyond it moves their output by ~1/position, which bf16's
    tolerance no longer sees from a few thousand positions. Causal, so a key must win in every query
    after it, in every head of its group (GQA): per KV head a random unit direction u; every query gets
    the component 1 along u, each planted key PLANTED_LOGIT * sqrt(D) along u and PLANTED_SPREAD of its
    random key across u. A query scores a planted key PLANTED_LOGIT + ~N(0, 1/4), any other key ~N(0, 1);
    a prompt that reads its neighbour's planted end sees one more. In place: views of a fused qkv stay."""
    q, k, offsets = inputs["q"], inputs["k"], inputs["cu_seqlens"].tolist()
    kv_heads, head_dim = k.shape[1:]
    u = torch.nn.functional.normalize(torch.randn(kv_heads, head_dim, dtype=torch.float64, device=q.device), dim=-1)
    queries = q.double().unflatten(1, (kv_heads, -1))  # [T, Hkv, g, D]
    q.copy_((_across(queries, u[:, None]) + u[:, None]).flatten(1, 2))
    rows = torch.tensor([offsets[b] + p for b, planted in enumerate(positions) for p in sorted(planted)],
                        dtype=torch.long, device=q.device)
    keys = PLANTED_SPREAD * _across(k[rows].double(), u) + PLANTED_LOGIT * math.sqrt(head_dim) * u  # [rows, Hkv, D]
    k[rows] = keys.to(k.dtype)


def plant_block_edges(inputs, case: PrefillCase):
    """plant_dominant_keys at decode_cases.block_edges of each of case's prompts: its ends (the
    boundaries in cu_seqlens) and either side of the first edge of every power-of-two tile of 16 rows
    or more shorter than it (BLOCK_N's key blocks, BLOCK_M's query blocks and their diagonals)."""
    plant_dominant_keys(inputs, [block_edges(n) for n in case.prompt_lens])


def check_output(out, inputs):
    """Every element of out against the float64 reference, within the dtype's rounding bound (as decode)."""
    check_close(out, reference.prefill_attention(**inputs), reference.prefill_attention(**inputs, spread=True))


def check_rows(out, inputs, start, rows, n):
    """out [len(rows), Hq, D] against those rows of the n-token prompt at packed row start, each
    attending every key up to its own (rows_attention's), within out's dtype's rounding bound."""
    keys = range(n)
    check_close(out, rows_attention(inputs, start, rows, keys), rows_attention(inputs, start, rows, keys, True))


def rows_attention(inputs, start, rows, keys, spread=False):
    """float64 attention of the queries at positions rows of the prompt at packed row start over the
    keys at positions keys, each seen by the queries at or after it -> [len(rows), Hq, D]. Any list of
    keys: one left out or listed twice is what a kernel that misses or repeats that row computes; -1 is
    the previous prompt's last. keys = range(prompt length): those rows of reference.prefill_attention
    (spread: as reference.attention's)."""
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    rows, keys = (torch.tensor(list(x), dtype=torch.long, device=q.device) for x in (rows, keys))
    hidden = keys[None, :] > rows[:, None]
    return reference.attention(q[start + rows].transpose(0, 1), k[start + keys].transpose(0, 1),
                               v[start + keys].transpose(0, 1), hidden, spread).transpose(0, 1)
