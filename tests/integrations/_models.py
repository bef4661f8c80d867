"""Tiny randomly initialised HF MoE causal LMs (no download) for the integration tests."""
import copy
import functools

import torch
from torch import nn

transformers = __import__("pytest").importorskip("transformers")
import moe_offload.integrations.transformers  # noqa: E402,F401  (registers "moe_offload")

VOCAB = 64


def _config(arch: str, layers: int):
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  num_experts_per_tok=2, output_router_logits=True,
                  router_aux_loss_coef=0.02, max_position_embeddings=512)
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=16,
                                           num_experts=6, norm_topk_prob=True, **common)
    if arch == "mixtral":
        return transformers.MixtralConfig(intermediate_size=16, num_local_experts=6, **common)
    if arch == "olmoe":
        common.pop("head_dim")
        return transformers.OlmoeConfig(intermediate_size=16, num_experts=6, eos_token_id=None,
                                        pad_token_id=0, **common)
    raise ValueError(arch)


ARCHS = ("qwen3_moe", "mixtral", "olmoe")


def tiny_model(arch: str, impl: str = "moe_offload", layers: int = 2, seed: int = 0,
               dtype=torch.float32, device="cpu"):
    """A tiny ``arch`` causal LM with ``experts_implementation=impl`` (same weights per seed)."""
    torch.manual_seed(seed)
    cfg = _config(arch, layers)
    model = transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation=impl,
                                                          attn_implementation="sdpa")
    return model.to(device=device, dtype=dtype)


def batch(seed: int = 1, B: int = 2, S: int = 16, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, S), generator=g)
    return ids.to(device)


def loss_of(model, ids):
    """Causal LM loss including the router load-balancing loss."""
    out = model(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False)
    return out


def clone(model):
    return copy.deepcopy(model)


_OLD_CLASSES = {}


def hf_hooks_inside() -> bool:
    """True for the installed transformers' own placement being "module hooks inside the
    checkpoint" (<= 5.17: ``GradientCheckpointingLayer`` defines ``__call__``)."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    return "__call__" in GradientCheckpointingLayer.__dict__


def emulate_hooks_inside_checkpoint(model):
    """Make ``model``'s decoder layers behave like transformers <= 5.17: the layer's
    ``__call__`` checkpoints ``nn.Module.__call__`` (so module hooks run inside the
    checkpointed function and again in the backward recomputation).  With such a
    transformers installed, that is already the model's own behaviour: nothing changes."""
    from moe_offload.integrations.transformers import find_decoder_layers
    if hf_hooks_inside():
        return model
    for layer in find_decoder_layers(model):
        cls = type(layer)
        sub = _OLD_CLASSES.get(cls)
        if sub is None:
            def __call__(self, *args, **kwargs):
                if self.gradient_checkpointing and self.training:
                    return self._gradient_checkpointing_func(
                        functools.partial(nn.Module.__call__, self, **kwargs), *args)
                return nn.Module.__call__(self, *args, **kwargs)
            sub = type(cls.__name__, (cls,), {"__call__": __call__})
            sub.forward = cls.forward.__wrapped__      # no checkpointing in forward
            _OLD_CLASSES[cls] = sub
        layer.__class__ = sub
    return model
