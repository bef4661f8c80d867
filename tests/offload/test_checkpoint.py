"""``offloaded_checkpoint``: non-reentrant semantics, inputs through the offload engine."""
import contextlib
import functools
import gc
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import CheckpointError, checkpoint

from moe_offload.offload import get_cpu_offload_context, offloaded_checkpoint
from tests.offload._helpers import assert_bitwise, forward_stack, live_tensor_bytes


def _grads(x, params):
    return [x.grad] + [p.grad for p in params]


# ------------------------------------------------------------- side-channel outputs
class RoutedBlock(nn.Module):
    """Stand-in for a Hugging Face MoE layer: a forward hook on ``router`` collects its
    logits into a list for a load-balancing loss computed outside the layer."""

    def __init__(self, H=16, E=4):
        super().__init__()
        self.router = nn.Linear(H, E)
        self.fc = nn.Linear(H, H)

    def forward(self, x):
        gate = torch.softmax(self.router(x), -1)
        return x + torch.tanh(self.fc(x)) * gate[:, :1]


def _routed_run(layers, x0, call=None, offload=False):
    logits = []
    handles = [l.router.register_forward_hook(lambda m, i, o: logits.append(o)) for l in layers]
    for l in layers:
        l.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_()
    ctx, sync = get_cpu_offload_context(True, None, len(layers), emulate=True,
                                        min_offload_bytes=0) if offload else (None, None)
    try:
        h = forward_stack(layers, x, ctx, sync, call)
    finally:
        for hd in handles:
            hd.remove()
    aux = sum(torch.softmax(l, -1).mean(0).square().sum() for l in logits[:len(layers)])
    (h.square().mean() + 0.1 * aux).backward()
    return _grads(x, [p for l in layers for p in l.parameters()])


@pytest.mark.parametrize("offload", [False, True])
def test_router_logits_collected_by_a_hook_keep_their_graph(offload):
    """The aux loss built from hook-collected logits trains the router exactly as without
    checkpointing (a no-grad forward gave those logits no graph: wrong router grads)."""
    layers = [RoutedBlock() for _ in range(3)]
    x0 = torch.randn(20, 16)
    ref = _routed_run(layers, x0)
    got = _routed_run(layers, x0, lambda l, h: offloaded_checkpoint(l, h), offload)
    assert_bitwise(ref, got)


# ---------------------------------------------------------- Hugging Face models
def _hf_model(kind):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts_per_tok=2,
                  output_router_logits=True, router_aux_loss_coef=0.1,
                  max_position_embeddings=32, attn_implementation="sdpa")
    torch.manual_seed(0)
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(moe_intermediate_size=16, num_experts=4, **common)
        return transformers.Qwen3MoeForCausalLM(cfg).float().train()
    cfg = transformers.MixtralConfig(num_local_experts=4, **common)
    return transformers.MixtralForCausalLM(cfg).float().train()


def _hf_grads(model, ids, checkpointed):
    model.zero_grad(set_to_none=True)
    layers = model.model.layers
    if checkpointed:   # decoder layers are called with keyword arguments
        for layer in layers:
            layer.forward = functools.partial(offloaded_checkpoint, layer.forward)
    try:
        out = model(input_ids=ids, labels=ids, use_cache=False)
        assert out.aux_loss is not None and out.aux_loss.requires_grad
        out.loss.backward()        # the loss includes router_aux_loss_coef * aux_loss
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_hugging_face_moe_with_router_aux_loss_is_bitwise(kind):
    model = _hf_model(kind)
    ids = torch.randint(0, 64, (2, 8))
    ref = _hf_grads(model, ids, False)
    got = _hf_grads(model, ids, True)
    assert all(g is not None for g in ref)
    assert_bitwise(ref, got)


