"""Time FP8 vs bf16 grouped MLP forward+backward on one GPU, and probe the FP8 kernel.

Usage::

    python scripts/bench_fp8.py                 # T=16384 H=4096 F=2048 E=8, median of 20
    python scripts/bench_fp8.py --probe         # what torch._scaled_grouped_mm accepts
    python scripts/bench_fp8.py --profile       # + cast-kernel configs, per-piece breakdown,
                                                #   host issue time, profiler table

Measured on the H100 (torch 2.11, 2026-11-25, defaults), before the fused kernels: bf16
fwd+bwd 3.70 ms, FP8 12.3 ms (0.30x; host-launch bound); group_quantize of x (rowwise +
columnwise) 1.23 ms wall.  With the fused kernels (``--profile --iters 10`` and
``--iters 20``, two H100 leases): FP8 3.99 / 4.17 ms vs bf16 3.80 / 3.93 ms (0.95x /
0.94x); group_quantize of x 0.31 / 0.27 ms; fc1 GEMM alone bf16 0.76 ms, FP8 0.53-0.55
ms (~1000-1040 TFLOP/s); fc1 wgrad GEMM alone bf16 0.79-0.84 ms, FP8 0.59-0.61 ms.  See
moe_offload/ops/gemm/fp8.py for the breakdown and why >= 1.3x is out of reach.

The probe prints, for the installed torch, whether ``torch._scaled_grouped_mm`` runs the
2D x 3D (forward/dgrad) and 2D x 2D (wgrad) layouts with rowwise fp32 scales, which group
alignments it accepts, and how close it is to a float64 reference on the same codes.
"""
import argparse
import statistics
import sys

import torch


def _probe_case(name, fn):
    try:
        msg = fn()
        print(f"[probe] {name}: OK {msg if msg else ''}")
    except Exception as exc:  # noqa: BLE001 - report anything the kernel raises
        print(f"[probe] {name}: FAIL {type(exc).__name__}: {str(exc)[:300]}")


def probe():
    """Print what ``torch._scaled_grouped_mm`` supports on this device."""
    dev = "cuda"
    print("torch", torch.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())
    try:
        import triton
        print("triton", triton.__version__)
    except ImportError:
        print("triton missing")
    f8 = torch.float8_e4m3fn
    G, K, N = 4, 256, 128

    def fwd(sizes):
        T = sum(sizes)
        x = torch.randn(T, K, device=dev)
        w = torch.randn(G, N, K, device=dev)
        sx = torch.rand(T, device=dev) + 0.5
        sw = torch.rand(G, N, device=dev) + 0.5
        xq = (x * 16).clamp(-448, 448).to(f8)
        wq = (w * 16).clamp(-448, 448).to(f8)
        offs = torch.tensor(sizes, device=dev).cumsum(0).to(torch.int32)
        y = torch._scaled_grouped_mm(xq, wq.transpose(-2, -1), sx, sw, offs=offs, out_dtype=torch.bfloat16)
        ref = torch.zeros(T, N, dtype=torch.float64, device=dev)
        s = 0
        for g, n in enumerate(sizes):
            ref[s:s + n] = (xq[s:s + n].double() * sx[s:s + n, None].double()) @ (wq[g].double() * sw[g][:, None].double()).T
            s += n
        err = (y.double() - ref).abs().max().item()
        return f"shape={tuple(y.shape)} maxerr={err:.3g} refmax={ref.abs().max().item():.3g}"

    def wgrad(sizes):
        T = sum(sizes)
        a = (torch.randn(N, T, device=dev) * 16).clamp(-448, 448).to(f8)       # dy^T row-major
        b = (torch.randn(K, T, device=dev) * 16).clamp(-448, 448).to(f8).t()   # x, column-major (T,K)
        sa = torch.rand(G * N, device=dev) + 0.5
        sb = torch.rand(G * K, device=dev) + 0.5
        offs = torch.tensor(sizes, device=dev).cumsum(0).to(torch.int32)
        y = torch._scaled_grouped_mm(a, b, sa, sb, offs=offs, out_dtype=torch.bfloat16)
        ref = torch.zeros(G, N, K, dtype=torch.float64, device=dev)
        s = 0
        for g, n in enumerate(sizes):
            ref[g] = (a[:, s:s + n].double() * sa[g * N:(g + 1) * N, None].double()) @ (b[s:s + n].double() * sb[g * K:(g + 1) * K].double())
            s += n
        err = (y.double() - ref).abs().max().item()
        return f"shape={tuple(y.shape)} maxerr={err:.3g} refmax={ref.abs().max().item():.3g}"

    _probe_case("2Dx3D aligned16 [32,48,0,64]", lambda: fwd([32, 48, 0, 64]))
    _probe_case("2Dx3D unaligned [17,5,0,33]", lambda: fwd([17, 5, 0, 33]))
    _probe_case("2Dx2D aligned16 [32,48,0,64]", lambda: wgrad([32, 48, 0, 64]))
    _probe_case("2Dx2D unaligned [17,5,0,33]", lambda: wgrad([17, 5, 0, 33]))
    _probe_case("2Dx2D aligned8 [24,40,0,8]", lambda: wgrad([24, 40, 0, 8]))


