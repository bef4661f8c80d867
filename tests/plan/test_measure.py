"""Planner measurements (CPU)."""
import weakref

import torch
from torch import nn

from moe_offload.plan.measure import count_saved


def test_count_saved_frees_the_counted_graph():
    # exp saves its own output: returned as is from the pack hook, the graph would form an
    # uncollectable C++ cycle and leak (on the H200 slice: 39 GB held by the planner).
    lin = nn.Linear(8, 8)
    layers = nn.ModuleList([lin])
    x = torch.randn(4, 8)
    outs = []

    def step():
        y = torch.exp(lin(x))
        outs.append(weakref.ref(y))
        return y.sum()
    groups = count_saved(layers, layers, step, 0)
    assert groups.layer_total(0) > 0
    assert outs[0]() is None