# -------------------------------------------------------------- arguments
def test_keywords_nested_tensors_and_parameter_only_grads():
    lin = nn.Linear(8, 8)

    def fn(a, pair, *, table, scale=1.0, items=()):
        b, c = pair
        return lin(a * b + table["c"]) * scale + items[0].sin()

    a0, b0, c0, d0 = (torch.randn(4, 8) for _ in range(4))
    res = []
    for ck in (False, True):
        lin.zero_grad(set_to_none=True)
        b = b0.clone().requires_grad_()                  # a tensor inside a tuple
        args = (a0, (b, c0))
        kw = dict(table={"c": c0}, scale=3.0, items=[d0])
        y = offloaded_checkpoint(fn, *args, **kw) if ck else fn(*args, **kw)
        y.square().sum().backward()
        res.append([b.grad, lin.weight.grad, lin.bias.grad])
    assert_bitwise(*res)

    # No argument requires grad: the parameters still get theirs.
    res = []
    for ck in (False, True):
        lin.zero_grad(set_to_none=True)
        y = offloaded_checkpoint(lin, a0) if ck else lin(a0)
        y.sum().backward()
        res.append([lin.weight.grad, lin.bias.grad])
    assert_bitwise(*res)
    with pytest.raises(TypeError, match="fn must be callable"):
        offloaded_checkpoint(3, a0)


def test_under_no_grad_is_a_plain_call():
    lin = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with torch.no_grad():
        y = offloaded_checkpoint(lin, x)
    assert torch.equal(y, lin(x).detach()) and y.grad_fn is None


