"""Float64 math references (SPEC 1). Plain torch, one sequence at a time, no cleverness."""

import math

import torch


def gather_kv(cache, seq_len, b, block_table=None):
    """The first seq_len positions of sequence b as [Hkv, seq_len, D], from either layout."""
    if block_table is None:
        return cache[b, :, :seq_len]  # cache: [B, Hkv, L_max, D]
    page_size = cache.shape[1]  # cache: [pages, page_size, Hkv, D]
    pages = block_table[b, : -(-seq_len // page_size)].long()  # pages holding 0..seq_len-1
    rows = cache[pages].flatten(0, 1)[:seq_len]  # [seq_len, Hkv, D]
    return rows.transpose(0, 1)


def attention(q, k, v):
    """softmax(q . k^T / sqrt(D)) . v in float64. q: [Hq, Sq, D]; k, v: [Hkv, Sk, D] (GQA)."""
    group = q.shape[0] // k.shape[0]
    k = k.double().repeat_interleave(group, dim=0)
    v = v.double().repeat_interleave(group, dim=0)
    scores = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1) @ v


def decode_attention(q, k_cache, v_cache, seq_lens, block_table=None):
    """q: [B, Hq, D] -> [B, Hq, D] float64: each sequence attends its first seq_lens[b] positions."""
    out = []
    for b, seq_len in enumerate(seq_lens.tolist()):
        k = gather_kv(k_cache, seq_len, b, block_table)
        v = gather_kv(v_cache, seq_len, b, block_table)
        out.append(attention(q[b, :, None, :], k, v)[:, 0, :])
    return torch.stack(out)
