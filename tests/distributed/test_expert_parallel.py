"""Expert-parallel ``MoE`` against the single-process ``MoE`` holding every expert.

Each case spawns 2 or 4 gloo ranks on CPU (one thread each); the ``cuda`` variants run
the same workers with NCCL on one GPU (world size 1).

What "equal" means (float32), the claim stated in ``expert_parallel.py``:

- **bitwise**, against the single-process ``MoE`` on the concatenation of all ranks'
  tokens *whose router runs on each rank's rows separately* (:class:`RowBlockRouter`):
  outputs, input grads, expert weight grads, and each rank's router weight grad (equal to
  that of its own block's router).  The router is the only GEMM whose rows differ
  between the two runs (a rank's rows vs the whole batch); everything after it is
  row-invariant (each expert sees the same rows in the same order, see
  ``expert_parallel.py``);
- **to rounding**, against the plain single-process ``MoE`` (router on the whole batch):
  a GEMM over a subset of rows need not give the bits it gives inside the whole batch
  (it does not on some x86 CPUs), so outputs and grads match to ``1e-5`` relative, and
  the router grads summed over ranks (what data parallelism does) to ``1e-6``;
- the aux loss is per rank (local-batch statistics, Megatron's default): bitwise the
  single-process ``MoE`` on that rank's tokens, value and router gradient.
"""
import warnings

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from moe_offload.ops import MoE

from ._harness import device_for, spawn

H, F, K = 8, 6, 2


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal`` where NaNs in the same places count as equal."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])


def _token_counts(world: int, case: str):
    if case == "empty_rank":              # the last rank has no tokens at all
        return [5 + 3 * r for r in range(world - 1)] + [0]
    return [5 + 3 * r for r in range(world)]


def build_pair(world: int, num_experts: int, device, seed: int = 0):
    """The single-process MoE with every expert and this rank's EP MoE, same weights.

    ``aux_loss_coef=0``: the aux loss is per rank (see the module docstring), so the
    output/grad comparisons leave it out, whether it is read from ``moe.aux_loss`` or
    attached to the output; :func:`_check_aux_loss` compares it on its own."""
    torch.manual_seed(seed)
    ref = MoE(H, F, num_experts, K, device=device, aux_loss_coef=0.0)
    ep = MoE(H, F, num_experts, K, device=device, ep_group=dist.group.WORLD, aux_loss_coef=0.0)
    with torch.no_grad():
        ep.router.weight.copy_(ref.router.weight)
        sl = slice(ep.local_experts.start, ep.local_experts.stop)
        ep.experts.fc1_weight.copy_(ref.experts.fc1_weight[sl])
        ep.experts.fc2_weight.copy_(ref.experts.fc2_weight[sl])
    return ref, ep


class RowBlockRouter(nn.Module):
    """A router (bias-free linear) applied to each block of ``counts`` rows on its own --
    the rows each rank routes -- with one leaf copy of the weight per block, so block
    ``r``'s weight gradient is rank ``r``'s router gradient.  Each block is a fresh copy,
    as a rank's own input is."""

    def __init__(self, weight: torch.Tensor, counts):
        super().__init__()
        self.counts = list(counts)
        self.weights = nn.ParameterList(nn.Parameter(weight.detach().clone()) for _ in counts)

    @property
    def weight(self) -> torch.Tensor:
        """Block 0's weight (``MoE`` reads the router weight's dtype and device)."""
        return self.weights[0]

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        blocks = x_TH.split(self.counts)
        return torch.cat([nn.functional.linear(b.clone(), w) for b, w in zip(blocks, self.weights)])

    def block_grad(self, r: int) -> torch.Tensor:
        g = self.weights[r].grad
        return torch.zeros_like(self.weights[r]) if g is None else g


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _inputs(world: int, case: str, device, ref):
    counts = _token_counts(world, case)
    gen = torch.Generator().manual_seed(1)
    x_all = torch.randn(sum(counts), H, generator=gen)
    g_all = torch.randn(sum(counts), H, generator=gen)
    if case == "skewed":
        # Every token picks experts 0 and 1 (both on rank 0): the other experts are empty
        # and the other ranks receive no tokens.
        x_all = x_all.abs()
        with torch.no_grad():
            ref.router.weight.zero_()
            ref.router.weight[0] = 1.0
            ref.router.weight[1] = 0.5
    return counts, x_all.to(device), g_all.to(device)


