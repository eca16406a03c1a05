"""Decode-attention cases: a description, fresh random tensors from it, and the variants."""

import math
import random
from dataclasses import dataclass

import pytest
import torch

from kernels import cuda_decode_attention, decode_attention, kv_quant, sdpa_decode
from suite import reference

VARIANTS = {
    "sdpa": sdpa_decode.sdpa,  # the anchor
    "triton_split_kv": decode_attention.triton_split_kv,
    "triton_persistent": decode_attention.triton_persistent,
    "cuda_persistent": cuda_decode_attention.cuda_persistent,
}
NATIVE = ("cuda_persistent",)  # CUDA C++: needs a GPU, never runs in the interpreter
FUSED_DEQUANT = ("triton_split_kv", "triton_persistent")  # variants that read quantized caches
LAYOUTS = ("contiguous", "paged")
PAGE_SIZES = (1, 3, 16, 54, 64)  # drawn by the property tests: 1, primes, powers of two, neither


def variant_params(names):
    """pytest params of decode-attention variants, the native ones marked requires_cuda."""
    return [pytest.param(n, marks=[pytest.mark.requires_cuda] if n in NATIVE else [], id=n) for n in names]


def quant_params(formats):
    """pytest params of KV formats; fp8 needs fused FP8 decode (the requires_fp8_fused marker)."""
    return [pytest.param(f, marks=[pytest.mark.requires_fp8_fused] if f == "fp8" else [], id=f) for f in formats]
# Unit roundoff u of the dtype a kernel rounds the softmax weights P to for the P.V product and stores
# its output in: round-to-nearest errs by at most u relative (2^-11 fp16, 2^-8 bf16). Inputs are exact
# in that dtype, and the rest (fp32 scores, sums, merges) errs by ~2^-24, which the bound ignores.
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# Each weight's rounding errs independently, so the output errs by about u / sqrt(3) * spread, spread
# = sqrt(sum_i p_i^2 v_i^2) (reference.attention's), and at most u * sqrt(n) * spread where n weights carry
# it. SPREADS = 5 spreads is 8.7 such standard deviations and the worst case up to 25 weights; storing the
# output rounds once more, u * |out|. Seen: at most 1.65 spreads in the interpreter (fp16, bf16, quantized),
# and every variant within 0.49 of the whole bound over 303 random cases on an H200 (notes/decode_attention.md,
# twenty-fourth session).
SPREADS = 5
# Quantized caches: the kernels round P * v_scale to fp16 (kernels/decode_tiles.py), whose normal range
# ends at 2^-14; below it a product errs by up to 2^-25 absolute, times its row's stored value q. Those
# errors are independent too: the bound adds SPREADS * 2^-25 * sqrt(sum_i q_i^2) (the softmax sum, >= 1,
# left out of the denominator).
FP16_SUBNORMAL_ERROR = 2.0**-25


def rounding_bound(dtype, expected, spread, absolute=None):
    """Per element: u * (|expected| + SPREADS * spread), plus SPREADS * absolute if given, u dtype's
    UNIT_ROUNDOFF."""
    bound = UNIT_ROUNDOFF[dtype] * (expected.abs() + SPREADS * spread)
    return bound if absolute is None else bound + SPREADS * absolute


def bound_ratio(out, expected, bound):
    """Per element |out - expected| / bound: 0 where they agree exactly (a quantized v may be 0, and its
    bound with it), NaN where out is NaN."""
    error = (out.double() - expected).abs()
    return torch.where(error == 0, 0.0, error / bound)


def check_close(out, expected, spread, absolute=None):
    """Every element of out (any attention output) within rounding_bound of the float64 expected; a NaN
    anywhere fails."""
    assert out.shape == expected.shape, f"output shape {tuple(out.shape)}, expected {tuple(expected.shape)}"
    bound = rounding_bound(out.dtype, expected, spread, absolute)
    ratio = bound_ratio(out, expected, bound).nan_to_num(float("inf"))  # an unwritten (poisoned) element fails
    bad = ratio > 1
    if bad.any():
        worst = tuple(int(i) for i in torch.unravel_index(ratio.argmax(), out.shape))
        raise AssertionError(
            f"{int(bad.sum())} of {out.numel()} elements beyond the rounding bound; worst at {worst}: "
            f"{out[worst].item():.6g}, expected {expected[worst].item():.6g}, bound {bound[worst].item():.3g} "
            f"(spread {spread[worst].item():.3g}, u {UNIT_ROUNDOFF[out.dtype]:.3g})")


def poisoned_out(inputs):
    """An attention output buffer for inputs' q (decode [B, Hq, D], prefill [T, Hq, D]), all NaN:
    check_output fails on any element a launch never writes."""
    q = inputs["q"]
    return torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)


