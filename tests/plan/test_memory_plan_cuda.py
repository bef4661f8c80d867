"""plan_memory on a GPU: real streams, allocator-measured memory, bitwise gradients."""
import gc
import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # before cuBLAS starts

import pytest
import torch

from moe_offload import plan_memory
from moe_offload.plan import Choice, make_plan, measure_model

pytestmark = pytest.mark.cuda
pytest.importorskip("transformers")


def _qwen3(seq=2048):
    from moe_offload.bench.workloads import build_qwen3
    dims = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                num_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
                num_hidden_layers=4, vocab_size=4096, intermediate_size=1024)
    model, ids = build_qwen3(dims, seq, "cuda", torch.bfloat16, 0)
    return model, lambda: model(input_ids=ids, labels=ids).loss


def _grads(model, step):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    from moe_offload.bench.measure import deterministic_check
    with deterministic_check(True):        # strict mode, flash/math SDPA: see the bench
        step().backward()
    return [p.grad.clone() for p in model.parameters()]


def _step_memory(model, step):
    """``(allocated after the forward, peak)`` above the step start, gradients allocated
    (the planner's convention)."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = step()
    torch.cuda.synchronize()
    act = torch.cuda.memory_allocated() - base
    loss.backward()
    torch.cuda.synchronize()
    return act, torch.cuda.max_memory_allocated() - base


def _peak(model, step):
    return _step_memory(model, step)[1]


def _act(model, step):
    return _step_memory(model, step)[0]


def test_cuda_plans_bitwise_and_memory_predicted():
    model, step = _qwen3()
    ref = _grads(model, step)
    assert all(torch.equal(a, b) for a, b in zip(_grads(model, step), ref)), "kernels not deterministic"
    figs = measure_model(model, step, iters=2, warmup=1)
    full = figs[1].act_none_bytes
    mixes = [[Choice("norms", 1)] * 3 + [Choice()],
             [Choice("norms+mlp", 2)] * 2 + [Choice("norms", 0)] * 2,
             [Choice("layer", 3)] * 4,
             [Choice("norms+experts", 3)] * 3 + [Choice()]]
    for choices, loss in [(m, False) for m in mixes] + [([Choice("layer", 3)] * 4, True)]:
        # the last: every layer offloaded (inputs), head checkpointed from the final norm's
        # input moved to the host -- the least memory any plan keeps
        plan = make_plan(model, figs, choices, loss_checkpoint=loss)
        handle = plan.apply()
        try:
            _grads(model, step)                      # warm the pinned pool
            got = _grads(model, step)
            act = _act(model, step)
        finally:
            handle.remove()
        assert all(torch.equal(a, b) for a, b in zip(got, ref)), choices
        assert abs(act - plan.predicted_activation_bytes) <= 0.05 * full, (choices, act, plan.describe())
    budget = (plan.predicted_peak_bytes + make_plan(model, figs, [Choice()] * 4).predicted_peak_bytes) // 2
    plan = plan_memory(model, step, budget, figures=figs)
    assert plan.predicted_peak_bytes <= budget


@pytest.mark.parametrize("seq", [2048, 4096])
def test_cuda_predicted_peak_within_5_percent(seq):
    """The peak model (solve.py, "Peak") against the allocator's max_memory_allocated,
    for plans whose peak is set at different moments."""
    model, step = _qwen3(seq)
    figs = measure_model(model, step, iters=2, warmup=1)
    none_peak = _peak(model, step)
    mixes = [[Choice()] * 4,
             [Choice("norms", 1)] * 3 + [Choice()],
             [Choice("norms+mlp", 2)] * 2 + [Choice("norms", 0)] * 2,
             [Choice("layer", 3)] * 4,
             [Choice("norms+experts", 3)] * 3 + [Choice()]]
    rows = []
    for choices in mixes:
        for loss in (False, True):
            plan = make_plan(model, figs, choices, loss_checkpoint=loss)
            handle = plan.apply()
            try:
                _peak(model, step)                      # warm the pinned pool
                peak = _peak(model, step)
            finally:
                handle.remove()
            rows.append((choices, loss, peak, plan.predicted_peak_bytes, plan.peak_moment))
    bad = [r for r in rows if abs(r[2] - r[3]) > 0.05 * r[2]]
    assert not bad, "\n".join(f"{[str(c) for c in c_]} loss={l}: measured {m / 2**20:.1f} MiB, "
                              f"predicted {p / 2**20:.1f} MiB ({why})" for c_, l, m, p, why in rows)
    assert rows[0][2] == pytest.approx(none_peak, rel=0.02)
