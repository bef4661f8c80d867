"""The README's worked example (a ModuleList of transformer blocks with MoE layers), run
on the CPU through ``emulate=True``: it must work as written and give the same
gradients, bit for bit, as the run without offload; so must the module-hook one-liner."""
import torch

import moe_offload


class Block(torch.nn.Module):
    def __init__(self, H, F, E):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(H), torch.nn.LayerNorm(H)
        self.attn = torch.nn.MultiheadAttention(H, 8, batch_first=True)
        self.moe = moe_offload.MoE(H, F, num_experts=E, top_k=2)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.moe(self.norm2(x))


def _grads(blocks, x0, mode):
    blocks.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_(True)
    h = x
    stats = None
    if mode == "context":
        ctx, sync = moe_offload.get_cpu_offload_context(True, num_layers=len(blocks) - 1,
                                                        model_layers=len(blocks), emulate=True,
                                                        min_offload_bytes=1024)
        for blk in blocks:
            with ctx:
                h = blk(h)
                with moe_offload.get_cpu_offload_context(enabled=False)[0]:
                    pass
            h = sync(h)
        stats = ctx.stats
    elif mode == "hooks":
        handle = moe_offload.offload_module_list(blocks, num_layers=len(blocks) - 1, emulate=True,
                                                 min_offload_bytes=1024)
        for blk in blocks:
            h = blk(h)
        stats = handle.stats
    else:
        for blk in blocks:
            h = blk(h)
    h.float().pow(2).sum().backward()
    stats = stats() if stats is not None else None      # read after the backward
    if mode == "hooks":
        handle.remove()
    return [x.grad] + [p.grad for p in blocks.parameters()], stats


def test_readme_worked_example_bitwise():
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(Block(64, 96, 4) for _ in range(3))
    x0 = torch.randn(2, 16, 64)
    ref, _ = _grads(blocks, x0, "none")
    for mode in ("context", "hooks"):
        got, stats = _grads(blocks, x0, mode)
        assert stats["offloaded_tensors"] > 0 and stats["reloaded_bytes"] >= stats["offloaded_bytes"]
        for a, b in zip(got, ref):
            assert a is not None and torch.equal(a, b), mode
