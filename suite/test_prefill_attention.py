"""Prefill attention (SPEC 2.3): every variant against the float64 reference, and bad input."""

import re
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels import prefill_attention
from kernels.checks import HEAD_DIMS, SharedMemoryTooSmall
from kernels.prefill_attention import VARIANTS, check_prefill_args, triton_cp_async
from suite import reference
from suite.decode_cases import block_edges, every_block_edge, poisoned_out
from suite.prefill_cases import (PrefillCase, check_output, check_rows, make_inputs, plant_block_edges,
                                 plant_dominant_keys, rows_attention, variant_params)
from suite.views import misaligned, token_strided

pytestmark = pytest.mark.prefill

INTERPRETER_TILE = (16, 16)  # small tiles: the interpreter runs every program on the CPU


@pytest.fixture(params=variant_params(sorted(VARIANTS)))
def prefill_variant(request):
    return request.param, VARIANTS[request.param]


def _run_case(prefill_variant, case, device, planted=None, **kwargs):
    # planted: per prompt, positions given dominant keys (plant_dominant_keys)
    name, launcher = prefill_variant
    inputs = make_inputs(case, device)
    if planted is not None:
        plant_dominant_keys(inputs, planted)
    out = torch.full(inputs["q"].shape, float("nan"), dtype=case.dtype, device=device)  # poisoned
    if name != "sdpa" and device.type != "cuda":
        kwargs.setdefault("tile", INTERPRETER_TILE)
    launcher(**inputs, out=out, **kwargs)()
    check_output(out, inputs)


def _limits(device):
    if device.type == "cuda":
        return dict(batch=4, max_len=700)
    return dict(batch=3, max_len=40)


@st.composite
def prefill_cases(draw, batch, max_len):
    n = draw(st.integers(1, batch))
    kv_heads = draw(st.sampled_from((1, 2)))
    return PrefillCase(prompt_lens=tuple(draw(st.lists(st.integers(1, max_len), min_size=n, max_size=n))),
                       q_heads=kv_heads * draw(st.sampled_from((1, 2, 4))), kv_heads=kv_heads,
                       head_dim=draw(st.sampled_from(HEAD_DIMS)),
                       dtype=draw(st.sampled_from((torch.float16, torch.bfloat16))), fused_qkv=draw(st.booleans()))


@given(data=st.data())
def test_matches_reference(prefill_variant, device, data):
    _run_case(prefill_variant, data.draw(prefill_cases(**_limits(device)), label="case"), device)


@given(data=st.data())
def test_every_position_at_a_block_edge_is_attended(prefill_variant, device, data):
    # The random cases above cannot see one key row missed or repeated for queries far beyond it (see
    # plant_dominant_keys): here up to 12 positions per prompt at block edges carry most of the softmax
    # weight of every query after them.
    case = data.draw(prefill_cases(**_limits(device)), label="case")
    edges = [every_block_edge(n, (16,)) for n in case.prompt_lens]  # any tile's query and key blocks
    planted = [{0, n - 1} | set(data.draw(st.lists(st.sampled_from(edges[b]), max_size=10),
                                          label=f"edges of prompt {b}")) for b, n in enumerate(case.prompt_lens)]
    _run_case(prefill_variant, case, device, planted=planted)


def test_a_dropped_planted_row_fails_the_check(device):
    # What the test above relies on. Key 4095 (a 4096-row block's last) left out for the last 16 queries
    # of a 16384-token prompt: with keys planted at the block edges they miss the reference whatever the
    # random keys (over random keys alone a row's weight is ~1/16384, near bf16's bound).
    n = 16384
    case = PrefillCase((n,), 4, 1, 128, torch.bfloat16)
    inputs = make_inputs(case, device)
    tail, dropped = range(n - 16, n), [*range(4095), *range(4096, n)]
    plant_block_edges(inputs, case)
    with pytest.raises(AssertionError, match="beyond the rounding bound"):
        check_rows(rows_attention(inputs, 0, tail, dropped).to(case.dtype), inputs, 0, tail, n)


def test_rows_attention_is_the_references_rows(device):
    # the wrong-row tests build outputs with rows_attention: over all of a prompt's keys, the reference
    inputs = make_inputs(PrefillCase((37, 20), 4, 2, 64, torch.bfloat16), device)
    torch.testing.assert_close(rows_attention(inputs, 37, range(3, 20), range(20)),
                               reference.prefill_attention(**inputs)[40:])


def _planted(prompt_lens, keys):
    # keys "planted": dominant keys at every prompt's block edges (plant_block_edges), else None
    return [block_edges(n) for n in prompt_lens] if keys == "planted" else None