def _median_ms(fn, iters, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench(T, H, F, E, iters, profile=False):
    """Median fwd+bwd time of one grouped SwiGLU MLP, bf16 vs each FP8 recipe path."""
    from moe_offload.ops.grouped_mlp import grouped_mlp

    def quantized_grouped_mlp(x, offs, w1, b1, w2, b2, probs, activation, recipe):
        return grouped_mlp(x, offs, w1, b1, w2, b2, probs, activation, recipe=recipe)
    dev = "cuda"
    torch.manual_seed(0)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w1 = (torch.randn(E, 2 * F, H, device=dev, dtype=torch.bfloat16) * H ** -0.5).requires_grad_()
    w2 = (torch.randn(E, H, F, device=dev, dtype=torch.bfloat16) * F ** -0.5).requires_grad_()
    sizes = torch.full((E,), T // E, dtype=torch.int64)
    offs = sizes.cumsum(0).to(torch.int32).to(dev)
    dy = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    flops = 3 * 2 * T * H * (2 * F + F)  # fwd + 2 bwd GEMMs, fc1 (2F outputs) and fc2

    params = (x, w1, w2)

    def run_bf16():
        for t in params:
            t.grad = None
        y = grouped_mlp(x, offs, w1, None, w2, None, None, "swiglu")
        y.backward(dy)

    def run_fp8():
        for t in params:
            t.grad = None
        y = quantized_grouped_mlp(x, offs, w1, None, w2, None, None, "swiglu", "fp8")
        y.backward(dy)

    def fwd_only(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    t_bf16 = _median_ms(run_bf16, iters)
    t_fp8 = _median_ms(run_fp8, iters)
    print(f"T={T} H={H} F={F} E={E} iters={iters} device={torch.cuda.get_device_name()}")
    print(f"bf16 fwd+bwd: {t_bf16:.3f} ms  ({flops / t_bf16 / 1e9:.0f} TFLOP/s)")
    print(f"fp8  fwd+bwd: {t_fp8:.3f} ms  ({flops / t_fp8 / 1e9:.0f} TFLOP/s)")
    print(f"speedup: {t_bf16 / t_fp8:.3f}x")
    f_bf16 = _median_ms(fwd_only(lambda: grouped_mlp(x, offs, w1, None, w2, None, None, "swiglu")), iters)
    f_fp8 = _median_ms(fwd_only(lambda: quantized_grouped_mlp(x, offs, w1, None, w2, None, None, "swiglu", "fp8")),
                       iters)
    print(f"forward only (no_grad): bf16 {f_bf16:.3f} ms, fp8 {f_fp8:.3f} ms, speedup {f_bf16 / f_fp8:.3f}x")
    # the GEMMs alone, to separate kernel speed from quantization overhead
    from moe_offload.tensor import Float8CurrentScalingQuantizer, group_quantize
    xq = group_quantize(x.detach(), Float8CurrentScalingQuantizer(), offsets=offs)
    xd, sx = xq.rowwise_2d()
    w8 = w1.detach().float().clamp(-448, 448).to(torch.float8_e4m3fn)
    sx_T = sx[torch.searchsorted(offs, torch.arange(T, device=dev, dtype=torch.int32), right=True).clamp(max=E - 1)]
    sw = torch.ones(E, 2 * F, device=dev)
    g8 = _median_ms(lambda: torch._scaled_grouped_mm(xd, w8.transpose(1, 2), sx_T, sw, offs=offs,
                                                      out_dtype=torch.bfloat16), iters)
    g16 = _median_ms(lambda: torch._grouped_mm(x.detach(), w1.detach().transpose(1, 2), offs=offs), iters)
    fl = 2 * T * H * 2 * F
    print(f"fc1 GEMM alone: bf16 {g16:.3f} ms ({fl / g16 / 1e9:.0f} TFLOP/s), fp8 {g8:.3f} ms "
          f"({fl / g8 / 1e9:.0f} TFLOP/s)")
    q_ms = _median_ms(lambda: group_quantize(x.detach(), Float8CurrentScalingQuantizer(columnwise=True),
                                             offsets=offs), iters)
    print(f"group_quantize x (T x H, rowwise+columnwise): {q_ms:.3f} ms")
    # wgrad GEMM alone (2D x 2D, FP8 columnwise operands) vs bf16
    dh = torch.randn(T, 2 * F, device=dev, dtype=x.dtype)   # fc1's output grad (T, 2F)
    dyq = group_quantize(dh, Float8CurrentScalingQuantizer(rowwise=False, columnwise=True),
                         offsets=offs)
    xq = group_quantize(x.detach(), Float8CurrentScalingQuantizer(rowwise=False, columnwise=True), offsets=offs)
    a8, sa = dyq.columnwise_2d()
    b8, sb = xq.columnwise_2d()
    sa_, sb_ = sa.repeat_interleave(2 * F), sb.repeat_interleave(H)
    w8_ms = _median_ms(lambda: torch._scaled_grouped_mm(a8, b8.t(), sa_, sb_, offs=dyq.columnwise_offsets,
                                                         out_dtype=torch.bfloat16), iters)
    w16_ms = _median_ms(lambda: torch._grouped_mm(dh.t(), x.detach(), offs=offs), iters)
    print(f"fc1 wgrad GEMM alone: bf16 {w16_ms:.3f} ms ({fl / w16_ms / 1e9:.0f} TFLOP/s), fp8 {w8_ms:.3f} ms "
          f"({fl / w8_ms / 1e9:.0f} TFLOP/s)")
    if profile:
        breakdown(x, w1, w2, dy, offs, iters)
        import time
        for _ in range(3):
            run_fp8()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            run_fp8()
        t_host = (time.perf_counter() - t0) / 10 * 1e3
        torch.cuda.synchronize()
        print(f"host time to issue one fp8 fwd+bwd (no sync): {t_host:.3f} ms")
        from torch.profiler import ProfilerActivity, profile as prof
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(3):
                run_fp8()
            torch.cuda.synchronize()
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


def breakdown(x, w1, w2, dy, offs, iters):
    """Median CUDA-event time of each piece of the FP8 step, run alone, and their sum
    (through the FP8 GEMM backend's public methods)."""
    from moe_offload.ops.activations import act_backward, act_forward
    from moe_offload.ops.gemm.base import Rows
    from moe_offload.ops.gemm.fp8 import Fp8Backend
    from moe_offload.tensor import fp8_kernels
    B, bf = Fp8Backend(), torch.bfloat16
    T, H = x.shape
    x, w1, w2 = x.detach(), w1.detach(), w2.detach()
    rows = Rows(offs, T, covered=True)
    xa = B.quantize_act(x, offs, True, True)
    w1q, w2q = B.quantize_weight(w1, True), B.quantize_weight(w2, True)
    w1d, w2d = B.weight_for_dgrad(w1, w1q.meta_G), B.weight_for_dgrad(w2, w2q.meta_G)
    h = B.forward(xa, w1q, rows, "any", bf)
    ha = B.store(h, offs)
    a = act_forward(h, None, "swiglu")
    aa = B.quantize_act(a, offs, True, False)
    dya = B.quantize_act(dy, offs, True, True)
    da = B.dgrad(dya, w2d, rows, "any", bf)
    hd = B.load(ha, bf)
    dh, _, a2 = act_backward(hd, None, da, "swiglu")
    aca = B.quantize_act(a2, offs, False, True)
    dha = B.quantize_act(dh, offs, True, True)
    pieces = [
        ("fwd  quantize x (rows+cols)", lambda: B.quantize_act(x, offs, True, True)),
        ("fwd  quantize w1 (rows)", lambda: B.quantize_weight(w1, True)),
        ("fwd  quantize w2 (rows)", lambda: B.quantize_weight(w2, True)),
        ("fwd  fc1 GEMM", lambda: B.forward(xa, w1q, rows, "any", bf)),
        ("fwd  quantize h (rows, saved)", lambda: B.store(h, offs)),
        ("fwd  act_forward", lambda: act_forward(h, None, "swiglu")),
        ("fwd  quantize a (rows)", lambda: B.quantize_act(a, offs, True, False)),
        ("fwd  FUSED act+h codes, then cast a", lambda: B.activation_forward(h, None, "swiglu", rows, True, B)),
        ("fwd  fc2 GEMM", lambda: B.forward(aa, w2q, rows, "zero_input", bf)),
        ("bwd  quantize dy (rows+cols)", lambda: B.quantize_act(dy, offs, True, True)),
        ("bwd  re-quantize w2 (transposed)", lambda: B.weight_for_dgrad(w2, w2q.meta_G)),
        ("bwd  fc2 dgrad GEMM", lambda: B.dgrad(dya, w2d, rows, "any", bf)),
        ("bwd  dequantize h", lambda: B.load(ha, bf)),
        ("bwd  act_backward", lambda: act_backward(hd, None, da, "swiglu")),
        ("bwd  FUSED act_backward from h codes", lambda: B.activation_backward(ha, None, da, "swiglu", rows, B, bf)),
        ("bwd  quantize a (cols)", lambda: B.quantize_act(a2, offs, False, True)),
        ("bwd  fc2 wgrad GEMM", lambda: B.wgrad(dya, aca, rows, bf)),
        ("bwd  quantize dh (rows+cols)", lambda: B.quantize_act(dh, offs, True, True)),
        ("bwd  re-quantize w1 (transposed)", lambda: B.weight_for_dgrad(w1, w1q.meta_G)),
        ("bwd  fc1 dgrad GEMM", lambda: B.dgrad(dha, w1d, rows, "zero_input", bf)),
        ("bwd  fc1 wgrad GEMM", lambda: B.wgrad(dha, xa, rows, bf)),
    ]
    default = dict(fp8_kernels.CAST_CONFIG)
    print("cast kernel configs (BLOCK_C, BLOCK_K, warps): quantize x rows+cols / rows only, ms")
    for key, cfgs in (("cols", [(16, 512, 4), (32, 128, 4), (16, 1024, 8), (8, 1024, 4)]),
                      ("rows", [(1, 4096, 4), (4, 1024, 4), (1, 4096, 8), (2, 2048, 4)])):
        for cfg in cfgs:
            fp8_kernels.CAST_CONFIG[key] = cfg
            ms = _median_ms(lambda: B.quantize_act(x, offs, True, key == "cols"), iters)
            print(f"  {key} {cfg}: {ms:.3f}")
        fp8_kernels.CAST_CONFIG[key] = default[key]
    total = gemm = 0.0
    print("breakdown (each piece alone, median CUDA-event ms):")
    for name, fn in pieces:
        ms = _median_ms(fn, iters)
        total += ms
        gemm += ms if "GEMM" in name else 0.0
        print(f"  {name:40s} {ms:7.3f}")
    print(f"  sum {total:.3f} ms (GEMMs {gemm:.3f}, the rest {total - gemm:.3f}); the step runs the FUSED"
          " rows instead of quantize h + act_forward + quantize a and dequantize h + act_backward")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--probe", action="store_true")
    p.add_argument("--T", type=int, default=16384)
    p.add_argument("--H", type=int, default=4096)
    p.add_argument("--F", type=int, default=2048)
    p.add_argument("--E", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of the FP8 step")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    if args.probe:
        probe()
    else:
        bench(args.T, args.H, args.F, args.E, args.iters, args.profile)


if __name__ == "__main__":
    main()
