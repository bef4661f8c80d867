"""Parameter storages never move, also when saved as ``w.detach()`` (CPU, emulate)."""
import gc

import torch

from moe_offload.offload import get_cpu_offload_context
from moe_offload.offload.params import ParamStorages, PARAM_STORAGES
from tests.offload._helpers import SMALL, assert_bitwise, run_stack

EMU = dict(emulate=True, min_offload_bytes=SMALL)


class SaveDetached(torch.autograd.Function):
    """``x @ w`` saving ``w.detach()`` (a plain tensor on the parameter's storage)."""

    @staticmethod
    def forward(c, x, w):
        c.save_for_backward(x, w.detach())
        return x @ w

    @staticmethod
    def backward(c, g):
        x, w = c.saved_tensors
        return g @ w.t(), x.t() @ g


class SaveDetachedLinear(torch.nn.Module):
    def __init__(self, H=32, device=None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(H, H, device=device) / H ** 0.5)

    def forward(self, x):
        return SaveDetached.apply(x, self.w)


def test_param_detach_never_offloaded():
    """Learned from the module call (global pre-hook while the context is entered)."""
    torch.manual_seed(0)
    layers = [SaveDetachedLinear() for _ in range(2)]
    x = torch.randn(16, 32)
    ref = run_stack(layers, x, None)[1]
    _, got, ctx = run_stack(layers, x, dict(num_layers=1, model_layers=2, **EMU))
    assert_bitwise(ref, got)
    assert ctx.stats()["offloaded_tensors"] == 1          # x only, never the weight
    w = layers[0].w
    assert PARAM_STORAGES.contains(w.untyped_storage().data_ptr(), w.device)


def test_param_detach_in_functional_code_learned_from_a_saved_parameter():
    """No module around it: the parameter is learned when saved as itself once."""
    w = torch.nn.Parameter(torch.randn(32, 32))
    x = torch.randn(16, 32, requires_grad=True)
    ctx, _ = get_cpu_offload_context(True, 1, 1, **EMU)
    with ctx:
        y = (x @ w).relu()                           # saves w itself
        z = torch.mul(y, w.detach()[0])              # saves a detached row of w
    z.sum().backward()
    assert ctx.stats()["offloaded_tensors"] == 2     # x and y; w and its row stay


def test_registry_forgets_dead_storages():
    reg = ParamStorages()
    p = torch.nn.Parameter(torch.randn(64))
    reg.see(p)
    ptr, dev = p.untyped_storage().data_ptr(), p.device
    assert reg.contains(ptr, dev)
    del p
    gc.collect()
    assert not reg.contains(ptr, dev) and not reg._refs and not reg._seen_ptrs


def test_module_hook_only_during_first_step():
    """The global pre-hook that learns parameters is installed only inside entries of
    the first step (it takes module calls off torch's fast path)."""
    from torch.nn.modules import module as nn_module
    layers = [SaveDetachedLinear() for _ in range(2)]
    ctx, sync = get_cpu_offload_context(True, 1, 2, **EMU)
    counts = []
    for _ in range(2):
        h = torch.randn(16, 32, requires_grad=True)
        for layer in layers:
            with ctx:
                counts.append(len(nn_module._global_forward_pre_hooks))
                h = layer(h)
            h = sync(h)
        h.sum().backward()
    assert counts == [1, 1, 0, 0] and not nn_module._global_forward_pre_hooks
