"""The measuring machinery of the full-model run (:mod:`~moe_offload.bench.full_model`),
shared with our row (:mod:`~moe_offload.bench.full_ours`): the length and time arithmetic
(pure functions), one measured training step (:class:`Trainer`: time, peak above the step
start, out of memory as a result), and :func:`timed_at` (one or two steps at a length,
within the run's time budget)."""
from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch


__all__ = ["MiB", "GiB", "fmt_bytes", "weight_bytes", "layers_that_fit", "peak_line",
           "longest_fitting", "time_model", "attention_c2", "predict_time", "Deadline",
           "make_ids", "StepResult", "cleanup", "pinned_peak_bytes",
           "reset_pinned_peak", "Trainer", "FullRun", "WARM_ALWAYS_S", "timed_at"]

MiB, GiB = 1 << 20, 1 << 30

# ------------------------------------------------------------------ arithmetic (pure)
def fmt_bytes(v) -> str:
    """``v`` bytes as GiB (>= 1 GiB) or MiB."""
    if v is None:
        return "-"
    return f"{v / GiB:.2f} GiB" if abs(v) >= GiB else f"{v / MiB:.2f} MiB"


def weight_bytes(dims: dict, dtype_bytes: int = 2) -> tuple:
    """``(per_layer_bytes, outside_bytes)`` of a Qwen3-MoE's weights: one decoder layer
    (attention q/k/v/o and q/k norms, two RMSNorms, router, experts' gate/up and down) and
    what sits outside the layers (embedding, untied LM head, final norm)."""
    h, nq, nkv, d = dims["hidden_size"], dims["num_attention_heads"], dims["num_key_value_heads"], \
        dims["head_dim"]
    e, f, v = dims["num_experts"], dims["moe_intermediate_size"], dims["vocab_size"]
    attn = h * nq * d + 2 * h * nkv * d + nq * d * h + 2 * d
    layer = attn + 2 * h + e * h + e * 3 * h * f
    outside = v * h * (1 if dims.get("tie_word_embeddings") else 2) + h
    return layer * dtype_bytes, outside * dtype_bytes


