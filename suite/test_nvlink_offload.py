"""nvlink_offload (SPEC 2.9): every round's attention against the float64 reference, every page
that left or arrived bit for bit, round trips exact, nothing left behind, the link read from
sysfs, and bad input."""

import gc
import weakref

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels import hw, kv_swap
from suite.offload_cases import Bound, SwapCase, bind_case, check_round

pytestmark = pytest.mark.offload

SMALL = {"cpu": SwapCase(batch=3, length=37, swap_pages=3, q_heads=4, kv_heads=2, head_dim=64, page_size=8),
         "cuda": SwapCase(batch=5, length=1000, swap_pages=17)}


def variant_params():
    """peer keeps its slots on a second GPU: requires_multi_gpu."""
    return [pytest.param(v, marks=[pytest.mark.requires_multi_gpu] if v == "peer" else [], id=v)
            for v in kv_swap.VARIANTS]


@pytest.fixture(params=variant_params())
def variant(request):
    return request.param


def test_round_attends_and_swaps_exactly(variant, device):
    case = SMALL[device.type]
    bound = bind_case(case, variant, device)
    for _ in range(2):  # a second round over the same slots and pages
        check_round(case, bound)


@given(data=st.data())
def test_any_swap_shape_attends_and_swaps_exactly(variant, device, data):
    # the fixed cases hold one shape per device: draw the batch, lengths, pages, heads, D and dtype
    kv_heads, group = data.draw(st.sampled_from((1, 2, 4)), label="kv_heads"), data.draw(st.sampled_from((1, 2, 4)))
    case = SwapCase(batch=data.draw(st.integers(1, 3), label="batch"), length=data.draw(st.integers(1, 120)),
                    swap_pages=data.draw(st.integers(1, 5), label="swap_pages"), q_heads=kv_heads * group,
                    kv_heads=kv_heads, head_dim=data.draw(st.sampled_from((64, 128)), label="head_dim"),
                    page_size=data.draw(st.sampled_from((1, 3, 8, 16)), label="page_size"),
                    dtype=data.draw(st.sampled_from((torch.float16, torch.bfloat16)), label="dtype"))
    check_round(case, bind_case(case, variant, device))


def test_a_round_swaps_the_pages_it_was_bound_with(variant, device):
    # The caller's page lists reordered in place after bind: a round reading them would put the
    # leaving pages in other slots and the arriving slots in other pages.
    case = SMALL[device.type]
    bound = bind_case(case, variant, device)
    as_bound = Bound(bound.inputs, bound.out, bound.round, bound.out_pages.clone(), bound.in_pages.clone())
    for pages in (bound.out_pages, bound.in_pages):
        pages.copy_(pages.roll(1))
    check_round(case, as_bound)


def test_round_trip_is_bit_identical(variant, device):
    case = SMALL[device.type]
    bound = bind_case(case, variant, device)
    space, k = bound.round.space, bound.inputs["k_cache"]
    leaving = (k[bound.out_pages].clone(), bound.inputs["v_cache"][bound.out_pages].clone())
    space.swap_out(bound.out_pages, 0)
    space.swap_in(0, bound.in_pages)  # back into other pages
    if k.is_cuda:
        torch.cuda.synchronize()
    assert torch.equal(k[bound.in_pages], leaving[0]) and torch.equal(bound.inputs["v_cache"][bound.in_pages],
                                                                      leaving[1])


@pytest.mark.requires_cuda
def test_optimized_host_slots_are_pinned_and_baseline_pageable():
    case = SMALL["cuda"]
    for variant, pinned in (("baseline", False), ("optimized", True)):
        assert bind_case(case, variant, torch.device("cuda")).round.space.host.is_pinned() == pinned


@pytest.mark.requires_cuda
def test_nothing_is_left_behind(variant):
    # device memory back to where it was; the host slots (pinned or not) freed: nothing holds them.
    # (torch's pinned-memory statistics also count torch's own small staging buffers: not usable.)
    case = SMALL["cuda"]
    gc.collect()
    torch.cuda.synchronize()
    device_before = torch.cuda.memory_allocated()
    bound = bind_case(case, variant, torch.device("cuda"))
    bound.round()
    torch.cuda.synchronize()
    host = weakref.ref(bound.round.space.host)
    del bound
    gc.collect()
    assert host() is None
    assert torch.cuda.memory_allocated() == device_before


def _space(device, **kw):
    k = torch.randn(10, 4, 2, 8, device=device)
    return k, kv_swap.SwapSpace(k, torch.randn_like(k), slots=kw.pop("slots", 4), max_pages=4, pinned=False)


