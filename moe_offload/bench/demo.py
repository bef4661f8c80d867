"""``python -m moe_offload demo``: train a small MoE transformer for a few steps.

Shape legend: ``B`` batch, ``S`` sequence, ``H`` hidden, ``V`` vocabulary.  Each block
is ``x + attention(norm(x))`` then ``x + MoE(norm(x))``; the task is to continue a
periodic token sequence, so the loss visibly drops within a few steps.  Runs on CUDA
(bf16) when present, else on the CPU (fp32); ``--offload`` wraps each block in our
offload context (``emulate`` on the CPU).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyMoETransformer", "demo_main"]


class _Block(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int, experts: int, top_k: int, device, dtype):
        super().__init__()
        from ..ops.moe import MoE
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, device=device, dtype=dtype)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False, device=device, dtype=dtype)
        self.proj = nn.Linear(hidden, hidden, bias=False, device=device, dtype=dtype)
        self.norm2 = nn.LayerNorm(hidden, device=device, dtype=dtype)
        self.moe = MoE(hidden, ffn, experts, top_k, device=device, dtype=dtype)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        B, S, H = x_BSH.shape
        q, k, v = self.qkv(self.norm1(x_BSH)).view(B, S, 3, self.heads, H // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        x_BSH = x_BSH + self.proj(a.transpose(1, 2).reshape(B, S, H))
        return x_BSH + self.moe(self.norm2(x_BSH))


class TinyMoETransformer(nn.Module):
    """Embedding, ``layers`` attention+MoE blocks, a tied output head."""

    def __init__(self, vocab: int = 64, hidden: int = 64, heads: int = 4, ffn: int = 128,
                 experts: int = 4, top_k: int = 2, layers: int = 2, device=None, dtype=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden, device=device, dtype=dtype)
        nn.init.normal_(self.embed.weight, std=hidden ** -0.5)
        self.blocks = nn.ModuleList(_Block(hidden, heads, ffn, experts, top_k, device, dtype)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(hidden, device=device, dtype=dtype)

    def forward(self, tokens_BS: torch.Tensor, wrap=None) -> torch.Tensor:
        """Logits ``(B, S, V)``; ``wrap(block, x)`` runs a block (default: call it)."""
        x = self.embed(tokens_BS)
        for block in self.blocks:
            x = wrap(block, x) if wrap else block(x)
        return self.norm(x) @ self.embed.weight.t()


def demo_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Train for ``--steps`` steps, printing loss and step time."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error(f"argument --device: {args.device!r} requested but CUDA is not available")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    big = dict(vocab=256, hidden=512, heads=8, ffn=1024, experts=8, layers=4) if cuda else {}
    model = TinyMoETransformer(device=device, dtype=dtype, **big)
    vocab = model.embed.num_embeddings
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    B, S = (16, 256) if cuda else (8, 32)
    period = 7
    base = torch.arange(S + 1, device=device) % period
    wrap = None  # run each block directly
    if args.offload:
        from ..offload import get_cpu_offload_context
        L = len(model.blocks)
        ctx, sync = get_cpu_offload_context(True, max(1, L - 1), L, emulate=not cuda)

        def wrap(block, x):  # noqa: F811 - replaces the default above
            with ctx:
                x = block(x)
            return sync(x)
    print(f"demo on {device} ({dtype}), {sum(p.numel() for p in model.parameters())} parameters, "
          f"offload={'on' if args.offload else 'off'}")
    for step in range(args.steps):
        shift = torch.randint(0, period, (B, 1), device=device)
        seq = (base.unsqueeze(0) + shift) % period + (torch.arange(B, device=device) % 4).unsqueeze(1) * period
        seq = seq % vocab
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(seq[:, :-1], wrap)
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), seq[:, 1:].reshape(-1))
        loss.backward()      # each MoE's load-balancing loss is attached to its output
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        print(f"step {step + 1}: loss {loss.item():.4f}  ({(time.perf_counter() - t0) * 1e3:.1f} ms)")
    return 0
