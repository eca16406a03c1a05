"""The paged-read floor (kernels/paged_read.py): it must read exactly the rows each sequence holds,
through its block table, or its time is the floor of some other read."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels import paged_read
from suite.anchors import check_partial_sums, paged_read_floor
from suite.decode_cases import DecodeCase, make_inputs

pytestmark = pytest.mark.decode


def _run_case(case, inputs, chunk):
    # -> the checked sums [B, Hkv, n_chunks]; poisoned (NaN) first: every program must write its sum
    partial = torch.full((case.batch, case.kv_heads, -(-max(case.seq_lens) // chunk)), float("nan"),
                         dtype=torch.float32, device=inputs["q"].device)
    paged_read.paged_read(**inputs, chunk=chunk, out=partial)()
    check_partial_sums([partial], inputs)
    return partial


@given(seq_lens=st.lists(st.integers(1, 300), min_size=1, max_size=3),
       page_size=st.sampled_from((1, 3, 16, 54, 64)), kv_heads=st.sampled_from((1, 2)),
       head_dim=st.sampled_from((64, 128)), dtype=st.sampled_from((torch.float16, torch.bfloat16)),
       chunk=st.sampled_from((64, 128, 256)), spare=st.integers(0, 9), strided=st.booleans())
def test_reads_every_row_of_every_sequence(seq_lens, page_size, kv_heads, head_dim, dtype, chunk, spare, strided,
                                           device):
    case = DecodeCase(tuple(seq_lens), 2 * kv_heads, kv_heads, head_dim, dtype, "paged", page_size, spare=spare,
                      strided=strided)
    _run_case(case, make_inputs(case, device), chunk)


def test_a_launch_reads_the_lengths_and_pages_it_was_bound_with(device):
    # The read is the bound one (its chunks were counted from those lengths): the caller's seq_lens
    # and block table changed in place afterwards (shorter lengths, the pages renamed within the
    # cache) change nothing it reads.
    case = DecodeCase((54, 300), 4, 2, 64, torch.float16, "paged", 16)
    inputs = make_inputs(case, device)
    launch = paged_read.paged_read(**inputs, chunk=64)
    lengths, table = inputs["seq_lens"], inputs["block_table"]
    bound = lengths.clone(), table.clone()
    lengths.fill_(1)
    renamed = torch.randperm(inputs["k_cache"].shape[0], device=device).to(table.dtype)
    table.copy_(torch.where(table >= 0, renamed[table.clamp(min=0).long()], table))
    partial = launch()
    lengths.copy_(bound[0])
    table.copy_(bound[1])
    check_partial_sums([partial], inputs)


def test_chunks_past_a_short_sequence_sum_nothing(device):
    # one chunk of 64 for the first sequence, five for the second: the first one's others are 0
    case = DecodeCase((54, 300), 4, 2, 64, torch.float16, "paged", 16)
    partial = _run_case(case, make_inputs(case, device), 64)
    assert partial.shape == (2, 2, 5)
    assert torch.all(partial[0, :, 1:] == 0) and torch.all(partial[1] != 0)


def test_floor_checks_every_tiling_and_the_check_catches_one_wrong_sum(device):
    case = DecodeCase((300, 54), 4, 2, 64, torch.bfloat16, "paged", 16)
    inputs = make_inputs(case, device)
    floor = paged_read_floor(inputs, device, rounds=3)  # tilings of 64 and 256, then 1024: one per sequence
    assert floor > 0 if device.type == "cuda" else floor == 0.0
    partial = _run_case(case, inputs, 64)
    partial[1, 0, 0] += 1.0  # the bound here is about 1e-6 * 54 * 64 * E|k||v| = 0.002
    with pytest.raises(AssertionError, match="sequence 1, KV head 0"):
        check_partial_sums([partial], inputs)


@pytest.fixture
def paged_inputs(device):
    return make_inputs(DecodeCase((70, 5), 4, 2, 64, torch.float16, "paged", 16), device)


def test_bad_input_names_the_argument(paged_inputs, device):
    with pytest.raises(ValueError, match="chunk must be a positive power of two, got 48"):
        paged_read.paged_read(**paged_inputs, chunk=48)
    with pytest.raises(ValueError, match=r"out has shape \(2, 2, 1\), expected \(2, 2, 2\)"):
        paged_read.paged_read(**paged_inputs, chunk=64, out=torch.empty(2, 2, 1, device=device))
    with pytest.raises(ValueError, match="v_cache strides"):
        pages, page_size, heads, dim = paged_inputs["v_cache"].shape
        v = torch.empty(pages, heads, page_size, dim, dtype=torch.float16, device=device).transpose(1, 2)
        v.copy_(paged_inputs["v_cache"])
        paged_read.paged_read(**(paged_inputs | dict(v_cache=v)), chunk=64)
    with pytest.raises(ValueError, match="block_table is None: paged_read reads a paged cache"):
        paged_read.paged_read(**(paged_inputs | dict(block_table=None)), chunk=64)
    table = paged_inputs["block_table"].clone()
    table[1, 0] = 1000
    with pytest.raises(ValueError, match=r"block_table\[1, 0\]"):
        paged_read.paged_read(**(paged_inputs | dict(block_table=table)), chunk=64)


def test_quantized_cache_is_refused(device):
    inputs = make_inputs(DecodeCase((70,), 4, 2, 64, torch.float16, "paged", 16, quant="int8"), device)
    with pytest.raises(ValueError, match="k_cache: an int8 cache"):
        paged_read.paged_read(**inputs, chunk=64)
