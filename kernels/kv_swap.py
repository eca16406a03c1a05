"""KV pages swapped between HBM and host memory between decode steps (SPEC 2.9).

A SwapSpace holds host slots for pages of a paged cache [pages, page_size, Hkv, D]. swap_out
gathers scattered GPU pages into a device staging buffer and copies it to consecutive host slots
in one bulk copy per cache (K, V); swap_in does the reverse. A round is one decode step plus one
swap out and one swap in of pages the step does not read (those of preempted sequences):
- baseline: pageable host slots, blocking copies, everything on the caller's stream, in order;
- optimized: pinned host slots, asynchronous copies overlapped with the step, out and in on a
  high-priority copy stream each (PCIe and C2C are full duplex). The gathers are enqueued before
  the step: a persistent step holds every SM until it ends, so a gather behind it would hold back
  the copy;
- peer: as optimized, with the slots in another GPU's memory (peer access). A copy between two GPUs
  runs on the source device's current stream, fenced both ways against the destination device's
  current stream (torch's cross-device copy), so each direction also gets a stream of its own on
  the peer. Without them the swap-in ran on the peer's default stream and nothing was hidden (H100
  x2, NVSwitch: round 281.7 us = step 185.1 + copies 94.8); with them the round took 199.9 us
  (step 186.4, copies 61.8: 78% hidden).
Without a GPU (Triton's interpreter) both run in order on the CPU: the math and the data path
are checked, not the overlap.
"""

from dataclasses import dataclass
from typing import Callable

import torch

VARIANTS = ("baseline", "optimized", "peer")


