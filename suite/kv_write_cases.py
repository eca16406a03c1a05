"""prefill_kv_write cases (SPEC 2.4): a description, fresh inputs over a poisoned cache, the oracle."""

from dataclasses import dataclass

import torch

from kernels import kv_quant
from suite import reference

# Cache poison: a value no write produces. int8 -128 lies outside kv_quant's [-127, 127];
# bf16/fp16/fp8 and the scales get NaN.
POISON = {torch.int8: -128, torch.float8_e4m3fn: float("nan"), torch.float32: float("nan"),
          torch.float16: float("nan"), torch.bfloat16: float("nan")}
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32}  # compare bit patterns: NaN poison equals itself
FP8_MANTISSA_BITS = 3
FP8_MIN_NORMAL_EXP = -6


@dataclass(frozen=True)
class WriteCase:
    prompt_lens: tuple
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    page_size: int
    quant: str = "none"  # "none", "int8" or "fp8"
    spare_pages: int = 3
    q_heads: int = 0  # > 0: k, v are strided views of a fused qkv projection with this many q heads

    @property
    def batch(self):
        return len(self.prompt_lens)

    def bytes_moved(self):
        # every prompt token's K and V read, written as stored (quantized: bytes + a float32 scale)
        rows = 2 * sum(self.prompt_lens) * self.kv_heads
        stored = self.head_dim * (self.dtype.itemsize if self.quant == "none" else 1) + 4 * (self.quant != "none")
        return rows * (self.head_dim * self.dtype.itemsize + stored)

    def __str__(self):
        lens = f"P{self.prompt_lens[0]}" if len(set(self.prompt_lens)) == 1 else f"P{min(self.prompt_lens)}-{max(self.prompt_lens)}"
        return f"B{self.batch}-{lens}-H{self.kv_heads}-D{self.head_dim}-ps{self.page_size}" + \
            ("" if self.dtype == torch.bfloat16 else "-fp16")


