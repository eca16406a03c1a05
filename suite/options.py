"""Command-line options: the suite's own, and each workload's, validated at start (SPEC 7).

A workload adds its flags by adding an entry to WORKLOAD_OPTIONS; they appear under their own
group in `pytest --help`, and every `check` runs before collection, failing with a usage error.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import pytest

PROFILES = ("minimal", "full")


def positive(value):
    return None if value > 0 else "must be > 0"


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

    @property
    def dest(self):
        return self.flag.lstrip("-").replace("-", "_")


SUITE_OPTIONS = (
    Option("--profile", "minimal: the whole GPU suite in a few minutes; full: nightly sweeps",
           default="minimal", choices=PROFILES),
    Option("--expectations-dir", "folder of expectations/<gpu>.json", default="expectations"),
    Option("--expectations-margin", "margin below the measured value for --expectations-update",
           default=0.10, type=float, check=fraction),
)
SUITE_FLAGS = (
    ("--expectations-update", "write this run's gate values (with the margin) into expectations/<gpu>.json"),
    ("--expectations-allow-lower", "let --expectations-update lower an existing floor"),
)

WORKLOAD_OPTIONS = {
    "decode_attention": (
        Option("--kv-layout", "KV cache layouts to benchmark", default="both",
               choices=("both", "contiguous", "paged")),
        Option("--page-size", "tokens per page of the paged KV cache in benchmarks", default=16,
               type=int, check=positive),
    ),
}


def _add(group, option):
    group.addoption(option.flag, dest=option.dest, default=option.default, type=option.type,
                    choices=option.choices, help=f"{option.help} (default: {option.default})")


def add_options(parser):
    group = parser.getgroup("suite", "decode/prefill kernel suite")
    for option in SUITE_OPTIONS:
        _add(group, option)
    for flag, text in SUITE_FLAGS:
        group.addoption(flag, action="store_true", default=False, help=text)
    for workload, options in WORKLOAD_OPTIONS.items():
        group = parser.getgroup(workload, f"workload {workload}")
        for option in options:
            _add(group, option)


def validate(config):
    options = SUITE_OPTIONS + tuple(o for opts in WORKLOAD_OPTIONS.values() for o in opts)
    for option in options:
        value = config.getoption(option.dest)
        error = option.check(value) if option.check else None
        if error:
            raise pytest.UsageError(f"{option.flag} {value!r}: {error}")
