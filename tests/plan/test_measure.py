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


def test_count_saved_ignores_branches_the_loss_does_not_hold():
    # A branch whose output the step drops (Hugging Face's returned logits when the loss
    # is recomputed from the final norm's input) is freed by the end of the forward.
    lin = nn.Linear(8, 8)
    layers = nn.ModuleList([lin])
    x = torch.randn(4, 8)

    def step(dead: bool):
        y = lin(x)
        if dead:
            torch.exp(y * 2.0)          # saved, then dropped with its output
        return torch.exp(y).sum()
    plain = count_saved(layers, layers, lambda: step(False), 0).total
    assert count_saved(layers, layers, lambda: step(True), 0).total == plain
