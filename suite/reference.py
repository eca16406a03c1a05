"""Float64 math references (SPEC 1). Plain torch, one sequence at a time, no cleverness."""

import math

import torch

# float64 attention scores held at once by prefill_attention: one 16K-token prompt's [32, P, P]
# would take 64 GiB (the full profile's B1-P16384 ran out of an H100's memory)
SCORES_BYTES = 1 << 30


def gather_kv(cache, seq_len, b, block_table=None):
    """The first seq_len positions of sequence b as [Hkv, seq_len, D], from either layout."""
    if block_table is None:
        return cache[b, :, :seq_len]  # cache: [B, Hkv, L_max, D]
    page_size = cache.shape[1]  # cache: [pages, page_size, Hkv, D]
    pages = block_table[b, : -(-seq_len // page_size)].long()  # pages holding 0..seq_len-1
    rows = cache[pages].flatten(0, 1)[:seq_len]  # [seq_len, Hkv, D]
    return rows.transpose(0, 1)


def kv_products(k_cache, v_cache, seq_lens, block_table=None, absolute=False):
    """[B, Hkv] float64: each sequence's sum over its positions and dims of k * v (|k| * |v| when
    absolute), what a bare read of the cache computes (kernels/paged_read.py)."""
    sums = []
    for b, n in enumerate(seq_lens.tolist()):
        k, v = (gather_kv(c, n, b, block_table).double() for c in (k_cache, v_cache))
        sums.append((k.abs() * v.abs() if absolute else k * v).sum(dim=(1, 2)))
    return torch.stack(sums)


def attention(q, k, v, hidden=None, spread=False):
    """softmax(q . k^T / sqrt(D)) . v in float64. q: [Hq, Sq, D]; k, v: [Hkv, Sk, D] (GQA).
    hidden: [Sq, Sk] bool, True where a query must not see a key.
    spread: sqrt(softmax(...)^2 . v^2) instead: how far the output moves per unit of independent
    relative error in each softmax weight, its standard deviation (suite/decode_cases.py's tolerance)."""
    group = q.shape[0] // k.shape[0]
    k = k.double().repeat_interleave(group, dim=0)
    v = v.double().repeat_interleave(group, dim=0)
    scores = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if hidden is not None:
        scores = scores.masked_fill(hidden, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return (weights.square() @ v.square()).sqrt() if spread else weights @ v


def dequantize_kv(cache, scale):
    """A quantized cache (kernels/kv_quant.py's formats, named by dtype) as float64 values."""
    if cache.dtype == torch.uint8:  # int4: low nibbles hold elements [0, D/2), high nibbles [D/2, D)
        nibbles = cache.to(torch.int32)
        cache = torch.cat([(nibbles % 16) - 8, (nibbles // 16) - 8], dim=-1)
    return cache.double() * scale.double().unsqueeze(-1)


def prompt_slots(cu_seqlens, block_table, page_size):
    """Where each packed prompt token goes in a paged cache: its flat index page * page_size + slot
    (SPEC 1: position t of sequence b lives in page block_table[b, t // page_size])."""
    slots = []
    for b in range(len(cu_seqlens) - 1):
        t = torch.arange(int(cu_seqlens[b + 1]) - int(cu_seqlens[b]))
        slots.append(block_table[b].long().cpu()[t // page_size] * page_size + t % page_size)
    return torch.cat(slots)


def prefill_attention(q, k, v, cu_seqlens, scores_bytes=SCORES_BYTES, spread=False):
    """Causal attention inside each packed prompt: q [T, Hq, D], k, v [T, Hkv, D] -> [T, Hq, D]
    float64 (spread: as attention's). Queries go in blocks whose [Hq, rows, P] float64
    scores fit scores_bytes; each row's softmax is its own, so blocks change nothing."""
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    offsets = cu_seqlens.tolist()
    for s, e in zip(offsets, offsets[1:]):
        keys = torch.arange(e - s, device=q.device)
        rows = max(1, scores_bytes // (8 * q.shape[1] * (e - s)))
        for r0 in range(0, e - s, rows):
            r1 = min(e - s, r0 + rows)
            hidden = keys[None, :] > keys[r0:r1, None]  # keys after the query
            out[s + r0:s + r1] = attention(q[s + r0:s + r1].transpose(0, 1), k[s:e].transpose(0, 1),
                                           v[s:e].transpose(0, 1), hidden, spread).transpose(0, 1)
    return out


def decode_attention(q, k_cache, v_cache, seq_lens, block_table=None, k_scale=None, v_scale=None, spread=False):
    """q: [B, Hq, D] -> [B, Hq, D] float64: each sequence attends its first seq_lens[b] positions
    (spread: as attention's)."""
    if k_scale is not None:
        k_cache, v_cache = dequantize_kv(k_cache, k_scale), dequantize_kv(v_cache, v_scale)
    out = []
    for b, seq_len in enumerate(seq_lens.tolist()):
        k = gather_kv(k_cache, seq_len, b, block_table)
        v = gather_kv(v_cache, seq_len, b, block_table)
        out.append(attention(q[b, :, None, :], k, v, spread=spread)[:, 0, :])
    return torch.stack(out)


def rmsnorm(x, gamma, eps):
    x = x.double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gamma.double()


def decoder_layer(weights, h, k_past, v_past, eps, stored=None):
    """The tiny decoder (SPEC 1) on new tokens h [N, d_model] after past k, v [Hkv, S, D]:
    returns (h_out [N, d_model], k, v [Hkv, S + N, D]), all float64, causal over the new tokens.
    stored: None, or (k, v) [Hkv, S + N, D] as an implementation's cache holds them (quantized,
    say); attention then reads those, while the returned k, v are still the computed ones."""
    w = weights
    x = rmsnorm(h, w.gamma, eps) @ w.w_qkv.double()
    q, k, v = x.split([w.q_heads * w.head_dim, w.kv_heads * w.head_dim, w.kv_heads * w.head_dim], dim=-1)
    q = q.reshape(-1, w.q_heads, w.head_dim).transpose(0, 1)
    k = torch.cat([k_past, k.reshape(-1, w.kv_heads, w.head_dim).transpose(0, 1)], dim=1)
    v = torch.cat([v_past, v.reshape(-1, w.kv_heads, w.head_dim).transpose(0, 1)], dim=1)
    past, new = k_past.shape[1], h.shape[0]
    future = torch.ones(new, past + new, dtype=torch.bool, device=h.device).triu(past + 1)  # new token i sees 0..past+i
    attn = attention(q, *(stored or (k, v)), hidden=future)  # [Hq, N, D]
    return h.double() + attn.transpose(0, 1).reshape(new, -1) @ w.w_o.double(), k, v


def decode_loop_with_cache(weights, prompts, steps, eps, stored=None):
    """Prefill each prompt [P_b, d_model], then `steps` decode steps, each step's output the next
    step's input (the first input: the last prompt token's output).
    Returns (out [B, steps, d_model], [(k, v) [Hkv, P_b + steps, D] per sequence]), float64.
    stored: None, or per sequence the (k, v) [Hkv, >= P_b + steps, D] an implementation wrote
    (e.g. a quantized cache, dequantized): the decode steps attend those (the prompt attends its
    own k, v, as prefill does), so the returned k, v check each stored value separately."""
    out, caches = [], []
    for b, h in enumerate(prompts):
        empty = torch.zeros(weights.kv_heads, 0, weights.head_dim, dtype=torch.float64, device=h.device)
        h_out, k, v = decoder_layer(weights, h, empty, empty, eps)
        x, seq = h_out[-1:], []
        for _ in range(steps):
            seen = None if stored is None else tuple(c[:, : k.shape[1] + 1] for c in stored[b])
            x, k, v = decoder_layer(weights, x, k, v, eps, seen)
            seq.append(x[0])
        out.append(torch.stack(seq))
        caches.append((k, v))
    return torch.stack(out), caches


def decode_loop(weights, prompts, steps, eps):
    """decode_loop_with_cache's outputs [B, steps, d_model] float64, attending the computed k, v."""
    return decode_loop_with_cache(weights, prompts, steps, eps)[0]
