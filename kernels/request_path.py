"""The request path (SPEC 2.5): a batch of prompts prefilled by the tiny decoder (TTFT), then T
decode steps (TPOT).

- baseline: prefill attention by triton_cp_async (RMSNorm as torch's eager ops), then the eager
  decode loop, on one stream;
- optimized: prefill attention by triton_tma and RMSNorm as one kernel (kernels/rmsnorm.py: the
  eager version's nine passes over the prompt in fp32 cost more than the attention at 16K tokens)
  on a low-priority stream, then the persistent decode loop (triton_persistent) on a
  high-priority stream that waits for the prefill.
bind() allocates and checks everything (the kernels' argument checks sync once); the request's
launches only enqueue work. Without a GPU there are no streams: both run on the CPU (Triton's
interpreter), which checks the math, not the overlap.
"""

from dataclasses import dataclass
from typing import Callable

import torch

from kernels import decode_loop, prefill_attention, rmsnorm, tiny_decoder

VARIANTS = ("baseline", "optimized")


@dataclass
class Request:
    prefill: Callable  # enqueue the prefill: the caches and h_last hold its results
    decode: Callable  # enqueue T decode steps from seq_lens -> outputs [B, T, d_model]
    reset: Callable  # seq_lens back to the prompt lengths (each decode advances them)
    out: torch.Tensor  # [B, T, d_model]: what decode() writes and returns
    streams: tuple = ()  # optimized on a GPU: (prefill's low-priority, decode's high-priority)

    def __call__(self):  # the whole request, from reset(): it runs again as it ran first
        self.reset()
        if not self.streams:
            self.prefill()
            return self.decode()
        low, high = self.streams
        low.wait_stream(torch.cuda.current_stream())  # nothing starts before the caller's work
        with torch.cuda.stream(low):
            self.prefill()
        high.wait_stream(low)
        with torch.cuda.stream(high):
            out = self.decode()
        torch.cuda.current_stream().wait_stream(high)
        return out


def _prefill(weights, prompts, k_cache, v_cache, h_last, attention, tile, fused_norm):
    # prompts packed [T, d_model]; q, k, v views of one projection buffer, bound once
    w = weights
    h = torch.cat(prompts)
    lengths = [p.shape[0] for p in prompts]
    device = h.device
    offsets = torch.tensor([0] + lengths, device=device).cumsum(0)
    cu_seqlens = offsets.to(torch.int32)
    last = offsets[1:] - 1  # each prompt's last token: its output is the first decode input
    seq_ids = torch.repeat_interleave(torch.arange(len(prompts), device=device), torch.tensor(lengths, device=device))
    positions = torch.arange(h.shape[0], device=device) - offsets[:-1][seq_ids]
    qkv = torch.empty(h.shape[0], w.q_heads + 2 * w.kv_heads, w.head_dim, device=device, dtype=h.dtype)
    q, k, v = qkv.split([w.q_heads, w.kv_heads, w.kv_heads], dim=1)
    attend = prefill_attention.VARIANTS[attention](q, k, v, cu_seqlens, tile=tile)
    normed = torch.empty_like(h) if fused_norm else None

    def norm():
        return rmsnorm.rmsnorm(h, w.gamma, out=normed) if fused_norm else tiny_decoder.rmsnorm(h, w.gamma)

    def launch():
        torch.matmul(norm(), w.w_qkv, out=qkv.view(h.shape[0], -1))
        attn = attend()  # [T, Hq, D]
        h_last.copy_(h[last] + attn[last].flatten(1) @ w.w_o)
        k_cache.transpose(1, 2)[seq_ids, positions] = k  # [B, L, Hkv, D] view of [B, Hkv, L, D]
        v_cache.transpose(1, 2)[seq_ids, positions] = v

    return launch


def bind(weights, prompts, steps, variant, *, tile=None):
    """The request for `prompts` (list of [P_b, d_model]) and `steps` decode steps. tile: the
    prefill attention's (BLOCK_M, BLOCK_N), default the kernel's."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    w = weights
    if not prompts:
        raise ValueError("prompts: need at least one sequence")
    for b, p in enumerate(prompts):
        if p.dim() != 2 or p.shape[1] != w.d_model or p.shape[0] < 1:
            raise ValueError(f"prompts[{b}] has shape {tuple(p.shape)}, expected [P >= 1, {w.d_model}]")
    lengths = [p.shape[0] for p in prompts]
    device, dtype = prompts[0].device, prompts[0].dtype
    # Zeroed: eager's masked SDPA multiplies the padding by zero weights (0 * NaN would be NaN).
    k_cache = torch.zeros(len(prompts), w.kv_heads, max(lengths) + steps, w.head_dim, device=device, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    h_last = torch.empty(len(prompts), w.d_model, device=device, dtype=dtype)
    out = torch.empty(len(prompts), steps, w.d_model, device=device, dtype=dtype)
    start_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    seq_lens = start_lens.clone()
    attention = "triton_cp_async" if variant == "baseline" else "triton_tma"
    prefill = _prefill(w, prompts, k_cache, v_cache, h_last, attention, tile, fused_norm=variant == "optimized")
    if variant == "baseline":  # bound once, like the persistent loop: its checks' sync is not a step's
        decode = tiny_decoder.eager_loop(w, h_last, k_cache, v_cache, seq_lens, steps, out=out)
        streams = ()
    else:
        decode = decode_loop.triton_persistent(w, h_last, k_cache, v_cache, seq_lens, steps, out=out)
        streams = ()
        if device.type == "cuda":
            lowest, highest = torch.cuda.Stream.priority_range()  # (0, -n): lower numbers run first
            streams = (torch.cuda.Stream(priority=lowest), torch.cuda.Stream(priority=highest))

    def reset():  # returns nothing: pytest-benchmark takes a setup's return value as arguments
        seq_lens.copy_(start_lens)

    return Request(prefill, decode, reset, out, streams)
