"""``MoE``: top-k routed mixture of grouped expert MLPs, with no host sync.

Shape legend: ``T`` tokens, ``H`` hidden, ``E`` experts, ``k`` top-k, ``S = T*k`` token
copies ("slots"), sorted by expert.

Steps (all on the device):

1. ``logits = router(x)``; ``P = softmax(logits)`` over all experts in fp32;
   ``p, e = topk(P, k)``; with ``normalize_topk`` ``p /= p.sum(-1)``.
2. Sort the ``S`` slots by expert (:func:`~moe_offload.ops.routing.sort_by_expert`: stable
   ``argsort`` of ``e``; the group end offsets are ``searchsorted(sorted e, 0..E-1,
   right=True)``, so no count is read back).
3. ``GroupedMLP`` on the gathered copies, with the sorted ``p`` as ``probs``.
4. Put each copy back in slot order (``index_copy_``, unique indices) and sum the ``k``
   copies of a token.  Gather/scatter with unique indices only, so forward and
   backward are deterministic (no float atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .checks import check_int
from .routing import permute, permute_probs, sort_by_expert, unpermute

__all__ = ["MoE", "load_balancing_loss"]


def load_balancing_loss(probs_TE: torch.Tensor, experts_Tk: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss ``E * sum_e f_e * P_e`` (fp32 scalar).

    ``f_e``: fraction of the ``T*k`` token slots routed to expert ``e`` (no gradient);
    ``P_e``: mean router probability of ``e`` over the ``T`` tokens.  Equals 1 for a
    perfectly uniform router.
    """
    slots = experts_Tk.reshape(-1)
    counts_E = torch.zeros(num_experts, device=slots.device, dtype=probs_TE.dtype)
    counts_E.scatter_add_(0, slots, torch.ones_like(slots, dtype=probs_TE.dtype))
    f_E = counts_E / max(slots.numel(), 1)
    # T = 0: sum (zeros, still in the graph) instead of a 0/0 mean
    P_E = probs_TE.mean(0) if probs_TE.shape[0] else probs_TE.sum(0)
    return num_experts * (f_E * P_E).sum()


class _AttachAuxLoss(torch.autograd.Function):
    """``y`` unchanged (an alias); backward passes ``dy`` through and sends ``coef`` as the
    gradient of the scalar ``aux`` -- exactly what ``loss + coef * aux`` would send.

    The aux loss so travels with the tensor it is attached to: whatever back-propagates
    through it back-propagates the aux loss too, once, with no graph kept anywhere else.
    Recomputation (any checkpoint) builds and drops its own copy, which is harmless."""

    @staticmethod
    def forward(ctx, y, aux, coef: float):
        ctx.aux_meta = (aux.dtype, aux.device)
        ctx.coef = coef
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        dtype, device = ctx.aux_meta
        return dy, torch.full((), ctx.coef, dtype=dtype, device=device), None


