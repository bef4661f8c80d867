"""Repeated unpacks (retain_graph, autograd.grad twice, double backward) and checkpointing."""
import contextlib

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moe_offload.offload import get_cpu_offload_context, offloaded_checkpoint
from tests.offload._helpers import SMALL, Block, assert_bitwise, forward_stack

EMU = dict(emulate=True, min_offload_bytes=SMALL)


_forward = forward_stack


def _params(layers):
    return [p for layer in layers for p in layer.parameters()]


def test_retain_graph_backward_twice():
    layers = [Block() for _ in range(3)]
    x0 = torch.randn(64, 32)

    def run(offload):
        for p in _params(layers):
            p.grad = None
        x = x0.clone().requires_grad_()
        ctx, sync = get_cpu_offload_context(True, **EMU) if offload else (None, None)
        loss = (_forward(layers, x, ctx, sync) ** 2).sum()
        loss.backward(retain_graph=True)
        first = [x.grad.clone()] + [p.grad.clone() for p in _params(layers)]
        loss.backward()
        return first + [x.grad] + [p.grad for p in _params(layers)], ctx

    ref, _ = run(False)
    got, ctx = run(True)
    assert_bitwise(ref, got)
    s = ctx.stats()
    assert s["reloaded_tensors"] == 2 * s["offloaded_tensors"]   # each pass reloads


def test_autograd_grad_twice_and_double_backward():
    layers = [nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 32)) for _ in range(3)]
    x0 = torch.randn(64, 32)

    def run(offload):
        x = x0.clone().requires_grad_()
        ctx, sync = get_cpu_offload_context(True, **EMU) if offload else (None, None)
        loss = (_forward(layers, x, ctx, sync) ** 2).sum()
        g1 = torch.autograd.grad(loss, [x] + _params(layers), retain_graph=True)
        g2 = torch.autograd.grad(loss, [x] + _params(layers), retain_graph=True)
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        g3 = torch.autograd.grad(gx.square().sum(), [x] + _params(layers))
        return list(g1) + list(g2) + list(g3), ctx

    ref, _ = run(False)
    got, ctx = run(True)
    assert_bitwise(ref, got)
    assert ctx.stats()["reloaded_tensors"] >= 3 * ctx.stats()["offloaded_tensors"]


class DropBlock(nn.Module):
    """A block with dropout (tests RNG replay in recomputation)."""

    def __init__(self, H=32):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(H, 2 * H), nn.Linear(2 * H, H)

    def forward(self, x):
        return self.fc2(torch.dropout(torch.nn.functional.gelu(self.fc1(x)), 0.3, True))


@pytest.mark.parametrize("mode", ["torch_checkpoint", "offloaded_checkpoint"])
def test_checkpoint_inside_offloaded_layer(mode):
    layers = [DropBlock() for _ in range(4)]
    x0 = torch.randn(64, 32)

    def call(layer, h):
        if mode == "torch_checkpoint":
            return checkpoint(layer, h, use_reentrant=False)
        return offloaded_checkpoint(layer, h)

    def run(offload, use_ckpt):
        for p in _params(layers):
            p.grad = None
        torch.manual_seed(7)
        x = x0.clone().requires_grad_()
        ctx, sync = get_cpu_offload_context(True, None, 4, **EMU) if offload else (None, None)
        out = _forward(layers, x, ctx, sync, call if use_ckpt else None)
        (out ** 2).sum().backward()
        return [out.detach(), x.grad] + [p.grad for p in _params(layers)], ctx

    ref, _ = run(False, False)
    plain_ckpt, _ = run(False, True)
    got, ctx = run(True, True)
    assert_bitwise(ref, plain_ckpt)
    assert_bitwise(ref, got)
    s = ctx.stats()
    # Only the checkpoint inputs travel: one (64, 32) fp32 input per offloaded layer.
    assert s["offloaded_tensors"] == 3 and s["offloaded_bytes"] == 3 * 64 * 32 * 4


def test_offloaded_checkpoint_multiple_outputs_and_non_tensor_args():
    w = torch.randn(8, 8, requires_grad=True)

    def fn(a, scale, b):
        return a @ w * scale, (a + b).sin()

    a0, b0 = torch.randn(4, 8), torch.randn(4, 8)
    res = []
    for use in (False, True):
        w.grad = None
        a, b = a0.clone().requires_grad_(), b0.clone()
        y1, y2 = offloaded_checkpoint(fn, a, 3.0, b) if use else fn(a, 3.0, b)
        (y1.sum() + y2.square().sum()).backward()
        res.append([a.grad, w.grad.clone()])
    assert_bitwise(*res)
    with pytest.raises(TypeError):
        offloaded_checkpoint(3, a0)


def test_offloaded_checkpoint_recomputes_under_the_forward_autocast():
    """The recompute runs under the forward's autocast state: bf16 autocast grads are
    bitwise those of the plain run (an fp32 recompute differs by ~1e-2)."""
    from moe_offload.offload import offloaded_checkpoint
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64)
    x0 = torch.randn(8, 64)

    def run(ck):
        lin.zero_grad()
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = offloaded_checkpoint(lambda t: torch.relu(lin(t)), x) if ck else torch.relu(lin(x))
        y.float().sum().backward()
        return [x.grad, lin.weight.grad, lin.bias.grad]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_offloaded_checkpoint_of_moe_keeps_nothing_alive_after_backward():
    """MoE's aux loss rides on its output's graph (moe.aux_loss is a detached value), so
    no graph outlives the step (a graph stored on the module kept the recomputed input
    and its gradient alive until the next forward: 1.75 GiB on the H100)."""
    import gc
    import moe_offload

    def live_bytes():
        gc.collect()
        seen, n = set(), 0
        for o in gc.get_objects():
            if type(o) is torch.Tensor:
                s = o.untyped_storage()
                if s.data_ptr() not in seen:
                    seen.add(s.data_ptr())
                    n += s.nbytes()
        return n

    torch.manual_seed(0)
    layers = [moe_offload.MoE(64, 128, 4, 2) for _ in range(3)]
    x = torch.randn(256, 64, requires_grad=True)
    before = live_bytes()
    for _ in range(3):
        h = x
        for layer in layers:
            h = offloaded_checkpoint(layer, h)
        assert all(not layer.aux_loss.requires_grad for layer in layers)
        h.sum().backward()
        del h
        x.grad = None
        # Only the three fp32 aux-loss values (for logging) stay between steps.
        assert live_bytes() <= before + 3 * 4


def _nullctx():
    return contextlib.nullcontext()
