"""Bitwise-equal grads with offload (emulate) for every layer type, storage release, stats."""
import gc

import pytest
import torch
from torch import nn

from tests.offload._helpers import SMALL, Block, assert_bitwise, run_stack

EMU = dict(emulate=True, min_offload_bytes=SMALL)


def _linear_gelu_stack(n=4, H=32):
    return [nn.Sequential(nn.Linear(H, 2 * H), nn.GELU(), nn.Linear(2 * H, H)) for _ in range(n)]


@pytest.mark.parametrize("num_layers", [None, 2, 4])
def test_linear_gelu_bitwise(num_layers):
    layers = _linear_gelu_stack()
    x = torch.randn(64, 32)
    out_ref, ref, _ = run_stack(layers, x)
    out, got, ctx = run_stack(layers, x, dict(EMU, num_layers=num_layers, model_layers=4))
    assert torch.equal(out_ref, out)
    assert_bitwise(ref, got)
    s = ctx.stats()
    assert s["offloaded_tensors"] > 0 and s["reloaded_bytes"] == s["offloaded_bytes"]


def _grouped_call(splits):
    return lambda layer, h: layer(h, splits)


def test_grouped_linear_bitwise():
    from moe_offload.ops.grouped_linear import GroupedLinear
    layers = [GroupedLinear(4, 32, 32) for _ in range(3)]
    splits = [10, 0, 30, 24]
    x = torch.randn(64, 32)
    _, ref, _ = run_stack(layers, x, call=_grouped_call(splits))
    _, got, ctx = run_stack(layers, x, dict(EMU, num_layers=3), call=_grouped_call(splits))
    assert_bitwise(ref, got)
    assert ctx.stats()["offloaded_tensors"] >= 3


@pytest.mark.parametrize("recompute", ["activation", "fc1"])
def test_grouped_mlp_bitwise(recompute):
    from moe_offload.ops.grouped_mlp import GroupedMLP
    layers = [GroupedMLP(4, 32, 48, recompute=recompute) for _ in range(3)]
    splits = torch.tensor([10, 20, 4, 30])
    x = torch.randn(64, 32)
    _, ref, _ = run_stack(layers, x, call=_grouped_call(splits))
    _, got, ctx = run_stack(layers, x, dict(EMU, num_layers=2, model_layers=3),
                            call=_grouped_call(splits))
    assert_bitwise(ref, got)
    assert ctx.stats()["offloaded_tensors"] >= 2


def test_moe_bitwise():
    from moe_offload.ops.moe import MoE
    layers = [MoE(32, 48, num_experts=4, top_k=2) for _ in range(3)]
    x = torch.randn(64, 32)
    loss = lambda h: (h ** 2).sum() + sum(layer.aux_loss for layer in layers)
    _, ref, _ = run_stack(layers, x, loss=loss)
    _, got, ctx = run_stack(layers, x, dict(EMU, num_layers=2, model_layers=3), loss=loss)
    assert_bitwise(ref, got)
    assert ctx.stats()["offloaded_tensors"] >= 2


def test_original_storage_released_and_stats_exact():
    T, H, F, L = 64, 32, 64, 4
    layers = [Block(H, F) for _ in range(L)]
    x = torch.randn(T, H).requires_grad_()
    from moe_offload.offload import get_cpu_offload_context
    ctx, sync = get_cpu_offload_context(True, None, L, **EMU)
    h = x
    for layer in layers:
        with ctx:
            h = layer(h)
        h = sync(h)
    gc.collect()
    # Offloaded layers 0..2: the hidden storage (only held by autograd) is gone.
    for layer in layers[:-1]:
        assert layer.hidden_storage() is None
    # The resident last layer keeps its hidden on the device.
    assert layers[-1].hidden_storage() is not None
    s = ctx.stats()
    per_layer = T * H * 4 + T * F * 4           # x (input) and a (saved twice, moved once)
    assert s["offloaded_tensors"] == 2 * (L - 1)
    assert s["offloaded_bytes"] == per_layer * (L - 1)
    assert s["dedup_hits"] == L - 1
    # kept: w1, w2 of every layer + x and a (twice) of the resident layer
    assert s["kept_on_device_tensors"] == 2 * L + 3
    h.sum().backward()
    s = ctx.stats()
    assert s["reloaded_bytes"] == per_layer * (L - 1) and s["inline_reloads"] == 0


def test_no_offload_keeps_storage_control():
    """Control for the test above: without offload the hidden storage stays alive."""
    layers = [Block() for _ in range(2)]
    h = torch.randn(8, 32).requires_grad_()
    for layer in layers:
        h = layer(h)
    gc.collect()
    assert all(layer.hidden_storage() is not None for layer in layers)