def equivalence_worker(rank: int, world: int, backend: str, num_experts: int, case: str):
    device = device_for(backend)
    ref, ep = build_pair(world, num_experts, device)
    counts, x_all, g_all = _inputs(world, case, device, ref)
    with torch.no_grad():
        ep.router.weight.copy_(ref.router.weight)
    assert ep.experts.fc1_weight.shape[0] == num_experts // world
    assert ep.local_experts == range(rank * num_experts // world, (rank + 1) * num_experts // world)
    start = sum(counts[:rank])
    mine = slice(start, start + counts[rank])
    sl = slice(ep.local_experts.start, ep.local_experts.stop)
    # The reference whose router sees the rows each rank sees (the claim's condition).
    rows = copy.deepcopy(ref)
    rows.router = RowBlockRouter(ref.router.weight, counts)

    def run(model):
        x = x_all.clone().requires_grad_(True)
        y = model(x)
        (y * g_all).sum().backward()
        return y.detach(), x.grad

    y_ref, gx_ref = run(ref)                 # single process, router on the whole batch
    y_rows, gx_rows = run(rows)              # single process, router on each rank's rows
    x = x_all[mine].clone().requires_grad_(True)
    y = ep(x)
    (y * g_all[mine]).sum().backward()

    # Bitwise: everything after the router is row-invariant.
    assert torch.equal(y, y_rows[mine]), (rank, (y - y_rows[mine]).abs().max())
    assert torch.equal(x.grad, gx_rows[mine])
    assert torch.equal(ep.experts.fc1_weight.grad, rows.experts.fc1_weight.grad[sl])
    assert torch.equal(ep.experts.fc2_weight.grad, rows.experts.fc2_weight.grad[sl])
    assert torch.equal(ep.router.weight.grad, rows.router.block_grad(rank))
    # To rounding: the router GEMM on the whole batch.
    assert _rel_err(y, y_ref[mine]) <= 1e-5
    assert _rel_err(x.grad, gx_ref[mine]) <= 1e-5
    assert _rel_err(ep.experts.fc1_weight.grad, ref.experts.fc1_weight.grad[sl]) <= 1e-5
    assert _rel_err(ep.experts.fc2_weight.grad, ref.experts.fc2_weight.grad[sl]) <= 1e-5
    router_sum = ep.router.weight.grad.clone()
    dist.all_reduce(router_sum, group=dist.group.WORLD)
    assert _rel_err(router_sum, ref.router.weight.grad) <= 1e-6

    _check_aux_loss(ref, ep, x_all[mine])


def _check_aux_loss(ref, ep, x_mine):
    """Aux loss: local-batch statistics, bitwise the single-process MoE on my tokens, in
    value and in the router gradient it sends.  Works whether ``moe.aux_loss`` carries
    its graph (to be added to the loss) or the loss is attached to the output (then
    ``moe.aux_loss`` is a detached value and back-propagating the output trains it)."""
    grads = []
    for m in (ref, ep):
        m.zero_grad()
        m.aux_loss_coef = 1e-2
        y = m(x_mine)
        loss = (y * 0).sum()
        if m.aux_loss.requires_grad:
            loss = loss + m.aux_loss
        loss.backward()
        m.aux_loss_coef = 0.0
        grads.append((m.aux_loss.detach(), m.router.weight.grad.clone()))
    (aux_ref, g_ref), (aux_ep, g_ep) = grads
    assert same_bits(aux_ep, aux_ref)                  # no tokens: NaN or 0 on both
    assert same_bits(g_ep, g_ref)
    assert g_ref.abs().sum() > 0 or x_mine.shape[0] == 0


CASES = ("uneven", "skewed", "empty_rank")


def cases_worker(rank: int, world: int, backend: str, num_experts: int, cases):
    """All cases in one spawn (starting processes dominates the test time)."""
    for case in cases:
        equivalence_worker(rank, world, backend, num_experts, case)


@pytest.mark.parametrize("world, num_experts", [(2, 4), (4, 8)])
def test_matches_single_process(tmp_path, world, num_experts):
    """Uneven routing, empty experts + ranks receiving nothing, a rank with no tokens:
    bitwise the single-process MoE with the router on each rank's rows, to rounding the
    one with the router on the whole batch (module docstring)."""
    spawn(world, cases_worker, tmp_path, "gloo", num_experts, CASES)


@pytest.mark.cuda
def test_matches_single_process_nccl(tmp_path):
    spawn(1, cases_worker, tmp_path, "nccl", 4, ("uneven", "skewed"), backend="nccl")


# ---------------------------------------------------------------------------- host sync
_HOST_READS = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
_MOE_FILES = ("moe.py", "expert_parallel.py")


def _count_host_reads(counter: dict):
    """Wrap the tensor methods that read device data on the host; count the calls made
    directly from the MoE files (the CPU grouped-GEMM fallback reads its offsets on the
    host by design: free on CPU, and not the path taken on CUDA)."""
    import sys
    originals = {}
    for name in _HOST_READS:
        orig = getattr(torch.Tensor, name)
        originals[name] = orig

        def wrapper(self, *a, _orig=orig, **kw):
            caller = sys._getframe(1).f_code.co_filename
            if caller.endswith(_MOE_FILES):
                counter["n"] += 1
            return _orig(self, *a, **kw)
        setattr(torch.Tensor, name, wrapper)
    return originals


def sync_worker(rank: int, world: int, backend: str):
    device = device_for(backend)
    ref, ep = build_pair(world, 4, device)
    x = torch.randn(7 + rank, H, device=device, requires_grad=True)
    if backend == "nccl":
        ep(x).sum().backward()          # warm-up: NCCL communicator set-up, lazy inits
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as fwd:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            y = ep(x)
            torch.cuda.set_sync_debug_mode(0)
        with warnings.catch_warnings(record=True) as bwd:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            y.sum().backward()
            torch.cuda.set_sync_debug_mode(0)
        # torch's own "debug mode is a prototype feature" notice is not a sync
        def is_sync(w):
            return "called a synchronizing CUDA operation" in str(w.message)
        syncs = [str(w.message) for w in fwd if is_sync(w)]
        assert len(syncs) == 1, syncs
        assert not [w for w in bwd if is_sync(w)]
        return
    counter = {"n": 0}
    originals = _count_host_reads(counter)
    try:
        y = ep(x)
        assert counter["n"] == 1, counter       # host_split_sizes: one tolist per forward
        counter["n"] = 0
        y.sum().backward()
        assert counter["n"] == 0, counter       # backward reuses the forward's ints
        ref(x).sum().backward()
        assert counter["n"] == 0, counter       # the single-process MoE never reads back
    finally:
        for name, orig in originals.items():
            setattr(torch.Tensor, name, orig)


def test_one_host_sync_per_forward(tmp_path):
    spawn(2, sync_worker, tmp_path, "gloo")


@pytest.mark.cuda
def test_one_host_sync_per_forward_nccl(tmp_path):
    spawn(1, sync_worker, tmp_path, "nccl", backend="nccl")


# ------------------------------------------------------------------------------- errors
def indivisible_worker(rank: int, world: int):
    with pytest.raises(ValueError, match="num_experts=3 must be divisible"):
        MoE(H, F, 3, 1, ep_group=dist.group.WORLD)
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        MoE(H, F, 4, 1, ep_group=dist.group.WORLD, capacity_factor=0.0)
    # The experts module on its own: rows grouped by global expert, host split sizes.
    from moe_offload.ops import GroupedMLP
    from moe_offload.ops.expert_parallel import ExpertParallelMLP
    torch.manual_seed(0)
    full = GroupedMLP(4, H, F)
    mlp = ExpertParallelMLP(4, H, F, group=dist.group.WORLD)
    with torch.no_grad():
        sl = slice(mlp.local_experts.start, mlp.local_experts.stop)
        mlp.fc1_weight.copy_(full.fc1_weight[sl])
        mlp.fc2_weight.copy_(full.fc2_weight[sl])
    splits = [2, 0, 3 + rank, 1]
    x = torch.randn(sum(splits), H)
    y = mlp(x, splits)
    ref = full(x, splits)
    assert y.shape == ref.shape and (y - ref).abs().max() <= 1e-6 * ref.abs().max()
    with pytest.raises(ValueError, match="4 global expert offsets"):
        mlp.forward_offsets(x, torch.tensor([6], dtype=torch.int32))


def test_num_experts_not_divisible_and_experts_module(tmp_path):
    spawn(2, indivisible_worker, tmp_path)


def test_ep_group_needs_initialized_distributed():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        MoE(H, F, 4, 1, ep_group=object())


def test_no_group_holds_every_expert():
    m = MoE(H, F, 4, 2)
    assert m.local_experts == range(4) and m.experts.fc1_weight.shape[0] == 4


# ------------------------------------------------------------------------ offload + EP
def offload_worker(rank: int, world: int, backend: str):
    from moe_offload import offload_module_list
    from ._models import Stack
    device = device_for(backend)
    emulate = backend != "nccl"
    for case in ("uneven", "skewed"):
        torch.manual_seed(0)
        model = Stack(3, H, F, 2 * world, K, ep_group=dist.group.WORLD, device=device)
        if case == "skewed":      # every token to experts 0, 1: other ranks receive nothing
            with torch.no_grad():
                for blk in model.blocks:
                    blk.moe.router.weight.zero_()
                    blk.moe.router.weight[0] = 1.0
                    blk.moe.router.weight[1] = 0.5
        torch.manual_seed(1 + rank)
        x = torch.randn(2, 4 + 3 * rank, H, device=device)
        if case == "skewed":
            x = x.abs()
        params = list(model.parameters())

        def step():
            y = model(x)
            loss = (y * y).sum() + model.aux_loss()
            return [y.detach()] + list(torch.autograd.grad(loss, params))

        plain = step()
        handle = offload_module_list(model.blocks, num_layers=3, min_offload_bytes=0,
                                     emulate=emulate)
        try:
            moved = step()
            stats = handle.stats()
        finally:
            handle.remove()
        for a, b in zip(plain, moved):
            assert torch.equal(a, b), case
        assert stats["offloaded_tensors"] > 0 and stats["reloaded_bytes"] >= stats["offloaded_bytes"]


def checkpoint_worker(rank: int, world: int, backend: str):
    """Offload + recompute under EP: the recomputation in backward repeats the forward's
    all-to-alls (same order on every rank); grads bitwise those of the plain run."""
    import warnings as _warnings
    from torch.utils.checkpoint import checkpoint
    from moe_offload import get_cpu_offload_context, offloaded_checkpoint
    from ._models import Stack
    device = device_for(backend)
    torch.manual_seed(0)
    model = Stack(2, H, F, 2 * world, K, ep_group=dist.group.WORLD, device=device)
    torch.manual_seed(1 + rank)
    x0 = torch.randn(3 + 2 * rank, H, device=device)
    params = list(model.parameters())

    def grads(mode):
        x = x0.clone().requires_grad_(True)
        ctx, sync = get_cpu_offload_context(True, num_layers=2, model_layers=2, min_offload_bytes=0,
                                            emulate=backend != "nccl")
        h = x
        for blk in model.blocks:
            if mode == "plain":
                h = blk(h)
                continue
            with ctx:
                if mode == "offloaded_checkpoint":
                    h = offloaded_checkpoint(blk, h)
                else:
                    h = checkpoint(blk, h, use_reentrant=False)
            h = sync(h)
        model.zero_grad(set_to_none=True)
        # .backward(), not autograd.grad: under the reentrant-style offloaded_checkpoint
        # the parameters join the graph only during the recomputation.
        (h * h).sum().backward()
        return [x.grad] + [p.grad.clone() for p in params]

    plain = grads("plain")
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore")         # aux_loss is None under offloaded_checkpoint
        for mode in ("offloaded_checkpoint", "torch_checkpoint"):
            for a, b in zip(plain, grads(mode)):
                assert torch.equal(a, b), mode


def test_offload_and_recompute_under_ep_is_bitwise(tmp_path):
    spawn(2, checkpoint_worker, tmp_path, "gloo")


@pytest.mark.cuda
def test_offload_and_recompute_under_ep_is_bitwise_nccl(tmp_path):
    spawn(1, checkpoint_worker, tmp_path, "nccl", backend="nccl")


@pytest.mark.parametrize("world", [2, 4])
def test_offload_under_ep_is_bitwise(tmp_path, world):
    spawn(world, offload_worker, tmp_path, "gloo")


@pytest.mark.cuda
def test_offload_under_ep_is_bitwise_nccl(tmp_path):
    spawn(1, offload_worker, tmp_path, "nccl", backend="nccl")


# ------------------------------------------------------------------------ capacity mode
def _swiglu_mlp(x_H, w1_XH, w2_HF):
    a, b = (w1_XH @ x_H).chunk(2)
    return w2_HF @ (torch.nn.functional.silu(a) * b)


def capacity_worker(rank: int, world: int, backend: str):
    """No host read at all; equal to the dropless MoE when nothing is dropped; with drops,
    equal (float64 reference, 1e-5) to the MoE that skips each expert's copies past ``C``
    per source rank, in token order."""
    from moe_offload.ops.expert_parallel import expert_capacity
    device = device_for(backend)
    E, T = 2 * world, 6
    ref, ep = build_pair(world, E, device)
    sl = slice(ep.local_experts.start, ep.local_experts.stop)
    gen = torch.Generator().manual_seed(3)
    x_all = torch.randn(world * T, H, generator=gen).to(device)
    g_all = torch.randn(world * T, H, generator=gen).to(device)
    mine = slice(rank * T, (rank + 1) * T)
    counter = {"n": 0}
    if backend == "nccl":
        ep(x_all[mine]).sum().backward()      # warm-up (NCCL set-up) outside the sync check
    for factor in (float(E), 0.5):              # C >= T*k: nothing dropped; then drops
        ep.experts.capacity_factor = factor
        ep.zero_grad()
        x = x_all[mine].clone().requires_grad_(True)
        originals = _count_host_reads(counter) if backend != "nccl" else {}
        if backend == "nccl":
            torch.cuda.set_sync_debug_mode("error")     # any sync raises
        try:
            y = ep(x)
            (y * g_all[mine]).sum().backward()
        finally:
            if backend == "nccl":
                torch.cuda.set_sync_debug_mode(0)
            for name, orig in originals.items():
                setattr(torch.Tensor, name, orig)
        assert counter["n"] == 0, counter
        C = expert_capacity(T * K, E, factor)
        if factor >= E:                          # no drop: the single-process dropless MoE
            ref.zero_grad()
            x_ref = x_all.clone().requires_grad_(True)
            (ref(x_ref) * g_all).sum().backward()
            pairs = [(y, ref(x_all)[mine]), (x.grad, x_ref.grad[mine]),
                     (ep.experts.fc1_weight.grad, ref.experts.fc1_weight.grad[sl]),
                     (ep.experts.fc2_weight.grad, ref.experts.fc2_weight.grad[sl])]
            tol = 1e-6
        else:                                    # float64 loop over the kept copies
            w1 = ref.experts.fc1_weight.detach().double().requires_grad_(True)
            w2 = ref.experts.fc2_weight.detach().double().requires_grad_(True)
            loss, y_mine, dropped = 0.0, None, 0
            for r in range(world):
                xr = x_all[r * T:(r + 1) * T]
                with torch.no_grad():
                    _, p_Tk, e_Tk = ref.route(xr)
                seen = [0] * E
                rows = []
                for t in range(T):
                    acc = torch.zeros(H, dtype=torch.float64, device=device)
                    for j in range(K):
                        e = int(e_Tk[t, j])
                        if seen[e] < C:
                            acc = acc + float(p_Tk[t, j]) * _swiglu_mlp(xr[t].double(), w1[e], w2[e])
                        else:
                            dropped += 1
                        seen[e] += 1
                    rows.append(acc)
                yr = torch.stack(rows)
                loss = loss + (yr * g_all[r * T:(r + 1) * T].double()).sum()
                if r == rank:
                    y_mine = yr.detach()
            assert dropped > 0
            loss.backward()
            pairs = [(y, y_mine), (ep.experts.fc1_weight.grad, w1.grad[sl]),
                     (ep.experts.fc2_weight.grad, w2.grad[sl])]
            tol = 1e-5
        for a, b in pairs:
            scale = b.abs().max().clamp_min(1e-30)
            assert ((a.double() - b.double()).abs().max() / scale) <= tol, (factor, a, b)


@pytest.mark.parametrize("world", [2, 4])
def test_capacity_mode_needs_no_sync(tmp_path, world):
    spawn(world, capacity_worker, tmp_path, "gloo")


@pytest.mark.cuda
def test_capacity_mode_needs_no_sync_nccl(tmp_path):
    spawn(1, capacity_worker, tmp_path, "nccl", backend="nccl")


def test_capacity_factor_needs_ep_group():
    with pytest.raises(ValueError, match="capacity_factor applies to expert parallelism"):
        MoE(H, F, 4, 1, capacity_factor=1.0)


def test_expert_capacity():
    from moe_offload.ops.expert_parallel import expert_capacity
    assert expert_capacity(12, 4, 1.0) == 3              # 12 copies over 4 experts
    assert expert_capacity(12, 4, 1.25) == 4             # ceil(3.75)
    assert expert_capacity(0, 4, 1.0) == 1               # never 0 rows
