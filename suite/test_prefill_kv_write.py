"""prefill_kv_write (SPEC 2.4): every native variant against the oracle, the oracle itself, bad input."""

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels.prefill_kv_write import HEAD_DIMS, VARIANTS, check_write_args, tile_tokens
from suite import reference
from suite.decode_cases import quant_params
from suite.kv_write_cases import BITS, POISON, WriteCase, check_write, make_inputs, poison, write_in_torch
from suite.views import misaligned, token_strided

pytestmark = pytest.mark.prefill

FORMATS = ("none", "int8", "fp8")
PAGE_SIZES = (1, 3, 16, 54, 64)
NEEDS = {"native_cp_async": [pytest.mark.requires_cuda], "native_tma": [pytest.mark.requires_tma]}


@pytest.fixture(params=[pytest.param(name, marks=NEEDS[name]) for name in sorted(VARIANTS)])
def kv_write_variant(request):
    return request.param, VARIANTS[request.param]


def _run_case(kv_write_variant, case, device):
    _, launcher = kv_write_variant
    inputs = make_inputs(case, device)
    launch = launcher(**inputs)
    launch()
    check_write(inputs)
    # The bound launch is reusable: again, over a re-poisoned cache, and as bound though the caller's
    # block table now names other pages of the cache (a launch reading it would write those).
    poison(inputs)
    table = inputs["block_table"]
    bound_table = table.clone()
    moved = torch.randperm(inputs["k_cache"].shape[0], device=table.device).to(table.dtype)
    table.copy_(torch.where(table >= 0, moved[table.clamp(min=0).long()], table))
    launch()
    table.copy_(bound_table)
    check_write(inputs)


@st.composite
def write_cases(draw, fmt):
    n = draw(st.integers(1, 6))
    return WriteCase(prompt_lens=tuple(draw(st.lists(st.integers(1, 700), min_size=n, max_size=n))),
                     kv_heads=draw(st.sampled_from((1, 2, 4, 6, 8, 12))), head_dim=draw(st.sampled_from(HEAD_DIMS)),
                     dtype=draw(st.sampled_from((torch.float16, torch.bfloat16))),
                     page_size=draw(st.sampled_from(PAGE_SIZES)), quant=fmt,
                     spare_pages=draw(st.integers(0, 5)), q_heads=draw(st.sampled_from((0, 4))))


@pytest.mark.parametrize("fmt", quant_params(FORMATS))
@given(data=st.data())
def test_matches_reference(kv_write_variant, fmt, device, data):
    _run_case(kv_write_variant, data.draw(write_cases(fmt), label="case"), device)


@pytest.mark.parametrize("prompt_lens", [(1,), (54, 97), (1, 64, 65, 251), (127, 2, 193)], ids=str)
@pytest.mark.parametrize("fmt", quant_params(FORMATS))
def test_awkward_lengths(kv_write_variant, fmt, device, prompt_lens):
    _run_case(kv_write_variant, WriteCase(prompt_lens, 2, 128, torch.bfloat16, page_size=16, quant=fmt), device)


def test_strided_qkv_view(kv_write_variant, device):
    case = WriteCase((97, 31), kv_heads=2, head_dim=64, dtype=torch.float16, page_size=16, q_heads=8)
    assert not make_inputs(case, "cpu")["k"].is_contiguous()  # really strided: views of x @ W_qkv
    _run_case(kv_write_variant, case, device)


# --- the oracle: it passes a correct write and catches wrong ones (runs without a GPU) ---

@pytest.mark.parametrize("fmt", ["none", "int8", "fp8"])
def test_oracle_catches_wrong_writes(fmt):
    case = WriteCase((5, 40), kv_heads=2, head_dim=64, dtype=torch.bfloat16, page_size=16, quant=fmt)
    inputs = make_inputs(case, "cpu")
    write_in_torch(inputs)
    check_write(inputs)  # a correct write passes
    slots = reference.prompt_slots(inputs["cu_seqlens"], inputs["block_table"], 16)
    cache = inputs["k_cache"].flatten(0, 1)
    # One code off at the row's largest value, which every format stores exactly (+-QMAX once scaled):
    # elsewhere a bf16 input can sit on a rounding tie, where either neighbour is a correct rounding
    # (1 draw in ~100 flipped the last bit of such an fp8 code and passed).
    largest = int(inputs["k"][7, 1].abs().argmax())
    wrong = {
        "a value off": lambda: cache.view(BITS[cache.element_size()])[slots[7], 1, largest].sub_(1),
        "a token missing": lambda: cache[slots[44]].fill_(POISON[cache.dtype]),
        "a row beyond the prompt": lambda: cache[slots[44] + 1].copy_(cache[slots[44]]),
    }
    for what, corrupt in wrong.items():
        saved = cache.clone()
        corrupt()
        with pytest.raises(AssertionError):
            check_write(inputs)
        cache.copy_(saved)
    if fmt != "none":  # a scale off by one float32 step
        inputs["v_scale"].flatten(0, 1)[slots[3], 0] *= 1 + 2**-22
        with pytest.raises(AssertionError):
            check_write(inputs)



# --- bad input (SPEC 7): checked before anything runs, so these need no GPU ---

def _bad_inputs():
    inputs = make_inputs(WriteCase((5, 40), kv_heads=2, head_dim=64, dtype=torch.bfloat16, page_size=16), "cpu")
    return inputs | dict(k_scale=None, v_scale=None)


def _int4_caches(i):
    shape = i["k_cache"].shape
    i["k_cache"], i["v_cache"] = (torch.zeros(shape[:-1] + (32,), dtype=torch.uint8) for _ in "kv")
    i["k_scale"], i["v_scale"] = torch.ones(shape[:-1]), torch.ones(shape[:-1])


