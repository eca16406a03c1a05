"""PriorityGraph (kernels/graph_priority.py): every kernel node carries the priority, the replay
computes what the captured code computes, and a priority outside the device's range is refused."""

import pytest
import torch

from kernels import decode_graphs, tiny_decoder
from kernels.graph_priority import PriorityGraph, capture
from suite.loop_cases import DTYPE, TIERS

pytestmark = pytest.mark.requires_cuda

KERNELS = 7


def _counting_graph(x):
    def work():
        for _ in range(KERNELS):
            x.add_(1.0)
    return capture(work, keep_graph=True)


@pytest.mark.parametrize("end", ("lowest", "highest"))
def test_replay_runs_every_kernel_node_once(end):
    lowest, highest = torch.cuda.Stream.priority_range()
    x = torch.randn(4096, device="cuda")
    graph = PriorityGraph(_counting_graph(x), lowest if end == "lowest" else highest)
    assert graph.kernel_nodes == KERNELS
    before = x.clone()
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(x, before + 2 * KERNELS, rtol=0, atol=1e-5)  # |x| < 20: ulp < 4e-6


def test_priority_outside_the_range_is_refused():
    lowest, highest = torch.cuda.Stream.priority_range()
    x = torch.randn(16, device="cuda")
    for bad in (lowest + 1, highest - 1):
        with pytest.raises(ValueError, match="priority must lie in"):
            PriorityGraph(_counting_graph(x), bad)


def test_decode_graph_with_priority_matches_the_plain_graph():
    tier = TIERS["small"]
    w = tiny_decoder.random_weights(tier.q_heads, tier.kv_heads, tier.head_dim, DTYPE, "cuda")
    prompts = [torch.randn(n, w.d_model, dtype=DTYPE, device="cuda") for n in tier.prompt_lens()]
    h, k_cache, v_cache, seq_lens = tiny_decoder.prefill(w, prompts, capacity=tier.prompt + 4)
    start = seq_lens.clone()
    _, highest = torch.cuda.Stream.priority_range()
    plain = decode_graphs.graph_decode(w, h, k_cache, v_cache, seq_lens, 4)
    ranked = decode_graphs.graph_decode(w, h, k_cache, v_cache, seq_lens, 4, priority=highest)
    seq_lens.copy_(start)
    expected = plain().clone()
    seq_lens.copy_(start)
    assert torch.equal(ranked(), expected)  # same kernels, same inputs: bit for bit
