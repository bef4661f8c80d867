"""Time the fused ``GroupedMLP`` against the plain ``torch._grouped_mm`` + autograd composition.

    PYTHONPATH=. python scripts/bench_grouped_mlp.py            # T=16384 H=4096 F=2048 E=8 bf16
    PYTHONPATH=. python scripts/bench_grouped_mlp.py --probe    # also probe torch._grouped_mm on CUDA

Both sides compute ``y = (silu(x@w1[:, :F]) * (x@w1[:, F:]) * probs) @ w2`` per expert with
uniform split sizes held on the device, and run forward + backward (grads for x, w1, w2,
probs).  Reported: median of ``--iters`` timed iterations (CUDA events, after warm-up,
variants interleaved), and the bytes saved for backward beyond the input ``x``
(memory allocated after forward minus before, minus the output).
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from moe_offload.ops import GroupedMLP


def baseline(x_TH, w1_GXH, w2_GHF, probs_T, offs_G):
    """The unfused reference composition, autograd through ``torch._grouped_mm``."""
    h_TX = torch._grouped_mm(x_TH, w1_GXH.transpose(1, 2), offs=offs_G)
    a_TF, b_TF = h_TX.chunk(2, dim=1)
    z_TF = F.silu(a_TF) * b_TF * probs_T.unsqueeze(1)
    return torch._grouped_mm(z_TF, w2_GHF.transpose(1, 2), offs=offs_G)


def time_interleaved(steps: dict, iters: int, warmup: int) -> dict:
    """Median ms per call of each step, variants interleaved iteration by iteration.

    Events are recorded around every call and read only at the end (no sync in the
    loop), so the host runs ahead as in training and its Python overhead is hidden
    unless it exceeds the GPU time.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    torch.cuda.synchronize()
    names = list(steps)
    events = {name: [] for name in names}
    for it in range(iters):
        for name in names[it % len(names):] + names[:it % len(names)]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            steps[name]()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: statistics.median(s.elapsed_time(e) for s, e in ev) for name, ev in events.items()}


def saved_bytes(forward) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = forward()
    torch.cuda.synchronize()
    used = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
    del y
    return used


