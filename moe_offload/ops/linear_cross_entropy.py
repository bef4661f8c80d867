"""Chunked LM head + cross-entropy: the logits of all tokens never exist at once.

``loss = CE(hidden_TH @ weight_VH^T (+ bias_V), labels_T)`` computed ``chunk_tokens``
rows at a time.  The forward keeps, per chunk, only that chunk's logits and saves for
backward the inputs (by reference) and one fp32 log-sum-exp per token; the backward
recomputes each chunk's logits and turns them into ``softmax - onehot`` in place.  For
Qwen3 (V = 151,936) at 32k tokens this replaces ~20 GB of fp32 logits (plus the
log-softmax of the same size that the unchunked loss keeps) by one chunk of
``DEFAULT_CHUNK_BYTES``.

Why our own and not Liger's fused linear cross-entropy or cut-cross-entropy:
they are Triton/GPU-only while our CI and ``emulate`` tests run on CPU; Liger computes
the input/weight gradients inside the forward (a full-size fp32 ``dW`` lives from the
forward to the backward); we need Hugging Face's exact loss semantics (``ignore_index``,
label shift, ``num_items_in_batch``, ``shift_labels``: :func:`causal_lm_loss`); and the
tensors we save go through ``ctx.save_for_backward``, so saved-tensor hooks (our offload
engine) see and move them.

Numerics follow the unchunked path ``F.cross_entropy(F.linear(h, W).float(), y)``: the
GEMM runs in the input dtype (a bf16 GEMM for bf16 inputs, as ``nn.Linear`` does), its
output is upcast to ``logit_dtype`` (fp32, as HF's loss does), and the logits' gradient
is computed in that dtype and cast back to the input dtype before the two backward GEMMs,
as autograd casts it through ``.float()``.  With several chunks the weight (and bias)
gradient is accumulated over chunks in fp32 and cast once at the end.

Shapes: T tokens, H hidden, V vocabulary.  No host sync: the count of non-ignored
labels for ``reduction="mean"`` stays on the device.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_CHUNK_BYTES", "LinearCrossEntropyFunction", "causal_lm_loss", "default_chunk_tokens",
           "linear_cross_entropy"]

# One chunk's logits in ``logit_dtype`` take about this many bytes.  Peak extra memory
# is ~1.5x it in forward and backward (the input-dtype GEMM output next to the fp32
# copy; the softmax is formed in place), so 1 GiB -> ~1.5 GiB, whatever T is.  Larger
# chunks pay: the fp32 weight-gradient accumulator (V x H, 1.2 GB at Qwen3's vocabulary)
# is read and written once per chunk, and with 256 MiB chunks (384 tokens) that traffic and
# the short GEMMs made the loss 2.35x the unchunked time on an H100 at 16k tokens.
DEFAULT_CHUNK_BYTES = 1 << 30


def default_chunk_tokens(vocab_size: int, logit_dtype: torch.dtype = torch.float32,
                         chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk's ``(tokens, vocab_size)`` logits in
    ``logit_dtype`` take about ``chunk_bytes``; a multiple of 64 when at least 64
    (Qwen3, V = 151,936, fp32: 384 tokens)."""
    rows = max(1, chunk_bytes // (vocab_size * torch.empty((), dtype=logit_dtype).element_size()))
    return rows - rows % 64 if rows >= 64 else rows


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator of the chunked weight gradient: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _mm_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in :func:`_acc_dtype`: a bf16/fp16 GEMM with fp32 output on CUDA, else
    the product of the upcasts (CPU has no low-precision GEMM with fp32 output)."""
    acc = _acc_dtype(a.dtype)
    if a.dtype == acc:
        return a @ b
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=acc)
    return a.to(acc) @ b.to(acc)


def _chunk_logits(h_CH, weight_VH, bias_V, logit_dtype):
    """One chunk's logits: the GEMM in the input dtype, then upcast (a copy unless equal)."""
    return F.linear(h_CH, weight_VH, bias_V).to(logit_dtype)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """``sum_t [t not ignored] * (logsumexp(z_t) - z_t[y_t])`` with ``z = h @ W^T (+ b)``,
    chunked over tokens.  Returns the fp32 (``logit_dtype``) sum; the caller divides."""

    @staticmethod
    def forward(ctx, hidden_TH, weight_VH, bias_V, labels_T, ignore_index, chunk_tokens, logit_dtype):
        T = hidden_TH.shape[0]
        valid_T = labels_T != ignore_index
        target_T = torch.where(valid_T, labels_T, 0)
        lse_T = torch.empty(T, dtype=logit_dtype, device=hidden_TH.device)
        loss = torch.zeros((), dtype=logit_dtype, device=hidden_TH.device)
        for s in range(0, T, chunk_tokens):
            e = min(s + chunk_tokens, T)
            z_CV = _chunk_logits(hidden_TH[s:e], weight_VH, bias_V, logit_dtype)
            target_logit_C = z_CV.gather(1, target_T[s:e, None]).squeeze(1)
            # logsumexp in place on our own temporary (torch.logsumexp would allocate one more)
            max_C1 = z_CV.amax(1, keepdim=True)
            max_C1 = torch.where(max_C1.isfinite(), max_C1, 0)
            lse_C = z_CV.sub_(max_C1).exp_().sum(1).log_().add_(max_C1.squeeze(1))
            lse_T[s:e] = lse_C
            loss += torch.where(valid_T[s:e], lse_C - target_logit_C, 0).sum()
        ctx.save_for_backward(hidden_TH, weight_VH, bias_V, labels_T, lse_T)
        ctx.ignore_index, ctx.chunk_tokens, ctx.logit_dtype = ignore_index, chunk_tokens, logit_dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        hidden_TH, weight_VH, bias_V, labels_T, lse_T = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        T, C = hidden_TH.shape[0], ctx.chunk_tokens
        one_chunk = T <= C
        valid_T = labels_T != ctx.ignore_index
        target_T = torch.where(valid_T, labels_T, 0)
        scale_T = torch.where(valid_T, grad_loss.to(ctx.logit_dtype), 0)      # dloss/dz row scale
        acc = _acc_dtype(hidden_TH.dtype)
        grad_h = hidden_TH.new_empty(hidden_TH.shape) if need_h else None              # contiguous
        grad_w = grad_b = None
        if need_w and not one_chunk:
            grad_w = weight_VH.new_zeros(weight_VH.shape, dtype=acc)
        if need_b:
            grad_b = bias_V.new_zeros(bias_V.shape, dtype=acc)
        for s in range(0, T, C):
            e = min(s + C, T)
            h_CH = hidden_TH[s:e]
            z_CV = _chunk_logits(h_CH, weight_VH, bias_V, ctx.logit_dtype)
            p_CV = z_CV.sub_(lse_T[s:e, None]).exp_()                         # softmax, in place
            p_CV.scatter_add_(1, target_T[s:e, None], -valid_T[s:e, None].to(p_CV.dtype))
            g_CV = p_CV.mul_(scale_T[s:e, None]).to(hidden_TH.dtype)          # as autograd casts
            if need_h:
                torch.mm(g_CV, weight_VH, out=grad_h[s:e])
            if need_w:
                if one_chunk:
                    grad_w = g_CV.t() @ h_CH                                  # = unchunked autograd
                else:
                    grad_w += _mm_acc(g_CV.t(), h_CH)
            if need_b:
                grad_b += g_CV.sum(0, dtype=acc)
        if need_w and grad_w is None:                                          # T == 0
            grad_w = torch.zeros_like(weight_VH)
        if grad_w is not None:
            grad_w = grad_w.to(weight_VH.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias_V.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def linear_cross_entropy(hidden_TH: torch.Tensor, weight_VH: torch.Tensor, labels_T: torch.Tensor, *,
                         bias_V: Optional[torch.Tensor] = None, ignore_index: int = -100,
                         reduction: str = "mean",
                         denominator: Union[torch.Tensor, int, float, None] = None,
                         chunk_tokens: Optional[int] = None,
                         logit_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Cross-entropy of the logits ``hidden @ weight^T (+ bias)`` without materialising them.

    Equals ``F.cross_entropy(F.linear(hidden, weight, bias).to(logit_dtype), labels,
    ignore_index=ignore_index, reduction=...)`` up to floating-point rounding, in memory
    ``O(chunk_tokens * V)`` instead of ``O(T * V)``.

    Args:
        hidden_TH: ``(..., H)`` inputs of the LM head (any float dtype; the GEMMs run in it).
        weight_VH: ``(V, H)`` LM-head weight, same dtype; may not require grad (frozen head).
        labels_T: integer targets of shape ``hidden_TH.shape[:-1]``; ``ignore_index`` rows
            contribute nothing.
        bias_V: optional ``(V,)`` bias.
        reduction: ``"mean"``: the sum over non-ignored tokens divided by their count
            (a device tensor: no host sync; ``nan`` when every label is ignored, as
            ``F.cross_entropy``); ``"sum"``: the sum, divided by ``denominator`` if given
            (Hugging Face's ``num_items_in_batch``; an all-ignored batch then gives 0).
        chunk_tokens: tokens per chunk; default :func:`default_chunk_tokens` (~256 MiB of
            logits per chunk).
        logit_dtype: dtype the logits are upcast to before the softmax (fp32 like HF).

    Returns:
        A 0-dim ``logit_dtype`` loss.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if reduction == "mean" and denominator is not None:
        raise ValueError("denominator is only used with reduction='sum'")
    if weight_VH.dim() != 2:
        raise ValueError(f"weight_VH must be (V, H), got shape {tuple(weight_VH.shape)}")
    V, H = weight_VH.shape
    if hidden_TH.shape[-1] != H:
        raise ValueError(f"hidden_TH's last dim {hidden_TH.shape[-1]} != weight_VH's H {H}")
    if labels_T.shape != hidden_TH.shape[:-1]:
        raise ValueError(f"labels_T shape {tuple(labels_T.shape)} != hidden_TH.shape[:-1] "
                         f"{tuple(hidden_TH.shape[:-1])}")
    if labels_T.is_floating_point() or labels_T.is_complex():
        raise ValueError(f"labels_T must be an integer tensor, got {labels_T.dtype}")
    if bias_V is not None and bias_V.shape != (V,):
        raise ValueError(f"bias_V must be ({V},), got {tuple(bias_V.shape)}")
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(V, logit_dtype)
    if int(chunk_tokens) < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")

    device_type = hidden_TH.device.type
    if torch.is_autocast_enabled(device_type):
        # as F.linear under autocast: the GEMMs run in the autocast dtype
        dtype = torch.get_autocast_dtype(device_type)
        hidden_TH, weight_VH = hidden_TH.to(dtype), weight_VH.to(dtype)
        bias_V = None if bias_V is None else bias_V.to(dtype)
    elif hidden_TH.dtype != weight_VH.dtype:
        raise ValueError(f"hidden_TH ({hidden_TH.dtype}) and weight_VH ({weight_VH.dtype}) dtypes differ")

    hidden_TH = hidden_TH.reshape(-1, H)
    labels_T = labels_T.reshape(-1).to(device=hidden_TH.device, dtype=torch.long)
    with torch.autocast(device_type, enabled=False):
        loss = LinearCrossEntropyFunction.apply(hidden_TH, weight_VH, bias_V, labels_T, int(ignore_index),
                                                int(chunk_tokens), logit_dtype)
    if reduction == "mean":
        return loss / (labels_T != ignore_index).sum()
    if denominator is not None:
        if torch.is_tensor(denominator):
            denominator = denominator.to(loss.device)
        loss = loss / denominator
    return loss


def causal_lm_loss(hidden_BSH: torch.Tensor, weight_VH: torch.Tensor, labels_BS: Optional[torch.Tensor], *,
                   bias_V: Optional[torch.Tensor] = None, ignore_index: int = -100,
                   num_items_in_batch: Union[torch.Tensor, int, None] = None,
                   shift_labels: Optional[torch.Tensor] = None,
                   chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """Hugging Face's ``ForCausalLMLoss`` on ``lm_head(hidden_BSH)``, chunked.

    Same semantics as ``transformers.loss.loss_utils.ForCausalLMLoss``: logits upcast to
    fp32; unless ``shift_labels`` is given, the labels are shifted left by one (position
    ``s`` predicts ``labels[s + 1]``; the last position is ignored); ``ignore_index``
    tokens are skipped; the loss is the mean over the counted tokens, or, with
    ``num_items_in_batch`` (an int or a tensor, e.g. from gradient accumulation), their
    sum divided by it.

    Args:
        hidden_BSH: ``(B, S, H)`` (or ``(..., S, H)``) final hidden states (after the norm).
        weight_VH: ``(V, H)`` LM-head weight.
        labels_BS: ``(B, S)`` unshifted labels; unused when ``shift_labels`` is given.
        shift_labels: ``(B, S)`` already-shifted labels (e.g. for sequence parallelism).
    """
    if shift_labels is None:
        if labels_BS is None:
            raise ValueError("causal_lm_loss needs labels_BS or shift_labels")
        labels_BS = labels_BS.to(hidden_BSH.device)
        shift_labels = F.pad(labels_BS, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden_BSH.device)
    H = hidden_BSH.shape[-1]
    if shift_labels.numel() * H != hidden_BSH.numel():
        raise ValueError(f"labels of shape {tuple(shift_labels.shape)} do not match hidden states "
                         f"{tuple(hidden_BSH.shape)}")
    hidden_TH, labels_T = hidden_BSH.reshape(-1, H), shift_labels.reshape(-1)
    if num_items_in_batch is None:
        return linear_cross_entropy(hidden_TH, weight_VH, labels_T, bias_V=bias_V, ignore_index=ignore_index,
                                    reduction="mean", chunk_tokens=chunk_tokens)
    return linear_cross_entropy(hidden_TH, weight_VH, labels_T, bias_V=bias_V, ignore_index=ignore_index,
                                reduction="sum", denominator=num_items_in_batch, chunk_tokens=chunk_tokens)
