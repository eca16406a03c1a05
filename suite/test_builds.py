"""What the compiler makes of the launchers' choices (suite/kernel_ir.py: compiled on any machine, in a
process without the interpreter), for an H100, a B200, and a GPU whose SMs hold 100 KB of shared
memory (consumer Blackwell: GB10, RTX 50), where a build sized for an H100 may not fit or not share an SM."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import decode_plan
from kernels.prefill_attention import TILE
from suite.interpreter import INTERPRET_ENV
from suite.kernel_ir import FAST_LONG, FAST_LONG_PAGED, FAST_LONG_SHORT_STEPS, GPUS

SMALL_SM = "sm_120"


@functools.cache
def _compiles():
    # one process per GPU, side by side (each compiles about 14 builds)
    env = {k: v for k, v in os.environ.items() if k != INTERPRET_ENV}
    return {gpu: subprocess.Popen([sys.executable, "-m", "suite.kernel_ir", "--gpu", gpu], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  cwd=Path(__file__).resolve().parent.parent) for gpu in GPUS}


@functools.cache
def _builds(gpu):
    stdout, stderr = _compiles()[gpu].communicate(timeout=600)
    assert _compiles()[gpu].returncode == 0, stderr
    return json.loads(stdout.splitlines()[-1])


@pytest.mark.decode
def test_persistent_builds_prefetch_and_fit():
    # The K and V tiles need two buffers (a prefetch). Paged tiles hoist their block-table entries,
    # so 3 stages give two, as for a contiguous cache. A tile with too many pages to hoist loads its
    # table every step, and the pipeliner gives that load a stage of its own: one-wave launches of
    # those use 5 stages. Long equal paged tiles alone on their SM take a third buffer (4 stages), and
    # so do long equal contiguous tiles two per SM on fast memory; alone on their SM there, both
    # layouts take two buffers of LONG_BLOCK_N positions.
    builds = _builds("sm_90")["decode_attention"]
    da = decode_plan
    per_step, deep = "paged, table per step, one wave", "paged, long equal tiles, one per SM"
    deeper, long_steps = {deep, FAST_LONG_SHORT_STEPS}, {FAST_LONG, FAST_LONG_PAGED}
    assert {c: b["table_pages"] > 0 for c, b in builds.items()} == {c: c.startswith("paged") and c != per_step
                                                                    for c in builds}
    stages = {per_step: da.PAGED_ONE_WAVE_STAGES} | {c: da.LONG_TILE_STAGES for c in deeper}
    assert {c: b["stages"] for c, b in builds.items()} == {c: stages.get(c, da.NUM_STAGES) for c in builds}
    for case, build in builds.items():
        buffers = 3 if case in deeper else 2
        assert build["kv_buffers"] == [buffers] * 2, f"{case}: K and V tiles have not {buffers} buffers: {build}"
    assert builds["paged, one wave, 3 per SM"]["programs_per_sm"] == 3
    # more equal tiles than programs: short steps, paged on up to SHORT_PROGRAMS_PER_SM programs per SM
    short = builds["paged, equal tiles, short steps"]
    assert (short["block_n"], short["programs_per_sm"]) == (da.SHORT_BLOCK_N, da.SHORT_PROGRAMS_PER_SM), short
    assert builds["contiguous, equal tiles, short steps"]["block_n"] == da.SHORT_BLOCK_N
    unequal = builds["contiguous, unequal tiles, short steps"]  # a program per tile, one wave
    assert (unequal["block_n"], unequal["programs_per_sm"]) == (da.SHORT_BLOCK_N, da.SHORT_PROGRAMS_PER_SM), unequal
    assert {b["block_n"] for c, b in builds.items() if "short steps" not in c and c not in long_steps} == {da.BLOCK_N}
    assert {c: (b["block_n"], b["programs_per_sm"]) for c, b in builds.items() if c in long_steps} == {
        c: (da.LONG_BLOCK_N, 1) for c in long_steps}
    one_warp = builds["contiguous, equal tiles, short steps, one warp"]  # short tiles, one wave of 4 per SM
    assert (one_warp["block_n"], one_warp["warps"], one_warp["programs_per_sm"]) == (da.SHORT_BLOCK_N, 1, 4), one_warp
    assert {b["warps"] for c, b in builds.items() if not c.endswith("one warp")} == {da.NUM_WARPS}
    assert builds[deep]["programs_per_sm"] == 1
    fast_short = builds[FAST_LONG_SHORT_STEPS]
    assert (fast_short["block_n"], fast_short["programs_per_sm"]) == (da.SHORT_BLOCK_N, 2), fast_short


@pytest.mark.decode
@pytest.mark.parametrize("gpu", sorted(GPUS))
def test_persistent_grids_are_resident(gpu):
    # every program of the grid is resident: its registers and shared memory fit its share of an SM
    shared_per_sm = GPUS[gpu][1]
    for case, build in _builds(gpu)["decode_attention"].items():
        registers = build["registers"] * build["programs_per_sm"] * build["warps"] * 32
        assert registers <= decode_plan.SM_REGISTERS, f"{case}: not every program is resident: {build}"
        shared = build["programs_per_sm"] * (build["shared"] + decode_plan.BLOCK_RESERVED_SHARED)
        assert shared <= shared_per_sm, f"{case}: not every program is resident on {gpu}: {build}"


@pytest.mark.decode
def test_persistent_grids_are_one_wave_on_a_100kb_sm():
    # The launcher compiles before it launches and plans again for fewer programs per SM where the
    # SM's shared memory holds fewer of the build: a 70 KB build is alone on its SM, where an H100
    # holds three. Long paged tiles keep NUM_STAGES: a third K/V buffer would not fit.
    h100, small = _builds("sm_90")["decode_attention"], _builds(SMALL_SM)["decode_attention"]
    assert {c: b["programs_per_sm"] for c, b in small.items() if b["shared"] > 50 * 1024} == \
        {c: 1 for c, b in small.items() if b["shared"] > 50 * 1024}
    three = "paged, one wave, 3 per SM"
    assert (h100[three]["programs_per_sm"], small[three]["programs_per_sm"]) == (3, 1)
    deep = small["paged, long equal tiles, one per SM"]
    assert (deep["stages"], deep["kv_buffers"]) == (decode_plan.NUM_STAGES, [2, 2]), deep


@pytest.mark.prefill
@pytest.mark.parametrize("gpu", sorted(GPUS))
def test_prefill_builds_fit_a_block(gpu):
    # Triton refuses a build larger than a block's shared memory: the launcher halves a default
    # tile's BLOCK_N until its build fits (D128 pointer loads: 224 KB at (128, 128) on sm_90, 160 KB
    # on sm_120, whose blocks hold 99 KB).
    builds = _builds(gpu)["prefill_attention"]
    per_block = GPUS[gpu][2]
    for case, build in builds.items():
        assert build["shared"] <= per_block, f"{case} on {gpu}: {build}"
    tiles = {case: tuple(b["tile"]) for case, b in builds.items()}
    expected = {f"{variant}, D{d}": tile for variant, by_dim in TILE.items() for d, tile in by_dim.items()}
    if gpu == SMALL_SM:
        expected["triton_cp_async, D128"] = (128, 64)
    assert tiles == expected