def layers_that_fit(dims: dict, device_bytes: int, dtype_bytes: int = 2,
                    fraction: float = 0.5) -> tuple:
    """``(layers, note)``: every layer when the weights fit in ``fraction`` of the device
    memory, else the most layers whose weights do (at least 1)."""
    per_layer, outside = weight_bytes(dims, dtype_bytes)
    full = dims["num_hidden_layers"]
    total = outside + full * per_layer
    room = fraction * device_bytes
    if total <= room:
        return full, (f"all {full} layers: weights {total / GiB:.1f} GiB fit in "
                      f"{fraction:.0%} of the device's {device_bytes / GiB:.1f} GiB")
    n = max(1, min(full, int((room - outside) // per_layer)))
    return n, (f"{n} of {full} layers: the full weights ({total / GiB:.1f} GiB) do not fit in "
               f"{fraction:.0%} of the device's {device_bytes / GiB:.1f} GiB; {n} layers' "
               f"weights ({(outside + n * per_layer) / GiB:.1f} GiB) do")


def peak_line(points: list) -> tuple:
    """``(a, b)`` of ``peak = a + b * tokens`` through measured ``[(tokens, peak_bytes)]``
    (least squares over two or more points; one point: a line through the origin)."""
    pts = [(float(t), float(p)) for t, p in points]
    if not pts:
        raise ValueError("peak_line: no points")
    if len(pts) == 1 or len({t for t, _ in pts}) == 1:
        t, p = pts[-1]
        return 0.0, p / t
    n = len(pts)
    mt, mp = sum(t for t, _ in pts) / n, sum(p for _, p in pts) / n
    b = sum((t - mt) * (p - mp) for t, p in pts) / sum((t - mt) ** 2 for t, _ in pts)
    return mp - b * mt, b


def longest_fitting(a: float, b: float, avail_bytes: float, unit: int, cap: int) -> int:
    """The largest multiple of ``unit``, at most ``cap``, whose predicted peak
    ``a + b * L`` is ``<= avail_bytes``; 0 when not even ``unit`` fits."""
    if unit <= 0 or cap < unit:
        raise ValueError(f"longest_fitting: need 0 < unit <= cap, got unit={unit} cap={cap}")
    top = cap // unit
    if b <= 0:
        return top * unit if a <= avail_bytes else 0
    k = int(math.floor((avail_bytes - a) / b / unit))
    k = max(0, min(top, k))
    while k > 0 and a + b * k * unit > avail_bytes:   # float edge
        k -= 1
    return k * unit


def time_model(points: list) -> tuple:
    """``(c1, c2)`` of ``t = c1 L + c2 L^2`` through two measured ``[(tokens, seconds)]``
    (the last two; attention makes the step quadratic in L).  ``c2 < 0`` (noise) is
    clamped to 0 with ``c1`` from the longer point."""
    if not points:
        raise ValueError("time_model: no points")
    if len(points) == 1:
        t, s = points[0]
        return s / t, 0.0
    (l1, t1), (l2, t2) = points[-2], points[-1]
    if l1 == l2:
        return t2 / l2, 0.0
    c2 = (t2 / l2 - t1 / l1) / (l2 - l1)
    if c2 < 0:
        return t2 / l2, 0.0
    return t1 / l1 - c2 * l1, c2


def attention_c2(dims: dict, layers: int, flops_per_s: float = 4e14) -> float:
    """Seconds per token^2 of one training step's causal attention with checkpointing
    (forward, recompute, backward ~ 2.5 forwards: 4.5 forwards of ``2 L^2 d`` FLOPs each,
    ``d`` = heads x head dim) at ``flops_per_s`` (flash attention on an H100/H200)."""
    d = dims["num_attention_heads"] * dims["head_dim"]
    return layers * 4.5 * 2 * d / flops_per_s


def predict_time(model: tuple, tokens: int) -> float:
    """Seconds of one step at ``tokens`` under :func:`time_model`'s ``(c1, c2)``."""
    c1, c2 = model
    return max(0.0, c1 * tokens + c2 * tokens * tokens)


class Deadline:
    """The run's time budget: ``left()`` seconds remain; ``allows(s)`` when a step of
    ``s`` seconds (plus ``margin_s``) still fits."""

    def __init__(self, budget_s: float, margin_s: float = 20.0, clock=time.monotonic) -> None:
        self.clock, self.margin_s = clock, margin_s
        self.end = clock() + budget_s

    def left(self) -> float:
        """Seconds left."""
        return self.end - self.clock()

    def allows(self, seconds: float) -> bool:
        """True when ``seconds`` more (and the margin) fit before the end."""
        return seconds + self.margin_s <= self.left()


def make_ids(vocab: int, tokens: int, device: str, seed: int) -> torch.Tensor:
    """One sequence ``(1, tokens)`` of random token ids, the same for every strategy."""
    gen = torch.Generator().manual_seed(seed * 1000003 + tokens)
    return torch.randint(0, vocab, (1, tokens), generator=gen).to(device)


# ------------------------------------------------------------------ one training step
class StepResult:
    """One training step: ``ok`` (False: out of memory), ``step_s``, ``peak_bytes``
    (above the step start), ``error``."""

    def __init__(self, ok: bool, step_s: float = float("nan"), peak_bytes: int = 0,
                 error: str = "", host_bytes: Optional[int] = None) -> None:
        self.ok, self.step_s, self.peak_bytes, self.error = ok, step_s, peak_bytes, error
        self.host_bytes = host_bytes


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "ALLOC_FAILED" in msg)


def cleanup(cuda: bool) -> None:
    """Collect garbage and return cached device blocks and cached pinned host blocks
    (between lengths and strategies)."""
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        for name in ("_accelerator_emptyHostCache", "_host_emptyCache", "_cuda_host_emptyCache"):
            fn = getattr(torch._C, name, None)
            if fn is not None:
                try:
                    fn()
                    break
                except Exception:   # noqa: BLE001 - an older torch: the cache stays
                    continue


def pinned_peak_bytes() -> Optional[int]:
    """Peak bytes the pinned host allocator owned since the last reset (``None``: this
    torch has no host allocator statistics)."""
    try:
        st = torch.cuda.host_memory_stats()
    except Exception:   # noqa: BLE001
        return None
    for key in ("allocated_bytes.peak", "allocated_bytes.all.peak", "active_bytes.peak"):
        if key in st:
            return int(st[key])
    return None


def reset_pinned_peak() -> None:
    """Reset the pinned allocator's peak (when this torch has it)."""
    fn = getattr(torch.cuda, "reset_peak_host_memory_stats", None)
    if fn is not None:
        try:
            fn()
        except Exception:   # noqa: BLE001
            pass


class Trainer:
    """Runs training steps (``loss.backward(); opt.step(); opt.zero_grad()``, gradients kept)
    and measures each one's time and peak.  ``device_bytes``: the memory a step may use
    (CUDA: free + what torch holds at the start; CPU: the emulated figure); a CPU step
    whose peak passes what is left counts as out of memory."""

    def __init__(self, model, params, cuda: bool, device_bytes: int, reserve_bytes: int,
                 lr: float = 1e-4) -> None:
        self.model, self.params, self.cuda = model, params, cuda
        self.opt = torch.optim.AdamW(params, lr=lr)
        self.device_bytes, self.reserve_bytes = int(device_bytes), int(reserve_bytes)

    def start_bytes(self) -> int:
        """What is allocated at a step start (weights, optimizer state; CPU: parameter and
        optimizer bytes)."""
        if self.cuda:
            return torch.cuda.memory_allocated()
        n = sum(p.numel() * p.element_size() for p in self.model.parameters())
        for st in self.opt.state.values():
            n += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
        return n

    def avail_bytes(self) -> int:
        """Bytes a step may use above its start: device less start less reserve."""
        return self.device_bytes - self.start_bytes() - self.reserve_bytes

    def step(self, loss_fn: Callable[[], torch.Tensor]) -> StepResult:
        """One measured step; out of memory is a result, not an exception.  Gradients stay
        allocated between steps (zeroed, as ``fit`` counts them: held across steps), so
        the peak above the step start is the activations and the backward's transients."""
        self.opt.zero_grad(set_to_none=False)
        gc.collect()
        oom, err = False, ""
        try:
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                reset_pinned_peak()
                base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                self._run(loss_fn)
                torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                peak = torch.cuda.max_memory_allocated() - base
            else:
                from .measure import _cpu_profiled_step
                t0 = time.perf_counter()
                series, _ = _cpu_profiled_step(loss_fn, self._backward_and_step)
                dt = time.perf_counter() - t0
                peak = max(b for _, b in series)
                avail = self.avail_bytes()
                if peak > avail:
                    return StepResult(False, dt, int(peak), f"peak {fmt_bytes(peak)} > emulated "
                                      f"device room {fmt_bytes(avail)}")
        except Exception as e:   # noqa: BLE001 - out of memory is reported, anything else too
            oom, err = _is_oom(e), f"{type(e).__name__}: {e}"[:300]
            if not oom:
                raise
        if oom:
            self.opt.zero_grad(set_to_none=False)
            cleanup(self.cuda)
            return StepResult(False, error=err)
        return StepResult(True, dt, int(peak), host_bytes=pinned_peak_bytes() if self.cuda else None)

    def _backward_and_step(self, loss) -> None:
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)

    def _run(self, loss_fn) -> None:
        loss = loss_fn()
        self._backward_and_step(loss)
        del loss


# ------------------------------------------------------------------ the run
@dataclass
class FullRun:
    """What every row shares."""
    model: object
    layers: object
    trainer: Trainer
    cuda: bool
    unit: int
    cap: int
    vocab: int
    seed: int
    deadline: Deadline
    log: object
    progress: bool
    time_models: dict = None
    attn_c2: float = 0.0     # floor of the L^2 coefficient of a step's seconds (attention FLOPs)
    host_limit: Optional[int] = None   # pinned host bytes a step may fill (0.8 x MemAvailable)

    def say(self, text: str) -> None:
        """A progress line (flushed)."""
        if self.progress:
            print(text, file=self.log, flush=True)


WARM_ALWAYS_S = 20.0   # a step shorter than this is always run twice (warm timing)


def timed_at(run: FullRun, loss_for: Callable[[int], Callable], tokens: int, t_pred: float,
              what: str, warm: bool = True) -> dict:
    """One or two steps at ``tokens`` -> ``{"tokens", "ok", "step_s", "peak_bytes",
    "timing", "error"}``.  The second (timed, warm) step runs when ``warm`` or the step is
    short (``WARM_ALWAYS_S``), and the time budget allows it; else the first step's time
    is reported as "cold"."""
    out = {"tokens": tokens, "ok": None, "step_s": None, "peak_bytes": None, "timing": None,
           "error": "", "predicted_step_s": t_pred}
    if not run.deadline.allows(t_pred):
        out["error"] = (f"skipped: a step predicted {t_pred:.1f} s, {run.deadline.left():.0f} s "
                        "left in the time budget")
        return out
    cleanup(run.cuda)
    run.say(f"    {what}: step at {tokens} tokens (predicted {t_pred:.1f} s)")
    fn = loss_for(tokens)
    r = run.trainer.step(fn)
    out.update(ok=r.ok, step_s=r.step_s, peak_bytes=r.peak_bytes, timing="cold (first step)",
               error=r.error)
    if r.ok and (warm or r.step_s < WARM_ALWAYS_S) and run.deadline.allows(max(t_pred, r.step_s)):
        r2 = run.trainer.step(fn)
        if r2.ok:
            out.update(step_s=r2.step_s, peak_bytes=max(r.peak_bytes, r2.peak_bytes), timing="warm")
        else:
            out.update(ok=False, error="second step: " + r2.error)
    run.say(f"    {what}: {tokens} tokens -> " + (
        f"{out['step_s']:.2f} s ({out['timing']}), peak {out['peak_bytes'] / MiB:.0f} MiB"
        if out["ok"] else f"does not fit: {out['error']}"))
    return out