def make_inputs(case: WriteCase, device):
    """The launchers' keyword arguments: random K, V (never zeros) packed over the batch, pages
    scattered at random, caches (and scales) poisoned."""
    tokens, d = sum(case.prompt_lens), case.head_dim
    if case.q_heads:  # [tokens, Hq + 2 Hkv, D], as x @ W_qkv leaves it
        qkv = torch.randn(tokens, case.q_heads + 2 * case.kv_heads, d, dtype=case.dtype, device=device)
        k, v = qkv[:, case.q_heads:case.q_heads + case.kv_heads], qkv[:, case.q_heads + case.kv_heads:]
    else:
        k, v = (torch.randn(tokens, case.kv_heads, d, dtype=case.dtype, device=device) for _ in "kv")
    cu_seqlens = torch.tensor([0] + list(torch.tensor(case.prompt_lens).cumsum(0)), dtype=torch.int32)
    pages_per_seq = [-(-n // case.page_size) for n in case.prompt_lens]
    num_pages = sum(pages_per_seq) + case.spare_pages
    order = torch.randperm(num_pages).tolist()
    table = torch.full((case.batch, max(pages_per_seq) + 1), -1, dtype=torch.int32)  # -1: never read
    for b, n in enumerate(pages_per_seq):
        table[b, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
    cache_dtype = case.dtype if case.quant == "none" else kv_quant.FORMATS[case.quant]
    shape = (num_pages, case.page_size, case.kv_heads, d)
    inputs = dict(k=k, v=v, cu_seqlens=cu_seqlens.to(device), block_table=table.to(device),
                  k_cache=torch.full(shape, POISON[cache_dtype], dtype=cache_dtype, device=device),
                  v_cache=torch.full(shape, POISON[cache_dtype], dtype=cache_dtype, device=device))
    if case.quant != "none":
        inputs.update({name: torch.full(shape[:-1], POISON[torch.float32], device=device)
                       for name in ("k_scale", "v_scale")})
    return inputs


def poison(inputs):
    """Refill the caches (and scales) with poison, in place."""
    for name in ("k_cache", "v_cache", "k_scale", "v_scale"):
        if inputs.get(name) is not None:
            inputs[name].fill_(POISON[inputs[name].dtype])


def write_in_torch(inputs):
    """A correct write, in plain torch (what the kernels must produce)."""
    slots = reference.prompt_slots(inputs["cu_seqlens"], inputs["block_table"], inputs["k_cache"].shape[1])
    fmt = kv_quant.format_of(inputs["k_cache"])
    for name in ("k", "v"):
        src = inputs[name][: len(slots)]
        if fmt == "none":
            inputs[f"{name}_cache"].flatten(0, 1)[slots] = src
        else:
            data, scale = kv_quant.quantize(src, fmt)
            inputs[f"{name}_cache"].flatten(0, 1)[slots] = data
            inputs[f"{name}_scale"].flatten(0, 1)[slots] = scale


def checked(launch, inputs):
    """launch, once its write into the caches (poisoned first) has passed check_write: every timed
    write, a baseline measured on demand included, is checked first."""
    poison(inputs)
    launch()
    check_write(inputs)
    return launch


def _bits(t):
    return t.view(BITS[t.element_size()])


def check_write(inputs):
    """The caches after a write, against the prompt: every prompt token's row where the block
    table puts it (bit-exact for fp16/bf16; quantized: within the format's rounding bound of the
    float64 values, with scale = amax / QMAX) and every other row still poisoned."""
    slots = reference.prompt_slots(inputs["cu_seqlens"].cpu(), inputs["block_table"].cpu(),
                                   inputs["k_cache"].shape[1])
    n = len(slots)
    fmt = kv_quant.format_of(inputs["k_cache"])
    for name in ("k", "v"):
        cache = inputs[f"{name}_cache"].cpu().flatten(0, 1)  # [slots, Hkv, D]
        src = inputs[name][:n].cpu()
        untouched = torch.ones(cache.shape[0], dtype=torch.bool)
        untouched[slots] = False
        poisoned = torch.full_like(cache[untouched], POISON[cache.dtype])
        assert torch.equal(_bits(cache[untouched]), _bits(poisoned)), f"{name}_cache: rows outside the prompt written"
        if fmt == "none":
            assert torch.equal(_bits(cache[slots]), _bits(src)), \
                f"{name}_cache: {(_bits(cache[slots]) != _bits(src)).sum()} values differ from the prompt"
            continue
        scale = inputs[f"{name}_scale"].cpu().flatten(0, 1)  # [slots, Hkv]
        assert torch.isnan(scale[untouched]).all(), f"{name}_scale: rows outside the prompt written"
        _check_quantized(name, cache[slots], scale[slots], src.double(), fmt)


def _check_quantized(name, stored, scale, exact, fmt):
    # the float32 scale of kv_quant: amax / QMAX, rounded once
    torch.testing.assert_close(scale.double(), exact.abs().amax(-1) / kv_quant.QMAX[fmt], rtol=2**-23, atol=0,
                               msg=lambda m: f"{name}_scale: {m}")
    y = exact / scale.double()[..., None]  # the value the stored code approximates, in steps of scale
    error = (stored.double() - y).abs()
    if fmt == "int8":
        bound = torch.full_like(y, 0.5)  # round to nearest
    else:  # e4m3 rounds to nearest: half a unit in the last place, or of the subnormal step
        exponent = torch.floor(torch.log2(y.abs().clamp_min(2.0**FP8_MIN_NORMAL_EXP)))
        bound = 2.0 ** (exponent - FP8_MANTISSA_BITS - 1)
    slack = y.abs() * 2**-23  # the kernel rounds x / scale to float32 before rounding to the format
    worst = (error - bound - slack).max().item()
    assert worst <= 0, f"{name}_cache: a stored value is {worst:.3g} steps beyond the {fmt} rounding bound"