# ------------------------------------------------------ RNG, autocast, transport
class DropBlock(nn.Module):
    def __init__(self, H=16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(H, 2 * H), nn.Linear(2 * H, H)

    def forward(self, x):
        return self.fc2(torch.dropout(torch.relu(self.fc1(x)), 0.5, True))


@pytest.mark.parametrize("autocast", [False, True])
def test_dropout_rng_and_autocast_replayed(autocast):
    layers = [DropBlock() for _ in range(2)]
    x0 = torch.randn(32, 16)

    def run(ck):
        torch.manual_seed(3)
        for l in layers:
            l.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            h = forward_stack(layers, x, call=(lambda l, t: offloaded_checkpoint(l, t)) if ck else None)
        h.float().square().sum().backward()
        return [h.detach()] + _grads(x, [p for l in layers for p in l.parameters()])

    assert_bitwise(run(False), run(True))


def test_only_the_inputs_travel_through_offload():
    layers = [DropBlock() for _ in range(3)]
    x = torch.randn(32, 16, requires_grad=True)
    stats = {}
    for ck in (False, True):
        ctx, sync = get_cpu_offload_context(True, None, 3, emulate=True, min_offload_bytes=0)
        call = (lambda l, t: offloaded_checkpoint(l, t)) if ck else None
        forward_stack(layers, x, ctx, sync, call).sum().backward()
        stats[ck] = ctx.stats()
    # Each checkpointed layer saves exactly its (32, 16) fp32 input; the last layer (the
    # default num_layers=None keeps it resident) moves nothing.
    assert stats[True]["offloaded_bytes"] == 2 * 32 * 16 * 4
    assert stats[True]["offloaded_tensors"] == 2
    assert stats[False]["offloaded_bytes"] > 4 * stats[True]["offloaded_bytes"]


def test_inputs_not_kept_alive_by_the_checkpoint():
    """Offloaded, the input's device storage is released: nothing but the engine's
    record holds it (no closure keeps the tensor)."""
    w = nn.Parameter(torch.randn(16, 16))
    x = torch.randn(64, 16, requires_grad=True)
    block = DropBlock()
    ctx, sync = get_cpu_offload_context(True, None, 3, emulate=True, min_offload_bytes=0)
    with ctx:
        h = x @ w                     # matmul does not save its output
    h = sync(h)
    ref = weakref.ref(h.untyped_storage())
    with ctx:
        out = offloaded_checkpoint(block, h)
    out = sync(out)
    del h
    with ctx:
        out = out * 2
    out = sync(out)
    gc.collect()
    assert ref() is None
    out.sum().backward()
    assert w.grad is not None


# ------------------------------------------------------------------ errors
def _flaky(shapes):
    """A function whose recomputation differs from its forward (one entry per call)."""
    calls = iter(shapes)

    def fn(x):
        n, keep = next(calls)
        y = x[:keep].sin()                # saves x[:keep]
        for _ in range(n - 1):
            y = y.cos()                   # each saves its input
        return y.sum()
    return fn


@pytest.mark.parametrize("forward, recompute, match", [
    ((2, 4), (1, 4), "fewer tensors"),
    ((1, 4), (1, 3), "differs between the forward and the recomputation"),
])
def test_recompute_mismatch_raises_like_torch(forward, recompute, match):
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(CheckpointError):      # torch's own behaviour, same class
        checkpoint(_flaky([forward, recompute]), x, use_reentrant=False).backward()
    with pytest.raises(CheckpointError, match=match):
        offloaded_checkpoint(_flaky([forward, recompute]), x).backward()


# --------------------------------------------------- nesting, autograd.grad, retain
def test_nested_checkpoints_and_autograd_grad():
    inner, outer_fc = DropBlock(), nn.Linear(16, 16)
    params = list(inner.parameters()) + list(outer_fc.parameters())
    x0 = torch.randn(8, 16)

    def body(ck_inner, t):
        t = torch.tanh(outer_fc(t))
        if ck_inner == "torch":
            t = checkpoint(inner, t, use_reentrant=False)
        else:
            t = offloaded_checkpoint(inner, t) if ck_inner else inner(t)
        return outer_fc(t).sigmoid()

    def run(outer, ck_inner):
        torch.manual_seed(5)
        x = x0.clone().requires_grad_()
        f = functools.partial(body, ck_inner)
        if outer == "ours":
            y = offloaded_checkpoint(f, x)
        elif outer == "torch":
            y = checkpoint(f, x, use_reentrant=False)
        else:
            y = f(x)
        return list(torch.autograd.grad(y.square().sum(), [x] + params))

    ref = run(None, False)
    for outer, ck_inner in (("ours", True), ("ours", False), ("torch", True), (None, True),
                            ("ours", "torch")):
        assert_bitwise(ref, run(outer, ck_inner))


def test_retain_graph_double_backward_and_second_backward_error():
    block = DropBlock()
    params = list(block.parameters())
    x0 = torch.randn(8, 16)

    def run(ck):
        torch.manual_seed(1)
        block.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        loss = (offloaded_checkpoint(block, x) if ck else block(x)).square().sum()
        loss.backward(retain_graph=True)
        first = [t.grad.clone() for t in [x] + params]
        loss.backward()                           # recomputes again: holders were emptied
        out = first + _grads(x, params)
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            loss.backward()
        return out

    assert_bitwise(run(False), run(True))


def test_create_graph_double_backward():
    fc = nn.Linear(16, 16)
    x0 = torch.randn(8, 16)

    def run(ck):
        x = x0.clone().requires_grad_()
        f = lambda t: torch.tanh(fc(t)).square()          # noqa: E731
        y = offloaded_checkpoint(f, x) if ck else f(x)
        (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        return list(torch.autograd.grad(gx.square().sum(), [x, fc.weight, fc.bias]))

    assert_bitwise(run(False), run(True))


def test_nothing_outlives_the_step():
    """Holders, recomputed tensors and the saved inputs go with the graph: the objects
    the outer hooks packed for the inputs die, and live tensor bytes return to the start."""
    class Box:
        def __init__(self, t):
            self.t = t

    packed = weakref.WeakSet()

    def pack(t):
        box = Box(t)
        packed.add(box)
        return box

    layers = [DropBlock() for _ in range(3)]
    x = torch.randn(64, 16)
    before = live_tensor_bytes()
    for _ in range(2):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
            h = forward_stack(layers, x, call=lambda l, t: offloaded_checkpoint(l, t))
        assert len(packed) == 3                  # one input per checkpoint, nothing else
        h.sum().backward()
        del h
        gc.collect()
        assert len(packed) == 0
        for l in layers:
            l.zero_grad(set_to_none=True)
    assert live_tensor_bytes() == before


# ------------------------------------------- custom-function node lifetime (torch 2.11)
@contextlib.contextmanager
def _torch_2_11_node_lifetime():
    """Give custom-function nodes made inside the block the lifetime they have in torch
    2.11, where a node's Python object (``out.grad_fn``) holds the node only weakly: the
    node dies with its outputs and frees its saved tensors, so a later
    ``.saved_tensors`` raises autograd's "backward through the graph a second time"
    (torch 2.13 made the Python object own its node).  Yields ``free_orphans()``, which
    frees the saved tensors of each such node whose outputs are all gone, by running the
    node once without ``retain_graph`` -- the same release."""
    original = torch.autograd.Function.__dict__["apply"]
    records = []

    def apply(cls, *args, **kwargs):
        out = original.__func__(cls, *args, **kwargs)
        outs = [o for o in (out if isinstance(out, tuple) else (out,))
                if isinstance(o, torch.Tensor)]
        node = next((o.grad_fn for o in outs if o.grad_fn is not None), None)
        if node is not None:
            probe = sum(o.sum() for o in outs if o.grad_fn is node)   # the node, not `outs`
            wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            records.append(([weakref.ref(o) for o in outs], probe, wrt))
        return out

    def free_orphans():
        for refs, probe, wrt in records:
            if all(r() is None for r in refs):
                torch.autograd.grad(probe, wrt, allow_unused=True)
        records.clear()

    torch.autograd.Function.apply = classmethod(apply)
    try:
        yield free_orphans
    finally:
        torch.autograd.Function.apply = original


@pytest.mark.parametrize("offload", [False, True])
def test_saved_inputs_outlive_the_saver_output_torch_2_11(offload):
    """GPU run on torch 2.11: every backward through ``offloaded_checkpoint`` raised
    "backward through the graph a second time" reading the saved inputs, because the
    frame kept only the saver's ``grad_fn`` and the node died with the saver's output.
    With 2.11's node lifetime emulated, grads are bitwise those of the plain run, also
    for a second backward (``retain_graph``) and a partial ``autograd.grad``."""
    layers = [DropBlock() for _ in range(3)]
    params = [p for l in layers for p in l.parameters()]
    x0 = torch.randn(32, 16)

    def run(ck):
        torch.manual_seed(3)
        x = x0.clone().requires_grad_()
        ctx, sync = get_cpu_offload_context(True, None, 3, emulate=True,
                                            min_offload_bytes=0) if offload else (None, None)
        with _torch_2_11_node_lifetime() as free_orphans:
            call = (lambda l, t: offloaded_checkpoint(l, t)) if ck else None
            h = forward_stack(layers, x, ctx, sync, call)
            free_orphans()
            loss = h.square().sum()
            partial = torch.autograd.grad(loss, params[-2:], retain_graph=True)
            first = torch.autograd.grad(loss, [x] + params, retain_graph=True)
            return list(partial) + list(first) + list(torch.autograd.grad(loss, [x] + params))

    assert_bitwise(run(False), run(True))


def test_parameter_only_branch_and_a_grad_that_never_reaches_the_inputs():
    """Nodes of ``fn`` whose saved tensors come from parameters only, run first (a grad
    for those parameters alone, which runs no node between the output and the inputs):
    the recomputation still finds the inputs, here and in a full backward after it."""
    w, v = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8))
    x0 = torch.randn(4, 8)

    def fn(x):
        return (x @ w).sin() + torch.tanh(v) * v.exp()

    def run(ck):
        x = x0.clone().requires_grad_()
        with _torch_2_11_node_lifetime() as free_orphans:
            y = offloaded_checkpoint(fn, x) if ck else fn(x)
            free_orphans()
            loss = y.square().sum()
            return (list(torch.autograd.grad(loss, [v], retain_graph=True))
                    + list(torch.autograd.grad(loss, [x, w, v])))

    assert_bitwise(run(False), run(True))


