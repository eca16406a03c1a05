"""CUDA-graph decode loops (SPEC 2.2): tiny_decoder.decode_step captured once, then replayed.

- full: all T steps in one graph, one replay for the whole loop;
- piecewise: one graph per step, replayed T times;
- full_and_piecewise: full when T <= max_capture, else piecewise.

`graph_decode` captures outside the returned launch(); launch() replays and returns the outputs
[B, T, d_model]. Like any decode it advances seq_lens and the caches by T steps: restore seq_lens
to replay the same T steps (the written cache positions are simply written again). A replay from
lengths not restored, past L_max - T, stops at the step that would append at position L_max: the
steps are decode_step's, whose KV append indexes the cache, and torch's index kernel asserts (a
device-side assert: the process's CUDA context is lost) before it writes, so no row lands outside
the cache. A negative length down to -L_max is not refused (torch's indexing counts it from the cache's
end: a wrong row of the cache, wrong outputs, no error; eager_loop says more). The replay adds no check of its own:
that would be GPU work in a baseline.
priority: the graph's kernels run at this stream priority (kernels/graph_priority.py says why a
replay on a high-priority stream alone does not).
"""

from kernels.graph_priority import PriorityGraph, capture
from kernels.tiny_decoder import bind_quantized, check_decode, decode_out, decode_step

GRAPH_MODES = ("full", "piecewise", "full_and_piecewise")


def graph_decode(weights, h, k_cache, v_cache, seq_lens, steps, *, mode="full", max_capture=64, k_scale=None,
                 v_scale=None, priority=None, out=None):
    # h: [B, d_model]; k/v: [B, Hkv, L_max, D] (kv_quant formats with k/v_scale [B, Hkv, L_max]);
    # seq_lens: [B] int32 on a CUDA device; out: the outputs [B, steps, d_model], or None (the
    # capture's warm-up writes it too: poison it after binding, not before)
    if h.device.type != "cuda":
        raise ValueError(f"h is on {h.device}: CUDA graphs need a CUDA device")
    if mode not in GRAPH_MODES:
        raise ValueError(f"mode must be one of {GRAPH_MODES}, got {mode!r}")
    if max_capture < 1:
        raise ValueError(f"max_capture must be >= 1, got {max_capture}")
    check_decode(weights, h, k_cache, v_cache, seq_lens, steps, k_scale, v_scale)
    quantized = bind_quantized(weights, k_cache, v_cache, k_scale, v_scale, seq_lens)
    if mode == "full_and_piecewise":
        mode = "full" if steps <= max_capture else "piecewise"
    h0, static_h = h.clone(), h.clone()
    start_lens = seq_lens.clone()
    out = decode_out(weights, h, steps, out)

    def body():
        if mode == "full":
            x = static_h
            for t in range(steps):
                x = decode_step(weights, x, k_cache, v_cache, seq_lens, quantized)
                out[:, t].copy_(x)
        else:
            static_h.copy_(decode_step(weights, static_h, k_cache, v_cache, seq_lens, quantized))

    def undo_warm_up():
        seq_lens.copy_(start_lens)
        static_h.copy_(h0)

    graph = capture(body, undo_warm_up, keep_graph=priority is not None)
    if priority is not None:
        graph = PriorityGraph(graph, priority)

    def launch():
        if mode == "full":
            graph.replay()
            return out
        static_h.copy_(h0)
        for t in range(steps):
            graph.replay()
            out[:, t].copy_(static_h)
        return out

    launch.mode = mode
    return launch
