"""Decode attention benchmarks (SPEC 2.1): GPU time, GB/s, % of the read roofline, speedup vs SDPA.

Each benchmark first checks its own output against the float64 reference, on inputs with dominant
keys planted at block edges (decode_cases.plant_block_edges: over random keys alone one dropped or
repeated row hides from L ~ 1000), then times cold (L2 flushed before every round). Speedups are
against the SDPA anchor on the contiguous cache at the same shape, with the fastest SDPA backend
that runs it. Paged variants also record speedup_vs_paged_read: the time of a bare read of the
same pages (kernels/paged_read.py, the fastest of its tilings) over theirs, the fraction of what the
pages' placement allows; and speedup_vs_gathered_sdpa: against SDPA that gathers the pages in every
call, what a user of a paged cache runs with torch alone.
"""

from dataclasses import dataclass

import pytest
import torch

from kernels import kv_quant
from suite import reference
from suite.decode_cases import (LAYOUTS, NATIVE, PLANTED_LOGIT, VARIANTS, DecodeCase, block_edges, check_output,
                                checked, make_case_tensors, make_inputs, plant_block_edges, poisoned_out, quant_params,
                                quantization_loss, seeded_lengths)
from suite.anchors import fastest_decode_sdpa, paged_read_floor
from suite.timing import measure, run_benchmark

pytestmark = pytest.mark.decode

WORKLOAD = "decode_attention"
ANCHOR = "sdpa"
QUANTIZED_VARIANT = "triton_persistent"
TRITON_COUNTERPART = {"cuda_persistent": "triton_persistent"}  # native variants gated against these


@dataclass(frozen=True)
class Shape:
    batch: int
    seq_len: int
    variable: bool
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    dtype: torch.dtype = torch.bfloat16

    def __str__(self):
        kind = "var" if self.variable else "uniform"
        heads = "" if (self.q_heads, self.kv_heads, self.head_dim) == (32, 8, 128) else \
            f"-H{self.q_heads}x{self.kv_heads}-D{self.head_dim}"
        dtype = "" if self.dtype == torch.bfloat16 else "-fp16"
        return f"B{self.batch}-L{self.seq_len}-{kind}{heads}{dtype}"

    def case(self, layout, page_size, quant="none"):
        lengths = seeded_lengths(self.batch, self.seq_len, self.variable, seed=hash((self.batch, self.seq_len)))
        return DecodeCase(lengths, self.q_heads, self.kv_heads, self.head_dim, self.dtype, layout, page_size,
                          quant=quant)


MINIMAL = [Shape(b, n, var) for b in (1, 4, 16, 64) for n in (1024, 4096, 16384) for var in (False, True)]
FULL = MINIMAL + [Shape(b, n, var) for b in (128, 256) for n in (1024, 4096, 16384) for var in (False, True)] \
    + [Shape(b, 4096, var, head_dim=64) for b in (1, 16, 64) for var in (False, True)] \
    + [Shape(b, 4096, False, dtype=torch.float16) for b in (1, 16, 64)]
SMOKE = [Shape(2, 200, True, q_heads=4, kv_heads=2, head_dim=64)]  # no GPU: one interpreted run each
QUANTIZED_L = 4096  # quantized caches (SPEC 2.7) are benchmarked at this length, every batch


def _shapes(config):
    if not torch.cuda.is_available():
        return SMOKE
    return FULL if config.getoption("profile") == "full" else MINIMAL


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "shape" in metafunc.fixturenames and "fmt" in metafunc.fixturenames:
        shapes = [s for s in _shapes(config) if s.seq_len == QUANTIZED_L] or SMOKE
        chosen = config.getoption("quantization")
        formats = [f for f in kv_quant.FORMATS if chosen in ("all", f)]
        metafunc.parametrize("fmt", quant_params(formats))
        metafunc.parametrize("shape", shapes, ids=str)
    elif "shape" in metafunc.fixturenames:
        metafunc.parametrize("shape", _shapes(config), ids=str)
    if "decode_variant" in metafunc.fixturenames:
        layouts = ("contiguous", "paged") if config.getoption("kv_layout") == "both" else (config.getoption("kv_layout"),)
        # the anchor, then Triton, then native variants: each baseline is timed before its users
        order = [ANCHOR] + sorted(v for v in VARIANTS if v not in NATIVE and v != ANCHOR) + list(NATIVE)
        pairs = [(ANCHOR, "contiguous")] * ("contiguous" in layouts) + \
            [(v, layout) for v in order[1:] for layout in layouts]
        metafunc.parametrize("decode_variant,layout", [
            pytest.param(v, layout, marks=[pytest.mark.requires_cuda] if v in NATIVE else [], id=f"{v}-{layout}")
            for v, layout in pairs], indirect=["decode_variant"])


