"""The decode-attention anchor: what a user runs instead of a decode kernel.

torch SDPA over the cache padded to the batch's longest sequence, with a boolean mask when the
lengths differ. A paged cache is gathered into that padded layout once, before launch().
"""

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels.decode_attention import check_decode_args

BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def pad_paged(cache, block_table, length):
    # cache: [pages, page_size, Hkv, D] -> [B, Hkv, length, D] (contiguous copy)
    page_size = cache.shape[1]
    pages = block_table[:, : (length + page_size - 1) // page_size].long()
    rows = cache[pages].flatten(1, 2)[:, :length]
    return rows.transpose(1, 2).contiguous()


def sdpa(q, k_cache, v_cache, seq_lens, block_table=None, *, out=None, backend=None):
    # q: [B, Hq, D]; k/v: [B, Hkv, L_max, D] or [pages, page_size, Hkv, D]; seq_lens: [B] int32
    dims = check_decode_args(q, k_cache, v_cache, seq_lens, block_table, out)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    length = dims.max_len
    if block_table is None:
        k, v = k_cache[:, :, :length], v_cache[:, :, :length]
    else:
        k, v = pad_paged(k_cache, block_table, length), pad_paged(v_cache, block_table, length)
    mask = None
    if dims.min_len != dims.max_len:
        positions = torch.arange(length, device=q.device)
        mask = (positions[None, :] < seq_lens[:, None].long())[:, None, None, :]  # [B, 1, 1, L]
    q4 = q.unsqueeze(2)  # [B, Hq, 1, D]

    def launch():  # backend None: torch's own choice
        with sdpa_kernel([BACKENDS[backend]]) if backend else contextlib.nullcontext():
            o = F.scaled_dot_product_attention(q4, k, v, attn_mask=mask, enable_gqa=True).squeeze(2)
        return o if out is None else out.copy_(o)

    return launch
