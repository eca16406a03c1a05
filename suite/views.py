"""Views that hold a tensor's values in memory laid out wrong, for the bad-input tests (SPEC 7)."""

import torch


def misaligned(t):
    # t's values, contiguous, starting one element (t.element_size() bytes) past an aligned address
    return torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape).copy_(t)


def padded_rows(t):
    # t's values in a view whose rows (last dimension) lie one element further apart
    return torch.empty(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype, device=t.device)[..., :-1].copy_(t)


def token_strided(t, stride):
    # t [tokens, heads, D]'s values, each token's [heads, D] contiguous, tokens `stride` elements apart
    tokens, heads, d = t.shape
    return torch.empty(tokens, stride, dtype=t.dtype, device=t.device)[:, :heads * d].unflatten(1, (heads, d)).copy_(t)