class MoE(nn.Module):
    """Top-k mixture of experts layer: ``(..., H) -> (..., H)``.

    Args:
        hidden_size, ffn_hidden_size: ``H``, ``F`` of each expert.
        num_experts, top_k: ``E`` and ``k`` (``1 <= k <= E``).
        activation: expert activation (see :class:`GroupedMLP`).
        normalize_topk: renormalize the ``k`` chosen probs to sum to 1.
        ep_group: a ``torch.distributed`` process group of ``W`` ranks for expert
            parallelism: ``experts`` is then an ``ExpertParallelMLP`` holding the ``E // W``
            experts ``self.local_experts`` (see :mod:`moe_offload.ops.expert_parallel`).
        capacity_factor: with ``ep_group``, fixed per-expert capacity (drops overflow
            copies) instead of the dropless dispatch's one host sync per forward.
        recipe: expert compute recipe (see :class:`GroupedMLP`).
        aux_loss_coef: weight of the load-balancing loss in the training loss.
        recompute: expert recompute mode (see :class:`GroupedMLP`).
        attach_aux_loss: ``True`` (default): the load-balancing loss trains the router
            with no extra code (see below).  ``False``: nothing is attached and
            ``self.aux_loss`` keeps its graph, for users who add it to the loss themselves.

    Modules: ``router`` = ``nn.Linear(H, E, bias=False)``; ``experts`` = ``GroupedMLP``.

    Load-balancing loss: ``aux_loss_coef * E * sum_e f_e * P_e`` (fp32 scalar,
    differentiable through ``P_e``; see :func:`load_balancing_loss`).  By default it is
    *attached* to the block's output: an autograd function on the expert outputs (the
    last step before the combine that makes the output) passes the output gradient
    through and also sends ``aux_loss_coef`` into the aux loss, so back-propagating any
    loss through the output trains the router as ``loss + aux_loss`` would, once per
    backward.  No graph is stored on the module, so checkpointing (``torch.utils.checkpoint``
    in both modes, :func:`moe_offload.offloaded_checkpoint`) and offload need no care:
    recomputation builds and drops its own copy.  (Attached to the expert outputs, not to
    the returned tensor itself, so the output stays an ordinary tensor that may be
    modified in place.)  After each forward ``self.aux_loss`` holds the loss's value,
    *detached*, for logging: do not add it to the loss (it would add nothing; the
    gradient is already there).

    With ``attach_aux_loss=False`` (or to take over the weighting) ``self.aux_loss`` is
    the weighted loss *with* its graph, to be added to the loss by the caller, as in
    ``loss = task_loss + sum(m.aux_loss for m in moes)``; under checkpointing the
    recomputation then replaces it with a graph that is never back-propagated (read it
    right after the forward).  ``aux_loss_coef=0`` attaches nothing either.  Expert
    token counts never leave the device.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, num_experts: int, top_k: int,
                 activation: str = "swiglu", *, normalize_topk: bool = True,
                 ep_group=None, capacity_factor: Optional[float] = None,
                 recipe: Optional[str] = None, aux_loss_coef: float = 1e-2,
                 recompute: str = "activation", attach_aux_loss: bool = True,
                 device=None, dtype=None):
        super().__init__()
        check_int("hidden_size", hidden_size)
        check_int("ffn_hidden_size", ffn_hidden_size)
        check_int("num_experts", num_experts)
        check_int("top_k", top_k)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.normalize_topk, self.aux_loss_coef = normalize_topk, aux_loss_coef
        self.attach_aux_loss = attach_aux_loss
        self.router = nn.Linear(hidden_size, num_experts, bias=False, device=device, dtype=dtype)
        from .expert_parallel import make_experts     # (lazy: expert parallelism is optional)
        self.experts = make_experts(num_experts, hidden_size, ffn_hidden_size, activation, ep_group,
                                    capacity_factor, recipe=recipe, recompute=recompute,
                                    device=device, dtype=dtype)
        self.ep_group = ep_group
        self.local_experts = getattr(self.experts, "local_experts", range(num_experts))
        self.aux_loss: Optional[torch.Tensor] = None

    def route(self, x_TH: torch.Tensor):
        """``(probs_TE, topk_probs_Tk, topk_experts_Tk int64)``; probs in fp32 (fp64 for fp64 input)."""
        logits_TE = self.router(x_TH)
        probs_TE = torch.softmax(logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32)), -1)
        p_Tk, e_Tk = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.normalize_topk:
            p_Tk = p_Tk / p_Tk.sum(-1, keepdim=True)
        return probs_TE, p_Tk, e_Tk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Route each token to ``top_k`` experts and combine -> same shape as ``x``."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have shape (..., {self.hidden_size}), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        w = self.router.weight
        if x.dtype != w.dtype:
            raise TypeError(f"x dtype {x.dtype} does not match the MoE parameters' dtype {w.dtype}")
        if x.device != w.device:
            raise TypeError(f"x device {x.device} does not match the MoE parameters' device {w.device}")
        x_TH = x.reshape(-1, self.hidden_size)
        k, E = self.top_k, self.num_experts
        probs_TE, p_Tk, e_Tk = self.route(x_TH)
        aux = load_balancing_loss(probs_TE, e_Tk, E)
        attach = self.attach_aux_loss and self.aux_loss_coef != 0 and aux.requires_grad
        self.aux_loss = (aux.detach() if self.attach_aux_loss else aux) * self.aux_loss_coef

        order_S, offs_E = sort_by_expert(e_Tk, E)
        xs_SH = permute(x_TH, order_S, k)
        ps_S = permute_probs(p_Tk, order_S)
        ys_SH = self.experts.forward_offsets(xs_SH, offs_E, ps_S, covered=True)
        if attach:
            ys_SH = _AttachAuxLoss.apply(ys_SH, aux, float(self.aux_loss_coef))
        return unpermute(ys_SH, order_S, k).view(x.shape)
