"""Train a small MoE transformer with expert parallelism + FSDP2 + CPU activation offload.

    torchrun --nproc-per-node 2 examples/train_ep.py            # GPUs (NCCL), else CPU (gloo)
    torchrun --nproc-per-node 2 examples/train_ep.py --steps 5 --no-offload

Each rank holds ``experts // W`` experts of every MoE layer (``MoE(ep_group=...)``);
embeddings, attention, norms, routers and the head are sharded by FSDP2
(``fully_shard``, with the experts left out through ``ignored_params``); the saved
activations of every block but the last go to host memory (``offload_module_list``;
on CPU the engine runs in its ``emulate`` mode).  Each rank trains on its own batch of a
fixed synthetic sequence set (it overfits: the loss goes down) and prints its loss and
memory.

Gradient scaling: FSDP2 averages the dense gradients over ranks (the gradient of the
mean of the ranks' losses), while an expert's gradient arrives as the *sum* over all
ranks' tokens routed to it.  Dividing expert gradients by ``W`` makes both the gradient
of the same mean loss.
"""
from __future__ import annotations

import argparse
import os
import resource
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from moe_offload import MoE, offload_module_list


class Block(nn.Module):
    """Pre-norm causal self-attention + MoE block."""

    def __init__(self, hidden: int, heads: int, ffn: int, experts: int, top_k: int, ep_group, device,
                 capacity_factor=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, device=device)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True, device=device)
        self.norm2 = nn.LayerNorm(hidden, device=device)
        self.moe = MoE(hidden, ffn, experts, top_k, ep_group=ep_group, device=device,
                       capacity_factor=capacity_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        S = x.shape[1]
        causal = torch.triu(torch.ones(S, S, dtype=torch.bool, device=x.device), 1)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.moe(self.norm2(x))


class TinyMoELM(nn.Module):
    """Token embedding, ``layers`` blocks, final norm and LM head."""

    def __init__(self, vocab: int, hidden: int, heads: int, ffn: int, experts: int, top_k: int,
                 layers: int, ep_group, device, capacity_factor=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden, device=device)
        self.blocks = nn.ModuleList(Block(hidden, heads, ffn, experts, top_k, ep_group, device,
                                          capacity_factor) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden, device=device)
        self.head = nn.Linear(hidden, vocab, bias=False, device=device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))

    def aux_loss(self) -> torch.Tensor:
        return sum(blk.moe.aux_loss for blk in self.blocks)

    def expert_parameters(self) -> List[nn.Parameter]:
        return [p for blk in self.blocks for p in blk.moe.experts.parameters()]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--experts", type=int, default=8, help="experts per MoE layer (a multiple of W)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--no-offload", action="store_true", help="train without activation offload")
    p.add_argument("--min-offload-bytes", type=int, default=0,
                   help="smaller saved tensors stay on the device (0: offload everything, "
                        "so that this tiny model moves something; 256 KiB suits real sizes)")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="fixed per-expert capacity (no host sync; drops overflow copies)")
    return p.parse_args(argv)


def _memory(device: torch.device) -> str:
    if device.type == "cuda":
        return (f"gpu peak {torch.cuda.max_memory_allocated(device) / 2**20:.1f} MiB, "
                f"now {torch.cuda.memory_allocated(device) / 2**20:.1f} MiB")
    return f"host max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"


def main(argv: Optional[List[str]] = None) -> List[float]:
    """Train and return this rank's losses (joins the process group torchrun describes,
    unless one is already initialized)."""
    args = parse_args(argv)
    own_group = not dist.is_initialized()
    if own_group:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    torch.manual_seed(0)                  # the same dense weights on every rank ...
    model = TinyMoELM(args.vocab, args.hidden, args.heads, args.ffn, args.experts, args.top_k,
                      args.layers, dist.group.WORLD, device, args.capacity_factor)
    experts = model.expert_parameters()
    with torch.no_grad():                 # ... and each rank its own experts
        gen = torch.Generator(device="cpu").manual_seed(1000 + rank)
        for p in experts:
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    for blk in model.blocks:
        fully_shard(blk, ignored_params=set(blk.moe.experts.parameters()))
    fully_shard(model)
    # Two groups: FSDP2's DTensor parameters and the EP experts' plain tensors cannot share
    # one foreach (multi-tensor) kernel call on CUDA.
    expert_ids = {id(p) for p in experts}
    dense = [p for p in model.parameters() if id(p) not in expert_ids]
    opt = torch.optim.AdamW([{"params": dense}, {"params": experts, "foreach": False}], lr=args.lr)
    handle = None
    if not args.no_offload:
        handle = offload_module_list(model.blocks, num_layers=args.layers - 1,
                                     emulate=device.type != "cuda",
                                     min_offload_bytes=args.min_offload_bytes)
    gen = torch.Generator(device="cpu").manual_seed(rank)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen).to(device)
    losses = []
    for step in range(args.steps):
        logits = model(tokens[:, :-1])
        lm = nn.functional.cross_entropy(logits.reshape(-1, args.vocab).float(),
                                         tokens[:, 1:].reshape(-1))
        (lm + model.aux_loss()).backward()
        with torch.no_grad():             # expert grads: sum over ranks -> mean (see top)
            for p in experts:
                p.grad.div_(world)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(lm.item())
        moved = ""
        if handle is not None:
            st = handle.stats()
            moved = f", offloaded {st['offloaded_bytes'] / 2**20:.2f} MiB"
            handle.reset_stats()
        print(f"rank {rank}/{world} step {step} loss {lm.item():.4f} ({_memory(device)}{moved})",
              flush=True)
    if handle is not None:
        handle.remove()
    if own_group:
        dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
