"""The tiny decoder of SPEC 1: one attention-only layer (RMSNorm, GQA, KV append).

`prefill` fills a contiguous KV cache [B, Hkv, L_max, D] from each sequence's prompt (lengths
differ); `eager_loop` binds the decode-loop baseline (`eager_decode` runs it once): a host loop of
torch ops, one step after another, each step's output the next step's input.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import decode_attention, kv_quant
from kernels.checks import (ATTENTION_DTYPES, HEAD_DIMS, check_head_dim, check_shape, check_tensor,
                            check_unit_stride_last, output)

RMS_EPS = 1e-6


@dataclass(frozen=True)
class Weights:
    w_qkv: torch.Tensor  # [d_model, (Hq + 2 * Hkv) * D]
    w_o: torch.Tensor  # [Hq * D, d_model]
    gamma: torch.Tensor  # [d_model]
    q_heads: int
    kv_heads: int
    head_dim: int

    @property
    def d_model(self):
        return self.q_heads * self.head_dim


def random_weights(q_heads, kv_heads, head_dim, dtype, device) -> Weights:
    if dtype not in ATTENTION_DTYPES:
        raise TypeError(f"dtype {dtype} is not supported; supported: {ATTENTION_DTYPES}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} is not supported; supported: {HEAD_DIMS}")
    if kv_heads < 1 or q_heads % kv_heads:
        raise ValueError(f"q_heads {q_heads} is not a multiple of kv_heads {kv_heads}")
    d_model = q_heads * head_dim
    width = (q_heads + 2 * kv_heads) * head_dim
    # Scaled so activations stay O(1) over many steps: unit-variance inputs give unit-variance q, k, v.
    w_qkv = torch.randn(d_model, width, device=device) / d_model**0.5
    w_o = torch.randn(d_model, d_model, device=device) / d_model**0.5
    gamma = 1 + 0.1 * torch.randn(d_model, device=device)
    return Weights(w_qkv.to(dtype), w_o.to(dtype), gamma.to(dtype), q_heads, kv_heads, head_dim)


def rmsnorm(x, gamma):
    # x: [N, d_model]; statistics in fp32, result in x's dtype
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + RMS_EPS) * gamma.float()).to(x.dtype)


def project_qkv(weights, x):
    # x: [N, d_model] normalized -> q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, D]
    w = weights
    qkv = x @ w.w_qkv
    q, k, v = qkv.split([w.q_heads * w.head_dim, w.kv_heads * w.head_dim, w.kv_heads * w.head_dim], dim=-1)
    return (q.view(-1, w.q_heads, w.head_dim), k.view(-1, w.kv_heads, w.head_dim),
            v.view(-1, w.kv_heads, w.head_dim))


def prefill(weights, prompts, capacity):
    """prompts: list of [P_b, d_model] -> (h [B, d_model] last prompt token's output,
    k_cache, v_cache [B, Hkv, capacity, D], seq_lens [B] int32)."""
    w = weights
    if not prompts:
        raise ValueError("prompts: need at least one sequence")
    longest = max(p.shape[0] for p in prompts)
    if longest > capacity:
        raise ValueError(f"capacity {capacity} is shorter than the longest prompt ({longest})")
    device, dtype = prompts[0].device, prompts[0].dtype
    # Zeroed: the eager baseline's masked SDPA multiplies the padding by zero weights, and 0 * NaN
    # from uninitialized memory would be NaN.
    k_cache = torch.zeros(len(prompts), w.kv_heads, capacity, w.head_dim, device=device, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    last = []
    for b, h in enumerate(prompts):
        if h.dim() != 2 or h.shape[1] != w.d_model or h.shape[0] < 1:
            raise ValueError(f"prompts[{b}] has shape {tuple(h.shape)}, expected [P >= 1, {w.d_model}]")
        q, k, v = project_qkv(w, rmsnorm(h, w.gamma))
        k_cache[b, :, : h.shape[0]] = k.transpose(0, 1)
        v_cache[b, :, : h.shape[0]] = v.transpose(0, 1)
        attn = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                              is_causal=True, enable_gqa=True)  # [Hq, P, D]
        last.append(h[-1] + attn[:, -1].reshape(-1) @ w.w_o)
    seq_lens = torch.tensor([p.shape[0] for p in prompts], dtype=torch.int32, device=device)
    return torch.stack(last), k_cache, v_cache, seq_lens


def check_decode(weights, h, k_cache, v_cache, seq_lens, steps, k_scale=None, v_scale=None) -> str:
    """Validate a decode loop's call (SPEC 7), for every loop variant; returns the caches' kv_quant
    format. h: [B, d_model]; k/v: [B, Hkv, L_max, D] (kv_quant formats with k/v_scale
    [B, Hkv, L_max]); seq_lens: [B] int32, the positions each cache holds. Syncs once."""
    w = weights
    dtype, device = w.w_qkv.dtype, w.w_qkv.device
    check_head_dim("weights", w.head_dim)
    if w.kv_heads < 1 or w.q_heads % w.kv_heads:
        raise ValueError(f"weights: q_heads {w.q_heads} is not a multiple of kv_heads {w.kv_heads}")
    width = (w.q_heads + 2 * w.kv_heads) * w.head_dim
    for name, t, shape in (("w_qkv", w.w_qkv, (w.d_model, width)), ("w_o", w.w_o, (w.d_model, w.d_model)),
                           ("gamma", w.gamma, (w.d_model,))):
        check_tensor(f"weights.{name}", t, dtypes=(dtype,), device=device, device_of="weights.w_qkv")
        check_shape(f"weights.{name}", t, shape)
        if not t.is_contiguous():  # the persistent loops read it row-major
            raise ValueError(f"weights.{name} must be contiguous, got strides {t.stride()}")
    check_tensor("h", h, dtypes=(dtype,), ndim=2, device=device, device_of="weights.w_qkv")
    batch = h.shape[0]
    check_shape("h", h, (batch, w.d_model))
    if batch < 1:
        raise ValueError(f"h has shape {tuple(h.shape)}: the batch must hold at least one sequence")
    if not h.is_contiguous():  # the persistent loops read rows d_model apart
        raise ValueError(f"h must be contiguous, got strides {h.stride()}")
    fmt = kv_quant.check_caches(dtype, device, k_cache, v_cache, k_scale, v_scale, device_of="weights.w_qkv")
    stored = kv_quant.values_per_byte_row(fmt, w.head_dim)
    check_shape("k_cache", k_cache, (batch, w.kv_heads, k_cache.shape[2], stored))
    check_tensor("seq_lens", seq_lens, dtypes=(torch.int32,), ndim=1, device=device, device_of="weights.w_qkv")
    check_shape("seq_lens", seq_lens, (batch,))
    check_unit_stride_last("seq_lens", seq_lens)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    shortest, longest = torch.stack([seq_lens.min(), seq_lens.max()]).tolist()
    if shortest < 0:  # a step appends at position seq_lens[b]
        raise ValueError(f"seq_lens must be >= 0 (positions the cache holds), got min {shortest}")
    capacity = k_cache.shape[2]
    if longest + steps > capacity:
        raise ValueError(f"seq_lens max {longest} + steps {steps} exceeds the cache capacity {capacity}")
    return fmt


class QuantizedKV:
    """A quantized cache (kernels/kv_quant.py) for decode_step: k, v are quantized and appended
    with torch ops; attention is triton_split_kv with the dequantization fused. Bound once, before
    any step (its argument checks sync), so the steps stay capturable in a CUDA graph."""

    def __init__(self, weights, k_cache, v_cache, k_scale, v_scale, seq_lens):
        self.fmt = kv_quant.format_of(k_cache)
        if self.fmt == "none":
            raise TypeError(f"k_cache has dtype {k_cache.dtype}: QuantizedKV needs one of "
                            f"{tuple(kv_quant.FORMATS.values())}")
        self.caches = ((k_cache, k_scale), (v_cache, v_scale))
        self.q = torch.empty(k_cache.shape[0], weights.q_heads, weights.head_dim, device=k_cache.device,
                             dtype=weights.w_qkv.dtype)
        self.attend = decode_attention.triton_split_kv(self.q, k_cache, v_cache, seq_lens, k_scale=k_scale,
                                                       v_scale=v_scale)

    def append(self, rows, positions, k, v):
        for (cache, scale), new in zip(self.caches, (k, v)):
            data, new_scale = kv_quant.quantize(new, self.fmt)
            cache[rows, :, positions] = data
            scale[rows, :, positions] = new_scale


def decode_step(weights, h, k_cache, v_cache, seq_lens, quantized=None):
    """One decode step for the batch: h [B, d_model] -> the step's output [B, d_model]. Appends
    k, v at position seq_lens[b], then seq_lens += 1 and attends positions 0..seq_lens[b] - 1.
    quantized: a QuantizedKV over the caches, when they are quantized.
    No host sync: it can be captured in a CUDA graph."""
    w = weights
    batch, capacity = h.shape[0], k_cache.shape[2]
    rows = torch.arange(batch, device=h.device)
    q, k, v = project_qkv(w, rmsnorm(h, w.gamma))
    if quantized is not None:
        quantized.append(rows, seq_lens.long(), k, v)
        seq_lens += 1
        quantized.q.copy_(q)
        return h + quantized.attend().reshape(batch, -1) @ w.w_o
    k_cache[rows, :, seq_lens.long()] = k
    v_cache[rows, :, seq_lens.long()] = v
    seq_lens += 1
    mask = (torch.arange(capacity, device=h.device)[None, :] < seq_lens[:, None])[:, None, None, :]  # [B, 1, 1, L]
    attn = F.scaled_dot_product_attention(q[:, :, None], k_cache, v_cache, attn_mask=mask, enable_gqa=True)
    return h + attn.reshape(batch, -1) @ w.w_o


def bind_quantized(weights, k_cache, v_cache, k_scale, v_scale, seq_lens):
    """A QuantizedKV when the caches are quantized (k_scale given), else None."""
    if k_scale is None and v_scale is None:
        return None
    return QuantizedKV(weights, k_cache, v_cache, k_scale, v_scale, seq_lens)


def decode_out(weights, h, steps, out):
    """A decode loop's outputs [B, steps, d_model] in h's dtype and device: out, checked, or a new
    tensor when out is None."""
    return output(out, (h.shape[0], steps, weights.d_model), h.dtype, h.device)


def eager_loop(weights, h, k_cache, v_cache, seq_lens, steps, *, k_scale=None, v_scale=None, out=None):
    """The baseline, bound like the other loops: checked here (one sync) -> launch() running `steps`
    decode steps as a host loop of torch ops, returning outputs [B, steps, d_model] (out when
    given). Quantized caches (kernels/kv_quant.py) come with k_scale, v_scale [B, Hkv, L_max].
    launch() adds no check: from lengths not reset (seq_lens past L_max - steps) it raises, as the
    KV append's indexing refuses position L_max (IndexError on the CPU, a device-side assert on a
    GPU, which ends the process's CUDA context), so no row lands outside the cache. A negative length
    (no decode makes one: each step adds 1) down to -L_max is not refused: torch's indexing counts it
    from the cache's end, so that sequence's row lands inside the cache at a wrong position and its
    outputs are wrong without an error (below -L_max the indexing refuses it as above); the persistent
    loops write NaN for it."""
    check_decode(weights, h, k_cache, v_cache, seq_lens, steps, k_scale, v_scale)
    quantized = bind_quantized(weights, k_cache, v_cache, k_scale, v_scale, seq_lens)
    out = decode_out(weights, h, steps, out)

    def launch():
        x = h
        for t in range(steps):
            x = decode_step(weights, x, k_cache, v_cache, seq_lens, quantized)
            out[:, t] = x
        return out

    return launch


def eager_decode(weights, h, k_cache, v_cache, seq_lens, steps, *, k_scale=None, v_scale=None, out=None):
    """eager_loop bound and launched once -> outputs [B, steps, d_model]."""
    return eager_loop(weights, h, k_cache, v_cache, seq_lens, steps, k_scale=k_scale, v_scale=v_scale, out=out)()
