"""tools/paged_placement.py's placements: the same pages in four orders, so the tool compares where
pages lie and nothing else."""

import pytest
import torch

from tools.paged_placement import REGION, placements

pytestmark = pytest.mark.decode


def test_placements_read_the_same_pages_in_the_orders_they_promise():
    batch, pages, page_bytes = 3, 8, REGION // 4  # 4 pages per 2 MB region
    table = torch.randperm(batch * pages, dtype=torch.int32).view(batch, pages)
    placed = placements(table, page_bytes)
    assert set(placed) == {"random", "random_2mb", "ascending", "consecutive"}
    for name, t in placed.items():
        assert t.shape == table.shape and t.dtype == torch.int32, name
        assert sorted(t.flatten().tolist()) == list(range(batch * pages)), f"{name} is not a permutation"
    assert torch.equal(placed["random"], table)
    assert torch.equal(placed["consecutive"].flatten(), torch.arange(batch * pages, dtype=torch.int32))
    assert torch.equal(placed["ascending"], table.sort(dim=1).values)
    # shuffled only within each region: the i-th page of every sequence lies in consecutive's region
    assert torch.equal(placed["random_2mb"] // 4, placed["consecutive"] // 4)
