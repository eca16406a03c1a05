"""The launches of the Triton decode-attention kernels (kernels/decode_plan.py): pure Python, no GPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import decode_plan, hw
from kernels.decode_attention import DecodeDims
from kernels.decode_plan import PersistentLaunch, plan_persistent
from suite.interpreter import INTERPRET_ENV
from tools import decode_launches

pytestmark = pytest.mark.decode


def _dims(batch, kv_heads, lengths):
    return DecodeDims(batch, 4 * kv_heads, kv_heads, 128, max(lengths), min(lengths), max(lengths), "none",
                      sum(lengths))


def test_chunk_heuristic_fills_the_gpu():
    sms, da = 132, decode_plan
    for batch, kv_heads, length in [(1, 8, 1024), (1, 8, 4096), (16, 8, 1024), (64, 8, 4096), (4, 2, 300), (1, 1, 1)]:
        for per_sm in (1, 2):
            dims = _dims(batch, kv_heads, [length] * batch)
            chunk = da.choose_chunk(dims, sms, per_sm)
            tiles = lambda c: batch * kv_heads * -(-length // c)  # noqa: E731
            assert da.MIN_CHUNK <= chunk <= da.MAX_CHUNK
            if chunk < da.MAX_CHUNK:  # halved only while too many SMs were idle
                assert tiles(2 * chunk) < (1 - da.IDLE_SMS) * per_sm * sms
            if chunk < da.SHORT_CHUNK:
                assert tiles(2 * chunk) < sms / 2
            assert tiles(chunk) >= (1 - da.IDLE_SMS) * per_sm * sms or chunk <= da.SHORT_CHUNK
    assert da.choose_chunk(_dims(1, 8, [1024]), sms) == 128  # 32 tiles at 256
    assert da.choose_chunk(_dims(1, 8, [4096]), sms) == 256  # 128 tiles: 4 of 132 SMs idle, no further split
    assert da.choose_chunk(_dims(16, 8, [1024] * 16), sms) >= 1024  # 128 tiles unsplit, no merge
    assert da.choose_chunk(_dims(4, 8, [4096] * 4), sms, 2) == 512  # paged: 256 tiles, two per SM
    # Variable lengths count by their total: 4 x ~9000 positions make 144 tiles of 2048, not 256.
    assert da.choose_chunk(_dims(4, 8, [2100, 16384, 9000, 8500]), sms, 2) == 1024


def test_uniform_tiles_may_span_whole_sequences():
    sms, da = 132, decode_plan
    dims = _dims(64, 8, [16384] * 64)
    assert da.longest_equal_tile(dims) == 16384
    assert da.choose_chunk(dims, sms, 1, da.longest_equal_tile(dims)) == 16384  # 512 tiles, no merge
    assert da.longest_equal_tile(dims, page_size=16) == 4096  # the table's 256 entries of 16 positions
    assert da.longest_equal_tile(dims, page_size=1) == da.MAX_CHUNK  # no table fits: as before
    assert da.longest_equal_tile(_dims(4, 8, [300] * 4)) == da.MAX_CHUNK
    assert da.choose_chunk(_dims(1, 8, [16384]), sms, 1, 16384) == 1024  # one sequence still splits to fill the SMs
    # quantized tiles are instruction-bound: longer only while every SM still gets two
    assert da.choose_chunk(_dims(64, 8, [4096] * 64), sms, da.QUANT_EQUAL_TILES_PER_SM, 4096) == 4096
    assert da.choose_chunk(_dims(16, 8, [4096] * 16), sms, da.QUANT_EQUAL_TILES_PER_SM, 4096) == 2048


def test_program_count_fills_the_last_wave_of_equal_tiles():
    sms, da = 132, decode_plan
    assert da.choose_programs(1024, sms, 3, equal_tiles=True) == 256  # 4 tiles each: 4 waves of 264 less 8
    assert da.choose_programs(792, sms, 3, equal_tiles=True) == 3 * sms  # 2 full waves of 396
    assert da.choose_programs(512, sms, 3, equal_tiles=True) == 256  # 2 each, not 248 x 2 + 16 x 1
    assert da.choose_programs(100, sms, 3, equal_tiles=True) == 100  # one part wave: one tile each
    assert da.choose_programs(1024, sms, 3, equal_tiles=False) == 3 * sms
    assert da.choose_programs(1024, sms, 2, equal_tiles=True) == 256


def test_minimal_launches_on_an_h100():
    # The launches runs 0024, 0025 and 0028 measured (tools/decode_launches.py: the launcher alone, 132 SMs).
    launches, da = decode_launches.launches(sms=132, page_size=16), decode_plan
    assert len(launches) == 48
    assert launches["B64-L4096-uniform", "contiguous"][:2] == (256, da.SHORT_BLOCK_N)  # 2 equal tiles each
    # short equal tiles: a one-warp program each (ONE_WARP_MAX_TILE); every other launch has NUM_WARPS
    assert launches["B64-L1024-uniform", "contiguous"] == (512, da.SHORT_BLOCK_N, 2048, da.NUM_STAGES, 1, True)
    assert {key for key, launch in launches.items() if launch[4] != da.NUM_WARPS} == {("B64-L1024-uniform",
                                                                                       "contiguous")}
    assert launches["B64-L1024-uniform", "paged"][:2] == (512, da.SHORT_BLOCK_N)  # every tile resident
    assert launches["B64-L1024-var", "contiguous"][:2] == (512, da.SHORT_BLOCK_N)  # whole sequences, one wave
    assert launches["B16-L4096-uniform", "contiguous"][:2] == (128, da.BLOCK_N)  # one tile per program
    assert launches["B4-L16384-var", "contiguous"][1] == da.BLOCK_N  # split sequences keep BLOCK_N
    # 4096-position paged tiles, one per SM: a third K/V buffer
    assert {key for key, launch in launches.items() if launch[3] != da.NUM_STAGES} == {
        ("B16-L4096-uniform", "paged"), ("B4-L16384-uniform", "paged")}
    assert launches["B4-L16384-uniform", "paged"][:4] == (128, da.BLOCK_N, 4096, da.LONG_TILE_STAGES)
    # a program per tile of the capacity, whole sequences, one sequence's chunks or long chunks: no work list
    direct = {(shape, layout) for shape in ("B16-L1024-uniform", "B16-L4096-uniform", "B64-L1024-uniform",
                                            "B64-L1024-var", "B4-L4096-uniform", "B4-L16384-uniform",
                                            "B16-L16384-uniform") for layout in ("contiguous", "paged")}
    direct |= {("B64-L4096-uniform", "paged")}
    direct |= {(f"B1-L{n}-{kind}", layout) for n in (1024, 4096, 16384) for kind in ("uniform", "var")
               for layout in ("contiguous", "paged")}  # one sequence's chunks
    assert {key for key, launch in launches.items() if launch[5]} == direct


def test_unequal_sequences_at_most_one_per_sm_split_their_longest():
    # B16 var: 128 (sequence, KV head) pairs on 132 SMs take chunks of a quarter of the longest, on the
    # work list, paged or not; more pairs than SMs (B64) keep whole sequences
    launches = decode_launches.launches(sms=132, page_size=16)
    for n, chunk in ((1024, decode_plan.SHORT_CHUNK), (4096, 1024)):
        for layout in ("contiguous", "paged"):
            grid, _, planned, _, _, direct = launches[f"B16-L{n}-var", layout]
            assert (planned, grid, direct) == (chunk, 3 * 132, False)
    assert launches["B64-L1024-var", "contiguous"][2] == decode_plan.MAX_CHUNK
    unequal = _dims(16, 8, [128 + 56 * i for i in range(16)])  # 128..968: a chunk given is kept
    assert plan_persistent(unequal, 132).chunk == decode_plan.SHORT_CHUNK
    assert plan_persistent(unequal, 132, chunk=2048).chunk == 2048


def test_only_long_paged_tiles_alone_on_their_sm_take_a_deeper_pipeline():
    long_tiles = _dims(16, 8, [4096] * 16)  # 128 tiles, one per program on 132 SMs
    assert plan_persistent(long_tiles, 132, page_size=16).deep_pipeline
    assert not plan_persistent(long_tiles, 132).deep_pipeline  # contiguous
    assert not plan_persistent(long_tiles, 132, page_size=16, block_k=128).deep_pipeline  # 3 x 64 KB buffers
    assert not plan_persistent(long_tiles, 132, page_size=16, shared_per_sm=100 * 1024).deep_pipeline  # smaller SMs
    assert not plan_persistent(long_tiles, 64, page_size=16).deep_pipeline  # 2 programs per SM
    assert not plan_persistent(_dims(16, 8, [1024] * 16), 132, page_size=16).deep_pipeline  # short tiles
    assert not plan_persistent(_dims(16, 8, [16384] * 16), 132, page_size=16).deep_pipeline  # 4 programs per SM
    assert not plan_persistent(_dims(2, 8, [4096, 4000]), 132, page_size=16, chunk=4096).deep_pipeline  # unequal
    assert not plan_persistent(long_tiles, 132, page_size=8, chunk=4096).deep_pipeline  # 512 pages: table per step


H100_DRAM_GBPS, H200_DRAM_GBPS = 3352, 4814  # hw.peak_dram_gbps on the device tool's H100 and H200


def test_long_contiguous_tiles_take_a_deeper_pipeline_only_on_fast_memory():
    # 4096+ positions per equal tile in steps of at most BLOCK_N, at least DEEP_GBPS_PER_SM of peak
    # DRAM bandwidth per SM
    long_tiles, fast = _dims(16, 8, [4096] * 16), dict(dram_gbps=H200_DRAM_GBPS, block_k=decode_plan.BLOCK_N)
    assert H100_DRAM_GBPS / 132 < decode_plan.DEEP_GBPS_PER_SM <= H200_DRAM_GBPS / 132
    assert plan_persistent(long_tiles, 132, **fast).deep_pipeline
    assert plan_persistent(_dims(64, 8, [16384] * 64), 132, dram_gbps=H200_DRAM_GBPS)[1:] == (
        decode_plan.SHORT_BLOCK_N, 256, decode_plan.NUM_WARPS, False, 2, decode_plan.MERGE_ROWS_PER_WARP, True, False)
    assert not plan_persistent(long_tiles, 132, dram_gbps=H100_DRAM_GBPS).deep_pipeline
    assert not plan_persistent(long_tiles, 132).deep_pipeline  # bandwidth unknown: an H100's plan
    assert hw.peak_dram_gbps("cpu") is None  # the interpreter's launches: unknown
    assert not plan_persistent(_dims(16, 8, [1024] * 16), 132, **fast).deep_pipeline  # short tiles
    assert not plan_persistent(_dims(64, 8, [1024] * 64), 132, dram_gbps=H200_DRAM_GBPS).deep_pipeline  # one warp
    assert not plan_persistent(_dims(2, 8, [4096, 4000]), 132, chunk=4096, **fast).deep_pipeline  # unequal
    assert not plan_persistent(long_tiles, 132, dram_gbps=H200_DRAM_GBPS, block_k=128).deep_pipeline  # 4 x 64 KB
    assert not plan_persistent(long_tiles, 132, shared_per_sm=100 * 1024, **fast).deep_pipeline  # smaller SMs
    assert not plan_persistent(long_tiles._replace(quant="int8"), 132, **fast).deep_pipeline


def test_one_long_tile_per_sm_takes_long_steps_only_on_fast_memory():
    # equal fp16/bf16 tiles of LONG_STEP_TILE+ positions, one per SM, at least DEEP_GBPS_PER_SM per SM:
    # LONG_BLOCK_N steps at NUM_STAGES, contiguous or paged with hoisted tables
    fast = dict(dram_gbps=H200_DRAM_GBPS)
    for dims in (_dims(16, 8, [1024] * 16), _dims(4, 8, [4096] * 4), _dims(16, 8, [4096] * 16)):
        for page_size in (None, 16):
            assert plan_persistent(dims, 132, page_size, **fast)[1:3] == (decode_plan.LONG_BLOCK_N, 128)
            assert not plan_persistent(dims, 132, page_size, **fast).deep_pipeline
            assert plan_persistent(dims, 132, page_size, dram_gbps=H100_DRAM_GBPS).block_k == decode_plan.BLOCK_N
    one_per_sm = _dims(4, 8, [4096] * 4)
    assert plan_persistent(one_per_sm, 132).block_k == decode_plan.BLOCK_N  # bandwidth unknown
    assert plan_persistent(_dims(4, 8, [1024] * 4), 132, **fast).block_k == decode_plan.BLOCK_N  # 256-position tiles
    assert plan_persistent(_dims(64, 8, [4096] * 64), 132, **fast).block_k == decode_plan.SHORT_BLOCK_N  # 2 per SM
    assert plan_persistent(_dims(2, 8, [4096, 4000]), 132, chunk=4096, **fast).block_k == decode_plan.BLOCK_N
    assert plan_persistent(one_per_sm, 132, shared_per_sm=100 * 1024, **fast).block_k == decode_plan.BLOCK_N
    assert plan_persistent(one_per_sm._replace(quant="int8"), 132, **fast).block_k == decode_plan.QUANT_BLOCK_N
    per_step_table = plan_persistent(one_per_sm, 132, page_size=1, chunk=1024, **fast)  # 1024 pages a tile
    assert per_step_table.block_k == decode_plan.BLOCK_N
    assert plan_persistent(one_per_sm, 132, num_warps=8, **fast).block_k == decode_plan.BLOCK_N  # knobs given: kept
    assert plan_persistent(one_per_sm, 132, block_k=32, **fast).block_k == 32


def test_minimal_launches_on_an_h200():
    # An H100's launches but for two rules on fast memory: 128-position steps at NUM_STAGES for tiles
    # of 1024+ positions alone on their SM (both layouts), 4 stages for the contiguous ones of 4096+
    # positions two per SM
    h100 = decode_launches.launches(sms=132, page_size=16)
    h200 = decode_launches.launches(sms=132, page_size=16, dram_gbps=H200_DRAM_GBPS)
    long_steps = {(shape, layout) for shape in ("B1-L16384-uniform", "B4-L4096-uniform", "B4-L16384-uniform",
                                                "B16-L1024-uniform", "B16-L4096-uniform")
                  for layout in ("contiguous", "paged")} | {("B16-L16384-uniform", "contiguous")}
    deep = {("B64-L4096-uniform", "contiguous"), ("B64-L16384-uniform", "contiguous")}
    assert {key for key in h100 if h100[key] != h200[key]} == long_steps | deep
    assert all(h200[key] == (h100[key][0], decode_plan.LONG_BLOCK_N, h100[key][2], decode_plan.NUM_STAGES,
                             *h100[key][4:]) for key in long_steps)
    assert all(h200[key] == (*h100[key][:3], decode_plan.LONG_TILE_STAGES, *h100[key][4:]) for key in deep)


def test_a_program_per_tile_of_the_capacity_only_for_whole_sequences_one_sequence_or_long_chunks():
    # tile_per_program: the grid has a program per (sequence, chunk, KV head) of the capacity, whatever
    # the lengths, and the chunk holds the capacity, the batch is one sequence or chunks are DIRECT_CHUNK+
    for page_size in (None, 16):
        assert plan_persistent(_dims(16, 8, [1024] * 16), 132, page_size).tile_per_program  # 128 programs
        assert plan_persistent(_dims(16, 8, [100, 1024] * 8), 132, page_size, chunk=1024).tile_per_program
        assert plan_persistent(_dims(1, 8, [4096]), 132, page_size).tile_per_program  # 16 chunks of 256 each
        assert plan_persistent(_dims(4, 8, [4096] * 4), 132, page_size).tile_per_program  # 4 chunks of 1024 each
        assert not plan_persistent(_dims(4, 8, [1024] * 4), 132, page_size).tile_per_program  # 4 of 256 each
        short = plan_persistent(_dims(4, 8, [4096] * 4), 132, page_size, chunk=512, num_programs=256)
        assert short.grid == 256 and not short.tile_per_program  # a program per tile, chunks of 512
        assert not plan_persistent(_dims(16, 8, [1024] * 16), 132, page_size, chunk=512).tile_per_program
        assert not plan_persistent(_dims(16, 8, [1024] * 16), 132, page_size, num_programs=64).tile_per_program
        assert not plan_persistent(_dims(1, 8, [4096]), 132, page_size, num_programs=64).tile_per_program
        # lengths within one chunk but a capacity beyond it: a program per tile would need twice the grid
        spare = _dims(16, 8, [1024] * 16)._replace(capacity=2048)
        assert not plan_persistent(spare, 132, page_size, chunk=1024).tile_per_program
        assert plan_persistent(spare, 132, page_size, chunk=2048).tile_per_program
    assert not plan_persistent(_dims(64, 8, [4096] * 64), 132).tile_per_program  # 512 tiles on 256 programs


def test_plan_keeps_to_the_programs_an_sm_holds():
    # max_programs_per_sm: what the launcher found an SM's shared memory holds of the build
    sms = 132
    for dims, page_size in [(_dims(64, 8, [4096] * 64), None), (_dims(64, 8, [1024] * 64), None),
                            (_dims(64, 8, [1024] * 64), 16), (_dims(16, 8, [16384] * 16), 16),
                            (_dims(64, 8, [300 + 10 * b for b in range(64)]), None), (_dims(4, 8, [900, 1200, 60, 7]), 16)]:
        for cap in (1, 2, 3):
            launch = plan_persistent(dims, sms, page_size, max_programs_per_sm=cap)
            assert launch.programs_per_sm <= cap and launch.grid <= cap * sms, (dims, cap, launch)
        assert plan_persistent(dims, sms, page_size, max_programs_per_sm=4) == plan_persistent(dims, sms, page_size)
    # 512 whole-sequence tiles of 1024: a one-warp program each, 4 per SM; where 2 fit, 4 warps on 256 programs
    short = _dims(64, 8, [1024] * 64)
    assert plan_persistent(short, sms)[2:4] == (512, 1)
    assert plan_persistent(short, sms, max_programs_per_sm=2)[2:4] == (256, decode_plan.NUM_WARPS)


def test_plan_of_one_sequence_splits_it_over_the_sms():
    # B1-L4096, Hkv 8: 16 chunks of 256 per KV head, a program each on 128 of 132 SMs (mapped from the grid,
    # no work list), merged in-kernel
    assert plan_persistent(_dims(1, 8, [4096]), 132) == PersistentLaunch(
        256, decode_plan.BLOCK_N, 128, decode_plan.NUM_WARPS, True, 1, decode_plan.SINGLE_MERGE_ROWS_PER_WARP, False,
        True)
    paged = plan_persistent(_dims(1, 8, [4096]), 132, page_size=16)
    assert (paged.chunk, paged.grid, paged.one_wave) == (256, 128, True)


def test_plan_keeps_the_knobs_given():
    dims = _dims(1, 8, [4096])
    assert plan_persistent(dims, 132, chunk=512, block_k=32, num_programs=7, num_warps=2) == \
        PersistentLaunch(512, 32, 7, 2, False, 1, decode_plan.SINGLE_MERGE_ROWS_PER_WARP, False,
                         False)  # 64 tiles, 7 programs
    assert plan_persistent(dims, 132, chunk=512, num_programs=10_000).grid == 64  # no more programs than tiles


def test_a_single_sequence_on_one_program_per_sm_merges_more_partials_per_step():
    single, many = decode_plan.SINGLE_MERGE_ROWS_PER_WARP, decode_plan.MERGE_ROWS_PER_WARP
    assert plan_persistent(_dims(1, 8, [16384]), 132).merge_rows == single
    assert plan_persistent(_dims(4, 8, [1024] * 4), 132).merge_rows == many  # batch 4: level or slower
    # 512 tiles of one sequence on 3 programs per SM: the register cap leaves no room for 32 rows
    assert plan_persistent(_dims(1, 8, [4096]), 132, chunk=64, num_programs=396).merge_rows == many


def test_launch_list_compiles_each_launch_and_reports_its_registers():
    # --registers compiles for sm_90 on any machine (in a process without the interpreter). A single
    # sequence's build has no register cap (one program per SM) and, merging 32 partials per warp,
    # takes more than 128 registers and spills nothing, where the 16-row build spilled.
    env = {k: v for k, v in os.environ.items() if k != INTERPRET_ENV}
    command = [sys.executable, "-m", "tools.decode_launches", "--registers", "--shapes", "B1-L4096-uniform"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr
    header, *rows = [line.split() for line in run.stdout.splitlines()]
    assert header[-3:] == ["cap", "regs", "stack"]
    assert [(row[1], row[8], row[10]) for row in rows] == [("contiguous", "-", "0"), ("paged", "-", "0")]
    assert all(int(row[9]) > 128 for row in rows), rows


def test_launches_on_a_100kb_sm_are_one_wave():
    # GB10 (48 SMs of 100 KB): B16-L1024's 128 whole-sequence tiles. The H100's plan, a program of
    # 72 KB per tile (3 per SM), does not fit; planned for 2 per SM, two tiles per program take
    # 32-position steps (38 KB), which fit: 64 programs. Compiled for sm_120 in a process without the
    # interpreter. Untuned there.
    env = {k: v for k, v in os.environ.items() if k != INTERPRET_ENV}
    command = [sys.executable, "-m", "tools.decode_launches", "--sms", "48", "--gpu", "sm_120", "--shapes",
               "B16-L1024-uniform"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr
    header, *rows = [line.split() for line in run.stdout.splitlines()]
    assert [row[:4] for row in rows] == [["B16-L1024-uniform", layout, "64", str(decode_plan.SHORT_BLOCK_N)]
                                         for layout in ("contiguous", "paged")]


BAD_KNOBS = {  # (knob, value): the error's message
    ("num_warps", 3): "num_warps must be 1, 2, 4 or 8, got 3",
    ("num_programs", 0): "num_programs must be a positive int, got 0",
    ("num_programs", 2.0): "num_programs must be a positive int, got 2.0",
    ("chunk", 48): "chunk must be a positive power of two, got 48",
    ("chunk", 8): "chunk 8 must be >= 16 (a chunk holds at least one 16-position step)",
    ("block_k", 8): "block_k 8 must be in [16, chunk ",
    ("block_k", 24): "block_k must be a positive power of two, got 24",
    ("max_programs_per_sm", 0): "max_programs_per_sm must be a positive int, got 0",
    ("max_programs_per_sm", 1.5): "max_programs_per_sm must be a positive int, got 1.5",
}


@pytest.mark.parametrize("knob, value", BAD_KNOBS)
def test_plan_names_a_bad_knob(knob, value):
    with pytest.raises(ValueError, match=re.escape(BAD_KNOBS[knob, value])):
        plan_persistent(_dims(2, 2, [300, 40]), 132, **{knob: value})
