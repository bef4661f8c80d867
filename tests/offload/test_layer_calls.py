"""``offload_module_list`` / ``OffloadedLayers``: each layer call one engine layer, entered
outside the layer's hooks and own checkpointing (HF's placement in every 5.x), a
checkpoint around the layer detected, parameters registered up front (CPU, emulate)."""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moe_offload.offload import (OffloadedLayers, get_cpu_offload_context,
                                 in_checkpoint_forward, is_cpu_offload_enabled,
                                 offload_module_list, offloaded_checkpoint)
from moe_offload.offload.params import PARAM_STORAGES
from tests.offload._helpers import (SMALL, Block, assert_bitwise, no_saved_tensor_hooks,
                                    run_stack)

EMU = dict(emulate=True, min_offload_bytes=SMALL)


def test_offload_module_list():
    layers = nn.ModuleList([Block() for _ in range(4)])
    x = torch.randn(16, 32)
    _, ref, _ = run_stack(list(layers), x)
    handle = offload_module_list(layers, **EMU)
    _, got, _ = run_stack(list(layers), x)
    assert_bitwise(ref, got)
    s = handle.stats()
    # 2 saves in each of the 3 offloaded layers, less the stack input: a leaf the caller
    # holds (moving it would free nothing) stays
    assert s["offloaded_tensors"] == 2 * 3 - 1 and s["inline_reloads"] == 0
    assert handle.context.model_layers == 4
    # An exception inside a module leaves no hooks installed.
    bad = nn.ModuleList([Block(), nn.Linear(3, 3)])
    handle2 = offload_module_list(bad, **EMU)
    with pytest.raises(RuntimeError):
        bad[1](bad[0](torch.randn(4, 32, requires_grad=True)))
    assert no_saved_tensor_hooks() and not is_cpu_offload_enabled()
    handle.remove()
    handle2.remove()
    run_stack(list(layers), x)
    assert handle.stats()["offloaded_tensors"] == 5
    with pytest.raises(ValueError):
        offload_module_list(nn.ModuleList())


def test_failed_entry_leaves_the_outer_context_alone():
    """The nested-context error raised when a layer call enters the context must not
    exit a context that never entered (which would switch the outer one off)."""
    outer, _ = get_cpu_offload_context(True, **EMU)
    layers = nn.ModuleList([Block()])
    handle = offload_module_list(layers, **EMU)
    with outer:
        with pytest.raises(RuntimeError, match="another enabled one is active"):
            layers[0](torch.randn(16, 32, requires_grad=True))
        assert is_cpu_offload_enabled()
    handle.remove()
    assert no_saved_tensor_hooks()


def test_parameters_registered_up_front():
    layers = nn.ModuleList([Block()])
    handle = offload_module_list(layers, **EMU)
    w = layers[0].w1
    assert PARAM_STORAGES.contains(w.untyped_storage().data_ptr(), w.device)
    handle.remove()


class CheckpointedLayer(Block):
    """A layer with its own non-reentrant checkpointing, in two styles.

    ``hooks_inside=True`` (Hugging Face transformers 5.17's GradientCheckpointingLayer):
    ``__call__`` runs the whole module call, hooks included, inside the checkpointed
    function, so the recomputation in backward runs the forward pre-hook again.
    ``hooks_inside=False`` (transformers >= 5.24): hooks run outside, the checkpoint
    covers only ``forward``'s body.  ``reentrant`` picks torch's checkpoint flavour
    (transformers' default was ``use_reentrant=True``: the forward runs under no_grad).
    """

    def __init__(self, hooks_inside: bool, reentrant: bool):
        super().__init__()
        self.hooks_inside = hooks_inside
        self.reentrant = reentrant

    def __call__(self, x):
        if self.hooks_inside:
            return checkpoint(super().__call__, x, use_reentrant=self.reentrant)
        return super().__call__(x)

    def forward(self, x):
        if self.hooks_inside:
            return super().forward(x)
        return checkpoint(super().forward, x, use_reentrant=self.reentrant)


def _train(layers, x0, handle=None):
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_()
    h = x
    for layer in layers:
        h = layer(h)
    forward_stats = dict(handle.stats()) if handle else None
    (h ** 2).sum().backward()
    grads = [x.grad] + [p.grad for layer in layers for p in layer.parameters()]
    return grads, forward_stats


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("hooks_inside", [True, False])
def test_checkpointed_layers_backward_offloads_nothing(hooks_inside, reentrant):
    torch.manual_seed(0)
    layers = nn.ModuleList(CheckpointedLayer(hooks_inside, reentrant) for _ in range(3))
    x0 = torch.randn(64, 32)
    ref, _ = _train(layers, x0)
    handle = offload_module_list(layers, num_layers=2, **EMU)
    try:
        got, fwd = _train(layers, x0, handle)
        after = handle.stats()
        assert_bitwise(ref, got)
        # the backward's recomputation neither offloads nor starts a step
        assert after["offloaded_tensors"] == fwd["offloaded_tensors"]
        assert after["kept_on_device_tensors"] == fwd["kept_on_device_tensors"]
        assert no_saved_tensor_hooks()
        got2, _ = _train(layers, x0, handle)          # the next step is the same
        assert_bitwise(ref, got2)
        assert handle.stats()["offloaded_tensors"] == 2 * fwd["offloaded_tensors"]
    finally:
        handle.remove()