def check_output(out, inputs):
    """Every element of out against the float64 reference on the same inputs (a quantized cache
    as stored: dequantized)."""
    check_close(out, *reference_and_spreads(inputs))


def reference_and_spreads(inputs):
    """check_close's (expected, spread, absolute) for decode attention on inputs: the float64 output, its
    spread, and for a quantized cache fp16's subnormal error."""
    absolute = None if inputs.get("v_scale") is None else FP16_SUBNORMAL_ERROR * _stored_norm(inputs)
    return reference.decode_attention(**inputs), reference.decode_attention(**inputs, spread=True), absolute


def _stored_norm(inputs):
    """[B, Hq, D]: sqrt(sum of v_cache's stored values squared (scales left out) over each sequence's rows)."""
    v, table, q = inputs["v_cache"], inputs["block_table"], inputs["q"]
    stored = reference.dequantize_kv(v, torch.ones_like(inputs["v_scale"]))
    norms = [reference.gather_kv(stored, n, b, table).square().sum(1).sqrt() for b, n in
             enumerate(inputs["seq_lens"].tolist())]  # each [Hkv, D]
    return torch.stack(norms).repeat_interleave(q.shape[1] // norms[0].shape[0], dim=1)


def checked(launch, inputs):
    """launch, once its output has passed check_output: for launches timed outside a benchmark's own
    test (baselines measured on demand, the tools' sweeps), correctness before timing too."""
    check_output(launch(), inputs)
    return launch


def quantization_loss(out, inputs, exact):
    """Largest |out - attention over the unquantized caches `exact`|: what quantizing cost."""
    unquantized = reference.decode_attention(**{**inputs, **exact, "k_scale": None, "v_scale": None})
    return (out.double() - unquantized).abs().max().item()


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
    quant: str = "none"  # KV cache format (kernels/kv_quant.py)

    @property
    def batch(self):
        return len(self.seq_lens)

    def kv_bytes(self):
        # K and V rows (and their float32 scales) of every valid position
        if self.quant == "none":
            row = self.head_dim * self.dtype.itemsize
        else:
            row = kv_quant.values_per_byte_row(self.quant, self.head_dim) + 4
        return 2 * sum(self.seq_lens) * self.kv_heads * row

    def bytes_moved(self):
        # K and V of every valid position, q in, out back
        return self.kv_bytes() + 2 * self.batch * self.q_heads * self.head_dim * self.dtype.itemsize


def _pair(k, v, strided, split_dim):
    # strided: views of one fused storage with a K/V axis at split_dim
    if not strided:
        return k, v
    kv = torch.stack([k, v], dim=split_dim)
    return kv.select(split_dim, 0), kv.select(split_dim, 1)


def make_case_tensors(case: DecodeCase, device):
    """Fresh random tensors for `case` (never zeros) -> (inputs, exact): inputs are the launcher's
    keyword arguments (q, k_cache, v_cache, seq_lens, block_table, and k_scale, v_scale when
    quantized); exact holds the caches before quantization (the same tensors when not quantized)."""
    b, d = case.batch, case.head_dim
    if case.strided:
        q = torch.randn(b, case.q_heads, 2 * d, dtype=case.dtype, device=device)[..., :d]
    else:
        q = torch.randn(b, case.q_heads, d, dtype=case.dtype, device=device)
    seq_lens = torch.tensor(case.seq_lens, dtype=torch.int32, device=device)
    block_table = None
    if case.layout == "contiguous":
        capacity = max(case.seq_lens) + case.spare
        if case.strided:  # storage [B, L, 2, Hkv, D] viewed as [B, Hkv, L, D]
            storage, split_dim, to_layout = (b, capacity, case.kv_heads, d), 2, lambda t: t.transpose(1, 2)
        else:
            storage, split_dim, to_layout = (b, case.kv_heads, capacity, d), 0, lambda t: t
    else:
        pages_per_seq = [-(-n // case.page_size) for n in case.seq_lens]
        num_pages = sum(pages_per_seq) + case.spare
        storage, split_dim, to_layout = (num_pages, case.page_size, case.kv_heads, d), 1, lambda t: t
        # Pages scattered at random; unused table slots are -1, which no kernel may read.
        order = torch.randperm(num_pages).tolist()
        table = torch.full((b, max(pages_per_seq)), -1, dtype=torch.int32)
        for i, n in enumerate(pages_per_seq):
            table[i, :n] = torch.tensor(order[:n], dtype=torch.int32)
            order = order[n:]
        block_table = table.to(device)
    k, v = (torch.randn(storage, dtype=case.dtype, device=device) for _ in range(2))
    exact = dict(k_cache=to_layout(k), v_cache=to_layout(v))
    inputs = dict(q=q, seq_lens=seq_lens, block_table=block_table)
    if case.quant == "none":
        k, v = _pair(k, v, case.strided, split_dim)
        return inputs | dict(k_cache=to_layout(k), v_cache=to_layout(v)), exact
    (k, k_scale), (v, v_scale) = kv_quant.quantize(k, case.quant), kv_quant.quantize(v, case.quant)
    k, v = _pair(k, v, case.strided, split_dim)
    k_scale, v_scale = _pair(k_scale, v_scale, case.strided, split_dim)
    return inputs | dict(k_cache=to_layout(k), v_cache=to_layout(v), k_scale=to_layout(k_scale),
                         v_scale=to_layout(v_scale)), exact


# A planted key's score for every query head of its KV head; the other keys score ~N(0, 1)
PLANTED_LOGIT = 10.0


def plant_dominant_keys(inputs, positions):
    """Give the listed positions of each sequence (positions[b]: a set of its positions) one key, alike
    across them, that every query head of its KV head scores at least PLANTED_LOGIT, so each takes
    about 1/len(positions[b]) of the softmax weight. A kernel that drops or repeats any one of them
    then misses the reference by far more than the tolerance; over random keys alone a dropped row
    moves the output by ~1/L, not always past bf16's bound at L 16384 (0.9 to 5.4 times it in 10 draws,
    .dbg/s24/blind.py; 2.1 to 9.1 at L 4096). The key lies along
    the group's summed query direction u: a head's score is PLANTED_LOGIT * (q . u) / min over the
    group of (q . u), taken as at least 1 (a head whose query opposes u just sees random keys).
    A quantized cache stores the key quantized, with its row's scale (scores then ~PLANTED_LOGIT)."""
    q, k, table = inputs["q"], inputs["k_cache"], inputs["block_table"]
    head_dim = q.shape[-1]
    kv_heads = k.shape[1] if table is None else k.shape[2]
    grouped = q.double().unflatten(1, (kv_heads, -1))  # [B, Hkv, g, D]
    u = torch.nn.functional.normalize(grouped.sum(2), dim=-1)  # [B, Hkv, D]
    reach = (grouped * u[:, :, None]).sum(-1).amin(-1).clamp(min=1.0)  # [B, Hkv]
    keys = (PLANTED_LOGIT * math.sqrt(head_dim) / reach)[..., None] * u  # [B, Hkv, D]
    fmt = kv_quant.format_of(k)
    rows, scales = (keys.to(k.dtype), None) if fmt == "none" else kv_quant.quantize(keys, fmt)  # scales [B, Hkv]
    for b, planted in enumerate(positions):
        for p in planted:
            if table is None:  # [B, Hkv, L, D]
                at = b, slice(None), p
            else:  # [pages, page_size, Hkv, D]
                at = table[b, p // k.shape[1]], p % k.shape[1]
            k[at] = rows[b]
            if scales is not None:
                inputs["k_scale"][at] = scales[b]


def block_edges(length, page_size=None):
    """Positions of a length-long sequence where one dropped or repeated row shows, whatever blocks a
    kernel splits it in: its ends, and either side of the first edge of every power-of-two block of
    16 positions or more (K/V steps, chunks) shorter than it, and of its pages' (page_size). The
    first edge of a block of s is an edge of blocks of s and less only: one per kind of edge."""
    sizes = {2 ** e for e in range(4, length.bit_length())} | ({page_size} if page_size else set())
    return {0, length - 1} | {p for s in sizes if s < length for p in (s - 1, s)}


def every_block_edge(length, sizes):
    """Sorted positions either side of every multiple of each block size in sizes, and the ends: where
    the property tests draw the positions they plant."""
    return sorted({0, length - 1} | {p for s in sizes for m in range(s, length, s) for p in (m - 1, m)})


def plant_block_edges(inputs, case: DecodeCase):
    """plant_dominant_keys at block_edges of each of case's sequences (and its pages' when paged)."""
    page_size = case.page_size if case.layout == "paged" else None
    plant_dominant_keys(inputs, [block_edges(n, page_size) for n in case.seq_lens])


def make_inputs(case: DecodeCase, device):
    return make_case_tensors(case, device)[0]


def seeded_lengths(batch, max_len, variable, seed):
    """Benchmark lengths: all max_len, or uniform in [max_len / 8, max_len], fixed per seed."""
    if not variable:
        return (max_len,) * batch
    rng = random.Random(seed)
    return tuple(rng.randint(max_len // 8, max_len) for _ in range(batch))