@pytest.mark.parametrize("keys", ["random", "planted"])
@pytest.mark.parametrize("prompt_lens", [(1,), (54, 97), (1, 16, 17, 131), (127, 2)], ids=str)
def test_awkward_lengths(prefill_variant, device, prompt_lens, keys):
    _run_case(prefill_variant, PrefillCase(prompt_lens, 4, 2, 64, torch.bfloat16), device,
              planted=_planted(prompt_lens, keys))


def test_fused_qkv_views(prefill_variant, device):
    case = PrefillCase((37, 20), 4, 2, 128, torch.float16, fused_qkv=True)
    assert not make_inputs(case, "cpu")["q"].is_contiguous()  # really strided: views of x @ W_qkv
    _run_case(prefill_variant, case, device)


def test_a_launch_attends_the_prompts_it_was_bound_with(prefill_variant, device):
    # The caller's cu_seqlens moved in place after bind (still T tokens, other prompts): the query
    # blocks were listed from the bound offsets, so a kernel reading the new ones would attend and
    # store the wrong rows.
    name, launcher = prefill_variant
    inputs = make_inputs(PrefillCase((54, 97), 4, 2, 64, torch.bfloat16), device)
    out = poisoned_out(inputs)
    launch = launcher(**inputs, out=out, **({} if name == "sdpa" or device.type == "cuda"
                                           else dict(tile=INTERPRETER_TILE)))
    bound = inputs["cu_seqlens"].clone()
    inputs["cu_seqlens"].copy_(torch.tensor([0, 97, 151], dtype=torch.int32))
    launch()
    inputs["cu_seqlens"].copy_(bound)
    check_output(out, inputs)


@pytest.mark.parametrize("keys", ["random", "planted"])
@pytest.mark.parametrize("tile", [(32, 16), (16, 16), (64, 32)], ids=str)
def test_tiles(tile, keys, device):
    # --tma-tile-size and the cp.async kernel's tile: any BLOCK_M multiple of BLOCK_N is exact
    case = PrefillCase((70, 33), 2, 1, 64, torch.bfloat16)
    for name in ("triton_cp_async", "triton_tma"):
        if name == "triton_tma" and device.type == "cuda" and torch.cuda.get_device_capability() < (9, 0):
            continue
        _run_case((name, VARIANTS[name]), case, device, planted=_planted(case.prompt_lens, keys), tile=tile)


def test_reference_takes_queries_in_blocks(device):
    # The float64 reference bounds its scores' memory by taking a prompt's queries a block at a time
    # (a 16K-token prompt's whole [32, P, P] is 64 GiB): blocks of 3 rows, the last one short, give
    # each prompt's whole causal attention.
    inputs = make_inputs(PrefillCase((37, 20), 4, 2, 64, torch.bfloat16), device)
    q, k, v, cu = (inputs[name] for name in ("q", "k", "v", "cu_seqlens"))
    blocked = reference.prefill_attention(q, k, v, cu, scores_bytes=8 * 4 * 37 * 3)
    for s, e in ((0, 37), (37, 57)):
        hidden = torch.ones(e - s, e - s, dtype=torch.bool, device=device).triu(1)
        whole = reference.attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), hidden)
        torch.testing.assert_close(blocked[s:e], whole.transpose(0, 1))


# --- bad input (SPEC 7): refused before anything runs ---

def _bad_inputs():
    return make_inputs(PrefillCase((5, 40), 4, 2, 64, torch.bfloat16), "cpu") | dict(out=None)