# ------------------------------------------------ checkpoint around / inside the layer
def test_in_checkpoint_forward():
    """True exactly inside a checkpoint's forward (torch non-reentrant, ours), not in a
    reentrant checkpoint (no hooks), not in the backward recomputation, not in a layer
    of the engine entered inside the checkpoint."""
    seen = []

    def fn(x):
        seen.append((in_checkpoint_forward(), torch.is_grad_enabled()))
        return x.sin()

    x = torch.randn(4, requires_grad=True)
    assert not in_checkpoint_forward()
    checkpoint(fn, x, use_reentrant=False).sum().backward()     # forward, recompute
    assert seen == [(True, True), (False, True)]
    seen.clear()
    offloaded_checkpoint(fn, x).sum().backward()
    assert seen == [(True, True), (False, True)]
    seen.clear()
    checkpoint(fn, x, use_reentrant=True).sum().backward()       # forward under no_grad
    assert seen == [(False, False), (False, True)]
    ctx, _ = get_cpu_offload_context(True, **EMU)

    def inner(x):
        with ctx:
            return fn(x)
    seen.clear()
    checkpoint(inner, x, use_reentrant=False)
    assert seen == [(False, True)]                # the engine's hooks are innermost


@pytest.mark.parametrize("how", ["torch", "offloaded_checkpoint"])
def test_layer_called_inside_an_outer_checkpoint_raises(how):
    """``checkpoint(layer, x)`` around an offloaded layer: its inputs were saved before the
    layer was called, and entering the engine inside would take every save (checkpointing
    silently off): a clear error, nothing left installed, the next plain call works."""
    layers = nn.ModuleList([Block(), Block()])
    handle = offload_module_list(layers, **EMU)
    x = torch.randn(16, 32, requires_grad=True)
    with pytest.raises(RuntimeError, match="inside a checkpoint that began outside it"):
        if how == "torch":
            checkpoint(layers[0], x, use_reentrant=False)
        else:
            offloaded_checkpoint(layers[0], x)
    assert no_saved_tensor_hooks() and not is_cpu_offload_enabled()
    run_stack(list(layers), torch.randn(16, 32))
    assert handle.stats()["offloaded_tensors"] > 0
    handle.remove()


def test_remove_restores_classes_and_keeps_a_later_subclass():
    layers = nn.ModuleList([Block(), Block()])
    handle = offload_module_list(layers, **EMU)
    assert type(layers[0]) is not Block and isinstance(layers[0], Block)
    with pytest.raises(RuntimeError, match="already offloaded"):
        OffloadedLayers(layers, handle.context, handle.sync)
    later = type("Later", (type(layers[1]),), {})      # e.g. FSDP2's class swap after ours
    layers[1].__class__ = later
    handle.remove()
    assert type(layers[0]) is Block and type(layers[1]) is later
    before = handle.stats()["offloaded_tensors"]
    run_stack(list(layers), torch.randn(16, 32))       # calls pass through: no offload
    assert handle.stats()["offloaded_tensors"] == before and no_saved_tensor_hooks()


def _hf_grads(model, ids):
    from tests.integrations._models import loss_of
    model.zero_grad(set_to_none=True)
    loss_of(model, ids).loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("ckpt", ["torch", "torch_reentrant", "offloaded_checkpoint"])
@pytest.mark.parametrize("placement", ["installed", "hooks_inside"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_hf_checkpointing_offloads_only_layer_inputs(arch, placement, ckpt):
    """A tiny HF Qwen3-MoE / Mixtral (from configs, random weights) with its own
    checkpointing, offloaded through ``offload_module_list``: in the forward only the
    ``L`` layer inputs travel (their bytes exactly), the backward's recomputation moves
    nothing, gradients are bitwise those of the same checkpointing without offload.
    ``hooks_inside`` is transformers <= 5.17's placement (module hooks inside the
    checkpoint), where module hooks would take all of a layer's saves (99 tensors here)."""
    from tests.integrations._models import (batch, emulate_hooks_inside_checkpoint, loss_of,
                                            tiny_model)
    model = tiny_model(arch, layers=3).train()
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": ckpt == "torch_reentrant"})
    if ckpt == "offloaded_checkpoint":
        for layer in model.model.layers:
            layer._gradient_checkpointing_func = offloaded_checkpoint
    if placement == "hooks_inside":
        emulate_hooks_inside_checkpoint(model)
    ids = batch()
    sizes = []
    probes = [layer.register_forward_pre_hook(
        lambda m, args: sizes.append(args[0].numel() * args[0].element_size()))
        for layer in model.model.layers]
    ref = _hf_grads(model, ids)
    for probe in probes:
        probe.remove()
    L = len(model.model.layers)
    handle = offload_module_list(model.model.layers, num_layers=L, emulate=True,
                                 min_offload_bytes=0)
    try:
        out = loss_of(model, ids)
        fwd = handle.stats()
        assert fwd["offloaded_tensors"] == L, fwd
        assert fwd["offloaded_bytes"] == sum(sizes[:L]), (fwd, sizes)
        out.loss.backward()
        bwd = handle.stats()
        assert bwd["offloaded_tensors"] == L and bwd["reloaded_tensors"] == L, bwd
        assert no_saved_tensor_hooks()
        assert_bitwise(ref, _hf_grads(model, ids))
    finally:
        handle.remove()
