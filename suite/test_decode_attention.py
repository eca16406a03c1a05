"""Decode attention (SPEC 2.1): every variant against the float64 reference, and bad input."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels import decode_attention, decode_plan, hw, kv_planes, kv_quant
from kernels.checks import HEAD_DIMS
from suite import reference
from suite.decode_cases import (FUSED_DEQUANT, LAYOUTS, PAGE_SIZES, VARIANTS, DecodeCase, block_edges, check_output,
                                every_block_edge, make_case_tensors, make_inputs, plant_dominant_keys, poisoned_out,
                                quant_params, quantization_loss, variant_params)
from suite.views import misaligned, padded_rows

pytestmark = pytest.mark.decode

QUANTIZED = tuple(kv_quant.FORMATS)
SPLIT_VARIANTS = ("triton_split_kv", "triton_persistent", "cuda_persistent")  # chunked, merged by LSE


def pytest_generate_tests(metafunc):
    if "decode_variant" in metafunc.fixturenames:
        metafunc.parametrize("decode_variant", variant_params(sorted(VARIANTS)), indirect=True)
    if "layout" in metafunc.fixturenames:
        metafunc.parametrize("layout", LAYOUTS)


def _run_case(decode_variant, case, device, planted=None, **kwargs):
    # planted: per sequence, positions given dominant keys (plant_dominant_keys)
    _, launcher = decode_variant
    inputs = make_inputs(case, device)
    if planted is not None:
        plant_dominant_keys(inputs, planted)
    out = poisoned_out(inputs)
    launcher(**inputs, out=out, **kwargs)()
    check_output(out, inputs)


def _limits(device):
    # The interpreter runs every program on the CPU: keep its shapes small.
    if device.type == "cuda":
        return dict(batch=16, max_len=5000, kv_heads=(1, 2, 4, 8), groups=(1, 2, 3, 4, 5, 8, 16))
    return dict(batch=3, max_len=300, kv_heads=(1, 2), groups=(1, 2, 3, 4, 5))


@st.composite
def decode_cases(draw, layout, batch, max_len, kv_heads, groups, quants=("none",)):
    n = draw(st.integers(1, batch))
    kv = draw(st.sampled_from(kv_heads))
    return DecodeCase(
        seq_lens=tuple(draw(st.lists(st.integers(1, max_len), min_size=n, max_size=n))),
        q_heads=kv * draw(st.sampled_from(groups)), kv_heads=kv,
        head_dim=draw(st.sampled_from(HEAD_DIMS)),
        dtype=draw(st.sampled_from((torch.float16, torch.bfloat16))), layout=layout,
        page_size=draw(st.sampled_from(PAGE_SIZES)), spare=draw(st.integers(0, 70)),
        strided=draw(st.booleans()), quant=draw(st.sampled_from(quants)))


@given(data=st.data())
def test_matches_reference(decode_variant, layout, device, data):
    case = data.draw(decode_cases(layout, **_limits(device)), label="case")
    _run_case(decode_variant, case, device)


def _block_edges(case, lengths=None):
    # per sequence, where one dropped or repeated row shows (block_edges), to plant keys at
    return [block_edges(n, case.page_size) for n in lengths or case.seq_lens]


def _edges(length, page_size):
    # every block a kernel may split at: 16- and 64-position steps and chunks, pages
    return every_block_edge(length, (16, 64, page_size))


@given(data=st.data())
def test_every_position_at_a_block_edge_is_attended(decode_variant, layout, device, data):
    # The random cases above cannot see one missing or repeated row of a long sequence (see
    # plant_dominant_keys): here up to 12 positions at block edges carry most of the softmax weight.
    case = data.draw(decode_cases(layout, **_limits(device)), label="case")
    planted = [{0, n - 1} | set(data.draw(st.lists(st.sampled_from(_edges(n, case.page_size)), max_size=10),
                                          label=f"edges of sequence {b}")) for b, n in enumerate(case.seq_lens)]
    _run_case(decode_variant, case, device, planted=planted)


def test_a_dropped_planted_row_fails_the_check(device):
    # what the test above relies on: dropping one planted row of a 1000-position sequence misses
    # the reference by more than bf16's rounding bound
    case = DecodeCase((1000,), q_heads=8, kv_heads=2, head_dim=128, dtype=torch.bfloat16, layout="contiguous")
    inputs = make_inputs(case, device)
    plant_dominant_keys(inputs, [{999} | set(_edges(1000, 16)[::20])])  # 999: the row dropped below
    dropped = reference.decode_attention(**inputs | dict(seq_lens=inputs["seq_lens"] - 1))
    with pytest.raises(AssertionError, match="beyond the rounding bound"):
        check_output(dropped.to(case.dtype), inputs)


@pytest.mark.parametrize("variant", FUSED_DEQUANT)
@pytest.mark.parametrize("fmt", quant_params(QUANTIZED))
@given(data=st.data())
def test_quantized_cache_matches_reference(variant, fmt, device, data):
    # Checked as tightly as bf16/fp16 against the reference on the dequantized cache: the kernel
    # must compute exactly what the stored bytes say; keys planted at the block edges, so a dropped or
    # repeated row shows at any length. The layout is drawn with the rest of the case, not
    # parametrized: on a GPU nearly every example is a new build, so this halves the builds.
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    case = data.draw(decode_cases(layout, **_limits(device), quants=(fmt,)), label="case")
    _run_case((variant, VARIANTS[variant]), case, device, planted=_block_edges(case))


@pytest.mark.parametrize("seq_lens", [(1,), (54, 97), (1, 64, 65, 251), (127, 2, 193)], ids=str)
def test_awkward_lengths(decode_variant, layout, device, seq_lens):
    case = DecodeCase(seq_lens, q_heads=8, kv_heads=2, head_dim=64, dtype=torch.bfloat16,
                      layout=layout, page_size=16)
    _run_case(decode_variant, case, device)


def test_strided_inputs(decode_variant, layout, device):
    case = DecodeCase((97, 31), q_heads=4, kv_heads=2, head_dim=128, dtype=torch.float16,
                      layout=layout, page_size=16, strided=True)
    inputs = make_inputs(case, device)
    for name in ("q", "k_cache", "v_cache"):
        assert not inputs[name].is_contiguous(), f"{name} should be a strided view"
    _run_case(decode_variant, case, device)


@pytest.mark.parametrize("variant", variant_params(SPLIT_VARIANTS))
@pytest.mark.parametrize("chunk", [64, 128])
def test_many_chunks_per_sequence(variant, chunk, layout, device):
    # Small chunks: many tiles per program in the persistent loop, many partials to merge.
    case = DecodeCase((300, 5, 129), q_heads=4, kv_heads=1, head_dim=64, dtype=torch.float16, layout=layout)
    _run_case((variant, VARIANTS[variant]), case, device, chunk=chunk)


def _dims(inputs):
    # what the launchers plan from: make_inputs' launcher arguments, checked
    return decode_attention.check_decode_args(inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["seq_lens"],
                                              inputs["block_table"], None, inputs.get("k_scale"), inputs.get("v_scale"))


def test_one_sequence_merges_many_partials(layout, device):
    # One sequence on one program per SM: triton_persistent merges SINGLE_MERGE_ROWS_PER_WARP
    # partials per warp and step; 2100 positions in chunks of 64 are 33 partials per KV head, one
    # more than a step of 4 warps holds for 4 query heads per KV head.
    case = DecodeCase((2100,), q_heads=8, kv_heads=2, head_dim=64, dtype=torch.float16, layout=layout)
    sms = hw.num_sms(device)
    inputs = make_inputs(case, device)
    dims = _dims(inputs)
    assert decode_plan.plan_persistent(dims, sms, case.page_size if layout == "paged" else None, chunk=64,
                                       num_programs=sms).merge_rows == decode_plan.SINGLE_MERGE_ROWS_PER_WARP
    _run_case(("triton_persistent", VARIANTS["triton_persistent"]), case, device, chunk=64, num_programs=sms)


def _fast_memory_launch(case, device, monkeypatch, **knobs):
    # triton_persistent's plan for case where DRAM serves DEEP_GBPS_PER_SM per SM (an H200's, set
    # here on any GPU and in the interpreter)
    sms = hw.num_sms(device)
    monkeypatch.setattr(hw, "peak_dram_gbps", lambda _: decode_plan.DEEP_GBPS_PER_SM * sms)
    inputs = make_inputs(case, device)
    dims = _dims(inputs)
    return decode_plan.plan_persistent(dims, sms, case.page_size if case.layout == "paged" else None,
                                       shared_per_sm=hw.shared_memory_per_sm(device),
                                       dram_gbps=hw.peak_dram_gbps(device), **knobs)


def test_long_equal_tiles_take_a_deeper_pipeline(layout, device, monkeypatch):
    # Equal tiles of LONG_TILE positions in BLOCK_N steps: LONG_TILE_STAGES (three K/V buffers) where
    # the SM is H100-sized, paged ones alone on their SM, contiguous ones on fast memory; each
    # sequence split in two and merged.
    chunk, block_k = decode_plan.LONG_TILE, decode_plan.BLOCK_N
    case = DecodeCase((2 * chunk,) * 2, q_heads=4, kv_heads=1, head_dim=64, dtype=torch.bfloat16, layout=layout)
    launch = _fast_memory_launch(case, device, monkeypatch, chunk=chunk, block_k=block_k)
    # an SM smaller than an H100's keeps NUM_STAGES
    assert launch.deep_pipeline == (hw.shared_memory_per_sm(device) >= decode_plan.SM_SHARED)
    _run_case(("triton_persistent", VARIANTS["triton_persistent"]), case, device, planted=_block_edges(case),
              chunk=chunk, block_k=block_k)


def test_one_long_tile_per_sm_takes_long_steps_on_fast_memory(layout, device, monkeypatch):
    # Equal tiles of LONG_STEP_TILE positions, one per program and SM, on fast memory: LONG_BLOCK_N
    # steps at NUM_STAGES where the SM is H100-sized; each sequence split in two and merged.
    chunk = decode_plan.LONG_STEP_TILE
    case = DecodeCase((2 * chunk,) * 2, q_heads=4, kv_heads=1, head_dim=64, dtype=torch.bfloat16, layout=layout)
    launch = _fast_memory_launch(case, device, monkeypatch, chunk=chunk)
    assert launch.grid == 4 and launch.programs_per_sm == 1 and not launch.deep_pipeline
    full_sm = hw.shared_memory_per_sm(device) >= decode_plan.SM_SHARED
    assert launch.block_k == (decode_plan.LONG_BLOCK_N if full_sm else decode_plan.BLOCK_N)
    _run_case(("triton_persistent", VARIANTS["triton_persistent"]), case, device, planted=_block_edges(case),
              chunk=chunk)


@pytest.mark.parametrize("seq_lens, chunk, advanced", [((1, 54, 97, 200), 512, (16, 64, 112, 208)),
                                                     ((230,), 32, (250,)),
                                                     ((3, 1000, 3050), 1024, (40, 1030, 3100))],
                         ids=["whole sequences", "one sequence's chunks", "several sequences' chunks"])
@pytest.mark.parametrize("fmt", [pytest.param("none", id="bf16"), *quant_params(("int4",))])
def test_a_program_per_tile_of_the_capacity(layout, device, seq_lens, chunk, advanced, fmt):
    # A grid with a program per (sequence, chunk, KV head) of the cache's capacity: each program takes
    # its tile without the work list and, paged, loads its block-table entries up to the row's width.
    # The contiguous cache has 64 spare positions and the table 4 spare columns, so a sequence's last
    # chunks lie past its end (they must write nothing), and every table entry past a sequence's pages
    # names a page far outside the cache, which must never be read; only the pages the advance below
    # reaches are real. Then the lengths advance in place (a decode loop's replay), some into a chunk
    # that was past their end, and the launch runs again. int4: the quantized planes' tiles. The chunk
    # counts (10 and 4 of the capacity) share a factor with the 2 KV heads, so a program-to-tile map
    # that misses tiles cannot pass by coincidence (t % 2, t % 3 would cover every pair). Keys planted at
    # both lengths' block edges.
    case = DecodeCase(seq_lens, q_heads=6, kv_heads=2, head_dim=64, dtype=torch.bfloat16, layout=layout, spare=64,
                      quant=fmt)
    inputs = make_inputs(case, device)
    if layout == "paged":
        table = torch.cat([inputs["block_table"], torch.full_like(inputs["block_table"][:, :4], -1)], dim=1)
        free = sorted(set(range(inputs["k_cache"].shape[0])) - set(table.flatten().tolist()))
        for row, n in enumerate(advanced):
            for col in range(-(-seq_lens[row] // case.page_size), -(-n // case.page_size)):
                table[row, col] = free.pop()
        inputs["block_table"] = torch.where(table < 0, 2**31 - 1, table)
    plant_dominant_keys(inputs, [a | b for a, b in zip(_block_edges(case), _block_edges(case, advanced))])
    knobs = dict(chunk=chunk, num_programs=10_000)
    dims = _dims(inputs)
    page_size = case.page_size if layout == "paged" else None
    launch = decode_plan.plan_persistent(dims, hw.num_sms(device), page_size, **knobs)
    assert launch.tile_per_program and launch.grid == dims.batch * dims.num_kv_heads * -(-dims.capacity // chunk)
    out = poisoned_out(inputs)
    bound = decode_attention.triton_persistent(**inputs, out=out, **knobs)
    bound()
    check_output(out, inputs)
    inputs["seq_lens"].copy_(torch.tensor(advanced, dtype=torch.int32))
    out.fill_(float("nan"))
    bound()
    check_output(out, inputs)


@pytest.mark.requires_cuda
def test_the_gpu_reports_its_peak_dram_bandwidth():
    # 0 or junk would silently plan every GPU as an H100 (DEEP_GBPS_PER_SM): H100 SXM 3352, H200 4814
    assert 100 < hw.peak_dram_gbps("cuda") < 50_000


@pytest.mark.parametrize("variant", variant_params(FUSED_DEQUANT))
@pytest.mark.parametrize("page_size,chunk,hoisted", [(1, 512, 0), (3, 1024, 0), (3, 64, 32), (5, 128, 32),
                                                    (16, 128, 128)])
def test_block_table_hoisted_or_loaded_per_step(variant, page_size, chunk, hoisted, device):
    # A tile's block-table entries are loaded once where they fit MAX_TABLE_PAGES (page sizes that
    # do not divide the chunk straddle one more page), else every step: both paths, with page sizes
    # that are powers of two (a shift) and that are not (a division), meet the oracle.
    assert decode_plan.table_pages(chunk, page_size) == hoisted
    case = DecodeCase((600, 37, 301), q_heads=4, kv_heads=1, head_dim=64, dtype=torch.float16, layout="paged",
                      page_size=page_size, spare=5)
    _run_case((variant, VARIANTS[variant]), case, device, chunk=chunk)


def _bad(inputs, **changes):
    return {**inputs, **changes}


def _strided_last(t):
    # the same values and shape, the last dimension strided
    return t.transpose(-2, -1).contiguous().transpose(-2, -1)


BAD_INPUTS = {
    "q dtype": (lambda i: _bad(i, q=i["q"].float()), TypeError, "q has dtype"),
    "q rank": (lambda i: _bad(i, q=i["q"][0]), ValueError, "q must have 3 dimensions"),
    "q last stride": (lambda i: _bad(i, q=_strided_last(i["q"])), ValueError,
                      r"q must be contiguous in its last dimension, got strides \(256, 1, 4\)"),
    "batch zero": (lambda i: _bad(i, q=i["q"][:0], seq_lens=i["seq_lens"][:0]), ValueError,
                   "q has batch 0: decode needs at least one sequence"),
    "k rank": (lambda i: _bad(i, k_cache=i["k_cache"][0]), ValueError, "k_cache must have 4 dimensions"),
    "v last stride": (lambda i: _bad(i, v_cache=_strided_last(i["v_cache"])), ValueError,
                      "v_cache must be contiguous in its last dimension"),
    "head dim": (lambda i: _bad(i, q=i["q"][..., :32].contiguous(), k_cache=i["k_cache"][..., :32].contiguous(),
                                v_cache=i["v_cache"][..., :32].contiguous()), ValueError, "head dim 32"),
    "k dtype": (lambda i: _bad(i, k_cache=i["k_cache"].half()), TypeError, "k_cache has dtype"),
    "k device": (lambda i: _bad(i, k_cache=i["k_cache"].to("meta")), ValueError, "k_cache is on meta"),
    "v shape": (lambda i: _bad(i, v_cache=i["v_cache"][:, :, :-1]), ValueError, "v_cache has shape"),
    "k last stride": (lambda i: _bad(i, k_cache=i["k_cache"].transpose(2, 3).contiguous().transpose(2, 3),
                                     v_cache=i["v_cache"].transpose(2, 3).contiguous().transpose(2, 3)),
                      ValueError, "k_cache must be contiguous in its last dimension"),
    "v strides unlike k's": (lambda i: _bad(i, v_cache=padded_rows(i["v_cache"])), ValueError,
                             r"v_cache strides \(5200, 2600, 65, 1\) must equal k_cache strides \(5120, 2560, 64, 1\)"),
    "heads": (lambda i: _bad(i, q=i["q"][:, :3].contiguous()), ValueError, "not a multiple"),
    "seq_lens dtype": (lambda i: _bad(i, seq_lens=i["seq_lens"].long()), TypeError, "seq_lens has dtype"),
    "seq_lens rank": (lambda i: _bad(i, seq_lens=i["seq_lens"][None]), ValueError, "seq_lens must have 1 dimensions"),
    "seq_lens device": (lambda i: _bad(i, seq_lens=i["seq_lens"].to("meta")), ValueError,
                        r"seq_lens is on meta, expected \w+(:\d)? \(same device as q\)"),
    "seq_lens shape": (lambda i: _bad(i, seq_lens=i["seq_lens"][:1]), ValueError, "seq_lens has shape"),
    "seq_lens stride": (lambda i: _bad(i, seq_lens=i["seq_lens"].repeat_interleave(2)[::2]), ValueError,
                        r"seq_lens must be contiguous in its last dimension, got strides \(2,\)"),
    "length zero": (lambda i: _bad(i, seq_lens=i["seq_lens"] * 0), ValueError, "seq_lens must be >= 1"),
    "beyond capacity": (lambda i: _bad(i, seq_lens=i["seq_lens"] + 1000), ValueError, "exceeds the cache capacity"),
    "out shape": (lambda i: _bad(i, out=i["q"][:1].clone()), ValueError, "out has shape"),
    "out dtype": (lambda i: _bad(i, out=i["q"].float()), TypeError, "out has dtype"),
    "out device": (lambda i: _bad(i, out=i["q"].to("meta")), ValueError, "out is on meta"),
    "out last stride": (lambda i: _bad(i, out=_strided_last(i["q"])), ValueError,
                        "out must be contiguous in its last dimension"),
    "out expanded": (lambda i: _bad(i, out=i["q"][:1].expand(i["q"].shape)), ValueError,
                     r"out has elements that share memory \(shape \(2, 4, 64\), strides \(0, 64, 1\)\)"),
    "out heads overlap": (lambda i: _bad(i, out=i["q"].new_empty(1000).as_strided(i["q"].shape, (300, 1, 1))),
                          ValueError, "out has elements that share memory"),
}
PAGED_BAD_INPUTS = {
    "table dtype": (lambda i: _bad(i, block_table=i["block_table"].long()), TypeError, "block_table has dtype"),
    "table rows": (lambda i: _bad(i, block_table=i["block_table"][:1]), ValueError, "block_table has 1 rows"),
    "table rank": (lambda i: _bad(i, block_table=i["block_table"][0]), ValueError,
                   "block_table must have 2 dimensions"),
    "table device": (lambda i: _bad(i, block_table=i["block_table"].to("meta")), ValueError, "block_table is on meta"),
    "table stride": (lambda i: _bad(i, block_table=i["block_table"].repeat_interleave(2, 1)[:, ::2]), ValueError,
                     "block_table must be contiguous in its last dimension"),
    "page out of range": (lambda i: _bad(i, block_table=i["block_table"] + 1000), ValueError,
                          r"block_table\[0, 0\] = \d+ is outside"),
    "negative page": (lambda i: _bad(i, block_table=i["block_table"] * 0 - 1), ValueError, "is outside"),
}


@pytest.mark.parametrize("bad", sorted(BAD_INPUTS) + sorted(PAGED_BAD_INPUTS))
def test_bad_input_names_the_argument(decode_variant, device, bad):
    layout = "paged" if bad in PAGED_BAD_INPUTS else "contiguous"
    mutate, error, match = {**BAD_INPUTS, **PAGED_BAD_INPUTS}[bad]
    case = DecodeCase((40, 7), q_heads=4, kv_heads=2, head_dim=64, dtype=torch.bfloat16, layout=layout)
    inputs = mutate({**make_inputs(case, device), "out": None})
    with pytest.raises(error, match=match):
        decode_variant[1](**inputs)


_CASE = DecodeCase((40, 7), q_heads=4, kv_heads=2, head_dim=64, dtype=torch.bfloat16, layout="contiguous")
CUDA_PERSISTENT_BAD_INPUTS = {  # what is wrong: (case, change to its valid inputs, message); after check_decode_args
    "group beyond 16": (DecodeCase((40, 7), 32, 1, 64, torch.bfloat16, "contiguous"), lambda i: i,
                        "q: 32 query heads per KV head exceed cuda_persistent's 16"),
    "batch beyond MAX_BATCH": (DecodeCase((1,) * (decode_attention.MAX_BATCH + 1), 2, 1, 64, torch.float16,
                                          "contiguous"), lambda i: i,
                               "q: batch 1025 exceeds cuda_persistent's MAX_BATCH 1024"),
    "k_cache address": (_CASE, lambda i: _bad(i, k_cache=misaligned(i["k_cache"])),
                        "k_cache: rows must be 16-byte aligned"),
    "v_cache address": (_CASE, lambda i: _bad(i, v_cache=misaligned(i["v_cache"])),
                        "v_cache: rows must be 16-byte aligned"),
    "cache rows 130 bytes apart": (_CASE, lambda i: _bad(i, k_cache=padded_rows(i["k_cache"]),
                                                         v_cache=padded_rows(i["v_cache"])),
                                   "k_cache: rows must be 16-byte aligned"),
    "q address": (_CASE, lambda i: _bad(i, q=misaligned(i["q"])), "q: head rows must be 4-byte aligned"),
    "out head stride odd": (_CASE, lambda i: _bad(i, out=padded_rows(i["q"])),
                            "out: head rows must be 4-byte aligned"),
    "num_programs 0": (_CASE, lambda i: _bad(i, num_programs=0), "num_programs must be a positive int, got 0"),
    "stages 5": (_CASE, lambda i: _bad(i, stages=5), "stages must be 2, 3 or 4, got 5"),
}


@pytest.mark.requires_cuda
@pytest.mark.parametrize("bad", sorted(CUDA_PERSISTENT_BAD_INPUTS))
def test_cuda_persistent_bad_input_names_the_argument(device, bad):
    # cuda_decode_attention._check_native and the launcher's knobs: what the native kernel needs
    # beyond check_decode_args (each case passes those)
    case, mutate, match = CUDA_PERSISTENT_BAD_INPUTS[bad]
    with pytest.raises(ValueError, match=match):
        VARIANTS["cuda_persistent"](**mutate(make_inputs(case, device)))


def test_split_kv_refuses_more_chunks_than_a_grid_holds(device):
    # grid (B * Hkv, chunks of the capacity): a 2**20 + 1 position cache (a zero-stride view) in 16-position chunks
    q = torch.randn(1, 2, 64, dtype=torch.bfloat16, device=device)
    cache = torch.randn(1, 1, 1, 64, dtype=torch.bfloat16, device=device).expand(1, 1, 2**20 + 1, 64)
    lens = torch.tensor([5], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=r"chunk 16: the cache's capacity of 1048577 positions takes 65537 chunks"):
        VARIANTS["triton_split_kv"](q, cache, cache, lens, chunk=16)


def test_a_capacity_past_32_bit_positions_is_refused(layout, device):
    # zero-stride views: a 2**30 + 1 position cache, or 2**14 + 1 pages of 2**16 positions
    q = torch.randn(1, 2, 64, dtype=torch.bfloat16, device=device)
    lens = torch.tensor([5], dtype=torch.int32, device=device)
    if layout == "contiguous":
        cache, table, match = (torch.randn(1, 1, 1, 64, dtype=torch.bfloat16, device=device).expand(1, 1, 2**30 + 1, 64),
                               None, r"k_cache: its length, 1073741825 positions, exceeds the kernels' 1073741824")
    else:
        cache = torch.randn(1, 1, 1, 64, dtype=torch.bfloat16, device=device).expand(1, 2**16, 1, 64)
        table = torch.zeros(1, 2**14 + 1, dtype=torch.int32, device=device)
        match = r"block_table: its width x page_size, 1073807360 positions, exceeds the kernels' 1073741824"
    with pytest.raises(ValueError, match=match):
        VARIANTS["triton_persistent"](q, cache, cache, lens, table)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("stages", [2, 3, 4])
def test_cuda_persistent_pipeline_depths(stages, layout, device):
    # the launcher accepts 2-4 K/V stages (2 by default): each depth against the reference, across chunks
    case = DecodeCase((700, 5, 129), q_heads=8, kv_heads=2, head_dim=128, dtype=torch.bfloat16, layout=layout)
    _run_case(("cuda_persistent", VARIANTS["cuda_persistent"]), case, device, stages=stages, chunk=128)


def test_cuda_persistent_needs_a_cuda_tensor():  # refused before anything runs: no GPU needed
    inputs = make_inputs(_CASE, "cpu")
    with pytest.raises(ValueError, match="q is on cpu: cuda_persistent needs a CUDA tensor"):
        VARIANTS["cuda_persistent"](**inputs)


@pytest.mark.parametrize("variant", variant_params(SPLIT_VARIANTS))
def test_chunk_must_be_a_power_of_two(variant, device):
    inputs = make_inputs(DecodeCase((40,), 4, 2, 64, torch.float16, "contiguous"), device)
    with pytest.raises(ValueError, match="chunk must be a positive power of two"):
        VARIANTS[variant](**inputs, chunk=96)


def test_sdpa_backend_must_be_known(device):
    inputs = make_inputs(DecodeCase((40,), 4, 2, 64, torch.float16, "contiguous"), device)
    with pytest.raises(ValueError, match="backend must be one of"):
        VARIANTS["sdpa"](**inputs, backend="fastest")


def test_sdpa_gathering_in_launch_reads_the_pages_at_each_call(device):
    # The paged benchmarks' gathered_sdpa baseline: the gather is part of every call, so a cache
    # written after binding is what the next call reads (the anchor gathers once, when bound).
    inputs = make_inputs(DecodeCase((54, 97), 8, 2, 64, torch.bfloat16, "paged", page_size=16, spare=5), device)
    launch = VARIANTS["sdpa"](**inputs, gather_in_launch=True)
    check_output(launch(), inputs)
    for name in ("k_cache", "v_cache"):
        inputs[name].copy_(torch.randn_like(inputs[name]))
    check_output(launch(), inputs)


def test_sdpa_gathering_a_contiguous_cache_is_refused(device):
    inputs = make_inputs(DecodeCase((40,), 4, 2, 64, torch.float16, "contiguous"), device)
    with pytest.raises(ValueError, match="gather_in_launch: block_table is None"):
        VARIANTS["sdpa"](**inputs, gather_in_launch=True)


@pytest.mark.parametrize("gather_in_launch", [False, True])
def test_unused_block_table_entries_may_hold_any_value(decode_variant, device, gather_in_launch):
    # Entries past a sequence's own pages are not checked (check_decode_args reads only the used
    # ones) and never read: out of range both ways, every variant agrees with the sdpa anchor,
    # whose gather of whole pages must not reach them either.
    inputs = make_inputs(DecodeCase((97, 7, 54), 4, 2, 64, torch.bfloat16, "paged", page_size=16, spare=2), device)
    table = inputs["block_table"]  # pages per sequence: 7, 1, 4
    table[1, 1:], table[2, 4:] = 10**6, -10**6
    out = decode_variant[1](**inputs, out=poisoned_out(inputs))()
    check_output(out, inputs)
    check_output(VARIANTS["sdpa"](**inputs, gather_in_launch=gather_in_launch)(), inputs)


@pytest.mark.parametrize("variant", variant_params(SPLIT_VARIANTS))
@pytest.mark.parametrize("bound_lens, new_lens", [((300, 45), (300, 45)), ((300, 300), (299, 45)),
                                                  ((300, 300), (200, 200)), ((300, 45), (45, 45))], ids=str)
def test_a_bound_launch_runs_again(variant, layout, device, bound_lens, new_lens):
    # One bound launch, called twice with a new q each time, after seq_lens moved as a decode loop
    # moves them (here: not past the pages the block table holds). Every split variant must read
    # both at each call, though its chunk and grid were chosen for the bound lengths, and its merge
    # counters must reset themselves.
    inputs = make_inputs(DecodeCase(bound_lens, q_heads=4, kv_heads=2, head_dim=64, dtype=torch.float16,
                                    layout=layout), device)
    out = torch.empty_like(inputs["q"])
    launch = VARIANTS[variant](**inputs, out=out, chunk=64)
    inputs["seq_lens"].copy_(torch.tensor(new_lens, dtype=torch.int32))
    for _ in range(2):
        inputs["q"].copy_(torch.randn_like(inputs["q"]))
        out.fill_(float("nan"))
        launch()
        check_output(out, inputs)


def _one_sequence(inputs, b):
    # make_inputs' launcher arguments for sequence b alone (its pages stay where they are)
    rows = slice(b, b + 1)
    one = dict(inputs, q=inputs["q"][rows], seq_lens=inputs["seq_lens"][rows])
    if inputs["block_table"] is not None:
        return one | dict(block_table=inputs["block_table"][rows])
    per_sequence = ("k_cache", "v_cache", "k_scale", "v_scale")  # [B, Hkv, L_max, ...]
    return one | {name: inputs[name][rows] for name in per_sequence if inputs.get(name) is not None}


def _lengths_that_no_longer_fit(launcher, layout, device, lengths, bad=(0, 2), check_launch=lambda dims: None,
                                quant="none", page_size=16, **knobs):
    # A launch bound at lengths that fit, called after seq_lens moved outside [1, capacity] for the
    # sequences `bad`: those get NaN in every output, the others their attention (sequences of several
    # chunks, before, between and after them). Paged: the table is a column slice of a wider one whose
    # hidden columns name a page far outside the cache, and its entries past a sequence's pages are -1,
    # so a read past the capacity (or past a sequence's pages) faults. Then the bound lengths again:
    # the merge counters and the workspace were left as they were.
    case = DecodeCase(lengths, q_heads=4, kv_heads=2, head_dim=64, dtype=torch.float16, layout=layout,
                      page_size=page_size, quant=quant)
    inputs = make_inputs(case, device)
    if layout == "paged":
        table = inputs["block_table"]
        wide = torch.full((table.shape[0], table.shape[1] + 8), 2**30, dtype=table.dtype, device=device)
        wide[:, : table.shape[1]] = table
        inputs["block_table"] = wide[:, : table.shape[1]]
    dims = _dims(inputs)
    check_launch(dims)
    out = torch.full_like(inputs["q"], 1.0)
    launch = launcher(**inputs, out=out, **knobs)
    for outside in ((dims.capacity + 1, 0), (2**31 - 1, -1)):
        moved = [outside[bad.index(b) % 2] if b in bad else n for b, n in enumerate(lengths)]
        inputs["seq_lens"].copy_(torch.tensor(moved, dtype=torch.int32))
        out.fill_(1.0)
        launch()
        assert out[list(bad)].isnan().all(), f"seq_lens {moved}: a length outside [1, {dims.capacity}] was not NaN"
        for b in set(range(len(lengths))) - set(bad):
            check_output(out[b : b + 1], _one_sequence(inputs, b))
    inputs["seq_lens"].copy_(torch.tensor(lengths, dtype=torch.int32))
    out.fill_(float("nan"))
    launch()
    check_output(out, inputs)


@pytest.mark.parametrize("variant", variant_params(SPLIT_VARIANTS))
def test_a_length_that_no_longer_fits_is_nan_at_launch(variant, layout, device):
    _lengths_that_no_longer_fit(VARIANTS[variant], layout, device, (300, 145, 100, 200, 77), chunk=64)


@pytest.mark.parametrize("variant", FUSED_DEQUANT)
def test_a_quantized_length_that_no_longer_fits_is_nan_at_launch(variant, layout, device):
    # int8 through the 16-bit planes (kernels/kv_planes.py), pages of 54 positions
    _lengths_that_no_longer_fit(VARIANTS[variant], layout, device, (300, 145, 100, 200), quant="int8", page_size=54,
                                chunk=64)


def test_one_sequence_that_no_longer_fits_is_nan_on_the_work_list(layout, device):
    # batch 1 (a one-lane work list) on 3 programs, not the direct programs a lone sequence gets
    def check_launch(dims):
        page_size = 16 if layout == "paged" else None
        assert not decode_plan.plan_persistent(dims, hw.num_sms(device), page_size, chunk=64,
                                               num_programs=3).tile_per_program

    _lengths_that_no_longer_fit(VARIANTS["triton_persistent"], layout, device, (300,), bad=(0,),
                                check_launch=check_launch, chunk=64, num_programs=3)


@pytest.mark.parametrize("lengths, chunk, whole", [((3000, 1045, 1100, 2100), 1024, False),
                                                   ((300, 45, 100, 200), 512, True)],
                         ids=["a program per chunk", "a program per sequence"])
def test_a_length_that_no_longer_fits_is_nan_with_a_program_per_tile(lengths, chunk, whole, layout, device):
    # triton_persistent's programs that take their tile from the grid (no work list)
    def check_launch(dims):
        page_size = 16 if layout == "paged" else None
        launch = decode_plan.plan_persistent(dims, hw.num_sms(device), page_size, chunk=chunk, num_programs=10_000)
        assert launch.tile_per_program and (launch.chunk >= dims.capacity) == whole

    _lengths_that_no_longer_fit(VARIANTS["triton_persistent"], layout, device, lengths, check_launch=check_launch,
                                chunk=chunk, num_programs=10_000)


def test_persistent_batch_limit(device):
    batch = decode_attention.MAX_BATCH + 1
    inputs = make_inputs(DecodeCase((1,) * batch, 2, 1, 64, torch.float16, "contiguous"), device)
    with pytest.raises(ValueError, match="q: batch 1025 exceeds"):
        VARIANTS["triton_persistent"](**inputs)


@pytest.mark.parametrize("fmt", quant_params(QUANTIZED))
def test_quantized_storage_and_its_error(fmt, device):
    # The bytes really shrink, and dequantization stays within the format's rounding bound:
    # half a quantum (scale / 2) for the integer formats, e4m3's 2^-4 relative (3 mantissa bits)
    # plus the subnormal step (2^-9 scale) for fp8.
    x = torch.randn(3, 5, 128, dtype=torch.bfloat16, device=device) * 3
    data, scale = kv_quant.quantize(x, fmt)
    assert data.dtype == kv_quant.FORMATS[fmt] and scale.shape == x.shape[:-1]
    assert data.numel() * data.element_size() == x.numel() // (2 if fmt == "int4" else 1)
    error = (reference.dequantize_kv(data, scale) - x.double()).abs()
    if fmt == "fp8":
        bound = x.double().abs() * 2.0**-4 + scale.double()[..., None] * 2.0**-9
    else:
        bound = scale.double()[..., None] / 2
    # x / scale is computed in float32: a value near a rounding boundary may round the other way,
    # off by up to ~1e-5 of a quantum for |q| <= 127.
    assert (error <= bound * (1 + 1e-4)).all()


def test_quantize_refuses_an_unknown_format(device):
    with pytest.raises(ValueError, match=r"fmt must be one of \(.*\), got 'int3'"):
        kv_quant.quantize(torch.randn(3, 64, device=device), "int3")


@pytest.mark.parametrize("fmt", quant_params(QUANTIZED))
def test_quantization_loss_is_reported_against_unquantized_attention(fmt, device):
    # The accuracy a quantized cache costs, measured (it is reported by the benchmarks): bounded
    # by each format's precision, and not zero (the cache is really quantized). The loss is the
    # largest error over 2048 outputs, a heavy-tailed statistic of fresh random inputs: over 3000
    # draws on the CPU its median / 99.9th percentile / largest were int8 0.0059 / 0.0135 / 0.0161,
    # fp8 0.027 / 0.069 / 0.076, int4 0.107 / 0.249 / 0.332 (CI once drew int4 0.337, over a bound
    # of 0.3). Each bound is about 1.5x that largest value, rounded up.
    case = DecodeCase((300, 77), q_heads=8, kv_heads=2, head_dim=128, dtype=torch.bfloat16, layout="contiguous",
                      quant=fmt)
    inputs, exact = make_case_tensors(case, device)
    loss = quantization_loss(reference.decode_attention(**inputs), inputs, exact)
    assert 0 < loss < {"int8": 0.025, "fp8": 0.12, "int4": 0.5}[fmt], loss


def test_quantized_tiles_are_read_as_16_bit_units_where_they_can_be():
    # kernels/kv_planes.py: 16-bit units, but V in bytes where its planes would be narrower than 8
    # columns per warp (int4 at D=64), and bytes throughout where a cache does not view as units or a
    # contiguous cache's row offsets would pass 32 bits.
    def units(fmt, head_dim, offset=0):
        width = head_dim // 2 if fmt == "int4" else head_dim
        store = torch.zeros(offset + 2 * 3 * 40 * width, dtype=torch.int8)[offset:].view(2, 3, 40, width)
        return kv_planes.quant_units(fmt, store, store, head_dim, decode_plan.NUM_WARPS, paged=False)
    assert units("none", 128) == (1, 1)
    assert units("int8", 128) == units("int8", 64) == units("int4", 128) == (2, 2)
    assert units("int4", 64) == (2, 1)
    assert units("int8", 128, offset=1) == (1, 1)
    huge = torch.empty(1, 1, 2**24, 128, dtype=torch.int8, device="meta")  # row offsets past 32 bits
    assert kv_planes.quant_units("int8", huge, huge, 128, decode_plan.NUM_WARPS, paged=False) == (1, 1)


@pytest.mark.parametrize("fmt", quant_params(QUANTIZED))
@pytest.mark.parametrize("variant", FUSED_DEQUANT)
def test_quantized_caches_that_are_not_units_are_read_as_bytes(variant, fmt, layout, device):
    # An odd storage offset: the byte-by-byte path (_attend_chunk) against the same oracle.
    case = DecodeCase((300, 77), q_heads=8, kv_heads=2, head_dim=64, dtype=torch.bfloat16, layout=layout,
                      quant=fmt)
    inputs = make_inputs(case, device)
    for name in ("k_cache", "v_cache"):
        cache = inputs[name]
        odd = torch.empty(cache.numel() + 1, dtype=cache.dtype, device=device)[1:].view(cache.shape)
        inputs[name] = odd.copy_(cache)
    assert kv_planes.quant_units(fmt, inputs["k_cache"], inputs["v_cache"], 64, decode_plan.NUM_WARPS,
                                 paged=layout == "paged") == (1, 1)
    out = torch.full(inputs["q"].shape, float("nan"), dtype=case.dtype, device=device)
    VARIANTS[variant](**inputs, out=out)()
    check_output(out, inputs)


QUANT_BAD_INPUTS = {
    "missing scale": (lambda i: _bad(i, k_scale=None), ValueError, "k_scale is required"),
    "scale shape": (lambda i: _bad(i, v_scale=i["v_scale"][:, :, :-1]), ValueError, "v_scale has shape"),
    "scale dtype": (lambda i: _bad(i, k_scale=i["k_scale"].half()), TypeError, "k_scale has dtype"),
    "v format": (lambda i: _bad(i, v_cache=i["v_cache"].view(torch.uint8)), TypeError, "v_cache has dtype"),
    "int4 width": (lambda i: _bad(i, k_cache=i["k_cache"].view(torch.uint8), v_cache=i["v_cache"].view(torch.uint8)),
                   ValueError, "k_cache has shape"),
    "scale strides": (lambda i: _bad(i, v_scale=padded_rows(i["v_scale"])), ValueError,
                      r"v_scale strides \(82, 41, 1\) must equal k_scale strides \(80, 40, 1\)"),
}


@pytest.mark.parametrize("variant", FUSED_DEQUANT)
@pytest.mark.parametrize("bad", sorted(QUANT_BAD_INPUTS))
def test_quantized_bad_input_names_the_argument(variant, device, bad):
    mutate, error, match = QUANT_BAD_INPUTS[bad]
    case = DecodeCase((40, 7), q_heads=4, kv_heads=2, head_dim=64, dtype=torch.bfloat16, layout="contiguous",
                      quant="int8")
    with pytest.raises(error, match=match):
        VARIANTS[variant](**mutate(make_inputs(case, device)))


@pytest.mark.parametrize("variant", FUSED_DEQUANT)
def test_scales_without_a_quantized_cache_are_refused(variant, device):
    inputs = make_inputs(DecodeCase((40,), 4, 2, 64, torch.float16, "contiguous"), device)
    with pytest.raises(ValueError, match="k_scale is given but k_cache"):
        VARIANTS[variant](**inputs, k_scale=inputs["k_cache"][..., 0].float())


@pytest.mark.parametrize("variant", ["triton_split_kv", "triton_persistent"])
@pytest.mark.parametrize("block_k", [16, 128])
def test_block_k_knob(variant, block_k, device):
    # --block-k: KV positions per inner step; any power of two from 16 to the chunk is exact.
    case = DecodeCase((300, 45), q_heads=4, kv_heads=2, head_dim=64, dtype=torch.bfloat16, layout="paged",
                      quant="int4")
    _run_case((variant, VARIANTS[variant]), case, device, chunk=256, block_k=block_k)


@pytest.mark.parametrize("variant", variant_params(["triton_persistent", "cuda_persistent"]))
def test_num_programs_knob(variant, device):
    # --num-programs: the persistent grid; one program must still walk every tile.
    case = DecodeCase((300, 45, 7), q_heads=4, kv_heads=2, head_dim=64, dtype=torch.float16, layout="contiguous")
    _run_case((variant, VARIANTS[variant]), case, device, chunk=64, num_programs=1)


@pytest.mark.parametrize("num_warps", [1, 2])
@pytest.mark.parametrize("quant", ["none", "int8"])
def test_num_warps_knob(num_warps, quant, layout, device):
    # Fewer warps per program: each keeps its own softmax state; split tiles still merge.
    case = DecodeCase((300, 45), q_heads=8, kv_heads=2, head_dim=64, dtype=torch.float16, layout=layout, quant=quant)
    _run_case(("triton_persistent", VARIANTS["triton_persistent"]), case, device, chunk=64, num_warps=num_warps)


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_cuda_persistent_refuses_quantized_caches(fmt, device):  # refused before anything runs: no GPU needed
    inputs = make_case_tensors(DecodeCase((40,), 4, 2, 64, torch.bfloat16, "contiguous", quant=fmt), device)[0]
    with pytest.raises(ValueError, match="cuda_persistent reads fp16/bf16 caches"):
        VARIANTS["cuda_persistent"](**inputs)


@pytest.mark.parametrize("bad, match", [(dict(block_k=48), "block_k must be a positive power of two"),
                                        (dict(chunk=8), "chunk 8 must be >= 16"),
                                        (dict(block_k=8), "block_k 8 must be in"),
                                        (dict(num_programs=0), "num_programs must be a positive int"),
                                        (dict(num_warps=3), "num_warps must be 1, 2, 4 or 8")])
def test_bad_knobs(bad, match, device):
    inputs = make_inputs(DecodeCase((40,), 4, 2, 64, torch.float16, "contiguous"), device)
    with pytest.raises(ValueError, match=match):
        VARIANTS["triton_persistent"](**inputs, **bad)


@pytest.mark.requires_cuda
def test_cuda_persistent_replays_in_a_cuda_graph(layout, device):
    # Launched on torch's current stream, so a CUDA graph captures it; new q, same graph.
    case = DecodeCase((300, 45), q_heads=8, kv_heads=2, head_dim=128, dtype=torch.bfloat16, layout=layout)
    inputs = make_inputs(case, device)
    launch = VARIANTS["cuda_persistent"](**inputs, chunk=64)
    launch()  # compiled and loaded outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = launch()
    for _ in range(2):
        inputs["q"].copy_(torch.randn_like(inputs["q"]))
        out.fill_(float("nan"))
        graph.replay()
        check_output(out, inputs)