def _page_twice(i):
    i["block_table"][1, 1] = i["block_table"][0, 0]


def _rows_twice_apart(t):
    # t's values in a view whose first dimension's rows lie twice as far apart
    return torch.cat([t, t], 1)[:, :t.shape[1]]


BAD_INPUTS = {  # what is wrong: (change to valid inputs, error, message)
    "k float32": (lambda i: i.update(k=i["k"].float()), TypeError, "k has dtype"),
    "v other shape": (lambda i: i.update(v=i["v"][:, :1]), ValueError, "v has shape"),
    "head dim 96": (lambda i: i.update(k=torch.randn(45, 2, 96).bfloat16(), v=torch.randn(45, 2, 96).bfloat16()), ValueError, "head dim 96"),
    "k heads strided": (lambda i: i.update(k=i["k"].transpose(1, 2).contiguous().transpose(1, 2)),
                        ValueError, "each token's [Hkv, D] contiguously"),
    "int4 cache": (_int4_caches, ValueError, "not written by prefill_kv_write"),
    "cache heads": (lambda i: i.update(k_cache=i["k_cache"][:, :, :1], v_cache=i["v_cache"][:, :, :1]),
                    ValueError, "k_cache has shape"),
    "cu_seqlens int64": (lambda i: i.update(cu_seqlens=i["cu_seqlens"].long()), TypeError, "cu_seqlens has dtype"),
    "cu_seqlens strided": (lambda i: i.update(cu_seqlens=i["cu_seqlens"].repeat_interleave(2)[::2]), ValueError,
                           "cu_seqlens must be contiguous in its last dimension, got strides (2,)"),
    "cu_seqlens decreasing": (lambda i: i.update(cu_seqlens=torch.tensor([0, 30, 20], dtype=torch.int32)),
                              ValueError, "never decrease"),
    "cu_seqlens beyond k": (lambda i: i.update(cu_seqlens=torch.tensor([0, 5, 46], dtype=torch.int32)),
                            ValueError, "cu_seqlens ends at 46, not at k's 45 tokens"),
    "cu_seqlens short of k": (lambda i: i.update(cu_seqlens=torch.tensor([0, 5, 44], dtype=torch.int32)),
                              ValueError, "cu_seqlens ends at 44, not at k's 45 tokens"),
    "prompt beyond capacity": (lambda i: i.update(block_table=i["block_table"][:, :2].contiguous()),
                               ValueError, "exceeds the block table's capacity"),
    "page out of range": (lambda i: i["block_table"].__setitem__((0, 0), 99), ValueError,
                          "block_table[0, 0] = 99 is outside"),
    "page twice": (_page_twice, ValueError, "writes would race"),
    "k address": (lambda i: i.update(k=misaligned(i["k"])), ValueError,
                  "k: address and token stride must be 16-byte aligned (cp.async, TMA)"),
    "v token stride": (lambda i: i.update(v=token_strided(i["v"], 129)), ValueError,
                       "v: address and token stride must be 16-byte aligned (cp.async, TMA), got 0x"),
    "v strides unlike k's": (lambda i: i.update(v=token_strided(i["v"], 136)), ValueError,
                             "v strides (136, 64, 1) must equal k strides (128, 64, 1)"),
    "cache pages strided": (lambda i: i.update(k_cache=_rows_twice_apart(i["k_cache"]),
                                               v_cache=_rows_twice_apart(i["v_cache"])),
                            ValueError, "k_cache must be contiguous, got strides (4096, 128, 64, 1)"),
    "cu_seqlens one offset": (lambda i: i.update(cu_seqlens=torch.tensor([0], dtype=torch.int32)), ValueError,
                              "cu_seqlens must hold batch + 1 >= 2 offsets, got shape (1,)"),
    "block_table rows strided": (lambda i: i.update(block_table=_rows_twice_apart(i["block_table"])), ValueError,
                                 "block_table must be contiguous, got strides (8, 1)"),
    "cpu tensors": (lambda i: None, ValueError, "need a CUDA tensor"),
    "no tokens": (lambda i: i.update(k=i["k"][:0], v=i["v"][:0], cu_seqlens=torch.tensor([0, 0], dtype=torch.int32)),
                  ValueError, "k has shape (0, 2, 64): a write needs at least one token"),
    "cache address": (lambda i: i.update(k_cache=misaligned(i["k_cache"])), ValueError,
                      "k_cache: address must be 16-byte aligned (cp.async, TMA), got 0x"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_bad_input(bad):
    change, error, message = BAD_INPUTS[bad]
    inputs = _bad_inputs()
    change(inputs)
    with pytest.raises(error, match=re.escape(message)):
        check_write_args(**inputs)


@pytest.mark.parametrize("page_size, token_bytes, tokens", [(16, 2048, 8), (16, 256, 16), (64, 256, 64), (54, 256, 2),
                                                            (7, 256, 1), (16, 32768, 1), (1024, 64, 256)])
def test_tile_tokens(page_size, token_bytes, tokens):
    # a power of two dividing the page, within a stage's bytes and a TMA box side
    assert tile_tokens(page_size, token_bytes) == tokens


@pytest.mark.requires_tma
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_replays_in_a_cuda_graph(variant, device):
    # Launched on torch's current stream, so a CUDA graph captures it (tensor maps included).
    inputs = make_inputs(WriteCase((97, 31), 2, 128, torch.bfloat16, page_size=16), device)
    launch = VARIANTS[variant](**inputs)
    launch()  # compiled and loaded outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    for _ in range(2):
        inputs["k"].copy_(torch.randn_like(inputs["k"]))
        poison(inputs)
        graph.replay()
        check_write(inputs)
