"""``MoE``: top-k routed mixture of grouped expert MLPs, with no host sync.

Shape legend: ``T`` tokens, ``H`` hidden, ``E`` experts, ``k`` top-k, ``S = T*k`` token
copies ("slots"), sorted by expert.

Steps (all on the device):

1. ``logits = router(x)``; ``P = softmax(logits)`` over all experts in fp32;
   ``p, e = topk(P, k)``; with ``normalize_topk`` ``p /= p.sum(-1)``.
2. Sort the ``S`` slots by expert (stable ``argsort`` of ``e``); the group end offsets
   are ``searchsorted(sorted e, 0..E-1, right=True)``, so no count is read back.
3. ``GroupedMLP`` on the gathered copies, with the sorted ``p`` as ``probs``.
4. Put each copy back in slot order (``index_copy_``, unique indices) and sum the ``k``
   copies of a token.  Gather/scatter with unique indices only, so forward and
   backward are deterministic (no float atomics).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from ..offload.checkpoint import in_checkpoint_forward, is_recomputing
from .grouped_mlp import GroupedMLP

__all__ = ["MoE", "load_balancing_loss"]


class _Permute(torch.autograd.Function):
    """``x_TH[order // k]`` -> ``(S, H)``; backward sums the ``k`` copies deterministically."""

    @staticmethod
    def forward(ctx, x_TH, order_S, k: int):
        ctx.save_for_backward(order_S)
        ctx.k = k
        return x_TH.index_select(0, order_S // k)

    @staticmethod
    def backward(ctx, d_xs_SH):
        (order_S,) = ctx.saved_tensors
        return _unpermute(d_xs_SH, order_S, ctx.k), None, None


def _unpermute(y_SH, order_S, k: int):
    S, H = y_SH.shape
    slots_SH = torch.empty_like(y_SH).index_copy_(0, order_S, y_SH)
    return slots_SH.view(S // k, k, H).sum(1)


class _Unpermute(torch.autograd.Function):
    """Sum of the ``k`` expert outputs of each token -> ``(T, H)``."""

    @staticmethod
    def forward(ctx, y_SH, order_S, k: int):
        ctx.save_for_backward(order_S)
        ctx.k = k
        return _unpermute(y_SH, order_S, k)

    @staticmethod
    def backward(ctx, d_out_TH):
        (order_S,) = ctx.saved_tensors
        return d_out_TH.index_select(0, order_S // ctx.k), None, None


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
    P_E = probs_TE.mean(0)
    return num_experts * (f_E * P_E).sum()


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
        aux_loss_coef: scale of ``self.aux_loss``.
        recompute: expert recompute mode (see :class:`GroupedMLP`).

    Modules: ``router`` = ``nn.Linear(H, E, bias=False)``; ``experts`` = ``GroupedMLP``.

    After each forward ``self.aux_loss`` holds ``aux_loss_coef * E * sum_e f_e * P_e``
    (fp32 scalar, differentiable through ``P_e``; see :func:`load_balancing_loss`), to
    be added to the training loss.  Expert token counts never leave the device.

    ``self.aux_loss`` keeps the router's part of the graph (its saved softmax output)
    alive until a backward consumes it or the next forward replaces it, so add it to the
    loss you back-propagate.  Under :func:`moe_offload.offloaded_checkpoint` the
    recomputation in backward leaves it alone (a recomputed graph stored here would keep
    the recomputed inputs and their gradients alive until the next forward), and since
    that checkpoint's forward runs without grad, ``aux_loss`` is ``None`` there (with a
    one-time warning): a value without gradient would silently not train the router.
    Under ``torch.utils.checkpoint`` the recomputation sets it again: use the value read
    right after the forward.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, num_experts: int, top_k: int,
                 activation: str = "swiglu", *, normalize_topk: bool = True,
                 ep_group=None, capacity_factor: Optional[float] = None,
                 recipe: Optional[str] = None, aux_loss_coef: float = 1e-2,
                 recompute: str = "activation", device=None, dtype=None):
        super().__init__()
        if num_experts < 1 or not 1 <= top_k <= num_experts:
            raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.normalize_topk, self.aux_loss_coef = normalize_topk, aux_loss_coef
        self.router = nn.Linear(hidden_size, num_experts, bias=False, device=device, dtype=dtype)
        from .expert_parallel import make_experts     # (lazy: expert parallelism is optional)
        self.experts = make_experts(num_experts, hidden_size, ffn_hidden_size, activation, ep_group,
                                    capacity_factor, recipe=recipe, recompute=recompute,
                                    device=device, dtype=dtype)
        self.ep_group = ep_group
        self.local_experts = getattr(self.experts, "local_experts", range(num_experts))
        self.aux_loss: Optional[torch.Tensor] = None
        self._warned_checkpoint = False

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
        x_TH = x.reshape(-1, self.hidden_size)
        k, E = self.top_k, self.num_experts
        probs_TE, p_Tk, e_Tk = self.route(x_TH)
        if in_checkpoint_forward():
            # No grad here, so a value would train nothing if added to the loss: make
            # that loud instead of a silently missing router gradient.
            self.aux_loss = None
            if not self._warned_checkpoint:
                self._warned_checkpoint = True
                warnings.warn("MoE under offloaded_checkpoint: its forward runs without grad, so "
                              "aux_loss is None (the load-balancing loss cannot train the router "
                              "there); use torch.utils.checkpoint or keep this MoE outside the "
                              "checkpointed function", RuntimeWarning, stacklevel=2)
        elif not is_recomputing():     # keep the forward's value (see the class docstring)
            self.aux_loss = self.aux_loss_coef * load_balancing_loss(probs_TE, e_Tk, E)

        e_S = e_Tk.reshape(-1)
        order_S = torch.argsort(e_S, stable=True)
        sorted_e_S = e_S.index_select(0, order_S)
        offs_E = torch.searchsorted(sorted_e_S, torch.arange(E, device=x.device, dtype=e_S.dtype),
                                    right=True).to(torch.int32)
        xs_SH = _Permute.apply(x_TH, order_S, k)
        ps_S = p_Tk.reshape(-1).index_select(0, order_S)
        ys_SH = self.experts.forward_offsets(xs_SH, offs_E, ps_S, covered=True)
        return _Unpermute.apply(ys_SH, order_S, k).view(x.shape)
