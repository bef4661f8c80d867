"""``plan/modules.py``: the norm recompute node (bitwise, and when it stands in)."""
import pytest
import torch

import moe_offload.plan.modules as modules
from moe_offload.plan.modules import Wrappers, install_recompute

from ._models import tiny_qwen3

pytest.importorskip("transformers")


def _grads(model, step):
    model.zero_grad(set_to_none=True)
    step().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype, fast", [(torch.bfloat16, True), (torch.float32, False)])
def test_norm_recompute_is_bitwise_and_used_only_where_it_can_be(dtype, fast, monkeypatch):
    """bf16 HF RMSNorms consume their input once (the upcast): one recompute node per norm,
    bitwise the plain gradients.  fp32 ones use it twice (``.to`` returns it as is): the
    node would reorder the sum of x's gradient contributions, so torch's checkpoint runs."""
    model, step = tiny_qwen3(layers=2)
    model.to(dtype)
    ref = _grads(model, step)
    calls = []
    apply = modules._RecomputeNorm.apply
    monkeypatch.setattr(modules._RecomputeNorm, "apply", lambda *a: calls.append(1) or apply(*a))
    wr = Wrappers()
    for layer in model.model.layers:
        install_recompute(layer, "norms", wr)
    try:
        for _ in range(2):          # the first call per norm also counts the input's uses
            got = _grads(model, step)
            assert ref.keys() == got.keys()
            for n in ref:
                assert torch.equal(ref[n], got[n]), n
    finally:
        wr.remove()
    assert (len(calls) == 2 * 2 * 4) if fast else not calls     # 2 steps x 2 layers x 4 norms
    assert "forward" not in model.model.layers[0].input_layernorm.__dict__


def test_uses_of_input_counts_edges():
    x = torch.randn(3, requires_grad=True)
    assert modules._uses_of_input(x * 2, x) == 1
    assert modules._uses_of_input(x * x + x, x) == 3
    h = x.exp()
    assert modules._uses_of_input(h.sin() * h, h) == 2