BAD_INPUTS = {  # what is wrong: (change to valid inputs, error, message)
    "q float32": (lambda i: i.update(q=i["q"].float()), TypeError, "q has dtype"),
    "head dim 96": (lambda i: i.update(q=torch.randn(45, 4, 96).bfloat16()), ValueError, "head dim 96"),
    "k other dtype": (lambda i: i.update(k=i["k"].half()), TypeError, "k has dtype"),
    "v other shape": (lambda i: i.update(v=i["v"][:, :1]), ValueError, "v has shape"),
    "heads not a multiple": (lambda i: i.update(q=i["q"][:, :3].contiguous()), ValueError, "not a multiple"),
    "q heads strided": (lambda i: i.update(q=i["q"].transpose(1, 2).contiguous().transpose(1, 2)),
                        ValueError, "q must hold each token's [heads, D] contiguously"),
    "cu_seqlens int64": (lambda i: i.update(cu_seqlens=i["cu_seqlens"].long()), TypeError, "cu_seqlens has dtype"),
    "cu_seqlens strided": (lambda i: i.update(cu_seqlens=i["cu_seqlens"].repeat_interleave(2)[::2]), ValueError,
                           "cu_seqlens must be contiguous in its last dimension, got strides (2,)"),
    "cu_seqlens one offset": (lambda i: i.update(cu_seqlens=torch.tensor([0], dtype=torch.int32)), ValueError,
                              "cu_seqlens must hold batch + 1 >= 2 offsets, got shape (1,)"),
    "empty prompt": (lambda i: i.update(cu_seqlens=torch.tensor([0, 5, 5], dtype=torch.int32)), ValueError,
                     "every prompt >= 1 token"),
    "beyond q": (lambda i: i.update(cu_seqlens=torch.tensor([0, 5, 46], dtype=torch.int32)), ValueError,
                 "cu_seqlens ends at 46, not at q's 45 tokens"),
    "short of q": (lambda i: i.update(cu_seqlens=torch.tensor([0, 5, 44], dtype=torch.int32)), ValueError,
                   "cu_seqlens ends at 44, not at q's 45 tokens"),
    "out shape": (lambda i: i.update(out=i["q"][:1].clone()), ValueError, "out has shape"),
    "out 2-D": (lambda i: i.update(out=i["q"].flatten(1)), ValueError, "out has shape (45, 256), expected (45, 4, 64)"),
    "out not a tensor": (lambda i: i.update(out=[1]), TypeError, "out must be a torch.Tensor, got list"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_bad_input(bad):
    change, error, message = BAD_INPUTS[bad]
    inputs = _bad_inputs()
    change(inputs)
    with pytest.raises(error, match=re.escape(message)):
        check_prefill_args(**inputs)


@pytest.mark.parametrize("knobs, message", [(dict(tile=(48, 16)), "tile BLOCK_M must be a positive power of two"),
                                            (dict(tile=(64, 8)), "tile BLOCK_N 8 must be >= 16"),
                                            (dict(tile=(32, 64)), "BLOCK_M 32 must be a multiple of BLOCK_N 64"),
                                            (dict(num_stages=1), "num_stages must be >= 2")])
def test_bad_knobs(knobs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        triton_cp_async(**_bad_inputs(), **knobs)


@pytest.mark.parametrize("change, message", [
    (lambda i: i.update(q=misaligned(i["q"])),
     "q: tensor descriptors need 16-byte aligned rows, got stride 256"),  # address 2 bytes past aligned
    (lambda i: i.update(k=token_strided(i["k"], 129), v=token_strided(i["v"], 129)),
     "k: tensor descriptors need 16-byte aligned rows, got stride 129")], ids=["q address", "k token stride"])
def test_tma_needs_16_byte_aligned_rows(change, message):
    # checked before any descriptor or build: no GPU needed
    inputs = _bad_inputs()
    change(inputs)
    with pytest.raises(ValueError, match=re.escape(message)):
        prefill_attention.triton_tma(**inputs)


def test_sdpa_backend_must_be_known():
    with pytest.raises(ValueError, match=r"backend must be one of \[.*\], got 'fastest'"):
        prefill_attention.sdpa(**_bad_inputs(), backend="fastest")


def test_tile_is_fitted_to_the_gpus_shared_memory(monkeypatch):
    # The launcher compiles before it launches: a default tile whose build needs more shared memory
    # than a block may have halves BLOCK_N until it fits; a tile the caller chose is refused. Real
    # builds for an H100 and a 99 KB block: suite/test_builds.py. Here a stand-in build of 8 bytes
    # per tile element, so the test runs where the interpreter builds nothing.
    def warmup(*args, grid, **meta):
        return SimpleNamespace(metadata=SimpleNamespace(shared=8 * meta["BLOCK_M"] * meta["BLOCK_N"]))

    monkeypatch.setattr(prefill_attention.hw, "interpreting", lambda: False)
    monkeypatch.setattr(prefill_attention.hw, "shared_memory_per_block", lambda device: 8 * 128 * 32)
    monkeypatch.setattr(prefill_attention, "_prefill", SimpleNamespace(warmup=warmup))
    inputs = make_inputs(PrefillCase((5, 40), 4, 2, 128, torch.bfloat16), "cpu")
    assert prefill_attention.TILE["triton_cp_async"][128] == (128, 128)
    assert triton_cp_async(**inputs).tile == (128, 32)
    with pytest.raises(SharedMemoryTooSmall, match=re.escape("tile (128, 64) at 3 stages needs 65536 bytes of shared "
                                                             "memory, more than the 32768 a block may have")):
        triton_cp_async(**inputs, tile=(128, 64))


def test_sdpa_anchor_times_sdpa_alone(device):
    # the benchmarked part is one SDPA call on the padded [B, Hq, P_max, D] layout; launch() packs it
    case = PrefillCase((37, 20), 4, 2, 64, torch.bfloat16)
    inputs = make_inputs(case, device)
    launch = VARIANTS["sdpa"](**inputs, out=poisoned_out(inputs))
    padded = launch.timed()
    assert padded.shape == (2, 4, 37, 64)
    out = launch()
    torch.testing.assert_close(out[37:], padded[1, :, :20].transpose(0, 1), rtol=0, atol=0)
    check_output(out, inputs)
