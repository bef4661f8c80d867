"""``offload_module_list``: hooks inside/outside a layer's own checkpointing, parameters
registered up front (CPU, emulate)."""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moe_offload.offload import (get_cpu_offload_context, is_cpu_offload_enabled,
                                 offload_module_list)
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
    assert s["offloaded_tensors"] == 2 * 3 and s["inline_reloads"] == 0
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
    assert handle.stats()["offloaded_tensors"] == 6
    with pytest.raises(ValueError):
        offload_module_list(nn.ModuleList())


def test_failed_module_pre_hook_leaves_the_outer_context_alone():
    """The nested-context error raised in a module pre-hook must not make the post-hook
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


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("reentrant", [True, False])
def test_hf_qwen3_moe_gradient_checkpointing(reentrant):
    """A tiny Hugging Face Qwen3-MoE (random weights, no download) with its own
    gradient checkpointing, offloaded through ``offload_module_list``: bitwise grads,
    nothing offloaded by the backward's recomputation."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        output_router_logits=False)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).train()
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ids = torch.randint(0, 64, (2, 16))

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        fwd = handle.stats() if handle else None
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None], fwd

    handle = None
    ref, _ = step()
    handle = offload_module_list(model.model.layers, num_layers=2, emulate=True,
                                 min_offload_bytes=256)
    try:
        got, fwd = step()
        assert_bitwise(ref, got)
        # transformers <= 5.17 runs module hooks inside the checkpoint: a reentrant one runs
        # the forward without grad, so the layers save nothing for the engine to move; with
        # >= 5.24 (hooks outside) each layer's checkpoint inputs travel.  Either way the
        # backward's recomputation moves nothing.
        from transformers.modeling_layers import GradientCheckpointingLayer
        hooks_inside = "__call__" in GradientCheckpointingLayer.__dict__
        if hooks_inside and reentrant:
            assert fwd["offloaded_tensors"] == 0
        else:
            assert fwd["offloaded_tensors"] > 0
        assert handle.stats()["offloaded_tensors"] == fwd["offloaded_tensors"]
        assert no_saved_tensor_hooks()
    finally:
        handle.remove()