class SwapSpace:
    """Slots [2 (K, V), slots, page_size, Hkv, D] for pages of k_pages / v_pages: in host memory,
    pinned or pageable, or on another GPU (target); device staging for up to max_pages pages per
    direction."""

    def __init__(self, k_pages, v_pages, slots, max_pages, *, pinned, target=None):
        # k_pages, v_pages: [pages, page_size, Hkv, D], same shape and dtype, on one device
        if k_pages.dim() != 4 or v_pages.shape != k_pages.shape or v_pages.dtype != k_pages.dtype:
            raise ValueError(f"k_pages and v_pages must be [pages, page_size, Hkv, D] alike, got "
                             f"{tuple(k_pages.shape)} {k_pages.dtype} and {tuple(v_pages.shape)} {v_pages.dtype}")
        if v_pages.device != k_pages.device:
            raise ValueError(f"v_pages is on {v_pages.device}, k_pages on {k_pages.device}")
        for name, value in (("slots", slots), ("max_pages", max_pages)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if (pinned or target is not None) and k_pages.device.type != "cuda":
            raise ValueError("pinned or peer slots need the caches on a CUDA device")
        if target is not None and torch.device(target) == k_pages.device:
            raise ValueError(f"target {target}: the peer slots must be on another GPU than the caches")
        self.caches = (k_pages, v_pages)
        page = k_pages.shape[1:]
        self.host = torch.empty((2, slots, *page), dtype=k_pages.dtype, pin_memory=pinned) if target is None \
            else torch.empty((2, slots, *page), dtype=k_pages.dtype, device=target)
        self.stage_out = torch.empty((2, max_pages, *page), dtype=k_pages.dtype, device=k_pages.device)
        self.stage_in = torch.empty_like(self.stage_out)
        self.pinned = pinned or target is not None  # the copies are asynchronous

    def _check(self, pages, slot, name="pages"):
        """Validate a swap of pages (named `name` in errors) from or to slot: distinct pages of the
        caches, which the slots from slot on hold. Syncs once."""
        n = pages.numel()
        if pages.dtype != torch.int64 or pages.dim() != 1 or pages.device != self.caches[0].device:
            raise ValueError(f"{name} must be a 1-D int64 tensor on {self.caches[0].device}, got "
                             f"{pages.dtype} {tuple(pages.shape)} on {pages.device}")
        if not 1 <= n <= self.stage_out.shape[1]:
            raise ValueError(f"{name}: 1 to {self.stage_out.shape[1]} pages per swap, got {n}")
        if not 0 <= slot <= self.host.shape[1] - n:
            raise ValueError(f"slot {slot}: {n} pages from it overrun the {self.host.shape[1]} host slots")
        num_pages = self.caches[0].shape[0]
        ordered = pages.sort().values
        repeated = (ordered[1:] == ordered[:-1]).sum()
        lowest, highest, repeats = torch.stack([ordered[0], ordered[-1], repeated]).tolist()
        if lowest < 0 or highest >= num_pages:
            raise ValueError(f"{name}: page indices must be in [0, {num_pages}) (the caches' pages), "
                             f"got {lowest} to {highest}")
        if repeats:  # index_copy_ into one page twice keeps either copy
            raise ValueError(f"{name} must hold distinct pages, got {repeats} repeats")

    def swap_out(self, pages, slot):
        """GPU pages -> host slots slot .. slot + len(pages) (enqueued on the current stream):
        both gathers, then both copies. Checks its arguments (one sync); SwapRound's swaps, whose
        pages bind() checked, run _swap_out."""
        self._check(pages, slot)
        self._swap_out(pages, slot)

    def _swap_out(self, pages, slot):
        n = pages.numel()
        for i, cache in enumerate(self.caches):
            torch.index_select(cache, 0, pages, out=self.stage_out[i, :n])
        for i in range(2):
            self.host[i, slot:slot + n].copy_(self.stage_out[i, :n], non_blocking=self.pinned)

    def swap_in(self, slot, pages):
        """Host slots slot .. slot + len(pages) -> GPU pages (enqueued on the current stream):
        both copies, then both scatters. Checks its arguments (one sync), as swap_out."""
        self._check(pages, slot)
        self._swap_in(slot, pages)

    def _swap_in(self, slot, pages):
        n = pages.numel()
        for i in range(2):
            self.stage_in[i, :n].copy_(self.host[i, slot:slot + n], non_blocking=self.pinned)
        for i, cache in enumerate(self.caches):
            cache.index_copy_(0, pages, self.stage_in[i, :n])


@dataclass
class SwapRound:
    """One round: step() and the swap, in order (no streams) or overlapped. Call it to run one;
    swap() runs the copies alone, as the round enqueues them."""
    step: Callable
    space: SwapSpace
    out_pages: torch.Tensor
    in_pages: torch.Tensor
    streams: tuple = ()  # optimized on a GPU: (out's copy stream, in's copy stream)
    peer_streams: tuple = ()  # peer: the same pair on the peer GPU

    def _enqueue_swap(self):
        # bind() checked the pages: the round's swaps skip the checks' sync
        n_out = self.out_pages.numel()
        if not self.streams:
            self.space._swap_out(self.out_pages, 0)
            self.space._swap_in(n_out, self.in_pages)
            return
        caller = torch.cuda.current_stream()
        peers = self.peer_streams or (None, None)
        for stream, peer, run in zip(self.streams, peers, (lambda: self.space._swap_out(self.out_pages, 0),
                                                           lambda: self.space._swap_in(n_out, self.in_pages))):
            stream.wait_stream(caller)  # the previous round's step is done with its pages
            with torch.cuda.stream(stream), torch.cuda.stream(peer):  # stream(None): no change
                run()

    def _join(self):
        for stream in self.streams:
            torch.cuda.current_stream().wait_stream(stream)

    def swap(self):
        self._enqueue_swap()
        self._join()

    def __call__(self):
        if self.streams:  # the swap first: its gathers must reach the SMs before the step holds them
            self._enqueue_swap()
            self.step()
        else:
            self.step()
            self._enqueue_swap()
        self._join()


def bind(variant, step, k_pages, v_pages, out_pages, in_pages, *, peer=None):
    """A round of `variant`: step() (a decode step that reads neither out_pages nor in_pages), the
    swap out of out_pages to slots 0.. and the swap in of slots len(out_pages).. into in_pages
    (int64 page indices on the caches' device, copied here once checked: the round swaps those pages
    whatever the caller's tensors become). peer: the GPU holding the slots (variant peer)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    n_out, n_in = out_pages.numel(), in_pages.numel()
    if set(out_pages.tolist()) & set(in_pages.tolist()):
        raise ValueError("out_pages and in_pages overlap: a page cannot leave and arrive in one round")
    if (variant == "peer") != (peer is not None):
        raise ValueError(f"peer: a GPU for variant peer and for it only, got {peer!r} with {variant!r}")
    optimized = variant != "baseline" and k_pages.device.type == "cuda"
    space = SwapSpace(k_pages, v_pages, n_out + n_in, max(n_out, n_in), pinned=variant == "optimized" and optimized,
                      target=peer)
    space._check(out_pages, 0, "out_pages")
    space._check(in_pages, n_out, "in_pages")
    space.host.normal_()  # the swapped-in slots hold pages that left earlier: random, never zeros
    # The copy streams run at the highest priority: when a round starts, their gathers and the step
    # become ready together, and a step that took every SM first would hold the gathers (and so the
    # copies) back until it ended.
    highest = torch.cuda.Stream.priority_range()[1] if optimized else None
    streams = (torch.cuda.Stream(priority=highest), torch.cuda.Stream(priority=highest)) if optimized else ()
    peer_streams = tuple(torch.cuda.Stream(device=peer, priority=highest) for _ in range(2)) \
        if optimized and peer is not None else ()
    return SwapRound(step, space, out_pages.clone(), in_pages.clone(), streams, peer_streams)