@pytest.mark.parametrize("pages, slot, match", [
    (torch.tensor([1, 2], dtype=torch.int32), 0, "pages must be a 1-D int64 tensor"),
    (torch.arange(5), 0, "pages: 1 to 4 pages per swap"),
    (torch.arange(3), 2, "overrun the 4 host slots"),
    (torch.tensor([3, 10]), 0, r"pages: page indices must be in \[0, 10\) \(the caches' pages\), got 3 to 10"),
    (torch.tensor([-1, 3]), 0, r"pages: page indices must be in \[0, 10\) \(the caches' pages\), got -1 to 3"),
    (torch.tensor([4, 2, 4]), 0, "pages must hold distinct pages, got 1 repeats"),
])
@pytest.mark.parametrize("swap", ["swap_out", "swap_in"])
def test_bad_swap_arguments_name_the_argument(device, pages, slot, match, swap):
    _, space = _space(device)
    with pytest.raises(ValueError, match=match):
        getattr(space, swap)(*((pages.to(device), slot) if swap == "swap_out" else (slot, pages.to(device))))


def test_bad_bind_arguments_name_the_argument(device):
    k, _ = _space(device)
    with pytest.raises(ValueError, match="variant must be one of"):
        kv_swap.bind("fastest", lambda: None, k, k, torch.arange(2, device=device), torch.arange(2, 4, device=device))
    with pytest.raises(ValueError, match="out_pages and in_pages overlap"):
        kv_swap.bind("baseline", lambda: None, k, k, torch.arange(2, device=device), torch.arange(1, 3, device=device))
    with pytest.raises(ValueError, match="peer: a GPU for variant peer and for it only"):
        kv_swap.bind("peer", lambda: None, k, k, torch.arange(2, device=device), torch.arange(2, 4, device=device))
    with pytest.raises(ValueError, match=r"in_pages: page indices must be in \[0, 10\)"):
        kv_swap.bind("baseline", lambda: None, k, k, torch.arange(2, device=device),
                     torch.tensor([2, 12], device=device))
    with pytest.raises(ValueError, match="out_pages must hold distinct pages, got 1 repeats"):
        kv_swap.bind("baseline", lambda: None, k, k, torch.tensor([1, 1], device=device),
                     torch.arange(2, 4, device=device))
    with pytest.raises(ValueError, match="k_pages and v_pages must be"):
        kv_swap.SwapSpace(k, k[:, :2], slots=2, max_pages=2, pinned=False)
    with pytest.raises(ValueError, match="slots must be >= 1"):
        kv_swap.SwapSpace(k, k, slots=0, max_pages=2, pinned=False)
    with pytest.raises(ValueError, match=f"v_pages is on meta, k_pages on {k.device}"):
        kv_swap.SwapSpace(k, k.to("meta"), slots=2, max_pages=2, pinned=False)
    with pytest.raises(ValueError, match="pinned or peer slots need the caches on a CUDA device"):
        kv_swap.SwapSpace(k.cpu(), k.cpu(), slots=2, max_pages=2, pinned=True)
    with pytest.raises(ValueError, match="pinned or peer slots need the caches on a CUDA device"):
        kv_swap.SwapSpace(k.cpu(), k.cpu(), slots=2, max_pages=2, pinned=False, target="cuda:0")


@pytest.mark.requires_cuda
def test_peer_slots_on_the_caches_gpu_are_refused(device):
    k, _ = _space(device)
    with pytest.raises(ValueError, match=f"target {k.device}: the peer slots must be on another GPU than the caches"):
        kv_swap.SwapSpace(k, k, slots=2, max_pages=2, pinned=False, target=k.device)


@pytest.mark.parametrize("speed, width, expected", [
    ("32.0 GT/s PCIe\n", "16\n", "PCIe Gen5 x16"), ("16.0 GT/s PCIe", "8", "PCIe Gen4 x8"),
    ("3.0 GT/s PCIe", "4", "PCIe 3.0 GT/s x4")])
def test_pcie_link_reads_sysfs(tmp_path, speed, width, expected):
    (tmp_path / "current_link_speed").write_text(speed)
    (tmp_path / "current_link_width").write_text(width)
    assert hw.pcie_link(tmp_path) == expected


def test_pcie_link_without_sysfs_entries_is_none(tmp_path):
    assert hw.pcie_link(tmp_path) is None


@pytest.mark.requires_cuda
def test_host_link_names_a_kind():
    kind, how = hw.host_link(torch.device("cuda"))
    assert kind in ("NVLink-C2C", "PCIe") and how


@pytest.mark.requires_multi_gpu
def test_peer_link_names_a_kind():
    kind, how = hw.peer_link(0, 1)
    assert kind in ("peer NVLink", "peer PCIe", "peer (link unknown)") and how