def _planted_inputs(case, device):
    # what is checked is what is timed: nothing in a timed path (the variants' kernels, quantized
    # scales included, and SDPA's) branches on a value, so the planted rows change no time
    inputs = make_inputs(case, device)
    plant_block_edges(inputs, case)
    return inputs


def _check_after_timing(launch, inputs):
    # and after the timed rounds: what they left behind (merge counters, workspace) still gives the
    # reference, every element rewritten over a poisoned output
    launch().fill_(float("nan"))
    check_output(launch(), inputs)


def test_decode_attention(benchmark, decode_variant, layout, shape, device, perf, rounds, pytestconfig):
    name, launcher = decode_variant
    gate_id = f"{WORKLOAD}/{name}/{layout}/{shape}"
    perf.skip_if_not_applicable(gate_id)
    case = shape.case(layout, pytestconfig.getoption("page_size"))
    inputs = _planted_inputs(case, device)
    if name == ANCHOR:
        backend, launch, _ = fastest_decode_sdpa(inputs, device, rounds)
        benchmark.extra_info["sdpa_backend"] = backend
    else:
        launch = launcher(**inputs, out=poisoned_out(inputs))
    check_output(launch(), inputs)  # correctness before timing
    seconds = run_benchmark(benchmark, launch, device=device, rounds=rounds)
    _check_after_timing(launch, inputs)

    def anchor_seconds():
        anchor_inputs = inputs if layout == "contiguous" else _planted_inputs(shape.case("contiguous", 1), device)
        return fastest_decode_sdpa(anchor_inputs, device, rounds)[2]

    if name == ANCHOR:  # no speedup for the anchor itself; it is the variants' baseline
        perf.set_baseline(WORKLOAD, str(shape), seconds)
    if (name, layout) == (QUANTIZED_VARIANT, "contiguous"):
        perf.set_baseline(f"{WORKLOAD}/bf16", str(shape), seconds)
    if name in TRITON_COUNTERPART.values():
        perf.set_baseline(f"{WORKLOAD}/{name}/{layout}", str(shape), seconds)
    baseline = perf.baseline(WORKLOAD, str(shape), anchor_seconds) \
        if device.type == "cuda" and name != ANCHOR else None
    speedups = {}
    if name in TRITON_COUNTERPART and device.type == "cuda":
        triton_name = TRITON_COUNTERPART[name]
        speedups["triton"] = perf.baseline(f"{WORKLOAD}/{triton_name}/{layout}", str(shape), lambda: measure(
            checked(VARIANTS[triton_name](**inputs, out=poisoned_out(inputs)), inputs), device=device, rounds=rounds))
    if layout == "paged" and device.type == "cuda":  # below 1: the fraction of the paged-read floor reached
        speedups["paged_read"] = perf.baseline(f"{WORKLOAD}/paged_read", str(shape),
                                               lambda: paged_read_floor(inputs, device, rounds))
        speedups["gathered_sdpa"] = perf.baseline(f"{WORKLOAD}/gathered_sdpa", str(shape), lambda: fastest_decode_sdpa(
            inputs, device, rounds, gather_in_launch=True)[2])
    perf.record(benchmark, gate_id, seconds, shape=dict(variant=name, layout=layout, case=str(shape),
                                                         seq_lens_sum=sum(case.seq_lens)),
                bytes_moved=case.bytes_moved(), baseline_seconds=baseline, speedups=speedups or None)


