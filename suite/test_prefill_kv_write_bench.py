"""prefill_kv_write benchmarks (SPEC 2.4): GB/s (K, V read + the cache written) against the
measured copy roofline, native_tma's speedup over native_cp_async (the baseline).

Each benchmark checks its write against the prompt before timing, as it does the baseline's when it
measures that on demand; --validate also re-poisons the cache before every timed round and checks it
after, outside the timed region."""

import pytest
import torch

from kernels.prefill_kv_write import VARIANTS
from suite.decode_cases import quant_params, seeded_lengths
from suite.kv_write_cases import WriteCase, check_write, checked, make_inputs, poison, write_in_torch
from suite.timing import measure, run_benchmark

pytestmark = pytest.mark.prefill

WORKLOAD = "prefill_kv_write"
BASELINE = "native_cp_async"
NEEDS = {"native_cp_async": [pytest.mark.requires_cuda], "native_tma": [pytest.mark.requires_tma]}


def _case(batch, prompt, variable, quant="none"):
    lens = seeded_lengths(batch, prompt, variable, seed=batch * prompt)
    return WriteCase(lens, kv_heads=8, head_dim=128, dtype=torch.bfloat16, page_size=16, quant=quant)


# K + V of B=8 prompts of 4096 tokens: 134 MB read (>= 64 MB, SPEC's headline size)
MINIMAL = [(1, 1024, False), (8, 4096, False), (8, 4096, True)]
FULL = MINIMAL + [(32, 4096, False), (4, 16384, False), (64, 512, True)]
QUANTIZED = [(8, 4096, False)]


def pytest_generate_tests(metafunc):
    if "write_case" not in metafunc.fixturenames:
        return
    shapes = FULL if metafunc.config.getoption("profile") == "full" else MINIMAL
    cases = [(_case(*s), "none") for s in shapes] + \
        [(_case(*s, quant=fmt), fmt) for s in QUANTIZED for fmt in ("int8", "fp8")]
    params = [pytest.param(name, case, marks=NEEDS[name] + (quant_params([fmt])[0].marks if fmt != "none" else []),
                           id=f"{name}-{fmt}-{case}") for name in sorted(VARIANTS) for case, fmt in cases]
    metafunc.parametrize("variant,write_case", params)


def test_prefill_kv_write(benchmark, variant, write_case, device, perf, rounds, pytestconfig):
    case = write_case
    fmt = "" if case.quant == "none" else f"-{case.quant}"
    gate_id = f"{WORKLOAD}/{variant}{fmt}/{case}"
    perf.skip_if_not_applicable(gate_id)
    inputs = make_inputs(case, device)
    launch = checked(VARIANTS[variant](**inputs), inputs)  # correctness before timing
    validated = []

    def validate_and_poison():
        if validated:  # the previous timed round's write
            check_write(inputs)
        poison(inputs)
        validated.append(True)

    before = validate_and_poison if pytestconfig.getoption("validate") else None
    seconds = run_benchmark(benchmark, launch, device=device, rounds=rounds, before=before)
    if before is not None:
        check_write(inputs)
        benchmark.extra_info["validated_rounds"] = len(validated)

    def baseline_seconds():
        fresh = make_inputs(case, device)
        return measure(checked(VARIANTS[BASELINE](**fresh), fresh), device=device, rounds=rounds)

    if variant == BASELINE:
        perf.set_baseline(WORKLOAD, f"{case.quant}/{case}", seconds)
    baseline = perf.baseline(WORKLOAD, f"{case.quant}/{case}", baseline_seconds) \
        if variant != BASELINE else None
    perf.record(benchmark, gate_id, seconds, shape=dict(variant=variant, quantization=case.quant, case=str(case),
                                                         tokens=sum(case.prompt_lens)),
                bytes_moved=case.bytes_moved(), roofline_kind="copy",
                speedups=None if baseline is None else {"baseline": baseline})


def test_checked_refuses_a_launch_that_writes_nothing():
    # no GPU needed: a correct write in plain torch passes; the second call proves checked() poisons first
    inputs = make_inputs(_case(2, 40, True), "cpu")
    checked(lambda: write_in_torch(inputs), inputs)
    with pytest.raises(AssertionError, match="differ from the prompt"):
        checked(lambda: None, inputs)