def probe() -> None:
    """Print what torch._grouped_mm on this GPU supports (dtypes, sync, empty wgrad groups).

    Not probed here because it kills the CUDA context: a T-contiguous ``(K, T)`` first
    operand in the wgrad form with group sizes not a multiple of 16 bytes trips a
    device-side assert (seen on H100, torch 2.11); we always pass ``a.t()`` instead.
    """
    dev = "cuda"
    print("torch", torch.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())
    offs = torch.tensor([3, 3, 17, 40], dtype=torch.int32, device=dev)
    bounds = [0, 3, 3, 17, 40]
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        a = torch.randn(40, 64, device=dev, dtype=dt)
        b = torch.randn(4, 32, 64, device=dev, dtype=dt).transpose(1, 2)
        ref = torch.cat([a[bounds[g]:bounds[g + 1]].double() @ b[g].double() for g in range(4)])
        for mode in ("warn", "error"):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode(mode)
            try:
                y = torch._grouped_mm(a, b, offs=offs)
                msg = f"ok err={(y.double() - ref).abs().max().item() if mode == 'warn' else 0:.3g}"
            except Exception as e:  # noqa: BLE001 - this is a probe
                msg = f"{type(e).__name__}: {str(e)[:120]}"
            finally:
                torch.cuda.set_sync_debug_mode("default")
            print(f"2Dx3D {dt} sync_debug={mode}: {msg}")
        # wgrad form (row-major a passed as a.t()), uneven offsets; output memory is
        # pre-filled with NaN (freed just before) to see whether empty groups get written.
        bt = torch.randn(40, 48, device=dev, dtype=dt)
        wref = torch.stack([a[bounds[g]:bounds[g + 1]].double().t() @ bt[bounds[g]:bounds[g + 1]].double()
                            for g in range(4)])
        junk = torch.full((4, 64, 48), float("nan"), device=dev, dtype=dt)
        del junk
        torch.cuda.set_sync_debug_mode("error")
        try:
            w = torch._grouped_mm(a.t(), bt, offs=offs)
            torch.cuda.set_sync_debug_mode("default")
            msg = (f"ok err={(w.double() - wref).abs().max().item():.3g} scale={wref.abs().max().item():.3g} "
                   f"empty group max|w|={w[1].double().abs().max().item()}")
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {str(e)[:120]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        print(f"wgrad {dt} a.t() offs 3,3,17,40: {msg}")
    # rows past offs[-1]
    a = torch.randn(16, 64, device=dev, dtype=torch.bfloat16)
    b = torch.randn(2, 64, 64, device=dev, dtype=torch.bfloat16)
    y = torch.full((16, 64), 7.0, device=dev, dtype=torch.bfloat16)
    y = torch._grouped_mm(a, b, offs=torch.tensor([4, 10], dtype=torch.int32, device=dev))
    print("tail rows past offs[-1] (first values):", y[10:, :4].flatten()[:8].tolist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--probe", action="store_true")
    ap.add_argument("--probe-only", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print a per-kernel breakdown")
    args = ap.parse_args()
    if args.probe or args.probe_only:
        probe()
        if args.probe_only:
            return
    T, H, Fh, E = args.tokens, args.hidden, args.ffn, args.experts
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    split_E = torch.full((E,), T // E, device=dev, dtype=torch.int64)
    split_E[-1] += T - int(split_E.sum())
    offs_E = torch.cumsum(split_E, 0, dtype=torch.int32)
    x = torch.randn(T, H, device=dev, dtype=dt, requires_grad=True)
    probs = torch.rand(T, device=dev, dtype=dt, requires_grad=True)
    dy = torch.randn(T, H, device=dev, dtype=dt)
    mlps = {mode: GroupedMLP(E, H, Fh, "swiglu", recompute=mode, device=dev, dtype=dt)
            for mode in ("activation", "fc1")}
    mlps["fc1"].load_state_dict(mlps["activation"].state_dict())
    w1 = mlps["activation"].fc1_weight.detach().clone().requires_grad_(True)
    w2 = mlps["activation"].fc2_weight.detach().clone().requires_grad_(True)
    flop = 3 * 2 * T * H * (2 * Fh + Fh)

    def zero():
        for t in (x, probs, w1, w2, *mlps["activation"].parameters(), *mlps["fc1"].parameters()):
            t.grad = None

    runs = {"unfused _grouped_mm+autograd": lambda: baseline(x, w1, w2, probs, offs_E)}
    for mode, m in mlps.items():
        runs[f"GroupedMLP recompute={mode}"] = (lambda m=m: m(x, split_E, probs))
    # As MoE calls it: offsets known to cover all rows, so no tail masking.
    runs["GroupedMLP recompute=activation covered"] = \
        lambda: mlps["activation"].forward_offsets(x, offs_E, probs, covered=True)
    # correctness at this shape: fused grads vs the unfused composition
    grads = {}
    for name, fwd in runs.items():
        zero()
        fwd().backward(dy)
        wg = (w1.grad, w2.grad) if name.startswith("unfused") else \
            (mlps[name.split("=")[1].split()[0]].fc1_weight.grad, mlps[name.split("=")[1].split()[0]].fc2_weight.grad)
        grads[name] = [x.grad.float(), probs.grad.float(), wg[0].float(), wg[1].float()]
    base = grads["unfused _grouped_mm+autograd"]
    for name, g in grads.items():
        rel = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(g, base)]
        print(f"{name}: max rel grad diff vs unfused (x, probs, w1, w2) = " + ", ".join(f"{r:.2e}" for r in rel))
    steps = {}
    for name, fwd in runs.items():
        def step(fwd=fwd):
            zero()
            fwd().backward(dy)
        steps[name] = step
    fwd_ms = time_interleaved(runs, args.iters, args.warmup)
    results = time_interleaved(steps, args.iters, args.warmup)
    for name, fwd in runs.items():
        zero()
        mem = saved_bytes(fwd)
        ms = results[name]
        print(f"{name:40s} fwd+bwd {ms:7.3f} ms ({flop / ms / 1e9:6.0f} TFLOP/s)  fwd {fwd_ms[name]:6.3f} ms  "
              f"saved beyond x {mem / T:7.1f} B/token ({mem / 2**20:.0f} MiB)")
    b = results["unfused _grouped_mm+autograd"]
    for name, ms in results.items():
        print(f"speedup of {name} over unfused: {b / ms:.3f}x")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        for name in ("unfused _grouped_mm+autograd", "GroupedMLP recompute=activation"):
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    steps[name]()
                torch.cuda.synchronize()
            print(f"--- kernels of {name} (3 steps)")
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=10, max_name_column_width=60))


if __name__ == "__main__":
    main()