# -------------------------------------------------------------------- CUDA
@pytest.mark.cuda
def test_cuda_moe_stack_offload_plus_checkpoint_bitwise_and_only_inputs_move():
    """On the GPU: dropout (CUDA RNG replay), MoE with its attached aux loss, real
    streams; each offloaded layer moves exactly its input."""
    import moe_offload

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = moe_offload.MoE(256, 512, 8, 2, device="cuda", dtype=torch.bfloat16)

        def forward(self, x):
            return x + torch.dropout(self.moe(x), 0.1, True)

    torch.manual_seed(0)
    layers = [Layer() for _ in range(4)]
    params = [p for l in layers for p in l.parameters()]
    x0 = torch.randn(2048, 256, device="cuda", dtype=torch.bfloat16)

    def run(mode):
        torch.manual_seed(11)
        for p in params:
            p.grad = None
        x = x0.clone().requires_grad_()
        ctx = sync = None
        if mode != "plain":
            ctx, sync = get_cpu_offload_context(True, 3, 4, min_offload_bytes=0)
        call = (lambda l, t: offloaded_checkpoint(l, t)) if mode == "ckpt" else None
        h = forward_stack(layers, x, ctx, sync, call)
        h.float().square().mean().backward()
        torch.cuda.synchronize()
        return [x.grad] + [p.grad for p in params], ctx

    ref, _ = run("plain")
    got, ctx = run("ckpt")
    assert_bitwise(ref, got)
    assert ctx.stats()["offloaded_bytes"] == 3 * x0.numel() * x0.element_size()
