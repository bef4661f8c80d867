"""Quick step-time / memory figure for the offload engine on CUDA (not a test).

Stack of 8 grouped SwiGLU expert MLPs (T=16384, H=4096, F=2048, 8 experts, bf16), as in
docs/ANCHORS.  Prints step time and post-forward memory relative to no offload.
Run: ``PYTHONPATH=. python scripts/bench_offload_step.py``.
"""
import time

import torch

from moe_offload.offload import get_cpu_offload_context
from moe_offload.ops.grouped_mlp import GroupedMLP


def main(T=16384, H=4096, F=2048, E=8, L=8, iters=8):
    dev, dt = "cuda", torch.bfloat16
    splits = [T // E] * E
    x0 = torch.randn(T, H, device=dev, dtype=dt)
    results = {}
    for recompute in ("activation", "fc1"):
        layers = [GroupedMLP(E, H, F, recompute=recompute, device=dev, dtype=dt) for _ in range(L)]
        for name, n_off in (("none", 0), ("offload 7/8", 7)):
            ctx, sync = get_cpu_offload_context(n_off > 0, n_off, L)

            def step():
                x = x0.clone().requires_grad_()
                h = x
                start = torch.cuda.memory_allocated()
                for layer in layers:
                    with ctx:
                        h = layer(h, splits)
                    h = sync(h)
                torch.cuda.synchronize()
                act = torch.cuda.memory_allocated() - start
                h.float().square().sum().backward()
                for layer in layers:
                    layer.zero_grad(set_to_none=True)
                return act

            for _ in range(3):
                step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(iters):
                act = step()
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / iters * 1e3
            results[(recompute, name)] = (ms, act)
            base_ms, base_act = results[(recompute, "none")]
            extra = ""
            if n_off:
                s = ctx.stats()
                extra = (f" offloaded/step {s['offloaded_bytes'] / (iters + 3) / 2**30:.2f} GiB,"
                         f" forced_waits {s['forced_waits']}, inline {s['inline_reloads']},"
                         f" pinned {s['pinned_pool_bytes'] / 2**30:.2f} GiB allocs {s['pinned_allocs']},"
                         f" D2H {s['offloaded_bytes'] / max(s['d2h_copy_seconds'], 1e-9) / 1e9:.0f} GB/s,"
                         f" H2D {s['reloaded_bytes'] / max(s['h2d_copy_seconds'], 1e-9) / 1e9:.0f} GB/s")
            print(f"recompute={recompute:10s} {name:12s} {ms:7.1f} ms/step (x{ms / base_ms:.2f}),"
                  f" act {act / 2**30:.2f} GiB (x{act / base_act:.3f}){extra}", flush=True)


if __name__ == "__main__":
    main()
