"""Tests for MoE against a naive per-token loop, the aux loss, and the no-host-sync rule."""

import pytest
import torch

from moe_offload.ops import GroupedLinear, GroupedMLP, MoE
from tests.offload._helpers import forward_stack, live_tensor_bytes
from tests.reference import act_ref, bound_check


def moe_loop(x, router_w, w1, w2, top_k, normalize, activation, experts_Tk=None):
    """Naive reference: each token, each of its top-k experts, one at a time."""
    x_TH = x.reshape(-1, x.shape[-1])
    probs_TE = torch.softmax(x_TH @ router_w.t(), dim=-1)
    rows = []
    for t in range(x_TH.shape[0]):
        if experts_Tk is None:
            p, e = torch.topk(probs_TE[t], top_k)
        else:
            e = experts_Tk[t]
            p = probs_TE[t][e]
        if normalize:
            p = p / p.sum()
        y = 0
        for j in range(top_k):
            h = act_ref(x_TH[t:t + 1] @ w1[e[j]].t(), activation)
            y = y + p[j] * (h @ w2[e[j]].t())
        rows.append(y)
    return torch.cat(rows).reshape(x.shape)


def _params(m):
    return [m.router.weight, m.experts.fc1_weight, m.experts.fc2_weight]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("top_k, normalize, activation", [(2, True, "swiglu"), (1, False, "gelu"),
                                                          (3, False, "geglu")])
def test_matches_naive_loop(dtype, tol, top_k, normalize, activation):
    m = MoE(12, 8, 5, top_k, activation, normalize_topk=normalize, dtype=dtype, aux_loss_coef=0)
    x = torch.randn(2, 9, 12, dtype=dtype, requires_grad=True)
    dy = torch.randn(2, 9, 12, dtype=dtype)
    y = m(x)
    assert y.shape == x.shape
    grads = torch.autograd.grad(y, [x] + _params(m), dy)
    leaves = [t.detach().double().requires_grad_(True) for t in [x] + _params(m)]
    y_ref = moe_loop(*leaves, top_k, normalize, activation)
    ref_grads = torch.autograd.grad(y_ref, leaves, dy.double())
    for a, b in zip((y,) + grads, (y_ref,) + ref_grads):
        scale = b.abs().max().item()
        assert (a.double() - b).abs().max().item() <= tol * scale, (a.double() - b).abs().max().item() / scale


@pytest.mark.parametrize("coef", [1.0, 0.01])
def test_aux_loss_formula(coef):
    E, k = 4, 2
    m = MoE(8, 4, E, k, aux_loss_coef=coef, dtype=torch.float64, attach_aux_loss=False)
    x = torch.randn(13, 8, dtype=torch.float64)
    m(x)
    probs = torch.softmax(x @ m.router.weight.detach().t(), dim=-1)
    counts = [0] * E
    for t in range(13):
        for e in torch.topk(probs[t], k).indices.tolist():
            counts[e] += 1
    expected = coef * E * sum(counts[e] / (13 * k) * probs[:, e].mean().item() for e in range(E))
    assert abs(m.aux_loss.item() - expected) < 1e-12
    m.aux_loss.backward()   # differentiable through the mean router probs
    assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0


