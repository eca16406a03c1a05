"""Command-line options: the suite's own, and each workload's, validated at start (SPEC 7).

A workload adds its flags by adding an entry to WORKLOAD_OPTIONS; they appear under their own
group in `pytest --help`, and every `check` runs before collection, failing with a usage error.
"""

import os
from dataclasses import dataclass
from typing import Callable, Optional

import pytest

PROFILES = ("minimal", "full")
EXPECTATIONS_DIR = "expectations"  # relative to the rootdir (pytest.ini's folder)


def positive(value):
    return None if value > 0 else "must be > 0"


def power_of_two_dot(value):
    # tl.dot needs a dimension of at least 16; None: each kernel's own default
    return None if value is None or (value >= 16 and value & (value - 1) == 0) else "must be a power of two >= 16"


def positive_or_auto(value):
    return None if value is None or value > 0 else "must be > 0"


def parse_tile(value):
    """'128x64' -> (128, 64); '64' -> (64, 64)."""
    parts = [int(p) for p in str(value).lower().split("x")]
    return (parts[0], parts[0]) if len(parts) == 1 else tuple(parts)


def tile_size(value):
    if value is None:
        return None
    try:
        block_m, block_n = parse_tile(value)
    except ValueError:
        return "must be BLOCK_MxBLOCK_N (e.g. 128x64) or one size for both"
    if any(v < 16 or v & (v - 1) for v in (block_m, block_n)) or block_m % block_n:
        return "needs powers of two >= 16 with BLOCK_M a multiple of BLOCK_N"
    return None


def fraction(value):
    return None if 0 <= value < 1 else "must be in [0, 1)"


@dataclass(frozen=True)
class Option:
    flag: str
    help: str
    default: object = None
    type: Callable = str
    choices: Optional[tuple] = None
    check: Optional[Callable] = None  # value -> error text, or None when valid
    env: Optional[str] = None  # an environment variable that, when set, replaces the default

    @property
    def dest(self):
        return self.flag.lstrip("-").replace("-", "_")


SUITE_OPTIONS = (
    Option("--profile", "minimal: the whole GPU suite in a few minutes; full: more shapes, rounds and examples "
           "(its correctness alone ~15 minutes on an H100)",
           default="minimal", choices=PROFILES),
    Option("--expectations-dir", "folder of expectations/<gpu>.json", default=EXPECTATIONS_DIR),
    Option("--expectations-margin", "margin below the measured value for --expectations-update",
           default=0.10, type=float, check=fraction),
)
SUITE_FLAGS = (
    ("--expectations-update", "write this run's gate values (with the margin) into expectations/<gpu>.json"),
    ("--expectations-allow-lower", "let --expectations-update lower an existing floor"),
)

WORKLOAD_OPTIONS = {
    "kv_locality": (
        Option("--rows", "rows of the fp16 slab copied host to device", default=256, type=int, check=positive),
        Option("--cols", "columns of the slab", default=4096, type=int, check=positive),
        Option("--iters", "copies per timed round", default=200, type=int, check=positive),
    ),
    "paged_kv_offload": (
        Option("--page-cache", "the page file's pages before each timed round: warm (in the OS page cache, as "
               "written) or cold (written back and evicted: every chunk is read from disk)", default="warm",
               choices=("warm", "cold")),
    ),
    "prefill_attention": (
        # the env var is the default, so a bad TMA_TILE_SIZE is refused at start like a bad flag
        Option("--tma-tile-size", "triton_tma's tile BLOCK_MxBLOCK_N, e.g. 128x64; unset: the kernel's per head "
               "dim", check=tile_size, env="TMA_TILE_SIZE"),
    ),
    "decode_attention": (
        Option("--kv-layout", "KV cache layouts to benchmark", default="both",
               choices=("both", "contiguous", "paged")),
        Option("--page-size", "tokens per page of the paged KV cache in benchmarks", default=16,
               type=int, check=positive),
    ),
    "decode_loop": (
        Option("--graph-mode", "CUDA-graph decode modes to benchmark", default="all",
               choices=("all", "full", "piecewise", "full_and_piecewise")),
        Option("--max-capture", "full_and_piecewise: the longest T captured as one graph", default=64,
               type=int, check=positive),
    ),
    "right_sized_decode": (
        Option("--tier", "decode tiers (SPEC 2)", default="all", choices=("all", "small", "medium", "large")),
        Option("--quantization", "KV cache formats", default="all", choices=("all", "none", "int8", "int4", "fp8")),
        Option("--backend", "decode-loop backends", default="all", choices=("all", "triton", "graphs", "cuda")),
        Option("--block-k", "KV positions per attention step of the Triton kernels (default: the kernel's, "
               "64 on bf16/fp16 caches, 128 on quantized ones)", default=None, type=int, check=power_of_two_dot),
        Option("--num-programs", "grid of the persistent decode attention (default: SMs x programs per SM)",
               default=None, type=int, check=positive_or_auto),
    ),
}
WORKLOAD_FLAGS = {
    "prefill_kv_write": (
        ("--validate", "also check the cache after every timed round (re-poisoned before each), "
                       "not only once before timing"),
    ),
    "right_sized_decode": (
        ("--quick", "T = 8 steps and 10 rounds: a quick look, not a measurement: nothing is gated, saved or "
                    "calibrated"),
        ("--require-fused-fp8", "fail (do not skip) when fused FP8 decode is missing"),
    ),
}


def _default(option):
    return os.environ.get(option.env, option.default) if option.env else option.default


def _add(group, option):
    source = option.default
    if option.env:
        source = f"env {option.env}" + ("" if option.default is None else f", else {option.default}")
    group.addoption(option.flag, dest=option.dest, default=_default(option), type=option.type,
                    choices=option.choices, help=f"{option.help} (default: {source})")


def add_options(parser):
    group = parser.getgroup("suite", "decode/prefill kernel suite")
    for option in SUITE_OPTIONS:
        _add(group, option)
    for flag, text in SUITE_FLAGS:
        group.addoption(flag, action="store_true", default=False, help=text)
    for workload in dict.fromkeys([*WORKLOAD_OPTIONS, *WORKLOAD_FLAGS]):
        group = parser.getgroup(workload, f"workload {workload}")
        for option in WORKLOAD_OPTIONS.get(workload, ()):
            _add(group, option)
        for flag, text in WORKLOAD_FLAGS.get(workload, ()):
            group.addoption(flag, action="store_true", default=False, help=text)


def validate(config):
    options = SUITE_OPTIONS + tuple(o for opts in WORKLOAD_OPTIONS.values() for o in opts)
    for option in options:
        value = config.getoption(option.dest)
        error = option.check(value) if option.check else None
        if error:
            given = option.flag
            if option.env and option.env in os.environ and value == _default(option):
                given = f"{option.env} (the default of {option.flag})"
            raise pytest.UsageError(f"{given} {value!r}: {error}")
    # flags that would otherwise do nothing, or keep what is not a measurement
    if config.getoption("expectations_allow_lower") and not config.getoption("expectations_update"):
        raise pytest.UsageError("--expectations-allow-lower needs --expectations-update "
                                "(it lets an update lower a floor)")
    if config.getoption("quick"):
        kept = [flag for flag, dest in (("--expectations-update", "expectations_update"),
                                        ("--benchmark-autosave", "benchmark_autosave"),
                                        ("--benchmark-save", "benchmark_save")) if config.getoption(dest)]
        if kept:
            raise pytest.UsageError(f"--quick with {' and '.join(kept)}: a quick look is not a measurement to "
                                    "calibrate gates with or to save for --benchmark-compare")
