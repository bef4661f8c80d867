"""Tiny models for the planner tests: a Hugging Face Qwen3-MoE from a config and a stack of
our MoE blocks (fp32, CPU), each with a seeded ``step_fn`` and a gradient snapshot."""
import torch
from torch import nn

from moe_offload.ops.moe import MoE


def tiny_qwen3(layers: int = 3, tokens: int = 32):
    """``(model, step_fn)``: Qwen3-MoE with the router aux loss in the loss."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    import moe_offload.integrations.transformers  # noqa: F401  (offers the chunked head to the planner)
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, num_experts=8, num_experts_per_tok=2, output_router_logits=True,
                         router_aux_loss_coef=0.01, max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = "grouped_mm"
    model = Qwen3MoeForCausalLM(cfg).float()
    ids = torch.randint(0, 128, (1, tokens), generator=torch.Generator().manual_seed(1))

    def step():
        return model(input_ids=ids, labels=ids).loss
    return model, step


class Block(nn.Module):
    """Pre-norm residual MoE block; the MoE's aux loss joins the backward."""

    def __init__(self, h: int):
        super().__init__()
        self.norm = nn.RMSNorm(h)
        self.moe = MoE(h, 2 * h, 4, 2)

    def forward(self, x):
        y = self.moe(self.norm(x))
        return _with_aux(x + y, self.moe.aux_loss)


class _Aux(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, aux):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        return dy, torch.ones((), dtype=torch.float32)


def _with_aux(y, aux):
    return _Aux.apply(y, aux) if aux is not None and aux.requires_grad else y


def moe_stack(layers: int = 3, tokens: int = 32, h: int = 32):
    """``(model, step_fn)``: a ModuleList of our MoE blocks; the input is a leaf that
    requires grad (held by the caller: never worth moving)."""
    torch.manual_seed(0)
    model = nn.ModuleList(Block(h) for _ in range(layers))
    x = torch.randn(tokens, h, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    dy = torch.randn(tokens, h, generator=torch.Generator().manual_seed(2))

    def step():
        y = x
        for layer in model:
            y = layer(y)
        return (y * dy).sum()
    step.x = x
    return model, step


def grads(model, step):
    """Loss and every gradient of one step (parameters, and the leaf input if any)."""
    model.zero_grad(set_to_none=True)
    x = getattr(step, "x", None)
    if x is not None:
        x.grad = None
    loss = step()
    loss.backward()
    out = [loss.detach().clone()] + [None if p.grad is None else p.grad.clone()
                                     for p in model.parameters()]
    if x is not None:
        out.append(x.grad.clone())
    return out


def bitwise(a, b) -> bool:
    """Every entry equal bit for bit (``None`` only against ``None``)."""
    return len(a) == len(b) and all(
        (u is None and v is None) or (u is not None and v is not None and torch.equal(u, v))
        for u, v in zip(a, b))
