"""Expert parallelism: token dispatch and combine over ``torch.distributed`` all-to-all.

Shape legend: ``T`` local tokens, ``H`` hidden, ``k`` top-k, ``S = T*k`` local token
copies ("slots"), ``E`` experts in the model, ``W`` ranks of the expert-parallel group,
``L = E / W`` experts per rank, ``R`` rows this rank receives (copies from every rank
routed to one of its ``L`` experts).

Rank ``r`` holds the global experts ``[r*L, (r+1)*L)``.  The router is replicated, so
each rank routes its own tokens and sorts their copies by global expert exactly as the
single-process ``MoE`` does (stable: expert, then token).  ``MoE(ep_group=...)``'s
``experts`` is an :class:`ExpertParallelMLP`: a ``GroupedMLP`` holding this rank's
``L`` experts whose ``forward_offsets`` takes the sorted copies for all ``E`` global
experts and returns their outputs in the same order (:func:`ep_expert_outputs`), so
``MoE`` combines them as usual.  In between:

1. The copies for rank ``q`` form one contiguous block.  ``counts_E`` (copies per
   global expert) come from the end offsets ``offs_E``, on the device.
2. ``all_to_all_single`` of ``counts_E`` (``L`` counts to each rank):
   ``recv_WL[s, l]`` = copies rank ``s`` sends to local expert ``l``.
3. **The one host sync.**  ``all_to_all_single`` with uneven splits takes the split
   sizes as host ints, so the per-rank totals of ``counts_E`` and ``recv_WL`` are read
   back once per forward (:func:`host_split_sizes`, one ``tolist`` of ``2W`` ints).
   Backward reuses these ints: it never syncs.  Megatron-style capacity (a fixed number
   of rows per expert, padding or dropping the rest) avoids the read because every split
   is then a constant (below, and the README).
4. ``all_to_all_single`` of the copies and of their router probs (uneven splits).  The
   received buffer is ordered by source rank, then local expert; a stable sort by local
   expert regroups it to (local expert, source rank, token) order, deterministically.
   For one expert this is exactly the order in which the single-process ``MoE`` on the
   concatenation of all ranks' tokens sees its rows, so each expert's GEMMs get the same
   operands as in that run (see "Bitwise equality" below).
5. ``GroupedMLP`` on the ``L`` local groups (probs applied inside it, as in ``MoE``).
6. Un-regroup and ``all_to_all_single`` back (splits swapped): the outputs arrive in
   the sorted order the copies left in.

Backward mirrors every step: each all-to-all is an autograd function whose backward is
the all-to-all with the splits swapped, and every permutation's backward is its inverse
permutation (gather/scatter with unique indices: no float atomics, deterministic).  The
all-to-all functions save nothing; what backward needs is what ``GroupedMLP`` saves (its
regrouped input, fc1 output, probs, offsets) plus an int64 order, so under an offload
context these buffers are offloaded like any activation.

**Capacity mode** (``MoE(capacity_factor=c)``, :func:`ep_expert_outputs_capacity`): no
host sync at all.  Each expert takes at most ``C = ceil(c * T * k / E)`` copies from each
rank (the first ``C`` in token order; the rest are dropped: they add nothing to the
output and get no gradient); the send buffer is a fixed ``(E, C, H)`` block, zero-padded,
so every all-to-all split is the constant ``L * C`` and no count is exchanged.  Padded
rows carry probability 0, so they add exact zeros to outputs and weight gradients.
Every rank must then pass the same number of tokens ``T`` (equal ``C`` everywhere).

**Bitwise equality with one process.**  Compare with the single-process ``MoE`` (every
expert, same weights) run on the concatenation of all ranks' tokens in rank order:

- Outputs, input gradients and expert weight gradients are bitwise equal **when the
  router logits are**, i.e. when that process evaluates its router on each rank's rows
  separately (``cat_r(router(x_r))``); each rank's router weight gradient is then bitwise
  the gradient of its own block's router.  Everything after the router is row-invariant:
  softmax, top-k and normalization act on one row at a time, both sorts are stable, each
  expert's GEMMs see the same rows in the same order (step 4), and the ``k`` copies of a
  token are summed in slot order.
- Against the router evaluated on the whole batch at once, EP is equal **to rounding
  only**: the router is a GEMM over the rank's ``T`` rows, and a GEMM over a subset of
  rows need not give the bits it gives for those rows inside the whole batch (BLAS
  kernels choose blocking and vectorization by the row count: a 2-core Xeon gave
  differences of 7.45e-09 in float32).  A few ulp in the logits move the probs by as
  much and could flip a top-k choice only at a near-tie.  The router gradients summed
  over ranks (what data parallelism's all-reduce does) equal the whole-batch gradient up
  to summation order.
- The aux loss uses each rank's local batch statistics (Megatron's default): bitwise the
  single-process ``MoE`` on that rank's tokens.

Every rank must call the layer the same number of times in the same order (the
collectives pair up across ranks); autograd runs the backward collectives in the
reverse order of the forward on every rank, as the graphs have the same structure.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .grouped_mlp import GroupedMLP

__all__ = ["ExpertParallelMLP", "make_experts", "local_expert_range", "host_split_sizes",
           "all_to_all", "ep_expert_outputs", "ep_expert_outputs_capacity", "expert_capacity"]


def local_expert_range(num_experts: int, ep_group) -> range:
    """Global expert ids held by this rank: ``range(r*E/W, (r+1)*E/W)`` (all with no group).

    Raises ``ValueError`` when ``num_experts`` is not a multiple of the group size, and
    ``RuntimeError`` when ``torch.distributed`` is not initialized.
    """
    if ep_group is None:
        return range(num_experts)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("MoE(ep_group=...) needs torch.distributed to be initialized "
                           "(torch.distributed.init_process_group)")
    world, rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    if rank < 0:
        raise ValueError("MoE(ep_group=...): this process is not a member of ep_group")
    if num_experts % world != 0:
        raise ValueError(f"num_experts={num_experts} must be divisible by the ep_group size "
                         f"{world} (each rank holds num_experts // world experts)")
    per_rank = num_experts // world
    return range(rank * per_rank, (rank + 1) * per_rank)


def host_split_sizes(send_W: torch.Tensor, recv_W: torch.Tensor) -> Tuple[List[int], List[int]]:
    """Read the all-to-all split sizes back to the host: **the one host sync** of the
    expert-parallel forward (a single device-to-host copy of ``2W`` ints)."""
    both = torch.cat([send_W, recv_W]).tolist()
    world = send_W.numel()
    return both[:world], both[world:]


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with host split sizes; backward sends the gradient back
    along the same routes (splits swapped).  Saves no tensor."""

    @staticmethod
    def forward(ctx, x, out_splits: Sequence[int], in_splits: Sequence[int], group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _exchange(x.contiguous(), out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad.contiguous(), ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def _exchange(x: torch.Tensor, out_splits, in_splits, group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, list(out_splits), list(in_splits), group=group)
    return out


def all_to_all(x: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int],
               group=None) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` along dim 0: send ``in_splits[q]`` rows of
    ``x`` to rank ``q``, receive ``out_splits[s]`` rows from rank ``s`` (host ints)."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


class _ScatterRows(torch.autograd.Function):
    """``out[idx[i]] = x[i]`` into ``n`` zero rows (``idx`` unique); backward gathers."""

    @staticmethod
    def forward(ctx, x, idx, n: int):
        ctx.save_for_backward(idx)
        return x.new_zeros((n,) + tuple(x.shape[1:])).index_copy_(0, idx, x)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return grad.index_select(0, idx), None, None


class _GatherRows(torch.autograd.Function):
    """``buf[idx]`` (``idx`` unique); backward scatters into zeros (no atomics)."""

    @staticmethod
    def forward(ctx, buf, idx):
        ctx.save_for_backward(idx)
        ctx.n = buf.shape[0]
        return buf.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return grad.new_zeros((ctx.n,) + tuple(grad.shape[1:])).index_copy_(0, idx, grad), None


def _counts(offs_N: torch.Tensor) -> torch.Tensor:
    """Group sizes (int64) from int end offsets, on the device."""
    offs_N = offs_N.long()
    return torch.diff(offs_N, prepend=offs_N.new_zeros(1))


def ep_expert_outputs(xs_SH: torch.Tensor, ps_S: torch.Tensor, offs_E: torch.Tensor, experts,
                      group, capacity_factor: Optional[float] = None) -> torch.Tensor:
    """Expert outputs of the copies ``xs_SH`` -> ``(S, H)``, the same order.

    ``xs_SH``: this rank's token copies sorted by global expert (stable), ``ps_S`` their
    router probs (or None), ``offs_E`` the int end offsets of the ``E`` global experts
    (exactly what ``MoE`` hands its experts).  ``experts`` is this rank's
    ``GroupedMLP`` of ``E // W`` experts (its own ``forward_offsets`` runs them).  Dropless (one host sync) unless ``capacity_factor`` is given
    (:func:`ep_expert_outputs_capacity`, no sync).
    """
    if capacity_factor is not None:
        return ep_expert_outputs_capacity(xs_SH, ps_S, offs_E, experts, group, capacity_factor)
    world = dist.get_world_size(group)
    L = offs_E.numel() // world
    # 1.-2. Counts per global expert; recv_WL[s, l] = copies rank s sends to my expert l.
    counts_E = _counts(offs_E)
    recv_WL = torch.empty_like(counts_E)
    dist.all_to_all_single(recv_WL, counts_E, group=group)
    recv_WL = recv_WL.view(world, L)
    # 3. The one host sync: split sizes for the token all-to-all.
    send_splits, recv_splits = host_split_sizes(counts_E.view(world, L).sum(1), recv_WL.sum(1))
    R = sum(recv_splits)
    # 4. Dispatch copies and their probs; regroup by local expert (stable).
    x_RH = all_to_all(xs_SH, recv_splits, send_splits, group)
    p_R = None if ps_S is None else all_to_all(ps_S, recv_splits, send_splits, group)
    local_WL = torch.arange(L, device=xs_SH.device).repeat(world)
    expert_R = torch.repeat_interleave(local_WL, recv_WL.reshape(-1), output_size=R)
    regroup_R = torch.argsort(expert_R, stable=True)
    offs_L = torch.cumsum(recv_WL.sum(0), 0).to(torch.int32)
    xg_RH = _GatherRows.apply(x_RH, regroup_R)
    pg_R = None if p_R is None else p_R.index_select(0, regroup_R)
    # 5. Local experts (every received row belongs to one of them: covered).
    yg_RH = GroupedMLP.forward_offsets(experts, xg_RH, offs_L, pg_R, covered=True)
    # 6. Un-regroup and send back.
    y_RH = _ScatterRows.apply(yg_RH, regroup_R, R)
    return all_to_all(y_RH, send_splits, recv_splits, group)


# ------------------------------------------------------------------------ capacity mode
def expert_capacity(num_copies: int, num_experts: int, capacity_factor: float) -> int:
    """Copies each expert accepts from one rank: ``ceil(capacity_factor * S / E)`` (>= 1),
    ``S = T * k`` the rank's token copies."""
    return max(1, math.ceil(capacity_factor * num_copies / num_experts))


def ep_expert_outputs_capacity(xs_SH: torch.Tensor, ps_S: torch.Tensor, offs_E: torch.Tensor,
                               experts, group, capacity_factor: float) -> torch.Tensor:
    """Like :func:`ep_expert_outputs` with fixed per-expert capacity: no host sync;
    dropped copies get a zero output.

    Shapes: ``C`` capacity, ``B = E*C`` rows of the send buffer (expert-major, so rank
    ``q``'s experts are one contiguous block of ``L*C`` rows).
    """
    world = dist.get_world_size(group)
    (S, H), E = xs_SH.shape, offs_E.numel()
    L, C = E // world, expert_capacity(S, E, capacity_factor)
    B = E * C
    offs_E = offs_E.long()
    rows_S = torch.arange(S, device=xs_SH.device)
    sorted_e_S = torch.searchsorted(offs_E, rows_S, right=True)     # expert of each copy
    pos_S = rows_S - (offs_E - _counts(offs_E)).index_select(0, sorted_e_S)
    # Kept copies go to row e*C + pos; dropped ones to their own spare row past B (unique
    # indices, so the scatter is deterministic); spare rows are never sent.
    slot_S = torch.where(pos_S < C, sorted_e_S * C + pos_S, B + rows_S)
    send_BH = _ScatterRows.apply(xs_SH, slot_S, B + S)[:B]
    send_B = None if ps_S is None else _ScatterRows.apply(ps_S, slot_S, B + S)[:B]
    splits = [L * C] * world
    # Received: (source rank, local expert, C) -> regroup to (local expert, source rank, C).
    xg = all_to_all(send_BH, splits, splits, group).view(world, L, C, H).transpose(0, 1)
    pg = None if send_B is None else all_to_all(send_B, splits, splits, group).view(world, L, C).transpose(0, 1)
    offs_L = (torch.arange(1, L + 1, device=xs_SH.device) * (world * C)).to(torch.int32)
    yg = GroupedMLP.forward_offsets(experts, xg.reshape(L * world * C, H), offs_L,
                                    None if pg is None else pg.reshape(-1), covered=True)
    y_BH = all_to_all(yg.view(L, world, C, H).transpose(0, 1).reshape(B, H), splits, splits, group)
    return _GatherRows.apply(torch.cat([y_BH, y_BH.new_zeros(S, H)]), slot_S)


# ------------------------------------------------------------------------- the module
class ExpertParallelMLP(GroupedMLP):
    """This rank's share of an MoE's experts under expert parallelism.

    A :class:`GroupedMLP` holding the ``E // W`` experts ``local_experts`` (rank ``r``:
    ``range(r*E/W, (r+1)*E/W)``; ``fc1_weight.shape[0] == E // W``), whose forward takes
    rows grouped by **global** expert and returns their outputs in the same order: each
    row travels to the rank of its expert and back by all-to-all
    (:func:`ep_expert_outputs`; with ``capacity_factor``
    :func:`ep_expert_outputs_capacity`).  Every rank of ``group`` must call it the same
    number of times, in the same order.

    ``forward(x, split_sizes, probs=None, validate=False)``: ``split_sizes`` has ``E``
    entries and must sum to ``T`` (device splits are checked only with ``validate``).
    ``forward_offsets(x, offs_E, probs, covered=True)``: the ``E`` end offsets (used by
    ``MoE``); they must cover every row.
    """

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int,
                 activation: str = "swiglu", *, group, capacity_factor: Optional[float] = None,
                 recipe: Optional[str] = None, recompute: str = "activation", device=None, dtype=None):
        local = local_expert_range(num_experts, group)
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor!r}")
        super().__init__(len(local), hidden_size, ffn_hidden_size, activation, bias=False,
                         recipe=recipe, recompute=recompute, device=device, dtype=dtype)
        self.num_experts, self.local_experts = num_experts, local
        self.group, self.capacity_factor = group, capacity_factor

    def forward(self, x: torch.Tensor, split_sizes, probs: Optional[torch.Tensor] = None,
                *, validate: bool = False) -> torch.Tensor:
        """Expert outputs of ``x`` grouped by the ``E`` global experts -> ``(T, H)``."""
        w = self.fc1_weight
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"x must have shape (T, {self.hidden_size})")
        if x.dtype != w.dtype or x.device != w.device:
            raise TypeError(f"x ({x.dtype}, {x.device}) must match the weights ({w.dtype}, {w.device})")
        probs_T = self._check_probs(probs, x)
        return self.forward_offsets(x, self._offsets(split_sizes, x, validate), probs_T)

    def _offsets(self, split_sizes, x: torch.Tensor, validate: bool) -> torch.Tensor:
        """int32 end offsets of the ``E`` groups; host splits are checked (free), device
        splits only with ``validate`` (one sync)."""
        sizes = torch.as_tensor(split_sizes)
        if sizes.dtype.is_floating_point or sizes.dtype == torch.bool or sizes.shape != (self.num_experts,):
            raise ValueError(f"split_sizes must be {self.num_experts} integers, got {split_sizes!r}")
        if sizes.device.type == "cpu" or validate:
            if bool((sizes < 0).any()) or int(sizes.sum()) != x.shape[0]:
                raise ValueError(f"split_sizes must be >= 0 and sum to {x.shape[0]}")
        return sizes.to(x.device).cumsum(0).to(torch.int32)

    def forward_offsets(self, x_TH: torch.Tensor, offs_G: torch.Tensor,
                        probs_T: Optional[torch.Tensor] = None, covered: bool = True) -> torch.Tensor:
        """Like :meth:`GroupedMLP.forward_offsets`, with the ``E`` global offsets."""
        if offs_G.numel() != self.num_experts:
            raise ValueError(f"expected {self.num_experts} global expert offsets, got {offs_G.numel()}")
        if not covered:
            raise ValueError("ExpertParallelMLP needs offsets that cover every row (covered=True)")
        return ep_expert_outputs(x_TH, probs_T, offs_G, self, self.group, self.capacity_factor)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", num_experts={self.num_experts}, "
                f"local_experts={self.local_experts}, capacity_factor={self.capacity_factor}")


def make_experts(num_experts: int, hidden_size: int, ffn_hidden_size: int, activation: str,
                 ep_group=None, capacity_factor: Optional[float] = None, **kwargs) -> GroupedMLP:
    """``MoE``'s experts: a :class:`GroupedMLP` of all ``E`` experts, or with ``ep_group``
    an :class:`ExpertParallelMLP` of this rank's ``E // W``."""
    if ep_group is None:
        if capacity_factor is not None:
            raise ValueError("capacity_factor applies to expert parallelism only: pass ep_group too")
        return GroupedMLP(num_experts, hidden_size, ffn_hidden_size, activation, bias=False, **kwargs)
    return ExpertParallelMLP(num_experts, hidden_size, ffn_hidden_size, activation, group=ep_group,
                             capacity_factor=capacity_factor, **kwargs)