def test_deterministic_and_drop_in():
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.LayerNorm(16), MoE(16, 8, 4, 2))
    x = torch.randn(3, 5, 16, requires_grad=True)
    outs = []
    for _ in range(2):
        x.grad = None
        block.zero_grad()
        y = block(x)
        y.square().mean().backward()
        outs.append([y.detach(), x.grad] + [p.grad for p in block.parameters()])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_aux_loss_is_attached_to_the_output():
    """Back-propagating through the output alone trains the router as ``loss + aux_loss``
    would; ``aux_loss`` is a detached value; the output may be modified in place."""
    torch.manual_seed(0)
    m = MoE(8, 6, 4, 2, aux_loss_coef=0.3, dtype=torch.float64)
    manual = MoE(8, 6, 4, 2, aux_loss_coef=0.3, dtype=torch.float64, attach_aux_loss=False)
    manual.load_state_dict(m.state_dict())
    x = torch.randn(3, 7, 8, dtype=torch.float64)
    dy = torch.randn(3, 7, 8, dtype=torch.float64)
    y = m(x)
    assert not m.aux_loss.requires_grad
    got = torch.autograd.grad(y, _params(m), dy)
    y2 = manual(x)
    assert manual.aux_loss.requires_grad and torch.equal(manual.aux_loss.detach(), m.aux_loss)
    ref = torch.autograd.grad((y2 * dy).sum() + manual.aux_loss, _params(manual))
    for a, b in zip(got, ref):
        assert (a - b).abs().max() <= 1e-13 * b.abs().max()
    # Without the aux loss the router gradient differs (the attachment does something).
    no_aux = torch.autograd.grad(manual(x), _params(manual), dy)
    assert (no_aux[0] - got[0]).abs().max() > 1e-6
    # The output is an ordinary tensor: in-place ops on it are fine.
    y = m(x)
    y.mul_(2).sum().backward()
    assert m.router.weight.grad is not None


def test_aux_loss_coef_zero_attaches_nothing():
    m = MoE(8, 6, 4, 2, aux_loss_coef=0.0)
    x = torch.randn(5, 8)
    m(x).sum().backward()
    ref = MoE(8, 6, 4, 2, aux_loss_coef=0.0, attach_aux_loss=False)
    ref.load_state_dict(m.state_dict())
    ref(x).sum().backward()
    for a, b in zip(_params(m), _params(ref)):
        assert torch.equal(a.grad, b.grad)
    assert m.aux_loss.item() == 0.0


_MODES = ["plain", "torch_reentrant", "torch_non_reentrant", "offloaded_checkpoint",
          "offload", "offload+offloaded_checkpoint"]


def _moe_step(layers, x0, mode):
    from torch.utils.checkpoint import checkpoint
    from moe_offload.offload import get_cpu_offload_context, offloaded_checkpoint
    calls = {
        "torch_reentrant": lambda l, h: checkpoint(l, h, use_reentrant=True),
        "torch_non_reentrant": lambda l, h: checkpoint(l, h, use_reentrant=False),
        "offloaded_checkpoint": offloaded_checkpoint,
        "offload+offloaded_checkpoint": offloaded_checkpoint,
    }
    call = calls.get(mode, lambda l, h: l(h))
    ctx = sync = None
    if mode.startswith("offload+") or mode == "offload":
        ctx, sync = get_cpu_offload_context(True, None, len(layers), emulate=True,
                                            min_offload_bytes=0)
    for l in layers:
        l.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_()
    h = forward_stack(layers, x, ctx, sync, call)
    h.square().mean().backward()      # the task loss only: the aux loss is attached
    return [x.grad] + [p.grad for l in layers for p in _params(l)]


def test_aux_loss_under_checkpoint_and_offload_is_bitwise_and_leaves_no_graph():
    """Plain training (task loss + attached aux) == every checkpoint mode and offload,
    bitwise; after each step no graph is left (memory flat, aux_loss detached)."""
    torch.manual_seed(0)
    layers = [MoE(16, 12, 4, 2, aux_loss_coef=0.1) for _ in range(3)]
    x0 = torch.randn(40, 16)
    ref = _moe_step(layers, x0, "plain")
    assert all(g is not None for g in ref)
    base = live_tensor_bytes()
    for mode in _MODES:
        for step in range(2):
            got = _moe_step(layers, x0, mode)
            assert all(l.aux_loss.grad_fn is None for l in layers), mode
            assert all(torch.equal(a, b) for a, b in zip(ref, got)), mode
            del got
            for l in layers:
                l.zero_grad(set_to_none=True)
        assert live_tensor_bytes() <= base, mode