def test_decode_attention_quantized(benchmark, fmt, shape, device, perf, rounds):
    """triton_persistent on an int8 / int4 / fp8 cache (SPEC 2.7): GB/s counting the bytes really
    moved, speedup vs the same kernel on the bf16 cache, and the accuracy quantization costs."""
    gate_id = f"{WORKLOAD}/{QUANTIZED_VARIANT}-{fmt}/contiguous/{shape}"
    perf.skip_if_not_applicable(gate_id)
    case = shape.case("contiguous", 1, quant=fmt)
    inputs, exact = make_case_tensors(case, device)
    launch = VARIANTS[QUANTIZED_VARIANT](**inputs, out=poisoned_out(inputs))
    out = launch()
    check_output(out, inputs)  # tight: against the reference on the dequantized cache
    benchmark.extra_info["accuracy_loss_max_abs"] = quantization_loss(out, inputs, exact)
    # the loss over random keys, as recorded before; then the check that sees one dropped row, on the
    # inputs timed (each planted key quantized with its row's scale)
    plant_block_edges(inputs, case)
    out.fill_(float("nan"))
    check_output(launch(), inputs)
    seconds = run_benchmark(benchmark, launch, device=device, rounds=rounds)
    _check_after_timing(launch, inputs)

    def bf16_seconds():
        bf16 = _planted_inputs(shape.case("contiguous", 1), device)
        return measure(checked(VARIANTS[QUANTIZED_VARIANT](**bf16, out=poisoned_out(bf16)), bf16),
                       device=device, rounds=rounds)

    baseline = perf.baseline(f"{WORKLOAD}/bf16", str(shape), bf16_seconds) if device.type == "cuda" else None
    perf.record(benchmark, gate_id, seconds, shape=dict(variant=QUANTIZED_VARIANT, quantization=fmt,
                                                         layout="contiguous", case=str(shape)),
                bytes_moved=case.bytes_moved(), speedups=None if baseline is None else {"bf16": baseline})


def test_block_edges_are_the_ends_and_the_first_edge_of_every_block():
    assert block_edges(100, 54) == {0, 15, 16, 31, 32, 53, 54, 63, 64, 99}
    assert block_edges(16) == {0, 15}
    assert len(block_edges(max(s.seq_len for s in FULL))) == 22


@pytest.mark.parametrize("change", ["dropped", "repeated"])
def test_a_wrong_row_at_any_planted_edge_fails_the_check(change, device):
    # what the pre-timing checks rely on, at the benchmarks' longest sequence and bf16 (the loosest
    # tolerance): attention with one planted row left out or read twice misses the reference
    shape = Shape(1, max(s.seq_len for s in FULL), False, q_heads=4, kv_heads=1)  # the benchmarks' group
    case = shape.case("contiguous", 1)
    inputs = _planted_inputs(case, device)
    q, k, v, seq_lens = inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["seq_lens"]
    for p in sorted(block_edges(shape.seq_len)):
        head, tail = (p, p + 1) if change == "dropped" else (p + 1, p)  # rows [:head], then [tail:]
        wrong = reference.decode_attention(q, *(torch.cat([t[:, :, :head], t[:, :, tail:]], 2) for t in (k, v)),
                                           seq_lens + head - tail)
        with pytest.raises(AssertionError, match="beyond the rounding bound"):
            check_output(wrong.to(case.dtype), inputs)


@pytest.mark.parametrize("fmt", kv_quant.QUANTIZATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_keys_are_planted_at_the_block_edges_alone(fmt, layout, device):
    # quantized caches as the quantized benchmark plants them: each key stored quantized with its
    # row's scale, which int4 holds to 1/14 of its largest element (a score of 10 to within ~1)
    case = DecodeCase((300, 77), 8, 2, 128, torch.bfloat16, layout, 16, quant=fmt)
    inputs = make_case_tensors(case, device)[0]
    plant_block_edges(inputs, case)
    k = inputs["k_cache"] if fmt == "none" else reference.dequantize_kv(inputs["k_cache"], inputs["k_scale"])
    for b, n in enumerate(case.seq_lens):
        keys = reference.gather_kv(k, n, b, inputs["block_table"]).double()  # [Hkv, n, D]
        scores = inputs["q"][b].double().unflatten(0, (case.kv_heads, -1)) @ keys.transpose(1, 2) / 128 ** 0.5
        planted = scores.flatten(0, 1).amin(0) >= PLANTED_LOGIT - 2  # [n]: random keys score ~N(0, 1)
        assert set(planted.nonzero().flatten().tolist()) == block_edges(n, 16 if layout == "paged" else None)
