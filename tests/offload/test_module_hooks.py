"""``offload_module_list``: hooks inside/outside a layer's own checkpointing, parameters
registered up front (CPU, emulate)."""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moe_offload.offload import offload_module_list
from tests.offload._helpers import SMALL, Block, assert_bitwise, no_saved_tensor_hooks

EMU = dict(emulate=True, min_offload_bytes=SMALL)


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
        assert fwd["offloaded_tensors"] > 0
        assert handle.stats()["offloaded_tensors"] == fwd["offloaded_tensors"]
        assert no_saved_tensor_hooks()
    finally:
        handle.remove()