def test_bad_input():
    with pytest.raises(ValueError, match="need 1 <= top_k <= num_experts"):
        MoE(8, 4, 3, 4)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 8\)"):
        MoE(8, 4, 3, 2)(torch.randn(4, 7))
    with pytest.raises(ValueError, match="unknown activation"):
        MoE(8, 4, 3, 2, "tanh")
    with pytest.raises(ValueError, match="unknown recipe"):
        MoE(8, 4, 3, 2, recipe="fp6")


def test_empty_batch_aux_loss_is_zero():
    m = MoE(8, 4, 3, 2)
    x = torch.zeros(0, 8, requires_grad=True)
    y = m(x)
    assert y.shape == (0, 8)
    aux = m.aux_loss
    assert torch.isfinite(aux) and aux.item() == 0
    (y.sum() + aux).backward()
    for p in _params(m):
        assert p.grad is None or torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("x, match", [
    (torch.randn(4, 8, dtype=torch.float64), "x dtype"),
    (torch.randn(4, 8, device="meta"), "x device"),
])
def test_bad_x_dtype_or_device(x, match):
    with pytest.raises(TypeError, match=match):
        MoE(8, 4, 3, 2)(x)


@pytest.mark.parametrize("kw, exc, name", [
    (dict(top_k=2.0), TypeError, "top_k"),
    (dict(num_experts=3.0), TypeError, "num_experts"),
    (dict(hidden_size=8.0), TypeError, "hidden_size"),
    (dict(ffn_hidden_size=0), ValueError, "ffn_hidden_size"),
])
def test_integer_arguments(kw, exc, name):
    args = dict(hidden_size=8, ffn_hidden_size=4, num_experts=3, top_k=2)
    args.update(kw)
    with pytest.raises(exc, match=name):
        MoE(**args)


# ------------------------------------------------------------------ CUDA
@pytest.mark.cuda
def test_cuda_bf16_matches_reference():
    m = MoE(64, 96, 6, 2, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 50, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    y = m(x)
    grads = torch.autograd.grad(y, [x, m.experts.fc1_weight, m.experts.fc2_weight], dy)
    _, _, e_Tk = m.route(x.detach().reshape(-1, 64))
    e_Tk = e_Tk.cpu()

    def run(dtype):
        leaves = [t.detach().cpu().to(dtype).requires_grad_(True) for t in [x] + _params(m)]
        out = moe_loop(*leaves, 2, True, "swiglu", experts_Tk=e_Tk)
        g = torch.autograd.grad(out, [leaves[0], leaves[2], leaves[3]], dy.cpu().to(dtype))
        return [out.detach()] + list(g)

    ours = [t.cpu() for t in (y.detach(),) + grads]
    bound_check(ours, run(torch.bfloat16), run(torch.float64), name="moe bf16")


@pytest.mark.cuda
def test_cuda_no_host_sync():
    """fwd+bwd of GroupedLinear, GroupedMLP and MoE with device splits never sync the host."""
    dev, dt = "cuda", torch.bfloat16
    lin = GroupedLinear(4, 64, 32, device=dev, dtype=dt)
    mlp = GroupedMLP(4, 64, 48, "swiglu", bias=True, device=dev, dtype=dt)
    mlp_fc1 = GroupedMLP(4, 64, 48, "geglu", recompute="fc1", device=dev, dtype=dt)
    moe = MoE(64, 48, 4, 2, device=dev, dtype=dt)
    x = torch.randn(100, 64, device=dev, dtype=dt, requires_grad=True)
    p = torch.rand(100, device=dev, requires_grad=True)
    splits = torch.tensor([30, 0, 50, 20], device=dev)
    short = torch.tensor([30, 0, 40, 20], device=dev)   # unvalidated, sums to 90 < 100

    def step():
        lin(x, splits).sum().backward()
        lin(x, short).sum().backward()
        mlp(x, splits, p).sum().backward()
        mlp(x, short, p).sum().backward()
        mlp_fc1(x, splits, p).sum().backward()
        y = moe(x.view(4, 25, 64))
        y.float().sum().backward()      # the aux loss is attached to y

    step()                      # warm-up: Triton compile, cuBLAS handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad).all() and torch.isfinite(p.grad).all()
