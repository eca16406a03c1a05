"""Prefill-attention cases: a description, fresh random tensors from it, the oracle."""

from dataclasses import dataclass

import pytest
import torch

from suite import reference
from suite.decode_cases import TOLERANCE


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


def check_output(out, inputs):
    """Every element of out against the float64 reference (tolerance from the dtype, as decode)."""
    tol = TOLERANCE[inputs["q"].dtype]
    torch.testing.assert_close(out.double(), reference.prefill_attention(**inputs), atol=tol, rtol=tol)
